"""The one comparison helper every test uses, plus builders for poisoned paged caches."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

# Older torch cannot compile a few things that are not the library's (measured 2026-12-06 on the CPU with
# transformers 5.25, every torch from 2.6 to 2.14: bench/results/versions_cpu_2026-12-06*.txt). The tests that meet
# them skip on the versions measured to fail:
# - torch 2.6's dynamo stops in transformers' output-capturing wrapper ("func.__code__.co_varnames"; 2.7 traces it);
# - the aot_autograd runtime wrapper of torch 2.6 and 2.7 raises an IndexError on a module compiled over changing
#   batch sizes;
# - the dynamo of torch 2.6 to 2.9 reads the numpy ints of a list (prefill's host lengths) only as data-dependent
#   values ("Data dependent operator"); a single numpy int traces on every version (_utils._integer).


def torch_before(version: str, why: str):
    """Skip on torch before ``version``, where ``why`` fails inside torch's or transformers' own code."""
    return pytest.mark.skipif(torch.__version__ < version, reason=f"torch before {version}: {why} (tests/helpers.py)")


OLD_TORCH_COMPILE = torch_before("2.7", "dynamo stops inside transformers' output-capturing wrapper")
OLD_AOT_AUTOGRAD = torch_before("2.8", "aot_autograd's runtime wrapper raises an IndexError here")
OLD_NUMPY_TRACE = torch_before("2.10", "dynamo reads a list's numpy ints only as data-dependent values")

SENTINEL_BLOCK = 2147480000  # an id far past any real cache: reading through it faults or returns garbage

# Tolerances, from the numerics of bf16/fp16 outputs with fp32 accumulation:
# - the kernel's output is rounded once to the output dtype: bf16 has an 8-bit significand, so one
#   rounding costs up to 2^-8 relative (0.39%), RMS about 2^-8/sqrt(3) ~ 2.3e-3 per element; the bounds below
#   were set while the interpreter's bf16 casts truncated (TRITON_NOTES.md), doubling the bias (RMS ~ 4.5e-3),
#   and are kept now that the kernels round under the interpreter too (``mla_kernels._convert.to_dtype``);
# - probabilities are rounded to the cache dtype before the P.V product (as FlashAttention does),
#   another ~2.3e-3 RMS relative, partly averaged away over the keys.
# The reference sees the same rounded inputs, so input rounding cancels. Hence relative RMS error
# below 8e-3 for bf16 (about 1.5 to 2 ulp RMS) and 1e-3 for fp16 (11-bit significand, 8x finer).
# fp32 (24-bit significand, full-precision dots) has no rounding of p or of the output worth the name:
# what is left is fp32 summation over up to thousands of keys and the GPU's approximate exp2 (~2 ulp),
# a few 1e-7 relative; 1e-5 leaves room for that and still fails on any real defect (TF32 would give ~1e-3).
# Measured under the interpreter (tests/tolerance_probe.py over the whole suite, 2026-12-06): fp32 at most 5.4e-7
# (median 1.8e-7) over 1629 comparisons; bf16 7.1e-3 (median 3.6e-3) over 325; fp16 3.9e-4 (median 2.4e-4) over 94.
# bench/results/tolerance_margins_cpu_2026-12-06.txt has every bound's margin; a GPU session records its own.
# Cosine difference (FlashMLA's measure) is |a - e|^2 / (|a|^2 + |e|^2) <= err^2 identically (about err^2 / 2 for
# small errors of any kind): with bounds of err^2 it can never fail before the RMS bound does, which is the binding
# check. It stays in assert_close's message (and as a caller's cos_tol) to compare with FlashMLA's published figures.
RMS_TOL = {torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float32: 1e-5}
COS_TOL = {torch.bfloat16: 1e-4, torch.float16: 2e-6, torch.float32: 1e-9}
# These bounds hold for the RMS over many elements. A small output samples that noise thinly (a one-head case of
# width 16 has 16 values): the RMS of n values of noise at level s exceeds s by sqrt(chi2_n / n), which passes
# 1 + 5 / sqrt(2n) about once in a million draws (within 3% of the exact chi-square quantile for n >= 8: 1.91 at
# n = 16, 1.63 at 32). The noise level itself is about 5/8 of each bound (bf16 under the interpreter: a median 4.6e-3
# over 1500 random one-head, 16-wide decodes, max 8.0e-3). So n values get max(bound, 5/8 bound (1 + 5 / sqrt(2n))):
# the bound itself from 35 values up, 9.4e-3 for bf16 at 16 values (a hypothesis case reached 8.5e-3 there).
NOISE_OF_BOUND = 5 / 8


def rms_tol_for(dtype: torch.dtype, n: int, bound: float | None = None) -> float:
    """RMS_TOL[dtype] (or ``bound``, a larger budget of the same kind of noise) for an output of ``n`` finite values
    (see above: loosened only below 35 values)."""
    bound = RMS_TOL[dtype] if bound is None else bound
    return max(bound, NOISE_OF_BOUND * bound * (1 + 5 / math.sqrt(2 * max(n, 1))))


# lse is computed in fp32 from the same scores, in log space. Its error is at most the largest score error (the lse's
# gradient in the scores is the softmax, which sums to 1), and a score over D = 576 products of 16-bit inputs (exact
# in fp32) is off by the fp32 sum's rounding: about sqrt(D) 2^-24 ~ 1.4e-6 relative for random-signed terms, up to
# D 2^-23 ~ 7e-5 of the terms' magnitude sum for an accumulator that truncates (tensor cores' accumulation order and
# rounding are not documented). Measured under the interpreter: at most 4.9e-7 of max(1, |lse|) (median 8.7e-8)
# over 409 comparisons (tests/tolerance_probe.py, 2026-12-06). 1e-4 (of max(1, |lse|), assert_lse_close) admits the
# GPU's worst case, and still fails on scores or an lse rounded to 16 bits (2^-9 ~ 2e-3) or on TF32 dots (~1e-3).
LSE_ATOL = 1e-4


def err_ratio(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative RMS error ||a - e|| / ||e|| over finite entries (fla's get_err_ratio)."""
    a, e = actual.double(), expected.double()
    denom = e.pow(2).mean().sqrt().item()
    diff = (a - e).pow(2).mean().sqrt().item()
    return diff / max(denom, 1e-30) if denom > 0 else diff


