//! The read-only FUSE filesystem over a merged image tree. The tree is built on
//! the first operation that needs it; until then callbacks hand their reply to
//! the runtime, so no session thread ever waits on the network.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::cache::Layer;
use crate::image::ImageSource;
use crate::layer::{Entry, EntryKind, Segment};
use crate::overlay::partial::{Decision, LayerView, decide};
use crate::overlay::tree::{Node, NodeId, Tree};

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
    /// Inode numbers handed out before the tree existed, kept for its nodes.
    alias_of_node: HashMap<NodeId, u64>,
    node_of_alias: HashMap<u64, NodeId>,
}

/// Provisional inode numbers start here, far above any node's `id + 1`.
const PROVISIONAL_BASE: u64 = 1 << 48;

/// A path answered from the layers top down before the tree existed.
pub struct Prov {
    path: Vec<u8>,
    entry: Entry,
    nlink: u32,
    /// The layer the entry (and its data) comes from.
    layer: Arc<Layer>,
}

/// A top-down answer.
enum Partly {
    Found((u64, Arc<Prov>)),
    Missing,
    /// Only the merged tree can answer.
    Deferred,
}

#[derive(Default)]
struct Partial {
    views: HashMap<usize, (Arc<Layer>, Arc<LayerView>)>,
    by_ino: HashMap<u64, Arc<Prov>>,
    by_key: HashMap<(usize, Vec<u8>), u64>,
    next: u64,
}

pub struct State {
    source: Arc<ImageSource>,
    only: Option<usize>,
    ready: OnceLock<Arc<Mounted>>,
    building: tokio::sync::Mutex<()>,
    partial: Mutex<Partial>,
    saved_tree: OnceLock<bool>,
    /// The tree is being (or has been) built and saved in the background.
    background_tree: AtomicBool,
    /// Whether every layer was in the cache, checked after the first lookup.
    warm_checked: AtomicBool,
}

impl State {
    pub fn new(source: Arc<ImageSource>, only: Option<usize>) -> Arc<State> {
        Arc::new(State {
            source,
            only,
            ready: OnceLock::new(),
            building: tokio::sync::Mutex::new(()),
            partial: Mutex::new(Partial::default()),
            saved_tree: OnceLock::new(),
            background_tree: AtomicBool::new(false),
            warm_checked: AtomicBool::new(false),
        })
    }

    fn partial(&self) -> std::sync::MutexGuard<'_, Partial> {
        self.partial.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn saved_tree(&self) -> bool {
        *self
            .saved_tree
            .get_or_init(|| self.source.cache().has_tree(&self.source.image.digest))
    }

    fn provisional(&self, ino: u64) -> Option<Arc<Prov>> {
        self.partial().by_ino.get(&ino).cloned()
    }

    /// One layer and its path view, fetched on first need.
    async fn view(self: &Arc<Self>, i: usize) -> Result<(Arc<Layer>, Arc<LayerView>), String> {
        if let Some(v) = self.partial().views.get(&i) {
            return Ok(v.clone());
        }
        let layer = self.source.layer(i).await.map_err(|e| e.to_string())?;
        let index = layer.index().map_err(|e| e.to_string())?;
        let view = Arc::new(LayerView::new(index));
        let v = (layer, view);
        let all = {
            let mut p = self.partial();
            p.views.insert(i, v.clone());
            p.views.len() == self.source.image.layers.len()
        };
        if all {
            // Every layer is here now: save the merged tree, so the next
            // mount of the image loads it instead of reading layer indexes.
            self.build_tree_in_background();
        }
        Ok(v)
    }

    /// After a lookup has been answered: when every layer was already cached
    /// (a warm mount without a saved tree), build and save the tree now.
    /// Checked once; a cold mount saves it once its last layer arrives.
    fn after_first_lookup(self: &Arc<Self>) {
        if self.warm_checked.swap(true, Ordering::AcqRel) {
            return;
        }
        let cache = self.source.cache();
        if self
            .source
            .image
            .layers
            .iter()
            .all(|l| cache.blob_path(&l.digest).is_some())
        {
            self.build_tree_in_background();
        }
    }

