"""MLAttention.attend's own argument checks (before anything is written) and LatentBatch.cancel, on tiny shapes
through the interpreter; the module against transformers is tests/test_module.py."""
import pytest
import torch

from mla_kernels.cache import PagedLatentCache
from mla_kernels.module import LatentBatch, MLAttention

R, P, H, D, HID = 16, 16, 2, 16, 32


def _module_with_two_sequences(num_blocks, cached):
    """A seeded module and a cache of ``num_blocks`` blocks of 4 holding two sequences of ``cached`` tokens."""
    torch.manual_seed(0)
    m = MLAttention(HID, H, R, D, P, D).eval().requires_grad_(False)
    cache = PagedLatentCache(1, num_blocks, 4, R, P, dtype=torch.float32)
    a, b = cache.add_sequence(), cache.add_sequence()
    with torch.no_grad():
        m(torch.randn(sum(cached), HID), LatentBatch.reserve(cache, [a, b], cached))
    return m, cache, a, b


def _setup(counts):
    m, cache, a, b = _module_with_two_sequences(8, [3, 2])
    batch = LatentBatch.reserve(cache, [a, b], counts)
    q_nope, q_pe, kv_c, k_pe = m.project(torch.randn(sum(counts), HID), *m.rotary(batch.positions, torch.float32))
    return m, cache, batch, (q_nope, q_pe, kv_c, k_pe)


