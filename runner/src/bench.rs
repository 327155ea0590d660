//! `kubewan-runner bench …`: the runner's side of the GPU benchmark
//! (scripts/gpu-bench/run.py runs it beside the PyTorch reference and prints
//! the table). Each command builds a real-sized model with random weights on
//! the device (no checkpoint, except the VLM's, which `bench write-vlm` writes
//! in the released layout), warms up on a small input (kernel loading, cuBLAS
//! handles), then times the real code paths the stages run, with the device
//! synchronised around each timed region.
//!
//! Output: one JSON object per line on stdout, `{"row": …, "event": "start"}`
//! before a timed region and `{"row": …, "event": "end", "seconds": …, …}`
//! after it; the driver samples this process's GPU memory (NVML) in between.
//! Everything else goes to stderr.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use clap::{Args, Subcommand};
use kubewan_model_common::device::{DeviceChoice, compute_dtype, device_label};
use kubewan_model_common::nn::attention as dispatched_attention;
use kubewan_model_common::nn::{Mask, chunked_attention, flash_attention};
use kubewan_model_common::random::RandomWeights;
use kubewan_model_common::safetensors::read_header;
use kubewan_qwen2_5_vl::{CheckpointSpec, GenerateRequest, Qwen25Vl, Sampling, write_checkpoint};
use kubewan_wan::pipeline::{Conditioning, GuidancePasses, GuidedDit, latent_shape};
use kubewan_wan::text::MAX_SEQUENCE_LENGTH;
use kubewan_wan::transformer::{WanTransformer, WanTransformerConfig};
use kubewan_wan::umt5::{Umt5Config, Umt5Encoder};
use kubewan_wan::vae::{WanVae, WanVaeConfig};
use serde_json::{Value, json};

use crate::admission::wan::{WanShapes, decode_activations, dit_forward_bytes, dit_tokens};
use crate::admission::{Activations, Admission, PhaseNeed};
use crate::probe::{Probe, hwm_bytes, phases, reset_hwm, rss_bytes, trim_heap};
use crate::vlm_cli::DEVICE_ENV;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// One denoising step with classifier-free guidance of a random-weight Wan DiT, per --size.
    Dit(DitArgs),
    /// Wan VAE decode of random latents, per --size (f32, as diffusers runs it).
    VaeDecode(VideoArgs),
    /// The UMT5 text encoder over random token ids.
    Umt5(Umt5Args),
    /// FlashAttention (CUDA) or the tiled attention (CPU) and the chunked attention on one random
    /// q/k/v, and how far apart they are.
    Attention(AttentionArgs),
    /// Writes a random-weight Qwen2.5-VL checkpoint in the released layout.
    WriteVlm(WriteVlmArgs),
    /// Qwen2.5-VL: load, prefill, decode, release (the prompts stage's path).
    Vlm(VlmArgs),
}

#[derive(Args, Debug)]
pub struct Common {
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, env = DEVICE_ENV, default_value = "auto")]
    pub device: DeviceChoice,
    /// Row name prefix in the output.
    #[arg(long)]
    pub row: String,
}

/// A model built from a config, run at one or more video sizes.
#[derive(Args, Debug)]
pub struct VideoArgs {
    #[command(flatten)]
    pub common: Common,
    /// The model's diffusers config (`transformer/config.json`, `vae/config.json`).
    #[arg(long)]
    pub config: PathBuf,
    /// Video sizes LABEL=WIDTHxHEIGHTxFRAMES, one row each (row name: PREFIX-LABEL).
    #[arg(long = "size", required = true)]
    pub sizes: Vec<String>,
}

#[derive(Args, Debug)]
pub struct DitArgs {
    #[command(flatten)]
    pub video: VideoArgs,
    #[arg(long, default_value_t = 5.0)]
    pub guidance: f64,
}

#[derive(Args, Debug)]
pub struct Umt5Args {
    #[command(flatten)]
    pub common: Common,
    /// A transformers UMT5 `config.json`.
    #[arg(long)]
    pub config: PathBuf,
    #[arg(long, default_value_t = 512)]
    pub tokens: usize,
}

