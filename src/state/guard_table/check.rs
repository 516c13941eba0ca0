//! The guard check of the hot path: input tensor metadata against a slot
//! read consistently, without locks or allocation.
use super::slot::{self, SlotBytes, MAX_INPUTS, MAX_RANK};

/// Metadata of one input tensor, as a caller presents it for a guard check.
#[derive(Debug, Clone, Copy)]
pub struct TensorMeta<'a> {
    /// dtype code (`Dtype::code`).
    pub dtype: u32,
    /// Sizes.
    pub shape: &'a [i64],
    /// Strides in elements.
    pub stride: &'a [i64],
}

/// The outcome of a guard check: a match, or the first precise reason it
/// does not match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The inputs match; the artifact's sha256.
    Match {
        /// sha256 of the matching artifact.
        checksum: [u8; 32],
    },
    /// No guard entry for the blueprint.
    UnknownBlueprint,
    /// The slot could not be read consistently (torn or mid-update).
    Unreadable,
    /// Wrong number of inputs.
    InputCount {
        /// Inputs the artifact takes.
        expected: usize,
        /// Inputs given.
        actual: usize,
    },
    /// An input has the wrong dtype (codes as `Dtype::code`).
    Dtype {
        /// Which input.
        input: usize,
        /// Expected dtype code.
        expected: u32,
        /// Given dtype code.
        actual: u32,
    },
    /// An input has the wrong number of dimensions.
    Rank {
        /// Which input.
        input: usize,
        /// Expected rank.
        expected: usize,
        /// Given rank.
        actual: usize,
    },
    /// A dimension has the wrong size.
    Shape {
        /// Which input.
        input: usize,
        /// Which dimension.
        dim: usize,
        /// Expected size.
        expected: i64,
        /// Given size.
        actual: i64,
    },
    /// A dimension has the wrong stride (the artifact wants this layout).
    Stride {
        /// Which input.
        input: usize,
        /// Which dimension.
        dim: usize,
        /// Expected stride.
        expected: i64,
        /// Given stride.
        actual: i64,
    },
}

/// Checks inputs against a consistent slot's guards. With the
/// dynamic-batch flag, dim 0 may take any size of at least 1 (the same for
/// every input); an empty batch is never a match.
pub fn check_inputs(b: &SlotBytes, inputs: &[TensorMeta<'_>]) -> Verdict {
    let n = slot::declared_inputs(b);
    let dynamic = slot::dynamic_batch(b);
    if n != inputs.len() || n > MAX_INPUTS {
        return Verdict::InputCount { expected: n, actual: inputs.len() };
    }
    let batch = inputs.first().and_then(|t| t.shape.first().copied());
    for (i, t) in inputs.iter().enumerate() {
        let dtype = slot::input_dtype(b, i);
        if dtype != t.dtype {
            return Verdict::Dtype { input: i, expected: dtype, actual: t.dtype };
        }
        let rank = slot::input_rank(b, i);
        if rank != t.shape.len() || rank != t.stride.len() || rank > MAX_RANK {
            return Verdict::Rank { input: i, expected: rank, actual: t.shape.len() };
        }
        // Sizes first: a wrong size is the more basic reason.
        for d in 0..rank {
            let expected = slot::input_size(b, i, d);
            let actual = t.shape[d];
            let free = dynamic && d == 0 && actual >= 1 && Some(actual) == batch;
            if actual != expected && !free {
                return Verdict::Shape { input: i, dim: d, expected, actual };
            }
        }
        for d in 0..rank {
            let (expected, actual) = (slot::input_stride(b, i, d), t.stride[d]);
            // A dimension of size 1 has no meaningful stride.
            if actual != expected && t.shape[d] != 1 {
                return Verdict::Stride { input: i, dim: d, expected, actual };
            }
        }
    }
    Verdict::Match { checksum: slot::checksum(b) }
}