@pytest.mark.parametrize("counts", [[1, 1], [2, 3]], ids=["decode", "prefill"])
@pytest.mark.parametrize("case", ["T", "heads", "nope", "rope", "q_pe_dtype", "batch"])
def test_attend_checks_its_tensors_before_writing(counts, case):
    """attend wrote the step's tokens before looking at the queries: a wrong D_nope ran silently in the prefill path
    (kv_b_proj split at the wrong place, a [T, H, 24] result), other mismatches failed inside torch, after the
    write."""
    m, cache, batch, (q_nope, q_pe, kv_c, k_pe) = _setup(counts)
    t = q_nope.shape[0]
    args = {
        "T": (torch.randn(t + 1, H, D), torch.randn(t + 1, H, P), kv_c, k_pe, batch),
        "heads": (torch.randn(t, H + 1, D), torch.randn(t, H + 1, P), kv_c, k_pe, batch),
        "nope": (torch.randn(t, H, D // 2), q_pe, kv_c, k_pe, batch),
        "rope": (q_nope, q_pe[..., :P // 2], kv_c, k_pe, batch),
        "q_pe_dtype": (q_nope, q_pe.double(), kv_c, k_pe, batch),
        "batch": (q_nope, q_pe, kv_c, k_pe, None),
    }[case]
    before = cache.buffer(0).clone()
    with torch.no_grad(), pytest.raises((ValueError, TypeError)) as info:
        m.attend(*args)
    name = {"T": "q_nope", "heads": "q_nope", "nope": "q_nope", "rope": "q_pe", "q_pe_dtype": "q_pe",
            "batch": "batch"}[case]
    assert name in str(info.value)
    assert torch.equal(cache.buffer(0), before), "the failed call wrote the cache"


@pytest.mark.parametrize("counts", [[1, 1], [2, 3]], ids=["decode", "prefill"])
@pytest.mark.parametrize("culprit", ["kv_b_proj", "kv_c"])
def test_attend_under_grad_is_refused_by_name_before_writing(counts, culprit):
    """With grad mode on, attend wrote the step's tokens and then the kernels refused their own inputs: "q_nope
    requires grad ... pass q_nope.detach()" for a detached q_nope (the absorbed query made with a trainable
    kv_b_proj) or "w_kv_b", no argument of attend. It now names kv_b_proj or the input, and writes nothing."""
    from mla_kernels._utils import GradModeError

    m, cache, batch, (q_nope, q_pe, kv_c, k_pe) = _setup(counts)
    if culprit == "kv_b_proj":
        m.kv_b_proj.requires_grad_(True)
    else:
        kv_c = kv_c.clone().requires_grad_()
    before = cache.buffer(0).clone()
    with torch.enable_grad(), pytest.raises(GradModeError, match=culprit):
        m.attend(q_nope, q_pe, kv_c, k_pe, batch)
    assert torch.equal(cache.buffer(0), before), "the refused call wrote the cache"


@pytest.mark.parametrize("counts", [[1, 1], [2, 3]], ids=["decode", "prefill"])
def test_attend_under_autocast_casts_kv_b_proj_once(counts, monkeypatch):
    """Under torch.autocast the kernels take kv_b_proj's weight in the queries' dtype, a copy: one per call (the
    decode path made it twice and dropped one, a weight's worth of traffic per layer and step)."""
    torch.manual_seed(0)
    m = MLAttention(HID, H, R, D, P, D).eval().requires_grad_(False)
    cache = PagedLatentCache(1, 8, 4, R, P, dtype=torch.bfloat16)
    a, b = cache.add_sequence(), cache.add_sequence()
    casts = []
    real = m._kv_b_weight
    monkeypatch.setattr(m, "_kv_b_weight", lambda dtype: casts.append(dtype) or real(dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for step in ([3, 2], counts):
            casts.clear()
            out = m(torch.randn(sum(step), HID), LatentBatch.reserve(cache, [a, b], step))
            assert casts == [torch.bfloat16] and out.dtype == torch.bfloat16 and out.isfinite().all()


def test_cancel_gives_back_a_failed_steps_reservation():
    """A step that failed after reserve kept its positions, never written: the next step attended to them (a freed
    sequence's tokens, still in the reused block), silently. cancel() drops them; the next step is then right."""
    torch.manual_seed(0)
    m = MLAttention(HID, H, R, D, P, D).eval().requires_grad_(False)
    with torch.no_grad():
        cache = PagedLatentCache(1, 2, 4, R, P, dtype=torch.float32)
        other = cache.add_sequence()
        m(torch.randn(4, HID) * 5, LatentBatch.reserve(cache, [other], [4]))
        cache.free(other)
        b = cache.add_sequence()
        prompt = torch.randn(2, HID)
        step = LatentBatch.reserve(cache, [b], [2])
        with pytest.raises(ValueError, match="hidden_states has 1 tokens"):
            m(prompt[:1], step)
        step.cancel()
        assert cache.seqlen(b) == 0 and cache.num_free_blocks == 2
        with pytest.raises(ValueError, match="out of date"):
            step.check_current()
        out = m(prompt, LatentBatch.reserve(cache, [b], [2]))
        solo = PagedLatentCache(1, 2, 4, R, P, dtype=torch.float32)
        s = solo.add_sequence()
        assert torch.allclose(out, m(prompt, LatentBatch.reserve(solo, [s], [2])), atol=1e-6)
        stale = LatentBatch.reserve(cache, [b], [1])
        LatentBatch.reserve(cache, [b], [1])
        with pytest.raises(ValueError, match="out of date"):
            stale.cancel()
        assert cache.seqlen(b) == 4
        again = LatentBatch.reserve(cache, [b], [1])
        again.cancel()
        with pytest.raises(ValueError, match=r"freed, forked or truncated \(a cancel\(\) included\)"):
            again.cancel()  # (the message said "freed or forked": a cancel truncates)


@pytest.mark.parametrize("counts", [[1, 1], [2, 3]], ids=["decode", "prefill"])
def test_attend_checks_the_grid_bound_before_writing(counts, monkeypatch):
    """A step of more sequences than a launch grid's axis takes (65535; here lowered to 1) is refused before the
    write: the kernels' own check came after ``attend`` had written the step's tokens."""
    from mla_kernels import _utils

    m, cache, batch, (q_nope, q_pe, kv_c, k_pe) = _setup(counts)
    before = cache.buffer(0).clone()
    monkeypatch.setattr(_utils, "MAX_GRID_YZ", 1)
    with torch.no_grad(), pytest.raises(ValueError, match="the step's number of sequences is 2"):
        m.attend(q_nope, q_pe, kv_c, k_pe, batch)
    assert torch.equal(cache.buffer(0), before)


@pytest.mark.parametrize("counts, kernel", [([1, 1], "decode"), ([8, 8], "decode"), ([9, 9], "prefill"),
                                            ([2, 3], "prefill"), ([1, 0], "prefill")],
                         ids=["one-token", "eight-tokens", "nine-tokens", "ragged", "one-idle-row"])
def test_attend_dispatches_decode_or_prefill(counts, kernel, monkeypatch):
    """The step's kernel: mla_decode when every sequence has the same number of new tokens, at most
    DECODE_MAX_NEW_TOKENS (8), else mla_prefill_attention. Both give the same attention, so the outputs alone
    never showed a dispatch that sent every step (or the 8-token one) to prefill."""
    from mla_kernels import module, prefill

    calls = []
    real_decode, real_prefill = module.mla_decode, prefill.mla_prefill_attention
    monkeypatch.setattr(module, "mla_decode", lambda *a, **kw: calls.append("decode") or real_decode(*a, **kw))
    monkeypatch.setattr(prefill, "mla_prefill_attention",
                        lambda *a, **kw: calls.append("prefill") or real_prefill(*a, **kw))
    torch.manual_seed(0)
    m = MLAttention(HID, H, R, D, P, D).eval().requires_grad_(False)
    cache = PagedLatentCache(1, 8, 4, R, P, dtype=torch.float32)
    seqs = [cache.add_sequence(), cache.add_sequence()]
    with torch.no_grad():
        m(torch.randn(sum(counts), HID), LatentBatch.reserve(cache, seqs, counts))
    assert calls == [kernel]


def test_cancel_of_a_one_token_step():
    """A failed decode step (one new token per sequence, a sequence with none) is given back whole: each sequence
    drops exactly its new tokens."""
    m, cache, a, b = _module_with_two_sequences(4, [4, 2])
    step = LatentBatch.reserve(cache, [a, b], [1, 0])
    assert (cache.seqlen(a), cache.seqlen(b), cache.num_free_blocks) == (5, 2, 1)
    step.cancel()
    assert (cache.seqlen(a), cache.seqlen(b), cache.num_free_blocks) == (4, 2, 2)


def test_a_batch_whose_last_token_lies_in_a_block_a_fork_shares_is_refused():
    """LatentBatch built by hand over tokens already reserved: one new token whose slot lies in a full block that a
    fork shares (writing it would change the fork's token too) is refused, as two are."""
    cache = PagedLatentCache(1, 8, 4, R, P, dtype=torch.float32)
    a = cache.add_sequence()
    cache.append(a, 8)  # two full blocks
    cache.fork(a)  # shares both
    for n in (1, 2, 5):
        with pytest.raises(ValueError, match="fork shares"):
            LatentBatch(cache, [a], [n], cache.slots(a, 8 - n, 8))
    LatentBatch(cache, [a], [0], cache.slots(a, 8, 8))  # no new token: nothing to write


def test_split_tokens_reaches_every_attention_call(monkeypatch):
    """``MLAttention(split_tokens=n)`` (or ``attn.split_tokens = n``) hands ``n`` to the step's ``mla_decode``, its
    ``mla_prefill_attention`` and its sparse ``mla_decode``; the outputs stay those of the default split (the fp32
    dots reorder their sums only)."""
    from mla_kernels import module, prefill

    seen = []
    real_decode, real_prefill = module.mla_decode, prefill.mla_prefill_attention
    monkeypatch.setattr(module, "mla_decode",
                        lambda *a, **kw: seen.append(("decode", kw.get("split_tokens"))) or real_decode(*a, **kw))
    monkeypatch.setattr(prefill, "mla_prefill_attention",
                        lambda *a, **kw: seen.append(("prefill", kw.get("split_tokens"))) or real_prefill(*a, **kw))
    outs = {}
    for n in (None, 4):
        torch.manual_seed(0)
        m = MLAttention(HID, H, R, D, P, D, split_tokens=n).eval().requires_grad_(False)
        assert m.split_tokens == n and ("split_tokens=4" in repr(m)) == (n == 4)
        cache = PagedLatentCache(1, 16, 4, R, P, dtype=torch.float32)
        seqs = [cache.add_sequence(), cache.add_sequence()]
        hidden = torch.randn(20, HID, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            first = m(hidden[:9], LatentBatch.reserve(cache, seqs, [6, 3]))  # ragged: prefill
            second = m(hidden[9:11], LatentBatch.reserve(cache, seqs, [1, 1]))  # decode
            batch = LatentBatch.reserve(cache, seqs, [1, 1])
            flat = m.project(hidden[11:13], *m.rotary(batch.positions, torch.float32))
            indices = torch.tensor([[0, 3, 6, -1], [1, 2, 3, -1]])  # sparse decode
            third = m.attend(*flat, batch, indices=indices)
        outs[n] = (first, second, third)
    assert seen == [("prefill", None), ("decode", None), ("decode", None), ("prefill", 4), ("decode", 4), ("decode", 4)]
    for name, a, b in zip(("prefill", "decode", "sparse"), outs[None], outs[4]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)  # fp32 sums in another order


def test_split_tokens_gives_a_sequence_the_same_bits_decoded_or_prefilled():
    """``split_tokens``: a sequence's 5 new tokens give the same bits alone (a uniform step: ``mla_decode`` with
    S_q = 5) and beside a sequence with 3 (a ragged step: ``mla_prefill_attention``). Before, the decode's tiles
    followed S_q x H = 20 rows (64 x 64 at R = 512) and the prefill's a one-token decode's (16 x 32). ``kv_b_proj``
    copies latent columns, so the GEMMs around the attention are exact in any batch."""
    r, heads, hist = 512, 4, 100
    torch.manual_seed(0)
    m = MLAttention(HID, heads, r, D, P, D, split_tokens=8).eval().requires_grad_(False)
    eye = torch.eye(D, r).expand(heads, D, r)
    m.kv_b_proj.weight.copy_(torch.cat([eye, eye], 1).reshape(-1, r))
    g = torch.Generator().manual_seed(1)
    history = (torch.randn(hist, r, generator=g), torch.randn(hist, P, generator=g))
    mine, other = ([torch.randn(n, *shape, generator=g) for shape in ((heads, D), (heads, P), (r,), (P,))]
                   for n in (5, 3))

    def first_five(beside):
        cache = PagedLatentCache(1, 40, 4, r, P, dtype=torch.float32)
        a, b = cache.add_sequence(), cache.add_sequence()
        cache.write(0, cache.append(a, hist), *history)
        batch = LatentBatch.reserve(cache, [a, b], [5, 3]) if beside else LatentBatch.reserve(cache, [a], [5])
        with torch.no_grad():
            return m.attend(*([torch.cat(t) for t in zip(mine, other)] if beside else mine), batch)[:5]

    assert torch.equal(first_five(False), first_five(True))


@pytest.mark.parametrize("bad, error", [(0, ValueError), (2.0, ValueError), (True, ValueError), ("8", ValueError)])
def test_split_tokens_is_checked_when_set(bad, error):
    with pytest.raises(error, match="split_tokens"):
        MLAttention(HID, H, R, D, P, D, split_tokens=bad)
    m = MLAttention(HID, H, R, D, P, D)
    with pytest.raises(error, match="split_tokens"):
        m.split_tokens = bad
    assert m.split_tokens is None


def test_split_tokens_past_the_grid_is_refused_before_writing():
    """A step whose keys ``split_tokens`` would cut into more than 65535 splits (a launch grid's bound) is refused by
    the module before it writes the step's tokens, not by the kernel after: the cache keeps what it held."""
    torch.manual_seed(0)
    m = MLAttention(HID, H, R, D, P, D, split_tokens=1).eval().requires_grad_(False)
    cache = PagedLatentCache(1, 16385, 4, R, P, dtype=torch.float32)
    seq = cache.add_sequence()
    cache.append(seq, 65535)
    batch = LatentBatch.reserve(cache, [seq], [1])  # 65536 keys: 65536 splits of one
    before = cache.buffer(0).clone()
    with torch.no_grad(), pytest.raises(ValueError,
                                        match=r"split_tokens=1 cuts the step's longest sequence \(65536 keys\)"):
        m(torch.randn(1, HID), batch)
    assert torch.equal(cache.buffer(0), before)
    batch.cancel()
    m.split_tokens = 2  # 32768 splits: taken
    with torch.no_grad():
        assert m(torch.randn(1, HID), LatentBatch.reserve(cache, [seq], [1])).shape == (1, HID)


@pytest.mark.parametrize("counts", [[1, 1], [2, 3]], ids=["decode", "prefill"])
def test_attend_without_kv_c_reads_what_another_layer_wrote(counts):
    """``attend`` with ``kv_c`` and ``k_pe`` None (a layer over another layer's latent, Mistral Large 4's shared
    latents) writes nothing and attends over the step's tokens as written there: the output equals the same call
    given the same ``kv_c`` and ``k_pe`` to write again (the same values in the same slots). One of the two None is
    refused by name, before anything is written."""
    m, cache, batch, (q_nope, q_pe, kv_c, k_pe) = _setup(counts)
    with torch.no_grad():
        written = m.attend(q_nope, q_pe, kv_c, k_pe, batch)
        before = cache.buffer(0).clone()
        read = m.attend(q_nope, q_pe, None, None, batch)
        assert torch.equal(read, written)
        assert torch.equal(cache.buffer(0), before)  # nothing written
        for args, name in (((kv_c, None), "k_pe"), ((None, k_pe), "kv_c")):
            with pytest.raises((TypeError, ValueError), match=name):
                m.attend(q_nope, q_pe, *args, batch)
            assert torch.equal(cache.buffer(0), before)
