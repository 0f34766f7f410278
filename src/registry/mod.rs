//! The distribution API v2 client: auth, manifest resolution and blob streams.

mod types;
pub use types::*;
