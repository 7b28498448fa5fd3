"""FlashMLA's Python decode interface over mla_kernels' kernels, for serving code written against FlashMLA.

``get_mla_metadata`` and ``flash_mla_with_kvcache`` take the arguments of FlashMLA's ``flash_mla`` package
(deepseek-ai/FlashMLA, ``flash_mla_interface.py``: the form of 2025-09 on, whose ``get_mla_metadata`` takes no
arguments that matter and returns ``(metadata, None)``; the older calls, with the metadata's arguments and a
``num_splits`` that is passed back, are taken too) and return what it returns, so code that calls FlashMLA runs
where FlashMLA does not: other GPUs than Hopper/Blackwell, ROCm, the CPU, any page size, any head count::

    from mla_kernels.integrations.flash_mla import flash_mla_with_kvcache, get_mla_metadata

    meta, num_splits = get_mla_metadata()   # FlashMLA's current interface: (metadata, None); older: below
    out, lse = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512, meta, num_splits, causal=True)

Layouts, as FlashMLA has them (MQA mode: one key-value head holding the latent and the rope key side by side):

- ``q [B, S_q, H, D]``: the absorbed query, ``D = head_dim_v + rope width`` (576 for DeepSeek: 512 + 64; ``D =
  head_dim_v`` for MLA without a rotary part, GLM-5.3-Flash's, which FlashMLA itself does not take);
- ``k_cache [num_blocks, page, H_k, D]`` in the query's dtype, or with ``is_fp8_kvcache`` DeepSeek's FP8 rows
  (``[num_blocks, page, H_k, 656]`` bytes at DeepSeek's widths: 512 e4m3 values, 4 fp32 scales, 64 bf16 rope
  values; the layout ``mla_kernels.fp8_latent_cache`` allocates), as uint8 or float8_e4m3fn. ``H_k = 1`` is MLA's
  (MQA mode); with more key-value heads, as FlashMLA takes, each serves ``H / H_k`` consecutive query heads, one
  ``mla_decode`` call per key-value head;
- returns ``out [B, S_q, H, head_dim_v]`` in the query's dtype and ``lse [B, H, S_q]`` float32 (natural log;
  a token that sees no key gets zeros and, as in FlashMLA, lse +inf, where ``mla_decode`` says -inf).

``causal`` defaults to False, as in FlashMLA (``mla_decode``'s default is True): without it every new token sees
the whole ``cache_seqlens[b]``. With ``indices [B, S_q, topk]`` (sparse attention, ``causal`` False) an entry is a
slot of the whole cache, ``block id * page + offset``, and -1 (or, as FlashMLA documents, any number at or past the
cache's slot count) is skipped; ``block_table`` and ``cache_seqlens`` are then not read. ``topk_length [B]``
keeps each row's first ``topk_length[b]`` entries only (none for a length <= 0, all for one past ``topk``: read on
the device, never checked, as the indices are not), and ``attn_sink [H]`` (float32) scales the output by
``exp(lse) / (exp(lse) + exp(attn_sink))`` without changing the returned lse; both may be on another device than
``q`` (moved at each call), except in host memory while a CUDA graph is captured. A bf16 sparse cache is taken
too (FlashMLA's sparse decode wants FP8). Not taken (a ``ValueError``): ``extra_k_cache`` and its indices and
lengths, and the FP8-query ``descale_q``/``descale_k`` of some forks.

Differences a FlashMLA caller can meet: on the CPU a causal call's ``cache_seqlens[b]`` between 1 and ``S_q - 1``
is refused (``mla_decode``'s check; FlashMLA, and these kernels on a GPU, give its tokens before the first key zeros
and lse +inf; without ``causal`` every token sees the whole cache, on every device); FlashMLA's other FP8 layout (448 + 64 wide, e8m0 scales at
the end of each block) is refused by its width. Under ``torch.compile(fullgraph=True)`` a metadata mismatch surfaces
as dynamo's ``Unsupported`` (an exception while tracing), not as the ``ValueError`` an eager call raises.

The work is ``mla_kernels.mla_decode``'s. Given the metadata (as FlashMLA's callers pass it), a dense call runs
``mla_decode``'s scheduled grid: the first call with that metadata builds a ``DecodeSchedule`` from its
``cache_seqlens`` on the device (``mla_decode_metadata``: no host read, so CUDA graphs can capture it), which later
calls reuse, as FlashMLA's first call builds its tile scheduler's. Its grid is sized to the GPU from the real
lengths; the uniform split (without metadata) is sized from the block table's width, which a serving engine
allocates for its longest context (a few long splits then do all the work). As in FlashMLA, the metadata serves
one step's calls: calls with other shapes are refused, and other ``cache_seqlens`` values are refused on the CPU
and undefined on a GPU (rows are still all written, and nothing past the call's tensors is read or written, also
where metadata built for more sequences serves a smaller batch without ``copy_``); call ``get_mla_metadata`` again
each step.

Called with the older interface's arguments (``cache_seqlens``, query tokens per key head, key heads, ...; vLLM
passes them to the current one too), ``get_mla_metadata`` builds the step's schedule at once, on the device from
``cache_seqlens``, and returns FlashMLA's ``num_splits`` tensor beside it. Serving engines that keep CUDA-graph
buffers (SGLang's FlashMLA backend: ``buffer.copy_(meta)``, ``splits_buffer[:bs + 1].copy_(num_splits)``) refresh
such metadata in place with ``FlashMLAMetadata.copy_``; it serves calls of any batch up to its own. The schedule is
cut for DeepSeek's widths (512 + 64, bf16), which that interface assumes; a call whose widths or dtype cut the keys
into other tiles builds its own tables for the same grid. As with FlashMLA, the metadata must come from the call's
``cache_seqlens`` and ``S_q * H``. The metadata is no tensor: a caller that copies it into an int32 buffer of its
own (older vLLM releases' ``[num_sms, 8]``) is not served. Speed is
``mla_decode``'s, not FlashMLA's: see the README's measurements.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from .. import _utils
from ..cache import _fp8_views, _row_bytes
from ..decode import mla_decode, schedule_tiles
from ..merge import apply_sink
from ..schedule import MAX_PROGRAMS, DecodeSchedule, build_tables, mla_decode_metadata, part_slot_bound

__all__ = ["FlashMLAMetadata", "FlashMLASchedMeta", "get_mla_metadata", "flash_mla_with_kvcache"]

_FP8_BYTE_DTYPES = (torch.uint8, torch.int8, torch.float8_e4m3fn)
_DEEPSEEK_R, _DEEPSEEK_P = 512, 64  # the widths FlashMLA's older get_mla_metadata implies (it is not told them)


class FlashMLAConfig(NamedTuple):
    """The shapes a metadata's first call bound it to, under FlashMLA's names (``FlashMLASchedMeta.Config``)."""
    b: int
    s_q: int
    h_q: int
    page_block_size: int
    h_k: int
    causal: bool
    is_fp8_kvcache: bool
    topk: int | None
    extra_page_block_size: int | None = None
    extra_topk: int | None = None


@dataclasses.dataclass
class FlashMLAMetadata:
    """What ``get_mla_metadata`` returns.

    Without arguments (FlashMLA's current interface) it starts empty: the first dense call given it builds the
    step's ``schedule`` from its ``cache_seqlens`` and binds it to the call's shapes (``config``), which every later
    call given it must repeat (batch, S_q, heads, page size, ``causal``, FP8, top-k), as in FlashMLA.

    With FlashMLA's older arguments the ``schedule`` is built then, from the lengths given (``from_lengths``).
    Calls of any batch up to the one it was built for take it (a CUDA-graph buffer serves every smaller batch),
    and ``copy_`` refreshes its tables in place, as that interface's callers copy its tensors."""
    config: FlashMLAConfig | None = None
    schedule: DecodeSchedule | None = None  # the dense calls' work split (mla_decode_metadata)
    from_lengths: bool = False

    # FlashMLASchedMeta's fields, for code that reads them
    @property
    def have_initialized(self) -> bool:
        """A call has run with this metadata (its shapes are bound), or it was built from lengths."""
        return self.config is not None or self.from_lengths

    @property
    def tile_scheduler_metadata(self) -> torch.Tensor | None:
        """The schedule's per-program table (``DecodeSchedule.programs``; FlashMLA's has its own layout), or None."""
        return None if self.schedule is None else self.schedule.programs

    @property
    def num_splits(self) -> torch.Tensor | None:
        """FlashMLA's ``num_splits [B + 1]`` int32 (0, then each sequence's running count of pieces), or None."""
        return None if self.schedule is None else _num_splits(self.schedule)

    def copy_(self, other: FlashMLAMetadata) -> FlashMLAMetadata:
        """Copy ``other``'s tables into this metadata's, in place, and return it: the CUDA-graph buffer pattern of
        FlashMLA's older interface (``buffer.copy_(get_mla_metadata(cache_seqlens, ...)[0])`` before each capture
        and replay; SGLang's FlashMLA backend). Both must come from ``get_mla_metadata`` with arguments, for the
        same grid (query rows in the same number of 64-row blocks, as FlashMLA's parts), ``other``'s batch no larger
        than this one's; the tables' key tiles come with them (a decode step's and a verify step's differ)."""
        if not isinstance(other, FlashMLAMetadata):
            raise TypeError(f"copy_ takes a FlashMLAMetadata from get_mla_metadata, got {type(other).__name__}")
        if not (self.from_lengths and other.from_lengths):
            raise ValueError("copy_ copies metadata built from lengths: get_mla_metadata(cache_seqlens, "
                             "num_q_tokens_per_head_k, num_heads_k, ...) for both")
        mine, theirs = self.schedule, other.schedule
        if mine.num_programs != theirs.num_programs or theirs.batch > mine.batch:
            raise ValueError(f"copy_ needs metadata of the same grid, for no more sequences: this one has "
                             f"{mine.num_programs} programs and {mine.batch} sequences, the other "
                             f"{theirs.num_programs} and {theirs.batch} (its grid follows the query rows in blocks "
                             "of 64, S_q * H, as FlashMLA's does)")
        mine.programs.copy_(theirs.programs)
        mine.sequences[:theirs.batch].copy_(theirs.sequences)
        # the tiles the copied tables were cut along: a buffer serving two row counts (decode and verify) takes
        # each one's before the graph captured for it replays
        self.schedule = mine._replace(block_m=theirs.block_m, block_n=theirs.block_n)
        return self


def get_mla_metadata(*args, **kwargs) -> tuple[FlashMLAMetadata, torch.Tensor | None]:
    """``(FlashMLAMetadata(), None)``: pass both to ``flash_mla_with_kvcache`` (as ``tile_scheduler_metadata`` and
    ``num_splits``). Nothing is computed: the first call given the metadata builds the step's schedule.

    With the arguments of FlashMLA's older interface, ``get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k,
    num_heads_k, num_heads_q=None, is_fp8_kvcache=False, topk=None)`` (which vLLM still passes to the current
    one), the schedule is built here, on the device with no host sync, for DeepSeek's widths (512 + 64, bf16: that
    interface is not told them; a call whose widths or dtype cut other key tiles builds its own tables). The
    second result is then FlashMLA's ``num_splits [B + 1]`` int32 (0, then each sequence's running count of
    pieces), which the calls may pass back or not. ``num_q_tokens_per_head_k`` is the query rows of one key-value
    head, ``S_q * H / H_k`` (``S_q * H`` with MLA's one); the calls must repeat these ``cache_seqlens`` values
    (checked on the CPU), as with FlashMLA.
    FlashMLA's first name for it, ``num_heads_per_head_k``, is taken too; arguments of no form known here are
    taken and not read, as FlashMLA's current interface takes any."""
    if "num_heads_per_head_k" in kwargs and "num_q_tokens_per_head_k" not in kwargs:  # FlashMLA's first name
        kwargs["num_q_tokens_per_head_k"] = kwargs.pop("num_heads_per_head_k")
    bound = _bind_from_lengths(args, kwargs)
    if bound is None:  # no arguments, or none of a form known here: taken and not read, as FlashMLA's current
        return FlashMLAMetadata(), None  # interface takes any ("to be compatible with the old interface")
    return _from_lengths(**bound)


_FROM_LENGTHS_ARGS = ("cache_seqlens", "num_q_tokens_per_head_k", "num_heads_k", "num_heads_q", "is_fp8_kvcache",
                      "topk")  # _from_lengths' parameters, the first three required


def _bind_from_lengths(args: tuple, kwargs: dict) -> dict | None:
    """``_from_lengths``' arguments by name, or None where the call does not fit its signature (as
    ``inspect.Signature.bind`` would refuse it; written out since torch 2.6's dynamo cannot trace ``bind``)."""
    if len(args) > len(_FROM_LENGTHS_ARGS) or any(name not in _FROM_LENGTHS_ARGS for name in kwargs):
        return None
    bound = dict(zip(_FROM_LENGTHS_ARGS, args))
    if any(name in bound for name in kwargs):  # given twice
        return None
    bound.update(kwargs)
    return bound if all(name in bound for name in _FROM_LENGTHS_ARGS[:3]) else None


def _from_lengths(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_heads_q=None, is_fp8_kvcache=False,
                  topk=None) -> tuple[FlashMLAMetadata, torch.Tensor]:
    """``get_mla_metadata`` with FlashMLA's older arguments."""
    cache_seqlens = _utils.check_tensor("cache_seqlens", cache_seqlens, 1, _utils.INDEX_DTYPES)
    tokens = _utils.check_int("num_q_tokens_per_head_k", num_q_tokens_per_head_k, 1)
    heads_k = _utils.check_int("num_heads_k", num_heads_k, 1)
    if tokens is None or heads_k is None:
        raise ValueError("num_q_tokens_per_head_k and num_heads_k must be positive ints (S_q * H, and 1 for MLA)")
    _utils.check_int("num_heads_q", num_heads_q, 1)
    _utils.check_int("topk", topk, 1)
    fp8 = _utils.check_flag("is_fp8_kvcache", is_fp8_kvcache)
    rows = tokens  # each key-value head's call (flash_mla_with_kvcache runs one per head)
    # the grid from the 64-row blocks the rows take, as FlashMLA sizes its parts, so that every row count up to 64
    # (16 heads' decode and their 2-4 token verify, say) gets one grid and one CUDA-graph buffer takes either's
    # copy_: two programs per SM there, as mla_decode_metadata gives 16-row tiles (and the 64-row tiles of 17-64
    # rows get twice their one wave); one per SM per block above, as it gives 64-row tiles
    waves = 2 if rows <= 64 else 1
    programs = min(MAX_PROGRAMS, max(1, _utils.cdiv(waves * _utils.num_sms(cache_seqlens.device),
                                                    _utils.cdiv(rows, 64))))
    schedule = mla_decode_metadata(cache_seqlens, rows, 1, kv_lora_rank=_DEEPSEEK_R, rope_dim=_DEEPSEEK_P,
                                   cache_dtype=torch.float8_e4m3fn if fp8 else None, num_programs=programs)
    return FlashMLAMetadata(schedule=schedule, from_lengths=True), _num_splits(schedule)


def _num_splits(schedule: DecodeSchedule) -> torch.Tensor:
    """FlashMLA's ``num_splits [B + 1]`` int32 for ``schedule``: 0, then each sequence's running count of pieces."""
    pieces = schedule.sequences[:, 1].cumsum(0, dtype=torch.int32)
    return torch.cat([pieces.new_zeros(1), pieces])


FlashMLASchedMeta = FlashMLAMetadata  # FlashMLA's name for it


def _schedule_from_lengths(meta: FlashMLAMetadata, num_splits, cache_seqlens, batch: int, rows: int, dim_v: int,
                           rope_dim: int, elem_bytes: int, fp8: bool, device) -> DecodeSchedule:
    """The call's ``DecodeSchedule`` from metadata ``get_mla_metadata`` built from lengths: its tables (the first
    ``batch`` sequences') where the call cuts the keys into the same tiles; else the call's own tables for the same
    grid, built from ``cache_seqlens`` on the device. On the CPU the metadata's tables are checked against
    ``cache_seqlens`` first, whichever are used (a ValueError; inside compiled code a RuntimeError, from the
    graph's device assertion)."""
    built = meta.schedule
    if batch > built.batch:
        raise ValueError(f"tile_scheduler_metadata was built for {built.batch} sequences, the call has {batch}")
    if built.programs.device != device:  # (not its device property, which torch 2.6's dynamo cannot trace)
        raise ValueError(f"tile_scheduler_metadata is on {built.programs.device}, q on {device}")
    if num_splits is not None:  # FlashMLA's, passed back: not read, but it must be this call's
        num_splits = _utils.check_tensor("num_splits", num_splits, 1, (torch.int32,))
        _utils.check_same("num_splits", num_splits.shape[0], "q (its B + 1)", batch + 1)
    block_m, block_n = schedule_tiles(rows, dim_v, device, rope_dim, elem_bytes, fp8)
    grid = built.num_programs
    check = device.type == "cpu"  # as mla_decode checks a schedule's tables
    if check or block_n != built.block_n:  # (the lengths are read)
        cache_seqlens = _utils.check_tensor("cache_seqlens", cache_seqlens, 1, _utils.INDEX_DTYPES)
    if check:
        step = build_tables(cache_seqlens, built.block_n, grid)
        stale = "tile_scheduler_metadata was built from other cache_seqlens than the ones passed"
        if torch.compiler.is_compiling():
            # traced, the values are the graph's: a device assertion, raised (RuntimeError) when the graph runs.
            # (Skipped, a call whose tiles differ from the metadata's, which builds its own tables, took stale
            # metadata silently: mla_decode's own check in the op sees only the call's tables.)
            same = (step[0] == built.programs).all() & (step[1] == built.sequences[:batch]).all()
            torch._assert_async(same, stale)
        elif not (torch.equal(step[0], built.programs) and torch.equal(step[1], built.sequences[:batch])):
            raise ValueError(stale)
    if block_n == built.block_n:
        programs, sequences = built.programs, built.sequences[:batch]
    else:
        programs, sequences = build_tables(cache_seqlens, block_n, grid)
    return DecodeSchedule(programs, sequences, batch, block_m, block_n, grid, part_slot_bound(batch, grid))


def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata=None,
                           num_splits=None, softmax_scale=None, causal=False, is_fp8_kvcache=False, indices=None,
                           attn_sink=None, extra_k_cache=None, extra_indices_in_kvcache=None, topk_length=None,
                           extra_topk_length=None, descale_q=None, descale_k=None):
    """FlashMLA's ``flash_mla_with_kvcache`` (module docstring): ``(out [B, S_q, H, head_dim_v], lse [B, H, S_q])``."""
    for name, value in (("extra_k_cache", extra_k_cache), ("extra_indices_in_kvcache", extra_indices_in_kvcache),
                        ("extra_topk_length", extra_topk_length), ("descale_q", descale_q),
                        ("descale_k", descale_k)):
        if value is not None:
            raise ValueError(f"{name} is not supported by mla_kernels' FlashMLA interface (pass None)")
    if tile_scheduler_metadata is not None and not isinstance(tile_scheduler_metadata, FlashMLAMetadata):
        raise TypeError(f"tile_scheduler_metadata must be what mla_kernels' get_mla_metadata returned (or None), "
                        f"got {type(tile_scheduler_metadata).__name__}")
    from_lengths = tile_scheduler_metadata is not None and tile_scheduler_metadata.from_lengths
    if num_splits is not None and not from_lengths:
        raise ValueError("num_splits must be None (what get_mla_metadata returned without arguments): mla_decode "
                         "sizes its own splits")
    causal = _utils.check_flag("causal", causal)
    is_fp8 = _utils.check_flag("is_fp8_kvcache", is_fp8_kvcache)
    q = _utils.check_tensor("q", q, 4, _utils.FLOAT_DTYPES)
    _utils.check_last_contiguous("q", q)  # (named here: mla_decode would name its views q_nope, kv_cache, pe_cache)
    k_cache = _utils.check_tensor("k_cache", k_cache, 4)
    _utils.check_no_grad("flash_mla_with_kvcache", q=q, k_cache=k_cache)  # (the same: named as the caller passed)
    dim_v = _utils.check_int("head_dim_v", head_dim_v, 1)
    if dim_v is None:
        raise ValueError("head_dim_v must be an int >= 1 (the latent width, 512 for DeepSeek), got None")
    if dim_v > q.shape[-1]:
        raise ValueError(f"head_dim_v ({dim_v}) must be at most q's last dimension ({q.shape[-1]}): the query is "
                         f"the latent part (head_dim_v wide) and then the rope part (none where they are equal: MLA "
                         f"without a rotary part)")
    rope_dim = q.shape[-1] - dim_v
    # named as the caller passed them (mla_decode would name its kv_cache / pe_cache views)
    _utils.check_width("head_dim_v (the latent)", dim_v)
    _utils.check_rope_width("q's rope part (q.shape[-1] - head_dim_v)", rope_dim)
    _utils.check_devices(q=q, k_cache=k_cache)
    views = _cache_views(k_cache, q, dim_v, rope_dim, is_fp8)  # (kv_cache, kv_scale, pe_cache) per key-value head
    kv_cache = views[0][0]
    batch, s_q, heads = q.shape[:3]
    heads_k = len(views)
    # named as passed too: mla_decode would name q's views (q_nope) in each of these
    if s_q == 0:
        raise ValueError("q must have at least one query token (S_q >= 1)")
    if heads == 0:
        raise ValueError("q must have at least one head")
    if heads % heads_k:
        raise ValueError(f"q's {heads} heads must be a multiple of k_cache's {heads_k} key-value heads (each serves "
                         f"H / H_k consecutive query heads, as in FlashMLA)")
    group = heads // heads_k
    if not torch.compiler.is_compiling():  # (traced, meta tensors are shapes the custom op's fake serves)
        _utils.check_has_data("q", q)
    topk = None if indices is None else _utils.check_tensor("indices", indices, 3, _utils.INDEX_DTYPES).shape[-1]
    config = FlashMLAConfig(batch, s_q, heads, k_cache.shape[1], heads_k, causal, is_fp8, topk)
    if not from_lengths:
        _check_metadata(tile_scheduler_metadata, config)  # (recorded below, once the call has been accepted)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale

    if indices is not None:  # whole-cache slots: one "sequence" per token holding every block, in order
        if causal:
            raise ValueError("causal must be False with indices (sparse attention), as in FlashMLA")
        slots = kv_cache.shape[0] * kv_cache.shape[1]
        _utils.check_same("indices", tuple(indices.shape[:2]), "q", (batch, s_q), "[B, S_q]")
        indices = _keep_first(indices, topk_length, batch)
        if indices.device.type == "cpu":  # an entry at or past the slots is invalid, skipped as -1 is (FlashMLA's
            # rule; the GPU kernels skip entries past a sequence's length, here the slot count, by themselves, and
            # mla_decode refuses them on the CPU)
            indices = torch.where(indices >= slots, indices.new_full((), -1), indices)
        # each token its own sequence of S_q = 1 (not causal, so nothing depends on its position): a cache of fewer
        # slots than S_q is no "length below S_q" to mla_decode, which would refuse it
        q = q.reshape(batch * s_q, 1, heads, q.shape[-1])
        indices = indices.reshape(batch * s_q, 1, indices.shape[-1])
        block_table = torch.arange(kv_cache.shape[0], dtype=torch.int32, device=q.device).expand(batch * s_q, -1)
        cache_seqlens = torch.full((batch * s_q,), slots, dtype=torch.int32, device=q.device)
        max_seqlen_k = slots
    else:
        if topk_length is not None:
            raise ValueError("topk_length is only taken with indices (sparse attention)")
        block_table = _utils.check_tensor("block_table", block_table, 2, _utils.INDEX_DTYPES)
        _utils.check_same("block_table", block_table.shape[0], "q", batch, "batch size")  # (mla_decode: "q_nope")
        cache_seqlens = _utils.check_tensor("cache_seqlens", cache_seqlens, 1, _utils.INDEX_DTYPES)
        _utils.check_same("cache_seqlens", cache_seqlens.shape[0], "q", batch, "batch size")
        _utils.check_devices(q=q, block_table=block_table, cache_seqlens=cache_seqlens)
        max_seqlen_k = None
    if attn_sink is not None:  # checked before anything is launched, as every other argument
        attn_sink = _check_sink(attn_sink, heads)
        _check_has_data_beside("attn_sink", attn_sink, q.device)
    if indices is not None:  # named against q (mla_decode: q_nope), after attn_sink as before
        _utils.check_devices(q=q, indices=indices)
    schedule = None
    if from_lengths and indices is None:
        schedule = _schedule_from_lengths(tile_scheduler_metadata, num_splits, cache_seqlens, batch, s_q * group,
                                          dim_v, rope_dim, q.element_size(), is_fp8, q.device)
    elif tile_scheduler_metadata is not None and indices is None:  # FlashMLA's tile scheduler: the step's split
        schedule = tile_scheduler_metadata.schedule or mla_decode_metadata(
            cache_seqlens, group, s_q, kv_lora_rank=dim_v, rope_dim=rope_dim, dtype=q.dtype,
            cache_dtype=kv_cache.dtype if is_fp8 else None)
    parts = []
    for g, (kv_cache, kv_scale, pe_cache) in enumerate(views):  # one call per key-value head (MLA has one)
        q_g = q if heads_k == 1 else q[:, :, g * group:(g + 1) * group]
        parts.append(mla_decode(q_g[..., :dim_v], q_g[..., dim_v:], kv_cache, pe_cache, block_table, cache_seqlens,
                                scale, causal=causal, return_lse=True, max_seqlen_k=max_seqlen_k, kv_scale=kv_scale,
                                indices=indices, metadata=schedule))
    out, lse = parts[0] if heads_k == 1 else (torch.cat([o for o, _ in parts], 2), torch.cat([s for _, s in parts], 2))
    if indices is not None:  # back to [B, S_q, ...]
        out, lse = out.view(batch, s_q, heads, out.shape[-1]), lse.view(batch, s_q, heads)  # (-1: none if B is 0)
    if attn_sink is not None:
        out = apply_sink(out, lse, attn_sink)
    if tile_scheduler_metadata is not None and not from_lengths and tile_scheduler_metadata.config is None:
        # recorded once a call has been accepted: a refused call leaves the metadata as it was (FlashMLA's order)
        tile_scheduler_metadata.config, tile_scheduler_metadata.schedule = config, schedule
    # FlashMLA's mark of a token that saw no key, +inf where mla_decode says -inf: one elementwise kernel (where and
    # eq took two), every other value kept (a NaN as NaN, +inf as +inf)
    inf = float("inf")
    lse = torch.nan_to_num(lse, nan=float("nan"), posinf=inf, neginf=inf)
    return out, lse.transpose(1, 2).contiguous()


