"""Randomized continuous-batching simulation (tests/test_serving_loop.py runs it; ``python tests/serving_sim.py
FIRST_SEED END_SEED [CONFIGS]`` runs more seeds) over PagedLatentCache + LatentBatch + MLAttention.attend
and direct mla_decode calls (metadata, split_tokens, padding slots), vs a float64 side history."""
import os
import random
import sys
import traceback

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # helpers, bounds
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # reference

import torch  # noqa: E402

from mla_kernels import _utils, mla_decode, mla_decode_metadata  # noqa: E402
from mla_kernels.cache import CacheFullError, PagedLatentCache  # noqa: E402
from mla_kernels.module import LatentBatch, MLAttention  # noqa: E402
from mla_kernels.integrations.flash_mla import flash_mla_with_kvcache, get_mla_metadata  # noqa: E402
from mla_kernels.reference.naive import naive_mla  # noqa: E402
from mla_kernels.reference.absorbed import absorbed_decode  # noqa: E402
from mla_kernels.reference.quant import quantize_fp8, dequantize_fp8  # noqa: E402
import helpers  # noqa: E402

LAYERS = 2
MODES = ["plain", "meta", "split", "splits", "flash_new", "flash_old", "sparse", "sparse_split"]
MAXK = 5


def state(cache):
    return ({s: (list(cache._seqs[s].blocks), cache._seqs[s].length) for s in cache._seqs},
            list(cache._free), list(cache._refs), [b.clone() for b in cache._buffers])


def same_state(a, b):
    return a[0] == b[0] and a[1] == b[1] and a[2] == b[2] and all(torch.equal(x, y) for x, y in zip(a[3], b[3]))


