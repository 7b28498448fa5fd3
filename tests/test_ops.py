"""The custom ops (``torch.ops.mla_kernels.*``): opcheck of each, and torch.compile seeing them as single nodes.

Shapes are tiny (R 32, P 16, a few heads and tokens): the kernels run through the interpreter several times per
opcheck. The results themselves are checked against the reference in test_decode/test_prefill/test_cache; here
the op must agree with the public function it wraps, bit for bit (same kernels, same inputs).
"""

from __future__ import annotations

import pytest
import torch

import mla_kernels
from helpers import OLD_NUMPY_TRACE, make_paged_cache
from mla_kernels import _utils

R, P, PAGE, HEADS = 32, 16, 4, 2
SCALE = 0.25
OPCHECK_TESTS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
# opcheck's test_schema compares tensors with arithmetic that torch 2.13 has no float8 kernels for on the CPU
# ("mul_cpu_reduced_float not implemented for Float8_e4m3fn"); the fp8 ops' mutations are checked by hand instead
FP8_OPCHECK_TESTS = ("test_faketensor", "test_aot_dispatch_dynamic")


def decode_inputs(device, lens=(5, 0, 9), s_q=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    kv_cache, pe_cache, table = make_paged_cache(list(lens), PAGE, (R, P), torch.float32, device, generator_seed=seed)
    kv_cache.nan_to_num_(0.0)  # opcheck compares outputs across runs; NaN poison is tested in test_decode
    q = torch.randn(len(lens), s_q, HEADS, R + P, generator=g).to(device)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    table = table.clamp(max=kv_cache.shape[0] - 1)  # unused entries are never read; opcheck's fake runs need no poison
    return q[..., :R], q[..., R:], kv_cache, pe_cache, table, seqlens


@pytest.mark.parametrize("return_lse", [False, True], ids=["out", "out+lse"])
@pytest.mark.parametrize("w_uv", [False, True], ids=["latent", "w_uv"])
def test_opcheck_mla_decode(return_lse, w_uv, device):
    q_nope, q_pe, kv_cache, pe_cache, table, seqlens = decode_inputs(device)
    w = torch.randn(HEADS, 8, R, device=device) if w_uv else None
    args = (q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE, True, return_lse, w, 12, None)
    torch.library.opcheck(torch.ops.mla_kernels.mla_decode.default, args, test_utils=OPCHECK_TESTS)
    out, lse = torch.ops.mla_kernels.mla_decode(*args)
    expected = mla_kernels.mla_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE, return_lse=True,
                                      w_uv=w, max_seqlen_k=12)
    assert torch.equal(out, expected[0])
    assert torch.equal(lse, expected[1]) if return_lse else lse.shape == (0,)


def test_opcheck_mla_decode_sparse(device):
    """The op with sparse key lists (``indices [B, S_q, K]``, -1 padded): its schema, fake and dynamic-shape runs."""
    q_nope, q_pe, kv_cache, pe_cache, table, seqlens = decode_inputs(device, s_q=2)
    idx = torch.tensor([[[4, 0, -1], [1, 2, 3]], [[-1, -1, -1]] * 2, [[8, 3, 5], [0, 7, -1]]], dtype=torch.int32,
                       device=device)
    args = (q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE, True, True, None, 12, None, None, None, None,
            None, idx)
    torch.library.opcheck(torch.ops.mla_kernels.mla_decode.default, args, test_utils=OPCHECK_TESTS)
    out, lse = torch.ops.mla_kernels.mla_decode(*args)
    expected = mla_kernels.mla_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE, return_lse=True,
                                      max_seqlen_k=12, indices=idx)
    assert torch.equal(out, expected[0]) and torch.equal(lse, expected[1])


def test_opcheck_mla_decode_split_tokens(device):
    """The op with ``split_tokens`` (its last argument): schema, fake and dynamic-shape runs; a direct call refuses
    it beside ``num_splits`` as the public call does."""
    q_nope, q_pe, kv_cache, pe_cache, table, seqlens = decode_inputs(device)
    args = (q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE, True, True, None, 12, None, None, None, None,
            None, None, 16)
    torch.library.opcheck(torch.ops.mla_kernels.mla_decode.default, args, test_utils=OPCHECK_TESTS)
    out, lse = torch.ops.mla_kernels.mla_decode(*args)
    expected = mla_kernels.mla_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE, return_lse=True,
                                      max_seqlen_k=12, split_tokens=16)
    assert torch.equal(out, expected[0]) and torch.equal(lse, expected[1])
    with pytest.raises(ValueError, match="split_tokens and num_splits"):
        torch.ops.mla_kernels.mla_decode(*args[:11], 2, *args[12:])


