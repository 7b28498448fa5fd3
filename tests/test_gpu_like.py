"""``tests/gpu_like.py`` (``MLA_TEST_GPU_LIKE=1``) still does what it says on this triton: it patches the
interpreter's internals, which change between releases, and a patch that silently stopped applying would let the
suite pass for the wrong reason. Run in a subprocess: the patches are process-wide."""

import os
import subprocess
import sys

import pytest
import torch

SCRIPT = """
import os
os.environ["TRITON_INTERPRET"] = "1"
import numpy as np, torch, triton, triton.language as tl
import gpu_like
gpu_like.install()
assert gpu_like.installed

@triton.jit
def probe(x_ptr, y_ptr, out_ptr, lanes_ptr, bf16_ptr, exp_ptr, n):
    offs = tl.arange(0, 8)
    x = tl.load(x_ptr + offs)
    y = tl.load(y_ptr + offs)
    tl.store(out_ptr + offs, tl.maximum(x, y, propagate_nan=tl.PropagateNan.ALL))  # NaN in x: canonical out
    tl.store(lanes_ptr + offs, tl.load(y_ptr + offs, mask=offs < n))  # masked lanes without other=
    tl.store(bf16_ptr + offs, y.to(tl.bfloat16))
    tl.store(exp_ptr + offs, tl.math.exp2(y))

x = torch.tensor([float("nan")] + [0.0] * 7)
y = torch.tensor([1.0, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, -130.0, 2.0, 3.0, 4.0, 5.0])
out, lanes, exp = torch.empty(8), torch.empty(8), torch.empty(8)
bf16 = torch.empty(8, dtype=torch.bfloat16)
probe[(1,)](x, y, out, lanes, bf16, exp, 4)
assert out.view(torch.int32)[0].item() == 0x7FFFFFFF, hex(out.view(torch.int32)[0].item())
assert lanes[4:].isnan().all() and torch.equal(lanes[:4], y[:4]), lanes
assert torch.equal(bf16.float(), y.to(torch.bfloat16).float()), (bf16, y.to(torch.bfloat16))  # torch rounds to even
assert exp[3].item() == 0.0 and exp[0].item() == 2.0, exp  # 2^-130 is subnormal: flushed
print("ok")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's tool; a GPU is the real thing")
def test_gpu_like_interpreter_patches_apply():
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tests, os.path.dirname(tests)]))
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's tool; a GPU is the real thing")
def test_bf16_rounding_for_one_test_is_undone_after_it():
    """``gpu_like.round_bf16_casts`` (conftest's ``gpu_bf16_rounding``): kernels' fp32 -> bf16 casts round to
    nearest even while it holds, and truncate again after (unless the whole run installed the rounding)."""
    import triton
    import triton.language as tl

    import gpu_like

    @triton.jit
    def cast(y_ptr, out_ptr):
        offs = tl.arange(0, 4)
        tl.store(out_ptr + offs, tl.load(y_ptr + offs).to(tl.bfloat16))

    y = torch.tensor([1.0 + 3 * 2.0 ** -8, -(1.0 + 3 * 2.0 ** -8), 1.0 + 2.0 ** -8, 1.0 + 2.0 ** -9])
    rounded = y.to(torch.bfloat16)
    truncated = (y.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
    assert not torch.equal(rounded, truncated)

    def run():
        out = torch.empty(4, dtype=torch.bfloat16)
        cast[(1,)](y, out)
        return out
    was_rounding = "bf16" in gpu_like.active
    with pytest.MonkeyPatch.context() as mp:
        gpu_like.round_bf16_casts(mp)
        assert torch.equal(run(), rounded) and "bf16" in gpu_like.active
    assert torch.equal(run(), rounded if was_rounding else truncated)
    assert ("bf16" in gpu_like.active) == was_rounding
