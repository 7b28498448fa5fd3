"""Per-GPU kernel configs: ``mla_kernels/configs/<device-slug>.json``, loaded once per device.

A file holds ``device``, ``vendor`` ("cuda" or "hip"), ``sm_count``, ``triton``, ``torch``, ``date``, ``commit``,
``source`` and ``kernels``: per kernel a table from shape-class key to config. A file is *stale* when its
triton MAJOR version differs from the installed one, or its vendor differs from the running backend: then
one warning and the heuristics (``decode._config`` / ``prefill._expanded_heuristic``), never a crash. A GPU with
no file at all (neither shipped nor the user's) gets the heuristics with one warning per device.
``constants`` holds measured numbers other code reads (``constant``), e.g. prefill's cost-model
constants (``_prefill_cost.NAMES``).
``save_file`` writes or updates a file (``bench.autotune`` and calibration runs use it).

Shape classes (the keys of a kernel's table) hold only what changes the best config: the widths and a bucket of
the rows or tokens a program sees, never per-call lengths (``decode_class``, ``prefill_class``, ``expanded_class``,
``write_cache_class``). A user's own file, ``user_file`` (``$XDG_CACHE_HOME/mla_kernels/<device-slug>.json``,
``mla_kernels.autotune`` writes it), overrides the shipped one per shape class (an entry no kernel can launch does
not: the shipped config of its class is kept, with one warning). ``lookup`` returns a ``Tuned``
dict; a launch that gets one hands a failure to ``drop_on_compile_error``: a stored config that fails to compile is
dropped with one warning and the launch retried with the heuristic. With ``MLA_KERNELS_AUTOTUNE=1`` (read at lookup
time) a shape class with no stored config is tuned once on first use and cached in the user's file.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import warnings
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"


def device_slug(name: str) -> str:
    """"NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"; "gpu" for a name of no letter or digit (not ".json")."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def _bucket(n: int, name: str, bounds) -> str:
    for bound in bounds:
        if n <= bound:
            return f"{name}<={bound}"
    return f"{name}>{bounds[-1]}"


DECODE_ROWS = (16, 32, 64)  # rows of one sequence (S_q x H) a decode program's BLOCK_M covers: the tile choice
PREFILL_ROWS = (256, 4096)  # absorbed prefill: rows (new tokens x heads) of the longest sequence
EXPANDED_NEW = (64, 1024)  # expanded prefill: new tokens of the longest sequence (the BLOCK_M of one head)
WRITE_TOKENS = (256,)  # write_cache: a decode step's tokens, or a prompt's


_FP32 = "/fp32"


def _wide(elem_bytes: int) -> str:
    """A class key's suffix for 4-byte (fp32) tensors: their tiles take twice the shared memory and their dots
    other instructions, so their winners are kept apart from the 2-byte dtypes' (bf16 and fp16 share a class: the
    same tiles fit, and tuning one dtype replaced the other's winners when every dtype shared one)."""
    return "" if elem_bytes <= 2 else _FP32


def decode_class(rows_per_seq: int, d_latent: int = 512, elem_bytes: int = 2) -> str:
    """Shape class of a decode launch: the latent width and the rows per sequence (S_q x H, the kernel flattens
    them) change the best tiles, and the query's element size (``_wide``); batch, context and page size are the
    benchmark cases within a class (the page size cannot be a key: ``mla_decode_metadata`` picks tiles without
    it)."""
    return f"R{d_latent}/" + _bucket(rows_per_seq, "rows", DECODE_ROWS) + _wide(elem_bytes)


def prefill_class(max_seqlen_q: int, heads: int, d_latent: int = 512, elem_bytes: int = 2) -> str:
    """Shape class of an absorbed prefill launch (decode's kernel over ragged rows)."""
    return f"R{d_latent}/" + _bucket(max_seqlen_q * heads, "rows", PREFILL_ROWS) + _wide(elem_bytes)


