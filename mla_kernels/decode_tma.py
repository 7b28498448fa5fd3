"""Hopper path of the absorbed MLA attention: cache tiles loaded through tensor descriptors (TMA).

The same attention as ``decode._mla_attn_kernel`` (same grid, same outputs, same split partials), for the
common case where a tile of ``BLOCK_N`` cache positions never crosses a page (``page_size % BLOCK_N == 0``):
each tile is then ``BLOCK_N`` consecutive rows of the cache, one block id per tile, and the whole tile is one
TMA copy instead of ``BLOCK_N`` gathered row loads. A TMA box is at most 256 elements wide, so the latent is
loaded as two halves of ``D_LATENT / 2`` and the fp32 accumulator is kept as two halves too:

    scores = q_lo . kv_lo^T + q_hi . kv_hi^T + q_pe . pe^T       # [BLOCK_M, BLOCK_N]
    acc_lo += softmax(scores) . kv_lo ; acc_hi += softmax(scores) . kv_hi

A whole-page load also reads the unused tail of a sequence's last page; those rows are zeroed in registers
(not only their scores: the tail may hold NaN, and 0 x NaN is NaN in the P.V product).

Why: on an H100 (triton 3.6) a stripped probe of this loop ran 267 TFLOP/s at B128 L4096 H128 against 213 for
pointer loads, and 2.25 TB/s at 16 heads (bench/results/h100-2026-11-22/h100-2026-11-22-tma-probe.json). This kernel
itself has not run on a GPU yet: it is parity-tested under the interpreter and compiled for sm_90 in CI, and is
used only when a config asks for it (``TMA: True``) until a GPU session has timed it.

Descriptors are built on the host (``triton.tools.tensor_descriptor.TensorDescriptor``), so no device-side
scratch allocator (``triton.set_allocator``) is needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launcher, _utils
from ._convert import to_dtype
from .decode import LN2_C, _key_range, _online_softmax_step, _query_rows, _row_ids, _softmax_finish

try:  # triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: the portable kernel serves every call
    TensorDescriptor = None

MAX_BOX = 256  # elements per dimension of one TMA box
TMA_DTYPES = (torch.bfloat16, torch.float16)


def tma_supported(q_nope: torch.Tensor, kv_cache: torch.Tensor, pe_cache: torch.Tensor, block_n: int) -> bool:
    """Can the TMA kernel serve this call? Decided from shapes, strides and pointers only (no host sync).

    Needs: triton's host tensor descriptors; bf16/fp16; pages made of whole tiles; each latent half and the
    rope part (not empty) at most one TMA box wide, and each half at least 16 wide (a dot's K); every block laid out as
    ``page`` consecutive token rows (so the cache is one 2-D ``[num_blocks * page, width]`` array, which holds for
    every contiguous cache and every view of one fused ``[..., R+P]`` buffer); 16-byte aligned bases and row
    strides (TMA's rules); row ids in int32.
    """
    if TensorDescriptor is None or kv_cache.dtype not in TMA_DTYPES or q_nope.dtype != kv_cache.dtype:
        return False
    num_blocks, page, d_latent = kv_cache.shape
    if not tma_widths_fit(page, d_latent, pe_cache.shape[2], block_n):
        return False
    if num_blocks * page >= 2**31:
        return False
    elem = kv_cache.element_size()
    for t in (kv_cache, pe_cache):
        if t.stride(0) != page * t.stride(1) or t.stride(2) != 1:
            return False
        if t.data_ptr() % 16 or (t.stride(1) * elem) % 16:
            return False
    return True


def tma_widths_fit(page: int, d_latent: int, d_rope: int, block_n: int) -> bool:
    """The shape part of ``tma_supported``: pages of whole ``block_n`` tiles, each latent half one TMA box at most
    and at least 16 wide, and a rope part of one box at most, not empty. What a tuning sweep, which knows its shapes
    but holds no tensor yet, asks (``_autotune``)."""
    # each latent half is a tl.dot's K, which a GPU needs >= 16 for 16-bit inputs: R = 16 (K = 8) ran under the
    # interpreter and failed Triton's sm_90 compile ("K >= 16"); no rope part (a NoPE layer) is the portable
    # kernel's (no descriptor of width 0)
    return page % block_n == 0 and 16 <= d_latent // 2 <= MAX_BOX and 0 < d_rope <= MAX_BOX


def tma_config(rows_per_seq: int) -> dict:
    """Tiles for this kernel from the H100 TMA probe (h100-2026-11-22-tma-probe.json: a stripped copy of this
    loop, not this kernel): at most 16 rows, 16 x 64 tiles, 8 warps, 3 stages (2.25 TB/s at B128 L4096 H16 with 3
    splits); above, 64 x 64 tiles, 8 warps, 2 stages (267 TFLOP/s at H128 with 1 split). ``TMA: True`` asks
    ``decode._launch`` for this kernel. Pages smaller than 64 need a smaller BLOCK_N (``page % BLOCK_N == 0``)."""
    if rows_per_seq <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, num_warps=8, num_stages=3, TMA=True)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2, TMA=True)


def _descriptor(cache: torch.Tensor, box_cols: int, block_n: int):
    """A 2-D descriptor over ``cache [num_blocks, page, width]`` seen as ``[num_blocks * page, width]``."""
    num_blocks, page, width = cache.shape
    return TensorDescriptor(cache, [num_blocks * page, width], [cache.stride(1), 1], [block_n, box_cols])


@triton.jit
def _mla_attn_tma_kernel(
    Q_NOPE, Q_PE, kv_desc, pe_desc, BLOCK_TABLE, SEQLENS, CU_SEQLENS_Q,
    OUT, LSE, OUT_PART, LSE_PART,
    sm_scale_log2,
    num_heads, s_q, split_len, total_rows,
    stride_qn_b, stride_qn_s, stride_qn_h,
    stride_qp_b, stride_qp_s, stride_qp_h,
    stride_bt_b,
    D_LATENT: tl.constexpr, D_ROPE: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, SPLIT: tl.constexpr, STORE_LSE: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    D_HALF: tl.constexpr = D_LATENT // 2
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_split = tl.program_id(2)

    tok_start, seq_q, q_nope_base, q_pe_base, num_rows = _query_rows(
        Q_NOPE, Q_PE, CU_SEQLENS_Q, pid_b, s_q, num_heads, stride_qn_b, stride_qn_s, stride_qp_b, stride_qp_s,
        VARLEN)
    if pid_m * BLOCK_M >= num_rows:
        return
    seqlen = tl.load(SEQLENS + pid_b)

    row_mask, tok, head, q_pos = _row_ids(pid_m, num_rows, num_heads, seqlen, seq_q, BLOCK_M)
    offs_h = tl.arange(0, D_HALF)
    offs_p = tl.arange(0, D_ROPE)

    tok64, head64 = tok.to(tl.int64), head.to(tl.int64)  # 64-bit query offsets, as the portable kernel's
    q_rows = q_nope_base + tok64[:, None] * stride_qn_s + head64[:, None] * stride_qn_h
    q_lo = tl.load(q_rows + offs_h[None, :], mask=row_mask[:, None], other=0.0)  # [BLOCK_M, D_HALF]
    q_hi = tl.load(q_rows + D_HALF + offs_h[None, :], mask=row_mask[:, None], other=0.0)  # [BLOCK_M, D_HALF]
    q_pe = tl.load(q_pe_base + tok64[:, None] * stride_qp_s + head64[:, None] * stride_qp_h + offs_p[None, :],
                   mask=row_mask[:, None], other=0.0)  # [BLOCK_M, D_ROPE]
    if DOT_FP32:
        q_lo = q_lo.to(tl.float32)
        q_hi = q_hi.to(tl.float32)
        q_pe = q_pe.to(tl.float32)

    n_start = pid_split * split_len  # split_len is a multiple of BLOCK_N, so every tile starts page-aligned
    n_end = _key_range(pid_m, n_start, split_len, seqlen, seq_q, num_rows, num_heads, BLOCK_M, CAUSAL)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_lo = tl.zeros([BLOCK_M, D_HALF], dtype=tl.float32)
    acc_hi = tl.zeros([BLOCK_M, D_HALF], dtype=tl.float32)
    bt_row = BLOCK_TABLE + pid_b * stride_bt_b

    for start in range(n_start, n_end, BLOCK_N):
        block_id = tl.load(bt_row + start // PAGE_SIZE)
        row0 = (block_id * PAGE_SIZE + start % PAGE_SIZE).to(tl.int32)  # first cache row of the tile
        offs_n = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] cache positions
        n_mask = offs_n < n_end
        kv_lo = kv_desc.load([row0, 0])  # [BLOCK_N, D_HALF]
        kv_hi = kv_desc.load([row0, D_HALF])  # [BLOCK_N, D_HALF]
        pe = pe_desc.load([row0, 0])  # [BLOCK_N, D_ROPE]
        kv_lo = tl.where(n_mask[:, None], kv_lo, 0.0)  # rows past the end are the tail of the last page
        kv_hi = tl.where(n_mask[:, None], kv_hi, 0.0)
        if DOT_FP32:
            kv_lo = kv_lo.to(tl.float32)
            kv_hi = kv_hi.to(tl.float32)
            pe = pe.to(tl.float32)

        qk = tl.dot(q_lo, tl.trans(kv_lo))
        qk = tl.dot(q_hi, tl.trans(kv_hi), qk)
        qk = tl.dot(q_pe, tl.trans(pe), qk)  # [BLOCK_M, BLOCK_N]
        qk = qk * sm_scale_log2
        visible = n_mask[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= q_pos[:, None])
        qk = tl.where(visible, qk, float("-inf"))

        p, alpha, m_i, l_i = _online_softmax_step(qk, m_i, l_i)
        p = to_dtype(p, Q_NOPE.dtype.element_ty)  # P rounded to the cache dtype, as the portable kernel does
        if DOT_FP32:
            p = p.to(tl.float32)
        acc_lo = tl.dot(p, kv_lo, acc_lo * alpha[:, None])  # [BLOCK_M, D_HALF]
        acc_hi = tl.dot(p, kv_hi, acc_hi * alpha[:, None])

    inv_l, lse_log2 = _softmax_finish(m_i, l_i)
    out_lo = acc_lo * inv_l[:, None]
    out_hi = acc_hi * inv_l[:, None]
    out_rows = (tok_start + tok) * num_heads + head  # row of the contiguous [tokens * num_heads] output
    if SPLIT:  # partials: [num_splits, total_rows, D_LATENT] fp32 and [num_splits, total_rows] in log2 units
        part = OUT_PART + (pid_split.to(tl.int64) * total_rows + out_rows)[:, None] * D_LATENT + offs_h[None, :]
        # a row that saw no key here (lse -inf) weighs 0 in the combine, which never reads its partial: as in the
        # portable kernel, its lse alone is written
        seen = (row_mask & (lse_log2 != float("-inf")))[:, None]
        tl.store(part, out_lo, mask=seen)
        tl.store(part + D_HALF, out_hi, mask=seen)
        tl.store(LSE_PART + pid_split.to(tl.int64) * total_rows + out_rows, lse_log2, mask=row_mask)
    else:
        dst = OUT + out_rows[:, None] * D_LATENT + offs_h[None, :]
        tl.store(dst, to_dtype(out_lo, OUT.dtype.element_ty), mask=row_mask[:, None])
        tl.store(dst + D_HALF, to_dtype(out_hi, OUT.dtype.element_ty), mask=row_mask[:, None])
        if STORE_LSE:
            tl.store(LSE + out_rows, lse_log2 * LN2_C, mask=row_mask)


def kernel_args(q_nope, q_pe, kv_desc, pe_desc, block_table, cache_seqlens, cu_seqlens_q, out, lse, out_part, lse_part,
                sm_scale_log2, heads, seq_q, split_len, total_rows, qn_strides, qp_strides, varlen) -> tuple:
    """The runtime arguments of this kernel and of ``decode_gluon``'s, which take the same ones in the same order
    (absent outputs and ``cu_seqlens_q`` replaced by a dummy pointer)."""
    dummy = cache_seqlens
    return (q_nope, q_pe, kv_desc, pe_desc, block_table, cache_seqlens, cu_seqlens_q if varlen else dummy,
            out, lse if lse is not None else dummy, out_part, lse_part, sm_scale_log2, heads, seq_q, split_len,
            total_rows, *qn_strides, *qp_strides, block_table.stride(0))


def launch_tma(grid, q_nope, q_pe, kv_cache, pe_cache, block_table, cache_seqlens, cu_seqlens_q,
               out, lse, out_part, lse_part, sm_scale_log2, heads, seq_q, split_len, total_rows,
               qn_strides, qp_strides, *, causal, varlen, split, return_lse, cfg):
    """Launch ``_mla_attn_tma_kernel`` with ``decode._launch``'s prepared arguments (``tma_supported`` holds)."""
    d_latent, d_rope, page = kv_cache.shape[2], pe_cache.shape[2], kv_cache.shape[1]
    block_n = cfg["BLOCK_N"]
    _launcher.launch(_mla_attn_tma_kernel, grid,
        *kernel_args(q_nope, q_pe, _descriptor(kv_cache, d_latent // 2, block_n), _descriptor(pe_cache, d_rope, block_n),
                     block_table, cache_seqlens, cu_seqlens_q, out, lse, out_part, lse_part, sm_scale_log2, heads,
                     seq_q, split_len, total_rows, qn_strides, qp_strides, varlen),
        D_LATENT=d_latent, D_ROPE=d_rope, PAGE_SIZE=page,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=block_n,
        CAUSAL=causal, VARLEN=varlen, SPLIT=split, STORE_LSE=return_lse,
        DOT_FP32=_utils.interpreting(),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
