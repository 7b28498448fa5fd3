"""The prefill path choice's time model (mla_kernels._prefill_cost) against the timings recorded on an H100, its
constants (defaults, config file, override), its launch counts against the code, and the calibration fit."""

import json
import math
import types
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mla_kernels
from mla_kernels import _prefill_cost as cost
from mla_kernels import _tuning, prefill
from helpers import assert_close

WIDTHS = dict(d_latent=512, d_rope=64, d_nope=128, d_v=128)
H100_FILE = _tuning.CONFIG_DIR / "nvidia-h100-80gb-hbm3.json"
# The estimates may be off by this factor from a recorded time: one achieved rate per kernel ignores wave
# quantisation and tile occupancy, and the records themselves spread: the same path, timed twice in one run,
# took 0.69 and 0.77 ms (12%), and "about 16 TFLOP/s" is rounded. Fitted, the worst record is 8% off.
ESTIMATE_FACTOR = 1.25
CHOICE_SLACK = 1.10  # issue 11's target: auto within 10% of the faster path


def lens(case):
    return [n + h for n, h in zip(case["new"], case["history"])]


def recorded_ms(case, path):
    return sum(case["ms"][path]) / len(case["ms"][path])


def file_constants():
    return {k: v for k, v in json.loads(H100_FILE.read_text())["constants"].items() if k in cost.NAMES}


@pytest.mark.parametrize("source", ["defaults", "h100-file"])
@pytest.mark.parametrize("case", cost.H100_RECORDED, ids=[c["name"] for c in cost.H100_RECORDED])
def test_choice_is_the_faster_recorded_path(case, source):
    """For every recorded case the model's choice for the code that was timed (its launch counts) is a path whose
    recorded time is within 10% of the faster one's (the seed case and 8 x 128 over 4096 are the two the FLOP-only
    model got wrong: 0.69 vs 0.50 ms, 22.9 vs 3.61 ms). Today's code is another program: what the model picks for
    it is a prediction until a GPU times it."""
    consts = None if source == "defaults" else file_constants()
    chosen = cost.choose(cost.estimate(case["new"], lens(case), case["heads"], **WIDTHS, constants=consts,
                                       launches=case["launches"]))
    best = min(recorded_ms(case, p) for p in cost.PATHS)
    assert recorded_ms(case, chosen) <= CHOICE_SLACK * best, (case["name"], chosen, case["ms"])


@pytest.mark.parametrize("case", cost.H100_RECORDED, ids=[c["name"] for c in cost.H100_RECORDED])
def test_estimates_within_factor_of_recorded_times(case):
    """The model of the code that was timed (its launch counts, ``cost.D07C6FE_LAUNCHES``) against its times."""
    assert case["launches"] == cost.D07C6FE_LAUNCHES
    est = cost.estimate(case["new"], lens(case), case["heads"], **WIDTHS, launches=case["launches"])
    for path in cost.PATHS:
        for ms in case["ms"][path]:
            ratio = est[path] * 1e3 / ms
            assert 1 / ESTIMATE_FACTOR <= ratio <= ESTIMATE_FACTOR, (case["name"], path, est[path] * 1e3, ms)


def test_defaults_are_the_fit_of_the_records_and_the_h100_file_holds_them():
    fitted = cost.fit(cost.h100_records())
    for name in cost.NAMES:
        assert fitted[name] == pytest.approx(cost.DEFAULTS[name], rel=0.05), name
    assert file_constants() == cost.DEFAULTS
    assert "prefill_source" in json.loads(H100_FILE.read_text())["constants"]
    # the old key's meaning is kept: the absorbed attention rate over the expanded one
    assert prefill.ABSORBED_RELATIVE_SPEED == pytest.approx(52 / 380)


def _pretend_gpu_visible(monkeypatch):
    """Tests that replace the config-file lookup name cuda:0 for a GPU; the check that torch sees it is skipped
    (test_device_past_the_visible_gpus covers it)."""
    monkeypatch.setattr(cost, "_check_visible", lambda device: None)


def test_file_constants_reach_the_choice(monkeypatch):
    """A GPU's config file (read through _tuning.constant) decides; the CPU and unknown names get the defaults."""
    gpu = torch.device("cuda", 0)  # never touched: _tuning.constant is replaced
    case = ([128] * 8, [4224] * 8, 128)  # recorded: absorbed 22.9 ms, expanded 3.61 ms
    table = {}
    monkeypatch.setattr(_tuning, "constant", lambda name, device: table.get(name) if device.type == "cuda" else None)
    _pretend_gpu_visible(monkeypatch)
    assert prefill.choose_prefill_path(*case, **WIDTHS, device=gpu) == "expanded"  # no file constants: defaults
    table.update(prefill_absorbed_tflops=5000.0)  # a GPU whose absorbed kernel is 100x faster
    assert prefill.choose_prefill_path(*case, **WIDTHS, device=gpu) == "absorbed"
    assert prefill.choose_prefill_path(*case, **WIDTHS, device=torch.device("cpu")) == "expanded"
    # the old key alone: absorbed rate = ratio x expanded rate
    table.clear()
    table.update(absorbed_relative_speed=20.0)
    assert prefill.choose_prefill_path(*case, **WIDTHS, device=gpu) == "absorbed"
    assert cost.device_constants(gpu)["prefill_absorbed_tflops"] == 20.0 * cost.DEFAULTS["prefill_expanded_tflops"]
    # launch cost from the file: 0.1 s per launch, LAUNCHES of them in each path's estimate (an override wins)
    table.clear()
    table.update(prefill_launch_us=100_000.0)
    slow = prefill.prefill_times([4096] * 8, [4096] * 8, 128, **WIDTHS, device=gpu)
    free = prefill.prefill_times([4096] * 8, [4096] * 8, 128, **WIDTHS, device=gpu, constants={"prefill_launch_us": 0.0})
    for path in cost.PATHS:
        assert slow[path] - free[path] == pytest.approx(cost.LAUNCHES[path] * 0.1, rel=1e-9), path
    # bad values in a file are ignored (defaults), a bad override is refused
    table.clear()
    table.update(prefill_expanded_tflops="fast", prefill_gemm_tflops=-1.0)
    assert cost.device_constants(gpu) == cost.DEFAULTS
    with pytest.raises(ValueError, match="relative_speed"):
        prefill.choose_prefill_path(*case, **WIDTHS, relative_speed=0.0)


