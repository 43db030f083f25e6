"""Generation settings: one dataclass per output kind, validated once (like HF's GenerationConfig).

Defaults follow HF `generate` (greedy, no penalty) with the release's 50 new tokens; the release's
captioning setting is `num_beams=5, length_penalty=0` (docs/model.md, "Generation"). Image settings follow the
released pipeline: guidance 7.5, 50 PNDM steps, the decoder's native size (512 x 512 for SD v1.5).
"""
from dataclasses import dataclass
from typing import Literal, Optional


class GenerationInputError(ValueError):
    """A request, setting or file the user gave cannot be used; the message names it (CLI: exit code 2)."""


def _require(ok: bool, name: str, allowed: str) -> None:
    if not ok:
        raise GenerationInputError(f"{name}: must be {allowed}")


@dataclass
class TextSettings:
    max_new_tokens: int = 50
    min_new_tokens: int = 0  # end of sequence is suppressed before this many new tokens
    do_sample: bool = False  # False: greedy (num_beams 1) or beam search
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    num_beams: int = 1
    length_penalty: float = 1.0  # beam score = sum of log-probs / generated_length ** length_penalty
    repetition_penalty: float = 1.0  # 1.0 = off; > 1 discourages tokens already in the row (CTRL rule)
    seed: Optional[int] = None  # sampling RNG; None = 0
    use_cache: bool = True

    def validate(self) -> "TextSettings":
        _require(self.max_new_tokens >= 1, "max_new_tokens", ">= 1")
        _require(0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens", "in [0, max_new_tokens]")
        _require(self.temperature > 0, "temperature", "> 0")
        _require(self.top_k >= 0, "top_k", ">= 0 (0 = off)")
        _require(0 < self.top_p <= 1, "top_p", "in (0, 1]")
        _require(self.num_beams >= 1, "num_beams", ">= 1")
        _require(not (self.do_sample and self.num_beams > 1), "num_beams", "1 when do_sample is set (beam sampling "
                 "is not supported)")
        _require(self.repetition_penalty > 0, "repetition_penalty", "> 0")
        return self


@dataclass
class ImageSettings:
    guidance_scale: float = 7.5  # classifier-free guidance; <= 1 runs no unconditional branch
    steps: int = 50
    scheduler: Literal["pndm", "ddim", "euler"] = "pndm"
    height: Optional[int] = None  # None: the decoder's native size (UNet sample_size x VAE factor)
    width: Optional[int] = None
    seed: int = 0
    use_cache: bool = True

    def validate(self) -> "ImageSettings":
        _require(self.guidance_scale >= 0, "guidance_scale", ">= 0")
        _require(self.steps >= 1, "steps", ">= 1")
        _require(self.scheduler in ("pndm", "ddim", "euler"), "scheduler", "one of pndm, ddim, euler")
        for name in ("height", "width"):
            value = getattr(self, name)
            _require(value is None or value >= 8, name, ">= 8")
        return self
