"""Caches past 2^31 elements, through Triton's interpreter: every kernel that addresses the cache (decode, its
scheduled grid, its sparse lists, the TMA kernel, the absorbed and expanded prefill, write_cache, and the fp8
variants) gives bit for bit what it gives on a small cache holding the same blocks, placed at the end of the big
one.

The interpreter computes addresses in the kernel's own integer types, as a GPU does: an int32 product of a block id
and a stride wraps there too, and ``tests/bounds.py`` (installed by conftest) fails the access it sends off the
cache. On a GPU, ``test_decode.py`` and ``test_prefill.py`` run the same check on a full-size case. Needs about 7 GiB
of memory (a 4.3 GB bf16 cache, then a 2.1 GB fp8 one) and a minute and a half on two cores."""

import pytest
import torch

import mla_kernels
from bench._harness import free_memory
from helpers import SENTINEL_BLOCK, make_paged_cache
from mla_kernels import _utils, decode, decode_tma
from mla_kernels.cache import fp8_latent_cache, fp8_row_bytes, write_cache


pytestmark = [
    pytest.mark.skipif(not _utils.interpreting(), reason="the interpreter's run; on a GPU test_decode/test_prefill's"),
    pytest.mark.skipif(free_memory(torch.device("cpu")) < 10 * 2**30, reason="needs about 7 GiB of free memory"),
]

PAGE, R, P, H, D_NOPE, SCALE = 64, 512, 64, 2, 128, 0.1
LENS, NEW = [200, 130], [70, 5]


def _moved(table, offset):
    return torch.where(table < SENTINEL_BLOCK, table + offset, table)


def _queries():
    g = torch.Generator().manual_seed(1)
    q = [torch.randn(*shape, generator=g).bfloat16() for shape in
         ((2, 1, H, R), (2, 1, H, P), (sum(NEW), H, D_NOPE), (sum(NEW), H, P))]
    w_kv_b = (torch.randn(H * (D_NOPE + 128), R, generator=g) / R ** 0.5).bfloat16()
    cu = torch.tensor([0, NEW[0], sum(NEW)], dtype=torch.int32)
    return q, w_kv_b, cu


def _same_everywhere(small, big, table, big_table, seqlens, **kw):
    """decode (split and scheduled grids, sparse lists) and prefill (both paths) give identical results on both
    caches."""
    (qn, qp, qn3, qp3), w_kv_b, cu = _queries()
    metadata = mla_kernels.mla_decode_metadata(seqlens, H, 1, kv_lora_rank=R,
                                               cache_dtype=small[0].dtype if "kv_scale" in kw else None)
    indices = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(n))[:96] for n in LENS])
    for extra in ({}, {"metadata": metadata}, {"indices": indices[:, None].to(torch.int32)}):
        a = mla_kernels.mla_decode(qn, qp, *small, table, seqlens, SCALE, kv_scale=kw.get("kv_scale"), **extra)
        b = mla_kernels.mla_decode(qn, qp, *big, big_table, seqlens, SCALE, kv_scale=kw.get("big_scale"), **extra)
        assert torch.equal(a, b), f"decode {extra.keys()}"
    for path in ("absorbed", "expanded"):
        a = mla_kernels.mla_prefill_attention(qn3, qp3, *small, table, cu, seqlens, w_kv_b, SCALE, path=path,
                                              kv_scale=kw.get("kv_scale"))
        b = mla_kernels.mla_prefill_attention(qn3, qp3, *big, big_table, cu, seqlens, w_kv_b, SCALE, path=path,
                                              kv_scale=kw.get("big_scale"))
        assert torch.equal(a, b), f"prefill {path}"


def test_bf16_cache_past_int32_offsets(monkeypatch):
    kv, pe, table = make_paged_cache(LENS, PAGE, (R, P), torch.bfloat16, "cpu")
    seqlens = torch.tensor(LENS, dtype=torch.int32)
    blocks = 2**31 // (PAGE * (R + P)) + 64
    big = torch.zeros(blocks, PAGE, R + P, dtype=torch.bfloat16)
    offset = blocks - kv.shape[0]
    big[offset:, :, :R], big[offset:, :, R:] = kv, pe
    _same_everywhere((kv, pe), (big[..., :R], big[..., R:]), table, _moved(table, offset), seqlens)

    if decode_tma.TensorDescriptor is not None:  # (a triton with host descriptors: 3.4+)
        (qn, qp, _, _), _, _ = _queries()  # the TMA kernel (asked for by a config): 64-bit descriptor bases
        tma = dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=2, TMA=True)
        monkeypatch.setattr(decode, "_launch_portable", None)  # no silent fallback to the portable kernel
        outs = [decode._launch(qn, qp, k, p, t, seqlens, None, SCALE, True, True, batch=2, seq_q=1, total_tokens=2,
                               max_seqlen_q=1, max_seqlen_k=t.shape[1] * PAGE, num_splits=2, config=tma)
                for k, p, t in ((kv, pe, table), (big[..., :R], big[..., R:], _moved(table, offset)))]
        assert decode_tma.tma_supported(qn, big[..., :R], big[..., R:], 64)
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])

    kv_c, k_pe = torch.randn(3, R).bfloat16(), torch.randn(3, P).bfloat16()
    slots = torch.tensor([blocks * PAGE - 1, blocks * PAGE - 2, (blocks - 40) * PAGE + 5])
    write_cache(kv_c, k_pe, big[..., :R], big[..., R:], slots)
    rows = big.view(-1, R + P)[slots]
    assert torch.equal(rows[:, :R], kv_c) and torch.equal(rows[:, R:], k_pe)


def test_fp8_cache_past_int32_offsets():
    kv, pe, table = make_paged_cache(LENS, PAGE, (R, P), torch.bfloat16, "cpu")
    kv, pe = kv.reshape(-1, R).contiguous(), pe.reshape(-1, P).contiguous()
    seqlens = torch.tensor(LENS, dtype=torch.int32)
    num_small = kv.shape[0] // PAGE
    blocks = 2**31 // (PAGE * fp8_row_bytes(R, P)) + 64
    offset = blocks - num_small
    small_kv, small_scale, small_pe = fp8_latent_cache(num_small, PAGE, R, P)
    big_kv, big_scale, big_pe = fp8_latent_cache(blocks, PAGE, R, P)
    slots = torch.arange(num_small * PAGE)
    write_cache(kv, pe, small_kv, small_pe, slots, kv_scale=small_scale)
    write_cache(kv, pe, big_kv, big_pe, slots + offset * PAGE, kv_scale=big_scale)  # quantized past 2^31 bytes
    _same_everywhere((small_kv, small_pe), (big_kv, big_pe), table, _moved(table, offset), seqlens,
                     kv_scale=small_scale, big_scale=big_scale)