def expanded_class(max_seqlen_q: int, d_nope: int = 128, d_v: int = 128, elem_bytes: int = 2) -> str:
    """Shape class of an expanded prefill launch: per-head widths and the longest sequence's new tokens."""
    return f"N{d_nope}/V{d_v}/" + _bucket(max_seqlen_q, "new", EXPANDED_NEW) + _wide(elem_bytes)


def write_cache_class(num_tokens: int, d_latent: int = 512, fp8: bool = False, elem_bytes: int = 2) -> str:
    """Shape class of a write_cache launch: width, fp8 quantization, decode step or prompt, the new tokens'
    element size."""
    return f"R{d_latent}/" + ("fp8/" if fp8 else "") + _bucket(num_tokens, "tokens", WRITE_TOKENS) + _wide(elem_bytes)


def class_elem_bytes(shape_class: str) -> int:
    """The element size a class key stands for (``_wide``): 4 for an fp32 class, else 2."""
    return 4 if shape_class.endswith(_FP32) else 2


def _two_byte_class(shape_class: str) -> str | None:
    """The 2-byte class an fp32 class (``_wide``) falls back to (``lookup``, ``dropped``); None for any other."""
    return shape_class[:-len(_FP32)] if shape_class.endswith(_FP32) else None


_warned: set = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def load_file(path: Path, vendor: str, triton_version: str) -> dict | None:
    """The file's ``kernels`` table, or None: silently if missing (most GPUs have no file), with one warning if
    corrupt or stale."""
    data = load_data(path, vendor, triton_version)
    return None if data is None else data["kernels"]


def load_data(path: Path, vendor: str, triton_version: str) -> dict | None:
    """The whole file (``kernels``, ``constants`` -- {} when absent -- and its metadata), or None: silently if
    missing, with one warning if corrupt or stale."""
    try:
        data = json.loads(Path(path).read_text())
        kernels = data["kernels"]
        if not isinstance(kernels, dict):
            raise ValueError("'kernels' is not a table")
        data.setdefault("constants", {})
        if not isinstance(data["constants"], dict):
            raise ValueError("'constants' is not a table")
    except (FileNotFoundError, NotADirectoryError):  # missing (a parent that is a file: missing too)
        return None
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:  # RecursionError: nested too deep
        _warn_once(f"mla_kernels: ignoring config file {path} ({exc!r:.200}); using the built-in heuristics")
        return None
    if data.get("vendor") != vendor:
        _warn_once(f"mla_kernels: config file {path} is for vendor {data.get('vendor')!r}, not {vendor!r}; "
                   "using the built-in heuristics")
        return None
    if str(data.get("triton", "")).split(".")[0] != triton_version.split(".")[0]:
        _warn_once(f"mla_kernels: config file {path} was tuned with triton {data.get('triton')}, "
                   f"installed is {triton_version}; using the built-in heuristics")
        return None
    bad = [kernel for kernel, table in data["kernels"].items() if not isinstance(table, dict)]
    if bad:  # a kernel's table must map shape classes to configs (each config is checked when looked up)
        _warn_once(f"mla_kernels: config file {path}: ignoring the tables of {bad}, which are not tables; "
                   "the built-in heuristics serve those kernels")
        data["kernels"] = {k: v for k, v in data["kernels"].items() if k not in bad}
    bad = [name for name, value in data["constants"].items() if not _valid_constant(name, value)]
    if bad:  # a measured number that is none (a string, 0, inf) broke the code that reads it (prefill's path choice)
        _warn_once(f"mla_kernels: config file {path}: ignoring the constants {bad}, which are not numbers > 0; "
                   "the built-in defaults serve them")
        data["constants"] = {k: v for k, v in data["constants"].items() if k not in bad}
    return data


def _valid_constant(name: str, value) -> bool:
    """A measured constant is a finite number > 0, as a float too (an int of 400 digits is valid JSON, and
    ``float`` of it overflows where the constant is used); a ``..._source`` entry (where the numbers came from) a
    string."""
    if name.endswith("_source"):
        return isinstance(value, str)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return 0 < float(value) < float("inf")
    except OverflowError:
        return False


