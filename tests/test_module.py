"""MLAttention against transformers' DeepseekV3Attention: same weights, same outputs, over the paged latent cache.

The kernels run through the Triton interpreter on the CPU; fp32 parity runs the kernels in fp32
(full-precision dots, as on a GPU where fp32 inputs use ``input_precision="ieee"``).
"""

from __future__ import annotations

import unittest.mock

import pytest
import torch

import mla_kernels
from helpers import OLD_AOT_AUTOGRAD, assert_close, fp8_linear, use_sink_attention
from mla_kernels import _utils
from mla_kernels.cache import CacheFullError, PagedLatentCache
from mla_kernels.module import LatentBatch, MLAttention

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (  # noqa: E402
    DeepseekV3Attention,
    DeepseekV3RotaryEmbedding,
)

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0}
CONFIGS = {
    "qproj-default": dict(q_lora_rank=None, rope_parameters=None),
    "qlora-yarn": dict(q_lora_rank=32, rope_parameters=YARN),
    "qproj-halfrope": dict(q_lora_rank=None, rope_parameters=None, rope_interleave=False),
}


def tiny_config(**overrides) -> DeepseekV3Config:
    kw = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32,
              qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, vocab_size=128, num_hidden_layers=2,
              intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
              topk_group=1, first_k_dense_replace=1, max_position_embeddings=256, attn_implementation="eager",
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    return DeepseekV3Config(**kw)


def reference_attention(config, seed=1):
    """A transformers DeepseekV3Attention with random weights (std 0.2, so attention is far from uniform)."""
    torch.manual_seed(seed)
    ref = DeepseekV3Attention(config, layer_idx=0).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
    return ref


def causal_mask(past: int, new: int) -> torch.Tensor:
    """Additive [1, 1, new, past + new] mask, as eager attention takes it."""
    hidden = torch.arange(past + new)[None, :] > (past + torch.arange(new))[:, None]
    return torch.zeros(new, past + new).masked_fill(hidden, float("-inf"))[None, None]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_loads_unchanged(name):
    config = tiny_config(**CONFIGS[name])
    ref = reference_attention(config)
    mod = MLAttention.from_config(config)
    assert list(mod.state_dict()) == list(ref.state_dict())
    mod.load_state_dict(ref.state_dict(), strict=True)
    for key, value in ref.state_dict().items():
        assert torch.equal(mod.state_dict()[key], value), key
    ref.load_state_dict(mod.state_dict(), strict=True)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_rope_and_scale_match_transformers(name):
    config = tiny_config(**CONFIGS[name])
    rotary = DeepseekV3RotaryEmbedding(config)
    mod = MLAttention.from_config(config)
    assert torch.equal(mod.inv_freq, rotary.inv_freq)
    assert mod.rope_scaling_factor == rotary.attention_scaling
    assert mod.softmax_scale == reference_attention(config).scaling
    positions = torch.arange(40)[None]
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    my_cos, my_sin = mod.rotary(positions, torch.float32)
    assert torch.equal(my_cos, cos) and torch.equal(my_sin, sin)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_meta_construction_then_load_keeps_the_rope(name):
    """Built on the meta device, moved with ``to_empty`` and loaded (how large models are built): the rope buffer,
    which no state dict holds, is computed again, not left as whatever the new memory held."""
    config = tiny_config(**CONFIGS[name])
    mod = MLAttention.from_config(config, device="meta")

    def nan_empty_like(t, **kw):  # to_empty's new memory: what it held made certainly wrong
        return torch.full_like(t, float("nan"), **kw)

    with unittest.mock.patch.object(torch, "empty_like", nan_empty_like):
        mod.to_empty(device="cpu")
    mod.load_state_dict(reference_attention(config).state_dict(), strict=True)
    assert torch.equal(mod.inv_freq, MLAttention.from_config(config).inv_freq)
    moved = MLAttention.from_config(config).to(torch.bfloat16)  # an ordinary move keeps converting, as transformers'
    assert moved.inv_freq.dtype == torch.bfloat16


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_transformers_prefill_then_decode(name):
    """Two sequences: ragged prefill, a second ragged prefill over that history (a new chat turn), single-token
    decode steps, then a two-token decode step. Each step is compared with transformers' attention run on each
    sequence alone with its own DynamicCache, in fp32."""
    config = tiny_config(**CONFIGS[name])
    ref = reference_attention(config)
    mod = MLAttention.from_config(config)
    mod.load_state_dict(ref.state_dict())
    steps_against_transformers(mod, ref, config)


def test_no_rope_matches_transformers():
    """qk_rope_head_dim 0 (MLA without a rotary part: Mistral Large 4's no-rope layers, GLM-5.3-Flash's): the query
    and key rope parts are empty, the cache holds the latent alone (a pe_cache of width 0), and every step matches
    transformers' attention given empty rope tables."""
    config = tiny_config(qk_rope_head_dim=0, q_lora_rank=32, rope_parameters=YARN)
    ref = reference_attention(config)
    mod = MLAttention.from_config(config)
    mod.load_state_dict(ref.state_dict())
    assert mod.kv_a_proj_with_mqa.out_features == 32 and mod.softmax_scale == ref.scaling
    steps_against_transformers(mod, ref, config)


