//! Hostile registries: a small HTTP server on loopback, written here, that
//! answers the way a broken or malicious registry might (endless bodies,
//! pagination loops, stalls, absurd layer counts, foreign URLs). Every case
//! must end in a clean one-line error within a stated time, with bounded
//! memory and threads.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::image::{Blob, Compress, LayerBuilder, layer_blob, sha256};
use common::*;

/// One request as the server saw it.
pub struct Req {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl Req {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

type Handler = dyn Fn(&Req, &mut TcpStream) + Send + Sync;

/// A loopback server calling `handler` for every request, one connection
/// each (`Connection: close`), until the test ends.
pub struct Hostile {
    pub port: u16,
    pub requests: Arc<AtomicUsize>,
}

impl Hostile {
    pub fn start(handler: impl Fn(&Req, &mut TcpStream) + Send + Sync + 'static) -> Hostile {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let handler: Arc<Handler> = Arc::new(handler);
        let requests = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&requests);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut stream) = conn else { continue };
                let handler = Arc::clone(&handler);
                let count = Arc::clone(&count);
                std::thread::spawn(move || {
                    let Some(req) = read_req(&mut stream) else {
                        return;
                    };
                    count.fetch_add(1, Ordering::SeqCst);
                    handler(&req, &mut stream);
                });
            }
        });
        Hostile { port, requests }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

fn read_req(stream: &mut TcpStream) -> Option<Req> {
    let mut r = BufReader::new(stream.try_clone().ok()?);
    let mut first = String::new();
    r.read_line(&mut first).ok()?;
    let mut parts = first.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    Some(Req {
        method,
        path,
        headers,
    })
}

/// A complete response with a body.
pub fn respond(s: &mut TcpStream, status: &str, headers: &[(&str, &str)], body: &[u8]) {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    head += "\r\n";
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(body);
}

/// A chunked body that never ends, until the client hangs up (or 10 GB).
pub fn endless(s: &mut TcpStream, status: &str, headers: &[(&str, &str)]) {
    let mut head = format!("HTTP/1.1 {status}\r\nTransfer-Encoding: chunked\r\n");
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    head += "\r\n";
    if s.write_all(head.as_bytes()).is_err() {
        return;
    }
    let chunk = vec![b'a'; 64 << 10];
    let framed = [format!("{:x}\r\n", chunk.len()).as_bytes(), &chunk, b"\r\n"].concat();
    for _ in 0..(10u64 << 30) / chunk.len() as u64 {
        if s.write_all(&framed).is_err() {
            return;
        }
    }
}

/// What one rimg run cost.
struct Run {
    ok: bool,
    stderr: String,
    secs: f64,
    peak_rss_mb: u64,
    peak_threads: u64,
}

fn status_field(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Runs rimg, sampling its peak RSS (VmHWM) and thread count from /proc
/// until it exits; kills it and fails after `limit`.
fn measured(env: &Env, args: &[&str], limit: Duration) -> Run {
    let started = Instant::now();
    let mut cmd = env.command(args);
    // The soft limit most systems start with, whatever this machine's is.
    // SAFETY: setrlimit is async-signal-safe.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
            lim.rlim_cur = lim.rlim_max.min(1024);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            Ok(())
        });
    }
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let pid = child.id();
    let (mut rss, mut threads) = (0, 0);
    let status = loop {
        rss = rss.max(status_field(pid, "VmHWM:").unwrap_or(0));
        threads = threads.max(status_field(pid, "Threads:").unwrap_or(0));
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "rimg {args:?} still running after {limit:?}: {}",
                reader.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stderr = reader.join().unwrap();
    assert!(!stderr.contains("panicked"), "rimg panicked: {stderr}");
    Run {
        ok: status.success(),
        stderr,
        secs: started.elapsed().as_secs_f64(),
        peak_rss_mb: rss / 1024,
        peak_threads: threads,
    }
}

/// The error line of a run that must fail.
fn error_line(run: &Run) -> String {
    assert!(!run.ok, "should have failed: {}", run.stderr);
    let lines: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("rimg: "))
        .collect();
    assert_eq!(lines.len(), 1, "one error line expected: {}", run.stderr);
    eprintln!("{}", lines[0]);
    lines[0].to_string()
}

const RSS_BOUND_MB: u64 = 200;

