#!/usr/bin/env python3
"""Checks `kubewan-runner video generate` against diffusers on held-back tiny pipelines.

The held-back pipelines come from `make_tiny.py --held-back OUT_DIR --seed N` (sizes and head
counts this repository never saw). For each `OUT_DIR/held-*` folder this runs

    kubewan-runner video generate --model DIR/model --first DIR/golden/first.png [--last ...]
        --prompt ... --negative-prompt ... --frames F --width W --height H --steps S
        --guidance G --flow-shift X --latents DIR/golden/latents.safetensors --out-frames OUT

and compares OUT's `frames` with diffusers' `DIR/golden/frames.safetensors` (max abs error must be
<= 2e-3). Exit status 0 only when every pipeline matches. Needs numpy and safetensors (the venv
that ran make_tiny.py has both).

    python models/wan/scripts/check_held_back.py OUT_DIR [--runner target/release/kubewan-runner]
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from safetensors.numpy import load_file

TOL = 2e-3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("held_dir")
    ap.add_argument("--runner", default="target/debug/kubewan-runner")
    args = ap.parse_args()
    dirs = sorted(d for d in glob.glob(os.path.join(args.held_dir, "held-*")) if os.path.isdir(d))
    if not dirs:
        print(f"no held-* pipelines in {args.held_dir}", file=sys.stderr)
        return 2
    failed = 0
    for d in dirs:
        gold = os.path.join(d, "golden")
        with open(os.path.join(gold, "meta.json")) as f:
            meta = json.load(f)
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "frames.safetensors")
            cmd = [
                args.runner, "video", "generate",
                "--model", os.path.join(d, "model"),
                "--first", os.path.join(gold, meta["e2e_first"]),
                "--prompt", meta["prompt"],
                "--negative-prompt", meta["negative_prompt"],
                "--frames", str(meta["frames"]),
                "--width", str(meta["width"]),
                "--height", str(meta["height"]),
                "--steps", str(meta["steps"]),
                "--guidance", str(meta["guidance"]),
                "--flow-shift", str(meta["flow_shift"]),
                "--latents", os.path.join(gold, "latents.safetensors"),
                "--out-frames", out,
            ]
            if meta.get("e2e_last"):
                cmd += ["--last", os.path.join(gold, meta["e2e_last"])]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                print(f"FAIL {os.path.basename(d)}: runner exited {r.returncode}: {r.stderr.strip()}")
                failed += 1
                continue
            got = load_file(out)["frames"]
        want = load_file(os.path.join(gold, "frames.safetensors"))["frames"]
        if got.shape != want.shape:
            print(f"FAIL {os.path.basename(d)}: shape {got.shape} != {want.shape}")
            failed += 1
            continue
        err = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())
        c = meta["config"]
        desc = (
            f"{'FLF2V' if meta['flf2v'] else 'I2V'} {meta['frames']}x{meta['height']}x{meta['width']}, "
            f"dit {c['heads']}x{c['head_dim']} x{c['layers']}, vae base {c['v_base']} res {c['v_res']}, "
            f"steps {meta['steps']} guidance {meta['guidance']} shift {meta['flow_shift']}"
        )
        ok = err <= TOL
        failed += 0 if ok else 1
        print(f"{'ok  ' if ok else 'FAIL'} {os.path.basename(d)} ({desc}): max abs err {err:.3e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
