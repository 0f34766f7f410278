//! The registry client's error type: every variant names the registry,
//! reference or digest it is about.

use serde::Deserialize;

#[cfg(doc)]
use super::retry::MIN_PROGRESS;
use super::retry::escape_text;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry answered with its JSON error body.
    #[error("{code}: {message} ({what})")]
    Api {
        status: u16,
        code: String,
        message: String,
        what: String,
    },
    #[error("authentication refused by {registry} for {what}: {reason}")]
    Auth {
        registry: String,
        what: String,
        reason: String,
    },
    #[error("cannot reach registry {registry}: {detail}")]
    Unreachable { registry: String, detail: String },
    /// Nothing listens there, or the name does not resolve: retrying soon
    /// seldom helps, so it is tried once more only.
    #[error("cannot reach registry {registry}: {detail}")]
    Refused { registry: String, detail: String },
    #[error("TLS failure talking to {registry}: {detail}")]
    Tls { registry: String, detail: String },
    #[error("HTTP {status} from {registry} for {what}")]
    Http {
        registry: String,
        status: u16,
        what: String,
    },
    #[error("{reference}: no manifest for platform {wanted}; the index has: {available}")]
    NoPlatform {
        reference: String,
        wanted: String,
        available: String,
    },
    #[error(
        "{reference} is a Docker schema1 manifest, which rimg does not read: re-push the image with a current docker, podman or skopeo"
    )]
    Schema1 { reference: String },
    #[error("{reference}: unsupported manifest media type {media_type:?}")]
    MediaType {
        reference: String,
        media_type: String,
    },
    #[error("{what}: content digest mismatch: expected {expected}, got {actual}")]
    Digest {
        what: String,
        expected: String,
        actual: String,
    },
    /// A server that answers a Range request with HTTP 200 and the whole
    /// blob, too large to slice: whoever wanted a range reads the blob whole.
    #[error(
        "{what}: the registry ignores Range requests (it answered HTTP 200 with the whole blob, {size} bytes; only blobs up to {} bytes are read whole)",
        super::range::WHOLE_BLOB_FALLBACK_MAX
    )]
    RangeIgnored { what: String, size: String },
    #[error("{what}: invalid {kind}: {detail}")]
    Invalid {
        what: String,
        kind: &'static str,
        detail: String,
    },
    /// Attempts or time ran out; `last` says what failed last.
    #[error("{last} (gave up after {attempts} attempts in {secs} s)")]
    GaveUp {
        last: Box<RegistryError>,
        attempts: u32,
        secs: u64,
    },
    /// `who` is the registry (or server) that went silent.
    #[error("{who} gave no answer within {secs} s (see --timeout)")]
    Timeout { who: String, secs: u64 },
    /// A download that trickles: fewer than [`MIN_PROGRESS`] bytes in `secs`.
    #[error("{who} sent only {bytes} bytes in {secs} s (see --timeout)")]
    TooSlow { who: String, bytes: u64, secs: u64 },
    #[error("{what}: {kind} larger than {max} bytes; refused")]
    TooLarge {
        what: String,
        kind: &'static str,
        max: usize,
    },
    /// A layer the registry would not serve, whose descriptor lists foreign
    /// URLs that were not fetched; `hint` says why and what to do.
    #[error("{error}; {hint}")]
    ForeignLayer {
        error: Box<RegistryError>,
        hint: String,
    },
    #[error("credentials: {0}")]
    Credentials(String),
    #[error("registry configuration: {0}")]
    Config(String),
}

impl RegistryError {
    /// Errors worth another try: the network, or a server having a bad moment.
    /// Whether the server ignores Range requests (see
    /// [`RegistryError::RangeIgnored`]), however the error was wrapped.
    pub fn is_range_ignored(&self) -> bool {
        match self {
            RegistryError::RangeIgnored { .. } => true,
            RegistryError::ForeignLayer { error, .. } => error.is_range_ignored(),
            _ => false,
        }
    }

    pub fn is_transient(&self) -> bool {
        match self {
            RegistryError::Unreachable { .. } => true,
            RegistryError::Http { status, .. } | RegistryError::Api { status, .. } => {
                transient_status(*status)
            }
            _ => false,
        }
    }
}

