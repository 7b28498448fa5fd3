"""MLA prefill over a paged latent cache: ragged batches of new tokens on top of cached history.

Two ways to compute the same attention, and a call that picks between them:

absorbed (``mla_prefill``)
    The query is moved into latent space (q_nope @ W_UK) and attends directly over the cached
    latent, as decode does; the output, in latent space, is moved out through W_UV. The kernel is
    decode's ``_mla_attn_kernel`` with its ``VARLEN`` flag (rows given by ``cu_seqlens_q``).
    Cost: 2 (R + P + R) FLOP per head per (query, key) pair; no per-key work.

expanded (``_mla_expanded_kernel``)
    Each sequence's latent (history + new) is gathered through the block table (``_gather_latent_kernel``, which
    also dequantizes an fp8 cache) and expanded by one GEMM through kv_b_proj into per-head K_nope and V; then ordinary causal varlen flash attention
    with the score q_nope . k_nope + q_pe . k_pe, where k_pe (shared by all heads) is read straight
    from the paged pe_cache. Cost: 2 (D_nope + P + D_v) FLOP per head per pair, plus
    2 R H (D_nope + D_v) FLOP per key for the expansion.

``mla_prefill_attention`` takes the raw (not absorbed) query and kv_b_proj's weight and chooses by
``choose_prefill_path``, a time model with launch costs and measured rates (``_prefill_cost``): short new
segments over long histories and tiny batches favour the absorbed form, long prompts the expanded one.
"""

from __future__ import annotations

import itertools
import math
import numbers

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from . import _prefill_cost as _cost
from . import decode as _decode
from . import _launcher, _utils
from ._convert import to_dtype
from . import _tuning
from .cache import dequantize_fp8_torch
from .merge import apply_sink
from .decode import (LN2_C, LOG2E, _attend_torch, _check_lengths_cpu, _dequant_fp8, _fit_tiles, _launch,
                     _online_softmax_step, _project_v, _softmax_probs)
from .decode import _check_split_tokens as _check_decode_split_tokens

PATH_OPTIONS = ("auto", "absorbed", "expanded")

# The path choice is a time model with launch costs (``_prefill_cost``): its constants come from the GPU's
# config file (``_tuning.constant``), else the H100-fitted defaults there. Kept for callers of the old FLOP-only
# model: the H100 fit's ratio of the absorbed attention kernel's achieved FLOP/s to the expanded one's.
ABSORBED_RELATIVE_SPEED = _cost.DEFAULTS["prefill_absorbed_tflops"] / _cost.DEFAULTS["prefill_expanded_tflops"]


# --------------------------------------------------------------------------------------------
# cost model
# --------------------------------------------------------------------------------------------


def attended_pairs(new_lens, cache_lens, causal=True) -> int:
    """(query, key) pairs attended over the batch: sum_b n_b h_b + n_b (n_b + 1) / 2 when causal
    (history h_b = cache_lens[b] - n_b), sum_b n_b L_b otherwise. Plain Python ints in, int out."""
    total = 0
    for n, length in zip(new_lens, cache_lens):
        n, length = int(n), int(length)
        total += n * (length - n) + n * (n + 1) // 2 if causal else n * length
    return total


def prefill_flops(new_lens, cache_lens, heads, d_latent, d_rope, d_nope, d_v, causal=True) -> dict:
    """FLOPs of the two prefill paths for one batch.

    absorbed: 2 (R + P + R) per head per pair, plus absorbing the queries (2 T H D_nope R) and projecting
        the outputs (2 T H R D_v);
    expanded: 2 (D_nope + P + D_v) per head per pair, plus expanding every cached key through kv_b_proj
        (2 L H R (D_nope + D_v), L = sum of cache_lens).

    Per pair the absorbed form costs 2 (2R - D_nope - D_v) more per head. Per token, absorbing a query and
    projecting its output costs what expanding one key does, 2 R (D_nope + D_v) per head, so the expanded path
    pays extra only for the history keys. By FLOPs alone it wins once the batch attends more than
    R (D_nope + D_v) / (2R - D_nope - D_v) pairs per history key: 170.7 at DeepSeek's widths (R 512,
    D_nope = D_v = 128), whatever the head count. Without history it always wins; n new tokens over a long
    history need n > ~171. ``choose_prefill_path`` weighs this by measured speeds and launch costs.
    """
    causal = _utils.check_flag("causal", causal)
    new_lens, cache_lens = _check_cost_inputs(new_lens, cache_lens, heads=heads, d_latent=d_latent, d_rope=d_rope,
                                              d_nope=d_nope, d_v=d_v)
    pairs = attended_pairs(new_lens, cache_lens, causal)
    tokens = sum(new_lens)
    keys = sum(cache_lens)
    absorbed_attn = 2 * heads * pairs * (2 * d_latent + d_rope)
    absorbed_proj = 2 * tokens * heads * d_latent * (d_nope + d_v)
    expanded_attn = 2 * heads * pairs * (d_nope + d_rope + d_v)
    expanded_gemm = 2 * keys * heads * d_latent * (d_nope + d_v)
    return dict(pairs=pairs, absorbed_attention=absorbed_attn, absorbed=absorbed_attn + absorbed_proj,
                expanded_attention=expanded_attn, expanded=expanded_attn + expanded_gemm)


def choose_prefill_path(new_lens, cache_lens, heads, d_latent, d_rope, d_nope, d_v, causal=True,
                        relative_speed=None, *, device=None, constants=None) -> str:
    """"absorbed" or "expanded": the path with the smaller estimated time (``prefill_times``).

    A path's time = the call's shared host cost + launches x per-launch cost + per kernel max(FLOPs / achieved
    FLOP/s, bytes / bandwidth); the terms and the H100 numbers they were fitted to are in ``_prefill_cost``.
    Constants: ``constants`` (a dict of ``_prefill_cost.NAMES``), else ``device``'s config file
    (``mla_kernels/configs/<gpu>.json``, written by ``python -m bench.prefill --calibrate``), else the H100-fitted
    defaults. ``relative_speed`` overrides the absorbed attention kernel's FLOP/s as that fraction of the
    expanded kernel's (it was the ratio of the two paths' FLOP/s in the FLOP-only model before). Plain ints in;
    no GPU work. Raises ``TypeError``/``ValueError`` naming a bad argument (see ``prefill_times``).
    """
    causal = _utils.check_flag("causal", causal)
    new_lens, cache_lens = _check_cost_inputs(new_lens, cache_lens, heads=heads, d_latent=d_latent, d_rope=d_rope,
                                              d_nope=d_nope, d_v=d_v)
    return _choose(new_lens, cache_lens, heads, d_latent, d_rope, d_nope, d_v, causal, relative_speed, device,
                   constants)


def _choose(new_lens, cache_lens, heads, d_latent, d_rope, d_nope, d_v, causal, relative_speed=None, device=None,
            constants=None, elem_bytes=2) -> str:
    """``choose_prefill_path`` on lengths and sizes already checked (lists of ints; mla_prefill_attention's, with its
    queries' ``elem_bytes``: the expanded launch's tiles are those of its dtype's class)."""
    if not (_expanded_width_ok(d_nope) and _expanded_width_ok(d_v)):
        return "absorbed"  # widths the expanded kernel cannot tile (mla_prefill_attention refuses them there)
    return _cost.choose(_times(new_lens, cache_lens, heads, d_latent, d_rope, d_nope, d_v, causal, relative_speed,
                               device, constants, elem_bytes))


def prefill_times(new_lens, cache_lens, heads, d_latent, d_rope, d_nope, d_v, causal=True, relative_speed=None, *,
                  device=None, constants=None) -> dict:
    """Estimated seconds of each path, {"absorbed": s, "expanded": s}, as ``choose_prefill_path`` weighs them.

    ``new_lens`` and ``cache_lens`` hold one int per sequence, 0 <= new_lens[b] <= cache_lens[b]; ``heads`` and the
    widths are ints >= 1; ``constants`` maps names of ``_prefill_cost.NAMES`` to finite numbers (rates and bandwidth
    > 0, the two host times >= 0); ``device`` a ``torch.device`` or its name. Anything else raises
    ``TypeError``/``ValueError`` naming the argument.
    """
    causal = _utils.check_flag("causal", causal)
    new_lens, cache_lens = _check_cost_inputs(new_lens, cache_lens, heads=heads, d_latent=d_latent, d_rope=d_rope,
                                              d_nope=d_nope, d_v=d_v)
    return _times(new_lens, cache_lens, heads, d_latent, d_rope, d_nope, d_v, causal, relative_speed, device,
                  constants)


def _times(new_lens, cache_lens, heads, d_latent, d_rope, d_nope, d_v, causal, relative_speed, device, constants,
           elem_bytes=2):
    """``prefill_times`` on lengths and sizes already checked (for queries of ``elem_bytes``; bf16's by default)."""
    device = _utils.check_device("device", device) if device is not None else None
    consts = _cost.device_constants(device, relative_speed)
    if constants is not None:  # not `if constants:`: a [] or 0 was ignored unchecked
        _check_constants(constants)
        consts.update(constants)
        if relative_speed is not None:
            consts["prefill_absorbed_tflops"] = relative_speed * consts["prefill_expanded_tflops"]
    max_q = max(new_lens, default=0)
    block_m = _expanded_config(max_q, device if device is not None else torch.device("cpu"), d_nope, d_v,
                               d_rope, elem_bytes, tune=False)["BLOCK_M"]  # (a question: no on-demand tuning for it)
    return _cost.estimate(new_lens, cache_lens, heads, d_latent, d_rope, d_nope, d_v, causal, consts, block_m)


