"""Greedy decoding speed of a dense DeepSeek-V3-shaped model: where attention is what differs.

    python -m bench.generate [--quick] [--device cuda] [--plot] [--out DIR] [--new-tokens N] [--runs R]
                             [--model deepseek_v3|deepseek_v32]

A random-weight DeepSeek-V3-shaped model (DeepSeek's per-head widths: kv_lora_rank 512, rope 64, nope 128, v 128;
fewer heads and layers, sized for the machine) with every layer dense (``first_k_dense_replace =
num_hidden_layers``: no expert routing in Python to drown the attention). For each batch B and context L, the
prompt's first L - 1 tokens are put in the cache once (untimed); every timed run starts from a copy of that
cache and generates N tokens greedily, so it times N single-token steps over a context of about L:

no-cache            every step runs the whole sequence again (skipped past a length limit);
transformers-cache  transformers' DynamicCache and its own attention (sdpa), which expands the whole cached latent
                    through ``kv_b_proj`` at every step;
patched             ``mla_kernels.patch_model(model)``, eager: the kernels over the paged latent cache;
patched-norms       ``patch_model(model, norms=True)``, eager: also the decoder layers' own RMSNorms and the final
                    norm in one launch each (``KernelRMSNorm``): what the rest of an eager step gains beside attention;
patched-compiled    patched, with ``static_latent_cache`` and transformers' compiled decoding (``compile_config``,
                    fullgraph; on a GPU inductor with CUDA graphs). GPU only: on a CPU it is listed as skipped;
no-attention        the same model with every attention layer replaced by a stub returning zeros: the time of
                    everything else, so ``attention_share = 1 - no_attention / provider`` per step, for
                    transformers-cache and patched only (the eager cached steps whose rest that run times).

``--model deepseek_v32``: the same shape with DeepSeek-V3.2's indexer (it picks each token's top-2048 keys; stock
transformers masks the rest of its dense attention, the patched model reads only those): past 2048 tokens of
context the patched model's attention reads a fixed number of keys per token. The compiled provider is skipped.

Before timing, the patched model's prompt logits are checked against the unpatched model's (bf16 both), and so
are the logits of each patched provider's first two generated steps against transformers-cache's
(``decode_logits_rel_rms_err``: the second step is the compiled provider's first compiled one).
Tokens/s = B * N / (median time of one run); p20/p80 over the runs. On a CPU the patched model takes the
library's PyTorch path (the Triton kernels run only on a GPU or under the interpreter): CPU numbers say
nothing about the kernels.
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from mla_kernels._utils import interpreting
from mla_kernels.integrations.transformers import _the_cache

from . import _harness as h

# Logits after a few bf16 layers differ by rounding alone: measured ~1-2% relative RMS between two correct
# bf16 attention implementations (tests/test_transformers.py); 5% still refuses a wrong mask, scale or rope.
LOGITS_RTOL = 5e-2
PROVIDERS = ("no-cache", "transformers-cache", "patched", "patched-norms", "patched-compiled")
# attention_share = 1 - no_attention / provider holds only where "everything else" is what the no-attention run times:
# eager single-token steps over a cache. no-cache runs every layer's MLP over the whole sequence at every step, and
# patched-compiled runs everything else compiled (CUDA graphs), patched-norms the decoder layers' norms as kernels:
# the eager no-attention time (transformers' norms) is not their rest.
SHARE_PROVIDERS = ("transformers-cache", "patched")


@dataclasses.dataclass(frozen=True)
class ModelShape:
    hidden: int
    heads: int
    layers: int
    q_lora_rank: int | None
    vocab: int
    intermediate: int
    kv_lora_rank: int = 512
    rope: int = 64
    nope: int = 128
    v: int = 128
    experts: int = 0  # > 0: MoE from layer 1 on (layer 0 dense), moe_intermediate wide; 0: every layer dense
    moe_intermediate: int = 0


CPU_SHAPE = ModelShape(hidden=512, heads=8, layers=2, q_lora_rank=384, vocab=4096, intermediate=1024)
GPU_SHAPE = ModelShape(hidden=2048, heads=16, layers=8, q_lora_rank=1536, vocab=32000, intermediate=8192)


MODEL_TYPES = ("deepseek_v3", "deepseek_v32")
V32_INDEX = dict(index_topk=2048, index_head_dim=128, index_n_heads=64)  # DeepSeek-V3.2's indexer


def build_model(shape: ModelShape, device, dtype=torch.bfloat16, seed: int = 0, model_type: str = "deepseek_v3"):
    """``model_type`` "deepseek_v32": the same shape with DeepSeek-V3.2's indexer (sparse attention over each
    token's top-2048 keys); the compiled provider skips it (the static latent cache holds no indexer keys)."""
    import transformers

    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    sparse = model_type == "deepseek_v32"
    config_cls = transformers.DeepseekV32Config if sparse else transformers.DeepseekV3Config
    model_cls = transformers.DeepseekV32ForCausalLM if sparse else transformers.DeepseekV3ForCausalLM
    config = config_cls(**(V32_INDEX if sparse else {}),
        hidden_size=shape.hidden, num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
        q_lora_rank=shape.q_lora_rank, kv_lora_rank=shape.kv_lora_rank, qk_rope_head_dim=shape.rope,
        qk_nope_head_dim=shape.nope, v_head_dim=shape.v, num_hidden_layers=shape.layers,
        intermediate_size=shape.intermediate, moe_intermediate_size=shape.moe_intermediate or shape.intermediate // 4,
        n_routed_experts=shape.experts or 4, num_experts_per_tok=2, n_group=1, topk_group=1,
        first_k_dense_replace=1 if shape.experts else shape.layers,
        vocab_size=shape.vocab, max_position_embeddings=163840,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                         "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
                         "mscale": 1.0, "mscale_all_dim": 1.0},
        attn_implementation="sdpa", pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_cls(config)
    return model.to(dtype).eval()


