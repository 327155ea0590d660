#!/usr/bin/env python3
"""Tiny random-weight Wan image-to-video pipelines + golden outputs for kubewan's parity tests:
Wan2.1 (tiny-flf2v, tiny-i2v), step-distilled setups on tiny-i2v (tiny-distill: LoRAs in both file
layouts, flow-matching Euler, guidance 1) and Wan2.2 I2V-A14B's two experts (tiny-wan22).

Builds `WanImageToVideoPipeline`s from diffusers' and transformers' own classes with tiny sizes
(keeping the real structure: 36 input channels = 16 noise + 4 mask + 16 condition latents, RoPE
split over t/h/w, image cross-attention with add_k/add_v projections, a learned image position
embedding for two images (FLF2V), a causal 3-D VAE with z_dim 16, UMT5 with a relative attention
bias in every layer, a CLIP ViT, a T5-style Unigram tokenizer, UniPC with flow sigmas), saves them
with `save_pretrained` (the real diffusers layout) and records goldens.

Run by hand (not in CI), from the repository root:

    ~/.cache/kubewan/venv/bin/python models/wan/scripts/make_tiny.py [--only CASE]
        -> models/wan/tests/data/tiny-flf2v/{model,golden}, tiny-i2v/{model,golden},
           tiny-distill/{lora,golden} (uses tiny-i2v/model), tiny-wan22/{model,lora,golden}

    ~/.cache/kubewan/venv/bin/python models/wan/scripts/make_tiny.py --held-back OUT_DIR --seed N
        -> OUT_DIR/held-flf2v-N and OUT_DIR/held-i2v-N: other sizes / head counts, never committed

The output is deterministic (same bytes on a rerun). To run the component parity tests on held-back
pipelines as well:

    KUBEWAN_WAN_PARITY_DIRS=OUT_DIR/held-flf2v-N:OUT_DIR/held-i2v-N \
        cargo test -p kubewan-wan --test parity_text_image_sched

and for the frames, `kubewan-runner video generate --model OUT_DIR/held-flf2v-N/model ...` with the
values of golden/meta.json, `--latents golden/latents.safetensors`, compared to golden/frames.safetensors.

Setup: the venv at ~/.cache/kubewan/venv plus `pip install ftfy peft`. Versions used for the
committed data: Python 3.11, torch 2.15.0 (CPU), transformers 5.24.0,
diffusers 0.42.1, tokenizers 0.23.3, pillow 13.0.0, numpy 2.4.6, ftfy 6.3.1 (the pipeline's
prompt_clean needs ftfy; without it diffusers raises NameError), peft 0.21.2 (diffusers' LoRA
loading needs it; installed with --no-deps, its dependencies are already in the venv).

Layout of each output directory:
  model/                    the diffusers folder (model_index.json, transformer/, vae/, text_encoder/,
                            tokenizer/, image_encoder/, image_processor/, scheduler/)
  golden/meta.json          every scalar input (prompts, sizes, steps, guidance, shift, ...)
  golden/first.png, last.png           conditioning images at the video size (last only for FLF2V)
  golden/clip_a.png, clip_b.png        odd-sized images for the CLIP preprocessing check
  golden/latents.safetensors           `latents`: the initial noise given to the pipeline
  golden/frames.safetensors            `frames`: f32 [F,H,W,3] in 0..1 (pipeline output, output_type="np")
  golden/e2e.safetensors               prompt_embeds / negative_prompt_embeds / image_embeds / final_latents
  golden/text.safetensors              UMT5: ids, mask, raw last_hidden_state, pipeline prompt embeds
  golden/clip.safetensors              CLIP: pixel values and penultimate hidden states (1 and 2 images)
  golden/resize.safetensors            Pillow resizes of clip_b.png (u8 [h,w,3]) for every filter
  golden/scheduler.safetensors (+meta) sigmas / timesteps per (steps, shift), multistep step() chains
  golden/dit.safetensors               one transformer forward (the first conditional call of the pipeline)
  golden/vae.safetensors               VAE encode (latent mean) and decode

tiny-distill (the tiny-i2v pipeline):
  lora/diffusers.safetensors           PEFT adapter saved by save_lora_weights (+ adapter metadata)
  lora/original.safetensors            original Wan / ComfyUI layout, bf16 (alpha, diff_b, diff, norm diffs)
  golden/merged_<layout>.safetensors   the transformer tensors diffusers' fuse_lora changed
  golden/run_<name>.safetensors        `frames` and `final_latents` of a pipeline run (meta.json: runs)
  golden/euler.safetensors             FlowMatchEulerDiscreteScheduler sigmas/timesteps and a step chain

tiny-wan22 (Wan2.2 I2V-A14B layout: transformer + transformer_2 + boundary_ratio, no image encoder):
  model/, lora/low_noise.safetensors (original layout, for transformer_2)
  golden/first.png, last.png, latents.safetensors, run_<name>.safetensors (meta.json: runs, with the
  transformer component of every call), merged_low.safetensors (load_into_transformer_2 + fuse_lora)
"""

import argparse
import json
import os
import random
import shutil
import sys

import numpy as np
import torch
from PIL import Image

import ftfy  # noqa: F401  (needed by the pipeline's prompt_clean)
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanTransformer3DModel,
)
from safetensors.torch import load_file
from safetensors.torch import save_file as _save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, T5TokenizerFast, UMT5Config, UMT5EncoderModel

