"""The Ollama Modelfile's SYSTEM line comes from the run's own data when every conversation used one system
prompt (backend.gguf.data_system_prompt); mixed or absent system prompts give none."""

import json

import pytest
import yaml

from backend import TINY_MODEL
from backend.config import dump_yaml, load_prepare_config
from backend.gguf import data_system_prompt


def _run(tmp_path, systems):
    rows = tmp_path / "rows.jsonl"
    with rows.open("w") as f:
        for i, system in enumerate(systems):
            messages = [{"role": "system", "content": system}] if system else []
            messages += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
            f.write(json.dumps({"messages": messages}) + "\n")
    data = tmp_path / "data"
    data.mkdir()
    cfg = load_prepare_config(
        {"output_path": str(data), "dataset": {"path": str(rows)}, "tokenizer": {"path": str(TINY_MODEL)}}
    )
    (data / "prepare_config.yaml").write_text(dump_yaml(cfg))
    run = tmp_path / "run"
    (run / "export" / "final").mkdir(parents=True)
    train = {"data": {"datasets": {"training": {"type": "file", "path": str(data / "fast_llm_config_training.yaml")}}}}
    (run / "config.yaml").write_text(yaml.safe_dump(train))
    return run / "export" / "final"


@pytest.mark.parametrize(
    "systems, expected",
    [
        (["Answer briefly."] * 5, "Answer briefly."),
        (["Answer briefly."] * 4 + ["Answer at length."], None),
        (["Answer briefly."] * 4 + [None], None),
        ([None] * 5, None),
    ],
)
def test_the_modelfile_system_prompt_is_the_datas_only_when_it_had_one(tmp_path, systems, expected):
    assert data_system_prompt(_run(tmp_path, systems)) == expected


def test_a_bare_model_directory_has_no_system_prompt(tmp_path):
    assert data_system_prompt(TINY_MODEL) is None
