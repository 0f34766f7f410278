//! Layer blob downloads: streamed, hashed as they stream, resumed with a Range
//! request when a connection breaks, and handed to synchronous readers
//! (decompressors) through a bounded channel so network and inflate overlap.

use std::io::{self, Read};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::Method;
use reqwest::header::{self, HeaderMap, HeaderValue};
use sha2::Digest as _;
use tokio::sync::mpsc;

use super::client::{Client, Target, check_foreign_url};
use super::error::{RegistryError, from_response, from_transport};
use super::retry::{MIN_PROGRESS, Retry, error_body, escape_text};
use super::types::LayerDesc;
use crate::digest::Digest;
use crate::reference::Reference;

/// Chunks in flight between the download task and the reader.
const CHANNEL_DEPTH: usize = 64;

/// A verified blob stream for synchronous consumers. `read` returns an error
/// instead of end-of-file when the content does not hash to its digest, so a
/// consumer that publishes only after EOF never publishes bad bytes.
pub struct BlobReader {
    rx: mpsc::Receiver<Result<Bytes, RegistryError>>,
    current: Bytes,
    done: bool,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for BlobReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            if self.done {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(e)) => {
                    self.done = true;
                    return Err(io::Error::other(e));
                }
                None => {
                    self.done = true;
                    return Ok(0);
                }
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

impl Client {
    /// Starts downloading `desc` on the current runtime and returns a blocking
    /// reader over it. Call the reader from a blocking thread, never a runtime one.
    pub fn blob_reader(self: &Arc<Self>, reference: &Reference, desc: &LayerDesc) -> BlobReader {
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        let client = Arc::clone(self);
        let reference = reference.clone();
        let desc = desc.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = client.stream_blob(&reference, &desc, &tx).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        BlobReader {
            rx,
            current: Bytes::new(),
            done: false,
            task,
        }
    }

    async fn stream_blob(
        &self,
        reference: &Reference,
        desc: &LayerDesc,
        tx: &mpsc::Sender<Result<Bytes, RegistryError>>,
    ) -> Result<(), RegistryError> {
        // The layer is named by the levels above; errors from here say only
        // what went wrong with the download.
        let mut retry = Retry::new(self.policy(), &format!("registry {}", reference.registry))
            .labelled(&format!("{} layer {}", reference.name(), desc.digest));
        let mut hasher = Digest::hasher();
        let mut received: u64 = 0;
        // Bytes received when the deadline last moved.
        let mut mark: u64 = 0;
        let sources = self.blob_sources(reference, desc).await?;
        let mut source = 0;
        loop {
            let opened = self
                .open_blob(reference, desc, &sources[source], received, &mut retry)
                .await;
            let resp = match opened {
                Ok(r) => r,
                Err(e) if source + 1 < sources.len() && received == 0 => {
                    tracing::info!("layer {}: {e}; trying the next source", desc.digest);
                    source += 1;
                    retry.next_request();
                    continue;
                }
                Err(e) => return Err(self.foreign_hint(desc, e)),
            };
            let registry = match &sources[source] {
                BlobSource::Endpoint(ep) => ep.label(),
                BlobSource::Url(u) => u.host_str().unwrap_or("layer url").to_string(),
            };
            // A server that ignores Range answers 200 with the whole blob; one
            // that honours it says where its part starts.
            let mut skip = if resp.status().as_u16() == 206 {
                match range_start(resp.headers()) {
                    Some(start) if start <= received => received - start,
                    start => {
                        let e = RegistryError::Unreachable {
                            registry,
                            detail: format!(
                                "asked to resume at byte {received}, the server sent {}",
                                start.map_or("no Content-Range".into(), |s| format!(
                                    "bytes from {s}"
                                ))
                            ),
                        };
                        retry.again(e, None).await?;
                        continue;
                    }
                }
            } else {
                received
            };
            let mut stream = resp.bytes_stream();
            let broke = loop {
                // The deadline moves with every new byte: a slow download
                // that progresses goes on, one that stalls does not.
                let next = tokio::time::timeout(retry.remaining(), stream.next())
                    .await
                    .map_err(|_| {
                        if received > mark {
                            retry.too_slow(received - mark)
                        } else {
                            retry.timed_out()
                        }
                    })?;
                let mut chunk = match next {
                    None if desc.size > 0 && received < desc.size => {
                        break Some(RegistryError::Unreachable {
                            registry,
                            detail: format!(
                                "the body ended after {received} of {} bytes",
                                desc.size
                            ),
                        });
                    }
                    None => break None,
                    Some(Ok(c)) => c,
                    Some(Err(e)) => break Some(from_transport(&registry, &e)),
                };
                if skip > 0 {
                    let drop = skip.min(chunk.len() as u64) as usize;
                    let _ = chunk.split_to(drop);
                    skip -= drop as u64;
                    if chunk.is_empty() {
                        continue;
                    }
                }
                received += chunk.len() as u64;
                if desc.size > 0 && received > desc.size {
                    return Err(RegistryError::Invalid {
                        what: "download".into(),
                        kind: "blob",
                        detail: format!(
                            "longer than the {} bytes its descriptor states",
                            desc.size
                        ),
                    });
                }
                hasher.update(&chunk);
                if tx.send(Ok(chunk)).await.is_err() {
                    return Ok(());
                }
                // After the send: time spent waiting for a slow consumer is
                // not the server's silence.
                retry.received_some();
                if received - mark >= MIN_PROGRESS {
                    retry.progressed();
                    mark = received;
                }
            };
            match broke {
                None => break,
                // Resumed from the last byte received, with a Range request.
                Some(e) => retry.again(e, None).await?,
            }
        }
        let actual = Digest::from_hasher(hasher);
        if actual != desc.digest {
            return Err(RegistryError::Digest {
                what: "download".into(),
                expected: desc.digest.to_string(),
                actual: actual.to_string(),
            });
        }
        Ok(())
    }

