//! Element types: `f32`, `bf16`, `f16` for values, `u32` for indices (labels, arg-max positions,
//! the step counter).
//!
//! Master weights, gradients and optimizer state are always `f32`; `bf16`/`f16` tensors appear
//! where a forward runs in reduced precision ([`crate::layer::Precision::Bf16`]): the inputs of
//! matrix products and convolutions. Conversions are explicit ([`crate::Tensor::to_dtype`]) and
//! round to nearest even, as PyTorch's `.to(torch.bfloat16)`.

use half::{bf16, f16};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
    U32,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }

    /// A floating-point type (everything but `U32`).
    pub fn is_float(self) -> bool {
        self != DType::U32
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::U32 => "u32",
        }
    }

    /// Round an `f32` to this type and back (the value a tensor of this type would hold).
    pub fn round(self, v: f32) -> f32 {
        match self {
            DType::F32 | DType::U32 => v,
            DType::BF16 => bf16::from_f32(v).to_f32(),
            DType::F16 => f16::from_f32(v).to_f32(),
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
