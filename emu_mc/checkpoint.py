"""Checkpoints: sharded, atomic, the last K kept, resumed exactly.

Layout under `<out_dir>/checkpoints/`:
  step_000100/                 model + optimizer (megatron-core dist_checkpointing, sharded per rank)
  step_000100/rank_00000.pt    this rank's RNG states and data-loader state
  step_000100/meta.json        step, world layout, config
  latest                       the name of the newest complete checkpoint
A checkpoint is written as `step_N.tmp/`, flushed to disk (fsync) and renamed only after every rank
has finished, then `latest` is replaced atomically (os.replace): a crash mid-save, or a power loss
after it, never leaves a half-written latest.

A stop signal must not break the save it triggers. Sent to a worker's process group (SLURM
preemption, a harness's timeout), SIGTERM also reaches megatron's writer helpers: the spawned
multiprocessing Manager that carries their results (it dies: BrokenPipeError / ConnectionRefusedError)
and the processes it forks to write the files. So the results travel through an in-process queue (the
save is synchronous: written and read in this process) and the forked writers ignore SIGTERM and
SIGINT (`_shield_writers`).
"""
import errno
import json
import logging
import os
import random
import queue
import shutil
import signal
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("emu_mc.checkpoint")


class CheckpointLoadError(RuntimeError):
    """The latest checkpoint cannot be read (damaged or incomplete files)."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (e.g. a full disk); the previous one is still the latest."""


# Model fields a run may change on resume: they set no parameter shape or meaning (freezing, paths,
# kernels, dropout, loss weights, RoPE's position limit). Any other change of `model` is refused.
RESUMABLE_MODEL_FIELDS = ("tokenizer", "init_std", "vision.freeze", "vision.init_from", "resampler.freeze",
                          "resampler.dropout", "resampler.attention_impl", "llm.freeze", "llm.init_from",
                          "llm.max_position_embeddings", "loss.ce_weight", "loss.reg_weight", "loss.impl")


def _flatten(tree: Dict[str, Any], prefix: str) -> Dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_same_model(path: str, meta: Dict[str, Any], config: Dict[str, Any], vocab_size: int) -> None:
    """Refuse (ConfigError) to resume checkpoint `path` into another model: `config` is this run's
    config_to_dict(cfg), whose model (and finetune) sections are compared with the ones saved in
    `meta`, field by field (a model field added since the checkpoint was written counts with its default)."""
    from emu_mc.config import Config, ConfigError, config_to_dict

    defaults = _flatten(config_to_dict(Config())["model"], "model.")
    saved, current = ({**_flatten(c["model"], "model."), **_flatten({"finetune": c.get("finetune")}, "")}
                      for c in (meta["config"], config))
    saved = {**defaults, **saved}
    skip = {f"model.{name}" for name in RESUMABLE_MODEL_FIELDS} | {"finetune.lora_dropout"}
    differ = [f"{k}: checkpoint {saved.get(k)!r}, this run {current.get(k)!r}"
              for k in sorted(set(saved) | set(current)) if k not in skip and saved.get(k) != current.get(k)]
    if meta.get("vocab_size", vocab_size) != vocab_size:
        differ.append(f"tokenizer vocabulary: checkpoint {meta['vocab_size']} tokens, this run {vocab_size}")
    if differ:
        raise ConfigError(f"{path} holds another model ({'; '.join(differ)}). Resume with the checkpoint's model "
                          "config, or set another train.out_dir to start afresh")


