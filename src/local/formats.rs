//! The two layouts read into an image: docker-save (`manifest.json`) and
//! the OCI image layout (`index.json`).

use crate::digest::Digest;
use crate::layer::{self};
use crate::reference::Reference;
use crate::registry::{
    DOCKER_LIST, DOCKER_MANIFEST, ImageParts, OCI_INDEX, OCI_MANIFEST, PlatformSpec, ResolvedImage,
    describe_platform, select_platform,
};
use oci_spec::image::{Descriptor, ImageIndex};
use serde_json::json;
use std::collections::HashMap;
use std::io::Read;

use super::*;

#[derive(serde::Deserialize)]
pub(super) struct DockerEntry {
    #[serde(rename = "Config")]
    pub(super) config: String,
    #[serde(rename = "RepoTags", default)]
    pub(super) repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    pub(super) layers: Vec<String>,
}

/// The digest a blob stored as `blobs/sha256/<hex>` claims by its name.
pub(super) fn digest_from_name(name: &str) -> Option<String> {
    let clean = clean_name(name)?;
    let s = std::str::from_utf8(&clean).ok()?;
    let hex = s.strip_prefix("blobs/sha256/")?;
    (hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
    .then(|| format!("sha256:{hex}"))
}

pub(super) type Resolved = (ResolvedImage, HashMap<String, String>);

/// A `docker save` archive: one image of `manifest.json`, its config, and its
/// layers as a docker v2 manifest describes them.
pub(super) fn docker_archive(
    file: &str,
    store: &Store,
    spec: &Spec,
    platform: Option<&PlatformSpec>,
) -> Result<Resolved, LocalError> {
    let bytes = store.read_small(file, "manifest.json")?;
    let list: Vec<DockerEntry> =
        serde_json::from_slice(&bytes).map_err(|e| invalid(file, "manifest.json", e))?;
    let tags_of = |e: &DockerEntry| e.repo_tags.clone().unwrap_or_default();
    let choices = || {
        list.iter()
            .enumerate()
            .map(|(i, e)| {
                let t = tags_of(e);
                if t.is_empty() {
                    format!("#{i} (untagged, config {})", e.config)
                } else {
                    t.join(", ")
                }
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let (entry, tag) = match &spec.pick {
        Some(pick) => {
            let want = Reference::parse(pick).ok();
            let found = list.iter().find_map(|e| {
                tags_of(e)
                    .into_iter()
                    .find(|t| {
                        t == pick
                            || want
                                .as_ref()
                                .is_some_and(|w| Reference::parse(t).ok().as_ref() == Some(w))
                    })
                    .map(|t| (e, Some(t)))
            });
            found.ok_or_else(|| LocalError::Choice {
                file: file.to_string(),
                detail: format!("no image tagged {pick}; the archive holds: {}", choices()),
            })?
        }
        None => match list.as_slice() {
            [one] => (one, tags_of(one).into_iter().next()),
            [] => return Err(invalid(file, "manifest.json", "lists no image")),
            _ => {
                return Err(LocalError::Choice {
                    file: file.to_string(),
                    detail: format!(
                        "holds {} images; name one as docker-archive:PATH:REPO:TAG ({})",
                        list.len(),
                        choices()
                    ),
                });
            }
        },
    };
    let config = store.read_small(file, &entry.config)?;
    let config_digest = Digest::of_bytes(&config).to_string();
    if let Some(named) = digest_from_name(&entry.config)
        && named != config_digest
    {
        return Err(invalid(
            file,
            &entry.config,
            format!("content hashes to {config_digest}, but its name says {named}"),
        ));
    }
    let diff_ids: Vec<String> = serde_json::from_slice::<serde_json::Value>(&config)
        .ok()
        .and_then(|v| {
            v["rootfs"]["diff_ids"].as_array().map(|a| {
                a.iter()
                    .filter_map(|d| d.as_str().map(str::to_string))
                    .collect()
            })
        })
        .unwrap_or_default();
    if !diff_ids.is_empty() && diff_ids.len() != entry.layers.len() {
        return Err(invalid(
            file,
            "manifest.json",
            format!(
                "names {} layers, but the config {} lists {} diff_ids",
                entry.layers.len(),
                entry.config,
                diff_ids.len()
            ),
        ));
    }
    let mut entries = HashMap::new();
    let mut layers = Vec::new();
    for (i, name) in entry.layers.iter().enumerate() {
        let (mut r, size) = store.open_entry(file, name)?;
        let read_err = |source| LocalError::Entry {
            file: file.to_string(),
            entry: name.clone(),
            source,
        };
        let mut head = Vec::with_capacity(512);
        (&mut r)
            .take(512)
            .read_to_end(&mut head)
            .map_err(read_err)?;
        let compression =
            layer::detect(name, "application/vnd.docker.image.rootfs.diff.tar", &head)
                .map_err(|e| invalid(file, name, layer_detail(e)))?;
        let media_type = match compression {
            layer::Compression::Gzip => "application/vnd.docker.image.rootfs.diff.tar.gzip",
            layer::Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
            layer::Compression::None => "application/vnd.docker.image.rootfs.diff.tar",
        };
        // The blob's digest: named by the entry, or (uncompressed) the diff_id
        // the config gives; either is verified as the layer is read. Otherwise
        // hashed now, since a manifest needs it.
        let digest = match (digest_from_name(name), diff_ids.get(i)) {
            (Some(d), _) => d,
            (None, Some(d)) if compression == layer::Compression::None => d.clone(),
            _ => {
                let mut h = Digest::hasher();
                sha2::Digest::update(&mut h, &head);
                crate::digest::hash_into(&mut r, &mut h).map_err(read_err)?;
                Digest::from_hasher(h).to_string()
            }
        };
        entries.insert(digest.clone(), name.clone());
        layers.push(json!({"mediaType": media_type, "size": size, "digest": digest}));
    }
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "size": config.len(),
            "digest": config_digest,
        },
        "layers": layers,
    }))
    .map_err(|e| invalid(file, "manifest.json", e))?;
    let reference = tag
        .as_deref()
        .and_then(|t| Reference::parse(t).ok())
        .unwrap_or_else(|| fallback_reference(&spec.path, None));
    let image = ResolvedImage::from_parts(ImageParts {
        reference: reference.to_string(),
        index_digest: None,
        media_type: DOCKER_MANIFEST.to_string(),
        platform: None,
        manifest,
        config,
    })
    .map_err(|source| LocalError::Image {
        file: file.to_string(),
        entry: entry.config.clone(),
        source: Box::new(source),
    })?;
    check_platform(file, &image, platform)?;
    Ok((image, entries))
}

