"""What makes the drop-in fast: decode steps that never wait for the GPU, a static latent cache, torch.compile.

On the CPU, "never waits" is shown by trapping every Python-level tensor-to-host conversion (``.item()``,
``.tolist()``, ``bool()``, ``int()``, ``nonzero``) while a patched attention layer runs a decode step; the
kernels' CPU-only value checks (and the interpreter running them) are let through, since a GPU call skips
those. Conversions inside C++ (a boolean-mask index, say) can only be seen on a GPU, by
``torch.cuda.set_sync_debug_mode("error")``: the GPU tests do that, and capture a decode step in a CUDA graph.

torch.compile runs with a recording ``aot_eager`` backend (dynamo with fullgraph=True, AOT functionalization of
the cache writes): inductor's CPU code generation alone takes about 40 s for the tiny model, and what these
tests are about is the graph, not the code generated for it.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest

import torch

from torch.utils._python_dispatch import TorchDispatchMode

from helpers import OLD_TORCH_COMPILE, assert_close, round_trip, with_attention_sinks, with_fp8_kv_b
from mla_kernels import cache as cache_mod, decode as decode_mod, prefill as prefill_mod
from mla_kernels.cache import PagedLatentCache
from mla_kernels.integrations import transformers as integration
from mla_kernels.integrations.transformers import TransformersMLAttention, latent_cache, patch_model, \
    static_latent_cache
from mla_kernels.module import LatentBatch
from mla_kernels.norm import KernelRMSNorm
from mla_kernels.prefill import mla_prefill_attention

transformers = pytest.importorskip("transformers")
from transformers import CompileConfig, DynamicCache  # noqa: E402
from test_transformers import left_padded, tiny_model, widen_attention  # noqa: E402

ON_GPU = torch.cuda.is_available()
NEW = 6
GREEDY = dict(do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW)
PROMPTS = [5, 9, 2]


def dense_model(**kw):
    """The tiny DeepSeek-V3 with every layer dense: expert routing is not what is compiled here."""
    return tiny_model(first_k_dense_replace=2, **kw)


# ---------------------------------------------------------------------------------------------
# no device-to-host conversion in a decode step
# ---------------------------------------------------------------------------------------------

_CONVERSIONS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero")


class ConversionTrap:
    """Arms on each patched attention layer's decode-step call (one new token) and raises on any tensor-to-host
    conversion, except inside the op bodies ``_mla_decode_run`` / ``_write_cache_run``, whose conversions are the
    CPU-only value checks and the interpreter (a GPU call has neither)."""

    def __init__(self, monkeypatch, model):
        self.armed, self.exempt, self.decode_calls = False, 0, 0
        for name in _CONVERSIONS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._guard(name, original))
        monkeypatch.setattr(torch, "nonzero", self._guard("torch.nonzero", torch.nonzero))
        for module, name in ((decode_mod, "_mla_decode_run"), (cache_mod, "_write_cache_run")):
            monkeypatch.setattr(module, name, self._exempt(getattr(module, name)))
        for layer in model.model.layers:
            layer.self_attn.register_forward_pre_hook(self._pre, with_kwargs=True)
            layer.self_attn.register_forward_hook(self._post)

    def _guard(self, name, original):
        trap = self

        def guarded(*args, **kwargs):
            if trap.armed and not trap.exempt:
                trap._read(name)
            return original(*args, **kwargs)
        return guarded

    def _read(self, name):
        raise AssertionError(f"{name} in a decode step: a device-to-host conversion (a GPU sync)")

    def _exempt(self, fn):
        def call(*args, **kwargs):
            self.exempt += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.exempt -= 1
        return call

    def _pre(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] == 1:
            self.armed = True
            self.decode_calls += 1

    def _post(self, module, args, output):
        self.armed = False


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_decode_steps_read_nothing_back(cache_kind, monkeypatch):
    """Greedy generation with left padding gives transformers' tokens while no decode step of any patched layer
    converts a tensor to a host value (dynamic cache: slots from host bookkeeping; static: all on the device)."""
    model = dense_model()
    ids, mask = left_padded(PROMPTS)
    block = 2 if cache_kind == "dynamic" else 4
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
        patch_model(model, block_size=block)
        trap = ConversionTrap(monkeypatch, model)
        kwargs = {}
        if cache_kind == "static":
            kwargs["past_key_values"] = static_latent_cache(model, len(PROMPTS), 32, block_size=block)
        else:  # no headroom: the cache starts at 3 x ceil(9 / 2) = 15 blocks and must grow during decoding
            monkeypatch.setattr(integration, "INITIAL_HEADROOM_TOKENS", 0)
        out = model.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True, **GREEDY, **kwargs)
    assert trap.decode_calls == (NEW - 1) * len(model.model.layers)
    assert torch.equal(out.sequences, expected)
    if cache_kind == "dynamic":
        lc = latent_cache(out.past_key_values)
        assert [lc.seqlen(s) for s in lc.seq_ids] == [n + NEW - 1 for n in PROMPTS]
        assert lc.num_blocks > 15  # it grew in a decode step (the prompt needs 9 blocks)


def test_numpy_sizes_configure_the_drop_in():
    """patch_model's and static_latent_cache's sizes, and a reorder's repeats, of numpy's int types (sizes read from
    an array) work as Python ints do, and are kept as Python ints; they were refused ("block_size must be a
    positive int, got np.int64(4)") where the library's other sizes took them."""
    np = pytest.importorskip("numpy")
    model = dense_model()
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad():
        patch_model(model, block_size=np.int64(2), max_cache_tokens=np.int32(64))
        expected = model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
        cache = static_latent_cache(model, np.int64(len(PROMPTS)), np.int32(32), block_size=np.int16(4))
        state = cache._mla_static_state
        assert (state.batch_size, state.max_cache_len, state.block_size) == (len(PROMPTS), 32, 4)
        assert type(state.batch_size) is type(state.max_cache_len) is type(state.block_size) is int
        out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **GREEDY)
    assert torch.equal(out, expected)
    assert type(model.model.layers[0].self_attn.block_size) is int


