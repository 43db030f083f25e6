"""init_from weights that do not fit the model config: one line naming every differing field, exit
code 2, checked before any process group (metadata only)."""
import pytest

from emu_mc.convert import ConversionError, hf_to_emu
from emu_mc.convert.pretrained import check_init_from
from tests.convert.llm_helpers import make_hf_llama
from tests.train.test_pretrain import pretrain_args, run_single_process


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    """A converted 2-layer LLM with the tiny config's widths and rms_norm_eps 1e-5 (tiny.yaml: 1e-6)."""
    root = tmp_path_factory.mktemp("llm")
    make_hf_llama(root / "hf")
    hf_to_emu(str(root / "hf"), str(root / "llm"))
    return str(root / "llm")


def test_check_init_from_names_every_differing_field(tiny_cfg, llm_dir):
    tiny_cfg.model.llm.init_from = llm_dir
    tiny_cfg.model.llm.num_layers = 4
    with pytest.raises(ConversionError, match=r"model.llm.init_from: .* differ in num_layers: 2 vs 4; "
                                              r"norm_eps: 1e-05 vs 1e-06"):
        check_init_from(tiny_cfg.model)
    tiny_cfg.model.llm.num_layers, tiny_cfg.model.llm.norm_eps = 2, 1e-5
    check_init_from(tiny_cfg.model)


def test_pretrain_with_a_mismatched_init_from_exits_2_in_one_line(tmp_path, llm_dir):
    proc = run_single_process(*pretrain_args(tmp_path / "run", "--model.llm.init_from", llm_dir))
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert proc.stdout.strip().count("\n") == 0 and "differ in norm_eps: 1e-05 vs 1e-06" in proc.stdout, proc.stdout
