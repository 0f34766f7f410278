//! The HTTP side of the distribution API: endpoints (with mirrors), the auth
//! handshake (anonymous, Basic, Bearer tokens), retries, redirects and resumable
//! blob downloads.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde::Deserialize;
use url::Url;

use super::credentials::{CredentialStore, Credentials};
use super::error::RegistryError;
use super::retry::{RetryPolicy, error_body};
use crate::reference::{DOCKER_HUB, Reference};

mod auth;
mod request;

use auth::*;
use request::*;
pub(crate) use request::{next_link, valid_tag};

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
    /// Which pulls may use the mirror (registries.conf's `pull-from-mirror`).
    pub pulls: MirrorPulls,
}

/// Which references a mirror serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MirrorPulls {
    #[default]
    All,
    /// References by digest only (the same bytes whichever endpoint answers).
    DigestOnly,
    /// References by tag only.
    TagOnly,
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
        Ok(Mirror {
            registry,
            url,
            pulls: MirrorPulls::All,
        })
    }
}

#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Talk plain HTTP to every registry, not only to loopback ones.
    pub plain_http: bool,
    /// Skip TLS verification.
    pub insecure: bool,
    /// Hosts (`host[:port]`) that, like loopback ones, may speak plain HTTP
    /// and whose certificates are not verified (registries.conf `insecure`).
    pub insecure_hosts: Vec<String>,
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
            insecure_hosts: Vec::new(),
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
    /// For `insecure_hosts` over HTTPS: certificates not verified.
    tls_unverified: OnceLock<reqwest::Client>,
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
            tls_unverified: OnceLock::new(),
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
        let host = match url.port() {
            Some(p) => format!("{}:{p}", url.host_str().unwrap_or_default()),
            None => url.host_str().unwrap_or_default().to_string(),
        };
        if !self.opts.insecure && self.opts.insecure_hosts.contains(&host) {
            return self.tls_unverified.get_or_init(|| {
                let opts = ClientOptions {
                    insecure: true,
                    ..self.opts.clone()
                };
                Self::build_http(&opts, &self.extra_roots, true).unwrap_or_else(|e| {
                    tracing::error!("{e}; HTTPS to {host} will use plain HTTP's client");
                    self.plain.clone()
                })
            });
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
            .filter(|m| match m.pulls {
                MirrorPulls::All => true,
                MirrorPulls::DigestOnly => reference.digest.is_some(),
                MirrorPulls::TagOnly => reference.digest.is_none(),
            })
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
        } else if is_loopback(host) || self.opts.insecure_hosts.iter().any(|h| h == registry) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::parse_challenges;

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
    fn repository_names_outside_the_grammar_are_recognised() {
        for r in ["alpine", "library/alpine", "a.b/c_d/e-f", "x__y/z9"] {
            assert!(valid_repository(r), "{r}");
        }
        for r in ["", "A", "a//b", "/a", "a/", "-a", "a-", "a b", "a\u{1b}[2J"] {
            assert!(!valid_repository(r), "{r:?}");
        }
        assert_eq!(scope("", false), "registry:catalog:*");
    }

    #[test]
    fn writes_ask_for_push_and_reads_for_pull_only() {
        assert_eq!(scope("a/b", false), "repository:a/b:pull");
        assert_eq!(scope("a/b", true), "repository:a/b:pull,push");
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
