"""What a resume accepts (backend.compat.check_resume), checked on a checkpoint directory written here, in
milliseconds: the CLI resume tests (tests/test_train.py) prove resuming end to end; these pin each rule, so that the
mutation run (tests/MUTATION.md) has a fast test for every line that decides whether a run continues on the rows
and the model it was trained with.
"""

import json

import pytest
import yaml

from backend import ASSETS
from backend.compat import check_resume, is_safe_change
from backend.config import ConfigError, dump_yaml, load_train_config

TRAIN = ASSETS / "configs" / "tiny_train.yaml"
DATA = {"prepare_config_hash": "abc", "num_documents": 10, "num_tokens": 1000}


def checkpoint(tmp_path, overrides=(), data=DATA, raw=None, name="step_000002"):
    """A checkpoint directory as the trainer writes it: the resolved config and the data's fingerprint."""
    path = tmp_path / name
    path.mkdir()
    text = dump_yaml(load_train_config(TRAIN, list(overrides))) if raw is None else yaml.safe_dump(raw)
    (path / "config.yaml").write_text(text)
    (path / "meta.json").write_text(json.dumps({"data": data}))
    return path


def resume(path, overrides=(), data=DATA):
    said = []
    lines = check_resume(path, load_train_config(TRAIN, list(overrides)), data, log=said.append)
    assert said == lines
    return lines


def test_the_same_settings_resume_silently(tmp_path):
    assert resume(checkpoint(tmp_path)) == []


def test_a_checkpoint_without_its_config_resumes_with_a_line(tmp_path):
    path = checkpoint(tmp_path)
    (path / "config.yaml").unlink()
    said = []
    assert check_resume(path, load_train_config(TRAIN), DATA, log=said.append) == []
    assert said == [f"resume: {path / 'config.yaml'} is missing, so config changes cannot be checked"]


def test_safe_changes_are_accepted_and_listed(tmp_path):
    stretch = "optimizer.learning_rate.decay_iterations=null", "optimizer.learning_rate.warmup_iterations=2"
    path = checkpoint(tmp_path, ["training.train_iters=10", "training.logs.interval=1", *stretch])
    lines = resume(path, ["training.train_iters=20", "training.logs.interval=5", "run.resume=force", *stretch])
    assert "resume: accepted change training.logs.interval: 1 -> 5" in lines
    assert "resume: accepted change training.train_iters: 10 -> 20" in lines
    assert not any("FORCED" in line for line in lines)
    # more train_iters with no decay_iterations: the schedule is stretched, and the run says so
    assert any("now spans training.train_iters = 20" in line for line in lines)
    path = checkpoint(tmp_path, ["training.logs.interval=1", *stretch], name="step_000003")  # train_iters kept
    assert resume(path, ["training.logs.interval=5", *stretch]) == [
        "resume: accepted change training.logs.interval: 1 -> 5"
    ]
    fixed = ["optimizer.learning_rate.decay_iterations=10", "optimizer.learning_rate.warmup_iterations=2"]
    path = checkpoint(tmp_path, ["training.train_iters=10", *fixed], name="step_000004")
    lines = resume(path, ["training.train_iters=20", *fixed])
    assert lines == ["resume: accepted change training.train_iters: 10 -> 20"]


@pytest.mark.parametrize(
    "override, key",
    [
        ("optimizer.learning_rate.base=0.5", "optimizer.learning_rate.base"),
        ("batch.sequence_length=64", "batch.sequence_length"),
        ("data.sampling.seed=99", "data.sampling.seed"),
        ("training.objective=dpo", "training.objective"),
        ("training.dpo.share_prompt=no", "training.dpo.share_prompt"),
    ],
)
def test_a_change_that_alters_rows_or_model_is_refused_naming_it_and_the_ways_on(tmp_path, override, key):
    path = checkpoint(tmp_path)
    with pytest.raises(ConfigError) as e:
        resume(path, [override])
    message = str(e.value)
    assert f"{key}: " in message and "->" in message
    assert "run.experiment_dir=<another directory>" in message and "run.resume=force" in message
    lines = resume(path, [override, "run.resume=force"])
    forced = [line for line in lines if "FORCED" in line]
    assert len(forced) == 1 and forced[0].startswith(f"resume: FORCED despite change {key}: ")
    assert "resume: accepted change run.resume: 'auto' -> 'force'" in lines  # the safe changes are still listed


def test_other_training_data_is_refused_and_the_same_data_moved_is_not(tmp_path):
    path = checkpoint(tmp_path)
    other = {**DATA, "num_tokens": 999}
    with pytest.raises(ConfigError, match=r"data\.datasets\.training \(content\)"):
        resume(path, data=other)
    moved = ["data.datasets.training.path=/somewhere/else/fast_llm_config_training.yaml"]
    lines = resume(path, moved)
    assert len(lines) == 1 and lines[0].startswith("resume: accepted change data.datasets.training.path")
    with pytest.raises(ConfigError, match="data.datasets.training.path"):  # moved AND other content
        resume(path, moved, data=other)


def test_an_older_checkpoint_lacking_newer_keys_reads_them_as_their_defaults(tmp_path):
    raw = load_train_config(TRAIN).model_dump(mode="json")
    del raw["training"]["dpo"]  # saved before the key existed
    assert resume(checkpoint(tmp_path, raw=raw)) == []


def test_which_keys_are_safe():
    for key in (
        "training.train_iters",
        "training.logs.interval",
        "training.evaluations.validation.interval",
        "data.datasets.validation.path",
        "model.multi_stage.activation_checkpointing",
        "run.resume",
    ):
        assert is_safe_change(key), key
    for key in (
        "training.train_iters_extra",
        "data.datasets.training.path",
        "optimizer.learning_rate.base",
        "model.multi_stage.zero_stage",
        "training.dpo.beta",
        "run",
    ):
        assert not is_safe_change(key), key


def test_a_key_the_checkpoint_had_and_this_version_renamed_is_refused(tmp_path):
    """A checkpoint whose config no longer validates (a key renamed or removed since) is compared as raw YAML: a key
    on one side only is a change (missing = None), never skipped."""
    raw = load_train_config(TRAIN).model_dump(mode="json")
    lr = raw["optimizer"]["learning_rate"]
    lr["peak"] = lr.pop("base")
    with pytest.raises(ConfigError) as e:
        resume(checkpoint(tmp_path, raw=raw))
    listed = str(e.value)
    assert f"optimizer.learning_rate.base: None -> {lr['peak']!r}" in listed
    assert f"optimizer.learning_rate.peak: {lr['peak']!r} -> None" in listed
