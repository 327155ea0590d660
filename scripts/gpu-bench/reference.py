#!/usr/bin/env python3
"""The PyTorch reference side of the GPU and CPU benchmarks (run.py runs it
beside `kubewan-runner bench …` with the same arguments and prints the table).

The stack kubewan replaces, as it runs: diffusers (WanTransformer3DModel,
AutoencoderKLWan) and transformers (UMT5EncoderModel,
Qwen2_5_VLForConditionalGeneration), bf16 except the VAE (f32), attention
through PyTorch's scaled_dot_product_attention. Real-sized models with random
weights are built on the device with the dtypes `from_pretrained(...,
torch_dtype=bfloat16)` gives (the model's `_keep_in_fp32_modules` stay in
f32); the VLM is loaded from the checkpoint `kubewan-runner bench write-vlm`
wrote. Each command warms up on a small input, then times the real calls with
the device synchronised around them. On the CPU everything runs in f32, and
the single operations (attention, conv3d, gelu) report their fastest of
--repeat runs.

Output: the runner's protocol, one JSON object per line on stdout
(`{"row", "event": "start"}` / `{"row", "event": "end", "seconds", ...}`, the
end with the RSS at the start and the peak RSS during the row; `summary`: the
fastest of several runs).
"""

import argparse
import glob
import json
import os
import sys
import time

import torch


