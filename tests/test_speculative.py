"""Speculative decoding on a patched model: transformers' assisted and prompt-lookup generation verify several
candidate tokens in one forward pass (multi-token decode over the latent cache) and crop the rejected ones
(``Cache.crop``, which the latent state turns into ``PagedLatentCache.truncate`` once for all layers). Greedy
speculative decoding is lossless, so the tokens must equal plain greedy generation of the unpatched model."""

from __future__ import annotations

import pytest
import torch

from mla_kernels import _utils
from mla_kernels.integrations import transformers as integration
from mla_kernels.integrations.transformers import latent_cache, patch_model
from test_cache_manager import assert_allocator_consistent
from test_transformers import left_padded, tiny_model

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402

GREEDY = dict(do_sample=False, max_new_tokens=12, min_new_tokens=12)


def repetitive_prompt(device, pads=0):
    """One prompt that repeats a span, so prompt lookup proposes candidates (some accepted, some rejected), after
    ``pads`` left pads."""
    ids, _ = left_padded([9])
    ids = torch.cat([torch.zeros(1, pads, dtype=ids.dtype), ids, ids[:, 2:7]], 1).to(device)
    mask = torch.ones_like(ids)
    mask[:, :pads] = 0
    return ids, mask


@pytest.mark.parametrize("pads", [0, 2], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("how", ["prompt-lookup", "assistant", "patched-assistant"])
def test_speculative_generation_matches_greedy(how, pads, monkeypatch, device):
    """The cache starts with no headroom in 4-token pages, so crops cross block boundaries and the cache grows.
    Left-padded: the first verify step holds the pads, the prompt and the candidates, and its last positions are
    cropped."""
    model = tiny_model().to(device)
    ids, mask = repetitive_prompt(device, pads)
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
        monkeypatch.setattr(integration, "INITIAL_HEADROOM_TOKENS", 0)
        patch_model(model, block_size=4)
        if how == "prompt-lookup":
            kw = dict(prompt_lookup_num_tokens=3)
        else:
            assistant = tiny_model(seed=1, num_hidden_layers=1).to(device)
            if how == "patched-assistant":
                patch_model(assistant, block_size=4)
            kw = dict(assistant_model=assistant)
        out = model.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True, **kw, **GREEDY)
    assert torch.equal(out.sequences, expected), f"\n{out.sequences}\n{expected}"
    lc = latent_cache(out.past_key_values)
    (row,) = lc.seq_ids
    assert lc.seqlen(row) + pads == out.past_key_values.get_seq_length() == expected.shape[1] - 1
    assert_allocator_consistent(lc)


def test_crop_drops_the_last_tokens_of_every_row_once(monkeypatch):
    """Cache.crop calls every layer: the shared rows lose the real tokens among the last ``n`` positions once, each
    layer's count goes down by ``n``, and the next step attends as a fresh pass over the kept tokens would. Pads are
    not stored, so a padded (prompt) step can be cropped only whole: a crop ending inside it is refused, changing
    nothing. The older API's positive value is a length to keep (transformers 5.17); bad values change nothing."""
    monkeypatch.setattr(_utils, "interpreting", lambda: False)  # bookkeeping: the PyTorch path is enough
    model = patch_model(tiny_model(), block_size=4)
    ids, mask = left_padded([7, 3])
    steps = torch.tensor([[11, 12, 13], [21, 22, 23]])
    cache, fresh = DynamicCache(config=model.config), DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        for i in range(3):  # three one-token decode steps
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            model(input_ids=steps[:, i:i + 1], attention_mask=mask, past_key_values=cache, use_cache=True)
        lc = latent_cache(cache)
        rows = list(lc.seq_ids)
        assert [lc.seqlen(r) for r in rows] == [10, 6] and cache.get_seq_length() == 10
        cache.crop(-1)
        cache.crop(12)  # keep 12 (more than held): nothing
        cache.crop(8)  # keep 8 of 9
        assert [lc.seqlen(r) for r in rows] == [8, 4] and cache.get_seq_length() == 8
        for bad, error in [(-9, ValueError), (1.5, TypeError), (True, TypeError)]:
            with pytest.raises(error, match="crop|tokens_to_remove"):
                cache.crop(bad)
            assert [lc.seqlen(r) for r in rows] == [8, 4] and cache.get_seq_length() == 8
        assert_allocator_consistent(lc)
        new = torch.tensor([[5], [9]])
        kept_mask = torch.cat([mask[:, :8], torch.ones(2, 1, dtype=mask.dtype)], 1)
        got = model(input_ids=new, attention_mask=kept_mask, past_key_values=cache, use_cache=True).logits[:, -1]
        kept = torch.cat([ids, steps[:, :1], new], 1)
        want = model(input_ids=kept, attention_mask=kept_mask, past_key_values=fresh, use_cache=True).logits[:, -1]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        cache.crop(-4)  # the new step, the decode step and the prompt's last 2 positions (left padding: real)
        assert [lc.seqlen(r) for r in rows] == [5, 1] and cache.get_seq_length() == 5
        cache.crop(-5)  # the rest of the prompt: nothing real is left
        assert [lc.seqlen(r) for r in rows] == [0, 0] and cache.get_seq_length() == 0
        assert_allocator_consistent(lc)