def test_expanded_tiles_are_looked_up_for_the_call_widths(monkeypatch):
    """The model pads the expanded kernel's rows to the BLOCK_M that kernel will run: the tuned config of the
    call's own shape class (D_nope, D_v), as _launch_expanded looks it up, not DeepSeek's 128/128 class."""
    gpu = torch.device("cuda", 0)  # never touched: _tuning is replaced
    monkeypatch.setattr(_tuning, "constant", lambda name, device: None)
    _pretend_gpu_visible(monkeypatch)
    asked = []

    def lookup(kernel, shape_class, device, tune=True):
        asked.append((kernel, shape_class, tune))
        return dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=2) if shape_class.startswith("N64/V32/") else None

    monkeypatch.setattr(_tuning, "lookup", lookup)
    widths = dict(WIDTHS, d_nope=64, d_v=32)
    got = prefill.prefill_times([20], [20], 16, **widths, device=gpu)
    # tune=False: a question, never an on-demand sweep of a class the call may not launch (MLA_KERNELS_AUTOTUNE=1
    # tuned the expanded class of every auto prefill that then ran absorbed)
    assert asked == [("expanded", _tuning.expanded_class(20, 64, 32), False)]
    assert got == cost.estimate([20], [20], 16, **widths, block_m=16)


def test_relative_speed_override():
    """relative_speed sets the absorbed attention kernel's rate as a fraction of the expanded one's."""
    case = ([128] * 8, [4224] * 8, 128)
    assert prefill.choose_prefill_path(*case, **WIDTHS) == "expanded"
    assert prefill.choose_prefill_path(*case, **WIDTHS, relative_speed=2.0) == "absorbed"
    t1 = prefill.prefill_times(*case, **WIDTHS, relative_speed=1.0)
    t2 = prefill.prefill_times(*case, **WIDTHS, relative_speed=2.0)
    assert t2["expanded"] == t1["expanded"] and t2["absorbed"] < t1["absorbed"]


@pytest.mark.parametrize("heads", [16, 128])
def test_boundaries(heads):
    """No history: prompts take the expanded path, tiny ones too (both paths launch 3 times, and without history
    the expanded path does fewer FLOPs). One short segment over a long history: absorbed. Unsupported widths:
    absorbed."""
    for n in (2048, 4096, 16384):  # one prompt at 16 heads: ~1000 tokens pay for the 13 extra launches
        assert prefill.choose_prefill_path([n], [n], heads, **WIDTHS) == "expanded", n
    for n in (512, 1024, 4096, 16384):
        assert prefill.choose_prefill_path([n] * 8, [n] * 8, heads, **WIDTHS) == "expanded", n
    for history in (4096, 32768, 131072):
        for n in (1, 4, 8):
            assert prefill.choose_prefill_path([n], [history + n], heads, **WIDTHS) == "absorbed", (n, history)
    assert prefill.choose_prefill_path([16, 3], [16, 3], heads, **WIDTHS) == "expanded"
    assert prefill.choose_prefill_path([4096], [4096], heads, **dict(WIDTHS, d_nope=96)) == "absorbed"
    assert prefill.choose_prefill_path([], [], heads, **WIDTHS) in cost.PATHS  # empty batch: no error


