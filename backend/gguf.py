"""GGUF for llama.cpp, Ollama and LM Studio: llama.cpp's own converter run on a finished Hugging Face export.

    python -m backend.export RUN_DIR [--step N] --gguf [--quant f16|bf16|q8_0|q4_k_m]
    # or in the training YAML: training.export.formats: [hf, gguf]  (+ training.export.gguf_quant)

writes, beside the HF export ``export/<name>/``::

    export/<name>/gguf/model-<quant>.gguf    weights, vocabulary, chat template, end-of-turn stop tokens
    export/<name>/gguf/Modelfile             Ollama: FROM, one PARAMETER stop per end-of-turn token, SYSTEM

No tensor-name map lives here. ``convert_hf_to_gguf.py`` and its ``conversion`` package come from the llama.cpp
that llama-cpp-python vendors (its sdist, same version as the bindings; ``scripts/dev.sh`` unpacks it into
``~/.cache/sft-studio/llama.cpp-<version>``, or set ``SFT_STUDIO_LLAMA_CPP``). f16, bf16 and q8_0 are the
converter's own outtypes; q4_k_m is the bindings' ``llama_model_quantize`` on the f16 file.

Pre-tokenizer: llama.cpp recognises a BPE pre-tokenizer by a hash of the tokenizer's output on a fixed text,
so a tokenizer it has never seen (the tiny test model's 512-token BPE) is refused. When ``tokenizer.json``'s
pre-tokenizer is exactly GPT-2's (plain ``ByteLevel`` with its regex, no prefix space), it is llama.cpp's
``gpt-2`` pre-tokenizer and we name it; any other unknown one stays an error. Either way ``check_gguf`` then
tokenizes the shipped sample conversations with llama.cpp and with the HF tokenizer and refuses the file if
one id differs, so a wrong choice cannot pass silently.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from backend.config import GGUF_QUANTS as QUANTS  # the one list of GGUF weight types (re-exported here)

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # the bindings, and the llama.cpp whose converter we run (same sdist)

GPT2_PRE = "gpt-2"  # llama.cpp's name for GPT-2's pre-tokenizer (tokenizer.ggml.pre)
SAMPLE_CONVERSATIONS = Path(__file__).resolve().parent.parent / "assets" / "data" / "sample_openai.jsonl"


class GGUFError(ValueError):
    """A GGUF that must not be shipped (vocabulary, special tokens or tokenization differ from the HF export)."""


def converter_dir() -> Path:
    """The llama.cpp source tree holding ``convert_hf_to_gguf.py`` (raises with what to do when absent)."""
    default = Path.home() / ".cache" / "sft-studio" / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"
    path = Path(os.environ.get("SFT_STUDIO_LLAMA_CPP", default))
    if not (path / "convert_hf_to_gguf.py").is_file():
        raise FileNotFoundError(
            f"llama.cpp's converter is not at {path}/convert_hf_to_gguf.py: run `bash scripts/dev.sh llama-cpp` "
            f"(builds llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} and unpacks its llama.cpp), or set "
            "SFT_STUDIO_LLAMA_CPP to a llama.cpp checkout"
        )
    return path


def gpt2_pre_tokenizer(pre_tokenizer: dict | None) -> bool:
    """Whether a tokenizer.json ``pre_tokenizer`` is GPT-2's, which llama.cpp calls ``gpt-2``.

    >>> gpt2_pre_tokenizer({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True})
    True
    >>> gpt2_pre_tokenizer({"type": "ByteLevel", "add_prefix_space": True, "use_regex": True})
    False
    >>> gpt2_pre_tokenizer({"type": "Sequence", "pretokenizers": []})
    False
    """
    return (
        bool(pre_tokenizer)
        and pre_tokenizer.get("type") == "ByteLevel"
        and pre_tokenizer.get("use_regex", True)
        and not pre_tokenizer.get("add_prefix_space", False)
    )


def modelfile(gguf_name: str, stops: list[str], system: str | None = None) -> str:
    """Ollama's Modelfile for a GGUF beside it: the chat template is in the GGUF, the stops and system here.

    >>> print(modelfile("model-q8_0.gguf", ["<|eot_id|>"], 'Be "brief".'), end="")
    FROM ./model-q8_0.gguf
    PARAMETER stop "<|eot_id|>"
    SYSTEM "Be \\"brief\\"."
    """
    lines = [f"FROM ./{gguf_name}"] + [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    if system:
        lines.append(f"SYSTEM {json.dumps(system)}")
    return "\n".join(lines) + "\n"


def stop_tokens(hf_dir: Path, tokenizer) -> list[str]:
    """The end-of-turn tokens the HF export's generation_config stops on, as text (``<|eot_id|>`` ...)."""
    gen = json.loads((Path(hf_dir) / "generation_config.json").read_text())
    eos = gen.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return [tokenizer.convert_ids_to_tokens(i) for i in ids]


