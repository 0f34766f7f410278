"""rimg benchmarks of issue 28, run through bench.py (`scripts/bench.sh
read-everything`, `scripts/bench.sh idle-mounts`, and the full run):

- read-everything: a cold mount, then every regular file hashed, serially
  and by 4 parallel readers, through the same 20 MB/s proxy as the
  range-lazy case: the image as eStargz, as zstd:chunked and as gzip with a
  published index (all read by range) against the gzip image read whole
  (`--no-index`), measured in the same run. Time is a ratio to the whole
  image's; bytes fetched a ratio to the form's own compressed layers.
- idle-mounts: N warm mounts of one image left idle; VmRSS and threads of
  each server and its helper processes (the death watcher, fusermount3's
  auto_unmount watcher), per mount."""

import hashlib
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import bench
from bench import RIMG, RUNS, ROOT, sh, timed

READERS = 4
IDLE_MOUNTS = int(os.environ.get("RIMG_BENCH_IDLE_MOUNTS", "20"))


def regular_files(root: Path):
    out = []
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            if os.path.isfile(p) and not os.path.islink(p):
                out.append(p)
    return out


def hash_files(paths):
    h = hashlib.sha256()
    for p in paths:
        try:
            with open(p, "rb") as f:
                while True:
                    b = f.read(1 << 20)
                    if not b:
                        break
                    h.update(b)
        except PermissionError:
            pass
    return h.hexdigest()


def hash_all(mnt: Path, readers: int):
    """Hashes every regular file under mnt with `readers` threads (files
    dealt round-robin); returns one digest per reader's share."""
    files = sorted(regular_files(mnt))
    if readers == 1:
        return [hash_files(files)]
    out = [None] * readers

    def work(k):
        out[k] = hash_files(files[k::readers])
    ts = [threading.Thread(target=work, args=(k,)) for k in range(readers)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return out


def read_everything(layers):
    """Cold mount + hash of every file, for each form and reader count."""
    root = bench.BENCH / "lazy-registry"
    work = Path(tempfile.mkdtemp(prefix="rimg-bench-scan-"))
    # The converted images are made (once) by the range-lazy case.
    if not (root / "converted.json").exists():
        bench.range_lazy(layers)
    reg = bench.Registry(work, root)
    addr = f"127.0.0.1:{reg.port}"
    proxy = bench.ThrottledProxy(reg.port, bench.LAZY_RATE)
    mnt = work / "mnt"
    mnt.mkdir()
    out = {}
    try:
        # A copy of the gzip image with an index published by another cache,
        # so that bench/image itself stays without one.
        sh([str(ROOT / "scripts/push-image.sh"), addr, "bench/gzi", "v1", "amd64"]
           + [str(p) for p in layers], stdout=subprocess.DEVNULL)
        env_a = dict(os.environ, RIMG_CACHE_DIR=str(work / "cache-a"))
        sh([str(RIMG), "index", "push", f"{addr}/bench/gzi:v1"], env=env_a, stdout=subprocess.DEVNULL)
        cache = work / "cache"
        env = dict(os.environ, RIMG_CACHE_DIR=str(cache))
        # The converted images carry no tar-split and the index was pushed by
        # another cache: reading them by range is on trust, which is what is
        # measured here.
        forms = [("whole", "bench/image", ["--no-index"]), ("estargz", "bench/esgz", ["--trust-toc"]),
                 ("zstd:chunked", "bench/zchunked", ["--trust-toc"]),
                 ("gzip index", "bench/gzi", ["--trust-index"])]
        only = os.environ.get("RIMG_BENCH_SCAN_FORMS")
        if only:
            forms = [f for f in forms if f[0] == "whole" or f[0] in only.split(",")]
        want = {}
        for readers in (1, READERS):
            for form, repo, flags in forms:
                times, sent = [], []
                for _ in range(RUNS):
                    subprocess.run([str(RIMG), "umount", str(mnt)], env=env, stderr=subprocess.DEVNULL)
                    shutil.rmtree(cache, ignore_errors=True)
                    proxy.reset()
                    got = {}

                    def run():
                        sh([str(RIMG), "mount", *flags, f"127.0.0.1:{proxy.port}/{repo}:v1", str(mnt)],
                           env=env, stdout=subprocess.DEVNULL)
                        got["h"] = hash_all(mnt, readers)
                    times.append(timed(run))
                    sent.append(proxy.sent)
                    key = readers
                    want.setdefault(key, got["h"])
                    if got["h"] != want[key]:
                        raise SystemExit(f"read-everything: {form} hashed other bytes than whole layers")
                subprocess.run([str(RIMG), "umount", str(mnt)], env=env, stderr=subprocess.DEVNULL)
                out[f"{form}, {readers} reader{'s' if readers > 1 else ''}"] = {
                    "form": form, "readers": readers, "s": statistics.median(times),
                    "fetched_bytes": int(statistics.median(sent)),
                    "compressed_bytes": bench.compressed_size(addr, repo)}
    finally:
        subprocess.run([str(RIMG), "umount", str(mnt)], stderr=subprocess.DEVNULL)
        proxy.close()
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)
    for r in out.values():
        whole = out[f"whole, {r['readers']} reader{'s' if r['readers'] > 1 else ''}"]
        r["vs_whole_time"] = r["s"] / whole["s"]
        r["vs_own_bytes"] = r["fetched_bytes"] / r["compressed_bytes"]
    return out


