//! Random weights for real-sized models without a checkpoint (benchmarks,
//! memory checks): a candle var-builder backend that makes every tensor a
//! model asks for, under its real name and shape, directly on the device.
//!
//! Values follow a typical initialisation, so activations stay finite and
//! timings are those of real data (never zeros, which some kernels run
//! faster): norm and layer-scale weights (1-D, `norm` or `gamma` in the name)
//! are ones, other 1-D tensors (biases) N(0, 0.02), matrices and kernels
//! N(0, 1/√fan_in).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;

/// The backend; clones share one parameter count.
#[derive(Clone, Default)]
pub struct RandomWeights {
    params: Arc<AtomicU64>,
}

impl RandomWeights {
    /// A var builder of `dtype` on `device` whose every tensor is random.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// Parameters handed out so far.
    pub fn params(&self) -> u64 {
        self.params.load(Ordering::Relaxed)
    }
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let dims = s.dims();
        let fan_in: usize = dims.iter().skip(1).product::<usize>().max(1);
        let t = if dims.len() == 1 && (name.contains("norm") || name.ends_with("gamma")) {
            Tensor::ones(s.clone(), DType::F32, dev)?
        } else if dims.len() == 1 {
            (Tensor::randn(0f32, 1f32, s.clone(), dev)? * 0.02)?
        } else {
            Tensor::randn(0f32, (fan_in as f32).powf(-0.5), s.clone(), dev)?
        };
        self.params
            .fetch_add(t.elem_count() as u64, Ordering::Relaxed);
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("random weights need a shape: {name} was asked for without one")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_are_random_with_norms_at_one_and_counted() {
        let weights = RandomWeights::default();
        let vb = weights.var_builder(DType::BF16, &Device::Cpu);
        let w = vb.get((64, 256), "layer.weight").unwrap();
        assert_eq!(w.dtype(), DType::BF16);
        let w = w.to_dtype(DType::F32).unwrap();
        let std = w
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt();
        assert!((std - 1.0 / 16.0).abs() < 0.01, "std {std}");
        let norm: Vec<f32> = vb
            .get(8, "norm1.weight")
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(norm, [1.0; 8]);
        assert_eq!(weights.params(), 64 * 256 + 8);
    }
}
