"""Combinations of the public calls' valid options, for tests/test_option_combos.py.

``covering(params, valid, seed)`` builds a covering array: every pair of values of two options that ``valid``
admits together appears in at least one case (greedy, deterministic for a seed; ``strength=3`` covers triples
of the options named). Each ``run_*`` builds one case's inputs (make_paged_cache's poisoned, shuffled caches:
NaN in every unused slot, sentinel ids in unused block-table entries) on ``DEVICE`` and compares the call to the
float64 references of ``mla_kernels.reference`` with the tolerances of ``helpers`` (``test_fp8``'s for an fp8
cache, ``test_prefill``'s where a score operand is rounded, ``test_merge``'s for merged states), after checking
that the call changed none of its inputs and returned contiguous results.

Options a case can combine, besides the shapes (dtype, page size, heads, S_q, widths): causal, return_lse,
``w_uv``, the grid (default split, forced ``num_splits``, ``metadata`` with the default or a forced program count,
``split_tokens``), an fp8 cache (read as e4m3 or, as on GPUs before sm_89, as its bits), sparse ``indices``,
the caches as views of one buffer or separate tensors, queries as views, separate or transposed, block-table
padding (the sentinel, -1, block 0), padding slots, ``max_seqlen_k`` absent, exact or past the capacity, int32 or
int64 indices, launch configs (the heuristics, decode's GPU tiles for prefill, a tuned file's Hopper TMA tiles
or other tiles), the public call, its custom op or a compiled call, and (prefill) host lengths,
``max_seqlen_q``, the absorbed, expanded or automatic path and split_tokens' launches over pieces.
"""

from __future__ import annotations

import contextlib
import itertools
import random

import torch

import mla_kernels
from helpers import RMS_TOL, SENTINEL_BLOCK, assert_close, assert_lse_close, make_paged_cache, rms_tol_for
from mla_kernels import _tuning, _utils, decode, prefill, reference, schedule
from mla_kernels.cache import fp8_latent_cache
from test_fp8 import FP8_COS_TOL, FP8_LSE_ATOL, FP8_RMS_TOL
from test_merge import MERGE_LSE_ATOL, merge_tol
from test_prefill import LSE_ATOL_ROUNDED_Q
from test_sparse import key_lists as sparse_key_lists

DEVICE = torch.device("cpu")  # where inputs are built: the test sets it from its ``device`` fixture
SCALE = 192 ** -0.5
FP8 = torch.float8_e4m3fn
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# test_fp8's bounds (an fp8 latent is dequantized to the query dtype: one more rounding, none for fp32 queries) and
# test_prefill's lse bound where one score operand (the absorbed query, or the expanded K_nope) is rounded


# ------------------------------------------------------------------------------------------------
# the covering array
# ------------------------------------------------------------------------------------------------


def covering(params: dict, valid, seed: int = 0, strength: int = 2, strong: tuple = (), tries: int = 30) -> list:
    """Cases (dicts of one value per option) covering every pair of values ``valid`` admits together, and with
    ``strength`` 3 every triple of the options in ``strong`` (all if empty). ``valid(partial)`` judges a partial
    assignment and must look only at the options present. Greedy: each case is the best of ``tries`` candidates,
    each grown from an uncovered combination option by option."""
    rng = random.Random(seed)
    names = list(params)
    groups = list(itertools.combinations(names, 2))
    if strength == 3:
        groups += list(itertools.combinations([n for n in names if not strong or n in strong], 3))
    uncovered = {tuple(zip(g, vals)) for g in groups for vals in itertools.product(*(range(len(params[n])) for n in g))
                 if valid({n: params[n][v] for n, v in zip(g, vals)})}

    def covered(case):
        return {tuple((n, case[n]) for n in g) for g in groups} & uncovered

    cases = []
    while uncovered:
        best, best_gain = None, 0
        for _ in range(tries):
            case = dict(rng.choice(sorted(uncovered)))
            rest = [n for n in names if n not in case]
            rng.shuffle(rest)
            for n in rest:
                options = list(range(len(params[n])))
                rng.shuffle(options)
                scored = []
                for v in options:
                    trial = dict(case, **{n: v})
                    if valid({k: params[k][i] for k, i in trial.items()}):
                        scored.append((sum(tuple((m, trial[m]) for m in g) in uncovered
                                           for g in groups if n in g and all(m in trial for m in g)), v))
                if not scored:
                    break
                case[n] = max(scored, key=lambda s: s[0])[1]
            else:
                gain = len(covered(case))
                if gain > best_gain:
                    best, best_gain = case, gain
        if best is None:  # what is left admits no complete valid case
            break
        uncovered -= covered(best)
        cases.append({n: params[n][best[n]] for n in names})
    return cases


def case_id(case: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in case.items()).replace(" ", "")