CORPUS = [
    "a cinematic sequence of a red fox running through snow at dawn",
    "the camera slowly pans across a quiet harbour with small boats",
    "a woman in a blue coat walks along a rainy street at night, neon lights reflecting",
    "bright tones, overexposed, static, blurred details, subtitles, worst quality, low quality",
    "jpeg compression residue, ugly, incomplete, extra fingers, poorly drawn hands",
    "a drone shot over green mountains and a winding river, golden hour light",
    "the city skyline transforms from day to night as clouds drift past",
    "close-up of a cat's face, whiskers twitching, soft focus background",
    "an astronaut floating in space with the earth below, stars shining",
    "waves crash on the rocky shore while seagulls fly overhead",
    "smooth transition between the two scenes & the light changes",
    "Travel between images: the first frame becomes the last frame.",
]


def save_file(tensors, path):
    """safetensors refuses shared storage: save an independent contiguous copy of each tensor."""
    _save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, path)


def build_tokenizer(out_dir, vocab_size):
    """A T5-style tokenizer (Unigram, Metaspace, `</s>` appended), saved by transformers as tokenizer.json."""
    # A hand-made Unigram vocabulary (deterministic, unlike the multi-threaded trainer): whole words
    # of part of the corpus, a few sub-word pieces and single characters, so that other words are
    # segmented by the Viterbi search; characters outside it become <unk>.
    pieces = {}
    words = sorted({w for line in CORPUS[: len(CORPUS) // 2] for w in line.lower().replace(",", " ").split()})
    for w in words[:vocab_size]:
        pieces["\u2581" + w] = -2.0 - 0.1 * len(w)
    for sub in ["ing", "ed", "s", "er", "tion", "the", "an", "re", "\u2581a", "\u2581the", "\u2581c"]:
        pieces.setdefault(sub, -4.0)
    for ch in sorted(set("".join(CORPUS).lower()) - {" "}) + ["\u2581"]:
        pieces.setdefault(ch, -8.0)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + sorted(pieces.items())
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    eos = tok.token_to_id("</s>")
    assert tok.token_to_id("<pad>") == 0 and eos == 1 and tok.token_to_id("<unk>") == 2
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)]
    )
    fast = T5TokenizerFast(
        tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
        model_max_length=512,
    )
    return fast


