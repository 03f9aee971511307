"""What transformers' apply_chat_template renders for the official chat
templates in crates/helexa-engine/tests/fixtures/templates/*.jinja (Gemma 2,
Gemma 3, Phi-3, Qwen3), on a tokenizer built locally (no hub access): a
word-level tokenizer.json with the model's special tokens. Run by
scripts/gen-template-fixtures."""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SYSTEM = {"role": "system", "content": "You are terse.  "}
USER = {"role": "user", "content": "  What is the capital of France?\n"}
ASSISTANT = {"role": "assistant", "content": "Paris."}
FOLLOW = {"role": "user", "content": "And of Italy?"}

# (template, bos, eos, case name, messages, add_generation_prompt, kwargs)
CASES = [
    ("gemma3", "<bos>", "<eos>", "system_user_assistant_user", [SYSTEM, USER, ASSISTANT, FOLLOW], True, {}),
    ("gemma3", "<bos>", "<eos>", "user_only", [USER], True, {}),
    ("gemma3", "<bos>", "<eos>", "no_generation_prompt", [SYSTEM, USER, ASSISTANT], False, {}),
    ("gemma3", "<bos>", "<eos>", "roles_must_alternate", [USER, USER], True, {}),
    ("gemma2", "<bos>", "<eos>", "user_assistant_user", [USER, ASSISTANT, FOLLOW], True, {}),
    ("gemma2", "<bos>", "<eos>", "system_refused", [SYSTEM, USER, ASSISTANT, FOLLOW], True, {}),
    ("phi3", "<s>", "<|endoftext|>", "system_user_assistant_user", [SYSTEM, USER, ASSISTANT, FOLLOW], True, {}),
    ("phi3", "<s>", "<|endoftext|>", "no_generation_prompt", [SYSTEM, USER, ASSISTANT], False, {}),
    ("qwen3", None, "<|im_end|>", "system_user_assistant_user", [SYSTEM, USER, ASSISTANT, FOLLOW], True, {}),
    ("qwen3", None, "<|im_end|>", "thinking_off", [SYSTEM, USER, ASSISTANT, FOLLOW], True, {"enable_thinking": False}),
    ("qwen3", None, "<|im_end|>", "last_answer_keeps_its_thinking",
     [SYSTEM, USER, {"role": "assistant", "content": "<think>\nThe capital.\n</think>\n\nParis."}], False, {}),
    ("qwen3", None, "<|im_end|>", "earlier_thinking_dropped",
     [SYSTEM, USER, {"role": "assistant", "content": "<think>\nThe capital.\n</think>\n\nParis."}, FOLLOW], True, {}),
]


def tokenizer(bos, eos, d):
    specials = [t for t in ["<unk>", bos, eos] if t]
    vocab = {t: i for i, t in enumerate(specials)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = Path(d) / "tokenizer.json"
    tok.save(str(path))
    return PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token=bos, eos_token=eos, unk_token="<unk>")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    args = ap.parse_args()
    d = Path(args.dir)
    out = {"transformers": transformers.__version__, "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name, bos, eos, case, messages, gen, kwargs in CASES:
            tok = tokenizer(bos, eos, tmp)
            tok.chat_template = (d / f"{name}.jinja").read_text()
            entry = {"template": name, "case": case, "bos_token": bos, "eos_token": eos,
                     "messages": messages, "add_generation_prompt": gen, "kwargs": kwargs}
            try:
                entry["expected"] = tok.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=gen, **kwargs)
            except Exception as e:  # a template's raise_exception
                entry["error"] = str(e)
            print(f"{name}/{case}: {entry.get('expected', entry.get('error'))!r}", file=sys.stderr)
            out["cases"].append(entry)
    (d / "expected.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
