"""Sparse decode (``mla_decode(..., indices=...)``, DeepSeek-V3.2's DSA): each new token attends to its own list of
cache positions. Against the float64 ``reference.sparse_decode``, under the interpreter (or natively on a GPU), with
the usual NaN poisoning of everything outside the listed positions' slots."""

import pytest
import torch

import mla_kernels
from mla_kernels import reference
from helpers import assert_close, assert_lse_close, assert_rejects, record_launches
from mla_kernels import _utils
from test_decode import SCALE, _alone, make_inputs
from test_fp8 import FP8_LSE_ATOL, FP8_RMS_TOL, FP8_COS_TOL, decode_inputs, dequantized


def key_lists(lens, s_q, k, seed=0, dtype=torch.int32, device="cpu", dup_free=True):
    """``[B, S_q, K]`` distinct positions of each sequence, in random order, padded with -1 where the sequence has
    fewer than K tokens; a few entries past each token's own position (a causal call must skip them)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for length in lens:
        per_token = []
        for _ in range(s_q):
            r = torch.randperm(length, generator=g)[:k] if length else torch.empty(0, dtype=torch.long)
            per_token.append(torch.nn.functional.pad(r, (0, k - r.shape[0]), value=-1))
        rows.append(torch.stack(per_token))
    return torch.stack(rows).to(dtype=dtype, device=device)


def ref_sparse(a, idx, **kw):
    return reference.sparse_decode(*(a[n] for n in ("q_nope", "q_pe", "kv_cache", "pe_cache", "block_table",
                                                    "cache_seqlens")), idx, SCALE, **kw)


def inputs(lens, s_q, heads, page, dtype, device, r=512, p=64, seed=0):
    names = ("q_nope", "q_pe", "kv_cache", "pe_cache", "block_table", "cache_seqlens")
    return dict(zip(names, make_inputs(lens, s_q, heads, page, dtype, device, r=r, p=p, seed=seed)),
                softmax_scale=SCALE)


# (lens, S_q, heads, page, K): lists shorter and longer than sequences, padding slots, every head count
CASES = {
    "h1-page1-s1-k7": ([1, 17, 0], 1, 1, 1, 7),
    "h16-page64-s1-k64": ([100, 0, 257, 64], 1, 16, 64, 64),
    "h16-page16-s3-k40": ([31, 130], 3, 16, 16, 40),
    "h128-page64-s1-k100": ([200, 65], 1, 128, 64, 100),
    "h5-page16-s2-k300": ([17, 260], 2, 5, 16, 300),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_sparse_parity(case, dtype, device, poisoned_empty):
    lens, s_q, heads, page, k = CASES[case]
    a = inputs(lens, s_q, heads, page, dtype, device)
    idx = key_lists(lens, s_q, k, device=device)
    out, lse = mla_kernels.mla_decode(**a, return_lse=True, indices=idx)
    ref_out, ref_lse = ref_sparse(a, idx)
    assert out.dtype == dtype and out.shape == a["q_nope"].shape and lse.shape == a["q_nope"].shape[:3]
    assert_close(case, out, ref_out, dtype)
    assert_lse_close(case, lse, ref_lse)


@pytest.mark.parametrize("num_splits", [2, 5], ids=lambda n: f"splits{n}")
def test_sparse_splits_w_uv_int64_and_non_causal(num_splits, device, poisoned_empty):
    """Forced splits of the lists (some empty), the value projection, int64 lists as a non-contiguous view, and
    causal=False (entries past a token's own position then count)."""
    lens, s_q, heads, k = [300, 2, 0, 77], 2, 16, 90
    a = inputs(lens, s_q, heads, 16, torch.bfloat16, device, r=256, p=32, seed=1)
    w_uv = (torch.randn(heads, 64, 256) / 16).to(dtype=torch.bfloat16, device=device)
    wide = key_lists(lens, s_q, 2 * k, seed=2, dtype=torch.int64, device=device)
    idx = wide[..., ::2]  # a strided view: copied once into the rows the kernel reads
    for causal in (True, False):
        out = mla_kernels.mla_decode(**a, causal=causal, w_uv=w_uv, num_splits=num_splits, indices=idx)
        ref_out, _ = ref_sparse(a, idx, causal=causal, w_uv=w_uv)
        assert_close(f"splits={num_splits} causal={causal}", out, ref_out, torch.bfloat16)


def test_split_tokens_with_w_uv(device, poisoned_empty):
    """Lists cut at multiples of ``split_tokens`` (K = 90 entries, 32-entry splits) match the reference with
    ``w_uv``. (Its invariance check passes with the argument ignored too: 90 entries are one split by default in
    either batch; test_split_tokens_make_lists_batch_invariant is the one that fails then.)"""
    lens, s_q, heads, k = [300, 2, 0, 77], 2, 16, 90
    args = make_inputs(lens, s_q, heads, 16, torch.bfloat16, device, r=256, p=32, seed=1)
    idx = key_lists(lens, s_q, k, seed=3, device=device)
    w_uv = (torch.randn(heads, 64, 256, generator=torch.Generator().manual_seed(3)) / 16).to(torch.bfloat16).to(device)
    out = mla_kernels.mla_decode(*args, SCALE, w_uv=w_uv, indices=idx, split_tokens=32)
    ref_out, _ = reference.sparse_decode(*args, idx, SCALE, w_uv=w_uv)
    assert_close("sparse split_tokens=32", out, ref_out, torch.bfloat16)
    latent = mla_kernels.mla_decode(*args, SCALE, indices=idx, split_tokens=32)
    alone = mla_kernels.mla_decode(*_alone(args, 3, 16), SCALE, indices=idx[3:], split_tokens=32)
    assert torch.equal(latent[3:], alone)


def test_split_tokens_make_lists_batch_invariant(device, poisoned_empty):
    """``split_tokens`` on lists where the default split count does follow the batch: at 128 heads (two 64-row
    blocks) 2560-entry lists get 9 splits for this batch's 8 tokens and 10 for sequence 3's 2 alone (under the
    interpreter the fp32 outputs then differ). With ``split_tokens`` the bits are the same."""
    lens, s_q, heads, k = [3000, 2, 0, 2700], 2, 128, 2560
    args = make_inputs(lens, s_q, heads, 16, torch.float32, device, r=64, p=16, seed=1)
    idx = key_lists(lens, s_q, k, seed=3, device=device)
    out, lse = mla_kernels.mla_decode(*args, SCALE, indices=idx, return_lse=True, split_tokens=256)
    alone = mla_kernels.mla_decode(*_alone(args, 3, 16), SCALE, indices=idx[3:], return_lse=True, split_tokens=256)
    assert torch.equal(out[3:], alone[0]) and torch.equal(lse[3:], alone[1])

def test_every_position_listed_equals_dense_decode(device):
    """Listing every position of every sequence (in any order, -1 past the end) is dense decode, bit for bit in fp32
    (the same tiles in another order: within fp32 rounding)."""
    lens, s_q, heads = [70, 0, 33], 2, 8
    a = inputs(lens, s_q, heads, 16, torch.float32, device, r=64, p=16)
    width = max(lens)
    pos = torch.stack([torch.randperm(width, generator=torch.Generator().manual_seed(b)) for b in range(3)])
    pos = torch.where(pos < a["cache_seqlens"].cpu()[:, None], pos, -1)
    idx = pos[:, None, :].expand(3, s_q, width).to(device=device, dtype=torch.int32)
    dense, dense_lse = mla_kernels.mla_decode(**a, return_lse=True)
    sparse, sparse_lse = mla_kernels.mla_decode(**a, return_lse=True, indices=idx)
    torch.testing.assert_close(sparse, dense)  # fp32, one reordered sum per row: torch's fp32 defaults
    torch.testing.assert_close(sparse_lse, dense_lse)


def test_a_token_with_no_usable_entry_gives_zeros_and_minus_inf(device):
    """All -1, only future positions (causal), an empty list (K = 0) and a padding slot: zeros, lse -inf."""
    lens, s_q = [20, 0], 2
    a = inputs(lens, s_q, 4, 16, torch.bfloat16, device, r=64, p=16)
    idx = torch.full((2, s_q, 3), -1, dtype=torch.int32, device=device)
    idx[0, 0] = torch.tensor([19, 19, -1])  # token 0 sits at position 18: 19 is its successor's
    out, lse = mla_kernels.mla_decode(**a, return_lse=True, indices=idx)
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())
    empty = idx[..., :0]
    out, lse = mla_kernels.mla_decode(**a, return_lse=True, indices=empty)
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())


