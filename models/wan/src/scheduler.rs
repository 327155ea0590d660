//! `UniPCMultistepScheduler` with flow-matching sigmas, as Wan2.1's diffusers folders configure it
//! (`use_flow_sigmas`, `flow_shift`, `prediction_type = "flow_prediction"`, bh1/bh2, any
//! `solver_order`, `lower_order_final`, `final_sigmas_type`, `disable_corrector`).
//!
//! Sigmas are computed in f64 and stored as f32, and the integer timesteps truncate `sigma * 1000`,
//! as diffusers does with numpy; the per-step scalar algebra runs in f32 like diffusers' 0-d tensors.

use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;

use crate::{Error, Result};

/// The fields of `scheduler/scheduler_config.json` that this scheduler reads.
#[derive(Debug, Clone, Deserialize)]
pub struct UniPcConfig {
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    #[serde(default = "default_train_timesteps")]
    pub num_train_timesteps: usize,
    #[serde(default = "default_order")]
    pub solver_order: usize,
    #[serde(default = "default_prediction")]
    pub prediction_type: String,
    #[serde(default)]
    pub thresholding: bool,
    #[serde(default = "default_true")]
    pub predict_x0: bool,
    #[serde(default = "default_solver_type")]
    pub solver_type: String,
    #[serde(default = "default_true")]
    pub lower_order_final: bool,
    #[serde(default)]
    pub disable_corrector: Vec<usize>,
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    #[serde(default)]
    pub use_beta_sigmas: bool,
    #[serde(default)]
    pub use_flow_sigmas: bool,
    #[serde(default = "default_shift")]
    pub flow_shift: f64,
    #[serde(default = "default_final_sigmas")]
    pub final_sigmas_type: String,
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    #[serde(default)]
    pub shift_terminal: Option<f64>,
    #[serde(default)]
    pub solver_p: Option<serde_json::Value>,
}

fn default_train_timesteps() -> usize {
    1000
}
fn default_order() -> usize {
    2
}
fn default_prediction() -> String {
    "epsilon".into()
}
fn default_true() -> bool {
    true
}
fn default_solver_type() -> String {
    "bh2".into()
}
fn default_shift() -> f64 {
    1.0
}
fn default_final_sigmas() -> String {
    "zero".into()
}

impl UniPcConfig {
    /// Rejects configurations this implementation does not reproduce, naming the field.
    fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::msg(format!("UniPC scheduler: unsupported {what}")));
        if let Some(name) = &self.class_name
            && name != "UniPCMultistepScheduler"
        {
            return bad(&format!(
                "_class_name {name:?} (expected UniPCMultistepScheduler)"
            ));
        }
        if !self.use_flow_sigmas {
            return bad("use_flow_sigmas = false (Wan uses flow sigmas)");
        }
        if self.use_karras_sigmas || self.use_exponential_sigmas || self.use_beta_sigmas {
            return bad("karras/exponential/beta sigmas");
        }
        if self.prediction_type != "flow_prediction" {
            return bad(&format!("prediction_type {:?}", self.prediction_type));
        }
        if !self.predict_x0 {
            return bad("predict_x0 = false with flow_prediction");
        }
        if self.thresholding {
            return bad("thresholding");
        }
        if self.use_dynamic_shifting {
            return bad("use_dynamic_shifting");
        }
        if self.solver_p.as_ref().is_some_and(|v| !v.is_null()) {
            return bad("solver_p");
        }
        if self.solver_type != "bh1" && self.solver_type != "bh2" {
            return bad(&format!("solver_type {:?}", self.solver_type));
        }
        if self.final_sigmas_type != "zero" && self.final_sigmas_type != "sigma_min" {
            return bad(&format!("final_sigmas_type {:?}", self.final_sigmas_type));
        }
        if self.solver_order == 0 {
            return bad("solver_order 0");
        }
        if self.flow_shift <= 0.0 {
            return bad(&format!("flow_shift {}", self.flow_shift));
        }
        Ok(())
    }
}

/// UniPC multistep (predictor + corrector) over flow sigmas.
#[derive(Debug, Clone)]
pub struct FlowUniPc {
    config: UniPcConfig,
    sigmas: Vec<f32>,
    timesteps: Vec<i64>,
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    this_order: usize,
    last_sample: Option<Tensor>,
    step_index: Option<usize>,
}

