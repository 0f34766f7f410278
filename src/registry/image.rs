//! From a reference to a verified manifest and config: content negotiation,
//! index resolution to one platform, and digest checks.

use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
use reqwest::header::{self, HeaderMap, HeaderValue};
use serde::Serialize;

use super::client::{Client, Endpoint, Target};
use super::error::RegistryError;
use super::platform::{PlatformSpec, describe, platform_string, select};
use super::retry::{CONFIG_MAX, MANIFEST_MAX, Retry};
use super::types::{LayerDesc, MAX_LAYERS};
use crate::digest::Digest;
use crate::reference::Reference;

pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const SCHEMA1: [&str; 3] = [
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/json",
];

/// A reference resolved to one platform's manifest, its config and layers.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    pub reference: Reference,
    /// Digest of the platform manifest (what `@digest` pins).
    pub digest: String,
    /// Digest of the index or manifest list it was chosen from, if any.
    pub index_digest: Option<String>,
    pub media_type: String,
    pub manifest_bytes: Vec<u8>,
    pub manifest: ImageManifest,
    pub config_digest: String,
    pub config_bytes: Vec<u8>,
    pub config: ImageConfiguration,
    pub platform: String,
    pub layers: Vec<LayerDesc>,
}

/// What a resolved image is made of, as bytes: enough to rebuild a
/// [`ResolvedImage`] without the network (a mount server gets it from `rimg mount`).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ImageParts {
    pub reference: String,
    pub index_digest: Option<String>,
    pub media_type: String,
    /// The platform named by the index entry, when chosen from an index.
    pub platform: Option<String>,
    pub manifest: Vec<u8>,
    pub config: Vec<u8>,
}

fn parse_manifest(bytes: &[u8], what: &str) -> Result<ImageManifest, RegistryError> {
    serde_json::from_slice(bytes).map_err(|e| RegistryError::Invalid {
        what: what.to_string(),
        kind: "image manifest",
        detail: e.to_string(),
    })
}

impl ResolvedImage {
    /// Interprets and checks manifest and config bytes: the config must be the
    /// one the manifest names.
    pub fn from_parts(parts: ImageParts) -> Result<ResolvedImage, RegistryError> {
        let reference =
            Reference::parse(&parts.reference).map_err(|e| RegistryError::Config(e.to_string()))?;
        let what = parts.reference.clone();
        let manifest = parse_manifest(&parts.manifest, &what)?;
        let config_digest = manifest.config().digest().to_string();
        let actual = Digest::of_bytes(&parts.config).to_string();
        if actual != config_digest {
            return Err(RegistryError::Digest {
                what: format!("{what} config"),
                expected: config_digest,
                actual,
            });
        }
        let config: ImageConfiguration =
            serde_json::from_slice(&parts.config).map_err(|e| RegistryError::Invalid {
                what: format!("{what} config {config_digest}"),
                kind: "image config",
                detail: e.to_string(),
            })?;
        let count = manifest.layers().len();
        if count > MAX_LAYERS {
            return Err(RegistryError::Invalid {
                what,
                kind: "image manifest",
                detail: format!("{count} layers; rimg refuses images with more than {MAX_LAYERS}"),
            });
        }
        let diff_ids = &config.rootfs().diff_ids();
        if diff_ids.len() != count {
            return Err(RegistryError::Invalid {
                what: format!("{what} config {config_digest}"),
                kind: "image config",
                detail: format!("{} diff_ids for {count} layers", diff_ids.len()),
            });
        }
        let platform = parts.platform.unwrap_or_else(|| {
            platform_string(
                &config.os().to_string(),
                &config.architecture().to_string(),
                config.variant().as_deref(),
            )
        });
        let layers = manifest
            .layers()
            .iter()
            .zip(diff_ids.iter())
            .enumerate()
            .map(|(i, (d, diff_id))| {
                let digest =
                    Digest::parse(d.digest().as_ref()).map_err(|e| RegistryError::Invalid {
                        what: format!("{what} layer {}", i + 1),
                        kind: "layer digest",
                        detail: e.to_string(),
                    })?;
                Ok(LayerDesc {
                    digest,
                    media_type: d.media_type().to_string(),
                    size: d.size(),
                    urls: d.urls().clone().unwrap_or_default(),
                    diff_id: Some(diff_id.clone()),
                    annotations: d
                        .annotations()
                        .iter()
                        .flatten()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                })
            })
            .collect::<Result<_, RegistryError>>()?;
        Ok(ResolvedImage {
            reference,
            digest: Digest::of_bytes(&parts.manifest).to_string(),
            index_digest: parts.index_digest,
            media_type: parts.media_type,
            manifest_bytes: parts.manifest,
            manifest,
            config_digest,
            config_bytes: parts.config,
            config,
            platform,
            layers,
        })
    }