    /// Builds the merged tree (which saves it) on a blocking thread, so the
    /// merge never holds up a runtime worker and so never delays an answer:
    /// lookups go on answering top-down until it is ready.
    fn build_tree_in_background(self: &Arc<Self>) {
        if self.only.is_some()
            || self.ready.get().is_some()
            || self.background_tree.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let state = Arc::clone(self);
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = handle.block_on(state.mounted()) {
                tracing::warn!("building the merged tree in the background: {e}");
            }
        });
    }

    /// Decides `path` from the top layer down, fetching only the layers it
    /// takes; `None` when the path does not exist, `Deferred` when only the
    /// merged tree can tell.
    async fn resolve_partial(self: &Arc<Self>, path: &[u8]) -> Result<Partly, String> {
        let top = self.source.image.layers.len().saturating_sub(1);
        let mut above: Vec<Arc<LayerView>> = Vec::new();
        for i in (0..=top).rev() {
            if i + 1 == top {
                // The top layer did not decide: fetch the rest in parallel so a
                // deep path costs no more than the slowest layer, while this
                // operation still waits only for the layers it needs.
                for j in 0..i {
                    let state = Arc::clone(self);
                    tokio::spawn(async move {
                        if let Err(e) = state.view(j).await {
                            tracing::warn!("prefetching layer {j}: {e}");
                        }
                    });
                }
            }
            let (layer, view) = self.view(i).await?;
            match decide(&view, path) {
                // A hardlink of a higher layer may name this file too.
                Decision::Found(_) if above.iter().any(|v| v.links(path)) => {
                    return Ok(Partly::Deferred);
                }
                Decision::Found(entry) => {
                    return Ok(Partly::Found(self.remember(i, &layer, path, entry)));
                }
                Decision::Gone => return Ok(Partly::Missing),
                Decision::Defer => return Ok(Partly::Deferred),
                Decision::Continue => above.push(view),
            }
        }
        Ok(Partly::Missing)
    }

    fn remember(
        &self,
        index: usize,
        layer: &Arc<Layer>,
        path: &[u8],
        entry: Entry,
    ) -> (u64, Arc<Prov>) {
        let mut p = self.partial();
        let id = (index, path.to_vec());
        if let Some(&ino) = p.by_key.get(&id)
            && let Some(prov) = p.by_ino.get(&ino)
        {
            return (ino, Arc::clone(prov));
        }
        let ino = PROVISIONAL_BASE + p.next;
        p.next += 1;
        let prov = Arc::new(Prov {
            path: path.to_vec(),
            // Until the tree counts subdirectories, a directory's count is
            // unknown; 1 is what find(1) and friends take to mean that.
            nlink: 1,
            entry,
            layer: Arc::clone(layer),
        });
        p.by_key.insert(id, ino);
        p.by_ino.insert(ino, Arc::clone(&prov));
        (ino, prov)
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
        let mut alias_of_node = HashMap::new();
        let mut node_of_alias = HashMap::new();
        // Held until the tree is published, so a provisional inode is either
        // aliased here or made after the tree is ready (and then not used).
        let partial = self.partial();
        for (&ino, prov) in &partial.by_ino {
            if let Ok(id) = tree.resolve(&prov.path, false) {
                alias_of_node.entry(id).or_insert(ino);
                node_of_alias.insert(ino, id);
            }
        }
        let m = Arc::new(Mounted {
            tree,
            layers,
            digests,
            blocks,
            alias_of_node,
            node_of_alias,
        });
        let _ = self.ready.set(Arc::clone(&m));
        // The layer views served lookups until now; the tree does from here
        // on, so their indexes need not stay in memory.
        let mut partial = partial;
        partial.views.clear();
        drop(partial);
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

    /// Runs `f` with what `ino` names: a node of the tree when the tree
    /// exists (or must be built for it), else an entry answered top-down.
    fn with_inode<F>(&self, ino: INodeNo, f: F)
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

fn ino_of(m: &Mounted, id: NodeId) -> INodeNo {
    INodeNo(m.alias_of_node.get(&id).copied().unwrap_or(id as u64 + 1))
}

fn id_of(m: &Mounted, ino: INodeNo) -> Result<NodeId, Errno> {
    if ino.0 >= PROVISIONAL_BASE {
        return m.node_of_alias.get(&ino.0).copied().ok_or(Errno::ENOENT);
    }
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

/// What an inode names.
enum Target<'a> {
    Node(&'a Mounted, NodeId),
    Prov(INodeNo, Arc<Prov>),
}

impl Target<'_> {
    fn attr(&self) -> FileAttr {
        match self {
            Target::Node(m, id) => attr_of(m, *id, m.tree.node(*id)),
            Target::Prov(ino, p) => attr_from(*ino, Meta::from(&**p)),
        }
    }

    fn link(&self) -> Option<&[u8]> {
        match self {
            Target::Node(m, id) => {
                let n = m.tree.node(*id);
                (n.kind == EntryKind::Symlink)
                    .then_some(n.link.as_deref())
                    .flatten()
            }
            Target::Prov(_, p) => (p.entry.kind == EntryKind::Symlink)
                .then_some(p.entry.link.as_deref())
                .flatten(),
        }
    }

    fn read(&self, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
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

    /// `(name, value)` pairs: the entry's own xattrs plus `user.rimg.layer`.
    fn xattrs(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
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
struct Meta<'a> {
    kind: EntryKind,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: i64,
    link: Option<&'a [u8]>,
    rdev: (u32, u32),
    nlink: u32,
}

impl<'a> From<&'a Node> for Meta<'a> {
    fn from(n: &'a Node) -> Meta<'a> {
        Meta {
            kind: n.kind,
            mode: n.mode,
            uid: n.uid,
            gid: n.gid,
            size: n.size,
            mtime: n.mtime,
            link: n.link.as_deref(),
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

fn attr_of(m: &Mounted, id: NodeId, n: &Node) -> FileAttr {
    attr_from(ino_of(m, id), Meta::from(n))
}

fn attr_from(ino: INodeNo, n: Meta<'_>) -> FileAttr {
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
    let layer = m.layers.get(n.layer as usize).ok_or(Errno::EIO)?;
    read_data(layer, n.offset, n.size, n.sparse(), offset, size)
}

/// Up to `size` bytes at `offset` of a file of `len` bytes whose data starts
/// at `at` (holes of a sparse file read as zeros).
fn read_data(
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
            tracing::error!("reading layer {}: {e}", layer.digest);
            Err(Errno::EIO)
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
                            tracing::error!("{e}");
                            Err(Errno::EIO)
                        }
                    },
                    Err(e) => {
                        tracing::error!("{e}");
                        Err(Errno::EIO)
                    }
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
            let r = t.and_then(|t| match t {
                Target::Node(m, p) => {
                    let id = m.tree.lookup(p, &name).ok_or(Errno::ENOENT)?;
                    Ok(attr_of(m, id, m.tree.node(id)))
                }
                // A provisional parent outlived the build: its node is unknown.
                Target::Prov(..) => Err(Errno::ENOENT),
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
        self.with_inode(ino, move |t| match t {
            Ok(t) => reply.attr(&TTL, &t.attr()),
            Err(e) => reply.error(e),
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.with_inode(ino, move |t| {
            match t.and_then(|t| t.link().map(<[u8]>::to_vec).ok_or(Errno::EINVAL)) {
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
        self.with_inode(ino, move |t| match t.and_then(|t| t.read(offset, size)) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
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
                t.xattrs()
                    .into_iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v)
                    .ok_or(Errno::NO_XATTR)
            });
            match value {
                Ok(v) => reply_sized(reply, size, &v),
                Err(e) => reply.error(e),
            }
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.with_inode(ino, move |t| match t {
            Ok(t) => {
                let mut names = Vec::new();
                for (k, _) in t.xattrs() {
                    names.extend_from_slice(&k);
                    names.push(0);
                }
                reply_sized(reply, size, &names)
            }
            Err(e) => reply.error(e),
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
    // Offsets count every entry, left-out ones too, so they stay stable.
    for (i, (name, child)) in dir_entries(&m.tree, id).enumerate().skip(offset as usize) {
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
    Ok(())
}

/// The longest name the kernel accepts in a directory entry.
const NAME_MAX: usize = 255;

/// `.` and `..` followed by the directory's children, as (name, node) pairs.
fn dir_entries(tree: &Tree, id: NodeId) -> impl Iterator<Item = (&[u8], NodeId)> + '_ {
    let parent = tree.parent(id);
    [(&b"."[..], id), (&b".."[..], parent)]
        .into_iter()
        .chain(tree.children(id))
}