def _check_cost_inputs(new_lens, cache_lens, **sizes) -> tuple[list[int], list[int]]:
    """The cost model's batch, checked: ``new_lens`` and ``cache_lens`` as lists of ints, one per sequence, with
    0 <= new_lens[b] <= cache_lens[b] (the cache holds the new tokens); each of ``sizes`` an int >= 1 (``d_rope``
    >= 0: MLA without a rotary part)."""
    lists = []
    for name, values in (("new_lens", new_lens), ("cache_lens", cache_lens)):
        try:
            values = list(values)
        except TypeError:
            raise TypeError(f"{name} must be a sequence of ints (one per sequence), got {type(values).__name__}") \
                from None
        lists.append(_utils.int_list(name, values))
    new, lens = lists
    if len(new) != len(lens):
        raise ValueError(f"new_lens and cache_lens must have one entry per sequence, got {len(new)} and {len(lens)}")
    for b, (n, length) in enumerate(zip(new, lens)):
        if n < 0:
            raise ValueError(f"new_lens[{b}]={n} is negative")
        if length < n:
            raise ValueError(f"cache_lens[{b}]={length} is below new_lens[{b}]={n}: the cache holds the new tokens too")
    for name, value in sizes.items():
        low = 0 if name == "d_rope" else 1
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return new, lens


_HOST_TIMES = ("prefill_call_us", "prefill_launch_us")  # may be 0; every other constant divides


def _check_constants(constants: dict) -> None:
    if not isinstance(constants, dict):
        raise TypeError(f"constants must be a dict of {_cost.NAMES}, got {type(constants).__name__}")
    for name, value in constants.items():
        if name not in _cost.NAMES:
            raise ValueError(f"constants: unknown name {name!r}, expected some of {_cost.NAMES}")
        positive = name not in _HOST_TIMES
        if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not _utils.is_finite(value)
                or value < 0 or (positive and value == 0)):
            raise ValueError(f"constants[{name!r}] must be a finite number {'> 0' if positive else '>= 0'}, "
                             f"got {value!r}")


# --------------------------------------------------------------------------------------------
# expanded path: config, kernel, launcher
# --------------------------------------------------------------------------------------------


def _expanded_width_ok(width: int) -> bool:
    """Whether the expanded kernel can tile a per-head width (D_nope or D_v): a power of two from 16 to 1024."""
    return _utils.is_pow2(width) and 16 <= width <= 1024


def _absorbed_config(max_seqlen_q: int, heads: int, device: torch.device, d_latent: int = 512, d_rope: int = 64,
                     elem_bytes: int = 2, kv_fp8: bool = False) -> dict | None:
    """Tiles for the absorbed kernel in prefill: this GPU's tuned config for the shape class
    (``_tuning.prefill_class``, a ``_tuning.Tuned`` that ``decode._launch`` drops if it fails to compile; fitted
    to shared memory like decode's), else None (``decode.decode_tiles``) on a GPU. The interpreter spends ~50 ms
    per loop step whatever the tile, so there prefill's many rows run in large tiles (one test runs the GPU
    tiles)."""
    tuned = _tuning.lookup("prefill", _tuning.prefill_class(max_seqlen_q, heads, d_latent, elem_bytes), device)
    if tuned is not None:
        return _fit_tiles(tuned, device, d_latent, d_rope, elem_bytes, kv_fp8)
    if not _utils.interpreting():  # a GPU (or the JIT compiling for one: _compile.jit_launches)
        return None
    block_m = min(256, max(16, _utils.next_pow2(max_seqlen_q * heads)))
    return dict(BLOCK_M=block_m, BLOCK_N=128, num_warps=4, num_stages=1)


def _expanded_config(max_seqlen_q: int, device: torch.device, d_nope: int = 128, d_v: int = 128, d_rope: int = 64,
                     elem_bytes: int = 2, tune: bool = True) -> dict:
    """This GPU's tuned config for the expanded kernel's shape class (``_tuning.expanded_class``; a
    ``_tuning.Tuned``, dropped by ``_launch_expanded`` if it fails to compile), else ``_expanded_heuristic``; its
    tiles shrunk where they would not fit the GPU's shared memory at these widths (``_fit_expanded``)."""
    tuned = _tuning.lookup("expanded", _tuning.expanded_class(max_seqlen_q, d_nope, d_v, elem_bytes), device, tune)
    cfg = tuned if tuned is not None else _expanded_heuristic(max_seqlen_q, _utils.on_hip(device))
    return _fit_expanded(cfg, device, d_nope, d_v, d_rope, elem_bytes)


def _fit_expanded(cfg: dict, device: torch.device, d_nope: int, d_v: int, d_rope: int, elem_bytes: int,
                  hip: bool | None = None) -> dict:
    return _utils.fit_tiles(cfg, device, expanded_shared_bytes, d_nope, d_v, d_rope, elem_bytes, hip=hip)


def expanded_shared_bytes(cfg: dict, d_nope: int, d_v: int, d_rope: int, elem_bytes: int, hip: bool = False) -> int:
    """Shared memory the expanded kernel's operand tiles take on sm_90 (triton 3.6, compiled with the JIT's
    alignment facts): the query block (D_nope + P wide) once and ``num_stages`` key/value blocks (D_nope + P + D_v
    wide), and with fp32 inputs the probability tile. It matches the compiler's figure to the byte at 128/128/64
    and 512/512/64 in bf16; an upper bound in fp32.

    ``hip``: LDS on gfx942 (``decode_shared_bytes``'s model: the largest operand, rows x the widest of D_nope, P
    and D_v x bytes; the compiler's figure to the byte at 13 one-stage points; two stages count twice)."""
    block_m, block_n, stages = cfg["BLOCK_M"], cfg["BLOCK_N"], max(1, cfg.get("num_stages", 1))
    if hip:
        return max(block_m, block_n) * max(d_nope, d_rope, d_v) * elem_bytes * (2 if stages > 1 else 1)
    tiles = (block_m * (d_nope + d_rope) + stages * block_n * (d_nope + d_rope + d_v)) * elem_bytes
    return tiles + (block_m * block_n * 4 if elem_bytes == 4 else 0)


def _expanded_heuristic(max_seqlen_q: int, hip: bool = False) -> dict:
    """Tiles for the expanded kernel: BLOCK_M query tokens of one head x BLOCK_N keys per step.

    The fp32 accumulator is BLOCK_M x D_v; q (D_nope + P wide) stays in registers for the whole loop.
    ptxas for sm_90 at DeepSeek's widths (triton 3.6, compiled with the JIT's alignment facts): 128 x 64 with 8
    warps uses 218 registers, no spills, 128 KiB of shared memory (cp.async double-buffered keys and values;
    ``python -m mla_kernels._compile``). To be tuned on the GPU (the 8 x 4096,
    128-head prompt is the target shape). The interpreter runs the NVIDIA tiles.
    """
    block_m = 128 if max_seqlen_q > 64 else 64
    if hip:
        return dict(BLOCK_M=block_m, BLOCK_N=64, num_warps=4, num_stages=1)
    return dict(BLOCK_M=block_m, BLOCK_N=64, num_warps=8 if block_m == 128 else 4, num_stages=2)