def test_repeats_any_negative_and_entries_past_the_end(device, poisoned_empty):
    """A repeated entry counts each time it appears; any negative entry is skipped, not only -1; and entries at or
    past a sequence's length, which mla_decode refuses on the CPU, are skipped by the kernel itself, as a GPU call
    relies on: its launch, handed them directly, reads nothing through them (the cache past each length is NaN, a
    padding slot's table row a sentinel block). fp16, page 3, the inputs left as they were."""
    from mla_kernels import decode

    lens, s_q, heads = [50, 0, 17], 2, 5
    a = inputs(lens, s_q, heads, 3, torch.float16, device, r=64, p=32)
    idx = key_lists(lens, s_q, 24, seed=6, dtype=torch.int64)
    idx[0, 0, :6] = torch.tensor([7, 7, 7, -2, -2 ** 31, -2 ** 62])
    idx[2, 1, :4] = torch.tensor([3, 3, -5, 0])
    idx = idx.to(device)
    before = {n: t.clone() for n, t in a.items() if isinstance(t, torch.Tensor)}
    for dtype in (torch.int64, torch.int32):
        lists = idx.clamp_min(-2 ** 31).to(dtype)
        out, lse = mla_kernels.mla_decode(**a, return_lse=True, indices=lists)
        ref_out, ref_lse = ref_sparse(a, lists)
        assert_close(f"repeats {dtype}", out, ref_out, torch.float16)
        assert_lse_close(f"repeats {dtype}", lse, ref_lse)
    past = idx.clone()
    past[0, 1, ::4] = torch.tensor([50, 51, 53, 2 ** 31 - 1, 2 ** 40, 1000], device=device)
    past[1] = torch.arange(24, device=device)  # the padding slot holds no token
    past[2, 0, :3] = torch.tensor([17, 18, 2 ** 31], device=device)
    for num_splits in (None, 3):
        out, lse = decode._launch(a["q_nope"], a["q_pe"], a["kv_cache"], a["pe_cache"], a["block_table"],
                                  a["cache_seqlens"], None, SCALE, True, True, batch=3, seq_q=s_q, total_tokens=3 * s_q,
                                  max_seqlen_q=s_q, max_seqlen_k=a["block_table"].shape[1] * 3, num_splits=num_splits,
                                  indices=past.view(3 * s_q, -1))
        ref_out, ref_lse = ref_sparse(a, past)  # the reference keeps entries 0 <= p < length only
        assert_close(f"past the end, splits={num_splits}", out.view(ref_out.shape), ref_out, torch.float16)
        assert_lse_close(f"past the end, splits={num_splits}", lse.view(ref_lse.shape), ref_lse)
    for n, t in before.items():
        assert torch.equal(a[n].view(torch.int16) if t.dtype == torch.float16 else a[n],
                           t.view(torch.int16) if t.dtype == torch.float16 else t), f"{n} was modified"


