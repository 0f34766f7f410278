//! The forensic commands (`log`, `deleted`, `cat --layer`, `diff`, `grep`)
//! on images whose history the tests wrote, and against umoci's unpacks,
//! `diff -rq` and `grep -rl`.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use common::image::{
    Blob, Compress, LayerBuilder, Pushed, layer_blob, push_alpine, push_image, sha256,
};
use common::*;

const SECRET: &str = "AKIA-LEAKED-0123456789";

/// Four layers with a history we know:
/// 0 adds etc/app.conf (v1), a secret, o/old and etc/tool;
/// 1 modifies app.conf, whites out the secret;
/// 2 whites out app.conf, makes o opaque with o/new;
/// 3 adds app.conf again (v3) and changes only etc/tool's mode.
fn push_history(reg: &Registry, repo: &str) -> Pushed {
    let l0 = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/app.conf", b"version=1\n", 0o644)
        .file("etc/tool", b"#!/bin/sh\n", 0o644)
        .dir("secrets", 0o700)
        .file("secrets/key", format!("{SECRET}\n").as_bytes(), 0o600)
        .dir("o", 0o755)
        .file("o/old", b"old\n", 0o644)
        .finish();
    let l1 = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/app.conf", b"version=2\n", 0o644)
        .whiteout("secrets/key")
        .finish();
    let l2 = LayerBuilder::new()
        .whiteout("etc/app.conf")
        .dir("o", 0o755)
        .opaque("o")
        .file("o/new", b"new\n", 0o644)
        .finish();
    let l3 = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/app.conf", b"version=3\n", 0o640)
        .file("etc/tool", b"#!/bin/sh\n", 0o755)
        .finish();
    let blobs: Vec<Blob> = [l0, l1, l2, l3]
        .iter()
        .map(|t| layer_blob(t, Compress::Gzip, true))
        .collect();
    push_image(reg, repo, "v1", &blobs, "amd64", true)
}

