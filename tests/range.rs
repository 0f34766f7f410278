//! Byte ranges of blobs from a real registry (distribution 2.8): exact bytes
//! at several offsets, anonymous and with token auth, through a redirecting
//! front whose storage host ignores Range, and the error past the end.

mod common;

use std::sync::Arc;

use common::image::{push_blob, sha256};
use common::proxy::RedirectProxy;
use common::token::TokenServer;
use common::*;
use rimg::reference::Reference;
use rimg::registry::{
    Client, ClientOptions, CredentialStore, Credentials, LayerDesc, WHOLE_BLOB_FALLBACK_MAX,
};

/// Bytes that differ at every offset, so a shifted range cannot pass.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn desc_of(bytes: &[u8]) -> LayerDesc {
    LayerDesc {
        digest: sha256(bytes).parse().unwrap(),
        media_type: "application/octet-stream".into(),
        size: bytes.len() as u64,
        urls: vec![],
        diff_id: None,
        annotations: Default::default(),
    }
}

fn client(with_credentials: bool) -> Arc<Client> {
    let explicit = with_credentials.then(|| Credentials {
        username: USER.into(),
        password: PASS.into(),
        identity_token: None,
    });
    let opts = ClientOptions {
        credentials: CredentialStore::from_env(explicit),
        ..ClientOptions::default()
    };
    Arc::new(Client::new(opts).unwrap())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Offsets that touch the start, the end, a single byte, and pieces that
/// cross 64 KiB boundaries.
fn ranges(size: u64) -> Vec<(u64, u64)> {
    vec![
        (0, 1),
        (0, 4096),
        (1, 10),
        (65_535, 3),
        (size / 2, 100_000),
        (size - 1, 1),
        (size - 70_000, 70_000),
        (0, size),
    ]
}

fn check_exact_ranges(reg: &Registry, host: &str, with_credentials: bool) {
    let data = pattern(3 << 20);
    push_blob(reg, "range/big", &data);
    let desc = desc_of(&data);
    let reference = Reference::parse(&format!("{host}/range/big:latest")).unwrap();
    let client = client(with_credentials);
    runtime().block_on(async {
        for (start, len) in ranges(data.len() as u64) {
            let got = client
                .blob_range(&reference, &desc, start, len)
                .await
                .unwrap_or_else(|e| panic!("range {start}+{len}: {e}"));
            let (s, e) = (start as usize, (start + len) as usize);
            assert!(got[..] == data[s..e], "range {start}+{len} differs");
        }
        let empty = client.blob_range(&reference, &desc, 5, 0).await.unwrap();
        assert!(empty.is_empty());
    });
}

#[test]
fn ranges_of_a_blob_are_the_exact_bytes_anonymously() {
    let reg = Registry::start(Auth::None);
    check_exact_ranges(&reg, &reg.addr(), false);
}

#[test]
fn ranges_of_a_blob_are_the_exact_bytes_with_token_auth() {
    let reg = Registry::start(Auth::Token(TokenServer::start(&[], 300)));
    check_exact_ranges(&reg, &reg.addr(), true);
}

#[test]
fn ranges_of_a_blob_are_the_exact_bytes_with_basic_auth() {
    let reg = Registry::start(Auth::Basic);
    check_exact_ranges(&reg, &reg.addr(), true);
}

#[test]
fn a_range_past_the_end_of_the_blob_is_an_error() {
    let reg = Registry::start(Auth::None);
    let data = pattern(10_000);
    push_blob(&reg, "range/small", &data);
    let reference = Reference::parse(&format!("{}/range/small:latest", reg.addr())).unwrap();
    let client = client(false);
    let desc = desc_of(&data);
    runtime().block_on(async {
        // Refused from the descriptor's size, before any request.
        for (start, len) in [(9_990, 20), (10_000, 1), (u64::MAX, 2)] {
            let e = client
                .blob_range(&reference, &desc, start, len)
                .await
                .unwrap_err()
                .to_string();
            assert!(e.contains("past the end of the 10000-byte blob"), "{e}");
            assert!(e.contains(desc.digest.as_str()), "{e}");
        }
        // A descriptor that overstates the size: the registry says where
        // the blob ends (416, or a shorter 206).
        let mut lying = desc.clone();
        lying.size = 20_000;
        for (start, len) in [(15_000, 10), (9_990, 20)] {
            let e = client
                .blob_range(&reference, &lying, start, len)
                .await
                .unwrap_err()
                .to_string();
            assert!(e.contains("past the end of the 10000-byte blob"), "{e}");
        }
    });
}

#[test]
fn a_storage_host_that_ignores_range_is_sliced_for_small_blobs_and_refused_for_large_ones() {
    let reg = Registry::start(Auth::None);
    // The redirect front sends blob GETs to a storage host that answers
    // `bytes=a-b` with 200 and the whole blob.
    let front = RedirectProxy::start(&reg);
    let small = pattern(100_000);
    let large = pattern(WHOLE_BLOB_FALLBACK_MAX as usize + 1);
    push_blob(&reg, "range/ignored", &small);
    push_blob(&reg, "range/ignored", &large);
    let reference = Reference::parse(&format!("{}/range/ignored:latest", front.addr())).unwrap();
    let client = client(false);
    // A 503 and a 429 first: retried under the client's policy.
    front.refuse_next(2);
    runtime().block_on(async {
        let got = client
            .blob_range(&reference, &desc_of(&small), 777, 5000)
            .await
            .unwrap();
        assert!(got[..] == small[777..5777]);
        let e = client
            .blob_range(&reference, &desc_of(&large), 0, 10)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("the registry ignores Range requests"), "{e}");
    });
    assert_eq!(front.refused(), 2);
    assert!(front.redirected() >= 2);
}

#[test]
fn a_body_cut_short_is_asked_again() {
    let reg = Registry::start(Auth::None);
    // The storage host's first answer promises the whole blob and hangs up
    // after 1000 bytes.
    let front = RedirectProxy::start_flaky(&reg, 1000);
    let data = pattern(200_000);
    push_blob(&reg, "range/flaky", &data);
    let reference = Reference::parse(&format!("{}/range/flaky:latest", front.addr())).unwrap();
    let got = runtime()
        .block_on(client(false).blob_range(&reference, &desc_of(&data), 150_000, 20_000))
        .unwrap();
    assert!(got[..] == data[150_000..170_000]);
    assert!(front.cdn_requests() >= 2, "{}", front.cdn_requests());
}