def steps_against_transformers(mod: MLAttention, ref, config) -> None:
    """``mod`` and transformers' attention ``ref`` (the same weights) over two sequences, step by step, in fp32:
    ragged prompts (``mla_prefill_attention``), a ragged second turn over that history, one-token decode steps and
    a two-token one (``mla_decode``). transformers runs each sequence alone with its own DynamicCache."""
    rotary = DeepseekV3RotaryEmbedding(config)
    rope = config.qk_rope_head_dim
    cache = PagedLatentCache(1, 32, 4, 32, rope, dtype=torch.float32)
    seqs = [cache.add_sequence(), cache.add_sequence()]
    ref_caches = [DynamicCache(), DynamicCache()]
    steps = [[5, 3], [4, 6], [1, 1], [1, 1], [2, 2]]
    torch.manual_seed(2)
    with torch.no_grad():
        for step, counts in enumerate(steps):
            batch = LatentBatch.reserve(cache, seqs, counts)
            x = torch.randn(sum(counts), config.hidden_size)
            out = mod(x, batch)
            expected, start = [], 0
            for b, n in enumerate(counts):
                past = ref_caches[b].get_seq_length()
                positions = torch.arange(past, past + n)[None]
                cos, sin = (t[..., :rope] for t in rotary(x, positions))  # (P 0: no rotary part, empty tables)
                y, _ = ref(x[None, start:start + n], (cos, sin), causal_mask(past, n), ref_caches[b])
                expected.append(y[0])
                start += n
            assert_close(f"step {step} {counts}", out, torch.cat(expected), torch.float32)


def test_attention_sinks_match_transformers_sink_attention(monkeypatch):
    """``MLAttention(attention_sinks=True)``: each head's learned logit ``sinks[h]`` joins its softmax as a key of
    value zero. Against transformers' DeepseekV3Attention holding the same weights and sinks, run through gpt-oss's
    eager attention (which appends ``module.sinks`` to each row of scores as that key, then drops its column), at
    every step of ``steps_against_transformers`` (both the prefill and the decode paths). The sinks are drawn at
    std 2 around the scores' scale, so they move the outputs far past fp32 rounding (a module ignoring them was off
    by 0.52 relative RMS at the first step). The sparse step (``indices`` listing every position) equals the dense
    one with sinks too; sinks that do not fit the module are refused before anything is written."""
    from mla_kernels.module import config_kwargs

    use_sink_attention(monkeypatch)
    config = tiny_config(q_lora_rank=32, rope_parameters=YARN)
    ref = reference_attention(config)
    ref.sinks = torch.nn.Parameter(torch.randn(config.num_attention_heads, generator=torch.Generator().manual_seed(5))
                                   * 2)
    mod = MLAttention(**config_kwargs(config), attention_sinks=True)
    assert list(mod.state_dict()) == list(ref.state_dict())  # (sinks first, as a module's own parameter)
    mod.load_state_dict(ref.state_dict())
    steps_against_transformers(mod, ref, config)

    counts, total = [5, 3], 8
    hidden = torch.randn(total, config.hidden_size, generator=torch.Generator().manual_seed(4))
    positions = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    every = torch.where(torch.arange(5)[None] <= positions[:, None], torch.arange(5)[None], -1)  # [T, 5]
    outs = []
    for indices in (None, every):
        cache = PagedLatentCache(1, 8, 4, 32, 16, dtype=torch.float32)
        batch = LatentBatch.reserve(cache, [cache.add_sequence(), cache.add_sequence()], counts)
        with torch.no_grad():
            outs.append(mod.attend(*mod.project(hidden, *mod.rotary(batch.positions, torch.float32)), batch,
                                   indices=indices))
    assert_close("sparse step with sinks", outs[1], outs[0], torch.float32)
    mod.sinks = torch.nn.Parameter(torch.zeros(1))  # would broadcast: refused by name before the write
    cache = PagedLatentCache(1, 8, 4, 32, 16, dtype=torch.float32)
    batch = LatentBatch.reserve(cache, [cache.add_sequence(), cache.add_sequence()], counts)
    with torch.no_grad(), pytest.raises(ValueError, match=r"sinks must be a \[num_heads\]"):
        mod.attend(*mod.project(hidden, *mod.rotary(batch.positions, torch.float32)), batch)
    assert not cache.buffer(0).any(), "the refused call wrote to the cache"


def test_longcat_config_builds_its_attention():
    """From a LongCat-Flash config, MLAttention carries its LoRA scales (sqrt(hidden / rank) on the query and the
    latent: 2 and sqrt(2) here): same outputs as transformers' LongcatFlashMLA over a prompt step and a decode step,
    in fp32; and the latent it caches is the scaled one."""
    from transformers import LongcatFlashConfig
    from transformers.models.longcat_flash.modeling_longcat_flash import LongcatFlashMLA, LongcatFlashRotaryEmbedding
    config = LongcatFlashConfig(hidden_size=64, num_layers=1, num_attention_heads=4, q_lora_rank=16, kv_lora_rank=32,
                                qk_nope_head_dim=16, qk_rope_head_dim=16, head_dim=16, v_head_dim=16, vocab_size=128,
                                ffn_hidden_size=64, expert_ffn_hidden_size=32, n_routed_experts=4, zero_expert_num=2,
                                moe_topk=2, max_position_embeddings=256, attn_implementation="eager")
    torch.manual_seed(1)
    ref = LongcatFlashMLA(config, layer_idx=0).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
    mod = MLAttention.from_config(config)
    assert (mod.query_scale, mod.latent_scale) == (ref.mla_scale_q_lora, ref.mla_scale_kv_lora) == (2.0, 2 ** 0.5)
    assert mod.softmax_scale == ref.scaling * 2.0
    mod.load_state_dict(ref.state_dict())
    rotary = LongcatFlashRotaryEmbedding(config)
    cache = PagedLatentCache(1, 8, 4, 32, 16, dtype=torch.float32)
    seq = cache.add_sequence()
    ref_cache = DynamicCache()
    torch.manual_seed(2)
    with torch.no_grad():
        for past, n in ((0, 6), (6, 1)):
            x = torch.randn(n, config.hidden_size)
            out = mod(x, LatentBatch.reserve(cache, [seq], [n]))
            cos, sin = rotary(x, torch.arange(past, past + n)[None])
            expected, _ = ref(x[None], (cos, sin), causal_mask(past, n), ref_cache)
            assert_close(f"longcat {past}+{n}", out, expected[0], torch.float32)
    # the latent norm runs as one kernel (mla_kernels.norm), its fp32 sum of squares in another order than torch's
    # mean: within fp32 rounding of the module's, where an unscaled latent is off by sqrt(2)
    assert_close("cached latent", cache.read(0, seq)[0], ref_cache.layers[0].keys[0, 0], torch.float32)