def capture_rng_state() -> Dict[str, Any]:
    """Python, NumPy, torch (CPU and CUDA) and megatron's model-parallel RNG tracker states."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def restore_rng_state(state: Dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def optimizer_checkpoint_format(requested: str) -> str:
    """TrainConfig.optimizer_checkpoint -> the megatron DistributedOptimizer sharding type to use."""
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE

    if requested == "auto":
        return "fully_reshardable" if HAVE_APEX_OR_TE else "dp_reshardable"
    if requested == "fully_reshardable" and not HAVE_APEX_OR_TE:
        raise ValueError("train.optimizer_checkpoint: fully_reshardable needs apex or transformer-engine's fused "
                         "Adam (megatron-core cannot reload torch.optim.Adam state in that format); "
                         "use auto or dp_reshardable")
    return requested


def training_state(model_chunks, optimizer, optimizer_format: str, is_loading: bool = False) -> Dict[str, Any]:
    """The sharded (megatron dist_checkpointing) state of this rank's model stage and optimizer.

    `optimizer_format` is a megatron DistributedOptimizer sharding type (`optimizer_checkpoint_format`);
    it must be the same when saving and loading."""
    from emu_mc.parallel.setup import unwrap

    if len(model_chunks) != 1:
        raise NotImplementedError("checkpointing supports one model chunk per rank (no virtual pipeline stages)")
    if is_loading:
        _allocate_optimizer_state(optimizer)
    metadata = {"distrib_optim_sharding_type": optimizer_format}
    model_state = checkpointed_model_state(unwrap(model_chunks[0]), metadata)
    return {"model": model_state,
            "optimizer": optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=metadata)}


def checkpointed_model_state(model, metadata: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The sharded state a checkpoint holds of `model` (an EmuModel stage): all of it, or with LoRA
    adapters (finetune.mode lora) the adapters alone; the base is the run's model.init_from."""
    from emu_mc.model.lora import has_adapters, is_adapter

    state = model.sharded_state_dict(metadata=metadata)
    return {k: v for k, v in state.items() if is_adapter(k)} if has_adapters(model) else state


def load_model_state(model, state: Dict[str, Any]) -> None:
    """Put a loaded `checkpointed_model_state` into `model`."""
    from emu_mc.model.lora import has_adapters, load_state_part

    if has_adapters(model):
        load_state_part(model, state, adapters=True)
    else:
        model.load_state_dict(state)


def _allocate_optimizer_state(optimizer) -> None:
    """Give a fresh optimizer its (zero) Adam state before a checkpoint is loaded into it.

    megatron-core's DistributedOptimizer.sharded_state_dict reads the inner torch optimizer's
    per-parameter `step` (without apex/TE), which a never-stepped optimizer lacks. One step with zero
    gradients at lr = weight_decay = 0 allocates the state and leaves every parameter unchanged;
    the checkpoint then overwrites it."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        if not isinstance(opt, DistributedOptimizer) or len(inner.state) > 0:
            continue
        saved = [(group["lr"], group["weight_decay"]) for group in inner.param_groups]
        for group in inner.param_groups:
            group["lr"] = group["weight_decay"] = 0.0
            for param in group["params"]:
                param.grad = torch.zeros_like(param)
        inner.step()
        inner.zero_grad(set_to_none=True)
        for group, (lr, weight_decay) in zip(inner.param_groups, saved):
            group["lr"], group["weight_decay"] = lr, weight_decay


def load_training_state(model_chunks, optimizer, state: Dict[str, Any]) -> None:
    """Put a loaded `training_state` into the model and optimizer."""
    from emu_mc.parallel.setup import unwrap

    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    load_model_state(unwrap(model_chunks[0]), state["model"])
    with torch.no_grad():  # fp32 main params are views of the model's leaf parameters
        optimizer.load_state_dict(state["optimizer"])
    # megatron-core 0.16 with torch.optim.Adam (no apex/TE) restores the iteration count into each param
    # group's "step" but not into the per-parameter "step" tensors that Adam's bias correction reads
    # (where it does set them, all parameters share one tensor, which Adam then increments once per
    # parameter). Give every parameter its own tensor holding the restored count.
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, DistributedOptimizer):
            continue
        for group in opt.optimizer.param_groups:
            for param in group["params"]:
                param_state = opt.optimizer.state.get(param, {})
                if "step" in group and isinstance(param_state.get("step"), torch.Tensor):
                    param_state["step"] = torch.full_like(param_state["step"], group["step"])


_saving = False  # set while this process writes a checkpoint: the writers it forks ignore stop signals


def _ignore_stop_signals_while_saving() -> None:
    if _saving:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _shield_writers() -> None:
    """Keep megatron-core's synchronous checkpoint writers alive under SIGTERM / SIGINT.

    Its results queue (`filesystem_async._results_queue`, a module global created on first use) is by
    default a proxy to a spawned Manager process that a signal to the process group kills; a plain
    queue.Queue serves as well, since a synchronous save puts and gets in this process."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = queue.Queue()


