"""Data pipeline: WebDataset shards of four sources -> packed Emu micro-batches (emu_mc.batch.Batch).

Modules, in the order data flows: remote (fetch pipe:/http/s3/gs shards) -> shards (index, read)
-> order + stream (which samples, per rank) -> sources (sample files -> segments) -> decode (pixels)
-> document (tokens + images) -> packing (rows) -> loader (mixture, workers, state, counters). make_shards and build_sample write shards.
"""
from emu_mc.data.errors import DataError, SampleError
from emu_mc.data.loader import build_data_loader

__all__ = ["build_data_loader", "DataError", "SampleError"]
