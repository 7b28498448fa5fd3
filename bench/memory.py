"""KV-cache memory: bytes per token per layer for MHA, GQA, transformers' DeepSeek caches and the
latent cache, from formulas and from allocated memory, and peak memory during decode.

    python -m bench.memory [--quick] [--device cuda] [--plot] [--out DIR] [--cache-gib 16 40]

Shapes: DeepSeek-R1 (128 heads) and seed 003's small config (16 heads); both R = 512, P = 64,
D_nope = 128, D_v = 128, bf16.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Callable

import torch

from mla_kernels import _utils

from . import _harness as h
from .decode import DEEPSEEK_R1, SEED_SMALL, MLAShape, make_case, naive_decode, provider_bytes

SHAPES = {"DeepSeek-R1": DEEPSEEK_R1, "seed003-small": SEED_SMALL}
HIDDEN = {"DeepSeek-R1": (7168, 1536), "seed003-small": (2048, None)}  # hidden size, q_lora_rank
MHA_HEAD_DIM = 128
GQA_KV_HEADS = 8
PAGE = 64
CLAIM = "seed 000 expected MLA to reduce the KV cache by 5-13%"


# ------------------------------------------------------------------------------------------------
# formulas: values cached per token per layer, and the tensors each scheme allocates for L tokens
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Scheme:
    key: str
    label: str
    values: Callable  # MLAShape -> values per token per layer
    layout: Callable  # (MLAShape, tokens) -> list of tensor shapes


SCHEMES = [
    Scheme("mha", f"MHA, H heads x {MHA_HEAD_DIM} (K and V)",
           lambda s: 2 * s.heads * MHA_HEAD_DIM,
           lambda s, n: [(1, s.heads, n, MHA_HEAD_DIM)] * 2),
    Scheme("gqa8", f"GQA, {GQA_KV_HEADS} KV heads x {MHA_HEAD_DIM}",
           lambda s: 2 * GQA_KV_HEADS * MHA_HEAD_DIM,
           lambda s, n: [(1, GQA_KV_HEADS, n, MHA_HEAD_DIM)] * 2),
    Scheme("per_head", "DeepSeek per-head K (nope+rope) + V, older transformers",
           lambda s: s.heads * (s.d_nope + s.d_rope + s.d_v),
           lambda s, n: [(1, s.heads, n, s.d_nope + s.d_rope), (1, s.heads, n, s.d_v)]),
    Scheme("latent", "latent R + P (mla_kernels paged cache)",
           lambda s: s.d_latent + s.d_rope,
           lambda s, n: [(math.ceil(n / PAGE), PAGE, s.d_latent + s.d_rope)]),
]


def values_per_token(scheme_key: str, shape: MLAShape) -> int:
    return next(s for s in SCHEMES if s.key == scheme_key).values(shape)


# ------------------------------------------------------------------------------------------------
# what the installed transformers' DeepseekV3Attention caches
# ------------------------------------------------------------------------------------------------


def transformers_cache_layout(name: str, shape: MLAShape, device, tokens: int = 8) -> dict:
    """Run the installed transformers' DeepseekV3Attention on ``tokens`` tokens with a DynamicCache and
    report what it cached: tensor shapes, bytes per token (measured from the cached tensors)."""
    try:
        import transformers
        from transformers import DeepseekV3Config, DynamicCache
        from transformers.models.deepseek_v3 import modeling_deepseek_v3 as mod
    except ImportError as exc:
        return {"error": f"transformers' DeepseekV3 is not importable: {exc}"}
    hidden, q_lora = HIDDEN[name]
    cfg = DeepseekV3Config(hidden_size=hidden, num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
                           q_lora_rank=q_lora, kv_lora_rank=shape.d_latent, qk_nope_head_dim=shape.d_nope,
                           qk_rope_head_dim=shape.d_rope, v_head_dim=shape.d_v, num_hidden_layers=1)
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        attn = mod.DeepseekV3Attention(cfg, layer_idx=0)
    attn = attn.to_empty(device=device).to(torch.bfloat16)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, 0.02)
        x = torch.randn(1, tokens, hidden, device=device, dtype=torch.bfloat16)
        rope = mod.DeepseekV3RotaryEmbedding(cfg).to(device)
        cos, sin = rope(x, torch.arange(tokens, device=device)[None])
        cache = DynamicCache(config=cfg)
        attn(x, (cos, sin), None, **h.cache_kw(attn, cache))
    layer = cache.layers[0]
    cached = [layer.keys, layer.values]
    nbytes = sum(t.untyped_storage().nbytes() for t in cached)
    return {
        "transformers": transformers.__version__,
        "module": "transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3Attention",
        "cached_shapes": [list(t.shape) for t in cached],
        "cached_dtype": str(cached[0].dtype),
        "tokens": tokens,
        "bytes_per_token": nbytes / tokens,
        "values_per_token": nbytes / tokens / cached[0].element_size(),
        "per_token_shapes": [list(t.shape[:-2]) + [t.shape[-1]] for t in cached],
    }


# ------------------------------------------------------------------------------------------------
# measured allocations
# ------------------------------------------------------------------------------------------------


def allocate(scheme_key: str, shape: MLAShape, tokens: int, device, tf_layout: dict | None):
    """Allocate the cache ``scheme_key`` keeps for ``tokens`` tokens, the way that code allocates it."""
    dtype = torch.bfloat16
    if scheme_key == "latent":
        try:
            from mla_kernels import PagedLatentCache
        except ImportError:
            return [torch.zeros(s, dtype=dtype, device=device) for s in SCHEMES[-1].layout(shape, tokens)]
        cache = PagedLatentCache(1, math.ceil(tokens / PAGE), PAGE, shape.d_latent, shape.d_rope, dtype, device)
        return [cache.buffer(0)]
    if scheme_key == "transformers":
        from transformers import DynamicCache

        k_shape, v_shape = tf_layout["per_token_shapes"]
        cache = DynamicCache()
        cache.update(torch.empty(*k_shape[:-1], tokens, k_shape[-1], dtype=dtype, device=device),
                     torch.empty(*v_shape[:-1], tokens, v_shape[-1], dtype=dtype, device=device), 0)
        return [cache.layers[0].keys, cache.layers[0].values]
    layout = next(s for s in SCHEMES if s.key == scheme_key).layout(shape, tokens)
    if scheme_key == "per_head":
        from transformers import DynamicCache

        cache = DynamicCache()
        cache.update(*(torch.empty(s, dtype=dtype, device=device) for s in layout), 0)
        return [cache.layers[0].keys, cache.layers[0].values]
    return [torch.empty(s, dtype=dtype, device=device) for s in layout]


def measure_allocation(scheme_key, shape, tokens, device, tf_layout) -> tuple[int, str]:
    """Bytes the scheme's cache takes for ``tokens`` tokens: allocator delta on a GPU, storage bytes on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        tensors = allocate(scheme_key, shape, tokens, device, tf_layout)
        nbytes = torch.cuda.memory_allocated(device) - before
        how = "torch.cuda.memory_allocated delta"
    else:
        tensors = allocate(scheme_key, shape, tokens, device, tf_layout)
        nbytes = sum(t.untyped_storage().nbytes() for t in tensors)
        how = "untyped_storage().nbytes() of the allocated tensors"
    del tensors
    return nbytes, how


