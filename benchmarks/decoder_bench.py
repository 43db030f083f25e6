"""Decoder-training benchmark: images/s per training step with online conditions (the frozen Emu and
the VAE run in the step) against precomputed ones (python -m emu_mc.decoder.precompute: the step reads
conditions and VAE posteriors, only the UNet runs), same UNet, batch and config otherwise.

    python benchmarks/decoder_bench.py                      # CPU: tiny Emu (synthetic 1-step run) + tiny decoder
    python benchmarks/decoder_bench.py --emu RUN --decoder DIR --config configs/decoder_sd15.yaml  # one GPU

A step = the next batch from the loader + the forward/backward/AdamW step. Numbers are medians of
--steps timed steps after --warmup steps: wall clock on CUDA; on CPU this process's CPU time (a
shared CPU machine's wall clock measures the other tenants as much as us). Prints a table, writes JSON.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_common import ROOT, add_output_args, save_results  # noqa: E402


def tiny_inputs(folder: str) -> tuple:
    """(Emu run dir, decoder dir): one synthetic step of configs/tiny.yaml, a random tiny decoder (32 px)."""
    from emu_mc.config import load_config
    from emu_mc.inference.tiny_decoder import write_tiny_decoder
    from emu_mc.pretrain import train

    run = os.path.join(folder, "emu")
    train(load_config(os.path.join(ROOT, "configs/tiny.yaml"),
                      ["--data.kind", "synthetic", "--train.steps", "1", "--train.out_dir", run]))
    return run, write_tiny_decoder(os.path.join(folder, "decoder"), cross_attention_dim=64, sample_size=16)


def images_per_s(run, loader, steps: int, warmup: int, cuda: bool) -> float:
    import torch

    clock = time.perf_counter if cuda else time.process_time
    times = []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        start = clock()
        batch = next(loader)
        run.step(batch, lr=1e-5)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(clock() - start)
    return batch.size / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs/decoder_tiny.yaml"))
    parser.add_argument("--emu", help="pretraining run / checkpoint (default: a tiny synthetic one)")
    parser.add_argument("--decoder", help="decoder directory (default: a tiny random one)")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    add_output_args(parser, "decoder")
    args = parser.parse_args()

    import torch

    from emu_mc.decoder.config import load_decoder_config
    from emu_mc.decoder.data import pair_loader, precomputed_loader
    from emu_mc.decoder.precompute import precompute
    from emu_mc.pretrain import setup_logging
    from emu_mc.train_decoder import DecoderRun, check_local_paths

    setup_logging(0)
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as folder:
        emu, decoder = (args.emu, args.decoder) if args.emu and args.decoder else tiny_inputs(folder)
        overrides = ["--emu.checkpoint", emu, "--decoder.init", decoder, "--data.micro_batch_size", str(args.batch)]
        cfg = load_decoder_config(args.config, overrides)
        device = torch.device("cuda" if cuda else "cpu")
        online = DecoderRun(cfg, device, check_local_paths(cfg))
        rates = {"online": images_per_s(online, pair_loader(cfg, online.emu, seed=0, dp_rank=0, dp_size=1),
                                        args.steps, args.warmup, cuda)}
        shards = os.path.join(folder, "precomputed")
        start = time.perf_counter()
        written = precompute(cfg, shards)["samples"]
        precompute_s = time.perf_counter() - start
        pre_cfg = load_decoder_config(args.config, overrides + ["--data.precomputed", shards])
        offline = DecoderRun(pre_cfg, device, check_local_paths(pre_cfg))
        rates["precomputed"] = images_per_s(offline, precomputed_loader(pre_cfg, seed=0, dp_rank=0, dp_size=1),
                                            args.steps, args.warmup, cuda)
    unet_m = sum(p.numel() for p in online.unet.parameters()) / 1e6
    table = "\n".join([f"{'conditions':<12} {'images/s':>10}",
                       *(f"{name:<12} {rate:>10.2f}" for name, rate in rates.items()),
                       f"speed-up {rates['precomputed'] / rates['online']:.2f}x; precompute: {written} pairs in "
                       f"{precompute_s:.1f}s wall"])
    notes = [f"config {os.path.relpath(args.config, ROOT)}, batch {args.batch}, resolution {cfg.decoder.resolution}, "
             f"UNet {unet_m:.1f}M params, median of {args.steps} steps after {args.warmup}; "
             f"{'wall clock' if cuda else 'process CPU time'}"]
    print("\n".join(notes + [table]))
    save_results("decoder", {"batch": args.batch, "resolution": cfg.decoder.resolution, "unet_params_m": unet_m,
                             "images_per_s": rates, "speedup": rates["precomputed"] / rates["online"],
                             "precompute_pairs": written, "precompute_wall_s": precompute_s}, notes, table, args.out)


if __name__ == "__main__":
    main()