BAD_COST_INPUT = {
    "lists-of-two-lengths": (([4, 4], [8]), {}, ValueError, "new_lens and cache_lens"),
    "new-negative": (([-5], [10]), {}, ValueError, "new_lens"),
    "cache-below-new": (([500], [10]), {}, ValueError, "cache_lens"),
    "new-float": (([2.5], [10]), {}, TypeError, "new_lens"),
    "cache-none": (([4], None), {}, TypeError, "cache_lens"),
    "heads-zero": (([4], [8]), dict(heads=0), ValueError, "heads"),
    "d_v-negative": (([4], [8]), dict(d_v=-128), ValueError, "d_v"),
    "constant-zero-rate": (([4], [8]), dict(constants={"prefill_gemm_tflops": 0.0}), ValueError, "prefill_gemm"),
    "constant-negative": (([4], [8]), dict(constants={"prefill_expanded_tflops": -1.0}), ValueError, "prefill_exp"),
    "constant-nan": (([4], [8]), dict(constants={"prefill_call_us": float("nan")}), ValueError, "prefill_call"),
    "constant-unknown": (([4], [8]), dict(constants={"absorbed_relative_speed": 2.0}), ValueError, "constants"),
    "constants-empty-list": (([4], [8]), dict(constants=[]), TypeError, "constants"),  # `if constants:` skipped it
    "constants-zero": (([4], [8]), dict(constants=0), TypeError, "constants"),
    "relative-speed-inf": (([4], [8]), dict(relative_speed=float("inf")), ValueError, "relative_speed"),
    # ints too large for a float: math.isfinite raised OverflowError, naming nothing
    "relative-speed-huge-int": (([4], [8]), dict(relative_speed=10 ** 400), ValueError, "relative_speed"),
    "constant-huge-int": (([4], [8]), dict(constants={"prefill_gemm_tflops": 10 ** 400}), ValueError,
                          "prefill_gemm"),
    "relative-speed-bool": (([4], [8]), dict(relative_speed=True), TypeError, "relative_speed"),
    "relative-speed-str": (([4], [8]), dict(relative_speed="2"), TypeError, "relative_speed"),
    "new-bool": (([True], [10]), {}, TypeError, "new_lens"),
    "causal-none": (([4], [8]), dict(causal=None), TypeError, "causal"),
    "causal-string": (([4], [8]), dict(causal="no"), TypeError, "causal"),
    "device-unknown": (([4], [8]), dict(device="gpu0"), ValueError, "device"),
}
if not torch.cuda.is_available():  # "cuda" on a CPU-only torch: its lookup failed an assert inside torch
    BAD_COST_INPUT["device-cuda-without-gpu"] = (([4], [8]), dict(device="cuda"), ValueError, "device")


def test_device_past_the_visible_gpus(monkeypatch):
    """A GPU index past those torch sees is refused naming the device: before, the failed lookup of its config
    file was swallowed and the defaults answered, a choice made for no GPU. Faked: one visible GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"device cuda:3 .*1 visible"):
        prefill.choose_prefill_path([4], [8], heads=16, device="cuda:3", **WIDTHS)


@pytest.mark.parametrize("fn", ["choose_prefill_path", "prefill_times"])
@pytest.mark.parametrize("case", list(BAD_COST_INPUT), ids=list(BAD_COST_INPUT))
def test_bad_cost_input(case, fn):
    """Nonsense batches and constants raise naming the argument: before, unequal lists were cut to the shorter
    (zip), negative lengths gave a choice, and a zero rate divided by zero."""
    (new, cache_lens), change, error, name = BAD_COST_INPUT[case]
    kw = dict(dict(WIDTHS, heads=16), **change)
    with pytest.raises(error, match=name):
        getattr(prefill, fn)(new, cache_lens, **kw)


def test_cost_input_forms():
    """Lengths as any iterable of ints (a generator, a tensor, numpy ints) and the device by name: the same
    estimate as plain lists; zero host costs are allowed (the FLOP-only comparison)."""
    import numpy as np

    case = ([128] * 8, [4224] * 8)
    expected = prefill.prefill_times(*case, 128, **WIDTHS)
    assert prefill.prefill_times((n for n in case[0]), iter(case[1]), 128, **WIDTHS) == expected
    assert prefill.prefill_times(torch.tensor(case[0]), np.array(case[1]), 128, **WIDTHS) == expected
    assert (prefill.prefill_times(*case, 128, **WIDTHS, relative_speed=np.float32(2.0))  # a ValueError before
            == prefill.prefill_times(*case, 128, **WIDTHS, relative_speed=2.0))
    assert prefill.prefill_times(*case, 128, **WIDTHS, device="cpu") == expected
    assert prefill.choose_prefill_path(*case, 128, **WIDTHS, device="cpu") == "expanded"
    assert prefill.choose_prefill_path(*case, 128, **WIDTHS, constants=dict(prefill_call_us=0, prefill_launch_us=0.0))


def test_time_model_terms_by_hand():
    """One sequence of 100 new tokens over 28 history, 2 heads: every term of both paths."""
    w = cost.work([100], [128], 2, **WIDTHS, block_m=64)
    pairs = 100 * 28 + 100 * 101 // 2
    exec_pairs = 64 * (28 + 64) + 64 * 128  # two 64-row blocks, keys up to each block's last row
    a = {k[0]: k[1:] for k in w["absorbed"]["kernels"]}
    e = {k[0]: k[1:] for k in w["expanded"]["kernels"]}
    assert a["attention"][0] == 2 * 2 * pairs * (2 * 512 + 64)
    assert a["absorb_q"][0] == a["project_v"][0] == 2 * 100 * 2 * 128 * 512
    assert e["attention"][0] == 2 * 2 * exec_pairs * (128 + 64 + 128)
    assert e["expand"][0] == 2 * 128 * 2 * 512 * 256 and e["expand"][1] == 2 * (128 * 512 + 2 * 256 * 512 + 128 * 512)
    assert e["gather"] == (0, 128 * (4 * 512 + 64), None)
    consts = dict(cost.DEFAULTS, prefill_call_us=100.0, prefill_launch_us=10.0)
    t = cost.path_time(w["expanded"], consts)
    by_hand = (100 + 3 * 10) * 1e-6 + e["gather"][1] / 3e12 + max(e["expand"][0] / 620e12, e["expand"][1] / 3e12) \
        + max(e["attention"][0] / 380e12, e["attention"][1] / 3e12)
    assert t == pytest.approx(by_hand, rel=1e-12)


def test_time_model_terms_by_hand_full_attention_unequal_widths():
    """Every kernel of both paths, FLOPs and bytes, by hand for full (non-causal) attention with D_nope != D_v: 2
    sequences (10 new over 30 history, 3 over 3), 4 heads, R 64, P 16, D_nope 32, D_v 16, 8-row expanded blocks."""
    r, p, dn, dv, h, bm = 64, 16, 32, 16, 4, 8
    w = cost.work([10, 3], [40, 3], h, r, p, dn, dv, causal=False, block_m=bm)
    tokens, keys = 13, 43
    pairs = 10 * 40 + 3 * 3  # every row sees its whole sequence
    exec_pairs = bm * (2 * 40 + 1 * 3)  # row blocks (2 and 1) x all keys
    assert w["absorbed"]["kernels"] == [
        ("absorb_q", 2 * tokens * h * dn * r, 2 * (tokens * h * dn + h * dn * r + tokens * h * r), "gemm"),
        ("attention", 2 * h * pairs * (2 * r + p), 2 * (keys * (r + p) + tokens * h * (2 * r + p)), "absorbed"),
        ("project_v", 2 * tokens * h * r * dv, 2 * (tokens * h * r + h * r * dv + tokens * h * dv), "gemm")]
    assert w["expanded"]["kernels"] == [
        ("gather", 0, keys * (4 * r + 64), None),
        ("expand", 2 * keys * h * r * (dn + dv), 2 * (keys * r + h * (dn + dv) * r + keys * h * (dn + dv)), "gemm"),
        ("attention", 2 * h * exec_pairs * (dn + p + dv),
         2 * (keys * (h * (dn + dv) + p) + tokens * h * (dn + p + dv)), "expanded")]
    assert {path: w[path]["launches"] for path in cost.PATHS} == cost.LAUNCHES
    causal = cost.work([10, 3], [40, 3], h, r, p, dn, dv, causal=True, block_m=bm)
    assert causal["absorbed"]["kernels"][1][1] == 2 * h * (10 * 30 + 55 + 6) * (2 * r + p)


def test_expanded_block_m_is_the_kernels_heuristic():
    """The model pads rows to the BLOCK_M the expanded kernel's heuristic picks, on both sides of its boundary."""
    for n in (0, 1, 63, 64, 65, 1024, 4096):
        assert cost.expanded_block_m(n) == prefill._expanded_heuristic(n)["BLOCK_M"], n


