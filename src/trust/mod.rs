//! Signed images and the trust policy: which images rimg may read, decided
//! the way skopeo `copy` and podman decide, before any layer is fetched.
//!
//! What is trusted: the policy file (`containers-policy.json(5)`: `--policy
//! FILE`, else `$HOME/.config/containers/policy.json`, else
//! `/etc/containers/policy.json`; with neither, Debian's shipped
//! `insecureAcceptAnything`), the `registries.d` directory (which
//! repositories have sigstore attachments), and the public keys the policy
//! names. Nothing else: signatures, payloads, bundles and the manifests
//! they are attached to come from the registry and are checked here.
//!
//! A `sigstoreSigned` requirement is met when one cosign signature of the
//! manifest rimg reads (for a multi-platform image, the chosen platform's
//! manifest, never the index, as podman checks) verifies with a policy key
//! (ECDSA P-256), names that manifest's digest, and names an identity the
//! policy's `signedIdentity` accepts. Keyless (Fulcio/Rekor/PKI) requirements
//! need the network and are refused with a message saying so. An accepted
//! image is read from the verified manifest bytes only, so a tag moved
//! afterwards changes nothing.

pub mod bundle;
pub mod cosign;
pub mod keys;
pub mod policy;
pub mod registries_d;

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::reference::Reference;
use crate::registry::{Client, RegistryError, ResolvedImage};
pub use keys::{PrivateKey, PublicKey};
pub use policy::{IdentityMatch, KeySource, Named, Policy, Requirement};
pub use registries_d::RegistriesD;

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("policy {file}: {detail}")]
    Policy { file: String, detail: String },
    #[error("registries.d {file}: {detail}")]
    RegistriesD { file: String, detail: String },
    #[error("key {what}: {detail}")]
    Key { what: String, detail: String },
    #[error("{what}: {detail}")]
    Signature { what: String, detail: String },
    #[error("{what}: {source}")]
    Registry {
        what: String,
        #[source]
        source: RegistryError,
    },
    /// The policy refuses the image: no layer was read.
    #[error("{image}: rejected by policy {policy}, scope {scope}: {reason}")]
    Rejected {
        image: String,
        policy: String,
        scope: String,
        reason: String,
    },
    #[error(
        "{image}: policy {policy}, scope {scope}: a sigstoreSigned requirement with {what} needs keyless verification (Fulcio/Rekor), which needs the network and is out of scope for rimg; use keyPath/keyPaths/keyData"
    )]
    Keyless {
        image: String,
        policy: String,
        scope: String,
        what: &'static str,
    },
}

impl TrustError {
    pub(crate) fn in_file(self, file: &str) -> TrustError {
        match self {
            TrustError::Policy { detail, .. } => TrustError::Policy {
                file: file.to_string(),
                detail,
            },
            e => e,
        }
    }
}

/// The policy and the registries.d configuration, loaded once per command.
#[derive(Debug, Clone)]
pub struct Trust {
    pub policy: Policy,
    pub registries: RegistriesD,
}

/// One signature found for an image, and what the policy made of it.
#[derive(Debug, Clone, Serialize)]
pub struct SignatureReport {
    /// Where it was found: `<tag> layer N` or `bundle <artifact digest>`.
    pub source: String,
    /// The trusted key that verified it (fingerprint), if one did.
    pub signer: Option<String>,
    /// The identity and digest the signature claims, once verified.
    pub claims: Option<String>,
    pub accepted: bool,
    /// Why it was not accepted.
    pub reason: Option<String>,
}

/// The policy's answer for one image.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub policy: String,
    pub scope: String,
    pub accepted: bool,
    pub reason: Option<String>,
    /// The manifest digest the decision is about.
    pub digest: String,
    pub signatures: Vec<SignatureReport>,
}

/// How far a rejected signature got, in containers/image's order of checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    NotASignature,
    Key,
    Digest,
    Identity,
}

impl Stage {
    fn reason(self) -> &'static str {
        match self {
            Stage::NotASignature | Stage::Key => "no signature by a trusted key",
            Stage::Digest => "signature for another digest",
            Stage::Identity => "identity mismatch",
        }
    }
}

/// Signatures as found, before any requirement looks at them.
struct Found {
    simple: Vec<cosign::Attachment>,
    bundles: Vec<(String, Vec<u8>)>,
    sig_tag: String,
}