def test_batched_layout_equals_packed():
    """[B, S, hidden] input gives the packed [T, hidden] result reshaped."""
    config = tiny_config()
    mod = MLAttention.from_config(config)
    cache = PagedLatentCache(1, 16, 4, 32, 16, dtype=torch.float32)
    seqs = [cache.add_sequence(), cache.add_sequence()]
    x = torch.randn(2, 3, config.hidden_size)
    with torch.no_grad():
        batch = LatentBatch.reserve(cache, seqs, [3, 3])
        packed = mod(x.reshape(6, -1), batch)
        batched = mod(x, LatentBatch(cache, seqs, [3, 3], batch.slots))
    assert torch.equal(batched.reshape(6, -1), packed)


@pytest.mark.parametrize("sinks", [False, True], ids=["plain", "attention-sinks"])
def test_bf16_against_fp64_reference(gpu_bf16_rounding, sinks, monkeypatch):
    """bf16 module and cache against the float64 transformers computation from the same (bf16-rounded) weights
    and inputs. Tolerance: the output passes through about six bf16 roundings (projections, rope, norm, cache
    write, attention output, o_proj), each ~2.3e-3 relative RMS and independent: ~6e-3 (measured 4.7e-3 to 6.4e-3
    over 8 weight and input seeds); the bound is that noise over helpers.NOISE_OF_BOUND, as RMS_TOL is: 1e-2.
    Those are a GPU's roundings (``gpu_bf16_rounding``): the interpreter's truncating casts bias the latent norm's
    two roundings (``mla_kernels.norm``) toward zero, which scales every cached latent down coherently (1.04e-2
    truncated, 3.95e-3 rounded, measured 2026-12-06; 6.2e-3 and 4.0e-3 with the norm in PyTorch ops). With
    ``sinks``, attention sinks on both sides (gpt-oss's sink attention in transformers', std 2): their scaling
    rounds the attention output to bf16 once more, a seventh rounding, within the same bound (4.46e-3 measured,
    3.99e-3 without sinks, 2026-12-07)."""
    from mla_kernels.module import config_kwargs

    config = tiny_config(q_lora_rank=32, rope_parameters=YARN)
    ref = reference_attention(config).to(torch.bfloat16).double()
    if sinks:
        use_sink_attention(monkeypatch)
        ref.sinks = torch.nn.Parameter(torch.randn(4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
                                       * 2)
    rotary = DeepseekV3RotaryEmbedding(config)
    mod = MLAttention(**config_kwargs(config), dtype=torch.bfloat16, attention_sinks=sinks)
    mod.load_state_dict(ref.state_dict())
    cache = PagedLatentCache(1, 16, 16, 32, 16, dtype=torch.bfloat16)
    seq = cache.add_sequence()
    x = torch.randn(1, 12, config.hidden_size).to(torch.bfloat16)
    with torch.no_grad():
        out = mod(x, LatentBatch.reserve(cache, [seq], [12]))
        cos, sin = rotary(x.double(), torch.arange(12)[None])
        expected, _ = ref(x.double(), (cos, sin), causal_mask(0, 12), None)
    assert_close("bf16 prefill", out, expected, torch.bfloat16, rms_tol=1e-2, cos_tol=1e-4)


def test_an_fp8_kv_b_proj_computes_in_the_modules_dtype():
    """An MLAttention whose kv_b_proj is transformers' FP8Linear (as an fp8 checkpoint loads) computes in the dtype
    of its other parameters (its latent norm's), not its fp8 weight's: bf16 inputs are taken and give the bits of
    the module holding the exactly dequantized weight, in a prompt and a decode step; fp32 inputs are refused,
    naming bf16, and not advising module.to(float32), which would cast the fp8 weight without its scales."""
    config = tiny_config(q_lora_rank=32)
    plain = MLAttention.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0.0, 0.2)
    fp8 = MLAttention.from_config(config, dtype=torch.bfloat16)
    fp8.load_state_dict(plain.state_dict())
    fp8.kv_b_proj, exact = fp8_linear(plain.kv_b_proj, (16, 24))
    with torch.no_grad():
        plain.kv_b_proj.weight.copy_(exact)
    x = torch.randn(2, 6, config.hidden_size).to(torch.bfloat16)
    outs = []
    for mod in (fp8, plain):
        cache = PagedLatentCache(1, 16, 4, 32, 16, dtype=torch.bfloat16)
        seqs = [cache.add_sequence(), cache.add_sequence()]
        with torch.no_grad():
            outs.append((mod(x[:, :5], LatentBatch.reserve(cache, seqs, [5, 5])),
                         mod(x[:, 5:], LatentBatch.reserve(cache, seqs, [1, 1]))))
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    with torch.no_grad(), pytest.raises(TypeError, match=r"hidden_states is torch.float32 but the module computes in "
                                                         r"torch.bfloat16: convert hidden_states.to\(torch.bfloat16\) "
                                                         r"\(its kv_b_proj is fp8: module.to\(dtype\) would cast"):
        fp8(x.float(), LatentBatch.reserve(cache, seqs, [6, 6]))
    with torch.inference_mode():  # its weights made there: inference tensors, which have no version counter
        inference_fp8 = MLAttention.from_config(config, dtype=torch.bfloat16)
        inference_fp8.load_state_dict(plain.state_dict())
        inference_fp8.kv_b_proj = fp8_linear(plain.kv_b_proj, (16, 24))[0]
        cache = PagedLatentCache(1, 16, 4, 32, 16, dtype=torch.bfloat16)
        seqs = [cache.add_sequence(), cache.add_sequence()]
        assert torch.equal(inference_fp8(x[:, :5], LatentBatch.reserve(cache, seqs, [5, 5])), outs[1][0])


