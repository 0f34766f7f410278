//! `rimg ls` and `rimg cat`: the merged tree (or one layer) listed and read.

use std::io::{IsTerminal, Read, Write};

use anyhow::{Context, Result, bail};

use rimg::layer::EntryKind;
use rimg::names;
use rimg::overlay::tree::NodeId;

use super::forensics::{kind_name, put_bytes};
use super::*;

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

pub fn ls(common: &Common, args: &LsArgs) -> Result<()> {
    init_logging(common.verbose);
    let rt = runtime()?;
    let source = common.open_image(&rt, &args.reference, std::io::stderr().is_terminal())?;
    let only = args.layer.map(|l| source.layer_index(l)).transpose()?;
    let (tree, _layers) = rt.block_on(source.tree(only))?;
    // Layer numbers in the listing are the image's, even for one layer.
    let layer_no = |n: u16| only.unwrap_or(n as usize);
    let start = tree
        .resolve(&args.path, !args.long)
        .with_context(|| format!("{}: {}", source.image.reference, names::escaped(&args.path)))?;
    // Names go to a pipe as the bytes they are; a terminal gets them quoted
    // as GNU ls quotes them, so no name can move the cursor or hide a byte.
    let terminal = std::io::stdout().is_terminal();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let name_out = |out: &mut dyn Write, name: &[u8]| -> std::io::Result<()> {
        if terminal {
            out.write_all(shell_quote(name).as_bytes())
        } else {
            out.write_all(name)
        }
    };
    let base = normalize_display(&args.path);
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
                _ => n.size.to_string(),
            };
            write!(
                out,
                "{} {:>5} {:>5} {:>10} {} {}:{} ",
                mode_string(n.kind, n.mode),
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
    if tree.node(start).kind != EntryKind::Dir {
        print(&mut out, &base, start)?;
        return Ok(out.flush()?);
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
    Ok(out.flush()?)
}

pub(super) fn normalize_display(path: &[u8]) -> Vec<u8> {
    let mut out = b"/".to_vec();
    out.extend_from_slice(&rimg::layer::normalize(path));
    out
}

/// A name quoted as GNU ls's default `shell-escape` style does on a
/// terminal: as it is when nothing in it needs quoting, else in single
/// quotes, with every unprintable byte as `$'\ooo'` outside them.
pub(crate) fn shell_quote(name: &[u8]) -> String {
    let plain = |b: u8| b.is_ascii_alphanumeric() || b"%+,-./:=@_^".contains(&b);
    if !name.is_empty() && name.iter().all(|&b| plain(b)) {
        return String::from_utf8_lossy(name).into_owned();
    }
    let mut out = String::new();
    let mut quoted = false;
    for chunk in name.utf8_chunks() {
        for c in chunk.valid().chars() {
            if names::unsafe_on_a_terminal(c) {
                if quoted {
                    out.push('\'');
                    quoted = false;
                }
                let mut b = [0u8; 4];
                for byte in c.encode_utf8(&mut b).bytes() {
                    out.push_str(&format!("$'\\{byte:03o}'"));
                }
                continue;
            }
            if !quoted {
                out.push('\'');
                quoted = true;
            }
            if c == '\'' {
                out.push_str("'\\''");
            } else {
                out.push(c);
            }
        }
        for byte in chunk.invalid() {
            if quoted {
                out.push('\'');
                quoted = false;
            }
            out.push_str(&format!("$'\\{byte:03o}'"));
        }
    }
    if quoted {
        out.push('\'');
    }
    out
}

/// `layer`: read from that one layer as stored (negative counts from the
/// top), which is how bytes a later layer hid are recovered.
pub fn cat(common: &Common, reference: &str, path: &[u8], layer: Option<i64>) -> Result<()> {
    init_logging(common.verbose);
    let rt = runtime()?;
    let source = common.open_image(&rt, reference, std::io::stderr().is_terminal())?;
    let only = layer.map(|l| source.layer_index(l)).transpose()?;
    let (tree, layers) = rt.block_on(source.tree(only))?;
    let image_layer = |n: u16| only.unwrap_or(n as usize);
    let what = format!("{}: {}", source.image.reference, names::escaped(path));
    let id = tree.resolve(path, true).with_context(|| what.clone())?;
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
    fn times_format_as_utc_dates() {
        assert_eq!(format_time(0), "1970-01-01 00:00");
        assert_eq!(format_time(1_700_000_000), "2023-11-14 22:13");
    }

    #[test]
    fn names_are_quoted_as_gnu_ls_quotes_them_on_a_terminal() {
        assert_eq!(shell_quote(b"plain.txt"), "plain.txt");
        assert_eq!(shell_quote(b"a b"), "'a b'");
        assert_eq!(shell_quote(b"latin1-\xe9.txt"), "'latin1-'$'\\351''.txt'");
        assert_eq!(shell_quote(b"\x1b[2J"), "$'\\033''[2J'");
        // A bidi override would reorder what follows it on the screen.
        assert_eq!(
            shell_quote("a\u{202e}b".as_bytes()),
            "'a'$'\\342'$'\\200'$'\\256''b'"
        );
    }
}
