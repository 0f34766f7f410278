//! Plain data the registry hands to the layers below it.

use serde::{Deserialize, Serialize};

/// One layer of a resolved image, as the manifest describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerDesc {
    /// `sha256:<64 hex>`
    pub digest: String,
    pub media_type: String,
    /// Compressed size in bytes, as the manifest states it.
    pub size: u64,
    /// Download locations of non-distributable (foreign) layers.
    pub urls: Vec<String>,
}
