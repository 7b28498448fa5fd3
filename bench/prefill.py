"""MLA prefill over a paged latent cache: seed 003's prefill scenario and a sweep of new length x history x heads.

    python -m bench.prefill [--quick] [--device cuda] [--cuda-graph] [--plot] [--out DIR] [--calibrate [FILE]]

Providers, all with the raw query in and [T, H, D_v] out, each checked against naive MLA in float32
(``reference.naive_mla`` per request) before timing:
  absorbed   ``mla_prefill_attention(path="absorbed")``: q @ W_UK, ``mla_prefill`` over the latent, @ W_UV
  expanded   ``mla_prefill_attention(path="expanded")``: the latent gathered and expanded through kv_b_proj,
             then the causal varlen flash-attention kernel
  auto       ``mla_prefill_attention(path="auto")``: the cost model's choice
  (these three with the host lengths, ``cu_seqlens_q_host``/``cache_seqlens_host``, as ``MLAttention`` calls
  them: no read back from the GPU; the H100 timings of 2026-11-22 were of calls that synchronised)
  naive      per request: gather the latent, decompress it through kv_b_proj, SDPA with a causal mask
TFLOP/s count the attention as standard attention computes it, 2 H pairs (D_nope + P + D_v), for every
provider, so rates compare like for like; ``path_tflops`` counts what each path executes (``prefill_flops``).
The sweep reports, per case, auto's time over the faster path's, and per (B, history, H) the measured crossover
(first new length at which expanded beats absorbed). ``--calibrate`` (GPU only) then fits the path-choice time
model's constants (``mla_kernels._prefill_cost``: launch cost, kernel rates; bandwidth = the copy rate measured
in the same run) to the timed runs, prints the model's estimates and crossovers beside the measured ones, and
writes the constants into FILE (default: this GPU's shipped config file, ``mla_kernels/configs/<gpu>.json``)
with ``_tuning.save_file``, which merges them into what is there.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from mla_kernels.reference import naive_mla

from . import _harness as h
from .decode import SEED_SMALL, MLAShape, make_weights

SEED_NEW = [64, 128, 256, 256]
SEED_HISTORY = [512, 0, 0, 256]
SEED_WARMUPS, SEED_RUNS = 10, 100
SEED_MS = 2.22  # seed 003's sample output: their implementation on their GPU
PAGE = 64
PROVIDERS = ["naive", "absorbed", "expanded", "auto"]
SPLIT_TOKENS = 2048  # the seed scenario's batch-invariant row (split_tokens; bench.decode's +split rows use 2048)
CPU_SEED_BUDGET_S = 6.0  # per provider: the CPU run must finish in about two minutes in all
SAMPLE_ROWS = 64  # rows checked at each end of a long request (see reference_rows)


def library():
    """(mla_prefill_attention, prefill module), or exit with a message."""
    try:
        from mla_kernels import mla_prefill_attention
        from mla_kernels import prefill
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"mla_kernels.mla_prefill_attention is not importable ({exc}); nothing to benchmark")
    return mla_prefill_attention, prefill


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    """One ragged prefill batch: new tokens packed by cu_seqlens_q over a paged cache holding history + new."""

    shape: MLAShape
    new: list
    history: list
    q_nope: torch.Tensor  # [T, H, D_nope], not absorbed
    q_pe: torch.Tensor  # [T, H, P]
    kv_cache: torch.Tensor  # [N, page, R], view of one [N, page, R+P] buffer
    pe_cache: torch.Tensor  # [N, page, P]
    block_table: torch.Tensor  # [B, max_blocks] int32
    cu_seqlens_q: torch.Tensor  # [B+1] int32
    cache_seqlens: torch.Tensor  # [B] int32
    w_kv_b: torch.Tensor  # [H * (D_nope + D_v), R]

    @property
    def lens(self) -> list:
        return [n + p for n, p in zip(self.new, self.history)]

    def args(self):
        return (self.q_nope, self.q_pe, self.kv_cache, self.pe_cache, self.block_table, self.cu_seqlens_q,
                self.cache_seqlens, self.w_kv_b, self.shape.softmax_scale)

    def host_lengths(self) -> dict:
        """The lengths as the caller holds them on the host (as ``MLAttention`` passes them): no read back."""
        return dict(cu_seqlens_q_host=list(itertools.accumulate(self.new, initial=0)), cache_seqlens_host=self.lens)


def make_case(shape: MLAShape, new, history, page: int, dtype, device, seed: int = 0) -> Case:
    """Random queries, cache (shuffled blocks) and kv_b_proj weight for requests with the given new and
    history lengths; the new tokens are already in the cache."""
    s = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    lens = [n + p for n, p in zip(new, history)]
    blocks = [max(1, math.ceil(n / page)) for n in lens]
    num_blocks = sum(blocks) + 1
    buf = torch.randn(num_blocks, page, s.d_latent + s.d_rope, device=device, dtype=dtype, generator=gen)
    perm = torch.randperm(num_blocks, device=device, generator=gen).to(torch.int32)
    table = torch.zeros(len(lens), max(blocks), dtype=torch.int32, device=device)
    start = 0
    for b, n in enumerate(blocks):
        table[b, :n] = perm[start:start + n]
        start += n
    w_kv_b, _, _ = make_weights(s, dtype, device, gen)
    tokens = sum(new)
    q_nope = torch.randn(tokens, s.heads, s.d_nope, device=device, dtype=dtype, generator=gen)
    q_pe = torch.randn(tokens, s.heads, s.d_rope, device=device, dtype=dtype, generator=gen)
    cu = torch.tensor([0] + [sum(new[:i + 1]) for i in range(len(new))], dtype=torch.int32, device=device)
    return Case(s, list(new), list(history), q_nope, q_pe, buf[..., :s.d_latent], buf[..., s.d_latent:], table, cu,
                torch.tensor(lens, dtype=torch.int32, device=device), w_kv_b)


def _gather(cache, block_ids, length):
    """The first ``length`` tokens of one request: cache [N, page, D] -> [length, D]."""
    pos = torch.arange(length, device=cache.device)
    return cache[block_ids.long()[pos // cache.shape[1]], pos % cache.shape[1]]


def case_bytes(shape: MLAShape, new, history, page: int, elem: int = 2) -> int:
    s, lens = shape, [n + p for n, p in zip(new, history)]
    cache = (sum(math.ceil(n / page) for n in lens) + 1) * page * (s.d_latent + s.d_rope) * elem
    return cache + sum(new) * s.heads * (s.d_nope + s.d_rope + s.d_v) * elem


def provider_bytes(name: str, shape: MLAShape, new, history, elem: int = 2) -> int:
    """Workspace beyond the inputs, estimated from each provider's largest intermediates."""
    s, lens = shape, [n + p for n, p in zip(new, history)]
    if name == "naive":  # per request: decompressed K/V, K with rope, scores and probabilities [H, S, L]
        return max(n * s.heads * (2 * s.d_nope + s.d_rope + 2 * s.d_v) * elem + 12 * s.heads * q * n
                   for q, n in zip(new, lens))
    if name == "reference":  # float32, per request, at most 2 * SAMPLE_ROWS query rows
        return max(n * s.heads * (2 * s.d_nope + s.d_rope + 2 * s.d_v) * 4 + 12 * s.heads * min(q, 2 * SAMPLE_ROWS) * n
                   for q, n in zip(new, lens))
    if name == "expanded":
        return sum(lens) * (s.d_latent * elem + s.heads * (s.d_nope + s.d_v) * elem)
    return sum(new) * s.heads * (2 * s.d_latent + s.d_v) * elem  # absorbed q, latent output, projection


