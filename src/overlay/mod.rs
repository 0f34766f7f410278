//! The overlay: how a stack of layer changesets becomes one filesystem, per
//! the OCI image spec's "Applying Changesets". This module owns every merge
//! rule, and both ways of answering use them:
//!
//! - [`tree`] applies whole layers bottom to top into the merged tree;
//! - [`partial`] answers single paths from the top layer down before all the
//!   layers are present, and defers to the tree whenever a layer's effect on
//!   a path depends on the layers below it in a way it cannot see.
//!
//! The rules, in the order a layer is applied:
//!
//! 1. Opaque markers (`DIR/.wh..wh..opq`) empty `DIR` of what lower layers
//!    put there, and whiteouts (`DIR/.wh.NAME`) remove `DIR/NAME` from the
//!    lower layers. Both act on lower layers only, wherever they stand in the
//!    tar, and a whiteout's parent resolves through symlinks inside the image.
//! 2. The layer's other entries, in tar order, each onto the state so far:
//!    - a parent path resolves through symlinks confined to the image root
//!      (as docker's chroot and umoci's securejoin do); missing parents become
//!      directories, and a non-directory in the way is replaced by one;
//!    - a directory over a directory keeps the children and takes the new
//!      attributes; any other entry replaces what was at its name;
//!    - a hardlink names the file its target is at that moment (lower layers
//!      included, and this layer's earlier entries as they stood then); a
//!      target that does not exist, or is a directory, fails the layer as it
//!      fails `docker load`, containerd and umoci;
//!    - a later entry for the same name wins (a consequence of order).

pub mod partial;
pub mod tree;

use crate::names;

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

/// Symlinks followed while resolving one path, as Linux's `MAXSYMLINKS`.
pub const MAX_SYMLINKS: usize = 40;

/// What a layer entry's path means to the overlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change<'a> {
    /// Hide everything lower layers put in `dir`.
    Opaque { dir: &'a [u8] },
    /// Remove `dir/name` of lower layers (`name` may be empty, then nothing).
    Whiteout { dir: &'a [u8], name: &'a [u8] },
    /// An ordinary entry.
    Entry,
}

/// Classifies a normalised entry path.
pub fn classify(path: &[u8]) -> Change<'_> {
    let (dir, name) = names::split(path);
    if name == OPAQUE_MARKER {
        Change::Opaque { dir }
    } else if let Some(target) = name.strip_prefix(WHITEOUT_PREFIX) {
        Change::Whiteout { dir, name: target }
    } else {
        Change::Entry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_told_apart_from_entries() {
        assert_eq!(classify(b"a/.wh..wh..opq"), Change::Opaque { dir: b"a" });
        assert_eq!(
            classify(b"a/b/.wh.c"),
            Change::Whiteout {
                dir: b"a/b",
                name: b"c"
            }
        );
        assert_eq!(
            classify(b".wh.x"),
            Change::Whiteout {
                dir: b"",
                name: b"x"
            }
        );
        assert_eq!(classify(b"a/wh.x"), Change::Entry);
        assert_eq!(classify(b"a/x.wh."), Change::Entry);
    }
}
