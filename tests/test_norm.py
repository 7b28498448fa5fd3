"""The RMSNorm kernel (``mla_kernels.norm.rms_norm``) against the formula in float64, and the calls it leaves to the
module: other formulas, hooks, autograd, shapes and dtypes it does not take."""

from __future__ import annotations

import importlib
import re

import pytest
import torch
from torch import nn

from helpers import INTERCEPTING_RUNS, assert_close, record_launches
from mla_kernels import norm as norm_mod
from mla_kernels.integrations.transformers import SUPPORTED_MODEL_TYPES
from mla_kernels.norm import DeepseekRMSNorm, KernelRMSNorm, rms_norm

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def make_norm(width, dtype, device, eps=1e-6, cls=DeepseekRMSNorm, seed=0):
    """``cls(width)`` with a random weight (ones would hide a weight read from the wrong place) in ``dtype``."""
    norm = cls(width, eps=eps).to(device, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(width, generator=torch.Generator().manual_seed(seed)) + 1)
    return norm


def formula(norm, x):
    """The module's formula in float64: ``w * x / sqrt(mean(x^2) + eps)``."""
    xd = x.double()
    return norm.weight.double() * xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)


@pytest.mark.parametrize("weight_dtype", ["same", "fp32"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", ["tokens", "batch-seq", "latent-view", "one-row", "width-96", "small-rows-eps",
                                  "subnormal-rows"])
def test_rms_norm_matches_the_formula(case, dtype, weight_dtype, device, poisoned_empty, monkeypatch):
    """One launch, in every layout the drop-in hands it: packed tokens ``[T, R]``, ``[B, S, R]``, the latent as a
    view of the latent projection's ``[B, S, R + P]`` rows (``kv_c``), one row ``[R]``, and a width that is not a
    power of two (DeepSeek's query norm is 1536 wide: the row block is masked). A float32 weight (autocast) gives a
    float32 result, as the module's product does. Every output element is written (``poisoned_empty``).
    The epsilon as the module holds it (``small-rows-eps``: 1e-2, not the default): rows of zeros (0, where a
    missing epsilon gives 0 * inf = NaN) and rows whose mean square is far under, near and far over it (scales
    1e-3, 3e-2 and 1 of ``randn * 3``); the other cases' rows (mean square ~9) move by ~1e-7 with epsilon, under any
    tolerance. ``subnormal-rows``: rows of bf16 (and fp32) subnormals, which the epsilon scales into range
    (x / sqrt(1e-6)): the interpreter's own bf16 -> fp32 cast got them wrong by up to 3x (-7.16e-39 read as
    -2.57e-39); the kernel widens them exactly (``_convert.to_float32``). fp16 rounds them to 0."""
    width = 96 if case == "width-96" else 128
    g = torch.Generator().manual_seed(1)
    shape = {"tokens": (7, width), "batch-seq": (2, 3, width), "latent-view": (2, 3, width + 32), "one-row": (width,),
             "width-96": (5, width), "small-rows-eps": (5, width), "subnormal-rows": (4, width)}[case]
    x = torch.randn(shape, generator=g) * 3
    if case == "small-rows-eps":
        x *= torch.tensor([0.0, 1e-3, 3e-2, 1.0, 0.0])[:, None]
    if case == "subnormal-rows":
        x *= torch.tensor([1e-39, 3e-40, 5e-39, 2e-39])[:, None]  # (every row: the error bound is over all)
    x = x.to(device, dtype)
    if case == "latent-view":
        x = x[..., :width]
    norm = make_norm(width, dtype if weight_dtype == "same" else torch.float32, device,
                     eps=1e-2 if case == "small-rows-eps" else 1e-6)
    calls = []
    launch = norm_mod._launcher.launch
    monkeypatch.setattr(norm_mod._launcher, "launch", lambda *a, **k: (calls.append(a[0]), launch(*a, **k))[1])
    with torch.no_grad():
        got, module = rms_norm(norm, x), norm(x)
    assert calls == [norm_mod._rms_norm_kernel]
    assert got.dtype == module.dtype and got.shape == module.shape and got.is_contiguous()
    # rounded twice (to x's dtype, then the product to the result's), as the module rounds: its error budget
    assert_close(f"rms_norm {case}", got, formula(norm, x), got.dtype if dtype == torch.float32 else dtype)
    assert_close(f"module {case}", module, formula(norm, x), got.dtype if dtype == torch.float32 else dtype)


