"""The decode scheduler (mla_kernels.schedule) and the scheduled kernel path of mla_decode.

Scheduler: the plain-Python definition by hand and by property (every token once, no empty unit, loads within
one tile), the device tables equal to it exactly, and built without a host synchronisation.
Kernel: mla_decode(..., metadata=...) on imbalanced batches (one long sequence beside short ones and padding
slots) against the float64 reference, with NaN-poisoned caches and outputs.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mla_kernels
from mla_kernels import reference
from helpers import SENTINEL_BLOCK, assert_close, assert_lse_close, assert_rejects
from mla_kernels import decode as decode_mod
from mla_kernels import schedule
from test_decode import SCALE, make_inputs

ON_GPU = torch.cuda.is_available()


def tables(lengths, block_n, num_programs, device="cpu"):
    """Device tables for plain lengths, wrapped as the DecodeSchedule the kernel would get."""
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    programs, sequences = schedule.build_tables(seqlens, block_n, num_programs)
    return schedule.DecodeSchedule(programs, sequences, len(lengths), 16, block_n, num_programs,
                                   schedule.part_slot_bound(len(lengths), num_programs))


# ------------------------------------------------------------------------------------------------
# the scheduler
# ------------------------------------------------------------------------------------------------


def test_reference_by_hand():
    """Tiles of 32: [100, 0, 40, 5] -> 4 + 0 + 2 + 1 = 7 tiles over 3 programs: loads 3, 2, 2."""
    units = schedule.schedule_reference([100, 0, 40, 5], 32, 3)
    assert units == [[(0, 0, 96)],
                     [(0, 96, 100), (2, 0, 32)],
                     [(2, 32, 40), (3, 0, 5)]]
    # sequences 0 and 2 are cut (slots 0-1 and 2-3), 1 is padding, 3 is whole in program 2
    assert schedule.piece_table(units, 4) == [(0, 2, 0), (0, 0, 0), (2, 2, 1), (0, 1, 2)]
    # more programs than tiles: one tile each, the rest idle
    assert schedule.schedule_reference([40, 0], 32, 4) == [[(0, 0, 32)], [(0, 32, 40)], [], []]
    assert schedule.program_loads(7, 3) == [3, 2, 2]


def test_device_tables_by_hand():
    s = tables([100, 0, 40, 5], 32, 3)
    assert s.programs.tolist() == [[0, 0, 0, 3], [0, 3, 2, 1], [2, 1, 3, 1]]
    assert s.sequences.tolist() == [[0, 2, 0], [0, 0, 0], [2, 2, 1], [0, 1, 2]]
    idle = tables([40, 0], 32, 4)
    assert idle.programs.tolist()[2:] == [list(schedule.EMPTY_PROGRAM)] * 2
    assert schedule.units_of(idle, [40, 0]) == [[(0, 0, 32)], [(0, 32, 40)], [], []]
    assert tables([], 16, 3).programs.tolist() == [list(schedule.EMPTY_PROGRAM)] * 3
    everything_padding = tables([0, 0, 0], 16, 2)
    assert schedule.units_of(everything_padding, [0, 0, 0]) == [[], []]
    assert everything_padding.sequences[:, 1].tolist() == [0, 0, 0]
    # a GPU call does not check the lengths' values: a negative one is cut as the padding slot it stands for, never
    # as negative tiles that would shift every later sequence's place in the flat tile order
    for got, want in zip(tables([-100, 40, -33, 7], 32, 3)[:2], tables([0, 40, 0, 7], 32, 3)[:2]):
        assert torch.equal(got, want)


def test_partial_slot_bound_by_hand():
    """(P - 1) + min(B, P - 1), at least 1: one program cuts nothing, and the buffer it sizes is never empty."""
    cases = {(4, 1): 1, (0, 1): 1, (4, 3): 4, (1, 5): 5, (5, 5): 8, (9, 5): 8}
    assert {bp: schedule.part_slot_bound(*bp) for bp in cases} == cases
    meta = mla_kernels.mla_decode_metadata(torch.tensor([300, 5], dtype=torch.int32), 16, num_programs=1)
    assert meta.num_part_slots == 1 and meta.sequences[:, 1].tolist() == [1, 1]


@st.composite
def batches(draw):
    batch = draw(st.integers(1, 40))
    long = draw(st.integers(1, 5000))
    lengths = [draw(st.one_of(st.just(0), st.integers(1, 64), st.integers(1, long))) for _ in range(batch)]
    return lengths, draw(st.sampled_from([1, 16, 32, 64])), draw(st.integers(1, 300))


@settings(max_examples=300, deadline=None)
@given(problem=batches())
def test_schedule_properties(problem):
    lengths, block_n, num_programs = problem
    units = schedule.schedule_reference(lengths, block_n, num_programs)
    assert len(units) == num_programs
    covered = [[] for _ in lengths]
    loads = []
    for mine in units:
        load = 0
        for seq, start, end in mine:
            assert 0 <= start < end <= lengths[seq], "empty or out-of-range unit"
            assert start % block_n == 0 and (end % block_n == 0 or end == lengths[seq]), "cut inside a tile"
            covered[seq].append((start, end))
            load += triton_cdiv(end - start, block_n)
        loads.append(load)
    for seq, pieces in enumerate(covered):  # every token exactly once: pieces tile [0, length) in order
        pieces.sort()
        starts, ends = [0] + [b for _, b in pieces], [a for a, _ in pieces] + [lengths[seq]]
        assert starts == ends, f"sequence {seq} of {lengths[seq]} tokens: gap or overlap in {pieces}"
    assert max(loads) - min(loads) <= 1, loads
    assert sum(loads) == sum(triton_cdiv(n, block_n) for n in lengths)

    # the device tables, decoded the way the kernel walks them, say exactly the same
    got = tables(lengths, block_n, num_programs)
    assert schedule.units_of(got, lengths) == units
    # and the program table itself is the one these units give: a busy program starts in its first unit's sequence
    # (not at the end of the one before, where a boundary falls between programs: the kernel would then run an
    # empty piece of that sequence and overwrite a whole sequence's output with it) and ends in its last unit's
    expected = [(mine[0][0], mine[0][1] // block_n, mine[-1][0], triton_cdiv(mine[-1][2], block_n)) if mine
                else schedule.EMPTY_PROGRAM for mine in units]
    assert [tuple(row) for row in got.programs.tolist()] == expected
    table = schedule.piece_table(units, len(lengths))
    assert [tuple(row) for row in got.sequences.tolist()] == table
    assert sum(pieces for _, pieces, _ in table if pieces > 1) <= got.num_part_slots  # partial buffer suffices


def triton_cdiv(a, b):
    return -(-a // b)


@pytest.mark.parametrize("batch", [37, 0])
def test_no_host_sync_on_meta_tensors(batch, monkeypatch):
    """Built from shapes alone: on the meta device any host read of a value (.item(), .tolist(), bool(),
    nonzero) raises, so this fails if the scheduler ever synchronises. Host data copied to the device (which a
    CUDA graph cannot capture either) is refused by patching torch.tensor / as_tensor."""
    with pytest.raises((RuntimeError, NotImplementedError)):  # the check can fail: a host read on meta raises
        int(torch.zeros((), dtype=torch.int64, device="meta").sum())

    def no_host_data(*args, **kwargs):
        raise AssertionError("host data copied to the device while building the schedule")

    seqlens = torch.empty(batch, dtype=torch.int32, device="meta")
    monkeypatch.setattr(torch, "tensor", no_host_data)
    monkeypatch.setattr(torch, "as_tensor", no_host_data)
    meta = mla_kernels.mla_decode_metadata(seqlens, 16, 2, max_seqlen_k=4096)
    monkeypatch.undo()
    assert meta.programs.device.type == "meta" and meta.programs.shape == (meta.num_programs, 4)
    assert meta.sequences.shape == (batch, 3) and meta.sequences.dtype == torch.int32


@pytest.mark.skipif(not ON_GPU, reason="CUDA's sync debug mode needs a GPU")
def test_no_host_sync_on_cuda():
    seqlens = torch.randint(0, 5000, (64,), dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        meta = mla_kernels.mla_decode_metadata(seqlens, 16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert schedule.units_of(meta, seqlens.cpu()) == schedule.schedule_reference(seqlens.tolist(), meta.block_n,
                                                                                 meta.num_programs)


def test_grid_from_shapes():
    """The grid fills the GPU (two programs per SM for 16-row tiles, one 64-row program per SM at 128 heads)
    and shrinks for a small batch so that no program gets less than MIN_SPLIT_TOKENS of its bound."""
    cpu = torch.device("cpu")
    sms = mla_kernels._utils.num_sms(cpu)
    assert schedule.num_programs_for(64, 16, 16, 32, None, cpu) == 2 * sms
    assert schedule.num_programs_for(64, 128, 64, 64, None, cpu) == math.ceil(sms / 2)  # 2 row blocks each
    assert schedule.num_programs_for(1, 16, 16, 32, 1024, cpu) == 1024 // decode_mod.MIN_SPLIT_TOKENS
    assert schedule.num_programs_for(3, 16, 16, 32, 10, cpu) == 3  # at least one program per sequence
    assert schedule.num_programs_for(8, 16, 16, 32, 0, cpu) == 1  # all padding: no tile to give out, one program


@pytest.mark.parametrize("d_latent", [16, 64, 128, 256, 512, 1024])
def test_a_rows_class_representative_gets_the_rows_tiles(d_latent):
    """schedule_tiles looks the tiles up for the class representative of the rows (what lets a compiled step with a
    symbolic S_q trace): every row count of a class must get the tiles of its representative, on NVIDIA's and
    ROCm's heuristics and in the tuned configs' keys. A heuristic that split a class (say 64 x 64 tiles from 48
    rows on) would fail here."""
    cpu = torch.device("cpu")
    for rows in range(1, 301):
        rep = decode_mod.rows_representative(rows)
        assert mla_kernels._tuning.decode_class(rows, d_latent) == mla_kernels._tuning.decode_class(rep, d_latent)
        for hip in (False, True):
            assert decode_mod._config(rows, d_latent, hip) == decode_mod._config(rep, d_latent, hip), (rows, hip)
        for elem_bytes, fp8 in ((2, False), (4, False), (2, True)):
            want = decode_mod.decode_tiles(rows, d_latent, cpu, 64, elem_bytes, fp8)
            assert decode_mod.schedule_tiles(rows, d_latent, cpu, 64, elem_bytes, fp8) == \
                (want["BLOCK_M"], want["BLOCK_N"]), (rows, elem_bytes, fp8)


def test_metadata_honours_its_arguments():
    """A forced grid is the grid, up to ``schedule.MAX_PROGRAMS`` inclusively (a CUDA grid's y dimension, 65535:
    taken; 65536 is refused, ``BAD_META``); the rows per sequence are S_q x H (8 x 16 = 128 rows: 64 x 64 tiles, not
    the 16 x 32 of 16 rows); max_seqlen_k bounds the lengths inclusively (10 admits a length of 10, 9 does not)."""
    seqlens = torch.tensor([10, 0, 3], dtype=torch.int32)
    meta = mla_kernels.mla_decode_metadata(seqlens, 16, num_programs=7)
    assert meta.num_programs == 7 and meta.programs.shape == (7, 4)
    assert schedule.MAX_PROGRAMS == 65535
    meta = mla_kernels.mla_decode_metadata(seqlens, 16, num_programs=schedule.MAX_PROGRAMS)
    assert meta.num_programs == schedule.MAX_PROGRAMS and meta.programs.shape == (schedule.MAX_PROGRAMS, 4)
    assert (meta.block_m, meta.block_n) == decode_mod.schedule_tiles(16, 512, torch.device("cpu"))
    meta = mla_kernels.mla_decode_metadata(seqlens, 16, 8)
    assert (meta.block_m, meta.block_n) == decode_mod.schedule_tiles(128, 512, torch.device("cpu")) == (64, 64)
    assert mla_kernels.mla_decode_metadata(seqlens, 16, max_seqlen_k=10).batch == 3
    with pytest.raises(ValueError, match="max_seqlen_k"):
        mla_kernels.mla_decode_metadata(seqlens, 16, max_seqlen_k=9)


# ------------------------------------------------------------------------------------------------
# the scheduled kernel: imbalanced batches, poisoned caches and outputs
# ------------------------------------------------------------------------------------------------

# (lens, S_q, heads, page, R, P, num_programs): one long sequence beside short ones and padding slots. Small
# latent widths keep the interpreter fast where the real 512 is not needed; the real width runs at 16 and 128
# heads. Each case's schedule both cuts a sequence and keeps another whole (asserted below).
CASES = {
    "h16-page64-r512": ([700, 5, 0, 33, 12, 0, 90], 1, 16, 64, 512, 64, 7),
    "h128-page64-r512": ([400, 65, 0, 30], 1, 128, 64, 512, 64, 6),
    "h1-page1": ([150, 1, 0, 9, 40], 1, 1, 1, 64, 16, 5),
    "h128-page16-s2": ([260, 3, 0, 40], 2, 128, 16, 64, 16, 4),
    "h16-page7-s8": ([300, 8, 0, 20, 70], 8, 16, 7, 128, 32, 6),
    "h3-page16-s4-default-grid": ([1000, 7, 0, 60], 4, 3, 16, 32, 16, None),
}


def run_scheduled(lens, s_q, heads, page, r, p, num_programs, dtype, device, causal=True, **kw):
    q_nope, q_pe, kv_cache, pe_cache, table, seqlens = make_inputs(lens, s_q, heads, page, dtype, device, r=r, p=p)
    table[seqlens == 0] = SENTINEL_BLOCK  # padding slots read nothing
    meta = mla_kernels.mla_decode_metadata(seqlens, heads, s_q, kv_lora_rank=r, num_programs=num_programs,
                                           rope_dim=p, dtype=dtype)
    out = mla_kernels.mla_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE, causal=causal,
                                 metadata=meta, **kw)
    ref = reference.absorbed_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE, causal=causal,
                                    w_uv=kw.get("w_uv"))
    return meta, out, ref


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_scheduled_parity(case, device, poisoned_empty):
    lens, s_q, heads, page, r, p, num_programs = CASES[case]
    meta, (out, lse), (ref_out, ref_lse) = run_scheduled(lens, s_q, heads, page, r, p, num_programs,
                                                         torch.bfloat16, device, return_lse=True)
    pieces = meta.sequences[:, 1].tolist()
    assert max(pieces) > 1 and 1 in pieces, f"{case}: schedule {pieces} must cut one sequence and keep one whole"
    assert_close(case, out, ref_out, torch.bfloat16)
    assert_lse_close(case, lse, ref_lse)
    padding = torch.tensor(lens) == 0
    assert torch.equal(out[padding].cpu(), torch.zeros_like(out[padding].cpu()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_scheduled_dtypes(dtype, device, poisoned_empty):
    meta, (out, lse), (ref_out, ref_lse) = run_scheduled([333, 2, 0, 64], 2, 5, 16, 64, 16, 6, dtype, device,
                                                         return_lse=True)
    assert_close(str(dtype), out, ref_out, dtype)
    assert_lse_close(str(dtype), lse, ref_lse)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_scheduled_w_uv_contiguous_int64(causal, device, poisoned_empty):
    """w_uv, non-causal attention, separate contiguous tensors and int64 indices on the scheduled path."""
    lens, heads, d_v, r = [210, 0, 9, 31], 4, 32, 64
    q_nope, q_pe, kv_cache, pe_cache, table, seqlens = make_inputs(lens, 3, heads, 16, torch.bfloat16, device,
                                                                   r=r, p=16, fused=False)
    w_uv = (torch.randn(heads, d_v, r) / math.sqrt(r)).to(torch.bfloat16).to(device)
    meta = mla_kernels.mla_decode_metadata(seqlens.long(), heads, 3, kv_lora_rank=r, num_programs=5)
    out = mla_kernels.mla_decode(q_nope, q_pe, kv_cache, pe_cache, table.long(), seqlens.long(), SCALE,
                                 causal=causal, w_uv=w_uv, metadata=meta)
    ref_out, _ = reference.absorbed_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE, causal=causal,
                                           w_uv=w_uv)
    assert out.shape == (4, 3, heads, d_v)
    assert_close(f"w_uv causal={causal}", out, ref_out, torch.bfloat16)


def test_metadata_is_reused_across_layers(device, poisoned_empty):
    """One schedule per step serves every layer: two layers' caches, the same lengths, one metadata."""
    lens, heads = [500, 3, 0, 47], 16
    meta = None
    for layer in range(2):
        q_nope, q_pe, kv_cache, pe_cache, table, seqlens = make_inputs(lens, 1, heads, 16, torch.bfloat16, device,
                                                                       r=64, p=16, seed=layer)
        if meta is None:
            meta = mla_kernels.mla_decode_metadata(seqlens, heads, kv_lora_rank=64, num_programs=6)
        out = mla_kernels.mla_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE, metadata=meta)
        ref_out, _ = reference.absorbed_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE)
        assert_close(f"layer {layer}", out, ref_out, torch.bfloat16)


