//! diffusers' `FlowMatchEulerDiscreteScheduler` as step-distilled Wan LoRAs (LightX2V,
//! Lightning, CausVid) are run with it: a static `shift`, no dynamic shifting, deterministic
//! steps `x + (σ_next − σ)·v`.
//!
//! The arithmetic follows diffusers to the rounding: the training sigmas (and so `sigma_min`)
//! in f32, the inference timesteps as a float64 `numpy.linspace` between them, shifted a second
//! time in float64, then stored as f32 (timesteps = f32 sigmas × num_train_timesteps); the step
//! in f32. Timesteps are floats here (UniPC's are integers).

use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// Flow-matching Euler over shifted sigmas.
#[derive(Debug, Clone)]
pub struct FlowEuler {
    num_train_timesteps: usize,
    shift: f64,
    /// The largest and smallest training sigmas after the shift, as diffusers keeps them (f32
    /// values read as f64).
    sigma_max: f64,
    sigma_min: f64,
    sigmas: Vec<f32>,
    timesteps: Vec<f32>,
    step_index: Option<usize>,
}

/// `shift·σ / (1 + (shift − 1)·σ)`, the flow shift of a sigma, in f32 as torch computes it on
/// the training sigmas (the Python scalars `shift` and `shift - 1` rounded to f32).
fn shift_f32(shift: f64, sigma: f32) -> f32 {
    shift as f32 * sigma / (1.0 + (shift - 1.0) as f32 * sigma)
}

impl FlowEuler {
    /// The scheduler for `num_train_timesteps` (1000 in every Wan folder) and `shift` (> 0).
    pub fn new(num_train_timesteps: usize, shift: f64) -> Result<Self> {
        if num_train_timesteps == 0 {
            return Err(Error::msg(
                "Euler scheduler: num_train_timesteps must be positive",
            ));
        }
        if !(shift.is_finite() && shift > 0.0) {
            return Err(Error::msg(format!(
                "Euler scheduler: the shift must be positive, got {shift}"
            )));
        }
        let n = num_train_timesteps;
        // Training sigmas: linspace(1, n, n)[::-1] / n, shifted: from 1 down to 1/n.
        Ok(Self {
            num_train_timesteps: n,
            shift,
            sigma_max: shift_f32(shift, 1.0) as f64,
            sigma_min: shift_f32(shift, 1.0 / n as f32) as f64,
            sigmas: Vec::new(),
            timesteps: Vec::new(),
            step_index: None,
        })
    }

    pub fn shift(&self) -> f64 {
        self.shift
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.num_train_timesteps
    }

    /// Computes the sigmas and timesteps for `steps` and resets the step counter.
    pub fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        if steps == 0 {
            return Err(Error::msg("Euler scheduler: steps must be at least 1"));
        }
        let n = self.num_train_timesteps as f64;
        // numpy.linspace(sigma_max·n, sigma_min·n, steps): i·step + start, the end set exactly.
        let (start, stop) = (self.sigma_max * n, self.sigma_min * n);
        let step = (stop - start) / (steps as f64 - 1.0);
        let sigmas: Vec<f32> = (0..steps)
            .map(|i| {
                let t = match i {
                    0 => start,
                    i if i == steps - 1 => stop,
                    i => i as f64 * step + start,
                };
                let s = t / n;
                (self.shift * s / (1.0 + (self.shift - 1.0) * s)) as f32
            })
            .collect();
        self.timesteps = sigmas
            .iter()
            .map(|s| s * self.num_train_timesteps as f32)
            .collect();
        self.sigmas = sigmas.into_iter().chain(std::iter::once(0.0)).collect();
        self.step_index = None;
        Ok(())
    }

    /// The timesteps (diffusers' `scheduler.timesteps`, f32).
    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    /// The sigmas, length steps + 1 ending with 0 (diffusers' `scheduler.sigmas`).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// diffusers' `index_for_timestep`: the second match when a timestep occurs twice.
    fn index_for_timestep(&self, timestep: f32) -> Option<usize> {
        let hits: Vec<usize> = (0..self.timesteps.len())
            .filter(|&i| self.timesteps[i] == timestep)
            .collect();
        hits.get(usize::from(hits.len() > 1)).copied()
    }

    /// One step: `model_output` is the (guided) flow prediction at `timestep` for `sample`;
    /// returns the sample at the next sigma, in f32.
    pub fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f32,
        sample: &Tensor,
    ) -> Result<Tensor> {
        let index = match self.step_index {
            Some(i) => i,
            None => self.index_for_timestep(timestep).ok_or_else(|| {
                Error::msg(format!(
                    "Euler scheduler: timestep {timestep} is not one of {:?} (set_timesteps first)",
                    self.timesteps
                ))
            })?,
        };
        if index >= self.timesteps.len() {
            return Err(Error::msg(format!(
                "Euler scheduler: step {} past the last of {} steps",
                index + 1,
                self.timesteps.len()
            )));
        }
        let dt = self.sigmas[index + 1] - self.sigmas[index];
        let velocity = model_output.to_dtype(DType::F32)?.affine(dt as f64, 0.0)?;
        let prev = (sample.to_dtype(DType::F32)? + velocity)?;
        self.step_index = Some(index + 1);
        Ok(prev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_step_starts_at_the_largest_timestep_and_bad_settings_are_refused() {
        let mut euler = FlowEuler::new(1000, 5.0).unwrap();
        euler.set_timesteps(1).unwrap();
        assert_eq!(euler.timesteps(), [1000.0]);
        assert_eq!(euler.sigmas(), [1.0, 0.0]);
        assert!(FlowEuler::new(1000, 0.0).is_err());
        assert!(euler.set_timesteps(0).is_err());
    }
}