@triton.jit
def _expanded_tiles(
    acc, l_i, m_i, q_nope, q_pe, q_pos,
    K_HEAD, V_HEAD, PE, BT_ROW,
    stride_k_t, stride_v_t, stride_pe_blk, stride_pe_tok,
    sm_scale_log2, lo, hi,
    D_NOPE: tl.constexpr, D_ROPE: tl.constexpr, D_V: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online softmax over keys [lo, hi) of one sequence and head. MASKED: keys past ``hi`` or (causal)
    after a row's position are hidden; otherwise every key in range is visible to every row."""
    offs_dn = tl.arange(0, D_NOPE)
    offs_dv = tl.arange(0, D_V)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions in the sequence
        offs_n64 = offs_n.to(tl.int64)
        if MASKED:
            n_mask = offs_n < hi
            k = tl.load(K_HEAD + offs_n64[None, :] * stride_k_t + offs_dn[:, None],
                        mask=n_mask[None, :], other=0.0)  # [D_NOPE, BLOCK_N]
            v = tl.load(V_HEAD + offs_n64[:, None] * stride_v_t + offs_dv[None, :],
                        mask=n_mask[:, None], other=0.0)  # [BLOCK_N, D_V]
        else:
            k = tl.load(K_HEAD + offs_n64[None, :] * stride_k_t + offs_dn[:, None])
            v = tl.load(V_HEAD + offs_n64[:, None] * stride_v_t + offs_dv[None, :])
        if DOT_FP32:
            k = k.to(tl.float32)
        qk = tl.dot(q_nope, k, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        if D_ROPE > 0:  # the rope key from the paged cache (D_ROPE 0: MLA without a rotary part)
            offs_p = tl.arange(0, D_ROPE)
            in_page = (offs_n % PAGE_SIZE).to(tl.int64)
            if MASKED:
                block_id = tl.load(BT_ROW + offs_n // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
                pe = tl.load(PE + (block_id * stride_pe_blk + in_page * stride_pe_tok)[None, :] + offs_p[:, None],
                             mask=n_mask[None, :], other=0.0)  # [D_ROPE, BLOCK_N]
            else:
                block_id = tl.load(BT_ROW + offs_n // PAGE_SIZE).to(tl.int64)
                pe = tl.load(PE + (block_id * stride_pe_blk + in_page * stride_pe_tok)[None, :] + offs_p[:, None])
            if DOT_FP32:
                pe = pe.to(tl.float32)
            qk = tl.dot(q_pe, pe, qk, input_precision=DOT_PRECISION)
        qk = qk * sm_scale_log2
        if MASKED:
            visible = n_mask[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= q_pos[:, None])
            qk = tl.where(visible, qk, float("-inf"))
        # every key of an unmasked tile is visible, but its scores can still all be -inf for a row (an infinite
        # query or key element, or a scaled score past float32's range): a row's max stays -inf then, and without
        # the guard exp2(-inf - -inf) made it NaN, while decode, the masked tiles and the reference skip such keys
        p, alpha, m_i, l_i = _online_softmax_step(qk, m_i, l_i)
        p = to_dtype(p, v.dtype)
        if DOT_FP32:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=DOT_PRECISION)  # [BLOCK_M, D_V]
    return acc, l_i, m_i


@triton.jit
def _mla_expanded_kernel(
    Q_NOPE, Q_PE, K_NOPE, V, PE, BLOCK_TABLE, CU_SEQLENS_Q, CU_SEQLENS_K, SEQLENS,
    OUT, LSE,
    sm_scale_log2, num_heads,
    stride_qn_t, stride_qn_h, stride_qp_t, stride_qp_h,
    stride_k_t, stride_k_h, stride_v_t, stride_v_h,
    stride_pe_blk, stride_pe_tok, stride_bt_b,
    stride_o_t, stride_o_h,
    D_NOPE: tl.constexpr, D_ROPE: tl.constexpr, D_V: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, STORE_LSE: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Causal varlen flash attention for one (block of new tokens, head, sequence).

    Q_NOPE [T, H, D_NOPE], Q_PE [T, H, D_ROPE] packed by CU_SEQLENS_Q; K_NOPE [L, H, D_NOPE] and
    V [L, H, D_V] packed by CU_SEQLENS_K (history + new of each sequence); PE the paged rope cache.
    """
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)

    q_start = tl.load(CU_SEQLENS_Q + pid_b).to(tl.int64)
    seq_q = (tl.load(CU_SEQLENS_Q + pid_b + 1) - q_start).to(tl.int32)
    if pid_m * BLOCK_M >= seq_q:
        return
    seqlen = tl.load(SEQLENS + pid_b).to(tl.int32)
    k_start = tl.load(CU_SEQLENS_K + pid_b).to(tl.int64)
    history = seqlen - seq_q

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] new tokens of this sequence
    m_mask = offs_m < seq_q
    q_pos = history + offs_m  # their positions in the sequence
    rows = q_start + offs_m.to(tl.int64)
    offs_dn = tl.arange(0, D_NOPE)
    offs_dv = tl.arange(0, D_V)

    q_nope = tl.load(Q_NOPE + rows[:, None] * stride_qn_t + pid_h * stride_qn_h + offs_dn[None, :],
                     mask=m_mask[:, None], other=0.0)  # [BLOCK_M, D_NOPE]
    if DOT_FP32:
        q_nope = q_nope.to(tl.float32)
    if D_ROPE > 0:
        offs_p = tl.arange(0, D_ROPE)
        q_pe = tl.load(Q_PE + rows[:, None] * stride_qp_t + pid_h * stride_qp_h + offs_p[None, :],
                       mask=m_mask[:, None], other=0.0)  # [BLOCK_M, D_ROPE]
        if DOT_FP32:
            q_pe = q_pe.to(tl.float32)
    else:
        q_pe = q_nope  # (not read: no rotary part)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_V], dtype=tl.float32)
    K_HEAD = K_NOPE + k_start * stride_k_t + pid_h * stride_k_h
    V_HEAD = V + k_start * stride_v_t + pid_h * stride_v_h
    BT_ROW = BLOCK_TABLE + pid_b * stride_bt_b

    # keys before full_end are visible to every row of the block; the rest need masks
    if CAUSAL:
        hi = tl.minimum(seqlen, history + pid_m * BLOCK_M + BLOCK_M)
        full_end = (history + pid_m * BLOCK_M + 1) // BLOCK_N * BLOCK_N
    else:
        hi = seqlen
        full_end = seqlen // BLOCK_N * BLOCK_N
    acc, l_i, m_i = _expanded_tiles(
        acc, l_i, m_i, q_nope, q_pe, q_pos, K_HEAD, V_HEAD, PE, BT_ROW,
        stride_k_t, stride_v_t, stride_pe_blk, stride_pe_tok, sm_scale_log2, 0, full_end,
        D_NOPE, D_ROPE, D_V, PAGE_SIZE, BLOCK_N, False, CAUSAL, DOT_FP32, DOT_PRECISION)
    acc, l_i, m_i = _expanded_tiles(
        acc, l_i, m_i, q_nope, q_pe, q_pos, K_HEAD, V_HEAD, PE, BT_ROW,
        stride_k_t, stride_v_t, stride_pe_blk, stride_pe_tok, sm_scale_log2, full_end, hi,
        D_NOPE, D_ROPE, D_V, PAGE_SIZE, BLOCK_N, True, CAUSAL, DOT_FP32, DOT_PRECISION)

    has_key = l_i != 0.0  # a NaN l_i (NaN in a used cache slot) stays NaN, as in decode._softmax_finish
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]  # [BLOCK_M, D_V]
    tl.store(OUT + rows[:, None] * stride_o_t + pid_h * stride_o_h + offs_dv[None, :],
             to_dtype(out, OUT.dtype.element_ty), mask=m_mask[:, None])
    if STORE_LSE:
        lse = tl.where(has_key, (m_i + tl.math.log2(tl.where(has_key, l_i, 1.0))) * LN2_C, float("-inf"))
        tl.store(LSE + rows * num_heads + pid_h, lse, mask=m_mask)


# latent values one gather program copies (BLOCK_N = this // D rows): 16 KiB of bf16 on a GPU; the interpreter,
# which spends its time per program rather than per value, copies 16x more per program
GATHER_ELEMENTS = 8192
GATHER_BLOCK_B = 128  # lengths summed per step of a gather program's prefix sum


@triton.jit
def _gather_latent_kernel(
    KV, KV_SCALE, BLOCK_TABLE, SEQLENS, OUT, CU_SEQLENS_K,
    stride_kv_blk, stride_kv_tok, stride_ks_blk, stride_ks_tok, stride_bt_b, stride_o_t,
    D: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, KV_FP8: tl.constexpr,
):
    """Copy BLOCK_N cached tokens of sequence ``pid_b`` from the paged cache ``KV [N, PAGE_SIZE, D]`` to their rows of
    the packed ``OUT [sum(SEQLENS), D]`` (sequence b at rows ``CU_SEQLENS_K[b]:CU_SEQLENS_K[b+1]``). Each program
    finds its sequence's first row by summing the lengths before it; the first program of each sequence writes
    ``CU_SEQLENS_K[b + 1]`` (and of sequence 0 also ``CU_SEQLENS_K[0] = 0``), so no other launch computes it.
    ``KV_FP8``: e4m3 values times their fp32 scales (``KV_SCALE``, one per 128 values), stored in OUT's dtype.
    Only positions below SEQLENS[b] are read: unused slots and block-table entries never are."""
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    before = tl.zeros([BLOCK_B], dtype=tl.int64)  # [BLOCK_B] partial sums of the lengths of sequences < pid_b
    for start in range(0, pid_b, BLOCK_B):
        offs_b = start + tl.arange(0, BLOCK_B)
        before += tl.load(SEQLENS + offs_b, mask=offs_b < pid_b, other=0).to(tl.int64)
    k_start = tl.sum(before, axis=0)
    seqlen = tl.load(SEQLENS + pid_b).to(tl.int32)
    if pid_n == 0:
        tl.store(CU_SEQLENS_K + pid_b + 1, k_start + seqlen)
        if pid_b == 0:
            tl.store(CU_SEQLENS_K, k_start)
    if pid_n * BLOCK_N >= seqlen:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] positions in the sequence
    n_mask = offs_n < seqlen
    offs_d = tl.arange(0, D)
    block_id = tl.load(BLOCK_TABLE + pid_b.to(tl.int64) * stride_bt_b + offs_n // PAGE_SIZE, mask=n_mask,
                       other=0).to(tl.int64)
    in_page = (offs_n % PAGE_SIZE).to(tl.int64)
    kv = tl.load(KV + (block_id * stride_kv_blk + in_page * stride_kv_tok)[:, None] + offs_d[None, :],
                 mask=n_mask[:, None], other=0.0)  # [BLOCK_N, D]
    if KV_FP8:
        kv = _dequant_fp8(kv, KV_SCALE + block_id * stride_ks_blk + in_page * stride_ks_tok, n_mask, D,
                          OUT.dtype.element_ty)
    rows = k_start + offs_n.to(tl.int64)
    tl.store(OUT + rows[:, None] * stride_o_t + offs_d[None, :], kv, mask=n_mask[:, None])


def _gather_latent(kv_cache, block_table, cache_seqlens, total_keys, max_seqlen_k, kv_scale=None, dtype=None, *,
                   block_n=None):
    """Every sequence's cached latent, packed, in one launch (``_gather_latent_kernel``): returns
    ``latent [total_keys, R]`` (sequence b at rows ``cu_seqlens_k[b]:cu_seqlens_k[b+1]``; an fp8 cache dequantized
    to ``dtype``) and ``cu_seqlens_k [B+1]`` int64. ``total_keys`` = sum(cache_seqlens) and ``max_seqlen_k`` >= its
    longest length, known on the host: no synchronisation. B >= 1. ``block_n`` overrides the rows per program."""
    batch, d = block_table.shape[0], kv_cache.shape[-1]
    latent = torch.empty(total_keys, d, dtype=kv_cache.dtype if kv_scale is None else dtype, device=kv_cache.device)
    cu_k = torch.empty(batch + 1, dtype=torch.int64, device=kv_cache.device)
    if block_n is None:
        block_n = max(1, GATHER_ELEMENTS * (16 if _utils.interpreting() else 1) // d)
    grid = (max(1, _utils.cdiv(max_seqlen_k, block_n)), batch)  # program (0, b) writes cu_k even if b is empty
    _launcher.launch(_gather_latent_kernel, grid,
        _utils.fp8_bits(kv_cache), kv_scale if kv_scale is not None else kv_cache,
        block_table, cache_seqlens, latent, cu_k,
        kv_cache.stride(0), kv_cache.stride(1), *(kv_scale.stride()[:2] if kv_scale is not None else (0, 0)),
        block_table.stride(0), latent.stride(0),
        D=d, PAGE_SIZE=kv_cache.shape[1], BLOCK_N=block_n, BLOCK_B=GATHER_BLOCK_B, KV_FP8=kv_scale is not None,
        num_warps=4,
    )
    return latent, cu_k


def _gather_latent_torch(cache, block_table, cache_seqlens, cu_seqlens_k, total_keys, scale=None, dtype=None):
    """``_gather_latent`` in PyTorch (its reference; the CPU path without the interpreter): cache [N, page, D] ->
    [total_keys, D], sequence b at rows cu_seqlens_k[b]:cu_seqlens_k[b+1]; with an fp8 cache's ``scale``
    [N, page, D/128], dequantized to ``dtype``. No host synchronisation given ``total_keys``."""
    device = cache.device
    page = cache.shape[1]
    batch = block_table.shape[0]
    seq = torch.repeat_interleave(torch.arange(batch, device=device), cache_seqlens.long(), output_size=total_keys)
    pos = torch.arange(total_keys, device=device) - cu_seqlens_k[seq]
    blocks = block_table[seq, pos // page].long()
    rows = _utils.take(cache, blocks, pos % page)
    return rows if scale is None else dequantize_fp8_torch(rows, scale[blocks, pos % page], dtype)


def _expand(latent, w_kv_b, heads, d_nope):
    """The gathered latent ``[L, R]`` expanded through kv_b_proj in one GEMM: views k_nope [L, H, D_nope],
    v [L, H, D_v]."""
    kv = (latent @ w_kv_b.T).view(latent.shape[0], heads, w_kv_b.shape[0] // heads)  # [L, H, D_nope + D_v]
    return kv[..., :d_nope], kv[..., d_nope:]


def _launch_expanded(q_nope, q_pe, k_nope, v, pe_cache, block_table, cu_seqlens_q, cu_seqlens_k, cache_seqlens,
                     softmax_scale, causal, return_lse, *, max_seqlen_q, config=None):
    """Run the expanded kernel on checked arguments. Returns out [T, H, D_v], lse [T, H] | None.
    ``config`` (a dict like ``_expanded_heuristic``'s) overrides the tiles."""
    total, heads, d_nope = q_nope.shape
    d_rope, d_v = q_pe.shape[-1], v.shape[-1]
    batch = block_table.shape[0]
    device = q_nope.device
    elem_bytes = q_nope.element_size()
    cfg = config or _expanded_config(max_seqlen_q, device, d_nope, d_v, d_rope, elem_bytes)
    out = torch.empty(total, heads, d_v, dtype=q_nope.dtype, device=device)
    lse = torch.empty(total, heads, dtype=torch.float32, device=device) if return_lse else None
    if total == 0 or batch == 0:
        return out, lse
    grid = (_utils.cdiv(max_seqlen_q, cfg["BLOCK_M"]), heads, batch)
    page = pe_cache.shape[1]
    # D_ROPE 0: no rope tensor is read, and one of no elements may hold a null pointer: the query and the keys
    # stand in (both of the query's dtype, never an fp8 cache's)
    q_pe_ptr, pe_ptr = (q_nope, k_nope) if d_rope == 0 else (q_pe, pe_cache)
    try:  # (free when nothing is raised: a stored config's compile failure is handled after the fact)
        _launcher.launch(_mla_expanded_kernel, grid,
            q_nope, q_pe_ptr, k_nope, v, pe_ptr, block_table, cu_seqlens_q, cu_seqlens_k, cache_seqlens,
            out, lse if lse is not None else out,
            softmax_scale * LOG2E, heads,
            q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1),
            k_nope.stride(0), k_nope.stride(1), v.stride(0), v.stride(1),
            pe_cache.stride(0), pe_cache.stride(1), block_table.stride(0),
            out.stride(0), out.stride(1),
            D_NOPE=d_nope, D_ROPE=d_rope, D_V=d_v, PAGE_SIZE=page,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
            CAUSAL=causal, STORE_LSE=return_lse, DOT_FP32=_utils.interpreting(),
            DOT_PRECISION=_utils.dot_precision(q_nope.dtype),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    except Exception as exc:
        if not _tuning.drop_on_compile_error(cfg, exc):
            raise
        # the stored config failed to compile (nothing was written): dropped, the heuristic instead
        return _launch_expanded(q_nope, q_pe, k_nope, v, pe_cache, block_table, cu_seqlens_q, cu_seqlens_k,
                                cache_seqlens, softmax_scale, causal, return_lse, max_seqlen_q=max_seqlen_q,
                                config=_fit_expanded(_expanded_heuristic(max_seqlen_q, _utils.on_hip(device)),
                                                     device, d_nope, d_v, d_rope, elem_bytes))
    return out, lse


# --------------------------------------------------------------------------------------------
# PyTorch paths (CPU without the interpreter)
# --------------------------------------------------------------------------------------------


def _prefill_torch(q_nope, q_pe, kv_cache, pe_cache, block_table, cu_q, cache_seqlens, softmax_scale, causal,
                   kv_scale=None):
    """``mla_prefill`` in PyTorch, one sequence at a time through decode's ``_attend_torch``.

    cu_q: host list of B+1 row offsets. Returns out [T, H, R] in q's dtype, lse [T, H] fp32.
    """
    total, heads, _ = q_nope.shape
    out = torch.zeros_like(q_nope, memory_format=torch.contiguous_format)  # (as the kernel's: not a permuted q's)
    lse = torch.full((total, heads), float("-inf"), dtype=torch.float32, device=q_nope.device)
    for b in range(len(cu_q) - 1):
        start, end = cu_q[b], cu_q[b + 1]
        if end == start:
            continue
        o, s = _attend_torch(q_nope[None, start:end], q_pe[None, start:end], kv_cache, pe_cache,
                             block_table[b:b + 1], cache_seqlens[b:b + 1], cache_seqlens.new_full((1,), end - start),
                             softmax_scale, causal, kv_scale)
        out[start:end], lse[start:end] = o[0].to(q_nope.dtype), s[0]
    return out, lse


def _expanded_torch(q_nope, q_pe, k_nope, v, k_pe, cu_q, cu_k, softmax_scale, causal):
    """Expanded attention in fp32, one sequence at a time: k_nope [L, H, D_nope], v [L, H, D_v], k_pe [L, P]
    packed by the host list cu_k. Returns out [T, H, D_v] in q's dtype, lse [T, H] fp32."""
    total, heads, _ = q_nope.shape
    out = torch.zeros(total, heads, v.shape[-1], dtype=q_nope.dtype, device=q_nope.device)
    lse = torch.full((total, heads), float("-inf"), dtype=torch.float32, device=q_nope.device)
    for b in range(len(cu_q) - 1):
        qs, qe, ks, ke = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        if qe == qs:
            continue
        scores = (torch.einsum("shd,lhd->hsl", q_nope[qs:qe].float(), k_nope[ks:ke].float())
                  + torch.einsum("shp,lp->hsl", q_pe[qs:qe].float(), k_pe[ks:ke].float())) * softmax_scale
        if causal:
            q_pos = torch.arange(qe - qs, device=q_nope.device) + (ke - ks) - (qe - qs)
            hidden = torch.arange(ke - ks, device=q_nope.device)[None, :] > q_pos[:, None]  # [S, L]
            scores = scores.masked_fill(hidden, float("-inf"))
        s = torch.logsumexp(scores, dim=-1)  # [H, S]
        out[qs:qe] = torch.einsum("hsl,lhd->shd", _softmax_probs(scores, s), v[ks:ke].float()).to(q_nope.dtype)
        lse[qs:qe] = s.transpose(0, 1)
    return out, lse


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------


def _check_queries(q_nope, q_pe):
    _utils.check_tensor("q_nope", q_nope, 3, _utils.FLOAT_DTYPES)
    _utils.check_tensor("q_pe", q_pe, 3, _utils.FLOAT_DTYPES)
    _utils.check_same("q_nope", q_nope.dtype, "q_pe", q_pe.dtype, "dtype")
    _utils.check_same("q_nope", tuple(q_nope.shape[:2]), "q_pe", tuple(q_pe.shape[:2]), "[T, H]")
    _utils.check_last_contiguous("q_nope", q_nope)
    _utils.check_last_contiguous("q_pe", q_pe)
    if q_nope.shape[1] == 0:
        raise ValueError("q_nope must have at least one head")


def _read_lengths(cu_seqlens_q, cache_seqlens) -> torch.Tensor:
    """``cu_seqlens_q`` then ``cache_seqlens`` as one int64 CPU tensor ``[2B + 1]``: the call's one device-to-host
    copy (on a GPU, a synchronisation with the host)."""
    return torch.cat([cu_seqlens_q.long(), cache_seqlens.long()]).cpu()


def _host_lengths(cu_seqlens_q_host, cache_seqlens_host, batch: int):
    """The caller's host copies of the lengths as two lists of ints (B+1 and B entries), or None if not given."""
    if cu_seqlens_q_host is None and cache_seqlens_host is None:
        return None
    lists = []
    for name, values, size in (("cu_seqlens_q_host", cu_seqlens_q_host, batch + 1),
                               ("cache_seqlens_host", cache_seqlens_host, batch)):
        if values is None:
            other = "cache_seqlens_host" if name == "cu_seqlens_q_host" else "cu_seqlens_q_host"
            raise ValueError(f"{name} is missing: pass it with {other} (both host lengths or neither)")
        if not isinstance(values, (list, tuple)):
            raise TypeError(f"{name} must be a list of ints (the host copy of {name[:-5]}), "
                            f"got {type(values).__name__}")
        if len(values) != size:
            raise ValueError(f"{name} must have {size} entries (as {name[:-5]}), got {len(values)}")
        lists.append(_utils.int_list(name, values, tensors=False))
    return lists


def _check_host_agrees(names, host, tensors) -> None:
    """CPU inputs only (reading them is free): the caller's host lengths must be the tensors' values."""
    read = _read_lengths(*tensors).tolist()
    split = len(host[0])
    for name, values, actual in zip(names, host, (read[:split], read[split:])):
        if list(values) != actual:
            i = next(i for i, (a, b) in enumerate(zip(values, actual)) if a != b)
            raise ValueError(f"{name}[{i}]={values[i]} but {name[:-5]}[{i}]={actual[i]}: the host lengths must be "
                             f"the tensors' values")


def _check_lengths(cu, lens, names, total, capacity, max_seqlen_q, max_seqlen_k) -> tuple[int, int]:
    """Values of the lengths (host lists ``cu`` [B+1], ``lens`` [B], named ``names``): cu starts at 0, does not
    decrease and ends at ``total``; every sequence's cache holds its new tokens and fits ``capacity``; the maxima
    given are not exceeded. Returns the longest new segment and the longest cache length."""
    cu_name, lens_name = names
    if cu[0] != 0:
        raise ValueError(f"{cu_name} must start at 0, got {cu[0]}")
    if cu[-1] != total:  # before the per-sequence checks: a cu_seqlens_q past T was blamed on cache_seqlens
        raise ValueError(f"{cu_name} must end at the number of query tokens T={total}, got {cu[-1]}")
    if any(b < a for a, b in zip(cu, cu[1:])):  # before the per-sequence checks too (an entry past T mid-list)
        raise ValueError(f"{cu_name} must be non-decreasing, got {list(cu)}")
    longest_q = longest_k = 0
    for b, length in enumerate(lens):
        n = cu[b + 1] - cu[b]
        if length < 0:  # (before the new-token comparison, which blamed a negative length on the new tokens)
            raise ValueError(f"{lens_name} must be >= 0, got {lens_name}[{b}]={length}")
        if length < n:
            raise ValueError(f"{lens_name}[{b}]={length} is smaller than sequence {b}'s {n} new tokens "
                             f"({cu_name}); the new tokens must already be in the cache")
        longest_q, longest_k = max(longest_q, n), max(longest_k, length)
    if max_seqlen_q is not None and max_seqlen_q < longest_q:
        raise ValueError(f"max_seqlen_q={max_seqlen_q} is below the longest sequence's {longest_q} new tokens")
    if max_seqlen_k is not None and max_seqlen_k < longest_k:
        raise ValueError(f"max_seqlen_k={max_seqlen_k} is below the longest {lens_name} {longest_k}")
    if longest_k > capacity:
        raise ValueError(f"{lens_name} has a length {longest_k} beyond the block table's capacity {capacity}")
    return longest_q, longest_k


def _check_shapes(q_nope, q_pe, kv_cache, pe_cache, block_table, cu_seqlens_q, cache_seqlens, kv_scale=None,
                  cu_seqlens_q_host=None, cache_seqlens_host=None):
    """The checks shared by both public calls that read no tensor values (shapes, dtypes, devices, the host lengths'
    types), so they also run while torch.compile traces. Returns (batch, page, device, host lengths | None)."""
    _check_queries(q_nope, q_pe)
    _utils.check_tensor("cu_seqlens_q", cu_seqlens_q, 1, _utils.INDEX_DTYPES)
    _utils.check_last_contiguous("cu_seqlens_q", cu_seqlens_q)
    if cu_seqlens_q.shape[0] == 0:
        raise ValueError("cu_seqlens_q must have B + 1 >= 1 entries, got 0")
    batch = cu_seqlens_q.shape[0] - 1
    _utils.check_grid_batch(batch, "cu_seqlens_q's length - 1")
    _, p, page = _utils.check_paged_cache(kv_cache, pe_cache, block_table, batch, "cu_seqlens_q (its length - 1)",
                                          kv_scale=kv_scale)
    _utils.check_same("q_pe", q_pe.shape[-1], "pe_cache", p, "rope width P")
    _utils.check_same("q_nope", q_nope.dtype, *_utils.cache_compute_dtype(kv_cache, pe_cache), "dtype")
    _utils.check_rope_width("pe_cache rope", p)
    _utils.check_tensor("cache_seqlens", cache_seqlens, 1, _utils.INDEX_DTYPES)
    _utils.check_last_contiguous("cache_seqlens", cache_seqlens)
    _utils.check_same("cache_seqlens", cache_seqlens.shape[0], "cu_seqlens_q", batch, "batch size (B)")
    device = _utils.check_devices(q_nope=q_nope, q_pe=q_pe, kv_cache=kv_cache, pe_cache=pe_cache,
                                  block_table=block_table, cu_seqlens_q=cu_seqlens_q, cache_seqlens=cache_seqlens,
                                  kv_scale=kv_scale)
    return batch, page, device, _host_lengths(cu_seqlens_q_host, cache_seqlens_host, batch)


def _check_values(q_nope, kv_cache, block_table, cu_seqlens_q, cache_seqlens, batch, page, device, max_seqlen_q,
                  max_seqlen_k, host, host_sync):
    """The value checks shared by both public calls, after ``_check_shapes``. Returns (max_seqlen_q, max_seqlen_k,
    host lengths | None).

    Values are checked where they are on the host: always with the caller's host lengths (``cu_seqlens_q_host``,
    ``cache_seqlens_host``), which on the CPU must also equal the tensors; otherwise on the CPU, and on a GPU when
    ``host_sync`` (then cu_seqlens_q and cache_seqlens are copied to the host once, ``_read_lengths``).
    """
    _utils.check_has_data("q_nope", q_nope)
    capacity = block_table.shape[1] * page
    names = ("cu_seqlens_q_host", "cache_seqlens_host")
    if host is None and (host_sync or device.type != "cuda"):
        both = _read_lengths(cu_seqlens_q, cache_seqlens).tolist()
        host, names = (both[:batch + 1], both[batch + 1:]), ("cu_seqlens_q", "cache_seqlens")
    elif host is not None and device.type == "cpu":
        _check_host_agrees(names, host, (cu_seqlens_q, cache_seqlens))
    if host is not None:
        longest_q, longest_k = _check_lengths(*host, names, q_nope.shape[0], capacity, max_seqlen_q, max_seqlen_k)
        if device.type == "cpu":
            _check_lengths_cpu(cache_seqlens, block_table, kv_cache.shape[0], page, capacity)
        max_seqlen_q = longest_q if max_seqlen_q is None else max_seqlen_q
        max_seqlen_k = longest_k if max_seqlen_k is None else max_seqlen_k
        host = (list(host[0]), list(host[1]))
    max_seqlen_k = capacity if max_seqlen_k is None else min(max_seqlen_k, capacity)
    if max_seqlen_q is not None:  # no sequence has more new tokens than T: a larger bound only grew the grid (2^31 hung
        max_seqlen_q = min(max_seqlen_q, q_nope.shape[0])  # the interpreter; past a grid axis, a failed launch)
    return max_seqlen_q, max_seqlen_k, host


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def _with_sinks(call, sinks, return_lse, q_nope, *args, **kwargs):
    """``call(q_nope, *args, return_lse=True, **kwargs)`` (``mla_prefill`` or ``mla_prefill_attention``) with
    attention sinks on its output (``merge.apply_sink``): what the call returns with ``return_lse``. ``sinks [H]``
    is checked against ``q_nope [T, H, D]`` first, where that is a 3-D tensor (else the call names q_nope)."""
    return_lse = _utils.check_flag("return_lse", return_lse)
    if isinstance(q_nope, torch.Tensor) and q_nope.dim() == 3:
        sinks = _utils.check_sinks(sinks, q_nope.shape[1], q_nope.device)
        if torch.is_grad_enabled():
            _utils.check_no_grad(call.__name__, sinks=sinks)
    out, lse = call(q_nope, *args, return_lse=True, **kwargs)
    out = apply_sink(out, lse, sinks)
    return (out, lse) if return_lse else out


def mla_prefill(q_nope, q_pe, kv_cache, pe_cache, block_table, cu_seqlens_q, cache_seqlens, softmax_scale,
                causal=True, return_lse=False, *, max_seqlen_q=None, max_seqlen_k=None, num_splits=None,
                kv_scale=None, cu_seqlens_q_host=None, cache_seqlens_host=None, split_tokens=None, sinks=None):
    """Absorbed MLA prefill: ragged new tokens of B sequences attend over their paged latent cache.

    Args:
        q_nope: ``[T, H, R]`` queries of all new tokens, packed sequence after sequence, already absorbed into
            latent space (q_nope @ W_UK); bf16, fp16 or fp32.
        q_pe: ``[T, H, P]`` rope part of the queries, rope applied; same dtype (P may be 0: no rotary part).
            q_nope and q_pe may be views of one ``[T, H, R+P]`` tensor; only the last dimension must be contiguous.
        kv_cache: ``[num_blocks, block_size, R]`` latent cache; pe_cache: ``[num_blocks, block_size, P]`` roped
            key cache; either may be a strided view of one ``[num_blocks, block_size, R+P]`` buffer.
        block_table: ``[B, max_blocks]`` int32 (or int64) block ids of each sequence.
        cu_seqlens_q: ``[B+1]`` int32 (or int64): sequence b owns rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``.
            Starts at 0, non-decreasing, ends at T. A sequence with no new tokens contributes no rows.
        cache_seqlens: ``[B]`` int32 (or int64): tokens in each sequence's cache, its new ones included (they
            are already written). Sequence b's history is ``cache_seqlens[b] - n_b`` tokens for n_b new
            tokens, and new token i sits at position ``history + i``.
        softmax_scale: scale applied to q.k before the softmax.
        causal: new token i attends to positions up to its own (otherwise to the whole cache).
        return_lse: also return ``lse [T, H]`` float32, natural log of the sum of exp(scaled scores).
        max_seqlen_q: the most new tokens of any sequence; sizes the grid. If None it comes from the host
            lengths, or is read from cu_seqlens_q, which on a GPU synchronises with the host once (and then
            cu_seqlens_q and cache_seqlens are also value-checked). Pass it (or the host lengths) to avoid the
            synchronisation; a value that is too small leaves rows unwritten.
        max_seqlen_k: upper bound on cache_seqlens, used to size the split-KV grid (default: the longest length
            when the lengths are on the host, otherwise the block table's capacity).
        num_splits: force the number of cache-length splits (default: chosen from the grid and GPU size).
        kv_scale: an FP8 cache's scales ``[num_blocks, block_size, R/128]`` float32, as in ``mla_decode``.
        cu_seqlens_q_host, cache_seqlens_host: the same lengths as ``cu_seqlens_q`` and ``cache_seqlens``, as
            lists of Python ints the caller already holds (a serving engine's or ``LatentBatch``'s bookkeeping);
            both or neither. Given, nothing is read back from the GPU and their values are checked as above on
            any device; on the CPU they must also equal the tensors (``ValueError`` naming both otherwise). On a
            GPU they are trusted to match the tensors: a mismatch is undefined behaviour.
        split_tokens: batch-invariant prefill, as ``mla_decode``'s: every sequence's keys are split at each multiple
            of ``split_tokens`` rounded up to the key tile, and the tiles are those of a one-token decode at this
            head count (``decode.decode_tiles(H, ...)``), chosen without the batch's ``max_seqlen_q``. A row's
            output and lse then depend on its own sequence (its tokens, history and cache) alone, not on the other
            sequences of the batch, ``max_seqlen_q`` or ``max_seqlen_k``. Exclusive with ``num_splits``. Expect it
            slower than the default at 16 heads or fewer with several new tokens per sequence (16 query rows per
            program instead of 64, so the cache is read once per 16 rows). Every row keeps an fp32 partial per
            split of the longest key range; past ``decode.SPLIT_PARTIALS_BYTES`` (256 MiB) the call runs as several
            launches over pieces of the sequences, with the same bits (on a GPU without host lengths it then reads
            the lengths once). The Triton kernels' promise, as in ``mla_decode``.
        sinks: ``[H]`` attention sinks, as ``mla_decode``'s: each output row scaled by
            ``exp(lse) / (exp(lse) + exp(sinks[h]))``; the returned lse stays the keys' own.

    Returns:
        ``out [T, H, R]`` in q's dtype; with ``return_lse`` also ``lse [T, H]`` float32.

    Raises ``TypeError``/``ValueError`` naming the bad argument. On the CPU every value is checked
    (cu_seqlens_q starts at 0, is non-decreasing and ends at T; cache_seqlens[b] >= new tokens of b and fits
    the block table; used block ids exist). On a GPU lengths are checked when they are on the host anyway (host
    lengths given, or max_seqlen_q None), and block ids never.
    """
    if sinks is not None:  # the call with its lse, then the sinks
        return _with_sinks(mla_prefill, sinks, return_lse, q_nope, q_pe, kv_cache, pe_cache, block_table,
                           cu_seqlens_q, cache_seqlens, softmax_scale, causal, max_seqlen_q=max_seqlen_q,
                           max_seqlen_k=max_seqlen_k, num_splits=num_splits, kv_scale=kv_scale,
                           cu_seqlens_q_host=cu_seqlens_q_host, cache_seqlens_host=cache_seqlens_host,
                           split_tokens=split_tokens)
    causal, return_lse = _utils.check_flag("causal", causal), _utils.check_flag("return_lse", return_lse)
    max_seqlen_q = _utils.check_int("max_seqlen_q", max_seqlen_q, 0)  # numpy ints become Python ints
    max_seqlen_k = _utils.check_int("max_seqlen_k", max_seqlen_k, 0)
    num_splits = _utils.check_int("num_splits", num_splits, 1)
    batch, page, device, host = _check_shapes(q_nope, q_pe, kv_cache, pe_cache, block_table, cu_seqlens_q,
                                              cache_seqlens, kv_scale, cu_seqlens_q_host, cache_seqlens_host)
    split_tokens = _check_split_tokens(split_tokens, num_splits)
    _utils.check_same("q_nope", q_nope.shape[-1], "kv_cache", kv_cache.shape[-1], "latent width R")
    _utils.check_width("kv_cache latent", kv_cache.shape[-1])
    softmax_scale = _utils.check_scale("softmax_scale", softmax_scale)
    _utils.check_no_grad("mla_prefill", q_nope=q_nope, q_pe=q_pe, kv_cache=kv_cache, pe_cache=pe_cache,
                         kv_scale=kv_scale)
    if torch.compiler.is_compiling():  # the value checks read the host: inside a graph they run in the op
        out, lse = torch.ops.mla_kernels.mla_prefill(q_nope, q_pe, kv_cache, pe_cache, block_table, cu_seqlens_q,
                                                     cache_seqlens, softmax_scale, causal, return_lse, max_seqlen_q,
                                                     max_seqlen_k, num_splits, kv_scale, cu_seqlens_q_host,
                                                     cache_seqlens_host, split_tokens)
        return (out, lse) if return_lse else out
    max_seqlen_q, max_seqlen_k, host = _check_values(q_nope, kv_cache, block_table, cu_seqlens_q, cache_seqlens,
                                                     batch, page, device, max_seqlen_q, max_seqlen_k, host,
                                                     host_sync=max_seqlen_q is None)
    if split_tokens is not None:
        split_tokens = _check_split_tokens(split_tokens, num_splits, max_seqlen_k)
    out, lse = _run_absorbed(q_nope, q_pe, kv_cache, pe_cache, block_table, cu_seqlens_q, cache_seqlens,
                             softmax_scale, causal, return_lse, batch, max_seqlen_q, max_seqlen_k, num_splits, host,
                             kv_scale=kv_scale, split_tokens=split_tokens)
    return (out, lse) if return_lse else out


def _check_split_tokens(split_tokens, num_splits, max_seqlen_k=None):
    """``split_tokens`` checked as ``mla_decode``'s (``decode._check_split_tokens``): without ``max_seqlen_k`` its
    type and ``num_splits``' exclusion (before a call is traced), with it (the call's, resolved by
    ``_check_values``) also the grid's bound on the splits of the keys."""
    if split_tokens is None:
        return None
    return _check_decode_split_tokens(split_tokens, num_splits, None, 0 if max_seqlen_k is None else max_seqlen_k)


def _run_absorbed(q_nope, q_pe, kv_cache, pe_cache, block_table, cu_seqlens_q, cache_seqlens, softmax_scale, causal,
                  return_lse, batch, max_seqlen_q, max_seqlen_k, num_splits, host, kv_scale=None, split_tokens=None):
    if not _utils.use_triton(q_nope):
        out, lse = _prefill_torch(q_nope, q_pe, kv_cache, pe_cache, block_table, host[0], cache_seqlens,
                                  softmax_scale, causal, kv_scale)
        return out, (lse if return_lse else None)
    if num_splits is None and split_tokens is None and _utils.interpreting():
        num_splits = 1  # interpreter: the combine kernel runs one program per row, seconds per thousand rows
    if split_tokens is not None:
        # no prefill config (its class is the batch's max_seqlen_q): _launch takes a one-token decode's; launches of
        # bounded partials (a piece of a sequence gives its rows the bits the whole call would)
        partials = _decode.split_partials_bytes(q_nope.shape[0] * q_nope.shape[1], q_nope.shape[2], max_seqlen_k,
                                                split_tokens)
        if partials > _decode.SPLIT_PARTIALS_BYTES:
            if host is None:  # (a GPU call given max_seqlen_q and no host lengths: the one read, to cut the batch;
                both = _read_lengths(cu_seqlens_q, cache_seqlens).tolist()  # read, their values are checked too)
                host = (both[:batch + 1], both[batch + 1:])
                _check_lengths(*host, ("cu_seqlens_q", "cache_seqlens"), q_nope.shape[0],
                               block_table.shape[1] * kv_cache.shape[1], max_seqlen_q, max_seqlen_k)
            return _run_in_pieces(q_nope, q_pe, kv_cache, pe_cache, block_table, softmax_scale, causal, return_lse,
                                  host, split_tokens, kv_scale)
    config = None if split_tokens is not None else _absorbed_config(
        max_seqlen_q, q_nope.shape[1], q_nope.device, q_nope.shape[2], q_pe.shape[2], q_nope.element_size(),
        kv_scale is not None)
    with _utils.launch_device(q_nope.device):
        return _launch(q_nope, q_pe, kv_cache, pe_cache, block_table, cache_seqlens, cu_seqlens_q, softmax_scale,
                       causal, return_lse, batch=batch, seq_q=0, total_tokens=q_nope.shape[0],
                       max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, num_splits=num_splits, config=config,
                       kv_scale=kv_scale, split_tokens=split_tokens)


def _pieces(cu_q: list, lens: list, heads: int, d_latent: int, split_tokens: int, causal: bool) -> list:
    """A split_tokens prefill cut into launches whose fp32 partials (every row x every split of the launch's longest
    key range) stay within ``decode.SPLIT_PARTIALS_BYTES``: a list of launches, each a list of pieces
    ``(b, i, j, keys)``, new tokens ``i:j`` of sequence ``b`` over its first ``keys`` cache positions (causal: up to
    the piece's last token; else all of them), consecutive in the packed order. One token per piece at least,
    however long its sequence (past the budget alone)."""
    budget = _decode.SPLIT_PARTIALS_BYTES
    launches, current, rows, longest = [], [], 0, 0
    for b, length in enumerate(lens):
        n = cu_q[b + 1] - cu_q[b]
        step = max(1, budget // _decode.split_partials_bytes(heads, d_latent, length, split_tokens))
        for i in range(0, n, step):
            j = min(n, i + step)
            keys = length - n + j if causal else length
            grown = _decode.split_partials_bytes((rows + j - i) * heads, d_latent, max(longest, keys), split_tokens)
            if current and (grown > budget or len(current) == _utils.MAX_GRID_YZ):
                launches.append(current)
                current, rows, longest = [], 0, 0
            current.append((b, i, j, keys))
            rows, longest = rows + j - i, max(longest, keys)
    return launches + [current] if current else launches


def _run_in_pieces(q_nope, q_pe, kv_cache, pe_cache, block_table, softmax_scale, causal, return_lse, host,
                   split_tokens, kv_scale):
    """A split_tokens prefill whose partials would pass ``decode.SPLIT_PARTIALS_BYTES`` at once, as launches over
    ``_pieces``: a piece is a ragged "sequence" of its own (new tokens ``i:j``, ``keys`` cache positions, the
    sequence's block table row), so each of its rows sees the keys, tiles and split boundaries it would see in one
    launch, and gets the same bits (the tiles and splits are fixed by the head count and ``split_tokens``; a row
    grouped with other rows only adds exact zeros for their keys). Returns (out [T, H, R], lse | None)."""
    cu_q, lens = host
    device, heads, d_latent = q_nope.device, q_nope.shape[1], q_nope.shape[2]
    launches = _pieces(cu_q, lens, heads, d_latent, split_tokens, causal)
    # every launch's cu_seqlens (P + 1), key counts (P) and sequence ids (P) in one copy to the device (pinned, not
    # waited for: a copy per launch from pageable memory would wait for the launches before it; written by device
    # operations where a CUDA graph is being captured, _utils.to_device)
    flat = []
    for pieces in launches:
        flat += itertools.accumulate((j - i for _, i, j, _ in pieces), initial=0)
        flat += [k for *_, k in pieces] + [b for b, *_ in pieces]
    index = _utils.to_device(torch.tensor(flat, dtype=torch.int64, pin_memory=_utils.pin_host(device)), device)
    # the pieces cover the T packed tokens in order: each launch's rows are copied to their place as it finishes
    out = q_nope.new_empty(q_nope.shape[0], heads, d_latent)
    lse = q_nope.new_empty(q_nope.shape[0], heads, dtype=torch.float32) if return_lse else None
    at = 0
    for pieces in launches:
        start, end = cu_q[pieces[0][0]] + pieces[0][1], cu_q[pieces[-1][0]] + pieces[-1][2]
        n = len(pieces)
        cu, keys, rows = index[at:at + n + 1], index[at + n + 1:at + 2 * n + 1], index[at + 2 * n + 1:at + 3 * n + 1]
        at += 3 * n + 1
        with _utils.launch_device(device):
            piece_out, piece_lse = _launch(q_nope[start:end], q_pe[start:end], kv_cache, pe_cache,
                                           block_table.index_select(0, rows), keys, cu, softmax_scale, causal,
                                           return_lse, batch=n, seq_q=0, total_tokens=end - start,
                                           max_seqlen_q=max(j - i for _, i, j, _ in pieces),
                                           max_seqlen_k=max(k for *_, k in pieces), num_splits=None,
                                           kv_scale=kv_scale, split_tokens=split_tokens)
        out[start:end] = piece_out
        if return_lse:
            lse[start:end] = piece_lse
    return out, lse


# (D_nope, D_v, P, dtype, device) whose expanded kernel the GPU refused for want of shared memory even at the
# smallest tiles the fitting reaches (fp32 at widths near 1024; the estimate that fits the tiles is an upper
# bound there, so it cannot decide alone): "auto" takes the absorbed path for them from then on
_EXPANDED_UNFIT: set = set()


def mla_prefill_attention(q_nope, q_pe, kv_cache, pe_cache, block_table, cu_seqlens_q, cache_seqlens, w_kv_b,
                          softmax_scale, causal=True, path="auto", *, return_lse=False, kv_scale=None,
                          cu_seqlens_q_host=None, cache_seqlens_host=None, split_tokens=None, sinks=None):
    """MLA prefill as a model calls it: raw queries in, per-head values out, over the paged latent cache.

    Args:
        q_nope: ``[T, H, D_nope]`` nope part of the queries (NOT absorbed), packed by cu_seqlens_q; bf16, fp16 or fp32.
        q_pe: ``[T, H, P]`` rope part, rope applied; same dtype (P may be 0: no rotary part).
        kv_cache, pe_cache, block_table, cu_seqlens_q, cache_seqlens, softmax_scale, causal: as in
            ``mla_prefill`` (the new tokens' latent and rope key are already written to the cache).
        w_kv_b: ``[H * (D_nope + D_v), R]`` transformers' ``kv_b_proj.weight``; same dtype as q.
        path: "absorbed" (q @ W_UK, ``mla_prefill``, then W_UV), "expanded" (latent expanded through
            w_kv_b into per-head K and V, then flash attention), or "auto": the cheaper by
            ``choose_prefill_path``. Where the GPU refuses the expanded kernel for want of shared memory even
            at its smallest tiles (fp32 at widths near 1024), "expanded" raises a ``ValueError`` and "auto"
            takes the absorbed path (for these widths from then on).
        return_lse: also return ``lse [T, H]`` float32 (the same for both paths).
        kv_scale: an FP8 cache's scales, as in ``mla_decode``. The absorbed path dequantizes in the kernel's
            registers; the expanded path in its gather kernel, before its GEMM.
        cu_seqlens_q_host, cache_seqlens_host: the lengths as lists of Python ints, as in ``mla_prefill``.
        split_tokens: batch-invariant attention, as in ``mla_prefill``: runs the absorbed path ("auto" takes it;
            "expanded", whose key and value GEMM and tiles follow the batch, is refused with a ``ValueError``). The
            attention's output and lse then depend on the row's own sequence alone; the projections around it are
            cuBLAS GEMMs over the batch's tokens, which make no such promise (``mla_decode``'s ``w_uv`` note).
        sinks: ``[H]`` attention sinks, as ``mla_decode``'s (the same for both paths).

    Returns:
        ``out [T, H, D_v]`` in q's dtype (and lse).

    The call needs the lengths on the host (the cost model and the expanded path's key count use them). Without
    ``cu_seqlens_q_host``/``cache_seqlens_host`` it copies cu_seqlens_q and cache_seqlens there once, which on a
    GPU synchronises with the host; with them nothing is read back. The expanded path allocates the gathered
    latent and the expanded keys and values, ``sum(cache_seqlens) x (R + H x (D_nope + D_v))`` elements.
    """
    if sinks is not None:  # the call with its lse, then the sinks
        return _with_sinks(mla_prefill_attention, sinks, return_lse, q_nope, q_pe, kv_cache, pe_cache, block_table,
                           cu_seqlens_q, cache_seqlens, w_kv_b, softmax_scale, causal, path, kv_scale=kv_scale,
                           cu_seqlens_q_host=cu_seqlens_q_host, cache_seqlens_host=cache_seqlens_host,
                           split_tokens=split_tokens)
    causal, return_lse = _utils.check_flag("causal", causal), _utils.check_flag("return_lse", return_lse)
    batch, page, device, host = _check_shapes(q_nope, q_pe, kv_cache, pe_cache, block_table, cu_seqlens_q,
                                              cache_seqlens, kv_scale, cu_seqlens_q_host, cache_seqlens_host)
    total, heads, d_nope = q_nope.shape
    d_latent, d_rope = kv_cache.shape[-1], pe_cache.shape[-1]
    _utils.check_width("kv_cache latent", d_latent)
    _utils.check_tensor("w_kv_b", w_kv_b, 2, _utils.FLOAT_DTYPES)
    _utils.check_same("w_kv_b", w_kv_b.dtype, "q_nope", q_nope.dtype, "dtype")
    _utils.check_same("w_kv_b", w_kv_b.shape[1], "kv_cache", d_latent, "latent width R (w_kv_b is [H*(D_nope+D_v), R])")
    if w_kv_b.shape[0] % heads or w_kv_b.shape[0] // heads <= d_nope:
        raise ValueError(f"w_kv_b must have H*(D_nope+D_v) rows with H={heads}, D_nope={d_nope}, D_v >= 1; "
                         f"got shape {tuple(w_kv_b.shape)}")
    _utils.check_devices(q_nope=q_nope, w_kv_b=w_kv_b)
    softmax_scale = _utils.check_scale("softmax_scale", softmax_scale)
    if path not in PATH_OPTIONS:
        raise ValueError(f"path must be one of {PATH_OPTIONS}, got {path!r}")
    if split_tokens is not None:
        split_tokens = _check_split_tokens(split_tokens, None)
        if path == "expanded":
            raise ValueError("split_tokens runs the absorbed path: the expanded path's tiles and key/value GEMM "
                             "follow the batch; use path='absorbed' or 'auto'")
        path = "absorbed"
    _utils.check_no_grad("mla_prefill_attention", q_nope=q_nope, q_pe=q_pe, kv_cache=kv_cache, pe_cache=pe_cache,
                         w_kv_b=w_kv_b, kv_scale=kv_scale)
    if torch.compiler.is_compiling():  # reads lengths on the host: inside a graph, one opaque op
        out, lse = torch.ops.mla_kernels.mla_prefill_attention(q_nope, q_pe, kv_cache, pe_cache, block_table,
                                                               cu_seqlens_q, cache_seqlens, w_kv_b, softmax_scale,
                                                               causal, path, return_lse, kv_scale, cu_seqlens_q_host,
                                                               cache_seqlens_host, split_tokens)
        return (out, lse) if return_lse else out
    max_seqlen_q, max_seqlen_k, host = _check_values(q_nope, kv_cache, block_table, cu_seqlens_q, cache_seqlens,
                                                     batch, page, device, None, None, host, host_sync=True)
    if split_tokens is not None:
        split_tokens = _check_split_tokens(split_tokens, None, max_seqlen_k)
    d_v = w_kv_b.shape[0] // heads - d_nope
    cu_q, lens = host
    new_lens = [cu_q[b + 1] - cu_q[b] for b in range(batch)]
    chosen = path == "auto"
    unfit = (d_nope, d_v, d_rope, q_nope.dtype, q_nope.device)  # a key of _EXPANDED_UNFIT
    if chosen:  # the lengths and widths are checked already
        path = "absorbed" if unfit in _EXPANDED_UNFIT else \
            _choose(new_lens, lens, heads, d_latent, d_rope, d_nope, d_v, causal, device=q_nope.device,
                    elem_bytes=q_nope.element_size())
    w = w_kv_b.reshape(heads, d_nope + d_v, d_latent)

    def absorbed():
        q_latent = torch.bmm(q_nope.transpose(0, 1), w[:, :d_nope]).transpose(0, 1)  # [T, H, R]
        out, lse = _run_absorbed(q_latent, q_pe, kv_cache, pe_cache, block_table, cu_seqlens_q, cache_seqlens,
                                 softmax_scale, causal, return_lse, batch, max_seqlen_q, max_seqlen_k, None, host,
                                 kv_scale=kv_scale, split_tokens=split_tokens)
        out = _project_v(out, w[:, d_nope:])
        return (out, lse) if return_lse else out

    if path == "absorbed":
        return absorbed()

    for name, width in (("q_nope (D_nope)", d_nope), ("w_kv_b (D_v)", d_v)):
        if not _expanded_width_ok(width):
            raise ValueError(f"path='expanded' needs {name} to be a power of two from 16 to 1024, got {width}")
    if total == 0:  # no query attends: nothing to gather or expand
        out = q_nope.new_empty(0, heads, d_v)
        return (out, q_nope.new_empty(0, heads, dtype=torch.float32)) if return_lse else out
    total_keys = sum(lens)
    if _utils.use_triton(q_nope):
        with _utils.launch_device(q_nope.device):
            latent, cu_k = _gather_latent(kv_cache, block_table, cache_seqlens, total_keys, max_seqlen_k, kv_scale,
                                          w_kv_b.dtype)
            k_nope, v = _expand(latent, w_kv_b, heads, d_nope)
            try:
                out, lse = _launch_expanded(q_nope, q_pe, k_nope, v, pe_cache, block_table, cu_seqlens_q, cu_k,
                                            cache_seqlens, softmax_scale, causal, return_lse,
                                            max_seqlen_q=max_seqlen_q)
            except OutOfResources as exc:  # refused at load, before it ran: nothing was written
                if not chosen:
                    raise ValueError(f"path='expanded' does not fit this GPU's shared memory at D_nope={d_nope}, "
                                     f"D_v={d_v}, P={d_rope} in {q_nope.dtype}, even at its smallest tiles "
                                     f"({exc}); use path='absorbed' (or 'auto', which then takes it)") from exc
                _EXPANDED_UNFIT.add(unfit)  # auto: the absorbed path, now and for later calls of these widths
                return absorbed()
    else:
        cu_k = F.pad(torch.cumsum(cache_seqlens, 0), (1, 0))  # [B+1] int64
        latent = _gather_latent_torch(kv_cache, block_table, cache_seqlens, cu_k, total_keys, kv_scale, w_kv_b.dtype)
        k_nope, v = _expand(latent, w_kv_b, heads, d_nope)
        k_pe = _gather_latent_torch(pe_cache, block_table, cache_seqlens, cu_k, total_keys)
        cu_k_host = list(itertools.accumulate(lens, initial=0))
        out, lse = _expanded_torch(q_nope, q_pe, k_nope, v, k_pe, cu_q, cu_k_host, softmax_scale, causal)
    return (out, lse) if return_lse else out