#[derive(Args, Debug)]
pub struct AttentionArgs {
    #[command(flatten)]
    pub common: Common,
    #[arg(long)]
    pub heads: usize,
    #[arg(long)]
    pub tokens: usize,
    #[arg(long, default_value_t = 128)]
    pub head_dim: usize,
    /// f32, bf16 or f16; the device's compute dtype when absent.
    #[arg(long)]
    pub dtype: Option<DType>,
    /// CPU: rounds of the chunked and the tiled path, alternating.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

#[derive(Args, Debug)]
pub struct WriteVlmArgs {
    /// Where the checkpoint goes.
    pub dir: PathBuf,
    /// `7b` (the released Qwen2.5-VL-7B dimensions, ~16.6 GB) or `tiny`.
    #[arg(long, default_value = "7b")]
    pub shape: String,
}

#[derive(Args, Debug)]
pub struct VlmArgs {
    #[command(flatten)]
    pub common: Common,
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long = "image", required = true)]
    pub images: Vec<PathBuf>,
    #[arg(
        long,
        default_value = "Describe how the scene moves from the first image to the second."
    )]
    pub prompt: String,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
}

pub fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Dit(args) => dit(&args),
        BenchCommand::VaeDecode(args) => vae_decode(&args),
        BenchCommand::Umt5(args) => umt5(&args),
        BenchCommand::Attention(args) => attention(&args),
        BenchCommand::WriteVlm(args) => write_vlm(&args),
        BenchCommand::Vlm(args) => vlm(&args),
    }
}

/// One JSON line on stdout.
fn emit(row: &str, event: &str, extra: Value) {
    let mut line = json!({"row": row, "event": event});
    if let (Some(line), Value::Object(extra)) = (line.as_object_mut(), extra) {
        line.extend(extra);
    }
    println!("{line}");
}

/// Runs `f` as the timed row `row` (device synchronised around it); the end
/// event carries the seconds and whatever `f` returns besides its value.
fn timed<T>(row: &str, device: &Device, f: impl FnOnce() -> Result<(T, Value)>) -> Result<T> {
    device.synchronize()?;
    emit(row, "start", json!({}));
    let start = Instant::now();
    let (value, mut extra) = f()?;
    device.synchronize()?;
    let seconds = start.elapsed().as_secs_f64();
    if let Value::Object(map) = &mut extra {
        map.insert("seconds".into(), json!(seconds));
    }
    emit(row, "end", extra);
    Ok(value)
}

fn open_device(choice: DeviceChoice) -> Result<Device> {
    let device = choice.resolve()?;
    eprintln!("bench on {}", device_label(&device));
    Ok(device)
}

fn read_config<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a valid config", path.display()))
}

/// A video size `LABEL=WIDTHxHEIGHTxFRAMES`: the label and (width, height, frames).
fn parse_size(size: &str) -> Result<(&str, (usize, usize, usize))> {
    let bad = || format!("size {size:?} is not LABEL=WIDTHxHEIGHTxFRAMES");
    let (label, dims) = size.split_once('=').with_context(bad)?;
    let parts: Vec<usize> = dims
        .split('x')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(bad)?;
    match parts[..] {
        [w, h, f] if w > 0 && h > 0 && f > 0 => Ok((label, (w, h, f))),
        _ => bail!(bad()),
    }
}

/// For each `LABEL=WIDTHxHEIGHTxFRAMES` of `sizes`: `run` timed as row
/// `PREFIX-LABEL`, then a check that its output is finite.
fn size_rows(
    prefix: &str,
    sizes: &[String],
    device: &Device,
    mut run: impl FnMut((usize, usize, usize)) -> Result<(Tensor, Value)>,
) -> Result<()> {
    for size in sizes {
        let (label, dims) = parse_size(size)?;
        let row = format!("{prefix}-{label}");
        let out = timed(&row, device, || run(dims))?;
        emit(&row, "check", json!({"finite": finite(&out)?}));
    }
    Ok(())
}

