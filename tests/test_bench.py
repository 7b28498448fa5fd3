"""Fast CPU smoke tests of the benchmark harness and the formulas the benchmarks report (no long runs)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

from bench import _harness as h
from bench import decode as bd
from bench import memory as bm
from mla_kernels import _launcher, decode_tma
from mla_kernels.reference import naive_mla


def test_flop_and_byte_models_by_hand():
    # B=2, S_q=1, H=16, L=1024, R=512, P=64: 2*2*1*16*1024*(512+64+512)
    assert h.mla_flops(2, 1, 16, 1024) == 2 * 2 * 16 * 1024 * 1088 == 71_303_168
    # (2*1024*576 + 2*1*16*1088) * 2 bytes
    assert h.mla_bytes(2, 1, 16, 1024) == (1_179_648 + 34_816) * 2 == 2_428_928
    assert h.mla_bytes(2, 1, 16, 1024, elem_size=1) == 1_214_464
    assert h.mla_flops(2, 1, 16, [100, 300]) == 2 * 16 * 400 * 1088
    with pytest.raises(ValueError, match="ctx has 2 lengths for a batch of 3"):
        h.mla_flops(3, 1, 16, [100, 300])


def test_timing_statistics():
    t = h.Timing.from_times([1.0, 2.0, 3.0, 4.0, 5.0], "test")
    assert (t.p50, t.p20, t.p80) == pytest.approx((3.0, 1.8, 4.2))
    assert (t.mean, t.min, t.max, t.runs) == (3.0, 1.0, 5.0, 5)
    assert t.std == pytest.approx(math.sqrt(2.5))


def test_time_fn_cpu():
    calls = []
    t = h.time_fn(lambda: calls.append(1), torch.device("cpu"), warmup_ms=0.0, rep_ms=0.0, min_runs=4)
    assert t.method == "perf_counter" and t.runs == 4 and len(calls) >= 5
    assert 0 <= t.min <= t.p20 <= t.p50 <= t.p80 <= t.max


def test_check_refuses_wrong_provider():
    expected = torch.randn(4, 8, dtype=torch.float64)
    right = expected.to(torch.bfloat16)  # one bf16 rounding: ~2e-3 relative RMS
    assert h.check_close("right", right, expected) < 1e-2
    with pytest.raises(h.WrongResult, match="relative RMS error"):
        h.check_close("wrong", (expected * 1.05).to(torch.bfloat16), expected)
    nan = right.clone()
    nan[1, 2] = float("nan")
    with pytest.raises(h.WrongResult, match=r"non-finite output at \(1, 2\)"):
        h.check_close("nan", nan, expected)
    with pytest.raises(h.WrongResult, match="shape"):
        h.check_close("shape", right[:2], expected)

    calls = []

    def wrong():
        calls.append(1)
        return torch.zeros_like(right)

    with pytest.raises(h.WrongResult, match="wrong: relative RMS error"):
        h.check_then_time("wrong", wrong, expected, torch.device("cpu"))
    assert len(calls) == 1  # checked once, never timed


def test_rows_and_table():
    t = h.Timing.from_times([2.0] * 3, "test")
    row = h.make_row("p", t, flops=4e9, nbytes=2e9, copy_gbps=2000.0, B=1, ctx=2, H=3)
    assert row["tflops"] == pytest.approx(2.0) and row["gbps"] == pytest.approx(1000.0)
    assert row["pct_copy_bw"] == pytest.approx(50.0)
    assert "2.0000 [2.0000, 2.0000]" in h.format_row(row)
    skipped = h.make_row("q", None, note="skipped: needs ~9 GiB", B=1, ctx=2, H=3)
    assert "skipped: needs ~9 GiB" in h.format_row(skipped)


def test_json_writer_metadata(tmp_path):
    path = h.write_json("unit", {"rows": [{"x": float("inf"), "y": 1.5}]}, torch.device("cpu"), tmp_path)
    assert path == tmp_path / "unit_cpu.json"
    doc = json.loads(path.read_text())
    env = doc["environment"]
    assert doc["benchmark"] == "unit" and doc["rows"] == [{"x": None, "y": 1.5}]
    for key in ("device_name", "torch", "triton", "torch_version_hip", "date", "git", "is_cpu"):
        assert key in env
    assert env["is_cpu"] is True and env["torch"] == torch.__version__
    assert set(env["git"]) == {"commit", "dirty"}
    assert h.results_path("x", torch.device("cpu"), tmp_path / "given.json") == tmp_path / "given.json"


def test_stopped_bench_keeps_its_rows(tmp_path):
    """A bench stopped by ``timeout`` (SIGTERM) mid-sweep writes the rows measured so far, marked incomplete, and
    exits non-zero; the signal handler it installed is removed afterwards."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap

    out = tmp_path / "partial.json"
    script = textwrap.dedent(f"""
        import argparse, os, signal, torch
        from bench import _harness as h
        payload = {{"rows": []}}
        with h.save_if_stopped("unit", payload, torch.device("cpu"), argparse.Namespace(out={str(out)!r})):
            for i in range(3):
                payload["rows"].append({{"i": i}})
            os.kill(os.getpid(), signal.SIGTERM)
            payload["rows"].append({{"i": "after the signal"}})
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=root))
    assert done.returncode == 130, done.stderr
    doc = json.loads(out.read_text())
    assert doc["rows"] == [{"i": 0}, {"i": 1}, {"i": 2}] and "incomplete" in doc
    before = signal.getsignal(signal.SIGTERM)
    with h.save_if_stopped("unit", {}, torch.device("cpu"), type("A", (), {"out": str(tmp_path / "x.json")})()):
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before and not (tmp_path / "x.json").exists()


def test_host_jit_rows():
    """``bench.host --jit`` (run without the interpreter, as on a CPU-only machine it must be): the decode launch
    through Triton's run and through the cached launch, each beside the stubbed launch, for the split call (two
    launches) and the one-split call, then the attention's latent norm and ropes as three calls and as
    ``norm_and_rope``'s one; the cached rows say whether the cached launch was on."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # (MLA_KERNELS_CACHED_LAUNCH: gpu_session.sh exports 0 for its later steps when the native launcher tests fail)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MLA_KERNELS_CACHED_LAUNCH")}
    script = "import json; from bench.host import run_jit; print(json.dumps(run_jit(20, 2)))"
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=600,
                          env=dict(env, PYTHONPATH=root))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert [(r["case"].split(",")[1].strip(), r["launches"]) for r in rows] == \
        [("4 splits (2 launches)", 2)] * 3 + [("1 split (1 launches)", 1)] * 3 \
        + [("three calls (3 launches)", 3)] * 3 + [("one call (1 launches)", 1)] * 3
    cached = _launcher.SUPPORTED  # (triton 3.2: every launch is Triton's own; test_compile holds 3.3+ to True)
    assert [r["cached_launch"] for r in rows] == [None, cached, None] * 4
    assert all(r["p50_us"] > 0 for r in rows)


