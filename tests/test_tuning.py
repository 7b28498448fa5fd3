"""Per-GPU config files (mla_kernels._tuning): loading, lookup by shape class, fallbacks, one warning."""
import json
import os
import warnings
from pathlib import Path

import pytest
import torch

from mla_kernels import _tuning

SEED = _tuning.CONFIG_DIR / "nvidia-h100-80gb-hbm3.json"


def test_slug_names_the_seeded_h100_file():
    assert _tuning.device_slug("NVIDIA H100 80GB HBM3") == SEED.stem
    assert SEED.exists()


def test_seeded_h100_file_loads_and_holds_the_measured_winners():
    table = _tuning.load_file(SEED, "cuda", "3.6.0")
    assert table["decode"][_tuning.decode_class(16)] == dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2)
    assert table["decode"][_tuning.decode_class(17)] == dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)
    assert "not produced by bench.autotune" in json.loads(SEED.read_text())["source"]


@pytest.mark.parametrize("case", ["corrupt", "nested_too_deep", "other_vendor", "stale_triton"])
def test_bad_files_warn_once_and_fall_back(tmp_path, case):
    path = tmp_path / f"{case}.json"
    data = json.loads(SEED.read_text())
    if case == "corrupt":
        path.write_text("{not json")
    elif case == "nested_too_deep":  # json raised RecursionError, which no caller caught: every launch failed
        path.write_text("[" * 200000 + "]" * 200000)
    else:
        data["vendor" if case == "other_vendor" else "triton"] = "hip" if case == "other_vendor" else "2.3.0"
        path.write_text(json.dumps(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _tuning.load_file(path, "cuda", "3.6.0") is None
        assert _tuning.load_file(path, "cuda", "3.6.0") is None
    assert len([w for w in caught if "mla_kernels" in str(w.message)]) == 1


GOOD = dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2)


def test_a_kernel_table_that_is_no_table_is_dropped(tmp_path):
    """A kernel's table that is a list: dropped with one warning (lookups and the merge with the user's file
    crashed on it), the other kernels' tables kept."""
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(dict(vendor="cuda", triton="3.6.0", kernels={"decode": [1], "expanded": {"x": GOOD}})))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _tuning.load_file(path, "cuda", "3.6.0") == {"expanded": {"x": GOOD}}
        assert _tuning.load_file(path, "cuda", "3.6.0") == {"expanded": {"x": GOOD}}
    assert len([w for w in caught if "not tables" in str(w.message)]) == 1
    for kernel, table in _tuning.load_file(SEED, "cuda", "3.6.0").items():  # the shipped file is valid
        for cfg in table.values():
            assert _tuning.config_error(kernel, cfg) is None


def test_constants_that_are_no_numbers_are_dropped(tmp_path, monkeypatch):
    """A constant that is no finite number > 0 is dropped with one warning, so the defaults serve it: a file's
    ``absorbed_relative_speed`` of "fast" or 0 made prefill's path choice raise ValueError from the call."""
    from mla_kernels import _prefill_cost

    path = tmp_path / "configs" / "test-gpu.json"
    path.parent.mkdir()
    path.write_text(json.dumps(dict(vendor=_tuning.vendor(), triton="3.6.0", kernels={}, constants=dict(
        absorbed_relative_speed="fast", prefill_call_us=0, prefill_launch_us=True, prefill_gemm_tflops=float("inf"),
        prefill_expanded_tflops=10 ** 400,  # valid JSON; float() of it overflowed in prefill's path choice
        prefill_source=3, prefill_bandwidth_gbps=2000, note_source="measured"))))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = _tuning.load_data(path, _tuning.vendor(), "3.6.0")
        assert data["constants"] == dict(prefill_bandwidth_gbps=2000, note_source="measured")
        _tuning.load_data(path, _tuning.vendor(), "3.6.0")
    assert len([w for w in caught if "constants" in str(w.message)]) == 1

    import triton
    path.write_text(json.dumps(dict(vendor=_tuning.vendor(), triton=triton.__version__, kernels={},
                                    constants=dict(absorbed_relative_speed=0))))
    monkeypatch.setattr(_tuning, "_gpu_index", lambda device: 0)
    monkeypatch.setattr(_tuning, "_device_name", lambda index: "Test GPU")
    monkeypatch.setattr(_tuning, "CONFIG_DIR", tmp_path / "configs")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _tuning.reload()
    try:
        with pytest.warns(RuntimeWarning, match="constants"):
            assert _prefill_cost.device_constants(torch.device("cpu")) == _prefill_cost.DEFAULTS
    finally:
        _tuning.reload()


