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

import math
import operator
from typing import Hashable, Iterable, Sequence

import torch
import triton
import triton.language as tl

from . import _utils
from ._utils import FLOAT_DTYPES, INDEX_DTYPES

__all__ = ["write_cache", "PagedLatentCache", "CacheFullError"]


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
    return min(16, 4096 // d_latent, _utils.next_pow2(num_tokens))


def _launch_write_cache(kv_c, k_pe, kv_cache, pe_cache, slot_mapping):
    num_tokens = kv_c.shape[0]
    num_blocks, page_size, d_latent = kv_cache.shape
    d_rope = pe_cache.shape[2]
    block_t = _block_t(num_tokens, d_latent)
    grid = (_utils.cdiv(num_tokens, block_t),)
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


_FLOATS, _INDEX = frozenset(FLOAT_DTYPES), frozenset(INDEX_DTYPES)
_WIDTHS = frozenset(1 << i for i in range(4, 11))  # check_width: powers of two from 16 to 1024


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
            and cs[:2] == ps[:2] and cs[0] > 0 and cs[1] > 0 and cs[2] in _WIDTHS and ps[2] in _WIDTHS
            and ts[1] == cs[2] and es[1] == ps[2] and ts[0] == es[0] == slot_mapping.shape[0]
            and kv_cache.stride(2) == 1 and pe_cache.stride(2) == 1 and kv_c.stride(1) == 1 and k_pe.stride(1) == 1
            and pe_cache.device == device and kv_c.device == device and k_pe.device == device
            and slot_mapping.device == device)


