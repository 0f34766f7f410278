//! `containers-registries.d(5)`: which repositories have sigstore
//! attachments (`use-sigstore-attachments`) and where their lookaside
//! (simple signing) signatures live. The files are YAML; rimg reads the
//! block-mapping subset these files use (nested `key: value` maps, comments,
//! quoted scalars, `{}`) and refuses anything else with the line it stopped at.
//! Files are merged as containers/image merges them: a namespace (or
//! `default-docker`) defined in two files is an error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::TrustError;
use super::policy::docker_namespaces;

/// The user's directory, before the system one.
pub const USER_DIR: &str = ".config/containers/registries.d";
/// The system directory.
pub const SYSTEM_DIR: &str = "/etc/containers/registries.d";

/// One namespace's settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Namespace {
    pub use_sigstore_attachments: Option<bool>,
    /// `lookaside` (or the old `sigstore`): simple-signing signatures, read
    /// by GPG-based `signedBy` requirements, which rimg does not verify.
    pub lookaside: Option<String>,
    pub lookaside_staging: Option<String>,
}

/// The merged configuration of a registries.d directory.
#[derive(Debug, Clone, Default)]
pub struct RegistriesD {
    pub dir: Option<PathBuf>,
    pub default_docker: Option<Namespace>,
    pub docker: BTreeMap<String, Namespace>,
}

#[derive(Debug)]
enum Node {
    Scalar(String),
    Map(Vec<(String, Node)>),
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    if s.len() >= 2
        && ((s.starts_with('"') && s.ends_with('"')) || (s.starts_with('\'') && s.ends_with('\'')))
    {
        s[1..s.len() - 1].to_string()
    } else {
        s.to_string()
    }
}

/// A line without its comment (a `#` at the start or after a space).
fn strip_comment(line: &str) -> &str {
    let mut quote = None;
    let bytes = line.as_bytes();
    for (i, &c) in bytes.iter().enumerate() {
        match (quote, c) {
            (None, b'"' | b'\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, b'#') if i == 0 || bytes[i - 1] == b' ' || bytes[i - 1] == b'\t' => {
                return &line[..i];
            }
            _ => {}
        }
    }
    line
}

/// The key of a `key: value` line and its value ('' when the value follows
/// as a nested block).
fn split_key(text: &str) -> Option<(String, &str)> {
    let mut quote = None;
    let bytes = text.as_bytes();
    for (i, &c) in bytes.iter().enumerate() {
        match (quote, c) {
            (None, b'"' | b'\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, b':') if i + 1 == bytes.len() || bytes[i + 1] == b' ' => {
                return Some((unquote(&text[..i]), text[i + 1..].trim()));
            }
            _ => {}
        }
    }
    None
}

fn parse_yaml(text: &str) -> Result<Node, String> {
    let lines: Vec<(usize, usize, &str)> = text
        .lines()
        .enumerate()
        .filter_map(|(n, l)| {
            let l = strip_comment(l).trim_end();
            let t = l.trim_start();
            (!t.is_empty() && t != "---").then(|| (n + 1, l.len() - t.len(), t))
        })
        .collect();
    let mut pos = 0;
    let node = parse_map(&lines, &mut pos, 0)?;
    match lines.get(pos) {
        Some((n, _, _)) => Err(format!("line {n}: unexpected indentation")),
        None => Ok(node),
    }
}

