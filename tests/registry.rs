//! The registry client end to end: the real binary against real registries on
//! loopback, in every auth mode.

mod common;

use std::time::Duration;

use common::image::{
    Compress, LayerBuilder, layer_blob, push_alpine, push_image, push_index, push_manifest,
};
use common::proxy::RedirectProxy;
use common::token::TokenServer;
use common::*;

fn inspect(env: &Env, reference: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["inspect"];
    args.extend_from_slice(extra);
    args.push(reference);
    serde_json::from_str(&env.ok(&args)).unwrap()
}

#[test]
fn inspect_prints_reference_platform_config_and_layers() {
    let reg = Registry::start(Auth::None);
    let p = push_alpine(&reg, "library/alpine", "3.10", "3.10.9", "amd64", false);
    let env = Env::new();
    let v = inspect(&env, &format!("{}/library/alpine:3.10", reg.addr()), &[]);
    assert_eq!(v["reference"]["registry"], reg.addr());
    assert_eq!(v["reference"]["repository"], "library/alpine");
    assert_eq!(v["reference"]["tag"], "3.10");
    assert_eq!(v["manifest"]["digest"], p.manifest_digest);
    assert_eq!(v["manifest"]["mediaType"], p.media_type);
    assert_eq!(v["platform"], "linux/amd64");
    assert_eq!(v["config"]["digest"], p.config_digest);
    assert_eq!(v["config"]["cmd"][0], "/bin/sh");
    assert_eq!(v["config"]["workingDir"], "/root");
    assert_eq!(v["config"]["labels"]["org.example.test"], "yes");
    assert_eq!(v["config"]["history"][0]["created_by"], "layer 0");
    assert_eq!(v["layers"][0]["digest"], p.layers[0]);
}

#[test]
fn inspect_raw_prints_the_manifest_bytes_as_served() {
    let reg = Registry::start(Auth::None);
    let p = push_alpine(&reg, "a/b", "t", "3.20.3", "amd64", true);
    let env = Env::new();
    let out = env.run(&["inspect", "--raw", &format!("{}/a/b:t", reg.addr())]);
    assert!(out.status.success());
    assert_eq!(out.stdout, p.manifest);
}

#[test]
fn manifest_list_resolves_to_the_host_or_requested_platform_skipping_attestations() {
    let reg = Registry::start(Auth::None);
    for oci in [false, true] {
        let amd = push_alpine(&reg, "multi", "amd", "3.10.9", "amd64", oci);
        let arm = push_alpine(&reg, "multi", "arm", "3.10.9", "arm64/v8", oci);
        let index = push_index(
            &reg,
            "multi",
            "latest",
            &[("linux/amd64", &amd), ("linux/arm64/v8", &arm)],
            oci,
        );
        let env = Env::new();
        let r = format!("{}/multi:latest", reg.addr());
        let v = inspect(&env, &r, &["--platform", "linux/arm64"]);
        assert_eq!(v["manifest"]["digest"], arm.manifest_digest);
        assert_eq!(v["platform"], "linux/arm64/v8");
        assert_eq!(v["index"]["digest"], index);
        let v = inspect(&env, &r, &["--platform", "linux/amd64"]);
        assert_eq!(v["manifest"]["digest"], amd.manifest_digest);
        let err = env.fails(&["inspect", "--platform", "linux/s390x", &r]);
        assert!(
            err.contains("linux/s390x") && err.contains("linux/amd64, linux/arm64/v8"),
            "{err}"
        );
        assert!(
            !err.contains("unknown"),
            "attestations must not be offered: {err}"
        );
    }
}

#[test]
fn digest_references_are_verified_and_win_over_tags() {
    let reg = Registry::start(Auth::None);
    let p = push_alpine(&reg, "x", "one", "3.10.9", "amd64", false);
    push_alpine(&reg, "x", "two", "3.20.3", "amd64", false);
    let env = Env::new();
    let v = inspect(
        &env,
        &format!("{}/x:two@{}", reg.addr(), p.manifest_digest),
        &[],
    );
    assert_eq!(v["manifest"]["digest"], p.manifest_digest);
}

