"""Config sweeps on the current GPU: the machinery behind ``python -m bench.autotune`` and ``mla_kernels.autotune``.

Per kernel (``decode``, ``prefill`` = the absorbed prefill, ``expanded``, ``write_cache``) a ``_Spec`` says which
configs to try (``space``), which benchmark shapes make up each shape class (``default_shapes``; the class of a
shape is the runtime's own class function, so the sweep and the launch agree), how to build a shape's inputs
and its PyTorch reference, and what the heuristic would launch. For each class:

1. every candidate (the heuristic's configs first) runs once on every shape and is checked against the
   reference; one that fails to compile, runs out of shared memory or registers, or gives a wrong result is
   pruned with its reason (never fatal);
2. survivors are timed with ``timer(fn) -> ms`` (default ``triton.testing.do_bench``'s median; injectable, so
   the sweep runs on the CPU under the interpreter with a fake timer); the winner has the lowest geometric mean
   over the class's shapes; decode then tries the split-count knob (``waves``) on the winner's tiles;
3. the winner is written with ``_tuning.save_file`` at once (a sweep cut short keeps what it finished).
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from . import _tuning, _utils

KERNELS = ("decode", "prefill", "expanded", "write_cache")
ROPE = 64  # the rope width (DeepSeek's) of the benchmark shapes; it is no part of any shape class

# Relative RMS error allowed before a candidate (a sweep's config, a bench's provider) is timed: bf16 keeps 8
# significant bits (0.4% per rounding) and a correct kernel rounds a few times (inputs, probabilities, output), so
# 1% RMS is above honest rounding noise and far below what a wrong mask, tile edge, scale or page index gives.
# One check for the sweep and the benchmarks (bench/_harness.py imports it).
CHECK_RTOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-3, torch.float64: 1e-6}
TUNED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # what the sweep tunes for

ON_DEMAND_SHAPES: dict | None = None  # tests: kernel -> shapes that MLA_KERNELS_AUTOTUNE's on-demand tuning uses
ON_DEMAND_TIMER = None  # tests: the timer of on-demand tuning (default: gpu_timer)


class WrongResult(AssertionError):
    """An output disagrees with the reference: the candidate is pruned, the provider not timed."""


def rel_rms_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||a - e|| / ||e|| in float64 (fla's get_err_ratio); ||a - e|| where the reference is all zeros."""
    a, e = actual.detach().double(), expected.detach().to(actual.device).double()
    denom = e.pow(2).mean().sqrt().item()
    diff = (a - e).pow(2).mean().sqrt().item()
    return diff / denom if denom > 0 else diff


def check_close(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                rtol: float | None = None) -> float:
    """Raise ``WrongResult`` unless ``actual`` matches ``expected``: same shape, no non-finite value where the
    reference is finite, relative RMS error below ``rtol`` (default ``CHECK_RTOL[dtype]``, dtype defaulting to
    ``actual``'s), and no row (the last dimension) off by more than ``ROW_FACTOR`` times that. Returns the error."""
    if tuple(actual.shape) != tuple(expected.shape):
        raise WrongResult(f"{name}: shape {tuple(actual.shape)}, reference {tuple(expected.shape)}")
    dtype = actual.dtype if dtype is None else dtype
    rtol = CHECK_RTOL.get(dtype, 1e-2) if rtol is None else rtol
    expected = expected.to(actual.device)
    finite = torch.isfinite(expected)
    bad = finite & ~torch.isfinite(actual)
    if bad.any():
        where = tuple(bad.nonzero()[0].tolist())
        raise WrongResult(f"{name}: non-finite output at {where} where the reference is finite")
    err = rel_rms_error(actual[finite], expected[finite])
    if not err < rtol:
        raise WrongResult(f"{name}: relative RMS error {err:.3e} > {rtol:.1e} ({str(dtype).replace('torch.', '')}); "
                          "refusing to time a wrong result")
    worst = row_error(actual, expected, finite)
    if not worst < ROW_FACTOR * rtol:  # one RMS over millions of elements hides a token or a row left wrong
        raise WrongResult(f"{name}: a row's relative error {worst:.3e} > {ROW_FACTOR * rtol:.1e}; "
                          "refusing to time a wrong result")
    return err


ROW_FACTOR = 4  # a row (the last dimension: a head's output, a cached token) may be this many times the RMS bound


def row_error(actual, expected, finite) -> float:
    """The largest relative error of one row (the last dimension) over the ``finite`` entries of ``expected``, each
    row measured against the larger of its own norm and a typical row's (from the reference's RMS), so rows the
    reference leaves zero count too."""
    if actual.numel() == 0:
        return 0.0
    width = actual.shape[-1] if actual.dim() else 1
    a = torch.where(finite, actual.double(), 0.0).reshape(-1, width)
    e = torch.where(finite, expected.double(), 0.0).reshape(a.shape)
    rms = expected[finite].double().pow(2).mean().sqrt().item()
    floor = (rms if rms > 0 else 1.0) * math.sqrt(width)  # (rms NaN: no finite reference value)
    return ((a - e).norm(dim=1) / e.norm(dim=1).clamp(min=floor)).max().item()


