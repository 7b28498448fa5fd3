"""Writing new tokens into the paged latent cache, and a manager that hands out its blocks.

The cache holds, per layer, the normalized latent ``c_kv`` (``R = kv_lora_rank`` wide) and the
roped key ``k_pe`` (``P = qk_rope_head_dim`` wide) of every cached token, in pages of
``block_size`` tokens: ``kv_cache [num_blocks, block_size, R]`` and
``pe_cache [num_blocks, block_size, P]``, usually two views of one
``[num_blocks, block_size, R + P]`` buffer. A token's place is its *slot*,
``block_id * block_size + offset``.

``write_cache`` scatters new tokens to their slots. ``PagedLatentCache`` owns the buffers and
a block allocator: it reserves slots for new tokens of each sequence (once per step, for every
layer), builds the ``block_table`` and ``cache_seqlens`` the attention kernels read, and frees
a finished sequence's blocks for reuse.
"""

from __future__ import annotations

from typing import Hashable, Iterable, Sequence

import torch
import triton
import triton.language as tl

from . import _launcher, _utils
from . import _tuning
from ._convert import to_float32
from ._utils import FLOAT_DTYPES, INDEX_DTYPES

__all__ = ["write_cache", "PagedLatentCache", "CacheFullError", "fp8_latent_cache", "fp8_row_bytes"]


# ---------------------------------------------------------------------------------------------
# write_cache: kernel, launcher, public function
# ---------------------------------------------------------------------------------------------


