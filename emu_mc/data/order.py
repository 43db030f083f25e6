"""Which samples a data-parallel rank reads, and in which order: a pure function of the seed.

The shards of a source are cut into *units*: a whole shard when there are at least as many shards
as ranks, else `ceil(dp_size / num_shards)` interleaved parts of each shard (part j = samples
j, j + parts, ...), so a small data set still gives every rank a disjoint share. Each epoch the
units are permuted with (seed, source, epoch) and rank r takes every dp_size-th one from r; within a
unit the samples are permuted with (seed, source, epoch, unit). Ranks thus read disjoint samples
whose union is the whole epoch, and a position (epoch, unit, sample) names one sample exactly.
"""
import math
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np

from emu_mc.data.shards import SampleRef, ShardIndex

_UNIT_ORDER, _SAMPLE_ORDER = 1, 2  # stream ids mixed into the seeds


@dataclass(frozen=True)
class Unit:
    uid: int  # index in the source's unit list (stable across epochs)
    shard: str
    part: int
    num_parts: int


def split_units(shards: List[str], dp_size: int) -> List[Unit]:
    """Cut `shards` into at least `dp_size` units (see the module docstring)."""
    if not shards:
        return []
    parts = max(1, math.ceil(dp_size / len(shards)))
    return [Unit(i * parts + j, s, j, parts) for i, s in enumerate(shards) for j in range(parts)]


def rank_units(units: List[Unit], *, seed: int, source: int, epoch: int, dp_rank: int, dp_size: int) -> List[Unit]:
    """This rank's units for `epoch`, in reading order."""
    perm = np.random.default_rng([seed, source, epoch, _UNIT_ORDER]).permutation(len(units))
    return [units[i] for i in perm[dp_rank::dp_size]]


def unit_samples(index: ShardIndex, unit: Unit, *, seed: int, source: int, epoch: int) -> List[SampleRef]:
    """The samples of `unit` (its part of the shard's index) in this epoch's shuffled order."""
    refs = index.samples[unit.part::unit.num_parts]
    perm = np.random.default_rng([seed, source, epoch, _SAMPLE_ORDER, unit.uid]).permutation(len(refs))
    return [refs[i] for i in perm]


Position = Tuple[int, int, int, int]
"""(epoch, unit index in the rank's list, sample index in the unit, fallback: 1 when the rank reads
parts of the source's readable shards instead of its own units, emu_mc/data/stream.py)."""