# ------------------------------------------------------------------------------------------------
# providers
# ------------------------------------------------------------------------------------------------


def naive_prefill(case: Case):
    """The decompressed path, one request at a time: gather its latent and rope key, expand the latent through
    kv_b_proj into per-head K_nope/V, SDPA with a causal mask offset by the history. Returns [T, H, D_v]."""
    s = case.shape
    outs = []
    start = 0
    for b, (n, length) in enumerate(zip(case.new, case.lens)):
        if n == 0:
            continue
        latent = _gather(case.kv_cache, case.block_table[b], length)  # [L, R]
        k_pe = _gather(case.pe_cache, case.block_table[b], length)  # [L, P]
        kv = (latent @ case.w_kv_b.T).view(length, s.heads, s.d_nope + s.d_v)
        k = torch.cat([kv[..., :s.d_nope], k_pe[:, None, :].expand(-1, s.heads, -1)], dim=-1)
        q = torch.cat([case.q_nope[start:start + n], case.q_pe[start:start + n]], dim=-1)
        q_pos = torch.arange(n, device=q.device) + (length - n)
        mask = torch.arange(length, device=q.device)[None, :] <= q_pos[:, None]  # [S, L]
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), kv[..., s.d_nope:].transpose(0, 1),
                                             attn_mask=mask, scale=s.softmax_scale)  # [H, S, D_v]
        outs.append(out.transpose(0, 1))
        start += n
    return torch.cat(outs) if outs else case.q_nope.new_zeros(0, s.heads, s.d_v)


def reference_rows(case: Case, sample: int | None = SAMPLE_ROWS):
    """Rows to check and their values from ``reference.naive_mla`` in float32 on the case's device:
    (row index [M], expected [M, H, D_v]). With ``sample``, only the first and last ``sample`` new tokens of
    each request (the first see the shortest key range, the last the whole cache), which keeps the reference's
    [H, rows, L] scores small at long lengths; None checks every row."""
    s = case.shape
    rows, outs = [], []
    start = 0
    for b, (n, length) in enumerate(zip(case.new, case.lens)):
        if n:
            kv_c = _gather(case.kv_cache, case.block_table[b], length).float()
            k_pe = _gather(case.pe_cache, case.block_table[b], length).float()
            spans = [(0, n)] if sample is None or n <= 2 * sample else [(0, sample), (n - sample, n)]
            for lo, hi in spans:  # token i sits at position history + i: keys up to history + hi
                keys = length - n + hi
                rows.append(torch.arange(start + lo, start + hi, device=kv_c.device))
                outs.append(naive_mla(case.q_nope[start + lo:start + hi].float(), case.q_pe[start + lo:start + hi].float(),
                                      kv_c[:keys], k_pe[:keys], case.w_kv_b.float(), s.softmax_scale)[0])
        start += n
    if not rows:
        return torch.zeros(0, dtype=torch.long), case.q_nope.new_zeros(0, s.heads, s.d_v, dtype=torch.float32)
    return torch.cat(rows), torch.cat(outs)