def test_rms_norm_rounds_to_the_inputs_dtype_before_the_weight(device):
    """The module casts the normalized row back to x's dtype and then multiplies by the weight: with a float32
    weight and fp16 x (the kernel rounds fp16 exactly under the interpreter too) the kernel's result equals the
    module's wherever the float32 sums agree, and is not the unrounded float32 product."""
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(2)).to(device, torch.float16)
    norm = make_norm(512, torch.float32, device)
    with torch.no_grad():
        got, module = rms_norm(norm, x), norm(x)
        unrounded = norm.weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6))
    same = (got == module).double().mean().item()
    assert same > 0.99, f"only {same:.4f} of the values equal the module's"
    assert (got != unrounded).double().mean().item() > 0.5  # the fp16 rounding in between is there


@pytest.mark.parametrize("model_type", sorted(SUPPORTED_MODEL_TYPES))
def test_the_patched_models_norms_take_the_kernel(model_type):
    """The RMSNorm class (``*RMSNorm``; Kimi-Linear's and Ling 3's gated ones are other modules) of every model type
    the drop-in patches is recognized as the formula (else its norms would quietly keep their eight launches each).
    A.X-K2's ``AXK2GatedRMSNorm`` (its decoder's input norm, times a low-rank gate of its input) and Hy4's
    ``HYV4UnweightedRMSNorm`` (its hyper-connections': the inverse norm alone, no weight) are other formulas: they
    must not be taken for the plain one."""
    module_name, _ = SUPPORTED_MODEL_TYPES[model_type]
    try:
        mod = importlib.import_module(module_name)
    except ImportError:
        pytest.skip(f"the installed transformers has no {module_name}")
    classes = [obj for name, obj in vars(mod).items()
               if isinstance(obj, type) and name.endswith("RMSNorm") and obj.__module__ == mod.__name__]
    gated = [cls for cls in classes if "Gated" in cls.__name__ or "Unweighted" in cls.__name__]
    plain = [cls for cls in classes if cls not in gated]
    assert plain and all(norm_mod._plain_class(cls) for cls in plain), [c.__name__ for c in plain]
    assert not any(norm_mod._plain_class(cls) for cls in gated), [c.__name__ for c in gated]


class GemmaStyleNorm(DeepseekRMSNorm):
    """Another formula: scaled by ``1 + weight``."""

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return (1 + self.weight) * hidden_states.to(input_dtype)


class NoRecastNorm(DeepseekRMSNorm):
    """Another formula: the weight's product in float32, cast back after."""

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return (self.weight * hidden_states).to(input_dtype)


class CallingNorm(DeepseekRMSNorm):
    """The formula's forward, but a ``__call__`` of its own."""

    def __call__(self, hidden_states):
        return super().__call__(hidden_states) * 2


def _with_hook(kind):
    def make(norm):
        if kind == "pre":
            norm.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
        elif kind == "post":
            norm.register_forward_hook(lambda m, args, out: out + 1)
        else:
            inner = norm.forward
            norm.forward = lambda h: inner(h) - 1  # as accelerate's hooks wrap an offloaded module's forward
        return norm
    return make


def _strided_weight(norm):
    """``norm`` with its weight a Parameter over every other value of a buffer twice its width (on its device)."""
    width = norm.weight.shape[0]
    buf = torch.randn(2 * width, generator=torch.Generator().manual_seed(7)) + 1
    norm.weight = nn.Parameter(buf.to(norm.weight.device)[::2])
    assert norm.weight.stride() == (2,)
    return norm


