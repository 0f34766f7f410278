//! rimg: mount container images straight from a registry as a read-only
//! filesystem, or export them as loadable archives.
//!
//! Data flows one way: [`reference`] -> [`registry`] -> [`cache`] ->
//! [`layer`] -> [`tree`] -> [`fuse`] or [`export`]. No module reaches back up.

pub mod cache;
pub mod commands;
pub mod export;
pub mod forensics;
pub mod fuse;
pub mod image;
pub mod layer;
pub mod names;
pub mod overlay;
pub mod reference;
pub mod registry;
