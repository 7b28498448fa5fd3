"""Naive (decompressed) MLA: the latent is expanded through kv_b_proj into per-head K and V."""

from __future__ import annotations

import torch


def naive_attention(q, k, v, softmax_scale, causal=True):
    """Standard multi-head attention for one sequence, queries at the end of the keys.

    q: [S_q, H, D_qk], k: [L, H, D_qk], v: [L, H, D_v]. Query i sits at position L - S_q + i and,
    with ``causal``, sees keys up to that position. Returns (out [S_q, H, D_v], lse [S_q, H]);
    rows that see no key give zeros and lse = -inf.
    """
    s_q, length = q.shape[0], k.shape[0]
    scores = torch.einsum("qhd,khd->hqk", q, k) * softmax_scale  # [H, S_q, L]
    visible = torch.ones(s_q, length, dtype=torch.bool, device=q.device)
    if causal:
        q_pos = torch.arange(s_q, device=q.device) + (length - s_q)
        visible = torch.arange(length, device=q.device)[None, :] <= q_pos[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [H, S_q]
    # rows with no key (lse -inf): all zeros; a NaN score (a NaN in the cache) makes its row NaN
    probs = torch.where(torch.isneginf(lse)[..., None], 0.0, torch.exp(scores - lse[..., None]))
    out = torch.einsum("hqk,khd->qhd", probs, v)
    return out, lse.transpose(0, 1)


def naive_mla(q_nope, q_pe, kv_c, k_pe, w_kv_b, softmax_scale, causal=True):
    """MLA for one sequence the way transformers' DeepSeek attention computes it.

    q_nope: [S_q, H, D_nope] (not absorbed), q_pe: [S_q, H, P] (roped),
    kv_c: [L, R] normalized latent, k_pe: [L, P] roped key shared by all heads,
    w_kv_b: [H * (D_nope + D_v), R], transformers' ``kv_b_proj.weight``.
    Returns (out [S_q, H, D_v], lse [S_q, H]).
    """
    heads, d_nope = q_nope.shape[1], q_nope.shape[2]
    kv = (kv_c @ w_kv_b.T).view(kv_c.shape[0], heads, -1)  # [L, H, D_nope + D_v]
    k_nope, v = kv[..., :d_nope], kv[..., d_nope:]
    k = torch.cat([k_nope, k_pe[:, None, :].expand(-1, heads, -1)], dim=-1)
    q = torch.cat([q_nope, q_pe], dim=-1)
    return naive_attention(q, k, v, softmax_scale, causal)
