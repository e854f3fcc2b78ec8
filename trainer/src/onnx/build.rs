//! Helpers to assemble ONNX graphs: typed inputs/outputs, initialisers, nodes.

use prost::Message;

use super::proto::{
    AttributeProto, Dimension, DimensionValue, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    TensorProto, TensorShapeProto, TypeProto, TypeProtoTensor, ValueInfoProto, attribute_type, data_type,
};

/// The ONNX IR version we write (ONNX 1.15+ readers, ORT ≥ 1.17).
pub const IR_VERSION: i64 = 9;
/// The default-domain opset we write.
pub const OPSET: i64 = 17;

/// One axis of a declared shape.
#[derive(Debug, Clone)]
pub enum Dim {
    Fixed(i64),
    /// A dynamic axis, named as in HF Optimum exports (`batch_size`, `sequence_length`…).
    Named(&'static str),
}

/// A graph input or output of element type `elem` and shape `dims`.
pub fn value_info(name: &str, elem: i32, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Fixed(n) => DimensionValue::DimValue(*n),
                Dim::Named(s) => DimensionValue::DimParam((*s).to_owned()),
            }),
        })
        .collect();
    ValueInfoProto {
        name: name.to_owned(),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor { elem_type: elem, shape: Some(TensorShapeProto { dim }) }),
        }),
    }
}

/// An f32 initialiser, stored as raw little-endian bytes.
pub fn f32_tensor(name: &str, dims: &[i64], values: &[f32]) -> TensorProto {
    debug_assert_eq!(dims.iter().product::<i64>() as usize, values.len());
    TensorProto {
        name: name.to_owned(),
        dims: dims.to_vec(),
        data_type: data_type::FLOAT,
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

/// A node in the default domain.
pub fn node(
    op: &str,
    name: &str,
    inputs: &[&str],
    outputs: &[&str],
    attributes: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        op_type: op.to_owned(),
        name: name.to_owned(),
        input: inputs.iter().map(|s| (*s).to_owned()).collect(),
        output: outputs.iter().map(|s| (*s).to_owned()).collect(),
        attribute: attributes,
        domain: String::new(),
    }
}

/// An integer attribute.
pub fn attr_int(name: &str, i: i64) -> AttributeProto {
    AttributeProto { name: name.to_owned(), i, r#type: attribute_type::INT, ..Default::default() }
}

/// Wraps a graph into a model with our IR version and opset, serialised.
pub fn model_bytes(graph: GraphProto, producer_version: &str) -> Vec<u8> {
    ModelProto {
        ir_version: IR_VERSION,
        producer_name: "alignx-trainer".to_owned(),
        producer_version: producer_version.to_owned(),
        graph: Some(graph),
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: OPSET }],
        ..Default::default()
    }
    .encode_to_vec()
}