def test_the_trap_catches_a_sync(monkeypatch):
    """The trap is not vacuous: the prompt's host read of the mask (a real sync) trips it when armed."""
    model = dense_model()
    patch_model(model, block_size=4)
    trap = ConversionTrap(monkeypatch, model)
    ids, mask = left_padded([3, 2])
    trap.armed = True
    with torch.no_grad(), pytest.raises(AssertionError, match="decode step"):
        integration._real_tokens((mask.bool()[:, None, :] & torch.ones(3, 3, dtype=torch.bool).tril())[:, None], 2, 3,
                                 [0, 0])


def test_a_pad_in_a_decode_step_is_refused():
    """A decode step stores its token unread: a mask that hides it fails the device assertion (on the CPU, at
    once) instead of caching a pad."""
    model = dense_model()
    patch_model(model, block_size=4)
    ids, mask = left_padded([3, 2])
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask, use_cache=True)
        step_mask = torch.cat([mask, torch.tensor([[1], [0]])], dim=1)
        with pytest.raises(RuntimeError, match="hides a new token"):
            model(input_ids=ids[:, -1:], attention_mask=step_mask, past_key_values=first.past_key_values,
                  use_cache=True)


def test_reserve_builds_what_the_constructor_builds():
    """LatentBatch.reserve (one packed upload) and LatentBatch(...) (tensor by tensor) agree field by field."""
    cache = PagedLatentCache(1, 16, 4, 32, 16, dtype=torch.float32)
    seqs = [cache.add_sequence() for _ in range(3)]
    LatentBatch.reserve(cache, seqs, [5, 0, 9])
    fast = LatentBatch.reserve(cache, seqs, [2, 2, 2])
    slow = LatentBatch(cache, seqs, [2, 2, 2], fast.slots)
    for name in ("slots", "positions", "block_table", "cache_seqlens", "cu_seqlens_q"):
        a, b = getattr(fast, name), getattr(slow, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert (fast.max_seqlen_k, fast.uniform, fast.num_new_tokens) == (slow.max_seqlen_k, slow.uniform, [2, 2, 2])
    ragged = LatentBatch.reserve(cache, seqs, [1, 3, 0])
    assert ragged.positions.tolist() == [7, 2, 3, 4] and ragged.cu_seqlens_q.tolist() == [0, 1, 4, 4]
    assert ragged.uniform is None and ragged.cache_seqlens.tolist() == [8, 5, 11]


def test_incremental_block_table_follows_growth(monkeypatch):
    """The integration's host block table, kept incrementally, equals a rebuilt one after steps and a regrowth."""
    monkeypatch.setattr(integration, "INITIAL_HEADROOM_TOKENS", 0)
    model = dense_model()
    patch_model(model, block_size=2)
    ids, mask = left_padded([3, 1])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True, **GREEDY)
    state = out.past_key_values._mla_latent_state
    assert torch.equal(state._block_table_host(), state.paged._block_table_host(state.rows))


# ---------------------------------------------------------------------------------------------
# one device-to-host read in a prompt step
# ---------------------------------------------------------------------------------------------

# ops that read the device from C++, which the Python-level trap can't see: a host scalar, an output whose size
# depends on the values (a boolean-mask index or assignment asks nonzero for the count first)
_READ_OPS = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal", "aten::nonzero", "aten::masked_select",
             "aten::unique_consecutive", "aten::_unique2", "aten::unique_dim"}
_INDEX_OPS = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


class ReadCounter(ConversionTrap):
    """Counts, per patched layer, the device-to-host reads of its prompt-step calls (more than one new token)
    instead of raising: the Python-level conversions of ``ConversionTrap`` and, through a dispatch mode, those C++
    makes itself (``_READ_OPS``, a boolean-mask index or index_put, ``repeat_interleave`` without output_size).
    Exempt like the trap: the decode and cache-write op bodies, and the prefill path's CPU-only value checks
    (``_check_host_agrees``, ``_check_lengths_cpu``), kernel launches (the interpreter reads everything) and PyTorch
    paths (CPU tensors without the interpreter)."""

    def __init__(self, monkeypatch, model):
        super().__init__(monkeypatch, model)
        # the PyTorch paths too: they serve CPU tensors outside the interpreter (these tests on a GPU machine)
        for name in ("_check_host_agrees", "_check_lengths_cpu", "_launch", "_launch_expanded", "_gather_latent",
                     "_prefill_torch", "_expanded_torch", "_gather_latent_torch"):
            monkeypatch.setattr(prefill_mod, name, self._exempt(getattr(prefill_mod, name)))
        self.layer, self.reads = None, {}  # {layer_idx: [what was read, ...]}
        self.prompt_calls = 0
        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if counter.armed and not counter.exempt:
                    op = func._schema.name
                    if (op in _READ_OPS or (op in _INDEX_OPS and _bool_index(args))
                            or (op == "aten::repeat_interleave" and kwargs.get("output_size") is None
                                and not (len(args) > 2 and args[2] is not None))):
                        counter._read(str(func))
                return func(*args, **kwargs)
        self.mode = Mode

    def _guard(self, name, original):
        guarded = super()._guard(name, self._exempt(original))  # C++ under a counted conversion: not counted again
        return guarded

    def _read(self, name):
        self.reads.setdefault(self.layer, []).append(name)

    def _pre(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] > 1:
            self.armed, self.layer = True, module.layer_idx
            self.prompt_calls += 1

    def forward(self, model, **kwargs):
        """One forward pass of ``model`` under the counter; returns its output."""
        with torch.no_grad(), self.mode():
            return model(**kwargs)


