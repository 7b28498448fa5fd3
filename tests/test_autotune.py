"""Config sweeps (mla_kernels._autotune, bench.autotune, mla_kernels.autotune) and stored configs at launch.

The sweep runs end to end under the interpreter on tiny widths (R 32, P 16, as test_ops) with an injected timer
(``do_bench`` needs a GPU): the timer's numbers pick the winner, so what is tested is the machinery (checking,
pruning, choosing, writing, loading), never a speed. "A GPU" is faked by patching ``_tuning._gpu_index``: the
library then reads config files for the CPU tensors the interpreter runs.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
import triton
from triton.runtime.errors import OutOfResources

import mla_kernels
from helpers import assert_close, make_paged_cache
from mla_kernels import _autotune, _tuning, _utils, cache, decode, prefill

R, P, PAGE, HEADS = 32, 16, 16, 2
SCALE = 0.25
DECODE = dict(B=2, ctx=40, H=HEADS, S_q=1, page=PAGE, R=R, P=P)
KEY = _tuning.decode_class(HEADS, R)  # "R32/rows<=16"
KEY32 = _tuning.decode_class(HEADS, R, elem_bytes=4)  # "R32/rows<=16/fp32": decode_call's fp32 queries' own class
# the interpreter's heuristic for R 32 at 2 rows is 16 x 64 tiles, 4 warps, 2 stages (decode._config)
HEURISTIC = dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=2)
FAST, WRONG, BROKEN = (dict(BLOCK_M=16, BLOCK_N=n, num_warps=4, num_stages=1) for n in (32, 16, 128))


def fake_timer(ms_by_block_n, calls=None):
    """A timer that says how fast each BLOCK_N is (the sweep hands it a ``Run`` that knows its config)."""
    def timer(fn):
        if calls is not None:
            calls.append(dict(fn.config))
        return ms_by_block_n[fn.config["BLOCK_N"]]
    return timer


class KernelSpy:
    """Stands in for a @triton.jit kernel: records each launch's meta-parameters, optionally fails a launch as
    the compiler would (OutOfResources) or corrupts its first output argument (a wrong config)."""

    def __init__(self, kernel, fail=None, corrupt=None, out_arg=None, error=None):
        self.kernel, self.fail, self.corrupt, self.out_arg, self.launches = kernel, fail, corrupt, out_arg, []
        self.error = error or (lambda: OutOfResources(300000, 232448, "shared memory"))

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.launches.append(meta)
            if self.fail is not None and self.fail(meta):
                raise self.error()
            result = self.kernel[grid](*args, **meta)
            if self.corrupt is not None and self.corrupt(meta):
                args[self.out_arg].mul_(2.0)
            return result
        return launch


def decode_call(device, seed=0):
    """A tiny decode problem (2 sequences of 40 and 23 tokens, NaN-poisoned cache) and its float64 reference."""
    from mla_kernels.reference import absorbed_decode

    lens = [40, 23]
    kv, pe, table = make_paged_cache(lens, PAGE, (R, P), torch.float32, device, generator_seed=seed)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 1, HEADS, R + P, generator=g).to(device)
    args = (q[..., :R], q[..., R:], kv, pe, table, torch.tensor(lens, dtype=torch.int32, device=device), SCALE)
    expected, _ = absorbed_decode(*args)
    return args, expected


def test_sweep_end_to_end_writes_a_file_the_library_loads(fake_gpu, monkeypatch, device):
    """bench.autotune on tiny shapes: the timer's fastest correct candidate wins, the before/after table is
    printed, the file carries the metadata, and a later call looks the winner up and launches it."""
    from bench import autotune as cli

    out = _tuning.CONFIG_DIR / "test-gpu.json"
    report = fake_gpu / "report.json"
    timer = fake_timer({16: 3.0, 32: 1.0, 64: 2.0})
    monkeypatch.setattr(_autotune.SPECS["decode"], "space", lambda key, dev, quick: [WRONG, FAST])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = cli.main(["--kernels", "decode", "--out", str(out), "--results", str(report), "--device",
                            str(device)], timer=timer, shapes={"decode": [DECODE, dict(DECODE, B=1, ctx=70, page=4)]})
    # the GPU has no file yet, but the sweep is what that warning would advise: it does not give it
    assert not [w for w in caught if "no tuned configs" in str(w.message)]
    (res,) = results
    assert res["shape_class"] == KEY and res["winner"] == FAST and not res["pruned"]
    assert res["before_geomean_ms"] == 2.0 and res["after_geomean_ms"] == 1.0 and res["speedup"] == 2.0
    assert res["heuristic"] == [HEURISTIC, HEURISTIC] and len(res["shapes"]) == 2
    data = json.loads(out.read_text())
    assert data["kernels"] == {"decode": {KEY: FAST}}
    assert data["device"] == _autotune._device_info(device)[0] and data["triton"] == triton.__version__
    assert {"sm_count", "torch", "date", "commit", "source"} <= set(data)
    assert json.loads(report.read_text())["classes"][0]["winner"] == FAST

    spy = KernelSpy(decode._mla_attn_kernel)
    monkeypatch.setattr(decode, "_mla_attn_kernel", spy)
    args, expected = decode_call(device)
    assert _tuning.lookup("decode", KEY, device) == FAST
    out_t = mla_kernels.mla_decode(*args)
    assert (spy.launches[-1]["BLOCK_N"], spy.launches[-1]["num_stages"]) == (32, 1)
    assert_close("decode with the tuned config", out_t, expected, torch.float32)


def test_wrong_and_uncompilable_candidates_are_pruned_and_reported(fake_gpu, monkeypatch, device):
    """A candidate whose output is wrong (here: doubled) and one whose launch raises OutOfResources are pruned
    with their reasons and never timed, although the timer would call them the fastest; the sweep goes on."""
    spy = KernelSpy(decode._mla_attn_kernel, fail=lambda m: m["BLOCK_N"] == 128,
                    corrupt=lambda m: m["BLOCK_N"] == 16, out_arg=8)  # OUT is the kernel's 9th argument
    monkeypatch.setattr(decode, "_mla_attn_kernel", spy)
    calls, logged = [], []
    (res,) = _autotune.sweep(["decode"], {"decode": [DECODE]}, device=device, out=None,
                             timer=fake_timer({16: 0.1, 128: 0.1, 32: 1.0, 64: 2.0}, calls),
                             candidates={"decode": [WRONG, BROKEN, FAST]}, log=logged.append)
    reasons = {p["config"]["BLOCK_N"]: p["reason"] for p in res["pruned"]}
    assert reasons[16].startswith("wrong result") and "relative RMS error" in reasons[16]
    assert reasons[128].startswith("does not compile: OutOfResources")
    assert res["winner"] == FAST and {c["BLOCK_N"] for c in calls} == {32, 64}
    assert any("pruned" in line for line in logged) and "2 pruned" in _autotune.format_result(res)


def test_candidates_the_library_would_shrink_are_pruned_without_a_launch(fake_gpu, monkeypatch, device):
    """A candidate whose shared-memory estimate does not fit the GPU would be shrunk at launch if it were stored
    (decode.decode_tiles fits stored configs too), so the time measured would not be the time it runs at: it is
    pruned before it is compiled, with the tiles the library would run instead."""
    spy = KernelSpy(decode._mla_attn_kernel)
    monkeypatch.setattr(decode, "_mla_attn_kernel", spy)
    monkeypatch.setattr(mla_kernels._utils, "shared_memory_limit", lambda dev: 40000)
    # R 32 + P 16 in fp32 (decode.decode_shared_bytes): the heuristic's 16 x 64 x 2 stages need 31744 bytes, FAST's
    # 16 x 32 x 1 stage 11264, 64 x 128 x 3 stages 118784; with the 4 KiB allowance only the last exceeds 40000
    huge = dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3)
    calls = []
    (res,) = _autotune.sweep(["decode"], {"decode": [DECODE]}, device=device, out=None,
                             timer=fake_timer({128: 0.1, 32: 1.0, 64: 2.0}, calls), candidates={"decode": [huge, FAST]},
                             log=lambda line: None)
    (pruned,) = [p for p in res["pruned"] if p["config"] == huge]
    assert pruned["reason"].startswith("over the shared-memory estimate") and "N" in pruned["reason"]
    assert res["winner"] == FAST and all(c["BLOCK_N"] != 128 for c in calls)
    assert all(launch["BLOCK_N"] != 128 for launch in spy.launches)


def test_every_candidate_pruned_stores_nothing(fake_gpu, monkeypatch, device):
    monkeypatch.setattr(decode, "_mla_attn_kernel", KernelSpy(decode._mla_attn_kernel, fail=lambda m: True))
    out = fake_gpu / "none.json"
    (res,) = _autotune.sweep(["decode"], {"decode": [DECODE]}, device=device, out=out, timer=lambda fn: 1.0,
                             candidates={"decode": [FAST]}, log=lambda msg: None)
    assert res["winner"] is None and len(res["pruned"]) == 2 and not out.exists()
    assert "NOT TUNED" in _autotune.format_result(res)


@pytest.mark.parametrize("kernel", ["prefill", "expanded", "write_cache"])
def test_sweep_other_kernels_and_their_configs_reach_the_launch(fake_gpu, monkeypatch, kernel, device):
    """The absorbed prefill, the expanded prefill and write_cache: swept on tiny shapes, written to the shipped
    file's place, then looked up by the public calls, which launch the winner."""
    shapes = {"prefill": dict(B=2, new=5, hist=11, H=HEADS, page=PAGE, R=R, P=P),
              "expanded": dict(B=2, new=5, hist=11, H=HEADS, page=PAGE, N=16, V=16, P=P),
              "write_cache": dict(tokens=5, page=4, R=R, P=P)}
    winner = dict(BLOCK_T=2, num_warps=1) if kernel == "write_cache" else FAST
    out = _tuning.CONFIG_DIR / "test-gpu.json"
    (res,) = _autotune.sweep([kernel], {kernel: [shapes[kernel]]}, device=device, out=out,
                             timer=lambda fn: 1.0 if fn.config == winner else 2.0,
                             candidates={kernel: [winner]}, log=lambda msg: None)
    assert res["winner"] == winner and res["speedup"] == 2.0
    key = _autotune.SPECS[kernel].key(shapes[kernel], torch.bfloat16)
    assert json.loads(out.read_text())["kernels"][kernel] == {key: winner}

    name = {"prefill": (decode, "_mla_attn_kernel"), "expanded": (prefill, "_mla_expanded_kernel"),
            "write_cache": (cache, "_write_cache_kernel")}[kernel]
    spy = KernelSpy(getattr(*name))
    monkeypatch.setattr(*name, spy)
    g = torch.Generator().manual_seed(0)
    if kernel == "write_cache":
        kv_cache, pe_cache = torch.zeros(4, 4, R, device=device), torch.zeros(4, 4, P, device=device)
        mla_kernels.write_cache(torch.randn(5, R, generator=g).to(device), torch.randn(5, P, generator=g).to(device),
                                kv_cache, pe_cache, torch.arange(5, device=device) * 3)
    else:
        lens, new = [16, 16], 5
        kv, pe, table = make_paged_cache(lens, PAGE, (R, P), torch.float32, device)
        cu = torch.tensor([0, new, 2 * new], dtype=torch.int32, device=device)
        w_kv_b = torch.randn(HEADS * 32, R, generator=g).to(device)
        mla_kernels.mla_prefill_attention(torch.randn(2 * new, HEADS, 16, generator=g).to(device),
                                          torch.randn(2 * new, HEADS, P, generator=g).to(device), kv, pe, table, cu,
                                          torch.tensor(lens, dtype=torch.int32, device=device), w_kv_b, SCALE,
                                          path="absorbed" if kernel == "prefill" else kernel)
    meta = spy.launches[-1]
    got = {k: meta[k] for k in winner}
    assert got == winner


