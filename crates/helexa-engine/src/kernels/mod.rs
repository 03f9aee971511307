//! CPU compute kernels: quantized dot products, the parallel matmul over
//! memory-mapped weights, and the f32 vector ops of the forward pass.

pub mod matmul;
pub mod ops;
pub mod quant;
pub mod repack;
pub mod team;
