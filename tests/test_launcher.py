"""``_launcher.spec_key``: two launches with one key get one specialization from Triton (the cached launch's
premise; ``test_compile.test_cached_launches_match_triton`` checks the launches themselves through Triton's JIT).

Triton's specialization of an argument comes from its C++ ``native_specialize_impl`` (3.6+; 3.3-3.5: a Python
``specialize_impl`` with the same rules): a tensor's dtype and 16-byte
alignment, an int's width and whether it is 1 or a multiple of 16, a float's type, a bool's type. The property: for
any two argument lists, equal keys imply equal specializations, argument by argument."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import assert_fork_beside_a_busy_thread_finishes
from mla_kernels import _launcher

from triton.backends.compiler import BaseBackend  # noqa: E402

try:  # triton 3.6+: the C++ specialization its binder calls
    from triton._C.libtriton import native_specialize_impl as _native

    def native(backend, arg, is_const, specialize_value, align):
        return _native(backend, arg, is_const, specialize_value, align)
except ImportError:  # triton 3.3 to 3.5: the binder's Python one, with the backend's divisibility rule
    import inspect

    import triton.runtime.jit as _jit

    if not hasattr(_jit, "create_specialize_impl"):  # triton 3.2, whose launches are never cached (SUPPORTED)
        pytest.skip("triton before 3.3: no cached launch, nothing to key", allow_module_level=True)
    create_specialize_impl = _jit.create_specialize_impl

    if inspect.signature(create_specialize_impl).parameters:  # 3.4, 3.5: the rule given once
        _python_impl = create_specialize_impl(BaseBackend.get_arg_specialization)

        def native(backend, arg, is_const, specialize_value, align):
            return _python_impl(arg, is_const, specialize_value, align)
    else:  # 3.3: given with each argument
        def native(backend, arg, is_const, specialize_value, align):
            return create_specialize_impl()(arg, BaseBackend.get_arg_specialization, is_const, specialize_value,
                                            align)

BUFFER = torch.zeros(64, dtype=torch.float32)  # views at element offsets 0..7: 16-byte aligned at 0 and 4 only


def _specialization(args):
    return [native(BaseBackend, a, False, True, True) for a in args]


INTS = st.one_of(st.integers(-2 ** 63, 2 ** 64 - 1), st.sampled_from([0, 1, -1, 16, 2 ** 31 - 1, 2 ** 31, -2 ** 31,
                                                                       -2 ** 31 - 1, 2 ** 32, 48, 17, 2 ** 63]))
ARGS = st.one_of(INTS, st.floats(allow_nan=True), st.booleans(), st.none(),
                 st.tuples(st.sampled_from([torch.float32, torch.bfloat16, torch.int32]), st.integers(0, 7)))


def _arg(drawn):
    if isinstance(drawn, tuple):  # a tensor view of that dtype at that element offset
        dtype, offset = drawn
        return BUFFER.view(dtype)[offset:]
    return drawn


@settings(max_examples=400, deadline=None, derandomize=True)
@given(st.lists(ARGS, min_size=1, max_size=6), st.data())
def test_equal_keys_mean_equal_specializations(drawn, data):
    a = [_arg(x) for x in drawn]
    # a second list of the same length, often equal in key to the first: each argument kept, or redrawn
    b = [x if data.draw(st.booleans()) else _arg(data.draw(ARGS)) for x in a]
    if _launcher.spec_key(tuple(a), {}) == _launcher.spec_key(tuple(b), {}):
        assert _specialization(a) == _specialization(b)


EDGES = [0, 1, -1, 2, 7, 8, 16, 17, 24, 32, 48, -8, -16, -17, 2 ** 31 - 16, 2 ** 31 - 1, 2 ** 31, 2 ** 31 + 8,
         2 ** 31 + 16, -2 ** 31, -2 ** 31 + 8, -2 ** 31 - 1, -2 ** 31 - 16, 2 ** 32, 2 ** 32 + 8, 2 ** 63 - 16,
         2 ** 63 - 1, 2 ** 63, 2 ** 63 + 8, 2 ** 63 + 16, 2 ** 64 - 16, 2 ** 64 - 1, -2 ** 63, -2 ** 63 + 8]


def test_int_keys_are_tritons_int_classes():
    """For every pair of edge ints (widths' boundaries, 1, multiples of 8 that are not of 16, negatives): equal keys
    exactly when Triton specializes them alike. Ints are keyed by class, so counts that change from call to call
    (packed tokens, batch sizes) share an entry."""
    spec = {x: native(BaseBackend, x, False, True, True) for x in EDGES}
    for x in EDGES:
        for y in EDGES:
            same_key = _launcher.spec_key((x,), {}) == _launcher.spec_key((y,), {})
            assert same_key == (spec[x] == spec[y]), (x, y, spec[x], spec[y])


def test_descriptor_keys_are_tritons_descriptor_types():
    """Host TMA descriptors (``decode_tma``'s launches): equal keys exactly when Triton specializes them alike (by
    the base's dtype and the block shape), for descriptors over several dtypes, block shapes and bases; the key
    also keeps the padding mode, which Triton reads at launch."""
    descriptor = pytest.importorskip("triton.tools.tensor_descriptor").TensorDescriptor
    base = torch.zeros(4, 64, 576)
    descs = [descriptor.from_tensor(base.to(dtype)[..., lo:lo + 256], block)
             for dtype in (torch.float32, torch.bfloat16, torch.float16) for lo in (0, 64)
             for block in ([1, 64, 128], [1, 32, 128], [1, 64, 64])]
    spec = [native(BaseBackend, d, False, True, True) for d in descs]
    for i, a in enumerate(descs):
        for j, b in enumerate(descs):
            assert (_launcher.spec_key((a,), {}) == _launcher.spec_key((b,), {})) == (spec[i] == spec[j]), (i, j)
    if "padding" in vars(descs[0]):  # (triton 3.4's descriptors have no padding mode)
        nan = descriptor.from_tensor(base[..., :256], [1, 64, 128], padding="nan")
        assert _launcher.spec_key((nan,), {}) != _launcher.spec_key((descs[0],), {})


def test_key_separates_what_triton_separates():
    aligned, off = BUFFER[:8], BUFFER[1:9]
    key = _launcher.spec_key
    assert key((True,), {}) != key((1,), {})  # u1 against constexpr 1, though True == 1 in Python
    assert key((aligned,), {}) != key((off,), {})
    assert key((aligned,), {}) == key((BUFFER[4:],), {})  # both 16-byte aligned: one kernel
    assert key((aligned,), {}) != key((aligned.to(torch.bfloat16),), {})
    assert key((0.5,), {}) == key((2.0,), {})  # floats: fp32 whatever their value
    assert key((1,), {"BLOCK": 16}) != key((1,), {"BLOCK": 32})
    assert key((1,), {"num_warps": 4}) != key((1,), {"num_warps": 8})


@pytest.mark.parametrize("arg", [torch.tensor(1).numpy(), "text", (1, 2), torch.float32])
def test_other_arguments_are_left_to_triton(arg):
    """Types the key does not cover give None, and every such launch goes through Triton (numpy scalars, tuples,
    strings, dtypes). (An int Triton refuses, past 64 bits, has a key, but a key is stored only after Triton has
    launched with it, so it never is.)"""
    assert _launcher.spec_key((arg,), {}) is None


def test_only_kernels_compiled_for_nvidia_are_stored():
    """What Triton hands back is stored only when it was compiled for the "cuda" backend: a ROCm (``hip``) kernel, or
    anything without a target (a stub's None, a warm-up result), is launched through Triton every time."""
    from types import SimpleNamespace as NS

    def compiled(backend):
        return NS(metadata=NS(target=NS(backend=backend, arch=90)), packed_metadata=())
    assert _launcher._nvidia(compiled("cuda"))
    assert not _launcher._nvidia(compiled("hip")) and not _launcher._nvidia(compiled("xpu"))
    assert not _launcher._nvidia(None) and not _launcher._nvidia(NS(metadata=NS()))


def test_plain_launch_for_interpreted_and_stub_kernels():
    """Under the interpreter (CI) the kernels are not ``JITFunction``s: ``launch`` indexes them as Triton would."""
    calls = []

    class Stub:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((grid, args, kwargs))

    _launcher.launch(Stub(), (2, 1), 1, 2.0, BLOCK=16)
    assert calls == [((2, 1), (1, 2.0), {"BLOCK": 16})]


ON_A_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="launches on a GPU (the CPU suite checks them "
                               "through Triton's JIT: test_compile.test_cached_launches_match_triton)")


def _counting_tritons_runs(monkeypatch) -> list:
    """The GPU tests' common start: a fresh cache, and a list that gets each kernel whose launch enters Triton's
    ``JITFunction.run`` (a cached launch does not). Skips where the cached launch is off."""
    from triton.runtime.jit import JITFunction

    if not _launcher.ENABLED:
        pytest.skip("the cached launch is off here (ROCm, triton < 3.3 or MLA_KERNELS_CACHED_LAUNCH=0)")
    _launcher.clear()
    runs = []
    real_run = JITFunction.run
    monkeypatch.setattr(JITFunction, "run", lambda self, *a, **k: runs.append(self) or real_run(self, *a, **k))
    return runs


@ON_A_GPU
def test_cached_launches_on_a_gpu(monkeypatch):
    """On a GPU: repeat decode calls launch through the cache (entries stored, Triton's run not entered) and give
    bit for bit what Triton's own launch gives, also for a query view 2 bytes off alignment made after an aligned
    one (a stale kernel compiled for aligned loads would read it wrong), and on a side stream."""
    from mla_kernels import reference
    from helpers import assert_close, make_paged_cache
    from mla_kernels import decode, mla_decode

    runs = _counting_tritons_runs(monkeypatch)
    device = torch.device("cuda")
    kv, pe, table = make_paged_cache([300, 77, 1000], 64, (512, 64), torch.bfloat16, device)
    seqlens = torch.tensor([300, 77, 1000], dtype=torch.int32, device=device)
    q = torch.randn(3 * 16 * 576 + 8, device=device).to(torch.bfloat16)
    views = {"aligned": q[:3 * 16 * 576].view(3, 1, 16, 576), "misaligned": q[1:1 + 3 * 16 * 576].view(3, 1, 16, 576)}

    def call(qs, splits):
        return mla_decode(qs[..., :512], qs[..., 512:], kv, pe, table, seqlens, 0.1, num_splits=splits)

    for name, qs in views.items():
        for splits in (1, 3):
            first = call(qs, splits)
            runs.clear()
            again = call(qs, splits)
            assert not runs, f"{name}, {splits} splits: a repeat went through Triton's run"
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())  # the inputs, written on the default stream
            with torch.cuda.stream(side):
                on_side = call(qs, splits)
            side.synchronize()
            monkeypatch.setattr(_launcher, "ENABLED", False)
            plain = call(qs, splits)
            monkeypatch.setattr(_launcher, "ENABLED", True)
            for got in (first, again, on_side):
                assert torch.equal(got, plain), f"{name}, {splits} splits"
            ref, _ = reference.absorbed_decode(qs[..., :512], qs[..., 512:], kv, pe, table, seqlens, 0.1)
            assert_close(f"{name}, {splits} splits", again, ref, torch.bfloat16)
    assert id(decode._mla_attn_kernel) in _launcher._entries


@ON_A_GPU
@pytest.mark.parametrize("path", ["scheduled", "sparse", "fp8", "prefill-absorbed", "prefill-expanded", "write_cache",
                                  "tma"])
def test_every_launch_path_cached_on_a_gpu(path, monkeypatch):
    """On a GPU, each of the library's other launch paths: its second call launches from the cache (Triton's run not
    entered) and gives bit for bit what Triton's own launch gives (``write_cache``: the same cache bytes). What
    bench rows time is the second call and later, while their correctness check runs the first."""
    from helpers import make_paged_cache
    from mla_kernels import (fp8_latent_cache, mla_decode, mla_decode_metadata, mla_prefill, mla_prefill_attention,
                             write_cache)
    from mla_kernels import _utils, decode, decode_tma
    from mla_kernels.decode_tma import tma_config

    runs = _counting_tritons_runs(monkeypatch)
    device = torch.device("cuda")
    if path == "tma" and not _utils.nvidia_sm90(device):
        pytest.skip("the TMA kernel needs compute capability 9+")
    if path == "tma" and decode_tma.TensorDescriptor is None:
        pytest.skip("this triton has no host tensor descriptors (3.4+): the TMA kernel is never dispatched to")
    gen = torch.Generator(device=device).manual_seed(0)
    lens = [300, 77, 1000]
    kv, pe, table = make_paged_cache(lens, 64, (512, 64), torch.bfloat16, device)
    kv, pe = kv.nan_to_num(), pe.nan_to_num()  # (the fp8 quantizer and the expansion GEMM read whole blocks)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    q = torch.randn(3, 2, 16, 576, device=device, generator=gen).to(torch.bfloat16)
    qn, qp = q[..., :512], q[..., 512:]
    cu = torch.tensor([0, 40, 50, 90], dtype=torch.int32, device=device)
    qt = torch.randn(90, 16, 576, device=device, generator=gen).to(torch.bfloat16)
    q_raw = torch.randn(90, 16, 192, device=device, generator=gen).to(torch.bfloat16)
    w_kv_b = torch.randn(16 * 256, 512, device=device, generator=gen).to(torch.bfloat16) / 16
    if path == "fp8":
        kv8, scale8, pe8 = fp8_latent_cache(kv.shape[0], 64, 512, 64, device=device)
        flat = torch.arange(kv.shape[0] * 64, device=device)
        write_cache(kv.reshape(-1, 512), pe.reshape(-1, 64), kv8, pe8, flat, kv_scale=scale8)
    new = torch.randn(5, 576, device=device, generator=gen).to(torch.bfloat16)
    slots = torch.tensor([3, 64, 65, 700, 701], device=device)

    def call():
        if path == "scheduled":  # a schedule built afresh, as each decode step builds one
            return mla_decode(qn, qp, kv, pe, table, seqlens, 0.1,
                              metadata=mla_decode_metadata(seqlens, 16, 2, kv_lora_rank=512))
        if path == "sparse":
            idx = torch.arange(64, device=device, dtype=torch.int32).expand(3, 2, 64).contiguous()
            return mla_decode(qn, qp, kv, pe, table, seqlens, 0.1, indices=idx)
        if path == "fp8":
            return mla_decode(qn, qp, kv8, pe8, table, seqlens, 0.1, kv_scale=scale8)
        if path == "prefill-absorbed":
            return mla_prefill(qt[..., :512], qt[..., 512:], kv, pe, table, cu, seqlens, 0.1)
        if path == "prefill-expanded":
            return mla_prefill_attention(q_raw[..., :128], q_raw[..., 128:], kv, pe, table, cu, seqlens, w_kv_b, 0.1,
                                         path="expanded")
        if path == "write_cache":
            kv_w, pe_w = torch.zeros_like(kv), torch.zeros_like(pe)
            write_cache(new[:, :512], new[:, 512:], kv_w, pe_w, slots)
            return kv_w, pe_w
        out, _ = decode._launch(qn, qp, kv, pe, table, seqlens, None, 0.1, True, False, batch=3, seq_q=2,
                                total_tokens=6, max_seqlen_q=2, max_seqlen_k=1000, num_splits=2,
                                config=tma_config(32))
        return out

    if path == "tma":
        monkeypatch.setattr(decode, "_hopper_kernel", lambda *args: "tma")
    call()
    runs.clear()
    again = call()
    assert not runs, f"{path}: a repeat went through Triton's run ({[k.__name__ for k in runs]})"
    monkeypatch.setattr(_launcher, "ENABLED", False)
    plain = call()
    again, plain = (again if isinstance(again, tuple) else (again,)), (plain if isinstance(plain, tuple) else (plain,))
    for a, b in zip(again, plain, strict=True):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), path


