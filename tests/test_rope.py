"""The rope kernel (``mla_kernels.rope``) and its PyTorch path, against rotary embedding written as complex
multiplication in float64: each pair of values is one complex number, turned by ``cos + i sin`` of its frequency."""

from __future__ import annotations

import pytest
import torch

from helpers import INTERCEPTING_RUNS, assert_close, record_launches
from mla_kernels import rope as rope_mod
from mla_kernels.rope import apply_rope, rope

STYLES = ("half", "interleave", "pairs")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def tables(lead, width, device, dtype, seed=0):
    """transformers' ``cat(f, f)`` tables for random positions: ``cos``/``sin`` ``[*lead, width]``."""
    g = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, 4096, lead, generator=g).double()
    inv_freq = 10000.0 ** (-torch.arange(0, width, 2, dtype=torch.float64) / width)
    angles = positions[..., None] * inv_freq
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(device, dtype), emb.sin().to(device, dtype)


def complex_rope(x, cos, sin, style):
    """float64: pairs as complex numbers times ``cos + i sin`` (the first half of the tables), laid out per style."""
    x, cos, sin = x.double(), cos.double(), sin.double()
    half = x.shape[-1] // 2
    turn = torch.complex(cos[..., :half], sin[..., :half])
    if style == "half":  # rotate_half pairs x[i] with x[i + half] and keeps that layout
        z = torch.complex(x[..., :half], x[..., half:]) * turn
        return torch.cat((z.real, z.imag), dim=-1)
    z = torch.complex(x[..., 0::2], x[..., 1::2]) * turn
    if style == "interleave":  # pairs in, de-interleaved out
        return torch.cat((z.real, z.imag), dim=-1)
    return torch.stack((z.real, z.imag), dim=-1).flatten(-2)  # pairs: complex rotation in place


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", ["query", "key", "tokens-query", "batch-broadcast", "strided",
                                  "tables-unlike-strides"])
def test_rope_matches_complex_rotation(style, dtype, case, device, poisoned_empty):
    """One launch per tensor, in every layout the drop-in hands it: the query ``[B, S, H, P]`` (a view of the
    query projection) with tables ``[B, S, 1, P]``, the key ``[B, S, P]``, packed tokens ``[T, H, P]``, tables shared
    over the batch (``[1, S, 1, P]``), and a row stride past P; 5 heads, so the last head block is partly masked.
    Tables of unlike layouts (``cos`` contiguous, ``sin`` every other P-wide slice of NaN-padded rows): each table
    is read with its own strides (every other case builds the two alike, where reading ``sin`` with ``cos``'s
    strides goes unseen). Every output element is written (``poisoned_empty``)."""
    width, heads = 16, 5
    g = torch.Generator().manual_seed(1)
    if case in ("query", "strided", "batch-broadcast", "tables-unlike-strides"):
        full = torch.randn(2, 3, heads, 24 if case == "strided" else width, generator=g).to(device, dtype)
        x = full[..., -width:]
        lead = (1, 3) if case == "batch-broadcast" else (2, 3)
        cos, sin = (t.unsqueeze(-2) for t in tables(lead, width, device, dtype))
        if case == "tables-unlike-strides":  # sin's rows 2P apart, NaN past P: a read off its rows shows
            sin = torch.cat((sin, torch.full_like(sin, float("nan"))), dim=-1)[..., :width]
            assert sin.stride()[:2] != cos.stride()[:2]
    elif case == "key":
        x = torch.randn(2, 3, width, generator=g).to(device, dtype)
        cos, sin = tables((2, 3), width, device, dtype)
    else:
        x = torch.randn(7, heads, width, generator=g).to(device, dtype)
        cos, sin = (t.unsqueeze(-2) for t in tables((7,), width, device, dtype))
    expected = complex_rope(x, cos, sin, style)
    assert_close(f"apply_rope {style}", apply_rope(x, cos, sin, style), expected, dtype)
    got = rope(x, cos, sin, style)
    assert got.dtype == x.dtype and got.shape == x.shape and got.is_contiguous()
    assert_close(f"rope {style}", got, expected, dtype)


