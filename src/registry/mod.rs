//! The distribution API v2 client: references in, verified manifests, configs
//! and blob streams out, with every auth mode real registries use.

mod blob;
mod challenge;
mod client;
mod config;
mod credentials;
mod error;
mod image;
mod platform;
mod push;
mod range;
mod referrers;
mod retry;
mod types;

pub use blob::BlobReader;
pub use challenge::{Challenge, parse_challenges};
pub use client::{
    Client, ClientOptions, DEFAULT_DEADLINE, DEFAULT_STALL, DEFAULT_TRIES, Mirror, MirrorPulls,
};
pub use config::{ConfigError, MirrorConf, RegistriesConf, RegistryConf, is_short_name};
pub use credentials::{CredentialStore, Credentials};
pub use error::RegistryError;
pub use image::{
    DOCKER_LIST, DOCKER_MANIFEST, ImageParts, OCI_INDEX, OCI_MANIFEST, RawManifest, ResolvedImage,
};
pub use platform::{PlatformSpec, describe as describe_platform, select as select_platform};
pub use range::WHOLE_BLOB_FALLBACK_MAX;
pub use referrers::{Artifact, ArtifactBlob, EMPTY_MEDIA_TYPE, referrers_tag};
pub use retry::{RetryPolicy, escape_controls, escape_text};
pub use types::*;
