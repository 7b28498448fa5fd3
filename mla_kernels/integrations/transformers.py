"""Run a transformers MLA model (DeepSeek-V3/V3.2/V2 and the models with their attention: GLM-5, Hy4, GLM-4.7-Flash,
Mistral Small 4, Mistral Large 4, MiniCPM3, LongCat-Flash, Youtu-LLM, Sarvam, A.X-K1, A.X-K2, the MLA layers of
Kimi-Linear, Ling 3 and GLM-5.3-Flash, dots.llm3; ``SUPPORTED_MODEL_TYPES``) on the kernels, keeping only the
latent.

``patch_model(model)`` replaces every layer's ``self_attn`` (each of them, where a layer has a ``ModuleList`` of
them, as LongCat-Flash's) by a ``TransformersMLAttention`` that adopts
the same projection modules (no weight is copied: the model's state dict is unchanged). Generation and
plain forward calls then cache per token and layer only the normalized latent and the roped key
(``R + P`` values, in a ``PagedLatentCache``), never per-head K/V.

How it fits transformers' cache (tested on transformers 5.17, 5.23 and 5.25, whose DeepSeek attention is the
same: it passes the latent ``[B, 1, S, R]`` and rope key ``[B, 1, S, P]`` to ``Cache.update`` and expands
the whole cached latent through ``kv_b_proj`` at every step; 5.0 still cached per-head K and V). The
adapter replaces that attention whole, so it depends only on the decoder layer's call (hidden_states,
position_embeddings, attention_mask, and the Cache: ``past_key_values`` up to 5.24, ``cache`` from 5.25 on)
and the Cache layer API, which these versions share:

- the transformers ``Cache`` passed as ``past_key_values`` keeps its role for the bookkeeping —
  ``get_seq_length``, ``get_mask_sizes``, hence cache positions, position ids and masks — but each of its
  layers becomes a ``LatentCacheLayer`` that counts tokens and stores nothing;
- the latent itself goes to a ``PagedLatentCache`` attached to that Cache object on first use (one
  sequence per batch row), sized from the batch and the first call's length and doubled whenever full
  (or ``CacheFullError`` past ``max_cache_tokens``);
- left padding: the new tokens the layer's attention mask hides from the last query are pads; they are
  not stored, so every sequence attends only to its real tokens (GLM-5.3-Flash's are: its indexer's picks number
  every position, and never pick a pad; ``local_mask``). Rope comes from the model's own
  ``position_embeddings``, so positions are whatever transformers computed (with left padding,
  ``attention_mask.cumsum - 1``);
- beam search and other changes of the batch's rows (the Cache's ``reorder_cache``, ``batch_repeat_interleave``,
  ``batch_select_indices``, which transformers calls on every layer): the shared state changes its rows once per
  such call, row ``i`` becoming a fork (``PagedLatentCache.fork``: full blocks shared, the partly filled last one
  copied) of the old row it takes, and rows no longer used freed. The index is read to the host once per call;
- speculative decoding (assisted and prompt-lookup generation): the candidates are verified in one multi-token
  step, and the Cache's ``crop`` drops the rejected ones from every row once (``PagedLatentCache.truncate``).

A fresh ``DynamicCache`` (what ``generate`` makes) or ``past_key_values=None`` work; a Cache that already
holds transformers K/V, and beam search, row changes or cropping on a ``static_latent_cache`` raise a clear
error.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
import sys
import weakref
from typing import NamedTuple

import torch
from torch import nn

from .. import _utils
from ..cache import CacheFullError, PagedLatentCache, _write as _write_cache
from ..decode import mla_decode
from ..prefill import mla_prefill_attention
from ..module import (LatentBatch, MLAttention, _check_inference, check_kv_b_proj, check_split_keys, compute_dtype,
                      config_kwargs, rope_inv_freq)
from ..norm import KernelRMSNorm, rms_norm

__all__ = ["patch_model", "unpatch_model", "latent_cache", "static_latent_cache", "TransformersMLAttention",
           "SUPPORTED_MODEL_TYPES"]

SUPPORTED_MODEL_TYPES = {
    "deepseek_v3": ("transformers.models.deepseek_v3.modeling_deepseek_v3", "DeepseekV3Attention"),
    "deepseek_v2": ("transformers.models.deepseek_v2.modeling_deepseek_v2", "DeepseekV2Attention"),
    # GLM-4.7-Flash: DeepSeek-V3's attention under another name (same projections, interleaved rope, scaling)
    "glm4_moe_lite": ("transformers.models.glm4_moe_lite.modeling_glm4_moe_lite", "Glm4MoeLiteAttention"),
    # MiniCPM3: DeepSeek-V2's attention with the rotate-half rope (module.config_kwargs picks the style)
    "minicpm3": ("transformers.models.minicpm3.modeling_minicpm3", "MiniCPM3Attention"),
    # DeepSeek-V3.2: DeepSeek-V3's attention plus an indexer picking each query's top-k keys (sparse attention, DSA);
    # the patched module runs the model's own indexer and attends over its picks (mla_decode's indices)
    "deepseek_v32": ("transformers.models.deepseek_v32.modeling_deepseek_v32", "DeepseekV32Attention"),
    # Sarvam-105B: a DeepSeek-V3 model (transformers builds DeepseekV3ForCausalLM) under its own model type
    "sarvam_mla": ("transformers.models.deepseek_v3.modeling_deepseek_v3", "DeepseekV3Attention"),
    # Youtu-LLM: DeepSeek-V3's attention under another name
    "youtu": ("transformers.models.youtu.modeling_youtu", "YoutuAttention"),
    # LongCat-Flash: DeepSeek-V3's attention with LoRA scales on the query and the latent (mla_scale_q_lora,
    # mla_scale_kv_lora: MLAttention's query_scale and latent_scale, from config_kwargs), two per decoder layer
    "longcat_flash": ("transformers.models.longcat_flash.modeling_longcat_flash", "LongcatFlashMLA"),
    # Kimi-Linear: MLA without positional encoding (NoPE) in one layer of four, between Kimi Delta Attention layers
    # (_OTHER_ATTENTION), which keep transformers' own attention and cache layers
    "kimi_linear": ("transformers.models.kimi_linear.modeling_kimi_linear", "KimiLinearAttention"),
    # Ling 3 (transformers 5.20 on): MLA with a head-wise output gate (g_proj, adopted), between linear-attention
    # layers
    "bailing_hybrid": ("transformers.models.bailing_hybrid.modeling_bailing_hybrid", "BailingHybridAttention"),
    # A.X-K1: DeepSeek-V3's attention under another name
    "axk1": ("transformers.models.axk1.modeling_axk1", "AXK1Attention"),
    # Mistral Small 4: DeepSeek-V3's attention whose queries are scaled by position past the rope's original length
    # (Llama 4's attention temperature, llama_4_scaling_beta; _scale_by_position)
    "mistral4": ("transformers.models.mistral4.modeling_mistral4", "Mistral4Attention"),
    # A.X-K2: DeepSeek-V3.2's sparse attention with a fused query-and-gate projection (q_gate_proj, of the normed
    # and the raw low-rank query) and an elementwise sigmoid gate on the attention output (_query_and_gate)
    "axk2": ("transformers.models.axk2.modeling_axk2", "AXK2Attention"),
    # GLM-5: DeepSeek-V3.2's sparse attention, some layers reusing the previous layer's top-k picks
    # (config.indexer_types "shared": no indexer of their own, prev_topk_indices)
    "glm_moe_dsa": ("transformers.models.glm_moe_dsa.modeling_glm_moe_dsa", "GlmMoeDsaAttention"),
    # Hy4: GLM-5's sparse attention (its own indexer, "shared" layers) with attention sinks (a learned logit per
    # head, adopted: MLAttention's attention_sinks) and an elementwise sigmoid output gate of the hidden states
    # (gate_proj, adopted: _project_out), its rope as the installed transformers rotates it (adopt); Hy4-VL's text
    # decoder is the same attention
    "hy_v4": ("transformers.models.hy_v4.modeling_hy_v4", "HYV4Attention"),
    "hy_v4_vl_text": ("transformers.models.hy_v4_vl.modeling_hy_v4_vl", "HYV4VLAttention"),
    # Mistral Large 4's text decoder (transformers 5.22 on): DSA (its own indexer, "shared" layers) over queries
    # from q_proj, some layers without a rotary part (no_rope_layers: P = 0 there, D_nope = nope + rope, one latent
    # cache for all; cache_rope_dim), each head's query scaled by its position (softmax_scaling, adopted: the
    # module's own forward), latents shared across layers (kv_source_layers: latent_source, _latent_sources)
    "mistral_large4_text": ("transformers.models.mistral_large4.modeling_mistral_large4",
                            "MistralLarge4TextAttention"),
    # GLM-5.3-Flash's text decoder (transformers 5.17 on): MLA without a rotary part (NoPE, P = 0) in one layer of
    # four, between linear-attention layers; DSA whose indexer picks pools of keys (index_kpool) plus the tail of the
    # query's own, "shared" layers reusing the previous layer's picks; its layers get the step's own padding mask
    # [B, Q], the keys' padding living in the indexer's cache (local_mask: the latent cache keeps every position)
    "glm5_next_text": ("transformers.models.glm5_next.modeling_glm5_next", "Glm5NextTextAttention"),
    # dots.llm3 (transformers 5.23 on): DSA layers and sliding-window layers (sliding_window: each query over the keys
    # its mask row shows, as key lists) of two latent widths (one cache of the wider, cache_kv_lora_rank), its rope
    # key RMS-normed before the rope (k_rope_only_layernorm, adopted), LoRA scales (q_lora_scale, kv_lora_scale: the
    # module's query_scale and latent_scale; the indexer reads the scaled query) and Ling 3's head-wise gate g_proj
    "dots3_note_text": ("transformers.models.dots3_note.modeling_dots3_note", "Dots3NoteTextAttention"),
}
# a hybrid model's attention modules that are not MLA (by class name): left as they are, with their cache layers
_OTHER_ATTENTION = {"kimi_linear": ("KimiLinearDeltaAttention",), "bailing_hybrid": ("BailingHybridDeltaAttention",),
                    "glm5_next_text": ("Glm5NextTextLinearAttention",)}
_ADOPTED = ("q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj",
            "o_proj")
# the children some models' attention adds, adopted where the original has them: DeepSeek-V3.2's (and GLM-5's,
# A.X-K2's, Hy4's) indexer, Ling 3's head-wise output gate g_proj and Hy4's elementwise one gate_proj
# (``_project_out``), A.X-K2's fused query-and-gate projection q_gate_proj (``_query_and_gate``)
_ADOPTED_IF_PRESENT = ("indexer", "g_proj", "gate_proj", "q_gate_proj", "softmax_scaling", "k_rope_only_layernorm")
# the parameters of its own, likewise: Hy4's attention sinks ``sinks [H]`` (``MLAttention``'s ``attention_sinks``)
_ADOPTED_PARAMETERS = ("sinks",)
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs")  # an nn.Module's forward hooks (the last three: their options)
_NO_STATIC_INDEXER = ("static_latent_cache does not hold the indexer keys of DSA models (DeepSeek-V3.2, GLM-5, "
                      "A.X-K2, Hy4, Mistral Large 4): generate with a DynamicCache (the default)")
INITIAL_HEADROOM_TOKENS = 128  # per sequence, on top of the first call's length, before the cache first grows


# ---------------------------------------------------------------------------------------------
# the transformers-side cache layer and the latent state attached to a Cache
# ---------------------------------------------------------------------------------------------


def _dynamic_layer_class():
    from transformers.cache_utils import DynamicLayer
    return DynamicLayer


def _make_latent_layer_class():
    DynamicLayer = _dynamic_layer_class()

    class LatentCacheLayer(DynamicLayer):
        """A transformers cache layer that counts tokens and stores no K/V.

        ``get_seq_length`` and ``get_mask_sizes`` answer as a ``DynamicLayer`` holding the same tokens would
        (pads included, as transformers counts them); the data lives in the ``PagedLatentCache`` of the
        state shared by the Cache's layers.
        """

        def __init__(self, state: "_LatentState | None" = None):
            super().__init__()
            self.cumulative_length = 0
            self.state = state
            self.indexer_keys = None  # DeepSeek-V3.2's indexer keys [B, KV, D], pads included, as transformers keeps

        def update_indexer(self, indexer_key_states):
            """DeepSeek-V3.2's indexer key cache (transformers' ``DynamicIndexedLayer.update_indexer``): appends
            ``[B, Q, D]`` and returns all of them."""
            if self.indexer_keys is None:
                self.indexer_keys = indexer_key_states
            else:
                self.indexer_keys = torch.cat([self.indexer_keys, indexer_key_states], dim=1)
            # GLM-5.3-Flash's indexer reads the keys counted as keys.shape[-2] of its layer (a DynamicIndexedLayer's
            # K [B, 1, KV, R]): a tensor of that shape holding nothing
            self.keys = indexer_key_states.new_empty(indexer_key_states.shape[0], 1, self.cumulative_length, 0)
            return self.indexer_keys

        def _change_indexer_rows(self, op: str, arg) -> None:
            """The indexer keys follow the rows' changes (each layer holds its own)."""
            keys = self.indexer_keys
            if keys is None:
                return
            if op == "crop":
                self.indexer_keys = keys[:, :keys.shape[1] - arg]
            elif op == "batch_repeat_interleave":
                self.indexer_keys = keys.repeat_interleave(arg, dim=0)
            elif op == "reorder_cache":  # as transformers' DynamicLayer / DynamicIndexedLayer do
                self.indexer_keys = keys.index_select(0, torch.as_tensor(arg, device=keys.device))
            else:  # batch_select_indices
                self.indexer_keys = keys[arg, ...]

        def lazy_initialization(self, key_states, value_states=None):
            self.dtype, self.device = key_states.dtype, key_states.device
            self.keys = torch.empty(0, dtype=self.dtype, device=self.device)
            self.values = torch.empty(0, dtype=self.dtype, device=self.device)
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            _check_latent_update(key_states)
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.cumulative_length += key_states.shape[-2]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.cumulative_length

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.cumulative_length + query_length, 0

        def reset(self) -> None:
            self.cumulative_length = 0
            self.indexer_keys = None
            if self.state is not None:
                self.state.reset()

        def crop(self, tokens_to_remove: int) -> None:
            """Drop the last ``-tokens_to_remove`` tokens of every row (assisted and prompt-lookup decoding discard
            the rejected candidates so). A positive value is the older API's length to keep (transformers 5.17)."""
            n = _tokens_to_crop(tokens_to_remove, self.cumulative_length)
            if not n:
                return
            if self.state is not None:
                self.state.change_rows(self, "crop", n)
            self._change_indexer_rows("crop", n)
            self.cumulative_length -= n

        # transformers' Cache calls these on every layer; the latent state, shared by all, changes its rows once
        # per such round (_LatentState.change_rows). Token counts stay: every row has the same (pads included).

        def reorder_cache(self, beam_idx) -> None:
            """Beam search: row ``i`` takes row ``beam_idx[i]``'s tokens (its sequence forked, sharing full blocks)."""
            if self.state is not None:
                self.state.change_rows(self, "reorder_cache", beam_idx)
            self._change_indexer_rows("reorder_cache", beam_idx)

        def batch_repeat_interleave(self, repeats: int) -> None:
            """Each row ``repeats`` times in a row, as ``Tensor.repeat_interleave(repeats, dim=0)``."""
            if self.state is not None:
                self.state.change_rows(self, "batch_repeat_interleave", repeats)
            self._change_indexer_rows("batch_repeat_interleave", repeats)

        def batch_select_indices(self, indices) -> None:
            """Keep the rows ``indices`` selects (as indexing a tensor's first dimension by it), in that order."""
            if self.state is not None:
                self.state.change_rows(self, "batch_select_indices", indices)
            self._change_indexer_rows("batch_select_indices", indices)

    # picklable (torch.save of a Cache, as transformers' own): found by name through this module's __getattr__
    LatentCacheLayer.__qualname__ = "LatentCacheLayer"
    return LatentCacheLayer