def test_stores_only_latent_and_rope_key():
    """The cache holds, per token, exactly kv_a_layernorm(c) and the roped k_pe; nothing per head."""
    config = tiny_config()
    ref = reference_attention(config)
    mod = MLAttention.from_config(config)
    mod.load_state_dict(ref.state_dict())
    cache = PagedLatentCache(1, 8, 4, 32, 16, dtype=torch.float32)
    seq = cache.add_sequence()
    x = torch.randn(7, config.hidden_size)
    dc = DynamicCache()
    with torch.no_grad():
        mod(x, LatentBatch.reserve(cache, [seq], [7]))
        cos, sin = DeepseekV3RotaryEmbedding(config)(x, torch.arange(7)[None])
        ref(x[None], (cos, sin), causal_mask(0, 7), dc)
    kv, pe = cache.read(0, seq)
    assert cache.buffer(0).shape[-1] == config.kv_lora_rank + config.qk_rope_head_dim
    # the latent norm is one kernel (mla_kernels.norm) whose fp32 sum of squares runs in another order than torch's
    # mean: the latent within fp32 rounding of the module's (a wrong or missing norm is off by far more)
    assert_close("cached latent", kv, dc.layers[0].keys[0, 0], torch.float32)
    torch.testing.assert_close(pe, dc.layers[0].values[0, 0], rtol=0, atol=0)


@pytest.mark.parametrize("path", ["interpreter", "torch"])
def test_attend_with_indices(path, monkeypatch):
    """``attend(indices=...)`` (DeepSeek-V3.2's sparse step) over a prompt step of two sequences: listing every
    position equals dense attention; entries after a token's own position, or past its sequence, are skipped as
    documented (the same as -1; they were refused on the CPU, read as past the one-token sequence each token runs
    as); a ``q_pe`` strided in its last dimension is taken as the dense path takes it; bad lists are refused
    before anything is written. fp32 throughout."""
    if path == "torch":
        monkeypatch.setattr(_utils, "interpreting", lambda: False)
    config = tiny_config(q_lora_rank=32)
    mod = MLAttention.from_config(config)
    counts, total = [5, 3], 8
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(total, config.hidden_size, generator=gen)
    positions = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    every = torch.where(torch.arange(5)[None] <= positions[:, None], torch.arange(5)[None], -1)  # [T, 5]
    future = torch.where(every < 0, positions[:, None] + 1 + torch.arange(5)[None], every)  # later, or past the end

    def step(indices, strided_pe=False):
        cache = PagedLatentCache(1, 8, 4, 32, 16, dtype=torch.float32)
        batch = LatentBatch.reserve(cache, [cache.add_sequence(), cache.add_sequence()], counts)
        cos, sin = mod.rotary(batch.positions, torch.float32)
        with torch.no_grad():
            q_nope, q_pe, kv_c, k_pe = mod.project(hidden, cos, sin)
            if strided_pe:
                q_pe = torch.stack([q_pe, q_pe], -1)[..., 0]
                assert q_pe.stride(-1) == 2
            return mod.attend(q_nope, q_pe, kv_c, k_pe, batch, indices=indices), cache

    dense, _ = step(None)
    listed, _ = step(every)
    assert_close("every position listed", listed, dense, torch.float32)
    skipped, _ = step(future)
    torch.testing.assert_close(skipped, listed, rtol=0, atol=0)
    strided, _ = step(every, strided_pe=True)
    torch.testing.assert_close(strided, listed, rtol=0, atol=0)
    for bad, error in ((every.float(), TypeError), (every[:, None], ValueError), (every[:7], ValueError),
                       (every.tolist(), TypeError)):
        cache = PagedLatentCache(1, 8, 4, 32, 16, dtype=torch.float32)
        batch = LatentBatch.reserve(cache, [cache.add_sequence(), cache.add_sequence()], counts)
        cos, sin = mod.rotary(batch.positions, torch.float32)
        with torch.no_grad(), pytest.raises(error, match="indices"):
            mod.attend(*mod.project(hidden, cos, sin), batch, indices=bad)
        assert not cache.buffer(0).any(), "the refused call wrote to the cache"