/// Whether every value of `t` is finite (checked outside the timed regions).
fn finite(t: &Tensor) -> Result<bool> {
    let sum = t
        .to_dtype(DType::F32)?
        .abs()?
        .sum_all()?
        .to_scalar::<f32>()?;
    Ok(sum.is_finite())
}

fn randn(shape: &[usize], device: &Device) -> Result<Tensor> {
    Ok(Tensor::randn(0f32, 1f32, shape, device)?)
}

/// CLIP images and tokens per image the pipeline feeds `cfg`'s image branch:
/// two for a FLF2V model (its position embedding covers both), one of 257
/// tokens for I2V; none without an image branch.
fn image_context(cfg: &WanTransformerConfig) -> Option<(usize, usize)> {
    cfg.image_dim?;
    Some(match cfg.pos_embed_seq_len {
        Some(both) => (2, both / 2),
        None => (1, 257),
    })
}

/// Random prompt, negative prompt and CLIP embeddings of the shapes the
/// pipeline feeds the DiT (512 text tokens, [`image_context`]).
fn random_conditioning(cfg: &WanTransformerConfig, device: &Device) -> Result<Conditioning> {
    let text = [1, MAX_SEQUENCE_LENGTH, cfg.text_dim];
    Ok(Conditioning {
        prompt_embeds: randn(&text, device)?,
        negative_embeds: Some(randn(&text, device)?),
        image_embeds: match (cfg.image_dim, image_context(cfg)) {
            (Some(dim), Some((images, tokens))) => Some(randn(&[images, tokens, dim], device)?),
            _ => None,
        },
    })
}

/// The segment's shapes for a `width`×`height`×`frames` bench row.
fn bench_shapes(
    (width, height, frames): (usize, usize, usize),
    guidance: f64,
    guidance_passes: GuidancePasses,
    dtype: DType,
) -> WanShapes {
    WanShapes {
        frames,
        height,
        width,
        guidance,
        dtype,
        guidance_passes,
    }
}

/// Guidance as the segment stage would run it with the DiT loaded: one batch
/// of 2 when the memory admission takes its activations
/// ([`dit_forward_bytes`]) now, else two passes.
fn admitted_passes(
    cfg: &WanTransformerConfig,
    shapes: &WanShapes,
    device: &Device,
) -> GuidancePasses {
    let batched = WanShapes {
        guidance_passes: GuidancePasses::Batched,
        ..*shapes
    };
    let image_tokens = image_context(cfg).map_or(0, |(n, t)| n * t);
    let need = PhaseNeed {
        phase: phases::DENOISE,
        weights: Vec::new(),
        loads: false,
        activations: Activations {
            device_bytes: dit_forward_bytes(cfg, &batched, image_tokens, device),
            ..Activations::default()
        },
    };
    let mut admission = Admission::new(None);
    admission.watch_device(device);
    if admission.fits(&[need], device.is_cuda()) {
        GuidancePasses::Batched
    } else {
        GuidancePasses::Separate
    }
}

/// The dtype a released-size model computes in on `device` (bf16; the
/// pipeline's VAE stays f32).
fn model_dtype(device: &Device) -> DType {
    compute_dtype(device, u64::MAX)
}

