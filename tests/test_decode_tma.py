"""The Hopper path (cache tiles through tensor descriptors) against the float64 reference.

Tensor descriptors run under Triton's CPU interpreter, so the TMA kernel is parity-tested here exactly as the
portable one is: NaN in every unused cache slot (the tail of a last page is read by a whole-tile load and must
be zeroed in registers), sentinel block ids, shuffled block tables. The portable launcher is made to raise, so
a test cannot pass by silently falling back to it. On a GPU these run natively (sm_90+ only).
"""

import pytest
import torch

from mla_kernels import reference
from helpers import assert_close, assert_lse_close
from mla_kernels import decode, decode_tma
from mla_kernels.decode_tma import tma_supported
from test_decode import SCALE, make_inputs

if decode_tma.TensorDescriptor is None:  # (the dispatch then never picks the TMA kernel: test_dispatch covers that)
    pytest.skip("this triton has no host tensor descriptors (they came with 3.4)", allow_module_level=True)

ON_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9 and torch.version.hip is None
needs_tma = pytest.mark.skipif(torch.cuda.is_available() and not ON_HOPPER,
                               reason="the TMA kernel needs an NVIDIA GPU of compute capability 9+ (or the interpreter)")


def cfg(block_m, block_n, warps=8, stages=2):
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, TMA=True)


def run_tma(monkeypatch, q_nope, q_pe, kv_cache, pe_cache, table, seqlens, config, *, num_splits=1, causal=True,
            cu_seqlens_q=None, max_seqlen_q=None, forbid=((decode, "_launch_portable"),)):
    """``decode._launch`` with a Hopper-path config; fails if a launcher in ``forbid`` (module, name) runs instead:
    by default the portable kernel's (``test_decode_gluon`` also forbids the TMA kernel's)."""

    def must_not_run(*args, **kwargs):
        raise AssertionError(f"{config}: a kernel this test forbids ran: the dispatch did not take the asked path")

    for module, name in forbid:
        monkeypatch.setattr(module, name, must_not_run)
    if cu_seqlens_q is None:
        batch, s_q = q_nope.shape[:2]
        total, max_q = batch * s_q, s_q
    else:
        batch, total = cu_seqlens_q.shape[0] - 1, q_nope.shape[0]
        s_q, max_q = 0, max_seqlen_q
    return decode._launch(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, cu_seqlens_q, SCALE, causal, True,
                          batch=batch, seq_q=s_q, total_tokens=total, max_seqlen_q=max_q,
                          max_seqlen_k=table.shape[1] * kv_cache.shape[1], num_splits=num_splits, config=config)


# (lens, S_q, heads, page, config, splits): pages of one tile and of several (the in-page offset matters), the
# 64-row tiles at 128 heads, S_q > 1 with causal masking, splits with empty ones, a padding slot
CASES = {
    "h16-page64-n64": ([100, 0, 130], 1, 16, 64, cfg(16, 64, 4), 1),
    "h16-page64-n16-split3": ([100, 0, 130], 1, 16, 64, cfg(16, 16, 4), 3),
    "h16-page128-n32-s2": ([300, 45], 2, 16, 128, cfg(64, 32), 1),
    "h128-page64-n64": ([150, 64], 1, 128, 64, cfg(64, 64), 1),
    "h3-page32-n32-s4-split5": ([90, 4, 0], 4, 3, 32, cfg(16, 32, 4), 5),
}


@needs_tma
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_tma_decode_parity(case, dtype, device, monkeypatch, poisoned_empty):
    lens, s_q, heads, page, config, splits = CASES[case]
    q_nope, q_pe, kv_cache, pe_cache, table, seqlens = make_inputs(lens, s_q, heads, page, dtype, device)
    out, lse = run_tma(monkeypatch, q_nope, q_pe, kv_cache, pe_cache, table, seqlens, config, num_splits=splits)
    ref_out, ref_lse = reference.absorbed_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE)
    assert_close(case, out.view(ref_out.shape), ref_out, dtype)
    assert_lse_close(case, lse.view(ref_lse.shape), ref_lse)