def _prompt_cache(model, kind, batch):
    return {"static": lambda: static_latent_cache(model, batch, 32, block_size=4), "dynamic": DynamicCache,
            "none": lambda: None}[kind]()


@pytest.mark.parametrize("prompts", [[5, 9, 2, 7], [6, 6, 6, 6], [9, 9, 9, 9]],
                         ids=["left-padded", "same-length-decode-kernel", "same-length-prefill-kernel"])
@pytest.mark.parametrize("cache_kind", ["dynamic", "static", "none"])
def test_a_prompt_step_reads_the_device_once(cache_kind, prompts, monkeypatch):
    """A patched model's prompt forward (4 layers, a batch of 4) reads the device at most once, in its first layer
    (the mask's per-row counts; the static cache also reads its rows' lengths in that one copy), and never in the
    others; the prompt after it (a second chunk over the cached one; without a cache, a new pass) does the same."""
    model = tiny_model(num_hidden_layers=4, first_k_dense_replace=4)  # dense: routing is not the point
    patch_model(model, block_size=4)
    counter = ReadCounter(monkeypatch, model)
    ids, mask = left_padded(prompts)
    cache = _prompt_cache(model, cache_kind, len(prompts))
    use_cache = cache is not None
    counter.forward(model, input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=use_cache)
    assert counter.prompt_calls == 4
    first = {layer: reads for layer, reads in counter.reads.items() if reads}
    assert sum(map(len, first.values())) <= 1 and set(first) <= {0}, first
    counter.reads.clear()
    more = torch.randint(3, 128, (len(prompts), 3))
    if not use_cache:  # no history to continue: a second pass over a longer batch
        more = torch.cat([ids, more], 1)
    counter.forward(model, input_ids=more, attention_mask=torch.cat([mask, torch.ones_like(more[:, -3:])], 1),
                    past_key_values=cache, use_cache=use_cache)
    assert counter.prompt_calls == 8
    second = {layer: reads for layer, reads in counter.reads.items() if reads}
    assert sum(map(len, second.values())) <= 1 and set(second) <= {0}, second


@pytest.mark.parametrize("cache_kind", ["dynamic", "static", "none"])
def test_inference_mode_generates_as_no_grad_does(cache_kind, monkeypatch):
    """Under ``torch.inference_mode`` (how servers run models) the masks are inference tensors, which keep no
    in-place version: the static cache's prompt step read one and raised ("Inference tensors do not track version
    counter"). The same tokens as under no_grad, or the same logits without a cache."""
    from mla_kernels import _utils

    monkeypatch.setattr(_utils, "interpreting", lambda: False)  # wiring only: the PyTorch path is enough
    model = patch_model(tiny_model(), block_size=4)
    ids, mask = left_padded([5, 9, 2])
    runs = []
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            if cache_kind == "none":
                runs.append(model(input_ids=ids, attention_mask=mask, use_cache=False).logits[mask.bool()])
            else:
                runs.append(model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=4,
                                           past_key_values=_prompt_cache(model, cache_kind, 3)))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_a_cache_made_under_inference_mode_serves_outside_it(cache_kind, monkeypatch):
    """A cache outlives the mode it was made in (a server makes its caches under torch.inference_mode, a later
    no_grad caller reuses one): a static latent cache made there held its row lengths as inference tensors, which
    its steps update in place, and failed its first step outside (torch's "Inplace update to inference tensor
    outside InferenceMode"). Made under inference_mode, then reset and used under no_grad, it gives no_grad's
    tokens."""
    from mla_kernels import _utils

    monkeypatch.setattr(_utils, "interpreting", lambda: False)  # wiring only: the PyTorch path is enough
    model = patch_model(tiny_model(), block_size=4)
    ids, mask = left_padded([5, 9, 2])
    greedy = dict(do_sample=False, max_new_tokens=4)
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, **greedy)
    with torch.inference_mode():
        cache = _prompt_cache(model, cache_kind, 3)
        assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **greedy),
                           expected)
    cache.reset()
    with torch.no_grad():
        assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **greedy),
                           expected)


