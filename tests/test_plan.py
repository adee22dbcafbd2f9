"""backend.plan: exact parameter counts, each memory part against bytes measured on a real step (1 and 2 processes),
the guide's 8B verdicts as written in bench/README.md, the suggestions, the disk estimate and the command line."""

import json
import os
import re
import subprocess
import sys

import pytest

from backend import ASSETS, ROOT, TINY_MODEL
from backend.config import dump_yaml, load_train_config, set_field
from backend.plan import GIB, disk_estimate, main, model_shape, plan_memory

LLAMA_8B = ROOT / "tests" / "data" / "llama-3.1-8b"
GUIDE_8B = ASSETS / "configs" / "llama31_8b_magpie_train.yaml"
TOLERANCE = 0.15


def guide_8b(*overrides):
    return load_train_config(GUIDE_8B, [f"pretrained.path={LLAMA_8B}", *overrides])


def random_100m(tmp_path):
    """A ~93M-parameter random Llama (untied, GQA): config.json only; the worker builds it with model_weights: no."""
    path = tmp_path / "llama-100m"
    path.mkdir()
    config = dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_size=640,
        num_hidden_layers=12,
        num_attention_heads=10,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=1728,
        vocab_size=32000,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        hidden_act="silu",
    )
    (path / "config.json").write_text(json.dumps(config))
    return path


# ---- parameter counts: exact, against transformers' own model built from the same config.json


def test_llama31_8b_parameter_count_is_exact():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = model_shape(LLAMA_8B)
    assert shape.num_params == 8_030_261_248
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(LLAMA_8B))
    assert shape.num_params == sum(p.numel() for p in model.parameters())
    assert shape.layers * shape.layer_params + shape.root_params == shape.num_params


def test_tiny_model_parameter_count_matches_the_loaded_weights():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL)  # tied embeddings: counted once
    assert model_shape(TINY_MODEL).num_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("tied", [False, True])
