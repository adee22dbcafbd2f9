"""DPO training throughput: ``backend.train`` (training.objective: dpo) against TRL's DPOTrainer, same pairs, same
model, same pairs per step, CPU, in one run; and the cost of our precomputed reference pass.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_dpo.py [--pairs 240] [--steps 8] [--warmup 2] [--repeats 2]
                                                         [--rows-per-step 2] [--seq-len 1024] [--write]

Data: the first ``--pairs`` pairs of assets/data/sample_preference.jsonl prepared by ``backend.prepare`` (our chat
template and masks); TRL receives exactly these token ids as its pre-tokenized ``prompt_ids`` / ``chosen_ids`` /
``rejected_ids`` columns (each document split at its first trained token, as tests/test_dpo_trl.py does; TRL 1.16
re-tokenizes text in ``__init__``, so ``_prepare_dataset`` is skipped). Model: assets/tiny-llama (0.9M parameters),
fp32, sigmoid loss, beta 0.1, AdamW lr 1e-4 constant, no gradient checkpointing on either side.

Contestants, each a fresh process, alternating (ours, TRL, ours, ...):

    ours  ``python -m backend.train`` on a generated YAML: pairs packed whole into rows of ``--seq-len`` (best fit),
          each pair's prompt placed once (``training.dpo.share_prompt``, the default), ``--rows-per-step`` rows per
          step (micro-batch 1 row), reference ``precompute``
    TRL   DPOTrainer, ``precompute_ref_log_probs=True``, padded batches of round(mean pairs per row of ours) pairs,
          gradient accumulation ``--rows-per-step``: the same pairs per optimizer step on average

Timing: ours from consecutive ``train`` events (their ``elapsed``), TRL from consecutive ``on_step_end`` callbacks;
the first ``--warmup`` steps are excluded; rates are summed pairs (trained tokens) / summed time; medians over the
repeats. Reference pass: a third process times ``backend.preference.reference_pass`` (what ``fit`` calls) over every
pair once; its cost is given against the same run's training time (``--steps``) and against one epoch of training.

On a shared machine the end-to-end runs see whatever load the neighbours put on it (a 10x swing between two TRL
runs was seen here), so a fourth process times forward + backward of each step's exact pairs, ours and TRL's
alternately in one process (`worker_interleaved`): the ratio of those timings is the load-independent figure. It also
times ours on the same pairs with each document whole (share_prompt: no): what placing each prompt once is worth.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
DATA = REPO / "assets" / "data" / "sample_preference.jsonl"
MODEL = REPO / "assets" / "tiny-llama"
LR = 1e-4
SEED = 1234


# ------------------------------------------------------------------------------------------------------- workers
def worker_trl(spec) -> dict:
    """TRL's DPOTrainer on the prepared pairs; per-step wall time, pairs and trained tokens."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from backend.dataset import TokenDataset

    torch.set_num_threads(spec["threads"])
    ds = TokenDataset(spec["data_dir"], "training")
    rows = [trl_example(ds, c, r) for c, r in ds.pairs]
    times, pairs, trained = [], [], []
    count = {"pairs": 0, "trained": 0, "t": None}

    class PreTokenized(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):  # rows are already TRL's tokenized columns
            return dataset

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            count["pairs"] += inputs["input_ids"].shape[0] // 2
            count["trained"] += int(inputs["completion_mask"].sum())
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            count["t"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            times.append(now - count["t"])
            pairs.append(count["pairs"])
            trained.append(count["trained"])
            count.update(t=now, pairs=0, trained=0)

    args = DPOConfig(
        output_dir=spec["tmp"],
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["trl_batch"],
        gradient_accumulation_steps=spec["rows_per_step"],
        learning_rate=LR,
        lr_scheduler_type="constant",
        beta=0.1,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=spec["trl_batch"],
        max_length=None,
        bf16=False,  # fp32 like ours (DPOConfig defaults to bf16)
        gradient_checkpointing=False,  # ours has none on CPU (DPOConfig turns it on)
        report_to=[],
        save_strategy="no",
        logging_steps=spec["steps"],
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=True,
        seed=SEED,
    )
    t0 = time.perf_counter()
    trainer = PreTokenized(
        model=AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(spec["model"]),
        callbacks=[Clock()],
    )
    setup_s = time.perf_counter() - t0  # TRL's reference log-probs are computed here
    trainer.train()
    return {"step_times": times, "pairs": pairs, "trained": trained, "setup_s": setup_s}


def worker_reference(spec) -> dict:
    """The time of our precompute pass over every pair, as `fit` runs it (same sampler, same micro-batch)."""
    import tempfile

    import torch
    from accelerate import Accelerator

    from backend.config import load_train_config
    from backend.dataset import TokenDataset
    from backend.modeling import PACKED_SDPA, load_model
    from backend.preference import reference_pass
    from backend.train import packed_sampler

    torch.set_num_threads(spec["threads"])
    cfg = load_train_config(spec["config"])
    ds = TokenDataset(spec["data_dir"], "training")
    model = load_model(spec["model"], "fp32", PACKED_SDPA)
    sampler = packed_sampler(cfg, ds)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        reference_pass(model, Accelerator(cpu=True), ds, sampler, 1, Path(tmp) / "r.npy", log=lambda *a: None)
    return {"reference_s": time.perf_counter() - t0, "pairs": int(len(ds.pairs))}


def worker_interleaved(spec) -> dict:
    """Forward + backward of one optimizer step's pairs, ours and TRL's alternately in ONE process: on a shared machine
    the end-to-end runs above see different loads; this pair of timings sees the same one. The step's pairs are our
    packed rows' (one row per forward); TRL gets exactly those pairs, one padded micro-batch per row. Reference
    log-probs are given as precomputed on both sides (zeros: the cost does not depend on their values)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from backend.dataset import TokenDataset
    from backend.modeling import PACKED_SDPA, load_model
    from backend.packing import Piece
    from backend.preference import DPO, PairSampler, collate_pairs, shared_prompt_lengths

    torch.set_num_threads(spec["threads"])
    ds = TokenDataset(spec["data_dir"], "training")
    # as backend.train packs them on CPU (training.dpo.share_prompt: each pair's prompt placed once)
    sampler = PairSampler(ds.lengths, ds.pairs, spec["seq_len"], SEED, "best_fit", shared=shared_prompt_lengths(ds))
    ours = load_model(spec["model"], "fp32", PACKED_SDPA).train()
    objective = DPO(0.1, "sigmoid", "precompute")
    pair_of = {int(c): (int(c), int(r)) for c, r in ds.pairs}
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32),
        ref_model=AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32),
        args=DPOConfig(
            output_dir=spec["tmp"],
            report_to=[],
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            max_length=None,
        ),
        train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]),
        processing_class=AutoTokenizer.from_pretrained(spec["model"]),
    )
    trainer.precompute_ref_logps = True  # read the reference from the batch, as precompute_ref_log_probs=True does
    trainer.model.train()
    ours_s, trl_s, whole_s, pairs = [], [], [], []
    zeros = np.zeros(len(ds))
    for step in range(spec["steps"]):
        rows = sampler.rows(step * spec["rows_per_step"], spec["rows_per_step"])
        ours_mbs = [collate_pairs([row], ds, spec["seq_len"], zeros) for row in rows]
        # the same pairs with each document whole (share_prompt: no), in rows exactly as long as they are
        whole_rows = [[Piece(p.document, 0, int(ds.lengths[p.document])) for p in row] for row in rows]
        whole_mbs = [collate_pairs([r], ds, sum(p.end for p in r), zeros) for r in whole_rows]
        trl_mbs = []
        for row in rows:
            examples = [trl_example(ds, *pair_of[p.document]) for p in row[0::2]]
            mb = trainer.data_collator(examples)
            mb["ref_chosen_logps"] = mb["ref_rejected_logps"] = torch.zeros(len(examples))
            trl_mbs.append(mb)
        pairs.append(sum(len(row) // 2 for row in rows))
        order = ("ours", "trl", "whole")[step % 3 :] + ("ours", "trl", "whole")[: step % 3]
        for name in order:
            t0 = time.perf_counter()
            for mb in {"ours": ours_mbs, "whole": whole_mbs, "trl": trl_mbs}[name]:
                if name == "trl":
                    trainer.compute_loss(trainer.model, mb).backward()
                else:
                    loss_sum, n, _ = objective(ours, mb)
                    (loss_sum / n).backward()
            {"ours": ours_s, "whole": whole_s, "trl": trl_s}[name].append(time.perf_counter() - t0)
    return {"ours_s": ours_s, "trl_s": trl_s, "whole_s": whole_s, "pairs": pairs}


def trl_example(ds, chosen, rejected) -> dict:
    """Our pair as TRL's columns: the shared prompt (tokens before the first trained one), then each completion."""
    out = {}
    for key, d in (("chosen_ids", chosen), ("rejected_ids", rejected)):
        tokens, mask = ds.document(int(d))
        first = int(np.argmax(mask))
        out["prompt_ids"] = tokens[:first].tolist()
        out[key] = tokens[first:].tolist()
    return out


WORKERS = {"trl": worker_trl, "reference": worker_reference, "interleaved": worker_interleaved}


# -------------------------------------------------------------------------------------------------- orchestration
def _env(threads: int) -> dict:
    return dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )


