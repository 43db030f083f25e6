"""Decoder-training batches, read through the pretraining data pipeline's pieces (shard streams with
resumable positions and per-rank splits, sample parsing, DocumentBuilder). Two kinds of shards:

- image-text pairs (data.sources): each gives Emu's document `<s> caption [IMG] <image>xQ [/IMG]`
  (its image at the ViT's size) and the image for the VAE, resized (shorter side) to the decoder's
  resolution and center-cropped, in [-1, 1] -> PairBatch;
- precomputed shards (data.precomputed, written by emu_mc/decoder/precompute.py): each sample holds its
  condition and its VAE posterior -> PrecomputedBatch (no Emu, no VAE in the loop).

Bad samples are skipped and counted; too many stop the run with a DataError.
"""
import io
import random
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch

from emu_mc.batch import Batch
from emu_mc.data.decode import make_decoder
from emu_mc.data.document import DocumentBuilder, make_encoder
from emu_mc.data.errors import BAD_JSON, CORRUPT_IMAGE, DataError, SampleError
from emu_mc.data.shards import expand_shards, read_sample
from emu_mc.data.sources import parse_image_text
from emu_mc.data.stream import SourceStream
from emu_mc.inference.prompts import left_padded_batch

PRECOMPUTED_MEMBERS = ("cond.npy", "mean.npy", "std.npy")  # [Q, H], [C, h, w], [C, h, w] float32


@dataclass
class PairBatch:
    emu: Batch  # left-padded documents, each ending with its image block
    pixels: torch.Tensor  # float32 [B, 3, R, R] in [-1, 1], R = decoder.resolution

    @property
    def size(self) -> int:
        return self.pixels.shape[0]


@dataclass
class PrecomputedBatch:
    cond: torch.Tensor  # float32 [B, Q, H]: Emu's teacher-forced condition
    mean: torch.Tensor  # float32 [B, C, h, w]: the VAE posterior's mean (unscaled)
    std: torch.Tensor  # float32 [B, C, h, w]: and its standard deviation

    @property
    def size(self) -> int:
        return self.cond.shape[0]


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


class PairDecoder:
    """An image-text sample's files -> (Emu's document (tokens, images), VAE pixels); collate -> PairBatch."""

    def __init__(self, cfg, emu_cfg, tokenizer, ids):
        q = emu_cfg.model.resampler.num_queries
        self.builder = DocumentBuilder(make_encoder(tokenizer, ids), ids, num_queries=q,
                                       seq_length=cfg.data.max_caption_tokens + q + 3, frames_per_video=1,
                                       decoder=make_decoder("cpu", emu_cfg.model.vision.image_size), overlong="skip")
        self.resolution, self.pad = cfg.decoder.resolution, ids.pad

    def __call__(self, files: Dict[str, bytes]):
        image, text = parse_image_text(files)
        doc = self.builder.build([text, image], drop_bad_images=False, end_with_eos=False)
        return (doc.tokens, doc.images), vae_pixels(image.data, self.resolution)

    def collate(self, items: List) -> PairBatch:
        return PairBatch(left_padded_batch([doc for doc, _ in items], self.pad), torch.stack([p for _, p in items]))


def decode_precomputed(files: Dict[str, bytes]) -> Tuple[torch.Tensor, ...]:
    """A precomputed sample's files -> (cond [Q, H], mean, std [C, h, w]) float32."""
    try:
        return tuple(torch.from_numpy(np.load(io.BytesIO(files[name]))) for name in PRECOMPUTED_MEMBERS)
    except (KeyError, ValueError, OSError) as err:
        raise SampleError(BAD_JSON, f"not a precomputed decoder sample ({type(err).__name__}: {err})") from None


def collate_precomputed(items: List) -> PrecomputedBatch:
    return PrecomputedBatch(*(torch.stack(column) for column in zip(*items)))


class ShardLoader:
    """Endless batches of `micro_batch_size` decoded samples for one data-parallel rank, drawn from the
    weighted `patterns`; `state_dict` / `load_state_dict` resume it exactly (stream positions, source
    choice, skip counts)."""

    def __init__(self, data_cfg, patterns: List[Tuple[str, float]], decode: Callable, collate: Callable, *,
                 seed: int, dp_rank: int, dp_size: int):
        self.cfg, self.decode, self.collate = data_cfg, decode, collate
        self.streams = [SourceStream(i, "image_text", expand_shards(pattern), seed=seed, dp_rank=dp_rank,
                                     dp_size=dp_size, on_bad_shard=self._bad_shard,
                                     open_timeout_s=data_cfg.sample_timeout_s)
                        for i, (pattern, _) in enumerate(patterns)]
        self.weights = [weight for _, weight in patterns]
        self.choice = random.Random(f"{seed}/{dp_rank}")
        self.read, self.skipped = 0, Counter()

    def _bad_shard(self, index) -> None:
        self.skipped["unreadable_shard"] += 1

    def _sample(self):
        stream = self.streams[self.choice.choices(range(len(self.streams)), self.weights)[0]]
        index, ref = stream.next_ref()
        self.read += 1
        return self.decode(read_sample(index.source, ref))

    def __next__(self):
        items = []
        while len(items) < self.cfg.micro_batch_size:
            try:
                items.append(self._sample())
            except SampleError as err:
                self.skipped[err.reason] += 1
                self._check_failures()
        return self.collate(items)

    def _check_failures(self) -> None:
        bad = sum(self.skipped.values())
        if self.read >= self.cfg.failure_check_after and bad > self.cfg.max_failure_fraction * self.read:
            raise DataError(f"{bad} of {self.read} samples were bad ({dict(self.skipped)}), more than "
                            f"data.max_failure_fraction ({self.cfg.max_failure_fraction}); check the shards")

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


def pair_loader(cfg, emu, *, seed: int, dp_rank: int, dp_size: int) -> ShardLoader:
    """Image-text pairs of cfg.data.sources for the Emu `emu` (LoadedEmu)."""
    decode = PairDecoder(cfg, emu.cfg, emu.tokenizer, emu.ids)
    return ShardLoader(cfg.data, [(s.shards, s.weight) for s in cfg.data.sources], decode, decode.collate,
                       seed=seed, dp_rank=dp_rank, dp_size=dp_size)


def precomputed_loader(cfg, *, seed: int, dp_rank: int, dp_size: int) -> ShardLoader:
    """The precomputed shards in cfg.data.precomputed."""
    from emu_mc.decoder.precompute import shard_pattern

    return ShardLoader(cfg.data, [(shard_pattern(cfg.data.precomputed), 1.0)], decode_precomputed,
                       collate_precomputed, seed=seed, dp_rank=dp_rank, dp_size=dp_size)
