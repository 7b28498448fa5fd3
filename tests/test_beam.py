"""Beam search and batch-row changes (reorder_cache, batch_repeat_interleave, batch_select_indices) of a patched
model's latent cache: rows become forks of other rows, sharing their full blocks, and must attend exactly as
transformers' DynamicCache rows that were index-selected."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from mla_kernels import _utils
from mla_kernels.cache import CacheFullError, PagedLatentCache
from mla_kernels.integrations import transformers as integration
from mla_kernels.integrations.transformers import latent_cache, patch_model, static_latent_cache
from test_cache_manager import assert_allocator_consistent
from test_transformers import left_padded, tiny_model

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402

BEAMS = {  # prompt lengths (left-padded when they differ), num_beams, num_return_sequences
    "2-beams-left-padded": ([5, 9, 2], 2, 1),
    "3-beams-unpadded-2-returned": ([8, 8], 3, 2),
}


def rows_of(cache):
    return cache._mla_latent_state.rows


@pytest.mark.parametrize("name", list(BEAMS))
def test_beam_search_matches_transformers(name, monkeypatch, device):
    """generate(num_beams=N) gives the unpatched model's sequences and scores (fp32, the Triton kernels; on a GPU,
    natively, with the forks' block copies on the device). The cache
    starts with no headroom in 4-token pages, so it grows during the search, with blocks shared between beams;
    afterwards every block is free or held (counted once per holder) and each row holds its real tokens only."""
    lengths, num_beams, returned = BEAMS[name]
    model = tiny_model().to(device)
    ids, mask = (t.to(device) for t in left_padded(lengths))
    kw = dict(do_sample=False, max_new_tokens=6, min_new_tokens=6, num_beams=num_beams,
              num_return_sequences=returned, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, **kw)
        monkeypatch.setattr(integration, "INITIAL_HEADROOM_TOKENS", 0)
        patch_model(model, block_size=4)
        out = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(out.sequences, expected.sequences), f"\n{out.sequences}\n{expected.sequences}"
    # fp32 log-probabilities summed over 6 steps: the logits agree to ~1e-6 relative (test_forward_matches_transformers)
    torch.testing.assert_close(out.sequences_scores, expected.sequences_scores, rtol=1e-5, atol=1e-5)
    lc = latent_cache(out.past_key_values)
    rows = rows_of(out.past_key_values)
    assert len(rows) == len(lengths) * num_beams and sorted(lc.seq_ids, key=repr) == sorted(rows, key=repr)
    assert [lc.seqlen(r) for r in rows] == [n + 5 for n in lengths for _ in range(num_beams)]
    assert lc.num_blocks > len(rows) * 2, "the cache never grew"
    assert_allocator_consistent(lc)
    assert any(n > 1 for n in lc._refs), "no block is shared between beams"


def step(model, cache, ids, mask):
    """One forward call of new tokens ``ids [B, Q]``; returns the last position's logits."""
    return model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1]


def test_row_changes_match_dynamic_cache(monkeypatch):
    """On a filled cache, each of transformers' batch-row changes, applied through the Cache (which calls every layer),
    leaves the patched model attending as the unpatched model over a DynamicCache changed alike: once per call, not
    once per layer ([2, 2, 0] applied twice would be [0, 0, 2]), and twice when called twice with one tensor."""
    monkeypatch.setattr(_utils, "interpreting", lambda: False)  # row bookkeeping: the PyTorch path is enough
    model = tiny_model()
    reference = copy.deepcopy(model)
    patch_model(model, block_size=4)
    ids, mask = left_padded([6, 3])
    gen = torch.Generator().manual_seed(11)
    perm = torch.tensor([2, 2, 0])
    changes = [("batch_repeat_interleave", 2), ("batch_select_indices", torch.tensor([3, 0, 1])),
               ("reorder_cache", perm), ("reorder_cache", perm), ("batch_select_indices", [True, False, True]),
               ("reorder_cache", torch.tensor([1, 0]))]
    caches = {"patched": DynamicCache(config=model.config), "reference": DynamicCache(config=model.config)}
    with torch.no_grad():
        got = step(model, caches["patched"], ids, mask)
        torch.testing.assert_close(got, step(reference, caches["reference"], ids, mask), rtol=1e-5, atol=1e-5)
        for what, arg in changes:
            for cache in caches.values():
                getattr(cache, what)(arg)
            rows = torch.arange(mask.shape[0])
            picked = rows.repeat_interleave(arg) if what == "batch_repeat_interleave" else rows[arg]
            mask = mask[picked]
            new = torch.randint(3, 128, (mask.shape[0], 1), generator=gen)
            mask = torch.cat([mask, torch.ones_like(new)], 1)
            got = step(model, caches["patched"], new, mask)
            expected = step(reference, caches["reference"], new, mask)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"after {what}({arg})")
            lc = latent_cache(caches["patched"])
            assert len(rows_of(caches["patched"])) == mask.shape[0] == len(lc)
            assert_allocator_consistent(lc)
    assert caches["patched"].get_seq_length() == caches["reference"].get_seq_length()