def test_default_switch_runs_the_scheduled_path(device, monkeypatch, poisoned_empty):
    """With _use_schedule on, mla_decode builds its own schedule (and the result is still right)."""
    built = []
    real = schedule.make_schedule
    monkeypatch.setattr(decode_mod, "_use_schedule", lambda *a: True)
    monkeypatch.setattr(schedule, "make_schedule", lambda *a: built.append(a) or real(*a))
    q_nope, q_pe, kv_cache, pe_cache, table, seqlens = make_inputs([260, 0, 4], 1, 16, 16, torch.bfloat16, device,
                                                                   r=64, p=16)
    out, lse = mla_kernels.mla_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE, return_lse=True)
    ref_out, ref_lse = reference.absorbed_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE)
    assert len(built) == 1
    assert_close("default scheduled", out, ref_out, torch.bfloat16)
    assert_lse_close("default scheduled", lse, ref_lse)


@st.composite
def scheduled_problems(draw):
    batch = draw(st.integers(1, 4))
    s_q = draw(st.integers(1, 3))
    lens = [draw(st.one_of(st.just(0), st.integers(s_q, 40), st.integers(s_q, 300))) for _ in range(batch)]
    return dict(lens=lens, s_q=s_q, heads=draw(st.integers(1, 5)), page=draw(st.sampled_from([1, 3, 16, 64])),
                causal=draw(st.booleans()), num_programs=draw(st.integers(1, 9)), seed=draw(st.integers(0, 99)))


