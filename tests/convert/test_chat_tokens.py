"""model.chat_tokens: [USER] / [ASSISTANT] appended after the other tokens (earlier ids never move), their
rows at the mean of a loaded model's rows, and checkpoints written before the field still resume."""
import copy

import pytest
import torch

from emu_mc.checkpoint import check_same_model
from emu_mc.config import ConfigError, config_to_dict
from emu_mc.convert.llm_format import EMBEDDING, OUTPUT
from emu_mc.convert.model_format import load_whole_model, write_whole_model
from emu_mc.convert.shard import gather_llm_state
from emu_mc.tokenizer import ASSISTANT, USER, load_tokenizer, special_token_ids


def test_turn_tokens_come_last_and_keep_the_other_ids(tokenizer, special_ids, tmp_path):
    chat = load_tokenizer("tiny", chat_tokens=True)
    ids = special_token_ids(chat)
    assert (ids.user, ids.assistant) == (len(tokenizer), len(tokenizer) + 1) and len(chat) == len(tokenizer) + 2
    assert special_ids.user is None and special_ids.assistant is None
    assert {k: v for k, v in vars(ids).items() if k not in ("user", "assistant")} == \
        {k: v for k, v in vars(special_ids).items() if k not in ("user", "assistant")}
    chat.save_pretrained(tmp_path)  # a tokenizer that has them keeps their ids, flag or not
    assert special_token_ids(load_tokenizer(str(tmp_path))) == ids
    assert special_token_ids(load_tokenizer(str(tmp_path), chat_tokens=True)) == ids
    assert chat.decode([ids.user, ids.assistant], skip_special_tokens=True) == ""
    assert chat.convert_ids_to_tokens([ids.user, ids.assistant]) == [USER, ASSISTANT]


def test_init_from_a_model_without_them_starts_their_rows_at_the_mean(single_process_world, tiny_cfg, tokenizer,
                                                                       special_ids, tmp_path):
    from emu_mc.model.emu import EmuModel

    torch.manual_seed(0)
    base = EmuModel(tiny_cfg.model, special_ids, len(tokenizer))
    write_whole_model(str(tmp_path), base, len(tokenizer), gather_llm_state(base.llm, len(tokenizer)), tokenizer, {})
    saved = gather_llm_state(base.llm, len(tokenizer))
    cfg = copy.deepcopy(tiny_cfg.model)
    cfg.chat_tokens, cfg.init_from = True, str(tmp_path)
    chat = load_tokenizer("tiny", chat_tokens=True)
    tuned = EmuModel(cfg, special_token_ids(chat), len(chat))
    load_whole_model(tuned, cfg)
    grown = gather_llm_state(tuned.llm, len(chat))
    for name in (EMBEDDING, OUTPUT):
        rows = saved[name]
        assert torch.equal(grown[name][:len(tokenizer)], rows)
        assert torch.allclose(grown[name][len(tokenizer):], rows.mean(0, keepdim=True).expand(2, -1))


def test_a_checkpoints_missing_rows_start_at_the_mean_row(single_process_world, tiny_cfg, tokenizer, special_ids):
    """init_from a training checkpoint without the chat tokens (same padded rows): mean_init_vocab_rows
    sets exactly the rows of the added tokens, in the embedding and the output layer, to their mean."""
    from emu_mc.checkpoint import _same_padded_vocab, mean_init_vocab_rows
    from emu_mc.model.emu import EmuModel

    chat = load_tokenizer("tiny", chat_tokens=True)
    cfg = copy.deepcopy(tiny_cfg.model)
    cfg.chat_tokens = True
    torch.manual_seed(0)
    model = EmuModel(cfg, special_token_ids(chat), len(chat))
    assert _same_padded_vocab(model, len(tokenizer)) and not _same_padded_vocab(model, len(chat) - 200)
    before = gather_llm_state(model.llm, len(chat))
    mean_init_vocab_rows(model, len(tokenizer))
    after = gather_llm_state(model.llm, len(chat))
    for name in (EMBEDDING, OUTPUT):
        assert torch.equal(after[name][:len(tokenizer)], before[name][:len(tokenizer)])
        torch.testing.assert_close(after[name][len(tokenizer):],
                                   before[name][:len(tokenizer)].mean(0, keepdim=True).expand(2, -1))


def test_checkpoints_written_before_the_field_still_resume(tiny_cfg):
    config = config_to_dict(tiny_cfg)
    old = copy.deepcopy(config)
    del old["model"]["chat_tokens"]
    check_same_model("x", {"config": old}, config, vocab_size=515)
    tuned = copy.deepcopy(config)
    tuned["model"]["chat_tokens"] = True
    with pytest.raises(ConfigError, match="chat_tokens"):
        check_same_model("x", {"config": old}, tuned, vocab_size=515)
