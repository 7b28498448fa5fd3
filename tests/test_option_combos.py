"""The public calls' valid options combined: every pair of option values (every triple for merge_attention_states)
in at least one case, each against the float64 references (tests/combos.py builds the cases and the inputs).

Earlier tests vary one option at a time around a fixed case; these cover how options meet: an fp8 cache (also read
as its bits, as GPUs before sm_89 do) with sparse lists, schedules, split_tokens and the custom op; tuned launch
configs (the Hopper TMA kernel, other tiles) behind the public calls; split_tokens' bitwise promises (alone, in a
batch, from decode, from prefill and its launches over pieces) under fp8, TMA, sparse lists and strided queries;
FlashMLA's metadata forms with sparse slots, sinks, fp8 rows and other widths; the cache manager's forks,
truncations and padding writes with every cache format; MLAttention's step shapes with fp8, sparse and
split_tokens; shared-prefix decode through every grid; and merge_attention_states on strided inputs on both of
its paths. The covering arrays are fixed (seeded): the same cases on every run.
"""

import pytest
import torch

import combos

ON_GPU = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _inputs_on(device, monkeypatch):
    monkeypatch.setattr(combos, "DEVICE", device)


def _cases(name: str, params: dict, valid=lambda c: True, **kw) -> list:
    return [pytest.param(c, id=f"{name}{i:02d}") for i, c in enumerate(combos.covering(params, valid, **kw))]


def _impl(impl: str) -> None:
    if impl == "torch" and ON_GPU:
        pytest.skip("the PyTorch path is the CPU's (without the interpreter)")


DECODE_CASES = _cases("decode", combos.DECODE, combos.decode_valid)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode(case, impl, poisoned_empty):
    _impl(impl)
    combos.run_decode(dict(case, impl=impl))


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("case", _cases("prefill", combos.PREFILL, combos.prefill_valid))
def test_prefill(case, impl, poisoned_empty):
    _impl(impl)
    combos.run_prefill(dict(case, impl=impl))


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("case", _cases("attention", combos.ATTENTION, combos.attention_valid))
def test_prefill_attention(case, impl, poisoned_empty):
    _impl(impl)
    combos.run_attention(dict(case, impl=impl))


@pytest.mark.parametrize("case", _cases("flash", combos.FLASH, combos.flash_valid))
def test_flash_mla_interface(case, poisoned_empty):
    combos.run_flash_mla(case)


@pytest.mark.parametrize("case", _cases("cache", combos.CACHE))
def test_cache_writes_then_decode(case, poisoned_empty):
    combos.run_cache(case)


@pytest.mark.parametrize("case", _cases("module", combos.MODULE))
def test_module_steps(case, poisoned_empty):
    combos.run_module(case)


@pytest.mark.parametrize("case", _cases("cascade", combos.CASCADE))
def test_shared_prefix_decode(case, poisoned_empty):
    if case["merge"] == "torch" and ON_GPU:
        pytest.skip("the PyTorch path is the CPU's")
    combos.run_cascade(case)


@pytest.mark.parametrize("case", _cases("invariant", combos.INVARIANT, combos.invariant_valid))
def test_split_tokens_bits(case, poisoned_empty):
    combos.run_invariant(case)


@pytest.mark.parametrize("case", _cases("merge", combos.MERGE, strength=3))
def test_merge(case, poisoned_empty):
    if case["impl"] == "torch" and ON_GPU:
        pytest.skip("the PyTorch path is the CPU's")
    combos.run_merge(case)


def test_the_covering_arrays_cover_every_admitted_pair():
    """The generator's promise, checked on one array: every pair of values ``valid`` admits appears in a case."""
    cases = [p.values[0] for p in DECODE_CASES]
    names = list(combos.DECODE)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for va in combos.DECODE[a]:
                for vb in combos.DECODE[b]:
                    if combos.decode_valid({a: va, b: vb}):
                        assert any(c[a] == va and c[b] == vb for c in cases), (a, va, b, vb)
