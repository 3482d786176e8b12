//! Tensor data in every Open Inference Protocol datatype, and its three wire forms: JSON
//! (nested or flat arrays), raw little-endian bytes (the REST binary extension and gRPC
//! `raw_*_contents`) and gRPC's typed `InferTensorContents`.

use half::f16;
use serde::ser::{Serialize, SerializeSeq, Serializer};
use serde_json::Value;

use crate::datatype::DataType;
use crate::inference::InferTensorContents;

/// The elements of one tensor, flattened in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    Bool(Vec<bool>),
    Uint8(Vec<u8>),
    Uint16(Vec<u16>),
    Uint32(Vec<u32>),
    Uint64(Vec<u64>),
    Int8(Vec<i8>),
    Int16(Vec<i16>),
    Int32(Vec<i32>),
    Int64(Vec<i64>),
    Fp16(Vec<f16>),
    Fp32(Vec<f32>),
    Fp64(Vec<f64>),
    Bytes(Vec<Vec<u8>>),
}

/// What is wrong with a tensor's data. Messages are written for the client that sent it; the
/// caller adds which tensor it was.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TensorError {
    #[error("shape {shape:?} has a negative dimension")]
    NegativeDimension { shape: Vec<i64> },
    #[error("shape {shape:?} has more elements than can be addressed")]
    ShapeTooLarge { shape: Vec<i64> },
    #[error("shape {shape:?} needs {expected} elements but the data has {actual}")]
    ElementCount {
        shape: Vec<i64>,
        expected: usize,
        actual: usize,
    },
    #[error("element {index} ({value}) is not a valid {datatype} value")]
    BadElement {
        index: usize,
        value: String,
        datatype: DataType,
    },
    #[error("data must be an array (nested or flat) of {datatype} values")]
    NotAnArray { datatype: DataType },
    #[error(
        "shape {shape:?} of {datatype} needs {expected} bytes of binary data but {actual} were given"
    )]
    RawSize {
        shape: Vec<i64>,
        datatype: DataType,
        expected: usize,
        actual: usize,
    },
    #[error("BYTES element {index} has a length prefix past the end of the binary data")]
    RawBytesTruncated { index: usize },
    #[error("binary BYTES data holds {actual} elements but shape {shape:?} needs {expected}")]
    RawBytesCount {
        shape: Vec<i64>,
        expected: usize,
        actual: usize,
    },
    #[error("{datatype} data can only be sent as raw contents")]
    RawOnly { datatype: DataType },
    #[error("contents are in `{field}`, which does not hold {datatype} data")]
    WrongContentsField {
        field: &'static str,
        datatype: DataType,
    },
    #[error("BYTES element {index} is not valid UTF-8")]
    InvalidUtf8 { index: usize },
    #[error("BYTES element {index} contains a NUL byte, which ONNX string tensors cannot hold")]
    NulInString { index: usize },
}

/// The number of elements a shape holds, refusing negative dimensions and overflow.
pub fn element_count(shape: &[i64]) -> Result<usize, TensorError> {
    shape.iter().try_fold(1usize, |count, &dim| {
        let dim = usize::try_from(dim).map_err(|_| TensorError::NegativeDimension {
            shape: shape.to_vec(),
        })?;
        count
            .checked_mul(dim)
            .filter(|&n| n <= isize::MAX as usize)
            .ok_or_else(|| TensorError::ShapeTooLarge {
                shape: shape.to_vec(),
            })
    })
}

/// Runs `$body` with `$v` bound to the vector of whichever numeric variant `$data` is; BOOL and
/// BYTES get their own arms at the call site.
macro_rules! with_numeric {
    ($data:expr, $v:ident => $body:expr, bool $b:ident => $bool_body:expr, bytes $s:ident => $bytes_body:expr) => {
        match $data {
            TensorData::Bool($b) => $bool_body,
            TensorData::Uint8($v) => $body,
            TensorData::Uint16($v) => $body,
            TensorData::Uint32($v) => $body,
            TensorData::Uint64($v) => $body,
            TensorData::Int8($v) => $body,
            TensorData::Int16($v) => $body,
            TensorData::Int32($v) => $body,
            TensorData::Int64($v) => $body,
            TensorData::Fp16($v) => $body,
            TensorData::Fp32($v) => $body,
            TensorData::Fp64($v) => $body,
            TensorData::Bytes($s) => $bytes_body,
        }
    };
}

