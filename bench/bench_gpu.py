"""GPU check: backend.train on the Llama-3.1-8B shape with fewer layers; tokens/s/GPU, MFU and peak memory vs the plan.

    python bench/bench_gpu.py [--layers 4] [--steps 10] [--out bench/GPU.md] [--budget-s 400] [--pytest-summary TEXT]

Usually run by scripts/gpu_check.sh (which also runs `pytest -m gpu` first). Needs CUDA: without it, exits 2 with a
message and measures nothing. On one GPU, for each case below it launches the real trainer (`python -m
backend.train`, one process) on the guide's config (assets/configs/llama31_8b_magpie_train.yaml) with:
- the model: Llama-3.1-8B's shape (tests/data/llama-3.1-8b/config.json) with --layers decoder layers, random init
  (`pretrained.model_weights: no`), bf16 mixed precision, sequence 4,096, micro-batch 1, 2 rows per step;
- the data: random token documents written with backend.dataset.ShardWriter (vocabulary 128,256; Magpie-like
  lognormal lengths, median ~1,000 tokens; the last 70% of each document trained), packed by the trainer;
- cases: activation checkpointing off and on, for the attention the trainer selects with use_flash_attention on
  (the best tier available: what `select_attention` picks, read back from the start event) and off (sdpa_packed,
  skipped when the first already is sdpa_packed); LoRA (peft installed) and QLoRA 4-bit (bitsandbytes installed).
Each run is stopped (SIGKILL) once the train event of its last step is written: the checkpoint and export a run
writes at its end are not wanted here (they would be ~23 GB for 4 layers).

Figures per case: tokens/s/GPU (median of the train events after 3 warm-up steps); MFU = model FLOPs per second /
the bf16 matmul rate measured at the start of this run (8,192^3 matmuls), where the model FLOPs of a step
(`step_flops`) are 6 x the non-embedding parameters per position (4 x for a frozen LoRA base, which needs no weight
gradient, + 6 x the adapters) plus the causal attention of the step's real documents, 6 x layers x q x sum(len^2)
(the input embedding is a lookup, not a matmul: counting it inflated MFU ~1.4x at 4 layers); peak memory =
`peak_memory_bytes` of the train events (torch.cuda.max_memory_allocated), and the plan of backend.plan for the same
config with its ratio plan / peak. Each case is labelled by the settings it ran with (`case_label` of its resolved
config), not by what was meant. Writes --out (a Markdown report with the date and the
machine) through a temporary file and a rename. Never writes a figure it did not measure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GUIDE_CONFIG = ROOT / "assets" / "configs" / "llama31_8b_magpie_train.yaml"
LLAMA_8B_CONFIG = ROOT / "tests" / "data" / "llama-3.1-8b" / "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
SEQUENCE, ROWS_PER_STEP, WARMUP = 4096, 2, 3
EXIT_NO_CUDA = 2


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        print(
            "error: no CUDA device (torch.cuda.is_available() is False): this GPU check measures nothing on CPU. "
            "Run it on a machine with an NVIDIA GPU and a CUDA build of PyTorch.",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_NO_CUDA)


def matmul_tflops(n: int = 8192, iters: int = 20) -> float:
    """Measured bf16 matmul rate of this GPU, TFLOP/s (median of 3 timings of `iters` n x n x n products)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    rates = []
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            a @ b
        torch.cuda.synchronize()
        rates.append(2 * n**3 * iters / (time.perf_counter() - start) / 1e12)
    del a, b
    torch.cuda.empty_cache()
    return statistics.median(rates)


def write_model(path: Path, layers: int) -> Path:
    """config.json of Llama-3.1-8B with `layers` layers + a tokenizer (only the export reads it; ids are random)."""
    path.mkdir(parents=True, exist_ok=True)
    config = json.loads(LLAMA_8B_CONFIG.read_text())
    config["num_hidden_layers"] = layers
    (path / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        shutil.copy(ROOT / "assets" / "tiny-llama" / name, path / name)
    return path


def write_data(path: Path, tokens: int, vocab: int, seed: int = 0) -> Path:
    """Random documents with Magpie-like lognormal lengths (median ~1,000 tokens), the last 70% of each trained."""
    import numpy as np

    from backend.dataset import ShardWriter

    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) < tokens:
        lengths.append(int(np.clip(rng.lognormal(np.log(1000), 0.8), 32, 16000)))
    with ShardWriter(path, "training", vocab_size=vocab) as writer:
        for n in lengths:
            trained = np.zeros(n, dtype=bool)
            trained[int(0.3 * n) :] = True
            writer.add(rng.integers(0, vocab, n), trained)
    return path / "fast_llm_config_training.yaml"


