"""The interpreter's out-of-bounds check (``tests/bounds.py``, installed by ``conftest.py`` for the whole suite)
catches what it is there for: an access past every argument's memory, from a toy kernel and from the decode
kernel given a block id past the cache (which the public call refuses on the CPU, so ``_launch`` is driven
directly, as a GPU call with such an id would run); and its opt-in race check (``MLA_TEST_RACES=1``) an element
two programs of one launch touch, one of them writing."""

import pytest
import torch

import bounds

from helpers import make_paged_cache
from mla_kernels import _utils, decode

pytestmark = [pytest.mark.skipif(not _utils.interpreting(), reason="the check wraps Triton's CPU interpreter"),
              pytest.mark.skipif(_utils.interpreting() and not bounds.installed,
                                 reason="this triton's interpreter lacks the hooks tests/bounds.py wraps (warned)")]


def _copy_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def copy(X, Y, N, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(Y + offs, tl.load(X + offs, mask=offs < N), mask=offs < N)

    return copy


def test_in_bounds_views_pass_and_one_element_past_the_end_fails():
    copy = _copy_kernel()
    x, y = torch.arange(16.0), torch.empty(16)
    copy[(1,)](x[4:], y[:12], 12, BLOCK=16)  # views: the storage is the bound
    assert torch.equal(y[:12], x[4:])
    with pytest.raises(Exception, match="OutOfBounds"):
        copy[(1,)](x, y, 17, BLOCK=32)


def test_race_check_catches_two_programs_on_one_element(monkeypatch):
    import triton
    import triton.language as tl

    @triton.jit
    def copy_blocks(X, Y, STRIDE_Y, BLOCK: tl.constexpr):  # program i: block i of X to Y + i * STRIDE_Y
        pid = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        tl.store(Y + pid * STRIDE_Y + offs, tl.load(X + pid * BLOCK + offs))

    monkeypatch.setattr(bounds._state, "race_check", True, raising=False)
    x, y = torch.arange(48.0), torch.empty(32)
    copy_blocks[(2,)](x, y, 16, BLOCK=16)  # disjoint blocks
    copy_blocks[(2,)](x, x, 16, BLOCK=16)  # in place, each program on its own block
    with pytest.raises(Exception, match="Race"):  # both programs write y[0:16]
        copy_blocks[(2,)](x, y, 0, BLOCK=16)
    with pytest.raises(Exception, match="Race"):  # program 0 writes x[16:32], which program 1 reads
        copy_blocks[(2,)](x, x[16:], 16, BLOCK=16)


def test_decode_kernel_with_a_block_id_past_the_cache_is_caught():
    kv, pe, table = make_paged_cache([40], 16, (64, 16), torch.float32, "cpu", extra_blocks=0)
    table[0, 1] = kv.shape[0]  # one block past the last
    q_nope, q_pe = torch.randn(1, 1, 2, 64), torch.randn(1, 1, 2, 16)
    seqlens = torch.tensor([40], dtype=torch.int32)
    with pytest.raises(Exception, match="OutOfBounds"):
        decode._launch(q_nope, q_pe, kv, pe, table, seqlens, None, 0.125, True, False, batch=1, seq_q=1,
                       total_tokens=1, max_seqlen_q=1, max_seqlen_k=table.shape[1] * 16, num_splits=1)
