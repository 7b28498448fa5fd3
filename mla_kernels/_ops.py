"""The library's calls as PyTorch custom ops (namespace ``mla_kernels``), so ``torch.compile`` and CUDA graphs
see each as one node with known outputs and known mutations.

======================================  =============================================================
``torch.ops.mla_kernels.mla_decode``    ``mla_decode``; returns ``(out, lse)``, lse ``[0]`` unless asked
``torch.ops.mla_kernels.mla_prefill``   ``mla_prefill``; returns ``(out, lse)`` the same way
``...mla_prefill_attention``            ``mla_prefill_attention``; returns ``(out, lse)`` the same way
``torch.ops.mla_kernels.write_cache``   ``write_cache``; mutates ``kv_cache`` and ``pe_cache``
``...write_cache_fp8``                  ``write_cache`` into an fp8 cache; mutates them and ``kv_scale``
======================================  =============================================================

The public functions check their arguments' shapes and dtypes in Python (free while tracing: they read no
tensor values) and call these ops only while ``torch.compile`` traces them (the write ops check them again, so that a
direct call of ``torch.ops.mla_kernels.write_cache*`` cannot write out of bounds); in eager mode they skip the
dispatcher and its per-call host cost (not measured in bench/results). ``mla_decode`` and ``write_cache`` run their CPU-only
value checks inside the op, so those hold in compiled code too. The prefill ops need the lengths on the host
(they synchronise once, as the eager calls do, unless given the caller's host lengths, ``cu_seqlens_q_host`` and
``cache_seqlens_host``), so inside a compiled graph they are opaque nodes that run the whole checked public call.

The fake (meta) implementations give the output shapes from the input shapes alone.
"""

from __future__ import annotations

from typing import List, Optional  # typing.List: torch 2.6 infers no schema from list[int]

import torch

from . import cache as _cache
from . import decode as _decode
from . import prefill as _prefill
from . import _utils
from . import schedule as _schedule

__all__ = []

_NO_LSE = (0,)
# The fake implementations check one thing, that every tensor is on one device: a direct call mixing a meta tensor
# with real ones is dispatched to them (Meta outranks CPU and CUDA) and returned meta outputs, or for a write
# nothing at all, as if it had succeeded. (Everything else was checked by the public call that traced the op.)


def _lse_or_empty(lse, like: torch.Tensor) -> torch.Tensor:
    return lse if lse is not None else like.new_empty(_NO_LSE, dtype=torch.float32)


# -- mla_decode ---------------------------------------------------------------------------------


