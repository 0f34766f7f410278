//! containers-registries.conf(5), as podman and skopeo read it: which files
//! (`CONTAINERS_REGISTRIES_CONF`, else `$HOME/.config/containers/registries.conf`,
//! else `/etc/containers/registries.conf`, then the `registries.conf.d`
//! drop-ins in name order, later settings winning), and what they say about a
//! reference: short-name aliases and `unqualified-search-registries`, the
//! `[[registry]]` with the longest matching `prefix` (its `location` rewrite,
//! `insecure`, `blocked`, and `[[registry.mirror]]`s). Trusts nothing it reads:
//! a file that does not parse is an error naming it.
//!
//! Where none of these files exists, rimg normalises as docker does
//! (`alpine` is `docker.io/library/alpine`); that stays so when the files set
//! no search registry and no alias for a short name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use url::Url;

use super::client::{Mirror, MirrorPulls, is_loopback};
use crate::reference::Reference;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{path}: {detail}")]
    File { path: String, detail: String },
    #[error("{reference}: registry {prefix} is blocked by {path}")]
    Blocked {
        reference: String,
        prefix: String,
        path: String,
    },
    #[error(
        "{reference}: rewritten by {path} to {rewritten:?}, which is not a reference: {detail}"
    )]
    Rewrite {
        reference: String,
        rewritten: String,
        path: String,
        detail: String,
    },
}

/// One `[[registry.mirror]]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MirrorConf {
    pub location: String,
    #[serde(default)]
    pub insecure: bool,
    /// `all` (default), `digest-only` or `tag-only`.
    #[serde(default, rename = "pull-from-mirror")]
    pub pull_from_mirror: Option<String>,
}

/// One `[[registry]]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RegistryConf {
    #[serde(default)]
    pub prefix: String,
    #[serde(default)]
    pub location: String,
    #[serde(default)]
    pub insecure: bool,
    #[serde(default)]
    pub blocked: bool,
    #[serde(default, rename = "mirror")]
    pub mirrors: Vec<MirrorConf>,
    #[serde(default, rename = "mirror-by-digest-only")]
    pub mirror_by_digest_only: bool,
}

#[derive(Debug, Default, Deserialize)]
struct FileConf {
    #[serde(default, rename = "registry")]
    registries: Vec<RegistryConf>,
    #[serde(rename = "unqualified-search-registries")]
    unqualified_search: Option<Vec<String>>,
    #[serde(default)]
    aliases: BTreeMap<String, String>,
}

/// The merged configuration, and the files it came from.
#[derive(Debug, Default, Clone)]
pub struct RegistriesConf {
    pub registries: Vec<RegistryConf>,
    pub unqualified_search: Vec<String>,
    pub aliases: BTreeMap<String, String>,
    /// The files read, in order (named in errors and logs).
    pub files: Vec<PathBuf>,
}

