"""Hopper path of the absorbed MLA attention written in Gluon (``triton.experimental.gluon``): explicit warpgroup
MMAs (wgmma) fed from shared memory, TMA copies tracked by mbarriers, and a two-stage ring of cache tiles.

The same attention, grid and outputs as ``decode._mla_attn_kernel`` and ``decode_tma._mla_attn_tma_kernel``
(split partials and lse included), for the calls the TMA kernel serves (``page_size % 64 == 0``, bf16/fp16,
``decode_tma.tma_supported``), with 64-row blocks: every head of a 64-head block (or the S_q x H rows of a
sequence) shares each cache tile. Why it should beat the plain Triton loops, which stop near 270 TFLOP/s at 128
heads on an H100 (bench/results/h100-2026-11-22/: TMA probe 267, pointer loads 213):

* The query block lives in shared memory, not registers: the two 64 x 256 fp32 accumulators of the 512-wide
  output (128 registers a thread over 8 warps) are then the only large register state, where Triton's compiler
  kept the 64 x 576 query in registers too and spilled.
* Two warpgroups split every product by columns (``warps_per_cta = [4, 2]``): each computes half of the scores'
  columns, and half of each output half, as in FlashMLA's kernel; the softmax's row max and sum are reduced
  across the two, and the bf16 probabilities go through shared memory so each warpgroup's wgmma reads all of them.
* The ring of ``NUM_STAGES`` cache tiles is filled by TMA copies on mbarriers, the next tile's copy in flight
  while the current one is multiplied; a stage is refilled only after a CTA barrier shows both warpgroups are
  done reading it.

One cache tile is ``BLOCK_N = 64`` consecutive rows of one page: three TMA boxes (latent low and high halves,
256 wide at most, and the rope part), one block-table read per tile. A whole-page load also reads the unused tail
of a sequence's last page, which may hold anything (NaN-poisoned in the tests): on the tile that crosses the end,
those rows are zeroed in shared memory before any product reads them (masking only their scores would leave
0 x NaN = NaN in P.V).

Gluon kernels do not run under Triton's CPU interpreter. This one is compiled for sm_90 in CI
(``mla_kernels/_compile.py``) with triton 3.9 and checked to compile with triton 3.6 (the GPU machine's), and is
parity-tested natively by ``tests/test_decode_gluon.py`` on a Hopper GPU. It is used only when a config asks for
it (``GLUON: True``, as ``bench.decode``'s ``mla_decode[gluon]`` provider and ``bench.autotune`` do) until a GPU
session has shown it correct and faster; ``decode._hopper_kernel`` is the one dispatch.
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ._utils import H100_SHARED_BYTES
from .decode import LN2_C, _key_range, _query_rows  # @triton.jit helpers of scalars only: Gluon inlines them
from .decode_tma import kernel_args, tma_supported

# Gluon's API moved between triton 3.6 (the GPU machine's) and 3.9 (CI's): the TMA load and the CTA barrier were
# renamed. Both are builtins, resolved when a kernel is compiled. A Gluon with neither name is no Gluon for this
# kernel: an ImportError, which every optional use of this module expects.
try:
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
except AttributeError as exc:  # pragma: no cover - a triton between or beyond the checked ones
    raise ImportError(f"this triton's Gluon lacks what decode_gluon calls: {exc}") from exc

BLOCK_M = 64  # one wgmma row block: 4 warps x 16 rows per warpgroup
BLOCK_N = 64
NUM_WARPS = 8  # two warpgroups, splitting every product by columns
NUM_STAGES = 2
GLUON_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}
SHARED_LIMIT = H100_SHARED_BYTES - 2048  # a Hopper block's 227 KiB, less room for the compiler's reduction scratch


def gluon_config() -> dict:
    """The only tiles this kernel has: 64 x 64, 8 warps, a 2-stage ring. ``GLUON: True`` asks ``decode._launch``
    for it. Untimed: a GPU session's ``bench.decode`` (provider ``mla_decode[gluon]``) decides whether it wins."""
    return dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=NUM_WARPS, num_stages=NUM_STAGES, GLUON=True)


def gluon_shared_bytes(d_latent: int, d_rope: int, elem_bytes: int = 2) -> int:
    """Shared memory of the explicit buffers: the query block, ``NUM_STAGES`` cache tiles and the probability
    tile (the compiler adds a few hundred bytes of reduction scratch and the mbarriers)."""
    width = d_latent + d_rope
    return (BLOCK_M * width + NUM_STAGES * BLOCK_N * width + BLOCK_M * BLOCK_N) * elem_bytes


