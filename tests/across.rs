//! `grep` across the tags of a repository and the repositories of a
//! registry: against `umoci unpack` + `grep -rl` of every tag, with each
//! distinct layer fetched once (counted through a proxy).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use common::counting::CountingProxy;
use common::image::{Blob, Compress, LayerBuilder, layer_blob, push_image};
use common::*;

const SECRET: &str = "AKIA-LEAKED-0123456789";

fn blob(tar: Vec<u8>) -> Blob {
    layer_blob(&tar, Compress::Gzip, true)
}

/// Repository `app`: tags on one two-layer base. `leak` adds the secret,
/// `fixed` whites it out again, `moved` whites it out but keeps a copy
/// elsewhere, `clean` is the base alone, `conf` carries it in a config,
/// and three more tags (`r1`..`r3`) are the base plus a small layer each.
/// Returns the digests of every distinct layer.
fn push_app(reg: &Registry) -> BTreeSet<String> {
    let base0 = blob(
        LayerBuilder::new()
            .dir("etc", 0o755)
            .file("etc/os-release", b"NAME=test\n", 0o644)
            .dir("usr", 0o755)
            .dir("usr/lib", 0o755)
            .file("usr/lib/libssl.so.3", b"\x7fELF\0OpenSSL 3.0.2\0", 0o755)
            .finish(),
    );
    let base1 = blob(
        LayerBuilder::new()
            .dir("app", 0o755)
            .file("app/readme", b"no secrets here\n", 0o644)
            .finish(),
    );
    let leak = blob(
        LayerBuilder::new()
            .dir("etc", 0o755)
            .file("etc/secret.key", format!("{SECRET}\n").as_bytes(), 0o600)
            .finish(),
    );
    let remove = blob(LayerBuilder::new().whiteout("etc/secret.key").finish());
    let keep_copy = blob(
        LayerBuilder::new()
            .whiteout("etc/secret.key")
            .dir("opt", 0o755)
            .file("opt/key.bak", format!("x\n{SECRET}\n").as_bytes(), 0o600)
            .finish(),
    );
    let conf = blob(
        LayerBuilder::new()
            .dir("app", 0o755)
            .file(
                "app/config.yaml",
                format!("key: {SECRET}\n").as_bytes(),
                0o644,
            )
            .finish(),
    );
    let small = |n: u8| {
        blob(
            LayerBuilder::new()
                .dir("app", 0o755)
                .file("app/version", format!("r{n}\n").as_bytes(), 0o644)
                .finish(),
        )
    };
    let (r1, r2, r3) = (small(1), small(2), small(3));
    let tags: Vec<(&str, Vec<&Blob>)> = vec![
        ("clean", vec![&base0, &base1]),
        ("leak", vec![&base0, &base1, &leak]),
        ("fixed", vec![&base0, &base1, &leak, &remove]),
        ("moved", vec![&base0, &base1, &leak, &keep_copy]),
        ("conf", vec![&base0, &base1, &conf]),
        ("r1", vec![&base0, &base1, &r1]),
        ("r2", vec![&base0, &base1, &leak, &r2]),
        ("r3", vec![&base0, &base1, &r3]),
    ];
    let mut digests = BTreeSet::new();
    for (tag, layers) in tags {
        let layers: Vec<Blob> = layers.into_iter().cloned().collect();
        digests.extend(push_image(reg, "app", tag, &layers, "amd64", true).layers);
    }
    digests
}

const TAGS: [&str; 8] = ["clean", "conf", "fixed", "leak", "moved", "r1", "r2", "r3"];

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

/// `TAG:PATH` for every file of every tag's umoci unpack that matches.
fn expected(reg: &Registry, pattern: &str) -> BTreeSet<String> {
    let mut want = BTreeSet::new();
    for tag in TAGS {
        let (_keep, rootfs) = umoci_unpack(reg, "app", tag);
        want.extend(
            grep_rl(&rootfs, pattern)
                .into_iter()
                .map(|p| format!("{tag}:{p}")),
        );
    }
    want
}