/// The entry name of a blob in an OCI layout.
pub(super) fn blob_name(file: &str, digest: &str) -> Result<String, LocalError> {
    match digest.split_once(':') {
        Some((alg, hex))
            if !alg.is_empty()
                && alg.bytes().all(|b| b.is_ascii_alphanumeric())
                && !hex.is_empty()
                && hex.bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            Ok(format!("blobs/{alg}/{hex}"))
        }
        _ => Err(invalid(
            file,
            "index.json",
            format!("bad digest {digest:?}"),
        )),
    }
}

/// A whole small blob, verified against its digest.
pub(super) fn read_blob(file: &str, store: &Store, digest: &str) -> Result<Vec<u8>, LocalError> {
    let name = blob_name(file, digest)?;
    let bytes = store.read_small(file, &name)?;
    let actual = Digest::of_bytes(&bytes).to_string();
    if actual != digest {
        return Err(invalid(
            file,
            &name,
            format!("content hashes to {actual}, expected {digest}"),
        ));
    }
    Ok(bytes)
}

pub(super) const REF_NAME: &str = "org.opencontainers.image.ref.name";
pub(super) const CONTAINERD_NAME: &str = "io.containerd.image.name";

pub(super) fn annotation<'a>(d: &'a Descriptor, key: &str) -> Option<&'a str> {
    d.annotations()
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// An OCI layout: `index.json`, an entry chosen by tag, an index in it
/// resolved to one platform, the manifest and its config.
pub(super) fn oci_layout(
    file: &str,
    store: &Store,
    spec: &Spec,
    platform: Option<&PlatformSpec>,
) -> Result<Resolved, LocalError> {
    let top_bytes = store.read_small(file, "index.json")?;
    let top: ImageIndex =
        serde_json::from_slice(&top_bytes).map_err(|e| invalid(file, "index.json", e))?;
    let tags: Vec<&str> = top
        .manifests()
        .iter()
        .filter_map(|d| annotation(d, REF_NAME))
        .collect();
    let picked: Vec<Descriptor> = match &spec.pick {
        Some(tag) => top
            .manifests()
            .iter()
            .filter(|d| {
                annotation(d, REF_NAME) == Some(tag) || annotation(d, CONTAINERD_NAME) == Some(tag)
            })
            .cloned()
            .collect(),
        None => top.manifests().clone(),
    };
    let want = platform.cloned().unwrap_or_else(PlatformSpec::host);
    let no_platform = |available: String| LocalError::Choice {
        file: file.to_string(),
        detail: format!("no image for platform {want}; it holds: {available}"),
    };
    let chosen: Descriptor = match picked.as_slice() {
        [] => {
            return Err(LocalError::Choice {
                file: file.to_string(),
                detail: match &spec.pick {
                    Some(t) => format!("no image tagged {t}; tags: {}", tags.join(", ")),
                    None => "index.json lists no image".to_string(),
                },
            });
        }
        [one] => one.clone(),
        many if many.iter().all(|d| d.platform().is_some()) => {
            // Entries that differ by platform only: choose as from an index.
            let mut idx = top.clone();
            idx.set_manifests(many.to_vec());
            select_platform(&idx, &want).map_err(no_platform)?.clone()
        }
        many => {
            return Err(LocalError::Choice {
                file: file.to_string(),
                detail: format!(
                    "holds {} images; name one as {}:PATH:TAG (tags: {})",
                    many.len(),
                    spec.kind.prefix(),
                    if tags.is_empty() {
                        "none".to_string()
                    } else {
                        tags.join(", ")
                    }
                ),
            });
        }
    };
    let ref_name = annotation(&chosen, CONTAINERD_NAME)
        .and_then(|n| Reference::parse(n).ok())
        .or_else(|| {
            annotation(&chosen, REF_NAME)
                .filter(|n| n.contains('/'))
                .and_then(|n| Reference::parse(n).ok())
        })
        .unwrap_or_else(|| fallback_reference(&spec.path, annotation(&chosen, REF_NAME)));
    let mut digest = chosen.digest().to_string();
    let mut media_type = chosen.media_type().to_string();
    let mut bytes = read_blob(file, store, &digest)?;
    let mut index_digest = None;
    let mut platform_name = None;
    if matches!(media_type.as_str(), OCI_INDEX | DOCKER_LIST) {
        let entry = blob_name(file, &digest)?;
        let index: ImageIndex =
            serde_json::from_slice(&bytes).map_err(|e| invalid(file, &entry, e))?;
        let child = select_platform(&index, &want).map_err(no_platform)?;
        platform_name = describe_platform(child);
        index_digest = Some(digest);
        digest = child.digest().to_string();
        media_type = child.media_type().to_string();
        bytes = read_blob(file, store, &digest)?;
    }
    let entry = blob_name(file, &digest)?;
    if !matches!(media_type.as_str(), OCI_MANIFEST | DOCKER_MANIFEST) {
        return Err(invalid(
            file,
            &entry,
            format!("unsupported media type {media_type:?}"),
        ));
    }
    let manifest: oci_spec::image::ImageManifest =
        serde_json::from_slice(&bytes).map_err(|e| invalid(file, &entry, e))?;
    let config_digest = manifest.config().digest().to_string();
    let config = read_blob(file, store, &config_digest)?;
    let mut entries = HashMap::new();
    for l in manifest.layers() {
        let d = l.digest().to_string();
        let name = blob_name(file, &d)?;
        // Checked now, so a layout missing a layer fails before anything is mounted.
        store.open_entry(file, &name)?;
        entries.insert(d, name);
    }
    let image = ResolvedImage::from_parts(ImageParts {
        reference: ref_name.to_string(),
        index_digest,
        media_type,
        platform: platform_name,
        manifest: bytes,
        config,
    })
    .map_err(|source| LocalError::Image {
        file: file.to_string(),
        entry,
        source: Box::new(source),
    })?;
    check_platform(file, &image, platform)?;
    Ok((image, entries))
}
