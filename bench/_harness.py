"""The one harness every benchmark uses: device, timing, roofline references, models, checks, output.

On a GPU (CUDA or ROCm) kernels are timed with ``triton.testing.do_bench`` (CUDA events, L2 flushed
before every run, warm-up excluded) or ``do_bench_cudagraph``; on a CPU with ``time.perf_counter``.
Both give a ``Timing`` with p50/p20/p80 and mean/std/min/max over the timed runs, in milliseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import importlib.metadata
import inspect
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

# correctness before timing: one check for the benchmarks and the autotune sweep (its tolerances argued there)
from mla_kernels._autotune import CHECK_RTOL, WrongResult, check_close, rel_rms_error  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------------------------------
# device
# ------------------------------------------------------------------------------------------------


def pick_device(name: str | None = None) -> torch.device:
    """``name`` ("cpu", "cuda", "cuda:1") or, when None/"auto", the GPU if there is one, else the CPU."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no GPU visible to torch (torch {torch.__version__})")
    return device


def is_cpu(device: torch.device) -> bool:
    return torch.device(device).type == "cpu"


def synchronize(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model() or platform.processor() or "cpu"


def device_slug(device: torch.device) -> str:
    """File-name form of the device: ``nvidia-h100-80gb-hbm3``, ``amd-instinct-mi300x``, ``cpu``."""
    if is_cpu(device):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-") or "gpu"


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def free_memory(device: torch.device) -> int:
    """Bytes that can still be allocated: free GPU memory, or MemAvailable on a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def fits(nbytes: int, device: torch.device, fraction: float = 0.8) -> bool:
    """Would ``nbytes`` more fit in ``fraction`` of the free memory?"""
    return nbytes <= fraction * free_memory(device)


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB"


def peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[int | None, str]:
    """Peak bytes allocated by ``fn()`` above what was allocated before it, and how it was measured.

    GPU: ``torch.cuda.max_memory_allocated``. CPU: the allocation timeline of ``torch.profiler``
    (a private API; (None, reason) if it is unavailable).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak, "torch.cuda.max_memory_allocated"
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import MemoryProfileTimeline

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            out = fn()
            del out
        _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(device)
        return max((sum(s) for s in sizes), default=0), "torch.profiler memory timeline (CPU allocator)"
    except Exception as exc:  # private API: any change in it must not stop a benchmark
        return None, f"CPU peak not measurable ({exc.__class__.__name__})"


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
    """Statistics over timed runs, in milliseconds; ``method`` says how they were taken."""

    p50: float
    p20: float
    p80: float
    mean: float
    std: float
    min: float
    max: float
    runs: int
    method: str

    @classmethod
    def from_times(cls, times_ms: Sequence[float], method: str) -> "Timing":
        t = torch.tensor(list(times_ms), dtype=torch.float64)
        p50, p20, p80 = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
        std = t.std().item() if len(t) > 1 else 0.0
        return cls(p50, p20, p80, t.mean().item(), std, t.min().item(), t.max().item(), len(t), method)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup_ms: float = 25.0, rep_ms: float = 100.0,
            cuda_graph: bool = False, min_runs: int = 5, max_runs: int = 1000) -> Timing:
    """Time ``fn()`` on ``device``.

    GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed before each run) or, with ``cuda_graph``,
    ``do_bench_cudagraph`` (launch overhead removed; falls back to do_bench if capture fails).
    CPU: ``time.perf_counter`` around each call after ``warmup_ms`` of warm-up, for about ``rep_ms``
    and between ``min_runs`` and ``max_runs`` runs.
    """
    if not is_cpu(device):
        import triton.testing

        if cuda_graph:
            try:
                times = triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="all")
                return Timing.from_times(times, "cuda-graph")
            except RuntimeError as exc:
                print(f"CUDA graph capture failed ({exc.__class__.__name__}: {str(exc)[:120]}); "
                      "timing without graphs", file=sys.stderr)
                torch.cuda.synchronize(device)
        times = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
        return Timing.from_times(times, "cuda-events")

    start = time.perf_counter()
    fn()
    estimate_ms = max((time.perf_counter() - start) * 1e3, 1e-3)
    for _ in range(int(warmup_ms / estimate_ms)):
        fn()
    runs = min(max_runs, max(min_runs, int(rep_ms / estimate_ms)))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return Timing.from_times(times, "perf_counter")


