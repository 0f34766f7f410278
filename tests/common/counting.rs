//! A TCP forwarder in front of a registry that counts the bytes the
//! registry sends (headers included, so an upper bound on the blob bytes),
//! and can hold them to a rate: how the tests and the benchmark measure what
//! a range-lazy read costs on the wire.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub struct CountingProxy {
    pub port: u16,
    sent: Arc<AtomicU64>,
}

#[allow(dead_code)] // not every test binary that compiles tests/common uses it
impl CountingProxy {
    /// Forwards to `upstream` (`host:port`); `rate` bytes/s when given.
    pub fn start(upstream: &str, rate: Option<u64>) -> CountingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let sent = Arc::new(AtomicU64::new(0));
        let upstream = upstream.to_string();
        let counter = Arc::clone(&sent);
        // One rate for all connections: each chunk books the wire after
        // the chunks before it.
        let wire = Arc::new(Mutex::new(Instant::now()));
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(up) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let (c2, u2) = (client.try_clone().unwrap(), up.try_clone().unwrap());
                std::thread::spawn(move || pipe(c2, u2, None, None));
                let counter = Arc::clone(&counter);
                let limit = rate.map(|r| (r, Arc::clone(&wire)));
                std::thread::spawn(move || pipe(up, client, Some(counter), limit));
            }
        });
        CountingProxy { port, sent }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Bytes sent by the registry so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    pub fn reset(&self) {
        self.sent.store(0, Ordering::Relaxed);
    }
}

type Limit = (u64, Arc<Mutex<Instant>>);

fn pipe(
    mut from: TcpStream,
    mut to: TcpStream,
    count: Option<Arc<AtomicU64>>,
    limit: Option<Limit>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(c) = &count {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
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
