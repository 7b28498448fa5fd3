"""Bad input found by a fuzzing review (one argument corrupted at a time from a valid call): each must be refused
with a ValueError/TypeError naming the argument, before anything runs or any cache byte changes."""

import numpy as np
import pytest
import torch

from mla_kernels import (LatentBatch, MLAttention, PagedLatentCache, fp8_latent_cache, mla_prefill, write_cache)
from mla_kernels.integrations.flash_mla import flash_mla_with_kvcache

R, P, PAGE = 32, 16, 16


def _flash_inputs(device):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 1, 2, R + P, generator=g).to(device)
    k_cache = torch.randn(6, PAGE, 1, R + P, generator=g).to(device)
    block_table = torch.tensor([[3, 1], [5, 0]], dtype=torch.int32, device=device)
    cache_seqlens = torch.tensor([20, 5], dtype=torch.int32, device=device)
    return q, k_cache, block_table, cache_seqlens


# -- FlashMLA interface -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("indices, error", [
    (torch.zeros(3, 1, 4, dtype=torch.int32), ValueError),  # batch of 3 for q's 2: a RuntimeError from reshape
    (torch.zeros(2, 2, 4, dtype=torch.int32), ValueError),  # S_q of 2 for q's 1
    (torch.zeros(2, 1, 4, dtype=torch.complex64), TypeError),  # NotImplementedError from `indices >= slots`
    (torch.zeros(2, 1, 4).to(torch.float8_e4m3fn), TypeError),
])
def test_flash_mla_refuses_bad_indices_by_name(device, indices, error):
    q, k_cache, block_table, cache_seqlens = _flash_inputs(device)
    with pytest.raises(error, match="indices"):
        flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, R, indices=indices.to(device))


def test_flash_mla_refuses_meta_topk_length_and_attn_sink(device):
    """Both are moved to the call's device; on the meta device that copy raised NotImplementedError."""
    q, k_cache, block_table, cache_seqlens = _flash_inputs(device)
    indices = torch.tensor([[[0, 50, -1, -1]], [[84, 1, -1, -1]]], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="topk_length"):
        flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, R, indices=indices,
                               topk_length=torch.ones(2, dtype=torch.int32, device="meta"))
    with pytest.raises(ValueError, match="attn_sink"):
        flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, R, attn_sink=torch.zeros(2, device="meta"))


def test_flash_mla_names_its_own_arguments(device):
    """Errors named head_dim_v (None: "'>=' not supported between NoneType and int"; 33: "kv_cache latent width")
    and k_cache (meta: "kv_cache is on meta but q_nope is on cpu"; empty: "kv_cache must hold...") as the caller
    passed them, not as mla_decode's internal views."""
    q, k_cache, block_table, cache_seqlens = _flash_inputs(device)
    with pytest.raises(ValueError, match="head_dim_v"):
        flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, None)
    with pytest.raises(ValueError, match="head_dim_v"):
        flash_mla_with_kvcache(q[..., :R + P + 1], k_cache[..., :R + P + 1], block_table, cache_seqlens, R + 1)
    with pytest.raises(ValueError, match="k_cache"):
        flash_mla_with_kvcache(q, k_cache.to("meta"), block_table, cache_seqlens, R)
    with pytest.raises(ValueError, match="k_cache"):
        flash_mla_with_kvcache(q, k_cache[:0], block_table, cache_seqlens, R)


# -- mla_prefill ----------------------------------------------------------------------------------------------------


def test_prefill_max_seqlen_q_past_the_tokens_is_clamped(device):
    """max_seqlen_q sizes the grid: 2^31 (or 2^63) ran 2^28 empty programs (a hang under the interpreter; a failed
    launch past a grid axis on a GPU). No sequence has more new tokens than T, so the bound is cut to T."""
    g = torch.Generator().manual_seed(0)
    buf = torch.randn(6, PAGE, R + P, generator=g).to(device)
    q_nope, q_pe = torch.randn(5, 2, R, generator=g).to(device), torch.randn(5, 2, P, generator=g).to(device)
    args = (q_nope, q_pe, buf[..., :R], buf[..., R:], torch.tensor([[3, 1], [5, 0]], dtype=torch.int32, device=device),
            torch.tensor([0, 3, 5], dtype=torch.int32, device=device),
            torch.tensor([20, 2], dtype=torch.int32, device=device), 0.2)
    expected = mla_prefill(*args)
    for huge in (2**31, 2**63, 10**30):
        torch.testing.assert_close(mla_prefill(*args, max_seqlen_q=huge), expected)