def cos_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """FlashMLA's cosine difference 1 - 2<x, y> / (|x|^2 + |y|^2)."""
    a, e = actual.double().flatten(), expected.double().flatten()
    denom = (a * a + e * e).sum().item()
    if denom == 0:
        return 0.0
    return 1 - 2 * (a * e).sum().item() / denom


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
                 rms_tol: float | None = None, cos_tol: float | None = None) -> None:
    """Compare a kernel's result to the float64 reference: shapes, NaN/inf positions, RMS and cosine error.

    ``dtype`` is the precision the kernel ran in; tolerances come from RMS_TOL/COS_TOL unless given.
    On failure the message names the worst element.
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), f"{name}: NaN positions differ, first at {_first(nan_a ^ nan_e)}"
    inf_a, inf_e = torch.isinf(a), torch.isinf(e)
    assert torch.equal(inf_a, inf_e), f"{name}: inf positions differ, first at {_first(inf_a ^ inf_e)}"
    assert torch.equal(a[inf_a], e[inf_e]), f"{name}: infinities differ in sign"
    finite = torch.isfinite(e)
    a, e = a[finite], e[finite]
    if e.numel() == 0:
        return
    rms_tol = rms_tol_for(dtype, e.numel()) if rms_tol is None else rms_tol
    cos_tol = COS_TOL[dtype] if cos_tol is None else cos_tol
    err, cos = err_ratio(a, e), cos_diff(a, e)
    if err > rms_tol or cos > cos_tol:
        idx = (actual.detach().cpu().double() - expected.detach().cpu().double()).abs().nan_to_num(0).argmax()
        where = tuple(int(i) for i in torch.unravel_index(idx, actual.shape))
        raise AssertionError(
            f"{name}: relative RMS error {err:.3e} (tol {rms_tol:.1e}), cosine diff {cos:.3e} (tol {cos_tol:.1e}); "
            f"worst at {where}: got {actual[where].item():.6g}, expected {expected[where].item():.6g}")


def assert_lse_close(name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float = LSE_ATOL) -> None:
    """lse in float32 against the float64 reference: same -inf positions, then absolute error."""
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.equal(torch.isinf(a), torch.isinf(e)), f"{name}: -inf positions differ"
    assert not torch.isnan(a).any(), f"{name}: NaN in lse at {_first(torch.isnan(a))}"
    worst, scale = lse_error(a, e)
    assert worst <= atol * scale, f"{name}: max |lse error| {worst:.3e} > {atol * scale:.1e}"


def lse_error(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """What ``assert_lse_close`` bounds: the largest |error| over the finite entries of ``expected`` and its scale,
    max(1, their largest |lse|); (0, 1) where none is finite."""
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    fin = torch.isfinite(e)
    if not fin.any():
        return 0.0, 1.0
    return (a[fin] - e[fin]).abs().max().item(), max(1.0, e[fin].abs().max().item())


def assert_rejects(fn, args: dict, change, error: type, name: str) -> None:
    """Apply one bad ``change`` to valid keyword ``args``: ``fn(**args)`` must raise ``error`` naming ``name``."""
    change(args)
    with pytest.raises(error, match=name):
        fn(**args)


def _first(mask: torch.Tensor):
    nz = mask.nonzero()
    return tuple(nz[0].tolist()) if len(nz) else None


def make_paged_cache(seqlens, page_size, widths, dtype, device, extra_blocks=3, shuffle=True, fused=True,
                     generator_seed=0):
    """Random latent/rope caches for sequences of the given lengths, with poison everywhere unused.

    widths = (R, P). Returns (kv_cache [N, page, R], pe_cache [N, page, P], block_table [B, max_blocks] int32).
    Unused token slots hold NaN, so any read past a sequence's end shows up in the output;
    unused block-table entries hold SENTINEL_BLOCK; block ids are shuffled so neighbours in a
    sequence are not neighbours in memory. With ``fused``, both caches are views of one
    [N, page, R+P] buffer (the serving-engine layout).
    """
    r, p = widths
    blocks_needed = [max(1, math.ceil(n / page_size)) for n in seqlens]
    max_blocks = max(blocks_needed) + 1  # one spare column, always a sentinel
    num_blocks = sum(blocks_needed) + extra_blocks
    ids = list(range(num_blocks))
    if shuffle:
        random.Random(generator_seed).shuffle(ids)
    gen = torch.Generator().manual_seed(generator_seed)  # the content too: one seed, one cache (hypothesis replays)
    buf = torch.full((num_blocks, page_size, r + p), float("nan"), dtype=dtype, device=device)
    table = torch.full((len(seqlens), max_blocks), SENTINEL_BLOCK, dtype=torch.int32)
    cursor = 0
    for b, n in enumerate(seqlens):
        for j in range(math.ceil(n / page_size)):
            blk = ids[cursor]
            cursor += 1
            table[b, j] = blk
            filled = min(page_size, n - j * page_size)
            buf[blk, :filled] = torch.randn(filled, r + p, dtype=torch.float32, generator=gen).to(dtype=dtype, device=device)
    if fused:
        kv_cache, pe_cache = buf[..., :r], buf[..., r:]
    else:
        kv_cache, pe_cache = buf[..., :r].contiguous(), buf[..., r:].contiguous()
    return kv_cache, pe_cache, table.to(device)


def record_launches(monkeypatch, module, *kernels: str) -> list:
    """Replace the Triton kernels named ``kernels`` in ``module`` by stand-ins that run nothing and append each
    launch ``kernel[grid](*args, **kwargs)`` to the returned list as ``(grid, args, kwargs)``, in launch order; CPU
    (and meta) tensors take the kernels' path. A launch's grid and arguments are then checked without running it
    (the interpreter would take minutes or hours at the sizes where grid limits bite)."""
    from mla_kernels import _utils

    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, args, kwargs))

    for name in kernels:
        monkeypatch.setattr(module, name, Recorder())
    monkeypatch.setattr(_utils, "use_triton", lambda t: True)
    return launches


def bound_allocations(monkeypatch, max_numel: int, what: str) -> None:
    """Fail any ``torch.empty`` of more than ``max_numel`` elements (``what``: the problem, for the message): a
    count that sizes buffers from a bound it should have clamped (forced splits, ``max_seqlen_k``) shows as one.
    ``monkeypatch.undo()`` lifts it."""
    real_empty = torch.empty

    def bounded_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        assert t.numel() < max_numel, f"a buffer of shape {tuple(t.shape)} for {what}"
        return t

    monkeypatch.setattr(torch, "empty", bounded_empty)


def assert_fork_beside_a_busy_thread_finishes(imports: str, hold: str, child: str = "") -> None:
    """In a fresh Python: a thread runs ``hold`` (lines that take a lock and, inside it, call ``ready.set()`` then
    ``release.wait()``), the process forks while it does, the child runs ``child`` and exits with 7; the test fails
    if the child hangs (on a lock it inherited held, which no thread of its own will release) or fails."""
    import os
    import subprocess
    import sys
    import textwrap

    script = "\n".join([
        "import os, threading, time", textwrap.dedent(imports),
        "ready, release = threading.Event(), threading.Event()",
        "def worker():", textwrap.indent(textwrap.dedent(hold), "    "),
        "t = threading.Thread(target=worker)", "t.start()", "ready.wait()",
        "pid = os.fork()", "if pid == 0:", textwrap.indent(textwrap.dedent(child) or "pass", "    "), "    os._exit(7)",
        "release.set()", "t.join()",
        "for _ in range(300):",
        "    done, status = os.waitpid(pid, os.WNOHANG)",
        "    if done:",
        "        print(os.waitstatus_to_exitcode(status))",
        "        break",
        "    time.sleep(0.1)",
        "else:",
        "    os.kill(pid, 9)",
        "    os.waitpid(pid, 0)",
        "    print('hung')",
    ])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True, text=True, env=env,
                         timeout=120)
    assert run.returncode == 0 and run.stdout.split()[-1] == "7", run.stdout + run.stderr


def round_trip(obj, how: str):
    """``obj`` through ``how``: "pickle" (dumps, loads), "torch.save" (to memory and ``torch.load`` back) or
    "deepcopy"."""
    import io
    import pickle

    if how == "deepcopy":
        return copy.deepcopy(obj)
    if how == "pickle":
        return pickle.loads(pickle.dumps(obj))
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


# ---------------------------------------------------------------------------------------------
# what runs PyTorch ops through something else (the drop-in's rope and norm dispatch must take PyTorch's ops there)
# ---------------------------------------------------------------------------------------------


def _intercepted_ops_seen(f, x, t):
    """A TorchDispatchMode's view of ``f(x)``: how many aten ops it saw (a kernel launch shows as one empty)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Ops() as mode:
        f(x)
    return torch.tensor(float(len(mode.ops)))