@pytest.mark.parametrize("style", STYLES)
def test_rope_reads_the_halves_of_the_tables_apply_rope_reads(style, device, poisoned_empty):
    """Tables need not be ``cat(f, f)``: "half" multiplies ``x``'s first half by the tables' first half and its
    second half by their second half (``x * cos + rotate_half(x) * sin``), "interleave" and "pairs" read the first
    half only. Random tables, whose halves differ (every other test builds ``cat(f, f)``, where reading the first
    half twice goes unseen), against ``apply_rope`` in float64. fp32 in and out, computed in fp32 and rounded once:
    a few fp32 ulps, under RMS_TOL's 1e-5 (a wrong half is off by O(1))."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 16, generator=g).to(device)
    cos, sin = (torch.randn(3, 1, 16, generator=g).to(device) for _ in range(2))
    got = rope(x, cos, sin, style)
    assert got.dtype == torch.float32
    assert_close(f"rope {style}", got, apply_rope(x.double(), cos.double(), sin.double(), style), torch.float32)


@pytest.mark.parametrize("style", STYLES)
def test_rope_launches_once_per_tensor(style, monkeypatch, device):
    """The drop-in's two tensors per layer and step are one launch each, over blocks of (token, head) rows: a decode
    step's 4 x 128 query rows of width 64 in 4 programs of 128, its 4 key rows in one; the tables' strides are read
    per token (0 where they broadcast)."""
    launches = record_launches(monkeypatch, rope_mod, "_rope_kernel")
    x = torch.randn(4, 1, 128, 64, device=device, dtype=torch.bfloat16)
    cos, sin = tables((1, 1), 64, device, torch.bfloat16)
    rope(x, cos.unsqueeze(-2), sin.unsqueeze(-2), style)
    rope(x[:, :, 0], cos, sin, style)
    assert len(launches) == 2
    (grid_q, args_q, kw_q), (grid_k, args_k, kw_k) = launches
    assert grid_q == (4,) and kw_q["BLOCK_R"] == 128 and grid_k == (1,) and kw_k["BLOCK_R"] == 4
    assert args_q[4:7] == (512, 128, 1) and args_q[10] == args_q[12] == 0  # rows, heads, tokens per sequence; B: 0
    assert args_k[4:7] == (4, 1, 4)  # 4 rows: tables [1, 1, P] make x [4, 1, P] four tokens of one head
    assert kw_q["HALF"] == 32 and kw_q["STYLE"] == rope_mod._STYLE_IDS[style]


@pytest.mark.parametrize("make", [
    lambda x, c, s: (x, c.float(), s.float()),  # float32 tables for bf16 x: apply_rope answers in float32
    lambda x, c, s: (x[..., :12], c[..., :12], s[..., :12]),  # P / 2 = 6: not a power of two
    lambda x, c, s: (x.transpose(-1, -2).contiguous().transpose(-1, -2), c, s),  # P not the unit stride
    lambda x, c, s: (x.expand(2, 2, 3, 5, 16), c, s),  # five dimensions
    lambda x, c, s: (x, c, s.float()),  # a float32 sin beside a bf16 cos: apply_rope answers in float32 still
    lambda x, c, s: (x[..., :3], c[..., :3], s[..., :3]),  # P = 3: odd (P // 2 = 1 is a power of two)
    lambda x, c, s: (x, c, s * torch.arange(1, 6, device=s.device)[:, None]),  # sin per head [B, S, H, P], cos not
    lambda x, c, s: (x[:1], c[:1], s),  # sin's batch of 2 where x's is 1: apply_rope broadcasts x to it
    lambda x, c, s: (x, torch.stack((c, s)), torch.stack((s, c))),  # a leading table dimension of 2 x lacks
], ids=["float32-tables", "width-12", "strided-P", "five-dims", "float32-sin", "width-3", "per-head-sin",
        "sin-wider-than-x", "tables-extra-dim"])
def test_rope_falls_back_to_pytorch_where_the_kernel_does_not_serve(make, monkeypatch, device):
    """Calls the kernel does not take go to ``apply_rope``, with its result (dtype and shape included), and launch
    nothing: tables whose dtype promotes x's (either table: "interleave" multiplies x by both), widths it cannot
    halve into a power of two, layouts ``_as_tokens`` cannot read (either table not broadcastable to x's tokens, or
    one per head; tables with a leading dimension past x's tokens that is not 1, which apply_rope's result takes)."""
    launches = record_launches(monkeypatch, rope_mod, "_rope_kernel")
    x = torch.randn(2, 3, 5, 16, device=device, dtype=torch.bfloat16)
    cos, sin = (t.unsqueeze(-2) for t in tables((2, 3), 16, device, torch.bfloat16))
    x, cos, sin = make(x, cos, sin)
    got = rope(x, cos, sin, "interleave")
    assert not launches
    expected = apply_rope(x, cos, sin, "interleave")
    assert got.dtype == expected.dtype and torch.equal(got, expected)


class _PlainSubclass(torch.Tensor):
    """A tensor subclass that adds nothing: ``apply_rope``'s ops give it back, so ``rope`` must too."""


