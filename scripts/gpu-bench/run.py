#!/usr/bin/env python3
"""The GPU benchmark driver: runs `kubewan-runner bench …` and the PyTorch
reference (reference.py) on the same real-sized random-weight models, one
process per model and side, samples each process's own GPU memory through NVML
while its rows run, and prints per row runner time / PyTorch time and runner
peak VRAM / PyTorch peak VRAM.

    python3 scripts/gpu-bench/run.py --runner PATH/kubewan-runner [--device cuda] [--budget-s 540]
    python3 scripts/gpu-bench/run.py --runner target/debug/kubewan-runner --tiny --device cpu   # dry run

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
        ("vlm", ["vlm", "--row", f"vlm-{p['vlm_shape']}", "--model", str(work / "vlm"),
                 "--image", images[0], "--image", images[1], "--max-new-tokens", str(p["new_tokens"])]),
        ("vae", ["vae-decode", "--row", "vae-decode", "--config", str(work / "vae.json"), "--size", p["480p"]]),
        ("umt5", ["umt5", "--row", "umt5-xxl", "--config", str(work / "umt5.json"), "--tokens", str(p["tokens"])]),
    ]


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

    def __init__(self, name, cmd, memory, timeout):
        self.name, self.memory = name, memory
        self.rows, self.current, self.lock = {}, None, threading.Lock()
        started = time.time()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
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

    for name, config in [("dit-1.3b", p["dit-1.3b"]), ("dit-14b", p["dit-14b"]), ("vae", p["vae"]),
                         ("umt5", p["umt5"])]:
        (work / f"{name}.json").write_text(json.dumps(config, indent=1))
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
    """Decode seconds per token from the generate and prefill rows."""
    gen, pre = rows.get(f"{vlm}-generate"), rows.get(f"{vlm}-prefill")
    if gen and pre and "seconds" in gen and "seconds" in pre and gen.get("new_tokens", 0) > 1:
        per_token = (gen["seconds"] - pre["seconds"]) / (gen["new_tokens"] - 1)
        rows[f"{vlm}-decode"] = {"seconds": per_token, "tokens_per_s": 1 / per_token if per_token > 0 else None,
                                 "peak_vram": gen.get("peak_vram"), "peak_rss": gen.get("peak_rss")}


def print_table(results, p, device):
    runner, ref = results["runner"], results["reference"]
    for side in (runner, ref):
        derive_decode(side, f"vlm-{p['vlm_shape']}")
    mem = "VRAM" if device == "cuda" else "RSS"
    key = "peak_vram" if device == "cuda" else "peak_rss"
    header = f"{'row':<42} {'runner':>9} {'pytorch':>9} {'time r/p':>9} {'runner ' + mem:>12} {'pytorch ' + mem:>13} {mem + ' r/p':>9}"
    print(header)
    print("-" * len(header))
    for label, rrow, prow in table_rows(p):
        a, b = runner.get(rrow, {}), ref.get(prow, {}) if prow else {}
        note = a.get("skipped") or b.get("skipped") or ""
        print(f"{label:<42} {fmt_s(a.get('seconds')):>9} {fmt_s(b.get('seconds')):>9} "
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runner", required=True, help="the kubewan-runner binary (CUDA build on a GPU)")
    parser.add_argument("--python", default=sys.executable, help="python with torch, diffusers, transformers")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU dry run)")
    parser.add_argument("--work", default="/tmp/kubewan-bench", help="configs, images, the VLM checkpoint")
    parser.add_argument("--budget-s", type=float, default=540, help="stop starting groups after this")
    parser.add_argument("--only", help="comma-separated groups (attention,dit-1.3b,dit-14b,vlm,vae,umt5)")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="where bench.json goes")
    args = parser.parse_args()

    begin = time.time()
    p, is_tiny = plan(args.tiny)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    write_inputs(p, work)
    memory = Memory()
    results = {"runner": {}, "reference": {}, "failures": [], "device": args.device, "tiny": is_tiny}
    chosen = [g for g in groups(p, work) if not args.only or g[0] in args.only.split(",")]
    for name, bench_args in chosen:
        if name == "vlm" and not (work / "vlm" / "config.json").is_file():
            write_vlm(args.runner, work / "vlm", p["vlm_shape"])
        for side, cmd in [("runner", [args.runner, "bench", bench_args[0], "--device", args.device, *bench_args[1:]]),
                          ("reference", [args.python, str(HERE / "reference.py"), bench_args[0],
                                         "--device", args.device, *bench_args[1:]])]:
            left = args.budget_s - (time.time() - begin)
            if left < 10:
                results["failures"].append(f"{name} ({side}): skipped, the time budget is spent")
                continue
            print(f"== {name}: {side} ({left:.0f} s left)", file=sys.stderr, flush=True)
            run = Side(side, cmd, memory, timeout=left)
            results[side].update(run.rows)
            if run.failure():
                results["failures"].append(f"{name} ({side}): {run.failure()}")
    results["vram_method"] = sorted(memory.methods)
    print()
    print(f"peak VRAM: {', '.join(sorted(memory.methods)) or 'not measured (no NVML)'}; peak RSS from /proc")
    print_table(results, p, args.device)
    print()
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
