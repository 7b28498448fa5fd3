"""``to_dtype``: the kernels' float32 -> output dtype conversion, rounded to nearest even everywhere; ``to_float32``:
bfloat16 -> float32, exact everywhere.

Every GPU Triton targets converts float32 to bfloat16 by rounding to nearest even (NVIDIA's ``cvt.rn.bf16.f32``,
AMD's equivalent), and so does torch. Triton's CPU interpreter truncates instead (it shifts the bits off; its
float16 conversion rounds, through numpy). A truncation is not noise but a bias toward zero, up to one bf16 ulp
(2^-8 relative) on every value: a kernel run through the interpreter then misses bounds a GPU meets (FlashMLA's
tests hold decode outputs to a cosine difference under 1e-5: 1.2-1.6e-5 truncated, 2e-6 rounded), and its results
differ from torch's and the GPU's in the last bit of about half the values. Where the interpreter runs the kernels
(``_utils`` saw ``TRITON_INTERPRET`` at import), ``to_dtype`` makes the bfloat16 bits itself with integer ops;
compiled for a GPU that branch is not there (the GPU's own conversion rounds).

The other way, bfloat16 -> float32 is exact on a GPU and in torch (the bits shifted up 16), but the interpreter
gets bfloat16 subnormals (below 1.2e-38) wrong: -7.16e-39 became -2.57e-39, 1e-40 became 0. Harmless inside a dot,
but an elementwise kernel can scale such a value into range (the norm divides by a tiny RMS; an FP8 write's scale
is the group's absolute maximum / 448), so ``to_float32`` shifts the bits itself where the interpreter runs.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import _utils

__all__ = ["to_dtype", "to_float32"]

EMULATE_ROUNDING = tl.constexpr(_utils._INTERPRET_AT_IMPORT)


@triton.jit
def _round_bf16(x):
    """float32 ``x`` rounded to the nearest bfloat16 value, ties to even, as torch's and a GPU's conversion round:
    add half an ulp less one plus the kept part's lowest bit, keep the upper 16 bits (a carry into the exponent is
    the rounding up to the next binade, or to inf past bfloat16's largest value), NaN as torch's 0x7FC0. The bits
    are reinterpreted, never cast: the interpreter's cast also mishandles subnormals, even exact ones."""
    bits = x.to(tl.uint32, bitcast=True)
    kept = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    kept = tl.where(x != x, 0x7FC0, kept)
    return kept.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def to_dtype(x, dtype: tl.constexpr):
    """``x.to(dtype)``, rounded to nearest even where the interpreter would truncate (module docstring)."""
    if EMULATE_ROUNDING and x.dtype == tl.float32 and dtype == tl.bfloat16:  # (decided at compile time)
        out = _round_bf16(x)
    else:
        out = x.to(dtype)
    return out


@triton.jit
def to_float32(x):
    """``x.to(tl.float32)``, exact for bfloat16 subnormals where the interpreter's cast is not (module docstring)."""
    if EMULATE_ROUNDING and x.dtype == tl.bfloat16:  # (decided at compile time)
        out = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        out = x.to(tl.float32)
    return out