def test_tuned_config_that_fails_to_compile_warns_once_and_falls_back(fake_gpu, monkeypatch, device):
    """A stored config whose launch raises OutOfResources: one warning, the entry dropped, the launch retried with
    the heuristic (the result is the heuristic's, bit for bit), and later calls go straight to the heuristic."""
    args, expected = decode_call(device)
    heuristic_out = mla_kernels.mla_decode(*args)  # before any file exists: the heuristic
    _tuning.save_file(_tuning.CONFIG_DIR / "test-gpu.json", device="Test GPU", sm_count=1, source="test",
                      kernels={"decode": {KEY: BROKEN}})
    _tuning.reload()
    spy = KernelSpy(decode._mla_attn_kernel, fail=lambda m: m["BLOCK_N"] == 128)
    monkeypatch.setattr(decode, "_mla_attn_kernel", spy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = mla_kernels.mla_decode(*args)
        second = mla_kernels.mla_decode(*args)
    msgs = [str(w.message) for w in caught if "mla_kernels" in str(w.message)]
    assert len(msgs) == 1 and "failed to compile" in msgs[0] and "OutOfResources" in msgs[0]
    assert [m["BLOCK_N"] for m in spy.launches] == [128, 64, 64]
    assert torch.equal(first, heuristic_out) and torch.equal(second, heuristic_out)
    assert _tuning.lookup("decode", KEY, device) is None
    assert_close("fallback", first, expected, torch.float32)


def test_a_stored_config_shrunk_to_fit_shared_memory_still_falls_back(fake_gpu, monkeypatch, device):
    """A stored config the launch shrinks to fit the GPU's shared memory (``_utils.fit_shared``), which then fails
    to compile: one warning and the heuristic, as for a config that fits. Before, the shrunk copy was a plain dict,
    no longer known as stored, and the compile error reached the caller."""
    args, expected = decode_call(device)
    _tuning.save_file(_tuning.CONFIG_DIR / "test-gpu.json", device="Test GPU", sm_count=1, source="test",
                      kernels={"decode": {KEY: dict(BROKEN, num_stages=3)}})
    _tuning.reload()
    monkeypatch.setattr(_utils, "shared_memory_limit", lambda dev: 10 ** 6)
    monkeypatch.setattr(decode, "decode_shared_bytes", lambda cfg, *a: 2 * 10 ** 6 if cfg["BLOCK_N"] > 64 else 0)
    spy = KernelSpy(decode._mla_attn_kernel, fail=lambda m: m["num_stages"] == 3)
    monkeypatch.setattr(decode, "_mla_attn_kernel", spy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = mla_kernels.mla_decode(*args)
    msgs = [str(w.message) for w in caught if "mla_kernels" in str(w.message)]
    assert len(msgs) == 1 and "failed to compile" in msgs[0]
    assert [(m["BLOCK_N"], m["num_stages"]) for m in spy.launches] == [(64, 3), (64, 2)]  # shrunk, then heuristic
    assert _tuning.lookup("decode", KEY, device) is None
    assert_close("fallback from a shrunk stored config", out, expected, torch.float32)
    # a reload (mla_kernels.autotune, a sweep) keeps it dropped: the drop recorded the shrunk copy, which the file's
    # entry never equals, so the broken config was compiled again and a schedule built since was refused
    meta = mla_kernels.mla_decode_metadata(args[5], HEADS, kv_lora_rank=R, rope_dim=P, dtype=torch.float32,
                                           num_programs=3)
    _tuning.reload()
    assert _tuning.lookup("decode", KEY, device) is None
    assert_close("after reload", mla_kernels.mla_decode(*args, metadata=meta), expected, torch.float32)
    assert len(spy.launches) == 3 and spy.launches[-1]["num_stages"] == 2


def test_fit_shared_lowers_the_stages_once_the_tiles_are_smallest():
    """Past 16 x 16 tiles the pipeline stages go, one at a time, down to 1; the copy keeps the config's type."""
    stored = _tuning.Tuned(dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=4), "decode", KEY, 0)
    size = lambda cfg: cfg["BLOCK_M"] * cfg["BLOCK_N"] * cfg["num_stages"]  # noqa: E731
    fitted = _utils.fit_shared(stored, size, 16 * 16 * 2 + _utils.SHARED_SCRATCH_BYTES)
    assert fitted == dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2)
    assert type(fitted) is _tuning.Tuned and fitted.shape_class == KEY and stored["num_stages"] == 4
    assert _utils.fit_shared(stored, size, 10 ** 9) is stored


def test_a_compiler_pass_failure_falls_back_but_a_runtime_error_does_not(fake_gpu, monkeypatch, device):
    """An MLIR pass failing inside Triton's compiler raises a plain RuntimeError ("PassManager::run failed"): the
    stored config is dropped and the heuristic runs, as for OutOfResources. Any other RuntimeError (a CUDA error,
    say) is not the config's fault and propagates."""
    args, expected = decode_call(device)
    _tuning.save_file(_tuning.CONFIG_DIR / "test-gpu.json", device="Test GPU", sm_count=1, source="test",
                      kernels={"decode": {KEY: BROKEN}})
    _tuning.reload()
    other = KernelSpy(decode._mla_attn_kernel, fail=lambda m: m["BLOCK_N"] == 128,
                      error=lambda: RuntimeError("CUDA error: an illegal memory access was encountered"))
    monkeypatch.setattr(decode, "_mla_attn_kernel", other)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        mla_kernels.mla_decode(*args)
    assert _tuning.lookup("decode", KEY, device) is not None, "a runtime error must not drop the stored config"
    spy = KernelSpy(other.kernel, fail=lambda m: m["BLOCK_N"] == 128,
                    error=lambda: RuntimeError("PassManager::run failed"))
    monkeypatch.setattr(decode, "_mla_attn_kernel", spy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = mla_kernels.mla_decode(*args)
    assert [m["BLOCK_N"] for m in spy.launches] == [128, 64]
    assert any("failed to compile" in str(w.message) for w in caught)
    assert_close("after a pass failure", out, expected, torch.float32)


@pytest.mark.parametrize("fails", ["tiles", "stages"])
def test_metadata_survives_a_stored_config_that_fails_to_compile(fails, fake_gpu, monkeypatch, device):
    """A schedule built (once per step) for a stored config's tiles, then the config fails to compile at the first
    layer's launch: that launch and every later layer's run the heuristic's tiles with the schedule cut again on the
    device, and give the reference. Before, the fallback kept the failing tiles (OutOfResources again), or later
    layers refused the schedule as built for other tiles."""
    args, expected = decode_call(device)
    stored = dict(BROKEN, num_stages=3)  # 16 x 128, 3 stages
    _tuning.save_file(_tuning.CONFIG_DIR / "test-gpu.json", device="Test GPU", sm_count=1, source="test",
                      kernels={"decode": {KEY: stored}})
    _tuning.reload()
    meta = mla_kernels.mla_decode_metadata(args[5], HEADS, 1, kv_lora_rank=R, rope_dim=P, dtype=torch.float32,
                                           num_programs=3)
    assert (meta.block_m, meta.block_n) == (16, 128)
    fail = (lambda m: m["BLOCK_N"] == 128) if fails == "tiles" else (lambda m: m["num_stages"] == 3)
    spy = KernelSpy(decode._mla_attn_kernel, fail=fail)
    monkeypatch.setattr(decode, "_mla_attn_kernel", spy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [mla_kernels.mla_decode(*args, metadata=meta) for _ in range(3)]  # three layers, one schedule
    assert len([w for w in caught if "failed to compile" in str(w.message)]) == 1
    assert [m["BLOCK_N"] for m in spy.launches] == [128, 64, 64, 64]
    for layer, out in enumerate(outs):
        assert_close(f"layer {layer}", out, expected, torch.float32)


BAD_ENTRIES = {  # stored configs no kernel can launch
    "list": [16, 32, 4, 1],
    "string": "fast",
    "null": None,
    "empty": {},
    "unknown-key": dict(FAST, BLOCK_K=32),
    "missing-key": dict(BLOCK_M=16, BLOCK_N=32),
    "negative-block": dict(FAST, BLOCK_M=-16),
    "zero-block": dict(FAST, BLOCK_N=0),
    "block-24": dict(FAST, BLOCK_N=24),
    "block-8": dict(FAST, BLOCK_M=8),
    "string-block": dict(FAST, BLOCK_M="16"),
    "float-block": dict(FAST, BLOCK_N=32.0),
    "bool-block": dict(FAST, BLOCK_N=True),
    "warps-3": dict(FAST, num_warps=3),
    "string-warps": dict(FAST, num_warps="4"),
    "negative-stages": dict(FAST, num_stages=-1),
    "waves-string": dict(FAST, waves="2"),
    "waves-zero": dict(FAST, waves=0),
    "tma-string": dict(FAST, TMA="yes"),
    "evict-int": dict(FAST, EVICT=1),  # (a flag: true or false, as TMA and GLUON)
}


@pytest.mark.parametrize("case", list(BAD_ENTRIES), ids=list(BAD_ENTRIES))
def test_invalid_stored_configs_warn_once_and_run_the_heuristic(fake_gpu, monkeypatch, case, device):
    """A stored config of the wrong shape or with values no kernel launches crashed the call (a list, a string, a
    zero or non-power-of-two tile, a missing key) or, with a negative BLOCK_M, silently gave a wrong result: now it
    is dropped at its first lookup with one warning, and the call runs the heuristic (bit for bit); the file's other
    classes and kernels keep their configs; a sweep of that class does not trip on it either."""
    args, expected = decode_call(device)
    heuristic_out = mla_kernels.mla_decode(*args)
    write = dict(BLOCK_T=2, num_warps=1)
    path = _tuning.CONFIG_DIR / "test-gpu.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(dict(vendor=_tuning.vendor(), triton=triton.__version__, kernels={
        "decode": {KEY: BAD_ENTRIES[case], "R32/rows<=32": FAST}, "write_cache": {"R32/tokens<=256": write}})))
    _tuning.reload()
    spy = KernelSpy(decode._mla_attn_kernel)
    monkeypatch.setattr(decode, "_mla_attn_kernel", spy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = mla_kernels.mla_decode(*args)
        second = mla_kernels.mla_decode(*args)
        assert _tuning.lookup("decode", KEY, device) is None
    msgs = [str(w.message) for w in caught if "mla_kernels" in str(w.message)]
    assert len(msgs) == 1 and KEY in msgs[0], msgs
    assert [m["BLOCK_N"] for m in spy.launches] == [HEURISTIC["BLOCK_N"]] * 2
    assert torch.equal(first, heuristic_out) and torch.equal(second, heuristic_out)
    assert_close(case, first, expected, torch.float32)
    assert _tuning.lookup("decode", "R32/rows<=32", device) == FAST
    assert _tuning.lookup("write_cache", "R32/tokens<=256", device) == write

    _tuning.reload()  # the sweep reads the stored config too (it competes): an invalid one is left out
    (res,) = _autotune.sweep(["decode"], {"decode": [DECODE]}, device=device, out=None, timer=lambda fn: 1.0,
                             candidates={"decode": [FAST]}, log=lambda msg: None)
    assert res["winner"] is not None and not res["pruned"]


def test_write_cache_fallback_writes_everything_once(fake_gpu, monkeypatch, device):
    """write_cache with a stored config that does not compile: the cache is written in full by the retry."""
    _tuning.save_file(_tuning.CONFIG_DIR / "test-gpu.json", device="Test GPU", sm_count=1, source="test",
                      kernels={"write_cache": {_tuning.write_cache_class(5, R): dict(BLOCK_T=64, num_warps=4)}})
    _tuning.reload()
    spy = KernelSpy(cache._write_cache_kernel, fail=lambda m: m["BLOCK_T"] == 64)
    monkeypatch.setattr(cache, "_write_cache_kernel", spy)
    kv_cache, pe_cache = torch.zeros(4, 4, R, device=device), torch.zeros(4, 4, P, device=device)
    new = torch.randn(5, R + P).to(device)
    slots = torch.tensor([0, 5, 6, 11, 15], device=device)
    with pytest.warns(RuntimeWarning, match="failed to compile"):
        mla_kernels.write_cache(new[:, :R], new[:, R:], kv_cache, pe_cache, slots)
    assert [m["BLOCK_T"] for m in spy.launches] == [64, 8]
    assert torch.equal(kv_cache.view(-1, R)[slots], new[:, :R]) and torch.equal(pe_cache.view(-1, P)[slots], new[:, R:])


def test_expanded_prefill_fallback_gives_the_heuristics_result(fake_gpu, monkeypatch, device):
    """The expanded prefill with a stored config that does not compile: one warning, the launch retried with the
    heuristic's tiles, the heuristic's result bit for bit (the failed launch wrote nothing the retry keeps)."""
    lens, new = [16, 16], 5
    kv, pe, table = make_paged_cache(lens, PAGE, (R, P), torch.float32, device)
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2 * new, HEADS, 16, generator=g).to(device),
            torch.randn(2 * new, HEADS, P, generator=g).to(device), kv, pe, table, torch.tensor([0, new, 2 * new], dtype=torch.int32, device=device),
            torch.tensor(lens, dtype=torch.int32, device=device), torch.randn(HEADS * 32, R, generator=g).to(device),
            SCALE)
    heuristic_out = mla_kernels.mla_prefill_attention(*args, path="expanded")  # no file yet: the heuristic
    stored = dict(BLOCK_M=16, BLOCK_N=16, num_warps=2, num_stages=1)
    _tuning.save_file(_tuning.CONFIG_DIR / "test-gpu.json", device="Test GPU", sm_count=1, source="test",
                      kernels={"expanded": {_tuning.expanded_class(new, 16, 16): stored}})
    _tuning.reload()
    spy = KernelSpy(prefill._mla_expanded_kernel, fail=lambda m: m["num_warps"] == 2)
    monkeypatch.setattr(prefill, "_mla_expanded_kernel", spy)
    with pytest.warns(RuntimeWarning, match="failed to compile"):
        out = mla_kernels.mla_prefill_attention(*args, path="expanded")
    fallback_warps = prefill._expanded_heuristic(new)["num_warps"]
    assert fallback_warps != 2 and [m["num_warps"] for m in spy.launches] == [2, fallback_warps]
    assert torch.equal(out, heuristic_out)
    assert _tuning.lookup("expanded", _tuning.expanded_class(new, 16, 16), device) is None