# What a stored config may hold, per kernel: (required keys, optional keys). Tiles are powers of two (tl.arange and
# tl.dot need them; tl.dot at least 16), warps a power of two, stages a small count; anything else (a typo, a list,
# a string, a bool, a zero or negative size) is not a config this library can launch: ``lookup`` drops it.
_LAUNCH_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
# decode._launch reads them: the split-count knob, the Hopper kernels, the portable kernel's evict-first cache loads
_ATTN_OPTIONAL = ("waves", "TMA", "GLUON", "EVICT")
CONFIG_KEYS = {"decode": (_LAUNCH_KEYS, _ATTN_OPTIONAL), "prefill": (_LAUNCH_KEYS, _ATTN_OPTIONAL),
               "expanded": (_LAUNCH_KEYS, ()), "write_cache": (("BLOCK_T", "num_warps"), ())}


def _int_in(value, lo: int, hi: int, pow2: bool = False) -> bool:
    return (type(value) is int and lo <= value <= hi and (not pow2 or value & (value - 1) == 0))


def config_error(kernel: str, cfg) -> str | None:
    """Why ``cfg`` cannot be a stored config of ``kernel`` (None: it can). Kernels this version does not know are
    not checked (their tables are never looked up)."""
    if kernel not in CONFIG_KEYS:
        return None
    if not isinstance(cfg, dict):
        return f"not a table: {cfg!r}"
    required, optional = CONFIG_KEYS[kernel]
    missing = [k for k in required if k not in cfg]
    unknown = [k for k in cfg if k not in required + optional]
    if missing or unknown:
        return f"{'missing ' + str(missing) if missing else ''}{' ' if missing and unknown else ''}" \
               f"{'unknown ' + str(unknown) if unknown else ''}"
    checks = {"BLOCK_M": (16, 1024, True), "BLOCK_N": (16, 1024, True), "BLOCK_T": (1, 1024, True),
              "num_warps": (1, 32, True), "num_stages": (0, 8, False), "waves": (1, 128, False)}
    for key, value in cfg.items():
        if key in ("TMA", "GLUON", "EVICT"):
            if type(value) is not bool:
                return f"{key} must be true or false, got {value!r}"
        elif not _int_in(value, *checks[key]):
            lo, hi, pow2 = checks[key]
            return f"{key} must be {'a power of two' if pow2 else 'an integer'} from {lo} to {hi}, got {value!r}"
    return None


def vendor() -> str:
    """The running GPU backend's vendor key: "hip" (ROCm builds of torch) or "cuda"."""
    import torch
    return "hip" if getattr(torch.version, "hip", None) else "cuda"


def _device_name(device_index: int) -> str:
    import torch
    return torch.cuda.get_device_name(device_index)


def device_file(device_index: int = 0) -> Path:
    """Where the shipped config file of this GPU lives (it may not exist)."""
    return CONFIG_DIR / f"{device_slug(_device_name(device_index))}.json"


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/mla_kernels``, else ``~/.cache/mla_kernels``: where ``mla_kernels.autotune`` writes. A
    relative ``XDG_CACHE_HOME`` is ignored, as the XDG spec says (it named a folder under whatever the current
    directory was)."""
    base = os.environ.get("XDG_CACHE_HOME")
    if not base or not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mla_kernels"


def user_file(device_index: int = 0) -> Path:
    """This GPU's file in the user's cache directory (it may not exist); it overrides the shipped one."""
    return user_cache_dir() / f"{device_slug(_device_name(device_index))}.json"


def _merge(base: dict | None, kernels: dict | None, constants: dict | None) -> tuple[dict, dict]:
    """``base``'s kernel tables and constants (copies) updated per shape class and per name by the others."""
    merged = {k: dict(v) for k, v in (base or {}).get("kernels", {}).items()}
    for kernel, table in (kernels or {}).items():
        merged.setdefault(kernel, {}).update(table)
    return merged, dict((base or {}).get("constants", {}), **(constants or {}))


