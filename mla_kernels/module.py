"""DeepSeek-V2/V3 Multi-head Latent Attention as a drop-in ``nn.Module`` over the paged latent cache.

``MLAttention`` holds the same projections as transformers' ``DeepseekV3Attention`` (same parameter
names, so its state dict loads unchanged) and computes the same function, but caches only what MLA
needs: per token the normalized latent ``c_kv`` (``R = kv_lora_rank`` values) and the roped key
``k_pe`` (``P = qk_rope_head_dim`` values), written into a ``PagedLatentCache``. Attention runs through
the library's kernels:

decode (every sequence has the same few new tokens)
    the query is absorbed into latent space (``q_nope @ W_UK``), ``mla_decode`` attends over the cached
    latent and projects the result out through ``W_UV``;
prefill (ragged new tokens over any history)
    ``mla_prefill_attention``, which picks the absorbed or the expanded form by cost.

One step of a model reserves cache slots once for all layers (``LatentBatch.reserve``) and passes the
resulting ``LatentBatch`` to every layer::

    cache = PagedLatentCache(num_layers, num_blocks, block_size, kv_lora_rank, qk_rope_head_dim, dtype=...)
    seq_ids = [cache.add_sequence() for _ in prompts]
    batch = LatentBatch.reserve(cache, seq_ids, [len(p) for p in prompts])
    out = attn(hidden_states, batch)          # hidden_states [T, hidden] packed, or [B, S, hidden]
"""

from __future__ import annotations

import itertools
import math
import numbers
import weakref
from collections.abc import Mapping
from typing import Hashable, Sequence

import torch
from torch import nn

from . import _utils
from .cache import PagedLatentCache, write_cache
from .decode import check_split_count, mla_decode, split_tokens_value
from .norm import DeepseekRMSNorm, rms_norm
from .norm_rope import norm_and_rope
from .rope import ROPE_STYLES, apply_rope, rope  # noqa: F401 (apply_rope: the PyTorch path, kept importable here)

__all__ = ["MLAttention", "LatentBatch", "DeepseekRMSNorm", "yarn_get_mscale", "rope_inv_freq"]

DECODE_MAX_NEW_TOKENS = 8  # up to this many new tokens per sequence (all sequences alike) take mla_decode


# ---------------------------------------------------------------------------------------------
# rotary embedding (YaRN) and softmax scale, as transformers computes them
# ---------------------------------------------------------------------------------------------


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    """YaRN's attention-magnitude correction ``0.1 * mscale * ln(scale) + 1`` (1 for ``scale <= 1``)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale_for(qk_head_dim: int, rope_parameters: dict | None) -> float:
    """``qk_head_dim ** -0.5``, times ``mscale(factor, mscale_all_dim) ** 2`` under a scaled RoPE
    (transformers' ``yarn_apply_mscale``)."""
    scale = qk_head_dim ** (-0.5)
    params = rope_parameters or {}
    # (transformers' older key "type" too, as rope_inv_freq reads it: it got YaRN's frequencies without this scale)
    if params.get("rope_type", params.get("type", "default")) != "default":
        mscale_all_dim = params.get("mscale_all_dim", 0)
        if mscale_all_dim:
            mscale = yarn_get_mscale(params["factor"], mscale_all_dim)
            scale = scale * mscale * mscale
    return scale


def _check_rope_parameters(rope_parameters) -> dict:
    """A copy of ``rope_parameters`` (None: the default rope) whose numbers the rope tables can be built from; a
    ``TypeError``/``ValueError`` naming the entry otherwise (a theta of 0, -1 or NaN gave NaN tables)."""
    if rope_parameters is None:
        return {"rope_type": "default", "rope_theta": 10000.0}
    if not isinstance(rope_parameters, Mapping):
        raise TypeError(f"rope_parameters must be a dict (transformers' config.rope_parameters) or None, got "
                        f"{type(rope_parameters).__name__}")
    params = dict(rope_parameters)
    for key, optional in (("rope_theta", False), ("factor", True)):
        value = params.get(key, None if optional else 10000.0)
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"rope_parameters['{key}'] must be a number, got {type(value).__name__}")
        low = 1.0 if key == "rope_theta" else 0.0
        if not (_utils.is_finite(value) and value > low):  # (an int past float's range: OverflowError later)
            raise ValueError(f"rope_parameters['{key}'] must be a finite number > {low:g}, got {value}")
    if params.get("truncate") is not None:  # (YaRN's; "no" was read as True)
        _utils.check_flag("rope_parameters['truncate']", params["truncate"])
    original = params.get("original_max_position_embeddings")
    if original is not None:
        params["original_max_position_embeddings"] = _utils.check_size(
            "rope_parameters['original_max_position_embeddings']", original)
    # YaRN's other numbers (read by rope_inv_freq and softmax_scale_for): finite reals, else a NaN softmax scale or
    # rope table, or errors naming none of them ("math domain error", "can't multiply sequence by non-int")
    for key, low, high in (("beta_fast", 0.0, 1e300), ("beta_slow", 0.0, 1e300), ("mscale", None, None),
                           ("mscale_all_dim", None, None), ("attention_factor", 0.0, None),
                           ("partial_rotary_factor", 0.0, 1.0)):
        value = params.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"rope_parameters['{key}'] must be a number, got {type(value).__name__}")
        if not _utils.is_finite(value) or (low is not None and value < low) or (high is not None and value > high) \
                or (key in ("attention_factor", "partial_rotary_factor") and value == 0):
            bounds = {"beta_fast": ">= 0", "beta_slow": ">= 0", "attention_factor": "> 0",
                      "partial_rotary_factor": "in (0, 1]"}.get(key, "finite")
            raise ValueError(f"rope_parameters['{key}'] must be a finite number {bounds}, got {value}")
    if "original_max_position_embeddings" in params and original is None and \
            params.get("rope_type", params.get("type", "default")) == "yarn":
        raise ValueError("rope_parameters of rope_type 'yarn' needs original_max_position_embeddings (an int), "
                         "got None")
    return params