def test_choose_ties_go_to_expanded():
    assert cost.choose({"absorbed": 1.0, "expanded": 1.0}) == "expanded"
    assert cost.choose({"absorbed": 1.0, "expanded": 1.0 + 1e-9}) == "absorbed"


def test_device_constants_precedence(monkeypatch):
    """A file's absorbed rate beats its old ratio key; a caller's relative_speed beats both; values that are no
    number > 0 (a bool too) leave the default."""
    gpu = torch.device("cuda", 0)  # never touched: _tuning.constant is replaced
    table = dict(prefill_absorbed_tflops=100.0, prefill_expanded_tflops=400.0, absorbed_relative_speed=3.0,
                 prefill_call_us=True)
    monkeypatch.setattr(_tuning, "constant", lambda name, device: table.get(name))
    _pretend_gpu_visible(monkeypatch)
    consts = cost.device_constants(gpu)
    assert consts["prefill_absorbed_tflops"] == 100.0 and consts["prefill_expanded_tflops"] == 400.0
    assert consts["prefill_call_us"] == cost.DEFAULTS["prefill_call_us"]
    assert cost.device_constants(gpu, relative_speed=0.5)["prefill_absorbed_tflops"] == 200.0
    del table["prefill_absorbed_tflops"]
    assert cost.device_constants(gpu)["prefill_absorbed_tflops"] == 1200.0
    assert cost.device_constants(gpu, relative_speed=0.5)["prefill_absorbed_tflops"] == 200.0


# ------------------------------------------------------------------------------------------------
# launch counts: the model's LAUNCHES against what the code runs
# ------------------------------------------------------------------------------------------------

# aten ops that launch nothing on a GPU: views, metadata, allocations
NO_LAUNCH = {"view", "_unsafe_view", "transpose", "t", "slice", "select", "expand", "as_strided", "detach", "alias",
             "unsqueeze", "squeeze", "permute", "split", "unbind", "empty", "empty_strided", "new_empty",
             "empty_like", "_reshape_alias", "reshape", "lift_fresh", "split_with_sizes", "narrow",
             "resolve_conj", "resolve_neg"}


class LaunchCounter(TorchDispatchMode):
    """Records aten ops while ``active``; views and allocations are dropped by ``launches``."""

    def __init__(self):
        super().__init__()
        self.ops, self.active = [], True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.active:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    def launches(self):
        return [op for op in self.ops if op not in NO_LAUNCH]


