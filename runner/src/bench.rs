//! `kubewan-runner bench …`: the runner's side of the GPU benchmark
//! (scripts/gpu-bench/run.py runs it beside the PyTorch reference and prints
//! the table). Each command builds a real-sized model with random weights on
//! the device (no checkpoint, except the VLM's, which `bench write-vlm` writes
//! in the released layout), warms up on a small input (kernel loading, cuBLAS
//! handles), then times the real code paths the stages run, with the device
//! synchronised around each timed region.
//!
//! The same commands are the runner's side of the CPU benchmark
//! (scripts/cpu-bench.sh), with the rows that matter on a CPU besides: the
//! weight loader against a plain read of the same files, one causal conv3d
//! layer and the DiT's gelu.
//!
//! Output: one JSON object per line on stdout, `{"row": …, "event": "start"}`
//! before a timed region and `{"row": …, "event": "end", "seconds": …, …}`
//! after it, with the process's RSS at the start and its peak (VmHWM, reset at
//! the start) during the region; the driver samples this process's GPU memory
//! (NVML) in between. A `summary` event gives a row measured over several
//! rounds its fastest round. Everything else goes to stderr.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use clap::{Args, Subcommand};
use kubewan_model_common::activation::gelu_tanh;
use kubewan_model_common::device::{DeviceChoice, compute_dtype, device_label};
use kubewan_model_common::nn::{
    Mask, attention as model_attention, chunked_attention, flash_attention,
};
use kubewan_model_common::random::RandomWeights;
use kubewan_model_common::safetensors::read_header;
use kubewan_model_common::{safetensors_files, var_builder};
use kubewan_qwen2_5_vl::{CheckpointSpec, GenerateRequest, Qwen25Vl, Sampling, write_checkpoint};
use kubewan_wan::conv3d::CausalConv3d;
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
    /// FlashAttention and the chunked attention on one random q/k/v, and how far apart they are
    /// (CUDA); on the CPU the attention every model calls, fastest of --repeat.
    Attention(AttentionArgs),
    /// One causal conv3d layer (kernel 3, padding 1, as the VAE's) on random frames.
    Conv3d(Conv3dArgs),
    /// The DiT's activation, gelu (tanh approximation), on a random matrix.
    Gelu(GeluArgs),
    /// The weight loader against a plain sequential read of the same files, alternating.
    Load(LoadArgs),
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
    /// f32 or bf16 for the models that compute in bf16 on a device (the DiT,
    /// UMT5, attention, gelu, the VLM); default: the dtype the stages pick.
    #[arg(long)]
    pub dtype: Option<String>,
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
    /// Timed runs on a CPU (the row reports the fastest).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
}

#[derive(Args, Debug)]
pub struct Conv3dArgs {
    #[command(flatten)]
    pub common: Common,
    /// Input and output channels.
    #[arg(long)]
    pub channels: usize,
    #[arg(long)]
    pub frames: usize,
    #[arg(long)]
    pub height: usize,
    #[arg(long)]
    pub width: usize,
    /// Timed runs (the row reports the fastest).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
}

#[derive(Args, Debug)]
pub struct GeluArgs {
    #[command(flatten)]
    pub common: Common,
    #[arg(long)]
    pub rows: usize,
    #[arg(long)]
    pub cols: usize,
    /// Timed runs (the row reports the fastest).
    #[arg(long, default_value_t = 5)]
    pub repeat: usize,
}

