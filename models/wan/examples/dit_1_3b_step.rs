//! Denoising steps of a random-weight Wan DiT with the real Wan2.1-1.3B dimensions (dim 1536,
//! ffn 8960, 12 heads, 30 layers) plus the I2V image branch (image_dim 1280, add_k/add_v
//! projections), at 416x240 with 5 frames, on the CPU: a classifier-free-guidance step (the
//! conditional and the unconditional forward, one UniPC step) and a guidance-1 step (one forward,
//! one Euler step), `--repeat` times alternating. Prints the weights' size, the peak RSS (VmHWM)
//! of the load and of the whole run, and the timings.
//!
//!     cargo run --release -p kubewan-wan --example dit_1_3b_step [-- --dtype f32|bf16 --width 416 --height 240 --frames 5 --repeat 1]
//!     ... --example dit_1_3b_step -- --write DIR     (random weights as a diffusers transformer/ folder)
//!     ... --example dit_1_3b_step -- --write-lora FILE [--rank 64]   (a random LoRA for it in the
//!                                      original Wan layout, bf16, like LightX2V's distill LoRAs)
//!     ... --example dit_1_3b_step -- --load DIR [--mmap | --lora FILE[:SCALE]]   (load DIR with
//!             WanTransformer::load, candle's mmap VarBuilder for comparison, or with the LoRA merged)
//!
//!     ... --example dit_1_3b_step -- --load DIR --compare-read [--rounds 3] [--dtype f32|bf16]
//!             (no step: the loader against a plain sequential read of the same files, alternating,
//!             page cache warm, then cold (the files dropped from the page cache with
//!             posix_fadvise(DONTNEED) before each run): seconds, GiB/s, loader / read, peak RSS)
//!
//! By default the weights are generated in memory (normal, std 1/sqrt(fan_in)). Exits 1 when the
//! peak RSS exceeds twice the weights.

use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use kubewan_model_common::random::RandomWeights;
use kubewan_wan::checkpoint;
use kubewan_wan::euler::FlowEuler;
use kubewan_wan::lora::Lora;
use kubewan_wan::scheduler::{FlowUniPc, UniPcConfig};
use kubewan_wan::transformer::{WanTransformer, WanTransformerConfig};