def write_cache(kv_c: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor, pe_cache: torch.Tensor,
                slot_mapping: torch.Tensor) -> None:
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
    two from 16 to 1024. Two tokens with the same slot leave one of them, unspecified which.

    Slots at or past ``num_blocks * block_size``: on the CPU this raises ``ValueError`` before
    anything is written. On the GPU, checking would cost a host synchronisation, so the kernel
    skips such tokens instead, like padding.

    Raises ``TypeError``/``ValueError`` naming the offending argument. ``T == 0`` is a no-op.
    """
    if not _write_cache_args_ok(kv_c, k_pe, kv_cache, pe_cache, slot_mapping):
        _check_write_cache_args(kv_c, k_pe, kv_cache, pe_cache, slot_mapping)
    if kv_c.shape[0] == 0:
        return
    if torch.compiler.is_compiling():  # one graph node that mutates the caches
        torch.ops.mla_kernels.write_cache(kv_c, k_pe, kv_cache, pe_cache, slot_mapping)
    else:  # eager: no custom-op dispatch (~15 µs) in front of a ~µs kernel
        _write_cache_run(kv_c, k_pe, kv_cache, pe_cache, slot_mapping)


def _write_cache_run(kv_c, k_pe, kv_cache, pe_cache, slot_mapping) -> None:
    """``write_cache`` after its shape checks (the body of the ``mla_kernels::write_cache`` custom op)."""
    if kv_c.shape[0] == 0:
        return
    if slot_mapping.device.type == "cpu":
        num_slots = kv_cache.shape[0] * kv_cache.shape[1]
        top = int(slot_mapping.max())
        if top >= num_slots:
            raise ValueError(f"slot_mapping holds slot {top}, past the cache's {num_slots} slots "
                             f"({kv_cache.shape[0]} blocks of {kv_cache.shape[1]})")
    if _utils.use_triton(kv_cache):
        if kv_cache.device.type == "cuda" and kv_cache.device.index != torch.cuda.current_device():
            with torch.cuda.device(kv_cache.device):
                _launch_write_cache(kv_c, k_pe, kv_cache, pe_cache, slot_mapping)
        else:
            _launch_write_cache(kv_c, k_pe, kv_cache, pe_cache, slot_mapping)
    else:
        _write_cache_torch(kv_c, k_pe, kv_cache, pe_cache, slot_mapping)


# ---------------------------------------------------------------------------------------------
# the paged cache manager
# ---------------------------------------------------------------------------------------------


def _index(name: str, value) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None


class CacheFullError(RuntimeError):
    """Not enough free blocks for a reservation. Raised before any state changes."""


class _Sequence:
    __slots__ = ("blocks", "length")

    def __init__(self) -> None:
        self.blocks: list[int] = []
        self.length = 0


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

    Sequence ids are any hashable values; ``add_sequence()`` without an id picks an unused int.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_lora_rank: int = 512,
                 rope_dim: int = 64, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"):
        for name, value in (("num_layers", num_layers), ("num_blocks", num_blocks), ("block_size", block_size),
                            ("kv_lora_rank", kv_lora_rank), ("rope_dim", rope_dim)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        _utils.check_width("kv_lora_rank", kv_lora_rank)
        _utils.check_width("rope_dim", rope_dim)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be bfloat16 or float16, got {dtype}")
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.kv_lora_rank = kv_lora_rank
        self.rope_dim = rope_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self._buffers = [torch.zeros(num_blocks, block_size, kv_lora_rank + rope_dim, dtype=dtype, device=self.device)
                         for _ in range(num_layers)]
        self._kv_views = [buf[..., :kv_lora_rank] for buf in self._buffers]
        self._pe_views = [buf[..., kv_lora_rank:] for buf in self._buffers]
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack: pop() hands out block 0 first
        self._seqs: dict[Hashable, _Sequence] = {}
        self._next_id = 0

    # -- buffers -------------------------------------------------------------------------------

    def buffer(self, layer: int) -> torch.Tensor:
        """The layer's whole ``[num_blocks, block_size, R + P]`` buffer."""
        return self._buffers[self._layer(layer)]

    def kv_cache(self, layer: int) -> torch.Tensor:
        """The layer's latent cache, ``[num_blocks, block_size, R]``, a view of ``buffer(layer)``."""
        return self._kv_views[self._layer(layer)]

    def pe_cache(self, layer: int) -> torch.Tensor:
        """The layer's rope-key cache, ``[num_blocks, block_size, P]``, a view of ``buffer(layer)``."""
        return self._pe_views[self._layer(layer)]

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        """Tokens the whole cache holds: ``num_blocks * block_size``."""
        return self.num_blocks * self.block_size

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token takes, over all layers: ``num_layers * (R + P) * element size``."""
        return self.num_layers * (self.kv_lora_rank + self.rope_dim) * self._buffers[0].element_size()

    # -- sequences -----------------------------------------------------------------------------

    def add_sequence(self, seq_id: Hashable | None = None) -> Hashable:
        """Start an empty sequence; returns its id (``seq_id`` if given, else a new int)."""
        if seq_id is None:
            while self._next_id in self._seqs:
                self._next_id += 1
            seq_id = self._next_id
            self._next_id += 1
        elif seq_id in self._seqs:
            raise ValueError(f"seq_id {seq_id!r} is already a live sequence")
        self._seqs[seq_id] = _Sequence()
        return seq_id

    def free(self, seq_id: Hashable) -> None:
        """End a sequence and return its blocks to the free pool (their contents stay until reused)."""
        seq = self._get(seq_id)
        self._free.extend(reversed(seq.blocks))
        del self._seqs[seq_id]

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
        return self._reserve_host(seq_ids, num_tokens).to(self.device)

    def _reserve_host(self, seq_ids: Sequence[Hashable], num_tokens: Sequence[int]) -> torch.Tensor:
        """``append_batch`` with the slots left on the host (a CPU int64 tensor): no device copy, so callers can
        pack them with the step's other metadata into one asynchronous upload."""
        seqs, counts = self._check_batch(seq_ids, num_tokens)
        needed = [self._new_blocks(s, n) for s, n in zip(seqs, counts)]
        total = sum(needed)
        if total > len(self._free):
            raise CacheFullError(
                f"not enough free cache blocks: appending {sum(counts)} tokens to {len(seqs)} sequence(s) needs {total} "
                f"new blocks of {self.block_size} tokens, but only {len(self._free)} of {self.num_blocks} are free; "
                f"free finished sequences or build a larger cache")
        if all(n <= 8 for n in counts):  # decode steps: a few ints per sequence, cheaper in Python than in torch
            size = self.block_size
            flat = []
            for seq, n, k in zip(seqs, counts, needed):
                seq.blocks.extend(self._free.pop() for _ in range(k))
                flat.extend(seq.blocks[p // size] * size + p % size for p in range(seq.length, seq.length + n))
                seq.length += n
            return torch.tensor(flat, dtype=torch.int64)
        slots = []
        for seq, n, k in zip(seqs, counts, needed):
            seq.blocks.extend(self._free.pop() for _ in range(k))
            slots.append(self._slots(seq, seq.length, seq.length + n))
            seq.length += n
        return torch.cat(slots) if slots else torch.empty(0, dtype=torch.int64)

    def slots(self, seq_id: Hashable, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Slots of the sequence's positions ``start..end-1`` (default: all), ``[end - start]`` int64."""
        seq = self._get(seq_id)
        end = seq.length if end is None else end
        if not 0 <= start <= end <= seq.length:
            raise ValueError(f"positions {start}..{end} are outside the sequence's {seq.length} tokens")
        return self._slots(seq, start, end).to(self.device)

    # -- what the attention kernels read -------------------------------------------------------

    def block_table(self, seq_ids: Sequence[Hashable], max_blocks: int | None = None, pad_id: int = 0) -> torch.Tensor:
        """``[B, max_blocks]`` int32: row ``b`` lists ``seq_ids[b]``'s blocks, then ``pad_id``.

        ``max_blocks`` defaults to the longest row in the batch (at least 1). The padding is never
        read by a kernel that stops at ``cache_seqlens``; pass an out-of-range ``pad_id`` to check that.
        """
        return self._block_table_host(seq_ids, max_blocks, pad_id).to(self.device)

    def _block_table_host(self, seq_ids: Sequence[Hashable], max_blocks: int | None = None,
                          pad_id: int = 0) -> torch.Tensor:
        """``block_table`` built on the host (CPU int32), not yet copied to the cache's device."""
        seqs = [self._get(s) for s in seq_ids]
        longest = max((len(s.blocks) for s in seqs), default=0)
        if max_blocks is None:
            max_blocks = max(1, longest)
        elif max_blocks < longest:
            raise ValueError(f"max_blocks {max_blocks} is shorter than the longest sequence's {longest} blocks")
        table = torch.full((len(seqs), max_blocks), pad_id, dtype=torch.int32)
        for b, seq in enumerate(seqs):
            if seq.blocks:
                table[b, :len(seq.blocks)] = torch.tensor(seq.blocks, dtype=torch.int32)
        return table

    def cache_seqlens(self, seq_ids: Sequence[Hashable]) -> torch.Tensor:
        """``[B]`` int32: tokens cached for each sequence."""
        return torch.tensor([self._get(s).length for s in seq_ids], dtype=torch.int32).to(self.device)

    # -- data ----------------------------------------------------------------------------------

    def write(self, layer: int, slot_mapping: torch.Tensor, kv_c: torch.Tensor, k_pe: torch.Tensor) -> None:
        """``write_cache`` into one layer: ``kv_c [T, R]``, ``k_pe [T, P]`` at ``slot_mapping [T]``
        (as returned by ``append``/``append_batch``/``slots``)."""
        layer = self._layer(layer)
        write_cache(kv_c, k_pe, self._kv_views[layer], self._pe_views[layer], slot_mapping)

    def read(self, layer: int, seq_id: Hashable) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of one sequence's cached tokens in one layer: ``(kv [L, R], pe [L, P])``."""
        layer = self._layer(layer)
        slots = self.slots(seq_id)
        blk, off = slots // self.block_size, slots % self.block_size
        return self._kv_views[layer][blk, off], self._pe_views[layer][blk, off]

    # -- internals -----------------------------------------------------------------------------

    def _layer(self, layer: int) -> int:
        index = _index("layer", layer)
        if not 0 <= index < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer!r}")
        return index

    def _get(self, seq_id: Hashable) -> _Sequence:
        try:
            return self._seqs[seq_id]
        except (KeyError, TypeError):
            raise KeyError(f"seq_id {seq_id!r} is not a live sequence") from None

    def _check_batch(self, seq_ids: Iterable[Hashable], num_tokens: Iterable[int]):
        seq_ids, counts = list(seq_ids), list(num_tokens)
        if len(seq_ids) != len(counts):
            raise ValueError(f"seq_ids and num_tokens disagree on length: {len(seq_ids)} vs {len(counts)}")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError("seq_ids has a sequence more than once; give each sequence one count")
        for i, n in enumerate(counts):
            counts[i] = _index("num_tokens", n)
            if counts[i] < 0:
                raise ValueError(f"num_tokens must be non-negative, got {n!r}")
        return [self._get(s) for s in seq_ids], counts

    def _new_blocks(self, seq: _Sequence, n: int) -> int:
        return math.ceil((seq.length + n) / self.block_size) - len(seq.blocks)

    def _slots(self, seq: _Sequence, start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end, dtype=torch.int64)
        blocks = torch.tensor(seq.blocks, dtype=torch.int64)
        if pos.numel() == 0:
            return pos
        return blocks[pos // self.block_size] * self.block_size + pos % self.block_size
