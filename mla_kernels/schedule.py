"""Work scheduling for decode on variable-length batches (FlashMLA's ``get_mla_metadata``, in PyTorch ops).

The batch's work is its cache tiles: sequence ``b`` of ``len_b`` tokens has ``cdiv(len_b, BLOCK_N)`` tiles.
Flatten them in (sequence, tile) order and cut the list into ``P`` contiguous ranges whose sizes differ by at
most one tile, one range per program of a persistent grid. A program's range crosses sequences: it is cut at
sequence ends into *units* ``(sequence, token start, token end)``, with starts on tile boundaries. A sequence
inside one program is *whole* and that program writes its final output; a sequence spread over several
programs is *cut*: each piece writes an fp32 partial and its log-sum-exp, and the combine kernel merges them.

Two implementations of the same schedule:
  - ``schedule_reference`` / ``piece_table``: plain Python over ints, the readable definition;
  - ``build_tables``: torch ops on the device (cumsum, searchsorted), no host synchronisation, so a decode
    step that computes it stays CUDA-graph capturable. ``units_of`` decodes its tables back into units the way
    the kernel walks them; the tests check both agree exactly.

``mla_decode_metadata`` is the public entry: it picks the tile size and grid for a decode call and builds the
tables once per step, for every layer to reuse.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _utils

PROG_FIELDS = ("first_seq", "first_tile", "last_seq", "end_tile")  # columns of DecodeSchedule.programs
SEQ_FIELDS = ("first_slot", "pieces", "first_program")  # columns of DecodeSchedule.sequences
EMPTY_PROGRAM = (0, 0, -1, 0)  # last_seq < first_seq: the kernel's loop over sequences runs zero times


class DecodeSchedule(NamedTuple):
    """Scheduling metadata of one decode step; build it with ``mla_kernels.mla_decode_metadata``.

    ``programs [P, 4]`` int32, per program: ``first_seq, first_tile, last_seq, end_tile``. Program ``p`` walks
    sequences ``first_seq..last_seq``; in the first it starts at tile ``first_tile``, in the last it stops before
    tile ``end_tile``; the sequences between are read whole. An idle program holds ``EMPTY_PROGRAM``.
    ``sequences [B, 3]`` int32, per sequence: ``first_slot`` (where its partials start in the partial buffer when
    it is cut, else 0), ``pieces`` (programs that read it: 0 for a padding slot, 1 when whole) and
    ``first_program`` (the program reading its first tile; 0 for a padding slot). Piece ``k`` of a cut sequence
    is program ``first_program + k``'s and goes to partial slot ``first_slot + k``.
    The Python ints say what the tables were built for; ``mla_decode`` checks them against its call.
    """

    programs: torch.Tensor
    sequences: torch.Tensor
    batch: int
    block_m: int
    block_n: int
    num_programs: int
    num_part_slots: int  # bound on the partial slots any lengths can need: (P - 1) + min(B, P - 1), at least 1

    @property
    def device(self) -> torch.device:
        return self.programs.device


# ------------------------------------------------------------------------------------------------
# the definition: plain Python
# ------------------------------------------------------------------------------------------------


def program_loads(total_tiles: int, num_programs: int) -> list[int]:
    """Tiles per program: the first ``total % P`` programs take one more than the others."""
    base, rem = divmod(total_tiles, num_programs)
    return [base + (p < rem) for p in range(num_programs)]


def schedule_reference(lengths, block_n: int, num_programs: int) -> list[list[tuple[int, int, int]]]:
    """Units ``(sequence, token start, token end)`` of each of ``num_programs`` programs.

    The (sequence, tile) order is cut into ranges of ``program_loads`` tiles; a range is cut at sequence ends.
    Every token of every sequence is in exactly one unit, no unit is empty, a zero-length sequence has none.
    """
    tiles = [_utils.cdiv(n, block_n) for n in lengths]
    units, seq, done = [], 0, 0  # done: tiles of sequence `seq` already given out
    for load in program_loads(sum(tiles), num_programs):
        mine = []
        while load:
            while done == tiles[seq]:
                seq, done = seq + 1, 0
            take = min(load, tiles[seq] - done)
            mine.append((seq, done * block_n, min((done + take) * block_n, lengths[seq])))
            done, load = done + take, load - take
        units.append(mine)
    return units


def piece_table(units, batch: int) -> list[tuple[int, int, int]]:
    """Per sequence ``(first_slot, pieces, first_program)`` from ``schedule_reference``'s units.

    Cut sequences (more than one piece) get consecutive partial slots in sequence order."""
    programs = [[] for _ in range(batch)]
    for p, mine in enumerate(units):
        for seq, _, _ in mine:
            programs[seq].append(p)
    table, slot = [], 0
    for progs in programs:
        cut = len(progs) > 1
        table.append((slot if cut else 0, len(progs), progs[0] if progs else 0))
        slot += len(progs) if cut else 0
    return table


MAX_PROGRAMS = _utils.MAX_GRID_YZ  # the scheduled grid's programs are its y dimension


def part_slot_bound(batch: int, num_programs: int) -> int:
    """Partial slots any lengths can need. Each of the P - 1 boundaries between programs cuts at most one
    sequence once, so the cut sequences' pieces number at most (P - 1) + (number cut) <= (P - 1) + min(B, P - 1)."""
    return max(1, (num_programs - 1) + min(batch, num_programs - 1))


