//! How nodes become FUSE answers: inode numbers, attributes, extended
//! attributes and file bytes, for a merged node or a provisional entry alike.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{Errno, FileAttr, FileType, INodeNo, ReplyXattr};

use crate::cache::Layer;
use crate::layer::{EntryKind, Segment};
use crate::overlay::tree::{NodeId, NodeRef};

use super::fs::*;
use super::state::*;

pub(super) fn ino_of(m: &Mounted, id: NodeId) -> INodeNo {
    INodeNo(m.alias_of_node.get(&id).copied().unwrap_or(id as u64 + 1))
}

pub(super) fn id_of(m: &Mounted, ino: INodeNo) -> Result<NodeId, Errno> {
    if ino.0 >= PROVISIONAL_BASE {
        return m.node_of_alias.get(&ino.0).copied().ok_or(Errno::ENOENT);
    }
    let id = ino.0.checked_sub(1).ok_or(Errno::ENOENT)?;
    if id as usize >= m.tree.len() {
        return Err(Errno::ENOENT);
    }
    Ok(id as NodeId)
}

pub(super) fn file_type(kind: EntryKind) -> FileType {
    match kind {
        EntryKind::Dir => FileType::Directory,
        EntryKind::Symlink => FileType::Symlink,
        EntryKind::Char => FileType::CharDevice,
        EntryKind::Block => FileType::BlockDevice,
        EntryKind::Fifo => FileType::NamedPipe,
        _ => FileType::RegularFile,
    }
}

/// What an inode names.
pub(super) enum Target<'a> {
    Node(&'a Mounted, NodeId),
    Prov(INodeNo, Arc<Prov>),
}

impl Target<'_> {
    /// EIO in place of an answer read from a saved tree that was found
    /// damaged meanwhile (see [`crate::overlay::tree::Tree::damaged`]).
    pub(super) fn sound<T>(&self, r: Result<T, Errno>) -> Result<T, Errno> {
        match self {
            Target::Node(m, _) if m.tree.damaged() => Err(Errno::EIO),
            _ => r,
        }
    }

    pub(super) fn attr(&self) -> FileAttr {
        match self {
            Target::Node(m, id) => attr_of(m, *id, m.tree.node(*id)),
            Target::Prov(ino, p) => attr_from(*ino, Meta::from(&**p)),
        }
    }

    pub(super) fn link(&self) -> Option<&[u8]> {
        match self {
            Target::Node(m, id) => {
                let n = m.tree.node(*id);
                (n.kind == EntryKind::Symlink).then_some(n.link).flatten()
            }
            Target::Prov(_, p) => (p.entry.kind == EntryKind::Symlink)
                .then_some(p.entry.link.as_deref())
                .flatten(),
        }
    }

    pub(super) fn read(&self, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        match self {
            Target::Node(m, id) => read_node(m, m.tree.node(*id), offset, size),
            Target::Prov(_, p) if p.entry.kind == EntryKind::File => {
                let e = &p.entry;
                read_data(
                    &p.layer,
                    e.offset,
                    e.size,
                    e.sparse.as_deref(),
                    offset,
                    size,
                )
            }
            Target::Prov(..) => Err(Errno::EINVAL),
        }
    }

    /// A read of this target that may wait for the network (its layer is
    /// read by range), as a job that owns what it needs so it can run off
    /// the FUSE session thread; `None` when the bytes are on disk.
    pub(super) fn ranged_read(&self, offset: u64, size: u32) -> Option<RangedRead> {
        let (layer, at, len, sparse) = match self {
            Target::Node(m, id) => {
                let n = m.tree.node(*id);
                let layer = m.layers.get(n.layer as usize)?;
                (n.kind == EntryKind::File).then_some(())?;
                (layer, n.offset, n.size, n.sparse().map(|s| s.into_owned()))
            }
            Target::Prov(_, p) if p.entry.kind == EntryKind::File => {
                let e = &p.entry;
                (
                    &p.layer,
                    e.offset,
                    e.size,
                    e.sparse.as_deref().map(<[_]>::to_vec),
                )
            }
            Target::Prov(..) => return None,
        };
        layer.ranged()?;
        Some(RangedRead {
            layer: Arc::clone(layer),
            at,
            len,
            sparse,
            offset,
            size,
        })
    }

    /// `(name, value)` pairs: the entry's own xattrs plus `user.rimg.layer`.
    pub(super) fn xattrs(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        match self {
            Target::Node(m, id) => xattrs_of(m, m.tree.node(*id)),
            Target::Prov(_, p) => {
                let mut out: Vec<(Vec<u8>, Vec<u8>)> = p
                    .entry
                    .xattrs
                    .iter()
                    .map(|(k, v)| (k.as_bytes().to_vec(), v.clone()))
                    .collect();
                out.push((
                    LAYER_XATTR.as_bytes().to_vec(),
                    p.layer.digest.as_bytes().to_vec(),
                ));
                out
            }
        }
    }
}

