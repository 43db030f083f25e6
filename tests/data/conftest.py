"""Fixtures for the data tests: a webdataset config around test shards, the tokenizer's encode, one
image block's ids."""
import copy

import pytest

from emu_mc.config import SourceConfig
from emu_mc.tokenizer import image_placeholder_ids


@pytest.fixture
def data_cfg(tiny_cfg):
    """The tiny config set up for webdataset sources: call with [(kind, shards, weight), ...] and overrides."""

    def make(sources, **data):
        cfg = copy.deepcopy(tiny_cfg)
        cfg.data.kind = "webdataset"
        cfg.data.sources = [SourceConfig(kind=k, shards=s, weight=w) for k, s, w in sources]
        cfg.data.decoder = "cpu"
        cfg.data.num_workers = 0
        cfg.data.frames_per_video = 2
        for key, value in data.items():
            setattr(cfg.data, key, value)
        return cfg.validate()

    return make


@pytest.fixture
def encode(tokenizer):
    return lambda text: tokenizer.encode(text, add_special_tokens=False)


@pytest.fixture
def block(special_ids, tiny_cfg):
    return image_placeholder_ids(special_ids, tiny_cfg.model.resampler.num_queries)