impl FlowUniPc {
    /// Reads `scheduler_config.json`; `shift_override` replaces its `flow_shift` (the CLI's `--flow-shift`).
    pub fn from_config(path: &Path, shift_override: Option<f64>) -> Result<Self> {
        let config: UniPcConfig =
            kubewan_model_common::read_json(path, "a UniPC scheduler config")?;
        Self::new(config, shift_override)
            .map_err(|e| Error::msg(format!("{}: {e}", path.display())))
    }

    pub fn new(mut config: UniPcConfig, shift_override: Option<f64>) -> Result<Self> {
        if let Some(shift) = shift_override {
            config.flow_shift = shift;
        }
        config.validate()?;
        let order = config.solver_order;
        Ok(Self {
            config,
            sigmas: Vec::new(),
            timesteps: Vec::new(),
            model_outputs: vec![None; order],
            lower_order_nums: 0,
            this_order: 1,
            last_sample: None,
            step_index: None,
        })
    }

    pub fn config(&self) -> &UniPcConfig {
        &self.config
    }

    /// Solver order (used by callers for progress accounting, like diffusers' `scheduler.order`).
    pub fn order(&self) -> usize {
        1
    }

    /// Computes the sigmas and timesteps for `num_inference_steps` and resets the solver state.
    pub fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        if num_inference_steps == 0 {
            return Err(Error::msg(
                "UniPC scheduler: num_inference_steps must be at least 1",
            ));
        }
        let n_train = self.config.num_train_timesteps as f64;
        // numpy.linspace(1, 1/n_train, n + 1)[:-1]: start + i * step, the endpoint set exactly.
        let num = num_inference_steps + 1;
        let (start, stop) = (1.0f64, 1.0 / n_train);
        let step = (stop - start) / (num - 1) as f64;
        let mut sigmas: Vec<f64> = (0..num)
            .map(|i| {
                if i == num - 1 {
                    stop
                } else {
                    start + i as f64 * step
                }
            })
            .take(num_inference_steps)
            .collect();
        let shift = self.config.flow_shift;
        for s in sigmas.iter_mut() {
            *s = shift * *s / (1.0 + (shift - 1.0) * *s);
        }
        if let Some(terminal) = self.config.shift_terminal
            && terminal != 0.0
        {
            let last = 1.0 - sigmas[sigmas.len() - 1];
            let scale = last / (1.0 - terminal);
            for s in sigmas.iter_mut() {
                *s = 1.0 - (1.0 - *s) / scale;
            }
        }
        if (sigmas[0] - 1.0).abs() < 1e-6 {
            sigmas[0] -= 1e-6;
        }
        // float64 -> int64 casts truncate toward zero.
        self.timesteps = sigmas.iter().map(|s| (s * n_train) as i64).collect();
        let last = if self.config.final_sigmas_type == "sigma_min" {
            sigmas[sigmas.len() - 1]
        } else {
            0.0
        };
        self.sigmas = sigmas
            .iter()
            .map(|&s| s as f32)
            .chain(std::iter::once(last as f32))
            .collect();
        self.model_outputs = vec![None; self.config.solver_order];
        self.lower_order_nums = 0;
        self.this_order = 1;
        self.last_sample = None;
        self.step_index = None;
        Ok(())
    }

    /// The integer timesteps (as diffusers' `scheduler.timesteps`, int64).
    pub fn timesteps(&self) -> &[i64] {
        &self.timesteps
    }

    /// The sigmas (length steps + 1, the last one final), as diffusers' `scheduler.sigmas` (f32).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    pub fn step_index(&self) -> Option<usize> {
        self.step_index
    }

    /// diffusers' `index_for_timestep`: the second match when a timestep occurs twice, the last index when absent.
    fn index_for_timestep(&self, timestep: i64) -> usize {
        let hits: Vec<usize> = self
            .timesteps
            .iter()
            .enumerate()
            .filter(|(_, t)| **t == timestep)
            .map(|(i, _)| i)
            .collect();
        match hits.len() {
            0 => self.timesteps.len() - 1,
            1 => hits[0],
            _ => hits[1],
        }
    }

    /// (alpha, sigma, lambda) of flow sigma index `i`, in f32.
    fn alpha_sigma_lambda(&self, i: usize) -> (f32, f32, f32) {
        let sigma = self.sigmas[i];
        let alpha = 1.0f32 - sigma;
        (alpha, sigma, alpha.ln() - sigma.ln())
    }

    /// One solver step: `model_output` is the (guided) flow prediction at `timestep` for `sample`;
    /// returns the sample at the next sigma.
    pub fn step(
        &mut self,
        model_output: &Tensor,
        timestep: i64,
        sample: &Tensor,
    ) -> Result<Tensor> {
        if self.timesteps.is_empty() {
            return Err(Error::msg(
                "UniPC scheduler: set_timesteps must be called before step",
            ));
        }
        let step_index = match self.step_index {
            Some(i) => i,
            None => self.index_for_timestep(timestep),
        };
        if step_index >= self.timesteps.len() {
            return Err(Error::msg(format!(
                "UniPC scheduler: step {} past the last of {} steps",
                step_index + 1,
                self.timesteps.len()
            )));
        }
        self.step_index = Some(step_index);
        let dtype = sample.dtype();
        let model_output = model_output.to_dtype(dtype)?;

        // convert_model_output: x0 = sample - sigma * v
        let sigma = self.sigmas[step_index];
        let x0 = (sample - model_output.affine(sigma as f64, 0.0)?)?;

        let use_corrector = step_index > 0
            && !self.config.disable_corrector.contains(&(step_index - 1))
            && self.last_sample.is_some();
        let mut sample = sample.clone();
        if use_corrector {
            let last = self.last_sample.clone().expect("checked above");
            sample = self.corrector(&x0, &last, &sample, self.this_order, step_index)?;
        }

        let order = self.config.solver_order;
        self.model_outputs.rotate_left(1);
        self.model_outputs[order - 1] = Some(x0);

        let mut this_order = order;
        if self.config.lower_order_final {
            this_order = this_order.min(self.timesteps.len() - step_index);
        }
        self.this_order = this_order.min(self.lower_order_nums + 1);
        self.last_sample = Some(sample.clone());
        let prev = self.predictor(&sample, self.this_order, step_index)?;
        if self.lower_order_nums < order {
            self.lower_order_nums += 1;
        }
        self.step_index = Some(step_index + 1);
        Ok(prev.to_dtype(dtype)?)
    }

    fn model_output_back(&self, back: usize) -> Result<&Tensor> {
        let n = self.model_outputs.len();
        self.model_outputs
            .get(n - 1 - back)
            .and_then(|m| m.as_ref())
            .ok_or_else(|| Error::msg("UniPC scheduler: missing model output history"))
    }

    /// The coefficients phi/B(h) shared by predictor and corrector: (h_phi_1, B_h, R rows, b).
    fn coefficients(
        &self,
        h: f32,
        rks: &[f32],
        order: usize,
    ) -> (f32, f32, Vec<Vec<f32>>, Vec<f32>) {
        let hh = -h; // predict_x0
        let h_phi_1 = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial_i = 1.0f32;
        let b_h = if self.config.solver_type == "bh1" {
            hh
        } else {
            hh.exp_m1()
        };
        let mut r = Vec::new();
        let mut b = Vec::new();
        for i in 1..=order {
            r.push(
                rks.iter()
                    .map(|rk| rk.powi(i as i32 - 1))
                    .collect::<Vec<f32>>(),
            );
            b.push(h_phi_k * factorial_i / b_h);
            factorial_i *= (i + 1) as f32;
            h_phi_k = h_phi_k / hh - 1.0 / factorial_i;
        }
        (h_phi_1, b_h, r, b)
    }

    fn predictor(&self, x: &Tensor, order: usize, step_index: usize) -> Result<Tensor> {
        let m0 = self.model_output_back(0)?;
        let (alpha_t, sigma_t, lambda_t) = self.alpha_sigma_lambda(step_index + 1);
        let (_, sigma_s0, lambda_s0) = self.alpha_sigma_lambda(step_index);
        let h = lambda_t - lambda_s0;
        let mut rks = Vec::new();
        let mut d1s = Vec::new();
        for i in 1..order {
            let (_, _, lambda_si) = self.alpha_sigma_lambda(step_index - i);
            let rk = (lambda_si - lambda_s0) / h;
            let mi = self.model_output_back(i)?;
            d1s.push(((mi - m0)? / rk as f64)?);
            rks.push(rk);
        }
        rks.push(1.0);
        let (h_phi_1, b_h, r, b) = self.coefficients(h, &rks, order);
        let x_t_ = (x.affine((sigma_t / sigma_s0) as f64, 0.0)?
            - m0.affine((alpha_t * h_phi_1) as f64, 0.0)?)?;
        if d1s.is_empty() {
            return Ok(x_t_);
        }
        let rhos_p: Vec<f32> = if order == 2 {
            vec![0.5]
        } else {
            let k = order - 1;
            let rr: Vec<Vec<f32>> = r[..k].iter().map(|row| row[..k].to_vec()).collect();
            solve(&rr, &b[..k])?
        };
        let pred_res = weighted_sum(&rhos_p, &d1s)?;
        Ok((x_t_ - pred_res.affine((alpha_t * b_h) as f64, 0.0)?)?)
    }

    fn corrector(
        &self,
        model_t: &Tensor,
        last_sample: &Tensor,
        _this_sample: &Tensor,
        order: usize,
        step_index: usize,
    ) -> Result<Tensor> {
        let m0 = self.model_output_back(0)?;
        let (alpha_t, sigma_t, lambda_t) = self.alpha_sigma_lambda(step_index);
        let (_, sigma_s0, lambda_s0) = self.alpha_sigma_lambda(step_index - 1);
        let h = lambda_t - lambda_s0;
        let mut rks = Vec::new();
        let mut d1s = Vec::new();
        for i in 1..order {
            let (_, _, lambda_si) = self.alpha_sigma_lambda(step_index - (i + 1));
            let rk = (lambda_si - lambda_s0) / h;
            let mi = self.model_output_back(i)?;
            d1s.push(((mi - m0)? / rk as f64)?);
            rks.push(rk);
        }
        rks.push(1.0);
        let (h_phi_1, b_h, r, b) = self.coefficients(h, &rks, order);
        let rhos_c: Vec<f32> = if order == 1 {
            vec![0.5]
        } else {
            solve(&r, &b)?
        };
        let x_t_ = (last_sample.affine((sigma_t / sigma_s0) as f64, 0.0)?
            - m0.affine((alpha_t * h_phi_1) as f64, 0.0)?)?;
        let d1_t = (model_t - m0)?;
        let mut res = d1_t.affine(rhos_c[rhos_c.len() - 1] as f64, 0.0)?;
        if !d1s.is_empty() {
            res = (weighted_sum(&rhos_c[..rhos_c.len() - 1], &d1s)? + res)?;
        }
        Ok((x_t_ - res.affine((alpha_t * b_h) as f64, 0.0)?)?)
    }
}

