//! One denoising step of a random-weight Wan DiT with the real Wan2.1-1.3B dimensions (dim 1536,
//! ffn 8960, 12 heads, 30 layers) plus the I2V image branch (image_dim 1280, add_k/add_v
//! projections), at 416x240 with 5 frames, on the CPU: the conditional and the unconditional
//! forward (classifier-free guidance) and one UniPC step. Prints the weights' size, the peak RSS
//! (VmHWM) and the timings.
//!
//!     cargo run --release -p kubewan-wan --example dit_1_3b_step [-- --dtype f32|bf16 --width 416 --height 240 --frames 5]
//!     ... --example dit_1_3b_step -- --write DIR     (random weights as a diffusers transformer/ folder)
//!     ... --example dit_1_3b_step -- --load DIR [--mmap]   (load DIR with WanTransformer::load, or
//!                                                          candle's mmap VarBuilder for comparison)
//!
//! By default the weights are generated in memory (normal, std 1/sqrt(fan_in)). Exits 1 when the
//! peak RSS exceeds twice the weights.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use kubewan_wan::scheduler::{FlowUniPc, UniPcConfig};
use kubewan_wan::transformer::{WanTransformer, WanTransformerConfig};

struct RandomWeights {
    bytes: Arc<AtomicU64>,
    count: Arc<AtomicU64>,
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let dims = s.dims();
        let fan_in: usize = if dims.len() >= 2 {
            dims[1..].iter().product()
        } else {
            1
        };
        let t = if name.ends_with("gamma") || name.contains("norm") && dims.len() == 1 {
            Tensor::ones(s.clone(), DType::F32, dev)?
        } else if dims.len() == 1 {
            (Tensor::randn(0f32, 1f32, s.clone(), dev)? * 0.02)?
        } else {
            Tensor::randn(0f32, (fan_in as f32).powf(-0.5), s.clone(), dev)?
        };
        let t = t.to_dtype(dtype)?;
        self.bytes.fetch_add(
            (t.elem_count() * dtype.size_in_bytes()) as u64,
            Ordering::Relaxed,
        );
        self.count
            .fetch_add(t.elem_count() as u64, Ordering::Relaxed);
        Ok(t)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("{name}: shape needed")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

fn status_kib(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |k: &str, d: &str| -> String {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1).cloned())
            .unwrap_or_else(|| d.to_string())
    };
    let dtype = match arg("--dtype", "f32").as_str() {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        _ => DType::F32,
    };
    let width: usize = arg("--width", "416").parse()?;
    let height: usize = arg("--height", "240").parse()?;
    let frames: usize = arg("--frames", "5").parse()?;
    let dev = Device::Cpu;
    let rss0 = status_kib("VmRSS:") * 1024;

    let cfg = WanTransformerConfig::wan_1_3b_i2v();
    if let Some(dir) = args
        .iter()
        .position(|a| a == "--write")
        .and_then(|i| args.get(i + 1))
    {
        return write_weights(std::path::Path::new(dir), &cfg, dtype);
    }
    let from = args
        .iter()
        .position(|a| a == "--load")
        .and_then(|i| args.get(i + 1))
        .map(std::path::PathBuf::from);
    let t0 = Instant::now();
    let bytes = Arc::new(AtomicU64::new(0));
    let count = Arc::new(AtomicU64::new(0));
    let backend = RandomWeights {
        bytes: bytes.clone(),
        count: count.clone(),
    };
    let model = match &from {
        None => {
            let backend: Box<dyn SimpleBackend> = Box::new(backend);
            let vb = VarBuilder::from_backend(backend, dtype, dev.clone());
            WanTransformer::new(vb, cfg.clone())?
        }
        // The real loader (config.json + safetensors read from disk).
        Some(dir) if args.iter().any(|a| a == "--mmap") => {
            // For comparison: candle's memory-mapped VarBuilder (kubewan-model-common).
            let cfg: WanTransformerConfig =
                serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
            let vb = kubewan_model_common::mmap_var_builder(
                dir,
                "diffusion_pytorch_model",
                dtype,
                &dev,
            )?;
            WanTransformer::new(vb, cfg)?
        }
        Some(dir) => WanTransformer::load(dir, dtype, &dev)?,
    };
    let load_s = t0.elapsed().as_secs_f64();
    let params = count_params(&cfg);
    let weight_bytes = params * dtype.size_in_bytes() as u64;
    if from.is_none() {
        assert_eq!(params, count.load(Ordering::Relaxed), "parameter count");
        assert_eq!(weight_bytes, bytes.load(Ordering::Relaxed));
    }
    let rss_loaded = status_kib("VmRSS:") * 1024;

    let lat_t = (frames - 1) / 4 + 1;
    let (lh, lw) = (height / 8, width / 8);
    let latents = Tensor::randn(0f32, 1f32, (1, 16, lat_t, lh, lw), &dev)?;
    let condition = Tensor::randn(0f32, 1f32, (1, 20, lat_t, lh, lw), &dev)?;
    let text = Tensor::randn(0f32, 1f32, (1, 512, 4096), &dev)?;
    let negative = Tensor::randn(0f32, 1f32, (1, 512, 4096), &dev)?;
    let image = Tensor::randn(0f32, 1f32, (1, 257, 1280), &dev)?;

    let sched_cfg: UniPcConfig = serde_json::from_str(
        r#"{"num_train_timesteps":1000,"solver_order":2,"prediction_type":"flow_prediction",
            "use_flow_sigmas":true,"flow_shift":3.0,"solver_type":"bh2","final_sigmas_type":"zero"}"#,
    )?;
    let mut sched = FlowUniPc::new(sched_cfg, None)?;
    sched.set_timesteps(40)?;
    let t = sched.timesteps()[0];

    let t1 = Instant::now();
    let text_c = model.embed_text(&text)?;
    let text_u = model.embed_text(&negative)?;
    let img = model.embed_image(&image)?;
    let input = Tensor::cat(&[&latents, &condition], 1)?.to_dtype(dtype)?;
    let tc = Instant::now();
    let cond = model.forward_embedded(&input, &[t as f32], &text_c, img.as_ref())?;
    let cond_s = tc.elapsed().as_secs_f64();
    let uncond = model.forward_embedded(&input, &[t as f32], &text_u, img.as_ref())?;
    let noise = (&uncond + ((cond - &uncond)? * 5.0)?)?;
    let next = sched.step(&noise, t, &latents)?;
    let step_s = t1.elapsed().as_secs_f64();
    let finite = next
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .all(|v| v.is_finite());

    let hwm = status_kib("VmHWM:") * 1024;
    let rss_end = status_kib("VmRSS:") * 1024;
    let tokens = lat_t * (lh / 2) * (lw / 2);
    println!(
        "Wan2.1-1.3B-shaped DiT (+ I2V image branch), random weights {}, CPU, {dtype:?}",
        match &from {
            Some(d) if args.iter().any(|a| a == "--mmap") =>
                format!("loaded from {} (memory-mapped VarBuilder)", d.display()),
            Some(d) => format!("loaded from {} (WanTransformer::load)", d.display()),
            None => "generated in memory".to_string(),
        }
    );
    println!(
        "  video {width}x{height}, {frames} frames -> latents {:?}, {tokens} tokens",
        latents.dims()
    );
    println!(
        "  parameters           {params} ({:.3} GiB of weights)",
        gib(weight_bytes)
    );
    println!("  RSS before load      {:.3} GiB", gib(rss0));
    println!(
        "  RSS after load       {:.3} GiB ({load_s:.1} s to build)",
        gib(rss_loaded)
    );
    println!(
        "  one denoising step   {step_s:.1} s (cond forward {cond_s:.1} s, CFG: 2 forwards + UniPC step)"
    );
    println!("  RSS after the step   {:.3} GiB", gib(rss_end));
    println!(
        "  peak RSS (VmHWM)     {:.3} GiB = {:.2}x the weights",
        gib(hwm),
        hwm as f64 / weight_bytes as f64
    );
    println!("  output finite        {finite}");
    if hwm > 2 * weight_bytes {
        eprintln!("FAIL: peak RSS exceeds 2x the weights");
        std::process::exit(1);
    }
    Ok(())
}