@pytest.mark.parametrize("make", [
    lambda c, s: (0.5, 0.25),  # Python numbers: "half" broadcasts them
    lambda c, s: (c, 0.25),
    lambda c, s: (c.as_subclass(_PlainSubclass), s.as_subclass(_PlainSubclass)),
], ids=["numbers", "tensor-and-number", "subclass"])
def test_rope_takes_apply_rope_for_tables_that_are_not_plain_tensors(make, monkeypatch, device):
    """Tables ``apply_rope`` takes but the kernel cannot read (a number; a subclass, whose ops compute its own way)
    go to ``apply_rope``: its result and type, no launch. (Before, ``rope`` read ``cos.requires_grad`` of a float,
    an AttributeError on a Triton device only, and launched the kernel on a subclass's data.)"""
    launches = record_launches(monkeypatch, rope_mod, "_rope_kernel")
    x = torch.randn(3, 5, 16, device=device)
    cos, sin = make(*(t.unsqueeze(-2) for t in tables((3,), 16, device, torch.float32)))
    got, expected = rope(x, cos, sin, "half"), apply_rope(x, cos, sin, "half")
    assert type(got) is type(expected) and torch.equal(got.as_subclass(torch.Tensor), expected.as_subclass(torch.Tensor))
    assert not launches


def test_rope_takes_apply_rope_past_its_widest_row(monkeypatch, device):
    """A rope part wider than ``MAX_WIDTH`` (one program holds a row's halves) goes to ``apply_rope``: the kernel
    would not compile past Triton's largest block (2^20 elements; before, it was launched at any width). A row of
    exactly ``MAX_WIDTH`` is the kernel's (the bound is inclusive)."""
    launches = record_launches(monkeypatch, rope_mod, "_rope_kernel")
    width = 2 * rope_mod.MAX_WIDTH
    x = torch.randn(1, width, device=device)
    cos, sin = tables((1,), width, device, torch.float32)
    assert torch.equal(rope(x, cos, sin, "pairs"), apply_rope(x, cos, sin, "pairs"))
    assert not launches
    rope(x[:, :16], cos[:, :16], sin[:, :16], "pairs")  # (the stand-in launches nothing: the count only)
    assert len(launches) == 1
    at_max = rope_mod.MAX_WIDTH
    rope(x[:, :at_max], cos[:, :at_max], sin[:, :at_max], "pairs")  # "P at most MAX_WIDTH": the widest row launches
    assert len(launches) == 2


@pytest.mark.parametrize("style", ["Half", "rotate_half", "bogus", ""])
def test_an_unknown_rope_style_is_refused(style, device):
    """A style that is not one of ``ROPE_STYLES`` raises a ValueError naming ``style``, from ``apply_rope``,
    ``rope`` and ``norm_and_rope`` alike (before, any other string was computed as "pairs")."""
    from mla_kernels.norm import DeepseekRMSNorm
    from mla_kernels.norm_rope import norm_and_rope

    x = torch.randn(3, 4, 16, device=device)
    cos, sin = tables((3,), 16, device, torch.float32)
    with pytest.raises(ValueError, match="style must be one of"):
        apply_rope(x, cos[:, None], sin[:, None], style)
    with pytest.raises(ValueError, match="style must be one of"):
        rope(x, cos[:, None], sin[:, None], style)
    with pytest.raises(ValueError, match="style must be one of"):
        norm_and_rope(DeepseekRMSNorm(32).to(device), torch.randn(3, 32, device=device), x, x[:, 0], cos, sin, style)