def gluon_supported(q_nope: torch.Tensor, kv_cache: torch.Tensor, pe_cache: torch.Tensor) -> bool:
    """Can this kernel serve the call? From shapes, strides and pointers only (no host sync): the TMA kernel's
    layout conditions at 64-token tiles, a latent of 256 or 512 (each warpgroup's half of each 128- or 256-wide
    latent half then starts on a 128-byte swizzle unit), and buffers that fit an H100 block's shared memory
    (R = 512, P = 64 in bf16: 229376 bytes)."""
    if not tma_supported(q_nope, kv_cache, pe_cache, BLOCK_N):
        return False
    d_latent, d_rope = kv_cache.shape[2], pe_cache.shape[2]
    if (d_latent // 2) % 128:  # R 256 or 512: narrower halves split their 128-byte swizzle units between the two
        return False           # warpgroups' P.V columns, which compiles but no GPU test has covered yet
    return gluon_shared_bytes(d_latent, d_rope, kv_cache.element_size()) <= SHARED_LIMIT


@functools.lru_cache(maxsize=None)
def layouts(d_latent: int, d_rope: int, dtype: torch.dtype) -> dict:
    """The kernel's layouts, as constexpr arguments (the same objects for every launch of a shape, so the JIT's
    cache key is stable). Scores ``[64, 64]`` and each output half ``[64, R/2]`` are wgmma accumulators over
    ``warps_per_cta [4, 2]``: the 4 warps of a warpgroup take 16 rows each, the two warpgroups half the columns,
    with the widest instruction that tiles their half (``n`` up to 256, a multiple of 8)."""
    gdt = GLUON_DTYPES[dtype]
    d_half = d_latent // 2
    k_instr = 256 // gdt.primitive_bitwidth  # 16 for 16-bit inputs

    def mma(n_cols: int):
        n = min(256, n_cols // 2)
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, n, k_instr])

    def smem(shape):
        return gl.NVMMASharedLayout.get_default_for(shape, gdt)

    return dict(
        S_LAYOUT=mma(BLOCK_N), O_LAYOUT=mma(d_half),
        Q_LAYOUT=gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8], warps_per_cta=[NUM_WARPS, 1],
                                  order=[1, 0]),
        LAT_SMEM=smem([BLOCK_N, d_half]), PE_SMEM=smem([BLOCK_N, d_rope]), P_SMEM=smem([BLOCK_M, BLOCK_N]),
    )


def descriptor(cache: torch.Tensor, box_cols: int, layout) -> TensorDescriptor:
    """A TMA descriptor over ``cache [num_blocks, page, width]`` seen as ``[num_blocks * page, width]``, boxes of
    ``BLOCK_N`` rows x ``box_cols`` (``tma_supported`` has checked the strides and alignment)."""
    num_blocks, page, width = cache.shape
    return TensorDescriptor(cache, [num_blocks * page, width], [cache.stride(1), 1], [BLOCK_N, box_cols], layout)


@gluon.jit
def _row_info(pid_m, num_rows, num_heads, seqlen, seq_q, BLOCK: gl.constexpr, LAYOUT: gl.constexpr):
    """Rows of row block ``pid_m`` in ``LAYOUT`` (a 1-D slice layout): ``(row_mask, tok, head, q_pos)``, as
    ``decode._row_ids``: a row is a (new token, head) pair, ``q_pos`` its token's position in the cache."""
    rows = pid_m * BLOCK + gl.arange(0, BLOCK, layout=LAYOUT)
    tok = rows // num_heads
    return rows < num_rows, tok, rows % num_heads, seqlen - seq_q + tok


