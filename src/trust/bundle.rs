//! Sigstore bundles (v0.3, `application/vnd.dev.sigstore.bundle.v0.3+json`),
//! the format cosign v3 writes: an OCI artifact referring to the image
//! manifest (found through the referrers API or its `sha256-<hex>` fallback
//! tag) whose layer is the bundle JSON. rimg verifies bundles signed with a
//! public key (`verificationMaterial.publicKey`), either a DSSE envelope over
//! an in-toto statement whose subject digest is the manifest's (cosign's
//! `https://sigstore.dev/cosign/sign/v1` predicate) or a `messageSignature`
//! over the manifest bytes. Certificates (keyless) and transparency-log
//! entries are not verified: that needs Fulcio and Rekor, out of scope here.
//! A bundle names no tag, so it satisfies identity rules that compare
//! repositories only (see [`super::policy::IdentityMatch::accepts_repository`]).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use super::keys::{PrivateKey, PublicKey};

/// The bundle media type (artifact type and layer media type).
pub const BUNDLE_MEDIA_TYPE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
const BUNDLE_MEDIA_TYPE_ALT: &str = "application/vnd.dev.sigstore.bundle+json;version=0.3";
/// The in-toto payload type of a DSSE envelope.
pub const IN_TOTO: &str = "application/vnd.in-toto+json";
/// The predicate cosign signs images with.
pub const COSIGN_SIGN_PREDICATE: &str = "https://sigstore.dev/cosign/sign/v1";
const STATEMENT_TYPES: [&str; 2] = [
    "https://in-toto.io/Statement/v1",
    "https://in-toto.io/Statement/v0.1",
];

/// Why a bundle does not sign the image with a trusted key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundleCheck {
    /// Signed by this key, for this digest.
    Signed {
        key: usize,
    },
    /// Not a signature (another predicate, e.g. an SBOM attestation).
    NotASignature(String),
    Malformed(String),
    /// A certificate rather than a public key: needs Fulcio.
    Keyless,
    UntrustedKey,
    OtherDigest(String),
}

/// DSSE's pre-authentication encoding.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {payload_type} {} ",
        payload_type.len(),
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

fn b64(v: &Value, what: &str) -> Result<Vec<u8>, String> {
    let s = v.as_str().ok_or_else(|| format!("{what} is missing"))?;
    STANDARD
        .decode(s)
        .map_err(|e| format!("{what} is not base64: {e}"))
}

/// Checks `bundle` against `keys` for the manifest `manifest_bytes`.
pub fn check(bundle: &[u8], keys: &[PublicKey], manifest_bytes: &[u8]) -> BundleCheck {
    match check_inner(bundle, keys, manifest_bytes) {
        Ok(c) | Err(c) => c,
    }
}

fn check_inner(
    bundle: &[u8],
    keys: &[PublicKey],
    manifest_bytes: &[u8],
) -> Result<BundleCheck, BundleCheck> {
    let bad = |s: String| BundleCheck::Malformed(s);
    let v: Value =
        serde_json::from_slice(bundle).map_err(|e| bad(format!("bundle is not JSON: {e}")))?;
    let mt = v["mediaType"].as_str().unwrap_or_default();
    if mt != BUNDLE_MEDIA_TYPE && mt != BUNDLE_MEDIA_TYPE_ALT {
        return Err(bad(format!("unsupported bundle media type {mt:?}")));
    }
    let material = &v["verificationMaterial"];
    if material.get("certificate").is_some() || material.get("x509CertificateChain").is_some() {
        return Err(BundleCheck::Keyless);
    }
    if material.get("publicKey").is_none() {
        return Err(bad("verificationMaterial has no publicKey".into()));
    }
    let manifest_hex =
        crate::digest::Digest::of_bytes(manifest_bytes).to_string()["sha256:".len()..].to_string();
    if let Some(ms) = v.get("messageSignature") {
        let digest = b64(&ms["messageDigest"]["digest"], "messageDigest.digest").map_err(bad)?;
        if ms["messageDigest"]["algorithm"].as_str() != Some("SHA2_256") {
            return Err(bad("messageDigest is not SHA2_256".into()));
        }
        let sig = b64(&ms["signature"], "messageSignature.signature").map_err(bad)?;
        if hex::encode(&digest) != manifest_hex {
            return Err(BundleCheck::OtherDigest(format!(
                "sha256:{}",
                hex::encode(&digest)
            )));
        }
        return keys
            .iter()
            .position(|k| k.verifies(manifest_bytes, &sig))
            .map(|key| BundleCheck::Signed { key })
            .ok_or(BundleCheck::UntrustedKey);
    }
    let env = v
        .get("dsseEnvelope")
        .ok_or_else(|| bad("neither messageSignature nor dsseEnvelope".into()))?;
    let payload = b64(&env["payload"], "dsseEnvelope.payload").map_err(bad)?;
    let payload_type = env["payloadType"].as_str().unwrap_or_default();
    let signed = pae(payload_type, &payload);
    let key = env["signatures"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| b64(&s["sig"], "sig").ok())
        .find_map(|sig| keys.iter().position(|k| k.verifies(&signed, &sig)))
        .ok_or(BundleCheck::UntrustedKey)?;
    if payload_type != IN_TOTO {
        return Err(BundleCheck::NotASignature(format!(
            "payload type {payload_type:?}"
        )));
    }
    let statement: Value =
        serde_json::from_slice(&payload).map_err(|e| bad(format!("statement is not JSON: {e}")))?;
    if !STATEMENT_TYPES.contains(&statement["_type"].as_str().unwrap_or_default()) {
        return Err(bad(format!(
            "not an in-toto statement ({})",
            statement["_type"]
        )));
    }
    let predicate = statement["predicateType"].as_str().unwrap_or_default();
    if predicate != COSIGN_SIGN_PREDICATE {
        return Err(BundleCheck::NotASignature(format!(
            "predicate {predicate:?}"
        )));
    }
    let digests: Vec<&str> = statement["subject"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["digest"]["sha256"].as_str())
        .collect();
    if digests.contains(&manifest_hex.as_str()) {
        Ok(BundleCheck::Signed { key })
    } else {
        Err(BundleCheck::OtherDigest(
            digests
                .first()
                .map_or("no sha256 subject".to_string(), |d| format!("sha256:{d}")),
        ))
    }
}