def check_then_time(name, fn, rows, expected, device, dtype, **time_kw):
    """Run ``fn`` once, check its sampled rows against the reference, then time it. Returns (timing, error)."""
    out = fn()
    h.synchronize(device)
    err = h.check_close(name, out[rows], expected, dtype)
    del out
    return h.time_fn(fn, device, **time_kw), err


def providers(case: Case, lib) -> dict:
    attention, _ = lib
    args, host = case.args(), case.host_lengths()
    table = {"naive": lambda: naive_prefill(case)}
    for path in ("absorbed", "expanded", "auto"):
        table[path] = lambda path=path: attention(*args, path=path, **host)
    return table


def model_flops(shape: MLAShape, new, history) -> int:
    """Attention FLOPs as standard attention counts them: 2 H pairs (D_nope + P + D_v)."""
    from mla_kernels.prefill import attended_pairs

    pairs = attended_pairs(new, [n + p for n, p in zip(new, history)])
    return 2 * shape.heads * pairs * (shape.d_nope + shape.d_rope + shape.d_v)


def path_flops(shape: MLAShape, new, history) -> dict:
    from mla_kernels.prefill import prefill_flops

    s = shape
    return prefill_flops(new, [n + p for n, p in zip(new, history)], s.heads, s.d_latent, s.d_rope, s.d_nope, s.d_v)


def auto_choice(shape: MLAShape, new, history, device=None) -> str:
    """The path ``mla_prefill_attention(path="auto")`` takes for queries on ``device``: its choice reads that
    device's config file (calibrated constants, tuned tiles); without ``device`` it would be the defaults'."""
    from mla_kernels.prefill import choose_prefill_path

    s = shape
    return choose_prefill_path(new, [n + p for n, p in zip(new, history)], s.heads, s.d_latent, s.d_rope, s.d_nope,
                               s.d_v, device=device)


# ------------------------------------------------------------------------------------------------
# seed 003's prefill scenario
# ------------------------------------------------------------------------------------------------


def seed_scenario(device, dtype, lib, warmups: int = SEED_WARMUPS, runs: int = SEED_RUNS) -> dict:
    """4 requests, new [64, 128, 256, 256], history [512, 0, 0, 256], seed 003's small config (16 heads).

    Per provider: one checked run, ``warmups`` warm-ups, ``runs`` timed runs of the whole batch; mean
    latency per batch (CUDA events on a GPU). On a CPU the counts shrink to fit CPU_SEED_BUDGET_S per
    provider, and the JSON records the counts used.
    """
    shape = SEED_SMALL
    case = make_case(shape, SEED_NEW, SEED_HISTORY, PAGE, dtype, device)
    rows, expected = reference_rows(case, sample=None)
    cpu = h.is_cpu(device)
    results = {}
    attention, _ = lib
    args, host = case.args(), case.host_lengths()
    seed_providers = dict(providers(case, lib),  # the batch-invariant mode's cost, beside the default it replaces
                          **{"absorbed+split": lambda: attention(*args, split_tokens=SPLIT_TOKENS, **host)})
    for name, fn in seed_providers.items():
        sw = h.Stopwatch(device)
        with sw:
            out = fn()
        first_ms = sw.times_ms()[0]
        try:
            err = h.check_close(f"seed scenario {name}", out[rows], expected, dtype)
        except h.WrongResult as exc:
            results[name] = {"wrong": True, "error": str(exc)}
            continue
        n_warm, n_runs = warmups, runs
        if cpu:
            per_run_s = max(first_ms * 1e-3, 1e-4)
            n_runs = max(3, min(runs, int(CPU_SEED_BUDGET_S / per_run_s) - warmups))
            n_warm = min(warmups, max(1, int(CPU_SEED_BUDGET_S / per_run_s) - n_runs))
        for _ in range(n_warm):
            fn()
        sw = h.Stopwatch(device)
        for _ in range(n_runs):
            with sw:
                fn()
        timing = h.Timing.from_times(sw.times_ms(), "cuda-events" if device.type == "cuda" else "perf_counter")
        results[name] = {"mean_ms": timing.mean, "timing": timing.to_dict(), "warmups": n_warm, "runs": n_runs,
                         "rel_rms_err": err, "model_tflops": model_flops(shape, SEED_NEW, SEED_HISTORY)
                         / (timing.mean * 1e-3) / 1e12}
    return {
        "requests": len(SEED_NEW), "new": SEED_NEW, "history": SEED_HISTORY, "page": PAGE,
        "shape": dataclasses.asdict(shape), "dtype": str(dtype), "warmups": warmups, "runs": runs,
        "auto_chooses": auto_choice(shape, SEED_NEW, SEED_HISTORY, case.q_nope.device),
        "seed_ms": SEED_MS,
        "seed_note": "seed 003's sample output, their implementation on their (unnamed) GPU: not the same machine",
        "providers": results,
    }


