//! Keys as sigstore tools store them: public keys as PKIX PEM (`PUBLIC
//! KEY`), private keys as cosign's encrypted PEM (`ENCRYPTED COSIGN PRIVATE
//! KEY`, scrypt N=32768 as skopeo writes, or `ENCRYPTED SIGSTORE PRIVATE
//! KEY`, N=65536 as current cosign writes): JSON holding scrypt parameters, a
//! NaCl secretbox nonce and the sealed PKCS#8 key. Only ECDSA P-256 keys are
//! supported, the kind `cosign generate-key-pair` and `skopeo
//! generate-sigstore-key` make. All cryptography is RustCrypto's.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use crypto_secretbox::XSalsa20Poly1305;
use crypto_secretbox::aead::{Aead, KeyInit};
use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use p256::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding,
};
use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Serialize};

use super::TrustError;

/// The PEM type skopeo writes and reads (scrypt N=32768).
pub const COSIGN_PRIVATE_KEY: &str = "ENCRYPTED COSIGN PRIVATE KEY";
/// The PEM type current cosign writes (scrypt N=65536).
pub const SIGSTORE_PRIVATE_KEY: &str = "ENCRYPTED SIGSTORE PRIVATE KEY";
/// scrypt's cost is bounded so a hostile key file cannot exhaust memory
/// (N=2^20 with r=8 is 1 GiB).
const MAX_LOG_N: u8 = 20;

/// A public key a policy trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    key: VerifyingKey,
}

impl PublicKey {
    /// Parses a PKIX `PUBLIC KEY` PEM (the first one in `pem`).
    pub fn from_pem(pem: &[u8], what: &str) -> Result<PublicKey, TrustError> {
        let bad = |detail: String| TrustError::Key {
            what: what.to_string(),
            detail,
        };
        let text = std::str::from_utf8(pem).map_err(|_| bad("not a PEM text file".into()))?;
        let der =
            pem_block(text, "PUBLIC KEY").ok_or_else(|| bad("no PUBLIC KEY PEM block".into()))?;
        let key = VerifyingKey::from_public_key_der(&der)
            .map_err(|e| bad(format!("not an ECDSA P-256 public key ({e})")))?;
        Ok(PublicKey { key })
    }

    /// Whether `signature` (ASN.1 DER, as cosign writes it) signs `message`
    /// with this key (ECDSA P-256, SHA-256).
    pub fn verifies(&self, message: &[u8], signature_der: &[u8]) -> bool {
        match Signature::from_der(signature_der) {
            Ok(sig) => self.key.verify(message, &sig).is_ok(),
            Err(_) => false,
        }
    }

    /// The key as PKIX PEM.
    pub fn to_pem(&self) -> String {
        self.key
            .to_public_key_pem(LineEnding::LF)
            .expect("a P-256 point encodes")
    }

    /// A short name for reports: the sha256 of the DER key, 16 hex digits.
    pub fn fingerprint(&self) -> String {
        let der = self.key.to_public_key_der().expect("a P-256 point encodes");
        let d = crate::digest::Digest::of_bytes(der.as_bytes()).to_string();
        format!("sha256:{}", &d["sha256:".len().."sha256:".len() + 16])
    }
}

/// A private signing key (ECDSA P-256).
pub struct PrivateKey {
    key: SigningKey,
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrivateKey(..)")
    }
}

#[derive(Serialize, Deserialize)]
struct Sealed {
    kdf: Kdf,
    cipher: Cipher,
    ciphertext: String,
}

#[derive(Serialize, Deserialize)]
struct Kdf {
    name: String,
    params: KdfParams,
    salt: String,
}

#[derive(Serialize, Deserialize)]
struct KdfParams {
    #[serde(rename = "N")]
    n: u64,
    r: u32,
    p: u32,
}

#[derive(Serialize, Deserialize)]
struct Cipher {
    name: String,
    nonce: String,
}

fn secretbox_key(passphrase: &[u8], salt: &[u8], p: &KdfParams) -> Result<[u8; 32], String> {
    if !p.n.is_power_of_two() || p.n < 2 {
        return Err(format!("scrypt N={} is not a power of two", p.n));
    }
    let log_n = p.n.trailing_zeros() as u8;
    if log_n > MAX_LOG_N {
        return Err(format!("scrypt N={} is beyond 2^{MAX_LOG_N}", p.n));
    }
    let params = scrypt::Params::new(log_n, p.r, p.p, 32)
        .map_err(|e| format!("scrypt parameters N={} r={} p={}: {e}", p.n, p.r, p.p))?;
    let mut key = [0u8; 32];
    scrypt::scrypt(passphrase, salt, &params, &mut key).map_err(|e| e.to_string())?;
    Ok(key)
}

