"""Tokenizer: any local HF tokenizer plus Emu's special tokens; no downloads.

One image in text is `[IMG]` + num_queries x `<image>` + `[/IMG]` (docs/model.md, "Special tokens").
With `chat_tokens` (model.chat_tokens), Emu-I's turn tokens `[USER]` and `[ASSISTANT]` are added last,
the release's order (docs/chat_data.md); a tokenizer that already has them keeps their ids.
`load_tokenizer("tiny")` loads the small byte-level BPE shipped in emu_mc/assets/tiny_tokenizer
(rebuild it with `python -m emu_mc.tokenizer --build-tiny`); any other value is a local directory
in HF format (e.g. a LLaMA checkpoint's tokenizer files).
"""
import argparse
import os
from dataclasses import dataclass
from typing import Optional

IMG_BEGIN, IMG_END, IMG_SLOT = "[IMG]", "[/IMG]", "<image>"
USER, ASSISTANT = "[USER]", "[ASSISTANT]"
TINY_TOKENIZER_DIR = os.path.join(os.path.dirname(__file__), "assets", "tiny_tokenizer")

# Text the tiny tokenizer's merges are learned from: captions and prose like the sample data's.
_TINY_CORPUS = """
A photograph of a cat sitting on a wooden table next to a cup of coffee.
An astronaut floating in space above the blue planet, with the sun behind.
A close-up of a coin on a dark background; the text around the edge is worn.
A camera man standing on a street holding an old film camera.
Coffee beans and a white mug on a rustic kitchen counter in the morning light.
A rocket launching into a clear sky, leaving a long trail of white smoke.
Two horses grazing in a green field near a river under a cloudy sky.
The video shows a person walking through a park, then stopping to look at a tree.
First the chef cuts the vegetables, then she puts them into a hot pan and stirs.
The image shows a red brick building with many windows and a small garden in front.
A dog runs along the beach while waves break on the sand in the background.
In this document we describe the history of the city, its bridges, markets and old streets.
The next frame shows the same scene from a different angle, closer to the subject.
Question: what is in the picture? Answer: a small boat on a calm lake at sunset.
The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 , . ; : ! ? ' " ( ) -
"""


@dataclass(frozen=True)
class SpecialTokenIds:
    """Ids the model and the data pipeline agree on."""

    bos: int
    eos: int
    pad: int
    img_begin: int
    img_end: int
    img_slot: int
    user: Optional[int] = None  # [USER], None when the tokenizer has no chat tokens
    assistant: Optional[int] = None  # [ASSISTANT]


def build_tiny_tokenizer(out_dir: str = TINY_TOKENIZER_DIR, vocab_size: int = 512) -> None:
    """Train the small byte-level BPE on `_TINY_CORPUS` and save it in HF format at `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TINY_CORPUS.strip().splitlines() * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(out_dir)


def tokenizer_dir(path: str) -> str:
    """model.tokenizer -> the local directory to load; FileNotFoundError naming the field if absent."""
    directory = TINY_TOKENIZER_DIR if path == "tiny" else path
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"model.tokenizer: {path!r} is not a local tokenizer directory (or 'tiny')")
    return directory


def load_tokenizer(path: str = "tiny", chat_tokens: bool = False):
    """Load a local HF tokenizer and add `[IMG]`, `[/IMG]`, `<image>` (and a pad token if it has none),
    then, with `chat_tokens`, `[USER]` and `[ASSISTANT]`."""
    from transformers import AutoTokenizer

    directory = tokenizer_dir(path)
    tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    tok.add_special_tokens({"additional_special_tokens": [IMG_BEGIN, IMG_END, IMG_SLOT]})
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "<pad>"})
    if chat_tokens:
        tok.add_tokens([USER, ASSISTANT], special_tokens=True)  # after the others: earlier ids never move
    if tok.bos_token is None or tok.eos_token is None:
        raise ValueError(f"tokenizer at {directory} needs bos and eos tokens")
    return tok


def special_token_ids(tok) -> SpecialTokenIds:
    ids = tok.convert_tokens_to_ids
    added = tok.get_added_vocab()
    return SpecialTokenIds(
        bos=tok.bos_token_id, eos=tok.eos_token_id, pad=tok.pad_token_id,
        img_begin=ids(IMG_BEGIN), img_end=ids(IMG_END), img_slot=ids(IMG_SLOT),
        user=added.get(USER), assistant=added.get(ASSISTANT),
    )


def image_placeholder_ids(ids: SpecialTokenIds, num_queries: int) -> list:
    """Token ids of one image: [IMG] + num_queries x <image> + [/IMG]."""
    return [ids.img_begin] + [ids.img_slot] * num_queries + [ids.img_end]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--build-tiny", action="store_true", help="rebuild the shipped tiny tokenizer")
    if parser.parse_args().build_tiny:
        build_tiny_tokenizer()
        print(f"wrote {TINY_TOKENIZER_DIR}")
