//! A token server for distribution's token auth: RS256 JWTs signed with a key
//! whose self-signed certificate is the registry's `rootcertbundle` (sent in
//! the `x5c` header), so the registry verifies every token for real.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::{PASS, USER};

#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub const SERVICE: &str = "rimg-test-registry";
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub const ISSUER: &str = "rimg-test-issuer";
/// The identity token (OAuth2 refresh token) the server accepts.
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub const REFRESH_TOKEN: &str = "refresh-me-please";

#[derive(Default)]
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub struct Stats {
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub requests: usize,
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub posts: usize,
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub refused: usize,
}

#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub struct TokenServer {
    port: u16,
    dir: tempfile::TempDir,
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub stats: Arc<Mutex<Stats>>,
}

#[allow(dead_code)] // not every test binary that compiles tests/common uses it
struct Signer {
    key: PathBuf,
    x5c: String,
}

impl Signer {
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    fn sign(&self, repo: &str, actions: &[&str], ttl: u64) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]});
        let access: Vec<serde_json::Value> = if actions.is_empty() {
            vec![]
        } else {
            vec![serde_json::json!({"type": "repository", "name": repo, "actions": actions})]
        };
        let claims = serde_json::json!({
            "iss": ISSUER, "sub": USER, "aud": SERVICE,
            "exp": now + ttl, "nbf": now - 5, "iat": now,
            "jti": format!("{now}-{}", rand_u64()),
            "access": access,
        });
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut child = Command::new("openssl")
            .args(["dgst", "-sha256", "-sign"])
            .arg(&self.key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "openssl signing failed");
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(out.stdout))
    }
}

#[allow(dead_code)] // not every test binary that compiles tests/common uses it
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    h.finish()
}

impl TokenServer {
    /// `public` repositories allow anonymous pulls; tokens live `ttl` seconds.
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn start(public: &[&str], ttl: u64) -> TokenServer {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        let cert = dir.path().join("cert.pem");
        super::run_ok(
            Command::new("openssl")
                .args([
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                ])
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&cert)
                .args(["-subj", "/CN=rimg-test-token"])
                .stderr(Stdio::null()),
        );
        let der = Command::new("openssl")
            .args(["x509", "-outform", "der", "-in"])
            .arg(&cert)
            .output()
            .unwrap()
            .stdout;
        let signer = Arc::new(Signer {
            key,
            x5c: super::b64(&der),
        });
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stats = Arc::new(Mutex::new(Stats::default()));
        let public: Vec<String> = public.iter().map(|s| s.to_string()).collect();
        let st = Arc::clone(&stats);
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let signer = Arc::clone(&signer);
                let st = Arc::clone(&st);
                let public = public.clone();
                std::thread::spawn(move || {
                    let _ = handle(conn, &signer, &st, &public, ttl);
                });
            }
        });
        TokenServer { port, dir, stats }
    }

    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    /// A token for the harness itself (pushing).
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn mint(&self, repo: &str, actions: &[&str], ttl: u64) -> String {
        Signer {
            key: self.dir.path().join("key.pem"),
            x5c: {
                let der = Command::new("openssl")
                    .args(["x509", "-outform", "der", "-in"])
                    .arg(self.cert_path())
                    .output()
                    .unwrap()
                    .stdout;
                super::b64(&der)
            },
        }
        .sign(repo, actions, ttl)
    }

    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn requests(&self) -> usize {
        self.stats.lock().unwrap().requests
    }

    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn posts(&self) -> usize {
        self.stats.lock().unwrap().posts
    }
}

#[allow(dead_code)] // not every test binary that compiles tests/common uses it
fn query_pairs(s: &str) -> Vec<(String, String)> {
    url::form_urlencoded::parse(s.as_bytes())
        .into_owned()
        .collect()
}

#[allow(dead_code)] // not every test binary that compiles tests/common uses it
fn handle(
    conn: TcpStream,
    signer: &Signer,
    stats: &Mutex<Stats>,
    public: &[String],
    ttl: u64,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let mut auth = None;
    let mut length = 0usize;
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "authorization" => auth = Some(v.trim().to_string()),
                "content-length" => length = v.trim().parse().unwrap_or(0),
                _ => {}
            }
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    let mut params = query_pairs(target.split_once('?').map_or("", |(_, q)| q));
    let mut authenticated = false;
    let mut bad_credentials = false;
    if let Some(basic) = auth.as_deref().and_then(|a| a.strip_prefix("Basic ")) {
        use base64::engine::general_purpose::STANDARD;
        let decoded = STANDARD.decode(basic).unwrap_or_default();
        if decoded == format!("{USER}:{PASS}").as_bytes() {
            authenticated = true;
        } else {
            bad_credentials = true;
        }
    }
    {
        let mut s = stats.lock().unwrap();
        s.requests += 1;
        if method == "POST" {
            s.posts += 1;
        }
    }
    if method == "POST" {
        let form = query_pairs(&String::from_utf8_lossy(&body));
        let get = |k: &str| {
            form.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        match get("grant_type").as_deref() {
            Some("refresh_token") if get("refresh_token").as_deref() == Some(REFRESH_TOKEN) => {
                authenticated = true
            }
            Some("password")
                if get("username").as_deref() == Some(USER)
                    && get("password").as_deref() == Some(PASS) =>
            {
                authenticated = true
            }
            _ => bad_credentials = true,
        }
        params.extend(form);
    }
    let mut out = conn;
    if bad_credentials {
        stats.lock().unwrap().refused += 1;
        let body = r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#;
        return write!(
            out,
            "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
    let scope = params
        .iter()
        .find(|(k, _)| k == "scope")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let repo = scope.split(':').nth(1).unwrap_or("").to_string();
    let allowed: Vec<&str> = if authenticated {
        vec!["pull", "push"]
    } else if public.contains(&repo) {
        vec!["pull"]
    } else {
        vec![]
    };
    // Only what the scope asks for, as real token servers grant: a client
    // that forgets to ask for push cannot push.
    let asked = scope.split(':').nth(2).unwrap_or("");
    let actions: Vec<&str> = allowed
        .into_iter()
        .filter(|a| asked.split(',').any(|x| x == *a))
        .collect();
    let token = signer.sign(&repo, &actions, ttl);
    let body = serde_json::json!({
        "token": token, "access_token": token, "expires_in": ttl,
        "issued_at": "2026-01-01T00:00:00Z",
    })
    .to_string();
    write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}
