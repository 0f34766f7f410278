//! Proving a layer read by range: once every span is held, the tar they
//! make must hash to the layer's diff_id, or every byte the index produced
//! is dropped and the index distrusted. What it trusts: the diff_id from the
//! image config (pinned by the manifest digest), nothing the index says.

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;

use super::{Ranged, RangedError, distrust, io_err};

impl Ranged {
    /// Once every span is held (and only then), hashes the tar they make
    /// against the layer's diff_id, once; on a mismatch drops every byte
    /// the index produced and distrusts it. `Ok` while spans are missing
    /// or when there is nothing to check against.
    pub fn check_tar(&self) -> Result<(), RangedError> {
        let Some(expected) = &self.tar_digest else {
            return Ok(());
        };
        if self.poisoned.load(Ordering::Relaxed) {
            return Err(RangedError::Distrusted {
                digest: self.digest.clone(),
            });
        }
        if !self.complete() {
            return Ok(());
        }
        let mut checked = self.tar_checked.lock().unwrap_or_else(|e| e.into_inner());
        if *checked == Some(true) {
            return Ok(());
        }
        let actual = self.hash_tar()?;
        if actual == *expected {
            *checked = Some(true);
            tracing::info!(
                "layer {}: every span held; the tar matches its diff_id",
                self.digest
            );
            return Ok(());
        }
        *checked = Some(false);
        self.drop_all();
        Err(RangedError::TarDigest {
            digest: self.digest.clone(),
            expected: expected.clone(),
            actual,
        })
    }

    /// sha256 of the held spans, as the tar they are.
    fn hash_tar(&self) -> Result<String, RangedError> {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < self.end {
            let n = buf.len().min((self.end - at) as usize);
            self.data
                .read_exact_at(&mut buf[..n], at)
                .map_err(io_err(&self.data_path))?;
            h.update(&buf[..n]);
            at += n as u64;
        }
        Ok(format!("sha256:{}", hex::encode(h.finalize())))
    }

    /// The index lied: nothing it said is used again, here or by any later
    /// opening, and every byte it decoded is deleted.
    pub(super) fn drop_all(&self) {
        self.poisoned.store(true, Ordering::Relaxed);
        distrust(&self.data_path);
        for p in [&self.data_path, &self.log_path] {
            if let Err(e) = std::fs::remove_file(p)
                && e.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!("{}: {e}", p.display());
            }
        }
    }
}