@pytest.mark.parametrize("fused", [True, False], ids=["views-of-one-buffer", "separate"])
def test_opcheck_write_cache(fused, device):
    buf = torch.zeros(6, PAGE, R + P, device=device)
    if fused:
        kv_cache, pe_cache = buf[..., :R], buf[..., R:]
    else:
        kv_cache, pe_cache = buf[..., :R].clone(), buf[..., R:].clone()
    kv = torch.randn(3, R + P, device=device)
    slots = torch.tensor([5, -1, 22], dtype=torch.int64, device=device)
    args = (kv[:, :R], kv[:, R:], kv_cache, pe_cache, slots)
    torch.library.opcheck(torch.ops.mla_kernels.write_cache.default, args, test_utils=OPCHECK_TESTS)
    torch.ops.mla_kernels.write_cache(*args)
    assert torch.equal(kv_cache[1, 1], kv[0, :R]) and torch.equal(pe_cache[5, 2], kv[2, R:])
    assert kv_cache.count_nonzero() == 2 * R  # the -1 slot wrote nothing


def test_write_cache_ops_check_their_arguments():
    """The write ops are public names (``torch.ops.mla_kernels.write_cache``): called directly, outside
    ``write_cache``, they check their arguments as it does, before writing. Before, a latent narrower than the cache
    was read past its rows and the rows it held written, a dtype mismatch converted silently."""
    buf = torch.zeros(3, PAGE, R + P)
    before = buf.clone()
    kv_cache, pe_cache = buf[..., :R], buf[..., R:]
    slots = torch.tensor([0, 1])
    for name, kv_c, k_pe, error in (("kv_c", torch.ones(2, R // 2), torch.ones(2, P), ValueError),
                                    ("kv_c", torch.ones(2, R, dtype=torch.float64), torch.ones(2, P), TypeError),
                                    ("k_pe", torch.ones(2, R), torch.ones(3, P), ValueError)):
        with pytest.raises(error, match=name):
            torch.ops.mla_kernels.write_cache(kv_c, k_pe, kv_cache, pe_cache, slots)
        assert torch.equal(buf, before)
    kv8, scale8, pe8 = mla_kernels.fp8_latent_cache(2, PAGE, 128, P)
    with pytest.raises(ValueError, match="kv_scale"):
        torch.ops.mla_kernels.write_cache_fp8(torch.ones(2, 128, dtype=torch.bfloat16),
                                              torch.ones(2, P, dtype=torch.bfloat16), kv8, pe8, slots, scale8[:, :1])


def test_mla_decode_op_checks_its_arguments():
    """``torch.ops.mla_kernels.mla_decode`` is a public name too: called directly it checks shapes, dtypes and
    widths as ``mla_decode`` does. Before, a query narrower than the cache was launched as it was."""
    q_nope, q_pe, kv_cache, pe_cache, table, seqlens = decode_inputs("cpu")
    good = dict(q_nope=q_nope, q_pe=q_pe, kv_cache=kv_cache, pe_cache=pe_cache, block_table=table,
                cache_seqlens=seqlens)
    for name, bad, error in (("q_nope", q_nope[..., :R // 2], ValueError), ("q_pe", q_pe.double(), TypeError),
                             ("block_table", table[:2], ValueError), ("cache_seqlens", seqlens.float(), TypeError)):
        a = dict(good, **{name: bad})
        with pytest.raises(error, match=name):
            torch.ops.mla_kernels.mla_decode(*a.values(), SCALE, True, False, None, 12, None)
    with pytest.raises(ValueError, match="softmax_scale"):
        torch.ops.mla_kernels.mla_decode(*good.values(), -1.0, True, False, None, 12, None)
    with pytest.raises(ValueError, match="w_uv"):
        torch.ops.mla_kernels.mla_decode(*good.values(), SCALE, True, False, torch.randn(HEADS + 1, 8, R), 12, None)


def test_opcheck_fp8_cache(device):
    """An fp8 cache through the ops: write_cache quantizes into the latent and its scales (both declared mutated),
    mla_decode reads them back with ``kv_scale``; each op gives the public call's result."""
    from mla_kernels.cache import fp8_latent_cache

    kv_cache, kv_scale, pe_cache = fp8_latent_cache(4, PAGE, 128, P, torch.float32, device=device)
    kv = torch.randn(5, 128 + P, device=device)
    slots = torch.arange(5, dtype=torch.int64, device=device) * 3
    w_args = (kv[:, :128], kv[:, 128:], kv_cache, pe_cache, slots, kv_scale)
    torch.library.opcheck(torch.ops.mla_kernels.write_cache_fp8.default, w_args, test_utils=FP8_OPCHECK_TESTS)
    torch.ops.mla_kernels.write_cache_fp8(*w_args)
    assert kv_scale.view(-1).count_nonzero() == 5  # one scale per written token (R = 128)
    q = torch.randn(2, 1, HEADS, 128 + P, device=device)
    table = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]], dtype=torch.int32, device=device)
    seqlens = torch.tensor([13, 6], dtype=torch.int32, device=device)
    d_args = (q[..., :128], q[..., 128:], kv_cache, pe_cache, table, seqlens, SCALE, True, True, None, 16, None,
              None, None, None, kv_scale)
    torch.library.opcheck(torch.ops.mla_kernels.mla_decode.default, d_args, test_utils=FP8_OPCHECK_TESTS)
    out, lse = torch.ops.mla_kernels.mla_decode(*d_args)
    expected = mla_kernels.mla_decode(q[..., :128], q[..., 128:], kv_cache, pe_cache, table, seqlens, SCALE,
                                      return_lse=True, max_seqlen_k=16, kv_scale=kv_scale)
    assert torch.equal(out, expected[0]) and torch.equal(lse, expected[1])


def prefill_inputs(device, new=(3, 0, 2), history=(2, 4, 0), d_nope=8, d_v=8, seed=1):
    lens = [n + h for n, h in zip(new, history)]
    g = torch.Generator().manual_seed(seed)
    kv_cache, pe_cache, table = make_paged_cache(lens, PAGE, (R, P), torch.float32, device, generator_seed=seed)
    kv_cache.nan_to_num_(0.0)
    pe_cache.nan_to_num_(0.0)
    table = table.clamp(max=kv_cache.shape[0] - 1)
    total = sum(new)
    cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32, device=device)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    q_latent = torch.randn(total, HEADS, R, generator=g).to(device)
    q_raw = torch.randn(total, HEADS, d_nope, generator=g).to(device)
    q_pe = torch.randn(total, HEADS, P, generator=g).to(device)
    w_kv_b = (torch.randn(HEADS * (d_nope + d_v), R, generator=g) * R ** -0.5).to(device)
    return q_latent, q_raw, q_pe, kv_cache, pe_cache, table, cu, seqlens, w_kv_b


