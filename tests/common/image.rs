//! Building layers and images in tests and pushing them with the
//! distribution API (curl), in docker or OCI media types.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use super::Registry;

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Builds a layer tar entry by entry.
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub struct LayerBuilder {
    b: tar::Builder<Vec<u8>>,
}

#[allow(dead_code)] // not every test binary that compiles tests/common uses it
fn header(kind: tar::EntryType, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_600_000_000);
    h.set_size(0);
    h
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerBuilder {
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn new() -> LayerBuilder {
        LayerBuilder {
            b: tar::Builder::new(Vec::new()),
        }
    }

    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        let mut h = header(tar::EntryType::Directory, mode);
        self.b
            .append_data(&mut h, format!("{path}/"), std::io::empty())
            .unwrap();
        self
    }

    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn file(&mut self, path: &str, data: &[u8], mode: u32) -> &mut Self {
        self.file_owned(path, data, mode, 0, 0)
    }

    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn file_owned(
        &mut self,
        path: &str,
        data: &[u8],
        mode: u32,
        uid: u64,
        gid: u64,
    ) -> &mut Self {
        let mut h = header(tar::EntryType::Regular, mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_size(data.len() as u64);
        self.b.append_data(&mut h, path, data).unwrap();
        self
    }

    /// A file with extended attributes, written as PAX `SCHILY.xattr.*` records.
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn file_xattrs(&mut self, path: &str, data: &[u8], xattrs: &[(&str, &[u8])]) -> &mut Self {
        let records: Vec<(String, &[u8])> = xattrs
            .iter()
            .map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v))
            .collect();
        self.b
            .append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), *v)))
            .unwrap();
        self.file(path, data, 0o644)
    }

    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut h = header(tar::EntryType::Symlink, 0o777);
        self.b.append_link(&mut h, path, target).unwrap();
        self
    }

    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut h = header(tar::EntryType::Link, 0o644);
        self.b.append_link(&mut h, path, target).unwrap();
        self
    }

    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn device(&mut self, path: &str, block: bool, major: u32, minor: u32) -> &mut Self {
        let kind = if block {
            tar::EntryType::Block
        } else {
            tar::EntryType::Char
        };
        let mut h = header(kind, 0o660);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.b.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }

    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn fifo(&mut self, path: &str) -> &mut Self {
        let mut h = header(tar::EntryType::Fifo, 0o644);
        self.b.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }

    /// `.wh.NAME` beside `path`: deletes `path` from lower layers.
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn whiteout(&mut self, path: &str) -> &mut Self {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        let wh = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        self.file(&wh, b"", 0o644)
    }

    /// `.wh..wh..opq` in `dir`: hides lower layers' children of `dir`.
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn opaque(&mut self, dir: &str) -> &mut Self {
        self.file(&format!("{dir}/.wh..wh..opq"), b"", 0o644)
    }

    /// A file whose name is any bytes (Latin-1, raw): legal on Linux and in tar.
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn file_bytes(&mut self, path: &[u8], data: &[u8]) -> &mut Self {
        use std::os::unix::ffi::OsStrExt;
        let mut h = header(tar::EntryType::Regular, 0o644);
        h.set_size(data.len() as u64);
        let p = Path::new(std::ffi::OsStr::from_bytes(path));
        self.b.append_data(&mut h, p, data).unwrap();
        self
    }

    /// A symlink whose name and target are any bytes.
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn symlink_bytes(&mut self, path: &[u8], target: &[u8]) -> &mut Self {
        use std::os::unix::ffi::OsStrExt;
        let mut h = header(tar::EntryType::Symlink, 0o777);
        let p = Path::new(std::ffi::OsStr::from_bytes(path));
        let t = Path::new(std::ffi::OsStr::from_bytes(target));
        self.b.append_link(&mut h, p, t).unwrap();
        self
    }

    /// An entry with a header as given (names the tar crate would refuse).
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn raw(&mut self, h: tar::Header, data: &[u8]) -> &mut Self {
        self.b.append(&h, data).unwrap();
        self
    }

    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub fn finish(&mut self) -> Vec<u8> {
        let b = std::mem::replace(&mut self.b, tar::Builder::new(Vec::new()));
        b.into_inner().unwrap()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub enum Compress {
    Gzip,
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    Zstd,
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    None,
}

/// A layer blob as pushed.
#[derive(Clone, Debug)]
pub struct Blob {
    pub bytes: Vec<u8>,
    pub digest: String,
    pub diff_id: String,
    pub media_type: String,
}

#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub fn layer_blob(tar: &[u8], c: Compress, oci: bool) -> Blob {
    let bytes = match c {
        Compress::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(tar).unwrap();
            e.finish().unwrap()
        }
        Compress::Zstd => zstd::encode_all(tar, 3).unwrap(),
        Compress::None => tar.to_vec(),
    };
    let media_type = match (oci, c) {
        (false, Compress::Gzip) => "application/vnd.docker.image.rootfs.diff.tar.gzip",
        (false, _) => "application/vnd.docker.image.rootfs.diff.tar",
        (true, Compress::Gzip) => "application/vnd.oci.image.layer.v1.tar+gzip",
        (true, Compress::Zstd) => "application/vnd.oci.image.layer.v1.tar+zstd",
        (true, Compress::None) => "application/vnd.oci.image.layer.v1.tar",
    };
    Blob {
        digest: sha256(&bytes),
        diff_id: sha256(tar),
        bytes,
        media_type: media_type.into(),
    }
}

