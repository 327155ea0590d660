#!/usr/bin/env python3
"""Tiny random-weight Qwen2.5-VL checkpoints and transformers goldens.

Run by hand with the kubewan venv (torch + transformers 5.x):

    ~/.cache/kubewan/venv/bin/python models/qwen2_5_vl/scripts/make_tiny.py            # committed set
    ~/.cache/kubewan/venv/bin/python models/qwen2_5_vl/scripts/make_tiny.py \
        --held-back /tmp/qwen-heldback --seed 777                                      # held-back set
    ~/.cache/kubewan/venv/bin/python models/qwen2_5_vl/scripts/make_tiny.py \
        --held-back /tmp/qwen-random --random 6 --seed 31                              # 6 random architectures

then check them with
    KUBEWAN_QWEN_GOLDENS=/tmp/qwen-heldback cargo test -p kubewan-qwen2-5-vl --test parity held_back -- --nocapture
    python3 models/qwen2_5_vl/scripts/check_held_back.py /tmp/qwen-heldback          # through `kubewan-runner vlm generate`

Each checkpoint folder is written in one of two on-disk layouts:
  * "released": the Qwen/Qwen2.5-VL-*-Instruct layout: flat config.json (text
    fields at top level, `rope_scaling: {type: mrope, ...}`, `vision_config`
    with `in_chans`), sharded `model-0000x-of-0000y.safetensors` +
    `model.safetensors.index.json`, key names `model.layers.*`,
    `model.embed_tokens`, `visual.*`, `lm_head` (absent when tied, as in 3B),
    `preprocessor_config.json` with min_pixels/max_pixels, `chat_template.json`.
  * "v5": what transformers 5 writes (nested `text_config`/`vision_config`
    with `rope_parameters`, a `size` dict in preprocessor_config.json,
    `chat_template.jinja`), with the newer key names
    `model.language_model.*` / `model.visual.*`, single or sharded file.

Goldens (goldens.json next to the folders) are computed by loading every folder
back from disk with `Qwen2_5_VLForConditionalGeneration.from_pretrained` in
float32 (eager attention) and running the processor + greedy `generate`.

Image preprocessing: we use transformers' PIL backend
(`Qwen2VLImageProcessorPil`): uint8 PIL bicubic resize (Pillow's fixed-point
resampler), then rescale 1/255 and normalise in float. The Rust processor
reproduces Pillow's resampler bit for bit. (The torchvision backend resizes in
float with a different antialias kernel and rounding and can differ by 1/255
on some pixels.)
"""

import argparse
import json
import math
import os
import shutil
import sys

import numpy as np
import torch
from PIL import Image

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers, normalizers

CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2.5's special tokens, in the released order (ids follow the BPE vocab).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
NON_SPECIAL_ADDED = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                     "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]

QWEN_PRETOKENIZE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CORPUS = """You are a helpful assistant. You are a video direction assistant.
Describe the motion between the left image (the start) and the right image (the end) in one cinematic
sentence, then add details about the scene, the light, the colours and the camera.
The camera slowly pans across a misty mountain lake at dawn while birds fly over the water.
A woman walks through a busy market street; the camera follows her, then rises above the crowd.
The sun sets behind the city skyline and the lights of the buildings turn on one by one.
Waves crash on the rocks, the camera pushes in, and the spray catches the golden light.
A cat jumps from the table to the window and looks at the rain falling on the garden.
Describe this image. What is in the picture? How many people are there? Which colour is the car?
The duration is 5.0 seconds. Keep it short: one sentence for the motion, then the details.
Numbers 0 1 2 3 4 5 6 7 8 9 10 16 24 81 2025; punctuation: , . ; : ! ? ( ) [ ] " ' - _ / \\ @ # % & *
Über café naïve façade — “quotes” ‘single’ … 日本語 中文 한국어 emoji 🙂🚀
""" * 3


def build_tokenizer(vocab_size):
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False, fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.add_tokens(NON_SPECIAL_ADDED)
    return tok