def step_flops(shape, document_lengths, positions: int, adapter_params: int | None = None) -> float:
    """Model FLOPs (forward + backward) of one step computing `positions` positions holding documents of these
    lengths: 6 x non-embedding parameters per position (LoRA: 4 x the frozen base, its weights get no gradient, + 6 x
    `adapter_params`) + causal attention 6 x layers x (heads x head_dim) x sum(len^2). No recompute counted.

    >>> from backend.plan import ModelShape
    >>> shape = ModelShape(hidden=4, layers=2, heads=2, kv_heads=1, head_dim=2, intermediate=8, vocab=10, tied=False)
    >>> shape.num_params - shape.embedding_params, step_flops(shape, [3, 1], positions=4)
    (348, 8832.0)
    """
    dense = shape.num_params - shape.embedding_params
    per_position = 6 * dense if adapter_params is None else 4 * dense + 6 * adapter_params
    attention = 6 * shape.layers * shape.q * sum(n * n for n in document_lengths)
    return float(per_position * positions + attention)


def case_label(cfg) -> str:
    """What a case really runs, read from its resolved config (not from what the case list meant)."""
    lora = cfg.model.base_model.peft.type == "lora"
    quant = cfg.pretrained.quantization
    kind = ("QLoRA " + quant if quant != "none" else "LoRA") if lora else "full"
    flash = "yes" if cfg.model.base_model.transformer.use_flash_attention else "no"
    ckpt = "yes" if cfg.model.multi_stage.activation_checkpointing else "no"
    return f"{kind} {cfg.model.distributed.training_dtype}, flash {flash}, checkpointing {ckpt}"


def document_lengths(cfg, steps: range) -> list[int]:
    """Lengths of the document pieces the trainer packs into `steps` (the same sampler, seed and rows)."""
    from backend.train import packed_sampler, read_split

    sampler = packed_sampler(cfg, read_split(cfg, cfg.data.datasets.training.path, "training"))
    b = cfg.batch
    return [
        piece.end - piece.begin
        for step in steps
        for micro in sampler.micro_batches(step, b.batch_size, b.micro_batch_size, 0, 1)
        for row in micro
        for piece in row
    ]


def run_case(name: str, overrides: list[str], work: Path, steps: int, timeout: float) -> dict:
    """Launch backend.train, stop it after its last train event, return its start event and train events."""
    from backend.config import dump_yaml, load_train_config

    run_dir = work / name.replace(" ", "_").replace(",", "")
    cfg = load_train_config(GUIDE_CONFIG, [*overrides, f"run.experiment_dir={run_dir}"])
    run_dir.mkdir(parents=True)
    config_path = work / f"{run_dir.name}.yaml"
    config_path.write_text(dump_yaml(cfg))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    log = open(work / f"{run_dir.name}.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "backend.train", str(config_path)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    events_path, deadline, events = run_dir / "events.jsonl", time.time() + timeout, []
    try:
        while time.time() < deadline:
            if events_path.exists():
                lines = events_path.read_text().splitlines()
                events = [json.loads(x) for x in lines if x.endswith("}")]
            if any(e["event"] == "train" and e["step"] >= steps for e in events):
                break
            if proc.poll() is not None or any(e["event"] == "error" for e in events):
                break
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    start = next((e for e in events if e["event"] == "start"), None)
    train = [e for e in events if e["event"] == "train"]
    result = {"name": name, "cfg": cfg, "start": start, "train": train, "log": work / f"{run_dir.name}.log"}
    if len(train) < steps:
        error = next((e["message"] for e in events if e["event"] == "error"), None)
        tail = (work / f"{run_dir.name}.log").read_text()[-1500:]
        result["error"] = error or f"no train event for step {steps} (timeout or crash); log tail:\n{tail}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a killed run may have started its checkpoint
    return result


def figures(result: dict, tflops: float, model_dir: Path) -> dict:
    from backend.plan import model_shape, plan_memory

    cfg = result["cfg"]
    shape = model_shape(model_dir)
    plan = plan_memory(cfg, 1, shape=shape)
    out = {"planned_peak": plan.peak_bytes}
    if "error" in result:
        return out
    timed = result["train"][WARMUP:] or result["train"]
    tps = statistics.median(e["tokens_per_s"] for e in timed)
    positions = cfg.batch.batch_size * cfg.batch.sequence_length  # per step, padding included (tokens_per_s's unit)
    steps = range(timed[0]["step"] - 1, timed[-1]["step"])  # event step s follows optimizer step s - 1
    lora = cfg.model.base_model.peft.type == "lora"
    flops = step_flops(
        shape, document_lengths(cfg, steps), positions * len(steps), plan.trainable_params if lora else None
    )
    peaks = [e["peak_memory_bytes"] for e in result["train"] if "peak_memory_bytes" in e]
    peak = max(peaks) if peaks else None
    out.update(
        tokens_per_s=tps,
        mfu=flops / (positions * len(steps)) * tps / (tflops * 1e12),
        attention=result["start"].get("attention"),
        peak=peak,
        plan_ratio=plan.peak_bytes / peak if peak else None,
    )
    return out


def machine() -> str:
    import torch
    import transformers

    props = torch.cuda.get_device_properties(0)
    gpu = f"{torch.cuda.get_device_name(0)} ({props.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} visible)"
    versions = f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}"
    return f"{gpu}, {platform.node()}, Python {platform.python_version()}, {versions}"