def _overrides(user: dict, shipped: dict, path: Path) -> dict:
    """The user's kernel tables less the invalid entries that would hide a shipped config of their class (one
    warning each): the shipped config runs there, not the heuristic. Invalid entries of other classes are kept for
    ``lookup`` to drop, as in a file of its own."""
    kept = {}
    for kernel, table in user.items():
        kept[kernel] = {}
        for shape_class, cfg in table.items():
            why = config_error(kernel, cfg) if shape_class in shipped.get(kernel, {}) else None
            if why is None:
                kept[kernel][shape_class] = cfg
            else:
                _warn_once(f"mla_kernels: config file {path}: ignoring the {kernel} config for {shape_class} ({why}); "
                           "using the shipped one")
    return kept


# how the one warning for a GPU with no file at all begins (a sweep, which is what it advises, silences it)
NO_FILE_WARNING = "mla_kernels: no tuned configs"


@functools.lru_cache(maxsize=None)
def _device_data(device_index: int) -> dict | None:
    """The shipped file merged with the user's (the user's configs and constants win per shape class / name)."""
    import triton
    try:
        paths = device_file(device_index), user_file(device_index)
    except (RuntimeError, AssertionError):  # no such GPU (e.g. a CPU-only torch asked about "cuda")
        return None
    shipped = load_data(paths[0], vendor(), triton.__version__)
    user = load_data(paths[1], vendor(), triton.__version__)
    if shipped is None and user is None and not any(p.exists() for p in paths) \
            and not autotune_on():
        # no file for this GPU (a corrupt or stale one has warned already): once, as vLLM says of its fused-MoE configs
        _warn_once(f"{NO_FILE_WARNING} for this GPU ({_device_name(device_index)!r}: neither {paths[0]} "
                   f"nor {paths[1]} exists); using the built-in heuristics. `python -m bench.autotune` tunes it, "
                   f"or {AUTOTUNE_ENV}=1 at first use")
    if user is None or shipped is None:
        return user if user is not None else shipped
    kernels, constants = _merge(shipped, _overrides(user["kernels"], shipped["kernels"], paths[1]), user["constants"])
    return dict(shipped, kernels=kernels, constants=constants, user_source=user.get("source"))


def _gpu_index(device) -> int | None:
    """The GPU index of ``device``, or None for anything that reads no config file (the CPU, the interpreter)."""
    if getattr(device, "type", None) != "cuda":
        return None
    if device.index is not None:
        return device.index
    import torch
    return torch.cuda.current_device()  # "cuda" without an index: the current GPU, where the call would launch


def reload() -> None:
    """Forget the loaded files (after one was written): the next lookup reads them again. A config dropped for
    failing to compile stays dropped in this process (``lookup`` skips it if the file still holds it; another
    config stored for its class since is used): mla_kernels.autotune, a sweep and MLA_KERNELS_AUTOTUNE=1 all reload,
    and forgetting a drop compiled the broken config again and refused the schedules built for the fallback."""
    _device_data.cache_clear()


def _device_table(device_index: int) -> dict | None:
    data = _device_data(device_index)
    return None if data is None else data["kernels"]


def constant(name: str, device) -> float | None:
    """A measured constant (``constants`` table) of ``device``'s file, or None (the caller's default).
    CPU devices always get None."""
    index = _gpu_index(device)
    if index is None:
        return None
    data = _device_data(index)
    return None if data is None else data["constants"].get(name)


def save_file(path: Path, *, device: str, sm_count: int, source: str, kernels: dict | None = None,
              constants: dict | None = None, vendor_key: str | None = None) -> dict:
    """Write ``path``, merging into what is there (same vendor and triton major): ``kernels`` tables are updated
    per kernel and shape class, ``constants`` per name; the metadata (versions, date, git commit, source) is
    rewritten; other writers of the folder wait (``_locked``), and readers see the old file or the new one. Returns
    the data written."""
    vendor_key = vendor_key or vendor()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.parent):  # read, merge and replace as one step against other writers of the folder
        return _merge_and_replace(path, vendor_key, device, sm_count, source, kernels, constants)