def test_the_read_counter_counts_what_the_old_prompt_step_did(monkeypatch):
    """The counter is not vacuous: each per-layer read the prompt step used to make counts once, the ones C++
    makes by itself included (boolean-mask index and assignment, a length read by mla_prefill_attention)."""
    model = dense_model()
    patch_model(model, block_size=4)
    counter = ReadCounter(monkeypatch, model)
    ids, mask = left_padded([3, 2])
    real = mask.bool()
    x = torch.randn(2, 3, 4)
    counter.armed = True
    with torch.no_grad(), counter.mode():
        integration._real_tokens((mask.bool()[:, None, :] & torch.ones(3, 3, dtype=torch.bool).tril())[:, None], 2, 3,
                                 [0, 0])
        packed = x[real]
        x[real] = packed
        cache = PagedLatentCache(1, 4, 4, 16, 16, dtype=torch.float32)
        batch = LatentBatch.reserve(cache, [cache.add_sequence() for _ in range(2)], [3, 2])
        q = torch.randn(5, 1, 16)
        mla_prefill_attention(q, q, cache.kv_cache(0), cache.pe_cache(0), batch.block_table, batch.cu_seqlens_q,
                              batch.cache_seqlens, torch.randn(32, 16), 0.25)
    reads = counter.reads[None]
    assert reads[1:] == ["aten.index.Tensor", "aten.index_put_.default", "tolist"], reads
    assert len(reads) == 4 and reads[0] in ("__bool__", "tolist"), reads


# ---------------------------------------------------------------------------------------------
# static latent cache and torch.compile
# ---------------------------------------------------------------------------------------------


def recording_backend(graphs):
    from torch._dynamo.backends.debugging import aot_eager

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)
    return backend


@OLD_TORCH_COMPILE
@pytest.mark.parametrize("norms,fp8,sinks", [(False, False, False), (True, False, False), (False, True, False),
                                             (False, False, True)],
                         ids=["attention", "attention-and-norms", "fp8-kv_b_proj", "attention-sinks"])
def test_compiled_decode_step_matches_eager(norms, fp8, sinks, monkeypatch):
    """generate with the static latent cache and compile_config(fullgraph=True): one graph for every decode step
    (a graph break would raise), holding write_cache and mla_decode as single nodes per layer, and the greedy
    tokens of transformers' own eager attention; with ``norms=True`` too (the stand-ins trace as the formula). With
    ``fp8``, every kv_b_proj is transformers' FP8Linear (an fp8 checkpoint), which the graph dequantizes itself (the
    eager path's kept copy is checked by version counters, which dynamo can't trace: fullgraph failed on them),
    against the unpatched model holding the dequantized weights. With ``sinks``, every attention has attention
    sinks (``helpers.with_attention_sinks``), applied in the graph from mla_decode's lse, and wider attention weights
    (at the models' init the sinks did not change the greedy tokens)."""
    model = reference = dense_model(q_lora_rank=32)
    if fp8:
        model, reference = with_fp8_kv_b(model)
    if sinks:
        widen_attention(model)
        with_attention_sinks(model, monkeypatch)
    ids, mask = left_padded(PROMPTS)
    graphs = []
    config = CompileConfig(fullgraph=True, backend=recording_backend(graphs), mode=None)
    config._compile_all_devices = True  # transformers compiles only on GPUs unless told
    with torch.no_grad():
        expected = reference.generate(input_ids=ids, attention_mask=mask, **GREEDY)
        patch_model(model, block_size=4, norms=norms)
        torch._dynamo.reset()
        cache = static_latent_cache(model, len(PROMPTS), 32, block_size=4)
        out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, compile_config=config,
                             **GREEDY)
    assert torch.equal(out, expected), f"\n{out[:, ids.shape[1]:]}\n{expected[:, ids.shape[1]:]}"
    assert len(graphs) == 1, f"{len(graphs)} graphs: the decode step recompiled"
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    layers = len(model.model.layers)
    assert targets.count("mla_kernels.write_cache") == layers and targets.count("mla_kernels.mla_decode") == layers
    lens = [cache._mla_static_state.seqlens[i].tolist() for i in range(layers)]
    assert lens == [[n + NEW - 1 for n in PROMPTS]] * layers  # pads were not stored