@pytest.mark.parametrize("make,change", [
    (lambda n: GemmaStyleNorm(n.weight.shape[0]), None),
    (lambda n: NoRecastNorm(n.weight.shape[0]), None),
    (lambda n: CallingNorm(n.weight.shape[0]), None),
    (_with_hook("pre"), None),
    (_with_hook("post"), None),
    (_with_hook("instance-forward"), None),
    (None, lambda x: x.double()),  # float64: not a kernel dtype
    (None, lambda x: x.expand(2, 2, *x.shape)),  # three token dimensions
    (None, lambda x: x.t().contiguous().t()),  # the width not the unit stride
    (None, lambda x: x[:, :16]),  # a weight of another width: the module's own broadcasting error
    (_strided_weight, None),  # a weight not unit-strided (the kernel reads W + cols)
], ids=["other-formula", "no-recast", "own-call", "pre-hook", "post-hook", "instance-forward", "float64",
        "three-dims", "strided-width", "weight-width", "strided-weight"])
def test_rms_norm_calls_the_module_where_the_kernel_does_not_serve(make, change, monkeypatch, device):
    """Calls the kernel does not take go to the module itself, with its result (or its error), launching nothing."""
    launches = record_launches(monkeypatch, norm_mod, "_rms_norm_kernel")
    norm = make_norm(32, torch.float32, device)
    if make is not None:
        norm = make(norm).to(device)
    x = torch.randn(4, 32, device=device)
    if change is not None:
        x = change(x)
    with torch.no_grad():
        try:
            expected = norm(x)
        except RuntimeError as e:
            with pytest.raises(RuntimeError, match=re.escape(str(e))):
                rms_norm(norm, x)
        else:
            got = rms_norm(norm, x)
            assert got.dtype == expected.dtype and torch.equal(got, expected)
    assert not launches


def test_rms_norm_calls_the_module_under_a_global_hook_autograd_or_compile(monkeypatch, device):
    """A hook registered for every module, a weight or input autograd records, a tensor subclass and a call while
    compiling (inductor fuses the module's ops) go to the module; its result then carries its gradient."""
    launches = record_launches(monkeypatch, norm_mod, "_rms_norm_kernel")
    norm = make_norm(32, torch.float32, device)
    x = torch.randn(4, 32, device=device)
    seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, args, out: seen.append(m))
    try:
        with torch.no_grad():
            rms_norm(norm, x)
    finally:
        handle.remove()
    assert seen == [norm] and not launches
    got = rms_norm(norm, x)  # grad enabled and the weight requires grad
    assert got.requires_grad and not launches
    got.sum().backward()
    assert norm.weight.grad is not None

    class Tagged(torch.Tensor):
        pass

    with torch.no_grad():
        assert torch.equal(rms_norm(norm, x.as_subclass(Tagged)), norm(x))
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert torch.equal(rms_norm(norm, x), norm(x))
    assert not launches
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    with torch.no_grad():
        rms_norm(norm, x)
    assert len(launches) == 1  # (the kernel does serve the same call otherwise)


@pytest.mark.parametrize("width,rows,grid,block_r,block_n,warps", [
    (512, 1, 1, 8, 512, 8),  # a decode step's latent row, batch 1: the program batch 16's take, 7 rows masked
    (512, 16, 2, 8, 512, 8),  # batch 16
    (1536, 16, 8, 2, 2048, 8),  # DeepSeek-V3's query norm, padded to 2048
    (512, 8192, 1024, 8, 512, 8),  # a prompt
    (16384, 3, 3, 1, 16384, 8),  # MAX_WIDTH
])
def test_rms_norm_grid(width, rows, grid, block_r, block_n, warps, monkeypatch):
    """Blocks of whole rows, ``TILE_ELEMENTS`` values a program (at least one row), on a one-dimensional grid;
    the row strides and the epsilon as the module has them."""
    launches = record_launches(monkeypatch, norm_mod, "_rms_norm_kernel")
    norm = DeepseekRMSNorm(width, eps=1e-5, device="meta", dtype=torch.bfloat16)
    x = torch.empty(rows, width + 64, device="meta", dtype=torch.bfloat16)[:, :width]
    with torch.no_grad():
        out = rms_norm(norm, x)
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    ((got_grid, args, kwargs),) = launches
    assert got_grid == (grid,) and (kwargs["BLOCK_R"], kwargs["BLOCK_N"], kwargs["num_warps"]) == (block_r, block_n, warps)
    # rows, rows a sequence, the strides (0 along a dimension of one), width, eps
    assert args[3:] == (rows, rows, 0, width + 64 if rows > 1 else 0, width, 1e-5)