def _end_of_turn_id(hf_dir: Path) -> int | None:
    """The first id generation_config.json stops on: the chat template's end-of-turn token (<|eot_id|>)."""
    eos = json.loads((hf_dir / "generation_config.json").read_text()).get("eos_token_id")
    return eos[0] if isinstance(eos, list) and eos else eos


def _run_converter(hf_dir: Path, out: Path, outtype: str) -> None:
    """convert_hf_to_gguf.py in a subprocess (it imports torch and its own gguf-py), GPT-2 pre-tokenizer named,
    the end-of-turn token written as tokenizer.ggml.eot_token_id."""
    pre = json.loads((hf_dir / "tokenizer.json").read_text()).get("pre_tokenizer")
    eot = _end_of_turn_id(hf_dir)
    cmd = [sys.executable, "-m", "backend.gguf", str(converter_dir()), GPT2_PRE if gpt2_pre_tokenizer(pre) else ""]
    cmd += ["" if eot is None else str(eot)]
    cmd += [str(hf_dir), "--outfile", str(out), "--outtype", outtype]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise GGUFError(f"llama.cpp's converter failed on {hf_dir} ({outtype}):\n{tail}")


def convert(hf_dir, out, quant: str = "f16") -> Path:
    """The HF model directory ``hf_dir`` -> the GGUF file ``out`` (written to ``out.tmp``, renamed when done)."""
    if quant not in QUANTS:
        raise ValueError(f"quant {quant!r} is not one of {', '.join(QUANTS)}")
    hf_dir, out = Path(hf_dir), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    f16 = out.with_name(out.name + ".f16.tmp")
    try:
        if quant == "q4_k_m":  # not a converter outtype: llama.cpp's quantizer on the f16 file
            _run_converter(hf_dir, f16, "f16")
            import llama_cpp

            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
            rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp).encode(), params)
            if rc != 0:
                raise GGUFError(f"llama.cpp's quantizer failed on {f16} (q4_k_m): return code {rc}")
        else:
            _run_converter(hf_dir, tmp, quant)
        tmp.replace(out)
    finally:  # a failed conversion leaves no partial file behind (gigabytes for an 8B model)
        tmp.unlink(missing_ok=True)
        f16.unlink(missing_ok=True)
    return out


