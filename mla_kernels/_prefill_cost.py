"""Time model of the two prefill paths (``prefill.choose_prefill_path``), its constants and their fit.

A path's estimated time is

    t = call + launches x launch + sum over its kernels of max(FLOPs / FLOP rate, bytes / bandwidth)

with one achieved FLOP rate per kind of kernel. The terms, and why each is there (H100 numbers below):

* ``call`` (``prefill_call_us``): the host work both paths share (argument checks, and in the timed code the one
  host synchronisation that read the lengths, which a caller passing its host lengths now avoids). Same for both
  paths, so it never changes the choice; it is in the model so the estimates can be compared with measured
  times. Its fitted value is that of the timed code, with the synchronisation.
* ``launches x launch`` (``prefill_launch_us``): each GPU launch (a PyTorch op or a Triton kernel) costs
  host time in an eager call. The seed 003 batch (16 heads, 0.2 M attended pairs) does under 0.2 ms of work,
  yet its absorbed call took 0.50 ms and its expanded call 0.69-0.77 ms: the expanded path then made 16 launches,
  the absorbed path 3; the fit puts ~26 us of host time on each launch and ~0.3 ms on the call's shared part.
  On the large records these terms are below 3%. Today both paths make 3 (``LAUNCHES``, counted in
  ``tests/test_prefill_cost.py``): each record is modelled with the launches of the code that ran it.
* attention, one rate per path (``prefill_absorbed_tflops``, ``prefill_expanded_tflops``): the two kernels
  differ in kind, not only in FLOP count (the absorbed kernel's 576-wide keys and 512-wide accumulator against
  the expanded kernel's 192/128-wide heads), so a single FLOP ratio cannot fit both. Compute-bound at every
  recorded shape: the absorbed kernel re-reads a sequence's latent from L2 for each row block, the expanded
  kernel its K/V for each 128-token block. The bytes term (each sequence's keys read once from memory) only
  matters where a 64-row tile holds few real rows: the expanded kernel at 16 new tokens over 4096 keys
  (measured 3.14 ms, of which the K/V read alone is 0.7 ms at 3 TB/s). The expanded FLOPs are the ones its
  tiles execute (rows padded to BLOCK_M per sequence), which is why 16 new tokens cost like 64.
* GEMMs (``prefill_gemm_tflops``): the expansion through kv_b_proj (2 L H R (D_nope + D_v) FLOPs, and it writes
  L H (D_nope + D_v) bf16 values: 2.2 GB, 0.7 ms at 3 TB/s, at 8 x 4224 keys and 128 heads), the query
  absorption and the value projection. Compute-bound at 128 heads (1.1 TFLOP, ~2 ms), so one rate.
* bandwidth (``prefill_bandwidth_gbps``): the latent gather (a bandwidth-only kernel: read + write L R bf16 and
  some index values) and the bytes side of every max(). The measured device-to-device copy rate.

Not modelled: wave quantisation and occupancy (one rate per kernel), the absorbed kernel's split-KV combine
(one more launch, only when a batch has too few row blocks to fill the GPU), fp8 caches (the gather then reads
1 byte and a scale per value and writes 2), host time overlapping GPU work (launches are added, not
overlapped). Fitted to the H100 records the estimates land within 10% of every recorded time; the tests allow
a factor of 1.25, since the same path timed twice in one run differed by 12% (0.69 and 0.77 ms). The choice
only needs the estimates' order right where the paths differ by more than 10%.
"""
from __future__ import annotations

import math
import numbers

from . import _tuning, _utils

PATHS = ("absorbed", "expanded")

# Host launches per call of each path (PyTorch ops that run a kernel, and Triton kernels), counted on the code
# by tests/test_prefill_cost.py: absorbed = query absorption bmm, attention kernel, value projection bmm;
# expanded = the latent gather kernel (which also writes cu_seqlens_k), the expansion GEMM, the attention kernel.
LAUNCHES = {"absorbed": 3, "expanded": 3}
# What the code timed in H100_RECORDED launched (commit d07c6fe): the expanded path then ran cumsum + pad for
# cu_seqlens_k and 12 PyTorch ops of the latent gather before its GEMM and kernel, 16 in all. A record is modelled
# with the launches of the code that ran it, never with today's ``LAUNCHES``, so the fit of those times stays a
# fit of that code.
D07C6FE_LAUNCHES = {"absorbed": 3, "expanded": 16}