fn dit(args: &DitArgs) -> Result<()> {
    let device = open_device(args.video.common.device)?;
    let cfg: WanTransformerConfig = read_config(&args.video.config)?;
    let dtype = model_dtype(&device);
    let weights = RandomWeights::default();
    let model = WanTransformer::new(weights.var_builder(dtype, &device), cfg.clone())?;
    eprintln!("DiT: {} parameters in {dtype:?}", weights.params());
    let cond = random_conditioning(&cfg, &device)?;
    let step = |(w, h, f): (usize, usize, usize), passes: GuidancePasses| -> Result<Tensor> {
        let (lt, lh, lw) = latent_shape(f, h, w);
        let input = randn(&[1, cfg.in_channels, lt, lh, lw], &device)?.to_dtype(dtype)?;
        GuidedDit::new(&model, &cond, args.guidance, passes)?
            .noise(&input, 500.0)
            .map_err(Into::into)
    };
    step((64, 64, 1), GuidancePasses::Batched)?; // warm-up: kernels and handles
    size_rows(&args.video.common.row, &args.video.sizes, &device, |size| {
        let shapes = bench_shapes(size, args.guidance, GuidancePasses::Separate, dtype);
        let passes = admitted_passes(&cfg, &shapes, &device);
        let shapes = WanShapes {
            guidance_passes: passes,
            ..shapes
        };
        let image_tokens = image_context(&cfg).map_or(0, |(n, t)| n * t);
        let noise = step(size, passes)?;
        Ok((
            noise,
            json!({
                "tokens": dit_tokens(&cfg, &shapes),
                "passes": format!("{passes:?}"),
                "activation_estimate_bytes":
                    dit_forward_bytes(&cfg, &shapes, image_tokens, &device),
            }),
        ))
    })
}

fn vae_decode(args: &VideoArgs) -> Result<()> {
    let device = open_device(args.common.device)?;
    let cfg: WanVaeConfig = read_config(&args.config)?;
    let vae = WanVae::new(
        RandomWeights::default().var_builder(DType::F32, &device),
        cfg.clone(),
    )?;
    let decode = |(w, h, f): (usize, usize, usize)| -> Result<Tensor> {
        let (lt, lh, lw) = latent_shape(f, h, w);
        let z = vae.denormalize(&randn(&[1, cfg.z_dim, lt, lh, lw], &device)?)?;
        Ok(vae.decode_with(&z, &mut |_, _| {})?)
    };
    decode((64, 64, 1))?; // warm-up
    size_rows(&args.common.row, &args.sizes, &device, |size| {
        let video = decode(size)?;
        let frames = video.dim(2)?;
        let shapes = bench_shapes(size, 1.0, GuidancePasses::Separate, DType::F32);
        let estimate = decode_activations(&cfg, &shapes).device_bytes;
        Ok((
            video,
            json!({"frames": frames, "activation_estimate_bytes": estimate}),
        ))
    })
}

fn umt5(args: &Umt5Args) -> Result<()> {
    let device = open_device(args.common.device)?;
    let cfg: Umt5Config = read_config(&args.config)?;
    let dtype = model_dtype(&device);
    let encoder =
        Umt5Encoder::from_var_builder(&cfg, RandomWeights::default().var_builder(dtype, &device))?;
    let encode = |tokens: usize| -> Result<Tensor> {
        let ids = Tensor::rand(0f32, cfg.vocab_size as f32, (1, tokens), &device)?
            .floor()?
            .to_dtype(DType::U32)?;
        let mask = Tensor::ones((1, tokens), DType::U32, &device)?;
        Ok(encoder.encode(&ids, Some(&mask))?)
    };
    encode(8)?; // warm-up
    let row = args.common.row.clone();
    let hidden = timed(&row, &device, || {
        Ok((encode(args.tokens)?, json!({"tokens": args.tokens})))
    })?;
    emit(&row, "check", json!({"finite": finite(&hidden)?}));
    Ok(())
}

/// ‖a − b‖ / ‖b‖.
fn relative_error(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F32)?;
    let b = b.to_dtype(DType::F32)?;
    let diff = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    let norm = b.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    Ok((diff / norm).sqrt())
}