impl PrivateKey {
    /// A new random key.
    pub fn generate() -> PrivateKey {
        PrivateKey {
            key: SigningKey::random(&mut OsRng),
        }
    }

    /// Decrypts an `ENCRYPTED COSIGN PRIVATE KEY` or `ENCRYPTED SIGSTORE
    /// PRIVATE KEY` PEM with `passphrase`.
    pub fn decrypt(pem: &[u8], passphrase: &[u8], what: &str) -> Result<PrivateKey, TrustError> {
        let der = decrypt_der(pem, passphrase, what)?;
        let bad = |detail: String| TrustError::Key {
            what: what.to_string(),
            detail,
        };
        let key = p256::SecretKey::from_pkcs8_der(&der).map_err(|e| {
            bad(format!(
                "the decrypted key is not an ECDSA P-256 PKCS#8 key ({e})"
            ))
        })?;
        Ok(PrivateKey { key: key.into() })
    }

    /// This key sealed as `pem_type` (one of [`COSIGN_PRIVATE_KEY`] with
    /// scrypt N=32768 or [`SIGSTORE_PRIVATE_KEY`] with N=65536), as skopeo
    /// and cosign write it.
    pub fn encrypt(&self, passphrase: &[u8], pem_type: &str) -> Result<String, TrustError> {
        let n = if pem_type == SIGSTORE_PRIVATE_KEY {
            65536
        } else {
            32768
        };
        let der = p256::SecretKey::from(&self.key)
            .to_pkcs8_der()
            .map_err(|e| TrustError::Key {
                what: "new key".into(),
                detail: e.to_string(),
            })?;
        let params = KdfParams { n, r: 8, p: 1 };
        let mut salt = [0u8; 32];
        let mut nonce = [0u8; 24];
        OsRng.fill_bytes(&mut salt);
        OsRng.fill_bytes(&mut nonce);
        let key = secretbox_key(passphrase, &salt, &params).map_err(|detail| TrustError::Key {
            what: "new key".into(),
            detail,
        })?;
        let sealed = XSalsa20Poly1305::new(&key.into())
            .encrypt(&nonce.into(), der.as_bytes())
            .map_err(|_| TrustError::Key {
                what: "new key".into(),
                detail: "secretbox sealing failed".into(),
            })?;
        let json = serde_json::to_vec(&Sealed {
            kdf: Kdf {
                name: "scrypt".into(),
                params,
                salt: STANDARD.encode(salt),
            },
            cipher: Cipher {
                name: "nacl/secretbox".into(),
                nonce: STANDARD.encode(nonce),
            },
            ciphertext: STANDARD.encode(sealed),
        })
        .expect("plain JSON");
        Ok(pem_encode(pem_type, &json))
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey {
            key: *self.key.verifying_key(),
        }
    }

    /// The DER ECDSA P-256 SHA-256 signature of `message`.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        let sig: Signature = self.key.sign(message);
        sig.to_der().as_bytes().to_vec()
    }
}

/// The sealed bytes inside an encrypted private key PEM, opened.
fn decrypt_der(pem: &[u8], passphrase: &[u8], what: &str) -> Result<Vec<u8>, TrustError> {
    let bad = |detail: String| TrustError::Key {
        what: what.to_string(),
        detail,
    };
    let text = std::str::from_utf8(pem).map_err(|_| bad("not a PEM text file".into()))?;
    let json = pem_block(text, COSIGN_PRIVATE_KEY)
        .or_else(|| pem_block(text, SIGSTORE_PRIVATE_KEY))
        .ok_or_else(|| {
            bad(format!(
                "no {COSIGN_PRIVATE_KEY} or {SIGSTORE_PRIVATE_KEY} PEM block"
            ))
        })?;
    let sealed: Sealed =
        serde_json::from_slice(&json).map_err(|e| bad(format!("malformed key envelope: {e}")))?;
    if sealed.kdf.name != "scrypt" || sealed.cipher.name != "nacl/secretbox" {
        return Err(bad(format!(
            "unsupported encryption {} + {}",
            sealed.kdf.name, sealed.cipher.name
        )));
    }
    let b64 = |field: &str, s: &str| {
        STANDARD
            .decode(s)
            .map_err(|e| bad(format!("{field} is not base64: {e}")))
    };
    let salt = b64("salt", &sealed.kdf.salt)?;
    let nonce = b64("nonce", &sealed.cipher.nonce)?;
    let ciphertext = b64("ciphertext", &sealed.ciphertext)?;
    let nonce: [u8; 24] = nonce
        .try_into()
        .map_err(|_| bad("the nonce is not 24 bytes".into()))?;
    let key = secretbox_key(passphrase, &salt, &sealed.kdf.params).map_err(bad)?;
    XSalsa20Poly1305::new(&key.into())
        .decrypt(&nonce.into(), ciphertext.as_slice())
        .map_err(|_| bad("wrong passphrase or damaged key (decryption failed)".into()))
}