# ------------------------------------------------------------------------------------------------
# the device version: torch ops, no host synchronisation
# ------------------------------------------------------------------------------------------------


def build_tables(cache_seqlens: torch.Tensor, block_n: int, num_programs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(programs [P, 4], sequences [B, 3])`` int32 on ``cache_seqlens``'s device (see ``DecodeSchedule``).

    Only shapes are read on the host and no host data is copied in: every value is made on the device, so this
    can run inside a CUDA graph.
    """
    device, batch = cache_seqlens.device, cache_seqlens.shape[0]
    i64 = dict(dtype=torch.int64, device=device)
    if batch == 0:
        programs = torch.zeros(num_programs, len(PROG_FIELDS), dtype=torch.int32, device=device)
        programs[:, 2] = EMPTY_PROGRAM[2]
        return programs, torch.zeros(0, len(SEQ_FIELDS), dtype=torch.int32, device=device)
    tiles = (cache_seqlens.to(torch.int64).clamp(min=0) + block_n - 1) // block_n  # [B]
    ends = torch.cumsum(tiles, 0)  # [B]: flat index one past each sequence's last tile
    starts = ends - tiles
    total = tiles.sum()  # 0-d, on the device
    p = torch.arange(num_programs + 1, **i64)
    bounds = p * (total // num_programs) + torch.minimum(p, total % num_programs)  # [P + 1], program_loads' sums
    lo, hi = bounds[:-1], bounds[1:]  # program p owns flat tiles [lo, hi)

    # the sequence holding a flat tile t is the first whose end is > t
    first_seq = torch.searchsorted(ends, lo, right=True).clamp(max=batch - 1)
    last_seq = torch.searchsorted(ends, hi - 1, right=True).clamp(max=batch - 1)
    busy = hi > lo
    programs = torch.stack([torch.where(busy, column, empty) for column, empty in zip(
        (first_seq, lo - starts[first_seq], last_seq, hi - starts[last_seq]), EMPTY_PROGRAM)], 1)

    # the program holding a flat tile t is the first whose end is > t (idle programs all come last)
    has = tiles > 0
    first_prog = torch.searchsorted(hi, starts, right=True)
    last_prog = torch.searchsorted(hi, ends - 1, right=True)
    pieces = torch.where(has, last_prog - first_prog + 1, 0)
    cut_pieces = torch.where(pieces > 1, pieces, 0)
    first_slot = torch.where(pieces > 1, torch.cumsum(cut_pieces, 0) - cut_pieces, 0)
    sequences = torch.stack([first_slot, pieces, torch.where(has, first_prog, 0)], 1)
    return programs.to(torch.int32), sequences.to(torch.int32)


def units_of(schedule: DecodeSchedule, cache_seqlens) -> list[list[tuple[int, int, int]]]:
    """The units each program of ``schedule`` walks, decoded on the host exactly as the kernel walks its table
    (reads the tables back: for tests and debugging, never in a decode step)."""
    lengths = [int(n) for n in torch.as_tensor(cache_seqlens).tolist()]
    bn = schedule.block_n
    units = []
    for first_seq, first_tile, last_seq, end_tile in schedule.programs.tolist():
        mine = []
        for seq in range(first_seq, last_seq + 1):
            n_tiles = _utils.cdiv(lengths[seq], bn)
            t0 = first_tile if seq == first_seq else 0
            t1 = end_tile if seq == last_seq else n_tiles
            if t1 > t0:
                mine.append((seq, t0 * bn, min(t1 * bn, lengths[seq])))
        units.append(mine)
    return units


# ------------------------------------------------------------------------------------------------
# public entry
# ------------------------------------------------------------------------------------------------


def num_programs_for(batch: int, rows_per_seq: int, block_m: int, block_n: int, max_seqlen_k: int | None,
                     device: torch.device) -> int:
    """Persistent grid size along the keys, from shapes only: as many programs as the GPU runs at once
    (with ``cdiv(rows_per_seq, BLOCK_M)`` row blocks each), as ``_num_splits`` aims its split grid: two per SM
    for small row blocks (memory bound), one for 64-row tiles; and no more than the batch could keep busy
    with ``MIN_SPLIT_TOKENS`` per program (when ``max_seqlen_k`` bounds the lengths)."""
    from .decode import MIN_SPLIT_TOKENS

    m_blocks = _utils.cdiv(rows_per_seq, block_m)
    waves = 1 if block_m >= 64 else 2
    programs = _utils.cdiv(waves * _utils.num_sms(device), m_blocks)
    if max_seqlen_k is not None:
        most_tiles = batch * _utils.cdiv(max_seqlen_k, block_n)
        programs = min(programs, max(batch, batch * max_seqlen_k // MIN_SPLIT_TOKENS), most_tiles)
    return max(1, programs)


def make_schedule(cache_seqlens: torch.Tensor, rows_per_seq: int, d_latent: int, max_seqlen_k: int | None,
                  num_programs: int | None, d_rope: int = 64, elem_bytes: int = 2,
                  kv_fp8: bool = False) -> DecodeSchedule:
    """Unchecked: the tile size ``mla_decode`` would use for this many rows per sequence, widths and query
    element size, the grid, the tables."""
    from .decode import schedule_tiles

    device, batch = cache_seqlens.device, cache_seqlens.shape[0]
    block_m, block_n = schedule_tiles(rows_per_seq, d_latent, device, d_rope, elem_bytes, kv_fp8)
    if num_programs is None:
        num_programs = num_programs_for(batch, rows_per_seq, block_m, block_n, max_seqlen_k, device)
    programs, sequences = build_tables(cache_seqlens, block_n, num_programs)
    return DecodeSchedule(programs, sequences, batch, block_m, block_n, num_programs,
                          part_slot_bound(batch, num_programs))


def retile(schedule: DecodeSchedule, cache_seqlens: torch.Tensor, block_m: int, block_n: int) -> DecodeSchedule:
    """``schedule`` cut again for other tiles (same grid), from the same ``cache_seqlens``, on the device: for a
    launch whose stored config was dropped after the schedule was built for its tiles."""
    programs, sequences = build_tables(cache_seqlens, block_n, schedule.num_programs)
    return schedule._replace(programs=programs, sequences=sequences, block_m=block_m, block_n=block_n)


def to_op_args(metadata: DecodeSchedule | None):
    """``metadata`` as custom-op arguments: ``((programs, sequences) | (None, None), [ints] | None)``."""
    if metadata is None:
        return (None, None), None
    return (metadata.programs, metadata.sequences), [metadata.batch, metadata.block_m, metadata.block_n,
                                                     metadata.num_programs, metadata.num_part_slots]


def from_op_args(programs, sequences, sizes) -> DecodeSchedule | None:
    """The inverse of ``to_op_args``. A direct call of the custom op passes all three or none (one alone failed with
    an AttributeError or a TypeError naming none of them)."""
    given = (programs is not None, sequences is not None, sizes is not None)
    if not any(given):
        return None
    if not all(given):
        raise ValueError("sched_programs, sched_sequences and sched_sizes are a DecodeSchedule taken apart "
                         "(schedule.to_op_args): pass all three or none")
    if len(sizes) != len(DecodeSchedule._fields) - 2:
        raise ValueError(f"sched_sizes must hold the {len(DecodeSchedule._fields) - 2} ints "
                         f"{DecodeSchedule._fields[2:]}, got {len(sizes)}")
    return DecodeSchedule(programs, sequences, *sizes)


def _positive_int(name: str, value) -> int:
    if value is None:
        raise ValueError(f"{name} must be a positive int, got None")
    return _utils.check_int(name, value, 1)


def mla_decode_metadata(cache_seqlens, num_heads: int, s_q: int = 1, *, kv_lora_rank: int = 512,
                        max_seqlen_k: int | None = None, num_programs: int | None = None, rope_dim: int = 64,
                        dtype: torch.dtype = torch.bfloat16, cache_dtype: torch.dtype | None = None) -> DecodeSchedule:
    """Scheduling metadata for ``mla_decode(..., metadata=...)``: compute once per decode step, reuse in every layer.

    Args:
        cache_seqlens: ``[B]`` int32 (or int64) tokens cached per sequence, as passed to ``mla_decode``;
            0 marks a padding slot.
        num_heads: query heads ``H``; ``s_q``: new tokens per sequence. With ``kv_lora_rank`` (the latent width
            ``R``), ``rope_dim`` (``P``) and the query ``dtype`` they fix the kernel's tiles, which the schedule
            cuts along (fp32 queries above 16 rows per sequence take smaller tiles, to fit shared memory);
            ``cache_dtype``: ``torch.float8_e4m3fn`` for an fp8 cache, else None (the queries' dtype).
        max_seqlen_k: optional bound on ``cache_seqlens``; lets a small batch use fewer programs.
        num_programs: force the grid size (default: sized to the GPU from shapes only).

    Returns a ``DecodeSchedule``. The work (each sequence's length in tiles, summed) is split into
    ``num_programs`` contiguous shares that differ by at most one tile. Computed on ``cache_seqlens``' device
    without synchronising with the host, so it can be captured in a CUDA graph with the decode step. The values
    of ``cache_seqlens`` passed to ``mla_decode`` must be the ones it was built from: on the CPU that is checked,
    on a GPU it is not (it would synchronise).
    """
    _utils.check_tensor("cache_seqlens", cache_seqlens, 1, _utils.INDEX_DTYPES)
    _utils.check_last_contiguous("cache_seqlens", cache_seqlens)  # (as mla_decode, which refused what this took)
    num_heads, s_q = _positive_int("num_heads", num_heads), _positive_int("s_q", s_q)
    kv_lora_rank = _positive_int("kv_lora_rank", kv_lora_rank)
    rope_dim = _utils.check_int("rope_dim", rope_dim, 0, none_ok=False)  # (0: no rotary part)
    _utils.check_width("kv_lora_rank", kv_lora_rank)
    _utils.check_rope_width("rope_dim", rope_dim)
    if dtype in _utils.FP8_DTYPES:  # as mla_decode's fp8 query: both a bad combination and a wrong dtype
        raise _utils.Fp8MisuseError(f"dtype is the queries' dtype, never fp8 (got {dtype!r}); for an fp8 cache pass "
                                    "cache_dtype=torch.float8_e4m3fn")
    if dtype not in _utils.FLOAT_DTYPES:
        raise TypeError(f"dtype must be the queries' dtype, one of {_utils.FLOAT_DTYPES}, got {dtype!r}")
    if cache_dtype is not None and cache_dtype not in _utils.FLOAT_DTYPES + _utils.FP8_DTYPES:
        raise TypeError(f"cache_dtype must be None or the cache's dtype, one of "
                        f"{_utils.FLOAT_DTYPES + _utils.FP8_DTYPES}, got {cache_dtype!r}")
    max_seqlen_k = _utils.check_int("max_seqlen_k", max_seqlen_k, 0)
    num_programs = _utils.check_int("num_programs", num_programs, 1)
    if num_programs is not None and num_programs > MAX_PROGRAMS:
        raise ValueError(f"num_programs must be at most {MAX_PROGRAMS} (a CUDA grid's y dimension), got {num_programs}")
    # value checks are free on the CPU (not while dynamo traces: the values are data-dependent there, as on a GPU)
    if cache_seqlens.device.type == "cpu" and cache_seqlens.numel() and not torch.compiler.is_compiling():
        lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
        if lo < 0:
            raise ValueError(f"cache_seqlens must be >= 0, got {lo}")
        if max_seqlen_k is not None and hi > max_seqlen_k:
            raise ValueError(f"cache_seqlens has a length {hi} above max_seqlen_k={max_seqlen_k}")
    return make_schedule(cache_seqlens, s_q * num_heads, kv_lora_rank, max_seqlen_k, num_programs, rope_dim,
                         torch.empty((), dtype=dtype).element_size(), cache_dtype in _utils.FP8_DTYPES)
