"""Generation benchmark: new text tokens/s and regressed images/s, with and without the KV cache, at
batch 1 and 8, on a randomly initialised model of a config (weights do not change the speed).

    python benchmarks/generate_bench.py                                   # CPU: tiny config, fp32
    python benchmarks/generate_bench.py --config configs/bench_1b.yaml    # one GPU: ~1.2B params, bf16

Text: greedy decoding of --new-tokens tokens after a prompt of one image and --prompt-tokens text
tokens (eos suppressed, so every row runs to the end). Images: the 32-step regression loop with
classifier-free guidance (a conditional and an empty-prompt row per image), i.e. the LLM's share of
image generation; --decoder DIR adds the diffusion decoder (--steps) end to end. "no cache" recomputes
the whole sequence with the training forward at every step (the released code's way).
Numbers are medians of --reps timed runs after one warm-up run. Prints a table, writes JSON to --out.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_common import ROOT, device_name, save_results  # noqa: E402


def timed(fn, reps: int, cuda: bool) -> float:
    """Median seconds of fn() over `reps` runs after one warm-up run: wall clock on CUDA; on CPU this
    process's CPU time (a shared CPU machine's wall clock measures the other tenants as much as us)."""
    import torch

    clock = time.perf_counter if cuda else time.process_time
    fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        start = clock()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(clock() - start)
    return statistics.median(times)


def build(config: str):
    """A random-init LoadedEmu of `config` on this machine's device (bf16 on CUDA, fp32 on CPU)."""
    import torch

    from emu_mc.config import load_config
    from emu_mc.inference import LoadedEmu
    from emu_mc.inference.loading import default_device
    from emu_mc.model.emu import EmuModel
    from emu_mc.parallel.groups import init_distributed
    from emu_mc.tokenizer import load_tokenizer, special_token_ids

    cfg = load_config(config)
    init_distributed(1, 1, seed=0)
    device = default_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tok = load_tokenizer(cfg.model.tokenizer)
    ids = special_token_ids(tok)
    torch.manual_seed(0)
    model = EmuModel(cfg.model, ids, len(tok), params_dtype=dtype).to(device).eval()
    return LoadedEmu(model, cfg, tok, ids, checkpoint="(random init)")


def prompt_requests(emu, batch: int, prompt_tokens: int, image_path: str):
    from emu_mc.inference import Request

    words = ("a photo of a cat sitting on a wooden table next to a cup of coffee " * 64).split()
    requests = []
    for i in range(batch):  # rows of slightly different lengths: left padding is exercised
        text, n = [], 0
        for word in words[i:]:
            n += len(emu.tokenizer.encode(" " + word, add_special_tokens=False))
            if n > prompt_tokens - i:
                break
            text.append(word)
        requests.append(Request("{image} " + " ".join(text), images=[image_path]))
    return requests


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="default: configs/bench_1b.yaml on CUDA, configs/tiny.yaml otherwise")
    parser.add_argument("--new-tokens", type=int, help="default 64 on CUDA, 32 otherwise")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="text tokens per prompt (plus one image)")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--decoder", help="a diffusers decoder directory: adds end-to-end images/s")
    parser.add_argument("--steps", type=int, default=50, help="decoder steps with --decoder")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/generate_bench_<device>.json); the "
                                      "table goes next to it as .txt")
    args = parser.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from emu_mc.inference import ImageSettings, TextSettings, VisualDecoder, generate_images, generate_text
    from emu_mc.inference.image import image_conditions

    cuda = torch.cuda.is_available()
    config = args.config or os.path.join(ROOT, "configs", "bench_1b.yaml" if cuda else "tiny.yaml")
    new_tokens = args.new_tokens or (64 if cuda else 32)
    emu = build(config)
    q = emu.cfg.model.resampler.num_queries
    params = sum(p.numel() for p in emu.model.parameters())
    notes = [f"{device_name()}; {os.path.relpath(config, ROOT)} ({params / 1e6:.0f}M params, random init, "
             f"{str(emu.dtype).replace('torch.', '')}); prompt = 1 image + ~{args.prompt_tokens} text tokens; "
             f"{new_tokens} new tokens (greedy, eos suppressed); images = {q} regressed embeddings with guidance; "
             f"median of {args.reps} runs after a warm-up"]
    if not cuda:
        notes.append(f"no CUDA: a tiny model, timed in process CPU time (load average {os.getloadavg()[0]:.0f} on "
                     f"{os.cpu_count()} cores when it started); these numbers say nothing about a GPU.")
    print("\n".join(notes))
    decoder = VisualDecoder.load(args.decoder, emu.cfg.model.llm.hidden_size, device=emu.device,
                                 dtype=emu.dtype) if args.decoder else None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        image_path = os.path.join(tmp, "photo.png")
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image_path)
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            requests = prompt_requests(emu, batch, args.prompt_tokens, image_path)
            for use_cache in (True, False):
                text = TextSettings(max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=use_cache)
                seconds = timed(lambda: generate_text(emu, requests, text), args.reps, cuda)
                image = ImageSettings(use_cache=use_cache, steps=args.steps)
                image_seconds = timed(lambda: image_conditions(emu, requests, image), args.reps, cuda)
                row = {"batch": batch, "kv_cache": use_cache, "text_s": seconds,
                       "new_tokens_per_s": batch * new_tokens / seconds, "regress_s": image_seconds,
                       "images_per_s_regression": batch / image_seconds}
                if decoder is not None:
                    full = timed(lambda: generate_images(emu, decoder, requests, image), 1, cuda)
                    row["images_per_s_end_to_end"] = batch / full
                rows.append(row)
                print(format_row(row))
                table = format_table(rows)
                save_results("generate", {"config": os.path.relpath(config, ROOT), "new_tokens": new_tokens,
                                          "prompt_tokens": args.prompt_tokens, "params": params, "notes": notes,
                                          "results": rows}, notes, table, args.out)
    print("\n" + table)


HEADER = f"{'batch':>5s} {'KV cache':>8s} {'text s':>8s} {'new tok/s':>10s} {'regress s':>9s} {'img/s (LLM)':>11s} " \
         f"{'img/s (e2e)':>11s}"


def format_row(r) -> str:
    e2e = f"{r['images_per_s_end_to_end']:11.2f}" if "images_per_s_end_to_end" in r else f"{'-':>11s}"
    return (f"{r['batch']:5d} {'yes' if r['kv_cache'] else 'no':>8s} {r['text_s']:8.3f} {r['new_tokens_per_s']:10.1f} "
            f"{r['regress_s']:9.3f} {r['images_per_s_regression']:11.2f} {e2e}")


def format_table(rows) -> str:
    lines = [HEADER, "-" * len(HEADER)] + [format_row(r) for r in rows]
    for batch in sorted({r["batch"] for r in rows}):
        pair = {r["kv_cache"]: r for r in rows if r["batch"] == batch}
        if len(pair) == 2:
            lines.append(f"batch {batch}: KV cache speed-up {pair[False]['text_s'] / pair[True]['text_s']:.2f}x "
                         f"(text), "
                         f"{pair[False]['regress_s'] / pair[True]['regress_s']:.2f}x (image regression)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
