"""GGUF export (backend/gguf.py, backend/export.py) checked by llama.cpp itself through llama-cpp-python.

What each test proves, on the tiny model's export and on a LoRA run's merged export:
- the f16 GGUF's logits over a chat-templated sequence equal the HF export's (relative max error <= 1e-2);
- q8_0's greedy tokens agree with HF's at >= 95% of 200 positions;
- llama.cpp chatting with the GGUF's own template stops at <|eot_id|> exactly where HF's generate stops, and the
  Modelfile names the stop tokens;
- a corrupted vocabulary (a special token renamed in tokenizer.json) is refused with a message naming it, and a
  wrong pre-tokenizer is refused because llama.cpp then tokenizes the sample conversations differently from HF;
- ``python -m backend.export`` and ``training.export.formats: [hf, gguf]`` write the file (LoRA run: merged model).

Needs llama-cpp-python and llama.cpp's converter (``bash scripts/dev.sh test`` installs both); skipped otherwise.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backend import ROOT, TINY_MODEL

if os.environ.get("CI", "").lower() == "true":  # CI installs both (scripts/dev.sh): missing is a failure there
    import llama_cpp  # noqa: F401
llama_cpp = pytest.importorskip("llama_cpp")
from backend.gguf import GGUFError, converter_dir, export_gguf, sample_texts  # noqa: E402

try:
    converter_dir()
except FileNotFoundError as e:
    if os.environ.get("CI", "").lower() == "true":
        raise
    pytest.skip(str(e), allow_module_level=True)

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

EOT = "<|eot_id|>"


def hf_logits(hf_dir, ids: list[int]) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]  # (L, V)


def gguf_logits(path, ids: list[int]) -> torch.Tensor:
    llm = llama_cpp.Llama(str(path), n_ctx=512, logits_all=True, verbose=False, n_threads=1)
    llm.eval(ids)
    return torch.tensor(llm.scores[: len(ids)])  # (L, V)


def templated_ids(hf_dir, n_tokens: int) -> list[int]:
    """Chat-templated sample conversations, concatenated, cut to n_tokens (starts with <|begin_of_text|>)."""
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = []
    for text in sample_texts(tok, n=40):
        ids += tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens:
            break
    return ids[:n_tokens]


def assert_matches_hf(hf_dir):
    """f16 logits within 1e-2 relative and q8_0 greedy agreement >= 95% over 200 templated positions."""
    ids = templated_ids(hf_dir, 200)
    want = hf_logits(hf_dir, ids)
    f16 = export_gguf(hf_dir, "f16")
    got = gguf_logits(f16, ids)
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel <= 1e-2, f"f16 GGUF logits differ from HF by {rel:.2e} relative"
    q8 = export_gguf(hf_dir, "q8_0")
    agree = (gguf_logits(q8, ids).argmax(-1) == want.argmax(-1)).float().mean().item()
    assert agree >= 0.95, f"q8_0 greedy tokens agree with HF at {agree:.1%} of 200 positions"
    return f16, q8


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    hf_dir = tmp_path_factory.mktemp("gguf") / "final"
    shutil.copytree(TINY_MODEL, hf_dir)
    return hf_dir


def test_f16_logits_and_q8_greedy_tokens_match_the_hf_export(tiny_export):
    f16, q8 = assert_matches_hf(tiny_export)
    assert q8.stat().st_size < f16.stat().st_size
    modelfile = (tiny_export / "gguf" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-q8_0.gguf\n")
    assert f'PARAMETER stop "{EOT}"' in modelfile


def chain_model(src, dst) -> tuple[list[int], int]:
    """The tiny model with an untied head rewired so that greedy decoding after the generation prompt writes two
    chosen tokens and then <|eot_id|> (each token's embedding lights one hidden unit; the head reads it).
    Returns (the two tokens, the prompt's last token)."""
    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(dst)
    model = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, return_dict=True)
    prompt_end = prompt["input_ids"][-1]
    a, b = 300, 301  # two ordinary (non-special) tokens of the 1000-token BPE
    eot = tok.convert_tokens_to_ids(EOT)
    emb = model.get_input_embeddings().weight.detach().clone()
    head = emb.clone()
    with torch.no_grad():
        for unit, (now, then) in enumerate([(prompt_end, a), (a, b), (b, eot)]):
            emb[now, unit] = 5.0
            head[then, unit] = 50.0
        model.config.tie_word_embeddings = False
        model.get_input_embeddings().weight.copy_(emb)
        model.lm_head.weight = torch.nn.Parameter(head)
    model.save_pretrained(dst)
    return [a, b], prompt_end


def test_llama_cpp_chat_with_the_exported_template_stops_at_end_of_turn(tmp_path):
    hf_dir = tmp_path / "run" / "export" / "final"  # laid out as a run's export, so the studio lists it
    (a, b), _ = chain_model(TINY_MODEL, hf_dir)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    messages = [{"role": "user", "content": "hi"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    hf_new = model.generate(**prompt, max_new_tokens=10, do_sample=False)[0, prompt["input_ids"].shape[1] :]
    assert hf_new.tolist() == [a, b, tok.convert_tokens_to_ids(EOT)]  # HF stops at <|eot_id|> (generation_config)

    path = export_gguf(hf_dir, "f16")
    llm = llama_cpp.Llama(str(path), n_ctx=256, verbose=False, n_threads=1)
    out = llm.create_chat_completion(messages, max_tokens=10, temperature=0.0)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop"  # not "length": llama.cpp stopped by itself at the end of turn
    assert out["usage"]["completion_tokens"] <= 3
    assert choice["message"]["content"] == tok.decode([a, b])
    assert llm._model.token_eot() == tok.convert_tokens_to_ids(EOT)  # tokenizer.ggml.eot_token_id

    # the studio: the export panel converts and reports size and path; the Chat tab lists the GGUF and chats with
    # it through llama.cpp, stopping where HF stops
    from studio import export_panel
    from studio import handlers as H

    stages = []
    line = export_panel.on_export_gguf(str(hf_dir), "q8_0", "", progress=lambda f, desc="": stages.append(f))
    q8 = hf_dir / "gguf" / "model-q8_0.gguf"
    assert str(q8) in line and export_panel.human_size(q8.stat().st_size) in line
    assert stages[0] == 0.0 and stages[-1] == 1.0 and stages == sorted(stages)
    assert str(path) in H.chat_models(str(tmp_path))
    replies = list(H.chat_stream(str(path), [], "hi", "", max_new_tokens=10))
    assert replies[-1] == tok.decode([a, b])


def test_a_corrupted_vocabulary_is_refused_naming_the_token(tmp_path):
    hf_dir = tmp_path / "final"
    shutil.copytree(TINY_MODEL, hf_dir)
    path = export_gguf(hf_dir, "q8_0")
    # the HF tokenizer of this export renames <|eot_id|>: the GGUF written before no longer matches it
    tokenizer = json.loads((hf_dir / "tokenizer.json").read_text())
    for added in tokenizer["added_tokens"]:
        if added["content"] == EOT:
            added["content"] = "<|eot|>"
    (hf_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    from backend.gguf import check_gguf

    with pytest.raises(GGUFError, match=r"special token <\|eot\|> \(id 1001\) is '<\|eot_id\|>' in the GGUF"):
        check_gguf(path, hf_dir)


def test_a_wrong_pre_tokenizer_is_refused_by_llama_cpps_own_tokenization(tmp_path, monkeypatch):
    import backend.gguf

    hf_dir = tmp_path / "final"
    shutil.copytree(TINY_MODEL, hf_dir)
    monkeypatch.setattr(backend.gguf, "GPT2_PRE", "llama-bpe")  # a plausible but wrong choice for this BPE
    with pytest.raises(GGUFError, match=r"llama.cpp tokenizes a sample conversation differently .* at token \d+"):
        export_gguf(hf_dir, "f16")
    assert not (hf_dir / "gguf" / "model-f16.gguf").exists()  # kept aside as model-f16.gguf.rejected


def test_export_cli_refuses_a_run_without_an_export_naming_it(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "backend.export", str(tmp_path), "--gguf"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert f"{tmp_path}/export/final is not a finished Hugging Face export" in proc.stderr


def test_lora_run_exports_its_merged_model_as_gguf(data, tmp_path):
    from backend.train import train
    from tests.test_lora import TINY_TRAIN, overrides

    run_dir = tmp_path / "exp"
    train(TINY_TRAIN, overrides(data, run_dir, **{"training.train_iters": 3, "training.export.formats": "[hf,gguf]"}))
    hf_dir = run_dir / "export" / "final"
    converted = [e for e in map(json.loads, (run_dir / "events.jsonl").read_text().splitlines())]
    (event,) = [e for e in converted if e["event"] == "converted"]
    assert Path(event["gguf"]) == hf_dir / "gguf" / "model-q8_0.gguf"
    assert Path(event["gguf"]).is_file()
    assert not (hf_dir / "adapter" / "config.json").exists()  # hf_dir is the merged model, adapter/ beside it
    assert_matches_hf(hf_dir)
    # it stops where the HF export stops: llama.cpp's end-of-turn token and Ollama's stop are <|eot_id|>
    eot = AutoTokenizer.from_pretrained(hf_dir).convert_tokens_to_ids(EOT)
    llm = llama_cpp.Llama(event["gguf"], n_ctx=256, verbose=False, n_threads=1)
    assert llm._model.token_eot() == eot
    modelfile = (hf_dir / "gguf" / "Modelfile").read_text()
    assert f"PARAMETER stop {json.dumps(EOT)}" in modelfile
    assert "SYSTEM" not in modelfile  # the sample data's rows use several system prompts (or none): no single one
    proc = subprocess.run(
        [sys.executable, "-m", "backend.export", str(run_dir), "--gguf", "--quant", "q4_k_m"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["gguf"] == str(hf_dir / "gguf" / "model-q4_k_m.gguf")


def test_a_failed_conversion_leaves_no_partial_file(tmp_path, monkeypatch):
    import backend.gguf as G

    def broken(hf_dir, out, outtype):
        Path(out).write_bytes(b"partial")
        raise GGUFError("converter crashed")

    monkeypatch.setattr(G, "_run_converter", broken)
    out = tmp_path / "gguf" / "model-q4_k_m.gguf"
    with pytest.raises(GGUFError):
        G.convert(TINY_MODEL, out, "q4_k_m")
    assert list(out.parent.iterdir()) == []
