"""Shared builders for the benchmarks: a deterministic synthetic chat corpus, an 8k byte-level BPE Llama-3 tokenizer,
a small random Llama model, and the machine's fp32 matmul rate. Imported by bench/peers.py; not a command itself.

Everything is a pure function of its arguments (seeded), built locally, nothing downloaded:

    >>> rows = synthetic_conversations(3, seed=0)
    >>> rows[0]["messages"][0]["role"], sorted(rows[0])
    ('system', ['id', 'messages'])

Lengths are long-tailed like real multi-turn chat data (FACTS.md "Peer baselines"): the target length of a
conversation is lognormal with median ~300 tokens and sigma 0.75 (p99 ~1,500); 1-4 user/assistant exchanges; the
assistant writes ~70% of the words.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "assets"
LLAMA31_TEMPLATE = ASSETS / "tiny-llama" / "chat_template.jinja"
# The same Llama 3.1 template with {% generation %} around each assistant reply (content + <|eot_id|>):
# what TRL's assistant_only_loss=True needs.
LLAMA31_GENERATION_TEMPLATE = ASSETS / "tokenizers" / "llama-generation" / "chat_template.jinja"

# Model shapes. "small" is FACTS.md's peer-baseline model (5.0M parameters with the 8k vocabulary), so the figures
# here are comparable to the targets there. "llama3-8b" is Llama-3.1-8B's shape (GPU only, see bench/README.md).
SHAPES = {
    "tiny": dict(
        hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    "small": dict(
        hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
    ),
    "llama3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8
    ),
}

_SYLLABLES = (
    "ka ri to na me lo su pa ve di mo ra ne ti lu sa po ke mi da go re ni fa ju ko be zu wa yo "
    "an el is or um ar en ol ir us"
).split()
_SYSTEM = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer briefly and precisely.",
    "You are an expert tutor who explains step by step.",
    "",
]


def _lexicon(n: int, rng: random.Random) -> list[str]:
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((1, 2, 2, 3, 3, 4)))))
    return sorted(words)


def _text(n_words: int, lexicon: list[str], weights: list[float], rng: random.Random) -> str:
    words = rng.choices(lexicon, weights=weights, k=max(1, n_words))
    out, sentence = [], 0
    for w in words:
        out.append(w.capitalize() if sentence == 0 else w)
        sentence += 1
        if sentence > 4 and rng.random() < 0.12:
            out[-1] += "." if rng.random() < 0.8 else "?"
            sentence = 0
    return " ".join(out) + "."


def synthetic_conversations(n: int, seed: int = 0, median_tokens: float = 300.0, sigma: float = 0.75) -> list[dict]:
    """n OpenAI-style rows {"id", "messages": [{"role", "content"}...]}, deterministic in (n, seed).

    Words come from a Zipf-weighted lexicon of 3,000 pseudo-words (about 1.3 BPE tokens each after the 8k
    tokenizer, plus ~40 tokens of template overhead), so the rendered length tracks the lognormal target.
    """
    rng = random.Random(seed)
    lexicon = _lexicon(3000, rng)
    weights = [1.0 / (k + 1) ** 1.07 for k in range(len(lexicon))]
    rows = []
    for i in range(n):
        target = median_tokens * math.exp(rng.gauss(0.0, sigma))
        turns = rng.choices((1, 2, 3, 4), weights=(4, 3, 2, 1))[0]
        words = max(8, int((target - 40 - 10 * turns) / 1.3))
        messages = []
        system = rng.choice(_SYSTEM)
        if system:
            messages.append({"role": "system", "content": system})
        for _t in range(turns):
            share = words / turns
            messages.append({"role": "user", "content": _text(int(share * 0.3) + 2, lexicon, weights, rng)})
            messages.append({"role": "assistant", "content": _text(int(share * 0.7) + 2, lexicon, weights, rng)})
        rows.append({"id": f"syn-{seed}-{i:06d}", "messages": messages})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    """Write rows as JSON lines; an identical existing file is left untouched (backend.prepare's cache keys on the
    input file, so rewriting the same content would force a needless re-prepare)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if path.exists() and path.read_text() == text:
        return path
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def _build_assets_module():
    spec = importlib.util.spec_from_file_location("sft_build_assets", ASSETS / "build_assets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_tokenizer(rows: list[dict], vocab_size: int = 8000):
    """Byte-level BPE (vocab_size before specials) trained on the rows' text, wrapped like assets/tiny-llama:
    Llama-3 special tokens, BOS post-processor, the Llama 3.1 chat template (assets/tiny-llama/chat_template.jinja).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    ba = _build_assets_module()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ba.GENERIC_ENGLISH.splitlines() + _SYSTEM[:-1] + [m["content"] for r in rows for m in r["messages"]]
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = ba.make_tokenizer(tok.to_str(), "tiny-llama")
    fast.chat_template = LLAMA31_TEMPLATE.read_text()
    return fast


def llama_config(shape: str, vocab_size: int, tokenizer=None, max_positions: int = 131072, layers: int | None = None):
    from transformers import LlamaConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown --model-shape {shape!r}; use one of {', '.join(SHAPES)}")
    extra = {}
    if tokenizer is not None:
        extra = dict(
            bos_token_id=tokenizer.bos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"]),
        )
    return LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        tie_word_embeddings=shape != "llama3-8b",
        use_cache=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        **{**SHAPES[shape], **({"num_hidden_layers": layers} if layers else {})},
        **extra,
    )


def build_model_dir(
    out: Path, rows: list[dict], shape: str = "small", vocab_size: int = 8000, seed: int = 0, layers: int | None = None
) -> dict:
    """Tokenizer + random Llama saved together in `out` (a HF model directory every contestant loads, so all start
    from the same weights). Reused when `out/BUILD.json` matches the arguments. Returns BUILD.json's content."""
    import torch
    from transformers import LlamaForCausalLM

    out = Path(out)
    key = {
        "shape": shape,
        "vocab_size": vocab_size,
        "seed": seed,
        "rows": len(rows),
        "layers": layers,
        "first_id": rows[0]["id"] if rows else None,
    }
    done = out / "BUILD.json"
    if done.exists() and json.loads(done.read_text()).get("key") == key:
        return json.loads(done.read_text())
    tok = build_tokenizer(rows, vocab_size)
    torch.manual_seed(seed)
    # Llama-3.1-8B's embedding has 128,256 rows whatever our small BPE learned (the extra rows are never indexed
    # but cost what they cost in the LM head)
    vocab = max(len(tok), 128256) if shape == "llama3-8b" else len(tok)
    model = LlamaForCausalLM(llama_config(shape, vocab, tok, layers=layers))
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    info = {"key": key, "num_parameters": sum(p.numel() for p in model.parameters()), "vocab": len(tok)}
    (tmp / "BUILD.json").write_text(json.dumps(info))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return info


def matmul_peak_flops(n: int = 1024, seconds: float = 2.0, dtype=None, device: str = "cpu") -> float:
    """Sustained dense matmul rate (FLOP/s) with the current torch thread count: median of ~10 timed batches."""
    import statistics

    import torch

    dtype = dtype or torch.float32
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    t0 = time.perf_counter()
    a @ b
    sync()
    one = max(time.perf_counter() - t0, 1e-6)
    reps = max(1, int(seconds / 10 / one))
    rates = []
    for _ in range(10):
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        rates.append(2 * n**3 * reps / (time.perf_counter() - t0))
    return statistics.median(rates)


def percentile(values, q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values), q)) if len(values) else float("nan")
