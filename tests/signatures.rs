//! Signed images and the trust policy, end to end: a real registry, images
//! signed the way cosign and skopeo sign them (tests/common/sign.rs), and
//! the rimg binary run with `--policy` and `--registries.d`. Each case is
//! one that skopeo `copy` accepts or refuses with the same policy.

mod common;

use std::path::PathBuf;

use common::counting::CountingProxy;
use common::image::{Compress, LayerBuilder, Pushed, layer_blob, push_image, push_index};
use common::sign::{self, attach, push_bundle, write_policy, write_public, write_registries_d};
use common::{Auth, Env, Registry};
use rimg::trust::cosign::{self as cosign_fmt, Attachment};
use rimg::trust::{PrivateKey, bundle};

const REPO: &str = "team/app";
const TAG: &str = "v1";

struct Fixture {
    reg: Registry,
    env: Env,
    dir: tempfile::TempDir,
    key: PrivateKey,
    other: PrivateKey,
    registries_d: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let registries_d = write_registries_d(dir.path());
        Fixture {
            reg: Registry::start(Auth::None),
            env: Env::new(),
            dir,
            key: PrivateKey::generate(),
            other: PrivateKey::generate(),
            registries_d,
        }
    }

    fn push(&self, repo: &str, tag: &str, content: &str) -> Pushed {
        let mut t = LayerBuilder::new();
        t.file("etc/motd", content.as_bytes(), 0o644);
        push_image(
            &self.reg,
            repo,
            tag,
            &[layer_blob(&t.finish(), Compress::Gzip, true)],
            "amd64",
            true,
        )
    }

    fn name(&self, repo: &str) -> String {
        format!("{}/{repo}", self.reg.addr())
    }

    /// A policy whose scope for this registry's repositories is one
    /// `sigstoreSigned` requirement trusting `key`, with `identity`.
    fn policy(&self, key: &PrivateKey, identity: Option<&str>) -> PathBuf {
        let pub_path = write_public(self.dir.path(), &format!("k{}", fastrand::u32(..)), key);
        let identity = identity
            .map(|i| format!(r#","signedIdentity":{i}"#))
            .unwrap_or_default();
        let req = format!(
            r#"[{{"type":"sigstoreSigned","keyPath":{:?}{identity}}}]"#,
            pub_path.display().to_string()
        );
        write_policy(
            self.dir.path(),
            r#"[{"type":"insecureAcceptAnything"}]"#,
            &[(&self.reg.addr(), req)],
        )
    }

    fn args<'a>(&'a self, policy: &'a str, rd: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
        let mut a = vec!["--policy", policy, "--registries.d", rd];
        a.extend_from_slice(rest);
        a
    }

    fn cat(&self, policy: &std::path::Path, image: &str) -> Result<String, String> {
        let (p, rd) = (
            policy.display().to_string(),
            self.registries_d.display().to_string(),
        );
        let out = self
            .env
            .run(&self.args(&p, &rd, &["cat", image, "/etc/motd"]));
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!err.contains("panicked"), "{err}");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("rimg: ")).collect();
            assert_eq!(lines.len(), 1, "one error line expected: {err}");
            Err(lines[0].to_string())
        }
    }
}

fn signed_attachment(key: &PrivateKey, payload: Vec<u8>) -> Attachment {
    use base64::Engine;
    let sig = base64::engine::general_purpose::STANDARD.encode(key.sign(&payload));
    Attachment {
        media_type: cosign_fmt::SIGNATURE_MEDIA_TYPE.into(),
        payload,
        annotations: [(cosign_fmt::SIGNATURE_ANNOTATION.to_string(), sig)].into(),
    }
}

#[test]
fn a_good_signature_is_accepted_and_verify_names_the_signer() {
    let f = Fixture::new();
    let img = f.push(REPO, TAG, "signed\n");
    let image = format!("{}:{TAG}", f.name(REPO));
    sign::sign(&f.reg, REPO, &img.manifest_digest, &image, &f.key);
    let policy = f.policy(&f.key, None);
    assert_eq!(f.cat(&policy, &image).unwrap(), "signed\n");
    let (p, rd) = (
        policy.display().to_string(),
        f.registries_d.display().to_string(),
    );
    let out = f.env.ok(&f.args(&p, &rd, &["verify", &image]));
    assert!(
        out.contains(&format!(
            "signer {}; accepted",
            f.key.public().fingerprint()
        )),
        "{out}"
    );
    // Then the layers are checked, and the verdict is the last line.
    assert!(out.trim_end().ends_with("verified"), "{out}");
    let inspect = f.env.ok(&f.args(&p, &rd, &["inspect", &image]));
    let v: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(v["policy"]["accepted"], true);
    assert_eq!(
        v["policy"]["signatures"][0]["signer"],
        f.key.public().fingerprint()
    );
}

