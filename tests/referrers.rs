//! Pushing blobs, manifests and referrer artifacts to a real registry
//! (distribution 2.8, which has no referrers API, so the fallback tag index
//! is what lists them), anonymously and with token and Basic auth.

mod common;

use std::collections::BTreeMap;

use bytes::Bytes;
use common::image::{Compress, LayerBuilder, Pushed, layer_blob, push_image, sha256};
use common::token::TokenServer;
use common::*;
use oci_spec::image::{Descriptor, MediaType};
use rimg::reference::Reference;
use rimg::registry::{
    Artifact, ArtifactBlob, Client, ClientOptions, CredentialStore, Credentials, OCI_INDEX,
    OCI_MANIFEST, RegistryError, referrers_tag,
};

const TOC: &str = "application/vnd.rimg.toc.v1+json";
const SIG: &str = "application/vnd.example.signature.v1";

fn client(with_credentials: bool) -> Client {
    let explicit = with_credentials.then(|| Credentials {
        username: USER.into(),
        password: PASS.into(),
        identity_token: None,
    });
    Client::new(ClientOptions {
        credentials: CredentialStore::from_env(explicit),
        ..ClientOptions::default()
    })
    .unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn small_image(reg: &Registry, repo: &str) -> Pushed {
    let tar = LayerBuilder::new()
        .file("etc/hello", b"hello\n", 0o644)
        .finish();
    push_image(
        reg,
        repo,
        "v1",
        &[layer_blob(&tar, Compress::Gzip, true)],
        "amd64",
        true,
    )
}

fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn digests(list: &[Descriptor]) -> Vec<String> {
    let mut d: Vec<String> = list.iter().map(|d| d.digest().to_string()).collect();
    d.sort();
    d
}

fn referrers_round_trip(reg: &Registry, with_credentials: bool) {
    let repo = "art/app";
    let image = small_image(reg, repo);
    let reference = Reference::parse(&format!("{}/{repo}:v1", reg.addr())).unwrap();
    let subject = Descriptor::new(
        MediaType::ImageManifest,
        image.manifest.len() as u64,
        image
            .manifest_digest
            .parse::<oci_spec::image::Digest>()
            .unwrap(),
    );
    let client = client(with_credentials);
    runtime().block_on(async {
        let none = client
            .referrers(&reference, &image.manifest_digest, None)
            .await
            .unwrap();
        assert!(none.is_empty(), "{none:?}");

        let toc_bytes = Bytes::from_static(b"{\"entries\":[\"etc/hello\"]}");
        let toc = Artifact {
            artifact_type: TOC.into(),
            config: None,
            layers: vec![ArtifactBlob {
                media_type: TOC.into(),
                bytes: toc_bytes.clone(),
                annotations: annotations(&[("org.opencontainers.image.title", "toc.json")]),
            }],
            annotations: annotations(&[("org.example.kind", "toc")]),
        };
        let toc_digest = client
            .push_referrer(&reference, &subject, &toc)
            .await
            .unwrap();

        let all = client
            .referrers(&reference, &image.manifest_digest, None)
            .await
            .unwrap();
        assert_eq!(digests(&all), vec![toc_digest.clone()]);
        let entry = &all[0];
        assert_eq!(entry.media_type().to_string(), OCI_MANIFEST);
        assert_eq!(
            entry.artifact_type().as_ref().map(|t| t.to_string()),
            Some(TOC.to_string())
        );
        assert_eq!(
            entry
                .annotations()
                .as_ref()
                .and_then(|a| a.get("org.example.kind"))
                .map(String::as_str),
            Some("toc")
        );

        // The artifact's manifest names its subject and type; its blob is there.
        let manifest = client
            .fetch_manifest(&reference.with_digest(&toc_digest))
            .await
            .unwrap();
        let m: serde_json::Value = serde_json::from_slice(&manifest.bytes).unwrap();
        assert_eq!(m["subject"]["digest"], image.manifest_digest.as_str());
        assert_eq!(m["artifactType"], TOC);
        assert_eq!(
            m["config"]["mediaType"],
            "application/vnd.oci.empty.v1+json"
        );
        assert_eq!(m["layers"][0]["digest"], sha256(&toc_bytes).as_str());

        // A second artifact, without blobs (one empty layer).
        let sig = Artifact {
            artifact_type: SIG.into(),
            ..Artifact::default()
        };
        let sig_digest = client
            .push_referrer(&reference, &subject, &sig)
            .await
            .unwrap();
        let mut both = vec![toc_digest.clone(), sig_digest.clone()];
        both.sort();
        let all = client
            .referrers(&reference, &image.manifest_digest, None)
            .await
            .unwrap();
        assert_eq!(digests(&all), both);
        let only_toc = client
            .referrers(&reference, &image.manifest_digest, Some(TOC))
            .await
            .unwrap();
        assert_eq!(digests(&only_toc), vec![toc_digest.clone()]);
        let only_sig = client
            .referrers(&reference, &image.manifest_digest, Some(SIG))
            .await
            .unwrap();
        assert_eq!(digests(&only_sig), vec![sig_digest]);
        let nothing = client
            .referrers(
                &reference,
                &image.manifest_digest,
                Some("application/x-none"),
            )
            .await
            .unwrap();
        assert!(nothing.is_empty());

        // Pushing the same artifact again adds no second entry.
        client
            .push_referrer(&reference, &subject, &toc)
            .await
            .unwrap();
        let all = client
            .referrers(&reference, &image.manifest_digest, None)
            .await
            .unwrap();
        assert_eq!(digests(&all), both);

        // The fallback tag holds an OCI index.
        let tag = referrers_tag(&image.manifest_digest).unwrap();
        let index = client
            .fetch_manifest(&Reference::parse(&format!("{}/{repo}:{tag}", reg.addr())).unwrap())
            .await
            .unwrap();
        assert_eq!(index.media_type, OCI_INDEX);
    });
}

#[test]
fn artifacts_pushed_as_referrers_are_listed_back_anonymously() {
    let reg = Registry::start(Auth::None);
    referrers_round_trip(&reg, false);
}

#[test]
fn artifacts_pushed_as_referrers_are_listed_back_with_token_auth() {
    let reg = Registry::start(Auth::Token(TokenServer::start(&[], 300)));
    referrers_round_trip(&reg, true);
}

#[test]
fn artifacts_pushed_as_referrers_are_listed_back_with_basic_auth() {
    let reg = Registry::start(Auth::Basic);
    referrers_round_trip(&reg, true);
}

#[test]
fn blobs_and_manifests_pushed_are_served_back() {
    let reg = Registry::start(Auth::Token(TokenServer::start(&[], 300)));
    let reference = Reference::parse(&format!("{}/push/me:latest", reg.addr())).unwrap();
    let client = client(true);
    runtime().block_on(async {
        let layer = Bytes::from(vec![7u8; 200_000]);
        let digest = client.push_blob(&reference, layer.clone()).await.unwrap();
        assert_eq!(digest, sha256(&layer));
        // Already there: HEAD answers and nothing is uploaded again.
        assert_eq!(
            client.push_blob(&reference, layer.clone()).await.unwrap(),
            digest
        );
        let config = Bytes::from_static(b"{}");
        let config_digest = client.push_blob(&reference, config).await.unwrap();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": "application/x.test",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": config_digest, "size": 2},
            "layers": [{"mediaType": "application/octet-stream", "digest": digest, "size": layer.len()}],
        }))
        .unwrap();
        let pushed = client
            .push_manifest(&reference, "latest", OCI_MANIFEST, Bytes::from(manifest.clone()))
            .await
            .unwrap();
        assert_eq!(pushed, sha256(&manifest));
        let got = client.fetch_manifest(&reference).await.unwrap();
        assert_eq!(got.bytes, manifest);
        // A digest that is not the manifest's is refused before any request.
        let wrong = sha256(b"other");
        let e = client
            .push_manifest(&reference, &wrong, OCI_MANIFEST, Bytes::from(manifest))
            .await
            .unwrap_err();
        assert!(matches!(e, RegistryError::Config(_)), "{e}");
    });
}

#[test]
fn pushing_without_credentials_to_a_token_registry_is_refused() {
    let reg = Registry::start(Auth::Token(TokenServer::start(&["push/me"], 300)));
    let reference = Reference::parse(&format!("{}/push/me:latest", reg.addr())).unwrap();
    let client = client(false);
    let e = runtime()
        .block_on(client.push_blob(&reference, Bytes::from_static(b"x")))
        .unwrap_err();
    assert!(matches!(e, RegistryError::Auth { .. }), "{e}");
}
