"""MLA without a rotary part (P = 0: Mistral Large 4's no-rope layers, GLM-5.3-Flash's attention): every call takes
rope tensors of width 0 (``q_pe [..., 0]``, ``pe_cache [N, page, 0]``, ``k_pe [T, 0]``), reads and writes no rope
key, and matches the float64 references, whose scores are then the latent products alone.

The kernels skip the rope key under a constexpr ``D_ROPE == 0`` and never receive the empty tensors' pointers (a
tensor of no elements may hold a null one). The caches are poisoned as everywhere: a rope read would have no
element to read, so what these prove is that the latent scores alone are right on every path (dense, split,
scheduled, sparse, fp8, prefill's both paths, the write) and that the width-0 tensors pass every check.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mla_kernels
from mla_kernels import reference
from mla_kernels.cache import PagedLatentCache, fp8_latent_cache, fp8_row_bytes
from helpers import SENTINEL_BLOCK, assert_close, assert_lse_close
from test_decode import SCALE, make_inputs as decode_inputs
from test_fp8 import FP8_LSE_ATOL, FP8_RMS_TOL, fp8_paged_cache
from test_prefill import D_NOPE, LSE_ATOL_ROUNDED_Q, SCALE as PREFILL_SCALE, make_inputs as prefill_inputs, \
    naive_reference


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("mode", ["dense", "split", "scheduled", "sparse", "w_uv", "torch"])
def test_decode_without_rope(mode, dtype, device, poisoned_empty, monkeypatch):
    lens, s_q, heads, page, r = [17, 70, 0], 2, 3, 16, 64
    q_nope, q_pe, kv_cache, pe_cache, table, seqlens = decode_inputs(lens, s_q, heads, page, dtype, device, r=r, p=0)
    assert q_pe.shape[-1] == 0 and pe_cache.shape[-1] == 0
    table[seqlens == 0] = SENTINEL_BLOCK  # the padding slot reads nothing
    kw, ref_kw = {}, {}
    if mode == "split":
        kw = dict(num_splits=3)
    elif mode == "scheduled":
        kw = dict(metadata=mla_kernels.mla_decode_metadata(seqlens, heads, s_q, kv_lora_rank=r, rope_dim=0,
                                                           num_programs=5, dtype=dtype))
        assert max(kw["metadata"].sequences[:, 1].tolist()) > 1  # a sequence cut: the combine runs too
    elif mode == "w_uv":
        w_uv = torch.randn(heads, 32, r, generator=torch.Generator().manual_seed(1)).to(dtype=dtype, device=device)
        kw = ref_kw = dict(w_uv=w_uv / 8)
    elif mode == "torch":
        if device.type != "cpu":
            pytest.skip("the PyTorch path is the CPU's without the interpreter")
        monkeypatch.setattr(mla_kernels._utils, "interpreting", lambda: False)
    if mode == "sparse":
        g = torch.Generator().manual_seed(2)
        indices = torch.randint(-1, 70, (3, s_q, 24), generator=g, dtype=torch.int32)
        indices = indices.masked_fill(indices >= torch.tensor(lens)[:, None, None], -1).to(device)
        out, lse = mla_kernels.mla_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE, return_lse=True,
                                          indices=indices)
        ref_out, ref_lse = reference.sparse_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, indices, SCALE)
    else:
        out, lse = mla_kernels.mla_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE, return_lse=True,
                                          **kw)
        ref_out, ref_lse = reference.absorbed_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE,
                                                     **ref_kw)
    assert_close(f"decode P=0 {mode}", out, ref_out, dtype)
    assert_lse_close(f"decode P=0 {mode}", lse, ref_lse)
    assert torch.equal(out[2].cpu(), torch.zeros_like(out[2].cpu()))  # the padding slot


def test_decode_without_rope_over_an_fp8_cache(device, poisoned_empty):
    """DeepSeek's FP8 layout with no rope part: R e4m3 values and R/128 scales per token (528 bytes at R = 512)."""
    assert fp8_row_bytes(512, 0) == fp8_row_bytes(512, np.int64(0)) == 528 and fp8_row_bytes(512, 64) == 656
    lens, heads, r = [40, 9], 4, 128
    kv, scale, pe, table = fp8_paged_cache(lens, 16, (r, 0), torch.bfloat16, device)
    q_nope = torch.randn(2, 1, heads, r, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).to(device)
    q_pe = q_nope.new_empty(2, 1, heads, 0)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    out, lse = mla_kernels.mla_decode(q_nope, q_pe, kv, pe, table, seqlens, SCALE, kv_scale=scale, return_lse=True,
                                      num_splits=2)
    ref_out, ref_lse = reference.absorbed_decode(q_nope, q_pe, reference.dequantize_fp8(kv, scale, torch.float64),
                                                 pe, table, seqlens, SCALE)
    assert_close("fp8 P=0", out, ref_out, torch.bfloat16, FP8_RMS_TOL[torch.bfloat16])
    assert_lse_close("fp8 P=0", lse, ref_lse, FP8_LSE_ATOL[torch.bfloat16])


