"""Image-text pairs for decoder training, read through the pretraining data pipeline's pieces (shard
streams with resumable positions and per-rank splits, sample parsing, DocumentBuilder): each pair
gives Emu's document `<s> caption [IMG] <image>xQ [/IMG]` (with its image at the ViT's size) and
the image for the VAE, resized (shorter side) to the decoder's resolution and center-cropped, in
[-1, 1]. Bad samples are skipped and counted; too many stop the run with a DataError.
"""
import io
import random
from collections import Counter
from dataclasses import dataclass
from typing import Dict

import numpy as np
import torch

from emu_mc.batch import Batch
from emu_mc.data.decode import make_decoder
from emu_mc.data.document import DocumentBuilder, make_encoder
from emu_mc.data.errors import CORRUPT_IMAGE, DataError, SampleError
from emu_mc.data.shards import expand_shards, read_sample
from emu_mc.data.sources import parse_image_text
from emu_mc.data.stream import SourceStream
from emu_mc.inference.prompts import left_padded_batch


@dataclass
class PairBatch:
    emu: Batch  # left-padded documents, each ending with its image block
    pixels: torch.Tensor  # float32 [B, 3, R, R] in [-1, 1], R = decoder.resolution


def vae_pixels(blob: bytes, resolution: int) -> torch.Tensor:
    """Encoded image -> float32 [3, R, R] in [-1, 1]: shorter side resized to R (bicubic), center crop.
    Raises SampleError(corrupt_image)."""
    from PIL import Image as PILImage

    try:
        with PILImage.open(io.BytesIO(blob)) as img:
            img.load()
            rgb = img.convert("RGB")
    except Exception as e:  # PIL raises many types for bad bytes
        raise SampleError(CORRUPT_IMAGE, f"PIL cannot decode the image: {type(e).__name__}: {e}") from None
    scale = resolution / min(rgb.size)
    size = (max(resolution, round(rgb.width * scale)), max(resolution, round(rgb.height * scale)))
    rgb = rgb.resize(size, PILImage.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    rgb = rgb.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


class PairLoader:
    """Endless batches of pairs for one data-parallel rank; `state_dict` / `load_state_dict` resume it
    exactly (stream positions, source choice, skip counts)."""

    def __init__(self, cfg, emu_cfg, tokenizer, ids, *, seed: int, dp_rank: int, dp_size: int):
        self.cfg, self.resolution = cfg.data, cfg.decoder.resolution
        self.streams = [SourceStream(i, "image_text", expand_shards(src.shards), seed=seed, dp_rank=dp_rank,
                                     dp_size=dp_size, on_bad_shard=self._bad_shard,
                                     open_timeout_s=cfg.data.sample_timeout_s)
                        for i, src in enumerate(cfg.data.sources)]
        self.weights = [src.weight for src in cfg.data.sources]
        self.choice = random.Random(f"{seed}/{dp_rank}")
        q = emu_cfg.model.resampler.num_queries
        self.builder = DocumentBuilder(make_encoder(tokenizer, ids), ids, num_queries=q,
                                       seq_length=cfg.data.max_caption_tokens + q + 3, frames_per_video=1,
                                       decoder=make_decoder("cpu", emu_cfg.model.vision.image_size), overlong="skip")
        self.pad = ids.pad
        self.read, self.skipped = 0, Counter()

    def _bad_shard(self, index) -> None:
        self.skipped["unreadable_shard"] += 1

    def _pair(self):
        stream = self.streams[self.choice.choices(range(len(self.streams)), self.weights)[0]]
        path, ref = stream.next_ref()
        self.read += 1
        files = read_sample(path, ref)
        image, text = parse_image_text(files)
        doc = self.builder.build([text, image], drop_bad_images=False, end_with_eos=False)
        return (doc.tokens, doc.images), vae_pixels(image.data, self.resolution)

    def __next__(self) -> PairBatch:
        docs, pixels = [], []
        while len(docs) < self.cfg.micro_batch_size:
            try:
                doc, pix = self._pair()
            except SampleError as err:
                self.skipped[err.reason] += 1
                self._check_failures()
                continue
            docs.append(doc)
            pixels.append(pix)
        return PairBatch(left_padded_batch(docs, self.pad), torch.stack(pixels))

    def _check_failures(self) -> None:
        bad = sum(self.skipped.values())
        if self.read >= self.cfg.failure_check_after and bad > self.cfg.max_failure_fraction * self.read:
            raise DataError(f"{bad} of {self.read} samples were bad ({dict(self.skipped)}), more than "
                            f"data.max_failure_fraction ({self.cfg.max_failure_fraction}); check data.sources")

    @property
    def samples_skipped(self) -> int:
        return sum(self.skipped.values())

    def state_dict(self) -> Dict:
        return {"positions": [s.position for s in self.streams], "choice": self.choice.getstate(),
                "read": self.read, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: Dict) -> None:
        for stream, position in zip(self.streams, state["positions"]):
            stream.position = position
        self.choice.setstate(state["choice"])
        self.read, self.skipped = state["read"], Counter(state["skipped"])
