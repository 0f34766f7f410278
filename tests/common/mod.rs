//! Test harness: real registries (Debian's docker-registry, distribution 2.8)
//! on loopback in three auth modes, a token server whose JWTs the registry
//! verifies for real, an image builder and pusher, and tree listings to compare
//! rimg's view with umoci's.

pub mod alpine;
pub mod counting;
pub mod docker;
pub mod fixtures;
pub mod image;
pub mod lazy;
pub mod listing;
pub mod proxy;
pub mod sign;
pub mod token;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

#[allow(unused_imports)] // not every test binary that compiles tests/common uses it
pub use alpine::alpine;
use token::TokenServer;

#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub const USER: &str = "alice";
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub const PASS: &str = "s3cret-pass";

/// A loopback port nothing listens on now: for addresses that must refuse
/// connections. Never hand it to a server (another process may take it
/// first); servers bind port 0 themselves, see [`listening_port`].
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub fn dead_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The TCP port process `pid` listens on, once it does: its socket inodes
/// (`/proc/PID/fd`) found in a listening row of `/proc/PID/net/tcp`.
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub fn listening_port(pid: u32) -> Option<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_str()?;
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).ok()?;
    table.lines().skip(1).find_map(|row| {
        let f: Vec<&str> = row.split_whitespace().collect();
        // local_address is HEXIP:HEXPORT, st 0A is LISTEN, inode is field 9.
        if f.get(3) != Some(&"0A") || !inodes.iter().any(|i| Some(&i.as_str()) == f.get(9)) {
            return None;
        }
        u16::from_str_radix(f[1].rsplit(':').next()?, 16).ok()
    })
}

/// Stands for the port in a registry's config template: 0 (bind any) at first.
const PORT_MARK: &str = "@PORT@";

#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub enum Auth {
    None,
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    Basic,
    /// Token auth through a token server of the tests.
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    Token(TokenServer),
}

#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub struct Registry {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    pub auth: Auth,
    config: PathBuf,
    /// The CA (self-signed certificate) of a TLS registry.
    pub tls_cert: Option<PathBuf>,
}

impl Registry {
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn start(auth: Auth) -> Registry {
        Self::start_with(auth, None, false)
    }

    /// A registry that speaks HTTPS with a self-signed certificate for 127.0.0.1.
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn start_tls() -> Registry {
        Self::start_with(Auth::None, None, true)
    }