def test_env_var_tunes_a_missing_class_once_on_first_use(fake_gpu, monkeypatch, device):
    """MLA_KERNELS_AUTOTUNE=1: the first call whose class has no config tunes it (here on a tiny benchmark shape
    with an injected timer), writes the user's cache file and launches the winner; the next call reuses it."""
    args, expected = decode_call(device)
    spy = KernelSpy(decode._mla_attn_kernel)
    monkeypatch.setattr(decode, "_mla_attn_kernel", spy)
    calls = []
    monkeypatch.setattr(_autotune, "ON_DEMAND_TIMER", fake_timer({16: 3.0, 32: 1.0, 64: 2.0}, calls))
    monkeypatch.setattr(_autotune, "ON_DEMAND_SHAPES", {"decode": [DECODE]})
    monkeypatch.setattr(_autotune.SPECS["decode"], "space", lambda key, dev, quick: [FAST])

    mla_kernels.mla_decode(*args)  # not set: no tuning, the heuristic
    assert not calls and spy.launches[-1]["BLOCK_N"] == 64 and not _tuning.user_file(0).exists()
    for off in ("0", "", "false", "False", "no", "OFF", " 0 "):  # "false" and "no" turned it on
        monkeypatch.setenv(_tuning.AUTOTUNE_ENV, off)
        mla_kernels.mla_decode(*args)
        assert not calls and spy.launches[-1]["BLOCK_N"] == 64, off

    monkeypatch.setenv(_tuning.AUTOTUNE_ENV, "1")
    out = mla_kernels.mla_decode(*args)
    assert calls and spy.launches[-1]["BLOCK_N"] == 32
    stored = json.loads(_tuning.user_file(0).read_text())
    # (the fp32 call tunes its own class, swept in fp32; a bf16 class stays as it was)
    assert stored["kernels"]["decode"] == {KEY32: FAST} and "MLA_KERNELS_AUTOTUNE" in stored["source"]
    assert_close("decode after on-demand tuning", out, expected, torch.float32)
    n = len(calls)
    mla_kernels.mla_decode(*args)
    assert len(calls) == n and spy.launches[-1]["BLOCK_N"] == 32


def test_unwritable_user_cache_gives_one_warning_and_no_wasted_sweep(fake_gpu, monkeypatch, device):
    """$XDG_CACHE_HOME is a file, so the user's cache cannot be read or written: reading it is a missing file (it
    warned "ignoring config file", a second warning beside the tuning one); MLA_KERNELS_AUTOTUNE=1 gives one warning
    and the heuristic without running a sweep whose winner it could not keep; mla_kernels.autotune fails at once
    naming the path, not after its first class's sweep."""
    blocker = fake_gpu / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    _tuning.reload()
    args, expected = decode_call(device)
    calls = []
    monkeypatch.setattr(_autotune, "ON_DEMAND_TIMER", fake_timer({16: 3.0, 32: 1.0, 64: 2.0}, calls))
    monkeypatch.setattr(_autotune, "ON_DEMAND_SHAPES", {"decode": [DECODE]})
    monkeypatch.setattr(_autotune.SPECS["decode"], "space", lambda key, dev, quick: [FAST])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        heuristic_out = mla_kernels.mla_decode(*args)
        monkeypatch.setenv(_tuning.AUTOTUNE_ENV, "1")
        outs = [mla_kernels.mla_decode(*args) for _ in range(2)]
    msgs = [str(w.message) for w in caught if "mla_kernels" in str(w.message)]
    # the first call, MLA_KERNELS_AUTOTUNE unset, says that this GPU has no file (test_tuning.py), the others only
    # that the folder cannot be written
    assert len(msgs) == 2 and "no tuned configs" in msgs[0], msgs
    assert "MLA_KERNELS_AUTOTUNE" in msgs[1] and str(blocker) in msgs[1], msgs
    assert not calls and all(torch.equal(out, heuristic_out) for out in outs)
    with pytest.raises(OSError, match="not-a-dir"):
        mla_kernels.autotune({"decode": [dict(B=2, ctx=40, H=HEADS, page=PAGE, R=R, P=P)]}, device=device,
                             timer=fake_timer({16: 3.0, 32: 1.0, 64: 2.0}, calls), log=lambda msg: None)
    assert not calls


