//! `containers-policy.json(5)`, parsed as containers/image parses it: the
//! requirement types, the scopes of the `docker` transport and of the local
//! ones (`docker-archive`, `oci`, `oci-archive`), scope lookup most specific
//! first, and the `signedIdentity` rules that say which docker reference a
//! signature must name. Evaluation against signatures lives in `super`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde_json::{Map, Value};

use super::TrustError;
use crate::reference::Reference;

/// The user's policy file, before the system one.
pub const USER_POLICY: &str = ".config/containers/policy.json";
/// The system policy file.
pub const SYSTEM_POLICY: &str = "/etc/containers/policy.json";
/// What stands in for a missing policy file: Debian's shipped policy.
pub const BUILTIN_POLICY: &str = r#"{"default":[{"type":"insecureAcceptAnything"}]}"#;

/// A parsed policy and where it came from.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The file, or `built-in default` when none exists.
    pub source: String,
    pub default: Vec<Requirement>,
    /// transport -> scope -> requirements.
    pub transports: BTreeMap<String, BTreeMap<String, Vec<Requirement>>>,
}

/// One requirement of a scope; all of a scope's requirements must pass.
#[derive(Debug, Clone, PartialEq)]
pub enum Requirement {
    InsecureAcceptAnything,
    Reject,
    /// GPG simple signing: parsed, never satisfied by rimg.
    SignedBy,
    /// Not implemented upstream either: always refused.
    SignedBaseLayer,
    SigstoreSigned(Sigstore),
}

/// A `sigstoreSigned` requirement.
#[derive(Debug, Clone, PartialEq)]
pub struct Sigstore {
    pub keys: KeySource,
    /// What the requirement needs besides public keys (Fulcio, Rekor, PKI),
    /// which rimg does not verify offline.
    pub unsupported: Option<&'static str>,
    pub identity: IdentityMatch,
}

/// Where a requirement's public keys are.
#[derive(Debug, Clone, PartialEq)]
pub enum KeySource {
    None,
    Paths(Vec<PathBuf>),
    Data(Vec<Vec<u8>>),
}

/// `signedIdentity`: what a signature's docker reference must be.
#[derive(Debug, Clone, PartialEq)]
pub enum IdentityMatch {
    MatchExact,
    MatchRepoDigestOrExact,
    MatchRepository,
    ExactReference(String),
    ExactRepository(String),
    RemapIdentity {
        prefix: String,
        signed_prefix: String,
    },
}

fn invalid(detail: impl Into<String>) -> TrustError {
    TrustError::Policy {
        file: String::new(),
        detail: detail.into(),
    }
}

impl Policy {
    /// The policy `explicit` names, else `$HOME/.config/containers/policy.json`,
    /// else `/etc/containers/policy.json`, else [`BUILTIN_POLICY`].
    /// containers/image fails when neither file exists; rimg then behaves as
    /// Debian's shipped policy does, so nothing changes without a policy.
    pub fn load(explicit: Option<&Path>) -> Result<Policy, TrustError> {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let candidates = match explicit {
            Some(p) => vec![p.to_path_buf()],
            None => home
                .map(|h| h.join(USER_POLICY))
                .into_iter()
                .chain(std::iter::once(PathBuf::from(SYSTEM_POLICY)))
                .collect(),
        };
        for path in &candidates {
            match std::fs::read(path) {
                Ok(bytes) => {
                    let file = path.display().to_string();
                    return Policy::parse(&bytes, &file).map_err(|e| e.in_file(&file));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && explicit.is_none() => {}
                Err(e) => {
                    return Err(TrustError::Policy {
                        file: path.display().to_string(),
                        detail: e.to_string(),
                    });
                }
            }
        }
        Policy::parse(BUILTIN_POLICY.as_bytes(), "built-in default")
    }

    /// Parses policy JSON; `source` names it in reports.
    pub fn parse(bytes: &[u8], source: &str) -> Result<Policy, TrustError> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
        let top = object(&v, "the policy")?;
        only_fields(top, &["default", "transports"], "the policy")?;
        let default = requirements(
            top.get("default")
                .ok_or_else(|| invalid("Default policy is missing"))?,
        )?;
        let mut transports = BTreeMap::new();
        if let Some(t) = top.get("transports").filter(|t| !t.is_null()) {
            for (transport, scopes) in object(t, "transports")? {
                let mut map = BTreeMap::new();
                for (scope, reqs) in object(scopes, transport)? {
                    validate_scope(transport, scope)?;
                    map.insert(scope.clone(), requirements(reqs)?);
                }
                transports.insert(transport.clone(), map);
            }
        }
        Ok(Policy {
            source: source.to_string(),
            default,
            transports,
        })
    }