fn parse_map(
    lines: &[(usize, usize, &str)],
    pos: &mut usize,
    indent: usize,
) -> Result<Node, String> {
    let mut entries = Vec::new();
    while let Some(&(n, ind, text)) = lines.get(*pos) {
        if ind < indent {
            break;
        }
        if ind > indent {
            return Err(format!("line {n}: unexpected indentation"));
        }
        if text.contains('\t') && text.trim_start().starts_with('\t') {
            return Err(format!("line {n}: tabs are not YAML indentation"));
        }
        let (key, value) = split_key(text).ok_or_else(|| {
            format!("line {n}: not a `key: value` line (rimg reads block mappings only)")
        })?;
        *pos += 1;
        let node = if value.is_empty() {
            match lines.get(*pos) {
                Some(&(_, next, _)) if next > indent => parse_map(lines, pos, next)?,
                _ => Node::Scalar(String::new()),
            }
        } else if value == "{}" {
            Node::Map(Vec::new())
        } else if value.starts_with(['{', '[', '&', '*', '|', '>', '!']) {
            return Err(format!(
                "line {n}: {value:?}: rimg reads block mappings and plain scalars only"
            ));
        } else {
            Node::Scalar(unquote(value))
        };
        if entries.iter().any(|(k, _)| k == &key) {
            return Err(format!("line {n}: key {key:?} appears twice"));
        }
        entries.push((key, node));
    }
    Ok(Node::Map(entries))
}

fn namespace(node: &Node, what: &str) -> Result<Namespace, String> {
    let Node::Map(entries) = node else {
        return match node {
            Node::Scalar(s) if s.is_empty() => Ok(Namespace::default()),
            _ => Err(format!("{what} is not a mapping")),
        };
    };
    let mut ns = Namespace::default();
    for (k, v) in entries {
        let Node::Scalar(s) = v else {
            return Err(format!("{what}.{k} is not a scalar"));
        };
        match k.as_str() {
            "use-sigstore-attachments" => {
                ns.use_sigstore_attachments = Some(match s.as_str() {
                    "true" | "True" | "TRUE" => true,
                    "false" | "False" | "FALSE" => false,
                    _ => return Err(format!("{what}.{k}: {s:?} is not a boolean")),
                })
            }
            "lookaside" | "sigstore" => ns.lookaside = Some(s.clone()),
            "lookaside-staging" | "sigstore-staging" => ns.lookaside_staging = Some(s.clone()),
            other => return Err(format!("{what}: unknown field {other:?}")),
        }
    }
    Ok(ns)
}

