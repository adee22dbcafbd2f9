"""Training throughput and loss agreement against the peers: ours (backend.train) vs TRL's SFTTrainer vs a plain
transformers Trainer vs a minimal hand-written packed loop, on the same model, data and batch, in one run.

    python bench/peers.py                 # full run, ~10-15 min on 2 CPU cores; writes bench/RESULTS.md
    python bench/peers.py --quick         # fewer steps and one repeat (~4 min); prints only, unless --write
    python bench/peers.py --steps 2 --repeats 1 --warmup 1 --conversations 200 --shape tiny --vocab 1000 \
        --no-write --work /tmp/peers      # the smoke test's configuration (tests/test_bench_smoke.py)
    python bench/peers.py --gpu --model-shape llama3-8b   # on a CUDA box: tokens/s/GPU and MFU (see README)

What runs (each contestant in its own fresh process, alternating ours, TRL, Trainer, minimal, ours, ...):
* ours     `python -m backend.train` on a config written here, over the dataset made by `backend.prepare` from
           the synthetic conversations: best-fit packing, no cross-document attention, assistant-only loss, the
           fused LM head (logits only at trained positions). Time per step = differences of the `elapsed` field
           of consecutive "train" events (logs.interval 1), so start-up, checkpointing and export are excluded.
* trl      TRL SFTTrainer, packing=True, packing_strategy="bfd" (padding-free), over the SAME tokens and assistant
           masks (pre-tokenized `input_ids` + `assistant_masks` columns, which is what TRL's own
           assistant_only_loss=True produces from a {% generation %} template; the run checks that TRL's own mask
           equals ours on the first conversations).
* trainer  transformers Trainer, batch size 2 x gradient accumulation G, dynamic padding per batch, no packing,
           labels masked to assistant tokens, documents truncated at the sequence length.
* minimal  a ~40-line loop: our packing plan's rows, positions reset per document, full LM head,
           sum CE / trained count of the step, AdamW. Same rows as ours, so its losses must equal ours.
Per step everyone runs ~4k tokens (4 packed rows of 1,024; the Trainer the number of documents with as many tokens
on average), fp32, torch threads = --threads, constant learning rate, the same AdamW settings and clipping.
Timed steps exclude the first --warmup steps; figures are medians over --repeats alternating runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

import common  # noqa: E402

CONTESTANTS = ("ours", "trl", "trainer", "minimal")
LABELS = {
    "ours": "ours (backend.train: best-fit packing, fused LM head)",
    "trl": "TRL SFTTrainer (packing bfd, padding-free, assistant-only)",
    "trainer": "transformers Trainer (dynamic padding, no packing)",
    "minimal": "minimal packed loop (full LM head, sum/count)",
}
SEQ = 1024
ROWS_PER_STEP = 4
LR = 1e-3
SEED = 1234


# ----------------------------------------------------------------------------------------------------------------
# workers: one contestant in this process, result JSON to --out
# ----------------------------------------------------------------------------------------------------------------


def _setup_torch(spec):
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(SEED)
    return torch


def _load_model(spec, torch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    return model.to(spec["device"])


def _param_groups(model, wd):
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def _step_rows(spec):
    """Our sampler's rows for each step (lists of Pieces), the rows that ours trains on."""
    from backend.dataset import TokenDataset
    from backend.packing import PackedSampler

    data = TokenDataset(spec["data_dir"], "training")
    sampler = PackedSampler(data.lengths, SEQ, SEED, "best_fit", 1000, False)
    return data, [sampler.rows(s * ROWS_PER_STEP, ROWS_PER_STEP) for s in range(spec["steps"])]


def _row_arrays(row, data):
    """One packed row -> (input_ids, labels, position_ids) numpy, padding-free; labels unshifted, the first token of
    every document is not a target."""
    import numpy as np

    ids, labels, pos = [], [], []
    for p in row:
        tok, trained = data.document(p.document)
        tok, trained = tok[p.begin : p.end], trained[p.begin : p.end]
        lab = np.where(trained, tok, -100)
        lab[0] = -100
        ids.append(tok), labels.append(lab), pos.append(np.arange(len(tok)))
    return np.concatenate(ids), np.concatenate(labels), np.concatenate(pos)