def _cache_views(k_cache: torch.Tensor, q: torch.Tensor, dim_v: int, rope_dim: int, is_fp8: bool) -> list[tuple]:
    """FlashMLA's ``k_cache [num_blocks, page, H_k, D]`` (checked against ``q``) as ``mla_decode``'s ``(kv_cache,
    kv_scale, pe_cache)`` views, one per key-value head: the latent and rope parts of each row, or with ``is_fp8``
    the FP8 rows' e4m3 latent, fp32 scales and bf16 rope key (``kv_scale`` None otherwise). Errors name ``k_cache``
    and ``q``, as passed."""
    if k_cache.shape[0] == 0 or k_cache.shape[1] == 0 or k_cache.shape[2] == 0:
        raise ValueError(f"k_cache must hold at least one block of at least one token and one key-value head "
                         f"([num_blocks, page, H_k, D]), got shape {tuple(k_cache.shape)}")
    heads = [k_cache[:, :, h] for h in range(k_cache.shape[2])]
    rows = heads[0]
    if is_fp8:
        if k_cache.dtype not in _FP8_BYTE_DTYPES:
            raise TypeError(f"k_cache with is_fp8_kvcache must be uint8 or float8_e4m3fn rows, got {k_cache.dtype}")
        if q.dtype != torch.bfloat16:  # the rows' rope values are bf16 (FlashMLA's layout; its FP8 decode takes bf16)
            raise TypeError(f"q must be bfloat16 with is_fp8_kvcache (the FP8 rows hold their rope part in bf16), "
                            f"got {q.dtype}")
        row_bytes = _row_bytes(dim_v, rope_dim, torch.bfloat16) if dim_v % _utils.FP8_GROUP == 0 else None
        if row_bytes is None or rows.shape[-1] != row_bytes:
            raise ValueError(f"k_cache with is_fp8_kvcache must have rows of {dim_v} e4m3 values, their fp32 scales "
                             f"and {rope_dim} bf16 rope values ({row_bytes} bytes, head_dim_v a multiple of "
                             f"{_utils.FP8_GROUP}), got last dimension {rows.shape[-1]}")
        _utils.check_last_contiguous("k_cache", rows)
        heads = [h.view(torch.uint8) for h in heads]
        for h in heads:
            if h.storage_offset() % 4 or h.stride(0) % 4 or h.stride(1) % 4:
                # the fp32 scales are read in place: torch's view refused (a RuntimeError naming "self")
                raise ValueError(f"k_cache with is_fp8_kvcache must start every row at a multiple of 4 bytes (its "
                                 f"fp32 scales are read in place), got byte offset {h.storage_offset()} and strides "
                                 f"{h.stride()[:2]} for its blocks and rows")
        return [_fp8_views(h, dim_v, torch.bfloat16) for h in heads]
    if rows.shape[-1] != q.shape[-1]:
        raise ValueError(f"k_cache's last dimension ({rows.shape[-1]}) must equal q's ({q.shape[-1]}) "
                         f"(pass is_fp8_kvcache=True for an FP8 cache)")
    if k_cache.dtype != q.dtype:
        raise TypeError(f"k_cache and q disagree on dtype: {k_cache.dtype} vs {q.dtype}"
                        + (" (pass is_fp8_kvcache=True for an FP8 cache)" if k_cache.element_size() == 1 else ""))
    _utils.check_last_contiguous("k_cache", rows)
    return [(h[..., :dim_v], None, h[..., dim_v:]) for h in heads]


