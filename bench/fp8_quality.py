"""Quality of the FP8 latent cache, measured: decode error against the bf16 cache on random data, and the logits and
greedy tokens of a patched DeepSeek-V3-shaped model with an fp8 cache against the same model with a bf16 cache.

    python -m bench.fp8_quality [--quick] [--device cuda] [--cuda-graph] [--out DIR] [--new-tokens N]

Decode (random data): unit-variance latent and rope key in bf16, quantized to DeepSeek's FP8 layout (e4m3, one fp32
scale per 128 values); queries with unit variance times ``q_scale``, so the nope scores spread by
``q_scale * sqrt(512) * softmax_scale`` nats. Reported per shape: the relative RMS error of ``mla_decode`` over the fp8
cache against the same call over the bf16 cache, and (float64) the share of that error from the values alone and
from the scores alone. Issue 12's target: at most 2e-2.

Model: a random-weight DeepSeek-V3 with DeepSeek's attention widths (R 512, P 64, nope 128, v 128), bf16, patched
three times: fp32 cache (the model in fp32: the reference), bf16 cache, fp8 cache. Greedy generation of N tokens from
a few prompts (free-running: where the fp8 and bf16 tokens first differ), and one teacher-forced forward over the bf16
run's tokens: logits' relative RMS error and argmax agreement per position, each against the bf16 cache and against
the fp32 reference (the bf16 cache's own error is the yardstick). On a GPU also the speed targets: bench.decode's
mla_decode_fp8 against mla_decode at B128 L4096, 16 and 128 heads. Random weights, not a trained model: a trained
DeepSeek's latent may have outlier channels that a per-128 scale handles worse; measure a real checkpoint on a GPU.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from . import _harness as h
from .generate import ModelShape, build_model

FP8 = torch.float8_e4m3fn
TARGET = 2e-2  # issue 12: decode output relative RMS error against the bf16 path
SOFTMAX_SCALE = 192 ** -0.5
# MoE models (layer 0 dense, 4 x hidden wide), as measured in bench/results/fp8_quality_cpu.json
CPU_MODEL = ModelShape(hidden=512, heads=8, layers=4, q_lora_rank=192, vocab=4096, intermediate=2048, experts=4,
                       moe_intermediate=128)
GPU_MODEL = ModelShape(hidden=2048, heads=16, layers=8, q_lora_rank=1536, vocab=32000, intermediate=8192, experts=16,
                       moe_intermediate=512)


# ------------------------------------------------------------------------------------------------
# decode on random data
# ------------------------------------------------------------------------------------------------


def _attend64(q_nope, q_pe, kv_scores, kv_values, pe):
    """float64 absorbed attention, every sequence the full length (non-causal: the one new token sees all):
    q_nope [B, H, R], q_pe [B, H, P], kv_* [B, L, R], pe [B, L, P] -> [B, H, R]."""
    s = (torch.einsum("bhr,blr->bhl", q_nope, kv_scores) + torch.einsum("bhp,blp->bhl", q_pe, pe)) * SOFTMAX_SCALE
    return torch.einsum("bhl,blr->bhr", s.softmax(-1), kv_values)


def decode_error(batch: int, ctx: int, heads: int, q_scale: float, device, seed: int = 0) -> dict:
    from mla_kernels import fp8_latent_cache, mla_decode
    from mla_kernels.reference import dequantize_fp8, quantize_fp8

    gen = torch.Generator(device=device).manual_seed(seed)
    page = 64
    blocks = batch * math.ceil(ctx / page)
    buf = torch.randn(blocks, page, 576, device=device, generator=gen).to(torch.bfloat16)
    kv, pe = buf[..., :512], buf[..., 512:]
    kv8, scale, pe8 = fp8_latent_cache(blocks, page, device=device)
    q8, s8 = quantize_fp8(kv)
    kv8.copy_(q8), scale.copy_(s8), pe8.copy_(pe)
    table = torch.randperm(blocks, device=device, generator=gen).view(batch, -1).to(torch.int32)
    seqlens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    q = (torch.randn(batch, 1, heads, 576, device=device, generator=gen) * q_scale).to(torch.bfloat16)
    q_nope, q_pe = q[..., :512], q[..., 512:]
    out16 = mla_decode(q_nope, q_pe, kv, pe, table, seqlens, SOFTMAX_SCALE, causal=False, max_seqlen_k=ctx)
    out8 = mla_decode(q_nope, q_pe, kv8, pe8, table, seqlens, SOFTMAX_SCALE, causal=False, max_seqlen_k=ctx,
                      kv_scale=scale)

    def seq(cache):  # [B, L, D] in position order
        pos = torch.arange(ctx, device=device)
        return cache[table.long()[:, pos // page], pos % page]

    deq = dequantize_fp8(seq(kv8), seq(scale), torch.float64)
    exact, pe64 = seq(kv).double(), seq(pe).double()
    qn, qp = q_nope[:, 0].double(), q_pe[:, 0].double()
    ref = _attend64(qn, qp, exact, exact, pe64)
    scores_nope = torch.einsum("bhr,blr->bhl", qn, exact) * SOFTMAX_SCALE
    return {
        "B": batch, "ctx": ctx, "H": heads, "q_scale": q_scale,
        "nope_score_std_nats": scores_nope.std().item(),
        "latent_rel_rms_error": h.rel_rms_error(deq, exact),
        "rel_rms_error_fp8_vs_bf16": h.rel_rms_error(out8, out16),
        "rel_rms_error_bf16_vs_float64": h.rel_rms_error(out16[:, 0], ref),
        "rel_rms_error_fp8_vs_float64": h.rel_rms_error(out8[:, 0], ref),
        "float64_values_only": h.rel_rms_error(_attend64(qn, qp, exact, deq, pe64), ref),
        "float64_scores_only": h.rel_rms_error(_attend64(qn, qp, deq, exact, pe64), ref),
        "meets_target": h.rel_rms_error(out8, out16) <= TARGET,
    }


# ------------------------------------------------------------------------------------------------
# a patched model
# ------------------------------------------------------------------------------------------------


def _patched_run(model, ids, new_tokens: int, cache_dtype):
    """Greedy generation and a teacher-forced forward over ``teacher`` (set later), with the model patched."""
    from mla_kernels import patch_model, unpatch_model

    patch_model(model, block_size=64, cache_dtype=cache_dtype)
    try:
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, return_dict_in_generate=True)
        seconds = time.perf_counter() - start
    finally:
        unpatch_model(model)
    return out.sequences, seconds


def _teacher_forced(model, ids, cache_dtype):
    from mla_kernels import patch_model, unpatch_model

    patch_model(model, block_size=64, cache_dtype=cache_dtype)
    try:
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
    finally:
        unpatch_model(model)


def model_quality(shape: ModelShape, device, batch: int, prompt_len: int, new_tokens: int, seed: int = 0) -> dict:
    model = build_model(shape, device, torch.bfloat16, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(3, shape.vocab, (batch, prompt_len), generator=gen).to(device)
    with torch.no_grad():
        seq16, t16 = _patched_run(model, ids, new_tokens, None)
        seq8, t8 = _patched_run(model, ids, new_tokens, FP8)
        gen_part16, gen_part8 = seq16[:, prompt_len:], seq8[:, prompt_len:]
        same = (gen_part16 == gen_part8).cpu()
        first_diff = [int(row.logical_not().nonzero()[0]) if not row.all() else new_tokens for row in same]
        # teacher forcing over the bf16 run's tokens: logits for the positions that predict generated tokens
        teacher = seq16[:, :-1]
        logits16 = _teacher_forced(model, teacher, None)[:, prompt_len - 1:]
        logits8 = _teacher_forced(model, teacher, FP8)[:, prompt_len - 1:]
        model32 = model.float()
        logits32 = _teacher_forced(model32, teacher, None)[:, prompt_len - 1:]
        model.to(torch.bfloat16)
    top16, top8, top32 = logits16.argmax(-1), logits8.argmax(-1), logits32.argmax(-1)
    return {
        "model": dataclasses.asdict(shape), "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "weights": "random (torch.manual_seed), transformers' DeepseekV3 init", "dtype": "bfloat16",
        "free_running": {
            "tokens_equal_fraction": same.float().mean().item(),
            "first_divergence_per_sequence": first_diff,
            "identical_prefix_fraction": sum(first_diff) / (batch * new_tokens),
            "generate_seconds_bf16_cache": t16, "generate_seconds_fp8_cache": t8,
        },
        "teacher_forced": {
            "positions": int(top16.numel()),
            "logits_rel_rms_fp8_vs_bf16_cache": h.rel_rms_error(logits8, logits16),
            "logits_rel_rms_fp8_vs_fp32_model": h.rel_rms_error(logits8, logits32),
            "logits_rel_rms_bf16_vs_fp32_model": h.rel_rms_error(logits16, logits32),
            "greedy_agreement_fp8_vs_bf16_cache": (top8 == top16).float().mean().item(),
            "greedy_agreement_fp8_vs_fp32_model": (top8 == top32).float().mean().item(),
            "greedy_agreement_bf16_vs_fp32_model": (top16 == top32).float().mean().item(),
        },
    }


# ------------------------------------------------------------------------------------------------
# speed (GPU only): issue 12's targets, through bench.decode's checked and timed providers
# ------------------------------------------------------------------------------------------------

SPEED_SHAPES = [(128, 4096, 16, 64), (128, 4096, 128, 64)]  # B, ctx, H, page; targets: >= 1.6x at 16 heads, >= 1x at 128


def speed(device, cuda_graph: bool, rows: list | None = None) -> list[dict]:
    from . import decode as bd

    rates = h.device_rates(device)
    rows = [] if rows is None else rows
    print(h.table_header(("B", "ctx", "H", "page")))
    for batch, ctx, heads, page in SPEED_SHAPES:
        for row in bd.run_shape(batch, ctx, heads, page, device, torch.bfloat16, bd.library(), rates["copy_gbps"],
                                dict(rep_ms=100.0, warmup_ms=25.0, cuda_graph=cuda_graph),
                                only=("mla_decode", "mla_decode_fp8")):  # (not naive: ~78 GB at 128 heads)
            h.log(h.format_row(row, ("B", "ctx", "H", "page")))
            rows.append(row)
    return rows


def _measure(args, device, cpu, shapes, rows, speed_rows, payload) -> None:
    """main's measurements, appended to the lists and dict ``payload`` holds as each finishes."""
    print(f"decode over an fp8 cache vs the bf16 cache (random data; issue 12's target <= {TARGET:.0e})")
    print(f"{'B':>4} {'ctx':>6} {'H':>4} {'q x':>4} {'score std':>9} | {'fp8 vs bf16':>11} {'values only':>11} "
          f"{'scores only':>11} | {'bf16 vs f64':>11} {'latent err':>10}")
    for batch, ctx, heads in shapes:
        for q_scale in (0.25, 0.5, 1.0, 2.0):
            r = decode_error(batch, ctx, heads, q_scale, device)
            rows.append(r)
            print(f"{batch:>4} {ctx:>6} {heads:>4} {q_scale:>4} {r['nope_score_std_nats']:>9.2f} | "
                  f"{r['rel_rms_error_fp8_vs_bf16']:>11.3e} {r['float64_values_only']:>11.3e} "
                  f"{r['float64_scores_only']:>11.3e} | {r['rel_rms_error_bf16_vs_float64']:>11.3e} "
                  f"{r['latent_rel_rms_error']:>10.3e}")
    new_tokens = args.new_tokens or (32 if args.quick else 256)
    shape = CPU_MODEL if cpu else GPU_MODEL
    print(f"\npatched DeepSeek-V3-shaped model {dataclasses.asdict(shape)}, bf16, greedy {new_tokens} tokens")
    model = payload["model"] = model_quality(shape, device, batch=4, prompt_len=32, new_tokens=new_tokens)
    fr, tf = model["free_running"], model["teacher_forced"]
    print(f"  free-running: {100 * fr['tokens_equal_fraction']:.1f}% of generated tokens equal; first divergence per "
          f"sequence {fr['first_divergence_per_sequence']} of {new_tokens}")
    print(f"  teacher-forced ({tf['positions']} positions): logits rel RMS fp8 vs bf16 cache "
          f"{tf['logits_rel_rms_fp8_vs_bf16_cache']:.3e}; vs the fp32 model: fp8 {tf['logits_rel_rms_fp8_vs_fp32_model']:.3e}"
          f", bf16 {tf['logits_rel_rms_bf16_vs_fp32_model']:.3e}")
    print(f"  greedy agreement: fp8 vs bf16 cache {100 * tf['greedy_agreement_fp8_vs_bf16_cache']:.1f}%; vs the fp32 "
          f"model: fp8 {100 * tf['greedy_agreement_fp8_vs_fp32_model']:.1f}%, bf16 "
          f"{100 * tf['greedy_agreement_bf16_vs_fp32_model']:.1f}%")
    if not cpu:
        print("\nspeed: mla_decode_fp8 against mla_decode (issue 12: >= 1.6x at B128 L4096 H16, >= 1x at H128)")
        speed(device, args.cuda_graph, speed_rows)


