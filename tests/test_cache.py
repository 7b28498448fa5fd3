"""write_cache against a Python loop, on both paths, with poisoned caches and every bad argument."""

from __future__ import annotations

import math

import random

import pytest
import torch

import mla_kernels
from mla_kernels import _utils, cache as cache_mod
from mla_kernels.cache import write_cache

DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.float32, id="fp32")]


@pytest.fixture(params=["triton", "torch"])
def path(request, monkeypatch, device):
    """Which implementation runs: the Triton kernel (interpreted on the CPU) or the PyTorch fallback.

    Returns the device to put tensors on. The PyTorch path only serves CPU tensors outside the
    interpreter, so it is tested on the CPU with ``interpreting()`` patched off.
    """
    if request.param == "torch":
        monkeypatch.setattr(_utils, "interpreting", lambda: False)
        dev = torch.device("cpu")
        assert not _utils.use_triton(torch.empty(0, device=dev))
        return dev
    assert _utils.use_triton(torch.empty(0, device=device)), "the Triton path would not run here"
    return device


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so that NaN compares equal to the same NaN."""
    return t.view(torch.int16)


def poisoned_cache(num_blocks, page_size, r, p, dtype, device, fused=True):
    """(buffer or None, kv_cache [N, page, R], pe_cache [N, page, P]), every element NaN."""
    if fused:
        buf = torch.full((num_blocks, page_size, r + p), float("nan"), dtype=dtype, device=device)
        return buf, buf[..., :r], buf[..., r:]
    kv = torch.full((num_blocks, page_size, r), float("nan"), dtype=dtype, device=device)
    pe = torch.full((num_blocks, page_size, p), float("nan"), dtype=dtype, device=device)
    return None, kv, pe


def new_tokens(num_tokens, r, p, dtype, device):
    """kv_c [T, R] and k_pe [T, P] as the two slices of one kv_a_proj output [T, R + P]."""
    proj = torch.randn(num_tokens, r + p, dtype=torch.float32).to(dtype=dtype, device=device)
    return proj[:, :r], proj[:, r:]


def random_slots(num_tokens, num_slots, pad_every=5, seed=0):
    """Distinct slots in random order, every ``pad_every``-th one -1 (padding)."""
    g = torch.Generator().manual_seed(seed)
    slots = torch.randperm(num_slots, generator=g)[:num_tokens]
    slots[::pad_every] = -1
    return slots


def loop_reference(kv_c, k_pe, kv_cache, pe_cache, slot_mapping):
    """Clones of the caches after writing token by token."""
    kv_cache, pe_cache = kv_cache.clone(), pe_cache.clone()
    page_size = kv_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        kv_cache[slot // page_size, slot % page_size] = kv_c[t]
        pe_cache[slot // page_size, slot % page_size] = k_pe[t]
    return kv_cache, pe_cache


def assert_bits_equal(name, actual, expected):
    a, e = bits(actual.cpu()), bits(expected.cpu())
    diff = (a != e).nonzero()
    assert len(diff) == 0, f"{name}: {len(diff)} elements differ, first at {tuple(diff[0].tolist())}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "separate"])
def test_matches_loop_reference(path, dtype, page_size, fused):
    r, p, num_tokens = 512, 64, 41
    num_blocks = math.ceil(2 * num_tokens / page_size) + 1
    buf, kv_cache, pe_cache = poisoned_cache(num_blocks, page_size, r, p, dtype, path, fused)
    kv_c, k_pe = new_tokens(num_tokens, r, p, dtype, path)
    slots = random_slots(num_tokens, num_blocks * page_size).to(path)
    expected_kv, expected_pe = loop_reference(kv_c, k_pe, kv_cache, pe_cache, slots)
    ptr = kv_cache.data_ptr()

    write_cache(kv_c, k_pe, kv_cache, pe_cache, slots)

    assert kv_cache.data_ptr() == ptr
    assert_bits_equal("kv_cache", kv_cache, expected_kv)
    assert_bits_equal("pe_cache", pe_cache, expected_pe)
    written = (slots >= 0).sum().item()
    untouched = torch.isnan(kv_cache).all(-1).sum().item()
    assert untouched == num_blocks * page_size - written


@pytest.mark.parametrize("r,p", [(16, 16), (64, 1024), (1024, 32)], ids=lambda v: str(v))
@pytest.mark.parametrize("num_tokens", [1, 3, 17])
def test_widths_and_lengths(path, r, p, num_tokens):
    dtype, page_size, num_blocks = torch.bfloat16, 4, 7
    buf, kv_cache, pe_cache = poisoned_cache(num_blocks, page_size, r, p, dtype, path)
    kv_c, k_pe = new_tokens(num_tokens, r, p, dtype, path)
    slots = random_slots(num_tokens, num_blocks * page_size, pad_every=4, seed=num_tokens).to(path)
    expected_kv, expected_pe = loop_reference(kv_c, k_pe, kv_cache, pe_cache, slots)
    write_cache(kv_c, k_pe, kv_cache, pe_cache, slots)
    assert_bits_equal("kv_cache", kv_cache, expected_kv)
    assert_bits_equal("pe_cache", pe_cache, expected_pe)


def test_int32_strided_slot_mapping_and_contiguous_inputs(path):
    r, p, page_size, num_blocks, num_tokens = 64, 16, 16, 4, 20
    buf, kv_cache, pe_cache = poisoned_cache(num_blocks, page_size, r, p, torch.float16, path)
    kv_c, k_pe = (t.contiguous() for t in new_tokens(num_tokens, r, p, torch.float16, path))
    every_other = random_slots(2 * num_tokens, num_blocks * page_size, pad_every=3).to(torch.int32).to(path)
    slots = every_other[::2]
    assert slots.stride(0) == 2
    expected_kv, expected_pe = loop_reference(kv_c, k_pe, kv_cache, pe_cache, slots)
    write_cache(kv_c, k_pe, kv_cache, pe_cache, slots)
    assert_bits_equal("kv_cache", kv_cache, expected_kv)
    assert_bits_equal("pe_cache", pe_cache, expected_pe)


def test_padding_only_and_empty_leave_the_cache_alone(path):
    r, p, page_size, num_blocks = 64, 16, 16, 3
    buf, kv_cache, pe_cache = poisoned_cache(num_blocks, page_size, r, p, torch.bfloat16, path)
    buf[1, 3] = 1.5
    before = buf.clone()
    kv_c, k_pe = new_tokens(5, r, p, torch.bfloat16, path)
    write_cache(kv_c, k_pe, kv_cache, pe_cache, torch.full((5,), -1, dtype=torch.int64, device=path))
    assert_bits_equal("buffer", buf, before)
    empty_kv, empty_pe = new_tokens(0, r, p, torch.bfloat16, path)
    write_cache(empty_kv, empty_pe, kv_cache, pe_cache, torch.empty(0, dtype=torch.int64, device=path))
    assert_bits_equal("buffer", buf, before)


def test_neighbouring_tokens_keep_their_bytes(path):
    """Writing one row of a page leaves its neighbours, in both caches of the fused buffer, bit for bit."""
    r, p, page_size, num_blocks = 32, 16, 16, 2
    buf = torch.randn(num_blocks, page_size, r + p).to(dtype=torch.bfloat16, device=path)
    kv_cache, pe_cache = buf[..., :r], buf[..., r:]
    kv_c, k_pe = new_tokens(1, r, p, torch.bfloat16, path)
    expected = buf.clone()
    expected[1, 7, :r], expected[1, 7, r:] = kv_c[0], k_pe[0]
    write_cache(kv_c, k_pe, kv_cache, pe_cache, torch.tensor([page_size + 7], device=path))
    assert_bits_equal("buffer", buf, expected)


def test_inputs_that_require_grad_are_written_whole_and_leave_no_autograd_history(path):
    """A kv_a_proj output computed outside no_grad. The PyTorch path raised on its first in-place store (a leaf that
    requires grad), after the latent and before the rope key, and the cache then carried autograd history that
    made every later write raise too."""
    r, p, page_size, num_blocks = 32, 16, 4, 2
    buf, kv_cache, pe_cache = poisoned_cache(num_blocks, page_size, r, p, torch.float32, path)
    proj = torch.randn(2, r + p, device=path, requires_grad=True)
    kv_c, k_pe = proj[:, :r], proj[:, r:]
    expected = buf.detach().clone()
    expected[0, 1], expected[1, 2] = proj[0].detach(), proj[1].detach()
    write_cache(kv_c, k_pe, kv_cache, pe_cache, torch.tensor([1, page_size + 2], device=path))
    assert not buf.requires_grad and buf.grad_fn is None
    assert torch.equal(buf.isnan(), expected.isnan()) and torch.equal(buf.nan_to_num(), expected.nan_to_num())
    write_cache(kv_c[:1] * 2, k_pe[:1] * 2, kv_cache, pe_cache, torch.tensor([0], device=path))  # grad_fn inputs
    assert torch.equal(buf[0, 0], 2 * proj[0].detach()) and not buf.requires_grad


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_a_cache_made_under_inference_mode_takes_writes_outside_it(path, fp8):
    """A cache allocated under torch.inference_mode (a server's start-up; fp8_latent_cache's views, a plain buffer's)
    and written under no_grad later. The kernel wrote it; the PyTorch path raised torch's RuntimeError ("Inplace
    update to inference tensor outside InferenceMode"), naming no argument, and for views made outside the mode only
    after it had stored the latent: a half-written cache."""
    r, p, page_size = (128, 16, 4) if fp8 else (32, 16, 4)
    with torch.inference_mode():
        if fp8:
            kv_cache, kv_scale, pe_cache = mla_kernels.fp8_latent_cache(2, page_size, r, p, device=path)
        else:
            buf = torch.zeros(2, page_size, r + p, dtype=torch.bfloat16, device=path)
            kv_cache, pe_cache, kv_scale = buf[..., :r], buf[..., r:], None
    assert kv_cache.is_inference() and not torch.is_inference_mode_enabled()
    kv_c, k_pe = new_tokens(2, r, p, torch.bfloat16, path)
    with torch.no_grad():
        write_cache(kv_c, k_pe, kv_cache, pe_cache, torch.tensor([1, page_size + 2], device=path), kv_scale=kv_scale)
    assert torch.equal(pe_cache[0, 1], k_pe[0]) and torch.equal(pe_cache[1, 2], k_pe[1])
    if fp8:
        assert bool((kv_scale[0, 1] > 0).all()) and bool((kv_scale[1, 2] > 0).all())
    else:
        assert torch.equal(kv_cache[0, 1], kv_c[0]) and torch.equal(kv_cache[1, 2], kv_c[1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the bounds check runs only for CPU tensors")
def test_slot_past_the_cache_raises_before_writing(path):
    r, p, page_size, num_blocks = 32, 16, 4, 3
    buf, kv_cache, pe_cache = poisoned_cache(num_blocks, page_size, r, p, torch.bfloat16, path)
    before = buf.clone()
    kv_c, k_pe = new_tokens(3, r, p, torch.bfloat16, path)
    slots = torch.tensor([0, num_blocks * page_size, 1])
    with pytest.raises(ValueError, match="slot_mapping"):
        write_cache(kv_c, k_pe, kv_cache, pe_cache, slots)
    assert_bits_equal("buffer", buf, before)


def test_the_kernel_skips_a_slot_past_the_cache(device):
    """The kernel's own bound (on a GPU ``write_cache`` does not read the slots back, so the kernel must skip a slot
    past the cache; on the CPU the public call refuses it first): launched directly on caches that are views of the
    first 3 of 4 blocks, slot ``num_slots`` would land in block 3, outside them."""
    page, r, p = 4, 32, 16
    big = torch.zeros(4, page, r + p, dtype=torch.bfloat16, device=device)
    kv_c, k_pe = new_tokens(2, r, p, torch.bfloat16, device)
    cache_mod._launch_write_cache(kv_c, k_pe, big[:3, :, :r], big[:3, :, r:], torch.tensor([1, 3 * page],
                                                                                         device=device))
    assert not big[3].any() and torch.equal(big[0, 1, :r], kv_c[0]) and not big[0, 0].any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: on the CPU such slots raise")
def test_slot_past_the_cache_is_skipped_on_gpu():
    r, p, page_size, num_blocks = 32, 16, 4, 3
    buf, kv_cache, pe_cache = poisoned_cache(num_blocks, page_size, r, p, torch.bfloat16, "cuda")
    kv_c, k_pe = new_tokens(3, r, p, torch.bfloat16, "cuda")
    slots = torch.tensor([0, num_blocks * page_size, 1], device="cuda")
    write_cache(kv_c, k_pe, kv_cache, pe_cache, slots)
    assert torch.isnan(buf).all(-1).sum().item() == num_blocks * page_size - 2


# ---------------------------------------------------------------------------------------------
# bad arguments: the error type, and the argument named in the message
# ---------------------------------------------------------------------------------------------


def _good_args():
    r, p, page_size, num_blocks, num_tokens = 32, 16, 4, 3, 5
    buf = torch.zeros(num_blocks, page_size, r + p, dtype=torch.bfloat16)
    proj = torch.randn(num_tokens, r + p).bfloat16()
    return dict(kv_c=proj[:, :r], k_pe=proj[:, r:], kv_cache=buf[..., :r], pe_cache=buf[..., r:],
                slot_mapping=torch.arange(num_tokens))


def _set(**changes):
    return lambda a: {**a, **{k: (v(a) if callable(v) else v) for k, v in changes.items()}}


BAD_ARGS = [
    ("kv_c None", _set(kv_c=None), TypeError, "kv_c"),
    ("k_pe None", _set(k_pe=None), TypeError, "k_pe"),
    ("kv_cache None", _set(kv_cache=None), TypeError, "kv_cache"),
    ("pe_cache None", _set(pe_cache=None), TypeError, "pe_cache"),
    ("slot_mapping None", _set(slot_mapping=None), TypeError, "slot_mapping"),
    ("slot_mapping list", _set(slot_mapping=[0, 1, 2, 3, 4]), TypeError, "slot_mapping"),
    ("kv_c rank 3", _set(kv_c=lambda a: a["kv_c"][None]), ValueError, "kv_c"),
    ("k_pe rank 1", _set(k_pe=lambda a: a["k_pe"][0]), ValueError, "k_pe"),
    ("kv_cache rank 2", _set(kv_cache=lambda a: a["kv_cache"][0]), ValueError, "kv_cache"),
    ("pe_cache rank 4", _set(pe_cache=lambda a: a["pe_cache"][None]), ValueError, "pe_cache"),
    ("slot_mapping rank 2", _set(slot_mapping=lambda a: a["slot_mapping"][None]), ValueError, "slot_mapping"),
    ("kv_c float32", _set(kv_c=lambda a: a["kv_c"].float()), TypeError, "kv_c"),
    ("kv_c fp16 into a bf16 cache", _set(kv_c=lambda a: a["kv_c"].half()), TypeError, "kv_c"),
    ("k_pe fp16 into a bf16 cache", _set(k_pe=lambda a: a["k_pe"].half()), TypeError, "k_pe"),
    ("pe_cache fp16, kv_cache bf16", _set(pe_cache=lambda a: a["pe_cache"].half()), TypeError, "pe_cache"),
    ("kv_cache float32", _set(kv_cache=lambda a: a["kv_cache"].float()), TypeError, "kv_cache"),
    ("slot_mapping float", _set(slot_mapping=lambda a: a["slot_mapping"].float()), TypeError, "slot_mapping"),
    ("slot_mapping int16", _set(slot_mapping=lambda a: a["slot_mapping"].short()), TypeError, "slot_mapping"),
    ("kv_c width != R", _set(kv_c=lambda a: a["kv_c"][:, :16]), ValueError, "kv_c"),
    ("k_pe width != P", _set(k_pe=lambda a: torch.zeros(5, 32, dtype=torch.bfloat16)), ValueError, "k_pe"),
    ("R not a power of two", _set(kv_c=torch.zeros(5, 48, dtype=torch.bfloat16),
                                  kv_cache=torch.zeros(3, 4, 48, dtype=torch.bfloat16)), ValueError, "kv_cache"),
    ("R too wide", _set(kv_c=torch.zeros(5, 2048, dtype=torch.bfloat16),
                        kv_cache=torch.zeros(3, 4, 2048, dtype=torch.bfloat16)), ValueError, "kv_cache"),
    ("kv_scale with a bf16 cache", _set(kv_scale=torch.zeros(3, 4, 1)), ValueError, "kv_scale"),
    ("P too narrow", _set(k_pe=torch.zeros(5, 8, dtype=torch.bfloat16),
                          pe_cache=torch.zeros(3, 4, 8, dtype=torch.bfloat16)), ValueError, "pe_cache"),
    ("caches disagree on page size", _set(pe_cache=torch.zeros(3, 8, 16, dtype=torch.bfloat16)), ValueError, "pe_cache"),
    ("caches disagree on blocks", _set(pe_cache=torch.zeros(2, 4, 16, dtype=torch.bfloat16)), ValueError, "pe_cache"),
    ("empty cache", _set(kv_cache=torch.zeros(0, 4, 32, dtype=torch.bfloat16),
                         pe_cache=torch.zeros(0, 4, 16, dtype=torch.bfloat16)), ValueError, "kv_cache"),
    ("blocks of no token", _set(kv_cache=torch.zeros(3, 0, 32, dtype=torch.bfloat16),
                                pe_cache=torch.zeros(3, 0, 16, dtype=torch.bfloat16)), ValueError,
     "at least one token"),
    ("blocks of no token, no tokens", _set(kv_c=torch.zeros(0, 32, dtype=torch.bfloat16),
                                           k_pe=torch.zeros(0, 16, dtype=torch.bfloat16),
                                           kv_cache=torch.zeros(3, 0, 32, dtype=torch.bfloat16),
                                           pe_cache=torch.zeros(3, 0, 16, dtype=torch.bfloat16),
                                           slot_mapping=torch.zeros(0, dtype=torch.int64)), ValueError, "at least one"),
    ("k_pe has fewer tokens", _set(k_pe=lambda a: a["k_pe"][:4]), ValueError, "k_pe"),
    ("slot_mapping has more tokens", _set(slot_mapping=torch.arange(6)), ValueError, "slot_mapping"),
    ("kv_c last dim strided", _set(kv_c=lambda a: torch.zeros(5, 64, dtype=torch.bfloat16)[:, ::2]), ValueError, "kv_c"),
    ("k_pe last dim strided", _set(k_pe=lambda a: torch.zeros(5, 32, dtype=torch.bfloat16)[:, ::2]), ValueError, "k_pe"),
    ("pe_cache last dim strided",
     _set(pe_cache=lambda a: torch.zeros(3, 4, 32, dtype=torch.bfloat16)[..., ::2]), ValueError, "pe_cache"),
    ("kv_cache last dim strided",
     _set(kv_cache=lambda a: torch.zeros(3, 4, 64, dtype=torch.bfloat16)[..., ::2]), ValueError, "kv_cache"),
    ("slot_mapping on another device", _set(slot_mapping=lambda a: a["slot_mapping"].to("meta")), ValueError,
     "slot_mapping"),
    ("kv_c on another device", _set(kv_c=lambda a: a["kv_c"].to("meta")), ValueError, "kv_c is on"),
    ("k_pe on another device", _set(k_pe=lambda a: a["k_pe"].to("meta")), ValueError, "k_pe is on"),
    ("pe_cache on another device", _set(pe_cache=lambda a: a["pe_cache"].to("meta")), ValueError, "pe_cache is on"),
    ("slot past the cache", _set(slot_mapping=torch.tensor([0, 1, 2, 3, 12])), ValueError, "slot_mapping"),
    # meta tensors hold no data (the PyTorch path failed in torch: nonzero has no meta kernel)
    ("all on meta", lambda a: {k: v.to("meta") for k, v in a.items()}, ValueError, "meta device"),
]


@pytest.mark.parametrize("change,error,name", [pytest.param(c, e, n, id=i) for i, c, e, n in BAD_ARGS])
def test_bad_arguments(change, error, name):
    args = change(_good_args())
    before = args["kv_cache"].clone() if isinstance(args["kv_cache"], torch.Tensor) else None
    with pytest.raises(error, match=name):
        write_cache(**args)
    if before is not None and args["kv_cache"].device.type == "cpu":
        assert_bits_equal("kv_cache", args["kv_cache"], before)


def test_exported():
    assert mla_kernels.write_cache is write_cache
    assert "write_cache" in mla_kernels.__all__


def test_caches_that_share_memory_are_refused_before_writing(path):
    """``kv_cache``, ``pe_cache`` and ``kv_scale`` whose columns overlap (views of one buffer) are refused by name
    before anything is written: the write of one overwrote the other's values, silently. Side by side views of one
    buffer, and separate tensors, are taken (``test_matches_loop_reference``'s fused and separate caches)."""
    buf = torch.zeros(3, 4, 48, dtype=torch.bfloat16, device=path)
    kv_c, k_pe = new_tokens(2, 32, 16, torch.bfloat16, path)
    slots = torch.tensor([0, 5])
    for kv_cache, pe_cache in ((buf[..., :32], buf[..., 24:40]), (buf[..., 16:48], buf[..., :16].clone()[..., :16]),
                               (buf[..., 8:40], buf[..., :16])):
        if pe_cache.data_ptr() != buf.data_ptr() and not _utils.views_overlap(kv_cache, pe_cache):
            continue  # (the clone: its own memory, taken)
        with pytest.raises(ValueError, match="kv_cache and pe_cache share memory"):
            write_cache(kv_c, k_pe, kv_cache, pe_cache, slots)
        assert not buf.any()
    # FlashMLA's FP8 rows: 32 e4m3 latent values... (R 128 here), 1 fp32 scale, 16 bf16 rope values, side by side
    rows = torch.zeros(3, 4, 128 + 4 + 32, dtype=torch.uint8, device=path)
    kv8, pe8 = rows[..., :128].view(torch.float8_e4m3fn), rows[..., 132:].view(torch.bfloat16)
    kv_c8 = torch.randn(2, 128, dtype=torch.bfloat16, device=path)
    write_cache(kv_c8, k_pe, kv8, pe8, slots, kv_scale=rows[..., 128:132].view(torch.float32))
    written = rows.clone()
    with pytest.raises(ValueError, match="kv_cache and kv_scale share memory"):  # a scale inside the latent's bytes
        write_cache(kv_c8, k_pe, kv8, pe8, slots, kv_scale=rows[..., 64:68].view(torch.float32))
    assert torch.equal(rows, written)
    with pytest.raises(ValueError, match="pe_cache and kv_scale share memory"):  # rope starting 2 bytes into it
        write_cache(kv_c8, k_pe, kv8, rows[..., 130:162].view(torch.bfloat16), slots,
                    kv_scale=rows[..., 128:132].view(torch.float32))
    assert torch.equal(rows, written)
    # pages split between two caches (each block's pages 0-1 and 2-3): disjoint, taken (refused before)
    write_cache(kv_c, k_pe, buf[:, :2, :32], buf[:, 2:, :16], slots)
    assert torch.equal(buf[:, :2, :32].reshape(-1, 32)[slots], kv_c)
    assert torch.equal(buf[:, 2:, :16].reshape(-1, 16)[slots], k_pe)


def test_views_overlap():
    """``_utils.views_overlap``: separate memory and side-by-side columns are apart; overlapping columns, a view and
    itself, and rows of one view reaching into the next row's other view overlap."""
    buf = torch.zeros(4, 8, 80)
    assert not _utils.views_overlap(buf[..., :64], buf[..., 64:])
    assert not _utils.views_overlap(buf[..., 64:], buf[..., :64])
    assert not _utils.views_overlap(buf[..., :64], torch.zeros(4, 8, 16))
    assert _utils.views_overlap(buf[..., :64], buf[..., 48:64])
    assert _utils.views_overlap(buf[..., 16:], buf[..., :32])
    assert _utils.views_overlap(buf[..., :64], buf[..., :64])
    page1 = torch.zeros(6, 1, 80)
    assert not _utils.views_overlap(page1[..., :64], page1[..., 64:])
    assert _utils.views_overlap(page1[..., :64], page1[..., 60:76])
    flat = torch.zeros(4 * 8 * 40)  # rows of 40 values: a 64-wide view of them reaches into the next row
    assert _utils.views_overlap(flat.as_strided((4, 8, 32), (320, 40, 1)), flat.as_strided((4, 8, 8), (320, 40, 1), 24))
    assert not _utils.views_overlap(flat.as_strided((4, 8, 32), (320, 40, 1)),
                                    flat.as_strided((4, 8, 8), (320, 40, 1), 32))
    two = torch.zeros(2 * 1280)
    assert not _utils.views_overlap(two[:1280].view(4, 8, 40), two[1280:].view(4, 8, 40))  # back to back
    assert _utils.views_overlap(two[:1280].view(4, 8, 40), two[1279:2559].view(4, 8, 40))  # from a's last value on
    # pages split between two caches: disjoint (each block's other pages are a hole in the other's rows; True before)
    assert not _utils.views_overlap(buf[:, :4, :64], buf[:, 4:, :64])
    assert _utils.views_overlap(buf[:, :4, :64], buf[:, 3:7, 60:])
    assert not _utils.views_overlap(buf[:, :4, :32], buf[:, 4:6, :32])  # unlike layouts: undecided
    pages = torch.zeros(1, 6, 80).transpose(0, 1)  # page 1 whose page stride is no block stride: (80, 480, 1)
    assert _utils.views_overlap(pages[:5, :, :64], pages[1:, :, :64])
    row = torch.zeros(80)  # one slot each (strides 0, which write_cache takes for sizes 1)
    assert _utils.views_overlap(row.as_strided((1, 1, 64), (0, 0, 1)), row.as_strided((1, 1, 16), (0, 0, 1), 60))
    assert not _utils.views_overlap(row.as_strided((1, 1, 60), (0, 0, 1)), row.as_strided((1, 1, 16), (0, 0, 1), 60))
    # blocks of stride 0 with pages (write_cache refuses them itself): undecided, False, not ZeroDivisionError
    assert not _utils.views_overlap(row.as_strided((2, 3, 4), (0, 4, 1)), row.as_strided((2, 3, 4), (0, 4, 1), 1))
    # blocks no whole number of rows apart (330 against rows of 40): undecided, so False (these are apart)
    assert not _utils.views_overlap(flat.as_strided((3, 4, 32), (330, 40, 1)),
                                    flat.as_strided((3, 4, 32), (330, 40, 1), 152))


def test_views_overlap_against_marked_bytes():
    """``_utils.views_overlap`` against the bytes each view covers, over random layouts in one buffer: it never says
    two disjoint views overlap (that would refuse a valid write), and where it decides (same byte strides, blocks a
    whole number of rows apart) it finds every overlap. Element sizes 1, 2 and 4 mixed, as an FP8 cache's rows."""
    rng = random.Random(0)
    buf = torch.zeros(4096, dtype=torch.uint8)
    decided = overlapping = 0
    for _ in range(3000):
        row_bytes = rng.choice([8, 12, 16, 40])
        pages = rng.randint(1, 4)
        block = row_bytes * (pages + rng.choice([0, 0, 1, 2]))
        if rng.random() < 0.1:
            block += rng.choice([4, 8])  # blocks no whole number of rows apart
        views, covered = [], []
        for _ in range(2):
            e = rng.choice([1, 2, 4])  # (every stride and offset here is a multiple of 4 bytes)
            n, p = rng.randint(1, 3), rng.randint(1, pages)
            width = rng.randint(1, row_bytes // e)
            offset = rng.randrange(0, 64) * 4
            dtype = {1: torch.uint8, 2: torch.bfloat16, 4: torch.float32}[e]
            view = buf[offset:].view(dtype).as_strided((n, p, width), (block // e, row_bytes // e, 1))
            start = view.data_ptr() - buf.data_ptr()
            covered.append({start + (i * view.stride(0) + j * view.stride(1) + c) * e + k
                            for i in range(n) for j in range(p) for c in range(width) for k in range(e)})
            views.append(view)
        truth = bool(covered[0] & covered[1])
        got = _utils.views_overlap(*views)
        assert not got or truth, [(v.shape, v.stride(), v.element_size(), v.data_ptr() - buf.data_ptr()) for v in views]
        sa, sb = (tuple(x * v.element_size() for x in v.stride()[:2]) + tuple(v.shape[:2]) for v in views)
        if sa == sb and (sa[3] == 1 or sa[2] == 1 or sa[0] % sa[1] == 0):
            decided += 1
            overlapping += truth
            assert got == truth, [(v.shape, v.stride(), v.element_size(), v.data_ptr() - buf.data_ptr()) for v in views]
    assert decided > 300 and overlapping > 100, (decided, overlapping)  # the exact cases were exercised


def test_rows_overlap_against_marked_elements():
    """``_utils.rows_overlap`` (one cache's rows meeting each other) against the elements each row covers, over
    random sizes and strides: exact either way. ``rows_apart`` (the hot path's quick test) never vouches for rows
    that meet, and vouches for the block-major and token-major layouts the library and users make."""
    rng = random.Random(0)
    overlapping = apart = 0
    for _ in range(4000):
        n, p, w = rng.randint(1, 6), rng.randint(1, 6), rng.randint(1, 8)
        s0, s1 = rng.randint(1, 40), rng.randint(1, 40)
        t = torch.empty((n - 1) * s0 + (p - 1) * s1 + w).as_strided((n, p, w), (s0, s1, 1))
        rows = [set(range(i * s0 + j * s1, i * s0 + j * s1 + w)) for i in range(n) for j in range(p)]
        truth = any(rows[a] & rows[b] for a in range(len(rows)) for b in range(a + 1, len(rows)))
        assert _utils.rows_overlap(t) == truth, ((n, p, w), (s0, s1))
        assert not (truth and _utils.rows_apart(t)), ((n, p, w), (s0, s1))
        overlapping += truth
        apart += _utils.rows_apart(t)
    assert overlapping > 1000 and apart > 1000, (overlapping, apart)
    buf = torch.zeros(5, 4, 48)
    assert _utils.rows_apart(buf[..., :32]) and _utils.rows_apart(buf[..., 32:])  # views of one buffer
    assert _utils.rows_apart(torch.zeros(4, 5, 32).transpose(0, 1))  # token-major
    assert _utils.rows_apart(buf[:, :2, :32]) and _utils.rows_apart(buf[:, 2:, :16])  # pages split in two


@pytest.mark.parametrize("fp8", [False, True])
def test_write_cache_refuses_a_cache_whose_rows_overlap(device, fp8):
    """A cache view whose rows are closer than their width (``as_strided``: 32 values a row, rows 8 apart) was
    taken, and slot 1's latent overwrote most of slot 0's. Refused, naming the cache, nothing written; a layout
    whose rows interleave without meeting is taken."""
    width = 128 if fp8 else 32
    dtype = torch.bfloat16 if fp8 else torch.float32
    base = torch.zeros(2 * 4 * 8 + width, device=device, dtype=torch.float8_e4m3fn if fp8 else dtype)
    kv = base.as_strided((2, 4, width), (4 * 8, 8, 1))
    pe = torch.zeros(2, 4, 16, device=device, dtype=dtype)
    scale = torch.zeros(2, 4, 1, device=device) if fp8 else None
    kv_c = torch.cat([torch.full((1, width), 1.0), torch.full((1, width), 2.0)]).to(device, dtype)
    k_pe = torch.zeros(2, 16, device=device, dtype=dtype)
    before = base.clone()
    with pytest.raises(ValueError, match="kv_cache's rows overlap"):
        write_cache(kv_c, k_pe, kv, pe, torch.tensor([0, 1], device=device), kv_scale=scale)
    assert torch.equal(base.view(torch.uint8), before.view(torch.uint8))
    with pytest.raises(ValueError, match="pe_cache's rows overlap"):
        write_cache(kv_c, k_pe, torch.zeros_like(kv), pe.flatten()[:40].as_strided((2, 4, 16), (8, 2, 1)),
                    torch.tensor([0, 1], device=device), kv_scale=scale)
    # blocks interleaved page by page (block b's page j at row 2j + b): rows apart, though neither block- nor
    # token-major
    rows = torch.zeros(2 * 4 * width, device=device, dtype=base.dtype)
    inter = rows.as_strided((2, 4, width), (width, 2 * width, 1))
    scale = torch.zeros(2, 4, 1, device=device) if fp8 else None
    write_cache(kv_c, k_pe, inter, pe, torch.tensor([1, 4], device=device), kv_scale=scale)
    got = inter.float() * (scale.repeat_interleave(128, -1) if fp8 else 1)
    assert torch.equal(got[0, 1], kv_c[0].float()) and torch.equal(got[1, 0], kv_c[1].float())


def test_the_metadata_helpers_upload_without_waiting(monkeypatch):
    """``append_batch``, ``slots``, ``block_table`` and ``cache_seqlens`` (the README's decode loop calls three a
    step) hand their host tensors to ``_utils.to_device`` (pinned and copied asynchronously on a GPU, written by
    device ops inside a CUDA graph capture), where a plain ``.to(device)`` from pageable memory waits for every
    kernel queued before it. On the CPU the values are the host's."""
    seen = []
    real = _utils.to_device
    monkeypatch.setattr(_utils, "to_device", lambda host, device: seen.append(host.dtype) or real(host, device))
    cache = mla_kernels.PagedLatentCache(1, 8, 4, 16, 16, torch.float32)
    cache.add_sequence("a")
    slots = cache.append_batch(["a"], [6])
    assert slots.tolist() == cache.slots("a").tolist() and len(slots) == 6
    assert cache.block_table(["a"]).shape == (1, 2) and cache.cache_seqlens(["a"]).tolist() == [6]
    assert seen == [torch.int64, torch.int64, torch.int32, torch.int32]
