"""Absorbed MLA decode: seed 003's decode scenario and a shape sweep.

    python -m bench.decode [--quick] [--device cuda] [--cuda-graph] [--plot] [--out DIR] [--providers A,B]

Providers, each checked against the float32 reference (``reference.absorbed_decode``) before timing:
  mla_decode       the library, absorbed query in, latent out [B, 1, H, R]
  torch_absorbed   ``mla_kernels.decode.mla_decode_torch``, same arguments and output
  mla_decode+w_uv  the library with the value projection, out [B, 1, H, D_v]
  mla_decode_fp8   the library over the same cache quantized to DeepSeek's FP8 layout (e4m3 latent + fp32 scale
                   per 128 values + bf16 rope key, 656 instead of 1152 bytes per token); checked against the
                   reference over the dequantized cache; its GB/s counts the bytes it reads (656 per token),
                   effective_gbps the bf16 bytes of the same tokens (for comparison with mla_decode)
  mla_decode_sparse  the library with ``indices``: each token over 2048 random distinct positions of its sequence
                   (DeepSeek-V3.2's top-k; every position when the context is shorter), checked against
                   ``reference.sparse_decode``; its FLOP/s and bytes count the keys it reads (min(ctx, 2048)),
                   its speedup is against dense mla_decode over the whole context
  naive            the decompressed path: gather each sequence's latent, expand it through
                   kv_b_proj into per-head K/V with one matmul, SDPA with a padding mask; out [B, 1, H, D_v]
mla_decode is compared with torch_absorbed, mla_decode+w_uv with naive (same inputs, same output).

Then imbalanced batches (``run_imbalanced``; --skip-imbalanced leaves them out): one sequence at the longest
length, the others between 1/64 and 1/2 of it, each beside the uniform batch of the same total tokens, through
mla_decode as shipped, with ``mla_decode_metadata``'s schedule (mla_decode+meta), batch-invariant
(mla_decode+split, ``split_tokens=2048``), and the schedule step alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import dataclasses
import math
import time

import torch
import torch.nn.functional as F

from mla_kernels.reference import absorbed_decode

from . import _harness as h

SEED_HISTORY = [50] * 4 + [100] * 4 + [200] * 4 + [400] * 4
SEED_WARMUPS, SEED_ROUNDS = 10, 100
SEED_TOKENS_PER_S = 2224.27  # seed 003's sample output: their implementation on their GPU


@dataclasses.dataclass(frozen=True)
class MLAShape:
    """Attention widths of one MLA layer."""

    heads: int = 16
    d_latent: int = 512
    d_rope: int = 64
    d_nope: int = 128
    d_v: int = 128

    @property
    def softmax_scale(self) -> float:
        return (self.d_nope + self.d_rope) ** -0.5


SEED_SMALL = MLAShape(heads=16)  # seed 003's config: hidden 2048, 16 heads, no Q LoRA
DEEPSEEK_R1 = MLAShape(heads=128)


def library():
    """(mla_decode, the PyTorch absorbed path mla_decode_torch, write_cache): the providers this bench times."""
    from mla_kernels import mla_decode, write_cache
    from mla_kernels.decode import mla_decode_torch

    return mla_decode, mla_decode_torch, write_cache


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    """One decode batch over a paged latent cache, with the layer's kv_b_proj weight."""

    shape: MLAShape
    q_nope: torch.Tensor  # [B, S, H, D_nope], not absorbed
    q_abs: torch.Tensor  # [B, S, H, R], q_nope @ W_UK
    q_pe: torch.Tensor  # [B, S, H, P]
    kv_cache: torch.Tensor  # [N, page, R], view of one [N, page, R+P] buffer
    pe_cache: torch.Tensor  # [N, page, P]
    block_table: torch.Tensor  # [B, max_blocks] int32
    cache_seqlens: torch.Tensor  # [B] int32
    w_kv_b: torch.Tensor  # [H * (D_nope + D_v), R]
    w_uk: torch.Tensor  # [H, D_nope, R]
    w_uv: torch.Tensor  # [H, D_v, R]
    max_len: int


def make_weights(shape: MLAShape, dtype, device, gen=None):
    """kv_b_proj weight [H*(D_nope+D_v), R] scaled so decompressed K/V have unit variance, and its
    W_UK [H, D_nope, R] / W_UV [H, D_v, R] halves (contiguous copies)."""
    s = shape
    w = torch.randn(s.heads * (s.d_nope + s.d_v), s.d_latent, device=device, generator=gen) / math.sqrt(s.d_latent)
    w = w.to(dtype)
    per_head = w.view(s.heads, s.d_nope + s.d_v, s.d_latent)
    return w, per_head[:, : s.d_nope].contiguous(), per_head[:, s.d_nope:].contiguous()


def make_case(shape: MLAShape, seqlens, page: int, dtype, device, capacity: int | None = None, seed: int = 0,
              s_q: int = 1) -> Case:
    """Random queries and cache for requests of the given lengths (``s_q`` new tokens each, already in the
    cache). Each request owns ``ceil(capacity / page)`` blocks in shuffled order."""
    s = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    batch = len(seqlens)
    capacity = max(seqlens) if capacity is None else capacity
    blocks_per = max(1, math.ceil(capacity / page))
    num_blocks = batch * blocks_per + 1
    buf = torch.randn(num_blocks, page, s.d_latent + s.d_rope, device=device, dtype=dtype, generator=gen)
    perm = torch.randperm(num_blocks, device=device, generator=gen)
    block_table = perm[: batch * blocks_per].view(batch, blocks_per).to(torch.int32)
    w_kv_b, w_uk, w_uv = make_weights(s, dtype, device, gen)
    q_nope = torch.randn(batch, s_q, s.heads, s.d_nope, device=device, dtype=dtype, generator=gen)
    q_pe = torch.randn(batch, s_q, s.heads, s.d_rope, device=device, dtype=dtype, generator=gen)
    q_abs = torch.einsum("bshd,hdr->bshr", q_nope.float(), w_uk.float()).to(dtype)
    return Case(s, q_nope, q_abs, q_pe, buf[..., : s.d_latent], buf[..., s.d_latent:], block_table,
                torch.tensor(seqlens, dtype=torch.int32, device=device), w_kv_b, w_uk, w_uv, max(seqlens))