/// A bundle as cosign v3 writes for an image: a DSSE envelope over an
/// in-toto statement naming `manifest_digest`, signed by `key`.
pub fn dsse_bundle(key: &PrivateKey, manifest_digest: &str) -> Vec<u8> {
    let (alg, hex) = manifest_digest
        .split_once(':')
        .unwrap_or(("sha256", manifest_digest));
    let statement = serde_json::to_vec(&json!({
        "_type": STATEMENT_TYPES[0],
        "subject": [{"digest": {alg: hex}}],
        "predicateType": COSIGN_SIGN_PREDICATE,
        "predicate": {},
    }))
    .expect("plain JSON");
    let sig = key.sign(&pae(IN_TOTO, &statement));
    serde_json::to_vec(&json!({
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": key.public().fingerprint()}, "tlogEntries": []},
        "dsseEnvelope": {
            "payload": STANDARD.encode(&statement),
            "payloadType": IN_TOTO,
            "signatures": [{"sig": STANDARD.encode(sig), "keyid": ""}],
        },
    }))
    .expect("plain JSON")
}

/// A bundle whose `messageSignature` signs `manifest_bytes` with `key`.
pub fn message_bundle(key: &PrivateKey, manifest_bytes: &[u8]) -> Vec<u8> {
    let digest = crate::digest::Digest::of_bytes(manifest_bytes).to_string();
    let raw = hex::decode(&digest["sha256:".len()..]).expect("hex digest");
    serde_json::to_vec(&json!({
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": key.public().fingerprint()}, "tlogEntries": []},
        "messageSignature": {
            "messageDigest": {"algorithm": "SHA2_256", "digest": STANDARD.encode(raw)},
            "signature": STANDARD.encode(key.sign(manifest_bytes)),
        },
    }))
    .expect("plain JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dsse_and_message_bundles_verify_only_for_their_key_and_manifest() {
        let key = PrivateKey::generate();
        let keys = [PrivateKey::generate().public(), key.public()];
        let manifest = br#"{"schemaVersion":2}"#;
        let digest = crate::digest::Digest::of_bytes(manifest).to_string();
        assert_eq!(
            check(&dsse_bundle(&key, &digest), &keys, manifest),
            BundleCheck::Signed { key: 1 }
        );
        assert_eq!(
            check(&message_bundle(&key, manifest), &keys, manifest),
            BundleCheck::Signed { key: 1 }
        );
        assert_eq!(
            check(&dsse_bundle(&key, &digest), &keys[..1], manifest),
            BundleCheck::UntrustedKey
        );
        assert!(matches!(
            check(&dsse_bundle(&key, &digest), &keys, b"{}"),
            BundleCheck::OtherDigest(_)
        ));
        assert!(matches!(
            check(&message_bundle(&key, b"{}"), &keys, manifest),
            BundleCheck::OtherDigest(_)
        ));
        let mut tampered: Value = serde_json::from_slice(&dsse_bundle(&key, &digest)).unwrap();
        tampered["dsseEnvelope"]["payloadType"] = json!("application/json");
        let tampered = serde_json::to_vec(&tampered).unwrap();
        assert_eq!(check(&tampered, &keys, manifest), BundleCheck::UntrustedKey);
    }

    #[test]
    fn pae_is_dsse_v1() {
        assert_eq!(pae("a/b", b"xyz"), b"DSSEv1 3 a/b 3 xyz");
    }
}