/// Statuses worth another try: a server error, or too many requests. The
/// one rule, for answers ([`RegistryError::is_transient`]) and for responses
/// before they become errors.
pub(crate) fn transient_status(status: u16) -> bool {
    status >= 500 || status == 429
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    errors: Vec<ErrorItem>,
}

#[derive(Deserialize)]
struct ErrorItem {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// Builds the error for a failed response, using the distribution JSON error
/// body when the registry sent one.
pub(crate) fn from_response(registry: &str, status: u16, body: &[u8], what: &str) -> RegistryError {
    if let Ok(parsed) = serde_json::from_slice::<ErrorBody>(body)
        && let Some(first) = parsed.errors.into_iter().next()
        && !first.code.is_empty()
    {
        // The server's words reach a terminal: no control sequences.
        let (code, message) = (escape_text(&first.code), escape_text(&first.message));
        if status == 401 || status == 403 {
            return RegistryError::Auth {
                registry: registry.to_string(),
                what: what.to_string(),
                reason: format!("{code}: {message}"),
            };
        }
        return RegistryError::Api {
            status,
            code,
            message,
            what: what.to_string(),
        };
    }
    match status {
        401 | 403 => RegistryError::Auth {
            registry: registry.to_string(),
            what: what.to_string(),
            reason: format!("HTTP {status}"),
        },
        404 => RegistryError::Api {
            status,
            code: "NOT_FOUND".into(),
            message: "not found".into(),
            what: what.to_string(),
        },
        _ => RegistryError::Http {
            registry: registry.to_string(),
            status,
            what: what.to_string(),
        },
    }
}

/// Classifies a transport error: TLS problems are told apart from plain unreachability.
pub(crate) fn from_transport(registry: &str, err: &reqwest::Error) -> RegistryError {
    let mut detail = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        detail.push_str(": ");
        detail.push_str(&s.to_string());
        source = s.source();
    }
    let lower = detail.to_ascii_lowercase();
    let refused = {
        let mut s: Option<&(dyn std::error::Error + 'static)> = Some(err);
        let mut found = false;
        while let Some(e) = s {
            found |= e
                .downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused);
            s = e.source();
        }
        found
    };
    let dns = lower.contains("dns error") || lower.contains("failed to lookup address");
    if refused || dns {
        let what = if refused {
            "connection refused (is the registry running, and is the port right?)"
        } else {
            "its name does not resolve (check the host name)"
        };
        return RegistryError::Refused {
            registry: registry.to_string(),
            detail: what.to_string(),
        };
    }
    if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake") {
        RegistryError::Tls {
            registry: registry.to_string(),
            detail,
        }
    } else {
        RegistryError::Unreachable {
            registry: registry.to_string(),
            detail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_error_body_gives_code_message_and_reference() {
        let body =
            br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{}}]}"#;
        let e = from_response("docker.io", 404, body, "docker.io/library/alpine:3.99");
        assert_eq!(
            e.to_string(),
            "MANIFEST_UNKNOWN: manifest unknown (docker.io/library/alpine:3.99)"
        );
    }

    #[test]
    fn unauthorized_becomes_an_auth_error() {
        let body = br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#;
        let e = from_response("r", 401, body, "r/x:y");
        assert!(matches!(e, RegistryError::Auth { .. }), "{e}");
    }

    #[test]
    fn server_errors_are_transient_and_client_errors_are_not() {
        assert!(from_response("r", 503, b"", "x").is_transient());
        assert!(from_response("r", 429, b"", "x").is_transient());
        assert!(!from_response("r", 404, b"", "x").is_transient());
    }

    #[test]
    fn control_characters_in_error_bodies_are_escaped() {
        let body = b"{\"errors\":[{\"code\":\"X\\u001b[2J\",\"message\":\"m\\u001b]0;t\\u0007\"}]}";
        let e = from_response("r", 500, body, "r/x:y").to_string();
        assert!(!e.chars().any(char::is_control), "{e:?}");
        assert!(e.contains("X\\u{1b}[2J"), "{e}");
    }
}
