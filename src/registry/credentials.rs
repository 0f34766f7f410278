//! Where registry credentials come from, first match wins: explicit ones,
//! `RIMG_USERNAME`/`RIMG_PASSWORD`, the podman/skopeo auth file, then docker's
//! config (`auths`, `credHelpers`, `credsStore`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine;
use serde::Deserialize;

use super::RegistryError;

/// Credentials for one registry. `Debug` never prints the secret.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    /// An OAuth2 refresh token (docker's `identitytoken`), exchanged for access tokens.
    pub identity_token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Looks credentials up for registries; the environment is captured once.
#[derive(Debug, Clone, Default)]
pub struct CredentialStore {
    explicit: Option<Credentials>,
    auth_files: Vec<PathBuf>,
    docker_config: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
struct AuthFile {
    #[serde(default)]
    auths: std::collections::HashMap<String, AuthEntry>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: std::collections::HashMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

#[derive(Deserialize)]
struct HelperReply {
    #[serde(rename = "Username")]
    username: String,
    #[serde(rename = "Secret")]
    secret: String,
}

impl CredentialStore {
    /// `explicit` (from `--username`/`--password-stdin`) beats everything; then the
    /// environment and the usual files, as podman and docker look them up.
    pub fn from_env(explicit: Option<Credentials>) -> CredentialStore {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let explicit = explicit.or_else(|| {
            Some(Credentials {
                username: env("RIMG_USERNAME")?,
                password: env("RIMG_PASSWORD")?,
                identity_token: None,
            })
        });
        let mut auth_files = Vec::new();
        if let Some(f) = env("REGISTRY_AUTH_FILE") {
            auth_files.push(PathBuf::from(f));
        } else if let Some(dir) = env("XDG_RUNTIME_DIR") {
            auth_files.push(Path::new(&dir).join("containers/auth.json"));
        }
        let docker_config = env("DOCKER_CONFIG")
            .map(|d| Path::new(&d).join("config.json"))
            .or_else(|| env("HOME").map(|h| Path::new(&h).join(".docker/config.json")));
        CredentialStore {
            explicit,
            auth_files,
            docker_config,
        }
    }

    /// Credentials for `registry` (as in a reference: `docker.io`, `host:port`).
    pub fn lookup(&self, registry: &str) -> Result<Option<Credentials>, RegistryError> {
        if let Some(c) = &self.explicit {
            return Ok(Some(c.clone()));
        }
        for file in &self.auth_files {
            if let Some(parsed) = read_auth_file(file)?
                && let Some(c) = from_auths(&parsed, registry, file)?
            {
                return Ok(Some(c));
            }
        }
        let Some(file) = &self.docker_config else {
            return Ok(None);
        };
        let Some(parsed) = read_auth_file(file)? else {
            return Ok(None);
        };
        if let Some((_, helper)) = parsed
            .cred_helpers
            .iter()
            .find(|(k, _)| key_matches(k, registry))
        {
            return run_helper(helper, registry);
        }
        if let Some(c) = from_auths(&parsed, registry, file)? {
            return Ok(Some(c));
        }
        if let Some(store) = &parsed.creds_store {
            return run_helper(store, registry);
        }
        Ok(None)
    }
}

fn read_auth_file(path: &Path) -> Result<Option<AuthFile>, RegistryError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(RegistryError::Credentials(format!(
                "cannot read {}: {e}",
                path.display()
            )));
        }
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        RegistryError::Credentials(format!("{} is not valid JSON: {e}", path.display()))
    })
}

fn from_auths(
    file: &AuthFile,
    registry: &str,
    path: &Path,
) -> Result<Option<Credentials>, RegistryError> {
    let Some((key, entry)) = file.auths.iter().find(|(k, _)| key_matches(k, registry)) else {
        return Ok(None);
    };
    let bad = |why: &str| {
        RegistryError::Credentials(format!(
            "entry {key:?} in {} is unusable: {why}",
            path.display()
        ))
    };
    let (mut username, mut password) = (
        entry.username.clone().unwrap_or_default(),
        entry.password.clone().unwrap_or_default(),
    );
    if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|_| bad("\"auth\" is not base64"))?;
        let decoded = String::from_utf8(decoded).map_err(|_| bad("\"auth\" is not UTF-8"))?;
        let (u, p) = decoded
            .split_once(':')
            .ok_or_else(|| bad("\"auth\" is not user:password"))?;
        username = u.to_string();
        password = p.to_string();
    }
    let identity_token = entry.identitytoken.clone().filter(|t| !t.is_empty());
    if username.is_empty() && identity_token.is_none() {
        return Ok(None);
    }
    Ok(Some(Credentials {
        username,
        password,
        identity_token,
    }))
}

