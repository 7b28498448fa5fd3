"""Host work of one eager call: argument checks and launch preparation, with the kernel launches removed.

    python -m bench.host [--jit] [--prompt] [--threads 1] [--out DIR]

On a GPU an eager ``mla_decode`` costs its GPU time plus the Python work before the launch plus Triton's
launch; ``bench.decode`` times the whole call against a CUDA-graph replay. This benchmark isolates the part
the library controls, on any machine: the public call with the Triton kernels replaced by no-op stubs, on
``meta`` tensors (no data, no CPU-only value checks: the code path a GPU call takes, minus the launch and the
caching allocator). Shapes: seed 003's decode step (B1 L1024 H16, R 512, P 64, page 64; without and with
``w_uv``, whose bmm runs torch's Python meta function here, slower than the C++ dispatch a GPU tensor takes),
DeepSeek-R1's 128 heads, sparse decode (``indices``, a list of 512 keys), the seed decode step through FlashMLA's
interface (``flash_mla_with_kvcache``: its checks and lse conversion on top of ``mla_decode``; on meta that
conversion runs torch's Python meta function, so this row overstates it), ``write_cache`` of one token, and
``mla_prefill_attention`` on seed 003's prefill batch
(4 requests, new [64, 128, 256, 256] over history [512, 0, 0, 256], 16 heads, D_nope = D_v = 128) down each
path, without and with the host lengths (``cu_seqlens_q_host``/``cache_seqlens_host``). Meta tensors hold no
values, so where the call copies the lengths to the host (``prefill._read_lengths``, a synchronisation on a GPU)
the stub runs the same ops on meta and hands back the known lengths: the copy and the wait for the GPU are not in
these numbers. PyTorch ops on meta run torch's Python meta functions, slower than a GPU tensor's C++ dispatch.
Timings are noisy on a shared machine: compare
``min_us`` (the least-disturbed sample) as well as the median.

``--prompt`` times instead a patched model's prompt step on the CPU (PyTorch paths, no stubs): the forward pass of a
small 16-layer DeepSeek-V3 over a batch of 4 prompts, left-padded or not, into a fresh dynamic or static latent
cache. What the host does there besides computing (packing the pads, reading lengths) is what it measures; the
waits for a GPU that its reads would cost are not in it. Give it ``--threads 1`` on a shared CPU: on the 2-core
machine it takes 20 s with one thread and had not finished after 5 minutes with torch's default two (spin-waiting).

``--jit`` adds Triton's own host work per launch (binding and specializing the arguments, finding the compiled
kernel, calling its launcher), measured without a GPU: the decode launch driven through Triton's JIT as on an H100,
minus the same launch with the kernels stubbed; once through ``kernel[grid]`` and once through the library's cached
launch (``mla_kernels._launcher``). The driver's launch call itself is not in it.

On a GPU it also times the real eager call (wall clock over many calls, synchronised once), once with the
library's cached launch and once with Triton's own ``kernel[grid]`` (after checking that both give the same
outputs), and the same call replayed in a CUDA graph, so the host share of an eager call is measured on the
machine that matters.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch

from mla_kernels import _tuning, _utils, cache as cache_mod, decode as decode_mod, prefill as prefill_mod
from mla_kernels import norm as norm_mod, norm_rope as norm_rope_mod, rope as rope_mod
from mla_kernels.cache import write_cache
from mla_kernels.decode import mla_decode
from mla_kernels.integrations.flash_mla import flash_mla_with_kvcache
from mla_kernels.prefill import mla_prefill_attention

from . import _harness as h
from .prefill import SEED_HISTORY, SEED_NEW


class _NoLaunch:
    """Stands in for a ``@triton.jit`` function: ``kernel[grid](*args, **kwargs)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _meta_read_lengths(cu_seqlens_q, cache_seqlens):
    """``prefill._read_lengths`` for meta tensors built by ``prefill_args``: the same ops on meta, then the lengths
    the case was built with (a meta tensor cannot be copied to the host)."""
    torch.cat([cu_seqlens_q.long(), cache_seqlens.long()])
    return torch.tensor(cu_seqlens_q.bench_values + cache_seqlens.bench_values)


