"""merge_attention_states: two attention results over disjoint key sets merged into the attention over both."""

import pytest
import torch

import mla_kernels
from mla_kernels import _utils, decode, merge, reference
from helpers import RMS_TOL, assert_close, assert_lse_close, make_paged_cache, record_launches, rms_tol_for

SCALE = 192 ** -0.5
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def merge_tol(dtype: torch.dtype) -> float:
    """The merge adds no error of its own beyond one rounding of the output to ``dtype`` after a few float32
    operations (each at most 2^-24 relative). For a 16-bit output that rounding dominates: under eps/2 relative per
    element when rounded to nearest (a GPU, the PyTorch path), under one ulp, eps relative, when truncated (the
    interpreter's fp32 -> bf16 store, TRITON_NOTES.md), and float32's ~1e-7 is far below either; an error under
    eps|x| in every element keeps the relative RMS under eps. (Measured over 20 seeds of test_merge's states: 0.52
    eps in bf16, 0.21 in fp16.) An fp32 output has nothing coarser than those float32 operations: a few float32 eps
    per element, 2 eps for the RMS (measured: 0.46 eps)."""
    eps = torch.finfo(dtype).eps
    return 2 * eps if dtype == torch.float32 else eps


# the merged lse in float32: the conversion to log2 units and back and the log of a sum of two weights each round to
# within an ulp of |lse| (or of log 2): under 8 float32 eps, ~1e-6, relative to max(1, |lse|) as assert_lse_close
# scales it (measured: 0.03 eps over 60 seeded states; the bound was 1e-5, 84 eps)
MERGE_LSE_ATOL = 8 * torch.finfo(torch.float32).eps


def states(shape, dtype, device, seed=0):
    """Two random states ``(out_a, lse_a, out_b, lse_b)`` with the edge rows: state a keyless (-inf) with a NaN output
    (never read), state b keyless with a NaN output, both keyless, and lse far apart (one state's weight rounds to 0
    in float32)."""
    g = torch.Generator().manual_seed(seed)
    out_a, out_b = (torch.randn(*shape, generator=g).to(dtype) for _ in range(2))
    lse_a, lse_b = (torch.randn(*shape[:-1], generator=g) * 4 for _ in range(2))
    flat = [t.view(-1, shape[-2], shape[-1]) if t.dim() == len(shape) else t.view(-1, shape[-2])
            for t in (out_a, lse_a, out_b, lse_b)]
    o_a, l_a, o_b, l_b = flat
    l_a[0, 0], o_a[0, 0] = float("-inf"), float("nan")
    l_b[0, 1], o_b[0, 1] = float("-inf"), float("nan")
    l_a[-1, 0] = l_b[-1, 0] = float("-inf")
    l_a[-1, 1], l_b[-1, 1] = 120.0, -120.0
    return tuple(t.to(device) for t in (out_a, lse_a, out_b, lse_b))


