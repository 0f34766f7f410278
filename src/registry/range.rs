//! Pieces of a blob: one HTTP Range request per read, for readers that want
//! a few parts of a layer (a table of contents, one file's bytes) without
//! downloading all of it. Owns the parsing of `Content-Range` answers and the
//! bound on what a server may make rimg hold in memory for one read.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use reqwest::Method;
use reqwest::header::{self, HeaderMap, HeaderValue};
use sha2::{Digest, Sha256};

use super::blob::BlobSource;
use super::client::{Client, Target};
use super::error::{RegistryError, from_response, from_transport};
use super::retry::{MIN_PROGRESS, Retry, error_body};
use super::types::LayerDesc;
use crate::reference::Reference;

/// A server that ignores `Range` and answers 200 with the whole blob is
/// tolerated for blobs up to this size: the blob (at most this many bytes) is
/// read, checked against its digest, and the range sliced out of it. Larger
/// blobs are refused rather than downloaded whole for one piece.
pub const WHOLE_BLOB_FALLBACK_MAX: u64 = 1 << 20;

/// Memory reserved up front for one range; the rest grows as bytes arrive, so
/// a huge range a server never sends costs nothing.
const INITIAL_CAPACITY: usize = 1 << 20;

/// `Content-Range: bytes FIRST-LAST/TOTAL` of a 206 answer; TOTAL may be `*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ContentRange {
    pub first: u64,
    pub last: u64,
    pub total: Option<u64>,
}

/// Digits only: `u64::from_str` would also take a leading `+`.
fn number(s: &str) -> Option<u64> {
    let s = s.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses a `Content-Range` value (RFC 9110 §14.4); `None` for anything that
/// is not a satisfied byte range with FIRST ≤ LAST < TOTAL.
pub(crate) fn parse_content_range(value: &str) -> Option<ContentRange> {
    let value = value.trim();
    let unit = value.get(..5)?;
    if !unit.eq_ignore_ascii_case("bytes") {
        return None;
    }
    let rest = value[5..].strip_prefix(' ')?;
    let (range, total) = rest.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let (first, last) = (number(first)?, number(last)?);
    let total = match total.trim() {
        "*" => None,
        t => Some(number(t)?),
    };
    let valid = first <= last && total.is_none_or(|t| last < t);
    valid.then_some(ContentRange { first, last, total })
}

/// The `Range` header asking for `len` (> 0) bytes from `start`.
fn range_header(start: u64, last: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("bytes={start}-{last}")).expect("ascii digits")
}

impl Client {
    /// Reads `len` bytes of the blob `desc` from byte `start`, with one HTTP
    /// Range request (`bytes=start-(start+len-1)`) through the usual auth,
    /// redirects, mirrors and (when allowed) foreign URLs, retried under the
    /// client's retry policy on transient failures.
    ///
    /// The answer must be a 206 whose `Content-Range` is exactly the range
    /// asked, with exactly `len` bytes; at most `len` bytes are held whatever
    /// the server sends. A server that answers 200 with the whole blob is
    /// refused ("the registry ignores Range requests") unless the blob is at
    /// most [`WHOLE_BLOB_FALLBACK_MAX`] bytes, in which case it is verified
    /// against its digest and sliced. A range past the end of the blob is an
    /// error; `len == 0` within the blob returns no bytes without a request.
    ///
    /// The bytes of a range cannot be checked against the layer digest: the
    /// caller verifies them (e.g. against a table of contents). Errors name
    /// the layer digest and the range, not the image reference.
    pub async fn blob_range(
        &self,
        reference: &Reference,
        desc: &LayerDesc,
        start: u64,
        len: u64,
    ) -> Result<Bytes, RegistryError> {
        let what = if len == 0 {
            format!("layer {} bytes from {start}", desc.digest)
        } else {
            format!(
                "layer {} bytes {start}-{}",
                desc.digest,
                start.saturating_add(len - 1)
            )
        };
        let end = start
            .checked_add(len)
            .filter(|&end| desc.size == 0 || end <= desc.size)
            .ok_or_else(|| past_end(&what, desc.size))?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let want = usize::try_from(len).map_err(|_| RegistryError::Invalid {
            what: what.clone(),
            kind: "byte range",
            detail: "larger than this machine can address".into(),
        })?;
        let mut retry = Retry::new(self.policy(), &format!("registry {}", reference.registry))
            .labelled(&format!("{} {what}", reference.name()));
        let sources = self.blob_sources(reference, desc).await?;
        let mut source = 0;
        loop {
            let range = Range {
                desc,
                start,
                end,
                want,
                what: &what,
            };
            let result = self
                .range_attempt(reference, &sources[source], &range, &mut retry)
                .await;
            let err = match result {
                Ok(bytes) => return Ok(bytes),
                Err(e) => e,
            };
            // A body cut short or damaged is asked again from the same source.
            let again = err.is_transient() || matches!(err, RegistryError::Digest { .. });
            let err = if again {
                match retry.again(err, None).await {
                    Ok(()) => continue,
                    Err(e) => e,
                }
            } else {
                err
            };
            if source + 1 < sources.len() && !matches!(err, RegistryError::Timeout { .. }) {
                tracing::info!("{what}: {err}; trying the next source");
                source += 1;
                retry.next_request();
                continue;
            }
            return Err(self.foreign_hint(desc, err));
        }
    }