def write_tokenizer(folder, tok):
    tok.save(os.path.join(folder, "tokenizer.json"))
    added = {}
    for name in SPECIAL_TOKENS + NON_SPECIAL_ADDED:
        added[str(tok.token_to_id(name))] = {
            "content": name, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": name in SPECIAL_TOKENS,
        }
    cfg = {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)


def randomize(model, seed, head_scale):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lm_head.weight") and model.config.tie_word_embeddings:
                continue
            if p.ndim == 1 and ("norm" in name or "ln_q" in name):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                # a tied head reads logits off the embedding: keep it small against the
                # layers' contribution, or the model just repeats its last input token
                std = 0.15 if model.config.tie_word_embeddings else 1.0
                p.copy_(std * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                scale = head_scale if name.endswith("lm_head.weight") else 1.0
                if model.config.tie_word_embeddings and ("down_proj" in name or "o_proj" in name):
                    scale = 2.0
                p.copy_(scale * torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    if model.config.tie_word_embeddings:
        model.tie_weights()


def released_key(k):
    # transformers 5 state dict names -> released names
    if k.startswith("model.language_model."):
        return "model." + k[len("model.language_model."):]
    if k.startswith("model.visual."):
        return "visual." + k[len("model.visual."):]
    return k


def save_weights(folder, tensors, shards, prefix="model"):
    from safetensors.torch import save_file
    keys = sorted(tensors)
    if shards <= 1:
        save_file({k: tensors[k].contiguous() for k in keys}, os.path.join(folder, f"{prefix}.safetensors"),
                  metadata={"format": "pt"})
        return
    per = math.ceil(len(keys) / shards)
    weight_map = {}
    total = 0
    for i in range(shards):
        part = keys[i * per:(i + 1) * per]
        name = f"{prefix}-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in part}, os.path.join(folder, name), metadata={"format": "pt"})
        for k in part:
            weight_map[k] = name
            total += tensors[k].numel() * tensors[k].element_size()
    with open(os.path.join(folder, f"{prefix}.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def released_config(cfg, spec):
    t = cfg.text_config
    v = cfg.vision_config
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": spec["ids"]["<|endoftext|>"],
        "eos_token_id": spec["ids"]["<|im_end|>"],
        "vision_start_token_id": spec["ids"]["<|vision_start|>"],
        "vision_end_token_id": spec["ids"]["<|vision_end|>"],
        "vision_token_id": spec["ids"]["<|vision_pad|>"],
        "image_token_id": spec["ids"]["<|image_pad|>"],
        "video_token_id": spec["ids"]["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": t.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": t.intermediate_size,
        "max_position_embeddings": 128000,
        "max_window_layers": t.num_hidden_layers,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": t.num_attention_heads,
        "num_hidden_layers": t.num_hidden_layers,
        "num_key_value_heads": t.num_key_value_heads,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_parameters["rope_theta"],
        "sliding_window": 32768,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": "float32",
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": v.depth,
            "hidden_act": "silu",
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads,
            "in_chans": 3,
            "out_hidden_size": v.out_hidden_size,
            "patch_size": v.patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "spatial_patch_size": v.patch_size,
            "window_size": v.window_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes),
            "tokens_per_second": 2,
            "temporal_patch_size": v.temporal_patch_size,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": list(t.rope_parameters["mrope_section"])},
        "vocab_size": t.vocab_size,
    }


def make_images(folder, rng, sizes):
    names = []
    for i, (w, h) in enumerate(sizes):
        # smooth colour field + noise, so resizing is exercised on real gradients
        low = rng.integers(0, 256, size=(max(2, h // 16), max(2, w // 16), 3)).astype(np.uint8)
        img = Image.fromarray(low).resize((w, h), Image.BILINEAR)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-30, 31, size=(h, w, 3))
        arr = np.clip(arr, 0, 255).astype(np.uint8)
        name = f"img{i}_{w}x{h}.png"
        Image.fromarray(arr, "RGB").save(os.path.join(folder, name))
        names.append(name)
    return names


def build_checkpoint(root, spec, tok, seed):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    folder = os.path.join(root, spec["name"])
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    spec["ids"] = ids
    vocab = tok.get_vocab_size(with_added_tokens=True)
    text = dict(vocab_size=vocab, hidden_size=spec["hidden"], intermediate_size=spec["inter"],
                num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                num_key_value_heads=spec["kv_heads"], rms_norm_eps=1e-6,
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                rope_parameters={"rope_type": "default", "mrope_section": spec["mrope_section"],
                                 "rope_theta": 1000000.0})
    vision = dict(depth=spec["v_depth"], hidden_size=spec["v_hidden"], intermediate_size=spec["v_inter"],
                  num_heads=spec["v_heads"], out_hidden_size=spec["hidden"], patch_size=spec["patch"],
                  spatial_merge_size=2, temporal_patch_size=2, window_size=spec["window"],
                  fullatt_block_indexes=spec["fullatt"], tokens_per_second=2)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=spec["tied"],
                           image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                           vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    randomize(model, seed, spec.get("head_scale", 3.0))
    sd = model.state_dict()
    eos_ids = [ids["<|im_end|>"], ids["<|endoftext|>"]]

    mean = [0.48145466, 0.4578275, 0.40821073]
    std = [0.26862954, 0.26130258, 0.27577711]
    factor = spec["patch"] * 2
    if spec["layout"] == "released":
        tensors = {released_key(k): v for k, v in sd.items()}
        if spec["tied"]:
            tensors.pop("lm_head.weight", None)
        save_weights(folder, tensors, spec.get("shards", 2))
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(released_config(cfg, spec), f, indent=2)
        pre = {"min_pixels": spec["min_pixels"], "max_pixels": spec["max_pixels"], "patch_size": spec["patch"],
               "temporal_patch_size": 2, "merge_size": 2, "image_mean": mean, "image_std": std,
               "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}
        with open(os.path.join(folder, "chat_template.json"), "w") as f:
            json.dump({"chat_template": CHAT_TEMPLATE}, f, indent=2)
    else:
        tensors = {k: v for k, v in sd.items()}
        if spec["tied"]:
            tensors.pop("lm_head.weight", None)
        save_weights(folder, tensors, spec.get("shards", 1))
        cfg.save_pretrained(folder)
        pre = {"size": {"shortest_edge": spec["min_pixels"], "longest_edge": spec["max_pixels"]},
               "patch_size": spec["patch"], "temporal_patch_size": 2, "merge_size": 2,
               "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
               "do_convert_rgb": True, "resample": 3, "image_mean": mean, "image_std": std,
               "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}
        with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
            f.write(CHAT_TEMPLATE)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump(pre, f, indent=2)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": ids["<|endoftext|>"], "eos_token_id": eos_ids,
                   "pad_token_id": ids["<|endoftext|>"], "transformers_version": "4.49.0"}, f, indent=2)
    write_tokenizer(folder, tok)
    return folder


def run_golden(folder, spec, image_dir, case, tok_lib):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    # check the loaded weights are the ones on disk (no silent re-init)
    ip = Qwen2VLImageProcessorPil.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if os.path.exists(os.path.join(folder, "chat_template.jinja")):
        template = open(os.path.join(folder, "chat_template.jinja")).read()
    else:
        template = json.load(open(os.path.join(folder, "chat_template.json")))["chat_template"]
    # The venv has no torchvision, so there is no video processor; skip the processor's
    # class check for that slot (images only) and keep its real __call__/template logic.
    from transformers.processing_utils import ProcessorMixin
    ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: None
    processor = Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tokenizer, chat_template=template)
    images = [Image.open(os.path.join(image_dir, n)).convert("RGB") for n in case["images"]]
    content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": case["prompt"]}]
    messages = []
    if case.get("system") is not None:
        messages.append({"role": "system", "content": case["system"]})
    messages.append({"role": "user", "content": content})
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=images if images else None, return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    # The Rust side tokenises with tokenizer.json through the `tokenizers` crate: make sure the
    # Python tokenizer class agrees with the raw tokenizer.json on this text.
    expanded = tokenizer.decode(ids, skip_special_tokens=False)
    assert tok_lib.encode(expanded, add_special_tokens=False).ids == ids, "tokenizer.json disagrees with transformers"
    gen = model.generate(**inputs, max_new_tokens=case["max_new_tokens"], do_sample=False, num_beams=1,
                         repetition_penalty=1.0, output_logits=True, return_dict_in_generate=True,
                         eos_token_id=[spec["ids"]["<|im_end|>"], spec["ids"]["<|endoftext|>"]],
                         pad_token_id=spec["ids"]["<|endoftext|>"], top_k=None, top_p=None, temperature=None)
    out = gen.sequences[0, len(ids):].tolist()
    first = gen.logits[0][0].float()
    top = torch.topk(first, 5)
    return {
        "images": case["images"],
        "system": case.get("system"),
        "prompt": case["prompt"],
        "max_new_tokens": case["max_new_tokens"],
        "prompt_token_ids": ids,
        "image_grid_thw": inputs["image_grid_thw"].tolist() if images else [],
        "token_ids": out,
        "text": tokenizer.decode(out, skip_special_tokens=True),
        "top_logits": [[int(i), float(v)] for v, i in zip(top.values.tolist(), top.indices.tolist())],
        "first_logits": first.tolist(),
    }


COMMITTED = [
    # released layout, untied head, GQA 4/2, window attention splitting images into several windows
    dict(name="tiny-released-untied-gqa", layout="released", shards=3, tied=False, hidden=48, inter=96, layers=2,
         heads=4, kv_heads=2, mrope_section=[2, 2, 2], v_depth=3, v_hidden=32, v_inter=48, v_heads=2, patch=14,
         window=56, fullatt=[2], min_pixels=56 * 56, max_pixels=28 * 28 * 40),
    # transformers-5 layout with the newer key names, tied head, GQA 4/1, other window size
    dict(name="tiny-v5-tied-gqa", layout="v5", shards=2, tied=True, hidden=32, inter=64, layers=2,
         heads=4, kv_heads=1, mrope_section=[2, 1, 1], v_depth=2, v_hidden=32, v_inter=40, v_heads=4, patch=14,
         window=84, fullatt=[0], min_pixels=56 * 56, max_pixels=28 * 28 * 30),
]

HELD_BACK = [
    dict(name="hb-released-tied-mha", layout="released", shards=2, tied=True, hidden=64, inter=80, layers=3,
         heads=2, kv_heads=2, mrope_section=[4, 6, 6], v_depth=4, v_hidden=48, v_inter=64, v_heads=3, patch=14,
         window=112, fullatt=[1, 3], min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64),
    dict(name="hb-v5-untied-gqa8", layout="v5", shards=1, tied=False, hidden=64, inter=128, layers=2,
         heads=8, kv_heads=2, mrope_section=[1, 1, 2], v_depth=3, v_hidden=24, v_inter=36, v_heads=2, patch=14,
         window=56, fullatt=[1], min_pixels=56 * 56, max_pixels=28 * 28 * 20),
    dict(name="hb-released-untied-p7", layout="released", shards=4, tied=False, hidden=40, inter=72, layers=3,
         heads=5, kv_heads=1, mrope_section=[1, 1, 2], v_depth=3, v_hidden=32, v_inter=48, v_heads=2, patch=7,
         window=56, fullatt=[0, 2], min_pixels=14 * 14 * 4, max_pixels=14 * 14 * 80),
]


def random_spec(rng, i):
    """A random tiny architecture (for --random N): sizes, heads, GQA, windows, patch, tie, layout."""
    while True:
        heads = int(rng.choice([1, 2, 3, 4, 5, 6, 8]))
        head_dim = int(rng.choice([8, 12, 16]))
        kv = int(rng.choice([d for d in range(1, heads + 1) if heads % d == 0]))
        half = head_dim // 2
        a = int(rng.integers(1, half - 1))
        b = int(rng.integers(1, half - a))
        mrope = [a, b, half - a - b]
        v_heads = int(rng.choice([1, 2, 3, 4]))
        v_hd = int(rng.choice([8, 12, 16]))
        patch = int(rng.choice([7, 14]))
        depth = int(rng.integers(1, 5))
        n_full = int(rng.integers(0, depth + 1))
        fullatt = sorted(int(x) for x in rng.choice(depth, size=n_full, replace=False))
        window = int(rng.choice([2, 3, 4, 5])) * 2 * patch
        lo = patch * 2
        spec = dict(name=f"rand{i}-{'tied' if i % 2 else 'untied'}", layout=str(rng.choice(["released", "v5"])),
                    shards=int(rng.integers(1, 4)), tied=bool(i % 2), hidden=heads * head_dim,
                    inter=int(rng.integers(16, 129)), layers=int(rng.integers(1, 4)), heads=heads, kv_heads=kv,
                    mrope_section=mrope, v_depth=depth, v_hidden=v_heads * v_hd, v_inter=int(rng.integers(16, 97)),
                    v_heads=v_heads, patch=patch, window=window, fullatt=fullatt,
                    min_pixels=lo * lo * int(rng.integers(1, 5)), max_pixels=lo * lo * int(rng.integers(20, 90)))
        if spec["min_pixels"] < spec["max_pixels"]:
            return spec


def cases_for(names):
    big, resized, small, huge = names
    return [
        dict(images=[resized], prompt="Describe this image.", max_new_tokens=10),
        dict(images=[big, small], prompt="Describe the motion between the two images in one sentence.",
             max_new_tokens=12, system="You are a video direction assistant."),
        dict(images=[huge], prompt="What is in the picture?", max_new_tokens=8),
        dict(images=[], prompt="The camera slowly pans across a lake.", max_new_tokens=8),
    ]


def main():
    ap = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "data"))
    ap.add_argument("--held-back", default=None, help="write the held-back set to this folder instead")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--random", type=int, default=0,
                    help="with --held-back: N random architectures instead of the fixed held-back set")
    args = ap.parse_args()
    root = os.path.abspath(args.held_back or args.out)
    specs = HELD_BACK if args.held_back else COMMITTED
    if args.held_back and args.random:
        spec_rng = np.random.default_rng(args.seed + 1)
        specs = [random_spec(spec_rng, i) for i in range(args.random)]
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    tok = build_tokenizer(vocab_size=400 if not args.held_back else 700)
    image_dir = os.path.join(root, "images")
    os.makedirs(image_dir, exist_ok=True)
    # big: several windows; resized: not a multiple of 28; small; huge: above max_pixels
    sizes = [(168, 112), (150, 100), (84, 56), (300, 230)] if not args.held_back else \
        [(224, 168), (131, 97), (60, 90), (400, 260)]
    if args.held_back and args.random:
        sizes = [(int(rng.integers(100, 330)), int(rng.integers(60, 250))) for _ in range(4)]
    names = make_images(image_dir, rng, sizes)
    if not args.held_back:
        # Pillow references for the Rust resize test (both of Pillow 13's pass orders)
        rdir = os.path.join(image_dir, "resized")
        os.makedirs(rdir, exist_ok=True)
        src = Image.open(os.path.join(image_dir, names[1])).convert("RGB")
        for w, h in [(140, 112), (168, 84), (160, 40), (66, 48), (300, 90), (60, 90), (151, 99)]:
            src.resize((w, h), Image.BICUBIC).save(os.path.join(rdir, f"{w}x{h}.png"))
    goldens = {"transformers": __import__("transformers").__version__, "torch": torch.__version__,
               "image_backend": "pil", "checkpoints": {}}
    for i, spec in enumerate(specs):
        folder = build_checkpoint(root, spec, tok, args.seed + i)
        tok_lib = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        results = []
        for case in cases_for(names):
            results.append(run_golden(folder, spec, image_dir, case, tok_lib))
            r = results[-1]
            print(spec["name"], r["image_grid_thw"], len(r["prompt_token_ids"]), r["token_ids"], r["top_logits"][:2],
                  file=sys.stderr)
        goldens["checkpoints"][spec["name"]] = results
    with open(os.path.join(root, "goldens.json"), "w") as f:
        json.dump(goldens, f)
    print("wrote", root)


if __name__ == "__main__":
    main()
