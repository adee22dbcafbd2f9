"""Tests for the committed assets built by assets/build_assets.py.

    .venv/bin/pytest tests/test_assets.py -x -q

They pin the exact text each family's chat template produces (hand-written expected strings), the tokenizer
traps the rest of the code base must handle (double BOS), and the shape of the sample data.
"""

import json
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may come from a hub: everything loads from assets/

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TINY = ASSETS / "tiny-llama"
TOKS = ASSETS / "tokenizers"
FAMILIES = ["chatml", "gemma", "mistral", "phi3", "llama-generation"]

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5."},
    {"role": "user", "content": "Reverse the words: red blue"},
    {"role": "assistant", "content": "Reversed: blue red"},
    {"role": "user", "content": "Uppercase this word: tiger"},
]

LLAMA_SYS = (
    "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
)
LLAMA_EXPECTED = (
    "<|begin_of_text|>" + LLAMA_SYS + "Be brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 3?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n2 + 3 = 5.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nReverse the words: red blue<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nReversed: blue red<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nUppercase this word: tiger<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)

FAMILY_EXPECTED = {
    "chatml": (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n2 + 3 = 5.<|im_end|>\n"
        "<|im_start|>user\nReverse the words: red blue<|im_end|>\n<|im_start|>assistant\nReversed: blue red<|im_end|>\n"
        "<|im_start|>user\nUppercase this word: tiger<|im_end|>\n<|im_start|>assistant\n"
    ),
    "gemma": (
        "<bos><start_of_turn>user\nBe brief.\n\nWhat is 2 + 3?<end_of_turn>\n<start_of_turn>model\n2 + 3 = 5.<end_of_turn>\n"
        "<start_of_turn>user\nReverse the words: red blue<end_of_turn>\n<start_of_turn>model\nReversed: blue red<end_of_turn>\n"
        "<start_of_turn>user\nUppercase this word: tiger<end_of_turn>\n<start_of_turn>model\n"
    ),
    # Mistral has no assistant header: the generation prompt is empty and [/INST] closes the user turn.
    "mistral": (
        "<s> [INST] Be brief.\n\nWhat is 2 + 3? [/INST] 2 + 3 = 5.</s>"
        " [INST] Reverse the words: red blue [/INST] Reversed: blue red</s>"
        " [INST] Uppercase this word: tiger [/INST]"
    ),
    "phi3": (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nWhat is 2 + 3?<|end|>\n<|assistant|>\n2 + 3 = 5.<|end|>\n"
        "<|user|>\nReverse the words: red blue<|end|>\n<|assistant|>\nReversed: blue red<|end|>\n"
        "<|user|>\nUppercase this word: tiger<|end|>\n<|assistant|>\n"
    ),
    "llama-generation": LLAMA_EXPECTED,
}

FAMILY_SPECIALS = {
    "tiny-llama": [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<|finetune_right_pad_id|>",
    ],
    "chatml": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
    "gemma": ["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"],
    "mistral": ["<s>", "</s>"],
    "phi3": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"],
    "llama-generation": ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
}


def _dir(family):
    return TINY if family == "tiny-llama" else TOKS / family


@pytest.fixture(scope="module")
def tiny_tok():
    return AutoTokenizer.from_pretrained(TINY)


def test_tiny_model_loads_and_generates(tiny_tok):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(TINY)
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    assert model.config.vocab_size == len(tiny_tok)
    assert set(model.generation_config.eos_token_id) == set(
        tiny_tok.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])
    )
    n_params = sum(p.numel() for p in model.parameters())
    assert 200_000 < n_params < 2_000_000
    enc = tiny_tok.apply_chat_template(CONV, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert out.shape[1] == enc["input_ids"].shape[1] + 5
    assert torch.equal(out[0, : enc["input_ids"].shape[1]], enc["input_ids"][0])


def test_asset_sizes():
    size = sum(p.stat().st_size for p in TINY.rglob("*") if p.is_file())
    assert size < 5 * 2**20
    data = sum(p.stat().st_size for p in (ASSETS / "data").glob("*.jsonl"))
    assert data < 3 * 2**20


def test_llama_template_exact_layout_with_system(tiny_tok):
    assert tiny_tok.apply_chat_template(CONV, tokenize=False, add_generation_prompt=True) == LLAMA_EXPECTED
    # Without the generation prompt the text ends right after the last user turn's <|eot_id|>.
    no_gen = tiny_tok.apply_chat_template(CONV, tokenize=False)
    assert no_gen == LLAMA_EXPECTED.removesuffix("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_llama_template_default_system_header(tiny_tok):
    text = tiny_tok.apply_chat_template(CONV[1:3], tokenize=False)
    assert text == (
        "<|begin_of_text|>" + LLAMA_SYS + "<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n2 + 3 = 5.<|eot_id|>"
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_family_layout(family):
    tok = AutoTokenizer.from_pretrained(TOKS / family)
    assert tok.apply_chat_template(CONV, tokenize=False, add_generation_prompt=True) == FAMILY_EXPECTED[family]


def test_chatml_injects_qwen_default_system():
    tok = AutoTokenizer.from_pretrained(TOKS / "chatml")
    text = tok.apply_chat_template(CONV[1:2], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.eos_token == "<|im_end|>" and tok.bos_token is None


def test_phi3_closes_with_eos_without_generation_prompt():
    # The real Phi-3.5 template appends eos_token after the last turn when add_generation_prompt is False,
    # so a rendering of a prefix of the conversation is NOT a prefix of the whole rendering.
    tok = AutoTokenizer.from_pretrained(TOKS / "phi3")
    assert tok.apply_chat_template(CONV[:3], tokenize=False).endswith("2 + 3 = 5.<|end|>\n<|endoftext|>")


def test_generation_markers_cover_assistant_content_and_eot():
    tok = AutoTokenizer.from_pretrained(TOKS / "llama-generation")
    enc = tok.apply_chat_template(CONV[:5], return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    trained = tok.decode([i for i, m in zip(ids, mask, strict=False) if m])
    assert trained == "2 + 3 = 5.<|eot_id|>Reversed: blue red<|eot_id|>"
    # The plain tiny-llama template has no markers: the ids agree, only the mask is missing.
    plain = AutoTokenizer.from_pretrained(TINY).apply_chat_template(CONV[:5], return_dict=True)
    assert plain["input_ids"] == ids


@pytest.mark.parametrize("family", ["tiny-llama", "gemma", "mistral"])
def test_double_bos_trap(family):
    tok = AutoTokenizer.from_pretrained(_dir(family))
    text = tok.apply_chat_template(CONV, tokenize=False)
    assert text.startswith(tok.bos_token)
    once = tok(text, add_special_tokens=False)["input_ids"]
    twice = tok(text)["input_ids"]
    assert once.count(tok.bos_token_id) == 1 and once[0] == tok.bos_token_id
    assert twice[:2] == [tok.bos_token_id, tok.bos_token_id] and twice[1:] == once


@pytest.mark.parametrize("family", list(FAMILY_SPECIALS))
def test_special_tokens_are_single_tokens(family):
    tok = AutoTokenizer.from_pretrained(_dir(family))
    for s in FAMILY_SPECIALS[family]:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == s, (family, s, ids)
        # Inside running text as well (no merge with neighbours).
        ids = tok("x" + s + "y", add_special_tokens=False)["input_ids"]
        assert tok.convert_tokens_to_ids(s) in ids
    # Decoding round-trips plain text (byte-level BPE, no normalisation).
    text = "Reverse the words: Zebra café 42!"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_sample_data_shapes_agree():
    share = _read_jsonl(ASSETS / "data" / "sample_sharegpt.jsonl")
    oai = _read_jsonl(ASSETS / "data" / "sample_openai.jsonl")
    assert 2000 <= len(share) == len(oai)
    role_of = {"system": "system", "human": "user", "gpt": "assistant"}
    n_system = 0
    for s, o in zip(share, oai, strict=False):
        assert set(s) == {"uuid", "conversations", "task_category", "difficulty", "model", "turns"}
        assert set(o) == {"uuid", "messages", "task_category", "difficulty", "model", "turns"}
        assert s["uuid"] == o["uuid"]
        assert [(role_of[m["from"]], m["value"]) for m in s["conversations"]] == [
            (m["role"], m["content"]) for m in o["messages"]
        ]
        conv = [m for m in s["conversations"] if m["from"] != "system"]
        n_system += len(conv) != len(s["conversations"])
        assert [m["from"] for m in conv] == ["human", "gpt"] * s["turns"] and 1 <= s["turns"] <= 3
    assert 0.15 < n_system / len(share) < 0.35
    assert len({s["uuid"] for s in share}) == len(share)


def test_sample_answers_are_correct():
    # Every arithmetic answer in the data is right, so a model that learns it learns the rule.
    share = _read_jsonl(ASSETS / "data" / "sample_sharegpt.jsonl")
    checked = 0
    for row in share:
        for m in row["conversations"]:
            if m["from"] == "gpt" and m["value"].count("=") == 1 and m["value"][0].isdigit():
                lhs, rhs = m["value"].rstrip(".").split(" = ")
                parts = lhs.split()
                if len(parts) == 3 and parts[1] in "+-*":
                    a, op, b = int(parts[0]), parts[1], int(parts[2])
                    assert {"+": a + b, "-": a - b, "*": a * b}[op] == int(rhs), m["value"]
                    checked += 1
    assert checked > 500