@settings(max_examples=25, deadline=None)
@given(problem=scheduled_problems())
def test_scheduled_property(problem):
    """Random batches through the scheduled path (R 32, P 16): any grid size, page size, S_q, causality."""
    device = torch.device("cuda" if ON_GPU else "cpu")
    q_nope, q_pe, kv_cache, pe_cache, table, seqlens = make_inputs(
        problem["lens"], problem["s_q"], problem["heads"], problem["page"], torch.bfloat16, device, r=32, p=16,
        seed=problem["seed"])
    meta = mla_kernels.mla_decode_metadata(seqlens, problem["heads"], problem["s_q"], kv_lora_rank=32,
                                           num_programs=problem["num_programs"])
    out, lse = mla_kernels.mla_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE,
                                      causal=problem["causal"], return_lse=True, metadata=meta)
    ref_out, ref_lse = reference.absorbed_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE,
                                                 causal=problem["causal"])
    assert_close(str(problem), out, ref_out, torch.bfloat16)
    assert_lse_close(str(problem), lse, ref_lse)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


def test_fp32_schedule_uses_the_tiles_shared_memory_fits(device, poisoned_empty):
    """fp32 queries at 32 rows per sequence and R 512 run 64 x 16 tiles, not the 64 x 64 of bf16 (304 KiB of shared
    memory; an H100 has 227): a schedule built for the call's dtype cuts along those tiles and matches the reference;
    one built for bf16 is refused, naming the argument to pass."""
    meta, out, ref = run_scheduled([150, 3, 0, 40], 1, 32, 16, 512, 64, 5, torch.float32, device)
    assert (meta.block_m, meta.block_n) == (64, 16)
    assert_close("fp32 scheduled", out, ref[0], torch.float32)
    q_nope, q_pe, kv_cache, pe_cache, table, seqlens = make_inputs([150, 3], 1, 32, 16, torch.float32, device)
    bf16_meta = mla_kernels.mla_decode_metadata(seqlens, 32, 1, kv_lora_rank=512)
    assert (bf16_meta.block_m, bf16_meta.block_n) == (64, 64)
    with pytest.raises(ValueError, match="dtype"):
        mla_kernels.mla_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE, metadata=bf16_meta)