impl RegistriesConf {
    /// The files podman would read, from the environment; `None` when none
    /// of them exists (then docker's normalisation alone applies).
    pub fn load() -> Result<Option<RegistriesConf>, ConfigError> {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let user = home
            .as_ref()
            .map(|h| h.join(".config/containers/registries.conf"));
        let user_dir = home
            .as_ref()
            .map(|h| h.join(".config/containers/registries.conf.d"));
        let (main, dirs) = match std::env::var_os("CONTAINERS_REGISTRIES_CONF") {
            Some(p) => (
                Some(PathBuf::from(p)),
                vec![PathBuf::from("/etc/containers/registries.conf.d")]
                    .into_iter()
                    .chain(user_dir)
                    .collect(),
            ),
            // A user's own file replaces the system's, and the system's drop-ins.
            None if user.as_ref().is_some_and(|u| u.exists()) => {
                (user, user_dir.into_iter().collect::<Vec<_>>())
            }
            None => (
                Some(PathBuf::from("/etc/containers/registries.conf")),
                vec![PathBuf::from("/etc/containers/registries.conf.d")]
                    .into_iter()
                    .chain(user_dir)
                    .collect(),
            ),
        };
        let mut files: Vec<PathBuf> = main.into_iter().filter(|p| p.exists()).collect();
        for dir in dirs {
            let mut drop_ins: Vec<PathBuf> = std::fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "conf"))
                .collect();
            drop_ins.sort();
            files.extend(drop_ins);
        }
        if files.is_empty() {
            return Ok(None);
        }
        let mut conf = RegistriesConf::default();
        for f in files {
            let text = std::fs::read_to_string(&f).map_err(|e| ConfigError::File {
                path: f.display().to_string(),
                detail: e.to_string(),
            })?;
            conf.merge(&text, &f)?;
        }
        Ok(Some(conf))
    }

    /// Adds one file's settings: a `[[registry]]` replaces one of the same
    /// prefix, search registries replace the list, aliases add or replace.
    pub fn merge(&mut self, text: &str, path: &Path) -> Result<(), ConfigError> {
        let bad = |detail: String| ConfigError::File {
            path: path.display().to_string(),
            detail,
        };
        let file: FileConf = toml::from_str(text).map_err(|e| bad(one_line(&e.to_string())))?;
        for mut r in file.registries {
            r.location = trim_location(&r.location).map_err(&bad)?;
            r.prefix = if r.prefix.is_empty() {
                r.location.clone()
            } else {
                trim_location(&r.prefix).map_err(&bad)?
            };
            if r.location.is_empty() {
                r.location = r.prefix.clone();
            }
            if r.prefix.is_empty() {
                return Err(bad("a [[registry]] needs a prefix or a location".into()));
            }
            for m in &mut r.mirrors {
                m.location = trim_location(&m.location).map_err(&bad)?;
            }
            self.registries.retain(|o| o.prefix != r.prefix);
            self.registries.push(r);
        }
        if let Some(search) = file.unqualified_search {
            self.unqualified_search = search
                .iter()
                .map(|s| trim_location(s))
                .collect::<Result<_, _>>()
                .map_err(&bad)?;
        }
        self.aliases.extend(file.aliases);
        self.files.push(path.to_path_buf());
        Ok(())
    }

    fn source(&self) -> String {
        self.files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The references a user's `input` may name, in the order podman tries
    /// them: a short name's alias, else each search registry, else (no
    /// alias, no search registry) docker's normalisation.
    pub fn candidates(
        &self,
        input: &str,
    ) -> Result<Vec<Reference>, crate::reference::ReferenceError> {
        if !is_short_name(input) {
            return Ok(vec![Reference::parse(input)?]);
        }
        let (name, suffix) = split_name(input);
        if let Some(target) = self.aliases.get(name) {
            return Ok(vec![Reference::parse(&format!("{target}{suffix}"))?]);
        }
        if self.unqualified_search.is_empty() {
            return Ok(vec![Reference::parse(input)?]);
        }
        self.unqualified_search
            .iter()
            .map(|r| {
                // docker.io keeps its library/ namespace for one-component names.
                Reference::parse(&format!("{r}/{input}"))
            })
            .collect()
    }

    /// The `[[registry]]` whose prefix matches `reference` longest.
    pub fn find(&self, reference: &Reference) -> Option<&RegistryConf> {
        let full = reference.to_string();
        self.registries
            .iter()
            .filter(|r| matches_prefix(&full, &r.prefix))
            .max_by_key(|r| r.prefix.len())
    }

    /// `reference` as its `[[registry]]` rewrites it (`prefix` to
    /// `location`), or an error when that registry is blocked.
    pub fn rewrite(&self, reference: &Reference) -> Result<Reference, ConfigError> {
        let Some(r) = self.find(reference) else {
            return Ok(reference.clone());
        };
        if r.blocked {
            return Err(ConfigError::Blocked {
                reference: reference.to_string(),
                prefix: r.prefix.clone(),
                path: self.source(),
            });
        }
        let full = reference.to_string();
        let rewritten = if r.prefix.starts_with("*.") {
            full.clone()
        } else {
            format!("{}{}", r.location, &full[r.prefix.len()..])
        };
        Reference::parse(&rewritten).map_err(|e| ConfigError::Rewrite {
            reference: full.clone(),
            rewritten: rewritten.clone(),
            path: self.source(),
            detail: e.to_string(),
        })
    }

    /// The mirrors of every `[[registry]]`, for the registry its location
    /// names, in order. A mirror with a namespace path (`host/ns`) is left
    /// out with a warning: rimg's mirrors serve the same repository names.
    pub fn mirrors(&self) -> Vec<Mirror> {
        let mut out = Vec::new();
        for r in &self.registries {
            let registry = r.location.split('/').next().unwrap_or(&r.location);
            if r.location.contains('/') || r.prefix.starts_with("*.") {
                continue;
            }
            for m in &r.mirrors {
                if m.location.contains('/') {
                    tracing::warn!(
                        "{}: mirror {} of {} has a namespace path, which rimg does not use; skipped",
                        self.source(),
                        m.location,
                        r.location
                    );
                    continue;
                }
                let scheme = if m.insecure || is_loopback(&m.location) {
                    "http"
                } else {
                    "https"
                };
                let Ok(url) = Url::parse(&format!("{scheme}://{}", m.location)) else {
                    tracing::warn!(
                        "{}: mirror {:?} is not a host; skipped",
                        self.source(),
                        m.location
                    );
                    continue;
                };
                let pulls = match m.pull_from_mirror.as_deref() {
                    Some("digest-only") => MirrorPulls::DigestOnly,
                    Some("tag-only") => MirrorPulls::TagOnly,
                    _ if r.mirror_by_digest_only => MirrorPulls::DigestOnly,
                    _ => MirrorPulls::All,
                };
                out.push(Mirror {
                    registry: normalize_registry(registry),
                    url,
                    pulls,
                });
            }
        }
        out
    }

    /// Hosts (`host[:port]`) marked `insecure`: registries and mirrors that
    /// may speak plain HTTP or present a certificate that does not verify.
    pub fn insecure_hosts(&self) -> Vec<String> {
        let mut out = Vec::new();
        for r in &self.registries {
            if r.insecure {
                out.push(normalize_registry(
                    r.location.split('/').next().unwrap_or_default(),
                ));
            }
            for m in r.mirrors.iter().filter(|m| m.insecure) {
                out.push(m.location.split('/').next().unwrap_or_default().to_string());
            }
        }
        out
    }
}

