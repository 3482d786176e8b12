//! Universal Binary JSON (ubjson.org, draft 12), as XGBoost writes it (`.ubj`, and `.bst`
//! since XGBoost 2.1), read into `serde_json::Value`. Optimized containers (`$` type, `#`
//! count) are read too: XGBoost stores its arrays of numbers that way. Bounded: a count is
//! checked against the bytes left before anything is allocated, and nesting is capped.

use serde_json::{Map, Number, Value};

const MAX_DEPTH: usize = 128;

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

pub(super) fn parse(bytes: &[u8]) -> Result<Value, String> {
    let mut reader = Reader { bytes, at: 0 };
    let value = reader.value(None, 0)?;
    Ok(value)
}

impl Reader<'_> {
    fn fail<T>(&self, what: &str) -> Result<T, String> {
        Err(format!("UBJSON at byte {}: {what}", self.at))
    }

    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        match self.bytes.get(self.at..self.at.saturating_add(n)) {
            Some(slice) if self.at.checked_add(n).is_some() => {
                self.at += n;
                Ok(slice)
            }
            _ => self.fail("the file ends early (truncated?)"),
        }
    }

    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn int(&mut self, marker: u8) -> Result<i64, String> {
        Ok(match marker {
            b'i' => i64::from(i8::from_be_bytes(self.array()?)),
            b'U' => i64::from(self.byte()?),
            b'I' => i64::from(i16::from_be_bytes(self.array()?)),
            b'l' => i64::from(i32::from_be_bytes(self.array()?)),
            b'L' => i64::from_be_bytes(self.array()?),
            _ => return self.fail("expected an integer"),
        })
    }

    fn length(&mut self) -> Result<usize, String> {
        let marker = self.byte()?;
        let n = self.int(marker)?;
        usize::try_from(n).or_else(|_| self.fail("a negative length"))
    }

    fn string(&mut self) -> Result<String, String> {
        let n = self.length()?;
        let bytes = self.take(n)?.to_vec();
        String::from_utf8(bytes).or_else(|_| self.fail("a string that is not UTF-8"))
    }

    fn number(value: f64) -> Value {
        Number::from_f64(value).map_or(Value::Null, Value::Number)
    }

    /// The smallest encoded size of one element of type `marker`, to bound counts.
    fn min_size(marker: Option<u8>) -> usize {
        match marker {
            Some(b'i' | b'U' | b'C' | b'Z' | b'T' | b'F' | b'N') => 1,
            Some(b'I') => 2,
            Some(b'l' | b'd') => 4,
            Some(b'L' | b'D') => 8,
            _ => 1,
        }
    }

    fn value(&mut self, marker: Option<u8>, depth: usize) -> Result<Value, String> {
        if depth > MAX_DEPTH {
            return self.fail("nested too deeply");
        }
        let marker = match marker {
            Some(m) => m,
            None => loop {
                match self.byte()? {
                    b'N' => continue,
                    m => break m,
                }
            },
        };
        Ok(match marker {
            b'Z' => Value::Null,
            b'T' => Value::Bool(true),
            b'F' => Value::Bool(false),
            b'i' | b'U' | b'I' | b'l' | b'L' => Value::from(self.int(marker)?),
            b'd' => Self::number(f64::from(f32::from_be_bytes(self.array()?))),
            b'D' => Self::number(f64::from_be_bytes(self.array()?)),
            b'C' => Value::String(char::from(self.byte()?).to_string()),
            b'S' => Value::String(self.string()?),
            b'H' => {
                let text = self.string()?;
                serde_json::from_str::<Number>(&text)
                    .map(Value::Number)
                    .or_else(|_| self.fail("a high-precision number that is not a number"))?
            }
            b'[' => {
                let (ty, count) = self.container_header()?;
                let mut items = Vec::with_capacity(count.unwrap_or(0));
                match count {
                    Some(n) => {
                        for _ in 0..n {
                            items.push(self.value(ty, depth + 1)?);
                        }
                    }
                    None => loop {
                        if self.peek() == Some(b']') {
                            self.at += 1;
                            break;
                        }
                        items.push(self.value(None, depth + 1)?);
                    },
                }
                Value::Array(items)
            }
            b'{' => {
                let (ty, count) = self.container_header()?;
                let mut map = Map::new();
                match count {
                    Some(n) => {
                        for _ in 0..n {
                            let key = self.string()?;
                            map.insert(key, self.value(ty, depth + 1)?);
                        }
                    }
                    None => loop {
                        if self.peek() == Some(b'}') {
                            self.at += 1;
                            break;
                        }
                        let key = self.string()?;
                        map.insert(key, self.value(None, depth + 1)?);
                    },
                }
                Value::Object(map)
            }
            _ => return self.fail(&format!("unknown marker 0x{marker:02x}")),
        })
    }

    /// An optimized container's `$type` and `#count`, when given.
    fn container_header(&mut self) -> Result<(Option<u8>, Option<usize>), String> {
        let mut ty = None;
        if self.peek() == Some(b'$') {
            self.at += 1;
            ty = Some(self.byte()?);
        }
        let count = if self.peek() == Some(b'#') {
            self.at += 1;
            let n = self.length()?;
            let left = self.bytes.len() - self.at;
            if n.saturating_mul(Self::min_size(ty)) > left
                && !matches!(ty, Some(b'Z' | b'T' | b'F' | b'N'))
            {
                return self.fail(&format!(
                    "a count of {n} with {left} bytes left (truncated?)"
                ));
            }
            Some(n)
        } else if ty.is_some() {
            return self.fail("a typed container without a count");
        } else {
            None
        };
        Ok((ty, count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_optimized_and_plain_containers() {
        // {"a": [1, 2.5], "b": [$d#i2 (1.5, -2)], "s": "xy", "t": true}
        let mut bytes = b"{".to_vec();
        bytes.extend(b"i\x01a[i\x01D");
        bytes.extend(2.5f64.to_be_bytes());
        bytes.extend(b"]i\x01b[$d#i\x02");
        bytes.extend(1.5f32.to_be_bytes());
        bytes.extend((-2.0f32).to_be_bytes());
        bytes.extend(b"i\x01sSi\x02xyi\x01tT}");
        let value = parse(&bytes).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"a": [1, 2.5], "b": [1.5, -2.0], "s": "xy", "t": true})
        );
    }

    #[test]
    fn truncated_and_lying_input_is_an_error() {
        assert!(parse(b"{i\x01a[").unwrap_err().contains("ends early"));
        // A count far beyond the bytes left is refused before any allocation.
        let huge = b"[$D#L\x7f\xff\xff\xff\xff\xff\xff\xff";
        assert!(parse(huge).unwrap_err().contains("count"));
        assert!(parse(b"X").unwrap_err().contains("unknown marker"));
        let deep = vec![b'['; 1000];
        assert!(parse(&deep).unwrap_err().contains("deeply"));
    }
}
