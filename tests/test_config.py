"""Tests of backend/config.py and backend/cli.py: every shipped YAML validates, errors name the key in plain words."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from backend import ASSETS, ROOT
from backend.cli import run_cli
from backend.config import (
    ConfigError,
    PrepareConfig,
    TrainConfig,
    check_world_size,
    config_hash,
    dump_yaml,
    field_description,
    get_field,
    iter_fields,
    load_prepare_config,
    load_train_config,
    set_field,
)

CONFIGS = sorted((ASSETS / "configs").glob("*.yaml"))
GUIDE_TRAIN = ASSETS / "configs" / "guide_train.yaml"
GUIDE_PREPARE = ASSETS / "configs" / "guide_prepare.yaml"

MINIMAL_TRAIN = {
    "data": {"datasets": {"training": {"path": "d/fast_llm_config_training.yaml"}}},
    "pretrained": {"path": "m"},
}


def _loader(path):
    return load_prepare_config if "prepare" in Path(path).name else load_train_config


def _problems(fn, *args, **kw) -> list[str]:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kw)
    return info.value.problems


def _write(tmp_path, text, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"guide_prepare.yaml", "guide_train.yaml", "tiny_prepare.yaml", "tiny_train.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_yaml_validates_and_round_trips(path):
    cfg = _loader(path)(path)
    again = _loader(path)(yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg and config_hash(again) == config_hash(cfg)


def test_guide_train_values():
    cfg = load_train_config(GUIDE_TRAIN)
    assert cfg.training.train_iters == 5000  # 5_000
    assert cfg.optimizer.learning_rate.decay_iterations == 4900
    assert cfg.optimizer.learning_rate.base == pytest.approx(2e-5)
    assert cfg.data.truncate_documents is False and cfg.batch.cross_document_attention is False
    assert cfg.data.sampling.use_loss_masking_spans is True
    assert cfg.model.base_model.transformer.use_flash_attention is True
    assert cfg.model.multi_stage.zero_stage == 3 and cfg.model.distributed.training_dtype == "bf16"
    assert cfg.training.evaluations.validation.iterations == 25
    assert cfg.data.datasets.validation.path.endswith("fast_llm_config_validation.yaml")
    assert check_world_size(cfg, 8) == 4


def test_guide_prepare_values():
    cfg = load_prepare_config(GUIDE_PREPARE)
    assert cfg.dataset.loss_masking_spans == "spans" and cfg.dataset.field == "text"
    assert cfg.dataset.trust_remote_code is True and cfg.dataset.split == "train"
    assert cfg.splits == {"training": 0.998, "validation": 0.002}
    assert cfg.tokenizer.path == "assets/tiny-llama"


def test_minimal_train_config_uses_defaults():
    cfg = load_train_config(MINIMAL_TRAIN)
    assert cfg.training.evaluations.validation.interval == 0  # off: no validation dataset given
    assert cfg.run.num_processes == 1


def test_numbers_as_yaml_writes_them(tmp_path):
    # PyYAML 1.1 reads 3e-3 (no dot) as a string and 1_000 as an int: both must become numbers.
    p = _write(
        tmp_path,
        """\
        optimizer: {learning_rate: {base: 3e-3, minimum: 1.0e-5, decay_iterations: 1_000}}
        data: {datasets: {training: {path: d}}}
        pretrained: {path: m}
        """,
    )
    lr = load_train_config(p).optimizer.learning_rate
    assert lr.base == pytest.approx(3e-3) and lr.minimum == pytest.approx(1e-5) and lr.decay_iterations == 1000


def test_typo_rejected_with_suggestion_and_file(tmp_path):
    p = _write(
        tmp_path,
        """\
        training:
          train_itrs: 10
        data: {datasets: {training: {path: d}}}
        pretrained: {path: m}
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_train_config(p)
    assert info.value.problems == ["training.train_itrs: unknown key; did you mean 'train_iters'?"]
    assert str(p) in str(info.value)


def test_unknown_key_far_from_anything_lists_valid_keys():
    (problem,) = _problems(load_train_config, {**MINIMAL_TRAIN, "run": {"zzz": 1}})
    assert problem.startswith("run.zzz: unknown key; valid keys here: experiment_dir, num_processes")