def worker_minimal(spec):
    torch = _setup_torch(spec)
    import torch.nn.functional as F

    data, steps = _step_rows(spec)
    model = _load_model(spec, torch).train()
    opt = torch.optim.AdamW(_param_groups(model, 0.1), lr=LR, betas=(0.9, 0.95))
    times, losses, tokens, trained = [], [], [], []
    t_prev = time.perf_counter()
    for rows in steps:
        batches = [_row_arrays(r, data) for r in rows]
        count = sum(int((b[1][1:] != -100).sum()) for b in batches)
        total = 0.0
        for ids, lab, pos in batches:
            ids_t = torch.from_numpy(ids).long()[None].to(spec["device"])
            lab_t = torch.from_numpy(lab).long().to(spec["device"])
            pos_t = torch.from_numpy(pos).long()[None].to(spec["device"])
            with torch.autocast("cuda", torch.bfloat16, enabled=spec["device"] != "cpu"):  # --gpu: bf16 like the rest
                logits = model(input_ids=ids_t, position_ids=pos_t, use_cache=False).logits[0]
            loss = F.cross_entropy(logits[:-1].float(), lab_t[1:], ignore_index=-100, reduction="sum")
            (loss / count).backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        now = time.perf_counter()
        times.append(now - t_prev)
        t_prev = now
        losses.append(total / count)
        tokens.append(sum(len(b[0]) for b in batches))
        trained.append(count)
    return {"step_times": times, "losses": losses, "tokens": tokens, "trained": trained, "positions": tokens}


class _Recorder:
    """Per-step wall time (between consecutive on_step_end), tokens, trained targets and the step's mean CE."""

    def __init__(self):
        self.times, self.losses, self.tokens, self.trained, self.positions = [], [], [], [], []
        self._sum = self._count = self._tok = self._pos = 0
        self._t = None

    def micro_batch(self, inputs, loss, num_items):
        labels = inputs["labels"]
        count = int((labels[..., 1:] != -100).sum())
        # loss is sum/num_items (num_items = the step's count) or a per-micro-batch mean: back to a sum
        self._sum += float(loss.detach()) * (float(num_items) if num_items is not None else count)
        self._count += count
        am = inputs.get("attention_mask")
        self._tok += int(am.sum()) if am is not None else int(inputs["input_ids"].numel())
        self._pos += int(inputs["input_ids"].numel())

    def callback(self):
        from transformers import TrainerCallback

        rec = self

        class CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                rec._t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                now = time.perf_counter()
                rec.times.append(now - rec._t)
                rec._t = now
                rec.losses.append(rec._sum / rec._count if rec._count else float("nan"))
                rec.trained.append(rec._count)
                rec.tokens.append(rec._tok)
                rec.positions.append(rec._pos)
                rec._sum = rec._count = rec._tok = rec._pos = 0

        return CB()

    def result(self):
        return {
            "step_times": self.times,
            "losses": self.losses,
            "tokens": self.tokens,
            "trained": self.trained,
            "positions": self.positions,
        }


def _recording(cls, rec):
    class Recording(cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
            rec.micro_batch(inputs, out[0] if return_outputs else out, num_items_in_batch)
            return out

    return Recording


def _common_args(spec, tmp):
    return dict(
        output_dir=str(tmp),
        max_steps=spec["steps"],
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.1,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        logging_steps=max(1, spec["steps"]),
        save_strategy="no",
        report_to="none",
        seed=SEED,
        data_seed=SEED,
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=spec["device"] == "cpu",
        bf16=spec["device"] != "cpu",
    )


def worker_trl(spec, rows_mode=False):
    torch = _setup_torch(spec)
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    if rows_mode:
        # loss agreement: exactly our rows, in our order (one packed row per example, documents as seq_lengths)
        data, steps = _step_rows(spec)
        cols = {"input_ids": [], "labels": [], "seq_lengths": []}
        for rows in steps:
            for row in rows:
                ids, lab, _ = _row_arrays(row, data)
                cols["input_ids"].append(ids.tolist())
                cols["labels"].append(lab.tolist())
                cols["seq_lengths"].append([p.end - p.begin for p in row])
        # max_length=None: rows are already <= SEQ (TRL refuses max_length with padding-free and no packing)
        extra = dict(packing=False, padding_free=True, shuffle_dataset=False, max_length=None)
    else:
        from backend.dataset import TokenDataset

        data = TokenDataset(spec["data_dir"], "training")
        cols = {"input_ids": [], "assistant_masks": []}
        for i in range(len(data)):
            t, m = data.document(i)
            cols["input_ids"].append(t.tolist())
            cols["assistant_masks"].append(m.astype("int8").tolist())
        extra = dict(packing=True, packing_strategy="bfd", padding_free=True)
    rec = _Recorder()
    extra.setdefault("max_length", SEQ)
    cfg = SFTConfig(
        per_device_train_batch_size=1,
        gradient_accumulation_steps=ROWS_PER_STEP,
        dataset_num_proc=None,
        **extra,
        **_common_args(spec, spec["tmp"]),
    )
    trainer_cls = _recording(SFTTrainer, rec)
    if rows_mode:
        import torch.utils.data as tud

        class InOrder(trainer_cls):
            def _get_train_sampler(self, *a, **k):
                return tud.SequentialSampler(self.train_dataset)

        trainer_cls = InOrder
    trainer = trainer_cls(
        model=_load_model(spec, torch),
        args=cfg,
        train_dataset=Dataset.from_dict(cols),
        processing_class=tok,
        callbacks=[rec.callback()],
    )
    trainer.train()
    return rec.result()


def worker_trainer(spec):
    torch = _setup_torch(spec)
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from backend.dataset import TokenDataset

    data = TokenDataset(spec["data_dir"], "training")
    cols = {"input_ids": [], "labels": []}
    for i in range(len(data)):
        t, m = data.document(i)
        t, m = t[:SEQ], m[:SEQ]  # truncation, as a padded trainer does with max_length
        lab = [int(x) if k else -100 for x, k in zip(t.tolist(), m.tolist(), strict=False)]
        cols["input_ids"].append(t.tolist())
        cols["labels"].append(lab)
    from transformers import AutoTokenizer

    pad = AutoTokenizer.from_pretrained(spec["model_dir"]).pad_token_id or 0

    def collate(examples):
        n = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), n), pad, dtype=torch.long)
        lab = torch.full((len(examples), n), -100, dtype=torch.long)
        am = torch.zeros((len(examples), n), dtype=torch.long)
        for i, e in enumerate(examples):
            k = len(e["input_ids"])
            ids[i, :k] = torch.tensor(e["input_ids"])
            lab[i, :k] = torch.tensor(e["labels"])
            am[i, :k] = 1
        return {"input_ids": ids, "labels": lab, "attention_mask": am}

    rec = _Recorder()
    args = TrainingArguments(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=spec["trainer_ga"],
        remove_unused_columns=False,
        **_common_args(spec, spec["tmp"]),
    )
    trainer = _recording(Trainer, rec)(
        model=_load_model(spec, torch),
        args=args,
        train_dataset=Dataset.from_dict(cols),
        data_collator=collate,
        callbacks=[rec.callback()],
    )
    trainer.train()
    return rec.result()


