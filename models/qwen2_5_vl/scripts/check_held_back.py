#!/usr/bin/env python3
"""Checks `kubewan-runner vlm generate` against goldens written by make_tiny.py.

    python3 models/qwen2_5_vl/scripts/make_tiny.py --held-back /tmp/qwen-heldback --seed 777   # venv python
    cargo build -p kubewan-runner
    python3 models/qwen2_5_vl/scripts/check_held_back.py /tmp/qwen-heldback [--runner target/debug/kubewan-runner]

For every checkpoint and case: identical prompt token ids, identical greedy
tokens and text, same top-5 ids, top-5 logits within 1e-3 relative
(|a-b| <= 1e-3 * max(1, |b|)). Standard library only; exits 1 on any mismatch.
"""

import argparse
import json
import os
import subprocess
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--runner", default="target/debug/kubewan-runner")
    ap.add_argument("--tol", type=float, default=1e-3)
    args = ap.parse_args()
    goldens = json.load(open(os.path.join(args.root, "goldens.json")))
    failures, cases, worst = [], 0, 0.0
    for name, items in goldens["checkpoints"].items():
        for i, g in enumerate(items):
            cmd = [args.runner, "vlm", "generate", "--model", os.path.join(args.root, name)]
            for im in g["images"]:
                cmd += ["--image", os.path.join(args.root, "images", im)]
            if g.get("system") is not None:
                cmd += ["--system", g["system"]]
            cmd += ["--prompt", g["prompt"], "--max-new-tokens", str(g["max_new_tokens"]), "--greedy", "--json"]
            res = subprocess.run(cmd, capture_output=True, text=True)
            what = f"{name} case {i}"
            if res.returncode != 0:
                failures.append(f"{what}: runner failed: {res.stderr.strip()}")
                continue
            out = json.loads(res.stdout)
            case_worst = 0.0
            for key in ("prompt_token_ids", "token_ids", "text"):
                if out[key] != g[key]:
                    failures.append(f"{what}: {key} differs: {out[key]!r} vs {g[key]!r}")
            for (oid, ol), (gid, gl) in zip(out["top_logits"], g["top_logits"]):
                if oid != gid:
                    failures.append(f"{what}: top-5 ids differ: {out['top_logits']} vs {g['top_logits']}")
                    break
                r = abs(ol - gl) / max(1.0, abs(gl))
                case_worst = max(case_worst, r)
                if r > args.tol:
                    failures.append(f"{what}: logit of {oid}: {ol} vs {gl} (rel {r:.3e})")
            worst = max(worst, case_worst)
            cases += 1
            print(f"{what}: {len(out['prompt_token_ids'])} prompt ids, tokens {out['token_ids']}, "
                  f"worst top-5 rel err {case_worst:.2e}")
    print(f"{cases} cases, worst relative top-5 logit error {worst:.2e}, {len(failures)} failures")
    for f in failures:
        print("FAIL", f)
    sys.exit(1 if failures or cases == 0 else 0)


if __name__ == "__main__":
    main()
