//! Network faults never cost a mount: cold mounts of real images through a
//! seeded proxy that injects 503, 429, resets, truncated bodies, trickles and
//! flipped bytes on about a third of requests. Every run must end with the
//! exact tree or a clean error, nearly all with the exact tree, and none with
//! a wrong byte or a hang.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

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
