#!/usr/bin/env python3
"""The GPU and CPU benchmark driver: runs `kubewan-runner bench …` and the
PyTorch reference (reference.py) on the same real-sized random-weight models,
one process per model and side, alternating, samples each process's own GPU
memory through NVML while its rows run, and prints per row runner time /
PyTorch time and runner peak VRAM (RSS on the CPU) / PyTorch's.

    python3 scripts/gpu-bench/run.py --runner PATH/kubewan-runner [--device cuda] [--budget-s 540]
    python3 scripts/gpu-bench/run.py --runner target/debug/kubewan-runner --tiny --device cpu   # dry run
    python3 scripts/gpu-bench/run.py --runner PATH --suite cpu [--tiny] [--threads 2]   # scripts/cpu-bench.sh

The CPU suite (issue 15's rows, f32 on both sides, --threads threads each) is
described in cpu_plan(); the rest of this docstring is the GPU suite's.

Rows (full size): FlashAttention vs SDPA at the 14B 480p shape; one denoising
step with CFG of the Wan 1.3B DiT at 480p x 81 and of the 14B DiT at 480p and
720p x 81; VAE decode of 81 frames at 480p; UMT5-XXL over 512 tokens; the
Qwen2.5-VL-7B checkpoint (16.6 GB, written first by `bench write-vlm`) loaded
to the GPU, its prefill with two 832x480 images and 64 greedy new tokens, and
its release (VRAM back to the baseline). Groups run in that order while the
time budget lasts; what does not fit is reported as skipped.

Peak VRAM is the largest NVML per-process figure sampled while a row runs (the
process's weights, activations, allocator cache and CUDA context), the same
measure for both sides. Results also go to OUT/bench.json (OUT: --out, or $OUT).
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
GIB = 1 << 30

# The models' real dimensions (diffusers / transformers configs).
WAN_14B_FLF2V = {
    "_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2], "num_attention_heads": 40,
    "attention_head_dim": 128, "in_channels": 36, "out_channels": 16, "text_dim": 4096, "freq_dim": 256,
    "ffn_dim": 13824, "num_layers": 40, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads",
    "eps": 1e-06, "image_dim": 1280, "added_kv_proj_dim": 5120, "rope_max_seq_len": 1024,
    "pos_embed_seq_len": 514,
}
WAN_1_3B_I2V = {**WAN_14B_FLF2V, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30,
                "added_kv_proj_dim": 1536, "pos_embed_seq_len": None}
WAN_VAE = {
    "_class_name": "AutoencoderKLWan", "base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2, "attn_scales": [], "temperal_downsample": [False, True, True], "dropout": 0.0,
    "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    "latents_std": [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916],
}
UMT5_XXL = {
    "model_type": "umt5", "vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240,
    "num_layers": 24, "num_heads": 64, "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu",
    "dense_act_fn": "gelu_new", "is_gated_act": True, "layer_norm_epsilon": 1e-06,
    "is_encoder_decoder": False, "tie_word_embeddings": False,
}


def tiny(config, **dims):
    return {**config, **dims}


def plan(is_tiny):
    """(configs, sizes) of the full benchmark or of the tiny dry run."""
    if is_tiny:
        return {
            "dit-1.3b": tiny(WAN_1_3B_I2V, num_attention_heads=2, attention_head_dim=16, ffn_dim=64,
                             num_layers=2, text_dim=32, freq_dim=32, image_dim=32, added_kv_proj_dim=32),
            "dit-14b": tiny(WAN_14B_FLF2V, num_attention_heads=2, attention_head_dim=16, ffn_dim=64,
                            num_layers=2, text_dim=32, freq_dim=32, image_dim=32, added_kv_proj_dim=32,
                            pos_embed_seq_len=34),
            "vae": tiny(WAN_VAE, base_dim=8, num_res_blocks=1),
            "umt5": tiny(UMT5_XXL, vocab_size=123, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4),
            "vlm_shape": "tiny", "image": (96, 64), "tokens": 16, "new_tokens": 8,
            "attention": (2, 300, 64),
            "480p": "480p=64x48x9", "720p": "720p=96x64x9",
        }, True
    return {
        "dit-1.3b": WAN_1_3B_I2V, "dit-14b": WAN_14B_FLF2V, "vae": WAN_VAE, "umt5": UMT5_XXL,
        "vlm_shape": "7b", "image": (832, 480), "tokens": 512, "new_tokens": 64,
        # The 14B DiT's self-attention at 480p x 81: 40 heads over 21 x 30 x 52 tokens.
        "attention": (40, 32760, 128),
        "480p": "480p=832x480x81", "720p": "720p=1280x720x81",
    }, False


def groups(p, work):
    """(name, bench subcommand arguments) in priority order; both sides take the same."""
    heads, tokens, head_dim = p["attention"]
    images = [str(work / "first.png"), str(work / "last.png")]
    return [
        ("attention", ["attention", "--row", "attention-14b-480p", "--heads", str(heads),
                       "--tokens", str(tokens), "--head-dim", str(head_dim)]),
        ("dit-1.3b", ["dit", "--row", "dit-1.3b", "--config", str(work / "dit-1.3b.json"), "--size", p["480p"]]),
        ("dit-14b", ["dit", "--row", "dit-14b", "--config", str(work / "dit-14b.json"),
                     "--size", p["480p"], "--size", p["720p"]]),
        ("vlm", ["vlm", "--row", f"vlm-{p['vlm_shape']}", "--model", str(work / f"vlm-{p['vlm_shape']}"),
                 "--image", images[0], "--image", images[1], "--max-new-tokens", str(p["new_tokens"])]),
        ("vae", ["vae-decode", "--row", "vae-decode", "--config", str(work / "vae.json"), "--size", p["480p"]]),
        ("umt5", ["umt5", "--row", "umt5-xxl", "--config", str(work / "umt5.json"), "--tokens", str(p["tokens"])]),
    ]


def cpu_plan(is_tiny):
    """The CPU suite (issue 15): f32 on both sides, the Wan2.1 1.3B-shaped DiT
    (with the I2V image branch) for one forward (guidance 1) at 780 and 3120
    tokens and as the checkpoint of the load rows (the loader into f32 against
    a plain read of the same file, warm and cold), the VAE decoding 5 frames,
    attention at the DiT's two token counts (time, and RSS growth for the
    memory), one causal conv3d layer, the DiT's gelu, UMT5-XXL's first 4
    layers, and a mid-size Qwen2.5-VL (`bench write-vlm --shape mid`) on one
    448² image in bf16 and in f32. --tiny keeps every row but cuts the
    shapes (DiT and UMT5 layers, the VAE's frame size, attention tokens)."""
    if is_tiny:
        return {
            "dit-1.3b": tiny(WAN_1_3B_I2V, num_layers=2), "vae": WAN_VAE,
            "umt5": tiny(UMT5_XXL, num_layers=1), "tokens": 128,
            "dit_sizes": ["780=416x240x5", "3120=832x480x5"], "vae_size": "104x64x5",
            "attention": [(12, 390, 128), (12, 780, 128)], "conv3d": (192, 2, 30, 52), "gelu": (780, 8960),
            "vlm_shape": "tiny", "image": (112, 112), "new_tokens": 8, "load_rounds": 2,
        }
    return {
        "dit-1.3b": WAN_1_3B_I2V, "vae": WAN_VAE, "umt5": tiny(UMT5_XXL, num_layers=4), "tokens": 512,
        "dit_sizes": ["780=416x240x5", "3120=832x480x5"], "vae_size": "416x240x5",
        "attention": [(12, 780, 128), (12, 3120, 128)], "conv3d": (192, 2, 60, 104), "gelu": (780, 8960),
        "vlm_shape": "mid", "image": (448, 448), "new_tokens": 64, "load_rounds": 3,
    }


def cpu_groups(p, work):
    """The CPU suite's groups (name, bench arguments), as groups() gives the GPU's."""
    vlm = f"vlm-{p['vlm_shape']}"
    channels, frames, height, width = p["conv3d"]
    rows, cols = p["gelu"]
    return [
        ("load", ["load", "--row", "load", "--dir", str(work / "dit-1.3b"), "--rounds", str(p["load_rounds"])]),
        ("dit", ["dit", "--row", "dit-1.3b", "--config", str(work / "dit-1.3b.json"), "--guidance", "1", "--dtype", "f32",
                 *[a for size in p["dit_sizes"] for a in ("--size", size)]]),
        ("vae", ["vae-decode", "--row", "vae-decode", "--config", str(work / "vae.json"),
                 "--size", f"{p['vae_size']}={p['vae_size']}"]),
        *[(f"attention-{tokens}", ["attention", "--row", f"attention-{tokens}", "--heads", str(heads),
                                   "--tokens", str(tokens), "--head-dim", str(head_dim), "--dtype", "f32"])
          for heads, tokens, head_dim in p["attention"]],
        ("conv3d", ["conv3d", "--row", "conv3d", "--channels", str(channels), "--frames", str(frames),
                    "--height", str(height), "--width", str(width)]),
        ("gelu", ["gelu", "--row", "gelu", "--rows", str(rows), "--cols", str(cols), "--dtype", "f32"]),
        ("umt5", ["umt5", "--row", "umt5-xxl", "--config", str(work / "umt5.json"), "--tokens", str(p["tokens"]),
                  "--dtype", "f32"]),
        *[(f"vlm-{dtype}", ["vlm", "--row", f"{vlm}-{dtype}", "--dtype", dtype, "--model", str(work / vlm),
                            "--image", str(work / "first.png"), "--max-new-tokens", str(p["new_tokens"])])
          for dtype in ("bf16", "f32")],
    ]


def cpu_table_rows(p):
    """(label, runner row, reference row) of the CPU suite's table."""
    vlm = f"vlm-{p['vlm_shape']}"
    channels, frames, height, width = p["conv3d"]
    rows, cols = p["gelu"]
    out = [(f"load DiT 1.3B, {p['dit-1.3b']['num_layers']} layers, into f32, {cache}", f"load-{cache}", f"load-{cache}")
           for cache in ("warm", "cold")]
    out += [(f"  sequential read, {cache}", f"load-read-{cache}", f"load-read-{cache}") for cache in ("warm", "cold")]
    out += [(f"DiT 1.3B, {p['dit-1.3b']['num_layers']} layers, forward {size.split('=')[1]} ({size.split('=')[0]} tok)",
             f"dit-1.3b-{size.split('=')[0]}", f"dit-1.3b-{size.split('=')[0]}") for size in p["dit_sizes"]]
    out.append((f"VAE decode {p['vae_size']}", f"vae-decode-{p['vae_size']}", f"vae-decode-{p['vae_size']}"))
    out += [(f"attention {heads}x{tokens}²x{head_dim}", f"attention-{tokens}-cpu", f"attention-{tokens}-sdpa")
            for heads, tokens, head_dim in p["attention"]]
    out.append((f"causal conv3d {channels} ch, {frames} frames {height}x{width}", "conv3d", "conv3d"))
    out.append((f"gelu (tanh) {rows}x{cols}", "gelu", "gelu"))
    out.append((f"UMT5-XXL {p['umt5']['num_layers']} layers, {p['tokens']} tokens", "umt5-xxl", "umt5-xxl"))
    for dtype in ("bf16", "f32"):
        out.append((f"Qwen2.5-VL {p['vlm_shape']} {dtype} prefill", f"{vlm}-{dtype}-prefill", f"{vlm}-{dtype}-prefill"))
        out.append((f"Qwen2.5-VL {p['vlm_shape']} {dtype} decode (per token)", f"{vlm}-{dtype}-decode",
                    f"{vlm}-{dtype}-decode"))
    return out


class Memory:
    """GPU memory of one process through NVML (None without NVML), and its RSS.

    The process's own entry in the devices' running compute processes; where
    NVML lists no entry for it (a sandbox that hides PIDs), the device-wide use
    minus what was in use before the benchmark started (one benchmark process
    runs at a time, so that is the same process's memory). `methods` says which were used.
    """

    def __init__(self):
        try:
            import pynvml
            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self.idle = self.device_used()
        except Exception as e:  # no driver, no GPU, no pynvml: RSS only
            print(f"NVML unavailable ({e}): no VRAM figures", file=sys.stderr)
            self.nvml = None
        self.methods = set()

    @staticmethod
    def rss(pid):
        """The process's resident set (bytes; None once it has exited)."""
        try:
            with open(f"/proc/{pid}/status") as f:
                return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
        except (OSError, StopIteration):
            return None

    def device_used(self):
        return sum(self.nvml.nvmlDeviceGetMemoryInfo(h).used for h in self.handles)

    def vram(self, pid):
        if self.nvml is None:
            return None
        used, listed = 0, False
        try:
            for h in self.handles:
                for proc in self.nvml.nvmlDeviceGetComputeRunningProcesses(h):
                    if proc.pid == pid:
                        listed = True
                        used += proc.usedGpuMemory or 0
        except self.nvml.NVMLError:
            pass
        if listed:
            self.methods.add("NVML per-process")
            return used
        used = max(0, self.device_used() - self.idle)
        if used > 256 << 20:  # memory in use that NVML does not list under our PID
            self.methods.add("NVML device-wide minus the idle baseline")
        return used

class Side:
    """One benchmark process: its rows' events, and the memory sampled while each row runs."""

    def __init__(self, name, cmd, memory, timeout, env=None):
        self.name, self.memory = name, memory
        self.rows, self.current, self.lock = {}, None, threading.Lock()
        started = time.time()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                     env=env)
        self.stderr, self.timed_out = [], False
        watchdog = threading.Timer(timeout, self.kill)
        watchdog.start()
        threads = [threading.Thread(target=self.sample, daemon=True),
                   threading.Thread(target=self.read_stderr, daemon=True)]
        for t in threads:
            t.start()
        for line in self.proc.stdout:
            self.event(line)
        self.proc.wait()
        watchdog.cancel()
        for t in threads:
            t.join(timeout=5)
        self.seconds = time.time() - started

    def kill(self):
        self.timed_out = True
        self.proc.kill()

    def event(self, line):
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            return
        row, kind = ev.pop("row"), ev.pop("event")
        vram = self.memory.vram(self.proc.pid)
        with self.lock:
            r = self.rows.setdefault(row, {"peak_vram": None, "peak_rss": None})
            r[f"vram_at_{kind}"] = vram
            if kind == "start":
                self.current = row
            elif kind == "end":
                self.current = None
            r.update(ev)
        self.note(row, vram, self.memory.rss(self.proc.pid))

    def note(self, row, vram, rss):
        r = self.rows[row]
        if vram is not None:
            r["peak_vram"] = max(r["peak_vram"] or 0, vram)
        if rss is not None:
            r["peak_rss"] = max(r["peak_rss"] or 0, rss)

    def sample(self):
        while self.proc.poll() is None:
            vram, rss = self.memory.vram(self.proc.pid), self.memory.rss(self.proc.pid)
            with self.lock:
                if self.current is not None:
                    self.note(self.current, vram, rss)
            time.sleep(0.02)

    def read_stderr(self):
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip())
            print(f"  [{self.name}] {line.rstrip()}", file=sys.stderr, flush=True)

    def failure(self):
        if self.timed_out:
            return "timed out"
        if self.proc.returncode != 0:
            tail = " | ".join(l for l in self.stderr[-3:] if l)
            return f"exit {self.proc.returncode}: {tail}"
        return None