def _good():
    q_nope, q_pe, kv_cache, pe_cache, table, seqlens = make_inputs([10, 3], 1, 16, 16, torch.bfloat16, "cpu", r=32,
                                                                   p=16)
    meta = mla_kernels.mla_decode_metadata(seqlens, 16, kv_lora_rank=32, num_programs=3)
    return dict(q_nope=q_nope, q_pe=q_pe, kv_cache=kv_cache, pe_cache=pe_cache, block_table=table,
                cache_seqlens=seqlens, softmax_scale=SCALE, metadata=meta)


def _other_meta(a, *args, **kw):
    a["metadata"] = mla_kernels.mla_decode_metadata(*args, **{"kv_lora_rank": 32, **kw})


BAD_CALL = {
    "not-a-schedule": (lambda a: a.update(metadata=(a["metadata"].programs, a["metadata"].sequences)), TypeError,
                       "metadata"),
    "other-batch": (lambda a: _other_meta(a, torch.tensor([10, 3, 4], dtype=torch.int32), 16), ValueError,
                    "metadata"),
    "other-batch-named": (lambda a: _other_meta(a, torch.tensor([10, 3, 4], dtype=torch.int32), 16), ValueError,
                          "metadata was built for a batch of 3, the call has 2"),
    "other-tiles": (lambda a: _other_meta(a, a["cache_seqlens"], 64), ValueError, "metadata"),
    "other-lengths": (lambda a: _other_meta(a, torch.tensor([10, 200], dtype=torch.int32), 16, num_programs=3),
                      ValueError, "metadata"),
    "other-device": (lambda a: _other_meta(a, torch.empty(2, dtype=torch.int32, device="meta"), 16), ValueError,
                     "metadata"),
    "with-num_splits": (lambda a: a.update(num_splits=2), ValueError, "metadata"),
    "too-few-partial-slots": (lambda a: a.update(metadata=a["metadata"]._replace(num_part_slots=1)), ValueError,
                              "metadata"),
    "no-programs": (lambda a: a.update(metadata=a["metadata"]._replace(programs=a["metadata"].programs[:0],
                                                                       num_programs=0, num_part_slots=1)),
                    ValueError, "metadata"),
    # a hand-made schedule: one table elsewhere (NotImplementedError on the meta device; a GPU kernel would get a
    # host pointer), sizes that are no ints (a TypeError from a comparison, or "a batch of 3, the call has 3")
    "sequences-other-device": (lambda a: a.update(metadata=a["metadata"]._replace(
        sequences=a["metadata"].sequences.to("meta"))), ValueError, "metadata"),
    "batch-string": (lambda a: a.update(metadata=a["metadata"]._replace(batch="2")), ValueError, "metadata"),
    "num_programs-string": (lambda a: a.update(metadata=a["metadata"]._replace(num_programs="3")), ValueError,
                            "metadata"),
}


