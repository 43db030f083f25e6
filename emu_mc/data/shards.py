"""WebDataset tar shards on local disk: pattern expansion, a member index, random-access reads.

A shard is an uncompressed tar whose members are grouped into samples by WebDataset's rule:
`dir/key.ext` -> key `dir/key`, extension `ext` (everything after the first dot of the file name,
lower-cased); consecutive members with the same key form one sample. The index keeps each member's
byte offset, so a sample can be read (and a run resumed) without scanning the shard again.
"""
import glob
import os
import re
import tarfile
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from braceexpand import braceexpand

from emu_mc.data.errors import UNREADABLE_SAMPLE, SampleError

_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset's rule (base_plus_ext)


def expand_shards(pattern: str) -> List[str]:
    """`a-{000..002}.tar::b/*.tar` -> the list of paths, in pattern order (globs sorted).

    Brace patterns are expanded without checking existence (a missing shard is counted when read);
    glob patterns list existing files only.
    """
    out: List[str] = []
    for part in pattern.split("::"):
        part = part.strip()
        if not part:
            continue
        for path in braceexpand(part):
            path = os.path.expanduser(path)
            if glob.has_magic(path):
                out.extend(sorted(glob.glob(path)))
            else:
                out.append(path)
    return out


@dataclass
class SampleRef:
    """Where one sample's members lie in its shard: ext -> (data offset, size) in bytes."""

    key: str
    members: Dict[str, Tuple[int, int]] = field(default_factory=dict)


@dataclass
class ShardIndex:
    path: str
    samples: List[SampleRef]
    error: Optional[str] = None  # set when the shard was unreadable or cut short (samples = what was read)
    timed_out: bool = False  # not indexed within the timeout: its thread may still be stuck


def split_key(name: str) -> Optional[Tuple[str, str]]:
    """`dir/0001.0.jpg` -> ("dir/0001", "0.jpg"); None for names without an extension."""
    m = _KEY_EXT.match(name)
    if m is None:
        return None
    return m.group(1), m.group(2).lower()


def index_shard(path: str) -> ShardIndex:
    """Scan the tar headers of `path` (no member data is read). Never raises: an unreadable or
    truncated shard gives the samples read so far and `error` saying what went wrong."""
    samples: List[SampleRef] = []
    try:
        size = os.path.getsize(path)
        with tarfile.open(path, mode="r:") as tar:
            while True:
                try:
                    info = tar.next()
                except (tarfile.TarError, OSError, EOFError, ValueError) as e:
                    return ShardIndex(path, _complete(samples, size), f"truncated or corrupt tar: {e}")
                if info is None:
                    break
                if not info.isfile():
                    continue
                parts = split_key(info.name)
                if parts is None or os.path.basename(parts[0]).startswith("__"):
                    continue
                key, ext = parts
                if not samples or samples[-1].key != key or ext in samples[-1].members:
                    samples.append(SampleRef(key))
                samples[-1].members[ext] = (info.offset_data, info.size)
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        return ShardIndex(path, [], f"unreadable shard: {type(e).__name__}: {e}")
    complete = _complete(samples, size)
    error = None if len(complete) == len(samples) else "truncated tar: the last sample's data is cut off"
    return ShardIndex(path, complete, error)


def index_shard_within(path: str, timeout_s: float, skip: bool = False) -> ShardIndex:
    """`index_shard(path)` given up after `timeout_s` seconds (0 = wait forever): opening a FIFO
    nobody writes, or a file on a hung mount, blocks in the kernel, so the scan runs on a daemon
    thread that is abandoned on timeout. `skip`: a shard that timed out before is not opened again."""
    def timed_out() -> ShardIndex:
        return ShardIndex(path, [], f"not opened and indexed within data.sample_timeout_s = {timeout_s:g} s "
                                    "(a FIFO, or a hung filesystem?)", timed_out=True)

    if skip:
        return timed_out()
    if timeout_s <= 0:
        return index_shard(path)
    result: List[ShardIndex] = []
    thread = threading.Thread(target=lambda: result.append(index_shard(path)), name="emu-shard-index", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return result[0] if result else timed_out()


def _complete(samples: List[SampleRef], size: int) -> List[SampleRef]:
    """Drop samples whose member data runs past the end of the file."""
    return [s for s in samples if all(off + n <= size for off, n in s.members.values())]


def read_sample(path: str, ref: SampleRef) -> Dict[str, bytes]:
    """The member bytes of one indexed sample: ext -> bytes. Raises SampleError(unreadable_sample)."""
    out = {}
    try:
        with open(path, "rb") as f:
            for ext, (offset, size) in ref.members.items():
                f.seek(offset)
                data = f.read(size)
                if len(data) != size:
                    raise SampleError(UNREADABLE_SAMPLE, f"member {ref.key}.{ext} is cut short ({len(data)} of {size} bytes)")
                out[ext] = data
    except OSError as e:
        raise SampleError(UNREADABLE_SAMPLE, f"{type(e).__name__}: {e}") from None
    return out
