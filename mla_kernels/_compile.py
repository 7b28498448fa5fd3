"""Ahead-of-time compilation of the kernels for real GPUs on a machine without one.

``triton.compile`` builds a cubin for an H100 (sm_90) or an hsaco for an MI300X (gfx942)
from the kernel source alone, which proves in CI that every kernel compiles for both
vendors. ``ptxas_report`` adds registers and spills from NVIDIA's assembler.

Signatures follow the kernels' naming conventions: UPPERCASE arguments and ``*_ptr`` arguments
are pointers (bf16 unless ``types`` says otherwise), ``*scale*`` arguments are fp32, every other
runtime argument is a 32-bit integer; ``types`` overrides any of them by name.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile

import numpy as np
import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGETS = {"sm90": GPUTarget("cuda", 90, 32), "gfx942": GPUTarget("hip", "gfx942", 64)}
# NVIDIA GPUs before Hopper, for the public calls through the JIT (``jit_shapes(target=...)``), with the shared memory
# one block may opt into (CUDA programming guide): an A100's, and the 99 KiB of sm_86/sm_89 (RTX 30/40, A10, L4, L40S)
OTHER_NVIDIA = {"sm80": (GPUTarget("cuda", 80, 32), 166912), "sm86": (GPUTarget("cuda", 86, 32), 101376),
                "sm89": (GPUTarget("cuda", 89, 32), 101376)}


# Integer arguments a launch passes as multiples of 16 (row strides of 576-, 512- and 64-wide rows, block strides,
# split lengths in whole tiles). Triton's JIT marks such ints, and 16-byte aligned pointers, "divisible by 16" when
# it specializes a launch; that proof of alignment is what lets it vectorise loads and pipeline them with cp.async,
# so a compile without it is not the kernel a GPU runs. Not marked: an fp8 cache's scale strides (4 fp32 per token
# in a 656-byte row) and the slot stride (1).
_DIVISIBLE_INTS = ("stride_qn_", "stride_qp_", "stride_kv_", "stride_pe_", "stride_bt_", "stride_k_", "stride_v_",
                   "stride_o_", "stride_kv_c_t", "stride_k_pe_t", "stride_kv_cache_", "stride_pe_cache_", "split_len")


def _signature(kernel, types: dict, constexprs: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs by position, attributes by position) as ``ASTSource`` takes them."""
    sig, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        if name in types:
            sig[name] = types[name]
        elif name.isupper() or name.endswith("_ptr"):
            sig[name] = types.get("*", "*bf16")
        elif "scale" in name:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
        if sig[name].startswith("*") or (sig[name] == "i32" and name.startswith(_DIVISIBLE_INTS)):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, {(kernel.arg_names.index(k),): v for k, v in constexprs.items()}, attrs


def compile_for(kernel, target: str, constexprs: dict, types: dict | None = None, num_warps: int = 4,
                num_stages: int = 2):
    """Compile ``kernel`` (a @triton.jit function) for ``target`` ("sm90" or "gfx942"), with the alignment facts
    the JIT would specialize a typical launch on (``_DIVISIBLE_INTS``, pointers).

    Triton must have been imported without ``TRITON_INTERPRET`` (see ``main``).
    """
    sig, cex, attrs = _signature(kernel, types or {}, constexprs)
    source = ASTSource
    if getattr(kernel, "is_gluon", lambda: False)():  # a @gluon.jit kernel (decode_gluon): Gluon's front end
        from triton.experimental.gluon._runtime import GluonASTSource as source
    src = source(fn=kernel, signature=sig, constexprs=cex, attrs=attrs)
    return triton.compile(src, target=TARGETS[target], options={"num_warps": num_warps, "num_stages": num_stages})


