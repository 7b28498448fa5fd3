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


def repetitive_prompt(device):
    """One prompt that repeats a span, so prompt lookup proposes candidates (some accepted, some rejected)."""
    ids, _ = left_padded([9])
    ids = torch.cat([ids, ids[:, 2:7]], 1).to(device)
    return ids, torch.ones_like(ids)


@pytest.mark.parametrize("how", ["prompt-lookup", "assistant", "patched-assistant"])
def test_speculative_generation_matches_greedy(how, monkeypatch, device):
    """The cache starts with no headroom in 4-token pages, so crops cross block boundaries and the cache grows."""
    model = tiny_model().to(device)
    ids, mask = repetitive_prompt(device)
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
    assert lc.seqlen(row) == out.past_key_values.get_seq_length() == expected.shape[1] - 1
    assert_allocator_consistent(lc)


def test_crop_drops_the_last_tokens_of_every_row_once(monkeypatch):
    """Cache.crop calls every layer: the shared rows lose ``n`` tokens once, each layer's count goes down by ``n``,
    and the next step attends as a fresh prompt of the kept tokens would. A row whose real tokens run out loses only
    pads past them (never stored). The older API's positive value is a length to keep (transformers 5.17); bad
    values change nothing."""
    monkeypatch.setattr(_utils, "interpreting", lambda: False)  # bookkeeping: the PyTorch path is enough
    model = patch_model(tiny_model(), block_size=4)
    ids, mask = left_padded([7, 3])
    cache, fresh = DynamicCache(config=model.config), DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        lc = latent_cache(cache)
        rows = list(lc.seq_ids)
        cache.crop(-2)
        assert [lc.seqlen(r) for r in rows] == [5, 1] and cache.get_seq_length() == 5
        cache.crop(6)  # keep 6 (more than held): nothing
        cache.crop(3)  # keep 3 of 5: row 1's last real token and one of its pads go
        assert [lc.seqlen(r) for r in rows] == [3, 0] and cache.get_seq_length() == 3
        for bad, error in [(-4, ValueError), (1.5, TypeError), (True, TypeError)]:
            with pytest.raises(error, match="crop|tokens_to_remove"):
                cache.crop(bad)
            assert [lc.seqlen(r) for r in rows] == [3, 0] and cache.get_seq_length() == 3
        assert_allocator_consistent(lc)
        new = torch.tensor([[5], [9]])
        got = model(input_ids=new, attention_mask=torch.cat([mask[:, :3], torch.ones(2, 1, dtype=mask.dtype)], 1),
                    past_key_values=cache, use_cache=True).logits[:, -1]
        kept, kept_mask = torch.cat([ids[:, :3], new], 1), torch.cat([mask[:, :3], torch.ones_like(new)], 1)
        want = model(input_ids=kept, attention_mask=kept_mask, past_key_values=fresh, use_cache=True).logits[:, -1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
