//! rimg: mount container images straight from a registry as a read-only
//! filesystem, or export them as loadable archives.
//!
//! Data flows one way: [`reference`] -> [`registry`] (or [`local`]) -> [`cache`] ->
//! [`layer`] -> [`tree`] -> [`fuse`] or [`export`]. No module reaches back up.

pub mod cache;
pub mod commands;
pub mod export;
pub mod fuse;
pub mod image;
pub mod layer;
pub mod local;
pub mod names;
pub mod overlay;
pub mod reference;
pub mod registry;
