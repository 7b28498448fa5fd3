"""The two references agree: naive (decompressed) MLA and absorbed MLA over a paged cache, in float64."""

import pytest
import torch

from mla_kernels import reference
from helpers import make_paged_cache

D_NOPE, D_ROPE, D_V, R = 32, 16, 24, 64


def _weights(heads):
    return torch.randn(heads * (D_NOPE + D_V), R, dtype=torch.float64) / R**0.5


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("page", [1, 16], ids=lambda p: f"page{p}")
def test_naive_and_absorbed_decode_agree(page, causal):
    heads, s_q, lens = 3, 2, [17, 5, 40]
    kv_cache, pe_cache, table = make_paged_cache(lens, page, (R, D_ROPE), torch.float64, "cpu")
    w_kv_b = _weights(heads)
    w_uk, w_uv = reference.split_kv_b(w_kv_b, heads, D_NOPE, D_V)
    q_nope = torch.randn(len(lens), s_q, heads, D_NOPE, dtype=torch.float64)
    q_pe = torch.randn(len(lens), s_q, heads, D_ROPE, dtype=torch.float64)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    scale = (D_NOPE + D_ROPE) ** -0.5

    out, lse = reference.absorbed_decode(reference.absorb_query(q_nope, w_uk), q_pe, kv_cache, pe_cache, table,
                                         seqlens, scale, causal=causal, w_uv=w_uv)
    for b, n in enumerate(lens):
        kv_c = reference.gather_paged(kv_cache, table[b], n)
        k_pe = reference.gather_paged(pe_cache, table[b], n)
        ref_out, ref_lse = reference.naive_mla(q_nope[b], q_pe[b], kv_c, k_pe, w_kv_b, scale, causal=causal)
        torch.testing.assert_close(out[b], ref_out, rtol=0, atol=1e-10)
        torch.testing.assert_close(lse[b], ref_lse, rtol=0, atol=1e-10)
        assert not torch.isnan(kv_c).any(), "gather_paged read a poisoned slot"


def test_naive_and_absorbed_prefill_agree():
    heads, new, hist = 5, [3, 0, 1, 20], [7, 4, 0, 33]
    lens = [n + h for n, h in zip(new, hist)]
    kv_cache, pe_cache, table = make_paged_cache(lens, 16, (R, D_ROPE), torch.float64, "cpu")
    w_kv_b = _weights(heads)
    w_uk, w_uv = reference.split_kv_b(w_kv_b, heads, D_NOPE, D_V)
    cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    q_nope = torch.randn(sum(new), heads, D_NOPE, dtype=torch.float64)
    q_pe = torch.randn(sum(new), heads, D_ROPE, dtype=torch.float64)
    scale = 0.3
    out, lse = reference.absorbed_prefill(reference.absorb_query(q_nope, w_uk), q_pe, kv_cache, pe_cache, table, cu,
                                          torch.tensor(lens, dtype=torch.int32), scale)
    out = torch.einsum("thr,hvr->thv", out, w_uv)
    for b, n in enumerate(lens):
        rows = slice(int(cu[b]), int(cu[b + 1]))
        kv_c = reference.gather_paged(kv_cache, table[b], n)
        k_pe = reference.gather_paged(pe_cache, table[b], n)
        ref_out, ref_lse = reference.naive_mla(q_nope[rows], q_pe[rows], kv_c, k_pe, w_kv_b, scale)
        torch.testing.assert_close(out[rows], ref_out, rtol=0, atol=1e-10)
        torch.testing.assert_close(lse[rows], ref_lse, rtol=0, atol=1e-10)


def test_causal_mask_is_not_a_no_op():
    """Guards the comparison above: causal and full attention must differ when S_q > 1."""
    kv_cache, pe_cache, table = make_paged_cache([9], 4, (R, D_ROPE), torch.float64, "cpu")
    q = torch.randn(1, 3, 2, R, dtype=torch.float64)
    q_pe = torch.randn(1, 3, 2, D_ROPE, dtype=torch.float64)
    seqlens = torch.tensor([9], dtype=torch.int32)
    causal, _ = reference.absorbed_decode(q, q_pe, kv_cache, pe_cache, table, seqlens, 0.2, causal=True)
    full, _ = reference.absorbed_decode(q, q_pe, kv_cache, pe_cache, table, seqlens, 0.2, causal=False)
    assert (causal[0, :2] - full[0, :2]).abs().max() > 1e-3
    torch.testing.assert_close(causal[0, 2], full[0, 2], rtol=0, atol=1e-12)  # the last token sees everything


def test_references_ship_with_the_package_and_the_old_import_path_still_works():
    """The references are ``mla_kernels.reference``: a wheel holds them (setuptools packages ``mla_kernels*``), so an
    installed library has its ground truth beside it. A checkout's ``import reference`` (the old top-level home) gives
    the same objects, modules included, not a copy: a monkeypatch of one is a monkeypatch of the other."""
    import importlib
    import os

    import setuptools
    tomllib = pytest.importorskip("tomllib")  # (Python 3.11+)

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        include = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]["include"]
    assert "mla_kernels.reference" in setuptools.find_packages(root, include=include)
    old = importlib.import_module("reference")
    for name in reference.__all__:
        assert getattr(old, name) is getattr(reference, name), name
    for module in ("naive", "absorbed", "quant"):
        assert importlib.import_module(f"reference.{module}") is getattr(reference, module), module
    from reference.absorbed import absorbed_decode
    assert absorbed_decode is reference.absorbed_decode