def count_path_launches(monkeypatch, path, a, host_lengths=False):
    """Launches of one call down ``path``: PyTorch ops and Triton kernels. Not counted: what the CPU alone runs,
    the read of the lengths to the host (``_read_lengths``, the model's ``call`` term on a GPU, skipped there when
    the host lengths are given) and the block-id check (``_check_lengths_cpu``); inside a Triton kernel, the
    interpreter's own tensor copies (the kernel counts as one launch)."""
    counter = LaunchCounter()
    kernels = []

    def paused(fn, label=None):
        def run(*args, **kw):
            if label:
                kernels.append(label)
            counter.active = False
            try:
                return fn(*args, **kw)
            finally:
                counter.active = True
        return run

    for name in ("_read_lengths", "_check_lengths_cpu"):
        monkeypatch.setattr(prefill, name, paused(getattr(prefill, name)))
    # every kernel launch of the library goes through _launcher.launch (whatever Triton's launch does inside)
    launch = mla_kernels._launcher.launch
    monkeypatch.setattr(mla_kernels._launcher, "launch",
                        lambda kernel, grid, *args, **kw: paused(launch, kernel.__name__)(kernel, grid, *args, **kw))
    host = dict(cu_seqlens_q_host=a["cu_seqlens_q"].tolist(), cache_seqlens_host=a["cache_seqlens"].tolist())
    with counter:
        mla_kernels.mla_prefill_attention(**a, softmax_scale=0.1, path=path, **(host if host_lengths else {}))
    return counter.launches(), kernels


@pytest.mark.parametrize("host_lengths", [False, True], ids=["lengths-read", "host-lengths"])
@pytest.mark.parametrize("path", cost.PATHS)
def test_launch_counts_match_the_model(path, host_lengths, monkeypatch, device):
    """A seed-shaped batch (4 sequences, one without history, one with both) of tiny sizes: the launches are the
    model's LAUNCHES, with or without the host lengths, and do not grow with the batch."""
    if not mla_kernels._utils.interpreting() and device.type == "cpu":
        pytest.skip("counts the Triton path: needs the interpreter or a GPU")
    from test_prefill import D_NOPE, make_inputs

    a = make_inputs([4, 3, 2, 5], [7, 0, 0, 6], 2, 4, torch.bfloat16, device, d_nope=D_NOPE)
    ops, kernels = count_path_launches(monkeypatch, path, a, host_lengths)
    expected_kernels = ["_mla_attn_kernel"] if path == "absorbed" else ["_gather_latent_kernel", "_mla_expanded_kernel"]
    assert kernels == expected_kernels  # one split: no combine
    assert len(ops) + len(kernels) == cost.LAUNCHES[path], ops
    # the count does not grow with the batch: no per-sequence launches
    b = make_inputs([4, 3, 2, 5] * 3, [7, 0, 0, 6] * 3, 2, 4, torch.bfloat16, device, d_nope=D_NOPE)
    assert count_path_launches(monkeypatch, path, b, host_lengths)[0] == ops


# ------------------------------------------------------------------------------------------------
# calibration fit
# ------------------------------------------------------------------------------------------------


def model_sweep(consts):
    """``(heads, history, n, new, cache_lens, estimate)`` for each case of a bench.prefill-like quick sweep (8
    sequences of n new tokens over 0 or 4096 of history, two head counts), timed by the model under ``consts``."""
    for heads in (16, 128):
        for history in (0, 4096):
            for n in (16, 128, 512, 2048):
                new, cache_lens = [n] * 8, [n + history] * 8
                yield heads, history, n, new, cache_lens, cost.estimate(new, cache_lens, heads, **WIDTHS,
                                                                         constants=consts)


def synthetic_records(consts, launches=None):
    """Times the model gives under ``consts`` for a bench.prefill-like sweep (both paths, two head counts), for code
    making ``launches`` per path (default today's, and then the records do not say)."""
    out = []
    for heads, _, _, new, cache_lens, _ in model_sweep(consts):
        est = cost.estimate(new, cache_lens, heads, **WIDTHS, constants=consts, launches=launches)
        for path in cost.PATHS:
            rec = dict(new=new, cache_lens=cache_lens, heads=heads, path=path, ms=est[path] * 1e3, **WIDTHS)
            if launches is not None:
                rec["launches"] = launches[path]
            out.append(rec)
    return out


def host_sum(consts, launches=3):
    """What timings of code making ``launches`` launches per path show of the host terms: call + launches x launch."""
    return consts["prefill_call_us"] + launches * consts["prefill_launch_us"]


def test_fit_recovers_known_constants():
    """Records of today's code (3 launches on both paths) recover the rates and call + 3 x launch; the launch cost
    alone is not in them, so it keeps its start value (test below: records that differ in launches recover it)."""
    assert cost.LAUNCHES == {"absorbed": 3, "expanded": 3}
    truth = dict(cost.DEFAULTS, prefill_call_us=120.0, prefill_launch_us=9.0, prefill_absorbed_tflops=210.0,
                 prefill_expanded_tflops=450.0, prefill_gemm_tflops=550.0)
    fitted = cost.fit(synthetic_records(truth))
    for name in ("prefill_absorbed_tflops", "prefill_expanded_tflops", "prefill_gemm_tflops"):
        assert fitted[name] == pytest.approx(truth[name], rel=0.03), name
    assert host_sum(fitted) == pytest.approx(host_sum(truth), rel=0.03)
    assert fitted["prefill_launch_us"] == cost.DEFAULTS["prefill_launch_us"]
    assert fitted["prefill_bandwidth_gbps"] == cost.DEFAULTS["prefill_bandwidth_gbps"]  # fixed by default


