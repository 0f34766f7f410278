//! What a mount knows while it serves: the merged tree once it exists, and
//! before that the paths answered from the layers top down, with the
//! provisional inode numbers the tree adopts when it is built.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::cache::Layer;
use crate::digest::Digest;
use crate::image::{ImageError, ImageSource};
use crate::layer::Entry;
use crate::overlay::partial::{Decision, LayerView, decide};
use crate::overlay::tree::{NodeId, Tree};
use crate::report::Chain;

/// The tree and the layers whose bytes it points into.
pub struct Mounted {
    pub tree: Tree,
    pub layers: Vec<Arc<Layer>>,
    /// Digest of each tree layer index.
    pub digests: Vec<Digest>,
    /// 4 KiB blocks the files take, for statfs.
    pub(super) blocks: u64,
    /// Inode numbers handed out before the tree existed, kept for its nodes.
    pub(super) alias_of_node: HashMap<NodeId, u64>,
    pub(super) node_of_alias: HashMap<u64, NodeId>,
}

/// Provisional inode numbers start here, far above any node's `id + 1`.
pub(super) const PROVISIONAL_BASE: u64 = 1 << 48;

/// A path answered from the layers top down before the tree existed.
pub struct Prov {
    pub(super) path: Vec<u8>,
    pub(super) entry: Entry,
    pub(super) nlink: u32,
    /// The layer the entry (and its data) comes from.
    pub(super) layer: Arc<Layer>,
}

/// A top-down answer.
pub(super) enum Partly {
    Found((u64, Arc<Prov>)),
    Missing,
    /// Only the merged tree can answer.
    Deferred,
}

#[derive(Default)]
pub(super) struct Partial {
    pub(super) views: HashMap<usize, (Arc<Layer>, Arc<LayerView>)>,
    pub(super) by_ino: HashMap<u64, Arc<Prov>>,
    pub(super) by_key: HashMap<(usize, Vec<u8>), u64>,
    pub(super) next: u64,
}

pub struct State {
    pub(super) source: Arc<ImageSource>,
    pub(super) only: Option<usize>,
    pub(super) ready: OnceLock<Arc<Mounted>>,
    pub(super) building: tokio::sync::Mutex<()>,
    pub(super) partial: Mutex<Partial>,
    pub(super) saved_tree: OnceLock<bool>,
    /// The tree is being (or has been) built and saved in the background.
    pub(super) background_tree: AtomicBool,
    /// Whether every layer was in the cache, checked after the first lookup.
    pub(super) warm_checked: AtomicBool,
    /// The last failure to get a layer or build the tree, and when: accesses
    /// soon after it get the same answer instead of asking a registry that
    /// just failed again (the fetch itself already retried within its bounds).
    pub(super) failed: Mutex<Option<(std::time::Instant, Arc<ImageError>)>>,
}

/// Why the mount cannot answer: a layer or the tree could not be had.
/// Cloneable, since one failure answers every access that waited for it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Unavailable {
    #[error(transparent)]
    Failed(Arc<ImageError>),
    /// A failure moments ago, answered from memory.
    #[error("not retried for {RETRY_AFTER:?} after a failure")]
    Recent(#[source] Arc<ImageError>),
}

/// How long a failure is answered from memory before the next access tries
/// again.
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

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
            failed: Mutex::new(None),
        })
    }

    /// The recent failure, if an access should not try again yet.
    fn recent_failure(&self) -> Option<Unavailable> {
        let f = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        f.as_ref()
            .filter(|(at, _)| at.elapsed() < RETRY_AFTER)
            .map(|(_, e)| Unavailable::Recent(Arc::clone(e)))
    }

    /// Remembers a failure for [`Self::recent_failure`] and hands it on.
    fn failure(&self, e: ImageError) -> Unavailable {
        let e = Arc::new(e);
        *self.failed.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((std::time::Instant::now(), Arc::clone(&e)));
        Unavailable::Failed(e)
    }

    pub(super) fn partial(&self) -> std::sync::MutexGuard<'_, Partial> {
        self.partial.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn saved_tree(&self) -> bool {
        *self.saved_tree.get_or_init(|| {
            self.source
                .cache()
                .has_tree(&self.source.predicted_tree_key())
        })
    }

    pub(super) fn provisional(&self, ino: u64) -> Option<Arc<Prov>> {
        self.partial().by_ino.get(&ino).cloned()
    }

    /// One layer and its path view, fetched on first need.
    pub(super) async fn view(
        self: &Arc<Self>,
        i: usize,
    ) -> Result<(Arc<Layer>, Arc<LayerView>), Unavailable> {
        if let Some(v) = self.partial().views.get(&i) {
            return Ok(v.clone());
        }
        if let Some(e) = self.recent_failure() {
            return Err(e);
        }
        let layer = self.source.layer(i).await.map_err(|e| self.failure(e))?;
        let index = layer
            .index()
            .map_err(|e| self.failure(self.source.layer_error(i, e)))?;
        let view = Arc::new(LayerView::new(index));
        let v = (layer, view);
        if self.ready.get().is_some() {
            // The tree serves now and has dropped the views; keep none.
            return Ok(v);
        }
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
    pub(super) fn after_first_lookup(self: &Arc<Self>) {
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
    pub(super) fn build_tree_in_background(self: &Arc<Self>) {
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
                tracing::warn!("building the merged tree in the background: {}", Chain(&e));
            }
        });
    }

    /// Decides `path` from the top layer down, fetching only the layers it
    /// takes; `None` when the path does not exist, `Deferred` when only the
    /// merged tree can tell.
    pub(super) async fn resolve_partial(
        self: &Arc<Self>,
        path: &[u8],
    ) -> Result<Partly, Unavailable> {
        if self.ready.get().is_some() {
            // The tree was published meanwhile: it answers.
            return Ok(Partly::Deferred);
        }
        if self.source.image.layers.is_empty() {
            return Ok(Partly::Missing);
        }
        let top = self.source.image.layers.len() - 1;
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
                            tracing::warn!("prefetching layer {j}: {}", Chain(&e));
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

    pub(super) fn remember(
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

    /// The tree, built once. A failure is remembered for `RETRY_AFTER`, so a
    /// burst of lookups does not retry it at once; after that an access retries.
    pub async fn mounted(&self) -> Result<Arc<Mounted>, Unavailable> {
        if let Some(m) = self.ready.get() {
            return Ok(Arc::clone(m));
        }
        if let Some(e) = self.recent_failure() {
            return Err(e);
        }
        let _guard = self.building.lock().await;
        if let Some(m) = self.ready.get() {
            return Ok(Arc::clone(m));
        }
        // Those who waited for the build that just failed get its answer.
        if let Some(e) = self.recent_failure() {
            return Err(e);
        }
        let (tree, layers) = self
            .source
            .tree_in_place(self.only)
            .await
            .map_err(|e| self.failure(e))?;
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
        // Summed when the tree was made: adding it up here would read every node.
        let blocks = tree.blocks();
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