/// Short timeouts so stall cases finish quickly; the bound each test
/// asserts is derived from these.
fn env() -> Env {
    Env::new()
        .set("RIMG_STALL_TIMEOUT", "2")
        .set("RIMG_TIMEOUT", "8")
}

const MT: &str = "application/vnd.oci.image.manifest.v1+json";

/// A small valid image: a gzip layer, a config naming its diff_id, a manifest.
struct Img {
    layers: Vec<Blob>,
    config: Vec<u8>,
    manifest: Vec<u8>,
}

fn image_with(layers: Vec<Blob>, urls: Option<&str>) -> Img {
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": MT,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(&config), "size": config.len()},
        "layers": layers.iter().map(|l| {
            let mut d = serde_json::json!({"mediaType": l.media_type, "digest": l.digest, "size": l.bytes.len()});
            if let Some(u) = urls { d["urls"] = serde_json::json!([u]); }
            d
        }).collect::<Vec<_>>(),
    }))
    .unwrap();
    Img {
        layers,
        config,
        manifest,
    }
}

fn small_layer(name: &str, data: &[u8]) -> Blob {
    let tar = LayerBuilder::new().file(name, data, 0o644).finish();
    layer_blob(&tar, Compress::Gzip, true)
}

/// Serves `img` like a registry, except what `hostile` takes over.
fn serve(
    img: Img,
    hostile: impl Fn(&Req, &mut TcpStream) -> bool + Send + Sync + 'static,
) -> Hostile {
    Hostile::start(move |req, s| {
        if hostile(req, s) {
            return;
        }
        let path = req.path.split('?').next().unwrap_or("");
        if path == "/v2/" {
            return respond(s, "200 OK", &[], b"{}");
        }
        if path.contains("/manifests/") {
            let d = sha256(&img.manifest);
            return respond(
                s,
                "200 OK",
                &[("Content-Type", MT), ("Docker-Content-Digest", &d)],
                &img.manifest,
            );
        }
        if let Some(d) = path.split("/blobs/").nth(1) {
            if d == sha256(&img.config) {
                return respond(s, "200 OK", &[], &img.config);
            }
            if let Some(l) = img.layers.iter().find(|l| l.digest == d) {
                return respond(s, "200 OK", &[], &l.bytes);
            }
        }
        respond(
            s,
            "404 Not Found",
            &[("Content-Type", "application/json")],
            br#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry"}]}"#,
        );
    })
}

fn check_bounded(run: &Run, secs: f64) {
    assert!(
        run.secs < secs,
        "took {:.1} s (bound {secs} s): {}",
        run.secs,
        run.stderr
    );
    assert!(
        run.peak_rss_mb < RSS_BOUND_MB,
        "peak RSS {} MB: {}",
        run.peak_rss_mb,
        run.stderr
    );
    eprintln!(
        "{:.1} s, peak RSS {} MB, {} threads",
        run.secs, run.peak_rss_mb, run.peak_threads
    );
}

#[test]
fn an_endless_chunked_manifest_is_refused_at_its_cap() {
    let srv = serve(image_with(vec![small_layer("a", b"1")], None), |req, s| {
        if req.path.contains("/manifests/") {
            endless(s, "200 OK", &[("Content-Type", MT)]);
            return true;
        }
        false
    });
    let run = measured(
        &env(),
        &["inspect", &format!("{}/x:t", srv.addr())],
        Duration::from_secs(60),
    );
    let e = error_line(&run);
    assert!(
        e.contains("manifest larger than 4194304 bytes") && e.contains("x:t"),
        "{e}"
    );
    check_bounded(&run, 30.0);
}

#[test]
fn an_endless_config_blob_is_refused_at_its_cap() {
    let img = image_with(vec![small_layer("a", b"1")], None);
    let config = sha256(&img.config);
    let srv = serve(img, move |req, s| {
        if req.path.ends_with(&config) {
            endless(s, "200 OK", &[]);
            return true;
        }
        false
    });
    let run = measured(
        &env(),
        &["inspect", &format!("{}/x:t", srv.addr())],
        Duration::from_secs(60),
    );
    let e = error_line(&run);
    assert!(e.contains("blob larger than 33554432 bytes"), "{e}");
    check_bounded(&run, 30.0);
}