os.register_at_fork(after_in_child=_ignore_stop_signals_while_saving)


class Checkpointer:
    def __init__(self, out_dir: str, keep: int):
        self.root = os.path.join(out_dir, "checkpoints")
        self.keep = keep

    @classmethod
    def of_step(cls, step_dir: str) -> "Checkpointer":
        """The checkpointer of the run that holds `step_dir` (<out_dir>/checkpoints/step_N), for reading it."""
        return cls(os.path.dirname(os.path.dirname(os.path.abspath(step_dir))), keep=1)

    @staticmethod
    def _name(step: int) -> str:
        return f"step_{step:06d}"

    def _present(self) -> str:
        done = sorted(d for d in os.listdir(self.root) if d.startswith("step_") and not d.endswith(".tmp"))
        return ", ".join(done) or "none"

    def _unreadable(self, what: str) -> CheckpointLoadError:
        return CheckpointLoadError(
            f"{what}. To resume from a checkpoint, write its name into {os.path.join(self.root, 'latest')} "
            f"(present: {self._present()}); to start afresh, use another train.out_dir")

    def latest(self) -> Optional[str]:
        """Path of the newest complete checkpoint, or None. Raises CheckpointLoadError when `latest`
        does not name a checkpoint directory here."""
        pointer = os.path.join(self.root, "latest")
        if not os.path.exists(pointer):
            return None
        with open(pointer, "rb") as f:
            raw = f.read()
        try:
            name = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            name = ""
        if not name.startswith("step_") or os.sep in name or not os.path.isdir(os.path.join(self.root, name)):
            raise self._unreadable(f"{pointer} holds {raw[:40]!r}, which names no checkpoint directory in {self.root}")
        return os.path.join(self.root, name)

    def save(self, step: int, sharded_state_dict: Dict[str, Any], rank_state: Dict[str, Any],
             meta: Dict[str, Any]) -> str:
        """Collective: every rank calls it. Returns the final checkpoint path. Raises
        CheckpointSaveError on every rank when any rank could not write its part (the partial
        `step_N.tmp` is removed; the previous checkpoint stays the latest)."""
        rank = dist.get_rank()
        final = os.path.join(self.root, self._name(step))
        tmp = final + ".tmp"

        def make_tmp():
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(tmp)

        def write():
            self._write_shards(sharded_state_dict, tmp)
            torch.save(rank_state, os.path.join(tmp, f"rank_{rank:05d}.pt"))

        def publish():
            if rank == 0:
                self._publish(step, tmp, final, meta)

        for phase in (make_tmp, write, publish):  # each ends in a collective: all ranks go on, or all stop
            error = None
            try:
                phase()
            except (Exception, _checkpoint_exception()) as err:
                if _caused_by(err, lambda e: isinstance(e, KeyboardInterrupt)):  # torch wraps it: keep it immediate
                    raise KeyboardInterrupt from None
                error = self._save_failed(step, err)
            error = first_error(error)
            if error is not None:
                if rank == 0:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise CheckpointSaveError(error)
        return final

    @staticmethod
    def _write_shards(sharded_state_dict: Dict[str, Any], tmp: str) -> None:
        from megatron.core import dist_checkpointing

        global _saving
        _shield_writers()
        _saving = True
        try:
            dist_checkpointing.save(sharded_state_dict, tmp)
        finally:
            _saving = False

    def _publish(self, step: int, tmp: str, final: str, meta: Dict[str, Any]) -> None:
        """Rank 0, once every rank's part is in `tmp`: meta.json, fsync, rename, point `latest` at it."""
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"step": step, "world_size": dist.get_world_size(), **meta}, f, indent=1, default=str)
        _fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer_tmp = os.path.join(self.root, "latest.tmp")
        with open(pointer_tmp, "w") as f:
            f.write(self._name(step))
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer_tmp, os.path.join(self.root, "latest"))
        _fsync_dir(self.root)
        self._prune()
        log.info("saved checkpoint %s", final)

    def _save_failed(self, step: int, error: BaseException) -> str:
        """One line saying why checkpoint `step` was not written and which one is still the latest."""
        pointer = os.path.join(self.root, "latest")
        previous = open(pointer, errors="replace").read().strip() if os.path.exists(pointer) else None
        still = f"{previous} is still the latest" if previous else "no earlier checkpoint exists"
        if _caused_by(error, _is_disk_full):
            return (f"no space left on the device of {self.root} while writing {self._name(step)}; {still}; "
                    "free space (or lower train.keep_checkpoints) and rerun")
        cause = (str(error).strip().splitlines() or [type(error).__name__])[-1]
        return f"cannot write checkpoint {self._name(step)} in {self.root} ({type(error).__name__}: {cause}); {still}"

    def _prune(self) -> None:
        done = sorted(d for d in os.listdir(self.root) if d.startswith("step_") and not d.endswith(".tmp"))
        for old in done[: max(len(done) - self.keep, 0)]:
            shutil.rmtree(os.path.join(self.root, old), ignore_errors=True)

    def read_meta(self, path: str) -> Dict[str, Any]:
        """The checkpoint's meta.json. Raises CheckpointLoadError when it is missing or damaged."""
        try:
            with open(os.path.join(path, "meta.json")) as f:
                meta = json.load(f)
            if not isinstance(meta, dict) or not {"step", "tp", "pp", "dp", "config"} <= set(meta):
                raise ValueError("not a checkpoint's meta.json")
        except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise self._unreadable(f"cannot load checkpoint {path} (meta.json: {type(err).__name__}: {err})") from None
        return meta

    def load(self, path: str, sharded_state_dict: Dict[str, Any], same_layout: bool):
        """Collective. Returns (loaded state dict, this rank's rank_state or None, meta).

        Model and optimizer reshard; the per-rank data-loader and RNG states come back only when the
        checkpoint was written by the same TP x PP x DP layout (`same_layout`), else None."""
        from megatron.core import dist_checkpointing

        meta = self.read_meta(path)
        state = rank_state = error = None
        try:
            state = dist_checkpointing.load(sharded_state_dict, path)
            if same_layout:
                rank_state = torch.load(os.path.join(path, f"rank_{dist.get_rank():05d}.pt"), weights_only=False)
        except (Exception, _checkpoint_exception()) as err:
            error = (str(err).strip().splitlines() or [type(err).__name__])[-1]  # torch's lists a traceback per rank
        error = first_error(error)
        if error is not None:
            raise self._unreadable(f"cannot load checkpoint {path} ({error})")
        return state, rank_state, meta


