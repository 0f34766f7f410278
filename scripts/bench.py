#!/usr/bin/env python3
"""rimg benchmarks: cold and warm mounts, grep/find overhead, memory and export,
each against a baseline measured in the same run, and cold range-lazy reads of
the image converted to eStargz and zstd:chunked through a 20 MB/s link. Run
through scripts/bench.sh, which installs what this needs and builds rimg;
`scripts/bench.sh range-lazy` runs only the range-lazy case.

The benchmark image (Debian bookworm minbase, a layer of pip-installed Python
packages, and a top layer that deletes and adds files) is built once and kept
under $RIMG_BENCH_DIR (default ~/.cache/rimg-bench)."""

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Where bench.sh's `cargo build --release` put it.
RIMG = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")).resolve() / "release" / "rimg"
BENCH = Path(os.environ.get("RIMG_BENCH_DIR", Path.home() / ".cache" / "rimg-bench"))
RUNS = int(os.environ.get("RIMG_BENCH_RUNS", "3"))
MIRROR = os.environ.get("RIMG_BENCH_DEBIAN_MIRROR", "http://deb.debian.org/debian")
PIP_PACKAGES = os.environ.get("RIMG_BENCH_PIP", "numpy pandas requests django sympy scipy botocore").split()


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=isinstance(cmd, str), check=True, **kw)


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median_of(fn, setup=None, runs=RUNS):
    samples = []
    for _ in range(runs):
        if setup:
            setup()
        samples.append(timed(fn))
    return statistics.median(samples)


def tar_gz(src: Path, out: Path):
    sh(["tar", "--numeric-owner", "--xattrs", "-C", str(src), "-czf", str(out), "."])


def top_layer(top: Path, release: str, out: Path):
    """The top layer: a whiteout, an opaque directory and one new file."""
    (top / "usr/share").mkdir(parents=True)
    (top / "usr/share/.wh.doc").touch()
    (top / "usr/share/locale").mkdir()
    (top / "usr/share/locale/.wh..wh..opq").touch()
    (top / "etc").mkdir()
    (top / "etc/bench-release").write_text(release)
    tar_gz(top, out)


def build_layers():
    """Three layers, built once: debootstrap minbase, pip packages, deletions."""
    BENCH.mkdir(parents=True, exist_ok=True)
    layers = [BENCH / f"layer{i}.tar.gz" for i in (1, 2, 3)]
    if all(p.exists() for p in layers):
        return layers
    work = Path(tempfile.mkdtemp(prefix="rimg-bench-", dir=BENCH))
    try:
        base = work / "base"
        if not layers[0].exists():
            print("building layer 1: debootstrap bookworm minbase", file=sys.stderr)
            sh(["debootstrap", "--variant=minbase", "bookworm", str(base), MIRROR])
            # As an image build would: no downloaded .debs left behind.
            for deb in (base / "var/cache/apt/archives").glob("*.deb"):
                deb.unlink()
            tar_gz(base, layers[0])
        if not layers[1].exists():
            print("building layer 2: pip " + " ".join(PIP_PACKAGES), file=sys.stderr)
            py = work / "py"
            site = py / "usr/local/lib/python3.11/site-packages"
            site.mkdir(parents=True)
            sh([sys.executable, "-m", "pip", "install", "--quiet", "--no-compile",
                "--target", str(site)] + PIP_PACKAGES)
            tar_gz(py, layers[1])
        if not layers[2].exists():
            print("building layer 3: deletions and an opaque directory", file=sys.stderr)
            top_layer(work / "top", "rimg bench image\n", layers[2])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return layers


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Registry:
    def __init__(self, work: Path, root: Path = None):
        self.port = free_port()
        cfg = work / "registry.yml"
        cfg.write_text(
            f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {root or work / 'registry'}\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n"
        )
        self.proc = subprocess.Popen(["docker-registry", "serve", str(cfg)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            if subprocess.run(["curl", "-sf", f"http://127.0.0.1:{self.port}/v2/"],
                              stdout=subprocess.DEVNULL).returncode == 0:
                return
            time.sleep(0.1)
        raise SystemExit("registry did not start")

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def rss_kib(pid, field):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def serving_pid(mnt: Path):
    out = subprocess.run([str(RIMG), "mounts"], capture_output=True, text=True).stdout
    for line in out.splitlines()[1:]:
        parts = line.split()
        if parts and parts[-1] == str(mnt):
            return int(parts[-2])
    return None



# Range-lazy reads (issue 12): the benchmark image converted to eStargz and
# zstd:chunked by their real producers, read through a throttled link.
LAZY_RATE = 20_000_000  # bytes/s
# A small file deep in the bottom layer, which the top layer leaves alone.
LAZY_FILE = "/usr/share/gcc/python/libstdcxx/v6/xmethods.py"


class ThrottledProxy:
    """A TCP forwarder in front of the registry that counts the bytes the
    registry sends (headers included) and holds them, over all connections
    together, to `rate` bytes/s: each read books the wire after the ones
    before it."""

    def __init__(self, upstream_port: int, rate: int):
        self.upstream = upstream_port
        self.rate = rate
        self.sent = 0
        self.lock = threading.Lock()
        self.wire = time.monotonic()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self):
        with self.lock:
            self.sent = 0

    def close(self):
        self.sock.close()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pipe, args=(client, up, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, client, True), daemon=True).start()

    def _pipe(self, src, dst, from_registry):
        try:
            while True:
                data = src.recv(16384)
                if not data:
                    break
                if from_registry:
                    with self.lock:
                        self.sent += len(data)
                        self.wire = max(self.wire, time.monotonic()) + len(data) / self.rate
                        until = self.wire
                    delay = until - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass


