"""HF -> ours -> HF reproduces every tensor bit for bit (dtype kept), and transformers loads the
result: single-file safetensors, sharded safetensors + index, and pytorch_model.bin inputs."""
import pytest
import torch

from emu_mc.convert.__main__ import main
from emu_mc.convert.tensor_files import read_hf_weights
from tests.convert.llm_helpers import input_ids, make_hf_llama


def save_as_bin(model, out_dir):
    """The pre-safetensors layout: config.json + pytorch_model.bin (a tied lm_head is saved too)."""
    model.config.save_pretrained(out_dir)
    torch.save(model.state_dict(), out_dir / "pytorch_model.bin")


CASES = {
    "untied-fp32-safetensors": dict(tied=False, dtype=torch.float32, save=dict()),
    "tied-bf16-sharded": dict(tied=True, dtype=torch.bfloat16, save=dict(max_shard_size="30KB")),
    "untied-bf16-bin": dict(tied=False, dtype=torch.bfloat16, save=None),
    "tied-fp32-bin": dict(tied=True, dtype=torch.float32, save=None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_is_exact(tmp_path, case):
    from transformers import LlamaForCausalLM

    kw = CASES[case]
    hf_dir = tmp_path / "hf"
    hf = make_hf_llama(hf_dir, tied=kw["tied"], dtype=kw["dtype"], rope_theta=500000.0, **(kw["save"] or {}))
    if kw["save"] is None:
        for f in hf_dir.glob("model*.safetensors*"):
            f.unlink()
        save_as_bin(hf, hf_dir)
    elif "max_shard_size" in kw["save"]:
        assert (hf_dir / "model.safetensors.index.json").exists()
    assert main(["hf-to-emu", "--hf", str(hf_dir), "--out", str(tmp_path / "emu")]) == 0
    assert main(["emu-to-hf", "--emu", str(tmp_path / "emu"), "--out", str(tmp_path / "back")]) == 0

    original, back = read_hf_weights(str(hf_dir)), read_hf_weights(str(tmp_path / "back"))
    if kw["tied"]:
        original.pop("lm_head.weight", None)  # a tied head is the embedding; HF does not need it on disk
    assert back.keys() == original.keys()
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name

    def load(directory):
        return LlamaForCausalLM.from_pretrained(directory, dtype=kw["dtype"], attn_implementation="eager").eval()

    reloaded = load(tmp_path / "back")
    assert reloaded.config.tie_word_embeddings == kw["tied"]
    assert reloaded.config.rope_parameters["rope_theta"] == 500000.0
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=input_ids()).logits, load(hf_dir)(input_ids=input_ids()).logits)