def cache_table(device, contexts, tf_layouts) -> list[dict]:
    rows = []
    for name, shape in SHAPES.items():
        latent = values_per_token("latent", shape)
        schemes = [(s.key, s.label, s.values(shape)) for s in SCHEMES]
        tf = tf_layouts.get(name, {})
        if "values_per_token" in tf:
            schemes.insert(3, ("transformers", f"transformers {tf['transformers']} DeepseekV3 cache (installed)",
                               tf["values_per_token"]))
        for key, label, values in schemes:
            row = {"shape": name, "heads": shape.heads, "scheme": key, "label": label,
                   "values_per_token_layer": values, "bytes_per_token_layer_bf16": 2 * values,
                   "latent_reduction_pct": 100.0 * (1 - latent / values), "measured": {}}
            for tokens in contexts:
                nbytes, how = measure_allocation(key, shape, tokens, device, tf)
                row["measured"][tokens] = {"bytes": nbytes, "bytes_per_token": nbytes / tokens,
                                           "formula_bytes": 2 * values * tokens}
                row["measured_with"] = how
            rows.append(row)
    return rows


def print_cache_table(rows, contexts) -> None:
    print(f"{'shape':<14} {'scheme':<60} {'values/tok':>10} {'B/tok':>7} {'latent saves':>12} | "
          + " | ".join(f"{'measured ' + str(c):>16}" for c in contexts))
    for r in rows:
        meas = " | ".join(f"{h.gib(r['measured'][c]['bytes']) if r['measured'][c]['bytes'] >= 2**30 else str(round(r['measured'][c]['bytes'] / 2**20, 2)) + ' MiB':>16}"
                          for c in contexts)
        print(f"{r['shape']:<14} {r['label']:<60} {r['values_per_token_layer']:>10.0f} "
              f"{r['bytes_per_token_layer_bf16']:>7.0f} {r['latent_reduction_pct']:>11.1f}% | {meas}")


