//! A TCP forwarder in front of a registry that counts the bytes the
//! registry sends (headers included, so an upper bound on the blob bytes),
//! records the requests clients make (method, path, Range header), and can
//! hold the registry's bytes to a rate: how the tests and the benchmark
//! measure what a range-lazy read costs on the wire.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One HTTP request as a client sent it through the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub struct Request {
    pub method: String,
    pub path: String,
    /// The `Range` header's value, when there is one.
    pub range: Option<String>,
}

#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub struct CountingProxy {
    pub port: u16,
    sent: Arc<AtomicU64>,
    requests: Arc<Mutex<Vec<Request>>>,
}

#[allow(dead_code)] // not every test binary that compiles tests/common uses it
impl CountingProxy {
    /// Forwards to `upstream` (`host:port`); `rate` bytes/s when given.
    pub fn start(upstream: &str, rate: Option<u64>) -> CountingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let sent = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let upstream = upstream.to_string();
        let counter = Arc::clone(&sent);
        let log = Arc::clone(&requests);
        // One rate for all connections: each chunk books the wire after
        // the chunks before it.
        let wire = Arc::new(Mutex::new(Instant::now()));
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(up) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let (c2, u2) = (client.try_clone().unwrap(), up.try_clone().unwrap());
                let log = Arc::clone(&log);
                std::thread::spawn(move || pipe(c2, u2, Tap::Requests(log, Vec::new()), None));
                let counter = Arc::clone(&counter);
                let limit = rate.map(|r| (r, Arc::clone(&wire)));
                std::thread::spawn(move || pipe(up, client, Tap::Count(counter), limit));
            }
        });
        CountingProxy {
            port,
            sent,
            requests,
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Bytes sent by the registry so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Requests made so far, in the order their request lines arrived.
    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    /// Requests so far for the blob `digest`.
    pub fn blob_requests(&self, digest: &str) -> Vec<Request> {
        let tail = format!("/blobs/{digest}");
        self.requests()
            .into_iter()
            .filter(|r| r.path.ends_with(&tail))
            .collect()
    }

    /// Forgets the bytes and requests counted so far.
    pub fn reset(&self) {
        self.sent.store(0, Ordering::Relaxed);
        self.requests.lock().unwrap().clear();
    }
}

type Limit = (u64, Arc<Mutex<Instant>>);

/// What a pipe notes about the bytes it forwards.
enum Tap {
    /// Registry to client: the byte count.
    Count(Arc<AtomicU64>),
    /// Client to registry: request lines and Range headers, parsed from the
    /// stream (with the partial line carried between reads). Pulls send no
    /// request bodies, so every line is a request or header line.
    Requests(Arc<Mutex<Vec<Request>>>, Vec<u8>),
}

impl Tap {
    fn note(&mut self, bytes: &[u8]) {
        match self {
            Tap::Count(c) => {
                c.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            }
            Tap::Requests(log, partial) => {
                partial.extend_from_slice(bytes);
                while let Some(end) = partial.windows(2).position(|w| w == b"\r\n") {
                    let line = String::from_utf8_lossy(&partial[..end]).into_owned();
                    partial.drain(..end + 2);
                    let mut log = log.lock().unwrap();
                    if let Some(value) = line
                        .split_once(':')
                        .filter(|(k, _)| k.eq_ignore_ascii_case("range"))
                        .map(|(_, v)| v.trim().to_string())
                    {
                        if let Some(last) = log.last_mut() {
                            last.range = Some(value);
                        }
                        continue;
                    }
                    let mut parts = line.split(' ');
                    if let (Some(method), Some(path), Some(version)) =
                        (parts.next(), parts.next(), parts.next())
                        && version.starts_with("HTTP/")
                    {
                        log.push(Request {
                            method: method.to_string(),
                            path: path.to_string(),
                            range: None,
                        });
                    }
                }
            }
        }
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream, mut tap: Tap, limit: Option<Limit>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        tap.note(&buf[..n]);
        if let Some((rate, wire)) = &limit {
            let until = {
                let mut next = wire.lock().unwrap();
                *next =
                    (*next).max(Instant::now()) + Duration::from_secs_f64(n as f64 / *rate as f64);
                *next
            };
            if let Some(wait) = until.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