def compiled_layer_step(layer):
    """``(step, compiled step, graphs)``: one decoder layer's decode step ``step(x, cos_sin, cache)``, the same under
    ``torch.compile(fullgraph=True)`` (dynamo reset first), and the list of graphs its backend is handed."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(x, cos_sin, cache):
        out = layer(x, position_embeddings=cos_sin, attention_mask=None, past_key_values=cache)
        return out[0] if isinstance(out, tuple) else out

    torch._dynamo.reset()
    return step, torch.compile(step, backend=backend, fullgraph=True), graphs


@pytest.mark.parametrize("norms", [False, True], ids=["attention", "attention-and-norms"])
def test_a_compiled_decoder_layer_traces_whole(norms):
    """Regional compilation: torch.compile(fullgraph=True) of one patched decoder layer, not the model. The patched
    attention's output_attentions check read transformers' output collector, a ContextVar that dynamo traces only
    once a compiled model forward has set it: a layer compiled alone failed at its first call ("Dynamo does not know
    how to trace method `get` of class `ContextVar`"), where transformers' own layer traces. It is one graph now over
    decode steps with the static latent cache, and each step equals the eager layer's: within fp32 rounding, as the
    eager layer's attention norms run as one kernel each (``mla_kernels.norm``, its own order of summing squares)
    and the compiled layer's as the modules' ops (bit for bit before that). With ``norms=True`` the layer's own
    norms (``KernelRMSNorm``) trace as the modules' formula too."""
    model = patch_model(dense_model(), block_size=4, norms=norms)
    assert norms == isinstance(model.model.layers[1].input_layernorm, KernelRMSNorm)
    step, compiled, graphs = compiled_layer_step(model.model.layers[1])
    eager_cache, compiled_cache = (static_latent_cache(model, 2, 16, block_size=4) for _ in range(2))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for pos in range(4):
            x = torch.randn(2, 1, model.config.hidden_size, generator=g)
            cos_sin = model.model.rotary_emb(x, torch.full((2, 1), pos, dtype=torch.long))
            assert_close(f"step {pos}", compiled(x, cos_sin, compiled_cache), step(x, cos_sin, eager_cache),
                         torch.float32)
    assert len(graphs) == 1
    # nothing of the library's for dynamo to warn about (torch 2.11-2.13 warned at every trace that the output
    # collector's lookup was functools.lru_cache-wrapped)
    ours = [str(w.message) for w in caught if "lru_cache" in str(w.message) or "mla_kernels" in str(w.filename)]
    assert not ours, ours


def test_a_compiled_decoder_layer_with_the_dynamic_cache(monkeypatch):
    """Regional compilation with transformers' own (dynamic) Cache, generate's default: the latent's slots and block
    tables are Python state on the host, so a fullgraph compile must stop at that bookkeeping and say why (it failed
    inside dynamo on ``max(..., default=)``, naming no remedy), and a compile that may break the graph runs it
    eagerly, between two graphs that stop recompiling after the first decode steps (traced, every length was a
    guard: a recompile a step until dynamo's limit, 8, then the whole frame eager). Steps equal the eager layer's
    within fp32 rounding (the compiled layer's attention norms run as the modules' ops, the eager one's as kernels)."""
    import inspect

    takes_reason = "reason" in inspect.signature(torch.compiler.disable).parameters
    model = patch_model(dense_model(), block_size=4)
    step, full, graphs = compiled_layer_step(model.model.layers[1])
    compiled = torch.compile(step, backend=lambda gm, example_inputs: graphs.append(gm) or gm.forward)
    g = torch.Generator().manual_seed(0)
    eager_cache, compiled_cache = DynamicCache(config=model.config), DynamicCache(config=model.config)
    counts = []
    with torch.no_grad():
        for pos in range(12):
            x = torch.randn(2, 1, model.config.hidden_size, generator=g)
            cos_sin = model.model.rotary_emb(x, torch.full((2, 1), pos, dtype=torch.long))
            if pos == 0:
                with pytest.raises(Exception, match="static_latent_cache" if takes_reason else "_dynamic_cache_step"):
                    full(x, cos_sin, DynamicCache(config=model.config))
            with monkeypatch.context() as eager:  # eagerly the plain method, not the disabled wrapper (its cost)
                eager.setattr(TransformersMLAttention, "_dynamic_cache_step_untraced", None)
                expected = step(x, cos_sin, eager_cache)
            assert_close(f"step {pos}", compiled(x, cos_sin, compiled_cache), expected, torch.float32)
            counts.append(len(graphs))
    # measured: [4, 5, 5, 5, 6, 6, ...]: dynamo's automatic dynamic shapes recompile at the second step (a length)
    # and at the first new block (the block table's width), then never; before, one more graph at every step
    assert counts[5:] == [counts[4]] * 7, f"graphs after each step: {counts}"


@OLD_TORCH_COMPILE
def test_compiled_prompt_chunks_say_why_not():
    """With prefill_chunk_size transformers compiles the prompt chunks too; the static cache's prompt step reads the
    rows' lengths on the host, so a fullgraph compile must stop there with that reason (it failed deep in dynamo,
    "Could not guard on data-dependent expression"), and a compile that may break the graph runs it eagerly."""
    import inspect

    takes_reason = "reason" in inspect.signature(torch.compiler.disable).parameters
    model = dense_model()
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
        patch_model(model, block_size=4)
        for fullgraph in (True, False):
            config = CompileConfig(fullgraph=fullgraph, backend="eager", mode=None)
            config._compile_all_devices = True
            torch._dynamo.reset()
            run = lambda: model.generate(input_ids=ids, attention_mask=mask, compile_config=config,  # noqa: E731
                                         past_key_values=static_latent_cache(model, len(PROMPTS), 32, block_size=4),
                                         prefill_chunk_size=4, **GREEDY)
            if fullgraph:  # the reason, where torch.compiler.disable takes one (2.11 and 2.13; not 2.7), else
                # dynamo's own refusal, which names the function
                with pytest.raises(Exception, match="prefill_chunk_size" if takes_reason else "_prompt_step"):
                    run()
            else:
                assert torch.equal(run(), expected)


def test_static_cache_continues_a_prefilled_prompt():
    """The bench's pattern: the prompt but its last token cached by a plain forward call, then generate from
    there; the static cache gives the dynamic one's tokens, and bench.generate's reset puts it back exactly."""
    from bench.generate import _Prefilled

    model = dense_model()
    patch_model(model, block_size=4)
    ids, mask = left_padded([4, 4])
    greedy = dict(GREEDY, max_new_tokens=3, min_new_tokens=3)
    with torch.no_grad():
        runs = {}
        for name, static, repeats in (("dynamic", None, 1), ("static", 4 + 3 + 1, 2)):
            pre = _Prefilled(model, ids, mask, static=static)
            runs[name] = [model.generate(input_ids=ids, attention_mask=mask, past_key_values=pre.fresh(), **greedy)
                          for _ in range(repeats)]
    assert torch.equal(runs["static"][0], runs["dynamic"][0])
    assert torch.equal(runs["static"][1], runs["static"][0])  # the reset put the static cache back exactly


def test_a_static_cache_pickles_and_each_copy_goes_on_alone(monkeypatch):
    """torch.save / pickle of a static latent cache holding a prompt (as a dynamic one pickles): its layers' class was
    local to a function, and its last prompt step held a weak reference to that step's mask, so pickling failed.
    Each loaded copy, and the original, then goes on to the uninterrupted generation's tokens, with the addresses it
    fixes for CUDA graphs still marked."""
    from mla_kernels import _utils

    monkeypatch.setattr(_utils, "interpreting", lambda: False)  # wiring only: the PyTorch path is enough
    model = patch_model(dense_model(), block_size=4)
    ids, mask = left_padded([5, 3])
    greedy = dict(GREEDY, max_new_tokens=3, min_new_tokens=3)
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask,
                                  past_key_values=static_latent_cache(model, 2, 16, block_size=4), **greedy)
        cache = static_latent_cache(model, 2, 16, block_size=4)
        model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], past_key_values=cache, use_cache=True)
        copies = [round_trip(cache, "torch.save"), round_trip(cache, "pickle"), cache]
        assert latent_cache(copies[0]) is not latent_cache(cache)
        for each in copies:
            assert each.get_seq_length() == ids.shape[1] - 1
            paged = latent_cache(each)  # its views (new ones, once loaded) are still marked for CUDA graphs
            assert all(getattr(view, "_dynamo_static_input_type", None) for layer in range(paged.num_layers)
                       for view in paged.views(layer) if view is not None)
            assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, past_key_values=each, **greedy),
                               expected)