/// Parameters of a [`WanTransformerConfig`] (what the random backend hands out).
fn count_params(c: &WanTransformerConfig) -> u64 {
    let d = c.inner_dim() as u64;
    let lin = |i: u64, o: u64| i * o + o;
    let p: u64 = c.patch_size.iter().map(|&x| x as u64).product();
    let mut n = c.in_channels as u64 * p * d + d; // patch embedding
    n += lin(c.freq_dim as u64, d) + lin(d, d) + lin(d, 6 * d); // time
    n += lin(c.text_dim as u64, d) + lin(d, d); // text
    if let Some(i) = c.image_dim {
        let i = i as u64;
        n += 2 * i + lin(i, i) + lin(i, d) + 2 * d;
        if let Some(s) = c.pos_embed_seq_len {
            n += s as u64 * i;
        }
    }
    let mut block = 4 * lin(d, d) + 2 * d; // attn1 + q/k norms
    block += 4 * lin(d, d) + 2 * d; // attn2
    if let Some(a) = c.added_kv_proj_dim {
        block += 2 * lin(a as u64, d) + d;
    }
    if c.cross_attn_norm {
        block += 2 * d;
    }
    block += lin(d, c.ffn_dim as u64) + lin(c.ffn_dim as u64, d) + 6 * d;
    n += c.num_layers as u64 * block;
    n += lin(d, c.out_channels() as u64 * p) + 2 * d;
    n
}

