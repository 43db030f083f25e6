"""`python -m emu_mc.evaluate`: generate a task's predictions (sharded over data-parallel ranks,
resumable), score them on rank 0, and write results.json, predictions.jsonl and report.md to --out.

Under torchrun every process is a data-parallel rank on a disjoint share of the examples (or, with
--tensor-parallel T, groups of T processes share one model). Bad input is one line on stderr and exit
code 2, before the model loads where possible.
"""
import argparse
import datetime
import json
import logging
import os
import sys
from typing import Dict, List

import numpy as np

from emu_mc.evaluate import paper
from emu_mc.evaluate.clip_score import check_clip_dir
from emu_mc.evaluate.datasets import Example, check_media
from emu_mc.evaluate.predictions import RankWriter, read_finished, shard, write_merged
from emu_mc.evaluate.prompts import build_request, choose_shots
from emu_mc.evaluate.tasks import TASKS, Task, postprocess, read_examples, score_text
from emu_mc.inference import Request
from emu_mc.inference.settings import GenerationInputError, ImageSettings, TextSettings

log = logging.getLogger("emu_mc.evaluate")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m emu_mc.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--checkpoint", required=True, help="pretraining out_dir, its checkpoints/ dir, or a step_N/ dir")
    p.add_argument("--tokenizer", help="override the run's model.tokenizer")
    p.add_argument("--data", required=True, help="annotation json (captions, VQA questions, video QA)")
    p.add_argument("--annotations", help="VQAv2 / OKVQA answers json (beside the questions json)")
    p.add_argument("--media-dir", help="root of the image / video files (default: --data's directory)")
    p.add_argument("--media-name", help="file name pattern from record fields, e.g. COCO_val2014_{image_id:012d}.jpg")
    p.add_argument("--split", default="test", help="Karpathy split to read (default: test)")
    p.add_argument("--limit", type=int, help="evaluate the first N examples only")
    p.add_argument("--out", required=True, help="output directory (predictions, results, report)")
    p.add_argument("--style", choices=["base", "instruct"], default="base", help="prompt style (prompts.py)")
    p.add_argument("--shots", type=int, default=0, help="in-context examples before each query")
    p.add_argument("--seed", type=int, default=0, help="chooses the shots; t2i example k's noise uses seed + k")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tensor-parallel", type=int, default=1, help="processes sharing one model (the rest: DP)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--caption-tokenizer", choices=["auto", "java", "python"], default="auto",
                   help="PTB tokenisation for CIDEr/BLEU: pycocoevalcap's Java one when present, else Python")
    g = p.add_argument_group("generation (the release's: 5 beams, length penalty 0)")
    g.add_argument("--num-beams", type=int, default=5)
    g.add_argument("--length-penalty", type=float, default=0.0)
    g.add_argument("--max-new-tokens", type=int, help="default: 30 for captions, 10 for answers")
    t = p.add_argument_group("text-to-image")
    t.add_argument("--decoder", help="diffusers directory of the visual decoder")
    t.add_argument("--inception", help="local TorchScript Inception for FID (fid.py)")
    t.add_argument("--clip", help="local Hugging Face CLIPModel directory: adds the CLIP score (clip_score.py)")
    t.add_argument("--guidance-scale", type=float, default=ImageSettings.guidance_scale)
    t.add_argument("--steps", type=int, default=ImageSettings.steps)
    p.add_argument("--paper-numbers", help="JSON of the paper's figures with their table and row, to print "
                                           "beside the run (emu_mc/evaluate/paper.py); none are bundled")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--score-only", action="store_true",
                   help="score the predictions already in --out (no model loaded, nothing generated)")
    return p.parse_args(argv)


def load_task(args):
    task = TASKS[args.task]
    media_dir = args.media_dir or os.path.dirname(os.path.abspath(args.data))
    examples = read_examples(task, args.data, args.annotations, media_dir, args.media_name, args.split)
    if args.limit:
        examples = examples[:args.limit]
    if not examples:
        raise GenerationInputError(f"--data {args.data}: no examples (split {args.split!r}?)")
    if args.shots < 0 or args.batch_size < 1:
        raise GenerationInputError("--shots must be >= 0 and --batch-size >= 1")
    if args.shots >= len(examples):
        raise GenerationInputError(f"--shots {args.shots}: the set has only {len(examples)} examples")
    if task.kind == "t2i":
        if args.shots:
            raise GenerationInputError("--shots: t2i_coco is zero-shot (a caption in, an image out)")
        if not args.decoder:
            raise GenerationInputError("--decoder DIR is needed for t2i_coco")
        if not args.inception or not os.path.isfile(args.inception):
            raise GenerationInputError(f"--inception {args.inception}: a local TorchScript Inception file is needed "
                                       "for FID (fid.py); nothing is downloaded at run time")
        if args.clip:
            check_clip_dir(args.clip)
    check_media(examples)
    return task, examples


