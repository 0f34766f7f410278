//! Content digests: `sha256:<64 lowercase hex>`, checked once where one
//! enters rimg (a manifest, a config, a command line, an archive's index)
//! and trusted from then on by the cache, export and the mount.

use std::fmt;
use std::ops::Deref;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

const PREFIX: &str = "sha256:";
const HEX_LEN: usize = 64;

/// A sha256 content digest, always `sha256:` and 64 lowercase hex digits.
/// It reads as the `&str` it is (`Deref<Target = str>`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

/// Why a string is not a [`Digest`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("digest {0:?} must be sha256: followed by 64 lowercase hex characters")]
pub struct BadDigest(pub String);

impl Digest {
    /// Checks `s`: the only way from a string to a digest.
    pub fn parse(s: &str) -> Result<Digest, BadDigest> {
        match s.strip_prefix(PREFIX) {
            Some(hex)
                if hex.len() == HEX_LEN
                    && hex
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
            {
                Ok(Digest(s.to_string()))
            }
            _ => Err(BadDigest(s.to_string())),
        }
    }

    /// The digest of `bytes`.
    pub fn of_bytes(bytes: &[u8]) -> Digest {
        Digest::from_hasher(Sha256::new_with_prefix(bytes))
    }

    /// A hasher to feed; [`Digest::from_hasher`] finishes it.
    pub fn hasher() -> Sha256 {
        Sha256::new()
    }

    /// The digest of everything fed to `h`.
    pub fn from_hasher(h: Sha256) -> Digest {
        Digest(format!("{PREFIX}{}", hex::encode(h.finalize())))
    }

    /// The 64 hex digits, without `sha256:` (what files are named by).
    pub fn hex(&self) -> &str {
        &self.0[PREFIX.len()..]
    }

    /// The first 12 hex digits, as `docker images` shows them.
    pub fn short(&self) -> &str {
        &self.hex()[..12]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Deref for Digest {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Digest {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl FromStr for Digest {
    type Err = BadDigest;
    fn from_str(s: &str) -> Result<Digest, BadDigest> {
        Digest::parse(s)
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

impl PartialEq<str> for Digest {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for Digest {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl PartialEq<String> for Digest {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

impl PartialEq<Digest> for String {
    fn eq(&self, other: &Digest) -> bool {
        *self == other.0
    }
}

impl PartialEq<Digest> for str {
    fn eq(&self, other: &Digest) -> bool {
        self == other.0
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Feeds everything `r` yields to `h`; returns how many bytes.
pub(crate) fn hash_into(r: &mut impl std::io::Read, h: &mut Sha256) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0u64;
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(n),
            Ok(k) => {
                h.update(&buf[..k]);
                n += k as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn of_bytes_is_the_sha256_with_its_prefix() {
        let d = Digest::of_bytes(b"");
        assert_eq!(d, EMPTY);
        assert_eq!(d.hex(), &EMPTY[7..]);
        assert_eq!(d.short(), "e3b0c44298fc");
        let mut h = Digest::hasher();
        sha2::Digest::update(&mut h, b"");
        assert_eq!(Digest::from_hasher(h), d);
    }

    #[test]
    fn parse_refuses_other_algorithms_case_and_lengths() {
        assert!(Digest::parse(EMPTY).is_ok());
        assert!(Digest::parse(&EMPTY.to_uppercase()).is_err());
        assert!(Digest::parse(&EMPTY.replace("sha256", "sha512")).is_err());
        assert!(Digest::parse(&EMPTY[..70]).is_err());
        assert!(Digest::parse(&EMPTY[7..]).is_err());
        assert!(Digest::parse(&format!("{EMPTY}0")).is_err());
    }

    #[test]
    fn serde_is_a_string_checked_on_the_way_in() {
        let d = Digest::parse(EMPTY).unwrap();
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{EMPTY}\""));
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
        assert!(serde_json::from_str::<Digest>("\"sha256:00\"").is_err());
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_accepts_only_what_displays_back(s in ".{0,80}") {
            if let Ok(d) = Digest::parse(&s) {
                prop_assert_eq!(d.to_string(), s);
            }
        }

        #[test]
        fn any_64_lowercase_hex_parses(hex in "[0-9a-f]{64}") {
            let s = format!("sha256:{hex}");
            let d = Digest::parse(&s).unwrap();
            prop_assert_eq!(d.hex(), hex.as_str());
        }
    }
}