#[test]
fn a_signature_by_another_key_is_rejected() {
    let f = Fixture::new();
    let img = f.push(REPO, TAG, "x\n");
    let image = format!("{}:{TAG}", f.name(REPO));
    sign::sign(&f.reg, REPO, &img.manifest_digest, &image, &f.other);
    let err = f.cat(&f.policy(&f.key, None), &image).unwrap_err();
    assert!(
        err.contains(&image)
            && err.contains(&format!("scope transports.docker[\"{}\"]", f.reg.addr())),
        "{err}"
    );
    assert!(err.ends_with("no signature by a trusted key"), "{err}");
}

#[test]
fn an_unsigned_image_is_rejected_before_any_layer_is_fetched() {
    let f = Fixture::new();
    let img = f.push(REPO, TAG, "x\n");
    let proxy = CountingProxy::start(&f.reg.addr(), None);
    let image = format!("{}/{REPO}:{TAG}", proxy.addr());
    let policy = write_policy(
        f.dir.path(),
        &format!(
            r#"[{{"type":"sigstoreSigned","keyPath":{:?}}}]"#,
            write_public(f.dir.path(), "k", &f.key)
                .display()
                .to_string()
        ),
        &[],
    );
    let err = f.cat(&policy, &image).unwrap_err();
    assert!(
        err.contains("scope default")
            && err.contains("no signature by a trusted key (no signature found)"),
        "{err}"
    );
    assert!(
        proxy.blob_requests(&img.layers[0]).is_empty(),
        "a layer was fetched: {:?}",
        proxy.requests()
    );
    // Signed, the same image is read through the same proxy.
    sign::sign(&f.reg, REPO, &img.manifest_digest, &image, &f.key);
    assert_eq!(f.cat(&policy, &image).unwrap(), "x\n");
    assert!(!proxy.blob_requests(&img.layers[0]).is_empty());
}