/// Auth-file keys may be a bare host, a URL (`https://index.docker.io/v1/`), or a
/// host with a repository path (podman); all name the registry by host.
fn key_matches(key: &str, registry: &str) -> bool {
    let host = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = host.split('/').next().unwrap_or(host);
    let canon = |h: &str| match h {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => "docker.io".to_string(),
        other => other.to_ascii_lowercase(),
    };
    canon(host) == canon(registry)
}

fn helper_server_url(registry: &str) -> String {
    if registry == crate::reference::DOCKER_HUB {
        "https://index.docker.io/v1/".to_string()
    } else {
        registry.to_string()
    }
}

fn run_helper(helper: &str, registry: &str) -> Result<Option<Credentials>, RegistryError> {
    let program = format!("docker-credential-{helper}");
    let fail = |why: String| RegistryError::Credentials(format!("{program} get: {why}"));
    let mut child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot run: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(helper_server_url(registry).as_bytes())
            .map_err(|e| fail(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stdout).trim().to_string();
        // Helpers say "credentials not found in native keychain" for an unknown host.
        if msg.to_ascii_lowercase().contains("not found") {
            return Ok(None);
        }
        return Err(fail(format!("exited with {}", out.status)));
    }
    let reply: HelperReply = serde_json::from_slice(&out.stdout).map_err(|e| {
        fail(format!(
            "printed something other than credentials JSON: {e}"
        ))
    })?;
    // Helpers mark identity tokens with the user name "<token>".
    Ok(Some(if reply.username == "<token>" {
        Credentials {
            username: String::new(),
            password: String::new(),
            identity_token: Some(reply.secret),
        }
    } else {
        Credentials {
            username: reply.username,
            password: reply.secret,
            identity_token: None,
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_v1_key_matches_docker_io() {
        assert!(key_matches("https://index.docker.io/v1/", "docker.io"));
        assert!(key_matches("docker.io", "docker.io"));
        assert!(!key_matches("https://index.docker.io/v1/", "ghcr.io"));
    }

    #[test]
    fn podman_keys_with_repository_paths_match_their_host() {
        assert!(key_matches("quay.io/org/repo", "quay.io"));
        assert!(key_matches("localhost:5000", "localhost:5000"));
        assert!(!key_matches("localhost:5000", "localhost:5001"));
    }

    #[test]
    fn auth_field_decodes_user_and_password() {
        let file: AuthFile =
            serde_json::from_str(r#"{"auths":{"r.example":{"auth":"dXNlcjpwYTpzcw=="}}}"#).unwrap();
        let c = from_auths(&file, "r.example", Path::new("x"))
            .unwrap()
            .unwrap();
        assert_eq!(c.username, "user");
        assert_eq!(c.password, "pa:ss");
    }

    #[test]
    fn identity_token_is_kept() {
        let file: AuthFile = serde_json::from_str(
            r#"{"auths":{"r.example":{"auth":"","identitytoken":"refresh"}}}"#,
        )
        .unwrap();
        let c = from_auths(&file, "r.example", Path::new("x"))
            .unwrap()
            .unwrap();
        assert_eq!(c.identity_token.as_deref(), Some("refresh"));
    }

    #[test]
    fn bad_base64_names_the_file_but_not_the_secret() {
        let file: AuthFile =
            serde_json::from_str(r#"{"auths":{"r.example":{"auth":"!!!secret"}}}"#).unwrap();
        let e = from_auths(&file, "r.example", Path::new("/cfg.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/cfg.json"), "{e}");
        assert!(!e.contains("secret"), "{e}");
    }

    #[test]
    fn debug_output_redacts_the_password() {
        let c = Credentials {
            username: "u".into(),
            password: "hunter2".into(),
            identity_token: None,
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