@pytest.mark.parametrize("case", list(BAD_CALL), ids=list(BAD_CALL))
def test_bad_metadata(case):
    assert_rejects(mla_kernels.mla_decode, _good(), *BAD_CALL[case])


def test_metadata_of_other_lengths_with_the_same_program_table_is_refused():
    """One program over [10, 0, 3] and over [10, 5, 3] walks the same table row (sequences 0 to 2, one tile each
    end), but the first schedule marks sequence 1 padding (no piece: its output would be zeros): the CPU's check
    compares the sequence table too."""
    q_nope, q_pe, kv_cache, pe_cache, table, seqlens = make_inputs([10, 5, 3], 1, 16, 16, torch.bfloat16, "cpu",
                                                                   r=32, p=16)
    meta = mla_kernels.mla_decode_metadata(torch.tensor([10, 0, 3], dtype=torch.int32), 16, kv_lora_rank=32,
                                           num_programs=1)
    assert torch.equal(meta.programs, mla_kernels.mla_decode_metadata(seqlens, 16, kv_lora_rank=32,
                                                                      num_programs=1).programs)
    with pytest.raises(ValueError, match="other cache_seqlens"):
        mla_kernels.mla_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE, metadata=meta)


def test_good_metadata_of_the_bad_input_test_runs():
    out = mla_kernels.mla_decode(**_good())
    assert torch.isfinite(out).all()


