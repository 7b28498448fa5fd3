"""Every kernel compiles for an H100 (sm_90) and an MI300X (gfx942) on this CPU-only machine.

Runs the real Triton compiler for both vendors with the configs the library launches, so a
change that breaks either backend fails CI although CI has no GPU. The compiler runs in a
subprocess without TRITON_INTERPRET (the interpreter swaps triton.language's own jit helpers,
which the compiler cannot then inline). On sm_90 it reads ptxas's report: registers, spills and
whether wgmma is used are reported, never a veto: only measured time decides a config (the 64 x 64 tiles, reported
with 2.3 KB of spills by an earlier compile, ran 4.2x faster on an H100 than the spill-free 32 x 16 ones;
bench/results/h100-2026-11-22/). Compiles carry the alignment facts the JIT specializes on
(``_compile._DIVISIBLE_INTS``).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from mla_kernels import decode
from mla_kernels._launcher import _triton_version
from mla_kernels._utils import H100_SHARED_BYTES, MI300_LDS_BYTES, SHARED_SCRATCH_BYTES  # 227 KiB, 64 KiB

# the Hopper paths need what the triton release has: host tensor descriptors (3.4+) for the TMA kernel, Gluon (3.5+);
# by version, so a release that should have them and fails to import them fails here (older ones never pick them)
HAS_TMA, HAS_GLUON = _triton_version() >= (3, 4), _triton_version() >= (3, 5)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compile_subprocess(*flags) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-m", "mla_kernels._compile", *flags], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout)


@pytest.fixture(scope="module")
def reports():
    if _triton_version() < (3, 3):  # (the JIT checks below still drive every launch through triton 3.2's compiler)
        pytest.skip("_compile.compile_for builds the source object of triton 3.3+; triton 3.2's takes other arguments")
    return _compile_subprocess()


EXPECTED = ["decode-h16-split", "decode-h128", "decode-h16-fp32", "decode-h128-r1024", "prefill-absorbed",
            "prefill-expanded", "combine", "write_cache"]
EXPECTED += ["decode-h16-scheduled", "decode-h128-scheduled", "combine-scheduled"]
EXPECTED += ["decode-h16-fp8", "decode-h128-fp8", "write_cache-fp8"]
EXPECTED += ["prefill-gather", "merge-states", "rope", "rms_norm", "norm_rope"]
EXPECTED += ["decode-h16-nope", "prefill-expanded-nope", "write_cache-nope"]  # P = 0: no rope key at all
# shapes whose heuristic tiles are shrunk to fit the H100's shared memory (fp32 at 64 x 64 needs 304 KiB) or the
# MI300X's LDS (fp32 or R = 1024 at 32 x 16, the expanded kernel at D = 512: up to 304 KiB unfitted)
EXPECTED += ["decode-h128-fp32", "decode-h128-p1024", "decode-h16-r1024-fp32", "decode-h128-r1024-fp32",
             "prefill-expanded-d512", "prefill-expanded-fp32", "prefill-expanded-d512-fp32"]


EXPECTED_TMA = ["decode-tma-h16-split", "decode-tma-h128"]
# the Gluon kernel (decode_gluon): it cannot run under the interpreter, so this compile is CI's only check of it
EXPECTED_GLUON = ["decode-gluon-h128", "decode-gluon-h64-split", "prefill-absorbed-gluon"]
EXPECTED_NVIDIA_ONLY = EXPECTED_TMA * HAS_TMA + EXPECTED_GLUON * HAS_GLUON


def _linker_missing(report: dict) -> bool:
    """Triton before 3.5, which links gfx942 code with ROCm's ld.lld (later ones link in-process), and every case
    failed for want of it: a machine without ROCm cannot run this check with that triton."""
    return _triton_version() < (3, 5) and bool(report) and all(
        "ld.lld not found" in r.get("error", "") for r in report.values())


@pytest.mark.parametrize("target", ["sm90", "gfx942"])
def test_every_kernel_compiles(reports, target):
    got = reports[target]
    if target == "gfx942" and _linker_missing(got):
        pytest.skip("this triton links gfx942 code with ROCm's ld.lld, which this machine lacks")
    missing = [name for name in EXPECTED + (EXPECTED_NVIDIA_ONLY if target == "sm90" else []) if name not in got]
    assert not missing, f"cases not compiled: {missing}"
    failed = {name: r["error"] for name, r in got.items() if "error" in r}
    assert not failed, f"compile failures for {target}: {failed}"
    assert all(r["binary_bytes"] > 0 for r in got.values())


def test_decode_report_is_complete(reports, capsys):
    """ptxas's report exists for every sm_90 case (so a GPU session can read registers and spills from CI's
    log); it is printed, and the tensor-core path (wgmma) is used by the bf16 decode tiles of 64 rows."""
    for name, report in reports["sm90"].items():
        assert report.get("registers") is not None, f"{name}: no ptxas report"
        with capsys.disabled():
            print(f"\n  sm90 {name}: {report['registers']} registers, {report['spill_store_bytes']} B spill stores, "
                  f"{report['shared_bytes']} B shared, wgmma {report['wgmma']}, cp.async {report['cp_async']}",
                  end="")
    assert reports["sm90"]["decode-h128"]["wgmma"], reports["sm90"]["decode-h128"]
    # the library sizes tiles by its own estimate (decode_tiles, _expanded_config): the compiler may add at most
    # SHARED_SCRATCH_BYTES to it, or a tile it thinks fits would fail to launch
    under = {n: (r["shared_bytes"], r["shared_estimate"]) for n, r in reports["sm90"].items()
             if r.get("shared_estimate") is not None and r["shared_bytes"] > r["shared_estimate"] + SHARED_SCRATCH_BYTES}
    assert not under, f"shared memory (compiled, estimated) beyond the estimate's scratch allowance: {under}"
    too_big = {n: r["shared_bytes"] for n, r in reports["sm90"].items() if r["shared_bytes"] > H100_SHARED_BYTES}
    assert not too_big, f"these launches would fail with 'out of resources' on an H100: {too_big}"
    gfx942 = {} if _linker_missing(reports["gfx942"]) else reports["gfx942"]  # (test_every_kernel_compiles says so)
    too_big = {n: r["shared_bytes"] for n, r in gfx942.items() if r["shared_bytes"] > MI300_LDS_BYTES}
    assert not too_big, f"these launches would fail with 'out of resources' on an MI300X: {too_big}"
    # the gfx942 model (decode_shared_bytes / expanded_shared_bytes with hip) fits ROCm's tiles with nothing to
    # spare: it must not count less than the compiler lays out (exact at one stage, an upper bound at two)
    under = {n: (r["shared_bytes"], r["shared_estimate"]) for n, r in gfx942.items()
             if r.get("shared_estimate") is not None and r["shared_bytes"] > r["shared_estimate"]}
    assert not under, f"LDS (compiled, estimated) above the gfx942 estimate: {under}"
    # compiled as the JIT specializes a launch, the cache loads are pipelined (cp.async into num_stages buffers):
    # a change that loses this (an unaligned access, a load the pipeliner cannot move) shows up here, not only in
    # a GPU's timings
    for name in ("decode-h16-split", "decode-h128", "decode-h128-fp8", "prefill-expanded"):
        assert reports["sm90"][name]["cp_async"], (name, reports["sm90"][name])
    # a config's EVICT reaches the cache loads as an L2 evict-first policy where decode.evict_changes_code says so
    # (the pipelined loads from triton 3.9 on, a one-stage loop's plain loads on every triton); without it no load
    # has one
    for name in ("decode-h16-evict", "decode-h128-evict", "decode-h16-evict-1stage"):
        report = reports["sm90"][name]
        assert report["evict_first"] == decode.evict_changes_code(report, torch.device("cpu")), (name, report)
    assert reports["sm90"]["decode-h16-evict-1stage"]["evict_first"]
    assert not [n for n, r in reports["sm90"].items() if r.get("evict_first") and "-evict" not in n]
    for name in EXPECTED_NVIDIA_ONLY:  # the Hopper paths really load their tiles with TMA copies
        assert reports["sm90"][name]["tma"], (name, reports["sm90"][name])
    for name in EXPECTED_GLUON * HAS_GLUON:  # and the Gluon kernel's products are warpgroup MMAs
        assert reports["sm90"][name]["wgmma"], (name, reports["sm90"][name])


# launch wrapper -> the kernels it must reach, in launch order (``_compile.jit_launches``)
JIT_EXPECTED = {
    "decode-portable-split1": ["_mla_attn_kernel"],
    "decode-portable-split2": ["_mla_attn_kernel", "_mla_combine_kernel"],
    "decode-tma-split1": ["_mla_attn_tma_kernel"],
    "decode-tma-split2": ["_mla_attn_tma_kernel", "_mla_combine_kernel"],
    "decode-gluon-split1": ["_mla_attn_gluon_kernel"],
    "decode-gluon-split2": ["_mla_attn_gluon_kernel", "_mla_combine_kernel"],
    "decode-portable-int64": ["_mla_attn_kernel"],
    "decode-tma-int64": ["_mla_attn_tma_kernel"],
    "decode-gluon-int64": ["_mla_attn_gluon_kernel"],
    "mla_decode-h16-w_uv": ["_mla_attn_kernel"],
    "mla_decode-h16-fp8": ["_mla_attn_kernel"],
    "mla_decode-h128-sparse": ["_mla_sparse_attn_kernel", "_mla_combine_kernel"],
    "mla_prefill": ["_mla_attn_kernel"],
    "mla_prefill_attention-expanded": ["_gather_latent_kernel", "_mla_expanded_kernel"],
    "write_cache": ["_write_cache_kernel"],
    "write_cache-fp8": ["_write_cache_kernel"],
}


def test_launch_wrappers_compile_through_the_jit():
    """The library's own launch code, run on CPU tensors with Triton's JIT driven as for an H100 (a stand-in driver;
    nothing launches): every wrapper's arguments bind to its kernel's parameters, specialize as on the GPU and
    compile, and reach the kernels they should. ``compile_for`` builds signatures by hand, so only this catches a
    wrapper whose argument list no longer matches its kernel, or a GPU launch that depends on the tensors' device.
    The Gluon kernel's launch (descriptors with their shared layouts, layouts as constexprs) is checked nowhere else
    without a Hopper GPU."""
    got = _compile_subprocess("--jit")
    failed = {name: r["error"] for name, r in got.items() if isinstance(r, dict)}
    assert not failed, failed
    absent = ("decode-tma",) * (not HAS_TMA) + ("decode-gluon",) * (not HAS_GLUON)  # paths this triton lacks
    expected = {name: kernels for name, kernels in JIT_EXPECTED.items() if not name.startswith(absent)}
    assert {name: [k["kernel"] for k in r] for name, r in got.items()} == expected
    launches = [k for r in got.values() for k in r]
    too_big = [(k["kernel"], k["shared_bytes"]) for k in launches if k["shared_bytes"] > H100_SHARED_BYTES]
    assert not too_big, f"these launches would fail with 'out of resources' on an H100: {too_big}"
    for name in ("decode-tma-split1",) * HAS_TMA + ("decode-gluon-split1",) * HAS_GLUON:
        assert got[name][0]["tma"], got[name]
    assert got["decode-portable-split1"][0]["wgmma"]
    assert not HAS_GLUON or got["decode-gluon-split1"][0]["wgmma"]


def test_cached_launches_match_triton():
    """``_launcher.launch`` hands the compiled kernel the arguments Triton's own launch hands it, and picks the kernel
    Triton picks: each call is launched the plain way and then, cached, three passes over (the last two must not
    call Triton's run at all), all driven up to the driver as on an H100, with calls that differ in one thing
    only (a misaligned view, a constexpr, an int's divisibility, a dtype, int64 indices, a fresh schedule). Calls
    whose key cannot stand for Triton's binding (a constexpr float given positionally, a runtime scalar by keyword)
    always go through Triton's run, as does every launch with a launch hook set (a profiler) or Triton's debug on."""
    got = _compile_subprocess("--cached-launches")
    if "skipped" in got and (_triton_version() < (3, 3) or torch.version.hip):  # every launch is Triton's own
        pytest.skip(got["skipped"])
    hits = got.pop("hits")
    assert got and all(verdict == "same" for verdict in got.values()), got
    cached = [name for name in got if not name.startswith("fallback-")]
    assert hits >= 2 * len(cached), "the cached path was not taken"


def test_public_calls_compile_across_shapes():
    """The public calls at the shapes whose tiles differ (``_compile.jit_shapes``: odd head counts and S_q, pages of
    1 and 256, widths 16-1024, fp16/fp32, fp8 with the schedule, sparse lists, the three prefill paths) bind,
    compile for an H100 through Triton's JIT and fit its shared memory; the kernels reached are the expected ones
    (a split decode adds the combine, the expanded prefill its gather)."""
    got = _compile_subprocess("--jit-shapes")
    failed = {name: r["error"] for name, r in got.items() if isinstance(r, dict)}
    assert not failed, failed
    too_big = {name: [(k["kernel"], k["shared_bytes"]) for k in r] for name, r in got.items()
               if any(k["shared_bytes"] > H100_SHARED_BYTES for k in r)}
    assert not too_big, f"these launches would fail with 'out of resources' on an H100: {too_big}"
    kernels = {name: [k["kernel"] for k in r] for name, r in got.items()}
    assert kernels["decode-h128-page256"] == ["_mla_attn_kernel", "_mla_combine_kernel"]
    assert kernels["decode-h16-fp8-scheduled"] == ["_mla_attn_kernel", "_mla_combine_kernel"]
    assert kernels["decode-h128-sparse-page1"] == ["_mla_sparse_attn_kernel"]
    # GLM-5.3-Flash's step (64 heads, P = 0): its 2063-key lists split, so the combine runs
    assert kernels["decode-h64-p0-sparse2063-fp8"] == ["_mla_sparse_attn_kernel", "_mla_combine_kernel"]
    # split_tokens: the split grid and its combine even where one split holds every sequence (4096 > 300 keys)
    assert kernels["decode-h1-split-tokens4096"] == ["_mla_attn_kernel", "_mla_combine_kernel"]
    assert kernels["prefill-latent-h16-split-tokens64"] == ["_mla_attn_kernel", "_mla_combine_kernel"]
    assert kernels["prefill-expanded-h16-fp8"] == ["_gather_latent_kernel", "_mla_expanded_kernel"]
    assert len(got) >= 40


@pytest.mark.parametrize("target", ["sm80", "sm86"])
def test_public_calls_compile_for_gpus_before_hopper(target):
    """The same calls for an A100 (sm_80, 163 KiB of shared memory a block) and for sm_86/sm_89 GPUs (RTX 30/40, A10,
    L4, L40S: 99 KiB): the tiles fitted to that memory, and an fp8 cache given to the kernels as its uint8 bits
    (``_utils.fp8_bits``: Triton has no e4m3 type before sm_89; the fp8 cases failed to compile there before). Every
    launch compiles, without wgmma (Hopper's), within the GPU's shared memory."""
    from mla_kernels._compile import OTHER_NVIDIA

    got = _compile_subprocess("--jit-shapes", "--target", target)
    failed = {name: r["error"] for name, r in got.items() if isinstance(r, dict)}
    assert not failed, failed
    limit = OTHER_NVIDIA[target][1]
    too_big = {name: [(k["kernel"], k["shared_bytes"]) for k in r] for name, r in got.items()
               if any(k["shared_bytes"] > limit for k in r)}
    assert not too_big, f"these launches would fail with 'out of resources' on {target}: {too_big}"
    assert not any(k["wgmma"] or k["tma"] for r in got.values() for k in r)
    assert [k["kernel"] for k in got["write-fp8"]] == ["_write_cache_kernel"] and len(got) >= 40


@pytest.mark.parametrize("argv", [["--target", "sm80"], ["--jit", "--target", "sm80"], ["--jit-shapes", "--target", "sm70"],
                                  ["--jit-shapes", "--target"]], ids=["no-mode", "jit", "unknown", "missing"])
def test_main_refuses_a_target_it_would_ignore(argv, monkeypatch):
    """``--target`` is honoured by ``--jit-shapes`` only: elsewhere it silently compiled the sm90/gfx942 report (or
    the sm90 JIT launches), an unknown name failed every case with a KeyError, and a missing one raised IndexError.
    Each now exits at once, naming the choices, before any compile."""
    from mla_kernels import _compile

    def ran(*args, **kwargs):
        raise AssertionError("compiled, with the --target ignored or unknown")

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for name in ("compile_all", "jit_launches", "jit_shapes"):
        monkeypatch.setattr(_compile, name, ran)
    monkeypatch.setattr(sys, "argv", ["_compile", *argv])
    with pytest.raises(SystemExit, match="--target is taken with --jit-shapes only"):
        _compile.main()


def test_main_answers_help_and_refuses_unknown_flags(monkeypatch, capsys):
    """``--help`` ran the whole compile report (about 20 s) instead of saying what the flags are; an unknown flag was
    ignored the same way."""
    from mla_kernels import _compile

    def ran(*args, **kwargs):
        raise AssertionError("compiled instead of answering")

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for name in ("compile_all", "jit_launches", "jit_shapes", "cached_launches"):
        monkeypatch.setattr(_compile, name, ran)
    monkeypatch.setattr(sys, "argv", ["_compile", "--help"])
    _compile.main()
    assert "usage: python -m mla_kernels._compile" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["_compile", "--jit", "--fast"])
    with pytest.raises(SystemExit, match=r"unknown arguments \['--fast'\]"):
        _compile.main()