impl Trust {
    /// Loads the policy (`policy` or the default search) and registries.d
    /// (`registries_d` or the default search).
    pub fn load(policy: Option<&Path>, registries_d: Option<&Path>) -> Result<Trust, TrustError> {
        Ok(Trust {
            policy: Policy::load(policy)?,
            registries: RegistriesD::load(registries_d)?,
        })
    }

    /// Whether images read through a local transport (`oci`, `oci-archive`,
    /// `docker-archive` at `path`) may be read. Local images have no
    /// sigstore attachments, so `sigstoreSigned` refuses them, as upstream.
    pub fn decide_local(
        &self,
        transport: &str,
        path: &Path,
        image: &str,
        digest: &str,
    ) -> Result<Decision, TrustError> {
        let (identity, namespaces) = policy::local_scopes(transport, path);
        let (scope, reqs) = self
            .policy
            .requirements_for(transport, &identity, &namespaces);
        let mut decision = self.decision(scope, digest);
        for req in reqs {
            let reason = match req {
                Requirement::InsecureAcceptAnything => continue,
                Requirement::SigstoreSigned(s) => {
                    self.keyless(s, image, &decision.scope)?;
                    "no signature by a trusted key (no signature found: images in files carry none)"
                        .to_string()
                }
                other => simple_refusal(other),
            };
            return Ok(decision.reject(reason));
        }
        decision.accepted = true;
        Ok(decision)
    }

    fn decision(&self, scope: String, digest: &str) -> Decision {
        Decision {
            policy: self.policy.source.clone(),
            scope,
            accepted: false,
            reason: None,
            digest: digest.to_string(),
            signatures: Vec::new(),
        }
    }

    fn keyless(&self, s: &policy::Sigstore, image: &str, scope: &str) -> Result<(), TrustError> {
        match s.unsupported {
            Some(what) => Err(TrustError::Keyless {
                image: image.to_string(),
                policy: self.policy.source.clone(),
                scope: scope.to_string(),
                what,
            }),
            None => Ok(()),
        }
    }

    /// The policy's answer for `image`, resolved from `asked` (the reference
    /// as the user gave it: its tag or digest is the identity signatures
    /// must match). Fetches only the manifest's signatures, and only when a
    /// requirement needs them. `Ok` with `accepted: false` is a rejection;
    /// use [`Decision::into_result`] to make it an error.
    pub async fn decide(
        &self,
        client: &Client,
        asked: &Reference,
        image: &ResolvedImage,
    ) -> Result<Decision, TrustError> {
        let (scope, reqs) = self.policy.docker_requirements(asked);
        let mut decision = self.decision(scope, &image.digest);
        let mut found: Option<Found> = None;
        for req in reqs {
            let s = match req {
                Requirement::InsecureAcceptAnything => continue,
                Requirement::SigstoreSigned(s) => s,
                other => return Ok(decision.reject(simple_refusal(other))),
            };
            self.keyless(s, &asked.to_string(), &decision.scope)?;
            let keys = load_keys(&s.keys)?;
            if found.is_none() {
                found = Some(self.fetch(client, asked, image).await?);
            }
            let f = found.as_ref().expect("fetched above");
            let (reports, best) = evaluate(f, &keys, s, asked, image);
            decision.signatures = reports;
            if decision.signatures.iter().any(|r| r.accepted) {
                continue;
            }
            let reason = match best {
                Some(stage) => stage.reason().to_string(),
                None if !self.attachments_enabled(asked) => format!(
                    "no signature by a trusted key (no signature found: sigstore attachments are not enabled for {} in registries.d{})",
                    asked.name(),
                    self.registries
                        .dir
                        .as_ref()
                        .map(|d| format!(" {}", d.display()))
                        .unwrap_or_default()
                ),
                None => "no signature by a trusted key (no signature found)".to_string(),
            };
            return Ok(decision.reject(reason));
        }
        decision.accepted = true;
        Ok(decision)
    }

    fn attachments_enabled(&self, asked: &Reference) -> bool {
        self.registries
            .use_sigstore_attachments(&Named::of(asked).identity(), &asked.name())
    }

