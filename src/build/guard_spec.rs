//! Guard specs and their digest: what inputs an artifact accepts.
//!
//! The digest is the lowercase sha256 hex of the spec's JSON text with keys
//! sorted and Python's default separators, so Python code computing
//! `sha256(json.dumps(spec, sort_keys=True))` gets the same digest.
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::base::dtype::Dtype;
use crate::base::hex;

/// The guard for one input tensor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputGuard {
    /// Position among the forward inputs.
    pub index: usize,
    /// Shape the artifact was validated at.
    pub shape: Vec<i64>,
    /// Element type (stored as torch names it, e.g. `float32`).
    pub dtype: Dtype,
    /// Strides in elements.
    pub stride: Vec<i64>,
    /// Whether the input requires grad.
    pub requires_grad: bool,
}

/// The guard spec of an artifact: one entry per input, in input order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct GuardSpec(pub Vec<InputGuard>);

impl GuardSpec {
    /// The spec as Python's `json.dumps(spec, sort_keys=True)` writes it:
    /// keys sorted, `", "` between items and `": "` after keys.
    pub fn canonical_json(&self) -> String {
        let mut out = String::from("[");
        for (i, g) in self.0.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            out.push_str("{\"dtype\": ");
            out.push_str(&serde_json::to_string(g.dtype.name()).expect("strings serialise"));
            out.push_str(&format!(", \"index\": {}", g.index));
            out.push_str(&format!(", \"requires_grad\": {}", g.requires_grad));
            out.push_str(", \"shape\": ");
            push_int_list(&mut out, &g.shape);
            out.push_str(", \"stride\": ");
            push_int_list(&mut out, &g.stride);
            out.push('}');
        }
        out.push(']');
        out
    }

    /// Lowercase sha256 hex of [`Self::canonical_json`].
    pub fn digest(&self) -> String {
        hex::encode(&Sha256::digest(self.canonical_json().as_bytes()))
    }

    /// The per-input entries.
    pub fn inputs(&self) -> &[InputGuard] {
        &self.0
    }
}

fn push_int_list(out: &mut String, values: &[i64]) {
    out.push('[');
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(&v.to_string());
    }
    out.push(']');
}

/// Contiguous (row-major) strides for a shape.
pub fn contiguous_strides(shape: &[i64]) -> Vec<i64> {
    let mut strides = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1].max(1);
    }
    strides
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_matches_python_json_dumps_sort_keys() {
        let spec = GuardSpec(vec![InputGuard {
            index: 0,
            shape: vec![8, 32],
            dtype: Dtype::Float32,
            stride: vec![32, 1],
            requires_grad: false,
        }]);
        // json.dumps([{"index": 0, "shape": [8, 32], "dtype": "float32", "stride": [32, 1],
        //              "requires_grad": False}], sort_keys=True)
        assert_eq!(
            spec.canonical_json(),
            r#"[{"dtype": "float32", "index": 0, "requires_grad": false, "shape": [8, 32], "stride": [32, 1]}]"#
        );
        // hashlib.sha256(that.encode()).hexdigest()
        assert_eq!(spec.digest(), "c0e3ed3adc7800b37bf6f90a7156046c87111dcef83232afad8a9e0addde055f");
    }

    #[test]
    fn strides_are_row_major() {
        assert_eq!(contiguous_strides(&[8, 16, 4, 4]), vec![256, 16, 4, 1]);
        assert_eq!(contiguous_strides(&[5]), vec![1]);
        assert_eq!(contiguous_strides(&[]), Vec::<i64>::new());
    }
}
