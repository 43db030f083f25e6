"""Shared fixtures: a single-process megatron world, the tiny config and tokenizer; GPU-test skipping;
the Triton interpreter when there is no CUDA."""
import os

import pytest
import torch

# Without CUDA, Triton kernels run on CPU tensors through the Triton interpreter. Triton reads
# TRITON_INTERPRET whenever it defines a @triton.jit function, its own triton.language helpers (tl.sum,
# tl.max, ...) included, when triton is first imported. So it is set here: pytest loads this file before
# any test module, and neither torch nor the emu_mc imports below load triton.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

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