# ------------------------------------------------------------------------------------------------
# peak memory during decode
# ------------------------------------------------------------------------------------------------


def decode_peaks(device, contexts, naive_gflop_limit: float | None, rows: list | None = None) -> list[dict]:
    """Per shape and context (batch 1): cache bytes and the workspace peak of one decode call,
    for mla_decode (latent in, W_UV applied) and for the naive path (decompress, SDPA)."""
    from mla_kernels import mla_decode

    rows = [] if rows is None else rows  # (a list the caller holds: a stopped run keeps the rows measured so far)
    dtype = torch.bfloat16
    for name, shape in SHAPES.items():
        for ctx in h.progress(contexts, f"peaks {name}"):
            case = make_case(shape, [ctx], PAGE, dtype, device)
            cache_bytes = case.kv_cache.untyped_storage().nbytes()
            calls = _decode_calls(case, ctx, mla_decode)
            for prov, fn in calls.items():
                row = {"shape": name, "heads": shape.heads, "ctx": ctx, "provider": prov, "cache_bytes": cache_bytes,
                       "estimated_workspace_bytes": provider_bytes(prov, shape, 1, ctx)}
                gflop = 2 * ctx * shape.d_latent * shape.heads * (shape.d_nope + shape.d_v) / 1e9
                if prov == "naive" and naive_gflop_limit is not None and gflop > naive_gflop_limit:
                    row["note"] = f"not run: the naive decompression is {gflop:.0f} GFLOP, too slow on this CPU"
                elif not h.fits(cache_bytes + row["estimated_workspace_bytes"], device):
                    row["note"] = "not run: would not fit in memory"
                else:
                    fn()
                    peak, how = h.peak_memory(fn, device)
                    row.update(workspace_peak_bytes=peak, measured_with=how)
                    if peak is not None:
                        row["peak_bytes"] = cache_bytes + peak
                rows.append(row)
            del case, calls
    return rows


def _decode_calls(case, ctx: int, mla_decode) -> dict:
    """The two decode paths over one case: mla_decode (W_UV applied) and the naive decompression."""
    c, scale = case, case.shape.softmax_scale
    return {
        "mla_decode": lambda: mla_decode(c.q_abs, c.q_pe, c.kv_cache, c.pe_cache, c.block_table, c.cache_seqlens,
                                         scale, w_uv=c.w_uv, max_seqlen_k=ctx),
        "naive": lambda: naive_decode(c.q_nope, c.q_pe, c.kv_cache, c.pe_cache, c.block_table, c.cache_seqlens,
                                      scale, c.w_kv_b, c.shape.d_v, ctx),
    }


