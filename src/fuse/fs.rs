//! The read-only FUSE filesystem over a merged image tree. The tree is built on
//! the first operation that needs it; until then callbacks hand their reply to
//! the runtime, so no session thread ever waits on the network.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::cache::Layer;
use crate::image::ImageSource;
use crate::layer::EntryKind;
use crate::tree::{Node, NodeId, Tree};

/// Image content never changes, so the kernel may cache for as long as it likes.
const TTL: Duration = Duration::from_secs(24 * 3600);
/// The xattr that names the layer an entry came from (forensics).
pub const LAYER_XATTR: &str = "user.rimg.layer";
const READAHEAD: u32 = 1 << 20;

/// The tree and the layers whose bytes it points into.
pub struct Mounted {
    pub tree: Tree,
    pub layers: Vec<Arc<Layer>>,
    /// Digest of each tree layer index.
    pub digests: Vec<String>,
    /// 4 KiB blocks the files take, for statfs.
    blocks: u64,
}

pub struct State {
    source: Arc<ImageSource>,
    only: Option<usize>,
    ready: OnceLock<Arc<Mounted>>,
    building: tokio::sync::Mutex<()>,
}

impl State {
    pub fn new(source: Arc<ImageSource>, only: Option<usize>) -> Arc<State> {
        Arc::new(State {
            source,
            only,
            ready: OnceLock::new(),
            building: tokio::sync::Mutex::new(()),
        })
    }

    /// The tree, built once. A failure is not remembered, so a later access retries.
    pub async fn mounted(&self) -> Result<Arc<Mounted>, String> {
        if let Some(m) = self.ready.get() {
            return Ok(Arc::clone(m));
        }
        let _guard = self.building.lock().await;
        if let Some(m) = self.ready.get() {
            return Ok(Arc::clone(m));
        }
        let (tree, layers) = self
            .source
            .tree(self.only)
            .await
            .map_err(|e| e.to_string())?;
        let digests = match self.only {
            Some(i) => vec![self.source.image.layers[i].digest.clone()],
            None => self
                .source
                .image
                .layers
                .iter()
                .map(|l| l.digest.clone())
                .collect(),
        };
        let blocks = (0..tree.len())
            .map(|i| tree.node(i as NodeId).size.div_ceil(4096))
            .sum();
        let m = Arc::new(Mounted {
            tree,
            layers,
            digests,
            blocks,
        });
        let _ = self.ready.set(Arc::clone(&m));
        Ok(m)
    }
}

pub struct ImageFs {
    rt: tokio::runtime::Handle,
    state: Arc<State>,
    uid: u32,
    gid: u32,
    /// The kernel can do without open/opendir round trips.
    no_open: bool,
}

impl ImageFs {
    pub fn new(rt: tokio::runtime::Handle, state: Arc<State>) -> ImageFs {
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        ImageFs {
            rt,
            state,
            uid,
            gid,
            no_open: false,
        }
    }

    /// Runs `f` with the tree: inline when it is built, else on the runtime
    /// after building it. Build failures answer EIO and are logged.
    fn with_tree<F>(&self, f: F)
    where
        F: FnOnce(Result<&Mounted, Errno>) + Send + 'static,
    {
        if let Some(m) = self.state.ready.get() {
            f(Ok(m));
            return;
        }
        let state = Arc::clone(&self.state);
        self.rt.spawn(async move {
            match state.mounted().await {
                Ok(m) => f(Ok(&m)),
                Err(e) => {
                    tracing::error!("{e}");
                    f(Err(Errno::EIO))
                }
            }
        });
    }

