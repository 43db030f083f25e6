"""Generate captions, answers and images from a trained Emu (one process; CPU, or one GPU in bf16).

    python -m emu_mc.generate --checkpoint runs/tiny --image cat.jpg --prompt "a photo of"
    python -m emu_mc.generate --checkpoint runs/tiny --prompt "{image} and {image}: what differs?" \\
        --image a.jpg --image b.jpg --num-beams 5 --length-penalty 0
    python -m emu_mc.generate --checkpoint runs/tiny --mode image --prompt "a cat" --decoder sd-emu/ --out out.jsonl
    python -m emu_mc.generate --checkpoint runs/tiny --requests requests.jsonl --out out.jsonl
    python -m emu_mc.generate --checkpoint runs/emu-i --chat --image cat.jpg --prompt "What is the cat doing?"
    python -m emu_mc.generate --checkpoint runs/emu-i --chat --image cat.jpg   # interactive: one user turn per line
    torchrun --nproc_per_node=8 -m emu_mc.generate --checkpoint runs/emu14b --requests r.jsonl --out out.jsonl  # TP 8

Prompt syntax: `{image}` / `{video}` mark where the next --image / --video file goes; files without a
marker go before the text. A requests file holds one JSON object per line: {"prompt": str,
"images": [paths], "videos": [paths], "mode": "text" | "image", "id": any, "chat": bool, "system": str,
"history": [[user, assistant], ...]}; relative paths are read from the requests file's directory.
--chat (an Emu-I model) renders the chat template around the prompt, `{system} [USER]: {prompt}
[ASSISTANT]:`, with the release's system message for the media unless --system is given, and the
answer ends at the assistant turn's end (</s>); with --chat and neither --prompt nor --requests, each
line read from stdin is the user's next turn, answered with the conversation so far (Ctrl-D ends). Results go to stdout and, with --out, to a JSONL file (one line per
request, in order); images are written as PNG files (--image-dir, default: beside --out). Under torchrun the
LLM is tensor-parallel over all processes; rank 0 runs the diffusion decoder and writes the results.
Bad input (a missing or unreadable file, a prompt longer than the model's positions, a checkpoint
directory without a model, a decoder that does not fit the model, a bad setting) is one line on stderr
and exit code 2.
"""
import argparse
import json
import logging
import os
import sys
from typing import List

from emu_mc.inference.prompts import Request, check_media_files
from emu_mc.inference.settings import GenerationInputError, ImageSettings, TextSettings

log = logging.getLogger("emu_mc.generate")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m emu_mc.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="pretraining out_dir, its checkpoints/ dir, a step_N/ dir, or a whole-model "
                                                          "directory (convert export --to emu, emu1-to-emu)")
    p.add_argument("--tokenizer", help="override the run's model.tokenizer (a local HF tokenizer dir, or 'tiny')")
    src = p.add_argument_group("requests")
    src.add_argument("--prompt", help="prompt text with optional {image} / {video} markers")
    src.add_argument("--image", action="append", default=[], help="image file (repeatable, in marker order)")
    src.add_argument("--video", action="append", default=[], help="video file (repeatable, in marker order)")
    src.add_argument("--mode", choices=["text", "image"], default="text", help="what --prompt asks for")
    src.add_argument("--requests", help="JSONL file, one request per line (instead of --prompt)")
    src.add_argument("--chat", action="store_true", help="the Emu-I chat template around the prompt; without "
                                                         "--prompt / --requests: a conversation on stdin")
    src.add_argument("--system", help="--chat: the system message (default: the release's for the media)")
    out = p.add_argument_group("output")
    out.add_argument("--out", help="JSONL file for the results (one line per request)")
    out.add_argument("--image-dir", help="where PNGs go (default: beside --out, else ./generated)")
    out.add_argument("--batch-size", type=int, default=8, help="requests per batch (left-padded)")
    out.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    out.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on CUDA, else fp32")
    text = p.add_argument_group("text (defaults as HF generate; the release's captioning: --num-beams 5 "
                                "--length-penalty 0)")
    t = TextSettings()
    text.add_argument("--max-new-tokens", type=int, default=t.max_new_tokens)
    text.add_argument("--min-new-tokens", type=int, default=t.min_new_tokens)
    text.add_argument("--num-beams", type=int, default=t.num_beams)
    text.add_argument("--length-penalty", type=float, default=t.length_penalty)
    text.add_argument("--do-sample", action="store_true", help="sample instead of greedy / beam search")
    text.add_argument("--temperature", type=float, default=t.temperature)
    text.add_argument("--top-k", type=int, default=t.top_k, help="0 = off")
    text.add_argument("--top-p", type=float, default=t.top_p, help="1.0 = off")
    text.add_argument("--repetition-penalty", type=float, default=t.repetition_penalty)
    text.add_argument("--seed", type=int, default=0, help="sampling seed; image i of the run uses seed + i")
    text.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step (reference)")
    image = p.add_argument_group("image")
    i = ImageSettings()
    image.add_argument("--decoder", help="diffusers directory (unet/, vae/, scheduler/); needed for --mode image")
    image.add_argument("--guidance-scale", type=float, default=i.guidance_scale, help="<= 1: no guidance")
    image.add_argument("--steps", type=int, default=i.steps)
    image.add_argument("--scheduler", choices=["pndm", "ddim", "euler"], default=i.scheduler)
    image.add_argument("--height", type=int, help="default: the decoder's native size (512 for SD v1.5)")
    image.add_argument("--width", type=int)
    return p.parse_args(argv)


