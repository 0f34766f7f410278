//! `rimg ls` and `rimg cat`: the merged tree (or one layer) listed and read.

use std::io::{IsTerminal, Read, Write};

use anyhow::{Context, Result, bail};

use rimg::layer::EntryKind;
use rimg::names;
use rimg::overlay::tree::NodeId;

use super::forensics::{kind_name, put_bytes};
use super::*;

#[derive(clap::Args)]
pub struct LsArgs {
    /// The image (see `rimg --help` for the forms of REF).
    #[arg(value_name = "REF")]
    pub reference: String,
    /// What to list, in the image; any bytes, names need not be UTF-8.
    #[arg(default_value = "/")]
    pub paths: Vec<std::ffi::OsString>,
    /// Long form: type, mode, links, owner, size, mtime, layer, name, link target.
    #[arg(short = 'l')]
    pub long: bool,
    /// With -l, sizes as 1.5K, 23M, 4.0G (powers of 1024), as ls -h.
    #[arg(short = 'h', long)]
    pub human_readable: bool,
    /// List directories themselves, not their contents.
    #[arg(short = 'd', long)]
    pub directory: bool,
    /// Recurse into directories; every line holds the whole path, as find
    /// prints it, so no directory headers are needed.
    #[arg(short = 'R', long)]
    pub recursive: bool,
    /// Accepted for ls's habit: names starting with `.` are always listed.
    #[arg(short = 'a', long, visible_short_alias = 'A')]
    pub all: bool,
    /// Accepted for ls's habit: the listing is always one name per line.
    #[arg(short = '1')]
    pub one_per_line: bool,
    /// Print help (-h is --human-readable here, as in ls).
    #[arg(long, action = clap::ArgAction::Help)]
    pub help: Option<bool>,
    /// List one layer as stored, whiteouts included (negative counts from the top).
    #[arg(long, allow_hyphen_values = true, value_name = "N")]
    pub layer: Option<i64>,
    /// One JSON object per entry and line (the fields of `-l`).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub log: Verbosity,
    #[command(flatten)]
    pub common: Common,
}

#[derive(clap::Args)]
pub struct CatArgs {
    /// The image (see `rimg --help` for the forms of REF).
    #[arg(value_name = "REF")]
    pub reference: String,
    /// The file, in the image; any bytes, names need not be UTF-8.
    pub path: std::ffi::OsString,
    /// Read from one layer as stored, e.g. a file a later layer deleted
    /// (negative counts from the top).
    #[arg(long, allow_hyphen_values = true, value_name = "N")]
    pub layer: Option<i64>,
    #[command(flatten)]
    pub log: Verbosity,
    #[command(flatten)]
    pub common: Common,
}

pub(super) fn mode_string(kind: EntryKind, mode: u32) -> String {
    let t = match kind {
        EntryKind::Dir => 'd',
        EntryKind::Symlink => 'l',
        EntryKind::Char => 'c',
        EntryKind::Block => 'b',
        EntryKind::Fifo => 'p',
        _ => '-',
    };
    let mut s = String::with_capacity(10);
    s.push(t);
    let bits = [
        (0o400, 'r'),
        (0o200, 'w'),
        (0o100, 'x'),
        (0o040, 'r'),
        (0o020, 'w'),
        (0o010, 'x'),
        (0o004, 'r'),
        (0o002, 'w'),
        (0o001, 'x'),
    ];
    for (i, (bit, c)) in bits.iter().enumerate() {
        let set = mode & bit != 0;
        let special = match i {
            2 => mode & 0o4000 != 0,
            5 => mode & 0o2000 != 0,
            8 => mode & 0o1000 != 0,
            _ => false,
        };
        s.push(match (set, special) {
            (true, false) => *c,
            (false, false) => '-',
            (true, true) => {
                if i == 8 {
                    't'
                } else {
                    's'
                }
            }
            (false, true) => {
                if i == 8 {
                    'T'
                } else {
                    'S'
                }
            }
        });
    }
    s
}

pub(super) fn format_time(secs: i64) -> String {
    // Civil-from-days (Howard Hinnant), so no date crate is needed for one column.
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60
    )
}

