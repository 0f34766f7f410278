//! Writing an image as an archive other tools load: a docker-save archive that
//! also holds an OCI layout (sharing one copy of each blob, as docker 25+
//! writes), an OCI layout alone, a flattened single-layer image, or a plain
//! rootfs tar of the merged tree.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;

use flate2::Compression;
use flate2::write::GzEncoder;
use oci_spec::image::MediaType;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::cache::Layer;
use crate::digest::Digest;
use crate::image::{ImageError, ImageSource};
use crate::layer::EntryKind;
use crate::overlay::tree::{NodeId, Tree};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("writing the archive")]
    Io(#[from] io::Error),
    /// The image's layers could not be had (the error names the layer).
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("export worker stopped")]
    Worker(#[source] tokio::task::JoinError),
    #[error("layer {digest} is not in the cache after fetching it")]
    MissingBlob { digest: Digest },
    #[error("{path}: reading layer {digest}")]
    Read {
        path: String,
        digest: String,
        #[source]
        source: io::Error,
    },
    #[error("--tag: {0}")]
    Name(String),
    #[error("image config of {reference} is not JSON: {detail}")]
    Config { reference: String, detail: String },
    /// A layer re-encoded for `--compress gzip` did not inflate to its diff_id.
    #[error("re-encoding layer {digest}: uncompressed content is {got}, the config says {want}")]
    Recompress {
        digest: Digest,
        got: Digest,
        want: String,
    },
}

/// How the layers of an exported image are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compress {
    /// As the registry stores them (byte for byte, digests unchanged).
    #[default]
    Keep,
    /// Gzip, which every engine loads (docker 20.10 refuses zstd): layers
    /// stored otherwise are re-encoded, the manifest rewritten to match;
    /// the config and its diff_ids stay as they are.
    Gzip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Docker,
    Oci,
    Rootfs,
}

/// Hashes what passes through a writer.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn header_for(kind: EntryKind) -> tar::EntryType {
    match kind {
        EntryKind::Dir => tar::EntryType::Directory,
        EntryKind::Symlink => tar::EntryType::Symlink,
        EntryKind::Hardlink => tar::EntryType::Link,
        EntryKind::Char => tar::EntryType::Char,
        EntryKind::Block => tar::EntryType::Block,
        EntryKind::Fifo => tar::EntryType::Fifo,
        EntryKind::File => tar::EntryType::Regular,
    }
}

/// Writes the merged tree as a tar: depth first, parents before children,
/// hardlinks as links to the first name written, long names and xattrs as PAX.
pub fn write_rootfs<W: Write>(
    tree: &Tree,
    layers: &[Arc<Layer>],
    digests: &[Digest],
    out: W,
) -> Result<W, ExportError> {
    let mut builder = tar::Builder::new(out);
    builder.mode(tar::HeaderMode::Complete);
    let mut first_name: HashMap<NodeId, Vec<u8>> = HashMap::new();
    let mut stack: Vec<(Vec<u8>, NodeId)> = tree
        .children(tree.root())
        .map(|(name, id)| (name.to_vec(), id))
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    while let Some((path, id)) = stack.pop() {
        let n = tree.node(id);
        let mut header = tar::Header::new_ustar();
        header.set_mode(n.mode & 0o7777);
        header.set_uid(n.uid as u64);
        header.set_gid(n.gid as u64);
        header.set_mtime(n.mtime.max(0) as u64);
        header.set_size(0);
        let linked = n.kind != EntryKind::Dir && n.nlink > 1;
        if linked && let Some(target) = first_name.get(&id) {
            header.set_entry_type(tar::EntryType::Link);
            append_entry(&mut builder, header, n, &path, Some(target), io::empty())?;
            continue;
        }
        if linked {
            first_name.insert(id, path.clone());
        }
        header.set_entry_type(header_for(n.kind));
        match n.kind {
            EntryKind::Dir => {
                let mut dir = path.clone();
                dir.push(b'/');
                append_entry(&mut builder, header, n, &dir, None, io::empty())?;
                let children: Vec<(Vec<u8>, NodeId)> = tree
                    .children(id)
                    .map(|(name, c)| (crate::names::join(&path, name), c))
                    .collect();
                stack.extend(children.into_iter().rev());
            }
            EntryKind::Symlink => {
                append_entry(&mut builder, header, n, &path, n.link, io::empty())?;
            }
            EntryKind::Char | EntryKind::Block => {
                header.set_device_major(n.rdev.0)?;
                header.set_device_minor(n.rdev.1)?;
                append_entry(&mut builder, header, n, &path, None, io::empty())?;
            }
            EntryKind::Fifo => {
                append_entry(&mut builder, header, n, &path, None, io::empty())?;
            }
            EntryKind::File | EntryKind::Hardlink => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(n.size);
                let reader = crate::image::FileData::of(layers, n);
                append_entry(&mut builder, header, n, &path, None, reader).map_err(|source| {
                    ExportError::Read {
                        path: format!("/{}", crate::names::escaped(&path)),
                        digest: digests
                            .get(n.layer as usize)
                            .map(Digest::to_string)
                            .unwrap_or_default(),
                        source,
                    }
                })?;
            }
        }
    }
    Ok(builder.into_inner()?)
}