/// Attributes of a merged node or a provisional entry.
pub(super) struct Meta<'a> {
    pub(super) kind: EntryKind,
    pub(super) mode: u32,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) size: u64,
    pub(super) mtime: i64,
    pub(super) link: Option<&'a [u8]>,
    pub(super) rdev: (u32, u32),
    pub(super) nlink: u32,
}

impl<'a> From<NodeRef<'a>> for Meta<'a> {
    fn from(n: NodeRef<'a>) -> Meta<'a> {
        Meta {
            kind: n.kind,
            mode: n.mode,
            uid: n.uid,
            gid: n.gid,
            size: n.size,
            mtime: n.mtime,
            link: n.link,
            rdev: n.rdev,
            nlink: n.nlink,
        }
    }
}

impl<'a> From<&'a Prov> for Meta<'a> {
    fn from(p: &'a Prov) -> Meta<'a> {
        let e = &p.entry;
        Meta {
            kind: e.kind,
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            size: e.size,
            mtime: e.mtime,
            link: e.link.as_deref(),
            rdev: e.rdev,
            nlink: p.nlink,
        }
    }
}

pub(super) fn attr_of(m: &Mounted, id: NodeId, n: NodeRef<'_>) -> FileAttr {
    attr_from(ino_of(m, id), Meta::from(n))
}

pub(super) fn attr_from(ino: INodeNo, n: Meta<'_>) -> FileAttr {
    let mtime = if n.mtime >= 0 {
        UNIX_EPOCH + Duration::from_secs(n.mtime as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(n.mtime.unsigned_abs())
    };
    let size = match n.kind {
        EntryKind::Symlink => n.link.map_or(0, |l| l.len() as u64),
        EntryKind::Dir => 4096,
        _ => n.size,
    };
    FileAttr {
        ino,
        size,
        blocks: size.div_ceil(512),
        atime: mtime,
        mtime,
        ctime: mtime,
        crtime: mtime,
        kind: file_type(n.kind),
        perm: (n.mode & 0o7777) as u16,
        nlink: n.nlink,
        uid: n.uid,
        gid: n.gid,
        rdev: libc::makedev(n.rdev.0, n.rdev.1) as u32,
        blksize: 4096,
        flags: 0,
    }
}

/// `(name, value)` pairs of a node: its own xattrs plus `user.rimg.layer`.
pub(super) fn xattrs_of(m: &Mounted, n: NodeRef<'_>) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = n
        .xattrs()
        .map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec()))
        .collect();
    if let Some(d) = m.digests.get(n.layer as usize) {
        out.push((LAYER_XATTR.as_bytes().to_vec(), d.as_bytes().to_vec()));
    }
    out
}

pub(super) fn reply_sized(reply: ReplyXattr, size: u32, data: &[u8]) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if (size as usize) < data.len() {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(data);
    }
}

/// A file read to run on a blocking thread (see [`Target::ranged_read`]).
pub(super) struct RangedRead {
    layer: Arc<Layer>,
    at: u64,
    len: u64,
    sparse: Option<Vec<Segment>>,
    offset: u64,
    size: u32,
}

impl RangedRead {
    pub(super) fn run(self) -> Result<Vec<u8>, Errno> {
        read_data(
            &self.layer,
            self.at,
            self.len,
            self.sparse.as_deref(),
            self.offset,
            self.size,
        )
    }
}

pub(super) fn read_node(
    m: &Mounted,
    n: NodeRef<'_>,
    offset: u64,
    size: u32,
) -> Result<Vec<u8>, Errno> {
    if n.kind != EntryKind::File {
        return Err(Errno::EINVAL);
    }
    let layer = m.layers.get(n.layer as usize).ok_or(Errno::EIO)?;
    read_data(layer, n.offset, n.size, n.sparse().as_deref(), offset, size)
}

/// Up to `size` bytes at `offset` of a file of `len` bytes whose data starts
/// at `at` (holes of a sparse file read as zeros).
pub(super) fn read_data(
    layer: &Layer,
    at: u64,
    len: u64,
    sparse: Option<&[Segment]>,
    offset: u64,
    size: u32,
) -> Result<Vec<u8>, Errno> {
    if offset >= len {
        return Ok(Vec::new());
    }
    let mut buf = vec![0u8; (len - offset).min(size as u64) as usize];
    let mut read_at = |o: u64, b: &mut [u8]| layer.read_at(o, b);
    match crate::layer::read_file(&mut read_at, at, len, sparse, offset, &mut buf) {
        Ok(_) => Ok(buf),
        Err(e) => {
            tracing::error!(
                "reading a file of layer {}: {}",
                layer.digest,
                crate::report::Chain(&e)
            );
            Err(Errno::EIO)
        }
    }
}