fn status_kib(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// CPU seconds this process has used (user + system, from /proc/self/stat): unlike wall time,
/// not stretched when other jobs share the cores.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name (which ends with ')'): utime and stime are 12th and 13th.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let field = |i: usize| {
        after
            .split_whitespace()
            .nth(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Clock ticks of 1/100 s (USER_HZ on Linux).
    (field(11) + field(12)) / 100.0
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
    let value = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
    };
    if let Some(dir) = value("--write") {
        return write_weights(std::path::Path::new(dir), &cfg, dtype);
    }
    if let Some(file) = value("--write-lora") {
        return write_lora(
            std::path::Path::new(file),
            &cfg,
            arg("--rank", "64").parse()?,
        );
    }
    if args.iter().any(|a| a == "--compare-read") {
        let dir = value("--load").ok_or("--compare-read needs --load DIR")?;
        return compare_read(
            std::path::Path::new(dir),
            dtype,
            arg("--rounds", "3").parse()?,
        );
    }
    let repeat: usize = arg("--repeat", "1").parse()?;
    let lora = value("--lora")
        .map(String::as_str)
        .map(Lora::parse)
        .transpose()?;
    let from = args
        .iter()
        .position(|a| a == "--load")
        .and_then(|i| args.get(i + 1))
        .map(std::path::PathBuf::from);
    let t0 = Instant::now();
    let cpu0 = cpu_seconds();
    let random = RandomWeights::default();
    let model = match &from {
        None => WanTransformer::new(random.var_builder(dtype, &dev), cfg.clone())?,
        // The real loader (config.json + safetensors read from disk).
        Some(dir) if args.iter().any(|a| a == "--mmap") => {
            // For comparison: candle's memory-mapped VarBuilder (kubewan-model-common).
            let cfg: WanTransformerConfig = serde_json::from_str(&std::fs::read_to_string(
                checkpoint::TRANSFORMER_CONFIG.path(dir),
            )?)?;
            let vb = kubewan_model_common::mmap_var_builder(
                dir,
                checkpoint::TRANSFORMER_WEIGHTS.stem,
                dtype,
                &dev,
            )?;
            WanTransformer::new(vb, cfg)?
        }
        Some(dir) => match &lora {
            Some(lora) => {
                let (model, notes) =
                    WanTransformer::load_with_loras(dir, dtype, &dev, std::slice::from_ref(lora))?;
                notes.iter().for_each(|n| eprintln!("{n}"));
                model
            }
            None => WanTransformer::load(dir, dtype, &dev)?,
        },
    };
    let load_s = t0.elapsed().as_secs_f64();
    let load_cpu_s = cpu_seconds() - cpu0;
    let load_hwm = status_kib("VmHWM:") * 1024;
    let params = count_params(&cfg);
    let weight_bytes = params * dtype.size_in_bytes() as u64;
    if from.is_none() {
        assert_eq!(params, random.params(), "parameter count");
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

    let text_c = model.embed_text(&text)?;
    let text_u = model.embed_text(&negative)?;
    let img = model.embed_image(&image)?;
    let input = Tensor::cat(&[&latents, &condition], 1)?.to_dtype(dtype)?;
    // A classifier-free-guidance step (two forwards, UniPC) and a guidance-1 step (one forward,
    // Euler), alternating; the Euler step after a UniPC one starts its own 4-step schedule.
    // Wall and CPU seconds of each: on shared cores the CPU seconds are the steadier measure.
    let mut cfg_s = Vec::new();
    let mut g1_s = Vec::new();
    let mut outputs = Vec::new();
    let timed = |f: &mut dyn FnMut() -> candle_core::Result<Tensor>| {
        let (t, c) = (Instant::now(), cpu_seconds());
        f().map(|out| (out, (t.elapsed().as_secs_f64(), cpu_seconds() - c)))
    };
    for _ in 0..repeat {
        let (out, cfg) = timed(&mut || {
            let cond = model.forward_embedded(&input, &[t as f32], &text_c, img.as_ref())?;
            let uncond = model.forward_embedded(&input, &[t as f32], &text_u, img.as_ref())?;
            let noise = (&uncond + ((cond - &uncond)? * 5.0)?)?;
            sched
                .clone()
                .step(&noise, t, &latents)
                .map_err(candle_core::Error::wrap)
        })?;
        outputs.push(out);
        cfg_s.push(cfg);
        let (out, g1) = timed(&mut || {
            let mut euler = FlowEuler::new(1000, 5.0).map_err(candle_core::Error::wrap)?;
            euler.set_timesteps(4).map_err(candle_core::Error::wrap)?;
            let te = euler.timesteps()[0];
            let noise = model.forward_embedded(&input, &[te], &text_c, img.as_ref())?;
            euler
                .step(&noise, te, &latents)
                .map_err(candle_core::Error::wrap)
        })?;
        outputs.push(out);
        g1_s.push(g1);
    }
    let total = |v: &[(f64, f64)]| {
        v.iter()
            .fold((0.0, 0.0), |(w, c), (dw, dc)| (w + dw, c + dc))
    };
    let (cfg_wall, cfg_cpu) = total(&cfg_s);
    let (g1_wall, g1_cpu) = total(&g1_s);
    let n = repeat as f64;
    let mut finite = true;
    for out in &outputs {
        let values = out.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        finite &= values.iter().all(|v| v.is_finite());
    }

    let hwm = status_kib("VmHWM:") * 1024;
    let rss_end = status_kib("VmRSS:") * 1024;
    let tokens = lat_t * (lh / 2) * (lw / 2);
    println!(
        "Wan2.1-1.3B-shaped DiT (+ I2V image branch), random weights {}, CPU, {dtype:?}",
        match (&from, &lora) {
            (Some(d), _) if args.iter().any(|a| a == "--mmap") =>
                format!("loaded from {} (memory-mapped VarBuilder)", d.display()),
            (Some(d), Some(l)) => format!(
                "loaded from {} with the LoRA {} merged at {} (WanTransformer::load_with_loras)",
                d.display(),
                l.path.display(),
                l.scale
            ),
            (Some(d), None) => format!("loaded from {} (WanTransformer::load)", d.display()),
            (None, _) => "generated in memory".to_string(),
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
        "  RSS after load       {:.3} GiB ({load_s:.1} s wall, {load_cpu_s:.1} s CPU to build)",
        gib(rss_loaded)
    );
    println!(
        "  peak RSS of the load {:.3} GiB = {:.3}x the weights",
        gib(load_hwm),
        load_hwm as f64 / weight_bytes as f64
    );
    println!(
        "  CFG step             {:.1} s wall, {:.1} s CPU (2 forwards + UniPC step; mean of {repeat}, each (wall, CPU): {cfg_s:.1?})",
        cfg_wall / n,
        cfg_cpu / n
    );
    println!(
        "  guidance-1 step      {:.1} s wall, {:.1} s CPU (1 forward + Euler step; mean of {repeat}, each: {g1_s:.1?})",
        g1_wall / n,
        g1_cpu / n
    );
    println!(
        "  guidance-1 / CFG     {:.2}x in wall time, {:.2}x in CPU time",
        g1_wall / cfg_wall,
        g1_cpu / cfg_cpu
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

/// Writes a random LoRA for a transformer of `cfg` in the original Wan layout
/// (`diffusion_model.blocks.N.{self_attn,cross_attn}.{q,k,v,o}`, `cross_attn.{k_img,v_img}`,
/// `ffn.{0,2}`: `lora_down`, `lora_up`, `alpha` = rank), bf16, like LightX2V's distill LoRAs.
fn write_lora(
    path: &std::path::Path,
    cfg: &WanTransformerConfig,
    rank: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let d = cfg.inner_dim();
    let mut tensors = std::collections::HashMap::new();
    let mut layer = |name: String, out: usize, inn: usize| -> candle_core::Result<()> {
        let down = (Tensor::randn(0f32, 1f32, (rank, inn), &dev)? * (inn as f64).powf(-0.5))?;
        let up = (Tensor::randn(0f32, 1f32, (out, rank), &dev)? * 0.01)?;
        tensors.insert(
            format!("{name}.lora_down.weight"),
            down.to_dtype(DType::BF16)?,
        );
        tensors.insert(format!("{name}.lora_up.weight"), up.to_dtype(DType::BF16)?);
        tensors.insert(
            format!("{name}.alpha"),
            Tensor::new(rank as f32, &dev)?.to_dtype(DType::BF16)?,
        );
        Ok(())
    };
    for b in 0..cfg.num_layers {
        let block = format!("diffusion_model.blocks.{b}");
        for attn in ["self_attn", "cross_attn"] {
            for p in ["q", "k", "v", "o"] {
                layer(format!("{block}.{attn}.{p}"), d, d)?;
            }
        }
        if let Some(a) = cfg.added_kv_proj_dim {
            layer(format!("{block}.cross_attn.k_img"), d, a)?;
            layer(format!("{block}.cross_attn.v_img"), d, a)?;
        }
        layer(format!("{block}.ffn.0"), cfg.ffn_dim, d)?;
        layer(format!("{block}.ffn.2"), d, cfg.ffn_dim)?;
    }
    candle_core::safetensors::save(&tensors, path)?;
    println!(
        "wrote {} LoRA tensors (rank {rank}) to {}",
        tensors.len(),
        path.display()
    );
    Ok(())
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
    let rec = Recorder(map.clone(), RandomWeights::default());
    let backend: Box<dyn SimpleBackend> = Box::new(rec);
    let vb = VarBuilder::from_backend(backend, dtype, Device::Cpu);
    // Building the model requests (and so records) every weight it has, under its real name.
    drop(WanTransformer::new(vb, cfg.clone())?);
    let map = std::mem::take(&mut *map.lock().unwrap());
    // The model keeps reshaped views of a few weights (the patch embedding); store the originals.
    let weights = format!("{}.safetensors", checkpoint::TRANSFORMER_WEIGHTS.stem);
    candle_core::safetensors::save(&map, dir.join(weights))?;
    std::fs::write(
        checkpoint::TRANSFORMER_CONFIG.path(dir),
        serde_json::to_string_pretty(cfg)?,
    )?;
    println!("wrote {} tensors to {}", map.len(), dir.display());
    Ok(())
}

/// The weight loader against a plain sequential read of the same files, in one run: `rounds`
/// times alternating (a) `read()` of every file into one reused 16 MiB buffer, discarding,
/// (a') the same read into fresh memory the size of the data (what any loader into anonymous
/// memory must at least do), (b) `kubewan_model_common::var_builder` (what every model loads
/// through) into `dtype` on the CPU, dropped again, and (c) the loader as it was before (each tensor read into a byte buffer,
/// copied into a candle tensor, converted with `to_dtype`); first with the page cache warm,
/// then cold (each file dropped from the page cache before each run). Prints seconds, GiB/s of
/// file bytes, loader / read (speed) and the peak RSS of each load (VmHWM, reset before it)
/// against the bytes loaded.
fn compare_read(
    dir: &std::path::Path,
    dtype: DType,
    rounds: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    use std::io::Read;
    use std::os::unix::io::AsRawFd;
    let stem = checkpoint::TRANSFORMER_WEIGHTS.stem;
    let files = kubewan_model_common::safetensors_files(dir, stem)?;
    let mut file_bytes = 0;
    let mut loaded_bytes = 0;
    let mut stored = std::collections::BTreeSet::new();
    for f in &files {
        file_bytes += std::fs::metadata(f)?.len();
        let header = kubewan_model_common::safetensors::read_header(f)?;
        loaded_bytes += header.loaded_bytes(dtype);
        stored.extend(header.tensors.values().map(|t| format!("{:?}", t.dtype)));
    }
    let mut buf = vec![0u8; 16 << 20];
    let mut read_all = || -> std::io::Result<u64> {
        let mut n = 0;
        for f in &files {
            let mut file = std::fs::File::open(f)?;
            loop {
                match file.read(&mut buf)? {
                    0 => break,
                    k => n += k as u64,
                }
            }
        }
        Ok(n)
    };
    // The same sequential read, into fresh memory the size of the data, kept until every file
    // is read: one copy out of the page cache plus the kernel's page faults (zeroing), the
    // least any loader that keeps the weights in anonymous memory has to do.
    let read_fresh = || -> std::io::Result<u64> {
        let mut kept = Vec::new();
        let mut n = 0;
        for f in &files {
            let mut file = std::fs::File::open(f)?;
            let mut data = vec![0u8; std::fs::metadata(f)?.len() as usize];
            for chunk in data.chunks_mut(16 << 20) {
                file.read_exact(chunk)?;
                n += chunk.len() as u64;
            }
            kept.push(data);
        }
        Ok(n)
    };
    let evict = || -> std::io::Result<()> {
        for f in &files {
            let file = std::fs::File::open(f)?;
            // SAFETY: a valid open descriptor; the call only drops clean cached pages.
            let rc =
                unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            if rc != 0 {
                return Err(std::io::Error::from_raw_os_error(rc));
            }
        }
        Ok(())
    };
    // The peak RSS from here on (writing 5 to clear_refs resets VmHWM to the current RSS).
    let reset_peak = || std::fs::write("/proc/self/clear_refs", "5");
    let old_loader = || -> Result<usize, Box<dyn std::error::Error>> {
        use std::os::unix::fs::FileExt;
        let mut tensors = std::collections::HashMap::new();
        for f in &files {
            let file = std::fs::File::open(f)?;
            let header = kubewan_model_common::safetensors::read_header(f)?;
            for (name, info) in &header.tensors {
                let mut bytes = vec![0u8; info.len as usize];
                file.read_exact_at(&mut bytes, info.offset)?;
                let mut t = Tensor::from_raw_buffer(&bytes, info.dtype, &info.shape, &Device::Cpu)?;
                if t.dtype().is_float() && t.dtype() != dtype {
                    t = t.to_dtype(dtype)?;
                }
                tensors.insert(name.clone(), t);
            }
        }
        Ok(tensors.len())
    };
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    println!(
        "Loading {} ({} file(s), {:.3} GiB, stored {}) into {dtype:?} on the CPU; {} threads \
         available; host {}; load average at start: {}",
        dir.display(),
        files.len(),
        gib(file_bytes),
        stored.into_iter().collect::<Vec<_>>().join("+"),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        hostname.trim(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    );
    println!(
        "  {:<5} {:>5}  {:>19}  {:>19}  {:>19}  {:>19}  {:>14}  {:>18}",
        "cache",
        "round",
        "read s, CPU (GiB/s)",
        "into fresh memory",
        "loader s, CPU",
        "old loader s, CPU",
        "loader / read, fresh",
        "loader peak RSS"
    );
    let mut summary = Vec::new();
    for cold in [false, true] {
        if cold && evict().is_err() {
            println!("  cold: posix_fadvise(DONTNEED) failed; no cold runs");
            break;
        }
        if !cold {
            read_all()?; // warm the page cache
        }
        let mut ratios = Vec::new();
        for round in 1..=rounds {
            let timed = |f: &mut dyn FnMut() -> Result<(), Box<dyn std::error::Error>>| {
                if cold {
                    evict()?;
                }
                let (t, c) = (Instant::now(), cpu_seconds());
                f()?;
                Ok::<_, Box<dyn std::error::Error>>((t.elapsed().as_secs_f64(), cpu_seconds() - c))
            };
            let (read_s, read_cpu) = timed(&mut || {
                assert_eq!(read_all()?, file_bytes);
                Ok(())
            })?;
            let (fresh_s, fresh_cpu) = timed(&mut || {
                assert_eq!(read_fresh()?, file_bytes);
                Ok(())
            })?;
            unsafe { libc::malloc_trim(0) };
            let mut peak = 0;
            let (load_s, load_cpu) = timed(&mut || {
                let _ = reset_peak();
                let vb = kubewan_model_common::var_builder(dir, stem, dtype, &Device::Cpu)?;
                peak = status_kib("VmHWM:") * 1024;
                drop(vb);
                Ok(())
            })?;
            // SAFETY: plain glibc call; hands the freed weights back to the system so the
            // next load faults fresh pages as a first load does.
            unsafe { libc::malloc_trim(0) };
            let (old_s, old_cpu) = timed(&mut || {
                old_loader()?;
                Ok(())
            })?;
            unsafe { libc::malloc_trim(0) };
            let speed = |s: f64| gib(file_bytes) / s;
            println!(
                "  {:<5} {round:>5}  {read_s:>5.2} {read_cpu:>5.2} ({:>5.2})  {fresh_s:>5.2} {fresh_cpu:>5.2} ({:>5.2})  {load_s:>5.2} {load_cpu:>5.2} ({:>5.2})  {old_s:>5.2} {old_cpu:>5.2} ({:>5.2})  {:>6.2}x {:>6.2}x  {:>7.3} GiB {:.3}x",
                if cold { "cold" } else { "warm" },
                speed(read_s),
                speed(fresh_s),
                speed(load_s),
                speed(old_s),
                read_s / load_s,
                fresh_s / load_s,
                gib(peak),
                peak as f64 / loaded_bytes as f64
            );
            ratios.push((read_s, load_s, old_s, fresh_s));
        }
        summary.push((cold, ratios));
    }
    for (cold, runs) in summary {
        let sum = |f: fn(&(f64, f64, f64, f64)) -> f64| runs.iter().map(f).sum::<f64>();
        let (r, l, o, f) = (sum(|x| x.0), sum(|x| x.1), sum(|x| x.2), sum(|x| x.3));
        println!(
            "  {} total over {} rounds: read {r:.2} s, into fresh memory {f:.2} s, loader {l:.2} s, old loader {o:.2} s: loader / read speed {:.2}x (old {:.2}x), loader / read into fresh memory {:.2}x (old {:.2}x)",
            if cold { "cold" } else { "warm" },
            runs.len(),
            r / l,
            r / o,
            f / l,
            f / o
        );
    }
    println!(
        "  weights loaded: {:.3} GiB; load average at the end: {}",
        gib(loaded_bytes),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(())
}