@pytest.mark.parametrize("style", STYLES)
def test_rope_of_a_0d_x_raises_apply_ropes_error(style, device):
    """A 0-d ``x`` goes to ``apply_rope`` (before, ``rope`` failed on ``x.shape[-1]`` with another message)."""
    x, cos, sin = torch.tensor(1.0, device=device), *tables((), 16, device, torch.float32)
    try:
        expected = apply_rope(x, cos, sin, style)
    except Exception as exc:  # ("interleave" and "pairs" index x's last dimension)
        with pytest.raises(type(exc)) as got:
            rope(x, cos, sin, style)
        assert str(got.value) == str(exc)
    else:
        assert torch.equal(rope(x, cos, sin, style), expected)


def test_rope_none_and_compiled_calls_take_pytorch(monkeypatch, device):
    """``style="none"`` returns ``x`` itself; while compiling, ``rope`` is ``apply_rope`` (inductor fuses it)."""
    launches = record_launches(monkeypatch, rope_mod, "_rope_kernel")
    x = torch.randn(2, 4, 16, device=device)
    cos, sin = tables((2,), 16, device, torch.float32)
    assert rope(x, cos[:, None], sin[:, None], "none") is x
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert torch.equal(rope(x, cos[:, None], sin[:, None], "half"), apply_rope(x, cos[:, None], sin[:, None], "half"))
    assert not launches


@pytest.mark.parametrize("style", STYLES)
def test_rope_gives_apply_ropes_shape_grad_and_scalar_tables(style, device):
    """Tables with more (leading 1) dimensions than x broadcast apply_rope's result to their rank; an x or a table
    autograd records gets apply_rope's differentiable result; scalar tables ("half" broadcasts them) do not raise."""
    x = torch.randn(3, 5, 16, device=device)
    cos, sin = tables((1, 3), 16, device, torch.float32)
    for xs, c, s in ((x[:, 0], cos, sin), (x, cos.unsqueeze(-2), sin.unsqueeze(-2)), (x[0, 0], cos[0, :1], sin[0, :1])):
        got, expected = rope(xs, c, s, style), apply_rope(xs, c, s, style)
        assert got.shape == expected.shape
        assert_close(f"rope {style}", got, expected, torch.float32)
    xg = x[:, 0].clone().requires_grad_()
    got = rope(xg, cos[0], sin[0], style)
    assert got.requires_grad
    got.sum().backward()
    assert xg.grad is not None
    if style == "half":
        c, s = torch.tensor(0.5, device=device), torch.tensor(0.25, device=device)
        assert torch.equal(rope(x, c, s, style), apply_rope(x, c, s, style))


def test_rope_pairs_takes_float32_tables_for_bf16(monkeypatch, device):
    """DeepSeek-V2's complex freqs_cis give float32 tables in a bf16 model: "pairs" computes in float32 and returns
    x's dtype whatever the tables', so the kernel serves it (before: every V2 bf16 call fell back)."""
    launches = record_launches(monkeypatch, rope_mod, "_rope_kernel")
    x = torch.randn(2, 3, 16, device=device, dtype=torch.bfloat16)
    cos, sin = tables((2, 3), 16, device, torch.float32)
    rope(x, cos, sin, "pairs")
    assert len(launches) == 1


