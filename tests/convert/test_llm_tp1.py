"""HF LLaMA -> our format -> our GPTModel at TP=1 (in process): same logits as transformers."""
import pytest

from emu_mc.convert.__main__ import main
from tests.convert.llm_helpers import VOCAB, build_loaded_llm, hf_logits, input_ids, make_hf_llama, stage_forward

ATOL = 1e-4  # fp32


@pytest.mark.parametrize("tied,rope_theta", [(False, 10000.0), (True, 500000.0)], ids=["untied-1e4", "tied-5e5"])
def test_logits_match_hf(single_process_world, tmp_path, tied, rope_theta):
    hf = make_hf_llama(tmp_path / "hf", tied=tied, rope_theta=rope_theta)
    assert main(["hf-to-emu", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "emu")]) == 0
    ids = input_ids()
    ours = stage_forward(build_loaded_llm(str(tmp_path / "emu")), ids)[..., :VOCAB]
    ref = hf_logits(hf, ids)
    diff = (ours - ref).abs().max().item()
    print(f"TP=1 {'tied' if tied else 'untied'} rope_theta={rope_theta}: max abs logit diff {diff:.3e} "
          f"(logit scale {ref.abs().max().item():.2f})")
    assert diff <= ATOL
