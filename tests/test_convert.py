"""``mla_kernels._convert.to_dtype``: every kernel's float32 -> output dtype conversion rounds to nearest even, as
torch and every GPU do, also under Triton's CPU interpreter (whose own bf16 cast truncates); ``to_float32``: the
bfloat16 -> float32 conversion is exact there too (the interpreter's cast gets subnormals wrong)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from mla_kernels._convert import to_dtype, to_float32


@triton.jit
def _convert_kernel(X, OUT, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(OUT + offs, to_dtype(tl.load(X + offs, mask=mask), OUT.dtype.element_ty), mask=mask)


@triton.jit
def _widen_kernel(X, OUT, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(OUT + offs, to_float32(tl.load(X + offs, mask=mask)), mask=mask)


def _values() -> torch.Tensor:
    """Random magnitudes over float32's range, and the cases a rounding gets wrong: ties to even both ways (1 +
    2^-8 rounds down to 1, 1 + 3 * 2^-8 up to 1 + 2^-6), a carry out of an all-ones mantissa into the exponent (odd
    and even exponents), the largest bf16 value and the overflow to inf past it, subnormals, signed zeros,
    infinities and NaN."""
    g = torch.Generator().manual_seed(0)
    rand = torch.randn(4096, generator=g) * torch.exp2(torch.randint(-140, 120, (4096,), generator=g).float())
    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3FFFFFFF, 0x407FFFFF, 0x3F7FFF80, 0x7F7F7FFF, 0x7F7F8000,
                         0x7F7FFFFF, 0x00000001, 0x00008000, 0x00018000, 0x807FFFFF, 0x80000000, 0x00000000,
                         0x7F800000, 0xFF800000, 0x7FC00000, 0xBF808001], dtype=torch.int64)
    special = torch.from_numpy(bits.numpy().astype("uint32").view("float32"))
    return torch.cat([rand, special, -special])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_to_dtype_rounds_as_torch(dtype, device):
    """The same bits as torch's conversion for every value (NaN where torch gives NaN)."""
    x = _values().to(device)
    out = torch.empty(x.shape, dtype=dtype, device=device)
    _convert_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    expected = x.to(dtype)
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(out), nan)
    differ = (out.view(torch.int16 if dtype != torch.float32 else torch.int32)
              != expected.view(torch.int16 if dtype != torch.float32 else torch.int32)) & ~nan
    assert not differ.any(), f"{int(differ.sum())} values differ, first: {x[differ][:4].tolist()}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_to_float32_is_exact(dtype, device):
    """Every value of ``dtype`` (``_values`` converted: bf16 subnormals, which the interpreter's cast turned
    -7.16e-39 into -2.57e-39 and 1e-40 into 0, signed zeros, infinities, NaN) widened to the same float32 as torch's
    conversion, bit for bit (NaN as NaN)."""
    x = _values().to(dtype)
    if dtype == torch.bfloat16:  # every bf16 subnormal's magnitude too, both signs
        every = torch.arange(1, 0x80, dtype=torch.int16).view(torch.bfloat16)
        x = torch.cat([x, every, -every])
    x = x.to(device)
    out = torch.empty(x.shape, dtype=torch.float32, device=device)
    _widen_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    expected = x.float()
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(out), nan)
    differ = (out.view(torch.int32) != expected.view(torch.int32)) & ~nan
    assert not differ.any(), f"{int(differ.sum())} values differ, first: {x[differ][:4].tolist()}"
