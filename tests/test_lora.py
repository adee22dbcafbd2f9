"""LoRA with PEFT through the training recipe (backend/lora.py), on the tiny model and the shipped sample data.

What each test proves:
- after training, every base weight is bitwise the loaded one and every adapter weight moved; the optimizer held
  only the adapters; the start event reports trainable vs total parameters;
- a checkpoint holds the adapters and their AdamW state only (no base weight), and is small;
- the adapter export loads with PeftModel.from_pretrained(base, path); the merged export loads with
  AutoModelForCausalLM and gives the PEFT model's logits (<= 1e-5, fp32) on packed rows; it keeps the chat template
  and stops at <|eot_id|>; export.merge: no writes step exports as adapters only;
- SIGKILL + restart ends with the same adapters as an uninterrupted run;
- target_modules all-linear = every decoder-layer linear, never the LM head (tied or not);
- rank/alpha/target_modules errors name their key; QLoRA on a machine without CUDA/bitsandbytes is a config error
  naming pretrained.quantization (--validate and train());
- 2 FSDP2 processes with LoRA equal 1 process, and resuming the sharded run from its checkpoint is exact (slow).
"""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backend import ASSETS, ROOT, TINY_MODEL
from backend.checkpoint import latest_complete
from backend.config import ConfigError, load_train_config
from backend.events import read_events
from backend.train import train

TINY_TRAIN = ASSETS / "configs" / "tiny_train.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
LORA = {"model.base_model.peft.type": "lora", "model.base_model.peft.rank": 4, "model.base_model.peft.alpha": 8}


