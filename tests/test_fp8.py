"""The FP8 latent cache: the reference quantizer, the quantizing write_cache kernel, decode and prefill over the
FP8 layout against the float64 reference on the dequantized cache, bad input, the cache manager and patch_model.

Tolerances for attention over an fp8 cache (FP8_RMS_TOL): the reference attends over the exact dequantized values
(e4m3 x fp32 scale, in float64); the kernel dequantizes each latent tile to the query's dtype before its dots, one
more rounding of every K/V element (at most one ulp, 2^-8 in bf16, when truncated as the interpreter does with
every fp32 -> bf16 conversion; half that when rounded, as on a GPU). A one-ulp bias on K and V adds linearly
to the bf16 budget of helpers.RMS_TOL: 8e-3 + 2^-8 = 1.19e-2 (fp16: 1e-3 + 2^-11). Measured under the interpreter:
9.4e-3 on the h16 case, against 4.3e-3 for the same call on the bf16 cache; 4.2e-3 against a reference that
truncates the dequantized values as the interpreter does, so that extra rounding is the whole difference.
The bound is thin for random data, not for these fixed cases: a 2026-12-04 fuzz at this scale put 1 of 120 random
decodes just over it (1.1921e-2, median 0.75 of it), and wider score spreads (softmax scale 0.5, queries x2) reached
1.27e-2; against the truncated dequantization the same outputs were within the plain bf16 bound (3.7e-3). On a GPU
the dequantized tile is rounded, not truncated. Issue 12's quality target (2e-2 against the bf16 path) holds.
"""

import math

import pytest
import torch

import mla_kernels
from mla_kernels import reference
from helpers import (COS_TOL, RMS_TOL, SENTINEL_BLOCK, assert_close, assert_lse_close, assert_rejects, err_ratio,
                     make_paged_cache)
from mla_kernels import _utils
from mla_kernels.cache import PagedLatentCache, fp8_latent_cache, fp8_row_bytes, write_cache

SCALE = 192 ** -0.5  # DeepSeek's (nope 128 + rope 64) ** -0.5
FP8 = torch.float8_e4m3fn
FP8_RMS_TOL = {torch.bfloat16: RMS_TOL[torch.bfloat16] + 2 ** -8, torch.float16: RMS_TOL[torch.float16] + 2 ** -11}
FP8_COS_TOL = {dt: tol ** 2 for dt, tol in FP8_RMS_TOL.items()}  # cosine difference ~ err^2 / 2, as in helpers
# lse: K is rounded to the query dtype inside the kernel, as the absorbed query is in test_prefill's
# LSE_ATOL_ROUNDED_Q: each score term carries ~2^-9 relative error, the lse up to ~5x that over thousands of rows
FP8_LSE_ATOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.fixture(params=["e4m3", "bits"])
def e4m3_path(request, monkeypatch):
    """Both ways the kernels take an fp8 cache: as e4m3 (sm_89 and later, ROCm, the interpreter) and as its uint8
    bits, decoded and encoded in software (NVIDIA GPUs before sm_89, where Triton refuses the e4m3 type:
    ``_utils.fp8_bits``, forced here)."""
    if request.param == "bits":
        monkeypatch.setattr(_utils, "fp8_bits", _utils.fp8_as_bits)
    return request.param


def storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """Every byte of t's storage (the whole FP8 buffer behind any of its three views), as uint8."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


def fp8_paged_cache(lens, page, widths, dtype, device, seed=0):
    """make_paged_cache's poisoned, shuffled cache, quantized into the FP8 layout with the reference quantizer.
    Unused slots stay poison: a NaN group gets a NaN scale and NaN values."""
    kv, pe, table = make_paged_cache(lens, page, widths, dtype, device, generator_seed=seed)
    kv8, scale, pe8 = fp8_latent_cache(kv.shape[0], page, *widths, rope_dtype=dtype, device=device)
    q, s = reference.quantize_fp8(kv)
    kv8.copy_(q)
    scale.copy_(s)
    pe8.copy_(pe)
    return kv8, scale, pe8, table


# ------------------------------------------------------------------------------------------------
# the reference quantizer
# ------------------------------------------------------------------------------------------------


def e4m3_grid() -> torch.Tensor:
    """Every finite e4m3fn value, sorted (from the 256 bit patterns, independently of any rounding code)."""
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8).double()
    return values[torch.isfinite(values)].unique()


def test_reference_quantizer_rounds_to_nearest_within_the_e4m3_bound():
    """Round trip on values spanning 10 decades (subnormals included), zero groups and the extremes:
    each value is the nearest e4m3 value to x / scale (checked against the whole grid), the error obeys the
    module's bound max(2^-4 |x|, 2^-10 scale), each group's largest value maps to +-448 exactly."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 512, generator=g) * torch.logspace(-5, 5, 64)[:, None]
    x[3, 128:256] = 0.0  # an all-zero group
    x[5, :128] = torch.logspace(-9, 0, 128)  # one group from 1 down to 1e-9 x its max: deep in the subnormals
    q, scale = reference.quantize_fp8(x)
    assert q.dtype == FP8 and q.shape == x.shape and scale.dtype == torch.float32 and scale.shape == (64, 4)
    assert scale[3, 1] == 0 and torch.equal(q[3, 128:256].float(), torch.zeros(128))
    back = reference.dequantize_fp8(q, scale, torch.float64)
    assert torch.isfinite(back).all()

    scaled = x.double().unflatten(-1, (4, 128)) / torch.where(scale > 0, scale, 1).double()[..., None]
    grid = e4m3_grid()
    nearest = (scaled.flatten()[:, None] - grid[None, :]).abs().min(1).values.view_as(scaled)
    got = (scaled - q.double().unflatten(-1, (4, 128))).abs()
    assert torch.all(got <= nearest + 1e-6 * scaled.abs()), "not the nearest e4m3 value"  # fp32 division slack
    amax_pos = x.abs().unflatten(-1, (4, 128)).argmax(-1)
    top = q.double().unflatten(-1, (4, 128)).gather(-1, amax_pos[..., None])[..., 0]
    assert torch.all(top.abs()[scale > 0] == 448.0)

    err = (x.double() - back).abs().unflatten(-1, (4, 128))
    bound = torch.maximum(2.0 ** -4 * x.double().abs().unflatten(-1, (4, 128)),
                          2.0 ** -10 * scale.double()[..., None]) * (1 + 2.0 ** -20)
    assert torch.all(err <= bound), f"worst excess {(err - bound).max().item():.3e}"