@pytest.mark.parametrize("return_lse", [False, True], ids=["out", "out+lse"])
def test_opcheck_mla_prefill(return_lse, device):
    q_latent, _, q_pe, kv_cache, pe_cache, table, cu, seqlens, _ = prefill_inputs(device)
    lengths = (cu.tolist(), seqlens.tolist()) if return_lse else (None, None)  # host lengths in one of the two
    args = (q_latent, q_pe, kv_cache, pe_cache, table, cu, seqlens, SCALE, True, return_lse, None, None, None, None,
            *lengths)
    torch.library.opcheck(torch.ops.mla_kernels.mla_prefill.default, args, test_utils=OPCHECK_TESTS)
    out, lse = torch.ops.mla_kernels.mla_prefill(*args)
    expected = mla_kernels.mla_prefill(q_latent, q_pe, kv_cache, pe_cache, table, cu, seqlens, SCALE,
                                       return_lse=True)
    assert torch.equal(out, expected[0])
    assert torch.equal(lse, expected[1]) if return_lse else lse.shape == (0,)


def test_opcheck_prefill_ops_with_split_tokens(device):
    """Both prefill ops take ``split_tokens`` (batch-invariant prefill) and give the eager calls' bits."""
    q_latent, q_raw, q_pe, kv_cache, pe_cache, table, cu, seqlens, w_kv_b = prefill_inputs(device, d_nope=16, d_v=16)
    args = (q_latent, q_pe, kv_cache, pe_cache, table, cu, seqlens, SCALE, True, True, None, None, None, None, None,
            None, 2)
    torch.library.opcheck(torch.ops.mla_kernels.mla_prefill.default, args, test_utils=OPCHECK_TESTS)
    out, lse = torch.ops.mla_kernels.mla_prefill(*args)
    expected = mla_kernels.mla_prefill(q_latent, q_pe, kv_cache, pe_cache, table, cu, seqlens, SCALE,
                                       return_lse=True, split_tokens=2)
    assert torch.equal(out, expected[0]) and torch.equal(lse, expected[1])
    args = (q_raw, q_pe, kv_cache, pe_cache, table, cu, seqlens, w_kv_b, SCALE, True, "auto", True, None, None, None,
            2)
    torch.library.opcheck(torch.ops.mla_kernels.mla_prefill_attention.default, args, test_utils=OPCHECK_TESTS)
    out, lse = torch.ops.mla_kernels.mla_prefill_attention(*args)
    expected = mla_kernels.mla_prefill_attention(q_raw, q_pe, kv_cache, pe_cache, table, cu, seqlens, w_kv_b, SCALE,
                                                 return_lse=True, split_tokens=2)
    assert torch.equal(out, expected[0]) and torch.equal(lse, expected[1])


