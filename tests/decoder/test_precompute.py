"""Precomputed conditions and VAE posteriors: written once by emu_mc.decoder.precompute, they give the
same loss as the online path for the same pairs and draws, and training runs on them alone."""
import os

import pytest
import torch

from emu_mc.decoder.precompute import main as precompute_main
from tests.decoder.test_train_decoder import CONFIG, losses, overrides, run


@pytest.fixture(scope="module")
def precomputed(tiny_run, decoder_init, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pre") / "pre")
    args = overrides(tiny_run, decoder_init, "unused", 1)
    assert precompute_main(["--config", CONFIG, "--out", out, "--samples-per-shard", "4", *args]) == 0
    return out


def test_precomputed_loss_equals_online_loss(precomputed, tiny_run, decoder_init):
    from emu_mc.data.shards import index_shard, read_sample
    from emu_mc.decoder.config import load_decoder_config
    from emu_mc.decoder.data import PairDecoder, collate_precomputed, decode_precomputed
    from emu_mc.train_decoder import DecoderRun

    cfg = load_decoder_config(CONFIG, overrides(tiny_run, decoder_init, "unused", 1))
    run_ = DecoderRun(cfg, torch.device("cpu"), 64)
    part = os.path.join(precomputed, "part-000-000000.tar")
    samples = [read_sample(part, ref) for ref in index_shard(part).samples]
    assert len(samples) == 4
    sources = [s["source.txt"].decode().rsplit(":", 1) for s in samples]
    pair_decoder = PairDecoder(cfg, run_.emu.cfg, run_.emu.tokenizer, run_.emu.ids)
    originals = {}
    for path, key in sources:
        originals.update({ref.key: read_sample(path, ref) for ref in index_shard(path).samples if ref.key == key})
    online = pair_decoder.collate([pair_decoder(originals[key]) for _, key in sources])
    offline = collate_precomputed([decode_precomputed(s) for s in samples])
    with torch.no_grad():
        loss_online, dropped_online = run_.loss(online, torch.Generator().manual_seed(3))
        loss_offline, dropped_offline = run_.loss(offline, torch.Generator().manual_seed(3))
    assert torch.equal(dropped_online, dropped_offline)
    torch.testing.assert_close(loss_offline, loss_online, atol=1e-5, rtol=1e-5)


def test_training_on_precomputed_shards(precomputed, tiny_run, decoder_init, tmp_path):
    run(overrides(tiny_run, decoder_init, tmp_path, 2) + ["--data.precomputed", precomputed])
    assert len(losses(tmp_path)) == 2 and os.path.isdir(tmp_path / "decoder" / "unet")