def requests_for(task: Task, args, examples: List[Example], todo: List[Example]) -> List[Request]:
    if task.kind == "t2i":
        return [Request(e.references[0], mode="image", id=e.id) for e in todo]
    return [build_request(task.kind, args.style, task.media, e, choose_shots(examples, e, args.shots, args.seed))
            for e in todo]


def generate(emu, task: Task, args, batch: List[Example], requests: List[Request], decoder, image_dir,
             order: Dict[str, int]):
    """Records of one batch: {"id", "prediction", "raw"} (text) or {"id", "image", "prompt"} (t2i)."""
    from emu_mc.inference import generate_text
    from emu_mc.inference.image import image_conditions

    if task.kind != "t2i":
        settings = TextSettings(max_new_tokens=args.max_new_tokens or task.max_new_tokens, num_beams=args.num_beams,
                                length_penalty=args.length_penalty)
        return [{"id": e.id, "prediction": postprocess(task, out.text), "raw": out.text}
                for e, out in zip(batch, generate_text(emu, requests, settings))]
    from emu_mc.generate import save_png

    settings = ImageSettings(guidance_scale=args.guidance_scale, steps=args.steps, seed=args.seed).validate()
    cond, uncond = image_conditions(emu, requests, settings)
    records = []
    for i, (e, r) in enumerate(zip(batch, requests)):  # one by one: example k's noise is seed + k on any shard
        one = ImageSettings(**{**settings.__dict__, "seed": args.seed + order[e.id]})
        [pixels], _ = decoder(cond[i:i + 1], None if uncond is None else uncond[i:i + 1], one)
        records.append({"id": e.id, "prompt": r.prompt, "seed": one.seed, "image": save_png(pixels, image_dir, e.id)})
    return records


def predict(emu, task: Task, args, examples: List[Example], batch: List[Example], decoder, order) -> List[dict]:
    """Records of a batch. An example this rank cannot run (a prompt longer than the model's positions,
    an unreadable file) becomes {"id", "error"} and scores as wrong, rather than stopping this rank
    while the others wait for it."""
    try:
        return generate(emu, task, args, batch, requests_for(task, args, examples, batch), decoder,
                        os.path.join(args.out, "images"), order)
    except GenerationInputError as err:
        if len(batch) > 1:  # find which ones
            return [r for e in batch for r in predict(emu, task, args, examples, [e], decoder, order)]
        log.warning("example %s: %s (scored as wrong)", batch[0].id, err)
        return [{"id": batch[0].id, "error": str(err), **({"prediction": ""} if task.kind != "t2i" else {})}]


def score(task: Task, args, records: Dict[str, dict], examples: Dict[str, Example], device) -> dict:
    """The task's metrics over `records` (id -> prediction record), and how many were error records."""
    errors = sum("error" in r for r in records.values())
    if task.kind != "t2i":
        metrics = score_text(task, {k: r["prediction"] for k, r in records.items()}, examples, args.caption_tokenizer)
    else:
        generated = {k: read_rgb(r["image"]) for k, r in records.items() if "image" in r}  # decoded once
        metrics = {"FID": fid_score(args.inception, generated, examples, device)}
        if args.clip:
            metrics["CLIP score"] = t2i_clip_score(args.clip, generated, examples, device)
    return {**metrics, "errors": errors}


def read_rgb(path: str) -> np.ndarray:
    """An image file -> uint8 [H, W, 3]."""
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def fid_score(inception: str, generated: Dict[str, np.ndarray], examples: Dict[str, Example], device) -> float:
    """FID of the generated images (id -> uint8 [H, W, 3]) against the examples' reference images."""
    from emu_mc.evaluate.fid import frechet_distance, inception_features, load_inception

    net = load_inception(inception, device)
    references = [read_rgb(examples[k].media) for k in generated]
    return frechet_distance(inception_features(net, list(generated.values()), device),
                            inception_features(net, references, device))


def t2i_clip_score(clip_dir: str, generated: Dict[str, np.ndarray], examples: Dict[str, Example], device) -> float:
    """Mean CLIP score of the generated images (id -> uint8 [H, W, 3]) against the captions that prompted them."""
    from emu_mc.evaluate.clip_score import clip_score, load_clip

    return clip_score(load_clip(clip_dir, device), list(generated.values()),
                      [examples[k].references[0] for k in generated], device)