def print_seed(res: dict) -> None:
    print(f"Seed 003 prefill: new {res['new']}, history {res['history']}, {res['shape']['heads']} heads, "
          f"page {res['page']}, {res['dtype']}; auto chooses {res['auto_chooses']}")
    for name, r in res["providers"].items():
        if r.get("wrong"):
            print(f"  {name:<10} NOT TIMED, WRONG RESULT: {r['error']}")
            continue
        t = r["timing"]
        print(f"  {name:<10} mean {r['mean_ms']:9.3f} ms +- {t['std']:.3f} (p50 {t['p50']:.3f}, min {t['min']:.3f})"
              f"  {r['model_tflops']:7.3f} TFLOP/s   [{r['warmups']} warm-ups, {r['runs']} runs]")
    naive = res["providers"].get("naive", {}).get("mean_ms")
    for name in ("absorbed", "expanded", "auto"):
        ours = res["providers"].get(name, {}).get("mean_ms")
        if ours:
            vs_naive = f", x{naive / ours:.2f} vs naive" if naive else ""
            print(f"  {name:<10} x{SEED_MS / ours:.2f} vs seed 003's {SEED_MS} ms{vs_naive}")
    print(f"  seed 003's {SEED_MS} ms is their implementation on their GPU, not this machine")


# ------------------------------------------------------------------------------------------------
# sweep
# ------------------------------------------------------------------------------------------------


def sweep_shapes(cpu: bool, quick: bool):
    """(B, new, history, H) tuples; every request of a batch has the same lengths."""
    if cpu:
        return [(2, 16, 256, 16), (2, 128, 0, 16)] if quick else \
            [(2, 16, 0, 16), (2, 16, 256, 16), (2, 128, 0, 16), (2, 128, 256, 16)]
    news = [16, 128, 512, 2048] if quick else [16, 64, 128, 256, 512, 1024, 2048, 4096]
    histories = [0, 4096] if quick else [0, 1024, 4096, 16384]
    grid = [(8, n, p, hd) for hd in (16, 128) for p in histories for n in news]
    return grid + [(8, 4096, 0, 128)] if quick else grid


def run_shape(batch, new, history, heads, device, dtype, lib, time_kw) -> list[dict]:
    shape = dataclasses.replace(SEED_SMALL, heads=heads)
    keys = dict(B=batch, new=new, hist=history, H=heads)
    news, hists = [new] * batch, [history] * batch
    need = case_bytes(shape, news, hists, PAGE, dtype.itemsize) + provider_bytes("reference", shape, news, hists)
    if not h.fits(need, device):
        note = f"skipped: inputs + reference need ~{h.gib(need)}, {h.gib(h.free_memory(device))} free"
        return [h.make_row(name, None, note=note, **keys) for name in PROVIDERS]
    case = make_case(shape, news, hists, PAGE, dtype, device)
    check_rows, expected = reference_rows(case)
    flops = model_flops(shape, news, hists)
    per_path = path_flops(shape, news, hists)
    fns = providers(case, lib)
    chosen = auto_choice(shape, news, hists, case.q_nope.device)  # what path="auto" runs for these queries
    rows = {}
    for name in PROVIDERS:
        extra = provider_bytes(name if name != "auto" else chosen, shape, news, hists)
        if not h.fits(extra, device):
            rows[name] = h.make_row(name, None, note=f"skipped: needs ~{h.gib(extra)} more", **keys)
            continue
        try:
            timing, err = check_then_time(name, fns[name], check_rows, expected, device, dtype, **time_kw)
        except Exception as exc:  # out of memory, wrong, or failing to compile or launch: the sweep goes on
            rows[name] = h.untimed_row(name, exc, **keys)
            continue
        row = h.make_row(name, timing, flops=flops, rel_rms_err=err, **keys)
        executed = per_path.get(name if name != "auto" else chosen)
        if executed is not None:
            row.update(path_flops=executed, path_tflops=executed / (timing.p50 * 1e-3) / 1e12)
        if name == "auto":
            row["note"] = f"chose {chosen}"
        rows[name] = row
    if "p50_ms" in rows.get("naive", {}):
        for name in ("absorbed", "expanded", "auto"):
            if "p50_ms" in rows.get(name, {}):
                rows[name]["speedup"] = f"x{rows['naive']['p50_ms'] / rows[name]['p50_ms']:.2f} vs naive"
    del case, check_rows, expected
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return [rows[n] for n in PROVIDERS]


def run_sweep(device, dtype, lib, quick: bool, cuda_graph: bool, rows: list | None = None) -> list[dict]:
    """The sweep's rows, appended to ``rows`` (a list the caller holds) as each shape finishes."""
    cpu = h.is_cpu(device)
    time_kw = dict(rep_ms=100.0, warmup_ms=25.0, cuda_graph=cuda_graph)
    if cpu:
        time_kw.update(rep_ms=0.0, warmup_ms=0.0, min_runs=3)
    keys = ("B", "new", "hist", "H")
    print(h.table_header(keys))
    rows = [] if rows is None else rows
    for batch, new, history, heads in h.progress(sweep_shapes(cpu, quick), "prefill sweep"):
        for row in run_shape(batch, new, history, heads, device, dtype, lib, time_kw):
            h.log(h.format_row(row, keys))
            rows.append(row)
    return rows