    /// The requirements for an image: the transport's scopes tried from the
    /// identity through each namespace to `""`, then `default`. Returns the
    /// scope's name as reports print it.
    pub fn requirements_for(
        &self,
        transport: &str,
        identity: &str,
        namespaces: &[String],
    ) -> (String, &[Requirement]) {
        if let Some(scopes) = self.transports.get(transport) {
            let candidates = std::iter::once(identity)
                .filter(|i| !i.is_empty())
                .chain(namespaces.iter().map(String::as_str))
                .chain(std::iter::once(""));
            for scope in candidates {
                if let Some(reqs) = scopes.get(scope) {
                    let label = if scope.is_empty() {
                        format!("transports.{transport}[\"\"]")
                    } else {
                        format!("transports.{transport}[{scope:?}]")
                    };
                    return (label, reqs);
                }
            }
        }
        ("default".to_string(), &self.default)
    }

    /// Every `sigstoreSigned` requirement in the scope of a docker image.
    pub fn docker_requirements(&self, reference: &Reference) -> (String, &[Requirement]) {
        let named = Named::of(reference);
        self.requirements_for(
            "docker",
            &named.identity(),
            &docker_namespaces(&reference.name()),
        )
    }
}

fn object<'a>(v: &'a Value, what: &str) -> Result<&'a Map<String, Value>, TrustError> {
    v.as_object()
        .ok_or_else(|| invalid(format!("{what} is not a JSON object")))
}

fn only_fields(o: &Map<String, Value>, allowed: &[&str], what: &str) -> Result<(), TrustError> {
    match o.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(invalid(format!("{what}: unknown field {k:?}"))),
        None => Ok(()),
    }
}

fn string<'a>(
    o: &'a Map<String, Value>,
    field: &str,
    what: &str,
) -> Result<Option<&'a str>, TrustError> {
    match o.get(field) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(invalid(format!("{what}: {field} is not a string"))),
    }
}

fn requirements(v: &Value) -> Result<Vec<Requirement>, TrustError> {
    let list = v
        .as_array()
        .ok_or_else(|| invalid("a list of requirements is not a JSON array"))?;
    if list.is_empty() {
        return Err(invalid(
            "List of verification policy requirements must not be empty",
        ));
    }
    list.iter().map(requirement).collect()
}

fn requirement(v: &Value) -> Result<Requirement, TrustError> {
    let o = object(v, "a requirement")?;
    let ty = string(o, "type", "a requirement")?.unwrap_or_default();
    match ty {
        "insecureAcceptAnything" | "reject" => {
            only_fields(o, &["type"], ty)?;
            Ok(if ty == "reject" {
                Requirement::Reject
            } else {
                Requirement::InsecureAcceptAnything
            })
        }
        "signedBy" => Ok(Requirement::SignedBy),
        "signedBaseLayer" => Ok(Requirement::SignedBaseLayer),
        "sigstoreSigned" => sigstore(o).map(Requirement::SigstoreSigned),
        other => Err(invalid(format!(
            "Unknown policy requirement type {other:?}"
        ))),
    }
}