def _check_metadata(meta: FlashMLAMetadata | None, config: tuple) -> None:
    """Refuse a call whose shapes differ from those ``meta`` recorded (FlashMLA's rule for reuse). The caller records
    the first call's shapes only once that call has passed every check: FlashMLA refuses causal sparse attention
    before it initializes its metadata, so a refused call cannot bind the metadata to shapes no call ran with."""
    if meta is None or meta.config is None:
        return
    if meta.config != config:
        names = ("batch", "S_q", "heads", "page size", "key-value heads", "causal", "is_fp8_kvcache", "topk",
                 "extra page size", "extra topk")
        diff = ", ".join(f"{n} {a} vs {b}" for n, a, b in zip(names, meta.config, config) if a != b)
        raise ValueError(f"tile_scheduler_metadata was first used with other arguments ({diff}): call "
                         f"get_mla_metadata again for these")


def _keep_first(indices: torch.Tensor, topk_length, batch: int) -> torch.Tensor:
    """``indices`` with every row's entries past ``topk_length[b]`` set to -1 (skipped); as given without it."""
    if topk_length is None:
        return indices
    topk_length = _utils.check_tensor("topk_length", topk_length, 1, _utils.INDEX_DTYPES)
    _utils.check_same("topk_length", topk_length.shape[0], "q", batch, "batch size")
    _check_has_data_beside("topk_length", topk_length, indices.device)
    keep = torch.arange(indices.shape[-1], device=indices.device) < topk_length.to(indices.device)[:, None, None]
    return torch.where(keep, indices, indices.new_full((), -1))


def _check_sink(attn_sink, heads: int) -> torch.Tensor:
    """``attn_sink [H]`` float32, or a TypeError/ValueError naming it."""
    sink = _utils.check_tensor("attn_sink", attn_sink, 1, (torch.float32,))
    _utils.check_same("attn_sink", sink.shape[0], "q's heads", heads)
    return sink


def _check_has_data_beside(name: str, t: torch.Tensor, device: torch.device) -> None:
    """``t`` is moved to ``device`` where it is used: refuse one on the meta device beside real tensors (torch's
    copy failed with a NotImplementedError, "Cannot copy out of meta tensor"), and one in host memory while a CUDA
    graph is captured on ``device``: a captured copy would read the host memory again at every replay, and torch
    2.11 refuses to capture one from pageable memory ("Cannot copy between CPU and CUDA tensors during CUDA graph
    capture unless the CPU tensor is pinned"), an error that did not name the argument."""
    if t.device.type == "meta" and device.type != "meta":
        raise ValueError(f"{name} is on the meta device, which holds no data, but the call runs on {device}")
    if t.device.type == "cpu" and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise ValueError(f"{name} is on the CPU while a CUDA graph is captured on {device}: pass it on {device} "
                         f"(a captured copy from host memory would be read again at every replay)")
