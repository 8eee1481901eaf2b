//! The wire dtypes of SPEC §5.

/// A wire dtype. `Bytes` is the variable-length byte-string dtype (item size 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F16,
    BF16,
    F32,
    F64,
    I8,
    I16,
    I32,
    I64,
    U8,
    Bool,
    Bytes,
}

impl DType {
    /// Every dtype, in the SPEC's (and contract/dtypes.py's) order.
    pub const ALL: [DType; 11] = [
        DType::F16,
        DType::BF16,
        DType::F32,
        DType::F64,
        DType::I8,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::U8,
        DType::Bool,
        DType::Bytes,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::I8 => "i8",
            DType::I16 => "i16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::U8 => "u8",
            DType::Bool => "bool",
            DType::Bytes => "bytes",
        }
    }

    /// Bytes per element; 0 for `bytes`.
    pub fn itemsize(self) -> u64 {
        match self {
            DType::I8 | DType::U8 | DType::Bool => 1,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
            DType::Bytes => 0,
        }
    }

    pub fn from_name(s: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == s)
    }

    /// "f16, bf16, ..., bytes": what an unknown-dtype message lists.
    pub fn known() -> String {
        DType::ALL.map(|d| d.name()).join(", ")
    }
}
