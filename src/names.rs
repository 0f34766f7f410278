//! File names as the bytes an image stores, and the one way rimg prints them.
//!
//! Linux and tar allow any bytes but `/` and NUL in a name, so names are
//! `[u8]` from the tar reader to the FUSE reply and the exported tar; nothing
//! converts them lossily. For text (errors, logs, terminals) [`Escaped`]
//! writes a lossless escape: valid UTF-8 stays as it is, except control
//! characters and backslash, and every other byte becomes `\xNN`. So the
//! printed form names exactly one byte string, and escape sequences in a
//! hostile name never reach a terminal.

use std::fmt;

/// Displays a byte string with control characters, backslashes and invalid
/// UTF-8 escaped (`\n`, `\t`, `\\`, `\xNN`, `\u{NNNN}`).
pub struct Escaped<'a>(pub &'a [u8]);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for chunk in self.0.utf8_chunks() {
            for c in chunk.valid().chars() {
                match c {
                    '\\' => f.write_str("\\\\")?,
                    '\n' => f.write_str("\\n")?,
                    '\t' => f.write_str("\\t")?,
                    '\r' => f.write_str("\\r")?,
                    c if (c as u32) < 0x20 || c == '\x7f' => write!(f, "\\x{:02x}", c as u32)?,
                    c if unsafe_on_a_terminal(c) => write!(f, "\\u{{{:04x}}}", c as u32)?,
                    c => fmt::Write::write_char(f, c)?,
                }
            }
            for b in chunk.invalid() {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// Whether a character moves the cursor or reorders or hides text on a
/// terminal: controls (C0, DEL, C1), bidi overrides and isolates, and the
/// invisible format characters.
pub fn unsafe_on_a_terminal(c: char) -> bool {
    c.is_control()
        || ('\u{202a}'..='\u{202e}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
        || ('\u{200b}'..='\u{200f}').contains(&c)
        || c == '\u{feff}'
}

/// Text (an error line, a server's words) made safe for a terminal: every
/// character [`unsafe_on_a_terminal`] is written as Rust escapes it
/// (`\n`, `\u{1b}`), the rest as it is. Unlike [`Escaped`], backslashes
/// stay: the text may already hold names escaped once.
pub fn escaped_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if unsafe_on_a_terminal(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A name quoted as GNU ls's default `shell-escape` style does on a
/// terminal: as it is when nothing in it needs quoting, else in single
/// quotes, with every unprintable byte as `$'\ooo'` outside them.
pub fn shell_quoted(name: &[u8]) -> String {
    let plain = |b: u8| b.is_ascii_alphanumeric() || b"%+,-./:=@_^".contains(&b);
    if !name.is_empty() && name.iter().all(|&b| plain(b)) {
        return String::from_utf8_lossy(name).into_owned();
    }
    let mut out = String::new();
    let mut quoted = false;
    for chunk in name.utf8_chunks() {
        for c in chunk.valid().chars() {
            if unsafe_on_a_terminal(c) {
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

/// Shorthand for `Escaped(bytes)`.
pub fn escaped(bytes: &[u8]) -> Escaped<'_> {
    Escaped(bytes)
}

/// `dir/name`, or `name` at the root.
pub fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    if dir.is_empty() {
        return name.to_vec();
    }
    let mut p = Vec::with_capacity(dir.len() + 1 + name.len());
    p.extend_from_slice(dir);
    p.push(b'/');
    p.extend_from_slice(name);
    p
}

/// `(dir, name)` of a normalised path; the dir is empty at the root.
pub fn split(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

/// The non-empty components of a path.
pub fn components(path: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    path.split(|&b| b == b'/').filter(|c| !c.is_empty())
}

/// Proper ancestors of a normalised path, shallowest first (not the root).
pub fn ancestors(path: &[u8]) -> impl Iterator<Item = &[u8]> {
    path.iter()
        .enumerate()
        .filter(|(_, b)| **b == b'/')
        .map(move |(i, _)| &path[..i])
}

/// Whether `name` matches a shell glob (`*`, `?`, `[...]`, `[!...]`, `\`),
/// as fnmatch without flags does (`*` crosses `/`). Used for grep's
/// `--include`/`--exclude` and for picking tags (`--tags`). Linear in the
/// name per `*`: only the last `*` is ever backtracked to.
pub fn glob_match(glob: &[u8], name: &[u8]) -> bool {
    let (mut g, mut n) = (0, 0);
    // The last `*` seen and the name position it was tried at.
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if glob.get(g) == Some(&b'*') {
            star = Some((g, n));
            g += 1;
            continue;
        }
        if let Some(len) = glob_one(glob, g, name[n]) {
            g += len;
            n += 1;
            continue;
        }
        match star {
            Some((sg, sn)) => {
                star = Some((sg, sn + 1));
                g = sg + 1;
                n = sn + 1;
            }
            None => return false,
        }
    }
    glob[g..].iter().all(|&b| b == b'*')
}

/// Whether the glob element at `g` (not a `*`) matches the byte `c`; if so,
/// how many glob bytes it spans.
fn glob_one(glob: &[u8], g: usize, c: u8) -> Option<usize> {
    let rest = glob.get(g + 1..).unwrap_or_default();
    match *glob.get(g)? {
        b'?' => Some(1),
        b'\\' if !rest.is_empty() => (rest[0] == c).then_some(2),
        b'[' if rest.contains(&b']') => {
            let (negate, skip) = match rest.first() {
                Some(b'!' | b'^') => (true, 1),
                _ => (false, 0),
            };
            let set = &rest[skip..];
            // A `]` first in the set is a member, not its end.
            let Some(end) = set.get(1..).and_then(|s| s.iter().position(|&b| b == b']')) else {
                // No closing bracket: the `[` is literal.
                return (c == b'[').then_some(1);
            };
            let members = &set[..end + 1];
            let mut hit = false;
            let mut i = 0;
            while i < members.len() {
                if i + 2 < members.len() && members[i + 1] == b'-' {
                    hit |= (members[i]..=members[i + 2]).contains(&c);
                    i += 3;
                } else {
                    hit |= members[i] == c;
                    i += 1;
                }
            }
            (hit != negate).then_some(1 + skip + end + 2)
        }
        b => (b == c).then_some(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_as_fnmatch_does() {
        assert!(glob_match(b"*.conf", b"app.conf"));
        assert!(!glob_match(b"*.conf", b"app.confx"));
        assert!(glob_match(b"a?c", b"abc"));
        assert!(glob_match(b"[ab]*", b"bee"));
        assert!(!glob_match(b"[!ab]*", b"bee"));
        assert!(glob_match(b"[a-c]x", b"bx"));
        assert!(glob_match(b"[]]", b"]"));
        assert!(glob_match(b"[x", b"[x"), "an unclosed [ is literal");
        assert!(glob_match(b"*", b""));
        assert!(glob_match(b"\\*", b"*"));
        assert!(!glob_match(b"\\*", b"a"));
        assert!(glob_match(b"v1.*", b"v1.2.3"));
        assert!(!glob_match(b"v?", b"v10"));
        assert!(glob_match(b"*-rc*", b"1.0-rc2"));
        assert!(!glob_match(b"*-rc*", b"1.0"));
        assert!(glob_match(b"a*b*c", b"aXbYbZc"));
        assert!(!glob_match(b"a*b*c", b"aXbYbZ"));
        assert!(!glob_match(b"latest", b"latest2"));
    }

    #[test]
    fn a_glob_of_many_stars_does_not_backtrack_exponentially() {
        let name = vec![b'a'; 4000];
        let start = std::time::Instant::now();
        assert!(!glob_match(b"*a*a*a*a*a*a*a*a*a*a*b", &name));
        assert!(start.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn names_are_quoted_as_gnu_ls_quotes_them_on_a_terminal() {
        assert_eq!(shell_quoted(b"plain.txt"), "plain.txt");
        assert_eq!(shell_quoted(b"a b"), "'a b'");
        assert_eq!(shell_quoted(b"latin1-\xe9.txt"), "'latin1-'$'\\351''.txt'");
        assert_eq!(shell_quoted(b"\x1b[2J"), "$'\\033''[2J'");
        // A bidi override would reorder what follows it on the screen.
        assert_eq!(
            shell_quoted("a\u{202e}b".as_bytes()),
            "'a'$'\\342'$'\\200'$'\\256''b'"
        );
    }
    use proptest::prelude::*;

    /// Reverses [`Escaped`], to prove the escape loses nothing.
    fn unescape(s: &str) -> Vec<u8> {
        let mut out = Vec::new();
        let mut it = s.chars().peekable();
        while let Some(c) = it.next() {
            if c != '\\' {
                let mut b = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
                continue;
            }
            match it.next().unwrap() {
                '\\' => out.push(b'\\'),
                'n' => out.push(b'\n'),
                't' => out.push(b'\t'),
                'r' => out.push(b'\r'),
                'x' => {
                    let h: String = [it.next().unwrap(), it.next().unwrap()].iter().collect();
                    out.push(u8::from_str_radix(&h, 16).unwrap());
                }
                'u' => {
                    it.next();
                    let h: String = it.by_ref().take_while(|&c| c != '}').collect();
                    let c = char::from_u32(u32::from_str_radix(&h, 16).unwrap()).unwrap();
                    let mut b = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
                }
                other => panic!("unknown escape {other}"),
            }
        }
        out
    }

    #[test]
    fn latin1_and_raw_bytes_are_escaped_not_replaced() {
        assert_eq!(escaped(b"latin1-\xe9.txt").to_string(), "latin1-\\xe9.txt");
        assert_eq!(escaped(b"\xff\xfe").to_string(), "\\xff\\xfe");
        assert_eq!(escaped("caf\u{e9}".as_bytes()).to_string(), "caf\u{e9}");
    }

    #[test]
    fn terminal_escape_sequences_are_neutralised() {
        let s = escaped(b"\x1b[2Jboom\x07").to_string();
        assert!(!s.contains('\x1b') && !s.contains('\x07'), "{s}");
        assert_eq!(s, "\\x1b[2Jboom\\x07");
    }

    proptest! {
        #[test]
        fn escaping_is_lossless_and_printable(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let s = escaped(&bytes).to_string();
            prop_assert!(!s.chars().any(|c| c.is_control()));
            prop_assert_eq!(unescape(&s), bytes);
        }

        #[test]
        fn split_and_join_are_inverse(dir in "[a-c/]{0,6}", name in "[a-c]{1,3}") {
            let dir = crate::layer::normalize(dir.as_bytes());
            let p = join(&dir, name.as_bytes());
            prop_assert_eq!(split(&p), (&dir[..], name.as_bytes()));
        }
    }
}
