//! Structured Field Values (RFC 8941), as far as a cache needs them: whether a field value is
//! a valid Dictionary (§4.2.2), which is what `CDN-Cache-Control` must be (RFC 9213 §2.1: a
//! targeted field that fails to parse is ignored as a whole, never obeyed in part).

/// Whether `text` (the field's lines joined with `,`) parses as a Dictionary with at least
/// one member.
pub fn is_dictionary(text: &str) -> bool {
    let mut p = Parser {
        s: text.trim_matches(' ').as_bytes(),
        i: 0,
    };
    p.dictionary().is_some() && p.i == p.s.len()
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, byte: u8) -> bool {
        let found = self.peek() == Some(byte);
        self.i += usize::from(found);
        found
    }

    fn skip(&mut self, what: impl Fn(u8) -> bool) {
        while self.peek().is_some_and(&what) {
            self.i += 1;
        }
    }

    fn dictionary(&mut self) -> Option<()> {
        loop {
            self.key()?;
            if self.eat(b'=') {
                self.member_value()?;
            } else {
                self.parameters()?;
            }
            self.skip(|b| b == b' ' || b == b'\t');
            if self.peek().is_none() {
                return Some(());
            }
            if !self.eat(b',') {
                return None;
            }
            self.skip(|b| b == b' ' || b == b'\t');
            // A trailing comma is an error.
            self.peek()?;
        }
    }

    fn key(&mut self) -> Option<()> {
        let first = self.peek()?;
        if !(first.is_ascii_lowercase() || first == b'*') {
            return None;
        }
        self.i += 1;
        self.skip(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'.' | b'*')
        });
        Some(())
    }

    fn member_value(&mut self) -> Option<()> {
        if self.eat(b'(') {
            loop {
                self.skip(|b| b == b' ');
                if self.eat(b')') {
                    break;
                }
                self.bare_item()?;
                self.parameters()?;
                if !matches!(self.peek(), Some(b' ' | b')')) {
                    return None;
                }
            }
        } else {
            self.bare_item()?;
        }
        self.parameters()
    }

    fn parameters(&mut self) -> Option<()> {
        while self.eat(b';') {
            self.skip(|b| b == b' ');
            self.key()?;
            if self.eat(b'=') {
                self.bare_item()?;
            }
        }
        Some(())
    }

    fn bare_item(&mut self) -> Option<()> {
        match self.peek()? {
            b'-' | b'0'..=b'9' => self.number(),
            b'"' => self.string(),
            b':' => self.binary(),
            b'?' => {
                self.i += 1;
                matches!(self.peek(), Some(b'0' | b'1')).then(|| self.i += 1)
            }
            b if b.is_ascii_alphabetic() || b == b'*' => {
                self.i += 1;
                self.skip(|b| is_tchar(b) || b == b':' || b == b'/');
                Some(())
            }
            _ => None,
        }
    }

    fn number(&mut self) -> Option<()> {
        self.eat(b'-');
        let start = self.i;
        self.skip(|b| b.is_ascii_digit());
        let whole = self.i - start;
        if !self.eat(b'.') {
            return (1..=15).contains(&whole).then_some(());
        }
        let start = self.i;
        self.skip(|b| b.is_ascii_digit());
        let fraction = self.i - start;
        ((1..=12).contains(&whole) && (1..=3).contains(&fraction)).then_some(())
    }

    fn string(&mut self) -> Option<()> {
        self.i += 1;
        loop {
            match self.peek()? {
                b'"' => {
                    self.i += 1;
                    return Some(());
                }
                b'\\' => {
                    self.i += 1;
                    if !matches!(self.peek()?, b'"' | b'\\') {
                        return None;
                    }
                    self.i += 1;
                }
                0x20..=0x7e => self.i += 1,
                _ => return None,
            }
        }
    }

    fn binary(&mut self) -> Option<()> {
        self.i += 1;
        self.skip(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
        self.eat(b':').then_some(())
    }
}

/// RFC 9110 §5.6.2.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::is_dictionary;

    #[test]
    fn dictionaries_as_rfc_8941_parses_them() {
        for good in [
            "max-age=60",
            "no-store",
            "max-age=60, stale-while-revalidate=30",
            "  no-cache ,private  ",
            "a=?1, b=\"x \\\"y\\\"\", c=:aGk=:, d=1.5, e=-3, f=tok/en:x",
            "a=(1 2 \"x\");p=1, b;q=?0",
            "a=()",
        ] {
            assert!(is_dictionary(good), "{good:?}");
        }
        for bad in [
            "",
            "Max-Age=60",
            "max-age=60,",
            "max-age==60",
            "max-age=60 s-maxage=10",
            "max-age=1234567890123456",
            "max-age=1.2345",
            "a=\"unterminated",
            "a=\"bad \\escape\"",
            "a=(1 2",
            "a=(1 2)x",
            "a=?2",
            ", a",
            "a=:not base64!:",
            "a=é",
        ] {
            assert!(!is_dictionary(bad), "{bad:?}");
        }
    }
}