fn attention(args: &AttentionArgs) -> Result<()> {
    let device = open_device(args.common.device)?;
    let dtype = args.dtype.unwrap_or_else(|| model_dtype(&device));
    let shape = [1, args.heads, args.tokens, args.head_dim];
    let qkv = |_| -> Result<Tensor> { Ok(randn(&shape, &device)?.to_dtype(dtype)?) };
    let (q, k, v) = (qkv(0)?, qkv(1)?, qkv(2)?);
    let scale = (args.head_dim as f64).powf(-0.5);
    let extra = || json!({"tokens": args.tokens, "heads": args.heads, "head_dim": args.head_dim});
    if !device.is_cuda() {
        return cpu_attention(args, [&q, &k, &v], scale);
    }
    let chunked_row = format!("{}-chunked", args.common.row);
    let chunked = timed(&chunked_row, &device, || {
        Ok((chunked_attention(&q, &k, &v, Mask::None, scale)?, extra()))
    })?;
    flash_attention(&q, &k, &v, Mask::None, scale)?; // warm-up
    let flash_row = format!("{}-flash", args.common.row);
    let flash = timed(&flash_row, &device, || {
        Ok((flash_attention(&q, &k, &v, Mask::None, scale)?, extra()))
    })?;
    emit(
        &flash_row,
        "check",
        json!({"relative_error_vs_chunked": relative_error(&flash, &chunked)?, "finite": finite(&flash)?}),
    );
    for case in &FLASH_CASES {
        let error = flash_case_error(case, &device, dtype)?;
        let row = format!("{}-check-{}", args.common.row, case.name);
        emit(&row, "check", json!({"relative_error_vs_chunked": error}));
    }
    Ok(())
}

/// The CPU's attention paths, alternating for `args.rounds` rounds: the
/// chunked reference and the tiled path `attention` dispatches to. Each row
/// carries its peak memory: the rise of the RSS high-water mark (reset before
/// each run) over the RSS before it, output included.
fn cpu_attention(args: &AttentionArgs, [q, k, v]: [&Tensor; 3], scale: f64) -> Result<()> {
    type AttentionFn = fn(&Tensor, &Tensor, &Tensor, Mask, f64) -> candle_core::Result<Tensor>;
    let paths: [(&str, AttentionFn); 2] = [
        ("chunked", chunked_attention),
        ("tiled", dispatched_attention),
    ];
    let mut outputs = Vec::new();
    for round in 0..args.rounds {
        outputs.clear();
        for (name, path) in paths {
            trim_heap();
            let hwm_reset = reset_hwm();
            let before = rss_bytes();
            let row = format!("{}-{name}", args.common.row);
            let out = timed(&row, q.device(), || {
                let out = path(q, k, v, Mask::None, scale)?;
                let peak = hwm_reset.then(|| hwm_bytes().saturating_sub(before));
                let extra = json!({"round": round, "tokens": args.tokens, "heads": args.heads,
                    "head_dim": args.head_dim, "peak_bytes_over_rss": peak});
                Ok((out, extra))
            })?;
            outputs.push(out);
        }
    }
    if let [chunked, tiled] = &outputs[..] {
        let row = format!("{}-tiled", args.common.row);
        emit(
            &row,
            "check",
            json!({"relative_error_vs_chunked": relative_error(tiled, chunked)?}),
        );
    }
    Ok(())
}

/// One shape the models send through FlashAttention, checked against the chunked attention.
struct FlashCase {
    name: &'static str,
    heads: usize,
    kv_heads: usize,
    queries: usize,
    keys: usize,
    head_dim: usize,
    causal: bool,
}

/// The other kernels and masks the models use: the Qwen2.5-VL decoder's causal
/// prefill and its decoding step (28 query heads over 4 K/V heads, one query
/// after a cache), its vision tower and CLIP (head dim 80, the hdim-96 kernel),
/// the DiT's cross-attention (512 text keys), and causal queries after a
/// cache (the mask aligned bottom-right).
const FLASH_CASES: [FlashCase; 5] = [
    FlashCase {
        name: "qwen-prefill-causal-gqa",
        heads: 28,
        kv_heads: 4,
        queries: 1100,
        keys: 1100,
        head_dim: 128,
        causal: true,
    },
    FlashCase {
        name: "qwen-decode-gqa",
        heads: 28,
        kv_heads: 4,
        queries: 1,
        keys: 1101,
        head_dim: 128,
        causal: false,
    },
    FlashCase {
        name: "causal-after-cache",
        heads: 8,
        kv_heads: 8,
        queries: 100,
        keys: 300,
        head_dim: 128,
        causal: true,
    },
    FlashCase {
        name: "vision-hdim80",
        heads: 16,
        kv_heads: 16,
        queries: 2040,
        keys: 2040,
        head_dim: 80,
        causal: false,
    },
    FlashCase {
        name: "dit-cross",
        heads: 40,
        kv_heads: 40,
        queries: 4096,
        keys: 512,
        head_dim: 128,
        causal: false,
    },
];