def gpu_timer(fn) -> float:
    """Median milliseconds of ``fn()`` by ``triton.testing.do_bench`` (CUDA events, L2 flushed before each run)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))


class Run:
    """``fn(config)`` as a no-argument callable for the timer; ``.config`` says which config it runs."""

    def __init__(self, fn, config: dict):
        self.fn, self.config = fn, config

    def __call__(self):
        return self.fn(self.config)


def config_str(cfg: dict) -> str:
    short = {"BLOCK_M": "M", "BLOCK_N": "N", "BLOCK_T": "T", "num_warps": "w", "num_stages": "s"}
    return " ".join(f"{short.get(k, k)}{'' if k in short else '='}{v}" for k, v in cfg.items())


def _key(cfg: dict) -> str:
    return json.dumps(cfg, sort_keys=True)


def _paged(batch: int, length: int, page: int, width: int, device, dtype, gen):
    """A random paged cache ``[blocks, page, width]`` and a shuffled block table ``[batch, ceil(length/page)]``."""
    per = max(1, _utils.cdiv(length, page))
    blocks = batch * per + 1
    buf = torch.randn(blocks, page, width, device=device, generator=gen).to(dtype)
    table = torch.randperm(blocks, device=device, generator=gen)[: batch * per].view(batch, per).to(torch.int32)
    return buf, table


# --------------------------------------------------------------------------------------------
# the kernels' spaces, shapes, inputs and references
# --------------------------------------------------------------------------------------------


class _Spec:
    name = ""

    def key(self, shape: dict, dtype: torch.dtype) -> str: ...
    def heuristic(self, shape: dict, device) -> dict: ...
    def space(self, key: str, device, quick: bool) -> list[dict]: ...
    def default_shapes(self, quick: bool) -> list[dict]: ...
    def build(self, shape: dict, device, dtype, gen): ...  # (run(cfg) -> tensor, expected, reset | None)

    def refine(self, winner: dict, key: str, device) -> list[dict]:
        return []

    def shared_bytes(self, cfg: dict, shape: dict, elem_bytes: int, hip: bool = False) -> int | None:
        """The library's estimate of ``cfg``'s shared memory at ``shape``, gfx942's LDS with ``hip`` (None: the
        kernel is not fitted)."""
        return None

    def fitted(self, cfg: dict, shape: dict, device, dtype) -> dict:
        """``cfg`` as the library would launch it from a config file: shrunk where its shared-memory estimate does
        not fit the GPU (``_utils.fit_shared``). A candidate it would change is not what a stored winner runs."""
        elem = torch.empty((), dtype=dtype).element_size()
        if self.shared_bytes(cfg, shape, elem) is None:
            return cfg
        return _utils.fit_tiles(cfg, device, self.shared_bytes, shape, elem)

    def label(self, shape: dict) -> str:
        return " ".join(f"{k}{v}" for k, v in shape.items())

    def widths_of(self, key: str) -> dict:
        """Widths a class key fixes (``R512`` -> {"R": 512}), for on-demand tuning of a key with no default shape."""
        return {name: int(v) for name, v in re.findall(r"\b([RNV])(\d+)\b", key)}


class _Decode(_Spec):
    """``mla_decode``'s kernel (split grid; the TMA or Gluon path where a config asks for it)."""
    name = "decode"
    # (H, S_q) per rows bucket: the first with every batch x context case, the others at the first case only
    HEADS_SQ = {16: [(16, 1), (1, 1), (8, 2)], 32: [(32, 1), (16, 2), (8, 4)], 64: [(64, 1), (32, 2), (8, 8)],
                None: [(128, 1), (64, 2), (16, 8)]}
    CASES = [(128, 4096, 64), (8, 32768, 64), (1, 32768, 64), (64, 8192, 16), (32, 4096, 1)]  # (B, ctx, page)

    def key(self, s, dtype):
        return _tuning.decode_class(s["S_q"] * s["H"], s["R"], dtype.itemsize)

    def heuristic(self, s, device):
        from .decode import _config
        return _config(s["S_q"] * s["H"], s["R"], _utils.on_hip(device))

    def default_shapes(self, quick):
        shapes = []
        for combos in self.HEADS_SQ.values():
            cases = self.CASES[:2] if quick else self.CASES
            heads, s_q = combos[0]
            shapes += [dict(B=b, ctx=c, H=heads, S_q=s_q, page=p, R=512, P=ROPE) for b, c, p in cases]
            if not quick:
                b, c, p = cases[0]
                shapes += [dict(B=b, ctx=c, H=h, S_q=q, page=p, R=512, P=ROPE) for h, q in combos[1:]]
        return shapes

    def space(self, key, device, quick):
        rows = re.search(r"rows([<>]=?)(\d+)", key)
        bound = int(rows.group(2)) if rows.group(1) == "<=" else None
        d_latent = int(re.match(r"R(\d+)", key).group(1))
        hip = _utils.on_hip(device)
        block_m = {16: [16], 32: [16, 32], 64: [32, 64]}.get(bound, [32, 64, 128])
        block_n, warps, stages = [16, 32, 64], [4, 8], ([1, 2] if hip else [2, 3])
        if quick:
            block_m, block_n = [{16: 16, 32: 32}.get(bound, 64)], [32, 64]
        if d_latent > 512:  # two 512-wide tiles per step: at most 32 x 32 fits in 227 KiB of shared memory
            block_m, block_n = [m for m in block_m if m <= 32] or [16], [16, 32]
        out = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st)
               for m, n, w, st in itertools.product(block_m, block_n, warps, stages)]
        if _utils.nvidia_sm90(device) and d_latent <= 512:  # the tensor-descriptor path (pages of whole tiles)
            out += [dict(BLOCK_M=m, BLOCK_N=64, num_warps=w, num_stages=st, TMA=True)
                    for m, w, st in itertools.product(block_m, [8] if quick else [4, 8], [2, 3])]
            from .decode import _gluon_tiles  # the Gluon kernel (Hopper's wgmma, a TMA ring; fixed 64 x 64 tiles)
            gluon = _gluon_tiles()
            if gluon is not None and _utils.capability(device)[0] == 9:
                out.append(gluon)
        return out

    def refine(self, winner, key, device):
        from .decode import evict_changes_code
        # the split count's waves, and the portable kernel's cache loads marked evict-first (FlashMLA's hint on its
        # cache stream; the TMA and Gluon kernels ignore EVICT) where that changes the code, each tried on the winner
        out = [dict(winner, waves=w) for w in (1, 2, 4) if winner.get("waves") != w]
        if not (winner.get("TMA") or winner.get("GLUON") or winner.get("EVICT")) and \
                evict_changes_code(winner, device):
            out.append(dict(winner, EVICT=True))
        return out

    def shared_bytes(self, cfg, shape, elem_bytes, hip=False):
        from .decode import decode_shared_bytes
        from .decode_tma import tma_widths_fit
        # as decode.decode_tiles fits a stored config for a launch: a TMA or Gluon config by the TMA kernel's own
        # estimate where that kernel serves the shape (16-bit inputs, pages of whole tiles; the space offers them on
        # sm_90 only), else by the portable kernel's, which it falls back to (fp32 here), so one over it would run
        # shrunk, not as timed
        tma = bool(cfg.get("TMA") or cfg.get("GLUON")) and not hip and elem_bytes == 2 and \
            tma_widths_fit(shape["page"], shape["R"], shape["P"], cfg["BLOCK_N"])
        return decode_shared_bytes(cfg, shape["R"], shape["P"], elem_bytes, hip=hip, tma=tma)

    def build(self, s, device, dtype, gen):
        from .decode import _launch, mla_decode_torch
        b, ctx, h, s_q, r, p = s["B"], s["ctx"], s["H"], s["S_q"], s["R"], s["P"]
        buf, table = _paged(b, ctx, s["page"], r + p, device, dtype, gen)
        q = torch.randn(b, s_q, h, r + p, device=device, generator=gen).to(dtype)
        args = (q[..., :r], q[..., r:], buf[..., :r], buf[..., r:], table,
                torch.full((b,), ctx, dtype=torch.int32, device=device))
        scale = (128 + p) ** -0.5
        expected = mla_decode_torch(*args, scale, True)

        def run(cfg):
            out, _ = _launch(*args, None, scale, True, False, batch=b, seq_q=s_q, total_tokens=b * s_q,
                             max_seqlen_q=s_q, max_seqlen_k=ctx, num_splits=None, config=cfg)
            return out.view(b, s_q, h, r)
        return run, expected, None