def test_host_gpu_rows_compare_cached_and_plain_launches(monkeypatch):
    """``bench.host``'s GPU rows time the eager call with the cached launch and with Triton's own only after
    checking that both give the same outputs (NaN where NaN, -inf lse alike); a difference is a FAILED row."""
    from bench import host

    monkeypatch.setattr(_launcher, "ENABLED", True)
    out = torch.tensor([1.0, float("nan"), float("-inf")])
    assert host._same_result(lambda: (out.clone(), None))
    assert host._same_result(lambda: None)  # write_cache: nothing to compare
    assert not host._same_result(lambda: (out + (0 if _launcher.ENABLED else 1e-7), None))
    assert not host._same_result(lambda: out.clone() if _launcher.ENABLED else out.nan_to_num())
    assert _launcher.ENABLED  # restored after the plain call
    calls = []  # the compared cached call is not the cache's first (which goes through Triton's own run)
    assert host._same_result(lambda: calls.append(_launcher.ENABLED) or out.clone())
    assert calls == [True, True, False]


def test_memory_formulas_at_r1_shapes():
    r1 = bd.DEEPSEEK_R1
    assert bm.values_per_token("latent", r1) == 576
    assert bm.values_per_token("per_head", r1) == 128 * (192 + 128)
    assert bm.values_per_token("mha", r1) == 2 * 128 * 128
    assert bm.values_per_token("gqa8", r1) == 2 * 8 * 128
    assert bm.values_per_token("per_head", bd.SEED_SMALL) == 16 * (192 + 128)


def test_memory_allocations_match_formulas():
    cpu = torch.device("cpu")
    nbytes, _ = bm.measure_allocation("latent", bd.DEEPSEEK_R1, 1024, cpu, None)
    assert nbytes == 1024 * 576 * 2
    nbytes, _ = bm.measure_allocation("mha", bd.SEED_SMALL, 256, cpu, None)
    assert nbytes == 256 * 2 * 16 * 128 * 2


def test_naive_batched_provider_matches_references():
    """The batched naive provider (gather, decompress, SDPA) against both references, in float32."""
    shape = bd.MLAShape(heads=3, d_latent=32, d_rope=16, d_nope=8, d_v=8)
    case = bd.make_case(shape, [5, 17], page=4, dtype=torch.float32, device=torch.device("cpu"))
    out = bd.naive_decode(case.q_nope, case.q_pe, case.kv_cache, case.pe_cache, case.block_table,
                          case.cache_seqlens, shape.softmax_scale, case.w_kv_b, shape.d_v)
    _, expected = bd.reference_outputs(case)
    assert h.rel_rms_error(out, expected) < 1e-5
    for b, n in enumerate([5, 17]):
        kv = torch.cat([case.kv_cache[case.block_table[b, j]] for j in range(case.block_table.shape[1])])[:n]
        pe = torch.cat([case.pe_cache[case.block_table[b, j]] for j in range(case.block_table.shape[1])])[:n]
        ref, _ = naive_mla(case.q_nope[b], case.q_pe[b], kv, pe, case.w_kv_b, shape.softmax_scale)
        assert h.rel_rms_error(out[b], ref) < 1e-5


def _torch_lib():
    _, run, write_cache = bd.library()

    def as_library(*args, max_seqlen_k=None, **kw):  # the PyTorch path in place of the interpreter
        return run(*args, **kw)

    return as_library, run, write_cache


def test_decode_sweep_row_smoke():
    lib = _torch_lib()
    rows = bd.run_shape(2, 40, 2, 16, torch.device("cpu"), torch.bfloat16, lib, copy_gbps=10.0,
                        time_kw=dict(warmup_ms=0.0, rep_ms=0.0, min_runs=2))
    # page 16 < BLOCK_N: no TMA provider; Gluon kernels run on a Hopper GPU only
    assert [r["provider"] for r in rows] == [n for n in bd.ORDER if n not in ("mla_decode[tma]", "mla_decode[gluon]")]
    assert all("p50_ms" in r and r["rel_rms_err"] < 1e-2 for r in rows)
    assert rows[2]["speedup"].endswith("vs torch_absorbed") and rows[3]["speedup"].endswith("vs naive")