#[test]
fn without_sigstore_attachments_in_registries_d_signatures_are_not_read_as_upstream() {
    let f = Fixture::new();
    let img = f.push(REPO, TAG, "x\n");
    let image = format!("{}:{TAG}", f.name(REPO));
    sign::sign(&f.reg, REPO, &img.manifest_digest, &image, &f.key);
    let policy = f.policy(&f.key, None).display().to_string();
    let empty = f.dir.path().join("empty.d");
    let out = f.env.run(&[
        "--policy",
        &policy,
        "--registries.d",
        empty.to_str().unwrap(),
        "ls",
        &image,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("sigstore attachments are not enabled"),
        "{err}"
    );
}

#[test]
fn a_signature_for_another_digest_is_rejected() {
    let f = Fixture::new();
    let img = f.push(REPO, TAG, "x\n");
    let other = f.push(REPO, "other", "y\n");
    let image = format!("{}:{TAG}", f.name(REPO));
    let payload = cosign_fmt::payload_json(&image, &other.manifest_digest);
    attach(
        &f.reg,
        REPO,
        &img.manifest_digest,
        signed_attachment(&f.key, payload),
    );
    let err = f.cat(&f.policy(&f.key, None), &image).unwrap_err();
    assert!(err.ends_with("signature for another digest"), "{err}");
}

#[test]
fn a_tampered_signature_a_tampered_payload_and_a_missing_annotation_are_rejected() {
    let f = Fixture::new();
    let img = f.push(REPO, TAG, "x\n");
    let image = format!("{}:{TAG}", f.name(REPO));
    let policy = f.policy(&f.key, None);
    let good = cosign_fmt::payload_json(&image, &img.manifest_digest);
    // Tampered signature: one bit of the DER signature flipped.
    let mut sig = f.key.sign(&good);
    let last = sig.len() - 1;
    sig[last] ^= 1;
    use base64::Engine;
    let mut a = signed_attachment(&f.key, good.clone());
    a.annotations.insert(
        cosign_fmt::SIGNATURE_ANNOTATION.into(),
        base64::engine::general_purpose::STANDARD.encode(sig),
    );
    attach(&f.reg, REPO, &img.manifest_digest, a);
    // Tampered payload: signed, then the identity edited.
    let mut b = signed_attachment(&f.key, good.clone());
    b.payload = String::from_utf8(good.clone())
        .unwrap()
        .replace(TAG, "v2")
        .into_bytes();
    attach(&f.reg, REPO, &img.manifest_digest, b);
    // No annotation at all.
    let mut c = signed_attachment(&f.key, good);
    c.annotations.clear();
    attach(&f.reg, REPO, &img.manifest_digest, c);
    let err = f.cat(&policy, &image).unwrap_err();
    assert!(err.ends_with("no signature by a trusted key"), "{err}");
    let (p, rd) = (
        policy.display().to_string(),
        f.registries_d.display().to_string(),
    );
    let out = f.env.run(&f.args(&p, &rd, &["verify", &image]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("signature  ").count(), 3, "{text}");
    assert!(
        text.contains("missing dev.cosignproject.cosign/signature annotation"),
        "{text}"
    );
}

#[test]
fn two_signatures_of_which_one_is_trusted_are_accepted() {
    let f = Fixture::new();
    let img = f.push(REPO, TAG, "two\n");
    let image = format!("{}:{TAG}", f.name(REPO));
    sign::sign(&f.reg, REPO, &img.manifest_digest, &image, &f.other);
    sign::sign(&f.reg, REPO, &img.manifest_digest, &image, &f.key);
    assert_eq!(f.cat(&f.policy(&f.key, None), &image).unwrap(), "two\n");
}

#[test]
fn multi_arch_signed_instances_are_accepted_and_an_index_only_signature_is_rejected() {
    let f = Fixture::new();
    let amd = f.push(REPO, "amd", "amd64\n");
    let mut t = LayerBuilder::new();
    t.file("etc/motd", b"arm64\n", 0o644);
    let arm = push_image(
        &f.reg,
        REPO,
        "arm",
        &[layer_blob(&t.finish(), Compress::Gzip, true)],
        "arm64",
        true,
    );
    let index = push_index(
        &f.reg,
        REPO,
        "multi",
        &[("linux/amd64", &amd), ("linux/arm64", &arm)],
        true,
    );
    let image = format!("{}:multi", f.name(REPO));
    let policy = f.policy(&f.key, None);
    sign::sign(&f.reg, REPO, &index, &image, &f.key);
    let (p, rd) = (
        policy.display().to_string(),
        f.registries_d.display().to_string(),
    );
    let run = |plat: &str| {
        let out = f
            .env
            .run(&f.args(&p, &rd, &["--platform", plat, "cat", &image, "/etc/motd"]));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, _, err) = run("linux/amd64");
    assert!(
        !ok && err.contains("no signature by a trusted key"),
        "index-only signature accepted: {err}"
    );
    sign::sign(&f.reg, REPO, &amd.manifest_digest, &image, &f.key);
    sign::sign(&f.reg, REPO, &arm.manifest_digest, &image, &f.key);
    assert_eq!(run("linux/amd64").1, "amd64\n");
    assert_eq!(run("linux/arm64").1, "arm64\n");
}

#[test]
fn a_tag_repointed_after_signing_is_rejected_and_the_old_digest_is_accepted() {
    let f = Fixture::new();
    let old = f.push(REPO, TAG, "old\n");
    let image = format!("{}:{TAG}", f.name(REPO));
    sign::sign(&f.reg, REPO, &old.manifest_digest, &image, &f.key);
    f.push(REPO, TAG, "new\n");
    let policy = f.policy(&f.key, None);
    let err = f.cat(&policy, &image).unwrap_err();
    assert!(err.contains("no signature by a trusted key"), "{err}");
    let by_digest = format!("{}@{}", f.name(REPO), old.manifest_digest);
    assert_eq!(f.cat(&policy, &by_digest).unwrap(), "old\n");
}

#[test]
fn signed_identities_follow_the_policy_rules() {
    let f = Fixture::new();
    let img = f.push(REPO, TAG, "id\n");
    let image = format!("{}:{TAG}", f.name(REPO));
    let by_digest = format!("{}@{}", f.name(REPO), img.manifest_digest);
    // Signed for another tag of the same repository.
    sign::sign(
        &f.reg,
        REPO,
        &img.manifest_digest,
        &format!("{}:other", f.name(REPO)),
        &f.key,
    );
    let default = f.policy(&f.key, None);
    assert!(
        f.cat(&default, &image)
            .unwrap_err()
            .ends_with("identity mismatch")
    );
    assert_eq!(f.cat(&default, &by_digest).unwrap(), "id\n");
    let repo_rule = f.policy(&f.key, Some(r#"{"type":"matchRepository"}"#));
    assert_eq!(f.cat(&repo_rule, &image).unwrap(), "id\n");
    let exact = f.policy(&f.key, Some(r#"{"type":"matchExact"}"#));
    assert!(
        f.cat(&exact, &image)
            .unwrap_err()
            .ends_with("identity mismatch")
    );
    assert!(
        f.cat(&exact, &by_digest)
            .unwrap_err()
            .ends_with("identity mismatch")
    );
    // remapIdentity: a mirror's images carry the production repository's signatures.
    let mirrored = f.push("mirror/app", TAG, "m\n");
    sign::sign(
        &f.reg,
        "mirror/app",
        &mirrored.manifest_digest,
        &format!("{}:{TAG}", f.name("prod/app")),
        &f.key,
    );
    let remap = f.policy(
        &f.key,
        Some(&format!(
            r#"{{"type":"remapIdentity","prefix":"{}","signedPrefix":"{}"}}"#,
            f.name("mirror"),
            f.name("prod")
        )),
    );
    assert_eq!(
        f.cat(&remap, &format!("{}:{TAG}", f.name("mirror/app")))
            .unwrap(),
        "m\n"
    );
    assert!(
        f.cat(&default, &format!("{}:{TAG}", f.name("mirror/app")))
            .unwrap_err()
            .ends_with("identity mismatch")
    );
}

#[test]
fn sigstore_bundles_found_through_referrers_are_verified_with_the_key() {
    let f = Fixture::new();
    let img = f.push(REPO, TAG, "bundled\n");
    let bad = f.push("team/bad", TAG, "bad\n");
    let policy = f.policy(&f.key, None);
    let subject = |p: &Pushed| {
        (
            p.media_type.clone(),
            p.manifest_digest.clone(),
            p.manifest.len(),
        )
    };
    let (mt, d, n) = subject(&img);
    push_bundle(
        &f.reg,
        REPO,
        (&mt, &d, n),
        bundle::dsse_bundle(&f.key, &img.manifest_digest),
    );
    assert_eq!(
        f.cat(&policy, &format!("{}:{TAG}", f.name(REPO))).unwrap(),
        "bundled\n"
    );
    // Another key, and a bundle for another digest.
    let (mt, d, n) = subject(&bad);
    push_bundle(
        &f.reg,
        "team/bad",
        (&mt, &d, n),
        bundle::dsse_bundle(&f.other, &bad.manifest_digest),
    );
    let bad_ref = format!("{}:{TAG}", f.name("team/bad"));
    assert!(
        f.cat(&policy, &bad_ref)
            .unwrap_err()
            .ends_with("no signature by a trusted key")
    );
    push_bundle(
        &f.reg,
        "team/bad",
        (&mt, &d, n),
        bundle::dsse_bundle(&f.key, &img.manifest_digest),
    );
    assert!(
        f.cat(&policy, &bad_ref)
            .unwrap_err()
            .ends_with("signature for another digest")
    );
    // matchExact needs a signed tag, which a bundle does not name.
    let exact = f.policy(&f.key, Some(r#"{"type":"matchExact"}"#));
    assert!(
        f.cat(&exact, &format!("{}:{TAG}", f.name(REPO)))
            .unwrap_err()
            .ends_with("identity mismatch")
    );
}

#[test]
fn reject_insecure_accept_anything_and_keyless_policies() {
    let f = Fixture::new();
    f.push(REPO, TAG, "plain\n");
    let image = format!("{}:{TAG}", f.name(REPO));
    let accept = write_policy(f.dir.path(), r#"[{"type":"insecureAcceptAnything"}]"#, &[]);
    assert_eq!(f.cat(&accept, &image).unwrap(), "plain\n");
    let reject = write_policy(
        f.dir.path(),
        r#"[{"type":"insecureAcceptAnything"}]"#,
        &[(
            &f.name("team"),
            r#"[{"type":"insecureAcceptAnything"},{"type":"reject"}]"#.to_string(),
        )],
    );
    let err = f.cat(&reject, &image).unwrap_err();
    assert!(
        err.contains(&format!("scope transports.docker[\"{}\"]", f.name("team")))
            && err.ends_with("reject"),
        "{err}"
    );
    let keyless = write_policy(
        f.dir.path(),
        r#"[{"type":"sigstoreSigned","fulcio":{"caPath":"/x","oidcIssuer":"https://o","subjectEmail":"a@b"},"rekorPublicKeyPath":"/y"}]"#,
        &[],
    );
    let err = f.cat(&keyless, &image).unwrap_err();
    assert!(
        err.contains("needs the network and is out of scope"),
        "{err}"
    );
    // An explicit policy file that is missing is an error, as in skopeo.
    let out = f
        .env
        .run(&["--policy", "/nonexistent/policy.json", "ls", &image]);
    assert!(
        !out.status.success(),
        "an explicit missing policy must fail"
    );
}

#[test]
fn a_signed_gzip_index_is_trusted_only_for_the_policy_key() {
    let f = Fixture::new();
    let img = f.push(REPO, TAG, "indexed\n");
    let image = format!("{}:{TAG}", f.name(REPO));
    // The image itself is signed by both keys, so either policy admits it;
    // only the index's signature differs.
    sign::sign(&f.reg, REPO, &img.manifest_digest, &image, &f.key);
    sign::sign(&f.reg, REPO, &img.manifest_digest, &image, &f.other);
    let key_file = f.dir.path().join("cosign.key");
    std::fs::write(
        &key_file,
        f.key
            .encrypt(b"pw", rimg::trust::keys::SIGSTORE_PRIVATE_KEY)
            .unwrap(),
    )
    .unwrap();
    let pass = f.dir.path().join("pass");
    std::fs::write(&pass, "pw\n").unwrap();
    let out = f.env.ok(&[
        "index",
        "push",
        &image,
        "--sign-by-sigstore-private-key",
        key_file.to_str().unwrap(),
        "--sign-passphrase-file",
        pass.to_str().unwrap(),
    ]);
    let artifact = out
        .lines()
        .find_map(|l| l.strip_prefix("pushed "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no pushed line: {out}"))
        .to_string();
    assert!(out.contains("signed "), "{out}");
    assert!(sign::artifact_signed(
        &f.reg,
        REPO,
        &artifact,
        &f.policy(&f.key, None)
    ));
    assert!(!sign::artifact_signed(
        &f.reg,
        REPO,
        &artifact,
        &f.policy(&f.other, None)
    ));
    let accept = write_policy(f.dir.path(), r#"[{"type":"insecureAcceptAnything"}]"#, &[]);
    assert!(!sign::artifact_signed(&f.reg, REPO, &artifact, &accept));
    // Another machine (a fresh cache): the policy's key signed the index, so
    // the layer is read by range through it; under the other key's policy
    // the index is ignored and the layer read whole. Same bytes either way.
    let rd = f.registries_d.display().to_string();
    for (key, used) in [(&f.key, true), (&f.other, false)] {
        let p = f.policy(key, None).display().to_string();
        let out = Env::new().run(&[
            "cat",
            "-v",
            "--policy",
            &p,
            "--registries.d",
            &rd,
            &image,
            "/etc/motd",
        ]);
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{log}");
        assert_eq!(out.stdout, b"indexed\n");
        assert_eq!(
            log.contains("is trusted (signed by a trusted key)"),
            used,
            "{log}"
        );
        assert_eq!(
            log.contains("ignored: it was not built in this cache"),
            !used,
            "{log}"
        );
    }
}

#[test]
fn an_accepted_mount_stays_on_the_verified_digest_when_the_tag_moves() {
    let f = Fixture::new();
    let img = f.push(REPO, TAG, "verified\n");
    let image = format!("{}:{TAG}", f.name(REPO));
    sign::sign(&f.reg, REPO, &img.manifest_digest, &image, &f.key);
    let (p, rd) = (
        f.policy(&f.key, None).display().to_string(),
        f.registries_d.display().to_string(),
    );
    let m = common::Mounted::new(&f.env, &image, &["--policy", &p, "--registries.d", &rd]);
    f.push(REPO, TAG, "moved!!!\n");
    assert_eq!(
        std::fs::read_to_string(m.path.join("etc/motd")).unwrap(),
        "verified\n"
    );
}