pub fn ls(args: &LsArgs) -> Result<()> {
    init_logging(args.log.verbose);
    let common = &args.common;
    let rt = runtime()?;
    let source = common.open_image(&rt, &args.reference, std::io::stderr().is_terminal())?;
    let only = args.layer.map(|l| source.layer_index(l)).transpose()?;
    let (tree, _layers) = rt.block_on(source.tree(only))?;
    // Layer numbers in the listing are the image's, even for one layer.
    let layer_no = |n: u16| only.unwrap_or(n as usize);
    // Names go to a pipe as the bytes they are; a terminal gets them quoted
    // as GNU ls quotes them, so no name can move the cursor or hide a byte.
    let names = Names::new();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let name_out = |out: &mut dyn Write, name: &[u8]| names.write(out, name);
    let print = |out: &mut dyn Write, path: &[u8], id: NodeId| -> std::io::Result<()> {
        let n = tree.node(id);
        if args.json {
            let layer = layer_no(n.layer);
            let mut o = serde_json::Map::new();
            put_bytes(&mut o, "path", path);
            o.insert("type".into(), kind_name(n.kind).into());
            o.insert("mode".into(), format!("{:04o}", n.mode).into());
            o.insert("uid".into(), n.uid.into());
            o.insert("gid".into(), n.gid.into());
            o.insert("size".into(), n.size.into());
            o.insert("mtime".into(), n.mtime.into());
            o.insert("layer".into(), layer.into());
            let digest = source.image.layers[layer].digest.to_string();
            o.insert("digest".into(), digest.into());
            if let Some(l) = &n.link {
                put_bytes(&mut o, "target", l);
            }
            if matches!(n.kind, EntryKind::Char | EntryKind::Block) {
                o.insert("major".into(), n.rdev.0.into());
                o.insert("minor".into(), n.rdev.1.into());
            }
            return writeln!(out, "{}", serde_json::Value::Object(o));
        }
        if args.long {
            let layer = &source.image.layers[layer_no(n.layer)];
            let size = match n.kind {
                EntryKind::Char | EntryKind::Block => format!("{},{}", n.rdev.0, n.rdev.1),
                _ if args.human_readable => human_size(n.size),
                _ => n.size.to_string(),
            };
            // A directory's links: its entry, its `.`, each subdirectory's `..`.
            let links = match n.kind {
                EntryKind::Dir => {
                    2 + tree
                        .children(id)
                        .filter(|(_, c)| tree.node(*c).kind == EntryKind::Dir)
                        .count() as u64
                }
                _ => u64::from(n.nlink.max(1)),
            };
            write!(
                out,
                "{} {:>3} {:>5} {:>5} {:>10} {} {}:{} ",
                mode_string(n.kind, n.mode),
                links,
                n.uid,
                n.gid,
                size,
                format_time(n.mtime),
                layer_no(n.layer),
                layer.digest.short(),
            )?;
            name_out(out, path)?;
            if let Some(l) = &n.link {
                let arrow = if n.kind == EntryKind::Symlink {
                    "->"
                } else {
                    "=>"
                };
                write!(out, " {arrow} ")?;
                name_out(out, l)?;
            }
            writeln!(out)
        } else {
            name_out(out, path)?;
            writeln!(out)
        }
    };
    for arg in &args.paths {
        let arg = arg.as_bytes();
        let start = tree
            .resolve(arg, !args.long && !args.directory)
            // The error names the path; the context, the image (or layer).
            .with_context(|| within(&source.image.reference, only))?;
        let base = normalize_display(arg);
        if args.directory || tree.node(start).kind != EntryKind::Dir {
            print(&mut out, &base, start)?;
            continue;
        }
        let mut stack = vec![(base, start)];
        while let Some((dir, id)) = stack.pop() {
            let mut subdirs = Vec::new();
            for (name, child) in tree.children(id) {
                let mut path = dir.clone();
                if path != b"/" {
                    path.push(b'/');
                }
                path.extend_from_slice(name);
                print(&mut out, &path, child)?;
                if args.recursive && tree.node(child).kind == EntryKind::Dir {
                    subdirs.push((path, child));
                }
            }
            stack.extend(subdirs.into_iter().rev());
        }
    }
    Ok(out.flush()?)
}

