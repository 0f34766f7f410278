//! rimg: mount container images straight from a registry as a read-only
//! filesystem, inspect their history, or export them as loadable archives.
//!
//! Data flows one way; each stage imports only the stages before it:
//!
//! ```text
//!            registry ─┬─> trust ─┐
//! reference ─┤           │          ├─> image ─> fuse | export | forensics
//!            local ────┴─> cache ─> overlay ┘
//!                          (store)
//! ```
//!
//! - [`reference`]: docker-style image references;
//! - [`registry`]: the distribution API client (auth, manifests, blobs, byte
//!   ranges, pushes and referrers);
//! - [`trust`]: the containers trust policy (`policy.json`, `registries.d`),
//!   cosign signatures and sigstore bundles checked with public keys, and
//!   signing a published index; asked once per image before any layer is
//!   read, and by [`image`] about a published index's signature;
//! - [`local`]: images in files (`docker-archive:`, `oci:`, `oci-archive:`),
//!   the other place blobs come from;
//! - [`cache`], the store: layers fetched, verified, inflated and indexed on
//!   disk, and the range cache of layers read a span at a time;
//! - [`overlay`]: the merge rules, the merged tree, and top-down answers for
//!   single paths before every layer is present;
//! - [`image`]: a resolved image tied to the cache; decides which layers are
//!   read whole and which by range (eStargz and zstd:chunked tables of
//!   contents, published gzip checkpoint indexes), and publishes those;
//! - [`fuse`], [`export`], [`forensics`]: what is done with an image.
//!
//! Leaves every stage may use: [`layer`] (the tar reader with Go's
//! `archive/tar` behaviour, the eStargz/zstd:chunked table-of-contents
//! parsers, gzip checkpoints), [`digest`] (sha256 digests, checked where they
//! enter and typed from then on), [`names`] (names as bytes, and the one way
//! to print them), [`report`] (an error and its causes as one line) and
//! [`private`] (the checks that every directory and file rimg writes is the
//! caller's alone).
//!
//! The command-line front end (clap, anyhow) lives in the binary, `src/main.rs`
//! and `src/cli/`.

pub mod cache;
pub mod digest;
pub mod export;
pub mod forensics;
pub mod fuse;
#[cfg(test)]
mod fuzzing;
pub mod image;
pub mod layer;
pub mod local;
pub mod names;
pub mod overlay;
pub mod private;
pub mod reference;
pub mod registry;
pub mod report;
pub mod trust;
