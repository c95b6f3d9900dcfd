//! [`FusedOps`] with Burn's ops (the trait's defaults) for the backends that have no
//! kernels of kiln's.

#[cfg(any(feature = "ndarray", feature = "cuda"))]
use crate::FusedOps;

#[cfg(feature = "ndarray")]
impl FusedOps for burn::backend::NdArray<f32> {}

#[cfg(feature = "cuda")]
impl FusedOps for burn::backend::Cuda<f32, i32> {}
