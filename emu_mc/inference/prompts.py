"""Requests -> left-padded prompt batches, through the training path's tokenisation and placeholder
expansion (emu_mc.data.document.DocumentBuilder, emu_mc.batch.Batch): one code path for both.

Prompt syntax: `{image}` and `{video}` mark where the request's next image / video file goes, in
order; files without a marker go before the text (the captioning layout: image, then prompt). A video
becomes `data.frames_per_video` uniformly sampled frames, one image block each, as in training.
A chat request (Emu-I) is rendered with the training template (emu_mc/data/chat.py): its system message
(default: the release's for its media), earlier (user, assistant) turns, then the prompt as the user's
turn and `[ASSISTANT]:`; markers are read over all user turns in order, unmarked files go first.
"""
import os
import re
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from emu_mc.batch import Batch
from emu_mc.data.chat import Conversation, Exchange, default_system, render
from emu_mc.data.decode import make_decoder
from emu_mc.data.document import DocumentBuilder, make_encoder
from emu_mc.data.errors import TOO_LONG, SampleError
from emu_mc.data.sources import Image, Segment, Text, Video
from emu_mc.inference.settings import GenerationInputError

_MARKER = re.compile(r"\{(image|video)\}")


@dataclass
class Request:
    prompt: str = ""
    images: List[str] = field(default_factory=list)  # file paths, consumed by {image} markers in order
    videos: List[str] = field(default_factory=list)
    mode: str = "text"  # text | image
    id: Optional[str] = None
    chat: bool = False  # render with the Emu-I chat template (text mode)
    system: Optional[str] = None  # chat: the system message; None = the release's default for the media
    history: List[Tuple[str, str]] = field(default_factory=list)  # chat: earlier (user, assistant) turns


def _read(path: str, kind: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise GenerationInputError(f"{kind} {path}: cannot read it ({err.strerror or err})") from None


def place_media(texts: Sequence[str], images: Sequence[str], videos: Sequence[str]) -> List[List[Segment]]:
    """Texts with {image} / {video} markers and the files they consume in order -> each text's
    segments (files read); files without a marker go before the first text."""
    files = {"image": list(images), "video": list(videos)}
    markers = [m for text in texts for m in _MARKER.findall(text)]
    for kind in ("image", "video"):
        if markers.count(kind) > len(files[kind]):
            raise GenerationInputError(f"prompt {' / '.join(texts)!r}: {markers.count(kind)} {{{kind}}} markers "
                                       f"but {len(files[kind])} {kind} file(s)")
    leading = {kind: files[kind][:len(files[kind]) - markers.count(kind)] for kind in files}
    files = {kind: files[kind][len(leading[kind]):] for kind in files}

    def media(kind: str, path: str) -> Segment:
        return (Image if kind == "image" else Video)(_read(path, kind), path)

    out: List[List[Segment]] = []
    for text in texts:
        segments: List[Segment] = [] if out else [media(k, p) for k in ("image", "video") for p in leading[k]]
        for i, piece in enumerate(_MARKER.split(text)):
            if i % 2 == 0:
                if piece:
                    segments.append(Text(piece))
            else:
                segments.append(media(piece, files[piece].pop(0)))
        out.append(segments)
    return out


def request_segments(request: Request) -> List[Segment]:
    """The request as the data pipeline's segments (Text / Image / Video, files read)."""
    return place_media([request.prompt], request.images, request.videos)[0]


def chat_conversation(request: Request) -> Conversation:
    """A chat request -> its Conversation, the last exchange open (the prompt awaiting the answer)."""
    users = place_media([user for user, _ in request.history] + [request.prompt], request.images, request.videos)
    answers = [answer.strip() for _, answer in request.history] + [None]
    system = request.system
    if system is None:
        system = default_system(len(request.images), len(request.videos))
    return Conversation(system, [Exchange(user, answer) for user, answer in zip(users, answers)])


class PromptBuilder:
    """Requests -> a left-padded Batch, built by the training DocumentBuilder (no eos: the prompt stays
    open). `max_length` is the longest prompt allowed (the model's positions less the room to generate)."""

    def __init__(self, cfg, tokenizer, ids, image_size: int):
        self.cfg, self.ids = cfg, ids
        # one tokenizer copy (make_encoder copies it): a plain prompt may spell the chat template; chat requests
        # get turn tokens only where the template puts them
        self.encode_plain = make_encoder(tokenizer, ids, keep_turn_tokens=True)
        turns = {ids.user, ids.assistant}
        self.encode = lambda text: [t for t in self.encode_plain(text) if t not in turns]
        self.decoder = make_decoder("cpu", image_size)

    def document(self, request: Request, max_length: int):
        """(token ids [bos, ...], images float32 [N, 3, s, s]) of one request."""
        builder = DocumentBuilder(self.encode if request.chat else self.encode_plain, self.ids,
                                  num_queries=self.cfg.model.resampler.num_queries, seq_length=max_length + 1,
                                  frames_per_video=self.cfg.data.frames_per_video, decoder=self.decoder,
                                  overlong="skip")
        try:
            if request.chat:
                if None in (self.ids.user, self.ids.assistant):
                    raise GenerationInputError(
                        "--chat: the model's tokenizer has no [USER] / [ASSISTANT] tokens (an Emu-I model has them: "
                        "convert emu1-to-emu --instruct, or a run with model.chat_tokens: true)")
                doc = builder.build_chat(render(chat_conversation(request), open_turn=True))
            else:
                segments = request_segments(request)
                if not segments:
                    return [self.ids.bos], torch.zeros(0, 3, self.decoder.size, self.decoder.size)
                doc = builder.build(segments, drop_bad_images=False, end_with_eos=False)
        except SampleError as err:
            if err.reason == TOO_LONG:
                raise GenerationInputError(
                    f"prompt {request.prompt[:60]!r}: longer than the {max_length} tokens the model's "
                    f"{self.cfg.model.llm.max_position_embeddings} positions leave for it") from None
            raise GenerationInputError(f"prompt {request.prompt[:60]!r}: {err.message}") from None
        return doc.tokens, doc.images

    def batch(self, requests: List[Request], max_length: int) -> Batch:
        """Left-padded Batch: input_ids [B, S] (pad on the left), position_ids from 0 at each row's first
        token, segment_ids 0 on tokens and -1 on padding, images stacked in order."""
        return left_padded_batch([self.document(r, max_length) for r in requests], self.ids.pad)


def left_padded_batch(docs: List[Tuple[List[int], torch.Tensor]], pad: int) -> Batch:
    """(token ids, images float32 [N, 3, s, s]) per row -> a left-padded Batch (see PromptBuilder.batch)."""
    length = max(len(tokens) for tokens, _ in docs)
    input_ids = torch.full((len(docs), length), pad, dtype=torch.long)
    segment_ids = torch.full((len(docs), length), -1, dtype=torch.long)
    position_ids = torch.zeros((len(docs), length), dtype=torch.long)
    for row, (tokens, _) in enumerate(docs):
        n = len(tokens)
        input_ids[row, length - n:] = torch.tensor(tokens)
        segment_ids[row, length - n:] = 0
        position_ids[row, length - n:] = torch.arange(n)
    images = torch.cat([imgs for _, imgs in docs])
    return Batch(input_ids=input_ids, position_ids=position_ids, segment_ids=segment_ids, images=images)


def check_media_files(request: Request) -> None:
    """Fail fast, before the model loads, on files that do not exist."""
    for kind, paths in (("image", request.images), ("video", request.videos)):
        for path in paths:
            if not os.path.isfile(path):
                raise GenerationInputError(f"{kind} {path}: no such file")
