//! The trust step: the containers policy asked about each image a command
//! is about to read (`--policy`, `--registries.d`), once, right after the
//! image is resolved and before any layer is fetched; `rimg verify`; and
//! signing a pushed gzip index.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

use rimg::local::{Kind, Spec};
use rimg::reference::Reference;
use rimg::registry::{Client, ResolvedImage};
use rimg::trust::{Decision, PrivateKey, Trust};

use super::*;

fn transport(kind: Kind) -> &'static str {
    match kind {
        Kind::DockerArchive => "docker-archive",
        Kind::Oci => "oci",
        Kind::OciArchive => "oci-archive",
    }
}

impl Common {
    /// The policy and registries.d this command runs under.
    pub(crate) fn trust(&self) -> Result<Trust> {
        Ok(Trust::load(
            self.policy.as_deref(),
            self.registries_d.as_deref(),
        )?)
    }

    /// What the policy says about a registry image (no error for a rejection).
    pub(crate) fn decide(
        &self,
        rt: &tokio::runtime::Runtime,
        client: &Client,
        asked: &Reference,
        image: &ResolvedImage,
    ) -> Result<Decision> {
        Ok(rt.block_on(self.trust()?.decide(client, asked, image))?)
    }

    /// Admits a registry image or refuses it with one line naming the image,
    /// the policy scope and the reason.
    pub(crate) fn admit(
        &self,
        rt: &tokio::runtime::Runtime,
        client: &Client,
        asked: &Reference,
        image: &ResolvedImage,
    ) -> Result<()> {
        let decision = self.decide(rt, client, asked, image)?;
        decision.into_result(&asked.to_string())?;
        Ok(())
    }

    /// What the policy says about an image in a file.
    pub(crate) fn decide_local(&self, spec: &Spec, image: &ResolvedImage) -> Result<Decision> {
        let path = spec.absolute()?.path;
        Ok(self.trust()?.decide_local(
            transport(spec.kind),
            &path,
            &spec.to_string(),
            &image.digest,
        )?)
    }

    /// Admits an image in a file or refuses it.
    pub(crate) fn admit_local(&self, spec: &Spec, image: &ResolvedImage) -> Result<()> {
        self.decide_local(spec, image)?
            .into_result(&spec.to_string())?;
        Ok(())
    }
}

/// What the policy says about `reference` and every signature found for
/// it, without refusing: `rimg verify` reports it before reading layers.
pub(crate) fn decision_for(
    common: &Common,
    rt: &tokio::runtime::Runtime,
    reference: &str,
) -> Result<(String, Decision)> {
    Ok(match local::locate(reference) {
        Location::Local(spec) => {
            let (image, _) = local::open(&spec, common.platform())?;
            (spec.to_string(), common.decide_local(&spec, &image)?)
        }
        Location::Registry(r) => {
            let asked = parse_reference(r)?;
            let client = common.registry.client()?;
            let image = rt.block_on(resolve(&client, common, &asked))?;
            (
                asked.to_string(),
                common.decide(rt, &client, &asked, &image)?,
            )
        }
    })
}

/// The decision as `rimg verify` prints it: the policy, then a line per
/// signature found (who signed it, whether the policy accepts it).
pub(crate) fn write_decision(out: &mut dyn Write, d: &Decision) -> std::io::Result<()> {
    writeln!(out, "policy     {} (scope {})", d.policy, d.scope)?;
    for s in &d.signatures {
        let verdict = if s.accepted {
            "accepted".to_string()
        } else {
            format!("rejected: {}", s.reason.as_deref().unwrap_or(""))
        };
        writeln!(
            out,
            "signature  {}: signer {}; {verdict}",
            s.source,
            s.signer.as_deref().unwrap_or("none trusted"),
        )?;
    }
    Ok(())
}

/// The decision as one JSON object (`rimg verify --json`).
pub(crate) fn decision_json(d: &Decision) -> serde_json::Value {
    serde_json::json!({
        "policy": d.policy,
        "scope": d.scope,
        "accepted": d.accepted,
        "reason": d.reason,
        "digest": d.digest,
        "signatures": d.signatures.iter().map(|s| serde_json::json!({
            "source": s.source,
            "signer": s.signer,
            "accepted": s.accepted,
            "reason": s.reason,
        })).collect::<Vec<_>>(),
    })
}

/// How `rimg index push` signs the index artifact.
pub struct SignArgs<'a> {
    pub key: &'a Path,
    pub passphrase_file: Option<&'a Path>,
}

/// Signs a pushed artifact the cosign way (`sha256-<hex>.sig`) with an
/// encrypted cosign key; returns the signature manifest's digest.
pub(crate) fn sign_artifact(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    repo: &Reference,
    artifact_digest: &str,
    sign: &SignArgs,
) -> Result<String> {
    let pem = std::fs::read(sign.key)
        .with_context(|| format!("cannot read the signing key {}", sign.key.display()))?;
    let passphrase = match sign.passphrase_file {
        Some(f) => std::fs::read(f)
            .with_context(|| format!("cannot read the passphrase file {}", f.display()))?,
        None => std::env::var("COSIGN_PASSWORD")
            .map(String::into_bytes)
            .context(
                "--sign-by-sigstore-private-key needs --sign-passphrase-file (or COSIGN_PASSWORD)",
            )?,
    };
    // As skopeo reads it: the first line, without its line ending.
    let line = passphrase.split(|&b| b == b'\n').next().unwrap_or_default();
    let passphrase = line.strip_suffix(b"\r").unwrap_or(line);
    let key = PrivateKey::decrypt(&pem, passphrase, &sign.key.display().to_string())?;
    Ok(rt.block_on(rimg::trust::sign_artifact(
        client,
        repo,
        artifact_digest,
        &key,
    ))?)
}