def test_an_unwritable_user_cache_warns_once_for_every_shape_class(fake_gpu, monkeypatch, device):
    """MLA_KERNELS_AUTOTUNE=1 with a user cache that cannot be written, and a step that needs two shape classes (a
    decode and a write_cache one): each class found the folder unwritable anew and warned, naming itself (a serving
    process got one warning per class its model uses). Now the first class gives the one warning, naming the folder,
    and no later class tries again; both run the heuristic."""
    blocker = fake_gpu / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    monkeypatch.setenv(_tuning.AUTOTUNE_ENV, "1")
    monkeypatch.setattr(_autotune, "ON_DEMAND_TIMER", fake_timer({16: 3.0, 32: 1.0, 64: 2.0}))
    tried = []
    real = _autotune.tune_on_demand
    monkeypatch.setattr(_autotune, "tune_on_demand", lambda *a: tried.append(a[:2]) or real(*a))
    _tuning.reload()
    args, expected = decode_call(device)
    kv_cache, pe_cache = torch.zeros(4, 4, R, device=device), torch.zeros(4, 4, P, device=device)
    new = torch.randn(3, R + P).to(device)
    slots = torch.tensor([0, 5, 11], device=device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = mla_kernels.mla_decode(*args)
        mla_kernels.write_cache(new[:, :R], new[:, R:], kv_cache, pe_cache, slots)
    msgs = [str(w.message) for w in caught if "mla_kernels" in str(w.message)]
    assert len(msgs) == 1 and str(blocker) in msgs[0], msgs
    assert tried == [("decode", KEY32)]
    assert_close("the heuristic", out, expected, torch.float32)
    assert torch.equal(kv_cache.view(-1, R)[slots], new[:, :R]) and torch.equal(pe_cache.view(-1, P)[slots], new[:, R:])


def test_a_read_only_user_cache_folder_is_found_before_any_sweep(fake_gpu, monkeypatch, device):
    """The user's cache folder exists but cannot be written (another user's; simulated: creating a file there is
    refused, as chmod does not stop root): both mla_kernels.autotune and MLA_KERNELS_AUTOTUNE=1 timed a whole
    class before finding it out when saving its winner."""
    import tempfile

    folder = _tuning.user_file(0).parent
    folder.mkdir(parents=True)
    real = tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == folder:
            raise PermissionError(13, "Permission denied", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    calls = []
    monkeypatch.setattr(_autotune, "ON_DEMAND_TIMER", fake_timer({16: 3.0, 32: 1.0, 64: 2.0}, calls))
    monkeypatch.setattr(_autotune, "ON_DEMAND_SHAPES", {"decode": [DECODE]})
    monkeypatch.setattr(_autotune.SPECS["decode"], "space", lambda key, dev, quick: [FAST])
    with pytest.raises(PermissionError, match=re.escape(str(folder))):
        mla_kernels.autotune({"decode": [dict(B=2, ctx=40, H=HEADS, page=PAGE, R=R, P=P)]}, device=device,
                             timer=fake_timer({16: 3.0, 32: 1.0, 64: 2.0}, calls), log=lambda msg: None)
    args, expected = decode_call(device)
    monkeypatch.setenv(_tuning.AUTOTUNE_ENV, "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = mla_kernels.mla_decode(*args)
    msgs = [str(w.message) for w in caught if "mla_kernels" in str(w.message)]
    assert len(msgs) == 1 and str(folder) in msgs[0], msgs
    assert not calls
    assert_close("the heuristic", out, expected, torch.float32)


def test_user_file_overrides_the_shipped_one_per_class(fake_gpu, device):
    shipped = {"decode": {KEY: HEURISTIC, "R32/rows<=32": FAST}}
    _tuning.save_file(_tuning.CONFIG_DIR / "test-gpu.json", device="Test GPU", sm_count=1, source="shipped",
                      kernels=shipped, constants={"a": 1.0, "b": 2.0})
    _tuning.save_file(_tuning.user_file(0), device="Test GPU", sm_count=1, source="user",
                      kernels={"decode": {KEY: WRONG}}, constants={"b": 3.0})
    _tuning.reload()
    assert _tuning.lookup("decode", KEY, device) == WRONG
    assert _tuning.lookup("decode", "R32/rows<=32", device) == FAST
    assert (_tuning.constant("a", device), _tuning.constant("b", device)) == (1.0, 3.0)


def test_an_invalid_user_entry_leaves_the_shipped_config_of_its_class(fake_gpu, device):
    """A user's entry no kernel can launch (a hand edit) hid the shipped config of its class: the class ran the
    heuristic. Now the shipped config runs there, with one warning naming the user's file; the user's valid entries
    still win, and an invalid one of a class with no shipped config is dropped at lookup as before."""
    shipped = {"decode": {KEY: FAST, "R32/rows<=32": FAST}}
    _tuning.save_file(_tuning.CONFIG_DIR / "test-gpu.json", device="Test GPU", sm_count=1, source="shipped",
                      kernels=shipped)
    user = {"decode": {KEY: dict(FAST, BLOCK_N=24), "R32/rows<=32": WRONG, "R32/rows<=64": dict(FAST, BLOCK_M=8)}}
    _tuning.save_file(_tuning.user_file(0), device="Test GPU", sm_count=1, source="user", kernels=user)
    _tuning.reload()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _tuning.lookup("decode", KEY, device) == FAST
        assert _tuning.lookup("decode", "R32/rows<=32", device) == WRONG
        assert _tuning.lookup("decode", "R32/rows<=64", device) is None
    msgs = [str(w.message) for w in caught if "mla_kernels" in str(w.message)]
    assert len(msgs) == 2, msgs
    assert KEY in msgs[0] and str(_tuning.user_file(0)) in msgs[0] and "shipped" in msgs[0], msgs
    assert "R32/rows<=64" in msgs[1], msgs


@pytest.mark.parametrize("running", ["cuda", "hip"])
def test_nvidia_and_rocm_configs_never_mix(fake_gpu, monkeypatch, running, device):
    """A file tuned on one vendor's GPU is ignored (one warning) on the other's, even at the same path: the
    shipped file here is NVIDIA's, the user's ROCm's."""
    _tuning.save_file(_tuning.CONFIG_DIR / "test-gpu.json", device="Test GPU", sm_count=1, source="nvidia",
                      kernels={"decode": {KEY: FAST}}, vendor_key="cuda")
    _tuning.save_file(_tuning.user_file(0), device="Test GPU", sm_count=1, source="rocm",
                      kernels={"decode": {KEY: WRONG}}, vendor_key="hip")
    monkeypatch.setattr(_tuning, "vendor", lambda: running)
    _tuning.reload()
    with pytest.warns(RuntimeWarning, match="is for vendor"):
        got = _tuning.lookup("decode", KEY, device)
    assert got == (FAST if running == "cuda" else WRONG)


def test_autotune_needs_a_gpu_or_a_timer(device):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="needs a GPU"):
        mla_kernels.autotune()
    with pytest.raises(ValueError, match="unknown kernel 'decoder'"):
        mla_kernels.autotune({"decoder": [{}]}, timer=lambda fn: 1.0)
    with pytest.raises(ValueError, match=r"unknown sizes \['heads'\]"):
        mla_kernels.autotune({"decode": [dict(heads=8)]}, timer=lambda fn: 1.0)
    with pytest.raises(TypeError, match="shapes must be a dict"):
        mla_kernels.autotune([dict(H=8)], timer=lambda fn: 1.0)


TINY_DECODE = {"decode": [dict(B=1, ctx=8, H=2, R=16, P=16, page=4)]}
BAD_AUTOTUNE = {  # argument -> (error, message): refused before anything is tuned
    "kernels-empty": (dict(kernels=[]), ValueError, "kernels: none given"),  # tuned every kernel
    "kernels-an-int": (dict(kernels=5), TypeError, "kernels must be a sequence"),  # 'int' is not iterable
    "device-unknown": (dict(device="nope"), ValueError, "device 'nope'"),  # torch's RuntimeError
    "items-not-a-list": (dict(shapes={"decode": dict(H=8)}), TypeError, r"shapes\['decode'\] must be a list"),
    "item-not-a-dict": (dict(shapes={"decode": [8]}), TypeError, r"shapes\['decode'\] must be a list"),
    "heads-zero": (dict(shapes={"decode": [dict(H=0)]}), ValueError, "H must be >= 1"),  # every candidate pruned
    "heads-float": (dict(shapes={"decode": [dict(H=8.0)]}), ValueError, "H must be an int"),
    "rank-24": (dict(shapes={"decode": [dict(R=24)]}), ValueError, "R must be a power of two"),
    "ctx-negative": (dict(shapes={"decode": [dict(ctx=-5)]}), ValueError, "ctx must be >= 1"),
    "ctx-below-s_q": (dict(shapes={"decode": [dict(ctx=2, S_q=4)]}), ValueError, "S_q"),
    "ctx-one-below-s_q": (dict(shapes={"decode": [dict(ctx=3, S_q=4)]}), ValueError, "S_q"),
    "hist-negative": (dict(shapes={"prefill": [dict(hist=-1)]}), ValueError, "hist must be >= 0"),
    "width-V-48": (dict(shapes={"expanded": [dict(V=48)]}), ValueError, "V must be a power of two"),
    "dtype-int": (dict(dtype=torch.int32), TypeError, "dtype"),
    # float64 has a check tolerance (the benchmarks' float64 rows share the check) but no tuned configs
    "dtype-float64": (dict(dtype=torch.float64, shapes=TINY_DECODE), TypeError, "dtype must be one of"),
    "budget-string": (dict(budget_s="10"), TypeError, "budget_s"),
    # these four with one small shape (accepted, they tuned nothing ("budget spent"), ignored the budget, pruned
    # every candidate "failed: TypeError", or raised a TypeError after the first class was swept and written)
    "budget-negative": (dict(budget_s=-1, shapes=TINY_DECODE), ValueError, "budget_s"),
    "budget-nan": (dict(budget_s=float("nan"), shapes=TINY_DECODE), ValueError, "budget_s"),
    "timer-an-int": (dict(timer=5, shapes=TINY_DECODE), TypeError, "timer"),
    "log-an-int": (dict(log=5, shapes=TINY_DECODE), TypeError, "log"),
    "device-meta": (dict(device="meta"), ValueError, "device 'meta'"),  # torch's RuntimeError, naming no argument
    "quick-a-string": (dict(quick="no"), TypeError, "quick must be a bool"),  # read as True: tuned quickly
    "quick-none": (dict(quick=None), TypeError, "quick must be a bool"),  # read as False: the full sweep
    "out-an-int": (dict(out=123), TypeError, "out must be a file path"),  # Path()'s TypeError, naming nothing
    "out-bytes": (dict(out=b"/tmp/x.json"), TypeError, "out must be a file path"),
}


@pytest.mark.parametrize("case", list(BAD_AUTOTUNE), ids=list(BAD_AUTOTUNE))
def test_autotune_bad_arguments_are_refused_before_tuning(fake_gpu, case, device):
    kwargs, error, match = BAD_AUTOTUNE[case]
    calls = []
    with pytest.raises(error, match=match):
        mla_kernels.autotune(**dict(dict(device=device, log=lambda msg: None, timer=fake_timer({}, calls)), **kwargs))
    assert not calls and not _tuning.user_file(0).exists()


@pytest.mark.parametrize("kwargs,match", [
    (dict(shapes={"decode": []}), r"shapes\['decode'\] is empty"),
    (dict(shapes={"prefill": [dict(H=2)]}, kernels="decode"),
     r"shapes names \['prefill'\], which kernels=\['decode'\]"),
], ids=["empty-list", "kernel-left-out"])
def test_autotune_refuses_shapes_it_would_not_tune(fake_gpu, monkeypatch, kwargs, match, device):
    """Shapes the sweep would not use as given: an empty list for a kernel (the sweep took it for none given and
    tuned the kernel's whole default set, minutes on a GPU), or shapes of a kernel that ``kernels`` leaves out
    (dropped silently, and the kernels named tuned at their default shapes). A ValueError naming shapes."""
    swept = []
    monkeypatch.setattr(_autotune, "sweep", lambda kernels, shapes, **kw: swept.append((kernels, shapes)) or [])
    with pytest.raises(ValueError, match=match):
        mla_kernels.autotune(**kwargs, device=device, timer=fake_timer({}), log=lambda msg: None)
    assert not swept


def test_autotune_kernels_as_a_string_and_out_a_directory(fake_gpu, monkeypatch, device):
    """kernels="decode" is one kernel (it was split into letters: "unknown ['d', 'e', ...]"); an ``out`` that is a
    directory fails before the sweep (it failed writing after the first class, with a warning too)."""
    monkeypatch.setattr(_autotune.SPECS["decode"], "space", lambda key, dev, quick: [FAST])
    shapes = {"decode": [dict(B=2, ctx=40, H=HEADS, page=PAGE, R=R, P=P)]}
    res = mla_kernels.autotune(shapes, kernels="decode", device=device, timer=fake_timer({32: 1.0, 64: 2.0}),
                               log=lambda msg: None)
    assert [r["winner"] for r in res] == [FAST]
    calls = []
    with pytest.raises(IsADirectoryError, match="directory"):
        mla_kernels.autotune(shapes, device=device, out=fake_gpu, timer=fake_timer({32: 1.0, 64: 2.0}, calls),
                             log=lambda msg: None)
    assert not calls


def test_a_gpu_index_past_the_gpus_is_refused_naming_the_device(fake_gpu, monkeypatch, capsys):
    """mla_kernels.autotune(device="cuda:3") and bench.autotune --device cuda:3 on a machine with one GPU: torch's
    AssertionError ("Invalid device id", naming no argument) came from the sweep's first query of the device; now a
    ValueError (the CLI: a usage error) naming it, before anything is tuned."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    calls = []
    with pytest.raises(ValueError, match="device 'cuda:3' names GPU 3, but torch sees 1"):
        mla_kernels.autotune({"decode": [dict(B=2, ctx=40, H=HEADS, page=PAGE, R=R, P=P)]}, device="cuda:3",
                             timer=fake_timer({}, calls), log=lambda msg: None)
    assert not calls and not _tuning.user_file(0).exists()
    from bench import autotune as cli

    with pytest.raises(SystemExit) as exc:
        cli.parse_args(["--device", "cuda:3"])
    assert exc.value.code == 2 and "--device: cuda:3 names GPU 3" in capsys.readouterr().err
    assert cli.parse_args(["--device", "cuda:0"]).device == "cuda:0"


@pytest.mark.parametrize("argv,match", [
    (["--kernels", ","], "none given"),  # an empty list tuned every kernel
    (["--kernels", "decoder"], "unknown"),
    (["--device", "foo"], "--device"),  # a RuntimeError traceback
    (["--budget", "-1"], "--budget"),
    (["--budget", "nan"], "--budget"),
])
def test_cli_bad_arguments_are_usage_errors(argv, match, capsys):
    from bench import autotune as cli

    with pytest.raises(SystemExit) as exc:
        cli.parse_args(argv)
    assert exc.value.code == 2 and match in capsys.readouterr().err
    assert cli.parse_args(["--kernels", "decode,decode, write_cache"]).kernels == ["decode", "write_cache"]


def test_autotune_public_call_writes_the_users_cache(fake_gpu, monkeypatch, device):
    monkeypatch.setattr(_autotune.SPECS["decode"], "space", lambda key, dev, quick: [FAST])
    res = mla_kernels.autotune({"decode": [dict(B=2, ctx=40, H=HEADS, page=PAGE, R=R, P=P)]}, device=device,
                               timer=fake_timer({32: 1.0, 64: 2.0}), log=lambda msg: None)
    assert res[0]["winner"] == FAST
    assert str(_tuning.user_file(0)).startswith(str(fake_gpu / "cache" / "mla_kernels"))
    assert json.loads(_tuning.user_file(0).read_text())["kernels"]["decode"][KEY] == FAST


def test_shape_classes_and_the_seeded_h100_file():
    """Buckets of rows (16/32/64/more) and the migrated H100 file: every rows count gets the config the
    two-bucket file gave it (16 x 32 tiles up to 16 rows, 64 x 64 above)."""
    assert [_tuning.decode_class(r) for r in (1, 16, 17, 32, 33, 64, 65, 1024)] == [
        "R512/rows<=16", "R512/rows<=16", "R512/rows<=32", "R512/rows<=32", "R512/rows<=64", "R512/rows<=64",
        "R512/rows>64", "R512/rows>64"]
    assert _tuning.expanded_class(64) == "N128/V128/new<=64" and _tuning.expanded_class(65) == "N128/V128/new<=1024"
    assert _tuning.prefill_class(4096, 16) == "R512/rows>4096"
    assert _tuning.write_cache_class(128, fp8=True) == "R512/fp8/tokens<=256"
    table = _tuning.load_file(_tuning.CONFIG_DIR / "nvidia-h100-80gb-hbm3.json", "cuda", "3.6.0")["decode"]
    for rows in (1, 8, 16, 17, 32, 64, 128, 256):
        want = dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2) if rows <= 16 else \
            dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)
        assert table[_tuning.decode_class(rows)] == want, rows


def test_autotune_takes_log_none_as_quiet(fake_gpu, monkeypatch, device, capsys):
    """``log=None`` asks for no messages: it raised "'NoneType' object is not callable" once the first class had
    been swept (and written to the file)."""
    monkeypatch.setattr(_autotune.SPECS["decode"], "space", lambda key, dev, quick: [FAST])
    out = fake_gpu / "quiet.json"
    (res,) = mla_kernels.autotune({"decode": [DECODE]}, device=device, out=out, log=None,
                                  timer=fake_timer({32: 1.0, 64: 2.0}))
    assert res["winner"] == FAST and json.loads(out.read_text())["kernels"] == {"decode": {KEY: FAST}}
    assert capsys.readouterr().out == ""


def test_cli_off_a_gpu_writes_no_config_file_unless_told(fake_gpu, monkeypatch, device):
    """bench.autotune with a timer on the CPU (tests) and no ``--out``: the interpreter's timings went into the
    package's configs folder as a file for the CPU's name, beside the shipped ones. Now nothing is written."""
    from bench import autotune as cli

    monkeypatch.setattr(_autotune.SPECS["decode"], "space", lambda key, dev, quick: [FAST])
    report = fake_gpu / "report.json"
    (res,) = cli.main(["--kernels", "decode", "--results", str(report), "--device", str(device)],
                      timer=fake_timer({32: 1.0, 64: 2.0}), shapes={"decode": [DECODE]})
    assert res["winner"] == FAST
    assert not _tuning.CONFIG_DIR.exists() or not any(_tuning.CONFIG_DIR.iterdir())
    assert json.loads(report.read_text())["config_file"] is None


@pytest.mark.parametrize("check", ["autotune", "bench"])
def test_checks_refuse_one_row_left_wrong_among_many(check):
    """One relative RMS over a large output hides a row left wrong: a dropped token of 32768 moves it by
    1/sqrt(32768) = 0.55%, under bf16's 1% bound, so a sweep candidate that skipped a tile tail passed, won and was
    stored. Each row (last dimension) is checked too, at 4x the RMS bound (bf16's rounding of a row is ~0.4%)."""
    from bench import _harness as h

    check_close = _autotune.check_close if check == "autotune" else h.check_close
    expected = torch.randn(32768, 64, generator=torch.Generator().manual_seed(0))
    noisy = expected * (1 + 2e-3 * torch.randn(expected.shape, generator=torch.Generator().manual_seed(1)))
    check_close("rounding-sized noise", noisy, expected, torch.bfloat16)
    dropped = noisy.clone()
    dropped[-1] = 0.0
    with pytest.raises(AssertionError, match="row"):
        check_close("the last row dropped", dropped, expected, torch.bfloat16)


def test_budget_spent_leaves_classes_untuned_and_unwritten(fake_gpu, device):
    out, seen = fake_gpu / "budget.json", []
    res = _autotune.sweep(["decode"], {"decode": [DECODE]}, device=device, out=out, timer=lambda fn: 1.0,
                          budget_s=-1.0, log=lambda msg: None, on_result=seen.append)
    assert res == seen and res[0]["winner"] is None and "budget" in res[0]["note"] and not out.exists()


def test_compiled_step_with_metadata_on_a_gpu_with_a_config_file(fake_gpu, device):
    """On a GPU, mla_decode(metadata=...) checks the schedule's tiles while torch.compile traces, which looks the
    tiles up in the GPU's config file: dynamo ignores lru_cache and traced the file I/O (fullgraph: Unsupported).
    The fake GPU reads files as a GPU does. The config file then changes (a later mla_kernels.autotune(), or
    MLA_KERNELS_AUTOTUNE=1 tuning the class on the first real run): the compiled step must still run, cut again."""
    stored = _tuning.CONFIG_DIR / "test-gpu.json"
    _tuning.save_file(stored, device="Test GPU", sm_count=8, source="test", kernels={"decode": {KEY: FAST}})
    _tuning.reload()
    args, expected = decode_call(device)
    meta = mla_kernels.mla_decode_metadata(args[5], HEADS, kv_lora_rank=R, rope_dim=P, dtype=torch.float32,
                                           num_programs=3)
    assert meta.block_n == FAST["BLOCK_N"]

    def step(q_nope, seqlens, meta):
        return mla_kernels.mla_decode(q_nope, *args[1:5], seqlens, SCALE, metadata=meta)

    compiled = torch.compile(step, backend="eager", fullgraph=True)
    assert_close("compiled, metadata", compiled(args[0], args[5], meta), expected, torch.float32)
    _tuning.save_file(stored, device="Test GPU", sm_count=8, source="test", kernels={"decode": {KEY: HEURISTIC}})
    _tuning.reload()
    assert_close("compiled, metadata, file changed", compiled(args[0], args[5], meta), expected, torch.float32)


def test_a_tma_candidate_the_library_would_shrink_is_pruned_too(fake_gpu, monkeypatch, device):
    """Where the TMA kernel cannot serve the shape (BLOCK_N 128 on pages of 16), a stored TMA config runs on the
    portable kernel with tiles fitted by that kernel's estimate, so a TMA candidate over it would be timed at its own
    tiles and run shrunk: the sweep prunes it like the others."""
    monkeypatch.setattr(mla_kernels._utils, "shared_memory_limit", lambda dev: 40000)
    huge_tma = dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3, TMA=True)
    (res,) = _autotune.sweep(["decode"], {"decode": [DECODE]}, device=device, out=None,
                             timer=fake_timer({128: 0.1, 32: 1.0, 64: 2.0}), candidates={"decode": [huge_tma, FAST]},
                             log=lambda line: None)
    winner = res["winner"]
    runs = decode._fit_tiles(winner, device, R, P, 4, False)
    assert (runs["BLOCK_M"], runs["BLOCK_N"], runs["num_stages"]) == \
        (winner["BLOCK_M"], winner["BLOCK_N"], winner["num_stages"]), "the stored winner would not run as timed"
    assert any(p["config"] == huge_tma and p["reason"].startswith("over the shared-memory") for p in res["pruned"])


def test_a_tma_candidate_its_own_kernel_fits_is_timed_and_runs_as_stored(fake_gpu, monkeypatch, device):
    """The TMA kernel holds the query block and two key blocks whatever its stage count (decode_shared_bytes with
    ``tma``), so the TMA probe's 16-row winner (16 x 64, 3 stages) fits an H100 by its count (165888 B) and not by
    the portable kernel's (239616 B). Where the TMA kernel serves the shape (16-bit inputs, pages of whole tiles)
    such a candidate is timed, not pruned, and once stored it launches on that kernel with its own tiles (it ran as
    16 x 32); on pages of 16, which that kernel cannot serve, the same stored config is fitted for the portable
    kernel, which runs it."""
    # R 32 + P 16 in bf16: 16 x 64 x 3 stages is 13824 bytes for the TMA kernel, 19968 for the portable one; with
    # the 4 KiB allowance only the TMA count is under 20000 (the heuristic's 16 x 64 x 2 stages, 13824, fits too)
    monkeypatch.setattr(mla_kernels._utils, "shared_memory_limit", lambda dev: 20000)
    probe = dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=3, TMA=True)
    out = _tuning.CONFIG_DIR / "test-gpu.json"
    (res,) = _autotune.sweep(["decode"], {"decode": [dict(DECODE, page=64)]}, device=device, out=out,
                             timer=lambda fn: 0.1 if fn.config.get("TMA") else 1.0,
                             candidates={"decode": [probe, FAST]}, log=lambda line: None)
    assert res["winner"] == probe and not res["pruned"], res["pruned"]
    assert _tuning.lookup("decode", KEY, device) == probe

    from mla_kernels import decode_tma
    tma_spy, portable_spy = KernelSpy(decode_tma._mla_attn_tma_kernel), KernelSpy(decode._mla_attn_kernel)
    monkeypatch.setattr(decode_tma, "_mla_attn_tma_kernel", tma_spy)
    monkeypatch.setattr(decode, "_mla_attn_kernel", portable_spy)
    from mla_kernels.reference import absorbed_decode
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 1, HEADS, R + P, generator=g).to(device, torch.bfloat16)
    for page, spy, tiles in ((64, tma_spy, (16, 64, 3)), (16, portable_spy, (16, 32, 3))):
        kv, pe, table = make_paged_cache([40, 23], page, (R, P), torch.bfloat16, device, generator_seed=1)
        args = (q[..., :R], q[..., R:], kv, pe, table, torch.tensor([40, 23], dtype=torch.int32, device=device),
                SCALE)
        expected, _ = absorbed_decode(*args)
        assert_close(f"stored TMA config, page {page}", mla_kernels.mla_decode(*args), expected, torch.bfloat16)
        launch = spy.launches[-1]
        assert (launch["BLOCK_M"], launch["BLOCK_N"], launch["num_stages"]) == tiles, (page, launch)
    assert len(tma_spy.launches) == 1 and len(portable_spy.launches) == 1