    /// One request for the range at one source, and its body.
    async fn range_attempt(
        &self,
        reference: &Reference,
        source: &BlobSource,
        range: &Range<'_>,
        retry: &mut Retry,
    ) -> Result<Bytes, RegistryError> {
        let Range {
            desc,
            start,
            end,
            want,
            what,
        } = *range;
        let last = end - 1;
        let mut headers = HeaderMap::new();
        headers.insert(header::RANGE, range_header(start, last));
        let (resp, server) = match source {
            // Never the registry's credentials: plain_get sends none.
            BlobSource::Url(url) => (
                self.plain_get(url.clone(), headers).await?,
                url.host_str().unwrap_or("layer url").to_string(),
            ),
            BlobSource::Endpoint(ep) => {
                let t = Target {
                    endpoint: ep,
                    repository: &reference.repository,
                    what: what.to_string(),
                };
                let path = format!("/v2/{}/blobs/{}", reference.repository, desc.digest);
                let resp = self.request(&t, Method::GET, &path, headers, retry).await?;
                (resp, ep.label())
            }
        };
        let invalid = |detail: String| RegistryError::Invalid {
            what: what.to_string(),
            kind: "range answer",
            detail,
        };
        match resp.status().as_u16() {
            206 => {
                let got = resp
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_content_range);
                let Some(got) = got else {
                    return Err(invalid(
                        "HTTP 206 without a valid Content-Range header".into(),
                    ));
                };
                if let Some(total) = got.total {
                    if end > total {
                        return Err(past_end(what, total));
                    }
                    if desc.size > 0 && total != desc.size {
                        return Err(invalid(format!(
                            "the blob is {total} bytes, its descriptor says {}",
                            desc.size
                        )));
                    }
                }
                if (got.first, got.last) != (start, last) {
                    return Err(invalid(format!(
                        "asked for bytes {start}-{last}, the server sent bytes {}-{}",
                        got.first, got.last
                    )));
                }
                if let Some(n) = resp.content_length()
                    && n != want as u64
                {
                    return Err(invalid(format!(
                        "{n} bytes announced for a {want}-byte range"
                    )));
                }
                let stall = self.policy().deadline;
                read_at_most(resp, (want, true), &server, what, stall, retry).await
            }
            200 => {
                // The server ignored Range. A small blob is read whole (never
                // more than the fallback bound) and sliced.
                let whole = resp.content_length().unwrap_or(desc.size);
                let ignores = || RegistryError::RangeIgnored {
                    what: what.to_string(),
                    size: if whole > 0 {
                        whole.to_string()
                    } else {
                        "size unknown".into()
                    },
                };
                if whole == 0 || whole > WHOLE_BLOB_FALLBACK_MAX {
                    return Err(ignores());
                }
                let max = WHOLE_BLOB_FALLBACK_MAX as usize;
                let stall = self.policy().deadline;
                let body = read_at_most(resp, (max, false), &server, what, stall, retry).await?;
                if desc.digest.starts_with("sha256:") {
                    let actual = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
                    if actual != desc.digest {
                        return Err(RegistryError::Digest {
                            what: what.to_string(),
                            expected: desc.digest.to_string(),
                            actual,
                        });
                    }
                }
                if end > body.len() as u64 {
                    return Err(past_end(what, body.len() as u64));
                }
                Ok(body.slice(start as usize..end as usize))
            }
            416 => {
                let total = resp
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().strip_prefix("bytes */"))
                    .and_then(number);
                Err(past_end(what, total.unwrap_or(desc.size)))
            }
            status => {
                let body = error_body(resp).await;
                Err(from_response(&server, status, &body, what))
            }
        }
    }
}

