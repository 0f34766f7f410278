//! The HTTP side of the distribution API: endpoints (with mirrors), the auth
//! handshake (anonymous, Basic, Bearer tokens), retries, redirects and resumable
//! blob downloads.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use url::Url;

use super::challenge::{Challenge, parse_challenges};
use super::credentials::{CredentialStore, Credentials};
use super::error::{RegistryError, from_response, from_transport};
use crate::reference::{DOCKER_HUB, Reference};

const DOCKER_HUB_API: &str = "registry-1.docker.io";
const MAX_REDIRECTS: usize = 10;
/// Tags asked per page; Docker Hub serves at most 100.
const TAGS_PAGE: usize = 100;
/// A token this young that is refused is not stale; asking again would loop.
const TOKEN_FRESH: Duration = Duration::from_secs(2);
/// Docker's default when a token server omits `expires_in`.
const DEFAULT_TOKEN_TTL: u64 = 60;

/// A mirror for one registry, tried before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    pub registry: String,
    pub url: Url,
}

impl std::str::FromStr for Mirror {
    type Err = String;
    /// `URL` mirrors docker.io (as dockerd's registry-mirrors); `HOST=URL` mirrors HOST.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (registry, url) = match s.split_once('=') {
            Some((r, u)) => (r.to_string(), u),
            None => (DOCKER_HUB.to_string(), s),
        };
        let url = Url::parse(url).map_err(|e| format!("mirror {url:?} is not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("mirror {url} must be http:// or https://"));
        }
        Ok(Mirror { registry, url })
    }
}

#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Talk plain HTTP to every registry, not only to loopback ones.
    pub plain_http: bool,
    /// Skip TLS verification.
    pub insecure: bool,
    pub ca_certs: Vec<PathBuf>,
    pub mirrors: Vec<Mirror>,
    pub credentials: CredentialStore,
    /// Attempts per request before giving up on transient failures.
    pub max_tries: u32,
    pub connect_timeout: Duration,
    /// Longest silence while reading a response.
    pub read_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            plain_http: false,
            insecure: false,
            ca_certs: Vec::new(),
            mirrors: Vec::new(),
            credentials: CredentialStore::default(),
            max_tries: 5,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
        }
    }
}

/// Where requests for one registry go: the registry itself or a mirror of it.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    /// The registry as named in references; credentials are looked up by it.
    pub registry: String,
    /// `https://host:port`, without a trailing slash.
    pub base: Url,
    pub is_mirror: bool,
}

impl Endpoint {
    fn label(&self) -> String {
        if self.is_mirror {
            format!("mirror {}", self.base)
        } else {
            self.registry.clone()
        }
    }
}

