"""Run the frozen Emu and VAE once over the image-text shards of a decoder config and write what
training needs to WebDataset shards, so that training reads them instead (no Emu, no VAE in the loop):

    python -m emu_mc.decoder.precompute --config configs/decoder_tiny.yaml --out DIR [--samples-per-shard N]
    torchrun --nproc_per_node=8 -m emu_mc.decoder.precompute --config configs/decoder_sd15.yaml --out DIR
    # then train with --data.precomputed DIR

DIR holds `part-<rank>-<n>.tar` (each rank reads every world-th input shard), one sample per pair:
cond.npy (float32 [Q, H], the teacher-forced condition), mean.npy and std.npy (float32 [C, h, w], the
VAE posterior at decoder.resolution: training draws a fresh latent each time it reads a pair) and
source.txt (input shard and key); plus uncond.npy ([1, Q, H], generation's unconditional condition)
and meta.json (the LLM width, the resolution, the Emu checkpoint, the sample counts).
"""
import argparse
import io
import json
import logging
import os
import sys
import tarfile
from collections import Counter

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("emu_mc.decoder")
UNCOND_FILE, META_FILE = "uncond.npy", "meta.json"


def shard_pattern(directory: str) -> str:
    return os.path.join(directory, "part-*.tar")


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


class ShardWriter:
    """Samples -> `part-<rank>-<n>.tar` files of at most `per_shard` samples, each written under a
    temporary name and renamed when complete."""

    def __init__(self, directory: str, rank: int, per_shard: int):
        self.directory, self.rank, self.per_shard = directory, rank, per_shard
        self.tar, self.count, self.shards, self.written = None, 0, 0, 0

    def add(self, members: dict) -> None:
        if self.tar is None:
            self._path = os.path.join(self.directory, f"part-{self.rank:03d}-{self.shards:06d}.tar")
            self.tar = tarfile.open(self._path + ".tmp", "w")
        key = f"{self.rank:03d}{self.written:09d}"
        for name, data in members.items():
            info = tarfile.TarInfo(f"{key}.{name}")
            info.size = len(data)
            self.tar.addfile(info, io.BytesIO(data))
        self.count, self.written = self.count + 1, self.written + 1
        if self.count == self.per_shard:
            self.close()

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            os.replace(self._path + ".tmp", self._path)
            self.tar, self.count, self.shards = None, 0, self.shards + 1


def precompute(cfg, out_dir: str, samples_per_shard: int = 1000) -> dict:
    """Every readable pair of cfg.data.sources on this rank's shards -> out_dir. Returns the counts."""
    from emu_mc.data.shards import expand_shards, index_shard, read_sample
    from emu_mc.data.errors import SampleError
    from emu_mc.decoder.condition import teacher_forced_conditions, unconditional_condition
    from emu_mc.decoder.data import PairDecoder
    from emu_mc.decoder.objective import vae_posterior
    from emu_mc.inference.decoder import VisualDecoder
    from emu_mc.inference.loading import load_emu
    from emu_mc.parallel.setup import device

    emu = load_emu(cfg.emu.checkpoint, tokenizer=cfg.emu.tokenizer or None, tensor_parallel=1, device=device())
    rank, world = dist.get_rank(), dist.get_world_size()
    vae = VisualDecoder.load(cfg.decoder.init, emu.cfg.model.llm.hidden_size, device=emu.device).vae
    decode = PairDecoder(cfg, emu.cfg, emu.tokenizer, emu.ids)
    os.makedirs(out_dir, exist_ok=True)
    writer, skipped, pending = ShardWriter(out_dir, rank, samples_per_shard), Counter(), []

    def flush():
        batch = decode.collate([item for item, _ in pending])
        cond = teacher_forced_conditions(emu.model, batch.emu.to(emu.device)).float().cpu().numpy()
        mean, std = (t.cpu().numpy() for t in vae_posterior(vae, batch.pixels))
        for i, (_, source) in enumerate(pending):
            writer.add({"cond.npy": _npy(cond[i]), "mean.npy": _npy(mean[i]), "std.npy": _npy(std[i]),
                        "source.txt": source.encode()})
        pending.clear()

    shards = [p for src in cfg.data.sources for p in expand_shards(src.shards)][rank::world]
    for path in shards:
        index = index_shard(path)
        if index.error is not None:
            log.warning("%s: %s", path, index.error)
        for ref in index.samples:
            try:
                pending.append((decode(read_sample(index.source, ref)), f"{path}:{ref.key}"))
            except SampleError as err:
                skipped[err.reason] += 1
            if len(pending) == cfg.data.micro_batch_size:
                flush()
    if pending:
        flush()
    writer.close()
    counts = torch.tensor([writer.written, sum(skipped.values())], dtype=torch.float64, device=emu.device)
    dist.all_reduce(counts)
    if rank == 0:
        np.save(os.path.join(out_dir, UNCOND_FILE), unconditional_condition(emu).float().cpu().numpy())
        with open(os.path.join(out_dir, META_FILE), "w") as f:
            json.dump({"llm_width": emu.cfg.model.llm.hidden_size, "resolution": cfg.decoder.resolution,
                       "emu_checkpoint": emu.checkpoint, "samples": int(counts[0]), "skipped": int(counts[1])}, f,
                      indent=1)
    dist.barrier()
    return {"samples": int(counts[0]), "skipped": int(counts[1])}


def main(argv=None) -> int:
    from emu_mc.config import ConfigError
    from emu_mc.decoder.config import load_decoder_config
    from emu_mc.pretrain import setup_logging
    from emu_mc.run_loop import EXIT_CONFIG, report, run_with_exit_code

    rank = int(os.environ.get("RANK", 0))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML decoder job config (its emu, decoder and data.sources)")
    parser.add_argument("--out", required=True, help="output directory of the precomputed shards")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_decoder_config(args.config, overrides)
        if cfg.data.precomputed:
            raise ConfigError("data.precomputed: must be empty here (precompute reads data.sources)")
        from emu_mc.train_decoder import check_local_paths

        check_local_paths(cfg)
        if args.samples_per_shard < 1:
            raise ConfigError("--samples-per-shard: must be >= 1")
    except (ConfigError, OSError) as err:
        return report(rank, f"config error: {err}", EXIT_CONFIG)
    setup_logging(rank)

    def run():
        counts = precompute(cfg, args.out, args.samples_per_shard)
        log.info("wrote %d samples to %s (%d skipped); train with --data.precomputed %s", counts["samples"],
                 args.out, counts["skipped"], args.out)

    return run_with_exit_code(run, rank)


if __name__ == "__main__":
    sys.exit(main())