/// Longest name a ustar header holds on its own.
const USTAR_NAME: usize = 100;

/// One entry, preceded when needed by a PAX header carrying its xattrs and
/// any name or link target too long for ustar. Only PAX is used for long
/// names: a GNU long name beside a PAX path would be ambiguous to readers.
fn append_entry<W: Write>(
    builder: &mut tar::Builder<W>,
    mut header: tar::Header,
    node: crate::overlay::tree::NodeRef<'_>,
    path: &[u8],
    link: Option<&[u8]>,
    data: impl Read,
) -> io::Result<()> {
    let mut pax: Vec<(String, Vec<u8>)> = node
        .xattrs()
        .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.to_vec()))
        .collect();
    if path.len() > USTAR_NAME {
        pax.push(("path".into(), path.to_vec()));
    }
    if let Some(l) = link.filter(|l| l.len() > USTAR_NAME) {
        pax.push(("linkpath".into(), l.to_vec()));
    }
    if !pax.is_empty() {
        builder.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
    }
    // Short names go in the header as the bytes they are; long ones are cut
    // there (PAX holds them whole).
    let fit = |s: &[u8]| -> Vec<u8> { s[..s.len().min(USTAR_NAME)].to_vec() };
    let ustar = header.as_ustar_mut().expect("a ustar header");
    let name = fit(path);
    ustar.name = [0; 100];
    ustar.name[..name.len()].copy_from_slice(&name);
    if let Some(l) = link {
        let l = fit(l);
        ustar.linkname = [0; 100];
        ustar.linkname[..l.len()].copy_from_slice(&l);
    }
    header.set_cksum();
    builder.append(&header, data)
}

/// A blob to place in the archive: from a file or from memory.
enum BlobData<'a> {
    File(&'a Path),
    Bytes(&'a [u8]),
}

fn append_file<W: Write>(
    builder: &mut tar::Builder<W>,
    name: &str,
    data: BlobData<'_>,
) -> io::Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    match data {
        BlobData::Bytes(b) => {
            header.set_size(b.len() as u64);
            builder.append_data(&mut header, name, b)
        }
        BlobData::File(p) => {
            let f = std::fs::File::open(p)?;
            header.set_size(f.metadata()?.len());
            builder.append_data(&mut header, name, f)
        }
    }
}

fn append_dir<W: Write>(builder: &mut tar::Builder<W>, name: &str) -> io::Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_mode(0o755);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Directory);
    header.set_size(0);
    builder.append_data(&mut header, name, io::empty())
}

fn blob_name(digest: &Digest) -> String {
    format!("blobs/sha256/{}", digest.hex())
}

/// The image as an archive's contents: manifest, config and layer files.
struct ArchiveImage<'a> {
    manifest: Vec<u8>,
    manifest_media_type: String,
    config: Vec<u8>,
    config_digest: Digest,
    layers: Vec<(Digest, &'a Path)>,
}

/// Whether a layer media type is gzip (docker's `tar.gzip`, OCI's `tar+gzip`).
fn is_gzip(media_type: &str) -> bool {
    media_type.ends_with("gzip")
}

/// A layer re-encoded as gzip: its digest, size and file.
struct Regzipped {
    digest: Digest,
    size: u64,
    file: tempfile::NamedTempFile,
}

