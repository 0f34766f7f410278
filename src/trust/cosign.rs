//! cosign's signature layout, read and written as cosign and skopeo do: the
//! tag `sha256-<manifest hex>.sig` holds an OCI image manifest whose layers
//! are simple-signing payloads (`application/vnd.dev.cosign.simplesigning.v1+json`),
//! each with its base64 DER ECDSA signature in the
//! `dev.cosignproject.cosign/signature` annotation. Signing again appends a
//! layer. The payload is parsed as strictly as containers/image parses it.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use serde_json::{Value, json};

use super::TrustError;
use super::keys::PrivateKey;
use crate::digest::Digest;
use crate::reference::Reference;
use crate::registry::{Client, OCI_MANIFEST, RegistryError};

/// A signature layer's media type.
pub const SIGNATURE_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The annotation holding the base64 signature of the payload.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// The payload's `critical.type`.
pub const SIGNATURE_TYPE: &str = "cosign container image signature";
/// Signature payloads larger than this are refused (containers/image's
/// MaxSignatureBodySize).
pub const PAYLOAD_MAX: usize = 4 << 20;
const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";

/// One layer of a `.sig` manifest, as found (untrusted).
#[derive(Debug, Clone)]
pub struct Attachment {
    pub media_type: String,
    pub payload: Vec<u8>,
    pub annotations: BTreeMap<String, String>,
}

/// What a verified payload claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    pub docker_reference: String,
    pub manifest_digest: String,
}

/// The attachment tag of a manifest digest: `sha256-<hex>.sig`.
pub fn signature_tag(manifest_digest: &str) -> Result<String, TrustError> {
    let d = Digest::parse(manifest_digest).map_err(|e| TrustError::Signature {
        what: manifest_digest.to_string(),
        detail: e.to_string(),
    })?;
    Ok(format!("{}.sig", d.to_string().replacen(':', "-", 1)))
}

fn exact<'a>(
    v: &'a Value,
    fields: &[&str],
    what: &str,
) -> Result<&'a serde_json::Map<String, Value>, String> {
    let o = v
        .as_object()
        .ok_or_else(|| format!("{what} is not a JSON object"))?;
    for f in fields {
        if !o.contains_key(*f) {
            return Err(format!("{what}: missing field {f:?}"));
        }
    }
    if let Some(k) = o.keys().find(|k| !fields.contains(&k.as_str())) {
        return Err(format!("{what}: unexpected field {k:?}"));
    }
    Ok(o)
}

/// Parses a simple-signing payload with containers/image's rules: exactly
/// `critical` and `optional`; `critical` exactly `type`, `image` and
/// `identity`; the type cosign's; a valid sha256 digest.
pub fn parse_payload(bytes: &[u8]) -> Result<Payload, String> {
    let v: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("payload is not JSON: {e}"))?;
    let top = exact(&v, &["critical", "optional"], "payload")?;
    match &top["optional"] {
        Value::Null => {}
        Value::Object(o) => {
            if o.get("creator").is_some_and(|c| !c.is_string()) {
                return Err("optional.creator is not a string".into());
            }
            if o.get("timestamp")
                .is_some_and(|t| !(t.is_i64() || t.is_u64()))
            {
                return Err("Field optional.timestamp is not an integer".into());
            }
        }
        _ => return Err("optional is not an object".into()),
    }
    let critical = exact(&top["critical"], &["type", "image", "identity"], "critical")?;
    if critical["type"].as_str() != Some(SIGNATURE_TYPE) {
        return Err(format!("Unrecognized signature type {}", critical["type"]));
    }
    let image = exact(
        &critical["image"],
        &["docker-manifest-digest"],
        "critical.image",
    )?;
    let digest = image["docker-manifest-digest"]
        .as_str()
        .ok_or("docker-manifest-digest is not a string")?;
    Digest::parse(digest)
        .map_err(|e| format!("invalid docker-manifest-digest value {digest:?}: {e}"))?;
    let identity = exact(
        &critical["identity"],
        &["docker-reference"],
        "critical.identity",
    )?;
    let reference = identity["docker-reference"]
        .as_str()
        .ok_or("docker-reference is not a string")?;
    Ok(Payload {
        docker_reference: reference.to_string(),
        manifest_digest: digest.to_string(),
    })
}