@contextlib.contextmanager
def _locked(folder: Path):
    """An exclusive lock on ``folder`` (POSIX ``flock`` on its descriptor; nothing where there is no ``fcntl``)
    while a file in it is merged and replaced: two processes saving into one file (the ranks of a tensor-parallel
    server, each tuning on first use) each merged into the same old file, and the later replace dropped the
    earlier's classes (15 of 30 classes kept, measured with two writers). Closing the descriptor releases it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _merge_and_replace(path: Path, vendor_key: str, device: str, sm_count: int, source: str, kernels, constants):
    """``save_file``'s work, under its lock."""
    import datetime
    import subprocess

    import torch
    import triton

    old = load_data(path, vendor_key, triton.__version__) if path.exists() else None
    merged_kernels, merged_constants = _merge(old, kernels, constants)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    # a copy of the tree without its .git (a GPU machine's): the commit the caller names (bench/gpu_session.sh)
    commit = commit or os.environ.get("MLA_COMMIT") or None
    data = dict(device=device, vendor=vendor_key, sm_count=sm_count, triton=triton.__version__,
                torch=torch.__version__, date=datetime.date.today().isoformat(), commit=commit, source=source,
                kernels=merged_kernels, constants=merged_constants)
    # a new file renamed over the old one: a reader (another process of a tensor-parallel server, tuning on first use
    # too) sees the old file or the new, never a truncated one (which it would warn about and ignore, and a writer
    # merging into it would drop every class it held)
    import tempfile
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=2) + "\n")
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)  # mkstemp's is 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return data


AUTOTUNE_ENV = "MLA_KERNELS_AUTOTUNE"
_OFF = ("", "0", "false", "no", "off")  # values of AUTOTUNE_ENV that leave it off (anything else turns it on)


def autotune_on() -> bool:
    """Whether ``MLA_KERNELS_AUTOTUNE`` asks for on-demand tuning (any value but those of ``_OFF``)."""
    return os.environ.get(AUTOTUNE_ENV, "0").strip().lower() not in _OFF


class Tuned(dict):
    """A config from a file (``lookup``): a dict that remembers where it came from, so a launch that fails to
    compile it can drop it (``drop_on_compile_error``). ``stored`` is the file's entry as it was read: a launch may
    shrink the config to fit shared memory (``_utils.fit_tiles`` copies it, attributes included), and ``lookup`` must
    still recognise the entry that was dropped when the file is read again."""

    def __init__(self, cfg: dict, kernel: str, shape_class: str, device_index: int):
        super().__init__(cfg)
        self.kernel, self.shape_class, self.device_index = kernel, shape_class, device_index
        self.stored = dict(cfg)


def lookup(kernel: str, shape_class: str, device, tune: bool = True) -> Tuned | None:
    """The stored config for ``kernel`` at ``shape_class`` on ``device``, or None (use the heuristic).
    CPU devices (interpreter) always get None. One dict lookup after the first call per device; with
    ``MLA_KERNELS_AUTOTUNE=1`` a missing class is tuned once first (``_tune_missing``), unless ``tune`` is False (a
    question about a launch that may not happen, as the prefill cost model's about the expanded kernel's tiles).
    An fp32 class (``_wide``) with nothing of its own takes its 2-byte class's config, as launches did before fp32
    had classes (the caller fits it to shared memory, as any config; should it fail to compile, that config is
    dropped for both), and is tuned on demand only where neither is stored; once its own config is dropped it gets
    the heuristic, as the drop's warning says."""
    index = _gpu_index(device)
    if index is None:
        return None
    cfg = _stored(kernel, shape_class, index)
    narrow = _two_byte_class(shape_class)
    if cfg is None and narrow is not None and (index, kernel, shape_class) not in _dropped:
        cfg = _stored(kernel, narrow, index)  # (not after its own was dropped: the heuristic)
    if cfg is None and tune and autotune_on():
        tuned = _tune_missing(kernel, shape_class, index)
        if tuned is not None:
            cfg = _tuned_here[(index, kernel, shape_class)] = Tuned(tuned, kernel, shape_class, index)
    return cfg