    /// The parts to rebuild this image elsewhere.
    pub fn parts(&self) -> ImageParts {
        ImageParts {
            reference: self.reference.to_string(),
            index_digest: self.index_digest.clone(),
            media_type: self.media_type.clone(),
            platform: Some(self.platform.clone()),
            manifest: self.manifest_bytes.clone(),
            config: self.config_bytes.clone(),
        }
    }
}

/// A manifest as served, before interpretation.
#[derive(Debug, Clone, Serialize)]
pub struct RawManifest {
    pub media_type: String,
    pub digest: String,
    #[serde(skip)]
    pub bytes: Vec<u8>,
}

fn accept_all() -> HeaderValue {
    HeaderValue::from_str(&[OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST].join(", "))
        .expect("static header")
}

/// The media type a manifest declares in its body, for registries that serve a
/// generic Content-Type.
fn declared_media_type(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        #[serde(rename = "schemaVersion")]
        schema_version: Option<u32>,
        manifests: Option<serde_json::Value>,
        layers: Option<serde_json::Value>,
    }
    let p: Probe = serde_json::from_slice(bytes).ok()?;
    if p.schema_version == Some(1) {
        return Some(SCHEMA1[0].to_string());
    }
    p.media_type.or_else(|| {
        if p.manifests.is_some() {
            Some(OCI_INDEX.to_string())
        } else if p.layers.is_some() {
            Some(OCI_MANIFEST.to_string())
        } else {
            None
        }
    })
}

impl Client {
    /// Fetches the manifest `reference` points at, as served, trying mirrors first.
    pub async fn fetch_manifest(
        &self,
        reference: &Reference,
    ) -> Result<RawManifest, RegistryError> {
        let mut retry = Retry::new(self.policy(), &format!("registry {}", reference.registry))
            .labelled(&reference.to_string());
        self.fetch_manifest_with(reference, &mut retry).await
    }

    async fn fetch_manifest_with(
        &self,
        reference: &Reference,
        retry: &mut Retry,
    ) -> Result<RawManifest, RegistryError> {
        let endpoints = self.endpoints(reference).await?;
        let mut last_err = None;
        for ep in &endpoints {
            retry.next_request();
            match self.fetch_manifest_from(ep, reference, retry).await {
                Ok(m) => return Ok(m),
                Err(e) if ep.is_mirror => {
                    tracing::info!(
                        "mirror {} failed for {reference}: {e}; trying the next",
                        ep.base
                    );
                    last_err = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_err.expect("at least one endpoint"))
    }

    async fn fetch_manifest_from(
        &self,
        ep: &Endpoint,
        reference: &Reference,
        retry: &mut Retry,
    ) -> Result<RawManifest, RegistryError> {
        let what = reference.to_string();
        let t = Target {
            endpoint: ep,
            repository: &reference.repository,
            what: what.clone(),
        };
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, accept_all());
        let path = format!(
            "/v2/{}/manifests/{}",
            reference.repository,
            reference.target()
        );
        let url = ep
            .base
            .join(&path)
            .map_err(|e| RegistryError::Config(format!("bad request path {path:?}: {e}")))?;
        // The digest is checked inside the retry loop: a body damaged on the
        // way is fetched again.
        let check = |got: &HeaderMap, body: &[u8]| {
            let digest = Digest::of_bytes(body).to_string();
            let header_digest = got
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .filter(|d| d.starts_with("sha256:"))
                .map(str::to_string);
            match reference.digest.clone().or(header_digest) {
                Some(expected) if expected != digest => Err(RegistryError::Digest {
                    what: format!("manifest of {what}"),
                    expected,
                    actual: digest,
                }),
                _ => Ok(()),
            }
        };
        let (got, body) = self
            .get_small(&t, url, headers, ("manifest", MANIFEST_MAX), retry, check)
            .await?;
        let content_type = got
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_string());
        let digest = Digest::of_bytes(&body).to_string();
        let declared = declared_media_type(&body);
        let media_type = match content_type.as_deref() {
            Some(ct) if ct != "application/json" && ct != "text/plain" => ct.to_string(),
            _ => declared.clone().unwrap_or_default(),
        };
        if SCHEMA1.contains(&media_type.as_str()) || declared.as_deref() == Some(SCHEMA1[0]) {
            return Err(RegistryError::Schema1 { reference: what });
        }
        Ok(RawManifest {
            media_type,
            digest,
            bytes: body.to_vec(),
        })
    }