class _Prefill(_Spec):
    """The absorbed prefill: decode's kernel over ragged rows (``mla_prefill``)."""
    name = "prefill"
    SHAPES = [dict(B=16, new=16, hist=2048, H=16), dict(B=8, new=256, hist=2048, H=16),
              dict(B=4, new=32, hist=4096, H=128), dict(B=4, new=1024, hist=0, H=16),
              dict(B=2, new=512, hist=2048, H=128)]

    def key(self, s, dtype):
        return _tuning.prefill_class(s["new"], s["H"], s["R"], dtype.itemsize)

    def heuristic(self, s, device):
        from .decode import _config
        return _config(s["new"] * s["H"], s["R"], _utils.on_hip(device))

    def default_shapes(self, quick):
        shapes = self.SHAPES[3:4] if quick else self.SHAPES
        return [dict(x, page=64, R=512, P=ROPE) for x in shapes]

    def space(self, key, device, quick):
        hip = _utils.on_hip(device)
        if quick:
            return [dict(BLOCK_M=m, BLOCK_N=64, num_warps=w, num_stages=1 if hip else 2)
                    for m, w in itertools.product([64, 128], [4, 8])]
        return [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st) for m, n, w, st in
                itertools.product([32, 64, 128], [32, 64], [4, 8], [1, 2] if hip else [1, 2, 3])]

    def shared_bytes(self, cfg, shape, elem_bytes, hip=False):
        from .decode import decode_shared_bytes
        return decode_shared_bytes(cfg, shape["R"], shape["P"], elem_bytes, hip=hip)

    def build(self, s, device, dtype, gen):
        from .decode import _launch
        from .prefill import _prefill_torch
        b, new, hist, h, r, p = s["B"], s["new"], s["hist"], s["H"], s["R"], s["P"]
        buf, table = _paged(b, hist + new, s["page"], r + p, device, dtype, gen)
        q = torch.randn(b * new, h, r + p, device=device, generator=gen).to(dtype)
        seqlens = torch.full((b,), hist + new, dtype=torch.int32, device=device)
        cu_host = [i * new for i in range(b + 1)]
        cu = torch.tensor(cu_host, dtype=torch.int32, device=device)
        q_nope, q_pe, kv, pe = q[..., :r], q[..., r:], buf[..., :r], buf[..., r:]
        scale = (128 + p) ** -0.5
        expected, _ = _prefill_torch(q_nope, q_pe, kv, pe, table, cu_host, seqlens, scale, True)

        def run(cfg):
            out, _ = _launch(q_nope, q_pe, kv, pe, table, seqlens, cu, scale, True, False, batch=b, seq_q=0,
                             total_tokens=b * new, max_seqlen_q=new, max_seqlen_k=hist + new, num_splits=None,
                             config=cfg)
            return out
        return run, expected, None


