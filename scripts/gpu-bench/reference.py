#!/usr/bin/env python3
"""The PyTorch reference side of the GPU benchmark (run.py runs it beside
`kubewan-runner bench …` with the same arguments and prints the table).

The stack kubewan replaces, as it runs: diffusers (WanTransformer3DModel,
AutoencoderKLWan) and transformers (UMT5EncoderModel,
Qwen2_5_VLForConditionalGeneration), bf16 except the VAE (f32), attention
through PyTorch's scaled_dot_product_attention. Real-sized models with random
weights are built on the device with the dtypes `from_pretrained(...,
torch_dtype=bfloat16)` gives (the model's `_keep_in_fp32_modules` stay in
f32); the VLM is loaded from the checkpoint `kubewan-runner bench write-vlm`
wrote. Each command warms up on a small input, then times the real calls with
the device synchronised around them.

Output: the runner's protocol, one JSON object per line on stdout
(`{"row", "event": "start"}` / `{"row", "event": "end", "seconds", ...}`).
"""

import argparse
import json
import sys
import time

import torch


def emit(row, event, **extra):
    print(json.dumps({"row": row, "event": event, **extra}), flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(row, device, fn):
    """Runs fn() as row `row`; fn returns (value, extra fields of the end event)."""
    sync(device)
    emit(row, "start")
    start = time.perf_counter()
    value, extra = fn()
    sync(device)
    emit(row, "end", seconds=time.perf_counter() - start, **extra)
    return value


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


def model_dtype(device):
    """bf16, as the reference pipelines run the big models (f32 on the CPU dry run)."""
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
    dtype = model_dtype(device)
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
    model = like_from_pretrained(model, model_dtype(device), getattr(model, "_keep_in_fp32_modules_strict", None))
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
    dtype = model_dtype(device)
    q, k, v = (torch.randn(1, args.heads, args.tokens, args.head_dim, device=device, dtype=dtype) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    sdpa(q, k, v)
    row = f"{args.row}-sdpa"
    timed(row, device, lambda: (sdpa(q, k, v), {"tokens": args.tokens}))


def vlm(args, device):
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration

    images = [Image.open(p).convert("RGB") for p in args.image]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": args.prompt}]
    dtype = model_dtype(device)
    processor = load_processor(args.model)
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    baseline = torch.cuda.memory_reserved(device) if device.type == "cuda" else None
    row = args.row
    model = timed(f"{row}-load", device, lambda: (
        Qwen2_5_VLForConditionalGeneration.from_pretrained(
            args.model, dtype=dtype, attn_implementation="sdpa", device_map=str(device)).eval(), {}))

    def inputs():
        # The processor runs inside the timed regions, as the runner's prepare() does.
        return processor(text=[text], images=images, return_tensors="pt").to(device)

    with torch.no_grad():
        model(**inputs())  # warm-up
        timed(f"{row}-prefill", device, lambda: (model(**inputs()).logits, {}))
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


def generate(model, inputs, max_new_tokens):
    prompt = inputs["input_ids"].shape[1]
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out, {"new_tokens": int(out.shape[1] - prompt)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, fn, *flags):
        p = sub.add_parser(name)
        p.add_argument("--device", default="cuda")
        p.add_argument("--row", required=True)
        for flag, kwargs in flags:
            p.add_argument(flag, **kwargs)
        p.set_defaults(fn=fn)

    size = ("--size", {"action": "append", "required": True})
    config = ("--config", {"required": True})
    command("dit", dit, config, size, ("--guidance", {"type": float, "default": 5.0}))
    command("vae-decode", vae_decode, config, size)
    command("umt5", umt5, config, ("--tokens", {"type": int, "default": 512}))
    command("attention", attention, ("--heads", {"type": int, "required": True}),
            ("--tokens", {"type": int, "required": True}), ("--head-dim", {"type": int, "default": 128}))
    command("vlm", vlm, ("--model", {"required": True}), ("--image", {"action": "append", "required": True}),
            ("--prompt", {"default": "Describe how the scene moves from the first image to the second."}),
            ("--max-new-tokens", {"type": int, "default": 64}))
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"reference on {device}: torch {torch.__version__}", file=sys.stderr)
    args.fn(args, device)


if __name__ == "__main__":
    main()
