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
use super::retry::{
    BodyError, Retry, RetryPolicy, TAG_PAGE_MAX, TOKEN_MAX, error_body, read_capped,
};
use crate::reference::{DOCKER_HUB, Reference};

const DOCKER_HUB_API: &str = "registry-1.docker.io";
const MAX_REDIRECTS: usize = 10;
/// Tags asked per page; Docker Hub serves at most 100.
const TAGS_PAGE: usize = 100;
/// Pages of a tag list followed at most (100,000 tags at 100 a page).
const MAX_TAG_PAGES: usize = 1000;
/// Tags kept at most, whatever the page size a server chooses.
const MAX_TAGS: usize = 1_000_000;
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
    /// Longest silence while waiting for a response's headers or its next
    /// bytes (the stall timeout).
    pub read_timeout: Duration,
    /// The longest one operation keeps trying: resolving an image, one page
    /// of tags, or a blob without receiving a new byte.
    pub deadline: Duration,
    /// Fetch foreign layers from the `urls` of their descriptors (HTTPS
    /// only, unless loopback; never with the registry's credentials).
    pub foreign_urls: bool,
    /// Layers downloaded (and inflated, each on a thread) at once.
    pub parallel_layers: usize,
}

/// Default number of layers fetched at once: enough to fill a link, few
/// enough that a 1000-layer image costs a handful of threads.
pub const DEFAULT_PARALLEL_LAYERS: usize = 4;

/// Default attempts per request.
pub const DEFAULT_TRIES: u32 = 6;
/// Default stall timeout.
pub const DEFAULT_STALL: Duration = Duration::from_secs(30);
/// Default deadline of one operation.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(60);

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            plain_http: false,
            insecure: false,
            ca_certs: Vec::new(),
            mirrors: Vec::new(),
            credentials: CredentialStore::default(),
            max_tries: DEFAULT_TRIES,
            connect_timeout: Duration::from_secs(10),
            read_timeout: DEFAULT_STALL,
            deadline: DEFAULT_DEADLINE,
            foreign_urls: false,
            parallel_layers: DEFAULT_PARALLEL_LAYERS,
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
    pub(crate) fn label(&self) -> String {
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
    /// Bounds the layers fetched at once, and so the threads inflating them.
    layer_slots: tokio::sync::Semaphore,
}

/// What a request is for, so errors can name it and scopes can be asked.
pub(crate) struct Target<'a> {
    pub endpoint: &'a Endpoint,
    pub repository: &'a str,
    pub what: String,
}

pub(crate) fn is_loopback(host: &str) -> bool {
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
            layer_slots: tokio::sync::Semaphore::new(opts.parallel_layers.max(1)),
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
                    let body = error_body(r).await;
                    let body = String::from_utf8_lossy(&body).to_ascii_lowercase();
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

    /// The retry policy every operation of this client follows.
    pub fn policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_tries: self.opts.max_tries.max(1),
            deadline: self.opts.deadline,
        }
    }

    /// Waits for one of the few slots for a layer download; held until the
    /// layer is in the cache.
    pub async fn layer_slot(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.layer_slots
            .acquire()
            .await
            .expect("the semaphore is never closed")
    }

    /// Whether foreign-layer URLs may be fetched.
    pub(crate) fn foreign_urls(&self) -> bool {
        self.opts.foreign_urls
    }

    /// Learns how an endpoint wants to be authenticated from `GET /v2/`.
    async fn scheme(&self, ep: &Endpoint, retry: &mut Retry) -> Result<Scheme, RegistryError> {
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
            .send_retrying(&t, Method::GET, url, HeaderMap::new(), retry)
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
                let scope = format!("repository:{}:pull", t.repository);
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

    /// One token-server exchange with the common retry policy; the body is
    /// capped (token replies and error bodies alike).
    async fn token_exchange(
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
                    super::retry::ERROR_BODY_MAX
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

    async fn fetch_token(
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

    /// One request with retries on transient failures (connection errors,
    /// 5xx, 429 with its Retry-After), without auth or redirects. Each
    /// attempt waits at most the stall timeout for headers.
    async fn send_retrying(
        &self,
        t: &Target<'_>,
        method: Method,
        url: Url,
        headers: HeaderMap,
        retry: &mut Retry,
    ) -> Result<reqwest::Response, RegistryError> {
        let label = t.endpoint.label();
        loop {
            let sent = tokio::time::timeout(
                retry.remaining(),
                self.http(&url)
                    .request(method.clone(), url.clone())
                    .headers(headers.clone())
                    .send(),
            )
            .await
            .map_err(|_| retry.timed_out())?;
            match sent {
                Err(e) => retry.again(from_transport(&label, &e), None).await?,
                Ok(r)
                    if r.status() == StatusCode::TOO_MANY_REQUESTS
                        || r.status().is_server_error() =>
                {
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
        let mut scheme = self.scheme(t.endpoint, retry).await?;
        let mut renewed = false;
        loop {
            let auth = self.authorization(t, &scheme, retry).await?;
            let resp = self
                .follow(t, method.clone(), url.clone(), &extra, auth, retry)
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
                .send_retrying(t, method.clone(), url.clone(), headers, retry)
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
        let invalid = |detail: String| RegistryError::Invalid {
            what: t.what.clone(),
            kind: "tag list",
            detail,
        };
        let mut seen = std::collections::HashSet::new();
        let mut all = Vec::new();
        loop {
            if !seen.insert(url.to_string()) {
                return Err(invalid(format!(
                    "the Link header leads back to a page already read ({})",
                    super::retry::escape_text(url.as_str())
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
                    ("tag list page", TAG_PAGE_MAX),
                    &mut retry,
                    |_, _| Ok(()),
                )
                .await?;
            let page: TagList =
                serde_json::from_slice(&body).map_err(|e| invalid(e.to_string()))?;
            // Tags reach a terminal: any that break the tag grammar (control
            // sequences included) are left out, and counted.
            let (good, bad): (Vec<String>, Vec<String>) = page
                .tags
                .unwrap_or_default()
                .into_iter()
                .partition(|t| valid_tag(t));
            if !bad.is_empty() {
                tracing::warn!(
                    "{}: {} tags that are not valid tag names were left out",
                    t.what,
                    bad.len()
                );
            }
            all.extend(good);
            if all.len() > MAX_TAGS {
                return Err(invalid(format!("more than {MAX_TAGS} tags; refused")));
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
                            super::retry::escape_text(url.as_str())
                        )));
                    }
                }
                None => return Ok(all),
            }
        }
    }
}

/// Docker's tag grammar: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// Foreign layers are fetched over HTTPS, or plain HTTP on loopback only.
pub(crate) fn check_foreign_url(url: &Url) -> Result<(), RegistryError> {
    let host = url.host_str().unwrap_or_default();
    match url.scheme() {
        "https" => Ok(()),
        "http" if is_loopback(host) => Ok(()),
        other => Err(RegistryError::Config(format!(
            "foreign layer URL {} uses {other}; only https (or http on loopback) is fetched",
            super::retry::escape_text(url.as_str())
        ))),
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

fn parse_token(body: &[u8]) -> Result<Token, String> {
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
    fn tags_outside_the_grammar_are_recognised() {
        for t in ["latest", "3.10", "v1_2-rc.3", "_x"] {
            assert!(valid_tag(t), "{t}");
        }
        let long = "a".repeat(129);
        for t in ["", ".x", "-x", "a b", "x\u{1b}[2J", "a/b", long.as_str()] {
            assert!(!valid_tag(t), "{t:?}");
        }
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
}