fn json_lines(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

#[test]
fn grep_all_tags_finds_what_grep_rl_finds_in_every_tag_fetching_each_layer_once() {
    let reg = Registry::start(Auth::None);
    let layers = push_app(&reg);
    let proxy = CountingProxy::start(&reg.addr(), None);
    let env = Env::new();
    let repo = format!("{}/app", proxy.addr());
    let ours: BTreeSet<String> = env
        .ok(&["grep", "-l", SECRET, &repo, "--all-tags"])
        .lines()
        .map(str::to_string)
        .collect();
    let want = expected(&reg, SECRET);
    assert_eq!(
        want,
        [
            "conf:/app/config.yaml",
            "leak:/etc/secret.key",
            "moved:/opt/key.bak",
            "r2:/etc/secret.key"
        ]
        .map(String::from)
        .into(),
        "the fixture plants what it says"
    );
    assert_eq!(ours, want);
    // Every distinct layer was fetched, and none twice.
    for d in &layers {
        let gets: Vec<_> = proxy
            .blob_requests(d)
            .into_iter()
            .filter(|r| r.method == "GET")
            .collect();
        assert_eq!(gets.len(), 1, "layer {d}: {gets:?}");
    }
    // Lines name the tag, the path and the line, in a fixed order.
    let lines = env.ok(&["grep", "-n", SECRET, &repo, "--all-tags"]);
    assert_eq!(
        lines,
        format!(
            "conf:/app/config.yaml:1:key: {SECRET}\n\
             leak:/etc/secret.key:1:{SECRET}\n\
             moved:/opt/key.bak:2:{SECRET}\n\
             r2:/etc/secret.key:1:{SECRET}\n"
        )
    );
    // Nothing found: exit 1, as grep.
    let none = env.run(&["grep", "NOT-THERE-ANYWHERE", &repo, "--all-tags"]);
    assert_eq!(none.status.code(), Some(1));
    assert!(none.stdout.is_empty());
}

#[test]
fn grep_deleted_across_tags_adds_the_hidden_copies_marked_deleted() {
    let reg = Registry::start(Auth::None);
    push_app(&reg);
    let env = Env::new();
    let repo = format!("{}/app", reg.addr());
    let recs = json_lines(&env.ok(&[
        "grep",
        "-l",
        "--json",
        "--deleted",
        SECRET,
        &repo,
        "--all-tags",
    ]));
    let got: BTreeSet<(String, String, bool)> = recs
        .iter()
        .map(|v| {
            assert_eq!(
                v["ref"].as_str().unwrap(),
                format!("{repo}:{}", v["tag"].as_str().unwrap())
            );
            assert!(v["layer"].is_u64() && v["layer_digest"].is_string(), "{v}");
            (
                v["tag"].as_str().unwrap().to_string(),
                v["path"].as_str().unwrap().to_string(),
                v["deleted"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    let mut want: BTreeSet<(String, String, bool)> = expected(&reg, SECRET)
        .into_iter()
        .map(|tp| {
            let (t, p) = tp.split_once(':').unwrap();
            (t.to_string(), p.to_string(), false)
        })
        .collect();
    want.insert(("fixed".into(), "/etc/secret.key".into(), true));
    want.insert(("moved".into(), "/etc/secret.key".into(), true));
    assert_eq!(got, want);
}

#[test]
fn grep_takes_several_references_a_tag_glob_and_a_whole_catalog() {
    let reg = Registry::start(Auth::None);
    push_app(&reg);
    let other = LayerBuilder::new()
        .dir("srv", 0o755)
        .file("srv/token", format!("{SECRET}\n").as_bytes(), 0o600)
        .finish();
    push_image(&reg, "team/svc", "1.0", &[blob(other)], "amd64", true);
    let env = Env::new();
    let (app, svc) = (
        format!("{}/app", reg.addr()),
        format!("{}/team/svc", reg.addr()),
    );
    // Two references of two repositories: lines say repository:tag.
    let two = env.ok(&[
        "grep",
        "-l",
        SECRET,
        &format!("{app}:leak"),
        &format!("{svc}:1.0"),
    ]);
    assert_eq!(two, "app:leak:/etc/secret.key\nteam/svc:1.0:/srv/token\n");
    // A glob picks tags; paths after the references narrow the search.
    let some = env.ok(&["grep", "-l", SECRET, &app, "--tags", "r*"]);
    assert_eq!(some, "r2:/etc/secret.key\n");
    let under = env.ok(&["grep", "-l", SECRET, &app, "--all-tags", "/opt", "/app"]);
    assert_eq!(under, "conf:/app/config.yaml\nmoved:/opt/key.bak\n");
    // Every repository the catalog lists.
    let all = env.ok(&[
        "grep",
        "-l",
        SECRET,
        "--catalog",
        &reg.addr(),
        "--tags",
        "*",
    ]);
    assert_eq!(
        all,
        "app:conf:/app/config.yaml\napp:leak:/etc/secret.key\napp:moved:/opt/key.bak\n\
         app:r2:/etc/secret.key\nteam/svc:1.0:/srv/token\n"
    );
    // One image that cannot be opened: reported on one line, the others
    // still searched, exit 2.
    let out = env.run(&[
        "grep",
        "-l",
        SECRET,
        &format!("{app}:leak"),
        &format!("{app}:gone"),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "leak:/etc/secret.key\n"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("gone"), "{err}");
}

#[test]
fn log_across_tags_says_release_by_release_where_a_path_appeared_changed_or_went() {
    let reg = Registry::start(Auth::None);
    push_app(&reg);
    let env = Env::new();
    let repo = format!("{}/app", reg.addr());
    // Every release has the same `created`: they go in tag order.
    let actions = |path: &str| -> Vec<(String, String)> {
        json_lines(&env.ok(&["log", "--json", &repo, path, "--all-tags"]))
            .iter()
            .map(|v| {
                assert_eq!(v["path"], path);
                (
                    v["tag"].as_str().unwrap().to_string(),
                    v["action"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter()
            .map(|(t, a)| (t.to_string(), a.to_string()))
            .collect()
    };
    assert_eq!(
        actions("/etc/secret.key"),
        pairs(&[
            ("leak", "added"),
            ("moved", "removed"),
            ("r2", "added"),
            ("r3", "removed")
        ])
    );
    assert_eq!(
        actions("/app/version"),
        pairs(&[("r1", "added"), ("r2", "modified"), ("r3", "modified")])
    );
    assert_eq!(actions("/app/readme"), pairs(&[("clean", "added")]));
    // The text form: one line per change, naming the release.
    let text = env.ok(&["log", &repo, "/app/version", "--tags", "r*"]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[1].starts_with("r2 modified"), "{text}");
    assert!(lines[1].contains("/app/version file 0644"), "{text}");
}

#[test]
fn grep_over_eight_tags_on_one_base_costs_about_one_tag() {
    let reg = Registry::start(Auth::None);
    let base = common::image::gz_file_blob(&alpine("3.20.3", "x86_64"), true);
    for i in 0..8 {
        let top = blob(
            LayerBuilder::new()
                .dir("srv", 0o755)
                .file("srv/release", format!("release {i}\n").as_bytes(), 0o644)
                .finish(),
        );
        push_image(
            &reg,
            "rel",
            &format!("v{i}"),
            &[base.clone(), top],
            "amd64",
            true,
        );
    }
    let repo = format!("{}/rel", reg.addr());
    // Each on a cold cache; the best of two of each, so a busy machine
    // does not decide.
    let time = |args: &[&str]| {
        (0..2)
            .map(|_| {
                let env = Env::new();
                let t = std::time::Instant::now();
                let out = env.run(args);
                assert_eq!(out.status.code(), Some(0), "{args:?}");
                t.elapsed()
            })
            .min()
            .unwrap()
    };
    let one = time(&["grep", "-l", "root:x:0", &format!("{repo}:v0")]);
    let eight = time(&["grep", "-l", "root:x:0", &repo, "--all-tags"]);
    eprintln!("one tag {one:?}, eight tags {eight:?}");
    assert!(eight <= one * 2, "one tag {one:?}, eight tags {eight:?}");
}