    /// Resolves `reference` to one platform's image manifest and its config.
    pub async fn resolve(
        &self,
        reference: &Reference,
        platform: Option<&PlatformSpec>,
    ) -> Result<ResolvedImage, RegistryError> {
        let what = reference.to_string();
        let want = platform.cloned().unwrap_or_else(PlatformSpec::host);
        // One deadline for the whole resolution; attempts are counted per request.
        let mut retry =
            Retry::new(self.policy(), &format!("registry {}", reference.registry)).labelled(&what);
        let mut raw = self.fetch_manifest_with(reference, &mut retry).await?;
        let mut index_digest = None;
        let mut platform_name = None;
        if matches!(raw.media_type.as_str(), OCI_INDEX | DOCKER_LIST) {
            let index: ImageIndex =
                serde_json::from_slice(&raw.bytes).map_err(|e| RegistryError::Invalid {
                    what: what.clone(),
                    kind: "image index",
                    detail: e.to_string(),
                })?;
            let chosen = select(&index, &want).map_err(|available| RegistryError::NoPlatform {
                reference: what.clone(),
                wanted: want.to_string(),
                available,
            })?;
            platform_name = describe(chosen);
            let child = reference.with_digest(chosen.digest().as_ref());
            index_digest = Some(raw.digest.clone());
            raw = self.fetch_manifest_with(&child, &mut retry).await?;
            if matches!(raw.media_type.as_str(), OCI_INDEX | DOCKER_LIST) {
                return Err(RegistryError::Invalid {
                    what,
                    kind: "image index",
                    detail: "an index entry points at another index".into(),
                });
            }
        }
        if !matches!(raw.media_type.as_str(), OCI_MANIFEST | DOCKER_MANIFEST) {
            return Err(RegistryError::MediaType {
                reference: what,
                media_type: raw.media_type,
            });
        }
        let manifest: ImageManifest = parse_manifest(&raw.bytes, &what)?;
        let config_digest = manifest.config().digest().to_string();
        let config_bytes = self
            .fetch_small_blob(reference, &config_digest, CONFIG_MAX, &mut retry)
            .await?;
        let image = ResolvedImage::from_parts(ImageParts {
            reference: reference.to_string(),
            index_digest,
            media_type: raw.media_type,
            platform: platform_name,
            manifest: raw.bytes,
            config: config_bytes,
        })?;
        // An explicit --platform on a single-platform image must match it, as docker checks.
        let config = &image.config;
        if let (Some(asked), None) = (platform, &image.index_digest)
            && !asked.matches(
                &config.os().to_string(),
                &config.architecture().to_string(),
                config.variant().as_deref(),
            )
        {
            return Err(RegistryError::NoPlatform {
                reference: what,
                wanted: asked.to_string(),
                available: image.platform,
            });
        }
        Ok(image)
    }

    /// A whole small blob (a signature payload, an artifact's content) in
    /// memory, verified against its digest; refused past `max` bytes.
    pub async fn fetch_blob_bytes(
        &self,
        reference: &Reference,
        digest: &str,
        max: usize,
    ) -> Result<Vec<u8>, RegistryError> {
        let mut retry = Retry::new(self.policy(), &format!("registry {}", reference.registry))
            .labelled(&format!("{}@{digest}", reference.name()));
        self.fetch_small_blob(reference, digest, max, &mut retry)
            .await
    }

