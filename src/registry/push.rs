//! Writing to a registry: blobs (checked with HEAD, then uploaded in one
//! monolithic POST + PUT) and manifests, always to the registry itself (never
//! a mirror), with a token scoped `pull,push`.

use bytes::Bytes;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};
use url::Url;

use super::client::{Client, Endpoint, Target};
use super::error::{RegistryError, from_response};
use super::retry::{Retry, error_body, escape_text};
use crate::reference::{Reference, validate_digest};

/// What a manifest PUT answered, beyond success.
pub(crate) struct PushedManifest {
    pub digest: String,
    /// The `OCI-Subject` header: the registry indexed the manifest's
    /// `subject` itself (it has the referrers API).
    pub subject_indexed: bool,
}

impl Client {
    /// The registry itself, never a mirror: pushes and the reads that prepare
    /// them must see the registry's own state.
    pub(crate) async fn origin_endpoint(
        &self,
        reference: &Reference,
    ) -> Result<Endpoint, RegistryError> {
        Ok(self
            .endpoints(reference)
            .await?
            .pop()
            .expect("the registry is always the last endpoint"))
    }

    /// Uploads `bytes` as a blob of `reference`'s repository unless the
    /// registry already has it (HEAD first); returns its `sha256:` digest.
    /// The upload is monolithic: `POST /blobs/uploads/`, then one `PUT
    /// <location>?digest=`.
    pub async fn push_blob(
        &self,
        reference: &Reference,
        bytes: Bytes,
    ) -> Result<String, RegistryError> {
        let digest = crate::digest::Digest::of_bytes(&bytes).to_string();
        let ep = self.origin_endpoint(reference).await?;
        let what = format!("{} blob {digest}", reference.name());
        let t = Target {
            endpoint: &ep,
            repository: &reference.repository,
            what: what.clone(),
        };
        let mut retry =
            Retry::new(self.policy(), &format!("registry {}", ep.label())).labelled(&what);
        let label = ep.label();
        let blob_path = format!("/v2/{}/blobs/{digest}", reference.repository);
        let head = self
            .request(&t, Method::HEAD, &blob_path, HeaderMap::new(), &mut retry)
            .await?;
        match head.status() {
            s if s.is_success() => return Ok(digest),
            StatusCode::NOT_FOUND => {}
            s => {
                // A HEAD answer has no body to explain itself.
                return Err(from_response(&label, s.as_u16(), b"", &what));
            }
        }
        retry.next_request();
        let uploads = join(
            &ep.base,
            &format!("/v2/{}/blobs/uploads/", reference.repository),
        )?;
        let resp = self
            .request_with_body(
                &t,
                Method::POST,
                uploads,
                HeaderMap::new(),
                Some(Bytes::new()),
                &mut retry,
            )
            .await?;
        if resp.status() != StatusCode::ACCEPTED {
            let status = resp.status().as_u16();
            let body = error_body(resp).await;
            return Err(from_response(&label, status, &body, &what));
        }
        let location = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .ok_or_else(|| RegistryError::Invalid {
                what: what.clone(),
                kind: "upload answer",
                detail: "HTTP 202 without a Location header".into(),
            })?;
        let mut put = join(&ep.base, location)?;
        put.query_pairs_mut().append_pair("digest", &digest);
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        retry.next_request();
        // A registry may hand uploads to another server (the location is
        // opaque and carries its own authority): the registry's credentials
        // go only to the registry itself.
        let resp = if put.origin() == ep.base.origin() {
            self.request_with_body(&t, Method::PUT, put, headers, Some(bytes), &mut retry)
                .await?
        } else {
            self.follow(
                &t,
                Method::PUT,
                put,
                (&headers, Some(&bytes)),
                None,
                &mut retry,
            )
            .await?
        };
        if !resp.status().is_success() {
            let status = resp.status().as_u16();
            let body = error_body(resp).await;
            return Err(from_response(&label, status, &body, &what));
        }
        check_digest_header(resp.headers(), &digest, &what)?;
        Ok(digest)
    }

    /// Uploads a manifest of `media_type` to `reference`'s repository under
    /// `tag_or_digest` (a tag, or the manifest's own digest); returns its
    /// digest. The blobs it names must be pushed first.
    pub async fn push_manifest(
        &self,
        reference: &Reference,
        tag_or_digest: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<String, RegistryError> {
        Ok(self
            .put_manifest(reference, tag_or_digest, media_type, bytes)
            .await?
            .digest)
    }

    pub(crate) async fn put_manifest(
        &self,
        reference: &Reference,
        tag_or_digest: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<PushedManifest, RegistryError> {
        let digest = crate::digest::Digest::of_bytes(&bytes).to_string();
        let what = format!("{}:{tag_or_digest}", reference.name());
        let config = |detail: String| RegistryError::Config(format!("pushing {what}: {detail}"));
        if tag_or_digest.contains(':') {
            validate_digest(tag_or_digest).map_err(config)?;
            if tag_or_digest != digest {
                return Err(config(format!(
                    "the manifest's digest is {digest}, not {tag_or_digest}"
                )));
            }
        } else if !super::client::valid_tag(tag_or_digest) {
            return Err(config(format!(
                "{:?} is neither a tag nor a digest",
                escape_text(tag_or_digest)
            )));
        }
        let content_type = HeaderValue::from_str(media_type)
            .map_err(|_| config(format!("media type {media_type:?} is not a header value")))?;
        let ep = self.origin_endpoint(reference).await?;
        let t = Target {
            endpoint: &ep,
            repository: &reference.repository,
            what: what.clone(),
        };
        let mut retry =
            Retry::new(self.policy(), &format!("registry {}", ep.label())).labelled(&what);
        let url = join(
            &ep.base,
            &format!("/v2/{}/manifests/{tag_or_digest}", reference.repository),
        )?;
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, content_type);
        let resp = self
            .request_with_body(&t, Method::PUT, url, headers, Some(bytes), &mut retry)
            .await?;
        if !resp.status().is_success() {
            let status = resp.status().as_u16();
            let body = error_body(resp).await;
            return Err(from_response(&ep.label(), status, &body, &what));
        }
        check_digest_header(resp.headers(), &digest, &what)?;
        let subject_indexed = resp.headers().contains_key("oci-subject");
        Ok(PushedManifest {
            digest,
            subject_indexed,
        })
    }
}

fn join(base: &Url, path: &str) -> Result<Url, RegistryError> {
    base.join(path).map_err(|e| {
        RegistryError::Config(format!("bad request path {:?}: {e}", escape_text(path)))
    })
}

/// A registry that names another digest for what it stored did not store
/// what was sent.
fn check_digest_header(headers: &HeaderMap, digest: &str, what: &str) -> Result<(), RegistryError> {
    match headers
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
    {
        Some(d) if d.starts_with("sha256:") && d != digest => Err(RegistryError::Digest {
            what: what.to_string(),
            expected: digest.to_string(),
            actual: escape_text(d),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registry_naming_another_digest_is_an_error() {
        let d = crate::digest::Digest::of_bytes(b"x").to_string();
        let mut h = HeaderMap::new();
        assert!(check_digest_header(&h, &d, "w").is_ok());
        h.insert("docker-content-digest", HeaderValue::from_str(&d).unwrap());
        assert!(check_digest_header(&h, &d, "w").is_ok());
        h.insert(
            "docker-content-digest",
            HeaderValue::from_static(
                "sha256:0000000000000000000000000000000000000000000000000000000000000000",
            ),
        );
        assert!(matches!(
            check_digest_header(&h, &d, "w"),
            Err(RegistryError::Digest { .. })
        ));
    }
}