class Stopwatch:
    """Accumulates the time of marked regions inside a loop: CUDA events on a GPU, perf_counter on a CPU.

    ``with sw: region()`` records one interval; ``sw.times_ms()`` synchronises once and returns them all.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._events: list = []
        self._times: list[float] = []
        self._start = None

    def __enter__(self):
        if self.device.type == "cuda":
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self._start, end))
        else:
            self._times.append((time.perf_counter() - self._start) * 1e3)
        return False

    def times_ms(self) -> list[float]:
        if self._events:
            torch.cuda.synchronize(self.device)
            self._times.extend(s.elapsed_time(e) for s, e in self._events)
            self._events.clear()
        return list(self._times)


# ------------------------------------------------------------------------------------------------
# what the device can do, measured in the same run
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth in GB/s: 2 * bytes / time of ``dst.copy_(src)``.

    1 GiB on a GPU, 64 MiB on a CPU (past the last-level cache of most CPUs).
    """
    device = torch.device(device)
    nbytes = 2**26 if is_cpu(device) else 2**30
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, rep_ms=200.0)
    return 2 * nbytes / (t.p50 * 1e-3) / 1e9


@functools.lru_cache(maxsize=None)
def matmul_rate(device: torch.device) -> float:
    """Dense GEMM rate in TFLOP/s: bf16 8192^3 on a GPU, fp32 1024^3 on a CPU."""
    device = torch.device(device)
    n, dtype = (1024, torch.float32) if is_cpu(device) else (8192, torch.bfloat16)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: a @ b, device, rep_ms=200.0)
    return 2 * n**3 / (t.p50 * 1e-3) / 1e12