class _Expanded(_Spec):
    """The expanded prefill's flash-attention kernel (per-head K/V already expanded)."""
    name = "expanded"
    SHAPES = [dict(B=16, new=64, hist=2048, H=16), dict(B=8, new=1024, hist=0, H=16),
              dict(B=2, new=512, hist=2048, H=128), dict(B=4, new=2048, hist=0, H=128),
              dict(B=2, new=4096, hist=0, H=16)]

    def key(self, s, dtype):
        return _tuning.expanded_class(s["new"], s["N"], s["V"], dtype.itemsize)

    def heuristic(self, s, device):
        from .prefill import _expanded_heuristic
        return _expanded_heuristic(s["new"], _utils.on_hip(device))

    def default_shapes(self, quick):
        shapes = self.SHAPES[3:4] if quick else self.SHAPES
        return [dict(x, page=64, N=128, V=128, P=ROPE) for x in shapes]

    def space(self, key, device, quick):
        hip = _utils.on_hip(device)
        if quick:
            return [dict(BLOCK_M=m, BLOCK_N=64, num_warps=w, num_stages=st) for m, w, st in
                    itertools.product([64, 128], [4, 8], [1] if hip else [2, 3])]
        return [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st) for m, n, w, st in
                itertools.product([64, 128], [32, 64, 128], [4, 8], [1, 2] if hip else [1, 2, 3])]

    def shared_bytes(self, cfg, shape, elem_bytes, hip=False):
        from .prefill import expanded_shared_bytes
        return expanded_shared_bytes(cfg, shape["N"], shape["V"], shape["P"], elem_bytes, hip=hip)

    def build(self, s, device, dtype, gen):
        from .prefill import _expanded_torch, _gather_latent_torch, _launch_expanded
        b, new, hist, h, n, v, p = s["B"], s["new"], s["hist"], s["H"], s["N"], s["V"], s["P"]
        length = hist + new
        pe_cache, table = _paged(b, length, s["page"], p, device, dtype, gen)
        seqlens = torch.full((b,), length, dtype=torch.int32, device=device)
        cu_q_host, cu_k_host = [i * new for i in range(b + 1)], [i * length for i in range(b + 1)]
        cu_q = torch.tensor(cu_q_host, dtype=torch.int32, device=device)
        cu_k = F.pad(torch.cumsum(seqlens, 0), (1, 0))
        kv = torch.randn(b * length, h, n + v, device=device, generator=gen).to(dtype)
        q = torch.randn(b * new, h, n + p, device=device, generator=gen).to(dtype)
        q_nope, q_pe, k_nope, val = q[..., :n], q[..., n:], kv[..., :n], kv[..., n:]
        k_pe = _gather_latent_torch(pe_cache, table, seqlens, cu_k, b * length)
        scale = (n + p) ** -0.5
        expected, _ = _expanded_torch(q_nope, q_pe, k_nope, val, k_pe, cu_q_host, cu_k_host, scale, True)

        def run(cfg):
            out, _ = _launch_expanded(q_nope, q_pe, k_nope, val, pe_cache, table, cu_q, cu_k, seqlens, scale, True,
                                      False, max_seqlen_q=new, config=cfg)
            return out
        return run, expected, None


class _WriteCache(_Spec):
    """``write_cache``'s kernel (bf16 cache; the fp8 classes keep the heuristic until swept)."""
    name = "write_cache"

    def key(self, s, dtype):
        return _tuning.write_cache_class(s["tokens"], s["R"], elem_bytes=dtype.itemsize)

    def heuristic(self, s, device):
        from .cache import _block_t
        return dict(BLOCK_T=_block_t(s["tokens"], s["R"]), num_warps=4)

    def default_shapes(self, quick):
        tokens = [128, 32768] if quick else [16, 128, 4096, 32768]
        return [dict(tokens=t, page=64, R=512, P=ROPE) for t in tokens]

    def space(self, key, device, quick):
        blocks, warps = ([4, 8, 16, 32], [2, 4]) if quick else ([1, 2, 4, 8, 16, 32], [1, 2, 4, 8])
        return [dict(BLOCK_T=t, num_warps=w) for t, w in itertools.product(blocks, warps)]

    def build(self, s, device, dtype, gen):
        from .cache import _launch_write_cache, _write_cache_torch
        n, r, p, page = s["tokens"], s["R"], s["P"], s["page"]
        blocks = 2 * _utils.cdiv(n, page) + 1
        buf = torch.zeros(blocks, page, r + p, device=device, dtype=dtype)
        slots = torch.randperm(blocks * page, device=device, generator=gen)[:n]
        new = torch.randn(n, r + p, device=device, generator=gen).to(dtype)
        expected = torch.zeros_like(buf)
        _write_cache_torch(new[:, :r], new[:, r:], expected[..., :r], expected[..., r:], slots)

        def run(cfg):
            _launch_write_cache(new[:, :r], new[:, r:], buf[..., :r], buf[..., r:], slots, config=cfg)
            return buf
        return run, expected, buf.zero_  # the check runs on a zeroed cache: an unwritten slot shows