def case_bytes(shape: MLAShape, batch: int, ctx: int, page: int, elem: int = 2) -> int:
    blocks = batch * max(1, math.ceil(ctx / page)) + 1
    return blocks * page * (shape.d_latent + shape.d_rope) * elem + blocks * 4


def provider_bytes(name: str, shape: MLAShape, batch: int, ctx: int, elem: int = 2) -> int:
    """Workspace a provider allocates beyond the inputs (estimated from its intermediate tensors)."""
    s, tokens = shape, batch * ctx
    if name == "naive":  # gathered latent + rope key, decompressed K/V, K with rope, V copy, mask, scores
        per_token = (elem * (s.d_latent + s.d_rope) + elem * s.heads * (s.d_nope + s.d_v)
                     + elem * s.heads * (s.d_nope + s.d_rope) + elem * s.heads * s.d_v + 1 + 8 * s.heads)
        return tokens * per_token
    if name == "torch_absorbed":  # bf16 gather, fp32 copies (twice), scores/probs in fp32
        return tokens * ((s.d_latent + s.d_rope) * (elem + 8) + 12 * s.heads)
    if name == "reference":  # float32, one request at a time, plus the outputs
        return ctx * ((s.d_latent + s.d_rope) * 8 + 12 * s.heads) + batch * s.heads * s.d_latent * 8
    return batch * s.heads * (s.d_latent + 1) * 4 * 64  # split-KV partials, generously


# ------------------------------------------------------------------------------------------------
# providers
# ------------------------------------------------------------------------------------------------


