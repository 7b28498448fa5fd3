"""Every kernel compiles for an H100 (sm_90) and an MI300X (gfx942) on this CPU-only machine.

Runs the real Triton compiler for both vendors with the configs the library launches, so a
change that breaks either backend fails CI although CI has no GPU. The compiler runs in a
subprocess without TRITON_INTERPRET (the interpreter swaps triton.language's own jit helpers,
which the compiler cannot then inline). On sm_90 it reads ptxas's report and asserts the
decode configs do not spill registers.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def reports():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-m", "mla_kernels._compile"], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout)


EXPECTED = ["decode-h16-split", "decode-h128", "decode-h16-fp32", "prefill-absorbed", "prefill-expanded", "combine", "write_cache"]


@pytest.mark.parametrize("target", ["sm90", "gfx942"])
def test_every_kernel_compiles(reports, target):
    got = reports[target]
    missing = [name for name in EXPECTED if name not in got]
    assert not missing, f"cases not compiled: {missing}"
    failed = {name: r["error"] for name, r in got.items() if "error" in r}
    assert not failed, f"compile failures for {target}: {failed}"
    assert all(r["binary_bytes"] > 0 for r in got.values())


def test_decode_configs_do_not_spill(reports):
    """The bf16 decode configs, the ones serving runs, keep everything in registers. (fp32 tiles are twice
    as wide and spill ~100 bytes at the same tiles: fp32 is for exactness tests, not speed.)"""
    for name, report in reports["sm90"].items():
        if name.startswith("decode") and "fp32" not in name:
            assert report["registers"] is not None, f"{name}: no ptxas report"
            assert report["spill_store_bytes"] == 0, f"{name} spills registers: {report}"
