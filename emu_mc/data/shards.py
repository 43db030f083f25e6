"""WebDataset tar shards: pattern expansion, a member index, random-access reads.

A shard is an uncompressed tar whose members are grouped into samples by WebDataset's rule:
`dir/key.ext` -> key `dir/key`, extension `ext` (everything after the first dot of the file name,
lower-cased); consecutive members with the same key form one sample. The index keeps each member's
byte offset, so a sample can be read (and a run resumed) without scanning the shard again. Remote
shards (`pipe:`, http(s), s3/gs: emu_mc/data/remote.py) are first spooled to local disk.
"""
import functools
import glob
import os
import re
import tarfile
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

from braceexpand import braceexpand

from emu_mc.data.errors import UNREADABLE_SAMPLE, SampleError
from emu_mc.data.remote import RemoteError, RemoteOptions, SpooledShard, is_remote, redact, spool

_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset's rule (base_plus_ext)


def pattern_parts(pattern: str) -> List[str]:
    """`a-{0..2}.tar::pipe:cat b.tar` -> ["a-{0..2}.tar", "pipe:cat b.tar"] (empty parts dropped)."""
    return [part.strip() for part in pattern.split("::") if part.strip()]


def expand_part(part: str) -> List[str]:
    """One `::` part -> its shards, in pattern order. Brace patterns expand for every kind of spec
    without checking existence (a missing shard is counted when read); globs (local paths only)
    list existing files, sorted."""
    out: List[str] = []
    for spec in braceexpand(part):
        if is_remote(spec):
            out.append(spec)
            continue
        path = os.path.expanduser(spec)
        out.extend(sorted(glob.glob(path)) if glob.has_magic(path) else [path])
    return out


def expand_shards(pattern: str) -> List[str]:
    """`a-{000..002}.tar::b/*.tar::https://host/c-{0..9}.tar` -> the list of shards, in pattern order."""
    return [spec for part in pattern_parts(pattern) for spec in expand_part(part)]


@dataclass
class SampleRef:
    """Where one sample's members lie in its shard: ext -> (data offset, size) in bytes."""

    key: str
    members: Dict[str, Tuple[int, int]] = field(default_factory=dict)


# Reasons a shard is bad (loader.stats()["bad_shard_reasons"]; remote ones in emu_mc/data/remote.py)
UNREADABLE_SHARD = "unreadable_shard"  # missing, not a tar
TRUNCATED_SHARD = "truncated_shard"  # a tar cut short: the samples before the cut are used
SHARD_TIMEOUT = "shard_timeout"  # not opened and indexed within data.sample_timeout_s


@dataclass
class ShardIndex:
    path: str  # the shard's spec: a local path, or a remote one (`pipe:...`, a URL)
    samples: List[SampleRef]
    error: Optional[str] = None  # set when the shard was unreadable or cut short (samples = what was read)
    timed_out: bool = False  # not indexed within the timeout: its thread may still be stuck
    reason: Optional[str] = None  # why `error` is set: one of the reasons above or in remote.py
    spool: Optional[SpooledShard] = None  # a remote shard's local copy, read instead of `path`

    @property
    def source(self) -> Union[str, SpooledShard]:
        """What read_sample reads the samples from."""
        return self.spool if self.spool is not None else self.path

    @functools.cached_property
    def name(self) -> str:
        """`path` as logs and messages show it (remote.redact: without credentials); found once per shard,
        not per sample."""
        return redact(self.path)


def split_key(name: str) -> Optional[Tuple[str, str]]:
    """`dir/0001.0.jpg` -> ("dir/0001", "0.jpg"); None for names without an extension."""
    m = _KEY_EXT.match(name)
    if m is None:
        return None
    return m.group(1), m.group(2).lower()


def index_shard(path: str, remote: RemoteOptions = RemoteOptions()) -> ShardIndex:
    """Scan the tar headers of `path` (no member data is read); a remote shard is spooled first
    (remote.spool). Never raises: an unreadable or truncated shard gives the samples read so far
    and `error` saying what went wrong."""
    if not is_remote(path):
        return _index_tar(path, None)
    try:
        spooled = spool(path, remote)
    except RemoteError as e:
        return ShardIndex(path, [], str(e), reason=e.reason)
    return _index_tar(path, spooled)


def _index_tar(path: str, spooled: Optional[SpooledShard]) -> ShardIndex:
    """index_shard of the local file `path`, or of `spooled` (the copy of the remote `path`)."""
    samples: List[SampleRef] = []
    try:
        if spooled is None:
            size, tar = os.path.getsize(path), tarfile.open(path, mode="r:")
        else:
            spooled.file.seek(0)
            size, tar = spooled.size, tarfile.open(fileobj=spooled.file, mode="r:")
        with tar:
            while True:
                try:
                    info = tar.next()
                except (tarfile.TarError, OSError, EOFError, ValueError) as e:
                    return ShardIndex(path, _complete(samples, size), f"truncated or corrupt tar: {e}",
                                      reason=TRUNCATED_SHARD, spool=spooled)
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
        return ShardIndex(path, [], f"unreadable shard: {type(e).__name__}: {e}", reason=UNREADABLE_SHARD)
    complete = _complete(samples, size)
    if len(complete) == len(samples):
        return ShardIndex(path, complete, spool=spooled)
    return ShardIndex(path, complete, "truncated tar: the last sample's data is cut off", reason=TRUNCATED_SHARD,
                      spool=spooled)


def index_shard_within(path: str, timeout_s: float, skip: bool = False,
                       remote: RemoteOptions = RemoteOptions()) -> ShardIndex:
    """`index_shard(path)` given up after `timeout_s` seconds (0 = wait forever): opening a FIFO
    nobody writes, or a file on a hung mount, blocks in the kernel, so the scan runs on a daemon
    thread that is abandoned on timeout. `skip`: a shard that timed out before is not opened again.
    A remote shard's copy times out on its own when it stalls (`remote`), however long it takes."""
    def timed_out() -> ShardIndex:
        return ShardIndex(path, [], f"not opened and indexed within data.sample_timeout_s = {timeout_s:g} s "
                                    "(a FIFO, or a hung filesystem?)", timed_out=True, reason=SHARD_TIMEOUT)

    if skip:
        return timed_out()
    if timeout_s <= 0 or is_remote(path):
        return index_shard(path, remote)
    result: List[ShardIndex] = []
    thread = threading.Thread(target=lambda: result.append(index_shard(path)), name="emu-shard-index", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return result[0] if result else timed_out()


def _complete(samples: List[SampleRef], size: int) -> List[SampleRef]:
    """Drop samples whose member data runs past the end of the file."""
    return [s for s in samples if all(off + n <= size for off, n in s.members.values())]


def read_sample(path: Union[str, SpooledShard], ref: SampleRef) -> Dict[str, bytes]:
    """The member bytes of one indexed sample (`path`: ShardIndex.source): ext -> bytes. Raises
    SampleError(unreadable_sample)."""
    if isinstance(path, SpooledShard):
        return {ext: path.read(offset, size) for ext, (offset, size) in ref.members.items()}
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
