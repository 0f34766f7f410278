//! Artifacts that refer to a manifest (signatures, SBOMs, tables of
//! contents): listed with the distribution spec's referrers API, or, on
//! registries without it (distribution 2.8), from the fallback tag
//! `<alg>-<hex>` holding an OCI image index; and pushed as OCI image manifests
//! with a `subject`, keeping the fallback tag up to date when the registry
//! does not index the subject itself.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use oci_spec::image::{Descriptor, ImageIndex, MediaType};
use reqwest::header::{self, HeaderMap, HeaderValue};
use serde_json::json;

use super::client::{Client, Endpoint, Target, next_link};
use super::error::RegistryError;
use super::image::{OCI_INDEX, OCI_MANIFEST};
use super::retry::{MANIFEST_MAX, Retry, escape_text};
use crate::reference::{Reference, validate_digest};

/// The empty descriptor's media type and content (image-spec, "Guidelines
/// for Artifact Usage"): the config of an artifact without one, and its only
/// layer when it has no blobs.
pub const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
const EMPTY_CONTENT: &[u8] = b"{}";
/// Pages of a referrers listing followed at most.
const MAX_REFERRER_PAGES: usize = 100;
/// The referrers tag schema keeps this much of a digest's algorithm...
const TAG_ALGORITHM_MAX: usize = 32;
/// ...and of its encoded part.
const TAG_ENCODED_MAX: usize = 64;

/// One blob of an artifact: its media type, bytes and descriptor annotations.
#[derive(Debug, Clone)]
pub struct ArtifactBlob {
    pub media_type: String,
    pub bytes: Bytes,
    pub annotations: BTreeMap<String, String>,
}

/// An artifact to push as a referrer of another manifest.
#[derive(Debug, Clone, Default)]
pub struct Artifact {
    /// The manifest's `artifactType` (e.g. `application/vnd.rimg.toc.v1+json`).
    pub artifact_type: String,
    /// A real config; `None` uses the empty config `{}`.
    pub config: Option<ArtifactBlob>,
    /// The blobs; none gives one empty layer, as the image-spec advises.
    pub layers: Vec<ArtifactBlob>,
    /// The manifest's annotations (copied to its entry in the fallback index).
    pub annotations: BTreeMap<String, String>,
}

/// The fallback tag for `digest` (the distribution spec's referrers tag
/// schema): the algorithm cut to 32 characters, `-`, the encoded part cut to
/// 64, characters a tag cannot hold replaced by `-`. `sha256:<hex>` becomes
/// `sha256-<hex>`.
pub fn referrers_tag(digest: &str) -> Result<String, RegistryError> {
    validate_digest(digest).map_err(RegistryError::Config)?;
    let (algorithm, encoded) = digest.split_once(':').expect("validated digest");
    let tag_char = |c: char| {
        if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
            c
        } else {
            '-'
        }
    };
    Ok(algorithm
        .chars()
        .take(TAG_ALGORITHM_MAX)
        .map(tag_char)
        .chain(std::iter::once('-'))
        .chain(encoded.chars().take(TAG_ENCODED_MAX).map(tag_char))
        .collect())
}

fn media(s: &str) -> MediaType {
    MediaType::from(s)
}

fn invalid(what: &str, kind: &'static str, detail: String) -> RegistryError {
    RegistryError::Invalid {
        what: what.to_string(),
        kind,
        detail,
    }
}

fn parse_index(body: &[u8], what: &str) -> Result<ImageIndex, RegistryError> {
    serde_json::from_slice(body).map_err(|e| invalid(what, "referrers index", e.to_string()))
}

fn keep(d: &Descriptor, artifact_type: Option<&str>) -> bool {
    artifact_type.is_none_or(|want| {
        d.artifact_type().as_ref().map(|t| t.to_string()).as_deref() == Some(want)
    })
}