#[test]
fn unknown_tag_reports_the_registry_error_code_and_reference() {
    let reg = Registry::start(Auth::None);
    push_alpine(&reg, "library/alpine", "3.10", "3.10.9", "amd64", false);
    let env = Env::new();
    let r = format!("{}/library/alpine:3.99", reg.addr());
    let err = env.fails(&["inspect", &r]);
    assert!(
        err.contains("MANIFEST_UNKNOWN") && err.contains(&r),
        "{err}"
    );
    let err = env.fails(&["inspect", &format!("{}/nope/nope:1", reg.addr())]);
    assert!(err.contains("UNKNOWN"), "{err}");
}

#[test]
fn unreachable_registry_and_bad_references_fail_with_one_line() {
    let env = Env::new();
    let port = dead_port();
    let err = env.fails(&["inspect", &format!("127.0.0.1:{port}/a:b")]);
    assert!(
        err.contains(&format!("127.0.0.1:{port}")) && err.contains("reach"),
        "{err}"
    );
    let err = env.fails(&["inspect", "UPPER/Case"]);
    assert!(err.contains("lowercase"), "{err}");
    let err = env.fails(&["inspect", "a@sha256:1234"]);
    assert!(err.contains("digest"), "{err}");
}

#[test]
fn tags_are_listed_across_link_pages() {
    let reg = Registry::start(Auth::None);
    let p = push_alpine(&reg, "many", "t0", "3.10.9", "amd64", false);
    // The same manifest under more tags than one page holds.
    for i in 1..205 {
        push_manifest(&reg, "many", &format!("t{i}"), &p.media_type, &p.manifest);
    }
    let env = Env::new();
    let out = env.ok(&["tags", &format!("{}/many", reg.addr())]);
    let tags: Vec<&str> = out.lines().collect();
    assert_eq!(tags.len(), 205, "{:?}", &tags[..5]);
    assert!(tags.contains(&"t204"));
}

#[test]
fn basic_auth_private_repository_needs_credentials() {
    let reg = Registry::start(Auth::Basic);
    push_alpine(&reg, "private/app", "1", "3.10.9", "amd64", false);
    let r = format!("{}/private/app:1", reg.addr());
    let env = Env::new();
    let err = env.fails(&["inspect", &r]);
    assert!(
        err.contains("authentication") && err.contains("credentials"),
        "{err}"
    );

    // --username with --password-stdin
    let out = env.run_with(
        &["inspect", "--username", USER, "--password-stdin", &r],
        format!("{PASS}\n").as_bytes(),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // a wrong password is refused, and never echoed
    let out = env.run_with(
        &["inspect", "--username", USER, "--password-stdin", &r],
        b"wrong-pass",
        Duration::from_secs(60),
    );
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("wrong-pass"));

    // environment variables
    let env_creds = Env::new()
        .set("RIMG_USERNAME", USER)
        .set("RIMG_PASSWORD", PASS);
    env_creds.ok(&["inspect", &r]);
}

