//! CPU backends for kiln.
//!
//! - [`NdArray`]: Burn's NdArray backend in f32, the design card's default CPU
//!   backend.
//! - [`Flex`]: Burn's Flex backend, faster on CPU, with bf16 and f16 tensors.
//!
//! Both are built with their threading and SIMD features on (Burn's facade only
//! enables them through its default features, which kiln turns off).
//! [`CpuBackend`] names them for run-time selection (`--backend ndarray|flex`).

use std::fmt;
use std::str::FromStr;

use burn::backend::Autodiff;

/// Burn's NdArray backend with f32 floats.
pub type NdArray = burn::backend::NdArray<f32>;
/// Burn's Flex CPU backend.
pub type Flex = burn::backend::Flex;
/// NdArray with automatic differentiation, for training.
pub type NdArrayAutodiff = Autodiff<NdArray>;
/// Flex with automatic differentiation, for training.
pub type FlexAutodiff = Autodiff<Flex>;

/// A CPU backend chosen at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuBackend {
    /// [`NdArray`] (f32).
    NdArray,
    /// [`Flex`].
    #[default]
    Flex,
}

impl CpuBackend {
    /// Every accepted name, for error messages.
    pub const ACCEPTED: &'static str = "ndarray, flex";
}

impl FromStr for CpuBackend {
    type Err = kiln_core::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "ndarray" => Ok(CpuBackend::NdArray),
            "flex" => Ok(CpuBackend::Flex),
            _ => Err(kiln_core::Error::invalid("backend", s, Self::ACCEPTED)),
        }
    }
}

impl fmt::Display for CpuBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CpuBackend::NdArray => "ndarray",
            CpuBackend::Flex => "flex",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_parse_by_name_and_refuse_others() {
        assert_eq!(
            "NdArray".parse::<CpuBackend>().unwrap(),
            CpuBackend::NdArray
        );
        assert_eq!("flex".parse::<CpuBackend>().unwrap(), CpuBackend::Flex);
        let err = "tch".parse::<CpuBackend>().unwrap_err().to_string();
        assert!(
            err.contains("\"tch\"") && err.contains("ndarray, flex"),
            "{err}"
        );
    }
}