# ------------------------------------------------------------------------------------------------
# options that are not arguments: the implementation, the launch configs, the fp8 path
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def patched(obj, name, value):
    """``obj.name = value`` for the block."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def implementation(impl: str):
    """"triton": the kernels (natively on a GPU, under the interpreter on the CPU); "torch": the PyTorch path CPU
    tensors take without the interpreter."""
    return patched(_utils, "interpreting", lambda: False) if impl == "torch" else contextlib.nullcontext()


_TUNED = [None]


def _tuned(kernel: str, shape_class: str, device, tune: bool = True):
    """A tuned config file's entries (the CPU has none): the Hopper TMA kernel's tiles, or tiles the heuristics
    never pick with the split-count knob."""
    if kernel not in ("decode", "prefill"):
        return None
    small = kernel == "decode" and shape_class.endswith("rows<=16")
    if _TUNED[0] == "tma":
        return dict(BLOCK_M=16 if small else 64, BLOCK_N=16, num_warps=4, num_stages=2, TMA=True)
    return dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1, waves=3)


@contextlib.contextmanager
def config(name: str):
    """"heuristic": the built-in configs (under the interpreter, prefill's large tiles); "gpu": prefill on decode's
    tiles, as a GPU without a tuned file runs it; a tuned file's "tma" (the TMA kernel where it serves the call) or
    "tuned" (32 x 16 tiles, waves=3)."""
    if name == "heuristic":
        yield
    elif name == "gpu":
        with patched(prefill, "_absorbed_config", lambda *args: None):
            yield
    else:
        _TUNED[0] = name
        with patched(_tuning, "lookup", _tuned):
            yield


def fp8_path(fp8):
    """An fp8 cache as e4m3, or ("bits") as its uint8 bits decoded in software, as on NVIDIA GPUs before sm_89
    (``_utils.fp8_bits``, forced)."""
    return patched(_utils, "fp8_bits", _utils.fp8_as_bits) if fp8 == "bits" else contextlib.nullcontext()


def tma_valid(c: dict) -> bool:
    """A "tma" config only where the TMA kernel serves the call (bf16/fp16, no fp8 cache, pages of whole 16-key
    tiles): elsewhere it is the portable kernel, which the other configs cover."""
    return not (c.get("config") == "tma" and (c.get("fp8") or c.get("page", 16) % 16 or c.get("dtype") == "fp32"))


# ------------------------------------------------------------------------------------------------
# inputs and checks
# ------------------------------------------------------------------------------------------------


def _pad_table(table: torch.Tensor, pad: str) -> torch.Tensor:
    """The unused block-table entries (make_paged_cache's sentinel) as the sentinel, -1 or block 0."""
    return table if pad == "sentinel" else torch.where(table == SENTINEL_BLOCK, -1 if pad == "-1" else 0, table)


def paged_cache(lens, page, r, p, dtype, fp8, layout: str, seed: int):
    """``(kv_cache, pe_cache, kv_scale | None, table, float64 dequantized latent | None)``: views of one buffer
    (an fp8 cache: ``fp8_latent_cache``'s layout) or separate contiguous tensors."""
    kv, pe, table = make_paged_cache(lens, page, (r, p), dtype, DEVICE, fused=layout == "fused", generator_seed=seed)
    if not fp8:
        return kv, pe, None, table, None
    q8, s8 = reference.quantize_fp8(kv)
    if layout == "fused":
        kv8, scale, pe8 = fp8_latent_cache(kv.shape[0], page, r, p, rope_dtype=dtype, device=DEVICE)
        kv8.copy_(q8)
        scale.copy_(s8)
        pe8.copy_(pe)
    else:
        kv8, scale, pe8 = q8.contiguous(), s8.contiguous(), pe.contiguous()
    return kv8, pe8, scale, table, reference.dequantize_fp8(kv8, scale, torch.float64)


def queries(shape, r, p, dtype, layout: str, seed: int):
    """``q_nope [*shape, r]``, ``q_pe [*shape, p]``: views of one buffer, separate tensors, or (``[B, S_q, H]``)
    views of a ``[S_q, B, H, r + p]`` buffer transposed (no batch stride the contiguous one)."""
    g = torch.Generator().manual_seed(seed + 1)
    if layout == "transposed" and len(shape) == 3:
        q = torch.randn(shape[1], shape[0], shape[2], r + p, generator=g).to(dtype=dtype, device=DEVICE)
        q = q.transpose(0, 1)
    else:
        q = torch.randn(*shape, r + p, generator=g).to(dtype=dtype, device=DEVICE)
    if layout == "separate":
        return q[..., :r].contiguous(), q[..., r:].contiguous()
    return q[..., :r], q[..., r:]


def key_lists(lens, s_q, k, seed, dtype=torch.int32):
    """``[B, S_q, K]`` distinct positions of each sequence in random order (some past each token's own), -1
    where it has fewer than K (``test_sparse.key_lists``, on this run's device)."""
    return sparse_key_lists(lens, s_q, k, seed + 2, dtype, DEVICE)


def rand(*shape, dtype, seed, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype=dtype, device=DEVICE)


def ints(values, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype, device=DEVICE)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


def snapshot(*tensors) -> list:
    """Every byte of the tensors' storages (None stays None)."""
    return [None if t is None else _bytes(t).clone() for t in tensors]


def assert_unchanged(name, before, *tensors) -> None:
    for i, (b, t) in enumerate(zip(before, tensors)):
        assert t is None or torch.equal(b, _bytes(t)), f"{name}: the call modified its input {i}"


def check(name, out, ref, dtype, fp8=False, lse=None, ref_lse=None, lse_atol=None):
    """Contiguous results, then out (and lse) against the float64 reference with the bounds for ``dtype``."""
    assert out.is_contiguous() and (lse is None or lse.is_contiguous()), f"{name}: a result is not contiguous"
    if fp8 and dtype != torch.float32:
        assert_close(name, out, ref, dtype, FP8_RMS_TOL[dtype], FP8_COS_TOL[dtype])
        lse_atol = max(lse_atol or 0.0, FP8_LSE_ATOL[dtype])
    else:
        assert_close(name, out, ref, dtype)
    if lse is not None:
        assert lse.dtype == torch.float32, f"{name}: lse is {lse.dtype}"
        assert_lse_close(name, lse, ref_lse, *(() if lse_atol is None else (lse_atol,)))


def grid_kwargs(grid: str, seqlens, heads, s_q, r, p, dtype, fp8, max_k=None) -> dict:
    """``"default"``, ``"splitsN"`` (num_splits), ``"splitN"`` (split_tokens), ``"meta"`` / ``"meta-p3"`` (a
    schedule for the call's tiles; p3: three programs)."""
    if grid.startswith("splits"):
        return dict(num_splits=int(grid[6:]))
    if grid.startswith("split"):
        return dict(split_tokens=int(grid[5:]))
    if grid.startswith("meta"):
        return dict(metadata=mla_kernels.mla_decode_metadata(
            seqlens, heads, s_q, kv_lora_rank=r, rope_dim=p, dtype=dtype, cache_dtype=FP8 if fp8 else None,
            max_seqlen_k=max_k, num_programs=3 if grid == "meta-p3" else None))
    return {}


# ------------------------------------------------------------------------------------------------
# mla_decode
# ------------------------------------------------------------------------------------------------

DECODE = dict(
    dtype=["bf16", "fp16", "fp32"],
    page=[1, 3, 16, 48, 64],
    heads=[1, 3, 16, 20, 128],
    s_q=[1, 2, 5, 8],
    causal=[True, False],
    lse=[True, False],
    w_uv=[None, 24],
    grid=["default", "splits3", "splits1000", "meta", "meta-p3", "split16", "split50"],
    fp8=[False, True, "bits"],
    sparse=[None, 1, 7, 40],
    layout=["fused", "separate"],
    q_layout=["fused", "separate", "transposed"],
    lens=["ragged", "pad0", "long", "allpad", "one", "short"],
    table_pad=["sentinel", "-1", "0"],
    max_k=["none", "exact", "over"],
    index=["int32", "int64"],
    widths=[(32, 16), (128, 16), (512, 64), (1024, 128), (64, 256)],
    config=["heuristic", "tma", "tuned"],
    entry=["public", "op", "compiled"],
)


def decode_lens(pattern: str, s_q: int, page: int) -> list:
    return {"ragged": [s_q, 2 * page + 5 + s_q, 37],
            "pad0": [0, 41 + s_q, s_q + 1],  # a padding slot
            "long": [150, 129],
            "allpad": [0, 0],
            "one": [s_q + 3],
            "short": [1, max(1, s_q - 1), 0, s_q + 2]}[pattern]  # fewer keys than new tokens: non-causal only


def decode_valid(c: dict) -> bool:
    if c.get("lens") == "short" and c.get("causal"):
        return False  # refused on the CPU (documented): a causal length between 1 and S_q - 1
    if c.get("grid", "").startswith("meta") and c.get("sparse") is not None:
        return False  # refused (documented): indices exclude metadata
    if c.get("fp8") and c.get("widths", (128,))[0] % 128:
        return False  # refused: an fp8 latent has one scale per 128 values
    r, rows = c.get("widths", (0,))[0], c.get("heads", 0) * c.get("s_q", 1)
    if rows > 256 or r >= 512 and rows > 128 or r == 1024 and (rows > 40 or c.get("lens") == "long"):
        return False  # (interpreter time)
    return tma_valid(c) and not (c.get("config") == "tma" and (c.get("sparse") is not None or
                                                                c.get("grid", "").startswith("meta")))


def run_decode(c: dict, seed: int = 0) -> None:
    dtype, (r, p) = DTYPES[c["dtype"]], c["widths"]
    s_q, heads, page, name = c["s_q"], c["heads"], c["page"], case_id(c)
    lens = decode_lens(c["lens"], s_q, page)
    kv, pe, scale, table, kv_ref = paged_cache(lens, page, r, p, dtype, c["fp8"], c["layout"], seed)
    q_nope, q_pe = queries((len(lens), s_q, heads), r, p, dtype, c["q_layout"], seed)
    index = getattr(torch, c["index"])
    table, seqlens = _pad_table(table, c["table_pad"]).to(index), ints(lens, index)
    w_uv = None if c["w_uv"] is None else rand(heads, c["w_uv"], r, dtype=dtype, seed=seed + 3, scale=r ** -0.5)
    max_k = {"none": None, "exact": max(lens), "over": max(lens) + 1000}[c["max_k"]]
    indices = None if c["sparse"] is None else key_lists(lens, s_q, c["sparse"], seed, index)
    inputs = (q_nope, q_pe, kv, pe, table, seqlens, w_uv, scale, indices)
    before = snapshot(*inputs)
    with config(c["config"]), fp8_path(c["fp8"]), implementation(c.get("impl", "triton")):
        kw = dict(causal=c["causal"], return_lse=c["lse"], w_uv=w_uv, max_seqlen_k=max_k, kv_scale=scale,
                  indices=indices, **grid_kwargs(c["grid"], seqlens, heads, s_q, r, p, dtype, c["fp8"], max_k))
        if c["entry"] == "public":
            res = mla_kernels.mla_decode(q_nope, q_pe, kv, pe, table, seqlens, SCALE, **kw)
        elif c["entry"] == "compiled":  # traced by dynamo to the custom op
            torch._dynamo.reset()
            res = torch.compile(mla_kernels.mla_decode, backend="eager", fullgraph=True)(
                q_nope, q_pe, kv, pe, table, seqlens, SCALE, **kw)
        else:  # the custom op itself (its own checks, no reused scratch)
            tables, sizes = schedule.to_op_args(kw["metadata"] if "metadata" in kw else None)
            res = torch.ops.mla_kernels.mla_decode(
                q_nope, q_pe, kv, pe, table, seqlens, SCALE, c["causal"], c["lse"], w_uv,
                table.shape[1] * page if max_k is None else max_k, kw.get("num_splits"), *tables, sizes, scale,
                indices, kw.get("split_tokens"))
            res = res if c["lse"] else res[0]
    assert_unchanged(name, before, *inputs)
    out, lse = res if c["lse"] else (res, None)
    kv_ref = kv if kv_ref is None else kv_ref
    if indices is None:
        ref_out, ref_lse = reference.absorbed_decode(q_nope, q_pe, kv_ref, pe, table, seqlens, SCALE,
                                                     causal=c["causal"], w_uv=w_uv)
    else:
        ref_out, ref_lse = reference.sparse_decode(q_nope, q_pe, kv_ref, pe, table, seqlens, indices, SCALE,
                                                   causal=c["causal"], w_uv=w_uv)
    assert out.dtype == dtype and (lse is None or lse.dtype == torch.float32), name
    check(name, out, ref_out, dtype, c["fp8"], lse, ref_lse)


# ------------------------------------------------------------------------------------------------
# mla_prefill and mla_prefill_attention
# ------------------------------------------------------------------------------------------------

BATCHES = {  # (new tokens, history) per sequence
    "ragged": ([0, 17, 1, 5], [5, 0, 40, 3]),  # a sequence without new tokens, one without history
    "no-history": ([3, 9], [0, 0]),
    "history-only": ([0, 0], [7, 20]),  # no query at all
    "pad": ([0, 4, 0], [0, 66, 0]),  # padding slots
    "one-long": ([24], [70]),
}

PREFILL = dict(
    dtype=["bf16", "fp16", "fp32"],
    page=[1, 3, 16, 48, 64],
    heads=[1, 3, 16, 20],
    batch=list(BATCHES),
    causal=[True, False],
    lse=[True, False],
    max_q=["none", "exact", "over"],
    max_k=["none", "exact", "over"],
    grid=["default", "splits1", "splits3", "split16", "split50"],
    fp8=[False, True, "bits"],
    layout=["fused", "separate"],
    q_layout=["fused", "separate"],
    host=[False, True],
    table_pad=["sentinel", "-1", "0"],
    index=["int32", "int64"],
    budget=["default", "tiny"],
    config=["heuristic", "gpu", "tma", "tuned"],
    widths=[(32, 16), (128, 16), (512, 64), (64, 256)],
)


def prefill_valid(c: dict) -> bool:
    if c.get("budget") == "tiny" and c.get("grid") in ("default", "splits1", "splits3"):
        return False  # the partials' budget is split_tokens' alone
    if c.get("fp8") and c.get("widths", (128,))[0] % 128:
        return False
    return tma_valid(c)


def budget(tiny: bool):
    """split_tokens' partials budget below one row's: every token a launch of its own (the pieces path of a long
    prompt, which must give the bits of one launch)."""
    return patched(decode, "SPLIT_PARTIALS_BYTES", 1) if tiny else contextlib.nullcontext()


def prefill_inputs(c: dict, seed: int, d_nope=None):
    """The packed batch ``c["batch"]`` as ``mla_prefill``'s arguments (with ``d_nope``, raw queries for
    ``mla_prefill_attention``), the host lengths where ``c["host"]``, and the dequantized fp8 latent."""
    dtype, (r, p) = DTYPES[c["dtype"]], c["widths"]
    new, history = BATCHES[c["batch"]]
    lens = [n + h for n, h in zip(new, history)]
    kv, pe, scale, table, kv_ref = paged_cache(lens, c["page"], r, p, dtype, c["fp8"], c["layout"], seed)
    q_nope, q_pe = queries((sum(new), c["heads"]), r if d_nope is None else d_nope, p, dtype, c["q_layout"], seed)
    index = getattr(torch, c["index"])
    cu = [0, *itertools.accumulate(new)]
    table = _pad_table(table, c["table_pad"]).to(index)
    a = dict(q_nope=q_nope, q_pe=q_pe, kv_cache=kv, pe_cache=pe, block_table=table, cu_seqlens_q=ints(cu, index),
             cache_seqlens=ints(lens, index))
    kw = dict(kv_scale=scale, **(dict(cu_seqlens_q_host=cu, cache_seqlens_host=lens) if c["host"] else {}))
    return a, kw, kv_ref, new, lens


def run_prefill(c: dict, seed: int = 0) -> None:
    dtype, name = DTYPES[c["dtype"]], case_id(c)
    a, kw, kv_ref, new, lens = prefill_inputs(c, seed)
    kw.update(causal=c["causal"], return_lse=c["lse"],
              max_seqlen_q={"none": None, "exact": max(new), "over": max(new) + 50}[c["max_q"]],
              max_seqlen_k={"none": None, "exact": max(lens), "over": max(lens) + 1000}[c["max_k"]],
              **grid_kwargs(c["grid"], None, 0, 0, 0, 0, dtype, False))
    inputs = (*a.values(), kw["kv_scale"])
    before = snapshot(*inputs)
    with config(c["config"]), fp8_path(c["fp8"]), implementation(c.get("impl", "triton")), \
            budget(c["budget"] == "tiny"):
        res = mla_kernels.mla_prefill(**a, softmax_scale=SCALE, **kw)
    assert_unchanged(name, before, *inputs)
    out, lse = res if c["lse"] else (res, None)
    ref_out, ref_lse = reference.absorbed_prefill(a["q_nope"], a["q_pe"], a["kv_cache"] if kv_ref is None else kv_ref,
                                                  a["pe_cache"], a["block_table"], a["cu_seqlens_q"],
                                                  a["cache_seqlens"], SCALE, causal=c["causal"])
    assert out.dtype == dtype and out.shape == ref_out.shape, name
    check(name, out, ref_out, dtype, c["fp8"], lse, ref_lse)


ATTENTION = dict(PREFILL, path=["absorbed", "expanded", "auto"], d_nope=[16, 32], d_v=[16, 32],
                 table_pad=["sentinel", "-1"], split=[None, 16, 50])
del ATTENTION["grid"], ATTENTION["max_q"], ATTENTION["max_k"]


def attention_valid(c: dict) -> bool:
    if c.get("path") == "expanded" and c.get("split") is not None:
        return False  # refused (documented): split_tokens runs the absorbed path
    if c.get("budget") == "tiny" and c.get("split") is None:
        return False
    if c.get("config") == "tma" and c.get("path") == "expanded":
        return False  # (the expanded kernel has no TMA form)
    return not (c.get("fp8") and c.get("widths", (128,))[0] % 128) and tma_valid(c)


def naive_reference(a, w_kv_b, causal, kv_ref):
    """reference.naive_mla per sequence over its gathered cache, float64: ``(out [T, H, D_v], lse [T, H])``."""
    heads = a["q_nope"].shape[1]
    d_v = w_kv_b.shape[0] // heads - a["q_nope"].shape[2]
    out = torch.zeros(a["q_nope"].shape[0], heads, d_v, dtype=torch.float64, device=DEVICE)
    lse = torch.full(out.shape[:2], float("-inf"), dtype=torch.float64, device=DEVICE)
    for b in range(len(a["cache_seqlens"])):
        start, end, length = (int(a["cu_seqlens_q"][b]), int(a["cu_seqlens_q"][b + 1]), int(a["cache_seqlens"][b]))
        if end > start:
            kv_c = reference.gather_paged(a["kv_cache"] if kv_ref is None else kv_ref, a["block_table"][b], length)
            k_pe = reference.gather_paged(a["pe_cache"], a["block_table"][b], length)
            out[start:end], lse[start:end] = reference.naive_mla(
                a["q_nope"][start:end].double(), a["q_pe"][start:end].double(), kv_c.double(), k_pe.double(),
                w_kv_b.double(), SCALE, causal)
    return out, lse


def run_attention(c: dict, seed: int = 0) -> None:
    dtype, name = DTYPES[c["dtype"]], case_id(c)
    a, kw, kv_ref, new, lens = prefill_inputs(c, seed, d_nope=c["d_nope"])
    r = c["widths"][0]
    w_kv_b = rand(c["heads"] * (c["d_nope"] + c["d_v"]), r, dtype=dtype, seed=seed + 4, scale=r ** -0.5)
    kw.update(causal=c["causal"], return_lse=c["lse"], path=c["path"], split_tokens=c["split"])
    inputs = (*a.values(), kw["kv_scale"], w_kv_b)
    before = snapshot(*inputs)
    with config(c["config"]), fp8_path(c["fp8"]), implementation(c.get("impl", "triton")), \
            budget(c["budget"] == "tiny"):
        res = mla_kernels.mla_prefill_attention(**a, w_kv_b=w_kv_b, softmax_scale=SCALE, **kw)
    assert_unchanged(name, before, *inputs)
    out, lse = res if c["lse"] else (res, None)
    ref_out, ref_lse = naive_reference(a, w_kv_b, c["causal"], kv_ref)
    assert out.dtype == dtype and out.shape == ref_out.shape, name
    check(name, out, ref_out, dtype, c["fp8"], lse, ref_lse, LSE_ATOL_ROUNDED_Q.get(dtype))


# ------------------------------------------------------------------------------------------------
# FlashMLA's interface
# ------------------------------------------------------------------------------------------------

FLASH = dict(
    dtype=["bf16", "fp16", "fp32"],
    fp8=[False, "uint8", "e4m3"],
    widths=[(128, 32), (32, 16)],
    meta=["none", "current", "older", "older-splits", "older-buffer"],
    sparse=[None, 5, 40],
    topk_length=[False, True],
    causal=[False, True],
    sink=[False, True],
    scale=["given", "default"],
    page=[1, 3, 16, 64],
    heads=[1, 3, 16, 20, 128],
    s_q=[1, 2, 5],
    lens=["ragged", "pad0", "allpad", "one", "short"],
    reuse=[False, True],
)


def flash_valid(c: dict) -> bool:
    fp8, sparse = c.get("fp8"), c.get("sparse")
    return not (fp8 and c.get("dtype", "bf16") != "bf16"  # refused (documented): FP8 rows hold bf16 rope values
                or fp8 and c.get("widths", (128,))[0] % 128
                or sparse is not None and c.get("causal")  # refused (documented), as in FlashMLA
                or sparse is None and "sparse" in c and c.get("topk_length")  # refused: topk_length needs indices
                or c.get("lens") == "short" and c.get("causal")  # refused on the CPU (documented)
                or c.get("heads", 0) * c.get("s_q", 1) > 256)  # (interpreter time)


def run_flash_mla(c: dict, seed: int = 0) -> None:
    from mla_kernels.integrations.flash_mla import flash_mla_with_kvcache, get_mla_metadata

    dtype, (r, p), name = DTYPES[c["dtype"]], c["widths"], case_id(c)
    s_q, heads, page = c["s_q"], c["heads"], c["page"]
    lens = decode_lens(c["lens"], s_q, page)
    fp8 = bool(c["fp8"])
    kv, pe, scale, table, kv_ref = paged_cache(lens, page, r, p, dtype, fp8, "fused", seed)
    if fp8:  # the one [N, page, row bytes] buffer behind the views, as uint8 or float8_e4m3fn
        rows = _bytes(kv).view(*kv.shape[:2], -1)
        k_cache = (rows if c["fp8"] == "uint8" else rows.view(FP8)).unsqueeze(2)
    else:
        k_cache = kv._base.unsqueeze(2)
    q = rand(len(lens), s_q, heads, r + p, dtype=dtype, seed=seed + 5)
    seqlens = ints(lens)
    meta = splits = None
    if c["meta"] == "current":
        meta, splits = get_mla_metadata()
    elif c["meta"] == "older-buffer":
        # a CUDA-graph buffer (SGLang's) built for a larger batch and for another row count of the same 64-row
        # blocks (a decode step's buffer serving a verify step), refreshed in place
        other_rows = 64 * -(-s_q * heads // 64) - (s_q * heads > 1)
        buffer, _ = get_mla_metadata(ints(lens + [200, 3]), other_rows, 1, is_fp8_kvcache=fp8)
        step, splits = get_mla_metadata(seqlens, s_q * heads, 1, is_fp8_kvcache=fp8)
        meta = buffer.copy_(step)
    elif c["meta"].startswith("older"):
        meta, splits = get_mla_metadata(seqlens, s_q * heads, 1, is_fp8_kvcache=fp8)
        splits = splits if c["meta"] == "older-splits" else None
    kw = dict(causal=c["causal"], is_fp8_kvcache=fp8, softmax_scale=SCALE if c["scale"] == "given" else None)
    sm = SCALE if c["scale"] == "given" else (r + p) ** -0.5
    positions, args = None, (table, seqlens)
    if c["sparse"] is not None:  # FlashMLA's whole-cache slots; topk_length keeps each row's first entries
        listed = key_lists(lens, s_q, c["sparse"], seed)
        pos = listed.long().clamp(min=0)
        blocks = torch.gather(table.long().clamp(min=0), 1, (pos // page).flatten(1)).view_as(pos)
        kw["indices"] = torch.where(listed >= 0, blocks * page + pos % page, -1).to(torch.int32)
        positions = listed
        if c["topk_length"]:
            keep = ints([(3 * b + 2) % (c["sparse"] + 1) for b in range(len(lens))])
            kw["topk_length"] = keep
            positions = torch.where(torch.arange(c["sparse"], device=DEVICE) < keep[:, None, None].long(), listed, -1)
        args = (None, None)
    sink = None
    if c["sink"]:
        sink = torch.linspace(-2, 2, heads, device=DEVICE)
        sink[0] = float("-inf") if heads > 1 else sink[0]
        kw["attn_sink"] = sink
    inputs = (q, k_cache, *args, kw.get("indices"), kw.get("topk_length"), sink)
    for _ in range(2 if c["reuse"] else 1):  # reuse: another layer of the step, given the same metadata
        before = snapshot(*inputs)
        out, lse = flash_mla_with_kvcache(q, k_cache, *args, r, meta, splits, **kw)
        assert_unchanged(name, before, *inputs)
    kv_ref = kv if kv_ref is None else kv_ref
    if positions is None:
        ref_out, ref_lse = reference.absorbed_decode(q[..., :r], q[..., r:], kv_ref, pe, table, seqlens, sm,
                                                     causal=c["causal"])
    else:
        ref_out, ref_lse = reference.sparse_decode(q[..., :r], q[..., r:], kv_ref, pe, table, seqlens, positions, sm,
                                                   causal=False)
    if sink is not None:
        ref_out = ref_out * torch.nan_to_num(torch.sigmoid(ref_lse - sink.double()), nan=0.0)[..., None]
    ref_lse = ref_lse.masked_fill(ref_lse == -float("inf"), float("inf")).transpose(1, 2)  # FlashMLA's layout
    assert out.shape == (len(lens), s_q, heads, r) and lse.shape == (len(lens), heads, s_q), name
    check(name, out, ref_out, dtype, fp8, lse, ref_lse)


# ------------------------------------------------------------------------------------------------
# PagedLatentCache and write_cache, then mla_decode over what the cache holds
# ------------------------------------------------------------------------------------------------

CACHE = dict(
    dtype=["bf16", "fp16", "fp32"],
    fp8=[False, True, "bits"],
    block=[1, 3, 16],
    op=["none", "truncate", "fork-truncate", "free-reuse"],
    src=["fused", "separate", "strided"],
    slot_dtype=["int64", "int32"],
    pads=[False, True],
    layer=[0, 1],
    pad_id=[0, -1, SENTINEL_BLOCK],
    max_blocks=[None, "extra"],
    s_q=[1, 3],
    heads=[1, 16],
    grid=["default", "splits3", "meta", "split16"],
)


def _tokens(n, r, p, dtype, src, gen):
    """``n`` tokens' ``(kv_c [n, R], k_pe [n, P])``: views of one [n, R+P] projection output, separate tensors, or
    views of rows twice as wide."""
    x = torch.randn(n, 2 * (r + p) if src == "strided" else r + p, generator=gen).to(dtype=dtype, device=DEVICE)
    return (x[:, :r].contiguous(), x[:, r:r + p].contiguous()) if src == "separate" else (x[:, :r], x[:, r:r + p])


def run_cache(c: dict, seed: int = 0) -> None:
    dtype, bs, name = DTYPES[c["dtype"]], c["block"], case_id(c)
    r, p = (128, 16) if c["fp8"] else (32, 16)
    cache = mla_kernels.PagedLatentCache(2, 64, bs, r, p, dtype=FP8 if c["fp8"] else dtype,
                                         device=DEVICE, rope_dtype=dtype if c["fp8"] else None)
    gen = torch.Generator().manual_seed(seed)
    held = {}  # sequence -> layer -> [(kv_c row, k_pe row)] in position order

    def write(seqs, counts):
        slots = cache.append_batch(seqs, counts)
        for layer in (0, 1):
            kv_c, k_pe = _tokens(len(slots), r, p, dtype, c["src"], gen)
            slot_mapping, kept = slots, slice(None)
            if c["pads"]:  # a padding token (slot -1, skipped) after every real one
                kv_pad, pe_pad = _tokens(len(slots), r, p, dtype, "separate", gen)
                kv_c, k_pe = torch.stack([kv_c, kv_pad], 1).flatten(0, 1), torch.stack([k_pe, pe_pad], 1).flatten(0, 1)
                slot_mapping, kept = torch.stack([slots, torch.full_like(slots, -1)], 1).flatten(), slice(0, None, 2)
            cache.write(layer, slot_mapping.to(getattr(torch, c["slot_dtype"])), kv_c, k_pe)
            at = 0
            for s, n in zip(seqs, counts):
                held[s][layer].extend(zip(kv_c[kept][at:at + n], k_pe[kept][at:at + n]))
                at += n

    seqs = [cache.add_sequence() for _ in range(3)]  # the third stays empty: a padding slot
    for s in seqs:
        held[s] = {0: [], 1: []}
    a, b, empty = seqs
    with fp8_path(c["fp8"]):
        write([a, b], [2 * bs + 1, 5])
        if c["op"] == "fork-truncate":  # a fork, cut inside a block it shares (copied first), both grow on
            d = cache.fork(a)
            held[d] = {k: list(v) for k, v in held[a].items()}
            cache.truncate(d, bs + 1)
            held[d] = {k: v[:bs + 1] for k, v in held[d].items()}
            write([d, a], [2, 1])
            seqs.append(d)
        elif c["op"] == "truncate":
            cache.truncate(a, bs + 2)
            held[a] = {k: v[:bs + 2] for k, v in held[a].items()}
        elif c["op"] == "free-reuse":  # a freed sequence's blocks (their old tokens still there) reused
            cache.free(b)
            b = seqs[1] = cache.add_sequence()
            held[b] = {0: [], 1: []}
            write([b], [bs + 4])
        write([s for s in seqs if s != empty], [c["s_q"]] * (len(seqs) - 1))

        layer, s_q, heads = c["layer"], c["s_q"], c["heads"]
        kv, pe, scale = cache.views(layer)
        longest = max(len(held[s][layer]) for s in seqs)
        table = cache.block_table(seqs, max_blocks=None if c["max_blocks"] is None else -(-longest // bs) + 2,
                                  pad_id=c["pad_id"])
        seqlens = cache.cache_seqlens(seqs)
        assert seqlens.tolist() == [len(held[s][layer]) for s in seqs], name
        # what the block table reaches is what was written (fp8: the reference quantizer's bytes and scales)
        ref_kv = torch.zeros(len(seqs), max(longest, 1), r, dtype=torch.float64, device=DEVICE)
        ref_pe = torch.zeros(len(seqs), max(longest, 1), p, dtype=torch.float64, device=DEVICE)
        for i, s in enumerate(seqs):
            n = len(held[s][layer])
            if not n:
                continue
            want_kv = torch.stack([t[0] for t in held[s][layer]])
            want_pe = torch.stack([t[1] for t in held[s][layer]])
            got_kv = reference.gather_paged(kv, table[i], n)
            assert torch.equal(reference.gather_paged(pe, table[i], n), want_pe), f"{name}: rope keys of {i}"
            assert torch.equal(cache.read(layer, s)[1], want_pe), f"{name}: read's rope keys of {i}"
            if c["fp8"]:
                q8, s8 = reference.quantize_fp8(want_kv)
                assert torch.equal(got_kv.view(torch.uint8), q8.view(torch.uint8)), f"{name}: fp8 latent of {i}"
                assert torch.equal(reference.gather_paged(scale, table[i], n), s8), f"{name}: fp8 scales of {i}"
                ref_kv[i, :n] = reference.dequantize_fp8(q8, s8, torch.float64)
            else:
                assert torch.equal(got_kv, want_kv), f"{name}: latent of sequence {i}"
                ref_kv[i, :n] = want_kv.double()
            ref_pe[i, :n] = want_pe.double()
        q = rand(len(seqs), s_q, heads, r + p, dtype=dtype, seed=seed + 7)
        out, lse = mla_kernels.mla_decode(q[..., :r], q[..., r:], kv, pe, table, seqlens, SCALE, return_lse=True,
                                          kv_scale=scale,
                                          **grid_kwargs(c["grid"], seqlens, heads, s_q, r, p, dtype, c["fp8"]))
    one_page = torch.arange(len(seqs), dtype=torch.int32, device=DEVICE)[:, None]  # each sequence one long page
    ref_out, ref_lse = reference.absorbed_decode(q[..., :r], q[..., r:], ref_kv, ref_pe, one_page, seqlens, SCALE)
    check(name, out, ref_out, dtype, c["fp8"], lse, ref_lse)


# ------------------------------------------------------------------------------------------------
# MLAttention.attend, step after step over one PagedLatentCache
# ------------------------------------------------------------------------------------------------

STEPS = {  # each step's new tokens per sequence; "fork": the first sequence forked into a new one
    "prompt-decode-verify": [[5, 3], [1, 1], [3, 3], [2, 1]],
    "ragged-fork-decode": [[4, 7], "fork", [1, 1, 1], [2, 2, 2]],
    "long-uniform": [[9, 9], [8, 8], [1, 1]],  # 9 new tokens each: past decode's 8, the prefill path
    "empty-rows": [[3, 0], [0, 2], [1, 1], [0, 0]],
}

MODULE = dict(
    dtype=["bf16", "fp16", "fp32"],
    fp8=[False, True, "bits"],
    block=[1, 3, 16],
    heads=[1, 3, 16],
    d_nope=[16, 24],  # 24: no expanded path
    d_v=[16, 24],
    split=[None, 16],
    sparse=[None, 3, 12],
    steps=list(STEPS),
    layer=[0, 1],
)


def run_module(c: dict, seed: int = 0) -> None:
    from mla_kernels.module import MLAttention

    dtype, name = DTYPES[c["dtype"]], case_id(c)
    r, p = (128, 16) if c["fp8"] else (32, 16)
    heads, d_nope, d_v = c["heads"], c["d_nope"], c["d_v"]
    torch.manual_seed(seed)
    m = MLAttention(32, heads, r, d_nope, p, d_v, split_tokens=c["split"], layer_idx=c["layer"])
    m = m.to(dtype=dtype, device=DEVICE).eval().requires_grad_(False)
    cache = mla_kernels.PagedLatentCache(2, 96, c["block"], r, p, dtype=FP8 if c["fp8"] else dtype, device=DEVICE,
                                         rope_dtype=dtype if c["fp8"] else None)
    seqs = [cache.add_sequence(), cache.add_sequence()]
    held = {s: ([], []) for s in seqs}  # float64 (kv_c, k_pe) rows each sequence holds
    w_kv_b = m.kv_b_proj.weight.double()
    g = torch.Generator().manual_seed(seed + 11)
    for step in STEPS[c["steps"]]:
        if step == "fork":
            seqs.append(cache.fork(seqs[0]))
            held[seqs[-1]] = tuple(list(x) for x in held[seqs[0]])
            continue
        batch = mla_kernels.LatentBatch.reserve(cache, seqs, step)
        t = sum(step)
        q_nope, q_pe, kv_c, k_pe = (torch.randn(*shape, generator=g).to(dtype=dtype, device=DEVICE)
                                    for shape in ((t, heads, d_nope), (t, heads, p), (t, r), (t, p)))
        indices = None
        if c["sparse"]:  # K distinct positions up to one past each token's own (skipped), -1 padded
            pos = batch.positions.cpu()
            raw = (torch.rand(t, c["sparse"], generator=g) * (pos[:, None] + 3).double()).long() - 1
            srt = raw.sort(1).values
            fresh = torch.cat([torch.ones(t, 1, dtype=torch.bool), srt[:, 1:] != srt[:, :-1]], 1)
            indices = torch.where(fresh, srt, -1).to(DEVICE)
        with fp8_path(c["fp8"]):
            out = m.attend(q_nope, q_pe, kv_c, k_pe, batch, layer=c["layer"], indices=indices)
        assert out.shape == (t, heads, d_v) and out.dtype == dtype, name
        stored = reference.dequantize_fp8(*reference.quantize_fp8(kv_c), torch.float64) if c["fp8"] and t else \
            kv_c.double()
        ref = torch.zeros(t, heads, d_v, dtype=torch.float64, device=DEVICE)
        at = 0
        for s, n in zip(seqs, step):
            held[s][0].extend(stored[at:at + n])
            held[s][1].extend(k_pe[at:at + n].double())
            for i in range(at, at + n) if indices is not None else ():
                keys = [k for k in indices[i].tolist() if 0 <= k <= int(batch.positions[i])]
                if keys:
                    kv_all, pe_all = torch.stack(held[s][0]), torch.stack(held[s][1])
                    ref[i:i + 1] = reference.naive_mla(q_nope[i:i + 1].double(), q_pe[i:i + 1].double(),
                                                       kv_all[keys], pe_all[keys], w_kv_b, m.softmax_scale,
                                                       causal=False)[0]
            if n and indices is None:
                ref[at:at + n] = reference.naive_mla(q_nope[at:at + n].double(), q_pe[at:at + n].double(),
                                                     torch.stack(held[s][0]), torch.stack(held[s][1]), w_kv_b,
                                                     m.softmax_scale, causal=True)[0]
            at += n
        check(f"{name} step {step}", out, ref, dtype, c["fp8"])


# ------------------------------------------------------------------------------------------------
# shared-prefix (cascade) decode: the prefix and each request's own pages, merged
# ------------------------------------------------------------------------------------------------

CASCADE = dict(
    dtype=["bf16", "fp16", "fp32"],
    fp8=[False, True, "bits"],
    page=[1, 16, 64],
    heads=[1, 3, 16],
    s_q=[1, 2, 4],
    w_uv=[None, 24],
    prefix=["grouped", "per-seq"],
    prefix_grid=["default", "splits3", "meta", "split16"],
    own_grid=["default", "splits3", "meta", "split16"],
    causal=[True, False],
    merge=["triton", "torch"],
    merged_lse=[True, False],
)


def run_cascade(c: dict, seed: int = 0) -> None:
    dtype, name = DTYPES[c["dtype"]], case_id(c)
    r, p = (128, 16) if c["fp8"] else (32, 16)
    page, heads, s_q = c["page"], c["heads"], c["s_q"]
    shared = max(1, 40 // page)  # whole pages of one prompt every request shares
    prefix = shared * page
    lens = [prefix + n for n in (s_q, 17 + s_q, 2 * page + s_q)]
    b = len(lens)
    kv, pe, scale, table, kv_ref = paged_cache(lens, page, r, p, dtype, c["fp8"], "fused", seed)
    table[1:, :shared] = table[0, :shared]  # forked from one prompt: its pages shared
    q_nope, q_pe = queries((b, s_q, heads), r, p, dtype, "fused", seed)
    w_uv = None if c["w_uv"] is None else rand(heads, c["w_uv"], r, dtype=dtype, seed=seed, scale=r ** -0.5)
    seqlens = ints(lens)
    kw = dict(return_lse=True, w_uv=w_uv, kv_scale=scale)
    with fp8_path(c["fp8"]):
        if c["prefix"] == "grouped":  # the group's queries as the tokens of one sequence over the shared pages
            n_pre = ints([prefix])
            pre_out, pre_lse = mla_kernels.mla_decode(
                q_nope.reshape(1, b * s_q, heads, r), q_pe.reshape(1, b * s_q, heads, p), kv, pe, table[:1, :shared],
                n_pre, SCALE, causal=False, **kw,
                **grid_kwargs(c["prefix_grid"], n_pre, heads, b * s_q, r, p, dtype, c["fp8"]))
            pre_out, pre_lse = pre_out.view(b, s_q, heads, -1), pre_lse.view(b, s_q, heads)
        else:
            n_pre = ints([prefix] * b)
            pre_out, pre_lse = mla_kernels.mla_decode(
                q_nope, q_pe, kv, pe, table[:, :shared].contiguous(), n_pre, SCALE, causal=False, **kw,
                **grid_kwargs(c["prefix_grid"], n_pre, heads, s_q, r, p, dtype, c["fp8"]))
        n_own = seqlens - prefix
        own_out, own_lse = mla_kernels.mla_decode(
            q_nope, q_pe, kv, pe, table[:, shared:].contiguous(), n_own, SCALE, causal=c["causal"], **kw,
            **grid_kwargs(c["own_grid"], n_own, heads, s_q, r, p, dtype, c["fp8"]))
    with implementation(c["merge"]):
        res = mla_kernels.merge_attention_states(pre_out, pre_lse, own_out, own_lse, return_lse=c["merged_lse"])
    out, lse = res if c["merged_lse"] else (res, None)
    ref_out, ref_lse = reference.absorbed_decode(q_nope, q_pe, kv if kv_ref is None else kv_ref, pe, table, seqlens,
                                                 SCALE, causal=c["causal"], w_uv=w_uv)
    # test_merge's bound: each state within the kernels' bound, and one more rounding of the merged output
    fp8 = c["fp8"] and dtype != torch.float32
    bound = rms_tol_for(dtype, ref_out.numel(), (FP8_RMS_TOL if fp8 else RMS_TOL)[dtype] + torch.finfo(dtype).eps / 2)
    assert_close(name, out, ref_out, dtype, bound, bound ** 2)
    if lse is not None:
        assert_lse_close(name, lse, ref_lse, *((FP8_LSE_ATOL[dtype],) if fp8 else ()))


# ------------------------------------------------------------------------------------------------
# split_tokens' promise under the other options: a sequence's bits alone and in a batch, under any
# max_seqlen_k, from mla_decode, from mla_prefill and from its launches over pieces
# ------------------------------------------------------------------------------------------------

INVARIANT = dict(
    dtype=["bf16", "fp16", "fp32"],
    fp8=[False, True, "bits"],
    widths=[(32, 16), (128, 16), (512, 64)],
    heads=[1, 3, 20],
    page=[1, 16, 48],
    s_q=[1, 2, 5],
    split=[1, 50, 1 << 40],
    causal=[True, False],
    config=["heuristic", "tma", "tuned"],
    sparse=[None, 7, 40],
    q_layout=["fused", "separate", "transposed"],
    max_k=["none", "exact", "over"],
)


def invariant_valid(c: dict) -> bool:
    r = c.get("widths", (0,))[0]
    rows = c.get("heads", 0) * c.get("s_q", 1)
    return not (c.get("fp8") and r % 128
                or rows > 40 or r == 512 and (rows > 16 or c.get("split") == 1)  # (interpreter time)
                or c.get("config") == "tma" and c.get("sparse") is not None) and tma_valid(c)


def run_invariant(c: dict, seed: int = 0) -> None:
    dtype, (r, p), name = DTYPES[c["dtype"]], c["widths"], case_id(c)
    s_q, heads, page = c["s_q"], c["heads"], c["page"]
    lens = [s_q + 70, 0, s_q, 2 * page + 9 + s_q]
    kv, pe, scale, table, kv_ref = paged_cache(lens, page, r, p, dtype, c["fp8"], "fused", seed)
    q_nope, q_pe = queries((len(lens), s_q, heads), r, p, dtype, c["q_layout"], seed)
    seqlens = ints(lens)
    indices = None if c["sparse"] is None else key_lists(lens, s_q, c["sparse"], seed)
    max_k = {"none": None, "exact": max(lens), "over": max(lens) + 1000}[c["max_k"]]
    kw = dict(causal=c["causal"], return_lse=True, kv_scale=scale, split_tokens=c["split"])
    with config(c["config"]), fp8_path(c["fp8"]):
        out, lse = mla_kernels.mla_decode(q_nope, q_pe, kv, pe, table, seqlens, SCALE, max_seqlen_k=max_k,
                                          indices=indices, **kw)
        other = mla_kernels.mla_decode(q_nope, q_pe, kv, pe, table, seqlens, SCALE, indices=indices,
                                       max_seqlen_k=None if max_k is not None else max(lens), **kw)
        assert torch.equal(out, other[0]) and torch.equal(lse, other[1]), f"{name}: max_seqlen_k changed the bits"
        for b in (0, 3):  # alone, with a block table of its own length
            length = lens[b]
            alone = mla_kernels.mla_decode(q_nope[b:b + 1], q_pe[b:b + 1], kv, pe,
                                           table[b:b + 1, :max(1, -(-length // page))].contiguous(), seqlens[b:b + 1],
                                           SCALE, indices=None if indices is None else indices[b:b + 1], **kw)
            assert torch.equal(out[b:b + 1], alone[0]) and torch.equal(lse[b:b + 1], alone[1]), \
                f"{name}: sequence {b} alone differs from its rows in the batch"
        if indices is None:  # the same rows packed for mla_prefill: the decode's bits, in one launch or in pieces
            rows = [b for b, n in enumerate(lens) if n]
            cu = ints([0, *itertools.accumulate(s_q if n else 0 for n in lens)])
            pq = (q_nope[rows].reshape(-1, heads, r), q_pe[rows].reshape(-1, heads, p))
            for tiny in (False, True):
                with budget(tiny):
                    pout, plse = mla_kernels.mla_prefill(*pq, kv, pe, table, cu, seqlens, SCALE, max_seqlen_k=max_k,
                                                         **kw)
                assert torch.equal(pout, out[rows].reshape(-1, heads, r)), f"{name}: prefill's output (pieces: {tiny})"
                assert torch.equal(plse, lse[rows].reshape(-1, heads)), f"{name}: prefill's lse (pieces: {tiny})"
    kv_ref = kv if kv_ref is None else kv_ref
    if indices is None:
        ref_out, ref_lse = reference.absorbed_decode(q_nope, q_pe, kv_ref, pe, table, seqlens, SCALE,
                                                     causal=c["causal"])
    else:
        ref_out, ref_lse = reference.sparse_decode(q_nope, q_pe, kv_ref, pe, table, seqlens, indices, SCALE,
                                                   causal=c["causal"])
    check(name, out, ref_out, dtype, c["fp8"], lse, ref_lse)


# ------------------------------------------------------------------------------------------------
# merge_attention_states: layouts, widths, keyless marks
# ------------------------------------------------------------------------------------------------

MERGE = dict(
    dtype=["bf16", "fp16", "fp32"],
    lead=[(3,), (2, 3), (2, 1, 3)],
    heads=[1, 4],
    width=[1, 16, 24, 100, 512],
    layout_a=["contiguous", "transposed", "sliced"],
    layout_b=["contiguous", "transposed", "sliced"],
    lse_layout=["contiguous", "transposed"],
    marks=["none", "-inf", "+inf", "mixed", "far"],
    return_lse=[True, False],
    impl=["triton", "torch"],
)


def _state(shape, dtype, layout, gen):
    """A ``shape`` tensor: contiguous, the transpose of a contiguous one (first two dims), or a slice of a wider
    last dimension."""
    if layout == "transposed" and len(shape) > 2:
        return torch.randn(shape[1], shape[0], *shape[2:], generator=gen).to(dtype=dtype, device=DEVICE).transpose(0, 1)
    if layout == "sliced":
        return torch.randn(*shape[:-1], shape[-1] + 5, generator=gen).to(dtype=dtype, device=DEVICE)[..., 2:-3]
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)


def run_merge(c: dict, seed: int = 0) -> None:
    dtype, name = DTYPES[c["dtype"]], case_id(c)
    g = torch.Generator().manual_seed(seed)
    shape = (*c["lead"], c["heads"], c["width"])
    out_a, out_b = _state(shape, dtype, c["layout_a"], g), _state(shape, dtype, c["layout_b"], g)
    lse_a, lse_b = (_state(shape[:-1], torch.float32, c["lse_layout"], g) * 4 for _ in range(2))
    last = tuple(n - 1 for n in lse_a.shape)
    first = (0,) * lse_a.dim()
    inf = float("inf")
    for where, va, vb in {"none": [], "-inf": [(first, -inf, None)], "+inf": [(last, None, inf)],
                          "mixed": [(first, -inf, inf), (last, inf, None)],
                          "far": [(first, 120.0, -120.0)]}[c["marks"]]:  # (+inf: FlashMLA's keyless mark)
        if va is not None:
            lse_a[where] = va
        if vb is not None:
            lse_b[where] = vb
    inputs = (out_a, lse_a, out_b, lse_b)
    before = snapshot(*inputs)
    with implementation(c["impl"]):
        res = mla_kernels.merge_attention_states(*inputs, return_lse=c["return_lse"])
    assert_unchanged(name, before, *inputs)
    out, lse = res if c["return_lse"] else (res, None)
    ref_out, ref_lse = reference.merge_states(*inputs)
    assert out.shape == shape and out.dtype == dtype and out.is_contiguous(), name
    assert_close(name, out, ref_out, dtype, rms_tol=merge_tol(dtype))
    if lse is not None:
        assert lse.shape == shape[:-1] and lse.dtype == torch.float32, name
        assert_lse_close(name, lse, ref_lse, atol=MERGE_LSE_ATOL)