def test_reference_quantizer_checks_its_arguments():
    with pytest.raises(ValueError, match="group_size"):
        reference.quantize_fp8(torch.ones(2, 128), 0)
    with pytest.raises(ValueError, match="group_size"):
        reference.quantize_fp8(torch.ones(2, 100))
    with pytest.raises(ValueError, match="group_size"):
        reference.quantize_fp8(torch.tensor(1.0))
    q, s = reference.quantize_fp8(torch.ones(2, 256))
    with pytest.raises(ValueError, match="scale"):  # one scale for both groups broadcast silently before
        reference.dequantize_fp8(q, s[:, :1])
    # the cache's bytes (PagedLatentCache.buffer's uint8), or values already dequantized, were multiplied as numbers
    for other in (q.view(torch.uint8), q.float()):
        with pytest.raises(TypeError, match="q must be float8_e4m3fn"):
            reference.dequantize_fp8(other, s)


def test_reference_quantizer_error_on_gaussian_data():
    """The RMS error the bound implies for Gaussian values: e4m3 rounding is off by up to half a unit, 2^-4 of a value
    at the bottom of its binade and 2^-5 at the top; uniform over that, the relative RMS error is
    sqrt(E[(ulp/x)^2] / 12) = 2^-3 sqrt(E[1/m^2] / 12) ~ 2.4% for mantissas m spread log-uniformly over [1, 2).
    Both sides are checked: an error well below it means the values were not quantized to e4m3 at all."""
    x = torch.randn(4096, 512, generator=torch.Generator().manual_seed(1))
    q, scale = reference.quantize_fp8(x)
    rel = err_ratio(reference.dequantize_fp8(q, scale), x)
    assert 0.020 < rel < 0.030, rel


# ------------------------------------------------------------------------------------------------
# layout and the write kernel
# ------------------------------------------------------------------------------------------------


def test_layout_is_one_contiguous_row_per_token():
    kv, scale, pe = fp8_latent_cache(3, 16)
    base = storage_bytes(kv)
    assert base.numel() == 3 * 16 * 656 == 3 * 16 * fp8_row_bytes()
    assert (kv.dtype, scale.dtype, pe.dtype) == (FP8, torch.float32, torch.bfloat16)
    assert (kv.shape, scale.shape, pe.shape) == ((3, 16, 512), (3, 16, 4), (3, 16, 64))
    for t in (kv, scale, pe):  # each view steps one 656-byte row per token and 16 rows per page
        assert t.stride(1) * t.element_size() == 656 and t.stride(0) == 16 * t.stride(1) and t.stride(2) == 1
    assert [t.data_ptr() - base.data_ptr() for t in (kv, scale, pe)] == [0, 512, 528]
    assert fp8_row_bytes(512, 64) / ((512 + 64) * 2) == 656 / 1152