def test_fit_models_each_record_with_its_own_launch_counts():
    """Records of code that launched more (as the H100 records' expanded path did) fit the same constants when
    they say so; read with other launch counts, the same times move the fitted launch cost."""
    truth = dict(cost.DEFAULTS, prefill_launch_us=9.0, prefill_call_us=120.0)
    old_code = {"absorbed": 3, "expanded": 16}
    records = synthetic_records(truth, old_code)
    fitted = cost.fit(records)
    for name in cost.NAMES:
        assert fitted[name] == pytest.approx(truth[name], rel=0.03), name
    misread = cost.fit([dict(r, launches=3) for r in records])  # as if the expanded path had launched 3
    assert any(misread[name] != pytest.approx(truth[name], rel=0.03) for name in cost.NAMES), misread
    assert all(r["launches"] == cost.D07C6FE_LAUNCHES[r["path"]] for r in cost.h100_records())


def test_fit_reproduces_exact_records_and_reads_each_records_shape():
    """Records the model itself timed are fitted to within 0.5% each (the descent stops on no improvement, not on a
    coarse one); a record's causal flag and block_m are the ones its time is modelled with; a fixed constant keeps
    the start value given, not the default."""
    truth = dict(cost.DEFAULTS, prefill_call_us=120.0, prefill_absorbed_tflops=210.0, prefill_expanded_tflops=450.0,
                 prefill_gemm_tflops=550.0)
    records = synthetic_records(truth)
    fitted = cost.fit(records)
    for rec in records:
        w = cost.work(rec["new"], rec["cache_lens"], rec["heads"], **WIDTHS)[rec["path"]]
        assert cost.path_time(w, fitted) * 1e3 == pytest.approx(rec["ms"], rel=5e-3), rec
    full = []  # non-causal attention, the expanded kernel at 32-row blocks
    for heads, _, _, new, cache_lens, _ in model_sweep(truth):
        est = cost.estimate(new, cache_lens, heads, **WIDTHS, constants=truth, causal=False, block_m=32)
        full += [dict(new=new, cache_lens=cache_lens, heads=heads, path=path, ms=est[path] * 1e3, causal=False,
                      block_m=32, **WIDTHS) for path in cost.PATHS]
    fitted = cost.fit(full)
    for name in ("prefill_absorbed_tflops", "prefill_expanded_tflops", "prefill_gemm_tflops"):
        assert fitted[name] == pytest.approx(truth[name], rel=0.01), name
    slow_copy = cost.fit(records, start={"prefill_bandwidth_gbps": 2000.0})
    assert slow_copy["prefill_bandwidth_gbps"] == 2000.0


def test_fit_rejects_bad_records():
    rec = dict(new=[4], cache_lens=[8], heads=2, path="absorbed", ms=0.1, **WIDTHS)
    with pytest.raises(ValueError, match="at least one"):
        cost.fit([])
    with pytest.raises(ValueError, match="path"):
        cost.fit([dict(rec, path="auto")])
    with pytest.raises(ValueError, match="time"):
        cost.fit([dict(rec, ms=0.0)])
    with pytest.raises(ValueError, match="launches"):
        cost.fit([dict(rec, launches=-1)])
    assert math.isfinite(cost.fit([rec])["prefill_call_us"])


# ------------------------------------------------------------------------------------------------
# bench.prefill --calibrate plumbing, with injected timings (no GPU)
# ------------------------------------------------------------------------------------------------


def fake_run(truth):
    """A bench.prefill payload whose timings are the model's under ``truth``: quick-sweep rows of both paths and
    auto (auto = the path the shipped defaults pick), and the seed scenario."""
    bp = pytest.importorskip("bench.prefill")
    rows = []
    for heads, hist, n, new, cache_lens, est in model_sweep(truth):
        auto = prefill.choose_prefill_path(new, cache_lens, heads, **WIDTHS)
        flops = bp.path_flops(bp.MLAShape(heads=heads), new, [hist] * 8)
        for prov, ms in (("absorbed", est["absorbed"]), ("expanded", est["expanded"]), ("auto", est[auto])):
            rows.append(dict(provider=prov, B=8, new=n, hist=hist, H=heads, p50_ms=ms * 1e3,
                             path_flops=flops[auto if prov == "auto" else prov],
                             **({"note": f"chose {auto}"} if prov == "auto" else {})))
    seed = cost.H100_RECORDED[0]
    est = cost.estimate(seed["new"], lens(seed), 16, **WIDTHS, constants=truth)
    payload = {"sweep": rows, "seed_003_prefill": {
        "new": seed["new"], "history": seed["history"], "shape": {"heads": 16, **WIDTHS}, "auto_chooses": "absorbed",
        "providers": {"naive": {"mean_ms": 9.0}, "absorbed": {"mean_ms": est["absorbed"] * 1e3},
                      "expanded": {"mean_ms": est["expanded"] * 1e3}, "auto": {"mean_ms": est["absorbed"] * 1e3}}}}
    payload["crossover"] = bp.crossover(rows)
    payload["config"] = {"launches": dict(cost.LAUNCHES)}  # as bench.prefill records the code that ran
    return bp, payload


