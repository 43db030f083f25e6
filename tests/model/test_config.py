"""Config loading: defaults, dotted overrides, and errors that name the field and what is allowed."""
from pathlib import Path

import pytest

from emu_mc.config import ConfigError, load_config


def test_tiny_loads_and_overrides(tiny_cfg):
    cfg = load_config("configs/tiny.yaml", ["--model.llm.num_layers", "3", "--train.steps=7", "--optim.lr", "1e-3"])
    assert cfg.model.llm.num_layers == 3 and cfg.train.steps == 7 and cfg.optim.lr == 1e-3
    assert tiny_cfg.model.llm.num_layers == 2


@pytest.mark.parametrize("override,needle", [
    (["--model.llm.num_layerz", "2"], "model.llm.num_layerz: unknown field; allowed here: ['num_layers'"),
    (["--model.loss.impl", "cuda"], "model.loss.impl: 'cuda' is not one of ['auto', 'triton', 'reference']"),
    (["--train.steps", "many"], "train.steps: expected int, got 'many'"),
    (["--model.vision.freeze", "3"], "model.vision.freeze: expected true/false"),
    (["--parallel.tensor_parallel", "0"], "parallel.tensor_parallel: must be >= 1"),
    (["--data.seq_length", "4096"], "data.seq_length: must be <= model.llm.max_position_embeddings"),
    (["--model.llm.num_query_groups", "3"], "model.llm.num_query_groups: must be a divisor"),
    (["--parallel.vision_layout", "sharded"], "parallel.vision_layout: 'sharded' is not one of ['split', 'replicated']"),
    (["--parallel.pipeline_parallel", "3"], "model.llm.num_layers: must be divisible by parallel.pipeline_parallel (3)"),
    (["--parallel.pipeline_parallel", "2", "--parallel.llm_layers_first_stage", "0"],
     "parallel.llm_layers_first_stage: must be >= 1"),
    (["--parallel.pipeline_parallel", "2", "--parallel.llm_layers_first_stage", "1", "--parallel.llm_layers_last_stage",
      "2"], "parallel.llm_layers_first_stage: must be plus parallel.llm_layers_last_stage (2) at most"),
    (["--parallel.pipeline_parallel", "2", "--parallel.llm_layers_first_stage", "1", "--parallel.llm_layers_last_stage",
      "2", "--model.llm.num_layers", "4"], "the other 1 of model.llm.num_layers (4) split evenly over the 0 other"),
    (["--parallel.pipeline_parallel", "4", "--model.llm.num_layers", "8", "--parallel.llm_layers_first_stage", "1"],
     "the other 7 of model.llm.num_layers (8) split evenly over the 3 other stage(s)"),
    (["--data.sources.9.shards", "x"], "data.sources.9.shards: '9' is not an item of this list (4 items; index 4"),
    (["--data.sources.0.shardz", "x"], "data.sources[0].shardz: unknown field"),
    (["--train.steps.0", "3"], "train.steps.0: train.steps is not a section"),
    # <s> + [IMG] + 8 x <image> + [/IMG] + </s> = 12 tokens: 11 would train on no image at all
    (["--data.seq_length", "11"], "data.seq_length: must be >= 12 (<s> + one image block"),
    (["--parallel.tensor_parallel", "4"], "model.llm.num_query_groups: must be divisible by parallel.tensor_parallel"),
    (["--parallel.tensor_parallel", "8"], "model.llm.num_attention_heads: must be divisible by parallel.tensor_parallel"),
    (["--train.steps", "--train.log_every", "5"], "override --train.steps: missing value"),
    (["--data.sources", "[{kind: x"], "override --data.sources: line 1 column 10: YAML syntax error"),
])
def test_bad_values_name_the_field(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", override)
    assert needle in str(err.value)


@pytest.mark.parametrize("overrides", [
    ["--parallel.llm_layers_first_stage", "5"],  # PP = 1: the stage sizes are not used
    ["--parallel.pipeline_parallel", "2", "--parallel.llm_layers_first_stage", "1"],  # the last stage takes 1
    ["--parallel.pipeline_parallel", "4", "--model.llm.num_layers", "8", "--parallel.llm_layers_first_stage", "2",
     "--parallel.llm_layers_last_stage", "2"],
])
def test_uneven_pipeline_stages_that_add_up_load(overrides):
    load_config("configs/tiny.yaml", overrides)


def test_emu_14b_matches_spec():
    cfg = load_config("configs/emu_14b.yaml")
    assert (cfg.model.vision.width, cfg.model.vision.num_layers, cfg.model.vision.num_heads) == (1408, 40, 16)
    assert (cfg.model.resampler.d_model, cfg.model.resampler.num_layers, cfg.model.resampler.num_queries) == (768, 12, 32)
    assert (cfg.model.llm.hidden_size, cfg.model.llm.num_layers, cfg.model.llm.ffn_hidden_size) == (5120, 40, 13824)


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[2].joinpath("configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    from emu_mc.decoder.config import load_decoder_config

    (load_decoder_config if path.name.startswith("decoder_") else load_config)(str(path))  # stage 2 / pretraining


def test_print_config_reloads_to_the_same_config(tmp_path, capsys):
    from emu_mc.pretrain import main

    overrides = ["--train.steps", "7", "--model.llm.num_layers=3", "--data.sources",
                 "[{kind: video_text, shards: a.tar, weight: 0.5}]"]
    assert main(["--config", "configs/tiny.yaml", *overrides, "--print-config"]) == 0
    (tmp_path / "printed.yaml").write_text(capsys.readouterr().out)
    assert load_config(str(tmp_path / "printed.yaml")) == load_config("configs/tiny.yaml", overrides)


def test_yaml_syntax_errors_name_the_file_and_line(tmp_path):
    (tmp_path / "tabs.yaml").write_text("train:\n\tsteps: 3\n")
    with pytest.raises(ConfigError, match=r"tabs.yaml: line 2 column 1: YAML syntax error: .*'\\t'"):
        load_config(str(tmp_path / "tabs.yaml"))


def test_the_shortest_sequence_holds_one_image():
    assert load_config("configs/tiny.yaml", ["--data.seq_length", "12"]).data.seq_length == 12


def test_documents_that_cannot_fit_are_warned_about_before_the_run():
    from emu_mc.config import document_fit_warnings

    assert document_fit_warnings(load_config("configs/tiny.yaml")) == []
    warnings = document_fit_warnings(load_config("configs/tiny.yaml", ["--data.seq_length", "20"]))
    assert len(warnings) == 4  # every source of the tiny config
    assert warnings[0].startswith("data.seq_length 20 cannot hold a typical image_text document of data.sources[0]")
    assert "raise data.seq_length to >= 28" in warnings[0]
    assert "video_text document of data.sources[2] (2 image block(s)" in warnings[2]