@pytest.mark.parametrize("host", [False, True], ids=["lengths-read", "host-lengths"])
@pytest.mark.parametrize("path", ["absorbed", "expanded"])
def test_opcheck_mla_prefill_attention(path, host, device):
    _, q_raw, q_pe, kv_cache, pe_cache, table, cu, seqlens, w_kv_b = prefill_inputs(device, d_nope=16, d_v=16)
    lengths = (cu.tolist(), seqlens.tolist()) if host else (None, None)
    args = (q_raw, q_pe, kv_cache, pe_cache, table, cu, seqlens, w_kv_b, SCALE, True, path, True, None, *lengths)
    torch.library.opcheck(torch.ops.mla_kernels.mla_prefill_attention.default, args, test_utils=OPCHECK_TESTS)
    out, lse = torch.ops.mla_kernels.mla_prefill_attention(*args)
    expected = mla_kernels.mla_prefill_attention(q_raw, q_pe, kv_cache, pe_cache, table, cu, seqlens, w_kv_b, SCALE,
                                                 path=path, return_lse=True)
    assert out.shape == (q_raw.shape[0], HEADS, 16)
    assert torch.equal(out, expected[0]) and torch.equal(lse, expected[1])


def test_compiled_prefill_passes_host_lengths_to_the_op(device):
    """Under torch.compile(fullgraph=True) mla_prefill_attention with host lengths traces to the one op, which gets
    the lengths as its arguments after ``kv_scale`` (before ``split_tokens``), and returns the eager result."""
    _, q_raw, q_pe, kv_cache, pe_cache, table, cu, seqlens, w_kv_b = prefill_inputs(device, d_nope=16, d_v=16)

    def step(q_raw, cu_host, lens_host):
        return mla_kernels.mla_prefill_attention(q_raw, q_pe, kv_cache, pe_cache, table, cu, seqlens, w_kv_b, SCALE,
                                                 path="expanded", cu_seqlens_q_host=cu_host,
                                                 cache_seqlens_host=lens_host)

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    got = torch.compile(step, backend=backend, fullgraph=True)(q_raw, cu.tolist(), seqlens.tolist())
    assert torch.equal(got, step(q_raw, cu.tolist(), seqlens.tolist()))
    calls = [n for n in graphs[0].graph.nodes if n.op == "call_function" and "mla_prefill_attention" in str(n.target)]
    assert len(calls) == 1 and list(calls[0].args[13:15]) == [cu.tolist(), seqlens.tolist()]


def test_compiled_calls_take_numpy_ints(device):
    """Under torch.compile(fullgraph=True) a numpy int (dynamo traces it as a 0-d ndarray) passes for an int as it
    does eagerly: mla_decode's max_seqlen_k (taken before numpy's ints went through _utils._integer, whose
    hasattr on the value's type dynamo cannot trace: "Unsupported hasattr call"; torch 2.8 to 2.11 cannot trace
    operator.index on it, "unsupported index(Tensor)", the torch of the GPU machine among them, nor can 2.15, "torch.*
    op returned non-Tensor"). A numpy float or bool is refused there as eagerly (int() of it traces, and truncated
    a float: _utils._traced_numpy_integer reads the dtype first)."""
    np = pytest.importorskip("numpy")
    q_nope, q_pe, kv_cache, pe_cache, table, seqlens = decode_inputs(device)

    def decode(q_nope, max_seqlen_k):
        return mla_kernels.mla_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE,
                                      max_seqlen_k=max_seqlen_k)

    expected = decode(q_nope, 12)
    assert torch.equal(torch.compile(decode, backend="eager", fullgraph=True)(q_nope, np.int64(12)), expected)
    for value in (np.float64(12.0), np.float32(12.5), np.bool_(True)):  # (as eagerly: the error's message, with the
        torch._dynamo.reset()  # value's repr, breaks the graph, so not fullgraph)
        with pytest.raises(ValueError, match="max_seqlen_k must be an int"):
            torch.compile(decode, backend="eager")(q_nope, value)


