"""Shared fixtures: a single-process megatron world, the tiny config and tokenizer; GPU-test skipping."""
import pytest
import torch

from emu_mc.config import load_config
from emu_mc.tokenizer import load_tokenizer, special_token_ids

TINY_CONFIG = "configs/tiny.yaml"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def single_process_world():
    """torch.distributed (gloo, world 1) + megatron parallel_state TP=PP=1, for the whole session."""
    from emu_mc.parallel.groups import init_distributed

    return init_distributed(tp=1, pp=1, seed=1234)


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("tiny")


@pytest.fixture(scope="session")
def special_ids(tokenizer):
    return special_token_ids(tokenizer)


@pytest.fixture
def tiny_cfg(request):
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return load_config(os.path.join(root, TINY_CONFIG))