@pytest.mark.parametrize("seed", range(3))
def test_random_row_changes_keep_each_rows_tokens_and_table(seed):
    """The latent state alone, in random steps: append 0-3 tokens to every row (growing the cache when full, as a
    step does), then give the rows random sources (repeats, drops, a new batch size). Each row keeps its source's
    tokens (read back per layer), the incrementally kept host block table gives each row's blocks, and every block is
    free or held, counted once per holder. Starts from 4 blocks of 2 tokens so it grows with shared blocks."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    state = integration._LatentState(num_layers=2, block_size=2, max_cache_tokens=None)
    state.paged = PagedLatentCache(2, 4, 2, kv_lora_rank=16, rope_dim=16, dtype=torch.float32)
    state.rows = [state.paged.add_sequence() for _ in range(3)]
    expected = [torch.empty(0, 2, 32) for _ in state.rows]
    for _ in range(40):
        counts = [rng.randint(0, 3) for _ in state.rows]
        try:
            slots = state.paged._reserve_host(state.rows, counts)
        except CacheFullError:
            state._grow(state.paged.blocks_needed(state.rows, counts))
            slots = state.paged._reserve_host(state.rows, counts)
        tokens = torch.randn(len(slots), 2, 32, generator=gen)
        for layer in range(2):
            state.paged.write(layer, slots, tokens[:, layer, :16], tokens[:, layer, 16:])
        expected = [torch.cat([e, t]) for e, t in zip(expected, tokens.split(counts))]
        table = state._block_table_host()
        for b, row in enumerate(state.rows):
            blocks = state.paged.seq_blocks(row)
            assert table[b, :len(blocks)].tolist() == blocks, f"row {b}'s host block table is stale"

        src = [rng.randrange(len(state.rows)) for _ in range(rng.randint(1, 5))]
        state._select_rows(src)
        expected = [expected[j] for j in src]
        assert len(state.rows) == len(src) == len(set(state.rows))
        for row, tokens in zip(state.rows, expected):
            for layer in range(2):
                kv, pe = state.paged.read(layer, row)
                assert torch.equal(kv, tokens[:, layer, :16]) and torch.equal(pe, tokens[:, layer, 16:])
        assert sorted(state.paged.seq_ids) == sorted(state.rows)
        assert_allocator_consistent(state.paged)
    assert state.paged.num_blocks > 4


def test_bad_row_changes_are_refused_before_anything_changes(monkeypatch):
    monkeypatch.setattr(_utils, "interpreting", lambda: False)
    model = patch_model(tiny_model(), block_size=4)
    ids, mask = left_padded([5, 3])
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        step(model, cache, ids, mask)
    lc = latent_cache(cache)
    before = (list(rows_of(cache)), list(lc._refs), list(lc._free))
    for what, arg, error, name in [("reorder_cache", torch.tensor([0, 2]), ValueError, "beam_idx"),
                                   ("reorder_cache", torch.tensor([0.0, 1.0]), ValueError, "beam_idx"),
                                   ("batch_repeat_interleave", -1, ValueError, "repeats"),
                                   ("batch_repeat_interleave", 1.5, ValueError, "repeats"),
                                   ("batch_repeat_interleave", torch.tensor([1, 2, 1]), ValueError, "repeats"),
                                   ("batch_repeat_interleave", torch.tensor(-1), ValueError, "repeats"),
                                   ("batch_repeat_interleave", torch.tensor([1.0, 1.0]), ValueError, "repeats"),
                                   ("batch_select_indices", torch.tensor([[0]]), ValueError, "indices"),
                                   ("batch_select_indices", [5], ValueError, "indices")]:
        with pytest.raises(error, match=name):
            getattr(cache, what)(arg)
        assert (list(rows_of(cache)), list(lc._refs), list(lc._free)) == before
    np = pytest.importorskip("numpy")
    cache.batch_repeat_interleave(np.int64(2))  # numpy's ints are ints (refused as "repeats" before)
    assert len(rows_of(cache)) == 4


def test_row_changes_before_anything_is_cached_do_nothing(monkeypatch):
    """As a DynamicLayer with no tokens: nothing to change (the latent state attached, no row made yet); the first
    step makes the rows from its batch."""
    monkeypatch.setattr(_utils, "interpreting", lambda: False)
    model = patch_model(tiny_model(), block_size=4)
    cache = DynamicCache(config=model.config)
    for layer in range(model.config.num_hidden_layers):
        integration._attach(cache, layer, model.config.num_hidden_layers, 4, None)
    cache.reorder_cache(torch.tensor([0, 0]))
    cache.batch_repeat_interleave(3)
    cache.batch_select_indices(torch.tensor([1]))
    assert rows_of(cache) is None
    ids, mask = left_padded([4, 2, 3])
    with torch.no_grad():
        step(model, cache, ids, mask)
    assert len(rows_of(cache)) == 3


def test_static_latent_cache_refuses_beam_search(monkeypatch):
    monkeypatch.setattr(_utils, "interpreting", lambda: False)  # wiring only: the PyTorch path is enough
    model = patch_model(tiny_model())
    ids, mask = left_padded([5, 3])
    cache = static_latent_cache(model, max_batch_size=4, max_cache_len=16, block_size=4)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="static latent cache.*DynamicCache"):
        model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=3, num_beams=2,
                       past_key_values=cache)
    for what, arg in [("batch_repeat_interleave", 2), ("batch_select_indices", torch.tensor([0]))]:
        with pytest.raises(NotImplementedError, match="static latent cache"):
            getattr(cache, what)(arg)


def test_indexer_keys_follow_every_row_change():
    """DeepSeek-V3.2's indexer keys, which each LatentCacheLayer keeps, change rows as transformers' DynamicLayer
    changes its K/V: repeat_interleave (not repeat), index selection, reorder, and crop of the last positions.
    generate only reorders and crops them (it expands the batch before the cache holds anything), so this is where
    batch_repeat_interleave and batch_select_indices on held keys are checked."""
    layer = integration._latent_layer_class()()
    keys = torch.arange(3 * 4 * 2, dtype=torch.float32).view(3, 4, 2)
    layer.update_indexer(keys)
    layer.batch_repeat_interleave(2)
    expected = keys.repeat_interleave(2, dim=0)
    assert torch.equal(layer.indexer_keys, expected)
    layer.batch_select_indices(torch.tensor([5, 0, 3]))
    expected = expected[[5, 0, 3]]
    assert torch.equal(layer.indexer_keys, expected)
    layer.reorder_cache(torch.tensor([2, 2, 1]))
    expected = expected[[2, 2, 1]]
    assert torch.equal(layer.indexer_keys, expected)
    layer.cumulative_length = 4
    layer.crop(-1)
    assert torch.equal(layer.indexer_keys, expected[:, :3]) and layer.cumulative_length == 3
    assert torch.equal(layer.update_indexer(keys[:, :1]), torch.cat([expected[:, :3], keys[:, :1]], 1))