    /// Before the tree exists the root still answers, so `stat` of the mount
    /// point (done by mount helpers and shells) does not start a download.
    fn placeholder_root(&self) -> FileAttr {
        FileAttr {
            ino: INodeNo(1),
            size: 0,
            blocks: 0,
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: FileType::Directory,
            perm: 0o755,
            nlink: 2,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

fn ino_of(id: NodeId) -> INodeNo {
    INodeNo(id as u64 + 1)
}

fn id_of(m: &Mounted, ino: INodeNo) -> Result<NodeId, Errno> {
    let id = ino.0.checked_sub(1).ok_or(Errno::ENOENT)?;
    if id as usize >= m.tree.len() {
        return Err(Errno::ENOENT);
    }
    Ok(id as NodeId)
}

fn file_type(kind: EntryKind) -> FileType {
    match kind {
        EntryKind::Dir => FileType::Directory,
        EntryKind::Symlink => FileType::Symlink,
        EntryKind::Char => FileType::CharDevice,
        EntryKind::Block => FileType::BlockDevice,
        EntryKind::Fifo => FileType::NamedPipe,
        _ => FileType::RegularFile,
    }
}

fn attr_of(id: NodeId, n: &Node) -> FileAttr {
    let mtime = if n.mtime >= 0 {
        UNIX_EPOCH + Duration::from_secs(n.mtime as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(n.mtime.unsigned_abs())
    };
    let size = match n.kind {
        EntryKind::Symlink => n.link.as_ref().map_or(0, |l| l.len() as u64),
        EntryKind::Dir => 4096,
        _ => n.size,
    };
    FileAttr {
        ino: ino_of(id),
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
fn xattrs_of(m: &Mounted, n: &Node) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = n
        .xattrs()
        .map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec()))
        .collect();
    if let Some(d) = m.digests.get(n.layer as usize) {
        out.push((LAYER_XATTR.as_bytes().to_vec(), d.as_bytes().to_vec()));
    }
    out
}

fn reply_sized(reply: ReplyXattr, size: u32, data: &[u8]) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if (size as usize) < data.len() {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(data);
    }
}

fn read_node(m: &Mounted, n: &Node, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
    if n.kind != EntryKind::File {
        return Err(Errno::EINVAL);
    }
    if offset >= n.size {
        return Ok(Vec::new());
    }
    let len = (n.size - offset).min(size as u64) as usize;
    let layer = m.layers.get(n.layer as usize).ok_or(Errno::EIO)?;
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        match layer.read_at(n.offset + offset + done as u64, &mut buf[done..]) {
            Ok(0) => {
                tracing::error!(
                    "layer {} ends before the file's data does",
                    m.digests[n.layer as usize]
                );
                return Err(Errno::EIO);
            }
            Ok(k) => done += k,
            Err(e) => {
                tracing::error!("reading layer {}: {e}", m.digests[n.layer as usize]);
                return Err(Errno::EIO);
            }
        }
    }
    Ok(buf)
}

impl Filesystem for ImageFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.add_capabilities(
            InitFlags::FUSE_DO_READDIRPLUS
                | InitFlags::FUSE_READDIRPLUS_AUTO
                | InitFlags::FUSE_CACHE_SYMLINKS
                | InitFlags::FUSE_PARALLEL_DIROPS,
        );
        let no_open = InitFlags::FUSE_NO_OPEN_SUPPORT | InitFlags::FUSE_NO_OPENDIR_SUPPORT;
        self.no_open =
            config.capabilities().contains(no_open) && config.add_capabilities(no_open).is_ok();
        let _ = config.set_max_readahead(READAHEAD);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = name.as_bytes().to_vec();
        self.with_tree(move |m| {
            let r = m.and_then(|m| {
                let p = id_of(m, parent)?;
                let name = std::str::from_utf8(&name).map_err(|_| Errno::ENOENT)?;
                let id = m.tree.lookup(p, name).ok_or(Errno::ENOENT)?;
                Ok(attr_of(id, m.tree.node(id)))
            });
            match r {
                Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
                Err(e) => reply.error(e),
            }
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino.0 == 1 && self.state.ready.get().is_none() {
            reply.attr(&Duration::ZERO, &self.placeholder_root());
            return;
        }
        self.with_tree(move |m| {
            match m.and_then(|m| Ok(attr_of(id_of(m, ino)?, m.tree.node(id_of(m, ino)?)))) {
                Ok(attr) => reply.attr(&TTL, &attr),
                Err(e) => reply.error(e),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.with_tree(move |m| {
            let r = m.and_then(|m| {
                let n = m.tree.node(id_of(m, ino)?);
                match (&n.kind, &n.link) {
                    (EntryKind::Symlink, Some(l)) => Ok(l.as_bytes().to_vec()),
                    _ => Err(Errno::EINVAL),
                }
            });
            match r {
                Ok(t) => reply.data(&t),
                Err(e) => reply.error(e),
            }
        });
    }

    /// Content never changes and the mount is read-only (the kernel refuses
    /// writable opens itself), so opens need no state: ENOSYS tells a kernel
    /// that offers FUSE_NO_OPEN_SUPPORT to stop sending open and release at
    /// all, keeping the page cache (it then defaults to FOPEN_KEEP_CACHE).
    fn open(&self, _req: &Request, _ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            reply.error(Errno::EROFS);
        } else if self.no_open {
            reply.error(Errno::ENOSYS);
        } else {
            reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.with_tree(move |m| {
            let r = m.and_then(|m| read_node(m, m.tree.node(id_of(m, ino)?), offset, size));
            match r {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(e),
            }
        });
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if self.no_open {
            reply.error(Errno::ENOSYS);
        } else {
            reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            );
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.with_tree(move |m| {
            let filled = fill_dir(m, ino, offset, |m, child, next, name| {
                let kind = file_type(m.tree.node(child).kind);
                reply.add(ino_of(child), next, kind, name)
            });
            match filled {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        self.with_tree(move |m| {
            let filled = fill_dir(m, ino, offset, |m, child, next, name| {
                let attr = attr_of(child, m.tree.node(child));
                reply.add(ino_of(child), next, name, &TTL, &attr, Generation(0))
            });
            match filled {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let (blocks, files) = match self.state.ready.get() {
            Some(m) => (m.blocks, m.tree.len() as u64),
            None => (0, 0),
        };
        reply.statfs(blocks, 0, 0, files, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let name = name.as_bytes().to_vec();
        self.with_tree(move |m| {
            let r = m.and_then(|m| {
                let n = m.tree.node(id_of(m, ino)?);
                xattrs_of(m, n)
                    .into_iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v)
                    .ok_or(Errno::NO_XATTR)
            });
            match r {
                Ok(v) => reply_sized(reply, size, &v),
                Err(e) => reply.error(e),
            }
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.with_tree(move |m| {
            let r = m.and_then(|m| {
                let n = m.tree.node(id_of(m, ino)?);
                let mut names = Vec::new();
                for (k, _) in xattrs_of(m, n) {
                    names.extend_from_slice(&k);
                    names.push(0);
                }
                Ok(names)
            });
            match r {
                Ok(v) => reply_sized(reply, size, &v),
                Err(e) => reply.error(e),
            }
        });
    }

    fn access(&self, _req: &Request, _ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if mask.contains(AccessFlags::W_OK) {
            reply.error(Errno::EROFS);
        } else {
            reply.ok();
        }
    }

    // Every write operation fails with EROFS, even if the kernel lets one through.

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EROFS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }
}

/// Feeds the entries of directory `ino` from `offset` on to `add(mounted,
/// child, next_offset, name)` until it reports the reply buffer full.
fn fill_dir(
    m: Result<&Mounted, Errno>,
    ino: INodeNo,
    offset: u64,
    mut add: impl FnMut(&Mounted, NodeId, u64, &OsStr) -> bool,
) -> Result<(), Errno> {
    let m = m?;
    let id = id_of(m, ino)?;
    for (i, (name, child)) in dir_entries(&m.tree, id).skip(offset as usize).enumerate() {
        if add(
            m,
            child,
            offset + i as u64 + 1,
            OsStr::from_bytes(name.as_bytes()),
        ) {
            break;
        }
    }
    Ok(())
}

/// `.` and `..` followed by the directory's children, as (name, node) pairs.
fn dir_entries(tree: &Tree, id: NodeId) -> impl Iterator<Item = (&str, NodeId)> + '_ {
    let parent = tree.parent(id);
    [(".", id), ("..", parent)]
        .into_iter()
        .chain(tree.children(id))
}