def estargz_convert(reg: str, src: str, dst: str):
    """ctr-remote's eStargz conversion of reg/src as reg/dst, through a
    containerd of our own (private root, state and sockets; the native
    snapshotter, so no overlay mounts), as tests/common/lazy.rs does it."""
    d = Path(tempfile.mkdtemp(prefix="ctd", dir="/tmp"))  # short: sun_path
    (d / "config.toml").write_text(f"""version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{d}/c.sock"
[ttrpc]
  address = "{d}/c.sock.ttrpc"
[debug]
  address = "{d}/debug.sock"
""")
    log = open(d / "containerd.log", "wb")
    proc = subprocess.Popen(["containerd", "--config", str(d / "config.toml")],
                            stdout=log, stderr=subprocess.STDOUT)
    env = dict(os.environ, TMPDIR=str(d))

    def ctr(*args, **kw):
        return subprocess.run(["ctr-remote", "-a", str(d / "c.sock"), "-n", "rimg-bench", *args],
                              env=env, stdout=subprocess.DEVNULL, **kw)
    try:
        for _ in range(300):
            if ctr("version", stderr=subprocess.DEVNULL).returncode == 0:
                break
            time.sleep(0.1)
        else:
            raise SystemExit("containerd did not start: " + (d / "containerd.log").read_text())
        src, dst = f"{reg}/{src}", f"{reg}/{dst}"
        ctr("image", "pull", "--plain-http", "--snapshotter", "native", src, check=True)
        ctr("image", "convert", "--estargz", "--oci", src, dst, check=True)
        ctr("image", "push", "--plain-http", dst, check=True)
    finally:
        proc.terminate()
        proc.wait()
        log.close()
        subprocess.run(["umount", "-R", str(d / "root")], stderr=subprocess.DEVNULL)
        shutil.rmtree(d, ignore_errors=True)


def zstd_chunked_convert(reg: str, src: str, dst: str):
    """skopeo's zstd:chunked conversion of reg/src as reg/dst."""
    # Else skopeo reuses the gzip blobs it knows for the same diff IDs.
    Path("/var/lib/containers/cache/blob-info-cache-v1.boltdb").unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        sh(["skopeo", "copy", "-q", "--format", "oci", "--dest-compress-format", "zstd:chunked",
            "--dest-compress", "--src-tls-verify=false", "--dest-tls-verify=false",
            f"docker://{reg}/{src}", f"docker://{reg}/{dst}"], env=dict(os.environ, TMPDIR=tmp))


def compressed_size(reg: str, repo: str) -> int:
    m = json.loads(subprocess.run(
        ["curl", "-sSf", "-H", "Accept: application/vnd.oci.image.manifest.v1+json",
         "-H", "Accept: application/vnd.docker.distribution.manifest.v2+json",
         f"http://{reg}/v2/{repo}/manifests/v1"], check=True, capture_output=True).stdout)
    return sum(layer["size"] for layer in m["layers"])