def test_a_reload_keeps_a_dropped_config_dropped(fake_gpu, monkeypatch, device):
    """A stored config that failed to compile is dropped for this process; a schedule built afterwards is cut for
    the heuristic's tiles. mla_kernels.autotune, a sweep, and MLA_KERNELS_AUTOTUNE=1 tuning another class all reload
    the files: that forgot the drop, so the broken config was compiled (and failed) again and the valid schedule
    was refused with a ValueError."""
    stored = _tuning.CONFIG_DIR / "test-gpu.json"
    _tuning.save_file(stored, device="Test GPU", sm_count=8, source="test", kernels={"decode": {KEY: BROKEN}})
    _tuning.reload()
    spy = KernelSpy(decode._mla_attn_kernel, fail=lambda meta: meta["BLOCK_N"] == BROKEN["BLOCK_N"])
    monkeypatch.setattr(decode, "_mla_attn_kernel", spy)
    args, expected = decode_call(device)
    with pytest.warns(RuntimeWarning, match="failed to compile"):
        mla_kernels.mla_decode(*args)
    meta = mla_kernels.mla_decode_metadata(args[5], HEADS, kv_lora_rank=R, rope_dim=P, dtype=torch.float32,
                                           num_programs=3)
    assert meta.block_n == HEURISTIC["BLOCK_N"]
    _tuning.reload()
    assert_close("after reload", mla_kernels.mla_decode(*args, metadata=meta), expected, torch.float32)
    mla_kernels.mla_decode(*args)
    assert sum(launch["BLOCK_N"] == BROKEN["BLOCK_N"] for launch in spy.launches) == 1
    # another config stored for the class since is used
    _tuning.save_file(stored, device="Test GPU", sm_count=8, source="test", kernels={"decode": {KEY: FAST}})
    _tuning.reload()
    mla_kernels.mla_decode(*args)
    assert spy.launches[-1]["BLOCK_N"] == FAST["BLOCK_N"]