@pytest.mark.parametrize("torch_path", [False, True], ids=["kernel", "torch"])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_write_and_read_back_without_rope(fp8, torch_path, device, monkeypatch):
    """write_cache with ``k_pe [T, 0]`` into a cache manager of rope_dim 0: the latent lands in its slots, every
    other byte of the buffer stays as it was, padding slots are skipped."""
    if torch_path:
        if device.type != "cpu":
            pytest.skip("the PyTorch path is the CPU's without the interpreter")
        monkeypatch.setattr(mla_kernels._utils, "interpreting", lambda: False)
    cache = PagedLatentCache(2, 6, 16, 128, 0, dtype=torch.float8_e4m3fn if fp8 else torch.bfloat16, device=device)
    assert cache.pe_cache(1).shape == (6, 16, 0)
    buf = cache.buffer(1)
    buf.fill_(0x7F if fp8 else float("nan"))  # poison: what is not written stays so
    before = buf.clone()
    seqs = [cache.add_sequence(), cache.add_sequence()]
    slots = cache.append_batch(seqs, [20, 3])
    slots[4] = -1  # a padding token
    kv_c = torch.randn(23, 128, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16).to(device)
    cache.write(1, slots, kv_c, kv_c.new_empty(23, 0))
    kept = slots >= 0
    blk, off = slots[kept] // 16, slots[kept] % 16
    got = cache.kv_cache(1)[blk, off]
    if fp8:
        got = reference.dequantize_fp8(got, cache.kv_scale(1)[blk, off], torch.bfloat16)
        expected = reference.dequantize_fp8(*reference.quantize_fp8(kv_c[kept]), torch.bfloat16)
    else:
        expected = kv_c[kept]
    assert torch.equal(got, expected)
    untouched = torch.ones(buf.shape[:2], dtype=torch.bool, device=device)
    untouched[blk, off] = False
    assert torch.equal(buf[untouched].view(torch.uint8), before[untouched].view(torch.uint8))
    # read back, forked (its last block copied), truncated: the latent follows, the rope part stays [L, 0]
    kv, pe = cache.read(1, seqs[0])
    first = expected[:19]  # sequence 0's 20 tokens less the padding one (slot 4)
    assert pe.shape == (20, 0) and torch.equal(torch.cat([kv[:4], kv[5:]]), first)
    twin = cache.fork(seqs[0])
    cache.truncate(twin, 10)
    kv_twin, pe_twin = cache.read(1, twin)
    assert pe_twin.shape == (10, 0)
    torch.testing.assert_close(kv_twin, kv[:10], rtol=0, atol=0, equal_nan=True)  # (slot 4: the unwritten poison)


def test_prefill_without_rope(device, poisoned_empty):
    new, history, heads = [3, 17, 0, 5], [20, 0, 3, 9], 3
    a = prefill_inputs(new, history, heads, 16, torch.bfloat16, device, r=64, p=0)
    out, lse = mla_kernels.mla_prefill(**a, softmax_scale=PREFILL_SCALE, return_lse=True)
    ref_out, ref_lse = reference.absorbed_prefill(*a.values(), PREFILL_SCALE)
    assert_close("prefill P=0", out, ref_out, torch.bfloat16)
    assert_lse_close("prefill P=0", lse, ref_lse)


@pytest.mark.parametrize("path", ["absorbed", "expanded"])
def test_prefill_attention_without_rope(path, device, poisoned_empty):
    new, history, heads = [3, 17, 0, 5], [20, 0, 3, 9], 3
    a = prefill_inputs(new, history, heads, 16, torch.bfloat16, device, r=64, p=0, d_nope=D_NOPE)
    out, lse = mla_kernels.mla_prefill_attention(**a, softmax_scale=PREFILL_SCALE, path=path, return_lse=True)
    ref_out, ref_lse = naive_reference(a, scale=PREFILL_SCALE)
    # (as test_prefill's test_attention_parity: one bf16 rounding of the absorbed query or of the expanded K/V)
    assert_close(f"attention P=0 {path}", out, ref_out, torch.bfloat16)
    assert_lse_close(f"attention P=0 {path}", lse, ref_lse, LSE_ATOL_ROUNDED_Q[torch.bfloat16])


