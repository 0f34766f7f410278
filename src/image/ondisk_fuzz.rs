//! The fuzz harness (see `crate::fuzzing`) for the gzip-index formats: a
//! published index (`LayerGzIndex`, zstd of postcard), the checkpoints in it
//! (`ZranIndex`), and the range-cache metadata kept beside a layer read
//! through one (`GzMeta`, the `.meta` file). Each is decoded from damaged
//! bytes and, when accepted, used as a mount would use it.

use std::sync::Arc;

use proptest::prelude::*;

use super::gzindex::{GzMeta, GzSpans, LayerGzIndex, build};
use crate::cache::ranged::{BoxError, RangeSource, Ranged, SpanMap};
use crate::digest::Digest;
use crate::fuzzing::{corpus, damage};
use crate::layer::zran::{self, ZranIndex};

struct Sample {
    layer: Digest,
    blob: Arc<Vec<u8>>,
    index: Vec<u8>,
    zran: Vec<u8>,
    meta: Vec<u8>,
}

/// Built once: every case damages the same sound bytes.
fn sample() -> &'static Sample {
    static SAMPLE: std::sync::OnceLock<Sample> = std::sync::OnceLock::new();
    SAMPLE.get_or_init(build_sample)
}

fn build_sample() -> Sample {
    let mut b = tar::Builder::new(Vec::new());
    for (i, size) in [100usize, 70_000, 3, 9000].into_iter().enumerate() {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(size as u64);
        let data: Vec<u8> = (0..size).map(|n| (n * 7 + i) as u8).collect();
        b.append_data(&mut h, format!("f{i}"), &data[..]).unwrap();
    }
    let tar = b.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    let blob = gz.finish().unwrap();
    let entries = crate::layer::index_tar(&tar[..], "sha256:l").unwrap();
    let layer = Digest::of_bytes(b"l");
    // Small spans, so the index has several.
    let mut zb = zran::ZranBuilder::new(&blob[..], 16 << 10);
    std::io::copy(&mut zb, &mut std::io::sink()).unwrap();
    let zran = zb.finish().unwrap();
    let mut ix = build(&layer, &blob[..], entries).unwrap();
    ix.zran = zran.clone();
    Sample {
        layer,
        index: ix.encode().unwrap(),
        zran: postcard::to_stdvec(&zran).unwrap(),
        meta: postcard::to_stdvec(&GzMeta::new(&ix, "sha256:0")).unwrap(),
        blob: Arc::new(blob),
    }
}

/// Decodes every span of `z` from the blob, as a read through it would.
fn decode_spans(z: &ZranIndex, blob: &[u8]) {
    for s in &z.spans {
        let from = (s.cstart as usize).min(blob.len());
        let to = (s.cstart.saturating_add(s.clen) as usize).min(blob.len());
        let _ = zran::decode_span(s, &blob[from..to]);
    }
}

fn read_index(s: &Sample, bytes: &[u8]) {
    if let Ok(ix) = LayerGzIndex::decode(bytes, &s.layer, s.blob.len() as u64) {
        decode_spans(&ix.zran, &s.blob);
        let _ = GzSpans::new(GzMeta::new(&ix, "sha256:0"));
    }
}

fn read_zran(s: &Sample, bytes: &[u8]) {
    if let Ok(z) = postcard::from_bytes::<ZranIndex>(bytes)
        && z.validate().is_ok()
    {
        decode_spans(&z, &s.blob);
    }
}

struct Served(Arc<Vec<u8>>);

impl RangeSource for Served {
    fn fetch(&self, start: u64, len: u64) -> Result<Vec<u8>, BoxError> {
        let b = &self.0;
        let from = (start as usize).min(b.len());
        let to = (start.saturating_add(len) as usize).min(b.len());
        Ok(b[from..to].to_vec())
    }
}

/// Opens a range cache through `bytes` as its `.meta` and reads it whole.
fn read_meta(s: &Sample, bytes: &[u8]) {
    // As `image::ranged` reads it back.
    let Ok(spans) = postcard::from_bytes::<GzMeta>(bytes) else {
        return;
    };
    let spans = GzSpans::new(spans);
    let count = spans.count();
    let dir = tempfile::tempdir().unwrap();
    let Ok(r) = Ranged::open(
        "sha256:l",
        &dir.path().join("l"),
        Box::new(spans),
        Arc::new(Served(Arc::clone(&s.blob))),
    ) else {
        return;
    };
    let mut buf = vec![0; 64 << 10];
    for at in [0u64, 512, 70_000, 1 << 20] {
        let _ = r.read_at(at, &mut buf);
    }
    let _ = (count, r.prefetch());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn a_damaged_published_gzip_index_is_refused_or_used_without_a_panic(d in damage()) {
        let s = sample();
        read_index(s, &d.apply(&s.index));
    }

    #[test]
    fn damaged_checkpoints_are_refused_or_used_without_a_panic(d in damage()) {
        let s = sample();
        read_zran(s, &d.apply(&s.zran));
    }

    #[test]
    fn damaged_range_metadata_is_refused_or_used_without_a_panic(d in damage()) {
        let s = sample();
        read_meta(s, &d.apply(&s.meta));
    }
}

#[test]
fn the_gzip_index_corpus_files_are_refused_or_used_without_a_panic() {
    let s = sample();
    type Reader = fn(&Sample, &[u8]);
    let readers: [(&str, &Vec<u8>, Reader); 3] = [
        ("gzindex", &s.index, read_index),
        ("zran", &s.zran, read_zran),
        ("gzmeta", &s.meta, read_meta),
    ];
    for (format, sound, read) in readers {
        for (_, bytes) in corpus(format, &[("sound", sound.clone())]) {
            read(s, &bytes);
        }
    }
}
