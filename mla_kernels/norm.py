"""The attention's RMSNorms (``q_a_layernorm``; ``kv_a_layernorm`` together with the ropes, ``norm_rope``) in one
launch each, and with ``patch_model(model, norms=True)`` the model's other RMSNorms too (``KernelRMSNorm``).

DeepSeek's RMSNorm (``DeepseekRMSNorm`` below, transformers' ``DeepseekV3RMSNorm`` and the same module in every
MLA model the drop-in patches) is seven or eight PyTorch ops: a cast to float32, a square, a mean, an add, an
rsqrt, a product, a cast back and the weight's product. In an eager decode step each is a kernel launch and a few
microseconds of host work, two norms a layer: about as many launches as the rest of the attention. ``rms_norm``
runs the module's formula in one Triton launch (each program: a block of rows, each normalized in float32, rounded
to the input's dtype, then scaled by the weight and rounded to the result's dtype, as the module's ops round), and
calls the module itself wherever that would not be the module's computation and nothing else (module docstring of
``rms_norm``). Compiled code (``torch.compile``) calls the module: inductor fuses it itself.

The kernel's float32 sum of squares runs in another order than PyTorch's mean, so a value can land one rounding of
the input's dtype away from the module's (float32 rounding differences of ~1e-7 relative, then one bf16 rounding).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn
from torch.nn.modules import module as _nn_module

from . import _launcher, _utils
from ._convert import to_dtype, to_float32
from .rope import _lead_strides

__all__ = ["DeepseekRMSNorm", "KernelRMSNorm", "rms_norm"]

NUM_WARPS = 8  # every program holds at least TILE_ELEMENTS values (a row alone may hold more)
MAX_WIDTH = 16384  # the widest row one program normalizes (whole, in registers): DeepSeek's norms are 512 and 1536
TILE_ELEMENTS = 4096  # (row, value) elements per program: 8 latent rows of 512, 2 query rows of 1536 (padded to
# 2048), one decoder row of 7168 (padded to 8192), whatever the number of rows (batch invariance: ``_normalize``)


class DeepseekRMSNorm(nn.Module):
    """RMSNorm as DeepSeek's (and transformers') ``DeepseekV3RMSNorm``: normalized in fp32, cast back, then scaled.
    ``forward`` is the formula ``rms_norm`` recognizes in other classes: keep its body as transformers writes it."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