#[test]
fn an_endless_error_body_still_gives_the_status_error() {
    let srv = serve(image_with(vec![small_layer("a", b"1")], None), |req, s| {
        if req.path.contains("/manifests/") {
            endless(s, "404 Not Found", &[]);
            return true;
        }
        false
    });
    let run = measured(
        &env(),
        &["inspect", &format!("{}/x:t", srv.addr())],
        Duration::from_secs(60),
    );
    let e = error_line(&run);
    assert!(e.contains("NOT_FOUND") && e.contains("x:t"), "{e}");
    check_bounded(&run, 30.0);
}

#[test]
fn an_endless_tag_list_is_refused_at_its_cap() {
    let srv = serve(image_with(vec![], None), |req, s| {
        if req.path.contains("/tags/list") {
            endless(s, "200 OK", &[("Content-Type", "application/json")]);
            return true;
        }
        false
    });
    let run = measured(
        &env(),
        &["tags", &format!("{}/x", srv.addr())],
        Duration::from_secs(60),
    );
    let e = error_line(&run);
    assert!(e.contains("tag list page larger than"), "{e}");
    check_bounded(&run, 30.0);
}

#[test]
fn an_endless_token_reply_is_refused_at_its_cap() {
    let port = Arc::new(AtomicUsize::new(0));
    let p = Arc::clone(&port);
    let srv = serve(image_with(vec![], None), move |req, s| {
        if req.path.starts_with("/token") {
            endless(s, "200 OK", &[("Content-Type", "application/json")]);
            return true;
        }
        if req.header("authorization").is_none() {
            let realm = format!(
                "Bearer realm=\"http://127.0.0.1:{}/token\",service=\"x\"",
                p.load(Ordering::SeqCst)
            );
            respond(s, "401 Unauthorized", &[("WWW-Authenticate", &realm)], b"");
            return true;
        }
        false
    });
    port.store(srv.port as usize, Ordering::SeqCst);
    let run = measured(
        &env(),
        &["inspect", &format!("{}/x:t", srv.addr())],
        Duration::from_secs(60),
    );
    let e = error_line(&run);
    assert!(e.contains("token reply larger than"), "{e}");
    check_bounded(&run, 30.0);
}

#[test]
fn a_tag_list_whose_link_loops_back_ends_with_an_error() {
    let srv = serve(image_with(vec![], None), |req, s| {
        if req.path.contains("/tags/list") {
            // Page 1 links to page 2, page 2 links back to page 1.
            let next = if req.path.contains("last=b") {
                "</v2/x/tags/list?n=100>; rel=\"next\""
            } else {
                "</v2/x/tags/list?n=100&last=b>; rel=\"next\""
            };
            respond(
                s,
                "200 OK",
                &[("Link", next), ("Content-Type", "application/json")],
                br#"{"name":"x","tags":["a","b"]}"#,
            );
            return true;
        }
        false
    });
    let run = measured(
        &env(),
        &["tags", &format!("{}/x", srv.addr())],
        Duration::from_secs(60),
    );
    let e = error_line(&run);
    assert!(e.contains("leads back to a page already read"), "{e}");
    check_bounded(&run, 10.0);
    assert!(srv.requests.load(Ordering::SeqCst) < 10);
}

#[test]
fn headers_that_never_arrive_fail_within_the_deadline() {
    let srv = serve(image_with(vec![], None), |req, _s| {
        if req.path.contains("/manifests/") {
            std::thread::sleep(Duration::from_secs(300));
            return true;
        }
        false
    });
    // RIMG_TIMEOUT=8 and RIMG_STALL_TIMEOUT=2: every attempt stalls for 2 s,
    // and the whole resolution ends by 8 s, give or take a backoff.
    let run = measured(
        &env(),
        &["inspect", &format!("{}/x:t", srv.addr())],
        Duration::from_secs(60),
    );
    let e = error_line(&run);
    assert!(e.contains("x:t"), "{e}");
    assert!(
        run.stderr.contains("retrying in"),
        "retries are shown: {}",
        run.stderr
    );
    assert!(!run.stderr.contains('\x1b'), "no colour into a pipe");
    check_bounded(&run, 12.0);
}

