"""Generates the llama.cpp parity fixtures of helexa-engine.

Run through scripts/gen-parity-fixtures, which provides the model and a
virtualenv with llama-cpp-python. Writes tokens.json, chats.json and
greedy.json under crates/helexa-engine/tests/fixtures/ (see the README there).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import llama_cpp
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

SEED = 1234
N_THREADS = 2
N_CTX = 8192
MAX_NEW_TOKENS = 48
NEAR_TIE_NATS = 0.5

PROSE = (
    "The lighthouse keeper on the northern island kept two notebooks. In the "
    "first, bound in green cloth, she wrote down the weather every three hours: "
    "the wind's direction and strength, the height of the swell, the colour of "
    "the sky at dawn, and the number of ships that passed within sight of the "
    "lamp. In the second, a cheap school exercise book with a torn cover, she "
    "wrote down everything else. There were recipes for bread that would rise "
    "in a cold kitchen, lists of birds that arrived in spring and left before "
    "the first autumn gales, and long arguments with herself about whether the "
    "old foghorn should be repaired or replaced. Visitors were rare. A supply "
    "boat came every second Thursday, weather permitting, carrying flour, lamp "
    "oil, letters, and occasionally a newspaper that was already nine days old. "
    "The skipper, a patient man who had sailed those waters for forty years, "
    "liked to stay for a cup of tea and a slice of whatever she had baked. They "
    "talked about tides and prices and the people on the mainland, and he always "
    "left before the light began to fade. One winter the boat did not come for "
    "five weeks. Storm after storm rolled in from the west, and the sea around "
    "the rocks turned white and loud. She rationed the flour, then the sugar, "
    "then the candles, and kept the great lamp burning every night because that "
    "was the one thing that could not be rationed. When the weather finally "
    "broke, the skipper arrived with twice the usual cargo and an apology for "
    "storms he had not caused. She laughed, made tea with the last of the old "
    "leaves, and showed him the second notebook for the first time. He read it "
    "slowly, page by page, while the kettle sang on the stove. Years later, when "
    "the lighthouse was automated and the keeper's cottage stood empty, a "
    "historian from the university found both notebooks in a tin box under the "
    "floorboards. The weather log was precise, neat, and useful to scientists "
    "studying the climate of the coast. The exercise book was messy, funny, and "
    "full of small observations that nobody had asked for: the way gulls stood "
    "facing into the wind, the smell of the rocks after rain, the exact moment "
    "each evening when the lamp became brighter than the sky. The historian "
    "published the first notebook in a journal. The second one she kept on her "
    "own desk, and she read a page of it whenever the work felt heavy, because "
    "it reminded her that careful attention is a kind of kindness, and that "
    "somebody, somewhere, is always keeping the light on."
)

TOKEN_CASES: list[tuple[str, str]] = [
    ("ascii_sentence", "The quick brown fox jumps over the lazy dog."),
    ("ascii_question", "What is the capital of France?"),
    ("leading_space", " hello world"),
    ("leading_spaces", "   indented by three"),
    ("trailing_spaces", "trailing spaces   "),
    ("only_spaces", "     "),
    ("newlines", "line one\nline two\n\nline four\n"),
    ("crlf", "windows\r\nline endings\r\n"),
    ("numbers", "12345 and 3.14159 and -0.001 and 1,000,000 and 2024-06-30"),
    ("long_number", "98765432109876543210"),
    ("code_python", "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n    return a + b\n\nprint(add(2, 3))\n"),
    ("code_tabs", "int main(void) {\n\tfor (int i = 0; i < 10; i++) {\n\t\tprintf(\"%d\\n\", i);\n\t}\n\treturn 0;\n}\n"),
    ("code_rust", "fn main() {\n    let v: Vec<u32> = (0..8).map(|x| x * x).collect();\n    println!(\"{v:?}\");\n}"),
    ("json", "{\"name\": \"helexa\", \"tags\": [\"llm\", \"rust\"], \"ok\": true, \"n\": null}"),
    ("emoji", "I love pizza 🍕 and rockets 🚀!"),
    ("emoji_zwj", "family 👨‍👩‍👧‍👦, technologist 👩🏽‍💻, rainbow flag 🏳️‍🌈"),
    ("emoji_only", "😀😃😄😁"),
    ("cjk_chinese", "我们今天去公园散步，天气很好。"),
    ("cjk_japanese", "東京は日本の首都です。ひらがなとカタカナ。"),
    ("korean", "안녕하세요, 만나서 반갑습니다."),
    ("arabic", "مرحبا بالعالم، كيف حالك اليوم؟"),
    ("accented_latin", "Crème brûlée, naïve façade, São Paulo, Zürich, Łódź, Ærøskøbing."),
    ("cyrillic_greek", "Привет, мир! Καλημέρα κόσμε."),
    ("special_chatml", "<|im_start|>user\nHi<|im_end|>"),
    ("special_full_chat", "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"),
    ("special_endoftext", "end of document<|endoftext|>start of next"),
    ("special_adjacent", "<|im_end|><|im_start|><|endoftext|>"),
    ("mixed_punctuation", "Wait... what?! (Really?) [yes] {no} <maybe> #tag @user $5 100% a&b"),
    ("url_email", "See https://example.com/path?q=1&r=two#frag or mail someone@example.org."),
    ("repeated_chars", "aaaaaaaaaaaaaaaaaaaaaaaa ------------ ============"),
    ("contractions", "I'm sure you'll see it's what they'd've wanted, isn't it?"),
    ("prose_2500", PROSE),
]

CHAT_CASES: list[tuple[str, list[dict[str, str]]]] = [
    ("single_user", [
        {"role": "user", "content": "What is the capital of France?"},
    ]),
    ("system_user", [
        {"role": "system", "content": "You are a terse assistant. Answer in one word."},
        {"role": "user", "content": "Name a primary colour."},
    ]),
    ("multi_turn", [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hi! Can you count to three?"},
        {"role": "assistant", "content": "Sure: one, two, three."},
        {"role": "user", "content": "Now backwards, please."},
    ]),
    ("multi_turn_no_system", [
        {"role": "user", "content": "Remember the number 42."},
        {"role": "assistant", "content": "Got it, 42."},
        {"role": "user", "content": "What number did I ask you to remember?"},
    ]),
    ("unicode_and_whitespace", [
        {"role": "user", "content": "  Translate 'good morning' into 日本語 and Français 🙂\n\nThanks!  "},
    ]),
]

def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def gguf_bool(v: str | None) -> bool | None:
    """llama-cpp-python gives GGUF metadata values as strings."""
    return None if v is None else v.strip().lower() == "true"


def meta_block(llm: Llama, model_path: Path, sha: str) -> dict:
    md = llm.metadata
    return {
        "generator": "scripts/gen-parity-fixtures",
        "llama_cpp_python_version": llama_cpp.__version__,
        "model_file": model_path.name,
        "gguf_sha256": sha,
        "n_vocab": llm.n_vocab(),
        "bos_token_id": llm.token_bos(),
        "eos_token_id": llm.token_eos(),
        "gguf_add_bos_token": gguf_bool(md.get("tokenizer.ggml.add_bos_token")),
        "gguf_add_eos_token": gguf_bool(md.get("tokenizer.ggml.add_eos_token")),
    }


def token_text(llm: Llama, tid: int) -> str:
    return llm.detokenize([tid], special=True).decode("utf-8", errors="replace")


def gen_tokens(llm: Llama, meta: dict) -> dict:
    cases = []
    for name, text in TOKEN_CASES:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        ids_bos = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        cases.append({
            "name": name,
            "text": text,
            "add_bos": False,
            "special": True,
            "ids": ids,
            "ids_add_special": ids_bos,
        })
    return {
        **meta,
        "description": (
            "llama.cpp tokenization: ids = llm.tokenize(text.encode(), add_bos=False, "
            "special=True); ids_add_special = the same with add_bos=True (llama.cpp "
            "adds BOS only if the GGUF asks for it)."
        ),
        "cases": cases,
    }


def make_formatter(llm: Llama) -> Jinja2ChatFormatter:
    template = llm.metadata["tokenizer.chat_template"]
    return Jinja2ChatFormatter(
        template=template,
        eos_token=token_text(llm, llm.token_eos()),
        bos_token=token_text(llm, llm.token_bos()),
        add_generation_prompt=True,
    )


def render(fmt: Jinja2ChatFormatter, messages: list[dict[str, str]]) -> str:
    return fmt(messages=messages).prompt


def gen_chats(llm: Llama, meta: dict) -> dict:
    fmt = make_formatter(llm)
    cases = []
    for name, messages in CHAT_CASES:
        prompt = render(fmt, messages)
        ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        cases.append({
            "name": name,
            "messages": messages,
            "add_generation_prompt": True,
            "prompt": prompt,
            "ids": ids,
            "n_tokens": len(ids),
        })
    return {
        **meta,
        "description": (
            "Chats rendered with the GGUF's tokenizer.chat_template by "
            "llama_cpp.llama_chat_format.Jinja2ChatFormatter (jinja2 sandbox, "
            "trim_blocks, lstrip_blocks, add_generation_prompt=True); ids = "
            "llm.tokenize(prompt.encode(), add_bos=False, special=True)."
        ),
        "chat_template": llm.metadata["tokenizer.chat_template"],
        "cases": cases,
    }


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def greedy(llm: Llama, prompt_ids: list[int], eog: set[int]) -> list[dict]:
    llm.reset()
    llm.eval(prompt_ids)
    steps = []
    for _ in range(MAX_NEW_TOKENS):
        logits = np.array(llm.scores[llm.n_tokens - 1], copy=True)
        lp = log_softmax(logits)
        top2 = np.argsort(-lp, kind="stable")[:2]
        tid = int(top2[0])
        steps.append({
            "id": tid,
            "text": token_text(llm, tid),
            "logprob": float(lp[tid]),
            "second_id": int(top2[1]),
            "second_logprob": float(lp[top2[1]]),
            "margin": float(lp[tid] - lp[top2[1]]),
        })
        if tid in eog:
            break
        llm.eval([tid])
    return steps


def agreed_text(llm: Llama, ids: list[int]) -> str:
    """llama.cpp's text of ids, cut before a trailing incomplete UTF-8 sequence."""
    raw = llm.detokenize(ids)
    for cut in range(4):
        try:
            return raw[: len(raw) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return raw.decode("utf-8", errors="replace")


def gen_greedy(llm: Llama, meta: dict, cases: list[tuple[str, list[dict[str, str]] | str]]) -> dict:
    fmt = make_formatter(llm)
    eog = {i for i in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(llm._model.vocab, i)}
    out = []
    for name, spec in cases:
        messages = spec if isinstance(spec, list) else None
        prompt = render(fmt, spec) if messages is not None else spec
        ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        steps = greedy(llm, ids, eog)
        ids_ = [s["id"] for s in steps]
        agreed = len(steps)
        for i, s in enumerate(steps):
            if s["margin"] < NEAR_TIE_NATS:
                agreed = i
                break
        out.append({
            "name": name,
            "messages": messages,
            "prompt": prompt,
            "prompt_ids": ids,
            "n_prompt_tokens": len(ids),
            "steps": steps,
            "ids": [s["id"] for s in steps],
            "ended_with_eog": bool(steps) and steps[-1]["id"] in eog,
            "agreed_prefix_len": agreed,
            "agreed_text": agreed_text(llm, [t for t in ids_[:agreed] if t not in eog]),
            "text": llm.detokenize([s["id"] for s in steps if s["id"] not in eog]).decode("utf-8", errors="replace"),
        })
        print(f"greedy {name}: {len(steps)} steps, agreed prefix {agreed}, min margin "
              f"{min(s['margin'] for s in steps):.3f}: {out[-1]['text']!r}", file=sys.stderr)
    return {
        **meta,
        "description": (
            "prompt is a chat rendered as in chats.json (messages set) or raw text "
            "(messages null); prompt_ids = its tokens (add_bos=False, special=True). "
            "Greedy decoding (argmax of llama.cpp's raw logits, no penalties) of up to "
            f"{MAX_NEW_TOKENS} tokens after prompt_ids, stopping after an end-of-generation "
            "token (which is included in steps/ids). Each step has the chosen id, its "
            "log-softmax logprob, the runner-up and the margin in nats. agreed_prefix_len "
            f"is the number of steps before the first with margin < {NEAR_TIE_NATS}: an "
            "implementation should match ids[:agreed_prefix_len] exactly. agreed_text is "
            "llama.cpp's detokenization of those ids (end-of-generation ids left out, a "
            "trailing incomplete UTF-8 sequence cut off)."
        ),
        "near_tie_nats": NEAR_TIE_NATS,
        "max_new_tokens": MAX_NEW_TOKENS,
        "eog_token_ids": sorted(eog),
        "cases": out,
    }


# Prompts for greedy generation: chats (rendered with the chat template) or raw
# text, chosen so that llama.cpp's top-2 margins stay wide for many steps.
GREEDY_CASES: list[tuple[str, list[dict[str, str]] | str]] = [
    ("chat_count_to_twenty", [
        {"role": "user", "content": "Count from 1 to 20."},
    ]),
    ("chat_repeat_proverb", [
        {"role": "user", "content": "Repeat this sentence exactly: The early bird catches the worm, "
                                    "but the second mouse gets the cheese."},
    ]),
    ("chat_repeat_fox", [
        {"role": "user", "content": "Repeat this sentence exactly: The quick brown fox jumps over the lazy dog."},
    ]),
    ("chat_factorial_code", [
        {"role": "user", "content": "Write a Python function that computes the factorial of n recursively."},
    ]),
    ("chat_capital_of_france", [
        {"role": "user", "content": "What is the capital of France?"},
    ]),
    ("raw_counting", "Here are the numbers from 1 to 100, separated by commas: 1, 2, 3, 4, 5,"),
    ("raw_letters", "a, b, c, d, e, f, g,"),
]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", choices=["tokens", "chats", "greedy"], action="append")
    args = ap.parse_args()
    model_path = Path(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sha = sha256_of(model_path)
    llm = Llama(
        model_path=str(model_path),
        n_ctx=N_CTX,
        n_threads=N_THREADS,
        n_threads_batch=N_THREADS,
        logits_all=True,
        seed=SEED,
        verbose=False,
    )
    meta = meta_block(llm, model_path, sha)
    only = set(args.only or ["tokens", "chats", "greedy"])
    jobs = {
        "tokens": lambda: gen_tokens(llm, meta),
        "chats": lambda: gen_chats(llm, meta),
        "greedy": lambda: gen_greedy(llm, meta, GREEDY_CASES),
    }
    for name in ["tokens", "chats", "greedy"]:
        if name not in only:
            continue
        data = jobs[name]()
        path = out / f"{name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
