"""Greedy generation speed: no cache vs transformers' cache vs the patched model (seed 001, done properly).

    python -m bench.generate [--quick] [--device cuda] [--plot] [--out DIR] [--batch B] [--new-tokens N]

A random-weight DeepSeek-V3-shaped model (DeepSeek's per-head widths: kv_lora_rank 512, rope 64, nope 128,
v 128; fewer heads and layers, sized for the machine) generates N tokens greedily from prompts of growing
length, three ways:

no-cache            every step runs the whole sequence again (seed 001's ``generate_without_cache``);
transformers-cache  ``model.generate`` with transformers' own DynamicCache and its attention (sdpa);
patched             ``mla_kernels.patch_model(model)`` then ``model.generate``: the kernels over the paged
                    latent cache (on a CPU without the interpreter, the library's PyTorch path).

Before timing, the patched model's prompt logits are checked against the unpatched model's (bf16 both).
Tokens/s = B * N / (median wall time of one generate call).
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from mla_kernels._utils import interpreting

from . import _harness as h

# Logits after a few bf16 layers differ by rounding alone: measured ~1-2% relative RMS between two correct
# bf16 attention implementations (tests/test_transformers.py); 5% still refuses a wrong mask, scale or rope.
LOGITS_RTOL = 5e-2


@dataclasses.dataclass(frozen=True)
class ModelShape:
    hidden: int
    heads: int
    layers: int
    q_lora_rank: int | None
    vocab: int
    experts: int
    moe_intermediate: int
    kv_lora_rank: int = 512
    rope: int = 64
    nope: int = 128
    v: int = 128


CPU_SHAPE = ModelShape(hidden=1024, heads=8, layers=4, q_lora_rank=384, vocab=8192, experts=8, moe_intermediate=256)
GPU_SHAPE = ModelShape(hidden=2048, heads=16, layers=8, q_lora_rank=1536, vocab=32000, experts=16,
                       moe_intermediate=512)


def build_model(shape: ModelShape, device, dtype=torch.bfloat16, seed: int = 0):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(
        hidden_size=shape.hidden, num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
        q_lora_rank=shape.q_lora_rank, kv_lora_rank=shape.kv_lora_rank, qk_rope_head_dim=shape.rope,
        qk_nope_head_dim=shape.nope, v_head_dim=shape.v, num_hidden_layers=shape.layers,
        intermediate_size=4 * shape.hidden, moe_intermediate_size=shape.moe_intermediate,
        n_routed_experts=shape.experts, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
        vocab_size=shape.vocab, max_position_embeddings=163840,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                         "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
                         "mscale": 1.0, "mscale_all_dim": 1.0},
        attn_implementation="sdpa", pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    with torch.device(device):
        model = DeepseekV3ForCausalLM(config)
    return model.to(dtype).eval()


def generate_no_cache(model, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Seed 001's loop: the whole sequence through the model at every step, argmax of the last logits."""
    ids = input_ids
    for _ in range(new_tokens):
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def generate_cached(model, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True)


def time_generation(fn, device, runs: int) -> tuple[h.Timing, torch.Tensor]:
    """One warm-up call, then ``runs`` timed calls of ``fn()`` (wall time of the whole generation)."""
    out = fn()
    watch = h.Stopwatch(device)
    for _ in range(runs):
        with watch:
            out = fn()
    return h.Timing.from_times(watch.times_ms(), "perf_counter" if h.is_cpu(device) else "cuda-events"), out


def cache_bytes(model, input_ids, new_tokens: int) -> dict:
    """Bytes held by the cache a generate call returns: transformers' K/V tensors and the latent cache."""
    from mla_kernels.integrations.transformers import latent_cache

    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, return_dict_in_generate=True)
    cache = out.past_key_values
    kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
             if isinstance(t, torch.Tensor))
    lc = latent_cache(cache)
    latent_used = latent_alloc = 0
    if lc is not None:
        tokens = sum(lc.seqlen(s) for s in lc.seq_ids)
        latent_used = tokens * lc.bytes_per_token
        latent_alloc = sum(lc.buffer(i).numel() * lc.buffer(i).element_size() for i in range(lc.num_layers))
    return {"transformers_kv_bytes": kv, "latent_used_bytes": latent_used, "latent_allocated_bytes": latent_alloc,
            "cached_tokens": cache.get_seq_length()}


