"""Rotary position embedding of the query's and the key's rope parts, one launch per tensor.

``apply_rope`` is the PyTorch form (and the reference): seven to nine elementwise ops per tensor, so fourteen
or more launches per attention layer and decode step for ``q_pe`` and ``k_pe`` in an eager model, each a few
microseconds of host work, where the whole ``mla_decode`` call is one or two. ``rope`` rotates a tensor in one
Triton launch (each program: a block of (token, head) rows, each with its token's cos/sin row), computed in
float32 and rounded once to ``x``'s dtype, which is what ``apply_rope`` gives under autocast (float32 tables). In
bf16, where each of ``apply_rope``'s ops rounds, the kernel is the closer of the two to the exact rotation: measured on
the CPU ("half", random values and angles), within half a bf16 unit of the float64 result where ``apply_rope`` was up
to 804 units off where its two products cancel, and about 5% of values differed by more than one unit. Compiled code
(``torch.compile``) takes ``apply_rope``, which inductor fuses into one kernel itself. ``MLAttention`` turns both
tensors with the latent's norm in one launch (``norm_rope.norm_and_rope``, whose programs run ``_rope_rows`` as
``_rope_kernel`` does).

Layouts (``style``): "half" rotates ``(x[i], x[i + P/2])`` and writes them back in place (``rotate_half``);
"interleave" reads ``(x[2i], x[2i + 1])`` and writes them de-interleaved to ``i`` and ``i + P/2`` (DeepSeek-V3's
``rope_interleave``); "pairs" reads and writes ``(x[2i], x[2i + 1])`` (DeepSeek-V2's complex rotation). The tables
are transformers' ``cat(f, f)`` layout: "interleave" and "pairs" read their first half, "half" both halves.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launcher, _utils
from ._convert import to_dtype, to_float32

ROPE_STYLES = ("interleave", "half", "pairs", "none")  # "none": no rope (Kimi-Linear's MLA: NoPE)
_STYLE_IDS = {"half": 0, "interleave": 1, "pairs": 2}
MAX_WIDTH = 16384  # the widest rope part the kernel rotates (one row's halves in registers; DeepSeek's is 64)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """Rotate ``x [..., P]`` by ``cos``/``sin`` broadcastable to ``[..., P]`` in transformers' ``cat(f, f)``
    layout, with PyTorch ops (``rope``'s reference and its path where the kernel does not serve).

    ``style``: "interleave" (DeepSeek-V3 ``rope_interleave=True``: pairs ``(x0, x1), (x2, x3)...``, output
    de-interleaved, computed in x's dtype), "half" (``rotate_half``, V3 without interleave), "pairs"
    (DeepSeek-V2's complex rotation: pairs in, pairs out, computed in fp32), "none" (``x`` as it is; cos/sin unused:
    Kimi-Linear's MLA has no positional encoding, its "rope" key part is a plain shared key).
    """
    if style == "none":
        return x
    if style not in _STYLE_IDS:  # (each branch below took any other string as "pairs")
        raise ValueError(f"style must be one of {ROPE_STYLES}, got {style!r}")
    if style == "half":
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]
    if style == "interleave":
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    xf = x.float()
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    cos, sin = cos.float(), sin.float()
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


@triton.jit
def _rope_rows(pid, X, OUT, COS, SIN, num_rows, num_heads, seq_len,
               stride_xb, stride_xs, stride_xh, stride_cb, stride_cs, stride_sb, stride_ss,
               HALF: tl.constexpr, BLOCK_R: tl.constexpr, STYLE: tl.constexpr):
    """Program ``pid``'s ``BLOCK_R`` rows of ``x [b, s, h, 2 * HALF]``, a row being one (token, head) pair (heads
    fastest, tokens ``b * seq_len + s``), each rotated by its token's ``cos``/``sin`` row into ``OUT``, contiguous
    ``[rows, 2 * HALF]`` (module docstring: STYLE 0 "half", 1 "interleave", 2 "pairs"). Rows rather than one token
    per program: a decode step's 128 heads are one program, a prompt's tokens a few (and the interpreter runs
    programs one by one). The body of ``_rope_kernel`` and of the ropes of ``norm_rope._norm_rope_kernel``."""
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = (rows < num_rows)[:, None]
    token = rows // num_heads
    h = rows - token * num_heads
    b = token // seq_len
    s = token - b * seq_len
    offs_i = tl.arange(0, HALF)[None, :]
    cos_rows = (COS + b * stride_cb + s * stride_cs)[:, None]
    sin_rows = (SIN + b * stride_sb + s * stride_ss)[:, None]
    cos_lo = to_float32(tl.load(cos_rows + offs_i, mask=mask, other=0.0))  # [BLOCK_R, HALF]
    sin_lo = to_float32(tl.load(sin_rows + offs_i, mask=mask, other=0.0))
    if STYLE == 0:  # rotate_half reads both halves of the tables
        cos_hi = to_float32(tl.load(cos_rows + HALF + offs_i, mask=mask, other=0.0))
        sin_hi = to_float32(tl.load(sin_rows + HALF + offs_i, mask=mask, other=0.0))
    else:
        cos_hi = cos_lo
        sin_hi = sin_lo
    x_rows = (X + b * stride_xb + s * stride_xs + h * stride_xh)[:, None]
    if STYLE == 0:
        first, second = offs_i, HALF + offs_i
    else:
        first, second = 2 * offs_i, 2 * offs_i + 1
    x1 = to_float32(tl.load(x_rows + first, mask=mask, other=0.0))
    x2 = to_float32(tl.load(x_rows + second, mask=mask, other=0.0))
    out1 = x1 * cos_lo - x2 * sin_lo
    out2 = x2 * cos_hi + x1 * sin_hi
    out_rows = (OUT + rows * (2 * HALF))[:, None]
    if STYLE == 2:  # pairs stay pairs
        lo, hi = 2 * offs_i, 2 * offs_i + 1
    else:  # de-interleaved (or rotate_half's own layout)
        lo, hi = offs_i, HALF + offs_i
    tl.store(out_rows + lo, to_dtype(out1, OUT.dtype.element_ty), mask=mask)
    tl.store(out_rows + hi, to_dtype(out2, OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(X, OUT, COS, SIN, num_rows, num_heads, seq_len,
                 stride_xb, stride_xs, stride_xh, stride_cb, stride_cs, stride_sb, stride_ss,
                 HALF: tl.constexpr, BLOCK_R: tl.constexpr, STYLE: tl.constexpr):
    """``_rope_rows`` of each program's block of rows."""
    _rope_rows(tl.program_id(0), X, OUT, COS, SIN, num_rows, num_heads, seq_len, stride_xb, stride_xs, stride_xh,
               stride_cb, stride_cs, stride_sb, stride_ss, HALF, BLOCK_R, STYLE)


TILE_ELEMENTS = 4096  # (row, pair) elements per program: 128 rows of DeepSeek's 64-wide rope, a decode step's heads


def _lead_strides(t: torch.Tensor, skip: int, lead: tuple) -> tuple | None:
    """``t``'s strides over the two token dimensions ``lead`` (padded at the front to two), ``t``'s last ``skip``
    dimensions left out, 0 where ``t`` broadcasts along one; None where it does not broadcast to ``lead``."""
    shape, stride = t.shape[:t.dim() - skip], t.stride()[:t.dim() - skip]
    if len(shape) > len(lead):
        if any(n != 1 for n in shape[:len(shape) - len(lead)]):
            return None
        shape, stride = shape[len(shape) - len(lead):], stride[len(stride) - len(lead):]
    out = [0, 0]
    for i in range(1, len(shape) + 1):
        n, want = shape[-i], lead[-i]
        if n == want and n != 1:
            out[-i] = stride[-i]
        elif n != 1:
            return None
    return tuple(out)


_TOKENS: dict[tuple, tuple | None] = {}  # _as_tokens' answers by shapes and strides
_MAX_TOKENS_ENTRIES = 4096  # (a server sees a few layouts per batch size: cleared whole past this, never grown)


def _as_tokens(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """How ``_rope_kernel`` reads this call, from shapes and strides alone (no views made): ``(batch, seq, heads,
    x's strides over batch, seq and heads, cos's and sin's over batch and seq)``, or None where it cannot. Tables
    whose second last dimension is 1 make ``x``'s the heads (the query's ``[..., H, P]`` with ``cos.unsqueeze(-2)``);
    otherwise every row of ``x`` is its own token (the key's ``[..., P]``). At most two token dimensions. Looked up
    by the three tensors' shapes and strides: read from the tensors once per layout."""
    key = (x.shape, x.stride(), cos.shape, cos.stride(), sin.shape, sin.stride())
    tokens = _TOKENS.get(key, _TOKENS)  # (the dict itself: not read yet; None is an answer)
    if tokens is _TOKENS:
        if len(_TOKENS) >= _MAX_TOKENS_ENTRIES:
            _TOKENS.clear()
        tokens = _TOKENS[key] = _read_tokens(x, cos, sin)
    return tokens


def _read_tokens(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """``_as_tokens``' answer, read from the tensors."""
    width = x.shape[-1]
    if cos.dim() == 0 or sin.dim() == 0:  # a scalar table: apply_rope's "half" broadcasts it
        return None
    if cos.shape[-1] != width or sin.shape[-1] != width or x.stride(-1) != 1 or cos.stride(-1) != 1 \
            or sin.stride(-1) != 1:
        return None
    per_head = x.dim() >= 2 and cos.dim() >= 2 and sin.dim() >= 2 and cos.shape[-2] == sin.shape[-2] == 1
    skip = 2 if per_head else 1
    lead = tuple(x.shape[:x.dim() - skip])
    if len(lead) > 2:
        return None
    lead = (1,) * (2 - len(lead)) + lead
    cos_strides, sin_strides = _lead_strides(cos, skip, lead), _lead_strides(sin, skip, lead)
    if cos_strides is None or sin_strides is None:
        return None
    x_strides = _lead_strides(x, skip, lead)
    heads, head_stride = (x.shape[-2], x.stride(-2)) if per_head else (1, 0)
    return (*lead, heads, *x_strides, head_stride, *cos_strides, *sin_strides)


def _kernel_serves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> bool:
    """Whether ``rope`` may launch the kernel: a rope style, ``_utils.kernel_may_stand_in(x)`` (a plain tensor on a
    Triton device, not compiling, transforming or tracing the ops) of at least one dimension, plain tensors for tables
    (numbers and subclasses: ``apply_rope``), nothing autograd records, float dtypes in which ``apply_rope``'s result
    has ``x``'s dtype, tables on ``x``'s device, P / 2 a power of two, P at most ``MAX_WIDTH``."""
    if style not in _STYLE_IDS or not _utils.kernel_may_stand_in(x) or not x.dim():
        return False
    if cos.__class__ is not torch.Tensor or sin.__class__ is not torch.Tensor:  # a number, a subclass: apply_rope's
        return False
    if torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad):
        return False  # the kernel has no backward: apply_rope's result carries autograd history
    if x.dtype not in _utils.FLOAT_DTYPES or cos.dtype not in _utils.FLOAT_DTYPES or sin.dtype not in _utils.FLOAT_DTYPES:
        return False
    if cos.device != x.device or sin.device != x.device or x.shape[-1] < 2 or x.shape[-1] % 2:
        return False
    if not _utils.is_pow2(x.shape[-1] // 2) or x.shape[-1] > MAX_WIDTH:
        return False
    if style == "pairs":  # apply_rope computes "pairs" in float32 and returns x's dtype whatever the tables'
        return True
    # float32 tables for a bf16 x: apply_rope's "half" and "interleave" return float32, which the kernel does not
    return torch.result_type(x, cos) == x.dtype and torch.result_type(x, sin) == x.dtype


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """``apply_rope(x, cos, sin, style)`` in one Triton launch where it can (module docstring): ``x [..., H, P]``
    with tables ``[..., 1, P]`` or ``x [..., P]`` with tables ``[..., P]`` (plain tensors, broadcast over up to two
    token dimensions), unit stride along P, P / 2 a power of two up to ``MAX_WIDTH``, tables in a dtype that keeps
    ``apply_rope``'s result in
    ``x``'s ("pairs" always does), on its device, nothing autograd records, not while compiling, transforming or
    tracing the ops (``_utils.ops_intercepted``); PyTorch ops otherwise. Returns a new contiguous tensor of ``apply_rope``'s shape."""
    launch = _launch_args(x, cos, sin, style) if _kernel_serves(x, cos, sin, style) else None
    if launch is None:
        return apply_rope(x, cos, sin, style)
    out, programs, args, constexprs = launch
    if programs:
        elements = constexprs["BLOCK_R"] * x.shape[-1]  # a program's
        # on x's GPU: Triton launches on the current device (a layer on cuda:1 with cuda:0 current, device_map="auto")
        with _utils.launch_device(x.device):
            _launcher.launch(_rope_kernel, (programs,), *args, **constexprs,
                             num_warps=8 if elements >= 4096 else 4 if elements >= 1024 else 1)
    return out


def _launch_args(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> tuple | None:
    """``(out, programs, args, constexprs)`` of ``_rope_rows`` for ``rope``'s call (one ``_kernel_serves``
    accepted; ``out`` allocated, not written), or None where ``_as_tokens`` cannot read it."""
    tokens = _as_tokens(x, cos, sin)
    if tokens is None:
        return None
    batch, seq, heads, sxb, sxs, sxh, scb, scs, ssb, sss = tokens
    width = x.shape[-1]
    # tables with more dimensions than x (all 1: _as_tokens) give apply_rope's result those leading 1s
    extra = max(cos.dim(), sin.dim()) - x.dim()
    out = torch.empty((1,) * extra + tuple(x.shape) if extra > 0 else x.shape, dtype=x.dtype, device=x.device)
    rows = batch * seq * heads
    block_r = min(_utils.next_pow2(rows), max(1, TILE_ELEMENTS // (width // 2))) if rows else 1
    args = (x, out, cos, sin, rows, heads, seq, sxb, sxs, sxh, scb, scs, ssb, sss)
    return out, _utils.cdiv(rows, block_r), args, dict(HALF=width // 2, BLOCK_R=block_r, STYLE=_STYLE_IDS[style])