def check_invariants(cache, hist, dtype):
    holders = [0] * cache.num_blocks
    for s, seq in cache._seqs.items():
        assert len(seq.blocks) == -(-seq.length // cache.block_size), (s, seq.blocks, seq.length)
        for b in seq.blocks:
            holders[b] += 1
        if seq.length % cache.block_size:
            assert cache._refs[seq.blocks[-1]] == 1, f"partial tail of {s} shared"
    assert holders == cache._refs, (holders, cache._refs)
    assert sorted(cache._free) == [b for b in range(cache.num_blocks) if holders[b] == 0]
    assert set(hist) == set(cache._seqs), (set(hist), set(cache._seqs))
    for s in cache._seqs:
        for layer in range(LAYERS):
            kv, pe = cache.read(layer, s)
            hkv = torch.stack(hist[s][layer][0]) if hist[s][layer][0] else torch.zeros(0, cache.kv_lora_rank)
            hkv = as_read(hkv, cache.dtype == torch.float8_e4m3fn, cache.rope_dtype)
            hpe = torch.stack(hist[s][layer][1]) if hist[s][layer][1] else torch.zeros(0, cache.rope_dim)
            assert kv.shape[0] == hkv.shape[0] == cache.seqlen(s)
            assert torch.equal(kv.double(), hkv), f"latent of seq {s} layer {layer} differs"
            assert torch.equal(pe.double(), hpe), f"rope of seq {s} layer {layer} differs"


def stored(kv_c, fp8):
    """The latent the cache holds, float64: for an fp8 cache its exact dequantized value (e4m3 x fp32 scale)."""
    if fp8:
        q, sc = quantize_fp8(kv_c)
        return dequantize_fp8(q, sc, torch.float32).double()
    return kv_c.double()


def as_read(kv, fp8, rope_dtype):
    """What ``cache.read`` gives for ``stored`` values: an fp8 cache's dequantized to its rope dtype (rounded)."""
    return kv.float().to(rope_dtype).double() if fp8 else kv


def as_attended(kv, fp8, rope_dtype):
    """What the kernels attend over: an fp8 cache's latent dequantized to the query's dtype, rounded to nearest by
    the PyTorch path, a GPU and the interpreter (the kernels' ``_convert.to_dtype``; the interpreter's own bf16 cast
    truncated, and this modelled it until the kernels stopped using that cast)."""
    return as_read(kv, fp8, rope_dtype)


def run(seed, dtype=torch.float32, block_size=3, R=32, P=16, H=2, D=16, steps=30, num_blocks=14, verbose=False):
    global MAXK
    MAXK = 8 if H == 4 else 5
    rng = random.Random(seed)
    torch.manual_seed(seed)
    fp8 = dtype == torch.float8_e4m3fn
    mdtype = torch.bfloat16 if fp8 else dtype
    HID = 32
    m = MLAttention(HID, H, R, D, P, D).eval().requires_grad_(False).to(mdtype)
    cache = PagedLatentCache(LAYERS, num_blocks, block_size, R, P, dtype=dtype,
                             **({"rope_dtype": torch.bfloat16} if fp8 else {}))
    w = m.kv_b_proj.weight.double()
    hist = {}
    tol_dtype = torch.float32 if dtype == torch.float32 else torch.bfloat16
    # direct mla_decode calls: helpers' bounds for the dtype computed in (their reasons are there). attend (the
    # module) is compared with naive MLA from the unabsorbed query: three more bf16 roundings than the kernel's
    # budget covers (the absorbed query, the value projection's output, and on the expanded prefill path the
    # expanded K/V), each ~2.3e-3 relative RMS (helpers), added linearly as FP8_RMS_TOL adds its one: 8e-3 + 6.9e-3.
    # fp32 rounds nowhere worth the name: its bound stays.
    rms = cos = None
    attend_rms = helpers.RMS_TOL[tol_dtype] + (3 * 2.3e-3 if tol_dtype == torch.bfloat16 else 0.0)
    log = []

    def attend_step(seq_ids, counts):
        before = state(cache)
        try:
            batch = LatentBatch.reserve(cache, seq_ids, counts)
        except CacheFullError:
            assert same_state(before, state(cache)), "CacheFullError changed state"
            log.append(("full", seq_ids, counts))
            return False
        log.append(("step", list(seq_ids), list(counts)))
        if rng.random() < 0.1:  # a failed step: cancel
            batch.cancel()
            log.append(("cancel",))
            return True
        T = sum(counts)
        sparse = rng.random() < 0.2
        if sparse:
            K = rng.randint(0, 6)
            pos = batch.positions.tolist()
            rows = []
            for p_ in pos:
                cand = list(range(-1, p_ + 3))
                pick = rng.sample(cand, min(K, len(cand)))
                rows.append(pick + [-1] * (K - len(pick)))
            indices = torch.tensor(rows, dtype=torch.int32).view(T, K)
            log.append(("sparse", K))
        for layer in range(LAYERS):
            q_nope = torch.randn(T, H, D).to(mdtype)
            q_pe = torch.randn(T, H, P).to(mdtype)
            kv_c = torch.randn(T, R).to(mdtype)
            k_pe = torch.randn(T, P).to(mdtype)
            out = m.attend(q_nope, q_pe, kv_c, k_pe, batch, layer=layer, indices=indices if sparse else None)
            t = 0
            for s, n in zip(seq_ids, counts):
                for i in range(n):
                    hist[s][layer][0].append(stored(kv_c[t + i], fp8))
                    hist[s][layer][1].append(k_pe[t + i].double())
                t += n
            t = 0
            for s, n in zip(seq_ids, counts):
                if n:
                    kv = as_attended(torch.stack(hist[s][layer][0]), fp8, mdtype)
                    pe = torch.stack(hist[s][layer][1])
                    if sparse:
                        refs = []
                        L = kv.shape[0]
                        for i in range(n):
                            p_ = L - n + i
                            keep = sorted(set(j for j in indices[t + i].tolist() if 0 <= j <= p_))
                            if not keep:
                                refs.append(torch.zeros(1, H, D, dtype=torch.float64))
                                continue
                            r_, _ = naive_mla(q_nope[t + i:t + i + 1].double(), q_pe[t + i:t + i + 1].double(),
                                              kv[keep], pe[keep], w, m.softmax_scale, causal=False)
                            refs.append(r_)
                        ref = torch.cat(refs)
                    else:
                        ref, _ = naive_mla(q_nope[t:t + n].double(), q_pe[t:t + n].double(), kv, pe, w,
                                           m.softmax_scale, causal=True)
                    bound = helpers.rms_tol_for(tol_dtype, ref.numel(), attend_rms)
                    helpers.assert_close(f"attend seq {s} layer {layer} (step {len(log)})", out[t:t + n], ref,
                                         tol_dtype, bound, bound ** 2)
                t += n
        return True

    def direct_decode(seq_ids, s_q, pads, mode):
        """mla_decode over existing cache: the last s_q tokens of each seq as queries; padding rows."""
        rows = list(seq_ids)
        for _ in range(pads):
            rows.insert(rng.randrange(len(rows) + 1), None)
        B = len(rows)
        real = [s for s in rows if s is not None]
        table_real = cache.block_table(real, pad_id=helpers.SENTINEL_BLOCK)
        width = table_real.shape[1] + rng.randrange(2)
        table = torch.full((B, width), helpers.SENTINEL_BLOCK, dtype=torch.int32)
        lens = torch.zeros(B, dtype=torch.int32)
        j = 0
        for b, s in enumerate(rows):
            if s is not None:
                table[b, :table_real.shape[1]] = table_real[j]
                lens[b] = cache.seqlen(s)
                j += 1
        wdt = mdtype
        meta = None
        kw = {}
        if mode == "meta":
            meta = mla_decode_metadata(lens, H, s_q, kv_lora_rank=R, rope_dim=P, dtype=wdt,
                                       cache_dtype=torch.float8_e4m3fn if fp8 else None,
                                       num_programs=rng.choice([None, 1, 2, 3, 5]))
            kw["metadata"] = meta
        elif mode == "split":
            kw["split_tokens"] = rng.choice([1, 4, 16, 32])
            kw["max_seqlen_k"] = int(lens.max())
        elif mode == "splits":
            kw["num_splits"] = rng.choice([1, 2, 3, 7])
        sp_idx = None
        if mode.startswith("sparse"):
            K = rng.randint(0, 7)
            sp = torch.full((B, s_q, K), -1, dtype=torch.int32)
            for b, sid in enumerate(rows):
                if sid is None:
                    continue
                L = cache.seqlen(sid)
                for i in range(s_q):
                    pick = rng.sample(range(-1, L), min(K, L + 1))
                    sp[b, i, :len(pick)] = torch.tensor(pick, dtype=torch.int32)
            sp_idx = sp
            kw["indices"] = sp
            if mode == "sparse_split":
                kw["split_tokens"] = rng.choice([1, 2, 16])
            if rng.random() < 0.5:
                kw["max_seqlen_k"] = int(lens.max())
        fmeta = None
        if mode == "flash_new":
            fmeta, _ = get_mla_metadata()
        elif mode == "flash_old":
            fmeta, fsplits = get_mla_metadata(lens, s_q * H, 1, is_fp8_kvcache=fp8)
            if rng.random() < 0.5:  # a CUDA-graph style buffer of a larger batch, refreshed in place
                big = torch.cat([lens, torch.randint(0, 30, (rng.randint(0, 3),), dtype=torch.int32)])
                buf, _ = get_mla_metadata(big, s_q * H, 1, is_fp8_kvcache=fp8)
                fmeta = buf.copy_(fmeta)
        for layer in range(LAYERS):  # one metadata, reused for each layer
            kv_cache, pe_cache, kv_scale = cache.views(layer)
            q_nope = torch.randn(B, s_q, H, R).to(wdt)
            q_pe = torch.randn(B, s_q, H, P).to(wdt)
            if mode.startswith("flash"):
                q = torch.cat([q_nope, q_pe], -1)
                kc = cache.buffer(layer).unsqueeze(2)
                out, lse = flash_mla_with_kvcache(q, kc, table, lens, R, fmeta, None, m.softmax_scale, causal=True,
                                                  is_fp8_kvcache=fp8)
                lse = lse.transpose(1, 2)
                lse = torch.where(lse == float("inf"), -float("inf"), lse)
            else:
                out, lse = mla_decode(q_nope, q_pe, kv_cache, pe_cache, table, lens, m.softmax_scale, causal=True,
                                      return_lse=True, kv_scale=kv_scale, **kw)
            for b, s in enumerate(rows):
                if s is None:
                    assert torch.all(out[b] == 0) and torch.all(lse[b] == -float("inf")), "padding row not zero"
                    continue
                kv = as_attended(torch.stack(hist[s][layer][0]), fp8, mdtype)
                pe = torch.stack(hist[s][layer][1])
                L = kv.shape[0]
                scores = torch.einsum("qhr,lr->hql", q_nope[b].double(), kv) + \
                    torch.einsum("qhp,lp->hql", q_pe[b].double(), pe)
                scores = scores * m.softmax_scale
                qpos = torch.arange(s_q) + L - s_q
                vis = torch.arange(L)[None, :] <= qpos[:, None]
                if sp_idx is not None:
                    listed = torch.zeros(s_q, L, dtype=torch.bool)
                    for i in range(s_q):
                        for j in sp_idx[b, i].tolist():
                            if j >= 0:
                                listed[i, j] = True
                    vis = vis & listed
                scores = scores.masked_fill(~vis, float("-inf"))
                ref_lse = torch.logsumexp(scores, -1)
                probs = torch.where(torch.isneginf(ref_lse)[..., None], 0.0, torch.exp(scores - ref_lse[..., None]))
                ref = torch.einsum("hql,lr->qhr", probs, kv)
                helpers.assert_close(f"direct {mode} row {b} seq {s} layer {layer} (step {len(log)})", out[b], ref,
                                     tol_dtype, rms, cos)
                helpers.assert_lse_close(f"lse {mode} row {b}", lse[b], ref_lse.transpose(0, 1),
                                         atol=helpers.LSE_ATOL)
        log.append(("direct", mode, s_q, rows))

    def truncate(s, new):
        """Cut sequence s to ``new`` tokens, and its history with it; a refusal (CacheFullError: a shared tail block
        to copy and no free block) must change nothing."""
        before = state(cache)
        try:
            cache.truncate(s, new)
        except CacheFullError:
            assert same_state(before, state(cache)), "CacheFullError on truncate changed state"
            return
        for layer in range(LAYERS):
            del hist[s][layer][0][new:]
            del hist[s][layer][1][new:]
        log.append(("truncate", s, new))

    for step in range(steps):
        live = list(cache._seqs)
        ev = rng.choices(["add", "decode", "spec", "mixed", "fork", "free", "truncate", "direct"],
                         [3, 4, 3, 3, 2, 2, 2, 3])[0]
        if len(live) == 0:
            ev = "add"
        if ev == "add":
            sid = cache.add_sequence(rng.choice([None, f"s{step}"]))
            hist[sid] = [([], []) for _ in range(LAYERS)]
            log.append(("add", sid))
            n = rng.choice([rng.randint(1, 12), rng.randint(1, 40)])
            if not attend_step([sid], [n]):
                pass
        elif ev in ("decode", "spec"):
            k = 1 if ev == "decode" else rng.randint(2, MAXK)
            seqs = rng.sample(live, rng.randint(1, len(live)))
            attend_step(seqs, [k] * len(seqs))
            if ev == "spec" and rng.random() < 0.7:
                for s in seqs:
                    if s in cache._seqs and rng.random() < 0.7:
                        L = cache.seqlen(s)
                        truncate(s, L - rng.randint(0, min(k, L)))
        elif ev == "mixed":
            seqs = rng.sample(live, rng.randint(1, len(live)))
            counts = [rng.choice([0, 1, 1, 2, 5, 9]) for _ in seqs]
            attend_step(seqs, counts)
        elif ev == "fork":
            s = rng.choice(live)
            before = state(cache)
            try:
                new = cache.fork(s, rng.choice([None, f"f{step}"]))
            except CacheFullError:
                assert same_state(before, state(cache))
                log.append(("forkfull", s))
                continue
            hist[new] = [([*h[0]], [*h[1]]) for h in hist[s]]
            log.append(("fork", s, new))
        elif ev == "free":
            s = rng.choice(live)
            cache.free(s)
            del hist[s]
            log.append(("free", s))
        elif ev == "truncate":
            s = rng.choice(live)
            truncate(s, rng.randint(0, cache.seqlen(s)))
        elif ev == "direct":
            s_q = rng.choice([1, 1, 2, 3, 8])
            ok = [s for s in live if cache.seqlen(s) >= s_q]
            if ok:
                seqs = rng.sample(ok, rng.randint(1, len(ok)))
                direct_decode(seqs, s_q, rng.choice([0, 0, 1, 2]), rng.choice(MODES))
        check_invariants(cache, hist, dtype)
    return log


CONFIGS = [
    dict(dtype=torch.float32, block_size=3), dict(dtype=torch.float32, block_size=1),
    dict(dtype=torch.float32, block_size=16, num_blocks=6), dict(dtype=torch.bfloat16, block_size=3),
    dict(dtype=torch.float8_e4m3fn, block_size=3, R=128, H=1),
    dict(dtype=torch.float32, block_size=16, num_blocks=12, H=4, steps=40),
    dict(dtype=torch.bfloat16, block_size=5, num_blocks=30, H=4, steps=40),
    dict(dtype=torch.float8_e4m3fn, block_size=16, num_blocks=10, R=128, H=4, steps=25),
]


if __name__ == "__main__":
    import itertools
    import bounds

    bounds.install(races=os.environ.get("RACES") == "1")
    seeds = range(int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else range(3)
    which = [int(x) for x in sys.argv[3].split(",")] if len(sys.argv) > 3 else range(len(CONFIGS))
    fails = 0
    for seed, ci in itertools.product(seeds, which):
        try:
            run(seed, **CONFIGS[ci])
            print("ok", seed, ci, flush=True)
        except Exception as e:
            fails += 1
            print("FAIL", seed, ci, type(e).__name__, str(e)[:400], flush=True)
            traceback.print_exc(limit=4)
    print("fails", fails)
