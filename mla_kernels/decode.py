"""Absorbed MLA attention over a paged latent cache: decode (and the latent-space prefill path).

One kernel does the attention for both ``mla_decode`` (S_q new tokens per sequence, the
same for every sequence) and ``mla_prefill`` (ragged rows given by ``cu_seqlens_q``; the
``VARLEN`` flag). A program owns a block of ``BLOCK_M`` query rows of one sequence, where
the (token, head) pairs of the sequence are flattened into rows, so every head of a short
decode step shares each cache tile it loads; it walks one split of the sequence's cache in
tiles of ``BLOCK_N`` tokens. Each tile of the latent is used twice, for the scores and as
the value, since in absorbed MLA the latent *is* V:

    scores = q_nope . kv^T + q_pe . pe^T            # [BLOCK_M, BLOCK_N]
    acc   += softmax(scores) . kv                    # [BLOCK_M, D_LATENT]

When the batch cannot fill the GPU, the cache length is split across programs, each writes
its normalised partial output and log-sum-exp, and a combine kernel merges them.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _launcher, _tuning, _utils
from ._convert import to_dtype
from . import schedule as _schedule

LOG2E = _utils.LOG2E  # (one definition: _utils.MAX_SCALE is derived from it too)
LN2 = 0.6931471805599453
LN2_C: tl.constexpr = tl.constexpr(LN2)
# the portable kernel's cache loads with a config's ``EVICT: True`` (``_mla_attn_block``'s KV_EVICT): FlashMLA marks
# its cache stream evict-first (issue 8); whether that pays here (a sequence's row blocks share its keys in L2 above
# 64 rows) is for a GPU sweep to say (``bench.autotune`` tries it on each class's winner)
EVICT_FIRST = "evict_first"
MIN_SPLIT_TOKENS = 256  # below this, a split's fixed cost (q load, partial write, combine) outweighs its work
MAX_GRID_SPLITS = _utils.MAX_GRID_YZ  # the splits are the grid's z axis


def evict_changes_code(cfg: dict, device: torch.device) -> bool:
    """Whether a config's ``EVICT`` changes what the GPU runs (so a sweep times something new): on NVIDIA the plain
    loads of a one-stage loop carry the hint on every triton checked (3.6 to 3.9: ``ld.global.L1::evict_first`` with
    an L2 policy), the pipelined cp.async loads of two or more stages from triton 3.9 on (3.6 to 3.8 keep it in
    their IR and drop it there: the same PTX); gfx942's code is the same with it (triton 3.9)."""
    if _utils.on_hip(device):
        return False
    return cfg.get("num_stages", 1) <= 1 or _launcher._VERSION >= (3, 9)


# --------------------------------------------------------------------------------------------
# configs: (BLOCK_M, BLOCK_N, num_warps, num_stages), chosen per GPU family and problem shape
# --------------------------------------------------------------------------------------------


def _config(rows_per_seq: int, d_latent: int, hip: bool = False) -> dict:
    """Tile sizes for a launch. ``rows_per_seq`` = query tokens x heads of one sequence.

    NVIDIA, D_LATENT 512: the winners of a 38-config sweep on an H100 (triton 3.6, B128 L4096 page 64;
    bench/results/h100-2026-11-22/h100-2026-11-22-config-sweep.json, 2026-11-22), also the "config override"
    column of the side-by-side run there:
      - at most 16 rows (16 heads, one token): 16 x 32 tiles, 4 warps, 2 stages: 292 us, 2.08 TB/s
        (8 warps ran 362 us);
      - above: 64 x 64 tiles, 8 warps, 2 stages: 736 us, 199 TFLOP/s at 128 heads, 4.2x the 32 x 16 tiles
        shipped before. ptxas reports 116 bytes of spills for it (triton 3.6, compiled as the JIT specializes it;
        2.1 KB without the alignment facts); the measured time decides, not the report.
    Issue 9's per-GPU config files replace these where a GPU has been tuned.
    MI300 (64-wide wavefronts, 512 VGPRs per lane, 64 KiB LDS per CU): compile-checked only, never timed.
    tl.dot needs M, N >= 16. The interpreter runs the NVIDIA configs, so CPU tests cover the tiles a GPU runs.
    """
    if d_latent <= 128:
        return dict(BLOCK_M=min(64, max(16, _utils.next_pow2(rows_per_seq))), BLOCK_N=64, num_warps=4,
                    num_stages=2)
    if hip:
        if rows_per_seq <= 16:
            return dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=1)
    if d_latent > 512:  # R = 1024: a 64 x 64 tile pair would need 256 KiB of shared memory (H100: 227 KiB)
        return dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=2) if rows_per_seq <= 16 else \
            dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=2)
    if rows_per_seq <= 16:
        return dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)


def decode_tiles(rows_per_seq: int, d_latent: int, device: torch.device, d_rope: int = 64,
                 elem_bytes: int = 2, kv_fp8: bool = False, call: tuple | None = None) -> dict:
    """The launch config a call gets: this GPU's tuned config for the shape class (``mla_kernels/configs``), else
    ``_config``'s heuristic, with its tiles shrunk where they would not fit the GPU's shared memory at these
    widths, query element size (``elem_bytes``) and cache format (``kv_fp8``): fp32 at 64 x 64 does not fit an
    H100. The one place that decides, so schedules built ahead (``mla_decode_metadata``) use the tiles the
    launch will use.

    Fitted by the portable kernel's estimate (``decode_shared_bytes``), the kernel every config can fall back to
    and the only one a schedule runs. ``call``: ``(q_nope, kv_cache, pe_cache)`` of a launch the Hopper kernels may
    serve (``_launch``: no schedule, no fp8 cache, not sparse). A config asking for them (``TMA`` / ``GLUON``) is
    then fitted by the TMA kernel's own estimate where ``_hopper_kernel`` takes the fitted tiles for this call: the
    TMA probe's 16 x 64 x 3-stage tiles (159764 B compiled) are over the portable kernel's count (239616 B) and
    would otherwise run as 16 x 32."""
    cfg = (_tuning.lookup("decode", _tuning.decode_class(rows_per_seq, d_latent, elem_bytes), device)
           or _config(rows_per_seq, d_latent, _utils.on_hip(device)))
    if call is not None and (cfg.get("TMA") or cfg.get("GLUON")):
        fitted = _fit_tiles(cfg, device, d_latent, d_rope, elem_bytes, kv_fp8, tma=True)
        if _hopper_kernel(fitted, *call) is not None:
            return fitted
    return _fit_tiles(cfg, device, d_latent, d_rope, elem_bytes, kv_fp8)


