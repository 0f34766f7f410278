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
//!    tar. They name paths literally: a marker under a path that is a symlink
//!    below hides nothing. (containerd would follow that symlink; no image
//!    builder writes such a marker, since builders record real paths, and
//!    reading markers literally is what lets a layer decide its own paths
//!    without the layers below it.)
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
pub mod saved;
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

/// The property that keeps the rules in one place honest: for random small
/// layer stacks, the top-down answers, the merged tree and an exported
/// rootfs read back all agree on every path.
#[cfg(test)]
mod differential {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::partial::{Decision, LayerView, decide};
    use super::tree::{NodeId, Tree, merge};
    use crate::layer::{Entry, EntryKind, LayerIndex};

    const NAMES: [&str; 3] = ["a", "b", "c"];

    fn path_strategy() -> impl Strategy<Value = String> {
        proptest::collection::vec(proptest::sample::select(&NAMES[..]), 1..=3)
            .prop_map(|c| c.join("/"))
    }

    #[derive(Debug, Clone)]
    pub(super) enum Op {
        Dir(String),
        File(String),
        Symlink(String, String),
        Hardlink(String, String),
        Whiteout(String),
        Opaque(String),
    }

    pub(super) fn op_strategy() -> impl Strategy<Value = Op> {
        // Short targets, so symlinks often lead somewhere that exists.
        let one = || proptest::sample::select(&NAMES[..]).prop_map(str::to_string);
        let target = prop_oneof![
            3 => one(),
            1 => one().prop_map(|p| format!("/{p}")),
            1 => one().prop_map(|p| format!("../{p}")),
            1 => path_strategy().prop_map(|p| format!("../../{p}")),
            1 => Just(".".to_string()),
            1 => path_strategy(),
        ];
        prop_oneof![
            3 => path_strategy().prop_map(Op::Dir),
            3 => path_strategy().prop_map(Op::File),
            1 => (path_strategy(), target).prop_map(|(p, t)| Op::Symlink(p, t)),
            1 => (path_strategy(), path_strategy()).prop_map(|(p, t)| Op::Hardlink(p, t)),
            1 => path_strategy().prop_map(Op::Whiteout),
            1 => path_strategy().prop_map(Op::Opaque),
            1 => Just(Op::Opaque(String::new())),
        ]
    }

    fn entry(path: &str, kind: EntryKind, link: Option<&str>, offset: u64) -> Entry {
        Entry {
            link: link.map(|l| l.as_bytes().to_vec()),
            offset,
            ..Entry::new(path.as_bytes(), kind)
        }
    }

    pub(super) fn layer(ops: &[Op], n: u64) -> LayerIndex {
        let entries = ops
            .iter()
            .enumerate()
            .map(|(i, op)| {
                // The offset tells every entry apart.
                let at = n * 1000 + i as u64;
                match op {
                    Op::Dir(p) => entry(p, EntryKind::Dir, None, at),
                    Op::File(p) => entry(p, EntryKind::File, None, at),
                    Op::Symlink(p, t) => entry(p, EntryKind::Symlink, Some(t), at),
                    Op::Hardlink(p, t) => entry(p, EntryKind::Hardlink, Some(t), at),
                    Op::Whiteout(p) => {
                        let (d, name) = crate::names::split(p.as_bytes());
                        let mut wh = b".wh.".to_vec();
                        wh.extend_from_slice(name);
                        let e = entry("", EntryKind::File, None, at);
                        Entry {
                            path: crate::names::join(d, &wh),
                            ..e
                        }
                    }
                    Op::Opaque(p) => {
                        let marker = crate::names::join(p.as_bytes(), b".wh..wh..opq");
                        Entry {
                            path: marker,
                            ..entry("", EntryKind::File, None, at)
                        }
                    }
                }
            })
            .collect();
        LayerIndex { entries }
    }

    /// The node at `path` without following symlinks, as FUSE lookups walk.
    fn literal(t: &Tree, path: &[u8]) -> Option<NodeId> {
        let mut cur = t.root();
        for c in crate::names::components(path) {
            if t.node(cur).kind != EntryKind::Dir {
                return None;
            }
            cur = t.lookup(cur, c)?;
        }
        Some(cur)
    }

    /// Kind, symlink target, and the least path of its inode.
    type Listed = (EntryKind, Option<Vec<u8>>, Vec<u8>);