impl RegistriesD {
    /// The directory `explicit` names, else `$HOME/.config/containers/registries.d`
    /// when it exists, else `/etc/containers/registries.d`; a missing
    /// directory is an empty configuration.
    pub fn load(explicit: Option<&Path>) -> Result<RegistriesD, TrustError> {
        let dir = match explicit {
            Some(d) => d.to_path_buf(),
            None => std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(USER_DIR))
                .filter(|p| p.exists())
                .unwrap_or_else(|| PathBuf::from(SYSTEM_DIR)),
        };
        let err = |file: &Path, detail: String| TrustError::RegistriesD {
            file: file.display().to_string(),
            detail,
        };
        let mut out = RegistriesD {
            dir: Some(dir.clone()),
            ..RegistriesD::default()
        };
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(err(&dir, e.to_string())),
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
        files.sort();
        let mut from: BTreeMap<String, PathBuf> = BTreeMap::new();
        for file in files {
            let text = std::fs::read_to_string(&file).map_err(|e| err(&file, e.to_string()))?;
            let parsed = RegistriesD::parse(&text).map_err(|d| err(&file, d))?;
            if let Some(d) = parsed.default_docker {
                if let Some(prev) = from.get("\0default") {
                    return Err(err(
                        &file,
                        format!(
                            "\"default-docker\" defined both in {} and here",
                            prev.display()
                        ),
                    ));
                }
                from.insert("\0default".into(), file.clone());
                out.default_docker = Some(d);
            }
            for (name, ns) in parsed.docker {
                if let Some(prev) = from.get(&name) {
                    return Err(err(
                        &file,
                        format!(
                            "\"docker\" namespace {name:?} defined both in {} and here",
                            prev.display()
                        ),
                    ));
                }
                from.insert(name.clone(), file.clone());
                out.docker.insert(name, ns);
            }
        }
        Ok(out)
    }

    /// One file's configuration.
    pub fn parse(text: &str) -> Result<RegistriesD, String> {
        let Node::Map(top) = parse_yaml(text)? else {
            unreachable!("the top level is a map")
        };
        let mut out = RegistriesD::default();
        for (k, v) in &top {
            match k.as_str() {
                "default-docker" => out.default_docker = Some(namespace(v, "default-docker")?),
                "docker" => match v {
                    Node::Map(entries) => {
                        for (name, ns) in entries {
                            out.docker
                                .insert(name.clone(), namespace(ns, &format!("docker.{name}"))?);
                        }
                    }
                    Node::Scalar(s) if s.is_empty() => {}
                    Node::Scalar(_) => return Err("docker is not a mapping".into()),
                },
                other => return Err(format!("unknown top-level field {other:?}")),
            }
        }
        Ok(out)
    }

    /// The namespaces consulted for an image, most specific first, and
    /// `default-docker` last (containers/image's lookup).
    fn lookup<'a>(
        &'a self,
        identity: &str,
        name: &str,
    ) -> impl Iterator<Item = &'a Namespace> + 'a {
        let keys: Vec<String> = std::iter::once(identity.to_string())
            .chain(docker_namespaces(name))
            .collect();
        keys.into_iter()
            .filter_map(move |k| self.docker.get(&k))
            .chain(self.default_docker.iter())
    }

    /// Whether sigstore attachments of the image `identity` (`name:tag` or
    /// `name@digest`) in repository `name` are read (default: no).
    pub fn use_sigstore_attachments(&self, identity: &str, name: &str) -> bool {
        self.lookup(identity, name)
            .find_map(|ns| ns.use_sigstore_attachments)
            .unwrap_or(false)
    }

    /// The lookaside URL configured for the image, if any.
    pub fn lookaside(&self, identity: &str, name: &str) -> Option<&str> {
        self.lookup(identity, name)
            .find_map(|ns| ns.lookaside.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FEDORA_LIKE: &str = r#"
# Sigstore attachments everywhere, a lookaside for one host.
default-docker:
  use-sigstore-attachments: true   # read .sig tags
  lookaside: file:///var/lib/containers/sigstore

docker:
  registry.example.com:
    lookaside: "https://sigs.example.com/s"
    lookaside-staging: file:///srv/staging
  registry.example.com/team/app:
    use-sigstore-attachments: false
  'quay.io': {}
"#;

    #[test]
    fn the_most_specific_namespace_decides_each_setting() {
        let c = RegistriesD::parse(FEDORA_LIKE).unwrap();
        assert!(c.use_sigstore_attachments("other.io/a:1", "other.io/a"));
        assert!(!c.use_sigstore_attachments(
            "registry.example.com/team/app:1",
            "registry.example.com/team/app"
        ));
        assert!(c.use_sigstore_attachments(
            "registry.example.com/team/x:1",
            "registry.example.com/team/x"
        ));
        assert_eq!(
            c.lookaside("registry.example.com/a:1", "registry.example.com/a"),
            Some("https://sigs.example.com/s")
        );
        assert_eq!(
            c.lookaside("quay.io/a:1", "quay.io/a"),
            Some("file:///var/lib/containers/sigstore")
        );
        assert!(!RegistriesD::default().use_sigstore_attachments("a.io/b:1", "a.io/b"));
    }

    #[test]
    fn yaml_outside_the_subset_is_refused_with_its_line() {
        assert!(
            RegistriesD::parse("docker:\n  a.io: [1]\n")
                .unwrap_err()
                .contains("line 2")
        );
        assert!(
            RegistriesD::parse("default-docker:\n  use-sigstore-attachments: maybe\n").is_err()
        );
        assert!(RegistriesD::parse("default-docker:\n  colour: red\n").is_err());
        assert!(RegistriesD::parse("  a: 1\nb: 2\n").is_err());
        assert!(RegistriesD::parse("").unwrap().default_docker.is_none());
    }
}
