//! Commands over many images: which images a selection names (several
//! references, every tag of a repository with `--all-tags`, `--tags GLOB`,
//! every repository a registry's `_catalog` lists with `--catalog HOST`),
//! what each is called on a line (its tag, or more where tags alone are
//! ambiguous), opening them one after another with one set of credentials
//! and a progress line, Ctrl-C, and `log` release by release. `grep` over
//! many images is [`super::grep`], which prints one image or many alike.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyhow::{Context, Result, bail};

use super::{Common, Names, about, parse_reference, runtime};
use rimg::image::ImageSource;
use rimg::local::{self, Location};
use rimg::names::glob_match;
use rimg::registry::{Client, Credentials};

/// Which images a command spans, as its options say.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Every tag of each repository named.
    pub all_tags: bool,
    /// The tags matching this glob (`*`, `?`, `[...]`).
    pub tags: Option<String>,
    /// Every repository this registry's `_catalog` lists.
    pub catalog: Option<String>,
}

impl Selection {
    /// Whether `references` with these options name more than one image.
    pub fn is_many(&self, references: &[String]) -> bool {
        references.len() != 1 || self.all_tags || self.tags.is_some() || self.catalog.is_some()
    }

    /// Whether the images come from listing a registry's tags.
    pub fn expands_tags(&self) -> bool {
        self.all_tags || self.tags.is_some() || self.catalog.is_some()
    }
}

/// The images `references` and `sel` name, sorted and each once.
pub(crate) fn expand(
    rt: &tokio::runtime::Runtime,
    client: &Arc<Client>,
    references: &[String],
    sel: &Selection,
) -> Result<Vec<String>> {
    let mut bases: Vec<String> = references.to_vec();
    if let Some(host) = &sel.catalog {
        let repos = rt
            .block_on(client.catalog(host))
            .with_context(|| format!("cannot list the repositories of {host}"))?;
        bases.extend(repos.into_iter().map(|r| format!("{host}/{r}")));
    }
    let mut out = Vec::new();
    for b in bases {
        if !sel.expands_tags() {
            out.push(b);
            continue;
        }
        let Location::Registry(r) = local::locate(&b) else {
            bail!(
                "{b}: --all-tags, --tags and --catalog list a registry's tags; this is a local archive"
            );
        };
        let reference = parse_reference(r)?;
        let tags = rt.block_on(client.tags(&reference)).map_err(|e| {
            about(
                e,
                &reference,
                format!("cannot list the tags of {}", reference.name()),
            )
        })?;
        let glob = sel.tags.as_deref().unwrap_or("*");
        out.extend(
            tags.iter()
                .filter(|t| glob_match(glob.as_bytes(), t.as_bytes()))
                .map(|t| format!("{}:{t}", reference.name())),
        );
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// What a line calls each image: its tag when all are of one repository,
/// else `repository:tag` (the full reference across registries).
pub(crate) fn labels(refs: &[String]) -> Vec<String> {
    let parsed: Vec<Option<rimg::reference::Reference>> = refs
        .iter()
        .map(|r| match local::locate(r) {
            Location::Registry(r) => parse_reference(r).ok(),
            Location::Local(_) => None,
        })
        .collect();
    let first = parsed.first().cloned().flatten();
    let same = |f: &dyn Fn(&rimg::reference::Reference) -> &str| {
        parsed.iter().all(|p| {
            p.as_ref()
                .zip(first.as_ref())
                .is_some_and(|(p, q)| f(p) == f(q))
        })
    };
    let one_repo = same(&|r| &r.repository) && same(&|r| &r.registry);
    let one_registry = same(&|r| &r.registry);
    refs.iter()
        .zip(&parsed)
        .map(|(s, p)| match p {
            Some(p) => {
                let target = match (&p.digest, &p.tag) {
                    (Some(d), _) => d.clone(),
                    (None, Some(t)) => t.clone(),
                    (None, None) => "latest".into(),
                };
                let sep = if p.digest.is_some() { "@" } else { ":" };
                if one_repo {
                    target
                } else if one_registry {
                    format!("{}{sep}{target}", p.repository)
                } else {
                    s.clone()
                }
            }
            None => s.clone(),
        })
        .collect()
}

/// Set once Ctrl-C is pressed: the scan stops and prints what it found.
pub(crate) fn interrupt_flag(rt: &tokio::runtime::Runtime) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = Arc::clone(&stop);
    rt.spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            s.store(true, Ordering::Relaxed);
        }
    });
    stop
}

