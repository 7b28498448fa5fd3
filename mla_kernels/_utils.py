"""Argument checks, dispatch and interpreter support shared by every op.

Every public function validates its arguments once through the helpers here, so
that bad input raises a ``TypeError``/``ValueError`` naming the argument before
any kernel is launched or any cache byte is written.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import numbers
import operator
import os
import sys
import threading
import weakref
from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)
FP8_DTYPES = (torch.float8_e4m3fn,)  # DeepSeek's FP8 latent cache: e4m3 values, one fp32 scale per FP8_GROUP
FP8_GROUP = 128
FP8_MAX = 448.0  # e4m3fn's largest finite value


# Triton decides at import whether ``@triton.jit`` makes interpreted functions (and its interpreter reads the variable
# again at run time), so the interpreter runs only where ``TRITON_INTERPRET`` was set when the library was imported and
# still is: a ``TRITON_INTERPRET=1`` set after the import sent CPU tensors to compiled kernels ("0 active drivers");
# they now take the PyTorch path, as they do once the variable is unset. Triton's own library decides at its import:
# triton imported before the variable was set, its jit functions (tl.max, tl.sum, ...) are compiled ones that the
# interpreter cannot call ("Cannot call @triton.jit'd outside of the scope of a kernel"), so that too is no interpreter.
def _interpreter_at_import() -> bool:
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return False
    standard = sys.modules.get("triton.language.standard")  # (None: triton is imported next, under this variable)
    return standard is None or type(standard.cdiv).__name__ == "InterpretedFunction"


_INTERPRET_AT_IMPORT = _interpreter_at_import()


def interpreting() -> bool:
    """True when Triton's CPU interpreter is active: ``TRITON_INTERPRET=1`` now and when the library was imported."""
    return _INTERPRET_AT_IMPORT and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(t: torch.Tensor) -> bool:
    """Run the Triton kernels for tensors on this device?

    GPU tensors (CUDA or ROCm, both ``device.type == "cuda"``) always do; CPU
    tensors do only under the interpreter, otherwise they take the PyTorch path.
    """
    if t.device.type == "cuda":
        return True
    return t.device.type == "cpu" and interpreting()


def fp8_bits(kv_cache: torch.Tensor) -> torch.Tensor:
    """An fp8 (e4m3) cache as the kernels take it on its device: itself where Triton converts e4m3 (sm_89 and later,
    ROCm, the interpreter), else its uint8 view, whose bits the kernels decode and encode in software (NVIDIA GPUs
    before sm_89, A100 and the RTX 30 series among them: Triton refuses the e4m3 type there). A bf16/fp16/fp32
    cache is returned as it is."""
    if kv_cache.dtype != torch.float8_e4m3fn or kv_cache.device.type != "cuda" or is_hip():
        return kv_cache
    return kv_cache if capability(kv_cache.device) >= (8, 9) else fp8_as_bits(kv_cache)


def fp8_as_bits(kv_cache: torch.Tensor) -> torch.Tensor:
    """An e4m3 cache's uint8 view, any other cache as it is: what ``fp8_bits`` gives the kernels on a GPU without
    the e4m3 type (and what compile checks and tests force it to give elsewhere)."""
    return kv_cache.view(torch.uint8) if kv_cache.dtype == torch.float8_e4m3fn else kv_cache


def take(t: torch.Tensor, *index) -> torch.Tensor:
    """``t[index]`` (advanced indexing), an fp8 tensor's through its bytes (``fp8_as_bits``) and viewed back: torch
    2.6's CPU ``index`` has no fp8 kernel ("index_cpu" not implemented for 'Float8_e4m3fn')."""
    return fp8_as_bits(t)[index].view(t.dtype)


def put(t: torch.Tensor, index: tuple, values: torch.Tensor) -> None:
    """``t[index] = values`` in place, an fp8 ``t`` and ``values`` through their bytes, as ``take``."""
    fp8_as_bits(t)[index] = fp8_as_bits(values)


@functools.lru_cache(maxsize=None)
def multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def capability(device: torch.device) -> tuple[int, int]:
    """Compute capability of a CUDA device (cached: no driver query per call)."""
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


