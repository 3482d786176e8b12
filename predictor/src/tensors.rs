//! Tensors between the protocol's form and ONNX Runtime's.

use meshserve_proto::{DataType, TensorData};
use ort::value::{DynValue, Tensor, TensorElementType, ValueType};

/// The protocol datatype of an ONNX element type, if the protocol can carry it.
pub(crate) fn datatype_of(ty: TensorElementType) -> Option<DataType> {
    Some(match ty {
        TensorElementType::Bool => DataType::Bool,
        TensorElementType::Uint8 => DataType::Uint8,
        TensorElementType::Uint16 => DataType::Uint16,
        TensorElementType::Uint32 => DataType::Uint32,
        TensorElementType::Uint64 => DataType::Uint64,
        TensorElementType::Int8 => DataType::Int8,
        TensorElementType::Int16 => DataType::Int16,
        TensorElementType::Int32 => DataType::Int32,
        TensorElementType::Int64 => DataType::Int64,
        TensorElementType::Float16 => DataType::Fp16,
        TensorElementType::Float32 => DataType::Fp32,
        TensorElementType::Float64 => DataType::Fp64,
        TensorElementType::String => DataType::Bytes,
        _ => return None,
    })
}

pub(crate) fn to_ort(shape: Vec<i64>, data: TensorData) -> ort::Result<DynValue> {
    Ok(match data {
        TensorData::Bool(v) => Tensor::from_array((shape, v))?.into_dyn(),
        TensorData::Uint8(v) => Tensor::from_array((shape, v))?.into_dyn(),
        TensorData::Uint16(v) => Tensor::from_array((shape, v))?.into_dyn(),
        TensorData::Uint32(v) => Tensor::from_array((shape, v))?.into_dyn(),
        TensorData::Uint64(v) => Tensor::from_array((shape, v))?.into_dyn(),
        TensorData::Int8(v) => Tensor::from_array((shape, v))?.into_dyn(),
        TensorData::Int16(v) => Tensor::from_array((shape, v))?.into_dyn(),
        TensorData::Int32(v) => Tensor::from_array((shape, v))?.into_dyn(),
        TensorData::Int64(v) => Tensor::from_array((shape, v))?.into_dyn(),
        TensorData::Fp16(v) => Tensor::from_array((shape, v))?.into_dyn(),
        TensorData::Fp32(v) => Tensor::from_array((shape, v))?.into_dyn(),
        TensorData::Fp64(v) => Tensor::from_array((shape, v))?.into_dyn(),
        TensorData::Bytes(v) => {
            // UTF-8 was checked in validation; a lossy conversion keeps this total.
            let strings: Vec<String> = v
                .into_iter()
                .map(|b| {
                    String::from_utf8(b)
                        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
                })
                .collect();
            Tensor::from_string_array((shape, &strings[..]))?.into_dyn()
        }
    })
}

pub(crate) fn from_ort(value: &DynValue) -> Result<(Vec<i64>, TensorData), String> {
    fn take<T: ort::value::PrimitiveTensorElementType + Clone>(
        value: &DynValue,
    ) -> ort::Result<(Vec<i64>, Vec<T>)> {
        let (shape, data) = value.try_extract_tensor::<T>()?;
        Ok((shape.to_vec(), data.to_vec()))
    }
    let ValueType::Tensor { ty, .. } = value.dtype() else {
        return Err(format!(
            "the model produced a {}, not a tensor",
            value.dtype()
        ));
    };
    let datatype =
        datatype_of(*ty).ok_or_else(|| format!("element type {ty} cannot be returned"))?;
    let result = match datatype {
        DataType::Bool => take(value).map(|(s, d)| (s, TensorData::Bool(d))),
        DataType::Uint8 => take(value).map(|(s, d)| (s, TensorData::Uint8(d))),
        DataType::Uint16 => take(value).map(|(s, d)| (s, TensorData::Uint16(d))),
        DataType::Uint32 => take(value).map(|(s, d)| (s, TensorData::Uint32(d))),
        DataType::Uint64 => take(value).map(|(s, d)| (s, TensorData::Uint64(d))),
        DataType::Int8 => take(value).map(|(s, d)| (s, TensorData::Int8(d))),
        DataType::Int16 => take(value).map(|(s, d)| (s, TensorData::Int16(d))),
        DataType::Int32 => take(value).map(|(s, d)| (s, TensorData::Int32(d))),
        DataType::Int64 => take(value).map(|(s, d)| (s, TensorData::Int64(d))),
        DataType::Fp16 => take(value).map(|(s, d)| (s, TensorData::Fp16(d))),
        DataType::Fp32 => take(value).map(|(s, d)| (s, TensorData::Fp32(d))),
        DataType::Fp64 => take(value).map(|(s, d)| (s, TensorData::Fp64(d))),
        DataType::Bytes => value.try_extract_strings().map(|(s, d)| {
            (
                s.to_vec(),
                TensorData::Bytes(d.into_iter().map(String::into_bytes).collect()),
            )
        }),
    };
    result.map_err(|e| e.to_string())
}