def _run(cmd, env, log: Path, timeout: int) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed (exit {proc.returncode}):\n{log.read_text()[-3000:]}")
    return time.perf_counter() - t0


def setup(a, work: Path) -> dict:
    """The first ``--pairs`` shipped pairs, prepared by backend.prepare (cached by prepare itself)."""
    from backend.dataset import TokenDataset
    from backend.prepare import prepare

    rows = DATA.read_text().splitlines()[: a.pairs]
    jsonl = work / "pairs.jsonl"
    if not jsonl.exists() or jsonl.read_text() != "\n".join(rows) + "\n":
        jsonl.write_text("\n".join(rows) + "\n")
    data_dir = work / "data"
    prepare(
        {
            "dataset": {"path": str(jsonl)},
            "tokenizer": {"path": str(a.model)},
            "output_path": str(data_dir),
            "splits": {"training": 1.0},
            "chat": {"train_on_eot": True},
        },
        progress=False,
    )
    return {"data_dir": str(data_dir), "dataset": TokenDataset(data_dir, "training")}


def ours_config(a, data_dir: str, run_dir: Path) -> dict:
    return {
        "training": {
            "objective": "dpo",
            "dpo": {"beta": 0.1, "loss": "sigmoid", "reference": "precompute"},
            "train_iters": a.steps,
            "logs": {"interval": 1},
            "checkpoint": {"interval": 0},
            "export": {"format": "llama", "interval": 0},
        },
        "batch": {"micro_batch_size": 1, "sequence_length": a.seq_len, "batch_size": a.rows_per_step},
        "data": {
            "datasets": {"training": {"type": "file", "path": f"{data_dir}/fast_llm_config_training.yaml"}},
            "truncate_documents": False,
            "sampling": {"use_loss_masking_spans": True, "seed": SEED, "packing": "best_fit"},
        },
        "optimizer": {"learning_rate": {"base": LR, "decay_style": "constant", "warmup_iterations": 0}},
        "pretrained": {"format": "llama", "path": str(a.model), "model_weights": True},
        "model": {"base_model": {"cross_entropy_impl": "fused"}, "distributed": {"training_dtype": "fp32"}},
        "run": {"experiment_dir": str(run_dir), "num_processes": 1},
    }