def run(device, shape: ModelShape, prompt_lens, batch: int, new_tokens: int, runs: int, no_cache_limit: int):
    from mla_kernels import patch_model

    base = build_model(shape, device)
    patched = patch_model(copy.deepcopy(base), block_size=64)
    rows = []
    for prompt_len in h.progress(prompt_lens, "prompt lengths"):
        gen = torch.Generator().manual_seed(prompt_len)
        ids = torch.randint(3, shape.vocab, (batch, prompt_len), generator=gen).to(device)
        keys = dict(B=batch, prompt=prompt_len, new=new_tokens)
        with torch.no_grad():
            expected = base(input_ids=ids).logits[:, -1].float()
            err = h.rel_rms_error(patched(input_ids=ids).logits[:, -1].float(), expected)
            providers = {
                "no-cache": (base, generate_no_cache),
                "transformers-cache": (base, generate_cached),
                "patched": (patched, generate_cached),
            }
            results, tokens = {}, {}
            for name, (model, fn) in providers.items():
                if name == "no-cache" and prompt_len > no_cache_limit:
                    rows.append(h.make_row(name, None, note=f"skipped: prompt > {no_cache_limit}", **keys))
                    continue
                if name == "patched" and not err < LOGITS_RTOL:
                    rows.append(h.make_row(name, None, note=f"WRONG: prompt logits rel. RMS error {err:.2e}", **keys))
                    continue
                timing, out = time_generation(lambda: fn(model, ids, new_tokens), device, runs)
                results[name], tokens[name] = timing, out[:, prompt_len:]
                row = h.make_row(name, timing, **keys)
                row["tokens_per_s"] = batch * new_tokens / (timing.p50 * 1e-3)
                rows.append(row)
            memory = {name: cache_bytes(model, ids, new_tokens)
                      for name, model in (("transformers-cache", base), ("patched", patched))}
        step_rows = [r for r in rows if r.get("prompt") == prompt_len]
        base_tps = next((r["tokens_per_s"] for r in step_rows if r["provider"] == "no-cache" and "tokens_per_s" in r),
                        None)
        for r in step_rows:
            if base_tps and "tokens_per_s" in r:
                r["speedup"] = f"{r['tokens_per_s'] / base_tps:.2f}x vs no-cache"
            if r["provider"] == "patched":
                r["prompt_logits_rel_rms_err"] = err
                if "transformers-cache" in tokens and "patched" in tokens:
                    r["tokens_agree_with_transformers"] = float(
                        (tokens["patched"] == tokens["transformers-cache"]).float().mean())
            if r["provider"] in memory:
                r.update(memory[r["provider"]])
        for r in step_rows:
            h.log(format_row(r))
    return rows


def format_row(r: dict) -> str:
    head = f"{r['provider']:<19}{r['B']:>3}{r['prompt']:>7}{r['new']:>5}"
    if "p50_ms" not in r:
        return f"{head} | {'not timed':>12} | {r.get('note', '')}"
    mem = ""
    if "transformers_kv_bytes" in r:
        held = r["transformers_kv_bytes"] + r["latent_used_bytes"]
        mem = f" | cache {held / max(1, r['cached_tokens'] * r['B']):7.0f} B/token"
    return (f"{head} | {r['p50_ms'] / 1e3:9.3f} s | {r['tokens_per_s']:9.1f} tok/s | {r.get('speedup', ''):<18}"
            f"{mem}").rstrip()


def plot(rows, path):
    plt = h.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for provider in ("no-cache", "transformers-cache", "patched"):
        pts = [(r["prompt"], r["tokens_per_s"]) for r in rows if r["provider"] == provider and "tokens_per_s" in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=provider)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("generated tokens / s")
    ax.legend()
    ax.grid(alpha=0.3)
    h.save_plot(fig, path)


def main(argv=None) -> None:
    parser = h.make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1, help="sequences generated together (default 1, as seed 001)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens generated per sequence")
    parser.add_argument("--runs", type=int, default=None, help="timed generate calls per provider and length")
    args = parser.parse_args(argv)
    device = h.setup(args)
    cpu = h.is_cpu(device)
    shape = CPU_SHAPE if cpu else GPU_SHAPE
    if cpu:
        prompt_lens = [16, 64] if args.quick else [16, 64, 256]
        no_cache_limit = 256
    else:
        prompt_lens = [128, 1024] if args.quick else [128, 512, 1024, 2048, 4096]
        no_cache_limit = 2048
    new_tokens = args.new_tokens or (8 if args.quick else 16 if cpu else 64)
    runs = args.runs or (1 if args.quick else 2 if cpu else 3)
    where = "CPU (the library's PyTorch path, not the Triton kernels)" if cpu and not interpreting() \
        else h.device_name(device)
    print(f"greedy generation on {where}: {dataclasses.asdict(shape)}, bf16, batch {args.batch}, "
          f"{new_tokens} new tokens, {runs} timed run(s)")
    rows = run(device, shape, prompt_lens, args.batch, new_tokens, runs, no_cache_limit)
    payload = {
        "config": {"shape": dataclasses.asdict(shape), "dtype": "bfloat16", "batch": args.batch,
                   "new_tokens": new_tokens, "runs": runs, "prompt_lens": prompt_lens, "quick": args.quick,
                   "logits_rtol": LOGITS_RTOL},
        "cpu_note": ("CPU run: the patched model uses the library's PyTorch path (Triton runs only on a GPU or "
                     "under the interpreter); its speed says nothing about the kernels") if cpu else None,
        "rows": rows,
    }
    h.save_results("generate", payload, device, args, plot=lambda png: plot(rows, png))


if __name__ == "__main__":
    main()