def test_rope_grid_is_one_dimensional_over_rows(monkeypatch):
    """Rows of (token, head) pairs on the grid's first dimension (CUDA allows 2^31 - 1 there, 65535 on the others):
    65536 tokens of a 2048-wide rope, four rows (4096 pairs) a program, are 16384 programs."""
    launches = record_launches(monkeypatch, rope_mod, "_rope_kernel")
    x = torch.empty(1, 65536, 2048, device="meta", dtype=torch.bfloat16)
    c = torch.empty(1, 1, 2048, device="meta", dtype=torch.bfloat16)
    assert rope(x, c, c, "half").shape == x.shape
    ((grid, args, kwargs),) = launches
    assert grid == (16384,) and kwargs["BLOCK_R"] == 4 and args[4] == 65536


def test_rope_launches_on_the_tensors_gpu(monkeypatch):
    """Triton launches on the current CUDA device: like every other launch of the library, rope's is made inside
    ``_utils.launch_device(x.device)`` (a layer on cuda:1 with cuda:0 current, as under device_map="auto")."""
    import contextlib

    from mla_kernels import _utils

    entered, launched = [], []

    @contextlib.contextmanager
    def recording(device):
        entered.append(device)
        yield
        entered.pop()  # (a launch after the block sees nothing entered)

    monkeypatch.setattr(_utils, "launch_device", recording)
    monkeypatch.setattr(rope_mod._launcher, "launch", lambda *a, **k: launched.append(list(entered)))
    x, cos = torch.randn(2, 3, 4, 64), torch.randn(2, 3, 1, 64)
    rope_mod.rope(x, cos, cos, "interleave")
    assert launched == [[x.device]], launched


@pytest.mark.parametrize("run", INTERCEPTING_RUNS, ids=[run.__name__.strip("_") for run in INTERCEPTING_RUNS])
def test_rope_takes_pytorch_where_its_ops_run_through_something_else(run, device):
    """What runs PyTorch's ops through something else gets ``apply_rope``'s ops, as the model's own rope would:
    forward-mode AD's tangents (under no_grad too), ``torch.func``'s vmap and jvp, ``torch.jit.trace`` and
    ``make_fx``, a TorchDispatchMode, a TorchFunctionMode (before: a launch, or a crash on vmap's storage-less
    tensors)."""
    cos, sin = tables((4,), 16, device, torch.float32)
    x, t = torch.randn(4, 16, device=device), torch.randn(4, 16, device=device)
    got = run(lambda v: rope(v, cos, sin, "interleave"), x, t)
    assert_close("rope", got, run(lambda v: apply_rope(v, cos, sin, "interleave"), x, t), torch.float32)


def test_rope_reads_each_layout_once(monkeypatch):
    """``_as_tokens`` reads a layout from the tensors once and then looks it up by the three tensors' shapes and
    strides: a tensor of the same layout is not read again, one of the same shape but other strides is (its answer
    differs), and the table is cleared whole, never grown past ``_MAX_TOKENS_ENTRIES``."""
    reads = []
    real = rope_mod._read_tokens
    monkeypatch.setattr(rope_mod, "_read_tokens", lambda *args: (reads.append(args[0].stride()), real(*args))[1])
    monkeypatch.setattr(rope_mod, "_TOKENS", {})
    full = torch.randn(2, 3, 5, 24)
    cos, sin = (t.unsqueeze(-2) for t in tables((2, 3), 16, "cpu", torch.float32))
    contiguous = rope_mod._as_tokens(full[..., :16].contiguous(), cos, sin)
    assert rope_mod._as_tokens(full[..., 8:].contiguous(), cos, sin) == contiguous and len(reads) == 1
    strided = rope_mod._as_tokens(full[..., 8:], cos, sin)
    assert len(reads) == 2 and strided != contiguous and strided[3] == 3 * 5 * 24
    assert rope_mod._as_tokens(full[..., 8:], cos[..., :8], sin) is None and len(reads) == 3  # (None: cached too)
    assert rope_mod._as_tokens(full[..., 8:], cos[..., :8], sin) is None and len(reads) == 3
    monkeypatch.setattr(rope_mod, "_MAX_TOKENS_ENTRIES", 3)
    rope_mod._as_tokens(full[:1, ..., 8:], cos[:1], sin[:1])
    assert len(reads) == 4 and len(rope_mod._TOKENS) == 1