def crossover(rows: list[dict]) -> dict:
    """Where expanded starts beating absorbed, per (B, history, H), and the two paths' achieved-speed ratio.

    ``relative_speed`` per shape = (absorbed FLOPs / its time) / (expanded FLOPs / its time), whole paths (the
    FLOP-only model's ratio; the time model's constants come from ``--calibrate``).
    ``auto_regret`` = auto's time over the faster path's, per shape; ``per_case`` lists them with both paths' times.
    """
    timed = {(r["B"], r["new"], r["hist"], r["H"], r["provider"]): r for r in rows if "p50_ms" in r}
    groups = sorted({(b, p, hd) for (b, _, p, hd, _) in timed})
    per_group, ratios, regrets, per_case = [], [], [], []
    for b, p, hd in groups:
        news = sorted({n for (b2, n, p2, h2, _) in timed if (b2, p2, h2) == (b, p, hd)})
        first = None
        for n in news:
            a, e = timed.get((b, n, p, hd, "absorbed")), timed.get((b, n, p, hd, "expanded"))
            if not (a and e):
                continue
            ratios.append((a["path_flops"] / a["p50_ms"]) / (e["path_flops"] / e["p50_ms"]))
            auto = timed.get((b, n, p, hd, "auto"))
            if auto:
                regrets.append(auto["p50_ms"] / min(a["p50_ms"], e["p50_ms"]))
                per_case.append({"B": b, "new": n, "hist": p, "H": hd, "absorbed_ms": a["p50_ms"],
                                 "expanded_ms": e["p50_ms"], "auto_ms": auto["p50_ms"],
                                 "auto_chose": auto.get("note", "").replace("chose ", ""),
                                 "faster": "absorbed" if a["p50_ms"] <= e["p50_ms"] else "expanded",
                                 "auto_over_faster": regrets[-1]})
            if first is None and e["p50_ms"] < a["p50_ms"]:
                first = n
        pairs_per_history_key = None
        if first is not None and p > 0:
            pairs_per_history_key = (first * p + first * (first + 1) / 2) / p
        per_group.append({"B": b, "hist": p, "H": hd, "first_new_len_expanded_faster": first,
                          "pairs_per_history_key_there": pairs_per_history_key})
    return {
        "per_group": per_group,
        "relative_speed_median": statistics.median(ratios) if ratios else None,
        "relative_speed_all": ratios,
        "auto_regret_max": max(regrets) if regrets else None,
        "per_case": per_case,
        "note": "FLOP crossover at relative speed 1: 170.7 attended pairs per history key (DeepSeek widths)",
    }


def print_crossover(res: dict, cpu: bool) -> None:
    print("\nCrossover (first new length where expanded beats absorbed):" + (" CPU PyTorch path" if cpu else ""))
    for g in res["per_group"]:
        where = g["first_new_len_expanded_faster"]
        extra = f" ({g['pairs_per_history_key_there']:.0f} pairs per history key)" if g[
            "pairs_per_history_key_there"] else ""
        print(f"  B={g['B']} history={g['hist']:>6} H={g['H']:>3}: "
              f"{'never in this sweep' if where is None else f'new = {where}'}{extra}")
    if res["relative_speed_median"] is not None:
        print(f"  absorbed/expanded achieved FLOP/s, median {res['relative_speed_median']:.2f} "
              f"(whole paths; the FLOP crossover is 170.7 pairs per history key at 1.0)")
    if res["auto_regret_max"] is not None:
        print(f"  auto's worst time over the faster path's: x{res['auto_regret_max']:.2f}")
    for c in res.get("per_case", []):
        print(f"  B={c['B']} new={c['new']:>5} history={c['hist']:>6} H={c['H']:>3}: "
              f"absorbed {c['absorbed_ms']:.3f} ms, expanded {c['expanded_ms']:.3f} ms, "
              f"auto {c['auto_ms']:.3f} ms ({c['auto_chose']}): "
              f"x{c['auto_over_faster']:.2f} of the faster ({c['faster']})")


# ------------------------------------------------------------------------------------------------
# calibration of the path choice (--calibrate)
# ------------------------------------------------------------------------------------------------

FIT_PATHS = ("absorbed", "expanded")