SPECS = {s.name: s for s in (_Decode(), _Prefill(), _Expanded(), _WriteCache())}


# --------------------------------------------------------------------------------------------
# the sweep
# --------------------------------------------------------------------------------------------


def _geomean(xs) -> float:
    return math.exp(sum(math.log(max(x, 1e-12)) for x in xs) / len(xs))


class _Bar:
    """A text progress indicator on stderr: ``[kernel class] i/n candidates``."""

    def __init__(self, items, desc: str, total: int | None = None):
        self.items, self.desc = list(items), desc

    def __iter__(self):
        n = len(self.items)
        for i, item in enumerate(self.items):
            sys.stderr.write(f"\r{self.desc}: {i}/{n} candidates ")
            sys.stderr.flush()
            yield item
        sys.stderr.write(f"\r{self.desc}: {n}/{n} candidates\n")


# the Hopper paths a sweep can leave out (``skip``): the config flag that asks each of them
PATH_FLAGS = {"tma": "TMA", "gluon": "GLUON"}


def tune_class(spec: _Spec, key: str, shapes: list[dict], device, dtype, *, timer, check=check_close,
               candidates: list[dict] | None = None, quick: bool = True, log=print, progress=_Bar,
               skip=()) -> dict:
    """Sweep one shape class; returns its result (``winner`` None if every candidate was pruned). ``skip``: paths
    of ``PATH_FLAGS`` whose configs are left out (a GPU session whose parity test of that kernel failed: a fault
    there is sticky and would prune every later candidate, a hang would stop the sweep)."""
    gen = torch.Generator(device=device).manual_seed(0)
    cases, skipped = [], []
    for shape in shapes:
        try:
            cases.append((shape, *spec.build(shape, device, dtype, gen)))
        except torch.OutOfMemoryError:
            skipped.append(spec.label(shape))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    result = dict(kernel=spec.name, shape_class=key, shapes=[spec.label(c[0]) for c in cases],
                  skipped_shapes=skipped, pruned=[], winner=None)
    if not cases:
        return result
    heuristics = [spec.heuristic(c[0], device) for c in cases]
    index = _tuning._gpu_index(device)  # None off a GPU
    with warnings.catch_warnings():  # (that this GPU has no file yet: this sweep is what the warning advises)
        warnings.filterwarnings("ignore", message=_tuning.NO_FILE_WARNING, category=RuntimeWarning)
        table = _tuning._device_table(index) if index is not None else None  # not lookup: no on-demand tuning here
    stored = (table or {}).get(spec.name, {}).get(key)  # the config stored now competes too (if it is one)
    stored = stored if stored is not None and _tuning.config_error(spec.name, stored) is None else None
    pool = {}
    for cfg in heuristics + ([dict(stored)] if stored else []) + (
            candidates if candidates is not None else spec.space(key, device, quick)):
        if not any(cfg.get(PATH_FLAGS[path]) for path in skip):
            pool.setdefault(_key(cfg), cfg)
    times: dict[str, list[float]] = {}

    def prune(cfg, shape, reason) -> None:
        result["pruned"].append(dict(config=cfg, shape=spec.label(shape), reason=reason))
        log(f"  pruned [{config_str(cfg)}] at {spec.label(shape)}: {reason}")

    def measure(cfg) -> None:
        per_shape = []
        for shape, run, expected, reset in cases:
            what = f"{spec.name} {spec.label(shape)} [{config_str(cfg)}]"
            fitted = spec.fitted(cfg, shape, device, dtype)
            if fitted != cfg:  # not compiled: a stored winner must run as timed, and this one would be shrunk
                prune(cfg, shape, f"over the shared-memory estimate: the library would run it as "
                                  f"[{config_str(fitted)}]")
                return
            try:
                if reset is not None:
                    reset()
                out = run(cfg)
                check(what, out, expected, dtype)
                del out
                per_shape.append(float(timer(Run(run, cfg))))
            except AssertionError as exc:
                reason = f"wrong result: {exc}"
            except _tuning._compile_errors() as exc:
                reason = f"does not compile: {type(exc).__name__}: {str(exc)[:300]}"
            except torch.OutOfMemoryError:
                reason = "out of memory"
                torch.cuda.empty_cache()
            except Exception as exc:  # a candidate never stops the sweep
                reason = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
            else:
                continue
            prune(cfg, shape, reason)
            return
        times[_key(cfg)] = per_shape

    for cfg in progress(list(pool.values()), f"{spec.name} {key}", len(pool)):
        measure(cfg)
    if times:
        best = min(times, key=lambda k: _geomean(times[k]))
        for cfg in spec.refine(pool[best], key, device):
            if _key(cfg) not in times:
                pool[_key(cfg)] = cfg
                measure(cfg)
        best = min(times, key=lambda k: _geomean(times[k]))
        result.update(winner=pool[best], after_ms=times[best], after_geomean_ms=_geomean(times[best]))
    before = [times.get(_key(h), [None] * len(cases))[i] for i, h in enumerate(heuristics)]
    result.update(heuristic=[heuristics[i] for i in range(len(cases))], before_ms=before,
                  candidates=len(pool), timed=len(times))
    if times and None not in before:
        result["before_geomean_ms"] = _geomean(before)
        result["speedup"] = result["before_geomean_ms"] / result["after_geomean_ms"]
    return result