/// The two stalls of the issue with the default timeouts (60 s deadline,
/// 30 s stall): each must end within the deadline plus one stall. Slow, so
/// run on demand: `cargo test --test hostile -- --ignored`.
#[test]
#[ignore]
fn stalls_end_within_the_default_bounds() {
    let layer = small_layer("etc/hello", &[7u8; 300_000]);
    let (digest, bytes) = (layer.digest.clone(), layer.bytes.clone());
    let srv = serve(image_with(vec![layer], None), move |req, s| {
        if req.path.contains("/manifests/stall") {
            std::thread::sleep(Duration::from_secs(600));
            return true;
        }
        if req.path.ends_with(&digest) {
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                bytes.len()
            );
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(&bytes[..bytes.len() / 2]);
            std::thread::sleep(Duration::from_secs(600));
            return true;
        }
        false
    });
    let env = Env::new();
    let run = measured(
        &env,
        &["inspect", &format!("{}/x:stall", srv.addr())],
        Duration::from_secs(300),
    );
    eprintln!("headers never arrive: {}", error_line(&run));
    check_bounded(&run, 95.0);
    let run = measured(
        &env,
        &["ls", &format!("{}/x:t", srv.addr())],
        Duration::from_secs(300),
    );
    eprintln!("body stalls halfway, Range ignored: {}", error_line(&run));
    check_bounded(&run, 95.0);
}

#[test]
fn a_blob_that_stalls_halfway_on_a_server_ignoring_range_fails_within_the_deadline() {
    // Incompressible, so the blob is as large as the data.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let data: Vec<u8> = (0..2_000_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let layer = small_layer("big", &data);
    let digest = layer.digest.clone();
    let bytes = layer.bytes.clone();
    let srv = serve(image_with(vec![layer], None), move |req, s| {
        if req.path.ends_with(&digest) {
            // Range is ignored: always 200 and the whole length, then half of
            // it, then silence.
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                bytes.len()
            );
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(&bytes[..bytes.len() / 2]);
            std::thread::sleep(Duration::from_secs(300));
            return true;
        }
        false
    });
    let env = env();
    let run = measured(
        &env,
        &["ls", &format!("{}/x:t", srv.addr())],
        Duration::from_secs(60),
    );
    let e = error_line(&run);
    assert!(e.contains("layer 0 of") && e.contains("sha256:"), "{e}");
    // No new byte after the first attempt: 8 s of deadline plus one stall.
    check_bounded(&run, 14.0);
    assert_eq!(
        std::fs::read_dir(env.cache_dir().join("layers/sha256"))
            .unwrap()
            .count(),
        0,
        "nothing cached"
    );
}

#[test]
fn an_image_with_ten_thousand_layers_is_refused_without_fetching_any() {
    let layers = vec![small_layer("a", b"1"); 10_000];
    let srv = serve(image_with(layers, None), |_, _| false);
    let run = measured(
        &env(),
        &["ls", &format!("{}/x:t", srv.addr())],
        Duration::from_secs(60),
    );
    let e = error_line(&run);
    assert!(
        e.contains("10000 layers; rimg refuses images with more than 1000"),
        "{e}"
    );
    check_bounded(&run, 10.0);
    assert!(run.peak_threads < 20, "{} threads", run.peak_threads);
}

#[test]
fn an_image_with_the_most_layers_allowed_is_fetched_with_few_threads() {
    let layers: Vec<Blob> = (0..1000)
        .map(|i| small_layer(&format!("f{i}"), format!("{i}").as_bytes()))
        .collect();
    let digests: Vec<String> = layers.iter().map(|l| l.digest.clone()).collect();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (f, p) = (Arc::clone(&in_flight), Arc::clone(&peak));
    let img = image_with(layers, None);
    let blobs: Vec<Vec<u8>> = img.layers.iter().map(|l| l.bytes.clone()).collect();
    let srv = serve(img, move |req, s| {
        let Some(i) = digests.iter().position(|d| req.path.ends_with(d)) else {
            return false;
        };
        let now = f.fetch_add(1, Ordering::SeqCst) + 1;
        p.fetch_max(now, Ordering::SeqCst);
        // Slow enough that an unbounded client would have them all in flight.
        std::thread::sleep(Duration::from_millis(20));
        respond(s, "200 OK", &[], &blobs[i]);
        f.fetch_sub(1, Ordering::SeqCst);
        true
    });
    let run = measured(
        &env(),
        &["ls", &format!("{}/x:t", srv.addr())],
        Duration::from_secs(240),
    );
    assert!(run.ok, "{}", run.stderr);
    eprintln!(
        "1000 layers: {:.1} s, peak RSS {} MB, {} threads, {} downloads at once",
        run.secs,
        run.peak_rss_mb,
        run.peak_threads,
        peak.load(Ordering::SeqCst)
    );
    assert!(peak.load(Ordering::SeqCst) <= 4);
    assert!(run.peak_threads < 30, "{} threads", run.peak_threads);
    assert!(run.peak_rss_mb < RSS_BOUND_MB);
}