def run(args) -> int:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from tqdm import tqdm

    from emu_mc.inference import VisualDecoder, load_emu

    try:
        args.paper = paper.load_paper_numbers(args.paper_numbers) if args.paper_numbers else {}
    except paper.PaperNumbersError as err:
        raise GenerationInputError(str(err)) from None
    task, examples = load_task(args)
    by_id = {e.id: e for e in examples}
    if args.score_only:
        return score_saved(task, args, by_id)
    device = None if args.device == "auto" else torch.device(args.device)
    emu = load_emu(args.checkpoint, tokenizer=args.tokenizer, device=device, tensor_parallel=args.tensor_parallel)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    writes = parallel_state.get_tensor_model_parallel_rank() == 0
    first = dist.get_rank() == 0
    decoder = VisualDecoder.load(args.decoder, emu.cfg.model.llm.hidden_size, device=emu.device, dtype=emu.dtype) \
        if task.kind == "t2i" else None
    finished = [read_finished(args.out) if first else None]
    dist.broadcast_object_list(finished, src=0)  # rank 0's view: every rank shards the same todo list
    finished = finished[0]
    order = {e.id: i for i, e in enumerate(examples)}
    todo = shard([e.id for e in examples if e.id not in finished], dp_rank, dp_size)
    log.info("%s: %d examples, %d finished before, %d on this rank (DP %d of %d)", task.name, len(examples),
             len(finished), len(todo), dp_rank, dp_size)
    writer = RankWriter(args.out, dp_rank) if writes else None
    new = []
    bar = tqdm(total=len(todo), desc=task.name, disable=args.no_progress or not first, file=sys.stderr)
    for start in range(0, len(todo), args.batch_size):
        batch = [by_id[i] for i in todo[start:start + args.batch_size]]
        records = predict(emu, task, args, examples, batch, decoder, order)
        if writer:
            writer.append(records)
            new.extend(records)
        bar.update(len(batch))
    bar.close()
    gathered = [None] * dist.get_world_size() if first else None
    dist.gather_object(new, gathered, dst=0)
    if not first:
        return 0
    records = dict(finished)
    records.update({r["id"]: r for part in gathered for r in part})
    write_merged(args.out, records)  # every prediction there, also those of ids outside this run's --limit
    records = {k: v for k, v in records.items() if k in by_id}
    metrics = score(task, args, records, by_id, emu.device)
    write_results(task, args, metrics, len(records), emu.checkpoint)
    return 0


def score_saved(task: Task, args, by_id: Dict[str, Example]) -> int:
    import torch

    records = {k: v for k, v in read_finished(args.out).items() if k in by_id}
    if len(records) < len(by_id):
        raise GenerationInputError(f"--score-only: {len(by_id) - len(records)} of {len(by_id)} examples have no "
                                   f"prediction in {args.out} (run without --score-only to generate them)")
    metrics = score(task, args, records, by_id, torch.device("cpu"))
    write_results(task, args, metrics, len(records), args.checkpoint)
    return 0


def write_results(task: Task, args, metrics: dict, n: int, checkpoint: str) -> None:
    import torch

    from emu_mc import __version__ as emu_mc_version

    results = {"task": task.name, "metrics": metrics, "n": n, "shots": args.shots, "style": args.style,
               "seed": args.seed, "checkpoint": checkpoint, "data": os.path.abspath(args.data),
               "paper": args.paper.get(task.name),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "versions": {"emu_mc": emu_mc_version, "torch": torch.__version__, "python": sys.version.split()[0]}}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(report_table(results))
    print(json.dumps({"task": task.name, **metrics, "n": n}))


def report_table(results: dict) -> str:
    """Markdown: this run's headline metric beside the paper's Emu-14B zero-shot number and its source."""
    task = TASKS[results["task"]]
    value = results["metrics"].get(task.metric)
    metric, where = paper.PAPER[task.name]
    entered = results.get("paper")
    ref, source = (f"{entered['value']:.2f}", entered["source"]) if entered else \
        ("not entered (--paper-numbers)", f"copy from {where}")
    lines = [f"| task | metric | this run ({results['shots']}-shot, {results['style']}, n={results['n']}) | "
             f"Emu-14B zero-shot (paper) | source |", "|---|---|---|---|---|",
             f"| {task.name} | {metric} | {value:.2f} | {ref} | arXiv:2307.05222 {source} |"]
    extra = {k: v for k, v in results["metrics"].items() if k != task.metric}
    if extra:
        lines.append("\nalso: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in extra.items()))
    return "\n".join(lines) + f"\n\ncheckpoint `{results['checkpoint']}`, {results['date']}\n"


def main(argv=None) -> int:
    from emu_mc.generate import run_command

    return run_command(run, parse_args(sys.argv[1:] if argv is None else argv))
