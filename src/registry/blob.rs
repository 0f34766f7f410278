//! Layer blob downloads: streamed, hashed as they stream, resumed with a Range
//! request when a connection breaks, and handed to synchronous readers
//! (decompressors) through a bounded channel so network and inflate overlap.

use std::io::{self, Read};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::Method;
use reqwest::header::{self, HeaderMap, HeaderValue};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::client::{Client, Target};
use super::error::{RegistryError, from_response, from_transport};
use super::types::LayerDesc;
use crate::reference::Reference;

/// Chunks in flight between the download task and the reader.
const CHANNEL_DEPTH: usize = 64;
/// How often one download may resume after a broken connection.
const MAX_RESUMES: u32 = 5;

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
        let what = format!("{} layer {}", reference.name(), desc.digest);
        let mut hasher = Sha256::new();
        let mut received: u64 = 0;
        let mut resumes = 0;
        let mut sources = self.blob_sources(reference, desc).await?;
        let mut source = 0;
        'attempt: loop {
            let resp = match self
                .open_blob(reference, desc, &sources[source], received, &what)
                .await
            {
                Ok(r) => r,
                Err(e) if source + 1 < sources.len() && received == 0 => {
                    tracing::info!("{what}: {e}; trying the next source");
                    source += 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            // A server that ignores Range answers 200 with the whole blob.
            let mut skip = if resp.status().as_u16() == 206 {
                0
            } else {
                received
            };
            let mut stream = resp.bytes_stream();
            while let Some(chunk) = stream.next().await {
                let mut chunk = match chunk {
                    Ok(c) => c,
                    Err(e) if resumes < MAX_RESUMES => {
                        resumes += 1;
                        tracing::warn!(
                            "{what}: download broke after {received} bytes ({e}); resuming"
                        );
                        tokio::time::sleep(std::time::Duration::from_millis(200 * resumes as u64))
                            .await;
                        continue 'attempt;
                    }
                    Err(e) => return Err(from_transport(&reference.registry, &e)),
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
                        what,
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
            }
            break;
        }
        sources.clear();
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != desc.digest {
            return Err(RegistryError::Digest {
                what,
                expected: desc.digest.clone(),
                actual,
            });
        }
        Ok(())
    }

    /// Foreign layers come from their `urls` first; then mirrors, then the registry.
    async fn blob_sources(
        &self,
        reference: &Reference,
        desc: &LayerDesc,
    ) -> Result<Vec<BlobSource>, RegistryError> {
        let mut out: Vec<BlobSource> = desc
            .urls
            .iter()
            .filter_map(|u| url::Url::parse(u).ok())
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .map(BlobSource::Url)
            .collect();
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
        what: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        let mut headers = HeaderMap::new();
        if offset > 0 {
            headers.insert(
                header::RANGE,
                HeaderValue::from_str(&format!("bytes={offset}-")).expect("ascii"),
            );
        }
        let resp = match source {
            BlobSource::Url(url) => self
                .plain_get(url.clone(), headers)
                .await
                .map_err(|e| from_transport(url.host_str().unwrap_or("layer url"), &e))?,
            BlobSource::Endpoint(ep) => {
                let t = Target {
                    endpoint: ep,
                    repository: &reference.repository,
                    what: what.to_string(),
                };
                let path = format!("/v2/{}/blobs/{}", reference.repository, desc.digest);
                self.request(&t, Method::GET, &path, headers).await?
            }
        };
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            let body = resp.bytes().await.unwrap_or_default();
            return Err(from_response(&reference.registry, status, &body, what));
        }
        Ok(resp)
    }
}

pub(crate) enum BlobSource {
    Url(url::Url),
    Endpoint(super::client::Endpoint),
}