#[test]
fn foreign_layer_urls_are_fetched_only_when_allowed_and_without_credentials() {
    let layer = small_layer("foreign", b"from elsewhere");
    let (digest, bytes) = (layer.digest.clone(), layer.bytes.clone());
    let foreign_auth = Arc::new(AtomicUsize::new(0));
    let fa = Arc::clone(&foreign_auth);
    let foreign = Hostile::start(move |req, s| {
        if req.header("authorization").is_some() {
            fa.fetch_add(1, Ordering::SeqCst);
        }
        respond(s, "200 OK", &[], &bytes);
    });
    let url = format!("http://{}/layer.tar.gz", foreign.addr());
    // The registry wants Basic credentials and does not serve the layer.
    let srv = serve(image_with(vec![layer], Some(&url)), move |req, s| {
        if req.header("authorization").is_none() {
            respond(
                s,
                "401 Unauthorized",
                &[("WWW-Authenticate", "Basic realm=\"r\"")],
                b"",
            );
            return true;
        }
        if req.path.ends_with(&digest) {
            respond(
                s,
                "404 Not Found",
                &[],
                br#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}"#,
            );
            return true;
        }
        false
    });
    let env = env().set("RIMG_USERNAME", "u").set("RIMG_PASSWORD", "p");
    let reference = format!("{}/x:t", srv.addr());
    let run = measured(&env, &["ls", &reference], Duration::from_secs(60));
    let e = error_line(&run);
    assert!(e.contains("--allow-foreign-layers"), "{e}");
    assert_eq!(
        foreign.requests.load(Ordering::SeqCst),
        0,
        "not fetched unasked"
    );
    let run = measured(
        &env,
        &["--allow-foreign-layers", "ls", &reference],
        Duration::from_secs(60),
    );
    assert!(run.ok, "{}", run.stderr);
    assert_eq!(foreign.requests.load(Ordering::SeqCst), 1);
    assert_eq!(
        foreign_auth.load(Ordering::SeqCst),
        0,
        "no credentials sent"
    );
}

#[test]
fn foreign_layer_urls_over_plain_http_to_other_hosts_are_refused() {
    let layer = small_layer("foreign", b"x");
    let digest = layer.digest.clone();
    let srv = serve(
        image_with(vec![layer], Some("http://example.invalid/l.tar.gz")),
        move |req, s| {
            if req.path.ends_with(&digest) {
                respond(s, "404 Not Found", &[], b"");
                return true;
            }
            false
        },
    );
    let run = measured(
        &env(),
        &[
            "--allow-foreign-layers",
            "ls",
            &format!("{}/x:t", srv.addr()),
        ],
        Duration::from_secs(60),
    );
    let e = error_line(&run);
    assert!(e.contains("only https"), "{e}");
}

#[test]
fn control_characters_in_registry_errors_never_reach_the_terminal() {
    let srv = serve(image_with(vec![], None), |req, s| {
        if req.path.contains("/manifests/") {
            respond(
                s,
                "404 Not Found",
                &[("Content-Type", "application/json")],
                b"{\"errors\":[{\"code\":\"MANIFEST_UNKNOWN\",\"message\":\"gone\\u001b[2J\\u001b]0;owned\\u0007\"}]}",
            );
            return true;
        }
        false
    });
    let run = measured(
        &env(),
        &["inspect", &format!("{}/x:t", srv.addr())],
        Duration::from_secs(30),
    );
    let e = error_line(&run);
    assert!(e.contains("MANIFEST_UNKNOWN"), "{e}");
    assert!(
        !run.stderr.contains('\x1b') && !run.stderr.contains('\x07'),
        "{:?}",
        run.stderr
    );
}

/// Counts requests whose path contains `part`.
fn counter() -> Arc<AtomicUsize> {
    Arc::new(AtomicUsize::new(0))
}

