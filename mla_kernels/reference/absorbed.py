"""Absorbed MLA over the paged latent cache (DeepSeek-V3 inference code, absorb mode).

The key's nope part is W_UK @ c and the value is W_UV @ c for the latent c, so
q_nope . k_nope = (q_nope W_UK) . c: the query is moved into latent space once and
attention runs directly over the cached latent; the output, still in latent space,
is moved out through W_UV at the end.
"""

from __future__ import annotations

import torch


def split_kv_b(w_kv_b, heads, d_nope, d_v):
    """transformers' kv_b_proj.weight [H*(D_nope+D_v), R] -> (w_uk [H, D_nope, R], w_uv [H, D_v, R])."""
    w = w_kv_b.view(heads, d_nope + d_v, -1)
    return w[:, :d_nope], w[:, d_nope:]


def absorb_query(q_nope, w_uk):
    """q_nope [..., H, D_nope] -> [..., H, R]: the query moved into latent space."""
    return torch.einsum("...hd,hdr->...hr", q_nope, w_uk)


def gather_paged(cache, block_ids, length):
    """The first ``length`` tokens of one sequence: cache [N, page, D], block_ids [max_blocks] -> [length, D]."""
    page = cache.shape[1]
    positions = torch.arange(length, device=cache.device)
    blocks = block_ids.long()[positions // page]
    if cache.dtype == torch.float8_e4m3fn:  # through its bytes: torch 2.6's CPU index has no fp8 kernel
        return cache.view(torch.uint8)[blocks, positions % page].view(cache.dtype)
    return cache[blocks, positions % page]


def _attend_latent(q_nope, q_pe, kv, pe, softmax_scale, causal):
    """One sequence in latent space: q_nope [S, H, R], q_pe [S, H, P], kv [L, R], pe [L, P]."""
    s_q, length = q_nope.shape[0], kv.shape[0]
    scores = (torch.einsum("shr,lr->shl", q_nope, kv) + torch.einsum("shp,lp->shl", q_pe, pe)) * softmax_scale
    if causal:
        q_pos = torch.arange(s_q, device=kv.device) + (length - s_q)
        hidden = torch.arange(length, device=kv.device)[None, :] > q_pos[:, None]  # [S, L]
        scores = scores.masked_fill(hidden[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [S, H]
    # rows that see no key (lse -inf) give zeros; a NaN score (a NaN in the cache) makes its row NaN
    probs = torch.where(torch.isneginf(lse)[..., None], 0.0, torch.exp(scores - lse[..., None]))
    return torch.einsum("shl,lr->shr", probs, kv), lse


def _sink_share(lse, sinks):
    """``exp(lse) / (exp(lse) + exp(sinks[h]))`` per row ``[..., H]``: the share of the softmax a row's keys keep
    beside a key of value zero and logit ``sinks[h]`` (attention sinks), as ``exp(lse - logaddexp(lse, sink))``.
    A row with no key and a sink of -inf keeps 0 (its output is zeros); a NaN sink gives NaN, as the formula."""
    sinks = sinks.to(device=lse.device, dtype=lse.dtype).expand_as(lse)
    share = torch.exp(lse - torch.logaddexp(lse, sinks))
    return share.masked_fill(torch.isneginf(lse) & torch.isneginf(sinks), 0.0)


def absorbed_decode(q_nope, q_pe, kv_cache, pe_cache, block_table, cache_seqlens, softmax_scale,
                    causal=True, w_uv=None, dtype=torch.float64, sinks=None):
    """Reference for ``mla_kernels.mla_decode``, computed in ``dtype``.

    q_nope [B, S_q, H, R] (absorbed), q_pe [B, S_q, H, P], kv_cache [N, page, R], pe_cache [N, page, P],
    block_table [B, max_blocks], cache_seqlens [B]; w_uv [H, D_v, R] optional; sinks [H] optional (attention
    sinks: each row's output times its keys' share beside the sink, ``_sink_share``; lse stays the keys' own).
    Returns (out [B, S_q, H, R or D_v], lse [B, S_q, H]) in ``dtype``.
    """
    batch, s_q, heads, _ = q_nope.shape
    out = torch.zeros(*q_nope.shape, dtype=dtype, device=q_nope.device)
    lse = torch.full((batch, s_q, heads), float("-inf"), dtype=dtype, device=q_nope.device)
    for b in range(batch):
        length = int(cache_seqlens[b])
        if length == 0:
            continue
        kv = gather_paged(kv_cache, block_table[b], length).to(dtype)
        pe = gather_paged(pe_cache, block_table[b], length).to(dtype)
        out[b], lse[b] = _attend_latent(q_nope[b].to(dtype), q_pe[b].to(dtype), kv, pe, softmax_scale, causal)
    if sinks is not None:
        out = out * _sink_share(lse, sinks)[..., None]
    if w_uv is not None:
        out = torch.einsum("bshr,hvr->bshv", out, w_uv.to(dtype))
    return out, lse


def absorbed_prefill(q_nope, q_pe, kv_cache, pe_cache, block_table, cu_seqlens_q, cache_seqlens, softmax_scale,
                     causal=True, dtype=torch.float64, sinks=None):
    """Reference for ``mla_kernels.mla_prefill``: packed rows q_nope [T, H, R], q_pe [T, H, P].

    Sequence b owns rows cu_seqlens_q[b]:cu_seqlens_q[b+1]; its new tokens are the last of its
    cache_seqlens[b] cached tokens. ``sinks [H]``: as ``absorbed_decode``'s. Returns (out [T, H, R], lse [T, H])
    in ``dtype``.
    """
    out = torch.zeros(*q_nope.shape, dtype=dtype, device=q_nope.device)
    lse = torch.full(q_nope.shape[:2], float("-inf"), dtype=dtype, device=q_nope.device)
    for b in range(block_table.shape[0]):
        start, end = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        length = int(cache_seqlens[b])
        if end == start or length == 0:
            continue
        kv = gather_paged(kv_cache, block_table[b], length).to(dtype)
        pe = gather_paged(pe_cache, block_table[b], length).to(dtype)
        out[start:end], lse[start:end] = _attend_latent(
            q_nope[start:end].to(dtype), q_pe[start:end].to(dtype), kv, pe, softmax_scale, causal)
    if sinks is not None:
        out = out * _sink_share(lse, sinks)[..., None]
    return out, lse


def sparse_decode(q_nope, q_pe, kv_cache, pe_cache, block_table, cache_seqlens, indices, softmax_scale,
                  causal=True, w_uv=None, dtype=torch.float64, sinks=None):
    """Reference for ``mla_kernels.mla_decode(..., indices=...)``: sparse attention (DeepSeek-V3.2's DSA).

    New token s of sequence b attends only to the cache positions listed in ``indices[b, s]`` ([B, S_q, K]);
    negative entries are unused, and with ``causal`` so are positions after the token's own
    (``cache_seqlens[b] - S_q + s``). Each occurrence counts: a repeated entry counts as often as it appears. A
    token with no usable entry gives zeros and lse -inf. Other arguments as ``absorbed_decode``. Returns (out, lse) in
    ``dtype``.
    """
    batch, s_q, heads, _ = q_nope.shape
    out = torch.zeros(*q_nope.shape, dtype=dtype, device=q_nope.device)
    lse = torch.full((batch, s_q, heads), float("-inf"), dtype=dtype, device=q_nope.device)
    for b in range(batch):
        length = int(cache_seqlens[b])
        kv = gather_paged(kv_cache, block_table[b], length).to(dtype)  # the whole sequence, then its listed rows
        pe = gather_paged(pe_cache, block_table[b], length).to(dtype)
        for s in range(s_q):
            last = length - s_q + s if causal else length - 1
            keys = [p for p in indices[b, s].tolist() if 0 <= p <= last]  # (one copy to the host per token)
            if not keys:
                continue
            rows = torch.tensor(keys, device=kv.device)
            # one new token over its own keys, without a causal mask (the list is already cut at its position)
            o, l = _attend_latent(q_nope[b, s:s + 1].to(dtype), q_pe[b, s:s + 1].to(dtype), kv[rows], pe[rows],
                                  softmax_scale, causal=False)
            out[b, s], lse[b, s] = o[0], l[0]
    if sinks is not None:
        out = out * _sink_share(lse, sinks)[..., None]
    if w_uv is not None:
        out = torch.einsum("bshr,hvr->bshv", out, w_uv.to(dtype))
    return out, lse


def merge_states(out_a, lse_a, out_b, lse_b, dtype=torch.float64):
    """Reference for ``mla_kernels.merge_attention_states``, in ``dtype``: the attention over two disjoint key sets
    from each one's output ``[..., H, D]`` and lse ``[..., H]`` (natural log). Each state is weighted by its share of
    the softmax sum, ``e^lse_x / (e^lse_a + e^lse_b)``; a state that saw no key (lse -inf, or FlashMLA's mark +inf)
    has weight 0 and adds nothing, a row that saw none in either gives zeros and lse -inf, and a NaN lse gives a NaN row. Returns ``(out, lse)`` in ``dtype``."""
    # +inf: FlashMLA's mark of a row that saw no key, as -inf is ours
    lse_a, lse_b = (torch.where(x == float("inf"), float("-inf"), x.to(dtype)) for x in (lse_a, lse_b))
    lse = torch.logaddexp(lse_a, lse_b)  # log(e^a + e^b); -inf when both are
    seen = lse > float("-inf")
    w_a = torch.where(seen, torch.exp(lse_a - torch.where(seen, lse, 0.0)), 0.0)
    w_b = torch.where(seen, torch.exp(lse_b - torch.where(seen, lse, 0.0)), 0.0)
    a = torch.where((w_a > 0)[..., None], out_a.to(dtype) * w_a[..., None], 0.0)  # (a keyless state's NaN: unread)
    b = torch.where((w_b > 0)[..., None], out_b.to(dtype) * w_b[..., None], 0.0)
    return torch.where(lse.isnan()[..., None], float("nan"), a + b), lse  # a NaN lse: the row is NaN
