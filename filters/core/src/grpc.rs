//! The model a gRPC request names, read from the first bytes of its body without decoding the
//! whole message: the 5-byte gRPC frame header, then protobuf fields up to the model name.
//! Protobuf encoders write fields in field-number order, and the name is field 1 (or 2), so a
//! few dozen bytes are enough; the shell buffers no more than its configured peek limit.

/// What the bytes seen so far say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peek {
    /// Not enough bytes yet.
    NeedMore,
    /// The model name.
    Model(String),
    /// The message has no model name.
    NoModel,
    /// The bytes are not a gRPC frame holding a protobuf message we can read.
    Malformed(&'static str),
}

/// The model name in field `field` of the first message in `data`; for the repository
/// methods, Triton's messages carry it in field 2 and KServe's in field 1, so pass
/// `fallback: Some(1)` to accept either.
pub fn peek_model(data: &[u8], field: u32, fallback: Option<u32>) -> Peek {
    let Some((header, body)) = data.split_first_chunk::<5>() else {
        return Peek::NeedMore;
    };
    let [compressed, l0, l1, l2, l3] = *header;
    if compressed != 0 {
        return Peek::Malformed(
            "compressed gRPC messages cannot be routed by model name: send them uncompressed",
        );
    }
    let length = u32::from_be_bytes([l0, l1, l2, l3]) as usize;
    let complete = body.len() >= length;
    let message = body.get(..length).unwrap_or(body);
    let mut fallback_name = None;
    let mut rest = message;
    while !rest.is_empty() {
        let Some((tag, after)) = varint(rest) else {
            return if complete {
                Peek::Malformed("truncated protobuf field tag")
            } else {
                Peek::NeedMore
            };
        };
        let number = tag >> 3;
        let wire_type = tag & 7;
        let skipped = match wire_type {
            0 => varint(after).map(|(_, r)| r),
            1 => after.get(8..),
            5 => after.get(4..),
            2 => match varint(after) {
                Some((len, r)) => {
                    let len = len as usize;
                    match r.get(..len) {
                        Some(value)
                            if u64::from(field) == number
                                || fallback.is_some_and(|f| u64::from(f) == number) =>
                        {
                            let Ok(name) = std::str::from_utf8(value) else {
                                return Peek::Malformed("the model name is not valid UTF-8");
                            };
                            if u64::from(field) == number {
                                return if name.is_empty() {
                                    fallback_or_none(fallback_name)
                                } else {
                                    Peek::Model(name.to_owned())
                                };
                            }
                            fallback_name = Some(name.to_owned()).filter(|n| !n.is_empty());
                            r.get(len..)
                        }
                        Some(_) => r.get(len..),
                        None => None,
                    }
                }
                None => None,
            },
            _ => return Peek::Malformed("unsupported protobuf wire type"),
        };
        match skipped {
            Some(r) => rest = r,
            None if complete => return Peek::Malformed("truncated protobuf field"),
            None => return Peek::NeedMore,
        }
        if number > u64::from(field.max(fallback.unwrap_or(0))) {
            // Fields come in order: the name would have been seen by now.
            return fallback_or_none(fallback_name);
        }
    }
    if complete {
        fallback_or_none(fallback_name)
    } else {
        Peek::NeedMore
    }
}

fn fallback_or_none(name: Option<String>) -> Peek {
    name.map_or(Peek::NoModel, Peek::Model)
}

fn varint(data: &[u8]) -> Option<(u64, &[u8])> {
    let mut value = 0u64;
    for (i, &byte) in data.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, data.get(i + 1..).unwrap_or_default()));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_string(number: u8, value: &str) -> Vec<u8> {
        let mut out = vec![(number << 3) | 2, value.len() as u8];
        out.extend(value.as_bytes());
        out
    }

    fn frame(message: &[u8]) -> Vec<u8> {
        let mut out = vec![0];
        out.extend((message.len() as u32).to_be_bytes());
        out.extend(message);
        out
    }

    #[test]
    fn finds_the_name_in_the_first_bytes() {
        let mut message = field_string(1, "mnist");
        message.extend(field_string(3, "request-id"));
        message.extend(vec![0x2a; 300]);
        let data = frame(&message);
        assert_eq!(peek_model(&data, 1, None), Peek::Model("mnist".into()));
        // Only the first bytes have arrived: enough already.
        assert_eq!(
            peek_model(data.get(..12).unwrap(), 1, None),
            Peek::Model("mnist".into())
        );
        assert_eq!(peek_model(data.get(..8).unwrap(), 1, None), Peek::NeedMore);
        assert_eq!(peek_model(data.get(..3).unwrap(), 1, None), Peek::NeedMore);
    }

    #[test]
    fn skips_other_fields_and_reports_absence() {
        let mut message = vec![0x08, 0x96, 0x01]; // field 1 varint 150
        message.extend(field_string(2, "model-b"));
        assert_eq!(
            peek_model(&frame(&message), 2, None),
            Peek::Model("model-b".into())
        );
        assert_eq!(peek_model(&frame(&[]), 1, None), Peek::NoModel);
        assert_eq!(
            peek_model(&frame(&field_string(4, "x")), 1, None),
            Peek::NoModel
        );
    }

    #[test]
    fn repository_messages_in_both_shapes() {
        let mut triton = field_string(1, "");
        triton.extend(field_string(2, "digits"));
        assert_eq!(
            peek_model(&frame(&triton), 2, Some(1)),
            Peek::Model("digits".into())
        );
        assert_eq!(
            peek_model(&frame(&field_string(1, "digits")), 2, Some(1)),
            Peek::Model("digits".into())
        );
    }

    #[test]
    fn malformed_frames_are_named() {
        assert!(
            matches!(peek_model(&[1, 0, 0, 0, 2, 0x0a, 0], 1, None), Peek::Malformed(m) if m.contains("compressed"))
        );
        assert!(matches!(
            peek_model(&frame(&[0x0f]), 1, None),
            Peek::Malformed(_)
        ));
        assert!(matches!(
            peek_model(&frame(&[0x0a, 0x05, b'a']), 1, None),
            Peek::Malformed(_)
        ));
        assert!(
            matches!(peek_model(&frame(&[0x0a, 0x02, 0xff, 0xfe]), 1, None), Peek::Malformed(m) if m.contains("UTF-8"))
        );
        assert!(matches!(
            peek_model(&frame(&[0x80, 0x80]), 1, None),
            Peek::Malformed(_)
        ));
        // Garbage of every short length never panics.
        for n in 0..64u8 {
            let junk: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37).wrapping_add(n)).collect();
            let _ = peek_model(&junk, 1, Some(2));
        }
    }
}