def make_image(path, w, h, rng):
    """A smooth image with some noise (so resampling filters matter), saved losslessly."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack(
        [
            128 + 100 * np.sin(xx / max(w, 1) * rng.uniform(2, 7) + rng.uniform(0, 6)),
            128 + 100 * np.cos(yy / max(h, 1) * rng.uniform(2, 7) + rng.uniform(0, 6)),
            128 + 80 * np.sin((xx + yy) / (w + h) * rng.uniform(3, 9)),
        ],
        axis=-1,
    )
    img += rng.normal(0, 20, size=img.shape)
    img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    Image.fromarray(img, "RGB").save(path)
    return Image.open(path).convert("RGB")


def make_text_encoder(tokenizer, cfg):
    """A UMT5 encoder with every weight perturbed (T5 initialises norms to 1 and some weights to tiny values)."""
    vocab = len(tokenizer) + cfg["vocab_pad"]
    umt5_cfg = UMT5Config(
        vocab_size=vocab,
        d_model=cfg["t_dim"],
        d_kv=cfg["t_dkv"],
        d_ff=cfg["t_ff"],
        num_layers=cfg["t_layers"],
        num_heads=cfg["t_heads"],
        relative_attention_num_buckets=cfg["t_buckets"],
        relative_attention_max_distance=cfg["t_maxdist"],
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    text_encoder = UMT5EncoderModel(umt5_cfg).eval()
    with torch.no_grad():
        for name, p in text_encoder.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (p.shape[-1] ** -0.5))
    return text_encoder


def make_image_encoder(cfg):
    """The CLIP vision encoder (perturbed) and its image processor."""
    clip_cfg = CLIPVisionConfig(
        hidden_size=cfg["c_dim"],
        intermediate_size=cfg["c_ff"],
        num_hidden_layers=cfg["c_layers"],
        num_attention_heads=cfg["c_heads"],
        image_size=cfg["c_image"],
        patch_size=cfg["c_patch"],
        hidden_act=cfg["c_act"],
        layer_norm_eps=1e-5,
        projection_dim=cfg["c_dim"],
    )
    image_encoder = CLIPVisionModel(clip_cfg).eval()
    with torch.no_grad():
        for name, p in image_encoder.named_parameters():
            if "layer_norm" in name or "layrnorm" in name:
                if name.endswith("weight"):
                    p.copy_(1.0 + 0.2 * torch.randn_like(p))
                else:
                    p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * 0.5 * (p.shape[-1] ** -0.5 if p.dim() > 1 else 0.2))
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": cfg["c_image"]},
        crop_size={"height": cfg["c_image"], "width": cfg["c_image"]},
        resample=3,
        do_center_crop=True,
        do_convert_rgb=True,
        do_normalize=True,
        do_rescale=True,
        do_resize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        rescale_factor=1 / 255,
    )
    return image_encoder, image_processor


def make_transformer(cfg, image_dim=None, pos_embed_seq_len=None):
    """A Wan DiT with 36 input channels (perturbed); `image_dim` adds the Wan2.1 image branch."""
    inner = cfg["heads"] * cfg["head_dim"]
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=cfg["heads"],
        attention_head_dim=cfg["head_dim"],
        in_channels=36,
        out_channels=16,
        text_dim=cfg["t_dim"],
        freq_dim=cfg["freq_dim"],
        ffn_dim=cfg["ffn"],
        num_layers=cfg["layers"],
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=image_dim,
        added_kv_proj_dim=inner if image_dim is not None else None,
        rope_max_seq_len=1024,
        pos_embed_seq_len=pos_embed_seq_len,
    ).eval()
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if p.dim() == 1 and ("norm" in name):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn_like(p))
            elif "scale_shift_table" in name or "pos_embed" in name:
                p.copy_(0.3 * torch.randn_like(p))
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn_like(p) * fan_in**-0.5)
    return transformer


def make_vae(cfg):
    """The causal 3-D VAE with z_dim 16 (perturbed)."""
    vae = AutoencoderKLWan(
        base_dim=cfg["v_base"],
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=cfg["v_res"],
        attn_scales=[],
        temperal_downsample=[False, True, True],
    ).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if p.dim() == 1 and "gamma" not in name:
                p.copy_(0.05 * torch.randn_like(p))
            elif "gamma" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn_like(p) * fan_in**-0.5)
    return vae


def make_scheduler(shift):
    """UniPC with flow sigmas, as the released Wan folders configure it."""
    return UniPCMultistepScheduler(
        num_train_timesteps=1000,
        solver_order=2,
        prediction_type="flow_prediction",
        solver_type="bh2",
        lower_order_final=True,
        use_flow_sigmas=True,
        flow_shift=shift,
        final_sigmas_type="zero",
        predict_x0=True,
        timestep_spacing="linspace",
    )


def run_pipeline(pipe, **kwargs):
    """One pipeline call (output_type="np"): the frames as f32 [F,H,W,3] and the final latents."""
    final = {}

    def on_step(p, i, t, kw):
        final["latents"] = kw["latents"].detach().clone()
        return {}

    with torch.no_grad():
        out = pipe(
            output_type="np",
            max_sequence_length=512,
            callback_on_step_end=on_step,
            callback_on_step_end_tensor_inputs=["latents"],
            **kwargs,
        )
    return torch.from_numpy(np.asarray(out.frames[0], dtype=np.float32)), final["latents"]


def build_and_record(out_dir, cfg, seed):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    model_dir = os.path.join(out_dir, "model")
    gold = os.path.join(out_dir, "golden")
    os.makedirs(gold)

    # --- components -------------------------------------------------------------------------------
    tokenizer = build_tokenizer(model_dir, cfg["tok_vocab"])
    text_encoder = make_text_encoder(tokenizer, cfg)
    image_encoder, image_processor = make_image_encoder(cfg)
    clip_tokens = (cfg["c_image"] // cfg["c_patch"]) ** 2 + 1
    transformer = make_transformer(cfg, cfg["c_dim"], 2 * clip_tokens if cfg["flf2v"] else None)
    vae = make_vae(cfg)
    scheduler = make_scheduler(cfg["shift"])

    pipe = WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=scheduler,
        image_processor=image_processor,
        image_encoder=image_encoder,
        transformer=transformer,
    )
    pipe.save_pretrained(model_dir, safe_serialization=True)
    del pipe
    # Without torchvision transformers saves the PIL fallback's class name; the released folders (and
    # this folder's preprocessor_config.json) name CLIPImageProcessor, which loads the same PIL backend here.
    index_path = os.path.join(model_dir, "model_index.json")
    with open(index_path) as f:
        index = json.load(f)
    index["image_processor"] = ["transformers", "CLIPImageProcessor"]
    with open(index_path, "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")
    # Everything below uses the SAVED folder, exactly what the Rust side loads.
    pipe = WanImageToVideoPipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    H, W, F = cfg["height"], cfg["width"], cfg["frames"]
    prompt = cfg["prompt"]
    negative = cfg["negative"]
    meta = {
        "config": cfg,
        "prompt": prompt,
        "negative_prompt": negative,
        "height": H,
        "width": W,
        "frames": F,
        "steps": cfg["steps"],
        "guidance": cfg["guidance"],
        "flow_shift": cfg["shift"],
        "max_sequence_length": 512,
        "flf2v": cfg["flf2v"],
        "clip_tokens": clip_tokens,
        "seed": seed,
        "versions": {
            "torch": torch.__version__,
            "diffusers": __import__("diffusers").__version__,
            "transformers": __import__("transformers").__version__,
        },
    }

    # --- text ---------------------------------------------------------------------------------------
    with torch.no_grad():
        text = {}
        for key, p in (("prompt", prompt), ("negative", negative), ("long", " ".join(CORPUS * 8))):
            enc = pipe.tokenizer(
                [p], padding="max_length", max_length=512, truncation=True, add_special_tokens=True,
                return_attention_mask=True, return_tensors="pt",
            )
            text[f"{key}_ids"] = enc.input_ids.contiguous()
            text[f"{key}_mask"] = enc.attention_mask.contiguous()
            text[f"{key}_hidden"] = pipe.text_encoder(enc.input_ids, enc.attention_mask).last_hidden_state.contiguous()
        pe, ne = pipe.encode_prompt(prompt, negative, do_classifier_free_guidance=True, max_sequence_length=512)
        text["prompt_embeds"] = pe.contiguous()
        text["negative_embeds"] = ne.contiguous()
        le, _ = pipe.encode_prompt(" ".join(CORPUS * 8), None, do_classifier_free_guidance=False, max_sequence_length=512)
        text["long_embeds"] = le.contiguous()
        # Unpadded encoding of the prompt (ids without padding, mask all ones), for a mask-free check.
        n = int(text["prompt_mask"].sum())
        ids = text["prompt_ids"][:, :n]
        text["short_ids"] = ids.contiguous()
        text["short_hidden"] = pipe.text_encoder(ids, torch.ones_like(ids)).last_hidden_state.contiguous()
    meta["long_prompt"] = " ".join(CORPUS * 8)
    save_file(text, os.path.join(gold, "text.safetensors"))

    # --- images -------------------------------------------------------------------------------------
    first = make_image(os.path.join(gold, "first.png"), W, H, rng)
    last = make_image(os.path.join(gold, "last.png"), W, H, rng) if cfg["flf2v"] else None
    clip_a = make_image(os.path.join(gold, "clip_a.png"), cfg["c_image"] + 25, cfg["c_image"] + 9, rng)
    clip_b = make_image(os.path.join(gold, "clip_b.png"), cfg["c_image"] + 8, 2 * cfg["c_image"] + 6, rng)

    with torch.no_grad():
        clip = {}
        for key, imgs in (("one", [first]), ("two", [first, last if last is not None else clip_a]), ("odd", [clip_a, clip_b])):
            pv = pipe.image_processor(images=imgs, return_tensors="pt").pixel_values
            clip[f"{key}_pixels"] = pv.contiguous()
            out = pipe.image_encoder(pixel_values=pv, output_hidden_states=True)
            clip[f"{key}_hidden"] = out.hidden_states[-2].contiguous()
        clip["one_pipeline"] = pipe.encode_image(first, torch.device("cpu")).contiguous()
    meta["clip_two_second"] = "last.png" if last is not None else "clip_a.png"
    save_file(clip, os.path.join(gold, "clip.safetensors"))

    # --- Pillow resampling (CLIP's bicubic; the pipeline's VideoProcessor uses lanczos) ---------------
    resize = {}
    bw, bh = clip_b.size
    # (Pillow 13 runs the vertical pass first for the 1st and last sizes, horizontal first otherwise.)
    sizes = [(bw // 2, bh // 3), (2 * bw - 3, bh + 5), (bw, bh // 2), (bw + 7, bh), (3, 2 * bh + 1), (bw - 2, bh // 4)]
    filters = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS, "box": Image.BOX,
               "hamming": Image.HAMMING}
    for fname, f in filters.items():
        for w, h in sizes:
            resize[f"{fname}_{w}x{h}"] = torch.from_numpy(np.asarray(clip_b.resize((w, h), f), dtype=np.uint8).copy())
    meta["resize_source"] = "clip_b.png"
    meta["resize_sizes"] = sizes
    meta["resize_filters"] = {k: int(v) for k, v in filters.items()}
    save_file(resize, os.path.join(gold, "resize.safetensors"))

    # --- scheduler ----------------------------------------------------------------------------------
    sched = {}
    pairs = [(cfg["steps"], cfg["shift"]), (1, 5.0), (2, 3.0), (7, 16.0), (10, 3.0), (40, 16.0), (50, 5.0)]
    meta["scheduler_pairs"] = pairs
    for steps, shift in pairs:
        s = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=shift)
        s.set_timesteps(steps)
        sched[f"sigmas_{steps}_{shift}"] = s.sigmas.to(torch.float32).contiguous()
        sched[f"timesteps_{steps}_{shift}"] = s.timesteps.to(torch.int64).contiguous()
    # step() chains with random model outputs: the released config (order 2, bh2) and variants
    # that exercise the general-order solve, bh1, sigma_min and disable_corrector (lower_order_final=False
    # is degenerate at the last step in diffusers itself: a singular solve or NaN).
    chains = [
        [6, 5.0, {}],
        [3, 16.0, {}],
        [8, 5.0, {"solver_order": 3}],
        [5, 3.0, {"solver_type": "bh1", "final_sigmas_type": "sigma_min", "disable_corrector": [1]}],
        [4, 7.0, {"solver_order": 3, "final_sigmas_type": "sigma_min"}],
    ]
    for j, (steps, shift, overrides) in enumerate(chains):
        s = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=shift, **overrides)
        s.set_timesteps(steps)
        g = torch.Generator().manual_seed(seed + 10 * j + steps)
        x = torch.randn(1, 16, 2, 4, 6, generator=g)
        sched[f"chain{j}_sample"] = x.clone()
        sched[f"chain{j}_timesteps"] = s.timesteps.to(torch.int64).clone()
        for i, t in enumerate(s.timesteps):
            mo = torch.randn(x.shape, generator=g) * 0.5 + 0.3 * x
            sched[f"chain{j}_model_output_{i}"] = mo.clone()
            x = s.step(mo, t, x, return_dict=False)[0]
            sched[f"chain{j}_out_{i}"] = x.clone()
    meta["scheduler_chains"] = chains
    save_file(sched, os.path.join(gold, "scheduler.safetensors"))

    # --- VAE ----------------------------------------------------------------------------------------
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        video = torch.rand(1, 3, F, H, W, generator=g) * 2 - 1
        mean = pipe.vae.encode(video).latent_dist.mode()
        z = torch.randn(1, 16, (F - 1) // 4 + 1, H // 8, W // 8, generator=g)
        dec = pipe.vae.decode(z, return_dict=False)[0]
        save_file(
            {"video": video.contiguous(), "latent_mean": mean.contiguous(), "z": z.contiguous(), "decoded": dec.contiguous()},
            os.path.join(gold, "vae.safetensors"),
        )

    # --- end to end (+ the first transformer call) ------------------------------------------------
    captured = {}

    def pre_hook(module, args, kwargs):
        if "hidden_states" not in captured:
            captured["hidden_states"] = kwargs["hidden_states"].detach().clone()
            captured["timestep"] = kwargs["timestep"].detach().clone()
            captured["encoder_hidden_states"] = kwargs["encoder_hidden_states"].detach().clone()
            captured["encoder_hidden_states_image"] = kwargs["encoder_hidden_states_image"].detach().clone()

    def post_hook(module, args, kwargs, output):
        if "output" not in captured:
            captured["output"] = output[0].detach().clone()

    h1 = pipe.transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    h2 = pipe.transformer.register_forward_hook(post_hook, with_kwargs=True)
    g = torch.Generator().manual_seed(seed + 2)
    latents = torch.randn(1, 16, (F - 1) // 4 + 1, H // 8, W // 8, generator=g)
    save_file({"latents": latents.contiguous()}, os.path.join(gold, "latents.safetensors"))
    frames, final_latents = run_pipeline(
        pipe,
        image=first,
        last_image=last,
        prompt=prompt,
        negative_prompt=negative,
        height=H,
        width=W,
        num_frames=F,
        num_inference_steps=cfg["steps"],
        guidance_scale=cfg["guidance"],
        latents=latents.clone(),
    )
    h1.remove()
    h2.remove()
    assert frames.shape == (F, H, W, 3), frames.shape
    save_file({"frames": frames.contiguous()}, os.path.join(gold, "frames.safetensors"))
    captured["timestep"] = captured["timestep"].to(torch.float32)
    save_file({k: v.contiguous() for k, v in captured.items()}, os.path.join(gold, "dit.safetensors"))
    save_file(
        {
            "prompt_embeds": text["prompt_embeds"],
            "negative_prompt_embeds": text["negative_embeds"],
            "image_embeds": captured["encoder_hidden_states_image"].contiguous(),
            "final_latents": final_latents.contiguous(),
        },
        os.path.join(gold, "e2e.safetensors"),
    )
    meta["e2e_first"] = "first.png"
    meta["e2e_last"] = "last.png" if last is not None else None
    with open(os.path.join(gold, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"{out_dir}: frames {tuple(frames.shape)} range [{frames.min():.3f}, {frames.max():.3f}]")


# --- step-distilled setups: LoRAs in both file formats, flow-matching Euler, guidance 1 -------------

EULER_PAIRS = [(4, 5.0), (1, 5.0), (2, 3.0), (8, 3.0), (6, 7.5), (3, 3.7), (4, 1.0), (40, 5.0)]


def record_euler(gold, seed):
    """FlowMatchEulerDiscreteScheduler: sigmas/timesteps per (steps, shift) and one step() chain."""
    sched = {}
    for steps, shift in EULER_PAIRS:
        s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        s.set_timesteps(steps)
        sched[f"sigmas_{steps}_{shift}"] = s.sigmas.to(torch.float32).clone()
        sched[f"timesteps_{steps}_{shift}"] = s.timesteps.to(torch.float32).clone()
    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)
    s.set_timesteps(4)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 2, 4, 6, generator=g)
    sched["chain_sample"] = x.clone()
    for i, t in enumerate(s.timesteps):
        mo = torch.randn(x.shape, generator=g) * 0.5 + 0.3 * x
        sched[f"chain_model_output_{i}"] = mo.clone()
        x = s.step(mo, t, x, return_dict=False)[0]
        sched[f"chain_out_{i}"] = x.clone()
    save_file(sched, os.path.join(gold, "euler.safetensors"))
    return {"pairs": EULER_PAIRS, "chain": [4, 5.0]}


def write_diffusers_lora(transformer, path, seed):
    """A LoRA as diffusers' training scripts save it: a PEFT adapter on the transformer (rank 4,
    alpha 8, rank 2 for `net.2`, alpha 3 for `proj_out`, lora_B biases), written by
    `save_lora_weights` with its adapter config as metadata (keys `transformer.<module>.lora_A/B`)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj", "net.0.proj", "net.2",
                        "time_proj", "proj_out"],
        rank_pattern={"net.2": 2},
        alpha_pattern={"proj_out": 3},
        lora_bias=True,
    )
    transformer.add_adapter(config, adapter_name="trained")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if ".lora_" in name:
                std = 0.05 if p.dim() == 1 else 0.5 * p.shape[-1] ** -0.5
                p.copy_(torch.randn(p.shape, generator=g) * std)
    state = get_peft_model_state_dict(transformer, adapter_name="trained")
    metadata = transformer.peft_config["trained"].to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])  # a set: its order varies by run
    WanImageToVideoPipeline.save_lora_weights(
        os.path.dirname(path),
        transformer_lora_layers=state,
        transformer_lora_adapter_metadata=metadata,
        weight_name=os.path.basename(path),
    )
    transformer.delete_adapters("trained")
    sort_safetensors_metadata(path)


