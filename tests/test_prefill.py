"""mla_prefill and mla_prefill_attention against the float64 references: parity of both paths, paging,
ragged batches, poisoning, the cost model's choice, the PyTorch path, bad input."""

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import mla_kernels
from mla_kernels import reference
from helpers import (SENTINEL_BLOCK, assert_close, assert_lse_close, assert_rejects, bound_allocations,
                     make_paged_cache, record_launches)
from mla_kernels import _utils, decode, prefill

ON_GPU = torch.cuda.is_available()
SCALE = 192 ** -0.5  # DeepSeek's (nope 128 + rope 64) ** -0.5: with unit-variance q and cache, softmax is far from uniform
R, P, D_NOPE, D_V = 512, 64, 128, 128
# mla_prefill_attention rounds one score operand to the input dtype that the float64 reference keeps exact: the
# absorbed query (absorbed path) or the expanded K_nope (expanded path). Each score then carries a relative error of
# ~2^-9/sqrt(3) per term in bf16: ~1e-3 RMS at these scales, so the lse (a soft max of scores) is off by up to ~5x
# that over thousands of rows. fp16 rounds 8x finer.
LSE_ATOL_ROUNDED_Q = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def make_inputs(new, history, heads, page, dtype, device, r=R, p=P, d_nope=None, fused=True, seed=0):
    """A ragged batch: queries packed by cu_seqlens_q, a poisoned paged cache holding history + new tokens.

    With ``d_nope`` the nope query is raw ([T, H, d_nope]) and kv_b_proj's weight is returned too;
    otherwise q_nope is in latent space ([T, H, r]). With ``fused`` the queries are views of one buffer.
    """
    g = torch.Generator().manual_seed(seed)
    lens = [n + h for n, h in zip(new, history)]
    kv_cache, pe_cache, table = make_paged_cache(lens, page, (r, p), dtype, device, fused=fused, generator_seed=seed)
    width = r if d_nope is None else d_nope
    q = torch.randn(sum(new), heads, width + p, generator=g).to(dtype=dtype, device=device)
    q_nope, q_pe = (q[..., :width], q[..., width:]) if fused else (q[..., :width].contiguous(),
                                                                    q[..., width:].contiguous())
    cu = torch.tensor([0] + [sum(new[:i + 1]) for i in range(len(new))], dtype=torch.int32, device=device)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    args = dict(q_nope=q_nope, q_pe=q_pe, kv_cache=kv_cache, pe_cache=pe_cache, block_table=table, cu_seqlens_q=cu,
                cache_seqlens=seqlens)
    if d_nope is not None:  # unit-variance K_nope and V: rows of w_kv_b with norm ~1 against a unit-variance latent
        args["w_kv_b"] = (torch.randn(heads * (d_nope + D_V), r, generator=g) / math.sqrt(r)).to(dtype=dtype,
                                                                                                device=device)
    return args


def naive_reference(a, causal=True, scale=SCALE):
    """reference.naive_mla per sequence over the gathered cache, float64: (out [T, H, D_v], lse [T, H])."""
    heads = a["q_nope"].shape[1]
    d_v = a["w_kv_b"].shape[0] // heads - a["q_nope"].shape[2]
    out = torch.zeros(a["q_nope"].shape[0], heads, d_v, dtype=torch.float64)
    lse = torch.full((a["q_nope"].shape[0], heads), float("-inf"), dtype=torch.float64)
    for b in range(len(a["cache_seqlens"])):
        start, end, length = int(a["cu_seqlens_q"][b]), int(a["cu_seqlens_q"][b + 1]), int(a["cache_seqlens"][b])
        if end == start:
            continue
        kv_c = reference.gather_paged(a["kv_cache"].cpu(), a["block_table"][b].cpu(), length).double()
        k_pe = reference.gather_paged(a["pe_cache"].cpu(), a["block_table"][b].cpu(), length).double()
        out[start:end], lse[start:end] = reference.naive_mla(
            a["q_nope"][start:end].cpu().double(), a["q_pe"][start:end].cpu().double(), kv_c, k_pe,
            a["w_kv_b"].cpu().double(), scale, causal)
    return out, lse


def absorbed_reference(a, causal=True):
    return reference.absorbed_prefill(*(a[k] for k in ("q_nope", "q_pe", "kv_cache", "pe_cache", "block_table",
                                                         "cu_seqlens_q", "cache_seqlens")), SCALE, causal=causal)


# (new tokens, history, heads, page): ragged batches with empty and single-token sequences, lengths that are not
# multiples of the tile or the page, histories of 0 and of thousands, every head count of the contract
SEED_003 = ([64, 128, 256, 256], [512, 0, 0, 256], 16, 16)
CASES = {
    "seed003-h16-page16": SEED_003,
    "ragged-empty-h5-page1": ([0, 17, 1, 0, 33], [5, 0, 40, 0, 3], 5, 1),
    "history4100-h1-page64": ([3, 1, 0, 70], [4097, 2100, 50, 0], 1, 64),
    "single-tokens-h16-page64": ([1, 1, 1], [0, 100, 1], 16, 64),
    "h128-short-page16": ([2, 1, 0], [7, 0, 3], 128, 16),
}


# ------------------------------------------------------------------------------------------------
# mla_prefill: the absorbed (latent-space) kernel
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_prefill_parity(case, device, poisoned_empty):
    new, history, heads, page = CASES[case]
    a = make_inputs(new, history, heads, page, torch.bfloat16, device)
    out, lse = mla_kernels.mla_prefill(**a, softmax_scale=SCALE, return_lse=True)
    ref_out, ref_lse = absorbed_reference(a)
    assert out.dtype == torch.bfloat16 and out.shape == a["q_nope"].shape
    assert lse.dtype == torch.float32 and lse.shape == a["q_nope"].shape[:2]
    assert_close(case, out, ref_out, torch.bfloat16)
    assert_lse_close(case, lse, ref_lse)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_prefill_fp16_separate_buffers_int64(causal, device, poisoned_empty):
    """fp16, q and caches as separate contiguous tensors, int64 metadata, causal and not."""
    a = make_inputs([0, 17, 1, 9], [5, 0, 40, 3], 5, 16, torch.float16, device, fused=False)
    a.update(block_table=a["block_table"].long(), cu_seqlens_q=a["cu_seqlens_q"].long(),
             cache_seqlens=a["cache_seqlens"].long())
    out, lse = mla_kernels.mla_prefill(**a, softmax_scale=SCALE, causal=causal, return_lse=True)
    ref_out, ref_lse = absorbed_reference(a, causal)
    assert_close(f"fp16 causal={causal}", out, ref_out, torch.float16)
    assert_lse_close(f"fp16 causal={causal}", lse, ref_lse)


def test_prefill_gpu_tiles_and_forced_splits(device, monkeypatch, poisoned_empty):
    """The tiles a GPU runs (decode's config, which the interpreter otherwise replaces by large tiles), with the
    cache split across programs; and max_seqlen_q given (the no-synchronisation form)."""
    monkeypatch.setattr(prefill, "_absorbed_config", lambda *args: None)
    a = make_inputs([0, 21, 1, 6], [40, 3, 90, 0], 3, 16, torch.bfloat16, device)
    ref_out, ref_lse = absorbed_reference(a)
    for splits in (1, 3):
        out, lse = mla_kernels.mla_prefill(**a, softmax_scale=SCALE, return_lse=True, num_splits=splits,
                                           max_seqlen_q=21, max_seqlen_k=100)
        assert_close(f"gpu tiles, {splits} splits", out, ref_out, torch.bfloat16)
        assert_lse_close(f"gpu tiles, {splits} splits", lse, ref_lse)


def test_prefill_empty_batch_and_no_new_tokens(device):
    """B = 0, and B > 0 with no new tokens at all: empty outputs, nothing read (the block table is all sentinels)."""
    a = make_inputs([0, 0], [4, 0], 2, 16, torch.bfloat16, device)
    a["block_table"].fill_(SENTINEL_BLOCK)
    a["cache_seqlens"].zero_()
    out, lse = mla_kernels.mla_prefill(**a, softmax_scale=SCALE, return_lse=True)
    assert out.shape == (0, 2, R) and lse.shape == (0, 2)
    a.update(block_table=a["block_table"][:0], cu_seqlens_q=a["cu_seqlens_q"][:1], cache_seqlens=a["cache_seqlens"][:0])
    assert mla_kernels.mla_prefill(**a, softmax_scale=SCALE).shape == (0, 2, R)


@pytest.mark.parametrize("path", ["absorbed", "expanded", "auto"])
def test_attention_empty_batch_and_no_new_tokens(path, device):
    a = make_inputs([0, 0], [4, 0], 2, 16, torch.bfloat16, device, d_nope=D_NOPE)
    out, lse = mla_kernels.mla_prefill_attention(**a, softmax_scale=SCALE, path=path, return_lse=True)
    assert out.shape == (0, 2, D_V) and lse.shape == (0, 2)
    a["cache_seqlens"].zero_()
    a.update(block_table=a["block_table"][:0], cu_seqlens_q=a["cu_seqlens_q"][:1], cache_seqlens=a["cache_seqlens"][:0])
    assert mla_kernels.mla_prefill_attention(**a, softmax_scale=SCALE, path=path).shape == (0, 2, D_V)


@pytest.mark.parametrize("call", ["mla_prefill", "absorbed", "expanded", "auto"])
def test_batch_past_the_grid_is_refused(call, device):
    """Prefill's kernels launch a program per sequence on a grid axis that CUDA caps at 65535 (the expanded one's
    third, the gather's and the absorbed decode kernel's second): 65536 sequences are a ValueError naming
    cu_seqlens_q, on every device and path, before anything runs; 65535 are taken (no new tokens: nothing to do)."""
    a = make_inputs([0], [0], 2, 16, torch.bfloat16, device, d_nope=None if call == "mla_prefill" else D_NOPE)
    for batch in (65536, 65535):
        a.update(block_table=a["block_table"][:1].expand(batch, -1).contiguous(),
                 cu_seqlens_q=a["cu_seqlens_q"][:1].expand(batch + 1).contiguous(),
                 cache_seqlens=a["cache_seqlens"][:1].expand(batch).contiguous())
        if call == "mla_prefill":
            run = lambda: mla_kernels.mla_prefill(**a, softmax_scale=SCALE)  # noqa: E731
        else:
            run = lambda: mla_kernels.mla_prefill_attention(**a, softmax_scale=SCALE, path=call)  # noqa: E731
        if batch > 65535:
            with pytest.raises(ValueError, match="cu_seqlens_q's length - 1 is 65536: one call takes at most 65535"):
                run()
        else:
            assert run().shape[0] == 0