def test_key_in_wrong_section_says_where_it_belongs():
    (problem,) = _problems(load_train_config, {**MINIMAL_TRAIN, "batch": {"zero_stage": 3}})
    assert problem == "batch.zero_stage: unknown key here; it belongs at model.multi_stage.zero_stage"


def test_wrong_type_names_path_and_value():
    raw = {**MINIMAL_TRAIN, "optimizer": {"learning_rate": {"base": "fast"}}}
    assert _problems(load_train_config, raw) == ["optimizer.learning_rate.base: expected a number, got 'fast'"]


def test_bool_is_not_a_number():
    (problem,) = _problems(load_train_config, {**MINIMAL_TRAIN, "batch": {"batch_size": True}})
    assert problem.startswith("batch.batch_size: expected a number, got True")


def test_inconsistent_batch_names_the_keys():
    raw = {**MINIMAL_TRAIN, "batch": {"batch_size": 12, "micro_batch_size": 2}, "run": {"num_processes": 4}}
    (problem,) = _problems(load_train_config, raw)
    assert problem.startswith("batch.batch_size: 12 is not divisible by")
    assert "batch.micro_batch_size (2)" in problem and "run.num_processes (4)" in problem
    cfg = load_train_config({**raw, "run": {"num_processes": 2}})
    with pytest.raises(ConfigError, match="world size"):
        check_world_size(cfg, 4)
    assert check_world_size(cfg, 3) == 2


def test_all_problems_at_once(tmp_path):
    p = _write(
        tmp_path,
        """\
        training: {train_itrs: 5}
        batch: {sequence_length: 0}
        optimizer: {learning_rate: {decay_style: cosinus}}
        data: {datasets: {training: {path: d}}}
        pretrained: {path: m}
        """,
    )
    problems = _problems(load_train_config, p)
    assert len(problems) == 3, problems
    assert [q.split(":")[0] for q in problems] == [
        "training.train_itrs",
        "batch.sequence_length",
        "optimizer.learning_rate.decay_style",
    ]


@pytest.mark.parametrize(
    "section, value, key",
    [
        ("learning_rate", {"base": 1e-4, "minimum": 1e-3}, "optimizer.learning_rate.minimum"),
        (
            "learning_rate",
            {"warmup_iterations": 200, "decay_iterations": 100},
            "optimizer.learning_rate.warmup_iterations",
        ),
    ],
)
def test_learning_rate_checks(section, value, key):
    (problem,) = _problems(load_train_config, {**MINIMAL_TRAIN, "optimizer": {section: value}})
    assert problem.startswith(key + ":")


def test_decay_longer_than_training_is_allowed():
    cfg = load_train_config(GUIDE_TRAIN, ["training.train_iters=10"])
    assert cfg.optimizer.learning_rate.decay_iterations == 4900


def test_validation_without_dataset_is_an_error():
    raw = {**MINIMAL_TRAIN, "training": {"evaluations": {"validation": {"interval": 10, "iterations": 2}}}}
    (problem,) = _problems(load_train_config, raw)
    assert problem.startswith("training.evaluations.validation.interval:") and "data.datasets.validation" in problem


@pytest.mark.parametrize(
    "key, value",
    [
        ("model.multi_stage.zero_stage", 4),
        ("model.distributed.training_dtype", "int8"),
        ("training.export.format", "gguf"),
        ("training.export.gguf_quant", "q3_k"),
        ("training.checkpoint.keep", 0),
    ],
)
def test_enumerations_and_bounds(key, value):
    (problem,) = _problems(load_train_config, MINIMAL_TRAIN, [f"{key}={value}"])
    assert problem.startswith(key + ":") and str(value) in problem


@pytest.mark.parametrize("value, says", [("[gguf]", "lacks hf"), ("[hf, onnx]", "onnx")])
def test_export_formats_need_hf_and_name_the_bad_one(value, says):
    (problem,) = _problems(load_train_config, MINIMAL_TRAIN, [f"training.export.formats={value}"])
    assert problem.startswith("training.export.formats") and says in problem


def test_dtype_aliases():
    assert (
        load_train_config(MINIMAL_TRAIN, ["model.distributed.training_dtype=bfloat16"]).model.distributed.training_dtype
        == "bf16"
    )