def overrides(data, experiment_dir, **extra) -> list[str]:
    """tiny_train.yaml made small (4 rows of 256 tokens per step, 2 micro-batches) with LoRA r=4 on all-linear."""
    values = {
        "data.datasets.training.path": data / "fast_llm_config_training.yaml",
        "data.datasets.validation.path": data / "fast_llm_config_validation.yaml",
        "run.experiment_dir": experiment_dir,
        "batch.sequence_length": 256,
        "batch.batch_size": 4,
        "batch.micro_batch_size": 2,
        "training.logs.interval": 1,
        "training.evaluations.validation.iterations": 1,
        "training.evaluations.validation.interval": 0,
        "training.checkpoint.interval": 10,
        "optimizer.learning_rate.warmup_iterations": 2,
        "optimizer.learning_rate.base": 1e-2,
        **LORA,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def events_of(run_dir, kind=None) -> list[dict]:
    events, _ = read_events(Path(run_dir) / "events.jsonl")
    return [e for e in events if kind is None or e["event"] == kind]


def adapter_weights(run_dir, name="final") -> dict:
    from safetensors.torch import load_file

    return load_file(Path(run_dir) / "export" / name / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def lora_run(data, tmp_path_factory, monkeypatch_module):
    """8 LoRA steps in this process; the trained model object is kept (captured from backend.lora)."""
    import backend.lora

    captured = {}
    load = backend.lora.load_lora_model

    def capture(cfg, attn_impl, **kwargs):
        model = load(cfg, attn_impl, **kwargs)
        captured["model"] = model
        captured["initial"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return model

    monkeypatch_module.setattr(backend.lora, "load_lora_model", capture)
    run_dir = tmp_path_factory.mktemp("lora") / "exp"
    summary = train(
        TINY_TRAIN,
        overrides(
            data,
            run_dir,
            **{
                "training.train_iters": 8,
                "training.checkpoint.interval": 4,
                "training.export.interval": 4,
                "training.export.merge": False,
            },
        ),
    )
    return run_dir, summary, captured


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_lora_trains_only_the_adapters_and_leaves_the_base_bitwise_unchanged(lora_run):
    from transformers import AutoModelForCausalLM

    run_dir, summary, captured = lora_run
    model, initial = captured["model"], captured["initial"]
    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL).state_dict()
    adapters, frozen = {}, {}
    for name, p in model.named_parameters():
        (adapters if p.requires_grad else frozen)[name] = p
    assert adapters and all(".lora_A." in n or ".lora_B." in n for n in adapters)
    assert not any("lm_head" in n or "embed" in n or "norm" in n for n in adapters)
    for name, p in frozen.items():
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(p, base[key]), f"{name} changed"  # bitwise the pretrained weight
    for name, p in adapters.items():
        assert not torch.equal(p, initial[name]), f"{name} did not move"
    start = events_of(run_dir, "start")[0]
    assert start["peft"] == "lora"
    assert start["trainable_parameters"] == sum(p.numel() for p in adapters.values())
    assert start["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert start["trainable_parameters"] < start["num_parameters"] / 10
    losses = [e["loss"] for e in events_of(run_dir, "train")]
    assert losses[-1] < losses[0], losses


def test_checkpoint_holds_adapters_and_their_optimizer_state_only(lora_run):
    run_dir, _, captured = lora_run
    ckpt = latest_complete(run_dir / "checkpoints")
    state = torch.load(ckpt / "lora_state.pt", weights_only=False)
    trainable = {n for n, p in captured["model"].named_parameters() if p.requires_grad}
    assert set(state["model"]) == trainable
    assert set(state["optimizer"]["state"]) == trainable  # AdamW moments for the adapters, nothing else
    base_bytes = (TINY_MODEL / "model.safetensors").stat().st_size
    ckpt_bytes = sum(f.stat().st_size for f in ckpt.iterdir())
    assert ckpt_bytes < base_bytes / 2, (ckpt_bytes, base_bytes)


def test_exports_adapter_loads_with_peft_and_merged_gives_the_same_logits(lora_run, data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from backend.dataset import TokenDataset
    from backend.packing import PackedSampler, collate

    run_dir, _, _ = lora_run
    final = run_dir / "export" / "final"
    # export.merge: no -> the step export is the adapter only; the final one has both
    assert (run_dir / "export" / "step_000004" / "adapter" / "adapter_config.json").is_file()
    assert not (run_dir / "export" / "step_000004" / "config.json").exists()
    assert events_of(run_dir, "export")[-1]["adapter"] == str(final / "adapter")

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_MODEL), final / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(final).eval()
    assert not any("lora" in k for k in merged.state_dict())
    assert merged.dtype == torch.float32  # the training dtype
    dataset = TokenDataset(data / "fast_llm_config_training.yaml", "training")
    sampler = PackedSampler(dataset.lengths, 256, 1234, "best_fit", 1000, False)
    batch = collate([sampler.row(i) for i in range(2)], dataset, 256)
    assert len(batch["cu_seq_lens_q"]) > 3  # several documents packed per row
    with torch.no_grad():
        inputs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        a = peft_model(**inputs).logits
        b = merged(**inputs).logits
        base = AutoModelForCausalLM.from_pretrained(TINY_MODEL)(**inputs).logits
    assert (a - b).abs().max().item() <= 1e-5
    assert (a - base).abs().max().item() > 1e-3  # the adapters do change the model
    # the merged export is a chat model: the training chat template, generation stops at end of turn
    tokenizer = AutoTokenizer.from_pretrained(final)
    eos = merged.generation_config.eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") in (eos if isinstance(eos, list) else [eos])
    assert "<|start_header_id|>" in tokenizer.chat_template
    assert merged.generation_config.use_cache is not False  # the packed-training setting is not exported
    adapter_tok = AutoTokenizer.from_pretrained(final / "adapter")
    assert adapter_tok.chat_template == tokenizer.chat_template


def test_load_for_inference_takes_adapter_and_merged_exports(lora_run):
    import json

    from backend.lora import is_adapter_dir, load_for_inference

    run_dir, _, _ = lora_run
    final = run_dir / "export" / "final"
    config = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == TINY_MODEL.resolve()
    assert is_adapter_dir(final / "adapter") and not is_adapter_dir(final)
    ids = torch.tensor([[1000, 5, 6, 7, 8]])
    with torch.no_grad():
        a = load_for_inference(final / "adapter").eval()(ids).logits
        b = load_for_inference(final).eval()(ids).logits
    assert (a - b).abs().max().item() <= 1e-5


def test_sigkill_then_restart_gives_the_same_adapters(data, tmp_path):
    # the schedule is pinned to 6 steps, so the killed run can be started with many more iterations (it can never
    # finish before the kill, however fast the machine) and restarted with 6 (a change resume accepts)
    common = {
        "training.train_iters": 6,
        "training.checkpoint.interval": 2,
        "optimizer.learning_rate.decay_iterations": 6,
    }
    reference = tmp_path / "reference"
    train(TINY_TRAIN, overrides(data, reference, **common))

    killed = tmp_path / "killed"
    log = open(tmp_path / "killed.log", "w")
    long_run = {**common, "training.train_iters": 100_000}
    proc = subprocess.Popen(
        [sys.executable, "-m", "backend.train", str(TINY_TRAIN), *overrides(data, killed, **long_run)],
        cwd=ROOT,
        env=ENV,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    import time

    deadline = time.time() + 240
    while latest_complete(killed / "checkpoints", warn=lambda m: None) is None:
        assert proc.poll() is None, f"the run exited with {proc.returncode} before its first checkpoint"
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    from backend.checkpoint import list_checkpoints

    for step, path, _ in list_checkpoints(killed / "checkpoints"):
        if step > 4:  # the long run may have gone on before the kill: as if it had been killed earlier
            shutil.rmtree(path)
    resumed_at = latest_complete(killed / "checkpoints")
    assert not (killed / "export" / "final").exists()

    summary = train(TINY_TRAIN, overrides(data, killed, **common))
    assert summary["resumed_from"] == str(resumed_at) and summary["step"] == 6
    a, b = adapter_weights(reference), adapter_weights(killed)
    assert a.keys() == b.keys() and a
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    ref_losses = {e["step"]: e["loss"] for e in events_of(reference, "train")}
    for e in events_of(killed, "train")[-2:]:
        assert e["loss"] == pytest.approx(ref_losses[e["step"]], abs=1e-6)


def test_all_linear_targets_every_decoder_linear_never_the_lm_head():
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from backend.config import PeftConfig
    from backend.lora import apply_lora, decoder_linear_names

    for model in (
        AutoModelForCausalLM.from_pretrained(TINY_MODEL),  # tied embeddings
        LlamaForCausalLM(
            LlamaConfig(
                vocab_size=64,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                tie_word_embeddings=False,
            )
        ),
    ):
        linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        inside = set(decoder_linear_names(model))
        assert linears - inside == {"lm_head"} and len(inside) == 7 * model.config.num_hidden_layers
        peft_model = apply_lora(model, PeftConfig(type="lora", rank=2))
        wrapped = {
            n.removeprefix("base_model.model.").removesuffix(".lora_A.default")
            for n, _ in peft_model.named_modules()
            if n.endswith(".lora_A.default")
        }
        assert wrapped == inside
        assert all(not p.requires_grad for n, p in peft_model.named_parameters() if "lora_" not in n)
    with pytest.raises(ValueError, match="model.base_model.peft.target_modules"):
        apply_lora(AutoModelForCausalLM.from_pretrained(TINY_MODEL), PeftConfig(type="lora", target_modules="nope"))


@pytest.mark.parametrize(
    "override,key",
    [
        ("model.base_model.peft.rank=0", "model.base_model.peft.rank"),
        ("model.base_model.peft.rank=2.5", "model.base_model.peft.rank"),
        ("model.base_model.peft.alpha=0", "model.base_model.peft.alpha"),
        ("model.base_model.peft.alpha=yes", "model.base_model.peft.alpha"),
        ("model.base_model.peft.target_modules=[]", "model.base_model.peft.target_modules"),
        ("model.base_model.peft.type=qlora", "model.base_model.peft.type"),
    ],
)
def test_lora_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_train_config(TINY_TRAIN, ["model.base_model.peft.type=lora", override])
    assert any(p.startswith(f"{key}:") for p in e.value.problems), e.value.problems


def test_target_modules_text_becomes_a_list():
    cfg = load_train_config(TINY_TRAIN, ["model.base_model.peft.target_modules=q_proj, v_proj"])
    assert cfg.model.base_model.peft.target_modules == ["q_proj", "v_proj"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_qlora_without_cuda_is_a_config_error_naming_the_key(tmp_path):
    args = ["model.base_model.peft.type=lora", "pretrained.quantization=4bit", f"run.experiment_dir={tmp_path}"]
    proc = subprocess.run(
        [sys.executable, "-m", "backend.train", str(TINY_TRAIN), *args, "--validate"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "pretrained.quantization: 4bit needs" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(ConfigError, match="pretrained.quantization"):
        train(TINY_TRAIN, args)
    assert not (tmp_path / "events.jsonl").exists()  # refused before anything started


@pytest.mark.slow
def test_two_fsdp_processes_with_lora_match_one_process(data, tmp_path):
    from backend.launch import train_command, train_env

    config = tmp_path / "train.yaml"
    shutil.copy(TINY_TRAIN, config)
    common = {
        "training.train_iters": 3,
        "training.checkpoint.interval": 2,
        "batch.micro_batch_size": 1,
        "model.multi_stage.zero_stage": 3,
    }
    runs = {}

    def run(n, run_dir):
        cmd = train_command(
            config, n, use_cpu=True, extra_overrides=overrides(data, run_dir, **common, **{"run.num_processes": n})
        )
        proc = subprocess.run(
            cmd, cwd=ROOT, env={**ENV, **train_env(n, use_cpu=True)}, capture_output=True, text=True, timeout=400
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return run_dir

    for n in (1, 2):
        runs[n] = run(n, tmp_path / f"p{n}")
    one, two = (events_of(runs[n], "start")[0] for n in (1, 2))
    assert (one["world_size"], one["sharded"]) == (1, False)
    assert (two["world_size"], two["sharded"], two["distributed_type"]) == (2, True, "FSDP")
    assert one["trainable_parameters"] == two["trainable_parameters"]
    a, b = ([e["loss"] for e in events_of(runs[n], "train")] for n in (1, 2))
    assert len(a) == len(b) == 3 and a == pytest.approx(b, abs=1e-5)
    for name in ("adapter_weights", "merged"):
        if name == "adapter_weights":
            x, y = adapter_weights(runs[1]), adapter_weights(runs[2])
        else:
            from safetensors.torch import load_file

            x, y = (load_file(runs[n] / "export" / "final" / "model.safetensors") for n in (1, 2))
        assert x.keys() == y.keys() and x
        worst = max((x[k] - y[k]).abs().max().item() for k in x)
        assert worst <= 1e-5, (name, worst)
    # the sharded run's checkpoint holds only the adapters too, and resuming from it under FSDP2 is exact
    state = torch.load(runs[2] / "checkpoints" / "step_000002" / "lora_state.pt", weights_only=False)
    assert state["model"] and all("lora_" in k for k in state["model"])
    uninterrupted = adapter_weights(runs[2])
    shutil.rmtree(runs[2] / "checkpoints" / "step_000003")
    shutil.rmtree(runs[2] / "export")
    run(2, runs[2])
    assert events_of(runs[2], "start")[-1]["resumed_from"].endswith("step_000002")
    resumed = adapter_weights(runs[2])
    assert max((resumed[k] - uninterrupted[k]).abs().max().item() for k in resumed) <= 1e-6


# ------------------------------------------------------------------------------------------------ studio


def test_config_tab_binds_the_lora_fields():
    import yaml

    from studio import handlers as H
    from studio.bindings import TRAIN_FIELDS

    yaml0 = H.default_train_yaml()
    values, _, ok = H.train_yaml_to_form(yaml0)
    paths = [b.path for b in TRAIN_FIELDS]
    assert ok and values[paths.index("model.base_model.peft.type")] == "none"
    assert values[paths.index("model.base_model.peft.target_modules")] == "all-linear"
    values[paths.index("model.base_model.peft.type")] = "lora"
    values[paths.index("model.base_model.peft.rank")] = 16.0  # gr.Number gives floats
    values[paths.index("model.base_model.peft.target_modules")] = "q_proj, v_proj"
    values[paths.index("training.export.merge")] = False
    text, status = H.form_to_train_yaml(yaml0, *values)
    assert status.startswith("✓"), status
    peft = yaml.safe_load(text)["model"]["base_model"]["peft"]
    assert peft == {"type": "lora", "rank": 16, "alpha": 16.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    assert yaml.safe_load(text)["training"]["export"]["merge"] is False
    back, _, ok = H.train_yaml_to_form(text)
    assert ok and back[paths.index("model.base_model.peft.target_modules")] == "q_proj, v_proj"
    values[paths.index("model.base_model.peft.rank")] = 0
    _, status = H.form_to_train_yaml(yaml0, *values)
    assert "Invalid config" in status and "model.base_model.peft.rank" in status
    if not torch.cuda.is_available():  # QLoRA on this CPU machine: the form says so, naming the key
        values[paths.index("model.base_model.peft.rank")] = 8
        values[paths.index("pretrained.quantization")] = "4bit"
        _, status = H.form_to_train_yaml(yaml0, *values)
        assert "Invalid config" in status and "pretrained.quantization" in status


def test_chat_tab_loads_adapter_and_merged_exports(lora_run):
    from peft import PeftModel

    from studio import handlers as H

    run_dir, _, _ = lora_run
    final = run_dir / "export" / "final"
    offered = H.chat_models(str(run_dir.parent))
    assert str(final) in offered and str(final / "adapter") in offered
    assert str(run_dir / "export" / "step_000004" / "adapter") in offered
    model, tokenizer = H.get_model(str(final / "adapter"))
    assert isinstance(model, PeftModel) and tokenizer.chat_template
    question = "What is 5 + 37?"
    adapter_reply = list(H.chat_stream(str(final / "adapter"), [], question, "", max_new_tokens=8))
    merged_reply = list(H.chat_stream(str(final), [], question, "", max_new_tokens=8))
    assert adapter_reply and adapter_reply[-1] == merged_reply[-1]  # greedy: same model, same reply


def test_chat_loads_a_lora_checkpoint_as_the_merged_model(lora_run):
    """A stopped LoRA run has checkpoints (adapters only) and maybe no export: the Chat tab's checkpoint loader
    rebuilds the base + adapters and merges them; at the last step it equals the merged final export."""
    from transformers import AutoModelForCausalLM

    from backend.checkpoint import latest_complete
    from backend.inference import load_checkpoint_model

    run_dir, _, _ = lora_run
    model, tokenizer = load_checkpoint_model(latest_complete(run_dir / "checkpoints"))
    assert not any("lora" in k for k in model.state_dict())
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "export" / "final").eval()
    ids = torch.tensor([tokenizer.encode("Reverse the words: red blue")])
    with torch.no_grad():
        assert (model(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max().item() <= 1e-5
    assert model.generation_config.use_cache is True
    # the Data tab's loss view scores it through the same reader
    from backend.evaluate import load_scoring_model

    scoring = load_scoring_model(latest_complete(run_dir / "checkpoints"))
    assert scoring.config._attn_implementation == "sdpa_packed"
    with torch.no_grad():
        assert (scoring(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max().item() <= 1e-5


def test_bf16_lora_keeps_the_frozen_base_in_bf16_and_trains(data, tmp_path):
    """The memory plan counts a bf16 run's frozen base at 2 bytes per parameter: load_lora_model keeps it in the
    training dtype (fp32 only when FSDP shards it over several processes); adapters stay fp32 and train."""
    import backend.lora

    cfg = load_train_config(TINY_TRAIN, overrides(data, tmp_path / "x", **{"model.distributed.training_dtype": "bf16"}))
    model = backend.lora.load_lora_model(cfg, "sdpa_packed")
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    sharded = backend.lora.load_lora_model(cfg, "sdpa_packed", fsdp_sharded=True)
    assert {p.dtype for p in sharded.parameters()} == {torch.float32}
    summary = train(
        TINY_TRAIN,
        overrides(data, tmp_path / "run", **{"model.distributed.training_dtype": "bf16", "training.train_iters": 3}),
    )
    losses = [e["loss"] for e in read_events(tmp_path / "run" / "events.jsonl")[0] if e["event"] == "train"]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert summary["export"]
