"""The docs the README points to: no reference to a file outside the repository ("SPEC"), and
docs/model.md states the sizes configs/emu_14b.yaml trains."""
import re
import subprocess

import pytest

from emu_mc.config import load_config
from tests.torchrun_utils import REPO_ROOT

MODEL_MD = (REPO_ROOT / "docs" / "model.md").read_text()


def test_no_reference_to_a_spec_outside_the_repository():
    try:
        files = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.yaml", "*.sh", "Makefile"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.split()
    except (FileNotFoundError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    spec = re.compile(r"(?<![A-Z_])SPEC\b")  # TORCH_SPEC and ModuleSpec are other things
    offenders = [f for f in files if f != "tests/test_docs.py" and spec.search((REPO_ROOT / f).read_text())]
    assert offenders == [], f"these still point at SPEC; point them at docs/model.md: {offenders}"


def test_model_md_states_the_emu_14b_sizes():
    m = load_config(str(REPO_ROOT / "configs" / "emu_14b.yaml")).model
    v, r, llm = m.vision, m.resampler, m.llm
    for fact in (f"{v.num_layers} blocks, width {v.width}, {v.num_heads} heads", f"MLP hidden {v.mlp_hidden}",
                 f"{r.num_queries} learned queries; {r.num_layers} layers, width {r.d_model}, {r.num_heads} heads "
                 f"of {r.d_kv}, ReLU FFN {r.d_ff}", f"{r.num_buckets} buckets, max distance {r.max_distance}",
                 f"{llm.num_layers} layers, width {llm.hidden_size}, {llm.num_attention_heads} heads, "
                 f"SwiGLU FFN {llm.ffn_hidden_size}", f"patch {v.patch_size}", f"{v.image_size} x {v.image_size}"):
        assert fact in MODEL_MD, fact