def emit(row, event, **extra):
    print(json.dumps({"row": row, "event": event, **extra}), flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def status_bytes(field):
    """A /proc/self/status figure in bytes (Linux; None elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            line = next(l for l in f if l.startswith(field + ":"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return None


def reset_peak_rss():
    """Resets VmHWM to the current RSS (as the runner does at each row's start)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def timed(row, device, fn):
    """Runs fn() as row `row`; fn returns (value, extra fields of the end event)."""
    sync(device)
    rss_at_start = status_bytes("VmRSS")
    reset_peak_rss()
    emit(row, "start")
    start = time.perf_counter()
    value, extra = fn()
    sync(device)
    emit(row, "end", seconds=time.perf_counter() - start, rss_at_start=rss_at_start,
         peak_rss=status_bytes("VmHWM"), **extra)
    return value


def timed_fastest(row, device, repeat, fn, **extra):
    """fn() run `repeat` times as row `row`, which reports the fastest run."""
    times = []

    def runs():
        for _ in range(max(repeat, 1)):
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
        return None, extra

    timed(row, device, runs)
    emit(row, "summary", seconds=min(times), runs=len(times))


def release_cache(device):
    """Hands the caching allocator's free blocks back (construction leftovers)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def finite(t):
    return bool(torch.isfinite(t.float()).all())


def parse_size(size):
    """LABEL=WIDTHxHEIGHTxFRAMES -> (label, (width, height, frames))."""
    label, dims = size.split("=")
    w, h, f = (int(x) for x in dims.split("x"))
    return label, (w, h, f)


def size_rows(args, device, run):
    """For each --size LABEL=WxHxF: run(w, h, f) timed as row ROW-LABEL, then a finiteness check."""
    for size in args.size:
        label, (w, h, f) = parse_size(size)
        row = f"{args.row}-{label}"
        out = timed(row, device, lambda: (run(w, h, f), {}))
        emit(row, "check", finite=finite(out))
        del out
        release_cache(device)


def latent_shape(frames, height, width):
    return (frames - 1) // 4 + 1, height // 8, width // 8


def model_dtype(device, name=None):
    """--dtype, else bf16 as the reference pipelines run the big models (f32 on the CPU)."""
    if name:
        return {"f32": torch.float32, "bf16": torch.bfloat16}[name]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def like_from_pretrained(model, dtype, keep):
    """Casts `model` as from_pretrained(torch_dtype=dtype) leaves it: every floating
    parameter and buffer in `dtype` except those under a module named in `keep`
    (diffusers: `_keep_in_fp32_modules`; transformers keeps only its
    `_keep_in_fp32_modules_strict` in f32 for bf16)."""
    keep = set(keep or ())
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if tensor.is_floating_point() and not keep.intersection(name.split(".")):
                tensor.data = tensor.data.to(dtype)
    return model


def build(cls_or_fn, device):
    """Builds a model with its own (random) initialisation directly on the device."""
    with torch.device(device):
        return cls_or_fn()


def dit(args, device):
    from diffusers import WanTransformer3DModel

    config = json.load(open(args.config))
    dtype = model_dtype(device, args.dtype)
    model = build(lambda: WanTransformer3DModel.from_config(config), device)
    model = like_from_pretrained(model.eval(), dtype, model._keep_in_fp32_modules)
    release_cache(device)
    print(f"DiT: {sum(p.numel() for p in model.parameters())} parameters", file=sys.stderr)
    images, image_tokens = (2, config["pos_embed_seq_len"] // 2) if config.get("pos_embed_seq_len") else (1, 257)
    prompt = torch.randn(1, 512, config["text_dim"], device=device, dtype=dtype)
    negative = torch.randn(1, 512, config["text_dim"], device=device, dtype=dtype)
    image = torch.randn(images, image_tokens, config["image_dim"], device=device, dtype=dtype)

    def step(w, h, f):
        # WanImageToVideoPipeline's step: the conditional and the unconditional pass, then CFG.
        lt, lh, lw = latent_shape(f, h, w)
        x = torch.randn(1, config["in_channels"], lt, lh, lw, device=device).to(dtype)
        t = torch.tensor([500.0], device=device).expand(1)
        cond = model(hidden_states=x, timestep=t, encoder_hidden_states=prompt,
                     encoder_hidden_states_image=image, return_dict=False)[0]
        if args.guidance <= 1:  # guidance off: the conditional pass alone, as the runner
            return cond
        uncond = model(hidden_states=x, timestep=t, encoder_hidden_states=negative,
                       encoder_hidden_states_image=image, return_dict=False)[0]
        return uncond + args.guidance * (cond - uncond)

    with torch.no_grad():
        step(64, 64, 1)  # warm-up
        size_rows(args, device, step)


def vae_decode(args, device):
    from diffusers import AutoencoderKLWan

    config = json.load(open(args.config))
    vae = build(lambda: AutoencoderKLWan.from_config(config), device).eval()
    mean = torch.tensor(config["latents_mean"], device=device).view(1, -1, 1, 1, 1)
    std = torch.tensor(config["latents_std"], device=device).view(1, -1, 1, 1, 1)

    def decode(w, h, f):
        # The pipeline's output step: denormalise, decode (f32).
        lt, lh, lw = latent_shape(f, h, w)
        z = torch.randn(1, config["z_dim"], lt, lh, lw, device=device)
        return vae.decode(z * std + mean, return_dict=False)[0]

    with torch.no_grad():
        decode(64, 64, 1)  # warm-up
        size_rows(args, device, decode)


def umt5(args, device):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(**json.load(open(args.config)))
    model = build(lambda: UMT5EncoderModel(config), device).eval()
    model = like_from_pretrained(model, model_dtype(device, args.dtype), getattr(model, "_keep_in_fp32_modules_strict", None))
    release_cache(device)

    def encode(tokens):
        ids = torch.randint(0, config.vocab_size, (1, tokens), device=device)
        mask = torch.ones(1, tokens, dtype=torch.long, device=device)
        return model(input_ids=ids, attention_mask=mask).last_hidden_state

    with torch.no_grad():
        encode(8)
        hidden = timed(args.row, device, lambda: (encode(args.tokens), {"tokens": args.tokens}))
        emit(args.row, "check", finite=finite(hidden))


def attention(args, device):
    dtype = model_dtype(device, args.dtype)
    q, k, v = (torch.randn(1, args.heads, args.tokens, args.head_dim, device=device, dtype=dtype) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    sdpa(q, k, v)
    row = f"{args.row}-sdpa"
    if device.type == "cpu":
        with torch.no_grad():
            timed_fastest(row, device, args.repeat, lambda: sdpa(q, k, v), tokens=args.tokens)
    else:
        timed(row, device, lambda: (sdpa(q, k, v), {"tokens": args.tokens}))


def conv3d(args, device):
    """diffusers' WanCausalConv3d (kernel 3, padding 1) on random frames, f32."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    conv = build(lambda: WanCausalConv3d(args.channels, args.channels, 3, padding=1), device).eval()
    x = torch.randn(1, args.channels, args.frames, args.height, args.width, device=device)
    with torch.no_grad():
        conv(x)
        timed_fastest(args.row, device, args.repeat, lambda: conv(x))


def gelu(args, device):
    x = torch.randn(args.rows, args.cols, device=device, dtype=model_dtype(device, args.dtype))
    fn = lambda: torch.nn.functional.gelu(x, approximate="tanh")  # noqa: E731
    fn()
    timed_fastest(args.row, device, args.repeat, fn)


def load(args, device):
    """safetensors' load_file (what from_pretrained reads a checkpoint with) into
    resident f32 tensors against a plain sequential read of the same files,
    alternating, warm then cold (posix_fadvise(DONTNEED) before each run): the
    runner's rows. load_file alone maps the file and reads nothing until a
    tensor is used, so each tensor is copied out of the mapping, as the runner's
    loader puts every weight in its own memory."""
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(args.dir, f"{args.stem}*.safetensors")))
    buf = bytearray(16 << 20)

    def read_all():
        total = 0
        for name in files:
            with open(name, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    total += n
        return total

    def evict():
        for name in files:
            fd = os.open(name, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def load_all():
        weights = {}
        for name in files:
            weights.update((k, v.to(torch.float32, copy=True))
                           for k, v in load_file(name, device=str(device)).items())
        return weights, {"weight_bytes": sum(t.numel() * 4 for t in weights.values())}

    read_all()
    for cache in ("warm", "cold"):
        best = {}
        for _ in range(max(args.rounds, 1)):
            for row, fn in ((f"{args.row}-read-{cache}", lambda: (read_all(), {})),
                            (f"{args.row}-{cache}", load_all)):
                if cache == "cold":
                    evict()
                start = time.perf_counter()
                timed(row, device, fn)  # the weights are dropped at once
                best[row] = min(best.get(row, float("inf")), time.perf_counter() - start)
        for row, seconds in best.items():
            emit(row, "summary", seconds=seconds)


def write_dit(args, device):
    """The DiT of --config with random weights as a diffusers transformer/ folder (f32,
    one file): the checkpoint both sides' load rows read."""
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_config(json.load(open(args.config)))
    model.save_pretrained(args.dir, safe_serialization=True, max_shard_size="100GB")


def vlm(args, device):
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration

    images = [Image.open(p).convert("RGB") for p in args.image]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": args.prompt}]
    dtype = model_dtype(device, args.dtype)
    processor = load_processor(args.model)
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    baseline = torch.cuda.memory_reserved(device) if device.type == "cuda" else None
    row = args.row
    model = timed(f"{row}-load", device, lambda: (
        Qwen2_5_VLForConditionalGeneration.from_pretrained(
            # A device map needs accelerate; the CPU is where from_pretrained puts the weights anyway.
            args.model, dtype=dtype, attn_implementation="sdpa",
            device_map=str(device) if device.type == "cuda" else None).eval(), {}))

    def inputs():
        # The processor runs inside the timed regions, as the runner's prepare() does.
        return processor(text=[text], images=images, return_tensors="pt").to(device)

    # The prefill is what generate() runs before its first token: logits of the
    # last position only (as the runner's), not the whole prompt's (151 936 per
    # position), which generate() never computes.
    def prefill():
        return model(**inputs(), logits_to_keep=1).logits

    with torch.no_grad():
        prefill()  # warm-up
        timed(f"{row}-prefill", device, lambda: (prefill(), {}))
        out = timed(f"{row}-generate", device, lambda: generate(model, inputs(), args.max_new_tokens))
    del model, out
    release_cache(device)
    emit(f"{row}-release", "check",
         baseline_vram_bytes=baseline,
         after_vram_bytes=torch.cuda.memory_reserved(device) if device.type == "cuda" else None)


def load_processor(path):
    """transformers' processor of the checkpoint; without torchvision (the CPU dry
    run's environment has none) its image-only form with the PIL image processor."""
    from transformers import AutoProcessor
    try:
        return AutoProcessor.from_pretrained(path)
    except ImportError:
        from transformers import AutoTokenizer, Qwen2_5_VLProcessor
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        from transformers.processing_utils import ProcessorMixin
        template = json.load(open(f"{path}/chat_template.json"))["chat_template"]
        # No video processor to check for that slot: images only.
        ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: None
        return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessorPil.from_pretrained(path),
                                   tokenizer=AutoTokenizer.from_pretrained(path), chat_template=template)


class TokenClock:
    """A generate() streamer that notes when each put() comes: the prompt's first
    (before the prefill), then each token as it is chosen (on the host: .cpu() has
    synchronised a GPU)."""

    def __init__(self):
        self.times = []

    def put(self, _tokens):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def generate(model, inputs, max_new_tokens):
    prompt = inputs["input_ids"].shape[1]
    clock = TokenClock()
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=clock)
    # The decoding steps on their own, from the first token to the last (as the runner's row).
    token_times = clock.times[1:]
    decode_seconds = token_times[-1] - token_times[0] if token_times else None
    return out, {"new_tokens": int(out.shape[1] - prompt), "decode_seconds": decode_seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, fn, *flags):
        p = sub.add_parser(name)
        p.add_argument("--device", default="cuda")
        p.add_argument("--row", required=True)
        p.add_argument("--dtype", choices=["f32", "bf16"])
        for flag, kwargs in flags:
            p.add_argument(flag, **kwargs)
        p.set_defaults(fn=fn)

    size = ("--size", {"action": "append", "required": True})
    config = ("--config", {"required": True})
    command("dit", dit, config, size, ("--guidance", {"type": float, "default": 5.0}))
    command("vae-decode", vae_decode, config, size)
    command("umt5", umt5, config, ("--tokens", {"type": int, "default": 512}))
    repeat = ("--repeat", {"type": int, "default": 3})
    command("attention", attention, ("--heads", {"type": int, "required": True}),
            ("--tokens", {"type": int, "required": True}), ("--head-dim", {"type": int, "default": 128}), repeat)
    command("conv3d", conv3d, *[(f"--{d}", {"type": int, "required": True})
                                for d in ("channels", "frames", "height", "width")], repeat)
    command("gelu", gelu, ("--rows", {"type": int, "required": True}), ("--cols", {"type": int, "required": True}),
            ("--repeat", {"type": int, "default": 5}))
    command("load", load, ("--dir", {"required": True}), ("--stem", {"default": "diffusion_pytorch_model"}),
            ("--rounds", {"type": int, "default": 3}))
    command("write-dit", write_dit, config, ("--dir", {"required": True}))
    command("vlm", vlm, ("--model", {"required": True}), ("--image", {"action": "append", "required": True}),
            ("--prompt", {"default": "Describe how the scene moves from the first image to the second."}),
            ("--max-new-tokens", {"type": int, "default": 64}))
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"reference on {device}: torch {torch.__version__}, {torch.get_num_threads()} threads", file=sys.stderr)
    args.fn(args, device)


if __name__ == "__main__":
    main()