def test_llama_family_counts_from_json_match_transformers(tmp_path, model_type, tied):
    """The JSON-only count (biases of Qwen2's q/k/v, Qwen3's q/k norms, tied heads) against the real modules."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        intermediate_size=96,
        vocab_size=300,
        tie_word_embeddings=tied,
    )
    config.save_pretrained(tmp_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shape = model_shape(tmp_path)
    assert shape.num_params_override is None  # counted from the JSON, not on the meta device
    assert shape.num_params == sum(p.numel() for p in model.parameters())


def test_planning_does_not_import_torch():
    code = (
        "import sys; from backend.config import load_train_config; from backend.plan import plan_memory; "
        f"cfg = load_train_config({str(GUIDE_8B)!r}, ['pretrained.path={LLAMA_8B}']); "
        "p = plan_memory(cfg, 8, 80); print(p.peak_bytes); assert 'torch' not in sys.modules, 'torch imported'"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


# ---- each part against bytes measured on the trainer's own step (tests/plan_worker.py)


def measure(tmp_path, model_path, num_processes, dtype="fp32"):
    from backend.launch import free_port, train_command, train_env

    run = tmp_path / f"run{num_processes}"
    run.mkdir()
    cfg = load_train_config(
        ASSETS / "configs" / "tiny_train.yaml",
        [
            f"pretrained.path={model_path}",
            "pretrained.model_weights=no",
            "batch.micro_batch_size=2",
            "batch.sequence_length=256",
            f"batch.batch_size={2 * num_processes}",
            f"model.multi_stage.zero_stage={3 if num_processes > 1 else 0}",
            "model.distributed.timeout=120",
            f"model.distributed.training_dtype={dtype}",
            "training.evaluations.validation.interval=0",
            f"run.num_processes={num_processes}",
            f"run.experiment_dir={run}",
        ],
    )
    config_path = run / "config.yaml"
    config_path.write_text(dump_yaml(cfg))
    if num_processes == 1:
        cmd = [sys.executable, "-m", "tests.plan_worker", str(config_path)]
    else:
        cmd = train_command(config_path, num_processes, main_process_port=free_port(), module="tests.plan_worker")
    env = {**os.environ, **train_env(num_processes, use_cpu=True, threads=1)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    measured = [json.loads((run / f"measured{r}.json").read_text()) for r in range(num_processes)]
    assert all(m["world_size"] == num_processes for m in measured)  # really 2 processes, not 2 lone runs
    return cfg, measured


def assert_parts_match(cfg, measured, world):
    plan = plan_memory(cfg, world)
    # the fused loss saves dL/dhidden for the trained positions; the plan takes every position (worst case)
    loss_saved = plan.loss_saved - (plan.tokens - measured[0]["trained"]) * model_shape(cfg.pretrained.path).hidden * 4
    expected = {
        "params": plan.params_sharded,
        "gradients": plan.gradients,
        "optimizer": plan.optimizer,
        "saved_full": plan.activations_full + loss_saved,
        "saved_checkpointed": plan.activations_checkpointed + loss_saved,
    }
    if cfg.model.distributed.training_dtype != "fp32" and not plan.sharded:
        # one process under autocast: the bf16 casts of the decoder Linears are saved for backward; the plan
        # counts them (and the LM head's cast) as the compute copy of the parameters
        shape = model_shape(cfg.pretrained.path)
        casts = 2 * shape.layers * shape.layer_linear_params
        assert casts <= plan.params_gathered <= casts + 2 * (shape.lm_head_params or shape.embedding_params)
        expected["saved_full"] += casts
    for rank, m in enumerate(measured):
        for part, want in expected.items():
            assert abs(m[part] - want) <= TOLERANCE * m[part], f"rank {rank} {part}: measured {m[part]}, plan {want}"
    assert plan.activations_checkpointed < plan.activations_full / 3


@pytest.mark.parametrize("model, dtype", [("tiny", "fp32"), ("100m", "fp32"), ("tiny", "bf16")])
def test_plan_matches_measured_bytes_one_process(tmp_path, model, dtype):
    path = TINY_MODEL if model == "tiny" else random_100m(tmp_path)
    cfg, measured = measure(tmp_path, path, 1, dtype)
    assert_parts_match(cfg, measured, 1)


@pytest.mark.slow
@pytest.mark.parametrize("model, dtype", [("tiny", "fp32"), ("100m", "fp32"), ("tiny", "bf16")])
def test_plan_matches_measured_bytes_two_processes_fsdp(tmp_path, model, dtype):
    """bf16: FSDP2 mixed precision (bf16 gathered compute copy, fp32 master and reduction) on gloo."""
    path = TINY_MODEL if model == "tiny" else random_100m(tmp_path)
    cfg, measured = measure(tmp_path, path, 2, dtype)
    assert_parts_match(cfg, measured, 2)
    one = plan_memory(set_field(cfg, "model.multi_stage.zero_stage", 0), 1)
    assert measured[0]["optimizer"] < 0.6 * one.optimizer  # sharded: about half of one process's


def test_lora_parts_match_a_peft_model_on_the_real_loss(tmp_path):
    """LoRA (peft, all-linear, fp32 here): frozen base + adapters, adapter-only gradients and AdamW state, and the
    saved activations (frozen norms save less, each adapter saves its A output) measured on trained_token_loss."""
    import torch
    from peft import LoraConfig, get_peft_model

    from backend.loss import trained_token_loss
    from backend.modeling import load_model
    from backend.packing import collate
    from tests.plan_worker import _bytes, _Documents

    cfg = load_train_config(
        ASSETS / "configs" / "tiny_train.yaml",
        ["model.base_model.peft.type=lora", "model.base_model.peft.rank=8", "batch.micro_batch_size=2"],
    )
    cfg = set_field(cfg, "batch.sequence_length", 256)
    peft_model = get_peft_model(
        load_model(TINY_MODEL, "fp32", "sdpa_packed"), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    )
    model = peft_model.base_model.model  # the LlamaForCausalLM holding the adapters (backend.loss swaps its lm_head)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    lengths = [64, 128, 56] * 2
    rows = [[(3 * r + j, 0, lengths[3 * r + j]) for j in range(3)] for r in range(2)]
    batch = collate(rows, _Documents(lengths, model.config.vocab_size, 0), 256)
    saved = {}

    def pack(t):
        base = t if t._base is None else t._base
        if not isinstance(base, torch.nn.Parameter):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_sum, trained = trained_token_loss(model, batch)
    loss_sum.backward()
    optimizer.step()
    plan = plan_memory(cfg, 1)
    lora = [p for p in model.parameters() if p.requires_grad]
    assert (
        plan.trainable_params == sum(p.numel() for p in lora)
        and plan.num_params == peft_model.get_nb_trainable_parameters()[1] - plan.trainable_params
    )
    loss_saved = plan.loss_saved - (plan.tokens - trained) * model.config.hidden_size * 4
    measured = {
        "params": _bytes(model.parameters()),
        "gradients": _bytes(p.grad for p in lora),
        "optimizer": _bytes(v for s in optimizer.state.values() for k, v in s.items() if k != "step"),
        "saved": sum(saved.values()),
    }
    expected = {
        "params": plan.params_sharded,
        "gradients": plan.gradients,
        "optimizer": plan.optimizer,
        "saved": plan.activations_full + loss_saved,
    }
    for part, want in expected.items():
        assert abs(measured[part] - want) <= TOLERANCE * measured[part], (
            f"{part}: measured {measured[part]}, plan {want}"
        )


# ---- the guide's 8B (numbers in bench/README.md "Memory plan")


GUIDE_CASES = {
    "full, 8 x 80 GB, checkpointing off": (["model.multi_stage.activation_checkpointing=no"], 8, 80),
    "full, 8 x 80 GB, checkpointing on": (["model.multi_stage.activation_checkpointing=yes"], 8, 80),
    "LoRA bf16, 1 x 80 GB, checkpointing off": (
        ["model.base_model.peft.type=lora", "model.multi_stage.activation_checkpointing=no"],
        1,
        80,
    ),
    "LoRA bf16, 1 x 80 GB, checkpointing on": (
        ["model.base_model.peft.type=lora", "model.multi_stage.activation_checkpointing=yes"],
        1,
        80,
    ),
    "QLoRA 4-bit, 1 x 24 GB, checkpointing off": (
        [
            "model.base_model.peft.type=lora",
            "pretrained.quantization=4bit",
            "model.multi_stage.activation_checkpointing=no",
        ],
        1,
        24,
    ),
    "QLoRA 4-bit, 1 x 24 GB, checkpointing on": (
        [
            "model.base_model.peft.type=lora",
            "pretrained.quantization=4bit",
            "model.multi_stage.activation_checkpointing=yes",
        ],
        1,
        24,
    ),
}


def guide_plans():
    return {name: plan_memory(guide_8b(*o), w, gb) for name, (o, w, gb) in GUIDE_CASES.items()}


def test_guide_8b_verdicts():
    plans = guide_plans()
    off, on = plans["full, 8 x 80 GB, checkpointing off"], plans["full, 8 x 80 GB, checkpointing on"]
    assert off.num_params == 8_030_261_248 and off.trainable_params == off.num_params
    assert off.fits and on.fits
    assert on.peak_bytes < off.peak_bytes - 20 * GIB  # ~25 GiB of activations become ~1 GiB
    # ZeRO-3 on 8 GPUs: 16 bytes per parameter / 8 = ~15 GiB of master, gradients and AdamW state per GPU
    assert abs((off.params_sharded + off.gradients + off.optimizer) - 16 * off.num_params / 8) < GIB
    lora = plans["LoRA bf16, 1 x 80 GB, checkpointing off"]
    assert lora.fits and lora.trainable_params < 0.01 * lora.num_params
    assert lora.params_sharded > 2 * lora.num_params  # the bf16 frozen base is most of it
    qlora_off, qlora_on = (
        plans["QLoRA 4-bit, 1 x 24 GB, checkpointing off"],
        plans["QLoRA 4-bit, 1 x 24 GB, checkpointing on"],
    )
    assert not qlora_off.fits and qlora_on.fits
    assert qlora_off.suggestion == "model.multi_stage.activation_checkpointing=yes"
    assert qlora_on.params_sharded < lora.params_sharded / 2  # 4-bit Linears (the rest upcast to fp32 by PEFT)


def test_bench_readme_holds_the_current_guide_figures():
    text = (ROOT / "bench" / "README.md").read_text()
    section = text[text.index("## Memory plan") :]
    for name, plan in guide_plans().items():
        row = next((line for line in section.splitlines() if line.startswith(f"| {name} |")), None)
        assert row is not None, f"bench/README.md has no row for {name!r}"
        assert f"{plan.peak_bytes / GIB:.1f}" in row and ("fits" if plan.fits else "does not fit") in row, row


# ---- suggestions: applying the suggested change makes it fit


@pytest.mark.parametrize(
    "overrides, world, gb",
    [
        (
            ["model.multi_stage.zero_stage=2", "model.multi_stage.activation_checkpointing=no"],
            8,
            40,
        ),  # zero 2: 15 GiB gathered
        (["model.multi_stage.activation_checkpointing=yes"], 2, 40),  # 16 bytes/param over 2 GPUs: needs GPUs
        (["batch.sequence_length=32768", "model.multi_stage.activation_checkpointing=yes"], 8, 32),
    ],
)
def test_suggestion_makes_the_plan_fit(overrides, world, gb):
    cfg = guide_8b(*overrides)
    plan = plan_memory(cfg, world, gb)
    assert plan.fits is False and plan.suggestion, plan.lines()
    new_world = world
    for change in plan.suggestion.split(" and "):
        m = re.fullmatch(r"(\d+) GPUs \(--gpus \d+\)", change)
        if m:
            new_world = int(m.group(1))
        else:
            key, value = change.split("=")
            cfg = load_train_config(cfg, [f"{key}={value}"])
    assert plan_memory(cfg, new_world, gb).fits, plan.suggestion


def test_no_gpu_memory_means_no_verdict():
    plan = plan_memory(guide_8b(), 8)
    assert plan.fits is None and plan.suggestion is None and "FIT" not in "\n".join(plan.lines())


# ---- disk: estimate against files written by the libraries the trainer uses


def test_disk_estimate_matches_saved_files_on_the_tiny_model(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    cfg = load_train_config(
        ASSETS / "configs" / "tiny_train.yaml", ["training.export.dtype=bf16", "run.experiment_dir=" + str(tmp_path)]
    )
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    n = sum(p.numel() for p in model.parameters())
    est = disk_estimate(cfg, n)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "export")
    written = sum(f.stat().st_size for f in (tmp_path / "export").glob("*.safetensors"))
    assert abs(written - est["export_bytes"]) <= 0.05 * written
    model = model.float()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "ckpt.pt")
    written = (tmp_path / "ckpt.pt").stat().st_size
    assert abs(written - est["checkpoint_bytes"]) <= 0.05 * written
    # tiny_train: 300 iterations, a checkpoint every 100 (keep 2), the final export only
    assert est["checkpoints_kept"] == 2 and est["exports_kept"] == 1
    assert est["total_bytes"] == 2 * est["checkpoint_bytes"] + est["export_bytes"]


# ---- command line


def test_cli_verdict_exit_codes_and_errors(capsys):
    args = [str(GUIDE_8B), "--gpus", "8", "--model-config", str(LLAMA_8B)]
    assert main([*args, "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "8,030,261,248 parameters" in out and "FITS" in out and "host RAM at load" in out
    assert main([*args, "--gpu-memory", "24", "model.multi_stage.zero_stage=2"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "smallest change" in out
    assert main([str(GUIDE_8B), "pretrained.path=/nonexistent/model"]) == 2
    assert "pretrained.path /nonexistent/model" in capsys.readouterr().err
    assert main([str(GUIDE_8B), "batch.sequence_lenght=5"]) == 2
    assert "did you mean" in capsys.readouterr().err


# ---- the studio's Config tab (studio.handlers.memory_plan_markdown, wired to the YAML and the two plan fields)


def test_studio_plan_follows_the_yaml_and_the_gpu_fields():
    import yaml

    from studio import handlers as H

    text = dump_yaml(guide_8b())
    shown = H.memory_plan_markdown(text, 8, 80)
    plan = plan_memory(guide_8b(), 8, 80)
    assert "**Fits**" in shown and f"{plan.peak_bytes / GIB:.1f} GiB" in shown and "| parameters" in shown
    # a field changed in the form rewrites the YAML; the plan follows it
    raw = yaml.safe_load(text)
    raw["model"]["multi_stage"]["zero_stage"] = 2
    shown = H.memory_plan_markdown(yaml.safe_dump(raw), 8, 24)
    assert "**Does not fit**" in shown and "Smallest change that fits: `" in shown
    assert plan_memory(guide_8b("model.multi_stage.zero_stage=2"), 8, 24).suggestion in shown
    assert "on 4 GPUs" in H.memory_plan_markdown(text, 4, None) and "Fits" not in H.memory_plan_markdown(text, 4, None)
    # problems are messages, never exceptions
    assert "does not parse" in H.memory_plan_markdown("a: [", 8, 80)
    assert "not valid yet" in H.memory_plan_markdown(text.replace("micro_batch_size: 1", "micro_batch_size: 0"), 8, 80)
    raw["pretrained"]["path"] = "/nonexistent/model"
    assert "pretrained.path /nonexistent/model" in H.memory_plan_markdown(yaml.safe_dump(raw), 8, 80)


def test_plan_models_the_loss_chunk_the_loss_uses():
    import backend.loss
    import backend.plan

    assert backend.plan.FUSED_CHUNK_ELEMENTS == backend.loss.FUSED_CHUNK_ELEMENTS


def test_qlora_host_ram_follows_the_model_size():
    """QLoRA loads one checkpoint shard at a time: at most 5 GB for 8B, the whole (bf16) checkpoint for the tiny
    model, never a constant (issue #26)."""
    from backend import TINY_MODEL

    qlora = ["model.base_model.peft.type=lora", "pretrained.quantization=4bit"]
    big = plan_memory(guide_8b(*qlora), 1, shape=model_shape(LLAMA_8B))
    tiny_shape = model_shape(TINY_MODEL)
    tiny = plan_memory(guide_8b(*qlora), 1, shape=tiny_shape)
    assert big.host_ram_bytes == 5 * 10**9 + 4 * big.trainable_params
    assert tiny.host_ram_bytes == 2 * tiny_shape.num_params + 4 * tiny.trainable_params
    assert tiny.host_ram_bytes < 2**22 < big.host_ram_bytes


def test_lora_under_fsdp_has_no_peft_cast():
    """PEFT casts an adapter's input to lora_A.weight.dtype. In one process the adapters are fp32 masters under
    autocast: each adapted projection keeps its own bf16 copy of its input (3 + 2 per layer where 1 + 1 would be
    shared) and the down projection's input is cast to fp32 (4 T i) beside the product (b T i) that no frozen Linear
    saves. FSDP2 gathers the adapters in its param_dtype (bf16): the cast is a no-op, the adapters read and save
    the one input, the product is an activation, and the layer transient is its 4 b T h alone."""
    lora = ["model.base_model.peft.type=lora", "model.multi_stage.zero_stage=3"]
    shape = model_shape(LLAMA_8B)
    one, fsdp = (plan_memory(guide_8b(*lora), world, shape=shape) for world in (1, 8))
    assert fsdp.sharded and not one.sharded
    t, h, i, b = one.tokens, shape.hidden, shape.intermediate, 2
    assert fsdp.layer_transient == 4 * b * t * h
    assert one.layer_transient - fsdp.layer_transient == (b + 4) * t * i
    assert one.activations_full - fsdp.activations_full == shape.layers * t * (2 + 1) * b * h
    rows = {name: (size, how) for name, size, how in fsdp.parts()}
    assert rows["backward temporaries"][0] == 0 and "LM head's reduce-scatter" in rows["backward temporaries"][1]
    assert "fp32" not in rows["layer forward transient"][1]
    # one decoder layer's gathered bf16 copy is alive at the loss under a frozen base (fake-step measurement): 2 x
    # 218 M parameters (416 MiB) at 8B; the plan was 4-7% low on the 2-layer fake step without it
    full = plan_memory(guide_8b("model.multi_stage.zero_stage=3"), 8, shape=shape)
    tail = 2 * b * (shape.lm_head_params + h)
    assert full.params_gathered == tail and fsdp.params_gathered == tail + b * shape.layer_params


def test_qlora_layer_transient_holds_the_fp32_residual_stream():
    """QLoRA's residual stream is fp32 (prepare_model_for_kbit_training upcasts the norms; bitsandbytes returns a
    Linear's output in its input's dtype), so the four hidden-size values around the last layer's MLP are 4-byte:
    4 x (4 - b) T h more than LoRA's on a bf16 base; the MLP's product (fp32, then bitsandbytes' b-byte cast)
    weighs what LoRA's product and PEFT's fp32 cast do. bitsandbytes needs CUDA: the formula's inputs only."""
    lora = ["model.base_model.peft.type=lora", "model.multi_stage.zero_stage=0"]
    shape = model_shape(LLAMA_8B)
    bf16 = plan_memory(guide_8b(*lora), 1, shape=shape)
    qlora = plan_memory(guide_8b(*lora, "pretrained.quantization=4bit"), 1, shape=shape)
    t, h, i, b = bf16.tokens, shape.hidden, shape.intermediate, 2
    assert bf16.layer_transient == (b + 4) * t * i + 4 * b * t * h
    assert qlora.layer_transient - bf16.layer_transient == 4 * (4 - b) * t * h


def test_planner_falls_back_to_the_shipped_config_offline_and_says_so(capsys, monkeypatch):
    """The README's command names meta-llama/Llama-3.1-8B (a gated hub id): offline, the shipped config.json is used
    within seconds and the output says so; an id nothing is shipped for is still an error that names the path."""
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    assert main([str(GUIDE_8B), "--gpus", "8", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert time.monotonic() - start < 30
    assert "8,030,261,248 parameters" in out
    assert "model config: the config.json shipped in assets/model_configs/meta-llama/Llama-3.1-8B" in out
    assert "offline" in out
    shape = model_shape("meta-llama/Llama-3.1-8B")
    assert shape == model_shape(LLAMA_8B) and shape.source and not model_shape(LLAMA_8B).source
    assert main([str(GUIDE_8B), "pretrained.path=someone/not-shipped"]) == 2
    assert "pretrained.path someone/not-shipped" in capsys.readouterr().err


def test_dpo_plan_counts_the_saved_bytes_of_the_dpo_forward():
    """training.objective: dpo: the plan's activations + its DPO loss part (every position's full logits, worst
    case) against the bytes autograd saves during the real objective's forward (tiny model, one process, fp32),
    the loss part taken at the measured trained count as the SFT test does."""
    import numpy as np
    import torch

    from backend.modeling import load_model
    from backend.preference import DPO, collate_pairs
    from tests.plan_worker import _Documents

    L, rows_per_mb = 256, 2
    cfg = load_train_config(
        ASSETS / "configs" / "tiny_dpo_train.yaml",
        [f"batch.sequence_length={L}", f"batch.micro_batch_size={rows_per_mb}", "batch.batch_size=2"],
    )
    model = load_model(TINY_MODEL, "fp32", "sdpa_packed")
    model.train()
    lengths = [L // 4, L // 4, L // 4, L // 4 - 8] * rows_per_mb  # two pairs and 8 padding tokens per row
    data = _Documents(lengths, model.config.vocab_size, seed=0)
    rows = [[(4 * r + j, 0, lengths[4 * r + j]) for j in range(4)] for r in range(rows_per_mb)]
    from backend.packing import Piece

    mb = collate_pairs([[Piece(*p) for p in row] for row in rows], data, L)
    saved = {}

    def pack(t):
        base = t if t._base is None else t._base
        if not isinstance(base, torch.nn.Parameter):
            s = t.untyped_storage()
            saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        DPO(0.1, "sigmoid", "none")(model, mb)
    measured = sum(saved.values())
    plan = plan_memory(cfg, 1)
    shape = model_shape(TINY_MODEL)
    k = mb["num_trained"]
    assert plan.objective == "dpo" and plan.loss_saved == plan.tokens * (shape.hidden + shape.vocab) * 4
    expected = plan.activations_full + k * (shape.hidden + shape.vocab) * 4
    assert abs(measured - expected) <= TOLERANCE * measured, (measured, expected)
    # the loss part alone (about a tenth of the whole here), beyond the activations the SFT tests pin
    loss_part = measured - plan.activations_full
    assert abs(loss_part - k * (shape.hidden + shape.vocab) * 4) <= 0.1 * loss_part, (loss_part, k)
    sft = plan_memory(set_field(cfg, "training.objective", "sft"), 1)
    assert plan.loss_saved > sft.loss_saved and np.isfinite(plan.peak_bytes)