# Measured timings of both paths on one H100 (80GB HBM3, triton 3.6, torch 2.11, bf16, page 64): `python -m
# bench.prefill --quick` at commit d07c6fe, 2026-11-22 (bench/results/h100-2026-11-22/README.md, "Prefill"; issue 11).
# DeepSeek widths R 512, P 64, D_nope = D_v = 128. The 8 x 4096 rows are derived from the recorded TFLOP/s
# (attention FLOPs as bench.prefill counts them, 2 H pairs (D_nope + P + D_v) = 5.50 TFLOP): 317 TFLOP/s ->
# 17.4 ms; "about 16" TFLOP/s -> 344 ms (rounded in the record, so only +-3% sure). The seed's second expanded
# time is auto's (it ran the expanded path): the same path twice in one run, 0.69 and 0.77 ms.
# The absorbed path then ran decode's old 32 x 16 tiles at 128 heads; commit 0c9de2d since ships 64 x 64 tiles,
# measured 4.1x faster in decode at 128 heads. Re-run `python -m bench.prefill --calibrate` on a GPU.
_WIDTHS = dict(d_latent=512, d_rope=64, d_nope=128, d_v=128)
H100_RECORDED = [
    dict(name="seed 003", new=[64, 128, 256, 256], history=[512, 0, 0, 256], heads=16,
         ms={"absorbed": [0.50], "expanded": [0.69, 0.77]}, launches=D07C6FE_LAUNCHES),
    dict(name="8 x 4096 new", new=[4096] * 8, history=[0] * 8, heads=128,
         ms={"absorbed": [5.50e12 / 16e12 * 1e3], "expanded": [5.50e12 / 317e12 * 1e3]}, launches=D07C6FE_LAUNCHES),
    dict(name="8 x 16 over 4096", new=[16] * 8, history=[4096] * 8, heads=128,
         ms={"absorbed": [3.45], "expanded": [3.14]}, launches=D07C6FE_LAUNCHES),
    dict(name="8 x 128 over 4096", new=[128] * 8, history=[4096] * 8, heads=128,
         ms={"absorbed": [22.9], "expanded": [3.61]}, launches=D07C6FE_LAUNCHES),
]

# The model's constants where a GPU's config file has none: ``fit(h100_records())`` rounded (a test checks they
# stay within 5% of that fit), except the bandwidth, the H100's measured copy rate (3.00-3.02 TB/s, same
# source), which the fit keeps fixed.
DEFAULTS = {
    "prefill_call_us": 300.0,
    "prefill_launch_us": 26.0,
    "prefill_absorbed_tflops": 52.0,
    "prefill_expanded_tflops": 380.0,
    "prefill_gemm_tflops": 620.0,
    "prefill_bandwidth_gbps": 3000.0,
}
NAMES = tuple(DEFAULTS)
# file key kept from before the time model: the absorbed attention rate over the expanded one; used to derive
# prefill_absorbed_tflops when a file has this ratio but not that rate
RELATIVE_SPEED_KEY = "absorbed_relative_speed"


def h100_records() -> list[dict]:
    """``H100_RECORDED`` as flat fit records (one per timing), with cache lengths, widths and the launches of the
    code that was timed."""
    out = []
    for case in H100_RECORDED:
        for path, times in case["ms"].items():
            for ms in times:
                out.append(dict(new=case["new"], cache_lens=[n + h for n, h in zip(case["new"], case["history"])],
                                heads=case["heads"], path=path, ms=ms, name=case["name"],
                                launches=case["launches"][path], **_WIDTHS))
    return out


def expanded_block_m(max_seqlen_q: int) -> int:
    """The expanded kernel's BLOCK_M by ``prefill._expanded_heuristic`` (what the records ran)."""
    return 128 if max_seqlen_q > 64 else 64


