"""Segments -> one Emu document: `<s> text [IMG] <image> x Q [/IMG] ... </s>` plus its images.

Over-long documents are truncated to `seq_length` tokens (eos kept) at a point that never splits an
image block: text is cut at the token, an image (or a video frame) that does not fit whole is left
out together with everything after it; or, with `overlong="skip"`, rejected (reason too_long).
Only images that are kept are decoded.

A `chat` sample (emu_mc/data/chat.py) is rendered with the Emu-I template and carries a loss mask: only
the assistant's answers and the `</s>` ending each are targets. An over-long chat keeps its first
exchanges that fit whole (none fit, or `overlong="skip"`: too_long); any image or video that does not
decode skips the sample.
"""
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from emu_mc.data.chat import Answer, Piece, Role, parse_chat, render
from emu_mc.data.errors import CORRUPT_IMAGE, EMPTY_DOCUMENT, MISSING_KEY, TOO_LONG, SampleError
from emu_mc.data.sources import DROPS_BAD_IMAGES, PARSERS, Image, Segment, Text, Video
from emu_mc.tokenizer import SpecialTokenIds, image_placeholder_ids


@dataclass
class Document:
    tokens: List[int]  # bos ... eos, len <= seq_length
    images: torch.Tensor  # float32 [num_images, 3, S, S], one per [IMG] block, in order
    truncated: bool = False
    dropped_images: Counter = field(default_factory=Counter)  # reason -> images left out
    decode_paths: Counter = field(default_factory=Counter)  # e.g. "image:pil" -> count
    # Per token: True = a training target (predicted from the token before it); None = every token.
    loss_mask: Optional[List[bool]] = None


def make_encoder(tokenizer, ids: SpecialTokenIds, keep_turn_tokens: bool = False) -> Callable[[str], List[int]]:
    """A thread-safe text -> token ids function (no bos/eos; special ids filtered out, so a caption
    that spells "[IMG]" cannot forge an image block, nor "[USER]" a chat turn unless
    `keep_turn_tokens`: a plain generation prompt may spell the chat template, as the release's do)."""
    turns = set() if keep_turn_tokens else {ids.user, ids.assistant}
    banned = ({ids.bos, ids.eos, ids.pad, ids.img_begin, ids.img_end, ids.img_slot} | turns) - {None}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        from tokenizers import Tokenizer

        own = Tokenizer.from_str(backend.to_str())  # a private copy: no shared truncation/padding state
        own.no_truncation()
        own.no_padding()

        def encode(text: str) -> List[int]:
            return [t for t in own.encode(text, add_special_tokens=False).ids if t not in banned]
    else:
        lock = threading.Lock()

        def encode(text: str) -> List[int]:
            with lock:
                return [t for t in tokenizer.encode(text, add_special_tokens=False) if t not in banned]
    return encode