def main(argv=None) -> None:
    parser = h.make_parser(__doc__.split("\n\n")[0], plot=False)  # tables only: no --plot to ignore
    parser.add_argument("--new-tokens", type=h.positive_int, default=None,
                        help="greedy tokens per sequence (default 256)")
    args = parser.parse_args(argv)
    device = h.setup(args)
    cpu = h.is_cpu(device)
    from mla_kernels._utils import interpreting

    if cpu and interpreting():
        print("TRITON_INTERPRET=1: the model part takes minutes in the interpreter; unset it to use the PyTorch path")
    shapes = [(4, 1024, 16), (4, 4096, 16), (4, 4096, 128)] if not args.quick else [(2, 1024, 16)]
    if not cpu:
        shapes += [(128, 4096, 16), (128, 4096, 128)]
    rows, speed_rows = [], []
    payload = {
        "speed": speed_rows if not cpu else "not measured: needs a GPU",
        "config": {"quick": args.quick, "softmax_scale": SOFTMAX_SCALE, "target": TARGET, "page": 64,
                   "path": "PyTorch path (CPU, no interpreter)" if cpu and not interpreting() else "Triton kernels"},
        "decode_random": rows,
        "notes": [
            "decode: error of the fp8 path against the bf16 path, same bf16 queries; 'values only' / 'scores only': "
            "float64 attention with the dequantized latent used only as the value / only as the key",
            "model: random weights; a trained checkpoint must be measured before claiming model quality",
        ],
    }
    # the GPU session's fp8 step is time-boxed: a run stopped (or failing) in the model or speed part keeps the rest
    with h.save_if_stopped("fp8_quality", payload, device, args):
        _measure(args, device, cpu, shapes, rows, speed_rows, payload)
    h.save_results("fp8_quality", payload, device, args)
    h.exit_if_wrong(speed_rows, {}, lambda r: f"{r['provider']} B={r['B']} ctx={r['ctx']} H={r['H']}")


if __name__ == "__main__":
    main()
