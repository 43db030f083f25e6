"""The config reference: docs/config.md is what emu_mc/config_docs.py generates from the dataclasses
(so it cannot go stale), every field has a description, --help-config prints it; list-index overrides."""
import dataclasses
from pathlib import Path

import pytest

from emu_mc.config import Config, load_config
from emu_mc.config_docs import as_markdown, sections

DOCS = Path(__file__).parents[2] / "docs" / "config.md"


def test_docs_config_md_is_current():
    assert DOCS.read_text() == as_markdown(), \
        "docs/config.md is stale: regenerate it with python -m emu_mc.config_docs > docs/config.md"


def test_every_field_is_documented_once():
    fields = [f for _, _, fs in sections() for f in fs]
    assert [f.name for f in fields if not f.doc] == []
    names = [f.name for f in fields]
    assert len(names) == len(set(names)) and "data.sources.N.shards" in names and "optim.decay_steps" in names
    assert sum(n.startswith("model.vision.") for n in names) == len(dataclasses.fields(Config().model.vision))


def test_help_config_prints_the_reference_without_a_config(capsys):
    from emu_mc.pretrain import parse_args

    with pytest.raises(SystemExit) as done:
        parse_args(["--help-config"])
    text = capsys.readouterr().out
    assert done.value.code == 0
    assert "model.loss.impl: str = auto (auto | triton | reference)" in text
    assert "Relative paths resolve against the working directory" in text


def test_list_items_are_overridden_by_index():
    cfg = load_config("configs/tiny.yaml", ["--data.sources.0.shards", "/a/{0..3}.tar", "--data.sources.1.weight=3",
                                            "--data.sources.4.shards", "/b.tar", "--data.sources.4.kind", "video_text"])
    assert cfg.data.sources[0].shards == "/a/{0..3}.tar" and cfg.data.sources[1].weight == 3.0
    assert (cfg.data.sources[4].kind, cfg.data.sources[4].shards, cfg.data.sources[4].weight) == ("video_text", "/b.tar", 1.0)
    fresh = load_config(None, ["--data.kind", "webdataset", "--data.sources.0.shards", "x.tar"])
    assert [s.shards for s in fresh.data.sources] == ["x.tar"]