/// Inflates the blob at `blob` (zstd or uncompressed, as `media_type` says)
/// and deflates it again as gzip into a file under the cache, checking the
/// uncompressed bytes against `diff_id`.
fn regzip(
    cache_root: &Path,
    blob: &Path,
    digest: &Digest,
    media_type: &str,
    diff_id: &str,
) -> Result<Regzipped, ExportError> {
    let input = io::BufReader::new(std::fs::File::open(blob)?);
    let mut plain: Box<dyn Read> = if media_type.contains("zstd") {
        Box::new(zstd::stream::read::Decoder::with_buffer(input)?)
    } else {
        Box::new(input)
    };
    let tmp = tempfile_in(cache_root)?;
    let compressed = HashingWriter {
        inner: io::BufWriter::new(tmp.reopen()?),
        hasher: Digest::hasher(),
        written: 0,
    };
    let mut uncompressed = HashingWriter {
        inner: GzEncoder::new(compressed, Compression::default()),
        hasher: Digest::hasher(),
        written: 0,
    };
    io::copy(&mut plain, &mut uncompressed)?;
    let got = Digest::from_hasher(uncompressed.hasher);
    if got != *diff_id {
        return Err(ExportError::Recompress {
            digest: digest.clone(),
            got,
            want: diff_id.to_string(),
        });
    }
    let mut compressed = uncompressed.inner.finish()?;
    compressed.flush()?;
    Ok(Regzipped {
        digest: Digest::from_hasher(compressed.hasher),
        size: compressed.written,
        file: tmp,
    })
}

/// The manifest with layer `i` replaced by gzip `new` (annotations dropped:
/// they describe the old blob, e.g. a zstd:chunked table of contents).
fn gzip_layer_in_manifest(manifest: &mut Value, i: usize, new: &Regzipped) {
    let docker = manifest["mediaType"]
        .as_str()
        .is_some_and(|m| m.starts_with("application/vnd.docker."));
    let media_type = if docker {
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    } else {
        "application/vnd.oci.image.layer.v1.tar+gzip"
    };
    manifest["layers"][i] = json!({
        "mediaType": media_type,
        "digest": new.digest,
        "size": new.size,
    });
}

/// Writes docker's files (when `docker`) and the OCI layout around one set of blobs.
fn write_archive<W: Write>(
    img: &ArchiveImage<'_>,
    name: &ArchiveName,
    docker: bool,
    out: W,
) -> Result<W, ExportError> {
    let mut b = tar::Builder::new(out);
    let manifest_digest = Digest::of_bytes(&img.manifest);
    append_dir(&mut b, "blobs")?;
    append_dir(&mut b, "blobs/sha256")?;
    let mut written = std::collections::HashSet::new();
    for (digest, path) in &img.layers {
        if written.insert(digest.clone()) {
            append_file(&mut b, &blob_name(digest), BlobData::File(path))?;
        }
    }
    append_file(
        &mut b,
        &blob_name(&img.config_digest),
        BlobData::Bytes(&img.config),
    )?;
    append_file(
        &mut b,
        &blob_name(&manifest_digest),
        BlobData::Bytes(&img.manifest),
    )?;
    append_file(
        &mut b,
        "oci-layout",
        BlobData::Bytes(br#"{"imageLayoutVersion":"1.0.0"}"#),
    )?;
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": img.manifest_media_type,
            "digest": manifest_digest,
            "size": img.manifest.len(),
            "annotations": {
                "io.containerd.image.name": name.full,
                "org.opencontainers.image.ref.name": name.tag,
            }
        }]
    });
    append_file(
        &mut b,
        "index.json",
        BlobData::Bytes(&serde_json::to_vec(&index).expect("json")),
    )?;
    if docker {
        let layers: Vec<String> = img.layers.iter().map(|(d, _)| blob_name(d)).collect();
        let manifest = json!([{
            "Config": blob_name(&img.config_digest),
            "RepoTags": [name.short],
            "Layers": layers,
        }]);
        append_file(
            &mut b,
            "manifest.json",
            BlobData::Bytes(&serde_json::to_vec(&manifest).expect("json")),
        )?;
        let (repo, tag) = name
            .short
            .rsplit_once(':')
            .unwrap_or((&name.short, "latest"));
        let top = img
            .layers
            .last()
            .map(|(d, _)| d.hex().to_string())
            .unwrap_or_default();
        let repositories = json!({ repo: { tag: top } });
        append_file(
            &mut b,
            "repositories",
            BlobData::Bytes(&serde_json::to_vec(&repositories).expect("json")),
        )?;
    }
    Ok(b.into_inner()?)
}

