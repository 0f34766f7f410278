//! Sending requests: the retry policy applied to each, redirects followed
//! without leaking credentials, small bodies read under their caps, and tag
//! listing across pages.

use super::super::error::{RegistryError, from_response, from_transport, transient_status};
use crate::reference::Reference;
use crate::registry::retry::{BodyError, Retry, TAG_PAGE_MAX, error_body, read_capped};
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};
use std::time::Duration;
use url::Url;

use super::*;

impl Client {
    /// One request with retries on transient failures (connection errors,
    /// 5xx, 429 with its Retry-After), without auth or redirects. Each
    /// attempt waits at most the stall timeout for headers.
    pub(super) async fn send_retrying(
        &self,
        t: &Target<'_>,
        method: Method,
        url: Url,
        headers: HeaderMap,
        body: Option<&bytes::Bytes>,
        retry: &mut Retry,
    ) -> Result<reqwest::Response, RegistryError> {
        let label = t.endpoint.label();
        loop {
            let mut req = self
                .http(&url)
                .request(method.clone(), url.clone())
                .headers(headers.clone());
            if let Some(b) = body {
                req = req.body(b.clone());
            }
            let sent = tokio::time::timeout(retry.remaining(), req.send())
                .await
                .map_err(|_| retry.timed_out())?;
            match sent {
                Err(e) => retry.again(from_transport(&label, &e), None).await?,
                Ok(r) if transient_status(r.status().as_u16()) => {
                    let hint = retry_after(r.headers());
                    let status = r.status().as_u16();
                    let body = error_body(r).await;
                    let err = from_response(&label, status, &body, &t.what);
                    retry.again(err, hint).await?;
                }
                Ok(r) => return Ok(r),
            }
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
        retry: &mut Retry,
    ) -> Result<reqwest::Response, RegistryError> {
        let url = t
            .endpoint
            .base
            .join(path)
            .map_err(|e| RegistryError::Config(format!("bad request path {path:?}: {e}")))?;
        self.request_url(t, method, url, extra, retry).await
    }

    pub(crate) async fn request_url(
        &self,
        t: &Target<'_>,
        method: Method,
        url: Url,
        extra: HeaderMap,
        retry: &mut Retry,
    ) -> Result<reqwest::Response, RegistryError> {
        self.request_with_body(t, method, url, extra, None, retry)
            .await
    }

    /// As [`Client::request_url`], sending `body`. Methods that write
    /// (anything but GET and HEAD) ask a token for `pull,push`.
    pub(crate) async fn request_with_body(
        &self,
        t: &Target<'_>,
        method: Method,
        url: Url,
        extra: HeaderMap,
        body: Option<bytes::Bytes>,
        retry: &mut Retry,
    ) -> Result<reqwest::Response, RegistryError> {
        let push = !matches!(method, Method::GET | Method::HEAD);
        let mut scheme = self.scheme(t.endpoint, retry).await?;
        let mut renewed = false;
        loop {
            let auth = self.authorization(t, &scheme, push, retry).await?;
            let resp = self
                .follow(
                    t,
                    method.clone(),
                    url.clone(),
                    (&extra, body.as_ref()),
                    auth,
                    retry,
                )
                .await?;
            let status = resp.status();
            let refused = status == StatusCode::UNAUTHORIZED
                || (status == StatusCode::FORBIDDEN && matches!(scheme, Scheme::Bearer { .. }));
            // One renewal at most: a refusal is never retried beyond it.
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
            let age = self.token_age(t, &scheme, push);
            if age.is_some_and(|a| a < TOKEN_FRESH) && status == StatusCode::FORBIDDEN {
                return Ok(resp);
            }
            if let Scheme::Bearer { realm, .. } = &scheme {
                let key = (realm.clone(), scope(t.repository, push));
                self.tokens.lock().expect("tokens lock").remove(&key);
            }
            tracing::debug!(
                "{}: {} refused, renewing credentials",
                t.endpoint.label(),
                t.what
            );
        }
    }

    /// Sends (headers and body) and follows redirects; Authorization goes
    /// only to the original host.
    pub(crate) async fn follow(
        &self,
        t: &Target<'_>,
        method: Method,
        mut url: Url,
        (extra, body): (&HeaderMap, Option<&bytes::Bytes>),
        auth: Option<HeaderValue>,
        retry: &mut Retry,
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
                .send_retrying(t, method.clone(), url.clone(), headers, body, retry)
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

    /// A GET whose whole body is wanted in memory (manifests, configs, tag
    /// pages), with the common retry policy around request and body alike: a
    /// body cut short, a stall or a `check` that fails with a digest
    /// mismatch costs an attempt, not the operation. The body is capped at
    /// `max` while it streams.
    pub(crate) async fn get_small(
        &self,
        t: &Target<'_>,
        url: Url,
        headers: HeaderMap,
        (kind, max): (&'static str, usize),
        retry: &mut Retry,
        check: impl Fn(&HeaderMap, &[u8]) -> Result<(), RegistryError>,
    ) -> Result<(HeaderMap, bytes::Bytes), RegistryError> {
        let label = t.endpoint.label();
        loop {
            let remaining = retry.remaining();
            let attempt = async {
                let resp = self
                    .request_url(t, Method::GET, url.clone(), headers.clone(), retry)
                    .await?;
                let status = resp.status();
                let got = resp.headers().clone();
                if !status.is_success() {
                    let body = error_body(resp).await;
                    return Err(from_response(&label, status.as_u16(), &body, &t.what));
                }
                let body = match read_capped(resp, max).await {
                    Ok(b) => b,
                    Err(BodyError::TooLarge) => {
                        return Err(RegistryError::TooLarge {
                            what: t.what.clone(),
                            kind,
                            max,
                        });
                    }
                    Err(BodyError::Transport(e)) => return Err(from_transport(&label, &e)),
                };
                check(&got, &body)?;
                Ok((got, body))
            };
            match tokio::time::timeout(remaining, attempt).await {
                Err(_) => return Err(retry.timed_out()),
                Ok(Ok(r)) => return Ok(r),
                Ok(Err(e)) => retry.again(e, None).await?,
            }
        }
    }

    /// An unauthenticated GET of a foreign layer URL, following redirects.
    /// Only with `foreign_urls`; over HTTPS unless the host is loopback.
    pub(crate) async fn plain_get(
        &self,
        mut url: Url,
        headers: HeaderMap,
    ) -> Result<reqwest::Response, RegistryError> {
        for _ in 0..=MAX_REDIRECTS {
            check_foreign_url(&url)?;
            let host = url.host_str().unwrap_or("layer url").to_string();
            let resp = self
                .http(&url)
                .get(url.clone())
                .headers(headers.clone())
                .send()
                .await
                .map_err(|e| from_transport(&host, &e))?;
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
        Err(RegistryError::Http {
            registry: url.host_str().unwrap_or("layer url").to_string(),
            status: 310,
            what: format!("foreign layer URL (more than {MAX_REDIRECTS} redirects)"),
        })
    }

    /// Lists a repository's tags, following `Link` pagination. A `Link` back
    /// to a page already read ends the listing with an error, as do more than
    /// [`MAX_TAG_PAGES`] pages.
    pub async fn tags(&self, reference: &Reference) -> Result<Vec<String>, RegistryError> {
        let path = format!("/v2/{}/tags/list?n={TAGS_PAGE}", reference.repository);
        let listing = Listing {
            field: "tags",
            kind: "tag list",
            page: "tag list page",
            what: "tags",
            keep: valid_tag,
        };
        self.list(reference, &reference.repository, &path, listing)
            .await
    }

    /// Lists the repositories a registry's `_catalog` names, paginated as
    /// [`Self::tags`] is. Many registries refuse it (401/403/404): that is
    /// an error here, and a repository it does not list may still exist.
    pub async fn catalog(&self, registry: &str) -> Result<Vec<String>, RegistryError> {
        let reference = Reference {
            registry: registry.to_string(),
            repository: String::new(),
            tag: None,
            digest: None,
        };
        let listing = Listing {
            field: "repositories",
            kind: "repository catalog",
            page: "repository catalog page",
            what: "repositories",
            keep: valid_repository,
        };
        let path = format!("/v2/_catalog?n={TAGS_PAGE}");
        // An empty repository asks for the `registry:catalog:*` scope.
        self.list(&reference, "", &path, listing).await
    }

    /// One paginated name list (`tags/list`, `_catalog`), every page read.
    async fn list(
        &self,
        reference: &Reference,
        repository: &str,
        path: &str,
        listing: Listing,
    ) -> Result<Vec<String>, RegistryError> {
        let endpoint = self
            .endpoints(reference)
            .await?
            .pop()
            .expect("registry endpoint");
        let t = Target {
            endpoint: &endpoint,
            repository,
            what: if repository.is_empty() {
                reference.registry.clone()
            } else {
                reference.name()
            },
        };
        let mut url = endpoint
            .base
            .join(path)
            .map_err(|e| RegistryError::Config(e.to_string()))?;
        let invalid = |detail: String| RegistryError::Invalid {
            what: t.what.clone(),
            kind: listing.kind,
            detail,
        };
        let mut seen = std::collections::HashSet::new();
        let mut all = Vec::new();
        loop {
            if !seen.insert(url.to_string()) {
                return Err(invalid(format!(
                    "the Link header leads back to a page already read ({})",
                    crate::registry::retry::escape_text(url.as_str())
                )));
            }
            if seen.len() > MAX_TAG_PAGES {
                return Err(invalid(format!("more than {MAX_TAG_PAGES} pages; refused")));
            }
            let mut retry = Retry::new(self.policy(), &format!("registry {}", endpoint.label()))
                .labelled(&t.what);
            let (headers, body) = self
                .get_small(
                    &t,
                    url.clone(),
                    HeaderMap::new(),
                    (listing.page, TAG_PAGE_MAX),
                    &mut retry,
                    |_, _| Ok(()),
                )
                .await?;
            let page: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(&body).map_err(|e| invalid(e.to_string()))?;
            let names: Vec<String> = match page.get(listing.field) {
                None | Some(serde_json::Value::Null) => Vec::new(),
                Some(v) => serde_json::from_value(v.clone()).map_err(|e| invalid(e.to_string()))?,
            };
            // Names reach a terminal: any that break their grammar (control
            // sequences included) are left out, and counted.
            let (good, bad): (Vec<String>, Vec<String>) =
                names.into_iter().partition(|n| (listing.keep)(n));
            if !bad.is_empty() {
                tracing::warn!(
                    "{}: {} {} that are not valid names were left out",
                    t.what,
                    bad.len(),
                    listing.what
                );
            }
            all.extend(good);
            if all.len() > MAX_TAGS {
                return Err(invalid(format!(
                    "more than {MAX_TAGS} {}; refused",
                    listing.what
                )));
            }
            let link = headers
                .get(header::LINK)
                .and_then(|l| l.to_str().ok())
                .and_then(next_link);
            match link {
                Some(next) => {
                    url = url.join(&next).map_err(|e| RegistryError::Invalid {
                        what: t.what.clone(),
                        kind: "Link header",
                        detail: e.to_string(),
                    })?;
                    // The next page goes out with the registry's credentials:
                    // only to the registry itself.
                    if url.origin() != endpoint.base.origin() {
                        return Err(invalid(format!(
                            "the Link header points to another host ({})",
                            crate::registry::retry::escape_text(url.as_str())
                        )));
                    }
                }
                None => return Ok(all),
            }
        }
    }
}

/// What one paginated listing holds and how its names are checked.
struct Listing {
    /// The JSON field with the names.
    field: &'static str,
    kind: &'static str,
    /// One page of it, for messages.
    page: &'static str,
    /// The names, plural, for messages.
    what: &'static str,
    keep: fn(&str) -> bool,
}

/// The distribution spec's repository grammar: lowercase path components
/// of `[a-z0-9]+([._-][a-z0-9]+)*` (`__` allowed), joined by `/`.
pub(crate) fn valid_repository(r: &str) -> bool {
    r.len() <= 255
        && r.split('/').all(|c| {
            let b = c.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter().all(|&c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-')
                })
        })
}

/// Docker's tag grammar: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub(crate) fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

pub(super) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
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
pub(crate) fn next_link(link: &str) -> Option<String> {
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