/// `index.docker.io` is docker.io, as in references.
fn normalize_registry(host: &str) -> String {
    if host == "index.docker.io" {
        crate::reference::DOCKER_HUB.to_string()
    } else {
        host.to_string()
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A location without trailing slashes; URL schemes are refused, as podman does.
fn trim_location(s: &str) -> Result<String, String> {
    let t = s.trim_end_matches('/');
    if t.starts_with("http://") || t.starts_with("https://") {
        return Err(format!(
            "invalid location {s:?}: URI schemes are not supported"
        ));
    }
    Ok(t.to_string())
}

/// containers/image's refMatchesPrefix: the prefix, then nothing or one of
/// `:`, `/`, `@`. A `*.example.com` prefix matches any subdomain.
fn matches_prefix(full: &str, prefix: &str) -> bool {
    if let Some(domain) = prefix.strip_prefix("*.") {
        let host = full.split('/').next().unwrap_or(full);
        return host.ends_with(&format!(".{domain}"));
    }
    match full.strip_prefix(prefix) {
        Some("") => true,
        Some(rest) => rest.starts_with([':', '/', '@']),
        None => false,
    }
}

/// A name with no registry: its first component has no `.` or `:` and is
/// not `localhost` (docker's rule).
pub fn is_short_name(input: &str) -> bool {
    let first = input.split('/').next().unwrap_or(input);
    !input.contains('/') || !(first.contains('.') || first.contains(':') || first == "localhost")
}

/// `name` and what follows it (`:tag`, `@digest`).
fn split_name(input: &str) -> (&str, &str) {
    let end = input.find('@').unwrap_or(input.len());
    let last_slash = input[..end].rfind('/').map_or(0, |i| i + 1);
    let name_end = input[last_slash..end]
        .find(':')
        .map_or(end, |i| last_slash + i);
    (&input[..name_end], &input[name_end..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(text: &str) -> RegistriesConf {
        let mut c = RegistriesConf::default();
        c.merge(text, Path::new("/test/registries.conf")).unwrap();
        c
    }

    #[test]
    fn the_longest_prefix_wins_and_its_location_rewrites_the_reference() {
        let c = conf(
            r#"
[[registry]]
prefix = "example.com"
location = "other.io"
[[registry]]
prefix = "example.com/team"
location = "mirror.local:5000/teams/team"
"#,
        );
        let rw = |s: &str| {
            c.rewrite(&Reference::parse(s).unwrap())
                .unwrap()
                .to_string()
        };
        assert_eq!(
            rw("example.com/team/app:1"),
            "mirror.local:5000/teams/team/app:1"
        );
        assert_eq!(rw("example.com/x:2"), "other.io/x:2");
        // "example.com" is not a prefix of "example.community".
        assert_eq!(rw("example.community/x:2"), "example.community/x:2");
    }

    #[test]
    fn a_blocked_registry_is_refused_naming_the_file() {
        let c = conf("[[registry]]\nlocation = \"bad.io\"\nblocked = true\n");
        let e = c
            .rewrite(&Reference::parse("bad.io/a:1").unwrap())
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "bad.io/a:1: registry bad.io is blocked by /test/registries.conf"
        );
    }

    #[test]
    fn mirrors_carry_their_scheme_and_pull_from_mirror() {
        let c = conf(
            r#"
[[registry]]
location = "docker.io"
insecure = true
[[registry.mirror]]
location = "m1.example"
[[registry.mirror]]
location = "m2.example:5000"
insecure = true
pull-from-mirror = "digest-only"
[[registry.mirror]]
location = "m3.example/with/path"
"#,
        );
        let m = c.mirrors();
        assert_eq!(m.len(), 2);
        assert_eq!(
            (m[0].registry.as_str(), m[0].url.as_str()),
            ("docker.io", "https://m1.example/")
        );
        assert_eq!(m[0].pulls, MirrorPulls::All);
        assert_eq!(m[1].url.as_str(), "http://m2.example:5000/");
        assert_eq!(m[1].pulls, MirrorPulls::DigestOnly);
        assert_eq!(c.insecure_hosts(), ["docker.io", "m2.example:5000"]);
    }

    #[test]
    fn short_names_use_aliases_then_search_registries_then_docker() {
        let mut c = conf("unqualified-search-registries = [\"quay.io\", \"docker.io\"]\n");
        c.merge(
            "[aliases]\n\"tool\" = \"ghcr.io/org/tool\"\n",
            Path::new("/test/drop-in.conf"),
        )
        .unwrap();
        let names = |s: &str| -> Vec<String> {
            c.candidates(s)
                .unwrap()
                .iter()
                .map(|r| r.to_string())
                .collect()
        };
        assert_eq!(names("tool:1"), ["ghcr.io/org/tool:1"]);
        assert_eq!(
            names("alpine"),
            ["quay.io/alpine:latest", "docker.io/library/alpine:latest"]
        );
        assert_eq!(names("ghcr.io/a/b"), ["ghcr.io/a/b:latest"]);
        assert_eq!(names("localhost/a"), ["localhost/a:latest"]);
        let empty = RegistriesConf::default();
        assert_eq!(
            empty.candidates("alpine").unwrap()[0].to_string(),
            "docker.io/library/alpine:latest"
        );
    }

    #[test]
    fn a_later_file_replaces_a_registry_of_the_same_prefix_and_the_search_list() {
        let mut c = conf(
            "unqualified-search-registries = [\"a.io\"]\n[[registry]]\nlocation = \"x.io\"\nblocked = true\n",
        );
        c.merge(
            "unqualified-search-registries = [\"b.io\"]\n[[registry]]\nlocation = \"x.io\"\n",
            Path::new("/d/1.conf"),
        )
        .unwrap();
        assert_eq!(c.unqualified_search, ["b.io"]);
        assert!(c.rewrite(&Reference::parse("x.io/a").unwrap()).is_ok());
    }

    #[test]
    fn schemes_in_locations_and_bad_toml_are_errors_naming_the_file() {
        let mut c = RegistriesConf::default();
        let e = c
            .merge(
                "[[registry]]\nlocation = \"https://x.io\"\n",
                Path::new("/f"),
            )
            .unwrap_err();
        assert!(e.to_string().starts_with("/f: invalid location"), "{e}");
        let e = c.merge("[[registry]\n", Path::new("/g")).unwrap_err();
        assert!(e.to_string().starts_with("/g: "), "{e}");
    }
}