@pytest.mark.parametrize("width", [16, 512, 1536, 7168, 16384])
def test_rms_norm_program_shape_follows_the_width_alone(width, monkeypatch):
    """Batch invariance: a row's squares are summed in an order fixed by the program's layout, so the program's
    shape (rows per program, width, warps) comes from the width, never from how many rows the call has; a row's
    result is then the same bits at any batch size (the split_tokens promise, for the cached latent it normalizes).
    It followed the row count (one row: a one-row program of 4 warps; 16 rows: 8 rows of 8 warps)."""
    launches = record_launches(monkeypatch, norm_mod, "_rms_norm_kernel")
    norm = DeepseekRMSNorm(width, device="meta")
    with torch.no_grad():
        for rows in (1, 2, 3, 16, 1000):
            rms_norm(norm, torch.empty(rows, width, device="meta"))
    shapes = {(kw["BLOCK_R"], kw["BLOCK_N"], kw["num_warps"]) for _, _, kw in launches}
    assert len(launches) == 5 and len(shapes) == 1, shapes


@pytest.mark.parametrize("width", [512, 1536, 7168])
def test_rms_norm_row_bits_do_not_depend_on_the_batch(width, device):
    """A row's result is the same bits alone, at the head of a few rows, or anywhere in a batch of 64 (natively this
    is the program-shape test's consequence on real hardware; the interpreter sums in numpy's order)."""
    g = torch.Generator().manual_seed(width)
    x = (torch.randn(64, width, generator=g) * 2).to(device, torch.bfloat16)
    norm = make_norm(width, torch.bfloat16, device)
    with torch.no_grad():
        whole = rms_norm(norm, x)
        for lo, hi in ((0, 1), (0, 3), (0, 17), (5, 6), (40, 64)):
            assert torch.equal(rms_norm(norm, x[lo:hi]), whole[lo:hi]), (lo, hi)


def test_rms_norm_of_no_rows_and_wider_rows(monkeypatch):
    """No rows: an empty result and no launch; rows wider than ``MAX_WIDTH``: the module."""
    launches = record_launches(monkeypatch, norm_mod, "_rms_norm_kernel")
    with torch.no_grad():
        norm = DeepseekRMSNorm(64, device="meta")
        assert rms_norm(norm, torch.empty(0, 64, device="meta")).shape == (0, 64)
        wide = DeepseekRMSNorm(norm_mod.MAX_WIDTH * 2)
        x = torch.randn(2, norm_mod.MAX_WIDTH * 2)
        assert torch.equal(rms_norm(wide, x), wide(x))
    assert not launches


