"""Out-of-bounds memory checks for kernels run through Triton's CPU interpreter.

On a GPU, a load or store that leaves every allocation is an illegal memory access: the CUDA context is lost and
every later call in the process fails. One masked off on the CPU but read on the GPU, or one that lands in a
neighbouring allocation, corrupts nothing the parity tests compare and can pass them all. Under the interpreter
every memory access is a NumPy array of host addresses with a mask, so each one can be checked: ``install()``
wraps the interpreter's launch to record the storages of the launch's tensor arguments (a view's whole storage:
what a kernel may legally reach through it), and its loads, stores and atomics to require every address a mask lets
through to lie, with its element, inside one of them. A violation raises ``OutOfBounds`` naming the access, the
address and the ranges, from inside the kernel (the interpreter wraps it in its ``InterpreterError``).

The storage, not the view, is the bound: the kernels take views of one ``[blocks, page, R + P]`` buffer and may
read any of it. One access's pointers all derive from one argument, so an access spanning two storages fails too.
An access wholly inside another argument's memory is not caught here (on a GPU it is no fault); the parity tests with
NaN-poisoned caches catch it where it changes a result.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np

_state = threading.local()
installed = False  # whether install() found the interpreter's hooks (test_bounds.py skips otherwise)


class OutOfBounds(AssertionError):
    """A kernel under the interpreter touched memory outside every tensor argument's storage."""


class Race(AssertionError):
    """Two programs of one launch touched the same element, one of them writing (``install(races=True)``)."""


def _ranges(args) -> tuple[np.ndarray, np.ndarray]:
    """The launch's argument storages as sorted ``(starts, ends)`` address arrays."""
    out = []

    def visit(arg):
        if isinstance(arg, (tuple, list)):
            for a in arg:
                visit(a)
            return
        base = getattr(arg, "base", None)  # a host-side TensorDescriptor: its tensor
        if base is not None and hasattr(base, "untyped_storage") and not hasattr(arg, "untyped_storage"):
            arg = base
        if hasattr(arg, "untyped_storage"):
            storage = arg.untyped_storage()
            if storage.nbytes():
                out.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))

    visit(args)
    out = sorted(out)
    return np.array([r[0] for r in out], dtype=np.uint64), np.array([r[1] for r in out], dtype=np.uint64)


def _where(ranges) -> str:
    return f"(argument storages: {', '.join(f'{int(a):#x}..{int(b):#x}' for a, b in zip(*ranges))})"


def _check(kind: str, ptrs, mask, program) -> None:
    ranges = getattr(_state, "ranges", None)
    if ranges is None:  # not inside a launch this module saw (a kernel called another way): nothing to check
        return
    addr = np.asarray(ptrs.data).astype(np.uint64, copy=False).ravel()
    if mask is not None:
        addr = addr[np.broadcast_to(np.asarray(mask.data, dtype=bool), np.shape(ptrs.data)).ravel()]
    if addr.size == 0:
        return
    size = np.uint64(max(1, ptrs.get_element_ty().primitive_bitwidth // 8))
    starts, ends = ranges
    i = np.searchsorted(starts, addr, side="right") - 1  # the last range starting at or before each address
    ok = (i >= 0) & (addr + size <= ends[np.maximum(i, 0)])
    if not ok.all():
        bad = addr[~ok]
        raise OutOfBounds(f"{kind} of {bad.size} element(s) outside every tensor argument, first at {int(bad[0]):#x} "
                          f"{_where(ranges)}")
    if (i != i[0]).any():  # one access's pointers come from one argument: spanning two, it ran off the first
        raise OutOfBounds(f"{kind} spans the storages of two tensor arguments {_where(ranges)}")
    if getattr(_state, "races", None) is not None and kind != "atomic":
        x, y, z = program
        _check_race(kind, int(i[0]), addr, x + (y << 21) + (z << 42))


def _xyz(program: int) -> tuple[int, int, int]:
    mask = (1 << 21) - 1
    return program & mask, (program >> 21) & mask, program >> 42


def _check_race(kind: str, storage: int, addr, program) -> None:
    """Programs of one launch run in any order on a GPU (the interpreter runs them one after another): an element
    one program writes must be neither written nor read by another (atomics aside)."""
    seen = _state.races.setdefault(storage, {"load": ([], []), "store": ([], [])})
    against = ("store",) if kind == "load" else ("store", "load")
    for other in against:
        addrs, programs = seen[other]
        if addrs:
            a, p = np.concatenate(addrs), np.concatenate(programs)
            hit = np.isin(a, addr) & (p != program)
            if hit.any():
                raise Race(f"program {_xyz(program)} {kind}s element {int(a[hit][0]):#x}, which program "
                           f"{_xyz(int(p[hit][0]))} of the same launch {other}s")
    seen[kind][0].append(addr)
    seen[kind][1].append(np.full(addr.shape, program, dtype=np.int64))


def install(races: bool = False) -> None:
    """Wrap the interpreter (idempotent). Only where ``TRITON_INTERPRET`` is set before triton is imported.
    ``races``: also fail an element that two programs of one launch touch, one of them writing (slow: every access
    is compared with the launch's earlier ones; run by hand, ``MLA_TEST_RACES=1 pytest tests``)."""
    from triton.runtime import interpreter as interp

    global installed
    _state.race_check = races
    if getattr(interp, "_mla_bounds_installed", False):
        return
    builder, executor = getattr(interp, "InterpreterBuilder", None), getattr(interp, "GridExecutor", None)
    hooks = [(executor, "_init_args_hst"), (executor, "_restore_args_dev"), (builder, "create_masked_load"),
             (builder, "create_masked_store")]
    missing = [name for owner, name in hooks if not hasattr(owner, name)]
    if missing:  # another triton's interpreter: run the suite without the check rather than not at all
        warnings.warn(f"tests/bounds.py: this triton's interpreter lacks {missing}; memory accesses are not checked",
                      RuntimeWarning)
        return
    interp._mla_bounds_installed = installed = True

    init_args = executor._init_args_hst

    def _init_args_hst(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        _state.ranges = _ranges([args_hst, list(kwargs_hst.values())])
        _state.races = {} if getattr(_state, "race_check", False) else None
        return args_hst, kwargs_hst

    restore = executor._restore_args_dev

    def _restore_args_dev(self, *args, **kwargs):
        _state.ranges = None
        return restore(self, *args, **kwargs)

    executor._init_args_hst = _init_args_hst
    executor._restore_args_dev = _restore_args_dev

    def wrap(name, kind, ptr_at, mask_at):
        original = getattr(builder, name)

        def checked(self, *args, **kwargs):  # the interpreter passes the pointers and mask by position
            if len(args) > max(ptr_at, mask_at or 0):  # (another triton's call shape: not checked)
                _check(kind, args[ptr_at], args[mask_at] if mask_at is not None else None, self.grid_idx)  # (x, y, z)
            return original(self, *args, **kwargs)

        setattr(builder, name, checked)

    # (self excluded) create_masked_load(ptrs, mask, other, ...), create_masked_store(ptrs, value, mask, ...);
    # create_load/create_store go through them
    wrap("create_masked_load", "load", 0, 1)
    wrap("create_masked_store", "store", 0, 2)
    if hasattr(builder, "create_atomic_rmw"):  # (rmwOp, ptr, val, mask, sem, scope)
        wrap("create_atomic_rmw", "atomic", 1, 3)
    if hasattr(builder, "create_atomic_cas"):  # (ptr, cmp, val, sem, scope)
        wrap("create_atomic_cas", "atomic", 0, None)
