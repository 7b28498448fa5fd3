"""FP8 (e4m3) quantization of the latent, as DeepSeek's FP8 MLA cache stores it.

Per token, the R-wide latent is cut into groups of 128 values; each group is stored as 128
``float8_e4m3fn`` values and one float32 scale, ``scale = amax / 448`` (448 is e4m3's largest
finite value), so the group's largest value maps to +-448. Values are rounded to the nearest
e4m3 value, ties to even. The rope key is not quantized.

Error of one value (x in a group with scale s, q = x / s): e4m3 keeps 3 mantissa bits, so for
|q| >= 2^-6 (a normal number) round to nearest is off by at most half a unit in the last place,
|q - fp8(q)| <= 2^-4 |q|; below 2^-6 (subnormals, spacing 2^-9) by at most 2^-10. Dequantized:
|x - s fp8(q)| <= max(2^-4 |x|, 2^-10 s), plus fp32 rounding of the division and product
(2^-24 relative each).
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
GROUP_SIZE = 128


def quantize_fp8(x: torch.Tensor, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., R]`` (any float dtype) -> ``(q [..., R] float8_e4m3fn, scale [..., R / group_size] float32)``.

    ``scale = amax / 448`` per group of ``group_size`` consecutive values (0 for an all-zero group, whose values
    stay 0); ``q = round_to_nearest_even(x / scale)``, computed in float32. NaN in a group gives NaN scale and
    NaN values.
    """
    _check_group("x", x, group_size)
    groups = x.float().unflatten(-1, (-1, group_size))  # [..., G, group_size]
    scale = groups.abs().amax(-1) / FP8_MAX  # [..., G]
    q = groups / torch.where(scale > 0, scale, 1.0)[..., None]
    q = q.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.flatten(-2), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
                   group_size: int = GROUP_SIZE) -> torch.Tensor:
    """``q [..., R]`` float8_e4m3fn and ``scale [..., R / group_size]`` -> ``[..., R]`` in ``dtype``
    (the product is formed in float32, or float64 when ``dtype`` is float64). Any other ``q`` is refused: the cache's
    bytes as uint8 (``PagedLatentCache.buffer``, FlashMLA's rows) were read as the integers 0-255."""
    if q.dtype != FP8_DTYPE:
        raise TypeError(f"q must be {str(FP8_DTYPE).replace('torch.', '')} (e4m3 values), got "
                        f"{str(q.dtype).replace('torch.', '')}"
                        + (": view a cache's bytes as e4m3 first, q.view(torch.float8_e4m3fn)" if q.dtype == torch.uint8
                           else ""))
    _check_group("q", q, group_size)
    if tuple(scale.shape) != (*q.shape[:-1], q.shape[-1] // group_size):
        raise ValueError(f"scale must have shape {(*q.shape[:-1], q.shape[-1] // group_size)} (one per "
                         f"{group_size} values of q {tuple(q.shape)}), got {tuple(scale.shape)}")
    work = torch.float64 if dtype == torch.float64 else torch.float32
    groups = q.to(work).unflatten(-1, (-1, group_size)) * scale.to(work)[..., None]
    return groups.flatten(-2).to(dtype)


def _check_group(name: str, x: torch.Tensor, group_size: int) -> None:
    """``group_size`` a positive int dividing ``x``'s last dimension (``x`` at least 1-D)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if x.dim() == 0 or x.shape[-1] % group_size:
        raise ValueError(f"{name}'s last dimension must be a multiple of group_size={group_size}, got shape "
                         f"{tuple(x.shape)}")
