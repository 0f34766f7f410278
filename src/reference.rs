//! Image references (`alpine`, `ghcr.io/o/r:tag`, `localhost:5000/x@sha256:...`),
//! parsed and normalised the way docker does.

use std::fmt;

/// Docker Hub's canonical name; `index.docker.io` normalises to it.
pub const DOCKER_HUB: &str = "docker.io";
const NAME_TOTAL_MAX: usize = 255;
const TAG_MAX: usize = 128;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid reference {input:?}: {reason}")]
pub struct ReferenceError {
    pub input: String,
    pub reason: String,
}

/// A fully normalised reference: registry, repository, and a tag and/or digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// `docker.io`, `ghcr.io`, `localhost:5000`...
    pub registry: String,
    /// `library/alpine`, `o/r`...
    pub repository: String,
    pub tag: Option<String>,
    /// `sha256:<64 hex>`; when present it wins over the tag.
    pub digest: Option<String>,
}

impl Reference {
    pub fn parse(input: &str) -> Result<Reference, ReferenceError> {
        let fail = |reason: &str| ReferenceError {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        if input.is_empty() {
            return Err(fail("empty reference"));
        }
        let (rest, digest) = match input.split_once('@') {
            Some((rest, digest)) => {
                validate_digest(digest).map_err(|r| fail(&r))?;
                (rest, Some(digest.to_string()))
            }
            None => (input, None),
        };
        // A tag is after the last ':' that follows the last '/', so a port is never a tag.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let tag = &rest[last_slash + i + 1..];
                validate_tag(tag).map_err(|r| fail(&r))?;
                (&rest[..last_slash + i], Some(tag.to_string()))
            }
            None => (rest, None),
        };
        if name.is_empty() {
            return Err(fail("empty repository name"));
        }
        if name.len() > NAME_TOTAL_MAX {
            return Err(fail("repository name longer than 255 characters"));
        }
        let (registry, path) = split_domain(name);
        if let Some(registry) = &registry {
            validate_domain(registry).map_err(|r| fail(&r))?;
        }
        let mut registry = registry.unwrap_or_else(|| DOCKER_HUB.to_string());
        if registry == "index.docker.io" {
            registry = DOCKER_HUB.to_string();
        }
        for component in path.split('/') {
            validate_path_component(component).map_err(|r| fail(&r))?;
        }
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_string()
        };
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_string())
        } else {
            tag
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// What to ask the registry for: the digest when there is one, else the tag.
    pub fn target(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// `registry/repository` without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The same repository pinned to `digest`.
    pub fn with_digest(&self, digest: &str) -> Reference {
        Reference {
            digest: Some(digest.to_string()),
            ..self.clone()
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name())?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// Docker's rule: the first component is a registry when it has a `.` or a `:`,
/// is `localhost`, or has uppercase letters (repositories never do).
fn split_domain(name: &str) -> (Option<String>, &str) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.chars().any(|c| c.is_ascii_uppercase()) =>
        {
            (Some(first.to_string()), rest)
        }
        _ => (None, name),
    }
}

fn validate_domain(domain: &str) -> Result<(), String> {
    let (host, port) = if let Some(rest) = domain.strip_prefix('[') {
        let (v6, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("registry {domain:?} has an unclosed '['"))?;
        v6.parse::<std::net::Ipv6Addr>()
            .map_err(|_| format!("registry {domain:?} is not a valid IPv6 address"))?;
        (None, after.strip_prefix(':'))
    } else {
        match domain.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(domain), None),
        }
    };
    if let Some(host) = host {
        if host.is_empty() {
            return Err(format!("registry {domain:?} has an empty host"));
        }
        for label in host.split('.') {
            let ok = !label.is_empty()
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-');
            if !ok {
                return Err(format!("registry host {host:?} is not a valid host name"));
            }
        }
    }
    if let Some(port) = port
        && (port.is_empty() || !port.chars().all(|c| c.is_ascii_digit()) || port.len() > 5)
    {
        return Err(format!("registry port {port:?} is not a number"));
    }
    Ok(())
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn validate_path_component(c: &str) -> Result<(), String> {
    if c.is_empty() {
        return Err("empty path component in repository name".into());
    }
    if let Some(bad) = c
        .chars()
        .find(|ch| !(ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '-')))
    {
        return Err(format!(
            "repository name component {c:?} holds {bad:?}: a name is lowercase letters, digits and . _ - (e.g. my-app)"
        ));
    }
    if c.chars().any(|ch| ch.is_ascii_uppercase()) {
        return Err(format!(
            "repository name component {c:?} must be lowercase (e.g. {:?})",
            c.to_ascii_lowercase()
        ));
    }
    let bytes = c.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err(format!(
            "repository name component {c:?} must start and end with a letter or digit"
        ));
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let valid = sep == "." || sep == "_" || sep == "__" || sep.chars().all(|ch| ch == '-');
        if !valid {
            return Err(format!(
                "repository name component {c:?} has an invalid separator {sep:?}"
            ));
        }
    }
    Ok(())
}

/// `[\w][\w.-]{0,127}`
fn validate_tag(tag: &str) -> Result<(), String> {
    if tag.is_empty() {
        return Err("empty tag".into());
    }
    if tag.len() > TAG_MAX {
        return Err("tag longer than 128 characters".into());
    }
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut chars = tag.chars();
    let first_ok = chars.next().is_some_and(word);
    if !first_ok || !chars.all(|c| word(c) || c == '.' || c == '-') {
        return Err(format!(
            "tag {tag:?} may hold only letters, digits, '_', '.' and '-', and not start with '.' or '-'"
        ));
    }
    Ok(())
}