def test_cuda_graph_sweep_times_the_uncapturable_provider_without_one(monkeypatch):
    """--cuda-graph: torch_absorbed syncs on the host (its gather is sized by the longest length read back), so a
    capture would fail (and could leave the capture stream's pool behind for later captures): it is timed without a
    graph and its row says so; a speed-up between rows timed the two ways is not given."""
    import dataclasses

    lib = _torch_lib()
    graphs, real = {}, h.check_then_time

    def recording(name, *args, **kw):  # as a GPU's time_fn labels them (the CPU's times every row one way)
        graphs[name] = kw.get("cuda_graph")
        timing, err = real(name, *args, **kw)
        return dataclasses.replace(timing, method="cuda-graph" if graphs[name] else "cuda-events"), err

    monkeypatch.setattr(h, "check_then_time", recording)
    rows = bd.run_shape(2, 40, 2, 16, torch.device("cpu"), torch.bfloat16, lib, copy_gbps=10.0,
                        time_kw=dict(warmup_ms=0.0, rep_ms=0.0, min_runs=2, cuda_graph=True))
    assert graphs["torch_absorbed"] is False and graphs["mla_decode"] is True and graphs["naive"] is True
    by_name = {r["provider"]: r for r in rows}
    assert by_name["torch_absorbed"]["note"].startswith("timed without a CUDA graph")
    assert "speedup" not in by_name["mla_decode"] and by_name["mla_decode+w_uv"]["speedup"].endswith("vs naive")


def test_decode_sweep_tma_provider_and_multi_token_rows(device):
    """Pages of whole tiles add the Hopper-path provider (checked against the reference like every other); S_q > 1
    rows carry their S_q and count its FLOPs. On the ``device`` fixture's device: a CPU tensor outside the
    interpreter (a GPU machine's CPU) takes the PyTorch path, which has no TMA provider."""
    lib = _torch_lib()
    rows = bd.run_shape(2, 130, 2, 64, device, torch.bfloat16, lib, copy_gbps=10.0,
                        time_kw=dict(warmup_ms=0.0, rep_ms=0.0, min_runs=2), s_q=2)
    by_name = {r["provider"]: r for r in rows}
    if decode_tma.TensorDescriptor is not None:  # (a triton with host descriptors, 3.4+: else no such path to time)
        assert "mla_decode[tma]" in by_name and by_name["mla_decode[tma]"]["rel_rms_err"] < 1e-2
    else:
        assert "mla_decode[tma]" not in by_name
    assert all(r["S_q"] == 2 for r in rows)
    row = by_name["mla_decode"]
    assert row["tflops"] * row["p50_ms"] * 1e9 == pytest.approx(h.mla_flops(2, 2, 2, 130), rel=1e-9)


def test_seed_scenario_smoke():
    lib = _torch_lib()
    res = bd.seed_scenario(torch.device("cpu"), torch.bfloat16, lib, warmups=1, rounds=2, with_naive=False)
    assert res["history"] == [50] * 4 + [100] * 4 + [200] * 4 + [400] * 4
    for r in res["providers"].values():
        assert r["tokens_per_s_step"] > 0 and r["attention_call_ms"]["runs"] == 2


def test_seed_scenario_refuses_to_time_a_write_cache_that_stores_nothing():
    """Every seed step's write is timed with the attention: a write_cache that stored nothing passed the round-0
    check (the reference read make_case's random fill at those slots, as the provider did) and was timed."""
    decode, decode_torch, _ = _torch_lib()
    res = bd.seed_scenario(torch.device("cpu"), torch.bfloat16, (decode, decode_torch, lambda *args: None),
                           warmups=1, rounds=2, with_naive=False)
    assert res["providers"] and all(r["wrong"] and "write_cache" in r["error"] for r in res["providers"].values())


def test_failed_bench_keeps_its_rows_and_fits_what_it_has(tmp_path):
    """Any other failure inside the block (a kernel fault, a compile error, out of memory) writes the rows measured so
    far, marked with the error, then runs ``before_save`` (a fit of the rows so far; its own failure is noted, not
    raised) and writes again, and propagates the error."""
    out = tmp_path / "failed.json"
    payload = {"rows": []}

    def fit():  # the rows are on disk before the fit runs (a fit cut by SIGKILL must not cost them)
        assert json.loads(out.read_text())["rows"] == payload["rows"]
        payload["fit"] = len(payload["rows"])

    with pytest.raises(RuntimeError, match="a kernel fault"):
        with h.save_if_stopped("unit", payload, torch.device("cpu"), argparse.Namespace(out=str(out)),
                               before_save=fit):
            payload["rows"] += [{"i": 0}, {"i": 1}]
            raise RuntimeError("a kernel fault")
    doc = json.loads(out.read_text())
    assert doc["rows"] == [{"i": 0}, {"i": 1}] and doc["fit"] == 2
    assert "RuntimeError: a kernel fault" in doc["incomplete"]

    def broken_fit():
        raise ValueError("no rows of one path")

    with pytest.raises(MemoryError, match="out of memory"):  # the run's own error, not one from before_save
        with h.save_if_stopped("unit", {"rows": [1]}, torch.device("cpu"), argparse.Namespace(out=str(out)),
                               before_save=broken_fit):
            raise MemoryError("out of memory")
    doc = json.loads(out.read_text())
    assert doc["rows"] == [1] and "before_save failed: ValueError: no rows of one path" in doc["incomplete"]


def test_decode_sweep_refuses_wrong_provider():
    as_library, run, _ = _torch_lib()

    def broken(*args, **kw):
        return as_library(*args, **kw) * 1.1

    rows = bd.run_shape(2, 40, 2, 16, torch.device("cpu"), torch.bfloat16, (broken, run, bd.library()[2]), copy_gbps=10.0,
                        time_kw=dict(warmup_ms=0.0, rep_ms=0.0, min_runs=2))
    by_name = {r["provider"]: r for r in rows}
    for name in ("mla_decode", "mla_decode+w_uv"):
        assert by_name[name]["wrong"] and "p50_ms" not in by_name[name]
        assert "WRONG RESULT" in h.format_row(by_name[name])
    assert "p50_ms" in by_name["naive"] and "p50_ms" in by_name["torch_absorbed"]

    def faulting(*args, **kw):  # a provider that fails to launch: marked, and the others still timed
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    rows = bd.run_shape(2, 40, 2, 16, torch.device("cpu"), torch.bfloat16, (faulting, run, bd.library()[2]),
                        copy_gbps=10.0, time_kw=dict(warmup_ms=0.0, rep_ms=0.0, min_runs=2))
    by_name = {r["provider"]: r for r in rows}
    assert by_name["mla_decode"]["wrong"] and "FAILED: RuntimeError: CUDA error" in by_name["mla_decode"]["note"]
    assert "p50_ms" in by_name["naive"] and "p50_ms" in by_name["torch_absorbed"]
    only = bd.run_shape(2, 40, 2, 16, torch.device("cpu"), torch.bfloat16, (as_library, run, bd.library()[2]),
                        copy_gbps=10.0, time_kw=dict(warmup_ms=0.0, rep_ms=0.0, min_runs=2),
                        only=("mla_decode", "mla_decode_fp8"))
    assert [r["provider"] for r in only] == ["mla_decode", "mla_decode_fp8"]


