//! One retry policy for every request, caps on every body read into memory,
//! and the escaping of text a registry sends before it reaches a terminal.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::error::RegistryError;

/// Bodies rimg reads into memory, each with its own cap, enforced while the
/// body streams: a server that never ends a chunked body costs at most this.
pub(crate) const MANIFEST_MAX: usize = 4 << 20;
pub(crate) const CONFIG_MAX: usize = 32 << 20;
/// Error bodies are only read for their JSON error code and message.
pub(crate) const ERROR_BODY_MAX: usize = 64 << 10;
/// Token replies are a few kilobytes; some carry a refresh token too.
pub(crate) const TOKEN_MAX: usize = 1 << 20;
/// One page of a tag list (100 tags asked; some registries send thousands).
pub(crate) const TAG_PAGE_MAX: usize = 4 << 20;
/// A download counts as progressing once this many new bytes arrived: a
/// server trickling a byte at a time must not hold a layer forever, so a
/// download slower than this per deadline (1 KiB/s at the default) fails.
pub const MIN_PROGRESS: u64 = 64 << 10;
/// A digest mismatch is fetched again from the start this many times.
pub(crate) const DIGEST_REFETCHES: u32 = 2;

/// How long and how often one operation may keep trying.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts per operation, the first included.
    pub max_tries: u32,
    /// The longest one operation keeps trying (for a blob: without receiving
    /// a new byte).
    pub deadline: Duration,
}

/// The retry budget of one operation.
pub(crate) struct Retry {
    policy: RetryPolicy,
    started: Instant,
    pub(crate) deadline: Instant,
    attempt: u32,
    digest_refetches: u32,
    /// Names the operation in its timeout error.
    what: String,
    /// Names it in retry warnings, which have no context around them.
    label: String,
}

impl Retry {
    pub(crate) fn new(policy: RetryPolicy, what: &str) -> Retry {
        let now = Instant::now();
        Retry {
            policy,
            started: now,
            deadline: now + policy.deadline,
            attempt: 1,
            digest_refetches: 0,
            what: what.to_string(),
            label: what.to_string(),
        }
    }

    pub(crate) fn labelled(mut self, label: &str) -> Retry {
        self.label = label.to_string();
        self
    }

    /// A new request of the same operation: its own attempts, the same deadline.
    pub(crate) fn next_request(&mut self) {
        self.attempt = 1;
        self.digest_refetches = 0;
    }

    /// New bytes arrived: a connection that breaks after them deserves as
    /// many attempts as the first (the deadline stays).
    pub(crate) fn received_some(&mut self) {
        self.attempt = 1;
    }

    /// A download that made progress starts a fresh budget.
    pub(crate) fn progressed(&mut self) {
        self.attempt = 1;
        self.deadline = Instant::now() + self.policy.deadline;
    }

    /// The time left before the deadline.
    pub(crate) fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// The error for a download that received only `bytes` before the deadline.
    pub(crate) fn too_slow(&self, bytes: u64) -> RegistryError {
        RegistryError::TooSlow {
            who: self.what.clone(),
            bytes,
            secs: self.policy.deadline.as_secs(),
        }
    }

    /// The error for an operation that ran out of time while waiting.
    pub(crate) fn timed_out(&self) -> RegistryError {
        RegistryError::Timeout {
            who: self.what.clone(),
            secs: self.started.elapsed().as_secs(),
        }
    }

    /// After a failure: waits and returns `Ok` if another attempt is worth
    /// it, else the error to report. `hint` is a server's Retry-After.
    pub(crate) async fn again(
        &mut self,
        err: RegistryError,
        hint: Option<Duration>,
    ) -> Result<(), RegistryError> {
        let worth = match &err {
            RegistryError::Digest { .. } => {
                self.digest_refetches += 1;
                self.digest_refetches <= DIGEST_REFETCHES
            }
            // One more try, at once, for a restarting registry; no more.
            RegistryError::Refused { .. } => self.attempt < 2,
            e => e.is_transient(),
        };
        if !worth {
            return Err(err);
        }
        let wait = hint.unwrap_or_else(|| backoff(self.attempt));
        let out_of_budget =
            self.attempt >= self.policy.max_tries || Instant::now() + wait >= self.deadline;
        if out_of_budget {
            return Err(RegistryError::GaveUp {
                last: Box::new(err),
                attempts: self.attempt,
                secs: self.started.elapsed().as_secs(),
            });
        }
        // Visible by default: a user whose command seems stuck learns why.
        let msg = err.to_string();
        let prefix = if msg.contains(&self.label) {
            String::new()
        } else {
            format!("{}: ", self.label)
        };
        let level_warn = !matches!(err, RegistryError::Refused { .. });
        if level_warn {
            tracing::warn!(
                "{prefix}{msg}; retrying in {:.1} s (attempt {} of {})",
                wait.as_secs_f64(),
                self.attempt + 1,
                self.policy.max_tries
            );
        }
        self.attempt += 1;
        tokio::time::sleep(wait).await;
        Ok(())
    }
}