/// `fut`, unless `stop` is set first.
pub(crate) async fn or_stop<T>(stop: &AtomicBool, fut: impl Future<Output = T>) -> Option<T> {
    let watch = async {
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        r = fut => Some(r),
        () = watch => None,
    }
}

/// Counts the bytes layer downloads bring, for the progress line.
struct Fetched(Arc<AtomicU64>);

impl rimg::image::Progress for Fetched {
    fn layer(&self, _: &rimg::digest::Digest, _: u64) -> Arc<dyn rimg::image::LayerProgress> {
        Arc::new(Fetched(Arc::clone(&self.0)))
    }
}

impl rimg::image::LayerProgress for Fetched {
    fn advance(&self, bytes: u64) {
        self.0.fetch_add(bytes, Ordering::Relaxed);
    }
    fn done(&self) {}
}

/// A progress line on stderr when it is a terminal, else nothing.
pub(crate) fn bar(len: u64, template: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::with_draw_target(
        Some(len),
        indicatif::ProgressDrawTarget::stderr(),
    );
    b.set_style(
        indicatif::ProgressStyle::with_template(template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    b
}

/// Opens images one after another, so a layer they share is fetched once
/// (the cache is content-addressed) and then found there. Credentials are
/// read once (`--password-stdin`) for the listings and every image.
pub(crate) struct Opener<'a> {
    common: &'a Common,
    rt: &'a tokio::runtime::Runtime,
    creds: Option<Credentials>,
    fetched: Arc<AtomicU64>,
    /// One image: a bar per layer download, as every command shows.
    one: bool,
}

impl<'a> Opener<'a> {
    pub(crate) fn new(
        common: &'a Common,
        rt: &'a tokio::runtime::Runtime,
        one: bool,
    ) -> Result<Self> {
        Ok(Opener {
            common,
            rt,
            creds: common.registry.explicit_credentials()?,
            fetched: Arc::new(AtomicU64::new(0)),
            one,
        })
    }

    /// A registry client with the credentials, for tag and catalog listings.
    pub(crate) fn client(&self) -> Result<Arc<Client>> {
        self.common.registry.client_with(self.creds.clone())
    }

    pub(crate) fn open(&self, reference: &str) -> Result<Arc<ImageSource>> {
        let progress: Arc<dyn rimg::image::Progress> = if self.one {
            super::bars(std::io::stderr().is_terminal())
        } else {
            Arc::new(Fetched(Arc::clone(&self.fetched)))
        };
        self.common
            .open_image_as(self.rt, reference, progress, self.creds.clone())
    }

    pub(crate) fn runtime(&self) -> &tokio::runtime::Runtime {
        self.rt
    }

    pub(crate) fn fetched(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }
}

/// One release's view of the path.
struct Release {
    tag: String,
    reference: String,
    created: String,
    state: Option<rimg::forensics::State>,
}

/// `path` release by release: each image of the selection, oldest first
/// (by the config's `created`, then name), and a line wherever the path
/// appeared, changed or disappeared since the release before.
pub fn log(
    common: &Common,
    references: &[String],
    select: &Selection,
    path: &[u8],
    as_json: bool,
) -> Result<()> {
    let rt = runtime()?;
    let stop = interrupt_flag(&rt);
    let opener = Opener::new(common, &rt, false)?;
    let refs = expand(&rt, &opener.client()?, references, select)?;
    let names = labels(&refs);
    let mut states = rimg::forensics::across::PathStates::new();
    let mut releases = Vec::new();
    let opening = bar(refs.len() as u64, "opening {pos}/{len} images, {msg}");
    for (r, label) in refs.iter().zip(&names) {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        opening.set_message(format!(
            "{} fetched: {r}",
            indicatif::HumanBytes(opener.fetched())
        ));
        let source = opener.open(r)?;
        let Some(tree) = rt.block_on(or_stop(&stop, source.tree(None))) else {
            break;
        };
        let (tree, layers) = tree.with_context(|| r.clone())?;
        let digests: Vec<String> = source
            .image
            .layers
            .iter()
            .map(|l| l.digest.to_string())
            .collect();
        let state = states
            .state(&tree, &layers, &digests, path)
            .with_context(|| r.clone())?;
        releases.push(Release {
            tag: label.clone(),
            reference: source.image.reference.to_string(),
            created: source.image.config.created().clone().unwrap_or_default(),
            state,
        });
        opening.inc(1);
    }
    opening.finish_and_clear();
    releases.sort_by(|a, b| (&a.created, &a.tag).cmp(&(&b.created, &b.tag)));
    print_releases(&releases, path, as_json)?;
    if stop.load(Ordering::Relaxed) {
        eprintln!(
            "rimg: interrupted: {} of {} images read",
            releases.len(),
            refs.len()
        );
        std::process::exit(130);
    }
    Ok(())
}

fn print_releases(releases: &[Release], path: &[u8], as_json: bool) -> Result<()> {
    use super::forensics::{absolute, kind_name, put_bytes};
    let path = absolute(&rimg::layer::normalize(path));
    let names = Names::new();
    let width = releases.iter().map(|r| r.tag.len()).max().unwrap_or(0);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut before = None;
    for r in releases {
        let after = r.state.as_ref();
        let change = rimg::forensics::across::release_change(before, after);
        before = after;
        let Some(action) = change else { continue };
        if as_json {
            let mut o = serde_json::Map::new();
            o.insert("ref".into(), r.reference.clone().into());
            o.insert("tag".into(), r.tag.clone().into());
            o.insert("created".into(), r.created.clone().into());
            o.insert("action".into(), action.as_str().into());
            put_bytes(&mut o, "path", &path);
            if let Some(a) = after {
                o.insert("type".into(), kind_name(a.kind).into());
                o.insert("size".into(), a.size.into());
                o.insert("sha256".into(), a.sha256.clone().into());
                o.insert("mode".into(), format!("{:04o}", a.mode).into());
                o.insert("uid".into(), a.uid.into());
                o.insert("gid".into(), a.gid.into());
                if let Some(t) = &a.target {
                    put_bytes(&mut o, "target", t);
                }
            }
            writeln!(out, "{}", serde_json::Value::Object(o))?;
            continue;
        }
        names.write(&mut out, r.tag.as_bytes())?;
        let pad = width.saturating_sub(r.tag.len());
        write!(out, "{:pad$} {:<12} ", "", action.as_str())?;
        names.write(&mut out, &path)?;
        if let Some(a) = after {
            write!(
                out,
                " {} {:04o} {}:{} {}",
                kind_name(a.kind),
                a.mode,
                a.uid,
                a.gid,
                a.size
            )?;
            if let Some(h) = &a.sha256 {
                write!(out, " sha256:{}", &h[..12.min(h.len())])?;
            }
            if let Some(t) = &a.target {
                write!(out, " -> ")?;
                names.write(&mut out, t)?;
            }
        }
        writeln!(out)?;
    }
    Ok(out.flush()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_tags_within_one_repository_and_grow_across_repositories() {
        let one = ["r.io/a:v1".to_string(), "r.io/a:v2".to_string()];
        assert_eq!(labels(&one), ["v1", "v2"]);
        let two = ["r.io/a:v1".to_string(), "r.io/b/c:v1".to_string()];
        assert_eq!(labels(&two), ["a:v1", "b/c:v1"]);
        let hosts = ["r.io/a:v1".to_string(), "s.io/a:v1".to_string()];
        assert_eq!(labels(&hosts), ["r.io/a:v1", "s.io/a:v1"]);
    }
}
