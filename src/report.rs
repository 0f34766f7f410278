//! An error and its causes on one line, `what: why: underlying cause`: each
//! error level says only its own part, so joining the chain says each once.

use std::error::Error;
use std::fmt;

/// Displays `error` followed by each of its sources, joined with `": "`,
/// newlines flattened to spaces.
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut next: Option<&(dyn Error + 'static)> = Some(self.0);
        let mut first = true;
        while let Some(e) = next {
            if !first {
                f.write_str(": ")?;
            }
            first = false;
            f.write_str(&e.to_string().replace('\n', " "))?;
            next = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("layer 2 of r.io/a:b")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn each_level_appears_once_in_order() {
        let e = Outer(std::io::Error::other("connection\nreset"));
        assert_eq!(
            Chain(&e).to_string(),
            "layer 2 of r.io/a:b: connection reset"
        );
    }
}