def _checkpoint_exception() -> type:
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    return CheckpointException


def any_rank(flag: bool) -> bool:
    """Collective (a barrier too): True when `flag` is set on any rank."""
    from emu_mc.parallel.setup import device

    t = torch.tensor([1.0 if flag else 0.0], device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def first_error(message: Optional[str]) -> Optional[str]:
    """Collective: the first rank's error message (naming the rank when there are several), or None
    when no rank has one. So a failure on one rank stops all of them together."""
    if not any_rank(message is not None):
        return None
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    rank, first = next((r, m) for r, m in enumerate(messages) if m is not None)
    return first if len(messages) == 1 else f"{first} (rank {rank})"


def _is_disk_full(error: BaseException) -> bool:
    # an OSError from megatron's writer processes reaches this one as the text of a RuntimeError
    return (isinstance(error, OSError) and error.errno == errno.ENOSPC) or f"[Errno {errno.ENOSPC}]" in str(error)


def _caused_by(error: BaseException, match) -> bool:
    """Whether `match(e)` holds for `error` or an exception behind it: its cause / context chain and,
    for torch's CheckpointException, the per-rank failures it carries."""
    seen, todo = set(), [error]
    while todo:
        err = todo.pop()
        if not isinstance(err, BaseException) or id(err) in seen:
            continue
        seen.add(id(err))
        if match(err):
            return True
        failures = getattr(err, "failures", None)  # rank -> (exception, traceback summary)
        todo += [err.__cause__, err.__context__, *err.args]
        todo += [pair[0] for pair in (failures.values() if isinstance(failures, dict) else ()) if pair]
    return False


def _fsync_tree(root: str) -> None:
    """Flush every file below `root`, and the directories holding them, to disk."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(folder)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointConfigError(ValueError):
    """A checkpoint's meta.json holds no usable config (or its tokenizer is missing)."""


def find_step_dir(path: str) -> Optional[str]:
    """A run's train.out_dir, its checkpoints/ directory (both follow `latest`) or a step_N/ directory
    -> that step directory; None when `path` is none of them."""
    if os.path.isfile(os.path.join(path, "meta.json")):
        return path
    for run_dir in (path, os.path.dirname(os.path.normpath(path))):
        if os.path.isfile(os.path.join(run_dir, "checkpoints", "latest")):
            return Checkpointer(run_dir, keep=1).latest()
    return None


def load_checkpoint_model(step_dir: str, *, tp: int = 1, tokenizer: Optional[str] = None):
    """(EmuModel with the checkpoint's weights in the run's params dtype, this rank's TP shard of `tp`;
    its Config; tokenizer; meta). Rebuilt from the config saved with the checkpoint (`tokenizer`
    overrides model.tokenizer); dist_checkpointing reshards whatever TP x PP layout wrote it. A LoRA
    checkpoint's adapters are loaded onto their base (its model.init_from) and merged: the model is a
    plain one. Starts the process groups (TP = tp, PP = 1). Raises CheckpointConfigError for an
    unusable meta.json or base."""
    import torch

    from emu_mc.config import ConfigError, config_from_dict
    from emu_mc.convert import ConversionError, load_pretrained
    from emu_mc.convert.pretrained import check_base_identity
    from emu_mc.model.emu import EmuModel
    from emu_mc.model.lora import LoRASettings, merge_adapters
    from emu_mc.parallel.groups import init_distributed
    from emu_mc.tokenizer import load_tokenizer, special_token_ids

    checkpointer = Checkpointer.of_step(step_dir)
    meta = checkpointer.read_meta(step_dir)
    try:
        cfg = config_from_dict(meta["config"])
        if tokenizer:
            cfg.model.tokenizer = tokenizer
        tok = load_tokenizer(cfg.model.tokenizer, cfg.model.chat_tokens)
    except (ConfigError, FileNotFoundError, KeyError, ValueError) as err:
        raise CheckpointConfigError(f"{step_dir}/meta.json: {err}") from None
    init_distributed(tp, 1, seed=cfg.train.seed)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    lora = LoRASettings.of(cfg.finetune)
    model = EmuModel(cfg.model, special_token_ids(tok), len(tok), tp=tp, params_dtype=dtype, lora=lora)
    if lora is not None:  # adapters only: first their base, the run's model.init_from (an absolute path)
        try:
            if "base" in meta:
                check_base_identity(meta["base"], cfg.model, step_dir)
            load_pretrained(model, cfg.model)
        except (ConversionError, FileNotFoundError) as err:
            raise CheckpointConfigError(f"{step_dir} holds LoRA adapters; their base weights: {err}") from None
    state, _, _ = checkpointer.load(step_dir, {"model": checkpointed_model_state(model)}, same_layout=False)
    load_model_state(model, state["model"])
    if lora is not None:
        merge_adapters(model)
    return model.eval(), cfg, tok, meta


def adapters_only(meta: dict, step_dir: str) -> Optional[str]:
    """Why the checkpoint `step_dir` (its meta.json: `meta`) cannot serve as a whole model, when it is a
    LoRA run's (adapters only), else None."""
    if (meta["config"].get("finetune") or {}).get("mode") != "lora":
        return None
    return (f"{step_dir} holds LoRA adapters only; fold them into their base first: python -m emu_mc.convert "
            f"export --checkpoint {step_dir} --to emu --out DIR, then start from DIR")


def load_model_weights(model, step_dir: str) -> None:
    """The weights of the pretraining or full fine-tuning checkpoint `step_dir` into this rank's
    EmuModel stage `model` (any TP x PP: dist_checkpointing reshards); adapters of `model` are left
    as they are. A checkpoint with fewer tokens in the same padded rows (the chat tokens added since)
    loads, its new rows starting at the mean row. Collective. Raises CheckpointConfigError for a LoRA
    checkpoint (adapters only) or a vocabulary that does not fit, CheckpointLoadError for a damaged one."""
    from emu_mc.model.lora import is_adapter, load_state_part

    checkpointer = Checkpointer.of_step(step_dir)
    meta = checkpointer.read_meta(step_dir)
    refusal = adapters_only(meta, step_dir)
    if refusal:
        raise CheckpointConfigError(refusal)
    saved_vocab = meta.get("vocab_size", model.vocab_size)
    if saved_vocab != model.vocab_size and not _same_padded_vocab(model, saved_vocab):
        raise CheckpointConfigError(f"{step_dir} has a {saved_vocab}-token vocabulary, this model "
                                    f"{model.vocab_size}: export it (python -m emu_mc.convert export --to emu) "
                                    "and start from the export, whose vocabulary grows to the tokenizer's")
    base = {k: v for k, v in model.sharded_state_dict().items() if not is_adapter(k)}
    state, _, _ = checkpointer.load(step_dir, {"model": base}, same_layout=False)
    try:
        load_state_part(model, state["model"], adapters=False)
    except ValueError as err:
        raise CheckpointConfigError(f"{step_dir}: {err}") from None
    if saved_vocab < model.vocab_size:
        mean_init_vocab_rows(model, saved_vocab)


def _same_padded_vocab(model, saved_vocab: int) -> bool:
    """A checkpoint of `saved_vocab` tokens has this model's padded embedding shapes (and fewer tokens)."""
    from emu_mc.model.llm import padded_vocab_size

    divisible_by = model.cfg.llm.make_vocab_size_divisible_by
    return saved_vocab < model.vocab_size and padded_vocab_size(saved_vocab, divisible_by, model.tp_size) == \
        padded_vocab_size(model.vocab_size, divisible_by, model.tp_size)


@torch.no_grad()
def mean_init_vocab_rows(model, old_vocab: int) -> None:
    """Rows [old_vocab, model.vocab_size) of this stage's embedding and output layer (vocab-parallel
    shards [V_local, H]) set to the mean of rows [0, old_vocab), computed in fp32 over all TP ranks: the
    release's init of added tokens, what `add_vocab_rows` does to a whole state dict."""
    from megatron.core import parallel_state

    from emu_mc.model.llm import output_weight

    weights = [model.llm.embedding.word_embeddings.weight] if model.pre_process else []
    if model.post_process and not any(output_weight(model.llm) is w for w in weights):
        weights.append(output_weight(model.llm))
    for weight in weights:
        v_local = weight.shape[0]
        ids = torch.arange(v_local, device=weight.device) + parallel_state.get_tensor_model_parallel_rank() * v_local
        total = weight[ids < old_vocab].float().sum(0)
        if model.tp_size > 1:
            torch.distributed.all_reduce(total, group=parallel_state.get_tensor_model_parallel_group())
        weight[(ids >= old_vocab) & (ids < model.vocab_size)] = (total / old_vocab).to(weight.dtype)