/// The bytes of the first `-----BEGIN <label>-----` block.
fn pem_block(text: &str, label: &str) -> Option<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)? + begin.len();
    let stop = start + text[start..].find(&end)?;
    let body: String = text[start..stop]
        .lines()
        .map(str::trim)
        // RFC 1421 headers (`Proc-Type: ...`) are not base64.
        .filter(|l| !l.contains(':'))
        .collect();
    STANDARD.decode(body).ok()
}

fn pem_encode(label: &str, bytes: &[u8]) -> String {
    let b64 = STANDARD.encode(bytes);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // From cosign's pkg/cosign/keys_test.go (`pemcosigneckey`, passphrase
    // "hello"): sealed with N=65536 around a SEC1 EC key.
    const COSIGN_EC_VECTOR: &str = "-----BEGIN ENCRYPTED COSIGN PRIVATE KEY-----
eyJrZGYiOnsibmFtZSI6InNjcnlwdCIsInBhcmFtcyI6eyJOIjo2NTUzNiwiciI6
OCwicCI6MX0sInNhbHQiOiJHK3F5WTYrNzhNS0JzMXNGTGs1ajYwcS9kS3Z1czBW
VkhlSHZybC9POTF3PSJ9LCJjaXBoZXIiOnsibmFtZSI6Im5hY2wvc2VjcmV0Ym94
Iiwibm9uY2UiOiJRc2JGdG13WDRDK2ttV3ZCcVRaMEFGOUFYdk1jRmg1SCJ9LCJj
aXBoZXJ0ZXh0IjoiREM5T28zeldiYVQzSXYwdFVnWEdycjUxYW1samwwNlQ5MTNP
VkxPbWpuMWhnK2o2WXRUbWg3SGhZSlY1N2J5eGE0Q281bE9YYmRqbTJ3aklubEd1
Um5aZCt5OExnekpSNzFSeEhKVzgrWmRlcFJmYWJMTjdHbDgrSFZEcERVQ3NxQnRh
VngyblpGbFEwWUl1anZwbFphblNGaUVvdERLVGkxZ3VhUXIwUHNzYU01NXZxbTRY
WS9rPSJ9
-----END ENCRYPTED COSIGN PRIVATE KEY-----";

    #[test]
    fn cosigns_own_encrypted_key_vector_opens_with_its_passphrase() {
        let der = decrypt_der(COSIGN_EC_VECTOR.as_bytes(), b"hello", "vector").unwrap();
        // cosign's test expects a SEC1 key inside (it refuses it for that).
        assert!(p256::SecretKey::from_sec1_der(&der).is_ok());
        let wrong = decrypt_der(COSIGN_EC_VECTOR.as_bytes(), b"hellO", "vector");
        assert!(wrong.unwrap_err().to_string().contains("wrong passphrase"));
    }

    #[test]
    fn both_encrypted_key_formats_round_trip() {
        let key = PrivateKey::generate();
        for (label, n) in [(COSIGN_PRIVATE_KEY, 32768), (SIGSTORE_PRIVATE_KEY, 65536)] {
            let pem = key.encrypt(b"pw", label).unwrap();
            assert!(pem.starts_with(&format!("-----BEGIN {label}-----\n")));
            let json = pem_block(&pem, label).unwrap();
            let sealed: Sealed = serde_json::from_slice(&json).unwrap();
            assert_eq!((sealed.kdf.params.n, sealed.kdf.params.r), (n, 8));
            let back = PrivateKey::decrypt(pem.as_bytes(), b"pw", "k").unwrap();
            assert_eq!(back.public(), key.public());
            assert!(PrivateKey::decrypt(pem.as_bytes(), b"px", "k").is_err());
        }
    }

    #[test]
    fn a_signature_verifies_only_with_its_key_and_message() {
        let key = PrivateKey::generate();
        let public = PublicKey::from_pem(key.public().to_pem().as_bytes(), "k").unwrap();
        let sig = key.sign(b"payload");
        assert!(public.verifies(b"payload", &sig));
        assert!(!public.verifies(b"payloaD", &sig));
        assert!(!PrivateKey::generate().public().verifies(b"payload", &sig));
        assert!(!public.verifies(b"payload", b"\x30\x00"));
    }

    #[test]
    fn a_hostile_scrypt_cost_is_refused_before_any_work() {
        let p = KdfParams {
            n: 1 << 30,
            r: 8,
            p: 1,
        };
        assert!(
            secretbox_key(b"", b"salt", &p)
                .unwrap_err()
                .contains("beyond")
        );
        let p = KdfParams {
            n: 1000,
            r: 8,
            p: 1,
        };
        assert!(secretbox_key(b"", b"salt", &p).is_err());
    }
}