def _function_mode_shifting_products(f, x, t):
    """``f(x)`` under a TorchFunctionMode that changes what PyTorch computes: one added to every tensor product (a
    sign flip would cancel over the two products of an RMSNorm)."""
    from torch.overrides import TorchFunctionMode

    products = (torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__)

    class Shifting(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            return out + 1 if func in products else out

    with torch.no_grad(), Shifting():
        return f(x)


def _forward_ad_tangent(f, x, t):
    """Forward-mode AD's tangent of ``f`` at ``x`` along ``t``, under no_grad (which does not turn it off)."""
    import torch.autograd.forward_ad as fwAD
    with torch.no_grad(), fwAD.dual_level():
        out = fwAD.unpack_dual(f(fwAD.make_dual(x, t))).tangent
        return torch.full_like(x, float("nan")) if out is None else out


def _vmapped(f, x, t):
    return torch.func.vmap(f)(torch.stack([x, t]))


def _jvp(f, x, t):
    return torch.func.jvp(f, (x,), (t,))[1]


def _jit_traced(f, x, t):
    with torch.no_grad():
        return torch.jit.trace(lambda v: f(v), (x,), check_trace=False)(t)


def _make_fx_traced(f, x, t):
    from torch.fx.experimental.proxy_tensor import make_fx
    with torch.no_grad():
        return make_fx(lambda v: f(v))(x)(t)


# ``run(f, x, t)``: ``f`` of ``x`` (and ``t``, a second input or a tangent) under something that runs PyTorch's ops
# through itself; ``run(kernel_path, x, t)`` must equal ``run(pytorch_path, x, t)``, which it does only where the
# dispatch takes PyTorch's ops: forward-mode AD (a kernel gives no tangent), vmap and jvp (wrapped tensors with no
# storage to launch on), torch.jit.trace and make_fx (the graph records the ops; a launch would leave it an empty
# tensor), a TorchDispatchMode (sees the ops) and a TorchFunctionMode (changes them)
INTERCEPTING_RUNS = [_forward_ad_tangent, _vmapped, _jvp, _jit_traced, _make_fx_traced, _intercepted_ops_seen,
                     _function_mode_shifting_products]


def fp8_linear(linear, block, ue8m0=False):
    """transformers' FP8Linear holding ``linear``'s weight quantized as DeepSeek-V3's checkpoints hold theirs (e4m3,
    one scale per ``block`` or, with None, one for all: amax / 448, or with ``ue8m0`` that rounded up to a power of
    two, stored as float8_e8m0fnu), and the exact value of that weight: each fp8 value times its block's scale, in
    float64 (exact: a 4-bit significand times a float32 scale), block by block."""
    from transformers.integrations.finegrained_fp8 import FP8Linear
    w = linear.weight.detach().double()
    rows, cols = w.shape
    b0, b1 = block or (rows, cols)
    fp8 = FP8Linear(cols, rows, block_size=block)
    weight = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scales = torch.empty(-(-rows // b0), -(-cols // b1), dtype=torch.float32)
    exact = torch.empty(rows, cols, dtype=torch.float64)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            part = (slice(i * b0, (i + 1) * b0), slice(j * b1, (j + 1) * b1))
            scale = w[part].abs().max().item() / 448.0
            scale = torch.tensor(2.0 ** math.ceil(math.log2(scale)) if ue8m0 else scale, dtype=torch.float32)
            weight[part] = (w[part] / scale.double()).to(torch.float8_e4m3fn)
            scales[i, j] = scale
            exact[part] = weight[part].double() * scale.double()
    fp8.weight = torch.nn.Parameter(weight, requires_grad=False)
    scales = scales.reshape(()) if block is None else scales
    fp8.weight_scale_inv = torch.nn.Parameter(scales.to(torch.float8_e8m0fnu) if ue8m0 else scales,
                                              requires_grad=False)
    return fp8, exact


def with_fp8_kv_b(model, block=(16, 24), ue8m0=False):
    """``model`` with every kv_b_proj an FP8Linear (``fp8_linear``), and a copy of it whose kv_b_proj are plain
    Linear layers holding their exact values, rounded to the model's dtype (through float32, as torch converts
    float64)."""
    plain = copy.deepcopy(model)
    for layer, plain_layer in zip(model.model.layers, plain.model.layers):
        layer.self_attn.kv_b_proj, exact = fp8_linear(layer.self_attn.kv_b_proj, block, ue8m0)
        with torch.no_grad():
            plain_layer.self_attn.kv_b_proj.weight.copy_(exact)
    return model, plain


def use_sink_attention(monkeypatch) -> None:
    """transformers' DeepSeek-V3 attention runs gpt-oss's eager sink attention, which appends each module's
    ``sinks`` to every row of scores as a key of value zero (``monkeypatch`` undoes it after the test)."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward as sink_attention

    monkeypatch.setattr(modeling_deepseek_v3, "eager_attention_forward", sink_attention)


def with_attention_sinks(model, monkeypatch, std: float = 2.0):
    """``model`` (a transformers DeepSeek-V3) with attention sinks, as Hy4's attention has them: a learned logit per
    head in every attention module (``sinks``, drawn at ``std``, seeded per layer), run by gpt-oss's eager sink
    attention (``use_sink_attention``)."""
    use_sink_attention(monkeypatch)
    for i, layer in enumerate(model.model.layers):
        gen = torch.Generator().manual_seed(10 + i)
        layer.self_attn.sinks = torch.nn.Parameter(torch.randn(layer.self_attn.num_heads, generator=gen) * std)
    return model
