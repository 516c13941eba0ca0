//! Tensor element types, one list for guard specs, the guard table and the
//! C ABI's `TEZZERET_DTYPE_*` codes.
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::error::{Error, Result};

/// An element type, named as torch names it without the `torch.` prefix.
/// The discriminant is the code stored in guard slots and used by the C ABI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Dtype {
    /// `float32`.
    Float32 = 0,
    /// `float64`.
    Float64 = 1,
    /// `float16`.
    Float16 = 2,
    /// `bfloat16`.
    BFloat16 = 3,
    /// `int64`.
    Int64 = 4,
    /// `int32`.
    Int32 = 5,
    /// `int16`.
    Int16 = 6,
    /// `int8`.
    Int8 = 7,
    /// `uint8`.
    Uint8 = 8,
    /// `bool`.
    Bool = 9,
}

impl Dtype {
    /// Every dtype, in code order.
    pub const ALL: [Dtype; 10] = [
        Dtype::Float32,
        Dtype::Float64,
        Dtype::Float16,
        Dtype::BFloat16,
        Dtype::Int64,
        Dtype::Int32,
        Dtype::Int16,
        Dtype::Int8,
        Dtype::Uint8,
        Dtype::Bool,
    ];

    /// The torch name (`float32`, …).
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Float32 => "float32",
            Dtype::Float64 => "float64",
            Dtype::Float16 => "float16",
            Dtype::BFloat16 => "bfloat16",
            Dtype::Int64 => "int64",
            Dtype::Int32 => "int32",
            Dtype::Int16 => "int16",
            Dtype::Int8 => "int8",
            Dtype::Uint8 => "uint8",
            Dtype::Bool => "bool",
        }
    }

    /// The numeric code (guard slots, `TEZZERET_DTYPE_*`).
    pub fn code(self) -> u32 {
        self as u32
    }

    /// The dtype of a code, if it is one.
    pub fn from_code(code: u32) -> Option<Dtype> {
        Dtype::ALL.get(code as usize).copied()
    }

    /// The dtype of a torch name.
    pub fn from_name(name: &str) -> Result<Dtype> {
        Dtype::ALL
            .into_iter()
            .find(|d| d.name() == name)
            .ok_or_else(|| Error::invalid(format!("unknown dtype {name:?}")))
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for Dtype {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Dtype {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Dtype::from_name(&name).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::Dtype;

    #[test]
    fn codes_and_names_round_trip() {
        for d in Dtype::ALL {
            assert_eq!(Dtype::from_code(d.code()), Some(d));
            assert_eq!(Dtype::from_name(d.name()).unwrap(), d);
        }
        assert_eq!(Dtype::from_code(10), None);
        assert!(Dtype::from_name("complex64").is_err());
    }
}