@OLD_NUMPY_TRACE
def test_compiled_prefill_takes_numpy_host_lengths(device):
    """The prefill host lengths as lists of numpy ints, under torch.compile(fullgraph=True), as eagerly."""
    np = pytest.importorskip("numpy")
    _, q_raw, q_pe, kv_cache, pe_cache, table, cu, seqlens, w_kv_b = prefill_inputs(device, d_nope=16, d_v=16)

    def prefill(q_raw, cu_host, lens_host):
        return mla_kernels.mla_prefill_attention(q_raw, q_pe, kv_cache, pe_cache, table, cu, seqlens, w_kv_b, SCALE,
                                                 path="expanded", cu_seqlens_q_host=cu_host,
                                                 cache_seqlens_host=lens_host)

    expected = prefill(q_raw, cu.tolist(), seqlens.tolist())
    got = torch.compile(prefill, backend="eager", fullgraph=True)(q_raw, list(cu.cpu().numpy()),
                                                                   list(seqlens.cpu().numpy()))
    assert torch.equal(got, expected)


COMPILED_BAD_PREFILL = {
    "q_nope-rank": (lambda a: a.update(q_nope=a["q_nope"][:, 0]), ValueError, "q_nope"),
    "softmax_scale-none": (lambda a: a.update(softmax_scale=None), TypeError, "softmax_scale"),
    "cu_seqlens_q_host-float": (lambda a: a.update(cu_seqlens_q_host=[float(v) for v in a["cu_seqlens_q"].tolist()],
                                                   cache_seqlens_host=a["cache_seqlens"].tolist()),
                                TypeError, "cu_seqlens_q_host"),
    "w_kv_b-none": (lambda a: a.update(w_kv_b=None), TypeError, "w_kv_b"),
    "path-none": (lambda a: a.update(path=None), ValueError, "path"),
}


@pytest.mark.parametrize("fn,case", [(fn, case) for fn in ("mla_prefill", "mla_prefill_attention")
                                     for case in COMPILED_BAD_PREFILL
                                     if fn == "mla_prefill_attention" or "w_kv_b" not in case and "path" not in case])
def test_compiled_prefill_checks_shapes_before_the_op(fn, case):
    """Under torch.compile the prefill calls check what they can without reading values (shapes, dtypes, types)
    before tracing their op, as eagerly, so bad input raises the error naming it (a graph break takes it out of the
    graph, as for mla_decode). Before, the op's fake implementation met the bad input first and torch.compile
    raised its own TorchRuntimeError, or the op's schema refused it."""
    q_latent, q_raw, q_pe, kv_cache, pe_cache, table, cu, seqlens, w_kv_b = prefill_inputs("cpu", d_nope=16, d_v=16)
    args = dict(q_nope=q_latent, q_pe=q_pe, kv_cache=kv_cache, pe_cache=pe_cache, block_table=table, cu_seqlens_q=cu,
                cache_seqlens=seqlens, softmax_scale=SCALE)
    if fn == "mla_prefill_attention":
        args.update(q_nope=q_raw, w_kv_b=w_kv_b)
    change, error, name = COMPILED_BAD_PREFILL[case]
    change(args)
    torch._dynamo.reset()
    compiled = torch.compile(getattr(mla_kernels, fn), backend="eager")
    with pytest.raises(error, match=name):
        compiled(**args)


def test_opcheck_on_the_pytorch_path(monkeypatch):
    """The ops also wrap the PyTorch path that CPU tensors take without the interpreter."""
    monkeypatch.setattr(_utils, "interpreting", lambda: False)
    cpu = torch.device("cpu")
    q_nope, q_pe, kv_cache, pe_cache, table, seqlens = decode_inputs(cpu, s_q=2, lens=(5, 0, 9))
    torch.library.opcheck(torch.ops.mla_kernels.mla_decode.default,
                          (q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE, True, True, None, 12, None),
                          test_utils=OPCHECK_TESTS)
    q_latent, _, q_pe, kv_cache, pe_cache, table, cu, seqlens, _ = prefill_inputs(cpu)
    torch.library.opcheck(torch.ops.mla_kernels.mla_prefill.default,
                          (q_latent, q_pe, kv_cache, pe_cache, table, cu, seqlens, SCALE, True, True, None, None,
                           None), test_utils=OPCHECK_TESTS)


