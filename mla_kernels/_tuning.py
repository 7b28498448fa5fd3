"""Per-GPU kernel configs: ``mla_kernels/configs/<device-slug>.json``, loaded once per device.

A file holds ``device``, ``vendor`` ("cuda" or "hip"), ``sm_count``, ``triton``, ``torch``, ``date``, ``commit``,
``source`` and ``kernels``: per kernel a table from shape-class key to config. A file is *stale* when its
triton MAJOR version differs from the installed one, or its vendor differs from the running backend: then
one warning and the heuristics (``decode._config`` / ``prefill._expanded_config``), never a crash.
``constants`` holds measured numbers other code reads (``constant``), e.g. prefill's path-speed ratio.
``save_file`` writes or updates a file (``bench.autotune`` and calibration runs use it).
Hooked into ``decode._launch`` only (a config that fails to compile is not yet caught).
"""
from __future__ import annotations

import functools
import json
import re
import warnings
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"


def device_slug(name: str) -> str:
    """"NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def decode_class(rows_per_seq: int, d_latent: int = 512) -> str:
    """Shape class of a decode launch: the latent width and the rows per sequence change the best tiles."""
    return f"R{d_latent}/" + ("rows<=16" if rows_per_seq <= 16 else "rows>16")


_warned: set = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def load_file(path: Path, vendor: str, triton_version: str) -> dict | None:
    """The file's ``kernels`` table, or None (with one warning) if missing, corrupt or stale."""
    data = load_data(path, vendor, triton_version)
    return None if data is None else data["kernels"]


def load_data(path: Path, vendor: str, triton_version: str) -> dict | None:
    """The whole file (``kernels``, ``constants`` -- {} when absent -- and its metadata), or None (with one
    warning) if missing, corrupt or stale."""
    try:
        data = json.loads(Path(path).read_text())
        kernels = data["kernels"]
        if not isinstance(kernels, dict):
            raise ValueError("'kernels' is not a table")
        data.setdefault("constants", {})
        if not isinstance(data["constants"], dict):
            raise ValueError("'constants' is not a table")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _warn_once(f"mla_kernels: ignoring config file {path} ({exc}); using the built-in heuristics")
        return None
    if data.get("vendor") != vendor:
        _warn_once(f"mla_kernels: config file {path} is for vendor {data.get('vendor')!r}, not {vendor!r}; "
                   "using the built-in heuristics")
        return None
    if str(data.get("triton", "")).split(".")[0] != triton_version.split(".")[0]:
        _warn_once(f"mla_kernels: config file {path} was tuned with triton {data.get('triton')}, "
                   f"installed is {triton_version}; using the built-in heuristics")
        return None
    return data


def vendor() -> str:
    """The running GPU backend's vendor key: "hip" (ROCm builds of torch) or "cuda"."""
    import torch
    return "hip" if getattr(torch.version, "hip", None) else "cuda"


def device_file(device_index: int = 0) -> Path:
    """Where the shipped config file of this GPU lives (it may not exist)."""
    import torch
    return CONFIG_DIR / f"{device_slug(torch.cuda.get_device_name(device_index))}.json"


@functools.lru_cache(maxsize=None)
def _device_data(device_index: int) -> dict | None:
    import triton
    return load_data(device_file(device_index), vendor(), triton.__version__)


def _device_table(device_index: int) -> dict | None:
    data = _device_data(device_index)
    return None if data is None else data["kernels"]


def constant(name: str, device) -> float | None:
    """A measured constant (``constants`` table) of ``device``'s file, or None (the caller's default).
    CPU devices always get None."""
    if getattr(device, "type", None) != "cuda":
        return None
    data = _device_data(device.index if device.index is not None else 0)
    return None if data is None else data["constants"].get(name)


def save_file(path: Path, *, device: str, sm_count: int, source: str, kernels: dict | None = None,
              constants: dict | None = None, vendor_key: str | None = None) -> dict:
    """Write ``path``, merging into what is there (same vendor and triton major): ``kernels`` tables are updated
    per kernel and shape class, ``constants`` per name; the metadata (versions, date, git commit, source) is
    rewritten. Returns the data written."""
    import datetime
    import subprocess

    import torch
    import triton

    vendor_key = vendor_key or vendor()
    path = Path(path)
    old = load_data(path, vendor_key, triton.__version__) if path.exists() else None
    merged_kernels = {k: dict(v) for k, v in (old or {}).get("kernels", {}).items()}
    for kernel, table in (kernels or {}).items():
        merged_kernels.setdefault(kernel, {}).update(table)
    merged_constants = dict((old or {}).get("constants", {}), **(constants or {}))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    data = dict(device=device, vendor=vendor_key, sm_count=sm_count, triton=triton.__version__,
                torch=torch.__version__, date=datetime.date.today().isoformat(), commit=commit, source=source,
                kernels=merged_kernels, constants=merged_constants)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return data


def lookup(kernel: str, shape_class: str, device) -> dict | None:
    """The stored config for ``kernel`` at ``shape_class`` on ``device``, or None (use the heuristic).
    CPU devices (interpreter) always get None. One dict lookup after the first call per device."""
    if getattr(device, "type", None) != "cuda":
        return None
    table = _device_table(device.index if device.index is not None else 0)
    if table is None:
        return None
    cfg = table.get(kernel, {}).get(shape_class)
    return dict(cfg) if cfg is not None else None