/// sum_k w_k * t_k
fn weighted_sum(weights: &[f32], tensors: &[Tensor]) -> Result<Tensor> {
    let mut acc = tensors[0].affine(weights[0] as f64, 0.0)?;
    for (w, t) in weights.iter().zip(tensors).skip(1) {
        acc = (acc + t.affine(*w as f64, 0.0)?)?;
    }
    Ok(acc)
}

/// Solves the small dense system `a x = b` (Gaussian elimination with partial pivoting, in f64).
fn solve(a: &[Vec<f32>], b: &[f32]) -> Result<Vec<f32>> {
    let n = b.len();
    let mut m: Vec<Vec<f64>> = a
        .iter()
        .zip(b)
        .map(|(row, &bi)| {
            row.iter()
                .map(|&v| v as f64)
                .chain(std::iter::once(bi as f64))
                .collect()
        })
        .collect();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| m[i][col].abs().total_cmp(&m[j][col].abs()))
            .expect("non-empty");
        if m[pivot][col] == 0.0 || !m[pivot][col].is_finite() {
            return Err(Error::msg("UniPC scheduler: singular coefficient system"));
        }
        m.swap(col, pivot);
        let (top, bottom) = m.split_at_mut(col + 1);
        let pivot_row = &top[col];
        for row in bottom.iter_mut() {
            let f = row[col] / pivot_row[col];
            for (v, p) in row.iter_mut().zip(pivot_row).skip(col) {
                *v -= f * p;
            }
        }
    }
    let mut x = vec![0.0f64; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| m[row][k] * x[k]).sum();
        x[row] = (m[row][n] - s) / m[row][row];
    }
    Ok(x.into_iter().map(|v| v as f32).collect())
}