impl Client {
    /// The manifests that refer to `subject_digest` in `reference`'s
    /// repository, optionally only those of `artifact_type`. Uses
    /// `GET /v2/<name>/referrers/<digest>` (following `Link` pages); a
    /// registry without that API (404) is read through the fallback tag
    /// `sha256-<hex>`, and no such tag means no referrers.
    pub async fn referrers(
        &self,
        reference: &Reference,
        subject_digest: &str,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Descriptor>, RegistryError> {
        validate_digest(subject_digest).map_err(RegistryError::Config)?;
        let ep = self.origin_endpoint(reference).await?;
        let what = format!("referrers of {}@{subject_digest}", reference.name());
        let t = Target {
            endpoint: &ep,
            repository: &reference.repository,
            what: what.clone(),
        };
        let mut url = ep
            .base
            .join(&format!(
                "/v2/{}/referrers/{subject_digest}",
                reference.repository
            ))
            .map_err(|e| RegistryError::Config(e.to_string()))?;
        if let Some(at) = artifact_type {
            url.query_pairs_mut().append_pair("artifactType", at);
        }
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static(OCI_INDEX));
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        loop {
            if !seen.insert(url.to_string()) || seen.len() > MAX_REFERRER_PAGES {
                return Err(invalid(
                    &what,
                    "referrers listing",
                    format!("its Link headers loop or run past {MAX_REFERRER_PAGES} pages"),
                ));
            }
            let mut retry =
                Retry::new(self.policy(), &format!("registry {}", ep.label())).labelled(&what);
            let page = self
                .get_small(
                    &t,
                    url.clone(),
                    headers.clone(),
                    ("referrers index", MANIFEST_MAX),
                    &mut retry,
                    |_, _| Ok(()),
                )
                .await;
            let (got, body) = match page {
                Ok(p) => p,
                // No referrers API: the first page says so with a 404.
                Err(RegistryError::Api { status: 404, .. })
                    if out.is_empty() && seen.len() == 1 =>
                {
                    return self
                        .fallback_referrers(&ep, reference, subject_digest, artifact_type)
                        .await;
                }
                Err(e) => return Err(e),
            };
            let index = parse_index(&body, &what)?;
            // Filtered here too: a registry may ignore `artifactType`
            // (it says so by omitting `OCI-Filters-Applied`).
            out.extend(
                index
                    .manifests()
                    .iter()
                    .filter(|d| keep(d, artifact_type))
                    .cloned(),
            );
            let link = got
                .get(header::LINK)
                .and_then(|l| l.to_str().ok())
                .and_then(next_link);
            match link {
                None => return Ok(out),
                Some(next) => {
                    url = url
                        .join(&next)
                        .map_err(|e| invalid(&what, "Link header", e.to_string()))?;
                    if url.origin() != ep.base.origin() {
                        return Err(invalid(
                            &what,
                            "Link header",
                            format!("it points to another host ({})", escape_text(url.as_str())),
                        ));
                    }
                }
            }
        }
    }

