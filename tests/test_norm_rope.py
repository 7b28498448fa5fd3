"""``norm_and_rope`` (``mla_kernels.norm_rope``): the latent's RMSNorm and the query's and the key's rope in one
launch, against the three calls it stands for (``rms_norm``, ``rope`` twice), which ``test_norm`` and ``test_rope``
hold to the formulas in float64."""

from __future__ import annotations

import pytest
import torch

from helpers import record_launches
from mla_kernels import norm as norm_mod, norm_rope as norm_rope_mod, rope as rope_mod
from mla_kernels.norm import rms_norm
from mla_kernels.norm_rope import norm_and_rope
from mla_kernels.rope import rope
from test_norm import make_norm
from test_rope import tables


def operands(lead, heads, device, dtype, width=128, rope_dim=16, seed=1):
    """A step's ``(kv_c, q_pe, k_pe, cos, sin)`` laid out as ``MLAttention.project`` hands them: ``kv_c [*lead, R]``
    and ``k_pe [*lead, P]`` views of the latent projection's ``[*lead, R + P]`` rows, ``q_pe [*lead, H, P]`` a view
    of the query projection's ``[*lead, H, 24 + P]`` rows, tables ``[*lead, P]``."""
    g = torch.Generator().manual_seed(seed)
    kv = (torch.randn(*lead, width + rope_dim, generator=g) * 3).to(device, dtype)
    q = torch.randn(*lead, heads, 24 + rope_dim, generator=g).to(device, dtype)
    cos, sin = tables(lead, rope_dim, device, dtype)
    return kv[..., :width], q[..., 24:], kv[..., width:], cos, sin


def three_calls(norm, kv_c, q_pe, k_pe, cos, sin, style):
    """What ``norm_and_rope`` stands for."""
    return (rope(q_pe, cos.unsqueeze(-2), sin.unsqueeze(-2), style), rms_norm(norm, kv_c), rope(k_pe, cos, sin, style))