class _NoAttention(torch.nn.Module):
    """Stands in for a whole attention layer (projections included) at almost no cost; it still counts the new
    tokens in the Cache (one-wide entries: a DynamicLayer holding no elements reports length 0), so generate
    feeds one token per step as with real attention."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states, *args, past_key_values=None, cache=None, **kwargs):
        past_key_values = _the_cache(past_key_values, cache)  # transformers 5.25 passes it as cache
        if past_key_values is not None:
            empty = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            past_key_values.update(empty, empty, self.layer_idx)
        return torch.zeros_like(hidden_states), None


def generate_no_cache(model, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Seed 001's loop: the whole sequence through the model at every step, argmax of the last logits."""
    ids = input_ids
    for _ in range(new_tokens):
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def _greedy(new_tokens: int, **kwargs) -> dict:
    return dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)


def _compile_config():
    from transformers import CompileConfig

    return CompileConfig(fullgraph=True)  # inductor, mode "reduce-overhead": CUDA graphs on a GPU


class _Prefilled:
    """A cache holding the prompt's first L - 1 tokens, and a fresh equivalent for each timed run: a deep copy of a
    DynamicCache (transformers' or the patched model's), or, for the static latent cache (whose tensors the
    compiled graph holds by address), its counters put back in place."""

    def __init__(self, model, ids, mask, static: int | None = None):
        from mla_kernels.integrations.transformers import static_latent_cache
        from transformers import DynamicCache

        self.static = static is not None
        if self.static:
            self.cache = static_latent_cache(model, ids.shape[0], static)
        else:
            self.cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], **h.cache_kw(model, self.cache), use_cache=True,
              logits_to_keep=1)
        if self.static:
            self.saved = [t.clone() for t in self._counters()]

    def _counters(self):
        return (*self.cache._mla_static_state.seqlens, *(layer.cumulative_length for layer in self.cache.layers))

    def fresh(self):
        if not self.static:
            return copy.deepcopy(self.cache)
        for t, saved in zip(self._counters(), self.saved):
            t.copy_(saved)
        return self.cache


# decode steps checked before timing: the first runs eagerly over the prefilled cache, the second is the first
# step a compiled provider runs compiled (transformers compiles the steps after generate's first forward)
CHECK_STEPS = 2