/// The payload skopeo writes for `docker_reference` at `manifest_digest`.
pub fn payload_json(docker_reference: &str, manifest_digest: &str) -> Vec<u8> {
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    serde_json::to_vec(&json!({
        "critical": {
            "identity": {"docker-reference": docker_reference},
            "image": {"docker-manifest-digest": manifest_digest},
            "type": SIGNATURE_TYPE,
        },
        "optional": {"creator": concat!("rimg ", env!("CARGO_PKG_VERSION")), "timestamp": timestamp},
    }))
    .expect("plain JSON")
}

/// The `.sig` manifest of `manifest_digest` in `repo`'s repository, if any.
async fn attachment_manifest(
    client: &Client,
    repo: &Reference,
    manifest_digest: &str,
) -> Result<Option<(Value, Vec<u8>)>, TrustError> {
    let tag = signature_tag(manifest_digest)?;
    let at = Reference {
        tag: Some(tag.clone()),
        digest: None,
        ..repo.clone()
    };
    let raw = match client.fetch_manifest(&at).await {
        Ok(m) => m,
        Err(RegistryError::Api { status: 404, .. }) => return Ok(None),
        Err(e) => {
            return Err(TrustError::Registry {
                what: format!("{}:{tag}", repo.name()),
                source: e,
            });
        }
    };
    if raw.media_type != OCI_MANIFEST {
        return Err(TrustError::Signature {
            what: format!("{}:{tag}", repo.name()),
            detail: format!(
                "unexpected MIME type for a sigstore attachment manifest: {:?}",
                raw.media_type
            ),
        });
    }
    let v: Value = serde_json::from_slice(&raw.bytes).map_err(|e| TrustError::Signature {
        what: format!("{}:{tag}", repo.name()),
        detail: e.to_string(),
    })?;
    Ok(Some((v, raw.bytes)))
}

fn descriptors(v: &Value) -> Vec<(String, String, BTreeMap<String, String>)> {
    v["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| {
            let annotations = l["annotations"]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect();
            (
                l["mediaType"].as_str().unwrap_or_default().to_string(),
                l["digest"].as_str().unwrap_or_default().to_string(),
                annotations,
            )
        })
        .collect()
}

/// Every attachment of `manifest_digest` (none when there is no `.sig` tag).
pub async fn fetch_attachments(
    client: &Client,
    repo: &Reference,
    manifest_digest: &str,
) -> Result<Vec<Attachment>, TrustError> {
    let Some((manifest, _)) = attachment_manifest(client, repo, manifest_digest).await? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for (media_type, digest, annotations) in descriptors(&manifest) {
        let payload = client
            .fetch_blob_bytes(repo, &digest, PAYLOAD_MAX)
            .await
            .map_err(|e| TrustError::Registry {
                what: format!("{} signature payload {digest}", repo.name()),
                source: e,
            })?;
        out.push(Attachment {
            media_type,
            payload,
            annotations,
        });
    }
    Ok(out)
}

/// Signs `manifest_digest` in `repo`'s repository as skopeo `--sign-by-sigstore-private-key`
/// does: the payload names `docker_reference`; the signature is appended to
/// the `.sig` manifest (created when missing). Returns the new `.sig` manifest digest.
pub async fn push_signature(
    client: &Client,
    repo: &Reference,
    manifest_digest: &str,
    docker_reference: &str,
    key: &PrivateKey,
) -> Result<String, TrustError> {
    let payload = payload_json(docker_reference, manifest_digest);
    let signature = STANDARD.encode(key.sign(&payload));
    push_attachment(
        client,
        repo,
        manifest_digest,
        Attachment {
            media_type: SIGNATURE_MEDIA_TYPE.into(),
            payload,
            annotations: [(SIGNATURE_ANNOTATION.to_string(), signature)].into(),
        },
    )
    .await
}

