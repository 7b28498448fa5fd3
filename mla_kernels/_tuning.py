"""Per-GPU kernel configs: ``mla_kernels/configs/<device-slug>.json``, loaded once per device.

A file holds ``device``, ``vendor`` ("cuda" or "hip"), ``sm_count``, ``triton``, ``torch``, ``date``, ``commit``,
``source`` and ``kernels``: per kernel a table from shape-class key to config. A file is *stale* when its
triton MAJOR version differs from the installed one, or its vendor differs from the running backend: then
one warning and the heuristics (``decode._config`` / ``prefill._expanded_config``), never a crash.
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
    try:
        data = json.loads(Path(path).read_text())
        kernels = data["kernels"]
        if not isinstance(kernels, dict):
            raise ValueError("'kernels' is not a table")
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
    return kernels


@functools.lru_cache(maxsize=None)
def _device_table(device_index: int) -> dict | None:
    import torch
    import triton
    name = torch.cuda.get_device_name(device_index)
    vendor = "hip" if getattr(torch.version, "hip", None) else "cuda"
    return load_file(CONFIG_DIR / f"{device_slug(name)}.json", vendor, triton.__version__)


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