def gguf_vocab(gguf_path) -> tuple[list[str], list[int]]:
    """(tokens, token types) of a GGUF file, read with the ``gguf`` package."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    tokens = reader.fields["tokenizer.ggml.tokens"]
    types = reader.fields["tokenizer.ggml.token_type"]
    words = [bytes(tokens.parts[i]).decode("utf-8") for i in tokens.data]
    return words, [int(types.parts[i][0]) for i in types.data]


def vocab_problems(hf_tokens: list[str], hf_special: dict[int, str], tokens: list[str], types: list[int]) -> list:
    """What differs between the HF vocabulary and a GGUF's: size, then each special token by id.

    >>> vocab_problems(["a", "<|eot_id|>"], {1: "<|eot_id|>"}, ["a", "<|eot_id|>"], [1, 3])
    []
    >>> vocab_problems(["a", "<|eot_id|>"], {1: "<|eot_id|>"}, ["a", "<|eot|>"], [1, 3])
    ["special token <|eot_id|> (id 1) is '<|eot|>' in the GGUF"]
    >>> vocab_problems(["a", "b"], {}, ["a"], [1])
    ["the GGUF has 1 tokens, the HF tokenizer 2 (missing from the GGUF: 'b')"]
    >>> vocab_problems(["a"], {}, ["a", "[PAD1]", "[PAD2]"], [1, 3, 3])  # padded up to config.vocab_size (Qwen)
    []
    """
    problems = []
    # llama.cpp pads the vocabulary up to config.vocab_size with [PAD<i>] tokens: those extra rows are expected
    padded = len(tokens) > len(hf_tokens) and all(t == f"[PAD{i}]" for i, t in enumerate(tokens) if i >= len(hf_tokens))
    if len(tokens) != len(hf_tokens) and not padded:
        missing = ", ".join(repr(t) for t in hf_tokens[len(tokens) :][:5])
        problems.append(
            f"the GGUF has {len(tokens)} tokens, the HF tokenizer {len(hf_tokens)}"
            + (f" (missing from the GGUF: {missing})" if missing else "")
        )
    for i, text in sorted(hf_special.items()):
        if i >= len(tokens):
            continue  # named above
        if tokens[i] != text:
            problems.append(f"special token {text} (id {i}) is {tokens[i]!r} in the GGUF")
        elif types[i] not in (3, 4):  # llama.cpp's CONTROL / USER_DEFINED: never split, never byte-decoded
            problems.append(f"special token {text} (id {i}) has type {types[i]} in the GGUF, not a control token")
    return problems


def sample_texts(tokenizer, n: int = 20, path=SAMPLE_CONVERSATIONS) -> list[str]:
    """The first ``n`` shipped sample conversations, rendered with the export's chat template."""
    texts = []
    with open(path) as f:
        for line in f:
            texts.append(tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False))
            if len(texts) == n:
                break
    return texts


