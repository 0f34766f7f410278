//! Network faults never cost a mount: cold mounts of real images through a
//! seeded proxy that injects 503, 429, resets, truncated bodies, trickles and
//! flipped bytes on about a third of requests. Every run must end with the
//! exact tree or a clean error, nearly all with the exact tree, and none with
//! a wrong byte or a hang.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::image::{Blob, Compress, LayerBuilder, layer_blob, push_alpine, push_image};
use common::listing::{EntryInfo, diff_listings, tree_listing};
use common::proxy::FaultProxy;
use common::*;

/// Outcome of one cold mount.
#[derive(Debug, PartialEq)]
enum Outcome {
    Exact,
    /// rimg failed with a one-line error, or the mount answered EIO.
    CleanError(String),
    /// The tree differs from the reference: never acceptable.
    Wrong(String),
}

/// A layered image with whiteouts and many small layers.
fn push_many_layers(reg: &Registry) {
    let layers: Vec<Blob> = (0..40)
        .map(|i| {
            let mut b = LayerBuilder::new();
            b.dir("data", 0o755)
                .file(
                    &format!("data/f{i}"),
                    format!("layer {i}\n").repeat(i + 1).as_bytes(),
                    0o644,
                )
                .file("data/last", format!("{i}").as_bytes(), 0o600);
            if i > 0 && i % 5 == 0 {
                b.whiteout(&format!("data/f{}", i - 1));
            }
            layer_blob(&b.finish(), Compress::Gzip, true)
        })
        .collect();
    push_image(reg, "many", "1", &layers, "amd64", true);
}

fn cold_mount(env: &Env, reference: &str, want: &BTreeMap<String, EntryInfo>) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let m = mnt.display().to_string();
    let out = env.run_with(&["mount", reference, &m], b"", Duration::from_secs(180));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    if !out.status.success() {
        let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("rimg: ")).collect();
        assert_eq!(lines.len(), 1, "one error line: {stderr}");
        return Outcome::CleanError(lines[0].to_string());
    }
    // The listing reads every file; a read that fails (EIO) panics inside
    // it, which is a clean error here, unlike a listing that differs.
    let path = mnt.clone();
    let got = std::thread::spawn(move || tree_listing(&path)).join();
    let _ = env.run(&["umount", &m]);
    match got {
        Err(e) => {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| "listing failed".into());
            assert!(
                msg.contains("Input/output error") || msg.contains("os error 5"),
                "a failed read must be EIO: {msg}"
            );
            Outcome::CleanError(msg)
        }
        Ok(got) => {
            let d = diff_listings(&got, want);
            if d.is_empty() {
                Outcome::Exact
            } else {
                Outcome::Wrong(d.into_iter().take(10).collect::<Vec<_>>().join("\n"))
            }
        }
    }
}