def _good_meta_args():
    return dict(cache_seqlens=torch.tensor([10, 0, 3], dtype=torch.int32), num_heads=16, s_q=1)


BAD_META = {
    "cache_seqlens-float": (lambda a: a.update(cache_seqlens=a["cache_seqlens"].float()), TypeError,
                            "cache_seqlens"),
    "cache_seqlens-rank": (lambda a: a.update(cache_seqlens=a["cache_seqlens"][None]), ValueError, "cache_seqlens"),
    # strided: mla_decode refuses it, so metadata built from it could serve no call
    "cache_seqlens-strided": (lambda a: a.update(cache_seqlens=a["cache_seqlens"].repeat_interleave(2)[::2]),
                              ValueError, "cache_seqlens must be contiguous"),
    "cache_seqlens-negative": (lambda a: a["cache_seqlens"].__setitem__(1, -1), ValueError, "cache_seqlens"),
    "num_heads-zero": (lambda a: a.update(num_heads=0), ValueError, "num_heads"),
    "num_heads-float": (lambda a: a.update(num_heads=16.0), ValueError, "num_heads"),
    "s_q-zero": (lambda a: a.update(s_q=0), ValueError, "s_q"),
    "rope_dim-odd": (lambda a: a.update(rope_dim=48), ValueError, "rope_dim"),
    "dtype-int": (lambda a: a.update(dtype=torch.int32), TypeError, "dtype"),
    "dtype-fp8-value": (lambda a: a.update(dtype=torch.float8_e4m3fn), ValueError, "dtype"),  # as an fp8 query
    "dtype-fp8-type": (lambda a: a.update(dtype=torch.float8_e4m3fn), TypeError, "dtype"),
    "cache_dtype-int": (lambda a: a.update(cache_dtype=torch.int8), TypeError, "cache_dtype"),
    "kv_lora_rank-24": (lambda a: a.update(kv_lora_rank=24), ValueError, "kv_lora_rank"),
    "kv_lora_rank-none": (lambda a: a.update(kv_lora_rank=None), ValueError, "kv_lora_rank"),
    "kv_lora_rank-float": (lambda a: a.update(kv_lora_rank=512.0), ValueError, "kv_lora_rank"),
    "num_programs-zero": (lambda a: a.update(num_programs=0), ValueError, "num_programs"),
    "num_programs-past-the-grid": (lambda a: a.update(num_programs=65536), ValueError, "num_programs"),
    "max_seqlen_k-too-small": (lambda a: a.update(max_seqlen_k=5), ValueError, "max_seqlen_k"),
}