def _device_info(device) -> tuple[str, int]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.name, props.multi_processor_count
    return "cpu (Triton interpreter)", _utils.num_sms(device)


def default_out(device) -> str | None:
    """The user's cache file of ``device`` (``mla_kernels.autotune``'s default output): for an index-less "cuda",
    the current GPU's, which the sweep tunes (``_tuning._gpu_index``), not GPU 0's. None off a GPU (a CPU sweep
    with a timer): its interpreter timings belong in no GPU's file (they went to GPU 0's, or failed on a
    CPU-only torch asking for its name)."""
    index = _tuning._gpu_index(device)
    return None if index is None else str(_tuning.user_file(index))


def _check_writable(folder: Path) -> None:
    """Create and remove a file in ``folder``, as saving a winner does (a temporary file there, then a rename), or
    raise a ``PermissionError`` naming it: a folder that exists but cannot be written (another user's) was found
    only when the first class's winner was saved, after its sweep."""
    try:
        handle, name = tempfile.mkstemp(dir=folder, prefix=".mla_kernels-probe-")
        os.close(handle)
        os.unlink(name)
    except OSError as exc:
        raise PermissionError(f"autotune cannot write its results in {folder}: {exc}") from exc


def sweep(kernels=None, shapes: dict | None = None, *, quick: bool = True, device=None, dtype=torch.bfloat16,
          out=None, timer=None, check=check_close, candidates: dict | None = None, budget_s: float | None = None,
          source: str | None = None, log=print, progress=_Bar, on_result=None, skip=()) -> list[dict]:
    """Tune the shape classes of ``shapes`` (kernel -> list of shape dicts; default each kernel's
    ``default_shapes(quick)``) for ``kernels`` (default: all of ``KERNELS``, or the keys of ``shapes``) and write
    each class's winner to ``out`` as soon as it is known (and pass its result to ``on_result``); the configs of
    the paths in ``skip`` ("tma", "gluon") are left out. Returns one result per class."""
    device = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if timer is None:
        if device.type != "cuda":
            raise RuntimeError("mla_kernels autotuning times kernels on a GPU (triton.testing.do_bench): no GPU is "
                               "in use here; pass timer=... to run the sweep machinery without one")
        timer = gpu_timer
    if device.type == "cpu" and not _utils.interpreting():
        raise RuntimeError("autotuning on the CPU runs the kernels through Triton's interpreter: set "
                           "TRITON_INTERPRET=1 before importing triton")
    kernels = list(kernels or (shapes.keys() if shapes else KERNELS))
    unknown = [k for k in kernels if k not in SPECS]
    if unknown:
        raise ValueError(f"kernels: unknown {unknown}; choose from {list(KERNELS)}")
    if isinstance(skip, str) or any(path not in PATH_FLAGS for path in skip):
        raise ValueError(f"skip: a list of paths from {list(PATH_FLAGS)}, got {skip!r}")
    if out is not None:  # a place that cannot be written fails now, not after the first class's sweep
        if Path(out).is_dir():
            raise IsADirectoryError(f"out must be a JSON file to write, {out} is a directory")
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        _check_writable(Path(out).parent)
    name, sms = _device_info(device)
    source = source or f"mla_kernels autotune{' --quick' if quick else ''} on {name}"
    start, results = time.monotonic(), []
    for kernel in kernels:
        spec = SPECS[kernel]
        classes: dict[str, list[dict]] = {}
        for shape in (shapes or {}).get(kernel) or spec.default_shapes(quick):
            classes.setdefault(spec.key(shape, dtype), []).append(shape)
        for key, members in classes.items():
            if budget_s is not None and time.monotonic() - start > budget_s:
                log(f"budget of {budget_s:.0f} s spent: {kernel} {key} not tuned")
                results.append(dict(kernel=kernel, shape_class=key, winner=None, note="not tuned: budget spent"))
                if on_result is not None:
                    on_result(results[-1])
                continue
            with _utils.launch_device(device):  # do_bench and Triton time and launch on the current GPU
                res = tune_class(spec, key, members, device, dtype, timer=timer, check=check,
                                 candidates=(candidates or {}).get(kernel), quick=quick, log=log, progress=progress,
                                 skip=skip)
            results.append(res)
            if res["winner"] is not None and out is not None:
                _tuning.save_file(out, device=name, sm_count=sms, source=source,
                                  kernels={kernel: {key: res["winner"]}})
                _tuning.forget_own(device, kernel, key, out)  # (an on-demand caller keeps the winner it is handed)
            log(format_result(res))
            if on_result is not None:
                on_result(res)
    if out is not None:
        _tuning.reload()
    return results