def _first_steps(model, prepare, ids, mask, **extra):
    """``(logits [steps, B, vocab] float32, tokens [B, steps])`` of ``model``'s first ``CHECK_STEPS`` greedy
    steps from a fresh prefilled cache, or None when they do not fit in memory (the row then says it was unchecked
    only by lacking ``decode_logits_rel_rms_err``)."""
    try:
        out = model.generate(input_ids=ids, attention_mask=mask, **h.cache_kw(model, prepare()), output_logits=True,
                             return_dict_in_generate=True, **_greedy(CHECK_STEPS), **extra)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None
    return torch.stack([x.float() for x in out.logits]), out.sequences[:, ids.shape[1]:]


def decode_steps_error(got, reference) -> float:
    """The largest relative RMS error of ``got``'s step logits against ``reference``'s (``_first_steps``' pairs).
    A step is compared on the rows whose earlier tokens agree (a bf16 tie may pick another token, after which the
    two runs see different inputs); the first step on every row."""
    (logits, tokens), (ref_logits, ref_tokens) = got, reference
    same = torch.ones(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    worst = 0.0
    for step in range(logits.shape[0]):
        if bool(same.any()):
            worst = max(worst, h.rel_rms_error(logits[step][same], ref_logits[step][same.to(ref_logits.device)]))
        same &= tokens[:, step] == ref_tokens[:, step].to(tokens.device)
    return worst


def time_runs(fn, device, runs: int) -> tuple[h.Timing, torch.Tensor]:
    """One warm-up call, then ``runs`` timed calls of ``fn(prepare())`` where only ``fn`` is timed."""
    prepare, call = fn
    out = call(prepare())
    watch = h.Stopwatch(device)
    for _ in range(runs):
        arg = prepare()
        h.synchronize(device)
        with watch:
            out = call(arg)
    return h.Timing.from_times(watch.times_ms(), "perf_counter" if h.is_cpu(device) else "cuda-events"), out


def run(device, shape: ModelShape, contexts, batches, new_tokens: int, runs: int, no_cache_limit: int,
        compiled: bool = True, rows: list | None = None, model_type: str = "deepseek_v3"):
    """The rows of every (batch, context), appended to ``rows`` (a list the caller holds) as each finishes."""
    from mla_kernels import patch_model

    base = build_model(shape, device, model_type=model_type)
    patched = patch_model(copy.deepcopy(base), block_size=64)
    normed = patch_model(copy.deepcopy(base), block_size=64, norms=True)
    patched_models = {"patched": patched, "patched-norms": normed, "patched-compiled": patched}
    cpu = h.is_cpu(device)
    rows = [] if rows is None else rows
    for batch in batches:
        for ctx in h.progress(contexts, f"contexts (batch {batch})"):
            gen = torch.Generator().manual_seed(ctx)
            ids = torch.randint(3, shape.vocab, (batch, ctx), generator=gen).to(device)
            mask = torch.ones_like(ids)
            keys = dict(B=batch, ctx=ctx, new=new_tokens)
            start = len(rows)  # this context's rows reach ``rows`` as they are made: a stopped run keeps them
            with torch.no_grad():
                expected = base(input_ids=ids, logits_to_keep=1).logits[:, -1].float()
                errs = {name: h.rel_rms_error(model(input_ids=ids, logits_to_keep=1).logits[:, -1].float(), expected)
                        for name, model in (("patched", patched), ("patched-norms", normed))}
                errs["patched-compiled"] = errs["patched"]
                del expected
                plans = {}
                if ctx <= no_cache_limit:
                    plans["no-cache"] = (lambda: None, lambda _: generate_no_cache(base, ids, new_tokens))
                else:
                    rows.append(h.make_row("no-cache", None, note=f"skipped: context > {no_cache_limit}", **keys))
                for name, model in (("transformers-cache", base), ("patched", patched), ("patched-norms", normed)):
                    pre = _Prefilled(model, ids, mask)
                    plans[name] = (pre.fresh, lambda cache, m=model: m.generate(
                        input_ids=ids, attention_mask=mask, **h.cache_kw(m, cache), **_greedy(new_tokens)))
                if model_type == "deepseek_v32":
                    rows.append(h.make_row("patched-compiled", None, note="skipped: the static latent cache "
                                                "holds no indexer keys (DeepSeek-V3.2)", **keys))
                elif compiled and not cpu:
                    pre = _Prefilled(patched, ids, mask, static=ctx + new_tokens + 1)
                    plans["patched-compiled"] = (pre.fresh, lambda cache: patched.generate(
                        input_ids=ids, attention_mask=mask, **h.cache_kw(patched, cache), compile_config=_compile_config(),
                        **_greedy(new_tokens)))
                else:
                    rows.append(h.make_row("patched-compiled", None, note="skipped: CUDA graphs and compiled "
                                                "decoding are measured on a GPU only", **keys))
                tokens = {}
                reference_steps = _first_steps(base, plans["transformers-cache"][0], ids, mask)
                for name, plan in plans.items():
                    if name.startswith("patched") and not errs[name] < LOGITS_RTOL:
                        rows.append(h.make_row(name, None, note=f"WRONG: prompt logits rel. RMS error {errs[name]:.2e}",
                                                    wrong=True, **keys))
                        continue
                    step_err = None
                    if name.startswith("patched") and reference_steps is not None:  # its decode steps, before timing
                        extra = dict(compile_config=_compile_config()) if name == "patched-compiled" else {}
                        got = _first_steps(patched_models[name], plan[0], ids, mask, **extra)
                        step_err = None if got is None else decode_steps_error(got, reference_steps)
                        if step_err is not None and not step_err < LOGITS_RTOL:
                            rows.append(h.make_row(name, None, note="WRONG: first decode steps' logits rel. RMS "
                                                        f"error {step_err:.2e}", wrong=True, **keys))
                            continue
                    try:
                        timing, out = time_runs(plan, device, runs)
                    except torch.OutOfMemoryError:  # this provider at this size: the others, and the next sizes,
                        torch.cuda.empty_cache()       # still run
                        rows.append(h.make_row(name, None, note="skipped: out of memory", **keys))
                        continue
                    tokens[name] = out[:, ctx:]
                    row = h.make_row(name, timing, **keys)
                    if step_err is not None:
                        row["decode_logits_rel_rms_err"] = step_err
                    row["tokens_per_s"] = batch * new_tokens / (timing.p50 * 1e-3)
                    rows.append(row)
                    del plan
                plans.clear()
                # everything but attention: the transformers-cache run with the attention layers stubbed out
                layers = base.model.layers
                originals = [layer.self_attn for layer in layers]
                for i, layer in enumerate(layers):
                    layer.self_attn = _NoAttention(i)
                try:
                    pre = _Prefilled(base, ids, mask)
                    rest, _ = time_runs((pre.fresh, lambda cache: base.generate(
                        input_ids=ids, attention_mask=mask, **h.cache_kw(base, cache), **_greedy(new_tokens))),
                        device, runs)
                finally:
                    for layer, attn in zip(layers, originals):
                        layer.self_attn = attn
                rows.append(h.make_row("no-attention", rest, **keys))
            step_rows = rows[start:]
            reference = next((r for r in step_rows if r["provider"] == "transformers-cache" and "p50_ms" in r), None)
            for r in step_rows:
                if "p50_ms" not in r or r["provider"] == "no-attention":
                    continue
                if r["provider"] in SHARE_PROVIDERS:  # the same eager, cached decode steps as the no-attention run
                    r["attention_share"] = max(0.0, 1.0 - rest.p50 / r["p50_ms"])
                if reference is not None:
                    r["speedup_vs_transformers_cache"] = reference["p50_ms"] / r["p50_ms"]
                if r["provider"].startswith("patched"):
                    r["prompt_logits_rel_rms_err"] = errs[r["provider"]]
                    if "transformers-cache" in tokens and r["provider"] in tokens:
                        r["tokens_agree_with_transformers"] = float(
                            (tokens[r["provider"]] == tokens["transformers-cache"]).float().mean())
            for r in step_rows:
                h.log(format_row(r))
            if not cpu:
                torch.cuda.empty_cache()
    return rows


def format_row(r: dict) -> str:
    head = f"{r['provider']:<19}{r['B']:>3}{r['ctx']:>7}{r['new']:>5}"
    if "p50_ms" not in r:
        return f"{head} | {'not timed':>30} | {r.get('note', '')}"
    lat = f"{r['p50_ms'] / 1e3:8.3f} s [{r['p20_ms'] / 1e3:.3f}, {r['p80_ms'] / 1e3:.3f}]"
    if r["provider"] == "no-attention":
        return f"{head} | {lat:>30} | everything but attention"
    speed = r.get("speedup_vs_transformers_cache")
    share = r.get("attention_share")
    return (f"{head} | {lat:>30} | {r['tokens_per_s']:9.1f} tok/s | attention "
            + (f"{100 * share:5.1f}%" if share is not None else "    -")
            + (f" | {speed:5.2f}x transformers' cache" if speed else ""))


def plot(rows, path):
    plt = h.pyplot()
    if plt is None:
        return
    batches = sorted({r["B"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for provider in PROVIDERS:
            pts = [(r["ctx"], r["tokens_per_s"]) for r in rows
                   if r["provider"] == provider and r["B"] == batch and "tokens_per_s" in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=provider)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("generated tokens / s")
        ax.set_title(f"batch {batch}")
        ax.legend()
        ax.grid(alpha=0.3)
    h.save_plot(fig, path)


def _context_len(text: str) -> int:
    """``--context``: at least 2 tokens (the first L - 1 are prefilled into the cache, the last one starts decoding)."""
    import argparse

    value = h.positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: a context needs at least 2 tokens")
    return value


def main(argv=None) -> None:
    parser = h.make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=h.positive_int, nargs="+", default=None, help="batch sizes (default 1 and 16)")
    parser.add_argument("--context", type=_context_len, nargs="+", default=None, help="context lengths")
    parser.add_argument("--new-tokens", type=h.positive_int, default=None, help="tokens generated per sequence and run")
    parser.add_argument("--runs", type=h.positive_int, default=None, help="timed runs per provider and shape")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled provider")
    parser.add_argument("--model", choices=MODEL_TYPES, default="deepseek_v3",
                        help="deepseek_v32: DeepSeek-V3.2's sparse attention (indexer, top-2048 keys per token)")
    args = parser.parse_args(argv)
    device = h.setup(args)
    cpu = h.is_cpu(device)
    shape = CPU_SHAPE if cpu else GPU_SHAPE
    if cpu:
        contexts = [64, 512] if args.quick else [128, 1024, 4096]
        batches = [1, 4] if args.quick else [1, 16]
        no_cache_limit = 128
    else:
        contexts = [128, 1024] if args.quick else [128, 1024, 8192, 32768]
        batches = [1] if args.quick else [1, 16]
        no_cache_limit = 1024
    contexts, batches = args.context or contexts, args.batch or batches
    new_tokens = args.new_tokens or (4 if cpu and args.quick else 8 if cpu else 32)
    runs = args.runs or (3 if args.quick else 5)
    where = "CPU (the library's PyTorch path, not the Triton kernels)" if cpu and not interpreting() \
        else h.device_name(device)
    print(f"greedy decoding on {where}: {args.model} {dataclasses.asdict(shape)}, dense, bf16, batches {batches}, "
          f"contexts "
          f"{contexts}, {new_tokens} new tokens per run, {runs} timed runs")
    rows = []
    payload = {
        "config": {"model_type": args.model, "shape": dataclasses.asdict(shape), "dense": True, "dtype": "bfloat16",
                   "batches": batches,
                   "contexts": contexts, "new_tokens": new_tokens, "runs": runs, "quick": args.quick,
                   "no_cache_limit": no_cache_limit, "logits_rtol": LOGITS_RTOL},
        "cpu_note": ("CPU run: the patched model uses the library's PyTorch path (Triton runs only on a GPU or "
                     "under the interpreter); its speed says nothing about the kernels. The compiled provider "
                     "runs on a GPU only.") if cpu else None,
        "rows": rows,
    }
    with h.save_if_stopped("generate", payload, device, args):
        run(device, shape, contexts, batches, new_tokens, runs, no_cache_limit, compiled=not args.no_compile, rows=rows,
            model_type=args.model)
    h.save_results("generate", payload, device, args, plot=lambda png: plot(rows, png))
    h.exit_if_wrong(rows, {}, lambda r: f"{r['provider']} B={r['B']} ctx={r['ctx']}")


if __name__ == "__main__":
    main()
