"""Merging two attention results over disjoint key sets: ``merge_attention_states``.

Attention over keys ``A + B`` is the two results over ``A`` and over ``B`` weighted by their softmax sums:
with ``lse`` the log of each sum, ``out = (e^lse_a out_a + e^lse_b out_b) / (e^lse_a + e^lse_b)`` and
``lse = log(e^lse_a + e^lse_b)``. Computed against the larger lse, so nothing overflows. This is how a shared prefix is
attended once for a whole group of requests and merged with each request's own suffix (cascade decoding: README,
"Shared-prefix decode"), and how results computed on different devices or at different times are put together.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launcher, _utils
from ._convert import to_dtype, to_float32
from .decode import COMBINE_GRID_X, LN2_C, _combine_grid

LOG2E_C: tl.constexpr = tl.constexpr(_utils.LOG2E)
MAX_WIDTH = 16384  # the widest row the kernel merges (one program holds it); wider rows take the PyTorch path
# the most rows one launch takes: its grid's (COMBINE_GRID_X, rows / COMBINE_GRID_X), whose second axis stops at
# 65535 (past it the launch failed on a GPU, "invalid argument"; rows of width 1-3 fit an H100 there)
MAX_ROWS = COMBINE_GRID_X * _utils.MAX_GRID_YZ


@triton.jit
def _merge_states_kernel(OUT_A, LSE_A, OUT_B, LSE_B, OUT, LSE, num_rows, width,
                         BLOCK_D: tl.constexpr, STORE_LSE: tl.constexpr):
    """One row (a query token's head) per program, row ``pid(1) * num_programs(0) + pid(0)`` (the split combine's
    grid, ``decode._combine_grid``): ``width`` values of each state, contiguous rows."""
    row = tl.program_id(1).to(tl.int64) * tl.num_programs(0) + tl.program_id(0)
    if row >= num_rows:  # the last row of programs' tail
        return
    lse_a = tl.load(LSE_A + row)
    lse_b = tl.load(LSE_B + row)
    # +inf: FlashMLA's mark of a row without keys (flash_mla_with_kvcache returns it), as -inf is ours
    lse_a = tl.where(lse_a == float("inf"), float("-inf"), lse_a)
    lse_b = tl.where(lse_b == float("inf"), float("-inf"), lse_b)
    m = tl.maximum(lse_a, lse_b)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # neither state saw a key: weights 0, not exp2(-inf - -inf) = NaN
    # differences in natural units, then log2 units for exp2 (an lse past float32's max / log2(e) stays finite)
    w_a = tl.math.exp2((lse_a - m_safe) * LOG2E_C)
    w_b = tl.math.exp2((lse_b - m_safe) * LOG2E_C)
    total = w_a + w_b
    inv = tl.where(total > 0.0, 1.0 / tl.where(total > 0.0, total, 1.0), 0.0)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < width
    a = to_float32(tl.load(OUT_A + row * width + offs, mask=mask, other=0.0))
    b = to_float32(tl.load(OUT_B + row * width + offs, mask=mask, other=0.0))
    # a state that saw no key (weight 0) adds nothing, even where its output holds NaN (0 * NaN would not)
    a = tl.where(w_a > 0.0, a * (w_a * inv), 0.0)
    b = tl.where(w_b > 0.0, b * (w_b * inv), 0.0)
    out = a + b
    lse = tl.where(total > 0.0, m_safe + tl.math.log2(tl.where(total > 0.0, total, 1.0)) * LN2_C, float("-inf"))
    nan = (lse_a != lse_a) | (lse_b != lse_b)  # a NaN lse (a NaN in the keys it saw) makes the row NaN
    out = tl.where(nan, float("nan"), out)
    tl.store(OUT + row * width + offs, to_dtype(out, OUT.dtype.element_ty), mask=mask)
    if STORE_LSE:
        tl.store(LSE + row, tl.where(nan, float("nan"), lse))


def merge_attention_states_torch(out_a, lse_a, out_b, lse_b):
    """The PyTorch path of ``merge_attention_states`` (CPU tensors without the interpreter, and torch.compile, whose
    inductor fuses it): the same rules, computed in float32, and contiguous results, as the kernel's (elementwise ops
    give their inputs' layout: a transposed lse made both results strided, and ``out.view`` failed on this path
    only)."""
    la, lb = (torch.where(x == float("inf"), float("-inf"), x.float()) for x in (lse_a, lse_b))  # FlashMLA's +inf
    m = torch.maximum(la, lb)
    m_safe = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    w_a, w_b = torch.exp(la - m_safe), torch.exp(lb - m_safe)
    total = w_a + w_b
    inv = torch.where(total > 0, 1.0 / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(total))
    zero = out_a.new_zeros((), dtype=torch.float32)
    a = torch.where((w_a > 0)[..., None], out_a.float() * (w_a * inv)[..., None], zero)
    b = torch.where((w_b > 0)[..., None], out_b.float() * (w_b * inv)[..., None], zero)
    nan = la.isnan() | lb.isnan()
    out = torch.where(nan[..., None], torch.full_like(a, float("nan")), a + b)
    lse = torch.where(total > 0, m_safe + torch.log(torch.where(total > 0, total, torch.ones_like(total))),
                      torch.full_like(m, float("-inf")))
    lse = torch.where(nan, torch.full_like(lse, float("nan")), lse)
    return out.to(out_a.dtype).contiguous(), lse.contiguous()


def _check(out_a, lse_a, out_b, lse_b) -> None:
    _utils.check_tensor("out_a", out_a, None, _utils.FLOAT_DTYPES)
    _utils.check_tensor("out_b", out_b, None, _utils.FLOAT_DTYPES)
    _utils.check_tensor("lse_a", lse_a, None, (torch.float32,))
    _utils.check_tensor("lse_b", lse_b, None, (torch.float32,))
    if out_a.dim() < 2:
        raise ValueError(f"out_a must be [..., H, D] (at least 2 dimensions), got shape {tuple(out_a.shape)}")
    _utils.check_same("out_a", tuple(out_a.shape), "out_b", tuple(out_b.shape), "shape")
    _utils.check_same("out_a", out_a.dtype, "out_b", out_b.dtype, "dtype")
    for name, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
        if tuple(lse.shape) != tuple(out_a.shape[:-1]):
            raise ValueError(f"{name} must have out_a's shape without its last dimension, "
                             f"{tuple(out_a.shape[:-1])}, got {tuple(lse.shape)}")
    _utils.check_devices(out_a=out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b)
    _utils.check_no_grad("merge_attention_states", out_a=out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b)


def merge_attention_states(out_a, lse_a, out_b, lse_b, *, return_lse=True):
    """Attention over two disjoint key sets, from the attention over each.

    Args:
        out_a, out_b: ``[..., H, D]`` outputs over key sets A and B (any leading shape, e.g. ``mla_decode``'s
            ``[B, S_q, H, R]`` or ``[B, S_q, H, D_v]``, ``mla_prefill``'s ``[T, H, R]``); bf16, fp16 or fp32, the
            same shape and dtype.
        lse_a, lse_b: ``[..., H]`` float32, natural log of each softmax sum (``return_lse=True``); -inf for a row
            that saw no key (or +inf, FlashMLA's mark of one, which ``flash_mla_with_kvcache`` returns). Laid out as
            the outputs' rows: ``mla_decode``'s lse is ``[B, S_q, H]`` already, ``flash_mla_with_kvcache``'s is
            ``[B, H, S_q]`` (FlashMLA's layout): pass ``lse.transpose(1, 2)`` (where H == S_q the shapes would
            agree and the heads be mixed up silently).
        return_lse: also return the merged lse (natural log): merged again with a third state, it gives the
            attention over all three.

    Returns ``out`` (``out_a``'s shape and dtype) and, with ``return_lse``, ``lse`` float32, contiguous on every
    path whatever the inputs' layouts. A row that saw no key in either gives zeros and -inf; a row one state has no
    key for is the other's output (even if that state's output holds NaN there); a NaN lse makes the row's output
    and lse NaN. The sums are taken in float32. One Triton kernel
    on a GPU (and under the interpreter) for rows up to ``MAX_WIDTH`` wide (one program holds a row); a PyTorch path
    on the CPU, inside ``torch.compile`` (which fuses it), for wider rows and past ``MAX_ROWS`` rows.
    The value projection is linear, so merging before or after ``w_uv`` gives the same result up to rounding.
    """
    _check(out_a, lse_a, out_b, lse_b)
    return_lse = _utils.check_flag("return_lse", return_lse)
    width = out_a.shape[-1]
    rows = out_a.numel() // max(width, 1)
    if torch.compiler.is_compiling() or not _utils.use_triton(out_a) or width > MAX_WIDTH or rows > MAX_ROWS:
        out, lse = merge_attention_states_torch(out_a, lse_a, out_b, lse_b)
        return (out, lse) if return_lse else out
    out = torch.empty_like(out_a, memory_format=torch.contiguous_format)
    lse = torch.empty(out_a.shape[:-1], dtype=torch.float32, device=out_a.device) if return_lse else None
    if rows and width:
        with _utils.launch_device(out_a.device):
            _launcher.launch(_merge_states_kernel, _combine_grid(rows),
                             out_a.contiguous(), lse_a.contiguous(), out_b.contiguous(), lse_b.contiguous(), out,
                             lse if lse is not None else lse_a, rows, width,
                             BLOCK_D=max(16, _utils.next_pow2(width)), STORE_LSE=return_lse,
                             num_warps=4 if width >= 256 else 1)
    elif lse is not None:  # no value columns: the lse alone
        lse = merge_attention_states_torch(out_a, lse_a, out_b, lse_b)[1]
    return (out, lse) if return_lse else out


def apply_sink(out: torch.Tensor, lse: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    """Attention with a sink: a learned logit ``sink[h]`` per head joins each query's softmax as one more key whose
    value is zero (gpt-oss's, Hy4's, FlashMLA's ``attn_sink``). That is the merge (``merge_attention_states``) of
    the attention ``out [..., H, D]`` (its ``lse [..., H]``, natural log) with a state of lse ``sink`` and output 0:
    ``out * exp(lse) / (exp(lse) + exp(sink))``, computed in float32 as ``sigmoid(lse - sink)`` and rounded once
    to ``out``'s dtype. A sink of +inf gives zeros, one of -inf leaves ``out`` as it is (also where a row saw no
    key: its out is already zeros); a NaN sink gives its head NaN, as the formula does. ``sink [H]``: any float
    dtype, on any device (moved to ``lse``'s); checked by the caller. The lse of the attention with its sink would
    be ``logaddexp(lse, sink)``; the callers return the one without it (FlashMLA's ``attn_sink`` does the same)."""
    sink = sink.to(device=lse.device, dtype=torch.float32)
    gap = lse - sink  # [..., H]
    # -inf - -inf (a row with no key and no sink: its out is zeros) is the only NaN not of the formula's
    weight = torch.sigmoid(gap.masked_fill(torch.isneginf(lse) & torch.isneginf(sink), float("-inf")))
    return (out.float() * weight[..., None]).to(out.dtype)