@pytest.mark.parametrize("style", ["half", "interleave", "pairs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lead", [(3, 1), (37,)], ids=["decode-B3", "packed-T37"])
def test_norm_and_rope_is_the_three_launches_bit_for_bit(style, dtype, lead, device, poisoned_empty, monkeypatch):
    """One launch (``_norm_rope_kernel``) gives what ``rms_norm``'s and the two ``rope`` launches give, bit for bit,
    dtypes and shapes included: a decode step of 3 sequences (one program a part) and 37 packed tokens (several
    programs a part, the last ones masked: 37 latent rows in blocks of 32, 37 x 5 query rows in blocks of 256,
    37 key rows). Every output element is written (``poisoned_empty``)."""
    norm = make_norm(128, dtype, device)
    args = operands(lead, 5, device, dtype)
    calls = []
    launch = norm_rope_mod._launcher.launch
    monkeypatch.setattr(norm_rope_mod._launcher, "launch", lambda *a, **k: (calls.append(a[0]), launch(*a, **k))[1])
    with torch.no_grad():
        got = norm_and_rope(norm, *args, style)
        assert calls == [norm_rope_mod._norm_rope_kernel]
        expected = three_calls(norm, *args, style)
    assert calls[1:] == [rope_mod._rope_kernel, norm_mod._rms_norm_kernel, rope_mod._rope_kernel]
    for name, g, e in zip(("q_pe", "kv_c", "k_pe"), got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape and g.is_contiguous(), name
        assert torch.equal(g, e), f"{name}: {(g.float() - e.float()).abs().max()}"


def test_norm_and_rope_launch(monkeypatch):
    """The one launch's grid is the three launches' programs side by side, in the order the kernel reads them
    (the norm's, the query's rope's, the key's), with each part's arguments as its own launch passes them and the
    norm's warps (its sum's layout: the norm's bits need them; the rope is elementwise)."""
    launches = record_launches(monkeypatch, norm_rope_mod, "_norm_rope_kernel")
    singles = record_launches(monkeypatch, norm_mod, "_rms_norm_kernel")
    singles += record_launches(monkeypatch, rope_mod, "_rope_kernel")  # (+=: the same list keeps recording)
    norm = make_norm(512, torch.bfloat16, "cpu")
    args = operands((4, 1), 128, "cpu", torch.bfloat16, width=512, rope_dim=64)  # a DeepSeek decode step, batch 4
    with torch.no_grad():
        norm_and_rope(norm, *args, "interleave")
    ((grid, got, kwargs),) = launches
    assert not singles
    # the latent's 4 rows in one program of 8 (width 512), the query's 4 x 128 rows in 4 of 128, the key's 4 in one
    assert grid == (6,) and got[-2:] == (1, 4)
    assert kwargs == dict(BLOCK_R=8, BLOCK_N=512, HALF=32, Q_BLOCK_R=128, K_BLOCK_R=4, STYLE=1,
                          num_warps=norm_mod.NUM_WARPS)
    kv_c, q_pe, k_pe, cos, sin = args
    assert got[0] is kv_c and got[1] is norm.weight and got[3:9] == (4, 1, 576, 0, 512, 1e-6)  # (S = 1: stride 0)
    assert got[9] is q_pe and got[13:16] == (512, 128, 1) and got[23] is k_pe and got[27:30] == (4, 1, 4)
    # (the key [4, 1, P] with tables [4, 1, P] reads as one head of 4 tokens: rope's own reading of it)
    assert [t.data_ptr() for t in (got[11], got[12], got[25], got[26])] == [cos.data_ptr(), sin.data_ptr()] * 2


def _hooked(norm):
    norm.register_forward_hook(lambda module, inputs, out: out + 1)
    return norm


@pytest.mark.parametrize("change", [
    lambda norm, kv_c, q_pe, k_pe, cos, sin: (_hooked(norm), kv_c, q_pe, k_pe, cos, sin),  # the module's call
    lambda norm, kv_c, q_pe, k_pe, cos, sin: (norm, kv_c, q_pe, k_pe, cos.float(), sin.float()),  # float32 ropes
    lambda norm, kv_c, q_pe, k_pe, cos, sin: (norm, kv_c, q_pe.transpose(-1, -2).contiguous().transpose(-1, -2),
                                              k_pe, cos, sin),  # a query whose P is not the unit stride
    lambda norm, kv_c, q_pe, k_pe, cos, sin: (norm, kv_c.double(), q_pe, k_pe, cos, sin),  # a float64 latent
], ids=["hooked-norm", "float32-tables", "strided-query", "float64-latent"])
def test_norm_and_rope_makes_the_three_calls_where_one_would_not_serve(change, monkeypatch):
    """Where any of the three calls would not launch its kernel (a hooked norm runs the module; float32 tables for
    bf16 values give ``apply_rope``'s float32 result; a query not unit-strided along P, a float64 latent), the
    result is the three calls', each launching its own kernel where it would, and nothing fused is launched."""
    norm = make_norm(128, torch.bfloat16, "cpu")
    args = change(norm, *operands((3,), 5, "cpu", torch.bfloat16))
    calls = []
    launch = norm_rope_mod._launcher.launch
    monkeypatch.setattr(norm_rope_mod._launcher, "launch", lambda *a, **k: (calls.append(a[0]), launch(*a, **k))[1])
    with torch.no_grad():
        got = norm_and_rope(*args, "interleave")
        first = list(calls)
        expected = three_calls(*args, "interleave")
    assert norm_rope_mod._norm_rope_kernel not in calls and first == calls[len(first):]
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape and torch.equal(g, e)


@pytest.mark.parametrize("recorded", ["q_pe", "kv_c", "k_pe", "weight"])
def test_norm_and_rope_keeps_the_autograd_history_of_each_part(recorded, monkeypatch):
    """One part autograd records (grad enabled; the query's or the key's rope part, the latent or the norm's weight
    requiring grad, the others not) takes the three calls: the kernel has no backward, so the fused launch would
    return that part without history (each of the three is asked, the key's too). Its result is its call's, with a
    gradient back to what requires it; the other two are the calls' (their kernels), and nothing fused is launched."""
    norm = make_norm(128, torch.float32, "cpu").requires_grad_(recorded == "weight")
    kv_c, q_pe, k_pe, cos, sin = operands((3,), 5, "cpu", torch.float32)
    parts = dict(kv_c=kv_c, q_pe=q_pe, k_pe=k_pe)
    if recorded in parts:
        parts[recorded] = parts[recorded].detach().clone().requires_grad_()
    args = (norm, parts["kv_c"], parts["q_pe"], parts["k_pe"], cos, sin)
    calls = []
    launch = norm_rope_mod._launcher.launch
    monkeypatch.setattr(norm_rope_mod._launcher, "launch", lambda *a, **k: (calls.append(a[0]), launch(*a, **k))[1])
    got = norm_and_rope(*args, "half")
    assert norm_rope_mod._norm_rope_kernel not in calls and len(calls) == 2  # the two parts nothing records
    expected = three_calls(*args, "half")
    index = {"q_pe": 0, "kv_c": 1, "weight": 1, "k_pe": 2}[recorded]
    for i, (name, g, e) in enumerate(zip(("q_pe", "kv_c", "k_pe"), got, expected)):
        assert g.requires_grad == (i == index) and (g.grad_fn is not None) == (i == index), name
        assert g.dtype == e.dtype and g.shape == e.shape and torch.equal(g.detach(), e.detach()), name
    got[index].sum().backward()
    assert (norm.weight if recorded == "weight" else parts[recorded]).grad is not None


def test_norm_and_rope_past_a_rocm_grid_makes_the_three_calls(monkeypatch):
    """The one launch's grid is the three parts' programs together: where that passes ROCm's work-item bound (64 x
    8 warps a program, 2^32 - 1; lowered here to the parts' 6 programs less one) each part launches its own grid,
    with their results (the fused launch is recorded, not run; the parts run their kernels)."""
    from mla_kernels import _utils

    launches = record_launches(monkeypatch, norm_rope_mod, "_norm_rope_kernel")
    norm = make_norm(512, torch.bfloat16, "cpu")
    args = operands((4, 1), 128, "cpu", torch.bfloat16, width=512, rope_dim=64)  # 1 + 4 + 1 programs
    with torch.no_grad():
        expected = three_calls(norm, *args, "interleave")
        norm_and_rope(norm, *args, "interleave")  # (recorded, not run)
        assert len(launches) == 1
        monkeypatch.setattr(_utils, "HIP_MAX_WORK_ITEMS", 5 * 64 * norm_mod.NUM_WARPS)
        monkeypatch.setattr(_utils, "is_hip", lambda: True)
        apart = norm_and_rope(norm, *args, "interleave")
    assert len(launches) == 1
    assert all(torch.equal(a, e) for a, e in zip(apart, expected))


def test_norm_and_rope_of_no_tokens_launches_nothing(monkeypatch):
    """An empty step: empty results of the three calls' shapes and dtypes, no launch."""
    launches = record_launches(monkeypatch, norm_rope_mod, "_norm_rope_kernel")
    norm = make_norm(128, torch.bfloat16, "cpu")
    args = operands((0,), 5, "cpu", torch.bfloat16)
    with torch.no_grad():
        q_pe, kv_c, k_pe = norm_and_rope(norm, *args, "half")
    assert not launches
    assert (q_pe.shape, kv_c.shape, k_pe.shape) == ((0, 5, 16), (0, 128), (0, 16))


def test_the_attention_launches_one_norm_and_rope_a_step(monkeypatch):
    """``MLAttention.project`` (the drop-in's too) normalizes the latent and turns both ropes in one launch: with the
    query's own norm, two launches besides its projections where there were four."""
    from mla_kernels.module import MLAttention

    calls = []
    for mod, name in ((norm_rope_mod, "_norm_rope_kernel"), (norm_mod, "_rms_norm_kernel"), (rope_mod, "_rope_kernel")):
        record = record_launches(monkeypatch, mod, name)
        calls.append((name, record))
    attn = MLAttention(64, 4, 32, 16, 16, 16, q_lora_rank=24).to(torch.bfloat16)
    hidden = torch.randn(2, 1, 64).to(torch.bfloat16)
    cos, sin = attn.rotary(torch.tensor([[5], [9]]), torch.bfloat16)
    with torch.no_grad():
        attn.project(hidden, cos, sin)
    assert {name: len(record) for name, record in calls} == {"_norm_rope_kernel": 1, "_rms_norm_kernel": 1,
                                                             "_rope_kernel": 0}