    async fn fetch(
        &self,
        client: &Client,
        asked: &Reference,
        image: &ResolvedImage,
    ) -> Result<Found, TrustError> {
        let sig_tag = cosign::signature_tag(&image.digest)?;
        if !self.attachments_enabled(asked) {
            return Ok(Found {
                simple: Vec::new(),
                bundles: Vec::new(),
                sig_tag,
            });
        }
        let simple = cosign::fetch_attachments(client, asked, &image.digest).await?;
        let mut bundles = Vec::new();
        let reg = |what: String| move |e| TrustError::Registry { what, source: e };
        let referrers = client
            .referrers(asked, &image.digest, Some(bundle::BUNDLE_MEDIA_TYPE))
            .await
            .map_err(reg(format!(
                "referrers of {}@{}",
                asked.name(),
                image.digest
            )))?;
        for d in referrers {
            let at = asked.with_digest(d.digest().as_ref());
            let m = client
                .fetch_manifest(&at)
                .await
                .map_err(reg(at.to_string()))?;
            let v: serde_json::Value = serde_json::from_slice(&m.bytes).unwrap_or_default();
            for l in v["layers"].as_array().into_iter().flatten() {
                if l["mediaType"].as_str() != Some(bundle::BUNDLE_MEDIA_TYPE) {
                    continue;
                }
                let digest = l["digest"].as_str().unwrap_or_default();
                let bytes = client
                    .fetch_blob_bytes(asked, digest, cosign::PAYLOAD_MAX)
                    .await
                    .map_err(reg(format!("{} bundle {digest}", asked.name())))?;
                bundles.push((d.digest().to_string(), bytes));
            }
        }
        Ok(Found {
            simple,
            bundles,
            sig_tag,
        })
    }

    /// Whether a key the policy trusts for `repo` signed the artifact
    /// manifest `artifact_digest` of that repository (a published gzip
    /// index): a cosign signature under `sha256-<hex>.sig` that verifies
    /// with one of the keys of the scope's `sigstoreSigned` requirements,
    /// names `artifact_digest`, and names `repo`'s repository. A scope
    /// without such keys trusts no signed artifact.
    pub async fn artifact_signed(
        &self,
        client: &Client,
        repo: &Reference,
        artifact_digest: &str,
    ) -> Result<bool, TrustError> {
        let (_, reqs) = self.policy.docker_requirements(repo);
        let mut keys = Vec::new();
        for req in reqs {
            if let Requirement::SigstoreSigned(s) = req
                && s.unsupported.is_none()
            {
                keys.extend(load_keys(&s.keys)?);
            }
        }
        if keys.is_empty() {
            return Ok(false);
        }
        let attachments = cosign::fetch_attachments(client, repo, artifact_digest).await?;
        Ok(attachments.iter().any(|a| {
            matches!(verify_simple(a, &keys), Ok((_, p))
                if p.manifest_digest == artifact_digest
                    && Named::parse(&p.docker_reference).is_some_and(|n| n.name == repo.name()))
        }))
    }
}

/// Signs the artifact manifest `artifact_digest` of `repo` (a published
/// gzip index) the cosign way, naming the repository; returns the `.sig`
/// manifest digest.
pub async fn sign_artifact(
    client: &Client,
    repo: &Reference,
    artifact_digest: &str,
    key: &PrivateKey,
) -> Result<String, TrustError> {
    cosign::push_signature(client, repo, artifact_digest, &repo.name(), key).await
}

fn simple_refusal(req: &Requirement) -> String {
    match req {
        Requirement::Reject => "the scope's requirement is reject".into(),
        Requirement::SignedBy => {
            "signedBy (GPG simple signing) requirements are not supported by rimg".into()
        }
        Requirement::SignedBaseLayer => "signedBaseLayer not implemented yet!".into(),
        _ => unreachable!("only refusals without signatures"),
    }
}

fn load_keys(src: &KeySource) -> Result<Vec<PublicKey>, TrustError> {
    match src {
        KeySource::None => Ok(Vec::new()),
        KeySource::Paths(paths) => paths
            .iter()
            .map(|p: &PathBuf| {
                let bytes = std::fs::read(p).map_err(|e| TrustError::Key {
                    what: p.display().to_string(),
                    detail: e.to_string(),
                })?;
                PublicKey::from_pem(&bytes, &p.display().to_string())
            })
            .collect(),
        KeySource::Data(datas) => datas
            .iter()
            .enumerate()
            .map(|(i, d)| PublicKey::from_pem(d, &format!("keyData {}", i + 1)))
            .collect(),
    }
}