def test_full_cache_raises_before_writing():
    """LatentBatch.reserve is all-or-nothing: a step that doesn't fit changes no sequence (seed 002's limit)."""
    cache = PagedLatentCache(1, 2, 4, 32, 16, dtype=torch.bfloat16)
    a, b = cache.add_sequence(), cache.add_sequence()
    LatentBatch.reserve(cache, [a], [6])
    with pytest.raises(CacheFullError, match="appending 5 tokens to 2 sequence"):
        LatentBatch.reserve(cache, [a, b], [1, 4])
    assert cache.seqlen(a) == 6 and cache.seqlen(b) == 0


def test_torch_path_matches_interpreter(monkeypatch):
    """The PyTorch path (CPU without the interpreter) gives the interpreter's result."""
    config = tiny_config(q_lora_rank=32)
    mod = MLAttention.from_config(config)
    x = torch.randn(9, config.hidden_size)

    def run():
        cache = PagedLatentCache(1, 8, 4, 32, 16, dtype=torch.float32)
        seqs = [cache.add_sequence(), cache.add_sequence()]
        with torch.no_grad():
            first = mod(x[:7], LatentBatch.reserve(cache, seqs, [4, 3]))
            second = mod(x[7:], LatentBatch.reserve(cache, seqs, [1, 1]))
        return torch.cat([first, second])

    kernels = run()
    monkeypatch.setattr(_utils, "interpreting", lambda: False)
    assert_close("torch path", run(), kernels, torch.float32)