#[test]
fn a_truncated_manifest_and_a_damaged_config_and_layer_are_fetched_again() {
    let layer = small_layer("etc/hello", b"hello\n");
    let img = image_with(vec![layer.clone()], None);
    let (manifest, config) = (img.manifest.clone(), img.config.clone());
    let config_digest = sha256(&config);
    let (m, c, l) = (counter(), counter(), counter());
    let (m2, c2, l2) = (Arc::clone(&m), Arc::clone(&c), Arc::clone(&l));
    let srv = serve(img, move |req, s| {
        let first = |n: &AtomicUsize| n.fetch_add(1, Ordering::SeqCst) == 0;
        // The referrers fallback tag (a published gzip index is looked
        // for) is not the image's manifest.
        let image_manifest = req.path.contains("/manifests/") && !req.path.contains("/sha256-");
        if image_manifest && first(&m2) {
            // Promises the whole manifest, sends half, closes cleanly.
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {MT}\r\nContent-Length: {}\r\n\r\n",
                manifest.len()
            );
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(&manifest[..manifest.len() / 2]);
            return true;
        }
        let flipped = |b: &[u8]| {
            let mut b = b.to_vec();
            let mid = b.len() / 2;
            b[mid] ^= 1;
            b
        };
        if req.path.ends_with(&config_digest) && first(&c2) {
            respond(s, "200 OK", &[], &flipped(&config));
            return true;
        }
        if req.path.ends_with(&layer.digest) && first(&l2) {
            respond(s, "200 OK", &[], &flipped(&layer.bytes));
            return true;
        }
        false
    });
    let run = measured(
        &env(),
        &["cat", &format!("{}/x:t", srv.addr()), "/etc/hello"],
        Duration::from_secs(60),
    );
    assert!(run.ok, "{}", run.stderr);
    assert!(run.stderr.contains("retrying in"), "{}", run.stderr);
    assert_eq!(m.load(Ordering::SeqCst), 2);
    assert_eq!(c.load(Ordering::SeqCst), 2);
    assert_eq!(l.load(Ordering::SeqCst), 2);
}

#[test]
fn not_found_is_never_retried_and_a_refusal_gets_one_renewal_only() {
    let n = counter();
    let n2 = Arc::clone(&n);
    let srv = serve(image_with(vec![], None), move |req, s| {
        if req.path.contains("/manifests/") {
            n2.fetch_add(1, Ordering::SeqCst);
            let status = if req.path.contains("/gone/") {
                "404 Not Found"
            } else {
                "401 Unauthorized"
            };
            respond(s, status, &[("WWW-Authenticate", "Basic realm=\"r\"")], b"");
            return true;
        }
        false
    });
    let env = env().set("RIMG_USERNAME", "u").set("RIMG_PASSWORD", "p");
    let run = measured(
        &env,
        &["inspect", &format!("{}/gone/x:t", srv.addr())],
        Duration::from_secs(30),
    );
    assert!(error_line(&run).contains("NOT_FOUND"));
    assert_eq!(n.swap(0, Ordering::SeqCst), 1, "404 asked once");
    let run = measured(
        &env,
        &["inspect", &format!("{}/private/x:t", srv.addr())],
        Duration::from_secs(30),
    );
    assert!(error_line(&run).contains("authentication refused"));
    assert_eq!(n.load(Ordering::SeqCst), 2, "401: one renewal, no more");
}

#[test]
fn inside_a_mount_a_stalled_layer_answers_eio_within_the_deadline() {
    let layer = small_layer("etc/hello", b"hello\n");
    let digest = layer.digest.clone();
    let srv = serve(image_with(vec![layer], None), move |req, _s| {
        if req.path.ends_with(&digest) {
            std::thread::sleep(Duration::from_secs(300));
            return true;
        }
        false
    });
    let env = env();
    let m = Mounted::new(&env, &format!("{}/x:t", srv.addr()), &[]);
    let started = Instant::now();
    let e = std::fs::read(m.path.join("etc/hello")).unwrap_err();
    let secs = started.elapsed().as_secs_f64();
    eprintln!("EIO after {secs:.1} s");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(secs < 14.0, "{secs} s");
    let _ = env.run(&["umount", &m.path.display().to_string()]);
}