_STUBS = ((decode_mod, "_mla_attn_kernel"), (decode_mod, "_mla_sparse_attn_kernel"), (decode_mod, "_mla_combine_kernel"),
          (cache_mod, "_write_cache_kernel"), (prefill_mod, "_mla_expanded_kernel"),
          (prefill_mod, "_gather_latent_kernel"), (rope_mod, "_rope_kernel"), (norm_mod, "_rms_norm_kernel"),
          (norm_rope_mod, "_norm_rope_kernel"))


@contextlib.contextmanager
def stubbed_kernels():
    """Replace the Triton kernels by no-ops, route meta tensors down the Triton path and read meta lengths from
    the case (``_meta_read_lengths``)."""
    saved = [getattr(mod, name) for mod, name in _STUBS] + [_utils.use_triton, prefill_mod._read_lengths]
    for mod, name in _STUBS:
        setattr(mod, name, _NoLaunch())
    _utils.use_triton = lambda t: t.device.type in ("cuda", "meta")
    prefill_mod._read_lengths = _meta_read_lengths
    try:
        yield
    finally:
        for (mod, name), value in zip(_STUBS, saved):
            setattr(mod, name, value)
        _utils.use_triton, prefill_mod._read_lengths = saved[-2:]


def _values(*shape, dtype, device, scale=1.0):
    """Inputs: uninitialised on meta (nothing is read), random elsewhere, so that ``_same_result`` compares outputs
    that depend on every launch argument (a fresh GPU allocation reads as zeros: every output would be zero too)."""
    if device.type == "meta":
        return torch.empty(*shape, dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(hash(shape) % 2 ** 31)  # (a seed per shape: q is not k's copy)
    return (torch.randn(*shape, device=device, generator=gen) * scale).to(dtype)


def decode_args(device, batch=1, ctx=1024, heads=16, page=64, dtype=torch.bfloat16, d_latent=512, d_rope=64,
                d_v=128):
    blocks = batch * (ctx // page)
    buf = _values(blocks, page, d_latent + d_rope, dtype=dtype, device=device)
    q = _values(batch, 1, heads, d_latent + d_rope, dtype=dtype, device=device)
    if device.type == "meta":
        block_table = torch.empty(batch, ctx // page, dtype=torch.int32, device=device)
        seqlens = torch.empty(batch, dtype=torch.int32, device=device)
    else:
        block_table = torch.arange(blocks, dtype=torch.int32, device=device).view(batch, -1)
        seqlens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    w_uv = _values(heads, d_v, d_latent, dtype=dtype, device=device, scale=d_latent ** -0.5)
    args = (q[..., :d_latent], q[..., d_latent:], buf[..., :d_latent], buf[..., d_latent:], block_table, seqlens,
            0.1)
    return args, dict(w_uv=w_uv, max_seqlen_k=ctx)


def flash_args(device, batch=1, ctx=1024, heads=16, page=64, dtype=torch.bfloat16, d_latent=512, d_rope=64):
    """``flash_mla_with_kvcache``'s positional arguments for the same call as ``decode_args``: q ``[B, 1, H, R + P]``
    and k_cache ``[N, page, 1, R + P]`` whole, as FlashMLA's callers hold them."""
    (q_nope, _, kv_cache, _, block_table, seqlens, _), _ = decode_args(device, batch, ctx, heads, page, dtype,
                                                                         d_latent, d_rope)
    q = q_nope.as_strided((batch, 1, heads, d_latent + d_rope), q_nope.stride())
    k_cache = kv_cache.as_strided((kv_cache.shape[0], page, 1, d_latent + d_rope), (*kv_cache.stride()[:2], 0, 1))
    return q, k_cache, block_table, seqlens, d_latent


def write_args(device, tokens=1, blocks=16, page=64, dtype=torch.bfloat16, d_latent=512, d_rope=64):
    buf = _values(blocks, page, d_latent + d_rope, dtype=dtype, device=device)
    kv = _values(tokens, d_latent + d_rope, dtype=dtype, device=device)
    slots = (torch.empty(tokens, dtype=torch.int64, device=device) if device.type == "meta"
             else torch.arange(tokens, dtype=torch.int64, device=device))
    return kv[:, :d_latent], kv[:, d_latent:], buf[..., :d_latent], buf[..., d_latent:], slots


def prefill_args(device, new=SEED_NEW, history=SEED_HISTORY, heads=16, page=64, dtype=torch.bfloat16, d_latent=512,
                 d_rope=64, d_nope=128, d_v=128):
    """``mla_prefill_attention``'s positional arguments for a ragged batch (queries and caches as views of one
    buffer each), and the host lengths ``(cu_seqlens_q, cache_seqlens)`` as lists. On meta the index tensors carry
    their values as ``bench_values`` (for ``_meta_read_lengths``)."""
    lens = [n + h for n, h in zip(new, history)]
    blocks = [-(-n // page) for n in lens]
    cu = [0]
    for n in new:
        cu.append(cu[-1] + n)
    buf = _values(sum(blocks), page, d_latent + d_rope, dtype=dtype, device=device)
    q = _values(cu[-1], heads, d_nope + d_rope, dtype=dtype, device=device)
    w_kv_b = _values(heads * (d_nope + d_v), d_latent, dtype=dtype, device=device, scale=d_latent ** -0.5)
    if device.type == "meta":
        table = torch.empty(len(lens), max(blocks), dtype=torch.int32, device=device)
        cu_t = torch.empty(len(cu), dtype=torch.int32, device=device)
        lens_t = torch.empty(len(lens), dtype=torch.int32, device=device)
        cu_t.bench_values, lens_t.bench_values = cu, lens
    else:
        table = torch.arange(sum(blocks), dtype=torch.int32).split(blocks)
        table = torch.nn.utils.rnn.pad_sequence(list(table), batch_first=True).to(device)
        cu_t = torch.tensor(cu, dtype=torch.int32, device=device)
        lens_t = torch.tensor(lens, dtype=torch.int32, device=device)
    args = (q[..., :d_nope], q[..., d_nope:], buf[..., :d_latent], buf[..., d_latent:], table, cu_t, lens_t, w_kv_b,
            0.1)
    return args, (cu, lens)


def per_call_us(fn, calls: int, repeats: int, sync=None) -> h.Timing:
    """``repeats`` samples of the mean wall time of ``calls`` back-to-back calls, in µs (stored in the ms fields),
    after ``calls`` warm-up calls. ``sync`` (a GPU's synchronize): called before and after each sample, so a sample
    is the eager calls' wall clock, GPU work included."""
    label = "perf_counter, µs per call" if sync is None else "wall clock, µs per call"
    sync = sync or (lambda: None)
    for _ in range(calls):
        fn()
    samples = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return h.Timing.from_times(samples, label)


def _row(provider: str, case: str, t: h.Timing, scale: float = 1.0, **extra) -> dict:
    """A result row of timing ``t`` in µs (``scale`` 1e3 for a ``Timing`` in ms, as ``h.time_fn`` gives)."""
    return dict(provider=provider, case=case, p50_us=t.p50 * scale, p20_us=t.p20 * scale, p80_us=t.p80 * scale,
                min_us=t.min * scale, runs=t.runs, **extra)


def cases(device):
    d_args, d_kw = decode_args(device)
    d128_args, d128_kw = decode_args(device, heads=128)
    w_args = write_args(device)
    f_args = flash_args(device)
    p_args, (cu, lens) = prefill_args(device)
    host = dict(cu_seqlens_q_host=cu, cache_seqlens_host=lens)
    latent_only = dict(d_kw, w_uv=None)
    # sparse decode's key list: 512 real positions (uninitialised ones would lie outside the sequence, skipped by the
    # kernel, so a GPU row would time a call reading ~no keys); built once, outside the timed calls
    topk = torch.arange(512, dtype=torch.int32, device=device).view(1, 1, 512)
    # the drop-in's rope of one decode step's query and key (DeepSeek-V3: 128 heads, interleaved pairs, bf16 tables)
    q_pe, k_pe = _values(1, 1, 128, 64, dtype=torch.bfloat16, device=device), _values(1, 1, 64, dtype=torch.bfloat16,
                                                                                         device=device)
    cos, sin = (_values(1, 1, 64, dtype=torch.bfloat16, device=device) for _ in range(2))
    # the drop-in's two RMSNorms of one decode step (DeepSeek-V3: the query's 1536 wide, the latent's 512 of the
    # latent projection's 576-wide row)
    q_norm, kv_norm = (norm_mod.DeepseekRMSNorm(n, device=device, dtype=torch.bfloat16).requires_grad_(False)
                       for n in (1536, 512))
    q_a, kv_a = _values(1, 1, 1536, dtype=torch.bfloat16, device=device), _values(1, 1, 576, dtype=torch.bfloat16,
                                                                                 device=device)
    return {
        "mla_decode B1 L1024 H16": lambda: mla_decode(*d_args, **latent_only),
        "mla_decode B1 L1024 H16 w_uv": lambda: mla_decode(*d_args, **d_kw),
        "mla_decode B1 L1024 H128 w_uv": lambda: mla_decode(*d128_args, **d128_kw),
        "mla_decode B1 L1024 H16 sparse K512": lambda: mla_decode(*d_args, **latent_only, indices=topk),
        "flash_mla_with_kvcache B1 L1024 H16": lambda: flash_mla_with_kvcache(*f_args, softmax_scale=0.1),
        "write_cache T1": lambda: write_cache(*w_args),
        "rope query + key B1 H128 (two launches)": lambda: (
            rope_mod.rope(q_pe, cos[:, :, None], sin[:, :, None], "interleave"),
            rope_mod.rope(k_pe, cos, sin, "interleave")),
        "apply_rope query + key B1 H128 (PyTorch ops)": lambda: (
            rope_mod.apply_rope(q_pe, cos[:, :, None], sin[:, :, None], "interleave"),
            rope_mod.apply_rope(k_pe, cos, sin, "interleave")),
        "rms_norm query + latent B1 (two launches)": lambda: (
            norm_mod.rms_norm(q_norm, q_a), norm_mod.rms_norm(kv_norm, kv_a[..., :512])),
        "RMSNorm modules query + latent B1 (PyTorch ops)": lambda: (q_norm(q_a), kv_norm(kv_a[..., :512])),
        # what MLAttention.project launches after its projections: the latent's norm and both ropes, before and now
        "rms_norm latent + rope query + key B1 H128 (three launches)": lambda: (
            norm_mod.rms_norm(kv_norm, kv_a[..., :512]), rope_mod.rope(q_pe, cos[:, :, None], sin[:, :, None],
                                                                       "interleave"),
            rope_mod.rope(k_pe, cos, sin, "interleave")),
        "norm_and_rope latent + query + key B1 H128 (one launch)": lambda: norm_rope_mod.norm_and_rope(
            kv_norm, kv_a[..., :512], q_pe, k_pe, cos, sin, "interleave"),
        "mla_prefill_attention seed003 absorbed": lambda: mla_prefill_attention(*p_args, path="absorbed"),
        "mla_prefill_attention seed003 expanded": lambda: mla_prefill_attention(*p_args, path="expanded"),
        "mla_prefill_attention seed003 absorbed host lengths": lambda: mla_prefill_attention(*p_args, path="absorbed",
                                                                                             **host),
        "mla_prefill_attention seed003 expanded host lengths": lambda: mla_prefill_attention(*p_args, path="expanded",
                                                                                             **host),
        "mla_prefill_attention seed003 auto host lengths": lambda: mla_prefill_attention(*p_args, **host),
    }


H100_CONFIGS = "nvidia-h100-80gb-hbm3.json"  # the shipped file an H100's calls read (mla_kernels/configs)


@contextlib.contextmanager
def shipped_configs(name: str = H100_CONFIGS):
    """Meta tensors read the shipped config file ``name`` as calls on that GPU do (its configs are
    ``_tuning.Tuned``, whose launches take the stored-config path), and no user file; restored after."""
    saved = _tuning._gpu_index, _tuning.device_file, _tuning.user_file
    _tuning._gpu_index = lambda device: 0 if device.type == "meta" else saved[0](device)
    _tuning.device_file = lambda index=0: _tuning.CONFIG_DIR / name
    _tuning.user_file = lambda index=0: _tuning.CONFIG_DIR / "no-user-file.json"
    _tuning.reload()
    try:
        yield
    finally:
        _tuning._gpu_index, _tuning.device_file, _tuning.user_file = saved
        _tuning.reload()


def run_host(calls: int, repeats: int, rows: list | None = None) -> list[dict]:
    """The stubbed calls' rows, appended to ``rows`` (a list the caller holds) as each case finishes; then the
    decode case again with the H100's config file read, as an H100's calls do (``shipped_configs``)."""
    rows = [] if rows is None else rows
    with stubbed_kernels():
        all_cases = cases(torch.device("meta"))
        for name, fn in all_cases.items():
            _host_row(rows, name, fn, calls, repeats)
        with shipped_configs():
            name = "mla_decode B1 L1024 H16"
            assert isinstance(decode_mod.decode_tiles(16, 512, torch.device("meta")), _tuning.Tuned)
            _host_row(rows, f"{name}, H100 config file", all_cases[name], calls, repeats)
    return rows


def _host_row(rows: list, name: str, fn, calls: int, repeats: int) -> None:
    t = per_call_us(fn, calls, repeats)
    rows.append(_row("host (kernels stubbed, meta tensors)", name, t))
    print(f"{name:<52} host work {t.p50:7.2f} µs [{t.p20:.2f}, {t.p80:.2f}], min {t.min:.2f}")


def _same_result(fn) -> bool:
    """The call's outputs with the cached launch (``mla_kernels._launcher``) and with Triton's own, bit for bit
    (same kernels, same arguments: any difference is a launch bug). Calls without an output (``write_cache``) pass."""
    from mla_kernels import _launcher

    fn()  # a first call fills the cache through Triton's own launch: the compared call must be served from it
    cached = fn()
    with _launcher.switched(False):
        plain = fn()

    def tensors(result):
        return [t for t in (result if isinstance(result, tuple) else (result,)) if isinstance(t, torch.Tensor)]
    cached, plain = tensors(cached), tensors(plain)
    return len(cached) == len(plain) and all(
        torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(cached, plain))


def run_gpu(device, calls: int, repeats: int, rows: list | None = None) -> list[dict]:
    """Per case: the eager call's wall clock, the same with the cached launch off (Triton's own ``kernel[grid]``
    for every launch; both checked to give the same outputs first), and its GPU time in a CUDA graph replay."""
    from mla_kernels import _launcher

    rows = [] if rows is None else rows
    cached_on = _launcher.ENABLED

    def sync():
        torch.cuda.synchronize(device)
    for name, fn in cases(device).items():
        if cached_on and not _same_result(fn):
            rows.append(dict(provider="eager call (wall clock)", case=name, error="FAILED: the cached launch's "
                             "outputs differ from Triton's own launch"))
            print(f"{name:<52} FAILED: cached and plain launches differ")
            continue
        eager = per_call_us(fn, calls, repeats, sync)
        plain = None
        if cached_on:
            with _launcher.switched(False):
                plain = per_call_us(fn, calls, repeats, sync)
        # a call that reads its lengths back (prefill without host lengths) cannot be captured: time_fn then falls
        # back to CUDA events around the eager call, and the row says so
        graph = h.time_fn(fn, device, cuda_graph=True)
        gpu_row = "cuda graph replay" if graph.method == "cuda-graph" else \
            f"GPU time without a graph ({graph.method}; the call cannot be captured)"
        rows.append(_row("eager call (wall clock)", name, eager, cached_launch=cached_on))
        if plain is not None:
            rows.append(_row("eager call, Triton's own launch (wall clock)", name, plain, cached_launch=False))
        rows.append(_row(gpu_row, name, graph, scale=1e3))
        print(f"{name:<52} eager {eager.p50:7.2f} µs"
              + (f" (Triton's own launch {plain.p50:7.2f})" if plain is not None else "")
              + f" | {'graph' if graph.method == 'cuda-graph' else graph.method} {graph.p50 * 1e3:7.2f} µs")
    return rows


def run_jit(calls: int, repeats: int, rows: list | None = None) -> list[dict]:
    """Triton's own host work per launch, on any machine: ``decode._launch`` (the launch preparation of
    ``mla_decode``, without its argument checks) on CPU tensors with the kernels driven through Triton's JIT as for an
    H100 (``_compile.jit_without_gpu(launches=...)``: bind, specialize, look the compiled kernel up, build the launch
    metadata and call the launcher, whose driver call is replaced by a recorder), against the same preparation with
    the kernels stubbed. The difference is what Triton's Python does per launch. Timed both ways: every launch
    through ``kernel[grid]`` (``_launcher.ENABLED`` off), and the library's cached launch (``_launcher.launch``: the
    compiled kernel reused under its specialization key). Then the same for what ``MLAttention.project`` launches
    after its projections, a DeepSeek decode step's latent norm and both ropes: three launches (``rms_norm``, ``rope``
    twice) against ``norm_and_rope``'s one. The first call compiles (a minute or so, then cached)."""
    from mla_kernels import _compile, _launcher

    if _utils.interpreting():
        print("--jit: skipped under TRITON_INTERPRET=1 (the interpreter replaces Triton's JIT)")
        return []
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # as the library's compile check: no warning per compile
    cpu = torch.device("cpu")
    (q_nope, q_pe, kv, pe, table, seqlens, scale), _ = decode_args(cpu)
    rows = [] if rows is None else rows

    class Drop(list):  # the recorder's list, kept empty: 10^5 timed launches
        def append(self, launch):
            self.launched = getattr(self, "launched", 0) + 1

    def decode(splits):  # seed 003's step gets 4 splits (attention + combine launches); 1 split: one launch
        return lambda: decode_mod._launch(q_nope, q_pe, kv, pe, table, seqlens, None, scale, True, False, batch=1,
                                          seq_q=1, total_tokens=1, max_seqlen_q=1, max_seqlen_k=1024,
                                          num_splits=splits)

    norm = norm_mod.DeepseekRMSNorm(512, dtype=torch.bfloat16).requires_grad_(False)
    kv_a, rope_q = _values(1, 1, 576, dtype=torch.bfloat16, device=cpu), _values(1, 1, 128, 64, dtype=torch.bfloat16,
                                                                                 device=cpu)
    cos, sin = (_values(1, 1, 64, dtype=torch.bfloat16, device=cpu) for _ in range(2))
    kv_c, k_pe = kv_a[..., :512], kv_a[..., 512:]
    calls_by_case = {
        "decode._launch B1 L1024 H16, 4 splits": decode(4),
        "decode._launch B1 L1024 H16, 1 split": decode(1),
        "rms_norm latent + rope query + key B1 H128, three calls": lambda: (
            norm_mod.rms_norm(norm, kv_c), rope_mod.rope(rope_q, cos[:, :, None], sin[:, :, None], "interleave"),
            rope_mod.rope(k_pe, cos, sin, "interleave")),
        "norm_and_rope latent + query + key B1 H128, one call": lambda: norm_rope_mod.norm_and_rope(
            norm, kv_c, rope_q, k_pe, cos, sin, "interleave"),
    }
    enabled, use_triton = _launcher.ENABLED, _utils.use_triton
    _utils.use_triton = lambda t: True  # the norm's and the rope's wrappers take their kernels on CPU tensors
    try:
        for name, call in calls_by_case.items():
            timed = {}
            for cached in (False, True):
                with _launcher.switched(enabled and cached), _compile.jit_without_gpu(launches=(sink := Drop())):
                    call()
                    launches = sink.launched
                    timed[cached] = per_call_us(call, calls, repeats)
            with stubbed_kernels():
                _utils.use_triton = lambda t: True
                stub = per_call_us(call, calls, repeats)
            case = f"{name} ({launches} launches)"
            for provider, t in (("launch prep + Triton's run up to the driver (JIT as sm_90)", timed[False]),
                                ("launch prep + cached launch up to the driver (JIT as sm_90)", timed[True]),
                                ("launch prep, kernels stubbed", stub)):
                rows.append(_row(provider, case, t, launches=launches,
                                 cached_launch=enabled if "cached" in provider else None))
            print(f"{case:<52} stubbed {stub.p50:6.2f} µs; Triton's run {timed[False].p50:6.2f} µs "
                  f"({(timed[False].p50 - stub.p50) / launches:5.2f} per launch), cached {timed[True].p50:6.2f} µs "
                  f"({(timed[True].p50 - stub.p50) / launches:5.2f} per launch)"
                  + ("" if enabled else " [cached launch off: MLA_KERNELS_CACHED_LAUNCH=0 or this triton]"))
    finally:
        _utils.use_triton = use_triton
    return rows


PROMPTS = {"left-padded": [32, 24, 8, 17], "same length": [32, 32, 32, 32]}


def run_prompt(calls: int, repeats: int, layers: int = 16) -> list[dict]:
    """The wall time of a patched model's prompt forward on the CPU (``PROMPTS``, 4 rows), per cache kind."""
    from mla_kernels.integrations.transformers import patch_model, static_latent_cache
    from transformers import DynamicCache

    from .generate import ModelShape, build_model

    shape = ModelShape(hidden=128, heads=4, layers=layers, q_lora_rank=None, vocab=256, intermediate=128,
                       kv_lora_rank=64, rope=16, nope=16, v=16)
    model = patch_model(build_model(shape, "cpu", torch.float32), block_size=16)
    rows = []
    for prompt_name, lengths in PROMPTS.items():
        width = max(lengths)
        mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
        ids = torch.randint(3, shape.vocab, mask.shape, generator=torch.Generator().manual_seed(0)) * mask
        for kind in ("dynamic", "static"):
            caches = iter([static_latent_cache(model, len(lengths), 64, block_size=16) if kind == "static"
                           else DynamicCache() for _ in range(calls * (repeats + 1))])

            def forward():
                model(input_ids=ids, attention_mask=mask, **h.cache_kw(model, next(caches)), use_cache=True,
                      logits_to_keep=1)

            with torch.no_grad():
                t = per_call_us(forward, calls, repeats)
            case = f"patched {layers}-layer prompt B4 {prompt_name}, {kind} cache"
            rows.append(_row("prompt forward (CPU, PyTorch paths)", case, t))
            print(f"{case:<60} {t.p50 / 1e3:7.2f} ms [{t.p20 / 1e3:.2f}, {t.p80 / 1e3:.2f}], min {t.min / 1e3:.2f}")
    return rows


def main(argv=None) -> None:
    parser = h.make_parser(__doc__.split("\n\n")[0], plot=False)  # tables only: no --plot to ignore
    parser.add_argument("--prompt", action="store_true", help="time a patched model's prompt forward on the CPU")
    parser.add_argument("--jit", action="store_true",
                        help="also time Triton's own per-launch host work (bind, lookup; no GPU needed)")
    args = parser.parse_args(argv)
    device = h.setup(args)
    if args.prompt:
        calls, repeats = (3, 5) if args.quick else (5, 15)
        payload = {"config": {"calls_per_sample": calls, "samples": repeats},
                   "note": "the forward pass of a patched 16-layer model over a prompt batch, CPU wall time",
                   "rows": run_prompt(calls, repeats)}
        h.save_results("host_prompt", payload, device, args)
        return
    calls, repeats = (200, 7) if args.quick else (1000, 15)
    rows = []
    payload = {"config": {"calls_per_sample": calls, "samples": repeats},
               "note": ("host rows: the public call on meta tensors with the Triton kernels replaced by no-ops: "
                        "Python checks and launch preparation only, not Triton's launch or the GPU"),
               "rows": rows}
    # a GPU session gives this 25 s (cold compiles included): a run stopped at its limit keeps the rows it measured
    with h.save_if_stopped("host", payload, device, args):
        run_host(calls, repeats, rows)
        if args.jit:
            run_jit(calls, repeats, rows)
        if not h.is_cpu(device):
            run_gpu(device, calls, repeats, rows)
    h.save_results("host", payload, device, args)


if __name__ == "__main__":
    main()
