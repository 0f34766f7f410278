//! `rimg mount` as a plain user on a stock system: /dev/fuse mode 0666, the
//! packaged /etc/fuse.conf (no `user_allow_other`), nothing configured. Each
//! test creates its users, runs rimg and readers as them, and puts /dev/fuse
//! and fuse.conf back as they were, also when it fails.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::Duration;

use common::image::push_alpine;
use common::listing::tree_listing;
use common::*;

/// The tests change machine-wide settings; one at a time.
static MACHINE: Mutex<()> = Mutex::new(());

/// /dev/fuse at 0666 and fuse.conf without `user_allow_other`, as Debian 12
/// ships them, for as long as it lives; restored on drop (and so on panic).
struct StockFuse {
    dev_mode: u32,
    conf: Option<Vec<u8>>,
    _lock: std::sync::MutexGuard<'static, ()>,
}

const FUSE_CONF: &str = "/etc/fuse.conf";

impl StockFuse {
    fn new() -> StockFuse {
        let lock = MACHINE.lock().unwrap_or_else(|e| e.into_inner());
        let dev_mode = std::fs::metadata("/dev/fuse").unwrap().mode() & 0o7777;
        let original = std::fs::read(FUSE_CONF).ok();
        let mut guard = StockFuse {
            dev_mode,
            conf: None,
            _lock: lock,
        };
        std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(0o666)).unwrap();
        let allows = original.as_deref().is_some_and(|c| {
            String::from_utf8_lossy(c)
                .lines()
                .any(|l| l.trim() == "user_allow_other")
        });
        if allows {
            // Comment it out, as the package ships it; the original goes back on drop.
            guard.conf = original.clone();
            let stock: String = String::from_utf8_lossy(original.as_deref().unwrap())
                .lines()
                .map(|l| {
                    if l.trim() == "user_allow_other" {
                        "#user_allow_other\n".to_string()
                    } else {
                        format!("{l}\n")
                    }
                })
                .collect();
            std::fs::write(FUSE_CONF, stock).unwrap();
        }
        guard
    }
}

impl Drop for StockFuse {
    fn drop(&mut self) {
        let _ =
            std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(self.dev_mode));
        if let Some(c) = &self.conf {
            let _ = std::fs::write(FUSE_CONF, c);
        }
    }
}

/// A local system user, created if missing.
#[derive(Clone)]
struct User {
    name: String,
    uid: u32,
    gid: u32,
}

impl User {
    fn get(name: &str) -> User {
        let id = |flag: &str| {
            Command::new("id")
                .args([flag, name])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .trim()
                        .parse::<u32>()
                        .unwrap()
                })
        };
        if id("-u").is_none() {
            // A concurrent test process may win the race; `id` decides below.
            let _ = Command::new("useradd")
                .args(["--system", "--user-group", "--no-create-home"])
                .args(["--shell", "/usr/sbin/nologin", name])
                .status();
        }
        User {
            name: name.into(),
            uid: id("-u").expect("useradd"),
            gid: id("-g").unwrap(),
        }
    }

    /// `program args` as this user (no supplementary groups), from `/`,
    /// killed after 60 s so a hang fails the test.
    fn command(&self, program: &Path, args: &[&str]) -> Command {
        let mut c = Command::new("timeout");
        c.arg("60")
            .arg(program)
            .args(args)
            .current_dir("/")
            .uid(self.uid)
            .gid(self.gid);
        c
    }

    fn sh(&self, script: &str) -> Output {
        self.command(Path::new("/bin/sh"), &["-c", script])
            .env_clear()
            .env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin")
            .output()
            .unwrap()
    }
}