@pytest.mark.parametrize("crops", [(-3,), (-1, -2)], ids=["one-crop", "two-crops"])
@pytest.mark.parametrize("layout", ["right-padded", "middle-padded", "two-pad-runs"])
def test_crop_into_a_padded_prompt_keeps_each_rows_real_tokens(layout, crops, monkeypatch):
    """Pads are not stored, so a crop inside a padded step must know where each row's pads lay: exact for one run
    of pads (right or middle), as the unpatched model's logits afterwards show; two runs are refused, changing
    nothing. Two crops: the first leaves the middle-padded row's last real token (its pads and real tokens after
    the cut are recorded for the second, which must still find them one run)."""
    monkeypatch.setattr(_utils, "interpreting", lambda: False)
    model = tiny_model()
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1] = torch.tensor({"right-padded": [1, 1, 1, 0, 0, 0, 0], "middle-padded": [1, 1, 0, 0, 0, 1, 1],
                            "two-pad-runs": [1, 0, 1, 1, 0, 0, 1]}[layout])
    new = torch.tensor([[5], [9]])
    logits = []
    for patched in (False, True):
        if patched:
            patch_model(model, block_size=4)
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            if patched and layout == "two-pad-runs":
                lc = latent_cache(cache)
                with pytest.raises(NotImplementedError, match="more than one run"):
                    cache.crop(-3)
                assert [lc.seqlen(r) for r in lc.seq_ids] == [7, 4] and cache.get_seq_length() == 7
                return
            for n in crops:  # keep positions 0..3
                cache.crop(n)
            if patched:
                lc = latent_cache(cache)
                assert [lc.seqlen(r) for r in lc.seq_ids] == [4, int(mask[1, :4].sum())]
            kept_mask = torch.cat([mask[:, :4], torch.ones(2, 1, dtype=mask.dtype)], 1)
            logits.append(model(input_ids=new, attention_mask=kept_mask, past_key_values=cache,
                                use_cache=True).logits[:, -1])
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)


def test_crop_of_rows_sharing_a_block_copies_it_once(monkeypatch):
    """Two rows sharing two full blocks (repeated rows, as beams start), cropped into the second under a cap that
    leaves one free block: only the first row's truncation copies the shared tail (the second then holds the block
    alone), so it fits without growing."""
    monkeypatch.setattr(_utils, "interpreting", lambda: False)
    model = patch_model(tiny_model(), block_size=4, max_cache_tokens=12)  # 3 blocks
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    cache.batch_repeat_interleave(2)
    lc = latent_cache(cache)
    assert lc.num_free_blocks == 1
    cache.crop(-2)
    rows = list(lc.seq_ids)
    assert [lc.seqlen(r) for r in rows] == [6, 6] and lc.num_free_blocks == 0 and latent_cache(cache) is lc
    assert_allocator_consistent(lc)
    # the next step writes each row's token into its own last block: the first row's is the new copy, so the host
    # block table must have been rewritten there (it kept pointing at the block the second row now holds alone)
    new = torch.tensor([[5], [9]])
    with torch.no_grad():
        got = model(input_ids=new, past_key_values=cache, use_cache=True).logits[:, -1]
        want = tiny_model()(input_ids=torch.cat([ids[:, :6].expand(2, 6), new], 1)).logits[:, -1]  # unpatched
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