def print_peaks(rows, cpu: bool) -> None:
    where = "CPU: the PyTorch path's allocations, not the Triton kernel's" if cpu else "GPU"
    print(f"\nPeak memory of one decode call, batch 1 ({where}); cache = the layer's latent cache")
    print(f"{'shape':<14} {'ctx':>6} {'provider':<11} {'cache MiB':>10} {'workspace MiB':>14} {'peak MiB':>9}")
    for r in rows:
        if "workspace_peak_bytes" in r and r["workspace_peak_bytes"] is not None:
            ws, pk = r["workspace_peak_bytes"] / 2**20, r["peak_bytes"] / 2**20
            print(f"{r['shape']:<14} {r['ctx']:>6} {r['provider']:<11} {r['cache_bytes'] / 2**20:>10.2f} "
                  f"{ws:>14.2f} {pk:>9.2f}")
        else:
            print(f"{r['shape']:<14} {r['ctx']:>6} {r['provider']:<11} {r['cache_bytes'] / 2**20:>10.2f} "
                  f"{'-':>14} {'-':>9}  {r.get('note', r.get('measured_with', ''))}")


# ------------------------------------------------------------------------------------------------
# the FP8 latent cache (issue 12): bytes per token and the longest context a memory budget holds
# ------------------------------------------------------------------------------------------------

DEEPSEEK_LAYERS = 61  # DeepSeek-V3 / R1