@torch.library.custom_op("mla_kernels::mla_decode", mutates_args=())
def mla_decode(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, pe_cache: torch.Tensor,
               block_table: torch.Tensor, cache_seqlens: torch.Tensor, softmax_scale: float, causal: bool,
               return_lse: bool, w_uv: Optional[torch.Tensor], max_seqlen_k: int,
               num_splits: Optional[int], sched_programs: Optional[torch.Tensor] = None,
               sched_sequences: Optional[torch.Tensor] = None,
               sched_sizes: Optional[List[int]] = None,
               kv_scale: Optional[torch.Tensor] = None,
               indices: Optional[torch.Tensor] = None,
               split_tokens: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    # sched_*: the optional DecodeSchedule, taken apart (schedule.to_op_args); kv_scale: an fp8 cache's scales;
    # indices: sparse key lists [B, S_q, K]; split_tokens: fixed split boundaries (batch-invariant decode).
    # mla_decode checked all this before tracing the op; a direct call of the op is checked here the same way
    softmax_scale, max_seqlen_k, num_splits = _decode._check_decode_args(q_nope, q_pe, kv_cache, pe_cache,
                                                                         block_table, cache_seqlens, softmax_scale,
                                                                         w_uv, max_seqlen_k, num_splits, kv_scale)
    metadata = _schedule.from_op_args(sched_programs, sched_sequences, sched_sizes)
    split_tokens = _decode._check_options(q_nope, indices, metadata, split_tokens, num_splits, max_seqlen_k)
    if metadata is not None:
        # tiles: checked when the call was traced (mla_decode), whose graph holds the schedule's tiles as constants;
        # the config file may have changed since (mla_kernels.autotune, MLA_KERNELS_AUTOTUNE=1 tuning the class on
        # this first real run): _launch then cuts the same grid again for the tiles it launches, on the device
        _decode._check_metadata(metadata, cache_seqlens, q_nope.shape[1] * q_nope.shape[2], q_nope.shape[3],
                                num_splits, q_pe.shape[-1], q_nope.element_size(), kv_scale is not None,
                                check_tiles=False)
    out, lse = _decode._mla_decode_run(q_nope, q_pe, kv_cache, pe_cache, block_table, cache_seqlens, softmax_scale,
                                       causal, return_lse, w_uv, max_seqlen_k, num_splits, metadata, kv_scale,
                                       indices=indices, split_tokens=split_tokens)
    return out, _lse_or_empty(lse, q_nope)


@mla_decode.register_fake
def _(q_nope, q_pe, kv_cache, pe_cache, block_table, cache_seqlens, softmax_scale, causal, return_lse, w_uv,
      max_seqlen_k, num_splits, sched_programs=None, sched_sequences=None, sched_sizes=None, kv_scale=None,
      indices=None, split_tokens=None):
    _utils.check_devices(q_nope=q_nope, q_pe=q_pe, kv_cache=kv_cache, pe_cache=pe_cache, block_table=block_table,
                        cache_seqlens=cache_seqlens, w_uv=w_uv, kv_scale=kv_scale, indices=indices)
    batch, s_q, heads, _ = q_nope.shape
    # contiguous, as _project_v's result is. (Running _project_v itself here, its bmm(out=transposed view) made
    # torch 2.11's fake tensors call int() on the batch size: a compiled step was pinned to one batch size.)
    out = q_nope.new_empty((batch, s_q, heads, q_nope.shape[3] if w_uv is None else w_uv.shape[1]))
    lse = q_nope.new_empty((batch, s_q, heads) if return_lse else _NO_LSE, dtype=torch.float32)
    return out, lse


# -- write_cache --------------------------------------------------------------------------------


@torch.library.custom_op("mla_kernels::write_cache", mutates_args=("kv_cache", "pe_cache"))
def write_cache(kv_c: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor, pe_cache: torch.Tensor,
                slot_mapping: torch.Tensor) -> None:
    if not _cache._write_cache_args_ok(kv_c, k_pe, kv_cache, pe_cache, slot_mapping):  # a direct call of the op
        _cache._check_write_cache_args(kv_c, k_pe, kv_cache, pe_cache, slot_mapping)
    _cache._write_cache_run(kv_c, k_pe, kv_cache, pe_cache, slot_mapping)


@write_cache.register_fake
def _(kv_c, k_pe, kv_cache, pe_cache, slot_mapping):
    _utils.check_devices(kv_cache=kv_cache, pe_cache=pe_cache, kv_c=kv_c, k_pe=k_pe, slot_mapping=slot_mapping)
    return None


# An fp8 cache's write is its own op, so that no op declares a mutation of an optional argument: torch 2.11's
# ADInplaceOrView kernel indexes every declared mutated argument, and the dispatcher drops a trailing one left
# at its default (IndexError under torch.compile and opcheck there; torch 2.13 copes).
@torch.library.custom_op("mla_kernels::write_cache_fp8", mutates_args=("kv_cache", "pe_cache", "kv_scale"))
def write_cache_fp8(kv_c: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor, pe_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, kv_scale: torch.Tensor) -> None:
    _cache._check_write_cache_args(kv_c, k_pe, kv_cache, pe_cache, slot_mapping, kv_scale)
    _cache._write_cache_run(kv_c, k_pe, kv_cache, pe_cache, slot_mapping, kv_scale)


@write_cache_fp8.register_fake
def _(kv_c, k_pe, kv_cache, pe_cache, slot_mapping, kv_scale):
    _utils.check_devices(kv_cache=kv_cache, pe_cache=pe_cache, kv_c=kv_c, k_pe=k_pe, slot_mapping=slot_mapping,
                        kv_scale=kv_scale)
    return None


# -- mla_prefill --------------------------------------------------------------------------------


@torch.library.custom_op("mla_kernels::mla_prefill", mutates_args=())
def mla_prefill(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, pe_cache: torch.Tensor,
                block_table: torch.Tensor, cu_seqlens_q: torch.Tensor, cache_seqlens: torch.Tensor,
                softmax_scale: float, causal: bool, return_lse: bool, max_seqlen_q: Optional[int],
                max_seqlen_k: Optional[int], num_splits: Optional[int],
                kv_scale: Optional[torch.Tensor] = None, cu_seqlens_q_host: Optional[List[int]] = None,
                cache_seqlens_host: Optional[List[int]] = None,
                split_tokens: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    result = _prefill.mla_prefill(q_nope, q_pe, kv_cache, pe_cache, block_table, cu_seqlens_q, cache_seqlens,
                                  softmax_scale, causal, return_lse, max_seqlen_q=max_seqlen_q,
                                  max_seqlen_k=max_seqlen_k, num_splits=num_splits, kv_scale=kv_scale,
                                  cu_seqlens_q_host=cu_seqlens_q_host, cache_seqlens_host=cache_seqlens_host,
                                  split_tokens=split_tokens)
    out, lse = result if return_lse else (result, None)
    return out.contiguous(), _lse_or_empty(lse, q_nope)


@mla_prefill.register_fake
def _(q_nope, q_pe, kv_cache, pe_cache, block_table, cu_seqlens_q, cache_seqlens, softmax_scale, causal,
      return_lse, max_seqlen_q, max_seqlen_k, num_splits, kv_scale=None, cu_seqlens_q_host=None,
      cache_seqlens_host=None, split_tokens=None):
    _utils.check_devices(q_nope=q_nope, q_pe=q_pe, kv_cache=kv_cache, pe_cache=pe_cache, block_table=block_table,
                        cu_seqlens_q=cu_seqlens_q, cache_seqlens=cache_seqlens, kv_scale=kv_scale)
    total, heads, _ = q_nope.shape
    out = q_nope.new_empty(total, heads, kv_cache.shape[-1])
    lse = q_nope.new_empty((total, heads) if return_lse else _NO_LSE, dtype=torch.float32)
    return out, lse


# -- mla_prefill_attention ----------------------------------------------------------------------


@torch.library.custom_op("mla_kernels::mla_prefill_attention", mutates_args=())
def mla_prefill_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, pe_cache: torch.Tensor,
                          block_table: torch.Tensor, cu_seqlens_q: torch.Tensor, cache_seqlens: torch.Tensor,
                          w_kv_b: torch.Tensor, softmax_scale: float, causal: bool, path: str,
                          return_lse: bool, kv_scale: Optional[torch.Tensor] = None,
                          cu_seqlens_q_host: Optional[List[int]] = None,
                          cache_seqlens_host: Optional[List[int]] = None,
                          split_tokens: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    result = _prefill.mla_prefill_attention(q_nope, q_pe, kv_cache, pe_cache, block_table, cu_seqlens_q,
                                            cache_seqlens, w_kv_b, softmax_scale, causal, path,
                                            return_lse=return_lse, kv_scale=kv_scale,
                                            cu_seqlens_q_host=cu_seqlens_q_host,
                                            cache_seqlens_host=cache_seqlens_host, split_tokens=split_tokens)
    out, lse = result if return_lse else (result, None)
    return out.contiguous(), _lse_or_empty(lse, q_nope)  # the absorbed path's projection leaves it transposed


@mla_prefill_attention.register_fake
def _(q_nope, q_pe, kv_cache, pe_cache, block_table, cu_seqlens_q, cache_seqlens, w_kv_b, softmax_scale, causal,
      path, return_lse, kv_scale=None, cu_seqlens_q_host=None, cache_seqlens_host=None, split_tokens=None):
    _utils.check_devices(q_nope=q_nope, q_pe=q_pe, kv_cache=kv_cache, pe_cache=pe_cache, block_table=block_table,
                        cu_seqlens_q=cu_seqlens_q, cache_seqlens=cache_seqlens, w_kv_b=w_kv_b, kv_scale=kv_scale)
    total, heads, d_nope = q_nope.shape
    out = q_nope.new_empty(total, heads, w_kv_b.shape[0] // heads - d_nope)
    lse = q_nope.new_empty((total, heads) if return_lse else _NO_LSE, dtype=torch.float32)
    return out, lse