def l2_bytes(device: torch.device) -> int:
    """The GPU's L2 cache size in bytes (0 on a CPU or where torch does not report it)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0)


def device_rates(device: torch.device) -> dict:
    """Measured copy bandwidth and GEMM rate, with what was measured."""
    cpu = is_cpu(device)
    return {
        "copy_gbps": copy_bandwidth(device),
        "copy_what": f"copy_ of {'64 MiB' if cpu else '1 GiB'}, GB/s = 2*bytes/time",
        "matmul_tflops": matmul_rate(device),
        "matmul_what": "fp32 GEMM 1024^3" if cpu else "bf16 GEMM 8192^3",
    }


# ------------------------------------------------------------------------------------------------
# FLOP and byte models (FlashMLA's, for absorbed MLA over a latent cache)
# ------------------------------------------------------------------------------------------------


def _cached_tokens(batch: int, ctx) -> int:
    """B * L for one length, or the sum of per-request lengths."""
    if isinstance(ctx, (int, float)):
        return int(batch) * int(ctx)
    ctx = [int(c) for c in ctx]
    if len(ctx) != batch:
        raise ValueError(f"ctx has {len(ctx)} lengths for a batch of {batch}")
    return sum(ctx)


def mla_flops(batch: int, s_q: int, heads: int, ctx, d_latent: int = 512, d_rope: int = 64) -> int:
    """FLOPs = 2 * B * S_q * H * L * (R + P + R): scores over R + P, then P @ V over R.

    ``ctx`` is L for every request or a list of per-request lengths (then B * L is their sum).
    """
    return 2 * s_q * heads * _cached_tokens(batch, ctx) * (d_latent + d_rope + d_latent)


def mla_bytes(batch: int, s_q: int, heads: int, ctx, d_latent: int = 512, d_rope: int = 64,
              elem_size: int = 2, cache_row_bytes: int | None = None) -> int:
    """Bytes = B * L * row + B * S_q * H * (R + P + R) * elem_size: the cache read once, the query read and the
    output written once. ``row`` = (R + P) * elem_size, or ``cache_row_bytes`` for a cache whose rows have their own
    size (the FP8 layout: ``mla_kernels.cache.fp8_row_bytes``, 656 bytes with its scales at DeepSeek's widths)."""
    tokens = _cached_tokens(batch, ctx)
    row = (d_latent + d_rope) * elem_size if cache_row_bytes is None else int(cache_row_bytes)
    return tokens * row + batch * s_q * heads * (d_latent + d_rope + d_latent) * elem_size


# ------------------------------------------------------------------------------------------------
# correctness before timing (check_close, WrongResult: mla_kernels._autotune)
# ------------------------------------------------------------------------------------------------


def check_then_time(name: str, fn: Callable[[], torch.Tensor], expected: torch.Tensor, device: torch.device,
                    dtype: torch.dtype | None = None, **time_kw) -> tuple[Timing, float]:
    """Run ``fn`` once, ``check_close`` its output against ``expected``, then ``time_fn`` it.
    Returns (timing, relative RMS error)."""
    out = fn()
    synchronize(device)
    err = check_close(name, out, expected, dtype)
    del out
    return time_fn(fn, device, **time_kw), err


@functools.lru_cache(maxsize=None)
def _cache_keyword(cls) -> str:
    """The keyword ``cls.forward`` takes its Cache by (``inspect.signature`` costs ~17 µs: read once per class, not
    inside the timed calls that hand the Cache over)."""
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def cache_kw(module, cache) -> dict:
    """``{keyword: cache}`` for handing a transformers model, ``generate`` or attention module its Cache:
    ``cache`` from transformers 5.25 on (which deprecates ``past_key_values`` and warns at every call; 5.40 drops it
    from decoder layers), ``past_key_values`` before (5.17 knows no other name). Read from ``module``'s forward."""
    return {_cache_keyword(type(module)): cache}


# ------------------------------------------------------------------------------------------------
# metadata and output
# ------------------------------------------------------------------------------------------------


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> dict:
    """``git rev-parse HEAD`` and whether the tree has changes; where git or the repo is absent, ``MLA_COMMIT`` (the
    commit a GPU session's caller names: its copy of the tree has no .git) or None."""
    def run(*args):
        try:
            res = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    commit = run("rev-parse", "HEAD")
    status = run("status", "--porcelain", "--untracked-files=no") if commit else None
    if commit is None and os.environ.get("MLA_COMMIT"):  # a copy without .git (the GPU machine's): the caller's word
        return {"commit": os.environ["MLA_COMMIT"], "dirty": None}
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def environment(device: torch.device) -> dict:
    """Where and with what the numbers were taken."""
    device = torch.device(device)
    env = {
        "device_type": device.type,
        "is_cpu": is_cpu(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "torch_version_cuda": torch.version.cuda,
        "torch_version_hip": torch.version.hip,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu_memory_bytes=props.total_memory, multiprocessors=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}" if torch.version.hip is None
                   else getattr(props, "gcnArchName", None))
    return env


def _jsonable(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _jsonable(dataclasses.asdict(x))
    if isinstance(x, (torch.dtype, torch.device, Path)):
        return str(x)
    return x


def names_json_file(out: str | os.PathLike) -> bool:
    """Whether ``--out`` names a results file (ending in .json, any case) rather than a folder."""
    return str(out).lower().endswith(".json")


def results_path(name: str, device: torch.device, out: str | os.PathLike | None = None) -> Path:
    """``out`` if it names a .json file, else ``<out or bench/results>/<name>_<device-slug>.json``."""
    if out is not None and names_json_file(out):
        return Path(out)
    return Path(out or RESULTS_DIR) / f"{name}_{device_slug(device)}.json"


def save_results(name: str, payload: dict, device: torch.device, args: argparse.Namespace, plot=None) -> Path:
    """End of every bench: write the JSON, say where, and with ``--plot`` call ``plot(png_path)`` (if given; else
    say that this run drew nothing, as a ``--plot`` that writes no PNG and says nothing reads as a lost file)."""
    path = write_json(name, payload, device, args.out)
    print(f"\nresults: {path}")
    if getattr(args, "plot", False):
        if plot is not None:
            plot(path.with_suffix(".png"))
        else:
            print("--plot: no plot written (this run measured nothing the plot draws)")
    return path


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def save_if_stopped(name: str, payload: dict, device: torch.device, args: argparse.Namespace, before_save=None):
    """Keep what a bench measured when it is stopped before its end: SIGTERM (what ``timeout`` sends, as in
    ``bench/gpu_session.sh``) or Ctrl-C inside the block writes ``payload`` as it stands, with the rows the sweeps
    appended to it so far, marked ``incomplete``, and exits with status 130. Any other exception (a kernel fault,
    a compile error, running out of memory) writes it the same way, marked with the error, then propagates: on a
    GPU session's few minutes, the rows measured before a failure are worth keeping. A bench's sweeps append their
    rows to lists held in ``payload`` for this. ``before_save()``, if given, runs first (e.g. a fit of the rows so
    far); its own failure is noted in the payload, not raised."""

    def keep(reason: str) -> Path:
        payload["incomplete"] = f"{reason}: the rows measured until then"
        if before_save is None:
            return write_json(name, payload, device, args.out)
        # the rows first: before_save (prefill's calibration measures the copy rate afresh) may outlast the grace a
        # stopped call has left (gpu_session.sh: timeout's 5 s before SIGKILL)
        write_json(name, payload, device, args.out)
        try:
            before_save()
        except Exception as exc:  # the rows matter more than what is derived from them
            payload["incomplete"] += f"; before_save failed: {type(exc).__name__}: {str(exc)[:300]}"
        return write_json(name, payload, device, args.out)

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    except KeyboardInterrupt as exc:
        path = keep(f"stopped before the end ({exc or 'Ctrl-C'})")
        print(f"\nstopped: partial results in {path}")
        raise SystemExit(130) from None
    except Exception as exc:
        path = keep(f"failed before the end ({type(exc).__name__}: {str(exc)[:500]})")
        print(f"\nfailed: partial results in {path}")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_if_wrong(sweep_rows, seed_providers: dict, label) -> None:
    """Exit non-zero, after the results are written, if any provider gave a wrong result (or failed to run) and was
    not timed. ``label(row)`` names a sweep row."""
    wrong = [label(r) for r in sweep_rows if r.get("wrong")]
    wrong += [f"seed scenario {n}" for n, r in seed_providers.items() if r.get("wrong")]
    if wrong:
        raise SystemExit(f"wrong results, not timed: {', '.join(wrong)}")


def write_json(name: str, payload: dict, device: torch.device, out: str | os.PathLike | None = None) -> Path:
    """Write ``{"benchmark": name, "environment": ..., **payload}``; non-finite floats become null."""
    path = results_path(name, device, out)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "environment": environment(device), **payload}
    path.write_text(json.dumps(_jsonable(doc), indent=1) + "\n")
    return path


# ------------------------------------------------------------------------------------------------
# rows and tables
# ------------------------------------------------------------------------------------------------


def make_row(provider: str, timing: Timing | None, *, flops: float | None = None, nbytes: float | None = None,
             copy_gbps: float | None = None, note: str = "", **keys) -> dict:
    """One result row: the shape ``keys``, the timing, and TFLOP/s, GB/s, % of copy bandwidth from
    the models. ``timing=None`` is a row that was not timed (``note`` says why)."""
    row = {"provider": provider, **keys, "note": note}
    if timing is None:
        return row
    seconds = timing.p50 * 1e-3
    row.update(p50_ms=timing.p50, p20_ms=timing.p20, p80_ms=timing.p80, timing=timing.to_dict())
    if flops is not None:
        row["tflops"] = flops / seconds / 1e12
    if nbytes is not None:
        row["gbps"] = nbytes / seconds / 1e9
        if copy_gbps:
            row["pct_copy_bw"] = 100.0 * row["gbps"] / copy_gbps
    return row


def untimed_row(provider: str, exc: Exception, **keys) -> dict:
    """The row of a provider whose check or timing raised ``exc``, so that the sweep's other providers still run:
    out of memory (skipped, the allocator's cache emptied), a wrong result, or any other failure (a kernel that
    fails to compile or launch: paths never run natively before). The last two are marked ``wrong``."""
    if isinstance(exc, torch.OutOfMemoryError):
        torch.cuda.empty_cache()
        return make_row(provider, None, note="skipped: out of memory", **keys)
    if isinstance(exc, WrongResult):
        return make_row(provider, None, note=f"NOT TIMED, WRONG RESULT: {exc}", wrong=True, **keys)
    return make_row(provider, None, note=f"NOT TIMED, FAILED: {type(exc).__name__}: {str(exc)[:300]}", wrong=True,
                    **keys)


def _fmt(x, spec: str, width: int) -> str:
    return format(x, spec).rjust(width) if isinstance(x, (int, float)) else "-".rjust(width)


def format_row(row: dict, keys: Sequence[str] = ("B", "ctx", "H")) -> str:
    """``provider  B  ctx  H | p50 ms [p20, p80] | TFLOP/s | GB/s | % copy BW | speed-up  note``."""
    head = f"{row['provider']:<18}" + "".join(f"{str(row.get(k, '')):>7}" for k in keys)
    if "p50_ms" not in row:
        return f"{head} | {'not timed':>28} | {row.get('note', '')}"
    lat = f"{row['p50_ms']:9.4f} [{row['p20_ms']:.4f}, {row['p80_ms']:.4f}]"
    return (f"{head} | {lat:>28} | {_fmt(row.get('tflops'), '.2f', 7)} | {_fmt(row.get('gbps'), '.1f', 7)} | "
            f"{_fmt(row.get('pct_copy_bw'), '.1f', 5)}% | {row.get('speedup', ''):<14} {row.get('note', '')}").rstrip()


def table_header(keys: Sequence[str] = ("B", "ctx", "H")) -> str:
    head = f"{'provider':<18}" + "".join(f"{k:>7}" for k in keys)
    return (f"{head} | {'p50 ms [p20, p80]':>28} | {'TFLOP/s':>7} | {'GB/s':>7} | {'%copy':>6} | speed-up\n"
            + "-" * (len(head) + 84))


def progress(iterable: Iterable, desc: str, total: int | None = None):
    """A tqdm bar on stderr (plain iteration if tqdm is missing)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def log(msg: str) -> None:
    """Print without breaking a progress bar."""
    try:
        from tqdm.auto import tqdm

        tqdm.write(msg)
    except ImportError:
        print(msg)


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------


def save_plot(fig, path) -> None:
    """Lay out and write a matplotlib figure, and say where it went."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def out_arg(text: str) -> str:
    """``--out``: a .json file or a folder, refused at once (an argparse error) where the results could not be
    written, rather than by a traceback after the whole run (its measurements lost)."""
    path = Path(text)
    if names_json_file(text):
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a .json file")
        folder = path.parent
    else:
        if path.exists() and not path.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} exists and is not a folder (a results file ends in .json)")
        folder = path
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text!r}: {str(existing)!r} is not writable")
    return text