def test_threads_launching_at_once_get_their_own_results(device):
    """Threads calling the library at once (a server's workers, each on its own tensors). Triton's interpreter keeps
    its state in globals (the patched ``triton.language``, the program ids of the launch running): two interpreted
    launches at once failed ("Did you forget to add @triton.jit?", a launch's patches undone by the other's end) or
    read the other's program ids. The library serialises interpreted launches; every thread gets the bits it gets
    alone (on a GPU this runs the compiled kernels, whose launches need no lock)."""
    import sys
    import threading

    import mla_kernels
    from mla_kernels.cache import PagedLatentCache

    def step(seed):
        gen = torch.Generator().manual_seed(seed)
        cache = PagedLatentCache(1, 4, 16, 16, 16, dtype=torch.float32, device=device)
        seqs = [cache.add_sequence(), cache.add_sequence()]
        lengths = [17 + seed % 5, 3]
        cache.write(0, cache.append_batch(seqs, lengths), torch.randn(sum(lengths), 16, generator=gen).to(device),
                    torch.randn(sum(lengths), 16, generator=gen).to(device))
        kv, pe, _ = cache.views(0)
        q_nope, q_pe = (torch.randn(2, 1, 2, 16, generator=gen).to(device) for _ in range(2))
        out, lse = mla_kernels.mla_decode(q_nope, q_pe, kv, pe, cache.block_table(seqs), cache.cache_seqlens(seqs),
                                          0.25, num_splits=2, return_lse=True)  # a split call: two launches
        return kv.clone(), out, lse

    seeds = range(4)
    alone = {seed: step(seed) for seed in seeds}
    together, errors = {}, []

    def worker(seed):
        try:
            together[seed] = step(seed)
        except Exception as exc:  # noqa: BLE001 (reported below, by thread)
            errors.append(f"{seed}: {exc!r}")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)  # threads switch often: their launches interleave
    try:
        threads = [threading.Thread(target=worker, args=(seed,)) for seed in seeds]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    for seed in seeds:
        for got, want in zip(together[seed], alone[seed]):
            assert torch.equal(got, want), seed


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="os.fork is POSIX's")
def test_fork_while_another_thread_launches_interpreted():
    """A child forked while another thread is inside an interpreted launch (holding the lock that serialises them: a
    DataLoader's workers forked beside a thread at work) launches too: the lock it inherited, which no thread of its
    own would ever release, is replaced in the child."""
    assert_fork_beside_a_busy_thread_finishes(
        imports="""
            from mla_kernels import _launcher
            class Stub:
                def __getitem__(self, grid):
                    return lambda *args, **kwargs: None
            _launcher._Interpreted = Stub  # launched as the interpreter's kernels are: under the lock
        """,
        hold="""
            with _launcher._INTERPRETED:  # as a thread inside an interpreted launch
                ready.set()
                release.wait()
        """,
        child="_launcher.launch(Stub(), (1,), 1)")