def schedule_tiles(rows_per_seq: int, d_latent: int, device: torch.device, d_rope: int = 64, elem_bytes: int = 2,
                   kv_fp8: bool = False) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_N)`` of ``decode_tiles``: the tiles a schedule is cut along (``mla_decode_metadata``) and
    checked against (``_check_metadata``). Both run while torch.compile traces a step that builds or passes
    ``metadata``; on a GPU the lookup reads the device's config file (once, cached), and dynamo, which ignores
    ``functools.lru_cache`` wrappers, would trace that file I/O and fail (fullgraph) or break the graph. So the
    lookup is a constant of the graph (``_constant_tiles``), called eagerly at trace time with the rows' class
    representative (``rows_representative``): when dynamo has made S_q or the head count symbolic, the class
    comparisons become guards (a graph per class, not per S_q) and the lookup still gets a plain int. The widths
    too (``plain_width``): symbolic where dynamo made them so (``dynamic=True``, ``mark_dynamic``, or one compiled
    step seeing two models' widths), they failed the trace."""
    return _constant_tiles(rows_representative(rows_per_seq), plain_width(d_latent), device, plain_width(d_rope),
                           elem_bytes, kv_fp8)


def rows_representative(rows_per_seq: int) -> int:
    """One row count standing for ``rows_per_seq``'s class: ``decode_tiles`` gives every count of a class the same
    tiles, since the tuned configs are keyed by ``_tuning.decode_class`` and ``_config`` compares the rows with
    the same bounds (``tests/test_schedule.py`` checks every count up to 300). Plain ints in, a plain int out; a
    symbolic count (torch.compile) comes out as the int of its class, with the comparisons as guards."""
    for bound in _tuning.DECODE_ROWS:
        if rows_per_seq <= bound:
            return bound
    return _tuning.DECODE_ROWS[-1] + 1


_WIDTH_ORDER = (512, 64, *sorted(_utils.WIDTHS - {512, 64}))  # check_width's, DeepSeek's first (eager: 1-2 tests)


def plain_width(width: int) -> int:
    """A latent or rope width as a plain int: itself, or for a symbolic width (torch.compile) its value, the
    comparison an equality guard: the tiles depend on the exact width, so a graph per width (widths are fixed per
    model). A width no check admits (not a power of two from 16 to 1024) is returned as it is."""
    for w in _WIDTH_ORDER:
        if width == w:
            return w
    return width


@torch.compiler.assume_constant_result
def _constant_tiles(rows_per_seq: int, d_latent: int, device: torch.device, d_rope: int, elem_bytes: int,
                    kv_fp8: bool) -> tuple[int, int]:
    cfg = decode_tiles(rows_per_seq, d_latent, device, d_rope, elem_bytes, kv_fp8)
    return cfg["BLOCK_M"], cfg["BLOCK_N"]


def _fit_tiles(cfg: dict, device, d_latent: int, d_rope: int, elem_bytes: int, kv_fp8: bool,
               hip: bool | None = None, tma: bool = False) -> dict:
    estimate = functools.partial(decode_shared_bytes, tma=True) if tma else decode_shared_bytes
    return _utils.fit_tiles(cfg, device, estimate, d_latent, d_rope, elem_bytes, kv_fp8, hip=hip)


def decode_shared_bytes(cfg: dict, d_latent: int, d_rope: int, elem_bytes: int, kv_fp8: bool = False,
                        hip: bool = False, tma: bool = False) -> int:
    """Shared memory the portable kernel's operand tiles take on sm_90 (triton 3.6, compiled with the alignment
    facts the JIT specializes on): the query block once, and ``num_stages`` key blocks, which the pipeliner fills
    with cp.async copies ahead of use. With an fp8 cache the stages hold the raw e4m3 latent and one dequantized
    block is staged for the dots; with fp32 inputs the probability tile too. Exact for the bf16 64 x 64 tiles
    (221184 bytes), an upper bound for the others; ``tests/test_compile.py`` holds the compiler's figure to it.

    ``hip``: LDS on gfx942 instead (triton 3.9's AMD backend): each dot operand passes through LDS on its own,
    in one buffer the next reuses, so the largest decides: rows x the wider of the latent and rope widths x bytes,
    for the query block or a key block (raw e4m3 with an fp8 cache). The compiler's figure to the byte at 18
    one-stage points (heads 1-128, widths 16-1024, bf16/fp32/fp8); a two-stage loop took 1.1-2x that, so it counts
    twice.

    ``tma``: the tensor-descriptor kernel's instead (``decode_tma``, bf16/fp16 on sm_90, no fp8 cache; the Gluon
    kernel's 64 x 64 tiles, which fall back to it, fit the same): the query block and two key blocks whatever the
    stage count. sm_90 (triton 3.6 and 3.9) compiled 64 x 64 tiles at 221208 B with 2 stages and 221220 B with 3,
    16 x 64 at 3 stages 159764 B, 16 x 32 at 2 stages 89096 B: at most ``SHARED_SCRATCH_BYTES`` over this count,
    which ``tests/test_compile.py`` holds at the TMA probe's tiles."""
    block_m, block_n, stages = cfg["BLOCK_M"], cfg["BLOCK_N"], max(1, cfg.get("num_stages", 1))
    if tma:
        return (block_m + 2 * block_n) * (d_latent + d_rope) * elem_bytes
    if hip:
        wide = max(d_latent, d_rope)
        tiles = max(block_m * wide * elem_bytes, block_n * wide * (1 if kv_fp8 else elem_bytes))
        return tiles * (2 if stages > 1 else 1)
    width = d_latent + d_rope
    if kv_fp8:
        keys = stages * block_n * (d_latent + d_rope * elem_bytes) + block_n * d_latent * elem_bytes
    else:
        keys = stages * block_n * width * elem_bytes
    tiles = block_m * width * elem_bytes + keys
    if elem_bytes == 4:
        tiles += block_m * block_n * 4
    return tiles


def _num_splits(programs_per_split: int, max_seqlen: int, device: torch.device, block_m: int = 16,
                waves: int | None = None) -> int:
    """Split the cache length so the programs fill the GPU, no split shorter than MIN_SPLIT_TOKENS.

    Decided from shapes only: no host synchronisation. Memory-bound small row blocks aim at about two
    waves; 64-row tiles (tensor-core bound) at one wave, since on an H100 at B128 L4096 H128 one split ran
    213 TFLOP/s against 182 for two (h100-2026-11-22-structure-probe.json)."""
    sms = _utils.num_sms(device)
    waves = waves or (1 if block_m >= 64 else 2)  # a tuned config may set its own (``waves``)
    want = _utils.cdiv(waves * sms, max(1, programs_per_split))
    most = max(1, max_seqlen // MIN_SPLIT_TOKENS)
    return int(max(1, min(want, most, 128)))


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _online_softmax_step(qk, m_i, l_i):
    """One tile of the running softmax, in log2 units: ``qk [BLOCK_M, BLOCK_N]`` scaled scores (-inf where hidden),
    ``m_i``/``l_i [BLOCK_M]`` running max and sum. Returns ``(p, alpha, m_new, l_new)``: the tile's unnormalised
    probabilities, the factor rescaling earlier partial sums, and the new state. A row may have seen no key of
    finite score yet (its max is -inf: every key hidden, or every score -inf from the data, an infinite query or
    key element or a score past float32's range), so the max is taken as 0 there to keep exp2 finite."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)  # [BLOCK_M]
    p = tl.math.exp2(qk - m_safe[:, None])  # [BLOCK_M, BLOCK_N]
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _e4m3_to_f32(bits):
    """e4m3fn bits (uint8) -> fp32, exactly, without Triton's e4m3 type (which NVIDIA GPUs before sm_89 lack): the
    seven magnitude bits put at fp16's exponent and top mantissa bits give the value / 256 (fp16's exponent bias is
    8 more than e4m3's; subnormals line up too), and 0x7F (with either sign) is e4m3fn's NaN."""
    b = bits.to(tl.uint16)
    half = (((b & 0x80) << 8) | ((b & 0x7F) << 7)).to(tl.float16, bitcast=True)
    return tl.where((b & 0x7F) == 0x7F, float("nan"), half.to(tl.float32) * 256.0)


@triton.jit
def _dequant_fp8(kv, scale_rows, n_mask, D_LATENT: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """An fp8 latent tile ``kv [BLOCK_N, D_LATENT]`` (e4m3, or its bits as uint8: ``_utils.fp8_bits``) times its
    per-(token, 128 values) fp32 scales, loaded through ``scale_rows [BLOCK_N]`` (each token's first scale), in
    ``OUT_DTYPE`` (the query's): the dots then run as for a bf16 cache. Rows outside ``n_mask`` get scale 0."""
    offs_g = tl.arange(0, D_LATENT // 128)
    scale = tl.load(scale_rows[:, None] + offs_g[None, :], mask=n_mask[:, None], other=0.0)  # [BLOCK_N, D_LATENT // 128]
    values = _e4m3_to_f32(kv) if kv.dtype == tl.uint8 else kv.to(tl.float32)
    groups = tl.reshape(values, [kv.shape[0], D_LATENT // 128, 128]) * scale[:, :, None]
    return to_dtype(tl.reshape(groups, [kv.shape[0], D_LATENT]), OUT_DTYPE)


@triton.jit
def _query_rows(Q_NOPE, Q_PE, CU_SEQLENS_Q, pid_b, s_q, num_heads, stride_qn_b, stride_qn_s, stride_qp_b,
                stride_qp_s, VARLEN: tl.constexpr):
    """Where sequence ``pid_b``'s query rows are: ``(tok_start, seq_q, q_nope_base, q_pe_base, num_rows)``; its
    tokens start at packed token ``tok_start`` (prefill, ``VARLEN``) or at ``pid_b * s_q`` (decode); its
    ``num_rows = seq_q * num_heads`` rows are the (token, head) pairs.

    With ``VARLEN``, ``s_q`` is the number T of packed tokens, and the sequence's tokens are clamped to [0, T): a
    ``cu_seqlens_q`` no host has checked (a GPU call given ``max_seqlen_q``) that does not start at 0, runs past T
    or goes backwards then gives undefined values for its rows, but no row outside the output is read or written."""
    if VARLEN:
        tok_start = tl.minimum(tl.maximum(tl.load(CU_SEQLENS_Q + pid_b).to(tl.int64), 0), s_q)
        tok_end = tl.minimum(tl.maximum(tl.load(CU_SEQLENS_Q + pid_b + 1).to(tl.int64), tok_start), s_q)
        seq_q = (tok_end - tok_start).to(tl.int32)
        q_nope_base = Q_NOPE + tok_start * stride_qn_s
        q_pe_base = Q_PE + tok_start * stride_qp_s
    else:
        tok_start = pid_b * s_q
        seq_q = s_q
        q_nope_base = Q_NOPE + pid_b * stride_qn_b
        q_pe_base = Q_PE + pid_b * stride_qp_b
    return tok_start, seq_q, q_nope_base, q_pe_base, seq_q * num_heads


@triton.jit
def _row_ids(pid_m, num_rows, num_heads, seqlen, seq_q, BLOCK_M: tl.constexpr):
    """Row block ``pid_m``'s rows: ``(row_mask, tok, head, q_pos)``, each ``[BLOCK_M]``; a row is a (new token,
    head) pair, ``q_pos`` its token's absolute position in the cache."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // num_heads
    return rows < num_rows, tok, rows % num_heads, seqlen - seq_q + tok


@triton.jit
def _key_range(pid_m, n_start, key_len, seqlen, seq_q, num_rows, num_heads, BLOCK_M: tl.constexpr,
               CAUSAL: tl.constexpr):
    """End of the keys row block ``pid_m`` reads from ``n_start`` on: at most ``key_len`` of them, within the
    sequence, and (causal) no later than the last position any of its rows may see."""
    n_end = tl.minimum(n_start + key_len, seqlen)
    if CAUSAL:
        last_row = tl.minimum(pid_m * BLOCK_M + BLOCK_M, num_rows) - 1
        n_end = tl.minimum(n_end, seqlen - seq_q + last_row // num_heads + 1)
    return n_end


@triton.jit
def _softmax_finish(m_i, l_i):
    """``(1 / l, lse in log2 units)`` per row; rows that saw no key (``l_i`` exactly 0) get 1 and -inf (their
    accumulator is 0). A NaN ``l_i`` (a NaN in a used cache slot) stays NaN in both: ``l_i > 0`` would call it
    keyless, and the split combine would then drop its partial and give a finite answer without it."""
    has_key = l_i != 0.0
    safe_l = tl.where(has_key, l_i, 1.0)
    return 1.0 / safe_l, tl.where(has_key, m_i + tl.math.log2(safe_l), float("-inf"))


@triton.jit
def _mla_attn_kernel(
    Q_NOPE, Q_PE, KV, PE, KV_SCALE, BLOCK_TABLE, SEQLENS, CU_SEQLENS_Q,
    OUT, LSE, OUT_PART, LSE_PART, SCHED_PROGRAMS, SCHED_SEQUENCES,
    sm_scale_log2,
    num_heads, s_q, split_len, total_rows,
    stride_qn_b, stride_qn_s, stride_qn_h,
    stride_qp_b, stride_qp_s, stride_qp_h,
    stride_kv_blk, stride_kv_tok,
    stride_pe_blk, stride_pe_tok,
    stride_ks_blk, stride_ks_tok,
    stride_bt_b,
    D_LATENT: tl.constexpr, D_ROPE: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, SPLIT: tl.constexpr, STORE_LSE: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr = False,
    SCHEDULED: tl.constexpr = False, KV_EVICT: tl.constexpr = "",
):
    """Grid ``(row blocks, B, splits)``: program (m, b, s) reads split s of sequence b's keys for row block m.
    ``SCHEDULED`` (decode only): grid ``(row blocks, P)``; program (m, p) walks the units of row p of the
    schedule's tables (``schedule.DecodeSchedule``), writing whole sequences' outputs and cut ones' partials.
    ``KV_FP8``: ``KV`` holds e4m3 values with fp32 scales in ``KV_SCALE`` (one per 128 values of a token).
    ``KV_EVICT``: the cache loads' eviction policy (``_mla_attn_block``).
    ``s_q``: new tokens per sequence (decode), or with ``VARLEN`` the T packed tokens, a bound on ``CU_SEQLENS_Q``."""
    pid_m = tl.program_id(0)
    if SCHEDULED:
        pid_p = tl.program_id(1)
        first_seq = tl.load(SCHED_PROGRAMS + pid_p * 4)
        first_tile = tl.load(SCHED_PROGRAMS + pid_p * 4 + 1)
        # never past the call's batch (total_rows = B * S_q * H): FlashMLA's interface hands on tables built for more
        # sequences (a CUDA-graph buffer serving smaller batches after copy_), which without that copy_ name later
        # sequences, whose lengths, block-table rows, queries and outputs lie past the call's tensors
        last_seq = tl.minimum(tl.load(SCHED_PROGRAMS + pid_p * 4 + 2), total_rows // (s_q * num_heads) - 1)
        end_tile = tl.load(SCHED_PROGRAMS + pid_p * 4 + 3)
        for i in range(0, last_seq - first_seq + 1):
            seq = first_seq + i
            n_tiles = tl.cdiv(tl.load(SEQLENS + seq), BLOCK_N)
            t0 = tl.where(seq == first_seq, first_tile, 0)
            t1 = tl.where(seq == last_seq, end_tile, n_tiles)
            pieces = tl.load(SCHED_SEQUENCES + seq * 3 + 1)
            if pieces > 0:  # padding slots have no piece (the combine writes their zeros)
                # whole or cut as the schedule's table says, not as the lengths now say: the two agree for the
                # lengths it was built from, and for others (a schedule kept from an earlier step, unchecked on a
                # GPU) each piece still writes its own output or partial slot, never another sequence's, and every
                # output row is written (a piece left with no tile writes an empty partial)
                cut = pieces > 1
                # a cut sequence's piece goes to partial slot first_slot + (p - first_program) of the
                # [slots, S_q * H, D_LATENT] partials: output row seq * S_q * H + r becomes slot * S_q * H + r
                slot = tl.load(SCHED_SEQUENCES + seq * 3) + pid_p - tl.load(SCHED_SEQUENCES + seq * 3 + 2)
                _mla_attn_block(
                    Q_NOPE, Q_PE, KV, PE, KV_SCALE, BLOCK_TABLE, SEQLENS, CU_SEQLENS_Q, OUT, LSE, OUT_PART,
                    LSE_PART, sm_scale_log2, num_heads, s_q,
                    stride_qn_b, stride_qn_s, stride_qn_h, stride_qp_b, stride_qp_s, stride_qp_h,
                    stride_kv_blk, stride_kv_tok, stride_pe_blk, stride_pe_tok, stride_ks_blk, stride_ks_tok,
                    stride_bt_b,
                    pid_m, seq.to(tl.int64), t0, BLOCK_N, tl.maximum(t1 - t0, 0) * BLOCK_N, slot - seq,
                    s_q * num_heads, cut,
                    None, 0,
                    D_LATENT, D_ROPE, PAGE_SIZE, BLOCK_M, BLOCK_N, CAUSAL, VARLEN, STORE_LSE, DOT_FP32,
                    DOT_PRECISION, KV_FP8, False, KV_EVICT)
    else:
        pid_b = tl.program_id(1).to(tl.int64)
        pid_split = tl.program_id(2)
        _mla_attn_block(
            Q_NOPE, Q_PE, KV, PE, KV_SCALE, BLOCK_TABLE, SEQLENS, CU_SEQLENS_Q, OUT, LSE, OUT_PART, LSE_PART,
            sm_scale_log2, num_heads, s_q,
            stride_qn_b, stride_qn_s, stride_qn_h, stride_qp_b, stride_qp_s, stride_qp_h,
            stride_kv_blk, stride_kv_tok, stride_pe_blk, stride_pe_tok, stride_ks_blk, stride_ks_tok, stride_bt_b,
            pid_m, pid_b, pid_split, split_len, split_len, pid_split, total_rows, SPLIT, None, 0,
            D_LATENT, D_ROPE, PAGE_SIZE, BLOCK_M, BLOCK_N, CAUSAL, VARLEN, STORE_LSE, DOT_FP32, DOT_PRECISION,
            KV_FP8, False, KV_EVICT)


@triton.jit
def _mla_sparse_attn_kernel(
    Q_NOPE, Q_PE, KV, PE, KV_SCALE, BLOCK_TABLE, SEQLENS, INDICES,
    OUT, LSE, OUT_PART, LSE_PART,
    sm_scale_log2,
    num_heads, s_q, split_len, total_rows, topk,
    stride_qn_b, stride_qn_s, stride_qn_h,
    stride_qp_b, stride_qp_s, stride_qp_h,
    stride_kv_blk, stride_kv_tok,
    stride_pe_blk, stride_pe_tok,
    stride_ks_blk, stride_ks_tok,
    stride_bt_b,
    D_LATENT: tl.constexpr, D_ROPE: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, SPLIT: tl.constexpr, STORE_LSE: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr = False,
):
    """Sparse decode (``mla_decode``'s ``indices``): ``_mla_attn_kernel``'s body with ``SPARSE``, its own entry so
    the dense launch binds no extra argument (each costs Triton's launch time). Grid ``(B * S_q, row blocks,
    splits)``: program (t, m, s) serves query token t's heads over split s of its key list
    ``INDICES [B * S_q, topk]`` (cache positions; entries outside the sequence are skipped). Tokens go on the
    grid's first axis, whose limit is 2^31 - 1 (a chunk of sparse prefill can pass 65535 tokens, the others' limit)."""
    _mla_attn_block(
        Q_NOPE, Q_PE, KV, PE, KV_SCALE, BLOCK_TABLE, SEQLENS, None, OUT, LSE, OUT_PART, LSE_PART,
        sm_scale_log2, num_heads, s_q,
        stride_qn_b, stride_qn_s, stride_qn_h, stride_qp_b, stride_qp_s, stride_qp_h,
        stride_kv_blk, stride_kv_tok, stride_pe_blk, stride_pe_tok, stride_ks_blk, stride_ks_tok, stride_bt_b,
        tl.program_id(1), tl.program_id(0).to(tl.int64), tl.program_id(2), split_len, split_len, tl.program_id(2),
        total_rows, SPLIT, INDICES, topk,
        D_LATENT, D_ROPE, PAGE_SIZE, BLOCK_M, BLOCK_N, CAUSAL, False, STORE_LSE, DOT_FP32, DOT_PRECISION,
        KV_FP8, True, "")  # (every argument given: triton 3.6 passes a called function's str default unwrapped)


@triton.jit
def _mla_attn_block(
    Q_NOPE, Q_PE, KV, PE, KV_SCALE, BLOCK_TABLE, SEQLENS, CU_SEQLENS_Q, OUT, LSE, OUT_PART, LSE_PART,
    sm_scale_log2, num_heads, s_q,
    stride_qn_b, stride_qn_s, stride_qn_h, stride_qp_b, stride_qp_s, stride_qp_h,
    stride_kv_blk, stride_kv_tok, stride_pe_blk, stride_pe_tok, stride_ks_blk, stride_ks_tok, stride_bt_b,
    pid_m, pid_b, pid_split, split_len, key_len, part_index, part_stride, to_part, INDICES, topk,
    D_LATENT: tl.constexpr, D_ROPE: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr, STORE_LSE: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr, SPARSE: tl.constexpr,
    KV_EVICT: tl.constexpr,
):
    """Row block ``pid_m`` of sequence ``pid_b`` over keys ``pid_split * split_len`` on, ``key_len`` of them at most.
    ``to_part`` (a constexpr in the split grid, a runtime flag when scheduled): write the normalised fp32 partial
    and log2 lse to row ``part_index * part_stride + out_row`` of the partial buffers instead of the final output.
    ``SPARSE``: ``pid_b`` is query token t = b * S_q + s (``s_q`` = S_q); its rows are its heads, and its keys are
    entries ``pid_split * split_len`` on of its list ``INDICES[t, :topk]``, not cache positions. ``KV_EVICT``: the
    cache loads' eviction policy ("" the default, "evict_first": a hint that the cache stream is read once, as
    FlashMLA gives it; a config's ``EVICT``, untimed)."""
    if SPARSE:
        b = pid_b // s_q
        seqlen = tl.load(SEQLENS + b)
        tok_start, seq_q, num_rows = pid_b, 1, num_heads
        q_nope_base = Q_NOPE + b * stride_qn_b + (pid_b % s_q) * stride_qn_s
        q_pe_base = Q_PE + b * stride_qp_b + (pid_b % s_q) * stride_qp_s
        q_end = seqlen - s_q + (pid_b % s_q) + 1  # the token's position + 1: what a causal row may see
    else:
        b = pid_b
        tok_start, seq_q, q_nope_base, q_pe_base, num_rows = _query_rows(
            Q_NOPE, Q_PE, CU_SEQLENS_Q, pid_b, s_q, num_heads, stride_qn_b, stride_qn_s, stride_qp_b, stride_qp_s,
            VARLEN)
        seqlen = tl.load(SEQLENS + pid_b)
        q_end = seqlen
    # rows past the sequence's: nothing to do (an if, not an early return: triton before 3.4 refuses a return in
    # a function called inside a loop, as the scheduled kernel calls this one)
    if pid_m * BLOCK_M < num_rows:
        row_mask, tok, head, q_pos = _row_ids(pid_m, num_rows, num_heads, q_end, seq_q, BLOCK_M)
        offs_r = tl.arange(0, D_LATENT)

        # the query's token and head offsets in 64 bits: int32 ones wrap past 2^31 elements, which a head stride
        # reaches at 2^31 / (H x R) packed tokens (about 33K at 128 heads, R = 512) for the [H, T, R] layout that
        # absorbing q through bmm gives ([T, H, R] by transpose: head stride T x R), and a token stride within one
        # sequence of that many new tokens
        q_off_n = tok.to(tl.int64)[:, None] * stride_qn_s + head.to(tl.int64)[:, None] * stride_qn_h
        q_off_p = tok.to(tl.int64)[:, None] * stride_qp_s + head.to(tl.int64)[:, None] * stride_qp_h
        q_nope = tl.load(q_nope_base + q_off_n + offs_r[None, :], mask=row_mask[:, None], other=0.0)  # [BLOCK_M, R]
        if DOT_FP32:
            q_nope = q_nope.to(tl.float32)
        if D_ROPE > 0:  # (D_ROPE 0: MLA without a rotary part, no rope key is read)
            offs_p = tl.arange(0, D_ROPE)
            q_pe = tl.load(q_pe_base + q_off_p + offs_p[None, :], mask=row_mask[:, None], other=0.0)  # [BLOCK_M, P]
            if DOT_FP32:
                q_pe = q_pe.to(tl.float32)

        # keys this program reads: its split, cut at the last position any of its rows may see (sparse: its split of
        # the token's key list)
        n_start = pid_split * split_len
        if SPARSE:
            n_end = tl.minimum(n_start + key_len, topk)
        else:
            n_end = _key_range(pid_m, n_start, key_len, seqlen, seq_q, num_rows, num_heads, BLOCK_M, CAUSAL)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D_LATENT], dtype=tl.float32)
        bt_row = BLOCK_TABLE + b * stride_bt_b

        for start in range(n_start, n_end, BLOCK_N):
            if SPARSE:  # the tile's cache positions from the list; entries outside the sequence (-1 pads) are skipped
                offs_j = start + tl.arange(0, BLOCK_N)
                offs_n = tl.load(INDICES + pid_b * topk + offs_j, mask=offs_j < n_end, other=-1)
                # causal: one token per program, so an entry past its position is skipped before any load
                n_mask = (offs_n >= 0) & (offs_n < (q_end if CAUSAL else seqlen))
                offs_n = tl.where(n_mask, offs_n, 0)
            else:
                offs_n = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] cache positions
                n_mask = offs_n < n_end
            block_id = tl.load(bt_row + offs_n // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
            in_page = (offs_n % PAGE_SIZE).to(tl.int64)
            kv = tl.load(KV + (block_id * stride_kv_blk + in_page * stride_kv_tok)[:, None] + offs_r[None, :],
                         mask=n_mask[:, None], other=0.0, eviction_policy=KV_EVICT)  # [BLOCK_N, D_LATENT]
            if KV_FP8:  # e4m3 latent: dequantized in registers to the query's dtype
                kv = _dequant_fp8(kv, KV_SCALE + block_id * stride_ks_blk + in_page * stride_ks_tok, n_mask, D_LATENT,
                                  Q_NOPE.dtype.element_ty)
            kv_dot = kv.to(tl.float32) if DOT_FP32 else kv
            qk = tl.dot(q_nope, tl.trans(kv_dot), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
            if D_ROPE > 0:
                pe = tl.load(PE + (block_id * stride_pe_blk + in_page * stride_pe_tok)[:, None] + offs_p[None, :],
                             mask=n_mask[:, None], other=0.0, eviction_policy=KV_EVICT)  # [BLOCK_N, D_ROPE]
                pe_dot = pe.to(tl.float32) if DOT_FP32 else pe
                qk = tl.dot(q_pe, tl.trans(pe_dot), qk, input_precision=DOT_PRECISION)
            qk = qk * sm_scale_log2
            visible = n_mask[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= q_pos[:, None])
            qk = tl.where(visible, qk, float("-inf"))

            p, alpha, m_i, l_i = _online_softmax_step(qk, m_i, l_i)
            p = to_dtype(p, kv.dtype)
            if DOT_FP32:
                p = p.to(tl.float32)
            acc = tl.dot(p, kv_dot, acc * alpha[:, None], input_precision=DOT_PRECISION)  # [BLOCK_M, D_LATENT]

        inv_l, lse_log2 = _softmax_finish(m_i, l_i)
        out = acc * inv_l[:, None]
        out_rows = (tok_start + tok) * num_heads + head  # row of the contiguous [tokens * num_heads] output
        if to_part:  # partials: [num_splits, total_rows, D_LATENT] fp32 and [num_splits, total_rows] in log2 units
            part_rows = part_index.to(tl.int64) * part_stride + out_rows
            # a row that saw no key here (lse -inf: every row of an empty split) weighs 0 in the combine, which
            # never reads its partial: its lse alone is written (D_LATENT fp32 fewer per row and split)
            seen = row_mask & (lse_log2 != float("-inf"))
            tl.store(OUT_PART + part_rows[:, None] * D_LATENT + offs_r[None, :], out, mask=seen[:, None])
            tl.store(LSE_PART + part_rows, lse_log2, mask=row_mask)
        else:
            tl.store(OUT + out_rows[:, None] * D_LATENT + offs_r[None, :], to_dtype(out, OUT.dtype.element_ty),
                     mask=row_mask[:, None])
            if STORE_LSE:
                tl.store(LSE + out_rows, lse_log2 * LN2_C, mask=row_mask)


@triton.jit
def _mla_combine_kernel(
    OUT_PART, LSE_PART, OUT, LSE, SCHED_SEQUENCES,
    num_rows, num_splits, split_stride, grid_rows,
    D_LATENT: tl.constexpr, STORE_LSE: tl.constexpr,
    SCHEDULED: tl.constexpr = False,
):
    """Merge split partials: out = sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max lse).

    One pass in split order with a running max (the partials' online softmax): each split's lse is read once,
    nothing is as wide as the split count (the kernel is the same for 2 splits or 65535), and the weights are
    summed one by one, not by a tree over lanes, so a row's result does not depend on how many empty splits
    follow its own (split_tokens' batch invariance).

    A program per row: row ``pid(1) * num_programs(0) + pid(0)`` of ``grid_rows`` (``_combine_grid``).

    ``SCHEDULED``: ``num_rows`` is the rows of one sequence (S_q * H), the sequence's pieces and first partial
    slot come from the schedule's table; whole sequences (one piece) were written by the attention kernel and
    are skipped, padding slots (no piece) get zeros and lse -inf."""
    row = tl.program_id(1).to(tl.int64) * tl.num_programs(0) + tl.program_id(0)
    if row >= grid_rows:  # the last row of programs' tail
        return
    part_row = row
    if SCHEDULED:
        seq = row // num_rows
        num_splits = tl.load(SCHED_SEQUENCES + seq * 3 + 1)
        if num_splits == 1:
            return
        part_row = tl.load(SCHED_SEQUENCES + seq * 3).to(tl.int64) * num_rows + row % num_rows
    offs_r = tl.arange(0, D_LATENT)
    acc = tl.zeros([D_LATENT], dtype=tl.float32)  # sum of w_s o_s, relative to m
    total = tl.full([], 0.0, tl.float32)  # sum of w_s, relative to m
    m = tl.full([], float("-inf"), tl.float32)  # the largest lse so far (log2 units)
    nan_split = tl.full([], 0, tl.int32)
    part = OUT_PART + part_row * D_LATENT + offs_r  # split s of this row is part + s * split_stride
    lse_row = LSE_PART + part_row  # and its lse lse_row + s * num_rows
    for s in range(0, num_splits):
        lse_s = tl.load(lse_row)
        if lse_s > m:  # a new largest: what was summed is rescaled to it (by 0 while nothing was: m = -inf)
            alpha = tl.math.exp2(m - lse_s)
            acc = acc * alpha + tl.load(part)
            total = total * alpha + 1.0
            m = lse_s
        elif lse_s > float("-inf"):  # a keyless split (lse -inf) adds nothing; a NaN one is flagged below
            w_s = tl.math.exp2(lse_s - m)
            acc += w_s * tl.load(part)
            total += w_s
        nan_split |= (lse_s != lse_s).to(tl.int32)
        lse_row += num_rows
        part += split_stride
    out = acc / tl.where(total > 0.0, total, 1.0)
    lse = tl.where(total > 0.0, m + tl.math.log2(tl.where(total > 0.0, total, 1.0)), float("-inf"))
    # a split whose lse is NaN (a NaN in a used cache slot) makes the row NaN, as one split would: the sums
    # above skip it (comparisons with NaN are false), which would leave a finite answer from the other splits
    out = tl.where(nan_split > 0, float("nan"), out)
    tl.store(OUT + row * D_LATENT + offs_r, to_dtype(out, OUT.dtype.element_ty))
    if STORE_LSE:
        tl.store(LSE + row, tl.where(nan_split > 0, float("nan"), lse) * LN2_C)


# --------------------------------------------------------------------------------------------
# launcher (shared with mla_prefill)
# --------------------------------------------------------------------------------------------


def _launch(q_nope, q_pe, kv_cache, pe_cache, block_table, cache_seqlens, cu_seqlens_q, softmax_scale, causal,
            return_lse, *, batch, seq_q, total_tokens, max_seqlen_q, max_seqlen_k, num_splits, config=None,
            schedule=None, kv_scale=None, reuse_scratch=False, indices=None, split_tokens=None):
    """Run the attention kernel (+ combine) on checked arguments. Returns (out [tokens*H, R] rows, lse | None).

    Decode passes 4-D q ([B, S_q, H, *]) with ``cu_seqlens_q=None``; prefill passes 3-D q ([T, H, *]).
    ``config`` (a dict like ``_config``'s) overrides the tiles. ``schedule`` (decode only, a checked
    ``schedule.DecodeSchedule``): run the persistent scheduled grid instead of the split grid.
    ``reuse_scratch``: take the split partials from ``_utils.scratch`` (eager ``mla_decode`` only). Never inside the
    custom ops: torch.compile's CUDA graphs (cudagraph trees) run their warm-up calls with allocations redirected to
    the graphs' private memory pool, whose blocks they reassign by their own bookkeeping, which a buffer kept
    across calls is not part of.
    ``indices`` (decode only, a checked contiguous ``[B * S_q, K]`` int tensor): sparse attention, each query token
    over its own K listed positions; the grid then has a program per token (its heads are its rows) and splits K.
    ``split_tokens`` (exclusive with ``num_splits`` and ``schedule``): splits begin at every multiple of it rounded
    up to the key tile, and the split grid and combine run even for one split, so a row's result is the same in any
    batch (``mla_decode``'s docstring); the default tiles are then a one-token decode's at this head count, which
    neither S_q nor (prefill, ``cu_seqlens_q``) the batch's ``max_seqlen_q`` chooses: a sequence's rows get the
    same bits from a decode of its S_q tokens and from a prefill of them.
    """
    varlen, sparse = cu_seqlens_q is not None, indices is not None
    heads, d_latent, d_rope = q_nope.shape[-2], q_nope.shape[-1], q_pe.shape[-1]
    device = q_nope.device
    elem_bytes, kv_fp8 = q_nope.element_size(), kv_scale is not None
    rows_per_program = heads if sparse else max_seqlen_q * heads
    # what picks the default tiles: with split_tokens a one-token decode's at this head count, for every S_q and
    # max_seqlen_q, so a sequence's rows get the same tiles whether a step decodes them (MLAttention: every
    # sequence with the same count) or prefills them (a ragged step)
    tile_rows = heads if split_tokens is not None else rows_per_program
    # (a launch the Hopper kernels may serve: a stored TMA config keeps the tiles that kernel fits)
    hopper_call = (q_nope, kv_cache, pe_cache) if schedule is None and kv_scale is None and not sparse else None
    cfg = config or decode_tiles(tile_rows, d_latent, device, d_rope, elem_bytes, kv_fp8, hopper_call)
    num_splits_arg, schedule_arg = num_splits, schedule  # (as given: a fallback launch sizes them again)
    total_rows = total_tokens * heads
    out = torch.empty(total_tokens, heads, d_latent, dtype=q_nope.dtype, device=device)
    lse = torch.empty(total_tokens, heads, dtype=torch.float32, device=device) if return_lse else None
    if total_rows == 0 or batch == 0:
        return out, lse

    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    m_blocks = _utils.cdiv(rows_per_program, block_m)
    programs_b = batch * seq_q if sparse else batch  # sparse: a program per query token
    keys = indices.shape[1] if sparse else max_seqlen_k  # what the splits cut: the key lists, or the cache length
    num_splits, split_len, split = _split_plan(keys, cfg, programs_b * m_blocks, device, num_splits, split_tokens)

    if varlen:
        qn_strides = (0, *q_nope.stride()[:2])
        qp_strides = (0, *q_pe.stride()[:2])
    else:
        qn_strides = q_nope.stride()[:3]
        qp_strides = q_pe.stride()[:3]
    if split:
        out_part, lse_part = _partials(device, reuse_scratch, (num_splits, total_rows, d_latent),
                                       (num_splits, total_rows))
    else:
        out_part = lse_part = out  # unused
    dummy = cache_seqlens
    grid = (m_blocks, programs_b, num_splits)
    if schedule is not None:  # persistent programs walk their units; only cut sequences write partials
        assert not varlen and not split, "schedule: decode only, one split"
        if (schedule.block_m, schedule.block_n) != (block_m, block_n):
            # cut for a stored config that failed to compile and was dropped (this launch's fallback, or a layer
            # after it; _check_metadata admits no other): the same grid cut again for these tiles, on the device
            schedule = _schedule.retile(schedule, cache_seqlens, block_m, block_n)
        grid = (m_blocks, schedule.num_programs, 1)
        out_part, lse_part = _partials(device, reuse_scratch, (schedule.num_part_slots, seq_q * heads, d_latent),
                                       (schedule.num_part_slots, seq_q * heads))

    sm_scale_log2 = softmax_scale * LOG2E
    s_q_arg = total_tokens if varlen else seq_q  # the kernels' s_q: T packed tokens with cu_seqlens_q (_query_rows)
    hopper = _hopper_kernel(cfg, *hopper_call) if hopper_call is not None else None
    try:  # (free when nothing is raised: a stored config's compile failure is handled after the fact)
        if hopper == "gluon":
            from .decode_gluon import launch_gluon
            launch_gluon(grid, q_nope, q_pe, kv_cache, pe_cache, block_table, cache_seqlens, cu_seqlens_q, out, lse,
                         out_part, lse_part, sm_scale_log2, heads, s_q_arg, split_len, total_rows, qn_strides,
                         qp_strides, causal=causal, varlen=varlen, split=split, return_lse=return_lse)
        elif hopper == "tma":
            from .decode_tma import launch_tma
            launch_tma(grid, q_nope, q_pe, kv_cache, pe_cache, block_table, cache_seqlens, cu_seqlens_q, out, lse,
                       out_part, lse_part, sm_scale_log2, heads, s_q_arg, split_len, total_rows, qn_strides,
                       qp_strides, causal=causal, varlen=varlen, split=split, return_lse=return_lse, cfg=cfg)
        else:
            _launch_portable(grid, q_nope, q_pe, kv_cache, pe_cache, block_table, cache_seqlens, cu_seqlens_q, out,
                             lse, out_part, lse_part, sm_scale_log2, heads, s_q_arg, split_len, total_rows,
                             qn_strides, qp_strides, causal=causal, varlen=varlen, split=split,
                             return_lse=return_lse, cfg=cfg, schedule=schedule, kv_scale=kv_scale, indices=indices)
        if schedule is not None:  # merge the cut sequences, zero the padding slots
            _launch_combine(out_part, lse_part, out, lse, dummy, total_rows, seq_q * heads, schedule.num_programs,
                            schedule=schedule)
        if split:
            _launch_combine(out_part, lse_part, out, lse, dummy, total_rows, total_rows, num_splits)
    except Exception as exc:
        if not _tuning.drop_on_compile_error(cfg, exc):
            raise
        # the stored config failed to compile: dropped, the heuristic tiles instead (the grid and splits again)
        fallback = _fit_tiles(_config(tile_rows, d_latent, _utils.on_hip(device)), device, d_latent, d_rope,
                              elem_bytes, kv_fp8)
        return _launch(q_nope, q_pe, kv_cache, pe_cache, block_table, cache_seqlens, cu_seqlens_q, softmax_scale,
                       causal, return_lse, batch=batch, seq_q=seq_q, total_tokens=total_tokens,
                       max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, num_splits=num_splits_arg,
                       config=fallback, schedule=schedule_arg, kv_scale=kv_scale, reuse_scratch=reuse_scratch,
                       indices=indices, split_tokens=split_tokens)
    return out, lse


def _split_plan(keys: int, cfg: dict, programs_per_split: int, device, num_splits, split_tokens) -> tuple:
    """How ``_launch`` cuts ``keys`` (the cache length, or a sparse call's key lists): ``(num_splits, split_len,
    split)``, where ``split`` says the split grid and the combine run. ``split_tokens``: fixed boundaries, none of
    them depending on the batch or on ``keys``, and the split grid even for one split (``mla_decode``'s batch
    invariance); else the given ``num_splits`` (cut to what can hold keys), or enough splits to fill the GPU."""
    block_n, keys = cfg["BLOCK_N"], max(keys, 1)
    if split_tokens is not None:
        # (past the longest sequence, one split of its length reads what a longer one would: the same keys)
        split_len = _utils.cdiv(min(split_tokens, keys), block_n) * block_n
        return _utils.cdiv(keys, split_len), split_len, True  # <= MAX_GRID_SPLITS (_check_split_tokens)
    if num_splits is None:
        num_splits = _num_splits(programs_per_split, keys, device, cfg["BLOCK_M"], cfg.get("waves"))
    else:  # splits past one per tile of the longest sequence could only be empty: no programs or partials
        # (and past MAX_GRID_SPLITS, the grid's limit: a split then holds several tiles)
        num_splits = min(num_splits, _utils.cdiv(keys, block_n), MAX_GRID_SPLITS)
    return num_splits, _utils.cdiv(_utils.cdiv(keys, num_splits), block_n) * block_n, num_splits > 1


def _launch_combine(out_part, lse_part, out, lse, dummy, total_rows: int, rows_per_part: int, num_parts: int,
                    schedule=None) -> None:
    """Merge the partials into ``out`` (and ``lse``): ``num_parts`` splits of ``rows_per_part`` rows each (the
    split grid: every row), or with ``schedule`` each cut sequence's pieces (its ``rows_per_part`` = S_q * H rows
    from its first partial slot; padding slots get zeros and -inf)."""
    d_latent = out.shape[-1]
    _launcher.launch(_mla_combine_kernel, _combine_grid(total_rows),
        out_part, lse_part, out, lse if lse is not None else dummy,
        schedule.sequences if schedule is not None else dummy,
        rows_per_part, num_parts, rows_per_part * d_latent, total_rows,
        D_LATENT=d_latent, STORE_LSE=lse is not None, SCHEDULED=schedule is not None,
        num_warps=4 if d_latent >= 256 else 2,
    )


COMBINE_GRID_X = 1 << 16  # the combine's programs per row of its grid (past it, a second axis counts the rows)


def _combine_grid(rows: int) -> tuple:
    """The combine's grid for ``rows`` rows: ``(rows, 1)``, or past ``COMBINE_GRID_X`` rows ``(COMBINE_GRID_X,
    cdiv(rows, COMBINE_GRID_X))``. One axis would do on CUDA (2^31 - 1 programs), but HIP refuses a launch whose
    first axis times its threads per program (64 x num_warps on an MI300) passes 2^32 - 1 work-items
    (hipErrorInvalidConfiguration): 16,777,216 rows at 4 warps, which a 131072-token sparse chunk at 128 heads
    with ``split_tokens`` reaches. 2^16 programs x 1024 threads fit; the second axis (65535) takes 2^32 rows."""
    return (rows, 1) if rows <= COMBINE_GRID_X else (COMBINE_GRID_X, _utils.cdiv(rows, COMBINE_GRID_X))


def _partials(device, reuse_scratch: bool, *shapes) -> tuple:
    """float32 buffers for the split partials: the reused scratch, or fresh ones (``_launch``'s ``reuse_scratch``)."""
    if reuse_scratch:
        return _utils.scratch(device, *shapes)
    return tuple(torch.empty(shape, dtype=torch.float32, device=device) for shape in shapes)


def _hopper_kernel(cfg: dict, q_nope, kv_cache, pe_cache) -> str | None:
    """The one dispatch between the portable kernel (None) and the Hopper kernels, by what the config asks for
    (no shipped default asks until a GPU has timed them):

    * ``"gluon"`` (``GLUON: True``, ``decode_gluon``): wgmma + TMA + mbarriers, written in Gluon. Only on an NVIDIA
      GPU of compute capability 9 (Hopper; Blackwell has tcgen05, not wgmma), with a triton that has Gluon, for
      calls it fits (``_gluon_serves``). Gluon does not run under the CPU interpreter, so there (and wherever it
      cannot serve a call) such a config falls back to the TMA kernel with the same 64 x 64 tiles, or the portable
      kernel.
    * ``"tma"`` (``TMA: True``, or a Gluon fallback; ``decode_tma``): tensor-descriptor tile loads in plain Triton,
      on compute capability 9+ or the CPU interpreter, where the call fits its layout (``tma_supported``).
    The scheduled grid and fp8 caches always run the portable kernel (``_launch`` does not ask)."""
    gluon, tma = cfg.get("GLUON"), cfg.get("TMA")
    if not (gluon or tma):
        return None
    device = q_nope.device
    if device.type == "cuda" and not _utils.nvidia_sm90(device):
        return None
    hopper = device.type == "cuda" and _utils.capability(device)[0] == 9
    if gluon and hopper and _gluon_serves(cfg, q_nope, kv_cache, pe_cache):
        return "gluon"
    from .decode_tma import tma_supported
    return "tma" if tma_supported(q_nope, kv_cache, pe_cache, cfg["BLOCK_N"]) else None


def _gluon_tiles() -> dict | None:
    """``decode_gluon.gluon_config()``, or None where this triton has no Gluon (it came with triton 3.5; the package
    asks for >= 3.2): what every optional user of the Gluon kernel (dispatch, autotune, bench, compile check) asks."""
    try:
        from .decode_gluon import gluon_config
    except ImportError:
        return None
    return gluon_config()


def _gluon_serves(cfg: dict, q_nope, kv_cache, pe_cache) -> bool:
    """The Gluon kernel has 64 x 64 tiles only: the grid and split length ``_launch`` sized from the config must be
    its own (a config shrunk by the shared-memory fit is not); and the call must fit it (``gluon_supported``)."""
    tiles = _gluon_tiles()
    if tiles is None or cfg["BLOCK_M"] != tiles["BLOCK_M"] or cfg["BLOCK_N"] != tiles["BLOCK_N"]:
        return False
    from .decode_gluon import gluon_supported
    return gluon_supported(q_nope, kv_cache, pe_cache)


def _launch_portable(grid, q_nope, q_pe, kv_cache, pe_cache, block_table, cache_seqlens, cu_seqlens_q, out, lse,
                     out_part, lse_part, sm_scale_log2, heads, seq_q, split_len, total_rows, qn_strides, qp_strides,
                     *, causal, varlen, split, return_lse, cfg, schedule=None, kv_scale=None, indices=None):
    """Launch the portable ``_mla_attn_kernel`` (pointer loads; any page size, dtype and GPU; the only one that
    runs a ``schedule``, reads an fp8 cache, ``kv_scale``, or sparse key lists, ``indices`` [B * S_q, K])."""
    dummy = cache_seqlens
    d_latent, d_rope = q_nope.shape[-1], q_pe.shape[-1]
    if d_rope == 0:  # no rope key (D_ROPE 0) is read; a tensor of no elements may hold a null pointer (the query
        q_pe, pe_cache = q_nope, q_nope  # in both places: an fp8 cache is no pointer type before sm_89)
    kv_cache = _utils.fp8_bits(kv_cache)  # an fp8 cache as its bits where Triton has no e4m3 type; others as given
    if indices is not None:
        _launcher.launch(_mla_sparse_attn_kernel, (grid[1], grid[0], grid[2]),  # tokens first (see the kernel)
            q_nope, q_pe, kv_cache, pe_cache, kv_scale if kv_scale is not None else dummy, block_table, cache_seqlens,
            indices, out, lse if lse is not None else dummy, out_part, lse_part,
            sm_scale_log2, heads, seq_q, split_len, total_rows, indices.shape[1],
            *qn_strides, *qp_strides, *kv_cache.stride()[:2], *pe_cache.stride()[:2],
            *(kv_scale.stride()[:2] if kv_scale is not None else (0, 0)), block_table.stride(0),
            D_LATENT=d_latent, D_ROPE=d_rope, PAGE_SIZE=kv_cache.shape[1], BLOCK_M=cfg["BLOCK_M"],
            BLOCK_N=cfg["BLOCK_N"], CAUSAL=causal, SPLIT=split, STORE_LSE=return_lse,
            DOT_FP32=_utils.interpreting(), DOT_PRECISION=_utils.dot_precision(q_nope.dtype),
            KV_FP8=kv_scale is not None, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        return
    # (the dense launch spelled out: building and splatting shared kwargs added host work to every call)
    _launcher.launch(_mla_attn_kernel, grid,
        q_nope, q_pe, kv_cache, pe_cache, kv_scale if kv_scale is not None else dummy, block_table, cache_seqlens,
        cu_seqlens_q if varlen else dummy,
        out, lse if lse is not None else dummy, out_part, lse_part,
        dummy if schedule is None else schedule.programs, dummy if schedule is None else schedule.sequences,
        sm_scale_log2,
        heads, seq_q, split_len, total_rows,
        *qn_strides, *qp_strides,
        *kv_cache.stride()[:2], *pe_cache.stride()[:2],
        *(kv_scale.stride()[:2] if kv_scale is not None else (0, 0)),
        block_table.stride(0),
        D_LATENT=d_latent, D_ROPE=d_rope, PAGE_SIZE=kv_cache.shape[1],
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        CAUSAL=causal, VARLEN=varlen, SPLIT=split, STORE_LSE=return_lse,
        DOT_FP32=_utils.interpreting(), DOT_PRECISION=_utils.dot_precision(q_nope.dtype),
        KV_FP8=kv_scale is not None, SCHEDULED=schedule is not None, KV_EVICT=EVICT_FIRST if cfg.get("EVICT") else "",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


# --------------------------------------------------------------------------------------------
# PyTorch path (CPU without the interpreter; also the "torch absorbed" baseline in bench/)
# --------------------------------------------------------------------------------------------


def _attend_torch(q_nope, q_pe, kv_cache, pe_cache, block_table, seqlens, q_len, softmax_scale, causal,
                  kv_scale=None):
    """Batched absorbed attention in fp32 over keys gathered through the block table.

    q_nope [B, S, H, R], q_pe [B, S, H, P]; q_len [B] = real query rows per sequence (right-padded).
    Returns out [B, S, H, R] fp32, lse [B, S, H] fp32 (natural log; -inf for rows that see no key).
    """
    batch, s_q = q_nope.shape[:2]
    page = kv_cache.shape[1]
    device = q_nope.device
    max_len = min(block_table.shape[1] * page, int(seqlens.max()) if seqlens.numel() else 0)  # host sync: fine here
    pos = torch.arange(max_len, device=device)
    valid = pos[None, :] < seqlens[:, None].long()  # [B, L]
    blocks = torch.where(valid, block_table.long()[:, pos // page], 0)
    kv, pe = _gather_keys(kv_cache, pe_cache, kv_scale, blocks, pos % page, valid)  # [B, L, R], [B, L, P]
    scores = torch.einsum("bshr,blr->bshl", q_nope.float(), kv) + torch.einsum("bshp,blp->bshl", q_pe.float(), pe)
    scores = scores * softmax_scale
    visible = valid[:, None, :].expand(batch, s_q, max_len)
    if causal:
        q_pos = seqlens[:, None].long() - q_len[:, None].long() + torch.arange(s_q, device=device)[None, :]
        visible = visible & (pos[None, None, :] <= q_pos[..., None])
    scores = scores.masked_fill(~visible[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return torch.einsum("bshl,blr->bshr", _softmax_probs(scores, lse), kv), lse


def _softmax_probs(scores, lse):
    """``exp(scores - lse)`` over the last dimension, 0 for a row without a key of finite score (its lse is -inf,
    which would make every probability NaN): the PyTorch paths' softmax, given ``lse = logsumexp(scores, -1)``."""
    return torch.where(torch.isneginf(lse)[..., None], 0.0, torch.exp(scores - lse[..., None]))


def _gather_keys(kv_cache, pe_cache, kv_scale, blocks, offsets, valid):
    """The cache rows at ``(blocks, offsets)`` (any shape ``[...]``) as fp32 ``(latent [..., R], rope key [..., P])``,
    an fp8 latent dequantized, and zeros where ``valid`` is False (so an unused slot's NaN reaches nothing)."""
    kv = _utils.take(kv_cache, blocks, offsets).float()
    if kv_scale is not None:  # fp8 latent: dequantized in fp32
        kv = (kv.unflatten(-1, (-1, _utils.FP8_GROUP)) * kv_scale[blocks, offsets][..., None]).flatten(-2)
    pe = pe_cache[blocks, offsets].float()
    return torch.where(valid[..., None], kv, 0.0), torch.where(valid[..., None], pe, 0.0)


def _attend_torch_sparse(q_nope, q_pe, kv_cache, pe_cache, block_table, seqlens, indices, softmax_scale, causal,
                         kv_scale=None):
    """``_attend_torch`` over each token's own key list: ``indices [B * S_q, K]`` cache positions (``mla_decode``'s
    ``indices``; entries outside the sequence, or with ``causal`` past the token, skipped). Returns out, lse."""
    batch, s_q = q_nope.shape[:2]
    page = kv_cache.shape[1]
    pos = indices.long().view(batch, s_q, indices.shape[-1])  # [B, S, K] (a -1 is ambiguous when B is 0)
    lengths = seqlens.long()[:, None, None]
    valid = (pos >= 0) & (pos < lengths)
    if causal:
        valid &= pos <= lengths - s_q + torch.arange(s_q, device=pos.device)[None, :, None]
    pos = torch.where(valid, pos, 0)
    table = block_table.long()
    if table.shape[1] == 0:  # a table of no blocks holds only padding slots: a column for gather, never used
        table = table.new_zeros(batch, 1)
    blocks = torch.gather(table, 1, (pos // page).flatten(1)).view(pos.shape)
    blocks = torch.where(valid, blocks, 0)  # (a padding slot's table may hold anything)
    kv, pe = _gather_keys(kv_cache, pe_cache, kv_scale, blocks, pos % page, valid)  # [B, S, K, R], [B, S, K, P]
    scores = torch.einsum("bshr,bskr->bshk", q_nope.float(), kv) + torch.einsum("bshp,bskp->bshk", q_pe.float(), pe)
    scores = (scores * softmax_scale).masked_fill(~valid[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return torch.einsum("bshk,bskr->bshr", _softmax_probs(scores, lse), kv), lse


def mla_decode_torch(q_nope, q_pe, kv_cache, pe_cache, block_table, cache_seqlens, softmax_scale,
                     causal=True, return_lse=False, w_uv=None, *, kv_scale=None, indices=None):
    """``mla_decode`` in plain PyTorch (no argument checks): the absorbed path without Triton. ``indices``: the
    ``[B * S_q, K]`` rows the kernel reads (``_mla_decode_run``)."""
    if indices is not None:
        out, lse = _attend_torch_sparse(q_nope, q_pe, kv_cache, pe_cache, block_table, cache_seqlens, indices,
                                        softmax_scale, causal, kv_scale)
    else:
        q_len = torch.full_like(cache_seqlens, q_nope.shape[1])
        out, lse = _attend_torch(q_nope, q_pe, kv_cache, pe_cache, block_table, cache_seqlens, q_len, softmax_scale,
                                 causal, kv_scale)
    out = out.to(q_nope.dtype)
    if w_uv is not None:
        out = _project_v(out, w_uv)
    return (out, lse) if return_lse else out


def _project_v(out, w_uv):
    """Per-head value projection [..., H, R] x w_uv [H, D_v, R] -> [..., H, D_v] (one batched GEMM), contiguous.

    The GEMM runs per head over [H, N, R] views and writes straight into a contiguous [N, H, D_v] result through
    its transposed view (cuBLAS takes the row stride H x D_v), so the caller gets a contiguous tensor without a copy
    (a plain ``bmm(...).transpose(0, 1)`` gave a view whose ``.view(N, -1)`` failed). For one token (N = 1) that
    view is contiguous already and costs a µs less of host work (bench.host); where autograd records, which
    ``out=`` does not support, the product is made contiguous by a copy."""
    lead, heads, r, d_v = out.shape[:-2], out.shape[-2], out.shape[-1], w_uv.shape[1]
    x = out.reshape(-1, heads, r).transpose(0, 1)  # [H, N, R]
    if x.shape[1] == 1 or (torch.is_grad_enabled() and (out.requires_grad or w_uv.requires_grad)):
        return torch.bmm(x, w_uv.transpose(1, 2)).transpose(0, 1).reshape(*lead, heads, d_v).contiguous()
    y = out.new_empty(*lead, heads, d_v)
    torch.bmm(x, w_uv.transpose(1, 2), out=y.view(-1, heads, d_v).transpose(0, 1))
    return y


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def mla_decode(q_nope, q_pe, kv_cache, pe_cache, block_table, cache_seqlens, softmax_scale,
               causal=True, return_lse=False, w_uv=None, *, max_seqlen_k=None, num_splits=None, metadata=None,
               kv_scale=None, indices=None, split_tokens=None, sinks=None):
    """Absorbed MLA decode over a paged latent cache.

    Args:
        q_nope: ``[B, S_q, H, R]`` query already absorbed into latent space (q_nope @ W_UK); bf16, fp16 or fp32.
        q_pe: ``[B, S_q, H, P]`` rope part of the query, rope applied; same dtype. P may be 0 (MLA without a
            rotary part: ``q_pe`` and ``pe_cache`` of width 0, neither read).
        kv_cache: ``[num_blocks, block_size, R]`` normalized latent. pe_cache: ``[num_blocks, block_size, P]``
            roped key. Either may be a strided view of one ``[num_blocks, block_size, R+P]`` buffer; only the
            last dimension must be contiguous. Never copied.
        block_table: ``[B, max_blocks]`` int32 (or int64) block ids of each sequence.
        cache_seqlens: ``[B]`` int32 (or int64): tokens in each sequence's cache, the S_q new ones included. New token
            i sits at position ``cache_seqlens[b] - S_q + i``. 0 marks a padding slot: zeros out, lse -inf.
        softmax_scale: scale applied to q.k before the softmax.
        causal: new token i attends to positions up to its own (otherwise to the whole cache).
        return_lse: also return ``lse [B, S_q, H]`` float32, natural log of the sum of exp(scaled scores).
        w_uv: optional ``[H, D_v, R]`` value projection (kv_b_proj's value half); the output becomes
            ``[B, S_q, H, D_v]``.
        max_seqlen_k: optional upper bound on ``cache_seqlens`` used to size the split-KV grid (defaults to the
            block table's capacity, which needs no host synchronisation).
        num_splits: force the number of cache-length splits (default: chosen from batch, length and GPU size); a
            count past one split per key tile of ``max_seqlen_k`` is cut to that (further splits would be empty),
            and one past 65535 (a launch grid's limit) to 65535.
        split_tokens: batch-invariant decode. Split every sequence's keys (a sparse call: its key lists) at each
            multiple of ``split_tokens``, rounded up to the kernel's key tile (16 to 64), instead of into a count of
            splits sized from the batch. A row's output and lse then depend on its own sequence alone: the same bits
            whether it is decoded alone or in any batch, beside any lengths, with any ``max_seqlen_k`` (for RL
            rollouts checked against a trainer, or reproducible serving; the split combine runs even where one split
            holds the sequence). The bits do depend on the tiles, so on the head count, widths, dtypes and GPU; not
            on S_q: the tiles are a one-token decode's for every S_q (16 rows at 16 heads or fewer), those
            ``mla_prefill(split_tokens=)`` takes, so ``MLAttention``'s uniform steps (this call) and ragged ones
            (prefill) give a sequence's tokens the same bits. ``w_uv``'s projection is a cuBLAS GEMM whose bits may
            depend on the batch; for bitwise invariance apply it yourself with a batch-invariant GEMM. Smaller
            values split more (more parallelism for short batches). Every row keeps an fp32 partial per split of
            ``max_seqlen_k`` (pass the batch's longest length: it does not change the bits); past
            ``SPLIT_PARTIALS_BYTES`` (256 MiB) the batch runs as launches over groups of whole sequences, with the
            same bits. Exclusive with ``num_splits`` and ``metadata``. The Triton kernels' promise: the PyTorch path
            (CPU tensors without the interpreter) computes the batch at once.
        metadata: a ``DecodeSchedule`` from ``mla_decode_metadata(cache_seqlens, H, S_q, kv_lora_rank=R,
            rope_dim=P, dtype=q_nope.dtype)`` (and ``cache_dtype=torch.float8_e4m3fn`` for an fp8 cache: the
            widths and dtypes fix the tiles it is cut along),
            computed once per step for every layer: the kernel then runs a persistent grid in which each program
            reads an equal share of the batch's cache tiles, whatever the lengths (for batches that mix long and
            short sequences). It must have been built from these ``cache_seqlens`` values (checked on the CPU
            only, where the tables it holds are rebuilt from them and compared: lengths that give every sequence
            the same tiles give the same tables, and are taken). Exclusive with ``num_splits``.
        kv_scale: for an FP8 cache (``kv_cache`` float8_e4m3fn, e.g. from ``fp8_latent_cache``), its scales
            ``[num_blocks, block_size, R/128]`` float32; the latent is dequantized in registers to the query's
            dtype, which must be ``pe_cache``'s (bf16, fp16 or fp32; queries are never fp8). None for other caches.
        indices: sparse attention (DeepSeek-V3.2's DSA, whose indexer picks each token's top-k keys): ``[B, S_q, K]``
            int32 (or int64) cache positions (0 to ``cache_seqlens[b] - 1``, numbered as above) that new token s
            of sequence b attends to, instead of the whole cache; negative entries (-1 by convention) pad a short
            list and are skipped. Entries should be distinct (a repeated one counts as often as it appears). With
            ``causal`` an entry past the token's own position is skipped too. K is any size; the split grid cuts
            the lists instead of the cache. Exclusive with ``metadata``; ``max_seqlen_k`` then only bounds the
            lengths. Runs the portable kernel (any GPU, page size, head count, dtype, fp8 cache).
        sinks: ``[H]`` attention sinks (gpt-oss's, Hy4's; FlashMLA's ``attn_sink``), any float dtype: head h's
            learned logit joins each of its rows' softmax as one more key whose value is zero, so each output row
            is scaled by ``exp(lse) / (exp(lse) + exp(sinks[h]))`` (``merge.apply_sink``, in float32, after the
            kernels); the returned lse stays the keys' own, as FlashMLA's.

    Returns:
        ``out [B, S_q, H, R]`` (or ``[B, S_q, H, D_v]`` with ``w_uv``) in q's dtype; with ``return_lse`` also lse.
        A query row that sees no key (padding slot, or a row before the cache's first token) gives zeros and -inf.

    Values are checked where that is free: on the CPU, lengths and the block ids in use are range-checked
    before anything runs, and with ``causal`` a length below S_q other than 0 is refused (its new tokens cannot
    all be in the cache; on a GPU their rows before the cache's first token give zeros and -inf). On a GPU they are
    not (that would synchronise with the host): lengths beyond ``max_seqlen_k`` or block ids outside the cache there are
    undefined behaviour, as in FlashMLA. ``indices`` entries at or past a sequence's length are refused on the CPU
    and skipped on a GPU (never read).
    """
    softmax_scale, max_seqlen_k, num_splits = _check_decode_args(q_nope, q_pe, kv_cache, pe_cache, block_table,
                                                                 cache_seqlens, softmax_scale, w_uv, max_seqlen_k,
                                                                 num_splits, kv_scale)
    if torch.is_grad_enabled():  # (the call's kwargs cost more than the check; most callers run without grad)
        _utils.check_no_grad("mla_decode", q_nope=q_nope, q_pe=q_pe, kv_cache=kv_cache, pe_cache=pe_cache, w_uv=w_uv,
                             kv_scale=kv_scale)
    split_tokens = _check_options(q_nope, indices, metadata, split_tokens, num_splits, max_seqlen_k)
    if sinks is None:
        return _mla_decode_dispatch(q_nope, q_pe, kv_cache, pe_cache, block_table, cache_seqlens, softmax_scale,
                                    causal, return_lse, w_uv, max_seqlen_k, num_splits, metadata, kv_scale, indices,
                                    split_tokens)
    return_lse = _utils.check_flag("return_lse", return_lse)
    sinks = _utils.check_sinks(sinks, q_nope.shape[2], q_nope.device)
    if torch.is_grad_enabled():
        _utils.check_no_grad("mla_decode", sinks=sinks)
    out, lse = _mla_decode_dispatch(q_nope, q_pe, kv_cache, pe_cache, block_table, cache_seqlens, softmax_scale,
                                    causal, True, w_uv, max_seqlen_k, num_splits, metadata, kv_scale, indices,
                                    split_tokens)
    from .merge import apply_sink  # (merge imports this module)
    out = apply_sink(out, lse, sinks)
    return (out, lse) if return_lse else out


def _check_options(q_nope, indices, metadata, split_tokens, num_splits, max_seqlen_k: int):
    """The options' checks after ``_check_decode_args`` (``mla_decode`` and its custom op): ``indices``,
    ``split_tokens`` (returned, checked) and the batch's bound. A dense call without ``metadata`` launches a
    program per sequence along a grid axis that CUDA caps at 65535 (a sparse call puts its tokens on the
    first axis, 2^31 - 1; a schedule its programs)."""
    if indices is not None:
        _check_indices(indices, q_nope, metadata)
    elif metadata is None:
        _utils.check_grid_batch(q_nope.shape[0], "q_nope's B")
    if split_tokens is not None:
        split_tokens = _check_split_tokens(split_tokens, num_splits, metadata, max_seqlen_k, indices)
    return split_tokens


SPLIT_PARTIALS_BYTES = 1 << 28  # fp32 split partials one launch with split_tokens may allocate (256 MiB)


def _split_batches(batch: int, rows: int, d_latent: int, keys: int, split_tokens) -> list:
    """The ``[b0, b1)`` sequence ranges a decode launches over: the whole batch; or with ``split_tokens``, whose
    fp32 partials (``rows`` = S_q x H per sequence, ``R + 1`` values, one per split of ``keys``) grow as
    ``keys / split_tokens``, groups of whole sequences within ``SPLIT_PARTIALS_BYTES`` (one sequence at least,
    however long). Each group is a batch of its own, which gives its rows the same bits (split_tokens' batch
    invariance); the ranges follow from shapes alone (no host sync, CUDA-graph capturable)."""
    if split_tokens is None or batch <= 1:
        return [(0, batch)]
    step = max(1, SPLIT_PARTIALS_BYTES // split_partials_bytes(rows, d_latent, keys, split_tokens))
    return [(b, min(batch, b + step)) for b in range(0, batch, step)]


def split_partials_bytes(rows: int, d_latent: int, keys: int, split_tokens: int) -> int:
    """The fp32 split partials of ``rows`` query rows with ``split_tokens``: ``R + 1`` values per row and split, a
    split per ``split_tokens`` of ``keys`` (an upper bound on the launch's: its splits are rounded up to the key
    tile)."""
    return rows * (d_latent + 1) * 4 * _utils.cdiv(max(keys, 1), split_tokens)


def _launch_in_groups(groups, q_nope, q_pe, kv_cache, pe_cache, block_table, cache_seqlens, softmax_scale, causal,
                      return_lse, max_seqlen_k, kv_scale, reuse_scratch, indices, split_tokens):
    """A ``split_tokens`` decode past its partials budget: ``_launch`` over ``_split_batches``' groups of whole
    sequences, in order, each a batch of its own, into one output ``(out [B * S_q, H, R], lse | None)``."""
    batch, s_q, heads, d_latent = q_nope.shape
    out = q_nope.new_empty(batch * s_q, heads, d_latent)
    lse = q_nope.new_empty(batch * s_q, heads, dtype=torch.float32) if return_lse else None
    for b0, b1 in groups:
        t0, t1 = b0 * s_q, b1 * s_q
        part_out, part_lse = _launch(q_nope[b0:b1], q_pe[b0:b1], kv_cache, pe_cache, block_table[b0:b1],
                                     cache_seqlens[b0:b1], None, softmax_scale, causal, return_lse, batch=b1 - b0,
                                     seq_q=s_q, total_tokens=t1 - t0, max_seqlen_q=s_q, max_seqlen_k=max_seqlen_k,
                                     num_splits=None, kv_scale=kv_scale, reuse_scratch=reuse_scratch,
                                     indices=None if indices is None else indices[t0:t1], split_tokens=split_tokens)
        out[t0:t1] = part_out
        if return_lse:
            lse[t0:t1] = part_lse
    return out, lse


def split_tokens_value(split_tokens) -> int:
    """``split_tokens`` as every caller takes it: an int >= 1 (numpy's taken), capped at 2^62. Past any cache length
    every value gives one split of the keys; capped so the custom op (an int64 argument) takes it: 2^63 and beyond
    passed eagerly but failed under torch.compile."""
    return min(_utils.check_int("split_tokens", split_tokens, 1), 2**62)


def check_split_count(split_tokens: int, keys: int, what: str, advice: str) -> None:
    """The grid's bound on ``split_tokens``: it cuts ``keys`` into ``cdiv(keys, split_tokens)`` splits, the grid's
    third axis (CUDA: 65535), which the launch's count (its splits rounded up to the key tile) never exceeds, so the
    bound holds on every path and device. ``what`` names the keys, ``advice`` the way out, in the message."""
    if _utils.cdiv(keys, split_tokens) > MAX_GRID_SPLITS:
        raise ValueError(f"split_tokens={split_tokens} cuts {what} into more than {MAX_GRID_SPLITS} splits, a launch "
                         f"grid's limit: {advice}")


def _check_split_tokens(split_tokens, num_splits, metadata, max_seqlen_k: int, indices=None) -> int:
    """``split_tokens`` (``split_tokens_value``), given without ``num_splits`` or ``metadata``, which would cut the
    sequences otherwise, and cutting the keys (``max_seqlen_k``, clamped to the table's capacity, or a checked
    ``indices``' K) into at most ``MAX_GRID_SPLITS`` (``check_split_count``)."""
    split_tokens = split_tokens_value(split_tokens)
    if num_splits is not None:
        raise ValueError("split_tokens and num_splits exclude each other: split_tokens fixes where the splits begin, "
                         "so their count follows from the lengths")
    if metadata is not None:
        raise ValueError("split_tokens and metadata exclude each other: a schedule cuts sequences by the batch's "
                         "total work, which is what split_tokens keeps out of a row's result")
    if indices is not None:
        keys = indices.shape[-1]
        check_split_count(split_tokens, keys, f"{keys} keys (the key lists' K)", "pass a larger split_tokens")
    else:
        check_split_count(split_tokens, max_seqlen_k,
                          f"{max_seqlen_k} keys (max_seqlen_k (default: the block table's capacity))",
                          "pass a larger split_tokens or pass max_seqlen_k, the batch's longest length (it does not "
                          "change the bits)")
    return split_tokens


def _check_indices(indices, q_nope, metadata) -> None:
    """``indices [B, S_q, K]``: an int32/int64 tensor on the query's device matching its batch and tokens."""
    _utils.check_tensor("indices", indices, 3, _utils.INDEX_DTYPES)
    _utils.check_same("indices", tuple(indices.shape[:2]), "q_nope", tuple(q_nope.shape[:2]), "[B, S_q]")
    _utils.check_devices(q_nope=q_nope, indices=indices)
    if metadata is not None:
        raise ValueError("indices and metadata exclude each other: sparse lists are split by length, not scheduled")


def _check_decode_args(q_nope, q_pe, kv_cache, pe_cache, block_table, cache_seqlens, softmax_scale, w_uv,
                       max_seqlen_k, num_splits, kv_scale):
    """``mla_decode``'s shape, dtype and device checks (no tensor values read), also run by its custom op when called
    directly. Returns ``(softmax_scale as a float, max_seqlen_k clamped to the block table's capacity, num_splits)``,
    the ints as Python ints (numpy's are taken)."""
    # the common case, checked in one expression; anything else takes the named checks below
    if kv_scale is None and _decode_args_ok(q_nope, q_pe, kv_cache, pe_cache, block_table, cache_seqlens,
                                            softmax_scale, w_uv, max_seqlen_k, num_splits):
        capacity = block_table.shape[1] * kv_cache.shape[1]
        return softmax_scale, capacity if max_seqlen_k is None else min(max_seqlen_k, capacity), num_splits
    _utils.check_tensor("q_nope", q_nope, 4, _utils.FLOAT_DTYPES)
    _utils.check_tensor("q_pe", q_pe, 4, _utils.FLOAT_DTYPES)
    _utils.check_same("q_nope", q_nope.dtype, "q_pe", q_pe.dtype, "dtype")
    _utils.check_same("q_nope", tuple(q_nope.shape[:3]), "q_pe", tuple(q_pe.shape[:3]), "[B, S_q, H]")
    batch, s_q, heads, d_latent = q_nope.shape
    d_rope = q_pe.shape[-1]
    r, p, page = _utils.check_paged_cache(kv_cache, pe_cache, block_table, batch, "q_nope (its B)",
                                          kv_scale=kv_scale)
    _utils.check_same("q_nope", d_latent, "kv_cache", r, "latent width R")
    _utils.check_same("q_pe", d_rope, "pe_cache", p, "rope width P")
    _utils.check_same("q_nope", q_nope.dtype, *_utils.cache_compute_dtype(kv_cache, pe_cache), "dtype")
    _utils.check_width("kv_cache latent", r)
    _utils.check_rope_width("pe_cache rope", p)
    _utils.check_last_contiguous("q_nope", q_nope)
    _utils.check_last_contiguous("q_pe", q_pe)
    _utils.check_tensor("cache_seqlens", cache_seqlens, 1, _utils.INDEX_DTYPES)
    _utils.check_same("cache_seqlens", cache_seqlens.shape[0], "q_nope (its B)", batch, "batch size")
    _utils.check_last_contiguous("cache_seqlens", cache_seqlens)
    if s_q == 0:
        raise ValueError("q_nope must have at least one query token (S_q >= 1)")
    if heads == 0:
        raise ValueError("q_nope must have at least one head")
    softmax_scale = _utils.check_scale("softmax_scale", softmax_scale)
    if w_uv is not None:
        _utils.check_tensor("w_uv", w_uv, 3, _utils.FLOAT_DTYPES)
        _utils.check_same("w_uv", w_uv.shape[0], "q_nope", heads, "head count")
        _utils.check_same("w_uv", w_uv.shape[2], "q_nope", d_latent, "latent width R")
        _utils.check_same("w_uv", w_uv.dtype, "q_nope", q_nope.dtype, "dtype")
        if w_uv.shape[1] == 0:
            raise ValueError(f"w_uv [H, D_v, R] must have D_v >= 1, got shape {tuple(w_uv.shape)}")
    _utils.check_devices(q_nope=q_nope, q_pe=q_pe, kv_cache=kv_cache, pe_cache=pe_cache, block_table=block_table,
                         cache_seqlens=cache_seqlens, w_uv=w_uv, kv_scale=kv_scale)
    capacity = block_table.shape[1] * page
    max_seqlen_k = _utils.check_int("max_seqlen_k", max_seqlen_k, 0)
    num_splits = _utils.check_int("num_splits", num_splits, 1)
    return softmax_scale, capacity if max_seqlen_k is None else min(max_seqlen_k, capacity), num_splits


_FLOAT_DTYPES = frozenset(_utils.FLOAT_DTYPES)
_INDEX_DTYPES = frozenset(_utils.INDEX_DTYPES)
_WIDTHS = _utils.WIDTHS  # check_width's
_ROPE_WIDTHS = _utils.ROPE_WIDTHS  # check_rope_width's


def _decode_args_ok(q_nope, q_pe, kv_cache, pe_cache, block_table, cache_seqlens, softmax_scale, w_uv, max_seqlen_k,
                    num_splits) -> bool:
    """True when the arguments certainly pass every check of ``mla_decode``, decided in one expression (a few
    µs less per call than the named checks). It may say False for valid input (a tensor subclass, an int scale):
    the full checks then run, and raise only if something is wrong. It never says True for input they reject."""
    tensor = torch.Tensor
    if not (type(q_nope) is tensor and type(q_pe) is tensor and type(kv_cache) is tensor and type(pe_cache) is tensor
            and type(block_table) is tensor and type(cache_seqlens) is tensor):
        return False
    qs, ps, ks, es, bs = q_nope.shape, q_pe.shape, kv_cache.shape, pe_cache.shape, block_table.shape
    dtype, device = q_nope.dtype, q_nope.device
    return (len(qs) == 4 and len(ps) == 4 and len(ks) == 3 and len(es) == 3 and len(bs) == 2
            and cache_seqlens.dim() == 1
            and dtype in _FLOAT_DTYPES and q_pe.dtype is dtype and kv_cache.dtype is dtype and pe_cache.dtype is dtype
            and block_table.dtype in _INDEX_DTYPES and cache_seqlens.dtype in _INDEX_DTYPES
            and qs[:3] == ps[:3] and ks[:2] == es[:2] and qs[3] == ks[2] and ps[3] == es[2]
            and ks[2] in _WIDTHS and es[2] in _ROPE_WIDTHS and ks[0] > 0 and ks[1] > 0 and qs[1] > 0 and qs[2] > 0
            and bs[0] == qs[0] and cache_seqlens.shape[0] == qs[0]
            and q_nope.stride(3) == 1 and q_pe.stride(3) == 1 and kv_cache.stride(2) == 1 and pe_cache.stride(2) == 1
            and (bs[1] <= 1 or block_table.stride(1) == 1) and (qs[0] <= 1 or cache_seqlens.stride(0) == 1)
            and q_pe.device == device and kv_cache.device == device and pe_cache.device == device
            and block_table.device == device and cache_seqlens.device == device
            and type(softmax_scale) is float and 0.0 < softmax_scale < _utils.MAX_SCALE
            and (w_uv is None or (type(w_uv) is tensor and w_uv.dim() == 3 and w_uv.dtype is dtype
                                  and w_uv.shape[0] == qs[2] and w_uv.shape[1] > 0 and w_uv.shape[2] == qs[3]
                                  and w_uv.device == device))
            and (max_seqlen_k is None or (type(max_seqlen_k) is int and max_seqlen_k >= 0))
            and (num_splits is None or (type(num_splits) is int and num_splits >= 1)))


def _mla_decode_dispatch(q_nope, q_pe, kv_cache, pe_cache, block_table, cache_seqlens, softmax_scale, causal,
                         return_lse, w_uv, max_seqlen_k, num_splits, metadata=None, kv_scale=None, indices=None,
                         split_tokens=None):
    """Checked arguments to the work: the custom op while torch.compile traces (one graph node, the op runs
    ``_mla_decode_run`` with its CPU value checks), else ``_mla_decode_run`` directly (no dispatcher).
    ``metadata`` is checked here, against the call's shapes, whichever way the other arguments were checked."""
    if metadata is not None:
        _check_metadata(metadata, cache_seqlens, q_nope.shape[1] * q_nope.shape[2], q_nope.shape[3], num_splits,
                        q_pe.shape[-1], q_nope.element_size(), kv_scale is not None)
    causal, return_lse = _utils.check_flag("causal", causal), _utils.check_flag("return_lse", return_lse)
    if torch.compiler.is_compiling():
        tables, sizes = _schedule.to_op_args(metadata)  # a NamedTuple is no op argument: its tensors and ints are
        out, lse = torch.ops.mla_kernels.mla_decode(q_nope, q_pe, kv_cache, pe_cache, block_table, cache_seqlens,
                                                    softmax_scale, causal, return_lse, w_uv, max_seqlen_k, num_splits,
                                                    *tables, sizes, kv_scale, indices, split_tokens)
    else:
        out, lse = _mla_decode_run(q_nope, q_pe, kv_cache, pe_cache, block_table, cache_seqlens, softmax_scale,
                                   causal, return_lse, w_uv, max_seqlen_k, num_splits, metadata, kv_scale,
                                   reuse_scratch=True, indices=indices, split_tokens=split_tokens)
    return (out, lse) if return_lse else out


def _mla_decode_run(q_nope, q_pe, kv_cache, pe_cache, block_table, cache_seqlens, softmax_scale, causal, return_lse,
                    w_uv, max_seqlen_k, num_splits, metadata=None, kv_scale=None, reuse_scratch=False, indices=None,
                    split_tokens=None):
    """``mla_decode`` after its shape checks (the body of the ``mla_kernels::mla_decode`` custom op): value checks
    on the CPU, then the kernels or the PyTorch path. Returns ``(out, lse | None)``; ``max_seqlen_k`` is an int
    no larger than the block table's capacity; ``metadata`` a ``DecodeSchedule`` that passed ``_check_metadata``;
    ``reuse_scratch`` for the eager call only (``_launch``); ``indices`` checked by ``_check_indices``;
    ``split_tokens`` by ``_check_split_tokens``."""
    batch, s_q, heads, d_latent = q_nope.shape
    _utils.check_has_data("q_nope", q_nope)
    if indices is not None:  # the kernel reads one contiguous row of K per query token (a copy only for a view)
        indices = indices.contiguous().view(batch * s_q, indices.shape[2])
    if q_nope.device.type == "cpu":  # checks that need the values are free on the CPU (on a GPU they would sync)
        _check_lengths_cpu(cache_seqlens, block_table, kv_cache.shape[0], kv_cache.shape[1], max_seqlen_k)
        if metadata is not None:
            _check_metadata_lengths(metadata, cache_seqlens)
        short = (cache_seqlens > 0) & (cache_seqlens < s_q)
        if causal and bool(short.any()):  # (without causal a query has no position: every one sees every key)
            b = int(short.nonzero()[0, 0])
            raise ValueError(f"cache_seqlens[{b}] = {int(cache_seqlens[b])} is less than the S_q = {s_q} new tokens, "
                             "which must already be in the cache (0 marks a padding slot)")
        if indices is not None:
            past = indices.long() >= cache_seqlens.long().repeat_interleave(s_q)[:, None]
            if bool(past.any()):
                t, k = (int(i) for i in past.nonzero()[0])
                raise ValueError(f"indices[{t // s_q}, {t % s_q}, {k}] = {int(indices[t, k])} is not a position of "
                                 f"sequence {t // s_q}, which holds {int(cache_seqlens[t // s_q])} tokens "
                                 "(skip an entry with -1)")

    if not _utils.use_triton(q_nope):
        out = mla_decode_torch(q_nope, q_pe, kv_cache, pe_cache, block_table, cache_seqlens, softmax_scale,
                               causal, True, w_uv, kv_scale=kv_scale, indices=indices)
        return out[0], (out[1] if return_lse else None)

    if (metadata is None and indices is None and num_splits is None and split_tokens is None
            and _use_schedule(batch, s_q * heads, q_nope.device)):
        metadata = _schedule.make_schedule(cache_seqlens, s_q * heads, d_latent, max_seqlen_k, None,
                                           q_pe.shape[-1], q_nope.element_size(), kv_scale is not None)
    keys = max_seqlen_k if indices is None else indices.shape[1]  # what the splits cut
    groups = _split_batches(batch, s_q * heads, d_latent, keys, split_tokens)
    with _utils.launch_device(q_nope.device):
        if len(groups) == 1:
            out, lse = _launch(q_nope, q_pe, kv_cache, pe_cache, block_table, cache_seqlens, None, softmax_scale,
                               causal, return_lse, batch=batch, seq_q=s_q, total_tokens=batch * s_q,
                               max_seqlen_q=s_q, max_seqlen_k=max_seqlen_k,
                               num_splits=1 if metadata is not None else num_splits, schedule=metadata,
                               kv_scale=kv_scale, reuse_scratch=reuse_scratch, indices=indices,
                               split_tokens=split_tokens)
        else:
            out, lse = _launch_in_groups(groups, q_nope, q_pe, kv_cache, pe_cache, block_table, cache_seqlens,
                                         softmax_scale, causal, return_lse, max_seqlen_k, kv_scale, reuse_scratch,
                                         indices, split_tokens)
    out = out.view(batch, s_q, heads, d_latent)
    if w_uv is not None:
        out = _project_v(out, w_uv)
    return out, (lse.view(batch, s_q, heads) if return_lse else None)


def _check_lengths_cpu(cache_seqlens, block_table, num_blocks, page, max_seqlen_k):
    """Value checks for CPU inputs: lengths within the block table, used block ids within the cache."""
    if cache_seqlens.numel() == 0:
        return
    capacity = block_table.shape[1] * page
    lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
    if lo < 0:
        raise ValueError(f"cache_seqlens must be >= 0, got {lo}")
    if hi > capacity:
        raise ValueError(f"cache_seqlens has a length {hi} beyond the block table's capacity {capacity}")
    if hi > max_seqlen_k:
        raise ValueError(f"cache_seqlens has a length {hi} above max_seqlen_k={max_seqlen_k}")
    used = torch.arange(block_table.shape[1])[None, :] * page < cache_seqlens[:, None].long()
    ids = block_table[used]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_blocks):
        raise ValueError(f"block_table refers to blocks outside kv_cache's {num_blocks} blocks "
                         f"(ids {int(ids.min())}..{int(ids.max())} in use)")


def _use_schedule(batch: int, rows_per_seq: int, device: torch.device) -> bool:
    """Whether ``mla_decode`` without ``metadata`` schedules its own work (``mla_decode_metadata``) rather than
    splitting every sequence alike. The one switch between the two paths.

    False until measured: the split grid is the path timed on an H100, and the scheduled path becomes the
    default only once a GPU shows it no slower on uniform batches (bench.decode's imbalanced section prints
    both beside each other). Passing ``metadata`` selects the scheduled path whatever this says.
    """
    return False


def _check_metadata(metadata, cache_seqlens, rows_per_seq: int, d_latent: int, num_splits, d_rope: int = 64,
                    elem_bytes: int = 2, kv_fp8: bool = False, check_tiles: bool = True):
    """``metadata`` must be a ``DecodeSchedule`` built for this call: batch, tiles, device, table layout (shapes
    only; ``_check_metadata_lengths`` checks the values where that is free). Its tiles must be the call's, or those
    of a stored config that has since failed to compile and been dropped (``_tuning.drop``): ``_launch`` then
    cuts the same grid again for the call's tiles, on the device."""
    if not isinstance(metadata, _schedule.DecodeSchedule):
        raise TypeError(f"metadata must be a DecodeSchedule from mla_decode_metadata, got {type(metadata).__name__}")
    if num_splits is not None:
        raise ValueError("metadata and num_splits exclude each other: the schedule decides how sequences are cut")
    # (fields by name: torch 2.6's dynamo failed on a slice of a NamedTuple, an InternalTorchDynamoError)
    sizes = (metadata.batch, metadata.block_m, metadata.block_n, metadata.num_programs, metadata.num_part_slots)
    if any(isinstance(v, bool) or not isinstance(v, (int, torch.SymInt)) for v in sizes):
        # a hand-edited schedule: its sizes shape the grid and buffers
        raise ValueError(f"metadata's sizes must be ints, got {dict(zip(metadata._fields[2:], sizes))}")
    if metadata.batch != cache_seqlens.shape[0]:
        raise ValueError(f"metadata was built for a batch of {metadata.batch}, the call has {cache_seqlens.shape[0]}")
    if check_tiles:
        built_for = (metadata.block_m, metadata.block_n)
        block_m, block_n = schedule_tiles(rows_per_seq, d_latent, cache_seqlens.device, d_rope, elem_bytes, kv_fp8)
        dropped = _tuning.dropped("decode", _tuning.decode_class(rows_per_seq, d_latent, elem_bytes),
                                  cache_seqlens.device)
        if built_for != (block_m, block_n) and \
                (dropped is None or built_for != (dropped.get("BLOCK_M"), dropped.get("BLOCK_N"))):
            raise ValueError(f"metadata was built for {metadata.block_m} x {metadata.block_n} tiles, this call's "
                             f"heads, S_q, widths and dtype use {block_m} x {block_n}: pass mla_decode_metadata the "
                             "call's num_heads, s_q, kv_lora_rank, rope_dim, dtype and cache_dtype")
    # (its tensors' devices, not its ``device`` property, which torch 2.6's dynamo cannot trace)
    if metadata.programs.device != cache_seqlens.device or metadata.sequences.device != cache_seqlens.device:
        raise ValueError(f"metadata is on {metadata.programs.device} (sequences on {metadata.sequences.device}), "
                         f"cache_seqlens on {cache_seqlens.device}")
    if metadata.num_programs < 1 or \
            tuple(metadata.programs.shape) != (metadata.num_programs, len(_schedule.PROG_FIELDS)) or \
            tuple(metadata.sequences.shape) != (metadata.batch, len(_schedule.SEQ_FIELDS)) or \
            metadata.programs.dtype != torch.int32 or metadata.sequences.dtype != torch.int32 or \
            not metadata.programs.is_contiguous() or not metadata.sequences.is_contiguous():
        raise ValueError("metadata's tables do not have the shapes, dtype and layout mla_decode_metadata builds")
    if metadata.num_part_slots != _schedule.part_slot_bound(metadata.batch, metadata.num_programs):
        # it sizes the partial buffer the kernel writes cut sequences into: too few slots would write past its end
        raise ValueError(f"metadata.num_part_slots is {metadata.num_part_slots!r}, not the "
                         f"{_schedule.part_slot_bound(metadata.batch, metadata.num_programs)} its batch and "
                         f"programs need")


def _check_metadata_lengths(metadata, cache_seqlens) -> None:
    """On the CPU (free there): ``metadata``'s tables are the ones these ``cache_seqlens`` give."""
    programs, sequences = _schedule.build_tables(cache_seqlens, metadata.block_n, metadata.num_programs)
    if not (torch.equal(programs, metadata.programs) and torch.equal(sequences, metadata.sequences)):
        raise ValueError("metadata was built from other cache_seqlens than the ones passed")