#[test]
fn tags_with_control_sequences_are_left_out_of_the_listing() {
    let srv = serve(image_with(vec![], None), |req, s| {
        if req.path.contains("/tags/list") {
            respond(
                s,
                "200 OK",
                &[("Content-Type", "application/json")],
                b"{\"name\":\"x\",\"tags\":[\"1.0\",\"\\u001b[2Jevil\",\"latest\"]}",
            );
            return true;
        }
        false
    });
    let out = env().run(&["tags", &format!("{}/x", srv.addr())]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1.0\nlatest\n");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("1 tags that are not valid"), "{err}");
    assert!(!err.contains('\x1b'));
}

#[test]
fn a_tag_list_link_to_another_host_is_not_followed_with_credentials() {
    let other = Hostile::start(|_, s| respond(s, "200 OK", &[], br#"{"tags":["stolen"]}"#));
    let next = format!(
        "<http://{}/v2/x/tags/list?n=100&last=a>; rel=\"next\"",
        other.addr()
    );
    let srv = serve(image_with(vec![], None), move |req, s| {
        if req.header("authorization").is_none() {
            respond(
                s,
                "401 Unauthorized",
                &[("WWW-Authenticate", "Basic realm=\"r\"")],
                b"",
            );
            return true;
        }
        if req.path.contains("/tags/list") {
            respond(s, "200 OK", &[("Link", &next)], br#"{"tags":["a"]}"#);
            return true;
        }
        false
    });
    let env = env().set("RIMG_USERNAME", "u").set("RIMG_PASSWORD", "p");
    let run = measured(
        &env,
        &["tags", &format!("{}/x", srv.addr())],
        Duration::from_secs(30),
    );
    assert!(error_line(&run).contains("points to another host"));
    assert_eq!(other.requests.load(Ordering::SeqCst), 0);
}

#[test]
fn a_layer_trickled_a_few_bytes_at_a_time_fails_within_the_deadline() {
    // Incompressible, so the blob is large enough to trickle for long.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let noise: Vec<u8> = (0..300_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let layer = small_layer("etc/big", &noise);
    let (digest, bytes) = (layer.digest.clone(), layer.bytes.clone());
    let srv = serve(image_with(vec![layer], None), move |req, s| {
        if req.path.ends_with(&digest) {
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                bytes.len()
            );
            let _ = s.write_all(head.as_bytes());
            // 100 bytes every 200 ms: never silent for a stall timeout,
            // never done.
            for c in bytes.chunks(100) {
                if s.write_all(c).is_err() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            return true;
        }
        false
    });
    let run = measured(
        &env(),
        &["ls", &format!("{}/x:t", srv.addr())],
        Duration::from_secs(60),
    );
    let e = error_line(&run);
    assert!(e.contains("sent only") && e.contains("in 8 s"), "{e}");
    check_bounded(&run, 12.0);
}

/// How often `needle` occurs in `hay`.
fn occurrences(hay: &str, needle: &str) -> usize {
    hay.matches(needle).count()
}

#[test]
fn layer_errors_are_one_line_naming_image_layer_and_cause_once() {
    let corrupt = small_layer("etc/corrupt", b"corrupt\n");
    let missing = small_layer("etc/missing", b"missing\n");
    let garbage = {
        // Bytes that are neither gzip nor a tar, under their true digest.
        let bytes = b"this is not a layer at all".repeat(40);
        let mut b = corrupt.clone();
        b.digest = sha256(&bytes);
        b.diff_id = sha256(&bytes);
        b.bytes = bytes;
        b
    };
    let cases: [(Blob, &str); 3] = [
        (corrupt, "does not match the digest"),
        (missing, "blob unknown to registry"),
        (garbage, "layer"),
    ];
    for (i, (layer, cause)) in cases.into_iter().enumerate() {
        let digest = layer.digest.clone();
        let damaged = i == 0;
        let gone = i == 1;
        let img = image_with(vec![layer.clone()], None);
        let srv = serve(img, move |req, s| {
            if damaged && req.path.ends_with(&layer.digest) {
                let mut b = layer.bytes.clone();
                let mid = b.len() / 2;
                b[mid] ^= 1;
                respond(s, "200 OK", &[], &b);
                return true;
            }
            if gone && req.path.ends_with(&layer.digest) {
                respond(
                    s,
                    "404 Not Found",
                    &[("Content-Type", "application/json")],
                    br#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry"}]}"#,
                );
                return true;
            }
            false
        });
        let image = format!("{}/x:t", srv.addr());
        let run = measured(
            &env(),
            &["cat", &image, "/etc/hello"],
            Duration::from_secs(60),
        );
        let line = error_line(&run);
        assert!(line.contains(&image), "names the image: {line}");
        assert_eq!(occurrences(&line, &digest), 1, "the digest once: {line}");
        assert!(line.contains(cause), "says why: {line}");
        // Not even a shortened form a second time.
        assert_eq!(occurrences(&line, &digest[7..19]), 1, "{line}");
    }
}