/// ‖flash − chunked‖ / ‖chunked‖ for random inputs of `case`.
fn flash_case_error(case: &FlashCase, device: &Device, dtype: DType) -> Result<f64> {
    let q = randn(&[1, case.heads, case.queries, case.head_dim], device)?.to_dtype(dtype)?;
    let kv = || -> Result<Tensor> {
        Ok(randn(&[1, case.kv_heads, case.keys, case.head_dim], device)?.to_dtype(dtype)?)
    };
    let (k, v) = (kv()?, kv()?);
    let mask = if case.causal {
        Mask::Causal
    } else {
        Mask::None
    };
    let scale = (case.head_dim as f64).powf(-0.5);
    let flash = flash_attention(&q, &k, &v, mask, scale)?;
    relative_error(&flash, &chunked_attention(&q, &k, &v, mask, scale)?)
}

fn write_vlm(args: &WriteVlmArgs) -> Result<()> {
    let spec = match args.shape.as_str() {
        "7b" => CheckpointSpec::qwen25_vl_7b(1),
        "tiny" => CheckpointSpec::tiny(1),
        other => bail!("unknown VLM shape {other:?} (7b or tiny)"),
    };
    let start = Instant::now();
    write_checkpoint(&args.dir, &spec)?;
    eprintln!(
        "wrote {} in {:.1} s",
        args.dir.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn vlm(args: &VlmArgs) -> Result<()> {
    let device = open_device(args.common.device)?;
    let images = args
        .images
        .iter()
        .map(|p| image::open(p).with_context(|| format!("cannot read image {}", p.display())))
        .collect::<Result<Vec<_>>>()?;
    let request = GenerateRequest {
        system: None,
        images,
        prompt: args.prompt.clone(),
        max_new_tokens: args.max_new_tokens,
        sampling: Sampling::Greedy,
    };
    let weight_bytes = kubewan_qwen2_5_vl::checkpoint::require(&args.model)?
        .weights
        .iter()
        .map(|f| Ok(read_header(f)?.data_bytes))
        .sum::<Result<u64>>()?;
    let dtype = compute_dtype(&device, weight_bytes);
    // The prompts stage's probe: this process's GPU memory before the load, after it
    // and after the release.
    let mut probe = Probe::new();
    probe.watch_device(&device);
    let baseline = probe.sample();
    let row = &args.common.row;
    let mut model = timed(&format!("{row}-load"), &device, || {
        Ok((
            Qwen25Vl::load(&args.model, dtype, &device)?,
            json!({"weight_bytes": weight_bytes}),
        ))
    })?;
    let loaded = probe.sample();
    model.first_logits(&request)?; // warm-up: kernels, handles, the allocator's first blocks
    timed(&format!("{row}-prefill"), &device, || {
        model.first_logits(&request)?;
        Ok(((), json!({})))
    })?;
    let generated = timed(&format!("{row}-generate"), &device, || {
        let out = model.generate(&request)?;
        let new_tokens = out.token_ids.len();
        Ok((out, json!({"new_tokens": new_tokens})))
    })?;
    let release = probe.release(
        "vlm_release",
        "the benchmark VLM",
        model,
        &baseline,
        &loaded,
    );
    emit(
        &format!("{row}-release"),
        "check",
        json!({
            "baseline_vram_bytes": baseline.vram_process_bytes,
            "loaded_vram_bytes": loaded.vram_process_bytes,
            "vram_loaded_bytes": release.vram_loaded_bytes,
            "vram_freed_bytes": release.vram_freed_bytes,
            "prompt_tokens": generated.prompt_token_ids.len(),
        }),
    );
    Ok(())
}