def test_opcheck_mla_decode_with_metadata(device):
    """The scheduling metadata crosses the op boundary as its two tables and its sizes; the op gives the public
    call's result with the same metadata, and a compiled step that takes the metadata stays one graph."""
    q_nope, q_pe, kv_cache, pe_cache, table, seqlens = decode_inputs(device, lens=(5, 0, 11))
    meta = mla_kernels.mla_decode_metadata(seqlens, HEADS, kv_lora_rank=R, num_programs=3)
    args = (q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE, True, True, None, 12, None,
            meta.programs, meta.sequences, [meta.batch, meta.block_m, meta.block_n, meta.num_programs,
                                            meta.num_part_slots])
    torch.library.opcheck(torch.ops.mla_kernels.mla_decode.default, args, test_utils=OPCHECK_TESTS)
    out, lse = torch.ops.mla_kernels.mla_decode(*args)
    expected = mla_kernels.mla_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE, return_lse=True,
                                      max_seqlen_k=12, metadata=meta)
    assert torch.equal(out, expected[0]) and torch.equal(lse, expected[1])

    def step(q_nope, seqlens, meta):
        return mla_kernels.mla_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE, max_seqlen_k=12,
                                      metadata=meta)

    got = torch.compile(step, backend="eager", fullgraph=True)(q_nope, seqlens, meta)
    assert torch.equal(got, expected[0])


def test_compiled_step_building_metadata_follows_s_q(device):
    """A compiled step that builds its metadata from q's shape (S_q from the step, as a decode step then a
    speculative verify do) keeps tracing whole once dynamo makes S_q symbolic: the schedule's tiles come from the
    rows' class, one graph per class (here S_q 2-8 x 2 heads: rows <= 16), and each call equals eager."""
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(q_nope, q_pe, kv_cache, pe_cache, table, seqlens):
        meta = mla_kernels.mla_decode_metadata(seqlens, q_nope.shape[2], q_nope.shape[1], kv_lora_rank=R,
                                               dtype=q_nope.dtype)
        return mla_kernels.mla_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE, metadata=meta)

    compiled = torch.compile(step, backend=count, fullgraph=True)
    for s_q in (1, 2, 3, 8):
        args = decode_inputs(device, lens=(9, 0, 12), s_q=s_q, seed=s_q)
        assert torch.equal(compiled(*args), step(*args)), s_q
    assert len(graphs) == 2  # S_q 1, then symbolic S_q for the rest


@pytest.mark.parametrize("call", ["prefill", "prefill_attention", "fp8_write_and_decode", "metadata_from_widths"])
def test_compiled_calls_trace_with_symbolic_widths(call, device):
    """torch.compile(dynamic=True) makes every size symbolic, the latent and rope widths too (as do mark_dynamic and
    one compiled step meeting two models' widths). The calls check their widths (_utils.check_width), whose hasattr
    dynamo can't trace on a SymInt: mla_prefill and mla_prefill_attention always, an fp8 write_cache and mla_decode
    (their named checks), and mla_decode_metadata given a shape's width failed the fullgraph trace; so did the
    schedule's tile lookup (a constant of the graph) given a symbolic width. Each traces whole now and equals eager."""
    if call == "fp8_write_and_decode":
        from mla_kernels.cache import fp8_latent_cache

        kv_cache, kv_scale, pe_cache = fp8_latent_cache(4, PAGE, 128, P, torch.float32, device=device)
        step, kv = _fp8_step(device, lambda: (kv_cache, pe_cache, kv_scale))
        args = (kv,)
        before = [t.clone() for t in (kv_cache.view(torch.uint8), kv_scale, pe_cache)]

        def reset():
            for t, b in zip((kv_cache.view(torch.uint8), kv_scale, pe_cache), before):
                t.copy_(b)
    elif call == "metadata_from_widths":
        args = decode_inputs(device, lens=(9, 0, 12), s_q=2)

        def step(q_nope, q_pe, kv_cache, pe_cache, table, seqlens):
            meta = mla_kernels.mla_decode_metadata(seqlens, q_nope.shape[2], q_nope.shape[1],
                                                   kv_lora_rank=q_nope.shape[3], rope_dim=q_pe.shape[3],
                                                   dtype=q_nope.dtype)
            return mla_kernels.mla_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE, metadata=meta)
    else:
        q_latent, q_raw, q_pe, kv_cache, pe_cache, table, cu, seqlens, w_kv_b = prefill_inputs(device, d_nope=16,
                                                                                             d_v=16)
        if call == "prefill":
            args = (q_latent, q_pe)

            def step(q, q_pe):
                return mla_kernels.mla_prefill(q, q_pe, kv_cache, pe_cache, table, cu, seqlens, SCALE,
                                               return_lse=True)
        else:
            args = (q_raw, q_pe)

            def step(q, q_pe):
                return mla_kernels.mla_prefill_attention(q, q_pe, kv_cache, pe_cache, table, cu, seqlens, w_kv_b,
                                                         SCALE, path="absorbed", return_lse=True)
    expected = step(*args)
    if call == "fp8_write_and_decode":
        reset()
    torch._dynamo.reset()
    got = torch.compile(step, backend="eager", fullgraph=True, dynamic=True)(*args)
    expected, got = (expected, got) if isinstance(got, tuple) else ((expected,), (got,))
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


