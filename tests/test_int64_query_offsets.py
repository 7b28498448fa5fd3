"""Queries whose token or head offsets pass 2^31 elements: the attention kernels address them in 64 bits.

The head stride of ``bmm(q.transpose(0, 1), w_uk).transpose(0, 1)`` (how ``mla_prefill_attention`` and the drop-in
absorb queries: ``[H, T, R]`` memory seen as ``[T, H, R]``) is T x R, so head h's offset ``h x T x R`` passes 2^31 at
about 33K packed tokens at 128 heads (R = 512), with the stride itself still an int32 argument; a token's offset does
the same inside one sequence of that many new tokens. An int32 product wraps (on a GPU: an illegal address or another
tensor's memory; under the interpreter ``tests/bounds.py`` fails the access).

Each case puts a few query rows 2^30 + 16 elements apart (an int32 stride, so Triton passes it as i32) in one large
storage, and requires the bits of the same call on a contiguous copy. On the CPU the storage is ``torch.empty``,
whose untouched pages the OS never commits (a few pages are written); on a GPU it takes 4 GiB."""

import pytest
import torch

import mla_kernels
from bench._harness import free_memory
from helpers import make_paged_cache
from mla_kernels import decode, decode_tma

FAR = 2**30 + 16  # an int32 stride (a multiple of 16, as a real one); twice it passes 2^31
R, P, PAGE, SCALE = 64, 16, 16, 0.3


def far_apart(q: torch.Tensor, dim: int) -> torch.Tensor:
    """``q``'s values in a view whose stride along ``dim`` is ``FAR`` (the others contiguous, in q's order)."""
    strides, step = [0] * q.dim(), 1
    for d in reversed(range(q.dim())):
        if d != dim:
            strides[d], step = step, step * q.shape[d]
    strides[dim] = FAR
    size = FAR * (q.shape[dim] - 1) + step
    if q.device.type == "cuda" and free_memory(q.device) < 2 * size * q.element_size():
        pytest.skip("needs about 5 GiB of free GPU memory")
    try:
        storage = torch.empty(size, dtype=q.dtype, device=q.device)
    except RuntimeError:  # (a host that does not overcommit)
        pytest.skip("cannot reserve 4 GiB of address space")
    view = storage.as_strided(q.shape, strides)
    view.copy_(q)
    return view


def _queries(shape_n, shape_p, device, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(*shape_n, generator=g).to(dtype=dtype, device=device),
            torch.randn(*shape_p, generator=g).to(dtype=dtype, device=device))


@pytest.mark.parametrize("dim", [0, 1], ids=["token-stride", "head-stride"])
@pytest.mark.parametrize("split_tokens", [None, 32], ids=["default", "split_tokens"])
def test_prefill_queries_past_int32_offsets(dim, split_tokens, device):
    lens, new = [60, 40], [3, 2]
    kv, pe, table = make_paged_cache(lens, PAGE, (R, P), torch.bfloat16, device)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    cu = torch.tensor([0, new[0], sum(new)], dtype=torch.int32, device=device)
    qn, qp = _queries((sum(new), 3, R), (sum(new), 3, P), device)
    kw = dict(return_lse=True, split_tokens=split_tokens)
    expected = mla_kernels.mla_prefill(qn, qp, kv, pe, table, cu, seqlens, SCALE, **kw)
    got = mla_kernels.mla_prefill(far_apart(qn, dim), far_apart(qp, dim), kv, pe, table, cu, seqlens, SCALE, **kw)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("dim", [1, 2], ids=["token-stride", "head-stride"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_decode_queries_past_int32_offsets(dim, sparse, device):
    lens, s_q, heads = [50, 33], 3, 3
    kv, pe, table = make_paged_cache(lens, PAGE, (R, P), torch.bfloat16, device)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    qn, qp = _queries((2, s_q, heads, R), (2, s_q, heads, P), device)
    extra = {}
    if sparse:
        g = torch.Generator().manual_seed(4)
        extra["indices"] = torch.stack([torch.randperm(n, generator=g)[:20] for n in lens])[:, None].expand(
            2, s_q, 20).to(device=device, dtype=torch.int32)
    expected = mla_kernels.mla_decode(qn, qp, kv, pe, table, seqlens, SCALE, return_lse=True, **extra)
    got = mla_kernels.mla_decode(far_apart(qn, dim), far_apart(qp, dim), kv, pe, table, seqlens, SCALE,
                                 return_lse=True, **extra)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.skipif(decode_tma.TensorDescriptor is None, reason="this triton has no host tensor descriptors")
@pytest.mark.parametrize("dim", [1, 2], ids=["token-stride", "head-stride"])
def test_tma_kernel_queries_past_int32_offsets(dim, device, monkeypatch):
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        pytest.skip("the TMA kernel needs compute capability 9+")
    lens, s_q, heads = [130, 64], 3, 3
    kv, pe, table = make_paged_cache(lens, 64, (R, P), torch.bfloat16, device)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    qn, qp = _queries((2, s_q, heads, R), (2, s_q, heads, P), device)
    monkeypatch.setattr(decode, "_launch_portable", None)  # no silent fallback to the portable kernel
    tma = dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=2, TMA=True)

    def run(n, p):
        assert decode_tma.tma_supported(n, kv, pe, 64)
        return decode._launch(n, p, kv, pe, table, seqlens, None, SCALE, True, True, batch=2, seq_q=s_q,
                              total_tokens=2 * s_q, max_seqlen_q=s_q, max_seqlen_k=table.shape[1] * 64,
                              num_splits=2, config=tma)

    expected, got = run(qn, qp), run(far_apart(qn, dim), far_apart(qp, dim))
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