@triton.jit
def _round_e4m3(x):
    """Round fp32 ``x`` (|x| <= 448) to the nearest e4m3 value, ties to even, staying in fp32, so that the encoding
    which follows (``_e4m3_bits``) is exact on every backend. (The interpreter's own fp32 -> fp8 cast drops
    the carry into the exponent when rounding up to a power of two (measured: 2.5% of N(0, 100) values came out
    halved, -31.6 -> -16); a GPU's cvt.rn would round the same as this.) Normal range (|x| >= 2^-6): round the fp32
    mantissa to 3 bits (a carry moves into the exponent); subnormal range: spacing 2^-9, by adding and removing
    1.5 * 2^14, whose fp32 spacing is 2^-9."""
    bits = x.to(tl.uint32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
    sub = (tl.abs(x) + 24576.0) - 24576.0
    sub = tl.where((bits >> 31) != 0, -sub, sub)  # the sign bit, not x < 0: -0.0 stays -0.0 (0x80), as torch's cast
    return tl.where(tl.abs(x) < 0.015625, sub, normal)


@triton.jit
def _max_nan(a, b):
    """``tl.maximum`` that returns NaN where either is NaN (as torch's amax and clamp; tl.max drops NaN)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _e4m3_bits(q):
    """The e4m3fn bits (uint8, sign bit clear) of fp32 ``q``, a finite value on the e4m3 grid (``_round_e4m3``,
    |q| <= 448), by integer arithmetic: no e4m3 type, which NVIDIA GPUs before sm_89 lack, and exact where a cast
    would round the same (so every backend stores the same bytes). Normal values: the fp32 exponent rebased from
    bias 127 to 7 and the top 3 mantissa bits; subnormals (|q| < 2^-6): q / 2^-9, an integer 0 to 7."""
    a = tl.abs(q)
    fbits = a.to(tl.uint32, bitcast=True)
    normal = ((fbits >> 23) - 120) << 3 | ((fbits >> 20) & 7)  # (wraps for subnormals, which take the other branch)
    sub = (a * 512.0).to(tl.uint32)
    return tl.where(a < 0.015625, sub, normal).to(tl.uint8)


@triton.jit
def _quantize_fp8(x, BLOCK_T: tl.constexpr, D_LATENT: tl.constexpr):
    """``x [BLOCK_T, D_LATENT]`` fp32 -> (e4m3 bits ``[BLOCK_T, D_LATENT]`` uint8, fp32 scales
    ``[BLOCK_T, D_LATENT // 128]``), ``scale = amax / 448`` per 128 values, as ``reference.quantize_fp8`` (a NaN
    gives its group a NaN scale and stays NaN; an inf gives an inf scale)."""
    groups = tl.reshape(x, [BLOCK_T, D_LATENT // 128, 128])
    scale = tl.math.div_rn(tl.reduce(tl.abs(groups), 2, _max_nan), 448.0)  # [BLOCK_T, D_LATENT // 128]
    q = tl.math.div_rn(groups, tl.where(scale > 0.0, scale, 1.0)[:, :, None])  # IEEE division, as torch (not div.full)
    q = tl.reshape(tl.minimum(_max_nan(q, -448.0), 448.0, propagate_nan=tl.PropagateNan.ALL), [BLOCK_T, D_LATENT])
    # NaN is found before rounding: _round_e4m3's integer add wraps a NaN whose top mantissa bits are set (a GPU's
    # canonical 0x7FFFFFFF, which its NaN-propagating max returns, or bf16's 0x7FFF and 0xFFFF) into +-0.0
    nan = q != q
    bits = _e4m3_bits(_round_e4m3(tl.where(nan, 0.0, q)))
    # the sign bit set from x's (q = x / scale, scale >= 0, so it is q's): -0.0 stays 0x80, as torch's cast gives
    bits = bits | ((x.to(tl.uint32, bitcast=True) >> 31).to(tl.uint8) << 7)
    bits = tl.where(nan, 0x7F, bits)  # NaN as e4m3fn's NaN
    return bits, scale


@triton.jit
def _write_cache_kernel(
    kv_c_ptr, k_pe_ptr, kv_cache_ptr, pe_cache_ptr, slot_ptr,
    num_tokens, num_slots, page_size,
    stride_kv_c_t, stride_k_pe_t, stride_slot,
    stride_kv_cache_blk, stride_kv_cache_off, stride_pe_cache_blk, stride_pe_cache_off,
    kv_scale_ptr, stride_ks_blk, stride_ks_off,
    D_LATENT: tl.constexpr, D_ROPE: tl.constexpr, BLOCK_T: tl.constexpr, KV_FP8: tl.constexpr,
):
    pid_t = tl.program_id(0).to(tl.int64)
    tok = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T] int64
    in_range = tok < num_tokens
    slot = tl.load(slot_ptr + tok * stride_slot, mask=in_range, other=-1).to(tl.int64)
    valid = in_range & (slot >= 0) & (slot < num_slots)  # [BLOCK_T]
    slot = tl.where(valid, slot, 0)
    blk = slot // page_size
    off = slot % page_size

    offs_r = tl.arange(0, D_LATENT)
    kv = tl.load(kv_c_ptr + tok[:, None] * stride_kv_c_t + offs_r[None, :], mask=valid[:, None])  # [BLOCK_T, D_LATENT]
    kv_dst = kv_cache_ptr + blk[:, None] * stride_kv_cache_blk + off[:, None] * stride_kv_cache_off + offs_r[None, :]
    if KV_FP8:  # e4m3 values [BLOCK_T, D_LATENT] and one fp32 scale per 128 of them [BLOCK_T, D_LATENT // 128]
        kv, scale = _quantize_fp8(to_float32(kv), BLOCK_T, D_LATENT)  # e4m3 bits, as uint8
        if kv_cache_ptr.dtype.element_ty != tl.uint8:  # an e4m3 cache (not its bits: _utils.fp8_bits)
            kv = kv.to(kv_cache_ptr.dtype.element_ty, bitcast=True)
        offs_g = tl.arange(0, D_LATENT // 128)
        tl.store(kv_scale_ptr + blk[:, None] * stride_ks_blk + off[:, None] * stride_ks_off + offs_g[None, :], scale,
                 mask=valid[:, None])
    tl.store(kv_dst, kv, mask=valid[:, None])

    if D_ROPE > 0:  # (D_ROPE 0: MLA without a rotary part, no rope key)
        offs_p = tl.arange(0, D_ROPE)
        pe = tl.load(k_pe_ptr + tok[:, None] * stride_k_pe_t + offs_p[None, :], mask=valid[:, None])  # [BLOCK_T, P]
        pe_dst = pe_cache_ptr + blk[:, None] * stride_pe_cache_blk + off[:, None] * stride_pe_cache_off + offs_p[None, :]
        tl.store(pe_dst, pe, mask=valid[:, None])


def _block_t(num_tokens: int, d_latent: int) -> int:
    """Tokens per program, a power of two: a latent tile of at most 4K elements, at most 16 tokens,
    no more than the next power of two above ``num_tokens``."""
    return min(16, 4096 // d_latent, _utils.next_pow2(num_tokens))


def _write_cache_config(num_tokens: int, d_latent: int, fp8: bool, device: torch.device, elem_bytes: int = 2) -> dict:
    """This GPU's tuned config for the shape class (``_tuning.write_cache_class``; a ``_tuning.Tuned``), else the
    heuristic: ``_block_t`` tokens per program, 4 warps."""
    tuned = _tuning.lookup("write_cache", _tuning.write_cache_class(num_tokens, d_latent, fp8, elem_bytes), device)
    return tuned if tuned is not None else _write_cache_heuristic(num_tokens, d_latent)


def _write_cache_heuristic(num_tokens: int, d_latent: int) -> dict:
    return dict(BLOCK_T=_block_t(num_tokens, d_latent), num_warps=4)


def _launch_write_cache(kv_c, k_pe, kv_cache, pe_cache, slot_mapping, kv_scale=None, config=None):
    num_tokens = kv_c.shape[0]
    num_blocks, page_size, d_latent = kv_cache.shape
    d_rope = pe_cache.shape[2]
    cfg = config or _write_cache_config(num_tokens, d_latent, kv_scale is not None, kv_cache.device,
                                        kv_c.element_size())
    block_t = cfg["BLOCK_T"]
    grid = (_utils.cdiv(num_tokens, block_t),)
    if d_rope == 0:  # no rope key (D_ROPE 0) is read or written; a tensor of no elements may hold a null pointer
        k_pe, pe_cache = kv_c, kv_c  # (kv_c in both places: an fp8 cache is no pointer type before sm_89)
    try:  # (free when nothing is raised: a stored config's compile failure is handled after the fact)
        _launcher.launch(_write_cache_kernel, grid,
            kv_c, k_pe, _utils.fp8_bits(kv_cache), pe_cache, slot_mapping,
            num_tokens, num_blocks * page_size, page_size,
            kv_c.stride(0), k_pe.stride(0), slot_mapping.stride(0),
            kv_cache.stride(0), kv_cache.stride(1), pe_cache.stride(0), pe_cache.stride(1),
            kv_scale if kv_scale is not None else kv_cache,
            *(kv_scale.stride()[:2] if kv_scale is not None else (0, 0)),
            D_LATENT=d_latent, D_ROPE=d_rope, BLOCK_T=block_t, KV_FP8=kv_scale is not None,
            num_warps=cfg["num_warps"],
        )
    except Exception as exc:
        if not _tuning.drop_on_compile_error(cfg, exc):
            raise
        # the stored config failed to compile (nothing was written): dropped, the heuristic instead
        _launch_write_cache(kv_c, k_pe, kv_cache, pe_cache, slot_mapping, kv_scale,
                            config=_write_cache_heuristic(num_tokens, d_latent))


@torch.inference_mode()
def _write_cache_torch(kv_c, k_pe, kv_cache, pe_cache, slot_mapping, kv_scale=None):
    # inference_mode (no grad recorded, as no_grad): a kv_c that requires grad (a projection's output outside no_grad)
    # made the first in-place store raise halfway, after the latent and before the rope key, and left the cache with
    # autograd history. And not no_grad: a cache made under inference_mode (fp8_latent_cache's views, a buffer a
    # server allocated there) is an inference tensor, which refuses in-place stores outside the mode: the stores
    # raised torch's RuntimeError, after the latent for views made outside it, where the kernel writes it whole.
    # Inside the mode both inference and normal caches take them.
    slots = slot_mapping.long()
    keep = slots >= 0
    slots = slots[keep]
    page_size = kv_cache.shape[1]
    blk, off = slots // page_size, slots % page_size
    if kv_scale is not None:
        kv, scale = quantize_fp8_torch(kv_c[keep])
        kv_scale[blk, off] = scale
        _utils.put(kv_cache, (blk, off), kv)
    else:
        kv_cache[blk, off] = kv_c[keep]
    pe_cache[blk, off] = k_pe[keep]


def quantize_fp8_torch(x):
    """``x [..., R]`` -> (``[..., R]`` e4m3, ``[..., R/128]`` fp32 scales): the write kernel's quantization in
    PyTorch (``reference.quantize_fp8`` is the readable twin the tests hold both to)."""
    groups = x.float().unflatten(-1, (-1, _utils.FP8_GROUP))
    scale = groups.abs().amax(-1) / _utils.FP8_MAX
    q = (groups / torch.where(scale > 0, scale, 1.0)[..., None]).clamp(-_utils.FP8_MAX, _utils.FP8_MAX)
    return q.to(torch.float8_e4m3fn).flatten(-2), scale


def dequantize_fp8_torch(q, scale, dtype=torch.float32):
    """e4m3 ``q [..., R]`` and fp32 ``scale [..., R/128]`` -> ``[..., R]`` in ``dtype`` (product in fp32)."""
    return (q.float().unflatten(-1, (-1, _utils.FP8_GROUP)) * scale[..., None]).flatten(-2).to(dtype)


def _check_write_cache_args(kv_c, k_pe, kv_cache, pe_cache, slot_mapping, kv_scale=None, own_views=False) -> None:
    _utils.check_tensor("kv_cache", kv_cache, 3, FLOAT_DTYPES + _utils.FP8_DTYPES)
    _utils.check_tensor("pe_cache", pe_cache, 3, FLOAT_DTYPES)
    _utils.check_tensor("kv_c", kv_c, 2, FLOAT_DTYPES)
    _utils.check_tensor("k_pe", k_pe, 2, FLOAT_DTYPES)
    _utils.check_tensor("slot_mapping", slot_mapping, 1, INDEX_DTYPES)
    _utils.check_kv_scale(kv_cache, kv_scale)
    source, dtype = _utils.cache_compute_dtype(kv_cache, pe_cache)  # an fp8 latent is written from pe_cache's dtype
    for name, t in (("pe_cache", pe_cache), ("kv_c", kv_c), ("k_pe", k_pe)):
        if t.dtype != dtype:
            raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')} but {source} has "
                            f"{str(dtype).replace('torch.', '')}; they must match (no conversion on write)")
    _utils.check_devices(kv_cache=kv_cache, pe_cache=pe_cache, kv_c=kv_c, k_pe=k_pe, slot_mapping=slot_mapping,
                         kv_scale=kv_scale)
    _utils.check_same("kv_cache", tuple(kv_cache.shape[:2]), "pe_cache", tuple(pe_cache.shape[:2]),
                      "[num_blocks, block_size]")
    if kv_cache.shape[0] == 0 or kv_cache.shape[1] == 0:
        raise ValueError(f"kv_cache must hold at least one block of at least one token, got shape {tuple(kv_cache.shape)}")
    _utils.check_width("kv_cache", kv_cache.shape[2])
    _utils.check_rope_width("pe_cache", pe_cache.shape[2])
    _utils.check_same("kv_c", kv_c.shape[1], "kv_cache", kv_cache.shape[2], "the latent width R")
    _utils.check_same("k_pe", k_pe.shape[1], "pe_cache", pe_cache.shape[2], "the rope width P")
    _utils.check_same("kv_c", kv_c.shape[0], "k_pe", k_pe.shape[0], "the number of tokens T")
    _utils.check_same("kv_c", kv_c.shape[0], "slot_mapping", slot_mapping.shape[0], "the number of tokens T")
    for name, t in (("kv_cache", kv_cache), ("pe_cache", pe_cache), ("kv_c", kv_c), ("k_pe", k_pe)):
        _utils.check_last_contiguous(name, t)
    for name, t in (("kv_cache", kv_cache), ("pe_cache", pe_cache), ("kv_scale", kv_scale)):
        if t is not None:  # written: a stride-0 (expanded) cache aliased every slot of a block, or every block
            _utils.check_no_overlap(name, t)
    if not own_views:  # (a PagedLatentCache's views are side by side by construction)
        _utils.check_disjoint(kv_cache=kv_cache, pe_cache=pe_cache, kv_scale=kv_scale)


_FLOATS, _INDEX = frozenset(FLOAT_DTYPES), frozenset(INDEX_DTYPES)
_WIDTHS, _ROPE_WIDTHS = _utils.WIDTHS, _utils.ROPE_WIDTHS  # check_width's, check_rope_width's
_rows_apart = _utils.rows_apart


def _write_cache_args_ok(kv_c, k_pe, kv_cache, pe_cache, slot_mapping) -> bool:
    """True when the arguments certainly pass ``_check_write_cache_args``, in one expression; False sends them
    through the named checks (which raise only for bad input). Never True for input those checks reject."""
    tensor = torch.Tensor
    if not (type(kv_c) is tensor and type(k_pe) is tensor and type(kv_cache) is tensor and type(pe_cache) is tensor
            and type(slot_mapping) is tensor):
        return False
    cs, ps, ts, es = kv_cache.shape, pe_cache.shape, kv_c.shape, k_pe.shape
    dtype, device = kv_cache.dtype, kv_cache.device
    return (len(cs) == 3 and len(ps) == 3 and len(ts) == 2 and len(es) == 2 and slot_mapping.dim() == 1
            and dtype in _FLOATS and pe_cache.dtype is dtype and kv_c.dtype is dtype and k_pe.dtype is dtype
            and slot_mapping.dtype in _INDEX
            and cs[:2] == ps[:2] and cs[0] > 0 and cs[1] > 0 and cs[2] in _WIDTHS and ps[2] in _ROPE_WIDTHS
            and ts[1] == cs[2] and es[1] == ps[2] and ts[0] == es[0] == slot_mapping.shape[0]
            and kv_cache.stride(2) == 1 and pe_cache.stride(2) == 1 and kv_c.stride(1) == 1 and k_pe.stride(1) == 1
            and _rows_apart(kv_cache) and _rows_apart(pe_cache)  # no two slots share memory (expand(), as_strided)
            and pe_cache.device == device and kv_c.device == device and k_pe.device == device
            and slot_mapping.device == device)


def write_cache(kv_c: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor, pe_cache: torch.Tensor,
                slot_mapping: torch.Tensor, *, kv_scale: torch.Tensor | None = None) -> None:
    """Write new tokens' latent and roped key into the paged cache, in place.

    Args:
        kv_c: ``[T, R]`` normalized latent of the new tokens (bf16, fp16 or fp32, the cache's dtype).
        k_pe: ``[T, P]`` roped key of the new tokens, same dtype.
        kv_cache: ``[num_blocks, block_size, R]`` latent cache.
        pe_cache: ``[num_blocks, block_size, P]`` rope-key cache.
        slot_mapping: ``[T]`` int64 or int32; token ``t`` goes to block ``slot // block_size``,
            row ``slot % block_size``. Negative slots (padding) are skipped.

    Every tensor needs only its last dimension contiguous: ``kv_cache``/``pe_cache`` may be the
    two views ``buf[..., :R]``, ``buf[..., R:]`` of one ``[num_blocks, block_size, R + P]``
    buffer, and ``kv_c``/``k_pe`` slices of a ``kv_a_proj`` output ``[T, R + P]``. Nothing is
    copied; cache bytes outside the written slots are left as they were. R and P are powers of
    two from 16 to 1024, or P is 0 (MLA without a rotary part: ``k_pe [T, 0]``, ``pe_cache [N, page, 0]``, nothing
    read or written for them). Two tokens with the same slot leave that row unspecified: on a GPU
    it may mix values of both (and, in an fp8 cache, one token's values with the other's scales).

    Slots at or past ``num_blocks * block_size``: on the CPU this raises ``ValueError`` before
    anything is written. On the GPU, checking would cost a host synchronisation, so the kernel
    skips such tokens instead, like padding.

    FP8 cache (``kv_cache`` float8_e4m3fn, see ``fp8_latent_cache``): pass ``kv_scale [num_blocks, block_size,
    R/128]`` float32. The same kernel quantizes each token's latent per group of 128 values,
    ``scale = amax / 448``, values rounded to the nearest e4m3 (ties to even), as ``reference.quantize_fp8``;
    ``kv_c``/``k_pe`` then have ``pe_cache``'s dtype (the rope key is stored unquantized). R must be a
    multiple of 128.

    Raises ``TypeError``/``ValueError`` naming the offending argument, before writing anything (caches that share
    memory included: ``kv_cache``, ``pe_cache`` and ``kv_scale`` may be views of one buffer, side by side, never
    overlapping). ``T == 0`` is a no-op.
    """
    _write(kv_c, k_pe, kv_cache, pe_cache, slot_mapping, kv_scale)


def _write(kv_c, k_pe, kv_cache, pe_cache, slot_mapping, kv_scale=None, own_views=False) -> None:
    """``write_cache``; ``own_views``: the caches are a ``PagedLatentCache``'s ``views``, side by side by
    construction (their memory is not checked for overlap again, at every layer and step)."""
    if kv_scale is not None or not _write_cache_args_ok(kv_c, k_pe, kv_cache, pe_cache, slot_mapping):
        _check_write_cache_args(kv_c, k_pe, kv_cache, pe_cache, slot_mapping, kv_scale, own_views)
    elif not (own_views or torch.compiler.is_compiling()) and _utils.views_overlap(kv_cache, pe_cache):
        _utils.check_disjoint(kv_cache=kv_cache, pe_cache=pe_cache)  # (raises, naming them)
    if kv_c.shape[0] == 0:
        return
    if torch.compiler.is_compiling():  # one graph node that mutates the caches
        if kv_scale is None:
            torch.ops.mla_kernels.write_cache(kv_c, k_pe, kv_cache, pe_cache, slot_mapping)
        else:
            torch.ops.mla_kernels.write_cache_fp8(kv_c, k_pe, kv_cache, pe_cache, slot_mapping, kv_scale)
    else:  # eager: no custom-op dispatch in front of a small kernel
        _write_cache_run(kv_c, k_pe, kv_cache, pe_cache, slot_mapping, kv_scale)


def _write_cache_run(kv_c, k_pe, kv_cache, pe_cache, slot_mapping, kv_scale=None) -> None:
    """``write_cache`` after its shape checks (the body of the ``mla_kernels::write_cache`` custom op)."""
    if kv_c.shape[0] == 0:
        return
    _utils.check_has_data("kv_c", kv_c)
    if slot_mapping.device.type == "cpu":
        num_slots = kv_cache.shape[0] * kv_cache.shape[1]
        top = int(slot_mapping.max())
        if top >= num_slots:
            raise ValueError(f"slot_mapping holds slot {top}, past the cache's {num_slots} slots "
                             f"({kv_cache.shape[0]} blocks of {kv_cache.shape[1]})")
    if _utils.use_triton(kv_cache):
        with _utils.launch_device(kv_cache.device):
            _launch_write_cache(kv_c, k_pe, kv_cache, pe_cache, slot_mapping, kv_scale)
    else:
        _write_cache_torch(kv_c, k_pe, kv_cache, pe_cache, slot_mapping, kv_scale)


# ---------------------------------------------------------------------------------------------
# the FP8 layout: one contiguous row of bytes per token
# ---------------------------------------------------------------------------------------------


def fp8_row_bytes(kv_lora_rank: int = 512, rope_dim: int = 64, rope_dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes one token takes in the FP8 layout: R e4m3 values, R/128 fp32 scales, P rope values in ``rope_dtype``
    (656 at DeepSeek's R 512, P 64 with a bf16 rope key, against 1152 for a bf16 cache). Widths and dtype are
    checked as ``fp8_latent_cache`` checks them."""
    _check_fp8_widths(kv_lora_rank, rope_dim, rope_dtype)
    return _row_bytes(kv_lora_rank, rope_dim, rope_dtype)


def _row_bytes(kv_lora_rank: int, rope_dim: int, rope_dtype: torch.dtype) -> int:
    return kv_lora_rank + 4 * (kv_lora_rank // _utils.FP8_GROUP) + rope_dim * rope_dtype.itemsize


def _check_fp8_widths(kv_lora_rank: int, rope_dim: int, rope_dtype) -> None:
    _utils.check_width("kv_lora_rank", kv_lora_rank)
    _utils.check_rope_width("rope_dim", rope_dim)
    if kv_lora_rank % _utils.FP8_GROUP:
        raise ValueError(f"kv_lora_rank must be a multiple of {_utils.FP8_GROUP} for an fp8 cache (one scale per "
                         f"{_utils.FP8_GROUP} values), got {kv_lora_rank}")
    if rope_dtype not in FLOAT_DTYPES:
        raise TypeError(f"rope_dtype must be bfloat16, float16 or float32, got {rope_dtype}")


def _fp8_views(buf: torch.Tensor, kv_lora_rank: int, rope_dtype: torch.dtype):
    """Views of a uint8 ``[num_blocks, block_size, fp8_row_bytes]`` buffer: ``(kv_cache [N, page, R] e4m3,
    kv_scale [N, page, R/128] fp32, pe_cache [N, page, P] rope_dtype)``, P the rest of the row. Byte offsets R and
    R + 4 R/128 and the row length are multiples of 4 (R is a multiple of 128, P 0 or a power of two >= 16), as
    ``Tensor.view(dtype)`` needs."""
    groups = kv_lora_rank // _utils.FP8_GROUP
    kv = buf[..., :kv_lora_rank].view(torch.float8_e4m3fn)
    scale = buf[..., kv_lora_rank:kv_lora_rank + 4 * groups].view(torch.float32)
    pe = buf[..., kv_lora_rank + 4 * groups:].view(rope_dtype)
    return kv, scale, pe


def fp8_latent_cache(num_blocks: int, block_size: int, kv_lora_rank: int = 512, rope_dim: int = 64,
                     rope_dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"):
    """Allocate one FP8 latent cache (DeepSeek's FP8 MLA layout; zero-filled) and return its three views
    ``(kv_cache [N, page, R] float8_e4m3fn, kv_scale [N, page, R/128] float32, pe_cache [N, page, P] rope_dtype)``.

    Per token, one contiguous row of ``fp8_row_bytes(R, P, rope_dtype)`` bytes: the R e4m3 values, then R/128 fp32
    scales (one per 128 values), then the P rope values, so one page stays one contiguous piece of memory. The
    views share one uint8 ``[N, page, row bytes]`` buffer; pass them to ``write_cache`` / ``mla_decode`` /
    ``mla_prefill`` (``kv_scale=``). R must be a multiple of 128.
    """
    num_blocks, block_size, kv_lora_rank = _check_sizes(
        num_blocks=num_blocks, block_size=block_size, kv_lora_rank=kv_lora_rank)
    rope_dim = _utils.check_size("rope_dim", rope_dim, 0)  # (0: no rotary part)
    _check_fp8_widths(kv_lora_rank, rope_dim, rope_dtype)
    row = _row_bytes(kv_lora_rank, rope_dim, rope_dtype)
    _check_bytes(1, num_blocks, block_size, row)
    buf = torch.zeros(num_blocks, block_size, row, dtype=torch.uint8,
                      device=_utils.check_alloc_device("device", device))
    return _fp8_views(buf, kv_lora_rank, rope_dtype)


# ---------------------------------------------------------------------------------------------
# the paged cache manager
# ---------------------------------------------------------------------------------------------


def _check_sizes(**sizes) -> tuple[int, ...]:
    """The sizes as Python ints (``_utils.check_size``), in the order given."""
    return tuple(_utils.check_size(name, value) for name, value in sizes.items())


_MAX_BYTES = 2**63 - 1  # what one allocation's byte count (an int64) can say


def _check_bytes(num_layers: int, num_blocks: int, block_size: int, row_bytes: int) -> None:
    """Refuse sizes whose buffers' byte counts overflow int64 (torch then failed with a TypeError or RuntimeError
    naming none of them; sizes below that but past the memory fail in torch's allocator, as any allocation does)."""
    if num_blocks * block_size * row_bytes > _MAX_BYTES:
        raise ValueError(f"num_blocks * block_size = {num_blocks} * {block_size} tokens of {row_bytes} bytes is past "
                         f"any allocation's size (2^63 bytes)")
    if num_layers * num_blocks * block_size * row_bytes > _MAX_BYTES:
        raise ValueError(f"num_layers = {num_layers} buffers of {num_blocks * block_size * row_bytes} bytes are past "
                         f"any memory's size (2^63 bytes)")


class CacheFullError(RuntimeError):
    """Not enough free blocks for a reservation. Raised before any state changes."""


class _Sequence:
    __slots__ = ("blocks", "length")

    def __init__(self, blocks: list[int] | None = None, length: int = 0) -> None:
        self.blocks: list[int] = [] if blocks is None else blocks
        self.length = length

    def copy(self) -> "_Sequence":
        return _Sequence(list(self.blocks), self.length)


class PagedLatentCache:
    """A paged MLA cache for every layer, with a block allocator for many sequences.

    Per layer one ``[num_blocks, block_size, R + P]`` buffer; ``kv_cache(layer)`` and
    ``pe_cache(layer)`` are its ``[num_blocks, block_size, R]`` and ``[num_blocks, block_size, P]``
    views, the layout ``write_cache`` and the attention kernels take. All layers share one
    allocation: a sequence owns the same block ids in every layer.

    A step of a model reserves first and writes after, once per layer::

        slots = cache.append_batch(seq_ids, num_new_tokens)  # [T] int64, one reservation
        for layer in range(num_layers):
            cache.write(layer, slots, kv_c, k_pe)             # kv_c [T, R], k_pe [T, P]
        block_table = cache.block_table(seq_ids)               # [B, max_blocks] int32
        cache_seqlens = cache.cache_seqlens(seq_ids)           # [B] int32

    A sequence keeps its blocks, and so its cached prefix, until ``free``: a conversation appends
    each new turn to the tokens already cached. When the free blocks can't hold a reservation,
    ``CacheFullError`` is raised and nothing changes (a batch is reserved whole or not at all).
    Freed blocks are not cleared; they are handed out again, most recently freed first.

    ``fork(seq_id)`` starts a sequence holding the same tokens (beam search, parallel sampling, a shared prompt):
    its full blocks are shared, counted by how many sequences hold each, and only a partly filled last block is
    copied; a block returns to the free pool when the last sequence holding it is freed. Appends write only
    positions past a sequence's length, so a shared (full) block is never written again.

    Sequence ids are any hashable values; ``add_sequence()`` without an id picks an unused int.

    ``dtype=torch.float8_e4m3fn`` keeps DeepSeek's FP8 layout instead (``fp8_latent_cache``): per token R e4m3
    values, R/128 fp32 scales and the rope key in ``rope_dtype`` (default bf16; the model's dtype), 656 bytes at
    DeepSeek's widths against 1152 in bf16. ``kv_scale(layer)`` gives the scales the kernels take; ``write``
    quantizes. Queries and written tokens then have ``rope_dtype``.

    The allocator's bookkeeping (sequences, lengths, free blocks, counts) lives on the host and takes no lock: calls
    that change it (``add_sequence``, ``append``/``append_batch``, ``fork``, ``truncate``, ``free``) from several
    threads at once must be serialised by the caller, as a serving engine's one scheduler thread does.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_lora_rank: int = 512,
                 rope_dim: int = 64, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu", *,
                 rope_dtype: torch.dtype | None = None):
        num_layers, num_blocks, block_size, kv_lora_rank = _check_sizes(
            num_layers=num_layers, num_blocks=num_blocks, block_size=block_size, kv_lora_rank=kv_lora_rank)
        rope_dim = _utils.check_size("rope_dim", rope_dim, 0)  # (0: no rotary part)
        _utils.check_width("kv_lora_rank", kv_lora_rank)
        _utils.check_rope_width("rope_dim", rope_dim)
        if dtype not in FLOAT_DTYPES + _utils.FP8_DTYPES:
            raise TypeError(f"dtype must be bfloat16, float16, float32 or float8_e4m3fn, got {dtype}")
        fp8 = dtype in _utils.FP8_DTYPES
        if fp8:
            rope_dtype = torch.bfloat16 if rope_dtype is None else rope_dtype
            _check_fp8_widths(kv_lora_rank, rope_dim, rope_dtype)
        elif rope_dtype is not None and rope_dtype != dtype:
            raise ValueError(f"rope_dtype {rope_dtype} differs from dtype {dtype}: only an fp8 cache keeps the rope key "
                             f"in another dtype")
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.kv_lora_rank = kv_lora_rank
        self.rope_dim = rope_dim
        self.dtype = dtype
        self.rope_dtype = rope_dtype if fp8 else dtype
        row_bytes = (_row_bytes(kv_lora_rank, rope_dim, rope_dtype) if fp8  # (widths checked above)
                     else (kv_lora_rank + rope_dim) * dtype.itemsize)
        _check_bytes(num_layers, num_blocks, block_size, row_bytes)
        self.device = _utils.check_alloc_device("device", device)
        # normal tensors even when made under torch.inference_mode: a cache outlives the mode it was made in, and
        # an inference tensor refuses in-place writes outside it (a conversation begun under inference_mode and
        # continued under no_grad failed in its first write, after the step was reserved)
        with torch.inference_mode(False):
            self._buffers = [torch.zeros(num_blocks, block_size, row_bytes if fp8 else kv_lora_rank + rope_dim,
                                         dtype=torch.uint8 if fp8 else dtype, device=self.device)
                             for _ in range(num_layers)]
            self._make_views()
        if self._buffers:  # the device with its index ("cuda" -> "cuda:0"), so it compares equal to its tensors'
            self.device = self._buffers[0].device
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack: pop() hands out block 0 first
        self._refs: list[int] = [0] * num_blocks  # sequences holding each block (0: free; above 1: shared by fork)
        self._seqs: dict[Hashable, _Sequence] = {}
        self._next_id = 0
        self._version = 0  # bumped when a sequence grows, forks or is freed: LatentBatch.check_current's O(1) test

    def _make_views(self) -> None:
        """Each layer's ``(kv_cache, pe_cache, kv_scale)`` views of its buffer, as ``views`` hands them out. (Under
        ``torch.inference_mode(False)``: a view made in inference mode can't be written outside it.)"""
        if self.dtype in _utils.FP8_DTYPES:
            views = [_fp8_views(buf, self.kv_lora_rank, self.rope_dtype) for buf in self._buffers]
            self._kv_views, self._scale_views, self._pe_views = (list(v) for v in zip(*views)) if views else ([],) * 3
        else:
            self._kv_views = [buf[..., :self.kv_lora_rank] for buf in self._buffers]
            self._pe_views = [buf[..., self.kv_lora_rank:] for buf in self._buffers]
            self._scale_views = [None] * len(self._buffers)

    # pickle, torch.save, copy: the buffers only, their views made again on load. Pickled beside their buffers, the
    # views came back (plain pickle) as copies of their own: writes and reads went to the copies and forks and
    # truncates copied tails in the buffers, so a fork's last block read as it was before the pickle (zeros), and
    # growth lost what was written since; an fp8 cache (views of other dtypes than its uint8 buffer) failed to load
    # from pickle and to save with torch.save.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for name in ("_kv_views", "_pe_views", "_scale_views"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        with torch.inference_mode(False):
            self._make_views()

    # -- buffers -------------------------------------------------------------------------------

    def buffer(self, layer: int) -> torch.Tensor:
        """The layer's whole ``[num_blocks, block_size, R + P]`` buffer (fp8 cache: uint8
        ``[num_blocks, block_size, fp8_row_bytes]``, see ``fp8_latent_cache``)."""
        return self._buffers[self._layer(layer)]

    def kv_scale(self, layer: int) -> torch.Tensor | None:
        """fp8 cache: the layer's latent scales ``[num_blocks, block_size, R/128]`` float32, a view of
        ``buffer(layer)``; None for a bf16/fp16/fp32 cache. Pass it on as the kernels' ``kv_scale``."""
        return self.views(layer)[2]

    def kv_cache(self, layer: int) -> torch.Tensor:
        """The layer's latent cache, ``[num_blocks, block_size, R]``, a view of ``buffer(layer)``."""
        return self.views(layer)[0]

    def pe_cache(self, layer: int) -> torch.Tensor:
        """The layer's rope-key cache, ``[num_blocks, block_size, P]``, a view of ``buffer(layer)``."""
        return self.views(layer)[1]

    def views(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(kv_cache, pe_cache, kv_scale)`` of a layer, views of ``buffer(layer)`` (``kv_scale`` None but for fp8).

        While torch.compile traces, an fp8 cache's views are made again from the uint8 buffer, inside the graph:
        AOTAutograd (the inductor and aot_eager backends) refuses a graph input that is a view of another dtype than
        its base when the graph writes it ("input mutations on views with different dtypes"), and the fp8 write
        does. Views made in the graph from the buffer, an input of its own dtype, it takes."""
        layer = self._layer(layer)
        if self._scale_views[layer] is not None and torch.compiler.is_compiling():
            kv, scale, pe = _fp8_views(self._buffers[layer], self.kv_lora_rank, self.rope_dtype)
            return kv, pe, scale
        return self._kv_views[layer], self._pe_views[layer], self._scale_views[layer]

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        """Tokens the whole cache holds: ``num_blocks * block_size``."""
        return self.num_blocks * self.block_size

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token takes, over all layers: ``num_layers * (R + P) * element size``, or for an fp8
        cache ``num_layers * (R + 4 R/128 + P * rope element size)`` (656 per layer at DeepSeek's widths)."""
        return self.num_layers * self._buffers[0].shape[-1] * self._buffers[0].element_size()

    # -- sequences -----------------------------------------------------------------------------

    def add_sequence(self, seq_id: Hashable | None = None) -> Hashable:
        """Start an empty sequence; returns its id (``seq_id`` if given, else a new int)."""
        if seq_id is None:
            seq_id = self._unused_id()
        else:
            self._check_new_id("seq_id", seq_id)
        self._seqs[seq_id] = _Sequence()
        return seq_id

    def fork(self, seq_id: Hashable, new_id: Hashable | None = None) -> Hashable:
        """Start a sequence holding the same tokens as ``seq_id``; returns its id (``new_id`` if given, else a new
        int). Both then grow on their own.

        The full blocks are shared, not copied: each block counts the sequences that hold it, and ``free`` returns it
        to the pool only when none does. A partly filled last block is copied (in every layer, on the cache's
        device, without a host synchronisation) into a free block, since both sequences will append into it; so a
        fork takes one block, or none when the length is a multiple of ``block_size``. ``CacheFullError`` if no
        block is free for that copy, ``KeyError`` if ``seq_id`` is not live, ``ValueError`` if ``new_id`` is, and
        nothing changes then. The copy takes what the buffers hold now: fork after a step's tokens are written (a
        ``LatentBatch`` reserved for ``seq_id`` before the fork is refused as out of date, and one built afterwards
        over positions in a shared block is refused too)."""
        return self._fork_batch([seq_id], [new_id], names=("seq_id", "new_id"))[0]

    def free(self, seq_id: Hashable) -> None:
        """End a sequence and return its blocks to the free pool (their contents stay until reused); a block shared
        with a fork goes back only when the last sequence holding it is freed."""
        seq = self._get(seq_id)
        self._free.extend(reversed(self._release(seq.blocks)))
        del self._seqs[seq_id]
        self._version += 1

    def truncate(self, seq_id: Hashable, length: int) -> None:
        """Keep the sequence's first ``length`` tokens and drop the rest (speculative decoding's rejected tokens):
        blocks past them return to the pool (a block a fork shares, when its last holder lets go). If the new last
        block is partly filled and shared with a fork, it is copied first (in every layer, on the device), since
        the sequence will append into it. ``ValueError`` unless ``0 <= length <= seqlen``; ``CacheFullError`` if
        that copy finds no free block; nothing changes then. A ``LatentBatch`` reserved before is out of date."""
        seq = self._get(seq_id)
        length = _utils.as_int("length", length)
        if not 0 <= length <= seq.length:
            raise ValueError(f"length must be in [0, {seq.length}] (the tokens sequence {seq_id!r} holds), got {length}")
        if length == seq.length:
            return
        if self._truncate_blocks_needed([seq_id], [length]) > len(self._free):
            raise CacheFullError(f"not enough free cache blocks: truncating sequence {seq_id!r} copies its partly "
                                 f"filled last block, which a fork shares, but none of {self.num_blocks} is free")
        size, refs = self.block_size, self._refs
        keep = _utils.cdiv(length, size)
        tail = seq.blocks[keep - 1] if length % size else None
        copy_tail = tail is not None and refs[tail] > 1
        self._free.extend(reversed(self._release(seq.blocks[keep:])))
        blocks = seq.blocks[:keep]
        if copy_tail:
            block = self._free.pop()
            refs[block] = 1
            self._copy_tails([(tail, block, length % size)])
            refs[tail] -= 1  # still held by the fork(s)
            blocks[-1] = block
        self._seqs[seq_id] = _Sequence(blocks, length)  # a new record: batches reserved before are out of date
        self._version += 1

    def _truncate_blocks_needed(self, seq_ids: Sequence[Hashable], lengths: Sequence[int]) -> int:
        """Free blocks that ``truncate(seq_ids[i], lengths[i])`` in this order needs beyond those its own frees return
        (<= 0: it fits whatever the pool holds): a shared partly filled tail is copied unless the earlier
        truncations have left the sequence its last holder."""
        refs, size = {}, self.block_size
        short = free = 0
        for seq_id, length in zip(seq_ids, lengths):
            seq = self._get(seq_id)
            keep = _utils.cdiv(length, size)
            for block in seq.blocks[keep:]:
                refs[block] = refs.get(block, self._refs[block]) - 1
                free += refs[block] == 0
            if length % size and length < seq.length:
                tail = seq.blocks[keep - 1]
                if refs.get(tail, self._refs[tail]) > 1:
                    refs[tail] = refs.get(tail, self._refs[tail]) - 1
                    if free:
                        free -= 1
                    else:
                        short += 1
        return short

    def seqlen(self, seq_id: Hashable) -> int:
        """Tokens reserved for the sequence so far."""
        return self._get(seq_id).length

    def seq_blocks(self, seq_id: Hashable) -> list[int]:
        """The sequence's block ids, in position order (a copy)."""
        return list(self._get(seq_id).blocks)

    @property
    def seq_ids(self) -> list:
        """Live sequences, oldest first."""
        return list(self._seqs)

    def __contains__(self, seq_id) -> bool:
        return seq_id in self._seqs

    def __len__(self) -> int:
        return len(self._seqs)

    # -- reserving slots -----------------------------------------------------------------------

    def blocks_needed(self, seq_ids: Sequence[Hashable], num_tokens: Sequence[int]) -> int:
        """New blocks that ``append_batch(seq_ids, num_tokens)`` would take."""
        seqs, counts = self._check_batch(seq_ids, num_tokens)
        return sum(self._new_blocks(s, n) for s, n in zip(seqs, counts))

    def append(self, seq_id: Hashable, num_tokens: int) -> torch.Tensor:
        """Reserve ``num_tokens`` more positions for one sequence; returns their slots, ``[num_tokens]`` int64."""
        return self.append_batch([seq_id], [num_tokens])

    def append_batch(self, seq_ids: Sequence[Hashable], num_tokens: Sequence[int]) -> torch.Tensor:
        """Reserve ``num_tokens[i]`` more positions for each ``seq_ids[i]``, all or none.

        Returns the slot mapping ``[sum(num_tokens)]`` int64 on the cache's device: the new tokens of
        ``seq_ids[0]`` in position order, then those of ``seq_ids[1]``, and so on, ready for
        ``write_cache``/``write``. Raises ``CacheFullError`` (changing nothing) if the free blocks
        can't hold the whole batch.
        """
        return self._upload(self._reserve_host(seq_ids, num_tokens))

    def _upload(self, host: torch.Tensor) -> torch.Tensor:
        """A host tensor of ints on the cache's device without waiting for the GPU: pinned, then copied
        asynchronously (a plain ``.to(device)`` from pageable memory waits for every kernel queued before it; the
        README's decode loop would wait three times a step). ``_utils.to_device``: as is on the CPU, written by
        device operations while a CUDA graph is being captured."""
        return _utils.to_device(host.pin_memory() if _utils.pin_host(self.device) else host, self.device)

    def _reserve_host(self, seq_ids: Sequence[Hashable], num_tokens: Sequence[int],
                      counts_name: str = "num_tokens") -> torch.Tensor:
        """``append_batch`` with the slots left on the host (a CPU int64 tensor): no device copy, so callers can
        pack them with the step's other metadata into one asynchronous upload. ``counts_name``: the caller's name
        for ``num_tokens``, in errors."""
        seqs, counts = self._check_batch(seq_ids, num_tokens, counts_name)
        needed = [self._new_blocks(s, n) for s, n in zip(seqs, counts)]
        total = sum(needed)
        if total > len(self._free):
            raise CacheFullError(
                f"not enough free cache blocks: appending {sum(counts)} tokens to {len(seqs)} sequence(s) needs {total} "
                f"new blocks of {self.block_size} tokens, but only {len(self._free)} of {self.num_blocks} are free; "
                f"free finished sequences or build a larger cache")
        few = all(n <= 8 for n in counts)  # decode steps: a few ints per sequence, cheaper in Python than in torch
        size, slots, refs = self.block_size, [], self._refs
        for seq, n, k in zip(seqs, counts, needed):
            for _ in range(k):
                block = self._free.pop()
                refs[block] = 1
                seq.blocks.append(block)
            if few:
                slots.extend(seq.blocks[p // size] * size + p % size for p in range(seq.length, seq.length + n))
            else:
                slots.append(self._slots(seq, seq.length, seq.length + n))
            seq.length += n
        self._version += 1
        if few or not slots:
            return torch.tensor(slots, dtype=torch.int64)
        return torch.cat(slots)

    def slots(self, seq_id: Hashable, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Slots of the sequence's positions ``start..end-1`` (default: all), ``[end - start]`` int64."""
        seq = self._get(seq_id)
        start = _utils.as_int("start", start)
        end = seq.length if end is None else _utils.as_int("end", end)
        if not 0 <= start <= end <= seq.length:
            raise ValueError(f"positions {start}..{end} are outside the sequence's {seq.length} tokens")
        return self._upload(self._slots(seq, start, end))

    # -- what the attention kernels read -------------------------------------------------------

    def block_table(self, seq_ids: Sequence[Hashable], max_blocks: int | None = None, pad_id: int = 0) -> torch.Tensor:
        """``[B, max_blocks]`` int32: row ``b`` lists ``seq_ids[b]``'s blocks, then ``pad_id``.

        ``max_blocks`` defaults to the longest row in the batch (at least 1). The padding is never
        read by a kernel that stops at ``cache_seqlens``; pass an out-of-range ``pad_id`` to check that.
        """
        return self._upload(self._block_table_host(seq_ids, max_blocks, pad_id))

    def _block_table_host(self, seq_ids: Sequence[Hashable], max_blocks: int | None = None,
                          pad_id: int = 0) -> torch.Tensor:
        """``block_table`` built on the host (CPU int32), not yet copied to the cache's device."""
        seqs = [self._get(s) for s in _utils.as_list("seq_ids", seq_ids)]
        longest = max((len(s.blocks) for s in seqs), default=0)
        if max_blocks is None:
            max_blocks = max(1, longest)
        else:
            max_blocks = _utils.as_int("max_blocks", max_blocks)
            if max_blocks < longest:
                raise ValueError(f"max_blocks {max_blocks} is shorter than the longest sequence's {longest} blocks")
            if max_blocks >= 2 ** 31:  # (torch's allocation failed with an overflow, or for lack of memory)
                raise ValueError(f"max_blocks must be below 2^31 (a block table's columns), got {max_blocks}")
        pad_id = _utils.as_int("pad_id", pad_id)
        if not -2 ** 31 <= pad_id < 2 ** 31:
            raise ValueError(f"pad_id must fit in int32, got {pad_id}")
        table = torch.full((len(seqs), max_blocks), pad_id, dtype=torch.int32)
        for b, seq in enumerate(seqs):
            if seq.blocks:
                table[b, :len(seq.blocks)] = torch.tensor(seq.blocks, dtype=torch.int32)
        return table

    def cache_seqlens(self, seq_ids: Sequence[Hashable]) -> torch.Tensor:
        """``[B]`` int32: tokens cached for each sequence."""
        return self._upload(torch.tensor([self._get(s).length for s in _utils.as_list("seq_ids", seq_ids)],
                                         dtype=torch.int32))

    # -- data ----------------------------------------------------------------------------------

    def write(self, layer: int, slot_mapping: torch.Tensor, kv_c: torch.Tensor, k_pe: torch.Tensor) -> None:
        """``write_cache`` into one layer: ``kv_c [T, R]``, ``k_pe [T, P]`` at ``slot_mapping [T]``
        (as returned by ``append``/``append_batch``/``slots``). The slots are taken as given, as ``write_cache``
        takes them (checked only against the cache's size): slots kept from a sequence since freed may belong to
        another now. ``MLAttention`` writes through a ``LatentBatch``, which refuses such a stale step."""
        layer = self._layer(layer)
        kv_cache, pe_cache, kv_scale = self.views(layer)
        _write(kv_c, k_pe, kv_cache, pe_cache, slot_mapping, kv_scale, own_views=True)

    def read(self, layer: int, seq_id: Hashable) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of one sequence's cached tokens in one layer: ``(kv [L, R], pe [L, P])`` (fp8 cache: the
        latent dequantized to ``rope_dtype``)."""
        layer = self._layer(layer)
        slots = self.slots(seq_id)
        blk, off = slots // self.block_size, slots % self.block_size
        kv = _utils.take(self._kv_views[layer], blk, off)
        if self._scale_views[layer] is not None:
            kv = dequantize_fp8_torch(kv, self._scale_views[layer][blk, off], self.rope_dtype)
        return kv, self._pe_views[layer][blk, off]

    # -- forking, growing ----------------------------------------------------------------------

    def _fork_batch(self, sources: Sequence[Hashable], new_ids: Sequence[Hashable | None] | None = None,
                    release: Sequence[Hashable] = (), names: tuple[str, str] = ("sources", "new_ids")) -> list:
        """``fork`` of many: free the sequences in ``release`` (none of them a source), then fork each ``sources[i]``
        (a source may repeat) into ``new_ids[i]`` (None: a new int), all or nothing: the ids are checked and the
        blocks counted (those the frees return included) before anything changes. The tails are copied with one
        index copy per layer. Returns the new ids. ``names``: the caller's names of ``sources`` and ``new_ids``."""
        src_name, new_name = names
        sources, release = _utils.as_list(src_name, sources), _utils.as_list("release", release)
        new_ids = [None] * len(sources) if new_ids is None else _utils.as_list(new_name, new_ids)
        if len(new_ids) != len(sources):
            raise ValueError(f"{src_name} and {new_name} disagree on length: {len(sources)} vs {len(new_ids)}")
        seqs = [self._get(s) for s in sources]
        given = [i for i in new_ids if i is not None]
        for new_id in given:
            self._check_new_id(new_name, new_id)
        if len(set(given)) != len(given):
            raise ValueError(f"{new_name} names a sequence more than once")
        dropped = [self._get(s) for s in release]
        if len(set(release)) != len(release) or set(release) & set(sources):
            raise ValueError("release must name distinct live sequences that are not forked")
        tails, returned = self._fork_need(seqs, dropped)
        if tails > len(self._free) + returned:
            raise CacheFullError(
                f"not enough free cache blocks: forking {len(seqs)} sequence(s) copies {tails} partly filled last "
                f"blocks of {self.block_size} tokens, but only {len(self._free) + returned} of {self.num_blocks} "
                f"are free; free finished sequences or build a larger cache")
        for seq_id in release:
            self._free.extend(reversed(self._release(self._seqs.pop(seq_id).blocks)))
        size, refs, avoid = self.block_size, self._refs, set(given)
        copies, out, renewed = [], [], set()
        for seq_id, seq, new_id in zip(sources, seqs, new_ids):
            full = seq.length // size
            blocks = seq.blocks[:full]
            for block in blocks:
                refs[block] += 1
            if seq.length % size:
                block = self._free.pop()
                refs[block] = 1
                copies.append((seq.blocks[full], block, seq.length % size))
                blocks.append(block)
            new_id = self._unused_id(avoid) if new_id is None else new_id
            self._seqs[new_id] = _Sequence(blocks, seq.length)
            out.append(new_id)
            if seq_id not in renewed:  # a new record: a LatentBatch reserved before the fork is out of date
                self._seqs[seq_id] = seq.copy()
                renewed.add(seq_id)
        self._copy_tails(copies)
        self._version += 1
        return out

    def _fork_blocks_needed(self, sources: Sequence[Hashable], release: Sequence[Hashable] = ()) -> int:
        """Blocks ``_fork_batch(sources, release=release)`` takes from the free pool beyond those the frees return
        (<= 0: it fits whatever the pool holds)."""
        tails, returned = self._fork_need([self._get(s) for s in sources], [self._get(s) for s in release])
        return tails - returned

    def _fork_need(self, seqs: list[_Sequence], dropped: list[_Sequence]) -> tuple[int, int]:
        """(tail blocks the forks of ``seqs`` copy, blocks that freeing ``dropped`` returns to the pool)."""
        tails = sum(1 for seq in seqs if seq.length % self.block_size)
        holders: dict[int, int] = {}
        for seq in dropped:
            for block in seq.blocks:
                holders[block] = holders.get(block, 0) + 1
        return tails, sum(1 for block, n in holders.items() if self._refs[block] == n)

    def _copy_tails(self, copies: list[tuple[int, int, int]]) -> None:
        """Copy ``(source block, destination block, rows)`` in every layer's buffer, on its device (block ids are
        host ints: nothing is read back). One copy: its rows by a view; several: whole blocks by one index copy per
        layer."""
        if len(copies) == 1:
            src, dst, rows = copies[0]
            for buf in self._buffers:
                buf[dst, :rows].copy_(buf[src, :rows])
        elif copies:
            index = torch.tensor([c[:2] for c in copies], dtype=torch.int64).T.contiguous()  # [2, n]: src, dst
            index = self._upload(index)
            for buf in self._buffers:
                buf.index_copy_(0, index[1], buf.index_select(0, index[0]))

    def _grown(self, num_blocks: int) -> "PagedLatentCache":
        """A new cache of ``num_blocks`` blocks (no fewer than this one's) holding this one's sequences at the same
        block ids, with the same contents and sharing (each layer's buffer copied whole into its first blocks);
        the added blocks are free, handed out after this one's free blocks. This cache is left as it was."""
        num_blocks = _utils.as_int("num_blocks", num_blocks)
        if num_blocks < self.num_blocks:
            raise ValueError(f"num_blocks {num_blocks} is fewer than the cache's {self.num_blocks}")
        new = PagedLatentCache(self.num_layers, num_blocks, self.block_size, self.kv_lora_rank, self.rope_dim,
                               dtype=self.dtype, device=self.device, rope_dtype=self.rope_dtype)
        for old_buf, new_buf in zip(self._buffers, new._buffers):
            new_buf[:self.num_blocks].copy_(old_buf)
        new._free = list(range(num_blocks - 1, self.num_blocks - 1, -1)) + self._free
        new._refs = self._refs + [0] * (num_blocks - self.num_blocks)
        new._seqs = {seq_id: seq.copy() for seq_id, seq in self._seqs.items()}
        new._next_id = self._next_id
        return new

    # -- internals -----------------------------------------------------------------------------

    def _unused_id(self, avoid=()) -> int:
        while self._next_id in self._seqs or self._next_id in avoid:
            self._next_id += 1
        self._next_id += 1
        return self._next_id - 1

    def _check_new_id(self, name: str, seq_id: Hashable) -> None:
        if isinstance(seq_id, torch.Tensor):  # (hashed by identity: the same value would name another sequence)
            raise TypeError(f"{name} must be hashable by value (an int, a string, ...), got a tensor: pass "
                            f"{name}.item()")
        try:
            live = seq_id in self._seqs
        except TypeError:
            raise TypeError(f"{name} must be hashable (a dict key), got {seq_id!r}") from None
        if live:
            raise ValueError(f"{name} {seq_id!r} is already a live sequence")

    def _release(self, blocks: list[int]) -> list[int]:
        """Drop one holder of each block; returns those no sequence holds now, in order."""
        refs, out = self._refs, []
        for block in blocks:
            refs[block] -= 1
            if not refs[block]:
                out.append(block)
        return out

    def _layer(self, layer: int) -> int:
        index = _utils.as_int("layer", layer)
        if not 0 <= index < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer!r}")
        return index

    def _get(self, seq_id: Hashable) -> _Sequence:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"seq_id {seq_id!r} is not a live sequence") from None
        except TypeError:  # (unhashable: never a live sequence's id)
            raise TypeError(f"seq_id must be hashable (a dict key), got {seq_id!r}") from None

    def _check_batch(self, seq_ids: Iterable[Hashable], num_tokens: Iterable[int], counts_name: str = "num_tokens"):
        """``(live sequences, int counts)`` of a batch: distinct hashable ids of live sequences, one non-negative
        int count each (named ``counts_name`` in errors); raises before anything changes."""
        seq_ids, counts = _utils.as_list("seq_ids", seq_ids), _utils.as_list(counts_name, num_tokens)
        if len(seq_ids) != len(counts):
            raise ValueError(f"seq_ids and {counts_name} disagree on length: {len(seq_ids)} vs {len(counts)}")
        try:
            distinct = len(set(seq_ids))
        except TypeError:  # an unhashable id (a list) can name no sequence
            raise TypeError(f"seq_ids must hold hashable sequence ids, got {seq_ids!r}") from None
        if distinct != len(seq_ids):
            raise ValueError("seq_ids has a sequence more than once; give each sequence one count")
        for i, n in enumerate(counts):
            counts[i] = _utils.as_int(counts_name, n)
            if counts[i] < 0:
                raise ValueError(f"{counts_name} must be non-negative, got {n!r}")
        return [self._get(s) for s in seq_ids], counts

    def _new_blocks(self, seq: _Sequence, n: int) -> int:
        return _utils.cdiv(seq.length + n, self.block_size) - len(seq.blocks)  # ints: no float overflow

    def _slots(self, seq: _Sequence, start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end, dtype=torch.int64)
        blocks = torch.tensor(seq.blocks, dtype=torch.int64)
        if pos.numel() == 0:
            return pos
        return blocks[pos // self.block_size] * self.block_size + pos % self.block_size