    /// A whole blob in memory (configs), verified against its digest.
    pub(crate) async fn fetch_small_blob(
        &self,
        reference: &Reference,
        digest: &str,
        max: usize,
        retry: &mut Retry,
    ) -> Result<Vec<u8>, RegistryError> {
        let what = format!("{} blob {digest}", reference.name());
        let endpoints = self.endpoints(reference).await?;
        let mut last_err = None;
        for ep in &endpoints {
            retry.next_request();
            let t = Target {
                endpoint: ep,
                repository: &reference.repository,
                what: what.clone(),
            };
            let url = ep
                .base
                .join(&format!("/v2/{}/blobs/{digest}", reference.repository))
                .map_err(|e| RegistryError::Config(e.to_string()))?;
            let check = |_: &HeaderMap, body: &[u8]| {
                let actual = Digest::of_bytes(body).to_string();
                if actual != digest {
                    return Err(RegistryError::Digest {
                        what: what.clone(),
                        expected: digest.to_string(),
                        actual,
                    });
                }
                Ok(())
            };
            match self
                .get_small(&t, url, HeaderMap::new(), ("blob", max), retry, check)
                .await
            {
                Ok((_, body)) => return Ok(body.to_vec()),
                Err(e) if ep.is_mirror => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.expect("at least one endpoint"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_type_is_read_from_the_body_when_the_header_is_generic() {
        assert_eq!(
            declared_media_type(br#"{"schemaVersion":2,"manifests":[]}"#).as_deref(),
            Some(OCI_INDEX)
        );
        assert_eq!(
            declared_media_type(br#"{"schemaVersion":2,"config":{},"layers":[]}"#).as_deref(),
            Some(OCI_MANIFEST)
        );
        assert_eq!(
            declared_media_type(br#"{"schemaVersion":1,"fsLayers":[]}"#).as_deref(),
            Some(SCHEMA1[0])
        );
    }

    #[test]
    fn layer_annotations_reach_the_layer_descriptions() {
        let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:1111111111111111111111111111111111111111111111111111111111111111"]}}"#;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": Digest::of_bytes(config).to_string(), "size": config.len()},
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": "sha256:2222222222222222222222222222222222222222222222222222222222222222",
                "size": 10,
                "annotations": {"org.example.toc": "sha256:33", "b": "c"},
            }],
        });
        let image = ResolvedImage::from_parts(ImageParts {
            reference: "127.0.0.1:5000/a:b".into(),
            index_digest: None,
            media_type: OCI_MANIFEST.into(),
            platform: None,
            manifest: serde_json::to_vec(&manifest).unwrap(),
            config: config.to_vec(),
        })
        .unwrap();
        let got = &image.layers[0].annotations;
        assert_eq!(got.len(), 2);
        assert_eq!(got["org.example.toc"], "sha256:33");
    }

    #[test]
    fn digest_of_bytes_is_sha256_prefixed() {
        assert_eq!(
            Digest::of_bytes(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    /// JSON documents shaped like manifests, indexes and configs, with
    /// arbitrary values where the real ones have strings, numbers or lists.
    fn json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(|f| serde_json::json!(f)),
            ".{0,20}".prop_map(serde_json::Value::from),
            Just(serde_json::Value::from(OCI_MANIFEST)),
            Just(serde_json::Value::from(
                "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
            )),
        ];
        let keys = prop_oneof![
            Just("schemaVersion".to_string()),
            Just("mediaType".to_string()),
            Just("config".to_string()),
            Just("layers".to_string()),
            Just("manifests".to_string()),
            Just("digest".to_string()),
            Just("size".to_string()),
            Just("urls".to_string()),
            Just("platform".to_string()),
            Just("architecture".to_string()),
            Just("os".to_string()),
            Just("rootfs".to_string()),
            Just("diff_ids".to_string()),
            "[a-z]{1,8}",
        ];
        leaf.prop_recursive(4, 64, 8, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::from),
                proptest::collection::btree_map(keys.clone(), inner, 0..8)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_manifest_and_config_parsers(
            manifest in proptest::collection::vec(any::<u8>(), 0..400),
            config in proptest::collection::vec(any::<u8>(), 0..400),
        ) {
            let _ = declared_media_type(&manifest);
            let _ = serde_json::from_slice::<ImageIndex>(&manifest);
            let _ = ResolvedImage::from_parts(ImageParts {
                reference: "r.example/a:b".into(),
                index_digest: None,
                media_type: OCI_MANIFEST.into(),
                platform: None,
                manifest,
                config,
            });
        }

        #[test]
        fn manifest_shaped_json_never_panics_the_parsers(m in json(), c in json()) {
            let manifest = serde_json::to_vec(&m).unwrap();
            let config = serde_json::to_vec(&c).unwrap();
            let _ = declared_media_type(&manifest);
            if let Ok(index) = serde_json::from_slice::<ImageIndex>(&manifest) {
                let _ = select(&index, &PlatformSpec::host());
            }
            let _ = ResolvedImage::from_parts(ImageParts {
                reference: "r.example/a:b".into(),
                index_digest: None,
                media_type: OCI_MANIFEST.into(),
                platform: None,
                manifest,
                config,
            });
        }
    }
}