def test_rms_norm_past_a_rocm_grid_takes_the_module(monkeypatch):
    """ROCm refuses a launch whose one-axis grid times its threads passes 2^32 - 1 work-items (64 per warp: ~8.4M
    programs of 8 warps, ~8.4M rows past 2048 wide); there the module runs, as past ``MAX_WIDTH``. The bound is
    lowered here to 3 programs of 8 warps (the rows it takes are the GPU's, not the interpreter's); CUDA's grid
    (2^31 - 1) is not the bound."""
    from mla_kernels import _utils

    assert _utils.grid_x_fits(8_388_607, 8) and (_utils.is_hip() or _utils.grid_x_fits(8_388_608, 8))
    monkeypatch.setattr(_utils, "is_hip", lambda: True)
    assert _utils.grid_x_fits(8_388_607, 8) and not _utils.grid_x_fits(8_388_608, 8)
    monkeypatch.undo()
    launches = record_launches(monkeypatch, norm_mod, "_rms_norm_kernel")
    monkeypatch.setattr(_utils, "HIP_MAX_WORK_ITEMS", 3 * 64 * norm_mod.NUM_WARPS)
    norm = DeepseekRMSNorm(512)
    x = torch.randn(4 * 8, 512)  # 4 programs of 8 rows
    with torch.no_grad():
        rms_norm(norm, x)  # CUDA
        assert len(launches) == 1
        monkeypatch.setattr(_utils, "is_hip", lambda: True)
        assert torch.equal(rms_norm(norm, x), norm(x)) and len(launches) == 1  # ROCm: the module
        rms_norm(norm, x[:24])  # 3 programs: launched
        assert len(launches) == 2


def test_rms_norm_launches_on_the_tensors_gpu(monkeypatch):
    """Inside ``_utils.launch_device(x.device)``, as every launch of the library."""
    import contextlib

    from mla_kernels import _utils

    entered, launched = [], []

    @contextlib.contextmanager
    def recording(device):
        entered.append(device)
        yield
        entered.pop()

    monkeypatch.setattr(_utils, "launch_device", recording)
    monkeypatch.setattr(_utils, "use_triton", lambda t: True)
    monkeypatch.setattr(norm_mod._launcher, "launch", lambda *a, **k: launched.append(list(entered)))
    with torch.no_grad():
        rms_norm(DeepseekRMSNorm(64), torch.randn(2, 64))
    assert launched == [[torch.device("cpu")]]


class DocumentedNorm(DeepseekRMSNorm):
    """The formula, its forward with a docstring."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Normalized in fp32, cast back, then scaled."""
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def test_a_docstring_on_the_formulas_forward_is_left_out():
    """``_code_of`` leaves a docstring out: Python 3.10-3.13 keep a function's docstring, or None without one, as
    its first constant, so a forward documented and one not differ there only."""
    assert norm_mod._plain_class(DocumentedNorm)


def test_rms_norm_sees_a_class_changed_after_it_was_read(monkeypatch):
    """A class's ``forward`` or ``__call__`` replaced after ``rms_norm`` first read it (a monkeypatch of the model's
    norm class, as kernel libraries patch): the module's new computation, not the kernel."""
    launches = record_launches(monkeypatch, norm_mod, "_rms_norm_kernel")

    class Patched(DeepseekRMSNorm):
        pass

    norm, x = make_norm(32, torch.float32, "cpu", cls=Patched), torch.randn(4, 32)
    with torch.no_grad():
        rms_norm(norm, x)
        assert len(launches) == 1
        monkeypatch.setattr(Patched, "forward", GemmaStyleNorm.forward)
        assert torch.equal(rms_norm(norm, x), norm(x))
        monkeypatch.setattr(Patched, "forward", DeepseekRMSNorm.forward)
        rms_norm(norm, x)
        assert len(launches) == 2
        monkeypatch.setattr(Patched, "__call__", lambda self, h: nn.Module.__call__(self, h) * 2)
        assert torch.equal(rms_norm(norm, x), norm(x))
    assert len(launches) == 2


class OwnCallImplNorm(DeepseekRMSNorm):
    """The formula's forward and ``nn.Module.__call__``, but a ``_call_impl`` of its own (what ``__call__`` runs)."""

    def _call_impl(self, *args, **kwargs):
        return super()._call_impl(*args, **kwargs) + 1


def _compiled(norm):
    """``norm.compile(...)``, its backend adding one: ``norm(x)`` then runs what the backend made."""
    norm.compile(backend=lambda gm, example: (lambda *args: [t + 1 for t in gm(*args)]))
    return norm