def sort_safetensors_metadata(path):
    """Rewrites the header of the safetensors file `path` with its `__metadata__` entries sorted:
    the safetensors library writes that map in a different order on every run."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = f.read()
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + data)


def write_original_lora(transformer, path, seed, rank=4):
    """A LoRA in the original Wan / ComfyUI layout (`diffusion_model.` + the original module names,
    `lora_down`/`lora_up`/`alpha`, full `diff_b` biases and a `diff` weight), bf16 like the released
    LightX2V files, plus keys diffusers drops (norm diffs) or leaves unused (a modulation diff)."""
    shapes = {k: tuple(v.shape) for k, v in transformer.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    alphas = [2.0, 4.0, 8.0]  # alpha / rank a power of two: diffusers folds it into bf16 weights exactly

    def randn(*shape, std):
        return torch.randn(shape, generator=g) * std

    def low_rank(original, module, bias=False):
        out, inn = shapes[f"{module}.weight"]
        key = f"diffusion_model.{original}"
        sd[f"{key}.lora_down.weight"] = randn(rank, inn, std=0.5 * inn**-0.5)
        sd[f"{key}.lora_up.weight"] = randn(out, rank, std=0.5 * rank**-0.5)
        # diffusers reads `alpha` in the blocks only (elsewhere it refuses the file)
        if original.startswith("blocks."):
            sd[f"{key}.alpha"] = torch.tensor(alphas[len(sd) % 3])
        if bias:
            sd[f"{key}.diff_b"] = randn(out, std=0.05)

    blocks = sorted({int(k.split(".")[1]) for k in shapes if k.startswith("blocks.")})
    image_branch = any("add_k_proj" in k for k in shapes)
    for i in blocks:
        for o, c in zip(["q", "k", "v", "o"], ["to_q", "to_k", "to_v", "to_out.0"]):
            low_rank(f"blocks.{i}.self_attn.{o}", f"blocks.{i}.attn1.{c}", bias=o == "q")
            low_rank(f"blocks.{i}.cross_attn.{o}", f"blocks.{i}.attn2.{c}", bias=o == "o")
        if image_branch:
            low_rank(f"blocks.{i}.cross_attn.k_img", f"blocks.{i}.attn2.add_k_proj")
            low_rank(f"blocks.{i}.cross_attn.v_img", f"blocks.{i}.attn2.add_v_proj", bias=True)
        low_rank(f"blocks.{i}.ffn.0", f"blocks.{i}.ffn.net.0.proj", bias=True)
        low_rank(f"blocks.{i}.ffn.2", f"blocks.{i}.ffn.net.2")
        dim = shapes[f"blocks.{i}.norm2.weight"][0]
        sd[f"diffusion_model.blocks.{i}.norm3.diff"] = randn(dim, std=0.1)
        sd[f"diffusion_model.blocks.{i}.cross_attn.norm_q.diff"] = randn(dim, std=0.1)
        sd[f"diffusion_model.blocks.{i}.modulation.diff"] = randn(1, 6, dim, std=0.1)
    low_rank("time_projection.1", "condition_embedder.time_proj", bias=True)
    low_rank("text_embedding.0", "condition_embedder.text_embedder.linear_1")
    low_rank("text_embedding.2", "condition_embedder.text_embedder.linear_2", bias=True)
    low_rank("time_embedding.0", "condition_embedder.time_embedder.linear_1")
    if image_branch:
        low_rank("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj")
        low_rank("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2", bias=True)
    out, dim = shapes["proj_out.weight"]
    sd["diffusion_model.head.head.diff"] = randn(out, dim, std=0.02)
    sd["diffusion_model.head.head.diff_b"] = randn(out, std=0.02)
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, path)


def fused_weights(pipe_dir, loras):
    """The transformer's weights after diffusers merges `loras` [(path, adapter, scale, into_2)]
    (load_lora_weights, set_adapters, fuse_lora, unload_lora_weights): the tensors a merge changed,
    per transformer component."""
    pipe = WanImageToVideoPipeline.from_pretrained(pipe_dir, torch_dtype=torch.float32)
    components = ["transformer"] + (["transformer_2"] if pipe.transformer_2 is not None else [])
    base = {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in components}
    load_loras(pipe, loras)
    pipe.fuse_lora(components=components)
    pipe.unload_lora_weights()
    changed = {}
    for c in components:
        for k, v in getattr(pipe, c).state_dict().items():
            if not torch.equal(v, base[c][k]):
                changed[f"{c}.{k}"] = v.clone()
    return changed


def load_loras(pipe, loras):
    """Loads [(path, adapter, scale, into_transformer_2)] into the pipeline, active at their scales."""
    for path, adapter, _, into_2 in loras:
        # low_cpu_mem_usage=False: modules without a `diff_b` get a zero lora_B bias, not a meta tensor
        pipe.load_lora_weights(path, adapter_name=adapter, load_into_transformer_2=into_2, low_cpu_mem_usage=False)
    for component in ["transformer", "transformer_2"]:
        mine = [(a, s) for _, a, s, into_2 in loras if into_2 == (component == "transformer_2")]
        if mine:
            getattr(pipe, component).set_adapters([a for a, _ in mine], weights=[s for _, s in mine])


def record_run(model_dir, gold, name, sampler, shift, loras, **call):
    """One run of the saved pipeline with `loras` active and the `sampler` ("unipc": the folder's,
    "euler": FlowMatchEulerDiscreteScheduler with `shift`): frames and final latents go to
    golden/run_<name>.safetensors. Returns the transformer component of each transformer call."""
    pipe = WanImageToVideoPipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if sampler == "euler":
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    load_loras(pipe, loras)
    calls = []
    hooks = [
        getattr(pipe, c).register_forward_pre_hook(lambda m, a, k, c=c: calls.append(c), with_kwargs=True)
        for c in ["transformer", "transformer_2"]
        if getattr(pipe, c, None) is not None
    ]
    frames, final_latents = run_pipeline(pipe, **call)
    for h in hooks:
        h.remove()
    save_file({"frames": frames, "final_latents": final_latents}, os.path.join(gold, f"run_{name}.safetensors"))
    print(f"{gold} {name}: frames {tuple(frames.shape)} range [{frames.min():.3f}, {frames.max():.3f}], {calls}")
    return calls


def build_distill(data, seed):
    """tiny-distill: two LoRAs for the tiny-i2v transformer (diffusers and original Wan layout),
    diffusers' merged weights for each, and two end-to-end runs of the tiny-i2v pipeline with them:
    the original LoRA with Euler at 4 steps and guidance 1 (a step-distilled run), and both LoRAs
    stacked with UniPC and classifier-free guidance. Plus Euler scheduler goldens."""
    base = os.path.join(data, "tiny-i2v")
    out_dir = os.path.join(data, "tiny-distill")
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    lora_dir = os.path.join(out_dir, "lora")
    gold = os.path.join(out_dir, "golden")
    os.makedirs(lora_dir)
    os.makedirs(gold)
    model_dir = os.path.join(base, "model")
    with open(os.path.join(base, "golden", "meta.json")) as f:
        base_meta = json.load(f)
    diffusers_lora = os.path.join(lora_dir, "diffusers.safetensors")
    original_lora = os.path.join(lora_dir, "original.safetensors")
    pipe = WanImageToVideoPipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    write_original_lora(pipe.transformer, original_lora, seed + 1)
    write_diffusers_lora(pipe.transformer, diffusers_lora, seed)  # leaves PEFT wrappers: last
    del pipe

    meta = {"model": "../tiny-i2v/model", "euler": record_euler(gold, seed + 2), "merged": {}, "runs": {}}
    for name, loras in {
        "diffusers": [(diffusers_lora, "d", 0.8, False)],
        "original": [(original_lora, "o", 1.0, False)],
    }.items():
        save_file(fused_weights(model_dir, loras), os.path.join(gold, f"merged_{name}.safetensors"))
        meta["merged"][name] = [[os.path.basename(p), s] for p, _, s, _ in loras]

    latents = load_file(os.path.join(base, "golden", "latents.safetensors"))["latents"]
    first = Image.open(os.path.join(base, "golden", "first.png")).convert("RGB")
    runs = {
        "euler_guidance1": dict(loras=[(original_lora, "o", 1.0, False)], sampler="euler", steps=4, shift=5.0,
                                guidance=1.0),
        "stacked_unipc": dict(loras=[(diffusers_lora, "d", 0.7, False), (original_lora, "o", 0.5, False)],
                              sampler="unipc", steps=base_meta["steps"], shift=base_meta["flow_shift"],
                              guidance=base_meta["guidance"]),
    }
    for name, run in runs.items():
        record_run(
            model_dir, gold, name, run["sampler"], run["shift"], run["loras"],
            image=first,
            prompt=base_meta["prompt"],
            negative_prompt=base_meta["negative_prompt"],
            height=base_meta["height"],
            width=base_meta["width"],
            num_frames=base_meta["frames"],
            num_inference_steps=run["steps"],
            guidance_scale=run["guidance"],
            latents=latents.clone(),
        )
        meta["runs"][name] = dict(run, loras=[[os.path.basename(p), s] for p, _, s, _ in run["loras"]])
    meta["versions"] = versions()
    with open(os.path.join(gold, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


# --- Wan2.2 I2V-A14B: two experts switched at a boundary, no CLIP ------------------------------------


def build_wan22(out_dir, cfg, seed):
    """tiny-wan22: a WanImageToVideoPipeline with `transformer` (high noise), `transformer_2` (low
    noise) and `boundary_ratio`, no image encoder (the Wan2.2 I2V-A14B layout), and two end-to-end
    runs (first-last-frame): UniPC with a guidance per expert, and Euler at guidance 1 with an
    original-layout LoRA merged into the low-noise expert only. Which expert ran each transformer
    call is recorded."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    model_dir = os.path.join(out_dir, "model")
    gold = os.path.join(out_dir, "golden")
    lora_dir = os.path.join(out_dir, "lora")
    os.makedirs(gold)
    os.makedirs(lora_dir)
    tokenizer = build_tokenizer(model_dir, cfg["tok_vocab"])
    pipe = WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=make_text_encoder(tokenizer, cfg),
        vae=make_vae(cfg),
        scheduler=make_scheduler(cfg["shift"]),
        image_processor=None,
        image_encoder=None,
        transformer=make_transformer(cfg),
        transformer_2=make_transformer(cfg),
        boundary_ratio=cfg["boundary_ratio"],
    )
    pipe.save_pretrained(model_dir, safe_serialization=True)
    lora = os.path.join(lora_dir, "low_noise.safetensors")
    write_original_lora(pipe.transformer_2, lora, seed + 1)
    del pipe

    H, W, F = cfg["height"], cfg["width"], cfg["frames"]
    first = make_image(os.path.join(gold, "first.png"), W, H, rng)
    last = make_image(os.path.join(gold, "last.png"), W, H, rng)
    g = torch.Generator().manual_seed(seed + 2)
    latents = torch.randn(1, 16, (F - 1) // 4 + 1, H // 8, W // 8, generator=g)
    save_file({"latents": latents}, os.path.join(gold, "latents.safetensors"))
    meta = {"config": cfg, "prompt": cfg["prompt"], "negative_prompt": cfg["negative"], "height": H, "width": W,
            "frames": F, "runs": {}}
    runs = {
        "unipc_cfg": dict(sampler="unipc", steps=cfg["steps"], shift=cfg["shift"], guidance=cfg["guidance"],
                          guidance_2=cfg["guidance_2"], loras_2=[]),
        "euler_lora_low": dict(sampler="euler", steps=4, shift=5.0, guidance=1.0, guidance_2=None,
                               loras_2=[[os.path.basename(lora), 1.0]]),
    }
    for name, run in runs.items():
        calls = record_run(
            model_dir, gold, name, run["sampler"], run["shift"], [(lora, "low", s, True) for _, s in run["loras_2"]],
            image=first,
            last_image=last,
            prompt=cfg["prompt"],
            negative_prompt=cfg["negative"],
            height=H,
            width=W,
            num_frames=F,
            num_inference_steps=run["steps"],
            guidance_scale=run["guidance"],
            guidance_scale_2=run["guidance_2"],
            latents=latents.clone(),
        )
        meta["runs"][name] = dict(run, transformer_calls=calls)
    save_file(fused_weights(model_dir, [(lora, "low", 1.0, True)]), os.path.join(gold, "merged_low.safetensors"))
    meta["versions"] = versions()
    with open(os.path.join(gold, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


def versions():
    import peft

    return {
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "transformers": __import__("transformers").__version__,
        "peft": peft.__version__,
    }


BASE = {
    "tok_vocab": 60,
    "vocab_pad": 20,
    "t_dim": 32,
    "t_dkv": 8,
    "t_ff": 48,
    "t_layers": 2,
    "t_heads": 4,
    "t_buckets": 32,
    "t_maxdist": 128,
    "c_dim": 32,
    "c_ff": 64,
    "c_layers": 3,
    "c_heads": 2,
    "c_image": 32,
    "c_patch": 8,
    "c_act": "gelu",
    "heads": 2,
    "head_dim": 16,
    "ffn": 64,
    "layers": 2,
    "freq_dim": 32,
    "v_base": 8,
    "v_res": 1,
    "prompt": "A red fox  runs through snow at dawn &amp; the camera pans",
    "negative": "bright tones, overexposed, static, blurred details",
}

COMMITTED = {
    "tiny-flf2v": dict(BASE, flf2v=True, height=32, width=48, frames=9, steps=4, guidance=5.0, shift=16.0),
    "tiny-i2v": dict(
        BASE, flf2v=False, height=48, width=32, frames=5, steps=3, guidance=3.5, shift=3.0, c_act="quick_gelu",
        t_buckets=16, t_maxdist=32, t_dkv=12, v_base=4, c_layers=2,
    ),
}


# Wan2.2 I2V-A14B-shaped: two experts (no image branch), boundary 0.9; UniPC at shift 5 puts two of
# four steps on each side of it.
WAN22 = dict(
    BASE, height=32, width=48, frames=5, steps=4, guidance=3.5, guidance_2=2.0, shift=5.0, boundary_ratio=0.9,
    t_buckets=16, t_maxdist=32, t_dkv=12, v_base=4,
)


def held_back(seed):
    r = random.Random(seed)
    out = {}
    for name, flf2v in (("held-flf2v", True), ("held-i2v", False)):
        heads = r.choice([3, 4, 5])
        head_dim = r.choice([12, 18, 24])
        t_heads = r.choice([3, 6])
        c_heads = r.choice([3, 4])
        c_patch = r.choice([4, 6, 7])
        cfg = dict(
            BASE,
            flf2v=flf2v,
            tok_vocab=r.choice([20, 40]),
            t_dim=t_heads * r.choice([6, 8]),
            t_dkv=r.choice([6, 10]),
            t_ff=r.choice([40, 56]),
            t_layers=r.choice([1, 3]),
            t_heads=t_heads,
            t_buckets=r.choice([8, 16, 32]),
            t_maxdist=r.choice([20, 64, 128]),
            c_dim=c_heads * r.choice([8, 10]),
            c_ff=r.choice([48, 80]),
            c_layers=r.choice([2, 4]),
            c_heads=c_heads,
            c_image=c_patch * r.choice([3, 4]),
            c_patch=c_patch,
            c_act=r.choice(["gelu", "quick_gelu"]),
            heads=heads,
            head_dim=head_dim,
            ffn=r.choice([48, 96]),
            layers=r.choice([1, 3]),
            freq_dim=r.choice([16, 64]),
            v_base=r.choice([4, 12]),
            v_res=r.choice([1, 2]),
            height=16 * r.choice([2, 3, 4]),
            width=16 * r.choice([2, 3, 4]),
            frames=4 * r.choice([1, 2, 3]) + 1,
            steps=r.choice([2, 3, 5]),
            guidance=r.choice([2.0, 4.5, 6.0]),
            shift=r.choice([3.0, 5.0, 16.0]),
            prompt=r.choice(CORPUS),
            negative=r.choice(CORPUS[3:5]),
        )
        out[f"{name}-{seed}"] = cfg
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--held-back", metavar="OUT_DIR", help="write pipelines with other sizes to OUT_DIR")
    ap.add_argument("--seed", type=int, default=0, help="seed of the held-back sizes and weights")
    ap.add_argument("--only", help="build only this committed configuration")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.held_back:
        for name, cfg in held_back(args.seed).items():
            build_and_record(os.path.join(args.held_back, name), cfg, 1000 + args.seed)
        return
    here = os.path.dirname(os.path.abspath(__file__))
    data = os.path.normpath(os.path.join(here, "..", "tests", "data"))
    for i, (name, cfg) in enumerate(COMMITTED.items()):
        if args.only and name != args.only:
            continue
        build_and_record(os.path.join(data, name), cfg, 42 + i)
    if args.only in (None, "tiny-distill"):
        build_distill(data, 44)  # needs tiny-i2v
    if args.only in (None, "tiny-wan22"):
        build_wan22(os.path.join(data, "tiny-wan22"), WAN22, 45)


if __name__ == "__main__":
    sys.exit(main())