def calibration_records(payload: dict, device=None) -> list[dict]:
    """Fit records for ``mla_kernels._prefill_cost.fit`` from a run's results: every timed absorbed / expanded
    sweep row (p50) and the seed scenario's absorbed / expanded means (auto's too, as the path it ran). Each
    carries the expanded kernel's BLOCK_M on ``device`` (the tiles its rows are padded to) and the launches per
    call of the code that ran (the run's ``config.launches``, when it recorded them)."""
    from mla_kernels.prefill import _expanded_config

    dev = torch.device("cpu") if device is None else torch.device(device)
    launches = payload.get("config", {}).get("launches") or {}
    recs = []

    def add(name, new, history, shape, path, ms):
        recs.append(dict(name=name, new=list(new), cache_lens=[n + p for n, p in zip(new, history)],
                         heads=shape["heads"], d_latent=shape["d_latent"], d_rope=shape["d_rope"],
                         d_nope=shape["d_nope"], d_v=shape["d_v"], path=path, ms=float(ms),
                         block_m=_expanded_config(max(new, default=0), dev)["BLOCK_M"], launches=launches.get(path)))

    for r in payload.get("sweep", []):
        if r.get("provider") in FIT_PATHS and r.get("p50_ms"):
            shape = dataclasses.asdict(dataclasses.replace(SEED_SMALL, heads=r["H"]))
            add(f"B={r['B']} new={r['new']} hist={r['hist']} H={r['H']}", [r["new"]] * r["B"], [r["hist"]] * r["B"],
                shape, r["provider"], r["p50_ms"])
    seed = payload.get("seed_003_prefill")
    if seed:
        for name, res in seed["providers"].items():
            path = seed["auto_chooses"] if name == "auto" else name
            if path in FIT_PATHS and res.get("mean_ms"):
                add(f"seed 003 ({name})", seed["new"], seed["history"], seed["shape"], path, res["mean_ms"])
    return recs


def calibrate(records: list[dict], bandwidth_gbps: float | None = None, device=None,
              current: dict | None = None) -> dict:
    """Fit the time model to ``records`` (bandwidth fixed at the measured copy rate when given). Returns the
    constants, each record's estimate against its time, and per case (both paths timed) the path the fitted
    model picks with its measured time over the faster path's; with ``current`` (the constants in use: the GPU's
    file's or the defaults), that worst ratio for them too (``current_worst_choice_over_faster``), which
    ``calibration_problems`` holds the fit to."""
    from mla_kernels import _prefill_cost as cost
    from mla_kernels.prefill import choose_prefill_path

    missing = [p for p in FIT_PATHS if not any(r["path"] == p for r in records)]
    if missing:
        raise ValueError(f"calibration needs timings of both paths; none of {missing}")
    start = dict(cost.DEFAULTS)
    if bandwidth_gbps:
        start["prefill_bandwidth_gbps"] = float(bandwidth_gbps)
    consts = cost.fit(records, start=start)
    fitted, cases = [], {}
    for r in records:
        est = cost.path_time(cost.record_work(r), consts) * 1e3  # (its own launches, as fit; consts: all NAMES)
        fitted.append(dict(name=r["name"], path=r["path"], ms=r["ms"], model_ms=est,
                           model_over_measured=est / r["ms"]))
        cases.setdefault(r["name"].replace(" (auto)", " (absorbed)").replace(" (expanded)", " (absorbed)"),
                         {"record": r, "ms": {}})["ms"].setdefault(r["path"], r["ms"])

    def choices_under(constants):  # per case timed on both paths: the path these constants pick, against the faster
        out = []
        for name, c in cases.items():
            if len(c["ms"]) < 2:
                continue
            r = c["record"]
            pick = choose_prefill_path(r["new"], r["cache_lens"], r["heads"], r["d_latent"], r["d_rope"],
                                       r["d_nope"], r["d_v"], device=device, constants=constants)
            out.append(dict(case=name.replace(" (absorbed)", ""), chosen=pick, chosen_ms=c["ms"][pick],
                            faster=min(c["ms"], key=c["ms"].get),
                            over_faster=c["ms"][pick] / min(c["ms"].values())))
        return out

    choices = choices_under(consts)
    worst = max((max(f["model_over_measured"], 1 / f["model_over_measured"]) for f in fitted), default=None)
    res = {"constants": consts, "fit": fitted, "worst_model_factor": worst, "choices": choices,
           "worst_choice_over_faster": max((c["over_faster"] for c in choices), default=None)}
    if current is not None:
        res["current_worst_choice_over_faster"] = max((c["over_faster"] for c in choices_under(current)),
                                                      default=None)
    return res


RATE_NAMES = ("prefill_absorbed_tflops", "prefill_expanded_tflops", "prefill_gemm_tflops")
# a fitted rate this far over the GPU's measured bf16 GEMM rate (h.matmul_rate, 8192^3) is no kernel's: the records
# did not pin it (a cut run's few cases), and it would decide untimed shapes
RATE_OVER_MATMUL = 1.5