/// A .tar.gz file used unchanged as a layer (the Alpine rootfs tarballs).
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub fn gz_file_blob(path: &Path, oci: bool) -> Blob {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut tar = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut tar).unwrap();
    Blob {
        digest: sha256(&bytes),
        diff_id: sha256(&tar),
        bytes,
        media_type: if oci {
            "application/vnd.oci.image.layer.v1.tar+gzip"
        } else {
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
        }
        .into(),
    }
}

#[derive(Clone, Debug)]
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub struct Pushed {
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub manifest: Vec<u8>,
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub manifest_digest: String,
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub media_type: String,
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub config_digest: String,
    #[allow(dead_code)] // not every test binary that compiles tests/common uses it
    pub layers: Vec<String>,
}

#[allow(dead_code)] // not every test binary that compiles tests/common uses it
fn curl(reg: &Registry, repo: &str, args: &[&str], data: Option<&[u8]>) -> String {
    let mut c = Command::new("curl");
    c.args(["-sS", "--fail-with-body", "-D", "-"]);
    if let Some(a) = reg.push_auth(repo) {
        c.arg("-H").arg(format!("Authorization: {a}"));
    }
    if let Some(ca) = &reg.tls_cert {
        c.arg("--cacert").arg(ca);
    }
    c.args(args);
    if data.is_some() {
        c.args(["--data-binary", "@-"]);
    }
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    if let Some(d) = data {
        stdin.write_all(d).unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "curl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub fn push_blob(reg: &Registry, repo: &str, bytes: &[u8]) -> String {
    let digest = sha256(bytes);
    let head = curl(
        reg,
        repo,
        &[
            "-X",
            "POST",
            &format!("{}/v2/{repo}/blobs/uploads/", reg.url()),
        ],
        None,
    );
    let location = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("location")
                .then(|| v.trim().to_string())
        })
        .expect("upload location");
    let location = if location.starts_with("http") {
        location
    } else {
        format!("{}{location}", reg.url())
    };
    let sep = if location.contains('?') { '&' } else { '?' };
    curl(
        reg,
        repo,
        &[
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/octet-stream",
            &format!("{location}{sep}digest={digest}"),
        ],
        Some(bytes),
    );
    digest
}

#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub fn push_manifest(
    reg: &Registry,
    repo: &str,
    reference: &str,
    media_type: &str,
    body: &[u8],
) -> String {
    curl(
        reg,
        repo,
        &[
            "-X",
            "PUT",
            "-H",
            &format!("Content-Type: {media_type}"),
            &format!("{}/v2/{repo}/manifests/{reference}", reg.url()),
        ],
        Some(body),
    );
    sha256(body)
}