def test_legacy_batch_keys_are_moved():
    raw = {**MINIMAL_TRAIN, "batch": {"truncate_documents": True, "use_loss_masking_spans": False}}
    cfg = load_train_config(raw)
    assert cfg.data.truncate_documents is True and cfg.data.sampling.use_loss_masking_spans is False
    assert "truncate_documents" not in cfg.batch.model_dump()
    # same value in both places: fine; different values: an error naming both keys
    both = {**raw, "data": {**MINIMAL_TRAIN["data"], "truncate_documents": True}}
    assert load_train_config(both).data.truncate_documents is True
    both["data"]["truncate_documents"] = False
    (problem,) = _problems(load_train_config, both)
    assert problem.startswith("batch.truncate_documents:") and "data.truncate_documents" in problem
    # an override of the old location sets the new one
    assert load_train_config(GUIDE_TRAIN, ["batch.truncate_documents=yes"]).data.truncate_documents is True


def test_overrides():
    cfg = load_train_config(
        GUIDE_TRAIN,
        [
            "training.train_iters=7",
            "optimizer.learning_rate.base=3e-3",
            "batch.cross_document_attention=yes",
            "run.experiment_dir=runs/x",
        ],
    )
    assert cfg.training.train_iters == 7 and cfg.optimizer.learning_rate.base == pytest.approx(3e-3)
    assert cfg.batch.cross_document_attention is True and cfg.run.experiment_dir == "runs/x"
    assert _problems(load_train_config, GUIDE_TRAIN, ["training.train_itrs=7"]) == [
        "training.train_itrs: unknown key; did you mean 'train_iters'?"
    ]
    (problem,) = _problems(load_train_config, GUIDE_TRAIN, ["training.train_iters"])
    assert "key=value" in problem
    p = load_prepare_config(GUIDE_PREPARE, ["splits={training: 1.0}", "dataset.loss_masking_spans=null"])
    assert p.splits == {"training": 1.0} and p.dataset.loss_masking_spans is None


def test_prepare_checks():
    raw = yaml.safe_load(GUIDE_PREPARE.read_text())
    raw["splits"] = {"training": 0.9, "validation": 0.2}
    raw["chat"] = {"masking": {"mode": "delimiters", "start_delimiter": "<|start|>"}}
    problems = _problems(load_prepare_config, raw)
    assert any(q.startswith("splits: fractions must sum to 1") for q in problems), problems
    assert any(q.startswith("chat.masking.end_delimiter: required") for q in problems), problems
    raw["splits"] = {"training": 1.1, "validation": -0.1}
    assert any(q == "splits.validation: must be >= 0, got -0.1" for q in _problems(load_prepare_config, raw))
    # every_turn finds the turns whose reasoning the template drops: delimiter spans name no turn (it did nothing)
    raw = yaml.safe_load(GUIDE_PREPARE.read_text())
    raw["chat"] = {
        "reasoning": "every_turn",
        "masking": {"mode": "delimiters", "start_delimiter": "a", "end_delimiter": "b"},
    }
    assert any(
        q.startswith("chat.reasoning: every_turn needs masking.mode: auto") for q in _problems(load_prepare_config, raw)
    )
    raw["chat"]["masking"] = {"mode": "auto"}
    assert load_prepare_config(raw).chat.reasoning == "every_turn"


def test_chat_to_masking_matches_chat_masking():
    cfg = load_prepare_config(
        ASSETS / "configs" / "tiny_prepare.yaml",
        [
            "chat.train_on=last",
            "chat.masking.mode=delimiters",
            "chat.masking.start_delimiter=<a>",
            "chat.masking.end_delimiter=<b>",
        ],
    )
    kwargs = cfg.chat.to_masking()
    assert kwargs == {
        "mode": "delimiters",
        "start_delimiter": "<a>",
        "end_delimiter": "<b>",
        "train_on": "last",
        "train_on_eot": True,
        "final_eot": "append",
        "train_on_tool_calls": True,
        "reasoning": "as_rendered",
    }
    chat = pytest.importorskip("backend.chat")
    assert chat.Masking(**kwargs).train_on == "last"
    leave = load_prepare_config(ASSETS / "configs" / "tiny_prepare.yaml", ["chat.final_eot=leave"])
    assert chat.Masking(**leave.chat.to_masking()).final_eot == "leave"


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    p = _write(tmp_path, "training:\n  train_iters: 5\n bad: [1\n")
    with pytest.raises(ConfigError) as info:
        load_train_config(p)
    assert str(p) in str(info.value) and "line 3" in info.value.problems[0]