def test_fp8_memory_table_bytes_and_longest_context():
    """Issue 12's figure: 656 bytes per token and layer in DeepSeek's FP8 layout against 1152 in bf16, allocated byte
    for byte; the longest context of a budget is whole pages of the formula."""
    rows = {r["cache"]: r for r in bm.fp8_table(torch.device("cpu"), [1024, 4096], [16.0])}
    assert rows["fp8"]["bytes_per_token_layer_formula"] == 656 and rows["bf16"]["bytes_per_token_layer_formula"] == 1152
    for r in rows.values():
        assert all(m["bytes_per_token"] == r["bytes_per_token_layer_formula"] == m["reported_bytes_per_token"]
                   for m in r["measured"].values())
    assert rows["fp8"]["max_context"][16.0]["tokens"] == 16 * 2**30 // (61 * 64 * 656) * 64 == 429_312


def test_decode_fp8_provider_is_checked_against_the_dequantized_cache():
    lib = _torch_lib()
    rows = {r["provider"]: r for r in bd.run_shape(2, 40, 2, 16, torch.device("cpu"), torch.bfloat16, lib,
                                                   copy_gbps=10.0, time_kw=dict(warmup_ms=0.0, rep_ms=0.0, min_runs=2))}
    fp8 = rows["mla_decode_fp8"]
    assert "p50_ms" in fp8 and fp8["rel_rms_err"] < 1e-2 and fp8["speedup"].endswith("vs mla_decode")


def test_roofline_points_and_replot(tmp_path):
    """Roofline points carry FLOP per byte = TFLOP/s / GB/s x 1000; --replot draws from a saved file without
    timing anything (the PNG only where matplotlib is installed: it is not a dependency)."""
    import json

    from bench import decode

    rows = [dict(provider="mla_decode", H=128, page=64, B=8, ctx=4096, p50_ms=1.0, tflops=200.0, gbps=2000.0),
            dict(provider="mla_decode", H=16, page=64, B=8, ctx=4096, note="wrong: not timed")]
    pts = decode.roofline_points(rows)
    assert len(pts) == 1 and abs(pts[0]["intensity"] - 100.0) < 1e-9
    saved = tmp_path / "decode_gpu.json"
    saved.write_text(json.dumps(dict(sweep=rows, device_rates=dict(copy_gbps=3000.0, matmul_tflops=700.0))))
    decode.main(["--replot", str(saved)])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert saved.with_suffix(".png").stat().st_size > 0


def test_fp8_quality_model_smoke(monkeypatch):
    """bench.fp8_quality imports (its MoE shapes once named fields ModelShape lacked) and its model part runs on a
    tiny MoE shape (PyTorch path: this only checks the wiring); the shapes build the MoE model its results record."""
    pytest.importorskip("transformers")
    from bench import fp8_quality as bq
    from bench.generate import ModelShape, build_model
    from mla_kernels import _utils

    monkeypatch.setattr(_utils, "interpreting", lambda: False)
    shape = ModelShape(hidden=64, heads=2, layers=2, q_lora_rank=32, vocab=128, intermediate=256, kv_lora_rank=128,
                       rope=16, nope=16, v=16, experts=4, moe_intermediate=32)
    config = build_model(shape, "cpu").config
    assert (config.n_routed_experts, config.moe_intermediate_size, config.first_k_dense_replace) == (4, 32, 1)
    assert config.intermediate_size == 256
    dense = build_model(dataclasses.replace(shape, experts=0, moe_intermediate=0), "cpu").config
    assert dense.first_k_dense_replace == 2  # every layer dense, as bench.generate times them
    assert (bq.CPU_MODEL.experts, bq.CPU_MODEL.intermediate) == (4, 4 * bq.CPU_MODEL.hidden)
    out = bq.model_quality(shape, torch.device("cpu"), batch=2, prompt_len=4, new_tokens=3)
    assert out["model"]["experts"] == 4
    assert 0 <= out["teacher_forced"]["greedy_agreement_fp8_vs_bf16_cache"] <= 1


def test_fp8_decode_row_counts_its_own_row_bytes():
    """mla_decode_fp8's GB/s and % of copy count the bytes it reads: 656-byte rows (e4m3 latent, fp32 scales, bf16
    rope), not the bf16 cache's 1152; effective_gbps keeps the bf16-equivalent rate for comparison."""
    from mla_kernels.cache import fp8_row_bytes

    assert fp8_row_bytes(512, 64) == 656
    assert h.mla_bytes(2, 1, 16, 1024, cache_row_bytes=656) == 2 * 1024 * 656 + 2 * 16 * 1088 * 2
    lib = _torch_lib()
    rows = {r["provider"]: r for r in bd.run_shape(2, 40, 2, 16, torch.device("cpu"), torch.bfloat16, lib,
                                                   copy_gbps=10.0, time_kw=dict(warmup_ms=0.0, rep_ms=0.0, min_runs=2),
                                                   only=("mla_decode", "mla_decode_fp8"))}
    fp8, bf16 = rows["mla_decode_fp8"], rows["mla_decode"]
    read = h.mla_bytes(2, 1, 2, 40, cache_row_bytes=656)
    assert fp8["gbps"] * fp8["p50_ms"] * 1e6 == pytest.approx(read, rel=1e-9)
    assert fp8["pct_copy_bw"] == pytest.approx(10 * fp8["gbps"])
    assert fp8["effective_gbps"] * fp8["p50_ms"] * 1e6 == pytest.approx(h.mla_bytes(2, 1, 2, 40), rel=1e-9)
    assert bf16["gbps"] * bf16["p50_ms"] * 1e6 == pytest.approx(h.mla_bytes(2, 1, 2, 40), rel=1e-9)