/// One range asked: `start..end` of `desc`, `want` = `end - start` bytes.
#[derive(Clone, Copy)]
struct Range<'a> {
    desc: &'a LayerDesc,
    start: u64,
    end: u64,
    want: usize,
    what: &'a str,
}

fn past_end(what: &str, size: u64) -> RegistryError {
    RegistryError::Invalid {
        what: what.to_string(),
        kind: "byte range",
        detail: format!("it lies past the end of the {size}-byte blob"),
    }
}

/// Reads a body of at most `max` bytes (exactly `max` when `exact`), failing
/// as soon as the server sends more. A body that stops short is a transient
/// error (asked again from its start, so it costs an attempt: a server that
/// always cuts the body cannot hold the read forever); every
/// [`MIN_PROGRESS`] bytes move the deadline `stall` ahead.
async fn read_at_most(
    mut resp: reqwest::Response,
    (max, exact): (usize, bool),
    server: &str,
    what: &str,
    stall: Duration,
    retry: &mut Retry,
) -> Result<Bytes, RegistryError> {
    let mut buf = BytesMut::with_capacity(max.min(INITIAL_CAPACITY));
    let mut mark = 0;
    loop {
        let next = tokio::time::timeout(retry.remaining(), resp.chunk())
            .await
            .map_err(|_| {
                if buf.len() > mark {
                    retry.too_slow((buf.len() - mark) as u64)
                } else {
                    retry.timed_out()
                }
            })?;
        let chunk = match next {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => return Err(from_transport(server, &e)),
        };
        if buf.len() + chunk.len() > max {
            return Err(RegistryError::Invalid {
                what: what.to_string(),
                kind: "range answer",
                detail: format!("the server sent more than the {max} bytes expected"),
            });
        }
        buf.extend_from_slice(&chunk);
        if buf.len() - mark >= MIN_PROGRESS as usize {
            retry.deadline = Instant::now() + stall;
            mark = buf.len();
        }
    }
    if exact && buf.len() != max {
        return Err(RegistryError::Unreachable {
            registry: server.to_string(),
            detail: format!("the body ended after {} of {max} bytes", buf.len()),
        });
    }
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_satisfied_range_is_read_from_content_range() {
        assert_eq!(
            parse_content_range("bytes 500-999/1000"),
            Some(ContentRange {
                first: 500,
                last: 999,
                total: Some(1000)
            })
        );
        assert_eq!(
            parse_content_range("Bytes 0-0/*"),
            Some(ContentRange {
                first: 0,
                last: 0,
                total: None
            })
        );
    }

    #[test]
    fn malformed_or_impossible_content_ranges_are_refused() {
        for v in [
            "",
            "garbage",
            "bytes */1000",
            "bytes 5-4/10",
            "bytes 0-10/10",
            "bytes +1-2/10",
            "bytes 1-+2/10",
            "bytes -1-2/10",
            "items 0-1/2",
            "bytes 0-1",
            "bytes=0-1/2",
            "bytes 0-99999999999999999999999/*",
        ] {
            assert_eq!(parse_content_range(v), None, "{v:?}");
        }
    }

    #[test]
    fn the_range_header_names_first_and_last_byte() {
        assert_eq!(range_header(10, 19), "bytes=10-19");
    }

    proptest! {
        #[test]
        fn any_content_range_parses_or_fails_without_panicking(s in "\\PC{0,60}") {
            let _ = parse_content_range(&s);
        }

        #[test]
        fn a_printed_range_parses_back(first in 0u64..u64::MAX / 2, n in 0u64..1 << 40, extra in 1u64..1 << 40) {
            let last = first + n;
            let total = last + extra;
            prop_assert_eq!(
                parse_content_range(&format!("bytes {first}-{last}/{total}")),
                Some(ContentRange { first, last, total: Some(total) })
            );
        }
    }
}
