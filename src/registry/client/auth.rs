//! How an endpoint wants to be authenticated, and the tokens and headers
//! that satisfy it: the challenge from `GET /v2/`, Basic, and the token
//! exchange (GET, or the OAuth2 POST for identity tokens), cached per scope.

use super::super::challenge::{Challenge, parse_challenges};
use super::super::credentials::Credentials;
use super::super::error::{RegistryError, from_response, from_transport};
use crate::registry::retry::{BodyError, Retry, TOKEN_MAX, error_body, read_capped};
use base64::Engine;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};
use std::time::{Duration, Instant};
use url::Url;

use super::*;

impl Client {
    /// Learns how an endpoint wants to be authenticated from `GET /v2/`.
    pub(super) async fn scheme(
        &self,
        ep: &Endpoint,
        retry: &mut Retry,
    ) -> Result<Scheme, RegistryError> {
        if let Some(s) = self
            .schemes
            .lock()
            .expect("schemes lock")
            .get(&Self::scheme_key(ep))
        {
            return Ok(s.clone());
        }
        let url = ep.base.join("/v2/").expect("static path");
        let t = Target {
            endpoint: ep,
            repository: "",
            what: format!("{} /v2/", ep.label()),
        };
        let resp = self
            .send_retrying(&t, Method::GET, url, HeaderMap::new(), None, retry)
            .await?;
        let scheme = scheme_of_ping(&resp, &ep.label())?;
        self.schemes
            .lock()
            .expect("schemes lock")
            .insert(Self::scheme_key(ep), scheme.clone());
        Ok(scheme)
    }

    pub(super) async fn authorization(
        &self,
        t: &Target<'_>,
        scheme: &Scheme,
        push: bool,
        retry: &mut Retry,
    ) -> Result<Option<HeaderValue>, RegistryError> {
        let creds = if t.endpoint.is_mirror {
            None
        } else {
            self.credentials(&t.endpoint.registry)?
        };
        let value = match scheme {
            Scheme::Anonymous => return Ok(None),
            Scheme::Basic => {
                let Some(c) = creds else {
                    return Err(RegistryError::Auth {
                        registry: t.endpoint.label(),
                        what: t.what.clone(),
                        reason: "the registry requires credentials and none were found (use --username/--password-stdin, RIMG_USERNAME/RIMG_PASSWORD, or docker/podman login)".into(),
                    });
                };
                basic_header(&c.username, &c.password)
            }
            Scheme::Bearer { realm, service } => {
                let scope = scope(t.repository, push);
                let key = (realm.clone(), scope.clone());
                if let Some(tok) = self.tokens.lock().expect("tokens lock").get(&key)
                    && tok.expires > Instant::now()
                {
                    return Ok(bearer_value(&tok.value));
                }
                let tok = self
                    .fetch_token(t, realm, service.as_deref(), &scope, creds.as_ref(), retry)
                    .await?;
                let v = bearer_value(&tok.value);
                self.tokens.lock().expect("tokens lock").insert(key, tok);
                return Ok(v);
            }
        };
        Ok(HeaderValue::from_str(&value).ok())
    }

    pub(super) fn token_age(
        &self,
        t: &Target<'_>,
        scheme: &Scheme,
        push: bool,
    ) -> Option<Duration> {
        let Scheme::Bearer { realm, .. } = scheme else {
            return None;
        };
        let key = (realm.clone(), scope(t.repository, push));
        self.tokens
            .lock()
            .expect("tokens lock")
            .get(&key)
            .map(|tok| tok.obtained.elapsed())
    }