def launch_device(device: torch.device):
    """A context for launching on ``device``: Triton launches on the *current* CUDA device and its stream, so a
    call on another GPU's tensors (cuda:1 while cuda:0 is current) makes it current for the call; a null context
    otherwise (the common case, and CPU tensors)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return _NO_CONTEXT


_NO_CONTEXT = contextlib.nullcontext()  # (stateless: one serves every launch, nested ones too)


def _private(get, default):
    """A private torch hook ``get()``, or ``default`` on a torch without it (the package admits torch 2.6 on)."""
    try:
        return get()
    except (AttributeError, ImportError):
        return default


def _forward_ad_level_reader():
    import torch.autograd.forward_ad as forward_ad
    forward_ad._current_level  # (raises AttributeError on a torch that keeps it elsewhere)
    return lambda: forward_ad._current_level


_INTERPRETER_STACK = _private(lambda: torch._C._functorch.peek_interpreter_stack, lambda: None)
_FORWARD_AD_LEVEL = _private(_forward_ad_level_reader, lambda: -1)  # >= 0 inside fwAD.dual_level()
_IS_TRACING = _private(lambda: torch._C._is_tracing, lambda: False)
_DISPATCH_MODES = _private(lambda: torch._C._len_torch_dispatch_stack, lambda: 0)
_FUNCTION_MODES = _private(lambda: torch._C._len_torch_function_stack, lambda: 0)


def ops_intercepted() -> bool:
    """Whether PyTorch ops now run through something besides their kernels, which a model's own ops would go through
    and a Triton launch in their place would not (``rope``'s and ``rms_norm``'s dispatch then take the PyTorch
    ops): ``torch.func`` transforms (vmap's and jvp's wrapped tensors have no storage to launch on), forward-mode AD
    (its tangents, which no_grad does not turn off), ``torch.jit.trace`` (it records the ops, and hands shapes as
    tensors), a TorchDispatchMode (``make_fx``'s tracer, whose graph would get an empty tensor; FlopCounterMode)
    or a TorchFunctionMode other than a ``torch.device`` context's (``set_default_device`` too: it places factory
    calls only, and the kernels' outputs are placed on their input's device)."""
    if _INTERPRETER_STACK() is not None or _FORWARD_AD_LEVEL() >= 0 or _IS_TRACING() or _DISPATCH_MODES():
        return True
    if _FUNCTION_MODES():
        from torch.overrides import _get_current_function_mode_stack
        from torch.utils._device import DeviceContext
        return not all(type(mode) is DeviceContext for mode in _get_current_function_mode_stack())
    return False


def kernel_may_stand_in(x: torch.Tensor) -> bool:
    """Whether a Triton kernel may stand in for a run of PyTorch ops on ``x`` (the drop-in's ``rope`` and
    ``rms_norm``; each adds its own shape, dtype and autograd conditions): a plain tensor (a subclass, DTensor's or a
    quantizer's, computes its own way) on a Triton device, not while compiling (inductor fuses the ops itself), and
    nothing running the ops through itself (``ops_intercepted``)."""
    return type(x) is torch.Tensor and use_triton(x) and not torch.compiler.is_compiling() and not ops_intercepted()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors (NVIDIA) or compute units (AMD); a nominal 132 for the interpreter."""
    if device.type == "cuda":
        return multiprocessor_count(device.index if device.index is not None else torch.cuda.current_device())
    return 132


def dot_precision(dtype: torch.dtype):
    """``input_precision`` for the kernels' tl.dot: full fp32 ("ieee") for float32 inputs, which would
    otherwise run as TF32 on NVIDIA GPUs (10-bit mantissa); the backend default (None) for bf16/fp16."""
    return "ieee" if dtype == torch.float32 else None


def is_hip() -> bool:
    return torch.version.hip is not None


MAX_GRID_X = 2**31 - 1  # a launch grid's x extent (CUDA)
# HIP refuses a launch whose x extent times its threads passes it (hipErrorInvalidConfiguration)
HIP_MAX_WORK_ITEMS = 2**32 - 1


def grid_x_fits(programs: int, num_warps: int) -> bool:
    """A one-axis grid of ``programs`` programs of ``num_warps`` warps launches on this GPU: at most ``MAX_GRID_X``,
    and on ROCm at most ``HIP_MAX_WORK_ITEMS`` work-items (64 per warp: 8,388,607 programs of 8 warps)."""
    if programs * 2048 <= HIP_MAX_WORK_ITEMS:  # (32 warps of 64: fits everywhere; the common case, no more asked)
        return True
    return programs <= MAX_GRID_X and (not is_hip() or programs * 64 * num_warps <= HIP_MAX_WORK_ITEMS)


def nvidia_sm90(device: torch.device) -> bool:
    """An NVIDIA GPU of compute capability 9 or more (Hopper: wgmma, TMA)."""
    return device.type == "cuda" and not is_hip() and capability(device)[0] >= 9


def on_hip(device: torch.device) -> bool:
    """A GPU tensor under ROCm (AMD configs apply); the CPU interpreter runs the NVIDIA ones."""
    return device.type == "cuda" and is_hip()


H100_SHARED_BYTES = 232448  # 227 KiB: the most shared memory one block may use on sm_90 (CUDA programming guide)
MI300_LDS_BYTES = 65536  # 64 KiB of LDS per workgroup on gfx942 (AMD CDNA3 ISA guide)
# What the compiler may add to the kernels' estimates of their operand tiles (decode.decode_shared_bytes,
# prefill.expanded_shared_bytes) for layout conversions: none in the sm_90 compiles of tests/test_compile.py
# (triton 3.6), which holds every estimated case to this allowance
SHARED_SCRATCH_BYTES = 4 * 1024


@functools.lru_cache(maxsize=None)
def _optin_shared(device_index: int) -> int:
    if not torch.cuda.is_available():  # a "cuda" device named where there is none (cost estimates): an H100's
        return H100_SHARED_BYTES
    props = torch.cuda.get_device_properties(device_index)
    optin = getattr(props, "shared_memory_per_block_optin", 0)
    if optin:
        return int(optin)
    major, minor = _capability(device_index)  # older torch: the CUDA guide's per-block opt-in maximum
    return {9: 232448, 10: 232448, 8: 166912 if minor == 0 else 101376}.get(major, 101376 if major > 10 else 49152)


def shared_memory_limit(device: torch.device) -> int | None:
    """Bytes of shared memory one program may use on ``device``, for sizing tiles; None where tiles are not fitted.

    NVIDIA GPUs: the device's opt-in maximum per block (cached). The CPU interpreter has no such limit but runs
    the tiles an H100 would, so it gets the H100's. ROCm: None here, as Triton's AMD backend lays shared memory
    (LDS) out differently from what the sm_90 estimates count: ``fit_tiles`` fits ROCm launches to
    ``MI300_LDS_BYTES`` by the kernels' AMD estimates instead."""
    if device.type == "cuda":
        if is_hip():
            return None
        if device.index is None:
            return _optin_shared(torch.cuda.current_device() if torch.cuda.is_available() else 0)
        return _optin_shared(device.index)
    return H100_SHARED_BYTES


def fit_tiles(cfg: dict, device: torch.device | None, shared_bytes, *args, hip: bool | None = None) -> dict:
    """``cfg`` fitted (``fit_shared``) to the shared memory of ``device``'s GPU by the kernel's estimate
    ``shared_bytes(cfg, *args, hip=...)``: on NVIDIA (and the CPU interpreter, which runs an H100's tiles) its
    sm_90 figure against ``shared_memory_limit`` with ``SHARED_SCRATCH_BYTES`` to spare; under ROCm its gfx942
    figure, the AMD backend's own to the byte for one pipeline stage, against ``MI300_LDS_BYTES``, nothing to
    spare. ``hip`` overrides the vendor ``device`` implies (CI's gfx942 compiles, without an AMD GPU)."""
    if on_hip(device) if hip is None else hip:
        return fit_shared(cfg, functools.partial(shared_bytes, hip=True), MI300_LDS_BYTES, *args, scratch=0)
    return fit_shared(cfg, shared_bytes, shared_memory_limit(device), *args)


def fit_shared(cfg: dict, shared_bytes, limit: int | None, *args, scratch: int = SHARED_SCRATCH_BYTES) -> dict:
    """``cfg`` with its tiles halved, BLOCK_N first then BLOCK_M (neither below 16, tl.dot's least), then its
    pipeline stages lowered (not below 1), until ``shared_bytes(cfg, *args) + scratch`` fits ``limit``; ``cfg``
    itself when it already fits (the per-launch case: no copy, no closure). A launch over the limit fails on the
    GPU with "out of resources" (fp32 at 64 x 64 needs over 300 KiB; an H100 has 227).

    The copy keeps ``cfg``'s type and attributes (``copy.copy``): a stored config (``_tuning.Tuned``) that still
    fails to compile once fitted is then dropped for the heuristic by the launch, as an unfitted one is (a plain
    dict lost that, and the compile error reached the caller)."""
    if limit is None or shared_bytes(cfg, *args) + scratch <= limit:
        return cfg
    fitted = copy.copy(cfg)
    while shared_bytes(fitted, *args) + scratch > limit:
        if fitted["BLOCK_N"] > 16:
            fitted["BLOCK_N"] //= 2
        elif fitted["BLOCK_M"] > 16:
            fitted["BLOCK_M"] //= 2
        elif fitted.get("num_stages", 1) > 1:
            fitted["num_stages"] -= 1
        else:
            break  # the smallest tiles, one stage; the launch reports whatever still does not fit
    return fitted


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints. Plain Python: ``triton.cdiv`` is a constexpr function in triton >= 3.7 and costs
    microseconds per host call."""
    return -(-a // b)


# ---------------------------------------------------------------------------------------------
# scratch memory for partial results that die within one call (split-KV partials)
# ---------------------------------------------------------------------------------------------

_SCRATCH: dict = {}  # (device, stream, thread) -> [float32 buffer, {shapes: views into it}]
_SCRATCH_KEYS = 16  # buffers kept (device x stream x thread); a new key past this frees the oldest
_SCRATCH_VIEWS = 64  # distinct shape sets remembered per buffer before the memo is cleared
_SCRATCH_ALIGN = 64  # elements (256 bytes) between views: every view starts as aligned as the buffer
_SCRATCH_LOCK = threading.Lock()
_SCRATCH_THREAD = threading.local()  # .owner: a _ScratchOwner, in each thread that took scratch


class _ScratchOwner:
    """Held in the thread-local storage of a thread that took scratch: Python frees it when the thread ends (before
    the thread's id can be reused), and its finalizer then drops that thread's buffers. Without it an ended thread's
    buffers (each up to twice the largest partials it ever needed) stayed until ``_SCRATCH_KEYS`` newer keys pushed
    them out, which never happens once a burst of short-lived threads is over: up to 16 dead buffers for good.
    (A thread that enters Python from C, as pybind11's GIL acquisition does, may get a fresh thread state at each
    outermost entry: its buffers then go at each exit and are made again at the next call, a cost in speed only.)"""
    __slots__ = ("__weakref__",)


_SCRATCH_ENDED: list = []  # idents of ended threads whose buffers _forget_thread left to the next locked scratch


def _forget_thread(ident: int) -> None:
    """Drop the scratch buffers of the thread ``ident``, which has ended. A buffer whose kernels are still queued
    goes back to PyTorch's allocator as an evicted one does: reused only behind the work queued on its stream.
    Never waits for the lock: in a child forked while another thread held it, Python clears that thread's state
    (running this finalizer) inside ``os.fork`` itself, where the lock is never released, so waiting hung the
    child before it ran a line. Where the lock is held, the ident waits in ``_SCRATCH_ENDED`` for the next call
    that takes the lock (a new key or a larger request)."""
    if not _SCRATCH_LOCK.acquire(blocking=False):
        _SCRATCH_ENDED.append(ident)
        return
    try:
        _drop_thread(ident)
    finally:
        _SCRATCH_LOCK.release()


def _drop_thread(ident: int) -> None:
    """(Under ``_SCRATCH_LOCK``.) Drop the keys of the thread ``ident``."""
    for key in [k for k in _SCRATCH if k[2] == ident]:
        del _SCRATCH[key]


def _own_thread_scratch(ident: int) -> None:
    """Register the calling thread (``ident``) for ``_forget_thread`` when it ends, once per thread."""
    if getattr(_SCRATCH_THREAD, "owner", None) is None:
        owner = _SCRATCH_THREAD.owner = _ScratchOwner()
        weakref.finalize(owner, _forget_thread, ident).atexit = False  # (at exit the whole table goes anyway)


def scratch(device: torch.device, *shapes: tuple) -> tuple:
    """float32 tensors of these shapes, uninitialised, for results a call writes and reads back itself before it
    returns (the split-KV partials that the combine kernel merges). Carved from one buffer per device, stream and
    thread that later calls reuse, so a decode step allocates nothing for them: the same shapes give back the same
    tensors for a dictionary lookup. Reuse is safe because the kernels of consecutive calls on one stream run in
    order, and each thread and stream has its own buffer (two threads sharing a stream could otherwise interleave
    one call's kernels between the other's). A larger request replaces the buffer; the old one goes back to
    PyTorch's allocator, which hands it out again only behind the work already queued on the stream. A thread's
    buffers go the same way when the thread ends (``_ScratchOwner``).
    While a CUDA graph is being captured the tensors are allocated as usual, from the graph's own pool: a graph
    must never point into a buffer that a later call may free and replace. Eager calls only: inside torch.compile's
    CUDA graphs (cudagraph trees) even the warm-up calls allocate from the graphs' private pool, whose blocks the
    trees reassign by their own bookkeeping (``decode._launch``'s ``reuse_scratch``)."""
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return tuple(torch.empty(s, dtype=torch.float32, device=device) for s in shapes)
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = (index, torch._C._cuda_getCurrentRawStream(index), threading.get_ident())
    else:
        key = (device, 0, threading.get_ident())
    entry = _SCRATCH.get(key)
    if entry is not None:
        views = entry[1].get(shapes)
        if views is not None:
            return views
    sizes = [math.prod(s) for s in shapes]
    need = sum(cdiv(n, _SCRATCH_ALIGN) * _SCRATCH_ALIGN for n in sizes)
    if entry is None:  # (outside the lock, which the thread's finalizer takes)
        _own_thread_scratch(key[2])
    with _SCRATCH_LOCK:  # the table is shared by threads (each has its own entries)
        while _SCRATCH_ENDED:  # ended threads whose finalizer found the lock taken
            _drop_thread(_SCRATCH_ENDED.pop())
        if entry is None or entry[0].numel() < need:
            if entry is None and len(_SCRATCH) >= _SCRATCH_KEYS:  # streams or threads come and go: drop the oldest
                _SCRATCH.pop(next(iter(_SCRATCH)))
            size = need if entry is None else max(need, 2 * entry[0].numel())  # growing requests: few reallocations
            entry = _SCRATCH[key] = [torch.empty(size, dtype=torch.float32, device=device), {}]
        elif len(entry[1]) >= _SCRATCH_VIEWS:  # many shapes (ragged batches): forget the views, keep the buffer
            entry[1].clear()
    views, offset = [], 0
    for s, n in zip(shapes, sizes):
        views.append(entry[0][offset:offset + n].view(s))
        offset += cdiv(n, _SCRATCH_ALIGN) * _SCRATCH_ALIGN
    entry[1][shapes] = views = tuple(views)
    return views


def release_workspace(device=None) -> int:
    """Free the workspace eager ``mla_decode`` calls keep between calls: the float32 buffers their split-KV partials
    are carved from (one per device, stream and thread; each grows to twice the largest partials a call needed and
    never shrinks by itself). ``device``: a ``torch.device``, its string or a GPU index; None frees them on
    every device. Returns the bytes freed.

    The memory goes back to PyTorch's caching allocator, which hands it out again only behind the work already queued
    on its stream, so calling this while kernels that use the buffers are still running is safe; follow with
    ``torch.cuda.empty_cache()`` to return it to the driver. The next call that splits allocates a buffer again
    (for its own shapes). A useful step after a rare very long or very wide call (``split_tokens`` over a long
    context, a large batch at 128 heads) whose partials would otherwise stay allocated for the life of the process.
    CUDA graphs are not affected: their calls allocate from the graph's own pool."""
    if device is not None:
        if isinstance(device, int) and not isinstance(device, bool):  # a GPU index: torch.device(0) would ask for
            if device < 0:                                             # an accelerator, which a CPU build lacks
                raise ValueError(f"device={device} is not a GPU index (>= 0)")
            device = torch.device("cuda", device)
        device = check_device("device", device)
        if device.type == "cuda" and device.index is None:
            if not torch.cuda.is_available():  # (no GPU: nothing was ever allocated on one)
                return 0
            device = torch.device("cuda", torch.cuda.current_device())

    def matches(key) -> bool:  # scratch's keys: (GPU index, stream, thread) or (CPU device, 0, thread)
        if device is None:
            return True
        if device.type == "cuda":
            return not isinstance(key[0], torch.device) and key[0] == device.index
        return key[0] == device

    with _SCRATCH_LOCK:
        keys = [k for k in _SCRATCH if matches(k)]
        released = sum(_SCRATCH[k][0].numel() * _SCRATCH[k][0].element_size() for k in keys)
        for k in keys:
            del _SCRATCH[k]
    return released


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (0 for 0, as ``triton.next_power_of_2``, without its per-call cost)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


# ---------------------------------------------------------------------------------------------
# argument checks: each raises TypeError / ValueError with the argument's name
# ---------------------------------------------------------------------------------------------


class Fp8MisuseError(ValueError, TypeError):
    """An fp8 tensor where only the cache's latent may be fp8 (an fp8 query, say): a bad combination of
    arguments (ValueError, as the FP8 cache's contract says) and a wrong dtype (TypeError) at once."""


def check_tensor(name: str, t, ndim: int | None = None, dtypes=None) -> torch.Tensor:
    if t is None:
        raise TypeError(f"{name} must be a torch.Tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        if t.dtype.itemsize == 1 and t.dtype.is_floating_point:
            got = str(t.dtype).replace('torch.', '')
            if name == "kv_cache":  # an fp8 cache of another format than DeepSeek's e4m3
                raise Fp8MisuseError(f"kv_cache is {got}: an fp8 cache must be float8_e4m3fn (with kv_scale), "
                                     f"other caches have dtype in ({names})")
            raise Fp8MisuseError(f"{name} is {got}, but only kv_cache may be fp8 "
                                 f"(float8_e4m3fn, with kv_scale); {name} must have dtype in ({names})")
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    return t


def check_sinks(sinks, heads: int, device: torch.device, beside: str = "q_nope") -> torch.Tensor:
    """Attention sinks for ``heads`` query heads (``merge.apply_sink``): ``sinks [heads]``, any floating dtype (applied
    in float32), on ``device``, that of the tensor named ``beside``; else a TypeError/ValueError naming ``sinks``."""
    if isinstance(sinks, torch.Tensor) and sinks.shape == (heads,) and sinks.dtype.is_floating_point \
            and sinks.device == device:  # (the common case: one comparison each)
        return sinks
    check_tensor("sinks", sinks)
    if sinks.shape != (heads,):
        raise ValueError(f"sinks must be a [num_heads] = [{heads}] tensor (a logit per head), got shape "
                         f"{tuple(sinks.shape)}")
    if not sinks.dtype.is_floating_point:
        raise TypeError(f"sinks must be a floating-point tensor, got {str(sinks.dtype).replace('torch.', '')}")
    raise ValueError(f"sinks is on {sinks.device} but {beside} is on {device}")


class GradModeError(ValueError, RuntimeError):
    """An input autograd would need a backward pass for, given to inference kernels that have none: a bad argument
    (ValueError, as the functions raise it) and, for the module, the RuntimeError PyTorch raises for autograd misuse."""


def check_no_grad(op: str, **tensors) -> None:
    """Refuse, naming the first, tensors that autograd would need a backward pass for: the kernels have none, so
    their outputs would carry no gradient to these inputs (or, through a PyTorch step such as the ``w_uv``
    projection, only part of it). Checked tensors only (or None); free unless grad mode is on."""
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if t is not None and t.requires_grad:
            raise GradModeError(f"{name} requires grad, but {op} runs inference kernels without a backward pass: "
                                f"call it under torch.no_grad() or torch.inference_mode(), or pass {name}.detach()")


MAX_GRID_YZ = 65535  # a launch grid's y and z extents (CUDA; x goes to 2^31 - 1)


def check_grid_batch(batch: int, batch_from: str) -> None:
    """A call whose kernels launch a program per sequence along a grid axis (dense decode without a schedule,
    prefill) takes at most ``MAX_GRID_YZ`` sequences on every device, where a GPU launch would fail."""
    if batch > MAX_GRID_YZ:
        raise ValueError(f"{batch_from} is {batch}: one call takes at most {MAX_GRID_YZ} sequences (a launch "
                         f"grid's limit); split the batch into several calls")


def check_last_contiguous(name: str, t: torch.Tensor) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (stride {t.stride(-1)})")


def check_same(name_a: str, a, name_b: str, b, what: str = "size") -> None:
    """Two properties that must agree; a dtype disagreement is a TypeError, anything else a ValueError."""
    if a != b:
        err = TypeError if what == "dtype" else ValueError
        raise err(f"{name_a} and {name_b} disagree on {what}: {a} vs {b}")


WIDTHS = frozenset(1 << i for i in range(4, 11))  # what check_width admits: powers of two from 16 to 1024


def check_width(name: str, width: int) -> None:
    # (ints, numpy's and torch's shape ints; a symbolic one, a torch.SymInt, before hasattr, which dynamo can't trace
    # on it: with dynamic=True, mark_dynamic or two widths seen, every call that checks a width failed to trace)
    if isinstance(width, bool) or not (isinstance(width, (int, torch.SymInt)) or hasattr(width, "__index__")):
        raise TypeError(f"{name} width must be an int, got {type(width).__name__}")
    if not is_pow2(width) or not 16 <= width <= 1024:
        raise ValueError(f"{name} width must be a power of two from 16 to 1024, got {width}")


# what check_rope_width admits: check_width's, and 0 for MLA without a rotary part (a NoPE layer: Mistral Large 4's
# no-rope layers, GLM-5.3-Flash's), whose kernels read and write no rope key at all
ROPE_WIDTHS = WIDTHS | {0}


def check_rope_width(name: str, width: int) -> None:
    """``check_width`` for a rope width, which may also be 0 (no rotary part), given as any integer check_width
    takes (numpy's and torch's too)."""
    # (as check_width: ints and symbolic ones first, hasattr only after them, which dynamo can't trace on a SymInt)
    if not isinstance(width, bool) and (isinstance(width, (int, torch.SymInt)) or hasattr(width, "__index__")) \
            and width == 0:
        return
    try:
        check_width(name, width)
    except ValueError:
        raise ValueError(f"{name} width must be 0 (no rope) or a power of two from 16 to 1024, got {width}") from None


def check_devices(**tensors: torch.Tensor) -> torch.device:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    device = items[0][1].device
    for k, v in items[1:]:
        if v.device != device:
            raise ValueError(f"{k} is on {v.device} but {items[0][0]} is on {device}")
    return device


def check_device(name: str, device) -> torch.device:
    """``device`` (a ``torch.device``, its name or a CUDA index) as a ``torch.device``, or an error naming it."""
    if isinstance(device, bool) or not isinstance(device, (torch.device, str, int)):
        raise TypeError(f"{name} must be a torch.device or its name, got {type(device).__name__}")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"{name} {device!r} is not a device torch knows: {exc}") from None


def check_alloc_device(name: str, device) -> torch.device:
    """``check_device`` for a device the call allocates on: a CUDA device must exist here (torch's own refusal is an
    ``AssertionError`` without a CUDA build, a ``RuntimeError`` for an index past the GPUs)."""
    device = check_device(name, device)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{name} {str(device)!r} names a CUDA device, but no GPU is visible to torch here")
        if device.index is not None and device.index >= count:
            raise ValueError(f"{name} {str(device)!r} names GPU {device.index}, but torch sees {count}")
    return device


def rows_apart(t: torch.Tensor) -> bool:
    """A sufficient test that the rows of a ``[N, page, W]`` cache (unit last stride) share no element: rows inside
    a block apart and blocks apart (block-major, as the library allocates), or the same with the two dimensions'
    roles swapped (token-major). A few comparisons, for ``write_cache``'s hot path; False sends a cache to
    ``rows_overlap``."""
    (n, p, w), (s0, s1, _) = t.shape, t.stride()
    if (p == 1 or s1 >= w) and (n == 1 or s0 >= (p - 1) * s1 + w):
        return True
    return (n == 1 or s0 >= w) and (p == 1 or s1 >= (n - 1) * s0 + w)


def rows_overlap(t: torch.Tensor) -> bool:
    """Whether two rows of a ``[N, page, W]`` cache (unit last stride, strides >= 0) share an element: whether
    ``|a*s + b*s'| < W`` for some steps ``(a, b) != (0, 0)`` along the two dimensions, within their sizes. Exact:
    for each step ``a`` along the shorter dimension the closest ``b`` is one of two (the distance is convex in
    ``b``), so this walks ``min(N, page)`` steps, and only for layouts ``rows_apart`` cannot vouch for."""
    (n, p, w), (s0, s1, _) = t.shape, t.stride()
    if w == 0 or n == 0 or p == 0 or rows_apart(t):
        return False
    (short, s_short), (long, s_long) = sorted(((n, s0), (p, s1)))
    for a in range(short):
        x = a * s_short
        nearest = -x // s_long if s_long else 0  # the b with b * s_long closest to -x from below
        for b in (nearest, nearest + 1):
            b = max(1 - long, min(long - 1, b))
            if (a, b) != (0, 0) and abs(x + b * s_long) < w:
                return True
    return False


def check_no_overlap(name: str, t: torch.Tensor) -> None:
    """Refuse a tensor the call writes whose elements share memory: through a stride-0 dimension (``expand()``),
    or, for a ``[N, page, W]`` cache with unit last stride, rows closer than their width (``as_strided``). Writes
    to distinct slots would land on one another. (torch refuses such in-place writes too.)"""
    if t.numel() == 0:
        return  # (nothing is written to it: a rope cache of width 0)
    for size, stride in zip(t.shape, t.stride()):
        if size > 1 and stride == 0:
            raise ValueError(f"{name} has a stride-0 dimension (shape {tuple(t.shape)}, strides {t.stride()}, as "
                             "expand() makes): its slots share memory, so a write to one would overwrite others; "
                             "pass a tensor with memory of its own (.contiguous() or .clone())")
    if t.dim() == 3 and t.stride(2) == 1 and rows_overlap(t):
        raise ValueError(f"{name}'s rows overlap (shape {tuple(t.shape)}, strides {t.stride()}: two slots are "
                         f"closer than the {t.shape[2]} values of a row), so a write to one slot would overwrite "
                         "another; pass a tensor with memory of its own (.contiguous() or .clone())")


def is_finite(value) -> bool:
    """``math.isfinite`` of a real number, False for an int too large for a float (where it raised OverflowError)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def views_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two ``[N, page, W]`` caches with unit last stride (``write_cache``'s) provably share a byte: False for
    separate memory, for the rows of one buffer side by side (``buf[..., :R]``, ``buf[..., R:]``; FlashMLA's FP8
    rows) or in other pages (``buf[:, :4]``, ``buf[:, 4:]``), and for layouts this cannot decide (rows of two views
    laid out unlike, a block stride that is no whole number of row strides). Read from data pointers: never while
    compiling (a fake tensor has none)."""
    if a.numel() == 0 or b.numel() == 0:
        return False  # (no byte to share: a rope cache of width 0)
    ea, eb = a.element_size(), b.element_size()
    la, lb = a.data_ptr(), b.data_ptr()
    (na, pa, wa), (nb, pb, wb) = a.shape, b.shape
    (a0, a1, _), (b0, b1, _) = a.stride(), b.stride()
    if la + ((na - 1) * a0 + (pa - 1) * a1 + wa) * ea <= lb or lb + ((nb - 1) * b0 + (pb - 1) * b1 + wb) * eb <= la:
        return False  # (the spans apart: every tensor the library makes itself has its rows so)
    if na == pa == nb == pb == 1:
        return True  # one row each, and their spans meet
    a0, a1, b0, b1 = a0 * ea, a1 * ea, b0 * eb, b1 * eb  # bytes
    if (a0, a1, na, pa) != (b0, b1, nb, pb):
        return False  # undecided: rows laid out unlike
    # row (i, j) of a starts at la + i*a0 + j*a1, b's at lb + the same: b's row (i', j') meets a's (i, j) where
    # -wb*eb < (lb - la) + m*unit < wa*ea, m = di*k + dj, |di| < na, |dj| < pa, unit*k = a0 (unit = a1: the pages)
    if pa == 1:
        unit, k, di_max, dj_max = a0, 1, na - 1, 0
    elif na == 1:
        unit, k, di_max, dj_max = a1, 1, 0, pa - 1
    elif a1 > 0 and a0 > 0 and a0 % a1 == 0:
        unit, k, di_max, dj_max = a1, a0 // a1, na - 1, pa - 1
    else:
        return False  # undecided: blocks not a whole number of rows apart (or rows repeated)
    if unit <= 0:
        return False  # (rows repeated: stride 0, which write_cache refuses itself)
    shift = lb - la
    m_lo, m_hi = (-wb * eb - shift) // unit + 1, -((shift - wa * ea) // unit) - 1  # every m*unit in the window
    if m_hi - m_lo > 64:
        return False  # undecided: rows much wider than their stride (a view's own rows overlap)
    for m in range(m_lo, m_hi + 1):  # is m = di*k + dj for some |di| <= di_max, |dj| <= dj_max?
        if max(-di_max, -((dj_max - m) // k)) <= min(di_max, (m + dj_max) // k):
            return True
    return False


def check_disjoint(**tensors) -> None:
    """Refuse caches the call writes that share memory (``views_overlap``; None entries skipped): a write to one
    would overwrite the other's values. Not while compiling (no data pointers)."""
    if torch.compiler.is_compiling():
        return
    items = [(name, t) for name, t in tensors.items() if t is not None]
    for i, (name_a, a) in enumerate(items):
        for name_b, b in items[i + 1:]:
            if views_overlap(a, b):
                raise ValueError(f"{name_a} and {name_b} share memory (views of one buffer whose columns overlap): a "
                                 f"write to one would overwrite the other; give each its own columns or memory")


def _numpy_bool(kind: type) -> bool:
    """``kind`` is numpy's bool scalar type (``numpy.bool_``, named "bool" in numpy 2)."""
    return kind.__module__ == "numpy" and kind.__name__ in ("bool_", "bool")


def check_flag(name: str, value) -> bool:
    """A switch such as ``causal``: a bool (or numpy bool); ``None`` or a string is refused, not read as truthy."""
    if value is True or value is False:
        return value
    kind = type(value)
    if _numpy_bool(kind):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {kind.__module__}.{kind.__name__}"
                    if kind.__module__ != "builtins" else f"{name} must be a bool, got {kind.__name__}")


def as_float(name: str, value, requirement: str) -> float:
    """A real number (float, int, numpy scalars; not bool) as a float; an int past float's range is refused with
    ``f"{name} {requirement}"``, the caller's own wording of its bound."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:  # (float() raised it, naming nothing)
        raise ValueError(f"{name} {requirement}, got an int of {value.bit_length()} bits") from None


def check_scale(name: str, value) -> float:
    """A softmax scale as a float: positive, with ``value * log2(e)`` finite in float32 (the kernels fold it into
    their scores so). Scores times the scale must also stay below float32's largest value / log2(e), about 2.36e38
    (not float32's own limit: the kernels hold scores in log2 units), as in any float32 attention: a larger one is
    inf there and its row NaN (inf - inf), which no check before the kernels can see; the PyTorch path and the
    references, in natural units, still give such a row's softmax. A score below minus that bound is -inf there:
    it loses its weight, 0 after rounding anyway beside any other key's, but a row whose every score is that low
    gives zeros and lse -inf, as a row without keys."""
    value = as_float(name, value, "must be positive and finite")
    if not 0.0 < value < MAX_SCALE:
        raise ValueError(f"{name} must be positive and finite, and small enough that {name} * log2(e), the kernels' "
                         f"float32 score scale, is finite, got {value}")
    return value


LOG2E = 1.4426950408889634
MAX_SCALE = 3.4028234663852886e38 / LOG2E  # past it the kernels' float32 score scale, softmax_scale * log2(e), is inf


class ForkSafeLock:
    """A lock (``factory``: ``threading.Lock`` or ``RLock``) that a forked child makes anew. A child forked while
    another thread held it has no such thread: the lock it inherited would never be released, and its first use
    would hang (DataLoader workers forked beside a busy thread). For module-level locks: the fork hook keeps the
    object for the life of the process."""

    def __init__(self, factory=threading.Lock):
        self._factory, self._lock = factory, factory()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._renew)

    def _renew(self) -> None:
        self._lock = self._factory()

    def __enter__(self):
        return self._lock.__enter__()

    def __exit__(self, *exc):
        return self._lock.__exit__(*exc)


def pin_host(device: torch.device) -> bool:
    """Whether a host tensor made to be copied to ``device`` is pinned: on a GPU, except while a CUDA graph is being
    captured (``to_device`` then copies nothing from the host)."""
    return device.type == "cuda" and not torch.cuda.is_current_stream_capturing()


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host``, a CPU tensor of integers made for this copy (pinned as ``pin_host`` says), on ``device`` without
    waiting for the device. While a CUDA graph is being captured its values are written by device operations
    instead (``written_on_device``): a captured copy would read the host memory again at every replay, torch 2.11
    refuses to capture a copy from pageable memory, and allocating pinned memory is an API call that a capture in
    torch's default ("global") mode prohibits."""
    if device.type == "cpu":
        return host
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return written_on_device(host, device)
    return host.to(device, non_blocking=True)


def progressions(values: list[int]) -> list[tuple[int, int, int, int]]:
    """``values`` as maximal runs in arithmetic progression, left to right: ``(start, count, first, step)`` with
    ``values[start + k] == first + k * step`` for ``k < count``; every run of two or more elements is as long as it
    can be (a lone value is a run of one, step 0)."""
    runs, i, n = [], 0, len(values)
    while i < n:
        if i + 1 == n:
            runs.append((i, 1, values[i], 0))
            break
        step, j = values[i + 1] - values[i], i + 1
        while j + 1 < n and values[j + 1] - values[j] == step:
            j += 1
        runs.append((i, j - i + 1, values[i], step))
        i = j + 1
    return runs


def written_on_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host``'s integer values in a new tensor on ``device``, written by device operations whose launch arguments
    carry the values (``to_device`` during a CUDA graph capture): a constant run is one ``fill_``, a run of two
    two, a longer arithmetic run (consecutive pages, sequence ids) an ``arange`` scaled and shifted (its step fits
    int64 where three values in progression do; two extreme values' difference may not). No host memory is read."""
    out = torch.empty(host.shape, dtype=host.dtype, device=device)
    flat = out.view(-1)
    for start, count, first, step in progressions(host.reshape(-1).tolist()):
        part = flat[start:start + count]
        if step == 0:
            part.fill_(first)
        elif count == 2:
            part[0].fill_(first)
            part[1].fill_(first + step)
        else:
            part.copy_(torch.arange(count, dtype=torch.int64, device=device).mul_(step).add_(first))
    return out


def check_has_data(name: str, t: torch.Tensor) -> None:
    """Refuse a tensor on the ``meta`` device where the call would compute on it (the PyTorch path, value checks):
    meta tensors hold no data. (Under torch.compile, fake tensors go through the custom ops' fake implementations
    instead.)"""
    if t.device.type == "meta" and not use_triton(t):
        raise ValueError(f"{name} is on the meta device, which holds no data: mla_kernels computes on real tensors "
                         "(for shapes alone, trace with torch.compile, whose fake tensors the custom ops serve)")


def _traced_numpy_integer(value) -> int | None:
    """``_integer`` of a numpy scalar under torch.compile, where dynamo traces it as a 0-d ndarray. ``operator.index``
    on that does not trace on torch 2.8 to 2.11 ("unsupported index(Tensor)") nor on 2.15 ("torch.* op returned
    non-Tensor"), and its ``.dtype`` on none of them ("Unsupported ndarray attribute access"); the dtype of
    ``torch.as_tensor`` of it and ``int()`` of it trace on every torch measured (2.6, 2.8, 2.11, 2.13, 2.15). So a
    numpy float, complex or bool is refused here as it is eagerly, not truncated by ``int()`` (as it was before 2.12).
    Only a numpy int64 gives a usable int there: ``int()`` of a narrower one is data-dependent to dynamo, which then
    fails at the first comparison, on those versions as with ``operator.index``."""
    dtype = torch.as_tensor(value).dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        return None
    return int(value)


def _integer(value) -> int | None:
    """``value`` as a Python int if it is an integer (numpy's too, anything with ``__index__``; not a bool), else
    None: what every int argument of the library takes."""
    kind = type(value)
    if kind is int:
        return value
    if kind.__module__ == "numpy" and torch.compiler.is_compiling():
        return _traced_numpy_integer(value)
    # (numpy before 2.3 gives a numpy bool an __index__; and no try/except for a value without one, a float say:
    # torch 2.6's dynamo turned the TypeError inside it into an InternalTorchDynamoError. The value's own hasattr,
    # not its type's: dynamo traces a numpy int as an ndarray, and cannot trace hasattr on that type)
    if isinstance(value, bool) or _numpy_bool(kind) or not hasattr(value, "__index__"):
        return None
    if isinstance(value, torch.Tensor) and value.dtype == torch.bool:  # its __index__ gives 0 or 1, as numpy's bool
        return None
    try:
        return operator.index(value)
    except TypeError:  # an __index__ that refuses (a tensor of several elements, or of floats)
        return None


def as_int(name: str, value) -> int:
    """``value`` as a Python int (``_integer``), or a ``TypeError`` naming ``name``. Callers keep the returned int,
    not the argument (a numpy int's arithmetic wraps at 64 bits where Python's does not)."""
    result = _integer(value)
    if result is None:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return result


def check_size(name: str, value, minimum: int = 1) -> int:
    """A size or index as a Python int (``as_int``) >= ``minimum``; a ``TypeError`` (not an integer) or
    ``ValueError`` (too small) naming ``name`` otherwise."""
    value = as_int(name, value)
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def check_int(name: str, value, minimum: int, *, none_ok: bool = True):
    """``value`` as a Python int >= ``minimum`` (``_integer``), None as None where ``none_ok``; a ``ValueError``
    naming ``name`` otherwise."""
    if value is None and none_ok:
        return None
    result = _integer(value)
    if result is None or result < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return result


def int_list(name: str, values: list | tuple, *, tensors: bool = True) -> list:
    """``values`` (a list or tuple) as a list of Python ints (``as_int``; a ``TypeError`` naming ``name[i]``). A list
    of Python ints is returned as it is, after one type check each. ``tensors=False`` refuses a tensor entry (host
    lengths: reading a GPU tensor's value synchronises with the GPU, which they are given to avoid)."""
    if all(type(v) is int for v in values):
        return values if isinstance(values, list) else list(values)
    if not tensors:
        for i, v in enumerate(values):
            if isinstance(v, torch.Tensor):
                raise TypeError(f"{name}[{i}] must be an int, got a tensor (pass the host's ints, not list(tensor))")
    return [as_int(f"{name}[{i}]", v) for i, v in enumerate(values)]


def as_list(name: str, values, what: str = "one entry per sequence") -> list:
    """``values`` (any iterable but a string) as a list, or a TypeError naming ``name`` and saying ``what`` it holds.
    A string is refused, not split: ``seq_ids="req-1"`` read as the ids 'r', 'e', 'q', ... (one string id is a
    documented kind of id, so that named other sequences, or reserved slots for them)."""
    if not isinstance(values, Iterable) or isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a sequence ({what}), got {type(values).__name__}")
    return list(values)


def check_paged_cache(kv_cache, pe_cache, block_table, batch: int, batch_from: str, kv_scale=None):
    """Validate ``kv_cache [N, page, R]``, ``pe_cache [N, page, P]``, ``block_table [B, max_blocks]``
    (and ``kv_scale [N, page, R/128]`` for an fp8 ``kv_cache``, see ``check_kv_scale``); ``batch_from`` names the
    argument that set ``batch``, for the message of a block table of another batch.

    Returns ``(R, P, page_size)``.
    """
    check_tensor("kv_cache", kv_cache, 3, FLOAT_DTYPES + FP8_DTYPES)
    check_tensor("pe_cache", pe_cache, 3, FLOAT_DTYPES)
    check_tensor("block_table", block_table, 2, INDEX_DTYPES)
    if check_kv_scale(kv_cache, kv_scale) is None:
        check_same("kv_cache", kv_cache.dtype, "pe_cache", pe_cache.dtype, "dtype")
    check_same("kv_cache", tuple(kv_cache.shape[:2]), "pe_cache", tuple(pe_cache.shape[:2]), "[num_blocks, block_size]")
    check_last_contiguous("kv_cache", kv_cache)
    check_last_contiguous("pe_cache", pe_cache)
    if kv_cache.shape[0] == 0 or kv_cache.shape[1] == 0:
        raise ValueError(f"kv_cache must hold at least one block of at least one token, got shape {tuple(kv_cache.shape)}")
    check_same("block_table", block_table.shape[0], batch_from, batch, "batch size")
    check_last_contiguous("block_table", block_table)
    return kv_cache.shape[2], pe_cache.shape[2], kv_cache.shape[1]


def check_kv_scale(kv_cache: torch.Tensor, kv_scale) -> torch.Tensor | None:
    """An fp8 ``kv_cache [N, page, R]`` needs ``kv_scale [N, page, R / FP8_GROUP]`` float32 (R a multiple of
    FP8_GROUP); any other cache takes no ``kv_scale``. Returns ``kv_scale`` (None for a non-fp8 cache)."""
    if kv_cache.dtype not in FP8_DTYPES:
        if kv_scale is not None:
            raise ValueError(f"kv_scale is only for a float8_e4m3fn kv_cache, but kv_cache is "
                             f"{str(kv_cache.dtype).replace('torch.', '')}; pass kv_scale=None")
        return None
    if kv_scale is None:
        raise ValueError("kv_cache is float8_e4m3fn: pass its scales, kv_scale [num_blocks, block_size, R/128] float32")
    check_tensor("kv_scale", kv_scale, 3, (torch.float32,))
    r = kv_cache.shape[2]
    if r % FP8_GROUP:
        raise ValueError(f"kv_cache: an fp8 latent needs R a multiple of {FP8_GROUP} (one scale per {FP8_GROUP} "
                         f"values), got R={r}")
    check_same("kv_scale", tuple(kv_scale.shape), "kv_cache", (*kv_cache.shape[:2], r // FP8_GROUP),
               "shape [num_blocks, block_size, R/128]")
    check_last_contiguous("kv_scale", kv_scale)
    return kv_scale


def cache_compute_dtype(kv_cache: torch.Tensor, pe_cache: torch.Tensor) -> tuple[str, torch.dtype]:
    """The dtype queries must have for this cache, and the argument that sets it: kv_cache's, or for an fp8
    latent the rope key's (the latent is dequantized to it)."""
    if kv_cache.dtype in FP8_DTYPES:
        return "pe_cache", pe_cache.dtype
    return "kv_cache", kv_cache.dtype
