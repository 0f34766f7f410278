//! `WWW-Authenticate` parsing (RFC 7235): several challenges in one header,
//! quoted values that contain commas, case-insensitive schemes and keys.

use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// Lowercased: `bearer`, `basic`...
    pub scheme: String,
    /// Parameter names lowercased; values unquoted.
    pub params: HashMap<String, String>,
}

impl Challenge {
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params.get(key).map(String::as_str)
    }
}

/// Parses every challenge in one or more header values.
pub fn parse_challenges<'a>(headers: impl IntoIterator<Item = &'a str>) -> Vec<Challenge> {
    headers.into_iter().flat_map(parse_one_header).collect()
}

fn parse_one_header(header: &str) -> Vec<Challenge> {
    let mut out: Vec<Challenge> = Vec::new();
    let mut p = Cursor {
        s: header.as_bytes(),
        i: 0,
    };
    loop {
        p.skip_ws_and_commas();
        if p.done() {
            break;
        }
        let token = p.token();
        if token.is_empty() {
            // Garbage: skip one byte so we always make progress.
            p.i += 1;
            continue;
        }
        p.skip_ws();
        // `token =` means a parameter of the current challenge; a token followed by
        // anything else starts a new challenge.
        if p.peek() == Some(b'=') && !out.is_empty() {
            p.i += 1;
            p.skip_ws();
            let value = p.value();
            if let Some(last) = out.last_mut() {
                last.params.insert(token.to_ascii_lowercase(), value);
            }
        } else {
            out.push(Challenge {
                scheme: token.to_ascii_lowercase(),
                params: HashMap::new(),
            });
        }
    }
    out
}

struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn done(&self) -> bool {
        self.i >= self.s.len()
    }
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.i += 1;
        }
    }
    fn skip_ws_and_commas(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b',')) {
            self.i += 1;
        }
    }
    fn token(&mut self) -> String {
        let start = self.i;
        while let Some(c) = self.peek() {
            if c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/".contains(&c) {
                self.i += 1;
            } else {
                break;
            }
        }
        String::from_utf8_lossy(&self.s[start..self.i]).into_owned()
    }
    fn value(&mut self) -> String {
        if self.peek() != Some(b'"') {
            return self.token();
        }
        self.i += 1;
        let mut out = Vec::new();
        while let Some(c) = self.peek() {
            self.i += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    if let Some(n) = self.peek() {
                        out.push(n);
                        self.i += 1;
                    }
                }
                _ => out.push(c),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenge_with_quoted_params() {
        let c = parse_challenges([
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        ]);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].param("realm"), Some("https://auth.docker.io/token"));
        assert_eq!(c[0].param("service"), Some("registry.docker.io"));
        assert_eq!(c[0].param("scope"), Some("repository:library/alpine:pull"));
    }

    #[test]
    fn quoted_value_with_commas_stays_whole() {
        let c =
            parse_challenges([r#"Bearer realm="https://x/token",scope="repository:a:pull,push""#]);
        assert_eq!(c[0].param("scope"), Some("repository:a:pull,push"));
    }

    #[test]
    fn several_challenges_in_one_header() {
        let c = parse_challenges([
            r#"Basic realm="Registry Realm", Bearer realm="https://t", service=reg"#,
        ]);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].scheme, "basic");
        assert_eq!(c[0].param("realm"), Some("Registry Realm"));
        assert_eq!(c[1].scheme, "bearer");
        assert_eq!(c[1].param("service"), Some("reg"));
    }

    #[test]
    fn scheme_and_keys_are_case_insensitive() {
        let c = parse_challenges([r#"BEARER Realm="r", SERVICE="s""#]);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].param("realm"), Some("r"));
        assert_eq!(c[0].param("service"), Some("s"));
    }

    #[test]
    fn escaped_quotes_inside_values() {
        let c = parse_challenges([r#"Basic realm="a \"b\" c""#]);
        assert_eq!(c[0].param("realm"), Some(r#"a "b" c"#));
    }

    #[test]
    fn challenges_across_several_header_values() {
        let c = parse_challenges(["Basic realm=x", "Bearer realm=y"]);
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn garbage_does_not_loop_or_panic() {
        let c = parse_challenges(["=,=,\"\"\"", "  ", "Bearer realm=\"unterminated"]);
        assert!(c.iter().any(|c| c.scheme == "bearer"));
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_header_parses_without_panicking(h in ".{0,200}") {
            let _ = parse_challenges([h.as_str()]);
        }

        #[test]
        fn any_bytes_as_latin1_parse_without_panicking(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let h: String = b.iter().map(|&c| c as char).collect();
            let _ = parse_challenges([h.as_str()]);
        }

        #[test]
        fn a_bearer_challenge_gives_back_its_realm_and_service(
            realm in "https?://[a-z0-9.:-]{1,30}/[a-zA-Z0-9/_,=-]{0,30}",
            service in "[a-zA-Z0-9 .,:_-]{0,30}",
            scheme in "(?i)bearer",
        ) {
            let h = format!(r#"{scheme} realm="{realm}",service="{service}""#);
            let cs = parse_challenges([h.as_str()]);
            prop_assert_eq!(cs.len(), 1);
            prop_assert_eq!(cs[0].scheme.as_str(), "bearer");
            prop_assert_eq!(cs[0].param("realm"), Some(realm.as_str()));
            prop_assert_eq!(cs[0].param("service"), Some(service.as_str()));
        }
    }
}