/// The rimg binary where `user` can run it: under target/ if every directory
/// on the way is traversable by others, else a copy in a temp dir.
fn rimg_for_users() -> (Option<tempfile::TempDir>, PathBuf) {
    let bin = rimg_bin();
    let reachable = bin
        .ancestors()
        .skip(1)
        .all(|d| std::fs::metadata(d).is_ok_and(|m| m.mode() & 0o001 != 0))
        && std::fs::metadata(&bin).is_ok_and(|m| m.mode() & 0o005 == 0o005);
    if reachable {
        return (None, bin);
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let copy = dir.path().join("rimg");
    std::fs::copy(&bin, &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    (Some(dir), copy)
}

/// A user's own rimg environment (cache, state, home) and a mount point, all
/// owned by that user under a directory others may traverse.
struct UserEnv {
    user: User,
    env: Env,
    bin: PathBuf,
    _bin_dir: Option<tempfile::TempDir>,
    mnt: PathBuf,
}

impl UserEnv {
    fn new(user: &User) -> UserEnv {
        let env = Env::new();
        let (bin_dir, bin) = rimg_for_users();
        for sub in ["cache", "state", "home", "run", "docker", "mnt"] {
            std::fs::create_dir_all(env.dir.path().join(sub)).unwrap();
        }
        let status = Command::new("chown")
            .arg("-R")
            .arg(format!("{}:{}", user.uid, user.gid))
            .arg(env.dir.path())
            .status()
            .unwrap();
        assert!(status.success());
        std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(
            env.dir.path().join("mnt"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let mnt = env.dir.path().join("mnt");
        UserEnv {
            user: user.clone(),
            env,
            bin,
            _bin_dir: bin_dir,
            mnt,
        }
    }

    fn rimg(&self, args: &[&str]) -> Output {
        let mut c = self.user.command(&self.bin, args);
        c.env_clear().env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin");
        for (k, v) in &self.env.vars {
            c.env(k, v);
        }
        c.output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.rimg(args);
        assert!(
            out.status.success(),
            "rimg {args:?} as {} failed: {}",
            self.user.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn mnt(&self) -> &str {
        self.mnt.to_str().unwrap()
    }

    /// The server's pid, from `rimg mounts`.
    fn server_pid(&self) -> i32 {
        let out = self.ok(&["mounts"]);
        let line = out
            .lines()
            .find(|l| l.ends_with(self.mnt()))
            .unwrap_or_else(|| panic!("not listed: {out}"));
        line.split_whitespace()
            .rev()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap()
    }
}

impl Drop for UserEnv {
    fn drop(&mut self) {
        if is_mountpoint(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

fn mount_options(mnt: &Path) -> String {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let p = mnt.display().to_string();
    info.lines()
        .find(|l| l.split(' ').nth(4) == Some(p.as_str()))
        .unwrap_or_else(|| panic!("{p} is not mounted"))
        .to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_plain_user_mounts_reads_lists_and_unmounts_with_stock_fuse_conf() {
    let reg = Registry::start(Auth::None);
    push_alpine(&reg, "library/alpine", "3.10", "3.10.9", "amd64", false);
    let _stock = StockFuse::new();
    let u = UserEnv::new(&User::get("rimgtest-a"));
    let r = format!("{}/library/alpine:3.10", reg.addr());

    u.ok(&["mount", &r, u.mnt()]);
    let line = mount_options(&u.mnt);
    assert!(
        !line.contains("allow_other") && line.contains(&format!("user_id={}", u.user.uid)),
        "a private mount owned by the user: {line}"
    );
    let out = u.user.sh(&format!("cat {}/etc/os-release", u.mnt()));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("VERSION_ID=3.10.9"),
        "{}",
        stderr(&out)
    );
    let listed = u.ok(&["mounts"]);
    assert!(
        listed.contains(u.mnt()) && listed.contains("live") && listed.contains("alpine:3.10"),
        "{listed}"
    );
    u.ok(&["umount", u.mnt()]);
    assert!(!is_mountpoint(&u.mnt));
    assert!(!u.ok(&["mounts"]).contains(u.mnt()));

    u.ok(&["mount", &r, u.mnt()]);
    let out = u
        .user
        .command(Path::new("fusermount3"), &["-u", u.mnt()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(wait_for(Duration::from_secs(10), || !is_mountpoint(&u.mnt)));

    // SIGTERM: the server unmounts (through fusermount3, being unprivileged).
    u.ok(&["mount", &r, u.mnt()]);
    unsafe { libc::kill(u.server_pid(), libc::SIGTERM) };
    assert!(wait_for(Duration::from_secs(10), || !is_mountpoint(&u.mnt)));

    // Sharing needs user_allow_other, which the stock fuse.conf lacks: one
    // clear line, and nothing mounted.
    let out = u.rimg(&["mount", "--allow-other", &r, u.mnt()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.trim().lines().count() == 1 && err.contains("user_allow_other"),
        "{err}"
    );
    assert!(!is_mountpoint(&u.mnt));
}

/// Children of `pid` by command name, from /proc.
fn children_named(pid: i32, comm: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|st| {
                // pid (comm) state ppid ...
                let (head, tail) = st.rsplit_once(')').unwrap_or_default();
                head.ends_with(&format!("({comm}"))
                    && tail.split_whitespace().nth(1) == Some(pid.to_string().as_str())
            })
        })
        .collect()
}

/// Kills `pid` and waits until it is gone (or a zombie its parent has yet to reap).
fn kill_9(pid: i32) {
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(wait_for(Duration::from_secs(10), || {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |st| {
            st.rsplit_once(") ")
                .is_some_and(|(_, t)| t.starts_with('Z'))
        })
    }));
}

#[test]
fn kill_9_of_a_plain_users_server_leaves_no_mount_behind() {
    let reg = Registry::start(Auth::None);
    push_alpine(&reg, "a", "1", "3.10.9", "amd64", false);
    let _stock = StockFuse::new();
    let u = UserEnv::new(&User::get("rimgtest-a"));
    let r = format!("{}/a:1", reg.addr());
    u.ok(&["mount", &r, u.mnt()]);
    assert!(u.user.sh(&format!("ls {}/etc", u.mnt())).status.success());
    // Killed by the user who mounted it.
    let pid = u.server_pid();
    assert!(u.user.sh(&format!("kill -9 {pid}")).status.success());
    kill_9(pid);
    assert!(
        wait_for(Duration::from_secs(10), || !is_mountpoint(&u.mnt)),
        "unmounted once the server is gone"
    );
    let out = u.user.sh(&format!("ls {}", u.mnt()));
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_dead_mount_is_listed_dead_and_cleared_by_umount_or_a_new_mount() {
    let reg = Registry::start(Auth::None);
    push_alpine(&reg, "a", "1", "3.10.9", "amd64", false);
    let _stock = StockFuse::new();
    let u = UserEnv::new(&User::get("rimgtest-a"));
    let r = format!("{}/a:1", reg.addr());
    let ls = |u: &UserEnv| u.user.sh(&format!("ls {}/etc", u.mnt()));

    for clear_with_mount in [false, true] {
        u.ok(&["mount", &r, u.mnt()]);
        assert!(ls(&u).status.success());
        // Server and its watcher both gone, as when a whole session is killed.
        let pid = u.server_pid();
        let watchers = children_named(pid, "sh");
        assert_eq!(watchers.len(), 1, "one watcher");
        kill_9(watchers[0]);
        kill_9(pid);
        // Nothing else unmounts it (no auto_unmount): it stays, dead.
        std::thread::sleep(Duration::from_millis(500));
        if is_mountpoint(&u.mnt) {
            eprintln!("kill -9 of the server and its watcher left a dead mount");
            let listed = u.ok(&["mounts"]);
            let line = listed
                .lines()
                .find(|l| l.ends_with(u.mnt()))
                .unwrap_or_else(|| panic!("{listed}"));
            assert!(line.contains(" dead "), "{line}");
            if clear_with_mount {
                let out = u.rimg(&["mount", &r, u.mnt()]);
                assert!(out.status.success(), "{}", stderr(&out));
                assert!(stderr(&out).contains("dead"), "{}", stderr(&out));
                let out = ls(&u);
                assert!(out.status.success(), "{}", stderr(&out));
                u.ok(&["umount", u.mnt()]);
            } else {
                u.ok(&["umount", u.mnt()]);
            }
        }
        assert!(!is_mountpoint(&u.mnt));
        let out = u.user.sh(&format!("ls {}", u.mnt()));
        assert!(out.status.success(), "{}", stderr(&out));
    }
}

#[test]
fn a_mount_made_without_allow_other_stays_private_whatever_the_caches_hold() {
    let reg = Registry::start(Auth::None);
    push_alpine(&reg, "a", "1", "3.10.9", "amd64", false);
    let _stock = StockFuse::new();
    let b = User::get("rimgtest-b");
    let r = format!("{}/a:1", reg.addr());
    let refused = |user: &User, mnt: &Path| {
        for cmd in ["cat", "ls", "stat", "readlink -v"] {
            let target = if cmd == "ls" {
                "etc"
            } else if cmd == "readlink -v" {
                "bin/sh"
            } else {
                "etc/os-release"
            };
            let out = user.sh(&format!("{cmd} {}/{target}", mnt.display()));
            assert!(
                !out.status.success() && stderr(&out).contains("Permission denied"),
                "{cmd} as {} must be refused: {}{}",
                user.name,
                String::from_utf8_lossy(&out.stdout),
                stderr(&out)
            );
        }
    };

    // Root's mount: root fills every cache, the other user still gets nothing.
    let env = Env::new();
    let m = Mounted::new(&env, &r, &[]);
    std::fs::set_permissions(
        m.path.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    refused(&b, &m.path);
    assert!(std::fs::read_to_string(m.path.join("etc/os-release")).is_ok());
    std::fs::read_link(m.path.join("bin/sh")).unwrap();
    tree_listing(&m.path.join("etc"));
    refused(&b, &m.path);
    drop(m);

    // A plain user's mount: the same for another user.
    let a = UserEnv::new(&User::get("rimgtest-a"));
    a.ok(&["mount", &r, a.mnt()]);
    let out = a.user.sh(&format!(
        "cat {m}/etc/os-release && ls -R {m}/etc && readlink {m}/bin/sh",
        m = a.mnt()
    ));
    assert!(out.status.success(), "{}", stderr(&out));
    refused(&b, &a.mnt);

    // Shared on purpose: then everyone reads.
    let env = Env::new();
    let m = Mounted::new(&env, &r, &["--allow-other"]);
    std::fs::set_permissions(
        m.path.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let out = b.sh(&format!("cat {}/etc/os-release", m.path.display()));
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Another local user (issue 25): two users, one planting, one running
/// rimg; the tests that plant in their shared places take turns.
fn victim_and_mallory() -> (User, User, std::sync::MutexGuard<'static, ()>) {
    static PLANTING: Mutex<()> = Mutex::new(());
    let turn = PLANTING.lock().unwrap_or_else(|e| e.into_inner());
    (User::get("rimg-victim"), User::get("rimg-mallory"), turn)
}

/// `rimg args` as `env`'s user with only the variables a cron job or `su`
/// session has: no `XDG_RUNTIME_DIR`, no `RIMG_STATE_DIR`.
fn rimg_bare(env: &UserEnv, cache: &Path, args: &[&str]) -> Output {
    env.user
        .command(&env.bin, args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin")
        .env("HOME", env.env.dir.path().join("home"))
        .env("RIMG_CACHE_DIR", cache)
        .output()
        .unwrap()
}

/// Every file under `dir` with its bytes, symlinks as their targets.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.file_type().is_symlink() {
                let t = std::fs::read_link(&p).unwrap();
                out.push((p, t.into_os_string().into_encoded_bytes()));
            } else if meta.is_dir() {
                out.push((p.clone(), Vec::new()));
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// `/tmp/rimg-<uid>`, removed now and when dropped.
struct TmpStateDir(PathBuf);

impl TmpStateDir {
    fn of(user: &User) -> TmpStateDir {
        let d = PathBuf::from(format!("/tmp/rimg-{}", user.uid));
        let _ = Command::new("rm").arg("-rf").arg(&d).status();
        TmpStateDir(d)
    }
}

impl Drop for TmpStateDir {
    fn drop(&mut self) {
        let _ = Command::new("rm").arg("-rf").arg(&self.0).status();
    }
}

#[test]
fn a_state_directory_another_user_planted_in_tmp_is_refused_and_nothing_is_written_through_it() {
    let (victim, mallory, _turn) = victim_and_mallory();
    let env = UserEnv::new(&victim);
    let cache = env.env.dir.path().join("cache");
    let state = TmpStateDir::of(&victim);
    // The victim's own file, which a record written through a link would overwrite.
    let secret = env.env.dir.path().join("home/secret");
    assert!(
        victim
            .sh(&format!("umask 077; echo keep > {}", secret.display()))
            .status
            .success()
    );
    let hash = &common::image::sha256(env.mnt().as_bytes())[7..23];
    let planted = mallory.sh(&format!(
        "mkdir -m 777 {d} {d}/mounts && ln -s {s} {d}/mounts/{hash}.json && ln -s {s} {d}/mounts/{hash}.tmp",
        d = state.0.display(),
        s = secret.display()
    ));
    assert!(planted.status.success(), "{}", stderr(&planted));
    let before = snapshot(&state.0);
    let out = rimg_bare(
        &env,
        &cache,
        &["mount", "docker-archive:/nonexistent.tar", env.mnt()],
    );
    let err = stderr(&out);
    assert!(!out.status.success());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains(&state.0.display().to_string()) && err.contains("refused"),
        "{err}"
    );
    assert_eq!(std::fs::read(&secret).unwrap(), b"keep\n");
    assert_eq!(
        snapshot(&state.0),
        before,
        "nothing written in the planted directory"
    );

    // A symlink in its place, to a directory of the victim's own: refused too.
    let _ = Command::new("rm").arg("-rf").arg(&state.0).status();
    let home = env.env.dir.path().join("home");
    assert!(
        mallory
            .sh(&format!("ln -s {} {}", home.display(), state.0.display()))
            .status
            .success()
    );
    let home_before = snapshot(&home);
    let out = rimg_bare(&env, &cache, &["mounts"]);
    let out2 = rimg_bare(
        &env,
        &cache,
        &["mount", "docker-archive:/nonexistent.tar", env.mnt()],
    );
    assert!(!out2.status.success());
    assert!(stderr(&out2).contains("symlink"), "{}", stderr(&out2));
    assert!(
        out.status.success(),
        "listing still works: {}",
        stderr(&out)
    );
    assert_eq!(snapshot(&home), home_before);

    // Nobody's first: rimg makes it, the victim's and 0700 (the mount then
    // fails for want of the archive).
    let _ = std::fs::remove_file(&state.0);
    let out = rimg_bare(
        &env,
        &cache,
        &["mount", "docker-archive:/nonexistent.tar", env.mnt()],
    );
    assert!(stderr(&out).contains("nonexistent.tar"), "{}", stderr(&out));
    for d in [state.0.clone(), state.0.join("mounts")] {
        let m = std::fs::symlink_metadata(&d).unwrap();
        assert_eq!(
            (m.uid(), m.mode() & 0o7777),
            (victim.uid, 0o700),
            "{}",
            d.display()
        );
    }
}

#[test]
fn a_cache_another_user_can_write_or_links_to_is_refused_naming_it() {
    let (victim, mallory, _turn) = victim_and_mallory();
    let env = UserEnv::new(&victim);
    // A shared sticky directory, as /tmp is.
    let shared = tempfile::tempdir().unwrap();
    std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let m = shared.path().join("m");
    let link = shared.path().join("link");
    let planted = mallory.sh(&format!(
        "mkdir -m 777 {m} {m}/cache && ln -s {own} {link}",
        m = m.display(),
        link = link.display(),
        own = env.env.dir.path().join("cache").display()
    ));
    assert!(planted.status.success(), "{}", stderr(&planted));
    let before = snapshot(&m);
    for (cache, why) in [
        (m.join("cache"), "owned by uid"),
        (m.join("new"), "owned by uid"),
        (link.clone(), "symlink"),
    ] {
        let out = rimg_bare(&env, &cache, &["cache", "ls"]);
        let err = stderr(&out);
        assert!(!out.status.success(), "{}", cache.display());
        assert!(err.contains("refused") && err.contains(why), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    assert_eq!(
        snapshot(&m),
        before,
        "nothing made in another user's directory"
    );
    assert!(
        std::fs::read_dir(env.env.dir.path().join("cache"))
            .unwrap()
            .next()
            .is_none(),
        "nothing made through the link"
    );
}

/// A docker archive (uncompressed layer, so it qualifies for reading in
/// place) holding `bin/app` with `content`, tagged `docker.io/gzi/app:latest`.
fn app_archive(content: &[u8]) -> Vec<u8> {
    let layer = common::image::LayerBuilder::new()
        .dir("bin", 0o755)
        .file("bin/app", content, 0o755)
        .finish();
    let diff_id = common::image::sha256(&layer);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }))
    .unwrap();
    let config_name = format!("{}.json", &common::image::sha256(&config)[7..]);
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": config_name,
        "RepoTags": ["docker.io/gzi/app:latest"],
        "Layers": ["l/layer.tar"],
    }]))
    .unwrap();
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in [
        ("manifest.json", &manifest),
        (config_name.as_str(), &config),
        ("l/layer.tar", &layer),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

#[test]
fn an_archive_another_user_rewrites_under_a_mount_never_changes_the_served_bytes() {
    let (_, mallory, _turn) = victim_and_mallory();
    let original = b"#!/bin/sh\necho hello from the image\n".repeat(200);
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let tar = dir.path().join("app.tar");
    let bytes = app_archive(&original);
    std::fs::write(&tar, &bytes).unwrap();
    let chown = Command::new("chown")
        .arg(format!("{}:{}", mallory.uid, mallory.gid))
        .arg(&tar)
        .status()
        .unwrap();
    assert!(chown.success());
    let env = Env::new().set("RIMG_LOG", "rimg=info");
    let src = format!("docker-archive:{}", tar.display());
    let m = Mounted::new(&env, &src, &[]);
    let app = m.path.join("bin/app");
    assert_eq!(std::fs::read(&app).unwrap(), original);
    // The source is the file, the tag only a detail, in rimg mounts and the kernel's table.
    let listed = env.ok(&["mounts"]);
    let line = listed
        .lines()
        .find(|l| l.ends_with(m.path.to_str().unwrap()))
        .unwrap_or_else(|| panic!("{listed}"));
    assert!(
        line.starts_with(&format!("{src} (docker.io/gzi/app:latest)")),
        "{line}"
    );
    let proc_mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let kernel = proc_mounts
        .lines()
        .find(|l| l.split(' ').nth(1) == m.path.to_str())
        .unwrap();
    assert!(kernel.starts_with(&format!("{src} ")), "{kernel}");

    // The owner rewrites the file's bytes in the archive, in place.
    let at = bytes
        .windows(original.len())
        .position(|w| w == original)
        .unwrap();
    let rewrite = mallory.sh(&format!(
        "printf '#!/bin/sh\\nrm -rf /  ' | dd of={} bs=1 seek={at} conv=notrunc status=none",
        tar.display()
    ));
    assert!(rewrite.status.success(), "{}", stderr(&rewrite));
    assert_ne!(std::fs::read(&tar).unwrap(), bytes);
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    match std::fs::read(&app) {
        Ok(got) => assert_eq!(got, original, "changed bytes served"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
    }
    // It was copied into the cache, not indexed in place, and the log says why.
    let copied = std::fs::read_dir(env.cache_dir().join("layers/sha256")).unwrap();
    assert!(
        copied
            .flatten()
            .any(|e| e.path().extension() == Some("tar".as_ref()))
    );
    assert!(!env.cache_dir().join("inplace").exists());
    let log_dir = env.cache_dir().join("logs");
    let logs: String = std::fs::read_dir(&log_dir)
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap_or_default())
        .collect();
    assert!(logs.contains("instead of reading it in place"), "{logs}");
}