def test_missing_file_is_silent_and_cpu_gets_heuristics(tmp_path):
    """A missing file as such is silent (the user's file is optional; a GPU with no file at all warns once, above)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _tuning.load_file(tmp_path / "none.json", "cuda", "3.6.0") is None
        assert _tuning.lookup("decode", "R512/rows<=16", torch.device("cpu")) is None


def test_a_gpu_without_any_file_warns_once(fake_gpu, monkeypatch):
    """Issue 9: a missing file gives one warning and the heuristics. Per GPU: no shipped file and no user file for it
    (an H200, an A100: the heuristics serve, and the warning says how to tune it); silent where either exists, and
    with MLA_KERNELS_AUTOTUNE=1, which tunes what is missing. Before, a GPU without a file was silent."""
    gpu = torch.device("cuda", 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _tuning.lookup("decode", "R512/rows<=16", gpu, tune=False) is None
        assert _tuning.lookup("decode", "R512/rows>64", gpu, tune=False) is None
        _tuning.reload()  # a reload (after a sweep wrote elsewhere) does not repeat it either
        assert _tuning.constant("prefill_call_us", gpu) is None
    ours = [str(w.message) for w in caught if w.category is RuntimeWarning]
    assert len(ours) == 1 and "'Test GPU'" in ours[0] and "built-in heuristics" in ours[0] \
        and "bench.autotune" in ours[0], ours
    user = _tuning.user_file(0)
    user.parent.mkdir(parents=True)
    user.write_text(json.dumps(dict(vendor=_tuning.vendor(), triton=__import__("triton").__version__,
                                    kernels={"decode": {"R512/rows<=16": GOOD}})))
    monkeypatch.setattr(_tuning, "_warned", set())
    for env, has_user in (("0", True), ("1", False)):
        if not has_user:
            user.unlink()
        monkeypatch.setenv(_tuning.AUTOTUNE_ENV, env)
        _tuning.reload()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _tuning.lookup("decode", "R512/rows<=16", gpu, tune=False) == (GOOD if has_user else None)


def test_constants_and_save_file_merge(tmp_path):
    """save_file merges into an existing file (kernels per shape class, constants per name), rewrites the
    metadata, and load_data reads both tables back; the seeded file carries prefill's fitted time-model constants."""
    assert _tuning.load_data(SEED, "cuda", "3.6.0")["constants"]["prefill_absorbed_tflops"] == 52.0
    import triton

    path = tmp_path / "gpu.json"
    _tuning.save_file(path, device="Test GPU", sm_count=8, source="test", vendor_key="cuda",
                      kernels={"decode": {"a": {"BLOCK_M": 16}}}, constants={"x": 1.0})
    _tuning.save_file(path, device="Test GPU", sm_count=8, source="test 2", vendor_key="cuda",
                      kernels={"decode": {"b": {"BLOCK_M": 64}}, "prefill": {"c": {"BLOCK_M": 128}}},
                      constants={"y": 2.0})
    data = _tuning.load_data(path, "cuda", triton.__version__)
    assert data["kernels"] == {"decode": {"a": {"BLOCK_M": 16}, "b": {"BLOCK_M": 64}},
                               "prefill": {"c": {"BLOCK_M": 128}}}
    assert data["constants"] == {"x": 1.0, "y": 2.0} and data["source"] == "test 2"
    assert _tuning.constant("x", torch.device("cpu")) is None  # the CPU never reads GPU files


# -- tiles fitted to shared memory ------------------------------------------------------------------------------


