"""What a model learned: the loss of each trained token of a document, and greedy answers to fixed prompts.

    from backend.evaluate import load_scoring_model, document_loss, rank_documents, run_models
    model = load_scoring_model("runs/tiny/experiment/export/final")      # an export, a checkpoint or a base model
    d = document_loss(model, tokens, trained, eot_ids=[128009])
    d.losses      # (T,) float64: loss of token t as a target (predicted at t-1); NaN where it is not trained
    d.mean        # == the trainer's loss on this document (backend.loss.trained_token_loss / count)
    rank_documents(model, TokenDataset(data_dir, "validation"))        # [(document, mean loss, count)], worst first

    prompts = sample_prompts(validation_dataset, n=3)                   # the training loop's fixed prompts
    answers = greedy_answers(model, prompts, max_new_tokens=64, stop_ids=[...], accelerator=accelerator)

The loss goes through the trainer's own code: `backend.packing.collate` turns the document into the packed batch
the trainer would see (labels, position ids, document boundaries) and `backend.loss.trained_token_losses` is
the per-token form of the training loss on that batch. Nothing here re-derives which token is a target.

Generation under FSDP2: a sharded model all-gathers each layer's parameters inside every forward, so every rank
must run every forward. `greedy_answers` is called on all ranks with the same prompts; after each new token the
ranks agree (one all-reduce) whether to stop, so no rank leaves the loop while another still waits in a forward.
The model trains with `use_cache=False` (backend/modeling.py: the packed-training trap); generation passes its
own `DynamicCache` and `use_cache=True` per call and leaves the config untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "DocumentLoss",
    "document_loss",
    "token_losses",
    "rank_documents",
    "load_scoring_model",
    "run_models",
    "SamplePrompt",
    "sample_prompts",
    "greedy_answers",
    "SampleWriter",
]


class _Docs:
    """What collate reads (`document(i) -> (tokens, trained)`) for documents held in memory."""

    def __init__(self, docs):
        self.docs = docs

    def document(self, i: int):
        return self.docs[i]


def token_losses(model, tokens, trained) -> np.ndarray:
    """(T,) float64 loss of each token as a target under ``model``; NaN where it is not one (masked, or token 0).

    One document collated alone into one row of its own length, exactly as the trainer collates it.
    """
    import torch

    from backend.loss import trained_token_losses
    from backend.packing import Piece, collate

    tokens, trained = np.asarray(tokens), np.asarray(trained, dtype=bool)
    n = len(tokens)
    out = np.full(n, np.nan)
    if n < 2:
        return out
    batch = collate([[Piece(0, 0, n)]], _Docs([(tokens, trained)]), n)
    device = next(model.parameters()).device
    batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
    with torch.no_grad():
        losses, positions = trained_token_losses(model, batch)
    out[positions.cpu().numpy() + 1] = losses.double().cpu().numpy()  # position p predicts token p + 1
    return out


@dataclass
class DocumentLoss:
    losses: np.ndarray  # (T,) per-token loss, NaN where not a target
    mean: float  # mean over the targets: the trainer's loss on this document
    count: int  # number of targets
    eot_loss: float  # mean loss of the trained end-of-turn tokens (NaN when there is none)
    eot_count: int
    worst: list[tuple[int, float]] = field(default_factory=list)  # (token index, loss), highest first


def document_loss(model, tokens, trained, eot_ids=(), worst: int = 10) -> DocumentLoss:
    """Per-token loss of one document plus its summary: mean, end-of-turn loss, the worst tokens."""
    losses = token_losses(model, tokens, trained)
    scored = np.isfinite(losses)
    at_eot = scored & np.isin(np.asarray(tokens), list(eot_ids))
    order = np.flatnonzero(scored)[np.argsort(-losses[scored], kind="stable")][:worst]
    return DocumentLoss(
        losses=losses,
        mean=float(losses[scored].mean()) if scored.any() else float("nan"),
        count=int(scored.sum()),
        eot_loss=float(losses[at_eot].mean()) if at_eot.any() else float("nan"),
        eot_count=int(at_eot.sum()),
        worst=[(int(t), float(losses[t])) for t in order],
    )


def rank_documents(model, dataset, limit: int | None = 200, progress=None) -> list[tuple[int, float, int]]:
    """[(document, mean loss, trained targets)] of the first ``limit`` documents of a TokenDataset, worst first.

    ``progress(i, n)`` is called after each document (the studio shows it).
    """
    n = len(dataset) if limit is None else min(len(dataset), int(limit))
    ranked = []
    for d in range(n):
        tokens, trained = dataset.document(d)
        losses = token_losses(model, tokens, trained)
        scored = np.isfinite(losses)
        if scored.any():
            ranked.append((d, float(losses[scored].mean()), int(scored.sum())))
        if progress is not None:
            progress(d + 1, n)
    return sorted(ranked, key=lambda r: -r[1])


# ----------------------------------------------------------------------------------------------- models of a run


def run_models(run_dir) -> list[tuple[str, str]]:
    """[(label, path)] a run can be scored with: its base model, complete checkpoints, exports (oldest first)."""
    from backend.checkpoint import list_checkpoints

    run_dir = Path(run_dir)
    found = []
    base = _pretrained_path(run_dir / "config.yaml")
    if base:
        found.append((f"base: {base}", base))
    for step, path, complete in list_checkpoints(run_dir / "checkpoints"):
        if complete:
            found.append((f"checkpoint step {step}", str(path)))
    exports = run_dir / "export"
    if exports.is_dir():
        for d in sorted(exports.iterdir(), key=lambda p: (p.name == "final", p.name)):
            if (d / "config.json").is_file() and not d.name.endswith((".tmp", ".old")):
                found.append((f"export {d.name}", str(d)))
    return found


def _pretrained_path(config_yaml: Path) -> str | None:
    import yaml

    try:
        raw = yaml.safe_load(config_yaml.read_text(encoding="utf-8")) or {}
    except OSError:
        return None
    return (raw.get("pretrained") or {}).get("path")


def load_scoring_model(path, dtype: str = "fp32"):
    """An eval-mode model for scoring, with the trainer's attention (sdpa_packed).

    ``path``: a Hugging Face directory (an export or a base model) or a checkpoint directory of a run
    (``checkpoints/step_XXXXXX``, read by ``backend.inference.load_checkpoint_model``: the architecture of its
    config.yaml's ``pretrained.path``, the weights of ``model.safetensors``, the FSDP shards, or a LoRA
    checkpoint's adapters merged into the base).
    """
    from backend.modeling import PACKED_SDPA, load_model, prepare_for_packed_training, register_attention

    path = Path(path)
    if (path / "meta.json").is_file() and not (path / "config.json").is_file():
        # a checkpoint (safetensors, FSDP shards, or LoRA adapters over the frozen base): the one checkpoint
        # reader the Chat tab uses too, then the trainer's attention
        from backend.inference import load_checkpoint_model
        from backend.modeling import as_dtype

        if not (path / "config.yaml").is_file():
            raise ValueError(f"{path}: checkpoint without config.yaml; score an export instead")
        model, _ = load_checkpoint_model(path)
        register_attention(PACKED_SDPA)
        model.set_attn_implementation(PACKED_SDPA)
        model = prepare_for_packed_training(model.to(as_dtype(dtype)))
    else:
        model = load_model(str(path), dtype, PACKED_SDPA)
    return model.eval()


# ----------------------------------------------------------------------------------------------- sample answers


@dataclass
class SamplePrompt:
    document: int  # index in the validation split
    prompt_ids: np.ndarray  # (P,) the document up to its last trained stretch (the last assistant reply)
    reference_ids: np.ndarray  # (R,) that stretch: the reference reply, end-of-turn token included
    turn_begin: int = 0  # where the prompt's last masked stretch starts (after the previous reply): the question


def sample_prompts(dataset, n: int) -> list[SamplePrompt]:
    """The first ``n`` documents of a split that have a trained stretch after some masked tokens, cut there."""
    prompts = []
    for d in range(len(dataset)):
        if len(prompts) >= n:
            break
        tokens, trained = dataset.document(d)
        trained = np.asarray(trained, dtype=bool)
        starts = np.flatnonzero(trained[1:] & ~trained[:-1]) + 1  # starts of trained stretches
        if not len(starts):
            continue
        begin = int(starts[-1])
        end = begin + int(np.argmin(np.append(trained[begin:], False)))  # first masked token after it
        ends = np.flatnonzero(trained[: begin - 1] & ~trained[1:begin]) + 1  # ends of earlier stretches
        turn_begin = int(ends[-1]) if len(ends) else 0
        prompts.append(SamplePrompt(d, np.asarray(tokens[:begin]), np.asarray(tokens[begin:end]), turn_begin))
    return prompts


def greedy_answers(model, prompts, max_new_tokens: int, stop_ids, accelerator=None) -> list[list[int]]:
    """Greedy continuation of each prompt with a KV cache; a collective when ``accelerator`` has several ranks.

    Every rank must call this with the same prompts. Stop is decided together: after each token the ranks
    all-reduce "some rank has stopped", so all run the same number of forwards (a sharded model needs them all).
    """
    import contextlib
    import inspect

    import torch
    from transformers import DynamicCache

    from backend.modeling import hf_model

    stop_ids = {int(s) for s in stop_ids}
    # transformers renamed the forward's `past_key_values` to `cache` (the old name warns, later fails)
    params = inspect.signature(type(hf_model(model)).forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"
    device = next(model.parameters()).device
    world = accelerator.num_processes if accelerator is not None else 1
    autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    answers = []
    try:
        with torch.no_grad(), autocast:
            for p in prompts:
                cache = DynamicCache(config=hf_model(model).config)
                ids = torch.as_tensor(np.asarray(p.prompt_ids, dtype=np.int64), device=device)[None]  # (1, P)
                answer = []
                for _ in range(int(max_new_tokens)):
                    logits = model(input_ids=ids, **{cache_arg: cache}, use_cache=True, logits_to_keep=1).logits
                    token = int(logits[0, -1].argmax())
                    answer.append(token)
                    done = token in stop_ids
                    if world > 1:  # agree: if any rank stops, all stop (they should agree anyway)
                        flag = torch.tensor([float(done)], device=accelerator.device)
                        done = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
                    if done:
                        break
                    ids = torch.tensor([[token]], device=device)  # (1, 1): the cache holds the rest
                answers.append(answer)
    finally:
        model.train(was_training)
    return answers


_ROLES = ("system", "user", "assistant", "tool", "ipython", "developer", "model")


def readable_prompt(ids, tokenizer) -> str:
    """A prompt's tokens as "role: text" lines, for a table a person reads: the text between special tokens, with
    a role name that stands alone (Llama 3's headers) or on the first line of a turn (ChatML) put before its text;
    a trailing generation prompt ("assistant") is dropped. Without this, skip_special_tokens runs turns together
    ("...winterassistant").

    >>> from backend.modeling import load_tokenizer
    >>> from backend import TINY_MODEL
    >>> tok = load_tokenizer(TINY_MODEL)
    >>> text = tok.apply_chat_template([{"role": "user", "content": "hi there"}], tokenize=False,
    ...                                add_generation_prompt=True)
    >>> print(readable_prompt(tok(text, add_special_tokens=False)["input_ids"], tok))
    system: Cutting Knowledge Date: December 2023
    Today Date: 26 Jul 2024
    user: hi there
    """
    special = set(tokenizer.all_special_ids) | {
        i for t, i in tokenizer.get_added_vocab().items() if t.startswith("<") and t.endswith(">")
    }
    items, run = [], []  # ("text", str) between special tokens | ("role", name) for a role token (Phi-3's <|user|>)
    for i in [*ids, None]:
        if i is None or int(i) in special:
            text = tokenizer.decode(run).strip() if run else ""
            if text:
                items.append(("role", text) if text in _ROLES else ("text", text))
            run = []
            name = tokenizer.decode([int(i)]).strip("<|>") if i is not None else ""
            if name in _ROLES:
                items.append(("role", name))
        else:
            run.append(int(i))
    lines, role = [], None
    for kind, seg in items:
        if kind == "role":
            role = seg
            continue
        first, _, rest = seg.partition("\n")
        if first.strip() in _ROLES and rest.strip():
            role, seg = first.strip(), rest.strip()
        lines.append(f"{role}: {seg}" if role else seg)
        role = None
    return "\n".join(lines)


class _ChosenDocuments:
    """A preference split seen as its pairs' chosen documents (index k = pair k), for `sample_prompts`."""

    def __init__(self, dataset):
        self.dataset, self.chosen = dataset, dataset.pairs[:, 0]

    def __len__(self) -> int:
        return len(self.chosen)

    def document(self, k: int):
        return self.dataset.document(int(self.chosen[k]))


class SampleWriter:
    """The training loop's `samples` event: fixed validation prompts answered at each validation.

    Built once (the prompts are the split's first documents, the same at every step and every resume);
    ``write(model, accelerator, events, step)`` is a collective (every rank calls it), rank 0 writes the event:

        {"event": "samples", "step": 50, "samples": [{"document": 0, "prompt": "...", "reference": "...",
          "answer": "...", "stopped": true}, ...]}
    """

    def __init__(self, dataset, tokenizer, n: int, max_new_tokens: int):
        from backend.chat import eot_token_ids

        self.tokenizer = tokenizer
        self.pairs = getattr(dataset, "pairs", None)  # preference data: prompts from the chosen answers' documents
        self.dataset = dataset
        self.prompts = sample_prompts(_ChosenDocuments(dataset) if self.pairs is not None else dataset, n)
        self.max_new_tokens = max_new_tokens
        self.stop_ids = eot_token_ids(tokenizer)

    def write(self, model, accelerator, events, step: int) -> list[dict]:
        answers = greedy_answers(model, self.prompts, self.max_new_tokens, self.stop_ids, accelerator)
        decode = self.tokenizer.decode
        rows = [
            {
                "document": p.document,
                "prompt": readable_prompt(p.prompt_ids[p.turn_begin :], self.tokenizer),
                "reference": decode(p.reference_ids, skip_special_tokens=True).strip(),
                "answer": decode(a, skip_special_tokens=True).strip(),
                "stopped": bool(a) and a[-1] in self.stop_ids,
            }
            for p, a in zip(self.prompts, answers, strict=True)
        ]
        if self.pairs is not None:  # a pair's prompt: the reference is its chosen answer, beside it the rejected one
            for row in rows:
                chosen, rejected = (int(d) for d in self.pairs[row["document"]])
                tokens, trained = self.dataset.document(rejected)
                row.update(document=chosen, pair=row["document"])
                row["rejected"] = decode(tokens[np.asarray(trained, bool)], skip_special_tokens=True).strip()
        if accelerator.is_main_process:
            events.emit("samples", step, samples=rows)
        return rows
