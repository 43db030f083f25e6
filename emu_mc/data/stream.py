"""One source's samples for one data-parallel rank, in the order of emu_mc/data/order.py, endlessly.

`position` names the next sample to read as (epoch, unit index in the rank's list, sample index in
the unit), so setting it back to a saved value replays the same samples. Epochs wrap with a new
shuffle. Shards are indexed when first opened (a small cache keeps the recent indexes); an
unreadable or truncated shard is logged and counted, and contributes the samples that could be read.
"""
import logging
from collections import OrderedDict
from typing import Callable, List, Tuple

from emu_mc.data.errors import DataError
from emu_mc.data.order import Position, Unit, rank_units, split_units, unit_samples
from emu_mc.data.shards import SampleRef, ShardIndex, index_shard

log = logging.getLogger("emu_mc.data")
_INDEX_CACHE = 8  # shard indexes kept in memory per stream


class SourceStream:
    def __init__(self, source: int, kind: str, shards: List[str], *, seed: int, dp_rank: int, dp_size: int,
                 on_bad_shard: Callable[[ShardIndex], None]):
        self.source = source
        self.kind = kind
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.units = split_units(shards, dp_size)
        if not self.units:
            raise DataError(f"source {source} ({kind}): no shards")
        self.on_bad_shard = on_bad_shard
        self.position: Position = (0, 0, 0)
        self._indexes: "OrderedDict[str, ShardIndex]" = OrderedDict()
        self._epoch_units: Tuple[int, List[Unit]] = (-1, [])
        self._unit_refs: Tuple[Tuple[int, int], List[SampleRef]] = ((-1, -1), [])

    def _index(self, path: str) -> ShardIndex:
        if path in self._indexes:
            self._indexes.move_to_end(path)
            return self._indexes[path]
        index = index_shard(path)
        if index.error is not None:
            self.on_bad_shard(index)
        self._indexes[path] = index
        if len(self._indexes) > _INDEX_CACHE:
            self._indexes.popitem(last=False)
        return index

    def _units(self, epoch: int) -> List[Unit]:
        if self._epoch_units[0] != epoch:
            units = rank_units(self.units, seed=self.seed, source=self.source, epoch=epoch,
                               dp_rank=self.dp_rank, dp_size=self.dp_size)
            self._epoch_units = (epoch, units)
        return self._epoch_units[1]

    def _refs(self, epoch: int, u: int) -> List[SampleRef]:
        if self._unit_refs[0] != (epoch, u):
            unit = self._units(epoch)[u]
            refs = unit_samples(self._index(unit.shard), unit, seed=self.seed, source=self.source, epoch=epoch)
            self._unit_refs = ((epoch, u), refs)
        return self._unit_refs[1]

    def next_ref(self) -> Tuple[str, SampleRef]:
        """(shard path, sample) at `position`; advances `position`. Raises DataError when a whole
        epoch of this rank's units holds no readable sample."""
        epoch, u, s = self.position
        empty_units = 0
        while True:
            units = self._units(epoch)
            if u >= len(units):
                epoch, u, s = epoch + 1, 0, 0
                continue
            refs = self._refs(epoch, u)
            if s < len(refs):
                self.position = (epoch, u, s + 1)
                return units[u].shard, refs[s]
            empty_units += s == 0
            if empty_units > len(units):
                raise DataError(f"source {self.source} ({self.kind}): no readable sample in any shard of "
                                f"dp rank {self.dp_rank} (of {self.dp_size}); see the shard errors above")
            u, s = u + 1, 0