@pytest.mark.parametrize("r,p", [(512, 64), (128, 16)], ids=["r512-p64", "r128-p16"])
def test_write_kernel_matches_the_reference_quantizer_bit_for_bit(r, p, device, e4m3_path):
    """write_cache quantizes in its kernel exactly as reference.quantize_fp8 does: every byte equal.

    Measured under the interpreter (triton 3.9): a plain ``.to(tl.float8e4nv)`` of N(0, 100^2) values gave 1617 of
    65536 (2.5%) values different from torch's cast, each by a factor of 2 (-31.6 -> -16 instead of -32: the carry
    into the exponent was dropped). With the kernel's explicit round-to-nearest-even before the cast (an exact cast
    then), 0 of 1M values differed, every midpoint between e4m3 values included, so this test asserts equality.
    On a GPU the kernel divides with div.rn (IEEE, as torch) and the cast is exact: equality is expected there too.
    """
    page, num_blocks, tokens = 16, 4, 13
    kv, scale, pe = fp8_latent_cache(num_blocks, page, r, p, device=device)
    buf = storage_bytes(kv)
    buf.fill_(0xFF)  # NaN in all three views
    g = torch.Generator().manual_seed(2)
    kv_c = (torch.randn(tokens, r, generator=g) * torch.logspace(-4, 3, tokens)[:, None]).to(torch.bfloat16)
    kv_c[4] = 0.0
    kv_c[4, ::3] = -0.0  # e4m3 0x80: the kernel's rounding kept the sign of nothing below 0 and stored +0 (0x00)
    kv_c[5, 1:128:2] *= -1e-30  # tiny negatives in a group of normal values: they round to e4m3's -0
    kv_c[6, :128] = torch.logspace(-9, 0, 128)  # subnormals within a group
    # a group of bf16 subnormals (below 1.2e-38; a subnormal scale): the interpreter's bf16 -> fp32 cast got them
    # wrong (124 of 128 bytes differed, the scale 2.54e-41 for 2.23e-41); a GPU's div.rn keeps subnormals
    kv_c[7, :128] = torch.linspace(-1, 1, 128) * 1e-38
    kv_c = kv_c.to(device)
    k_pe = torch.randn(tokens, p, generator=g).to(dtype=torch.bfloat16, device=device)
    slots = torch.randperm(num_blocks * page, generator=g)[:tokens]
    slots[[2, 9]] = -1  # padding
    expected = buf.clone().view(num_blocks, page, -1)
    keep = slots >= 0
    q, s = reference.quantize_fp8(kv_c[keep].cpu())
    rows = expected.view(-1, expected.shape[-1])
    rows[slots[keep], :r] = q.view(torch.uint8).to(device)
    rows[slots[keep], r:r + 4 * (r // 128)] = s.view(torch.uint8).reshape(-1, 4 * (r // 128)).to(device)
    rows[slots[keep], r + 4 * (r // 128):] = k_pe[keep].view(torch.uint8).reshape(-1, 2 * p)
    write_cache(kv_c, k_pe, kv, pe, slots.to(device), kv_scale=scale)
    mismatched = (buf.view_as(expected) != expected).any(-1).nonzero().tolist()
    assert not mismatched, f"rows (block, offset) differing from the reference: {mismatched}"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter divides the NaN input
def test_write_kernel_keeps_nan_and_inf_as_the_reference_quantizer_does(device, e4m3_path):
    """A NaN in a group gives that group a NaN scale and keeps the NaN value (reference.quantize_fp8's contract),
    and an inf gives an inf scale and NaN values, on both paths. Before, the kernel's max and clamp dropped the NaN:
    the scale came from the other 127 values and the NaN was stored as -448, a finite latent. Rows 3 and 4 hold NaNs
    whose top mantissa bits are set (bf16 0x7FFF, and 0xFFFF as in memory filled with 0xFF bytes): the kernel's
    integer rounding wrapped those into a stored +-0 before it looked for NaN, as it would every NaN on a GPU, whose
    NaN-propagating max returns the canonical 0x7FFFFFFF."""
    kv, scale, pe = fp8_latent_cache(1, 8, 256, 16, device=device)
    kv_c = torch.randn(5, 256).to(torch.bfloat16)
    kv_c[0, 3] = float("nan")
    kv_c[1, 130] = float("inf")
    kv_c.view(torch.int16)[3, 7] = 0x7FFF
    kv_c.view(torch.int16)[4, 200] = -1  # 0xFFFF
    assert kv_c[3, 7].isnan() and kv_c[4, 200].isnan()
    k_pe = torch.zeros(5, 16, dtype=torch.bfloat16)
    write_cache(kv_c.to(device), k_pe.to(device), kv, pe, torch.arange(5, device=device), kv_scale=scale)
    q, s = reference.quantize_fp8(kv_c)
    assert torch.equal(scale[0, :5].cpu().isnan(), s.isnan()) and torch.equal(scale[0, :5].cpu().isinf(), s.isinf())
    assert torch.equal(kv[0, :5].cpu().float().isnan(), q.float().isnan())
    finite = s.isfinite()[..., None].expand(-1, -1, 128).flatten(-2)
    assert torch.equal(kv[0, :5].cpu().view(torch.uint8)[finite], q.view(torch.uint8)[finite])


def test_write_then_read_through_the_cache_manager(device):
    cache = PagedLatentCache(2, 4, 8, 128, 16, dtype=FP8, device=device)
    assert cache.bytes_per_token == 2 * (128 + 4 + 32) and cache.buffer(0).dtype == torch.uint8
    assert cache.kv_scale(1).shape == (4, 8, 1) and cache.rope_dtype == torch.bfloat16
    seq = cache.add_sequence()
    slots = cache.append(seq, 11)
    kv_c = torch.randn(11, 128).to(dtype=torch.bfloat16, device=device)
    k_pe = torch.randn(11, 16).to(dtype=torch.bfloat16, device=device)
    cache.write(1, slots, kv_c, k_pe)
    kv, pe = cache.read(1, seq)
    assert torch.equal(kv, reference.dequantize_fp8(*reference.quantize_fp8(kv_c), torch.bfloat16))
    assert torch.equal(pe, k_pe)
    assert torch.equal(storage_bytes(cache.kv_cache(0)), torch.zeros_like(storage_bytes(cache.kv_cache(0))))
    assert PagedLatentCache(61, 1, 1).bytes_per_token == 61 * 1152
    assert PagedLatentCache(61, 1, 1, dtype=FP8).bytes_per_token == 61 * 656
    assert PagedLatentCache(1, 1, 1).kv_scale(0) is None


# ------------------------------------------------------------------------------------------------
# decode and prefill over the FP8 cache
# ------------------------------------------------------------------------------------------------

# (lens, S_q, heads, page, (R, P)): zero-length padding slots, awkward lengths, page sizes 1/16/64, 1 to 128 heads
DECODE_CASES = {
    "h16-page64-s1": ([100, 0, 257, 64], 1, 16, 64, (512, 64)),
    "h3-page16-s2": ([17, 33, 2], 2, 3, 16, (512, 64)),
    "h128-page64-s1": ([200, 65], 1, 128, 64, (512, 64)),
    "h1-page1-s1-r128": ([1, 17, 0], 1, 1, 1, (128, 32)),
}


def decode_inputs(lens, s_q, heads, page, widths, dtype, device, seed=0):
    r, p = widths
    kv, scale, pe, table = fp8_paged_cache(lens, page, widths, dtype, device, seed)
    q = torch.randn(len(lens), s_q, heads, r + p, generator=torch.Generator().manual_seed(seed)).to(dtype=dtype,
                                                                                                   device=device)
    return dict(q_nope=q[..., :r], q_pe=q[..., r:], kv_cache=kv, pe_cache=pe, block_table=table,
                cache_seqlens=torch.tensor(lens, dtype=torch.int32, device=device), softmax_scale=SCALE, kv_scale=scale)


def dequantized(a):
    """The arguments with the fp8 latent replaced by its exact float64 dequantization (NaN poison kept)."""
    b = dict(a, kv_cache=reference.dequantize_fp8(a["kv_cache"], a["kv_scale"], torch.float64))
    b.pop("kv_scale")
    return b


@pytest.mark.parametrize("case", list(DECODE_CASES), ids=list(DECODE_CASES))
def test_decode_parity(case, device, poisoned_empty, e4m3_path):
    a = decode_inputs(*DECODE_CASES[case], torch.bfloat16, device)
    out, lse = mla_kernels.mla_decode(**a, return_lse=True)
    d = dequantized(a)
    ref_out, ref_lse = reference.absorbed_decode(*(d[k] for k in ("q_nope", "q_pe", "kv_cache", "pe_cache",
                                                                  "block_table", "cache_seqlens")), SCALE)
    assert out.dtype == torch.bfloat16 and out.shape == a["q_nope"].shape
    assert_close(case, out, ref_out, torch.bfloat16, FP8_RMS_TOL[torch.bfloat16], FP8_COS_TOL[torch.bfloat16])
    assert_lse_close(case, lse, ref_lse, FP8_LSE_ATOL[torch.bfloat16])


def test_e4m3_bits_decode_exactly_as_e4m3(device, monkeypatch):
    """The software decoding of the cache's bits (``_dequant_fp8`` given uint8) gives the very values the e4m3 type
    does: the same outputs to the bit, with every finite e4m3 byte (subnormals and -0 included) in the latent. Then
    e4m3fn's NaN bytes (0x7F, 0xFF), which the interpreter's own e4m3 conversion reads as numbers (a GPU's as NaN):
    decoded in software they make NaN exactly the rows the float64 reference makes NaN."""
    a = decode_inputs([300, 2, 77], 2, 4, 16, (256, 32), torch.bfloat16, device, seed=5)
    finite = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
    n = a["kv_cache"].numel()
    a["kv_cache"].view(torch.uint8).copy_(finite.repeat(n // len(finite) + 1)[:n].view_as(a["kv_cache"]).to(device))
    a["kv_scale"].fill_(2.0 ** -4)
    native = mla_kernels.mla_decode(**a, return_lse=True)
    monkeypatch.setattr(_utils, "fp8_bits", _utils.fp8_as_bits)
    bits = mla_kernels.mla_decode(**a, return_lse=True)
    assert torch.equal(native[0], bits[0]) and torch.equal(native[1], bits[1])
    block = int(a["block_table"][2, 0])
    a["kv_cache"].view(torch.uint8)[block, 5, 7] = 0xFF  # real tokens 5 and 6 of sequence 2: all its rows see them
    a["kv_cache"].view(torch.uint8)[block, 6, 0] = 0x7F
    out, lse = mla_kernels.mla_decode(**a, return_lse=True)
    d = dequantized(a)
    ref_out, ref_lse = reference.absorbed_decode(*(d[k] for k in ("q_nope", "q_pe", "kv_cache", "pe_cache",
                                                                  "block_table", "cache_seqlens")), SCALE)
    assert ref_out[2].isnan().all() and not ref_out[:2].isnan().any()
    assert_close("NaN bytes", out, ref_out, torch.bfloat16, FP8_RMS_TOL[torch.bfloat16], FP8_COS_TOL[torch.bfloat16])


def test_fp8_bits_dispatch(monkeypatch):
    """``_utils.fp8_bits``: an fp8 cache's uint8 view exactly on NVIDIA GPUs before sm_89 (Triton's fp8e4nv threshold:
    triton.backends.nvidia.compiler adds the type at capability >= 89), the cache itself on sm_89+, ROCm and the CPU;
    other caches untouched. A stand-in CUDA tensor: this suite has no GPU."""
    class Cache:
        def __init__(self, dtype, device):
            self.dtype, self.device = dtype, torch.device(device)

        def view(self, dtype):
            return ("bits", dtype)

    for cap, hip, device, dtype, bits in [((7, 5), False, "cuda:0", FP8, True), ((8, 0), False, "cuda:1", FP8, True),
                                          ((8, 6), False, "cuda:0", FP8, True), ((8, 9), False, "cuda:0", FP8, False),
                                          ((9, 0), False, "cuda:0", FP8, False), ((12, 0), False, "cuda:0", FP8, False),
                                          ((9, 4), True, "cuda:0", FP8, False), ((8, 0), False, "cpu", FP8, False),
                                          ((8, 0), False, "cuda:0", torch.bfloat16, False),
                                          ((8, 0), False, "cuda:0", torch.uint8, False)]:
        monkeypatch.setattr(_utils, "capability", lambda d, cap=cap: cap)
        monkeypatch.setattr(_utils, "is_hip", lambda hip=hip: hip)
        kv = Cache(dtype, device)
        got = _utils.fp8_bits(kv)
        assert (got == ("bits", torch.uint8)) if bits else got is kv, (cap, hip, device, dtype)


def test_sparse_and_scheduled_read_the_bits_as_e4m3(device, monkeypatch):
    """The launches test_decode_parity's e4m3_path does not reach, sparse lists and the scheduled grid, give the very
    same outputs from the cache's bits as from its e4m3 view, with every finite e4m3 byte in the latent."""
    a = decode_inputs([300, 2, 77], 1, 4, 16, (256, 32), torch.bfloat16, device, seed=5)
    finite = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
    n = a["kv_cache"].numel()
    a["kv_cache"].view(torch.uint8).copy_(finite.repeat(n // len(finite) + 1)[:n].view_as(a["kv_cache"]).to(device))
    a["kv_scale"].fill_(2.0 ** -4)
    indices = torch.randint(0, 300, (3, 1, 24), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    indices = torch.minimum(indices, (a["cache_seqlens"] - 1).clamp(min=0)[:, None, None]).to(device)
    meta = mla_kernels.mla_decode_metadata(a["cache_seqlens"], 4, kv_lora_rank=256, num_programs=5,
                                           cache_dtype=FP8)
    calls = dict(sparse=lambda: mla_kernels.mla_decode(**a, indices=indices, return_lse=True),
                 scheduled=lambda: mla_kernels.mla_decode(**a, metadata=meta, return_lse=True))
    native = {name: call() for name, call in calls.items()}
    asked = []
    monkeypatch.setattr(_utils, "fp8_bits", lambda kv: asked.append(kv.dtype) or _utils.fp8_as_bits(kv))
    for name, call in calls.items():
        out, lse = call()
        assert torch.equal(out, native[name][0]) and torch.equal(lse, native[name][1]), name
    assert asked == [FP8, FP8]


def test_decode_fp16_forced_splits_and_w_uv(device, poisoned_empty):
    """fp16 queries over an fp8 latent with an fp16 rope key; 3 forced splits (one empty); the value projection."""
    heads, d_v = 4, 64
    a = decode_inputs([300, 2, 0, 77], 2, heads, 16, (256, 32), torch.float16, device, seed=3)
    w_uv = (torch.randn(heads, d_v, 256) / 16).to(dtype=torch.float16, device=device)
    out = mla_kernels.mla_decode(**a, num_splits=3, w_uv=w_uv)
    d = dequantized(a)
    ref_out, _ = reference.absorbed_decode(*(d[k] for k in ("q_nope", "q_pe", "kv_cache", "pe_cache", "block_table",
                                                            "cache_seqlens")), SCALE, w_uv=w_uv)
    assert out.shape == (4, 2, heads, d_v)
    assert_close("fp16 splits w_uv", out, ref_out, torch.float16, FP8_RMS_TOL[torch.float16],
                 FP8_COS_TOL[torch.float16])


def test_decode_scheduled_and_compiled(device, poisoned_empty):
    """An fp8 cache on the scheduled grid (``metadata``: a long sequence cut across programs, a padding slot) and
    through the ``mla_decode`` custom op under torch.compile give the split grid's result: the same kernel body
    reads the same tiles, only the order of the partial merges differs (fp32 accumulators; bf16 output)."""
    a = decode_inputs([300, 2, 0, 77], 1, 4, 16, (256, 32), torch.bfloat16, device, seed=5)
    expected = mla_kernels.mla_decode(**a)
    meta = mla_kernels.mla_decode_metadata(a["cache_seqlens"], 4, kv_lora_rank=256, num_programs=5)
    assert int(meta.sequences[:, 1].max()) > 1  # the long sequence is cut
    got = mla_kernels.mla_decode(**a, metadata=meta)
    torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=2 ** -7)  # bf16 rounding of |out| < 2
    compiled = torch.compile(lambda kw: mla_kernels.mla_decode(**kw), backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(a), expected)


def test_padding_slot_reads_nothing(device):
    a = decode_inputs([0, 5], 1, 4, 16, (128, 16), torch.bfloat16, device)
    a["block_table"][0] = SENTINEL_BLOCK
    out, lse = mla_kernels.mla_decode(**a, return_lse=True)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.all(lse[0] == float("-inf"))
    assert torch.isfinite(out[1]).all()


# (new tokens, history, heads, page)
PREFILL_CASES = {
    "ragged-empty-h5-page1": ([0, 17, 1, 0, 33], [5, 0, 40, 0, 3], 5, 1),
    "history-h2-page64": ([3, 1, 0, 70], [400, 210, 50, 0], 2, 64),
}


def prefill_inputs(new, history, heads, page, device, d_nope=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = [n + h for n, h in zip(new, history)]
    kv, scale, pe, table = fp8_paged_cache(lens, page, (512, 64), torch.bfloat16, device, seed)
    width = 512 if d_nope is None else d_nope
    q = torch.randn(sum(new), heads, width + 64, generator=g).to(dtype=torch.bfloat16, device=device)
    cu = torch.tensor([0] + [sum(new[:i + 1]) for i in range(len(new))], dtype=torch.int32, device=device)
    a = dict(q_nope=q[..., :width], q_pe=q[..., width:], kv_cache=kv, pe_cache=pe, block_table=table,
             cu_seqlens_q=cu, cache_seqlens=torch.tensor(lens, dtype=torch.int32, device=device), kv_scale=scale)
    if d_nope is not None:
        a["w_kv_b"] = (torch.randn(heads * (d_nope + 128), 512, generator=g) / math.sqrt(512)).to(
            dtype=torch.bfloat16, device=device)
    return a


@pytest.mark.parametrize("case", list(PREFILL_CASES), ids=list(PREFILL_CASES))
def test_prefill_parity(case, device, poisoned_empty, e4m3_path):
    a = prefill_inputs(*PREFILL_CASES[case], device)
    out, lse = mla_kernels.mla_prefill(**a, softmax_scale=SCALE, return_lse=True)
    d = dequantized(a)
    ref_out, ref_lse = reference.absorbed_prefill(*(d[k] for k in ("q_nope", "q_pe", "kv_cache", "pe_cache",
                                                                   "block_table", "cu_seqlens_q", "cache_seqlens")),
                                                  SCALE)
    assert_close(case, out, ref_out, torch.bfloat16, FP8_RMS_TOL[torch.bfloat16], FP8_COS_TOL[torch.bfloat16])
    assert_lse_close(case, lse, ref_lse, FP8_LSE_ATOL[torch.bfloat16])


def naive_on_dequantized(a):
    """reference.naive_mla per sequence over the exactly dequantized latent, float64."""
    d = dequantized(a)
    heads = a["q_nope"].shape[1]
    d_v = a["w_kv_b"].shape[0] // heads - a["q_nope"].shape[2]
    out = torch.zeros(a["q_nope"].shape[0], heads, d_v, dtype=torch.float64)
    for b in range(len(a["cache_seqlens"])):
        start, end, length = int(a["cu_seqlens_q"][b]), int(a["cu_seqlens_q"][b + 1]), int(a["cache_seqlens"][b])
        if end > start:
            kv_c = reference.gather_paged(d["kv_cache"].cpu(), a["block_table"][b].cpu(), length)
            k_pe = reference.gather_paged(a["pe_cache"].cpu(), a["block_table"][b].cpu(), length).double()
            out[start:end] = reference.naive_mla(a["q_nope"][start:end].cpu().double(),
                                                 a["q_pe"][start:end].cpu().double(), kv_c, k_pe,
                                                 a["w_kv_b"].cpu().double(), SCALE)[0]
    return out


@pytest.mark.parametrize("path", ["absorbed", "expanded"])
def test_prefill_attention_both_paths(path, device, poisoned_empty, e4m3_path):
    """The absorbed path dequantizes in the kernel; the expanded path in PyTorch, to bf16, before its GEMM (the
    expansion's bf16 K and V are the extra rounding there)."""
    a = prefill_inputs([9, 0, 40], [30, 8, 0], 3, 16, device, d_nope=128, seed=4)
    out = mla_kernels.mla_prefill_attention(**a, softmax_scale=SCALE, path=path)
    assert_close(path, out, naive_on_dequantized(a), torch.bfloat16, FP8_RMS_TOL[torch.bfloat16],
                 FP8_COS_TOL[torch.bfloat16])


def test_torch_path_matches_the_reference(monkeypatch):
    """CPU tensors without the interpreter: write_cache, decode and prefill in PyTorch, the same contract."""
    monkeypatch.setattr(_utils, "interpreting", lambda: False)
    a = decode_inputs([70, 0, 5], 2, 16, 16, (512, 64), torch.bfloat16, "cpu")
    assert not _utils.use_triton(a["q_nope"])
    out = mla_kernels.mla_decode(**a)
    d = dequantized(a)
    ref, _ = reference.absorbed_decode(*(d[k] for k in ("q_nope", "q_pe", "kv_cache", "pe_cache", "block_table",
                                                        "cache_seqlens")), SCALE)
    # the PyTorch path dequantizes to fp32 and computes in fp32: only the output's bf16 rounding is left
    assert_close("torch decode", out, ref, torch.bfloat16)
    p = prefill_inputs([0, 17, 1], [5, 0, 40], 3, 16, "cpu", d_nope=128)
    for path in ("absorbed", "expanded"):
        got = mla_kernels.mla_prefill_attention(**p, softmax_scale=SCALE, path=path)
        assert_close(f"torch {path}", got, naive_on_dequantized(p), torch.bfloat16, FP8_RMS_TOL[torch.bfloat16],
                     FP8_COS_TOL[torch.bfloat16])
    kv, scale, pe = fp8_latent_cache(2, 4, 128, 16)
    kv_c, k_pe = torch.randn(3, 128).bfloat16(), torch.randn(3, 16).bfloat16()
    write_cache(kv_c, k_pe, kv, pe, torch.tensor([5, -1, 0]), kv_scale=scale)
    q, s = reference.quantize_fp8(kv_c)
    assert torch.equal(kv[1, 1].view(torch.uint8), q[0].view(torch.uint8)) and torch.equal(scale[0, 0], s[2])


def test_decode_error_against_the_bf16_cache_on_random_data(device):
    """Quality of the FP8 cache itself: the decode output over the fp8 cache against the same call over the bf16
    cache it was quantized from (seed 003's 16 heads, unit-variance queries and latent, DeepSeek's softmax scale).

    Expected from the numerics: the latent carries ~2.4% relative RMS error (test above). As the value, it moves the
    output by that fraction; as the key, it moves each score by 2.4% of the nope scores' spread, here
    sqrt(512) * SCALE = 1.63, i.e. ~0.04 nats, which moves the output by ~4%; together sqrt(2.4^2 + 4^2) ~ 4.6%.
    Measured (interpreter, this case): 4.0e-2. Asserted: below 5e-2 and above 2e-2 (the value error alone); an
    e5m2-like 2-bit mantissa would double it, a wrong or missing scale would be off by 100%.
    The issue's target of 2e-2 is below this format's floor on such data: bench/fp8_quality.py measures it per
    score spread and over a model."""
    lens = [600, 257, 1000, 64]
    kv, pe, table = make_paged_cache(lens, 64, (512, 64), torch.bfloat16, device, generator_seed=5)
    kv8, scale, pe8 = fp8_latent_cache(kv.shape[0], 64, device=device)
    q8, s8 = reference.quantize_fp8(kv)
    kv8.copy_(q8), scale.copy_(s8), pe8.copy_(pe)
    q = torch.randn(4, 1, 16, 576, generator=torch.Generator().manual_seed(5)).to(dtype=torch.bfloat16, device=device)
    args = (q[..., :512], q[..., 512:])
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    bf16 = mla_kernels.mla_decode(*args, kv, pe, table, seqlens, SCALE)
    fp8 = mla_kernels.mla_decode(*args, kv8, pe8, table, seqlens, SCALE, kv_scale=scale)
    rel = err_ratio(fp8, bf16)
    assert 2e-2 < rel < 5e-2, rel


# ------------------------------------------------------------------------------------------------
# bad input: a clear error naming the argument, and nothing written
# ------------------------------------------------------------------------------------------------


def _good_decode():
    return decode_inputs([9, 4], 1, 4, 8, (256, 16), torch.bfloat16, "cpu")  # two scales per token


def _bf16_cache(a):
    a.update(kv_cache=torch.zeros(a["kv_cache"].shape, dtype=torch.bfloat16))


BAD_DECODE = {
    "kv_scale-missing": (lambda a: a.update(kv_scale=None), ValueError, "kv_scale"),
    "kv_scale-with-bf16-cache": (_bf16_cache, ValueError, "kv_scale"),
    "kv_scale-float16": (lambda a: a.update(kv_scale=a["kv_scale"].half()), TypeError, "kv_scale"),
    "kv_scale-shape": (lambda a: a.update(kv_scale=torch.zeros(*a["kv_scale"].shape[:2], 1)), ValueError, "kv_scale"),
    "kv_scale-rank": (lambda a: a.update(kv_scale=a["kv_scale"][0]), ValueError, "kv_scale"),
    "kv_scale-pages": (lambda a: a.update(kv_scale=a["kv_scale"][1:]), ValueError, "kv_scale"),
    "kv_scale-strided": (lambda a: a.update(kv_scale=torch.zeros(*a["kv_scale"].shape[:2], 4)[..., ::2]), ValueError,
                         "kv_scale"),
    "kv_scale-other-device": (lambda a: a.update(kv_scale=a["kv_scale"].to("meta")), ValueError, "kv_scale"),
    "q_nope-fp8": (lambda a: a.update(q_nope=a["q_nope"].to(FP8)), ValueError, "q_nope"),  # also a TypeError
    "q-fp16-vs-bf16-rope": (lambda a: a.update(q_nope=a["q_nope"].half(), q_pe=a["q_pe"].half()), TypeError,
                            "q_nope"),
    "kv_cache-e5m2": (lambda a: a.update(kv_cache=a["kv_cache"].view(torch.float8_e5m2)), TypeError, "kv_cache"),
    # R 64 with scales of R // 128 = 0 groups agrees with the scales' shape check: R itself must be refused
    "kv_cache-R-64-with-no-scale-groups": (lambda a: a.update(kv_cache=a["kv_cache"][..., :64],
                                                              q_nope=a["q_nope"][..., :64],
                                                              kv_scale=a["kv_scale"][..., :0]),
                                           ValueError, "R a multiple of 128"),
    "kv_cache-R-not-multiple-of-128": (lambda a: a.update(kv_cache=a["kv_cache"][..., :64],
                                                          q_nope=a["q_nope"][..., :64]), ValueError, "kv_cache"),
}


def test_an_fp8_query_is_both_a_value_and_a_type_error():
    """The FP8 issue's contract says ValueError for an fp8 query; a wrong dtype is a TypeError elsewhere."""
    a = _good_decode()
    a["q_pe"] = a["q_pe"].to(FP8)
    for exc in (ValueError, TypeError):
        with pytest.raises(exc, match="q_pe"):
            mla_kernels.mla_decode(**a)


@pytest.mark.parametrize("case", list(BAD_DECODE), ids=list(BAD_DECODE))
def test_bad_input_decode(case):
    assert_rejects(mla_kernels.mla_decode, _good_decode(), *BAD_DECODE[case])


def _good_prefill(d_nope=None):
    a = prefill_inputs([2, 3], [4, 0], 2, 8, "cpu", d_nope=d_nope)
    return dict(a, softmax_scale=SCALE)


BAD_PREFILL = {
    "kv_scale-missing": (lambda a: a.update(kv_scale=None), ValueError, "kv_scale"),
    "kv_scale-with-bf16-cache": (_bf16_cache, ValueError, "kv_scale"),
    "kv_scale-shape": (lambda a: a.update(kv_scale=a["kv_scale"][..., :2]), ValueError, "kv_scale"),
    "q_nope-fp8": (lambda a: a.update(q_nope=a["q_nope"].to(FP8)), ValueError, "q_nope"),
}


@pytest.mark.parametrize("fn", ["mla_prefill", "mla_prefill_attention"])
@pytest.mark.parametrize("case", list(BAD_PREFILL), ids=list(BAD_PREFILL))
def test_bad_input_prefill(case, fn):
    args = _good_prefill(None if fn == "mla_prefill" else 128)
    assert_rejects(getattr(mla_kernels, fn), args, *BAD_PREFILL[case])


def test_good_inputs_of_the_bad_input_tables_run():
    assert torch.isfinite(mla_kernels.mla_decode(**_good_decode())).all()
    assert torch.isfinite(mla_kernels.mla_prefill(**_good_prefill())).all()
    assert torch.isfinite(mla_kernels.mla_prefill_attention(**_good_prefill(128))).all()
    write_cache(**_good_write())


def _good_write():
    kv, scale, pe = fp8_latent_cache(3, 4, 128, 16)
    storage_bytes(kv).fill_(0xFF)
    return dict(kv_c=torch.randn(3, 128).bfloat16(), k_pe=torch.randn(3, 16).bfloat16(), kv_cache=kv, pe_cache=pe,
                slot_mapping=torch.tensor([0, 5, -1]), kv_scale=scale)


BAD_WRITE = {
    "kv_scale-missing": (lambda a: a.update(kv_scale=None), ValueError, "kv_scale"),
    "kv_scale-shape": (lambda a: a.update(kv_scale=a["kv_scale"][:2]), ValueError, "kv_scale"),
    "kv_scale-float64": (lambda a: a.update(kv_scale=a["kv_scale"].double()), TypeError, "kv_scale"),
    "kv_c-fp16-vs-bf16-rope": (lambda a: a.update(kv_c=a["kv_c"].half()), TypeError, "kv_c"),
    "kv_c-fp8": (lambda a: a.update(kv_c=a["kv_c"].to(FP8)), TypeError, "kv_c"),
    # named as kv_c, not as the fp8 cache ("kv_c" alone also matches "kv_cache")
    "kv_c-fp8-named": (lambda a: a.update(kv_c=a["kv_c"].to(FP8)), TypeError, "kv_c is float8_e4m3fn, but only kv_cache"),
    "kv_cache-R-64-with-no-scale-groups": (lambda a: a.update(kv_cache=a["kv_cache"][..., :64], kv_c=a["kv_c"][:, :64],
                                                              kv_scale=a["kv_scale"][..., :0]),
                                           ValueError, "R a multiple of 128"),
    "k_pe-fp32": (lambda a: a.update(k_pe=a["k_pe"].float()), TypeError, "k_pe"),
    "slot-past-the-cache": (lambda a: a.update(slot_mapping=torch.tensor([0, 12, 1])), ValueError, "slot_mapping"),
}


@pytest.mark.parametrize("case", list(BAD_WRITE), ids=list(BAD_WRITE))
def test_bad_write_raises_and_leaves_the_cache_unchanged(case):
    args = _good_write()
    buf = storage_bytes(args["kv_cache"])  # all three views: latent, scales, rope key
    before = buf.clone()
    assert_rejects(write_cache, args, *BAD_WRITE[case])
    assert torch.equal(buf, before)


@pytest.mark.parametrize("kwargs,error,name", [
    (dict(num_blocks=0), ValueError, "num_blocks"),
    (dict(block_size=0), ValueError, "block_size"),
    (dict(num_blocks=-1), ValueError, "num_blocks"),
    (dict(num_blocks=2.0), TypeError, "num_blocks"),
    (dict(block_size=True), TypeError, "block_size"),
    (dict(kv_lora_rank=128.0), TypeError, "kv_lora_rank"),
    (dict(device="gpu0"), ValueError, "device"),
], ids=["no-blocks", "empty-pages", "negative", "float", "bool", "float-rank", "device-name"])
def test_fp8_latent_cache_checks_its_sizes(kwargs, error, name):
    """An empty cache is refused where it is made (write_cache would refuse it later), as PagedLatentCache does."""
    args = dict(num_blocks=2, block_size=4, kv_lora_rank=128, rope_dim=16)
    with pytest.raises(error, match=name):
        fp8_latent_cache(**{**args, **kwargs})


@pytest.mark.parametrize("args,error,name", [
    ((100, 64), ValueError, "kv_lora_rank"), ((64, 64), ValueError, "kv_lora_rank"),
    ((-128, 64), ValueError, "kv_lora_rank"), ((512, 8), ValueError, "rope_dim"),
    ((512.0, 64), TypeError, "kv_lora_rank"), ((512, "64"), TypeError, "rope_dim"),
    ((512, 64, torch.float64), TypeError, "rope_dtype"), ((512, 64, FP8), TypeError, "rope_dtype")])
def test_fp8_row_bytes_refuses_what_the_layout_refuses(args, error, name):
    """The public byte count checks its widths and dtype as fp8_latent_cache does (it returned 228 for R 100,
    -4 for R -128, 656.0 for R 512.0); fp32 rope values take 4 bytes each."""
    with pytest.raises(error, match=name):
        fp8_row_bytes(*args)
    with pytest.raises(error, match=name):
        fp8_latent_cache(1, 1, *args)
    assert fp8_row_bytes(512, 64, torch.float32) == 512 + 16 + 256 and fp8_row_bytes(128, 16, torch.float16) == 164


def test_cache_manager_rejects_bad_fp8_settings():
    with pytest.raises(ValueError, match="kv_lora_rank"):
        PagedLatentCache(1, 2, 4, kv_lora_rank=64, rope_dim=16, dtype=FP8)
    with pytest.raises(ValueError, match="rope_dtype"):
        PagedLatentCache(1, 2, 4, dtype=torch.bfloat16, rope_dtype=torch.float16)
    with pytest.raises(TypeError, match="rope_dtype"):
        PagedLatentCache(1, 2, 4, dtype=FP8, rope_dtype=FP8)
    with pytest.raises(TypeError, match="dtype"):
        PagedLatentCache(1, 2, 4, dtype=torch.float8_e5m2)


# ------------------------------------------------------------------------------------------------
# patch_model with an fp8 cache
# ------------------------------------------------------------------------------------------------


def test_patched_model_equals_eager_attention_over_the_quantized_latent(monkeypatch):
    """fp32 tiny DeepSeek-V3 (R 128, so one scale per token): greedy generation with cache_dtype=float8_e4m3fn (4-token
    pages and no headroom, so the latent cache grows, copying fp8 rows, while generating) gives
    the same tokens and logits as transformers' eager model whose kv_a_layernorm output (the latent) is replaced by
    its reference quantize/dequantize round trip. So the patched path stores exactly the reference's fp8 latent and
    attends over it; everything else is fp32 (logits agree to fp32 summation-order noise, ~1e-6 relative)."""
    pytest.importorskip("transformers")
    from mla_kernels.integrations.transformers import latent_cache, patch_model
    from test_transformers import GREEDY, left_padded, tiny_model

    model = tiny_model(kv_lora_rank=128)
    ids, mask = left_padded([5, 9, 2])

    def round_trip(module, inputs, output):
        return reference.dequantize_fp8(*reference.quantize_fp8(output), output.dtype)

    hooks = [layer.self_attn.kv_a_layernorm.register_forward_hook(round_trip) for layer in model.model.layers]
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, output_logits=True, return_dict_in_generate=True,
                                  **GREEDY)
    for h in hooks:
        h.remove()
    with pytest.raises(ValueError, match="cache_dtype"):
        patch_model(model, cache_dtype=torch.float16)
    from mla_kernels.integrations import transformers as integration

    monkeypatch.setattr(integration, "INITIAL_HEADROOM_TOKENS", 0)  # the cache grows: fp8 rows are copied as bytes
    patch_model(model, block_size=4, cache_dtype=FP8)
    with torch.no_grad():
        got = model.generate(input_ids=ids, attention_mask=mask, output_logits=True, return_dict_in_generate=True,
                             **GREEDY)
    cache = latent_cache(got.past_key_values)
    assert cache.dtype == FP8 and cache.rope_dtype == torch.float32
    assert cache.bytes_per_token == 2 * (128 + 4 + 16 * 4) and cache.num_blocks > 3
    assert torch.equal(got.sequences, expected.sequences)
    rel = err_ratio(torch.stack(got.logits), torch.stack(expected.logits))
    assert rel < 1e-5, rel


def test_patch_model_rejects_fp8_with_a_latent_not_multiple_of_128():
    pytest.importorskip("transformers")
    from mla_kernels.integrations.transformers import patch_model
    from test_transformers import tiny_model

    model = tiny_model()  # kv_lora_rank 32
    with pytest.raises(ValueError, match="kv_lora_rank"):
        patch_model(model, cache_dtype=FP8)
    assert not any(type(layer.self_attn).__name__ == "TransformersMLAttention" for layer in model.model.layers)


def test_static_cache_with_fp8_matches_the_dynamic_one():
    """``static_latent_cache`` of a model patched with an fp8 cache stores the same quantized latent (its scales
    included) and generates the dynamic fp8 cache's tokens and logits."""
    pytest.importorskip("transformers")
    from mla_kernels.integrations.transformers import patch_model, static_latent_cache
    from test_transformers import GREEDY, left_padded, tiny_model

    model = tiny_model(kv_lora_rank=128)
    ids, mask = left_padded([5, 9, 2])
    patch_model(model, block_size=4, cache_dtype=FP8)
    with torch.no_grad():
        dynamic = model.generate(input_ids=ids, attention_mask=mask, output_logits=True, return_dict_in_generate=True,
                                 **GREEDY)
        cache = static_latent_cache(model, 3, 32, block_size=4)
        static = model.generate(input_ids=ids, attention_mask=mask, output_logits=True, return_dict_in_generate=True,
                                past_key_values=cache, **GREEDY)
    assert cache._mla_static_state.paged.dtype == FP8
    assert torch.equal(static.sequences, dynamic.sequences)
    assert err_ratio(torch.stack(static.logits), torch.stack(dynamic.logits)) < 1e-5
