"""Reference logits of the tiny random-weight checkpoints of
helexa_testkit::tiny_arch (Gemma 2, Gemma 3, Phi-3, Qwen3-MoE), computed by
transformers (eager attention, f32, full forward each step, no cache) from
the very files the Rust testkit writes. Run by scripts/gen-arch-fixtures."""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

PROMPT = [1, 17, 33, 5, 60, 7, 9, 88, 41]
STEPS = 4
# (kind, sliding window, query_pre_attn_scalar): windows shorter than the
# prompt, and a Gemma query scalar that is not the head size.
CASES = [
    ("gemma2", "3", "48", []),
    ("gemma3", "3", "48", []),
    ("phi3", "5", "none", []),
    ("qwen3_moe", "none", "none", []),
    # Longrope: transformers uses the short factors while the sequence is
    # within the original context (64), and scales cos/sin by the
    # attention factor.
    ("phi3", "none", "none", ["longrope"]),
]


def fnv1a(data: bytes) -> str:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    out = {"prompt": PROMPT, "transformers": __import__("transformers").__version__, "cases": []}
    for kind, window, scalar, extra in CASES:
        with tempfile.TemporaryDirectory() as d:
            subprocess.run(
                ["cargo", "run", "-q", "-p", "helexa-testkit", "--example", "write_tiny_arch",
                 "--", kind, window, scalar, d, *extra],
                cwd=args.root, check=True)
            raw = (Path(d) / "model.safetensors").read_bytes()
            # The tensor data, not the JSON header (whose key order depends
            # on serde_json's features in the writing build).
            weights = raw[8 + int.from_bytes(raw[:8], "little"):]
            model = AutoModelForCausalLM.from_pretrained(
                d, dtype=torch.float32, attn_implementation="eager")
            model.eval()
            ids = list(PROMPT)
            logits, tokens = [], []
            with torch.no_grad():
                for step in range(STEPS + 1):
                    x = torch.tensor([ids])
                    lg = model(x, use_cache=False).logits[0, -1].float()
                    logits.append([round(v, 6) for v in lg.tolist()])
                    if step < STEPS:
                        t = int(torch.argmax(lg))
                        tokens.append(t)
                        ids.append(t)
        out["cases"].append({
            "kind": kind + "".join("_" + e for e in extra),
            "window": None if window == "none" else int(window),
            "query_scalar": None if scalar == "none" else int(scalar),
            "weights_fnv1a": fnv1a(weights),
            "tokens": tokens,
            "logits": logits,
        })
        print(f"{kind}{extra}: greedy {tokens}", file=sys.stderr)
    Path(args.out).write_text(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
