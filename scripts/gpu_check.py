#!/usr/bin/env python3
"""The GPU half of scripts/gpu-check: runs on a machine with a CUDA GPU,
PyTorch and transformers (no Rust, no network), against a `neuron` binary
built elsewhere with the `cuda` feature.

Stages (each prints one JSON line and adds to the report):
  parity  a tiny random Llama (GQA, 4 layers) made with transformers: the
          engine's next-token log-probabilities (top 5, /v1/completions) and
          its greedy continuation (24 tokens) against transformers' own
          forward pass in float32, with the engine in f32 (tight: the
          implementation) and in bf16 (what CUDA serves by default); the
          prefix cache on CUDA (a repeated prompt reports cached_tokens and
          gives the same answer).
  decode  a random-weight checkpoint shaped like Llama-3-8B (bf16): decode
          tok/s at batch 1 and batch 16 against the HBM roofline (weight
          bytes read per decode step / memory bandwidth).

Usage: gpu_check.py --neuron PATH --work DIR --out REPORT.json
                    [--stages parity,decode] [--bandwidth-gbs 4800]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request

PORT = 18081


def log(stage, **kv):
    line = json.dumps({"stage": stage, **kv})
    print(line, flush=True)
    return kv


def word_tokenizer(directory, vocab):
    """A word-level tokenizer whose token i is `t{i}`: the random models
    need only ids to round-trip, and this needs no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "t1", "eos_token": "t2", "add_bos_token": False}, f)


DEVICE = "cuda"


def make_model(directory, cfg_kwargs, dtype, seed=0, model_type="llama"):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    os.makedirs(directory, exist_ok=True)
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(model_type, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                               **cfg_kwargs)
    torch.set_default_dtype(dtype)
    with torch.device(DEVICE):
        # Eager attention: what every architecture's reference is (Gemma 2's
        # soft-capping is eager-only).
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    torch.set_default_dtype(torch.float32)
    model.eval()
    model.save_pretrained(directory, safe_serialization=True)
    word_tokenizer(directory, cfg.vocab_size)
    return model


# Tiny random models of each architecture the engine serves: GQA, windows
# shorter than the longer prompts, Gemma's soft-capping and query scalar,
# Phi's partial rotary, Qwen3-MoE's routed experts.
SHAPE = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
             rms_norm_eps=1e-5, tie_word_embeddings=False)
ARCHS = {
    "llama": dict(rope_theta=10000.0),
    "gemma2": dict(head_dim=32, sliding_window=16, query_pre_attn_scalar=48,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_text": dict(head_dim=32, sliding_window=16, query_pre_attn_scalar=48,
                        sliding_window_pattern=2),
    "phi3": dict(partial_rotary_factor=0.75),
    "qwen3_moe": dict(head_dim=32, moe_intermediate_size=128, num_experts=8,
                      num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                      mlp_only_layers=[]),
}


class Engine:
    def __init__(self, neuron, model_dir, max_batch, max_context, log_path, extra=()):
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [neuron, "engine", "--model", model_dir, "--id", "m",
             "--device", "cpu" if DEVICE == "cpu" else "cuda:0",
             "--listen", f"127.0.0.1:{PORT}", "--max-batch", str(max_batch),
             "--max-context", str(max_context), *extra],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{PORT}"
        t0 = time.time()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"engine exited {self.proc.returncode}: "
                                   + open(self.log.name).read()[-3000:])
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                    if json.loads(r.read()).get("status") in ("ok", "ready"):
                        break
            except Exception:
                pass
            if time.time() - t0 > 600:
                raise RuntimeError("engine did not become healthy in 600 s")
            time.sleep(0.5)
        self.load_s = time.time() - t0

    def post(self, path, body):
        req = urllib.request.Request(self.base + path, data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())

    def stream(self, body):
        """Streams a completion; returns the arrival time of each text chunk."""
        req = urllib.request.Request(self.base + "/v1/completions",
                                     data=json.dumps({**body, "stream": True}).encode(),
                                     headers={"content-type": "application/json"})
        times = []
        with urllib.request.urlopen(req, timeout=600) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[5:])
                if ev.get("choices") and ev["choices"][0].get("text"):
                    times.append(time.perf_counter())
        return times

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def ids_of(tokens):
    return [int(m.group(1)) for t in tokens for m in [re.search(r"t(\d+)", t)] if m]