def _stored(kernel: str, shape_class: str, index: int) -> Tuned | None:
    """``lookup``'s config of one class: this process's own on-demand winner, before any file (shared:
    ``_tuned_here``'s comment), else the files' entry (checked once, kept as a ``Tuned``), else None."""
    if _tuned_here:
        own = _tuned_here.get((index, kernel, shape_class))
        if own is not None:
            return own
    table = _device_table(index)
    cfg = table.get(kernel, {}).get(shape_class) if table is not None else None
    if type(cfg) is Tuned:  # the common case: converted by an earlier call (callers never mutate it)
        return cfg
    if cfg is not None and cfg == _dropped.get((index, kernel, shape_class), (None,))[0]:  # failed here before
        table[kernel].pop(shape_class, None)
        cfg = None
    if cfg is not None or (table is not None and shape_class in table.get(kernel, {})):
        why = config_error(kernel, cfg)
        if why is not None:  # checked once: dropped (this process only), one warning, the heuristic
            table[kernel].pop(shape_class, None)
            _warn_once(f"mla_kernels: ignoring the stored {kernel} config for {shape_class} ({why}); "
                       "using the built-in heuristics")
            cfg = None
    if cfg is None:
        return None
    cfg = Tuned(cfg, kernel, shape_class, index)
    if table is not None and shape_class in table.get(kernel, {}):
        table[kernel][shape_class] = cfg
    return cfg


_tried: set = set()
# (device index, kernel, shape class) -> the Tuned config on-demand tuning found in this process. Kept in memory, not
# read back from the file: the file is shared (another process, a tensor-parallel rank, may store its own winner of
# the same class there, by timing noise), and reading it again switched this process's tuned classes to the other's
# mid-run: a decode step's metadata, cut for this process's tiles, was then refused.
_tuned_here: dict = {}


def forget_own(device, kernel: str, shape_class: str, written) -> None:
    """Drop this process's on-demand winner of a class that a sweep (``mla_kernels.autotune``) has just stored
    anew in ``written``, where that is a file lookups read (this GPU's shipped or user file): they take the sweep's
    winner from it from then on (``lookup`` prefers ``_tuned_here``). A sweep written elsewhere changes nothing
    here."""
    index = _gpu_index(device)
    if index is None or (index, kernel, shape_class) not in _tuned_here:
        return
    try:
        read = {device_file(index).resolve(), user_file(index).resolve()}
    except (RuntimeError, AssertionError, OSError):  # (no such GPU, an unreadable folder: nothing to replace)
        return
    if Path(written).resolve() in read:
        _tuned_here.pop((index, kernel, shape_class), None)


_unwritable: set = set()  # user cache folders on-demand tuning could not write (this process): no class tries again