def format_result(res: dict) -> str:
    """One class's before (heuristic) / after (winner) lines."""
    head = f"{res['kernel']:<12} {res['shape_class']:<22}"
    if res.get("winner") is None:
        why = res.get("note") or f"no candidate passed ({len(res.get('pruned', []))} pruned)"
        return f"{head} NOT TUNED: {why}"
    before = res.get("before_geomean_ms")
    heur = " | ".join(sorted({config_str(h) for h in res["heuristic"]}))
    lines = [f"{head} before {before:10.4f} ms  [{heur}]" if before is not None else
             f"{head} before {'n/a':>10}     [{heur}] (the heuristic was pruned)",
             f"{'':<35} after  {res['after_geomean_ms']:10.4f} ms  [{config_str(res['winner'])}]"
             + (f"  x{res['speedup']:.2f}" if "speedup" in res else "")
             + f"  ({res['timed']}/{res['candidates']} timed, {len(res['pruned'])} pruned, "
               f"{len(res['shapes'])} shapes, geometric mean)"]
    return "\n".join(lines)


def tune_on_demand(kernel: str, shape_class: str, device_index: int) -> dict | None:
    """``MLA_KERNELS_AUTOTUNE=1``: tune one class with its quick benchmark shapes (widths from the class key) and
    write the winner to the user's cache file. None if the class has no benchmark shape."""
    spec = SPECS[kernel]
    widths = spec.widths_of(shape_class)
    dtype = torch.float32 if _tuning.class_elem_bytes(shape_class) == 4 else torch.bfloat16  # (the class's own)
    candidates = (ON_DEMAND_SHAPES or {}).get(kernel) or spec.default_shapes(True) + spec.default_shapes(False)
    shapes = []
    for shape in candidates:
        shape = dict(shape, **{k: v for k, v in widths.items() if k in shape})
        if spec.key(shape, dtype) == shape_class and shape not in shapes:
            shapes.append(shape)
    if not shapes:
        return None
    device = torch.device("cuda", device_index) if torch.cuda.is_available() else torch.device("cpu")
    res = sweep([kernel], {kernel: shapes[:2]}, quick=True, device=device, dtype=dtype, timer=ON_DEMAND_TIMER,
                out=_tuning.user_file(device_index), source=f"{_tuning.AUTOTUNE_ENV}=1 (on first use)",
                log=lambda msg: print(msg, file=sys.stderr))
    return res[0].get("winner") if res else None


# --------------------------------------------------------------------------------------------
# the public entry point
# --------------------------------------------------------------------------------------------

SHAPE_DEFAULTS = {
    "decode": dict(B=128, ctx=4096, H=16, S_q=1, page=64, R=512, P=ROPE),
    "prefill": dict(B=4, new=1024, hist=0, H=16, page=64, R=512, P=ROPE),
    "expanded": dict(B=4, new=2048, hist=0, H=128, page=64, N=128, V=128, P=ROPE),
    "write_cache": dict(tokens=128, page=64, R=512, P=ROPE),
}


def _check_sizes(kernel: str, shape: dict) -> dict:
    """``shape`` if its sizes are ones the kernel's calls accept, else a ValueError naming the bad one (a shape
    the library refuses would only be pruned, every candidate with it, and the class reported untuned)."""
    for name, value in shape.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"shapes[{kernel!r}]: {name} must be an int, got {value!r}")
        if name in ("R", "P", "N", "V"):
            if not _utils.is_pow2(value) or not 16 <= value <= 1024:
                raise ValueError(f"shapes[{kernel!r}]: {name} must be a power of two from 16 to 1024, got {value}")
        elif value < (0 if name == "hist" else 1):
            raise ValueError(f"shapes[{kernel!r}]: {name} must be {'>= 0' if name == 'hist' else '>= 1'}, "
                             f"got {value}")
    if kernel == "decode" and shape["ctx"] < shape["S_q"]:
        raise ValueError(f"shapes['decode']: ctx {shape['ctx']} must hold the S_q = {shape['S_q']} new tokens")
    return shape