def report(rows: list[tuple[dict, dict]], tflops: float, args, pytest_summary: str) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# GPU check (scripts/gpu_check.sh)",
        "",
        f"Measured {date} on {machine()}.",
        f"bf16 matmul rate measured in this run: {tflops:.0f} TFLOP/s (8,192^3 products).",
        f"`pytest -m gpu`: {pytest_summary or 'not run'}",
        "",
        f"backend.train, one GPU, Llama-3.1-8B shape with {args.layers} layers (random init), bf16, sequence "
        f"{SEQUENCE}, {ROWS_PER_STEP} packed rows per step, {args.steps} steps (median after {WARMUP} warm-up).",
        "MFU = model FLOPs/s / the measured matmul rate; model FLOPs = 6 x non-embedding parameters per position "
        "(LoRA: 4 x the frozen base + 6 x the adapters) + causal attention over the real document lengths.",
        "",
        "| case | attention | tokens/s/GPU | MFU | peak memory (GiB) | plan (GiB) | plan / measured |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for result, f in rows:
        if "error" in result:
            first = result["error"].strip().splitlines()[0][:160] if result["error"].strip() else "failed"
            lines.append(f"| {result['name']} | | failed: {first} | | | {f['planned_peak'] / 2**30:.1f} | |")
            continue
        peak = f"{f['peak'] / 2**30:.1f}" if f["peak"] else "n/a"
        ratio = f"{f['plan_ratio']:.2f}" if f["plan_ratio"] else ""
        lines.append(
            f"| {result['name']} | {f['attention']} | {f['tokens_per_s']:,.0f} | {f['mfu']:.1%} | {peak} | "
            f"{f['planned_peak'] / 2**30:.1f} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the 8B shape (default 4)")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per case (default 10)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "GPU.md"), help="Markdown report to write")
    parser.add_argument("--budget-s", type=float, default=400, help="skip the cases left after this many seconds")
    parser.add_argument("--pytest-summary", default="", help="the `pytest -m gpu` result line, for the report")
    args = parser.parse_args(argv)
    require_cuda()
    import importlib.util

    t0 = time.time()
    tflops = matmul_tflops()
    print(f"bf16 matmul: {tflops:.0f} TFLOP/s", flush=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    model_dir = write_model(work / "model", args.layers)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    data = write_data(work / "data", tokens=(args.steps + 2) * ROWS_PER_STEP * SEQUENCE * 2, vocab=vocab)
    base = [
        f"pretrained.path={model_dir}",
        "pretrained.model_weights=no",
        f"data.datasets.training.path={data}",
        "data.datasets.validation=null",
        f"training.train_iters={args.steps}",
        "training.logs.interval=1",
        "training.checkpoint.interval=0",
        "training.export.interval=0",
        "training.evaluations.validation.interval=0",
        f"batch.sequence_length={SEQUENCE}",
        "batch.micro_batch_size=1",
        f"batch.batch_size={ROWS_PER_STEP}",
        "model.multi_stage.zero_stage=0",
        "model.distributed.training_dtype=bf16",
        "run.num_processes=1",
    ]
    cases = []
    for flash in ("yes", "no"):
        for ckpt in ("no", "yes"):
            cases.append([
                f"model.base_model.transformer.use_flash_attention={flash}",
                f"model.multi_stage.activation_checkpointing={ckpt}",
            ])  # fmt: skip
    if importlib.util.find_spec("peft"):  # every setting spelled out: the guide's config has checkpointing on
        cases.append(["model.base_model.peft.type=lora", "model.multi_stage.activation_checkpointing=no"])
        if importlib.util.find_spec("bitsandbytes"):
            cases.append(["model.base_model.peft.type=lora", "pretrained.quantization=4bit",
                          "model.multi_stage.activation_checkpointing=yes"])  # fmt: skip
    from backend.config import load_train_config

    rows, first_attention, durations = [], None, []
    for overrides in cases:
        name = case_label(load_train_config(GUIDE_CONFIG, base + overrides))
        if "flash no" in name and first_attention == "sdpa_packed":
            print(f"skip {name}: use_flash_attention on already selected sdpa_packed", flush=True)
            continue
        left = args.budget_s - (time.time() - t0)
        if left < max(durations, default=60):  # the next case would likely overrun the budget
            print(f"skip {name}: {left:.0f} s left of the {args.budget_s:.0f} s budget", flush=True)
            continue
        print(f"run {name} ...", flush=True)
        case_start = time.time()
        result = run_case(name, base + overrides, work, args.steps, timeout=min(240, left + 30))
        durations.append(time.time() - case_start)
        f = figures(result, tflops, model_dir)
        if first_attention is None and "error" not in result:
            first_attention = f["attention"]
        rows.append((result, f))
        if "error" in result:
            print(f"  {result['error'].splitlines()[0]}", flush=True)
        else:
            ratio = f"{f['plan_ratio']:.2f}" if f["plan_ratio"] else "n/a"
            print(f"  {f['tokens_per_s']:,.0f} tokens/s, MFU {f['mfu']:.1%}, plan / peak {ratio}", flush=True)
    text = report(rows, tflops, args, args.pytest_summary)
    out = Path(args.out)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    print(text)
    shutil.rmtree(work, ignore_errors=True)
    return 1 if any("error" in r for r, _ in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