/// Appends `attachment` as a layer of the `.sig` manifest of
/// `manifest_digest` (exactly as containers/image writes it: OCI config
/// `{"architecture":"","os":"","config":{},"rootfs":{...}}` listing each
/// layer's digest as a diff_id). Any attachment may be pushed, so tests can
/// write forged ones too.
pub async fn push_attachment(
    client: &Client,
    repo: &Reference,
    manifest_digest: &str,
    attachment: Attachment,
) -> Result<String, TrustError> {
    let what = format!("{} signature of {manifest_digest}", repo.name());
    let reg = |e: RegistryError| TrustError::Registry {
        what: what.clone(),
        source: e,
    };
    let existing = attachment_manifest(client, repo, manifest_digest).await?;
    let mut layers: Vec<Value> = existing
        .as_ref()
        .and_then(|(m, _)| m["layers"].as_array().cloned())
        .unwrap_or_default();
    let payload = Bytes::from(attachment.payload);
    let digest = client.push_blob(repo, payload.clone()).await.map_err(reg)?;
    let mut desc =
        json!({"mediaType": attachment.media_type, "digest": digest, "size": payload.len()});
    if !attachment.annotations.is_empty() {
        desc["annotations"] = json!(attachment.annotations);
    }
    layers.push(desc);
    let diff_ids: Vec<Value> = layers.iter().map(|l| l["digest"].clone()).collect();
    // Field order as Go's imgspecv1.Image marshals it.
    let config = format!(
        r#"{{"architecture":"","os":"","config":{{}},"rootfs":{{"type":"layers","diff_ids":{}}}}}"#,
        Value::Array(diff_ids)
    );
    let config = Bytes::from(config.into_bytes());
    let config_digest = client.push_blob(repo, config.clone()).await.map_err(reg)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest, "size": config.len()},
        "layers": layers,
    });
    let bytes = Bytes::from(serde_json::to_vec(&manifest).expect("plain JSON"));
    let tag = signature_tag(manifest_digest)?;
    let pushed = client
        .put_manifest(repo, &tag, OCI_MANIFEST, bytes)
        .await
        .map_err(reg)?;
    Ok(pushed.digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn the_written_payload_parses_back() {
        let p = parse_payload(&payload_json("r.io/a:1", D)).unwrap();
        assert_eq!(
            p,
            Payload {
                docker_reference: "r.io/a:1".into(),
                manifest_digest: D.into()
            }
        );
        assert_eq!(signature_tag(D).unwrap(), format!("sha256-{}.sig", &D[7..]));
    }

    #[test]
    fn payloads_are_parsed_as_strictly_as_containers_image_does() {
        let ok = format!(
            r#"{{"critical":{{"identity":{{"docker-reference":"r.io/a"}},"image":{{"docker-manifest-digest":"{D}"}},"type":"{SIGNATURE_TYPE}"}},"optional":null}}"#
        );
        assert!(parse_payload(ok.as_bytes()).is_ok());
        for bad in [
            ok.replace(r#","optional":null"#, ""),
            ok.replace(r#""optional":null"#, r#""optional":null,"x":1"#),
            ok.replace(SIGNATURE_TYPE, "atomic container signature"),
            ok.replace(D, "sha256:12"),
            ok.replace(
                r#""docker-reference":"r.io/a""#,
                r#""docker-reference":"r.io/a","x":"y""#,
            ),
            ok.replace("null", r#"{"timestamp":"soon"}"#),
            "[]".to_string(),
        ] {
            assert!(parse_payload(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