def _instance_call_impl(norm):
    """``_call_impl`` replaced on the instance (``nn.Module.__call__`` looks it up there first)."""
    object.__setattr__(norm, "_call_impl", lambda *args, **kwargs: nn.Module._call_impl(norm, *args, **kwargs) + 1)
    return norm


class ClassEpsNorm(DeepseekRMSNorm):
    """The formula, its epsilon held by the class (the instance has none of its own)."""
    variance_epsilon = 1e-5

    def __init__(self, hidden_size):
        super().__init__(hidden_size)
        del self.variance_epsilon


@pytest.mark.parametrize("make", [lambda n: OwnCallImplNorm(n.weight.shape[0]), _compiled, _instance_call_impl],
                         ids=["own-call-impl", "module-compile", "instance-call-impl"])
def test_rms_norm_calls_a_module_whose_call_runs_something_else(make, monkeypatch):
    """``nn.Module.__call__`` runs ``self._compiled_call_impl`` (set by ``module.compile()``) or else
    ``self._call_impl``: either replaced, the call is not the formula's."""
    launches = record_launches(monkeypatch, norm_mod, "_rms_norm_kernel")
    norm, x = make(make_norm(32, torch.float32, "cpu")), torch.randn(4, 32)
    with torch.no_grad():
        assert torch.equal(rms_norm(norm, x), norm(x))
    assert not launches


def test_rms_norm_reads_a_parametrized_weight_once(device):
    """A weight under ``torch.nn.utils.parametrize`` is computed at each read: ``rms_norm`` reads it once, as the
    module's forward does."""
    from torch.nn.utils import parametrize

    class Doubled(nn.Module):
        calls = 0

        def forward(self, w):
            Doubled.calls += 1
            return w * 2

    norm, x = make_norm(32, torch.float32, device), torch.randn(4, 32, device=device)
    parametrize.register_parametrization(norm, "weight", Doubled())
    with torch.no_grad():
        expected = norm(x)
        Doubled.calls = 0
        got = rms_norm(norm, x)
    assert Doubled.calls == 1
    assert_close("parametrized", got, expected, torch.float32)


@pytest.mark.parametrize("width,eps,shape", [(0, 1e-6, ()), (32, 2 ** 70, (4, 32)), (0, 1e-6, (4, 0))],
                         ids=["0-d", "int-eps", "zero-width"])
def test_rms_norm_of_a_scalar_or_an_integer_epsilon_is_the_modules(width, eps, shape, monkeypatch):
    """A 0-d x (the module broadcasts it over a weight of no width: no IndexError of ``rms_norm``'s own), an epsilon
    too large an int for the module's add (its error, not a result), rows of no width (the module's empty result;
    the kernel's block sizes would divide by the width's): the module's."""
    launches = record_launches(monkeypatch, norm_mod, "_rms_norm_kernel")
    norm, x = DeepseekRMSNorm(width, eps=eps), torch.randn(shape)
    with torch.no_grad():
        try:
            expected = norm(x)
        except Exception as e:  # (an OverflowError)
            with pytest.raises(type(e), match=re.escape(str(e))):
                rms_norm(norm, x)
        else:
            assert torch.equal(rms_norm(norm, x), expected)
    assert not launches


@pytest.mark.parametrize("run", INTERCEPTING_RUNS, ids=[run.__name__.strip("_") for run in INTERCEPTING_RUNS])
def test_rms_norm_calls_the_module_where_its_ops_run_through_something_else(run, device):
    """What runs the module's ops through something else gets the module, as ``module(x)`` would: forward-mode
    AD's tangents (even under no_grad), ``torch.func``'s vmap and jvp (whose wrapped tensors have no storage for a
    kernel), ``torch.jit.trace`` and ``make_fx`` (which record the ops: a kernel would leave the graph an empty
    tensor), a TorchDispatchMode or a TorchFunctionMode (which see, or change, the ops)."""
    norm = make_norm(32, torch.float32, device).requires_grad_(False)
    x, t = torch.randn(4, 32, device=device), torch.randn(4, 32, device=device)
    assert_close("module", run(lambda v: rms_norm(norm, v), x, t), run(norm, x, t), torch.float32)


