"""CPU tensors take the interpreter only where TRITON_INTERPRET was set at import and still is (Triton fixes
interpretation at import); otherwise the PyTorch path, never compiled kernels on CPU tensors."""

import os
import subprocess
import sys

import pytest
import torch

SCRIPT = """
import os, torch, mla_kernels
os.environ["TRITON_INTERPRET"] = {late!r}
r, p = 32, 16
buf = torch.randn(2, 16, r + p)
q = torch.randn(1, 1, 2, r + p)
with torch.no_grad():
    out = mla_kernels.mla_decode(q[..., :r], q[..., r:], buf[..., :r], buf[..., r:], torch.tensor([[0, 1]], dtype=torch.int32),
                                 torch.tensor([20], dtype=torch.int32), 0.1)
print(out.shape)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors only")
@pytest.mark.parametrize("at_import,late", [("0", "1"), ("1", "0")])
def test_a_later_change_of_triton_interpret_takes_the_pytorch_path(at_import, late):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET=at_import, PYTHONPATH=root)
    run = subprocess.run([sys.executable, "-c", SCRIPT.format(late=late)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