def test_generation_under_autocast_matches_transformers():
    """An fp32 model under torch.autocast (bf16): the projections give bf16 queries while the latent norm and the
    rope tables give fp32 (the patched model failed on the prompt with "build the PagedLatentCache with
    dtype=bfloat16"). Patched, with the dynamic cache and a static one (built inside the autocast region, or
    outside it with dtype=), it generates transformers' own tokens under autocast; a static cache built outside
    without dtype is refused, naming autocast."""
    import copy

    model = dense_model()
    patched = patch_model(copy.deepcopy(model), block_size=4)
    ids, mask = left_padded(PROMPTS)
    outside = static_latent_cache(patched, len(PROMPTS), 32, block_size=4)
    given = static_latent_cache(patched, len(PROMPTS), 32, block_size=4, dtype=torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
        inside = static_latent_cache(patched, len(PROMPTS), 32, block_size=4)
        for cache in (None, inside, given):
            got = patched.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **GREEDY)
            assert torch.equal(got, want), cache
        with pytest.raises(TypeError, match="autocast"):
            patched.generate(input_ids=ids, attention_mask=mask, past_key_values=outside, **GREEDY)
    assert latent_cache(inside).dtype == torch.bfloat16 and latent_cache(outside).dtype == torch.float32
    with pytest.raises(TypeError, match="dtype"):
        static_latent_cache(patched, 2, 16, dtype=torch.int8)


def test_static_cache_misuse():
    model = dense_model()
    with pytest.raises(TypeError, match="patch_model"):
        static_latent_cache(model, 2, 16)
    patch_model(model, block_size=4)
    with pytest.raises(ValueError, match="max_cache_len"):
        static_latent_cache(model, 2, 0)
    ids, mask = left_padded([3, 2])
    with torch.no_grad():
        with pytest.raises(ValueError, match="batch of 3"):
            model(input_ids=ids, attention_mask=mask, past_key_values=static_latent_cache(model, 3, 16),
                  use_cache=True)
        # a prompt, or a generate, that runs past max_cache_len tokens (pads included): the named device assertion
        # before anything is stored (it was an index error in the mask lookup: "INDICES element is out of DATA bounds")
        ids9, mask9 = left_padded([9, 7])
        small = static_latent_cache(model, 2, 8, block_size=4)
        with pytest.raises(RuntimeError, match="static latent cache is full"):
            model(input_ids=ids9, attention_mask=mask9, past_key_values=small, use_cache=True)
        assert not small._mla_static_state.seqlens[0].any()  # nothing counted or stored
        with pytest.raises(RuntimeError, match="static latent cache is full"):
            model.generate(input_ids=ids9, attention_mask=mask9, do_sample=False, max_new_tokens=6,
                           past_key_values=static_latent_cache(model, 2, 12, block_size=4))
        # called directly, a layer's own device assertion stops the row that would run past its blocks
        full = static_latent_cache(model, 2, 4, block_size=4)
        attn = model.model.layers[0].self_attn
        x = torch.randn(2, 1, model.config.hidden_size)
        cos_sin = model.model.rotary_emb(x, torch.zeros(2, 1, dtype=torch.long))
        for _ in range(4):
            attn(x, position_embeddings=cos_sin, attention_mask=None, past_key_values=full)
        before = full._mla_static_state.paged.buffer(0).clone()
        with pytest.raises(RuntimeError, match="static latent cache is full"):
            attn(x, position_embeddings=cos_sin, attention_mask=None, past_key_values=full)
        assert torch.equal(full._mla_static_state.paged.buffer(0), before)  # nothing written past the row


