//! One tar header block and its extension records, decoded as Go's
//! `archive/tar` decodes them: numeric fields, names, PAX records.

use super::*;

/// The one place raw tar path bytes become an entry's path.
pub(super) fn path_of(raw: &[u8]) -> Vec<u8> {
    normalize(raw)
}

/// The one place raw link target bytes become an entry's link.
pub(super) fn link_of(raw: &[u8]) -> Vec<u8> {
    raw.to_vec()
}

/// Bytes up to the first NUL: tar's names are C strings (as Go, GNU and BSD
/// tar read them).
pub(super) fn cstr(b: &[u8]) -> &[u8] {
    b.iter().position(|&c| c == 0).map_or(b, |i| &b[..i])
}

/// An octal field as Go's archive/tar reads it: NULs and spaces around it are
/// ignored, the digits end at a NUL, and empty is zero.
pub(super) fn octal(b: &[u8]) -> Option<i64> {
    let Some(start) = b.iter().position(|&c| c != 0 && c != b' ') else {
        return Some(0);
    };
    let end = b
        .iter()
        .rposition(|&c| c != 0 && c != b' ')
        .unwrap_or(start);
    let digits = cstr(&b[start..=end]);
    if !digits.iter().all(|c| (b'0'..=b'7').contains(c)) {
        return None;
    }
    let mut x: u64 = 0;
    for &c in digits {
        x = x.checked_mul(8)?.checked_add((c - b'0') as u64)?;
    }
    Some(x as i64)
}