def run_ours(a, data_dir: str, work: Path, tag: str) -> dict:
    import yaml

    from backend.events import read_events

    run_dir = work / f"ours-{tag}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a leftover checkpoint would be resumed
    cfg = work / f"ours-{tag}.yaml"
    cfg.write_text(yaml.safe_dump(ours_config(a, data_dir, run_dir), sort_keys=False))
    wall = _run([sys.executable, "-m", "backend.train", str(cfg)], _env(a.threads), work / f"ours-{tag}.log", a.timeout)
    events, _ = read_events(run_dir / "events.jsonl")
    train = sorted((e for e in events if e.get("event") == "train"), key=lambda e: e["step"])
    elapsed = [e["elapsed"] for e in train]
    shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "step_times": [elapsed[0]] + [b - x for x, b in zip(elapsed, elapsed[1:], strict=False)],
        "pairs": [e["pairs"] for e in train],
        "trained": [e["trained_tokens"] for e in train],
        "wall": wall,
    }


def run_worker_process(name: str, spec: dict, work: Path, tag: str, a) -> dict:
    spec_path, out = work / f"{name}-{tag}.spec.json", work / f"{name}-{tag}.json"
    spec_path.write_text(json.dumps({**spec, "tmp": str(work / f"{name}-{tag}.tmp")}))
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(BENCH / "bench_dpo.py"), "--worker", name, "--spec", str(spec_path), "--out", str(out)]
    wall = _run(cmd, _env(a.threads), work / f"{name}-{tag}.log", a.timeout)
    shutil.rmtree(work / f"{name}-{tag}.tmp", ignore_errors=True)
    return {**json.loads(out.read_text()), "wall": wall}


