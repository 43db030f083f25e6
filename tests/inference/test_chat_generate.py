"""Chat generation (--chat): the Emu-I template around the prompt, the same tokens as training's,
turn tokens never generated, a conversation on stdin; and the chat loss of the model (a random tiny
Emu-I on CPU, fp32)."""
import io
import os

import pytest
import torch
import torch.nn.functional as F

from emu_mc.data.chat import IMAGE_SYSTEM, build_conversation, render
from emu_mc.data.decode import make_decoder
from emu_mc.data.document import DocumentBuilder, make_encoder
from emu_mc.data.packing import assemble_batch
from emu_mc.generate import converse, main
from emu_mc.inference import LoadedEmu, Request, TextSettings, generate_text
from emu_mc.inference.prompts import PromptBuilder
from emu_mc.model.llm import llm_hidden_states, output_weight
from emu_mc.tokenizer import load_tokenizer, special_token_ids

BLOCK = "[IMG]" + "<image>" * 8 + "[/IMG]"


@pytest.fixture(scope="module")
def chat_emu(single_process_world):
    from emu_mc.config import load_config
    from emu_mc.model.emu import EmuModel
    from tests.conftest import TINY_CONFIG

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = load_config(os.path.join(root, TINY_CONFIG), ["--model.chat_tokens", "true"])
    tok = load_tokenizer("tiny", chat_tokens=True)
    ids = special_token_ids(tok)
    torch.manual_seed(0)
    model = EmuModel(cfg.model, ids, len(tok)).eval()
    return LoadedEmu(model, cfg, tok, ids, checkpoint="(random init)")


def prompt_text(emu, request):
    tokens, _ = PromptBuilder(emu.cfg, emu.tokenizer, emu.ids, 32).document(request, 200)
    return emu.tokenizer.decode(tokens)


def test_chat_prompt_is_the_release_template(chat_emu, image_files):
    paths, _ = image_files
    system = IMAGE_SYSTEM.replace("[IMG]", "").replace("[/IMG]", "")  # image tokens only in image blocks
    got = prompt_text(chat_emu, Request("What is it?", images=[paths[0]], chat=True))
    assert got == f"<s>{system} [USER]: {BLOCK}What is it? [ASSISTANT]:"
    got = prompt_text(chat_emu, Request("{image} vs {image}: and?", images=paths[:2], chat=True, system="S.",
                                        history=[("Hi", " Hello ")]))
    assert got == f"<s>S. [USER]: Hi [ASSISTANT]: Hello</s>[USER]: {BLOCK} vs {BLOCK}: and? [ASSISTANT]:"
    assert prompt_text(chat_emu, Request("Hi", chat=True)) == "<s>[USER]: Hi [ASSISTANT]:"


def test_chat_prompt_tokens_are_the_training_documents_prefix(chat_emu):
    emu = chat_emu
    builder = DocumentBuilder(make_encoder(emu.tokenizer, emu.ids), emu.ids, num_queries=8, seq_length=256,
                              frames_per_video=2, decoder=make_decoder("cpu", 32))
    record = {"conversations": [{"from": "human", "value": "Name a planet."}, {"from": "gpt", "value": "Earth."},
                                {"from": "human", "value": "Another?"}, {"from": "gpt", "value": "Mars."}]}
    trained = builder.build_chat(render(build_conversation(record, [], []))).tokens
    prompt, _ = PromptBuilder(emu.cfg, emu.tokenizer, emu.ids, 32).document(
        Request("Another?", chat=True, history=[("Name a planet.", "Earth.")]), 200)
    assert trained[:len(prompt)] == prompt and emu.tokenizer.decode(trained[len(prompt):]) == " Mars.</s>"