def test_a_static_cache_for_another_model_is_refused_before_anything_is_counted():
    """Fewer layers, other widths, another dtype: refused in the first layer, the cache left usable for its own
    model. Before, the first layers counted (and for fewer layers stored and attended) the step before an
    IndexError or a write_cache error, and the cache's own model then failed, or gave other tokens silently."""
    model = patch_model(dense_model(), block_size=4)
    ids, mask = left_padded([3, 2])
    gen = dict(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=3)
    cases = {  # the model the cache was made for, and the model that is given it
        "fewer layers": (tiny_model(num_hidden_layers=1, first_k_dense_replace=1), model),
        "other widths": (dense_model(kv_lora_rank=64), model),
        "another dtype": (model, patch_model(dense_model(), block_size=4).to(torch.bfloat16)),
    }
    with torch.no_grad():
        for name, (owner, user) in cases.items():
            if owner is not model:
                patch_model(owner, block_size=4)
            cache = static_latent_cache(owner, 2, 16, block_size=4)
            with pytest.raises((ValueError, TypeError), match="another model|holds torch.float32"):
                user.generate(**gen, past_key_values=cache)
            assert not any(s.any() for s in cache._mla_static_state.seqlens), name  # nothing counted
            fresh = owner.generate(**gen, past_key_values=static_latent_cache(owner, 2, 16, block_size=4))
            assert torch.equal(owner.generate(**gen, past_key_values=cache), fresh), name  # still usable


def test_static_prompt_refuses_layers_at_other_lengths():
    """The static cache's prompt layers reuse the host lengths their first layer read; a layer left behind by an
    interrupted forward (here layer 1 ran alone first) fails the device check instead of attending with them."""
    model = dense_model()
    patch_model(model, block_size=4)
    ids, mask = left_padded([3, 2])
    cache = static_latent_cache(model, 2, 16, block_size=4)
    x = torch.randn(2, 3, model.config.hidden_size)
    with torch.no_grad():
        cos_sin = model.model.rotary_emb(x, torch.arange(3).expand(2, 3))
        model.model.layers[1].self_attn(x, position_embeddings=cos_sin, attention_mask=None, past_key_values=cache)
        with pytest.raises(RuntimeError, match="other lengths than the first layer"):
            model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)


# ---------------------------------------------------------------------------------------------
# GPU only: what the CPU can't observe
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def sync_errors_in_decode_steps(model):
    """``set_sync_debug_mode("error")`` around every patched layer's decode-step call (transformers' own code
    between layers is not ours to judge)."""
    handles = []

    def pre(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] == 1:
            torch.cuda.set_sync_debug_mode("error")

    def post(module, args, output):
        torch.cuda.set_sync_debug_mode("default")

    for layer in model.model.layers:
        handles.append(layer.self_attn.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(post))
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
        for h in handles:
            h.remove()


@pytest.mark.skipif(not ON_GPU, reason="host syncs are observable only on a GPU (torch.cuda.set_sync_debug_mode)")
@pytest.mark.parametrize("norms", [False, True], ids=["attention", "attention-and-norms"])
@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_decode_steps_never_sync_on_gpu(cache_kind, norms, monkeypatch):
    """Every decode step of every patched layer under set_sync_debug_mode("error"); the dynamic cache starts
    without headroom, so some decode steps also grow it. With ``norms=True`` the decoder layers' norms run as
    kernels too (``KernelRMSNorm``), with the same greedy tokens."""
    monkeypatch.setattr(integration, "INITIAL_HEADROOM_TOKENS", 0)
    model = dense_model(q_lora_rank=32).cuda()  # fp32: the tokens must equal transformers' exactly
    ids, mask = (t.cuda() for t in left_padded(PROMPTS))
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
        patch_model(model, block_size=2, norms=norms)  # with no headroom, the dynamic cache grows during decoding
        kwargs = {}
        if cache_kind == "static":
            kwargs["past_key_values"] = static_latent_cache(model, len(PROMPTS), 64, block_size=4)
            kwargs["disable_compile"] = True
        with sync_errors_in_decode_steps(model):
            out = model.generate(input_ids=ids, attention_mask=mask, **GREEDY, **kwargs)
    assert torch.equal(out, expected)