def print_read_everything(r):
    print(f"\nread everything: cold mount + sha256 of every file at {bench.LAZY_RATE / 1e6:.0f} MB/s, "
          f"median of {RUNS} (goal: <= 1.1x the whole-layer time, <= 1.05x the layers' bytes)")
    print(f"| {'form, readers':<26} | {'s':>7} | {'MB fetched':>10} | {'MB layers':>9} | "
          f"{'bytes x':>7} | {'vs whole':>8} |")
    print(f"|{'-' * 28}|{'-' * 9}|{'-' * 12}|{'-' * 11}|{'-' * 9}|{'-' * 10}|")
    for name, x in r.items():
        print(f"| {name:<26} | {x['s']:>7.2f} | {x['fetched_bytes'] / 1e6:>10.1f} | "
              f"{x['compressed_bytes'] / 1e6:>9.1f} | {x['vs_own_bytes']:>7.3f} | {x['vs_whole_time']:>8.2f} |")


def process_tree(pid: int):
    """pid and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def pss_kib(pid):
    """Proportional set size: shared pages (the executable, libc, the
    saved tree) divided among the processes mapping them."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def idle_mounts(reg_port: int, work: Path):
    """IDLE_MOUNTS warm mounts of the benchmark image, left idle: VmRSS and
    threads of every server and its helpers, per mount."""
    ref = f"127.0.0.1:{reg_port}/bench/image:v1"
    env = dict(os.environ, RIMG_CACHE_DIR=str(work / "idle-cache"))
    mnts = [work / f"idle-{i}" for i in range(IDLE_MOUNTS)]
    try:
        for m in mnts:
            m.mkdir()
        # Warm the cache (and the saved tree) once.
        sh([str(RIMG), "mount", ref, str(mnts[0])], env=env, stdout=subprocess.DEVNULL)
        os.stat(mnts[0] / "etc/os-release")
        for _ in range(300):
            if any((work / "idle-cache" / "trees").glob("*")):
                break
            time.sleep(0.1)
        sh([str(RIMG), "umount", str(mnts[0])], env=env)
        for m in mnts:
            sh([str(RIMG), "mount", ref, str(m)], env=env, stdout=subprocess.DEVNULL)
            os.stat(m / "etc/os-release")
        # Idle: blocking threads a mount started have time to retire.
        time.sleep(float(os.environ.get("RIMG_BENCH_IDLE_WAIT", "12")))
        rss, anon, pss, threads, procs = 0, 0, 0, 0, 0
        for m in mnts:
            pid = bench.serving_pid(m)
            for p in process_tree(pid) if pid else []:
                rss += bench.rss_kib(p, "VmRSS")
                anon += bench.rss_kib(p, "RssAnon")
                pss += pss_kib(p)
                threads += bench.rss_kib(p, "Threads")
                procs += 1
        n = len(mnts)
        return {"mounts": n, "rss_kib_per_mount": rss / n, "rss_anon_kib_per_mount": anon / n,
                "pss_kib_per_mount": pss / n, "threads_per_mount": threads / n,
                "processes_per_mount": procs / n}
    finally:
        for m in mnts:
            subprocess.run([str(RIMG), "umount", str(m)], env=env, stderr=subprocess.DEVNULL)


def print_idle_mounts(r):
    print(f"\n{r['mounts']} idle warm mounts of the benchmark image (goal: <= 10 MB RSS, "
          f"<= 4 threads per mount, helpers included)")
    print(f"| per mount | {r['rss_kib_per_mount'] / 1024:.1f} MiB VmRSS "
          f"({r['rss_anon_kib_per_mount'] / 1024:.1f} MiB anonymous, {r['pss_kib_per_mount'] / 1024:.1f} MiB PSS) | "
          f"{r['threads_per_mount']:.1f} threads | {r['processes_per_mount']:.1f} processes |")


def idle_mounts_only(layers):
    work = Path(tempfile.mkdtemp(prefix="rimg-bench-idle-"))
    reg = bench.Registry(work)
    try:
        sh([str(ROOT / "scripts/push-image.sh"), f"127.0.0.1:{reg.port}", "bench/image", "v1", "amd64"]
           + [str(p) for p in layers], stdout=subprocess.DEVNULL)
        return idle_mounts(reg.port, work)
    finally:
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)


def main(mode: str):
    import json
    layers = bench.build_layers()
    if mode == "read-everything":
        r = {"read_everything": read_everything(layers)}
        print_read_everything(r["read_everything"])
    else:
        r = {"idle_mounts": idle_mounts_only(layers)}
        print_idle_mounts(r["idle_mounts"])
    out = Path(os.environ.get("RIMG_BENCH_JSON", ROOT / f"bench-{mode}.json"))
    out.write_text(json.dumps(r, indent=2) + "\n")
    print(f"\nJSON: {out}")