def test_rms_norm_takes_the_kernel_in_a_device_context(device, monkeypatch):
    """A ``torch.device`` context is a TorchFunctionMode that only places factory calls: still the kernel."""
    calls = []
    launch = norm_mod._launcher.launch
    monkeypatch.setattr(norm_mod._launcher, "launch", lambda *a, **k: (calls.append(a[0]), launch(*a, **k))[1])
    norm, x = make_norm(32, torch.float32, device), torch.randn(4, 32, device=device)
    with torch.no_grad(), torch.device(device):
        assert_close("device context", rms_norm(norm, x), norm(x), torch.float32)
    assert calls == [norm_mod._rms_norm_kernel]


# -- KernelRMSNorm: a model's RMSNorm module swapped for one that launches the kernel (patch_model(norms=True)) --

def _transformers_norm(width):
    """transformers' ``DeepseekV3RMSNorm`` (the class ``patch_model(norms=True)`` meets), or this package's twin."""
    try:
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm
    except ImportError:
        return DeepseekRMSNorm(width)
    return DeepseekV3RMSNorm(width)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_kernel_rms_norm_stands_in_for_the_module(dtype, device, monkeypatch):
    """``KernelRMSNorm.adopt`` holds the original's weight Parameter itself (same object: the state dict keeps its key
    and tensor) and its epsilon; its call is one launch of the kernel with the module's result (within the bound of
    its dtype: one rounding apart at most); ``restore`` gives back the original, holding the weight Parameter the
    stand-in holds then (one replaced while patched stays replaced)."""
    original = _transformers_norm(64).to(device, dtype)
    with torch.no_grad():
        original.weight.copy_(torch.randn(64, generator=torch.Generator().manual_seed(4)) + 1)
    original.variance_epsilon = 1e-5
    assert KernelRMSNorm.can_adopt(original)
    new = KernelRMSNorm.adopt(original)
    assert new.weight is original.weight and new.variance_epsilon == 1e-5 and new.training == original.training
    assert list(new.state_dict()) == list(original.state_dict()) == ["weight"]
    assert list(new.children()) == []  # the original is not a submodule (its weight would count twice)
    x = (torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(5)) * 3).to(device, dtype)
    calls = []
    launch = norm_mod._launcher.launch
    monkeypatch.setattr(norm_mod._launcher, "launch", lambda *a, **k: (calls.append(a[0]), launch(*a, **k))[1])
    with torch.no_grad():
        got, expected = new(x), original(x)
    assert calls == [norm_mod._rms_norm_kernel]
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert_close("KernelRMSNorm", got, formula(original, x), dtype)
    assert_close("module", expected, formula(original, x), dtype)
    replaced = nn.Parameter(torch.ones(64, device=device, dtype=dtype))
    new.weight = replaced
    assert new.restore() is original and original.weight is replaced


def test_kernel_rms_norm_built_directly_is_a_norm_of_its_own(device, monkeypatch):
    """``KernelRMSNorm(width, eps)`` in a model of one's own: DeepseekRMSNorm's parameters and state dict, one launch
    a call, the formula's result; nothing for unpatch_model to restore (no original)."""
    calls = []
    launch = norm_mod._launcher.launch
    monkeypatch.setattr(norm_mod._launcher, "launch", lambda *a, **k: (calls.append(a[0]), launch(*a, **k))[1])
    norm = make_norm(96, torch.bfloat16, device, eps=1e-5, cls=KernelRMSNorm)
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(6)).to(device, torch.bfloat16)
    with torch.no_grad():
        got = norm(x)
    assert calls == [norm_mod._rms_norm_kernel] and list(norm.state_dict()) == ["weight"]
    assert_close("built directly", got, formula(norm, x), torch.bfloat16)
    assert norm.restorable() is not None