class DocumentBuilder:
    """(source kind, sample files) -> Document. Raises SampleError for an unusable sample."""

    def __init__(self, encode: Callable[[str], List[int]], ids: SpecialTokenIds, *, num_queries: int,
                 seq_length: int, frames_per_video: int, decoder, overlong: str = "truncate"):
        self.encode = encode
        self.ids = ids
        self.block = image_placeholder_ids(ids, num_queries)
        self.seq_length = seq_length
        self.frames = frames_per_video
        self.decoder = decoder
        self.overlong = overlong
        self.space = encode(" ")

    def __call__(self, kind: str, files: Dict[str, bytes]) -> Document:
        if kind == "chat":
            return self.build_chat(render(parse_chat(files)))
        segments = PARSERS[kind](files)
        return self.build(segments, drop_bad_images=DROPS_BAD_IMAGES[kind])

    # -- planning
    def _plan(self, items: List[Tuple[str, object]], excluded: set) -> Tuple[List[Tuple[int, object]], bool]:
        """Which items fit in seq_length - 2 tokens: [(item index, what)] where what is the text's
        token ids (cut to fit) or the number of frames (1 for an image); and whether anything was cut.
        Two texts that meet because the image between them was dropped are joined by a space."""
        budget = self.seq_length - 2
        block = len(self.block)
        plan: List[Tuple[int, object]] = []
        for i, (kind, payload) in enumerate(items):
            if i in excluded:
                continue
            if kind == "text":
                if plan and items[plan[-1][0]][0] == "text":
                    payload = self.space + payload
                take = min(len(payload), budget)
                if take:
                    plan.append((i, payload[:take]))
                budget -= take
                if take < len(payload):
                    return plan, True
            else:
                want = self.frames if kind == "video" else 1
                take = min(want, budget // block)
                if take:
                    plan.append((i, take))
                budget -= take * block
                if take < want:
                    return plan, True
        return plan, False

    def build(self, segments: List[Segment], drop_bad_images: bool, end_with_eos: bool = True) -> Document:
        """segments -> Document. `end_with_eos=False` leaves the document open (a generation prompt)."""
        items: List[Tuple[str, object]] = []
        for seg in segments:
            if isinstance(seg, Text):
                ids = self.encode(seg.text)
                if ids:
                    items.append(("text", ids))
            elif isinstance(seg, Image):
                items.append(("image", seg))
            elif isinstance(seg, Video):
                items.append(("video", seg))
        dropped: Counter = Counter()
        paths: Counter = Counter()
        excluded = set()
        for i, (kind, seg) in enumerate(items):
            if kind == "image" and seg.data is None:
                if not drop_bad_images:
                    raise SampleError(MISSING_KEY, f"image {seg.name} is missing")
                excluded.add(i)
                dropped[MISSING_KEY] += 1

        pixels: Dict[int, torch.Tensor] = {}
        while True:  # decode what the plan keeps; a dropped image frees room, so plan again
            plan, truncated = self._plan(items, excluded)
            if truncated and self.overlong == "skip":
                raise SampleError(TOO_LONG, f"the document does not fit in {self.seq_length} tokens")
            todo = [i for i, _ in plan if items[i][0] == "image" and i not in pixels]
            videos = [(i, n) for i, n in plan if items[i][0] == "video" and i not in pixels]
            if not todo and not videos:
                break
            decoded, failed = self._decode_media({i: items[i][1] for i in todo},
                                                 {i: items[i][1] for i, _ in videos}, paths)
            pixels.update(decoded)
            for i, error in failed.items():
                if not drop_bad_images:
                    raise error
                excluded.add(i)
                dropped[error.reason] += 1

        tokens = [self.ids.bos]
        images: List[torch.Tensor] = []
        for i, what in plan:
            kind = items[i][0]
            if kind == "text":
                tokens.extend(what)
            else:
                tokens.extend(self.block * what)
                images.append(pixels[i][:what] if kind == "video" else pixels[i][None])
        if len(tokens) == 1:
            reason = CORRUPT_IMAGE if dropped.get(CORRUPT_IMAGE) else EMPTY_DOCUMENT
            raise SampleError(reason, f"nothing left of the document (dropped images: {dict(dropped)})")
        if end_with_eos:
            tokens.append(self.ids.eos)
        return Document(tokens, self._stack(images), truncated, dropped, paths)

    def _decode_media(self, images: Dict[int, Image], videos: Dict[int, Video], paths: Counter
                      ) -> Tuple[Dict[int, torch.Tensor], Dict[int, SampleError]]:
        """(pixels: [3, S, S] per image and [frames, 3, S, S] per video, by item index; the images that
        failed to decode, as SampleErrors). A bad video raises SampleError. `paths` counts the decode paths."""
        pixels: Dict[int, torch.Tensor] = {}
        failed: Dict[int, SampleError] = {}
        if images:
            results, used = self.decoder.images([image.data for image in images.values()])
            paths.update(used)
            for (i, image), result in zip(images.items(), results):
                if isinstance(result, torch.Tensor):
                    pixels[i] = result
                else:
                    failed[i] = SampleError(result.reason, f"image {image.name}: {result.message}")
        for i, video in videos.items():
            try:
                pixels[i], path = self.decoder.video(video.data, self.frames)
            except SampleError as e:
                raise SampleError(e.reason, f"video {video.name}: {e.message}") from None
            paths[path] += 1
        return pixels, failed

    def _stack(self, images: List[torch.Tensor]) -> torch.Tensor:
        """[n, 3, S, S] float32 pixels of a document's images in order ([0, 3, S, S] without any)."""
        return torch.cat(images) if images else torch.zeros(0, 3, self.decoder.size, self.decoder.size)

    # -- chat
    def _chat_items(self, pieces: List[Piece]) -> List[Tuple[str, object, bool]]:
        """Pieces -> [(kind, token ids | Image | Video, is a target)]; adjacent texts are encoded together."""
        role_ids = {"user": self.ids.user, "assistant": self.ids.assistant}
        if None in role_ids.values():
            raise ValueError("the tokenizer has no [USER] / [ASSISTANT] tokens (set model.chat_tokens: true)")
        items: List[Tuple[str, object, bool]] = []
        text = ""
        for piece in pieces + [None]:
            if isinstance(piece, Text):
                text += piece.text
                continue
            if text:
                items.append(("text", self.encode(text), False))
                text = ""
            if isinstance(piece, Role):
                items.append(("text", [role_ids[piece.name]], False))
            elif isinstance(piece, Answer):
                items.append(("text", self.encode(piece.text) + [self.ids.eos], True))
            elif isinstance(piece, Image):
                items.append(("image", piece, False))
            elif isinstance(piece, Video):
                items.append(("video", piece, False))
        return items

    def build_chat(self, exchanges: List[List[Piece]]) -> Document:
        """Rendered exchanges (emu_mc.data.chat.render; a generation prompt's last one is open) ->
        Document with its loss mask. The first exchanges that fit in seq_length tokens are kept."""
        block = len(self.block)
        size = {"text": len, "image": lambda _: block, "video": lambda _: block * self.frames}
        items: List[Tuple[str, object, bool]] = []
        budget, kept = self.seq_length - 1, 0
        for pieces in exchanges:
            these = self._chat_items(pieces)
            need = sum(size[kind](what) for kind, what, _ in these)
            if need > budget:
                break
            items += these
            budget -= need
            kept += 1
        if kept == 0 or (kept < len(exchanges) and self.overlong == "skip"):
            raise SampleError(TOO_LONG, f"{'the conversation' if kept else 'its first exchange'} does not fit "
                                        f"in {self.seq_length} tokens")
        paths: Counter = Counter()
        pixels, failed = self._decode_media({i: what for i, (kind, what, _) in enumerate(items) if kind == "image"},
                                            {i: what for i, (kind, what, _) in enumerate(items) if kind == "video"},
                                            paths)
        if failed:
            raise next(iter(failed.values()))
        tokens, mask, images = [self.ids.bos], [False], []
        for i, (kind, what, target) in enumerate(items):
            if kind != "text":
                images.append(pixels[i] if kind == "video" else pixels[i][None])
            ids = what if kind == "text" else self.block * images[-1].shape[0]
            tokens += ids
            mask += [target] * len(ids)
        return Document(tokens, self._stack(images), kept < len(exchanges), Counter(), paths, loss_mask=mask)