def test_calibrate_fits_reports_and_writes_the_config_file(tmp_path, monkeypatch):
    # a GPU whose absorbed kernel runs 4x the recorded rate (decode's new tiles), with cheaper launches
    truth = dict(cost.DEFAULTS, prefill_launch_us=12.0, prefill_absorbed_tflops=210.0, prefill_call_us=150.0)
    bp, payload = fake_run(truth)
    records = bp.calibration_records(payload)
    assert len(records) == 2 * 16 + 3 and {r["path"] for r in records} == set(cost.PATHS)
    assert all(r["launches"] == cost.LAUNCHES[r["path"]] for r in records)
    res = bp.calibrate(records, bandwidth_gbps=3000.0)
    for name in ("prefill_absorbed_tflops", "prefill_expanded_tflops", "prefill_gemm_tflops", "prefill_bandwidth_gbps"):
        assert res["constants"][name] == pytest.approx(truth[name], rel=0.03), name
    # both paths launch 3 times: the run shows call + 3 x launch; the launch cost keeps the records' fit
    assert host_sum(res["constants"]) == pytest.approx(host_sum(truth), rel=0.03)
    assert res["constants"]["prefill_launch_us"] == cost.DEFAULTS["prefill_launch_us"]
    assert res["worst_model_factor"] < 1.02
    assert len(res["choices"]) == 17 and res["worst_choice_over_faster"] < 1.02
    # the sweep report: auto (the shipped defaults) against the faster path, per case, and the crossovers
    per_case = payload["crossover"]["per_case"]
    assert len(per_case) == 16 and all(c["auto_over_faster"] >= 1.0 for c in per_case)
    assert payload["crossover"]["auto_regret_max"] == max(c["auto_over_faster"] for c in per_case) > 1.1
    crossings = bp.model_crossovers([(8, 4096, 128), (8, 0, 128)], res["constants"])
    assert [c["model_first_new_len_expanded"] for c in crossings] == [
        next(n for n in sorted({max(1, round(2 ** (k / 8))) for k in range(129)})
             if prefill.choose_prefill_path([n] * 8, [n + hist] * 8, 128, **WIDTHS, constants=truth) == "expanded")
        for hist in (4096, 0)]
    bp.print_calibration(res)

    # the write merges into an existing file: kernels kept, constants added, the old source kept
    import triton
    path = tmp_path / "gpu.json"
    _tuning.save_file(path, device="Test GPU", sm_count=8, source="autotune", vendor_key="cuda",
                      kernels={"decode": {"R512/rows<=16": {"BLOCK_M": 16}}}, constants={"other": 1.0})
    bp.write_calibration(path, res["constants"], device_name="Test GPU", sm_count=8, note="fake timings",
                         vendor_key="cuda")
    data = _tuning.load_data(path, "cuda", triton.__version__)
    assert data["kernels"] == {"decode": {"R512/rows<=16": {"BLOCK_M": 16}}}
    assert data["constants"]["other"] == 1.0 and data["constants"]["prefill_source"] == "fake timings"
    assert data["source"] == "autotune; prefill constants: fake timings"
    for name in cost.NAMES:
        assert data["constants"][name] == pytest.approx(res["constants"][name], rel=1e-3)
    # and the file's constants reach the choice: 8 x 32 over 4096 at 128 heads, expanded with the recorded
    # constants, absorbed on this GPU
    monkeypatch.setattr(_tuning, "constant", lambda name, device: data["constants"].get(name))
    _pretend_gpu_visible(monkeypatch)
    case = ([32] * 8, [4128] * 8, 128)
    assert prefill.choose_prefill_path(*case, **WIDTHS) == "expanded"
    expect = cost.choose(cost.estimate(*case, **WIDTHS, constants=truth))
    assert prefill.choose_prefill_path(*case, **WIDTHS, device=torch.device("cuda", 0)) == expect == "absorbed"


