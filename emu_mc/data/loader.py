"""The data loader pretrain.py iterates: micro-batches of packed Emu documents, resumable exactly.

    loader = build_data_loader(cfg, tokenizer, dp_rank=0, dp_size=1)
    batch = next(loader)            # emu_mc.batch.Batch on CPU
    state = loader.state_dict()     # small, picklable: goes into the checkpoint
    loader.load_state_dict(state)   # the next batches are the ones an uninterrupted run would see

`data.kind: webdataset`: each draw picks a source by weight with an RNG keyed by (seed, dp rank,
draw number), takes that source's next sample (emu_mc/data/stream.py), builds its document (decoded
by `data.num_workers` threads, `data.prefetch` samples ahead per source, consumed in order, so the
output does not depend on the number of workers) and packs it (emu_mc/data/packing.py). A bad sample
is skipped, counted by reason and logged with its shard and key; the draw moves on to the next
sample. So is one not ready `data.sample_timeout_s` after the loader starts waiting for it (its
thread is abandoned: emu_mc/data/workers.py); once every worker thread is stuck, DataError. A
timeout depends on timing, so a run that hit one does not replay exactly. The state is (draw count,
next position per source, counters), taken before the document the packer carries over, so that
document is drawn again after a restore.
`data.kind: synthetic`: random batches keyed by (seed, dp rank, batch number); state = batch number.
"""
import logging
import os
from collections import Counter, deque
from concurrent.futures import Future, TimeoutError as FutureTimeout
from typing import Any, Deque, Dict, List, Tuple, Union

import numpy as np
import torch

from emu_mc.batch import Batch, synthetic_batch
from emu_mc.config import Config, ConfigError
from emu_mc.data.decode import make_decoder
from emu_mc.data.document import Document, DocumentBuilder, make_encoder
from emu_mc.data.errors import TIMEOUT, UNEXPECTED, DataError, SampleError
from emu_mc.data.packing import Packer
from emu_mc.data.remote import RemoteOptions, is_remote, missing_extra, redact
from emu_mc.data.shards import (SampleRef, ShardIndex, expand_part, index_shard_within, pattern_parts,
                                read_sample)
from emu_mc.data.stream import SourceStream
from emu_mc.data.workers import DaemonThreadPool
from emu_mc.tokenizer import special_token_ids

log = logging.getLogger("emu_mc.data")
_MIXTURE = 3  # stream id mixed into the mixture RNG's seed (order.py uses 1 and 2)
_LOGGED_PER_REASON = 10  # skipped samples logged as warnings per reason; the rest at debug level
Loaded = Tuple[Union[Document, SampleError], str, str]  # (document or error, shard, key)


