"""FlashMLA's decode interface (mla_kernels.integrations.flash_mla) against the float64 references: its layouts
(one [N, page, 1, R+P] cache, lse [B, H, S_q], whole-cache slot indices, FP8 rows) mapped onto mla_decode."""

import pytest
import torch

from mla_kernels import reference
from helpers import assert_close, assert_lse_close
from mla_kernels import DecodeSchedule
from mla_kernels.schedule import build_tables
from mla_kernels.integrations.flash_mla import (FlashMLAConfig, FlashMLAMetadata, FlashMLASchedMeta,
                                                flash_mla_with_kvcache, get_mla_metadata)
from test_decode import SCALE, make_inputs
from test_fp8 import FP8_COS_TOL, FP8_LSE_ATOL, FP8_RMS_TOL, decode_inputs, dequantized, storage_bytes
from test_sparse import key_lists

R, P = 128, 32  # widths the FP8 layout takes (R a multiple of 128); small, for the interpreter


def flash_inputs(lens, s_q, heads, page, dtype, device, seed=0):
    """FlashMLA's arguments (q [B, S_q, H, R+P], k_cache [N, page, 1, R+P]) and mla_decode's views of them."""
    a = dict(zip(("q_nope", "q_pe", "kv_cache", "pe_cache", "block_table", "cache_seqlens"),
                 make_inputs(lens, s_q, heads, page, dtype, device, r=R, p=P, seed=seed)))
    q, rows = a["q_nope"]._base, a["kv_cache"]._base  # make_inputs' fused buffers (NaN in every unused slot)
    assert q.shape[-1] == rows.shape[-1] == R + P
    return q, rows.unsqueeze(2), a


def flash_lse(ref_lse: torch.Tensor) -> torch.Tensor:
    """The reference's lse [B, S_q, H] as FlashMLA returns it: [B, H, S_q], +inf where a token saw no key."""
    return ref_lse.masked_fill(ref_lse == -float("inf"), float("inf")).transpose(1, 2)