/// `algorithm:encoded`, with sha256 (64 lowercase hex) and sha512 (128) checked strictly.
pub fn validate_digest(digest: &str) -> Result<(), String> {
    let (algo, hex) = digest
        .split_once(':')
        .ok_or_else(|| format!("digest {digest:?} lacks an algorithm prefix like sha256:"))?;
    let want = match algo {
        "sha256" => 64,
        "sha512" => 128,
        _ => return Err(format!("digest algorithm {algo:?} is not supported")),
    };
    if hex.len() != want
        || !hex
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    {
        return Err(format!(
            "digest {digest:?} must be {algo}: followed by {want} lowercase hex characters"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e7d92cdc71feacf90708cb59182d0df1b911f8ae022d29e8e95d75ca6a99776a";

    fn parse(s: &str) -> Reference {
        Reference::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn bare_name_becomes_docker_hub_library_latest() {
        let r = parse("alpine");
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.repository, "library/alpine");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert_eq!(r.to_string(), "docker.io/library/alpine:latest");
    }

    #[test]
    fn user_repository_on_docker_hub_keeps_namespace() {
        let r = parse("user/app:1");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("docker.io", "user/app")
        );
        assert_eq!(r.tag.as_deref(), Some("1"));
    }

    #[test]
    fn index_docker_io_normalises_to_docker_io() {
        let r = parse("index.docker.io/alpine:3.10");
        assert_eq!(r.to_string(), "docker.io/library/alpine:3.10");
        assert_eq!(parse("docker.io/alpine").repository, "library/alpine");
    }

    #[test]
    fn localhost_with_port_is_a_registry_not_a_tag() {
        let r = parse("localhost:5000/x");
        assert_eq!(r.registry, "localhost:5000");
        assert_eq!(r.repository, "x");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert_eq!(parse("localhost/x:y").registry, "localhost");
    }

    #[test]
    fn registry_with_port_and_deep_path_and_tag() {
        let r = parse("registry.example.com:8443/a/b/c:tag");
        assert_eq!(r.registry, "registry.example.com:8443");
        assert_eq!(r.repository, "a/b/c");
        assert_eq!(r.tag.as_deref(), Some("tag"));
    }

    #[test]
    fn digest_reference_has_no_default_tag() {
        let r = parse(&format!("ghcr.io/o/r@{D}"));
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_deref(), Some(D));
        assert_eq!(r.target(), D);
    }

    #[test]
    fn digest_wins_over_tag() {
        let r = parse(&format!("name:tag@{D}"));
        assert_eq!(r.tag.as_deref(), Some("tag"));
        assert_eq!(r.target(), D);
        assert_eq!(r.to_string(), format!("docker.io/library/name:tag@{D}"));
    }

    #[test]
    fn separators_in_path_components_follow_the_grammar() {
        for ok in ["a.b", "a_b", "a__b", "a-b", "a---b", "a0/b1.c_d"] {
            parse(ok);
        }
        for bad in ["a..b", "a___b", "-a", "a-", "a._b", ".a"] {
            assert!(Reference::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn uppercase_repository_is_refused_with_reason() {
        let e = Reference::parse("docker.io/Alpine").unwrap_err();
        assert!(e.reason.contains("lowercase"), "{e}");
        let e = Reference::parse("example.com/Foo/bar").unwrap_err();
        assert!(e.reason.contains("lowercase"), "{e}");
    }

    #[test]
    fn uppercase_first_component_is_a_registry_like_docker() {
        let r = parse("Example.COM/foo");
        assert_eq!(r.registry, "Example.COM");
    }

    #[test]
    fn malformed_digests_are_refused() {
        for bad in [
            "a@sha256:abc",
            "a@sha256:E7D92CDC71FEACF90708CB59182D0DF1B911F8AE022D29E8E95D75CA6A99776A",
            "a@md5:d41d8cd98f00b204e9800998ecf8427e",
            "a@e7d92cdc71feacf90708cb59182d0df1b911f8ae022d29e8e95d75ca6a99776a",
            "a@",
        ] {
            let e = Reference::parse(bad).unwrap_err();
            assert!(e.reason.contains("digest"), "{bad}: {e}");
        }
    }

    #[test]
    fn empty_parts_are_refused() {
        for bad in ["", ":tag", "a:", "a//b", "/a", "a/", "example.com/", "@"] {
            assert!(Reference::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn invalid_tags_are_refused() {
        assert!(Reference::parse("a:-x").is_err());
        assert!(Reference::parse("a:.x").is_err());
        assert!(Reference::parse("a:x/y").is_err());
        assert!(Reference::parse(&format!("a:{}", "t".repeat(129))).is_err());
        parse(&format!("a:{}", "t".repeat(128)));
    }

    #[test]
    fn invalid_registry_ports_are_refused() {
        assert!(Reference::parse("host:x/a").is_err());
        assert!(Reference::parse("host:/a").is_err());
    }

    #[test]
    fn ipv6_registry_is_accepted() {
        let r = parse("[::1]:5000/a:b");
        assert_eq!(r.registry, "[::1]:5000");
        assert_eq!(r.repository, "a");
    }

    #[test]
    fn overlong_names_are_refused() {
        let long = format!("a/{}", "b".repeat(260));
        assert!(Reference::parse(&long).is_err());
    }
}