def test_widths_other_than_zero_and_powers_of_two_are_still_refused(device):
    """0 joins the admitted rope widths; 8 (below a dot's 16) and 48 (no power of two) are refused by name."""
    for p in (8, 48):
        q_nope, q_pe, kv_cache, pe_cache, table, seqlens = decode_inputs([5], 1, 2, 16, torch.float32, device, r=64,
                                                                         p=p)
        with pytest.raises(ValueError, match=r"pe_cache rope width must be 0 \(no rope\) or a power of two"):
            mla_kernels.mla_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE)
        with pytest.raises(ValueError, match="rope_dim width must be 0"):
            PagedLatentCache(1, 2, 16, 64, p)
        with pytest.raises(ValueError, match="rope_dim width must be 0"):
            fp8_latent_cache(2, 16, 128, p)
        with pytest.raises(ValueError, match="qk_rope_head_dim width must be 0"):
            mla_kernels.MLAttention(64, 2, 64, 16, p, 16)
    with pytest.raises(ValueError, match="rope_dim must be at least 0"):
        PagedLatentCache(1, 2, 16, 64, -1)
    with pytest.raises(ValueError, match="rope_dim must be an int >= 0"):
        mla_kernels.mla_decode_metadata(torch.tensor([3]), 2, kv_lora_rank=64, rope_dim=-1)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_a_no_rope_module_shares_a_cache_of_rope_layers(fp8):
    """``MLAttention`` without a rotary part over a cache of rope width 16 (a model mixing no-rope and rope layers
    keeps one cache, Mistral Large 4's): it stores the latent alone, its layer's rope columns keep what they held,
    and its outputs are those it gives over a cache of its own of rope width 0 (prompts, a second turn, decode
    steps). A module with a rope part takes only a cache of its own width."""
    from mla_kernels.module import LatentBatch, MLAttention
    torch.manual_seed(0)
    mod = MLAttention(64, 4, 128, 16, 0, 16, q_lora_rank=32, layer_idx=1).eval()
    kw = dict(dtype=torch.float8_e4m3fn, rope_dtype=torch.float32) if fp8 else dict(dtype=torch.float32)
    shared, own = PagedLatentCache(2, 16, 4, 128, 16, **kw), PagedLatentCache(2, 16, 4, 128, 0, **kw)
    shared.pe_cache(1).fill_(float("nan"))  # the rope columns: poison, which must stay
    seqs = {id(cache): [cache.add_sequence(), cache.add_sequence()] for cache in (shared, own)}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for counts in ([5, 3], [4, 2], [1, 1], [1, 1]):
            x = torch.randn(sum(counts), 64, generator=g)
            got, alone = (mod(x, LatentBatch.reserve(cache, seqs[id(cache)], counts)) for cache in (shared, own))
            assert torch.equal(got, alone), counts
    assert torch.isnan(shared.pe_cache(1)).all()
    for p, cache_p in ((16, 32), (16, 0)):
        rope_mod = MLAttention(64, 4, 128, 16, p, 16).eval()
        other = PagedLatentCache(1, 4, 4, 128, cache_p, dtype=torch.float32)
        batch = LatentBatch.reserve(other, [other.add_sequence()], [2])
        with torch.no_grad(), pytest.raises(ValueError, match=f"rope_dim={cache_p}; this module has .*"
                                                               f"qk_rope_head_dim={p}"):
            rope_mod(torch.randn(2, 64), batch)


def test_prefill_without_rope_over_an_fp8_cache_with_sinks(device, poisoned_empty):
    """The other options at P = 0: ``mla_prefill`` over an fp8 cache, and attention sinks on it."""
    new, history, heads, r = [3, 0, 6], [9, 2, 20], 4, 128
    lens = [n + h for n, h in zip(new, history)]
    kv, scale, pe, table = fp8_paged_cache(lens, 16, (r, 0), torch.bfloat16, device)
    q_nope = torch.randn(sum(new), heads, r, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16).to(device)
    q_pe = q_nope.new_empty(sum(new), heads, 0)
    cu = torch.tensor([0, 3, 3, 9], dtype=torch.int32, device=device)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    sinks = (torch.randn(heads, generator=torch.Generator().manual_seed(6)) * 2 + 3).to(device)
    out, lse = mla_kernels.mla_prefill(q_nope, q_pe, kv, pe, table, cu, seqlens, PREFILL_SCALE, kv_scale=scale,
                                       return_lse=True, sinks=sinks)
    ref_out, ref_lse = reference.absorbed_prefill(q_nope, q_pe, reference.dequantize_fp8(kv, scale, torch.float64),
                                                  pe, table, cu, seqlens, PREFILL_SCALE, sinks=sinks)
    assert_close("fp8 prefill P=0 with sinks", out, ref_out, torch.bfloat16, FP8_RMS_TOL[torch.bfloat16])
    assert_lse_close("fp8 prefill P=0 with sinks", lse, ref_lse, FP8_LSE_ATOL[torch.bfloat16])