def test_duplicate_key_is_an_error(tmp_path):
    p = _write(tmp_path, "training:\n  train_iters: 5\n  train_iters: 6\n")
    with pytest.raises(ConfigError, match="duplicate key 'train_iters'"):
        load_train_config(p)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_train_config(tmp_path / "nope.yaml")


def test_hash_changes_with_values_not_key_order():
    raw = yaml.safe_load(GUIDE_TRAIN.read_text())
    h = config_hash(load_train_config(raw))
    reordered = dict(reversed(list(raw.items())))
    reordered["optimizer"] = dict(reversed(list(raw["optimizer"].items())))
    assert config_hash(load_train_config(reordered)) == h
    assert config_hash(load_train_config(raw, ["optimizer.beta_2=0.999"])) != h


def test_dotted_access_and_descriptions():
    cfg = load_train_config(GUIDE_TRAIN)
    assert get_field(cfg, "optimizer.learning_rate.decay_iterations") == 4900
    new = set_field(cfg, "batch.batch_size", 64)
    assert new.batch.batch_size == 64 and cfg.batch.batch_size == 32
    with pytest.raises(ConfigError, match=r"batch\.batch_size: expected a whole number"):
        set_field(cfg, "batch.batch_size", 2.5)
    assert field_description(TrainConfig, "batch.sequence_length") == "Tokens per packed row."
    assert field_description(PrepareConfig, "splits.training").startswith("Split name")
    with pytest.raises(KeyError):
        field_description(TrainConfig, "batch.nope")
    for cls in (TrainConfig, PrepareConfig):
        for path, f in iter_fields(cls):
            assert f.description and "\n" not in f.description, path


# ----------------------------------------------------------------------------------------------------------------
# CLI


def test_cli_validate_good(capsys):
    with pytest.raises(SystemExit) as info:
        run_cli([str(GUIDE_TRAIN), "--validate", "training.train_iters=3"], "train", _never)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"OK: {GUIDE_TRAIN} is valid") and "train_iters: 3" in out


def test_cli_validate_bad(capsys, tmp_path):
    p = _write(tmp_path, "training: {train_itrs: 5}\ndata: {datasets: {training: {path: d}}}\npretrained: {path: m}\n")
    with pytest.raises(SystemExit) as info:
        run_cli([str(p), "--validate"], "train", _never)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "training.train_itrs: unknown key; did you mean 'train_iters'?" in err


def test_cli_runs_with_force(capsys):
    seen = {}

    def run(cfg, force):
        seen.update(cfg=cfg, force=force)

    with pytest.raises(SystemExit) as info:
        run_cli([str(GUIDE_PREPARE), "--force", "tokenize_workers=2"], "prepare", run)
    assert info.value.code == 0 and seen["force"] is True and seen["cfg"].tokenize_workers == 2