def naive_decode(q_nope, q_pe, kv_cache, pe_cache, block_table, cache_seqlens, softmax_scale, w_kv_b, d_v,
                 max_len: int | None = None):
    """The decompressed path, batched: q_nope [B, S, H, D_nope] (not absorbed) -> out [B, S, H, D_v].

    Gathers every sequence's latent up to ``max_len`` (default: the block table's capacity), expands it
    into per-head K/V through ``w_kv_b`` [H*(D_nope+D_v), R] with one matmul, and runs SDPA with a
    padding + causal mask.
    """
    batch, s_q, heads, d_nope = q_nope.shape
    page = kv_cache.shape[1]
    length = block_table.shape[1] * page if max_len is None else max_len
    pos = torch.arange(length, device=q_nope.device)
    valid = pos[None, :] < cache_seqlens[:, None]  # [B, L]
    blocks = torch.where(valid, block_table[:, pos // page].long(), 0)
    latent = kv_cache[blocks, pos % page]  # [B, L, R]
    k_pe = pe_cache[blocks, pos % page]  # [B, L, P]
    kv = (latent @ w_kv_b.T).view(batch, length, heads, d_nope + d_v)
    k = torch.cat([kv[..., :d_nope], k_pe[:, :, None, :].expand(-1, -1, heads, -1)], dim=-1)
    q = torch.cat([q_nope, q_pe], dim=-1)
    q_pos = cache_seqlens[:, None] - s_q + torch.arange(s_q, device=q.device)  # [B, S]
    mask = valid[:, None, :] & (pos[None, None, :] <= q_pos[..., None])  # [B, S, L]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), kv[..., d_nope:].transpose(1, 2),
                                         attn_mask=mask[:, None], scale=softmax_scale)  # [B, H, S, D_v]
    return out.transpose(1, 2)


def reference_outputs(case: Case):
    """(latent out [B, 1, H, R], value out [B, 1, H, D_v]) from ``reference.absorbed_decode`` in float32."""
    out, _ = absorbed_decode(case.q_abs, case.q_pe, case.kv_cache, case.pe_cache, case.block_table,
                             case.cache_seqlens, case.shape.softmax_scale, dtype=torch.float32)
    return out, torch.einsum("bshr,hvr->bshv", out, case.w_uv.float())


def fp8_provider(case: Case, mla_decode):
    """(function, reference thunk): mla_decode over ``case``'s cache quantized to the FP8 layout, and the float32
    reference over the dequantized cache (so only the kernel's own rounding is checked, not the quantization)."""
    from mla_kernels import fp8_latent_cache
    from mla_kernels.reference import dequantize_fp8, quantize_fp8

    c = case
    kv8, scale8, pe8 = fp8_latent_cache(c.kv_cache.shape[0], c.kv_cache.shape[1], c.shape.d_latent, c.shape.d_rope,
                                        device=c.kv_cache.device)
    q8, s8 = quantize_fp8(c.kv_cache)
    kv8.copy_(q8), scale8.copy_(s8), pe8.copy_(c.pe_cache)
    del q8, s8

    def expected():
        out, _ = absorbed_decode(c.q_abs, c.q_pe, dequantize_fp8(kv8, scale8, torch.bfloat16), pe8, c.block_table,
                                 c.cache_seqlens, c.shape.softmax_scale, dtype=torch.float32)
        return out

    return (lambda: mla_decode(c.q_abs, c.q_pe, kv8, pe8, c.block_table, c.cache_seqlens, c.shape.softmax_scale,
                               max_seqlen_k=c.max_len, kv_scale=scale8)), expected


SPARSE_TOPK = 2048  # DeepSeek-V3.2's index_topk
SPARSE_PROVIDER = True  # --skip-sparse: leave it out (a GPU session's first call keeps its minutes for issue 8)


def sparse_provider(case: Case, mla_decode):
    """(function, reference thunk): mla_decode with ``indices``, SPARSE_TOPK random distinct positions per token."""
    from mla_kernels.reference import sparse_decode

    c = case
    batch, s_q = c.q_abs.shape[:2]
    gen = torch.Generator(device=c.q_abs.device).manual_seed(7)
    order = torch.rand(batch, s_q, c.max_len, device=c.q_abs.device, generator=gen).argsort(-1)
    indices = order[..., :SPARSE_TOPK].to(torch.int32)
    del order

    def expected():
        out, _ = sparse_decode(c.q_abs, c.q_pe, c.kv_cache, c.pe_cache, c.block_table, c.cache_seqlens, indices,
                               c.shape.softmax_scale, dtype=torch.float32)
        return out

    return (lambda: mla_decode(c.q_abs, c.q_pe, c.kv_cache, c.pe_cache, c.block_table, c.cache_seqlens,
                               c.shape.softmax_scale, max_seqlen_k=c.max_len, indices=indices)), expected


ONLY_PROVIDERS = None  # --providers: just these everywhere (a GPU session's sparse step: sparse against dense)


def providers(case: Case, lib, only: tuple[str, ...] | None = None):
    """name -> (function, which reference it must match: "latent", "value" or a function computing it); with
    ``only``, just those (the fp8 and sparse providers build their own inputs, which the others need not wait for)."""
    mla_decode, decode_torch, _ = lib
    c, scale = case, case.shape.softmax_scale
    args = (c.q_abs, c.q_pe, c.kv_cache, c.pe_cache, c.block_table, c.cache_seqlens, scale)
    table = {
        "naive": (lambda: naive_decode(c.q_nope, c.q_pe, c.kv_cache, c.pe_cache, c.block_table, c.cache_seqlens,
                                       scale, c.w_kv_b, c.shape.d_v, c.max_len), "value"),
        "mla_decode": (lambda: mla_decode(*args, max_seqlen_k=c.max_len), "latent"),
        "mla_decode+w_uv": (lambda: mla_decode(*args, w_uv=c.w_uv, max_seqlen_k=c.max_len), "value"),
        "torch_absorbed": (lambda: decode_torch(*args), "latent"),
    }
    if only is None or "mla_decode_fp8" in only:
        table["mla_decode_fp8"] = fp8_provider(c, mla_decode)
    if SPARSE_PROVIDER and (only is None or "mla_decode_sparse" in only):
        table["mla_decode_sparse"] = sparse_provider(c, mla_decode)
    tma = tma_config(case)
    if tma is not None:
        table["mla_decode[tma]"] = (lambda: decode_with_config(case, tma), "latent")
    gluon = gluon_config(case)
    if gluon is not None:
        table["mla_decode[gluon]"] = (lambda: decode_with_config(case, gluon), "latent")
    return table if only is None else {name: table[name] for name in table if name in only}


# providers a CUDA graph cannot capture (--cuda-graph times them with CUDA events, and says so in the row); a
# capture they broke could leave the capture stream's allocation pool behind for every later capture
NOT_CAPTURABLE = {"torch_absorbed": "mla_decode_torch reads the longest length back to size its gather (a host "
                                    "sync)."}
GLUON_PROVIDER = True  # --skip-gluon: leave the Gluon kernel out (if its native parity test failed on this GPU)
TMA_PROVIDER = True  # --skip-tma: the same for the tensor-descriptor (TMA) path


def gluon_config(case: Case) -> dict | None:
    """The Gluon kernel's config (``decode_gluon``), where the dispatch really runs it for this case: an NVIDIA Hopper
    GPU (Gluon does not run under the interpreter), pages of whole 64-token tiles, bf16/fp16."""
    from mla_kernels import decode

    c = case
    if not c.q_abs.is_cuda or not GLUON_PROVIDER:
        return None
    cfg = decode._gluon_tiles()  # None: a triton without Gluon
    return cfg if cfg is not None and decode._hopper_kernel(cfg, c.q_abs, c.kv_cache, c.pe_cache) == "gluon" else None


def tma_config(case: Case) -> dict | None:
    """The Hopper (tensor-descriptor) path with the TMA probe's tiles, where that path can serve the case: an
    NVIDIA GPU of compute capability 9+ (or the interpreter) and pages of whole tiles."""
    from mla_kernels import _utils
    from mla_kernels.decode_tma import tma_config as probe_tiles
    from mla_kernels.decode_tma import tma_supported

    c = case
    if not TMA_PROVIDER or not _utils.use_triton(c.q_abs) or (c.q_abs.is_cuda and
                                                              not _utils.nvidia_sm90(c.q_abs.device)):
        return None
    cfg = probe_tiles(c.q_abs.shape[1] * c.shape.heads)
    return cfg if tma_supported(c.q_abs, c.kv_cache, c.pe_cache, cfg["BLOCK_N"]) else None


def decode_with_config(case: Case, config: dict) -> torch.Tensor:
    """mla_decode's kernel launch with an explicit config (the public call takes none): [B, S_q, H, R]."""
    from mla_kernels import decode

    c = case
    batch, s_q = c.q_abs.shape[:2]
    out, _ = decode._launch(c.q_abs, c.q_pe, c.kv_cache, c.pe_cache, c.block_table, c.cache_seqlens, None,
                            c.shape.softmax_scale, True, False, batch=batch, seq_q=s_q, total_tokens=batch * s_q,
                            max_seqlen_q=s_q, max_seqlen_k=c.max_len, num_splits=None, config=config)
    return out.view(c.q_abs.shape)


SPEEDUP_BASE = {"mla_decode": "torch_absorbed", "mla_decode+w_uv": "naive", "mla_decode[tma]": "torch_absorbed",
                "mla_decode[gluon]": "torch_absorbed", "mla_decode_fp8": "mla_decode", "mla_decode_sparse": "mla_decode"}
ORDER = ["naive", "torch_absorbed", "mla_decode", "mla_decode[tma]", "mla_decode[gluon]", "mla_decode+w_uv",
         "mla_decode_fp8", "mla_decode_sparse"]


# ------------------------------------------------------------------------------------------------
# sweep
# ------------------------------------------------------------------------------------------------


# Issue 8's target cases (B, ctx, H, page, S_q): FlashMLA's own B128 L4096 at 16 and 128 heads, long contexts
# that only splits can spread over the SMs, a 32-head page-16 case, small pages and multi-token decode.
TARGETS = [(128, 4096, 16, 64, 1), (128, 4096, 128, 64, 1), (8, 32768, 128, 64, 1), (1, 32768, 128, 64, 1),
           (64, 8192, 32, 16, 1), (128, 4096, 16, 16, 1), (128, 4096, 16, 1, 1), (32, 4096, 128, 16, 1),
           (64, 4096, 16, 64, 2), (64, 4096, 16, 64, 4), (32, 4096, 16, 64, 8), (32, 4096, 128, 64, 2),
           (64, 4096, 1, 64, 1), (64, 4096, 64, 64, 1)]


def sweep_shapes(cpu: bool, quick: bool):
    """(B, ctx, H, page[, S_q]) tuples (S_q defaults to 1)."""
    if cpu:
        if quick:
            return [(2, 256, 16, 64), (2, 512, 16, 16)]
        return [(2, 256, 16, 64), (2, 1024, 16, 64), (4, 512, 16, 64), (2, 512, 16, 16), (2, 256, 16, 1)]
    batches = [1, 32, 128] if quick else [1, 8, 32, 64, 128]
    ctxs = [1024, 8192] if quick else [512, 2048, 8192, 32768]
    grid = [(b, l, hd, 64) for hd in (16, 128) for b in batches for l in ctxs]
    if quick:
        return TARGETS[:4] + grid
    return TARGETS + grid + [(32, 4096, hd, pg) for hd in (16, 128) for pg in (1, 16)]


def run_shape(batch, ctx, heads, page, device, dtype, lib, copy_gbps, time_kw, s_q: int = 1,
              only: tuple[str, ...] | None = None) -> list[dict]:
    """All providers (or those named in ``only``, else ``--providers``) on one shape; rows in ORDER, skipped ones
    with a note."""
    only = only if only is not None else ONLY_PROVIDERS
    shape = MLAShape(heads=heads)
    keys = dict(B=batch, ctx=ctx, H=heads, page=page, S_q=s_q)
    flops = h.mla_flops(batch, s_q, heads, ctx, shape.d_latent, shape.d_rope)
    nbytes = h.mla_bytes(batch, s_q, heads, ctx, shape.d_latent, shape.d_rope, dtype.itemsize)
    need = case_bytes(shape, batch, ctx, page, dtype.itemsize) + provider_bytes("reference", shape, batch, ctx)
    if not h.fits(need, device):
        note = f"skipped: inputs + reference need ~{h.gib(need)}, {h.gib(h.free_memory(device))} free"
        return [h.make_row(name, None, note=note, **keys) for name in ORDER if only is None or name in only]
    case = make_case(shape, [ctx] * batch, page, dtype, device, s_q=s_q)
    ref_latent, ref_value = reference_outputs(case)
    rows, p50, methods = {}, {}, {}
    for name, (fn, which) in providers(case, lib, only).items():
        extra = provider_bytes(name, shape, batch, ctx, dtype.itemsize)
        if not h.fits(extra, device):
            rows[name] = h.make_row(name, None, note=f"skipped: needs ~{h.gib(extra)} more, "
                                    f"{h.gib(h.free_memory(device))} free", **keys)
            continue
        expected = which() if callable(which) else ref_latent if which == "latent" else ref_value
        kw = dict(time_kw, cuda_graph=False) if name in NOT_CAPTURABLE else time_kw
        try:
            timing, err = h.check_then_time(name, fn, expected, device, dtype, **kw)
        except Exception as exc:  # (TMA, Gluon: never run natively) the others still run; the exit status says so
            rows[name] = h.untimed_row(name, exc, **keys)
            continue
        work = dict(flops=flops, nbytes=nbytes)
        if name == "mla_decode_fp8":  # the bytes it reads: its own 656-byte rows (scales included), not bf16's 1152;
            from mla_kernels.cache import fp8_row_bytes  # effective_gbps: bf16's bytes, to compare with mla_decode

            work["nbytes"] = h.mla_bytes(batch, s_q, heads, ctx, shape.d_latent, shape.d_rope, dtype.itemsize,
                                         cache_row_bytes=fp8_row_bytes(shape.d_latent, shape.d_rope, dtype))
            work["effective_gbps"] = nbytes / (timing.p50 * 1e-3) / 1e9
        if name == "mla_decode_sparse":  # the keys it reads, not the whole context: each token its own list
            read = min(ctx, SPARSE_TOPK)
            work = dict(flops=h.mla_flops(batch * s_q, 1, heads, read, shape.d_latent, shape.d_rope),
                        nbytes=h.mla_bytes(batch * s_q, 1, heads, read, shape.d_latent, shape.d_rope,
                                           dtype.itemsize))
        rows[name] = h.make_row(name, timing, copy_gbps=copy_gbps, rel_rms_err=err, **work, **keys)
        if name in NOT_CAPTURABLE and time_kw.get("cuda_graph"):
            rows[name]["note"] = (f"timed without a CUDA graph: {NOT_CAPTURABLE[name]} " + rows[name]["note"]).strip()
        l2_resident = case_bytes(shape, batch, ctx, page, dtype.itemsize) < 2 * h.l2_bytes(device)
        if timing.method == "cuda-graph" and l2_resident:
            rows[name]["note"] = ("L2-resident: graph replays run back to back without an L2 flush, so the cache "
                                  "is partly served from L2 " + rows[name]["note"]).strip()
        p50[name], methods[name] = timing.p50, timing.method
    for name, base in SPEEDUP_BASE.items():
        # (a graph replay against CUDA events with L2 flushed would say more about the timing than the kernels)
        if name in p50 and base in p50 and methods[name] == methods[base]:
            rows[name]["speedup"] = f"x{p50[base] / p50[name]:.2f} vs {base}"
            rows[name]["speedup_vs"] = {base: p50[base] / p50[name]}
    del case, ref_latent, ref_value
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return [rows[n] for n in ORDER if n in rows]


def run_sweep(device, dtype, lib, quick: bool, cuda_graph: bool, copy_gbps: float,
              rows: list | None = None) -> list[dict]:
    """The sweep's rows, appended to ``rows`` (a list the caller holds) as each shape finishes."""
    cpu = h.is_cpu(device)
    time_kw = dict(rep_ms=100.0, warmup_ms=25.0, cuda_graph=cuda_graph)
    if cpu:
        time_kw.update(rep_ms=50.0, warmup_ms=10.0, min_runs=3)
    shapes = sweep_shapes(cpu, quick)
    keys = ("B", "ctx", "H", "page", "S_q")
    print(h.table_header(keys))
    rows = [] if rows is None else rows
    for batch, ctx, heads, page, *s_q in h.progress(shapes, "decode sweep"):
        for row in run_shape(batch, ctx, heads, page, device, dtype, lib, copy_gbps, time_kw, *s_q):
            h.log(h.format_row(row, keys))
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------
# imbalanced batches: one long sequence beside shorter ones, against the uniform batch of the same tokens
# ------------------------------------------------------------------------------------------------

IMBALANCED_ORDER = ["mla_decode", "mla_decode+meta", "mla_decode+split", "mla_decode[wide]",
                    "mla_decode+meta[wide]", "metadata_step"]
SPLIT_TOKENS = 2048  # mla_decode+split: batch-invariant decode (split_tokens), its cost against the default
WIDE_TABLE = 8  # a serving engine's block table: wide enough for its longest context, here 8x the batch's longest


def imbalanced_lengths(batch: int, longest: int, seed: int = 0) -> list[int]:
    """One sequence of ``longest`` tokens; the others drawn uniformly between ``longest/64`` and ``longest/2``."""
    gen = torch.Generator().manual_seed(seed)
    rest = torch.randint(max(1, longest // 64), longest // 2 + 1, (batch - 1,), generator=gen).tolist()
    return [longest] + rest


def imbalanced_shapes(cpu: bool, quick: bool):
    """(B, longest, H, page) tuples: 16 and 128 heads, batch 32 to 128 (issue 13)."""
    if cpu:
        return [(4, 256, 16, 64)] if quick else [(4, 256, 16, 64), (8, 512, 16, 16)]
    batches = [64, 128] if quick else [32, 64, 128]
    longest = [8192] if quick else [4096, 16384]
    return [(b, l, hd, 64) for hd in (16, 128) for b in batches for l in longest]


def imbalanced_library():
    """(mla_decode, mla_decode_metadata, schedule module)."""
    from mla_kernels import mla_decode, mla_decode_metadata, schedule

    return mla_decode, mla_decode_metadata, schedule


def run_imbalanced_pair(batch, longest, heads, page, device, dtype, copy_gbps, time_kw, shape=None,
                        lib=None) -> list[dict]:
    """An imbalanced batch and its uniform twin (every sequence at the mean length: the same total tokens),
    each through mla_decode as shipped (``mla_decode``), with a schedule built beforehand (``mla_decode+meta``,
    as every layer of a step reuses it), batch-invariant (``mla_decode+split``: ``split_tokens=SPLIT_TOKENS``),
    and the schedule's own step (``metadata_step``, once per step).

    The ``[wide]`` rows make the same calls as a serving engine makes them: a block table ``WIDE_TABLE``
    times wider than the longest sequence needs (the extra columns repeat a block id, never read) and no
    ``max_seqlen_k``, so the uniform split is sized from the table's capacity (many empty splits), while the
    schedule is cut from the real lengths (FlashMLA's interface, ``get_mla_metadata``, runs it this way).

    Every timed row carries ``pct_of_uniform``: its throughput (the byte model, which counts the same tokens
    for both) over the uniform twin's with mla_decode as shipped; ``mla_decode+meta`` rows also ``vs_default``,
    the speed-up over mla_decode as shipped on the same batch (and table), as ``mla_decode+split`` rows do."""
    mla_decode, mla_decode_metadata, schedule = lib or imbalanced_library()
    shape = shape or MLAShape(heads=heads)
    lens = imbalanced_lengths(batch, longest)
    twins = {"imbal": lens, "unif": [round(sum(lens) / batch)] * batch}
    rows = {}
    for kind, lengths in twins.items():
        ctx = max(lengths)
        keys = dict(B=batch, ctx=ctx, H=heads, page=page, kind=kind, total_tokens=sum(lengths))
        nbytes = h.mla_bytes(batch, 1, heads, lengths, shape.d_latent, shape.d_rope, dtype.itemsize)
        flops = h.mla_flops(batch, 1, heads, lengths, shape.d_latent, shape.d_rope)
        need = case_bytes(shape, batch, ctx, page, dtype.itemsize) + provider_bytes("reference", shape, batch, ctx)
        if not h.fits(need, device):
            note = f"skipped: inputs + reference need ~{h.gib(need)}, {h.gib(h.free_memory(device))} free"
            rows.update({(kind, n): h.make_row(n, None, note=note, **keys) for n in IMBALANCED_ORDER})
            continue
        case = make_case(shape, lengths, page, dtype, device)
        c, scale = case, shape.softmax_scale
        args = (c.q_abs, c.q_pe, c.kv_cache, c.pe_cache, c.block_table, c.cache_seqlens, scale)

        def build():
            return mla_decode_metadata(c.cache_seqlens, heads, 1, kv_lora_rank=shape.d_latent, max_seqlen_k=c.max_len)

        meta = build()
        expected_units = schedule.schedule_reference(lengths, meta.block_n, meta.num_programs)
        if schedule.units_of(meta, c.cache_seqlens.cpu()) != expected_units:
            rows[kind, "metadata_step"] = h.make_row("metadata_step", None, note="NOT TIMED, WRONG RESULT: the "
                                                     "schedule differs from schedule_reference", wrong=True, **keys)
        else:
            timing = h.time_fn(build, device, **time_kw)
            rows[kind, "metadata_step"] = h.make_row("metadata_step", timing, num_programs=meta.num_programs, **keys)
        ref_latent, _ = reference_outputs(case)
        table = c.block_table
        wide = torch.cat([table, table[:, :1].expand(-1, (WIDE_TABLE - 1) * table.shape[1])], dim=1)
        wide_args = args[:4] + (wide,) + args[5:]
        wide_meta = mla_decode_metadata(c.cache_seqlens, heads, 1, kv_lora_rank=shape.d_latent)
        for name, fn in (("mla_decode", lambda: mla_decode(*args, max_seqlen_k=c.max_len)),
                         ("mla_decode+meta", lambda: mla_decode(*args, max_seqlen_k=c.max_len, metadata=meta)),
                         ("mla_decode+split", lambda: mla_decode(*args, max_seqlen_k=c.max_len,
                                                                 split_tokens=SPLIT_TOKENS)),
                         ("mla_decode[wide]", lambda: mla_decode(*wide_args)),
                         ("mla_decode+meta[wide]", lambda: mla_decode(*wide_args, metadata=wide_meta))):
            try:
                timing, err = h.check_then_time(name, fn, ref_latent, device, dtype, **time_kw)
            except Exception as exc:  # the scheduled grid has never run natively: the other rows still run
                rows[kind, name] = h.untimed_row(name, exc, **keys)
                continue
            rows[kind, name] = h.make_row(name, timing, flops=flops, nbytes=nbytes, copy_gbps=copy_gbps,
                                          rel_rms_err=err, **keys)
        del case, ref_latent, meta, wide_meta, wide, wide_args
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = rows.get(("unif", "mla_decode"), {}).get("gbps")
    for (kind, name), row in rows.items():
        if name != "metadata_step" and base and "gbps" in row:
            row["pct_of_uniform"] = 100.0 * row["gbps"] / base
            row["speedup"] = f"{row['pct_of_uniform']:.0f}% of unif."
        plain = name.replace("+meta", "").replace("+split", "")
        default = rows.get((kind, plain), {}).get("p50_ms")
        if plain != name and default and "p50_ms" in row:
            row["vs_default"] = default / row["p50_ms"]
            row["note"] = (row["note"] + f" x{row['vs_default']:.2f} vs {plain}").strip()
    return [rows[k, n] for k in twins for n in IMBALANCED_ORDER if (k, n) in rows]


def run_imbalanced(device, dtype, quick: bool, cuda_graph: bool, copy_gbps: float,
                   rows: list | None = None) -> list[dict]:
    cpu = h.is_cpu(device)
    time_kw = dict(rep_ms=100.0, warmup_ms=25.0, cuda_graph=cuda_graph)
    if cpu:
        time_kw.update(rep_ms=50.0, warmup_ms=10.0, min_runs=3)
    keys = ("B", "ctx", "H", "kind")
    print("\nImbalanced batches (lengths longest/64 .. longest/2, one at the longest) beside uniform twins of the "
          "same total tokens; % of unif. = throughput over the uniform twin's with mla_decode as shipped")
    print(h.table_header(keys))
    rows = [] if rows is None else rows
    for batch, longest, heads, page in h.progress(imbalanced_shapes(cpu, quick), "imbalanced"):
        for row in run_imbalanced_pair(batch, longest, heads, page, device, dtype, copy_gbps, time_kw):
            h.log(h.format_row(row, keys))
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------
# seed 003's decode scenario
# ------------------------------------------------------------------------------------------------


def seed_scenario(device, dtype, lib, warmups: int = SEED_WARMUPS, rounds: int = SEED_ROUNDS,
                  with_naive: bool = True) -> dict:
    """16 requests, history 50x4, 100x4, 200x4, 400x4, one new token each per round.

    A step = write the new token's latent and rope key into the cache (write_cache), absorb the query
    (einsum with W_UK), attend (mla_decode with w_uv). ``warmups`` rounds, then ``rounds`` timed rounds;
    the cache grows by one token per request per round throughout. Reports tokens/s of the whole
    step (wall clock over all rounds) and of the decode call alone (CUDA events / perf_counter).
    """
    mla_decode, decode_torch, write_cache = lib
    shape, page, batch = SEED_SMALL, 64, len(SEED_HISTORY)
    total = warmups + rounds
    case = make_case(shape, [n + 1 for n in SEED_HISTORY], page, dtype, device, capacity=max(SEED_HISTORY) + total)
    gen = torch.Generator(device=device).manual_seed(1)
    new_kv = torch.randn(total, batch, shape.d_latent, device=device, dtype=dtype, generator=gen)
    new_pe = torch.randn(total, batch, shape.d_rope, device=device, dtype=dtype, generator=gen)
    q_nope = torch.randn(total, batch, 1, shape.heads, shape.d_nope, device=device, dtype=dtype, generator=gen)
    q_pe = torch.randn(total, batch, 1, shape.heads, shape.d_rope, device=device, dtype=dtype, generator=gen)
    history = torch.tensor(SEED_HISTORY, device=device, dtype=torch.int64)
    position = history[None, :] + torch.arange(total, device=device)[:, None]  # [rounds, B]: the new token's slot
    block = case.block_table.long().gather(1, (position // page).T).T
    slots = block * page + position % page  # [rounds, B] int64
    seqlens = (position + 1).to(torch.int32)
    max_lens = [max(SEED_HISTORY) + r + 1 for r in range(total)]
    scale = shape.softmax_scale

    def write(r):
        write_cache(new_kv[r], new_pe[r], case.kv_cache, case.pe_cache, slots[r])

    attend = {
        "mla_decode": lambda r: mla_decode(
            torch.einsum("bshd,hdr->bshr", q_nope[r], case.w_uk), q_pe[r], case.kv_cache, case.pe_cache,
            case.block_table, seqlens[r], scale, w_uv=case.w_uv, max_seqlen_k=max_lens[r]),
        "torch_absorbed": lambda r: decode_torch(
            torch.einsum("bshd,hdr->bshr", q_nope[r], case.w_uk), q_pe[r], case.kv_cache, case.pe_cache,
            case.block_table, seqlens[r], scale, w_uv=case.w_uv),
    }
    notes = []
    if not with_naive:
        notes.append("naive skipped: decompressing 16 x ~500 tokens through kv_b_proj every round is seconds per "
                     "round on a CPU")
    else:
        attend["naive"] = lambda r: naive_decode(q_nope[r], q_pe[r], case.kv_cache, case.pe_cache, case.block_table,
                                                 seqlens[r], scale, case.w_kv_b, shape.d_v, max_lens[-1])

    # every step's write is timed with it: check it stores round 0's tokens, into slots cleared first (make_case's
    # random fill is what the reference would read where a write left a slot alone)
    case.kv_cache.flatten(0, 1)[slots[0]] = 0
    case.pe_cache.flatten(0, 1)[slots[0]] = 0
    write(0)
    stored = (case.kv_cache.flatten(0, 1)[slots[0]], case.pe_cache.flatten(0, 1)[slots[0]])
    write_ok = torch.equal(stored[0], new_kv[0]) and torch.equal(stored[1], new_pe[0])
    results = {}
    for name, fn in attend.items():
        if not write_ok:
            results[name] = {"wrong": True, "error": f"seed scenario {name}: write_cache did not store the new "
                             "tokens' latent and rope key at their slots; refusing to time a wrong result"}
            continue
        write(0)
        out = fn(0)
        q_abs = torch.einsum("bshd,hdr->bshr", q_nope[0].float(), case.w_uk.float()).to(dtype)
        expected, _ = absorbed_decode(q_abs, q_pe[0], case.kv_cache, case.pe_cache, case.block_table, seqlens[0],
                                      scale, w_uv=case.w_uv, dtype=torch.float32)
        try:
            err = h.check_close(f"seed scenario {name}", out, expected, dtype)
        except h.WrongResult as exc:
            results[name] = {"wrong": True, "error": str(exc)}
            continue
        for r in range(warmups):
            write(r)
            fn(r)
        step_sw, call_sw = h.Stopwatch(device), h.Stopwatch(device)
        h.synchronize(device)
        start = time.perf_counter()
        for r in range(warmups, total):
            with step_sw:
                write(r)
                with call_sw:
                    fn(r)
        h.synchronize(device)
        wall_s = time.perf_counter() - start
        call_ms = call_sw.times_ms()
        results[name] = {
            "tokens_per_s_step": batch * rounds / wall_s,
            "tokens_per_s_attention_call": batch * rounds / (sum(call_ms) * 1e-3),
            "wall_s": wall_s,
            "step_ms": h.Timing.from_times(step_sw.times_ms(), "cuda-events" if device.type == "cuda"
                                           else "perf_counter").to_dict(),
            "attention_call_ms": h.Timing.from_times(call_ms, "cuda-events" if device.type == "cuda"
                                                     else "perf_counter").to_dict(),
            "rel_rms_err_round0": err,
        }
    return {
        "requests": batch, "history": SEED_HISTORY, "new_tokens_per_round": 1, "warmups": warmups,
        "rounds": rounds, "page": page, "shape": dataclasses.asdict(shape), "dtype": str(dtype),
        "step": "write_cache + einsum(q_nope, W_UK) + attention with W_UV (naive: write + decompress + SDPA)",
        "seed_tokens_per_s": SEED_TOKENS_PER_S,
        "seed_note": "seed 003's sample output, their implementation on their (unnamed) GPU: not the same machine",
        "providers": results,
        "notes": notes,
    }


def print_seed(res: dict) -> None:
    print(f"\nSeed 003 decode: {res['requests']} requests, history 50x4 100x4 200x4 400x4, "
          f"{res['warmups']} warm-ups + {res['rounds']} rounds, page {res['page']}, {res['dtype']}")
    for name, r in res["providers"].items():
        if r.get("wrong"):
            print(f"  {name:<15} NOT TIMED, WRONG RESULT: {r['error']}")
            continue
        print(f"  {name:<15} step {r['tokens_per_s_step']:10.1f} tok/s   attention call alone "
              f"{r['tokens_per_s_attention_call']:10.1f} tok/s   (step p50 {r['step_ms']['p50']:.3f} ms, "
              f"mean {r['step_ms']['mean']:.3f} +- {r['step_ms']['std']:.3f})")
    for note in res["notes"]:
        print(f"  {note}")
    ours = res["providers"].get("mla_decode", {}).get("tokens_per_s_step")
    ratio = f"; mla_decode's step here is x{ours / SEED_TOKENS_PER_S:.2f} that" if ours else ""
    print(f"  seed 003's number: {SEED_TOKENS_PER_S} tok/s (their implementation on their GPU, not this machine{ratio})")


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------


def roofline_points(rows: list[dict]) -> list[dict]:
    """The timed rows as roofline points: arithmetic intensity (FLOP per byte of cache read) and TFLOP/s."""
    return [dict(provider=r["provider"], H=r["H"], S_q=r.get("S_q", 1), page=r["page"], tflops=r["tflops"],
                 intensity=r["tflops"] * 1e12 / (r["gbps"] * 1e9))
            for r in rows if "p50_ms" in r and r.get("gbps") and r.get("tflops")]


def plot(rows: list[dict], rates: dict, path) -> None:
    """Left: every timed case on the device's roofline, min(matmul rate, intensity x copy bandwidth), both
    measured in the same run (``device_rates``). Right: mla_decode+w_uv's speed-up over the naive path."""
    plt = h.pyplot()
    if plt is None:
        return
    fig, (roof, speed) = plt.subplots(1, 2, figsize=(13, 5))
    pts = roofline_points(rows)
    peak, bw = rates["matmul_tflops"], rates["copy_gbps"]
    lo = min([p["intensity"] for p in pts] + [1.0]) / 2
    hi = max([p["intensity"] for p in pts] + [2 * peak * 1e3 / bw]) * 2
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    roof.plot(xs, [min(peak, x * bw / 1e3) for x in xs], color="black", lw=1.5,
              label=f"roofline: {bw:.0f} GB/s copy, {peak:.1f} TFLOP/s GEMM (measured)")
    markers = {1: "v", 8: "<", 16: "o", 32: "s", 64: "D", 128: "^"}
    for i, prov in enumerate(sorted({p["provider"] for p in pts}, key=lambda n: (ORDER + [n]).index(n))):
        mine = [p for p in pts if p["provider"] == prov]
        for hd in sorted({p["H"] for p in mine}):
            sel = [p for p in mine if p["H"] == hd]
            roof.scatter([p["intensity"] for p in sel], [p["tflops"] for p in sel], color=f"C{i}",
                         marker=markers.get(hd, "x"), s=22, label=f"{prov} H={hd}")
    roof.set(xscale="log", yscale="log", xlabel="FLOP per byte of cache read", ylabel="TFLOP/s",
             title="decode on the measured roofline")
    roof.grid(True, which="both", alpha=0.3)
    roof.legend(fontsize=6, ncol=2)
    timed = [r for r in rows if "p50_ms" in r and r["provider"] == "mla_decode+w_uv" and "speedup_vs" in r
             and r.get("S_q", 1) == 1 and r["page"] == 64]
    for hd in sorted({r["H"] for r in timed}):
        for b in sorted({r["B"] for r in timed if r["H"] == hd}):
            line = sorted((r["ctx"], r["speedup_vs"]["naive"]) for r in timed if r["H"] == hd and r["B"] == b)
            speed.plot(*zip(*line), marker=markers.get(hd, "x"), label=f"H={hd} B={b}")
    speed.set(xscale="log", xlabel="context", ylabel="speed-up (x)", title="mla_decode+w_uv vs naive (page 64)")
    speed.grid(True, alpha=0.3)
    if timed:
        speed.legend(fontsize=7)
    h.save_plot(fig, path)


def cpu_timed(interpreted: bool) -> str:
    """What a CPU run of this bench times, for its header and its results' notes: under ``TRITON_INTERPRET=1`` the
    library's providers run its Triton kernels in the interpreter (the PyTorch providers, torch_absorbed and naive,
    stay PyTorch); without it ``mla_decode`` takes its PyTorch path. Saying the PyTorch path under the interpreter
    mislabelled what the numbers measure."""
    if interpreted:
        return ("the Triton kernels in Triton's CPU interpreter (mla_decode and its variants; torch_absorbed and "
                "naive are PyTorch)")
    return "the PyTorch path (mla_decode without Triton)"


def read_saved(path: str) -> dict:
    """The results file ``--replot`` names, or a one-line ``SystemExit`` naming it and what is wrong with it (missing
    or unreadable, not JSON, not bench.decode's results): a traceback (FileNotFoundError, JSONDecodeError,
    KeyError: 'device_rates') said neither."""
    try:
        saved = json.loads(Path(path).read_text())
    except OSError as exc:
        raise SystemExit(f"--replot {path}: cannot read it ({exc.strerror or exc})") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise SystemExit(f"--replot {path}: not a JSON results file ({exc})") from None
    if not isinstance(saved, dict):
        raise SystemExit(f"--replot {path}: not bench.decode's results (a JSON {type(saved).__name__}, not an object)")
    other = saved.get("benchmark", "decode")
    if other != "decode":
        raise SystemExit(f"--replot {path}: not bench.decode's results (bench.{other}'s)")
    rates = saved.get("device_rates")
    if not isinstance(rates, dict) or not {"copy_gbps", "matmul_tflops"} <= rates.keys():
        raise SystemExit(f"--replot {path}: no device_rates (copy_gbps, matmul_tflops) to draw the roofline from")
    return saved


def main(argv=None) -> None:
    parser = h.make_parser(__doc__.split("\n\n")[0], seed_and_sweep=True)
    parser.add_argument("--skip-imbalanced", action="store_true", help="no imbalanced-batch section")
    parser.add_argument("--replot", metavar="JSON", default=None,
                        help="only draw the PNG (roofline) of a saved results file, beside it; nothing is timed")
    parser.add_argument("--skip-gluon", action="store_true",
                        help="no mla_decode[gluon] provider (the Gluon kernel, Hopper only)")
    parser.add_argument("--skip-tma", action="store_true",
                        help="no mla_decode[tma] provider (the tensor-descriptor path, Hopper only)")
    parser.add_argument("--skip-sparse", action="store_true", help="no mla_decode_sparse provider")
    parser.add_argument("--providers", default=None,
                        help=f"comma-separated: time only these (from {','.join(ORDER)}); default all")
    args = parser.parse_args(argv)
    global GLUON_PROVIDER, TMA_PROVIDER, SPARSE_PROVIDER, ONLY_PROVIDERS
    GLUON_PROVIDER, TMA_PROVIDER, SPARSE_PROVIDER = not args.skip_gluon, not args.skip_tma, not args.skip_sparse
    only = None
    if args.providers is not None:
        only = tuple(dict.fromkeys(p.strip() for p in args.providers.split(",") if p.strip()))
        unknown = [p for p in only if p not in ORDER]
        if unknown or not only:
            parser.error(f"--providers: {'unknown ' + str(unknown) if unknown else 'none given'}; "
                         f"choose from {','.join(ORDER)}")
    ONLY_PROVIDERS = only
    if args.replot:
        saved = read_saved(args.replot)
        plot(saved.get("sweep", []) + saved.get("imbalanced", []), saved["device_rates"],
             Path(args.replot).with_suffix(".png"))
        return
    device = h.setup(args)
    cpu = h.is_cpu(device)
    lib = library()
    dtype = torch.bfloat16
    from mla_kernels import _utils

    seed_rounds = (SEED_WARMUPS, SEED_ROUNDS)
    interpreted = cpu and _utils.interpreting()
    if interpreted:
        print("TRITON_INTERPRET=1: mla_decode runs in Triton's CPU interpreter; these timings measure the "
              "interpreter, the sweep is cut to --quick and the seed scenario to 1 warm-up + 2 rounds")
        args.quick, seed_rounds = True, (1, 2)
    if cpu:
        print(f"CPU timings of {cpu_timed(interpreted)}; no GPU, {torch.get_num_threads()} threads")
    rates = h.device_rates(device)
    print(f"{h.device_name(device)}: copy {rates['copy_gbps']:.1f} GB/s ({rates['copy_what']}), "
          f"GEMM {rates['matmul_tflops']:.2f} TFLOP/s ({rates['matmul_what']})")

    payload = {
        "config": {"quick": args.quick, "cuda_graph": args.cuda_graph, "dtype": str(dtype)},
        "device_rates": rates,
        "models": {
            "flops": "2*B*S_q*H*L*(R+P+R) (FlashMLA); the W_UV projection of the +w_uv rows is not counted",
            "bytes": "(B*L*(R+P) + B*S_q*H*(R+P+R))*elem_size (FlashMLA); mla_decode_fp8: its 656-byte rows for "
                     "B*L (effective_gbps: bf16 bytes); mla_decode_sparse: the keys it reads",
            "timing": ("GPU: triton.testing.do_bench_cudagraph, graph replays back to back, L2 NOT flushed "
                       "(rows whose cache fits twice in L2 say so)" if args.cuda_graph else
                       "GPU: triton.testing.do_bench, L2 flushed before each run") + "; CPU: perf_counter",
        },
    }
    if cpu:
        payload["notes"] = [
            f"CPU timings of {cpu_timed(interpreted)}; not indicative of GPU performance",
            "CPU: the naive path's decompression is a bf16 GEMM, far slower than fp32 on CPUs without native "
            "bf16, so speed-ups against naive on a CPU mostly measure that",
        ]
    with h.save_if_stopped("decode", payload, device, args):
        if not args.skip_seed:
            payload["seed_003_decode"] = seed_scenario(device, dtype, lib, *seed_rounds, with_naive=not cpu)
            print_seed(payload["seed_003_decode"])
            print()
        if not args.skip_sweep:
            run_sweep(device, dtype, lib, args.quick, args.cuda_graph, rates["copy_gbps"],
                      payload.setdefault("sweep", []))
        if not args.skip_imbalanced:
            run_imbalanced(device, dtype, args.quick, args.cuda_graph, rates["copy_gbps"],
                           payload.setdefault("imbalanced", []))
    sweep = payload.get("sweep", [])
    h.save_results("decode", payload, device, args,
                   plot=(lambda png: plot(sweep + payload.get("imbalanced", []), rates, png)) if sweep else None)
    h.exit_if_wrong(sweep + payload.get("imbalanced", []), payload.get("seed_003_decode", {}).get("providers", {}),
                    lambda r: f"{r['provider']} {r['B']}x{r['ctx']} H={r['H']} page={r['page']} S_q={r.get('S_q', 1)}")


if __name__ == "__main__":
    main()