def test_cuda_graph_rows_on_an_l2_resident_cache_say_so(monkeypatch):
    """Graph replays run back to back without an L2 flush: a row whose cache fits twice in L2 is marked."""
    monkeypatch.setattr(h, "time_fn", lambda fn, device, **kw: h.Timing.from_times([1.0, 1.0], "cuda-graph"))
    monkeypatch.setattr(h, "l2_bytes", lambda device: 50 * 2**20)
    rows = bd.run_shape(2, 40, 2, 16, torch.device("cpu"), torch.bfloat16, _torch_lib(), copy_gbps=10.0,
                        time_kw={}, only=("mla_decode",))
    assert rows[0]["note"].startswith("L2-resident")
    monkeypatch.setattr(h, "l2_bytes", lambda device: 0)
    rows = bd.run_shape(2, 40, 2, 16, torch.device("cpu"), torch.bfloat16, _torch_lib(), copy_gbps=10.0,
                        time_kw={}, only=("mla_decode",))
    assert "L2" not in rows[0]["note"]


def test_decode_providers_flag_times_only_those(monkeypatch):
    """``bench.decode --providers a,b`` (gpu_session.sh's sparse step: sparse against dense, not every provider on
    every shape): only those rows, in ORDER, also where a shape is skipped for memory; unknown names refused."""
    monkeypatch.setattr(h, "time_fn", lambda fn, device, **kw: h.Timing.from_times([1.0, 1.0], "cpu"))
    monkeypatch.setattr(bd, "ONLY_PROVIDERS", ("mla_decode_sparse", "mla_decode"))
    rows = bd.run_shape(2, 40, 2, 16, torch.device("cpu"), torch.bfloat16, _torch_lib(), copy_gbps=10.0, time_kw={})
    assert [r["provider"] for r in rows] == ["mla_decode", "mla_decode_sparse"]
    monkeypatch.setattr(h, "fits", lambda need, device: False)
    rows = bd.run_shape(2, 40, 2, 16, torch.device("cpu"), torch.bfloat16, _torch_lib(), copy_gbps=10.0, time_kw={})
    assert [r["provider"] for r in rows] == ["mla_decode", "mla_decode_sparse"] and "skipped" in rows[0]["note"]
    for bad in ("mla_decode,flash", ","):
        with pytest.raises(SystemExit):
            bd.main(["--quick", "--providers", bad])


def test_imbalanced_pair_survives_a_failing_scheduled_provider():
    """The scheduled grid (mla_decode+meta) has never run natively: its failure is a marked row, and mla_decode as
    shipped is still timed on both twins (an exception used to end the whole imbalanced section)."""
    from mla_kernels import mla_decode_metadata, schedule

    as_library, _, _ = _torch_lib()

    def decode(*args, metadata=None, **kw):
        if metadata is not None:
            raise RuntimeError("triton.runtime.errors.OutOfResources: out of resource: shared memory")
        return as_library(*args, **kw)

    rows = bd.run_imbalanced_pair(3, 64, 2, 16, torch.device("cpu"), torch.bfloat16, 10.0,
                                  dict(warmup_ms=0.0, rep_ms=0.0, min_runs=2),
                                  lib=(decode, mla_decode_metadata, schedule))
    by = {(r["kind"], r["provider"]): r for r in rows}
    for kind in ("imbal", "unif"):
        for table in ("", "[wide]"):
            assert "p50_ms" in by[kind, "mla_decode" + table]
            meta = by[kind, "mla_decode+meta" + table]
            assert meta["wrong"] and "FAILED: RuntimeError" in meta["note"]
    assert by["unif", "mla_decode"]["pct_of_uniform"] == pytest.approx(100.0)
    assert by["imbal", "mla_decode"]["total_tokens"] == sum(bd.imbalanced_lengths(3, 64))


def test_imbalanced_wide_table_rows_call_as_a_serving_engine():
    """The ``[wide]`` rows pass a block table ``WIDE_TABLE`` times the longest sequence's blocks and no
    ``max_seqlen_k`` (the uniform split then sized from the capacity), the schedule built without it too; the
    narrow rows pass ``max_seqlen_k``. Each row is checked against the same reference, and each +meta row is
    compared with its own table's mla_decode."""
    from mla_kernels import mla_decode, mla_decode_metadata, schedule

    calls = []

    def decode(*args, **kw):
        calls.append((args[4].shape[1], kw.get("max_seqlen_k"), kw.get("metadata") is not None))
        return mla_decode(*args, **kw)

    rows = bd.run_imbalanced_pair(3, 64, 2, 16, torch.device("cpu"), torch.bfloat16, 10.0,
                                  dict(warmup_ms=0.0, rep_ms=0.0, min_runs=2),
                                  lib=(decode, mla_decode_metadata, schedule))
    # the twins' tables: the imbalanced batch's longest (64 tokens) needs 4 blocks of 16, the uniform one's 2
    narrow, wide = {4, 2}, {4 * bd.WIDE_TABLE, 2 * bd.WIDE_TABLE}
    assert {cols for cols, _, _ in calls} == narrow | wide
    assert {(cols in wide, bound is None, meta) for cols, bound, meta in calls} == {
        (False, False, False), (False, False, True), (True, True, False), (True, True, True)}
    by = {(r["kind"], r["provider"]): r for r in rows}
    for kind in ("imbal", "unif"):
        for table in ("", "[wide]"):
            assert not by[kind, "mla_decode" + table].get("wrong")
            assert "vs mla_decode" + table in by[kind, "mla_decode+meta" + table]["note"]
        # the batch-invariant row: checked against the reference, timed, compared with mla_decode on its table
        split = by[kind, "mla_decode+split"]
        assert not split.get("wrong") and "p50_ms" in split and "vs mla_decode" in split["note"]


