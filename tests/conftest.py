"""Test setup: without a GPU, every Triton kernel runs through Triton's CPU interpreter.

``TRITON_INTERPRET`` must be set before triton is first imported, which is why this
happens here, at collection time, and never inside the library.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    assert "triton" not in sys.modules, "triton was imported before TRITON_INTERPRET could be set"
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/ and reference/ (the old home of mla_kernels.reference)

import pytest  # noqa: E402

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    import bounds  # noqa: E402

    # every interpreted kernel's loads and stores must stay inside its arguments' memory; MLA_TEST_RACES=1 also
    # fails an element two programs of one launch touch, one writing (slow, by hand)
    bounds.install(races=os.environ.get("MLA_TEST_RACES", "0") not in ("", "0"))
    gpu_like_features = os.environ.get("MLA_TEST_GPU_LIKE", "0")
    if gpu_like_features not in ("", "0"):
        # by hand: the interpreter with a GPU's NaN payloads, undefined masked lanes, bf16 rounding and ftz exp2/log2
        import gpu_like  # noqa: E402

        gpu_like.install(gpu_like.FEATURES if gpu_like_features == "1" else gpu_like_features.split(","))


@pytest.fixture(scope="session")
def device():
    """Where kernels run: the GPU when there is one, otherwise the CPU through the interpreter."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every float buffer the library allocates, or takes from its reused scratch (``_utils.scratch``), starts as
    NaN, so an element it forgets to write fails."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", nan_empty)
    from mla_kernels import _utils

    real_scratch = _utils.scratch

    def nan_scratch(*args):  # reused scratch holds the last call's values: poison it at every hand-out too
        views = real_scratch(*args)
        for v in views:
            v.fill_(float("nan"))
        return views

    monkeypatch.setattr(_utils, "scratch", nan_scratch)


@pytest.fixture
def gpu_bf16_rounding(monkeypatch):
    """Under the interpreter, the test's fp32 -> bf16 casts in kernels round to nearest even as a GPU's do, where the
    interpreter truncates (``gpu_like.round_bf16_casts``); a no-op on a GPU. The library's kernels round by
    themselves now (``mla_kernels._convert.to_dtype``): this still covers any plain ``.to()`` cast a kernel has."""
    from mla_kernels import _utils

    if _utils.interpreting():
        import gpu_like
        gpu_like.round_bf16_casts(monkeypatch)


def pytest_collection_modifyitems(config, items):
    """``MLA_TEST_FIRST="tests/test_a.py tests/test_b.py"``: those files' tests first, in that order, the rest after
    as collected (a GPU session's time-boxed native run, where pytest-xdist hands tests out in collection order:
    naming the files on the command line beside ``tests`` does not reorder them, pytest collects them in place)."""
    first = [os.path.basename(name) for name in os.environ.get("MLA_TEST_FIRST", "").split()]
    if first:
        rank = {name: i for i, name in enumerate(first)}
        items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))  # (stable)


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """Make the library believe CPU tensors are on "Test GPU" 0, with its shipped configs in tmp/configs and the
    user's cache in tmp/cache; nothing loaded before, nothing left behind."""
    from mla_kernels import _tuning

    monkeypatch.setattr(_tuning, "_gpu_index", lambda device: 0)
    monkeypatch.setattr(_tuning, "_device_name", lambda index: "Test GPU")
    monkeypatch.setattr(_tuning, "CONFIG_DIR", tmp_path / "configs")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(_tuning.AUTOTUNE_ENV, raising=False)
    monkeypatch.setattr(_tuning, "_warned", set())
    monkeypatch.setattr(_tuning, "_tried", set())
    monkeypatch.setattr(_tuning, "_tuned_here", {})
    monkeypatch.setattr(_tuning, "_unwritable", set())
    monkeypatch.setattr(_tuning, "_dropped", {})
    _tuning.reload()
    yield tmp_path
    _tuning.reload()