@pytest.mark.parametrize("case", list(BAD_META), ids=list(BAD_META))
def test_bad_metadata_arguments(case):
    assert_rejects(mla_kernels.mla_decode_metadata, _good_meta_args(), *BAD_META[case])


# ------------------------------------------------------------------------------------------------
# GPU only
# ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not ON_GPU, reason="CUDA graph capture needs a GPU")
def test_cuda_graph_capture_metadata_and_decode():
    """The schedule and the decode step capture together; replays follow new lengths."""
    lens = [3000, 20, 0, 700] + [50] * 12
    q_nope, q_pe, kv_cache, pe_cache, table, seqlens = make_inputs(lens, 1, 16, 64, torch.bfloat16, "cuda")

    def step():
        meta = mla_kernels.mla_decode_metadata(seqlens, 16, max_seqlen_k=3000)
        return mla_kernels.mla_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE, metadata=meta)

    step()  # compile outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    seqlens.copy_(torch.tensor([2999, 1] + lens[2:], dtype=torch.int32))
    graph.replay()
    ref_out, _ = reference.absorbed_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE)
    assert_close("graph replay", out, ref_out, torch.bfloat16)


@pytest.mark.skipif(not ON_GPU, reason="a B64 batch at R 512 with 8K contexts takes minutes in the interpreter")
@pytest.mark.parametrize("heads", [16, 128])
def test_scheduled_serving_batch_native(heads):
    """A serving-like batch at real widths with the default grid: lengths 1/64 to 1/2 of the longest."""
    g = torch.Generator().manual_seed(heads)
    longest = 8192
    lens = [longest] + torch.randint(longest // 64, longest // 2 + 1, (63,), generator=g).tolist()
    lens[5] = 0
    meta, (out, lse), (ref_out, ref_lse) = run_scheduled(lens, 1, heads, 64, 512, 64, None, torch.bfloat16, "cuda",
                                                         return_lse=True)
    assert_close(f"serving H{heads}", out, ref_out, torch.bfloat16)
    assert_lse_close(f"serving H{heads}", lse, ref_lse)


# ------------------------------------------------------------------------------------------------
# bench.decode's imbalanced section (smoke: small widths, CPU timings mean nothing)
# ------------------------------------------------------------------------------------------------


def test_bench_imbalanced_pair_smoke():
    from bench import _harness as h
    from bench import decode as bd

    lens = bd.imbalanced_lengths(32, 4096)
    assert lens[0] == 4096 and all(64 <= n <= 2048 for n in lens[1:]) and len(set(lens)) > 10
    shape = bd.MLAShape(heads=4, d_latent=32, d_rope=16, d_nope=8, d_v=8)
    time_kw = dict(warmup_ms=0.0, rep_ms=0.0, min_runs=2)
    rows = bd.run_imbalanced_pair(6, 200, 4, 16, torch.device("cpu"), torch.bfloat16, 10.0, time_kw, shape=shape)
    assert [(r["kind"], r["provider"]) for r in rows] == [(k, n) for k in ("imbal", "unif")
                                                          for n in bd.IMBALANCED_ORDER]
    by = {(r["kind"], r["provider"]): r for r in rows}
    imbal, unif = by["imbal", "mla_decode"], by["unif", "mla_decode"]
    assert imbal["total_tokens"] == sum(bd.imbalanced_lengths(6, 200)) and imbal["ctx"] == 200
    assert abs(unif["total_tokens"] - imbal["total_tokens"]) < 6  # the uniform twin: same tokens, rounded
    assert all("p50_ms" in r for r in rows) and unif["pct_of_uniform"] == pytest.approx(100.0)
    assert all("vs_default" in r for (_, name), r in by.items() if "+meta" in name)

    mla_decode, build, sched = bd.imbalanced_library()

    def broken(*args, metadata=None, **kw):  # right without the schedule, wrong with it
        out = mla_decode(*args, metadata=metadata, **kw)
        return out if metadata is None else out * 1.1

    rows = bd.run_imbalanced_pair(6, 200, 4, 16, torch.device("cpu"), torch.bfloat16, 10.0, time_kw, shape=shape,
                                  lib=(broken, build, sched))
    wrong = [r for r in rows if r.get("wrong")]
    assert [r["provider"] for r in wrong] == ["mla_decode+meta", "mla_decode+meta[wide]"] * 2
    assert "p50_ms" not in wrong[0]
    assert "WRONG RESULT" in h.format_row(wrong[0])


def test_tables_built_for_more_sequences_stay_within_the_call(device, poisoned_empty, monkeypatch):
    """FlashMLA's interface lets metadata built for B sequences serve a call of fewer (a CUDA-graph buffer, refreshed
    by ``copy_`` from the call's own lengths). Passed without that ``copy_``, its programs table names sequences
    past the call's batch: a GPU call (no check) read their lengths, block-table rows and queries and wrote their
    output rows past the call's tensors (the interpreter's bounds check raised OutOfBounds). The kernel stops at the
    call's batch; its rows are all written (values undefined, as for any stale schedule), and tables that are the
    call's own (as ``copy_`` leaves them) are exact."""
    monkeypatch.setattr(decode_mod, "_check_metadata_lengths", lambda *a: None)  # as on a GPU
    built_lengths = [128, 64, 300, 64]  # 64-token tiles 2, 1, 5, 1 over 3 programs: program 1 starts at sequence 2
    now = [100, 50]
    q_nope, q_pe, kv_cache, pe_cache, table, seqlens = make_inputs(now, 1, 2, 16, torch.float32, device, r=32, p=16)
    kw = dict(kv_lora_rank=32, rope_dim=16, dtype=torch.float32, num_programs=3)
    built = mla_kernels.mla_decode_metadata(torch.tensor(built_lengths, dtype=torch.int32, device=device), 2, **kw)
    assert built.programs[:, 2].max().item() >= len(now)  # (the point: it names sequences past the call's)
    stale = schedule.DecodeSchedule(built.programs, built.sequences[:len(now)], len(now), built.block_m,
                                    built.block_n, built.num_programs, schedule.part_slot_bound(len(now), 3))
    out = mla_kernels.mla_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE, metadata=stale)
    assert not out.isnan().any(), "rows left unwritten"
    own = mla_kernels.mla_decode_metadata(seqlens, 2, **kw)
    ref_out, _ = reference.absorbed_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE)
    assert_close("own tables", mla_kernels.mla_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE,
                                                      metadata=own), ref_out, torch.float32)