def _check_latent_update(key_states) -> None:
    """The patched attention counts its tokens with empty key states; anything else is transformers' own attention
    (a model unpatched since) handing real K/V to a layer that stores none."""
    if key_states.shape[-1] != 0:
        raise ValueError("this Cache is a patched model's latent cache and holds no transformers K/V: it can't serve "
                         "transformers' own attention (was the model unpatched?); use a new cache")


_LATENT_LAYER_CLASS = None
# The cache layer classes are made once, under this lock: their identity matters (a Cache's layers are recognised by
# isinstance, and pickled by this module's name), and two threads' first forward passes at once each made one, the
# loser's layers then of a class the module no longer named (its next step refused them, pickling them failed)
_CLASS_LOCK = _utils.ForkSafeLock()  # (a child forked while another thread made a class makes its own)


def _latent_layer_class():
    global _LATENT_LAYER_CLASS
    if _LATENT_LAYER_CLASS is None:
        with _CLASS_LOCK:
            if _LATENT_LAYER_CLASS is None:
                _LATENT_LAYER_CLASS = _make_latent_layer_class()
    return _LATENT_LAYER_CLASS


def __getattr__(name):
    if name == "LatentCacheLayer":
        return _latent_layer_class()
    if name == "StaticLatentCacheLayer":
        return _static_layer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _outside_compiled_graphs(reason: str):
    """``torch.compiler.disable`` with the ``reason`` a fullgraph compile reports (torch 2.11 and 2.13 take one)."""
    try:
        return torch.compiler.disable(recursive=True, reason=f"mla_kernels: {reason}")
    except TypeError:  # a torch without reason=
        return torch.compiler.disable(recursive=True)


