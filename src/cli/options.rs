//! The option groups commands share, each defined once and flattened into
//! the commands it applies to (`#[command(flatten)]`), so a command's help
//! shows only what it reads. Values are parsed here, once: sizes into bytes,
//! platforms into [`PlatformSpec`]. A new shared flag is one field in one
//! group; `rimg mount` hands the whole [`Common`] to its server as JSON.

use std::path::PathBuf;

use clap::Args;
use serde::{Deserialize, Serialize};

use rimg::registry::{DEFAULT_DEADLINE, DEFAULT_STALL, DEFAULT_TRIES, PlatformSpec};

/// How to reach and authenticate to registries.
#[derive(Args, Debug, Clone, Default, Serialize, Deserialize)]
#[command(next_help_heading = "Registry options")]
pub struct RegistryOpts {
    /// Registry user name; the password is read from stdin (--password-stdin).
    #[arg(long)]
    pub username: Option<String>,
    /// Read the registry password (or token) from standard input.
    #[arg(long)]
    pub password_stdin: bool,
    /// Talk plain HTTP to the registry (loopback registries may use it anyway).
    #[arg(long)]
    pub plain_http: bool,
    /// Do not verify the registry's TLS certificate.
    #[arg(long)]
    pub insecure: bool,
    /// Extra CA certificate (PEM) to trust; repeatable.
    #[arg(long = "ca-cert", value_name = "FILE")]
    pub ca_certs: Vec<PathBuf>,
    /// Registry mirror: URL (for docker.io) or HOST=URL; repeatable. Also RIMG_MIRRORS (comma-separated).
    #[arg(long = "mirror", value_name = "URL")]
    pub mirrors: Vec<String>,
    /// Seconds one operation (resolving an image, a page of tags, a layer
    /// without a new byte) keeps trying before it fails (env RIMG_TIMEOUT).
    #[arg(long, env = "RIMG_TIMEOUT", hide_env = true, value_name = "SECS",
          default_value_t = DEFAULT_DEADLINE.as_secs())]
    pub timeout: u64,
    /// Seconds without a byte from the registry before a connection counts
    /// as stalled (env RIMG_STALL_TIMEOUT).
    #[arg(long, env = "RIMG_STALL_TIMEOUT", hide_env = true, value_name = "SECS",
          default_value_t = DEFAULT_STALL.as_secs())]
    pub stall_timeout: u64,
    /// Attempts per request on errors a retry can cure: resets, timeouts,
    /// 5xx and 429 (env RIMG_RETRIES).
    #[arg(long, env = "RIMG_RETRIES", hide_env = true, value_name = "N",
          default_value_t = DEFAULT_TRIES)]
    pub retries: u32,
    /// Fetch foreign layers from the URLs their descriptors list (HTTPS, or HTTP on loopback).
    #[arg(long)]
    pub allow_foreign_layers: bool,
}

/// Where the layer cache lives and how big it may grow.
#[derive(Args, Debug, Clone, Default, Serialize, Deserialize)]
#[command(next_help_heading = "Cache options")]
pub struct CacheOpts {
    /// Cache directory [default: $RIMG_CACHE_DIR, $XDG_CACHE_HOME/rimg or ~/.cache/rimg].
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Cache size limit, e.g. 10G, 500M, 10Gi.
    #[arg(long, value_name = "SIZE", default_value = "10G")]
    pub cache_size: Size,
}

impl CacheOpts {
    pub fn dir(&self) -> PathBuf {
        self.cache_dir
            .clone()
            .unwrap_or_else(rimg::cache::default_dir)
    }
}

/// Which image and how its layers are read; every command that opens an
/// image takes these, with the registry and cache groups.
#[derive(Args, Debug, Clone, Default, Serialize, Deserialize)]
#[command(next_help_heading = "Image options")]
pub struct Common {
    /// Platform to choose from multi-arch images (os/arch[/variant]) [default: this host's].
    #[arg(long, value_name = "OS/ARCH")]
    pub platform: Option<Platform>,
    /// Refuse layers that inflate past this size, e.g. 20G [default: the cache size].
    #[arg(long, value_name = "SIZE")]
    pub max_layer_size: Option<Size>,
    /// Never read layers by range: fetch every layer whole, even eStargz,
    /// zstd:chunked and gzip layers with a published index.
    #[arg(long)]
    pub whole_layers: bool,
    /// Ignore published gzip indexes (`rimg index push`); TOC layers are
    /// still read by range.
    #[arg(long)]
    pub no_index: bool,
    /// Read eStargz layers, and zstd:chunked layers without a tar-split, by
    /// range from their table of contents, trusting it to describe the
    /// layer's tar stream (by default they are read whole).
    #[arg(long, env = "RIMG_TRUST_TOC")]
    pub trust_toc: bool,
    /// Use a published gzip index even when it was not built in this cache
    /// and is not signed by a trusted key (it is still checked as it is read).
    #[arg(long, conflicts_with = "no_index")]
    pub trust_index: bool,
    /// Trust policy file (containers-policy.json) [default:
    /// $HOME/.config/containers/policy.json, then /etc/containers/policy.json].
    #[arg(long, value_name = "FILE", help_heading = "Trust options")]
    pub policy: Option<PathBuf>,
    /// registries.d directory (use-sigstore-attachments, lookaside) [default:
    /// $HOME/.config/containers/registries.d, then /etc/containers/registries.d].
    #[arg(
        long = "registries.d",
        value_name = "DIR",
        help_heading = "Trust options"
    )]
    pub registries_d: Option<PathBuf>,
    #[command(flatten)]
    pub registry: RegistryOpts,
    #[command(flatten)]
    pub cache: CacheOpts,
}

/// `-v`/`--verbose`, for every command but grep (where `-v` inverts the
/// match, as in grep, and only `--verbose` is logging).
#[derive(Args, Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Verbosity {
    /// More logging (-v info, -vv debug); RIMG_LOG overrides.
    #[arg(short = 'v', long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// A size in bytes, written `10G`, `500M`, `1.5k`, `2GiB`, `10Gi` or `4096`
/// (binary multiples).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Size(pub u64);

impl std::str::FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Size, String> {
        parse_size(s).map(Size)
    }
}

/// Parses sizes like `10G`, `500M`, `4096` (binary multiples).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = t[i..].to_ascii_uppercase();
            let unit = unit.strip_suffix('B').unwrap_or(&unit);
            let unit = unit.strip_suffix('I').unwrap_or(unit);
            let m: u64 = match unit {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return Err(format!("size {s:?}: unknown unit (use K, M, G or T)")),
            };
            (&t[..i], m)
        }
        None => (t, 1),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("size {s:?} is not a number with an optional K/M/G/T unit"))?;
    if !n.is_finite() || n < 0.0 {
        return Err(format!("size {s:?} must be positive"));
    }
    Ok((n * mult as f64) as u64)
}

/// A platform parsed once from `--platform`; travels to a mount server as
/// its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform(pub PlatformSpec);

impl std::str::FromStr for Platform {
    type Err = String;
    fn from_str(s: &str) -> Result<Platform, String> {
        s.parse().map(Platform)
    }
}

impl Serialize for Platform {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_string())
    }
}

impl<'de> Deserialize<'de> for Platform {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Platform, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("10Gi").unwrap(), 10 << 30);
        assert_eq!(parse_size("500M").unwrap(), 500 << 20);
        assert_eq!(parse_size("1.5k").unwrap(), 1536);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5X").is_err());
    }
}