@pytest.mark.parametrize("change", ["shrunk", "grown-within-tiles", "grown-past-tiles"])
def test_a_schedule_of_other_lengths_never_leaves_rows_unwritten(change, device, poisoned_empty, monkeypatch):
    """A GPU call does not check that ``metadata`` was built from its ``cache_seqlens`` (it would synchronise). A
    schedule kept from another step must then never leave output rows unwritten or write one sequence's piece into
    another's partial slot (the kernel decided "cut" from the lengths, the combine from the table: a sequence
    whose length grew past its program's last tile went to slot 0, another sequence's, and its own output was never
    written). Shrunk lengths, and lengths grown within their last tile, are then still exact."""
    monkeypatch.setattr(decode_mod, "_check_metadata_lengths", lambda *a: None)  # as on a GPU
    built = [128, 64, 300, 64, 0]  # 64-token tiles: 2, 1, 5, 1, 0 over 3 programs cuts sequence 2
    now = {"shrunk": [100, 10, 150, 1, 0], "grown-within-tiles": [120, 63, 290, 60, 0],
           "grown-past-tiles": [129, 65, 301, 65, 0]}[change]
    if change == "grown-within-tiles":
        built = [121, 40, 291, 50, 0]
    q_nope, q_pe, kv_cache, pe_cache, table, seqlens = make_inputs(now, 1, 2, 16, torch.float32, device, r=32, p=16)
    meta = mla_kernels.mla_decode_metadata(torch.tensor(built, dtype=torch.int32, device=device), 2, kv_lora_rank=32,
                                           rope_dim=16, dtype=torch.float32, num_programs=3)
    assert meta.sequences[:, 1].tolist()[2] > 1
    out = mla_kernels.mla_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE, metadata=meta)
    assert not out.isnan().any(), "rows left unwritten (or a partial slot overwritten by another sequence)"
    if change != "grown-past-tiles":
        ref_out, _ = reference.absorbed_decode(q_nope, q_pe, kv_cache, pe_cache, table, seqlens, SCALE)
        assert_close(change, out, ref_out, torch.float32)