/// A simple-signing attachment checked against `keys`: the key that
/// verified it and its payload, or how far it got.
fn verify_simple(
    a: &cosign::Attachment,
    keys: &[PublicKey],
) -> Result<(usize, cosign::Payload), (Stage, String)> {
    if a.media_type != cosign::SIGNATURE_MEDIA_TYPE {
        return Err((
            Stage::NotASignature,
            format!("not a signature ({})", a.media_type),
        ));
    }
    let Some(b64) = a.annotations.get(cosign::SIGNATURE_ANNOTATION) else {
        return Err((
            Stage::Key,
            format!("missing {} annotation", cosign::SIGNATURE_ANNOTATION),
        ));
    };
    use base64::Engine;
    let sig = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| (Stage::Key, format!("signature is not base64: {e}")))?;
    let key = keys
        .iter()
        .position(|k| k.verifies(&a.payload, &sig))
        .ok_or((Stage::Key, "not signed by a trusted key".to_string()))?;
    let payload = cosign::parse_payload(&a.payload)
        .map_err(|e| (Stage::Key, format!("invalid payload: {e}")))?;
    Ok((key, payload))
}

/// Every found signature against one requirement; the furthest stage a
/// rejected one reached.
fn evaluate(
    f: &Found,
    keys: &[PublicKey],
    s: &policy::Sigstore,
    asked: &Reference,
    image: &ResolvedImage,
) -> (Vec<SignatureReport>, Option<Stage>) {
    let intended = Named::of(asked);
    let mut reports = Vec::new();
    let mut best = None;
    let note = |stage: Stage, best: &mut Option<Stage>| *best = (*best).max(Some(stage));
    for (i, a) in f.simple.iter().enumerate() {
        let source = format!("{} layer {}", f.sig_tag, i + 1);
        let mut r = SignatureReport {
            source,
            signer: None,
            claims: None,
            accepted: false,
            reason: None,
        };
        match verify_simple(a, keys) {
            Err((stage, why)) => {
                note(stage, &mut best);
                r.reason = Some(why);
            }
            Ok((k, p)) => {
                r.signer = Some(keys[k].fingerprint());
                r.claims = Some(format!("{} {}", p.docker_reference, p.manifest_digest));
                if p.manifest_digest != image.digest {
                    note(Stage::Digest, &mut best);
                    r.reason = Some(format!(
                        "signature for another digest ({})",
                        p.manifest_digest
                    ));
                } else if !s.identity.accepts(&intended, &p.docker_reference) {
                    note(Stage::Identity, &mut best);
                    r.reason = Some(format!(
                        "identity mismatch (signed {:?} for {intended})",
                        p.docker_reference
                    ));
                } else {
                    r.accepted = true;
                }
            }
        }
        reports.push(r);
    }
    for (artifact, bytes) in &f.bundles {
        let mut r = SignatureReport {
            source: format!("bundle {artifact}"),
            signer: None,
            claims: None,
            accepted: false,
            reason: None,
        };
        match bundle::check(bytes, keys, &image.manifest_bytes) {
            bundle::BundleCheck::Signed { key } => {
                r.signer = Some(keys[key].fingerprint());
                r.claims = Some(format!("{} {}", asked.name(), image.digest));
                if s.identity.accepts_repository(&intended, &asked.name()) {
                    r.accepted = true;
                } else {
                    note(Stage::Identity, &mut best);
                    r.reason = Some("identity mismatch (a bundle names no tag)".into());
                }
            }
            bundle::BundleCheck::OtherDigest(d) => {
                note(Stage::Digest, &mut best);
                r.reason = Some(format!("signature for another digest ({d})"));
            }
            other => {
                note(Stage::Key, &mut best);
                r.reason = Some(match other {
                    bundle::BundleCheck::Keyless => {
                        "keyless bundle (certificate): needs Fulcio/Rekor, out of scope".into()
                    }
                    bundle::BundleCheck::UntrustedKey => "not signed by a trusted key".into(),
                    bundle::BundleCheck::NotASignature(w) => format!("not a signature ({w})"),
                    bundle::BundleCheck::Malformed(w) => format!("invalid bundle: {w}"),
                    _ => unreachable!("handled above"),
                });
            }
        }
        reports.push(r);
    }
    (reports, best)
}

impl Decision {
    fn reject(mut self, reason: String) -> Decision {
        self.accepted = false;
        self.reason = Some(reason);
        self
    }

    /// `Ok` when accepted, else the one-line rejection naming `image`.
    pub fn into_result(self, image: &str) -> Result<Decision, TrustError> {
        if self.accepted {
            return Ok(self);
        }
        Err(TrustError::Rejected {
            image: image.to_string(),
            policy: self.policy,
            scope: self.scope,
            reason: self.reason.unwrap_or_default(),
        })
    }
}