def positive_int(text: str) -> int:
    """An argparse type: an int >= 1 (counts, sizes, threads)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


def device_arg(text: str) -> str:
    """``--device``: auto, cpu, cuda or cuda:N (anything else: an argparse error, not a traceback from torch)."""
    if text in ("", "auto"):
        return text
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: auto, cpu, cuda or cuda:N")
    return text


def make_parser(description: str, seed_and_sweep: bool = False, plot: bool = True) -> argparse.ArgumentParser:
    """Arguments every ``python -m bench.<name>`` takes: --quick, --out, --device, --cuda-graph, --threads, and
    --plot where the bench draws one (``plot=False``: no such option, so that argparse refuses it rather than the bench
    accepting it and writing nothing); with ``seed_and_sweep``, also --skip-seed / --skip-sweep for benches that run a
    seed scenario and a sweep."""
    parser = argparse.ArgumentParser(description=description)
    if seed_and_sweep:
        parser.add_argument("--skip-seed", action="store_true", help="only the sweep")
        parser.add_argument("--skip-sweep", action="store_true", help="only seed 003's scenario")
    parser.add_argument("--quick", action="store_true", help="a smaller sweep, for a first look")
    parser.add_argument("--out", default=None, type=out_arg,
                        help="results folder or .json file (default bench/results/<name>_<device>.json)")
    parser.add_argument("--device", default="auto", type=device_arg,
                        help="auto (GPU if present), cpu, cuda, cuda:N")
    parser.add_argument("--cuda-graph", action="store_true", help="time GPU providers inside CUDA graphs")
    if plot:
        parser.add_argument("--plot", action="store_true", help="also write a PNG (needs matplotlib)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads for torch (default: torch's); 1 avoids spin-waiting on a busy machine")
    return parser


def setup(args: argparse.Namespace) -> torch.device:
    """Apply --threads and return the device chosen by --device."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if is_cpu(device) and load > (os.cpu_count() or 1):
        print(f"this machine is busy (load {load:.1f} on {os.cpu_count()} cores): CPU timings are noisy"
              + ("" if args.threads else "; --threads 1 avoids OpenMP spin-waiting"))
    return device


def pyplot():
    """matplotlib.pyplot with a headless backend, or None (with a message) if it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written (pip install matplotlib)")
        return None
    return plt