@pytest.mark.skipif(not ON_GPU, reason="host syncs are observable only on a GPU (torch.cuda.set_sync_debug_mode)")
@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_a_prompt_step_syncs_once_on_gpu(cache_kind):
    """test_a_prompt_step_reads_the_device_once where C++'s syncs show: each patched layer's prompt-step call under
    set_sync_debug_mode("warn"), whose warnings count the syncs: one in the first layer, none in the others (after
    a warm-up forward, so that compiling and tuning the kernels is not counted)."""
    import warnings

    model = tiny_model(num_hidden_layers=4, first_k_dense_replace=4).cuda()
    patch_model(model, block_size=4)
    ids, mask = (t.cuda() for t in left_padded([5, 9, 2, 7]))
    syncs, caught = {}, []

    def count() -> int:  # the sync warnings caught so far (not any other warning raised inside a layer)
        return sum("synchronizing CUDA operation" in str(w.message) for w in caught)

    def pre(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] > 1:
            syncs[module.layer_idx] = -count()
            torch.cuda.set_sync_debug_mode("warn")

    def post(module, args, output):
        torch.cuda.set_sync_debug_mode("default")
        if module.layer_idx in syncs:
            syncs[module.layer_idx] += count()

    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=_prompt_cache(model, cache_kind, 4), use_cache=True)
        torch.cuda.synchronize()
        for layer in model.model.layers:
            layer.self_attn.register_forward_pre_hook(pre, with_kwargs=True)
            layer.self_attn.register_forward_hook(post)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model(input_ids=ids, attention_mask=mask, past_key_values=_prompt_cache(model, cache_kind, 4),
                  use_cache=True)
    torch.cuda.set_sync_debug_mode("default")
    assert len(syncs) == 4 and syncs[0] <= 1 and not any(syncs[i] for i in (1, 2, 3)), syncs


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs (torch.compile mode='reduce-overhead') need a GPU")
@pytest.mark.parametrize("norms", [False, True], ids=["attention", "attention-and-norms"])
def test_generate_compiles_with_cuda_graphs_on_gpu(norms):
    """transformers' own compiled decoding (inductor, CUDA graphs) over the static latent cache, with fullgraph."""
    model = dense_model(q_lora_rank=32).cuda()
    ids, mask = (t.cuda() for t in left_padded(PROMPTS))
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
        patch_model(model, block_size=4, norms=norms)
        torch._dynamo.reset()
        out = model.generate(input_ids=ids, attention_mask=mask, compile_config=CompileConfig(fullgraph=True),
                             past_key_values=static_latent_cache(model, len(PROMPTS), 64, block_size=4), **GREEDY)
    assert torch.equal(out, expected)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_decode_step_replays_in_a_cuda_graph():
    """One patched layer's static decode step captured once and replayed: each replay writes the next token into
    the cache and attends, matching the same steps run eagerly on a twin cache."""
    model = dense_model(q_lora_rank=32).to("cuda", torch.float32)
    patch_model(model, block_size=4)
    attn: TransformersMLAttention = model.model.layers[0].self_attn
    hidden = model.config.hidden_size
    g = torch.Generator(device="cuda").manual_seed(0)
    steps = [torch.randn(2, 1, hidden, device="cuda", generator=g) for _ in range(5)]
    rope = model.model.rotary_emb
    tables = [rope(steps[0], torch.full((2, 1), i, device="cuda")) for i in range(5)]
    eager_cache, graph_cache = (static_latent_cache(model, 2, 16, block_size=4) for _ in range(2))
    with torch.no_grad():
        expected = [attn(x, position_embeddings=t, attention_mask=None, past_key_values=eager_cache)[0]
                    for x, t in zip(steps, tables)]
        static_x, static_cos, static_sin = steps[0].clone(), tables[0][0].clone(), tables[0][1].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream (compiles the kernels), then reset the cache
            attn(static_x, position_embeddings=(static_cos, static_sin), attention_mask=None,
                 past_key_values=graph_cache)
        torch.cuda.current_stream().wait_stream(side)
        graph_cache.reset()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = attn(static_x, position_embeddings=(static_cos, static_sin), attention_mask=None,
                              past_key_values=graph_cache)[0]
        graph_cache.reset()  # capture recorded the step without running it; start from an empty cache
        for x, (cos, sin), want in zip(steps, tables, expected):
            static_x.copy_(x), static_cos.copy_(cos), static_sin.copy_(sin)
            graph.replay()
            torch.testing.assert_close(static_out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pads", ["right-padded", "middle-padded"])
def test_static_prompt_never_stores_a_pad(pads):
    """A static latent cache's prompt step with pads after a real token: each pad gets no slot (it would take the
    place after the real tokens before it, overwriting the last of them, which every later query then reads with
    the pad's key). The real tokens' logits equal the unpatched model's, and the cache holds the real tokens only."""
    model = dense_model()
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1] = torch.tensor({"right-padded": [1, 1, 1, 0, 0, 0, 0], "middle-padded": [1, 1, 0, 0, 0, 1, 1]}[pads])
    real = mask.bool()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        patch_model(model, block_size=4)
        cache = static_latent_cache(model, max_batch_size=2, max_cache_len=8)
        got = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits
    # fp32 logits (|logit| < 0.5 here), the same sums in another order: measured 1.2e-7 apart; 1e-5 as the other
    # fp32 model comparisons (test_transformers), where the bound was 1e-4
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
    assert cache._mla_static_state.seqlens[0].tolist() == [7, int(mask[1].sum())]


def test_a_loaded_model_compiles_its_layer_once(monkeypatch):
    """A patched model loaded where adopt never ran (torch.load in a fresh process: the output collector's global
    unset) traces a compiled decoder layer once: a first lookup inside the trace set the global and recompiled the
    next call."""
    import io

    model = patch_model(dense_model(), block_size=4)
    buf = io.BytesIO()
    torch.save(model, buf)
    monkeypatch.setattr(integration, "_collector", integration._COLLECTOR_UNSET)  # as in a fresh process
    buf.seek(0)
    model = torch.load(buf, weights_only=False)
    _, compiled, graphs = compiled_layer_step(model.model.layers[1])
    cache = static_latent_cache(model, 2, 16, block_size=4)
    with torch.no_grad():
        for pos in range(3):
            x = torch.randn(2, 1, model.config.hidden_size)
            compiled(x, model.model.rotary_emb(x, torch.full((2, 1), pos, dtype=torch.long)), cache)
    assert len(graphs) == 1, f"{len(graphs)} graphs"
