"""Conversations -> rendered chat text + trained character spans -> token ids + per-token trained mask.

This module is the single source of truth for WHAT IS TRAINED: the studio preview, `backend.prepare` and the
notebooks all call `render()` then `tokenize()`.

Pipeline, for one ShareGPT row::

    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
    sample = render(row, tokenizer)                 # Masking() = automatic span finding
    sample.text            # '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n...Hi<|eot_id|>
                           #  <|start_header_id|>assistant<|end_header_id|>\\n\\nHello!<|eot_id|>'
    sample.trained_spans   # [(k, k + 16)]  -> text[k:k+16] == 'Hello!<|eot_id|>'   (half-open)
    sample.loss_masking_spans  # [(0, k - 1)]  inclusive spans NOT trained (the guide's convention)
    tok = tokenize(sample.text, sample.trained_spans, tokenizer)
    tok.input_ids          # (T,) int64, BOS exactly once
    tok.trained            # (T,) bool, True for the tokens of 'Hello!' and '<|eot_id|>'

Masking modes (`Masking`):
- ``auto`` (default). The reply of assistant message k is located in the FINAL rendering: from transformers'
  ``{% generation %}`` blocks when the template has them; else right after ``pre = render(msgs[:k],
  add_generation_prompt=True)`` when ``pre`` is a prefix of the final text (the *prefix diff*); else (templates
  that move the system prompt, add ``<think>\n`` in the generation prompt, drop reasoning from earlier turns)
  verbatim in the full rendering, in order (`_auto_turns`). A reply not written verbatim there is a
  `TemplateError` naming the message and what differs: we refuse to guess. The reply is followed by its
  *end-of-turn marker*, read from the template itself (`_eot`): the text it writes after a reply whatever comes
  next, cut where one of its output pieces ends (``<|end|><|user|>`` trains ``<|end|>``), without trailing
  whitespace. Header residue, the next turn's opening and whitespace after the marker are never trained; a marker
  that cannot be decided is not trained and reported (``eot_undecided``).
- ``delimiters``: the guide's ``get_spans`` semantics (mask from the start of the text through each start
  delimiter; train from there through and including the end delimiter), with its hangs fixed (see
  `get_spans`).

Options: ``train_on="all"|"last"`` assistant turns; ``train_on_eot`` trains the end-of-turn marker (default on:
a model that never sees its end-of-turn token as a target never learns to stop); ``final_eot``: a final reply the
template leaves open (it writes its marker only before a following message) gets that marker appended right
after it and trained (``"append"``, recorded in ``RenderedSample.appended``) or stays open (``"leave"``).

Token rule (`tokenize`): a token is trained iff its character range overlaps a trained character range
(``start < span_end and end > span_start``). A token that straddles a boundary (e.g. a merged ``"\\n\\n"`` that
ends a header and starts a reply) is therefore trained. Zero-width tokens (an added BOS) are never trained.
``trained[t]`` marks tokens that are TARGETS (labels); the model shifts labels internally.

BOS: if the text already starts with the tokenizer's BOS string (Llama 3.1, Gemma, Mistral templates write it),
the text is tokenized with ``add_special_tokens=False`` (no double BOS). If the tokenizer's post-processor would
add a BOS and the text lacks it, one BOS id is prepended. Nothing else is added at tokenization: the end-of-turn
marker (the template's, or the appended one) is the end of the document.

Modules, one responsibility each (callers import the public names from ``backend.chat``):

    backend/chat/conversations.py  Masking, errors, sample types, normalize_conversation
    backend/chat/templates.py      chat templates, end-of-turn markers, assistant spans, delimiters, render
    backend/chat/fastpath.py       the structure cache: substitution where it is proven equal to Jinja
    backend/chat/tokens.py         tokenize / tokenize_batch, the trained mask, PortableTokenizer
    backend/chat/agent.py          agent traces: turns with tool calls, tool results, reasoning
    backend/chat/health.py         check_sample (check_length), HealthReport, check_dataset
"""

from __future__ import annotations

from backend.chat.conversations import (
    PROBLEM_CODES,
    AssistantTurn,
    ChatError,
    ConversationError,
    Masking,
    Message,
    RenderedSample,
    RenderProofError,
    TemplateCapabilityError,
    TemplateError,
    normalize_conversation,
    normalize_tools,
)
from backend.chat.fastpath import render_fast_path
from backend.chat.health import HealthReport, check_dataset, check_length, check_sample
from backend.chat.templates import (
    eot_token_ids,
    get_spans,
    loss_masking_from_spans,
    render,
    render_messages,
    resolve_template,
    spans_from_loss_masking,
)
from backend.chat.tokens import PortableTokenizer, TokenizedSample, portable_spec, tokenize, tokenize_batch

__all__ = [
    "Masking",
    "ChatError",
    "ConversationError",
    "TemplateError",
    "RenderProofError",
    "TemplateCapabilityError",
    "Message",
    "normalize_tools",
    "AssistantTurn",
    "RenderedSample",
    "TokenizedSample",
    "HealthReport",
    "normalize_conversation",
    "resolve_template",
    "render_messages",
    "render",
    "render_fast_path",
    "get_spans",
    "spans_from_loss_masking",
    "loss_masking_from_spans",
    "tokenize",
    "tokenize_batch",
    "check_length",
    "check_sample",
    "PortableTokenizer",
    "portable_spec",
    "check_dataset",
    "eot_token_ids",
    "PROBLEM_CODES",
]