def test_prefill_row_survives_a_failing_path_and_labels_auto_for_the_queries_device(monkeypatch):
    """A path that fails to compile or launch is a marked row, the others are timed; auto's label and executed
    FLOPs are of the choice made for the queries' device (its config file's constants), as the library makes it."""
    bp = pytest.importorskip("bench.prefill")
    from mla_kernels import prefill as pf

    attention, module = bp.library()
    seen = []
    real = pf.choose_prefill_path

    def choose(*args, device=None, **kw):
        seen.append(device)
        return real(*args, device=device, **kw)

    monkeypatch.setattr(pf, "choose_prefill_path", choose)

    def broken(*args, path="auto", **kw):
        if path == "expanded":
            raise RuntimeError("out of resource: shared memory")
        return attention(*args, path=path, **kw)

    cpu = torch.device("cpu")
    rows = {r["provider"]: r for r in bp.run_shape(1, 8, 4, 2, cpu, torch.bfloat16, (broken, module),
                                                    dict(warmup_ms=0.0, rep_ms=0.0, min_runs=1))}
    assert rows["expanded"]["wrong"] and "FAILED: RuntimeError" in rows["expanded"]["note"]
    assert "p50_ms" in rows["absorbed"] and "p50_ms" in rows["naive"]
    assert seen and all(d == cpu for d in seen)


def test_host_bench_keeps_its_rows_when_stopped(tmp_path, monkeypatch):
    """bench.host in a GPU session has 25 s, cold compiles included: stopped, it writes the rows it measured."""
    from bench import host as bh

    def partial(calls, repeats, rows=None):
        rows.append({"case": "mla_decode B1 L1024 H16", "p50_us": 20.0})
        raise KeyboardInterrupt("signal 15")

    monkeypatch.setattr(bh, "run_host", partial)
    out = tmp_path / "host.json"
    with pytest.raises(SystemExit) as stop:
        bh.main(["--quick", "--device", "cpu", "--out", str(out)])
    assert stop.value.code == 130
    doc = json.loads(out.read_text())
    assert doc["rows"] == [{"case": "mla_decode B1 L1024 H16", "p50_us": 20.0}] and "incomplete" in doc


@pytest.mark.parametrize("interpreted", [True, False])
def test_decode_cpu_run_says_what_it_timed(interpreted, tmp_path, monkeypatch, capsys):
    """A CPU run's header and its results' notes name what was timed: under TRITON_INTERPRET=1 the Triton kernels in
    the interpreter (they said 'the PyTorch path' there too), without it the PyTorch path. Nothing is timed here."""
    from mla_kernels import _utils

    monkeypatch.setattr(_utils, "interpreting", lambda: interpreted)
    monkeypatch.setattr(h, "device_rates", lambda device: dict(copy_gbps=10.0, copy_what="-", matmul_tflops=0.1,
                                                                matmul_what="-"))
    out = tmp_path / "decode.json"
    bd.main(["--device", "cpu", "--skip-seed", "--skip-sweep", "--skip-imbalanced", "--out", str(out)])
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("CPU timings"))
    note = json.loads(out.read_text())["notes"][0]
    for text in (header, note):
        assert ("interpreter" in text) == interpreted and ("PyTorch path" in text) == (not interpreted), text


def test_plot_is_offered_only_by_benches_that_draw_one(capsys):
    """bench.host and bench.fp8_quality draw nothing: --plot is refused there (it was accepted and ignored, silently);
    a bench that draws one but has nothing to draw in this run says so."""
    from bench import fp8_quality, host

    for bench_main in (host.main, fp8_quality.main):
        with pytest.raises(SystemExit) as refused:
            bench_main(["--plot"])
        assert refused.value.code == 2 and "unrecognized arguments: --plot" in capsys.readouterr().err
    assert h.make_parser("x").parse_args(["--plot"]).plot
    assert "plot" not in vars(h.make_parser("x", plot=False).parse_args([]))


def test_save_results_says_when_plot_draws_nothing(tmp_path, capsys):
    args = argparse.Namespace(out=str(tmp_path / "r.json"), plot=True)
    h.save_results("unit", {}, torch.device("cpu"), args, plot=None)
    assert "--plot: no plot written" in capsys.readouterr().out
    h.save_results("unit", {}, torch.device("cpu"), argparse.Namespace(out=str(tmp_path / "r.json")))  # no --plot


def test_replot_refuses_a_missing_corrupt_or_foreign_file(tmp_path):
    """--replot of a file that is missing, not JSON, or another bench's results: one line naming the file and what is
    wrong (tracebacks: FileNotFoundError, JSONDecodeError, KeyError: 'device_rates')."""
    bad, other, bare = tmp_path / "bad.json", tmp_path / "prefill_cpu.json", tmp_path / "bare.json"
    bad.write_text("{not json")
    other.write_text(json.dumps(dict(benchmark="prefill", sweep=[])))
    bare.write_text(json.dumps(dict(sweep=[])))
    for path, why in ((tmp_path / "missing.json", "cannot read it"), (bad, "not a JSON results file"),
                      (other, "not bench.decode's results (bench.prefill's)"), (bare, "no device_rates")):
        with pytest.raises(SystemExit) as refused:
            bd.main(["--replot", str(path)])
        message = str(refused.value.code)
        assert message.startswith(f"--replot {path}: ") and why in message and "\n" not in message
        assert not path.with_suffix(".png").exists()