def work(new_lens, cache_lens, heads, d_latent, d_rope, d_nope, d_v, causal=True, block_m=None,
         launches=None) -> dict:
    """Per path: ``launches`` and ``kernels``, a list of (name, FLOPs, bytes, rate name or None). Plain ints.

    ``block_m``: the expanded kernel's row tile (default ``expanded_block_m``); its rows are padded to it per
    sequence, and a row block reads keys up to its last row (causal) or all keys. ``launches``: launches per path
    of the code modelled (default ``LAUNCHES``, today's code; a recorded timing takes its own, as
    ``H100_RECORDED`` does).
    """
    new_lens = [int(n) for n in new_lens]
    cache_lens = [int(n) for n in cache_lens]
    tokens, keys = sum(new_lens), sum(cache_lens)
    if block_m is None:
        block_m = expanded_block_m(max(new_lens, default=0))
    pairs = exec_pairs = 0
    for n, length in zip(new_lens, cache_lens):
        hist = length - n
        pairs += n * hist + n * (n + 1) // 2 if causal else n * length
        blocks, full = -(-n // block_m), n // block_m  # blocks m < full end at hist + (m + 1) block_m <= length
        if causal:
            exec_pairs += block_m * (full * hist + block_m * full * (full + 1) // 2 + (blocks - full) * length)
        else:
            exec_pairs += block_m * blocks * length
    r, p, dn, dv, h = d_latent, d_rope, d_nope, d_v, heads
    absorbed = [
        ("absorb_q", 2 * tokens * h * dn * r, 2 * (tokens * h * dn + h * dn * r + tokens * h * r), "gemm"),
        ("attention", 2 * h * pairs * (2 * r + p), 2 * (keys * (r + p) + tokens * h * (2 * r + p)), "absorbed"),
        ("project_v", 2 * tokens * h * r * dv, 2 * (tokens * h * r + h * r * dv + tokens * h * dv), "gemm"),
    ]
    expanded = [
        # read + write the bf16 latent, and 64 bytes of index values per key: the PyTorch gather's ~8 int64 values
        # that the H100 records ran (the Triton gather reads one block id per key; left as fitted, <1% of the term)
        ("gather", 0, keys * (4 * r + 64), None),
        ("expand", 2 * keys * h * r * (dn + dv), 2 * (keys * r + h * (dn + dv) * r + keys * h * (dn + dv)), "gemm"),
        ("attention", 2 * h * exec_pairs * (dn + p + dv),
         2 * (keys * (h * (dn + dv) + p) + tokens * h * (dn + p + dv)), "expanded"),
    ]
    launches = LAUNCHES if launches is None else launches
    return {"absorbed": dict(launches=launches["absorbed"], kernels=absorbed),
            "expanded": dict(launches=launches["expanded"], kernels=expanded)}


_RATE_KEYS = {"gemm": "prefill_gemm_tflops", "absorbed": "prefill_absorbed_tflops",
              "expanded": "prefill_expanded_tflops"}


def path_time(path_work: dict, constants: dict) -> float:
    """Estimated seconds of one path (``work(...)[path]``) under ``constants`` (all of ``NAMES``)."""
    bandwidth = constants["prefill_bandwidth_gbps"] * 1e9
    t = (constants["prefill_call_us"] + path_work["launches"] * constants["prefill_launch_us"]) * 1e-6
    for _, flops, nbytes, rate in path_work["kernels"]:
        compute = flops / (constants[_RATE_KEYS[rate]] * 1e12) if rate else 0.0
        t += max(compute, nbytes / bandwidth)
    return t


def estimate(new_lens, cache_lens, heads, d_latent, d_rope, d_nope, d_v, causal=True, constants=None,
             block_m=None, launches=None) -> dict:
    """Estimated seconds per path: {"absorbed": s, "expanded": s}. ``constants`` default to ``DEFAULTS``,
    ``launches`` (per path) to today's ``LAUNCHES``."""
    consts = dict(DEFAULTS, **(constants or {}))
    w = work(new_lens, cache_lens, heads, d_latent, d_rope, d_nope, d_v, causal, block_m, launches)
    return {path: path_time(w[path], consts) for path in PATHS}


def _check_visible(device) -> None:
    """A ValueError naming ``device`` where it is a GPU this torch can't see (no CUDA/ROCm build, or an index past
    the visible ones): its config file can't be read, and the defaults would answer silently for another GPU."""
    if getattr(device, "type", None) != "cuda":
        return
    import torch
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0 or (device.index is not None and not 0 <= device.index < count):
        raise ValueError(f"device {device} is not a GPU this torch can see ({count} visible), so its config file's "
                         "constants can't be looked up; pass constants= or another device")


def device_constants(device=None, relative_speed=None) -> dict:
    """The constants for ``device``: its config file's (``_tuning.constant``), ``DEFAULTS`` for the rest.

    A file with ``absorbed_relative_speed`` but no ``prefill_absorbed_tflops`` gets the absorbed rate as that ratio
    times the expanded rate. ``relative_speed`` (``choose_prefill_path``'s override) does the same over everything.
    One cached dict lookup per name; the CPU always gets the defaults.
    """
    consts = dict(DEFAULTS)
    ratio = None
    if device is not None:
        _check_visible(device)
        file = {name: _tuning.constant(name, device) for name in (*NAMES, RELATIVE_SPEED_KEY)}
        for name in NAMES:
            value = file[name]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                consts[name] = float(value)
        if file["prefill_absorbed_tflops"] is None:
            ratio = file[RELATIVE_SPEED_KEY]
    if relative_speed is not None:
        ratio = relative_speed
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):  # numpy floats too
            raise TypeError(f"relative_speed must be a number, got {type(ratio).__name__}")
        if not (_utils.is_finite(ratio) and ratio > 0):  # (a 400-digit int: an OverflowError in math.isfinite)
            raise ValueError(f"relative_speed must be a finite number > 0, got {ratio!r}")
        consts["prefill_absorbed_tflops"] = float(ratio) * consts["prefill_expanded_tflops"]
    return consts


# --------------------------------------------------------------------------------------------
# calibration: fit the constants to measured times
# --------------------------------------------------------------------------------------------


def record_work(rec: dict) -> dict:
    """A timed record's path work (``work``) with the launches of the code that ran it where it names them, as
    ``fit`` models it: ``path_time(record_work(rec), constants)`` is the record's estimate."""
    launches = rec.get("launches")
    if launches is not None and (isinstance(launches, bool) or not isinstance(launches, int) or launches < 0):
        raise ValueError(f"record launches must be an int >= 0, got {launches!r}")
    w = work(rec.get("new", rec.get("new_lens")), rec["cache_lens"], rec["heads"], rec["d_latent"], rec["d_rope"],
             rec["d_nope"], rec["d_v"], rec.get("causal", True), rec.get("block_m"))[rec["path"]]
    return w if launches is None else dict(w, launches=launches)


def fit(records, start=None, fixed=("prefill_bandwidth_gbps",), tol=1e-3) -> dict:
    """Constants minimising the squared log error of the estimates against ``records``' times.

    records: dicts with new (or new_lens), cache_lens, heads, d_latent, d_rope, d_nope, d_v, path ("absorbed" or
    "expanded"), ms, and optionally causal, block_m, launches (of the code timed; default ``LAUNCHES``).
    ``start``: initial constants (default ``DEFAULTS``); the names in ``fixed`` keep their start value.
    Deterministic coordinate descent in log space (each constant scaled up or down by a step that halves when
    nothing improves): a handful of constants, tens of records, milliseconds.
    A constant no record depends on keeps its start value, and so does ``prefill_launch_us`` when every record
    makes the same number of launches: the times then show only call + launches x launch, which the call cost
    takes (today both paths launch 3 times, so a calibration of today's code keeps the launch cost fitted to
    the H100 records, whose expanded path launched 16 times).
    """
    records = list(records)
    if not records:
        raise ValueError("fit needs at least one timed record")
    works = []
    for rec in records:
        if rec["path"] not in PATHS:
            raise ValueError(f"record path must be one of {PATHS}, got {rec['path']!r}")
        if not rec["ms"] > 0:
            raise ValueError(f"record time must be > 0 ms, got {rec['ms']!r}")
        works.append((record_work(rec), math.log(rec["ms"] * 1e-3)))
    consts = dict(DEFAULTS, **(start or {}))
    free = [n for n in NAMES if n not in fixed]
    if len({w["launches"] for w, _ in works}) < 2 and "prefill_launch_us" in free:
        free.remove("prefill_launch_us")  # not separable from prefill_call_us

    def loss(c):
        return sum((math.log(path_time(w, c)) - log_t) ** 2 for w, log_t in works)

    best = loss(consts)
    step = math.log(2.0)
    while step > tol:
        improved = False
        for name in free:
            for sign in (1.0, -1.0):
                trial = dict(consts, **{name: consts[name] * math.exp(sign * step)})
                value = loss(trial)
                if value < best - 1e-12:
                    consts, best, improved = trial, value, True
                    break
        if not improved:
            step /= 2
    return consts


def choose(times: dict) -> str:
    """The path with the smaller estimate (ties: expanded, whose time grows slower with the batch)."""
    return "absorbed" if times["absorbed"] < times["expanded"] else "expanded"