def test_default_out_of_an_index_less_cuda_device_is_the_current_gpus(monkeypatch, tmp_path):
    """mla_kernels.autotune(device="cuda") tunes the current GPU (the sweep's launches and _tuning's lookups use
    it); its default output must be that GPU's user file, not GPU 0's (two kinds of GPU in one machine)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(_tuning, "_device_name", lambda index: f"GPU kind {index}")
    assert _autotune.default_out(torch.device("cuda")).endswith("gpu-kind-1.json")
    assert _autotune.default_out(torch.device("cuda", 0)).endswith("gpu-kind-0.json")
    assert _autotune.default_out(torch.device("cpu")) is None  # a CPU sweep with a timer: no GPU's file


def test_autotune_off_a_gpu_writes_no_gpus_file(monkeypatch, tmp_path):
    """mla_kernels.autotune(device="cpu", timer=...) on a machine with a GPU wrote the interpreter's winners into
    GPU 0's user cache, which the library then loaded for that GPU; on a CPU-only torch it failed asking for GPU
    0's name. Now it writes nothing unless out= is given; device="cuda" with no GPU visible is refused."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(_tuning, "_device_name", lambda index: "NVIDIA H100 80GB HBM3")  # GPU 0, were there one
    monkeypatch.setattr(_autotune.SPECS["decode"], "space", lambda key, dev, quick: [FAST])
    shape = {"decode": [dict(B=2, ctx=40, H=HEADS, page=PAGE, R=R, P=P)]}
    if not _utils.interpreting():  # natively (a GPU machine's suite) a CPU sweep is refused before it writes anything
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            mla_kernels.autotune(shape, device="cpu", timer=fake_timer({32: 1.0, 64: 2.0}), log=lambda msg: None)
        assert not list(tmp_path.rglob("*.json"))
        return
    res = mla_kernels.autotune(shape, device="cpu", timer=fake_timer({32: 1.0, 64: 2.0}), log=lambda msg: None)
    assert res[0]["winner"] == FAST and not list(tmp_path.rglob("*.json"))
    out = tmp_path / "cpu.json"
    mla_kernels.autotune(shape, device="cpu", out=out, timer=fake_timer({32: 1.0, 64: 2.0}), log=lambda msg: None)
    assert json.loads(out.read_text())["kernels"]["decode"][KEY] == FAST
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no GPU is visible"):
            mla_kernels.autotune(shape, device="cuda", timer=fake_timer({}), log=lambda msg: None)


def test_env_var_values_that_turn_tuning_on_and_a_class_is_tried_once(fake_gpu, monkeypatch, device):
    """Any value of MLA_KERNELS_AUTOTUNE but the "off" ones turns on-demand tuning on ("true", "yes", "on" too), and
    a class is tried once per process: one whose tuning found nothing (every candidate pruned, no benchmark shape,
    an error) is not tuned again on every later lookup."""
    asked = []
    monkeypatch.setattr(_autotune, "tune_on_demand", lambda kernel, key, index: asked.append((kernel, key)) or None)
    for on in ("1", "true", "YES", "on", " 2 "):
        monkeypatch.setattr(_tuning, "_tried", set())
        monkeypatch.setenv(_tuning.AUTOTUNE_ENV, on)
        assert _tuning.lookup("decode", KEY, device) is None
        assert _tuning.lookup("decode", KEY, device) is None
        assert asked == [("decode", KEY)], on
        asked.clear()


def test_metadata_for_an_fp8_cache_cuts_the_tiles_an_fp8_call_runs(fake_gpu, device):
    """A stored 32 x 64, 3-stage config at R 512 fits the H100's shared memory with an fp8 cache (the stages hold
    e4m3 keys: 225280 bytes) but not with a bf16 one (258048: shrunk to 32 x 32): mla_decode_metadata(cache_dtype=
    float8_e4m3fn) must cut along the fp8 call's tiles, or that call refuses the schedule."""
    stored = dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=3)
    _tuning.save_file(_tuning.CONFIG_DIR / "test-gpu.json", device="Test GPU", sm_count=8, source="test",
                      kernels={"decode": {_tuning.decode_class(16, 512): stored}})
    _tuning.reload()
    seqlens = torch.tensor([300, 0, 40], dtype=torch.int32, device=device)
    fp8 = mla_kernels.mla_decode_metadata(seqlens, 16, cache_dtype=torch.float8_e4m3fn, num_programs=3)
    bf16 = mla_kernels.mla_decode_metadata(seqlens, 16, num_programs=3)
    assert (fp8.block_m, fp8.block_n) == decode.schedule_tiles(16, 512, device, 64, 2, True) == (32, 64)
    assert (bf16.block_m, bf16.block_n) == decode.schedule_tiles(16, 512, device, 64, 2, False) == (32, 32)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3), (torch.float32, 1e-3)],
                         ids=["bf16", "fp16", "fp32"])
