//! Element types as the store's index names them: torch dtype strings such as
//! `"torch.bfloat16"`, and how safetensors dtypes map onto them.

use std::fmt;

/// A tensor element type the store can hold.
///
/// The names are what `str(torch.dtype)` prints, which is what the reference
/// writer puts in `tensor_index.json` and what its loaders parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TorchDtype {
    Float16,
    BFloat16,
    Float32,
    Float64,
    Int8,
    Int16,
    Int32,
    Int64,
    UInt8,
    Bool,
    Float8E4M3Fn,
    Float8E5M2,
}

impl TorchDtype {
    /// Every supported dtype, in a stable order (for messages and tests).
    pub const ALL: [TorchDtype; 12] = [
        Self::Float16,
        Self::BFloat16,
        Self::Float32,
        Self::Float64,
        Self::Int8,
        Self::Int16,
        Self::Int32,
        Self::Int64,
        Self::UInt8,
        Self::Bool,
        Self::Float8E4M3Fn,
        Self::Float8E5M2,
    ];

    /// The torch name stored in the index, e.g. `"torch.float16"`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Float16 => "torch.float16",
            Self::BFloat16 => "torch.bfloat16",
            Self::Float32 => "torch.float32",
            Self::Float64 => "torch.float64",
            Self::Int8 => "torch.int8",
            Self::Int16 => "torch.int16",
            Self::Int32 => "torch.int32",
            Self::Int64 => "torch.int64",
            Self::UInt8 => "torch.uint8",
            Self::Bool => "torch.bool",
            Self::Float8E4M3Fn => "torch.float8_e4m3fn",
            Self::Float8E5M2 => "torch.float8_e5m2",
        }
    }

    /// Parses a torch name as written in an index.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Bytes per element.
    pub fn size_bytes(self) -> u64 {
        match self {
            Self::Int8 | Self::UInt8 | Self::Bool | Self::Float8E4M3Fn | Self::Float8E5M2 => 1,
            Self::Float16 | Self::BFloat16 | Self::Int16 => 2,
            Self::Float32 | Self::Int32 => 4,
            Self::Float64 | Self::Int64 => 8,
        }
    }

    /// The torch dtype for a safetensors dtype, or `None` for the ones torch's
    /// store loaders cannot restore (unsigned 16-64 bit, sub-byte floats, ...).
    pub fn from_safetensors(dtype: safetensors::Dtype) -> Option<Self> {
        use safetensors::Dtype as S;
        Some(match dtype {
            S::F16 => Self::Float16,
            S::BF16 => Self::BFloat16,
            S::F32 => Self::Float32,
            S::F64 => Self::Float64,
            S::I8 => Self::Int8,
            S::I16 => Self::Int16,
            S::I32 => Self::Int32,
            S::I64 => Self::Int64,
            S::U8 => Self::UInt8,
            S::BOOL => Self::Bool,
            S::F8_E4M3 => Self::Float8E4M3Fn,
            S::F8_E5M2 => Self::Float8E5M2,
            _ => return None,
        })
    }

    /// The safetensors names we accept, for error messages.
    pub fn supported_safetensors_names() -> &'static str {
        "F16, BF16, F32, F64, I8, I16, I32, I64, U8, BOOL, F8_E4M3, F8_E5M2"
    }
}

impl fmt::Display for TorchDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for dtype in TorchDtype::ALL {
            assert_eq!(TorchDtype::from_name(dtype.name()), Some(dtype));
        }
        assert_eq!(TorchDtype::from_name("torch.complex64"), None);
    }

    #[test]
    fn safetensors_mapping_matches_the_issue() {
        use safetensors::Dtype as S;
        let expected = [
            (S::F16, "torch.float16", 2),
            (S::BF16, "torch.bfloat16", 2),
            (S::F32, "torch.float32", 4),
            (S::F64, "torch.float64", 8),
            (S::I8, "torch.int8", 1),
            (S::I16, "torch.int16", 2),
            (S::I32, "torch.int32", 4),
            (S::I64, "torch.int64", 8),
            (S::U8, "torch.uint8", 1),
            (S::BOOL, "torch.bool", 1),
            (S::F8_E4M3, "torch.float8_e4m3fn", 1),
            (S::F8_E5M2, "torch.float8_e5m2", 1),
        ];
        for (st, name, size) in expected {
            let dtype = TorchDtype::from_safetensors(st).unwrap();
            assert_eq!(dtype.name(), name);
            assert_eq!(dtype.size_bytes(), size);
            assert_eq!(dtype.size_bytes() * 8, st.bitsize() as u64);
        }
        for unsupported in [S::U16, S::U32, S::U64, S::F4, S::C64, S::F8_E8M0] {
            assert_eq!(TorchDtype::from_safetensors(unsupported), None);
        }
    }
}
