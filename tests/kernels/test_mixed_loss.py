"""Fused mixed CE + regression loss (Triton) against the PyTorch reference: the three losses and the
gradients of hidden, lm_weight and reg_head_weight, over row mixes (ignored rows, no text rows, no
regression rows, one row), odd vocabulary and hidden sizes, padded vocabularies and dtypes; vocab-parallel
over 2 gloo ranks against the unsharded loss; what the kernel keeps and allocates (nothing of N x V); no
host synchronisation (every aten op recorded; on a GPU, CUDA-graph capture and replay); and, without a
GPU, the sm_90 builds at Emu-14B sizes (no spills, shared memory within an H100's).
Without CUDA the kernels run under the Triton interpreter (see conftest). Also a worker script: under
torchrun, `python tests/kernels/test_mixed_loss.py OUT_DIR` runs the vocab-parallel side.
"""
import dataclasses
import datetime
import math
import os
import sys
import tempfile
from typing import Optional

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from emu_mc.kernels.mixed_loss import mixed_ce_regression_loss, mixed_ce_regression_loss_reference
from tests.kernels.compile_sm90 import H100_SHARED_MEMORY, compiled_kernels, ptxas_available
from tests.torchrun_utils import torchrun

# (atol, rtol) per input dtype against the reference run in fp32 on the same (rounded) inputs; atol is
# relative to the largest entry of each compared tensor (gradients scale as 1 / rows), so an all-zero
# expectation (empty terms) must be matched exactly.
# fp32: fp32 GEMMs and statistics: only summation order differs.
# fp16: the logits, softmax - onehot and the regression residual are rounded to fp16 before the gradient
# GEMMs, grad lm_weight is accumulated in fp16 across row chunks, and the gradients are returned in fp16
# (relative rounding 4.9e-4). bf16 (8-bit mantissa, 8x fp16's rounding) is set by analogy. At N 96, V 4096,
# H 256 on the interpreter the worst errors were 7.6e-4 (fp16) and 7.8e-3 (bf16) of the largest gradient
# entry. The row kernels have no tl.dot, so bf16 runs under the interpreter too (its tl.dot mishandles bf16).
TOLERANCES = {
    torch.float32: (2e-6, 1e-5),
    torch.float16: (1.5e-3, 1.5e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
IGNORE = -100


@dataclasses.dataclass(frozen=True)
class Case:
    """N rows of hidden width H, vocab V (first `valid_vocab_size` real), regression width E over R rows."""
    name: str
    N: int
    H: int
    V: int
    E: int
    ignored: str  # which rows have no text target: "none", "some" (every third + random) or "all"
    R: int
    valid_vocab_size: Optional[int] = None
    dtype: torch.dtype = torch.float32


# Under the interpreter a chunk is 32 rows and a vocab block 128 columns: N = 70 spans 3 chunks (the last
# partial), V = 300 / 257 / 130 end in a partial vocab block.
CASES = [
    Case("mixed", 70, 64, 300, 64, "some", 6),
    Case("mixed", 70, 88, 300, 88, "some", 6, dtype=torch.float16),
    Case("no_ignored", 64, 128, 200, 128, "none", 3),
    Case("padded_vocab", 50, 88, 300, 88, "some", 4, valid_vocab_size=250),
    Case("padded_vocab", 50, 128, 300, 64, "some", 4, valid_vocab_size=250, dtype=torch.float16),
    Case("no_regression", 50, 64, 257, 64, "some", 0, dtype=torch.float16),
    Case("only_regression", 40, 88, 130, 88, "all", 40),
    Case("all_ignored", 40, 64, 130, 64, "all", 0, dtype=torch.float16),
    Case("one_row", 1, 64, 130, 64, "none", 1),
    Case("mixed", 70, 88, 300, 88, "some", 6, dtype=torch.bfloat16),
]
GPU_CASES = [
    Case("llama_vocab", 2048, 1024, 32064, 1024, "some", 330, valid_vocab_size=32003, dtype=torch.bfloat16),
    Case("llama_vocab", 2048, 1024, 32064, 1024, "some", 330, valid_vocab_size=32003, dtype=torch.float16),
    # Emu-14B's output layer and regression head, 3 row chunks (2048, 2048, 4), a quarter regression rows
    Case("emu14b", 4100, 5120, 32064, 5120, "some", 1025, valid_vocab_size=32003, dtype=torch.bfloat16),
]


def make_inputs(case: Case, device, seed=0):
    """Leaves requiring grad: hidden [N, H], lm_weight [V, H] (logits of std ~2), reg_head_weight [E, H];
    targets [N] below the valid vocabulary, reg_index [R] (distinct rows), reg_targets [R, E]."""
    gen = torch.Generator().manual_seed(seed)
    valid = case.valid_vocab_size or case.V

    def leaf(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=case.dtype).requires_grad_()

    hidden = leaf(case.N, case.H)
    lm_weight = leaf(case.V, case.H, std=2 / math.sqrt(case.H))
    reg_head_weight = leaf(case.E, case.H, std=1 / math.sqrt(case.H))
    targets = torch.randint(0, valid, (case.N,), generator=gen)
    targets[0] = valid - 1
    if case.ignored == "some":
        targets[(torch.arange(case.N) % 3 == 1) | (torch.rand(case.N, generator=gen) < 0.2)] = IGNORE
    elif case.ignored == "all":
        targets[:] = IGNORE
    reg_index = torch.randperm(case.N, generator=gen)[:case.R].sort().values
    reg_targets = torch.randn(case.R, case.E, generator=gen).to(case.dtype)
    return hidden, lm_weight, targets.to(device), reg_head_weight, reg_index.to(device), reg_targets.to(device)


def fp32_leaves(hidden, lm_weight, reg_head_weight):
    return [t.detach().float().requires_grad_() for t in (hidden, lm_weight, reg_head_weight)]


def losses_and_grads(fn, hidden, lm_weight, targets, reg_head_weight, reg_index, reg_targets, **kw):
    """[total, ce, reg, d hidden, d lm_weight, d reg_head_weight]; a weight outside the graph gets zeros."""
    total, ce, reg = fn(hidden, lm_weight, targets, reg_head_weight, reg_index, reg_targets, **kw)
    leaves = (hidden, lm_weight, reg_head_weight)
    grads = torch.autograd.grad(total, leaves, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
    return [total.detach(), ce.detach(), reg.detach(), *grads]


NAMES = ("total", "ce", "reg", "grad hidden", "grad lm_weight", "grad reg_head_weight")


def assert_all_close(actual, expected, dtype, what=""):
    atol, rtol = TOLERANCES[dtype]
    for name, a, e in zip(NAMES, actual, expected):
        assert a.dtype in (torch.float32, dtype), f"{what}{name}: dtype {a.dtype}"
        a, e = a.float().cpu(), e.float().cpu()
        assert torch.isfinite(a).all(), f"{what}{name}: not finite"
        torch.testing.assert_close(a, e, atol=atol * e.abs().max().item() if e.numel() else 0.0, rtol=rtol,
                                   msg=lambda m: f"{what}{name}: {m}")


def check_case(case: Case, device, text_index=None):
    """The fused loss (over the rows `text_index(targets)` names, or all) against the fp32 reference."""
    inputs = make_inputs(case, device)
    hidden, lm_weight, targets, reg_head_weight, reg_index, reg_targets = inputs
    kw = dict(ce_loss_weight=0.7, reg_loss_weight=1.3, ignore_index=IGNORE, valid_vocab_size=case.valid_vocab_size)
    rows = {} if text_index is None else {"text_index": text_index(targets)}
    actual = losses_and_grads(mixed_ce_regression_loss, *inputs, **kw, **rows)
    h32, w32, r32 = fp32_leaves(hidden, lm_weight, reg_head_weight)
    expected = losses_and_grads(mixed_ce_regression_loss_reference, h32, w32, targets, r32, reg_index,
                                reg_targets.float(), **kw)
    for grad, leaf in zip(actual[3:], (hidden, lm_weight, reg_head_weight)):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
    assert_all_close(actual, expected, case.dtype)
    return actual


TEXT_ROWS = {
    "text rows": lambda targets: (targets != IGNORE).nonzero().squeeze(1),
    "a superset": lambda targets: ((targets != IGNORE) | (torch.arange(targets.numel(), device=targets.device) % 4 == 0)
                                   ).nonzero().squeeze(1),
}


@pytest.mark.parametrize("rows", sorted(TEXT_ROWS))
@pytest.mark.parametrize("case", [CASES[i] for i in (0, 4, 6, 7, 8)],
                         ids=lambda c: f"{c.name}-N{c.N}-V{c.V}-{str(c.dtype)[6:]}")
def test_text_index_runs_the_ce_over_those_rows_only(case, rows, device):
    """With text_index (the text rows, or any superset of them) the loss and every gradient equal the
    reference; all ignored: an empty index, exact zeros."""
    actual = check_case(case, device, text_index=TEXT_ROWS[rows])
    if case.ignored == "all":
        assert actual[1].item() == 0.0 and (actual[4] == 0).all()


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.name}-N{c.N}-H{c.H}-V{c.V}-{str(c.dtype)[6:]}")
def test_matches_reference(case, device):
    actual = check_case(case, device)
    if case.ignored == "all":  # empty CE: exactly 0, and so is its share of the gradients
        assert actual[1].item() == 0.0 and (actual[4] == 0).all()
    if case.R == 0:
        assert actual[2].item() == 0.0 and (actual[5] == 0).all()


def test_cuda_configuration(device, monkeypatch):
    """What a CUDA device runs (4096-column blocks, chunks of a multiple of 128 rows within a byte budget),
    against the reference wherever the test runs: the budget is cut so that N = 300 spans 3 chunks (128,
    128, 44) and V = 5000 two vocab blocks."""
    import emu_mc.kernels.mixed_loss as ml

    cuda = torch.device("cuda")
    chunk_rows, row_kernel_meta = ml._chunk_rows, ml._row_kernel_meta
    monkeypatch.setattr(ml, "_CHUNK_BYTES_CUDA", 128 * 5000 * 4)
    monkeypatch.setattr(ml, "_chunk_rows", lambda v_local, element_size, _: chunk_rows(v_local, 4, cuda))
    monkeypatch.setattr(ml, "_row_kernel_meta", lambda v_local, _: row_kernel_meta(v_local, cuda))
    check_case(Case("cuda_configuration", 300, 64, 5000, 64, "some", 30, valid_vocab_size=4990), device)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c.name}-N{c.N}-V{c.V}-{str(c.dtype)[6:]}")
def test_matches_reference_on_gpu(case, device):
    check_case(case, device)


def test_reg_targets_gradient(device):
    """reg_targets are detached in Emu, but a caller that wants their gradient gets the reference's."""
    case = Case("mixed", 40, 64, 130, 64, "some", 5)
    hidden, lm_weight, targets, reg_head_weight, reg_index, reg_targets = make_inputs(case, device)
    grads = []
    for fn in (mixed_ce_regression_loss, mixed_ce_regression_loss_reference):
        leaf = reg_targets.detach().clone().requires_grad_()
        total = fn(hidden, lm_weight, targets, reg_head_weight, reg_index, leaf, reg_loss_weight=0.5)[0]
        grads.append(torch.autograd.grad(total, leaf)[0])
    torch.testing.assert_close(*grads, atol=1e-7, rtol=1e-6)


class _LargestAllocation(TorchDispatchMode):
    """Bytes of the largest tensor storage any op creates (views and the interpreter's re-wrapping of
    existing storages do not count)."""

    def __init__(self):
        super().__init__()
        self.largest = (0, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        existing = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in existing:
                self.largest = max(self.largest, (t.untyped_storage().nbytes(), str(func)), key=lambda x: x[0])
        return out


@pytest.mark.skipif(not ptxas_available(), reason="triton wheel without the bundled ptxas")
def test_emu_sizes_compile_for_sm90_without_spills():
    """Without a GPU, every launch the loss makes on CUDA in bf16, compiled for sm_90 with the runtime's
    argument specialisation: Emu-14B's output layer (V 32000 and 4000, H 5120; N 16384 in whole chunks,
    N 4099 with a 3-row last chunk whose statistics are not 16-byte aligned) compiles without register
    spills and within an H100's shared memory."""
    compiled = compiled_kernels("mixed_loss", [(16384, 32000, 5120), (16384, 4000, 5120), (4099, 32064, 5120)])
    print("\n".join(f"{c.name}: {c.registers} registers/thread, {c.shared} B shared, {c.spilled} B spilled"
                    for c in compiled))
    assert {c.name for c in compiled} == {"_row_ce_kernel", "_row_stats_kernel", "_logit_grad_kernel"}
    for c in compiled:
        assert c.spilled == 0, f"{c.name} spills {c.spilled} bytes ({c.registers} registers)"
        assert c.shared <= H100_SHARED_MEMORY, f"{c.name} needs {c.shared} bytes of shared memory"


def test_memory_no_logits(device, monkeypatch):
    """Backward keeps nothing larger than the gradients it returns (computed in forward) and no op in
    forward or backward creates anything near the [N, V] fp32 logits (here 512 KB; hidden is 32 KB,
    lm_weight 64 KB; chunks of 32 rows on CUDA too). The reference, run through the same checks, fails
    both: the checks can see logits."""
    import emu_mc.kernels.mixed_loss as ml

    monkeypatch.setattr(ml, "_chunk_rows", lambda *_: 32)
    case = Case("memory", 256, 32, 512, 32, "some", 8)
    inputs = make_inputs(case, device)
    logits_bytes = case.N * case.V * 4

    def run(fn):
        saved = []

        def pack(t):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _LargestAllocation() as alloc:
            total = fn(*inputs)[0]
            total.backward()
        return saved, alloc.largest

    input_storages = {t.untyped_storage().data_ptr() for t in inputs}
    saved, (largest, op) = run(mixed_ce_regression_loss)
    extra = [tuple(t.shape) for t in saved if t.untyped_storage().data_ptr() not in input_storages]
    gradient_sizes = (case.N * case.H, case.V * case.H, case.E * case.H)
    assert all(math.prod(shape) <= max(gradient_sizes) for shape in extra), f"saved beyond the inputs: {extra}"
    assert largest < logits_bytes / 4, f"{op} allocated {largest} bytes"

    ref_saved, (ref_largest, _) = run(mixed_ce_regression_loss_reference)
    assert max(t.numel() for t in ref_saved) >= case.N * case.V and ref_largest >= logits_bytes


@pytest.mark.gpu
def test_peak_memory_at_emu_size(device):
    """bf16, N 8192, V 32000, H = E = 5120: the CUDA allocator's peak during forward + backward, above the
    inputs, stays within the gradients it returns plus 256 MiB (a 2048-row chunk of logits is 125 MiB;
    the whole [N, V] logits would be 500 MiB in bf16)."""
    case = Case("memory_emu", 8192, 5120, 32000, 5120, "some", 2048, dtype=torch.bfloat16)
    inputs = make_inputs(case, device)
    leaves = (inputs[0], inputs[1], inputs[3])
    torch.autograd.grad(mixed_ce_regression_loss(*inputs)[0], leaves)  # warm-up: kernels, cuBLAS workspaces
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    grads = torch.autograd.grad(mixed_ce_regression_loss(*inputs)[0], leaves)
    torch.cuda.synchronize()
    peak_mib = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    grads_mib = sum(g.numel() * g.element_size() for g in grads) / 2 ** 20
    print(f"peak above inputs {peak_mib:.0f} MiB, of which gradients {grads_mib:.0f} MiB")
    assert peak_mib <= grads_mib + 256, f"peak {peak_mib:.0f} MiB, gradients {grads_mib:.0f} MiB"


class _AtenOps(TorchDispatchMode):
    """Records the name of every aten op run, and in `host_syncs` those that wait for the device: scalar
    reads, and ops whose output shape depends on tensor values (nonzero, masked_select, unique,
    boolean-mask indexing, ...)."""

    DATA_DEPENDENT = ("aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal", "aten.nonzero.",
                      "aten.masked_select", "aten.unique", "aten._unique", "aten.repeat_interleave.Tensor")

    def __init__(self):
        super().__init__()
        self.names, self.host_syncs = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.names.append(name)
        boolean_index = name.startswith(("aten.index.", "aten.index_put")) and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in tree_leaves(args[1:2]))
        if name.startswith(self.DATA_DEPENDENT) or boolean_index:
            self.host_syncs.append(name)
        return func(*args, **(kwargs or {}))


def test_no_host_sync(device):
    """Forward and backward run no op that reads a value back to the host or sizes an output by the data
    (so the loss is CUDA-graph capturable), in a case with every kind of row. The recorder catches the
    v1 loss's `nonzero` and boolean-mask indexing."""
    inputs = make_inputs(Case("mixed", 70, 64, 300, 64, "some", 6), device)
    with _AtenOps() as ops:
        total = mixed_ce_regression_loss(*inputs, valid_vocab_size=250)[0]
        total.backward()
    assert ops.host_syncs == []

    hidden, _, targets = inputs[:3]
    with _AtenOps() as ops:
        (targets != IGNORE).nonzero()
        _ = hidden[targets != IGNORE]
        (targets != IGNORE).sum().item()
    assert {"aten.nonzero.default", "aten.index.Tensor", "aten._local_scalar_dense.default"} <= set(ops.host_syncs)


@pytest.mark.gpu
@pytest.mark.parametrize("with_text_index", [False, True])
def test_cuda_graph_capture_and_replay(device, with_text_index):
    """Forward + backward captured in one CUDA graph, replayed on new values copied into the same input
    buffers, gives what an eager call on those values gives (up to the algorithm cuBLAS picks); also
    with text rows found before the capture (as the training loop passes them), covering the new
    targets' text rows."""
    case = Case("mixed", 300, 256, 1000, 256, "some", 40, valid_vocab_size=990, dtype=torch.bfloat16)
    static = make_inputs(case, device, seed=0)
    leaves = (static[0], static[1], static[3])
    text_index = torch.arange(case.N, device=device) if with_text_index else None

    def step():
        total, ce, reg = mixed_ce_regression_loss(*static, valid_vocab_size=case.valid_vocab_size,
                                                  text_index=text_index)
        return [total.detach(), ce.detach(), reg.detach(), *torch.autograd.grad(total, leaves)]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles the kernels, fills the allocator's pools
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()

    fresh = make_inputs(case, device, seed=1)
    with torch.no_grad():
        for buffer, value in zip(static, fresh):
            buffer.copy_(value)
    graph.replay()
    torch.cuda.synchronize()
    expected = step()
    for name, a, e in zip(NAMES, captured, expected):  # same kernels; the margin covers cuBLAS picking another
        torch.testing.assert_close(a.float(), e.float(), atol=1e-3 * e.abs().max().item(), rtol=1e-3,
                                   msg=lambda m: f"{name}: {m}")


def test_no_grad_forward_matches(device):
    """Without autograd (evaluation), the loss values are the training ones and no gradient GEMM runs:
    one matmul per row chunk (3 of 32 rows under the interpreter, 1 on CUDA) for the logits, one for the
    regression prediction."""
    inputs = make_inputs(Case("mixed", 70, 64, 300, 64, "some", 6), device)
    with_grad = [t.detach() for t in mixed_ce_regression_loss(*inputs)]
    with torch.no_grad(), _AtenOps() as ops:
        without = mixed_ce_regression_loss(*inputs)
    torch.testing.assert_close(list(without), with_grad, atol=0, rtol=0)
    matmuls = [name for name in ops.names if "mm" in name.split(".")[1]]
    assert len(matmuls) == (3 if device == "cpu" else 1) + 1, matmuls


@pytest.mark.skipif(torch.cuda.is_available(), reason="the tiny model runs on CPU, where the kernel needs the "
                                                     "interpreter (set only without CUDA)")
def test_model_loss_seam(single_process_world, tiny_cfg, special_ids, tokenizer):
    """EmuModel with model.loss.impl = triton: the same losses and parameter gradients as the reference
    (the tiny LLM's padded vocabulary exercises valid_vocab_size)."""
    from emu_mc.batch import synthetic_batch
    from emu_mc.model.emu import EmuModel
    from emu_mc.model.loss import mixed_loss_fn

    torch.manual_seed(0)
    tiny_cfg.model.loss.impl = tiny_cfg.model.resampler.attention_impl = "reference"
    model = EmuModel(tiny_cfg.model, special_ids, len(tokenizer))
    batch = synthetic_batch(special_ids, batch_size=2, seq_length=64, vocab_size=len(tokenizer),
                            num_queries=tiny_cfg.model.resampler.num_queries, image_size=32,
                            generator=torch.Generator().manual_seed(0))
    results = []
    for impl in ("reference", "triton"):
        model.loss_fn = mixed_loss_fn(impl)
        model.zero_grad()
        out = model(batch)
        out["loss"].backward()
        results.append(({k: v.detach() for k, v in out.items()},
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (ref_out, ref_grads), (out, grads) = results
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=2e-6 * ref_grads[name].abs().max().item(),
                                   rtol=1e-5, msg=lambda m: f"{name}: {m}")


# Vocab-parallel: 2 gloo ranks, each with half of the vocabulary and of the regression rows (5: 2 and 3).
# "padding_in_last_shard": rank 1's shard ends in padding; "last_shard_all_padding": rank 1 holds no real
# vocabulary at all; "one_regression_row": rank 0 has no regression row.
TP_WORLD = 2
TP_CASES = [
    Case("padding_in_last_shard", 50, 64, 256, 64, "some", 5, valid_vocab_size=230),
    Case("last_shard_all_padding", 50, 88, 256, 88, "some", 5, valid_vocab_size=100),
    Case("one_regression_row", 40, 64, 256, 64, "some", 1),
]
TP_KW = dict(ce_loss_weight=1.0, reg_loss_weight=0.5, ignore_index=IGNORE)


def tp_worker(out_dir: str):
    """Run on each rank: kernel and reference with tp_group on this rank's vocab shard; save both."""
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    for case in TP_CASES:
        hidden, lm_weight, targets, reg_head_weight, reg_index, reg_targets = make_inputs(case, "cpu")
        v_local = case.V // world
        results = {}
        text_rows = {"text_index": TEXT_ROWS["text rows"](targets)}
        for name, fn, rows in (("kernel", mixed_ce_regression_loss, {}), ("kernel over text rows",
                               mixed_ce_regression_loss, text_rows), ("reference", mixed_ce_regression_loss_reference, {})):
            shard = lm_weight.detach()[rank * v_local:(rank + 1) * v_local].clone().requires_grad_()
            results[name] = losses_and_grads(
                fn, hidden, shard, targets, reg_head_weight, reg_index, reg_targets,
                valid_vocab_size=case.valid_vocab_size, tp_group=dist.group.WORLD, **TP_KW, **rows)
        torch.save(results, os.path.join(out_dir, f"{case.name}_rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_vocab_parallel_matches_unsharded():
    """Per rank, the kernel equals the reference's autograd (gradients of hidden: the rank's partial sum,
    its CE shard's share and its regression rows). Across ranks: the same losses as unsharded, lm_weight
    gradients that concatenate to the unsharded one, hidden gradients that sum to it (what the model's TP
    copy region does) and the full regression head gradient on every rank."""
    with tempfile.TemporaryDirectory() as out_dir:
        # On CPU tensors under the interpreter on any machine: two ranks cannot share one GPU via NCCL.
        torchrun("tests/kernels/test_mixed_loss.py", [out_dir], nproc=TP_WORLD, timeout=240,
                 env={"TRITON_INTERPRET": "1"})
        for case in TP_CASES:
            ranks = [torch.load(os.path.join(out_dir, f"{case.name}_rank{r}.pt")) for r in range(TP_WORLD)]
            check_vocab_parallel(case, ranks)


def check_vocab_parallel(case, ranks):
    for rank, result in enumerate(ranks):
        for variant in ("kernel", "kernel over text rows"):
            assert_all_close(result[variant], result["reference"], case.dtype,
                             f"{case.name} rank {rank} {variant} vs reference with tp_group: ")
    kernel = [r["kernel"] for r in ranks]

    unsharded = losses_and_grads(mixed_ce_regression_loss_reference, *make_inputs(case, "cpu"),
                                 valid_vocab_size=case.valid_vocab_size, **TP_KW)
    grad_hidden, grad_lm_weight = sum(k[3] for k in kernel), torch.cat([k[4] for k in kernel])
    for rank in range(TP_WORLD):
        combined = kernel[rank][:3] + [grad_hidden, grad_lm_weight, kernel[rank][5]]
        assert_all_close(combined, unsharded, case.dtype, f"{case.name} rank {rank} vs unsharded: ")


if __name__ == "__main__":
    tp_worker(sys.argv[1])