    /// Path -> what is there.
    fn listing(t: &Tree) -> BTreeMap<Vec<u8>, Listed> {
        let mut out = BTreeMap::new();
        let mut first: BTreeMap<NodeId, Vec<u8>> = BTreeMap::new();
        let mut stack = vec![(Vec::new(), t.root())];
        while let Some((p, id)) = stack.pop() {
            for (name, c) in t.children(id) {
                let path = crate::names::join(&p, name);
                let n = t.node(c);
                let group = first.entry(c).or_insert_with(|| path.clone()).clone();
                let link =
                    (n.kind == EntryKind::Symlink).then(|| n.link.unwrap_or_default().to_vec());
                out.insert(path.clone(), (n.kind, link, group));
                stack.push((path, c));
            }
        }
        // Group names by inode independently of visiting order.
        let mut groups: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        for (p, (_, _, g)) in &out {
            let min = groups.entry(g.clone()).or_insert_with(|| p.clone());
            if p < min {
                *min = p.clone();
            }
        }
        out.into_iter()
            .map(|(p, (k, l, g))| (p, (k, l, groups[&g].clone())))
            .collect()
    }

    fn universe() -> Vec<String> {
        let mut out: Vec<String> = NAMES.iter().map(|s| s.to_string()).collect();
        for _ in 0..3 {
            let more: Vec<String> = out
                .iter()
                .flat_map(|p| NAMES.iter().map(move |n| format!("{p}/{n}")))
                .collect();
            out.extend(more);
        }
        out.sort();
        out.dedup();
        out
    }

    fn check(stack: &[Vec<Op>]) -> Result<(), TestCaseError> {
        let layers: Vec<LayerIndex> = stack
            .iter()
            .enumerate()
            .map(|(i, ops)| layer(ops, i as u64))
            .collect();
        let refs: Vec<&LayerIndex> = layers.iter().collect();
        let Ok(tree) = merge(&refs) else {
            // Dangling hardlinks fail the merge; the tree tests cover that.
            return Ok(());
        };
        let views: Vec<LayerView> = layers.iter().cloned().map(LayerView::new).collect();
        for path in universe() {
            let path = path.as_bytes();
            let mut answer = None;
            for (i, v) in views.iter().enumerate().rev() {
                match decide(v, path) {
                    Decision::Found(_) if views[i + 1..].iter().any(|u| u.links(path)) => break,
                    Decision::Found(e) => {
                        answer = Some(Some((i, e)));
                        break;
                    }
                    Decision::Gone => {
                        answer = Some(None);
                        break;
                    }
                    Decision::Defer => break,
                    Decision::Continue => {}
                }
                if i == 0 {
                    answer = Some(None);
                }
            }
            let Some(answer) = answer else { continue };
            let node = literal(&tree, path);
            match (answer, node) {
                (None, None) => {}
                (Some((i, e)), Some(id)) => {
                    let n = tree.node(id);
                    // A file answered top down has one name, as the mount says.
                    prop_assert!(
                        n.kind == EntryKind::Dir || n.nlink == 1,
                        "{}: nlink {} in the tree",
                        crate::names::escaped(path),
                        n.nlink
                    );
                    prop_assert_eq!(
                        (n.kind, n.offset, n.layer as usize, n.link),
                        (e.kind, e.offset, i, e.link.as_deref()),
                        "{}",
                        crate::names::escaped(path)
                    );
                }
                (a, n) => prop_assert!(
                    false,
                    "{}: top-down {:?}, tree {:?}",
                    crate::names::escaped(path),
                    a.map(|(i, e)| (i, e.kind)),
                    n
                ),
            }
        }
        let tar = crate::export::write_rootfs(&tree, &[], &[], Vec::new()).unwrap();
        let back = crate::layer::index_tar(&tar[..], "sha256:export").unwrap();
        let reread = merge(&[&back]).unwrap();
        prop_assert_eq!(listing(&reread), listing(&tree));
        Ok(())
    }

    #[test]
    fn a_whiteout_under_a_lower_symlink_is_caught_by_the_check() {
        // The case that decided markers are read literally; kept so the
        // property's harness is known to see such a disagreement.
        let stack = vec![
            vec![
                Op::Dir("b".into()),
                Op::File("b/a".into()),
                Op::Symlink("a".into(), "b".into()),
            ],
            vec![Op::Whiteout("a/a".into())],
        ];
        check(&stack).unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]
        #[test]
        fn top_down_answers_the_tree_and_the_export_agree(
            stack in proptest::collection::vec(proptest::collection::vec(op_strategy(), 0..10), 1..4)
        ) {
            check(&stack)?;
        }
    }
}