def first_difference(a: list[int], b: list[int]) -> int:
    """Index of the first position where two id lists differ (the shorter length when one is a prefix).

    >>> first_difference([1, 2, 3], [1, 5, 3]), first_difference([1, 2], [1, 2, 3])
    (1, 2)
    """
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def check_gguf(gguf_path, hf_dir, texts: list[str] | None = None) -> None:
    """Refuse a GGUF whose vocabulary, special tokens or tokenization differ from the HF export's (GGUFError
    naming the token); tokenization is compared through llama.cpp itself on the sample conversations."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    vocab = tok.get_vocab()
    hf_tokens = [""] * (max(vocab.values(), default=-1) + 1)  # ids may have gaps
    for text, i in vocab.items():
        hf_tokens[i] = text
    special = {i: t.content for i, t in tok.added_tokens_decoder.items() if t.special}
    problems = vocab_problems(hf_tokens, special, *gguf_vocab(gguf_path))
    if problems:
        raise GGUFError(f"{gguf_path} does not match the HF export {hf_dir}: " + "; ".join(problems))
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    for text in sample_texts(tok) if texts is None else texts:
        ours = tok(text, add_special_tokens=False)["input_ids"]
        theirs = llm.tokenize(text.encode(), add_bos=False, special=True)
        if ours != theirs:
            k = first_difference(ours, theirs)
            got = llm.detokenize(theirs[k : k + 1], special=True).decode(errors="replace")
            want = tok.convert_ids_to_tokens(ours[k : k + 1])
            raise GGUFError(
                f"{gguf_path}: llama.cpp tokenizes a sample conversation differently from the HF tokenizer at "
                f"token {k}: HF {want} vs llama.cpp {got!r} (text starts {text[:60]!r})"
            )


def data_system_prompt(hf_dir, max_rows: int = 2000) -> str | None:
    """The system prompt the run's training data used, for the Modelfile's SYSTEM line: found when every one of the
    data's first ``max_rows`` conversations opens with the same system message (the run's config.yaml -> its
    training data -> that prepare's prepare_config.yaml -> the rows). None when the rows have no system message,
    several different ones, or the run or its data cannot be found (a bare model directory)."""
    import yaml

    from backend.chat import ChatError, normalize_conversation
    from backend.config import load_prepare_config
    from backend.documents import open_rows

    run_dir = Path(hf_dir).resolve().parent.parent  # RUN/export/<name>
    try:
        run_cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        training = Path(run_cfg["data"]["datasets"]["training"]["path"])
        cfg = load_prepare_config(str(training.parent / "prepare_config.yaml"))
        source, n_rows, form, field = open_rows(cfg)
    except Exception:  # no run around this export, or its data moved: no SYSTEM line rather than a wrong one
        return None
    if form != "chat":
        return None
    prompts = set()
    for row in source.read(source.task(0, min(n_rows, max_rows))):
        try:
            messages = normalize_conversation(row, field)
        except ChatError:
            continue
        first = messages[0] if messages else {}
        prompts.add(first.get("content") if first.get("role") == "system" else None)
        if len(prompts) > 1:
            return None
    (prompt,) = prompts or {None}
    return prompt or None


def export_gguf(hf_dir, quant: str = "f16", system: str | None = None, check: bool = True, progress=None) -> Path:
    """Convert a finished HF export to ``hf_dir/gguf/model-<quant>.gguf``, check it, write the Modelfile.
    ``progress(fraction, what)`` is told each stage (the studio's progress bar)."""
    from transformers import AutoTokenizer

    progress = progress or (lambda fraction, what: None)
    hf_dir = Path(hf_dir)
    progress(0.0, f"converting with llama.cpp ({quant})")
    out = convert(hf_dir, hf_dir / "gguf" / f"model-{quant}.gguf", quant)
    progress(0.7, "checking vocabulary and tokenization against the HF export")
    if check:
        try:
            check_gguf(out, hf_dir)
        except GGUFError:
            out.rename(out.with_name(out.name + ".rejected"))
            raise
    tok = AutoTokenizer.from_pretrained(hf_dir)
    tmp = out.parent / "Modelfile.tmp"
    system = system if system is not None else data_system_prompt(hf_dir)  # the data's own, when it had one
    tmp.write_text(modelfile(out.name, stop_tokens(hf_dir, tok), system))
    tmp.replace(out.parent / "Modelfile")
    progress(1.0, "done")
    return out


def _converter_main(argv: list[str]) -> None:
    """``python -m backend.gguf LLAMA_CPP_DIR PRE EOT convert_hf_to_gguf args...``: run llama.cpp's converter,
    naming the pre-tokenizer ``PRE`` only when the converter does not recognise the tokenizer's hash itself, and
    writing token id ``EOT`` as the end-of-turn token (the converter only reads bos/eos/pad from the HF files)."""
    llama_dir, pre, eot, args = Path(argv[0]), argv[1], argv[2], argv[3:]
    sys.path[:0] = [str(llama_dir), str(llama_dir / "gguf-py")]
    import convert_hf_to_gguf
    from conversion.base import TextModel

    recognised = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return recognised(self, tokenizer)
        except NotImplementedError:
            if not pre:
                raise
            print(f"gguf: pre-tokenizer hash unknown to llama.cpp; tokenizer.json's is GPT-2's: using {pre!r}")
            return pre

    import gguf

    write_header = gguf.GGUFWriter.write_header_to_file

    def write_header_with_eot(self, *a, **kw) -> None:  # every key/value is in by now; the header lists them
        if eot:
            self.add_eot_token_id(int(eot))
        write_header(self, *a, **kw)

    TextModel.get_vocab_base_pre = get_vocab_base_pre
    gguf.GGUFWriter.write_header_to_file = write_header_with_eot
    sys.argv = ["convert_hf_to_gguf.py", *args]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    _converter_main(sys.argv[1:])
