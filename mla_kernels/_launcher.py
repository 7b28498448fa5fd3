"""Repeat launches of a Triton kernel without Triton's per-call binding (issue 10's host work).

``kernel[grid](*args, **kwargs)`` re-derives, on every call, what it derived on the last one: it binds the
arguments, specializes each (its type; for a tensor whether its address is 16-byte aligned; for an int whether it
is 1, a multiple of 16, or past 32 bits), hashes that into a key and looks the compiled kernel up. For the decode
kernel's 32 arguments that is 12-18 µs of Python per launch (``bench.host --jit``; ``bench/NOTES.md`` section 21),
paid per layer and per decode step in an eager model, where the GPU work of the whole call can be 20 µs.

``launch`` keeps, per kernel, the compiled kernel Triton chose for a call, under a key from which Triton's
specialization follows: each tensor's dtype and 16-byte alignment, each int's class (1, or its width and whether
it is a multiple of 16), each float's and bool's type (and a bool's value), the keyword arguments (constexprs,
``num_warps``, ``num_stages``, by value and type) and the current device. Two calls with one
key bind to one compiled kernel in Triton too, so a repeat is launched through that kernel directly, with the
arguments Triton's own ``run`` hands it (every parameter in order, constexprs included; no launch hooks). A miss
launches through Triton as before and stores what it compiled.

Where the key cannot vouch for Triton's choice, ``launch`` is plain ``kernel[grid](...)``: ROCm (its specialization
also reads tensor sizes, for buffer loads; only kernels compiled for the ``cuda`` backend are ever stored), the
interpreter and stubs (not a ``JITFunction``), a launch or pre-run hook set (profilers: they need the launch
metadata Triton builds), Triton's debug or instrumentation knobs on (they change which kernel Triton compiles), a
grid that is not a tuple, triton before 3.3 (3.2's ``run`` handed the kernel other arguments), a positional
argument of any other type (numpy scalars, Gluon's descriptors), a tensor given by keyword, and calls whose key
cannot stand for what Triton binds (``_storable``: a runtime parameter given by keyword, a constexpr given
positionally).
``MLA_KERNELS_CACHED_LAUNCH=0`` (or ``ENABLED = False`` here) turns it off. Not done on a hit, as Triton's run does
it: checking that the module globals a kernel reads are unchanged since its compile (the library's kernels read
constants only), and calling whatever wraps ``JITFunction.run`` (a tracer, a test counting launches sees only each
key's first launch; turn the cache off to see them all)."""

from __future__ import annotations

import contextlib
import os
import threading

import torch
import triton
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from . import _utils


def _triton_version() -> tuple[int, int]:
    try:
        return tuple(int(part) for part in triton.__version__.split(".")[:2])
    except ValueError:  # a dev build's odd version string: assume the old interface
        return (0, 0)


def _knobs(group: str):
    """``triton.knobs.<group>`` (``runtime`` holds the launch hooks since triton 3.4), or None."""
    try:
        from triton import knobs
        return getattr(knobs, group)
    except (ImportError, AttributeError):
        return None


_RUNTIME, _COMPILATION = _knobs("runtime"), _knobs("compilation")
_VERSION = _triton_version()
if _RUNTIME is not None and _COMPILATION is not None:  # triton 3.4+: hooks and debug in triton.knobs
    def _through_triton(kernel) -> bool:
        """What makes Triton's run do more than bind and launch: a launch hook (profilers; they read the metadata
        Triton's run builds), or an option Triton adds to the key it stores kernels under (its debug,
        instrumentation and stage-inspection knobs; entries are stored and used with all of them off; 3.9's
        fpsan_homomorphic_casts changes nothing without an "fpsan" instrumentation mode)."""
        return bool(kernel.pre_run_hooks or hooked(_RUNTIME.launch_enter_hook) or hooked(_RUNTIME.launch_exit_hook)
                    or kernel.debug or _RUNTIME.debug or getattr(_COMPILATION, "instrumentation_mode", "")
                    or getattr(_RUNTIME, "add_stages_inspection_hook", None) is not None)
    SUPPORTED = _VERSION >= (3, 4)