def build_data_loader(cfg: Config, tokenizer, *, dp_rank: int = 0, dp_size: int = 1):
    """The loader for `cfg.data` on data-parallel rank `dp_rank` of `dp_size`."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
    if cfg.data.kind == "synthetic":
        return SyntheticLoader(cfg, tokenizer, dp_rank)
    return WebDatasetLoader(cfg, tokenizer, dp_rank, dp_size)


def _seed(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> 1)


class SyntheticLoader:
    """Random batches (emu_mc.batch.synthetic_batch), deterministic in (seed, dp_rank, batch number)."""

    def __init__(self, cfg: Config, tokenizer, dp_rank: int):
        self.cfg = cfg
        self.ids = special_token_ids(tokenizer)
        self.vocab_size = len(tokenizer)
        self.dp_rank = dp_rank
        self.batches = 0
        log.info("data: synthetic batches (%d image(s) per row)", cfg.data.images_per_synthetic_sample)

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        generator = torch.Generator().manual_seed(_seed(self.cfg.train.seed, self.dp_rank, self.batches))
        self.batches += 1
        d, m = self.cfg.data, self.cfg.model
        return synthetic_batch(self.ids, batch_size=d.micro_batch_size, seq_length=d.seq_length,
                               vocab_size=self.vocab_size, num_queries=m.resampler.num_queries,
                               image_size=m.vision.image_size, images_per_row=d.images_per_synthetic_sample,
                               generator=generator)

    def state_dict(self) -> Dict[str, Any]:
        return {"kind": "synthetic", "batches": self.batches}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        _check_kind(state, "synthetic")
        self.batches = int(state["batches"])

    def stats(self) -> Dict[str, Any]:
        return {"kind": "synthetic", "batches": self.batches}

    @property
    def samples_skipped(self) -> int:
        return 0

    def close(self) -> None:
        pass


def _check_kind(state: Dict[str, Any], kind: str) -> None:
    if state.get("kind") != kind:
        raise ValueError(f"loader state is for data.kind {state.get('kind')!r}, this loader is {kind!r}")


def remote_options(cfg: Config) -> RemoteOptions:
    d = cfg.data
    return RemoteOptions(retries=d.remote_retries, timeout_s=d.remote_timeout_s, spool_dir=d.spool_dir)


def source_shards(cfg: Config, open_first: bool = False) -> List[List[str]]:
    """Expanded shard lists per source, checked without reading data. Raises ConfigError for a local
    pattern that names no existing file, a remote one that expands to nothing, a remote scheme whose
    fsspec package is missing, or (`open_first`: the pre-flight check with data.check_remote) a
    source whose first shard cannot be opened."""
    out = []
    for i, src in enumerate(cfg.data.sources):
        field_name = f"data.sources[{i}].shards"
        shards = []
        for part in pattern_parts(src.shards):
            specs = expand_part(part)
            missing = next((m for m in map(missing_extra, specs) if m), None)
            if missing:
                raise ConfigError(f"{field_name}: {missing}")
            if not any(is_remote(p) or os.path.isfile(p) for p in specs):
                where = "" if os.path.isabs(os.path.expanduser(part)) else \
                    f" (relative paths resolve against the working directory, {os.getcwd()})"
                raise ConfigError(f"{field_name}: {part!r} matches no existing file{where}")
            shards.extend(specs)
        if not shards:
            raise ConfigError(f"{field_name}: {redact(src.shards)!r} names no shard")
        if open_first and src.weight > 0:
            _check_first_shard(field_name, shards[0], cfg)
        out.append(shards)
    return out


def _check_first_shard(field_name: str, shard: str, cfg: Config) -> None:
    """data.check_remote: the source's first shard opens and holds a sample (remote ones are fetched)."""
    index = index_shard_within(shard, cfg.data.sample_timeout_s, remote=remote_options(cfg))
    if not index.samples:
        raise ConfigError(f"{field_name}: data.check_remote: the first shard {index.name} is not usable: "
                          f"{index.error or 'no samples'}")
    log.info("data: check_remote: %s holds %d samples", index.name, len(index.samples))