@triton.jit
def _rms_norm_rows(pid, X, W, OUT, num_rows, seq_len, stride_xb, stride_xs, width, eps,
                   BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program ``pid``'s ``BLOCK_R`` rows of ``x [b, s, width]`` (row ``b * seq_len + s``) normalized into ``OUT``,
    contiguous ``[rows, width]``: ``w * round_x(x * rsqrt(mean(x^2) + eps))`` in float32, rounded to OUT's dtype once.
    The body of ``_rms_norm_kernel`` and of the latent's part of ``norm_rope._norm_rope_kernel``."""
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    b = rows // seq_len
    s = rows - b * seq_len
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < width
    mask = (rows < num_rows)[:, None] & col_mask[None, :]
    x = to_float32(tl.load(X + (b * stride_xb + s * stride_xs)[:, None] + cols[None, :], mask=mask, other=0.0))
    variance = tl.sum(x * x, axis=1) / width
    normed = x * tl.math.rsqrt(variance + eps)[:, None]
    normed = to_float32(to_dtype(normed, X.dtype.element_ty))  # the module's cast back to the input's dtype
    w = to_float32(tl.load(W + cols, mask=col_mask, other=0.0))
    tl.store(OUT + rows[:, None] * width + cols[None, :], to_dtype(w[None, :] * normed, OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_kernel(X, W, OUT, num_rows, seq_len, stride_xb, stride_xs, width, eps,
                     BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """``_rms_norm_rows`` of each program's block of rows."""
    _rms_norm_rows(tl.program_id(0), X, W, OUT, num_rows, seq_len, stride_xb, stride_xs, width, eps, BLOCK_R, BLOCK_N)


def _code_of(fn) -> tuple:
    """What a function computes, as the interpreter runs it: its bytecode, the names and constants it uses (a
    docstring left out) and its argument names; equal for two bodies written alike wherever they are defined."""
    code = fn.__code__
    # Python 3.10-3.13 hold a function's docstring, or None without one, as its first constant (3.14 holds a
    # docstring only, or nothing: a first constant of the body's is then left out of both sides alike)
    first = code.co_consts[0] if code.co_consts else 0
    consts = code.co_consts[1:] if first is None or isinstance(first, str) else code.co_consts
    return code.co_code, code.co_names, consts, code.co_varnames, code.co_argcount


_FORMULA = _code_of(DeepseekRMSNorm.forward)
# class -> (what its answer was read from: forward, forward's code, __call__, _call_impl; the answer). A dict: no
# lru_cache in traces
_PLAIN_CLASSES: dict[type, tuple] = {}


def _plain_class(cls: type) -> bool:
    """``cls`` computes ``DeepseekRMSNorm.forward``'s formula when called (transformers' DeepseekV3RMSNorm,
    DeepseekV2RMSNorm, ... are written alike) and its call is ``nn.Module``'s (``__call__`` and the ``_call_impl``
    it runs): read once per class, and again where any of them was replaced since (a class patched after the
    model's first step, as kernel libraries patch norms, must not keep the kernel)."""
    forward = getattr(cls, "forward", None)
    read_from = (forward, getattr(forward, "__code__", None), cls.__call__, getattr(cls, "_call_impl", None))
    known = _PLAIN_CLASSES.get(cls)
    if known is None or known[:4] != read_from:
        plain = (read_from[2] is nn.Module.__call__ and read_from[3] is nn.Module._call_impl
                 and read_from[1] is not None and _code_of(forward) == _FORMULA)
        known = _PLAIN_CLASSES[cls] = (*read_from, plain)
    return known[4]


_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def _hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` runs anything besides its forward: its own hooks, hooks registered for every
    module, a forward replaced on the instance (accelerate's offload hooks wrap it so) or its ``_call_impl`` (which
    ``nn.Module.__call__`` calls), or ``module.compile()``'s compiled call (``nn.Module.__call__`` runs it instead:
    its backend may be any)."""
    return _own_hooks(module) or any(getattr(_nn_module, name, None) for name in _GLOBAL_HOOKS)


def _own_hooks(module: nn.Module) -> bool:
    """``_hooked`` without the hooks registered for every module: what ``module``'s own call adds."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None) or "forward" in module.__dict__
                or "_call_impl" in module.__dict__ or getattr(module, "_compiled_call_impl", None) is not None)


def _tokens(x: torch.Tensor) -> tuple | None:
    """``(batch, seq, x's strides over them)`` for x's rows over at most two token dimensions, or None."""
    lead = tuple(x.shape[:-1])
    if len(lead) > 2:
        return None
    lead = (1,) * (2 - len(lead)) + lead
    return (*lead, *_lead_strides(x, 1, lead))


def _kernel_operands(module: nn.Module, x: torch.Tensor) -> tuple | None:
    """``(weight, eps)`` where ``rms_norm`` may launch the kernel for ``module(x)``, else None: the formula's class
    with nothing hooked (``_plain_class``, ``_hooked``), and ``_operands``. The tensor is asked first: compiling,
    nothing else is read (a first read of a class, traced, would change ``_PLAIN_CLASSES``: a recompile)."""
    if not _utils.kernel_may_stand_in(x) or not _plain_class(type(module)) or _hooked(module):
        return None
    return _operands(module, x)


def _operands(module: nn.Module, x: torch.Tensor) -> tuple | None:
    """``(weight, eps)`` where the kernel may compute the formula ``DeepseekRMSNorm.forward`` runs on ``module`` and
    ``x`` (one ``_utils.kernel_may_stand_in`` accepted: a Triton device, not compiling nor transforming or tracing
    the ops), else None: no autograd to record, float dtypes, a weight of x's width on x's device, a float epsilon,
    a row whole in one program. Each attribute is read once, as the formula reads it (a parametrized weight is
    computed at each read)."""
    if not x.dim():  # (a 0-d x broadcasts against the weight)
        return None
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    # a float epsilon (numpy's float64 is one): an int goes to the module, whose add raises past int64's range
    if type(weight) not in (torch.Tensor, nn.Parameter) or not isinstance(eps, float):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return None  # the kernel has no backward: the module's result carries autograd history
    width = x.shape[-1]
    serves = (x.dtype in _utils.FLOAT_DTYPES and weight.dtype in _utils.FLOAT_DTYPES and weight.device == x.device
              and tuple(weight.shape) == (width,) and weight.stride(-1) == 1 and x.stride(-1) == 1
              and 0 < width <= MAX_WIDTH)
    return (weight, eps) if serves else None


_RESULT_DTYPES: dict[tuple, torch.dtype] = {}


def _result_dtype(weight_dtype: torch.dtype, x_dtype: torch.dtype) -> torch.dtype:
    """The dtype of ``weight * x``, looked up (``torch.promote_types`` is a dispatched op: microseconds a call)."""
    key = (weight_dtype, x_dtype)
    dtype = _RESULT_DTYPES.get(key)
    if dtype is None:
        dtype = _RESULT_DTYPES[key] = torch.promote_types(weight_dtype, x_dtype)
    return dtype


def rms_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for an RMSNorm ``module``, in one Triton launch where that is the same computation: a class
    whose ``forward`` is ``DeepseekRMSNorm.forward``'s formula (transformers' RMSNorms of the MLA models are) and no
    hooks around the call, ``x [..., width]`` over at most two token dimensions with unit stride along the width
    (rows may be a view's: ``kv_c`` is one of the latent projection), float dtypes, nothing autograd records, not
    while compiling, transforming (``torch.func``, forward-mode AD) or tracing the ops (``torch.jit.trace``, a
    dispatch or function mode: ``_utils.ops_intercepted``), on a Triton device. Otherwise ``module(x)``. Returns
    what the module returns: x's shape, in ``torch.result_type(weight, x)`` (float32 for a float32 weight under
    autocast); contiguous, where the module's keeps a permuted x's layout."""
    return _norm_with(module, x, _kernel_operands(module, x))


def _norm_with(fallback, x: torch.Tensor, operands: tuple | None) -> torch.Tensor:
    """The kernel's result for ``x`` with ``operands`` (what ``_kernel_operands`` or ``_operands`` answered: each
    attribute read once), or where it does not serve ``fallback(x)``: the module (``rms_norm``) or its formula
    (``KernelRMSNorm``, whose own call would come back here)."""
    out = _normalize(x, *operands) if operands is not None else None
    return fallback(x) if out is None else out


def _normalize(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """The kernel's ``weight * round_x(x * rsqrt(mean(x^2) + eps))`` for operands ``_operands`` accepted, or None
    where x's rows span more than two token dimensions."""
    launch = _launch_args(x, weight, eps)
    if launch is None:
        return None
    out, programs, args, constexprs = launch
    if programs:
        with _utils.launch_device(x.device):  # on x's GPU, not the current one (device_map="auto")
            _launcher.launch(_rms_norm_kernel, (programs,), *args, **constexprs, num_warps=NUM_WARPS)
    return out


def _launch_args(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple | None:
    """``(out, programs, args, constexprs)`` of ``_rms_norm_rows`` for ``_normalize``'s call (``out`` allocated, not
    written), or None where x's rows span more than two token dimensions, or are more than one grid launches."""
    tokens = _tokens(x)
    if tokens is None:
        return None
    batch, seq, stride_b, stride_s = tokens
    width = x.shape[-1]
    rows = batch * seq
    # the program's shape from the width alone, never the row count: a row is summed in the same order whatever
    # else the batch holds (batch invariance: the rows of a program share one layout, and a layout chosen by the
    # row count would sum a row's squares in another order at another batch size). A decode step's few rows leave
    # the rest of the program's block masked.
    block_n = _utils.next_pow2(width)
    block_r = max(1, TILE_ELEMENTS // block_n)
    programs = _utils.cdiv(rows, block_r)
    if not _utils.grid_x_fits(programs, NUM_WARPS):  # (ROCm: ~8.4M rows past 2048 wide, ~69 GB in and out)
        return None
    out = torch.empty(x.shape, dtype=_result_dtype(weight.dtype, x.dtype), device=x.device)
    args = (x, weight, out, rows, seq, stride_b, stride_s, width, float(eps))
    return out, programs, args, dict(BLOCK_R=block_r, BLOCK_N=block_n)


_MODULE_MACHINERY = frozenset(vars(nn.Module())) - {"training"}  # what nn.Module.__init__ sets but the mode


def _own_attributes(module: nn.Module) -> dict:
    """The instance attributes of ``module`` that ``nn.Module.__init__`` does not set up (the mode included)."""
    return {key: value for key, value in vars(module).items() if key not in _MODULE_MACHINERY}


# a stand-in's own attributes that belong to it, not to the original: ``module.compile()``'s compiled call and a
# forward wrapped on the instance (accelerate's hooks: the wrapper, the forward it wraps, the hook) are the stand-in's
_BOUND_TO_THE_STAND_IN = frozenset({"original", "_compiled_call_impl", "forward", "_old_forward", "_hf_hook"})

_STATE_DICT_HOOKS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                     "_load_state_dict_post_hooks")


class KernelRMSNorm(DeepseekRMSNorm):
    """A model's own RMSNorm module with the formula in one launch: what ``patch_model(model, norms=True)`` puts in
    the place of each module ``can_adopt`` accepts (the decoder layers' ``input_layernorm`` and
    ``post_attention_layernorm``, the final ``norm``). Its forward launches the kernel wherever ``rms_norm`` would
    for the module (``_operands``: a Triton device, nothing autograd records, not compiling nor transforming or
    tracing the ops, ...) and runs ``DeepseekRMSNorm.forward`` otherwise: the module's own formula, which
    ``can_adopt`` checked. It holds the original's weight Parameter itself (the state dict keeps its keys and
    tensors) and its other attributes; ``original`` is the module ``unpatch_model`` puts back."""

    @staticmethod
    def can_adopt(module: nn.Module) -> bool:
        """``module`` computes ``DeepseekRMSNorm.forward``'s formula with its weight Parameter and nothing else: the
        formula's class, no parameter but ``weight``, no buffer, no child (a parametrized weight is one), no hook of
        its own (forward, backward or state-dict hooks, a forward or call replaced on the instance,
        ``module.compile()``) that a swapped-in module would not run, and its ``variance_epsilon`` its own (the
        stand-in takes the instance's attributes: one its class holds would be missing)."""
        return (_plain_class(type(module)) and not _own_hooks(module)  # (a stand-in's own forward is no formula)
                and "variance_epsilon" in vars(module)
                and list(module._parameters) == ["weight"] and type(module._parameters["weight"]) is nn.Parameter
                and not module._buffers and not module._modules
                and not any(getattr(module, name, None) for name in _STATE_DICT_HOOKS))

    @classmethod
    def adopt(cls, original: nn.Module) -> "KernelRMSNorm":
        """The module standing in for ``original`` (one ``can_adopt`` accepted): its weight Parameter (the same
        object) and every attribute of its own that is not ``nn.Module``'s machinery (``variance_epsilon``,
        ``training``, transformers' ``_is_hf_initialized`` mark, which keeps ``post_init`` from initializing the
        weight again, any a subclass adds)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for key, value in _own_attributes(original).items():
            object.__setattr__(new, key, value)
        new.weight = original.weight
        object.__setattr__(new, "original", original)  # (not a submodule: its weight is this module's)
        return new

    def restorable(self) -> str | None:
        """None where ``restore`` can put ``original`` back, else why not (``unpatch_model`` asks every stand-in
        before it restores any)."""
        if not isinstance(vars(self).get("original"), nn.Module):
            return "it is not a stand-in patch_model made (no original module)"
        if type(self._parameters.get("weight")) is not nn.Parameter:
            return ("its weight is no longer a plain Parameter (parametrized while patched?): remove that first "
                    "(torch.nn.utils.parametrize.remove_parametrizations)")
        return None

    def restore(self) -> nn.Module:
        """``original``, given back the weight Parameter and the attributes this module holds now (one replaced or
        converted while patched stays), for ``unpatch_model``. What was attached to this module while patched
        (hooks, ``compile()``, a forward wrapped on it) stays with it."""
        original = self.original
        for key, value in _own_attributes(self).items():
            if key not in _BOUND_TO_THE_STAND_IN:
                object.__setattr__(original, key, value)
        original.weight = self._parameters["weight"]
        return original

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        operands = _operands(self, hidden_states) if _utils.kernel_may_stand_in(hidden_states) else None
        return _norm_with(super().forward, hidden_states, operands)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"