/// Pushes layers, a config and a manifest; returns what was pushed.
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub fn push_image(
    reg: &Registry,
    repo: &str,
    tag: &str,
    layers: &[Blob],
    arch: &str,
    oci: bool,
) -> Pushed {
    for l in layers {
        push_blob(reg, repo, &l.bytes);
    }
    let (variant, arch) = match arch.split_once('/') {
        Some((a, v)) => (Some(v), a),
        None => (None, arch),
    };
    let mut config = serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "created": "2026-01-02T03:04:05Z",
        "config": {
            "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "RIMG_TEST=1"],
            "Cmd": ["/bin/sh"],
            "WorkingDir": "/root",
            "Labels": {"org.example.test": "yes"},
        },
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
        "history": layers.iter().enumerate().map(|(i, _)| serde_json::json!({"created_by": format!("layer {i}")})).collect::<Vec<_>>(),
    });
    if let Some(v) = variant {
        config["variant"] = v.into();
    }
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let config_digest = push_blob(reg, repo, &config_bytes);
    let (mt, config_mt) = if oci {
        (
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.oci.image.config.v1+json",
        )
    } else {
        (
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.docker.container.image.v1+json",
        )
    };
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": mt,
        "config": {"mediaType": config_mt, "digest": config_digest, "size": config_bytes.len()},
        "layers": layers.iter().map(|l| serde_json::json!({
            "mediaType": l.media_type, "digest": l.digest, "size": l.bytes.len(),
        })).collect::<Vec<_>>(),
    });
    let body = serde_json::to_vec(&manifest).unwrap();
    let digest = push_manifest(reg, repo, tag, mt, &body);
    Pushed {
        manifest: body,
        manifest_digest: digest,
        media_type: mt.into(),
        config_digest,
        layers: layers.iter().map(|l| l.digest.clone()).collect(),
    }
}

/// Pushes a manifest list (or OCI index) over `entries` ("os/arch[/variant]",
/// image), with an attestation entry that clients must skip.
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub fn push_index(
    reg: &Registry,
    repo: &str,
    tag: &str,
    entries: &[(&str, &Pushed)],
    oci: bool,
) -> String {
    let mut manifests: Vec<serde_json::Value> = entries
        .iter()
        .map(|(platform, p)| {
            let parts: Vec<&str> = platform.split('/').collect();
            let mut plat = serde_json::json!({"os": parts[0], "architecture": parts[1]});
            if let Some(v) = parts.get(2) {
                plat["variant"] = (*v).into();
            }
            serde_json::json!({
                "mediaType": p.media_type, "digest": p.manifest_digest,
                "size": p.manifest.len(), "platform": plat,
            })
        })
        .collect();
    // An attestation manifest, as buildx adds: unknown/unknown, annotated.
    let first = entries[0].1;
    manifests.push(serde_json::json!({
        "mediaType": first.media_type, "digest": first.manifest_digest, "size": first.manifest.len(),
        "platform": {"os": "unknown", "architecture": "unknown"},
        "annotations": {"vnd.docker.reference.type": "attestation-manifest",
                        "vnd.docker.reference.digest": first.manifest_digest},
    }));
    let mt = if oci {
        "application/vnd.oci.image.index.v1+json"
    } else {
        "application/vnd.docker.distribution.manifest.list.v2+json"
    };
    let body = serde_json::to_vec(
        &serde_json::json!({"schemaVersion": 2, "mediaType": mt, "manifests": manifests}),
    )
    .unwrap();
    push_manifest(reg, repo, tag, mt, &body)
}

/// Pushes the real Alpine rootfs as a single-layer image.
#[allow(dead_code)] // not every test binary that compiles tests/common uses it
pub fn push_alpine(
    reg: &Registry,
    repo: &str,
    tag: &str,
    version: &str,
    arch: &str,
    oci: bool,
) -> Pushed {
    let file_arch = match arch {
        "amd64" => "x86_64",
        "arm64/v8" | "arm64" => "aarch64",
        other => other,
    };
    let blob = gz_file_blob(&super::alpine(version, file_arch), oci);
    push_image(reg, repo, tag, &[blob], arch, oci)
}
