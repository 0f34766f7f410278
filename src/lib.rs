//! rimg: mount container images straight from a registry as a read-only
//! filesystem, inspect their history, or export them as loadable archives.
//!
//! Data flows one way; each stage imports only the stages before it:
//!
//! ```text
//! reference -> registry | local -> cache (+ layer: the tar reader) -> overlay -> image -> fuse | export | forensics
//! ```
//!
//! - [`reference`]: docker-style image references;
//! - [`registry`]: the distribution API client (auth, manifests, blobs);
//! - [`local`]: images in files (`docker-archive:`, `oci:`, `oci-archive:`),
//!   the other place blobs come from;
//! - [`cache`]: layers fetched, verified, inflated and indexed on disk, using
//!   [`layer`], the tar reader (Go's `archive/tar` behaviour, sparse files);
//! - [`overlay`]: the merge rules, the merged tree, and top-down answers for
//!   single paths before every layer is present;
//! - [`image`]: a resolved image tied to the cache;
//! - [`fuse`], [`export`], [`forensics`]: what is done with an image;
//! - [`names`]: names as bytes, and the one way to print them;
//! - [`digest`]: sha256 digests, checked where they enter and typed from then on;
//! - [`report`]: an error and its causes as one line.
//!
//! The command-line front end (clap, anyhow) lives in the binary, `src/main.rs`
//! and `src/cli/`.

pub mod cache;
pub mod digest;
pub mod export;
pub mod forensics;
pub mod fuse;
pub mod image;
pub mod layer;
pub mod local;
pub mod names;
pub mod overlay;
pub mod reference;
pub mod registry;
pub mod report;
