//! Plain data the registry hands to the layers below it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// One layer of a resolved image, as the manifest describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerDesc {
    pub digest: Digest,
    pub media_type: String,
    /// Compressed size in bytes, as the manifest states it.
    pub size: u64,
    /// Download locations of non-distributable (foreign) layers.
    pub urls: Vec<String>,
    /// The sha256 of the uncompressed layer, from the config's
    /// `rootfs.diff_ids`; checked while the layer is inflated.
    #[serde(default)]
    pub diff_id: Option<String>,
    /// The layer descriptor's annotations, as the manifest states them
    /// (where lazy readers find hints such as a table of contents).
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// Images with more layers are refused. Docker refuses more than 127 (an
/// overlayfs limit); rimg merges layers itself and allows more, but not so
/// many that a hostile manifest makes it open thousands of files and downloads.
pub const MAX_LAYERS: usize = 1000;
