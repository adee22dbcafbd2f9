"""LoRA training throughput and loss agreement: ours (backend.train with model.base_model.peft.type: lora) vs TRL's
SFTTrainer with ``peft_config``, on the same model, data, batch and LoRA settings, in one run.

    python bench/peers_lora.py                    # 8 steps x 3 alternating repeats on the `small` shape (~5 min)
    python bench/peers_lora.py --steps 2 --repeats 1 --warmup 1 --conversations 120 --shape tiny --vocab 600 \
        --threads 1 --in-process --work /tmp/peers-lora --json out.json     # the smoke test's configuration

A sibling of bench/peers.py and built from its helpers (setup, synthetic data, the recorder, the row-by-row TRL
mode, summaries); only LoRA is added on both sides:
* ours  `python -m backend.train` with peft {type: lora, rank 16, alpha 32, dropout 0, target_modules: all-linear}
        (= q/k/v/o/gate/up/down of every decoder layer), best-fit packing, fused LM head. Time per step from the
        "train" events' elapsed field (start-up and the final adapter + merged export excluded).
* trl   SFTTrainer, packing bfd (padding-free), the same tokens and assistant masks, ``peft_config=LoraConfig(r=16,
        lora_alpha=32, target_modules=[the same 7 names])``, gradient checkpointing OFF (SFTConfig's default is on;
        ours does not checkpoint here, so TRL gets the same memory/compute trade).
Loss agreement: TRL fed exactly our packed rows in our order (peers.py's rows mode) with the same seed, so both draw
the same initial adapters (PEFT's init right after set_seed(1234)); per-step losses are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

import peers  # noqa: E402

RANK, ALPHA = 16, 32.0
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # = ours' all-linear
LABELS = {
    "ours": "ours (backend.train, LoRA r16 all-linear: best-fit packing, fused LM head)",
    "trl": "TRL SFTTrainer + peft_config (packing bfd, padding-free, no checkpointing)",
}


def install_lora():
    """Patch peers' contestants to train LoRA: ours' config gets the peft section; TRL's trainer gets peft_config
    and gradient_checkpointing=False. Called in the orchestrating process and in every worker process; returns
    the function that undoes it (an in-process run must not leave peers training LoRA)."""
    from peft import LoraConfig

    base_config, base_recording, base_args = peers.ours_config, peers._recording, peers._common_args

    def ours_config(spec, run_dir):
        cfg = base_config(spec, run_dir)
        cfg["model"]["base_model"]["peft"] = {
            "type": "lora",
            "rank": RANK,
            "alpha": ALPHA,
            "dropout": 0.0,
            "target_modules": "all-linear",
        }
        return cfg

    def recording(cls, rec):
        recorded = base_recording(cls, rec)

        class WithLora(recorded):
            def __init__(self, *a, **k):
                k.setdefault(
                    "peft_config",
                    LoraConfig(
                        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"
                    ),
                )
                super().__init__(*a, **k)

        return WithLora

    def common_args(spec, tmp):
        return {**base_args(spec, tmp), "gradient_checkpointing": False}

    peers.ours_config, peers._recording, peers._common_args = ours_config, recording, common_args

    def restore():
        peers.ours_config, peers._recording, peers._common_args = base_config, base_recording, base_args

    return restore


def run_contestant(name, spec, work: Path, tag: str, env, timeout, in_process=False) -> dict:
    """peers.run_contestant, with this file's worker entry (which installs LoRA) for TRL."""
    if name == "ours" or in_process:
        return peers.run_contestant(name, spec, work, tag, env, timeout, in_process)
    spec_path = work / f"lora-{name}-{tag}.spec.json"
    tmp = work / f"lora-{name}-{tag}.tmp"
    spec_path.write_text(json.dumps({**{k: v for k, v in spec.items() if not k.startswith("_")}, "tmp": str(tmp)}))
    out = work / f"lora-{name}-{tag}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(BENCH / "peers_lora.py"), "--worker", name, "--spec", str(spec_path), "--out", str(out)]
    wall = peers._run(cmd, env, work / f"lora-{name}-{tag}.log", timeout)
    return {**json.loads(out.read_text()), "wall": wall}


