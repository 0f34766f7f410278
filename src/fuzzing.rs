//! The fuzz harness shared by the readers of bytes rimg keeps on disk (saved
//! trees, layer indexes, range-cache logs, published gzip indexes and their
//! checkpoints): damaged versions of a sound sample (truncated, bit-flipped,
//! overwritten, or random bytes) as a proptest strategy, and the checked-in
//! corpus of each format under `tests/corpus-ondisk/<format>/`, which every
//! `cargo test` feeds to its reader. A reader must answer each with an error
//! (or a rebuild), never a panic.
//!
//! `RIMG_WRITE_CORPUS=1 cargo test --lib corpus` rewrites the corpus from
//! the samples the tests give.

use std::path::PathBuf;

use proptest::prelude::*;

fn dir(format: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus-ondisk")
        .join(format)
}

/// The corpus of `format`, by file name. With `RIMG_WRITE_CORPUS` set, the
/// `seeds` (a sound sample first) and damaged versions of it are written
/// first. An empty corpus fails the test: it would prove nothing.
pub fn corpus(format: &str, seeds: &[(&str, Vec<u8>)]) -> Vec<(String, Vec<u8>)> {
    let d = dir(format);
    if std::env::var_os("RIMG_WRITE_CORPUS").is_some() {
        std::fs::create_dir_all(&d).unwrap();
        for (name, bytes) in seeds {
            std::fs::write(d.join(name), bytes).unwrap();
        }
        if let Some((_, sound)) = seeds.first() {
            for (name, bytes) in fixed_damage(sound) {
                std::fs::write(d.join(name), bytes).unwrap();
            }
        }
    }
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&d)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", d.display()))
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no corpus in {}", d.display());
    out
}

/// Damage that is the same on every run, for the checked-in corpus.
fn fixed_damage(sound: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    let mut flipped = sound.to_vec();
    for at in [
        0,
        sound.len() / 3,
        sound.len() / 2,
        sound.len().saturating_sub(1),
    ] {
        if let Some(b) = flipped.get_mut(at) {
            *b ^= 0x5a;
        }
    }
    let mut rng = fastrand::Rng::with_seed(25);
    let random: Vec<u8> = (0..sound.len().clamp(16, 512))
        .map(|_| rng.u8(..))
        .collect();
    let mut spliced = sound.to_vec();
    let mid = spliced.len() / 2;
    spliced.splice(mid..mid, random.iter().copied().take(37));
    vec![
        ("empty", Vec::new()),
        ("truncated-half", sound[..sound.len() / 2].to_vec()),
        (
            "truncated-by-one",
            sound[..sound.len().saturating_sub(1)].to_vec(),
        ),
        ("flipped", flipped),
        ("random", random),
        ("spliced", spliced),
    ]
}

/// What is done to a sound sample.
#[derive(Debug, Clone)]
pub enum Damage {
    Truncate(usize),
    Flip(Vec<(usize, u8)>),
    Overwrite(usize, Vec<u8>),
    Insert(usize, Vec<u8>),
    Random(Vec<u8>),
}

impl Damage {
    pub fn apply(&self, sound: &[u8]) -> Vec<u8> {
        let n = sound.len().max(1);
        let mut b = sound.to_vec();
        match self {
            Damage::Truncate(keep) => b.truncate(keep % n),
            Damage::Flip(flips) => {
                for (at, bit) in flips {
                    if let Some(x) = b.get_mut(at % n) {
                        *x ^= 1 << (bit % 8);
                    }
                }
            }
            Damage::Overwrite(at, bytes) => {
                for (i, v) in bytes.iter().enumerate() {
                    if let Some(x) = b.get_mut((at % n) + i) {
                        *x = *v;
                    }
                }
            }
            Damage::Insert(at, bytes) => {
                let at = (at % n).min(b.len());
                b.splice(at..at, bytes.iter().copied());
            }
            Damage::Random(bytes) => return bytes.clone(),
        }
        b
    }
}

/// Truncations, bit flips, overwritten and inserted runs, and random bytes.
pub fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        any::<usize>().prop_map(Damage::Truncate),
        proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8).prop_map(Damage::Flip),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..64)
        )
            .prop_map(|(a, b)| Damage::Overwrite(a, b)),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..64)
        )
            .prop_map(|(a, b)| Damage::Insert(a, b)),
        proptest::collection::vec(any::<u8>(), 0..2048).prop_map(Damage::Random),
    ]
}
