"""Attention sinks (``sinks=``) on the attention calls: ``mla_decode`` (dense, split, sparse, with ``w_uv``),
``mla_prefill`` and ``mla_prefill_attention`` (both paths), against the PyTorch references with their sinks.

A sink is a learned logit per head that joins each row's softmax as one more key whose value is zero (gpt-oss's,
Hy4's; FlashMLA's ``attn_sink``): the output is scaled by ``exp(lse) / (exp(lse) + exp(sink))``, the returned lse
stays the keys' own. The calls apply it after the kernels (``merge.apply_sink``, ``sigmoid(lse - sink)`` in
float32); the references as ``exp(lse - logaddexp(lse, sink))`` in float64. Sinks are drawn at std 2 around the
scores' log-sum, so they move the outputs far past the tolerances (a call that drops them fails).
"""

from __future__ import annotations

import pytest
import torch

import mla_kernels
from mla_kernels import reference
from helpers import assert_close, assert_lse_close
from test_decode import SCALE, make_inputs as decode_inputs
from test_prefill import D_NOPE, LSE_ATOL_ROUNDED_Q, SCALE as PREFILL_SCALE, make_inputs as prefill_inputs

inf, nan = float("inf"), float("nan")


def sinks_for(heads: int, device, special: bool = False) -> torch.Tensor:
    """``[heads]`` float32 sinks at std 2 (around lse ~3-6 here); with ``special`` the first three are -inf (no
    sink), +inf (takes every row's whole softmax: zeros) and 0."""
    sinks = torch.randn(heads, generator=torch.Generator().manual_seed(heads)) * 2 + 3
    if special:
        sinks[:3] = torch.tensor([-inf, inf, 0.0])
    return sinks.to(device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("mode", ["dense", "split", "w_uv", "sparse", "special"])
def test_decode_with_sinks(mode, dtype, device, poisoned_empty):
    lens, s_q, heads = [17, 33, 0], 2, 4  # (a padding slot: zeros whatever its sink)
    q_nope, q_pe, kv_cache, pe_cache, table, seqlens = decode_inputs(lens, s_q, heads, 16, dtype, device, r=64,
                                                                     p=16)
    sinks = sinks_for(heads, device, special=mode == "special")
    kw, ref_kw = {}, {}
    if mode == "split":
        kw = dict(num_splits=3)
    if mode == "w_uv":
        w_uv = torch.randn(heads, 32, 64, generator=torch.Generator().manual_seed(1)).to(dtype=dtype, device=device)
        kw = ref_kw = dict(w_uv=w_uv / 8)
    if mode == "sparse":
        g = torch.Generator().manual_seed(2)
        indices = torch.randint(-1, 17, (3, s_q, 6), generator=g, dtype=torch.int32)
        indices = indices.masked_fill(indices >= torch.tensor(lens)[:, None, None], -1).to(device)  # (its own)
        out, lse = mla_kernels.mla_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE, return_lse=True,
                                          indices=indices, sinks=sinks)
        ref_out, ref_lse = reference.sparse_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, indices,
                                                   SCALE, sinks=sinks)
    else:
        out, lse = mla_kernels.mla_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE, return_lse=True,
                                          sinks=sinks, **kw)
        ref_out, ref_lse = reference.absorbed_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE,
                                                     sinks=sinks, **ref_kw)
    assert_close(f"decode {mode}", out, ref_out, dtype)
    assert_lse_close(f"decode {mode}", lse, ref_lse)  # the keys' own
    alone = mla_kernels.mla_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE, sinks=sinks, **kw,
                                   **({"indices": indices} if mode == "sparse" else {}))
    assert torch.equal(alone, out)  # without return_lse, the same output alone
    if mode == "special":
        assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))  # a sink of +inf takes everything


@pytest.mark.parametrize("case", ["ragged", "history"])
def test_prefill_with_sinks(case, device, poisoned_empty):
    new, history = ([5, 0, 9], [0, 3, 20]) if case == "ragged" else ([3, 1], [40, 7])
    heads = 4
    a = prefill_inputs(new, history, heads, 16, torch.bfloat16, device, r=64, p=16)
    sinks = sinks_for(heads, device)
    out, lse = mla_kernels.mla_prefill(**a, softmax_scale=PREFILL_SCALE, return_lse=True, sinks=sinks)
    ref_out, ref_lse = reference.absorbed_prefill(*a.values(), PREFILL_SCALE, sinks=sinks)
    assert_close(f"prefill {case}", out, ref_out, torch.bfloat16)
    assert_lse_close(f"prefill {case}", lse, ref_lse)


@pytest.mark.parametrize("path", ["absorbed", "expanded"])
def test_prefill_attention_with_sinks(path, device, poisoned_empty):
    new, history, heads = [5, 0, 9], [0, 3, 20], 4
    a = prefill_inputs(new, history, heads, 16, torch.bfloat16, device, r=64, p=16, d_nope=D_NOPE)
    sinks = sinks_for(heads, device)
    out, lse = mla_kernels.mla_prefill_attention(**a, softmax_scale=PREFILL_SCALE, path=path, return_lse=True,
                                                 sinks=sinks)
    d_v = a["w_kv_b"].shape[0] // heads - D_NOPE
    w_uk, w_uv = reference.split_kv_b(a["w_kv_b"].double(), heads, D_NOPE, d_v)
    q_latent = reference.absorb_query(a["q_nope"].double(), w_uk)
    args = {**a, "q_nope": q_latent}
    del args["w_kv_b"]
    ref_out, ref_lse = reference.absorbed_prefill(*args.values(), PREFILL_SCALE, sinks=sinks)
    ref_out = torch.einsum("thr,hvr->thv", ref_out, w_uv)
    # (as test_prefill's test_attention_parity: one bf16 rounding of the absorbed query or of the expanded K/V)
    assert_close(f"attention {path}", out, ref_out, torch.bfloat16)
    assert_lse_close(f"attention {path}", lse, ref_lse, LSE_ATOL_ROUNDED_Q[torch.bfloat16])


def test_bad_sinks_are_named(device):
    q_nope, q_pe, kv_cache, pe_cache, table, seqlens = decode_inputs([5], 1, 4, 16, torch.float32, device, r=64,
                                                                     p=16)
    call = lambda sinks: mla_kernels.mla_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE,  # noqa
                                                sinks=sinks)
    for bad, error, match in ((torch.zeros(3, device=device), ValueError, r"sinks must be a \[num_heads\] = \[4\]"),
                              (torch.zeros(1, device=device), ValueError, r"got shape \(1,\)"),
                              (torch.zeros(4, dtype=torch.int32, device=device), TypeError, "floating-point"),
                              ([0.0] * 4, TypeError, "sinks must be a torch.Tensor"),
                              (torch.zeros(4, device="meta"), ValueError, "sinks is on meta but q_nope")):
        with pytest.raises(error, match=match):
            call(bad)
    with pytest.raises(ValueError, match="sinks"):  # requires grad, with grad mode on: no backward here
        call(torch.zeros(4, device=device, requires_grad=True))
    a = prefill_inputs([3], [2], 4, 16, torch.float32, device, r=64, p=16, d_nope=D_NOPE)
    for fn, kw in ((mla_kernels.mla_prefill_attention, a), (mla_kernels.mla_prefill, {
            k: v for k, v in prefill_inputs([3], [2], 4, 16, torch.float32, device, r=64, p=16).items()})):
        with pytest.raises(ValueError, match=r"sinks must be a \[num_heads\]"):
            fn(**kw, softmax_scale=PREFILL_SCALE, sinks=torch.zeros(5, device=device))