#[test]
fn cold_mounts_through_injected_faults_end_exact_or_with_a_clean_error() {
    let reg = Registry::start(Auth::None);
    push_alpine(&reg, "alpine", "3.10", "3.10.9", "amd64", false);
    push_alpine(&reg, "alpine", "3.20", "3.20.3", "amd64", true);
    push_many_layers(&reg);
    let images = [("alpine", "3.10"), ("alpine", "3.20"), ("many", "1")];
    // The reference trees, from skopeo and umoci, without faults.
    let mut refs = Vec::new();
    let mut keep = Vec::new();
    for (repo, tag) in images {
        let (dir, rootfs) = umoci_unpack(&reg, repo, tag);
        refs.push(tree_listing(&rootfs));
        keep.push(dir);
    }
    let seed = std::env::var("RIMG_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_2026);
    // One request in three is faulted unless RIMG_FAULT_ONE_IN says otherwise.
    let one_in = std::env::var("RIMG_FAULT_ONE_IN")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let proxy = FaultProxy::start(&reg, seed, one_in);
    let runs: usize = std::env::var("RIMG_FAULT_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24);
    let started = Instant::now();
    let mut exact = 0;
    let mut errors = Vec::new();
    for run in 0..runs {
        let i = run % images.len();
        let (repo, tag) = images[i];
        // A cold cache each time; stalls bounded so a run never waits long.
        let env = Env::new()
            .set("RIMG_STALL_TIMEOUT", "5")
            .set("RIMG_TIMEOUT", "60");
        let t = Instant::now();
        let outcome = cold_mount(&env, &format!("{}/{repo}:{tag}", proxy.addr()), &refs[i]);
        eprintln!(
            "run {run} {repo}:{tag}: {outcome:?} in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        match outcome {
            Outcome::Exact => exact += 1,
            Outcome::CleanError(e) => errors.push(e),
            Outcome::Wrong(d) => panic!("run {run}: {repo}:{tag} has a wrong tree:\n{d}"),
        }
    }
    let requests = proxy.requests.load(std::sync::atomic::Ordering::SeqCst);
    eprintln!(
        "{exact}/{runs} exact, {} clean errors, {requests} requests in {:.0} s; faults: {}",
        errors.len(),
        started.elapsed().as_secs_f64(),
        proxy.summary()
    );
    assert!(
        exact * 100 >= runs * 95,
        "only {exact} of {runs} runs were exact; errors: {errors:#?}"
    );
    assert!(
        proxy
            .injected
            .iter()
            .all(|n| n.load(std::sync::atomic::Ordering::SeqCst) > 0),
        "every kind of fault was injected: {}",
        proxy.summary()
    );
}

/// The resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The server of the mount at `mnt`, from `rimg mounts`.
fn server_pid(env: &Env, mnt: &std::path::Path) -> Option<u32> {
    env.ok(&["mounts"])
        .lines()
        .find(|l| l.ends_with(&mnt.display().to_string()))
        .and_then(|l| l.split_whitespace().rev().nth(1)?.parse().ok())
}

#[test]
fn a_bounded_soak_through_faults_serves_no_wrong_byte_and_holds_its_memory() {
    let reg = Registry::start(Auth::None);
    push_alpine(&reg, "alpine", "3.10", "3.10.9", "amd64", false);
    push_alpine(&reg, "alpine", "3.20", "3.20.3", "amd64", true);
    let images = [("alpine", "3.10"), ("alpine", "3.20")];
    let mut refs = Vec::new();
    let mut keep = Vec::new();
    for (repo, tag) in images {
        let (dir, rootfs) = umoci_unpack(&reg, repo, tag);
        refs.push(std::sync::Arc::new(tree_listing(&rootfs)));
        keep.push(dir);
    }
    let proxy = FaultProxy::start(&reg, 0x50a6, 3);
    // A cache that holds one image, so each round evicts the other's layer
    // and fetches its own again, through the faults.
    let env = std::sync::Arc::new(
        Env::new()
            .set("RIMG_STALL_TIMEOUT", "5")
            .set("RIMG_TIMEOUT", "60"),
    );
    let rounds = 4;
    let mut first_rss = 0u64;
    let mut last_rss = 0u64;
    let (mut exact, mut clean) = (0, 0);
    for round in 0..rounds {
        let i = round % images.len();
        let (repo, tag) = images[i];
        let r = format!("{}/{repo}:{tag}", proxy.addr());
        let dirs: Vec<tempfile::TempDir> = (0..8).map(|_| tempfile::tempdir().unwrap()).collect();
        let mut mounted = Vec::new();
        for d in &dirs {
            let m = d.path().display().to_string();
            let out = env.run_with(
                &["--cache-size", "12M", "mount", &r, &m],
                b"",
                Duration::from_secs(180),
            );
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!err.contains("panicked"), "{err}");
            if out.status.success() {
                mounted.push(d.path().to_path_buf());
            } else {
                clean += 1;
            }
        }
        // 16 readers: every file of every mount read and hashed twice over.
        let (tx, rx) = std::sync::mpsc::channel();
        for reader in 0..16 {
            let Some(path) = mounted.get(reader % mounted.len().max(1)).cloned() else {
                continue;
            };
            let (want, tx) = (std::sync::Arc::clone(&refs[i]), tx.clone());
            std::thread::spawn(move || {
                let got = std::thread::spawn(move || tree_listing(&path)).join();
                let _ = tx.send(got.map(|got| diff_listings(&got, &want)));
            });
        }
        drop(tx);
        let readers = 16.min(mounted.len() * 16);
        for _ in 0..readers {
            match rx.recv_timeout(Duration::from_secs(240)) {
                Ok(Ok(d)) if d.is_empty() => exact += 1,
                Ok(Ok(d)) => panic!("round {round}: a wrong tree: {}", d.join("\n")),
                // A read that failed: EIO after the retries, never a wrong byte.
                Ok(Err(_)) => clean += 1,
                Err(_) => panic!("round {round}: a reader hung"),
            }
        }
        let pids: Vec<u32> = mounted.iter().filter_map(|m| server_pid(&env, m)).collect();
        let rss: u64 = pids.iter().map(|&p| rss_kib(p)).sum::<u64>() / pids.len().max(1) as u64;
        eprintln!(
            "round {round} {repo}:{tag}: {} mounts, mean server RSS {rss} KiB",
            mounted.len()
        );
        if round == 0 {
            first_rss = rss;
        }
        let cached = env
            .ok(&["cache", "ls"])
            .lines()
            .filter(|l| l.starts_with("sha256:"))
            .count();
        assert_eq!(
            cached, 1,
            "round {round}: the other image's layer was evicted"
        );
        last_rss = rss;
        for m in &mounted {
            let _ = env.run(&["umount", &m.display().to_string()]);
        }
        for m in &mounted {
            assert!(
                wait_for(Duration::from_secs(10), || !is_mountpoint(m)),
                "round {round}: a mount was left behind"
            );
        }
    }
    eprintln!(
        "soak: {exact} exact listings, {clean} clean errors; server RSS {first_rss} KiB after the first round, {last_rss} KiB after the last; faults: {}",
        proxy.summary()
    );
    assert!(
        exact >= 16 * rounds * 9 / 10,
        "{exact} exact listings of {}",
        16 * rounds
    );
    assert!(
        last_rss * 10 <= first_rss * 11,
        "server RSS grew from {first_rss} KiB to {last_rss} KiB"
    );
}