class _LatentState:
    """The latent cache behind one transformers Cache: the paged cache, one sequence per batch row, and
    the step every layer is on (all layers of one forward share one slot reservation)."""

    def __init__(self, num_layers: int, block_size: int, max_cache_tokens: int | None):
        self.num_layers = num_layers
        self.block_size = block_size
        self.max_cache_tokens = max_cache_tokens
        self.reset()

    def reset(self) -> None:
        self.paged: PagedLatentCache | None = None
        self.rows: list | None = None
        self.steps = 0
        self.calls: dict[int, int] = {}
        self.current: tuple[LatentBatch, torch.Tensor | None] | None = None
        self.current_shape: tuple[int, int] | None = None
        self._started = False  # _every_row_started
        self._table_owner: PagedLatentCache | None = None  # _block_table_host's cache, table and filled lengths
        self._table: torch.Tensor | None = None
        self._table_len: list[int] = []
        self._round: tuple | None = None  # change_rows: (what, its argument, ids of the layers that have called)
        # positions of the steps so far, newest last, as [positions, None] (every position real in every row; runs of
        # such steps merged) or [positions, real tokens, real tokens before the first pad, after the last] per row
        # (a step with pads): what crop must remove
        self._history: list[list] = []
        # set when a layer raised after its step was reserved and counted (its indexer, attend, a KeyboardInterrupt):
        # its slots may never have been written, and with every layer counted alike the next call would read them
        # (the Cache cannot tell how far the layer got; reset() clears it with everything else)
        self.failed: str | None = None

    def batch_for(self, layer_idx: int, attn: "TransformersMLAttention", batch_size: int, query_len: int,
                  attention_mask, dtype: torch.dtype, device: torch.device):
        """The step's ``(LatentBatch, _Packing | None)``: the first layer of a step finds the real tokens (reading
        their counts, the step's one read of the device) and reserves their slots; the other layers of the step get
        the same."""
        if self.failed is not None:
            raise RuntimeError(f"{self.failed}: a forward pass was interrupted; start over with a new cache")
        calls = self.calls.get(layer_idx, 0)
        if calls != self.steps:  # a later layer of the step: the layers before it stored the step
            try:  # refused, it marks the Cache failed, so its next call is refused before it reserves anything
                self._check_later_layer(attn, layer_idx, calls, batch_size, query_len)
            except (ValueError, RuntimeError) as exc:
                self.failed = f"layer {layer_idx} refused its step ({exc})"
                raise
            self.calls[layer_idx] = calls + 1
            return self.current
        self._check_fits(attn)
        if self.rows is not None and len(self.rows) != batch_size:  # (before the mask's checks, which are per row:
            # a decode step's compared the rows' lengths with the mask's and failed inside torch, naming neither)
            raise ValueError(f"the Cache (past_key_values / cache) holds {len(self.rows)} sequences but this call "
                             f"has a batch of {batch_size}; use a new cache for a new batch")
        cached = [0] * batch_size if self.rows is None else [self.paged.seqlen(r) for r in self.rows]
        if attn.local_mask:  # GLM-5.3-Flash: every position kept, pads too (its picks number the keys so)
            packing = None
        elif query_len == 1 and self._every_row_started():  # a decode step: nothing read back from the GPU
            real = _assert_real(attention_mask, batch_size, query_len)
            if real is not None:  # before anything is reserved; the lengths go up, nothing comes back
                lens = torch.tensor(cached, dtype=torch.int32, pin_memory=_utils.pin_host(real.device))
                _assert_history(attention_mask, real, _utils.to_device(lens, real.device))
            elif attention_mask is None:  # (sdpa's mask builder passes none for a one-token step of a batch it
                self._check_no_pads_cached(cached)  # thinks unpadded: the caller left the padding mask out)
            packing = None
        else:
            packing = _real_tokens(attention_mask, batch_size, query_len, cached)
        counts = [query_len] * batch_size if packing is None else packing.counts
        self._check_split_keys(attn, max((c + n for c, n in zip(cached, counts)), default=0))
        self.current = (self._new_step(attn, batch_size, query_len, packing, dtype, device), packing)
        self.current_shape = (batch_size, query_len)
        if packing is not None and sum(packing.counts) < batch_size * query_len:
            self._history.append([query_len, list(packing.counts), *(packing.ends or (None, None))])
        elif self._history and self._history[-1][1] is None:
            self._history[-1][0] += query_len
        else:
            self._history.append([query_len, None])
        self.steps += 1
        self._round = None
        self.calls[layer_idx] = calls + 1
        return self.current

    def _check_no_pads_cached(self, cached: list[int]) -> None:
        """A step without a mask shows the query every earlier position, pads included, which the latent cache
        never stored: refused where an earlier step skipped some (a row holds fewer tokens than the steps fed).
        From the host's bookkeeping: nothing read back."""
        total = sum(step[0] for step in self._history)
        short = next((b for b, n in enumerate(cached) if n != total), None)
        if short is not None:
            raise ValueError(f"attention_mask is None in a one-token step, but earlier steps had left padding that "
                             f"the latent cache skipped (row {short} holds {cached[short]} of the {total} positions "
                             f"fed): without a mask the model would attend to those pads; pass the padding mask, "
                             f"extended by the new token, as generate does")

    def _check_later_layer(self, attn: "TransformersMLAttention", layer_idx: int, calls: int, batch_size: int,
                           query_len: int) -> None:
        """The checks of a layer after the step's first: the same model, the same step, its own ``split_tokens``."""
        self._check_fits(attn)
        if calls != self.steps - 1:
            raise RuntimeError(f"layer {layer_idx} is at step {calls} of its latent cache but the model is at step "
                               f"{self.steps}: a forward pass was interrupted; start over with a new cache")
        if self.current_shape != (batch_size, query_len):
            raise RuntimeError(f"layer {layer_idx} got {batch_size}x{query_len} tokens in a step where the first layer "
                               f"got {self.current_shape[0]}x{self.current_shape[1]}")
        self._check_split_keys(attn, self.current[0].max_seqlen_k)

    @staticmethod
    def _check_split_keys(attn: "TransformersMLAttention", keys: int) -> None:
        """``attend``'s bound on the layer's ``split_tokens`` for a step whose longest row holds ``keys`` tokens,
        checked before the step is reserved or counted: refused by ``attend`` after that, the step stayed counted with
        its slots unwritten, and the Cache, called again, attended to them silently (or refused as interrupted). A
        V3.2 layer's sparse step cuts its key lists instead, known after its indexer: ``attend`` checks those."""
        if attn.split_tokens is not None and "indexer" not in attn._modules and not attn.shared_topk:
            check_split_keys(attn.split_tokens, keys, "the step's longest sequence")

    def _check_fits(self, attn: "TransformersMLAttention") -> None:
        """Refuse, before anything is counted, reserved or stored, a Cache another model filled: other widths were
        refused only after the first layer had reserved and counted the step (the Cache then unusable), and more
        layers only at the first layer past the Cache's, after the others had stored the step, which the Cache's
        own model then went on from silently. Host ints only."""
        paged = self.paged
        if attn.num_latent_layers != self.num_layers or (paged is not None and (
                paged.kv_lora_rank, paged.rope_dim) != (attn.cache_latent, attn.cache_rope)):
            widths = "" if paged is None else f", kv_lora_rank {paged.kv_lora_rank}, qk_rope_head_dim {paged.rope_dim}"
            raise ValueError(f"this Cache (past_key_values / cache) holds the latent of another model: "
                             f"{self.num_layers} MLA layers{widths}; this model has {attn.num_latent_layers}, "
                             f"{attn.cache_latent}, {attn.cache_rope}: use a new cache (a DynamicCache, or none) "
                             f"for each model")

    def _every_row_started(self) -> bool:
        """Whether every row has a real token cached. Padding is on the left, so a one-token step can hold a pad only
        for a row that has none yet: a prompt fed one token at a time (``generate(prefill_chunk_size=1)``) takes
        the prompt step's path (one read of the mask's counts) until each row has started; from then on a step of
        one token is a decode step, read nothing back and only checks on the device that it is real. Once true,
        true for good (lengths only grow)."""
        if not self._started and self.rows is not None and self.paged is not None:
            self._started = all(self.paged.seqlen(r) > 0 for r in self.rows)
        return self._started

    def _new_step(self, attn, batch_size, query_len, packing, dtype, device) -> LatentBatch:
        if self.paged is None:
            per_row = math.ceil((query_len + INITIAL_HEADROOM_TOKENS) / self.block_size)
            blocks = max(1, batch_size * per_row)
            if self.max_cache_tokens is not None:
                blocks = max(1, min(blocks, self.max_cache_tokens // self.block_size))
            self.paged = PagedLatentCache(self.num_layers, blocks, self.block_size, attn.cache_latent,
                                          attn.cache_rope, dtype=attn.cache_dtype or dtype, device=device,
                                          rope_dtype=dtype)
        if self.paged.rope_dtype != dtype:
            raise TypeError(f"the latent cache holds {self.paged.rope_dtype} but the model now computes in {dtype}")
        if self.rows is None:  # (a batch of another size is refused by batch_for)
            self.rows = [self.paged.add_sequence() for _ in range(batch_size)]
        counts = [query_len] * batch_size if packing is None else packing.counts
        try:
            slots = self.paged._reserve_host(self.rows, counts)
        except CacheFullError:
            self._grow(self.paged.blocks_needed(self.rows, counts))
            slots = self.paged._reserve_host(self.rows, counts)
        return LatentBatch._from_host(self.paged, self.rows, counts, slots,
                                      [self.paged.seqlen(r) for r in self.rows], self._block_table_host())

    def _block_table_host(self) -> torch.Tensor:
        """The rows' block table on the host, ``[B, W]`` for the longest row's W blocks, kept up to date
        incrementally: a decode step adds at most one block per row, so rebuilding the whole table (B x W Python
        ints, ~1 ms at B 16 and 32k tokens) every step would cost more than the step's attention."""
        paged = self.paged
        seqs = [paged._get(r) for r in self.rows]
        with torch.inference_mode(False):  # written in place by later steps, which may run outside inference_mode
            if self._table_owner is not paged:
                self._table_owner, self._table, self._table_len = paged, torch.zeros(len(seqs), 1, dtype=torch.int32), \
                    [0] * len(seqs)
            longest = max((len(seq.blocks) for seq in seqs), default=0)
            if longest > self._table.shape[1]:
                wider = torch.zeros(len(seqs), max(longest, 2 * self._table.shape[1]), dtype=torch.int32)
                wider[:, :self._table.shape[1]] = self._table
                self._table = wider
            for b, seq in enumerate(seqs):
                done = self._table_len[b]
                if len(seq.blocks) > done:
                    self._table[b, done:len(seq.blocks)] = torch.tensor(seq.blocks[done:], dtype=torch.int32)
                    self._table_len[b] = len(seq.blocks)
        return self._table[:, :max(1, longest)]

    def change_rows(self, layer, what: str, arg) -> None:
        """A cache layer's ``reorder_cache(beam_idx)``, ``batch_repeat_interleave(repeats)`` or
        ``batch_select_indices(indices)`` (``what``, with its ``arg``): transformers' Cache calls it on every layer
        with the same argument, but the rows are shared, so the first call of such a round changes them and the other
        layers' calls of the round do nothing. A call starts a new round unless it has the round's kind and argument
        (the same tensor object) and comes from a layer that has not called in it; a forward step ends the round."""
        current = self._round
        if current is not None and current[0] == what and _same_argument(current[1], arg) and \
                id(layer) not in current[2]:
            current[2].add(id(layer))
            return
        if self.rows is None:  # nothing is cached yet: the first step makes the rows
            pass
        elif what == "crop":
            self._crop_rows(arg)
        else:
            self._select_rows(_source_rows(what, arg, len(self.rows)))
        self._round = (what, arg, {id(layer)})

    def _crop_rows(self, n: int) -> None:
        """Every row drops its last ``n`` positions (``PagedLatentCache.truncate``). Pads are never stored, so a row
        loses the real tokens among them, counted from ``_history``: every position of a step without pads; of a
        padded step, the real tokens after the cut, known exactly when a row's pads are one run (left, right or middle
        padding; a step of prompt and speculative candidates is left-padded). Otherwise ``NotImplementedError``,
        and nothing changes."""
        paged, removed, remaining, history = self.paged, [0] * len(self.rows), n, [list(e) for e in self._history]
        while remaining and history:
            positions, counts = history[-1][:2]
            take = min(remaining, positions)
            if counts is None:
                removed = [r + take for r in removed]
            elif take == positions:
                removed = [r + c for r, c in zip(removed, counts)]
            else:  # the step's first positions - take stay: each row's pads and real tokens as they lay
                kept = [_keep_positions(positions, *row, positions - take, n) for row in zip(*history[-1][1:])]
                removed = [r + c - k[0] for r, c, k in zip(removed, counts, kept)]
                history[-1][1:] = [list(column) for column in zip(*kept)]
            remaining -= take
            if take == positions:
                history.pop()
            else:
                history[-1][0] -= take
        lengths = [paged.seqlen(row) - r for row, r in zip(self.rows, removed)]
        if remaining or min(lengths) < 0:  # the steps recorded and the rows disagree: change nothing
            raise RuntimeError(f"crop({-n}): the latent cache's rows do not hold the tokens its steps recorded; "
                               "start over with a new cache")
        needed = paged._truncate_blocks_needed(self.rows, lengths)
        if needed > paged.num_free_blocks:  # shared tails to copy (rows of a beam search): make room first
            self._grow(needed)
            paged = self.paged
        for row, length in zip(self.rows, lengths):
            paged.truncate(row, length)
        self._history = history
        if self._table_owner is paged:  # a row's last block may be a new copy: rewrite from its last full block
            self._table_len = [min(done, length // paged.block_size) for done, length in zip(self._table_len, lengths)]
        if min(lengths) == 0:
            self._started = False

    def _select_rows(self, src: list[int]) -> None:
        """Row ``i`` becomes a sequence holding old row ``src[i]``'s tokens. Each source used keeps its sequence for
        one of its rows (its own row if it is one), the other rows get forks (sharing the full blocks, the last
        partly filled one copied), and sequences no row uses are freed, all in one step of the paged cache (grown
        first if the copies need more blocks than the frees return). The host block table follows by a row gather."""
        old, paged = self.rows, self.paged
        if src == list(range(len(old))):
            return
        keeper = {j: i for i, j in enumerate(src) if i == j}
        for i, j in enumerate(src):
            keeper.setdefault(j, i)
        forked = [i for i, j in enumerate(src) if keeper[j] != i]
        sources = [old[src[i]] for i in forked]
        release = [seq for j, seq in enumerate(old) if j not in keeper]
        needed = paged._fork_blocks_needed(sources, release)
        if needed > paged.num_free_blocks:
            self._grow(needed)
        new_ids = self.paged._fork_batch(sources, release=release)
        self._history = [[entry[0]] + [None if column is None else [column[j] for j in src] for column in entry[1:]]
                         for entry in self._history]
        rows = [old[j] for j in src]
        for i, new_id in zip(forked, new_ids):
            rows[i] = new_id
        if self._table_owner is self.paged:  # forks share their source's blocks but the last partly filled one
            table_len = [self._table_len[j] for j in src]
            for i in forked:
                table_len[i] = min(table_len[i], self.paged.seqlen(rows[i]) // self.block_size)
            with torch.inference_mode(False):  # (as _block_table_host's)
                self._table = self._table.index_select(0, torch.tensor(src, dtype=torch.int64))
            self._table_len = table_len
        self.rows = rows

    def _grow(self, blocks_needed: int) -> None:
        """Move everything into a cache with at least twice the blocks (and room for ``blocks_needed``), at the same
        block ids (``PagedLatentCache._grown``: shared blocks stay shared); ``CacheFullError`` if that would pass
        ``max_cache_tokens``."""
        old = self.paged
        used = old.num_blocks - old.num_free_blocks
        blocks = max(2 * old.num_blocks, used + blocks_needed)
        if self.max_cache_tokens is not None:
            cap = self.max_cache_tokens // self.block_size
            if used + blocks_needed > cap:
                raise CacheFullError(
                    f"the latent cache is full: {used} blocks of {self.block_size} tokens in use, {blocks_needed} more "
                    f"needed, max_cache_tokens={self.max_cache_tokens} allows {cap}; pass a larger max_cache_tokens "
                    f"to patch_model")
            blocks = min(blocks, cap)
        self.paged = old._grown(blocks)  # whole buffers copied on the device: nothing read back
        if self._table_owner is old:  # same block ids: the host table stays right
            self._table_owner = self.paged


def _keep_positions(positions: int, count: int, lead: int | None, trail: int | None, keep: int,
                    n: int) -> tuple[int, int, int]:
    """A padded step's row (``count`` real tokens in ``positions``, ``lead`` of them before its first pad and
    ``trail`` after its last) cut to its first ``keep`` positions: ``(count, lead, trail)`` after. Exact when the pads
    are one run (left, right or middle padding); otherwise where the real tokens lie is not known here."""
    pads = positions - count
    if pads == 0:
        return keep, keep, keep
    if lead is None or lead + trail != count:
        raise NotImplementedError(f"crop({-n}) ends inside a step whose rows held pads in more than one run; the "
                                  "latent cache keeps no pad positions, so it can't cut that step")
    if keep <= lead:
        return keep, keep, keep
    if keep <= lead + pads:
        return lead, lead, 0
    return keep - pads, lead, keep - lead - pads


def _tokens_to_crop(tokens_to_remove, cached: int) -> int:
    """How many tokens ``crop(tokens_to_remove)`` drops from a layer holding ``cached``: ``-tokens_to_remove`` for the
    current API (0 or negative); a positive value is the older one's length to keep (nothing if it is not below
    ``cached``), as transformers' DynamicLayer reads it in 5.17."""
    tokens_to_remove = _utils.as_int("tokens_to_remove", tokens_to_remove)  # numpy ints too
    if tokens_to_remove > 0:
        return max(0, cached - tokens_to_remove)
    if -tokens_to_remove > cached:
        raise ValueError(f"crop({tokens_to_remove}) removes more tokens than the {cached} cached")
    return -tokens_to_remove


def _same_argument(a, b) -> bool:
    """Whether two calls of a ``change_rows`` round got the same argument: the same tensor object, or equal
    non-tensor values (an int ``repeats``, a list of indices)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    try:
        return bool(a == b)
    except Exception:  # an argument whose == is not a truth value
        return False


def _source_rows(what: str, arg, num_rows: int) -> list[int]:
    """The old row each new row takes its tokens from, as host ints (a device tensor argument is read once):
    ``reorder_cache(beam_idx)`` as ``index_select(0, beam_idx)``, ``batch_repeat_interleave(repeats)`` as
    ``repeat_interleave(repeats, dim=0)``, ``batch_select_indices(indices)`` as ``[indices]`` on the first
    dimension, which transformers' DynamicLayer applies to its K/V."""
    rows = torch.arange(num_rows)
    if what == "batch_repeat_interleave":
        if isinstance(arg, torch.Tensor):
            arg = arg.cpu()
            if arg.is_floating_point() or arg.is_complex() or arg.dtype == torch.bool or arg.dim() > 1:
                raise ValueError(f"repeats must be a non-negative int or an int tensor of one count per row, "
                                 f"got {arg!r}")
        else:
            arg = _utils.check_int("repeats", arg, 0)
        try:
            return rows.repeat_interleave(arg).tolist()
        except RuntimeError as err:  # a count per row of another length, a negative count
            raise ValueError(f"repeats must repeat the cache's {num_rows} rows, got {arg!r}: {err}") from None
    name = "beam_idx" if what == "reorder_cache" else "indices"
    if isinstance(arg, torch.Tensor):
        arg = arg.cpu()  # the round's one read of the device
    try:
        picked = rows.index_select(0, torch.as_tensor(arg)) if what == "reorder_cache" else rows[arg]
    except (IndexError, RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"{name} must select rows of the cache's {num_rows} (an index over the batch), got "
                         f"{arg!r}: {err}") from None
    if picked.dim() != 1:
        raise ValueError(f"{name} must select a list of rows (a 1-D index), got {arg!r}")
    return picked.tolist()


def latent_cache(past_key_values) -> PagedLatentCache | None:
    """The ``PagedLatentCache`` a patched model keeps behind a transformers Cache (None before first use)."""
    state = getattr(past_key_values, "_mla_latent_state", None)
    return None if state is None else state.paged


def _latent_state(past_key_values, layer_idx: int, num_layers: int, block_size: int,
                  max_cache_tokens) -> _LatentState:
    """The Cache's latent state (a new one, not yet attached, on first use), its layer ``layer_idx`` checked for
    ``_attach``; changes nothing. A step checks the Cache so, then reserves (``batch_for``), and attaches only once
    that is accepted: a fresh Cache whose first step was refused (a mask the kernels do not compute, whose error
    advises the unpatched model) had become a latent cache, which the unpatched model then refused."""
    from transformers.cache_utils import Cache
    if not isinstance(past_key_values, Cache):
        raise TypeError(f"the patched model takes a transformers Cache (past_key_values, or cache from transformers "
                        f"5.25 on): a DynamicCache, static_latent_cache(...) or None, got "
                        f"{type(past_key_values).__name__}; transformers' continuous batching (generate_batch, "
                        f"PagedAttentionCache) is not supported: unpatch_model(model) to use it")
    layers = past_key_values.layers
    if layer_idx < len(layers):
        layer = layers[layer_idx]
        if not isinstance(layer, _latent_layer_class()):
            dynamic_cls = _dynamic_layer_class()
            # (V3.2's indexed layers; the DummyLayer of a layer attending over another's latent, Mistral Large 4's)
            fresh_kind = type(layer) is dynamic_cls or type(layer).__name__ in ("DynamicIndexedLayer", "DummyLayer",
                                                                               "DynamicSlidingWindowLayer")
            if not fresh_kind:  # a StaticCache (generate's cache_implementation="static"), offloaded, ...
                raise ValueError(f"the Cache's (past_key_values / cache) layer {layer_idx} is a "
                                 f"{type(layer).__name__}, which the patched model can't use: pass a fresh "
                                 f"DynamicCache (or none), or static_latent_cache(model, max_batch_size, "
                                 f"max_cache_len) for a preallocated one (not for DSA models, DeepSeek-V3.2, "
                                 f"GLM-5, A.X-K2, Hy4, Mistral Large 4 and GLM-5.3-Flash, whose indexer keys it does "
                                 f"not hold)")
            if type(layer).__name__ != "DummyLayer" and layer.get_seq_length() != 0:
                raise ValueError(f"the Cache's (past_key_values / cache) layer {layer_idx} is a "
                                 f"{type(layer).__name__} holding {layer.get_seq_length()} tokens of transformers K/V; "
                                 f"the patched model keeps its own latent cache: pass a fresh DynamicCache (or none) "
                                 f"and keep passing the one it returns")
    elif getattr(past_key_values, "layer_class_to_replicate", None) is None:
        raise ValueError(f"the Cache (past_key_values / cache) has {len(layers)} layers, fewer than the model's layer "
                         f"{layer_idx}")
    state = getattr(past_key_values, "_mla_latent_state", None)
    return _LatentState(num_layers, block_size, max_cache_tokens) if state is None else state


def _attach(past_key_values, layer_idx: int, num_layers: int, block_size: int, max_cache_tokens,
            state: _LatentState | None = None) -> _LatentState:
    """The Cache's latent state (created on first use, or ``state`` from ``_latent_state``), with its layer
    ``layer_idx`` a LatentCacheLayer."""
    if state is None:
        state = _latent_state(past_key_values, layer_idx, num_layers, block_size, max_cache_tokens)
    if getattr(past_key_values, "_mla_latent_state", None) is not state:
        past_key_values._mla_latent_state = state
    latent_cls = _latent_layer_class()
    layers = past_key_values.layers
    if getattr(past_key_values, "layer_class_to_replicate", None) is not None:
        past_key_values.layer_class_to_replicate = functools.partial(latent_cls, state)  # (picklable)
        while len(layers) <= layer_idx:
            layers.append(latent_cls(state))
    layer = layers[layer_idx]
    if not isinstance(layer, latent_cls):  # a fresh DynamicLayer (checked by _latent_state)
        layers[layer_idx] = latent_cls(state)
    elif layer.state is not state:
        layer.state = state
    return state


class _Packing(NamedTuple):
    """A prompt's real (not padding) new tokens: ``counts`` per row (host ints) and ``index [T]`` (int64, on the
    device), their positions in the ``[B * Q]`` flattened batch in row-major order (what ``x[real]`` packs), for
    ``index_select`` and ``index_copy_``: packing and unpacking by it reads nothing back, unlike a boolean mask."""
    counts: list[int]
    index: torch.Tensor
    ends: tuple[list[int], list[int]] | None = None  # real tokens before each row's first pad and after its last


def _real_tokens(attention_mask, batch_size: int, query_len: int, cached: list[int]) -> _Packing | None:
    """The new tokens' ``_Packing``, or None when all are real. Reads the mask's per-row counts on the host (and the
    real tokens before each row's first pad and after its last, which a later ``crop`` needs), with ``_mask_fits``'s
    verdict: one synchronisation on a GPU, once per step (decode steps use ``_assert_real``). The same read brings
    the earlier keys the mask lets each row see, which must be its ``cached`` tokens (``_HIDDEN_HISTORY``)."""
    real = _visible_new_tokens(attention_mask, batch_size, query_len)
    if real is None:
        return None
    run = real.to(torch.int32)
    lead, trail = run.cumprod(1).sum(1), run.flip(1).cumprod(1).sum(1)
    host = _read_checked([real.sum(1), lead, trail, _visible_past(attention_mask, real)],
                         _mask_fits(attention_mask, real))
    _check_history(host[3 * batch_size:], cached)
    packing = _packing(real, host[:batch_size])
    return None if packing is None else packing._replace(ends=(host[batch_size:2 * batch_size], host[2 * batch_size:]))


# what a 4-D mask may hide: keys its last row hides (pads), and causally the keys after a query's own position
_UNFIT_MASK = ("the patched attention computes causal attention over the tokens the attention mask's last query "
               "row may see (left or right padding), but this 4-D attention_mask hides other keys from some real "
               "token (packed documents with a block-diagonal mask, a per-head or other custom mask): not supported; "
               "run such masks with the unpatched model (mla_kernels.unpatch_model)")


# a mask may hide pads, which are never cached, but not a token the row has cached: the kernels attend to all of those
_HIDDEN_HISTORY = ("the patched model attends to every token a row has cached (every real token it was given, never a "
                   "pad it hid), so a later attention mask must show each row exactly those: it cannot hide a cached "
                   "token (e.g. a row padded after its EOS in an earlier turn, with mask 1, then masked in the next) "
                   "nor show a pad an earlier step hid; keep the earlier turns' mask as it was, or start over with a "
                   "new cache")


_HIDDEN_HISTORY_DEVICE = ("mla_kernels: the attention mask's last query row sees other earlier keys than the tokens "
                          "its row has cached; " + _HIDDEN_HISTORY)


def _visible_past(attention_mask, real: torch.Tensor) -> torch.Tensor:
    """``[B]`` int32 on the mask's device: the keys before the step's new tokens that the mask's last query row sees
    (every key it sees, less the new tokens that are real; ``real`` from ``_visible_new_tokens``)."""
    row = attention_mask[:, 0, -1] if attention_mask.dim() == 4 else attention_mask
    return (_sees(row).sum(-1) - real.sum(-1)).to(torch.int32).expand(real.shape[0])


def _check_history(seen: list[int], cached: list[int]) -> None:
    """``_HIDDEN_HISTORY`` as a ValueError where a row's mask sees other than its ``cached`` tokens (host ints)."""
    for b, (s, c) in enumerate(zip(seen, cached)):
        if s != c:
            raise ValueError(f"row {b}: the attention mask's last query row sees {s} earlier keys, but the row has "
                             f"{c} cached tokens; {_HIDDEN_HISTORY}")


def _assert_history(attention_mask, real: torch.Tensor, cached: torch.Tensor) -> None:
    """``_check_history`` on the device, without waiting (a decode step): ``real`` from ``_visible_new_tokens``,
    ``cached [B]`` the rows' lengths there."""
    torch._assert_async((_visible_past(attention_mask, real) == cached).all(), _HIDDEN_HISTORY_DEVICE)


def _read_checked(parts: list[torch.Tensor], fits: torch.Tensor | None) -> list[int]:
    """``parts`` (1-D integer tensors on one device) as one host list, in one copy that also brings ``fits``
    (``_mask_fits``'s verdict; None: nothing to check), refused with a ValueError when False."""
    if fits is not None:
        parts = parts + [fits.view(1).to(parts[0].dtype)]
    host = torch.cat(parts).tolist()
    if fits is not None and not host.pop():
        raise ValueError(_UNFIT_MASK)
    return host


def _mask_fits(attention_mask, real: torch.Tensor, columns: torch.Tensor | None = None,
               rows_per_block: int = 256) -> torch.Tensor | None:
    """0-dim bool on the mask's device, computed there (None without a 4-D mask): whether every real new token's
    row of the 4-D mask, in every head, is exactly what the kernels compute: the keys the last row sees, up to the
    token's own column (the last ``Q`` columns, or ``columns`` for a static cache); and every pad's row (``real
    [B, Q]`` from ``_visible_new_tokens``) sees no pad, or everything. Without this a packed-documents mask was
    read as padding and gave other outputs silently. Compared in blocks of query rows, so no ``[B, H, Q, KV]``
    temporary is made at once (the mask itself is that large)."""
    if attention_mask is None or attention_mask.dim() != 4:
        return None
    kv_len, query_len = attention_mask.shape[-1], real.shape[1]
    pos = columns if columns is not None else torch.arange(kv_len - query_len, kv_len, device=real.device)
    key = torch.arange(kv_len, device=real.device)
    last = _sees(attention_mask[:, :, -1:, :])  # [B, Hm, 1, KV]
    fits = torch.ones((), dtype=torch.bool, device=real.device)
    for start in range(0, attention_mask.shape[2], rows_per_block):
        stop = min(start + rows_per_block, attention_mask.shape[2])
        sees = _sees(attention_mask[:, :, start:stop, :])  # [B, Hm, rows, KV]
        expected = last & (key <= pos[start:stop, None])  # [B, Hm, rows, KV]
        # a pad's row sees no pad (left padding: nothing; right padding: the real tokens before it), or everything
        # (sdpa's fix for fully masked rows); a row that sees "pads" is a real token read as one (packed documents)
        pad_ok = ~(sees & ~last).any(-1) | sees.all(-1)
        ok = torch.where(real[:, None, start:stop], (sees == expected).all(-1), pad_ok)  # [B, Hm, rows]
        fits = fits & ok.all()
    return fits


def _sees(mask: torch.Tensor) -> torch.Tensor:
    """A mask's entries as bool, True where attention is allowed (bool masks, additive float masks as eager
    attention gets them, 0/1 integer masks)."""
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point():
        return mask > torch.finfo(mask.dtype).min / 2
    return mask != 0


def _packing(real: torch.Tensor, counts: list[int]) -> _Packing | None:
    """``real [B, Q]`` bool with its per-row ``counts`` (host) as a ``_Packing`` (None if every token is real),
    built on the device without a read: a stable sort puts the real tokens' flat positions first, in order."""
    if all(n == real.shape[1] for n in counts):
        return None
    order = torch.argsort(real.reshape(-1).logical_not().to(torch.uint8), stable=True)
    return _Packing(counts, order[:sum(counts)])


def _pack(x: torch.Tensor, packing: _Packing) -> torch.Tensor:
    """``x [B, Q, ...]`` -> ``[T, ...]``, the real tokens only (``x[real]`` without the read)."""
    return x.flatten(0, 1).index_select(0, packing.index)


def _unpack(packed: torch.Tensor, packing: _Packing, batch_size: int, query_len: int) -> torch.Tensor:
    """``packed [T, ...]`` -> ``[B, Q, ...]`` with zeros at the pads (``out[real] = packed`` without the read)."""
    out = packed.new_zeros(batch_size * query_len, *packed.shape[1:])
    return out.index_copy_(0, packing.index, packed).view(batch_size, query_len, *packed.shape[1:])


def _assert_real(attention_mask, batch_size: int, query_len: int) -> torch.Tensor | None:
    """Check on the device, without waiting for it, that every new token is real: a decode step stores them all.
    (transformers' generate never feeds a pad after the prompt; a mask that hides a new token fails a device
    assertion rather than silently caching a pad.) Returns ``_visible_new_tokens``'s ``real`` (None without a
    mask) for the step's other checks."""
    real = _visible_new_tokens(attention_mask, batch_size, query_len)
    if real is not None:
        torch._assert_async(real.all(), "mla_kernels: the attention mask hides a new token of a one-token step "
                                        "after every row has started (a pad after a real token); the patched "
                                        "model's latent cache only skips left padding")
    return real


def _visible_new_tokens(attention_mask, batch_size: int, query_len: int,
                        columns: torch.Tensor | None = None) -> torch.Tensor | None:
    """``[B, Q]`` bool on the mask's device, computed there: which new tokens the last query may attend to (a pad
    is one it may not), from the 4-D mask (bool, or additive float as eager attention gets it) or a 2-D
    ``[B, KV]`` padding mask. The new tokens are the last Q columns, or ``columns`` (a device index ``[Q]``) for
    a static cache, whose mask spans its whole capacity. None without a mask."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask of type {type(attention_mask).__name__} is not supported (use the eager "
                        f"or sdpa attention implementation)")
    if attention_mask.dim() == 4:
        row = attention_mask[:, 0, -1]
    elif attention_mask.dim() == 2:
        row = attention_mask
    else:
        raise ValueError(f"attention_mask must be 4-D [B, 1, Q, KV] or 2-D [B, KV], got shape "
                         f"{tuple(attention_mask.shape)}")
    row = row[:, -query_len:] if columns is None else row.index_select(1, columns)
    return _sees(row).expand(batch_size, query_len)


def _rope_tables(position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``position_embeddings`` as ``(cos, sin)`` ``[B, Q, P]``: V3 passes that tuple, V2 a
    complex ``freqs_cis [B, Q, P/2]``."""
    if isinstance(position_embeddings, torch.Tensor) and position_embeddings.is_complex():
        real, imag = position_embeddings.real, position_embeddings.imag
        return torch.cat((real, real), dim=-1), torch.cat((imag, imag), dim=-1)
    if isinstance(position_embeddings, (tuple, list)) and len(position_embeddings) == 2:
        return position_embeddings[0], position_embeddings[1]
    raise TypeError("position_embeddings must be (cos, sin) (DeepSeek-V3) or complex freqs_cis (DeepSeek-V2), got "
                    f"{type(position_embeddings).__name__}")


# ---------------------------------------------------------------------------------------------
# static mode: preallocated batch and length, metadata computed on the device (torch.compile, CUDA graphs)
# ---------------------------------------------------------------------------------------------


def _make_static_layer_class():
    from transformers.cache_utils import StaticLayer

    class StaticLatentCacheLayer(StaticLayer):
        """A transformers static cache layer that counts tokens on the device and stores no K/V (the latent lives
        in the ``PagedLatentCache`` of the Cache's ``_StaticLatentState``). ``get_seq_length`` and
        ``get_mask_sizes`` answer as transformers' ``StaticLayer``: pads included, masks over the whole capacity."""

        def __init__(self, max_cache_len: int, state: "_StaticLatentState", layer_idx: int):
            super().__init__(max_cache_len)
            self.state, self.layer_idx = state, layer_idx
            self.dtype, self.device = state.paged.dtype, state.paged.device
            self.keys = torch.empty(0, dtype=self.dtype, device=self.device)
            self.values = torch.empty(0, dtype=self.dtype, device=self.device)
            self.cumulative_length = self.cumulative_length.to(self.device)
            if not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(self.cumulative_length)
            self.is_initialized = True

        def lazy_initialization(self, key_states, value_states=None):
            pass

        def update(self, key_states, value_states, *args, **kwargs):
            _check_latent_update(key_states)
            self.cumulative_length.add_(key_states.shape[-2])
            return self.keys, self.values

        def reset(self) -> None:
            self.cumulative_length.zero_()
            self.state.seqlens[self.layer_idx].zero_()

        def crop(self, tokens_to_remove: int) -> None:
            raise NotImplementedError("the static latent cache (static_latent_cache) can't be cropped (assisted or "
                                      "prompt-lookup decoding); the patched model's default cache (a DynamicCache, "
                                      "or none) supports it")

        # each row owns a fixed range of blocks here (no block table to rewrite): rows can't share or trade blocks
        def reorder_cache(self, beam_idx) -> None:
            raise NotImplementedError("beam search is not supported by the static latent cache (static_latent_cache); "
                                      "the patched model's default cache (a DynamicCache, or none) supports it")

        def batch_repeat_interleave(self, repeats: int) -> None:
            raise NotImplementedError("expanding a static latent cache over the batch is not supported; the patched "
                                      "model's default cache (a DynamicCache) supports it")

        def batch_select_indices(self, indices) -> None:
            raise NotImplementedError("selecting batch rows of a static latent cache is not supported; the patched "
                                      "model's default cache (a DynamicCache) supports it")

    # picklable (torch.save of a static latent cache): found by name through this module's __getattr__
    StaticLatentCacheLayer.__qualname__ = "StaticLatentCacheLayer"
    return StaticLatentCacheLayer


_STATIC_LAYER_CLASS = None


def _static_layer_class():
    global _STATIC_LAYER_CLASS
    if _STATIC_LAYER_CLASS is None:
        with _CLASS_LOCK:  # (_latent_layer_class's)
            if _STATIC_LAYER_CLASS is None:
                _STATIC_LAYER_CLASS = _make_static_layer_class()
    return _STATIC_LAYER_CLASS


def _version(mask: torch.Tensor):
    """The mask's in-place version, or None for an inference tensor (made under ``torch.inference_mode``), which
    keeps none: there only the object's identity tells one mask from another."""
    return None if mask.is_inference() else mask._version


def _no_mask():
    """A dead weak reference's answer: the mask of a pickled ``_MaskStep``."""
    return None


class _MaskStep:
    """What the layers of one forward pass share about its attention mask, found by its first layer: the pads'
    ``_Packing`` (None without pads). A layer that already took part, another shape, or another attention mask
    (object or in-place version) starts a new step."""

    def __init__(self, attention_mask, shape, packing):
        self.mask = None if attention_mask is None else weakref.ref(attention_mask)
        self.version = None if attention_mask is None else _version(attention_mask)
        self.shape, self.layers, self.packing = shape, set(), packing
        self.latents: dict = {}  # a forward without a Cache: layer_idx -> its LatentBatch, for the layers over it

    def __getstate__(self) -> dict:
        # pickled (a static latent cache keeps its last prompt step): the mask's weak reference can't be, and the mask
        # is not kept by it anyway; a dead one in its place serves no mask, so the loaded cache's next step reads its own
        state = self.__dict__.copy()
        if state["mask"] is not None:
            state["mask"] = _no_mask
        state["latents"] = {}  # (a pass's own, never reused by a loaded cache)
        return state

    def serves(self, layer: int, attention_mask, shape) -> bool:
        if layer in self.layers or shape != self.shape:
            return False
        if attention_mask is None or self.mask is None:
            return attention_mask is None and self.mask is None
        return self.mask() is attention_mask and _version(attention_mask) == self.version


class _PromptStep(_MaskStep):
    """A ``_MaskStep`` of a prompt over a static latent cache, with the rest of the step's one read of the device
    (by its first layer): the rows' lengths before the step and their real-token counts as host lists,
    ``cu_seqlens_q`` on the device, and the first layer's lengths (``before``, a device copy) that the others must
    be at."""

    def __init__(self, attention_mask, shape, lengths, counts, packing, before, cu_seqlens_q):
        super().__init__(attention_mask, shape, packing)
        self.before, self.cu_seqlens_q = before, cu_seqlens_q
        self.cu_seqlens_q_host = list(itertools.accumulate(counts, initial=0))
        self.cache_seqlens_host = [n + c for n, c in zip(lengths, counts)]


_no_cache_step: list = [None]  # the last cache-less forward pass's _MaskStep


def _no_cache_window_packing(layer: int, batch_size: int, query_len: int) -> _Packing | None:
    """``_no_cache_packing`` for a sliding-window layer, whose mask hides a query's early keys and so cannot tell the
    step's pads: the pass's, read by its first layer (which ``patch_model`` makes a full one)."""
    step = _no_cache_step[0]
    if step is None or layer in step.layers or step.shape != (batch_size, query_len):
        raise ValueError(f"layer {layer} attends over a sliding window, whose mask does not show which new tokens are "
                         f"pads: it takes them from the forward pass's first layer; call the model, or its layers in "
                         f"order")
    step.layers.add(layer)
    return step.packing


def _no_cache_packing(layer: int, attention_mask, batch_size: int, query_len: int) -> _Packing | None:
    """``_real_tokens`` for a forward pass without a cache, read once per pass: its first layer reads the mask (and
    checks it), the others reuse the packing while the mask object is the same."""
    step = _no_cache_step[0]
    if step is None or not step.serves(layer, attention_mask, (batch_size, query_len)):
        step = _MaskStep(attention_mask, (batch_size, query_len),
                         _real_tokens(attention_mask, batch_size, query_len, [0] * batch_size))
        _no_cache_step[0] = step
    step.layers.add(layer)
    return step.packing


class _StaticLatentState:
    """Fixed capacity behind a static latent cache: row b of the batch owns blocks
    ``[b * blocks_per_row, (b + 1) * blocks_per_row)`` of a ``PagedLatentCache``, so the block table never changes,
    and each layer keeps its rows' real-token counts in a device tensor it updates in place. A step's slots and
    lengths are computed on the device from those counts and the attention mask: no host bookkeeping, no host
    synchronisation, fixed addresses and shapes (what torch.compile and CUDA graphs need)."""

    def __init__(self, num_layers: int, batch_size: int, max_cache_len: int, block_size: int, kv_lora_rank: int,
                 rope_dim: int, dtype: torch.dtype, device: torch.device, cache_dtype: torch.dtype | None = None):
        self.batch_size, self.max_cache_len, self.block_size = batch_size, max_cache_len, block_size
        self.blocks_per_row = math.ceil(max_cache_len / block_size)
        self.capacity = self.blocks_per_row * block_size  # tokens per row
        self.paged = PagedLatentCache(num_layers, batch_size * self.blocks_per_row, block_size, kv_lora_rank,
                                      rope_dim, dtype=cache_dtype or dtype, device=device, rope_dtype=dtype)
        self.block_table = torch.arange(batch_size * self.blocks_per_row, dtype=torch.int32,
                                        device=device).view(batch_size, self.blocks_per_row)
        self.row_base = torch.arange(batch_size, dtype=torch.int64, device=device)[:, None] * self.capacity
        self.seqlens = [torch.zeros(batch_size, dtype=torch.int32, device=device) for _ in range(num_layers)]
        self.prompt: _PromptStep | None = None  # the last prompt step's host values (decode steps have none)
        self._mark_static()

    def _mark_static(self) -> None:
        """Fixed addresses for CUDA graphs (cudagraph trees copy any other input into place at every replay); the
        views are marked too: they are the tensor objects the compiled graph takes as inputs."""
        paged = self.paged
        views = (paged.buffer, paged.kv_cache, paged.pe_cache, paged.kv_scale)
        for t in [*(f(i) for i in range(paged.num_layers) for f in views if f(i) is not None),
                  *self.seqlens, self.block_table, self.row_base]:
            torch._dynamo.mark_static_address(t)

    def __setstate__(self, state: dict) -> None:
        # loaded (pickle, torch.save): the cache's views are made anew (PagedLatentCache.__setstate__), unmarked
        self.__dict__.update(state)
        self._mark_static()

    def _check_fits(self, attn: "TransformersMLAttention", dtype: torch.dtype) -> None:
        """Refuse, before anything is counted or stored, a cache built for another model: fewer layers (the first
        layers stored and attended before an IndexError; later calls then gave other tokens silently), other widths
        or another dtype (refused inside write_cache, after the first layer had counted the step). Host ints only."""
        paged = self.paged
        if attn.num_cache_layers > paged.num_layers or (attn.cache_latent, attn.cache_rope) != \
                (paged.kv_lora_rank, paged.rope_dim):
            raise ValueError(f"this static latent cache was built for another model: {paged.num_layers} layers, "
                             f"kv_lora_rank {paged.kv_lora_rank}, qk_rope_head_dim {paged.rope_dim}; this model has "
                             f"{attn.num_cache_layers}, {attn.cache_latent}, {attn.cache_rope}: make one with "
                             "static_latent_cache(model, ...)")
        if dtype != paged.rope_dtype:
            raise TypeError(f"this static latent cache holds {paged.rope_dtype} (built for another model, before a "
                            f"dtype change, or under another torch.autocast setting than the model runs under), the "
                            f"model computes in {dtype}: make one with static_latent_cache(model, ..., dtype={dtype})")

    def attend(self, attn: "TransformersMLAttention", past_key_values, q_nope, q_pe, kv_c, k_pe, attention_mask):
        """Store the step's real tokens and attend; ``q_nope [B, Q, H, D_nope]`` etc. Returns ``[B, Q, H * D_v]``."""
        batch_size, query_len = q_nope.shape[:2]
        layer = attn.layer_idx
        if batch_size != self.batch_size:
            raise ValueError(f"the static latent cache holds a batch of {self.batch_size}, this call has {batch_size}")
        self._check_fits(attn, q_nope.dtype)
        cache_layer = past_key_values.layers[layer]
        # past max_cache_len columns (pads included) the mask has no column for this step's tokens: a named device
        # assertion (on the CPU, at once, before anything is counted or stored), not an index error below
        torch._assert_async((cache_layer.cumulative_length + query_len <= self.max_cache_len).all(),
                            "mla_kernels: the static latent cache is full: this step would pass its max_cache_len "
                            "tokens per row (pads included, as transformers counts them); make a larger one")
        if attn.split_tokens is not None:  # the splits' bound, before anything is counted or stored
            check_split_keys(attn.split_tokens, self.capacity, "the static latent cache's rows (max_cache_len)")
        columns = (cache_layer.cumulative_length + torch.arange(query_len, device=q_nope.device)).clamp_(
            max=self.max_cache_len - 1)  # in range for the index even on a GPU, where the assertion comes later
        real = _visible_new_tokens(attention_mask, batch_size, query_len, columns)
        seqlens = self.seqlens[layer]
        # a prompt's first layer reads (and checks) its mask before anything is counted or stored
        step = None if query_len == 1 else self._prompt_step(layer, attention_mask, real, seqlens, query_len,
                                                             columns)
        if query_len == 1 and real is not None:  # what the mask sees before the step must be the row's cache
            _assert_history(attention_mask, real, seqlens)
        past_key_values.update(kv_c.new_empty(batch_size, 1, query_len, 0), kv_c.new_empty(batch_size, 1, query_len, 0),
                               layer)
        if real is None:
            real = torch.ones(batch_size, query_len, dtype=torch.bool, device=q_nope.device)
        index = seqlens[:, None].long() + real.long().cumsum(1) - 1  # [B, Q] each real token's place in its row
        new_lens = seqlens + real.sum(1, dtype=torch.int32)
        torch._assert_async((new_lens <= self.capacity).all(), "mla_kernels: the static latent cache is full "
                                                               "(max_cache_len real tokens per row)")
        slots = torch.where(real & (index < self.capacity), self.row_base + index, -1)
        seqlens.copy_(new_lens)
        kv_cache, pe_cache, kv_scale = self.paged.views(layer)
        _write_cache(kv_c.reshape(-1, kv_c.shape[-1]), k_pe.reshape(-1, k_pe.shape[-1]), kv_cache, pe_cache,
                     slots.view(-1), kv_scale, own_views=True)
        heads, d_v = attn.num_heads, attn.v_head_dim
        if query_len == 1:  # decode: every row's token is its last (a pad's row attends as before and is masked)
            w_uk, w_uv = attn._kv_b_split(q_nope.dtype)
            q_latent = torch.einsum("bqhd,hdr->bqhr", q_nope, w_uk)
            out = mla_decode(q_latent, q_pe.contiguous(), kv_cache, pe_cache, self.block_table, seqlens,
                             attn.softmax_scale, causal=True, w_uv=w_uv, max_seqlen_k=self.capacity,
                             kv_scale=kv_scale, split_tokens=attn.split_tokens, sinks=attn._parameters.get("sinks"))
            return out.reshape(batch_size, query_len, heads * d_v)
        # a prompt (eager, like transformers' own static-cache prefill): pads packed out by the step's index, the
        # lengths from its host lists (read once, by its first layer)
        packing = step.packing
        if packing is None:
            q_nope, q_pe = q_nope.flatten(0, 1), q_pe.flatten(0, 1)
        else:
            q_nope, q_pe = _pack(q_nope, packing), _pack(q_pe, packing)
        packed = mla_prefill_attention(q_nope.contiguous(), q_pe.contiguous(), kv_cache, pe_cache, self.block_table,
                                       step.cu_seqlens_q, seqlens, attn._kv_b_weight(q_nope.dtype), attn.softmax_scale,
                                       causal=True, kv_scale=kv_scale, cu_seqlens_q_host=step.cu_seqlens_q_host,
                                       cache_seqlens_host=step.cache_seqlens_host, split_tokens=attn.split_tokens,
                                       sinks=attn._parameters.get("sinks"))
        if packing is not None:
            packed = _unpack(packed, packing, batch_size, query_len)
        return packed.reshape(batch_size, query_len, heads * d_v)

    @_outside_compiled_graphs("the static latent cache's prompt step reads the rows' lengths on the host, so it can't "
                              "be part of a fullgraph compiled graph (transformers compiles the prompt chunks too when "
                              "generate gets prefill_chunk_size): drop prefill_chunk_size, or compile with "
                              "fullgraph=False (the prompt step then runs eagerly)")
    def _prompt_step(self, layer: int, attention_mask, real: torch.Tensor | None, seqlens: torch.Tensor,
                     query_len: int, columns: torch.Tensor) -> _PromptStep:
        """This prompt step's ``_PromptStep``: made by its first layer, which copies the rows' lengths and real-token
        counts to the host together (one synchronisation on a GPU); a later layer of the step checks on the device,
        without waiting, that its lengths are the first layer's."""
        batch_size = seqlens.shape[0]
        shape = (batch_size, query_len)
        step = self.prompt
        if step is not None and step.serves(layer, attention_mask, shape):
            torch._assert_async((seqlens == step.before).all(), "mla_kernels: a layer of the static latent cache "
                                "holds other lengths than the first layer of this prompt (an interrupted forward?)")
        else:
            counts = torch.full_like(seqlens, query_len) if real is None else real.sum(1, dtype=torch.int32)
            parts = [seqlens, counts] + ([] if real is None else [_visible_past(attention_mask, real)])
            host = _read_checked(parts, None if real is None else _mask_fits(attention_mask, real, columns))
            lengths, counts_host = host[:batch_size], host[batch_size:2 * batch_size]
            if real is not None:
                _check_history(host[2 * batch_size:], lengths)
            packing = None if real is None else _packing(real, counts_host)
            cu = torch.nn.functional.pad(counts.cumsum(0, dtype=torch.int32), (1, 0))
            step = self.prompt = _PromptStep(attention_mask, shape, lengths, counts_host, packing, seqlens.clone(), cu)
        step.layers.add(layer)
        return step


def static_latent_cache(model: nn.Module, max_batch_size: int, max_cache_len: int, *, block_size: int = 64,
                        dtype: torch.dtype | None = None):
    """A transformers ``Cache`` for a patched model with preallocated capacity: ``max_batch_size`` sequences of
    up to ``max_cache_len`` tokens each (pads included, as transformers' ``StaticCache`` counts them), for
    ``generate`` under ``torch.compile`` and CUDA graphs.

    Like ``StaticCache``, it is allocated up front (``max_batch_size`` rows of ``max_cache_len`` latent tokens per
    layer, each row rounded up to whole blocks of ``block_size``: pick a ``max_cache_len`` near a multiple of it), it
    is emptied for a new, unrelated generate by ``cache.reset()`` (as ``StaticCache``; a second generate without it
    continues the conversation), and
    its per-step work is all on the device: a decode step reserves no slots on the host and reads nothing back,
    so transformers' generate compiles the decode step (``compile_config``; on a GPU it does so by itself, with
    CUDA graphs). Pads in the prompt are still not stored. The prompt call reads the device once, in its first
    layer (the rows' lengths and the mask's counts), as prefill always does; its other layers reuse what it read.
    A batch of a different size, beam search or cropping raise; a row that outgrows ``max_cache_len`` fails a
    device assertion.

    ``dtype``: what the model computes attention in, which the cache holds (or, with the patch's FP8 cache, the
    rope key's dtype): by default the model's, or ``torch.autocast``'s dtype when this is called inside an
    autocast region for the model's device; pass it to run the model under autocast built outside one.

    Usage::

        model = patch_model(model)
        cache = static_latent_cache(model, max_batch_size=4, max_cache_len=4096)
        out = model.generate(input_ids, attention_mask=mask, past_key_values=cache, max_new_tokens=256)
        # transformers 5.25 renamed the argument cache= (past_key_values= still works there, with a FutureWarning)
    """
    from transformers.cache_utils import Cache

    _, model_type, layers = _decoder_layers(model, "static_latent_cache")
    if model_type in _OTHER_ATTENTION:
        raise ValueError(f"static_latent_cache does not serve {model_type} models: their other attention layers "
                         f"({', '.join(_OTHER_ATTENTION[model_type])}) keep transformers' own cache layers, which a "
                         f"static latent cache does not hold; use a DynamicCache (generate's default)")
    attns = [attn for _, _, attn in _attention_slots(layers)]
    if any("indexer" in getattr(attn, "_modules", {}) for attn in attns):
        raise ValueError(_NO_STATIC_INDEXER)
    if any(getattr(attn, "sliding_window", None) is not None for attn in attns):
        raise ValueError("static_latent_cache does not serve sliding-window layers (dots.llm3's): generate with a "
                         "DynamicCache (the default)")
    if not all(isinstance(a, TransformersMLAttention) for a in attns):
        raise TypeError("static_latent_cache needs a patched model: call patch_model(model) first")
    max_batch_size, max_cache_len, block_size = (
        _utils.check_int(name, value, 1, none_ok=False)
        for name, value in (("max_batch_size", max_batch_size), ("max_cache_len", max_cache_len),
                            ("block_size", block_size)))
    weight = attns[0].kv_b_proj.weight
    if dtype is None:
        device_type = weight.device.type
        dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                 else compute_dtype(attns[0]))
    elif dtype not in _utils.FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {_utils.FLOAT_DTYPES} (what the model computes in), got {dtype!r}")
    num_layers = attns[0].num_cache_layers
    # normal tensors even when made under torch.inference_mode (as PagedLatentCache's): the lengths the steps update
    # in place were inference tensors, so a cache made there failed its first step outside it (torch's RuntimeError)
    with torch.inference_mode(False):
        state = _StaticLatentState(num_layers, max_batch_size, max_cache_len, block_size, attns[0].cache_latent,
                                   attns[0].cache_rope, dtype, weight.device, attns[0].cache_dtype)
        layer_cls = _static_layer_class()
        cache = Cache(layers=[layer_cls(max_cache_len, state, i) for i in range(num_layers)])
    cache._mla_static_state = state
    cache._mla_latent_state = state  # latent_cache(cache) finds the PagedLatentCache
    return cache


# ---------------------------------------------------------------------------------------------
# the attention module transformers calls
# ---------------------------------------------------------------------------------------------


class TransformersMLAttention(MLAttention):
    """``MLAttention`` with the call signature of transformers' DeepSeek attention.

    ``forward(hidden_states [B, Q, hidden], position_embeddings, attention_mask, past_key_values, **kwargs)``
    returns ``(attn_output [B, Q, hidden], None)``; attention weights are never materialized.
    """

    num_cache_layers: int  # the transformers Cache's layers
    latent_layer: int  # this module's layer in a dynamic Cache's PagedLatentCache, of num_latent_layers
    hybrid: bool = False  # a model with other (linear) attention layers: a failed step spoils its Cache
    num_latent_layers: int
    block_size: int
    max_cache_tokens: int | None
    cache_dtype: torch.dtype | None = None  # None: the model's dtype; torch.float8_e4m3fn: DeepSeek's FP8 layout
    returns_topk: bool = False  # GLM-5: forward returns the step's top-k picks too, for the next layer
    hands_on_topk: bool = True  # False: returns None there (GLM-5.3-Flash's where the next layer is not "shared")
    shared_topk: bool = False  # GLM-5's "shared" DSA layers: the previous layer's picks, no indexer of their own
    position_scale: bool = False  # Mistral 4: queries x 1 + beta * log(1 + floor(pos / length)) (_scale_by_position)
    # Mistral Large 4's latents shared across layers (config.kv_source_layers): a layer that attends over an earlier
    # layer's latent (its layer_idx; it has no latent projection of its own and stores nothing: latent_layer is the
    # source's), and a layer whose latent later layers attend over (kept for them in a forward without a Cache)
    latent_source: int | None = None
    shares_latent: bool = False
    # GLM-5.3-Flash: the attention mask a layer gets is the step's own padding mask [B, Q] (the model's
    # create_recurrent_attention_mask), the keys' padding living in its indexer's cache, whose picks number the keys as
    # transformers lays them out, pads included; so its latent cache keeps every position (pads never picked)
    local_mask: bool = False
    # dots.llm3's sliding-window layers: each query attends over the keys its attention mask row shows (at most this
    # many, the last ones), as key lists (_window_positions); None: the whole causal past
    sliding_window: int | None = None

    def __setstate__(self, state: dict) -> None:
        # loaded (pickle, torch.save into a fresh process): adopt never ran here, so look the output collector up now,
        # not at the first call, which may be inside a trace (the global it sets would recompile the next call)
        super().__setstate__(state)
        _output_collector()

    @classmethod
    def adopt(cls, original: nn.Module, num_cache_layers: int, block_size: int,
              max_cache_tokens: int | None, cache_dtype: torch.dtype | None = None, *, latent_layer: int | None = None,
              num_latent_layers: int | None = None, hybrid: bool = False,
              split_tokens: int | None = None, latent_source: int | None = None,
              shares_latent: bool = False) -> "TransformersMLAttention":
        """A module sharing ``original``'s projection modules (a transformers DeepSeek attention). ``num_cache_layers``:
        the transformers Cache's layers (a static latent cache has as many); ``latent_layer`` of
        ``num_latent_layers``: its layer in a dynamic Cache's ``PagedLatentCache`` (default: ``layer_idx`` of
        ``num_cache_layers``); ``hybrid``: the model has other (linear) attention layers (``_OTHER_ATTENTION``)."""
        config = _layer_config(original.config, original.layer_idx)
        _output_collector()  # looked up here, eagerly: a first lookup inside a trace would recompile the next call
        kwargs = config_kwargs(config)
        # the module's own widths where it says (Mistral Large 4's no-rope layers: no rope part, D_nope = the config's
        # nope + rope; dots.llm3's sliding-window layers: their own heads and latent width, per_layer_config)
        for name in ("qk_rope_head_dim", "qk_nope_head_dim", "num_heads", "kv_lora_rank", "v_head_dim"):
            width = original.__dict__.get(name)
            if type(width) is int:
                kwargs[name] = width
        for name, arg in (("q_lora_scale", "query_scale"), ("kv_lora_scale", "latent_scale")):  # dots.llm3's
            scale = original.__dict__.get(name)
            if isinstance(scale, float):
                kwargs[arg] = scale
        rope = kwargs["rope_parameters"]
        if rope and all(isinstance(v, dict) for v in rope.values()):  # per layer type (dots.llm3's): this layer's,
            # whose partial_rotary_factor is the rope's share of the whole head (the model's tables rotate all
            # qk_rope_head_dim values, as the module's own do without it)
            rope = kwargs["rope_parameters"] = {k: v for k, v in rope.get(config.layer_types[original.layer_idx],
                                                                          {}).items() if k != "partial_rotary_factor"}
        if rope.get("rope_type", "default") not in ("default", "yarn"):
            # cos/sin come from the model's own rotary embedding (position_embeddings) and the softmax scale from
            # ``original``: the module's own tables are never used here, so whatever rope transformers computes
            # (linear, dynamic, longrope, ...) runs; the module is built with plain rope (it computes only those two)
            kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": rope.get("rope_theta", 10000.0)}
        if "q_a_proj" not in original._modules:  # the module's own query projection decides, not the config: a
            kwargs["q_lora_rank"] = None  # model may build q_proj whatever q_lora_rank says (transformers 5.20's Ling 3)
        elif not kwargs.get("q_lora_rank"):  # (and q_a_proj whatever it says: its width is the rank)
            kwargs["q_lora_rank"] = original.q_a_proj.out_features
        if config.model_type == "hy_v4" and not hasattr(sys.modules[type(original).__module__],
                                                        "apply_rotary_pos_emb_interleave"):
            # Hy4's attention as transformers 5.17 wrote it rotates halves ("Non-interleave RoPE"); 5.25's calls
            # apply_rotary_pos_emb_interleave (so does its indexer, which runs as the model's own module)
            kwargs["rope_style"] = "half"
        new = cls(**kwargs, layer_idx=original.layer_idx, device="meta")
        for name in _ADOPTED:
            if name not in new._modules:
                continue
            if latent_source is not None and name in ("kv_a_proj_with_mqa", "kv_a_layernorm"):
                delattr(new, name)  # (over another layer's latent: no latent projection, as the original)
            elif name in original._modules:
                setattr(new, name, original._modules[name])
            elif name == "q_b_proj" and "q_gate_proj" in original._modules:  # A.X-K2's query comes from q_gate_proj:
                delattr(new, name)  # no q_b_proj here either, so the state dict keeps the original's keys
            else:
                raise TypeError(f"layer {original.layer_idx}'s {type(original).__name__} lacks {name}, which its "
                                f"query or latent path needs; patch_model can't replace it")
        device = original.kv_b_proj.weight.device
        new.inv_freq = rope_inv_freq(new.qk_rope_head_dim, new.rope_parameters,
                                     getattr(config, "max_position_embeddings", 4096))[0].to(device)
        # the scale transformers uses (YaRN's, any rope type), times LongCat-Flash's query LoRA scale (config_kwargs
        # gave the module its query_scale and latent_scale)
        new.softmax_scale = float(original.scaling) * new.query_scale
        new.num_cache_layers = num_cache_layers
        new.latent_layer = original.layer_idx if latent_layer is None else latent_layer
        new.num_latent_layers = num_cache_layers if num_latent_layers is None else num_latent_layers
        new.hybrid = hybrid
        new.block_size = block_size
        new.max_cache_tokens = max_cache_tokens
        new.cache_dtype = cache_dtype
        new.split_tokens = split_tokens
        if latent_source is not None:
            new.latent_source = latent_source
        if shares_latent:
            new.shares_latent = True
        new.is_causal = True
        new.training = original.training  # the module's own mode flag; its children are the shared projections
        # the kernels have no attention dropout: a train-mode forward with a non-zero rate is refused (_forward)
        new.attention_dropout = float(getattr(original, "attention_dropout", 0.0) or 0.0)
        for name in _ADOPTED_IF_PRESENT:  # the model's own modules (state dict keys unchanged)
            child = original._modules.get(name)
            if child is not None:
                setattr(new, name, child)
        for name in _ADOPTED_PARAMETERS:  # the original's own, whatever the config said (as its modules decide)
            param = original._parameters.get(name)
            if param is not None:
                setattr(new, name, param)
            elif name in new._parameters:  # (the config's model type gave the module one; this original has none)
                delattr(new, name)
        # GLM-5's DSA layers hand their top-k picks to the next layer (a third output) and its "shared" layers take
        # the previous layer's (prev_topk_indices) instead of running an indexer
        new.returns_topk = "prev_topk_indices" in inspect.signature(type(original).forward).parameters
        new.shared_topk = bool(getattr(original, "skip_topk", False))
        new.hands_on_topk = bool(getattr(original, "next_skip_topk", True))
        # Mistral 4's queries are scaled by position (_scale_by_position: from the config, read at each call as the
        # original reads it, so an edit of its rope_parameters reaches both)
        new.position_scale = config.model_type == "mistral4"
        new.local_mask = config.model_type == "glm5_next_text"
        window = original.__dict__.get("sliding_window")
        if type(window) is int:
            new.sliding_window = window
        # the children in the original's order, so the state dict lists its keys as the original's does
        new._modules = {**{k: new._modules[k] for k in original._modules if k in new._modules}, **new._modules}
        # hooks on the attention module keep running on its stand-in (called as it was, returning what it returned)
        # and their handles keep removing them: the hook dicts are shared, not copied (unpatch_model's original
        # then has those registered on the stand-in too)
        for name in _HOOK_DICTS:
            if name in original.__dict__:
                new.__dict__[name] = original.__dict__[name]
        object.__setattr__(new, "_hf_original", original)
        return new

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                past_key_values=None, cache=None, **kwargs):
        past_key_values = _the_cache(past_key_values, cache)
        if not self.hybrid or past_key_values is None:
            return self._forward(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
        # a hybrid's linear-attention layers before this one have taken the step already: a step refused or failed
        # here leaves the Cache inconsistent (their state advanced, the latent not), so it can't serve again
        failed = getattr(past_key_values, "_mla_failed_step", None)
        if failed is not None:
            raise ValueError(f"this Cache can't be used any more: a step of this hybrid model failed after its "
                             f"linear-attention layers had taken it ({failed}); start over with a new cache")
        try:
            return self._forward(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
        except Exception as exc:
            past_key_values._mla_failed_step = f"{type(exc).__name__}: {str(exc)[:200]}"
            raise

    def _forward(self, hidden_states: torch.Tensor, position_embeddings, attention_mask, past_key_values, **kwargs):
        if _attentions_requested():
            raise ValueError("output_attentions: the patched attention never materialises attention weights (the "
                             "kernels attend in latent space); run without it, or unpatch_model(model)")
        if position_embeddings is None and self.rope_style != "none":
            raise ValueError("position_embeddings is required (the model's rotary embedding output)")
        if self.training and getattr(self, "attention_dropout", 0.0) > 0:
            raise ValueError(f"the model is in train mode with attention_dropout={self.attention_dropout}, which the "
                             "patched attention does not apply (the kernels have no dropout): call model.eval(), "
                             "or unpatch_model(model)")
        _check_inference(self, hidden_states)
        self._check_kv_b()
        self._check_sinks(hidden_states, "hidden_states")
        prev_topk = kwargs.pop("prev_topk_indices", None)
        if self.shared_topk and prev_topk is None:
            raise ValueError(f"layer {self.layer_idx} reuses the previous layer's top-k picks (a shared DSA layer): "
                             f"prev_topk_indices is required (call it through its decoder layer or the model, which "
                             f"hand it the previous layer's; on GLM-5.3-Flash only a layer running its own indexer "
                             f"hands them on, so config.indexer_types may not put a shared layer after a shared or "
                             f"linear-attention one, which transformers' own attention refuses too)")
        batch_size, query_len = hidden_states.shape[:2]
        cos, sin = (None, None) if self.rope_style == "none" else _rope_tables(position_embeddings)
        indexer = self._modules.get("indexer")
        q_resid = q = gate = None
        if "q_gate_proj" in self._modules:
            q_resid, q, gate = self._query_and_gate(hidden_states)
        elif indexer is not None and self.q_lora_rank is not None:  # (the indexer reads the query's low rank)
            q_resid = rms_norm(self.q_a_layernorm, self.q_a_proj(hidden_states))
        if self.latent_source is None:
            q_nope, q_pe, kv_c, k_pe = self.project(hidden_states, cos, sin, q_resid, q)  # [B, Q, ...]
        else:  # over an earlier layer's latent (its keys roped there): the query alone
            q_nope, q_pe = self.project_query(hidden_states, cos, sin, q_resid, q)
            kv_c = k_pe = None
        if q_nope.dtype not in _utils.FLOAT_DTYPES:  # before any cache is made or counted (its constructor named dtype)
            raise TypeError(f"the patched attention computes in bfloat16, float16 or float32 (the kernels' dtypes), "
                            f"this model's attention in {q_nope.dtype} (model.double() after patch_model?): cast the "
                            "model to one of them, or unpatch_model(model)")
        if self.position_scale:
            q_nope, q_pe = self._scale_by_position(q_nope, q_pe, kwargs.get("position_ids"))
        scaling = self._modules.get("softmax_scaling")
        if scaling is not None:  # Mistral Large 4: q x (scale[h] log(pos + 1) + bias[h]), by its own module
            q_nope, q_pe = self._scale_by_log_position(scaling, q_nope, q_pe, kwargs.get("position_ids"))

        static = getattr(past_key_values, "_mla_static_state", None)
        if static is not None and (indexer is not None or self.shared_topk):
            raise ValueError(_NO_STATIC_INDEXER)
        if static is not None:
            out = static.attend(self, past_key_values, q_nope, q_pe, kv_c, k_pe, attention_mask)
            return self._outputs(self._project_out(out, hidden_states, gate), None)
        if past_key_values is None:  # no cache: the pass's first layer reads the mask, the others reuse it
            # (GLM-5.3-Flash's latent keeps every position: local_mask)
            if self.local_mask:
                packing = None
            elif self.sliding_window is not None:  # (its mask can't tell the pads: the pass's first layer's does)
                packing = _no_cache_window_packing(self.layer_idx, batch_size, query_len)
            else:
                packing = _no_cache_packing(self.layer_idx, attention_mask, batch_size, query_len)
            pass_latents = None if self.local_mask else _no_cache_step[0].latents  # (those later layers attend over)
            if self.latent_source is not None:
                if self.latent_source not in pass_latents:
                    raise ValueError(f"layer {self.layer_idx} attends over layer {self.latent_source}'s latent, which "
                                     f"this forward pass has not computed (call the model, or its layers in order)")
                batch = pass_latents[self.latent_source]
            else:
                paged = PagedLatentCache(1, max(1, batch_size * math.ceil(query_len / self.block_size)),
                                         self.block_size, self.cache_latent, self.cache_rope,
                                         dtype=self.cache_dtype or q_nope.dtype, device=q_nope.device,
                                         rope_dtype=q_nope.dtype)
                rows = [paged.add_sequence() for _ in range(batch_size)]
                counts = [query_len] * batch_size if packing is None else packing.counts
                batch = LatentBatch.reserve(paged, rows, counts)
                if self.shares_latent:
                    pass_latents[self.layer_idx] = batch
            layer = 0
        else:
            # (traced, the step outside the graph; eagerly the plain method: the disabled wrapper costs a call
            # ~0.4 us on torch 2.13 and ~7 us on 2.6, per layer and step)
            step = self._dynamic_cache_step_untraced if torch.compiler.is_compiling() else self._dynamic_cache_step
            state, batch, packing = step(past_key_values, batch_size, query_len, attention_mask, q_nope)
            layer = self.latent_layer

        if q_resid is not None and self.query_scale != 1.0:  # dots.llm3's indexer reads the scaled low-rank query
            q_resid = q_resid * self.query_scale  # (the attention's scale is in softmax_scale)
        try:
            out, picks = self._attend_step(hidden_states, q_resid, q_nope, q_pe, kv_c, k_pe, position_embeddings,
                                           attention_mask, past_key_values, batch, layer, packing,
                                           kwargs.get("position_ids"), prev_topk)
        except BaseException as exc:
            if past_key_values is not None:  # the step is reserved and counted: the Cache refuses what comes next
                state.failed = f"layer {self.layer_idx} raised {type(exc).__name__} during its step"
            raise
        return self._outputs(self._project_out(out, hidden_states, gate), picks)

    def _outputs(self, out: torch.Tensor, picks: torch.Tensor | None) -> tuple:
        """What the original module returned: ``(out, None)``, attention weights never being materialised, and on
        GLM-5 the step's top-k picks for the next layer (``returns_topk``; on GLM-5.3-Flash only where the next
        layer takes them, ``hands_on_topk``, else None, as there)."""
        if not self.returns_topk:
            return out, None
        return out, None, picks if self.hands_on_topk else None

    def _scale_by_position(self, q_nope: torch.Tensor, q_pe: torch.Tensor, position_ids) -> tuple:
        """Mistral 4's queries times ``1 + beta * log(1 + floor(position / length))`` (Llama 4's attention
        temperature; 1 below ``length``, the rope's original context; ``llama_4_scaling_beta`` and
        ``original_max_position_embeddings`` of the config's ``rope_parameters``), as transformers computes it: in
        float32, cast to the queries' dtype. ``position_ids [B, Q]`` (or ``[1, Q]``), from the decoder layer."""
        if not isinstance(position_ids, torch.Tensor):
            raise ValueError(f"position_ids is required: this model's attention scales its queries by position "
                             f"(llama_4_scaling_beta), got {type(position_ids).__name__}")
        rope = self._hf_original.config.rope_parameters
        beta, length = rope.get("llama_4_scaling_beta"), rope.get("original_max_position_embeddings")
        scale = (1 + beta * torch.log(1 + torch.floor(position_ids / length))).to(q_nope.dtype)[..., None, None]
        return q_nope * scale, q_pe * scale

    @staticmethod
    def _scale_by_log_position(scaling: nn.Module, q_nope: torch.Tensor, q_pe: torch.Tensor, position_ids) -> tuple:
        """Mistral Large 4's queries (nope and rope parts alike) times ``scale[h] * log(position + 1) + bias[h]``, by
        the model's own ``softmax_scaling`` module, called once on the whole query as transformers calls it (a hook
        on it sees one call), on the ``[B, Q, H, D]`` layout (``head_dim_first=False``): the same operations in the
        queries' dtype as transformers' on ``[B, H, Q, D]``, so the same values."""
        if not isinstance(position_ids, torch.Tensor):
            raise ValueError(f"position_ids is required: this model's attention scales its queries by position "
                             f"(softmax_scaling), got {type(position_ids).__name__}")
        q = scaling(torch.cat((q_nope, q_pe), dim=-1), position_ids, head_dim_first=False)
        return torch.split(q, [q_nope.shape[-1], q_pe.shape[-1]], dim=-1)

    def _dynamic_cache_step(self, past_key_values, batch_size: int, query_len: int, attention_mask, like):
        """The step's ``(_LatentState, LatentBatch, _Packing | None)`` with transformers' dynamic Cache: the latent
        state it holds (made at the first step), this layer's reserved batch, and the Cache's own count of tokens.
        ``like``: a tensor of the step's dtype and device (the queries)."""
        state = _latent_state(past_key_values, self.layer_idx, self.num_latent_layers, self.block_size,
                              self.max_cache_tokens)
        batch, packing = state.batch_for(self.layer_idx, self, batch_size, query_len, attention_mask, like.dtype,
                                         like.device)
        _attach(past_key_values, self.layer_idx, self.num_latent_layers, self.block_size, self.max_cache_tokens,
                state)  # (once the step is accepted: a refused one leaves the Cache as it was)
        empty = like.new_empty(batch_size, 1, query_len, 0)
        past_key_values.update(empty, empty, self.layer_idx)
        return state, batch, packing

    # what a compiled forward calls instead: the latent's slots, block tables and lengths in a dynamic Cache are
    # Python state, so traced, every value would be a guard and a recompile a step (dynamo gave up at its recompile
    # limit), and a fullgraph trace stopped inside (a lock, max(..., default=)) naming no remedy
    _dynamic_cache_step_untraced = _outside_compiled_graphs(
        "transformers' dynamic Cache keeps the latent's slots and block tables in Python on the host, so a step with "
        "it is a graph break; for compiled steps (whole model or a decoder layer) use "
        "mla_kernels.integrations.static_latent_cache")(_dynamic_cache_step)

    def _attend_step(self, hidden_states, q_resid, q_nope, q_pe, kv_c, k_pe, position_embeddings, attention_mask,
                     cache, batch: LatentBatch, layer: int, packing, position_ids, prev_topk=None) -> tuple:
        """Store this layer's step and attend: ``(out [B, Q, H * D_v], picks)``, over the top-k picks on DSA models
        (DeepSeek-V3.2, GLM-5: the indexer's, or a shared layer's ``prev_topk``; ``picks`` as the indexer gives
        them, else None)."""
        batch_size, query_len = hidden_states.shape[:2]
        indexer, picks, indices = self._modules.get("indexer"), None, None
        if self.sliding_window is not None:  # dots.llm3's sliding-window layers: the keys each mask row shows
            kv_len = attention_mask.shape[-1] if attention_mask is not None else \
                query_len if cache is None else cache.get_seq_length(self.layer_idx)
            indices = _window_positions(attention_mask, batch, packing, self.sliding_window, batch_size, query_len,
                                        kv_len)
        if indexer is not None or self.shared_topk:  # the top-k keys of each query, as latent cache positions
            if self.local_mask:
                picks, indices = _pooled_positions(indexer, hidden_states, q_resid, attention_mask, cache, prev_topk)
            else:
                picks, indices = _sparse_positions(indexer, hidden_states, q_resid, position_embeddings,
                                                   attention_mask, cache, position_ids, self.layer_idx,
                                                   prev_topk)  # [B, Q, K]
        if packing is None:
            flat = (None if t is None else t.flatten(0, 1) for t in (q_nope, q_pe, kv_c, k_pe))
            out = self.attend(*flat, batch, layer=layer, indices=None if indices is None else indices.flatten(0, 1))
            return out.reshape(batch_size, query_len, -1), picks
        packed = self.attend(*(None if t is None else _pack(t, packing) for t in (q_nope, q_pe, kv_c, k_pe)), batch,
                             layer=layer, indices=None if indices is None else _pack(indices, packing))
        return _unpack(packed, packing, batch_size, query_len).flatten(2), picks

    def _query_and_gate(self, hidden_states: torch.Tensor) -> tuple:
        """A.X-K2's query: ``(q_resid, q [B, Q, H, D_nope + P], gate [B, Q, H * D_v])`` from one projection
        ``q_gate_proj`` of the normed and the raw low-rank query side by side, as transformers computes it."""
        q_compressed = self.q_a_proj(hidden_states)
        q_resid = rms_norm(self.q_a_layernorm, q_compressed)
        both = self.q_gate_proj(torch.cat([q_resid, q_compressed], dim=-1))
        both = both.unflatten(-1, (self.num_heads, self.qk_head_dim + self.v_head_dim))
        q, gate = torch.split(both, [self.qk_head_dim, self.v_head_dim], dim=-1)
        return q_resid, q, gate.flatten(-2)

    def _project_out(self, out: torch.Tensor, hidden_states: torch.Tensor,
                     gate_values: torch.Tensor | None = None) -> torch.Tensor:
        """``o_proj`` of the attention output ``out [B, Q, H * D_v]``, each head first scaled by the sigmoid of its
        gate where the model has one (Ling 3's ``g_proj``, computed in fp32 as transformers does), or each value by
        the sigmoid of ``gate_values [B, Q, H * D_v]`` (A.X-K2's, multiplied in fp32, as transformers does) or of
        ``gate_proj(hidden_states)`` (Hy4's, in the model's dtype, as transformers does)."""
        if gate_values is not None:
            out = (out * torch.sigmoid(gate_values.float())).to(out.dtype)
        elementwise = self._modules.get("gate_proj")
        if elementwise is not None:
            out = out * torch.sigmoid(elementwise(hidden_states))
        gate = self._modules.get("g_proj")
        if gate is not None:
            g = torch.sigmoid(gate(hidden_states).float()).to(hidden_states.dtype)  # [B, Q, H]
            out = (out.unflatten(-1, (self.num_heads, self.v_head_dim)) * g.unsqueeze(-1)).flatten(-2)
        return self.o_proj(out)


def _sparse_positions(indexer: nn.Module | None, hidden_states, q_resid, position_embeddings, attention_mask, cache,
                      position_ids, layer_idx: int, prev_picks=None) -> tuple:
    """DeepSeek-V3.2's sparse attention: the model's own indexer picks each query's top-k keys ``[B, Q, K]`` among
    the ``KV`` keys transformers counts (pads included; its key cache, ``update_indexer``, is kept in that padded
    layout by ``LatentCacheLayer``), as it does unpatched; a GLM-5 layer with no indexer (``indexer`` None) takes
    the previous layer's picks, ``prev_picks``. Returns ``(picks, positions)``: each pick becomes the key's position
    in its row of the latent cache, which holds only real tokens: the number of real keys before it. A pick the
    query may not see (a pad, or past its own position: the indexer returns K picks even when fewer keys are
    visible, as transformers' mask then hides them) becomes -1, which ``mla_decode`` skips. Computed on the device:
    nothing is read.

    ``positions`` None (dense attention) while there are no more keys than the indexer's ``index_topk``: it then
    picks every key (``min(index_topk, keys)`` of them: told by the picks' width, as the indexer reads its
    ``index_topk`` at each call), so each token attends to all it may see, which the dense kernels compute (the
    prefill kernels for a prompt, not a program per token); the indexer still runs, to extend its key cache."""
    batch_size, query_len = hidden_states.shape[:2]
    kv_len = query_len if cache is None else cache.get_seq_length(layer_idx)
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask[:, 0]  # [B, Q, KV], head 0, as transformers' own attention hands the indexer
    else:  # none, or a [B, KV] padding mask: causal attention over the keys (and the padding mask's)
        device = hidden_states.device
        mask = (torch.arange(kv_len, device=device) <= torch.arange(kv_len - query_len, kv_len, device=device)[:, None]
                ).expand(batch_size, query_len, kv_len)
        if attention_mask is not None:
            mask = mask & _sees(attention_mask)[:, None, -kv_len:]
    if indexer is not None:
        cache_kw = {} if cache is None else {_indexer_cache_name(indexer): cache}
        if _indexer_takes_q_resid(type(indexer).forward):
            picks = indexer(hidden_states, q_resid, position_embeddings, mask, position_ids, **cache_kw)
        else:  # Mistral Large 4's (no query LoRA): hidden_states, position_embeddings, attention_mask, position_ids
            picks = indexer(hidden_states, position_embeddings, mask, position_ids, **cache_kw)
    else:
        picks = prev_picks
    if picks.shape[-1] >= kv_len:  # (host ints: the picks' width and the Cache's count)
        return picks, None
    sees = _sees(mask)  # [B, Q, KV] bool
    chosen = picks.long()
    real = sees[:, -1, :]  # [B, KV]: the keys the last query sees are the row's real tokens (stored in the cache)
    latent = torch.cumsum(real, dim=1) - 1  # [B, KV]: a real key's position in the latent cache
    flat = chosen.flatten(1)  # [B, Q * K]
    position = latent.gather(1, flat).view_as(chosen)
    usable = sees.gather(2, chosen) & real.gather(1, flat).view_as(chosen)
    return picks, torch.where(usable, position, -1)


def _window_positions(attention_mask, batch: LatentBatch, packing, window: int, batch_size: int, query_len: int,
                      kv_len: int) -> torch.Tensor:
    """dots.llm3's sliding-window attention as key lists ``[B, Q, window]`` of latent cache positions (-1: none):
    query ``s`` (column ``kv_len - Q + s`` of the layer's 4-D mask) attends over the keys its mask row shows among
    the ``window`` positions up to its own (all of them without a mask: sdpa's, where nothing is padded; those a
    ``[B, KV]`` padding mask shows, where a 2-D one comes). The pads
    among those are exactly the positions the row hides, so a shown key is the query's own latent position less the
    keys shown after it; the query's own is its row's length after the step less its real new tokens after it
    (``packing``; its pads are packed out). Computed on the device over ``[B, Q, window]``, not the mask's width."""
    device = batch.cache_seqlens.device
    cols = torch.arange(kv_len - query_len, kv_len, device=device)[:, None] - window + 1 + \
        torch.arange(window, device=device)  # [Q, window]: the columns of each query's window, oldest first
    inside = (cols >= 0).expand(batch_size, query_len, window)
    if attention_mask is None:
        shown = inside
    else:  # a 4-D mask's rows (head 0), or a [B, KV] padding mask's one row for every query (the window is the layer's)
        rows = attention_mask[:, 0] if attention_mask.dim() == 4 else attention_mask[:, None, :]
        rows = rows.expand(batch_size, query_len, -1)  # [B, Q, KV]
        shown = _sees(rows.gather(-1, cols.clamp(min=0).expand(batch_size, query_len, window))) & inside
    if packing is None:
        real = torch.ones(batch_size, query_len, dtype=torch.long, device=device)
    else:  # (1 at each real token, 0 at the pads)
        real = _unpack(packing.index.new_ones(packing.index.shape[0]), packing, batch_size, query_len)
    own = batch.cache_seqlens.long()[:, None] - real.sum(1, keepdim=True) + real.cumsum(1) - 1  # [B, Q]
    count = shown.long()
    shown_after = count.flip(-1).cumsum(-1).flip(-1) - count  # [B, Q, window]: the keys shown after each
    return torch.where(shown, own[..., None] - shown_after, -1)


def _pooled_positions(indexer: nn.Module | None, hidden_states, q_resid, attention_mask, cache, prev_picks) -> tuple:
    """GLM-5.3-Flash's sparse attention: ``(picks, positions [B, Q, K])``. Its indexer (or, on a "shared" layer,
    ``prev_picks``, the previous layer's) picks pools of ``index_kpool`` keys and the keys of the query's own pool so
    far (its "tail"), as key positions among every position transformers counts, pads included, which is how the
    latent cache of such a model holds them (``local_mask``), -1 for none; it takes the step's own padding mask
    ``attention_mask [B, Q]`` and keeps the keys' padding in its cache. Always sparse: a pool is picked only once
    whole, so even with fewer keys than ``index_topk`` a query may not see every earlier key. A key picked twice
    (a tail inside a picked pool, where a later step's pads split the pools) counts once, as in transformers' mask
    built from the picks: the repeats become -1 (sorted, on the device; nothing is read)."""
    if indexer is not None:
        picks = indexer(hidden_states=hidden_states, q_resid=q_resid, attention_mask=attention_mask,
                        **{_indexer_cache_name(indexer): cache})  # (None too: its cache has no default)
    else:
        picks = prev_picks
    ordered = picks.long().sort(dim=-1).values
    repeat = torch.zeros_like(ordered, dtype=torch.bool)
    repeat[..., 1:] = ordered[..., 1:] == ordered[..., :-1]
    return picks, torch.where(repeat, -1, ordered)


@functools.lru_cache(maxsize=None)
def _indexer_cache_keyword(forward) -> str:
    import inspect
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


@functools.lru_cache(maxsize=None)
def _indexer_takes_q_resid(forward) -> bool:
    return "q_resid" in inspect.signature(forward).parameters


def _indexer_cache_name(indexer: nn.Module) -> str:
    """The indexer's keyword for the Cache: ``past_key_values`` up to transformers 5.24, ``cache`` from 5.25 on."""
    return _indexer_cache_keyword(type(indexer).forward)


def _attentions_requested() -> bool:
    """Has this forward pass asked transformers to collect attention weights (``output_attentions``)? Read from
    transformers' output collector (``transformers.utils.output_capturing``, 5.17 to 5.25): it would otherwise hand
    back an empty tuple, as no hook of its attention class sees the patched modules. False where it has none."""
    collector = _output_collector()
    if collector is None:
        return False
    if torch.compiler.is_compiling() and not getattr(collector, "compiling", False):
        # traced without a model forward that set it while compiling (a compiled decoder layer or attention module:
        # regional compilation): dynamo can't read the ContextVar behind it (the fullgraph trace failed on it), and
        # the forward that did set it ran eagerly, outside the graph; unanswerable here, so not refused
        return False
    collected = collector.get()
    return collected is not None and "attentions" in collected


_COLLECTOR_UNSET = object()
_collector = _COLLECTOR_UNSET  # transformers' output collector, looked up once (None: this transformers has none)


def _output_collector():
    """transformers' ``_active_collector`` ContextVar, or None. Kept in a module global rather than behind
    ``functools.lru_cache``: dynamo warned at every trace of a compiled decoder layer or attention module ("Dynamo
    detected a call to a ``functools.lru_cache``-wrapped function"); a global it reads as a constant (looked up when a
    module is adopted, so no trace sees it change)."""
    global _collector
    if _collector is _COLLECTOR_UNSET:
        try:
            from transformers.utils.output_capturing import _active_collector
        except ImportError:
            _active_collector = None
        _collector = _active_collector
    return _collector


def _the_cache(past_key_values, cache):
    """The transformers Cache of this call: decoder layers pass it as ``past_key_values`` up to transformers 5.24
    and as ``cache`` from 5.25 on (which deprecates the old name)."""
    if cache is None:
        return past_key_values
    if past_key_values is not None and past_key_values is not cache:
        raise ValueError("past_key_values and cache name two different Caches; pass one (cache, from transformers "
                         "5.25 on)")
    return cache


# ---------------------------------------------------------------------------------------------
# patching
# ---------------------------------------------------------------------------------------------


_LAYER_PATHS = ("model.layers", "layers", "model.language_model.layers", "language_model.layers",
                "language_model.model.layers")


def _decoder_layers(model: nn.Module, caller: str = "patch_model"):
    """``(text config, model type, decoder layers)`` of a supported model, or of the text decoder of a multimodal
    one whose text config is of a supported type (Kimi-K2.5's is DeepSeek-V3's); errors name ``caller``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config = getattr(model, "config", None)
    model_type = text_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES and callable(getattr(config, "get_text_config", None)):
        text_config = config.get_text_config(decoder=True)
        text_type = getattr(text_config, "model_type", None)
        if text_type in SUPPORTED_MODEL_TYPES:
            config, model_type = text_config, text_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        # a multimodal model's own type may be one the README names (kimi_k25): name the text decoder's too
        decoder = f" (text decoder {text_type!r})" if text_type != model_type else ""
        raise TypeError(f"{caller} takes a transformers DeepSeek-style MLA model ({', '.join(SUPPORTED_MODEL_TYPES)}), "
                        f"or a multimodal model with such a text decoder; got {type(model).__name__} with model_type "
                        f"{model_type!r}{decoder}")
    found = _text_decoder(model)
    if found is None:
        raise TypeError(f"{type(model).__name__} has no decoder layers at any of .{', .'.join(_LAYER_PATHS)}")
    return config, model_type, found[1]


def _text_decoder(model: nn.Module) -> tuple[nn.Module, nn.ModuleList] | None:
    """``(decoder, decoder.layers)``: the module holding the decoder layers at the first of ``_LAYER_PATHS`` that
    has some (a multimodal model's text decoder, not its vision tower), or None."""
    for path in _LAYER_PATHS:
        decoder = model
        for name in path.split(".")[:-1]:
            decoder = getattr(decoder, name, None)
        layers = getattr(decoder, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return decoder, layers
    return None


def _mla_slots(layers, model_type: str) -> list[tuple[nn.Module, str, nn.Module | None]]:
    """``_attention_slots`` without a hybrid model's other attention modules (``_OTHER_ATTENTION``)."""
    other = _OTHER_ATTENTION.get(model_type, ())
    return [slot for slot in _attention_slots(layers) if type(slot[2]).__name__ not in other]


def _attention_slots(layers) -> list[tuple[nn.Module, str, nn.Module | None]]:
    """``(parent, name, module)`` of every attention module of ``layers``, in the order of their cache layers: a
    decoder layer's ``self_attn``, or each module of a ``ModuleList`` of them (LongCat-Flash's two per layer, whose
    cache layers are ``2 i`` and ``2 i + 1``)."""
    slots = []
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        if isinstance(attn, nn.ModuleList):
            slots += [(attn, str(j), module) for j, module in enumerate(attn)]
        else:
            slots.append((layer, "self_attn", attn))
    return slots


def _attention_class(model_type: str):
    import importlib
    module_name, class_name = SUPPORTED_MODEL_TYPES[model_type]
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        raise TypeError(f"the installed transformers has no {class_name}; it can't patch {model_type} models") from None


def patch_model(model: nn.Module, *, block_size: int = 64, max_cache_tokens: int | None = None,
                cache_dtype: torch.dtype | None = None, split_tokens: int | None = None,
                norms: bool = False) -> nn.Module:
    """Swap every MLA attention module of a transformers DeepSeek-V3 (or V3.2, V2, GLM-5, Hy4, GLM-4.7-Flash, Mistral
    Small 4, Mistral Large 4, GLM-5.3-Flash, dots.llm3, MiniCPM3, LongCat-Flash, Youtu-LLM, Sarvam, A.X-K1, A.X-K2,
    Kimi-Linear, Ling 3) model for
    ``TransformersMLAttention`` (a hybrid's other attention modules, ``_OTHER_ATTENTION``, stay as they are).

    Args:
        model: ``DeepseekV3ForCausalLM`` / ``DeepseekV3Model`` (or another ``SUPPORTED_MODEL_TYPES`` model type's
            classes, or a multimodal model with such a text decoder), in bfloat16, float16 or
            float32 (the kernels' dtypes).
        block_size: tokens per page of the latent cache.
        max_cache_tokens: cap on the latent cache's size in tokens (all sequences of a Cache together); past it
            a step raises ``CacheFullError`` before writing anything. None: grow without limit.
        cache_dtype: None (the model's dtype) or ``torch.float8_e4m3fn``: DeepSeek's FP8 latent cache (e4m3 latent
            with one fp32 scale per 128 values, rope key in the model's dtype; 656 instead of 1152 bytes per token
            and layer at DeepSeek's widths in bf16). Needs ``config.kv_lora_rank`` a multiple of 128.
        split_tokens: None, or batch-invariant attention in every layer (``MLAttention``'s ``split_tokens``): a
            sequence's attention output, in prompt and decode steps, does not depend on the other sequences
            generated beside it. The model's own GEMMs and norms are transformers' (a batch-invariant matmul
            library makes them invariant too); with ``norms=True`` the norms are this library's kernel, which
            sums each row in an order fixed by the width alone.
        norms: also swap the text decoder's other RMSNorm modules (the decoder layers' ``input_layernorm`` and
            ``post_attention_layernorm``, the final ``norm``: each outside the MLA attention whose class computes
            DeepSeek's RMSNorm formula, with no hooks of its own, ``KernelRMSNorm.can_adopt``; a multimodal model's
            vision tower keeps its own) for
            ``mla_kernels.norm.KernelRMSNorm``, which holds the same weight Parameter and computes the formula in
            one Triton launch where the attention's own norms do (``rms_norm``; the module's PyTorch ops
            otherwise: compiling, autograd, ...). Eight fewer launches per norm in an eager step; a value may
            differ from the module's by one rounding of its dtype (the sum of squares runs in another order).

    Returns ``model``, patched in place: the new modules share the original projection modules (no copies; the
    state dict keeps its keys and tensors). Every layer is checked before any is swapped, so a model that can't
    be patched raises ``TypeError``/``ValueError`` and is left as it was. ``unpatch_model`` restores it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    block_size = _utils.check_int("block_size", block_size, 1, none_ok=False)
    if max_cache_tokens is not None:
        max_cache_tokens = _utils.check_int("max_cache_tokens (None or an int >= block_size)", max_cache_tokens,
                                            block_size)
    if cache_dtype is not None and cache_dtype not in _utils.FP8_DTYPES:
        raise ValueError(f"cache_dtype must be None (the model's dtype) or torch.float8_e4m3fn, got {cache_dtype!r}")
    if split_tokens is not None:
        split_tokens = _utils.check_int("split_tokens", split_tokens, 1)
    if not isinstance(norms, bool):
        raise TypeError(f"norms must be a bool, got {type(norms).__name__}")
    config, model_type, layers = _decoder_layers(model)
    attn_cls = _attention_class(model_type)
    slots = _mla_slots(layers, model_type)
    if not slots:
        raise TypeError(f"{type(model).__name__} has no {attn_cls.__name__} (MLA) attention module to patch")
    for j, (_, _, attn) in enumerate(slots):
        i = attn.layer_idx if isinstance(getattr(attn, "layer_idx", None), int) else j  # (as errors name it)
        if isinstance(attn, TransformersMLAttention):
            raise ValueError(f"model is already patched (layer {i}); call unpatch_model first")
        if type(attn) is not attn_cls:
            raise TypeError(f"layer {i}'s self_attn is a {type(attn).__name__}, not {attn_cls.__name__}; "
                            f"patch_model can't replace it")
        # (a layer over another layer's latent, Mistral Large 4's kv_source_layers, has no latent projection)
        needs = ("kv_b_proj", "o_proj") if _latent_source(attn, config) is not None else \
            ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj")
        missing = [n for n in needs if getattr(attn, n, None) is None]
        if missing or all(getattr(attn, n, None) is None for n in ("q_proj", "q_b_proj", "q_gate_proj")):
            raise TypeError(f"layer {i}'s {attn_cls.__name__} lacks the projections "
                            f"{missing or ['q_proj/q_b_proj/q_gate_proj']}")
        kv_b = attn.kv_b_proj
        check_kv_b_proj(kv_b, f"layer {i}'s kv_b_proj")
        hook = getattr(kv_b, "_hf_hook", None)  # accelerate's: it loads an offloaded weight inside forward only
        if kv_b.weight.is_meta or any(getattr(h, "offload", False) for h in getattr(hook, "hooks", [hook])):
            raise TypeError(f"layer {i}'s kv_b_proj weight is offloaded (accelerate's device_map with cpu or disk "
                            f"offload) or on the meta device: the kernels read it directly, outside its forward, "
                            f"where such a weight is never loaded; patch a model whose weights are loaded on its "
                            f"devices (no offloading)")
        dtype = compute_dtype(attn)
        if dtype not in _utils.FLOAT_DTYPES:
            names = ", ".join(str(d).replace("torch.", "") for d in _utils.FLOAT_DTYPES)
            raise TypeError(f"layer {i} computes in {str(dtype).replace('torch.', '')}; the kernels take ({names}): "
                            f"convert the model first, e.g. model.to(torch.bfloat16)")
    # the cache layer each module writes (its layer_idx, which the patched module keeps): distinct, and as many
    # cache layers as the largest needs (a model with layers removed keeps its others' indices)
    indices = [getattr(attn, "layer_idx", None) for _, _, attn in slots]
    if any(isinstance(j, bool) or not isinstance(j, int) or j < 0 for j in indices) or len(set(indices)) < len(indices):
        raise TypeError(f"the attention modules' layer_idx must be distinct ints >= 0 (their cache layers), got "
                        f"{indices}")
    for j in sorted(indices):  # (a heterogeneous config's widths per layer: dots.llm3's, named by layer)
        layer_config = _layer_config(config, j)
        where = f"layer {j}'s " if layer_config is not config else ""
        _utils.check_width(f"{where}config.kv_lora_rank", layer_config.kv_lora_rank)
        _utils.check_rope_width(f"{where}config.qk_rope_head_dim", layer_config.qk_rope_head_dim)
        if cache_dtype is not None and layer_config.kv_lora_rank % _utils.FP8_GROUP:
            raise ValueError(f"cache_dtype float8_e4m3fn needs {where}config.kv_lora_rank a multiple of "
                             f"{_utils.FP8_GROUP}, got {layer_config.kv_lora_rank}")
        if getattr(layer_config, "q_lora_rank", None) == 0:  # (Mistral Large 4's config has none: q_proj)
            raise ValueError(f"{where}config.q_lora_rank is 0, which transformers' DeepSeek attention doesn't build; "
                             f"use None")

    sources = _latent_sources([attn for _, _, attn in slots], config)  # layer_idx -> the layer whose latent it reads
    # the latent cache holds the MLA modules' layers only, in layer_idx order (a hybrid's other layers, or a pruned
    # model's missing ones, take no latent memory; nor does a layer over another layer's latent: it reads the source's)
    order = sorted(j for j in indices if j not in sources)
    attentions = [TransformersMLAttention.adopt(  # every one made (and its layer checked) before any is swapped in
        attn, max(indices) + 1, block_size, max_cache_tokens, cache_dtype,
        latent_layer=order.index(sources.get(attn.layer_idx, attn.layer_idx)), num_latent_layers=len(order),
        hybrid=model_type in _OTHER_ATTENTION, split_tokens=split_tokens, latent_source=sources.get(attn.layer_idx),
        shares_latent=attn.layer_idx in sources.values())
        for _, _, attn in slots]
    first = min(attentions, key=lambda a: a.layer_idx)
    if first.sliding_window is not None:  # (the step's pads are read from its first MLA layer's mask)
        raise TypeError(f"layer {first.layer_idx}, the first MLA layer, attends over a sliding window, whose mask "
                        f"does not show which new tokens are pads; patch_model takes models whose first MLA layer "
                        f"attends over the whole past")
    # one latent cache for all layers, of the widest latent and rope part
    cache_rope = max(attention.qk_rope_head_dim for attention in attentions)
    cache_latent = max(attention.kv_lora_rank for attention in attentions)
    for (parent, name, _), attention in zip(slots, attentions):
        if attention.qk_rope_head_dim != cache_rope:  # a no-rope layer among rope layers (Mistral Large 4's), or a
            # narrower rope part among wider ones (a dots.llm3 whose sliding layers have their own)
            attention.cache_rope_dim = cache_rope
        if attention.kv_lora_rank != cache_latent:  # a narrower latent among wider ones (dots.llm3's)
            attention.cache_kv_lora_rank = cache_latent
        setattr(parent, name, attention)
    if norms:
        stand_ins = {}  # one per module: a norm in two places stays one module in both
        for parent, name, norm in _norm_slots(_text_decoder(model)[0]):  # (a vision tower keeps its own)
            if id(norm) not in stand_ins:
                stand_ins[id(norm)] = KernelRMSNorm.adopt(norm)
            setattr(parent, name, stand_ins[id(norm)])
    return model


def _layer_config(config, layer_idx: int):
    """One layer's config: a heterogeneous config's own view of it (dots.llm3's ``per_layer_config``, whose widths
    differ by layer and are refused when read from the whole), else the config itself."""
    return config.per_layer_config[layer_idx] if getattr(config, "is_heterogeneous", False) else config


def _latent_source(attn: nn.Module, config) -> int | None:
    """The layer whose latent ``attn`` attends over instead of its own (Mistral Large 4's ``config.kv_source_layers``
    for a layer transformers marks ``is_kv_shared_layer``), or None."""
    if not getattr(attn, "is_kv_shared_layer", False):
        return None
    return config.kv_source_layers[attn.layer_idx]


def _latent_sources(attns: list, config) -> dict[int, int]:
    """``{layer_idx: source layer_idx}`` of the layers over another layer's latent (``_latent_source``), checked: the
    source is an earlier patched layer with a latent of its own and the same rope width (transformers hands a layer
    the last latent of its rope kind, keyed "rope" or "nope": another kind is not one it could read)."""
    by_idx = {attn.layer_idx: attn for attn in attns}
    sources, stored = {}, {}  # stored: rope width -> the last layer so far that stores its latent for others
    for attn in sorted(attns, key=lambda a: a.layer_idx):
        source = _latent_source(attn, config)
        if source is None:
            if getattr(attn, "store_full_length_kv", False):
                stored[attn.qk_rope_head_dim] = attn.layer_idx
            continue
        i = attn.layer_idx
        origin = by_idx.get(source)
        if origin is None or source >= i or _latent_source(origin, config) is not None:
            raise TypeError(f"layer {i} attends over layer {source}'s latent (config.kv_source_layers), which is not "
                            f"an earlier MLA layer with a latent of its own")
        if origin.qk_rope_head_dim != attn.qk_rope_head_dim:
            raise TypeError(f"layer {i} (rope width {attn.qk_rope_head_dim}) attends over layer {source}'s latent "
                            f"(rope width {origin.qk_rope_head_dim}): config.kv_source_layers pairs a no-rope layer "
                            f"with a rope layer, which transformers' own attention cannot run either")
        if stored.get(attn.qk_rope_head_dim) != source:  # transformers hands it the last stored latent of its kind
            raise TypeError(f"layer {i} attends over layer {source}'s latent (config.kv_source_layers), but "
                            f"transformers' own attention hands it layer {stored.get(attn.qk_rope_head_dim)}'s, the "
                            f"last of its rope kind stored before it; patch_model refuses a model the two would run "
                            f"differently")
        sources[i] = source
    return sources


def _norm_slots(module: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """``(parent, name, norm)`` of every RMSNorm under ``module`` that ``patch_model(norms=True)`` swaps
    (``KernelRMSNorm.can_adopt``), outside the patched attention modules (whose norms ``rms_norm`` serves)."""
    slots = []
    for name, child in module._modules.items():
        if child is None or isinstance(child, TransformersMLAttention):
            continue
        if KernelRMSNorm.can_adopt(child):
            slots.append((module, name, child))
        else:
            slots += _norm_slots(child)
    return slots


def unpatch_model(model: nn.Module) -> nn.Module:
    """Put back the transformers attention modules ``patch_model`` replaced (same parameters), and the RMSNorm
    modules ``patch_model(norms=True)`` replaced (with the weight Parameters and attributes the stand-ins hold then;
    ``KernelRMSNorm.restore``). A stand-in that can't be restored (its weight parametrized while patched) raises
    ``ValueError`` before anything is restored. Returns ``model``."""
    _, _, layers = _decoder_layers(model, "unpatch_model")
    norms = [(parent, name, child) for parent in model.modules() for name, child in parent._modules.items()
             if isinstance(child, KernelRMSNorm) and "original" in vars(child)]  # (a KernelRMSNorm of the user's stays)
    for parent, name, norm in norms:  # every one checked before any is restored: a refusal leaves the model patched
        why = norm.restorable()
        if why is not None:
            raise ValueError(f"unpatch_model can't restore the RMSNorm at {name!r} of a {type(parent).__name__}: "
                             f"{why}; nothing was restored")
    restored = {}  # one original per stand-in (a norm in two places)
    for parent, name, norm in norms:
        if id(norm) not in restored:
            restored[id(norm)] = norm.restore()
        setattr(parent, name, restored[id(norm)])
    for parent, name, attn in _attention_slots(layers):
        if isinstance(attn, TransformersMLAttention):
            original = attn._hf_original
            original.training = attn.training  # model.train()/eval() while patched reached only the patched module
            # the adopted modules as they are now: one replaced while patched (merged, quantized) stays
            for child in (*_ADOPTED, *_ADOPTED_IF_PRESENT):
                if child in attn._modules and child in original._modules:
                    setattr(original, child, attn._modules[child])
            for param in _ADOPTED_PARAMETERS:
                if attn._parameters.get(param) is not None and original._parameters.get(param) is not None:
                    setattr(original, param, attn._parameters[param])
            setattr(parent, name, original)
    _reset_output_capturing_hooks(model)
    return model


def _reset_output_capturing_hooks(model: nn.Module) -> None:
    """Drop transformers' output-capturing hooks (``transformers.utils.output_capturing``, 5.17 on) and its
    "installed" mark, so its next forward that collects outputs installs them again on the modules the model has now.
    It installs them once per model: installed while patched, they left the restored attention modules without
    theirs, and ``output_attentions=True`` on the unpatched model gave an empty tuple, silently; installed before
    patching, the originals keep theirs, which a second install would double (so all go, not only the missing)."""
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, "__module__", None) == "transformers.utils.output_capturing":
                del module._forward_hooks[key]  # (as its RemovableHandle would, flags included)
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)
        module.__dict__.pop("_output_capturing_hooks_installed", None)