def range_lazy(layers):
    """Cold `rimg cat` of one small file through a 20 MB/s link: the gzip
    image (whole layers), and its eStargz and zstd:chunked conversions (the
    TOCs and the covering chunks). The converted registry is kept under
    BENCH/lazy-registry: converting takes a minute or two."""
    root = BENCH / "lazy-registry"
    marker = root / "converted.json"
    stamp = json.dumps([[p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in layers])
    work = Path(tempfile.mkdtemp(prefix="rimg-bench-lazy-"))
    if not (marker.exists() and marker.read_text() == stamp):
        shutil.rmtree(root, ignore_errors=True)
    reg = Registry(work, root)
    addr = f"127.0.0.1:{reg.port}"
    proxy = ThrottledProxy(reg.port, LAZY_RATE)
    out = {}
    try:
        if not marker.exists():
            print("converting the benchmark image to eStargz and zstd:chunked", file=sys.stderr)
            sh([str(ROOT / "scripts/push-image.sh"), addr, "bench/image", "v1", "amd64"]
               + [str(p) for p in layers], stdout=subprocess.DEVNULL)
            estargz_convert(addr, "bench/image:v1", "bench/esgz:v1")
            zstd_chunked_convert(addr, "bench/image:v1", "bench/zchunked:v1")
            marker.write_text(stamp)
        want = None
        for form, repo, runs in (("gzip", "bench/image", 1), ("estargz", "bench/esgz", RUNS),
                                 ("zstd:chunked", "bench/zchunked", RUNS)):
            cache = work / "cache"
            env = dict(os.environ, RIMG_CACHE_DIR=str(cache))
            got = {}

            def fresh():
                shutil.rmtree(cache, ignore_errors=True)
                proxy.reset()

            def cat():
                got["bytes"] = subprocess.run(
                    # These producers write no tar-split: reading them by
                    # range is on trust (--trust-toc), which is what is measured.
                    [str(RIMG), "cat", "--trust-toc", f"127.0.0.1:{proxy.port}/{repo}:v1", LAZY_FILE],
                    env=env, check=True, capture_output=True).stdout
            secs = median_of(cat, setup=fresh, runs=runs)
            # The whole-layer path verifies every layer's diff_id: its bytes are right.
            want = want or got["bytes"]
            if got["bytes"] != want or not want:
                raise SystemExit(f"range-lazy: {form} cat gave other bytes than gzip")
            out[form] = {"s": secs, "fetched_bytes": proxy.sent,
                         "compressed_bytes": compressed_size(addr, repo)}
    finally:
        proxy.close()
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)
    whole = out["gzip"]["s"]
    for r in out.values():
        r["fetched_pct"] = 100 * r["fetched_bytes"] / r["compressed_bytes"]
        r["vs_whole_layer"] = r["s"] / whole
    return out


def print_range_lazy(r):
    print(f"\nrange-lazy cold cat of {LAZY_FILE} at {LAZY_RATE / 1e6:.0f} MB/s "
          f"(goal: <= 2% of the compressed bytes, <= 0.1x the whole-layer time)")
    print(f"| {'form':<13} | {'s':>7} | {'fetched':>11} | {'compressed':>11} | {'%':>6} | {'vs gzip':>7} |")
    print(f"|{'-' * 15}|{'-' * 9}|{'-' * 13}|{'-' * 13}|{'-' * 8}|{'-' * 9}|")
    for form, x in r.items():
        print(f"| {form:<13} | {x['s']:>7.3f} | {x['fetched_bytes']:>11} | {x['compressed_bytes']:>11} | "
              f"{x['fetched_pct']:>6.2f} | {x['vs_whole_layer']:>7.3f} |")


def main_range_lazy():
    r = range_lazy(build_layers())
    print_range_lazy(r)
    out = Path(os.environ.get("RIMG_BENCH_JSON", ROOT / "bench-results.json"))
    out.write_text(json.dumps({"range_lazy": r}, indent=2) + "\n")
    print(f"\nJSON: {out}")


# The many-entries images: DIRS directories of 1,000 empty files each.
SCALES = [int(n) for n in os.environ.get("RIMG_BENCH_SCALES", "10,100,1000").split(",")]
FILES_PER_DIR = 1000


def ustar_header(name: bytes, typeflag: bytes, mode: int) -> bytes:
    """One ustar header block, for an empty entry."""
    h = bytearray(512)
    h[0:len(name)] = name
    h[100:108] = b"%07o\0" % mode
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = b"00000000000\0"
    h[136:148] = b"14500000000\0"
    h[148:156] = b" " * 8
    h[156:157] = typeflag
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def many_entries_layer(dirs: int) -> Path:
    """A layer of `dirs` directories of 1,000 empty files each (built once).
    Headers are written directly, piped to gzip -1: Python's tarfile would
    take minutes for a million entries."""
    BENCH.mkdir(parents=True, exist_ok=True)
    out = BENCH / f"entries-{dirs}x{FILES_PER_DIR}.tar.gz"
    if out.exists():
        return out
    print(f"building a layer of {dirs} x {FILES_PER_DIR} empty files", file=sys.stderr)
    tmp = out.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        gz = subprocess.Popen(["gzip", "-1"], stdin=subprocess.PIPE, stdout=f)
        buf = []
        for d in range(dirs):
            dname = b"d%04d" % d
            buf.append(ustar_header(dname + b"/", b"5", 0o755))
            # Only the name and the checksum differ between a directory's files.
            template = bytearray(ustar_header(dname + b"/f0000", b"0", 0o644))
            template[148:156] = b" " * 8
            base = sum(template) - sum(b"0000")
            for i in range(FILES_PER_DIR):
                digits = b"%04d" % i
                template[len(dname) + 2:len(dname) + 6] = digits
                template[148:156] = b"%06o\0 " % (base + sum(digits))
                buf.append(bytes(template))
            if len(buf) > 20000:
                gz.stdin.write(b"".join(buf))
                buf = []
        buf.append(b"\0" * 1024)
        gz.stdin.write(b"".join(buf))
        gz.stdin.close()
        if gz.wait() != 0:
            raise SystemExit("gzip failed")
    tmp.rename(out)
    return out