def test_fp8_cache(device, poisoned_empty):
    """An fp8 latent read through the lists: against the reference on the exactly dequantized cache, with the
    bounds of the dense fp8 tests (tests/test_fp8.py: e4m3's rounding on top of bf16's)."""
    lens, s_q, heads = [200, 65, 0], 2, 16
    a = decode_inputs(lens, s_q, heads, 64, (512, 64), torch.bfloat16, device)
    idx = key_lists(lens, s_q, 96, seed=4, device=device)
    out, lse = mla_kernels.mla_decode(**a, return_lse=True, indices=idx)
    ref_out, ref_lse = ref_sparse(dequantized(a), idx)
    assert_close("fp8 sparse", out, ref_out, torch.bfloat16, FP8_RMS_TOL[torch.bfloat16], FP8_COS_TOL[torch.bfloat16])
    assert_lse_close("fp8 sparse", lse, ref_lse, FP8_LSE_ATOL[torch.bfloat16])


def test_torch_path_matches_the_kernel(device, monkeypatch):
    """The PyTorch path (a CPU without the interpreter) gives the kernel's answer."""
    lens, s_q, heads = [90, 0, 41], 2, 4
    a = inputs(lens, s_q, heads, 16, torch.float32, device, r=64, p=16)
    idx = key_lists(lens, s_q, 50, seed=5, device=device)
    kernel = mla_kernels.mla_decode(**a, indices=idx)
    monkeypatch.setattr(_utils, "use_triton", lambda t: False)
    torch_path = mla_kernels.mla_decode(**a, indices=idx)
    torch.testing.assert_close(torch_path, kernel, rtol=1e-5, atol=1e-5)  # fp32 sums in another order


def test_bad_indices_are_refused(device):
    lens, s_q = [20, 5], 2
    a = inputs(lens, s_q, 4, 16, torch.bfloat16, device, r=64, p=16)
    good = key_lists(lens, s_q, 4, device=device)

    def call(**kw):
        return mla_kernels.mla_decode(**kw)

    cases = [
        (lambda d: d.update(indices=good.float()), TypeError),
        (lambda d: d.update(indices=good[0]), ValueError),
        (lambda d: d.update(indices=good[:1]), ValueError),
        (lambda d: d.update(indices=good[:, :1]), ValueError),
        (lambda d: d.update(indices=[[[0]]]), TypeError),
    ]
    for change, error in cases:
        assert_rejects(call, dict(a, indices=good), change, error, "indices")
    meta = mla_kernels.mla_decode_metadata(a["cache_seqlens"], 4, s_q, kv_lora_rank=64, rope_dim=16)
    with pytest.raises(ValueError, match="indices and metadata"):
        mla_kernels.mla_decode(**a, indices=good, metadata=meta)
    if device.type == "cpu":  # values are checked where that is free
        past = good.clone()
        past[1, 0, 2] = 5  # sequence 1 holds 5 tokens: positions 0..4
        with pytest.raises(ValueError, match=r"indices\[1, 0, 2\] = 5"):
            mla_kernels.mla_decode(**a, indices=past)


