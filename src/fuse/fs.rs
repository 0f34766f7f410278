//! The read-only FUSE filesystem over a merged image tree. The tree is built on
//! the first operation that needs it; until then callbacks hand their reply to
//! the runtime, so no session thread ever waits on the network.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::layer::EntryKind;
use crate::overlay::tree::{Children, NodeId, Tree};

use super::attr::*;
use super::state::*;

/// Image content never changes, so the kernel may cache for as long as it likes.
pub(super) const TTL: Duration = Duration::from_secs(24 * 3600);
/// The xattr that names the layer an entry came from (forensics).
pub const LAYER_XATTR: &str = "user.rimg.layer";
const READAHEAD: u32 = 1 << 20;

/// `Filesystem` methods that answer EROFS, from their parameter types.
macro_rules! read_only {
    ($($name:ident($($ty:ty),* $(,)?) -> $reply:ty;)*) => {
        $(fn $name(&self, $(_: $ty,)* reply: $reply) {
            reply.error(Errno::EROFS);
        })*
    };
}

pub struct ImageFs {
    pub(super) rt: tokio::runtime::Handle,
    pub(super) state: Arc<State>,
    pub(super) uid: u32,
    pub(super) gid: u32,
    /// The kernel can do without open/opendir round trips.
    pub(super) no_open: bool,
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
    pub(super) fn with_tree<F>(&self, f: F)
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
                    tracing::error!("{}", crate::report::Chain(&e));
                    f(Err(Errno::EIO))
                }
            }
        });
    }

    /// Runs `f` with what `ino` names: a node of the tree when the tree
    /// exists (or must be built for it), else an entry answered top-down.
    pub(super) fn with_inode<F>(&self, ino: INodeNo, f: F)
    where
        F: FnOnce(Result<Target<'_>, Errno>) + Send + 'static,
    {
        let prov = (ino.0 >= PROVISIONAL_BASE)
            .then(|| self.state.provisional(ino.0))
            .flatten();
        match (self.state.ready.get(), prov) {
            (Some(m), prov) => match (id_of(m, ino), prov) {
                (Ok(id), _) => f(Ok(Target::Node(m, id))),
                (Err(_), Some(p)) => f(Ok(Target::Prov(ino, p))),
                (Err(e), None) => f(Err(e)),
            },
            (None, Some(p)) => f(Ok(Target::Prov(ino, p))),
            (None, None) => {
                self.with_tree(move |m| f(m.and_then(|m| Ok(Target::Node(m, id_of(m, ino)?)))))
            }
        }
    }

    /// Before the tree exists the root still answers, so `stat` of the mount
    /// point (done by mount helpers and shells) does not start a download.
    pub(super) fn placeholder_root(&self) -> FileAttr {
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

impl Filesystem for ImageFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.add_capabilities(
            InitFlags::FUSE_DO_READDIRPLUS
                | InitFlags::FUSE_READDIRPLUS_AUTO
                | InitFlags::FUSE_CACHE_SYMLINKS
                | InitFlags::FUSE_PARALLEL_DIROPS,
        );
        // Safe because no mount relies on userspace to keep anyone out: it
        // is private (the kernel checks every access, cached or not) or
        // shared on purpose (`--allow-other`). With allow_root it was not:
        // once root had opened a file, no open came to be refused.
        let no_open = InitFlags::FUSE_NO_OPEN_SUPPORT | InitFlags::FUSE_NO_OPENDIR_SUPPORT;
        self.no_open =
            config.capabilities().contains(no_open) && config.add_capabilities(no_open).is_ok();
        let _ = config.set_max_readahead(READAHEAD);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = name.as_bytes().to_vec();
        // Before the tree exists, a path is answered from the layers top down,
        // fetching only as many as it takes.
        // With a saved tree (a warm cache), loading it whole is quicker still.
        let partial = self.state.only.is_none() && !self.state.saved_tree();
        let partial_parent = match (self.state.ready.get(), partial) {
            (None, true) if parent.0 == 1 => Some(Vec::new()),
            (None, true) if parent.0 >= PROVISIONAL_BASE => self
                .state
                .provisional(parent.0)
                .filter(|p| p.entry.kind == EntryKind::Dir)
                .map(|p| p.path.clone()),
            _ => None,
        };
        if let Some(dir) = partial_parent {
            let state = Arc::clone(&self.state);
            let path = crate::names::join(&dir, &name);
            self.rt.spawn(async move {
                let answer = match state.resolve_partial(&path).await {
                    Ok(Partly::Found((ino, prov))) => {
                        // The tree may have been published (by a build in the
                        // background) meanwhile; then its inode numbers rule.
                        Ok(state
                            .ready
                            .get()
                            .and_then(|m| {
                                let id = m.tree.resolve(&prov.path, false).ok()?;
                                Some(attr_of(m, id, m.tree.node(id)))
                            })
                            .unwrap_or_else(|| attr_from(INodeNo(ino), Meta::from(&*prov))))
                    }
                    Ok(Partly::Missing) => Err(Errno::ENOENT),
                    Ok(Partly::Deferred) => match state.mounted().await {
                        Ok(m) => id_of(&m, parent).and_then(|p| {
                            let id = m.tree.lookup(p, &name).ok_or(Errno::ENOENT)?;
                            Ok(attr_of(&m, id, m.tree.node(id)))
                        }),
                        Err(e) => {
                            tracing::error!("{}", crate::report::Chain(&e));
                            Err(Errno::EIO)
                        }
                    },
                    Err(e) => {
                        tracing::error!("{}", crate::report::Chain(&e));
                        Err(Errno::EIO)
                    }
                };
                let answer = match state.ready.get() {
                    Some(m) if m.tree.damaged() => Err(Errno::EIO),
                    _ => answer,
                };
                match answer {
                    Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
                    Err(e) => reply.error(e),
                }
                state.after_first_lookup();
            });
            return;
        }
        self.with_inode(parent, move |t| {
            let r = t.and_then(|t| {
                let r = match &t {
                    Target::Node(m, p) => m
                        .tree
                        .lookup(*p, &name)
                        .ok_or(Errno::ENOENT)
                        .map(|id| attr_of(m, id, m.tree.node(id))),
                    // A provisional parent outlived the build: its node is unknown.
                    Target::Prov(..) => Err(Errno::ENOENT),
                };
                t.sound(r)
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
        self.with_inode(ino, move |t| match t.and_then(|t| t.sound(Ok(t.attr()))) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.with_inode(ino, move |t| {
            match t.and_then(|t| t.sound(t.link().map(<[u8]>::to_vec).ok_or(Errno::EINVAL))) {
                Ok(l) => reply.data(&l),
                Err(e) => reply.error(e),
            }
        });
    }

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
        let rt = self.rt.clone();
        self.with_inode(ino, move |t| {
            // A layer read by range may have to fetch: never on this thread.
            if let Ok(Some(job)) = t.as_ref().map(|t| t.ranged_read(offset, size)) {
                // The node's record came from the saved tree: still sound?
                if let Ok(t) = &t
                    && let Err(e) = t.sound(Ok(()))
                {
                    return reply.error(e);
                }
                rt.spawn_blocking(move || match job.run() {
                    Ok(data) => reply.data(&data),
                    Err(e) => reply.error(e),
                });
                return;
            }
            match t.and_then(|t| t.sound(t.read(offset, size))) {
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
                reply.add(ino_of(m, child), next, kind, name)
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
                let attr = attr_of(m, child, m.tree.node(child));
                reply.add(ino_of(m, child), next, name, &TTL, &attr, Generation(0))
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
        self.with_inode(ino, move |t| {
            let value = t.and_then(|t| {
                let v = t
                    .xattrs()
                    .into_iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v)
                    .ok_or(Errno::NO_XATTR);
                t.sound(v)
            });
            match value {
                Ok(v) => reply_sized(reply, size, &v),
                Err(e) => reply.error(e),
            }
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.with_inode(ino, move |t| {
            match t.and_then(|t| t.sound(Ok(t.xattrs()))) {
                Ok(xattrs) => {
                    let mut names = Vec::new();
                    for (k, _) in xattrs {
                        names.extend_from_slice(&k);
                        names.push(0);
                    }
                    reply_sized(reply, size, &names)
                }
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

    // A read-only filesystem: every call that would change it says so.
    read_only! {
        setattr(&Request, INodeNo, Option<u32>, Option<u32>, Option<u32>, Option<u64>,
            Option<TimeOrNow>, Option<TimeOrNow>, Option<SystemTime>, Option<FileHandle>,
            Option<SystemTime>, Option<SystemTime>, Option<SystemTime>,
            Option<fuser::BsdFileFlags>) -> ReplyAttr;
        mknod(&Request, INodeNo, &OsStr, u32, u32, u32) -> ReplyEntry;
        mkdir(&Request, INodeNo, &OsStr, u32, u32) -> ReplyEntry;
        unlink(&Request, INodeNo, &OsStr) -> ReplyEmpty;
        rmdir(&Request, INodeNo, &OsStr) -> ReplyEmpty;
        symlink(&Request, INodeNo, &OsStr, &std::path::Path) -> ReplyEntry;
        rename(&Request, INodeNo, &OsStr, INodeNo, &OsStr, RenameFlags) -> ReplyEmpty;
        link(&Request, INodeNo, INodeNo, &OsStr) -> ReplyEntry;
        write(&Request, INodeNo, FileHandle, u64, &[u8], WriteFlags, OpenFlags,
            Option<LockOwner>) -> ReplyWrite;
        create(&Request, INodeNo, &OsStr, u32, u32, i32) -> ReplyCreate;
        setxattr(&Request, INodeNo, &OsStr, &[u8], i32, u32) -> ReplyEmpty;
        removexattr(&Request, INodeNo, &OsStr) -> ReplyEmpty;
    }
}

/// Feeds the entries of directory `ino` from `offset` on to `add(mounted,
/// child, next_offset, name)` until it reports the reply buffer full.
pub(super) fn fill_dir(
    m: Result<&Mounted, Errno>,
    ino: INodeNo,
    offset: u64,
    mut add: impl FnMut(&Mounted, NodeId, u64, &OsStr) -> bool,
) -> Result<(), Errno> {
    let m = m?;
    let id = id_of(m, ino)?;
    // Offsets count every entry, left-out ones too, so they stay stable;
    // `skip` jumps straight to the offset (the children table is indexed),
    // so listing a huge directory page by page costs each page alone.
    let entries = dir_entries(&m.tree, id).skip(offset as usize);
    for (i, (name, child)) in (offset as usize..).zip(entries) {
        if name.len() > NAME_MAX {
            // The kernel fails the whole listing (EIO) on such a name; leave
            // it out. `rimg ls` and `rimg cat` still reach it.
            tracing::warn!(
                "leaving a {}-byte name out of the listing of inode {}: longer than the kernel's {NAME_MAX}-byte limit",
                name.len(),
                ino.0
            );
            continue;
        }
        if add(m, child, i as u64 + 1, OsStr::from_bytes(name)) {
            break;
        }
    }
    if m.tree.damaged() {
        return Err(Errno::EIO);
    }
    Ok(())
}

/// The longest name the kernel accepts in a directory entry.
pub(super) const NAME_MAX: usize = 255;

/// `.` and `..` followed by the directory's children, as (name, node) pairs.
pub(super) fn dir_entries(tree: &Tree, id: NodeId) -> DirEntries<'_> {
    DirEntries {
        dots: [(&b"."[..], id), (&b".."[..], tree.parent(id))],
        done: 0,
        children: tree.children(id),
    }
}

/// `.`, `..`, then the children; unlike a `chain`, skipping is O(1).
pub(super) struct DirEntries<'a> {
    dots: [(&'a [u8], NodeId); 2],
    done: usize,
    children: Children<'a>,
}

impl<'a> Iterator for DirEntries<'a> {
    type Item = (&'a [u8], NodeId);

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(&d) = self.dots.get(self.done) {
            self.done += 1;
            return Some(d);
        }
        self.children.next()
    }

    fn nth(&mut self, n: usize) -> Option<Self::Item> {
        let dots = (self.dots.len() - self.done).min(n);
        self.done += dots;
        match n - dots {
            0 => self.next(),
            rest => self.children.nth(rest),
        }
    }
}
