"""Prompts for the evaluation tasks, in-context examples, and the release's answer shortening.

Two styles:
  - instruct: the released Emu-I evaluation's prompts (docs/evaluation.md, "Prompts"): its system message
    (for videos, the release's video one),
    `[USER]: {image} <instruction> [ASSISTANT]: the image depicts a photo of` for captions and
    `... please provide an accurate answer consisting of only one word or phrase. {question}
    [ASSISTANT]: the answer is:` for questions;
  - base: for the pretrained model, which continues text: `{image}a photo of` and
    `{image}question: {question} short answer:` (ours; the release publishes no base-model prompts).
With k shots, k solved examples in the same layout (their caption / most common answer filled in)
come before the query, each ending with a newline (base) or a new `[USER]:` turn (instruct). Shots are
drawn from the other examples of the set with random.Random(f"{seed}:{id}"), so an example gets the
same shots whatever the sharding, rank count or resume.
"""
import random
import re
from collections import Counter
from typing import List

from emu_mc.evaluate.datasets import Example
from emu_mc.inference import Request
from emu_mc.inference.settings import GenerationInputError

SYSTEM = ("You will be presented with an image: [IMG]ImageContent[/IMG]. You will be able to see the image after "
          "I provide it to you. Please answer my questions based on the given image.")
VIDEO_SYSTEM = ("You are a helpful assistant and you will be presented with a video consisting of multiple chronological "
                "images: [IMG]ImageContent[/IMG]. You will be able to see the video after I provide it to you. Please "
                "answer my questions based on the given video.")
CAPTION_INSTRUCTION = "please provide an accurate and concise description of the given image."
ANSWER_INSTRUCTION = ("based on the content of the {media} and common sense, please provide an accurate answer "
                      "consisting of only one word or phrase.")


def _turn(kind: str, style: str, media_kind: str, example: Example, solved: bool) -> str:
    """One example's prompt text; `solved` appends its reference caption / answer."""
    marker = "{" + media_kind + "}"
    if kind == "caption":
        ask, lead = (f"{marker}a photo of", "") if style == "base" else (
            f"{marker} {CAPTION_INSTRUCTION} [ASSISTANT]:", " the image depicts a photo of")
        answer = example.references[0] if solved else ""
    else:
        ask, lead = (f"{marker}question: {example.question} short answer:", "") if style == "base" else (
            f"{marker} {ANSWER_INSTRUCTION.format(media=media_kind)} {example.question} [ASSISTANT]:",
            " the answer is:")
        answer = Counter(example.references).most_common(1)[0][0] if solved else ""
    text = ask + lead
    if not solved:
        return text
    return text + f" {answer}" + ("\n" if style == "base" else " [USER]: ")


def choose_shots(pool: List[Example], query: Example, shots: int, seed: int) -> List[Example]:
    """`shots` examples of `pool` other than the query (and not showing its media), drawn reproducibly."""
    if shots == 0:
        return []
    candidates = [e for e in pool if e.id != query.id and e.media != query.media]
    if len(candidates) < shots:
        raise GenerationInputError(f"--shots {shots}: only {len(candidates)} other examples to draw from")
    return random.Random(f"{seed}:{query.id}").sample(candidates, shots)


def build_request(kind: str, style: str, media_kind: str, query: Example, shots: List[Example]) -> Request:
    """The Request (prompt with {image}/{video} markers, files in order) for one query and its shots."""
    body = "".join(_turn(kind, style, media_kind, s, solved=True) for s in shots) + \
        _turn(kind, style, media_kind, query, solved=False)
    system = SYSTEM if media_kind == "image" else VIDEO_SYSTEM
    prompt = body if style == "base" else f"{system} [USER]: {body}"
    files = [e.media for e in shots] + [query.media]
    return Request(prompt, images=files if media_kind == "image" else [],
                   videos=files if media_kind == "video" else [], id=query.id)


_LEADING = re.compile(r"^(it is|a|an|the)\s+")


def shorten_answer(text: str) -> str:
    """The release's VQA post-processing: first line, first sentence, first clause, lower case, then a
    leading "it is", "a", "an" or "the" removed ("The dog, mostly. It..." -> "dog")."""
    answer = text.strip().split("\n")[0].split(".")[0].split(",")[0].strip().lower()
    return _LEADING.sub("", answer).strip()


def clean_caption(text: str) -> str:
    """A generated caption: its first line, stripped."""
    stripped = text.strip()
    return stripped.split("\n")[0].strip() if stripped else ""