/// Little-endian encoding of the fixed-size element types.
trait RawElement: Sized + Copy {
    const SIZE: usize;
    fn read(bytes: &[u8]) -> Self;
    fn write(self, out: &mut Vec<u8>);
}

macro_rules! raw_element {
    ($($t:ty),*) => {$(
        impl RawElement for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn read(bytes: &[u8]) -> Self {
                let mut buf = [0u8; std::mem::size_of::<$t>()];
                buf.copy_from_slice(bytes);
                <$t>::from_le_bytes(buf)
            }
            fn write(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}
raw_element!(u8, u16, u32, u64, i8, i16, i32, i64, f16, f32, f64);

fn read_raw<T: RawElement>(bytes: &[u8]) -> Vec<T> {
    bytes.chunks_exact(T::SIZE).map(T::read).collect()
}

fn write_raw<T: RawElement>(values: &[T], out: &mut Vec<u8>) {
    out.reserve(values.len() * T::SIZE);
    for &v in values {
        v.write(out);
    }
}

impl TensorData {
    pub fn datatype(&self) -> DataType {
        match self {
            TensorData::Bool(_) => DataType::Bool,
            TensorData::Uint8(_) => DataType::Uint8,
            TensorData::Uint16(_) => DataType::Uint16,
            TensorData::Uint32(_) => DataType::Uint32,
            TensorData::Uint64(_) => DataType::Uint64,
            TensorData::Int8(_) => DataType::Int8,
            TensorData::Int16(_) => DataType::Int16,
            TensorData::Int32(_) => DataType::Int32,
            TensorData::Int64(_) => DataType::Int64,
            TensorData::Fp16(_) => DataType::Fp16,
            TensorData::Fp32(_) => DataType::Fp32,
            TensorData::Fp64(_) => DataType::Fp64,
            TensorData::Bytes(_) => DataType::Bytes,
        }
    }

    pub fn len(&self) -> usize {
        with_numeric!(self, v => v.len(), bool b => b.len(), bytes s => s.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks that the data fills `shape` exactly.
    pub fn check_shape(&self, shape: &[i64]) -> Result<(), TensorError> {
        let expected = element_count(shape)?;
        if expected == self.len() {
            Ok(())
        } else {
            Err(TensorError::ElementCount {
                shape: shape.to_vec(),
                expected,
                actual: self.len(),
            })
        }
    }

    /// Reads JSON data, nested (`[[1, 2], [3, 4]]`) or flat (`[1, 2, 3, 4]`), as `datatype`,
    /// and checks that it fills `shape`. BYTES elements are strings; BOOL elements are `true`
    /// or `false`; integers must fit the type; FP16 values are rounded to the nearest half.
    pub fn from_json(
        datatype: DataType,
        shape: &[i64],
        value: &Value,
    ) -> Result<TensorData, TensorError> {
        let expected = element_count(shape)?;
        if !value.is_array() {
            return Err(TensorError::NotAnArray { datatype });
        }
        let data = match datatype {
            DataType::Bool => TensorData::Bool(flatten(value, datatype, expected, Value::as_bool)?),
            DataType::Uint8 => TensorData::Uint8(flatten(value, datatype, expected, json_int)?),
            DataType::Uint16 => TensorData::Uint16(flatten(value, datatype, expected, json_int)?),
            DataType::Uint32 => TensorData::Uint32(flatten(value, datatype, expected, json_int)?),
            DataType::Uint64 => {
                TensorData::Uint64(flatten(value, datatype, expected, Value::as_u64)?)
            }
            DataType::Int8 => TensorData::Int8(flatten(value, datatype, expected, json_int)?),
            DataType::Int16 => TensorData::Int16(flatten(value, datatype, expected, json_int)?),
            DataType::Int32 => TensorData::Int32(flatten(value, datatype, expected, json_int)?),
            DataType::Int64 => {
                TensorData::Int64(flatten(value, datatype, expected, Value::as_i64)?)
            }
            DataType::Fp16 => TensorData::Fp16(flatten(value, datatype, expected, |v| {
                v.as_f64().map(f16::from_f64)
            })?),
            DataType::Fp32 => TensorData::Fp32(flatten(value, datatype, expected, |v| {
                v.as_f64().map(|x| x as f32)
            })?),
            DataType::Fp64 => TensorData::Fp64(flatten(value, datatype, expected, Value::as_f64)?),
            DataType::Bytes => TensorData::Bytes(flatten(value, datatype, expected, |v| {
                v.as_str().map(|s| s.as_bytes().to_vec())
            })?),
        };
        data.check_shape(shape)?;
        Ok(data)
    }

    /// Reads the raw form: fixed-size elements little-endian and back to back; BYTES elements
    /// each as a 4-byte little-endian length and then the bytes; BOOL as one byte each.
    pub fn from_raw(
        datatype: DataType,
        shape: &[i64],
        bytes: &[u8],
    ) -> Result<TensorData, TensorError> {
        let expected = element_count(shape)?;
        let fixed = |size: usize| -> Result<&[u8], TensorError> {
            let needed = expected
                .checked_mul(size)
                .ok_or_else(|| TensorError::ShapeTooLarge {
                    shape: shape.to_vec(),
                })?;
            if bytes.len() == needed {
                Ok(bytes)
            } else {
                Err(TensorError::RawSize {
                    shape: shape.to_vec(),
                    datatype,
                    expected: needed,
                    actual: bytes.len(),
                })
            }
        };
        Ok(match datatype {
            DataType::Bytes => {
                let elements = split_raw_bytes(bytes)?;
                if elements.len() != expected {
                    return Err(TensorError::RawBytesCount {
                        shape: shape.to_vec(),
                        expected,
                        actual: elements.len(),
                    });
                }
                TensorData::Bytes(elements)
            }
            DataType::Bool => TensorData::Bool(fixed(1)?.iter().map(|&b| b != 0).collect()),
            DataType::Uint8 => TensorData::Uint8(fixed(1)?.to_vec()),
            DataType::Uint16 => TensorData::Uint16(read_raw(fixed(2)?)),
            DataType::Uint32 => TensorData::Uint32(read_raw(fixed(4)?)),
            DataType::Uint64 => TensorData::Uint64(read_raw(fixed(8)?)),
            DataType::Int8 => TensorData::Int8(read_raw(fixed(1)?)),
            DataType::Int16 => TensorData::Int16(read_raw(fixed(2)?)),
            DataType::Int32 => TensorData::Int32(read_raw(fixed(4)?)),
            DataType::Int64 => TensorData::Int64(read_raw(fixed(8)?)),
            DataType::Fp16 => TensorData::Fp16(read_raw(fixed(2)?)),
            DataType::Fp32 => TensorData::Fp32(read_raw(fixed(4)?)),
            DataType::Fp64 => TensorData::Fp64(read_raw(fixed(8)?)),
        })
    }

    /// Writes the raw form (see [`TensorData::from_raw`]) onto `out`.
    pub fn write_raw(&self, out: &mut Vec<u8>) {
        with_numeric!(self,
            v => write_raw(v, out),
            bool b => out.extend(b.iter().map(|&x| u8::from(x))),
            bytes s => {
                for element in s {
                    // Elements longer than 4 GiB cannot be framed; the body limit keeps them out.
                    let len = u32::try_from(element.len()).unwrap_or(u32::MAX);
                    out.extend_from_slice(&len.to_le_bytes());
                    out.extend_from_slice(element);
                }
            }
        )
    }

    /// The raw form as a new buffer.
    pub fn to_raw(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_raw(&mut out);
        out
    }

    /// Reads gRPC's typed contents for `datatype`, refusing contents put in the field of
    /// another type and integers that do not fit.
    pub fn from_contents(
        datatype: DataType,
        shape: &[i64],
        contents: InferTensorContents,
    ) -> Result<TensorData, TensorError> {
        let wrong = |field| Err(TensorError::WrongContentsField { field, datatype });
        let filled = contents_field(&contents);
        let expected_field = match datatype {
            DataType::Bool => "bool_contents",
            DataType::Int8 | DataType::Int16 | DataType::Int32 => "int_contents",
            DataType::Int64 => "int64_contents",
            DataType::Uint8 | DataType::Uint16 | DataType::Uint32 => "uint_contents",
            DataType::Uint64 => "uint64_contents",
            DataType::Fp32 => "fp32_contents",
            DataType::Fp64 => "fp64_contents",
            DataType::Bytes => "bytes_contents",
            DataType::Fp16 => return Err(TensorError::RawOnly { datatype }),
        };
        if let Some(field) = filled.filter(|&f| f != expected_field) {
            return wrong(field);
        }
        let data = match datatype {
            DataType::Bool => TensorData::Bool(contents.bool_contents),
            DataType::Int8 => TensorData::Int8(narrow(contents.int_contents, datatype)?),
            DataType::Int16 => TensorData::Int16(narrow(contents.int_contents, datatype)?),
            DataType::Int32 => TensorData::Int32(contents.int_contents),
            DataType::Int64 => TensorData::Int64(contents.int64_contents),
            DataType::Uint8 => TensorData::Uint8(narrow(contents.uint_contents, datatype)?),
            DataType::Uint16 => TensorData::Uint16(narrow(contents.uint_contents, datatype)?),
            DataType::Uint32 => TensorData::Uint32(contents.uint_contents),
            DataType::Uint64 => TensorData::Uint64(contents.uint64_contents),
            DataType::Fp32 => TensorData::Fp32(contents.fp32_contents),
            DataType::Fp64 => TensorData::Fp64(contents.fp64_contents),
            DataType::Bytes => TensorData::Bytes(contents.bytes_contents),
            DataType::Fp16 => return Err(TensorError::RawOnly { datatype }),
        };
        data.check_shape(shape)?;
        Ok(data)
    }

    /// gRPC's typed contents; `None` for FP16, which has no typed field.
    pub fn to_contents(&self) -> Option<InferTensorContents> {
        let mut c = InferTensorContents::default();
        match self {
            TensorData::Bool(v) => c.bool_contents = v.clone(),
            TensorData::Uint8(v) => c.uint_contents = v.iter().map(|&x| u32::from(x)).collect(),
            TensorData::Uint16(v) => c.uint_contents = v.iter().map(|&x| u32::from(x)).collect(),
            TensorData::Uint32(v) => c.uint_contents = v.clone(),
            TensorData::Uint64(v) => c.uint64_contents = v.clone(),
            TensorData::Int8(v) => c.int_contents = v.iter().map(|&x| i32::from(x)).collect(),
            TensorData::Int16(v) => c.int_contents = v.iter().map(|&x| i32::from(x)).collect(),
            TensorData::Int32(v) => c.int_contents = v.clone(),
            TensorData::Int64(v) => c.int64_contents = v.clone(),
            TensorData::Fp16(_) => return None,
            TensorData::Fp32(v) => c.fp32_contents = v.clone(),
            TensorData::Fp64(v) => c.fp64_contents = v.clone(),
            TensorData::Bytes(v) => c.bytes_contents = v.clone(),
        }
        Some(c)
    }

    /// Joins tensors of one datatype end to end (along the first dimension, for row-major
    /// tensors whose other dimensions agree). `None` if the datatypes differ or there are none.
    pub fn concat(parts: Vec<TensorData>) -> Option<TensorData> {
        macro_rules! join {
            ($variant:ident, $first:expr, $rest:expr) => {{
                let mut out = $first;
                for part in $rest {
                    match part {
                        TensorData::$variant(v) => out.extend(v),
                        _ => return None,
                    }
                }
                TensorData::$variant(out)
            }};
        }
        let mut rest = parts.into_iter();
        Some(match rest.next()? {
            TensorData::Bool(v) => join!(Bool, v, rest),
            TensorData::Uint8(v) => join!(Uint8, v, rest),
            TensorData::Uint16(v) => join!(Uint16, v, rest),
            TensorData::Uint32(v) => join!(Uint32, v, rest),
            TensorData::Uint64(v) => join!(Uint64, v, rest),
            TensorData::Int8(v) => join!(Int8, v, rest),
            TensorData::Int16(v) => join!(Int16, v, rest),
            TensorData::Int32(v) => join!(Int32, v, rest),
            TensorData::Int64(v) => join!(Int64, v, rest),
            TensorData::Fp16(v) => join!(Fp16, v, rest),
            TensorData::Fp32(v) => join!(Fp32, v, rest),
            TensorData::Fp64(v) => join!(Fp64, v, rest),
            TensorData::Bytes(v) => join!(Bytes, v, rest),
        })
    }

    /// Cuts the data into consecutive pieces of `lengths` elements; `None` if they do not add
    /// up to the data's length.
    pub fn split(self, lengths: &[usize]) -> Option<Vec<TensorData>> {
        fn cut<T>(
            mut v: Vec<T>,
            lengths: &[usize],
            wrap: fn(Vec<T>) -> TensorData,
        ) -> Vec<TensorData> {
            let mut pieces = Vec::with_capacity(lengths.len());
            for &n in lengths.iter().rev() {
                pieces.push(wrap(v.split_off(v.len() - n)));
            }
            pieces.reverse();
            pieces
        }
        if lengths.iter().sum::<usize>() != self.len() {
            return None;
        }
        Some(match self {
            TensorData::Bool(v) => cut(v, lengths, TensorData::Bool),
            TensorData::Uint8(v) => cut(v, lengths, TensorData::Uint8),
            TensorData::Uint16(v) => cut(v, lengths, TensorData::Uint16),
            TensorData::Uint32(v) => cut(v, lengths, TensorData::Uint32),
            TensorData::Uint64(v) => cut(v, lengths, TensorData::Uint64),
            TensorData::Int8(v) => cut(v, lengths, TensorData::Int8),
            TensorData::Int16(v) => cut(v, lengths, TensorData::Int16),
            TensorData::Int32(v) => cut(v, lengths, TensorData::Int32),
            TensorData::Int64(v) => cut(v, lengths, TensorData::Int64),
            TensorData::Fp16(v) => cut(v, lengths, TensorData::Fp16),
            TensorData::Fp32(v) => cut(v, lengths, TensorData::Fp32),
            TensorData::Fp64(v) => cut(v, lengths, TensorData::Fp64),
            TensorData::Bytes(v) => cut(v, lengths, TensorData::Bytes),
        })
    }

    /// Checks that BYTES elements are text that an ONNX string tensor can hold: UTF-8
    /// without NUL bytes (ONNX Runtime stores C strings).
    pub fn check_text(&self) -> Result<(), TensorError> {
        let TensorData::Bytes(elements) = self else {
            return Ok(());
        };
        for (index, element) in elements.iter().enumerate() {
            if std::str::from_utf8(element).is_err() {
                return Err(TensorError::InvalidUtf8 { index });
            }
            if element.contains(&0) {
                return Err(TensorError::NulInString { index });
            }
        }
        Ok(())
    }
}

/// Which typed field of `contents`, if any, holds data.
fn contents_field(c: &InferTensorContents) -> Option<&'static str> {
    [
        (!c.bool_contents.is_empty(), "bool_contents"),
        (!c.int_contents.is_empty(), "int_contents"),
        (!c.int64_contents.is_empty(), "int64_contents"),
        (!c.uint_contents.is_empty(), "uint_contents"),
        (!c.uint64_contents.is_empty(), "uint64_contents"),
        (!c.fp32_contents.is_empty(), "fp32_contents"),
        (!c.fp64_contents.is_empty(), "fp64_contents"),
        (!c.bytes_contents.is_empty(), "bytes_contents"),
    ]
    .into_iter()
    .find_map(|(set, name)| set.then_some(name))
}

fn narrow<S: Copy + ToString, T: TryFrom<S>>(
    values: Vec<S>,
    datatype: DataType,
) -> Result<Vec<T>, TensorError> {
    values
        .into_iter()
        .enumerate()
        .map(|(index, v)| {
            T::try_from(v).map_err(|_| TensorError::BadElement {
                index,
                value: v.to_string(),
                datatype,
            })
        })
        .collect()
}

fn json_int<T: TryFrom<i64>>(v: &Value) -> Option<T> {
    v.as_i64().and_then(|x| T::try_from(x).ok())
}

fn flatten<T>(
    value: &Value,
    datatype: DataType,
    capacity: usize,
    parse: impl Fn(&Value) -> Option<T> + Copy,
) -> Result<Vec<T>, TensorError> {
    // The capacity comes from the client's shape: cap what we reserve up front by what the
    // JSON could possibly hold, so a huge claimed shape cannot allocate before it is checked.
    let mut out = Vec::with_capacity(capacity.min(1 << 20));
    flatten_into(value, datatype, parse, &mut out)?;
    Ok(out)
}

fn flatten_into<T>(
    value: &Value,
    datatype: DataType,
    parse: impl Fn(&Value) -> Option<T> + Copy,
    out: &mut Vec<T>,
) -> Result<(), TensorError> {
    match value {
        Value::Array(items) => items
            .iter()
            .try_for_each(|item| flatten_into(item, datatype, parse, out)),
        scalar => match parse(scalar) {
            Some(v) => {
                out.push(v);
                Ok(())
            }
            None => Err(TensorError::BadElement {
                index: out.len(),
                value: short(scalar),
                datatype,
            }),
        },
    }
}

/// A client's value, cut short for an error message.
fn short(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(40) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

fn split_raw_bytes(mut bytes: &[u8]) -> Result<Vec<Vec<u8>>, TensorError> {
    let mut elements = Vec::new();
    while !bytes.is_empty() {
        let index = elements.len();
        let truncated = || TensorError::RawBytesTruncated { index };
        let (len, rest) = bytes.split_first_chunk::<4>().ok_or_else(truncated)?;
        let len = usize::try_from(u32::from_le_bytes(*len)).map_err(|_| truncated())?;
        if rest.len() < len {
            return Err(truncated());
        }
        let (element, rest) = rest.split_at(len);
        elements.push(element.to_vec());
        bytes = rest;
    }
    Ok(elements)
}

/// JSON output: a flat array. BYTES elements become strings (invalid UTF-8 is replaced, as
/// ONNX string tensors always hold UTF-8 this does not happen for model outputs).
impl Serialize for TensorData {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        fn seq<S: Serializer, T: Serialize>(s: S, items: &[T]) -> Result<S::Ok, S::Error> {
            let mut seq = s.serialize_seq(Some(items.len()))?;
            for item in items {
                seq.serialize_element(item)?;
            }
            seq.end()
        }
        match self {
            TensorData::Fp16(v) => {
                let mut s = serializer.serialize_seq(Some(v.len()))?;
                for x in v {
                    s.serialize_element(&x.to_f32())?;
                }
                s.end()
            }
            TensorData::Bytes(v) => {
                let mut s = serializer.serialize_seq(Some(v.len()))?;
                for x in v {
                    s.serialize_element(&String::from_utf8_lossy(x))?;
                }
                s.end()
            }
            TensorData::Bool(v) => seq(serializer, v),
            TensorData::Uint8(v) => seq(serializer, v),
            TensorData::Uint16(v) => seq(serializer, v),
            TensorData::Uint32(v) => seq(serializer, v),
            TensorData::Uint64(v) => seq(serializer, v),
            TensorData::Int8(v) => seq(serializer, v),
            TensorData::Int16(v) => seq(serializer, v),
            TensorData::Int32(v) => seq(serializer, v),
            TensorData::Int64(v) => seq(serializer, v),
            TensorData::Fp32(v) => seq(serializer, v),
            TensorData::Fp64(v) => seq(serializer, v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// One sample per datatype: data, the JSON that means it, the raw bytes that mean it.
    fn samples() -> Vec<(TensorData, Value, Vec<u8>)> {
        let h = |x: f32| f16::from_f32(x);
        vec![
            (
                TensorData::Bool(vec![true, false]),
                json!([true, false]),
                vec![1, 0],
            ),
            (
                TensorData::Uint8(vec![0, 255]),
                json!([0, 255]),
                vec![0, 255],
            ),
            (
                TensorData::Uint16(vec![1, 65535]),
                json!([1, 65535]),
                vec![1, 0, 255, 255],
            ),
            (
                TensorData::Uint32(vec![1, u32::MAX]),
                json!([1, u32::MAX]),
                vec![1, 0, 0, 0, 255, 255, 255, 255],
            ),
            (
                TensorData::Uint64(vec![2, u64::MAX]),
                json!([2, u64::MAX]),
                [2u64.to_le_bytes(), u64::MAX.to_le_bytes()].concat(),
            ),
            (
                TensorData::Int8(vec![-128, 127]),
                json!([-128, 127]),
                vec![0x80, 0x7f],
            ),
            (
                TensorData::Int16(vec![-2, 258]),
                json!([-2, 258]),
                vec![0xfe, 0xff, 0x02, 0x01],
            ),
            (
                TensorData::Int32(vec![i32::MIN, 1]),
                json!([i32::MIN, 1]),
                vec![0, 0, 0, 0x80, 1, 0, 0, 0],
            ),
            (
                TensorData::Int64(vec![i64::MIN, -1]),
                json!([i64::MIN, -1]),
                [i64::MIN.to_le_bytes(), (-1i64).to_le_bytes()].concat(),
            ),
            (
                TensorData::Fp16(vec![h(1.0), h(-0.5)]),
                json!([1.0, -0.5]),
                vec![0x00, 0x3c, 0x00, 0xb8],
            ),
            (
                TensorData::Fp32(vec![1.0, -2.5]),
                json!([1.0, -2.5]),
                [1.0f32.to_le_bytes(), (-2.5f32).to_le_bytes()].concat(),
            ),
            (
                TensorData::Fp64(vec![0.1, 1e300]),
                json!([0.1, 1e300]),
                [0.1f64.to_le_bytes(), 1e300f64.to_le_bytes()].concat(),
            ),
            (
                TensorData::Bytes(vec![b"ab".to_vec(), Vec::new()]),
                json!(["ab", ""]),
                vec![2, 0, 0, 0, b'a', b'b', 0, 0, 0, 0],
            ),
        ]
    }

    #[test]
    fn every_datatype_reads_and_writes_json_and_raw() {
        for (data, json, raw) in samples() {
            let dt = data.datatype();
            assert_eq!(
                TensorData::from_json(dt, &[2], &json).unwrap(),
                data,
                "{dt} from JSON"
            );
            assert_eq!(
                TensorData::from_json(dt, &[1, 2], &json!([json])).unwrap(),
                data,
                "{dt} nested"
            );
            assert_eq!(serde_json::to_value(&data).unwrap(), json, "{dt} to JSON");
            assert_eq!(data.to_raw(), raw, "{dt} to raw (byte order)");
            assert_eq!(
                TensorData::from_raw(dt, &[2], &raw).unwrap(),
                data,
                "{dt} from raw"
            );
            if let Some(contents) = data.to_contents() {
                assert_eq!(
                    TensorData::from_contents(dt, &[2], contents).unwrap(),
                    data,
                    "{dt} via contents"
                );
            } else {
                assert_eq!(dt, DataType::Fp16);
            }
        }
    }

    #[test]
    fn counts_and_shapes_are_checked() {
        let one = json!([1.0]);
        assert!(matches!(
            TensorData::from_json(DataType::Fp32, &[2], &one),
            Err(TensorError::ElementCount {
                expected: 2,
                actual: 1,
                ..
            })
        ));
        assert!(matches!(
            TensorData::from_json(DataType::Fp32, &[-1], &one),
            Err(TensorError::NegativeDimension { .. })
        ));
        assert!(matches!(
            TensorData::from_json(DataType::Fp32, &[i64::MAX, i64::MAX], &one),
            Err(TensorError::ShapeTooLarge { .. })
        ));
        assert!(matches!(
            TensorData::from_raw(DataType::Int32, &[2], &[0; 7]),
            Err(TensorError::RawSize { .. })
        ));
        assert!(matches!(
            TensorData::from_raw(DataType::Bytes, &[1], &[5, 0, 0, 0, b'a']),
            Err(TensorError::RawBytesTruncated { index: 0 })
        ));
        assert!(matches!(
            TensorData::from_raw(DataType::Bytes, &[2], &[1, 0, 0, 0, b'a']),
            Err(TensorError::RawBytesCount {
                expected: 2,
                actual: 1,
                ..
            })
        ));
        assert_eq!(element_count(&[]).unwrap(), 1);
        assert_eq!(element_count(&[3, 0]).unwrap(), 0);
    }

    #[test]
    fn out_of_range_and_wrong_kind_elements_are_named() {
        let err = TensorData::from_json(DataType::Uint8, &[3], &json!([1, 2, -1])).unwrap_err();
        assert_eq!(
            err,
            TensorError::BadElement {
                index: 2,
                value: "-1".into(),
                datatype: DataType::Uint8
            }
        );
        let err = TensorData::from_json(DataType::Int32, &[1], &json!([1.5])).unwrap_err();
        assert!(err.to_string().contains("not a valid INT32"), "{err}");
        let err = TensorData::from_json(DataType::Bool, &[1], &json!([1])).unwrap_err();
        assert!(err.to_string().contains("BOOL"), "{err}");
    }

    #[test]
    fn concat_and_split_are_inverse() {
        let parts = vec![
            TensorData::Int32(vec![1, 2]),
            TensorData::Int32(vec![]),
            TensorData::Int32(vec![3, 4, 5]),
        ];
        let joined = TensorData::concat(parts.clone()).unwrap();
        assert_eq!(joined, TensorData::Int32(vec![1, 2, 3, 4, 5]));
        assert_eq!(joined.split(&[2, 0, 3]).unwrap(), parts);
        assert_eq!(
            TensorData::concat(vec![TensorData::Int32(vec![1]), TensorData::Int64(vec![2])]),
            None
        );
        assert_eq!(TensorData::concat(Vec::new()), None);
        assert_eq!(TensorData::Bool(vec![true]).split(&[2]), None);
        let bytes = TensorData::Bytes(vec![b"a".to_vec(), b"b".to_vec()]);
        assert_eq!(
            bytes.split(&[1, 1]).unwrap()[1],
            TensorData::Bytes(vec![b"b".to_vec()])
        );
    }

    #[test]
    fn text_is_checked_for_bytes() {
        let bad = TensorData::Bytes(vec![b"ok".to_vec(), vec![0xff]]);
        assert_eq!(bad.check_text(), Err(TensorError::InvalidUtf8 { index: 1 }));
        let nul = TensorData::Bytes(vec![b"a\0b".to_vec()]);
        assert_eq!(nul.check_text(), Err(TensorError::NulInString { index: 0 }));
        assert!(
            TensorData::Bytes(vec!["é".as_bytes().to_vec()])
                .check_text()
                .is_ok()
        );
    }
}