def test_fit_shared_halves_block_n_then_block_m():
    from mla_kernels import _utils

    def need(c):
        return c["BLOCK_M"] * c["BLOCK_N"] * 100

    cfg = _tuning.Tuned(dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2), "decode", "R512/rows>64", 0)
    assert _utils.fit_shared(cfg, need, 64 * 64 * 100 + _utils.SHARED_SCRATCH_BYTES) is cfg  # fits: kept as is
    assert _utils.fit_shared(cfg, need, None) is cfg  # no limit known (ROCm)
    fitted = _utils.fit_shared(cfg, need, 16 * 32 * 100 + _utils.SHARED_SCRATCH_BYTES)
    assert fitted == dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=2)
    assert isinstance(fitted, _tuning.Tuned)  # still known as stored: dropped if it fails to compile
    assert _utils.fit_shared(cfg, need, 0) == dict(BLOCK_M=16, BLOCK_N=16, num_warps=8, num_stages=1)  # the floor
    assert cfg == dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)  # not modified


@pytest.mark.parametrize("elem_bytes", [2, 4], ids=["16-bit", "fp32"])
@pytest.mark.parametrize("kv_fp8", [False, True], ids=["cache", "fp8-cache"])
def test_decode_and_expanded_tiles_fit_the_h100(elem_bytes, kv_fp8):
    """Every width and row count gets tiles whose estimate fits an H100 (what the interpreter models), unless they
    are already the smallest; DeepSeek's bf16 shapes keep the measured winners untouched."""
    from mla_kernels import _utils, decode, prefill

    cpu, limit = torch.device("cpu"), _utils.H100_SHARED_BYTES - _utils.SHARED_SCRATCH_BYTES
    for r in (16, 128, 512, 1024):
        for p in (16, 64, 1024):
            for rows in (1, 16, 32, 128, 1024):
                cfg = decode.decode_tiles(rows, r, cpu, p, elem_bytes, kv_fp8)
                need = decode.decode_shared_bytes(cfg, r, p, elem_bytes, kv_fp8)
                assert need <= limit or (cfg["BLOCK_M"], cfg["BLOCK_N"]) == (16, 16), (r, p, rows, cfg, need)
            for d_v in (16, 128, 1024):
                cfg = prefill._expanded_config(4096, cpu, r, d_v, p, elem_bytes)
                need = prefill.expanded_shared_bytes(cfg, r, d_v, p, elem_bytes)
                assert need <= limit or (cfg["BLOCK_M"], cfg["BLOCK_N"]) == (16, 16), (r, d_v, p, cfg, need)
    if elem_bytes == 2:
        assert decode.decode_tiles(128, 512, cpu, 64, 2, kv_fp8) == decode._config(128, 512)
        assert decode.decode_tiles(16, 512, cpu, 64, 2, kv_fp8) == decode._config(16, 512)
        assert prefill._expanded_config(4096, cpu) == prefill._expanded_heuristic(4096)
    else:
        assert decode.decode_tiles(128, 512, cpu, 64, 4) == dict(decode._config(128, 512), BLOCK_N=16)