@pytest.mark.parametrize("shape", [(3, 2, 4, 512), (5, 2, 24), (2, 1, 3, 16)], ids=["decode-R512", "prefill-D24",
                                                                                      "two-tokens"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16", "fp32"])
def test_merge_matches_the_reference(shape, dtype, device):
    a = states(shape, dtype, device)
    out, lse = mla_kernels.merge_attention_states(*a)
    ref_out, ref_lse = reference.merge_states(*(t.cpu() for t in a))
    assert out.dtype == dtype and out.shape == shape and lse.dtype == torch.float32 and lse.shape == shape[:-1]
    assert_close(f"merge {shape}", out, ref_out, dtype, rms_tol=merge_tol(dtype))
    assert_lse_close(f"merge {shape}", lse, ref_lse, atol=MERGE_LSE_ATOL)
    rows_out, rows_lse = out.reshape(-1, *shape[-2:]), lse.reshape(-1, shape[-2])
    out_a, out_b = a[0].reshape(-1, *shape[-2:]), a[2].reshape(-1, *shape[-2:])
    assert torch.equal(rows_out[0, 0], out_b[0, 0]), "a keyless state (NaN output, never read) must add nothing"
    assert torch.equal(rows_out[0, 1], out_a[0, 1]), "a keyless state (NaN output, never read) must add nothing"
    assert rows_lse[0, 0] == a[3].reshape(-1, shape[-2])[0, 0] and rows_lse[0, 1] == a[1].reshape(-1, shape[-2])[0, 1]
    assert torch.equal(rows_out[-1, 0], torch.zeros_like(rows_out[-1, 0])) and rows_lse[-1, 0] == float("-inf")
    assert torch.equal(rows_out[-1, 1].float(), out_a[-1, 1].float())  # b's weight 0
    assert mla_kernels.merge_attention_states(*a, return_lse=False).shape == shape


@pytest.mark.parametrize("state", ["a", "b"])
def test_a_nan_lse_makes_the_row_nan(state, device):
    """A NaN in either state's lse (a NaN in the keys it saw) makes the row's output and lse NaN, the other rows
    not."""
    out_a, lse_a, out_b, lse_b = states((2, 3, 16), torch.float32, device)
    (lse_a if state == "a" else lse_b)[1, 2] = float("nan")
    out, lse = mla_kernels.merge_attention_states(out_a, lse_a, out_b, lse_b)
    assert out[1, 2].isnan().all() and lse[1, 2].isnan()
    assert not out[0].isnan().any() and not out[1, :2].isnan().any()


@pytest.mark.parametrize("torch_path", [False, True], ids=["kernel", "torch-path"])
def test_a_plus_inf_lse_is_a_keyless_state_and_huge_lse_stay_finite(torch_path, device, monkeypatch):
    """+inf is FlashMLA's mark of a row that saw no key (``flash_mla_with_kvcache`` returns it): such a state adds
    nothing, as one with -inf (the kernel read it as an overflow and gave the row zeros and lse -inf, dropping the
    other state). An lse past float32's largest value / log2(e) (~2.36e38) is merged in natural units, not
    overflowed to +inf by the conversion to log2 units."""
    if torch_path:
        if device.type != "cpu":
            pytest.skip("the PyTorch path is the CPU's")
        monkeypatch.setattr(_utils, "interpreting", lambda: False)
    out_a, _, out_b, _ = states((1, 4, 16), torch.float32, device)
    inf = float("inf")
    lse_a = torch.tensor([[inf, 1.5, inf, 3e38]], device=device)
    lse_b = torch.tensor([[0.5, inf, inf, -3e38]], device=device)
    out, lse = mla_kernels.merge_attention_states(out_a, lse_a, out_b, lse_b)
    ref_out, ref_lse = reference.merge_states(out_a.cpu(), lse_a.cpu(), out_b.cpu(), lse_b.cpu())
    expected_out = torch.stack([out_b[0, 0], out_a[0, 1], torch.zeros_like(out_a[0, 2]), out_a[0, 3]])[None]
    assert torch.equal(out, expected_out) and torch.equal(ref_out.float(), expected_out.cpu())
    expected_lse = torch.tensor([[0.5, 1.5, -inf, 3e38]])
    assert torch.equal(lse.cpu(), expected_lse) and torch.equal(ref_lse.float(), expected_lse)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_decode_over_two_key_ranges_merges_into_decode_over_both(dtype, device):
    """What the merge is for: ``mla_decode`` over a prefix of whole pages and over the rest of each sequence (its
    own block table from the prefix's last page on), merged, is the decode over the whole cache (the value
    projection applied before the merge, as it is linear)."""
    lens, heads, page, r, p, d_v = [300, 70, 129], 4, 16, 64, 16, 24
    kv_cache, pe_cache, table = make_paged_cache(lens, page, (r, p), dtype, device)
    g = torch.Generator().manual_seed(1)
    q_nope = torch.randn(3, 1, heads, r, generator=g).to(dtype=dtype, device=device)
    q_pe = torch.randn(3, 1, heads, p, generator=g).to(dtype=dtype, device=device)
    w_uv = (torch.randn(heads, d_v, r, generator=g) / r ** 0.5).to(dtype=dtype, device=device)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    prefix_pages = 4  # 64 tokens: every sequence has at least that many
    prefix = torch.full_like(seqlens, prefix_pages * page)
    kw = dict(w_uv=w_uv, return_lse=True)
    head = mla_kernels.mla_decode(q_nope, q_pe, kv_cache, pe_cache, table[:, :prefix_pages].contiguous(), prefix,
                                  SCALE, **kw)
    tail = mla_kernels.mla_decode(q_nope, q_pe, kv_cache, pe_cache, table[:, prefix_pages:].contiguous(),
                                  seqlens - prefix, SCALE, **kw)
    out, lse = mla_kernels.merge_attention_states(*head, *tail)
    ref_out, ref_lse = reference.absorbed_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE,
                                                 w_uv=w_uv)
    # each state is within the kernels' bound of its own float64 value and the merge is a convex combination of the
    # two, so within that bound too, plus one more rounding of the merged output (at most eps/2 relative; the
    # interpreter truncates): RMS_TOL + eps/2 (1.2e-2 in bf16)
    bound = rms_tol_for(dtype, ref_out.numel(), RMS_TOL[dtype] + torch.finfo(dtype).eps / 2)
    assert_close("merged decode", out, ref_out, dtype, bound, bound ** 2)
    assert_lse_close("merged decode", lse, ref_lse)


def test_rows_past_one_grid_axis(monkeypatch):
    """Rows past 65536 go on a second grid axis, as the split combine's (HIP caps the first axis's work-items):
    the launch recorded for 70000 rows fits both vendors, and a small merge on a forced 64-wide axis gives the bits
    of one axis."""
    a = states((70, 4, 16), torch.float32, "cpu")
    expected = mla_kernels.merge_attention_states(*a)
    monkeypatch.setattr(decode, "COMBINE_GRID_X", 64)
    forced = mla_kernels.merge_attention_states(*a)
    assert torch.equal(forced[0], expected[0]) and torch.equal(forced[1], expected[1])
    monkeypatch.undo()
    launches = record_launches(monkeypatch, merge, "_merge_states_kernel")
    big = tuple(torch.empty(*s, device="meta") for s in ((70000, 1, 512), (70000, 1), (70000, 1, 512), (70000, 1)))
    mla_kernels.merge_attention_states(*big)
    (grid, args, _), = launches
    assert grid == (65536, 2) and args[6] == 70000


def test_torch_path_and_compiled_calls_match_the_kernel(monkeypatch):
    a = states((3, 2, 4, 64), torch.bfloat16, "cpu")
    kernel = mla_kernels.merge_attention_states(*a)
    monkeypatch.setattr(_utils, "interpreting", lambda: False)  # CPU tensors: the PyTorch path
    plain = mla_kernels.merge_attention_states(*a)
    compiled = torch.compile(mla_kernels.merge_attention_states, backend="eager", fullgraph=True)(*a)
    ref_out, ref_lse = reference.merge_states(*a)
    for name, got in (("kernel", kernel), ("torch path", plain), ("compiled", compiled)):
        assert_close(name, got[0], ref_out, torch.bfloat16, rms_tol=merge_tol(torch.bfloat16))
        assert_lse_close(name, got[1], ref_lse, atol=MERGE_LSE_ATOL)
    # and with each other: the same float32 value (to ~1e-7) rounded to nearest (PyTorch) and truncated (the
    # interpreter) is at most one ulp apart, eps relative
    for got in (plain, compiled):
        assert_close("torch path vs kernel", got[0], kernel[0], torch.bfloat16, rms_tol=merge_tol(torch.bfloat16))
        torch.testing.assert_close(got[1], kernel[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("path", ["kernel", "torch-path", "compiled"])
def test_strided_states_merge_into_contiguous_results(path, device, monkeypatch):
    """Every path returns ``out`` and ``lse`` contiguous, whatever the inputs' layouts (here a transposed lse, as the
    README's shared-prefix example passes the grouped call's, and outputs sliced from wider rows): the PyTorch path
    (the CPU without the interpreter, and inside torch.compile) let the elementwise ops carry the lse's strides
    into both results, so ``out.view(B, -1)`` raised there and not on the kernel's path."""
    if path == "torch-path":
        if device.type != "cpu":
            pytest.skip("the PyTorch path is the CPU's")
        monkeypatch.setattr(_utils, "interpreting", lambda: False)
    g = torch.Generator().manual_seed(0)
    out_a, out_b = (torch.randn(2, 3, 4, 21, generator=g)[..., 2:-3].to(device) for _ in range(2))
    lse_a, lse_b = (torch.randn(3, 2, 4, generator=g).to(device).transpose(0, 1) for _ in range(2))
    merge_fn = mla_kernels.merge_attention_states
    if path == "compiled":
        merge_fn = torch.compile(merge_fn, backend="eager", fullgraph=True)
    out, lse = merge_fn(out_a, lse_a, out_b, lse_b)
    assert out.is_contiguous() and lse.is_contiguous(), (out.stride(), lse.stride())
    assert out.view(2, 3, -1).shape == (2, 3, 64)
    ref_out, ref_lse = reference.merge_states(*(t.cpu() for t in (out_a, lse_a, out_b, lse_b)))
    assert_close(f"strided {path}", out, ref_out, torch.float32, rms_tol=merge_tol(torch.float32))
    assert_lse_close(f"strided {path}", lse, ref_lse, atol=MERGE_LSE_ATOL)
    assert merge_fn(out_a, lse_a, out_b, lse_b, return_lse=False).is_contiguous()


def test_empty_inputs(device):
    a = states((2, 3, 16), torch.float32, device)
    empty = tuple(t[:0] for t in a)
    out, lse = mla_kernels.merge_attention_states(*empty)
    assert out.shape == (0, 3, 16) and lse.shape == (0, 3)


def _args():
    return dict(zip(("out_a", "lse_a", "out_b", "lse_b"), states((2, 3, 16), torch.float32, "cpu")))


BAD = {
    "out_a-none": (lambda a: a.update(out_a=None), TypeError, "out_a"),
    "out_b-int": (lambda a: a.update(out_b=a["out_b"].long()), TypeError, "out_b"),
    "lse_a-bf16": (lambda a: a.update(lse_a=a["lse_a"].bfloat16()), TypeError, "lse_a"),
    "lse_b-bf16": (lambda a: a.update(lse_b=a["lse_b"].bfloat16()), TypeError, "lse_b"),
    "out_b-shape": (lambda a: a.update(out_b=a["out_b"][:1]), ValueError, "out_b"),
    "out_b-dtype": (lambda a: a.update(out_b=a["out_b"].half()), TypeError, "out_b"),
    "lse_b-shape": (lambda a: a.update(lse_b=a["lse_b"][..., :2]), ValueError, "lse_b"),
    # [H, B] for [B, H] rows: FlashMLA's lse layout untransposed (same numel: read as rows, heads mixed up)
    "lse_a-transposed": (lambda a: a.update(lse_a=a["lse_a"].t().contiguous()), ValueError, "lse_a"),
    "out_a-1d": (lambda a: a.update(out_a=a["out_a"][0, 0], out_b=a["out_b"][0, 0], lse_a=a["lse_a"][0, 0],
                                    lse_b=a["lse_b"][0, 0]), ValueError, "out_a"),
    "lse_b-device": (lambda a: a.update(lse_b=a["lse_b"].to("meta")), ValueError, "lse_b"),
    "out_a-requires-grad": (lambda a: a.update(out_a=a["out_a"].requires_grad_()), ValueError, "out_a"),
    "lse_b-requires-grad": (lambda a: a.update(lse_b=a["lse_b"].requires_grad_()), ValueError, "lse_b"),
    "return_lse-int": (lambda a: a.update(return_lse=1), TypeError, "return_lse"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input(case):
    args = _args()
    change, error, name = BAD[case]
    change(args)
    with pytest.raises(error, match=name):
        mla_kernels.merge_attention_states(**args)


def test_rows_past_the_grids_bound_take_the_pytorch_path(monkeypatch):
    """More rows than one launch's grid takes (``merge.MAX_ROWS``: 65536 programs x 65535 on the second axis, which a
    GPU refused past it; reachable at widths 1-3, ~2^32 rows) go to the PyTorch path; up to it they launch. The bound
    is lowered here to a few rows (what the grid's second axis allows is the GPU's, not the interpreter's)."""
    g = torch.Generator().manual_seed(0)
    out_a, out_b = torch.randn(3, 4, 2, generator=g), torch.randn(3, 4, 2, generator=g)
    lse_a, lse_b = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    launches = record_launches(monkeypatch, merge, "_merge_states_kernel")
    monkeypatch.setattr(merge, "MAX_ROWS", 11)
    got = mla_kernels.merge_attention_states(out_a, lse_a, out_b, lse_b)
    assert not launches
    expected = merge.merge_attention_states_torch(out_a, lse_a, out_b, lse_b)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    monkeypatch.setattr(merge, "MAX_ROWS", 12)
    mla_kernels.merge_attention_states(out_a, lse_a, out_b, lse_b)
    assert len(launches) == 1
    assert merge.MAX_ROWS == 12 and merge.COMBINE_GRID_X * 65535 == 4294901760


def test_rows_past_the_kernels_width_take_the_pytorch_path(monkeypatch):
    """Rows wider than ``merge.MAX_WIDTH`` (one program holds a row: Triton refuses blocks past 2^20 elements; before,
    a row of 2^20 + 1 values failed inside Triton) go to the PyTorch path, with its results; rows up to it launch."""
    g = torch.Generator().manual_seed(0)
    width = 2 * merge.MAX_WIDTH + 1
    out_a, out_b = torch.randn(2, 1, width, generator=g), torch.randn(2, 1, width, generator=g)
    lse_a, lse_b = torch.randn(2, 1, generator=g), torch.randn(2, 1, generator=g)
    launches = record_launches(monkeypatch, merge, "_merge_states_kernel")
    got = mla_kernels.merge_attention_states(out_a, lse_a, out_b, lse_b)
    assert not launches
    expected = merge.merge_attention_states_torch(out_a, lse_a, out_b, lse_b)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    mla_kernels.merge_attention_states(out_a[..., :merge.MAX_WIDTH], lse_a, out_b[..., :merge.MAX_WIDTH], lse_b)
    assert len(launches) == 1 and launches[0][2]["BLOCK_D"] == merge.MAX_WIDTH