def test_kernel_rms_norm_keeps_the_mode_and_the_originals_attributes():
    """``train()``/``eval()`` on the stand-in reach the original once restored; an attribute a subclass adds is
    carried both ways."""
    original = DeepseekRMSNorm(16)
    original.extra = "kept"
    new = KernelRMSNorm.adopt(original)
    assert new.extra == "kept"
    new.eval()
    new.extra = "changed"
    restored = new.restore()
    assert restored is original and not original.training and original.extra == "changed"
    assert "original" not in vars(original)


class BufferNorm(DeepseekRMSNorm):
    """The formula, but a buffer beside the weight."""

    def __init__(self, width):
        super().__init__(width)
        self.register_buffer("scale", torch.ones(1))


def _parametrized(norm):
    from torch.nn.utils import parametrize

    class Same(nn.Module):
        def forward(self, w):
            return w

    parametrize.register_parametrization(norm, "weight", Same())
    return norm


def _with_state_dict_hook(norm):
    norm._register_state_dict_hook(lambda module, state, prefix, local: state)
    return norm


@pytest.mark.parametrize("make", [
    lambda n: GemmaStyleNorm(16), lambda n: OwnCallImplNorm(16), _with_hook("pre"), _with_hook("post"),
    _with_hook("instance-forward"), _compiled, lambda n: BufferNorm(16), _parametrized, _with_state_dict_hook,
    lambda n: KernelRMSNorm.adopt(n), lambda n: nn.LayerNorm(16), _instance_call_impl, lambda n: ClassEpsNorm(16)],
    ids=["other-formula", "own-call-impl", "pre-hook", "post-hook", "instance-forward", "module-compile", "buffer",
         "parametrized", "state-dict-hook", "already-adopted", "layer-norm", "instance-call-impl", "class-epsilon"])
def test_kernel_rms_norm_adopts_only_the_plain_formula(make):
    """A module whose call computes more than the formula with its weight (another formula, a call of its own, a
    hook of its own a swapped-in module would drop, a buffer, a parametrized weight, a state-dict hook; an epsilon
    its class holds, which the stand-in, taking the instance's attributes, would lack: its forward raised) is not
    adopted; the plain formula, in this package's class or transformers', is."""
    assert KernelRMSNorm.can_adopt(DeepseekRMSNorm(16)) and KernelRMSNorm.can_adopt(_transformers_norm(16))
    assert not KernelRMSNorm.can_adopt(make(DeepseekRMSNorm(16)))


def test_kernel_rms_norm_runs_the_formula_under_autograd_and_compile(device, monkeypatch):
    """Where ``rms_norm`` would call the module (autograd recording, compiling, a tensor of a subclass, a float64 x),
    the stand-in runs the module's formula itself: the same result, the gradient reaching the shared weight."""
    launches = record_launches(monkeypatch, norm_mod, "_rms_norm_kernel")
    original = make_norm(32, torch.float32, device)
    new = KernelRMSNorm.adopt(original)
    x = torch.randn(4, 32, device=device)
    got = new(x)
    assert got.requires_grad and torch.equal(got, original(x))
    got.sum().backward()
    assert original.weight.grad is not None and torch.equal(original.weight.grad, new.weight.grad)
    with torch.no_grad():
        assert torch.equal(new(x.double()), original(x.double()))
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert torch.equal(new(x), original(x))
    assert not launches


@pytest.mark.parametrize("run", INTERCEPTING_RUNS, ids=[run.__name__.strip("_") for run in INTERCEPTING_RUNS])
def test_kernel_rms_norm_runs_the_formula_where_its_ops_run_through_something_else(run, device):
    """As ``rms_norm``: transforms, tracing and modes get the formula's ops, not the kernel."""
    original = make_norm(32, torch.float32, device).requires_grad_(False)
    new = KernelRMSNorm.adopt(original)
    x, t = torch.randn(4, 32, device=device), torch.randn(4, 32, device=device)
    assert_close("stand-in", run(new, x, t), run(original, x, t), torch.float32)