@gluon.jit
def _issue_tile(kv_desc, pe_desc, bt_row, start, bar, lat_lo, lat_hi, pe_buf,
                PAGE_SIZE: gl.constexpr, D_HALF: gl.constexpr, TILE_BYTES: gl.constexpr):
    """Start the TMA copies of the cache tile at position ``start`` (page-aligned in tiles) into one ring stage;
    ``bar`` flips when all ``TILE_BYTES`` have landed."""
    block_id = gl.load(bt_row + start // PAGE_SIZE)
    row0 = (block_id * PAGE_SIZE + start % PAGE_SIZE).to(gl.int32)
    mbarrier.expect(bar, TILE_BYTES)
    _tma_load(kv_desc, [row0, 0], bar, lat_lo)
    _tma_load(kv_desc, [row0, D_HALF], bar, lat_hi)
    _tma_load(pe_desc, [row0, 0], bar, pe_buf)


@gluon.jit
def _zero_rows_from(buf, first_bad, BLOCK: gl.constexpr, LAYOUT: gl.constexpr):
    """Zero rows ``first_bad..BLOCK-1`` of a shared ``[BLOCK, *]`` tile (generic proxy; the caller fences)."""
    tile = buf.load(LAYOUT)
    keep = gl.arange(0, BLOCK, layout=gl.SliceLayout(1, LAYOUT)) < first_bad
    buf.store(gl.where(keep[:, None], tile, gl.zeros_like(tile)))


@gluon.jit
def _mla_attn_gluon_kernel(
    Q_NOPE, Q_PE, kv_desc, pe_desc, BLOCK_TABLE, SEQLENS, CU_SEQLENS_Q,
    OUT, LSE, OUT_PART, LSE_PART,
    sm_scale_log2,
    num_heads, s_q, split_len, total_rows,
    stride_qn_b, stride_qn_s, stride_qn_h,
    stride_qp_b, stride_qp_s, stride_qp_h,
    stride_bt_b,
    D_LATENT: gl.constexpr, D_ROPE: gl.constexpr, PAGE_SIZE: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
    CAUSAL: gl.constexpr, VARLEN: gl.constexpr, SPLIT: gl.constexpr, STORE_LSE: gl.constexpr,
    S_LAYOUT: gl.constexpr, O_LAYOUT: gl.constexpr, Q_LAYOUT: gl.constexpr,
    LAT_SMEM: gl.constexpr, PE_SMEM: gl.constexpr, P_SMEM: gl.constexpr,
):
    D_HALF: gl.constexpr = D_LATENT // 2
    dtype: gl.constexpr = Q_NOPE.dtype.element_ty
    TILE_BYTES: gl.constexpr = BLOCK_N * (D_LATENT + D_ROPE) * (dtype.primitive_bitwidth // 8)
    pid_m = gl.program_id(0)
    pid_b = gl.program_id(1).to(gl.int64)
    pid_split = gl.program_id(2)

    tok_start, seq_q, q_nope_base, q_pe_base, num_rows = _query_rows(
        Q_NOPE, Q_PE, CU_SEQLENS_Q, pid_b, s_q, num_heads, stride_qn_b, stride_qn_s, stride_qp_b, stride_qp_s,
        VARLEN)
    if pid_m * BLOCK_M >= num_rows:
        return
    seqlen = gl.load(SEQLENS + pid_b).to(gl.int32)  # int64 lengths too: the ring's stage index must be int32

    # keys this program reads: its split, within the sequence, and (causal) up to its last row's position
    n_start = pid_split * split_len  # a multiple of BLOCK_N: every tile starts page-aligned
    n_end = _key_range(pid_m, n_start, split_len, seqlen, seq_q, num_rows, num_heads, BLOCK_M, CAUSAL)
    num_tiles = gl.maximum(n_end - n_start + BLOCK_N - 1, 0) // BLOCK_N

    # shared memory: the query block once, a ring of cache tiles, the probabilities, one mbarrier per stage
    q_lo_s = gl.allocate_shared_memory(dtype, [BLOCK_M, D_HALF], LAT_SMEM)
    q_hi_s = gl.allocate_shared_memory(dtype, [BLOCK_M, D_HALF], LAT_SMEM)
    q_pe_s = gl.allocate_shared_memory(dtype, [BLOCK_M, D_ROPE], PE_SMEM)
    lat_lo = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, D_HALF], LAT_SMEM)
    lat_hi = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, D_HALF], LAT_SMEM)
    pe_buf = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, D_ROPE], PE_SMEM)
    p_s = gl.allocate_shared_memory(dtype, [BLOCK_M, BLOCK_N], P_SMEM)
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for j in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(j), count=1)

    bt_row = BLOCK_TABLE + pid_b * stride_bt_b
    for j in gl.static_range(NUM_STAGES):  # the first tiles' copies start before the query is staged
        if j < num_tiles:
            _issue_tile(kv_desc, pe_desc, bt_row, n_start + j * BLOCK_N, ready.index(j), lat_lo.index(j),
                        lat_hi.index(j), pe_buf.index(j), PAGE_SIZE, D_HALF, TILE_BYTES)

    # the query block: pointer loads (any strides; rows past the sequence's are zero), stored for wgmma
    q_mask, q_tok, q_head, _ = _row_info(pid_m, num_rows, num_heads, seqlen, seq_q, BLOCK_M,
                                         gl.SliceLayout(1, Q_LAYOUT))
    offs_h = gl.arange(0, D_HALF, layout=gl.SliceLayout(0, Q_LAYOUT))
    offs_p = gl.arange(0, D_ROPE, layout=gl.SliceLayout(0, Q_LAYOUT))
    q_tok64, q_head64 = q_tok.to(gl.int64), q_head.to(gl.int64)  # 64-bit query offsets, as the portable kernel's
    q_rows = q_nope_base + q_tok64[:, None] * stride_qn_s + q_head64[:, None] * stride_qn_h
    q_lo_s.store(gl.load(q_rows + offs_h[None, :], mask=q_mask[:, None], other=0.0))
    q_hi_s.store(gl.load(q_rows + D_HALF + offs_h[None, :], mask=q_mask[:, None], other=0.0))
    q_pe_s.store(gl.load(q_pe_base + q_tok64[:, None] * stride_qp_s + q_head64[:, None] * stride_qp_h + offs_p[None, :],
                         mask=q_mask[:, None], other=0.0))
    fence_async_shared()  # generic-proxy stores, then wgmma (async proxy) reads
    _cta_barrier()

    row_s: gl.constexpr = gl.SliceLayout(1, S_LAYOUT)
    row_o: gl.constexpr = gl.SliceLayout(1, O_LAYOUT)
    _, _, _, q_pos = _row_info(pid_m, num_rows, num_heads, seqlen, seq_q, BLOCK_M, row_s)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_s)
    l_i = gl.zeros([BLOCK_M], gl.float32, row_s)
    acc_lo = gl.zeros([BLOCK_M, D_HALF], gl.float32, O_LAYOUT)
    acc_hi = gl.zeros([BLOCK_M, D_HALF], gl.float32, O_LAYOUT)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, S_LAYOUT)
    offs_n0 = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, S_LAYOUT))

    for i in range(num_tiles):
        st = i % NUM_STAGES
        start = n_start + i * BLOCK_N
        mbarrier.wait(ready.index(st), (i // NUM_STAGES) & 1)
        k_lo = lat_lo.index(st)
        k_hi = lat_hi.index(st)
        k_pe = pe_buf.index(st)
        if start + BLOCK_N > seqlen:  # the tile crossing the sequence's end: zero the page's unused tail rows
            _zero_rows_from(k_lo, seqlen - start, BLOCK_N, Q_LAYOUT)
            _zero_rows_from(k_hi, seqlen - start, BLOCK_N, Q_LAYOUT)
            fence_async_shared()
            _cta_barrier()

        # scores [BLOCK_M, BLOCK_N] = q_lo . k_lo^T + q_hi . k_hi^T + q_pe . k_pe^T
        s = warpgroup_mma(q_lo_s, k_lo.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma(q_hi_s, k_hi.permute((1, 0)), s, is_async=True)
        s = warpgroup_mma(q_pe_s, k_pe.permute((1, 0)), s, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=[s])

        offs_n = start + offs_n0
        visible = offs_n[None, :] < n_end
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= q_pos[:, None])
        qk = gl.where(visible, s * sm_scale_log2, float("-inf"))
        # online softmax in log2 units (decode._online_softmax_step); a row may have seen no visible key yet
        m_new = gl.maximum(m_i, gl.max(qk, 1))
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_safe)
        p = gl.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new

        p_s.store(p.to(dtype))  # each warpgroup wrote half the columns; both read all of them
        alpha_o = gl.convert_layout(alpha, row_o)
        acc_lo = acc_lo * alpha_o[:, None]
        acc_hi = acc_hi * alpha_o[:, None]
        fence_async_shared()
        _cta_barrier()
        acc_lo = warpgroup_mma(p_s, k_lo, acc_lo, is_async=True)
        acc_hi = warpgroup_mma(p_s, k_hi, acc_hi, is_async=True)
        acc_lo, acc_hi = warpgroup_mma_wait(num_outstanding=0, deps=[acc_lo, acc_hi])

        _cta_barrier()  # both warpgroups are done with this stage and with p_s: refill the stage
        if i + NUM_STAGES < num_tiles:
            _issue_tile(kv_desc, pe_desc, bt_row, start + NUM_STAGES * BLOCK_N, ready.index(st), k_lo, k_hi, k_pe,
                        PAGE_SIZE, D_HALF, TILE_BYTES)

    for j in gl.static_range(NUM_STAGES):
        mbarrier.invalidate(ready.index(j))

    # normalise and store (decode._softmax_finish): rows that saw no key get zeros and lse -inf
    has_key = l_i != 0.0  # a NaN l_i (NaN in a used cache slot) stays NaN, as in _softmax_finish
    safe_l = gl.where(has_key, l_i, 1.0)
    lse_log2 = gl.where(has_key, m_i + gl.log2(safe_l), float("-inf"))
    inv_l = gl.convert_layout(1.0 / safe_l, row_o)
    out_lo = acc_lo * inv_l[:, None]
    out_hi = acc_hi * inv_l[:, None]

    o_mask, o_tok, o_head, _ = _row_info(pid_m, num_rows, num_heads, seqlen, seq_q, BLOCK_M, row_o)
    out_rows = (tok_start + o_tok) * num_heads + o_head  # row of the contiguous [tokens * num_heads] output
    offs_c = gl.arange(0, D_HALF, layout=gl.SliceLayout(0, O_LAYOUT))
    # recomputed rather than kept from before the loop, where only q_pos is needed: fewer registers live across it
    s_mask, s_tok, s_head, _ = _row_info(pid_m, num_rows, num_heads, seqlen, seq_q, BLOCK_M, row_s)
    lse_rows = (tok_start + s_tok) * num_heads + s_head
    if SPLIT:  # partials: [num_splits, total_rows, D_LATENT] fp32 and [num_splits, total_rows] in log2 units
        part = OUT_PART + (pid_split.to(gl.int64) * total_rows + out_rows)[:, None] * D_LATENT + offs_c[None, :]
        # a row that saw no key here (lse -inf) weighs 0 in the combine, which never reads its partial: not
        # stored, as in the portable and TMA kernels
        keyed = o_mask & gl.convert_layout(has_key, row_o)
        gl.store(part, out_lo, mask=keyed[:, None])
        gl.store(part + D_HALF, out_hi, mask=keyed[:, None])
        gl.store(LSE_PART + pid_split.to(gl.int64) * total_rows + lse_rows, lse_log2, mask=s_mask)
    else:
        dst = OUT + out_rows[:, None] * D_LATENT + offs_c[None, :]
        gl.store(dst, out_lo.to(dtype), mask=o_mask[:, None])
        gl.store(dst + D_HALF, out_hi.to(dtype), mask=o_mask[:, None])
        if STORE_LSE:
            gl.store(LSE + lse_rows, lse_log2 * LN2_C, mask=s_mask)


def launch_gluon(grid, q_nope, q_pe, kv_cache, pe_cache, block_table, cache_seqlens, cu_seqlens_q,
                 out, lse, out_part, lse_part, sm_scale_log2, heads, seq_q, split_len, total_rows,
                 qn_strides, qp_strides, *, causal, varlen, split, return_lse):
    """Launch ``_mla_attn_gluon_kernel`` with ``decode._launch``'s prepared arguments (``gluon_supported``
    holds, and the split length is a multiple of ``BLOCK_N``)."""
    d_latent, d_rope, page = kv_cache.shape[2], pe_cache.shape[2], kv_cache.shape[1]
    lay = layouts(d_latent, d_rope, kv_cache.dtype)
    _mla_attn_gluon_kernel[grid](
        *kernel_args(q_nope, q_pe, descriptor(kv_cache, d_latent // 2, lay["LAT_SMEM"]),
                     descriptor(pe_cache, d_rope, lay["PE_SMEM"]), block_table, cache_seqlens, cu_seqlens_q, out, lse,
                     out_part, lse_part, sm_scale_log2, heads, seq_q, split_len, total_rows, qn_strides, qp_strides,
                     varlen),
        D_LATENT=d_latent, D_ROPE=d_rope, PAGE_SIZE=page,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, NUM_STAGES=NUM_STAGES,
        CAUSAL=causal, VARLEN=varlen, SPLIT=split, STORE_LSE=return_lse,
        **lay,
        num_warps=NUM_WARPS,
    )