def fp8_table(device, contexts, budgets_gib, layers: int = DEEPSEEK_LAYERS) -> list[dict]:
    """Per cache dtype (bf16 latent, FP8 layout): bytes per token per layer from the formula and from a real
    ``PagedLatentCache`` allocation (one layer, each context), and the most tokens ``layers`` layers fit in each
    budget (whole pages of PAGE tokens)."""
    from mla_kernels import PagedLatentCache
    from mla_kernels.cache import fp8_row_bytes

    s = DEEPSEEK_R1  # R 512, P 64: the latent widths are the same for every DeepSeek-V3 shape
    kinds = {"bf16": (torch.bfloat16, 2 * (s.d_latent + s.d_rope)),
             "fp8": (torch.float8_e4m3fn, fp8_row_bytes(s.d_latent, s.d_rope, torch.bfloat16))}
    rows = []
    for name, (dtype, formula) in kinds.items():
        row = {"cache": name, "dtype": str(dtype), "bytes_per_token_layer_formula": formula,
               "layout": ("R + P bf16 values" if name == "bf16" else
                          "R e4m3 + R/128 fp32 scales + P bf16 (DeepSeek's FP8 MLA layout)"),
               "ratio_to_bf16": formula / kinds["bf16"][1], "measured": {}, "max_context": {}}
        for tokens in contexts:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                before = torch.cuda.memory_allocated(device)
            cache = PagedLatentCache(1, math.ceil(tokens / PAGE), PAGE, s.d_latent, s.d_rope, dtype=dtype,
                                     device=device)
            nbytes = (torch.cuda.memory_allocated(device) - before if device.type == "cuda"
                      else cache.buffer(0).untyped_storage().nbytes())
            row["measured"][tokens] = {"bytes": nbytes, "bytes_per_token": nbytes / tokens,
                                       "reported_bytes_per_token": cache.bytes_per_token}
            del cache
        for gib in budgets_gib:
            per_page = layers * PAGE * formula
            row["max_context"][gib] = {"layers": layers, "tokens": int(gib * 2**30 // per_page) * PAGE}
        rows.append(row)
    return rows


def print_fp8_table(rows, budgets_gib) -> None:
    print("\nLatent cache per token and layer, bf16 against DeepSeek's FP8 layout (R 512, P 64)")
    print(f"{'cache':<6} {'B/token/layer':>13} {'x bf16':>7} {'measured B/token':>17} | "
          + " | ".join(f"{'tokens in ' + str(g) + ' GiB, ' + str(r['max_context'][g]['layers']) + ' layers':>28}"
                       for r in rows[:1] for g in budgets_gib))
    for r in rows:
        measured = sorted({round(m["bytes_per_token"], 2) for m in r["measured"].values()})
        print(f"{r['cache']:<6} {r['bytes_per_token_layer_formula']:>13} {r['ratio_to_bf16']:>7.3f} "
              f"{', '.join(str(m) for m in measured):>17} | "
              + " | ".join(f"{r['max_context'][g]['tokens']:>28,}" for g in budgets_gib))


# ------------------------------------------------------------------------------------------------
# seed 000's claim, in words from the numbers
# ------------------------------------------------------------------------------------------------


def verdict(rows) -> str:
    """A plain paragraph on seed 000's 5-13% claim, from the formula rows."""
    def red(shape, scheme):
        return next(r for r in rows if r["shape"] == shape and r["scheme"] == scheme)

    r1 = {k: red("DeepSeek-R1", k) for k in ("mha", "gqa8", "per_head")}
    sm = {k: red("seed003-small", k) for k in ("mha", "gqa8", "per_head")}
    full = [r["latent_reduction_pct"] for r in (*r1.values(), *sm.values()) if r["scheme"] != "gqa8"]
    kept = [100 - p for p in full]
    dev = max(abs(m["bytes"] - m["formula_bytes"]) / m["formula_bytes"] for r in rows for m in r["measured"].values())
    match = ("matches these formulas byte for byte" if dev == 0 else
             f"matches these formulas to within {100 * dev:.2f}%" if dev < 0.01 else
             f"differs from these formulas by up to {100 * dev:.1f}% (see 'measured')")
    in_range = any(5 <= p <= 13 for p in (r["latent_reduction_pct"] for r in rows if r["scheme"] != "latent"))
    tf = [r for r in rows if r["scheme"] == "transformers"]
    tf_text = ""
    if tf:
        tf_text = (f" The installed transformers ({tf[0]['label'].split()[1]}) already caches the latent: "
                   f"{tf[0]['values_per_token_layer']:.0f} values per token per layer, the same as the latent "
                   "cache, but it expands the whole cache into per-head K and V at every step (the naive "
                   "path's decode workspace).")
    return (
        f"Seed 000 expected MLA to reduce the KV cache by 5-13%. Per token and layer, the latent cache holds "
        f"{values_per_token('latent', DEEPSEEK_R1)} values (R + P = 512 + 64). For DeepSeek-R1 (128 heads) that is "
        f"{r1['mha']['latent_reduction_pct']:.1f}% less than multi-head attention with 128-wide heads "
        f"({r1['mha']['values_per_token_layer']} values), {r1['per_head']['latent_reduction_pct']:.1f}% less than "
        f"the per-head K(192) + V(128) cache ({r1['per_head']['values_per_token_layer']} values), and "
        f"{r1['gqa8']['latent_reduction_pct']:.1f}% less than an 8-KV-head GQA cache "
        f"({r1['gqa8']['values_per_token_layer']} values). For seed 003's 16-head config the reductions are "
        f"{sm['mha']['latent_reduction_pct']:.1f}% (MHA), {sm['per_head']['latent_reduction_pct']:.1f}% (per-head) "
        f"and {sm['gqa8']['latent_reduction_pct']:.1f}% (GQA-8). The memory allocated for real contexts "
        f"{match}. "
        f"So the reduction is {min(full):.0f}-{max(full):.0f}% against full per-head caches, "
        f"not 5-13%: {'a' if in_range else 'no'} baseline here gives a reduction in that range. The latent cache is "
        f"{min(kept):.1f}-{max(kept):.1f}% of the size of those caches ({100 - sm['per_head']['latent_reduction_pct']:.1f}% "
        f"of the per-head cache for the 16-head config), so '5-13%' reads more like the fraction that remains "
        f"than like the saving." + tf_text
    )


# ------------------------------------------------------------------------------------------------


def plot(rows, peaks, path) -> None:
    plt = h.pyplot()
    if plt is None:
        return
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 4.5))
    names = list(SHAPES)
    schemes = list(dict.fromkeys(r["scheme"] for r in rows))
    width = 0.8 / len(schemes)
    for i, key in enumerate(schemes):
        vals = [next((r["bytes_per_token_layer_bf16"] for r in rows if r["shape"] == n and r["scheme"] == key), 0)
                for n in names]
        label = next(r["label"] for r in rows if r["scheme"] == key)
        ax0.bar([j + i * width for j in range(len(names))], vals, width, label=label)
    ax0.set(xticks=[j + 0.4 - width / 2 for j in range(len(names))], xticklabels=names, yscale="log",
            ylabel="KV-cache bytes per token per layer (bf16)", title="Cache per token")
    ax0.legend(fontsize=7)
    for name in names:
        for prov in ("mla_decode", "naive"):
            pts = [(r["ctx"], r["peak_bytes"] / 2**20) for r in peaks
                   if r["shape"] == name and r["provider"] == prov and r.get("peak_bytes") is not None]
            if pts:
                ax1.plot(*zip(*pts), marker="o", label=f"{name} {prov}")
    pts = sorted({(r["ctx"], r["cache_bytes"] / 2**20) for r in peaks})
    if pts:
        ax1.plot(*zip(*pts), linestyle="--", color="gray", label="latent cache alone (any head count)")
    ax1.set_xscale("log", base=2)
    ax1.set(yscale="log", xlabel="context (tokens, batch 1)", ylabel="MiB", title="Peak memory of one decode call")
    ax1.legend(fontsize=7)
    for ax in (ax0, ax1):
        ax.grid(True, alpha=0.3)
    h.save_plot(fig, path)