def test_attention_accepts_a_strided_w_kv_b(device):
    """kv_b_proj's weight as a transposed view (a tied or re-laid-out parameter) gives the same result."""
    a = make_inputs([9, 4], [3, 20], 2, 16, torch.bfloat16, device, d_nope=D_NOPE)
    strided = a["w_kv_b"].T.contiguous().T
    assert not strided.is_contiguous()
    ref_out, _ = naive_reference(a)
    for path in ("absorbed", "expanded"):
        expected = mla_kernels.mla_prefill_attention(**a, softmax_scale=SCALE, path=path)
        got = mla_kernels.mla_prefill_attention(**dict(a, w_kv_b=strided), softmax_scale=SCALE, path=path)
        assert_close(f"strided w_kv_b {path}", got, ref_out, torch.bfloat16)  # test_attention_parity's bound
        assert_close(f"strided w_kv_b {path} vs contiguous", got, expected, torch.bfloat16)  # GEMMs may sum in another order


def test_prefill_matches_decode_for_one_token(device):
    """One new token per sequence is a decode step: the same kernel body on the same inputs, only the tiles differ
    (BLOCK_N: where the running max is taken, so where each probability's bf16 rounding falls)."""
    a = make_inputs([1, 1, 1], [30, 0, 77], 4, 16, torch.bfloat16, device)
    out = mla_kernels.mla_prefill(**a, softmax_scale=SCALE, num_splits=1)
    dec = mla_kernels.mla_decode(a["q_nope"][:, None], a["q_pe"][:, None], a["kv_cache"], a["pe_cache"],
                                 a["block_table"], a["cache_seqlens"], SCALE, num_splits=1)
    # not bit for bit (measured: 5% of the values differ, by one ulp, a relative RMS of 3.2e-4): a probability rounded
    # to bf16 against another running max differs by < 1 ulp, averaged away over the keys, and the output's own
    # rounding then flips by one ulp at most, so the relative RMS stays below one bf16 ulp, 2^-8 (RMS_TOL, 8e-3, is
    # each against float64 and would let a 1% change of the scores through: two results each that far from it)
    assert_close("prefill vs decode", out, dec[:, 0], torch.bfloat16, rms_tol=2 ** -8, cos_tol=2 ** -16)