def slots_of(positions: torch.Tensor, table: torch.Tensor, page: int) -> torch.Tensor:
    """Sequence positions [B, S_q, K] (-1: none) as FlashMLA's whole-cache slots, block id * page + offset."""
    pos = positions.long().clamp(min=0)
    blocks = torch.gather(table.long(), 1, (pos // page).flatten(1)).view_as(pos)
    return torch.where(positions >= 0, blocks * page + pos % page, -1).to(positions.dtype)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_dense_decode(dtype, causal, device, poisoned_empty):
    q, k_cache, a = flash_inputs([37, 0, 70], 2, 5, 16, dtype, device)
    meta, splits = get_mla_metadata()
    out, lse = flash_mla_with_kvcache(q, k_cache, a["block_table"], a["cache_seqlens"], R, meta, splits,
                                      softmax_scale=SCALE, causal=causal)
    ref_out, ref_lse = reference.absorbed_decode(*a.values(), SCALE, causal=causal)
    assert out.dtype == dtype and out.shape == (3, 2, 5, R) and lse.shape == (3, 5, 2) and lse.is_contiguous()
    assert_close("out", out, ref_out, dtype)
    assert_lse_close("lse", lse, flash_lse(ref_lse))
    assert (lse[1] == float("inf")).all() and (out[1] == 0).all()  # the padding slot: FlashMLA's lonely tokens
    # the metadata's scheduled grid (FlashMLA's tile scheduler), built by the first call from the real lengths and
    # reused by the next (another layer of the step); without metadata, the uniform split; the default scale is q's
    # width ** -0.5, as FlashMLA's
    schedule = meta.schedule
    assert isinstance(schedule, DecodeSchedule) and schedule.batch == 3
    again, _ = flash_mla_with_kvcache(q, k_cache, a["block_table"], a["cache_seqlens"], R, meta, None,
                                      softmax_scale=SCALE, causal=causal)
    assert torch.equal(again, out) and meta.schedule is schedule
    plain, _ = flash_mla_with_kvcache(q, k_cache, a["block_table"], a["cache_seqlens"], R, None, causal=causal)
    ref_plain, _ = reference.absorbed_decode(*a.values(), (R + P) ** -0.5, causal=causal)
    assert_close("default scale", plain, ref_plain, dtype)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("heads_k", [2, 3])
def test_several_key_value_heads(heads_k, sparse, device, poisoned_empty):
    """``k_cache [N, page, H_k, D]`` with H_k > 1, as FlashMLA's dense decoding test runs it (h_kv 2, 3, 8): each
    key-value head serves H / H_k consecutive query heads; every group against its own cache's reference, the
    metadata's scheduled grid (FlashMLA's older call: S_q * H / H_k rows per key-value head) and its bound shapes."""
    lens, s_q, group, page = [37, 0, 70], 2, 2, 16
    heads = group * heads_k
    q, rows, a = flash_inputs(lens, s_q, heads, page, torch.bfloat16, device, seed=10)
    # key-value head g: the rows' values rolled by 7 g along the width (other values, the same unused NaN slots)
    k_cache = torch.cat([rows.roll(7 * g, -1) for g in range(heads_k)], 2)  # [N, page, H_k, D]
    table, seqlens = a["block_table"], a["cache_seqlens"]
    if sparse:
        positions = key_lists(lens, s_q, 12, seed=5, device=device)
        meta, splits = get_mla_metadata()
        kw = dict(indices=slots_of(positions, table, page))
        args = (None, None)
    else:
        meta, splits = get_mla_metadata(seqlens, s_q * heads // heads_k, heads_k)
        kw = dict(causal=True)
        args = (table, seqlens)
    out, lse = flash_mla_with_kvcache(q, k_cache, *args, R, meta, splits, softmax_scale=SCALE, **kw)
    assert out.shape == (3, s_q, heads, R) and lse.shape == (3, heads, s_q)
    for g in range(heads_k):
        heads_g = slice(g * group, (g + 1) * group)
        a = dict(a, q_nope=q[:, :, heads_g, :R], q_pe=q[:, :, heads_g, R:], kv_cache=k_cache[:, :, g, :R],
                 pe_cache=k_cache[:, :, g, R:])
        if sparse:
            ref_out, ref_lse = reference.sparse_decode(*a.values(), positions, SCALE, causal=False)
        else:
            ref_out, ref_lse = reference.absorbed_decode(*a.values(), SCALE, causal=True)
        assert_close(f"out of key-value head {g}", out[:, :, heads_g], ref_out, torch.bfloat16)
        assert_lse_close(f"lse of key-value head {g}", lse[:, heads_g], flash_lse(ref_lse))
    if sparse:
        assert meta.config.h_q == heads and meta.config.h_k == heads_k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_sparse_slots_topk_length_and_sink(dtype, device, poisoned_empty):
    lens, s_q, heads, page, k = [40, 17, 90], 2, 4, 16, 24
    q, k_cache, a = flash_inputs(lens, s_q, heads, page, dtype, device, seed=1)
    positions = key_lists(lens, s_q, k, seed=3, device=device)  # (17 tokens: -1 past them)
    # row 0: a length past topk keeps all; row 2: a negative one none (the docstring's semantics, unchecked)
    keep = torch.tensor([30, 10, -3], device=device, dtype=torch.int32)
    kept = torch.where(torch.arange(k, device=device) < keep[:, None, None].long(), positions, -1)
    sink = torch.tensor([float("-inf"), 0.5, -2.0, float("inf")], device=device)
    out, lse = flash_mla_with_kvcache(q, k_cache, None, None, R, get_mla_metadata()[0], None, softmax_scale=SCALE,
                                      indices=slots_of(positions, a["block_table"], page), topk_length=keep,
                                      attn_sink=sink)
    ref_out, ref_lse = reference.sparse_decode(*a.values(), kept, SCALE, causal=False)
    weight = torch.sigmoid(ref_lse - sink.double().cpu())  # exp(lse) / (exp(lse) + exp(sink)); lse unchanged
    ref_out = ref_out * torch.nan_to_num(weight, nan=0.0)[..., None]
    assert_close("out", out, ref_out, dtype)
    assert_lse_close("lse", lse, flash_lse(ref_lse))
    assert (out[2] == 0).all() and (lse[2] == float("inf")).all() and (out[:, :, 3] == 0).all()


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_fp8_rows(sparse, device, poisoned_empty):
    lens, s_q, heads, page = [33, 70], 1, 4, 16
    a = decode_inputs(lens, s_q, heads, page, (R, P), torch.bfloat16, device, seed=2)
    # the one uint8 [N, page, row bytes] buffer behind the three views (R e4m3 bytes, R/128 fp32 scales, P bf16)
    rows = storage_bytes(a["kv_cache"]).view(*a["kv_cache"].shape[:2], R + 4 * R // 128 + 2 * P)
    q = torch.cat((a["q_nope"], a["q_pe"]), -1)
    d = dequantized(a)
    if sparse:
        positions = key_lists(lens, s_q, 20, seed=4, device=device)
        out, lse = flash_mla_with_kvcache(q, rows.view(torch.float8_e4m3fn).unsqueeze(2), None, None, R,
                                          softmax_scale=SCALE, is_fp8_kvcache=True,
                                          indices=slots_of(positions, a["block_table"], page))
        ref_out, ref_lse = reference.sparse_decode(*(d[n] for n in ("q_nope", "q_pe", "kv_cache", "pe_cache",
                                                                     "block_table", "cache_seqlens")),
                                                   positions, SCALE, causal=False)
    else:
        out, lse = flash_mla_with_kvcache(q, rows.unsqueeze(2), a["block_table"], a["cache_seqlens"], R,
                                          get_mla_metadata()[0], softmax_scale=SCALE, causal=True,
                                          is_fp8_kvcache=True)  # (the scheduled grid over an fp8 cache)
        ref_out, ref_lse = reference.absorbed_decode(*(d[n] for n in ("q_nope", "q_pe", "kv_cache", "pe_cache",
                                                                       "block_table", "cache_seqlens")), SCALE)
    assert_close("out", out, ref_out, torch.bfloat16, rms_tol=FP8_RMS_TOL[torch.bfloat16],
                 cos_tol=FP8_COS_TOL[torch.bfloat16])
    assert_lse_close("lse", lse, flash_lse(ref_lse), atol=FP8_LSE_ATOL[torch.bfloat16])


@pytest.mark.parametrize("mode", ["dense", "older-metadata", "sparse", "fp8"])
def test_mla_without_a_rotary_part(mode, device, poisoned_empty):
    """``head_dim_v`` equal to q's width: no rope part (P = 0, GLM-5.3-Flash's MLA; FlashMLA itself needs one), in a
    dense call with either metadata form (the older one's tables are cut for 512 + 64 and rebuilt for these widths),
    a sparse one and over FP8 rows of R e4m3 values and their scales alone; against the float64 references."""
    lens, s_q, heads, page = [37, 0, 70], 2, 4, 16
    dtype = torch.bfloat16
    if mode == "fp8":
        a = decode_inputs(lens, s_q, heads, page, (R, 0), dtype, device, seed=6)
        rows = storage_bytes(a["kv_cache"]).view(*a["kv_cache"].shape[:2], R + 4 * R // 128)
        q, k_cache = a["q_nope"], rows.unsqueeze(2)
        d = dequantized(a)
        ref_args = [d[n] for n in ("q_nope", "q_pe", "kv_cache", "pe_cache", "block_table", "cache_seqlens")]
    else:
        q_nope, q_pe, kv_cache, pe_cache, table, seqlens = make_inputs(lens, s_q, heads, page, dtype, device, r=R,
                                                                       p=0, seed=6)
        q, k_cache = q_nope, kv_cache.unsqueeze(2)
        ref_args = [q_nope, q_pe, kv_cache, pe_cache, table, seqlens]
    assert q.shape[-1] == R and ref_args[1].shape[-1] == 0
    table, seqlens = ref_args[4], ref_args[5]
    kw = dict(softmax_scale=SCALE, is_fp8_kvcache=mode == "fp8")
    if mode == "sparse":
        positions = key_lists(lens, s_q, 20, seed=7, device=device)
        out, lse = flash_mla_with_kvcache(q, k_cache, None, None, R, indices=slots_of(positions, table, page), **kw)
        ref_out, ref_lse = reference.sparse_decode(*ref_args, positions, SCALE, causal=False)
    else:
        meta, splits = get_mla_metadata(seqlens, s_q * heads, 1) if mode == "older-metadata" else get_mla_metadata()
        out, lse = flash_mla_with_kvcache(q, k_cache, table, seqlens, R, meta, splits, causal=True, **kw)
        ref_out, ref_lse = reference.absorbed_decode(*ref_args, SCALE, causal=True)
        assert meta.schedule is not None  # (the scheduled grid ran)
    tol = dict(rms_tol=FP8_RMS_TOL[dtype], cos_tol=FP8_COS_TOL[dtype]) if mode == "fp8" else {}
    assert_close(f"out ({mode})", out, ref_out, dtype, **tol)
    assert_lse_close(f"lse ({mode})", lse, flash_lse(ref_lse), **(dict(atol=FP8_LSE_ATOL[dtype]) if mode == "fp8"
                                                                     else {}))
    with pytest.raises(ValueError, match=r"head_dim_v \(144\) must be at most q's last dimension \(128\)"):
        flash_mla_with_kvcache(q, k_cache, table, seqlens, R + 16, causal=True, **kw)


def _as_deepseek(monkeypatch, r=R, p=P):
    """Make the widths get_mla_metadata's older form cuts its schedule for (DeepSeek's 512 + 64) these tests'."""
    from mla_kernels.integrations import flash_mla as fm

    monkeypatch.setattr(fm, "_DEEPSEEK_R", r)
    monkeypatch.setattr(fm, "_DEEPSEEK_P", p)
    return fm


@pytest.mark.parametrize("widths", ["assumed", "other"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_older_arguments_serve_vllm_and_sglang_callers(widths, dtype, device, poisoned_empty, monkeypatch):
    """FlashMLA's older get_mla_metadata arguments build the schedule at once. vLLM passes the metadata alone;
    SGLang refreshes buffers it got for a larger batch (``buf.copy_(meta)``, ``splits_buf[:bs + 1].copy_(splits)``)
    and passes those. Both give the output of the argument-free metadata bit for bit (same tables, same grid). With
    the widths the schedule was cut for, the call builds no tables; with others whose key tiles differ, its own."""
    from mla_kernels.decode import schedule_tiles

    fm = _as_deepseek(monkeypatch, *((R, P) if widths == "assumed" else (512, 64)))
    q, k_cache, a = flash_inputs([37, 0, 70], 2, 5, 16, dtype, device)
    rows = 2 * 5
    bn = schedule_tiles(rows, R, q.device, P, q.element_size())[1]
    assert (schedule_tiles(rows, fm._DEEPSEEK_R, q.device, fm._DEEPSEEK_P, 2)[1] == bn) == (widths == "assumed")
    meta_buf, splits_buf = get_mla_metadata(torch.ones(8, dtype=torch.int32, device=device), rows, 1)
    meta, splits = get_mla_metadata(a["cache_seqlens"], rows, 1, num_heads_q=5, is_fp8_kvcache=False)
    assert splits.dtype == torch.int32 and splits.shape == (4,) and splits[0] == 0
    assert torch.equal(splits.diff(), meta.schedule.sequences[:, 1])  # FlashMLA's running count of pieces
    assert meta_buf.copy_(meta) is meta_buf
    splits_buf[:4].copy_(splits)
    built = []
    monkeypatch.setattr(fm, "build_tables", lambda *args: built.append(args) or build_tables(*args))
    args = dict(q=q, k_cache=k_cache, block_table=a["block_table"], cache_seqlens=a["cache_seqlens"], head_dim_v=R,
                softmax_scale=SCALE, causal=True)
    want = flash_mla_with_kvcache(**args, tile_scheduler_metadata=get_mla_metadata()[0])
    ref_out, ref_lse = reference.absorbed_decode(*a.values(), SCALE, causal=True)
    assert_close("out", want[0], ref_out, dtype)
    assert_lse_close("lse", want[1], flash_lse(ref_lse))
    for metadata, num_splits in ((meta, None), (meta_buf, splits_buf[:4])):  # vLLM's call, SGLang's
        out, lse = flash_mla_with_kvcache(**args, tile_scheduler_metadata=metadata, num_splits=num_splits)
        assert torch.equal(out, want[0]) and torch.equal(lse, want[1])
    # tables at the call's own tiles only where they differ from the metadata's; on the CPU each call also builds the
    # metadata's to check them against cache_seqlens, as mla_decode checks a schedule's
    own = [call for call in built if call[1] != meta.schedule.block_n]
    assert len(own) == 2 * (widths != "assumed") and len(built) - len(own) == 2 * (device.type == "cpu")


def test_copy_refreshes_metadata_in_place(device, monkeypatch):
    """``FlashMLAMetadata.copy_`` writes into the buffer's own tables (what a captured CUDA graph reads), for a
    batch up to the buffer's, and refuses metadata it cannot hold."""
    _as_deepseek(monkeypatch)
    lens = torch.tensor([70, 3, 0], dtype=torch.int32, device=device)
    buf, _ = get_mla_metadata(torch.ones(5, dtype=torch.int32, device=device), 4, 1)
    tables = buf.schedule.programs, buf.schedule.sequences
    meta, _ = get_mla_metadata(lens, 4, 1)
    buf.copy_(meta)
    assert buf.schedule.programs is tables[0] and buf.schedule.sequences is tables[1]
    assert torch.equal(tables[0], meta.schedule.programs) and torch.equal(tables[1][:3], meta.schedule.sequences)
    with pytest.raises(ValueError, match="no more sequences"):
        meta.copy_(buf)
    with pytest.raises(ValueError, match="same grid"):
        buf.copy_(get_mla_metadata(lens, 4 * 64, 1)[0])  # four 64-row blocks: another grid
    with pytest.raises(ValueError, match="built from lengths"):
        buf.copy_(get_mla_metadata()[0])
    with pytest.raises(TypeError, match="FlashMLAMetadata"):
        buf.copy_(meta.schedule.programs)


def test_one_buffer_serves_a_decode_step_and_its_verify_step(device, poisoned_empty):
    """SGLang refreshes one CUDA-graph metadata buffer for its decode step (H rows) and its speculative verify step
    (S_q * H rows), as FlashMLA's buffers take both while the rows fit one 64-row block. Here the two row counts cut
    other tiles (8 rows: 16 x 32, 32 rows: 64 x 64 at DeepSeek's widths) and had other grids, so copy_ refused the
    verify step's metadata. Now the grid follows the 64-row blocks, and each copy_ brings its tables' tiles."""
    r, p, heads = 512, 64, 8
    lens = [40, 7, 0]
    meta_buf, splits_buf = get_mla_metadata(torch.ones(4, dtype=torch.int32, device=device), heads, 1)
    for s_q in (4, 1, 4):
        a = dict(zip(("q_nope", "q_pe", "kv_cache", "pe_cache", "block_table", "cache_seqlens"),
                     make_inputs(lens, s_q, heads, 16, torch.bfloat16, device, r=r, p=p, seed=s_q)))
        q, k_cache = a["q_nope"]._base, a["kv_cache"]._base.unsqueeze(2)
        meta, splits = get_mla_metadata(a["cache_seqlens"], s_q * heads, 1)
        meta_buf.copy_(meta)
        splits_buf[:4].copy_(splits)
        assert meta_buf.schedule.block_n == (64 if s_q == 4 else 32)
        out, lse = flash_mla_with_kvcache(q, k_cache, a["block_table"], a["cache_seqlens"], r, meta_buf,
                                          splits_buf[:4], softmax_scale=SCALE, causal=True)
        ref_out, ref_lse = reference.absorbed_decode(*a.values(), SCALE, causal=True)
        assert_close(f"S_q {s_q}", out, ref_out, torch.bfloat16)
        assert_lse_close(f"S_q {s_q}", lse, flash_lse(ref_lse))


@pytest.mark.parametrize("dynamic", [False, None, True], ids=["static", "automatic", "dynamic"])
def test_a_compiled_step_takes_decode_and_verify(device, monkeypatch, dynamic):
    """A fullgraph-compiled step given metadata sees decode steps and speculative verifies of several S_q. With
    dynamic=False a graph per S_q; with automatic dynamic shapes the second S_q makes S_q symbolic and the tile
    lookup (a constant of the graph) is made from the rows' class: one graph for every S_q of a class, one more when
    the rows cross into the next (S_q 16 x 2 heads: 32 rows, other tiles). Before, the symbolic rows failed the
    trace. With dynamic=True every size is symbolic from the first call, q's width (latent + rope) too: the lookup
    gets the widths' values (equality guards), as the rows' class; before, the symbolic width failed the trace
    (S_q 1 is specialised all the same, so the same three graphs)."""
    _as_deepseek(monkeypatch)
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(meta, q, k_cache, block_table, cache_seqlens):
        return flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, R, meta, None, softmax_scale=SCALE,
                                      causal=True)

    torch._dynamo.reset()  # (step's code object is every parametrisation's: their graphs would add up to the limit)
    compiled = torch.compile(step, backend=count, fullgraph=True, dynamic=dynamic)
    s_qs = (1, 4, 2, 3, 16)
    for s_q in s_qs:
        q, k_cache, a = flash_inputs([40, 17], s_q, 2, 16, torch.float32, device, seed=s_q)
        meta = get_mla_metadata(a["cache_seqlens"], s_q * 2, 1)[0]
        got = compiled(meta, q, k_cache, a["block_table"], a["cache_seqlens"])
        want = step(meta, q, k_cache, a["block_table"], a["cache_seqlens"])
        assert all(torch.equal(x, y) for x, y in zip(got, want)), s_q
    # automatic: S_q 1 (static), then 4 (symbolic, rows <= 16; 2 and 3 reuse it), then 16 (rows 17-32)
    assert len(graphs) == (len(s_qs) if dynamic is False else 3)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("widths", ["assumed", "other"])
def test_a_compiled_call_refuses_metadata_of_other_lengths(backend, widths, monkeypatch):
    """On the CPU metadata from other lengths is refused inside compiled code too. Where the call's widths cut the
    keys into other tiles than the metadata's (the call builds its own tables), the CPU check was skipped while
    traced: a compiled step took stale metadata silently where the eager call refuses it. Now a device assertion of
    the graph (a RuntimeError when it runs); with the metadata's own tiles mla_decode's op refuses it (ValueError).
    Metadata of the call's lengths passes and gives the eager result."""
    if widths == "assumed":
        _as_deepseek(monkeypatch)
    q, k_cache, a = flash_inputs([20, 5], 1, 2, 16, torch.float32, torch.device("cpu"))

    def step(q, k_cache, block_table, cache_seqlens, meta, splits):
        return flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, R, meta, splits, softmax_scale=SCALE,
                                      causal=True)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend=backend, fullgraph=True)
    args = (q, k_cache, a["block_table"], a["cache_seqlens"])
    good = get_mla_metadata(a["cache_seqlens"], 2, 1)
    assert all(torch.equal(x, y) for x, y in zip(compiled(*args, *good), step(*args, *good)))
    stale = get_mla_metadata(a["cache_seqlens"] * 10, 2, 1)  # (other tiles per sequence: other tables)
    with pytest.raises((ValueError, RuntimeError), match="other cache_seqlens"):
        compiled(*args, *stale)


def test_older_arguments_are_checked(device, monkeypatch):
    """Metadata of another step's lengths is refused on the CPU, as mla_decode refuses a stale schedule; a batch
    beyond the metadata's, a num_splits of another batch or dtype, and bad get_mla_metadata arguments are refused
    by name everywhere. A sparse call does not read the schedule."""
    _as_deepseek(monkeypatch)
    q, k_cache, a = flash_inputs([20, 5], 1, 2, 16, torch.float32, device)
    args = dict(q=q, k_cache=k_cache, block_table=a["block_table"], cache_seqlens=a["cache_seqlens"], head_dim_v=R,
                softmax_scale=SCALE)
    meta, splits = get_mla_metadata(a["cache_seqlens"], 2, 1)
    if device.type == "cpu":
        stale = get_mla_metadata(a["cache_seqlens"] * 10, 2, 1)[0]  # (other tiles per sequence: other tables)
        with pytest.raises(ValueError, match="other cache_seqlens"):
            flash_mla_with_kvcache(**args, tile_scheduler_metadata=stale)
    with pytest.raises(ValueError, match="built for 1 sequences, the call has 2"):
        flash_mla_with_kvcache(**args, tile_scheduler_metadata=get_mla_metadata(a["cache_seqlens"][:1], 2, 1)[0])
    with pytest.raises(ValueError, match="num_splits must be None"):
        flash_mla_with_kvcache(**args, tile_scheduler_metadata=get_mla_metadata()[0], num_splits=splits)
    with pytest.raises(ValueError, match="num_splits"):
        flash_mla_with_kvcache(**args, tile_scheduler_metadata=meta, num_splits=splits[:2])
    with pytest.raises(TypeError, match="num_splits"):
        flash_mla_with_kvcache(**args, tile_scheduler_metadata=meta, num_splits=splits.long())
    flash_mla_with_kvcache(**dict(args, indices=torch.zeros(2, 1, 4, dtype=torch.int32, device=device)),
                           tile_scheduler_metadata=meta, num_splits=splits)
    with pytest.raises(TypeError, match="cache_seqlens"):
        get_mla_metadata(a["cache_seqlens"].float(), 2, 1)
    if device.type == "cpu":  # cut for other key tiles than the call's (DeepSeek's widths): the call builds its own
        monkeypatch.undo()    # tables, and still refuses metadata of other lengths
        stale = get_mla_metadata(a["cache_seqlens"] * 10, 2, 1)[0]
        with pytest.raises(ValueError, match="tile_scheduler_metadata was built from other cache_seqlens"):
            flash_mla_with_kvcache(**args, tile_scheduler_metadata=stale)
        flash_mla_with_kvcache(**args, tile_scheduler_metadata=get_mla_metadata(a["cache_seqlens"], 2, 1)[0])
    for name, bad in (("num_q_tokens_per_head_k", (0, 1)), ("num_heads_k", (2, 0)), ("num_heads_k", (2, None))):
        with pytest.raises(ValueError, match=name):
            get_mla_metadata(a["cache_seqlens"], *bad)
    with pytest.raises(TypeError, match="is_fp8_kvcache"):
        get_mla_metadata(a["cache_seqlens"], 2, 1, is_fp8_kvcache="no")
    # FlashMLA's first keyword name, and arguments of no known form (taken and not read, as FlashMLA's current
    # interface takes them; the older form's keywords were refused for a while)
    named = get_mla_metadata(cache_seqlens=a["cache_seqlens"], num_heads_per_head_k=2, num_heads_k=1)
    assert named[0].from_lengths and torch.equal(named[1], splits)
    assert torch.equal(named[0].schedule.sequences, meta.schedule.sequences)
    for odd in (dict(cache_seqlens=a["cache_seqlens"], block_size=64), dict(unknown=1)):
        loose, none = get_mla_metadata(**odd)
        assert none is None and not loose.from_lengths and loose.schedule is None


def test_the_older_forms_arguments_bind_as_inspect_binds_them():
    """``get_mla_metadata``'s binding of FlashMLA's older arguments (written out: torch 2.6's dynamo cannot trace
    ``inspect.Signature.bind``) takes and refuses exactly what ``bind`` does."""
    import inspect

    from mla_kernels.integrations import flash_mla

    signature = inspect.signature(flash_mla._from_lengths)
    forms = [((1, 2, 3), {}), ((1, 2), {"num_heads_k": 3}), ((1,), {"cache_seqlens": 1}), ((1, 2, 3, 4, 5, 6, 7), {}),
             ((), {"cache_seqlens": 1, "num_q_tokens_per_head_k": 2}), ((1, 2, 3), {"topk": 4, "is_fp8_kvcache": 1}),
             ((1, 2, 3, 4, 5, 6), {}), ((1, 2, 3), {"block_size": 64}), ((), {}), ((1, 2, 3, 4), {"num_heads_q": 4})]
    for args, kwargs in forms:
        try:
            expected = dict(signature.bind(*args, **kwargs).arguments)
        except TypeError:
            expected = None
        assert flash_mla._bind_from_lengths(args, kwargs) == expected, (args, kwargs)


def test_bad_arguments_are_refused_by_name(device):
    q, k_cache, a = flash_inputs([20, 5], 1, 2, 16, torch.float32, device)
    args = dict(q=q, k_cache=k_cache, block_table=a["block_table"], cache_seqlens=a["cache_seqlens"], head_dim_v=R)
    flash_mla_with_kvcache(**args)
    bad = [(dict(k_cache=k_cache.expand(-1, -1, 3, -1)), ValueError, "multiple of k_cache's 3 key-value heads"),
           (dict(k_cache=k_cache[:, :, :0]), ValueError, "one key-value head"),
           (dict(k_cache=k_cache[..., :-16]), ValueError, "k_cache's last dimension"),
           (dict(head_dim_v=R + P), ValueError, "head_dim_v"),
           (dict(q=q[0]), ValueError, "q must have 4 dimensions"),
           (dict(num_splits=torch.ones(3, dtype=torch.int32)), ValueError, "num_splits"),
           (dict(tile_scheduler_metadata=torch.zeros(4, 8)), TypeError, "tile_scheduler_metadata"),
           (dict(extra_k_cache=k_cache), ValueError, "extra_k_cache"),
           (dict(descale_q=torch.ones(1)), ValueError, "descale_q"),
           (dict(causal=None), TypeError, "causal"),
           (dict(topk_length=torch.ones(2, dtype=torch.int32)), ValueError, "topk_length"),
           # one length for a batch of two: it would broadcast over both sequences
           (dict(indices=torch.zeros(2, 1, 4, dtype=torch.int32, device=device),
                 topk_length=torch.ones(1, dtype=torch.int32, device=device)), ValueError, "topk_length"),
           (dict(causal=True, indices=torch.zeros(2, 1, 4, dtype=torch.int32, device=device)), ValueError, "causal"),
           (dict(is_fp8_kvcache=True), TypeError, "is_fp8_kvcache"),
           (dict(is_fp8_kvcache=True, q=q.bfloat16(),
                 k_cache=torch.zeros(*k_cache.shape[:3], 196, dtype=torch.bfloat16, device=device)), TypeError,
            "must be uint8 or float8_e4m3fn rows"),
           (dict(is_fp8_kvcache=True, k_cache=k_cache.view(torch.uint8), q=q.bfloat16()), ValueError, "bytes"),
           # FP8 rows whose fp32 scales would sit off a 4-byte boundary (an odd row stride, an odd start): torch's
           # view of them as fp32 raised its RuntimeError, naming "self"
           *((dict(is_fp8_kvcache=True, q=q.bfloat16(), k_cache=rows), ValueError, "k_cache with is_fp8_kvcache must "
              "start every row at a multiple of 4 bytes")
             for rows in (torch.zeros(*k_cache.shape[:3], R + 4 + 2 * P + 1, dtype=torch.uint8,
                                      device=device)[..., :-1],
                          torch.zeros(*k_cache.shape[:3], R + 4 + 2 * P + 4, dtype=torch.uint8,
                                      device=device)[..., 1:-3])),
           (dict(is_fp8_kvcache=True, k_cache=k_cache.view(torch.uint8)), TypeError, "q must be bfloat16"),
           (dict(is_fp8_kvcache=True, k_cache=k_cache.view(torch.uint8), q=q.half()), TypeError, "q must be bfloat16"),
           (dict(k_cache=k_cache.half()), TypeError, "k_cache and q disagree on dtype"),
           (dict(k_cache=k_cache.to(torch.float8_e4m3fn)), TypeError, "is_fp8_kvcache=True"),
           (dict(q=q.int()), TypeError, "q must have dtype"),
           (dict(q=torch.cat((q, q), -1)[..., ::2]), ValueError, "q must be contiguous in its last dimension"),
           (dict(k_cache=torch.cat((k_cache, k_cache), -1)[..., ::2]), ValueError,
            "k_cache must be contiguous in its last dimension"),
           # (indices on the query's device: on a GPU, CPU indices were refused first, by mla_decode's device check)
           (dict(indices=torch.zeros(2, 1, 4, dtype=torch.int32, device=device), attn_sink=torch.zeros(3)), ValueError,
            "attn_sink"),
           (dict(attn_sink=torch.zeros(3, device=device)), ValueError, "attn_sink")]
    for change, error, match in bad:
        with pytest.raises(error, match=match):
            flash_mla_with_kvcache(**dict(args, **change))
    # a metadata object keeps the shapes of its first call, as FlashMLA's does
    meta = FlashMLAMetadata()
    flash_mla_with_kvcache(**args, tile_scheduler_metadata=meta)
    with pytest.raises(ValueError, match="batch 2 vs 1"):
        flash_mla_with_kvcache(**dict(args, q=q[:1], block_table=a["block_table"][:1],
                                      cache_seqlens=a["cache_seqlens"][:1]), tile_scheduler_metadata=meta)
    with pytest.raises(ValueError, match="causal False vs True"):
        flash_mla_with_kvcache(**args, tile_scheduler_metadata=meta, causal=True)


def test_refusals_name_the_callers_arguments(device):
    """Errors name what a FlashMLA caller passed, not mla_decode's internal views: a tensor that requires grad (it
    was q_nope / kv_cache). A sparse slot at or past the cache's slot count is skipped, as FlashMLA documents for
    invalid entries (on the CPU it was refused, where the GPU kernels skipped it)."""
    from mla_kernels._utils import GradModeError

    q, k_cache, a = flash_inputs([20, 5], 3, 2, 16, torch.float32, device)
    args = dict(q=q, k_cache=k_cache, block_table=None, cache_seqlens=None, head_dim_v=R, softmax_scale=SCALE)
    slots = k_cache.shape[0] * k_cache.shape[1]
    indices = torch.zeros(2, 3, 4, dtype=torch.int32, device=device)
    with torch.enable_grad():
        for name in ("q", "k_cache"):
            with pytest.raises(GradModeError, match=f"^{name} requires grad"):
                flash_mla_with_kvcache(**dict(args, indices=indices, **{name: args[name].clone().requires_grad_()}))
    def same(a, b):  # bit for bit, NaN where NaN (slot 0 may be an unused, NaN-filled one)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)

    skipped = flash_mla_with_kvcache(**args, indices=torch.full_like(indices, -1))
    for past in (slots, slots + 7, 2 ** 31 - 1):
        same(flash_mla_with_kvcache(**args, indices=torch.full_like(indices, past)), skipped)
    indices[1, 2, 3] = slots
    mixed = flash_mla_with_kvcache(**args, indices=indices)
    indices[1, 2, 3] = -1
    same(mixed, flash_mla_with_kvcache(**args, indices=indices))
    # a dense call's block table of another batch: named against q (mla_decode would say q_nope)
    with pytest.raises(ValueError, match=r"^block_table and q disagree on batch size: 1 vs 2"):
        flash_mla_with_kvcache(**dict(args, block_table=a["block_table"][:1], cache_seqlens=a["cache_seqlens"]))
    # the same for cache_seqlens, the tensors' devices, and a q without tokens or heads (each said q_nope)
    dense = dict(args, block_table=a["block_table"], cache_seqlens=a["cache_seqlens"])
    with pytest.raises(ValueError, match=r"^cache_seqlens and q disagree on batch size: 1 vs 2"):
        flash_mla_with_kvcache(**dict(dense, cache_seqlens=a["cache_seqlens"][:1]))
    for name in ("block_table", "cache_seqlens"):
        with pytest.raises(ValueError, match=rf"^{name} is on meta but q is on {device.type}"):
            flash_mla_with_kvcache(**dict(dense, **{name: dense[name].to("meta")}))
    with pytest.raises(ValueError, match=rf"^indices is on meta but q is on {device.type}"):
        flash_mla_with_kvcache(**args, indices=indices.to("meta"))
    for what, bad in (("query token", q[:, :0]), ("head", q[:, :, :0])):
        with pytest.raises(ValueError, match=rf"^q must have at least one {what}"):
            flash_mla_with_kvcache(**dict(dense, q=bad))
    with pytest.raises(ValueError, match=r"^q is on the meta device"):
        flash_mla_with_kvcache(**dict(dense, **{n: dense[n].to("meta") for n in ("q", "k_cache", "block_table",
                                                                                 "cache_seqlens")}))


def test_a_refused_call_leaves_the_metadata_unbound(device):
    """FlashMLA checks ``causal`` with ``indices`` before it initializes its metadata: a refused first call must not
    bind the metadata to its shapes (here the next, valid call was refused: 'causal False vs True')."""
    q, k_cache, a = flash_inputs([20, 5], 1, 2, 16, torch.float32, device)
    indices = torch.zeros(2, 1, 4, dtype=torch.int32, device=device)
    meta, _ = get_mla_metadata()
    with pytest.raises(ValueError, match="causal"):
        flash_mla_with_kvcache(q, k_cache, None, None, R, meta, causal=True, indices=indices)
    with pytest.raises(TypeError, match="block_table"):  # refused inside mla_decode
        flash_mla_with_kvcache(q, k_cache, a["block_table"].float(), a["cache_seqlens"], R, meta)
    assert meta.config is None and not meta.have_initialized and meta.num_splits is None
    flash_mla_with_kvcache(q, k_cache, None, None, R, meta, indices=indices)
    # FlashMLASchedMeta's fields, under its names
    assert meta.config == FlashMLAConfig(b=2, s_q=1, h_q=2, page_block_size=16, h_k=1, causal=False,
                                         is_fp8_kvcache=False, topk=4)
    assert meta.have_initialized and meta.config.b == 2 and FlashMLASchedMeta is FlashMLAMetadata
    with pytest.raises(ValueError, match="causal False vs True"):
        flash_mla_with_kvcache(q, k_cache, a["block_table"], a["cache_seqlens"], R, meta, causal=True)


@pytest.mark.parametrize("table_dtype", [torch.int32, torch.int64])
def test_flashmla_test_layout(table_dtype, device, poisoned_empty):
    """The layout FlashMLA's own tests use: blocks allocated with a padded stride (page + 1 rows per block, as its
    quantize_k_cache does), NaN past every length, and block-table entries past a sequence's blocks set to
    2147480000 (never read: the interpreter's bounds check fails any read of them). Equal to the clean table."""
    q, k_cache, a = flash_inputs([37, 0, 70], 2, 3, 16, torch.float32, device, seed=5)
    padded = torch.full((k_cache.shape[0], 17, 1, k_cache.shape[-1]), float("nan"), device=device)[:, :16]
    padded.copy_(k_cache)
    clean = a["block_table"].to(table_dtype)
    used = (a["cache_seqlens"].long()[:, None] + 15) // 16
    garbage = torch.where(torch.arange(clean.shape[1], device=device) < used, clean, 2147480000).to(table_dtype)
    for causal in (False, True):
        out, lse = flash_mla_with_kvcache(q, padded, garbage, a["cache_seqlens"], R, softmax_scale=SCALE, causal=causal)
        ref_out, ref_lse = flash_mla_with_kvcache(q, k_cache, clean, a["cache_seqlens"], R, softmax_scale=SCALE,
                                                  causal=causal)
        assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


def test_compiles_fullgraph_with_metadata(device):
    """A decode step as vLLM writes it (get_mla_metadata inside the step, keyword arguments) traces whole, and
    keeps tracing whole once S_q turns symbolic (speculative verifies of other lengths)."""

    def step(q, k_cache, block_table, cache_seqlens):
        meta, splits = get_mla_metadata(cache_seqlens, q.shape[1] * q.shape[2], 1, is_fp8_kvcache=False)
        return flash_mla_with_kvcache(q=q, k_cache=k_cache, block_table=block_table, cache_seqlens=cache_seqlens,
                                      head_dim_v=R, tile_scheduler_metadata=meta, num_splits=splits,
                                      softmax_scale=SCALE, causal=True, is_fp8_kvcache=False)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for s_q in (2, 3, 16):
        q, k_cache, a = flash_inputs([40, 17], s_q, 2, 16, torch.float32, device, seed=s_q)
        got, want = compiled(q, k_cache, a["block_table"], a["cache_seqlens"]), step(q, k_cache, a["block_table"],
                                                                                      a["cache_seqlens"])
        assert all(torch.equal(x, y) for x, y in zip(got, want)), s_q


def test_attn_sink_is_refused_before_any_kernel_runs(device, monkeypatch):
    """A bad attn_sink is refused by name before mla_decode runs (it was checked after the decode: on a GPU the
    work was launched first, and with indices on another device the device check fired first instead). Indices on
    the meta device stand in for CPU indices beside CUDA queries, so the ordering is checked on any machine."""
    from mla_kernels.integrations import flash_mla as fm

    q, k_cache, a = flash_inputs([20, 5], 1, 2, 16, torch.float32, device)

    def must_not_run(*args, **kwargs):
        raise AssertionError("mla_decode ran before attn_sink was checked")

    monkeypatch.setattr(fm, "mla_decode", must_not_run)
    for indices in (None, torch.zeros(2, 1, 4, dtype=torch.int32, device="meta")):
        with pytest.raises(ValueError, match="attn_sink"):
            flash_mla_with_kvcache(q, k_cache, a["block_table"], a["cache_seqlens"], R, indices=indices,
                                   attn_sink=torch.zeros(3, device=device))
        with pytest.raises(TypeError, match="attn_sink"):
            flash_mla_with_kvcache(q, k_cache, a["block_table"], a["cache_seqlens"], R, indices=indices,
                                   attn_sink=torch.zeros(2, dtype=torch.float64, device=device))


def test_host_sink_and_lengths_are_refused_in_a_cuda_graph_capture(monkeypatch):
    """attn_sink and topk_length may live on another device than q: they are moved at each call. While a CUDA graph
    is captured, a copy from host memory would be read again at every replay, and torch 2.11 refuses to capture one
    from pageable memory with an error that does not name the argument: refused here by name. (The capture flag is
    patched: no GPU needed; the device q is on is only named.)"""
    from mla_kernels.integrations import flash_mla as fm

    gpu = torch.device("cuda", 0)
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    for name in ("attn_sink", "topk_length"):
        fm._check_has_data_beside(name, torch.zeros(2), gpu)  # not capturing: moved at the call
        fm._check_has_data_beside(name, torch.zeros(2), torch.device("cpu"))
        capturing[0] = True
        with pytest.raises(ValueError, match=f"{name} is on the CPU while a CUDA graph is captured"):
            fm._check_has_data_beside(name, torch.zeros(2), gpu)
        fm._check_has_data_beside(name, torch.zeros(2), torch.device("cpu"))  # (no graph on the CPU)
        capturing[0] = False


def test_sparse_over_a_cache_of_fewer_slots_than_new_tokens(device):
    """Sparse calls read whole-cache slots, not a sequence of S_q new tokens: a cache of 2 slots serves 3 tokens
    (mla_decode refused it as 'cache_seqlens[0] = 2 is less than the S_q = 3 new tokens', a length the caller never
    passed)."""
    g = torch.Generator().manual_seed(0)
    heads, s_q = 2, 3
    k_cache = torch.randn(1, 2, 1, R + P, generator=g).to(device)
    q = torch.randn(2, s_q, heads, R + P, generator=g).to(device)
    indices = torch.tensor([[[0, 1], [1, -1], [-1, -1]], [[1, 0], [0, 0], [1, -1]]], dtype=torch.int32,
                           device=device)
    out, lse = flash_mla_with_kvcache(q, k_cache, None, None, R, softmax_scale=SCALE, indices=indices,
                                      topk_length=torch.tensor([2, 1], dtype=torch.int32, device=device))
    kv = k_cache[:, :, 0].double().cpu().reshape(2, R + P)
    for b in range(2):
        for s in range(s_q):
            keys = [i for i in indices[b, s, :[2, 1][b]].tolist() if i >= 0]
            if not keys:
                assert (out[b, s] == 0).all() and (lse[b, :, s] == float("inf")).all()
                continue
            scores = q[b, s].double().cpu() @ kv[keys].T * SCALE  # [H, K]
            ref = torch.softmax(scores, -1) @ kv[keys, :R]
            assert_close(f"out[{b}, {s}]", out[b, s], ref, torch.float32)
            assert_lse_close(f"lse[{b}, :, {s}]", lse[b, :, s], torch.logsumexp(scores, -1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
def test_older_arguments_replay_in_a_cuda_graph_as_sglang_runs_them():
    """SGLang's FlashMLA backend: buffers from a larger batch's metadata, the step's metadata copied into them
    before each capture and replay (outside the graph), the decode captured with the buffers. Each replay with new
    lengths must give the eager call's output; the DeepSeek widths take the built tables (no tables in the call)."""
    r, p, heads, page = 512, 64, 16, 64
    q_nope, q_pe, kv_cache, pe_cache, table, seqlens = make_inputs([300, 1000, 5], 1, heads, page, torch.bfloat16,
                                                                   "cuda", r=r, p=p)
    q, k_cache = q_nope._base, kv_cache._base.unsqueeze(2)
    meta_buf, splits_buf = get_mla_metadata(torch.ones(8, dtype=torch.int32, device="cuda"), heads, 1)

    def refresh():  # the engine's per-step metadata copy
        meta, splits = get_mla_metadata(seqlens, heads, 1)
        meta_buf.copy_(meta)
        splits_buf[:4].copy_(splits)

    def step():
        return flash_mla_with_kvcache(q, k_cache, table, seqlens, r, meta_buf, splits_buf[:4], softmax_scale=SCALE,
                                      causal=True)

    refresh()
    step()  # compile outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = step()
    for lens in ([299, 1000, 4], [1, 640, 5], [300, 0, 1]):  # (within each sequence's blocks)
        seqlens.copy_(torch.tensor(lens, dtype=torch.int32))
        refresh()
        graph.replay()
        want_out, want_lse = step()
        torch.cuda.synchronize()
        assert torch.equal(out, want_out) and torch.equal(lse, want_lse), lens
        ref_out, _ = reference.absorbed_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE)
        assert_close(f"replay at {lens}", out, ref_out, torch.bfloat16)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_a_nan_sink_gives_its_head_nan(sparse, device):
    """FlashMLA's ``out * exp(lse) / (exp(lse) + exp(sink))`` with a NaN sink is NaN for that head: not zeros (the
    NaN of a row with no key and a sink of -inf, -inf - -inf, is the only one turned into a weight of 0; before,
    every NaN was); the other heads are as without the NaN."""
    g = torch.Generator().manual_seed(4)
    heads, s_q = 3, 1
    k_cache = torch.randn(1, 4, 1, R + P, generator=g).to(device)
    q = torch.randn(2, s_q, heads, R + P, generator=g).to(device)
    dense = dict(block_table=torch.zeros(2, 1, dtype=torch.int32, device=device),
                 cache_seqlens=torch.tensor([4, 0], dtype=torch.int32, device=device))
    args = (dict(block_table=None, cache_seqlens=None,
                 indices=torch.tensor([[[0, 1, 2, 3]], [[-1, -1, -1, -1]]], dtype=torch.int32, device=device))
            if sparse else dense)
    nan, inf = float("nan"), float("inf")
    out, lse = flash_mla_with_kvcache(q, k_cache, head_dim_v=R, softmax_scale=SCALE,
                                      attn_sink=torch.tensor([nan, -inf, 0.5], device=device), **args)
    plain, plain_lse = flash_mla_with_kvcache(q, k_cache, head_dim_v=R, softmax_scale=SCALE,
                                              attn_sink=torch.tensor([0.0, -inf, 0.5], device=device), **args)
    assert out[:, :, 0].isnan().all()  # the sequence with keys and the one without (the formula's NaN)
    assert torch.equal(out[:, :, 1:], plain[:, :, 1:]) and torch.equal(lse, plain_lse)
    assert (out[1, :, 1] == 0).all()  # no key, a sink of -inf: zeros


def test_sparse_call_of_no_sequences(device):
    """A sparse call with batch 0 returns empty ``out [0, S_q, H, R]`` and ``lse [0, H, S_q]``, as a dense one does
    (it failed in ``view(..., -1)``, which cannot infer a dimension of 0 elements)."""
    heads, s_q = 2, 3
    k_cache = torch.randn(1, 4, 1, R + P, device=device)
    q = torch.randn(0, s_q, heads, R + P, device=device)
    indices = torch.zeros(0, s_q, 4, dtype=torch.int32, device=device)
    out, lse = flash_mla_with_kvcache(q, k_cache, None, None, R, softmax_scale=SCALE, indices=indices)
    assert out.shape == (0, s_q, heads, R) and lse.shape == (0, heads, s_q)