def test_check_close_tolerances(dtype, tol):
    """A candidate's output within the dtype's relative RMS tolerance passes, one at twice it is pruned, and a
    non-finite output where the reference is finite is pruned as such."""
    expected = torch.randn(4096, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert _autotune.check_close("ok", expected * (1 + tol / 2), expected, dtype) == pytest.approx(tol / 2)
    with pytest.raises(_autotune.WrongResult, match="relative RMS error"):
        _autotune.check_close("off", expected * (1 + 2 * tol), expected, dtype)
    nan = expected.clone()
    nan[7] = float("nan")
    with pytest.raises(_autotune.WrongResult, match="non-finite"):
        _autotune.check_close("nan", nan, expected, dtype)


def shape_timer(ms_by_block_n):
    """A timer whose time depends on the shape too: ``ms_by_block_n[BLOCK_N][i]`` for the class's i-th shape (the
    sweep runs each config over the shapes in order; the first config seen tells the shapes' order)."""
    order = {}

    def timer(fn):
        index = order.setdefault(fn.fn, len(order))
        return ms_by_block_n[fn.config["BLOCK_N"]][index]
    return timer


def test_winner_by_geometric_mean_and_the_heuristics_time_per_shape(fake_gpu, device):
    """The winner has the lowest geometric mean over the class's shapes (FAST: 1 and 64 ms, 8 ms; the other: 10 and
    10 ms, which an arithmetic mean would pick), and the heuristic's time is reported per shape."""
    other = dict(FAST, BLOCK_N=16)
    (res,) = _autotune.sweep(["decode"], {"decode": [DECODE, dict(DECODE, B=1, ctx=70, page=4)]}, device=device,
                             out=None, timer=shape_timer({64: [100.0, 200.0], 32: [1.0, 64.0], 16: [10.0, 10.0]}),
                             candidates={"decode": [other, FAST]}, log=lambda msg: None)
    assert res["winner"] == FAST and res["after_geomean_ms"] == pytest.approx(8.0)
    assert res["before_ms"] == [100.0, 200.0] and res["speedup"] == pytest.approx(math.sqrt(100 * 200) / 8)


@pytest.mark.parametrize("stored_ms", [0.5, 5.0], ids=["stored-faster", "stored-slower"])
def test_the_stored_config_competes_in_a_sweep(fake_gpu, device, stored_ms):
    """The config the device's file holds for the class now is a candidate of its sweep although the space does not
    list it: kept when it is still the fastest, replaced when a candidate beats it. An invalid stored entry is
    never a candidate (it would be timed and could be written back)."""
    stored = dict(FAST, BLOCK_N=16)  # not in the candidates below
    _tuning.save_file(_tuning.CONFIG_DIR / "test-gpu.json", device="Test GPU", sm_count=132, source="test",
                      kernels={"decode": {KEY: stored}})
    _tuning.reload()
    timed = []

    def timer(fn):
        timed.append(dict(fn.config))
        return {16: stored_ms, 32: 1.0, 64: 2.0}[fn.config["BLOCK_N"]]

    (res,) = _autotune.sweep(["decode"], {"decode": [DECODE]}, device=device, out=None, timer=timer,
                             candidates={"decode": [FAST]}, log=lambda msg: None)
    assert stored in timed
    # (the winner is then tried with each split knob, timed alike here: the first timed of equals stays)
    assert res["winner"] == (stored if stored_ms < 1.0 else FAST)

    bad = dict(FAST, BLOCK_N=24)  # not a power of two: _tuning.config_error refuses it
    assert _tuning.config_error("decode", bad) is not None
    _tuning.save_file(_tuning.CONFIG_DIR / "test-gpu.json", device="Test GPU", sm_count=132, source="test",
                      kernels={"decode": {KEY: bad}})
    _tuning.reload()
    timed.clear()
    _autotune.sweep(["decode"], {"decode": [DECODE]}, device=device, out=None, timer=timer,
                    candidates={"decode": [FAST]}, log=lambda msg: None)
    assert bad not in timed and FAST in timed


def test_the_split_knob_and_the_evict_hint_are_tried_on_the_winner(fake_gpu, monkeypatch, device):
    """Decode's winner is tried again with each split-count knob (waves 1, 2, 4) and with its cache loads marked
    evict-first (EVICT, FlashMLA's hint on its cache stream); a faster one wins. A config met twice (its keys in
    another order) is one candidate. A stored EVICT reaches the kernel's loads; without it they carry no hint."""
    times = []

    def timer(fn):
        times.append(dict(fn.config))
        return 0.5 if fn.config.get("waves") == 4 else {64: 2.0, 32: 1.0}[fn.config["BLOCK_N"]]

    reordered = dict(reversed(list(FAST.items())))
    (res,) = _autotune.sweep(["decode"], {"decode": [DECODE]}, device=device, out=None, timer=timer,
                             candidates={"decode": [FAST, reordered]}, log=lambda msg: None)
    assert res["winner"] == dict(FAST, waves=4)
    assert sorted(c.get("waves", 0) for c in times if c["BLOCK_N"] == 32) == [0, 0, 1, 2, 4]
    assert [c for c in times if c.get("EVICT")] == [dict(FAST, EVICT=True)]
    assert res["candidates"] == 6  # the heuristic, FAST, and FAST at waves 1, 2, 4 and with EVICT

    (res,) = _autotune.sweep(["decode"], {"decode": [DECODE]}, device=device, out=_tuning.CONFIG_DIR / "test-gpu.json",
                             timer=lambda fn: 0.5 if fn.config.get("EVICT") else {64: 2.0, 32: 1.0}[fn.config["BLOCK_N"]],
                             candidates={"decode": [FAST]}, log=lambda msg: None)
    assert res["winner"] == dict(FAST, EVICT=True) and _tuning.lookup("decode", KEY, device) == res["winner"]
    spy = KernelSpy(decode._mla_attn_kernel)
    monkeypatch.setattr(decode, "_mla_attn_kernel", spy)
    args, expected = decode_call(device)
    assert_close("decode, evict-first loads", mla_kernels.mla_decode(*args), expected, torch.float32)
    assert spy.launches[-1]["KV_EVICT"] == "evict_first" and spy.launches[-1]["BLOCK_N"] == FAST["BLOCK_N"]
    _tuning.save_file(_tuning.CONFIG_DIR / "test-gpu.json", device="Test GPU", sm_count=8, source="test",
                      kernels={"decode": {KEY: FAST}})
    _tuning.reload()
    mla_kernels.mla_decode(*args)
    assert spy.launches[-1]["KV_EVICT"] == ""


def test_the_evict_hint_is_tried_only_where_it_changes_the_code(fake_gpu, monkeypatch, device):
    """Triton 3.6 to 3.8 (3.6: the GPU machine's) keep EVICT's policy in their IR but drop it from the pipelined
    cp.async loads (the same PTX, tests/test_compile.py checks which): timing that config again would time the same
    kernel. So a winner of two or more stages is tried with EVICT only from triton 3.9 on; a one-stage winner (plain
    loads, which carry it on every triton checked) always; never on ROCm (gfx942's code is the same with it)."""
    from mla_kernels import _launcher
    two_stages = dict(FAST, num_stages=2)
    for version, one, two in (((3, 6), True, False), ((3, 9), True, True)):
        monkeypatch.setattr(_launcher, "_VERSION", version)
        assert decode.evict_changes_code(FAST, device) is one
        assert decode.evict_changes_code(two_stages, device) is two
        tried = _autotune.SPECS["decode"].refine(two_stages, KEY, device)
        assert any(c.get("EVICT") for c in tried) is two and len(tried) == 3 + two
    monkeypatch.setattr(_utils, "on_hip", lambda dev: True)
    assert not decode.evict_changes_code(FAST, device)


def test_a_sweep_reloads_what_it_wrote(fake_gpu, device):
    """The library had read the (missing) files before the sweep; after it, the next lookup finds the winner."""
    assert _tuning.lookup("decode", KEY, device) is None
    _autotune.sweep(["decode"], {"decode": [DECODE]}, device=device, out=_tuning.CONFIG_DIR / "test-gpu.json",
                    timer=fake_timer({32: 1.0, 64: 2.0}), candidates={"decode": [FAST]}, log=lambda msg: None)
    assert _tuning.lookup("decode", KEY, device) == FAST


def test_on_demand_tuning_takes_two_shapes_at_the_class_widths(monkeypatch):
    """MLA_KERNELS_AUTOTUNE's tuning of a class: benchmark shapes set to the class key's widths (R 32 here, shapes
    written at R 512), those of the class, at most two, written to the user's file."""
    swept = []

    def sweep(kernels, shapes, **kw):
        swept.append((kernels, shapes, kw["out"]))
        return [dict(winner=FAST)]

    monkeypatch.setattr(_autotune, "sweep", sweep)
    monkeypatch.setattr(_tuning, "_device_name", lambda index: "Test GPU")
    monkeypatch.setattr(_autotune, "ON_DEMAND_SHAPES", {"decode": [
        dict(DECODE, R=512), dict(DECODE, R=512, H=64), dict(DECODE, R=512, B=1, ctx=70), dict(DECODE, R=512, B=3)]})
    assert _autotune.tune_on_demand("decode", KEY, 0) == FAST
    (kernels, shapes, out), = swept
    assert kernels == ["decode"] and shapes == {"decode": [DECODE, dict(DECODE, B=1, ctx=70)]}
    assert out == _tuning.user_file(0)


def test_a_sweep_leaves_out_the_paths_it_is_told_to(fake_gpu, monkeypatch, device):
    """``skip`` (bench.autotune's --skip-tma/--skip-gluon, which a GPU session passes where that kernel's native
    parity test failed): its configs are never built, timed or stored (a fault in one is sticky on a GPU and pruned
    every later candidate; a hang stopped the sweep). Before, every Hopper sweep tried both."""
    tma = dict(BLOCK_M=16, BLOCK_N=64, num_warps=8, num_stages=2, TMA=True)
    gluon = dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2, GLUON=True)
    calls = []
    res, = _autotune.sweep(["decode"], {"decode": [DECODE]}, device=device, candidates={"decode": [FAST, tma, gluon]},
                           timer=fake_timer({16: 3.0, 32: 1.0, 64: 2.0}, calls), log=lambda msg: None,
                           skip=["tma", "gluon"])
    assert calls and not any(c.get("TMA") or c.get("GLUON") for c in calls)
    assert res["winner"] == FAST and res["candidates"] == len({str(sorted(c.items())) for c in calls})
    for bad in ("tma", ["avx"]):
        with pytest.raises(ValueError, match="skip"):
            _autotune.sweep(["decode"], {"decode": [DECODE]}, device=device, timer=fake_timer({}), skip=bad)
    from bench import autotune as cli

    seen = {}
    monkeypatch.setattr(_autotune, "sweep", lambda *a, **k: seen.update(k) or [])
    cli.main(["--kernels", "decode", "--skip-gluon", "--results", str(fake_gpu / "r.json")], timer=fake_timer({}))
    assert seen["skip"] == ["gluon"]
    cli.main(["--kernels", "decode", "--skip-tma", "--skip-gluon", "--results", str(fake_gpu / "r.json")],
             timer=fake_timer({}))
    assert seen["skip"] == ["tma", "gluon"]


def test_decode_candidate_spaces():
    """What a full decode sweep tries per class (no TMA or Gluon off sm_90): row tiles by the rows bucket, and at
    R 1024 (two 512-wide tiles per step) at most 32 x 32."""
    cpu = torch.device("cpu")

    def tiles(key):
        space = _autotune.SPECS["decode"].space(key, cpu, quick=False)
        assert {(c["num_warps"], c["num_stages"]) for c in space} == {(4, 2), (4, 3), (8, 2), (8, 3)}
        return sorted({c["BLOCK_M"] for c in space}), sorted({c["BLOCK_N"] for c in space})

    assert tiles("R512/rows<=16") == ([16], [16, 32, 64])
    assert tiles("R512/rows<=32") == ([16, 32], [16, 32, 64])
    assert tiles("R512/rows<=64") == ([32, 64], [16, 32, 64])
    assert tiles("R512/rows>64") == ([32, 64, 128], [16, 32, 64])
    assert tiles("R1024/rows>64") == ([32], [16, 32])
    assert tiles("R1024/rows<=16") == ([16], [16, 32])


def test_autotune_tunes_a_kernel_named_twice_once(fake_gpu, monkeypatch, device):
    monkeypatch.setattr(_autotune.SPECS["decode"], "space", lambda key, dev, quick: [FAST])
    res = mla_kernels.autotune({"decode": [dict(B=2, ctx=40, H=HEADS, page=PAGE, R=R, P=P)]}, kernels=["decode"] * 2,
                               device=device, timer=fake_timer({32: 1.0, 64: 2.0}), log=lambda msg: None)
    assert [r["shape_class"] for r in res] == [KEY]


def test_a_schedule_cut_again_after_a_drop_covers_sequences_longer_than_a_tile(fake_gpu, monkeypatch, device):
    """As above, with sequences longer than the stored config's 128-key tiles (300 and 70 tokens: 128-tiles 3 + 1
    over 3 programs, the long sequence cut): the fallback's 64-key tiles walk the tables cut again for them. With the
    128-key tables they would read 128 of the 300 keys in program 0 and 64 of the 70 in program 2."""
    from mla_kernels.reference import absorbed_decode

    lens = [300, 70]
    kv, pe, table = make_paged_cache(lens, PAGE, (R, P), torch.float32, device, generator_seed=1)
    q = torch.randn(2, 1, HEADS, R + P, generator=torch.Generator().manual_seed(1)).to(device)
    args = (q[..., :R], q[..., R:], kv, pe, table, torch.tensor(lens, dtype=torch.int32, device=device), SCALE)
    expected, _ = absorbed_decode(*args)
    _tuning.save_file(_tuning.CONFIG_DIR / "test-gpu.json", device="Test GPU", sm_count=1, source="test",
                      kernels={"decode": {KEY: BROKEN}})
    _tuning.reload()
    meta = mla_kernels.mla_decode_metadata(args[5], HEADS, 1, kv_lora_rank=R, rope_dim=P, dtype=torch.float32,
                                           num_programs=3)
    assert meta.block_n == 128 and meta.sequences[:, 1].tolist() == [2, 1]
    spy = KernelSpy(decode._mla_attn_kernel, fail=lambda m: m["BLOCK_N"] == 128)
    monkeypatch.setattr(decode, "_mla_attn_kernel", spy)
    with pytest.warns(RuntimeWarning, match="failed to compile"):
        out = mla_kernels.mla_decode(*args, metadata=meta)
    assert [m["BLOCK_N"] for m in spy.launches] == [128, 64]
    assert_close("cut again for the fallback's tiles", out, expected, torch.float32)


