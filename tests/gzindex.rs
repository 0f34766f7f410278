//! Gzip checkpoint indexes shared through the registry (issue 13): machine A
//! reads an image whole and pushes its index; machine B, with its own cache,
//! reads single files by range, verified, and shows the same tree.

mod common;

use common::counting::CountingProxy;
use common::image::push_alpine;
use common::*;

#[test]
fn a_pushed_index_lets_another_cache_read_one_file_by_range() {
    let reg = Registry::start(Auth::None);
    let pushed = push_alpine(&reg, "src", "3.20", "3.20.3", "amd64", true);
    let _ = pushed;
    let a = Env::new();
    let r = format!("{}/src:3.20", reg.addr());
    let out = a.ok(&["index", "push", &r]);
    assert!(out.contains("pushed sha256:"), "{out}");
    let want = a.ok(&["cat", &r, "/etc/os-release"]);

    let proxy = CountingProxy::start(&reg.addr(), None);
    let b = Env::new();
    let rb = format!("{}/src:3.20", proxy.addr());
    let got = b.ok(&["cat", "-v", &rb, "/etc/os-release"]);
    assert_eq!(got, want);
    let blob = std::fs::metadata(alpine("3.20.3", "x86_64")).unwrap().len();
    assert!(proxy.sent() < blob, "fetched {} of {blob}", proxy.sent());
}