def summarize(run: dict, warmup: int) -> dict:
    sl = slice(warmup, None) if len(run["step_times"]) > warmup else slice(0, None)
    t = sum(run["step_times"][sl])
    return {
        "step_s": statistics.median(run["step_times"][sl]),
        "pairs_per_s": sum(run["pairs"][sl]) / t,
        "trained_per_s": sum(run["trained"][sl]) / t,
        "pairs_per_step": statistics.fmean(run["pairs"]),
    }


def report(a, meta: dict, runs: dict, reference: dict) -> str:
    med = {
        name: {k: statistics.median(summarize(r, a.warmup)[k] for r in rs) for k in summarize(rs[0], a.warmup)}
        for name, rs in runs.items()
    }
    ours, trl = med["ours"], med["trl"]
    ref_s, inter = reference["reference_s"], reference["interleaved"]
    run_train_s = ours["step_s"] * a.steps
    epoch_train_s = reference["pairs"] / ours["pairs_per_s"]
    lines = [
        f"### DPO: ours vs TRL {meta['trl']} DPOTrainer (`bench/bench_dpo.py`)",
        "",
        f"{meta['date']}, {meta['machine']}. Command: `{meta['command']}`",
        "",
        f"{reference['pairs']} shipped pairs (assets/data/sample_preference.jsonl, prepared by `backend.prepare`), "
        f"assets/tiny-llama (fp32), sigmoid loss, {a.steps} steps ({a.warmup} warm-up not timed), "
        f"medians of {a.repeats} alternating runs, torch threads {a.threads}.",
        "",
        "| contestant | pairs / step | step (s) | pairs/s | trained tokens/s | vs TRL |",
        "|---|---|---|---|---|---|",
    ]
    for name, label in (("ours", "ours (`backend.train`, pairs packed)"), ("trl", "TRL DPOTrainer (padded)")):
        m = med[name]
        lines.append(
            f"| {label} | {m['pairs_per_step']:.1f} | {m['step_s']:.2f} | {m['pairs_per_s']:.2f} | "
            f"{m['trained_per_s']:.0f} | {m['pairs_per_s'] / trl['pairs_per_s']:.2f}x |"
        )
    lines += [
        "",
        f"Ours / TRL: {ours['pairs_per_s'] / trl['pairs_per_s']:.2f}x pairs/s, "
        f"{ours['trained_per_s'] / trl['trained_per_s']:.2f}x trained tokens/s (issue #24's target: >= 1.5x).",
        "",
        f"Reference pass (`reference: precompute`, every pair once, forward only): {ref_s:.1f} s, "
        f"{100 * ref_s / (ref_s + run_train_s):.0f}% of this {a.steps}-step run (pass + training), "
        f"{100 * ref_s / (ref_s + epoch_train_s):.0f}% of a one-epoch run. "
        f"TRL's setup (its own reference pass included): {statistics.median(r['setup_s'] for r in runs['trl']):.1f} s.",
        "",
        f"Same pairs, same moment (one process, ours and TRL alternately, forward + backward of each of {a.steps} "
        f"steps' pairs, {statistics.fmean(inter['pairs']):.1f} pairs a step): TRL time / ours time, median "
        f"{statistics.median(t / o for o, t in zip(inter['ours_s'], inter['trl_s'], strict=True)):.2f}x "
        f"(ours {statistics.median(inter['ours_s']):.2f} s, TRL {statistics.median(inter['trl_s']):.2f} s a step). "
        f"The same pairs with each document whole (`training.dpo.share_prompt: no`, rows exactly as long as their "
        f"pairs): TRL time / ours "
        f"{statistics.median(t / w for w, t in zip(inter['whole_s'], inter['trl_s'], strict=True)):.2f}x; placing "
        f"each prompt once is worth "
        f"{statistics.median(w / o for o, w in zip(inter['ours_s'], inter['whole_s'], strict=True)):.2f}x here.",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--worker" in argv:
        p = argparse.ArgumentParser()
        p.add_argument("--worker", choices=sorted(WORKERS))
        p.add_argument("--spec")
        p.add_argument("--out")
        w = p.parse_args(argv)
        result = WORKERS[w.worker](json.loads(Path(w.spec).read_text()))
        Path(w.out).write_text(json.dumps(result))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=240, help="first N shipped pairs")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rows-per-step", type=int, default=2, help="our packed rows per step (TRL: its GA)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=str(MODEL))
    p.add_argument("--work", default=str(REPO / "runs" / "bench-dpo"))
    p.add_argument("--timeout", type=int, default=900, help="seconds per contestant run")
    p.add_argument("--json", help="also write the raw runs here")
    p.add_argument("--write", action="store_true", help="write the table as the DPO section of --results")
    p.add_argument("--results", default=str(BENCH / "RESULTS.md"))
    a = p.parse_args(argv)
    import trl

    from backend.preference import PairSampler, shared_prompt_lengths

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    data = setup(a, work)
    ds = data["dataset"]
    # TRL's batch: our mean pairs per packed row over the run's steps, so that a step holds as many pairs
    sampler = PairSampler(ds.lengths, ds.pairs, a.seq_len, SEED, "best_fit", shared=shared_prompt_lengths(ds))
    rows = [sampler.row(i) for i in range(min(sampler.num_rows_in_epoch(0), a.steps * a.rows_per_step))]
    trl_batch = max(1, round(statistics.fmean(len(r) // 2 for r in rows)))
    cfg_path = work / "ours-reference.yaml"
    cfg_path.write_text(json.dumps(ours_config(a, data["data_dir"], work / "unused")))
    spec = {
        "data_dir": data["data_dir"],
        "model": str(a.model),
        "threads": a.threads,
        "steps": a.steps,
        "rows_per_step": a.rows_per_step,
        "trl_batch": trl_batch,
        "config": str(cfg_path),
        "seq_len": a.seq_len,
    }
    runs = {"ours": [], "trl": []}
    for k in range(a.repeats):
        runs["ours"].append(run_ours(a, data["data_dir"], work, str(k)))
        runs["trl"].append(run_worker_process("trl", spec, work, str(k), a))
        print(f"repeat {k + 1}/{a.repeats}: ours {summarize(runs['ours'][-1], a.warmup)}", flush=True)
        print(f"repeat {k + 1}/{a.repeats}: trl  {summarize(runs['trl'][-1], a.warmup)}", flush=True)
    reference = run_worker_process("reference", spec, work, "0", a)
    reference["interleaved"] = run_worker_process("interleaved", spec, work, "0", a)
    meta = {
        "trl": trl.__version__,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": f"{os.cpu_count()} cores (shared)",
        "command": "OMP_NUM_THREADS=2 python bench/bench_dpo.py " + " ".join(argv),
    }
    text = report(a, meta, runs, reference)
    print(text)
    if a.json:
        Path(a.json).write_text(json.dumps({"runs": runs, "reference": reference, "trl_batch": trl_batch}))
    if a.write:
        write_section(Path(a.results), text)
    return 0


MARKER = "<!-- bench_dpo.py: from here on -->"


def write_section(path: Path, text: str) -> None:
    """Replace this bench's section of RESULTS.md (everything after MARKER; peers.py keeps it when it rewrites)."""
    before = path.read_text().split(MARKER)[0].rstrip("\n") if path.exists() else ""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(f"{before}\n\n{MARKER}\n\n{text}\n".lstrip("\n"))
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