def test_compiled_calls_are_single_nodes_and_check_values(device):
    """Under torch.compile(fullgraph=True) write_cache + mla_decode trace to the two ops, with no graph break,
    write the cache in place (views of one buffer), and give the eager result. The CPU value checks still run:
    a slot past the cache raises from inside the compiled code."""
    buf = torch.zeros(6, PAGE, R + P, device=device)
    kv_cache, pe_cache = buf[..., :R], buf[..., R:]
    table = torch.arange(6, dtype=torch.int32, device=device).view(2, 3)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 1, HEADS, R + P, generator=g).to(device)
    kv = torch.randn(2, R + P, generator=g).to(device)
    slots = torch.tensor([4, 12 + 6], dtype=torch.int64, device=device)
    seqlens = torch.tensor([5, 7], dtype=torch.int32, device=device)
    buf[0, :4] = torch.randn(4, R + P, generator=g).to(device)
    buf[3:5] = torch.randn(2, PAGE, R + P, generator=g).to(device)

    def step(kv, slots, seqlens):
        mla_kernels.write_cache(kv[:, :R], kv[:, R:], kv_cache, pe_cache, slots)
        return mla_kernels.mla_decode(q[..., :R], q[..., R:], kv_cache, pe_cache, table, seqlens, SCALE,
                                      max_seqlen_k=12)

    before = buf.clone()
    expected = step(kv, slots, seqlens)
    written = buf.clone()
    buf.copy_(before)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    compiled = torch.compile(step, backend=backend, fullgraph=True)
    got = compiled(kv, slots, seqlens)
    assert torch.equal(got, expected) and torch.equal(buf, written)
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert torch.ops.mla_kernels.write_cache.default in targets or torch.ops.mla_kernels.write_cache in targets
    assert any("mla_decode" in str(t) for t in targets)
    if device.type == "cpu":
        with pytest.raises(ValueError, match="slot_mapping"):
            compiled(kv, torch.tensor([4, 999], dtype=torch.int64, device=device), seqlens)


def _fp8_step(device, views):
    """A step that writes three tokens into an fp8 cache (R 128) and decodes over it, as ``(step, kv)``: ``step(kv)``
    takes ``(kv_cache, pe_cache, kv_scale)`` from ``views()`` inside it."""
    g = torch.Generator().manual_seed(3)
    kv = torch.randn(3, 128 + P, generator=g).to(device)
    slots = torch.tensor([0, 5, 9], dtype=torch.int64, device=device)
    q = torch.randn(2, 1, HEADS, 128 + P, generator=g).to(device)
    table = torch.tensor([[0, 1, 2], [2, 1, 0]], dtype=torch.int32, device=device)
    seqlens = torch.tensor([10, 3], dtype=torch.int32, device=device)

    def step(kv):
        kv_cache, pe_cache, kv_scale = views()
        mla_kernels.write_cache(kv[:, :128], kv[:, 128:], kv_cache, pe_cache, slots, kv_scale=kv_scale)
        return mla_kernels.mla_decode(q[..., :128], q[..., 128:], kv_cache, pe_cache, table, seqlens, SCALE,
                                      max_seqlen_k=12, kv_scale=kv_scale)

    return step, kv