def settings_from(args) -> tuple:
    text = TextSettings(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                        do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        num_beams=args.num_beams, length_penalty=args.length_penalty,
                        repetition_penalty=args.repetition_penalty, seed=args.seed, use_cache=not args.no_cache)
    image = ImageSettings(guidance_scale=args.guidance_scale, steps=args.steps, scheduler=args.scheduler,
                          height=args.height, width=args.width, seed=args.seed, use_cache=not args.no_cache)
    return text.validate(), image.validate()


def read_requests(path: str) -> List[Request]:
    """A JSONL requests file -> Requests (media paths resolved against the file's directory)."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as err:
        raise GenerationInputError(f"--requests {path}: cannot read it ({err.strerror})") from None
    base = os.path.dirname(os.path.abspath(path))
    requests = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            request = Request(prompt=record.get("prompt", ""), mode=record.get("mode", "text"),
                              id=record.get("id"),
                              images=[os.path.join(base, x) for x in record.get("images", [])],
                              videos=[os.path.join(base, x) for x in record.get("videos", [])],
                              chat=bool(record.get("chat", False)), system=record.get("system"),
                              history=[(str(u), str(a)) for u, a in record.get("history", [])])
        except (ValueError, TypeError) as err:
            raise GenerationInputError(f"--requests {path} line {n}: {err}") from None
        if request.mode not in ("text", "image"):
            raise GenerationInputError(f"--requests {path} line {n}: mode {request.mode!r} is not text or image")
        requests.append(request)
    if not requests:
        raise GenerationInputError(f"--requests {path}: no requests in it")
    return requests


def check_chat_mode(request: Request) -> None:
    """Chat requests (--chat, or "chat": true in a requests file) are answered in text."""
    if request.chat and request.mode != "text":
        where = f"request {request.id!r}" if request.id is not None else "--chat"
        raise GenerationInputError(f"{where}: a chat request is answered in text (mode text, not {request.mode})")


def collect_requests(args) -> List[Request]:
    if (args.prompt is None) == (args.requests is None):
        raise GenerationInputError("give either --prompt (with --image / --video) or --requests FILE.jsonl "
                                   "(or --chat alone: a conversation on stdin)")
    if args.requests:
        requests = read_requests(args.requests)
        for request in requests:
            request.chat = request.chat or args.chat
            request.system = request.system if request.system is not None else args.system
    else:
        requests = [Request(prompt=args.prompt, images=args.image, videos=args.video, mode=args.mode,
                            chat=args.chat, system=args.system)]
    for request in requests:
        check_chat_mode(request)
        check_media_files(request)
    if any(r.mode == "image" for r in requests) and not args.decoder:
        raise GenerationInputError("--decoder DIR is needed for image requests (python -m "
                                   "emu_mc.inference.tiny_decoder writes a small random one)")
    if args.batch_size < 1:
        raise GenerationInputError("--batch-size: must be >= 1")
    return requests


def run(args) -> int:
    import torch

    import torch.distributed as dist

    from emu_mc.inference import VisualDecoder, generate_text, load_emu
    from emu_mc.inference.image import image_conditions

    text_settings, image_settings = settings_from(args)
    interactive = args.chat and args.prompt is None and args.requests is None
    if interactive:
        conversation = Request(images=args.image, videos=args.video, mode=args.mode, chat=True, system=args.system)
        check_chat_mode(conversation)
        check_media_files(conversation)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise GenerationInputError("--chat on stdin runs in one process (no torchrun)")
    else:
        requests = collect_requests(args)
    device = None if args.device == "auto" else torch.device(args.device)
    dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    emu = load_emu(args.checkpoint, tokenizer=args.tokenizer, device=device, dtype=dtype)
    if interactive:
        return converse(emu, conversation, text_settings, sys.stdin)
    decoder = None
    if any(r.mode == "image" for r in requests):
        decoder = VisualDecoder.load(args.decoder, emu.cfg.model.llm.hidden_size, device=emu.device,
                                     dtype=emu.dtype)
    first = dist.get_rank() == 0
    image_dir = args.image_dir or (os.path.dirname(os.path.abspath(args.out)) if args.out else "generated")
    results = [None] * len(requests)
    for mode in ("text", "image"):
        todo = [i for i, r in enumerate(requests) if r.mode == mode]
        for start in range(0, len(todo), args.batch_size):
            chunk = todo[start:start + args.batch_size]
            batch = [requests[i] for i in chunk]
            if mode == "text":
                for i, out in zip(chunk, generate_text(emu, batch, text_settings)):
                    results[i] = {"text": out.text, "tokens": out.tokens, "finish_reason": out.finish_reason,
                                  **({"score": out.score} if out.score is not None else {})}
            else:
                settings = ImageSettings(**{**image_settings.__dict__, "seed": image_settings.seed + start})
                cond, uncond = image_conditions(emu, batch, settings)  # every TP rank
                if not first:
                    continue
                images, nsfw = decoder(cond, uncond, settings)
                for k, (i, pixels) in enumerate(zip(chunk, images)):
                    results[i] = {"image": save_png(pixels, image_dir, requests[i].id or f"image_{i:04d}"),
                                  "seed": settings.seed + k, **({"nsfw": nsfw[k]} if nsfw is not None else {})}
    if not first:
        return 0
    records = [{"id": r.id if r.id is not None else i, "mode": r.mode, "prompt": r.prompt, **result}
               for i, (r, result) in enumerate(zip(requests, results))]
    for record in records:
        what = f"text: {record['text']}" if record["mode"] == "text" else f"image: {record['image']}"
        print(f"[{record['id']}] {what}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in records)
        print(f"wrote {args.out}")
    return 0


def converse(emu, conversation: Request, settings: TextSettings, lines) -> int:
    """Each line of `lines` is the user's next turn; the answer is printed and kept in the history."""
    from emu_mc.inference import generate_text

    print("chat: one message per line, Ctrl-D ends", file=sys.stderr)
    for line in lines:
        if not line.strip():
            continue
        conversation.prompt = line.strip()
        answer = generate_text(emu, [conversation], settings)[0].text.strip()
        print(f"assistant: {answer}", flush=True)
        conversation.history.append((conversation.prompt, answer))
    return 0


def save_png(pixels, directory: str, name) -> str:
    from PIL import Image

    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{name}.png")
    Image.fromarray(pixels).save(path)
    return path


def main(argv=None) -> int:
    return run_command(run, parse_args(sys.argv[1:] if argv is None else argv))


def run_command(command, args) -> int:
    """Run `command(args)` as a CLI: logging set up, bad input -> one `error:` line from rank 0 and exit
    code 2 (a damaged checkpoint: 1), the process group it created torn down. Shared with emu_mc.evaluate."""
    from emu_mc.checkpoint import CheckpointLoadError
    from emu_mc.parallel.groups import process_groups_torn_down
    from emu_mc.pretrain import setup_logging

    setup_logging(int(os.environ.get("RANK", "0")))
    with process_groups_torn_down():
        try:
            return command(args)
        except (GenerationInputError, CheckpointLoadError) as err:
            if int(os.environ.get("RANK", "0")) == 0:  # every rank meets the same bad input
                print(f"error: {err}", file=sys.stderr)
            return 2 if isinstance(err, GenerationInputError) else 1


if __name__ == "__main__":
    sys.exit(main())