    /// One token-server exchange with the common retry policy; the body is
    /// capped (token replies and error bodies alike).
    pub(super) async fn token_exchange(
        &self,
        server: &str,
        build: impl Fn() -> reqwest::RequestBuilder,
        retry: &mut Retry,
    ) -> Result<(StatusCode, bytes::Bytes), RegistryError> {
        loop {
            let attempt = async {
                let resp = build()
                    .send()
                    .await
                    .map_err(|e| (from_transport(server, &e), None))?;
                let status = resp.status();
                if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                    let hint = retry_after(resp.headers());
                    let body = error_body(resp).await;
                    return Err((from_response(server, status.as_u16(), &body, "token"), hint));
                }
                let max = if status.is_success() {
                    TOKEN_MAX
                } else {
                    crate::registry::retry::ERROR_BODY_MAX
                };
                match read_capped(resp, max).await {
                    Ok(body) => Ok((status, body)),
                    Err(BodyError::TooLarge) => Err((
                        RegistryError::TooLarge {
                            what: server.to_string(),
                            kind: "token reply",
                            max,
                        },
                        None,
                    )),
                    Err(BodyError::Transport(e)) => Err((from_transport(server, &e), None)),
                }
            };
            match tokio::time::timeout(retry.remaining(), attempt).await {
                Err(_) => return Err(retry.timed_out()),
                Ok(Ok(r)) => return Ok(r),
                Ok(Err((e, hint))) => retry.again(e, hint).await?,
            }
        }
    }

    pub(super) async fn fetch_token(
        &self,
        t: &Target<'_>,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        creds: Option<&Credentials>,
        retry: &mut Retry,
    ) -> Result<Token, RegistryError> {
        let auth_err = |reason: String| RegistryError::Auth {
            registry: t.endpoint.label(),
            what: t.what.clone(),
            reason,
        };
        let realm_url = Url::parse(realm)
            .map_err(|e| auth_err(format!("token realm {realm:?} is not a URL: {e}")))?;
        let token_server = format!("token server {}", realm_url.host_str().unwrap_or_default());
        // OAuth2 refresh-token exchange first when docker config holds an
        // identity token; registries that lack the POST endpoint get the GET form.
        if let Some(refresh) = creds.and_then(|c| c.identity_token.as_deref()) {
            let mut form = vec![
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh),
                ("client_id", "rimg"),
                ("scope", scope),
            ];
            if let Some(s) = service {
                form.push(("service", s));
            }
            let body = url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(form)
                .finish();
            let (status, reply) = self
                .token_exchange(
                    &token_server,
                    || {
                        self.http(&realm_url)
                            .post(realm_url.clone())
                            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                            .body(body.clone())
                    },
                    retry,
                )
                .await?;
            if status.is_success() {
                return parse_token(&reply).map_err(auth_err);
            }
            if !matches!(status.as_u16(), 404 | 405) {
                return Err(auth_err(format!(
                    "the token server refused the identity token (HTTP {})",
                    status.as_u16()
                )));
            }
        }
        let mut url = realm_url;
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", scope);
            if creds.is_some() {
                q.append_pair("account", creds.map(|c| c.username.as_str()).unwrap_or(""));
            }
        }
        let (status, reply) = self
            .token_exchange(
                &token_server,
                || {
                    let mut req = self.http(&url).get(url.clone());
                    if let Some(c) = creds.filter(|c| !c.username.is_empty()) {
                        req = req.header(
                            header::AUTHORIZATION,
                            basic_header(&c.username, &c.password),
                        );
                    }
                    req
                },
                retry,
            )
            .await?;
        if !status.is_success() {
            let detail = match from_response(&t.endpoint.label(), status.as_u16(), &reply, &t.what)
            {
                RegistryError::Auth { reason, .. } => reason,
                other => other.to_string(),
            };
            return Err(auth_err(format!("token server said: {detail}")));
        }
        parse_token(&reply).map_err(auth_err)
    }
}

/// The token scope for a repository: `pull`, or `pull,push` for requests
/// that write (blob uploads, manifest PUTs). No repository means the
/// registry's `_catalog`.
pub(super) fn scope(repository: &str, push: bool) -> String {
    if repository.is_empty() {
        return "registry:catalog:*".to_string();
    }
    let actions = if push { "pull,push" } else { "pull" };
    format!("repository:{repository}:{actions}")
}

/// How a registry wants to be authenticated, from its answer to `GET /v2/`.
pub(super) fn scheme_of_ping(
    resp: &reqwest::Response,
    label: &str,
) -> Result<Scheme, RegistryError> {
    match resp.status() {
        s if s.is_success() => Ok(Scheme::Anonymous),
        StatusCode::UNAUTHORIZED => {
            scheme_from_challenges(&challenges(resp.headers())).ok_or_else(|| RegistryError::Auth {
                registry: label.to_string(),
                what: "/v2/".into(),
                reason: "the registry asks for an authentication scheme rimg does not know".into(),
            })
        }
        s => Err(RegistryError::Http {
            registry: label.to_string(),
            status: s.as_u16(),
            what: "/v2/ (is this a distribution API v2 registry?)".into(),
        }),
    }
}

pub(super) fn challenges(headers: &HeaderMap) -> Vec<Challenge> {
    parse_challenges(
        headers
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    )
}

/// Bearer is preferred when a registry offers both.
pub(super) fn scheme_from_challenges(cs: &[Challenge]) -> Option<Scheme> {
    if let Some(b) = cs.iter().find(|c| c.scheme == "bearer")
        && let Some(realm) = b.param("realm")
    {
        return Some(Scheme::Bearer {
            realm: realm.to_string(),
            service: b.param("service").map(str::to_string),
        });
    }
    cs.iter()
        .any(|c| c.scheme == "basic")
        .then_some(Scheme::Basic)
}

pub(super) fn basic_header(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

pub(super) fn bearer_value(token: &str) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
    v.set_sensitive(true);
    Some(v)
}

pub(super) fn parse_token(body: &[u8]) -> Result<Token, String> {
    let reply: TokenReply = serde_json::from_slice(body)
        .map_err(|e| format!("the token server answered something other than a token: {e}"))?;
    let value = reply
        .token
        .filter(|t| !t.is_empty())
        .or(reply.access_token.filter(|t| !t.is_empty()))
        .ok_or("the token server's reply holds no token")?;
    let now = Instant::now();
    // Renew a little early so a request never leaves with a token about to lapse.
    let ttl = reply.expires_in.unwrap_or(DEFAULT_TOKEN_TTL).max(1);
    let margin = (ttl / 10).min(10);
    Ok(Token {
        value,
        obtained: now,
        expires: now + Duration::from_secs(ttl - margin),
    })
}
