//! A front for a registry that answers blob GETs with a 307 to another host
//! (`localhost` instead of `127.0.0.1`, like a CDN), which serves the blob from
//! the registry's storage and records whether it was sent credentials.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::Registry;

#[derive(Default)]
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
struct Seen {
    /// Requests still to refuse with `refuse_status` before forwarding any.
    refuse_left: AtomicUsize,
    refused: AtomicUsize,
    ranges: AtomicUsize,
    redirected: AtomicUsize,
    cdn_requests: AtomicUsize,
    cdn_auth: AtomicBool,
    registry_auth: AtomicBool,
}

#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub struct RedirectProxy {
    port: u16,
    seen: Arc<Seen>,
}

#[allow(dead_code)] // not every test binary that compiles tests/common uses it
struct Request {
    head: Vec<String>,
    body: Vec<u8>,
}

#[allow(dead_code)] // not every test binary that compiles tests/common uses it
fn read_request(r: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end().to_string();
        if line.is_empty() {
            break;
        }
        head.push(line);
    }
    let len = head
        .iter()
        .find_map(|h| {
            let (k, v) = h.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    Some(Request { head, body })
}

#[allow(dead_code)] // not every test binary that compiles tests/common uses it
fn has_auth(req: &Request) -> bool {
    req.head
        .iter()
        .any(|h| h.to_ascii_lowercase().starts_with("authorization:"))
}

impl RedirectProxy {
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn start(reg: &Registry) -> RedirectProxy {
        Self::start_with(reg, None, None)
    }

    /// The redirected host serves at most `rate` bytes/s.
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn start_throttled(reg: &Registry, rate: Option<usize>) -> RedirectProxy {
        Self::start_with(reg, rate, None)
    }

    /// The first blob response is cut after `cut` bytes; later ones honour `Range`.
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn start_flaky(reg: &Registry, cut: usize) -> RedirectProxy {
        Self::start_with(reg, None, Some(cut))
    }

    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    fn start_with(reg: &Registry, rate: Option<usize>, cut: Option<usize>) -> RedirectProxy {
        let cut_done = Arc::new(AtomicBool::new(cut.is_none()));
        let front = TcpListener::bind("127.0.0.1:0").unwrap();
        let cdn = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = front.local_addr().unwrap().port();
        let cdn_port = cdn.local_addr().unwrap().port();
        let seen = Arc::new(Seen::default());
        let upstream = reg.addr();
        let storage: PathBuf = reg.dir.path().join("data/docker/registry/v2/blobs/sha256");

        let s = Arc::clone(&seen);
        std::thread::spawn(move || {
            for conn in front.incoming().flatten() {
                let s = Arc::clone(&s);
                let upstream = upstream.clone();
                std::thread::spawn(move || {
                    let mut r = BufReader::new(conn.try_clone().unwrap());
                    let mut out = conn;
                    while let Some(req) = read_request(&mut r) {
                        if has_auth(&req) {
                            s.registry_auth.store(true, Ordering::SeqCst);
                        }
                        let left = s.refuse_left.load(Ordering::SeqCst);
                        if left > 0
                            && s.refuse_left
                                .compare_exchange(
                                    left,
                                    left - 1,
                                    Ordering::SeqCst,
                                    Ordering::SeqCst,
                                )
                                .is_ok()
                        {
                            s.refused.fetch_add(1, Ordering::SeqCst);
                            let head = if left % 2 == 0 {
                                "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n"
                            } else {
                                "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
                            };
                            let _ = out.write_all(head.as_bytes());
                            continue;
                        }
                        let target = req.head[0].split(' ').nth(1).unwrap_or("").to_string();
                        if req.head[0].starts_with("GET ") && target.contains("/blobs/sha256:") {
                            s.redirected.fetch_add(1, Ordering::SeqCst);
                            let digest = target.rsplit('/').next().unwrap().to_string();
                            let _ = write!(
                                out,
                                "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://localhost:{cdn_port}/cdn/{digest}\r\nContent-Length: 0\r\n\r\n"
                            );
                            continue;
                        }
                        // Forward verbatim, one request per upstream connection.
                        let Ok(mut up) = TcpStream::connect(&upstream) else {
                            return;
                        };
                        let mut head = String::new();
                        for h in &req.head {
                            if !h.to_ascii_lowercase().starts_with("connection:") {
                                head.push_str(h);
                                head.push_str("\r\n");
                            }
                        }
                        head.push_str("Connection: close\r\n\r\n");
                        let _ = up.write_all(head.as_bytes());
                        let _ = up.write_all(&req.body);
                        let mut resp = Vec::new();
                        let _ = up.read_to_end(&mut resp);
                        let _ = out.write_all(&resp);
                        return;
                    }
                });
            }
        });

        let s = Arc::clone(&seen);
        std::thread::spawn(move || {
            for conn in cdn.incoming().flatten() {
                let s = Arc::clone(&s);
                let storage = storage.clone();
                let cut_done = Arc::clone(&cut_done);
                std::thread::spawn(move || {
                    let mut r = BufReader::new(conn.try_clone().unwrap());
                    let mut out = conn;
                    while let Some(req) = read_request(&mut r) {
                        s.cdn_requests.fetch_add(1, Ordering::SeqCst);
                        if has_auth(&req) {
                            s.cdn_auth.store(true, Ordering::SeqCst);
                        }
                        let target = req.head[0].split(' ').nth(1).unwrap_or("");
                        let hex = target.rsplit("sha256:").next().unwrap_or("");
                        let path = storage
                            .join(hex.get(..2).unwrap_or("xx"))
                            .join(hex)
                            .join("data");
                        let range = req.head.iter().find_map(|h| {
                            let (k, v) = h.split_once(':')?;
                            let v = v.trim().strip_prefix("bytes=")?.strip_suffix('-')?;
                            k.eq_ignore_ascii_case("range")
                                .then(|| v.parse::<usize>().ok())?
                        });
                        match std::fs::read(path) {
                            Ok(data)
                                if data.len() > 4096 && !cut_done.swap(true, Ordering::SeqCst) =>
                            {
                                // Promise everything, send a part, hang up.
                                let _ = write!(
                                    out,
                                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                                    data.len()
                                );
                                let _ = out.write_all(&data[..cut.unwrap_or(0).min(data.len())]);
                                return;
                            }
                            Ok(data) if range.is_some() => {
                                s.ranges.fetch_add(1, Ordering::SeqCst);
                                let from = range.unwrap_or(0).min(data.len());
                                let _ = write!(
                                    out,
                                    "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {from}-{}/{}\r\nContent-Length: {}\r\n\r\n",
                                    data.len().saturating_sub(1),
                                    data.len(),
                                    data.len() - from
                                );
                                let _ = out.write_all(&data[from..]);
                            }
                            Ok(data) => {
                                let _ = write!(
                                    out,
                                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                                    data.len()
                                );
                                match rate {
                                    None => {
                                        let _ = out.write_all(&data);
                                    }
                                    Some(rate) => {
                                        let chunk = (rate / 20).max(1);
                                        for c in data.chunks(chunk) {
                                            if out.write_all(c).is_err() {
                                                return;
                                            }
                                            std::thread::sleep(std::time::Duration::from_millis(
                                                50,
                                            ));
                                        }
                                    }
                                }
                            }
                            Err(_) => {
                                let _ = write!(
                                    out,
                                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
                                );
                            }
                        }
                    }
                });
            }
        });
        RedirectProxy { port, seen }
    }

    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Answers the next `n` requests with 503 and 429 (Retry-After: 1) in turn.
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn refuse_next(&self, n: usize) {
        self.seen.refuse_left.store(n, Ordering::SeqCst);
    }

    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn refused(&self) -> usize {
        self.seen.refused.load(Ordering::SeqCst)
    }

    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn range_requests(&self) -> usize {
        self.seen.ranges.load(Ordering::SeqCst)
    }

    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn redirected(&self) -> usize {
        self.seen.redirected.load(Ordering::SeqCst)
    }

    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn cdn_requests(&self) -> usize {
        self.seen.cdn_requests.load(Ordering::SeqCst)
    }

    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn cdn_saw_authorization(&self) -> bool {
        self.seen.cdn_auth.load(Ordering::SeqCst)
    }

    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn registry_saw_authorization(&self) -> bool {
        self.seen.registry_auth.load(Ordering::SeqCst)
    }
}

/// Faults a [`FaultProxy`] injects, in the order of its counters.
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub const FAULTS: [&str; 6] = [
    "503",
    "429",
    "reset mid-body",
    "truncated body, clean close",
    "trickle",
    "flipped byte",
];

/// A forwarding proxy in front of a registry that, on about one request in
/// `one_in`, injects one of [`FAULTS`], drawn from a seeded generator: the
/// same seed gives the same mix of faults (their order across concurrent
/// requests may vary).
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub struct FaultProxy {
    port: u16,
    pub requests: Arc<AtomicUsize>,
    pub injected: Arc<[AtomicUsize; 6]>,
}

/// xorshift64*: small, seeded, good enough to pick faults.
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
struct Rng(u64);
impl Rng {
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Closes with a TCP RST instead of a FIN.
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
fn reset(stream: TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(stream);
}

impl FaultProxy {
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn start(reg: &Registry, seed: u64, one_in: u64) -> FaultProxy {
        let front = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = front.local_addr().unwrap().port();
        let upstream = reg.addr();
        let rng = Arc::new(std::sync::Mutex::new(Rng(seed.max(1))));
        let requests = Arc::new(AtomicUsize::new(0));
        let injected: Arc<[AtomicUsize; 6]> = Arc::new(Default::default());
        let (reqs, inj) = (Arc::clone(&requests), Arc::clone(&injected));
        std::thread::spawn(move || {
            for conn in front.incoming().flatten() {
                let (rng, reqs, inj) = (Arc::clone(&rng), Arc::clone(&reqs), Arc::clone(&inj));
                let upstream = upstream.clone();
                std::thread::spawn(move || {
                    let mut r = BufReader::new(conn.try_clone().unwrap());
                    let mut out = conn;
                    let Some(req) = read_request(&mut r) else {
                        return;
                    };
                    reqs.fetch_add(1, Ordering::SeqCst);
                    let fault = {
                        let x = rng.lock().unwrap().next();
                        (x % one_in == 0).then_some(((x / one_in) % 6) as usize)
                    };
                    if let Some(f) = fault {
                        inj[f].fetch_add(1, Ordering::SeqCst);
                    }
                    let canned = match fault {
                        Some(0) => Some("503 Service Unavailable\r\n"),
                        Some(1) => Some("429 Too Many Requests\r\nRetry-After: 1\r\n"),
                        _ => None,
                    };
                    if let Some(c) = canned {
                        let _ = write!(
                            out,
                            "HTTP/1.1 {c}Content-Length: 0\r\nConnection: close\r\n\r\n"
                        );
                        return;
                    }
                    let Ok(mut up) = TcpStream::connect(&upstream) else {
                        return;
                    };
                    let mut head = String::new();
                    for h in &req.head {
                        if !h.to_ascii_lowercase().starts_with("connection:") {
                            head.push_str(h);
                            head.push_str("\r\n");
                        }
                    }
                    head.push_str("Connection: close\r\n\r\n");
                    let _ = up.write_all(head.as_bytes());
                    let _ = up.write_all(&req.body);
                    let mut resp = Vec::new();
                    let _ = up.read_to_end(&mut resp);
                    let split = resp
                        .windows(4)
                        .position(|w| w == b"\r\n\r\n")
                        .map_or(resp.len(), |p| p + 4);
                    let (head, body) = resp.split_at(split);
                    let mut body = body.to_vec();
                    let half = body.len() / 2;
                    let _ = out.write_all(head);
                    match fault {
                        Some(2) if !body.is_empty() => {
                            let _ = out.write_all(&body[..half]);
                            let _ = out.flush();
                            reset(out);
                        }
                        Some(3) if !body.is_empty() => {
                            let _ = out.write_all(&body[..half]);
                            let _ = out.shutdown(std::net::Shutdown::Write);
                        }
                        Some(4) => {
                            for c in body.chunks(16 << 10) {
                                if out.write_all(c).is_err() {
                                    return;
                                }
                                std::thread::sleep(std::time::Duration::from_millis(5));
                            }
                        }
                        Some(5) if !body.is_empty() => {
                            body[half] ^= 0x01;
                            let _ = out.write_all(&body);
                        }
                        _ => {
                            let _ = out.write_all(&body);
                        }
                    }
                });
            }
        });
        FaultProxy {
            port,
            requests,
            injected,
        }
    }

    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Faults injected so far, by kind.
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn summary(&self) -> String {
        FAULTS
            .iter()
            .zip(self.injected.iter())
            .map(|(name, n)| format!("{name}: {}", n.load(Ordering::SeqCst)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}