def calibration_problems(res: dict, matmul_tflops: float | None = None) -> list[str]:
    """Why ``calibrate``'s fit must not be written to a config file (none: write it). A run cut by a time limit
    fits what it timed so far, and such a fit can decide every later prefill's path badly: fewer timings than
    constants fitted, a constant that is not a positive number, a rate above what the GPU's GEMM reaches
    (``RATE_OVER_MATMUL``), no case timed on both paths (nothing to check the choice against), or a choice worse on
    the timed cases than the constants it would replace (``current_worst_choice_over_faster``)."""
    from mla_kernels import _prefill_cost as cost

    consts, problems = res["constants"], []
    fitted = len(cost.NAMES) - 1  # (the bandwidth is the measured copy rate)
    if len(res["fit"]) < fitted:
        problems.append(f"{len(res['fit'])} timings for {fitted} fitted constants")
    bad = [name for name, value in consts.items() if not (math.isfinite(value) and value > 0)]
    if bad:
        problems.append(f"constants not finite and positive: {bad}")
    if matmul_tflops:
        over = [f"{name} {consts[name]:.4g}" for name in RATE_NAMES
                if consts[name] > RATE_OVER_MATMUL * matmul_tflops]
        if over:
            problems.append(f"rates over {RATE_OVER_MATMUL}x the measured GEMM rate ({matmul_tflops:.4g} TFLOP/s): "
                            + ", ".join(over))
    worst, before = res["worst_choice_over_faster"], res.get("current_worst_choice_over_faster")
    if worst is None:
        problems.append("no case timed on both paths: the fitted choice cannot be checked")
    elif before is not None and worst > before * 1.01:
        problems.append(f"the fitted choice is worse on the timed cases: x{worst:.3g} of the faster path at worst, "
                        f"where the constants in use give x{before:.3g}")
    return problems


def model_crossovers(groups, constants: dict, device=None, shape: MLAShape = SEED_SMALL, max_new: int = 65536):
    """Per (B, history, H): the first new length (on a 1/8-octave grid) where the model picks expanded."""
    from mla_kernels.prefill import choose_prefill_path

    grid = sorted({max(1, round(2 ** (k / 8))) for k in range(0, 8 * int(math.log2(max_new)) + 1)})
    out = []
    for b, hist, heads in groups:
        first = None
        for n in grid:
            if choose_prefill_path([n] * b, [n + hist] * b, heads, shape.d_latent, shape.d_rope, shape.d_nope,
                                   shape.d_v, device=device, constants=constants) == "expanded":
                first = n
                break
        out.append({"B": b, "hist": hist, "H": heads, "model_first_new_len_expanded": first})
    return out


def write_calibration(path, constants: dict, *, device_name: str, sm_count: int, note: str,
                      vendor_key: str | None = None) -> dict:
    """Merge the fitted constants (and ``prefill_source``: what they were fitted to) into config file ``path``
    with ``_tuning.save_file``; the file's ``source`` keeps what it said before, with the calibration added."""
    import triton

    from mla_kernels import _prefill_cost as cost
    from mla_kernels import _tuning

    old = _tuning.load_data(path, vendor_key or _tuning.vendor(), triton.__version__) if Path(path).exists() else None
    source = f"prefill constants: {note}"
    if old and old.get("source"):
        source = f"{old['source']}; {source}"
    values = {name: float(f"{constants[name]:.4g}") for name in cost.NAMES}
    return _tuning.save_file(path, device=device_name, sm_count=sm_count, source=source, vendor_key=vendor_key,
                             constants=dict(values, prefill_source=note))


def run_calibration(payload: dict, device, target, quick: bool) -> dict:
    """--calibrate: fit, report and write. ``target``: a file path, or "auto" for this GPU's shipped file."""
    from mla_kernels import _prefill_cost as cost
    from mla_kernels import _tuning

    records = calibration_records(payload, device)
    bandwidth, matmul = h.copy_bandwidth(device), h.matmul_rate(device)
    res = calibrate(records, bandwidth, device, current=cost.device_constants(device))
    groups = sorted({(g["B"], g["hist"], g["H"]) for g in payload.get("crossover", {}).get("per_group", [])})
    res["model_crossovers"] = model_crossovers(groups, res["constants"], device)
    res["matmul_tflops"] = matmul
    res["not_written"] = calibration_problems(res, matmul)
    if not res["not_written"]:
        index = device.index if device.index is not None else 0
        path = _tuning.device_file(index) if target == "auto" else Path(target)
        note = (f"bench.prefill{' --quick' if quick else ''} --calibrate: fit of {len(records)} timings, bandwidth "
                f"= copy rate measured in the run ({bandwidth:.0f} GB/s)")
        write_calibration(path, res["constants"], device_name=h.device_name(device),
                          sm_count=torch.cuda.get_device_properties(index).multi_processor_count, note=note)
        res["written_to"] = str(path)
    print_calibration(res)
    return res


def print_calibration(res: dict) -> None:
    c = res["constants"]
    print("\nCalibration of the path choice (mla_kernels._prefill_cost):")
    print("  " + ", ".join(f"{k} {v:.4g}" for k, v in c.items()))
    for f in res["fit"]:
        print(f"  {f['name']:<40} {f['path']:<9} measured {f['ms']:9.3f} ms  model {f['model_ms']:9.3f} ms "
              f"(x{f['model_over_measured']:.2f})")
    print(f"  worst model/measured factor: x{res['worst_model_factor']:.2f}")
    for ch in res["choices"]:
        print(f"  {ch['case']:<40} calibrated choice {ch['chosen']:<9} x{ch['over_faster']:.2f} of the faster "
              f"({ch['faster']})")
    for g in res.get("model_crossovers", []):
        print(f"  B={g['B']} history={g['hist']:>6} H={g['H']:>3}: model switches to expanded at new = "
              f"{g['model_first_new_len_expanded']}")
    if "written_to" in res:
        print(f"  constants written to {res['written_to']}")
    for problem in res.get("not_written", []):
        print(f"  not written: {problem}")


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------