@needs_tma
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_tma_non_causal_separate_tensors(causal, device, monkeypatch):
    """Separate contiguous caches (not views of one buffer) and causal=False."""
    q_nope, q_pe, kv_cache, pe_cache, table, seqlens = make_inputs([70, 33], 3, 4, 32, torch.bfloat16, device,
                                                                   fused=False)
    out, lse = run_tma(monkeypatch, q_nope, q_pe, kv_cache, pe_cache, table, seqlens, cfg(16, 32, 4), causal=causal,
                       num_splits=2)
    ref_out, ref_lse = reference.absorbed_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE,
                                                 causal=causal)
    assert_close("separate", out.view(ref_out.shape), ref_out, torch.bfloat16)
    assert_lse_close("separate", lse.view(ref_lse.shape), ref_lse)


@needs_tma
def test_tma_varlen_prefill_rows(device, monkeypatch):
    """The ragged-rows mode (mla_prefill's) through the TMA kernel: history plus new tokens per sequence."""
    new, hist, heads, page = [5, 1, 9], [40, 0, 70], 2, 32
    lens = [n + h for n, h in zip(new, hist)]
    _, _, kv_cache, pe_cache, table, seqlens = make_inputs(lens, 1, heads, page, torch.bfloat16, device)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(sum(new), heads, 576, generator=g).to(torch.bfloat16).to(device)
    cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32, device=device)
    out, lse = run_tma(monkeypatch, q[..., :512], q[..., 512:], kv_cache, pe_cache, table, seqlens,
                       cfg(16, 32, 4), cu_seqlens_q=cu, max_seqlen_q=max(new))
    ref_out, ref_lse = reference.absorbed_prefill(q[..., :512], q[..., 512:], kv_cache, pe_cache, table, cu, seqlens,
                                                  SCALE)
    assert_close("varlen", out.view(ref_out.shape), ref_out, torch.bfloat16)
    assert_lse_close("varlen", lse.view(ref_lse.shape), ref_lse)


def test_tma_layout_rules():
    """What the TMA kernel cannot serve goes to the portable kernel: decided from shapes and strides alone."""
    q_nope, q_pe, kv_cache, pe_cache, _, _ = make_inputs([10], 1, 2, 64, torch.bfloat16, "cpu")
    assert tma_supported(q_nope, kv_cache, pe_cache, 64)
    assert tma_supported(q_nope, kv_cache, pe_cache, 32)  # two tiles per page
    assert not tma_supported(q_nope, kv_cache, pe_cache, 128)  # a tile would cross pages
    q16, _, kv16, pe16, _, _ = make_inputs([10], 1, 2, 16, torch.bfloat16, "cpu")
    assert not tma_supported(q16, kv16, pe16, 64)  # page 16 < BLOCK_N 64
    q32, _, kv32, pe32, _, _ = make_inputs([10], 1, 2, 64, torch.float32, "cpu")
    assert not tma_supported(q32, kv32, pe32, 64)  # fp32 runs full-precision dots on the portable kernel
    qw, _, kvw, pew, _, _ = make_inputs([10], 1, 2, 64, torch.bfloat16, "cpu", r=1024)
    assert not tma_supported(qw, kvw, pew, 64)  # a 512-wide half is more than one 256-element TMA box
    qn, _, kvn, pen, _, _ = make_inputs([10], 1, 2, 64, torch.bfloat16, "cpu", r=16)
    assert not tma_supported(qn, kvn, pen, 64)  # an 8-wide half: a dot's K below 16 (sm_90's compile refuses it)
    qn, _, kvn, pen, _, _ = make_inputs([10], 1, 2, 64, torch.bfloat16, "cpu", r=32)
    assert tma_supported(qn, kvn, pen, 64)
    every_other = torch.zeros(8, 64, 576, dtype=torch.bfloat16)[::2]  # blocks not adjacent: not one 2-D array
    assert not tma_supported(q_nope, every_other[..., :512], every_other[..., 512:], 64)


def test_dispatch_needs_the_config_flag(monkeypatch):
    """No shipped config asks for TMA until a GPU has timed it: without the flag the portable kernel runs."""
    q_nope, q_pe, kv_cache, pe_cache, _, _ = make_inputs([10], 1, 2, 64, torch.bfloat16, "cpu")
    plain = decode._config(16, 512)
    assert decode._hopper_kernel(plain, q_nope, kv_cache, pe_cache) is None
    assert decode._hopper_kernel(dict(plain, TMA=True), q_nope, kv_cache, pe_cache) == "tma"
    q16, _, kv16, pe16, _, _ = make_inputs([10], 1, 2, 16, torch.bfloat16, "cpu")
    assert decode._hopper_kernel(dict(plain, TMA=True), q16, kv16, pe16) is None  # page 16 < BLOCK_N