def autotune(shapes: dict | None = None, *, kernels=None, quick: bool = True, device=None, dtype=torch.bfloat16,
             out=None, timer=None, budget_s: float | None = None, log=print) -> list[dict]:
    """Tune kernel configs on the current GPU and cache the winners for this GPU (opt-in; never done by default).

    Args:
        shapes: ``{kernel: [shape, ...]}`` with kernel one of "decode", "prefill" (absorbed), "expanded",
            "write_cache"; each shape a dict of the call's sizes, the rest filled from ``SHAPE_DEFAULTS``:
            decode ``B, ctx, H, S_q, page, R, P``; prefill and expanded ``B, new, hist, H, page`` (and ``R, P``
            or ``N, V, P``); write_cache ``tokens, page, R, P``. E.g. ``{"decode": [dict(H=128), dict(H=16, S_q=2)]}``.
            The shape classes these fall in are tuned (every shape of a class is a benchmark case of it).
            None: a default set (every class of ``kernels``; ``quick`` picks fewer shapes and configs).
        kernels: which kernels, a list or a comma-separated string (default: those of ``shapes``, else all four).
        out: the JSON file to write (default: the user's cache file of this GPU,
            ``$XDG_CACHE_HOME/mla_kernels/<device>.json`` or ``~/.cache/mla_kernels/<device>.json``), which the
            library then reads before the configs shipped for this GPU. Winners are merged into it. Off a GPU
            (``device="cpu"`` with a ``timer``) nothing is written unless ``out`` is given.
        timer: ``timer(fn) -> milliseconds``; default ``triton.testing.do_bench``'s median, which needs a GPU.
        budget_s: stop starting new shape classes after this many seconds.

    Returns one dict per shape class: the winner, the heuristic's and the winner's times, the pruned configs.
    Raises ``RuntimeError`` on a machine without a GPU unless a ``timer`` is given. Each candidate is checked
    against the PyTorch path before it is timed; one that fails to compile or is wrong is pruned and reported.
    ``MLA_KERNELS_AUTOTUNE=1`` instead tunes each missing shape class the first time a call needs it.
    """
    if out is not None and not isinstance(out, (str, os.PathLike)):  # (Path() raised naming no argument)
        raise TypeError(f"out must be a file path (str or os.PathLike) or None, got {type(out).__name__}")
    if isinstance(kernels, str):  # "decode" or "decode,prefill", as on the command line
        kernels = [k.strip() for k in kernels.split(",") if k.strip()]
    if kernels is not None:
        kernels = list(dict.fromkeys(_utils.as_list("kernels", kernels, "kernel names")))
        if not kernels:
            raise ValueError(f"kernels: none given; choose from {list(KERNELS)} (or None: all of them)")
    quick = _utils.check_flag("quick", quick)  # (a truthy string or None picked the quick or the full sweep)
    if dtype not in TUNED_DTYPES:
        raise TypeError(f"dtype must be one of {list(TUNED_DTYPES)}, got {dtype!r}")
    if budget_s is not None and (isinstance(budget_s, bool) or not isinstance(budget_s, (int, float))):
        raise TypeError(f"budget_s must be a number of seconds or None, got {budget_s!r}")
    if budget_s is not None and not budget_s >= 0:  # (-1 tuned nothing, NaN ignored the budget; the CLI refuses both)
        raise ValueError(f"budget_s must be >= 0 seconds (or None: no budget), got {budget_s!r}")
    if timer is not None and not callable(timer):  # (every candidate was pruned "failed: TypeError", nothing tuned)
        raise TypeError(f"timer must be a callable fn -> milliseconds, or None (do_bench), got {timer!r}")
    progress = _Bar
    if log is None:  # quiet (it raised TypeError after the first class was swept and written), the bar too
        log = lambda msg: None  # noqa: E731
        progress = lambda items, desc, total=None: items  # noqa: E731
    elif not callable(log):
        raise TypeError(f"log must be a callable taking a message, or None, got {log!r}")
    if shapes is not None:
        if not isinstance(shapes, dict):
            raise TypeError(f"shapes must be a dict kernel -> list of shape dicts, got {type(shapes).__name__}")
        filled = {}
        for kernel, items in shapes.items():
            if kernel not in SPECS:
                raise ValueError(f"shapes: unknown kernel {kernel!r}; choose from {list(KERNELS)}")
            if not isinstance(items, (list, tuple)) or not all(isinstance(item, dict) for item in items):
                raise TypeError(f"shapes[{kernel!r}] must be a list of dicts of sizes, got {items!r}")
            if not items:  # (the sweep took an empty list for none given: the kernel's whole default set)
                raise ValueError(f"shapes[{kernel!r}] is empty: give at least one shape, or leave {kernel!r} out")
            filled[kernel] = []
            for item in items:
                extra = set(item) - set(SHAPE_DEFAULTS[kernel])
                if extra:
                    raise ValueError(f"shapes[{kernel!r}]: unknown sizes {sorted(extra)}; "
                                     f"known: {list(SHAPE_DEFAULTS[kernel])}")
                filled[kernel].append(_check_sizes(kernel, dict(SHAPE_DEFAULTS[kernel], **item)))
        shapes = filled
        left_out = [kernel for kernel in shapes if kernels is not None and kernel not in kernels]
        if left_out:  # (their shapes were dropped silently, and the kernels named tuned at their default shapes)
            raise ValueError(f"shapes names {left_out}, which kernels={kernels} leaves out: their shapes would not "
                             "be tuned")
    device = _utils.check_device("device", device) if device is not None else (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    if device.type not in ("cuda", "cpu"):  # (the sweep's generator failed inside torch, naming no argument)
        raise ValueError(f"device {str(device)!r}: mla_kernels.autotune times kernels on a GPU (or, with a timer, "
                         f"on the CPU through Triton's interpreter)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"mla_kernels.autotune: device={device} but no GPU is visible to torch here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        # (torch's AssertionError "Invalid device id", naming no argument, came from the sweep's first device query)
        raise ValueError(f"device {str(device)!r} names GPU {device.index}, but torch sees "
                         f"{torch.cuda.device_count()}")
    if timer is None and device.type != "cuda":
        raise RuntimeError("mla_kernels.autotune needs a GPU: it times kernels with triton.testing.do_bench "
                           "(pass timer=... to run it without one, e.g. in tests)")
    return sweep(kernels, shapes, quick=quick, device=device, dtype=dtype,
                 out=out if out is not None else default_out(device), timer=timer, budget_s=budget_s, log=log,
                 progress=progress)