/// Exponential backoff with jitter: 200 ms, 400 ms, ... capped at 12.8 s, plus
/// up to half again at random so clients that failed together spread out.
pub(crate) fn backoff(attempt: u32) -> Duration {
    let base = 200u64.saturating_mul(1 << attempt.min(6));
    Duration::from_millis(base + fastrand::u64(0..=base / 2))
}

/// Why a capped body could not be read.
pub(crate) enum BodyError {
    Transport(reqwest::Error),
    TooLarge,
}

/// Reads a body into memory, stopping as soon as it passes `max` bytes
/// rather than after the server stops sending.
pub(crate) async fn read_capped(
    mut resp: reqwest::Response,
    max: usize,
) -> Result<Bytes, BodyError> {
    if resp.content_length().is_some_and(|l| l > max as u64) {
        return Err(BodyError::TooLarge);
    }
    let mut buf = BytesMut::new();
    while let Some(chunk) = resp.chunk().await.map_err(BodyError::Transport)? {
        if buf.len() + chunk.len() > max {
            return Err(BodyError::TooLarge);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// An error body, for its code and message only: capped in size and in
/// time (a body trickled a byte at a time must not hold the error back), and
/// empty when it cannot be read.
pub(crate) async fn error_body(resp: reqwest::Response) -> Bytes {
    tokio::time::timeout(ERROR_BODY_TIME, read_capped(resp, ERROR_BODY_MAX))
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default()
}

/// The longest an error body is read.
const ERROR_BODY_TIME: Duration = Duration::from_secs(5);

/// A message made safe for a terminal: control characters (ESC, CR, BEL...)
/// are shown escaped instead of acting.
pub fn escape_controls(s: &str) -> String {
    crate::names::escaped_text(s)
}

/// Text from a server made safe for a terminal, and bounded in length.
pub fn escape_text(s: &str) -> String {
    const MAX: usize = 512;
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", crate::names::escaped_text(&s[..cut])),
        None => crate::names::escaped_text(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_text_neutralises_terminal_control_sequences() {
        assert_eq!(escape_text("a\x1b[2Jb\rc\x07"), "a\\u{1b}[2Jb\\rc\\u{7}");
        assert_eq!(escape_text("manifest unknown"), "manifest unknown");
        assert!(escape_text(&"x".repeat(10_000)).chars().count() <= 513);
    }

    #[test]
    fn backoff_grows_and_is_bounded() {
        assert!(backoff(1) < backoff(4));
        assert!(backoff(30) <= Duration::from_millis(200 * 64 * 3 / 2));
    }

    fn policy(tries: u32, secs: u64) -> RetryPolicy {
        RetryPolicy {
            max_tries: tries,
            deadline: Duration::from_secs(secs),
        }
    }

    fn unreachable() -> RegistryError {
        RegistryError::Unreachable {
            registry: "r".into(),
            detail: "reset".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn transient_errors_are_retried_until_the_attempts_run_out() {
        let mut r = Retry::new(policy(3, 600), "x");
        assert!(r.again(unreachable(), None).await.is_ok());
        assert!(r.again(unreachable(), None).await.is_ok());
        let e = r.again(unreachable(), None).await.unwrap_err();
        assert!(e.to_string().contains("gave up after 3 attempts"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_after_past_the_deadline_is_not_waited_for() {
        let mut r = Retry::new(policy(10, 5), "x");
        let e = r
            .again(unreachable(), Some(Duration::from_secs(30)))
            .await
            .unwrap_err();
        assert!(matches!(e, RegistryError::GaveUp { .. }), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn not_found_and_auth_errors_are_never_retried() {
        let mut r = Retry::new(policy(10, 600), "x");
        let e = RegistryError::Api {
            status: 404,
            code: "MANIFEST_UNKNOWN".into(),
            message: "m".into(),
            what: "x".into(),
        };
        assert!(matches!(
            r.again(e, None).await.unwrap_err(),
            RegistryError::Api { .. }
        ));
        let e = RegistryError::Auth {
            registry: "r".into(),
            what: "x".into(),
            reason: "no".into(),
        };
        assert!(r.again(e, None).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_digest_mismatch_is_fetched_again_twice_then_reported() {
        let mut r = Retry::new(policy(10, 600), "x");
        let d = || RegistryError::Digest {
            what: "x".into(),
            expected: "a".into(),
            actual: "b".into(),
        };
        assert!(r.again(d(), None).await.is_ok());
        assert!(r.again(d(), None).await.is_ok());
        assert!(matches!(
            r.again(d(), None).await.unwrap_err(),
            RegistryError::Digest { .. }
        ));
    }
}