/// How the image is named in an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveName {
    /// As docker shows it (`alpine:3.10`, `host:5000/repo:tag`): `RepoTags`.
    pub short: String,
    /// Fully qualified (`docker.io/library/alpine:3.10`): containerd's annotation.
    pub full: String,
    /// The tag alone: `org.opencontainers.image.ref.name`.
    pub tag: String,
}

/// `--tag`, else the reference, named as docker and containerd name images.
pub fn archive_name(source: &ImageSource, tag: Option<&str>) -> Result<ArchiveName, ExportError> {
    let parsed;
    let r = match tag {
        Some(t) => {
            parsed = crate::reference::Reference::parse(t)
                .map_err(|e| ExportError::Name(e.to_string()))?;
            &parsed
        }
        None => &source.image.reference,
    };
    let tag = r.tag.clone().unwrap_or_else(|| "latest".into());
    let repo = if r.registry == crate::reference::DOCKER_HUB {
        r.repository.trim_start_matches("library/").to_string()
    } else {
        format!("{}/{}", r.registry, r.repository)
    };
    Ok(ArchiveName {
        short: format!("{repo}:{tag}"),
        full: format!("{}:{tag}", r.name()),
        tag,
    })
}

/// Exports `source` in `format` to `out`. Layers are fetched into the cache first.
pub async fn export<W: Write + Send + 'static>(
    source: Arc<ImageSource>,
    format: Format,
    flatten: bool,
    compress: Compress,
    name: ArchiveName,
    out: W,
) -> Result<W, ExportError> {
    let layers = source.cached_layers().await?;
    let digests: Vec<Digest> = source
        .image
        .layers
        .iter()
        .map(|l| l.digest.clone())
        .collect();
    if format == Format::Rootfs || flatten {
        let (tree, layers) = source.tree(None).await?;
        let src = Arc::clone(&source);
        return tokio::task::spawn_blocking(move || {
            if format == Format::Rootfs {
                return write_rootfs(&tree, &layers, &digests, out);
            }
            write_flattened(
                &src,
                &tree,
                &layers,
                &digests,
                &name,
                format == Format::Docker,
                out,
            )
        })
        .await
        .map_err(ExportError::Worker)?;
    }
    let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id.clone()).collect();
    drop(layers);
    tokio::task::spawn_blocking(move || {
        let cache = source.cache();
        let mut paths: Vec<(Digest, std::path::PathBuf)> = digests
            .iter()
            .map(|d| {
                cache
                    .blob_path(d)
                    .map(|p| (d.clone(), p))
                    .ok_or_else(|| ExportError::MissingBlob { digest: d.clone() })
            })
            .collect::<Result<_, _>>()?;
        let mut manifest = source.image.manifest_bytes.clone();
        // Kept alive until the archive is written.
        let mut regzipped = Vec::new();
        if compress == Compress::Gzip {
            let mut m: Value =
                serde_json::from_slice(&manifest).map_err(|e| ExportError::Config {
                    reference: source.image.reference.to_string(),
                    detail: format!("manifest: {e}"),
                })?;
            for (i, desc) in source.image.layers.iter().enumerate() {
                if is_gzip(&desc.media_type) {
                    continue;
                }
                let r = regzip(
                    cache.root(),
                    &paths[i].1,
                    &desc.digest,
                    &desc.media_type,
                    &diff_ids[i],
                )?;
                gzip_layer_in_manifest(&mut m, i, &r);
                paths[i] = (r.digest.clone(), r.file.path().to_path_buf());
                regzipped.push(r);
            }
            if !regzipped.is_empty() {
                manifest = serde_json::to_vec(&m).expect("json");
            }
        }
        let img = ArchiveImage {
            manifest,
            manifest_media_type: source.image.media_type.clone(),
            config: source.image.config_bytes.clone(),
            // The config's digest, checked when the image was resolved.
            config_digest: Digest::of_bytes(&source.image.config_bytes),
            layers: paths
                .iter()
                .map(|(d, p)| (d.clone(), p.as_path()))
                .collect(),
        };
        write_archive(&img, &name, format == Format::Docker, out)
    })
    .await
    .map_err(ExportError::Worker)?
}