def stage_parity(args, report):
    ok = True
    for arch in args.archs.split(","):
        try:
            ok &= parity_of(arch, args, report)
        except Exception as e:  # report and go on to the next architecture
            ok = False
            report[f"parity_{arch}"] = log(f"parity_{arch}", ok=False, error=repr(e)[-3000:])
    return ok


def parity_of(arch, args, report):
    import torch

    d = os.path.join(args.work, f"tiny-{arch}")
    vocab = SHAPE["vocab_size"]
    model = make_model(d, {**SHAPE, **ARCHS[arch]}, torch.float32, model_type=arch)
    # Larger weights than the default init so that the logits are far from
    # uniform and greedy choices are not near-ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    model.save_pretrained(d, safe_serialization=True)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 37, 300)]

    # Reference log-probs and greedy continuations, once.
    refs = []
    for p in prompts:
        with torch.no_grad():
            ids = torch.tensor([p], device=DEVICE)
            lp = torch.log_softmax(model(ids).logits[0, -1].float(), -1).cpu()
            out = model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False,
                                 suppress_tokens=[2], pad_token_id=0)
        top = torch.topk(lp, 5)
        refs.append(({int(i): float(v) for v, i in zip(top.values, top.indices)},
                     out[0, len(p):].tolist()))
    # f32 checks the implementation (tight); bf16 is what CUDA serves by
    # default (its rounding moves log-probs by a few hundredths).
    ok = True
    for dtype, tol in (("f32", 2e-3), ("bf16", 0.15)):
        eng = Engine(args.neuron, d, max_batch=4, max_context=2048,
                     log_path=os.path.join(os.path.dirname(args.out),
                                           f"parity-{arch}-{dtype}-engine.log"),
                     extra=["--dtype", dtype])
        worst_lp, first_ok, agreed = 0.0, 0, []
        try:
            for p, (want, hf) in zip(prompts, refs):
                r = eng.post("/v1/completions", {"model": "m", "prompt": p, "max_tokens": 1,
                                                 "temperature": 0, "logprobs": 5})
                got_top = r["choices"][0]["logprobs"]["top_logprobs"][0]
                got = {ids_of([k])[0]: v for k, v in got_top.items()}
                common = set(want) & set(got)
                worst_lp = max([worst_lp] + [abs(want[i] - got[i]) for i in common])
                # Top-1 agrees, or differs only at a near-tie: the engine's
                # choice is within the tolerance of the reference's best.
                mine, best = max(got, key=got.get), max(want, key=want.get)
                first_ok += int(mine == best or want.get(mine, -1e9) > want[best] - tol)
                r = eng.post("/v1/completions", {"model": "m", "prompt": p, "max_tokens": 24,
                                                 "temperature": 0, "logprobs": 0,
                                                 "logit_bias": {"2": -100}})
                ours = ids_of(r["choices"][0]["logprobs"]["tokens"])
                n = 0
                while n < min(len(hf), len(ours)) and hf[n] == ours[n]:
                    n += 1
                agreed.append(n)
            # The prefix cache: the same long prompt twice.
            body = {"model": "m", "prompt": prompts[2], "max_tokens": 8, "temperature": 0}
            a = eng.post("/v1/completions", body)
            b = eng.post("/v1/completions", body)
            cached = (b["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            same = a["choices"][0]["text"] == b["choices"][0]["text"]
        finally:
            eng.stop()
        good = worst_lp < tol and first_ok == len(prompts) and cached > 0 and same
        if dtype == "f32":
            good = good and all(n == 24 for n in agreed)
        ok &= good
        report[f"parity_{arch}_{dtype}"] = log(
            f"parity_{arch}_{dtype}", ok=good, max_abs_logprob_diff_top5=round(worst_lp, 5),
            tolerance=tol, top1_agree=f"{first_ok}/{len(prompts)}",
            greedy_agreed_prefix_of_24=agreed, prefix_cache_cached_tokens=cached,
            prefix_cache_same_answer=same)
    return ok


def weight_bytes(model):
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.model.embed_tokens.weight
    return total, total - embed.numel() * embed.element_size()


def stage_decode(args, report):
    import torch

    d = os.path.join(args.work, "llama3-8b-shape")
    t0 = time.time()
    model = make_model(d, dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                               num_hidden_layers=args.decode_layers, num_attention_heads=32,
                               num_key_value_heads=8, max_position_embeddings=8192,
                               rope_theta=500000.0, rms_norm_eps=1e-5,
                               tie_word_embeddings=False), torch.bfloat16)
    total, per_step = weight_bytes(model)
    # transformers' own eager decode of the same checkpoint, for context.
    hf_tok_s = None
    if DEVICE == "cuda":
        with torch.no_grad():
            ids = torch.tensor([[3, 17, 99, 1000] * 8], device=DEVICE)
            model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()
            t1 = time.time()
            out = model.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                                 pad_token_id=0)
            torch.cuda.synchronize()
            hf_tok_s = (out.shape[1] - ids.shape[1]) / (time.time() - t1)
    del model
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    make_s = time.time() - t0
    bw = args.bandwidth_gbs * 1e9
    roofline = bw / per_step
    eng = Engine(args.neuron, d, max_batch=16, max_context=4096,
                 log_path=os.path.join(os.path.dirname(args.out), "decode-engine.log"))
    n_tokens = args.decode_tokens
    body = lambda seed: {"model": "m", "prompt": [3 + seed, 17, 99, 1000 + seed] * 8,
                         "max_tokens": n_tokens, "temperature": 0,
                         "logit_bias": {"2": -100}}
    res = {}
    try:
        eng.stream(body(0))  # warm-up (kernels JIT, cuBLAS handles)
        t = eng.stream(body(1))
        res["batch1_tok_s"] = (len(t) - 1) / (t[-1] - t[0])
        for batch in (16,):
            times = [None] * batch

            def run(i):
                times[i] = eng.stream(body(100 + i))

            th = [threading.Thread(target=run, args=(i,)) for i in range(batch)]
            for x in th:
                x.start()
            for x in th:
                x.join()
            # The window where all streams decode: after the last first
            # token, before the first last token.
            lo = max(t[0] for t in times)
            hi = min(t[-1] for t in times)
            n = sum(sum(1 for s in t if lo < s <= hi) for t in times)
            res[f"batch{batch}_aggregate_tok_s"] = n / (hi - lo) if hi > lo else 0.0
    finally:
        eng.stop()
    report["decode"] = log(
        "decode", layers=args.decode_layers, weights_gb=round(total / 1e9, 2), bytes_per_step_gb=round(per_step / 1e9, 2),
        bandwidth_gbs=args.bandwidth_gbs, roofline_tok_s_batch1=round(roofline, 1),
        batch1_tok_s=round(res["batch1_tok_s"], 1),
        batch1_of_roofline=round(res["batch1_tok_s"] / roofline, 3),
        batch16_aggregate_tok_s=round(res["batch16_aggregate_tok_s"], 1),
        batch16_of_roofline=round(res["batch16_aggregate_tok_s"] / (16 * roofline), 3),
        batch16_over_batch1=round(res["batch16_aggregate_tok_s"] / res["batch1_tok_s"], 2),
        transformers_batch1_tok_s=hf_tok_s and round(hf_tok_s, 1),
        make_checkpoint_s=round(make_s, 1), engine_load_s=round(eng.load_s, 1))
    return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--neuron", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--stages", default="parity,decode")
    ap.add_argument("--archs", default=",".join(ARCHS), help="architectures of the parity stage")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run")
    ap.add_argument("--decode-layers", type=int, default=32,
                    help="layers of the Llama-3-8B-shaped model (fewer for a dry run)")
    ap.add_argument("--decode-tokens", type=int, default=128, help="tokens per stream")
    ap.add_argument("--bandwidth-gbs", type=float, default=4800.0,
                    help="HBM bandwidth, GB/s (H200: 4800; H100 SXM: 3350)")
    args = ap.parse_args()
    import torch

    global DEVICE
    DEVICE = args.device
    gpu = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "none (cpu dry run)"
    report = {"gpu": gpu, "torch": torch.__version__}
    ok = True
    for stage in args.stages.split(","):
        try:
            ok &= {"parity": stage_parity, "decode": stage_decode}[stage](args, report)
        except Exception as e:  # report and go on to the next stage
            ok = False
            report[stage] = log(stage, ok=False, error=repr(e)[-4000:])
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