/// A numeric field: octal, or GNU base-256 (two's complement, big endian)
/// when the high bit of the first byte is set.
pub(super) fn numeric(b: &[u8]) -> Option<i64> {
    if b.first().is_some_and(|&c| c & 0x80 != 0) {
        let inv = if b[0] & 0x40 != 0 { 0xff } else { 0 };
        let mut x: u64 = 0;
        for (i, &c) in b.iter().enumerate() {
            let mut c = c ^ inv;
            if i == 0 {
                c &= 0x7f;
            }
            if x >> 56 > 0 {
                return None;
            }
            x = x << 8 | c as u64;
        }
        if x >> 63 > 0 {
            return None;
        }
        return Some(if inv == 0xff { !(x as i64) } else { x as i64 });
    }
    octal(b)
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Format {
    V7,
    Ustar,
    Star,
    Gnu,
}

/// One header block, decoded as Go's `readHeader` does.
pub(super) struct Header {
    pub(super) format: Format,
    pub(super) typeflag: u8,
    pub(super) name: Vec<u8>,
    pub(super) link: Vec<u8>,
    pub(super) size: i64,
    pub(super) mode: i64,
    pub(super) uid: i64,
    pub(super) gid: i64,
    pub(super) mtime: i64,
    pub(super) dev: (i64, i64),
}

pub(super) enum HeaderError {
    /// Not a header at all (checksum).
    NotTar(&'static str),
    /// A header whose named field does not parse.
    Field(Vec<u8>, &'static str),
}

pub(super) fn parse_header(b: &[u8; BLOCK]) -> Result<Header, HeaderError> {
    let stored = octal(&b[148..156]).ok_or(HeaderError::NotTar("not a tar header"))?;
    let (mut unsigned, mut signed) = (0i64, 0i64);
    for (i, &c) in b.iter().enumerate() {
        let c = if (148..156).contains(&i) { b' ' } else { c };
        unsigned += c as i64;
        signed += c as i8 as i64;
    }
    if stored != unsigned && stored != signed {
        return Err(HeaderError::NotTar("header checksum mismatch"));
    }
    let format = match (&b[257..263], &b[263..265], &b[508..512]) {
        (b"ustar\0", _, b"tar\0") => Format::Star,
        (b"ustar\0", _, _) => Format::Ustar,
        (b"ustar ", b" \0", _) => Format::Gnu,
        _ => Format::V7,
    };
    let mut name = cstr(&b[0..100]).to_vec();
    let field = |range: std::ops::Range<usize>, what: &'static str| {
        numeric(&b[range]).ok_or_else(|| HeaderError::Field(cstr(&b[0..100]).to_vec(), what))
    };
    let mut h = Header {
        format,
        typeflag: b[156],
        link: cstr(&b[157..257]).to_vec(),
        size: field(124..136, "size")?,
        mode: field(100..108, "mode")?,
        uid: field(108..116, "uid")?,
        gid: field(116..124, "gid")?,
        mtime: field(136..148, "mtime")?,
        dev: (0, 0),
        name: Vec::new(),
    };
    if format != Format::V7 {
        h.dev = (
            field(329..337, "device major")?,
            field(337..345, "device minor")?,
        );
        let prefix: &[u8] = match format {
            Format::Ustar => cstr(&b[345..500]),
            Format::Star => {
                field(476..488, "atime")?;
                field(488..500, "ctime")?;
                cstr(&b[345..476])
            }
            _ => {
                // Go before 1.8 wrote a ustar prefix into GNU headers; Go still
                // reads one there when the time fields it overlaps do not parse.
                let times_ok = (b[345] == 0 || numeric(&b[345..357]).is_some())
                    && (b[357] == 0 || numeric(&b[357..369]).is_some());
                let p = cstr(&b[345..500]);
                if !times_ok && p.is_ascii() { p } else { &[] }
            }
        };
        if !prefix.is_empty() {
            let mut full = prefix.to_vec();
            full.push(b'/');
            full.extend_from_slice(&name);
            name = full;
        }
    }
    h.name = name;
    Ok(h)
}

/// PAX records of one extended header, as Go's `parsePAX` keeps them: the last
/// record of a key wins, and GNU sparse 0.0's repeated offset/numbytes records
/// are folded into one `GNU.sparse.map`.
pub(super) type Pax = std::collections::BTreeMap<Vec<u8>, Vec<u8>>;

pub(super) fn parse_pax(mut s: &[u8]) -> Result<Pax, String> {
    let mut out = Pax::new();
    let mut map: Vec<&[u8]> = Vec::new();
    while !s.is_empty() {
        let bad = |why: &str| Err(format!("malformed PAX header: {why}"));
        let Some(sp) = s.iter().position(|&c| c == b' ') else {
            return bad("a record without a length");
        };
        let n: i64 = match std::str::from_utf8(&s[..sp])
            .ok()
            .and_then(|t| t.parse().ok())
        {
            Some(n) if n >= 5 && n as u64 <= s.len() as u64 => n,
            _ => return bad("a record length out of range"),
        };
        let n = n as usize;
        if n <= sp + 1 {
            return bad("a record length out of range");
        }
        let rec = &s[sp + 1..n - 1];
        if s[n - 1] != b'\n' {
            return bad("a record without its newline");
        }
        s = &s[n..];
        let Some(eq) = rec.iter().position(|&c| c == b'=') else {
            return bad("a record without '='");
        };
        let (k, v) = (&rec[..eq], &rec[eq + 1..]);
        let nul_in = |b: &[u8]| b.contains(&0);
        let valid = !k.is_empty()
            && match k {
                b"path" | b"linkpath" | b"uname" | b"gname" => !nul_in(v),
                _ => !nul_in(k),
            };
        if !valid {
            return Err(format!(
                "malformed PAX header: record {:?} has an empty key or a NUL byte",
                String::from_utf8_lossy(k)
            ));
        }
        match k {
            b"GNU.sparse.offset" | b"GNU.sparse.numbytes" => {
                let want: &[u8] = if map.len().is_multiple_of(2) {
                    b"GNU.sparse.offset"
                } else {
                    b"GNU.sparse.numbytes"
                };
                if k != want || v.contains(&b',') {
                    return bad("GNU sparse 0.0 records out of order");
                }
                map.push(v);
            }
            _ => {
                out.insert(k.to_vec(), v.to_vec());
            }
        }
    }
    if !map.is_empty() {
        out.insert(b"GNU.sparse.map".to_vec(), map.join(&b','));
    }
    Ok(out)
}

pub(super) fn decimal(v: &[u8]) -> Option<i64> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Seconds of a PAX time (`secs[.fraction]`), validated as Go does.
pub(super) fn pax_time(v: &[u8]) -> Option<i64> {
    let (secs, frac) = match v.iter().position(|&c| c == b'.') {
        Some(i) => (&v[..i], &v[i + 1..]),
        None => (v, &[][..]),
    };
    frac.iter().all(u8::is_ascii_digit).then_some(())?;
    decimal(secs)
}

/// Extension data gathered for the next real entry: the last header of each
/// kind wins, as in Go's reader (and GNU and BSD tar).
#[derive(Default)]
pub(super) struct Pending {
    pub(super) long_name: Option<Vec<u8>>,
    pub(super) long_link: Option<Vec<u8>>,
    pub(super) pax: Option<Pax>,
}

pub(super) const TYPE_REG_A: u8 = 0;
pub(super) const TYPE_GNU_SPARSE: u8 = b'S';

/// Link, symlink, devices, directories and FIFOs never have data, whatever
/// their size field says (Go's `isHeaderOnlyType`).
pub(super) fn header_only(typeflag: u8) -> bool {
    matches!(typeflag, b'1' | b'2' | b'3' | b'4' | b'5' | b'6')
}