def budget_gib(text: str) -> float:
    """A ``--cache-gib`` budget: a positive, finite number of GiB (0, a negative or a non-finite budget gave negative
    or meaningless token counts in the table and the JSON)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of GiB") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: a memory budget must be a positive, finite number of GiB")
    return value


def main(argv=None) -> None:
    parser = h.make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--cache-gib", type=budget_gib, nargs="+", default=[16.0, 40.0],
                        help="memory budgets (GiB) for the longest-context table of the fp8 cache")
    args = parser.parse_args(argv)
    device = h.setup(args)
    cpu = h.is_cpu(device)
    if cpu and _utils.interpreting():  # the decode peaks would run the kernels interpreted (minutes) and be mislabelled
        raise SystemExit("TRITON_INTERPRET=1: run bench.memory without it (the CPU then measures the PyTorch path's "
                         "workspace) or on a GPU")
    contexts = [1024, 4096] if args.quick else [1024, 4096, 16384]
    peak_contexts = ([1024, 4096] if args.quick else [1024, 4096, 16384]) if cpu else [1024, 4096, 16384, 65536]
    if cpu:
        print("CPU run: cache sizes from the allocated tensors' storage; decode peaks from the PyTorch path")

    payload = {
        "config": {"quick": args.quick, "contexts": contexts, "peak_contexts": peak_contexts, "page": PAGE,
                   "dtype": "bfloat16", "shapes": {k: dataclasses.asdict(v) for k, v in SHAPES.items()},
                   "mha_head_dim": MHA_HEAD_DIM, "gqa_kv_heads": GQA_KV_HEADS},
        "decode_peaks_note": ("CPU: workspace measured from the PyTorch path's CPU allocations (torch.profiler), "
                              "not the Triton kernel's" if cpu else "GPU: torch.cuda.max_memory_allocated"),
    }
    # stopped (a GPU session's time box) or failing: what was measured is written, marked incomplete
    with h.save_if_stopped("memory", payload, device, args):
        tf_layouts = payload["transformers_cache"] = {name: transformers_cache_layout(name, shape, device)
                                                      for name, shape in SHAPES.items()}
        for name, tf in tf_layouts.items():
            if "error" in tf:
                print(tf["error"])
            else:
                print(f"transformers {tf['transformers']} DeepseekV3Attention ({name}) caches {tf['cached_shapes']} "
                      f"for {tf['tokens']} tokens: {tf['values_per_token']:.0f} values/token/layer")
        rows = payload["cache_per_token"] = cache_table(device, contexts, tf_layouts)
        print()
        print_cache_table(rows, contexts)
        fp8_rows = payload["fp8_cache"] = fp8_table(device, contexts, args.cache_gib)
        print_fp8_table(fp8_rows, args.cache_gib)
        peaks = payload["decode_peaks"] = []
        decode_peaks(device, peak_contexts, naive_gflop_limit=40.0 if cpu else None, rows=peaks)
        print_peaks(peaks, cpu)
        text = payload["seed_000_claim"] = verdict(rows)
        print("\n" + text)
    h.save_results("memory", payload, device, args, plot=lambda png: plot(rows, peaks, png))


if __name__ == "__main__":
    main()
