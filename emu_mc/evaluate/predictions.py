"""Predictions on disk: resumable, one JSONL line per finished example, written as it finishes.

During a run each data-parallel rank appends to its own `predictions.rank{r}.jsonl` (flushed per batch,
so a killed run loses at most the batch in flight). At the end rank 0 gathers every rank's records and
writes `predictions.jsonl` (sorted by id, atomically) and removes the rank files. A rerun reads all of
them, whatever the number of ranks that wrote them, and generates only the ids not yet finished.
"""
import glob
import json
import os
from typing import Dict, Iterable, List

MERGED = "predictions.jsonl"


def read_finished(out_dir: str) -> Dict[str, dict]:
    """id -> record, from the merged file and any rank files (a torn last line is ignored)."""
    finished = {}
    for path in [os.path.join(out_dir, MERGED)] + sorted(glob.glob(os.path.join(out_dir, "predictions.rank*.jsonl"))):
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the line a killed run was writing
                finished[str(record["id"])] = record
    return finished


class RankWriter:
    """Appends this rank's finished records to predictions.rank{r}.jsonl."""

    def __init__(self, out_dir: str, rank: int):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, f"predictions.rank{rank}.jsonl")

    def append(self, records: Iterable[dict]) -> None:
        with open(self.path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())


def _sort_key(record_id: str):
    return (0, int(record_id), "") if record_id.isdigit() else (1, 0, record_id)


def write_merged(out_dir: str, records: Dict[str, dict]) -> str:
    """predictions.jsonl with every record, sorted by id (numeric ids numerically); rank files removed."""
    path = os.path.join(out_dir, MERGED)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(records[k]) + "\n" for k in sorted(records, key=_sort_key))
    os.replace(tmp, path)
    for part in glob.glob(os.path.join(out_dir, "predictions.rank*.jsonl")):
        os.remove(part)
    return path


def shard(ids: List[str], rank: int, world: int) -> List[str]:
    """This rank's disjoint share of `ids` (every world-th, from rank)."""
    return ids[rank::world]