# -- write_cache ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("which", ["kv_cache", "pe_cache", "kv_scale"])
def test_write_cache_refuses_an_expanded_cache(device, fp8, which):
    """A stride-0 (expand()ed) cache aliases its slots: slot 17 landed on slot 1. Refused, nothing written."""
    if which == "kv_scale" and not fp8:
        pytest.skip("only an fp8 cache has scales")
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if fp8 else torch.float32
    width = 128 if fp8 else R
    if fp8:
        kv, scale, pe = fp8_latent_cache(4, PAGE, width, P, device=device)
    else:
        buf = torch.randn(4, PAGE, width + P, generator=g).to(device)
        kv, pe, scale = buf[..., :width], buf[..., width:], None
    caches = dict(kv_cache=kv, pe_cache=pe, kv_scale=scale)
    caches[which] = caches[which][:1].expand_as(caches[which])
    before = [t.clone() for t in caches.values() if t is not None]
    kv_c = torch.randn(2, width, generator=g).to(device, dtype)
    k_pe = torch.randn(2, P, generator=g).to(device, dtype)
    with pytest.raises(ValueError, match=which):
        write_cache(kv_c, k_pe, caches["kv_cache"], caches["pe_cache"], torch.tensor([1, 17], device=device),
                    kv_scale=caches["kv_scale"])
    after = [t for t in caches.values() if t is not None]
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(before, after))


# -- custom ops -----------------------------------------------------------------------------------------------------


def test_custom_ops_refuse_a_meta_tensor_beside_real_ones(device):
    """A direct op call with one meta argument went to the fake implementation: write_cache silently wrote nothing,
    mla_decode returned meta tensors."""
    buf = torch.zeros(4, PAGE, R + P, device=device)
    kv, pe = buf[..., :R], buf[..., R:]
    with pytest.raises(ValueError, match="kv_c"):
        torch.ops.mla_kernels.write_cache(torch.ones(1, R, device="meta"), torch.ones(1, P, device=device), kv, pe,
                                          torch.tensor([3], device=device))
    q_nope, q_pe = torch.randn(1, 1, 2, R, device=device), torch.randn(1, 1, 2, P, device=device)
    with pytest.raises(ValueError, match="q_nope"):
        torch.ops.mla_kernels.mla_decode(q_nope.to("meta"), q_pe, kv, pe,
                                         torch.zeros(1, 1, dtype=torch.int32, device=device),
                                         torch.ones(1, dtype=torch.int32, device=device), 0.2, True, False, None, 16,
                                         None)


def test_decode_op_refuses_a_schedule_taken_apart_wrongly(device):
    from mla_kernels import mla_decode_metadata
    from mla_kernels import schedule as _schedule

    seqlens = torch.tensor([20], dtype=torch.int32, device=device)
    meta = mla_decode_metadata(seqlens, 2, 1, kv_lora_rank=R, rope_dim=P, dtype=torch.float32)
    (programs, sequences), sizes = _schedule.to_op_args(meta)
    buf = torch.zeros(4, PAGE, R + P, device=device)
    args = (torch.randn(1, 1, 2, R, device=device), torch.randn(1, 1, 2, P, device=device), buf[..., :R], buf[..., R:],
            torch.tensor([[0, 1]], dtype=torch.int32, device=device), seqlens, 0.2, True, False, None, 32, None)
    for tables in ((programs, None, list(sizes)), (programs, sequences, None), (programs, sequences, list(sizes)[:-1])):
        with pytest.raises(ValueError, match="sched_"):  # AttributeError / TypeError naming none of them
            torch.ops.mla_kernels.mla_decode(*args, *tables)


# -- PagedLatentCache, fp8_latent_cache -----------------------------------------------------------------------------


@pytest.mark.parametrize("sizes, name", [
    (dict(num_blocks=2**62), "num_blocks"), (dict(num_blocks=2**63), "num_blocks"), (dict(block_size=10**30), "block_size"),
    (dict(num_layers=2**62), "num_layers"),
])
def test_cache_sizes_past_int64_bytes_are_refused_by_name(sizes, name):
    """torch raised a RuntimeError ("Storage size calculation overflowed"), a TypeError naming nothing, or for
    2^62 layers allocated layer after layer until the process was killed."""
    with pytest.raises(ValueError, match=name):
        PagedLatentCache(**dict(dict(num_layers=1, num_blocks=2, block_size=4, kv_lora_rank=R, rope_dim=P), **sizes))
    if "num_layers" not in sizes:
        with pytest.raises(ValueError, match=name):
            fp8_latent_cache(**dict(dict(num_blocks=2, block_size=4, kv_lora_rank=128, rope_dim=P), **sizes))


def test_cache_on_a_gpu_that_is_not_there():
    """torch raised AssertionError ("Torch not compiled with CUDA enabled") or RuntimeError (invalid ordinal)."""
    missing = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ValueError, match="device"):
        PagedLatentCache(1, 2, 4, R, P, dtype=torch.float32, device=missing)
    with pytest.raises(ValueError, match="device"):
        fp8_latent_cache(2, 4, 128, P, device=missing)


