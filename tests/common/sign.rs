//! A test signer writing exactly what cosign and upstream skopeo write:
//! `sha256-<hex>.sig` manifests of simple-signing payloads with the
//! signature annotation (signing again appends a layer), sigstore bundles
//! as referrers, and the policy and registries.d files that trust them.
//! It uses rimg's own library code (p256 underneath).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rimg::reference::Reference;
use rimg::registry::{Artifact, ArtifactBlob, Client, ClientOptions};
use rimg::trust::cosign::{self, Attachment};
use rimg::trust::{PrivateKey, bundle};

use super::Registry;

#[allow(dead_code)] // not every test binary that compiles tests/common uses it
fn client() -> Arc<Client> {
    Arc::new(
        Client::new(ClientOptions {
            plain_http: true,
            ..ClientOptions::default()
        })
        .unwrap(),
    )
}

#[allow(dead_code)] // not every test binary that compiles tests/common uses it
fn block<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

#[allow(dead_code)] // not every test binary that compiles tests/common uses it
fn repo(reg: &Registry, repo: &str) -> Reference {
    Reference::parse(&format!("{}/{repo}", reg.addr())).unwrap()
}

/// Signs `digest` of `reg/repo` with `key`, the payload naming `identity`.
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub fn sign(reg: &Registry, name: &str, digest: &str, identity: &str, key: &PrivateKey) {
    let c = client();
    block(cosign::push_signature(
        &c,
        &repo(reg, name),
        digest,
        identity,
        key,
    ))
    .unwrap();
}

/// Appends any attachment (forged ones too) to the `.sig` manifest of `digest`.
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub fn attach(reg: &Registry, name: &str, digest: &str, a: Attachment) {
    let c = client();
    block(cosign::push_attachment(&c, &repo(reg, name), digest, a)).unwrap();
}

/// Pushes `bundle_json` as a sigstore bundle referring to the manifest
/// (`media_type`, `digest`, `size`), as cosign v3 does.
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub fn push_bundle(reg: &Registry, name: &str, subject: (&str, &str, usize), bundle_json: Vec<u8>) {
    let c = client();
    let desc = oci_spec::image::DescriptorBuilder::default()
        .media_type(oci_spec::image::MediaType::from(subject.0))
        .digest(subject.1.parse::<oci_spec::image::Digest>().unwrap())
        .size(subject.2 as u64)
        .build()
        .unwrap();
    let artifact = Artifact {
        artifact_type: bundle::BUNDLE_MEDIA_TYPE.into(),
        config: None,
        layers: vec![ArtifactBlob {
            media_type: bundle::BUNDLE_MEDIA_TYPE.into(),
            bytes: bundle_json.into(),
            annotations: [(
                "dev.sigstore.bundle.content".to_string(),
                "dsse-envelope".to_string(),
            )]
            .into(),
        }],
        annotations: Default::default(),
    };
    block(c.push_referrer(&repo(reg, name), &desc, &artifact)).unwrap();
}

/// Whether a key the policy trusts for `reg/name` signed `artifact_digest`.
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub fn artifact_signed(reg: &Registry, name: &str, artifact_digest: &str, policy: &Path) -> bool {
    let trust = rimg::trust::Trust::load(Some(policy), Some(Path::new("/nonexistent"))).unwrap();
    let c = client();
    block(trust.artifact_signed(&c, &repo(reg, name), artifact_digest)).unwrap()
}

/// Writes a public key to `dir/name.pub`.
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub fn write_public(dir: &Path, name: &str, key: &PrivateKey) -> PathBuf {
    let p = dir.join(format!("{name}.pub"));
    std::fs::write(&p, key.public().to_pem()).unwrap();
    p
}

/// A policy file with `default` as the default requirements and
/// `docker_scopes` (scope, requirements JSON) for the docker transport.
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub fn write_policy(dir: &Path, default: &str, docker_scopes: &[(&str, String)]) -> PathBuf {
    let scopes: Vec<String> = docker_scopes
        .iter()
        .map(|(s, r)| format!("{s:?}: {r}"))
        .collect();
    let text = format!(
        r#"{{"default": {default}, "transports": {{"docker": {{{}}}}}}}"#,
        scopes.join(",")
    );
    let p = dir.join(format!("policy-{}.json", fastrand::u64(..)));
    std::fs::write(&p, text).unwrap();
    p
}

/// A registries.d directory turning sigstore attachments on everywhere.
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub fn write_registries_d(dir: &Path) -> PathBuf {
    let d = dir.join("registries.d");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("default.yaml"),
        "default-docker:\n  use-sigstore-attachments: true\n",
    )
    .unwrap();
    d
}