BAD_CLI = {  # bench, arguments, the option argparse names: each was a traceback (or silently a default) before
    "threads-negative": ("decode", ["--threads", "-1"], "--threads"),  # set_num_threads' RuntimeError
    "threads-zero": ("decode", ["--threads", "0"], "--threads"),  # read as "torch's default"
    "device-unknown": ("memory", ["--device", "foo"], "--device"),  # torch.device's RuntimeError
    "device-meta": ("memory", ["--device", "meta"], "--device"),
    "batch-zero": ("generate", ["--batch", "0"], "--batch"),  # a reshape RuntimeError
    "context-one": ("generate", ["--context", "1"], "--context"),  # nothing left to prefill
    "runs-negative": ("generate", ["--runs", "-1"], "--runs"),  # quantile() of no times
    "new-tokens-negative": ("fp8_quality", ["--new-tokens", "-1"], "--new-tokens"),  # after the decode part ran
    "out-an-existing-file": ("decode", ["--out", "{tmp}/notes.txt"], "--out"),  # after the whole run, its rows lost
    "out-below-a-file": ("decode", ["--out", "{tmp}/notes.txt/r.json"], "--out"),
    "out-a-folder-named-json": ("decode", ["--out", "{tmp}/old.json"], "--out"),
    # bench.autotune's: a folder (IsADirectoryError from the sweep), a report path below a file (FileExistsError
    # after the first class was swept and stored, the rest abandoned), a config file not ending in .json
    "autotune-out-a-folder": ("autotune", ["--out", "{tmp}/old.json"], "--out"),
    "autotune-out-not-json": ("autotune", ["--out", "{tmp}/configs"], "--out"),
    "autotune-results-below-a-file": ("autotune", ["--results", "{tmp}/notes.txt/r.json"], "--results"),
}


@pytest.mark.parametrize("case", list(BAD_CLI))
def test_bad_cli_values_are_usage_errors_before_any_work(case, tmp_path, capsys):
    import importlib

    name, argv, option = BAD_CLI[case]
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "old.json").mkdir()
    with pytest.raises(SystemExit) as refused:
        importlib.import_module(f"bench.{name}").main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert refused.value.code == 2 and f"argument {option}" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_out_ending_in_upper_case_json_is_a_file():
    """``--out R.JSON`` made a folder of that name with ``<bench>_<device>.json`` inside."""
    assert h.results_path("unit", torch.device("cpu"), "some/R.JSON") == Path("some/R.JSON")
    assert h.make_parser("x").parse_args(["--out", "new/folder"]).out == "new/folder"  # created when written


