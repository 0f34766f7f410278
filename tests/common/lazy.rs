//! Converted copies of pushed images, made by the real producers: eStargz by
//! containerd + stargz-snapshotter's `ctr-remote`, zstd:chunked by skopeo.
//! Both write into the same registry the source came from (plain HTTP).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{Registry, run_ok, wait_for};

/// A containerd of the test's own: private root, state, sockets and config
/// in a temp dir, no CRI and no snapshotters beyond the built-in ones.
struct Containerd {
    dir: tempfile::TempDir,
    child: Child,
}

#[allow(dead_code)] // not every test binary that compiles tests/common uses it
impl Containerd {
    fn start() -> Containerd {
        // Short path: the socket's must fit in sun_path.
        let dir = tempfile::Builder::new()
            .prefix("ctd")
            .tempdir_in("/tmp")
            .unwrap();
        let d = dir.path().display();
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{d}/c.sock"
[ttrpc]
  address = "{d}/c.sock.ttrpc"
[debug]
  address = "{d}/debug.sock"
"#
        );
        std::fs::write(dir.path().join("config.toml"), config).unwrap();
        let log = std::fs::File::create(dir.path().join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.path().join("config.toml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("containerd must be installed (scripts/install-deps.sh)");
        let c = Containerd { dir, child };
        let sock = c.sock();
        let up = wait_for(Duration::from_secs(30), || {
            Command::new("ctr-remote")
                .args(["-a", &sock, "version"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        assert!(
            up,
            "containerd did not start: {}",
            std::fs::read_to_string(c.dir.path().join("containerd.log")).unwrap_or_default()
        );
        c
    }

    fn sock(&self) -> String {
        self.dir.path().join("c.sock").display().to_string()
    }

    fn ctr(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("ctr-remote");
        cmd.args(["-a", &self.sock(), "-n", "rimg-test"])
            .args(args)
            .env("TMPDIR", self.dir.path());
        run_ok(&mut cmd)
    }
}

#[allow(dead_code)] // not every test binary that compiles tests/common uses it
impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Unmount anything the snapshotters left mounted before the temp dir goes.
        let _ = Command::new("umount")
            .arg("-R")
            .arg(self.dir.path().join("root"))
            .stderr(Stdio::null())
            .status();
    }
}

/// Converts `src` (`repo:tag` in `reg`) to eStargz as `dst` with ctr-remote's
/// default chunk size (4 MiB).
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub fn estargz(reg: &Registry, src: &str, dst: &str) {
    estargz_with(reg, src, dst, None, &[])
}

/// Converts `src` to zstd:chunked as `dst` with ctr-remote (whose TOC
/// entries carry no `endOffset`, and which writes no tar-split).
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub fn ctr_remote_zstd_chunked(reg: &Registry, src: &str, dst: &str) {
    convert(reg, src, dst, "--zstdchunked", None, &[])
}

/// Converts `src` to eStargz as `dst`, splitting files into chunks of
/// `chunk_size` bytes when given, and putting the absolute paths in
/// `prioritized` first, before a `.prefetch.landmark` (ctr-remote's record
/// file is a stream of `{"path": ...}` objects).
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub fn estargz_with(
    reg: &Registry,
    src: &str,
    dst: &str,
    chunk_size: Option<u64>,
    prioritized: &[&str],
) {
    convert(reg, src, dst, "--estargz", chunk_size, prioritized)
}

/// Converts `src` to `form` (a ctr-remote convert flag) as `dst`.
fn convert(
    reg: &Registry,
    src: &str,
    dst: &str,
    form: &str,
    chunk_size: Option<u64>,
    prioritized: &[&str],
) {
    let c = Containerd::start();
    let (src, dst) = (
        format!("{}/{src}", reg.addr()),
        format!("{}/{dst}", reg.addr()),
    );
    // The native snapshotter unpacks by copying: no overlay mounts needed.
    c.ctr(&[
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "native",
        &src,
    ]);
    let size = chunk_size.map(|s| s.to_string());
    let mut args = vec!["image", "convert", form, "--oci"];
    if let Some(s) = &size {
        args.extend(["--estargz-chunk-size", s]);
    }
    let record = c.dir.path().join("record.json");
    if !prioritized.is_empty() {
        let lines: Vec<String> = prioritized
            .iter()
            .map(|p| serde_json::json!({ "path": p }).to_string())
            .collect();
        std::fs::write(&record, lines.join("\n")).unwrap();
        args.extend(["--estargz-record-in", record.to_str().unwrap()]);
    }
    args.extend([src.as_str(), dst.as_str()]);
    c.ctr(&args);
    c.ctr(&["image", "push", "--plain-http", &dst]);
}

/// Converts `src` to zstd:chunked as `dst` with skopeo.
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub fn zstd_chunked(reg: &Registry, src: &str, dst: &str) {
    // skopeo would otherwise reuse the gzip blobs it has seen for the same
    // diff IDs instead of compressing anew.
    let cache = Path::new("/var/lib/containers/cache/blob-info-cache-v1.boltdb");
    let _ = std::fs::remove_file(cache);
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("skopeo");
    cmd.args([
        "copy",
        "--format",
        "oci",
        "--dest-compress-format",
        "zstd:chunked",
        "--dest-compress",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
    ])
    .arg(format!("docker://{}/{src}", reg.addr()))
    .arg(format!("docker://{}/{dst}", reg.addr()))
    .env("TMPDIR", tmp.path());
    run_ok(&mut cmd);
}