def test_a_calibration_is_written_only_where_it_checks_out(tmp_path, monkeypatch, fake_gpu):
    """bench.prefill --calibrate writes the fitted constants into the GPU's config file, which decides every later
    prefill's path there. A run cut by a time limit fits the rows timed so far (``calibrate_so_far``), and was
    written unchecked: a fit of a few rows leaves constants the rows do not pin (one went to 992 TFLOP/s). Written
    now only when it has a timing per fitted constant, positive rates under 1.5x the GPU's measured GEMM rate, and
    a choice no worse on the timed cases than the constants in use."""
    bp, payload = fake_run(dict(cost.DEFAULTS, prefill_absorbed_tflops=210.0, prefill_call_us=150.0))
    gpu = torch.device("cuda", 0)  # (the library's lookups believe fake_gpu's "Test GPU"; the rates are replaced)
    _pretend_gpu_visible(monkeypatch)
    monkeypatch.setattr(bp.h, "copy_bandwidth", lambda device: 3000.0)
    monkeypatch.setattr(bp.h, "matmul_rate", lambda device: 700.0)
    monkeypatch.setattr(bp.h, "device_name", lambda device: "Test GPU")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace(
        multi_processor_count=8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (Test GPU has no tuned file: the built-in tiles)
        cut = dict(payload, sweep=payload["sweep"][:3], seed_003_prefill=None)  # 2 timings of 1 case
        path = tmp_path / "cut.json"
        res = bp.run_calibration(cut, gpu, str(path), quick=True)
        assert not path.exists() and "written_to" not in res
        assert any("timings for 5 fitted constants" in p for p in res["not_written"]), res["not_written"]
        path = tmp_path / "full.json"
        res = bp.run_calibration(payload, gpu, str(path), quick=True)
        assert res["not_written"] == [] and res["written_to"] == str(path) and path.exists()
        assert res["current_worst_choice_over_faster"] >= res["worst_choice_over_faster"]

    # each rule on its own
    good = dict(constants=dict(res["constants"]), fit=res["fit"], worst_choice_over_faster=1.0,
                current_worst_choice_over_faster=1.2)
    assert bp.calibration_problems(good, 700.0) == []
    (problem,) = bp.calibration_problems(good, 300.0)  # the fitted GEMM rate, about 620, over 1.5 x 300
    assert "prefill_gemm_tflops" in problem and "prefill_absorbed_tflops" not in problem
    (problem,) = bp.calibration_problems(dict(good, worst_choice_over_faster=1.3), 700.0)
    assert "worse on the timed cases" in problem and "x1.3" in problem and "x1.2" in problem
    (problem,) = bp.calibration_problems(dict(good, worst_choice_over_faster=None), 700.0)
    assert "both paths" in problem
    (problem,) = bp.calibration_problems(dict(good, constants=dict(good["constants"], prefill_call_us=math.nan)))
    assert "prefill_call_us" in problem


def test_calibrate_refuses_the_cpu_and_one_path_runs():
    bp = pytest.importorskip("bench.prefill")
    with pytest.raises(SystemExit, match="run it on a GPU"):
        bp.main(["--calibrate", "--device", "cpu", "--skip-seed", "--skip-sweep"])
    _, payload = fake_run(cost.DEFAULTS)
    only_absorbed = [r for r in bp.calibration_records(payload) if r["path"] == "absorbed"]
    with pytest.raises(ValueError, match="both paths"):
        bp.calibrate(only_absorbed)


# ------------------------------------------------------------------------------------------------
# the expanded kernel skips the causal tiles above each row block's diagonal
# ------------------------------------------------------------------------------------------------


def test_expanded_kernel_never_reads_keys_past_a_row_block(device):
    """One sequence, 40 history + 200 new tokens, 128-row blocks: the first block's last row sits at position
    167, so keys from 168 on belong only to the second block. Poisoned with NaN (K_nope, V and the rope key), they
    must leave the first block's rows exact, which they would not if any tile past its diagonal were loaded
    (0 x NaN is NaN in P @ V); the second block's rows read them and turn NaN, so the poison is live."""
    from test_prefill import D_NOPE, make_inputs

    history, new, heads, page = 40, 200, 2, 64
    a = make_inputs([new], [history], heads, page, torch.bfloat16, device, d_nope=D_NOPE)
    block_m = prefill._expanded_config(new, torch.device(device))["BLOCK_M"]
    assert block_m == 128
    first_end = history + block_m  # keys the first row block may see: [0, 168)
    total = history + new
    cu_k = torch.tensor([0, total], dtype=torch.int64, device=device)
    latent = prefill._gather_latent_torch(a["kv_cache"], a["block_table"], a["cache_seqlens"], cu_k, total)
    k_nope, v = prefill._expand(latent, a["w_kv_b"], heads, D_NOPE)
    k_pe = prefill._gather_latent_torch(a["pe_cache"], a["block_table"], a["cache_seqlens"], cu_k, total)
    ref, _ = prefill._expanded_torch(a["q_nope"].float(), a["q_pe"].float(), k_nope, v, k_pe, [0, new], [0, total],
                                     0.1, True)  # fp32 from the same bf16 operands

    k_nope, v, pe_cache = k_nope.clone(), v.clone(), a["pe_cache"].clone()
    k_nope[first_end:] = float("nan")
    v[first_end:] = float("nan")
    for pos in range(first_end, total):
        pe_cache[a["block_table"][0, pos // page], pos % page] = float("nan")
    out, _ = prefill._launch_expanded(a["q_nope"], a["q_pe"], k_nope, v, pe_cache, a["block_table"],
                                      a["cu_seqlens_q"], cu_k, a["cache_seqlens"], 0.1, True, False,
                                      max_seqlen_q=new)
    first = slice(0, block_m)
    assert torch.isfinite(out[first]).all()
    assert_close("expanded first row block", out[first], ref[first].double(), torch.bfloat16)
    assert torch.isnan(out[block_m:]).any(dim=-1).all()


def test_calibrate_reports_each_record_as_the_fit_models_it():
    """``bench.prefill.calibrate`` fitted the H100 records with their own launch counts but reported each fit
    (``model_ms``, ``worst_model_factor``, what ``--calibrate`` prints and stores) with today's: the seed case's
    expanded path showed 0.397 ms against 0.69/0.77 measured, a worst factor of 1.94 for a fit whose every record
    is within ``ESTIMATE_FACTOR``."""
    from bench import prefill as bench_prefill

    records = cost.h100_records()
    for rec in records:
        rec["block_m"] = cost.expanded_block_m(max(rec["new"]))
    res = bench_prefill.calibrate(records, bandwidth_gbps=3000.0)
    assert res["worst_model_factor"] <= ESTIMATE_FACTOR, res["fit"]