def test_cli_subprocess_has_no_traceback(tmp_path):
    p = _write(tmp_path, "batch: {batch_size: many}\ndata: {datasets: {training: {path: d}}}\npretrained: {path: m}\n")
    code = "import sys; from backend.cli import run_cli; run_cli(sys.argv[1:], 'train', print)"
    r = subprocess.run(
        [sys.executable, "-c", code, str(p), "--validate"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2
    assert "batch.batch_size: expected a whole number, got 'many'" in r.stderr
    assert "Traceback" not in r.stderr


def _never(*a, **k):
    raise AssertionError("run_fn must not be called")


# ------------------------------------------------------------------- every config key does something (issue 15)

# Contract fields (backend/config.py, "the config contract of the next wave") that other branches wire. The lead
# empties this list after the merge: the test fails on an entry once that field is read, so none stays by mistake.
WIRED_ELSEWHERE = {}
# The guide's keys whose every accepted value means the one thing this code does: validation is their whole effect
# (a value outside the Literal is refused), so there is nothing to read.
VALIDATED_ONLY = {
    "pretrained.format": "llama | huggingface: both are a Hugging Face directory",
    "training.export.format": "llama | huggingface: exports are always Hugging Face Llama directories",
    "data.datasets.training.type": "file: the only dataset kind",
    "data.datasets.validation.type": "file: the only dataset kind",
    "data.datasets.test.type": "file: the only dataset kind",
}


def _code_only(source: str) -> str:
    """``source`` without comments and docstrings: a key named in prose is not read."""
    import ast
    import io
    import tokenize

    drop = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(getattr(first.value, "value", None), str):
                drop.update(range(first.lineno - 1, first.end_lineno))
    comments = {
        tok.start[0] - 1: tok.start[1]
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    lines = source.splitlines()
    return "\n".join("" if i in drop else line[: comments.get(i, len(line))] for i, line in enumerate(lines))


def _unread_fields() -> list[str]:
    """Dotted keys of TrainConfig and PrepareConfig that no module of backend/ or studio/ reads.

    backend/config.py (which declares and validates them), comments and docstrings do not count; a lexical net,
    not a proof. A key counts as read when its dotted path appears, or its ``parent.leaf`` access; a leaf name
    used by one key only may also be reached through an alias (``b = cfg.batch; b.sequence_length``): then
    ``.leaf`` plus the parent's name in the same file is enough."""
    import collections
    import re

    from backend import ROOT
    from backend.config import PrepareConfig, TrainConfig, iter_fields

    files = [p for d in ("backend", "studio") for p in (ROOT / d).rglob("*.py") if p.name != "config.py"]
    texts = [_code_only(p.read_text()) for p in files]
    paths = [p for cls in (TrainConfig, PrepareConfig) for p, _ in iter_fields(cls)]
    leaf_count = collections.Counter(p.split(".")[-1] for p in paths)
    unread = []
    for path in paths:
        *parents, leaf = path.split(".")
        parent = parents[-1] if parents else None
        exact = [r"\b" + re.escape(path) + r"\b"]  # the dotted path, e.g. in a studio binding table
        if parent:
            exact.append(rf"\b{parent}\.{leaf}\b|\b{parent}\[[\"']{leaf}[\"']\]")
        alias = rf"\.{leaf}\b|\[[\"']{leaf}[\"']\]" if leaf_count[leaf] == 1 or not parent else None
        if not any(
            any(re.search(p, text) for p in exact)
            or (alias and re.search(alias, text) and (not parent or re.search(rf"\b{parent}\b", text)))
            for text in texts
        ):
            unread.append(path)
    return unread


def test_every_config_key_is_read_somewhere():
    from backend.config import PrepareConfig, TrainConfig, iter_fields

    known = {p for cls in (TrainConfig, PrepareConfig) for p, _ in iter_fields(cls)}
    listed = {**WIRED_ELSEWHERE, **VALIDATED_ONLY}
    assert set(listed) <= known, f"allow-listed keys that do not exist: {sorted(set(listed) - known)}"
    unread = set(_unread_fields())
    silent = sorted(unread - set(listed))
    assert not silent, f"config keys accepted but read nowhere in backend/ or studio/: {silent}"
    now_read = sorted(set(WIRED_ELSEWHERE) - unread)
    assert not now_read, f"these keys are read now: remove them from WIRED_ELSEWHERE: {now_read}"


@pytest.mark.parametrize("size, ok", [("5GB", True), ("500MB", True), ("2GiB", True), ("5G", False), ("5gb", False)])
def test_export_shard_size_is_checked_before_the_run(size, ok):
    """transformers raises deep inside save_pretrained on "5G" (after the whole run when exporting only at the
    end) and reads "5gb" as gigabits (625 MB shards): both are config errors naming the key."""
    overrides = [f"training.export.max_shard_size={size}"]
    if ok:
        assert load_train_config(ASSETS / "configs" / "tiny_train.yaml", overrides).training.export.max_shard_size
    else:
        with pytest.raises(ConfigError, match="training.export.max_shard_size"):
            load_train_config(ASSETS / "configs" / "tiny_train.yaml", overrides)