/// A size as `ls -h` prints it: bytes below 1024, else one decimal below
/// 10 and none above, rounded up, in K, M, G, T, P, E (powers of 1024).
pub(super) fn human_size(bytes: u64) -> String {
    if bytes < 1024 {
        return bytes.to_string();
    }
    let mut v = bytes as f64;
    for unit in ["K", "M", "G", "T", "P", "E"] {
        v /= 1024.0;
        let tenths = (v * 10.0).ceil() / 10.0;
        if tenths < 10.0 {
            return format!("{tenths:.1}{unit}");
        }
        let whole = v.ceil();
        if whole < 1024.0 || unit == "E" {
            return format!("{whole:.0}{unit}");
        }
    }
    unreachable!("the loop returns at E")
}

/// What a path was looked up in: the image, or one layer of it.
fn within(reference: &impl std::fmt::Display, layer: Option<usize>) -> String {
    match layer {
        Some(l) => format!("{reference}, layer {l}"),
        None => reference.to_string(),
    }
}

pub(super) fn normalize_display(path: &[u8]) -> Vec<u8> {
    let mut out = b"/".to_vec();
    out.extend_from_slice(&rimg::layer::normalize(path));
    out
}

/// `layer`: read from that one layer as stored (negative counts from the
/// top), which is how bytes a later layer hid are recovered.
pub fn cat(args: &CatArgs) -> Result<()> {
    init_logging(args.log.verbose);
    let (common, reference, path, layer) = (
        &args.common,
        &args.reference,
        args.path.as_bytes(),
        args.layer,
    );
    let rt = runtime()?;
    let source = common.open_image(&rt, reference, std::io::stderr().is_terminal())?;
    let only = layer.map(|l| source.layer_index(l)).transpose()?;
    let (tree, layers) = rt.block_on(source.tree(only))?;
    let image_layer = |n: u16| only.unwrap_or(n as usize);
    let what = format!("{}: {}", source.image.reference, names::escaped(path));
    let id = tree
        .resolve(path, true)
        .with_context(|| within(&source.image.reference, only))?;
    let n = tree.node(id);
    if n.kind != EntryKind::File {
        bail!("{what}: not a regular file");
    }
    let mut data = rimg::image::FileData::of(&layers, n);
    let digest = &source.image.layers[image_layer(n.layer)].digest;
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < n.size {
        let got = data
            .read(&mut buf)
            .with_context(|| format!("{what}: reading layer {digest}"))?;
        if got == 0 {
            bail!("{what}: layer {digest} ends before the file does");
        }
        out.write_all(&buf[..got])?;
        done += got as u64;
    }
    Ok(out.flush()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_strings_show_type_and_special_bits() {
        assert_eq!(mode_string(EntryKind::Dir, 0o755), "drwxr-xr-x");
        assert_eq!(mode_string(EntryKind::File, 0o4755), "-rwsr-xr-x");
        assert_eq!(mode_string(EntryKind::Dir, 0o1777), "drwxrwxrwt");
        assert_eq!(mode_string(EntryKind::File, 0o2644), "-rw-r-Sr--");
    }

    #[test]
    fn human_sizes_round_up_as_ls_h_does() {
        assert_eq!(human_size(0), "0");
        assert_eq!(human_size(1023), "1023");
        assert_eq!(human_size(1024), "1.0K");
        assert_eq!(human_size(1025), "1.1K");
        assert_eq!(human_size(10 * 1024), "10K");
        assert_eq!(human_size(10 * 1024 + 1), "11K");
        assert_eq!(human_size(1024 * 1024 - 1), "1.0M");
        assert_eq!(human_size(5 << 30), "5.0G");
    }

    #[test]
    fn times_format_as_utc_dates() {
        assert_eq!(format_time(0), "1970-01-01 00:00");
        assert_eq!(format_time(1_700_000_000), "2023-11-14 22:13");
    }
}
