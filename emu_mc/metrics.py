"""Throughput and model-FLOPs utilisation (MFU), and the run's logs (console, JSONL, TensorBoard).

FLOPs count matmuls only, 2 FLOPs per multiply-add, x3 for forward + backward (backward = 2x forward):
  LLM, per token:        6 * P_llm                            (P_llm: layer matmul weights)
  LLM attention, per in-document (query, key) pair: 12 * L * H   (scores + values, Hq * head_dim = H)
                         pairs = sum over the batch's documents of n (n + 1) / 2: causal pairs inside
                         documents only, padding excluded (not PaLM's full S per token, which counts the
                         masked half and the cross-document pairs no backend computes usefully)
  output layer, per token: 6 * V * H
  ViT, per image:        6 * P_vit * T + 12 * L_v * W * T^2   (T = 1 + patches tokens)
  resampler, per image:  6 * (P_q,o,ff * Q + P_kv_cross * T + P_kv_self * Q) + 12 * L_r * inner * (Q^2 + Q*T)
  regression head, per image: 6 * H^2 * (Q + 1)              ((Q + 1) regression rows per image)
MFU = achieved FLOP/s / (peak dense bf16 FLOP/s per device x devices). Peak table (NVIDIA datasheets,
dense, no sparsity): H100 SXM 989 TF, H100 PCIe 756 TF, H200 989 TF, A100 312 TF, L40S 362 TF.
On CPU no peak is known: MFU is reported as None.
"""
import json
import os
import time
from typing import Any, Dict, List, Optional

import torch

from emu_mc.config import ModelConfig

PEAK_BF16_TFLOPS = {"H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def device_peak_flops() -> Optional[float]:
    """Dense bf16 peak FLOP/s of this process's device, from PEAK_BF16_TFLOPS; None on CPU/unknown."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key.replace(" ", "").lower() in name.replace(" ", "").lower():
            return PEAK_BF16_TFLOPS[key] * 1e12
    return None


def flops_per_token(cfg: ModelConfig, vocab_size: int) -> float:
    """Training FLOPs per LLM token: layer weights + output layer (attention: `flops_per_attention_pair`)."""
    llm = cfg.llm
    head_dim = llm.hidden_size // llm.num_attention_heads
    kv = (llm.num_query_groups or llm.num_attention_heads) * head_dim
    per_layer = llm.hidden_size * (2 * llm.hidden_size + 2 * kv) + 3 * llm.hidden_size * llm.ffn_hidden_size
    return 6 * llm.num_layers * per_layer + 6 * vocab_size * llm.hidden_size


def flops_per_attention_pair(cfg: ModelConfig) -> float:
    """Training FLOPs per in-document causal (query, key) pair (emu_mc.model.document_attention.causal_pairs)."""
    return 12 * cfg.llm.num_layers * cfg.llm.hidden_size


def flops_per_image(cfg: ModelConfig) -> float:
    """Training FLOPs per image: ViT + resampler + regression head rows."""
    v, r, h = cfg.vision, cfg.resampler, cfg.llm.hidden_size
    tokens = 1 + (v.image_size // v.patch_size) ** 2
    vit_params = v.num_layers * (4 * v.width * v.width + 2 * v.width * v.mlp_hidden) + 3 * v.patch_size ** 2 * v.width
    vit = 6 * vit_params * tokens + 12 * v.num_layers * v.width * tokens ** 2
    inner, q = r.num_heads * r.d_kv, r.num_queries
    per_query = r.num_layers * (4 * r.d_model * inner + 2 * r.d_model * inner + 2 * r.d_model * r.d_ff) + r.d_model * h
    per_visual_token = r.num_layers * 2 * v.width * inner
    res = 6 * (per_query * q + per_visual_token * tokens) + 12 * r.num_layers * inner * (q * q + q * tokens)
    return vit + res + 6 * h * h * (q + 1)


class RegionTimer:
    """Seconds spent in one region of the model, forward and backward, summed until read.

    `start()` / `stop()` bracket a span; they are called from forward code and from autograd hooks.
    On CUDA each is an event recorded on the current stream (nothing synchronises: read `seconds()`
    after the step's `torch.cuda.synchronize()`); on CPU a perf_counter reading. A `stop()` without an
    open span is ignored.
    """

    def __init__(self):
        self._spans: List = []
        self._open = None

    @staticmethod
    def _mark():
        if torch.cuda.is_available():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self._open = self._mark()

    def stop(self) -> None:
        if self._open is not None:
            self._spans.append((self._open, self._mark()))
            self._open = None

    def seconds(self) -> float:
        """Total seconds of the spans closed since the previous call."""
        total = sum(begin.elapsed_time(end) / 1e3 if hasattr(begin, "elapsed_time") else end - begin
                    for begin, end in self._spans)
        self._spans.clear()
        return total


class RunLogger:
    """Rank-0 logging: one JSON object per step in metrics.jsonl and TensorBoard scalars (when the
    tensorboard package is importable). A resumed run first drops the records of steps after its
    checkpoint (they are about to be redone), so metrics.jsonl holds each step once."""

    def __init__(self, out_dir: str, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "metrics.jsonl")
        _truncate_jsonl(path, resume_step)
        self.jsonl = open(path, "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard drops the events of steps after the checkpoint, redone from here
            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"),
                                    purge_step=resume_step + 1 if resume_step else None)
        except ImportError:
            pass

    def log(self, step: int, values: Dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and value is not None:
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()


def _truncate_jsonl(path: str, last_step: int) -> None:
    """Keep only the records of steps <= last_step (and no torn last line), rewritten atomically."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a kill
                continue
            if record.get("step", 0) <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def run_summary(*, first_step: int, last_step: int, tokens: float, images: float, wall_s: float,
                metrics: Dict[str, Any], data_stats: Dict[str, Any], checkpoint: Optional[str], out_dir: str,
                tensorboard: bool) -> str:
    """What a finished run did, in a few lines: steps, tokens, images, time, the last loss terms,
    skipped samples by reason, and where the checkpoint, the metrics and TensorBoard are."""
    lines = [f"run summary: steps {first_step + 1}..{last_step} ({last_step - first_step} this run) in "
             f"{f'{wall_s:.1f} s' if wall_s < 120 else f'{wall_s / 60:.1f} min'}; {tokens:,.0f} tokens, "
             f"{images:,.0f} images"]
    if metrics:
        lines.append(f"  last step: loss {metrics['loss']:.4f} (ce {metrics['ce']:.4f}, reg {metrics['reg']:.4f}), "
                     f"{metrics['tokens_per_s']:,.0f} tokens/s" + (f", MFU {metrics['mfu']:.1%}" if metrics.get("mfu") else ""))
    counts = lambda d: ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"
    data = f"  data: {data_stats.get('kind', '?')}"
    if "samples_used" in data_stats:
        data += (f", {data_stats['samples_used']} samples used ({counts(data_stats.get('per_source', {}))}); "
                 f"decoded by {counts(data_stats.get('decode_paths', {}))}")
    lines.append(data + f"; skipped samples: {counts(data_stats.get('skipped') or {})}"
                 + (f"; unreadable shards: {len(data_stats['bad_shards'])}" if data_stats.get("bad_shards") else ""))
    lines.append(f"  checkpoint: {checkpoint or 'none written'}")
    lines.append(f"  metrics: {os.path.join(out_dir, 'metrics.jsonl')}" +
                 (f"; TensorBoard: tensorboard --logdir {os.path.join(out_dir, 'tensorboard')}" if tensorboard else ""))
    return "\n".join(lines)