@pytest.mark.parametrize("elem_bytes", [2, 4], ids=["16-bit", "fp32"])
def test_rocm_tiles_fit_the_mi300x_lds(elem_bytes):
    """ROCm's tiles (``_config(hip=True)``, ``_expanded_heuristic(hip=True)``) are fitted to the MI300X's 64 KiB of
    LDS by the gfx942 model, nothing to spare (it is the AMD backend's own figure at one stage; tests/test_compile
    holds the compiled figure to it): every width fits unless the tiles are the smallest; bf16 at DeepSeek's widths
    keeps ROCm's heuristic tiles, and fp32 at R = 1024 (128 KiB at 32 x 16) is shrunk to 16 x 16."""
    from mla_kernels import _utils, decode, prefill

    for r in (16, 128, 512, 1024):
        for p in (16, 64, 1024):
            for rows in (1, 16, 128):
                cfg = decode._fit_tiles(decode._config(rows, r, hip=True), None, r, p, elem_bytes, False, hip=True)
                need = decode.decode_shared_bytes(cfg, r, p, elem_bytes, hip=True)
                assert need <= _utils.MI300_LDS_BYTES or (cfg["BLOCK_M"], cfg["BLOCK_N"]) == (16, 16), (r, p, cfg)
            for d_v in (16, 128, 512):
                cfg = prefill._fit_expanded(prefill._expanded_heuristic(4096, hip=True), None, r, d_v, p, elem_bytes,
                                            hip=True)
                need = prefill.expanded_shared_bytes(cfg, r, d_v, p, elem_bytes, hip=True)
                assert need <= _utils.MI300_LDS_BYTES or (cfg["BLOCK_M"], cfg["BLOCK_N"]) == (16, 16), (r, d_v, cfg)
    hip_cfg = decode._config(128, 512, hip=True)
    fitted = decode._fit_tiles(hip_cfg, None, 512, 64, elem_bytes, False, hip=True)
    assert fitted == hip_cfg  # 32 x 16: 32 KiB in bf16, exactly 64 KiB in fp32
    r1024 = decode._fit_tiles(decode._config(128, 1024, hip=True), None, 1024, 64, elem_bytes, False, hip=True)
    assert (r1024["BLOCK_M"], r1024["BLOCK_N"]) == ((32, 16) if elem_bytes == 2 else (16, 16))
    assert decode._fit_tiles(hip_cfg, torch.device("cpu"), 1024, 64, 4, False) is hip_cfg  # the H100 fits it


def test_shared_memory_limit_of_the_interpreter_is_the_h100s():
    from mla_kernels import _utils

    assert _utils.shared_memory_limit(torch.device("cpu")) == _utils.H100_SHARED_BYTES == 232448


def test_save_file_never_shows_a_reader_a_partial_file(tmp_path):
    """save_file rewrote the file in place (truncate, then write): a reader at that moment -- another process of a
    tensor-parallel server reading the same user file, or tuning on first use too -- saw an empty or cut file, warned
    and ran the heuristics, and a writer merging into it dropped every class the file held."""
    import threading

    import triton
    path = tmp_path / "gpu.json"
    cfg = dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2)
    classes = {f"R512/class{i}": cfg for i in range(2000)}
    _tuning.save_file(path, device="Test GPU", sm_count=8, source="seed", vendor_key="cuda",
                      kernels={"decode": classes})
    stop, bad = threading.Event(), []

    def reader():
        while not stop.is_set():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                data = _tuning.load_data(path, "cuda", triton.__version__)
            if data is None or len(data["kernels"]["decode"]) < len(classes):
                bad.append(data)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(20):
            _tuning.save_file(path, device="Test GPU", sm_count=8, source=f"w{i}", vendor_key="cuda",
                              kernels={"decode": {"R512/new": cfg}})
    finally:
        stop.set()
        thread.join()
    assert not bad, f"a reader saw a partial file {len(bad)} times"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu.json"]  # no temporary file left behind


def test_save_file_keeps_every_writers_classes(tmp_path):
    """Two writers saving into one file at once (the ranks of a tensor-parallel server, each tuning on first use):
    each merged into the same old file and the later replace dropped the other's classes (15 of 30 kept, three runs
    out of three). The folder's lock makes read, merge and replace one step."""
    import threading

    import triton
    path = tmp_path / "gpu.json"
    cfg = dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2)

    def writer(tag):
        for i in range(15):
            _tuning.save_file(path, device="Test GPU", sm_count=8, source=tag, vendor_key="cuda",
                              kernels={"decode": {f"R512/{tag}{i}": cfg}})

    threads = [threading.Thread(target=writer, args=(tag,)) for tag in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    data = _tuning.load_data(path, "cuda", triton.__version__)
    assert sorted(data["kernels"]["decode"]) == sorted(f"R512/{t}{i}" for t in "ab" for i in range(15))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu.json"]  # the lock leaves no file behind


def test_a_file_of_the_same_triton_major_version_loads(tmp_path):
    """Stale means another triton MAJOR version: a file tuned under 3.1.0 serves 3.6.0 (a minor or patch upgrade
    must not throw every tuned config away), one tuned under 2.3.0 does not."""
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(dict(vendor="cuda", triton="3.1.0", kernels={"decode": {"R512/rows<=16": GOOD}})))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _tuning.load_file(path, "cuda", "3.6.0") == {"decode": {"R512/rows<=16": GOOD}}
        assert _tuning.load_file(path, "cuda", "3.6.1+git") == {"decode": {"R512/rows<=16": GOOD}}
    with pytest.warns(RuntimeWarning, match="tuned with triton"):
        assert _tuning.load_file(path, "cuda", "4.0.0") is None


