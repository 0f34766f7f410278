//! Platforms (`linux/arm64/v8`) and choosing one manifest from an index the way
//! docker does.

use std::fmt;
use std::str::FromStr;

use oci_spec::image::{Descriptor, ImageIndex};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformSpec {
    pub os: String,
    pub arch: String,
    pub variant: Option<String>,
}

impl PlatformSpec {
    /// The platform of this machine, in OCI names.
    pub fn host() -> PlatformSpec {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            "arm" => "arm",
            other => other,
        };
        PlatformSpec {
            os: "linux".into(),
            arch: arch.into(),
            variant: None,
        }
    }

    /// arm64 without a variant means v8, as docker normalises it.
    fn normalized_variant(arch: &str, variant: Option<&str>) -> Option<String> {
        match (arch, variant) {
            ("arm64", None | Some("")) => Some("v8".into()),
            (_, Some("")) | (_, None) => None,
            (_, Some(v)) => Some(v.to_string()),
        }
    }

    pub(crate) fn matches(&self, os: &str, arch: &str, variant: Option<&str>) -> bool {
        if self.os != os || self.arch != arch {
            return false;
        }
        match Self::normalized_variant(&self.arch, self.variant.as_deref()) {
            // No variant asked for: any variant of the architecture will do,
            // except that arm64's implicit v8 must still match.
            None => true,
            Some(want) if self.variant.is_none() && self.arch == "arm64" => {
                Self::normalized_variant(arch, variant).is_none_or(|v| v == want)
            }
            Some(want) => Self::normalized_variant(arch, variant).as_deref() == Some(&want),
        }
    }
}

impl fmt::Display for PlatformSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl FromStr for PlatformSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('/').collect();
        if parts.iter().any(|p| p.is_empty()) || !(2..=3).contains(&parts.len()) {
            return Err(format!(
                "platform {s:?} must look like os/arch or os/arch/variant"
            ));
        }
        let arch = match parts[1] {
            "x86_64" | "x86-64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        Ok(PlatformSpec {
            os: parts[0].to_ascii_lowercase(),
            arch: arch.to_ascii_lowercase(),
            variant: parts.get(2).map(|v| v.to_ascii_lowercase()),
        })
    }
}

/// Attestations and other non-image entries that docker buildx adds to indexes.
fn is_attestation(d: &Descriptor) -> bool {
    let annotated = d
        .annotations()
        .as_ref()
        .is_some_and(|a| a.contains_key("vnd.docker.reference.type"));
    let unknown = d.platform().as_ref().is_some_and(|p| {
        p.os().to_string() == "unknown" || p.architecture().to_string() == "unknown"
    });
    annotated || unknown
}

/// `os/arch[/variant]`, as platforms are written everywhere.
pub fn platform_string(os: &str, arch: &str, variant: Option<&str>) -> String {
    match variant.filter(|v| !v.is_empty()) {
        Some(v) => format!("{os}/{arch}/{v}"),
        None => format!("{os}/{arch}"),
    }
}

/// The platform an index entry names.
pub fn describe(d: &Descriptor) -> Option<String> {
    let p = d.platform().as_ref()?;
    Some(platform_string(
        &p.os().to_string(),
        &p.architecture().to_string(),
        p.variant().as_deref(),
    ))
}

/// Picks the manifest for `want`, or lists what the index offers.
pub fn select<'a>(index: &'a ImageIndex, want: &PlatformSpec) -> Result<&'a Descriptor, String> {
    let candidates: Vec<&Descriptor> = index
        .manifests()
        .iter()
        .filter(|d| !is_attestation(d))
        .collect();
    let found = candidates.iter().find(|d| {
        d.platform().as_ref().is_some_and(|p| {
            want.matches(
                &p.os().to_string(),
                &p.architecture().to_string(),
                p.variant().as_deref(),
            )
        })
    });
    match found {
        Some(d) => Ok(d),
        None => {
            let mut names: Vec<String> = candidates.iter().filter_map(|d| describe(d)).collect();
            names.dedup();
            Err(if names.is_empty() {
                "none".into()
            } else {
                names.join(", ")
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(entries: &[(&str, &str, Option<&str>, bool)]) -> ImageIndex {
        let manifests: Vec<serde_json::Value> = entries
            .iter()
            .enumerate()
            .map(|(i, (os, arch, variant, attest))| {
                let mut platform = serde_json::json!({"os": os, "architecture": arch});
                if let Some(v) = variant {
                    platform["variant"] = serde_json::json!(v);
                }
                let mut d = serde_json::json!({
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": format!("sha256:{:064x}", i + 1),
                    "size": 100,
                    "platform": platform,
                });
                if *attest {
                    d["annotations"] =
                        serde_json::json!({"vnd.docker.reference.type": "attestation-manifest"});
                }
                d
            })
            .collect();
        serde_json::from_value(serde_json::json!({"schemaVersion": 2, "manifests": manifests}))
            .unwrap()
    }

    fn pick(idx: &ImageIndex, want: &str) -> Result<String, String> {
        select(idx, &want.parse().unwrap()).map(|d| d.digest().to_string())
    }

    #[test]
    fn arm64_request_matches_v8_and_missing_variant() {
        let idx = index(&[
            ("linux", "amd64", None, false),
            ("linux", "arm64", Some("v8"), false),
        ]);
        assert!(pick(&idx, "linux/arm64").unwrap().ends_with("2"));
        assert!(pick(&idx, "linux/arm64/v8").unwrap().ends_with("2"));
        let idx = index(&[("linux", "arm64", None, false)]);
        assert!(pick(&idx, "linux/arm64/v8").is_ok());
    }

    #[test]
    fn explicit_variant_must_match() {
        let idx = index(&[
            ("linux", "arm", Some("v6"), false),
            ("linux", "arm", Some("v7"), false),
        ]);
        assert!(pick(&idx, "linux/arm/v7").unwrap().ends_with("2"));
        assert!(pick(&idx, "linux/arm/v5").is_err());
    }

    #[test]
    fn attestation_entries_are_skipped() {
        let idx = index(&[
            ("unknown", "unknown", None, true),
            ("linux", "amd64", None, false),
        ]);
        assert!(pick(&idx, "linux/amd64").unwrap().ends_with("2"));
        let idx = index(&[("linux", "amd64", None, true)]);
        assert!(pick(&idx, "linux/amd64").is_err());
    }

    #[test]
    fn missing_platform_lists_what_the_index_has() {
        let idx = index(&[
            ("linux", "amd64", None, false),
            ("linux", "arm64", Some("v8"), false),
            ("unknown", "unknown", None, true),
        ]);
        let err = pick(&idx, "linux/s390x").unwrap_err();
        assert_eq!(err, "linux/amd64, linux/arm64/v8");
    }

    #[test]
    fn platform_strings_parse_and_refuse_bad_shapes() {
        let p: PlatformSpec = "linux/x86_64".parse().unwrap();
        assert_eq!(p.arch, "amd64");
        assert!("linux".parse::<PlatformSpec>().is_err());
        assert!("linux//v7".parse::<PlatformSpec>().is_err());
        assert!("a/b/c/d".parse::<PlatformSpec>().is_err());
    }
}