def test_an_on_demand_winner_stays_this_processs_own(fake_gpu, monkeypatch, device):
    """A class tuned on first use keeps this process's winner while another process (a tensor-parallel rank sharing
    the user's cache) stores its own winner of that class in the file: tuning a second class no longer reads the
    file back (it did, and the first class switched to the other rank's tiles mid-run, so a decode step's metadata,
    cut for this process's tiles, was refused)."""
    ours, theirs = dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=2), dict(BLOCK_M=16, BLOCK_N=16,
                                                                                 num_warps=4, num_stages=1)
    other = _tuning.decode_class(16, 256)

    def tune_on_demand(kernel, key, index):  # as the real one: the winner saved to the user's file, then returned
        winner = ours if key == KEY else dict(ours, BLOCK_N=32)
        _tuning.save_file(_tuning.user_file(index), device="Test GPU", sm_count=8, source="test",
                          kernels={kernel: {key: winner}})
        return winner

    monkeypatch.setattr(_autotune, "tune_on_demand", tune_on_demand)
    monkeypatch.setenv(_tuning.AUTOTUNE_ENV, "1")
    assert dict(_tuning.lookup("decode", KEY, device)) == ours
    _tuning.save_file(_tuning.user_file(0), device="Test GPU", sm_count=8, source="the other rank",
                      kernels={"decode": {KEY: theirs}})
    assert dict(_tuning.lookup("decode", other, device)) == dict(ours, BLOCK_N=32)
    assert dict(_tuning.lookup("decode", KEY, device)) == ours
    _tuning.reload()  # an explicit reload too: this process's own winners stay until it restarts
    assert dict(_tuning.lookup("decode", KEY, device)) == ours
    monkeypatch.setattr(_tuning, "_tuned_here", {})  # a new process reads the file: the last writer's
    assert dict(_tuning.lookup("decode", KEY, device)) == theirs


def test_an_on_demand_winner_survives_its_own_sweeps_reload(fake_gpu, monkeypatch, device):
    """The same through the real on-demand path: its sweep ends with a reload of the files, after which ``lookup``
    read the file before this process's own winners, so another rank's entry replaced the class's tiles and a
    decode step's metadata, cut for this process's, was refused ("metadata was built for 16 x 32 tiles ... use
    16 x 16"). An explicit sweep of the class (``mla_kernels.autotune``) does replace the on-demand winner."""
    theirs = dict(FAST, BLOCK_N=16)
    monkeypatch.setattr(_autotune.SPECS["decode"], "space", lambda key, dev, quick: [FAST])
    monkeypatch.setattr(_autotune, "ON_DEMAND_TIMER", fake_timer({32: 1.0}))
    monkeypatch.setattr(_autotune, "ON_DEMAND_SHAPES", {"decode": [DECODE]})
    monkeypatch.setenv(_tuning.AUTOTUNE_ENV, "1")
    args, expected = decode_call(device)
    q_nope, q_pe, kv, pe, table, lens, scale = args
    meta = mla_kernels.mla_decode_metadata(lens, HEADS, 1, kv_lora_rank=R, rope_dim=P, dtype=torch.float32)
    assert dict(_tuning.lookup("decode", KEY32, device)) == FAST  # tuned by the metadata's lookup
    _tuning.save_file(_tuning.user_file(0), device="Test GPU", sm_count=8, source="the other rank",
                      kernels={"decode": {KEY32: theirs}})
    _tuning.reload()
    out = mla_kernels.mla_decode(*args, metadata=meta)
    assert_close("decode with this process's metadata", out, expected, torch.float32)
    assert dict(_tuning.lookup("decode", KEY32, device)) == FAST
    monkeypatch.setattr(_autotune.SPECS["decode"], "space", lambda key, dev, quick: [theirs])
    elsewhere = _tuning.CONFIG_DIR.parent / "exported.json"  # a file no lookup reads: nothing changes here
    mla_kernels.autotune({"decode": [DECODE]}, device=device, dtype=torch.float32, log=None, out=elsewhere,
                         timer=fake_timer({16: 1.0}))
    assert dict(_tuning.lookup("decode", KEY32, device)) == FAST
    mla_kernels.autotune({"decode": [DECODE]}, device=device, dtype=torch.float32, log=None,
                         timer=fake_timer({16: 1.0}))  # (the user's file, which lookups read)
    assert dict(_tuning.lookup("decode", KEY32, device)) == theirs


def test_an_fp32_class_falls_back_to_its_2_byte_class_until_its_own_is_dropped(fake_gpu, monkeypatch, device):
    """With nothing of its own an fp32 class takes the 2-byte class's config (and, for schedules, its drop); with
    its own, that one, and once that is dropped the heuristic (as the drop's warning says), not the 2-byte one;
    a drop of the 2-byte class alone leaves an fp32 class with its own config undropped."""
    narrow, wide = FAST, dict(FAST, BLOCK_N=16)
    other, other32 = _tuning.decode_class(32, R), _tuning.decode_class(32, R, 4)  # a class with no fp32 config
    fault = OutOfResources(1, 0, "shared memory")
    _tuning.save_file(_tuning.device_file(0), device="Test GPU", sm_count=8, source="test",
                      kernels={"decode": {KEY: narrow, other: narrow}})
    _tuning.reload()
    assert dict(_tuning.lookup("decode", KEY32, device)) == narrow
    _tuning.save_file(_tuning.device_file(0), device="Test GPU", sm_count=8, source="test",
                      kernels={"decode": {KEY32: wide}})
    _tuning.reload()
    assert dict(_tuning.lookup("decode", KEY32, device)) == wide
    with pytest.warns(RuntimeWarning, match="failed to compile"):
        _tuning.drop(_tuning.lookup("decode", KEY32, device), fault)
    assert _tuning.lookup("decode", KEY32, device) is None and _tuning.dropped("decode", KEY32, device) == wide
    assert dict(_tuning.lookup("decode", KEY, device)) == narrow  # (the 2-byte class keeps its own)
    monkeypatch.setattr(_tuning, "_dropped", {})  # a new process: the file's configs again
    _tuning.reload()
    with pytest.warns(RuntimeWarning, match="failed to compile"):
        _tuning.drop(_tuning.lookup("decode", KEY, device), fault)
    assert _tuning.dropped("decode", KEY, device) == narrow and _tuning.dropped("decode", KEY32, device) is None
    with pytest.warns(RuntimeWarning, match="failed to compile"):
        _tuning.drop(_tuning.lookup("decode", other32, device), fault)  # (its 2-byte class's config, launched)
    assert _tuning.dropped("decode", other32, device) == narrow


def test_each_dtype_size_keeps_its_own_winners(fake_gpu, monkeypatch, device):
    """A float32 sweep stored its winners under the classes of the bf16 sweep before it (the classes had no
    dtype), so every bf16 launch then ran fp32-tuned tiles. fp32 classes are their own now ("/fp32"); bf16 and
    fp16 share theirs; an fp32 launch with no fp32 winner takes the 2-byte class's, as it did before."""
    out = _tuning.CONFIG_DIR / "test-gpu.json"  # (the file shipped for the fake GPU)
    wide, narrow = dict(FAST, BLOCK_N=16), FAST  # (the heuristic's 64 is timed too: slowest here)
    monkeypatch.setattr(_autotune.SPECS["decode"], "space", lambda key, dev, quick: [narrow, wide])
    mla_kernels.autotune({"decode": [DECODE]}, device=device, dtype=torch.float16, log=None, out=out,
                         timer=fake_timer({32: 1.0, 16: 2.0, 64: 3.0}))
    _tuning.reload()
    assert dict(_tuning.lookup("decode", KEY32, device)) == narrow  # no fp32 winner yet: the 2-byte class's
    mla_kernels.autotune({"decode": [DECODE]}, device=device, dtype=torch.float32, log=None, out=out,
                         timer=fake_timer({32: 2.0, 16: 1.0, 64: 3.0}))
    assert json.loads(out.read_text())["kernels"]["decode"] == {KEY: narrow, KEY32: wide}
    _tuning.reload()
    assert dict(_tuning.lookup("decode", KEY, device)) == narrow and dict(_tuning.lookup("decode", KEY32, device)) \
        == wide
    assert decode.decode_tiles(HEADS, R, device, P, elem_bytes=2)["BLOCK_N"] == 32
    assert decode.decode_tiles(HEADS, R, device, P, elem_bytes=4)["BLOCK_N"] == 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_cost_models_question_is_the_launchs_dtype_class(dtype, fake_gpu, monkeypatch, device):
    """``path="auto"`` asks the expanded kernel's tiles of the class the expanded launch would use: an fp32 call's
    question was the bf16 class's (the cost model never passed the queries' element size)."""
    from test_prefill import make_inputs

    a = make_inputs([3, 2], [0, 4], 2, 16, dtype, device, r=32, p=16, d_nope=16)
    asked = []
    lookup = _tuning.lookup
    monkeypatch.setattr(_tuning, "lookup", lambda kernel, key, dev, tune=True: asked.append((kernel, key, tune))
                        or lookup(kernel, key, dev, tune))
    mla_kernels.mla_prefill_attention(**a, softmax_scale=SCALE, path="auto")
    question = [key for kernel, key, tune in asked if kernel == "expanded" and not tune]
    assert question and all(key.endswith("/fp32") == (dtype == torch.float32) for key in question), asked


def test_the_cost_model_never_tunes_on_demand(fake_gpu, monkeypatch, device):
    """``choose_prefill_path`` ("no GPU work") reads the expanded kernel's tiles without tuning their class, with
    MLA_KERNELS_AUTOTUNE=1 on; a launch of that kernel tunes it."""
    asked = []
    monkeypatch.setattr(_autotune, "tune_on_demand", lambda kernel, key, index: asked.append((kernel, key)) or None)
    monkeypatch.setenv(_tuning.AUTOTUNE_ENV, "1")
    prefill.choose_prefill_path([1], [4097], 16, 512, 64, 128, 128, device=device)
    assert asked == []
    prefill._expanded_config(1, device)
    assert asked == [("expanded", _tuning.expanded_class(1, 128, 128))]


def test_autotune_with_log_none_prints_nothing(fake_gpu, device, capsys):
    """``log=None`` ("no messages") silences the progress bar too (it still wrote "candidates" lines to stderr)."""
    mla_kernels.autotune(shapes=TINY_DECODE, device=device, log=None, timer=fake_timer({16: 2.0, 32: 1.0, 64: 3.0}))
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