#[derive(Debug, Clone)]
enum Scheme {
    Anonymous,
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

#[derive(Debug, Clone)]
struct Token {
    value: String,
    obtained: Instant,
    expires: Instant,
}

#[derive(Deserialize)]
struct TokenReply {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

pub struct Client {
    /// Trusts only `--ca-cert`: plain HTTP, and probing loopback registries.
    plain: reqwest::Client,
    /// Trusts the system's CAs as well; built on first HTTPS use.
    tls: OnceLock<reqwest::Client>,
    extra_roots: Vec<reqwest::Certificate>,
    opts: ClientOptions,
    schemes: Mutex<HashMap<String, Scheme>>,
    tokens: Mutex<HashMap<(String, String), Token>>,
    creds: Mutex<HashMap<String, Option<Credentials>>>,
    /// Base URL chosen per registry (https, or http for loopback/plain).
    bases: Mutex<HashMap<String, Url>>,
}

/// What a request is for, so errors can name it and scopes can be asked.
pub(crate) struct Target<'a> {
    pub endpoint: &'a Endpoint,
    pub repository: &'a str,
    pub what: String,
}

fn is_loopback(host: &str) -> bool {
    let bare = host
        .trim_start_matches('[')
        .split(']')
        .next()
        .unwrap_or(host);
    let bare = if host.starts_with('[') {
        bare
    } else {
        host.split(':').next().unwrap_or(host)
    };
    bare == "localhost"
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn backoff(attempt: u32) -> Duration {
    let base = 200u64.saturating_mul(1 << attempt.min(6));
    Duration::from_millis(base + fastrand::u64(0..=base / 2))
}

impl Client {
    pub fn new(opts: ClientOptions) -> Result<Client, RegistryError> {
        let mut extra_roots = Vec::new();
        for path in &opts.ca_certs {
            let pem = std::fs::read(path).map_err(|e| {
                RegistryError::Config(format!(
                    "cannot read CA certificate {}: {e}",
                    path.display()
                ))
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                RegistryError::Config(format!(
                    "{} holds no usable PEM certificate: {e}",
                    path.display()
                ))
            })?;
            extra_roots.extend(certs);
        }
        let plain = Self::build_http(&opts, &extra_roots, false)?;
        Ok(Client {
            plain,
            tls: OnceLock::new(),
            extra_roots,
            opts,
            schemes: Mutex::default(),
            tokens: Mutex::default(),
            creds: Mutex::default(),
            bases: Mutex::default(),
        })
    }

    /// With `system_roots`, the client trusts the system's CAs too; loading
    /// them costs tens of milliseconds, so only HTTPS requests pay for it.
    fn build_http(
        opts: &ClientOptions,
        extra_roots: &[reqwest::Certificate],
        system_roots: bool,
    ) -> Result<reqwest::Client, RegistryError> {
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(opts.connect_timeout)
            .read_timeout(opts.read_timeout)
            .user_agent(concat!("rimg/", env!("CARGO_PKG_VERSION")));
        if opts.insecure {
            builder = builder.tls_danger_accept_invalid_certs(true);
        }
        builder = if system_roots {
            extra_roots
                .iter()
                .fold(builder, |b, c| b.add_root_certificate(c.clone()))
        } else {
            builder.tls_certs_only(extra_roots.iter().cloned())
        };
        builder
            .build()
            .map_err(|e| RegistryError::Config(format!("cannot build the HTTP client: {e}")))
    }

    /// The client for `url`: plain HTTP needs no trust store.
    fn http(&self, url: &Url) -> &reqwest::Client {
        if url.scheme() == "http" {
            return &self.plain;
        }
        self.tls.get_or_init(|| {
            Self::build_http(&self.opts, &self.extra_roots, true).unwrap_or_else(|e| {
                tracing::error!("{e}; HTTPS will trust only --ca-cert");
                self.plain.clone()
            })
        })
    }

    /// Mirrors first (in order), then the registry itself.
    pub(crate) async fn endpoints(
        &self,
        reference: &Reference,
    ) -> Result<Vec<Endpoint>, RegistryError> {
        let mut out: Vec<Endpoint> = self
            .opts
            .mirrors
            .iter()
            .filter(|m| m.registry == reference.registry)
            .map(|m| {
                let mut base = m.url.clone();
                base.set_path("");
                Endpoint {
                    registry: reference.registry.clone(),
                    base,
                    is_mirror: true,
                }
            })
            .collect();
        out.push(Endpoint {
            registry: reference.registry.clone(),
            base: self.base_for(&reference.registry).await?,
            is_mirror: false,
        });
        Ok(out)
    }

    /// https unless the registry is loopback (where, like docker, plain HTTP is
    /// allowed after HTTPS fails) or `--plain-http` was given.
    async fn base_for(&self, registry: &str) -> Result<Url, RegistryError> {
        if let Some(u) = self.bases.lock().expect("bases lock").get(registry) {
            return Ok(u.clone());
        }
        let host = if registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            registry
        };
        let parse = |scheme: &str| {
            Url::parse(&format!("{scheme}://{host}")).map_err(|e| {
                RegistryError::Config(format!("registry {registry:?} is not a valid host: {e}"))
            })
        };
        let chosen = if self.opts.plain_http {
            parse("http")?
        } else if is_loopback(host) {
            // Loopback registries may speak plain HTTP, as docker allows. Asking
            // in plain HTTP first costs no TLS set-up when that is the answer;
            // a TLS server says so in its 400 reply, or hangs up.
            let http = parse("http")?;
            let probe = self
                .plain
                .get(http.join("/v2/").expect("static path"))
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            match probe {
                Ok(r) if r.status() == StatusCode::BAD_REQUEST => {
                    let body = r.text().await.unwrap_or_default().to_ascii_lowercase();
                    if body.contains("https") {
                        parse("https")?
                    } else {
                        http
                    }
                }
                Ok(r) => {
                    // The probe was the ping: remember what it said.
                    if let Ok(scheme) = scheme_of_ping(&r, registry) {
                        self.schemes
                            .lock()
                            .expect("schemes lock")
                            .insert(http.as_str().to_string(), scheme);
                    }
                    http
                }
                Err(e) if e.is_connect() => http,
                Err(_) => parse("https")?,
            }
        } else {
            parse("https")?
        };
        self.bases
            .lock()
            .expect("bases lock")
            .insert(registry.to_string(), chosen.clone());
        Ok(chosen)
    }

    fn credentials(&self, registry: &str) -> Result<Option<Credentials>, RegistryError> {
        if let Some(c) = self.creds.lock().expect("creds lock").get(registry) {
            return Ok(c.clone());
        }
        let found = self.opts.credentials.lookup(registry)?;
        self.creds
            .lock()
            .expect("creds lock")
            .insert(registry.to_string(), found.clone());
        Ok(found)
    }

    fn scheme_key(ep: &Endpoint) -> String {
        ep.base.as_str().to_string()
    }

    /// Learns how an endpoint wants to be authenticated from `GET /v2/`.
    async fn scheme(&self, ep: &Endpoint) -> Result<Scheme, RegistryError> {
        if let Some(s) = self
            .schemes
            .lock()
            .expect("schemes lock")
            .get(&Self::scheme_key(ep))
        {
            return Ok(s.clone());
        }
        let url = ep.base.join("/v2/").expect("static path");
        let resp = self
            .send_retrying(ep, Method::GET, url, HeaderMap::new())
            .await?;
        let scheme = scheme_of_ping(&resp, &ep.label())?;
        self.schemes
            .lock()
            .expect("schemes lock")
            .insert(Self::scheme_key(ep), scheme.clone());
        Ok(scheme)
    }

    async fn authorization(
        &self,
        t: &Target<'_>,
        scheme: &Scheme,
        force_new: bool,
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
                let scope = format!("repository:{}:pull", t.repository);
                let key = (realm.clone(), scope.clone());
                if !force_new
                    && let Some(tok) = self.tokens.lock().expect("tokens lock").get(&key)
                    && tok.expires > Instant::now()
                {
                    return Ok(bearer_value(&tok.value));
                }
                let tok = self
                    .fetch_token(t, realm, service.as_deref(), &scope, creds.as_ref())
                    .await?;
                let v = bearer_value(&tok.value);
                self.tokens.lock().expect("tokens lock").insert(key, tok);
                return Ok(v);
            }
        };
        Ok(HeaderValue::from_str(&value).ok())
    }

    fn token_age(&self, t: &Target<'_>, scheme: &Scheme) -> Option<Duration> {
        let Scheme::Bearer { realm, .. } = scheme else {
            return None;
        };
        let key = (realm.clone(), format!("repository:{}:pull", t.repository));
        self.tokens
            .lock()
            .expect("tokens lock")
            .get(&key)
            .map(|tok| tok.obtained.elapsed())
    }

    async fn fetch_token(
        &self,
        t: &Target<'_>,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        creds: Option<&Credentials>,
    ) -> Result<Token, RegistryError> {
        let auth_err = |reason: String| RegistryError::Auth {
            registry: t.endpoint.label(),
            what: t.what.clone(),
            reason,
        };
        let realm_url = Url::parse(realm)
            .map_err(|e| auth_err(format!("token realm {realm:?} is not a URL: {e}")))?;
        let token_server = format!("token server {}", realm_url.host_str().unwrap_or_default());
        let send = |req: reqwest::RequestBuilder| {
            let token_server = token_server.clone();
            async move {
                req.send()
                    .await
                    .map_err(|e| from_transport(&token_server, &e))
            }
        };
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
            let resp = send(
                self.http(&realm_url)
                    .post(realm_url.clone())
                    .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .body(body),
            )
            .await?;
            if resp.status().is_success() {
                return parse_token(resp).await.map_err(auth_err);
            }
            if !matches!(resp.status().as_u16(), 404 | 405) {
                return Err(auth_err(format!(
                    "the token server refused the identity token (HTTP {})",
                    resp.status().as_u16()
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
        let mut req = self.http(&url).get(url.clone());
        if let Some(c) = creds.filter(|c| !c.username.is_empty()) {
            req = req.header(
                header::AUTHORIZATION,
                basic_header(&c.username, &c.password),
            );
        }
        let resp = send(req).await?;
        if !resp.status().is_success() {
            let status = resp.status().as_u16();
            let body = resp.bytes().await.unwrap_or_default();
            let detail = match from_response(&t.endpoint.label(), status, &body, &t.what) {
                RegistryError::Auth { reason, .. } => reason,
                other => other.to_string(),
            };
            return Err(auth_err(format!("token server said: {detail}")));
        }
        parse_token(resp).await.map_err(auth_err)
    }

    /// One request with retries on transient failures, without auth or redirects.
    async fn send_retrying(
        &self,
        ep: &Endpoint,
        method: Method,
        url: Url,
        headers: HeaderMap,
    ) -> Result<reqwest::Response, RegistryError> {
        let mut attempt = 0;
        loop {
            let result = self
                .http(&url)
                .request(method.clone(), url.clone())
                .headers(headers.clone())
                .send()
                .await;
            attempt += 1;
            let wait = match &result {
                Err(e) => {
                    let err = from_transport(&ep.label(), e);
                    if matches!(err, RegistryError::Tls { .. }) || attempt >= self.opts.max_tries {
                        return Err(err);
                    }
                    tracing::debug!("{}: {err}; retrying", ep.label());
                    backoff(attempt)
                }
                Ok(r) if r.status() == StatusCode::TOO_MANY_REQUESTS => {
                    if attempt >= self.opts.max_tries {
                        return result.map_err(|e| from_transport(&ep.label(), &e));
                    }
                    retry_after(r.headers()).unwrap_or_else(|| backoff(attempt))
                }
                Ok(r) if r.status().is_server_error() && attempt < self.opts.max_tries => {
                    tracing::debug!("{}: HTTP {}; retrying", ep.label(), r.status());
                    backoff(attempt)
                }
                Ok(_) => return result.map_err(|e| from_transport(&ep.label(), &e)),
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// An authenticated request to `path` (relative to the endpoint), following
    /// redirects and renewing a stale token once.
    pub(crate) async fn request(
        &self,
        t: &Target<'_>,
        method: Method,
        path: &str,
        extra: HeaderMap,
    ) -> Result<reqwest::Response, RegistryError> {
        let url = t
            .endpoint
            .base
            .join(path)
            .map_err(|e| RegistryError::Config(format!("bad request path {path:?}: {e}")))?;
        self.request_url(t, method, url, extra).await
    }

    pub(crate) async fn request_url(
        &self,
        t: &Target<'_>,
        method: Method,
        url: Url,
        extra: HeaderMap,
    ) -> Result<reqwest::Response, RegistryError> {
        let mut scheme = self.scheme(t.endpoint).await?;
        let mut renewed = false;
        loop {
            let auth = self.authorization(t, &scheme, false).await?;
            let resp = self
                .follow(t, method.clone(), url.clone(), &extra, auth)
                .await?;
            let status = resp.status();
            let refused = status == StatusCode::UNAUTHORIZED
                || (status == StatusCode::FORBIDDEN && matches!(scheme, Scheme::Bearer { .. }));
            if !refused || renewed {
                return Ok(resp);
            }
            renewed = true;
            // The registry may name a new realm or scheme; else the token expired.
            if let Some(fresh) = scheme_from_challenges(&challenges(resp.headers())) {
                scheme = fresh;
                self.schemes
                    .lock()
                    .expect("schemes lock")
                    .insert(Self::scheme_key(t.endpoint), scheme.clone());
            }
            let age = self.token_age(t, &scheme);
            if age.is_some_and(|a| a < TOKEN_FRESH) && status == StatusCode::FORBIDDEN {
                return Ok(resp);
            }
            if let Scheme::Bearer { realm, .. } = &scheme {
                let key = (realm.clone(), format!("repository:{}:pull", t.repository));
                self.tokens.lock().expect("tokens lock").remove(&key);
            }
            tracing::debug!(
                "{}: {} refused, renewing credentials",
                t.endpoint.label(),
                t.what
            );
        }
    }

    /// Sends and follows redirects; Authorization goes only to the original host.
    async fn follow(
        &self,
        t: &Target<'_>,
        method: Method,
        mut url: Url,
        extra: &HeaderMap,
        auth: Option<HeaderValue>,
    ) -> Result<reqwest::Response, RegistryError> {
        let origin = (
            url.host_str().map(str::to_string),
            url.port_or_known_default(),
        );
        for _ in 0..=MAX_REDIRECTS {
            let mut headers = extra.clone();
            let same_origin = (
                url.host_str().map(str::to_string),
                url.port_or_known_default(),
            ) == origin;
            if same_origin && let Some(a) = &auth {
                headers.insert(header::AUTHORIZATION, a.clone());
            }
            let resp = self
                .send_retrying(t.endpoint, method.clone(), url.clone(), headers)
                .await?;
            if !resp.status().is_redirection() {
                return Ok(resp);
            }
            let location = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .ok_or_else(|| RegistryError::Http {
                    registry: t.endpoint.label(),
                    status: resp.status().as_u16(),
                    what: format!("{} (redirect without Location)", t.what),
                })?;
            url = url.join(location).map_err(|e| RegistryError::Http {
                registry: t.endpoint.label(),
                status: resp.status().as_u16(),
                what: format!("{} (bad redirect {location:?}: {e})", t.what),
            })?;
            tracing::debug!("{}: redirected to {}", t.what, url.host_str().unwrap_or(""));
        }
        Err(RegistryError::Http {
            registry: t.endpoint.label(),
            status: 310,
            what: format!("{} (more than {MAX_REDIRECTS} redirects)", t.what),
        })
    }

    /// An unauthenticated GET (foreign layer URLs), following redirects.
    pub(crate) async fn plain_get(
        &self,
        mut url: Url,
        headers: HeaderMap,
    ) -> Result<reqwest::Response, reqwest::Error> {
        for _ in 0..MAX_REDIRECTS {
            let resp = self
                .http(&url)
                .get(url.clone())
                .headers(headers.clone())
                .send()
                .await?;
            let next = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .and_then(|l| url.join(l).ok());
            match next {
                Some(n) if resp.status().is_redirection() => url = n,
                _ => return Ok(resp),
            }
        }
        self.http(&url)
            .get(url.clone())
            .headers(headers)
            .send()
            .await
    }

    /// Lists a repository's tags, following `Link` pagination.
    pub async fn tags(&self, reference: &Reference) -> Result<Vec<String>, RegistryError> {
        #[derive(Deserialize)]
        struct TagList {
            #[serde(default)]
            tags: Option<Vec<String>>,
        }
        let endpoint = self
            .endpoints(reference)
            .await?
            .pop()
            .expect("registry endpoint");
        let t = Target {
            endpoint: &endpoint,
            repository: &reference.repository,
            what: reference.name(),
        };
        let mut url = endpoint
            .base
            .join(&format!(
                "/v2/{}/tags/list?n={TAGS_PAGE}",
                reference.repository
            ))
            .map_err(|e| RegistryError::Config(e.to_string()))?;
        let mut all = Vec::new();
        for _ in 0..10_000 {
            let resp = self
                .request_url(&t, Method::GET, url.clone(), HeaderMap::new())
                .await?;
            let status = resp.status().as_u16();
            let link = resp
                .headers()
                .get(header::LINK)
                .and_then(|l| l.to_str().ok())
                .and_then(next_link);
            let body = resp
                .bytes()
                .await
                .map_err(|e| from_transport(&endpoint.label(), &e))?;
            if !(200..300).contains(&status) {
                return Err(from_response(&endpoint.label(), status, &body, &t.what));
            }
            let page: TagList =
                serde_json::from_slice(&body).map_err(|e| RegistryError::Invalid {
                    what: t.what.clone(),
                    kind: "tag list",
                    detail: e.to_string(),
                })?;
            all.extend(page.tags.unwrap_or_default());
            match link {
                Some(next) => {
                    url = url.join(&next).map_err(|e| RegistryError::Invalid {
                        what: t.what.clone(),
                        kind: "Link header",
                        detail: e.to_string(),
                    })?
                }
                None => return Ok(all),
            }
        }
        Ok(all)
    }
}

/// How a registry wants to be authenticated, from its answer to `GET /v2/`.
fn scheme_of_ping(resp: &reqwest::Response, label: &str) -> Result<Scheme, RegistryError> {
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

fn challenges(headers: &HeaderMap) -> Vec<Challenge> {
    parse_challenges(
        headers
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    )
}

/// Bearer is preferred when a registry offers both.
fn scheme_from_challenges(cs: &[Challenge]) -> Option<Scheme> {
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

fn basic_header(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

fn bearer_value(token: &str) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
    v.set_sensitive(true);
    Some(v)
}

async fn parse_token(resp: reqwest::Response) -> Result<Token, String> {
    let body = resp
        .bytes()
        .await
        .map_err(|e| format!("reading the token reply: {e}"))?;
    let reply: TokenReply = serde_json::from_slice(&body)
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

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs.min(60)))
}

/// `<url>; rel="next"`
fn next_link(link: &str) -> Option<String> {
    link.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        params
            .split(';')
            .any(|p| p.trim().trim_start_matches("rel=").trim_matches('"') == "next")
            .then(|| {
                target
                    .trim()
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .to_string()
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_link_is_read_from_the_link_header() {
        assert_eq!(
            next_link(r#"</v2/a/tags/list?last=b&n=2>; rel="next""#).as_deref(),
            Some("/v2/a/tags/list?last=b&n=2")
        );
        assert_eq!(next_link(r#"</x>; rel="prev""#), None);
    }

    #[test]
    fn loopback_hosts_are_recognised() {
        for h in [
            "localhost:5000",
            "127.0.0.1",
            "127.3.2.1:80",
            "[::1]:5000",
            "localhost",
        ] {
            assert!(is_loopback(h), "{h}");
        }
        for h in ["example.com", "10.0.0.1:5000", "localhost.example.com"] {
            assert!(!is_loopback(h), "{h}");
        }
    }

    #[test]
    fn bearer_is_preferred_over_basic() {
        let cs =
            parse_challenges([r#"Basic realm="x", Bearer realm="https://t/token",service="s""#]);
        assert!(matches!(
            scheme_from_challenges(&cs),
            Some(Scheme::Bearer { .. })
        ));
        let cs = parse_challenges([r#"Basic realm="x""#]);
        assert!(matches!(scheme_from_challenges(&cs), Some(Scheme::Basic)));
    }

    #[test]
    fn mirror_without_host_prefix_is_for_docker_hub() {
        let m: Mirror = "http://127.0.0.1:5001".parse().unwrap();
        assert_eq!(m.registry, "docker.io");
        let m: Mirror = "127.0.0.1:5000=http://127.0.0.1:5001".parse().unwrap();
        assert_eq!(m.registry, "127.0.0.1:5000");
        assert!("ftp://x".parse::<Mirror>().is_err());
    }

    #[test]
    fn backoff_grows_and_is_bounded() {
        assert!(backoff(1) < backoff(4));
        assert!(backoff(30) <= Duration::from_millis(200 * 64 * 3 / 2));
    }
}
