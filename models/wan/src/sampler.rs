//! The flow samplers the pipeline runs, behind one interface: UniPC as the model folder's
//! `scheduler/scheduler_config.json` configures it (the default, [`crate::scheduler`]) and
//! flow-matching Euler ([`crate::euler`], what step-distilled LoRAs are run with). Both read the
//! folder's config for `num_train_timesteps` and the default shift (`flow_shift`), which a
//! request may override.

use std::path::Path;
use std::str::FromStr;

use candle_core::Tensor;

use crate::euler::FlowEuler;
use crate::scheduler::{FlowUniPc, UniPcConfig};
use crate::{Error, Result};

/// Which sampler a request runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SamplerKind {
    /// UniPC multistep (diffusers' `UniPCMultistepScheduler`), as the folder configures it.
    #[default]
    UniPc,
    /// Flow-matching Euler (diffusers' `FlowMatchEulerDiscreteScheduler`).
    Euler,
}

impl SamplerKind {
    pub fn name(self) -> &'static str {
        match self {
            SamplerKind::UniPc => "unipc",
            SamplerKind::Euler => "euler",
        }
    }
}

impl FromStr for SamplerKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "unipc" => Ok(SamplerKind::UniPc),
            "euler" => Ok(SamplerKind::Euler),
            other => Err(Error::msg(format!(
                "unknown sampler {other:?}: expected unipc or euler"
            ))),
        }
    }
}

/// A sampler with its timesteps set.
#[derive(Debug, Clone)]
pub enum Sampler {
    // Boxed: UniPC carries its config and history; one sampler lives per run.
    UniPc(Box<FlowUniPc>),
    Euler(FlowEuler),
}

impl Sampler {
    /// The sampler of `kind` for `steps`, configured by the scheduler config at `config`;
    /// `shift` replaces the config's `flow_shift`.
    pub fn new(kind: SamplerKind, config: &Path, shift: Option<f64>, steps: usize) -> Result<Self> {
        let mut sampler = match kind {
            SamplerKind::UniPc => Sampler::UniPc(Box::new(FlowUniPc::from_config(config, shift)?)),
            SamplerKind::Euler => {
                let cfg: UniPcConfig =
                    kubewan_model_common::read_json(config, "a Wan scheduler config")?;
                let euler =
                    FlowEuler::new(cfg.num_train_timesteps, shift.unwrap_or(cfg.flow_shift))
                        .map_err(|e| Error::msg(format!("{}: {e}", config.display())))?;
                Sampler::Euler(euler)
            }
        };
        match &mut sampler {
            Sampler::UniPc(s) => s.set_timesteps(steps)?,
            Sampler::Euler(s) => s.set_timesteps(steps)?,
        }
        Ok(sampler)
    }

    /// The timesteps in order, as the transformer receives them.
    pub fn timesteps(&self) -> Vec<f32> {
        match self {
            Sampler::UniPc(s) => s.timesteps().iter().map(|&t| t as f32).collect(),
            Sampler::Euler(s) => s.timesteps().to_vec(),
        }
    }

    /// The training timesteps (1000 in every Wan folder): where `boundary_ratio` is measured.
    pub fn num_train_timesteps(&self) -> usize {
        match self {
            Sampler::UniPc(s) => s.config().num_train_timesteps,
            Sampler::Euler(s) => s.num_train_timesteps(),
        }
    }

    /// The flow shift the sigmas were computed with.
    pub fn shift(&self) -> f64 {
        match self {
            Sampler::UniPc(s) => s.config().flow_shift,
            Sampler::Euler(s) => s.shift(),
        }
    }

    /// Step `index` (0-based): `model_output` is the guided flow prediction for `sample` at
    /// timestep `index`; returns the sample at the next sigma.
    pub fn step(&mut self, index: usize, model_output: &Tensor, sample: &Tensor) -> Result<Tensor> {
        match self {
            Sampler::UniPc(s) => {
                let t = s.timesteps()[index];
                s.step(model_output, t, sample)
            }
            Sampler::Euler(s) => {
                let t = s.timesteps()[index];
                s.step(model_output, t, sample)
            }
        }
    }
}