class WebDatasetLoader:
    """Mixture of WebDataset sources -> packed micro-batches (see the module docstring)."""

    def __init__(self, cfg: Config, tokenizer, dp_rank: int, dp_size: int):
        d, m = cfg.data, cfg.model
        self.cfg = cfg
        self.seed = cfg.train.seed
        self.dp_rank = dp_rank
        ids = special_token_ids(tokenizer)
        self.decoder = make_decoder(d.decoder, m.vision.image_size)
        self.builder = DocumentBuilder(make_encoder(tokenizer, ids), ids, num_queries=m.resampler.num_queries,
                                       seq_length=d.seq_length, frames_per_video=d.frames_per_video,
                                       decoder=self.decoder, overlong=d.overlong)
        shards = source_shards(cfg)
        self.sources = [i for i, src in enumerate(d.sources) if src.weight > 0]
        self.streams = [SourceStream(i, d.sources[i].kind, shards[i], seed=self.seed, dp_rank=dp_rank,
                                     dp_size=dp_size, on_bad_shard=self._bad_shard, open_timeout_s=d.sample_timeout_s,
                                     remote=remote_options(cfg))
                        for i in self.sources]
        weights = np.array([d.sources[i].weight for i in self.sources], dtype=np.float64)
        self.cumulative = np.cumsum(weights / weights.sum())
        self.packer = Packer(d.seq_length, d.micro_batch_size, ids.pad, m.vision.image_size)
        self.pool = DaemonThreadPool(d.num_workers) if d.num_workers else None
        self.pending: List[Deque] = [deque() for _ in self.streams]  # (position, future, shard, key) read ahead
        self.abandoned: List[Future] = []  # timed-out samples; those still running hold a worker thread
        self.draws = 0
        self.counts: Counter = Counter()
        self.bad_shards: Dict[str, str] = {}
        self.bad_shard_reasons: Dict[str, str] = {}
        log.info("data: %s on dp rank %d/%d; decoder %s: %s; %d worker thread(s), prefetch %d, sample timeout %s",
                 ", ".join(f"{d.sources[i].kind} x{d.sources[i].weight:g} ({len(shards[i])} shards)"
                           for i in self.sources), dp_rank, dp_size, self.decoder.name,
                 self.decoder.describe(), d.num_workers, d.prefetch,
                 f"{d.sample_timeout_s:g} s" if d.sample_timeout_s and d.num_workers else "none")
        remote = sum(is_remote(p) for i in self.sources for p in shards[i])
        if remote:
            log.info("data: %d remote shard(s), fetched to %s with %d retries and a %s stall timeout; the %s "
                     "decoder gets their samples' bytes in memory as for local shards", remote,
                     d.spool_dir or "the system temp dir", d.remote_retries,
                     f"{d.remote_timeout_s:g} s" if d.remote_timeout_s else "no", self.decoder.name)

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        return self.packer.next_batch(self._draw)

    # -- reading
    def _bad_shard(self, index: ShardIndex) -> None:
        if index.name not in self.bad_shards:
            log.warning("data: shard %s: %s (%d readable samples used)", index.name, index.error, len(index.samples))
        self.bad_shards[index.name] = index.error
        self.bad_shard_reasons[index.name] = index.reason

    def _load(self, kind: str, index: ShardIndex, ref: SampleRef) -> Loaded:
        try:
            return self.builder(kind, read_sample(index.source, ref)), index.name, ref.key
        except SampleError as e:
            return e, index.name, ref.key
        except Exception as e:  # a bug or a library failure on odd bytes: skip the sample, never the run
            return SampleError(UNEXPECTED, f"{type(e).__name__}: {e}"), index.name, ref.key

    def _submit(self, k: int) -> None:
        stream = self.streams[k]
        position = stream.position
        index, ref = stream.next_ref()
        self.pending[k].append((position, self.pool.submit(self._load, stream.kind, index, ref), index.name, ref.key))

    def _take(self, k: int) -> Loaded:
        """Source k's next loaded sample, in stream order; keeps `prefetch` samples in flight."""
        stream = self.streams[k]
        if self.pool is None:
            return self._load(stream.kind, *stream.next_ref())
        while len(self.pending[k]) < self.cfg.data.prefetch:
            self._submit(k)
        _, future, path, key = self.pending[k].popleft()
        self._submit(k)
        return self._wait(future, path, key)

    def _wait(self, future: Future, path: str, key: str) -> Loaded:
        """The sample's result, or a TIMEOUT error after data.sample_timeout_s; DataError when every
        worker thread is stuck on an abandoned sample (nothing could ever finish)."""
        timeout = self.cfg.data.sample_timeout_s
        try:
            return future.result(timeout=timeout or None)
        except FutureTimeout:
            future.cancel()  # a sample still queued behind busy threads is dropped, not left to run later
        self.abandoned = [f for f in self.abandoned if not f.done()] + [future]
        stuck = sum(f.running() for f in self.abandoned)
        if stuck >= self.cfg.data.num_workers:
            raise DataError(f"all {stuck} data worker threads are stuck: no sample finished within "
                            f"data.sample_timeout_s = {timeout:g} s (last waited for: {key} in {path}); "
                            "check the shards' filesystem, or raise data.sample_timeout_s")
        return SampleError(TIMEOUT, f"not read and decoded within data.sample_timeout_s = {timeout:g} s; "
                                    f"{stuck} worker thread(s) stuck"), path, key

    def _choose(self) -> int:
        u = np.random.default_rng([self.seed, _MIXTURE, self.dp_rank, self.draws]).random()
        return min(int(np.searchsorted(self.cumulative, u, side="right")), len(self.streams) - 1)

    def _draw(self) -> Tuple[Document, Dict[str, Any]]:
        """The next usable document and the loader state just before it was drawn."""
        while True:
            snapshot = self.state_dict()
            k = self._choose()
            self.draws += 1
            result, path, key = self._take(k)
            self.counts["read"] += 1
            if isinstance(result, Document):
                self._count_document(k, result)
                return result, snapshot
            self._skip(result, path, key)

    def _count_document(self, k: int, doc: Document) -> None:
        self.counts["used"] += 1
        self.counts[f"source:{self.streams[k].kind}"] += 1
        self.counts["truncated"] += doc.truncated
        self.counts.update({f"dropped_image:{r}": n for r, n in doc.dropped_images.items()})
        self.counts.update({f"path:{p}": n for p, n in doc.decode_paths.items()})

    def _skip(self, error: SampleError, path: str, key: str) -> None:
        self.counts[f"skipped:{error.reason}"] += 1
        level = logging.WARNING if self.counts[f"skipped:{error.reason}"] <= _LOGGED_PER_REASON else logging.DEBUG
        log.log(level, "data: skipped %s in %s (%s): %s", key, path, error.reason, error.message)
        read, failed = self.counts["read"], self.counts["read"] - self.counts["used"]
        d = self.cfg.data
        if read >= d.failure_check_after and failed > d.max_failure_fraction * read:
            reasons = {k.split(":", 1)[1]: n for k, n in self.counts.items() if k.startswith("skipped:")}
            raise DataError(f"{failed} of {read} samples were unusable ({failed / read:.1%} > "
                            f"data.max_failure_fraction {d.max_failure_fraction:g}); by reason: {reasons}; "
                            f"last: {key} in {path}: {error}")

    # -- state
    def _positions(self) -> List[Tuple[int, int, int, int]]:
        return [q[0][0] if q else s.position for s, q in zip(self.streams, self.pending)]

    def state_dict(self) -> Dict[str, Any]:
        if self.packer.carry is not None:
            return self.packer.carry[1]
        return {"kind": "webdataset", "sources": list(self.sources), "draws": self.draws,
                "positions": self._positions(), "counts": dict(self.counts)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        _check_kind(state, "webdataset")
        if state["sources"] != self.sources:
            raise ConfigError(f"data.sources: the checkpoint was written reading sources {state['sources']} (the "
                              f"indexes of those with weight > 0), this run reads {self.sources}. Resume with the "
                              "checkpoint's data.sources, or set another train.out_dir to start afresh")
        self.draws = int(state["draws"])
        self.counts = Counter(state["counts"])
        for stream, queue, position in zip(self.streams, self.pending, state["positions"]):
            queue.clear()  # samples read ahead from the old position; running ones finish unseen
            stream.position = tuple(position)
        self.packer.carry = None

    @property
    def samples_skipped(self) -> int:
        """Samples read but unusable since the start of the run (restored with the state)."""
        return self.counts["read"] - self.counts["used"]

    def stats(self) -> Dict[str, Any]:
        """Counters since the start of the run (restored with the state)."""
        grouped: Dict[str, Dict[str, int]] = {}
        for key, n in self.counts.items():
            if ":" in key:
                group, name = key.split(":", 1)
                grouped.setdefault(group, {})[name] = n
        return {"kind": "webdataset", "decoder": self.decoder.name, "samples_read": self.counts["read"],
                "samples_used": self.counts["used"], "truncated": self.counts["truncated"],
                "skipped": grouped.get("skipped", {}), "images_dropped": grouped.get("dropped_image", {}),
                "per_source": grouped.get("source", {}), "decode_paths": grouped.get("path", {}),
                "bad_shards": dict(self.bad_shards),
                "bad_shard_reasons": dict(Counter(self.bad_shard_reasons.values()))}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
