"""Writing new tokens into the paged latent cache.

The cache holds, per layer, the normalized latent ``c_kv`` (``R = kv_lora_rank`` wide) and the
roped key ``k_pe`` (``P = qk_rope_head_dim`` wide) of every cached token, in pages of
``block_size`` tokens: ``kv_cache [num_blocks, block_size, R]`` and
``pe_cache [num_blocks, block_size, P]``, usually two views of one
``[num_blocks, block_size, R + P]`` buffer. A token's place is its *slot*,
``block_id * block_size + offset``.

``write_cache`` scatters new tokens to their slots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils
from ._utils import FLOAT_DTYPES, INDEX_DTYPES

__all__ = ["write_cache"]


# ---------------------------------------------------------------------------------------------
# write_cache: kernel, launcher, public function
# ---------------------------------------------------------------------------------------------


@triton.jit
def _write_cache_kernel(
    kv_c_ptr, k_pe_ptr, kv_cache_ptr, pe_cache_ptr, slot_ptr,
    num_tokens, num_slots, page_size,
    stride_kv_c_t, stride_k_pe_t, stride_slot,
    stride_kv_cache_blk, stride_kv_cache_off, stride_pe_cache_blk, stride_pe_cache_off,
    D_LATENT: tl.constexpr, D_ROPE: tl.constexpr, BLOCK_T: tl.constexpr,
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
    tl.store(kv_dst, kv, mask=valid[:, None])

    offs_p = tl.arange(0, D_ROPE)
    pe = tl.load(k_pe_ptr + tok[:, None] * stride_k_pe_t + offs_p[None, :], mask=valid[:, None])  # [BLOCK_T, D_ROPE]
    pe_dst = pe_cache_ptr + blk[:, None] * stride_pe_cache_blk + off[:, None] * stride_pe_cache_off + offs_p[None, :]
    tl.store(pe_dst, pe, mask=valid[:, None])


def _block_t(num_tokens: int, d_latent: int) -> int:
    """Tokens per program, a power of two: a latent tile of at most 4K elements, at most 16 tokens,
    no more than the next power of two above ``num_tokens``."""
    return min(16, 4096 // d_latent, triton.next_power_of_2(num_tokens))


def _launch_write_cache(kv_c, k_pe, kv_cache, pe_cache, slot_mapping):
    num_tokens = kv_c.shape[0]
    num_blocks, page_size, d_latent = kv_cache.shape
    d_rope = pe_cache.shape[2]
    block_t = _block_t(num_tokens, d_latent)
    grid = (triton.cdiv(num_tokens, block_t),)
    _write_cache_kernel[grid](
        kv_c, k_pe, kv_cache, pe_cache, slot_mapping,
        num_tokens, num_blocks * page_size, page_size,
        kv_c.stride(0), k_pe.stride(0), slot_mapping.stride(0),
        kv_cache.stride(0), kv_cache.stride(1), pe_cache.stride(0), pe_cache.stride(1),
        D_LATENT=d_latent, D_ROPE=d_rope, BLOCK_T=block_t,
        num_warps=4,
    )


def _write_cache_torch(kv_c, k_pe, kv_cache, pe_cache, slot_mapping):
    slots = slot_mapping.long()
    keep = slots >= 0
    slots = slots[keep]
    page_size = kv_cache.shape[1]
    blk, off = slots // page_size, slots % page_size
    kv_cache[blk, off] = kv_c[keep]
    pe_cache[blk, off] = k_pe[keep]


def _check_write_cache_args(kv_c, k_pe, kv_cache, pe_cache, slot_mapping) -> None:
    _utils.check_tensor("kv_cache", kv_cache, 3, FLOAT_DTYPES)
    _utils.check_tensor("pe_cache", pe_cache, 3, FLOAT_DTYPES)
    _utils.check_tensor("kv_c", kv_c, 2, FLOAT_DTYPES)
    _utils.check_tensor("k_pe", k_pe, 2, FLOAT_DTYPES)
    _utils.check_tensor("slot_mapping", slot_mapping, 1, INDEX_DTYPES)
    for name, t in (("pe_cache", pe_cache), ("kv_c", kv_c), ("k_pe", k_pe)):
        if t.dtype != kv_cache.dtype:
            raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')} but kv_cache has "
                            f"{str(kv_cache.dtype).replace('torch.', '')}; they must match (no conversion on write)")
    _utils.check_devices(kv_cache=kv_cache, pe_cache=pe_cache, kv_c=kv_c, k_pe=k_pe, slot_mapping=slot_mapping)
    _utils.check_same("kv_cache", tuple(kv_cache.shape[:2]), "pe_cache", tuple(pe_cache.shape[:2]),
                      "[num_blocks, block_size]")
    if kv_cache.shape[0] == 0 or kv_cache.shape[1] == 0:
        raise ValueError(f"kv_cache must hold at least one block of at least one token, got shape {tuple(kv_cache.shape)}")
    _utils.check_width("kv_cache", kv_cache.shape[2])
    _utils.check_width("pe_cache", pe_cache.shape[2])
    _utils.check_same("kv_c", kv_c.shape[1], "kv_cache", kv_cache.shape[2], "the latent width R")
    _utils.check_same("k_pe", k_pe.shape[1], "pe_cache", pe_cache.shape[2], "the rope width P")
    _utils.check_same("kv_c", kv_c.shape[0], "k_pe", k_pe.shape[0], "the number of tokens T")
    _utils.check_same("kv_c", kv_c.shape[0], "slot_mapping", slot_mapping.shape[0], "the number of tokens T")
    for name, t in (("kv_cache", kv_cache), ("pe_cache", pe_cache), ("kv_c", kv_c), ("k_pe", k_pe)):
        _utils.check_last_contiguous(name, t)


def write_cache(kv_c: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor, pe_cache: torch.Tensor,
                slot_mapping: torch.Tensor) -> None:
    """Write new tokens' latent and roped key into the paged cache, in place.

    Args:
        kv_c: ``[T, R]`` normalized latent of the new tokens (bf16 or fp16, the cache's dtype).
        k_pe: ``[T, P]`` roped key of the new tokens, same dtype.
        kv_cache: ``[num_blocks, block_size, R]`` latent cache.
        pe_cache: ``[num_blocks, block_size, P]`` rope-key cache.
        slot_mapping: ``[T]`` int64 or int32; token ``t`` goes to block ``slot // block_size``,
            row ``slot % block_size``. Negative slots (padding) are skipped.

    Every tensor needs only its last dimension contiguous: ``kv_cache``/``pe_cache`` may be the
    two views ``buf[..., :R]``, ``buf[..., R:]`` of one ``[num_blocks, block_size, R + P]``
    buffer, and ``kv_c``/``k_pe`` slices of a ``kv_a_proj`` output ``[T, R + P]``. Nothing is
    copied; cache bytes outside the written slots are left as they were. R and P are powers of
    two from 16 to 1024. Two tokens with the same slot leave one of them, unspecified which.

    Slots at or past ``num_blocks * block_size``: on the CPU this raises ``ValueError`` before
    anything is written. On the GPU, checking would cost a host synchronisation, so the kernel
    skips such tokens instead, like padding.

    Raises ``TypeError``/``ValueError`` naming the offending argument. ``T == 0`` is a no-op.
    """
    _check_write_cache_args(kv_c, k_pe, kv_cache, pe_cache, slot_mapping)
    num_tokens = kv_c.shape[0]
    if num_tokens == 0:
        return
    if slot_mapping.device.type == "cpu":
        num_slots = kv_cache.shape[0] * kv_cache.shape[1]
        top = int(slot_mapping.max())
        if top >= num_slots:
            raise ValueError(f"slot_mapping holds slot {top}, past the cache's {num_slots} slots "
                             f"({kv_cache.shape[0]} blocks of {kv_cache.shape[1]})")
    if _utils.use_triton(kv_cache):
        if kv_cache.device.type == "cuda":
            with torch.cuda.device(kv_cache.device):
                _launch_write_cache(kv_c, k_pe, kv_cache, pe_cache, slot_mapping)
        else:
            _launch_write_cache(kv_c, k_pe, kv_cache, pe_cache, slot_mapping)
    else:
        _write_cache_torch(kv_c, k_pe, kv_cache, pe_cache, slot_mapping)