def rope_inv_freq(dim: int, rope_parameters: dict | None, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[dim // 2]`` fp32 and the cos/sin scaling factor, for ``rope_type`` "default"
    or "yarn" (transformers' ``_compute_yarn_parameters``, same formula and operation order)."""
    params = dict(rope_parameters or {})
    base = params.get("rope_theta", 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    if rope_type != "yarn":
        raise ValueError(f"rope_parameters['rope_type'] must be 'default' or 'yarn', got {rope_type!r}")
    missing = [k for k in ("factor", "original_max_position_embeddings") if k not in params]
    if missing:
        raise ValueError(f"rope_parameters of rope_type 'yarn' lacks {missing}")
    partial = params.get("partial_rotary_factor", 1.0)
    dim = int(dim * partial)
    factor = params["factor"]
    original = params["original_max_position_embeddings"]
    if factor is None:
        factor = max_position_embeddings / original
    attention_factor = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = yarn_get_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


# ---------------------------------------------------------------------------------------------
# per-step metadata
# ---------------------------------------------------------------------------------------------


class LatentBatch:
    """Where one step's new tokens go and what every layer's attention reads; shared by all layers.

    Attributes:
        cache: the ``PagedLatentCache``.
        seq_ids: the B sequences of the step, in packing order.
        num_new_tokens: ``list[int]`` of B counts (0 allowed); the step's T = sum of them.
        slots: ``[T]`` int64 cache slots of the new tokens, packed sequence after sequence.
        positions: ``[T]`` int64 absolute position of each new token (its index in its sequence).
        block_table: ``[B, max_blocks]`` int32; cache_seqlens: ``[B]`` int32 (new tokens included);
        cu_seqlens_q: ``[B + 1]`` int32 row offsets of each sequence's new tokens.
        cu_seqlens_q_host, cache_seqlens_host: the same two as lists of ints on the host (the bookkeeping they
            were built from), so that ``mla_prefill_attention`` reads nothing back from the GPU.
        uniform: the common count when every sequence has the same number of new tokens, else None.
    """

    def __init__(self, cache: PagedLatentCache, seq_ids: Sequence[Hashable], num_new_tokens: Sequence[int],
                 slots: torch.Tensor):
        if not isinstance(cache, PagedLatentCache):
            raise TypeError(f"cache must be a PagedLatentCache, got {type(cache).__name__}")
        self.cache = cache
        self.seq_ids = _utils.as_list("seq_ids", seq_ids)  # (list() took a string as its characters' ids)
        seqs, self.num_new_tokens = cache._check_batch(self.seq_ids, num_new_tokens, "num_new_tokens")
        total = sum(self.num_new_tokens)
        _utils.check_tensor("slots", slots, 1, _utils.INDEX_DTYPES)
        _utils.check_same("slots", slots.shape[0], "sum(num_new_tokens)", total, "the number of new tokens T")
        device = cache.device
        self.slots = slots.to(device=device, dtype=torch.int64)
        lengths = [seq.length for seq in seqs]
        for s, n, length in zip(self.seq_ids, self.num_new_tokens, lengths):
            if n > length:
                raise ValueError(f"sequence {s!r} has {length} cached tokens, fewer than its {n} new tokens; "
                                 f"reserve them first (LatentBatch.reserve)")
        expected = torch.cat([cache._slots(seq, length - n, length)
                              for seq, n, length in zip(seqs, self.num_new_tokens, lengths)]
                             or [torch.empty(0, dtype=torch.int64)])
        if not torch.equal(slots.cpu().long(), expected):  # (one read when slots are on a GPU: reserve reads none)
            raise ValueError(f"slots are not the cache slots of these sequences' last num_new_tokens positions "
                             f"(expected {expected.tolist()[:16]}{'...' if total > 16 else ''}): writing there "
                             "would overwrite other tokens; use LatentBatch.reserve, or cache.slots(seq, start, end)")
        size, refs = cache.block_size, cache._refs
        for s, seq, n, length in zip(self.seq_ids, seqs, self.num_new_tokens, lengths):
            shared = [b for b in seq.blocks[(length - n) // size:_utils.cdiv(length, size)] if n and refs[b] > 1]
            if shared:  # a fork holds it too: a write there would change every holder's tokens
                raise ValueError(f"slots of sequence {s!r} lie in block {shared[0]}, which a fork shares "
                                 "(PagedLatentCache.fork shares full blocks, never written again): write a step's "
                                 "tokens before forking")
        self.positions = torch.cat(
            [torch.arange(length - n, length, dtype=torch.int64) for n, length in zip(self.num_new_tokens, lengths)]
            or [torch.empty(0, dtype=torch.int64)]).to(device)
        self.block_table = cache.block_table(self.seq_ids)
        self.cache_seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
        cu = list(itertools.accumulate(self.num_new_tokens, initial=0))
        self.cu_seqlens_q = torch.tensor(cu, dtype=torch.int32, device=device)
        self.cu_seqlens_q_host, self.cache_seqlens_host = cu, [int(n) for n in lengths]
        self.max_seqlen_k = max(lengths, default=0)
        counts = set(self.num_new_tokens)
        self.uniform = counts.pop() if len(counts) == 1 else None
        self._seqs, self._current_at = seqs, cache._version

    @classmethod
    def reserve(cls, cache: PagedLatentCache, seq_ids: Sequence[Hashable],
                num_new_tokens: Sequence[int]) -> "LatentBatch":
        """Reserve ``num_new_tokens[i]`` positions for each ``seq_ids[i]`` (all or none: ``CacheFullError``
        changes nothing) and return the step's metadata.

        The metadata is built on the host from the cache manager's bookkeeping and reaches the device in one
        asynchronous copy (from pinned memory on a GPU): the call never waits for the GPU."""
        if not isinstance(cache, PagedLatentCache):
            raise TypeError(f"cache must be a PagedLatentCache, got {type(cache).__name__}")
        seq_ids, counts = _utils.as_list("seq_ids", seq_ids), _utils.as_list("num_new_tokens", num_new_tokens)
        slots = cache._reserve_host(seq_ids, counts, "num_new_tokens")
        return cls._from_host(cache, seq_ids, counts, slots, [cache.seqlen(s) for s in seq_ids],
                              cache._block_table_host(seq_ids))

    @classmethod
    def _from_host(cls, cache: PagedLatentCache, seq_ids: list, counts: list[int], slots: torch.Tensor,
                   lengths: list[int], block_table: torch.Tensor) -> "LatentBatch":
        """The step's metadata from host values already checked by the cache manager: ``slots [T]`` (CPU int64),
        ``lengths`` (tokens per sequence, new ones included) and ``block_table [B, W]`` (CPU). Everything is
        packed into one host buffer and copied to the device once, without waiting: no ``.item()``, no
        ``.tolist()``, no synchronous copy."""
        self = cls.__new__(cls)
        self.cache, self.seq_ids, self.num_new_tokens = cache, seq_ids, [int(n) for n in counts]
        self._seqs, self._current_at = [cache._get(s) for s in seq_ids], cache._version
        batch, total = len(seq_ids), slots.shape[0]
        width = block_table.shape[1]
        counts_t = torch.tensor(self.num_new_tokens, dtype=torch.int64)
        cu = torch.zeros(batch + 1, dtype=torch.int64)
        torch.cumsum(counts_t, 0, out=cu[1:])
        first = torch.tensor(lengths, dtype=torch.int64) - counts_t  # position of each sequence's first new token
        device = cache.device
        # [slots T | positions T | block_table B*W | cache_seqlens B | cu_seqlens_q B+1], int64 on the host
        host = torch.empty(2 * total + batch * width + 2 * batch + 1, dtype=torch.int64,
                           pin_memory=_utils.pin_host(device))
        host[:total] = slots
        if total:  # positions: first[b] + (i - cu[b]) for the i-th new token of the step
            host[total:2 * total] = torch.repeat_interleave(first - cu[:-1], counts_t, output_size=total)
            host[total:2 * total] += torch.arange(total)
        meta = host[2 * total:]
        meta[:batch * width].view(batch, width).copy_(block_table)
        meta[batch * width:batch * width + batch] = first + counts_t
        meta[batch * width + batch:] = cu
        dev = _utils.to_device(host, device)
        small = dev[2 * total:].to(torch.int32)
        self.slots, self.positions = dev[:total], dev[total:2 * total]
        self.block_table = small[:batch * width].view(batch, width)
        self.cache_seqlens = small[batch * width:batch * width + batch]
        self.cu_seqlens_q = small[batch * width + batch:]
        self.cache_seqlens_host = [int(n) for n in lengths]
        self.cu_seqlens_q_host = list(itertools.accumulate(self.num_new_tokens, initial=0))
        self.max_seqlen_k = max(lengths, default=0)
        distinct = set(self.num_new_tokens)
        self.uniform = distinct.pop() if len(distinct) == 1 else None
        return self

    def check_current(self) -> None:
        """Refuse a batch the cache has moved past: a sequence freed (its blocks may now hold another's tokens),
        forked (the fork copied its last block as it was: a later write would reach one of the two only) or grown by
        a later reservation (this batch's slots and lengths are an earlier step's). Writing through such a batch
        overwrote live tokens. O(1) while the cache is unchanged since the last check (every layer of a step); one
        pass over the batch's sequences after a change elsewhere in the cache.

        ``MLAttention`` calls it eagerly only: while ``torch.compile`` traces, the check is skipped (the version ints
        would be guarded on, a recompile at every step), so a stale batch given to a compiled module writes where it
        was reserved, over whatever lives there now. Call it yourself, outside the compiled code, before each step."""
        cache = self.cache
        if cache._version == self._current_at:
            return
        for sid, seq, length in zip(self.seq_ids, self._seqs, self.cache_seqlens_host):
            if cache._seqs.get(sid) is not seq:
                raise ValueError(f"batch is out of date: sequence {sid!r} was freed, forked or truncated (a cancel() "
                                 "included) after it was reserved; reserve a new LatentBatch for each step (and fork "
                                 "after a step's writes)")
            if seq.length != length:
                raise ValueError(f"batch is out of date: sequence {sid!r} has {seq.length} tokens reserved now, "
                                 f"{length} when this batch was made; reserve a new LatentBatch for each step")
        self._current_at = cache._version

    def cancel(self) -> None:
        """Undo this step's reservation, for a step that failed before every layer wrote it: each sequence drops its
        ``num_new_tokens`` last positions (``PagedLatentCache.truncate``; never a copy, as the new positions lie in
        blocks no fork shares). Positions reserved and never written would otherwise be read by every later step of
        the sequence (they hold whatever the block held before: a freed sequence's tokens). ``ValueError`` for a
        batch the cache has moved past (nothing changes); the batch is out of date afterwards."""
        self.check_current()
        for seq_id, n, length in zip(self.seq_ids, self.num_new_tokens, self.cache_seqlens_host):
            if n:
                self.cache.truncate(seq_id, length - n)

    # Both from tensor shapes, never int() or len() of a list: under torch.compile they stay symbolic, so a compiled
    # step is not specialised to one batch size (dynamo guards on a list's length, and int() pins a size).
    @property
    def num_tokens(self) -> int:
        return self.slots.shape[0]

    @property
    def batch_size(self) -> int:
        return self.block_table.shape[0]


# ---------------------------------------------------------------------------------------------
# the module
# ---------------------------------------------------------------------------------------------


def _scale(name: str, value) -> float:
    # any real (numpy's float32 too), as softmax_scale (check_scale) and rope_parameters' numbers are taken
    value = _utils.as_float(name, value, "must be a finite float > 0")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite float > 0, got {value}")
    return value


class MLAttention(nn.Module):
    """DeepSeek-V2/V3 Multi-head Latent Attention over a paged latent cache.

    Parameters (names as transformers' ``DeepseekV3Attention``): ``q_proj`` ``[H*(D_nope+P), hidden]`` when
    ``q_lora_rank`` is None or 0, else ``q_a_proj`` ``[q_lora_rank, hidden]``, ``q_a_layernorm``,
    ``q_b_proj`` ``[H*(D_nope+P), q_lora_rank]``; ``kv_a_proj_with_mqa`` ``[R+P, hidden]``, ``kv_a_layernorm``
    ``[R]``, ``kv_b_proj`` ``[H*(D_nope+D_v), R]``, ``o_proj`` ``[hidden, H*D_v]``.

    Args:
        hidden_size, num_heads, kv_lora_rank (R), qk_nope_head_dim (D_nope), qk_rope_head_dim (P),
            v_head_dim (D_v): the shapes. R and P must be powers of two from 16 to 1024 (the kernels' tiles); P may
            be 0 (MLA without a rotary part: Mistral Large 4's no-rope layers, GLM-5.3-Flash's; nothing is rotated
            and the cache holds the latent alone).
        q_lora_rank: rank of the query LoRA, or None/0 for a plain ``q_proj``.
        rope_parameters: transformers' ``config.rope_parameters``: ``rope_theta`` and ``rope_type``
            ("default" or "yarn" with ``factor``, ``original_max_position_embeddings``, ``beta_fast``,
            ``beta_slow``, ``mscale``, ``mscale_all_dim``). YaRN's mscale corrects the softmax scale.
        rope_interleave: DeepSeek-V3's interleaved rope pairs (True) or ``rotate_half`` (False).
        rope_style: overrides rope_interleave: "interleave", "half", "pairs" (DeepSeek-V2's complex rope) or "none"
            (no rope: Kimi-Linear's NoPE MLA, whose P-wide shared key part is not rotated).
        attention_bias: biases on q_a_proj, kv_a_proj_with_mqa and o_proj (as transformers).
        query_scale, latent_scale: LongCat-Flash's LoRA scales (``mla_scale_q_lora``, ``mla_scale_kv_lora``;
            1.0 for every other model): the query (nope and rope parts, so every score: the softmax scale takes
            it) and the normalized latent (keys and values alike: scaled before it is cached) are multiplied by them.
        layer_idx: this layer's index in the ``PagedLatentCache``.
        attention_sinks: a learned logit per head, ``sinks [H]`` (float32, zeros until loaded; Hy4's, gpt-oss's),
            joins each query's softmax as one more key whose value is zero: every attention output is scaled by
            ``exp(lse) / (exp(lse) + exp(sinks[h]))`` (every attention call's ``sinks``).
        split_tokens: None, or batch-invariant attention: passed to every ``mla_decode`` and
            ``mla_prefill_attention`` call (see ``mla_decode``), so a sequence's attention output does not depend
            on the other sequences of its step. The projections around the attention are the caller's GEMMs (a
            batch-invariant matmul library makes the whole layer invariant). Settable later (``attn.split_tokens =
            n``); ``patch_model(split_tokens=n)`` sets it on every layer.

    ``forward(hidden_states, batch)`` runs one step: see its docstring. Inference only (the kernels have no
    backward).
    """

    # the widths of the cache where wider than the module's own: one cache for a model whose layers have several
    # (dots.llm3's latents, Mistral Large 4's rope parts, a layer without one among rope layers): the module stores
    # and reads its first kv_lora_rank and qk_rope_head_dim columns; None: its own
    cache_kv_lora_rank: int | None = None
    cache_rope_dim: int | None = None

    @property
    def cache_latent(self) -> int:
        """The latent width of the cache this module's model keeps (``cache_kv_lora_rank``, or its own)."""
        return self.cache_kv_lora_rank or self.kv_lora_rank

    @property
    def cache_rope(self) -> int:
        """The rope width of the latent cache this module's model keeps (``cache_rope_dim``, or its own)."""
        return self.qk_rope_head_dim if self.cache_rope_dim is None else self.cache_rope_dim

    def __init__(self, hidden_size: int, num_heads: int, kv_lora_rank: int, qk_nope_head_dim: int,
                 qk_rope_head_dim: int, v_head_dim: int, q_lora_rank: int | None = None,
                 rope_parameters: dict | None = None, rope_interleave: bool = True, rope_style: str | None = None,
                 attention_bias: bool = False, max_position_embeddings: int = 4096, layer_idx: int = 0,
                 device=None, dtype=None, query_scale: float = 1.0, latent_scale: float = 1.0,
                 split_tokens: int | None = None, attention_sinks: bool = False):
        super().__init__()
        self.hidden_size = hidden_size = _utils.check_size("hidden_size", hidden_size)
        self.num_heads = num_heads = _utils.check_size("num_heads", num_heads)
        self.kv_lora_rank = kv_lora_rank = _utils.check_size("kv_lora_rank", kv_lora_rank)
        self.qk_nope_head_dim = qk_nope_head_dim = _utils.check_size("qk_nope_head_dim", qk_nope_head_dim)
        # (0: no rotary part, a NoPE layer: the query's and key's rope parts are empty, the cache holds the latent)
        self.qk_rope_head_dim = qk_rope_head_dim = _utils.check_size("qk_rope_head_dim", qk_rope_head_dim, 0)
        self.v_head_dim = v_head_dim = _utils.check_size("v_head_dim", v_head_dim)
        _utils.check_width("kv_lora_rank", kv_lora_rank)
        _utils.check_rope_width("qk_rope_head_dim", qk_rope_head_dim)
        if q_lora_rank is not None:
            q_lora_rank = _utils.check_size("q_lora_rank", q_lora_rank, 0)
        self.q_lora_rank = q_lora_rank or None
        self.layer_idx = _utils.check_size("layer_idx", layer_idx, 0)
        rope_interleave = _utils.check_flag("rope_interleave", rope_interleave)  # ("no" or None read as a flag)
        attention_bias = _utils.check_flag("attention_bias", attention_bias)
        if dtype is not None and dtype not in _utils.FLOAT_DTYPES:  # (float64 failed at the first step, after)
            raise TypeError(f"dtype must be None, bfloat16, float16 or float32 (the kernels' dtypes), got {dtype!r}")
        if rope_style is None:
            rope_style = "interleave" if rope_interleave else "half"
        if rope_style not in ROPE_STYLES:
            raise ValueError(f"rope_style must be one of {ROPE_STYLES}, got {rope_style!r}")
        self.rope_style = rope_style
        self.rope_parameters = _check_rope_parameters(rope_parameters)
        max_position_embeddings = _utils.check_size("max_position_embeddings", max_position_embeddings)
        if self.rope_parameters.get("factor", 0) is None and "original_max_position_embeddings" in self.rope_parameters:
            # YaRN's factor None: max_position_embeddings / original, as rope_inv_freq takes it (softmax_scale_for
            # compared None with 1 and raised a TypeError naming neither)
            self.rope_parameters["factor"] = \
                max_position_embeddings / self.rope_parameters["original_max_position_embeddings"]
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.query_scale = _scale("query_scale", query_scale)
        self.latent_scale = _scale("latent_scale", latent_scale)
        self.softmax_scale = softmax_scale_for(self.qk_head_dim, self.rope_parameters) * self.query_scale
        if not 0.0 < self.softmax_scale < _utils.MAX_SCALE:  # (NaN too) refused here, not by the kernels after a write
            raise ValueError(f"query_scale={query_scale} and rope_parameters give a softmax scale of "
                             f"{self.softmax_scale}, which the kernels cannot take (it must be positive, finite and "
                             f"below {_utils.MAX_SCALE:.4g})")

        kw = dict(device=device, dtype=dtype)
        heads_qk = num_heads * self.qk_head_dim
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden_size, heads_qk, bias=False, **kw)
        else:
            self.q_a_proj = nn.Linear(hidden_size, self.q_lora_rank, bias=attention_bias, **kw)
            self.q_a_layernorm = DeepseekRMSNorm(self.q_lora_rank, **kw)
            self.q_b_proj = nn.Linear(self.q_lora_rank, heads_qk, bias=False, **kw)
        self.kv_a_proj_with_mqa = nn.Linear(hidden_size, kv_lora_rank + qk_rope_head_dim, bias=attention_bias, **kw)
        self.kv_a_layernorm = DeepseekRMSNorm(kv_lora_rank, **kw)
        self.kv_b_proj = nn.Linear(kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim), bias=False, **kw)
        self.o_proj = nn.Linear(num_heads * v_head_dim, hidden_size, bias=attention_bias, **kw)
        if _utils.check_flag("attention_sinks", attention_sinks):  # (float32 whatever the module's dtype, as Hy4's)
            self.sinks = nn.Parameter(torch.zeros(num_heads, device=device, dtype=torch.float32))

        self.max_position_embeddings = max_position_embeddings
        inv_freq, self.rope_scaling_factor = rope_inv_freq(qk_rope_head_dim, self.rope_parameters,
                                                           max_position_embeddings)
        if 2 * inv_freq.shape[0] != qk_rope_head_dim:  # YaRN's partial_rotary_factor: tables narrower than the rope
            raise ValueError(f"rope_parameters['partial_rotary_factor']={self.rope_parameters.get('partial_rotary_factor')}"
                             f" rotates {2 * inv_freq.shape[0]} of the qk_rope_head_dim={qk_rope_head_dim} rope values; "
                             "MLAttention rotates all of them (forward failed inside torch)")
        self.register_buffer("inv_freq", inv_freq if device is None else inv_freq.to(device), persistent=False)
        self.split_tokens = split_tokens

    @property
    def split_tokens(self) -> int | None:
        """None, or the ``split_tokens`` every attention call of this module gets (batch-invariant attention)."""
        return self.__dict__.get("_split_tokens")  # (a module pickled before the option existed has none)

    @split_tokens.setter
    def split_tokens(self, value) -> None:
        # checked here, not by the kernels after attend has written the step's tokens to the cache
        self._split_tokens = None if value is None else split_tokens_value(value)

    def _apply(self, fn, recurse=True):
        """``nn.Module._apply`` (``.to``, ``.cuda``, ``to_empty``...), then: a rope buffer that leaves the meta device
        is computed again from the config. It is derived, not saved (no state-dict entry), so after
        ``MLAttention(..., device="meta").to_empty(device=...)`` and ``load_state_dict`` it would otherwise hold
        whatever the new memory held, and the rope would be silently wrong."""
        was_meta = self.inv_freq.is_meta
        super()._apply(fn, recurse)
        if was_meta and not self.inv_freq.is_meta:
            inv_freq, _ = rope_inv_freq(self.qk_rope_head_dim, self.rope_parameters, self.max_position_embeddings)
            with torch.no_grad():
                self.inv_freq.copy_(inv_freq)
        return self

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config, layer_idx: int = 0, device=None, dtype=None) -> "MLAttention":
        """Build from a transformers ``DeepseekV3Config`` / ``DeepseekV2Config`` (or a GLM-4.7-Flash, MiniCPM3,
        LongCat-Flash (with its LoRA scales), Youtu or other config with the same fields)."""
        return cls(**config_kwargs(config), layer_idx=layer_idx, device=device, dtype=dtype)

    def refresh_kv_b(self) -> None:
        """Drop the kept dequantized weight of an fp8 ``kv_b_proj`` (transformers' ``FP8Linear``), so the next call
        dequantizes it again. Needed only after editing the weight or its scales through ``.data`` in place
        (``p.data.mul_(...)``), which no version counter sees; writes autograd sees (``copy_`` under
        ``torch.no_grad``, ``load_state_dict``), new Parameters and moves are picked up by themselves."""
        self.__dict__.pop("_kv_b_fp8", None)

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state.pop("_kv_b_fp8", None)  # (weak references, which do not pickle; dequantized again when needed)
        return state

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, q_lora_rank={self.q_lora_rank}, kv_lora_rank={self.kv_lora_rank}, "
                f"nope={self.qk_nope_head_dim}, rope={self.qk_rope_head_dim} ({self.rope_style}), v={self.v_head_dim}, "
                f"softmax_scale={self.softmax_scale:.6g}, layer_idx={self.layer_idx}"
                + (f", latent_scale={self.latent_scale:.6g}" if self.latent_scale != 1.0 else "")
                + (", attention_sinks=True" if self._parameters.get("sinks") is not None else "")
                + (f", split_tokens={self.split_tokens}" if self.split_tokens is not None else ""))

    # -- pieces --------------------------------------------------------------------------------

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin [..., P]`` for integer ``positions [...]`` (transformers' layout ``cat(f, f)``)."""
        freqs = positions[..., None].float() * self.inv_freq.to(device=positions.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.rope_scaling_factor).to(dtype), (emb.sin() * self.rope_scaling_factor).to(dtype)

    def project(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                q_resid: torch.Tensor | None = None, q: torch.Tensor | None = None):
        """Projections and rope for tokens ``hidden_states [..., hidden]``, ``cos``/``sin`` ``[..., P]``.
        ``q_resid``: the query's normalized low-rank projection ``q_a_layernorm(q_a_proj(hidden_states))`` where
        the caller made it already (DeepSeek-V3.2's indexer reads it too). ``q``: the query heads
        ``[..., H, D_nope + P]`` before rope, where the caller projected them itself (A.X-K2's fused query and gate).

        Returns ``q_nope [..., H, D_nope]``, ``q_pe [..., H, P]`` (roped), ``kv_c [..., R]`` (normalized latent),
        ``k_pe [..., P]`` (roped key).
        """
        q_nope, q_pe = self._query_heads(hidden_states, q_resid, q)
        kv = self.kv_a_proj_with_mqa(hidden_states)
        kv_c, k_pe = torch.split(kv, [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        rope_key_norm = self._modules.get("k_rope_only_layernorm")  # dots.llm3's RMSNorm of the rope key, before rope
        if rope_key_norm is not None:
            k_pe = rms_norm(rope_key_norm, k_pe)
        if self.rope_style != "none" and self.qk_rope_head_dim:  # the latent's norm and both ropes: one launch
            q_pe, kv_c, k_pe = norm_and_rope(self.kv_a_layernorm, kv_c, q_pe, k_pe, cos, sin, self.rope_style)
        else:  # (no tables needed without rope: cos/sin may be None)
            kv_c = rms_norm(self.kv_a_layernorm, kv_c)
        if self.latent_scale != 1.0:
            kv_c = kv_c * self.latent_scale
        dtype = q_nope.dtype  # the projections': the weights' dtype, or under torch.autocast its dtype, while the
        if (q_pe.dtype, kv_c.dtype, k_pe.dtype) != (dtype,) * 3:  # norm and the rope tables give fp32 there
            q_pe, kv_c, k_pe = q_pe.to(dtype), kv_c.to(dtype), k_pe.to(dtype)
        return q_nope, q_pe, kv_c, k_pe

    def _query_heads(self, hidden_states: torch.Tensor, q_resid: torch.Tensor | None, q: torch.Tensor | None):
        """``project``'s query heads before rope: ``q_nope [..., H, D_nope]``, ``q_pe [..., H, P]``."""
        if q is None and self.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        elif q is None:
            if q_resid is None:
                q_resid = rms_norm(self.q_a_layernorm, self.q_a_proj(hidden_states))  # one launch on a GPU
            q = self.q_b_proj(q_resid)
        q = q.reshape(*hidden_states.shape[:-1], self.num_heads, self.qk_head_dim)
        return torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

    def project_query(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      q_resid: torch.Tensor | None = None, q: torch.Tensor | None = None):
        """``project``'s query alone, ``q_nope [..., H, D_nope]`` and ``q_pe [..., H, P]`` (roped), for a layer that
        attends over another layer's latent (Mistral Large 4's ``kv_source_layers``: it has no latent projection;
        ``attend`` it with ``kv_c`` and ``k_pe`` None)."""
        q_nope, q_pe = self._query_heads(hidden_states, q_resid, q)
        if self.rope_style != "none" and self.qk_rope_head_dim:
            q_pe = rope(q_pe, cos.unsqueeze(-2), sin.unsqueeze(-2), self.rope_style)
        return q_nope, q_pe.to(q_nope.dtype)

    def _check_cache(self, cache: PagedLatentCache, device: torch.device) -> None:
        """The batch's cache has this module's widths and is on ``device``, the tokens' (else the kernels named their
        internal kv_c/kv_cache, or the rope tables failed inside torch). A module without a rotary part (P = 0)
        also takes a cache of rope layers (a model mixing no-rope layers with rope layers, Mistral Large 4's, keeps
        one cache for all of them): it stores and reads no rope key there, its layer's rope columns stay unused. One
        with ``cache_kv_lora_rank`` / ``cache_rope_dim`` takes a cache of those widths (a model whose layers have
        several, dots.llm3's) and stores and reads its own first ``kv_lora_rank`` / ``qk_rope_head_dim`` columns."""
        if cache.kv_lora_rank != self.cache_latent or self.qk_rope_head_dim and cache.rope_dim != self.cache_rope:
            told = "" if (self.cache_latent, self.cache_rope) == (self.kv_lora_rank, self.qk_rope_head_dim) else \
                f" (for a cache of {self.cache_latent} and {self.cache_rope}: cache_kv_lora_rank, cache_rope_dim)"
            raise ValueError(f"the batch's PagedLatentCache holds kv_lora_rank={cache.kv_lora_rank}, rope_dim="
                             f"{cache.rope_dim}; this module has kv_lora_rank={self.kv_lora_rank}, qk_rope_head_dim="
                             f"{self.qk_rope_head_dim}{told}")
        if cache.device != device:
            raise ValueError(f"the batch's PagedLatentCache is on {cache.device}, the module's tokens (hidden_states, "
                             f"or attend's q_nope) on {device}")

    def attend(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_c: torch.Tensor | None, k_pe: torch.Tensor | None,
               batch: LatentBatch, layer: int | None = None, indices: torch.Tensor | None = None) -> torch.Tensor:
        """Store the new tokens in the cache and attend: packed ``q_nope [T, H, D_nope]``, ``q_pe [T, H, P]``,
        ``kv_c [T, R]``, ``k_pe [T, P]`` in ``batch`` order. Returns ``[T, H, D_v]``.

        Writes ``kv_c``/``k_pe`` to the slots ``batch`` reserved, in cache layer ``layer`` (default
        ``layer_idx``) with ``write_cache`` (quantized when the cache is fp8; both None: nothing is written, the
        layer attends over what another layer wrote to cache layer ``layer`` this step, Mistral Large 4's latents
        shared across layers); then
        ``mla_decode`` (absorbed, ``W_UV`` applied in the call) when every sequence has the same number of new
        tokens, at most ``DECODE_MAX_NEW_TOKENS``, else ``mla_prefill_attention`` with the batch's host lengths
        (no read back from the GPU).

        ``indices [T, K]`` (int32/int64, on the tokens' device): sparse attention (DeepSeek-V3.2's DSA), each new
        token over the cache positions of its sequence its row lists (-1 entries skipped, and positions after the
        token's own): one ``mla_decode(indices=...)`` call in which every token is its own query, whatever the
        step's shape.
        """
        if not isinstance(batch, LatentBatch):
            raise TypeError(f"batch must be a LatentBatch, got {type(batch).__name__}")
        cache = batch.cache
        if not torch.compiler.is_compiling():  # (traced, the version ints would be guarded on: a recompile a step)
            batch.check_current()
        read_only = kv_c is None and k_pe is None  # a layer over another layer's latent: nothing to store
        self._check_attend_shapes(q_nope, q_pe, kv_c, k_pe, batch.num_tokens, read_only)
        self._check_cache(cache, q_nope.device)
        self._check_kv_b()
        self._check_sinks(q_nope, "q_nope")
        dtype = cache.rope_dtype  # the cache's dtype, or for an fp8 cache the dtype it dequantizes to
        if q_nope.dtype != dtype:
            under = " (under torch.autocast, its dtype)" if torch.is_autocast_enabled(q_nope.device.type) else ""
            raise TypeError(f"q_nope is {q_nope.dtype}: the module computes in it{under} but the cache holds {dtype}; build the "
                            f"PagedLatentCache with dtype={q_nope.dtype} (or float8_e4m3fn, rope_dtype={q_nope.dtype})")
        device = q_nope.device
        for name, t in (("q_pe", q_pe),) if read_only else (("q_pe", q_pe), ("kv_c", kv_c), ("k_pe", k_pe)):
            if t.dtype != dtype:
                raise TypeError(f"{name} is {t.dtype} but q_nope and the cache are {dtype}")
            if t.device != device:
                raise ValueError(f"{name} is on {t.device} but q_nope is on {device}")
        total = q_nope.shape[0]
        if indices is not None:  # checked whole before anything is written
            _utils.check_tensor("indices", indices, 2, _utils.INDEX_DTYPES)
            if indices.shape[0] != total:
                raise ValueError(f"indices must be a [T, K] tensor for the T={total} new tokens, got "
                                 f"{tuple(indices.shape)}")
            _utils.check_devices(q_nope=q_nope, indices=indices)
        if torch.is_grad_enabled():  # before the write: a refused call leaves the cache as it was
            if self.kv_b_proj.weight.requires_grad:  # (the kernels would name their inputs made from it)
                raise _utils.GradModeError("MLAttention.attend runs inference kernels without a backward pass and "
                                           "reads kv_b_proj.weight, which requires grad: call it under "
                                           "torch.no_grad() or torch.inference_mode(), or freeze the parameters")
            _utils.check_no_grad("MLAttention.attend", q_nope=q_nope, q_pe=q_pe, kv_c=kv_c, k_pe=k_pe)
        layer = self.layer_idx if layer is None else layer
        if self.split_tokens is not None:  # the splits' bound, before the write (the calls would refuse after it)
            check_split_keys(self.split_tokens, batch.max_seqlen_k if indices is None else indices.shape[1],
                             "the step's longest sequence" if indices is None else "the step's key lists (K)")
        if indices is None:  # a program per sequence on a grid axis: the calls' bound, before the write too
            _utils.check_grid_batch(batch.batch_size, "the step's number of sequences")
        if (self.kv_lora_rank, self.qk_rope_head_dim) == (cache.kv_lora_rank, cache.rope_dim):
            if not read_only:
                cache.write(layer, batch.slots, kv_c.contiguous(), k_pe.contiguous())
            kv_cache, pe_cache, kv_scale = cache.views(layer)
        else:  # a cache wider than the module (_check_cache): no rope part among rope layers, or a narrower latent
            kv_cache, pe_cache, kv_scale = cache.views(layer)  # among wider ones: its own columns, the others unused
            kv_cache, pe_cache = kv_cache[..., :self.kv_lora_rank], pe_cache[..., :self.qk_rope_head_dim]
            if kv_scale is not None:
                kv_scale = kv_scale[..., :self.kv_lora_rank // _utils.FP8_GROUP]
            if not read_only:
                write_cache(kv_c.contiguous(), k_pe.contiguous(), kv_cache, pe_cache, batch.slots, kv_scale=kv_scale)
        if total == 0:
            return q_nope.new_zeros(0, self.num_heads, self.v_head_dim)
        if indices is not None:
            return self._attend_sparse(q_nope, q_pe, kv_cache, pe_cache, kv_scale, batch, indices)
        if batch.uniform is not None and batch.uniform <= DECODE_MAX_NEW_TOKENS:
            s_q = batch.uniform
            q_latent, w_uv = self._absorb(q_nope)
            out = mla_decode(q_latent.reshape(batch.batch_size, s_q, self.num_heads, self.kv_lora_rank),
                             q_pe.reshape(batch.batch_size, s_q, self.num_heads, self.qk_rope_head_dim).contiguous(),
                             kv_cache, pe_cache, batch.block_table, batch.cache_seqlens, self.softmax_scale,
                             causal=True, w_uv=w_uv, max_seqlen_k=batch.max_seqlen_k, kv_scale=kv_scale,
                             split_tokens=self.split_tokens, sinks=self._parameters.get("sinks"))
            return out.reshape(total, self.num_heads, self.v_head_dim)
        from .prefill import mla_prefill_attention

        # Traced, the host lengths would enter the graph as constants (a recompile at every step); the op then reads
        # the lengths from the device itself (one read per layer on a GPU), as without them.
        host = not torch.compiler.is_compiling()
        return mla_prefill_attention(q_nope.contiguous(), q_pe.contiguous(), kv_cache, pe_cache, batch.block_table,
                                     batch.cu_seqlens_q, batch.cache_seqlens, self._kv_b_weight(dtype),
                                     self.softmax_scale, causal=True,
                                     kv_scale=kv_scale, cu_seqlens_q_host=batch.cu_seqlens_q_host if host else None,
                                     cache_seqlens_host=batch.cache_seqlens_host if host else None,
                                     split_tokens=self.split_tokens, sinks=self._parameters.get("sinks"))

    def _check_sinks(self, tokens: torch.Tensor, name: str) -> None:
        """The module's attention sinks, where it has them, fit it (``_utils.check_sinks``): ``sinks [H]``, floating
        point, on the device of ``tokens`` (named ``name`` in the error). Checked at every call before anything is
        reserved or written (one was replaced by one of another shape: it failed inside torch after the step's cache
        write, or a ``[1]`` broadcast silently)."""
        sinks = self._parameters.get("sinks")
        if sinks is not None:
            _utils.check_sinks(sinks, self.num_heads, tokens.device, name)

    def _check_attend_shapes(self, q_nope, q_pe, kv_c, k_pe, total, read_only=False) -> None:
        """``attend``'s tensors shaped for this module and the batch's T new tokens, checked before anything is
        written (a wrong D_nope or H split ``kv_b_proj`` at the wrong place in the prefill path, silently; other
        mismatches failed inside torch after the cache write). ``read_only``: ``kv_c`` and ``k_pe`` None."""
        heads, nope, rope_dim = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim
        expected = ((total, heads, nope), (total, heads, rope_dim), (total, self.kv_lora_rank), (total, rope_dim))
        names, given = ("q_nope", "q_pe", "kv_c", "k_pe"), (q_nope, q_pe, kv_c, k_pe)
        if read_only:
            names, given, expected = names[:2], given[:2], expected[:2]
        else:
            try:  # every layer of every step: one comparison; the messages below only on failure
                if (q_nope.shape, q_pe.shape, kv_c.shape, k_pe.shape) == expected \
                        and isinstance(q_nope, torch.Tensor) and isinstance(q_pe, torch.Tensor) \
                        and isinstance(kv_c, torch.Tensor) and isinstance(k_pe, torch.Tensor):  # (numpy has shapes too)
                    return
            except AttributeError:  # not a tensor: named below
                pass
        for name, t, shape in zip(names, given, expected):
            _utils.check_tensor(name, t, len(shape))
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape} (T={total}, the batch's new tokens, and this "
                                 f"module's widths), got {tuple(t.shape)}")

    def _kv_b_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """``kv_b_proj.weight`` in the queries' ``dtype``: itself, or under ``torch.autocast`` a cast copy (the kernels
        take one dtype; autocast casts the other projections' weights as they run), or an fp8 ``FP8Linear``'s
        weight dequantized (``_kv_b_dequantized``)."""
        w = self.kv_b_proj.weight
        if w.dtype == dtype:
            return w
        return self._kv_b_dequantized(dtype) if holds_fp8_weight(self.kv_b_proj) else w.to(dtype)

    def _kv_b_dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """An fp8 ``kv_b_proj`` (transformers' ``FP8Linear``, ``check_kv_b_proj`` has vouched for it) dequantized
        into ``dtype`` (``dequantize_fp8_weight``). Eager calls keep it until the weight or its scales change: the
        same tensors, at the same addresses, with the same version counters (an in-place write bumps them; a
        reload through ``load_state_dict`` copies in place) and block size (``_fp8_kept``); an edit through
        ``.data`` bumps no counter (``refresh_kv_b``). The tensors are held weakly: a replaced weight is freed, and
        its copy at the next call. A compiled step dequantizes in its graph (a version counter is no value dynamo
        can guard on); inference tensors have no counter: dequantized per call."""
        kv_b = self.kv_b_proj
        kept = self._fp8_kept(kv_b, dtype)
        if kept is not None:
            return kept
        w, s, block = kv_b.weight, kv_b.weight_scale_inv, kv_b.block_size
        if torch.compiler.is_compiling() or w.is_inference() or s.is_inference():
            return dequantize_fp8_weight(w, s, block, dtype)
        with torch.no_grad():
            weight = dequantize_fp8_weight(w, s, block, dtype)
        key = (w._version, s._version, w.data_ptr(), s.data_ptr(), None if block is None else tuple(block), dtype)
        # a plain attribute: no buffer, so not in the state dict, and not moved by .to() (the key's address is)
        self.__dict__["_kv_b_fp8"] = (weakref.ref(w), weakref.ref(s), key, weight)
        return weight

    def _fp8_kept(self, kv_b: nn.Module, dtype: torch.dtype | None) -> torch.Tensor | None:
        """The kept dequantized weight of ``kv_b`` (an FP8Linear) if it is current (in ``dtype``, or any with
        None), else None; eagerly only (traced, the graph dequantizes)."""
        held = self.__dict__.get("_kv_b_fp8")
        if held is None or torch.compiler.is_compiling():
            return None
        w, s = kv_b._parameters.get("weight"), kv_b._parameters.get("weight_scale_inv")
        if held[0]() is not w or held[1]() is not s:
            return None
        key, block = held[2], kv_b.block_size
        if key[0] != w._version or key[1] != s._version or key[2] != w.data_ptr() or key[3] != s.data_ptr() \
                or key[4] != (None if block is None else tuple(block)) or (dtype is not None and key[5] != dtype):
            return None
        return held[3]

    def _check_kv_b(self) -> None:
        """``check_kv_b_proj`` at every call, before anything is written (a class test and three attribute reads on
        the common path): an adapter or a hook added to ``kv_b_proj`` after the module was built would be
        bypassed. An FP8Linear whose kept dequantized weight is current was checked when it was dequantized."""
        kv_b = self.kv_b_proj
        plain = kv_b.__class__ is nn.Linear
        if (plain or is_fp8_linear(kv_b)) and not kv_b._forward_hooks and not kv_b._forward_pre_hooks \
                and kv_b.bias is None and (plain or self._fp8_kept(kv_b, None) is not None):
            return
        check_kv_b_proj(kv_b, "kv_b_proj")

    def _kv_b_split(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``kv_b_proj.weight`` (in ``dtype``, ``_kv_b_weight``) as ``(w_uk [H, D_nope, R], w_uv [H, D_v, R])``
        views: the key half absorbed into the query, the value half applied to the latent output."""
        w = self._kv_b_weight(dtype).view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, :self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]

    def _absorb(self, q_nope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed ``q_nope [T, H, D_nope]`` moved into latent space: ``(q_latent [T, H, R], w_uv)``, one batched GEMM
        over the heads."""
        w_uk, w_uv = self._kv_b_split(q_nope.dtype)
        return torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1), w_uv

    def _attend_sparse(self, q_nope, q_pe, kv_cache, pe_cache, kv_scale, batch: LatentBatch,
                       indices: torch.Tensor) -> torch.Tensor:
        """``attend``'s sparse step: token t (of sequence ``rows[t]``, at position ``positions[t]``) is query 0 of a
        one-token "sequence" of ``positions[t] + 1`` cache tokens with its sequence's block table row, so prompt
        and decode steps of any shape run as one ``mla_decode(indices=...)`` call. Built on the device: no read."""
        total = q_nope.shape[0]
        rows = torch.repeat_interleave(torch.arange(batch.batch_size, device=q_nope.device),
                                       batch.cu_seqlens_q.diff(), output_size=total)
        q_latent, w_uv = self._absorb(q_nope)
        # a position after the token's own is skipped (as documented): -1 here, since to mla_decode, whose sequence
        # here ends at the token, it would lie past the sequence (refused on the CPU, skipped on a GPU)
        indices = indices.masked_fill(indices > batch.positions[:, None], -1)
        out = mla_decode(q_latent.unsqueeze(1), q_pe.contiguous().unsqueeze(1), kv_cache, pe_cache,
                         batch.block_table.index_select(0, rows), (batch.positions + 1).to(torch.int32),
                         self.softmax_scale, causal=True, w_uv=w_uv, max_seqlen_k=batch.max_seqlen_k,
                         kv_scale=kv_scale, indices=indices.unsqueeze(1), split_tokens=self.split_tokens,
                         sinks=self._parameters.get("sinks"))
        return out.reshape(total, self.num_heads, self.v_head_dim)

    # -- forward -------------------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor, batch: LatentBatch,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """One step of attention over the paged latent cache.

        Args:
            hidden_states: ``[T, hidden]`` the step's new tokens packed sequence after sequence in ``batch``
                order, or ``[B, S, hidden]`` when every sequence of ``batch`` has S new tokens.
            batch: the step's ``LatentBatch`` (from ``LatentBatch.reserve``), shared by every layer.
            position_embeddings: optional ``(cos, sin)`` ``[T, P]`` (or ``[B, S, P]``); by default computed from
                ``batch.positions`` with this module's (YaRN) rotary embedding.

        Returns the attention output after ``o_proj``, shaped like ``hidden_states``.
        """
        _utils.check_tensor("hidden_states", hidden_states)
        if not isinstance(batch, LatentBatch):
            raise TypeError(f"batch must be a LatentBatch, got {type(batch).__name__}")
        if hidden_states.dim() not in (2, 3):  # (before shape[-1]: a 0-dim tensor raised an IndexError)
            raise ValueError(f"hidden_states must be [T, hidden] or [B, S, hidden], got shape "
                             f"{tuple(hidden_states.shape)}")
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states must end in hidden_size={self.hidden_size}, got shape "
                             f"{tuple(hidden_states.shape)}")
        if hidden_states.dim() == 3:
            b, s = hidden_states.shape[:2]
            if b != batch.batch_size or (b and batch.uniform != s):  # (uniform: no loop over the list of counts)
                raise ValueError(f"hidden_states [B, S, hidden] = {tuple(hidden_states.shape)} needs a batch of B={b} "
                                 f"sequences with S={s} new tokens each; batch has {batch.num_new_tokens}")
        lead = hidden_states.shape[:-1]
        flat = hidden_states.reshape(-1, self.hidden_size)
        if flat.shape[0] != batch.num_tokens:
            raise ValueError(f"hidden_states has {flat.shape[0]} tokens but batch reserved {batch.num_tokens}")
        _check_hidden_states(self, flat)
        _check_inference(self, flat)
        self._check_cache(batch.cache, flat.device)  # before the rope tables, made from batch.positions on its device
        if position_embeddings is None:
            cos, sin = self.rotary(batch.positions, flat.dtype)
        else:
            cos, sin = _check_rope_tables(position_embeddings, flat.shape[0], self.qk_rope_head_dim, flat)
        q_nope, q_pe, kv_c, k_pe = self.project(flat, cos, sin)
        out = self.attend(q_nope, q_pe, kv_c, k_pe, batch)
        return self.o_proj(out.reshape(*lead, self.num_heads * self.v_head_dim))


# transformers' FP8Linear (``transformers.integrations.finegrained_fp8``), in which DeepSeek-V3's released
# checkpoints load on a GPU: float8_e4m3fn weights, one scale per 128 x 128 block (``weight_scale_inv``, a factor
# despite its name), which its forward multiplies back in; the kernels take the weight dequantized the same way
_FP8_LINEAR = ("transformers.integrations.finegrained_fp8", "FP8Linear")
FP8_WEIGHT_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2")
                          if hasattr(torch, n))


def is_fp8_linear(module: nn.Module) -> bool:
    """Is ``module`` transformers' ``FP8Linear`` (its own class, not a subclass with another forward)?"""
    cls = type(module)
    return (cls.__module__, cls.__name__) == _FP8_LINEAR


def holds_fp8_weight(kv_b: nn.Module) -> bool:
    """Is ``kv_b`` an ``FP8Linear`` whose weight is fp8 (not one already holding a float weight, which its forward
    then uses as a plain Linear would)?"""
    return kv_b.weight.element_size() == 1 and is_fp8_linear(kv_b)


def dequantize_fp8_weight(weight: torch.Tensor, scale_inv: torch.Tensor, block_size, dtype: torch.dtype
                          ) -> torch.Tensor:
    """``weight [N, K]`` (fp8) times its scales, one per ``block_size = (rows, cols)`` block (the last ones may be
    partial) or one for all (``block_size`` None), as DeepSeek's ``weight_dequant`` and FP8Linear's forward compute
    it, in ``dtype``: each product in float32 (as FP8Linear's GEMMs apply the scales; exact for a ue8m0 scale), then
    rounded to ``dtype``. (transformers' own dequantization multiplies in ``dtype``, rounding a float32 scale to
    bf16 first: up to 2^-9 off for a whole block.)"""
    w = weight.to(torch.float32)
    s = scale_inv.to(torch.float32)
    if block_size is not None:
        rows, cols = w.shape
        s = s.repeat_interleave(block_size[0], 0)[:rows].repeat_interleave(block_size[1], 1)[:, :cols]
    return (w * s).to(dtype)


def _check_fp8_linear(kv_b: nn.Module, name: str) -> None:
    """An FP8Linear ``kv_b_proj`` whose weight the kernels can take: fp8 with well-formed scales, or a weight
    already in a float dtype (its forward is then ``F.linear``, the scales unused)."""
    weight = kv_b.weight
    if weight.dtype in _utils.FLOAT_DTYPES:
        return
    if weight.dtype not in FP8_WEIGHT_DTYPES:
        packed = " (packed FP4?)" if weight.dtype in (torch.int8, torch.uint8) else ""
        raise TypeError(f"{name} is an FP8Linear with {weight.dtype} weights{packed}: the kernels take fp8 or "
                        f"{', '.join(str(d) for d in _utils.FLOAT_DTYPES)} weights; dequantize it first")
    scale, block = getattr(kv_b, "weight_scale_inv", None), getattr(kv_b, "block_size", None)
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point():
        got = f"a {scale.dtype} tensor" if isinstance(scale, torch.Tensor) else type(scale).__name__
        hint = " (ue8m0 scales stored as bytes: .view(torch.float8_e8m0fnu))" if got == "a torch.uint8 tensor" else ""
        raise TypeError(f"{name} is an FP8Linear whose weight_scale_inv must be a floating-point tensor (float32, "
                        f"bfloat16 or float8_e8m0fnu), got {got}{hint}")
    if scale.device != weight.device:
        raise ValueError(f"{name}'s weight_scale_inv is on {scale.device} but its weight on {weight.device}: move "
                         f"them to one device")
    rows, cols = weight.shape
    if block is None:
        expected = ()
    elif (isinstance(block, (tuple, list)) and len(block) == 2
          and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        expected = (-(-rows // block[0]), -(-cols // block[1]))
    else:
        raise TypeError(f"{name} is an FP8Linear with block_size {block!r}: expected None or two positive ints")
    if tuple(scale.shape) != expected and not (block is None and scale.numel() == 1):
        raise ValueError(f"{name}'s weight_scale_inv has shape {tuple(scale.shape)}, but its {rows} x {cols} weight "
                         f"in blocks of {block} needs {expected}")


def check_kv_b_proj(kv_b: nn.Module, name: str) -> None:
    """Refuse a ``kv_b_proj`` the kernels can't stand in for: they read its weight directly and never call it, so
    anything its call would do (an adapter's forward, a bias, forward hooks) would be silently skipped.
    transformers' ``FP8Linear`` is taken (its weight dequantized by its block scales, as its forward does)."""
    fp8 = is_fp8_linear(kv_b)
    if not isinstance(kv_b, nn.Linear) or (type(kv_b).forward is not nn.Linear.forward and not fp8):
        raise TypeError(f"{name} is a {type(kv_b).__name__}, not a torch.nn.Linear (or transformers' FP8Linear): "
                        f"the kernels read its weight directly, so a wrapped or adapted kv_b_proj (LoRA, its own "
                        f"forward) would be bypassed; merge it into a plain Linear first")
    if kv_b.bias is not None:
        raise TypeError(f"{name} has a bias, which the kernels would drop: they apply its weight only, absorbed "
                        f"into the queries and the output (MLA's kv_b_proj has none; attention_bias adds biases to "
                        f"the other projections)")
    if fp8:
        _check_fp8_linear(kv_b, name)
    if kv_b._forward_hooks or kv_b._forward_pre_hooks:
        raise ValueError(f"{name} has forward hooks, which would never run: the kernels read its weight directly "
                         f"and never call it; remove them (a hook on the attention module sees its output; "
                         f"torch.nn.utils.prune's: prune.remove(kv_b_proj, 'weight') makes the pruning permanent)")


def check_split_keys(split_tokens: int, keys: int, what: str) -> None:
    """A module's ``split_tokens`` against the ``keys`` of a step (``what`` names them), before the step writes the
    cache: ``decode.check_split_count``, with the module's way out."""
    check_split_count(split_tokens, keys, f"{what} ({keys} keys)",
                      "set a larger split_tokens (attn.split_tokens, or patch_model(split_tokens=...))")


def _check_rope_tables(position_embeddings, num_tokens: int, rope_dim: int,
                       hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each with ``num_tokens * rope_dim`` values ending in ``rope_dim``, as ``[T, P]`` in the
    dtype of ``hidden_states`` (as transformers hands them over; float32 tables for a bf16 module failed later, naming
    the internal k_pe) and on its device."""
    if not isinstance(position_embeddings, (tuple, list)) or len(position_embeddings) != 2:
        raise TypeError(f"position_embeddings must be a (cos, sin) pair, got {type(position_embeddings).__name__}")
    tables = []
    for name, t in zip(("cos", "sin"), position_embeddings):
        _utils.check_tensor(f"position_embeddings {name}", t)
        if t.dim() < 1 or t.shape[-1] != rope_dim or t.numel() != num_tokens * rope_dim:
            raise ValueError(f"position_embeddings {name} must be [T, P] (or [B, S, P]) for T={num_tokens} tokens and "
                             f"P={rope_dim}, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"position_embeddings {name} must be floating point, got {t.dtype}")
        if t.device != hidden_states.device:
            raise ValueError(f"position_embeddings {name} is on {t.device} but hidden_states is on "
                             f"{hidden_states.device}")
        tables.append(t.reshape(num_tokens, rope_dim).to(hidden_states.dtype))
    return tables[0], tables[1]


def _check_hidden_states(module: nn.Module, hidden_states: torch.Tensor) -> None:
    """``hidden_states`` in the module's dtype and on its device (the projections would fail deep inside
    ``nn.Linear`` otherwise)."""
    weight = module.kv_b_proj.weight
    dtype = compute_dtype(module)
    if hidden_states.dtype != dtype:
        if holds_fp8_weight(module.kv_b_proj):  # module.to(dtype) would cast that weight, not scale it
            raise TypeError(f"hidden_states is {hidden_states.dtype} but the module computes in {dtype}: convert "
                            f"hidden_states.to({dtype}) (its kv_b_proj is fp8: module.to(dtype) would cast that "
                            f"weight without its scales)")
        raise TypeError(f"hidden_states is {hidden_states.dtype} but the module computes in {dtype}: convert "
                        f"one of them (hidden_states.to({dtype}) or module.to(...))")
    if hidden_states.device != weight.device:
        raise ValueError(f"hidden_states is on {hidden_states.device} but the module is on {weight.device}")


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype an MLA module computes in: its ``kv_b_proj`` weight's, or where that weight is fp8 (an
    ``FP8Linear``) its latent norm's, which an fp8 checkpoint keeps in the model's dtype."""
    kv_b = module.kv_b_proj
    if not holds_fp8_weight(kv_b):
        return kv_b.weight.dtype
    norm = getattr(module, "kv_a_layernorm", None)  # (none in a layer over another layer's latent: its query's)
    return (norm if norm is not None else getattr(module, "q_a_layernorm", None) or module.q_proj).weight.dtype


def _check_inference(module: nn.Module, hidden_states: torch.Tensor) -> None:
    """Refuse a call that autograd would need to go through: the kernels' outputs are detached from their inputs."""
    if torch.is_grad_enabled() and (hidden_states.requires_grad or any(p.requires_grad for p in module.parameters())):
        raise _utils.GradModeError("MLAttention runs inference kernels without a backward pass: call it under "
                                   "torch.no_grad() or torch.inference_mode(), or freeze its parameters and detach "
                                   "hidden_states")


def config_kwargs(config) -> dict:
    """MLAttention's constructor arguments from a transformers DeepSeek config."""
    missing = [name for name in ("hidden_size", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
                                 "qk_rope_head_dim", "v_head_dim") if getattr(config, name, None) is None]
    if missing:
        raise ValueError(f"config lacks the MLA fields {missing}: is it a DeepSeek-V2/V3 config?")
    rope = getattr(config, "rope_parameters", None)
    if rope is None:
        rope = dict(getattr(config, "rope_scaling", None) or {})
        rope.setdefault("rope_type", rope.pop("type", "default"))
        rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    model_type = getattr(config, "model_type", "")
    if model_type == "deepseek_v2":  # rope as complex multiplication of adjacent pairs
        style = "pairs"
    elif model_type == "minicpm3":  # MiniCPM3: DeepSeek-V2's attention with the rotate-half rope
        style = "half"
    elif model_type in ("kimi_linear", "glm5_next_text"):  # Kimi-Linear's, GLM-5.3-Flash's MLA: no positional
        # encoding (NoPE; GLM-5.3-Flash's config has no rope part, Kimi-Linear's one its attention never rotates)
        style = "none"
    elif model_type in ("longcat_flash", "bailing_hybrid", "deepseek_v32", "glm_moe_dsa", "axk2", "hy_v4",
                        "hy_v4_vl_text", "mistral_large4_text", "dots3_note_text"):
        # their attention interleaves, whatever the config says (V3.2's config drops V3's rope_interleave, but a
        # rope_interleave=False given to it is still stored)
        style = "interleave"
    else:
        style = "interleave" if getattr(config, "rope_interleave", True) else "half"
    if model_type == "mistral4" and "partial_rotary_factor" in rope:
        # Mistral 4's factor is the rope's share of the whole query head (nope + rope): its rotary embedding turns
        # all qk_rope_head_dim values, which is what the module's factor (a share of the rope part) of 1 means
        rope = {k: v for k, v in rope.items() if k != "partial_rotary_factor"}
    extra = {}
    if model_type == "longcat_flash":  # LoRA scales on the query and the latent (its attention's mla_scale_*_lora)
        extra = dict(query_scale=(config.hidden_size / config.q_lora_rank) ** 0.5,
                     latent_scale=(config.hidden_size / config.kv_lora_rank) ** 0.5)
    if model_type in ("hy_v4", "hy_v4_vl_text"):  # Hy4's attention sinks (a learned logit per head)
        extra["attention_sinks"] = True
    return dict(**extra, hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
                kv_lora_rank=config.kv_lora_rank, qk_nope_head_dim=config.qk_nope_head_dim,
                qk_rope_head_dim=config.qk_rope_head_dim, v_head_dim=config.v_head_dim,
                q_lora_rank=getattr(config, "q_lora_rank", None), rope_parameters=dict(rope), rope_style=style,
                attention_bias=bool(getattr(config, "attention_bias", False)),
                max_position_embeddings=getattr(config, "max_position_embeddings", 4096))