def plot(rows: list[dict], path) -> None:
    plt = h.pyplot()
    if plt is None:
        return
    timed = [r for r in rows if "p50_ms" in r]
    groups = sorted({(r["hist"], r["H"]) for r in timed})
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(4.5 * max(1, len(groups)), 4), squeeze=False)
    for ax, (p, hd) in zip(axes[0], groups):
        for prov in PROVIDERS:
            pts = sorted((r["new"], r["tflops"]) for r in timed if (r["hist"], r["H"], r["provider"]) == (p, hd, prov))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=prov)
        ax.set(title=f"history {p}, H={hd}", xlabel="new tokens per request", ylabel="attention TFLOP/s")
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    h.save_plot(fig, path)


def main(argv=None) -> None:
    parser = h.make_parser(__doc__.split("\n\n")[0], seed_and_sweep=True)
    parser.add_argument("--calibrate", nargs="?", const="auto", default=None, metavar="FILE",
                        help="fit the path choice's constants to this run's timings and write them into FILE "
                             "(default: this GPU's mla_kernels/configs file); GPU only")
    args = parser.parse_args(argv)
    device = h.setup(args)
    cpu = h.is_cpu(device)
    if args.calibrate is not None and cpu:
        raise SystemExit("--calibrate fits the GPU kernels' timings: run it on a GPU "
                         "(the CPU times the PyTorch path)")
    lib = library()
    dtype = torch.bfloat16
    from mla_kernels import _utils

    if cpu and _utils.interpreting():
        raise SystemExit("TRITON_INTERPRET=1: prefill in the interpreter takes minutes per call; run without it "
                         "(the CPU then times the PyTorch path) or on a GPU")
    if cpu:
        print(f"CPU timings (PyTorch path; no GPU, no Triton kernel runs), {torch.get_num_threads()} threads: "
              "not indicative of GPU performance")
    from mla_kernels import _prefill_cost

    payload = {
        "config": {"quick": args.quick, "cuda_graph": args.cuda_graph, "dtype": str(dtype), "page": PAGE,
                   "launches": dict(_prefill_cost.LAUNCHES)},  # per call of each path, for the fit of these times
        "models": {
            "tflops": "attention FLOPs as standard attention counts them, 2*H*pairs*(D_nope+P+D_v), for every "
                      "provider; pairs = sum_b n_b*h_b + n_b*(n_b+1)/2 (causal)",
            "path_tflops": "FLOPs the path executes (mla_kernels.prefill.prefill_flops): absorbed 2*H*pairs*(2R+P) "
                           "+ query absorption and value projection; expanded 2*H*pairs*(D_nope+P+D_v) + "
                           "2*L*H*R*(D_nope+D_v) for the expansion",
            "timing": "sweep: GPU triton.testing.do_bench (L2 flushed), CPU perf_counter; seed scenario: mean over "
                      "timed runs after warm-ups, CUDA events / perf_counter",
        },
    }
    if cpu:
        payload["notes"] = [
            "CPU timings of the PyTorch paths (mla_prefill_attention without Triton): not indicative of GPU "
            "performance; the seed scenario's warm-ups/runs are cut to fit the CPU budget (see each provider)",
            "CPU: the expanded and naive paths decompress through a bf16 GEMM, slow on CPUs without native bf16",
        ]
    def calibrate_so_far():  # stopped (the GPU session's time limit): fit the path choice on the rows timed so far
        if args.calibrate is not None and payload.get("sweep"):
            payload["calibration"] = run_calibration(payload, device, args.calibrate, args.quick)

    with h.save_if_stopped("prefill", payload, device, args, before_save=calibrate_so_far):
        if not args.skip_seed:
            payload["seed_003_prefill"] = seed_scenario(device, dtype, lib)
            print_seed(payload["seed_003_prefill"])
            print()
        if not args.skip_sweep:
            run_sweep(device, dtype, lib, args.quick, args.cuda_graph, payload.setdefault("sweep", []))
    if args.calibrate is not None:  # the rows written before the fit, which a time limit may cut (SIGTERM's
        h.write_json("prefill", payload, device, args.out)  # handler is restored by now) or a failure may stop
    if not args.skip_sweep:
        payload["crossover"] = crossover(payload["sweep"])
        print_crossover(payload["crossover"], cpu)
    if args.calibrate is not None:
        try:
            payload["calibration"] = run_calibration(payload, device, args.calibrate, args.quick)
        except Exception as exc:  # a path with no timed rows, out of memory measuring the copy rate, a file that
            # cannot be written: the sweep's results are still written
            payload["calibration"] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"calibration failed: {exc}")
    sweep = payload.get("sweep", [])
    h.save_results("prefill", payload, device, args, plot=(lambda png: plot(sweep, png)) if sweep else None)
    h.exit_if_wrong(sweep, payload.get("seed_003_prefill", {}).get("providers", {}),
                    lambda r: f"{r['provider']} B={r['B']} new={r['new']} hist={r['hist']} H={r['H']}")


if __name__ == "__main__":
    main()