    async fn fallback_referrers(
        &self,
        ep: &Endpoint,
        reference: &Reference,
        subject_digest: &str,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Descriptor>, RegistryError> {
        let tag = referrers_tag(subject_digest)?;
        let index = self.fallback_index(ep, reference, &tag).await?;
        Ok(index
            .map(|i| {
                i.manifests()
                    .iter()
                    .filter(|d| keep(d, artifact_type))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The index under the fallback tag, if there is one. Something else
    /// under that tag counts as no referrers, as the spec says.
    async fn fallback_index(
        &self,
        ep: &Endpoint,
        reference: &Reference,
        tag: &str,
    ) -> Result<Option<ImageIndex>, RegistryError> {
        let what = format!("{}:{tag}", reference.name());
        let t = Target {
            endpoint: ep,
            repository: &reference.repository,
            what: what.clone(),
        };
        let url = ep
            .base
            .join(&format!("/v2/{}/manifests/{tag}", reference.repository))
            .map_err(|e| RegistryError::Config(e.to_string()))?;
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static(OCI_INDEX));
        let mut retry =
            Retry::new(self.policy(), &format!("registry {}", ep.label())).labelled(&what);
        let check = |got: &HeaderMap, body: &[u8]| match got
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
        {
            Some(d) if d.starts_with("sha256:") && crate::digest::Digest::of_bytes(body) != d => {
                Err(RegistryError::Digest {
                    what: what.clone(),
                    expected: escape_text(d),
                    actual: crate::digest::Digest::of_bytes(body).to_string(),
                })
            }
            _ => Ok(()),
        };
        match self
            .get_small(
                &t,
                url,
                headers,
                ("referrers index", MANIFEST_MAX),
                &mut retry,
                check,
            )
            .await
        {
            Ok((_, body)) => match parse_index(&body, &what) {
                Ok(index) => Ok(Some(index)),
                Err(e) => {
                    tracing::warn!("{e}; taken as no referrers");
                    Ok(None)
                }
            },
            Err(RegistryError::Api { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Pushes `artifact` as an OCI image manifest whose `subject` is
    /// `subject` (a manifest of `reference`'s repository) and returns the new
    /// manifest's digest. Its blobs are pushed first (the empty config `{}`
    /// when it has none). When the registry does not answer with
    /// `OCI-Subject` (it has no referrers API), the fallback tag's index is
    /// read, given the new manifest's descriptor (with `artifactType` and
    /// annotations) and put back. Two clients doing this at once can lose one
    /// entry: the fallback scheme has no locking.
    pub async fn push_referrer(
        &self,
        reference: &Reference,
        subject: &Descriptor,
        artifact: &Artifact,
    ) -> Result<String, RegistryError> {
        let subject_digest = subject.digest().to_string();
        let tag = referrers_tag(&subject_digest)?;
        let what = format!("artifact for {}@{subject_digest}", reference.name());
        if artifact.artifact_type.is_empty() {
            return Err(RegistryError::Config(format!(
                "{what}: an artifact needs an artifactType"
            )));
        }
        let empty = ArtifactBlob {
            media_type: EMPTY_MEDIA_TYPE.into(),
            bytes: Bytes::from_static(EMPTY_CONTENT),
            annotations: BTreeMap::new(),
        };
        let config = artifact.config.clone().unwrap_or_else(|| empty.clone());
        let layers = if artifact.layers.is_empty() {
            vec![empty]
        } else {
            artifact.layers.clone()
        };
        let mut pushed = std::collections::HashSet::new();
        for b in std::iter::once(&config).chain(&layers) {
            if pushed.insert(crate::digest::Digest::of_bytes(&b.bytes).to_string()) {
                self.push_blob(reference, b.bytes.clone()).await?;
            }
        }
        let config_desc = blob_descriptor(&config);
        let layer_descs: Vec<_> = layers.iter().map(blob_descriptor).collect();
        let subject_json = json!({
            "mediaType": subject.media_type().to_string(),
            "digest": subject_digest,
            "size": subject.size(),
        });
        let mut manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact.artifact_type,
            "config": config_desc,
            "layers": layer_descs,
            "subject": subject_json,
        });
        if !artifact.annotations.is_empty() {
            manifest["annotations"] = json!(artifact.annotations);
        }
        let bytes = Bytes::from(
            serde_json::to_vec(&manifest).map_err(|e| RegistryError::Config(e.to_string()))?,
        );
        let size = bytes.len() as u64;
        let digest = crate::digest::Digest::of_bytes(&bytes).to_string();
        let put = self
            .put_manifest(reference, &digest, OCI_MANIFEST, bytes)
            .await?;
        if put.subject_indexed {
            return Ok(put.digest);
        }
        // No referrers API: the fallback tag's index gets the new entry.
        let ep = self.origin_endpoint(reference).await?;
        let mut entry = Descriptor::new(media(OCI_MANIFEST), size, digest_of(&digest)?);
        entry.set_artifact_type(Some(media(&artifact.artifact_type)));
        if !artifact.annotations.is_empty() {
            entry.set_annotations(Some(
                artifact
                    .annotations
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<HashMap<_, _>>(),
            ));
        }
        let mut manifests = match self.fallback_index(&ep, reference, &tag).await? {
            Some(index) => index.manifests().clone(),
            None => Vec::new(),
        };
        if manifests.iter().any(|d| d.digest().to_string() == digest) {
            return Ok(put.digest);
        }
        manifests.push(entry);
        let index = json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": manifests,
        });
        let index = Bytes::from(
            serde_json::to_vec(&index).map_err(|e| RegistryError::Config(e.to_string()))?,
        );
        self.put_manifest(reference, &tag, OCI_INDEX, index).await?;
        Ok(put.digest)
    }
}

fn blob_descriptor(b: &ArtifactBlob) -> serde_json::Value {
    let mut d = json!({
        "mediaType": b.media_type,
        "digest": crate::digest::Digest::of_bytes(&b.bytes).to_string(),
        "size": b.bytes.len(),
    });
    if !b.annotations.is_empty() {
        d["annotations"] = json!(b.annotations);
    }
    d
}

fn digest_of(d: &str) -> Result<oci_spec::image::Digest, RegistryError> {
    d.parse()
        .map_err(|e| RegistryError::Config(format!("digest {d}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fallback_tag_replaces_the_colon_of_the_digest() {
        let hex = "a".repeat(64);
        assert_eq!(
            referrers_tag(&format!("sha256:{hex}")).unwrap(),
            format!("sha256-{hex}")
        );
        let long = "b".repeat(128);
        let tag = referrers_tag(&format!("sha512:{long}")).unwrap();
        assert_eq!(tag, format!("sha512-{}", "b".repeat(64)));
        assert!(referrers_tag("sha256:xyz").is_err());
    }

    #[test]
    fn the_artifact_type_filter_keeps_only_matching_descriptors() {
        let mut d = Descriptor::new(
            media(OCI_MANIFEST),
            1,
            digest_of(crate::digest::Digest::of_bytes(b"").as_ref()).unwrap(),
        );
        assert!(keep(&d, None));
        assert!(!keep(&d, Some("application/x.a")));
        d.set_artifact_type(Some(media("application/x.a")));
        assert!(keep(&d, Some("application/x.a")));
        assert!(!keep(&d, Some("application/x.b")));
    }

    #[test]
    fn the_empty_descriptor_content_has_its_well_known_digest() {
        assert_eq!(
            crate::digest::Digest::of_bytes(EMPTY_CONTENT).to_string(),
            "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
    }
}