def test_prefill_passes_the_batch_host_lengths(monkeypatch):
    """A ragged step hands mla_prefill_attention the LatentBatch's host lengths (so on a GPU it reads nothing back),
    equal to its tensors, from either constructor (reserve builds it from the cache manager's bookkeeping)."""
    from mla_kernels import prefill

    calls = []
    real = prefill.mla_prefill_attention
    monkeypatch.setattr(prefill, "mla_prefill_attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    mod = MLAttention.from_config(tiny_config()).eval().requires_grad_(False)
    cache = PagedLatentCache(1, 16, 4, 32, 16, dtype=torch.float32)
    seqs = [cache.add_sequence(), cache.add_sequence(), cache.add_sequence()]
    cache.append(seqs[0], 5)
    with torch.no_grad():
        reserved = LatentBatch.reserve(cache, seqs, [3, 0, 6])
        mod(torch.randn(9, 64), reserved)
        built = LatentBatch(cache, seqs, [2, 1, 0], cache.append_batch(seqs, [2, 1, 0]))
        mod(torch.randn(3, 64), built)
    assert len(calls) == 2
    for kw, batch in zip(calls, (reserved, built)):
        assert kw["cu_seqlens_q_host"] == batch.cu_seqlens_q.tolist() == batch.cu_seqlens_q_host
        assert kw["cache_seqlens_host"] == batch.cache_seqlens.tolist() == batch.cache_seqlens_host
    assert calls[0]["cu_seqlens_q_host"] == [0, 3, 3, 9] and calls[0]["cache_seqlens_host"] == [8, 0, 6]


def test_numpy_sizes_are_ints():
    """Sizes of numpy's int types (a config read from an array) build the same module and cache as Python ints,
    with Python ints kept (they were refused with "hidden_size must be an int, got int64", where mla_decode took
    them); a float or a bool (numpy's and torch's too, whose __index__ gives 1) still is refused."""
    import numpy as np
    sizes = (64, 4, 32, 16, 16, 16)
    rope = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4, "original_max_position_embeddings": 64}
    torch.manual_seed(0)
    expected = MLAttention(*sizes, q_lora_rank=24, rope_parameters=rope, max_position_embeddings=256)
    torch.manual_seed(0)
    mod = MLAttention(*map(np.int64, sizes), q_lora_rank=np.int32(24), max_position_embeddings=np.int64(256),
                      layer_idx=np.int16(0), rope_parameters=dict(rope, original_max_position_embeddings=np.int64(64)))
    for name in ("hidden_size", "num_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                 "q_lora_rank", "layer_idx", "max_position_embeddings", "qk_head_dim"):
        assert type(getattr(mod, name)) is int and getattr(mod, name) == getattr(expected, name), name
    assert type(mod.rope_parameters["original_max_position_embeddings"]) is int
    assert mod.rope_parameters == expected.rope_parameters and mod.softmax_scale == expected.softmax_scale
    for a, b in zip(mod.state_dict().values(), expected.state_dict().values()):
        assert torch.equal(a, b)
    cache = PagedLatentCache(np.int64(2), np.int64(5), np.int32(4), np.int64(32), np.int64(16))
    for name, value in (("num_layers", 2), ("num_blocks", 5), ("block_size", 4), ("kv_lora_rank", 32),
                        ("rope_dim", 16)):
        assert type(getattr(cache, name)) is int and getattr(cache, name) == value, name
    kv, scale, pe = mla_kernels.fp8_latent_cache(np.int64(3), np.int64(4), np.int64(128), np.int64(16))
    assert kv.shape == (3, 4, 128) and scale.shape == (3, 4, 1) and pe.shape == (3, 4, 16)
    for bad in (np.float64(64), np.bool_(True), True, torch.tensor(True)):
        with pytest.raises(TypeError, match="hidden_size"):
            MLAttention(bad, 4, 32, 16, 16, 16)
        with pytest.raises(TypeError, match="num_blocks"):
            PagedLatentCache(1, bad, 4, 32, 16)


def test_rope_parameters_old_type_key_gets_yarns_softmax_scale():
    """transformers' older key ``"type"`` names YaRN as ``"rope_type"`` does: the same frequencies and the same
    softmax scale (``mscale_all_dim``'s correction; it got the frequencies but the plain ``qk_head_dim ** -0.5``,
    every score ~1.9x too small here)."""
    old = {("type" if k == "rope_type" else k): v for k, v in YARN.items()}
    new, legacy = MLAttention(64, 4, 32, 16, 16, 16, rope_parameters=YARN), \
        MLAttention(64, 4, 32, 16, 16, 16, rope_parameters=old)
    assert torch.equal(new.inv_freq, legacy.inv_freq)
    assert legacy.softmax_scale == new.softmax_scale != 32 ** -0.5


def test_bad_arguments():
    config = tiny_config()
    with pytest.raises(ValueError, match="kv_lora_rank"):
        MLAttention.from_config(tiny_config(kv_lora_rank=24))
    with pytest.raises(ValueError, match="qk_rope_head_dim"):
        MLAttention.from_config(tiny_config(qk_rope_head_dim=8))
    with pytest.raises(TypeError, match="hidden_size"):
        MLAttention(64.0, 4, 32, 16, 16, 16)
    with pytest.raises(ValueError, match="rope_style"):
        MLAttention(64, 4, 32, 16, 16, 16, rope_style="spiral")
    with pytest.raises(ValueError, match="rope_type"):
        MLAttention(64, 4, 32, 16, 16, 16, rope_parameters={"rope_type": "longrope", "rope_theta": 1e4})
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        MLAttention(64, 4, 32, 16, 16, 16, rope_parameters={"rope_type": "yarn", "factor": 4.0})
    # rope numbers the tables cannot be built from: a theta of 0, -1 or NaN gave NaN tables (and NaN outputs)
    for bad in (0.0, -1.0, 1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="rope_theta"):
            MLAttention(64, 4, 32, 16, 16, 16, rope_parameters={"rope_type": "default", "rope_theta": bad})
    with pytest.raises(TypeError, match="rope_theta"):
        MLAttention(64, 4, 32, 16, 16, 16, rope_parameters={"rope_type": "default", "rope_theta": "x"})
    # ints past float's range: OverflowError ("int too big to convert") from the tables, naming nothing
    with pytest.raises(ValueError, match="rope_theta"):
        MLAttention(64, 4, 32, 16, 16, 16, rope_parameters={"rope_type": "default", "rope_theta": 10 ** 400})
    with pytest.raises(ValueError, match="beta_fast"):
        MLAttention(64, 4, 32, 16, 16, 16, rope_parameters=dict(YARN, beta_fast=10 ** 400))
    with pytest.raises(ValueError, match="factor"):
        MLAttention(64, 4, 32, 16, 16, 16, rope_parameters={"rope_type": "yarn", "factor": -2.0, "rope_theta": 1e4,
                                                            "original_max_position_embeddings": 64})
    with pytest.raises(TypeError, match="rope_parameters must be a dict"):
        MLAttention(64, 4, 32, 16, 16, 16, rope_parameters="x")
    with pytest.raises(TypeError, match="max_position_embeddings"):
        MLAttention(64, 4, 32, 16, 16, 16, max_position_embeddings="x")
    # flags and dtypes: a string or None was read as a flag ("no" gave the interleaved rope and biases, YaRN's
    # truncate "no" as True), float64 failed at the first step, naming a cache dtype no cache takes
    for name in ("rope_interleave", "attention_bias"):
        for bad in ("no", None, 1):
            with pytest.raises(TypeError, match=name):
                MLAttention(64, 4, 32, 16, 16, 16, **{name: bad})
    with pytest.raises(TypeError, match="truncate"):
        MLAttention(64, 4, 32, 16, 16, 16, rope_parameters=dict(YARN, truncate="no"))
    for bad in (torch.float64, torch.int32, "bfloat16"):
        with pytest.raises(TypeError, match="dtype must be None, bfloat16, float16 or float32"):
            MLAttention(64, 4, 32, 16, 16, 16, dtype=bad)
    for name in ("query_scale", "latent_scale"):
        for bad in (0.0, -1.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match=name):
                MLAttention(64, 4, 32, 16, 16, 16, **{name: bad})
        with pytest.raises(TypeError, match=name):
            MLAttention(64, 4, 32, 16, 16, 16, **{name: "2"})
    mod = MLAttention.from_config(config, dtype=torch.bfloat16)
    cache = PagedLatentCache(1, 8, 4, 32, 16, dtype=torch.bfloat16)
    seq = cache.add_sequence()
    batch = LatentBatch.reserve(cache, [seq], [3])
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        with pytest.raises(TypeError, match="batch"):
            mod(x, None)
        with pytest.raises(ValueError, match="hidden_size"):
            mod(torch.randn(3, 32, dtype=torch.bfloat16), batch)
        with pytest.raises(ValueError, match="tokens"):
            mod(x[:2], batch)
        with pytest.raises(ValueError, match="B=1"):
            mod(x.view(1, 3, 64)[:, :2], batch)
        with pytest.raises(TypeError, match="cache holds"):
            MLAttention.from_config(config, dtype=torch.float16)(x.half(), batch)
        # hidden_states in another dtype or on another device than the module: it failed inside nn.Linear
        with pytest.raises(TypeError, match="hidden_states is torch.float32"):
            mod(x.float(), batch)
        with pytest.raises(ValueError, match="hidden_states is on meta"):
            mod(x.to("meta"), batch)
    with pytest.raises(RuntimeError, match="no_grad"):
        mod(x, batch)
    with pytest.raises(TypeError, match="PagedLatentCache"):
        LatentBatch.reserve(object(), [seq], [1])
    with pytest.raises(ValueError, match="fewer than"):
        LatentBatch(cache, [seq], [5], torch.zeros(5, dtype=torch.int64))


def test_frozen_module_refuses_an_input_that_requires_grad():
    """Frozen parameters let forward run with grad enabled, but an input that requires grad would need the kernels'
    missing backward: forward raises before writing the cache instead of returning an output detached from the
    input (gradients silently dropped)."""
    mod = MLAttention.from_config(tiny_config()).requires_grad_(False)
    cache = PagedLatentCache(1, 8, 4, 32, 16, dtype=torch.float32)
    batch = LatentBatch.reserve(cache, [cache.add_sequence()], [3])
    x = torch.randn(3, 64)
    before = cache.buffer(0).clone()
    with pytest.raises(RuntimeError, match="no_grad"):
        mod(x.requires_grad_(), batch)
    with pytest.raises(ValueError, match="no_grad"):  # the same error: the functions' ValueError too
        mod(x, batch)
    torch.testing.assert_close(cache.buffer(0), before, rtol=0, atol=0, equal_nan=True)  # nothing written
    assert not mod(x.detach(), batch).requires_grad  # nothing requires grad: runs with grad enabled


def test_bad_batch_and_rope_tables_are_refused():
    """LatentBatch's counts are non-negative ints, one per distinct sequence; forward's position_embeddings is a
    (cos, sin) pair of [T, P] tables. None of these is truncated, broadcast or reinterpreted."""
    config = tiny_config()
    mod = MLAttention.from_config(config).eval().requires_grad_(False)
    cache = PagedLatentCache(1, 8, 4, 32, 16, dtype=torch.float32)
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.append_batch([a, b], [3, 3])
    with pytest.raises(TypeError, match="num_new_tokens"):
        LatentBatch(cache, [a, b], [1.7, 0.2], torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="num_new_tokens"):
        LatentBatch(cache, [a, b], [2, -1], torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="more than once"):
        LatentBatch(cache, [a, a], [1, 1], torch.zeros(2, dtype=torch.int64))
    batch = LatentBatch.reserve(cache, [a], [2])
    x = torch.randn(2, config.hidden_size)
    cos, sin = mod.rotary(batch.positions, x.dtype)
    before = cache.buffer(0).clone()
    with torch.no_grad():
        with pytest.raises(TypeError, match="position_embeddings"):
            mod(x, batch, position_embeddings=torch.stack([cos[0], sin[0]]))  # one row each, would broadcast
        with pytest.raises(ValueError, match="position_embeddings cos"):
            mod(x, batch, position_embeddings=(cos[:1], sin))
        with pytest.raises(ValueError, match="position_embeddings sin"):
            mod(x, batch, position_embeddings=(cos, sin[:, :8]))
        with pytest.raises(TypeError, match="position_embeddings cos"):
            mod(x, batch, position_embeddings=(cos.long(), sin))
        with pytest.raises(ValueError, match="position_embeddings sin is on meta"):
            mod(x, batch, position_embeddings=(cos, sin.to("meta")))
        assert torch.equal(cache.buffer(0), before)
        expected = mod(x, batch)
        torch.testing.assert_close(mod(x, batch, position_embeddings=(cos[None], sin[None])), expected,
                                   rtol=0, atol=0)
        # tables in another float dtype than the module's (float64 here; float32 for a bf16 module) are converted,
        # as transformers hands them over in the model's dtype (they failed later, naming the internal k_pe)
        torch.testing.assert_close(mod(x, batch, position_embeddings=(cos.double(), sin.double())), expected,
                                   rtol=0, atol=0)


def test_a_batch_that_could_overwrite_live_tokens_is_refused():
    """A LatentBatch whose slots are not its sequences' own (built by hand, or out of date: its sequence freed and
    the blocks reused, or grown by a later reserve) wrote over another sequence's cached tokens silently. Refused
    now, before anything is written; a batch stays usable for every layer of its step."""
    config = tiny_config()
    mod = MLAttention.from_config(config).eval().requires_grad_(False)
    x = lambda n: torch.randn(n, config.hidden_size)  # noqa: E731
    with torch.no_grad():
        cache = PagedLatentCache(2, 4, 4, 32, 16, dtype=torch.float32)
        a = cache.add_sequence()
        old = LatentBatch.reserve(cache, [a], [3])
        mod(x(3), old)
        mod(x(3), old)  # the same step again (as every layer of it does): fine
        cache.free(a)
        c = cache.add_sequence()
        mod(x(3), LatentBatch.reserve(cache, [c], [3]))  # c takes a's freed block
        before = cache.buffer(0).clone()
        with pytest.raises(ValueError, match="out of date.*freed"):
            mod(x(3), old)
        step = LatentBatch.reserve(cache, [c], [1])
        LatentBatch.reserve(cache, [c], [1])  # the next step reserved before this one ran
        with pytest.raises(ValueError, match="out of date.*5 tokens reserved now, 4"):
            mod(x(1), step)
        assert torch.equal(cache.buffer(0), before)

        cache = PagedLatentCache(1, 16, 4, 32, 16, dtype=torch.float32)
        a, b = cache.add_sequence(), cache.add_sequence()
        mod(x(8), LatentBatch.reserve(cache, [a, b], [4, 4]))
        cache.append(a, 2)
        with pytest.raises(ValueError, match="slots"):  # b's slots for a's new tokens
            LatentBatch(cache, [a], [2], cache.slots(b, 0, 2))
        LatentBatch(cache, [a], [2], cache.slots(a, 4, 6))  # a's own: fine


def test_a_cache_that_does_not_fit_the_module_is_named():
    """A cache of other widths or on another device: a ValueError naming the cache and the module's sizes (it named
    the kernels' internal kv_c/kv_cache, or failed inside torch on the rope tables' device)."""
    config = tiny_config()
    mod = MLAttention.from_config(config).eval().requires_grad_(False)
    with torch.no_grad():
        for kwargs in (dict(kv_lora_rank=64, rope_dim=16), dict(kv_lora_rank=32, rope_dim=32)):
            cache = PagedLatentCache(1, 8, 4, dtype=torch.float32, **kwargs)
            batch = LatentBatch.reserve(cache, [cache.add_sequence()], [3])
            with pytest.raises(ValueError, match="kv_lora_rank=32, qk_rope_head_dim=16"):
                mod(torch.randn(3, config.hidden_size), batch)
        cache = PagedLatentCache(1, 8, 4, 32, 16, dtype=torch.float32, device="meta")
        batch = LatentBatch.reserve(cache, [cache.add_sequence()], [3])
        with pytest.raises(ValueError, match="PagedLatentCache is on meta"):
            mod(torch.randn(3, config.hidden_size), batch)


def test_exported():
    assert mla_kernels.MLAttention is MLAttention
    assert mla_kernels.LatentBatch is LatentBatch


@OLD_AOT_AUTOGRAD
def test_compiled_module_does_not_recompile_per_batch_size():
    """torch.compile(MLAttention, fullgraph=True) over decode steps whose batch size changes (1..6, then back to
    1): dynamo's automatic dynamic shapes keep one graph for every size past the first two (sizes 0 and 1 are
    always specialised), instead of one per size until the recompile limit (8) sent later steps back to eager. The
    batch's sizes come from its tensors' shapes (a list's length or int() of a size pinned it). aot_eager runs the
    custom ops' fake implementations with symbolic sizes; each compiled step equals the eager module's."""
    from torch._dynamo.backends.debugging import aot_eager

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    config = tiny_config()
    torch.manual_seed(0)
    attn = MLAttention.from_config(config, 0).eval()
    cache = PagedLatentCache(1, 64, 4, config.kv_lora_rank, config.qk_rope_head_dim, dtype=torch.float32)
    ids = list(range(6))
    for s in ids:
        cache.add_sequence(s)
    torch._dynamo.reset()
    compiled = torch.compile(attn, backend=backend, fullgraph=True)
    with torch.no_grad():
        attn(torch.randn(6 * 3, config.hidden_size), LatentBatch.reserve(cache, ids, [3] * 6))
        for n in [1, 2, 3, 4, 5, 6, 1, 3]:
            batch = LatentBatch.reserve(cache, ids[:n], [1] * n)
            hidden = torch.randn(n, 1, config.hidden_size)
            got = compiled(hidden, batch)
            # the same ops on the same fp32 values (aot_eager may decompose a few): torch's fp32 defaults
            torch.testing.assert_close(got, attn(hidden, batch))
        assert len(graphs) <= 3, f"{len(graphs)} graphs for 6 batch sizes"
        # mixed steps (chunked prefill beside decodes) take mla_prefill_attention: its host lengths stay out of the
        # graph, or every step's lengths would compile anew
        before = len(graphs)
        for counts in ([2, 1, 3], [1, 4], [3, 1, 1, 2], [2, 2, 1], [1, 3, 2, 1, 1]):
            batch = LatentBatch.reserve(cache, ids[:len(counts)], counts)
            hidden = torch.randn(sum(counts), config.hidden_size)
            torch.testing.assert_close(compiled(hidden, batch), attn(hidden, batch))
        assert len(graphs) - before <= 2, f"{len(graphs) - before} graphs for 5 mixed steps"


def test_yarn_defaults_match_transformers():
    """A YaRN config that leaves out beta_fast, beta_slow, mscale and mscale_all_dim takes transformers' defaults
    (32, 1, no mscale correction): the same inverse frequencies and cos/sin scale as its rotary embedding. The theta
    puts beta_fast's correction dimension at 2.99 (31 gave 3.02: another ramp), so a default off by one shows."""
    yarn = {"rope_type": "yarn", "rope_theta": 3180.0, "factor": 4.0, "original_max_position_embeddings": 4096}
    config = tiny_config(rope_parameters=yarn)
    rotary = DeepseekV3RotaryEmbedding(config)
    mod = MLAttention.from_config(config)
    assert torch.equal(mod.inv_freq, rotary.inv_freq)
    assert mod.rope_scaling_factor == rotary.attention_scaling