def _tune_missing(kernel: str, shape_class: str, device_index: int) -> dict | None:
    """``MLA_KERNELS_AUTOTUNE=1``: tune this class now (once per process, never while a graph is captured or
    traced), write the winner to the user's file and return it; None (heuristics) if that cannot be done."""
    import torch

    if (device_index, kernel, shape_class) in _tried:
        return None
    if torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        return None
    _tried.add((device_index, kernel, shape_class))
    folder = user_cache_dir()
    if folder in _unwritable:  # found by another class's attempt: this one could keep nothing either
        return None
    from . import _autotune
    try:
        cfg = _autotune.tune_on_demand(kernel, shape_class, device_index)
    except OSError as exc:  # the user's cache cannot be made or written: the same for every class, so one warning
        _unwritable.add(folder)  # (each class warned again, naming itself: a warning per shape class a model uses)
        _warn_once(f"mla_kernels: {AUTOTUNE_ENV}: cannot keep tuned configs in {folder} ({type(exc).__name__}: "
                   f"{exc}); using the built-in heuristics")
        return None
    except Exception as exc:  # tuning is an optimisation: it must never break the call that asked for it
        _warn_once(f"mla_kernels: {AUTOTUNE_ENV}: tuning {kernel} {shape_class} failed ({type(exc).__name__}: "
                   f"{exc}); using the built-in heuristics")
        return None
    return cfg  # (written to the user's file for the next process; this one keeps it in _tuned_here)


def _compile_errors() -> tuple:
    from triton.compiler.errors import CompilationError
    from triton.runtime import errors
    return (CompilationError,) + tuple(getattr(errors, n) for n in ("OutOfResources", "PTXASError")
                                       if hasattr(errors, n))


# (device index, kernel, shape class) -> (the file's entry, the config as launched: shrunk to fit, maybe) of a stored
# config dropped for failing to compile
_dropped: dict = {}


def dropped(kernel: str, shape_class: str, device) -> dict | None:
    """The stored config of ``kernel`` at ``shape_class`` on ``device`` that ``drop`` forgot in this process, if any:
    what schedules built before the drop were cut for (``decode._check_metadata`` admits them, ``decode._launch``
    cuts them again), so as launched: fitted to shared memory where the launch shrank it."""
    index = _gpu_index(device)
    entry = None if index is None else _dropped.get((index, kernel, shape_class))
    narrow = _two_byte_class(shape_class)
    if entry is None and index is not None and narrow is not None:  # an fp32 class that launched its 2-byte
        base = _dropped.get((index, kernel, narrow))                  # class's config (no file read unless that
        if base is not None and _stored(kernel, shape_class, index) is None:  # was dropped: this runs traced)
            entry = base
    return None if entry is None else entry[1]


def drop(cfg: Tuned, exc: BaseException) -> None:
    """Forget a stored config that failed to compile (this process only; the file is left alone), one warning."""
    data = _device_data(cfg.device_index)
    if data is not None:
        data["kernels"].get(cfg.kernel, {}).pop(cfg.shape_class, None)
    _tuned_here.pop((cfg.device_index, cfg.kernel, cfg.shape_class), None)
    _dropped[(cfg.device_index, cfg.kernel, cfg.shape_class)] = (cfg.stored, dict(cfg))
    _warn_once(f"mla_kernels: the stored {cfg.kernel} config {dict(cfg)} for {cfg.shape_class} failed to compile "
               f"({type(exc).__name__}: {str(exc)[:200]}); dropped, using the built-in heuristics")


def drop_on_compile_error(cfg, exc: BaseException) -> bool:
    """Whether ``exc``, raised by a launch with ``cfg``, is a stored config (a ``Tuned``) failing to compile: then
    it is dropped (``drop``) and the caller launches again with its heuristic. Compilation happens before the
    kernel runs, so nothing was written by the failed attempt. False for a heuristic config and for any other error
    (a CUDA error is not the config's fault). The callers wrap their launches in ``try``/``except`` around this
    (free in Python 3.11 when nothing is raised) and build the heuristic only after a failure: every eager call on
    a GPU with a config file takes this path, where a wrapper that re-entered the launch with the heuristic built
    ahead cost ~5 us per call (``bench.host`` on this CPU: 31.4 -> 26.4 us,
    ``bench/results/host_cpu_2026-12-06_session16*.json``)."""
    if not isinstance(cfg, Tuned):
        return False
    if not isinstance(exc, _compile_errors()) and not (isinstance(exc, RuntimeError) and "PassManager" in str(exc)):
        return False  # (a RuntimeError naming PassManager: an MLIR pass of the compiler failing)
    drop(cfg, exc)
    return True
