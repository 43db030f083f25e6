"""Fixtures for the generation tests: a random tiny Emu (fp32, CPU), image files, a tiny decoder and a
real pretraining checkpoint (one step of the tiny config on synthetic data, in a process of its own)."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from emu_mc.inference import LoadedEmu


@pytest.fixture(scope="session")
def tiny_emu(single_process_world, tokenizer, special_ids):
    from emu_mc.config import load_config
    from emu_mc.model.emu import EmuModel
    from tests.conftest import TINY_CONFIG

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = load_config(os.path.join(root, TINY_CONFIG))
    torch.manual_seed(0)
    model = EmuModel(cfg.model, special_ids, len(tokenizer)).eval()
    return LoadedEmu(model, cfg, tokenizer, special_ids, checkpoint="(random init)")


@pytest.fixture(scope="session")
def image_files(tmp_path_factory):
    """Three small PNG/JPEG files of random pixels, and one that is not an image."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i, (size, ext) in enumerate([((40, 48), "png"), ((30, 20), "jpg"), ((64, 64), "png")]):
        path = folder / f"img{i}.{ext}"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    broken = folder / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    return paths, str(broken)


@pytest.fixture(scope="session")
def tiny_decoder_dir(tmp_path_factory):
    pytest.importorskip("diffusers")
    from emu_mc.inference.tiny_decoder import write_tiny_decoder

    folder = tmp_path_factory.mktemp("decoder")
    return write_tiny_decoder(str(folder / "llm64"), cross_attention_dim=64, sample_size=8), \
        write_tiny_decoder(str(folder / "llm32"), cross_attention_dim=32, sample_size=8)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """out_dir of a one-step tiny pretraining run (synthetic data) with its checkpoint. In a process of its
    own: megatron's checkpoint writer forks, and a fork of this long-lived test process can inherit
    objects (e.g. an earlier test's DALI pipeline) whose destructors hang without their threads."""
    from tests.conftest import TINY_CONFIG
    from tests.train.test_pretrain import run_single_process

    out_dir = str(tmp_path_factory.mktemp("run"))
    proc = run_single_process("--config", TINY_CONFIG, "--data.kind", "synthetic", "--train.steps", "1",
                              "--train.out_dir", out_dir)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return out_dir