else:  # triton 3.3: the hooks are CompiledKernel's class attributes, debug the TRITON_DEBUG variable (read per run)
    from triton.compiler.compiler import CompiledKernel as _Compiled

    def _through_triton(kernel) -> bool:
        """As above, for triton 3.3's run."""
        return bool(kernel.pre_run_hooks or _Compiled.launch_enter_hook is not None
                    or _Compiled.launch_exit_hook is not None or kernel.debug
                    or os.environ.get("TRITON_DEBUG", "0") == "1")
    SUPPORTED = _VERSION == (3, 3)  # (3.2's run hands the kernel its non-constexpr arguments only)
SUPPORTED = SUPPORTED and torch.version.hip is None  # what switched(True) cannot override
ENABLED = SUPPORTED and os.environ.get("MLA_KERNELS_CACHED_LAUNCH", "1") != "0"
MAX_ENTRIES = 512  # per kernel; past it the kernel's entries are dropped and filled again (bounds the memory of
#                    callers whose constexprs change from call to call, as autotune sweeps do)

_Tensor = torch.Tensor
_PLAIN = frozenset((int, bool, str, type(None)))  # keyword values whose type and == say all that their text says
try:  # host-side TMA descriptors (decode_tma's launches): Triton specializes them by dtype and block shape
    from triton.tools.tensor_descriptor import TensorDescriptor as _Descriptor
except ImportError:
    _Descriptor = None
# Triton's interpreter keeps a launch's state in globals: it patches ``triton.language`` for the launch and undoes that
# at its end, and its builder holds the program ids of the launch running. Two interpreted launches at once (threads
# calling the library on CPU tensors) failed ("Did you forget to add @triton.jit?": one launch's end undid the other's
# patches) or could read each other's program ids, so interpreted launches take this lock; compiled launches (and
# stubs: bench.host times the GPU path's host work with them) don't
_INTERPRETED = _utils.ForkSafeLock(threading.RLock)  # (a child forked inside another thread's launch: a new one)
try:
    from triton.runtime.interpreter import InterpretedFunction as _Interpreted
except ImportError:  # (every triton the package admits has it)
    _Interpreted = ()

# id(kernel) -> (kernel, {(device, key): (compiled kernel, the parameters past the positional ones)}); by id, since a
# JITFunction hashes through a Python property; the kernel is held, so its id is not reused while the entry lives
_entries: dict = {}


def hooked(hook) -> bool:
    """A launch hook that does something: set and, for triton 3.5+'s ``HookChain`` (always set, often empty), with a
    function in its chain. Triton's run hands an empty chain to the launcher, which calls it with nothing to call."""
    return hook is not None and bool(getattr(hook, "calls", True))


def spec_key(args: tuple, kwargs: dict) -> tuple | None:
    """What Triton's specialization of ``args``/``kwargs`` is a function of, as a hashable tuple (None: an argument
    of a type this key does not cover). An int gives its class as Triton specializes it, not its value, so calls
    whose counts change (packed tokens, lengths) share one entry: ``"1"`` for 1 (a constexpr to Triton), else
    its width (i32 within 32 bits, i64 within 64, u64 beyond) and whether it is a multiple of 16. A tensor gives its
    dtype then whether its address is 16-byte aligned (a dtype is given by nothing else, so the flat tuple reads
    back one way); a float its type (Triton makes every float an fp32); a bool its type and value (a u1 to Triton,
    where the int 1 is a constexpr); a host TMA descriptor its base's dtype, block shape and modes. ``test_launcher``
    checks it against Triton's own specialization."""
    key = []
    append = key.append
    for a in args:
        cls = a.__class__
        if cls is int:
            if a == 1:
                append("1")
            else:  # 0/1: i32 not/divisible by 16; 2/3 i64; 4/5 past int64 (u64, or refused by Triton: never stored)
                append((0 if -0x80000000 <= a <= 0x7FFFFFFF else 2 if -0x8000000000000000 <= a <= 0x7FFFFFFFFFFFFFFF
                        else 4) + (not a & 15))
        elif cls is _Tensor:
            append(a.dtype)
            append(not a.data_ptr() & 15)
        elif cls is float:
            append(float)
        elif cls is bool:
            append((bool, a))
        elif a is None:
            append(None)
        elif isinstance(a, _Tensor):
            append(a.dtype)
            append(not a.data_ptr() & 15)
        elif cls is _Descriptor:  # (its base is 16-byte aligned by construction; the launcher encodes it per call)
            append((cls, a.base.dtype, tuple(a.block_shape), getattr(a, "padding", None),  # (3.4's have neither)
                    getattr(a, "round_f32_to_tf32", False)))
        else:
            return None
    # keyword arguments (constexprs, num_warps, ...) by value and type, and all but ints, bools, strings and None by
    # repr too: 1, True and 1.0, or 0.0 and -0.0 (floats, numpy scalars, in tuples), are equal in Python but other
    # kernels to triton 3.3 and 3.4, which key them by text; from 3.5 on one kernel, to which Triton hands each
    # call's own value, as a hit hands the value stored with its key
    types = tuple(map(type, kwargs.values()))
    if _PLAIN.issuperset(types):
        append((tuple(kwargs.items()), types))
    elif _Tensor in types or any(isinstance(v, _Tensor) for v in kwargs.values()):
        return None  # a tensor by keyword is a runtime argument by keyword: never stored (_storable), no repr taken
    else:
        append((tuple(kwargs.items()), types, tuple([repr(v) for v in kwargs.values() if v.__class__ not in _PLAIN])))
    return tuple(key)