def _sequence_alone(a: dict, b: int, page: int) -> dict:
    """Sequence ``b`` of prefill inputs as a batch of its own: its query rows, its block table row cut to its own
    length (as a serving engine gives a request that runs alone), its lengths."""
    cu = a["cu_seqlens_q"].tolist()
    length = int(a["cache_seqlens"][b])
    one = dict(a, q_nope=a["q_nope"][cu[b]:cu[b + 1]], q_pe=a["q_pe"][cu[b]:cu[b + 1]],
               block_table=a["block_table"][b:b + 1, :max(1, -(-length // page))].contiguous(),
               cu_seqlens_q=a["cu_seqlens_q"].new_tensor([0, cu[b + 1] - cu[b]]),
               cache_seqlens=a["cache_seqlens"][b:b + 1])
    return one


SPLIT_BATCH = ([5, 40, 0, 17], [700, 3, 20, 0], 3, 16)  # (new, history, heads, page): max_seqlen_q 40 in the batch


@pytest.mark.parametrize("split_tokens", [1, 64, 1 << 40], ids=lambda n: f"split{n}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_prefill_split_tokens_give_each_sequence_the_same_bits_in_any_batch(split_tokens, dtype, device,
                                                                              poisoned_empty):
    """``mla_prefill(split_tokens=n)``: each sequence's output and lse are bitwise those it gets alone (with its own
    block table and ``max_seqlen_q``), and under another ``max_seqlen_q``/``max_seqlen_k``, and match the reference.
    On a GPU the default's tiles follow the batch's ``max_seqlen_q`` (16 x 32 for a one-token sequence at 16 heads
    alone, 64 x 64 beside a prompt) and its split count the batch; under the interpreter the default runs one split
    and tiles that follow ``max_seqlen_q`` too (``test_prefill_split_tokens_tiles_follow_no_batch`` records them)."""
    new, history, heads, page = SPLIT_BATCH
    a = make_inputs(new, history, heads, page, dtype, device, r=64, p=16)
    out, lse = mla_kernels.mla_prefill(**a, softmax_scale=SCALE, return_lse=True, split_tokens=split_tokens)
    ref_out, ref_lse = absorbed_reference(a)
    assert_close(f"split_tokens={split_tokens}", out, ref_out, dtype)
    assert_lse_close(f"split_tokens={split_tokens}", lse, ref_lse)
    again = mla_kernels.mla_prefill(**a, softmax_scale=SCALE, return_lse=True, split_tokens=split_tokens,
                                    max_seqlen_q=64, max_seqlen_k=2000)
    assert torch.equal(out, again[0]) and torch.equal(lse, again[1]), "max_seqlen_q/max_seqlen_k changed the bits"
    cu = a["cu_seqlens_q"].tolist()
    for b in (0, 1, 3):
        alone = mla_kernels.mla_prefill(**_sequence_alone(a, b, page), softmax_scale=SCALE, return_lse=True,
                                        split_tokens=split_tokens)
        assert torch.equal(out[cu[b]:cu[b + 1]], alone[0]), f"sequence {b}: its output alone differs"
        assert torch.equal(lse[cu[b]:cu[b + 1]], alone[1]), f"sequence {b}: its lse alone differs"


def test_prefill_split_tokens_tiles_follow_no_batch(monkeypatch):
    """What makes the bits the batch's, recorded: without ``split_tokens`` the attention kernel's tiles follow the
    batch's ``max_seqlen_q`` (a sequence alone and in the batch get other tiles) and, on a GPU, its split count the
    batch; with it, the tiles are a one-token decode's at this head count (``mla_decode``'s own launch) and the
    splits are ``split_tokens`` long, alone and in the batch."""

    new, history, heads, page = SPLIT_BATCH
    a = make_inputs(new, history, heads, page, torch.float32, "cpu", r=64, p=16)
    launches = record_launches(monkeypatch, decode, "_mla_attn_kernel", "_mla_combine_kernel")

    def attention(args, **kw):  # the attention launch's tiles, split length (its 18th argument), combines
        launches.clear()
        mla_kernels.mla_prefill(**args, softmax_scale=SCALE, **kw)
        (_, params, kwargs), *combine = launches
        return tuple(kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")), params[17], len(combine)

    alone = _sequence_alone(a, 0, page)
    assert attention(a)[0] != attention(alone)[0], "the default's tiles no longer follow max_seqlen_q: reword"
    launches.clear()
    mla_kernels.mla_decode(alone["q_nope"][:1, None], alone["q_pe"][:1, None], a["kv_cache"], a["pe_cache"],
                           alone["block_table"], alone["cache_seqlens"], SCALE, split_tokens=64)
    (_, _, decode_kwargs), _ = launches
    decode_tiles = tuple(decode_kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"))
    batch, one = attention(a, split_tokens=64), attention(alone, split_tokens=64)
    assert batch[0] == one[0] == decode_tiles, (batch, one, decode_tiles)
    assert batch[1] == one[1] == 64, "splits of split_tokens keys (a multiple of the key tile here)"
    assert batch[2] == one[2] == 1, "the split combine must run alone and in the batch"


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_prefill_split_tokens_partials_stay_within_their_budget(causal, device, monkeypatch):
    """``split_tokens`` gives every row an fp32 partial per split of the batch's longest key range (a 4096-token
    prompt at 128 heads and n = 256: 16 GiB): past ``SPLIT_PARTIALS_BYTES`` the call runs as launches over pieces of
    the sequences, each piece its own ragged sequence, and gives the bits of one launch, with no buffer past the
    budget. Here a 1 KiB-per-split budget cuts 3 sequences into launches of a few tokens."""
    new, history, heads, page = [7, 0, 12], [9, 4, 30], 2, 4
    a = make_inputs(new, history, heads, page, torch.float32, device, r=16, p=16)
    whole = mla_kernels.mla_prefill(**a, softmax_scale=SCALE, causal=causal, return_lse=True, split_tokens=4)
    budget = 4 * heads * 17 * 4 * 3  # 4 rows of 2 heads x (16 + 1) fp32 x 3 splits
    monkeypatch.setattr(decode, "SPLIT_PARTIALS_BYTES", budget)
    launches = prefill._pieces([0, 7, 7, 19], [16, 4, 42], heads, 16, 4, causal)
    covered, order = {}, []  # every new token once, in the packed order
    for b, i, j, _ in (piece for launch in launches for piece in launch):
        assert j > i and i == covered.get(b, 0), (b, i, j)
        if not order or order[-1] != b:
            assert b not in order, "a sequence's pieces must be consecutive"
            order.append(b)
        covered[b] = j
    assert len(launches) > 3 and covered == {b: n for b, n in enumerate(new) if n}
    calls = []
    real = prefill._launch
    monkeypatch.setattr(prefill, "_launch", lambda *args, **kw: calls.append(kw["batch"]) or real(*args, **kw))
    bound_allocations(monkeypatch, budget // 4 + 1, "a split_tokens prefill's partials past their budget")
    pieces = mla_kernels.mla_prefill(**a, softmax_scale=SCALE, causal=causal, return_lse=True, split_tokens=4)
    monkeypatch.undo()
    assert len(calls) == len(launches) > 3
    assert torch.equal(pieces[0], whole[0]) and torch.equal(pieces[1], whole[1]), "a piece's rows changed bits"
    ref_out, ref_lse = reference.absorbed_prefill(*(a[k] for k in ("q_nope", "q_pe", "kv_cache", "pe_cache",
                                                                     "block_table", "cu_seqlens_q", "cache_seqlens")),
                                                  SCALE, causal=causal)
    assert_close("pieces", pieces[0], ref_out, torch.float32)
    assert_lse_close("pieces", pieces[1], ref_lse)


def test_prefill_pieces_check_the_lengths_they_read(device, monkeypatch):
    """A GPU prefill given ``max_seqlen_q`` and no host lengths reads them only to cut a ``split_tokens`` batch into
    pieces: what it read is value-checked as a read on the CPU is (a length below its new tokens, or past the
    ``max_seqlen_k`` given, cut pieces of negative or unbounded size). Called as that GPU call is, with no host."""
    a = make_inputs([7, 5], [9, 4], 2, 4, torch.float32, device, r=16, p=16)
    monkeypatch.setattr(decode, "SPLIT_PARTIALS_BYTES", 1024)
    args = [a[k] for k in ("q_nope", "q_pe", "kv_cache", "pe_cache", "block_table", "cu_seqlens_q", "cache_seqlens")]

    def run(max_seqlen_k):
        return prefill._run_absorbed(*args, SCALE, True, False, 2, 7, max_seqlen_k, None, None, split_tokens=4)

    whole = mla_kernels.mla_prefill(**a, softmax_scale=SCALE, split_tokens=4)
    assert torch.equal(run(16)[0], whole), "the pieces of a GPU call without host lengths"
    with pytest.raises(ValueError, match=r"max_seqlen_k=12 is below the longest cache_seqlens 16"):
        run(12)
    args[6] = torch.tensor([16, 3], dtype=torch.int32, device=device)  # sequence 1 holds fewer than its 5 new tokens
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\]=3 is smaller than sequence 1's 5 new tokens"):
        run(16)


@pytest.mark.parametrize("heads", [3, 16])
def test_prefill_split_tokens_rows_are_those_of_a_multi_token_decode(heads, device):
    """With ``split_tokens`` the bits of S_q new tokens are the same from ``mla_decode`` (``[B, S_q, H]``: what
    ``MLAttention`` runs when every sequence of a step has the same count) and from ``mla_prefill`` (a ragged step).
    The decode's tiles followed S_q x H rows (64 x 64 at 3 heads and 8 tokens, 16 x 32 for the prefill), so a
    sequence's attention bits followed the other sequences of its module step."""
    s_q, page = 8 if heads == 3 else 2, 16
    a = make_inputs([s_q, s_q], [100, 37], heads, page, torch.bfloat16, device)
    out, lse = mla_kernels.mla_prefill(**a, softmax_scale=SCALE, return_lse=True, split_tokens=8)
    q_nope, q_pe = (a[k].unflatten(0, (2, s_q)) for k in ("q_nope", "q_pe"))
    dec = mla_kernels.mla_decode(q_nope, q_pe, a["kv_cache"], a["pe_cache"], a["block_table"], a["cache_seqlens"],
                                 SCALE, return_lse=True, split_tokens=8)
    assert torch.equal(dec[0].flatten(0, 1), out) and torch.equal(dec[1].flatten(0, 1), lse)


@pytest.mark.parametrize("path", ["absorbed", "expanded"])
def test_a_nan_in_a_used_cache_slot_makes_the_rows_that_see_it_nan(path, device):
    """A NaN in a history token makes every row of its sequence NaN (all see it, causal or not), out and lse; the
    other sequence is untouched. Before, the expanded kernel gave those rows lse -inf, as if they saw no key."""
    a = make_inputs([3, 2], [6, 4], 2, 4, torch.float32, device, r=32, p=16, d_nope=16)
    a["kv_cache"][int(a["block_table"][0, 0]), 1, 2] = float("nan")  # position 1 of sequence 0: history
    out, lse = mla_kernels.mla_prefill_attention(**a, softmax_scale=SCALE, path=path, return_lse=True)
    assert out[:3].isnan().all() and lse[:3].isnan().all(), (out[:3], lse[:3])
    assert out[3:].isfinite().all() and lse[3:].isfinite().all()


@pytest.mark.parametrize("torch_path", [False, True], ids=["kernels", "pytorch"])
@pytest.mark.parametrize("scores", ["minus-inf-query", "scaled-past-float32"])
def test_rows_whose_first_keys_all_score_minus_inf(scores, torch_path, device, monkeypatch):
    """Keys whose scores are all -inf for a row get no weight, on every path and whatever the tiling, as in the
    reference: a row that sees no other key gives zeros and lse -inf, the others the softmax of the keys left.
    Sequence 0 has 70 history tokens, so the expanded kernel's first 64 keys are a tile without masks; sequence 1
    has 10 (masked tiles only). "minus-inf-query": head 0's K_nope[:, 0] is the latent's first value, positive in
    every used slot, and the first new token of each sequence has q_nope[0] = -inf: each of its scores is -inf.
    "scaled-past-float32": finite inputs, the first new token's head 0 has scores -3e38 (times the scale 1.0:
    inside float32, past the kernels' log2 units, so -inf there) for the first 64 keys of sequence 0 and 3 for the
    others. Before, the expanded kernel's unmasked tiles took the row max as finite: exp2(-inf - -inf) made those
    rows NaN in sequence 0 (a row of sequence 1 gave zeros), and the PyTorch expanded path gave NaN for a row
    without keys."""
    if torch_path:
        monkeypatch.setattr(_utils, "interpreting", lambda: False)
    a = make_inputs([5, 3], [70, 10], 2, 16, torch.float32, device, r=32, p=16, d_nope=16)
    w = a["w_kv_b"].view(2, 16 + D_V, 32)
    w[0, 0] = 0.0
    w[0, 0, 0] = 1.0  # head 0: K_nope[:, 0] = latent[:, 0]
    table, kv = a["block_table"], a["kv_cache"]
    firsts = [0, 5]  # the first new token of each sequence
    scale = SCALE
    for b, length in enumerate(a["cache_seqlens"].tolist()):
        pos = torch.arange(length)
        slots = (table[b, pos // 16].long(), pos % 16)  # used slots only: the unused keep their NaN
        if scores == "minus-inf-query":
            kv[slots[0], slots[1], 0] = kv[slots[0], slots[1], 0].abs() + 0.5
        else:
            kv[slots[0], slots[1], 0] = torch.where(pos < 64, 1.0, -1e-38).to(kv.dtype) if b == 0 else -1e-38
    for t in firsts:
        if scores == "minus-inf-query":
            a["q_nope"][t, 0, 0] = float("-inf")
        else:
            a["q_nope"][t, 0] = 0.0
            a["q_nope"][t, 0, 0] = -3e38
            a["q_pe"][t, 0] = 0.0
    if scores == "scaled-past-float32":
        scale = 1.0
        a["q_nope"][firsts[1], 0, 0] = 3.0  # sequence 1: plain finite scores for that row
    ref_out, ref_lse = naive_reference(a, scale=scale)
    if scores == "minus-inf-query":
        assert torch.equal(ref_out[firsts, 0], torch.zeros_like(ref_out[firsts, 0]))
        assert ref_lse[firsts, 0].isneginf().all()
    else:
        assert ref_out.isfinite().all()
    for path in ("absorbed", "expanded"):
        if path == "absorbed" and scores == "minus-inf-query":
            continue  # absorbing q multiplies its -inf by W_UK's zeros: NaN in q's latent (the reference keeps q)
        out, lse = mla_kernels.mla_prefill_attention(**a, softmax_scale=scale, path=path, return_lse=True)
        assert_close(f"{scores} {path}", out, ref_out, torch.float32)
        assert_lse_close(f"{scores} {path}", lse, ref_lse)


@pytest.mark.parametrize("path", ["absorbed", "expanded"])
def test_every_row_sees_its_own_key_at_query_block_ends(path, device):
    """Each query row against the reference on its own, in fp32: the last row of a full query block (rows 63 and
    127 of the expanded kernel's 64- and 128-row tiles, the last token of a sequence whose new tokens fill a
    block) must see its own key. A causal key bound one short there drops just that key from that one row, a
    change the batch-wide RMS of the other parity tests dilutes below their bf16 bound (it passed all of them);
    per row in fp32 (1e-5, as test_rows_whose_first_keys_all_score_minus_inf) it is ~10% of the row. The absorbed
    kernel's rows are (token, head) pairs: with one head a block's last row is a token's only one, so a key bound
    taken from the wrong row shows too (with two heads the last two rows are the same token)."""
    # 64 new tokens (64-row tiles) without and with history; 200 (128-row tiles) with history
    for heads in (1, 3):
        for new, history in (([64, 5], [0, 7]), ([64], [9]), ([200, 1], [3, 0])):
            a = make_inputs(new, history, heads, 16, torch.float32, device, r=32, p=16, d_nope=16)
            out, lse = mla_kernels.mla_prefill_attention(**a, softmax_scale=SCALE, path=path, return_lse=True)
            ref_out, ref_lse = naive_reference(a)
            name = f"{path} H{heads} {new}/{history}"
            for t in range(out.shape[0]):
                assert_close(f"{name} row {t}", out[t], ref_out[t], torch.float32)
            assert_lse_close(name, lse, ref_lse)


def test_cache_is_not_modified(device):
    a = make_inputs([5, 3], [20, 9], 3, 16, torch.bfloat16, device, d_nope=D_NOPE)
    before = a["kv_cache"].view(torch.int16).clone(), a["pe_cache"].view(torch.int16).clone()
    mla_kernels.mla_prefill_attention(**a, softmax_scale=SCALE, path="expanded")
    mla_kernels.mla_prefill_attention(**a, softmax_scale=SCALE, path="absorbed")
    assert torch.equal(a["kv_cache"].view(torch.int16), before[0])
    assert torch.equal(a["pe_cache"].view(torch.int16), before[1])


# ------------------------------------------------------------------------------------------------
# mla_prefill_attention: raw queries and kv_b_proj's weight, absorbed or expanded, against naive MLA
# ------------------------------------------------------------------------------------------------

# the expanded kernel runs one program per (query block, head), so the interpreter's time grows with the heads:
# 128 heads run on a single short sequence
ATTENTION_CASES = {
    "seed003-h16-page16": SEED_003,
    "ragged-empty-h5-page1": CASES["ragged-empty-h5-page1"],
    "history4100-h1-page64": CASES["history4100-h1-page64"],
    "prompt200-h2-page64": ([200, 0, 1], [0, 0, 130], 2, 64),
    "h128-short-page16": ([3], [13], 128, 16),
}


@pytest.mark.parametrize("path", ["absorbed", "expanded"])
@pytest.mark.parametrize("case", list(ATTENTION_CASES), ids=list(ATTENTION_CASES))
def test_attention_parity(case, path, device, poisoned_empty):
    new, history, heads, page = ATTENTION_CASES[case]
    a = make_inputs(new, history, heads, page, torch.bfloat16, device, d_nope=D_NOPE)
    out, lse = mla_kernels.mla_prefill_attention(**a, softmax_scale=SCALE, path=path, return_lse=True)
    ref_out, ref_lse = naive_reference(a)
    assert out.dtype == torch.bfloat16 and out.shape == (sum(new), heads, D_V)
    assert out.is_contiguous(), "both paths give a contiguous output (path='auto' picks either)"
    # absorbed: q absorbed and the latent output rounded to bf16 before the bf16 W_UV GEMM; expanded: K and V
    # rounded to bf16 by the expansion GEMM (as transformers does). Each adds one rounding: still ~2 ulp RMS.
    assert_close(f"{case} {path}", out, ref_out, torch.bfloat16)
    assert_lse_close(f"{case} {path}", lse, ref_lse, LSE_ATOL_ROUNDED_Q[torch.bfloat16])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_attention_expanded_fp16_non_causal_d_v_64(causal, device, poisoned_empty):
    """fp16, separate buffers, a D_v that differs from D_nope, causal and not."""
    a = make_inputs([9, 0, 70], [3, 8, 0], 3, 16, torch.float16, device, d_nope=D_NOPE, fused=False)
    a["w_kv_b"] = a["w_kv_b"].view(3, D_NOPE + D_V, R)[:, :D_NOPE + 64].reshape(-1, R)
    out, lse = mla_kernels.mla_prefill_attention(**a, softmax_scale=SCALE, causal=causal, path="expanded",
                                                 return_lse=True)
    ref_out, ref_lse = naive_reference(a, causal)
    assert out.shape == (79, 3, 64)
    assert_close(f"fp16 expanded causal={causal}", out, ref_out, torch.float16)
    assert_lse_close(f"fp16 expanded causal={causal}", lse, ref_lse, LSE_ATOL_ROUNDED_Q[torch.float16])


# ------------------------------------------------------------------------------------------------
# the expanded path's latent gather: one Triton kernel against its PyTorch reference
# ------------------------------------------------------------------------------------------------

# (cache lengths, page size): ragged, zero-length sequences first, last and between, lengths off the page and the
# tile; 130 sequences make each program's prefix sum of the lengths take two steps (GATHER_BLOCK_B = 128)
GATHER_CASES = {
    "ragged-page1": ([0, 17, 1, 0, 33], 1),
    "ragged-page16": ([5, 0, 40, 16, 3, 0], 16),
    "history-page64": ([1100, 301, 50, 0, 70], 64),
    "130-sequences-page16": ([(7 * b) % 23 for b in range(130)], 16),
}


def gather_both(kv_cache, table, lens, device, kv_scale=None, dtype=None, block_n=None):
    """The kernel's (latent, cu_seqlens_k) and the PyTorch reference's, for ``lens``."""
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    total = sum(lens)
    got, cu_k = prefill._gather_latent(kv_cache, table, seqlens, total, max(lens), kv_scale, dtype, block_n=block_n)
    ref_cu = torch.nn.functional.pad(torch.cumsum(seqlens, 0), (1, 0))
    ref = prefill._gather_latent_torch(kv_cache, table, seqlens, ref_cu, total, kv_scale, dtype)
    return (got, cu_k), (ref, ref_cu)


@pytest.mark.parametrize("tiles", ["own-tiles", "gpu-tiles"])
@pytest.mark.parametrize("case", list(GATHER_CASES), ids=list(GATHER_CASES))
def test_gather_kernel_matches_the_reference(case, tiles, device, poisoned_empty):
    """Bit for bit: the packed latent and cu_seqlens_k. The cache is NaN wherever no sequence has a token, unused
    block-table entries are a sentinel id far outside it, blocks are shuffled and the output starts as NaN: a read
    of any unused slot, or a row left unwritten, would show as NaN where the reference has a value."""
    lens, page = GATHER_CASES[case]
    kv_cache, _, table = make_paged_cache(lens, page, (R, P), torch.bfloat16, device)
    block_n = prefill.GATHER_ELEMENTS // R if tiles == "gpu-tiles" else None  # 16 rows: what a GPU runs at R 512
    (got, cu_k), (ref, ref_cu) = gather_both(kv_cache, table, lens, device, block_n=block_n)
    assert got.shape == (sum(lens), R) and got.dtype == torch.bfloat16 and not torch.isnan(ref).any()
    assert torch.equal(got.view(torch.int16), ref.view(torch.int16))
    assert cu_k.dtype == torch.int64 and torch.equal(cu_k, ref_cu)


def test_gather_kernel_int64_metadata_and_a_separate_cache(device, poisoned_empty):
    """int64 block table and lengths, a contiguous latent cache (not a view of the fused buffer), fp32, and a
    width other than 512."""
    lens = [9, 0, 31]
    kv_cache, _, table = make_paged_cache(lens, 4, (32, 16), torch.float32, device, fused=False)
    seqlens = torch.tensor(lens, dtype=torch.int64, device=device)
    got, cu_k = prefill._gather_latent(kv_cache, table.long(), seqlens, 40, 31)
    ref = prefill._gather_latent_torch(kv_cache, table, seqlens, torch.tensor([0, 9, 9, 40], device=device), 40)
    assert torch.equal(got, ref) and cu_k.tolist() == [0, 9, 9, 40]


def test_gather_kernel_dequantizes_an_fp8_cache(device, poisoned_empty):
    """An fp8 cache (unused slots poisoned: NaN values and NaN scales) gathered and dequantized to bf16: the
    product of an e4m3 value and its scale is exact in fp32 in both; rounding it to bf16 is exact to the reference
    on a GPU (round to nearest even) and at most one ulp below it in magnitude in the interpreter, which truncates
    (TRITON_NOTES.md)."""
    from test_fp8 import fp8_paged_cache

    lens = [5, 0, 40, 16, 3]
    kv8, scale, _, table = fp8_paged_cache(lens, 16, (256, 64), torch.bfloat16, device)
    (got, cu_k), (ref, ref_cu) = gather_both(kv8, table, lens, device, scale, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(cu_k, ref_cu) and not torch.isnan(ref).any()
    exact = torch.equal(got.view(torch.int16), ref.view(torch.int16))
    if _utils.interpreting() and device.type == "cpu":
        ulps = ref.view(torch.int16).int() - got.view(torch.int16).int()  # same sign: bit patterns order magnitudes
        assert ulps.min() >= 0 and ulps.max() <= 1 and (ulps == 0).float().mean() > 0.3, ulps.float().mean()
    else:
        assert exact


def test_cost_model():
    """The FLOP model and its stated crossover: 170.7 attended pairs per history key at DeepSeek's widths; the
    choice by estimated time (tests/test_prefill_cost.py checks it against recorded timings)."""
    widths = dict(heads=128, d_latent=512, d_rope=64, d_nope=128, d_v=128)
    flops = prefill.prefill_flops([10], [110], **widths)
    pairs = 10 * 100 + 10 * 11 // 2
    assert flops["pairs"] == pairs
    assert flops["absorbed_attention"] == 2 * 128 * pairs * 1088
    assert flops["absorbed"] == flops["absorbed_attention"] + 2 * 10 * 128 * 512 * 256
    assert flops["expanded"] == 2 * 128 * pairs * 320 + 2 * 110 * 128 * 512 * 256
    assert 512 * 256 / (2 * 512 - 256) == pytest.approx(170.67, abs=0.01)
    choose = prefill.choose_prefill_path
    assert choose([1] * 16, [4096] * 16, **widths) == "absorbed"  # decode-like
    assert choose([4096] * 8, [4096] * 8, **widths) == "expanded"  # long prompts
    assert choose([16], [16], **widths) == "expanded"  # tiny, no history: 3 launches each, fewer FLOPs expanded
    # equal attention speeds, no launch cost: near the FLOP crossover (moved by the GEMM's own rate and tile padding)
    flops_only = dict(prefill_launch_us=0.0, prefill_absorbed_tflops=380.0)
    assert choose([64], [10064], **widths, constants=flops_only) == "absorbed"
    assert choose([256], [10256], **widths, constants=flops_only) == "expanded"
    assert choose([172], [10172], **widths) == "expanded"
    assert choose([172], [10172], **widths, relative_speed=2.0) == "absorbed"
    assert choose([4096], [4096], **dict(widths, d_nope=96)) == "absorbed"  # the expanded kernel needs pow2 widths
    lens_003 = [n + h for n, h in zip(*SEED_003[:2])]
    assert prefill.prefill_flops(SEED_003[0], lens_003, **dict(widths, heads=16))["pairs"] == 174432
    # measured 0.50 (absorbed) vs 0.69 ms (expanded) with the code of then (16 launches expanded), which the model of
    # that code picks; today's expanded path launches 3 times, and the model predicts it the faster (0.40 vs 0.51 ms)
    seed_times = prefill._cost.estimate(SEED_003[0], lens_003, **dict(widths, heads=16),
                                        launches=prefill._cost.D07C6FE_LAUNCHES)
    assert prefill._cost.choose(seed_times) == "absorbed"
    assert choose(SEED_003[0], lens_003, **dict(widths, heads=16)) == "expanded"


@pytest.mark.parametrize("case", ["prompt100-h2", "short-over-history-h2"])
def test_auto_takes_the_cheaper_path(case, device, monkeypatch):
    """path="auto" asks the cost model, runs that path, and matches naive MLA."""
    new, history, expected = ([100], [0], "_launch_expanded") if case.startswith("prompt") else \
        ([4, 1], [600, 300], "_run_absorbed")
    # batches this small are launch-bound (the absorbed path's 3 launches win): without launch cost, FLOPs decide
    monkeypatch.setitem(prefill._cost.DEFAULTS, "prefill_launch_us", 0.0)
    a = make_inputs(new, history, 2, 64, torch.bfloat16, device, d_nope=D_NOPE)
    ran = []
    for name in ("_launch_expanded", "_run_absorbed"):
        real = getattr(prefill, name)
        monkeypatch.setattr(prefill, name, lambda *args, _real=real, _name=name, **kw: ran.append(_name)
                            or _real(*args, **kw))
    out = mla_kernels.mla_prefill_attention(**a, softmax_scale=SCALE)
    assert ran == [expected]
    assert_close(f"auto {case}", out, naive_reference(a)[0], torch.bfloat16)


def test_auto_never_picks_a_width_the_expanded_path_refuses(device, monkeypatch):
    """D_v = 2048 (a power of two, but past the expanded kernel's 1024): auto runs the absorbed path even where the
    time model favours the expanded one, instead of raising the expanded path's width error."""
    monkeypatch.setitem(prefill._cost.DEFAULTS, "prefill_absorbed_tflops", 1e-6)  # absorbed "slow": expanded favoured
    a = make_inputs([3, 2], [0, 4], 1, 16, torch.bfloat16, device, r=32, p=16, d_nope=16)
    a["w_kv_b"] = (torch.randn(16 + 2048, 32) / math.sqrt(32)).to(dtype=torch.bfloat16, device=device)
    assert prefill.choose_prefill_path([4096] * 8, [4096] * 8, 128, 512, 64, 128, 128) == "expanded"
    for d_nope, d_v in ((2048, 128), (128, 2048)):
        assert prefill.choose_prefill_path([4096] * 8, [4096] * 8, 128, 512, 64, d_nope, d_v) == "absorbed"
    out = mla_kernels.mla_prefill_attention(**a, softmax_scale=SCALE)
    assert out.shape == (5, 1, 2048)
    assert_close("auto, D_v 2048", out, naive_reference(a)[0], torch.bfloat16)


def test_an_expanded_kernel_the_gpu_refuses_falls_back_or_is_named(device, monkeypatch):
    """Where the GPU refuses the expanded kernel for want of shared memory even at its smallest tiles (fp32 with
    D_nope = D_v = P = 1024 needs 256 KiB at 16 x 16, one stage, against an H100's 227; the interpreter has no such
    limit, so the refusal is simulated): "auto" runs the absorbed path, now and for later calls of these widths,
    and "expanded" raises a ValueError naming the widths and dtype (it raised Triton's OutOfResources)."""
    from triton.runtime.errors import OutOfResources

    monkeypatch.setattr(prefill, "_EXPANDED_UNFIT", set())
    monkeypatch.setitem(prefill._cost.DEFAULTS, "prefill_absorbed_tflops", 1e-6)  # expanded favoured
    a = make_inputs([3, 2], [0, 4], 1, 16, torch.float32, device, r=32, p=16, d_nope=16)
    refused = []

    def refuse(*args, **kwargs):
        refused.append(1)
        raise OutOfResources(262144, 232448, "shared memory")

    monkeypatch.setattr(prefill, "_launch_expanded", refuse)
    with pytest.raises(ValueError, match=r"path='expanded' does not fit .* D_nope=16, D_v=128, P=16 in "
                                         r"torch.float32"):
        mla_kernels.mla_prefill_attention(**a, softmax_scale=SCALE, path="expanded")
    want = naive_reference(a)[0]
    for _ in range(2):  # the first call tries the expanded kernel once; the second goes straight to absorbed
        out = mla_kernels.mla_prefill_attention(**a, softmax_scale=SCALE)
        assert_close("auto after the refusal", out, want, torch.float32)
    assert len(refused) == 2


def test_torch_path_matches_reference(monkeypatch):
    """CPU tensors without the interpreter take the PyTorch path: same contract, same results, for every call."""
    monkeypatch.setattr(_utils, "interpreting", lambda: False)
    a = make_inputs([0, 17, 1, 40], [5, 0, 40, 3], 16, 16, torch.bfloat16, "cpu", d_nope=D_NOPE)
    assert not _utils.use_triton(a["q_nope"])
    ref_out, ref_lse = naive_reference(a)
    for path in ("absorbed", "expanded", "auto"):
        out, lse = mla_kernels.mla_prefill_attention(**a, softmax_scale=SCALE, path=path, return_lse=True)
        assert_close(f"torch {path}", out, ref_out, torch.bfloat16)
        assert_lse_close(f"torch {path}", lse, ref_lse, LSE_ATOL_ROUNDED_Q[torch.bfloat16])
    a = make_inputs([0, 17, 1, 40], [5, 0, 40, 3], 16, 16, torch.bfloat16, "cpu")
    for causal in (True, False):
        out, lse = mla_kernels.mla_prefill(**a, softmax_scale=SCALE, causal=causal, return_lse=True)
        ref_out, ref_lse = absorbed_reference(a, causal)
        assert_close(f"torch mla_prefill causal={causal}", out, ref_out, torch.bfloat16)
        assert_lse_close(f"torch mla_prefill causal={causal}", lse, ref_lse)
    # a permuted q_nope: a contiguous result, as the kernel gives (it kept q's layout: [T, H, R] strided as [H, T, R])
    permuted = a["q_nope"].transpose(0, 1).contiguous().transpose(0, 1)
    out = mla_kernels.mla_prefill(**{**a, "q_nope": permuted}, softmax_scale=SCALE)
    assert out.is_contiguous() and torch.equal(out, mla_kernels.mla_prefill(**a, softmax_scale=SCALE))


# ------------------------------------------------------------------------------------------------
# bad input: a TypeError / ValueError naming the argument, never a crash or a silent result
# ------------------------------------------------------------------------------------------------


def _good(d_nope=None):
    a = make_inputs([10, 0, 3], [2, 4, 0], 4, 16, torch.bfloat16, "cpu", r=32, p=16, d_nope=d_nope)
    a["softmax_scale"] = SCALE
    return a


def _set(key, index, value):
    return lambda a: a[key].__setitem__(index, value)


BAD = {
    "q_nope-none": (lambda a: a.update(q_nope=None), TypeError, "q_nope"),
    # meta tensors hold no data: the length read failed inside torch (copy out of meta)
    "all-on-meta": (lambda a: a.update({k: v.to("meta") for k, v in a.items() if isinstance(v, torch.Tensor)}),
                    ValueError, "meta"),
    "causal-none": (lambda a: a.update(causal=None), TypeError, "causal"),
    "return_lse-int": (lambda a: a.update(return_lse=1), TypeError, "return_lse"),
    "kv_cache-requires-grad": (lambda a: a.update(kv_cache=a["kv_cache"].detach().requires_grad_()), ValueError,
                               "kv_cache"),
    "q_nope-rank": (lambda a: a.update(q_nope=a["q_nope"][None]), ValueError, "q_nope"),
    "q_nope-float32": (lambda a: a.update(q_nope=a["q_nope"].float()), TypeError, "q_nope"),
    "q_nope-last-dim-strided": (lambda a: a.update(q_nope=torch.zeros(13, 4, 64, dtype=torch.bfloat16)[..., ::2]),
                                ValueError, "q_nope"),
    "q_pe-dtype-mismatch": (lambda a: a.update(q_pe=a["q_pe"].half()), TypeError, "q_pe"),
    "q_pe-heads-mismatch": (lambda a: a.update(q_pe=a["q_pe"][:, :2]), ValueError, "q_pe"),
    "q_nope-width-vs-cache": (lambda a: a.update(q_nope=a["q_nope"][..., :16]), ValueError, "kv_cache"),
    "q_pe-width-vs-cache": (lambda a: a.update(q_pe=torch.zeros(13, 4, 32, dtype=torch.bfloat16)), ValueError,
                            "pe_cache"),
    "kv_cache-dtype": (lambda a: a.update(kv_cache=a["kv_cache"].half(), pe_cache=a["pe_cache"].half()), TypeError,
                       "kv_cache"),
    "kv_cache-rank": (lambda a: a.update(kv_cache=a["kv_cache"][0]), ValueError, "kv_cache"),
    "pe_cache-pages-mismatch": (lambda a: a.update(pe_cache=a["pe_cache"][1:]), ValueError, "pe_cache"),
    "cu_seqlens_q-none": (lambda a: a.update(cu_seqlens_q=None), TypeError, "cu_seqlens_q"),
    "cu_seqlens_q-float": (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"].float()), TypeError, "cu_seqlens_q"),
    "cu_seqlens_q-rank": (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"][None]), ValueError, "cu_seqlens_q"),
    "cu_seqlens_q-empty": (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"][:0]), ValueError, "cu_seqlens_q"),
    "cu_seqlens_q-strided": (lambda a: a.update(cu_seqlens_q=torch.tensor([0, 9, 10, 10, 13, 13, 13, 13],
                                                                          dtype=torch.int32)[::2]),
                             ValueError, "cu_seqlens_q"),
    "cu_seqlens_q-not-from-0": (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"] + 1), ValueError, "cu_seqlens_q"),
    "cu_seqlens_q-decreasing": (_set("cu_seqlens_q", 1, 11), ValueError, "cu_seqlens_q"),
    "cu_seqlens_q-not-to-T": (_set("cu_seqlens_q", 3, 12), ValueError, "cu_seqlens_q"),
    # past T, with the last sequence's cache too short for the tokens it claims: cu_seqlens_q is the argument at fault
    "cu_seqlens_q-past-T": (_set("cu_seqlens_q", 3, 14), ValueError, "cu_seqlens_q must end at"),
    # past T mid-list (then decreasing): cu_seqlens_q is at fault, not cache_seqlens[0], which it made look short
    "cu_seqlens_q-past-T-mid-list": (_set("cu_seqlens_q", 1, 14), ValueError, "cu_seqlens_q must be non-decreasing"),
    "cu_seqlens_q-batch-vs-table": (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"][1:] - 10), ValueError,
                                    "block_table"),
    # a cu_seqlens_q one sequence short: the batch size it sets is named as its own, not as "the batch"
    "cu_seqlens_q-one-sequence-short": (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"][:-1]), ValueError,
                                        r"block_table and cu_seqlens_q \(its length - 1\) disagree on batch size"),
    "cache_seqlens-float": (lambda a: a.update(cache_seqlens=a["cache_seqlens"].float()), TypeError,
                            "cache_seqlens"),
    "cache_seqlens-batch": (lambda a: a.update(cache_seqlens=a["cache_seqlens"][:2]), ValueError, "cache_seqlens"),
    "cache_seqlens-below-new-tokens": (_set("cache_seqlens", 0, 9), ValueError, "cache_seqlens"),
    # a negative length was blamed on the new tokens ("smaller than sequence 1's 0 new tokens")
    "cache_seqlens-negative": (_set("cache_seqlens", 1, -1), ValueError, r"cache_seqlens must be >= 0, got "
                               r"cache_seqlens\[1\]=-1"),
    "cache_seqlens-beyond-table": (_set("cache_seqlens", 0, 10_000), ValueError, "cache_seqlens"),
    "block_table-float": (lambda a: a.update(block_table=a["block_table"].float()), TypeError, "block_table"),
    "block_table-batch": (lambda a: a.update(block_table=a["block_table"][:2]), ValueError, "block_table"),
    "block_table-transposed": (lambda a: a.update(block_table=a["block_table"].T.contiguous().T), ValueError,
                               "block_table"),
    "block_table-id-out-of-range": (_set("block_table", (0, 0), SENTINEL_BLOCK), ValueError, "block_table"),
    "softmax_scale-none": (lambda a: a.update(softmax_scale=None), TypeError, "softmax_scale"),
    "softmax_scale-negative": (lambda a: a.update(softmax_scale=-1.0), ValueError, "softmax_scale"),
    "max_seqlen_q-too-small": (lambda a: a.update(max_seqlen_q=5), ValueError, "max_seqlen_q"),
    "max_seqlen_q-negative": (lambda a: a.update(max_seqlen_q=-1), ValueError, "max_seqlen_q"),
    "max_seqlen_k-too-small": (lambda a: a.update(max_seqlen_k=5), ValueError, "max_seqlen_k"),
    "num_splits-zero": (lambda a: a.update(num_splits=0), ValueError, "num_splits"),
    # each limit exactly: one past it is refused (a max_seqlen_q one short leaves a row unwritten)
    "max_seqlen_q-one-too-small": (lambda a: a.update(max_seqlen_q=9), ValueError, "max_seqlen_q=9 is below"),
    "max_seqlen_k-one-too-small": (lambda a: a.update(max_seqlen_k=11), ValueError, "max_seqlen_k=11 is below"),
    "cache_seqlens-one-past-table": (_set("cache_seqlens", 0, 33), ValueError,
                                     "length 33 beyond the block table's capacity 32"),
    "softmax_scale-zero": (lambda a: a.update(softmax_scale=0.0), ValueError, "softmax_scale"),
    "kv_cache-empty-pages": (lambda a: a.update(kv_cache=a["kv_cache"][:, :0], pe_cache=a["pe_cache"][:, :0]),
                             ValueError, "kv_cache"),
    "q_nope-no-heads": (lambda a: a.update(q_nope=a["q_nope"][:, :0], q_pe=a["q_pe"][:, :0]), ValueError, "q_nope"),
    "cu_seqlens_q-other-device": (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"].to("meta")), ValueError,
                                  "cu_seqlens_q"),
    "split_tokens-zero": (lambda a: a.update(split_tokens=0), ValueError, "split_tokens"),
    "split_tokens-float": (lambda a: a.update(split_tokens=64.0), ValueError, "split_tokens"),
    "split_tokens-and-num_splits": (lambda a: a.update(split_tokens=64, num_splits=2), ValueError,
                                    "split_tokens and num_splits"),
    # 65536 splits of one key each: past a launch grid's third axis (the bound names the keys, max_seqlen_k)
    "split_tokens-past-the-grid": (lambda a: a.update(split_tokens=1, max_seqlen_k=65536,
                                                      block_table=torch.zeros(3, 4096, dtype=torch.int32)),
                                   ValueError, "split_tokens=1 cuts 65536 keys"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input(case):
    args = _good()
    assert_rejects(mla_kernels.mla_prefill, args, *BAD[case])


BAD_ATTENTION = {
    "w_kv_b-none": (lambda a: a.update(w_kv_b=None), TypeError, "w_kv_b"),
    # meta tensors hold no data: the length read (or, with host lengths, the PyTorch path) failed inside torch (copy out of meta)
    "all-on-meta": (lambda a: a.update({k: v.to("meta") for k, v in a.items() if isinstance(v, torch.Tensor)}),
                    ValueError, "meta"),
    "all-on-meta-host-lengths": (lambda a: a.update({k: v.to("meta") for k, v in a.items() if isinstance(v, torch.Tensor)},
                                                    cu_seqlens_q_host=[0, 10, 10, 13], cache_seqlens_host=[12, 4, 3]),
                                 ValueError, "meta"),
    "causal-none": (lambda a: a.update(causal=None), TypeError, "causal"),
    "w_kv_b-rank": (lambda a: a.update(w_kv_b=a["w_kv_b"][None]), ValueError, "w_kv_b"),
    "w_kv_b-dtype": (lambda a: a.update(w_kv_b=a["w_kv_b"].half()), TypeError, "w_kv_b"),
    "w_kv_b-latent-width": (lambda a: a.update(w_kv_b=a["w_kv_b"][:, :16]), ValueError, "w_kv_b"),
    "w_kv_b-rows-not-per-head": (lambda a: a.update(w_kv_b=a["w_kv_b"][:-1]), ValueError, "w_kv_b"),
    "w_kv_b-no-value-rows": (lambda a: a.update(w_kv_b=a["w_kv_b"][:4 * 32]), ValueError, "w_kv_b"),
    "path-unknown": (lambda a: a.update(path="fast"), ValueError, "path"),
    "w_kv_b-other-device": (lambda a: a.update(w_kv_b=a["w_kv_b"].to("meta")), ValueError, "w_kv_b is on meta"),
    "expanded-d_nope-not-pow2": (lambda a: a.update(q_nope=a["q_nope"][..., :24], path="expanded",
                                                    w_kv_b=torch.zeros(4 * (24 + 128), 32, dtype=torch.bfloat16)),
                                 ValueError, "q_nope"),
    "cu_seqlens_q-not-to-T": (_set("cu_seqlens_q", 3, 12), ValueError, "cu_seqlens_q"),
    "cache_seqlens-below-new-tokens": (_set("cache_seqlens", 0, 9), ValueError, "cache_seqlens"),
    "cache_seqlens-negative": (_set("cache_seqlens", 0, -4), ValueError, r"cache_seqlens must be >= 0"),
    "q_nope-float32": (lambda a: a.update(q_nope=a["q_nope"].float()), TypeError, "q_nope"),
    # no backward pass: the absorbed path gave w_kv_b a partial gradient and q_nope none, the expanded one nothing
    "w_kv_b-requires-grad": (lambda a: a.update(w_kv_b=a["w_kv_b"].detach().requires_grad_()), ValueError, "w_kv_b"),
    "q_pe-requires-grad": (lambda a: a.update(q_pe=a["q_pe"].detach().requires_grad_()), ValueError, "q_pe"),
    "split_tokens-zero": (lambda a: a.update(split_tokens=0), ValueError, "split_tokens"),
    "split_tokens-bool": (lambda a: a.update(split_tokens=True), ValueError, "split_tokens"),
    # the expanded path's tiles and key/value GEMM follow the batch: refused, not silently taken
    "split_tokens-expanded": (lambda a: a.update(split_tokens=64, path="expanded"), ValueError, "split_tokens"),
}


@pytest.mark.parametrize("case", list(BAD_ATTENTION), ids=list(BAD_ATTENTION))
def test_bad_input_attention(case):
    args = _good(d_nope=32)
    assert_rejects(mla_kernels.mla_prefill_attention, args, *BAD_ATTENTION[case])


def test_attention_split_tokens_takes_the_absorbed_path(device, monkeypatch):
    """``mla_prefill_attention(split_tokens=n)`` runs the absorbed path even where "auto" would expand (the cost model
    forced to say so here), passes ``split_tokens`` to it, and matches the reference."""
    a = make_inputs([9, 0, 30], [3, 20, 100], 2, 16, torch.bfloat16, device, d_nope=D_NOPE)
    monkeypatch.setattr(prefill, "_choose", lambda *args, **kw: "expanded")
    monkeypatch.setattr(prefill, "_gather_latent", None)  # the expanded path's first step: must not be reached
    monkeypatch.setattr(prefill, "_gather_latent_torch", None)
    seen = []
    real = prefill._run_absorbed
    monkeypatch.setattr(prefill, "_run_absorbed", lambda *args, **kw: seen.append(kw["split_tokens"]) or real(*args, **kw))
    out, lse = mla_kernels.mla_prefill_attention(**a, softmax_scale=SCALE, return_lse=True, split_tokens=64)
    assert seen == [64]
    ref_out, ref_lse = naive_reference(a)
    assert_close("split_tokens, auto", out, ref_out, torch.bfloat16)
    assert_lse_close("split_tokens, auto", lse, ref_lse, atol=LSE_ATOL_ROUNDED_Q[torch.bfloat16])


def test_good_input_of_the_bad_input_tests_runs():
    """The base cases of the bad-input tests are valid, so each failure above is caused by its one change."""
    assert torch.isfinite(mla_kernels.mla_prefill(**_good())).all()
    for path in ("absorbed", "expanded"):
        assert torch.isfinite(mla_kernels.mla_prefill_attention(**_good(d_nope=32), path=path)).all()


def test_max_seqlen_k_past_the_block_table_sizes_no_buffer(monkeypatch):
    """A max_seqlen_k past the block table's capacity (32 tokens here) with many forced splits: they are cut as for
    the capacity (the splits past it could only be empty), not as for 10**9 tokens (partials for 100000 splits)."""
    args = _good()
    ref = mla_kernels.mla_prefill(**args, num_splits=100_000)
    bound_allocations(monkeypatch, 10**6, "a block table of 32 tokens")
    out = mla_kernels.mla_prefill(**args, max_seqlen_k=10**9, num_splits=100_000)
    monkeypatch.undo()
    assert torch.equal(out, ref)


# ------------------------------------------------------------------------------------------------
# host lengths: the caller's copies of cu_seqlens_q and cache_seqlens, so nothing is read back from the GPU
# ------------------------------------------------------------------------------------------------


def _host(a):
    return dict(cu_seqlens_q_host=a["cu_seqlens_q"].tolist(), cache_seqlens_host=a["cache_seqlens"].tolist())


def test_host_lengths_give_the_same_result(device):
    """Given the host lengths, both calls and every path return what they return without them, bit for bit (the
    same kernels on the same launch arguments); lists or tuples."""
    a = make_inputs([9, 0, 4], [3, 20, 0], 2, 16, torch.bfloat16, device, d_nope=D_NOPE)
    host = _host(a)
    for path in ("absorbed", "expanded", "auto"):
        expected = mla_kernels.mla_prefill_attention(**a, softmax_scale=SCALE, path=path, return_lse=True)
        got = mla_kernels.mla_prefill_attention(**a, softmax_scale=SCALE, path=path, return_lse=True, **host)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), path
    b = make_inputs([9, 0, 4], [3, 20, 0], 2, 16, torch.bfloat16, device)
    expected = mla_kernels.mla_prefill(**b, softmax_scale=SCALE)
    got = mla_kernels.mla_prefill(**b, softmax_scale=SCALE, cu_seqlens_q_host=tuple(_host(b)["cu_seqlens_q_host"]),
                                  cache_seqlens_host=_host(b)["cache_seqlens_host"])
    assert torch.equal(got, expected)
    # numpy's ints are ints, as everywhere else the library takes an int (list(array) gives them; they were refused
    # with "cu_seqlens_q_host[0] must be an int, got np.int64(0)")
    got = mla_kernels.mla_prefill(**b, softmax_scale=SCALE, cu_seqlens_q_host=list(b["cu_seqlens_q"].numpy()),
                                  cache_seqlens_host=tuple(b["cache_seqlens"].numpy()))
    assert torch.equal(got, expected)


def _both(key, index, value):
    """Change a length in the tensor and in its host copy alike: the host lengths' own value checks must catch it."""
    def change(a):
        a[key][index] = value
        a[key + "_host"][index] = value
    return change


BAD_HOST = {
    "cu_seqlens_q_host-disagrees": (_set("cu_seqlens_q_host", 1, 9), ValueError, "cu_seqlens_q_host.1.=9 but cu_seq"),
    "cache_seqlens_host-disagrees": (_set("cache_seqlens_host", 2, 4), ValueError, "cache_seqlens_host.2.=4 but"),
    "cache_seqlens_host-missing": (lambda a: a.update(cache_seqlens_host=None), ValueError, "cache_seqlens_host"),
    "cu_seqlens_q_host-missing": (lambda a: a.update(cu_seqlens_q_host=None), ValueError, "cu_seqlens_q_host"),
    "cu_seqlens_q_host-tensor": (lambda a: a.update(cu_seqlens_q_host=a["cu_seqlens_q"]), TypeError,
                                 "cu_seqlens_q_host"),
    "cache_seqlens_host-float": (_set("cache_seqlens_host", 0, 12.0), TypeError, "cache_seqlens_host.0."),
    # list(tensor): 0-d tensors, each read back from the GPU (a sync per entry) where host ints are given to avoid one
    "cu_seqlens_q_host-tensors": (lambda a: a.update(cu_seqlens_q_host=list(a["cu_seqlens_q"])), TypeError,
                                  r"cu_seqlens_q_host\[0\] must be an int, got a tensor"),
    "cu_seqlens_q_host-bool": (_set("cu_seqlens_q_host", 0, False), TypeError, "cu_seqlens_q_host.0. must be an int"),
    "cu_seqlens_q_host-short": (lambda a: a.update(cu_seqlens_q_host=[0, 10, 13]), ValueError, "cu_seqlens_q_host"),
    "cache_seqlens_host-long": (lambda a: a.update(cache_seqlens_host=[12, 4, 3, 0]), ValueError,
                                "cache_seqlens_host"),
    "cu_seqlens_q_host-not-from-0": (lambda a: (_both("cu_seqlens_q", 0, 1)(a)), ValueError,
                                     "cu_seqlens_q_host must start at 0"),
    "cu_seqlens_q_host-decreasing": (_both("cu_seqlens_q", 1, 11), ValueError, "cu_seqlens_q_host must be non-dec"),
    "cu_seqlens_q_host-past-T-mid-list": (_both("cu_seqlens_q", 1, 14), ValueError,
                                          "cu_seqlens_q_host must be non-dec"),
    "cu_seqlens_q_host-not-to-T": (_both("cu_seqlens_q", 3, 12), ValueError, "cu_seqlens_q_host must end"),
    "cache_seqlens_host-below-new-tokens": (_both("cache_seqlens", 0, 9), ValueError, "cache_seqlens_host.0.=9 is"),
    "cache_seqlens_host-beyond-table": (_both("cache_seqlens", 0, 10_000), ValueError, "cache_seqlens_host has a"),
    # one past the capacity: the host lengths' own check (a GPU call with host lengths runs no other)
    "cache_seqlens_host-one-past-table": (_both("cache_seqlens", 0, 33), ValueError,
                                          "cache_seqlens_host has a length 33 beyond the block table's capacity 32"),
}


@pytest.mark.parametrize("fn", ["mla_prefill", "mla_prefill_attention"])
@pytest.mark.parametrize("case", list(BAD_HOST), ids=list(BAD_HOST))
def test_bad_host_lengths(case, fn):
    """Host lengths of the wrong type or size, or disagreeing with the tensors (checked on the CPU, where reading
    them is free), or wrong in the same way as the tensors: an error naming the host argument."""
    args = _good(None if fn == "mla_prefill" else 32)
    args.update(_host(args))
    assert_rejects(getattr(mla_kernels, fn), args, *BAD_HOST[case])


def test_good_host_lengths_of_the_bad_input_tests_run():
    for fn, args in (("mla_prefill", _good()), ("mla_prefill_attention", _good(d_nope=32))):
        assert torch.isfinite(getattr(mla_kernels, fn)(**args, **_host(args))).all(), fn


@pytest.mark.parametrize("path", ["absorbed", "expanded"])
def test_host_lengths_read_nothing_back(path):
    """The GPU's code path without a GPU: meta tensors hold no values, so any read of one to the host (``.cpu()``,
    ``.item()``, ``.tolist()``) raises. With host lengths the call completes and never calls ``_read_lengths``
    (the one copy to the host); without them it calls it once. Kernels stubbed as in ``bench.host``."""
    bh = pytest.importorskip("bench.host")
    args, (cu, lens) = bh.prefill_args(torch.device("meta"))
    reads = []
    with bh.stubbed_kernels():
        stub = prefill._read_lengths
        prefill._read_lengths = lambda *t: reads.append(len(t)) or stub(*t)
        try:
            out = mla_kernels.mla_prefill_attention(*args, path=path, cu_seqlens_q_host=cu, cache_seqlens_host=lens)
            assert reads == [] and out.shape == (sum(bh.SEED_NEW), 16, 128) and out.device.type == "meta"
            mla_kernels.mla_prefill_attention(*args, path=path)
            assert reads == [2]
        finally:
            prefill._read_lengths = stub


def test_numpy_ints_are_ints():
    """max_seqlen_q / max_seqlen_k / num_splits from numpy are ints (they were refused); floats and bools are not."""
    np = pytest.importorskip("numpy")
    a = _good()
    ref = mla_kernels.mla_prefill(**a, max_seqlen_q=10, max_seqlen_k=12, num_splits=2)
    out = mla_kernels.mla_prefill(**a, max_seqlen_q=np.int64(10), max_seqlen_k=np.int32(12), num_splits=np.int64(2))
    assert torch.equal(out, ref)
    for name, bad in (("max_seqlen_q", 10.0), ("max_seqlen_k", True), ("num_splits", np.float64(2))):
        with pytest.raises(ValueError, match=name):
            mla_kernels.mla_prefill(**dict(a, **{name: bad}))


def test_unchecked_cu_seqlens_q_stays_inside_the_output(monkeypatch, device):
    """On a GPU given max_seqlen_q, nothing reads cu_seqlens_q on the host, so its values go unchecked. One that does
    not start at 0 and runs past the T packed tokens must still write no row outside the output (it wrote up to
    T + 3 rows past it before): the kernel clamps each sequence's tokens to [0, T). Here the CPU's value checks are
    bypassed as a GPU's are, and the output is a view of a NaN-filled buffer with guard rows after it."""
    a = make_inputs([3, 1], [5, 2], 2, 4, torch.float32, device, r=32, p=16)
    good = mla_kernels.mla_prefill(**a, softmax_scale=SCALE, max_seqlen_q=4, max_seqlen_k=8, num_splits=1)
    total = a["q_nope"].shape[0]  # 4
    # the same queries packed two tokens later: cu [2, 5, 6] over T = 6, passed as [2, 5, 9] (a last length 4 > 1)
    pad = lambda t: torch.cat([torch.full_like(t[:2], float("nan")), t])  # noqa: E731
    shifted = dict(a, q_nope=pad(a["q_nope"]), q_pe=pad(a["q_pe"]),
                   cu_seqlens_q=torch.tensor([2, 5, 9], dtype=torch.int32, device=device))
    monkeypatch.setattr(prefill, "_check_values", lambda *args, **kw: (4, 8, None))  # a GPU's unchecked values
    guarded = []
    empty = torch.empty

    def guarded_empty(*size, **kw):
        if size == (total + 2, 2, 32) and not guarded:  # the output: a view of a buffer with 8 guard rows after it
            guarded.append(torch.full((total + 10, 2, 32), float("nan"), dtype=kw["dtype"], device=kw["device"]))
            return guarded[0][:total + 2]
        return empty(*size, **kw)

    monkeypatch.setattr(torch, "empty", guarded_empty)
    out = mla_kernels.mla_prefill(**shifted, softmax_scale=SCALE, max_seqlen_q=4, num_splits=1)
    monkeypatch.setattr(torch, "empty", empty)
    assert guarded and torch.isnan(guarded[0][total + 2:]).all(), "rows past the output were written"
    assert torch.equal(out[2:5], good[:3])  # the first sequence, two rows later: as before
    # the last one, cut to the one token left of T: its first new token at position 3 of its 3 tokens, causal
    assert torch.equal(out[5], good[3])


# ------------------------------------------------------------------------------------------------
# GPU only: things the interpreter cannot show
# ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not ON_GPU, reason="CUDA graph capture needs a GPU")
def test_cuda_graph_capture_with_max_seqlen_q():
    """With max_seqlen_q given, mla_prefill does not synchronise: it captures in a CUDA graph."""
    a = make_inputs([64, 128, 256, 256], [512, 0, 0, 256], 16, 64, torch.bfloat16, "cuda")
    kw = dict(softmax_scale=SCALE, max_seqlen_q=256, max_seqlen_k=768)
    mla_kernels.mla_prefill(**a, **kw)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mla_kernels.mla_prefill(**a, **kw)
    graph.replay()
    assert_close("graph replay", out, absorbed_reference(a)[0], torch.bfloat16)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.integers(-2**63, 2**63 - 1) | st.integers(-3, 3), max_size=40),
       dtype=st.sampled_from([torch.int64, torch.int32]))
@example(values=[2**63 - 1, -2**63], dtype=torch.int64)  # (a step of 1 - 2^64, which int64 cannot hold)
@example(values=[-2**63, 2**63 - 1, 0], dtype=torch.int64)
@example(values=[2**63 - 1, 0, -2**63 + 1], dtype=torch.int64)
def test_values_written_by_device_operations_are_the_hosts(values, dtype):
    """What ``_utils.to_device`` does while a CUDA graph is being captured (it copies nothing from the host there):
    ``written_on_device`` rebuilds the host tensor from runs in arithmetic progression, each filled or made by an
    arange, exactly, for any integers of the dtype, in its shape. The runs tile the values in order, and each run of
    two or more is maximal (no later value continues it), so a step's block table is a handful of launches."""
    if dtype == torch.int32:
        values = [(v + 2**31) % 2**32 - 2**31 for v in values]
    runs = _utils.progressions(values)
    rebuilt = []
    for start, count, first, step in runs:
        assert start == len(rebuilt) and count >= 1
        rebuilt += [first + k * step for k in range(count)]
        if count >= 2 and start + count < len(values):
            assert values[start + count] - values[start + count - 1] != step
    assert rebuilt == values
    host = torch.tensor(values, dtype=dtype)
    for shape in ([len(values)], [1, len(values)]) + (([2, len(values) // 2],) if len(values) % 2 == 0 else ()):
        got = _utils.written_on_device(host.reshape(shape), torch.device("cpu"))
        assert got.dtype == dtype and got.shape == tuple(shape) and torch.equal(got, host.reshape(shape))


def test_to_device_copies_nothing_from_the_host_while_a_graph_is_captured(monkeypatch):
    """The branch the GPU test above takes: while the current stream is capturing, a host tensor bound for a GPU goes
    through ``written_on_device`` (no copy); a CPU destination is the host tensor itself."""
    seen = []
    monkeypatch.setattr(_utils, "written_on_device", lambda host, device: seen.append((host, device)) or "written")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    host = torch.tensor([3, 4, 5])
    assert not _utils.pin_host(torch.device("cuda"))
    assert _utils.to_device(host, torch.device("cuda")) == "written" and seen[0][0] is host
    assert _utils.to_device(host, torch.device("cpu")) is host and len(seen) == 1


@pytest.mark.skipif(not ON_GPU, reason="CUDA graph capture needs a GPU")
def test_split_tokens_pieces_replay_in_a_cuda_graph(monkeypatch):
    """A ``split_tokens`` prefill past its partials budget, given the host lengths, copies its pieces' index from
    the host once. Captured in a CUDA graph, such a copy would read the host memory again at every replay (a pinned
    block goes back to PyTorch's cache, whose next user overwrites it), and torch 2.11 refuses to capture one from
    pageable memory: while capturing, ``_utils.to_device`` writes the values by device operations instead. The replay
    after other pinned copies must give the eager call's bits."""
    new, history = [7, 0, 12], [9, 4, 30]
    a = make_inputs(new, history, 2, 4, torch.float32, "cuda", r=16, p=16)
    kw = dict(softmax_scale=SCALE, split_tokens=4, cu_seqlens_q_host=[0, 7, 7, 19],
              cache_seqlens_host=[h + n for h, n in zip(history, new)])
    monkeypatch.setattr(decode, "SPLIT_PARTIALS_BYTES", 4 * 2 * 17 * 4 * 3)  # the pieces test's budget
    eager = mla_kernels.mla_prefill(**a, **kw)
    side = torch.cuda.Stream()  # warm-up on a side stream, as torch.cuda.graph's documentation asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        mla_kernels.mla_prefill(**a, **kw)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mla_kernels.mla_prefill(**a, **kw)
    for _ in range(8):  # pinned blocks handed out, filled and copied: a recycled index block would now hold -1s
        torch.full((4096,), -1, dtype=torch.int64).pin_memory().to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


@pytest.mark.skipif(not ON_GPU, reason="host syncs are observable only on a GPU (torch.cuda.set_sync_debug_mode)")
@pytest.mark.parametrize("path", ["absorbed", "expanded", "auto"])
def test_host_lengths_never_sync_on_gpu(path):
    """With the host lengths, a warm call synchronises nothing (CUDA's sync debug mode raises on any wait), and
    gives the right result."""
    a = make_inputs(*SEED_003[:2], 16, 64, torch.bfloat16, "cuda", d_nope=D_NOPE)
    host = _host(a)
    mla_kernels.mla_prefill_attention(**a, softmax_scale=SCALE, path=path, **host)  # compiles, loads configs
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = mla_kernels.mla_prefill_attention(**a, softmax_scale=SCALE, path=path, **host)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_close(f"no sync {path}", out, naive_reference(a)[0], torch.bfloat16)


@pytest.mark.skipif(not ON_GPU or torch.cuda.get_device_properties(0).total_memory < 12 * 2**30,
                    reason="a cache of more than 2^31 elements needs a GPU with > 12 GiB")
def test_cache_beyond_int32_offsets():
    """Blocks placed past element 2^31 of the cache give the same result as the same data in a small cache."""
    page = 64
    a = make_inputs([70, 5], [200, 130], 16, page, torch.bfloat16, "cuda", d_nope=D_NOPE)
    blocks = 2**31 // (page * (R + P)) + 64
    big = torch.zeros(blocks, page, R + P, dtype=torch.bfloat16, device="cuda")
    offset = blocks - a["kv_cache"].shape[0]
    big[offset:, :, :R] = a["kv_cache"]
    big[offset:, :, R:] = a["pe_cache"]
    b = dict(a, kv_cache=big[..., :R], pe_cache=big[..., R:],
             block_table=torch.where(a["block_table"] < SENTINEL_BLOCK, a["block_table"] + offset, a["block_table"]))
    for path in ("absorbed", "expanded"):
        assert torch.equal(mla_kernels.mla_prefill_attention(**a, softmax_scale=SCALE, path=path),
                           mla_kernels.mla_prefill_attention(**b, softmax_scale=SCALE, path=path))


@pytest.mark.skipif(not ON_GPU, reason="long prompts at 128 heads take minutes in the interpreter")
def test_long_prompts_128_heads():
    """The expanded path's target shape, scaled to fit the reference: 2 x 1024 new tokens, 128 heads."""
    a = make_inputs([1024, 1000], [0, 37], 128, 64, torch.bfloat16, "cuda", d_nope=D_NOPE)
    for path in ("absorbed", "expanded"):
        out = mla_kernels.mla_prefill_attention(**a, softmax_scale=SCALE, path=path)
        assert_close(f"long prompts {path}", out, naive_reference(a)[0], torch.bfloat16)


# ------------------------------------------------------------------------------------------------
# bench.prefill plumbing (tiny shapes; the benchmark itself is `python -m bench.prefill`)
# ------------------------------------------------------------------------------------------------


def test_bench_sampled_reference_and_naive_provider():
    """The sweep checks the first and last rows of long requests: those rows equal the full reference's; the
    naive provider (decompress + SDPA per request) matches it too."""
    bp = pytest.importorskip("bench.prefill")
    shape = bp.MLAShape(heads=2)
    case = bp.make_case(shape, [20, 0, 5], [7, 3, 0], 16, torch.float32, torch.device("cpu"))
    rows, sampled = bp.reference_rows(case, sample=4)
    all_rows, full = bp.reference_rows(case, sample=None)
    assert rows.tolist() == [0, 1, 2, 3, 16, 17, 18, 19, 20, 21, 22, 23, 24] and torch.equal(all_rows, torch.arange(25))
    torch.testing.assert_close(sampled, full[rows], rtol=1e-5, atol=1e-5)
    assert bp.h.rel_rms_error(bp.naive_prefill(case), full) < 1e-5


def test_bench_sweep_row_and_crossover_smoke(device):
    bp = pytest.importorskip("bench.prefill")
    lib = bp.library()
    rows = bp.run_shape(1, 20, 9, 2, device, torch.bfloat16, lib, dict(warmup_ms=0.0, rep_ms=0.0, min_runs=1))
    assert [r["provider"] for r in rows] == bp.PROVIDERS
    assert all("p50_ms" in r and r["rel_rms_err"] < 1e-2 for r in rows), [r.get("note") for r in rows]
    assert rows[3]["note"] == f"chose {bp.auto_choice(bp.MLAShape(heads=2), [20], [9], device)}"
    res = bp.crossover(rows)
    assert res["per_group"][0]["hist"] == 9 and len(res["relative_speed_all"]) == 1


# ------------------------------------------------------------------------------------------------
# property-based: random ragged batches, both paths, page sizes that are not powers of two
# ------------------------------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def prefill_problems(draw):
    batch = draw(st.integers(1, 3))
    return dict(new=[draw(st.integers(0, 40)) for _ in range(batch)],
                history=[draw(st.integers(0, 60)) for _ in range(batch)],
                heads=draw(st.integers(1, 4)), page=draw(st.sampled_from([1, 3, 5, 16, 48])),
                r=draw(st.sampled_from([32, 64])), d_nope=draw(st.sampled_from([16, 32])),
                path=draw(st.sampled_from(["absorbed", "expanded"])), causal=draw(st.booleans()),
                seed=draw(st.integers(0, 99)))


# derandomize: the same 60 examples on every run, so CI cannot fail on a draw no earlier run made. Bounds are
# statistical (helpers.py): a 2026-12-04 fuzz of ~2900 random cases per op under the interpreter found bf16
# decode at most 0.94 of its bound, and mla_prefill_attention once over it (1 in 2882: 8.15e-3 against 8e-3, the
# absorbed path on a 64-value output, 1 in 300 draws of that shape), a rate CI would meet every ~50th run.
@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=prefill_problems())
def test_prefill_attention_property(problem, device):
    """Any ragged batch (empty sequences, no history, history only), heads, page size, widths, path, causality."""
    a = make_inputs(problem["new"], problem["history"], problem["heads"], problem["page"], torch.bfloat16, device,
                    r=problem["r"], p=16, d_nope=problem["d_nope"], seed=problem["seed"])
    out, lse = mla_kernels.mla_prefill_attention(**a, softmax_scale=SCALE, causal=problem["causal"],
                                                 path=problem["path"], return_lse=True)
    ref_out, ref_lse = naive_reference(a, problem["causal"])
    assert_close(str(problem), out, ref_out, torch.bfloat16)
    assert_lse_close(str(problem), lse, ref_lse, LSE_ATOL_ROUNDED_Q[torch.bfloat16])