def write_inputs(p, work):
    from PIL import Image

    for name in ("dit-1.3b", "dit-14b", "vae", "umt5"):
        if name in p:
            (work / f"{name}.json").write_text(json.dumps(p[name], indent=1))
    w, h = p["image"]
    for i, name in enumerate(["first.png", "last.png"]):
        # A smooth gradient with detail, as keyframes have (not a flat colour).
        img = Image.new("RGB", (w, h))
        img.putdata([((x * 255 // w) ^ (i * 90), (y * 255 // h), ((x * y) // 7) % 256)
                     for y in range(h) for x in range(w)])
        img.save(work / name)


def write_vlm(runner, folder, shape):
    """The VLM checkpoint both sides load (released layout, random weights)."""
    t = time.time()
    subprocess.run([runner, "bench", "write-vlm", str(folder), "--shape", shape], check=True)
    print(f"wrote the {shape} VLM checkpoint in {time.time() - t:.0f} s", file=sys.stderr)


def write_dit(python, work):
    """The DiT checkpoint of the CPU suite's load rows (diffusers' save_pretrained, f32,
    random weights), written once per config."""
    folder, config = work / "dit-1.3b", work / "dit-1.3b.json"
    if (folder / "config.json").is_file() and json.loads((folder / "config.json").read_text()).get(
            "num_layers") == json.loads(config.read_text())["num_layers"]:
        return
    t = time.time()
    subprocess.run([python, str(HERE / "reference.py"), "write-dit", "--device", "cpu", "--row", "write-dit",
                    "--config", str(config), "--dir", str(folder)], check=True)
    print(f"wrote the DiT checkpoint in {time.time() - t:.0f} s", file=sys.stderr)


def prepare(name, args, p, work):
    """Writes the checkpoint a group reads, where it is missing."""
    vlm = work / f"vlm-{p['vlm_shape']}"
    if name.startswith("vlm") and not (vlm / "config.json").is_file():
        write_vlm(args.runner, vlm, p["vlm_shape"])
    if name == "load":
        write_dit(args.python, work)


def fmt_s(s):
    return "-" if s is None else f"{s:.2f}s"


def fmt_b(b):
    if b is None:
        return "-"
    return f"{b / GIB:.1f}G" if b >= GIB else f"{b / (1 << 20):.0f}M"


def ratio(a, b):
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def table_rows(p):
    """(label, runner row, reference row, value kind) in table order."""
    vlm = f"vlm-{p['vlm_shape']}"
    return [
        ("attention 14B 480p: flash vs SDPA", "attention-14b-480p-flash", "attention-14b-480p-sdpa"),
        ("  (runner chunked attention)", "attention-14b-480p-chunked", None),
        ("DiT 1.3B step CFG 480p x81", "dit-1.3b-480p", "dit-1.3b-480p"),
        ("DiT 14B step CFG 480p x81", "dit-14b-480p", "dit-14b-480p"),
        ("DiT 14B step CFG 720p x81", "dit-14b-720p", "dit-14b-720p"),
        ("VAE decode 81 frames 480p", "vae-decode-480p", "vae-decode-480p"),
        ("UMT5-XXL encode 512 tokens", "umt5-xxl", "umt5-xxl"),
        (f"Qwen2.5-VL {p['vlm_shape']} load to GPU", f"{vlm}-load", f"{vlm}-load"),
        (f"Qwen2.5-VL {p['vlm_shape']} prefill 2 images", f"{vlm}-prefill", f"{vlm}-prefill"),
        (f"Qwen2.5-VL {p['vlm_shape']} decode (per token)", f"{vlm}-decode", f"{vlm}-decode"),
    ]


def derive_decode(rows, vlm):
    """Decode seconds per token: the generate row's decoding steps (first token to
    last, timed inside the one call) over the tokens after the first."""
    gen = rows.get(f"{vlm}-generate")
    if gen and gen.get("decode_seconds") is not None and gen.get("new_tokens", 0) > 1:
        per_token = gen["decode_seconds"] / (gen["new_tokens"] - 1)
        rows[f"{vlm}-decode"] = {"seconds": per_token, "tokens_per_s": 1 / per_token if per_token > 0 else None,
                                 "peak_vram": gen.get("peak_vram"), "peak_rss": gen.get("peak_rss")}


def print_table(results, p, device, rows):
    runner, ref = results["runner"], results["reference"]
    vlm = f"vlm-{p['vlm_shape']}"
    for side in (runner, ref):
        for prefix in (vlm, f"{vlm}-bf16", f"{vlm}-f32"):
            derive_decode(side, prefix)
    mem = "VRAM" if device == "cuda" else "RSS"
    key = "peak_vram" if device == "cuda" else "peak_rss"
    header = f"{'row':<52} {'kubewan':>9} {'pytorch':>9} {'time k/p':>9} {'kubewan ' + mem:>12} {'pytorch ' + mem:>13} {mem + ' k/p':>9}"
    print(header)
    print("-" * len(header))
    for label, rrow, prow in rows:
        a, b = runner.get(rrow, {}), ref.get(prow, {}) if prow else {}
        note = a.get("skipped") or b.get("skipped") or ""
        print(f"{label:<52} {fmt_s(a.get('seconds')):>9} {fmt_s(b.get('seconds')):>9} "
              f"{ratio(a.get('seconds'), b.get('seconds')):>9} {fmt_b(a.get(key)):>12} {fmt_b(b.get(key)):>13} "
              f"{ratio(a.get(key), b.get(key)):>9}  {note}")


def print_checks(results, p):
    runner = results["runner"]
    for row, r in sorted(runner.items()):
        if "relative_error_vs_chunked" in r:
            error = r["relative_error_vs_chunked"]
            verdict = "ok" if error < 1e-2 else "WRONG"
            print(f"{row}: flash vs chunked attention, relative error {error:.2e} ({verdict}; bf16: < 1e-2)")
    for row, r in sorted(runner.items()):
        if r.get("finite") is False:
            print(f"NOT FINITE: runner row {row}")
        if "passes" in r:
            print(f"{row}: guidance {r['passes']}, activation estimate {fmt_b(r.get('activation_estimate_bytes'))}, "
                  f"measured peak {fmt_b(r.get('peak_vram'))}")
    vlm = f"vlm-{p['vlm_shape']}"
    for side in ("runner", "reference"):
        load, rel = results[side].get(f"{vlm}-load", {}), results[side].get(f"{vlm}-release", {})
        base, after = load.get("vram_at_start"), rel.get("vram_at_check")
        peak = load.get("peak_vram")
        if None not in (base, after, peak) and peak > base:
            left = after - base
            print(f"{side} VLM release: baseline {fmt_b(base)}, loaded {fmt_b(peak)}, after release {fmt_b(after)}: "
                  f"{left / (1 << 20):+.0f} MiB ({100 * left / (peak - base):.2f} % of the load; target <= 1 %)")


def print_cpu_checks(results, p):
    """The issue's targets that are not a time ratio: the loader against the read,
    the load's peak against the weights, attention memory growth, decode speed."""
    for side in ("runner", "reference"):
        rows = results[side]
        for cache in ("warm", "cold"):
            read, load = rows.get(f"load-read-{cache}", {}), rows.get(f"load-{cache}", {})
            if "seconds" in read and "seconds" in load:
                print(f"{side} load {cache}: {load['seconds']:.2f} s against a plain read's {read['seconds']:.2f} s: "
                      f"{read['seconds'] / load['seconds']:.2f}x the read speed (target >= 0.9)")
        load = rows.get("load-warm", {})
        if load.get("peak_rss") and load.get("weight_bytes"):
            print(f"{side} load peak RSS {fmt_b(load['peak_rss'])} = {load['peak_rss'] / load['weight_bytes']:.3f}x "
                  f"the {fmt_b(load['weight_bytes'])} of weights (target <= 1.05)")
        grown = []
        for _, tokens, _ in p["attention"]:
            r = rows.get(f"attention-{tokens}-cpu" if side == "runner" else f"attention-{tokens}-sdpa", {})
            if r.get("peak_rss") is not None and r.get("rss_at_start") is not None:
                grown.append((tokens, r["peak_rss"] - r["rss_at_start"]))
        if len(grown) == 2 and grown[0][1] > 0:
            (t0, m0), (t1, m1) = grown
            print(f"{side} attention memory above its inputs: {fmt_b(m0)} at {t0} tokens, {fmt_b(m1)} at {t1}: "
                  f"{m1 / m0:.1f}x for {t1 / t0:.0f}x the tokens (linear: {t1 / t0:.0f}x, quadratic: {(t1 / t0) ** 2:.0f}x)")
        for dtype in ("bf16", "f32"):
            decode = rows.get(f"vlm-{p['vlm_shape']}-{dtype}-decode", {})
            if decode.get("tokens_per_s"):
                generate = rows[f"vlm-{p['vlm_shape']}-{dtype}-generate"]
                rounds = ", ".join(f"{(generate['new_tokens'] - 1) / s:.2f}"
                                   for s in generate.get("round_decode_seconds", []))
                print(f"{side} Qwen2.5-VL {p['vlm_shape']} {dtype} decode: {decode['tokens_per_s']:.2f} tokens/s"
                      f" (each round: {rounds})")
        for row, r in sorted(rows.items()):
            if r.get("finite") is False:
                print(f"NOT FINITE: {side} row {row}")


def keep_fastest_round(kept, rows):
    """Merges one round's rows of a group (one process) into the rows kept so
    far: the whole round replaces the kept one when its timed rows sum to less
    (rows of one process stay together: a round's load, prefill and decode are
    one process's); every timed row lists each round's seconds under
    "round_seconds" (and a generate row each round's decoding seconds under
    "round_decode_seconds")."""
    timed = [row for row, r in rows.items() if "seconds" in r]
    before = {row: kept[row].get("round_seconds", [kept[row]["seconds"]]) for row in timed
              if "seconds" in kept.get(row, {})}
    earlier_decodes = {row: kept[row].get("round_decode_seconds", []) for row in timed if row in kept}
    if not before or sum(rows[row]["seconds"] for row in timed) < sum(kept[row]["seconds"] for row in before):
        kept.update(rows)
    for row in timed:
        kept[row]["round_seconds"] = before.get(row, []) + [rows[row]["seconds"]]
        if rows[row].get("decode_seconds") is not None:
            kept[row]["round_decode_seconds"] = earlier_decodes.get(row, []) + [rows[row]["decode_seconds"]]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runner", required=True, help="the kubewan-runner binary (CUDA build on a GPU)")
    parser.add_argument("--python", default=sys.executable, help="python with torch, diffusers, transformers")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU dry run; the CPU suite's --quick)")
    parser.add_argument("--suite", choices=["gpu", "cpu"], default="gpu", help="cpu: issue 15's rows, on the CPU")
    parser.add_argument("--threads", type=int, help="threads of each side (the CPU suite: default 2)")
    parser.add_argument("--work", default="/tmp/kubewan-bench", help="configs, images, the VLM checkpoint")
    parser.add_argument("--budget-s", type=float, help="stop starting groups after this (gpu: 540, cpu: 7200)")
    parser.add_argument("--only", help="comma-separated groups (gpu: attention,dit-1.3b,dit-14b,vlm,vae,umt5; "
                                           "cpu: load,dit,vae,attention-N,conv3d,gelu,umt5,vlm-bf16,vlm-f32)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternating rounds per group (runner, PyTorch, runner, ...); each side keeps "
                             "the rows of its fastest round")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="where bench.json goes")
    args = parser.parse_args()

    begin = time.time()
    cpu = args.suite == "cpu"
    if cpu:
        args.device, args.threads = "cpu", args.threads or 2
        p, is_tiny = cpu_plan(args.tiny), args.tiny
    else:
        p, is_tiny = plan(args.tiny)
    args.budget_s = args.budget_s or (7200 if cpu else 540)
    env = None
    if args.threads:
        # The runner's rayon pool and candle's gemm; PyTorch's intra-op pool (torch reads it at start).
        env = {**os.environ, **{k: str(args.threads) for k in ("RAYON_NUM_THREADS", "OMP_NUM_THREADS",
                                                                 "MKL_NUM_THREADS")}}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    write_inputs(p, work)
    memory = Memory()
    results = {"runner": {}, "reference": {}, "failures": [], "device": args.device, "tiny": is_tiny,
               "suite": args.suite, "threads": args.threads}
    chosen = [g for g in (cpu_groups(p, work) if cpu else groups(p, work))
              if not args.only or g[0] in args.only.split(",")]
    for name, bench_args in chosen:
        prepare(name, args, p, work)
        for round_ in range(1, args.rounds + 1):
            for side, cmd in [("runner", [args.runner, "bench", bench_args[0], "--device", args.device,
                                          *bench_args[1:]]),
                              ("reference", [args.python, str(HERE / "reference.py"), bench_args[0],
                                             "--device", args.device, *bench_args[1:]])]:
                left = args.budget_s - (time.time() - begin)
                if left < 10:
                    results["failures"].append(f"{name} ({side}): skipped, the time budget is spent")
                    continue
                print(f"== {name}: {side}, round {round_} of {args.rounds} ({left:.0f} s left)",
                      file=sys.stderr, flush=True)
                run = Side(side, cmd, memory, timeout=left, env=env)
                keep_fastest_round(results[side], run.rows)
                for row, r in run.rows.items():  # as they come: a long run stopped early keeps them
                    if "seconds" in r:
                        print(f"  {side} {row}: {fmt_s(r['seconds'])}, peak RSS {fmt_b(r.get('peak_rss'))}",
                              file=sys.stderr, flush=True)
                if run.failure():
                    results["failures"].append(f"{name} ({side}, round {round_}): {run.failure()}")
    results["vram_method"] = sorted(memory.methods)
    print()
    print(f"peak VRAM: {', '.join(sorted(memory.methods)) or 'not measured (no NVML)'}; peak RSS from /proc")
    print_table(results, p, args.device, cpu_table_rows(p) if cpu else table_rows(p))
    print()
    if cpu:
        print_cpu_checks(results, p)
    else:
        print_checks(results, p)
    for failure in results["failures"]:
        print(f"FAILED: {failure}")
    print(f"total {time.time() - begin:.0f} s")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench.json").write_text(json.dumps(results, indent=1, default=str))
    sys.exit(1 if results["failures"] else 0)


if __name__ == "__main__":
    main()