def test_compiled_fp8_paged_cache_through_aot_autograd(device):
    """AOTAutograd (the inductor and aot_eager backends) refuses a graph input that is a view of another dtype than
    its base when the graph writes it, which an fp8 cache's e4m3 values, fp32 scales and rope keys all are (views of
    one uint8 buffer): "input mutations on views with different dtypes", so an fp8 static_latent_cache generate with
    a compile_config failed. PagedLatentCache.views makes them inside the graph from the buffer while tracing."""
    from mla_kernels.cache import PagedLatentCache

    paged = PagedLatentCache(1, 4, PAGE, 128, P, dtype=torch.float8_e4m3fn, device=device, rope_dtype=torch.float32)
    step, kv = _fp8_step(device, lambda: paged.views(0))
    expected = step(kv)
    written = paged.buffer(0).clone()
    paged.buffer(0).zero_()
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(kv)
    assert torch.equal(got, expected) and torch.equal(paged.buffer(0), written)


def test_compiled_fp8_write_and_decode_match_eager(device):
    """An fp8 cache under torch.compile(fullgraph=True): write_cache with ``kv_scale`` traces to the fp8 write op
    (which declares the scales mutated) and mla_decode reads them back; the cache bytes, scales and output equal
    the eager run's."""
    from mla_kernels.cache import fp8_latent_cache

    kv_cache, kv_scale, pe_cache = fp8_latent_cache(4, PAGE, 128, P, torch.float32, device=device)
    step, kv = _fp8_step(device, lambda: (kv_cache, pe_cache, kv_scale))
    expected = step(kv)
    written = (kv_cache.view(torch.uint8).clone(), kv_scale.clone(), pe_cache.clone())
    for t in (kv_cache.view(torch.uint8), kv_scale, pe_cache):
        t.zero_()
    got = torch.compile(step, backend="eager", fullgraph=True)(kv)
    assert torch.equal(got, expected)
    assert torch.equal(kv_cache.view(torch.uint8), written[0]) and torch.equal(kv_scale, written[1])
    assert torch.equal(pe_cache, written[2])


def test_write_ops_declare_every_tensor_they_write():
    """The write ops' schemas mark each cache they write as mutated (``Tensor(a!)``), the fp8 op's scales included:
    functionalization under torch.compile orders reads after the write only for declared mutations. opcheck's
    test_schema, which would notice an undeclared one, can't run on the fp8 op (no CPU float8 arithmetic)."""
    for op, written in ((torch.ops.mla_kernels.write_cache.default, {"kv_cache", "pe_cache"}),
                        (torch.ops.mla_kernels.write_cache_fp8.default, {"kv_cache", "pe_cache", "kv_scale"})):
        mutated = {a.name for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write}
        assert mutated == written, op


def test_opcheck_bf16_decode_without_lse():
    """In bf16, the op's empty lse (return_lse=False) is float32, as its fake kernel says: a real result in the
    inputs' dtype differed from the fake one (the fp32 tests above can't tell the two apart)."""
    q_nope, q_pe, kv_cache, pe_cache, table, seqlens = decode_inputs("cpu")
    q_nope, q_pe, kv_cache, pe_cache = (t.to(torch.bfloat16) for t in (q_nope, q_pe, kv_cache, pe_cache))
    args = (q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE, True, False, None, 12, None)
    torch.library.opcheck(torch.ops.mla_kernels.mla_decode.default, args, test_utils=("test_faketensor",))
    out, lse = torch.ops.mla_kernels.mla_decode(*args)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32 and lse.shape == (0,)


def test_op_signatures_use_types_every_supported_torch_infers():
    """pyproject admits torch >= 2.6, whose ``torch.library.infer_schema`` knows ``typing.List[int]`` but not the
    builtin ``list[int]`` ("Parameter sched_sizes has unsupported type Optional[list[int]]", raised at
    ``import mla_kernels``). The ops' annotations (strings, from ``from __future__ import annotations``) must spell
    lists the old way; the installed torch accepts both, so this reads the annotations themselves."""
    import inspect

    from mla_kernels import _ops

    ops = [obj for obj in vars(_ops).values() if isinstance(obj, torch._library.custom_ops.CustomOpDef)]
    assert len(ops) == 5
    for op in ops:
        for name, param in inspect.signature(op._init_fn).parameters.items():
            annotation = str(param.annotation)
            assert "list[" not in annotation and "tuple[" not in annotation, \
                (op._name, name, annotation)