def test_memory_failing_partway_writes_what_it_measured(tmp_path, monkeypatch):
    """bench.memory built its results only at its end, so a run stopped at a time limit (the GPU session's) or failing
    partway wrote nothing, where the other benches write their rows marked ``incomplete``."""
    def fail(*args, **kwargs):
        raise RuntimeError("a fault in the fp8 table")

    monkeypatch.setattr(bm, "fp8_table", fail)
    monkeypatch.setattr(bm._utils, "interpreting", lambda: False)  # (it stops before the decode peaks)
    out = tmp_path / "memory.json"
    with pytest.raises(RuntimeError, match="fp8 table"):
        bm.main(["--quick", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert "RuntimeError: a fault in the fp8 table" in doc["incomplete"]
    assert doc["cache_per_token"] and "fp8_cache" not in doc


@pytest.mark.parametrize("budget", ["-1", "0", "nan", "inf", "lots"])
def test_memory_refuses_a_budget_that_is_not_positive_and_finite(budget, capsys):
    """--cache-gib -1 (or 0) printed negative token counts: such budgets are refused at argument parsing."""
    with pytest.raises(SystemExit) as refused:
        bm.main(["--cache-gib", "16", budget])
    assert refused.value.code == 2 and "argument --cache-gib" in capsys.readouterr().err
    assert bm.budget_gib("0.5") == 0.5


def test_tolerance_probe_summary_ranks_a_nan_error_worst(tmp_path):
    """tests/tolerance_probe.py's summary: a comparison recorded with a NaN error (its result NaN where the reference
    is finite, a check that failed) is its group's worst, and the median is taken over the others. NaN compares false
    both ways, so max() kept whichever row it met first and sorted() left NaN where it lay: the group's line named a
    passing comparison as its worst (here c) and gave a NaN median."""
    import tolerance_probe

    rows = [dict(kind="rms", test="t", name=name, err=err, tol=1e-5, dtype="float32", n=8, default=True)
            for name, err in (("a", 1e-7), ("b", float("nan")), ("c", 2e-7))]
    path = tmp_path / "probe.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (line,) = tolerance_probe.summary(str(path))
    assert "median error 2.00e-07" in line and "worst nan" in line and "t: b)" in line, line


def _gpu_session_commands() -> list[tuple[str, str]]:
    """Every command of bench/gpu_session.sh as (case, command line), continuation lines joined, comments dropped."""
    script = (Path(__file__).resolve().parents[1] / "bench" / "gpu_session.sh").read_text()
    case, commands = None, []
    for line in script.replace("\\\n", " ").splitlines():
        code = "" if line.lstrip().startswith("#") else line.split(" # ", 1)[0]
        label = re.match(r"\s*(\w+)\)", code)
        if label:
            case, code = label.group(1), code[label.end():]
        if case and code.strip():
            commands.append((case, code))
    return commands


# what the script's variables hold when a step runs (each --skip flag the first step may add, all at once)
_SESSION_VARS = {"skip": "--skip-tma --skip-gluon", "SKIP_KERNELS": "--skip-tma --skip-gluon",
                 "skip_gluon": "--skip-gluon", "slug": "nvidia-h100-80gb-hbm3", "xdist": "-n 16", "xdist4": "-n 4",
                 "per_test": "--timeout 60", "PWD": ".", "PYTHONPATH": "."}


@pytest.mark.parametrize("case", ["first", "tests", "compile", "bench", "generate", "sparse", "fp8", "gluon", "decode",
                                  "tune", "prefill"])
def test_gpu_session_commands_parse(case, tmp_path, monkeypatch):
    """A device call is 15 scarce minutes: every bench command bench/gpu_session.sh runs must get past its argument
    parser (a renamed flag would cost its step, found only on the GPU), and every test file, pytest plugin and module
    it names must exist. Each bench command is parsed by its own ``main``, stopped right after parsing."""
    import importlib
    import shlex

    root = Path(__file__).resolve().parents[1]
    lines = [code for c, code in _gpu_session_commands() if c == case]
    assert lines, f"gpu_session.sh has no case {case!r}"
    out = tmp_path / "out"
    (out / "configs").mkdir(parents=True)
    subst = dict(_SESSION_VARS, OUT=str(out))

    class Parsed(Exception):
        pass

    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        parse(self, args, namespace)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    seen = 0
    for code in lines:
        code = re.sub(r"\$\{?(\w+)\}?", lambda m: subst.get(m.group(1), m.group(0)), code)
        for module, rest in re.findall(r"python -m (bench\.\w+)([^;|>)]*)", code):
            argv = shlex.split(rest.split(" --junitxml", 1)[0])
            with pytest.raises(Parsed):  # an argparse error is SystemExit(2), which this does not catch
                importlib.import_module(module).main(argv)
            seen += 1
        for module in re.findall(r"python -m (mla_kernels\.\w+)", code):
            assert importlib.util.find_spec(module), module
            seen += 1
        for path in re.findall(r"(?<![\w/])tests/[\w/.]+\.py", code):
            assert (root / path).is_file(), f"{case}: {path} does not exist"
            seen += 1
        for module, names in re.findall(r"from (mla_kernels[\w.]*) import ([\w, ]+)", code):  # python -c "..."
            for name in names.replace(" ", "").split(","):
                assert hasattr(importlib.import_module(module), name), f"{case}: {module}.{name}"
        for name in re.findall(r"-p (\w+)", code):
            assert name == "no" or (root / "tests" / f"{name}.py").is_file(), f"{case}: pytest plugin {name}"
        for path, test, param in re.findall(r"--deselect \"?(tests/[\w/.]+\.py)::(\w+)(?:\[([^\]\"]+)\])?", code):
            text = (root / path).read_text()
            assert re.search(rf"^def {test}\(", text, re.M), f"{case}: {path}::{test}"
            # a parametrization id that no longer exists deselects nothing, silently
            assert not param or re.search(rf"[\"']{re.escape(param)}[\"']", text), f"{case}: {path}::{test}[{param}]"
    assert seen, f"{case}: no command found to check"


def test_results_name_the_callers_commit_where_the_tree_has_no_git(tmp_path, monkeypatch):
    """The GPU machine gets a copy of the tree without .git: its results and config files said commit null. There the
    commit the caller names in ``MLA_COMMIT`` is recorded (its dirtiness unknown); a checkout's own commit wins."""
    from mla_kernels import _tuning

    monkeypatch.setenv("MLA_COMMIT", "0123abc")
    monkeypatch.setattr(h, "REPO_ROOT", Path(__file__).resolve().parents[1])
    if (h.REPO_ROOT / ".git").exists():  # a checkout's own commit wins (the GPU machine's copy has no .git)
        assert h.git_commit()["commit"] not in (None, "0123abc")
    monkeypatch.setattr(h, "REPO_ROOT", tmp_path)  # no repository there
    assert h.git_commit() == {"commit": "0123abc", "dirty": None}

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr("subprocess.run", no_git)  # (save_file imports it when it writes)
    data = _tuning.save_file(tmp_path / "gpu.json", device="Test GPU", sm_count=8, source="test", vendor_key="cuda",
                             kernels={"decode": {}})
    assert data["commit"] == "0123abc"
    monkeypatch.delenv("MLA_COMMIT")
    assert h.git_commit() == {"commit": None, "dirty": None}


def test_mla_test_first_orders_the_collection():
    """gpu_session.sh's native run names the kernels' files first in ``MLA_TEST_FIRST`` (tests/conftest.py): xdist hands
    tests out in collection order, and naming the files beside ``tests`` on the command line left them in place."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, MLA_TEST_FIRST="tests/test_schedule.py tests/test_merge.py")
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "tests/test_bounds.py", "tests/test_merge.py", "tests/test_schedule.py"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=300)
    files = [line.split("::")[0] for line in run.stdout.splitlines() if line.startswith("tests/")]
    assert run.returncode == 0 and files, run.stdout[-2000:] + run.stderr[-2000:]
    order = list(dict.fromkeys(files))
    assert order == ["tests/test_schedule.py", "tests/test_merge.py", "tests/test_bounds.py"], order
    script = (root / "bench" / "gpu_session.sh").read_text()
    assert "MLA_TEST_FIRST=\"tests/test_decode.py" in script


def test_cache_kw_follows_the_forward_signature():
    """The benches hand a model its Cache by the keyword its forward takes: ``cache`` from transformers 5.25 on (the
    old name warns at every call there), ``past_key_values`` before it."""

    class Old(torch.nn.Module):
        def forward(self, x, past_key_values=None):
            return x

    class New(torch.nn.Module):
        def forward(self, x, past_key_values=None, cache=None):
            return x

    cache = object()
    assert h.cache_kw(Old(), cache) == {"past_key_values": cache}
    assert h.cache_kw(New(), cache) == {"cache": cache}