def _tail(kernel: JITFunction, n_args: int, kwargs: dict) -> tuple:
    """The values of the parameters past the ``n_args`` positional ones, in the kernel's order, as Triton binds
    them: from ``kwargs``, else the parameter's default."""
    return tuple(kwargs[p.name] if p.name in kwargs else p.default for p in kernel.params[n_args:])


def _nvidia(compiled) -> bool:
    """A kernel Triton compiled for an NVIDIA GPU (its target's backend ``"cuda"``): the only launcher whose
    arguments this module hands over, whatever ``torch.version`` said (ROCm, or another backend's driver)."""
    target = getattr(getattr(compiled, "metadata", None), "target", None)
    return getattr(target, "backend", None) == "cuda" and hasattr(compiled, "packed_metadata")


def _storable(kernel: JITFunction, args: tuple, kwargs: dict) -> bool:
    """Whether this call's key (Triton's run has just launched it) determines what Triton chose and what it handed
    the kernel. Not when a runtime (non-constexpr) parameter came as a keyword: the key keeps keywords by value and
    type (all but ints, bools, strings and None also by repr), and the stored tail would replay the first call's
    value. Not when a constexpr came positionally, unless a bool or None: the key keeps an int's class and a float's
    type, not the value a constexpr is compiled with. Not for a kernel with ``*args`` (triton 3.9 binds them as one
    tuple)."""
    for p in kernel.params:
        param = p._param
        if param.kind is param.VAR_POSITIONAL:
            return False
        if p.is_constexpr:
            if p.num < len(args) and not (args[p.num] is None or args[p.num].__class__ is bool):
                return False
        elif p.name in kwargs:
            return False
    return True


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, launched through the compiled kernel Triton chose for an earlier call of
    the same key (module docstring)."""
    key = None
    if ENABLED and kernel.__class__ is JITFunction and grid.__class__ is tuple and not _through_triton(kernel):
        key = spec_key(args, kwargs)
    if key is not None:
        active = driver.active
        device = active.get_current_device()
        held = _entries.get(id(kernel))
        if held is None:
            held = _entries[id(kernel)] = (kernel, {})
        entries = held[1]
        try:
            hit = entries.get((device, key))
        except TypeError:  # an unhashable keyword argument: Triton's launch, nothing stored
            hit = key = None
        if hit is not None:
            compiled, tail = hit
            n = len(grid)
            compiled.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, active.get_current_stream(device),
                         compiled.function, compiled.packed_metadata, None, None, None, *args, *tail)
            return
    if isinstance(kernel, _Interpreted):  # the interpreter: one launch at a time
        with _INTERPRETED:
            kernel[grid](*args, **kwargs)
        return
    compiled = kernel[grid](*args, **kwargs)  # Triton's own launch; it hands back what it launched
    if key is not None and _nvidia(compiled) and _storable(kernel, args, kwargs):
        if len(entries) >= MAX_ENTRIES:
            entries.clear()
        entries[(device, key)] = (compiled, _tail(kernel, len(args), kwargs))


@contextlib.contextmanager
def switched(on: bool):
    """``ENABLED`` set to ``on`` inside the block (benchmarks and checks time or compare both ways), restored after;
    never on where the cached launch is not ``SUPPORTED`` (ROCm, triton before 3.3)."""
    global ENABLED
    before = ENABLED
    ENABLED = on and SUPPORTED
    try:
        yield
    finally:
        ENABLED = before


def clear() -> None:
    """Forget every stored kernel (tests; or after changing what Triton compiles, such as its environment)."""
    _entries.clear()
