"""CPU tensors take the interpreter only where TRITON_INTERPRET was set at import and still is (Triton fixes
interpretation at import); otherwise the PyTorch path, never compiled kernels on CPU tensors."""

import os
import subprocess
import sys

import pytest
import torch

SCRIPT = """
import os, torch{first}
os.environ["TRITON_INTERPRET"] = {late!r}
import mla_kernels
r, p = 32, 16
buf = torch.randn(2, 16, r + p)
q = torch.randn(1, 1, 2, r + p)
with torch.no_grad():
    out = mla_kernels.mla_decode(q[..., :r], q[..., r:], buf[..., :r], buf[..., r:], torch.tensor([[0, 1]], dtype=torch.int32),
                                 torch.tensor([20], dtype=torch.int32), 0.1)
print(out.shape)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors only")
@pytest.mark.parametrize("at_import,first,late", [
    ("0", ", mla_kernels", "1"), ("1", ", mla_kernels", "0"),
    # set after triton's import but before the library's: triton's own jit functions (tl.max, ...) are compiled
    # ones then, which the interpreter cannot call ("Cannot call @triton.jit'd outside of the scope of a kernel")
    ("0", ", triton", "1")], ids=["set-late", "unset-late", "set-between"])
def test_a_later_change_of_triton_interpret_takes_the_pytorch_path(at_import, first, late):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET=at_import, PYTHONPATH=root)
    run = subprocess.run([sys.executable, "-c", SCRIPT.format(first=first, late=late)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