    /// A layer the registry does not serve, whose descriptor names foreign
    /// URLs that were not tried, says how to get it.
    pub(super) fn foreign_hint(&self, desc: &LayerDesc, e: RegistryError) -> RegistryError {
        if desc.urls.is_empty() || e.is_transient() {
            return e;
        }
        let url = escape_text(&desc.urls[0]);
        let hint = if !self.foreign_urls() {
            format!(
                "the layer is foreign (its descriptor lists URLs such as {url}): pass --allow-foreign-layers to fetch it from there"
            )
        } else if !desc.urls.iter().any(|u| usable_foreign_url(u).is_ok()) {
            format!(
                "the layer's foreign URLs (such as {url}) were not fetched: only https, or http on loopback, is allowed"
            )
        } else {
            return e;
        };
        RegistryError::ForeignLayer {
            error: Box::new(e),
            hint,
        }
    }

    /// Foreign layers come from their `urls` first when allowed; then
    /// mirrors, then the registry.
    pub(super) async fn blob_sources(
        &self,
        reference: &Reference,
        desc: &LayerDesc,
    ) -> Result<Vec<BlobSource>, RegistryError> {
        let mut out = Vec::new();
        if self.foreign_urls() {
            for u in &desc.urls {
                match usable_foreign_url(u) {
                    Ok(url) => out.push(BlobSource::Url(url)),
                    Err(e) => tracing::warn!("layer {}: {e}", desc.digest),
                }
            }
        } else if !desc.urls.is_empty() {
            tracing::info!(
                "layer {} lists foreign URLs; fetching it from the registry (--allow-foreign-layers uses them)",
                desc.digest
            );
        }
        for ep in self.endpoints(reference).await? {
            out.push(BlobSource::Endpoint(ep));
        }
        Ok(out)
    }

    async fn open_blob(
        &self,
        reference: &Reference,
        desc: &LayerDesc,
        source: &BlobSource,
        offset: u64,
        retry: &mut Retry,
    ) -> Result<reqwest::Response, RegistryError> {
        let mut headers = HeaderMap::new();
        if offset > 0 {
            headers.insert(
                header::RANGE,
                HeaderValue::from_str(&format!("bytes={offset}-")).expect("ascii"),
            );
        }
        let what = match source {
            BlobSource::Url(url) => format!("download from {}", url.host_str().unwrap_or("?")),
            BlobSource::Endpoint(ep) => format!("download from {}", ep.label()),
        };
        let resp = match source {
            // Never the registry's credentials: plain_get sends none.
            BlobSource::Url(url) => self.plain_get(url.clone(), headers).await?,
            BlobSource::Endpoint(ep) => {
                let t = Target {
                    endpoint: ep,
                    repository: &reference.repository,
                    what: what.clone(),
                };
                let path = format!("/v2/{}/blobs/{}", reference.repository, desc.digest);
                self.request(&t, Method::GET, &path, headers, retry).await?
            }
        };
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            let body = error_body(resp).await;
            return Err(from_response(&reference.registry, status, &body, &what));
        }
        Ok(resp)
    }
}

/// The first byte of a 206 answer, from `Content-Range: bytes START-END/TOTAL`.
fn range_start(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_RANGE)?
        .to_str()
        .ok()?
        .trim()
        .strip_prefix("bytes ")?
        .split('-')
        .next()?
        .trim()
        .parse()
        .ok()
}

/// A foreign URL rimg will fetch: https, or plain http to loopback.
fn usable_foreign_url(u: &str) -> Result<url::Url, RegistryError> {
    let url = url::Url::parse(u)
        .map_err(|e| RegistryError::Config(format!("foreign layer URL {}: {e}", escape_text(u))))?;
    check_foreign_url(&url)?;
    Ok(url)
}

pub(crate) enum BlobSource {
    Url(url::Url),
    Endpoint(super::client::Endpoint),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_of_a_partial_answer_is_read_from_content_range() {
        let mut h = HeaderMap::new();
        assert_eq!(range_start(&h), None);
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_static("bytes 500-999/1000"),
        );
        assert_eq!(range_start(&h), Some(500));
        h.insert(header::CONTENT_RANGE, HeaderValue::from_static("garbage"));
        assert_eq!(range_start(&h), None);
    }
}
