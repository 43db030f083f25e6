"""One source's samples for one data-parallel rank, in the order of emu_mc/data/order.py, endlessly.

`position` names the next sample to read as (epoch, unit index in the rank's list, sample index in
the unit, fallback), so setting it back to a saved value replays the same samples. Epochs wrap with
a new shuffle. Shards are indexed when first opened (a small cache keeps the recent indexes); an
unreadable or truncated shard is logged and counted, and contributes the samples that could be read.
A shard not indexed within `open_timeout_s` (a FIFO, a hung network mount) counts as unreadable.
A remote shard (emu_mc/data/remote.py) is spooled to local disk when opened, so a position inside it
is exact as for a local shard: a resumed run fetches the shard again and reads from that sample on.
While a remote shard is read, the next one in the rank's order is fetched on a background thread.
Only the `_SPOOLS_KEPT` most recently opened remote shards keep their local copy in the cache.

When a whole epoch of this rank's units holds no readable sample, the rank falls back (fallback = 1)
to reading parts of the source's readable shards, as a rank does when there are fewer shards than
ranks: each readable shard cut into dp_size parts. So only a source with no readable shard at all
stops the run (DataError).
"""
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future
from typing import Callable, List, Optional, Set, Tuple

from emu_mc.data.errors import DataError
from emu_mc.data.order import Position, Unit, rank_units, split_units, unit_samples
from emu_mc.data.remote import RemoteOptions, is_remote
from emu_mc.data.shards import SampleRef, ShardIndex, index_shard_within

log = logging.getLogger("emu_mc.data")
_INDEX_CACHE = 8  # shard indexes kept in memory per stream
_SPOOLS_KEPT = 2  # of which remote shards with their local copy (the shard being read and the one before)
_NO_UNIT: Tuple[Tuple[int, int], ShardIndex, List[SampleRef]] = ((-1, -1), ShardIndex("", []), [])


class SourceStream:
    def __init__(self, source: int, kind: str, shards: List[str], *, seed: int, dp_rank: int, dp_size: int,
                 on_bad_shard: Callable[[ShardIndex], None], open_timeout_s: float = 0.0,
                 remote: RemoteOptions = RemoteOptions()):
        self.source = source
        self.kind = kind
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.shards = shards
        self.own_units = split_units(shards, dp_size)
        if not self.own_units:
            raise DataError(f"source {source} ({kind}): no shards")
        self.units = self.own_units
        self.fallback = 0
        self.on_bad_shard = on_bad_shard
        self.open_timeout_s = open_timeout_s
        self.remote = remote
        self._position: Position = (0, 0, 0, 0)
        self._indexes: "OrderedDict[str, ShardIndex]" = OrderedDict()
        self._hung: Set[str] = set()  # shards whose index timed out: not opened again
        self._epoch_units: Tuple[int, List[Unit]] = (-1, [])
        self._unit_refs = _NO_UNIT  # ((epoch, unit), its shard's index, its samples in order)
        self._fetching: Optional[Tuple[str, Future]] = None  # the remote shard fetched ahead: (path, its index)

    @property
    def position(self) -> Position:
        return self._position

    @position.setter
    def position(self, value) -> None:
        """Also accepts the (epoch, unit, sample) positions of states saved before the fallback existed."""
        value = tuple(value) + (0,) * (4 - len(value))
        self._use_fallback(value[3])
        self._position = value

    def _use_fallback(self, fallback: int) -> None:
        if fallback == self.fallback:
            return
        if fallback:
            readable = [path for path in self.shards if self._index(path).samples]
            if not readable:
                raise DataError(f"source {self.source} ({self.kind}): no readable sample in any of its "
                                f"{len(self.shards)} shard(s); see the shard errors above")
            log.warning("data: source %d (%s): no readable sample in the shards of dp rank %d (of %d); it reads "
                        "parts of the %d readable shard(s) instead", self.source, self.kind, self.dp_rank,
                        self.dp_size, len(readable))
            self.units = split_units(readable, self.dp_size * len(readable))  # dp_size parts of each
        else:
            self.units = self.own_units
        self.fallback = fallback
        self._epoch_units, self._unit_refs = (-1, []), _NO_UNIT

    def _index(self, path: str) -> ShardIndex:
        if path in self._indexes:
            self._indexes.move_to_end(path)
            return self._indexes[path]
        if self._fetching is not None and self._fetching[0] == path:
            index = self._fetching[1].result()  # never raises: index_shard_within reports errors in the index
            self._fetching = None
        else:
            index = self._open(path)
        if index.timed_out:
            self._hung.add(path)
        if index.error is not None:
            self.on_bad_shard(index)
        self._indexes[path] = index
        if len(self._indexes) > _INDEX_CACHE:
            self._indexes.popitem(last=False)
        spooled = [p for p, i in self._indexes.items() if i.spool is not None]
        for old in spooled[:-_SPOOLS_KEPT]:  # its disk space is freed once no read in flight holds it
            del self._indexes[old]
        return index

    def _open(self, path: str) -> ShardIndex:
        return index_shard_within(path, self.open_timeout_s, skip=path in self._hung, remote=self.remote)

    def _fetch_after(self, epoch: int, u: int) -> None:
        """Start fetching the shard of the unit after (epoch, u) when it is remote and not cached
        (a fetch started before and not used is dropped: its thread finishes unseen)."""
        units = self._units(epoch)
        following = units[u + 1] if u + 1 < len(units) else rank_units(
            self.units, seed=self.seed, source=self.source, epoch=epoch + 1, dp_rank=self.dp_rank,
            dp_size=self.dp_size)[0]
        path = following.shard
        if not is_remote(path) or path in self._indexes or (self._fetching and self._fetching[0] == path):
            return
        future: Future = Future()
        threading.Thread(target=lambda: future.set_result(self._open(path)), name="emu-shard-prefetch",
                         daemon=True).start()
        self._fetching = (path, future)

    def _units(self, epoch: int) -> List[Unit]:
        if self._epoch_units[0] != epoch:
            units = rank_units(self.units, seed=self.seed, source=self.source, epoch=epoch,
                               dp_rank=self.dp_rank, dp_size=self.dp_size)
            self._epoch_units = (epoch, units)
        return self._epoch_units[1]

    def _refs(self, epoch: int, u: int) -> Tuple[ShardIndex, List[SampleRef]]:
        if self._unit_refs[0] != (epoch, u):
            unit = self._units(epoch)[u]
            index = self._index(unit.shard)
            refs = unit_samples(index, unit, seed=self.seed, source=self.source, epoch=epoch)
            self._unit_refs = ((epoch, u), index, refs)
            self._fetch_after(epoch, u)
        return self._unit_refs[1:]

    def next_ref(self) -> Tuple[ShardIndex, SampleRef]:
        """(shard index, sample) at `position`; advances `position`. Falls back (see the module
        docstring) when a whole epoch of this rank's units holds no readable sample; raises DataError
        when no shard of the source is readable."""
        epoch, u, s, fallback = self._position
        empty_units = 0
        while True:
            units = self._units(epoch)
            if u >= len(units):
                epoch, u, s = epoch + 1, 0, 0
                continue
            index, refs = self._refs(epoch, u)
            if s < len(refs):
                self._position = (epoch, u, s + 1, fallback)
                return index, refs[s]
            empty_units += s == 0
            if empty_units > len(units):
                if fallback:
                    raise DataError(f"source {self.source} ({self.kind}): no readable sample in any of its "
                                    f"{len(self.shards)} shard(s); see the shard errors above")
                fallback, u, s, empty_units = 1, 0, 0, 0
                self._use_fallback(1)
                continue
            u, s = u + 1, 0