#[test]
fn credentials_come_from_podman_and_docker_auth_files_and_helpers() {
    let reg = Registry::start(Auth::Basic);
    push_alpine(&reg, "private/app", "1", "3.10.9", "amd64", false);
    let r = format!("{}/private/app:1", reg.addr());
    let auth = b64(format!("{USER}:{PASS}").as_bytes());

    // REGISTRY_AUTH_FILE (podman/skopeo)
    let env = Env::new();
    let file = env.dir.path().join("auth.json");
    std::fs::write(
        &file,
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, reg.addr()),
    )
    .unwrap();
    let env = env.set("REGISTRY_AUTH_FILE", &file.display().to_string());
    env.ok(&["inspect", &r]);

    // $XDG_RUNTIME_DIR/containers/auth.json
    let env = Env::new();
    let run = env.dir.path().join("run/containers");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(
        run.join("auth.json"),
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, reg.addr()),
    )
    .unwrap();
    env.ok(&["inspect", &r]);

    // docker config.json auths
    let env = Env::new();
    let docker = env.dir.path().join("docker");
    std::fs::create_dir_all(&docker).unwrap();
    std::fs::write(
        docker.join("config.json"),
        format!(
            r#"{{"auths":{{"http://{}/":{{"auth":"{auth}"}}}}}}"#,
            reg.addr()
        ),
    )
    .unwrap();
    env.ok(&["inspect", &r]);

    // credHelpers and credsStore run docker-credential-NAME get
    for key in ["credHelpers", "credsStore"] {
        let env = Env::new();
        let bin = env.dir.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let helper = bin.join("docker-credential-rimgtest");
        std::fs::write(
            &helper,
            format!(
                "#!/bin/sh\nread server\n[ \"$server\" = \"{}\" ] || {{ echo 'credentials not found in native keychain'; exit 1; }}\necho '{{\"ServerURL\":\"'$server'\",\"Username\":\"{USER}\",\"Secret\":\"{PASS}\"}}'\n",
                reg.addr()
            ),
        )
        .unwrap();
        std::os::unix::fs::PermissionsExt::set_mode(
            &mut std::fs::metadata(&helper).unwrap().permissions(),
            0o755,
        );
        std::fs::set_permissions(&helper, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let docker = env.dir.path().join("docker");
        std::fs::create_dir_all(&docker).unwrap();
        let cfg = if key == "credHelpers" {
            format!(r#"{{"credHelpers":{{"{}":"rimgtest"}}}}"#, reg.addr())
        } else {
            r#"{"credsStore":"rimgtest"}"#.to_string()
        };
        std::fs::write(docker.join("config.json"), cfg).unwrap();
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
        let env = env.set("PATH", &path);
        let mut cmd = env.command(&["inspect", &r]);
        cmd.env("PATH", &path);
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn token_auth_allows_anonymous_public_pulls_and_refuses_private_ones() {
    let reg = Registry::start(Auth::Token(TokenServer::start(&["public/app"], 60)));
    push_alpine(&reg, "public/app", "1", "3.10.9", "amd64", false);
    push_alpine(&reg, "private/app", "1", "3.10.9", "amd64", false);
    let env = Env::new();
    env.ok(&["inspect", &format!("{}/public/app:1", reg.addr())]);
    let private = format!("{}/private/app:1", reg.addr());
    let err = env.fails(&["inspect", &private]);
    assert!(err.contains("authentication"), "{err}");
    let creds = Env::new()
        .set("RIMG_USERNAME", USER)
        .set("RIMG_PASSWORD", PASS);
    creds.ok(&["inspect", &private]);
    let bad = Env::new()
        .set("RIMG_USERNAME", USER)
        .set("RIMG_PASSWORD", "nope");
    let err = bad.fails(&["inspect", &private]);
    assert!(
        err.contains("authentication") && !err.contains("nope"),
        "{err}"
    );
}

#[test]
fn identity_token_from_docker_config_is_exchanged_with_an_oauth2_post() {
    let tokens = TokenServer::start(&[], 60);
    let reg = Registry::start(Auth::Token(tokens));
    push_alpine(&reg, "private/app", "1", "3.10.9", "amd64", false);
    let env = Env::new();
    let docker = env.dir.path().join("docker");
    std::fs::create_dir_all(&docker).unwrap();
    std::fs::write(
        docker.join("config.json"),
        format!(
            r#"{{"auths":{{"{}":{{"auth":"","identitytoken":"{}"}}}}}}"#,
            reg.addr(),
            token::REFRESH_TOKEN
        ),
    )
    .unwrap();
    env.ok(&["inspect", &format!("{}/private/app:1", reg.addr())]);
    let Auth::Token(t) = &reg.auth else {
        unreachable!()
    };
    assert!(
        t.posts() >= 1,
        "the identity token must go through the POST form"
    );
}

#[test]
fn a_token_that_expires_mid_session_is_renewed() {
    let reg = Registry::start(Auth::Token(TokenServer::start(&["public/app"], 2)));
    push_alpine(&reg, "public/app", "1", "3.10.9", "amd64", false);
    let env = Env::new();
    let m = Mounted::new(&env, &format!("{}/public/app:1", reg.addr()), &[]);
    let Auth::Token(t) = &reg.auth else {
        unreachable!()
    };
    let before = t.requests();
    // Outlive the token, then make the mount fetch the layer.
    std::thread::sleep(Duration::from_secs(3));
    let os = std::fs::read_to_string(m.path.join("etc/os-release")).unwrap();
    assert!(os.contains("3.10.9"));
    assert!(
        t.requests() > before,
        "a fresh token must have been fetched"
    );
}

#[test]
fn blob_redirects_to_another_host_carry_no_authorization() {
    let reg = Registry::start(Auth::Basic);
    let p = push_alpine(&reg, "private/app", "1", "3.10.9", "amd64", false);
    let proxy = RedirectProxy::start(&reg);
    let env = Env::new()
        .set("RIMG_USERNAME", USER)
        .set("RIMG_PASSWORD", PASS);
    let r = format!("{}/private/app:1", proxy.addr());
    let out = env.ok(&["cat", &r, "/etc/os-release"]);
    assert!(out.contains("3.10.9"));
    assert!(
        proxy.redirected() >= 1,
        "blob GETs must have been redirected"
    );
    assert!(proxy.cdn_requests() >= 1);
    assert!(
        !proxy.cdn_saw_authorization(),
        "Authorization leaked to the other host"
    );
    assert!(
        proxy.registry_saw_authorization(),
        "the registry itself must get credentials"
    );
    let _ = p;
}

#[test]
fn a_corrupted_blob_fails_verification_and_leaves_nothing_cached() {
    let reg = Registry::start(Auth::None);
    let p = push_alpine(&reg, "c/app", "1", "3.10.9", "amd64", false);
    let file = reg.blob_file(&p.layers[0]);
    let mut data = std::fs::read(&file).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    std::fs::write(&file, data).unwrap();
    let env = Env::new();
    let err = env.fails(&["cat", &format!("{}/c/app:1", reg.addr()), "/etc/os-release"]);
    assert!(err.contains(&p.layers[0]), "{err}");
    // Each thing once: the layer, the digest, what went wrong.
    assert_eq!(err.matches(&p.layers[0]).count(), 1, "{err}");
    assert!(err.contains("downloaded 3 times"), "{err}");
    assert!(
        err.contains("digest")
            || err.contains("gzip")
            || err.contains("corrupt")
            || err.contains("invalid"),
        "{err}"
    );
    let cached: Vec<_> = walk_files(&env.cache_dir().join("layers"));
    assert!(cached.is_empty(), "nothing may be cached: {cached:?}");
    assert!(walk_files(&env.cache_dir().join("blobs")).is_empty());
}

#[test]
fn mirrors_are_tried_first_and_fall_back_to_the_registry() {
    let upstream = Registry::start(Auth::None);
    push_alpine(
        &upstream,
        "library/alpine",
        "3.10",
        "3.10.9",
        "amd64",
        false,
    );
    let mirror = Registry::proxy_of(&upstream);
    let r = format!("{}/library/alpine:3.10", upstream.addr());
    let env = Env::new();
    env.ok(&[
        "--mirror",
        &format!("{}={}", upstream.addr(), mirror.url()),
        "cat",
        &r,
        "/etc/os-release",
    ]);
    // The pull-through cache stored what it served.
    assert!(
        !walk_files(&mirror.dir.path().join("data")).is_empty(),
        "the mirror was not used"
    );

    // A dead mirror first: rimg falls back to the next mirror, then upstream.
    let dead = format!("http://127.0.0.1:{}", dead_port());
    let env = Env::new().set("RIMG_MIRRORS", &format!("{}={dead}", upstream.addr()));
    let out = env.ok(&["cat", &r, "/etc/alpine-release"]);
    assert_eq!(out.trim(), "3.10.9");
}

/// registries.conf as podman reads it (here through CONTAINERS_REGISTRIES_CONF):
/// a `[[registry.mirror]]` serves the pull, `--mirror` comes before it, a
/// blocked registry is refused (as skopeo, with the same containers/image
/// code as podman, refuses it given the file by `--registries-conf`), a `prefix` is rewritten to its `location`,
/// and a short name goes to the unqualified-search registry.
#[test]
fn registries_conf_mirrors_blocks_rewrites_and_short_names_as_podman_does() {
    let upstream = Registry::start(Auth::None);
    for repo in ["library/alpine", "rimgtest/app"] {
        push_alpine(&upstream, repo, "3.10", "3.10.9", "amd64", false);
    }
    let mirror = Registry::proxy_of(&upstream);
    let flag_mirror = Registry::proxy_of(&upstream);
    let blocked = Registry::start(Auth::None);
    push_alpine(&blocked, "a", "1", "3.10.9", "amd64", false);
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("registries.conf");
    std::fs::write(
        &conf,
        format!(
            r#"unqualified-search-registries = ["{up}"]

[[registry]]
location = "{up}"
insecure = true
[[registry.mirror]]
location = "{mirror}"

[[registry]]
location = "{blocked}"
blocked = true

[[registry]]
prefix = "rewritten.example/team"
location = "{up}/library"
"#,
            up = upstream.addr(),
            mirror = mirror.addr(),
            blocked = blocked.addr()
        ),
    )
    .unwrap();
    let conf_s = conf.display().to_string();
    let env = Env::new().set("CONTAINERS_REGISTRIES_CONF", &conf_s);
    // What a pull-through cache stored (its scheduler's state file aside,
    // which it rewrites on its own time).
    let files = |r: &Registry| {
        walk_files(&r.dir.path().join("data"))
            .iter()
            .filter(|p| !p.ends_with("scheduler-state.json"))
            .count()
    };

    let r = format!("{}/library/alpine:3.10", upstream.addr());
    assert_eq!(env.ok(&["cat", &r, "/etc/alpine-release"]).trim(), "3.10.9");
    assert!(
        files(&mirror) > 0,
        "the registries.conf mirror was not used"
    );

    // --mirror first: a fresh cache pulls through the flag's mirror.
    let env2 = Env::new().set("CONTAINERS_REGISTRIES_CONF", &conf_s);
    let before = files(&mirror);
    let flag = format!("{}={}", upstream.addr(), flag_mirror.url());
    env2.ok(&["--mirror", &flag, "cat", &r, "/etc/alpine-release"]);
    assert!(files(&flag_mirror) > 0, "--mirror was not used first");
    assert_eq!(
        files(&mirror),
        before,
        "the file's mirror was asked before --mirror"
    );

    // Blocked, for rimg as for skopeo reading the same file.
    let b = format!("{}/a:1", blocked.addr());
    let err = env.fails(&["cat", &b, "/etc/alpine-release"]);
    assert!(err.contains("blocked") && err.contains(&conf_s), "{err}");
    let skopeo = std::process::Command::new("skopeo")
        .args([
            "--registries-conf",
            &conf_s,
            "inspect",
            "--tls-verify=false",
        ])
        .arg(format!("docker://{b}"))
        .output()
        .unwrap();
    assert!(!skopeo.status.success());
    assert!(String::from_utf8_lossy(&skopeo.stderr).contains("blocked"));
    // Without the file the same image is there.
    assert_eq!(
        Env::new().ok(&["cat", &b, "/etc/alpine-release"]).trim(),
        "3.10.9"
    );

    // A prefix rewritten to its location (skopeo agrees), and a short name
    // searched in the unqualified-search registry (skopeo's docker://
    // normalises as docker does; podman pull searches, as rimg does).
    let rewritten = "rewritten.example/team/alpine:3.10";
    assert_eq!(
        env.ok(&["cat", rewritten, "/etc/alpine-release"]).trim(),
        "3.10.9"
    );
    let skopeo = std::process::Command::new("skopeo")
        .args([
            "--registries-conf",
            &conf_s,
            "inspect",
            "--no-tags",
            "--tls-verify=false",
        ])
        .arg(format!("docker://{rewritten}"))
        .output()
        .unwrap();
    assert!(
        skopeo.status.success(),
        "{}",
        String::from_utf8_lossy(&skopeo.stderr)
    );
    assert_eq!(
        env.ok(&["cat", "rimgtest/app:3.10", "/etc/alpine-release"])
            .trim(),
        "3.10.9"
    );
}

fn walk_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_broken_blob_download_resumes_with_a_range_request() {
    let reg = Registry::start(Auth::None);
    push_alpine(&reg, "a", "1", "3.10.9", "amd64", false);
    let flaky = RedirectProxy::start_flaky(&reg, 1 << 20);
    let env = Env::new();
    let out = env.ok(&[
        "cat",
        &format!("{}/a:1", flaky.addr()),
        "/etc/alpine-release",
    ]);
    assert_eq!(out.trim(), "3.10.9");
    assert_eq!(
        flaky.range_requests(),
        1,
        "the download must resume, not restart"
    );
}

#[test]
fn https_registries_need_a_trusted_certificate() {
    let reg = Registry::start_tls();
    push_alpine(&reg, "a", "1", "3.10.9", "amd64", false);
    let r = format!("{}/a:1", reg.addr());
    let env = Env::new();
    let err = env.fails(&["inspect", &r]);
    assert!(err.contains("TLS") && err.contains(&reg.addr()), "{err}");
    let ca = reg.tls_cert.as_ref().unwrap().display().to_string();
    env.ok(&["inspect", "--ca-cert", &ca, &r]);
    env.ok(&["inspect", "--insecure", &r]);
    let err = env.fails(&["inspect", "--ca-cert", "/nonexistent.pem", &r]);
    assert!(err.contains("/nonexistent.pem"), "{err}");
}

#[test]
fn server_errors_and_rate_limits_are_retried_then_reported() {
    let reg = Registry::start(Auth::None);
    push_alpine(&reg, "a", "1", "3.10.9", "amd64", false);
    let front = RedirectProxy::start(&reg);
    let r = format!("{}/a:1", front.addr());
    let env = Env::new();
    front.refuse_next(3);
    let started = std::time::Instant::now();
    env.ok(&["inspect", &r]);
    assert_eq!(front.refused(), 3);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After must be honoured"
    );
    // Past the bounded number of tries: a clear error, not an endless loop.
    front.refuse_next(1000);
    let env = Env::new();
    let err = env.fails(&["inspect", &r]);
    assert!(
        err.contains("503") || err.contains("429") || err.contains("HTTP"),
        "{err}"
    );
    assert!(
        front.refused() < 20,
        "tries must be bounded: {}",
        front.refused()
    );
}

#[test]
fn a_layer_whose_diff_id_is_wrong_is_refused_by_every_command_and_eio_in_a_mount() {
    let reg = Registry::start(Auth::None);
    let tar = LayerBuilder::new()
        .file("etc/os-release", b"NAME=bad\n", 0o644)
        .finish();
    let mut blob = layer_blob(&tar, Compress::Gzip, true);
    let actual = blob.diff_id.clone();
    let wrong = format!("sha256:{}", "1".repeat(64));
    blob.diff_id = wrong.clone();
    let p = push_image(&reg, "bad/diffid", "1", &[blob], "amd64", true);
    let r = format!("{}/bad/diffid:1", reg.addr());
    let env = Env::new();
    let out = env.dir.path().join("out.tar");
    let out = out.display().to_string();
    for args in [
        vec!["ls", r.as_str()],
        vec!["cat", r.as_str(), "/etc/os-release"],
        vec!["export", r.as_str(), out.as_str()],
    ] {
        let err = env.fails(&args);
        assert!(
            err.contains("layer 0 of")
                && err.contains(&p.layers[0])
                && err.contains(&wrong)
                && err.contains(&actual),
            "{args:?}: {err}"
        );
        assert_eq!(err.matches(&p.layers[0]).count(), 1, "said once: {err}");
        assert!(walk_files(&env.cache_dir().join("layers")).is_empty());
    }
    assert!(!std::path::Path::new(&out).exists());
    // mount --prefetch refuses as well.
    let mnt = tempfile::tempdir().unwrap();
    let m = mnt.path().display().to_string();
    let err = env.fails(&["mount", "--foreground", "--prefetch", &r, &m]);
    assert!(err.contains(&wrong), "{err}");
    assert!(!is_mountpoint(mnt.path()));
    // Without --prefetch the mount comes up, and reading the layer fails with EIO.
    let mounted = Mounted::new(&env, &r, &[]);
    let e = std::fs::read(mounted.path.join("etc/os-release")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    let _ = env.run(&["umount", &mounted.path.display().to_string()]);
}

#[test]
fn cache_verify_removes_a_damaged_layer_and_the_next_use_fetches_it_again() {
    let reg = Registry::start(Auth::None);
    let p = push_alpine(&reg, "v/app", "1", "3.10.9", "amd64", false);
    let r = format!("{}/v/app:1", reg.addr());
    let env = Env::new();
    let before = env.ok(&["cat", &r, "/etc/os-release"]);
    assert!(
        env.ok(&["cache", "verify"])
            .contains("1 layers checked, 0 corrupt")
    );
    let hex = p.layers[0].trim_start_matches("sha256:");
    let tar = env
        .cache_dir()
        .join("layers/sha256")
        .join(format!("{hex}.tar"));
    let mut bytes = std::fs::read(&tar).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    std::fs::write(&tar, bytes).unwrap();
    let out = env.run(&["cache", "verify"]);
    assert!(!out.status.success(), "corruption makes verify fail");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&p.layers[0]) && stdout.contains("removed"),
        "{stdout}"
    );
    assert!(!tar.exists());
    assert_eq!(env.ok(&["cat", &r, "/etc/os-release"]), before);
    assert!(env.ok(&["cache", "verify"]).contains("0 corrupt"));
}

mod reference_grammar {
    use proptest::prelude::*;
    use rimg::reference::Reference;

    /// Docker's grammar: lowercase components joined by `.`, `_`, `__` or dashes.
    fn component() -> impl Strategy<Value = String> {
        "[a-z0-9]{1,6}([._-][a-z0-9]{1,6}){0,2}"
    }

    fn registry() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9]{1,8}\\.[a-z]{2,5}",
            "[a-z0-9]{1,8}\\.[a-z]{2,5}:[1-9][0-9]{0,4}",
            Just("localhost:5000".to_string()),
            Just("127.0.0.1:5000".to_string()),
        ]
    }

    proptest! {
        #[test]
        fn any_string_parses_or_fails_without_panicking(s in ".{0,300}") {
            let _ = Reference::parse(&s);
        }

        #[test]
        fn a_valid_reference_survives_printing_and_parsing_again(
            reg in registry(),
            path in proptest::collection::vec(component(), 1..4),
            tag in proptest::option::of("[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}"),
            digest in proptest::option::of("[0-9a-f]{64}"),
        ) {
            let mut s = format!("{reg}/{}", path.join("/"));
            if let Some(t) = &tag {
                s += &format!(":{t}");
            }
            if let Some(d) = &digest {
                s += &format!("@sha256:{d}");
            }
            let r = Reference::parse(&s).unwrap();
            prop_assert_eq!(&r.registry, &reg);
            prop_assert_eq!(&r.repository, &path.join("/"));
            prop_assert_eq!(r.digest.clone(), digest.map(|d| format!("sha256:{d}")));
            let again = Reference::parse(&r.to_string()).unwrap();
            prop_assert_eq!(again.to_string(), r.to_string());
        }
    }
}

#[test]
fn a_refused_connection_fails_in_one_line_within_three_seconds() {
    let env = Env::new();
    let r = format!("127.0.0.1:{}/x:y", dead_port());
    let started = std::time::Instant::now();
    let out = env.run(&["ls", &r]);
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(took < Duration::from_secs(3), "took {took:?}: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("connection refused"), "{err}");
}

#[test]
fn a_registry_without_a_repository_or_a_file_without_its_prefix_says_what_to_type() {
    let env = Env::new();
    let err = env.fails(&["tags", "127.0.0.1:5000"]);
    assert!(err.contains("127.0.0.1:5000/REPOSITORY"), "{err}");
    let tar = env.dir.path().join("a.tar");
    std::fs::write(&tar, b"").unwrap();
    let err = env.fails(&["ls", &tar.display().to_string()]);
    assert!(
        err.contains(&format!("docker-archive:{}", tar.display())),
        "{err}"
    );
    let err = env.fails(&["ls", "http://127.0.0.1:5000/a/b"]);
    assert!(err.contains("--plain-http"), "{err}");
}