    /// A pull-through cache (distribution's proxy mode) in front of `upstream`.
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn proxy_of(upstream: &Registry) -> Registry {
        Self::start_with(Auth::None, Some(upstream.url()), false)
    }

    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    fn start_with(auth: Auth, proxy: Option<String>, tls: bool) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        // Port 0: the registry binds a free port itself (no window in which
        // another process could take a port chosen for it); `restart` reads
        // which one and pins it for the restarts that follow.
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}/data\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{PORT_MARK}\n",
            dir.path().display()
        );
        match &auth {
            Auth::None => {}
            Auth::Basic => {
                let out = Command::new("htpasswd")
                    .args(["-Bbn", USER, PASS])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "htpasswd failed");
                let file = dir.path().join("htpasswd");
                std::fs::write(&file, out.stdout).unwrap();
                cfg += &format!(
                    "auth:\n  htpasswd:\n    realm: rimg-test\n    path: {}\n",
                    file.display()
                );
            }
            Auth::Token(t) => {
                cfg += &format!(
                    "auth:\n  token:\n    realm: {}/token\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                    t.url(),
                    token::SERVICE,
                    token::ISSUER,
                    t.cert_path().display()
                );
            }
        }
        if let Some(up) = proxy {
            cfg += &format!("proxy:\n  remoteurl: {up}\n");
        }
        let tls_cert = tls.then(|| {
            // A CA, and a server certificate for 127.0.0.1 signed by it.
            let p = |n: &str| dir.path().join(n);
            let openssl = |args: &[&str]| {
                run_ok(Command::new("openssl").args(args).current_dir(dir.path()).stderr(Stdio::null()));
            };
            openssl(&["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=rimg test CA"]);
            openssl(&["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "tls.key", "-out", "tls.csr", "-subj", "/CN=127.0.0.1"]);
            std::fs::write(p("ext.cnf"), "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n").unwrap();
            openssl(&["x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf", "-out", "tls.crt"]);
            cfg += &format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                p("tls.crt").display(),
                p("tls.key").display()
            );
            p("ca.crt")
        });
        let config = dir.path().join("config.yml");
        std::fs::write(&config, cfg).unwrap();
        let mut r = Registry {
            port: 0,
            dir,
            child: None,
            auth,
            config,
            tls_cert,
        };
        r.restart();
        r
    }

    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn url(&self) -> String {
        let scheme = if self.tls_cert.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr())
    }

    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the registry again (on the port it had, once it has one) and
    /// waits until it listens.
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn restart(&mut self) {
        self.stop();
        let template = std::fs::read_to_string(&self.config).unwrap();
        let config = self.dir.path().join("config-run.yml");
        std::fs::write(&config, template.replace(PORT_MARK, &self.port.to_string())).unwrap();
        let log_path = self.dir.path().join("registry.log");
        // A pinned port can be taken while the registry is down: a few tries.
        for _ in 0..20 {
            let log = std::fs::File::create(&log_path).unwrap();
            let mut child = Command::new("docker-registry")
                .arg("serve")
                .arg(&config)
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("docker-registry must be installed (scripts/install-deps.sh)");
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                if let Some(port) = listening_port(child.id()) {
                    assert!(self.port == 0 || self.port == port);
                    self.port = port;
                    self.child = Some(child);
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "registry on port {} did not start: {}",
            self.port,
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
    }

    /// The Authorization header that lets the harness push.
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn push_auth(&self, repo: &str) -> Option<String> {
        match &self.auth {
            Auth::None => None,
            Auth::Basic => Some(format!(
                "Basic {}",
                b64(format!("{USER}:{PASS}").as_bytes())
            )),
            Auth::Token(t) => Some(format!("Bearer {}", t.mint(repo, &["pull", "push"], 300))),
        }
    }

    /// Path of a blob in the registry's own storage (to corrupt it in tests).
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub fn b64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// The rimg binary under test.
pub fn rimg_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_rimg"))
}

/// An isolated environment for one rimg invocation: its own cache and state.
pub struct Env {
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub dir: tempfile::TempDir,
    pub vars: Vec<(String, String)>,
}

impl Env {
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let vars = vec![
            (
                "RIMG_CACHE_DIR".into(),
                dir.path().join("cache").display().to_string(),
            ),
            (
                "RIMG_STATE_DIR".into(),
                dir.path().join("state").display().to_string(),
            ),
            ("HOME".into(), dir.path().join("home").display().to_string()),
            (
                "XDG_RUNTIME_DIR".into(),
                dir.path().join("run").display().to_string(),
            ),
            (
                "DOCKER_CONFIG".into(),
                dir.path().join("docker").display().to_string(),
            ),
        ];
        Env { dir, vars }
    }

    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn set(mut self, k: &str, v: &str) -> Env {
        self.vars.retain(|(key, _)| key != k);
        self.vars.push((k.into(), v.into()));
        self
    }

    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn cache_dir(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(rimg_bin());
        c.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        for (k, v) in &self.vars {
            c.env(k, v);
        }
        c
    }

    /// Runs rimg with `stdin`, killing it after `timeout` so a hang fails the test.
    pub fn run_with(&self, args: &[&str], stdin: &[u8], timeout: Duration) -> Output {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            let mut s = child.stdin.take().unwrap();
            let _ = s.write_all(stdin);
        }
        // Drain both pipes while waiting, or a chatty child blocks forever.
        let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_end(&mut buf);
                }
                buf
            })
        };
        let out = drain(
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        );
        let err = drain(
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        );
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let stderr = err.join().unwrap();
                panic!(
                    "rimg {args:?} hung for {timeout:?}; stderr: {}",
                    String::from_utf8_lossy(&stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Output {
            status,
            stdout: out.join().unwrap(),
            stderr: err.join().unwrap(),
        }
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.run_with(args, b"", Duration::from_secs(120))
    }

    /// Runs and insists on success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "rimg {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs and insists on failure; returns stderr, checked to be one line.
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "rimg {args:?} should have failed");
        let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("rimg: ")).collect();
        assert_eq!(lines.len(), 1, "one error line expected, got: {err}");
        assert!(!err.contains("panicked"), "rimg panicked: {err}");
        lines[0].to_string()
    }
}

/// A mount made by `rimg mount`, unmounted on drop.
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub struct Mounted {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mounted {
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn new(env: &Env, reference: &str, extra: &[&str]) -> Mounted {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mnt");
        std::fs::create_dir(&path).unwrap();
        let mut args = vec!["mount"];
        args.extend_from_slice(extra);
        args.push(reference);
        let p = path.display().to_string();
        args.push(&p);
        env.ok(&args);
        Mounted { path, _dir: dir }
    }

    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn is_mounted(&self) -> bool {
        is_mountpoint(&self.path)
    }
}

#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub fn is_mountpoint(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let p = path.display().to_string();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(p.as_str()))
}

/// Waits until `cond` holds, up to `timeout`.
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.is_mounted() {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.path)
                .status();
            if self.is_mounted() {
                let _ = Command::new("umount").arg("-l").arg(&self.path).status();
            }
        }
    }
}

/// `skopeo copy` the image to an OCI layout and `umoci unpack` it: the
/// reference implementation's rootfs.
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub fn umoci_unpack(registry: &Registry, repo: &str, tag: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("oci");
    let mut copy = Command::new("skopeo");
    copy.args(["copy", "-q", "--src-tls-verify=false"]);
    match &registry.auth {
        Auth::None => {}
        _ => {
            copy.arg(format!("--src-creds={USER}:{PASS}"));
        }
    }
    copy.arg(format!("docker://{}/{repo}:{tag}", registry.addr()))
        .arg(format!("oci:{}:{tag}", layout.display()));
    run_ok(&mut copy);
    unpack_layout(dir, &layout, tag)
}

/// `umoci unpack` of an OCI layout directory.
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub fn unpack_layout(
    dir: tempfile::TempDir,
    layout: &Path,
    tag: &str,
) -> (tempfile::TempDir, PathBuf) {
    let bundle = dir.path().join("bundle");
    run_ok(
        Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:{tag}", layout.display()))
            .arg(&bundle),
    );
    let rootfs = bundle.join("rootfs");
    (dir, rootfs)
}

#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