fn json_lines(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

#[test]
fn log_tells_every_layer_that_touched_a_path_and_how() {
    let reg = Registry::start(Auth::None);
    let p = push_history(&reg, "hist");
    let env = Env::new();
    let r = format!("{}/hist:v1", reg.addr());
    let recs = json_lines(&env.ok(&["log", "--json", &r, "/etc/app.conf"]));
    let got: Vec<(u64, &str)> = recs
        .iter()
        .map(|v| (v["layer"].as_u64().unwrap(), v["action"].as_str().unwrap()))
        .collect();
    assert_eq!(
        got,
        [(0, "added"), (1, "modified"), (2, "removed"), (3, "added")]
    );
    assert_eq!(recs[0]["digest"], p.layers[0].as_str());
    assert_eq!(recs[0]["created_by"], "layer 0");
    assert_eq!(recs[1]["path"], "/etc/app.conf");
    assert_eq!(
        recs[1]["sha256"],
        sha256(b"version=2\n").trim_start_matches("sha256:")
    );
    assert_eq!(recs[3]["mode"], "0640");
    assert!(recs[2]["sha256"].is_null());
    // Mode only: metadata. Opaque directory: hidden.
    let tool = json_lines(&env.ok(&["log", "--json", &r, "/etc/tool"]));
    assert_eq!(tool.last().unwrap()["action"], "metadata");
    let o = json_lines(&env.ok(&["log", "--json", "-R", &r, "/o"]));
    let old: Vec<&str> = o
        .iter()
        .filter(|v| v["path"] == "/o/old")
        .map(|v| v["action"].as_str().unwrap())
        .collect();
    assert_eq!(old, ["added", "hidden"]);
    // The text form names the layer and the action on each line.
    let text = env.ok(&["log", &r, "/etc/app.conf"]);
    assert_eq!(text.lines().count(), 4, "{text}");
    assert!(text.lines().nth(2).unwrap().contains("removed"), "{text}");
}

#[test]
fn deleted_finds_the_whited_out_secret_and_cat_layer_recovers_it() {
    let reg = Registry::start(Auth::None);
    push_history(&reg, "hist");
    let env = Env::new();
    let r = format!("{}/hist:v1", reg.addr());
    let list = json_lines(&env.ok(&["deleted", "--json", &r]));
    let key = list
        .iter()
        .find(|v| v["path"] == "/secrets/key")
        .expect("the secret is listed");
    assert_eq!(
        (&key["layer"], &key["hidden_by"], &key["how"]),
        (&0.into(), &1.into(), &"whiteout".into())
    );
    let rows: BTreeSet<(String, u64, u64, String)> = list
        .iter()
        .map(|v| {
            (
                v["path"].as_str().unwrap().to_string(),
                v["layer"].as_u64().unwrap(),
                v["hidden_by"].as_u64().unwrap(),
                v["how"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for want in [
        ("/etc/app.conf", 0, 1, "replaced"),
        ("/etc/app.conf", 1, 2, "whiteout"),
        ("/o/old", 0, 2, "opaque"),
        ("/etc/tool", 0, 3, "replaced"),
    ] {
        let want = (want.0.to_string(), want.1, want.2, want.3.to_string());
        assert!(rows.contains(&want), "{want:?} missing from {rows:?}");
    }
    // The merged tree hides it; one layer still holds the bytes.
    let err = env.fails(&["cat", &r, "/secrets/key"]);
    assert!(err.contains("secrets/key"), "{err}");
    assert_eq!(
        env.ok(&["cat", "--layer", "0", &r, "/secrets/key"]),
        format!("{SECRET}\n")
    );
    let listing = env.ok(&["ls", "--layer", "-3", &r, "/secrets"]);
    assert!(listing.contains(".wh.key"), "{listing}");
}

#[test]
fn grep_searches_without_a_mount_and_deleted_finds_the_leak() {
    let reg = Registry::start(Auth::None);
    push_history(&reg, "hist");
    let env = Env::new();
    let r = format!("{}/hist:v1", reg.addr());
    let out = env.run(&["grep", "AKIA", &r]);
    assert_eq!(out.status.code(), Some(1), "not in the merged tree");
    let out = env.run(&["grep", "--deleted", "AKIA", &r]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("/secrets/key (deleted: layer 0, hidden by 1):AKIA"),
        "{text}"
    );
    let out = env.run(&["grep", "-n", "--layers", "version", &r]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "/etc/app.conf (layer 3):1:version=3\n"
    );
    let out = env.run(&["grep", "-c", "-i", "VERSION", &r, "/etc"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "/etc/app.conf:1\n/etc/tool:0\n",
        "as grep -c: files without a match count 0"
    );
    // A bad pattern is an error: exit 2, one line.
    let out = env.run(&["grep", "(", &r]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
}

fn grep_rl(root: &Path, pattern: &str) -> BTreeSet<String> {
    let out = Command::new("grep")
        .args(["-rlE", pattern, "."])
        .current_dir(root)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim_start_matches('.').to_string())
        .collect()
}

#[test]
fn grep_l_lists_what_grep_rl_lists_over_umocis_unpack() {
    let reg = Registry::start(Auth::None);
    push_alpine(&reg, "alpine", "3.20", "3.20.3", "amd64", true);
    let (_keep, rootfs) = umoci_unpack(&reg, "alpine", "3.20");
    let env = Env::new();
    let r = format!("{}/alpine:3.20", reg.addr());
    for pattern in ["root", "alpine", "^#!/bin/sh", "ELF"] {
        let ours: BTreeSet<String> = env
            .ok(&["grep", "-l", pattern, &r])
            .lines()
            .map(str::to_string)
            .collect();
        let want = grep_rl(&rootfs, pattern);
        assert!(!want.is_empty(), "{pattern} matches something");
        assert_eq!(ours, want, "grep -l {pattern}");
    }
}

/// The output of a `rimg diff` of images that differ, which exits 1 as
/// diff and `git diff --exit-code` do.
fn differing(env: &Env, args: &[&str]) -> String {
    let out = env.run(args);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `diff -rq --no-dereference` of two unpacked trees: top-level only-ins per
/// side, and the paths whose content, target or type differ.
fn diff_rq(a: &Path, b: &Path) -> (BTreeSet<String>, BTreeSet<String>, BTreeSet<String>) {
    let out = Command::new("diff")
        .args(["-rq", "--no-dereference"])
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let (sa, sb) = (a.display().to_string(), b.display().to_string());
    let (mut only_a, mut only_b, mut differ) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Only in ") {
            let (dir, name) = rest.split_once(": ").unwrap();
            let (set, root) = if dir.starts_with(&sb) {
                (&mut only_b, &sb)
            } else {
                (&mut only_a, &sa)
            };
            let dir = dir.strip_prefix(root.as_str()).unwrap();
            set.insert(format!("{}/{name}", dir.trim_end_matches('/')));
        } else {
            // "Files A/x and B/x differ", "Symbolic links ... differ",
            // "File A/x is a ... while file B/x is a ...".
            let a_path = line
                .split_whitespace()
                .find(|w| w.starts_with(&sa))
                .unwrap();
            differ.insert(a_path.strip_prefix(&sa).unwrap().to_string());
        }
    }
    (only_a, only_b, differ)
}

#[test]
fn diff_of_two_alpines_agrees_with_diff_rq_of_their_unpacks() {
    let reg = Registry::start(Auth::None);
    push_alpine(&reg, "alpine", "3.10", "3.10.9", "amd64", true);
    push_alpine(&reg, "alpine", "3.20", "3.20.3", "amd64", true);
    let (_ka, ra) = umoci_unpack(&reg, "alpine", "3.10");
    let (_kb, rb) = umoci_unpack(&reg, "alpine", "3.20");
    let env = Env::new();
    let a = format!("{}/alpine:3.10", reg.addr());
    let b = format!("{}/alpine:3.20", reg.addr());
    let rows = json_lines(&differing(&env, &["diff", "--json", &a, &b]));
    let by = |c: &str| -> BTreeSet<String> {
        rows.iter()
            .filter(|v| v["change"] == c)
            .map(|v| v["path"].as_str().unwrap().to_string())
            .collect()
    };
    let (added, removed) = (by("A"), by("D"));
    let top = |set: &BTreeSet<String>| -> BTreeSet<String> {
        set.iter()
            .filter(|p| {
                let parent = p.rsplit_once('/').map_or("", |(d, _)| d);
                !set.contains(parent)
            })
            .cloned()
            .collect()
    };
    let content: BTreeSet<String> = rows
        .iter()
        .filter(|v| v["change"] == "M")
        .filter(|v| {
            v["what"]
                .as_array()
                .unwrap()
                .iter()
                .any(|w| ["content", "target", "type"].contains(&w.as_str().unwrap()))
        })
        .map(|v| v["path"].as_str().unwrap().to_string())
        .collect();
    let (only_a, only_b, differ) = diff_rq(&ra, &rb);
    assert_eq!(top(&removed), only_a);
    assert_eq!(top(&added), only_b);
    assert_eq!(content, differ);
    // The text form: sorted, one "X /path" per line.
    let text = differing(&env, &["diff", &a, &b]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), rows.len());
    let mut sorted = lines.clone();
    sorted.sort_by_key(|l| l[2..].to_string());
    assert_eq!(lines, sorted);
}

#[test]
fn diff_of_an_image_with_itself_is_empty() {
    let reg = Registry::start(Auth::None);
    push_history(&reg, "hist");
    let env = Env::new();
    let r = format!("{}/hist:v1", reg.addr());
    assert_eq!(env.ok(&["diff", &r, &r]), "", "exit 0: the same");
}

fn cached_layers(env: &Env) -> usize {
    env.ok(&["cache", "ls"])
        .lines()
        .filter(|l| l.starts_with("sha256:"))
        .count()
}

/// Two tags on one two-layer base; the tops touch `top_a` and `top_b`.
fn push_two_tags(reg: &Registry, top_b_extra: bool) {
    let base0 = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/version", b"0\n", 0o644)
        .file("etc/base-only", b"base\n", 0o644)
        .finish();
    let base1 = LayerBuilder::new()
        .dir("usr", 0o755)
        .file("usr/tool", b"tool\n", 0o755)
        .finish();
    let top_a = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/version", b"1\n", 0o644)
        .finish();
    let mut b = LayerBuilder::new();
    b.dir("etc", 0o755).file("etc/version", b"2\n", 0o600);
    if top_b_extra {
        b.file("etc/extra", b"x\n", 0o644);
    }
    let top_b = b.finish();
    let blob = |t: &[u8]| layer_blob(t, Compress::Gzip, true);
    let (b0, b1) = (blob(&base0), blob(&base1));
    push_image(
        reg,
        "two",
        "a",
        &[b0.clone(), b1.clone(), blob(&top_a)],
        "amd64",
        true,
    );
    push_image(reg, "two", "b", &[b0, b1, blob(&top_b)], "amd64", true);
}

#[test]
fn diff_of_two_tags_on_one_base_fetches_only_the_layers_that_differ() {
    let reg = Registry::start(Auth::None);
    push_two_tags(&reg, false);
    let env = Env::new();
    let (a, b) = (
        format!("{}/two:a", reg.addr()),
        format!("{}/two:b", reg.addr()),
    );
    assert_eq!(
        differing(&env, &["diff", "--long", &a, &b]),
        "M /etc/version (mode, content)\n"
    );
    assert_eq!(cached_layers(&env), 2, "the shared base was not fetched");
}

#[test]
fn diff_fetches_the_base_when_one_side_adds_what_the_base_may_hold() {
    // etc/extra is new in b's top; whether it is A or M depends on the base.
    let reg = Registry::start(Auth::None);
    push_two_tags(&reg, true);
    let env = Env::new();
    let (a, b) = (
        format!("{}/two:a", reg.addr()),
        format!("{}/two:b", reg.addr()),
    );
    assert_eq!(
        differing(&env, &["diff", &a, &b]),
        "A /etc/extra\nM /etc/version\n"
    );
    assert_eq!(cached_layers(&env), 4);
}

#[test]
fn forty_layers_each_changing_one_file_give_forty_log_records() {
    let reg = Registry::start(Auth::None);
    let blobs: Vec<Blob> = (0..40)
        .map(|i| {
            let mut l = LayerBuilder::new();
            l.dir("var", 0o755)
                .file("var/counter", format!("{i}\n").as_bytes(), 0o644)
                .file(&format!("var/only-{i}"), b"x\n", 0o644);
            if i > 0 {
                l.whiteout(&format!("var/only-{}", i - 1));
            }
            layer_blob(&l.finish(), Compress::Gzip, true)
        })
        .collect();
    push_image(&reg, "forty", "v1", &blobs, "amd64", true);
    let env = Env::new();
    let r = format!("{}/forty:v1", reg.addr());
    let log = json_lines(&env.ok(&["log", "--json", &r, "/var/counter"]));
    assert_eq!(log.len(), 40);
    assert_eq!(log[0]["action"], "added");
    assert!(log[1..].iter().all(|v| v["action"] == "modified"));
    assert_eq!(log[39]["created_by"], "layer 39");
    let deleted = json_lines(&env.ok(&["deleted", "--json", &r]));
    let whiteouts = deleted.iter().filter(|v| v["how"] == "whiteout").count();
    let replaced = deleted.iter().filter(|v| v["how"] == "replaced").count();
    // var/only-0..38 whited out; var/counter 0..38 replaced (and no
    // directory: each layer only writes var/ again).
    assert_eq!((whiteouts, replaced), (39, 39), "{deleted:?}");
    assert_eq!(env.ok(&["cat", "--layer", "7", &r, "/var/counter"]), "7\n");
}

#[test]
fn diff_of_two_tags_on_one_base_agrees_with_diff_rq() {
    let reg = Registry::start(Auth::None);
    push_two_tags(&reg, true);
    let (_ka, ra) = umoci_unpack(&reg, "two", "a");
    let (_kb, rb) = umoci_unpack(&reg, "two", "b");
    let (only_a, only_b, differ) = diff_rq(&ra, &rb);
    let env = Env::new();
    let (a, b) = (
        format!("{}/two:a", reg.addr()),
        format!("{}/two:b", reg.addr()),
    );
    let rows = json_lines(&differing(&env, &["diff", "--json", &a, &b]));
    let of = |c: &str| -> BTreeSet<String> {
        rows.iter()
            .filter(|v| v["change"] == c)
            .map(|v| v["path"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(of("D"), only_a);
    assert_eq!(of("A"), only_b);
    assert_eq!(of("M"), differ);
}

#[test]
fn diff_on_one_base_sees_a_directory_whited_out_and_made_again() {
    // b's own layers white out etc/ and make it again: etc/base-only, which
    // only the base holds, is gone from b but not from a.
    let reg = Registry::start(Auth::None);
    let base = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/version", b"0\n", 0o644)
        .file("etc/base-only", b"base\n", 0o644)
        .finish();
    let top_a = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/version", b"1\n", 0o644)
        .finish();
    let top_b1 = LayerBuilder::new().whiteout("etc").finish();
    let top_b2 = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/version", b"1\n", 0o644)
        .finish();
    let blob = |t: &[u8]| layer_blob(t, Compress::Gzip, true);
    let b0 = blob(&base);
    push_image(&reg, "wh", "a", &[b0.clone(), blob(&top_a)], "amd64", true);
    push_image(
        &reg,
        "wh",
        "b",
        &[b0, blob(&top_b1), blob(&top_b2)],
        "amd64",
        true,
    );
    let env = Env::new();
    let (a, b) = (
        format!("{}/wh:a", reg.addr()),
        format!("{}/wh:b", reg.addr()),
    );
    assert_eq!(differing(&env, &["diff", &a, &b]), "D /etc/base-only\n");
}

/// GNU grep's output for `grep -r FLAGS etc` in `root`, and its exit code,
/// with `etc/...` made `/etc/...` and the lines sorted (grep -r walks in
/// readdir order).
fn gnu_grep(root: &Path, flags: &[&str]) -> (Vec<String>, Option<i32>) {
    let out = Command::new("grep")
        .arg("-r")
        .args(flags)
        .arg("etc")
        .current_dir(root)
        .env("LC_ALL", "C")
        .output()
        .unwrap();
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            if l.starts_with("etc/") {
                format!("/{l}")
            } else {
                l.to_string()
            }
        })
        .collect();
    lines.sort();
    (lines, out.status.code())
}

#[test]
fn grep_flags_mean_what_gnu_grep_means_over_umocis_unpack() {
    let reg = Registry::start(Auth::None);
    push_alpine(&reg, "alpine", "3.20", "3.20.3", "amd64", true);
    let (_keep, rootfs) = umoci_unpack(&reg, "alpine", "3.20");
    let env = Env::new();
    let r = format!("{}/alpine:3.20", reg.addr());
    let cases: &[&[&str]] = &[
        &["-v", "root"],
        &["-w", "root"],
        &["-x", "root:x:0:0:root:/root:/bin/sh"],
        &["-o", "-n", "-E", "ro+t"],
        &["-c", "-v", "#"],
        &["-L", "root"],
        &["-l", "-e", "root", "-e", "alpine"],
        &["-n", "-C", "1", "nobody"],
        &["-A", "2", "-B", "1", "daemon"],
        &["-h", "-i", "ALPINE"],
        &["--include=*.conf", "-l", "a"],
        &["--exclude=*.conf", "-l", "a"],
        &["-F", "-c", "a.b"],
        &["-m", "1", "-n", "e"],
        &["-q", "root"],
        &["-q", "no-such-text-anywhere"],
        &["-v", "-x", ".*"],
    ];
    for flags in cases {
        let (want, want_code) = gnu_grep(&rootfs, flags);
        let mut args = vec!["grep"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&[&r, "/etc"]);
        let out = env.run(&args);
        let mut ours: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        ours.sort();
        assert_eq!(ours, want, "rimg grep {flags:?}");
        assert_eq!(out.status.code(), want_code, "exit code of grep {flags:?}");
    }
    // -h is grep's, not help; the output is the same five times running.
    let first = env.ok(&["grep", "-l", "root", &r]);
    assert!(first.starts_with('/'), "{first}");
    for _ in 0..4 {
        assert_eq!(env.ok(&["grep", "-l", "root", &r]), first);
    }
    let mut sorted: Vec<&str> = first.lines().collect();
    sorted.sort();
    assert_eq!(first.lines().collect::<Vec<_>>(), sorted, "sorted by path");
}

#[test]
fn log_of_a_path_no_layer_held_fails_and_pipes_closed_early_are_quiet() {
    let reg = Registry::start(Auth::None);
    push_history(&reg, "hist");
    let env = Env::new();
    let r = format!("{}/hist:v1", reg.addr());
    let err = env.fails(&["log", &r, "/never-existed"]);
    assert!(
        err.contains("/never-existed") && err.contains("no layer"),
        "{err}"
    );
    // `| head -c1`: the reader goes away; no "Broken pipe" line, and the
    // status is SIGPIPE's, as for coreutils.
    for args in [
        vec!["cat", &r, "/etc/app.conf"],
        vec!["export", &r, "-"],
        vec!["ls", "-R", &r],
    ] {
        let mut cmd = env.command(&args);
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            "",
            "{args:?} is quiet on a closed pipe"
        );
        assert!(
            out.status.success() || out.status.signal() == Some(libc_sigpipe()),
            "{args:?}: {:?}",
            out.status
        );
    }
}

fn libc_sigpipe() -> i32 {
    13
}

#[test]
fn config_prints_the_config_blob_the_manifest_names_and_version_the_version() {
    let reg = Registry::start(Auth::None);
    push_history(&reg, "hist");
    let env = Env::new();
    let r = format!("{}/hist:v1", reg.addr());
    let out = env.run(&["config", &r]);
    assert!(out.status.success());
    let inspect: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", &r])).unwrap();
    assert_eq!(
        sha256(&out.stdout),
        inspect["config"]["digest"].as_str().unwrap()
    );
    assert_eq!(
        env.ok(&["version"]).trim(),
        format!("rimg {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn ls_takes_what_gnu_ls_users_type() {
    let reg = Registry::start(Auth::None);
    let big = vec![b'x'; 3 * 1024 * 1024 + 1];
    let tar = LayerBuilder::new()
        .dir("d", 0o755)
        .dir("d/sub", 0o755)
        .file("d/big", &big, 0o644)
        .file("d/small", b"12345", 0o644)
        .hardlink("d/twin", "d/small")
        .file(".hidden", b"h", 0o644)
        .finish();
    push_image(
        &reg,
        "lsh",
        "v1",
        &[layer_blob(&tar, Compress::Gzip, false)],
        "amd64",
        false,
    );
    let env = Env::new();
    let r = format!("{}/lsh:v1", reg.addr());
    let long = |args: &[&str]| -> Vec<Vec<String>> {
        let mut a = vec!["ls"];
        a.extend_from_slice(args);
        env.ok(&a)
            .lines()
            .map(|l| l.split_whitespace().map(str::to_string).collect())
            .collect()
    };
    // -lh: human sizes; the link count column marks hard links.
    let rows = long(&["-lh", &r, "/d"]);
    let row = |name: &str| rows.iter().find(|f| f[8] == name).unwrap().clone();
    assert_eq!(row("/d/big")[4], "3.1M");
    assert_eq!(row("/d/small")[4], "5");
    assert_eq!(row("/d/small")[1], "2", "two names for one file");
    assert_eq!(row("/d/twin")[1], "2");
    assert_eq!(row("/d/sub")[1], "2");
    // -d: the directory itself; several paths; -a and -1 accepted.
    let rows = long(&["-ld", &r, "/d", "/d/small"]);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0][8], "/d");
    assert_eq!(rows[0][1], "3", "d holds one subdirectory");
    assert_eq!(env.ok(&["ls", "-a1", &r, "/"]), "/.hidden\n/d\n");
}

#[test]
fn history_sizes_match_the_manifest_and_the_tars_and_wasted_bytes_match_a_hand_count() {
    let reg = Registry::start(Auth::None);
    let p = push_history(&reg, "hist");
    let env = Env::new();
    let r = format!("{}/hist:v1", reg.addr());
    let manifest: serde_json::Value = serde_json::from_slice(&p.manifest).unwrap();
    let rows = json_lines(&env.ok(&["history", "--json", &r]));
    assert_eq!(rows.len(), 4);
    // File bytes per layer, from push_history: 10+10+23+4, 10, 4, 10+10.
    let unpacked = [47, 10, 4, 20];
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row["size"], manifest["layers"][i]["size"], "layer {i}");
        assert_eq!(row["digest"], manifest["layers"][i]["digest"], "layer {i}");
        assert_eq!(row["unpacked"], unpacked[i], "layer {i}");
    }
    // Hidden later: app.conf v1 (10) and v2 (10), secrets/key (23),
    // o/old (4), etc/tool's first copy (10).
    let wasted = json_lines(&env.ok(&["history", "--wasted", "--json", &r]));
    let total = wasted.last().unwrap();
    assert_eq!(total["total"], 57);
    assert_eq!(total["files"], 5);
    let text = env.ok(&["history", "--wasted", "--fail-above", "57", &r]);
    assert!(text.ends_with("wasted: 57 in 5 files\n"), "{text}");
    let err = env.fails(&["history", "--wasted", "--fail-above", "56", &r]);
    assert!(err.contains("57 bytes wasted"), "{err}");
}

#[test]
fn a_cached_image_opens_with_the_registry_stopped_by_digest_and_by_tag() {
    let mut reg = Registry::start(Auth::None);
    let p = push_history(&reg, "hist");
    let env = Env::new();
    let r = format!("{}/hist:v1", reg.addr());
    let pinned = format!("{}/hist@{}", reg.addr(), p.manifest_digest);
    let listing = env.ok(&["ls", "-R", &r]);
    env.ok(&["ls", "-R", &pinned]);
    reg.stop();
    let started = std::time::Instant::now();
    let out = env.run(&["ls", "-R", &pinned]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), listing);
    assert!(out.stderr.is_empty(), "a digest needs no warning");
    let out = env.run(&["cat", &r, "/etc/app.conf"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"version=3\n");
    let warn = String::from_utf8_lossy(&out.stderr);
    assert_eq!(warn.lines().count(), 1, "one warning line: {warn}");
    assert!(warn.contains(&p.manifest_digest), "{warn}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // rimg images lists what it can open offline.
    let rows = json_lines(&env.ok(&["images", "--json"]));
    assert!(
        rows.iter()
            .any(|r| r["digest"] == p.manifest_digest.as_str()
                && r["reference"].as_str().unwrap().ends_with("hist:v1")),
        "{rows:?}"
    );
    // A tag never resolved is still an error.
    env.fails(&["ls", &format!("{}/hist:v2", reg.addr())]);
}

#[test]
fn error_messages_say_what_is_wrong_once_and_what_to_do() {
    let reg = Registry::start(Auth::None);
    push_history(&reg, "hist");
    let env = Env::new();
    let r = format!("{}/hist:v1", reg.addr());
    let err = env.fails(&["ls", &r, "/etc/nope"]);
    assert_eq!(err.matches("/etc/nope").count(), 1, "{err}");
    assert!(err.contains("no such file or directory"), "{err}");
    let err = env.fails(&["cat", "--layer", "0", &r, "/etc/nope"]);
    assert!(
        err.contains("layer 0") && !err.contains("in the image"),
        "{err}"
    );
    let err = env.fails(&["ls", &format!("{}/hist:v9", reg.addr())]);
    assert!(err.contains("rimg tags"), "{err}");
    let out = env.run(&["grep", "(", &r]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("(?:") && err.contains("\"(\""), "{err}");
    let err = env.fails(&["export", "--tag", "Bad Name!", &r, "/tmp/x.tar"]);
    assert!(err.contains("lowercase letters, digits"), "{err}");
    let missing = env.dir.path().join("no/such/dir/a.tar");
    let err = env.fails(&["export", &r, &missing.display().to_string()]);
    assert!(
        err.contains("does not exist") && !err.contains(".rimg-export"),
        "{err}"
    );
}