/// Writes random weights with the given config as a diffusers `transformer/` folder
/// (`config.json` + `diffusion_pytorch_model.safetensors`).
fn write_weights(
    dir: &std::path::Path,
    cfg: &WanTransformerConfig,
    dtype: DType,
) -> Result<(), Box<dyn std::error::Error>> {
    use std::sync::Mutex;
    struct Recorder(
        Arc<Mutex<std::collections::HashMap<String, Tensor>>>,
        RandomWeights,
    );
    impl SimpleBackend for Recorder {
        fn get(
            &self,
            s: Shape,
            name: &str,
            h: candle_nn::Init,
            dtype: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            let t = self.1.get(s, name, h, dtype, dev)?;
            self.0.lock().unwrap().insert(name.to_string(), t.clone());
            Ok(t)
        }
        fn get_unchecked(&self, name: &str, d: DType, dev: &Device) -> candle_core::Result<Tensor> {
            self.1.get_unchecked(name, d, dev)
        }
        fn contains_tensor(&self, _: &str) -> bool {
            true
        }
    }
    std::fs::create_dir_all(dir)?;
    let map = Arc::new(Mutex::new(std::collections::HashMap::new()));
    let rec = Recorder(
        map.clone(),
        RandomWeights {
            bytes: Arc::new(AtomicU64::new(0)),
            count: Arc::new(AtomicU64::new(0)),
        },
    );
    let backend: Box<dyn SimpleBackend> = Box::new(rec);
    let vb = VarBuilder::from_backend(backend, dtype, Device::Cpu);
    // Building the model requests (and so records) every weight it has, under its real name.
    drop(WanTransformer::new(vb, cfg.clone())?);
    let map = std::mem::take(&mut *map.lock().unwrap());
    // The model keeps reshaped views of a few weights (the patch embedding); store the originals.
    candle_core::safetensors::save(&map, dir.join("diffusion_pytorch_model.safetensors"))?;
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(cfg)?)?;
    println!("wrote {} tensors to {}", map.len(), dir.display());
    Ok(())
}