WORKERS = {
    "minimal": worker_minimal,
    "trl": worker_trl,
    "trl_rows": lambda s: worker_trl(s, rows_mode=True),
    "trainer": worker_trainer,
}


def run_worker(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--worker", required=True, choices=sorted(WORKERS))
    p.add_argument("--spec", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    spec = json.loads(Path(a.spec).read_text())
    global SEQ, ROWS_PER_STEP
    SEQ, ROWS_PER_STEP = spec.get("seq", SEQ), spec.get("rows_per_step", ROWS_PER_STEP)
    result = WORKERS[a.worker](spec)
    tmp = Path(a.out + ".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(a.out)


# ----------------------------------------------------------------------------------------------------------------
# orchestration
# ----------------------------------------------------------------------------------------------------------------


def _env(threads):
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    return env


def _run(cmd, env, log, timeout):
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        tail = Path(log).read_text()[-3000:]
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed (exit {proc.returncode}); log {log}:\n{tail}")
    return time.perf_counter() - t0


def setup(a, work: Path) -> dict:
    """Conversations -> jsonl; tokenizer + random model; backend.prepare dataset. Cached in `work`."""
    from backend.config import load_prepare_config
    from backend.dataset import TokenDataset
    from backend.prepare import PrepareError, prepare

    rows = common.synthetic_conversations(a.conversations, seed=a.data_seed)
    jsonl = common.write_jsonl(rows, work / "conversations.jsonl")
    model_dir = work / (f"model-{a.shape}-v{a.vocab}" + (f"-l{a.layers}" if a.layers else ""))
    info = common.build_model_dir(model_dir, rows, a.shape, a.vocab, seed=0, layers=a.layers)
    data_dir = work / f"data-{a.shape}-v{a.vocab}-n{a.conversations}"
    cfg = load_prepare_config(
        {
            "output_path": str(data_dir),
            "seed": SEED,
            "loading_workers": 1,
            "tokenize_workers": 1,
            "saving_workers": 1,
            "dataset": {"path": str(jsonl), "split": "train"},
            "tokenizer": {"path": str(model_dir)},
            "splits": {"training": 1.0},
            "chat": {"template": None, "masking": {"mode": "auto"}, "train_on": "all", "train_on_eot": True},
            "report": {"sequence_length": SEQ, "examples": 1},
        }
    )
    try:
        prepare(cfg, progress=False)  # "already prepared" when nothing changed
    except PrepareError:  # an earlier bench's output from other inputs (e.g. a rebuilt tokenizer): replace it
        prepare(cfg, force=True, progress=False)
    ds = TokenDataset(data_dir, "training")
    return {
        "rows": rows,
        "model_dir": str(model_dir),
        "data_dir": str(data_dir),
        "num_parameters": info["num_parameters"],
        "vocab": info["vocab"],
        "dataset": ds,
    }


def data_stats(ds) -> dict:
    import numpy as np

    L = ds.lengths
    return {
        "documents": int(len(L)),
        "tokens": int(L.sum()),
        "trained_tokens": int(ds.num_trained_tokens),
        "median": float(np.median(L)),
        "p99": float(np.percentile(L, 99)),
        "max": int(L.max()),
        "over_seq_docs": int((L > SEQ).sum()),
        "over_seq_tokens": int(L[L > SEQ].sum()),
    }


def packing_comparison(ds) -> dict:
    """Our best-fit (window 1,000, long documents skipped) and greedy vs TRL's pack_dataset bfd, same documents."""
    import numpy as np
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    from backend.packing import pack

    L = ds.lengths
    perm = np.random.default_rng(SEED).permutation(len(L))
    out = {}
    for name, strategy in (("ours best_fit", "best_fit"), ("ours greedy", "greedy")):
        t0 = time.perf_counter()
        s = pack(L[perm], SEQ, strategy, 1000, False).stats()
        out[name] = {
            "fill": s["fill"],
            "rows": s["rows"],
            "tokens_lost": s["tokens_skipped"],
            "documents_skipped": s["documents_skipped"],
            "documents_truncated": 0,
            "seconds": time.perf_counter() - t0,
        }
    t0 = time.perf_counter()
    trl_ds = Dataset.from_dict({"input_ids": [list(range(int(n))) for n in L[perm]]})
    packed = pack_dataset(trl_ds, SEQ, "bfd")
    kept = sum(sum(x) for x in packed["seq_lengths"])
    out["TRL pack_dataset bfd"] = {
        "fill": kept / (len(packed) * SEQ),
        "rows": len(packed),
        "tokens_lost": int(L.sum() - kept),
        "documents_skipped": 0,
        "documents_truncated": int((L > SEQ).sum()),
        "seconds": time.perf_counter() - t0,
    }
    return out


def mask_agreement(setup_info, n: int = 100) -> dict:
    """TRL's own assistant mask ({% generation %} template, return_assistant_tokens_mask) vs ours, first n rows."""
    import numpy as np
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(setup_info["model_dir"])
    template = common.LLAMA31_GENERATION_TEMPLATE.read_text()
    ds = setup_info["dataset"]
    same_ids = same_mask = 0
    diff_tokens = total = 0
    for i, row in enumerate(setup_info["rows"][:n]):
        enc = tok.apply_chat_template(
            row["messages"], chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask = np.asarray(enc["input_ids"]), np.asarray(enc["assistant_masks"]).astype(bool)
        t, m = ds.document(i)
        if len(ids) == len(t) and (ids == t).all():
            same_ids += 1
            same_mask += int((mask == m).all())
            diff_tokens += int((mask != m).sum())
            total += len(t)
    return {
        "rows": n,
        "same_tokens": same_ids,
        "same_mask": same_mask,
        "differing_tokens": diff_tokens,
        "tokens": total,
    }


def ours_config(spec, run_dir: Path) -> dict:
    return {
        "training": {
            "train_iters": spec["steps"],
            "test_iters": 0,
            "logs": {"interval": 1},
            "evaluations": {"validation": {"iterations": 0, "interval": 0}},
            "checkpoint": {"interval": 0, "keep": 1},
            "export": {"format": "llama", "interval": 0},
        },
        "batch": {
            "micro_batch_size": spec["ours_micro_batch"],
            "sequence_length": SEQ,
            "batch_size": ROWS_PER_STEP,
            "cross_document_attention": False,
        },
        "data": {
            "datasets": {
                "training": {"type": "file", "path": str(Path(spec["data_dir"]) / "fast_llm_config_training.yaml")}
            },
            "truncate_documents": False,
            "sampling": {"use_loss_masking_spans": True, "seed": SEED, "packing": "best_fit"},
        },
        "optimizer": {
            "weight_decay": 0.1,
            "beta_1": 0.9,
            "beta_2": 0.95,
            "gradient_norm_clipping": 1.0,
            "learning_rate": {"base": LR, "minimum": LR, "decay_style": "constant", "warmup_iterations": 0},
        },
        "pretrained": {"format": "llama", "path": spec["model_dir"], "model_weights": True},
        "model": {
            "base_model": {
                "transformer": {"use_flash_attention": spec["device"] != "cpu"},
                "cross_entropy_impl": spec.get("ours_ce", "fused"),
            },
            "multi_stage": {"zero_stage": 0},
            "distributed": {"training_dtype": "fp32" if spec["device"] == "cpu" else "bf16", "seed": SEED},
        },
        "run": {"experiment_dir": str(run_dir), "num_processes": 1},
    }


def run_ours(spec, work: Path, tag: str, env, timeout) -> dict:
    import yaml

    from backend.events import read_events
    from backend.packing import PackedSampler

    run_dir = work / f"ours-{tag}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a leftover checkpoint would be resumed
    run_dir.mkdir(parents=True)
    cfg_path = work / f"ours-{tag}.yaml"
    cfg_path.write_text(yaml.safe_dump(ours_config(spec, run_dir), sort_keys=False))
    wall = _run([sys.executable, "-m", "backend.train", str(cfg_path)], env, work / f"ours-{tag}.log", timeout)
    events, _ = read_events(run_dir / "events.jsonl")
    train = sorted((e for e in events if e.get("event") == "train"), key=lambda e: e["step"])
    elapsed = [e["elapsed"] for e in train]
    times = [elapsed[0]] + [b - a for a, b in zip(elapsed, elapsed[1:], strict=False)]
    # real (non-padding) tokens per step: the same sampler the trainer used
    ds = spec["_dataset"]
    sampler = PackedSampler(ds.lengths, SEQ, SEED, "best_fit", 1000, False)
    tokens = [
        sum(p.end - p.begin for r in sampler.rows(s * ROWS_PER_STEP, ROWS_PER_STEP) for p in r)
        for s in range(len(train))
    ]
    shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "step_times": times,
        "losses": [e["loss"] for e in train],
        "trained": [e["trained_tokens"] for e in train],
        "tokens": tokens,
        "positions": [ROWS_PER_STEP * SEQ] * len(train),
        "wall": wall,
    }


def run_contestant(name, spec, work: Path, tag: str, env, timeout, in_process=False) -> dict:
    if name == "ours":
        return run_ours(spec, work, tag, env, timeout)
    if in_process:  # the smoke test: no fresh interpreter per run (imports cost more than 2 steps)
        t0 = time.perf_counter()
        tmp = work / f"{name}-{tag}.tmp"
        result = WORKERS[name]({**{k: v for k, v in spec.items() if not k.startswith("_")}, "tmp": str(tmp)})
        shutil.rmtree(tmp, ignore_errors=True)
        return {**result, "wall": time.perf_counter() - t0}
    spec_path = work / f"{name}-{tag}.spec.json"
    tmp = work / f"{name}-{tag}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    spec_path.write_text(json.dumps({**{k: v for k, v in spec.items() if not k.startswith("_")}, "tmp": str(tmp)}))
    out = work / f"{name}-{tag}.json"
    out.unlink(missing_ok=True)
    wall = _run(
        [sys.executable, str(BENCH / "peers.py"), "--worker", name, "--spec", str(spec_path), "--out", str(out)],
        env,
        work / f"{name}-{tag}.log",
        timeout,
    )
    shutil.rmtree(tmp, ignore_errors=True)
    return {**json.loads(out.read_text()), "wall": wall}


def summarize(result: dict, warmup: int) -> dict:
    """One run -> rates over the timed steps (steps after the warm-up)."""
    sl = slice(warmup, None) if len(result["step_times"]) > warmup else slice(0, None)
    t = sum(result["step_times"][sl])
    return {
        "step_s": statistics.median(result["step_times"][sl]),
        "tokens_per_s": sum(result["tokens"][sl]) / t,
        "trained_per_s": sum(result["trained"][sl]) / t,
        "final_loss": statistics.fmean(result["losses"][-min(3, len(result["losses"])) :]),
        "loss_last": result["losses"][-1],
        "tokens_per_step": statistics.fmean(result["tokens"]),
        "trained_per_step": statistics.fmean(result["trained"]),
    }


def fmt(x, digits=0):
    return f"{x:,.{digits}f}"


def build_report(meta, per_run, agreement, packing, masks) -> str:
    """Markdown results section (RESULTS.md)."""
    med = {}
    for name, runs in per_run.items():
        s = [summarize(r, meta["warmup"]) for r in runs]
        med[name] = {k: statistics.median(x[k] for x in s) for k in s[0]}
    base = med["ours"]
    peak = meta["peak_flops"]
    n = meta["num_parameters"]
    lines = [
        "## Results",
        "",
        f"Measured {meta['date']} by `{meta['command']}` ({meta['wall_min']:.1f} min).",
        f"Machine: {meta['machine']}. torch {meta['torch']}, transformers {meta['transformers']}, TRL {meta['trl']}; "
        f"torch threads {meta['threads']}; fp32. Load average (1/5/15 min) at start "
        f"{'/'.join(f'{x:.1f}' for x in meta['load'][:3])}, at end {'/'.join(f'{x:.1f}' for x in meta['load'][3:])} "
        "(other processes share these cores: alternation keeps the ratios fair, absolute rates drop). "
        "fp32 matmul rate measured in the same run: "
        f"**{peak / 1e9:,.0f} GFLOP/s** (1,024² matmuls; the best of {len(meta['peaks'])} measurements taken "
        f"between the runs, median {statistics.median(meta['peaks']) / 1e9:,.0f}).",
        f"Model: Llama architecture, shape `{meta['shape']}`, {n / 1e6:.2f}M parameters (vocab {meta['vocab']}), "
        f"random init shared by all contestants. Data: {meta['data']['documents']:,} synthetic conversations, "
        f"median {meta['data']['median']:.0f} tokens, p99 {meta['data']['p99']:.0f}, "
        f"{meta['data']['over_seq_docs']} longer than {SEQ} "
        f"({meta['data']['over_seq_tokens'] / meta['data']['tokens']:.1%} "
        f"of tokens). Sequence length {SEQ}; {meta['steps']} optimizer steps of ~{ROWS_PER_STEP * SEQ:,} tokens "
        f"(ours/TRL/minimal: {ROWS_PER_STEP} packed rows, micro-batch 1; Trainer: 2 x GA {meta['trainer_ga']} "
        f"documents); first {meta['warmup']} steps excluded; medians of {meta['repeats']} alternating runs.",
        "",
        "| trainer | tokens/s | trained tokens/s | s / step | trained tok/s vs ours | tokens/s vs ours "
        "| step time vs ours | MFU (6·N·tok/s / peak) | final loss (mean of last 3 steps) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in per_run:
        m = med[name]
        lines.append(
            f"| {LABELS[name]} | {fmt(m['tokens_per_s'])} | {fmt(m['trained_per_s'])} | {m['step_s']:.3f} | "
            f"{m['trained_per_s'] / base['trained_per_s']:.2f} | {m['tokens_per_s'] / base['tokens_per_s']:.2f} | "
            f"{m['step_s'] / base['step_s']:.2f} | {6 * n * m['tokens_per_s'] / peak:.1%} | {m['final_loss']:.4f} |"
        )
    lines += [
        "",
        "Per run (s/step, trained tokens/s): "
        + "; ".join(
            f"{name}: "
            + ", ".join(
                f"{summarize(r, meta['warmup'])['step_s']:.3f}/{summarize(r, meta['warmup'])['trained_per_s']:,.0f}"
                for r in runs
            )
            for name, runs in per_run.items()
        )
        + ".",
        "",
    ]

    # targets: the median ratio, and the ratio of each pair of back-to-back runs (ours run i vs peer run i), so that
    # a ratio inside the run-to-run noise is not called a win
    def verdict(name, target, strict=False):
        r = base["trained_per_s"] / med[name]["trained_per_s"]
        pairs = [
            summarize(o, meta["warmup"])["trained_per_s"] / summarize(x, meta["warmup"])["trained_per_s"]
            for o, x in zip(per_run["ours"], per_run[name], strict=False)
        ]
        ok = (lambda v: v > target) if strict else (lambda v: v >= target)
        word = (
            "met in every run pair"
            if all(map(ok, pairs))
            else "met on the median but NOT in every run pair (inside the noise)"
            if ok(r)
            else "NOT met"
        )
        return (
            f"**{r:.2f}x** (run pairs {', '.join(f'{v:.2f}' for v in pairs)}; target {'>' if strict else '>='} "
            f"{target:.2f}x): {word}"
        )

    t = []
    if "trl" in med:
        t.append("- ours vs TRL, trained tokens/s: " + verdict("trl", 1.4) + ".")
    if "trainer" in med:
        t.append("- ours vs padded Trainer, trained tokens/s: " + verdict("trainer", 1.15) + ".")
    if "minimal" in med:
        r2 = base["tokens_per_s"] / med["minimal"]["tokens_per_s"]
        t.append(
            f"- ours vs the minimal packed loop (same rows), trained tokens/s: {verdict('minimal', 1.0, True)}; "
            f"tokens/s {r2:.2f}x. FACTS' minimal loop ran 2,866 tokens/s on an idle machine; this run's ours: "
            f"{fmt(base['tokens_per_s'])} tokens/s (see the load average above)."
        )
    lines += ["Targets (FACTS.md, same run, same machine):", ""] + t + [""]
    if agreement:
        lines += [
            "### Loss agreement (identical rows, order and initialization)",
            "",
            "| step | ours | TRL on our rows | rel. diff | minimal loop | rel. diff |",
            "|---|---|---|---|---|---|",
        ]
        for i, (a, b, c) in enumerate(
            zip(agreement["ours"], agreement["trl_rows"], agreement["minimal"], strict=False)
        ):
            lines.append(
                f"| {i + 1} | {a:.6f} | {b:.6f} | {abs(b - a) / abs(a):.2e} | {c:.6f} | {abs(c - a) / abs(a):.2e} |"
            )
        lines += [
            "",
            f"Max relative difference over {len(agreement['ours'])} steps: TRL {agreement['max_rel_trl']:.2e}, "
            f"minimal loop {agreement['max_rel_minimal']:.2e}. Trained targets per step: ours "
            f"{agreement['ours_trained']}, TRL {agreement['trl_trained']}.",
            "",
        ]
    if masks:
        lines += [
            f"Mask check: TRL's own `{{% generation %}}` mask (llama-generation template, "
            f"`return_assistant_tokens_mask=True`) vs ours on the first {masks['rows']} conversations: same "
            f"tokens in {masks['same_tokens']}, same mask in {masks['same_mask']}, "
            f"{masks['differing_tokens']} of {masks['tokens']:,} tokens differ.",
            "",
        ]
    if packing:
        lines += [
            "### Packing fill on the same documents (sequence length 1,024)",
            "",
            "| packer | fill | rows | tokens lost | documents skipped | documents truncated | time |",
            "|---|---|---|---|---|---|---|",
        ]
        total = meta["data"]["tokens"]
        for name, p in packing.items():
            lines.append(
                f"| {name} | {p['fill']:.4f} | {p['rows']:,} | {p['tokens_lost']:,} "
                f"({p['tokens_lost'] / total:.1%}) | {p['documents_skipped']} | {p['documents_truncated']} | "
                f"{p['seconds']:.2f} s |"
            )
        lines.append("")
    return "\n".join(lines)


def write_results(text: str, path: Path):
    # bench_dpo.py's section (after its marker) is kept
    marker = "<!-- bench_dpo.py: from here on -->"
    kept = "\n" + marker + path.read_text().split(marker, 1)[1] if path.exists() and marker in path.read_text() else ""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text("<!-- written by `python bench/peers.py`; do not edit by hand -->\n\n" + text + "\n" + kept)
    tmp.replace(path)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--worker" in argv:
        return run_worker(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="6 steps, 1 repeat, no RESULTS.md unless --write")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 12; quick 6)")
    p.add_argument("--warmup", type=int, default=None, help="steps excluded from timing (default 2; quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="alternating runs per contestant (default 3; quick 1)")
    p.add_argument("--conversations", type=int, default=2000)
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic conversations")
    p.add_argument("--shape", "--model-shape", dest="shape", default=None, choices=sorted(common.SHAPES))
    p.add_argument("--vocab", type=int, default=8000, help="BPE vocabulary before special tokens")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--contestants", default=",".join(CONTESTANTS))
    p.add_argument("--agreement-steps", type=int, default=None, help="K steps of the loss agreement (default: --steps)")
    p.add_argument("--work", default=str(REPO / "runs" / "bench-peers"), help="scratch directory (cached inputs)")
    p.add_argument("--write", action="store_true", help="write bench/RESULTS.md even with --quick")
    p.add_argument("--no-write", action="store_true", help="never write bench/RESULTS.md")
    p.add_argument("--results", default=str(BENCH / "RESULTS.md"))
    p.add_argument("--timeout", type=int, default=900, help="seconds per contestant run")
    p.add_argument("--gpu", action="store_true", help="CUDA device, bf16, flash-attention (GPU box only)")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length (default 1024; --gpu 4096)")
    p.add_argument("--rows-per-step", type=int, default=None, help="packed rows per optimizer step (default 4)")
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help="override the shape's number of layers (e.g. an 8B-wide model with fewer layers that fits one GPU)",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="MFU denominator per device instead of the measured matmul rate (H100 SXM bf16 dense: 989)",
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run TRL/Trainer/minimal in this process (smoke test only: timings are then not comparable)",
    )
    p.add_argument("--report-from", default=None, help="re-render the report from a --json file, run nothing")
    p.add_argument("--json", default=None, help="also write every measurement to this JSON file")
    a = p.parse_args(argv)
    if a.report_from:
        d = json.loads(Path(a.report_from).read_text())
        report = build_report(d["meta"], d["runs"], d["agreement"], d["packing"], d["masks"])
        print(report)
        if not a.no_write:
            write_results(report, Path(a.results))
        return 0
    a.steps = a.steps or (6 if a.quick else 12)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.quick else 2)
    a.repeats = a.repeats or (1 if a.quick else 3)
    a.shape = a.shape or ("llama3-8b" if a.gpu else "small")
    if a.gpu:
        import torch

        if not torch.cuda.is_available():
            p.error("--gpu: no CUDA device visible to torch on this machine (this harness's GPU path needs one)")
        if a.shape == "llama3-8b":
            a.vocab = 128000
    global SEQ, ROWS_PER_STEP
    SEQ = a.seq_len or (4096 if a.gpu else 1024)
    ROWS_PER_STEP = a.rows_per_step or (8 if a.gpu else 4)
    names = [c for c in a.contestants.split(",") if c]
    bad = [c for c in names if c not in CONTESTANTS]
    if bad or "ours" not in names:
        p.error(f"--contestants: {bad or 'ours is missing'}; choose from {', '.join(CONTESTANTS)} (ours required)")
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)

    import torch

    torch.set_num_threads(a.threads)
    print(f"[setup] conversations, tokenizer, model ({a.shape}), backend.prepare -> {work}", flush=True)
    info = setup(a, work)
    ds = info["dataset"]
    stats = data_stats(ds)
    mean_len = stats["tokens"] / stats["documents"]
    trainer_ga = max(1, round(ROWS_PER_STEP * SEQ * 0.98 / mean_len / 2))
    print(
        f"[setup] {info['num_parameters'] / 1e6:.2f}M parameters, vocab {info['vocab']}; "
        f"{stats['documents']} documents, "
        f"median {stats['median']:.0f}, p99 {stats['p99']:.0f} tokens; Trainer GA {trainer_ga}",
        flush=True,
    )
    device = "cuda" if a.gpu else "cpu"
    peak = common.matmul_peak_flops(
        4096 if a.gpu else 1024, dtype=torch.bfloat16 if a.gpu else torch.float32, device=device
    )
    peaks = [peak]
    print(f"[peak] matmul {peak / 1e9:,.0f} GFLOP/s ({'bf16' if a.gpu else 'fp32'}, {a.threads} threads)", flush=True)
    packing = packing_comparison(ds)
    masks = mask_agreement(info)
    spec = {
        "model_dir": info["model_dir"],
        "data_dir": info["data_dir"],
        "steps": a.steps,
        "threads": a.threads,
        "device": device,
        "trainer_ga": trainer_ga,
        "ours_micro_batch": 1,
        "_dataset": ds,
        "seq": SEQ,
        "rows_per_step": ROWS_PER_STEP,
    }
    env = _env(a.threads)
    per_run = {n: [] for n in names}
    for rep in range(a.repeats):
        for name in names:
            r = run_contestant(name, spec, work, f"r{rep}", env, a.timeout, a.in_process)
            # re-measure the matmul rate between runs: on a shared machine the best one is the closest to the peak
            peaks.append(
                common.matmul_peak_flops(
                    4096 if a.gpu else 1024,
                    seconds=0.5 if a.in_process else 1.0,
                    dtype=torch.bfloat16 if a.gpu else torch.float32,
                    device=device,
                )
            )
            per_run[name].append(r)
            s = summarize(r, a.warmup)
            print(
                f"[run {rep + 1}/{a.repeats}] {name:8s} {s['step_s']:.3f} s/step  {s['tokens_per_s']:8,.0f} tok/s  "
                f"{s['trained_per_s']:8,.0f} trained tok/s  loss {r['losses'][-1]:.4f}  (process {r['wall']:.0f} s)",
                flush=True,
            )
    # loss agreement: TRL on exactly our rows for K steps vs ours' first run (constant LR: same schedule)
    agreement = None
    if "trl" in names:
        k = min(a.agreement_steps or a.steps, a.steps)
        r = run_contestant("trl_rows", {**spec, "steps": k}, work, "agree", env, a.timeout, a.in_process)
        ours0 = per_run["ours"][0]
        minimal = per_run["minimal"][0]["losses"][:k] if "minimal" in names else [float("nan")] * k
        rel = lambda xs: max(abs(x - y) / abs(y) for x, y in zip(xs, ours0["losses"][:k], strict=False))  # noqa: E731
        agreement = {
            "ours": ours0["losses"][:k],
            "trl_rows": r["losses"][:k],
            "minimal": minimal,
            "max_rel_trl": rel(r["losses"][:k]),
            "max_rel_minimal": rel(minimal),
            "ours_trained": ours0["trained"][:k],
            "trl_trained": r["trained"][:k],
        }
        print(
            f"[agreement] max relative loss difference over {k} steps: TRL {agreement['max_rel_trl']:.2e}, "
            f"minimal {agreement['max_rel_minimal']:.2e}",
            flush=True,
        )
    import transformers
    import trl

    peak = a.peak_tflops * 1e12 if a.peak_tflops else max(peaks)
    print(
        f"[peak] matmul rate over {len(peaks)} measurements: max {peak / 1e9:,.0f}, median "
        f"{statistics.median(peaks) / 1e9:,.0f}, min {min(peaks) / 1e9:,.0f} GFLOP/s",
        flush=True,
    )
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "command": "python bench/peers.py " + " ".join(argv),
        "wall_min": (time.perf_counter() - t_start) / 60,
        "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"{platform.system()} {platform.release()}",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "threads": a.threads,
        "load": load_start + os.getloadavg(),
        "peak_flops": peak,
        "peaks": peaks,
        "shape": a.shape,
        "num_parameters": info["num_parameters"],
        "vocab": info["vocab"],
        "data": stats,
        "steps": a.steps,
        "warmup": a.warmup,
        "repeats": a.repeats,
        "trainer_ga": trainer_ga,
    }
    report = build_report(meta, per_run, agreement, packing, masks)
    print("\n" + report)
    if a.json:
        Path(a.json).write_text(
            json.dumps(
                {"meta": meta, "runs": per_run, "agreement": agreement, "packing": packing, "masks": masks}, indent=1
            )
        )
    if not a.no_write and (a.write or not a.quick):
        write_results(report, Path(a.results))
        print(f"wrote {a.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