def scale_bench(reg, work: Path):
    """For each many-entries image: warm mount until the first stat, server
    memory after a full find, warm find against find over an extracted copy,
    cold mount + find against tar -x + find, and rimg ls -R."""
    rows = []
    for dirs in SCALES:
        layer = many_entries_layer(dirs)
        tag = f"n{dirs}"
        sh([str(ROOT / "scripts/push-image.sh"), f"127.0.0.1:{reg.port}", "bench/entries", tag, "amd64",
            str(layer)], stdout=subprocess.DEVNULL)
        ref = f"127.0.0.1:{reg.port}/bench/entries:{tag}"
        mnt = work / f"mnt-{tag}"
        mnt.mkdir()
        cache = work / f"cache-{tag}"
        env = dict(os.environ, RIMG_CACHE_DIR=str(cache))
        first = mnt / "d0000" / "f0000"
        r = {"dirs": dirs}

        def rimg(*args, **kw):
            return subprocess.run([str(RIMG), *args], env=env, check=True, **kw)

        def umount():
            subprocess.run([str(RIMG), "umount", str(mnt)], env=env, stderr=subprocess.DEVNULL)

        def count(d):
            return int(subprocess.run(f"find {d} | wc -l", shell=True, capture_output=True,
                                      text=True).stdout)

        def cold():
            rimg("mount", ref, str(mnt), stdout=subprocess.DEVNULL)
            r["entries"] = count(mnt)

        def clear_cache():
            umount()
            shutil.rmtree(cache, ignore_errors=True)
        r["cold_mount_find_s"] = median_of(cold, setup=clear_cache)
        extracted = work / f"x-{tag}"

        def untar_find():
            extracted.mkdir()
            sh(["tar", "-xzf", str(layer), "-C", str(extracted)])
            count(extracted)

        def clear_extracted():
            shutil.rmtree(extracted, ignore_errors=True)
        r["untar_find_s"] = median_of(untar_find, setup=clear_extracted)
        # The cold mount saved the tree once every layer was there.
        for _ in range(600):
            if any((cache / "trees").glob("*")):
                break
            time.sleep(0.1)
        umount()
        r["tree_file_bytes"] = sum(p.stat().st_size for p in (cache / "trees").glob("*"))

        def warm():
            rimg("mount", ref, str(mnt), stdout=subprocess.DEVNULL)
            os.stat(first)
        r["warm_mount_stat_s"] = median_of(warm, setup=umount)
        pid = serving_pid(mnt)
        rss0 = rss_kib(pid, "VmRSS") if pid else 0
        # The first find after a warm mount: every lookup goes to the server.
        r["first_find_mount_s"] = timed(lambda: count(mnt))
        r["rss_after_find_kib"] = rss_kib(pid, "VmRSS") if pid else 0
        r["rss_anon_after_find_kib"] = rss_kib(pid, "RssAnon") if pid else 0
        r["rss_file_after_find_kib"] = rss_kib(pid, "RssFile") if pid else 0
        r["rss_before_find_kib"] = rss0
        r["rss_bytes_per_entry"] = r["rss_after_find_kib"] * 1024 / max(r["entries"], 1)
        r["find_mount_s"] = median_of(lambda: count(mnt))
        r["find_extracted_s"] = median_of(lambda: count(extracted))
        umount()
        ls = subprocess.run(["/usr/bin/time", "-f", "%e %M", str(RIMG), "ls", "-R", ref, "/"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        secs, kib = ls.stderr.strip().splitlines()[-1].split()
        r["ls_R_s"], r["ls_R_peak_kib"] = float(secs), int(kib)
        clear_extracted()
        shutil.rmtree(cache, ignore_errors=True)
        rows.append(r)
    print(f"\nmany entries: directories of {FILES_PER_DIR} empty files, median of {RUNS}")
    print("| entries | warm mount+stat | RSS after find | B/entry (anon+file) | first find after warm mount "
          "| warm find mount / extracted | cold mount+find / tar -x+find | ls -R | saved tree |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['entries']:,} | {r['warm_mount_stat_s'] * 1e3:.0f} ms "
              f"| {r['rss_after_find_kib'] / 1024:.1f} MiB "
              f"| {r['rss_bytes_per_entry']:.0f} ({r['rss_anon_after_find_kib'] * 1024 / r['entries']:.0f}"
              f"+{r['rss_file_after_find_kib'] * 1024 / r['entries']:.0f}) "
              f"| {r['first_find_mount_s']:.2f} s "
              f"| {r['find_mount_s']:.2f} / {r['find_extracted_s']:.2f} s = "
              f"{r['find_mount_s'] / r['find_extracted_s']:.2f}x "
              f"| {r['cold_mount_find_s']:.2f} / {r['untar_find_s']:.2f} s = "
              f"{r['cold_mount_find_s'] / r['untar_find_s']:.2f}x "
              f"| {r['ls_R_s']:.2f} s, {r['ls_R_peak_kib'] / 1024:.0f} MiB "
              f"| {r['tree_file_bytes'] / 1e6:.1f} MB |")
    return rows


def main():
    if "--entries-only" in sys.argv:
        # Only the many-entries images: needs no debootstrap or pip.
        work = Path(tempfile.mkdtemp(prefix="rimg-bench-run-"))
        reg = Registry(work)
        try:
            rows = scale_bench(reg, work)
        finally:
            reg.stop()
            shutil.rmtree(work, ignore_errors=True)
        out = Path(os.environ.get("RIMG_BENCH_JSON", ROOT / "bench-results.json"))
        out.write_text(json.dumps({"cores": os.cpu_count(), "runs": RUNS, "entries": rows},
                                  indent=2) + "\n")
        print(f"\nJSON: {out}")
        return
    layers = build_layers()
    work = Path(tempfile.mkdtemp(prefix="rimg-bench-run-"))
    reg = Registry(work)
    mnt = work / "mnt"
    mnt.mkdir()
    cache = work / "cache"
    env = dict(os.environ, RIMG_CACHE_DIR=str(cache))
    results = {}
    try:
        sh([str(ROOT / "scripts/push-image.sh"), f"127.0.0.1:{reg.port}", "bench/image", "v1", "amd64"]
           + [str(p) for p in layers], stdout=subprocess.DEVNULL)
        ref = f"127.0.0.1:{reg.port}/bench/image:v1"
        sizes = [p.stat().st_size for p in layers]
        unpacked = sum(int(subprocess.run(f"gzip -dc {p} | wc -c", shell=True, capture_output=True,
                                          text=True).stdout) for p in layers)

        def rimg(*args, **kw):
            return subprocess.run([str(RIMG), *args], env=env, check=True, **kw)

        def umount():
            subprocess.run([str(RIMG), "umount", str(mnt)], env=env, stderr=subprocess.DEVNULL)

        def clear_cache():
            umount()
            shutil.rmtree(cache, ignore_errors=True)

        # 1. Cold: mount + first byte, against pull-and-extract and the gunzip floor.
        def cold():
            rimg("mount", ref, str(mnt), stdout=subprocess.DEVNULL)
            Path(mnt / "etc/os-release").read_bytes()
        results["cold_mount_cat_s"] = median_of(cold, setup=clear_cache)
        umount()

        oci = work / "oci"
        bundle = work / "bundle"

        def pull_clean():
            shutil.rmtree(oci, ignore_errors=True)
            shutil.rmtree(bundle, ignore_errors=True)

        def pull_extract():
            sh(["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{ref}", f"oci:{oci}:v1"])
            sh(["umoci", "unpack", "--image", f"{oci}:v1", str(bundle)], stdout=subprocess.DEVNULL)
            (bundle / "rootfs/etc/os-release").read_bytes()
        results["pull_extract_s"] = median_of(pull_extract, setup=pull_clean)

        def gunzip_floor():
            for p in layers:
                sh(f"gzip -dc {p} >/dev/null")
        results["gunzip_floor_s"] = median_of(gunzip_floor)

        # 2. Warm: everything cached; time until a stat inside the image answers,
        #    with the merged tree saved (the usual case: any earlier mount that
        #    had every layer saved it) and without (a cache from before trees
        #    were saved, or one whose tree was pruned).
        rimg("mount", ref, str(mnt), stdout=subprocess.DEVNULL)
        sh(["find", str(mnt), "-maxdepth", "1"], stdout=subprocess.DEVNULL)
        umount()

        def warm():
            rimg("mount", ref, str(mnt), stdout=subprocess.DEVNULL)
            os.stat(mnt / "etc/os-release")
        results["warm_mount_stat_s"] = median_of(warm, setup=umount)

        def without_tree():
            umount()
            shutil.rmtree(cache / "trees", ignore_errors=True)
        results["warm_mount_stat_no_tree_s"] = median_of(warm, setup=without_tree)
        # A mount without a tree saves it in the background once it has
        # answered; give that a moment, then the next mounts load it.
        without_tree()
        warm()
        for _ in range(300):
            if any((cache / "trees").glob("*")):
                break
            time.sleep(0.1)
        umount()
        results["warm_mount_stat_after_s"] = median_of(warm, setup=umount)

        # 3. Overhead of grep -r and find over the mount vs the extracted tree (both warm).
        rootfs = bundle / "rootfs"
        pattern = "rimg-no-such-pattern-xyzzy"

        def grep_in(d):
            return lambda: subprocess.run(["grep", "-r", "-s", pattern, "."], cwd=d,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def find_in(d):
            return lambda: subprocess.run(f"find . -type f | wc -l", shell=True, cwd=d,
                                          stdout=subprocess.DEVNULL)
        for d in (mnt, rootfs):  # warm both page caches
            grep_in(d)()
        results["grep_mount_s"] = median_of(grep_in(mnt))
        results["grep_extracted_s"] = median_of(grep_in(rootfs))
        results["find_mount_s"] = median_of(find_in(mnt))
        results["find_extracted_s"] = median_of(find_in(rootfs))

        # 3b. rimg grep (no mount) over the cached image vs grep -r over the
        #     extracted tree, both warm.
        def rimg_grep():
            subprocess.run([str(RIMG), "grep", pattern, ref], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rimg_grep()
        results["rimg_grep_s"] = median_of(rimg_grep)

        # 3c. rimg diff of two tags sharing their bottom layers, cold: the
        #     bytes fetched, against both images' compressed layers.
        # v2: the same top layer but for one file, as a rebuild of the same
        # Dockerfile with a changed file makes.
        layer2 = work / "layer3b.tar.gz"
        top_layer(work / "top2", "rimg bench image, second tag\n", layer2)
        sh([str(ROOT / "scripts/push-image.sh"), f"127.0.0.1:{reg.port}", "bench/image", "v2", "amd64",
            str(layers[0]), str(layers[1]), str(layer2)], stdout=subprocess.DEVNULL)
        ref2 = f"127.0.0.1:{reg.port}/bench/image:v2"
        clear_cache()
        diff_s = timed(lambda: rimg("diff", ref, ref2, stdout=subprocess.DEVNULL))
        fetched = sum(f.stat().st_size for f in (cache / "blobs").rglob("*") if f.is_file())
        results["diff_cold_s"] = diff_s
        results["diff_fetched_bytes"] = fetched
        results["diff_both_images_bytes"] = sum(sizes) * 2 - sizes[2] + layer2.stat().st_size
        rimg("mount", ref, str(mnt), stdout=subprocess.DEVNULL)
        sh(["find", str(mnt), "-maxdepth", "1"], stdout=subprocess.DEVNULL)
        umount()

        # 4. Memory: peak RSS of the server after a full walk, per indexed entry.
        umount()
        rimg("mount", ref, str(mnt), stdout=subprocess.DEVNULL)
        pid = serving_pid(mnt)
        base_kib = rss_kib(pid, "VmRSS") if pid else 0
        entries = int(subprocess.run(f"find {mnt} | wc -l", shell=True, capture_output=True,
                                     text=True).stdout)
        peak_kib = rss_kib(pid, "VmHWM") if pid else 0
        results["entries"] = entries
        results["rss_base_kib"] = base_kib
        results["rss_peak_kib"] = peak_kib
        results["bytes_per_entry"] = (peak_kib - base_kib) * 1024 / max(entries, 1)
        umount()

        # 5. Export of the cached image vs skopeo's docker-archive.
        out = work / "export.tar"

        def rimg_export():
            out.unlink(missing_ok=True)
            rimg("export", ref, str(out))

        def skopeo_export():
            out.unlink(missing_ok=True)
            sh(["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{ref}",
                f"docker-archive:{out}:bench/image:v1"])
        results["export_rimg_s"] = median_of(rimg_export)
        results["export_skopeo_s"] = median_of(skopeo_export)

        # 6. Range-lazy reads: a cold cat of one file, gzip vs eStargz vs zstd:chunked.
        lazy = range_lazy(layers)
        # 7. Published gzip index (issue 13).
        gz, _ = gzindex_bench(reg.port, work, sum(sizes))
        results.update(gz)
        results["entries_scale"] = scale_bench(reg, work)
        # 8. Issue 28: reading everything lazily vs whole; idle mounts.
        import bench_scan
        scan = bench_scan.read_everything(layers)
        idle = bench_scan.idle_mounts(reg.port, work)
    finally:
        subprocess.run([str(RIMG), "umount", str(mnt)], stderr=subprocess.DEVNULL)
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)

    r = results
    ratios = {
        "cold_vs_pull_extract": r["cold_mount_cat_s"] / r["pull_extract_s"],
        "cold_vs_gunzip_floor": r["cold_mount_cat_s"] / r["gunzip_floor_s"],
        "grep_mount_vs_extracted": r["grep_mount_s"] / r["grep_extracted_s"],
        "find_mount_vs_extracted": r["find_mount_s"] / r["find_extracted_s"],
        "export_rimg_vs_skopeo": r["export_rimg_s"] / r["export_skopeo_s"],
        "rimg_grep_vs_grep_extracted": r["rimg_grep_s"] / r["grep_extracted_s"],
        "diff_fetched_vs_both_images": r["diff_fetched_bytes"] / r["diff_both_images_bytes"],
    }
    report = {
        "entries_scale": r.pop("entries_scale"),
        "cores": os.cpu_count(),
        "runs": RUNS,
        "image": {"layers": len(layers), "compressed_bytes": sum(sizes), "unpacked_bytes": unpacked,
                  "entries": r["entries"]},
        "results": r,
        "range_lazy": lazy,
        "read_everything": scan,
        "idle_mounts": idle,
        "ratios": ratios,
        "targets": {
            "cold_vs_pull_extract": 0.3, "cold_vs_gunzip_floor": 1.0,
            "warm_mount_stat_s": 0.05, "warm_mount_stat_no_tree_s": 0.05,
            "warm_mount_stat_after_s": 0.05, "grep_mount_vs_extracted": 1.5, "bytes_per_entry": 200,
            "rimg_grep_vs_grep_extracted": 1.0,
        },
    }
    rows = [
        ("cold mount + cat", r["cold_mount_cat_s"], "pull+extract", r["pull_extract_s"]),
        ("cold mount + cat", r["cold_mount_cat_s"], "gunzip floor", r["gunzip_floor_s"]),
        ("warm mount + stat", r["warm_mount_stat_s"], "target 50 ms", 0.05),
        ("warm, no saved tree", r["warm_mount_stat_no_tree_s"], "target 50 ms", 0.05),
        ("warm, tree re-saved", r["warm_mount_stat_after_s"], "target 50 ms", 0.05),
        ("grep -r (mount)", r["grep_mount_s"], "grep -r (extracted)", r["grep_extracted_s"]),
        ("find | wc (mount)", r["find_mount_s"], "find | wc (extracted)", r["find_extracted_s"]),
        ("rimg export", r["export_rimg_s"], "skopeo docker-archive", r["export_skopeo_s"]),
        ("rimg grep (no mount)", r["rimg_grep_s"], "grep -r (extracted)", r["grep_extracted_s"]),
    ]
    print(f"\nrimg benchmark: {len(layers)} layers, {sum(sizes) / 1e6:.0f} MB compressed, "
          f"{unpacked / 1e6:.0f} MB unpacked, {r['entries']} entries, {os.cpu_count()} cores, "
          f"median of {RUNS}")
    print(f"| {'measure':<20} | {'rimg s':>8} | {'baseline':<22} | {'base s':>8} | {'ratio':>6} |")
    print(f"|{'-' * 22}|{'-' * 10}|{'-' * 24}|{'-' * 10}|{'-' * 8}|")
    for name, a, bname, b in rows:
        print(f"| {name:<20} | {a:>8.3f} | {bname:<22} | {b:>8.3f} | {a / b:>6.2f} |")
    print(f"| {'memory per entry':<20} | {r['bytes_per_entry']:>6.0f} B | {'target 200 B':<22} | "
          f"{'':>8} | {r['bytes_per_entry'] / 200:>6.2f} |")
    print(f"| {'diff v1 v2, cold':<20} | {r['diff_cold_s']:>8.3f} | "
          f"{'kB fetched / both images':<22} | {r['diff_fetched_bytes'] / 1e3:>8.1f} | "
          f"{r['diff_both_images_bytes'] / 1e3:>6.0f} |")
    print_range_lazy(lazy)
    print_gzindex(r, sum(sizes))
    bench_scan.print_read_everything(scan)
    bench_scan.print_idle_mounts(idle)
    out = Path(os.environ.get("RIMG_BENCH_JSON", ROOT / "bench-results.json"))
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nJSON: {out}")


# ---- Published gzip index (issue 13): machine B reads by range what machine A indexed ----

GZ_RATE = int(os.environ.get("RIMG_BENCH_GZ_RATE", str(20 * 1000 * 1000)))
GZ_SMALL_FILE = os.environ.get("RIMG_BENCH_GZ_FILE", "/etc/debian_version")
GZ_GREP_DIRS = os.environ.get("RIMG_BENCH_GZ_DIRS", "etc var/lib/dpkg").split()


def gzindex_bench(reg_port, work: Path, compressed_bytes: int):
    """Machine A (its own cache) pushes the image's gzip indexes; machine B
    (a fresh cache per run) behind a rate-limited counting proxy does a cold
    `rimg cat` of a small file of the bottom layer and a cold mount +
    `grep -r` of each of GZ_GREP_DIRS, with the index and with `--no-index`
    (whole layers). Returns the results and the `rimg index push` report."""
    ref = f"127.0.0.1:{reg_port}/bench/image:v1"
    env_a = dict(os.environ, RIMG_CACHE_DIR=str(work / "gz-a"))
    out = subprocess.run([str(RIMG), "index", "push", ref], env=env_a, check=True,
                         capture_output=True, text=True).stdout
    total = next(l for l in out.splitlines() if "bytes of index for" in l)
    index_pct = float(total.rsplit("(", 1)[1].rstrip("%)"))
    index_bytes = int(total.split(":", 1)[1].split()[0])
    proxy = ThrottledProxy(reg_port, GZ_RATE)
    ref_b = f"127.0.0.1:{proxy.port}/bench/image:v1"
    mnt = work / "gz-mnt"
    mnt.mkdir(exist_ok=True)
    cache_b = work / "gz-b"
    env_b = dict(os.environ, RIMG_CACHE_DIR=str(cache_b))
    want = subprocess.run([str(RIMG), "cat", ref, GZ_SMALL_FILE], env=env_a, check=True,
                          capture_output=True).stdout

    def fresh():
        subprocess.run([str(RIMG), "umount", str(mnt)], env=env_b, stderr=subprocess.DEVNULL)
        shutil.rmtree(cache_b, ignore_errors=True)
        proxy.reset()

    def cat(flags):
        def run():
            got = subprocess.run([str(RIMG), "cat", *flags, ref_b, GZ_SMALL_FILE], env=env_b,
                                 check=True, capture_output=True).stdout
            assert got == want, f"cat {GZ_SMALL_FILE} {flags}: differs from machine A's"
        return run

    def mount_grep(flags, d):
        def run():
            subprocess.run([str(RIMG), "mount", *flags, ref_b, str(mnt)], env=env_b, check=True,
                           stdout=subprocess.DEVNULL)
            subprocess.run(["grep", "-r", "-s", "rimg-no-such-pattern-xyzzy", d], cwd=mnt,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return run

    res = {"gz_index_bytes": index_bytes, "gz_index_pct": index_pct}
    try:
        cases = [("cat_index", cat(["--trust-index"])), ("cat_whole", cat(["--no-index"]))]
        for d in GZ_GREP_DIRS:
            key = "grep_" + d.replace("/", "_")
            cases += [(key + "_index", mount_grep(["--trust-index"], d)), (key + "_whole", mount_grep(["--no-index"], d))]
        for name, fn in cases:
            times, sent = [], []
            for _ in range(RUNS):
                fresh()
                times.append(timed(fn))
                sent.append(proxy.sent)
            res[f"gz_{name}_s"] = statistics.median(times)
            res[f"gz_{name}_bytes"] = int(statistics.median(sent))
            res[f"gz_{name}_pct"] = 100.0 * statistics.median(sent) / compressed_bytes
    finally:
        fresh()
        proxy.close()
    return res, out


def print_gzindex(r, compressed_bytes):
    print(f"\npublished gzip index ({GZ_RATE / 1e6:.0f} MB/s proxy, cold caches, "
          f"{compressed_bytes / 1e6:.0f} MB compressed): index {r['gz_index_bytes'] / 1e6:.2f} MB "
          f"= {r['gz_index_pct']:.2f}% of the layers")
    print(f"| {'measure':<41} | {'s':>7} | {'MB fetched':>10} | {'% image':>7} | {'vs whole':>8} |")
    print(f"|{'-' * 43}|{'-' * 9}|{'-' * 12}|{'-' * 9}|{'-' * 10}|")
    measures = [(f"cat {GZ_SMALL_FILE}", "cat")]
    measures += [(f"mount + grep -r /{d}", "grep_" + d.replace("/", "_")) for d in GZ_GREP_DIRS]
    for what, key in measures:
        for how in ("index", "whole"):
            s, b, pct = (r[f"gz_{key}_{how}_{k}"] for k in ("s", "bytes", "pct"))
            ratio = s / r[f"gz_{key}_whole_s"]
            label = f"{what}, {'index' if how == 'index' else '--no-index'}"
            print(f"| {label:<41} | {s:>7.2f} | {b / 1e6:>10.2f} | {pct:>6.2f}% | {ratio:>8.2f} |")
    ok = r["gz_cat_index_pct"] <= 5.0
    print(f"goal: small-file cat <= 5% of compressed bytes: {r['gz_cat_index_pct']:.2f}% "
          f"({'met' if ok else 'NOT met'})")


def gzindex_only():
    """`bench.py gzindex`: only the published-index case."""
    layers = build_layers()
    work = Path(tempfile.mkdtemp(prefix="rimg-bench-gz-"))
    reg = Registry(work)
    try:
        sh([str(ROOT / "scripts/push-image.sh"), f"127.0.0.1:{reg.port}", "bench/image", "v1", "amd64"]
           + [str(p) for p in layers], stdout=subprocess.DEVNULL)
        compressed = sum(p.stat().st_size for p in layers)
        r, report = gzindex_bench(reg.port, work, compressed)
        print(report, end="")
        print_gzindex(r, compressed)
        out = Path(os.environ.get("RIMG_BENCH_JSON", ROOT / "bench-gzindex.json"))
        out.write_text(json.dumps({"compressed_bytes": compressed, "rate": GZ_RATE, "runs": RUNS,
                                   "results": r}, indent=2) + "\n")
        print(f"\nJSON: {out}")
    finally:
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if sys.argv[1:] == ["range-lazy"]:
        main_range_lazy()
    elif sys.argv[1:] in (["read-everything"], ["idle-mounts"]):
        import bench_scan
        bench_scan.main(sys.argv[1])
    elif sys.argv[1:] == ["gzindex"]:
        gzindex_only()
    else:
        main()