def test_release_style_prompts_spelling_the_template_give_the_same_tokens(chat_emu, image_files):
    """evaluate's instruct prompts (and the release's) spell `[USER]` / `[ASSISTANT]` in a plain prompt."""
    from emu_mc.evaluate.datasets import Example
    from emu_mc.evaluate.prompts import CAPTION_INSTRUCTION, build_request

    emu, (paths, _) = chat_emu, image_files
    builder = PromptBuilder(emu.cfg, emu.tokenizer, emu.ids, 32)
    spelled, _ = builder.document(build_request("caption", "instruct", "image", Example("q", paths[0]), []), 200)
    chat, _ = builder.document(Request("{image} " + CAPTION_INSTRUCTION, images=[paths[0]], chat=True), 200)
    assert spelled == chat + builder.encode(" the image depicts a photo of")
    forged, _ = builder.document(Request("[USER] hi", chat=True, system=""), 200)
    assert forged.count(emu.ids.user) == 1  # in a chat turn, text never becomes a turn token


def test_turn_tokens_are_never_generated(chat_emu):
    emu = chat_emu
    with torch.no_grad():  # make [USER] the likeliest next token everywhere
        emu.model.llm.output_layer.weight[emu.ids.user] += 100.0
    try:
        out = generate_text(emu, [Request("Hi", chat=True)], TextSettings(max_new_tokens=4))[0]
    finally:
        with torch.no_grad():
            emu.model.llm.output_layer.weight[emu.ids.user] -= 100.0
    assert emu.ids.user not in out.tokens and emu.ids.assistant not in out.tokens


def test_conversation_on_stdin_keeps_the_history(chat_emu, capsys):
    conversation = Request(chat=True)
    assert converse(chat_emu, conversation, TextSettings(max_new_tokens=3), io.StringIO("Hi\n\nAnd then?\n")) == 0
    assert [user for user, _ in conversation.history] == ["Hi", "And then?"]
    assert capsys.readouterr().out.count("assistant: ") == 2


def test_chat_on_a_model_without_turn_tokens_is_exit_2(tiny_run, capsys):
    assert main(["--checkpoint", tiny_run, "--chat", "--prompt", "Hi"]) == 2
    assert "[USER] / [ASSISTANT]" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["--mode image", "requests file"])
def test_a_chat_request_for_an_image_is_exit_2_before_loading(tmp_path, capsys, how):
    """--chat with --mode image, or a requests-file line asking for an image under --chat: one line, exit 2."""
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"id": "a", "prompt": "a cat", "mode": "image"}\n')
    source = ["--prompt", "a cat", "--mode", "image"] if how == "--mode image" else ["--requests", str(requests)]
    assert main(["--checkpoint", str(tmp_path / "nowhere"), "--chat", "--decoder", str(tmp_path), *source]) == 2
    assert "a chat request is answered in text" in capsys.readouterr().err


def test_chat_loss_is_the_answers_cross_entropy_and_no_regression(chat_emu, image_files):
    emu = chat_emu
    paths, _ = image_files
    builder = DocumentBuilder(make_encoder(emu.tokenizer, emu.ids), emu.ids, num_queries=8, seq_length=256,
                              frames_per_video=2, decoder=make_decoder("cpu", 32))
    from emu_mc.data.sources import Image

    with open(paths[0], "rb") as f:
        image = Image(f.read(), paths[0])
    record = {"conversations": [{"from": "human", "value": "<image> What?"}, {"from": "gpt", "value": "A cup."},
                                {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]}
    doc = builder.build_chat(render(build_conversation(record, [image], [])))
    batch = assemble_batch([[doc]], 256, emu.ids.pad, 32)
    with torch.no_grad():
        out = emu.model(batch)
        hidden = llm_hidden_states(emu.model.llm, emu.model.embed(batch), batch.position_ids, batch.segment_ids)
        logits = (hidden[:, 0] @ output_weight(emu.model.llm).t())[:, :emu.model.vocab_size]
    targets = [p for p in range(1, len(doc.tokens)) if doc.loss_mask[p]]
    expected = F.cross_entropy(logits[[p - 1 for p in targets]], torch.tensor([doc.tokens[p] for p in targets]))
    assert emu.tokenizer.decode([doc.tokens[p] for p in targets]) == " A cup.</s> Yes.</s>"
    assert torch.allclose(out["ce"], expected, atol=1e-5) and float(out["reg"]) == 0.0