/// One gzip layer holding the merged tree, with a config and manifest to match.
fn write_flattened<W: Write>(
    source: &ImageSource,
    tree: &Tree,
    layers: &[Arc<Layer>],
    digests: &[Digest],
    name: &ArchiveName,
    docker: bool,
    out: W,
) -> Result<W, ExportError> {
    let tmp = tempfile_in(source.cache().root())?;
    let file = tmp.reopen()?;
    let compressed = HashingWriter {
        inner: io::BufWriter::new(file),
        hasher: Digest::hasher(),
        written: 0,
    };
    let gz = GzEncoder::new(compressed, Compression::fast());
    let plain = HashingWriter {
        inner: gz,
        hasher: Digest::hasher(),
        written: 0,
    };
    let plain = write_rootfs(tree, layers, digests, plain)?;
    let diff_id = Digest::from_hasher(plain.hasher);
    let mut compressed = plain.inner.finish()?;
    compressed.flush()?;
    let layer_digest = Digest::from_hasher(compressed.hasher);
    let layer_size = compressed.written;

    let reference = source.image.reference.to_string();
    let mut config: Value =
        serde_json::from_slice(&source.image.config_bytes).map_err(|e| ExportError::Config {
            reference: reference.clone(),
            detail: e.to_string(),
        })?;
    config["rootfs"] = json!({"type": "layers", "diff_ids": [diff_id]});
    config["history"] = json!([{
        "created_by": format!("rimg export --flatten {reference}"),
        "comment": format!("flattened from {} layers of {}", digests.len(), source.image.digest),
    }]);
    let config_bytes = serde_json::to_vec(&config).expect("json");
    let config_digest = Digest::of_bytes(&config_bytes);
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MediaType::ImageManifest.to_string(),
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_bytes.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": layer_digest,
            "size": layer_size,
        }],
    });
    let img = ArchiveImage {
        manifest: serde_json::to_vec(&manifest).expect("json"),
        manifest_media_type: MediaType::ImageManifest.to_string(),
        config: config_bytes,
        config_digest,
        layers: vec![(layer_digest, tmp.path())],
    };
    write_archive(&img, name, docker, out)
}

fn tempfile_in(dir: &Path) -> io::Result<tempfile::NamedTempFile> {
    let dir = dir.join("tmp");
    std::fs::create_dir_all(&dir)?;
    tempfile::Builder::new()
        .prefix("flatten-")
        .suffix(".tar.gz")
        .tempfile_in(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::{Entry, LayerIndex};

    fn entry(path: &str, kind: EntryKind, link: Option<&str>) -> Entry {
        Entry {
            mode: 0o755,
            link: link.map(|l| l.as_bytes().to_vec()),
            xattrs: vec![("user.k".into(), b"v".to_vec())],
            ..Entry::new(path.as_bytes(), kind)
        }
    }

    #[test]
    fn long_names_and_link_targets_are_written_as_pax_only() {
        let long = format!("d/{}", "n".repeat(150));
        let target = format!("/{}", "t".repeat(150));
        let index = LayerIndex {
            entries: vec![
                entry("d", EntryKind::Dir, None),
                entry(&long, EntryKind::Dir, None),
                entry(&format!("{long}/s"), EntryKind::Symlink, Some(&target)),
            ],
        };
        let tree = crate::overlay::tree::merge(&[&index]).unwrap();
        let tar = write_rootfs(&tree, &[], &[], Vec::new()).unwrap();
        // No GNU long-name ('L') or long-link ('K') headers anywhere.
        let mut at = 0;
        while at + 512 <= tar.len() && tar[at..at + 512].iter().any(|&b| b != 0) {
            let h = tar::Header::from_byte_slice(&tar[at..at + 512]);
            assert!(
                !matches!(h.entry_type().as_byte(), b'L' | b'K'),
                "GNU long name written"
            );
            at += 512 + h.entry_size().unwrap().div_ceil(512) as usize * 512;
        }
        let back = crate::layer::index_tar(&tar[..], "sha256:test").unwrap();
        let paths: Vec<&[u8]> = back.entries.iter().map(|e| e.path.as_slice()).collect();
        assert_eq!(
            paths,
            [&b"d"[..], long.as_bytes(), format!("{long}/s").as_bytes()]
        );
        assert_eq!(back.entries[2].link.as_deref(), Some(target.as_bytes()));
        assert_eq!(
            back.entries[1].xattrs,
            [("user.k".to_string(), b"v".to_vec())]
        );
    }
}
