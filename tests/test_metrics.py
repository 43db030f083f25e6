"""MFU counts attention FLOPs over in-document causal pairs only."""
from emu_mc.config import ModelConfig
from emu_mc.metrics import flops_per_attention_pair
from emu_mc.model.document_attention import causal_pairs
from tests.model.test_document_attention import segments


def test_attention_flops_count_in_document_causal_pairs():
    cfg = ModelConfig()
    s, layers, hidden = 4096, cfg.llm.num_layers, cfg.llm.hidden_size
    one_doc = causal_pairs(segments((s, 0))) * flops_per_attention_pair(cfg)
    four_docs = causal_pairs(segments((s // 4,) * 4 + (0,))) * flops_per_attention_pair(cfg)
    full_s = s * 12 * layers * hidden * s  # PaLM's count: every token against all S keys
    assert one_doc == 12 * layers * hidden * s * (s + 1) // 2 and abs(one_doc / full_s - 0.5) < 1e-3
    assert abs(four_docs / one_doc - 0.25) < 1e-3