fn sigstore(o: &Map<String, Value>) -> Result<Sigstore, TrustError> {
    const W: &str = "sigstoreSigned";
    only_fields(
        o,
        &[
            "type",
            "keyPath",
            "keyPaths",
            "keyData",
            "keyDatas",
            "fulcio",
            "rekorPublicKeyPath",
            "rekorPublicKeyPaths",
            "rekorPublicKeyData",
            "rekorPublicKeyDatas",
            "pki",
            "signedIdentity",
        ],
        W,
    )?;
    let b64 = |s: &str, field: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|e| invalid(format!("{W}: {field} is not base64: {e}")))
    };
    let mut sources = Vec::new();
    if let Some(p) = string(o, "keyPath", W)? {
        sources.push(KeySource::Paths(vec![PathBuf::from(p)]));
    }
    if let Some(v) = o.get("keyPaths") {
        let paths = v
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|p| p.as_str().map(PathBuf::from))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| invalid(format!("{W}: keyPaths is not a list of strings")))?;
        if paths.is_empty() {
            return Err(invalid(format!("{W}: keyPaths is empty")));
        }
        sources.push(KeySource::Paths(paths));
    }
    if let Some(d) = string(o, "keyData", W)? {
        sources.push(KeySource::Data(vec![b64(d, "keyData")?]));
    }
    if let Some(v) = o.get("keyDatas") {
        let list = v
            .as_array()
            .ok_or_else(|| invalid(format!("{W}: keyDatas is not a list")))?;
        let datas = list
            .iter()
            .map(|d| {
                d.as_str()
                    .ok_or_else(|| invalid(format!("{W}: keyDatas holds a non-string")))
                    .and_then(|s| b64(s, "keyDatas"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if datas.is_empty() {
            return Err(invalid(format!("{W}: keyDatas is empty")));
        }
        sources.push(KeySource::Data(datas));
    }
    let unsupported = if o.contains_key("fulcio") {
        Some("fulcio")
    } else if o.contains_key("pki") {
        Some("pki")
    } else if [
        "rekorPublicKeyPath",
        "rekorPublicKeyPaths",
        "rekorPublicKeyData",
        "rekorPublicKeyDatas",
    ]
    .iter()
    .any(|k| o.contains_key(*k))
    {
        Some("rekorPublicKey")
    } else {
        None
    };
    let keyless = usize::from(o.contains_key("fulcio")) + usize::from(o.contains_key("pki"));
    if sources.len() + keyless > 1 {
        return Err(invalid(format!(
            "{W}: more than one of keyPath, keyPaths, keyData, keyDatas, fulcio and pki"
        )));
    }
    if sources.is_empty() && keyless == 0 {
        return Err(invalid(format!(
            "{W}: one of keyPath, keyPaths, keyData, keyDatas, fulcio or pki must be specified"
        )));
    }
    let identity = match o.get("signedIdentity") {
        None | Some(Value::Null) => IdentityMatch::MatchRepoDigestOrExact,
        Some(v) => identity(v)?,
    };
    Ok(Sigstore {
        keys: sources.pop().unwrap_or(KeySource::None),
        unsupported,
        identity,
    })
}

fn identity(v: &Value) -> Result<IdentityMatch, TrustError> {
    const W: &str = "signedIdentity";
    let o = object(v, W)?;
    let ty = string(o, "type", W)?.unwrap_or_default();
    let field = |name: &str| -> Result<String, TrustError> {
        string(o, name, W)?
            .map(str::to_string)
            .ok_or_else(|| invalid(format!("{W} {ty}: {name} is missing")))
    };
    let m = match ty {
        "matchExact" => IdentityMatch::MatchExact,
        "matchRepoDigestOrExact" => IdentityMatch::MatchRepoDigestOrExact,
        "matchRepository" => IdentityMatch::MatchRepository,
        "exactReference" => {
            only_fields(o, &["type", "dockerReference"], W)?;
            let r = field("dockerReference")?;
            let named = Named::parse(&r)
                .ok_or_else(|| invalid(format!("Invalid format of dockerReference {r:?}")))?;
            if named.is_name_only() {
                return Err(invalid(format!(
                    "dockerReference {r:?} contains neither a tag nor digest"
                )));
            }
            IdentityMatch::ExactReference(r)
        }
        "exactRepository" => {
            only_fields(o, &["type", "dockerRepository"], W)?;
            let r = field("dockerRepository")?;
            Named::parse(&r)
                .ok_or_else(|| invalid(format!("Invalid format of dockerRepository {r:?}")))?;
            IdentityMatch::ExactRepository(r)
        }
        "remapIdentity" => {
            only_fields(o, &["type", "prefix", "signedPrefix"], W)?;
            let (prefix, signed_prefix) = (field("prefix")?, field("signedPrefix")?);
            for p in [&prefix, &signed_prefix] {
                if !valid_prefix(p) {
                    return Err(invalid(format!("prefix {p:?} is not valid")));
                }
            }
            IdentityMatch::RemapIdentity {
                prefix,
                signed_prefix,
            }
        }
        other => {
            return Err(invalid(format!(
                "Unknown policy reference match type {other:?}"
            )));
        }
    };
    if matches!(
        m,
        IdentityMatch::MatchExact
            | IdentityMatch::MatchRepoDigestOrExact
            | IdentityMatch::MatchRepository
    ) {
        only_fields(o, &["type"], W)?;
    }
    Ok(m)
}

/// A remap prefix is a host (`example.com`) or a full repository name with
/// its host (`example.com/ns`), never a docker.io short name.
fn valid_prefix(p: &str) -> bool {
    if !p.contains('/') {
        return !p.is_empty() && Reference::parse(&format!("{p}/x")).is_ok_and(|r| r.registry == p);
    }
    Named::parse(p).is_some_and(|n| n.is_name_only() && n.name == p)
}

fn validate_scope(transport: &str, scope: &str) -> Result<(), TrustError> {
    if scope.is_empty() {
        return Ok(());
    }
    let bad = |why: &str| {
        Err(invalid(format!(
            "transports.{transport}: invalid scope {scope:?}: {why}"
        )))
    };
    match transport {
        "docker" => {
            if let Some(domain) = scope.strip_prefix("*.") {
                return if domain.is_empty() || domain.contains(['/', ':']) {
                    bad("not a *.domain wildcard")
                } else {
                    Ok(())
                };
            }
            // A host alone, or a fully qualified repository or reference.
            if !scope.contains('/') {
                return if valid_prefix(scope) {
                    Ok(())
                } else {
                    bad("not a host")
                };
            }
            match Named::parse(scope) {
                Some(n) if n.to_string() == scope => Ok(()),
                _ => bad("not a normalized docker reference (spell the host and library/ out)"),
            }
        }
        "docker-archive" => {
            bad("docker-archive: does not support any scopes except the default \"\" one")
        }
        "oci" | "oci-archive" => {
            let cleaned: PathBuf = Path::new(scope).components().collect();
            if !scope.starts_with('/') || cleaned.as_os_str() != scope {
                bad("not an absolute, clean path")
            } else {
                Ok(())
            }
        }
        // Transports rimg cannot read are kept but never consulted.
        _ => Ok(()),
    }
}

/// A docker reference as containers/image's `reference.Named` sees it:
/// normalized name, and a tag and/or digest, or neither ("name only").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    pub name: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl Named {
    /// `None` for a string that is not a docker reference.
    pub fn parse(s: &str) -> Option<Named> {
        let r = Reference::parse(s).ok()?;
        let rest = s.split('@').next().unwrap_or(s);
        let last = rest.rsplit('/').next().unwrap_or(rest);
        let tagged = last.contains(':');
        Some(Named {
            name: r.name(),
            tag: if tagged { r.tag } else { None },
            digest: r.digest,
        })
    }

    /// The reference an image was asked for (rimg adds `latest` as docker does).
    pub fn of(r: &Reference) -> Named {
        Named {
            name: r.name(),
            tag: r.tag.clone(),
            digest: r.digest.clone(),
        }
    }

    pub fn is_name_only(&self) -> bool {
        self.tag.is_none() && self.digest.is_none()
    }

    /// The policy identity: `name:tag`, else `name@digest`.
    pub fn identity(&self) -> String {
        match (&self.tag, &self.digest) {
            (Some(t), _) => format!("{}:{t}", self.name),
            (None, Some(d)) => format!("{}@{d}", self.name),
            (None, None) => self.name.clone(),
        }
    }
}

impl std::fmt::Display for Named {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// containers/image's docker namespaces of a repository name: the name and
/// each parent down to the host (with its port), then `*.domain` wildcards
/// of the host without its port.
pub fn docker_namespaces(name: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut n = name;
    loop {
        out.push(n.to_string());
        match n.rfind('/') {
            Some(i) => n = &n[..i],
            None => break,
        }
    }
    let mut host = n.split(':').next().unwrap_or(n);
    while let Some(i) = host.find('.') {
        host = &host[i + 1..];
        out.push(format!("*.{host}"));
    }
    out
}

/// Local transports: the policy identity is the resolved path, the
/// namespaces the path and its parents (containers/image's oci and
/// oci-archive); docker-archive has none.
pub fn local_scopes(transport: &str, path: &Path) -> (String, Vec<String>) {
    if transport == "docker-archive" {
        return (String::new(), Vec::new());
    }
    let identity = path.display().to_string();
    let mut namespaces = Vec::new();
    let mut p = identity.as_str();
    while p != "/" {
        let Some(i) = p.rfind('/') else { break };
        namespaces.push(p.to_string());
        p = if i == 0 { "/" } else { &p[..i] };
    }
    (identity, namespaces)
}

fn repo_digest_or_exact(intended: &Named, signature: &Named) -> bool {
    if signature.is_name_only() {
        return false;
    }
    if intended.tag.is_some() {
        signature.to_string() == intended.to_string()
    } else if intended.digest.is_some() {
        signature.name == intended.name
    } else {
        false
    }
}

impl IdentityMatch {
    /// Whether a signature naming `signed` is acceptable for the image asked
    /// for as `intended` (containers/image's `matchesDockerReference`).
    pub fn accepts(&self, intended: &Named, signed: &str) -> bool {
        let Some(signature) = Named::parse(signed) else {
            return false;
        };
        match self {
            IdentityMatch::MatchExact => {
                !intended.is_name_only()
                    && !signature.is_name_only()
                    && signature.to_string() == intended.to_string()
            }
            IdentityMatch::MatchRepoDigestOrExact => repo_digest_or_exact(intended, &signature),
            IdentityMatch::MatchRepository => signature.name == intended.name,
            IdentityMatch::ExactReference(r) => Named::parse(r).is_some_and(|want| {
                !want.is_name_only()
                    && !signature.is_name_only()
                    && signature.to_string() == want.to_string()
            }),
            IdentityMatch::ExactRepository(r) => {
                Named::parse(r).is_some_and(|want| signature.name == want.name)
            }
            IdentityMatch::RemapIdentity {
                prefix,
                signed_prefix,
            } => {
                let remapped = remap(intended, prefix, signed_prefix);
                remapped.is_some_and(|i| repo_digest_or_exact(&i, &signature))
            }
        }
    }

    /// Whether a signature that names only a repository (a sigstore bundle's
    /// statement binds a digest, not a tag) is acceptable: every rule that
    /// compares repositories, none that needs the signed tag.
    pub fn accepts_repository(&self, intended: &Named, repository: &str) -> bool {
        match self {
            IdentityMatch::MatchExact | IdentityMatch::ExactReference(_) => false,
            IdentityMatch::MatchRepoDigestOrExact | IdentityMatch::MatchRepository => {
                repository == intended.name
            }
            IdentityMatch::ExactRepository(r) => {
                Named::parse(r).is_some_and(|w| w.name == repository)
            }
            IdentityMatch::RemapIdentity {
                prefix,
                signed_prefix,
            } => remap(intended, prefix, signed_prefix).is_some_and(|i| i.name == repository),
        }
    }
}

/// `intended` with `prefix` replaced by `signed_prefix` when its name is
/// `prefix` or below it; `None` when the result is not a reference.
fn remap(intended: &Named, prefix: &str, signed_prefix: &str) -> Option<Named> {
    let name = &intended.name;
    let matches = name == prefix
        || (name.starts_with(prefix) && name.as_bytes().get(prefix.len()) == Some(&b'/'));
    if !matches {
        return Some(intended.clone());
    }
    Named::parse(&intended.to_string().replacen(prefix, signed_prefix, 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(s: &str) -> Named {
        Named::parse(s).unwrap()
    }

    #[test]
    fn scopes_are_tried_most_specific_first() {
        let p = Policy::parse(
            br#"{"default":[{"type":"reject"}],"transports":{"docker":{
                "r.io:5000/a/b":[{"type":"insecureAcceptAnything"}],
                "r.io:5000/a":[{"type":"reject"}],
                "r.io:5000":[{"type":"insecureAcceptAnything"}],
                "*.io":[{"type":"reject"}],
                "r.io:5000/a/b:t":[{"type":"reject"}]}}}"#,
            "t",
        )
        .unwrap();
        let scope = |r: &str| p.docker_requirements(&Reference::parse(r).unwrap()).0;
        assert_eq!(
            scope("r.io:5000/a/b:t"),
            "transports.docker[\"r.io:5000/a/b:t\"]"
        );
        assert_eq!(
            scope("r.io:5000/a/b:u"),
            "transports.docker[\"r.io:5000/a/b\"]"
        );
        assert_eq!(scope("r.io:5000/a/c"), "transports.docker[\"r.io:5000/a\"]");
        assert_eq!(scope("r.io:5000/c"), "transports.docker[\"r.io:5000\"]");
        assert_eq!(scope("q.io/c"), "transports.docker[\"*.io\"]");
        assert_eq!(scope("q.org/c"), "default");
    }

    #[test]
    fn namespaces_follow_containers_image() {
        assert_eq!(
            docker_namespaces("a.b.c:5000/x/y"),
            [
                "a.b.c:5000/x/y",
                "a.b.c:5000/x",
                "a.b.c:5000",
                "*.b.c",
                "*.c"
            ]
        );
        let (id, ns) = local_scopes("oci", Path::new("/srv/img/a"));
        assert_eq!(id, "/srv/img/a");
        assert_eq!(ns, ["/srv/img/a", "/srv/img", "/srv"]);
    }

    #[test]
    fn identity_rules_match_containers_image() {
        let tagged = named("r.io/a/b:1");
        let digested = named(&format!("r.io/a/b@sha256:{}", "0".repeat(64)));
        let m = IdentityMatch::MatchRepoDigestOrExact;
        assert!(m.accepts(&tagged, "r.io/a/b:1"));
        assert!(!m.accepts(&tagged, "r.io/a/b:2"));
        assert!(!m.accepts(&tagged, "r.io/a/b"));
        assert!(m.accepts(&digested, "r.io/a/b:anything"));
        assert!(!m.accepts(&digested, "r.io/a/c:1"));
        assert!(IdentityMatch::MatchRepository.accepts(&tagged, "r.io/a/b"));
        assert!(!IdentityMatch::MatchRepository.accepts(&tagged, "r.io/a/c:1"));
        assert!(IdentityMatch::MatchExact.accepts(&tagged, "r.io/a/b:1"));
        assert!(!IdentityMatch::MatchExact.accepts(&digested, "r.io/a/b:1"));
        assert!(IdentityMatch::ExactReference("r.io/x:9".into()).accepts(&tagged, "r.io/x:9"));
        assert!(IdentityMatch::ExactRepository("r.io/x".into()).accepts(&tagged, "r.io/x:9"));
        let remap = IdentityMatch::RemapIdentity {
            prefix: "mirror.io/a".into(),
            signed_prefix: "r.io/a".into(),
        };
        assert!(remap.accepts(&named("mirror.io/a/b:1"), "r.io/a/b:1"));
        assert!(!remap.accepts(&named("mirror.io/ab:1"), "r.io/ab:1"));
        assert!(remap.accepts(&named("other.io/a/b:1"), "other.io/a/b:1"));
        assert!(
            !IdentityMatch::MatchExact
                .accepts(&named("busybox"), "docker.io/library/busybox:latest")
        );
        assert!(m.accepts(&named("busybox:latest"), "docker.io/library/busybox:latest"));
    }

    #[test]
    fn malformed_policies_are_refused_as_upstream_does() {
        for bad in [
            r#"{}"#,
            r#"{"default":[]}"#,
            r#"{"default":[{"type":"nope"}]}"#,
            r#"{"default":[{"type":"reject","x":1}]}"#,
            r#"{"default":[{"type":"sigstoreSigned"}]}"#,
            r#"{"default":[{"type":"sigstoreSigned","keyPath":"/a","keyData":"AA=="}]}"#,
            r#"{"default":[{"type":"sigstoreSigned","keyPath":"/a","signedIdentity":{"type":"exactReference","dockerReference":"r.io/a"}}]}"#,
            r#"{"default":[{"type":"insecureAcceptAnything"}],"transports":{"docker":{"busybox":[{"type":"reject"}]}}}"#,
            r#"{"default":[{"type":"insecureAcceptAnything"}],"transports":{"docker-archive":{"/x":[{"type":"reject"}]}}}"#,
            r#"{"default":[{"type":"insecureAcceptAnything"}],"extra":1}"#,
        ] {
            assert!(Policy::parse(bad.as_bytes(), "t").is_err(), "{bad}");
        }
        let p = Policy::parse(
            br#"{"default":[{"type":"sigstoreSigned","keyData":"QUJD","signedIdentity":{"type":"remapIdentity","prefix":"m.io","signedPrefix":"r.io/a"}}]}"#,
            "t",
        )
        .unwrap();
        let Requirement::SigstoreSigned(s) = &p.default[0] else {
            panic!()
        };
        assert_eq!(s.keys, KeySource::Data(vec![b"ABC".to_vec()]));
    }
}