def test_compiled_call_is_one_op_node(device):
    """Under torch.compile(fullgraph=True) the sparse call traces to the one mla_decode op, and equals eager."""
    lens, s_q = [40, 9], 1
    a = inputs(lens, s_q, 4, 16, torch.float32, device, r=64, p=16)
    idx = key_lists(lens, s_q, 12, device=device)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(lambda i: mla_kernels.mla_decode(**a, indices=i), backend=backend, fullgraph=True)
    torch.testing.assert_close(compiled(idx), mla_kernels.mla_decode(**a, indices=idx))
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert "mla_kernels.mla_decode" in targets, targets


@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_causally_skipped_entries_are_never_read(path, device, monkeypatch):
    """With causal, an entry past its token's position is skipped as a -1 is: never read, so what its slot holds (NaN
    here) cannot reach the output; the reference and the PyTorch path read only the entries they use."""
    lens, s_q, heads = [40, 23], 3, 4
    a = inputs(lens, s_q, heads, 16, torch.float32, device, r=64, p=16)
    idx = key_lists(lens, s_q, 12, seed=8).long()
    for b, length in enumerate(lens):
        idx[b][idx[b] == length - 1] = -1  # the last position: listed by token 0 alone, which it follows
        idx[b, 0, 0] = length - 1
        slot = a["block_table"][b, (length - 1) // 16], (length - 1) % 16
        a["kv_cache"][slot] = float("nan")
        a["pe_cache"][slot] = float("nan")
    idx = idx.to(device)
    if path == "torch":
        monkeypatch.setattr(_utils, "use_triton", lambda t: False)
    out, lse = mla_kernels.mla_decode(**a, return_lse=True, indices=idx)
    ref_out, ref_lse = ref_sparse(a, idx)
    assert_close(path, out, ref_out, torch.float32)
    assert_lse_close(path, lse, ref_lse)


def test_torch_path_empty_batch_and_blockless_table(device, monkeypatch):
    """The PyTorch path takes what the kernel takes: a batch of 0 and a block table of no columns (all padding)."""
    monkeypatch.setattr(_utils, "use_triton", lambda t: False)
    lens, s_q = [20, 0], 2
    a = inputs(lens, s_q, 4, 16, torch.float32, device, r=64, p=16)
    idx = key_lists(lens, s_q, 3, device=device)
    empty = {n: (t[:0] if n in ("q_nope", "q_pe", "block_table", "cache_seqlens") else t) for n, t in a.items()}
    assert mla_kernels.mla_decode(**empty, indices=idx[:0]).shape == (0, s_q, 4, 64)
    blockless = dict(a, block_table=a["block_table"][:, :0], cache_seqlens=torch.zeros_like(a["cache_seqlens"]))
    out, lse = mla_kernels.mla_decode(**blockless, return_lse=True, indices=torch.full_like(idx, -1))
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())


def test_token_axis_holds_more_than_65535_tokens(device, monkeypatch):
    """A program per query token on the grid's first axis (limit 2^31 - 1), not the second (65535 on a GPU): a
    sparse prefill chunk of 70000 tokens must launch. The launch grid is checked, not run (the interpreter would take
    minutes): the first axis holds B * S_q."""
    from mla_kernels import decode

    launches = record_launches(monkeypatch, decode, "_mla_sparse_attn_kernel", "_mla_combine_kernel")
    a = inputs([70000], 70000, 1, 64, torch.bfloat16, "meta", r=64, p=16)
    idx = torch.empty(1, 70000, 8, dtype=torch.int32, device="meta")
    decode._launch(a["q_nope"], a["q_pe"], a["kv_cache"], a["pe_cache"], a["block_table"], a["cache_seqlens"], None,
                   SCALE, True, False, batch=1, seq_q=70000, total_tokens=70000, max_seqlen_q=70000,
                   max_seqlen_k=70000, num_splits=1, indices=idx.view(70000, 8))
    grid = launches[0][0]
    assert grid[0] == 70000 and grid[1] <= 65535 and grid[2] <= 65535, [g for g, _, _ in launches]