def ptxas_report(compiled) -> dict:
    """Registers, spill bytes and shared memory of an sm_90 kernel, from the ptxas shipped with triton."""
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptx = compiled.asm["ptx"]
    version = re.search(r"\.version (\d+)\.(\d+)", ptx)
    candidates = ["ptxas-blackwell", "ptxas"] if version and int(version.group(1)) >= 9 else ["ptxas", "ptxas-blackwell"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        for exe in candidates:
            exe_path = os.path.join(bin_dir, exe)
            if not os.path.exists(exe_path):
                continue
            run = subprocess.run([exe_path, "-arch=sm_90a", "-v", path, "-o", os.path.join(tmp, "k.cubin")],
                                 capture_output=True, text=True)
            if run.returncode == 0:
                text = run.stdout + run.stderr
                regs = re.search(r"Used (\d+) registers", text)
                spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
                return {"registers": int(regs.group(1)) if regs else None,
                        "spill_store_bytes": int(spill.group(1)) if spill else 0,
                        "spill_load_bytes": int(spill.group(2)) if spill else 0,
                        "shared_bytes": compiled.metadata.shared,
                        "wgmma": "wgmma" in ptx, "tma": "cp.async.bulk.tensor" in ptx,
                        "cp_async": "cp.async.cg.shared" in ptx or "cp.async.ca.shared" in ptx,
                        "evict_first": "L2::evict_first" in ptx}
    return {"registers": None, "shared_bytes": compiled.metadata.shared, "wgmma": "wgmma" in ptx,
            "tma": "cp.async.bulk.tensor" in ptx}


# --------------------------------------------------------------------------------------------
# the kernels and configs CI compiles; `python -m mla_kernels._compile` prints a report
# --------------------------------------------------------------------------------------------


def _cases(hip: bool) -> dict:
    """name -> (kernel, constexprs, types, num_warps, num_stages, shared estimate | None) with the configs the
    library launches on an H100 or, with ``hip``, an MI300X (no tuned file: the heuristic tiles, fitted to the
    GPU's shared memory or LDS); the estimate is the library's (``decode_shared_bytes`` /
    ``expanded_shared_bytes``, the gfx942 model with ``hip``), which sized the tiles to fit, for the test to hold
    against the compiler's figure."""
    from .cache import _write_cache_kernel
    from .decode import (EVICT_FIRST, _config, _fit_tiles, _gluon_tiles, _mla_attn_kernel, _mla_combine_kernel,
                         _mla_sparse_attn_kernel, decode_shared_bytes, decode_tiles)
    from .decode_tma import TensorDescriptor, _mla_attn_tma_kernel
    from .merge import _merge_states_kernel
    from .norm import _rms_norm_kernel
    from .norm_rope import _norm_rope_kernel
    from .rope import _rope_kernel
    from .prefill import (_expanded_config, _expanded_heuristic, _fit_expanded, _mla_expanded_kernel,
                          expanded_shared_bytes)

    h100 = torch.device("cpu")  # no tuned file: the heuristic tiles, fitted to the H100's shared memory

    attn_types = {"BLOCK_TABLE": "*i32", "SEQLENS": "*i32", "CU_SEQLENS_Q": "*i32", "LSE": "*fp32",
                  "OUT_PART": "*fp32", "LSE_PART": "*fp32", "SCHED_PROGRAMS": "*i32", "SCHED_SEQUENCES": "*i32",
                  "INDICES": "*i32"}

    def attn(rows, varlen, split, fp32=False, scheduled=False, d_latent=512, fp8=False, d_rope=64, sparse=False):
        elem = 4 if fp32 else 2
        cfg = (_fit_tiles(_config(rows, d_latent, hip=True), None, d_latent, d_rope, elem, fp8, hip=True) if hip
               else decode_tiles(rows, d_latent, h100, d_rope, elem, fp8))
        constexprs = dict(D_LATENT=d_latent, D_ROPE=d_rope, PAGE_SIZE=64, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                          CAUSAL=True, VARLEN=varlen, SPLIT=split, STORE_LSE=True, DOT_FP32=False,
                          DOT_PRECISION="ieee" if fp32 else None, KV_FP8=fp8, SCHEDULED=scheduled, KV_EVICT="")
        types = dict(attn_types, **{"*": "*fp32"}) if fp32 else attn_types
        # fp8: the e4m3 (OCP float8_e4m3fn) latent and its fp32 scales; queries and rope key bf16. sm_90 converts with
        # cvt.rn.f16x2.e4m3x2 (write_cache encodes by integer arithmetic, _e4m3_bits); gfx942 (MI300), whose native
        # fp8 is the fnuz variant, compiles it with a software conversion (no v_cvt_*fp8 in the hsaco): correct by
        # Triton's emulation, never run or timed here.
        if fp8:
            types = dict(types, KV="*fp8e4nv", KV_SCALE="*fp32")
        kernel = _mla_attn_kernel
        if sparse:  # the sparse entry: no VARLEN/SCHEDULED (decode only, split grid)
            kernel = _mla_sparse_attn_kernel
            constexprs = {k: v for k, v in constexprs.items() if k not in ("VARLEN", "SCHEDULED", "KV_EVICT")}
        return (kernel, constexprs, types, cfg["num_warps"], cfg["num_stages"],
                decode_shared_bytes(cfg, d_latent, d_rope, elem, fp8, hip=hip))

    def attn_tma(rows, split):
        from .decode_tma import tma_config

        # the TMA probe's tiles, which a config asking for this kernel carries, fitted as decode_tiles fits them
        cfg = _fit_tiles(tma_config(rows), h100, 512, 64, 2, False, tma=True)
        block_n = cfg["BLOCK_N"]
        constexprs = dict(D_LATENT=512, D_ROPE=64, PAGE_SIZE=64, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=block_n,
                          CAUSAL=True, VARLEN=False, SPLIT=split, STORE_LSE=True, DOT_FP32=False)
        types = dict(attn_types, kv_desc=f"tensordesc<bf16[{block_n},256]>", pe_desc=f"tensordesc<bf16[{block_n},64]>")
        return (_mla_attn_tma_kernel, constexprs, types, cfg["num_warps"], cfg["num_stages"],
                decode_shared_bytes(cfg, 512, 64, 2, tma=True))

    def attn_gluon(rows, split, d_latent=512, d_rope=64):
        from triton.runtime.jit import mangle_type

        from . import decode_gluon as dg
        lay = dg.layouts(d_latent, d_rope, torch.bfloat16)
        constexprs = dict(D_LATENT=d_latent, D_ROPE=d_rope, PAGE_SIZE=64, BLOCK_M=dg.BLOCK_M, BLOCK_N=dg.BLOCK_N,
                          NUM_STAGES=dg.NUM_STAGES, CAUSAL=True, VARLEN=rows > 128, SPLIT=split, STORE_LSE=True, **lay)
        # a descriptor's type names its block and shared layout; mangled as the JIT does, from a small host buffer
        cache = torch.empty(dg.BLOCK_N, 1, d_latent + d_rope, dtype=torch.bfloat16)
        types = dict(attn_types,
                     kv_desc=mangle_type(dg.descriptor(cache[..., :d_latent], d_latent // 2, lay["LAT_SMEM"])),
                     pe_desc=mangle_type(dg.descriptor(cache[..., d_latent:], d_rope, lay["PE_SMEM"])))
        return (dg._mla_attn_gluon_kernel, constexprs, types, dg.NUM_WARPS, 1,
                dg.gluon_shared_bytes(d_latent, d_rope))

    def expanded(d_nope=128, d_v=128, fp32=False, d_rope=64):
        elem = 4 if fp32 else 2
        cfg = (_fit_expanded(_expanded_heuristic(4096, hip=True), None, d_nope, d_v, d_rope, elem, hip=True) if hip
               else _expanded_config(4096, h100, d_nope, d_v, d_rope, elem))
        constexprs = dict(D_NOPE=d_nope, D_ROPE=d_rope, D_V=d_v, PAGE_SIZE=64, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                          CAUSAL=True, STORE_LSE=True, DOT_FP32=False, DOT_PRECISION="ieee" if fp32 else None)
        types = {"BLOCK_TABLE": "*i32", "CU_SEQLENS_Q": "*i32", "CU_SEQLENS_K": "*i32", "SEQLENS": "*i32",
                 "LSE": "*fp32", **({"*": "*fp32"} if fp32 else {})}
        return (_mla_expanded_kernel, constexprs, types, cfg["num_warps"], cfg["num_stages"],
                expanded_shared_bytes(cfg, d_nope, d_v, d_rope, elem, hip=hip))

    cases = {
        "decode-h16-split": attn(16, False, True),
        "decode-h128": attn(128, False, False),
        "decode-h16-fp32": attn(16, False, True, fp32=True),
        "decode-h128-r1024": attn(128, False, True, d_latent=1024),
        "decode-h16-fp8": attn(16, False, True, fp8=True),
        "decode-h128-fp8": attn(128, False, False, fp8=True),
        "prefill-absorbed": attn(1024, True, False),
        "decode-h16-scheduled": attn(16, False, False, scheduled=True),
        "decode-h128-scheduled": attn(128, False, False, scheduled=True),
        "decode-h128-sparse": attn(128, False, True, sparse=True),
        "decode-h16-fp8-sparse": attn(16, False, True, fp8=True, sparse=True),
        "combine": (_mla_combine_kernel, dict(D_LATENT=512, STORE_LSE=True, SCHEDULED=False),
                    {"OUT": "*bf16", "SCHED_SEQUENCES": "*i32", "*": "*fp32"}, 4, 1, None),
        "combine-scheduled": (_mla_combine_kernel, dict(D_LATENT=512, STORE_LSE=True, SCHEDULED=True),
                              {"OUT": "*bf16", "SCHED_SEQUENCES": "*i32", "*": "*fp32"}, 4, 1, None),
        "prefill-expanded": expanded(),
        "prefill-gather": _gather_case(),
        "merge-states": (_merge_states_kernel, dict(BLOCK_D=512, STORE_LSE=True),
                         {"OUT_A": "*bf16", "OUT_B": "*bf16", "OUT": "*bf16", "*": "*fp32"}, 4, 1, None),
        "write_cache": (_write_cache_kernel, dict(D_LATENT=512, D_ROPE=64, BLOCK_T=8, KV_FP8=False),
                        {"slot_ptr": "*i64", "num_slots": "i64"}, 4, 1, None),
        "write_cache-fp8": (_write_cache_kernel, dict(D_LATENT=512, D_ROPE=64, BLOCK_T=8, KV_FP8=True),
                            {"slot_ptr": "*i64", "num_slots": "i64", "kv_cache_ptr": "*fp8e4nv",
                             "kv_scale_ptr": "*fp32"}, 4, 1, None),
        # MLA without a rotary part (P = 0: no-rope layers): no rope key is read or written
        "decode-h16-nope": attn(16, False, True, d_rope=0),
        "prefill-expanded-nope": expanded(d_rope=0),
        "write_cache-nope": (_write_cache_kernel, dict(D_LATENT=512, D_ROPE=0, BLOCK_T=8, KV_FP8=False),
                             {"slot_ptr": "*i64", "num_slots": "i64"}, 4, 1, None),
        "rope": (_rope_kernel, dict(HALF=32, BLOCK_R=128, STYLE=1), {}, 8, 1, None),  # a decode step's 128 heads
        "rms_norm": (_rms_norm_kernel, dict(BLOCK_R=2, BLOCK_N=2048), {"eps": "fp32"}, 8, 1, None),  # the query's 1536
        # a decode step's latent norm (512 of 576), 128 query heads' rope and the key's, batch 1
        "norm_rope": (_norm_rope_kernel, dict(BLOCK_R=8, BLOCK_N=512, HALF=32, Q_BLOCK_R=128, K_BLOCK_R=1, STYLE=1),
                      {"eps": "fp32"}, 8, 1, None),
    }
    # tiles the H100's shared memory (or the MI300X's LDS) fits only after shrinking them (decode_tiles,
    # _expanded_config; the MI300X's by the gfx942 model)
    cases["decode-h128-fp32"] = attn(128, False, True, fp32=True)
    cases["decode-h128-p1024"] = attn(128, False, True, d_latent=16, d_rope=1024)
    cases["decode-h16-r1024-fp32"] = attn(16, False, True, fp32=True, d_latent=1024)
    cases["decode-h128-r1024-fp32"] = attn(128, False, True, fp32=True, d_latent=1024)
    cases["prefill-expanded-d512"] = expanded(512, 512)
    cases["prefill-expanded-fp32"] = expanded(fp32=True)
    cases["prefill-expanded-d512-fp32"] = expanded(512, 512, fp32=True)
    # a config's EVICT (decode.EVICT_FIRST on the cache loads), which bench.autotune tries on each class's winner:
    # the heuristic tiles (pipelined loads), and 16 rows in one stage (plain loads)
    for rows in (16, 128):
        kernel, constexprs, *rest = attn(rows, False, rows == 16)
        cases[f"decode-h{rows}-evict"] = (kernel, dict(constexprs, KV_EVICT=EVICT_FIRST), *rest)
    kernel, constexprs, types, warps, _, estimate = cases["decode-h16-evict"]
    cases["decode-h16-evict-1stage"] = (kernel, constexprs, types, warps, 1, estimate)
    if not hip and TensorDescriptor is not None:  # tensor descriptors (TMA): the Hopper path, NVIDIA, triton 3.4+
        cases["decode-tma-h16-split"] = attn_tma(16, True)
        cases["decode-tma-h128"] = attn_tma(128, False)
    if not hip and _gluon_tiles() is not None:
        # the Gluon kernel (wgmma, TMA, mbarriers): sm_90 only; its parity is proven on a GPU (test_decode_gluon)
        cases["decode-gluon-h128"] = attn_gluon(128, False)
        cases["decode-gluon-h64-split"] = attn_gluon(64, True)
        cases["prefill-absorbed-gluon"] = attn_gluon(1024, False)
    return cases


def _gather_case():
    """The expanded prefill path's latent gather (``prefill._gather_latent_kernel``) with a GPU's tiles, bf16 cache."""
    from .prefill import GATHER_BLOCK_B, GATHER_ELEMENTS, _gather_latent_kernel
    constexprs = dict(D=512, PAGE_SIZE=64, BLOCK_N=GATHER_ELEMENTS // 512, BLOCK_B=GATHER_BLOCK_B, KV_FP8=False)
    types = {"BLOCK_TABLE": "*i32", "SEQLENS": "*i32", "CU_SEQLENS_K": "*i64", "KV_SCALE": "*fp32"}
    return _gather_latent_kernel, constexprs, types, 4, 1, None


def compile_all(targets=("sm90", "gfx942")) -> dict:
    """Compile every case for every target; returns {target: {case: report or {"error": ...}}}."""
    results = {}
    for target in targets:
        results[target] = {}
        for name, (kernel, constexprs, types, warps, stages, estimate) in _cases(target == "gfx942").items():
            try:
                compiled = compile_for(kernel, target, constexprs, types, warps, stages)
            except Exception as exc:  # reported per case, so one failure doesn't hide the others
                results[target][name] = {"error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
                continue
            binary = "cubin" if target == "sm90" else "hsaco"
            report = ptxas_report(compiled) if target == "sm90" else {"shared_bytes": compiled.metadata.shared}
            report.update(binary_bytes=len(compiled.asm.get(binary) or b""), num_warps=warps, num_stages=stages,
                          shared_estimate=estimate, block_m=constexprs.get("BLOCK_M"), block_n=constexprs.get("BLOCK_N"))
            results[target][name] = report
    return results


# --------------------------------------------------------------------------------------------
# the launch wrappers themselves, through Triton's JIT, for an H100 without one
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def jit_without_gpu(target: str = "sm90", launches: list | None = None):
    """Drive Triton's JIT as a launch on an H100 would, on a machine without a GPU: the active driver answers the
    compile-side questions for sm_90, and ``kernel[grid](...)`` binds and specializes its arguments as a launch
    does (types, 16-byte alignment of the real tensors, ints equal to 1, descriptors and their layouts) and
    compiles, but launches nothing (``run(..., warmup=True)``). Yields the list of compiled kernels, in launch
    order. What ``compile_for`` cannot see, this does: the wrapper's argument list against the kernel's.

    ``launches``: go one step further, through Triton's whole ``run`` (``warmup=False``) up to the driver: each
    compiled kernel's launcher is a recorder that appends ``(compiled kernel, launcher arguments)`` to the list
    (grid, stream, function handle, metadata, hooks, then every kernel parameter); nothing is loaded or launched.
    The yielded list then stays empty. What ``_launcher.launch`` must hand a compiled kernel is checked against this."""
    from triton.backends.nvidia.driver import CudaDriver
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime import driver
    from triton.runtime.jit import KernelInterface

    class _Hopper(CudaDriver):
        def __init__(self):  # no libcuda: nothing below needs it
            pass

        def get_current_target(self):
            return TARGETS[target] if target in TARGETS else OTHER_NVIDIA[target][0]

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

    compiled, loaded = [], []
    slot = "_active" if hasattr(driver, "_active") else "active"  # (triton before 3.5 named it "active")
    getitem, init, active = KernelInterface.__getitem__, CompiledKernel._init_handles, getattr(driver, slot)
    if launches is None:  # restored as they were below (there is no default driver to reset to)
        KernelInterface.__getitem__ = lambda self, grid: (
            lambda *args, **kwargs: compiled.append(self.run(*args, grid=grid, warmup=True, **kwargs)))
    else:
        def record(kernel):
            if kernel.module is not None:
                return
            loaded.append(kernel)
            kernel.module, kernel.function = "stand-in", len(loaded)  # a distinct handle per loaded kernel
            recorder = lambda *args: launches.append((kernel, args))  # noqa: E731
            if isinstance(getattr(type(kernel), "run", None), property):  # triton 3.5+: a property over _run
                kernel._run = recorder
            else:  # before: the launcher is the instance's own attribute "run", set where it is loaded
                kernel.run = recorder
        CompiledKernel._init_handles = record
    driver.set_active(_Hopper())
    try:
        yield compiled
    finally:
        KernelInterface.__getitem__, CompiledKernel._init_handles = getitem, init
        setattr(driver, slot, active)
        for kernel in loaded:  # unloaded again: a later launch in this process loads it for real
            kernel.module = kernel.function = kernel._run = None
            vars(kernel).pop("run", None)
        from . import _launcher
        _launcher.clear()  # nor may it reuse a kernel stored for the stand-in device


@contextlib.contextmanager
def _dispatched_to(kind: str | None):
    """``decode._hopper_kernel`` answering ``kind`` ("tma", "gluon" or None) inside the block: the launch code of
    that path, driven as on an H100 (the dispatch's own rules are tested on the CPU)."""
    from . import decode
    real = decode._hopper_kernel
    decode._hopper_kernel = lambda *args: kind
    try:
        yield
    finally:
        decode._hopper_kernel = real


def jit_launches() -> dict:
    """Every launch wrapper through Triton's JIT (``jit_without_gpu``), as a call on an H100 would drive it, bf16,
    page 64, caches as views of one ``[N, 64, 576]`` buffer: the three decode kernel paths (portable, TMA, Gluon;
    with and without splits, so with the combine kernel), the public ``mla_decode`` (16 heads, ``w_uv``; an fp8
    cache), both prefill paths and ``write_cache`` (bf16 and fp8). Returns {case: [{kernel, shared_bytes, wgmma,
    tma}, ...] in launch order, or {"error": ...}}."""
    from . import _utils, decode, decode_tma
    from .cache import fp8_latent_cache, write_cache
    from .decode_tma import tma_config
    from .prefill import mla_prefill, mla_prefill_attention

    gen = torch.Generator().manual_seed(0)
    batch, page, ctx = 2, 64, 300
    blocks = batch * _utils.cdiv(ctx, page)
    buf = torch.randn(blocks, page, 576, generator=gen).to(torch.bfloat16)
    kv, pe = buf[..., :512], buf[..., 512:]
    table = torch.arange(blocks, dtype=torch.int32).view(batch, -1)
    seqlens = torch.tensor([ctx, ctx - 150], dtype=torch.int32)

    def queries(*shape):
        q = torch.randn(*shape, 576, generator=gen).to(torch.bfloat16)
        return q[..., :512], q[..., 512:]

    def launch_path(cfg, kind, splits, index_dtype=torch.int32):  # decode._launch, dispatching as on an H100
        def run():                                                    # (the dispatch's own tests run on the CPU)
            with _dispatched_to(kind):
                decode._launch(*queries(batch, 1, 128), kv, pe, table.to(index_dtype), seqlens.to(index_dtype), None,
                               0.1, True, True, batch=batch, seq_q=1, total_tokens=batch, max_seqlen_q=1,
                               max_seqlen_k=ctx, num_splits=splits, config=cfg)
        return run

    cases = {}
    paths = {"portable": (decode._config(128, 512), None)}
    if decode_tma.TensorDescriptor is not None:  # a triton with host descriptors (3.4+; else never dispatched to)
        paths["tma"] = (tma_config(128), "tma")
    gluon = decode._gluon_tiles()
    if gluon is not None:  # a triton with Gluon
        paths["gluon"] = (gluon, "gluon")
    for path, (cfg, kind) in paths.items():
        for splits in (1, 2):
            cases[f"decode-{path}-split{splits}"] = launch_path(cfg, kind, splits)
        cases[f"decode-{path}-int64"] = launch_path(cfg, kind, 1, torch.int64)  # int64 indices: the contract allows them

    w_uv = torch.randn(16, 128, 512, generator=gen).to(torch.bfloat16)
    cases["mla_decode-h16-w_uv"] = lambda: decode.mla_decode(*queries(batch, 1, 16), kv, pe, table, seqlens, 0.1,
                                                             w_uv=w_uv)
    kv8, scale8, pe8 = fp8_latent_cache(blocks, page, 512, 64)
    cases["mla_decode-h16-fp8"] = lambda: decode.mla_decode(*queries(batch, 1, 16), kv8, pe8, table, seqlens, 0.1,
                                                            kv_scale=scale8)
    topk = torch.randint(0, ctx - 150, (batch, 2, 2048), generator=gen, dtype=torch.int32)  # V3.2's top-2048
    cases["mla_decode-h128-sparse"] = lambda: decode.mla_decode(*queries(batch, 2, 128), kv, pe, table, seqlens, 0.1,
                                                                indices=topk)
    cu = torch.tensor([0, 20, 30], dtype=torch.int32)
    w_kv_b = torch.randn(16 * 256, 512, generator=gen).to(torch.bfloat16)
    q_raw = torch.randn(30, 16, 192, generator=gen).to(torch.bfloat16)
    cases["mla_prefill"] = lambda: mla_prefill(*queries(30, 16), kv, pe, table, cu, seqlens, 0.1)
    cases["mla_prefill_attention-expanded"] = lambda: mla_prefill_attention(
        q_raw[..., :128], q_raw[..., 128:], kv, pe, table, cu, seqlens, w_kv_b, 0.1, path="expanded")
    new_kv = torch.randn(4, 576, generator=gen).to(torch.bfloat16)
    slots = torch.tensor([0, 1, 64, 65])
    cases["write_cache"] = lambda: write_cache(new_kv[:, :512], new_kv[:, 512:], kv, pe, slots)
    cases["write_cache-fp8"] = lambda: write_cache(new_kv[:, :512], new_kv[:, 512:], kv8, pe8, slots, kv_scale=scale8)
    return _jit_run(cases)


def _same_launch(a, b) -> bool:
    """Two recorded launches (``jit_without_gpu(launches=)``) alike: one compiled kernel, and launcher arguments
    equal value for value (tensors: the same tensor, or one of the same dtype, shape, strides and 16-byte alignment,
    since a call site allocates its outputs afresh)."""
    def same(x, y):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            return (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == y.dtype
                    and x.shape == y.shape and x.stride() == y.stride()
                    and x.data_ptr() % 16 == y.data_ptr() % 16)
        return type(x) is type(y) and repr(x) == repr(y)  # (repr: 0.0 and -0.0 apart)
    from ._launcher import hooked
    (kernel_a, args_a), (kernel_b, args_b) = a, b
    if any(hooked(h) for h in (*args_a[7:9], *args_b[7:9])):  # no hook may run: then the launch metadata is unread
        return False
    return (kernel_a is kernel_b and len(args_a) == len(args_b)
            and all(same(x, y) for x, y in zip(args_a[:6] + args_a[9:], args_b[:6] + args_b[9:])))


@triton.jit
def _probe_kernel(OUT, x, SCALE: tl.constexpr, FLAG: tl.constexpr = False):
    """``cached_launches``' stand-in for calls the library's launch sites never make: a constexpr float given
    positionally, a runtime scalar given by keyword."""
    v = x * SCALE
    if FLAG:
        v = v + 1.0
    tl.store(OUT, v)


@contextlib.contextmanager
def _launch_hook_set():
    """A launch-enter hook set inside the block, where this triton keeps it: ``triton.knobs.runtime`` (3.4+; 3.5+
    holds a chain to add to) or ``CompiledKernel``'s class attribute (3.3)."""
    from triton.compiler.compiler import CompiledKernel

    from . import _launcher
    hook = lambda metadata: None  # noqa: E731
    owner = _launcher._RUNTIME if _launcher._RUNTIME is not None else CompiledKernel
    before = owner.launch_enter_hook
    if hasattr(before, "add"):
        before.add(hook)
    else:
        owner.launch_enter_hook = hook
    try:
        yield
    finally:
        if hasattr(before, "remove"):
            before.remove(hook)
        else:
            owner.launch_enter_hook = before


@contextlib.contextmanager
def _triton_debug_on():
    """Triton's debug switch on inside the block: ``triton.knobs.runtime.debug`` (3.4+) or ``TRITON_DEBUG=1`` (3.3)."""
    from . import _launcher
    runtime = _launcher._RUNTIME
    if runtime is not None:
        before, runtime.debug = runtime.debug, True
    else:
        before, os.environ["TRITON_DEBUG"] = os.environ.get("TRITON_DEBUG"), "1"
    try:
        yield
    finally:
        if runtime is not None:
            runtime.debug = before
        elif before is None:
            del os.environ["TRITON_DEBUG"]
        else:
            os.environ["TRITON_DEBUG"] = before


def cached_launches() -> dict:
    """``_launcher.launch`` against Triton's own launch, both driven up to the driver as on an H100
    (``jit_without_gpu(launches=...)``), on calls whose specializations differ (a misaligned query view, fp32
    queries, two query tokens, int64 indices, a forced split, ``write_cache``). Each call is first launched the
    plain way (``_launcher.ENABLED`` off); then, cached, three times over in alternating order: the first pass fills
    the cache through Triton (a call whose ints differ from an earlier one's only in value, not in class, already
    hits its entry), the next two must not call Triton's ``run`` at all. The ``fallback-`` cases are calls whose key
    cannot stand for what Triton binds (a constexpr float given positionally, a runtime scalar by keyword, 0.0
    then -0.0): they must go through Triton's run every time. So must every call with a launch hook set or Triton's
    debug knob on. Returns {"hits": launches that took the cached path in the last two passes, case: "same" or
    what differed}."""
    from triton.runtime.jit import JITFunction

    from . import _launcher, decode, decode_tma
    from .cache import write_cache
    from .decode_tma import tma_config

    if not _launcher.SUPPORTED:  # every launch goes through Triton's run: nothing to compare
        return {"hits": 0, "skipped": f"no cached launch with triton {triton.__version__} (_launcher.SUPPORTED)"}
    from .norm import DeepseekRMSNorm, rms_norm
    from .norm_rope import norm_and_rope
    from .prefill import mla_prefill, mla_prefill_attention
    from .rope import rope
    from .schedule import mla_decode_metadata

    gen = torch.Generator().manual_seed(0)
    batch, page, ctx = 2, 64, 300
    blocks = batch * 5
    buf = torch.randn(blocks, page, 576, generator=gen).to(torch.bfloat16)
    kv, pe = buf[..., :512], buf[..., 512:]
    table = torch.arange(blocks, dtype=torch.int32).view(batch, -1)
    seqlens = torch.tensor([ctx, ctx - 150], dtype=torch.int32)
    q = torch.randn(batch * 2 * 16 * 576 + 8, generator=gen).to(torch.bfloat16)
    aligned = q[:batch * 16 * 576].view(batch, 1, 16, 576)
    misaligned = q[1:1 + batch * 16 * 576].view(batch, 1, 16, 576)  # 2 bytes off: no 16-byte alignment
    two = q[:batch * 2 * 16 * 576].view(batch, 2, 16, 576)
    new_kv = torch.randn(3, 576, generator=gen).to(torch.bfloat16)
    cu = torch.tensor([0, 10, 16], dtype=torch.int32)  # 10 and 6 new tokens, the last of each sequence's cache
    q_raw = torch.randn(16, 16, 192, generator=gen).to(torch.bfloat16)
    q_pf = torch.randn(16, 16, 576, generator=gen).to(torch.bfloat16)
    w_kv_b = torch.randn(16 * 256, 512, generator=gen).to(torch.bfloat16)
    cos, sin = torch.randn(2, 1, 1, 64, generator=gen).to(torch.bfloat16).unbind(0)  # [1, 64] each, shared by the batch
    latent_norm = DeepseekRMSNorm(512, dtype=torch.bfloat16).requires_grad_(False)

    def decode_call(qs, splits=None, index_dtype=torch.int32, cache=buf, causal=True):
        return lambda: decode.mla_decode(qs[..., :512], qs[..., 512:], cache[..., :512], cache[..., 512:],
                                         table.to(index_dtype), seqlens.to(index_dtype), 0.1, causal,
                                         num_splits=splits)
    def tma_call(qs, splits=1):  # decode._launch with the TMA kernel's tiles, dispatched to it as on an H100
        def run():
            with _dispatched_to("tma"):
                decode._launch(qs[..., :512], qs[..., 512:], kv, pe, table, seqlens, None, 0.1, True, False,
                               batch=batch, seq_q=1, total_tokens=batch, max_seqlen_q=1, max_seqlen_k=ctx,
                               num_splits=splits, config=tma_config(16))
        return run
    cases = {"decode": decode_call(aligned), "decode-misaligned-q": decode_call(misaligned),
             "decode-not-causal": decode_call(aligned, causal=False),  # a constexpr apart, every argument alike
             "decode-8-heads": decode_call(aligned[:, :, :8]),  # an int apart (heads: not a multiple of 16), same tiles
             "decode-fp32": decode_call(aligned.float(), cache=buf.float()), "decode-two-tokens": decode_call(two),
             "decode-int64": decode_call(aligned, index_dtype=torch.int64), "decode-split3": decode_call(aligned, 3),
             "decode-tma": tma_call(aligned), "decode-tma-split2": tma_call(aligned, 2),  # host TMA descriptors
             # a schedule built afresh for every call, as every decode step builds one: its tables are new tensors
             "decode-scheduled": lambda: decode.mla_decode(
                 aligned[..., :512], aligned[..., 512:], kv, pe, table, seqlens, 0.1,
                 metadata=mla_decode_metadata(seqlens, 16, 1, kv_lora_rank=512)),
             # prefill, both paths (the absorbed one runs the decode kernels in ragged-rows mode)
             "prefill-absorbed": lambda: mla_prefill(q_pf[..., :512], q_pf[..., 512:], kv, pe, table, cu, seqlens, 0.1),
             "prefill-expanded": lambda: mla_prefill_attention(q_raw[..., :128], q_raw[..., 128:], kv, pe, table, cu,
                                                               seqlens, w_kv_b, 0.1, path="expanded"),
             "write_cache": lambda: write_cache(new_kv[:, :512], new_kv[:, 512:], kv, pe,
                                                torch.tensor([5, 64, 600])),
             # another token count of the same class (not 1, not a multiple of 16): the first's entry serves it
             "write_cache-2-tokens": lambda: write_cache(new_kv[:2, :512], new_kv[:2, 512:], kv, pe,
                                                         torch.tensor([7, 65])),
             # the drop-in's rope of the query (tables shared over the batch: stride 0) and of the key
             "rope-query": lambda: rope(aligned[..., 512:], cos[:, None], sin[:, None], "interleave"),
             "rope-key": lambda: rope(new_kv[:, None, 512:], cos[:1].expand(3, -1, -1), sin[:1].expand(3, -1, -1),
                                      "interleave"),
             # the drop-in's latent norm: rows of a view of the latent projection (kv_c)
             "rms_norm-latent": lambda: rms_norm(latent_norm, new_kv[:, :512]),
             # the attention's latent norm and both ropes in one launch (a decode step of 2: 39 arguments)
             "norm_and_rope": lambda: norm_and_rope(latent_norm, buf[0, :2, :512], aligned[..., 512:],
                                                    buf[0, :2, None, 512:], cos, sin, "interleave")}
    if decode_tma.TensorDescriptor is None:  # a triton without host descriptors never dispatches to the TMA kernel
        del cases["decode-tma"], cases["decode-tma-split2"]
    probe_out = torch.zeros(4)

    def probe(*args, **kwargs):
        return lambda: _launcher.launch(_probe_kernel, (1,), probe_out, *args, **kwargs)
    # keyword constexprs equal in value, of other types: one kernel from triton 3.5 on, two before (as Triton keys)
    cases.update({"probe-flag-1": probe(3.0, SCALE=2.0, FLAG=1), "probe-flag-True": probe(3.0, SCALE=2.0, FLAG=True),
                  "probe-scale-1": probe(3.0, SCALE=1), "probe-scale-1.0": probe(3.0, SCALE=1.0),
                  "probe-scale-np0.0": probe(3.0, SCALE=np.float64(0.0)),
                  "probe-scale-np-0.0": probe(3.0, SCALE=np.float64(-0.0))})
    cases.update({"fallback-constexpr-float-0.5": probe(3.0, 0.5), "fallback-constexpr-float-0.25": probe(3.0, 0.25),
                  "fallback-keyword-x-0.0": probe(x=0.0, SCALE=2.0), "fallback-keyword-x--0.0": probe(x=-0.0, SCALE=2.0),
                  "fallback-keyword-x-1.0": probe(x=1.0, SCALE=2.0), "fallback-keyword-x-1": probe(x=1, SCALE=2.0)})

    from . import _utils
    use_triton, run = _utils.use_triton, JITFunction.run
    _utils.use_triton = lambda t: True
    triton_runs = []

    def counted(self, *args, **kwargs):
        triton_runs.append(self)
        return run(self, *args, **kwargs)
    report, hits = {}, 0
    try:
        launches = []
        with jit_without_gpu(launches=launches), _launcher.switched(True):
            JITFunction.run = counted
            plain = {}
            with _launcher.switched(False):
                for name, call in cases.items():
                    call()
                    plain[name], launches[:] = list(launches), []
            _launcher.clear()
            for sweep in range(3):
                for name in (list(cases) if sweep != 1 else list(cases)[::-1]):
                    triton_runs.clear()
                    cases[name]()
                    got, launches[:] = list(launches), []
                    if name.startswith("fallback-") and len(triton_runs) != len(got):
                        report.setdefault(name, f"pass {sweep}: launched from the cache, not through Triton's run")
                    elif sweep and triton_runs and not name.startswith("fallback-"):
                        report.setdefault(name, f"pass {sweep}: Triton's run called ({len(triton_runs)}x): not cached")
                    elif len(got) != len(plain[name]) or not all(map(_same_launch, got, plain[name])):
                        report.setdefault(name, f"pass {sweep}: the launches differ from Triton's own")
                    elif not name.startswith("fallback-"):
                        hits += len(got) if sweep else 0
                report.update({name: "same" for name in cases if name not in report} if sweep == 2 else {})
            def all_through_triton(what):
                for name, call in cases.items():
                    triton_runs.clear()
                    call()
                    if len(triton_runs) != len(launches):
                        report[name] = f"with {what}: a launch did not go through Triton's run"
                    launches[:] = []

            with _launch_hook_set():  # a profiler's: every launch through Triton's run, which builds its metadata
                all_through_triton("a launch hook set")
            with _triton_debug_on():  # Triton compiles other kernels with its debug knob on (device-side asserts)
                all_through_triton("Triton's debug knob on")
    finally:
        JITFunction.run, _utils.use_triton = run, use_triton
        _launcher.clear()
    return {"hits": hits, **report}


def jit_shapes(target: str = "sm90") -> dict:
    """The public calls at the shapes whose tiles differ (``decode_tiles`` and ``_expanded_config`` pick by rows,
    widths and element size) through Triton's JIT for an H100 (``jit_without_gpu``): head counts and S_q whose rows
    are not powers of two, pages of 1 and 256 (the latter splits, so the combine runs), widths from 16 to 1024, fp16
    and fp32, an fp8 cache with the schedule, a sparse list on pages of 1, the three prefill paths and the cache
    write. A launch that fails to compile or needs more shared memory than the GPU has fails here, not on a GPU.
    ``target``: "sm90" (an H100), or an ``OTHER_NVIDIA`` GPU, for which the tiles are fitted to its shared memory
    and an fp8 cache is given as its bits where Triton has no e4m3 type (before sm_89). Returns what
    ``jit_launches`` does."""
    from . import _utils
    from .cache import fp8_latent_cache, write_cache
    from .decode import mla_decode
    from .norm import DeepseekRMSNorm, rms_norm
    from .norm_rope import norm_and_rope
    from .prefill import mla_prefill, mla_prefill_attention
    from .rope import rope
    from .schedule import mla_decode_metadata

    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=gen).to(dtype)

    def cache(page, ctx, rows, d_latent, d_rope, dtype, fp8):
        blocks = rows * _utils.cdiv(ctx, page)
        table = torch.arange(blocks, dtype=torch.int32).view(rows, -1)
        if fp8:
            kv, scale, pe = fp8_latent_cache(blocks, page, d_latent, d_rope, rope_dtype=dtype)
            return kv, pe, scale, table
        buf = rnd(blocks, page, d_latent + d_rope, dtype=dtype)  # views of one buffer, as the cache holds them
        return buf[..., :d_latent], buf[..., d_latent:], None, table

    def decode(heads, s_q, page, dtype=torch.bfloat16, d_latent=512, d_rope=64, fp8=False, scheduled=False,
               sparse=0, split_tokens=None):
        kv, pe, scale, table = cache(page, 300, 3, d_latent, d_rope, dtype, fp8)
        seqlens = torch.tensor([300, 100, 9], dtype=torch.int32)
        kw = dict(kv_scale=scale, split_tokens=split_tokens)
        if sparse:
            kw["indices"] = torch.randint(0, 9 - s_q + 1, (3, s_q, sparse), generator=gen, dtype=torch.int32)
        q_nope, q_pe = rnd(3, s_q, heads, d_latent, dtype=dtype), rnd(3, s_q, heads, d_rope, dtype=dtype)

        def call():  # (the schedule built in the run, whose target's shared memory sizes the tiles it is cut along)
            meta = mla_decode_metadata(seqlens, heads, s_q, kv_lora_rank=d_latent, rope_dim=d_rope,
                                       cache_dtype=kv.dtype) if scheduled else None
            return mla_decode(q_nope, q_pe, kv, pe, table, seqlens, 0.1, metadata=meta, **kw)
        return call

    def prefill(heads, page, path, dtype=torch.bfloat16, fp8=False, split_tokens=None, d_rope=64):
        kv, pe, scale, table = cache(page, 100, 2, 512, d_rope, dtype, fp8)
        seqlens, cu = torch.tensor([70, 33], dtype=torch.int32), torch.tensor([0, 20, 53], dtype=torch.int32)
        q_pe = rnd(53, heads, d_rope, dtype=dtype)
        if path == "latent":
            q_nope = rnd(53, heads, 512, dtype=dtype)
            return lambda: mla_prefill(q_nope, q_pe, kv, pe, table, cu, seqlens, 0.1, kv_scale=scale,
                                       split_tokens=split_tokens)
        q_nope, w_kv_b = rnd(53, heads, 128, dtype=dtype), rnd(heads * 256, 512, dtype=dtype)
        return lambda: mla_prefill_attention(q_nope, q_pe, kv, pe, table, cu, seqlens, w_kv_b, 0.1, path=path,
                                             kv_scale=scale)

    def write(fp8, d_rope=64):
        kv, pe, scale, _ = cache(16, 64, 1, 512, d_rope, torch.bfloat16, fp8)
        kv_c, k_pe, slots = rnd(9, 512), rnd(9, d_rope), torch.arange(9, dtype=torch.int64)
        return lambda: write_cache(kv_c, k_pe, kv, pe, slots, kv_scale=scale)

    cases = {f"decode-h{h}-s{s}": decode(h, s, 64) for h, s in ((1, 1), (3, 2), (5, 4), (20, 1), (100, 2), (128, 8))}
    cases.update({f"decode-h{h}-page{p}": decode(h, 1, p) for h in (1, 128) for p in (1, 256)})
    cases.update({f"decode-h{h}-{str(d).replace('torch.', '')}": decode(h, 2, 16, dtype=d)
                  for h in (1, 16, 128) for d in (torch.float16, torch.float32)})
    cases.update({f"decode-h{h}-r{r}-p{p}": decode(h, s, 16, d_latent=r, d_rope=p)
                  for h, s in ((16, 1), (128, 4)) for r, p in ((16, 16), (128, 32), (1024, 64), (512, 128))})
    cases.update({f"decode-h{h}-fp8-scheduled": decode(h, 2, 64, fp8=True, scheduled=True) for h in (1, 16, 128)})
    cases["decode-h16-fp8-fp16"] = decode(16, 1, 16, dtype=torch.float16, fp8=True)
    cases.update({f"decode-h{h}-sparse-page1": decode(h, 2, 1, sparse=64) for h in (1, 128)})
    cases.update({f"decode-h{h}-split-tokens{n}": decode(h, 1, 16, split_tokens=n) for h in (1, 128) for n in (1, 4096)})
    cases.update({f"prefill-{path}-h{h}-page{p}": prefill(h, p, path)
                  for path in ("latent", "absorbed", "expanded") for h in (1, 128) for p in (1, 64)})
    # batch-invariant prefill: a one-token decode's tiles in ragged-rows mode, split (16 x 32 at 16 heads)
    cases.update({f"prefill-latent-h{h}-split-tokens64": prefill(h, 16, "latent", split_tokens=64) for h in (16, 128)})
    cases["prefill-expanded-h16-fp8"] = prefill(16, 16, "expanded", fp8=True)
    cases["prefill-expanded-h16-float32"] = prefill(16, 16, "expanded", dtype=torch.float32)
    cases.update({f"write-{name}": write(fp8) for name, fp8 in (("bf16", False), ("fp8", True))})
    # MLA without a rotary part (P = 0): empty rope tensors, whose pointers the wrappers never hand to a kernel
    cases.update({f"decode-h{h}-s{s}-p0": decode(h, s, 64, d_rope=0) for h, s in ((16, 1), (128, 4))})
    cases["decode-h16-p0-fp8-scheduled"] = decode(16, 2, 64, d_rope=0, fp8=True, scheduled=True)
    cases.update({f"prefill-{path}-h16-p0": prefill(16, 16, path, d_rope=0) for path in ("latent", "expanded")})
    cases.update({f"write-{name}-p0": write(fp8, d_rope=0) for name, fp8 in (("bf16", False), ("fp8", True))})
    # GLM-5.3-Flash's decode step: 64 heads, no rope part, key lists of its pooled picks (top 2048 and a 15-key tail)
    cases.update({f"decode-h64-p0-sparse2063-{name}": decode(64, 1, 64, d_rope=0, sparse=2063, fp8=fp8)
                  for name, fp8 in (("bf16", False), ("fp8", True))})

    def rotate(style, heads, dtype):  # the drop-in's rope of the query (heads > 0) or the key, one decode step
        shape = (4, 1, heads, 64) if heads else (4, 1, 64)
        x, cos, sin = rnd(*shape, dtype=dtype), rnd(4, 1, 64, dtype=dtype), rnd(4, 1, 64, dtype=dtype)
        if heads:
            cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        return lambda: rope(x, cos, sin, style)
    cases.update({f"rope-{style}-h{h}-{str(d).replace('torch.', '')}": rotate(style, h, d)
                  for style in ("half", "interleave", "pairs") for h, d in ((128, torch.bfloat16), (0, torch.float32))})

    def normalize(width, rows, dtype, weight_dtype):  # the drop-in's norms: the query's 1536, the latent's 512 (a view)
        norm = DeepseekRMSNorm(width, dtype=weight_dtype).requires_grad_(False)
        x = rnd(rows, width + 64, dtype=dtype)[:, :width]
        return lambda: rms_norm(norm, x)
    cases.update({f"rms_norm-{w}-rows{r}-{str(d).replace('torch.', '')}": normalize(w, r, d, wd)
                  for w, r, d, wd in ((512, 1, torch.bfloat16, torch.bfloat16), (1536, 16, torch.bfloat16, torch.bfloat16),
                                      (512, 300, torch.bfloat16, torch.float32), (512, 4, torch.float32, torch.float32))})

    def norm_rope(rows, heads, dtype):  # the attention's latent norm and both ropes: a decode step, a prompt
        norm = DeepseekRMSNorm(512, dtype=dtype).requires_grad_(False)
        kv, q = rnd(rows, 576, dtype=dtype), rnd(rows, heads, 192, dtype=dtype)
        cos, sin = rnd(rows, 64, dtype=dtype), rnd(rows, 64, dtype=dtype)
        return lambda: norm_and_rope(norm, kv[:, :512], q[..., 128:], kv[:, 512:], cos, sin, "interleave")
    cases.update({f"norm_and_rope-rows{r}-h{h}-{str(d).replace('torch.', '')}": norm_rope(r, h, d)
                  for r, h, d in ((1, 128, torch.bfloat16), (300, 16, torch.bfloat16), (4, 128, torch.float32))})
    return _jit_run(cases, target)


def _jit_run(cases: dict, target: str = "sm90") -> dict:
    """Run each case (a call of a public wrapper) under ``jit_without_gpu``: {case: [{kernel, shared_bytes, wgmma,
    tma}, ...] in launch order, or {"error": ...}}."""
    from . import _utils
    results = {}
    use_triton, limit, fp8_bits = _utils.use_triton, _utils.shared_memory_limit, _utils.fp8_bits
    _utils.use_triton = lambda t: True  # CPU tensors take the kernels' path, as GPU tensors do
    if target in OTHER_NVIDIA:  # tiles fitted to that GPU's shared memory, as a launch there fits them
        gpu, shared = OTHER_NVIDIA[target]
        _utils.shared_memory_limit = lambda device: shared
        if gpu.arch < 89:  # an fp8 cache as its bits, as _utils.fp8_bits gives it to the kernels there
            _utils.fp8_bits = _utils.fp8_as_bits
    try:
        for name, run in cases.items():
            try:
                with jit_without_gpu(target) as compiled:
                    run()
                results[name] = [{"kernel": k.name, "shared_bytes": k.metadata.shared, "wgmma": "wgmma" in k.asm["ptx"],
                                  "tma": "cp.async.bulk.tensor" in k.asm["ptx"]} for k in compiled]
            except Exception as exc:  # reported per case
                results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
    finally:
        _utils.use_triton, _utils.shared_memory_limit, _utils.fp8_bits = use_triton, limit, fp8_bits
    return results


def main() -> None:
    """Compile in a process of its own: triton must be imported *without* TRITON_INTERPRET, since the
    interpreter replaces every @triton.jit helper of triton.language and the real compiler then fails.
    ``--jit``: the launch wrappers through Triton's JIT instead (``jit_launches``); ``--jit-shapes``: the public
    calls at many shapes, the same way (``jit_shapes``)."""
    import json
    import sys

    flags = sys.argv[1:]
    if "-h" in flags or "--help" in flags:  # (it ran the 20-second report instead)
        print(f"usage: python -m mla_kernels._compile [--jit | --jit-shapes [--target T] | --cached-launches]\n\n"
              f"Without a flag: the compile report of every kernel for {', '.join(TARGETS)} (registers, spills, "
              f"shared memory), as JSON.\n{main.__doc__}")
        return
    unknown = [f for i, f in enumerate(flags) if f not in ("--jit", "--jit-shapes", "--cached-launches", "--target")
               and not (i > 0 and flags[i - 1] == "--target")]
    if unknown:
        sys.exit(f"unknown arguments {unknown}: python -m mla_kernels._compile --help lists the flags")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run without TRITON_INTERPRET: the interpreter's jit wrappers cannot be compiled")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    target = "sm90"
    if "--target" in flags:  # only --jit-shapes takes a target: refuse it elsewhere, and unknown ones, before any work
        i = flags.index("--target")
        target = flags[i + 1] if i + 1 < len(flags) else ""
        known = ("sm90", *OTHER_NVIDIA)
        if "--jit-shapes" not in flags or "--jit" in flags or target not in known:
            sys.exit(f"--target is taken with --jit-shapes only, one of {', '.join(known)} (got {target!r}); the "
                     f"default report compiles {', '.join(TARGETS)}, --jit the launch wrappers for sm90")
    report = (jit_launches() if "--jit" in flags else jit_shapes(target) if "--jit-shapes" in flags
              else cached_launches() if "--cached-launches" in flags else compile_all())
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