#[derive(Args, Debug)]
pub struct LoadArgs {
    #[command(flatten)]
    pub common: Common,
    /// The component folder (a diffusers `transformer/`).
    #[arg(long)]
    pub dir: PathBuf,
    /// The weights' file stem (`STEM.safetensors` or its shards).
    #[arg(long, default_value = "diffusion_pytorch_model")]
    pub stem: String,
    /// Rounds per page-cache state (the rows report the fastest).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

#[derive(Args, Debug)]
pub struct WriteVlmArgs {
    /// Where the checkpoint goes.
    pub dir: PathBuf,
    /// `7b` (the released Qwen2.5-VL-7B dimensions, ~16.6 GB), `mid` (the 3B's layers,
    /// fewer of them: [`mid_vlm`]) or `tiny`.
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
        BenchCommand::Conv3d(args) => conv3d(&args),
        BenchCommand::Gelu(args) => gelu(&args),
        BenchCommand::Load(args) => load(&args),
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
/// event carries the seconds, the RSS at the start and the peak RSS during the
/// row (VmHWM, reset at the start), and whatever `f` returns besides its value.
fn timed<T>(row: &str, device: &Device, f: impl FnOnce() -> Result<(T, Value)>) -> Result<T> {
    device.synchronize()?;
    let rss_at_start = rss_bytes();
    reset_hwm();
    emit(row, "start", json!({}));
    let start = Instant::now();
    let (value, mut extra) = f()?;
    device.synchronize()?;
    let seconds = start.elapsed().as_secs_f64();
    if let Value::Object(map) = &mut extra {
        map.insert("seconds".into(), json!(seconds));
        map.insert("rss_at_start".into(), json!(rss_at_start));
        map.insert("peak_rss".into(), json!(hwm_bytes()));
    }
    emit(row, "end", extra);
    Ok(value)
}

/// `f` run `repeat` times (at least once) as the row `row`, which reports the
/// fastest run: one small operation timed once is mostly noise on shared cores.
fn timed_fastest(
    row: &str,
    device: &Device,
    repeat: usize,
    extra: Value,
    mut f: impl FnMut() -> Result<Tensor>,
) -> Result<Tensor> {
    let mut fastest = f64::INFINITY;
    let mut out = None;
    timed(row, device, || {
        for _ in 0..repeat.max(1) {
            // The previous run's result is freed first, as the reference's
            // is: kept alive, every run's output needed fresh pages.
            out = None;
            let start = Instant::now();
            let y = f()?;
            device.synchronize()?;
            fastest = fastest.min(start.elapsed().as_secs_f64());
            out = Some(y);
        }
        Ok(((), extra))
    })?;
    emit(
        row,
        "summary",
        json!({"seconds": fastest, "runs": repeat.max(1)}),
    );
    out.context("no run")
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

/// `--dtype`, else the dtype a released-size model computes in on `device`
/// (bf16; the pipeline's VAE stays f32).
fn model_dtype(common: &Common, device: &Device) -> Result<DType> {
    match &common.dtype {
        Some(name) => parse_dtype(name),
        None => Ok(compute_dtype(device, u64::MAX)),
    }
}

fn dit(args: &DitArgs) -> Result<()> {
    let device = open_device(args.video.common.device)?;
    let cfg: WanTransformerConfig = read_config(&args.video.config)?;
    let dtype = model_dtype(&args.video.common, &device)?;
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
    let dtype = model_dtype(&args.common, &device)?;
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
    let dtype = model_dtype(&args.common, &device)?;
    let shape = [1, args.heads, args.tokens, args.head_dim];
    let qkv = |_| -> Result<Tensor> { Ok(randn(&shape, &device)?.to_dtype(dtype)?) };
    let (q, k, v) = (qkv(0)?, qkv(1)?, qkv(2)?);
    let scale = (args.head_dim as f64).powf(-0.5);
    let extra = || json!({"tokens": args.tokens, "heads": args.heads, "head_dim": args.head_dim});
    if !device.is_cuda() {
        model_attention(&q, &k, &v, Mask::None, scale)?; // warm-up
        let row = format!("{}-cpu", args.common.row);
        timed_fastest(&row, &device, args.repeat, extra(), || {
            Ok(model_attention(&q, &k, &v, Mask::None, scale)?)
        })?;
        return Ok(());
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

/// The VAE's causal conv3d (kernel 3, padding 1, `channels` in and out) on
/// random `[frames, channels, height, width]` frames with no cached frames
/// (the first chunk of a decode), f32 as the VAE runs.
fn conv3d(args: &Conv3dArgs) -> Result<()> {
    let device = open_device(args.common.device)?;
    let c = args.channels;
    let conv = CausalConv3d::cube(
        RandomWeights::default().var_builder(DType::F32, &device),
        c,
        c,
        3,
        1,
    )?;
    let x = randn(&[args.frames, c, args.height, args.width], &device)?;
    conv.forward(&x, None)?; // warm-up
    let extra =
        json!({"channels": c, "frames": args.frames, "height": args.height, "width": args.width});
    let y = timed_fastest(&args.common.row, &device, args.repeat, extra, || {
        Ok(conv.forward(&x, None)?)
    })?;
    emit(&args.common.row, "check", json!({"finite": finite(&y)?}));
    Ok(())
}

/// gelu with the tanh approximation (the DiT's feed-forward activation) on a
/// random `rows`×`cols` matrix in the compute dtype.
fn gelu(args: &GeluArgs) -> Result<()> {
    let device = open_device(args.common.device)?;
    let x =
        randn(&[args.rows, args.cols], &device)?.to_dtype(model_dtype(&args.common, &device)?)?;
    gelu_tanh(&x)?; // warm-up
    let extra = json!({"rows": args.rows, "cols": args.cols});
    timed_fastest(&args.common.row, &device, args.repeat, extra, || {
        Ok(gelu_tanh(&x)?)
    })?;
    Ok(())
}

/// The weight loader (`kubewan_model_common::var_builder`, what every model
/// loads through) into f32 on the device against a plain sequential `read()`
/// of the same files into one reused 16 MiB buffer, alternating, `rounds`
/// times with the page cache warm, then cold (each file dropped from the page
/// cache with `posix_fadvise(DONTNEED)` before each run; skipped where that
/// fails). Rows `PREFIX-read-warm`, `PREFIX-warm`, `PREFIX-read-cold`,
/// `PREFIX-cold`, each with its fastest round; the load rows carry the bytes
/// loaded, against which their peak RSS is read.
fn load(args: &LoadArgs) -> Result<()> {
    let device = open_device(args.common.device)?;
    let files = safetensors_files(&args.dir, &args.stem)?;
    let mut loaded_bytes = 0;
    for f in &files {
        loaded_bytes += read_header(f)?.loaded_bytes(DType::F32);
    }
    let row = &args.common.row;
    read_files(&files)?; // warm the page cache
    for cache in ["warm", "cold"] {
        let cold = cache == "cold";
        if cold && let Err(e) = evict(&files) {
            eprintln!("cold rounds skipped: posix_fadvise(DONTNEED) failed: {e}");
            break;
        }
        let (read_row, load_row) = (format!("{row}-read-{cache}"), format!("{row}-{cache}"));
        let (mut read_s, mut load_s) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..args.rounds.max(1) {
            if cold {
                evict(&files)?;
            }
            let start = Instant::now();
            let bytes = timed(&read_row, &device, || Ok((read_files(&files)?, json!({}))))?;
            read_s = read_s.min(start.elapsed().as_secs_f64());
            if cold {
                evict(&files)?;
            }
            let start = Instant::now();
            let weights = timed(&load_row, &device, || {
                let vb = var_builder(&args.dir, &args.stem, DType::F32, &device)?;
                Ok((
                    vb,
                    json!({"file_bytes": bytes, "weight_bytes": loaded_bytes}),
                ))
            })?;
            load_s = load_s.min(start.elapsed().as_secs_f64());
            drop(weights);
            // The next load faults fresh pages, as a pod's first load does.
            trim_heap();
        }
        emit(&read_row, "summary", json!({"seconds": read_s}));
        emit(&load_row, "summary", json!({"seconds": load_s}));
    }
    Ok(())
}

/// Reads every file sequentially into one reused 16 MiB buffer; the bytes read.
fn read_files(files: &[PathBuf]) -> Result<u64> {
    use std::io::Read;
    let mut buf = vec![0u8; 16 << 20];
    let mut total = 0;
    for f in files {
        let mut file = std::fs::File::open(f)?;
        loop {
            match file.read(&mut buf)? {
                0 => break,
                n => total += n as u64,
            }
        }
    }
    Ok(total)
}

/// Drops `files` from the page cache (clean pages only; no root needed).
fn evict(files: &[PathBuf]) -> Result<()> {
    use std::os::unix::io::AsRawFd;
    for f in files {
        let file = std::fs::File::open(f)?;
        // SAFETY: a valid open descriptor; the call only drops clean cached pages.
        let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if rc != 0 {
            bail!("{}: {}", f.display(), std::io::Error::from_raw_os_error(rc));
        }
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
        "mid" => mid_vlm(),
        "tiny" => CheckpointSpec::tiny(1),
        other => bail!("unknown VLM shape {other:?} (7b, mid or tiny)"),
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

/// A mid-size Qwen2.5-VL for the CPU benchmark: the 3B's layer dimensions
/// (text hidden 2048 with GQA 16/2, vision blocks of 1280 with 112-px windows)
/// and its vocabulary, with 4 text layers and 8 vision blocks (full attention
/// in the 4th and the 8th): about 0.8 B parameters, 1.6 GB in bf16, so a
/// prefill and a few dozen decoded tokens take seconds on 2 cores in either dtype.
fn mid_vlm() -> CheckpointSpec {
    let mut spec = CheckpointSpec::qwen25_vl_3b(1);
    spec.text.num_hidden_layers = 4;
    spec.vision.depth = 8;
    spec.vision.fullatt_block_indexes = vec![3, 7];
    spec
}

/// `--dtype` of the VLM row: f32 or bf16.
fn parse_dtype(name: &str) -> Result<DType> {
    match name {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        other => bail!("unknown dtype {other:?} (f32 or bf16)"),
    }
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
    let dtype = match &args.common.dtype {
        Some(name) => parse_dtype(name)?,
        None => compute_dtype(&device, weight_bytes),
    };
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
        // The decoding steps on their own: from the first token (the prefill's) to the
        // last, as reference.py's streamer times PyTorch's; a separately timed prefill
        // subtracted from the whole call would carry that run's noise into the rate.
        let mut first_and_last: Option<(Instant, Instant)> = None;
        let out = model.generate_streaming(&request, |_| {
            let now = Instant::now();
            first_and_last = Some(first_and_last.map_or((now, now), |(first, _)| (first, now)));
        })?;
        let decode_seconds = first_and_last.map(|(first, last)| (last - first).as_secs_f64());
        let new_tokens = out.token_ids.len();
        Ok((
            out,
            json!({"new_tokens": new_tokens, "decode_seconds": decode_seconds}),
        ))
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
