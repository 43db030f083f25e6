"""HF LLaMA -> our format -> GPTModel at TP=2, PP=2 and TP=2 x PP=2 (gloo ranks under torchrun): logits match
transformers, and gather_llm_state gives back the loaded full state dict bit for bit."""
import pytest
import torch
from safetensors.torch import load_file

from emu_mc.convert import hf_to_emu, read_llm_checkpoint
from tests.convert.llm_helpers import VOCAB, hf_logits, input_ids, make_hf_llama
from tests.torchrun_utils import torchrun

WORKER = "tests/convert/workers/llm_worker.py"
ATOL = 1e-4  # fp32
VARIANTS = {"untied": dict(tied=False, rope_theta=10000.0), "tied": dict(tied=True, rope_theta=500000.0)}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{variant: (emu checkpoint dir, HF logits)} and the input ids file."""
    root = tmp_path_factory.mktemp("convert_parallel")
    ids = input_ids()
    torch.save(ids, root / "ids.pt")
    out = {}
    for name, kw in VARIANTS.items():
        hf = make_hf_llama(root / f"hf_{name}", **kw)
        hf_to_emu(str(root / f"hf_{name}"), str(root / f"emu_{name}"))
        out[name] = (root / f"emu_{name}", hf_logits(hf, ids))
    return root, out


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2pp2"])
def test_parallel_logits_and_gather(converted, tmp_path, tp, pp):
    root, variants = converted
    torchrun(WORKER, ["--tp", tp, "--pp", pp, "--ids", root / "ids.pt", "--out", tmp_path,
                      *[f"{name}={ckpt}" for name, (ckpt, _) in variants.items()]], nproc=tp * pp, timeout=240)
    for name, (ckpt, ref) in variants.items():
        ours = torch.load(tmp_path / f"{name}_logits.pt")[..., :VOCAB]
        diff = (ours - ref).abs().max().item()
        print(f"TP={tp} PP={pp} {name}: max abs logit diff {diff:.3e}")
        assert diff <= ATOL, name
        full = read_llm_checkpoint(str(ckpt))[0]
        gathered = load_file(tmp_path / f"{name}_gathered.safetensors")
        assert gathered.keys() == full.keys()
        for key, tensor in full.items():
            assert torch.equal(gathered[key], tensor), key