def build_report(meta, per_run, agreement) -> str:
    med = {}
    for name, runs in per_run.items():
        s = [peers.summarize(r, meta["warmup"]) for r in runs]
        med[name] = {k: statistics.median(x[k] for x in s) for k in s[0]}
    ours, trl = med["ours"], med["trl"]
    pairs = [
        peers.summarize(o, meta["warmup"])["trained_per_s"] / peers.summarize(t, meta["warmup"])["trained_per_s"]
        for o, t in zip(per_run["ours"], per_run["trl"], strict=False)
    ]
    ratio = ours["trained_per_s"] / trl["trained_per_s"]
    lines = [
        "## LoRA: ours vs TRL SFTTrainer + peft_config",
        "",
        f"Measured {meta['date']} by `{meta['command']}` ({meta['wall_min']:.1f} min). torch threads "
        f"{meta['threads']}, fp32, load average at start/end {meta['load'][0]:.1f}/{meta['load'][3]:.1f} "
        f"(shared machine: absolute rates drop, alternation keeps the ratio fair). Model: shape `{meta['shape']}`, "
        f"{meta['num_parameters'] / 1e6:.2f}M parameters; LoRA r{RANK} alpha {ALPHA:g} on {', '.join(TARGETS)} "
        f"({meta['trainable']:,} trainable). {meta['steps']} steps of {peers.ROWS_PER_STEP} packed rows x "
        f"{peers.SEQ}; first {meta['warmup']} excluded; medians of {meta['repeats']} alternating runs.",
        "",
        "| trainer | tokens/s | trained tokens/s | s / step | trained tok/s vs ours | final loss |",
        "|---|---|---|---|---|---|",
    ]
    for name in per_run:
        m = med[name]
        lines.append(
            f"| {LABELS[name]} | {m['tokens_per_s']:,.0f} | {m['trained_per_s']:,.0f} | {m['step_s']:.3f} | "
            f"{m['trained_per_s'] / ours['trained_per_s']:.2f} | {m['final_loss']:.4f} |"
        )
    word = (
        "met in every run pair" if all(p >= 1.4 for p in pairs) else "met on the median" if ratio >= 1.4 else "NOT met"
    )
    lines += [
        "",
        f"- ours vs TRL (LoRA), trained tokens/s: **{ratio:.2f}x** (run pairs {', '.join(f'{p:.2f}' for p in pairs)}; "
        f"target >= 1.40x): {word}.",
    ]
    if agreement:
        lines += [
            f"- loss agreement on identical rows ({len(agreement['ours'])} steps, same initial adapters): max "
            f"relative difference **{agreement['max_rel_trl']:.2e}** (target <= 1e-5); trained targets per step "
            f"equal: {agreement['ours_trained'] == agreement['trl_trained']}.",
            "",
            "| step | ours | TRL on our rows | rel. diff |",
            "|---|---|---|---|",
        ]
        for i, (a, b) in enumerate(zip(agreement["ours"], agreement["trl_rows"], strict=False)):
            lines.append(f"| {i + 1} | {a:.6f} | {b:.6f} | {abs(b - a) / abs(a):.2e} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    restore = install_lora()
    try:
        return _main(argv)
    finally:
        restore()


def _main(argv):
    if "--worker" in argv:
        return peers.run_worker(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--conversations", type=int, default=2000)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--shape", default="small", choices=sorted(peers.common.SHAPES))
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=str(REPO / "runs" / "bench-peers"), help="scratch directory (cached inputs)")
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--in-process", action="store_true", help="TRL in this process (smoke test; timings not fair)")
    p.add_argument("--json", default=None, help="also write every measurement to this JSON file")
    p.add_argument("--results", default=None, help="also write the markdown report to this file")
    a = p.parse_args(argv)
    t_start, load_start = time.perf_counter(), os.getloadavg()
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(a.threads)
    info = peers.setup(a, work)
    spec = {
        "model_dir": info["model_dir"],
        "data_dir": info["data_dir"],
        "steps": a.steps,
        "threads": a.threads,
        "device": "cpu",
        "trainer_ga": 1,
        "ours_micro_batch": 1,
        "_dataset": info["dataset"],
        "seq": peers.SEQ,
        "rows_per_step": peers.ROWS_PER_STEP,
    }
    env = peers._env(a.threads)
    per_run = {"ours": [], "trl": []}
    for rep in range(a.repeats):
        for name in per_run:
            r = run_contestant(name, spec, work, f"lora-r{rep}", env, a.timeout, a.in_process)
            per_run[name].append(r)
            s = peers.summarize(r, a.warmup)
            print(
                f"[run {rep + 1}/{a.repeats}] {name:5s} {s['step_s']:.3f} s/step {s['trained_per_s']:8,.0f} trained "
                f"tok/s  loss {r['losses'][-1]:.4f}",
                flush=True,
            )
    r = run_contestant("trl_rows", spec, work, "lora-agree", env, a.timeout, a.in_process)
    ours0 = per_run["ours"][0]
    agreement = {
        "ours": ours0["losses"],
        "trl_rows": r["losses"],
        "max_rel_trl": max(abs(x - y) / abs(y) for x, y in zip(r["losses"], ours0["losses"], strict=False)),
        "ours_trained": ours0["trained"],
        "trl_trained": r["trained"],
    }
    from backend.config import load_train_config
    from backend.lora import apply_lora
    from backend.modeling import load_model

    cfg = load_train_config(peers.ours_config(spec, work / "unused"))
    trainable = sum(
        p.numel()
        for p in apply_lora(load_model(spec["model_dir"]), cfg.model.base_model.peft).parameters()
        if p.requires_grad
    )
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "command": "python bench/peers_lora.py " + " ".join(argv),
        "wall_min": (time.perf_counter() - t_start) / 60,
        "threads": a.threads,
        "load": load_start + os.getloadavg(),
        "shape": a.shape,
        "num_parameters": info["num_parameters"],
        "trainable": trainable,
        "steps": a.steps,
        "warmup": a.warmup,
        "repeats": a.repeats,
    }
    report = build_report(meta, per_run, agreement)
    print("\n" + report)
    if a.json:
        Path(a.json).write_text(json.dumps({"meta": meta, "runs": per_run, "agreement": agreement}, indent=1))
    if a.results:
        Path(a.results).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