# -- MLAttention ----------------------------------------------------------------------------------------------------

DIMS = dict(hidden_size=32, num_heads=2, kv_lora_rank=R, qk_nope_head_dim=16, qk_rope_head_dim=P, v_head_dim=16)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64, beta_fast=32,
            beta_slow=1, mscale=1.0, mscale_all_dim=1.0)


@pytest.mark.parametrize("kwargs, name", [
    (dict(query_scale=10**400), "query_scale"),  # OverflowError from math.isfinite
    (dict(latent_scale=10**400), "latent_scale"),
    (dict(query_scale=1e300), "query_scale"),  # a softmax scale past the kernels': refused after the cache write
    (dict(rope_parameters=dict(YARN, mscale_all_dim=float("nan"))), "mscale_all_dim"),  # NaN softmax scale
    (dict(rope_parameters=dict(YARN, mscale_all_dim=1e308)), "rope_parameters"),  # inf softmax scale
    (dict(rope_parameters=dict(YARN, attention_factor=float("nan"))), "attention_factor"),  # NaN outputs, silently
    (dict(rope_parameters=dict(YARN, beta_fast=-1)), "beta_fast"),  # "math domain error"
    (dict(rope_parameters=dict(YARN, beta_slow="x")), "beta_slow"),  # "can't multiply sequence by non-int"
    (dict(rope_parameters=dict(YARN, mscale="x")), "mscale"),
    (dict(rope_parameters=dict(YARN, partial_rotary_factor=-1)), "partial_rotary_factor"),  # RuntimeError
    (dict(rope_parameters=dict(YARN, partial_rotary_factor=0.5)), "partial_rotary_factor"),  # RuntimeError in forward
    (dict(rope_parameters=dict(YARN, original_max_position_embeddings=None)), "original_max_position_embeddings"),
])
def test_mlattention_refuses_bad_scales_and_rope_parameters_at_construction(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        MLAttention(**DIMS, **kwargs)


@pytest.mark.parametrize("value", [np.float32(0.5), np.float64(0.5), np.int64(2), torch.tensor(0.5).item()],
                         ids=["np.float32", "np.float64", "np.int64", "item"])
def test_mlattention_scales_take_any_real_number(value):
    """query_scale and latent_scale take the numbers softmax_scale and rope_parameters take: a numpy float32 was
    refused ("query_scale must be a float, got float32") where np.float64, a float subclass, and rope_parameters'
    float32 factor were taken."""
    attn = MLAttention(**DIMS, query_scale=value, latent_scale=value)
    assert type(attn.query_scale) is float and type(attn.latent_scale) is float
    assert attn.query_scale == attn.latent_scale == float(value)
    assert attn.softmax_scale == MLAttention(**DIMS).softmax_scale * float(value)


def test_mlattention_yarn_factor_none_is_taken():
    """rope_inv_freq computes a None factor from max_position_embeddings; softmax_scale_for raised a TypeError
    ("'<=' not supported between NoneType and int") first when mscale_all_dim was set."""
    attn = MLAttention(**DIMS, rope_parameters=dict(YARN, factor=None), max_position_embeddings=256)
    same = MLAttention(**DIMS, rope_parameters=dict(YARN, factor=4.0), max_position_embeddings=256)
    assert attn.softmax_scale == same.softmax_scale
    assert torch.equal(attn.inv_freq, same.inv_freq)


def _step(device, n=(1, 1)):
    attn = MLAttention(**DIMS, device=device).eval()
    cache = PagedLatentCache(1, 6, PAGE, R, P, dtype=torch.float32, device=device)
    ids = [cache.add_sequence() for _ in n]
    return attn, cache, LatentBatch.reserve(cache, ids, list(n))


def test_mlattention_forward_refuses_a_0dim_hidden_states(device):
    attn, cache, batch = _step(device)
    with torch.no_grad(), pytest.raises(ValueError, match="hidden_states"):  # IndexError: tuple index out of range
        attn(torch.tensor(1.0, device=device), batch)


def test_mlattention_attend_refuses_numpy_queries_before_writing(device):
    """A numpy array has the right .shape (and numpy 2's .device == 'cpu'): it was refused by the confusing 'the
    batch's PagedLatentCache is on cpu, the module's tokens on cpu'."""
    attn, cache, batch = _step(device)
    before = cache.buffer(0).clone()
    args = dict(q_nope=torch.randn(2, 2, 16), q_pe=torch.randn(2, 2, P), kv_c=torch.randn(2, R), k_pe=torch.randn(2, P))
    args = {k: v.to(device) for k, v in args.items()}
    args["q_nope"] = np.zeros((2, 2, 16), dtype=np.float32)
    with torch.no_grad(), pytest.raises(TypeError, match="q_nope"):
        attn.attend(**args, batch=batch)
    assert torch.equal(cache.buffer(0), before)
