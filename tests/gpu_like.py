"""Make Triton's CPU interpreter compute more as an NVIDIA GPU does, to catch results that only a GPU would get.

Every test here runs through the interpreter, which follows NumPy where a GPU follows PTX. Four of the differences
can hide a bug that every parity test passes on the CPU and a GPU then shows (bench/NOTES.md section 33: the FP8
quantizer's rounding added to a NaN's bits, which wraps for a GPU's NaN and not for NumPy's):

- **NaN payloads**: a GPU's float ops return the canonical NaN ``0x7FFFFFFF`` (PTX ``max.NaN``, ``div.rn``, ...);
  NumPy keeps the quiet NaN ``0x7FC00000`` or the input's payload. Here every fp32 NaN an op, a dot or an fma makes
  is the canonical one (selects pass their operands through, as on a GPU).
- **masked loads without ``other=``**: a GPU leaves the masked lanes' registers undefined; the interpreter gives
  zeros. Here they read NaN (floats) or ``0x5A`` bytes (ints), so a lane that leaks into a result shows.
- **fp32 to bf16**: a GPU rounds to nearest even (``cvt.rn.bf16.f32``); the interpreter truncates the mantissa.
- **exp2 and log2**: ``ex2.approx.ftz`` and ``lg2.approx.ftz`` flush subnormal inputs and results to zero.

Not emulated: the order programs run in (``tests/bounds.py``'s race check, ``MLA_TEST_RACES=1``, fails an element two
programs touch, one writing, whatever the order), approximate division and exp2's last bits, tensor-core
accumulation order. Opt-in, by hand (slower, and it leans on the interpreter's internals, which change between
triton releases): ``MLA_TEST_GPU_LIKE=1 python -m pytest tests/test_fp8.py``.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np

CANONICAL_NAN = np.uint32(0x7FFFFFFF)
GARBAGE_BYTE = 0x5A
installed = False
active: frozenset = frozenset()  # the features installed (references that model the interpreter's truncation ask)


def _canonical(handle, interp):
    """``handle`` with every fp32 NaN made the GPU's canonical one."""
    data = handle.data
    if isinstance(data, np.ndarray) and data.dtype == np.float32:
        nan = np.isnan(data)
        if nan.any():
            data = data.copy()
            data.view(np.uint32)[nan] = CANONICAL_NAN
            return interp.TensorHandle(data, handle.dtype)
    return handle


def _bf16_round_to_nearest_even(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bits (uint16), rounded to nearest even as a GPU's cvt.rn; NaN stays NaN (0x7FFF)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FFF), rounded)


def _flush_subnormals(a) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.float32:
        return a
    return np.where(np.abs(a) < np.float32(2.0 ** -126), np.float32(0.0) * np.sign(a), a).astype(np.float32)


FEATURES = ("nan", "lanes", "bf16", "ftz")


def install(features=FEATURES) -> None:
    """Patch the interpreter's builder (idempotent). Only where ``TRITON_INTERPRET`` is set before triton is imported;
    another triton whose interpreter lacks a hook gets a warning and runs unpatched. ``features``: which differences
    (``FEATURES``: canonical NaNs, undefined masked lanes, bf16 rounding, ftz exp2/log2; ``MLA_TEST_GPU_LIKE=nan,ftz``
    picks some, ``1`` all)."""
    global installed, active
    if installed:
        return
    unknown = set(features) - set(FEATURES)
    if unknown:
        raise ValueError(f"tests/gpu_like.py: unknown features {sorted(unknown)}; choose from {FEATURES}")
    import triton.language as tl
    from triton.runtime import interpreter as interp

    builder = getattr(interp, "InterpreterBuilder", None)
    hooks = ("binary_op", "unary_op", "create_dot", "create_fma", "create_masked_load", "cast_impl", "create_exp2",
             "create_log2")
    missing = [name for name in hooks if not hasattr(builder, name)]
    if missing:
        warnings.warn(f"tests/gpu_like.py: this triton's interpreter lacks {missing}; not installed", RuntimeWarning)
        return
    installed, active = True, frozenset(features)
    if "nan" in features:
        _canonical_nans(builder, interp)
    if "lanes" in features:
        _garbage_masked_lanes(builder, interp, tl)
    if "bf16" in features:
        _rounding_bf16_casts(builder, interp, tl)
    if "ftz" in features:
        _flushing_exp2_log2(builder, interp)


def _canonical_nans(builder, interp) -> None:
    for name in ("binary_op", "unary_op", "create_dot", "create_fma"):
        original = getattr(builder, name)

        def wrapped(self, *args, _original=original, **kwargs):
            return _canonical(_original(self, *args, **kwargs), interp)
        setattr(builder, name, wrapped)


def _garbage_masked_lanes(builder, interp, tl) -> None:
    masked_load = builder.create_masked_load

    def garbage_masked_load(self, ptrs, mask, other, *args, **kwargs):
        out = masked_load(self, ptrs, mask, other, *args, **kwargs)
        if other is not None:
            return out
        off = ~np.broadcast_to(mask.data, out.data.shape)
        if not off.any():
            return out
        data = out.data.copy()
        if data.dtype.kind == "f":
            data[off] = np.nan
        elif out.dtype == tl.bfloat16:  # (held as uint16)
            data[off] = 0x7FFF
        else:
            data.view(np.uint8).reshape(data.shape + (-1,))[off] = GARBAGE_BYTE
        return interp.TensorHandle(data, out.dtype)
    builder.create_masked_load = garbage_masked_load


def _rounding_bf16_casts(builder, interp, tl) -> None:
    cast = builder.cast_impl

    def rounding_cast(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = _bf16_round_to_nearest_even(src.data)
            return interp.TensorHandle(data.reshape(np.shape(src.data)), tl.bfloat16)
        return cast(self, src, dst_type)
    builder.cast_impl = rounding_cast


def round_bf16_casts(monkeypatch) -> None:
    """The "bf16" feature alone, undone with ``monkeypatch`` (conftest's ``gpu_bf16_rounding`` fixture: for one test):
    for end-to-end bounds budgeted from a GPU's roundings. A truncation is not noise but a bias toward zero, which
    adds up through a model (the drop-in's latent norm rounds twice, and both roundings scale the whole cached latent
    down). Nothing to do where ``install`` put it in already."""
    if "bf16" in active:
        return
    import triton.language as tl
    from triton.runtime import interpreter as interp

    builder = interp.InterpreterBuilder
    monkeypatch.setattr(builder, "cast_impl", builder.cast_impl)  # restored by monkeypatch
    monkeypatch.setattr(sys.modules[__name__], "active", active | {"bf16"})
    _rounding_bf16_casts(builder, interp, tl)


def _flushing_exp2_log2(builder, interp) -> None:
    def flushed(fn):
        def create(self, arg):
            flat = interp.TensorHandle(_flush_subnormals(arg.data), arg.dtype.scalar)
            return self.unary_op(flat, lambda v: _flush_subnormals(fn(v)))
        return create
    builder.create_exp2 = flushed(np.exp2)
    builder.create_log2 = flushed(np.log2)