def test_config_ranges_at_their_bounds():
    """Each checked value at the ends of its range is a config, one step past either end is not."""
    decode = dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=0, waves=1)
    assert _tuning.config_error("decode", decode) is None
    top = dict(BLOCK_M=1024, BLOCK_N=1024, num_warps=32, num_stages=8, waves=128, TMA=False, GLUON=True)
    assert _tuning.config_error("decode", top) is None
    assert _tuning.config_error("write_cache", dict(BLOCK_T=1, num_warps=1)) is None
    assert _tuning.config_error("write_cache", dict(BLOCK_T=1024, num_warps=32)) is None
    past = [dict(decode, BLOCK_M=2048), dict(decode, BLOCK_N=2048), dict(decode, num_warps=64),
            dict(decode, num_stages=9), dict(decode, waves=129), dict(decode, BLOCK_N=8)]
    for cfg in past:
        assert _tuning.config_error("decode", cfg) is not None, cfg
    for cfg in (dict(BLOCK_T=2048, num_warps=4), dict(BLOCK_T=0, num_warps=4), dict(BLOCK_T=4, num_warps=0)):
        assert _tuning.config_error("write_cache", cfg) is not None, cfg


def test_save_file_gives_a_readable_file_and_keeps_a_files_mode(tmp_path):
    """The temporary file the write goes through is created 0600: a new config file is 0644 (the shipped files and
    a user's cache are read by other processes and users), and a file rewritten keeps the mode it had."""
    import stat

    path = tmp_path / "gpu.json"
    kw = dict(device="Test GPU", sm_count=8, source="test", vendor_key="cuda")
    _tuning.save_file(path, kernels={"decode": {"a": GOOD}}, **kw)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    path.chmod(0o640)
    _tuning.save_file(path, kernels={"decode": {"b": GOOD}}, **kw)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_slug_of_a_name_with_spaces_and_symbols_at_its_ends():
    assert _tuning.device_slug("  AMD Instinct MI300X (gfx942) ") == "amd-instinct-mi300x-gfx942"
    assert _tuning.device_slug("???") == "gpu"  # (it was "": the file configs/.json), as bench's slug falls back


def test_a_relative_xdg_cache_home_is_ignored(monkeypatch, tmp_path):
    """The XDG spec: a relative ``XDG_CACHE_HOME`` is invalid and ignored (it named a folder under the current
    directory, wherever the process ran); an absolute one is used."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert _tuning.user_cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "mla_kernels"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "abs"))
    assert _tuning.user_cache_dir() == tmp_path / "abs" / "mla_kernels"


def test_constants_that_are_no_table_warn_once_and_fall_back(tmp_path):
    """``constants`` must be a table like ``kernels``: a list there made the check of its entries raise
    AttributeError out of every lookup; the file is ignored with one warning instead."""
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(dict(vendor="cuda", triton="3.6.0", kernels={}, constants=[1.0])))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _tuning.load_data(path, "cuda", "3.6.0") is None
        assert _tuning.load_data(path, "cuda", "3.6.0") is None
    assert len([w for w in caught if "constants" in str(w.message)]) == 1


def test_expanded_class_names_its_widths_in_order():
    """The key of a file's expanded table: N (D_nope) first, then V (D_v), as the files written so far hold it."""
    assert _tuning.expanded_class(64, 96, 32) == "N96/V32/new<=64"
    assert _tuning.expanded_class(65, 32, 96) == "N32/V96/new<=1024"
