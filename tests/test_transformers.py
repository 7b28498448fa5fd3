"""patch_model on tiny random-weight transformers DeepSeek models built offline from a config.

The generation tests run the Triton kernels through the interpreter, in fp32 and bf16.
"""

from __future__ import annotations

import copy
import functools
import re
import zlib

import pytest
import torch

import mla_kernels
from bench._harness import cache_kw
from helpers import (assert_fork_beside_a_busy_thread_finishes, cos_diff, err_ratio, fp8_linear, round_trip,
                     with_attention_sinks, with_fp8_kv_b)
from mla_kernels import _utils
from mla_kernels.cache import CacheFullError
from mla_kernels.integrations import transformers as integration
from mla_kernels.integrations.transformers import (TransformersMLAttention, latent_cache, patch_model,
                                                   static_latent_cache, unpatch_model)
from mla_kernels import norm as norm_mod, norm_rope as norm_rope_mod
from mla_kernels.module import MLAttention
from mla_kernels.norm import KernelRMSNorm
from test_module import YARN, tiny_config

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3ForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention  # noqa: E402

GREEDY = dict(do_sample=False, max_new_tokens=8, min_new_tokens=8)


def tiny_model(seed=0, **overrides) -> DeepseekV3ForCausalLM:
    torch.manual_seed(seed)
    return DeepseekV3ForCausalLM(tiny_config(**overrides)).eval()


def left_padded(lengths, vocab=128, seed=3):
    """input_ids and attention_mask [B, max(lengths)] with each prompt right-aligned (pads = 0 on the left)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(3, vocab, (n,), generator=gen)
        mask[i, width - n:] = 1
    return ids, mask


def tiny_fields(**overrides) -> dict:
    """``tiny_config``'s values for the fields the other DeepSeek configs (V2, V3.2) share with V3's."""
    kw = tiny_config(**overrides).to_dict()
    return {k: kw[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "q_lora_rank",
                               "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "vocab_size",
                               "num_hidden_layers", "intermediate_size", "moe_intermediate_size", "n_routed_experts",
                               "num_experts_per_tok", "n_group", "topk_group", "first_k_dense_replace",
                               "max_position_embeddings", "pad_token_id", "bos_token_id", "eos_token_id")}


def v2_model():
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM
    keep = tiny_fields(q_lora_rank=32, rope_parameters=YARN)
    torch.manual_seed(0)
    return DeepseekV2ForCausalLM(DeepseekV2Config(**keep, rope_parameters=YARN, attn_implementation="eager")).eval()


def glm_model():
    """GLM-4.7-Flash's architecture (``glm4_moe_lite``: DeepSeek-V3's attention under another name), tiny: 5 heads
    and a 24-wide nope head, neither a power of two, as GLM-4.7-Flash's 20 heads and 192 are not."""
    from transformers import Glm4MoeLiteConfig, Glm4MoeLiteForCausalLM
    torch.manual_seed(0)
    config = Glm4MoeLiteConfig(hidden_size=64, num_attention_heads=5, num_key_value_heads=5, q_lora_rank=32,
                               kv_lora_rank=32, qk_nope_head_dim=24, qk_rope_head_dim=16, v_head_dim=32,
                               vocab_size=128, num_hidden_layers=2, intermediate_size=64, moe_intermediate_size=32,
                               n_routed_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
                               attn_implementation="eager", pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return Glm4MoeLiteForCausalLM(config).eval()


def minicpm3_model():
    """MiniCPM3's architecture (DeepSeek-V2's attention with the rotate-half rope), tiny."""
    from transformers import MiniCPM3Config, MiniCPM3ForCausalLM
    torch.manual_seed(0)
    config = MiniCPM3Config(hidden_size=80, num_attention_heads=5, num_key_value_heads=5, q_lora_rank=32,
                            kv_lora_rank=32, qk_nope_head_dim=24, qk_rope_head_dim=16, v_head_dim=32, vocab_size=128,
                            num_hidden_layers=2, intermediate_size=64, max_position_embeddings=256,
                            attn_implementation="eager", pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return MiniCPM3ForCausalLM(config).eval()


def kimi_k25_model():
    """A multimodal model whose text decoder is DeepSeek-V3 (Kimi-K2.5), tiny, run on text alone: patch_model finds
    the decoder under ``model.language_model``. Its special token ids lie above the prompts' (``left_padded``)."""
    from transformers import Kimi_K25Config, Kimi_K25ForConditionalGeneration
    torch.manual_seed(0)
    vision = dict(num_attention_heads=2, num_hidden_layers=1, hidden_size=32, intermediate_size=32, pos_emb_height=4,
                  pos_emb_width=4)
    config = Kimi_K25Config(text_config=tiny_config(q_lora_rank=32, vocab_size=160).to_dict(), vision_config=vision,
                            projection_hidden_size=32, image_token_id=150, video_token_id=151,
                            vision_start_token_id=152, vision_end_token_id=153)
    return Kimi_K25ForConditionalGeneration(config).eval()


def v32_model(index_topk=4, **extra):
    """DeepSeek-V3.2 (DeepSeek-V3's attention plus the DSA indexer), tiny, with an index_topk below the prompts'
    lengths, so each query attends to a strict subset of its keys: its own 4 the indexer picks (the real model's
    2048 of up to 128K). Attending densely instead moves these logits by ~0.5 (tested below)."""
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM
    keep = tiny_fields(q_lora_rank=32)
    torch.manual_seed(0)
    config = DeepseekV32Config(**keep, index_n_heads=4, index_head_dim=32, index_topk=index_topk,
                               attn_implementation="eager", **extra)
    return DeepseekV32ForCausalLM(config).eval()


def youtu_model():
    """Youtu-LLM's architecture (DeepSeek-V3's attention under another name, dense MLP), tiny."""
    from transformers import YoutuConfig, YoutuForCausalLM
    keep = tiny_fields(q_lora_rank=32)
    keep = {k: keep[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "q_lora_rank",
                                 "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "vocab_size",
                                 "num_hidden_layers", "intermediate_size", "max_position_embeddings", "pad_token_id",
                                 "bos_token_id", "eos_token_id")}
    torch.manual_seed(0)
    return YoutuForCausalLM(YoutuConfig(**keep, rope_parameters=YARN, attn_implementation="eager")).eval()


def sarvam_model():
    """Sarvam-105B's model type (``sarvam_mla``: transformers builds a DeepseekV3ForCausalLM for it), tiny. Its
    config arrived in transformers 5.25."""
    try:
        from transformers import SarvamMLAConfig
    except ImportError:
        pytest.skip(f"transformers {transformers.__version__} has no SarvamMLAConfig")
    torch.manual_seed(0)
    return DeepseekV3ForCausalLM(SarvamMLAConfig(**tiny_fields(q_lora_rank=32), attn_implementation="eager")).eval()


def longcat_model():
    """LongCat-Flash's architecture, tiny: two DeepSeek-V3 attention modules per decoder layer (cache layers 2i and
    2i+1) whose query and latent carry LoRA scales (sqrt(hidden / rank): 2 and 1.41 here)."""
    from transformers import LongcatFlashConfig, LongcatFlashForCausalLM
    torch.manual_seed(0)
    config = LongcatFlashConfig(hidden_size=64, num_layers=2, num_attention_heads=4, q_lora_rank=16, kv_lora_rank=32,
                                qk_nope_head_dim=16, qk_rope_head_dim=16, head_dim=16, v_head_dim=16,
                                vocab_size=128, ffn_hidden_size=64, expert_ffn_hidden_size=32, n_routed_experts=4,
                                zero_expert_num=2, moe_topk=2, max_position_embeddings=256,
                                attn_implementation="eager", pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LongcatFlashForCausalLM(config).eval()


def kimi_linear_model():
    """Kimi-Linear's architecture, tiny: MLA without positional encoding (NoPE) in layers 1 and 3, Kimi Delta
    Attention (linear attention, transformers' PyTorch fallback on the CPU) in layers 0 and 2, whose modules and
    cache layers the patch leaves alone. Layer 0 is linear, so the latent cache's layers are 1 and 3 compacted."""
    from transformers import KimiLinearConfig, KimiLinearForCausalLM
    torch.manual_seed(0)
    config = KimiLinearConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                              q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
                              v_head_dim=16, vocab_size=128, intermediate_size=64, moe_intermediate_size=32,
                              num_experts=4, num_experts_per_token=2, linear_num_heads=2, linear_head_dim=16,
                              layer_types=["linear_attention", "full_attention"] * 2, max_position_embeddings=256,
                              attn_implementation="eager", pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return KimiLinearForCausalLM(config).eval()


def bailing_model():
    """Ling 3's architecture (``bailing_hybrid``, transformers 5.20 on), tiny: MLA with a head-wise sigmoid output
    gate (``g_proj``) in layers 1 and 3, linear attention in 0 and 2 (left to transformers, as Kimi-Linear's)."""
    try:
        from transformers import BailingHybridConfig, BailingHybridForCausalLM
    except ImportError:
        pytest.skip(f"transformers {transformers.__version__} has no BailingHybridConfig")
    torch.manual_seed(0)
    config = BailingHybridConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                 q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
                                 v_head_dim=16, head_dim=16, vocab_size=128, intermediate_size=64,
                                 moe_intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, n_group=1,
                                 topk_group=1, first_k_dense_replace=1, layer_group_size=2,
                                 max_position_embeddings=256, attn_implementation="eager", pad_token_id=0,
                                 bos_token_id=1, eos_token_id=2)
    return BailingHybridForCausalLM(config).eval()


def _transformers_class(*names):
    """The named transformers classes, or a skip where this transformers predates them."""
    try:
        return [getattr(transformers, name) for name in names]
    except AttributeError:
        pytest.skip(f"transformers {transformers.__version__} has no {names[0]}")


def axk1_model():
    """A.X-K1's architecture (DeepSeek-V3's attention under another name), tiny."""
    config_cls, model_cls = _transformers_class("AXK1Config", "AXK1ForCausalLM")
    torch.manual_seed(0)
    return model_cls(config_cls(**tiny_fields(q_lora_rank=32), attn_implementation="eager")).eval()


def mistral4_model():
    """Mistral Small 4's architecture, tiny: DeepSeek-V3's attention whose queries are scaled by position,
    ``1 + beta * log(1 + floor(pos / original_max_position_embeddings))`` (1 below that length: 8192 in the real
    model, 4 here, so every prompt crosses it), and whose rope_parameters name the rope's share of the whole query
    head (``partial_rotary_factor`` 0.5 here, all of the rope part rotated)."""
    config_cls, model_cls = _transformers_class("Mistral4Config", "Mistral4ForCausalLM")
    rope = dict(YARN, original_max_position_embeddings=4, llama_4_scaling_beta=0.1)
    torch.manual_seed(0)
    return model_cls(config_cls(**tiny_fields(q_lora_rank=32), rope_parameters=rope,
                                attn_implementation="eager")).eval()


def axk2_model():
    """A.X-K2's architecture, tiny: DeepSeek-V3.2's sparse attention (top-4 here) whose query and an elementwise
    output gate come from one projection (``q_gate_proj``) of the normed and the raw low-rank query."""
    config_cls, model_cls = _transformers_class("AXK2Config", "AXK2ForCausalLM")
    torch.manual_seed(0)
    return model_cls(config_cls(**tiny_fields(q_lora_rank=32), index_n_heads=4, index_head_dim=32, index_topk=4,
                                gated_norm_rank=8, attn_implementation="eager")).eval()


def glm5_model(indexer_types=("full", "shared", "shared", "full")):
    """GLM-5's architecture (``glm_moe_dsa``), tiny: DeepSeek-V3.2's sparse attention (top-4 here) in which the
    "shared" layers have no indexer and attend over the previous layer's picks (``prev_topk_indices``)."""
    config_cls, model_cls = _transformers_class("GlmMoeDsaConfig", "GlmMoeDsaForCausalLM")
    keep = dict(tiny_fields(q_lora_rank=32), num_hidden_layers=len(indexer_types))
    torch.manual_seed(0)
    return model_cls(config_cls(**keep, index_n_heads=4, index_head_dim=32, index_topk=4,
                                indexer_types=list(indexer_types), attn_implementation="eager")).eval()


def hy4_fields(indexer_types) -> dict:
    """Hy4's config fields, tiny: GLM-5's sparse attention (top-4 here, "shared" layers), attention sinks starting
    at 0.5, and two hyper-connection streams in its decoder layers (transformers' own, left alone)."""
    keep = {k: v for k, v in tiny_fields(q_lora_rank=32).items() if k not in ("n_group", "topk_group",
                                                                               "first_k_dense_replace")}
    return dict(keep, num_hidden_layers=len(indexer_types), index_n_heads=4, index_head_dim=32, index_topk=4,
                indexer_types=list(indexer_types), hc_mult=2, learnable_sink_init=0.5)


def hy4_model(indexer_types=("full", "shared", "shared", "full")):
    """Hy4's architecture (``hy_v4``), tiny: GLM-5's sparse attention whose softmax has a learned logit per head
    (attention sinks: a key of value zero) and whose output is gated elementwise by the sigmoid of
    ``gate_proj(hidden_states)`` (its rope rotates halves in transformers 5.17, interleaves in 5.25)."""
    config_cls, model_cls = _transformers_class("HYV4Config", "HYV4ForCausalLM")
    torch.manual_seed(0)
    return model_cls(config_cls(**hy4_fields(indexer_types), attn_implementation="eager")).eval()


def hy4_vl_model():
    """Hy4-VL (``hy_v4_vl``), tiny, run on text alone: Hy4's attention in its text decoder (``hy_v4_vl_text``),
    whose rope is multimodal (``mrope_section``; text positions on all three axes)."""
    config_cls, model_cls = _transformers_class("HYV4VLConfig", "HYV4VLForConditionalGeneration")
    text = dict(hy4_fields(("full", "shared")), vocab_size=160,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]})
    vision = dict(num_attention_heads=2, num_hidden_layers=1, hidden_size=32, intermediate_size=32, out_hidden_size=64)
    torch.manual_seed(0)
    config = config_cls(text_config=text, vision_config=vision, image_token_id=150, video_token_id=151)
    config.text_config._attn_implementation = "eager"  # (the model supports eager attention only)
    return model_cls(config).eval()


def mistral_large4_model(no_rope_layers=(1, 0, 1, 0), indexer_types=("full", "shared", "full", "shared"), **extra):
    """Mistral Large 4 (``mistral_large4``, transformers 5.22 on), tiny, run on text alone: DSA (top-4 here, "shared"
    layers reusing the previous layer's picks) over queries from ``q_proj``, layers 1 and 3 without a rotary part
    (``no_rope_layers``: P = 0 there and a nope head of nope + rope, in the latent cache of the rope layers), and each
    head's query scaled by ``scale[h] log(pos + 1) + bias[h]`` (``softmax_scaling``, which the model initialises
    to zeros, every query then zero: drawn here around 1, as a trained model's would be)."""
    config_cls, model_cls = _transformers_class("MistralLarge4Config", "MistralLarge4ForConditionalGeneration")
    keep = {k: v for k, v in tiny_fields().items() if k not in ("q_lora_rank", "n_group", "topk_group",
                                                                 "first_k_dense_replace")}
    text = dict(keep, vocab_size=160, head_dim=16, num_hidden_layers=len(no_rope_layers), index_n_heads=4,
                index_head_dim=32, index_topk=4, no_rope_layers=list(no_rope_layers),
                indexer_types=list(indexer_types), **extra)
    vision = dict(num_attention_heads=2, num_hidden_layers=1, hidden_size=32, intermediate_size=32, head_dim=16)
    torch.manual_seed(0)
    config = config_cls(text_config=text, vision_config=vision, image_token_index=150)
    config.text_config._attn_implementation = "eager"
    model = model_cls(config).eval()
    with torch.no_grad():
        for i, layer in enumerate(model.model.language_model.layers):
            scaling = layer.self_attn.softmax_scaling
            g = torch.Generator().manual_seed(i)
            scaling.scale.copy_(torch.randn(scaling.scale.shape, generator=g) * 0.3)
            scaling.bias.copy_(1 + torch.randn(scaling.bias.shape, generator=g) * 0.2)
    return model


GLM53_LAYERS = ("linear_attention", "indexed_attention", "indexed_attention", "linear_attention", "indexed_attention")


@functools.lru_cache(maxsize=None)
def _glm53_dsa_layer_type(config_cls) -> str:
    """What the installed transformers calls GLM-5.3-Flash's DSA layers in ``layer_types``, read from its config's
    own default layout: "indexed_attention" in 5.25, "deepseek_sparse_attention" in 5.17 (the GPU machine's), whose
    config refuses the other name. The attention modules are the same."""
    return next(t for t in config_cls().text_config.layer_types if t != "linear_attention")


def glm53_model(layer_types=GLM53_LAYERS, indexer_types=("full", "full", "shared", "full", "full"), index_kpool=2,
                index_topk=4, tail=True):
    """GLM-5.3-Flash (``glm5_next``), tiny, run on text alone: MLA without a rotary part (its config requires
    ``qk_rope_head_dim`` 0) in the "indexed_attention" layers (5.17's "deepseek_sparse_attention"), linear attention
    (left to transformers) in the others, two hyper-connection streams; DSA whose indexer scores pools of ``index_kpool`` keys, picks the
    top ``index_topk / index_kpool`` of them and (``tail``) the keys of the query's own pool so far, a "shared"
    layer reusing the previous layer's picks. Its layers get the step's own [B, Q] padding mask."""
    config_cls, model_cls = _transformers_class("Glm5NextConfig", "Glm5NextForConditionalGeneration")
    dsa = _glm53_dsa_layer_type(config_cls)
    layer_types = [dsa if t == "indexed_attention" else t for t in layer_types]
    text = dict(hidden_size=64, num_hidden_layers=len(layer_types), num_attention_heads=4, num_key_value_heads=4,
                q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=0, v_head_dim=16,
                vocab_size=160, intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4,
                num_experts_per_tok=2, mlp_layer_types=["dense"] * len(layer_types), layer_types=list(layer_types),
                indexer_types=list(indexer_types), index_topk=index_topk, index_kpool=index_kpool,
                index_kpool_always_select_tail=tail, index_n_heads=4, index_head_dim=32, linear_num_heads=2,
                linear_head_dim=16, hc_mult=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                eos_token_id=2)
    vision = dict(num_attention_heads=2, depth=1, hidden_size=32, intermediate_size=32, out_hidden_size=64)
    tokens = dict(image_token_id=150, video_token_id=151, image_start_token_id=152, image_end_token_id=153,
                  video_start_token_id=154, video_end_token_id=155)
    torch.manual_seed(0)
    config = config_cls(text_config=text, vision_config=vision, **tokens)
    config.text_config._attn_implementation = "sdpa"  # (its default; eager differs only where a query sees no key)
    return model_cls(config).eval()


DOTS3_LAYERS = ("indexed_attention", "sliding_attention", "indexed_attention", "sliding_attention")


def dots3_model(layer_types=DOTS3_LAYERS, sliding_window=4, kv_lora_rank=32, swa_kv_lora_rank=64, **extra):
    """dots.llm3 (``dots3_note``, transformers 5.23 on), tiny: DSA layers (top-4) and sliding-window layers (a window
    of 4 keys here) whose attention has other widths (2 heads and a latent of 64 against 4 heads and 32:
    ``per_layer_config``), the rope key RMS-normed before the rope, LoRA scales on the query and the latent, and a
    head-wise sigmoid gate on the output."""
    config_cls, model_cls = _transformers_class("Dots3NoteTextConfig", "Dots3NoteForCausalLM")
    swa = dict(swa_num_attention_heads=2, swa_num_key_value_heads=2, swa_q_lora_rank=32,
               swa_kv_lora_rank=swa_kv_lora_rank, swa_head_dim=32, swa_qk_nope_head_dim=16, swa_v_head_dim=16)
    swa.update({name: extra.pop(name) for name in list(extra) if name.startswith("swa_")})
    config = config_cls(hidden_size=64, num_hidden_layers=len(layer_types), num_attention_heads=4,
                        num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=kv_lora_rank, qk_nope_head_dim=16,
                        qk_rope_head_dim=16, v_head_dim=16, head_dim=32, vocab_size=128, intermediate_size=64,
                        moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
                        shared_experts_intermediate_size=32, mlp_layer_types=["dense"] * len(layer_types),
                        layer_types=list(layer_types), sliding_window=sliding_window, index_topk=4, index_n_heads=4,
                        index_head_dim=32, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, attn_implementation="eager", **swa, **extra)
    torch.manual_seed(0)
    return model_cls(config).eval()


MODELS = {
    "v3-qproj": lambda: tiny_model(),
    "v3-qlora-yarn": lambda: tiny_model(q_lora_rank=32, rope_parameters=YARN),
    "v2-qlora-yarn": v2_model,
    "glm4-moe-lite": glm_model,
    "minicpm3": minicpm3_model,
    "kimi-k25-text": kimi_k25_model,
    "v32-dsa-topk4": v32_model,
    "youtu": youtu_model,
    "sarvam-mla": sarvam_model,
    "longcat-flash": longcat_model,
    "kimi-linear": kimi_linear_model,
    "bailing-hybrid": bailing_model,
    "axk1": axk1_model,
    "mistral4": mistral4_model,
    "glm5-dsa-shared": glm5_model,
    "axk2-gated-dsa": axk2_model,
    "hy4-sinks-gated-dsa": hy4_model,
    "hy4-vl-text": hy4_vl_model,
    "mistral-large4-text": mistral_large4_model,
    "glm5.3-flash-pooled-dsa": glm53_model,
    "dots3-sliding-two-widths": dots3_model,
    # the patched attention takes transformers' own cos/sin, so any rope type it computes works (was refused)
    "v3-rope-linear": lambda: tiny_model(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "v3-rope-dynamic": lambda: tiny_model(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0,
                                                           "factor": 2.0}),
}


def greedy_against_stock(model, monkeypatch):
    """``model``'s greedy generation (3 left-padded prompts of 5, 9 and 2 tokens, fp32) patched, starting with no
    headroom and 4-token pages, asserted equal to stock transformers'; returns the patched generate's output."""
    ids, mask = left_padded([5, 9, 2])
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
        monkeypatch.setattr(integration, "INITIAL_HEADROOM_TOKENS", 0)
        patch_model(model, block_size=4)
        out = model.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True, **GREEDY)
    assert torch.equal(out.sequences, expected), f"\n{out.sequences[:, ids.shape[1]:]}\n{expected[:, ids.shape[1]:]}"
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_generate_matches_eager_fp32(name, monkeypatch):
    """3 left-padded prompts (5, 9, 2 tokens), 8 new tokens: the same tokens as transformers' eager attention.
    The latent cache starts with no headroom and 4-token pages, so it grows several times on the way."""
    ids = left_padded([5, 9, 2])[0]
    model = MODELS[name]()
    out = greedy_against_stock(model, monkeypatch)
    cache = out.past_key_values
    lc = latent_cache(cache)
    # real tokens only (the last one is not fed); GLM-5.3-Flash's every position (local_mask: its picks number them)
    keeps_pads = any(isinstance(m, TransformersMLAttention) and m.local_mask for m in model.modules())
    prompts = [9] * 3 if keeps_pads else [5, 9, 2]
    assert [lc.seqlen(s) for s in lc.seq_ids] == [n + 7 for n in prompts]
    assert cache.get_seq_length() == ids.shape[1] + 7
    assert lc.num_blocks > 2 * 3  # grew from its initial 1 block per sequence


NORM_MODELS = [name for name in MODELS if not name.startswith("v3-rope")]  # (one per architecture)


@pytest.mark.parametrize("name", NORM_MODELS)
def test_every_architecture_generates_with_its_norms_swapped(name):
    """``norms=True`` on every supported architecture: its decoder norms and final norm (nothing inside attention,
    a hybrid's linear attention, an indexer or a vision tower) are stand-ins, greedy tokens (fp32, left-padded) are
    transformers' own, and ``unpatch_model`` gives back the same modules."""
    model = MODELS[name]()
    ids, mask = left_padded([5, 9, 2])
    greedy = dict(GREEDY, max_new_tokens=4, min_new_tokens=4)
    modules = dict(model.named_modules())
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, **greedy)
        patch_model(model, block_size=4, norms=True)
        swapped = sorted(name for name, m in model.named_modules() if isinstance(m, KernelRMSNorm))
        got = model.generate(input_ids=ids, attention_mask=mask, **greedy)
    layers = integration._decoder_layers(model)[2]
    # (A.X-K1 also norms its MoE block's output: mlp.post_mlp_layernorm)
    assert swapped and all(re.fullmatch(r"(.*\.)?(norm|layers\.\d+\.((input|post_attention)_layernorm(\.\d+)?"
                                        r"|mlp\.post_mlp_layernorm))", n) for n in swapped), swapped
    assert len(swapped) >= 2 * len(layers) + 1
    assert torch.equal(got, expected), f"\n{got[:, ids.shape[1]:]}\n{expected[:, ids.shape[1]:]}"
    unpatch_model(model)
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(m is modules[n] for n, m in model.named_modules())


@pytest.mark.parametrize("built,told", [(None, 32), (32, None)], ids=["q_proj-told-a-rank", "q_a_proj-told-none"])
def test_the_modules_query_projection_decides_over_the_config(monkeypatch, built, told):
    """A model whose attention builds ``q_proj`` although its config names a ``q_lora_rank`` (Ling 3's
    BailingHybridAttention in transformers 5.20 ignores it; 5.25 builds q_a_proj) is patched after its modules:
    ``patch_model`` raised "object has no attribute 'q_a_proj'" there. Here a DeepSeek-V3 built without query LoRA
    is told one afterwards; the patched model generates transformers' tokens. The other way round too (built with
    q_a_proj, told None: the patched module had no query projection, "'NoneType' object is not callable")."""
    model = tiny_model(q_lora_rank=built)
    model.config.q_lora_rank = told  # (the attention modules share this config)
    assert ("q_a_proj" in model.model.layers[0].self_attn._modules) == (built is not None)
    ids, mask = left_padded([5, 9, 2])
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
        monkeypatch.setattr(integration, "INITIAL_HEADROOM_TOKENS", 0)
        patch_model(model, block_size=4)
        out = model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    assert torch.equal(out, expected)
    assert model.model.layers[0].self_attn.q_lora_rank == built


def widen_attention(model) -> None:
    """Draw the attention weights at std 0.2 (the models' init is 0.02): attention, its rope and its key choice then
    move the logits far more than rounding does. Each parameter from a seed of its own name (seeded by the name's
    length, every layer's attention had the same weights)."""
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if ".self_attn." in pname and "layernorm" not in pname:
                p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(zlib.crc32(pname.encode())))


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_matches_transformers_where_attention_decides(name):
    """fp32 logits of the patched model against stock transformers' with the attention weights drawn at std 0.2, so
    that attention (and its rope) moves the logits far more than at the models' init std 0.02: there the greedy
    tokens of a wrong rope style still matched (MiniCPM3 read as interleaved gave equal tokens and a 0.40 relative
    error here). Tolerance: both sides compute in fp32 over ~10 reductions of <= 64 terms (relative rounding
    ~1e-6; 5e-7 measured), so 1e-4 leaves margin and still fails any wrong rope, scale or mask."""
    error = patched_forward_error(MODELS[name]())
    assert error < 1e-4, error


def patched_forward_error(model) -> float:
    """The relative error of the patched model's fp32 logits against stock transformers' on a left-padded batch,
    with the attention weights widened (``widen_attention``)."""
    widen_attention(model)
    ids, mask = left_padded([12, 9, 5])
    real = mask.bool()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        patch_model(model, block_size=4)
        got = model(input_ids=ids, attention_mask=mask).logits
    return err_ratio(got[real], expected[real])


@pytest.mark.parametrize("cache_kind", ["none", "dynamic", "static"])
def test_attention_sinks_are_adopted_and_applied_with_every_cache(cache_kind, monkeypatch):
    """An attention module with a ``sinks`` parameter keeps it patched, whatever the model (Hy4 has one; here
    DeepSeek-V3's attention runs gpt-oss's sink attention, so its model has none of Hy4's indexer, which keeps a
    static latent cache out): logits (fp32, widened attention, sinks drawn at std 2) within fp32 rounding of
    transformers', for every step of a generation over each cache: none (one prompt forward), transformers'
    dynamic one, and the static latent cache, whose own step calls the kernels. Without the sinks the prompt
    forward's logits were off by 0.32 relative RMS, and the generated tokens differed."""
    model = tiny_model(q_lora_rank=32)
    widen_attention(model)
    with_attention_sinks(model, monkeypatch)
    ids, mask = left_padded([7, 4, 1])
    real = mask.bool()
    greedy = dict(GREEDY, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        if cache_kind == "none":
            expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[real]
        else:
            expected = model.generate(ids, attention_mask=mask, **greedy)
        sinks = [layer.self_attn.sinks for layer in model.model.layers]
        patch_model(model, block_size=4)
        assert [layer.self_attn.sinks for layer in model.model.layers] == sinks  # the same Parameters
        if cache_kind == "none":
            errors = [err_ratio(model(input_ids=ids, attention_mask=mask, use_cache=False).logits[real], expected)]
        else:
            kw = {} if cache_kind == "dynamic" else dict(past_key_values=static_latent_cache(model, 3, 32,
                                                                                            block_size=4))
            got = model.generate(ids, attention_mask=mask, **greedy, **kw)
            assert torch.equal(got.sequences, expected.sequences)
            errors = [err_ratio(g, e) for g, e in zip(got.logits, expected.logits)]
    assert max(errors) < 1e-4, errors  # (test_forward_matches_transformers_where_attention_decides: why 1e-4)


@pytest.mark.parametrize("index_topk", [4, 13])
def test_v32_sparse_attention_is_what_decides(index_topk):
    """The DeepSeek-V3.2 test model's index_topk makes a difference: with 4 (below the prompts' 12 keys) the patched
    model attending densely over the same cache (its indexer's picks dropped) is far from stock transformers, sparse
    is within fp32 rounding; a cached decode step matches too. With 13 the prompt step (12 keys) takes the dense
    kernels (the indexer picks every key) and the decode step (13) too, then a second step (14 keys) the sparse
    path. A static latent cache is refused (it holds no indexer keys)."""
    model = v32_model(index_topk)
    widen_attention(model)
    ids, mask = left_padded([12, 9, 5])
    real = mask.bool()
    step = torch.tensor([[5], [6], [7]])
    mask2 = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
    mask3 = torch.cat([mask2, torch.ones(3, 1, dtype=mask.dtype)], 1)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        expected = model(input_ids=ids, attention_mask=mask, past_key_values=cache).logits
        expected_step = model(input_ids=step, attention_mask=mask2, past_key_values=cache).logits
        expected_step2 = model(input_ids=step + 1, attention_mask=mask3, past_key_values=cache).logits
        patch_model(model, block_size=4)
        cache = DynamicCache(config=model.config)
        got = model(input_ids=ids, attention_mask=mask, past_key_values=cache).logits
        got_step = model(input_ids=step, attention_mask=mask2, past_key_values=cache).logits
        got_step2 = model(input_ids=step + 1, attention_mask=mask3, past_key_values=cache).logits
        real_positions = integration._sparse_positions
        try:
            # the same patched model, attending densely (no latent positions)
            integration._sparse_positions = lambda *args: (None, None)
            dense = model(input_ids=ids, attention_mask=mask).logits
        finally:
            integration._sparse_positions = real_positions
    assert err_ratio(got[real], expected[real]) < 1e-4  # fp32 rounding (as test_forward_..._attention_decides)
    assert err_ratio(got_step, expected_step) < 1e-4
    assert err_ratio(got_step2, expected_step2) < 1e-4
    if index_topk < ids.shape[1]:
        assert err_ratio(dense[real], expected[real]) > 0.1
    with pytest.raises(ValueError, match="indexer"):
        integration.static_latent_cache(model, 3, 32)


def test_v32_interleaves_its_rope_whatever_the_config_says():
    """transformers' DeepSeek-V3.2 attention interleaves its rope unconditionally (its config drops V3's
    ``rope_interleave``), yet the config still stores a ``rope_interleave=False`` it is given: the patched model
    read that flag and applied the rotate-half rope, 0.53 relative logit error. Tolerance as in
    ``test_forward_matches_transformers_where_attention_decides`` (fp32 rounding)."""
    error = patched_forward_error(v32_model(index_topk=64, rope_interleave=False))  # index_topk 64: dense
    assert error < 1e-4, error


@pytest.mark.parametrize("make", [v32_model, glm5_model], ids=["v32", "glm5-shared"])
def test_v32_beam_search_and_prompt_lookup(make):
    """DeepSeek-V3.2's indexer keys (kept per layer by LatentCacheLayer, pads included) follow beam search's
    reorders and speculative decoding's crops: stock transformers' sequences, with the attention weights drawn wide
    so the indexer's picks and the beams differ between rows. GLM-5's shared layers too (the previous layer's
    picks, reordered with it)."""
    model = make()
    widen_attention(model)
    ids, mask = left_padded([12, 9, 5])
    beams = dict(num_beams=3, num_return_sequences=2, do_sample=False, max_new_tokens=6)
    lookup = dict(do_sample=False, max_new_tokens=10, prompt_lookup_num_tokens=3)
    with torch.no_grad():
        expected = (model.generate(input_ids=ids, attention_mask=mask, **beams),
                    model.generate(input_ids=ids[:1], attention_mask=mask[:1], **lookup))
        patch_model(model, block_size=4)
        got = (model.generate(input_ids=ids, attention_mask=mask, **beams),
               model.generate(input_ids=ids[:1], attention_mask=mask[:1], **lookup))
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_what_glm5_and_mistral4_layers_need_is_asked_for():
    """A GLM-5 shared layer called without the previous layer's picks, and a Mistral 4 layer without the position
    ids its query scale needs, are refused before the step is counted (stock raises for the first, and computes
    its scale from the ids); a static latent cache is refused for GLM-5 and Hy4 (it holds no indexer keys)."""
    ids, mask = left_padded([5, 3])
    for make, layer, match in ((glm5_model, 1, "layer 1 reuses the previous layer's top-k picks .* prev_topk_indices "
                                                "is required \\(call it through its decoder layer"),
                               (mistral4_model, 0, "position_ids is required: this model's attention scales its "
                                                   "queries by position")):
        model = make()
        patch_model(model)
        with torch.no_grad():
            hidden = model.model.embed_tokens(ids)
            cos_sin = model.model.rotary_emb(hidden, torch.arange(ids.shape[1])[None])
            cache = DynamicCache(config=model.config)
            with pytest.raises(ValueError, match=match):
                model.model.layers[layer].self_attn(hidden, position_embeddings=cos_sin, attention_mask=None,
                                                    past_key_values=cache)
            assert [cache.get_seq_length(i) for i in range(len(model.model.layers))] == [0] * len(model.model.layers)
            model(input_ids=ids, attention_mask=mask, past_key_values=cache)  # the same cache serves the model
    for make in (glm5_model, hy4_model):
        with pytest.raises(ValueError, match="indexer"):
            integration.static_latent_cache(patch_model(make()), 2, 32)


def test_hy4_sinks_are_checked_before_the_step_and_restored_by_unpatch():
    """Hy4's sinks replaced by ones that do not fit the layer (another head count, a [1] that would broadcast, an
    integer or a meta tensor) are refused by name before the layer's step is counted or stored, so the same Cache
    serves once the right ones are back (a bare RuntimeError after the step's write spoiled it); ones replaced by a
    fitting Parameter reach the original at ``unpatch_model``."""
    model = patch_model(hy4_model(), block_size=4)
    ids, mask = left_padded([5, 3])
    attn = model.model.layers[0].self_attn  # (called alone, as its decoder layer calls it: a full indexer layer)
    good = attn.sinks
    with torch.no_grad():
        hidden = model.model.embed_tokens(ids)
        cos_sin = model.model.rotary_emb(hidden, torch.arange(ids.shape[1])[None])
        cache = DynamicCache(config=model.config)
        for bad, error, match in ((torch.zeros(8), ValueError, r"sinks must be a \[num_heads\] = \[4\] tensor"),
                                  (torch.zeros(1), ValueError, r"got shape \(1,\)"),
                                  (torch.zeros(4, dtype=torch.int32), TypeError, "sinks must be a floating-point"),
                                  (torch.zeros(4, device="meta"), ValueError, "sinks is on meta")):
            attn.sinks = torch.nn.Parameter(bad, requires_grad=False)
            with pytest.raises(error, match=match):
                attn(hidden, position_embeddings=cos_sin, attention_mask=None, past_key_values=cache)
            assert [cache.get_seq_length(i) for i in range(4)] == [0] * 4
        attn.sinks = good
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)  # the same cache serves
        fresh = torch.nn.Parameter(torch.ones(4))
        attn.sinks = fresh
    unpatch_model(model)
    assert model.model.layers[0].self_attn.sinks is fresh


def test_hy4_gate_is_computed_as_transformers_computes_it():
    """Hy4's output gate in the model's dtype, as transformers multiplies it (A.X-K2's is in fp32): the patched
    layer's output projection equals stock's formula bit for bit in bf16 (a gate taken in fp32 differs in the last
    bit of some values)."""
    model = hy4_model().to(torch.bfloat16)
    original = model.model.layers[0].self_attn
    patch_model(model)
    attn = model.model.layers[0].self_attn
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 3, 64, generator=gen).to(torch.bfloat16)
    out = torch.randn(2, 3, 64, generator=gen).to(torch.bfloat16)  # [B, Q, H * D_v]
    with torch.no_grad():
        expected = original.o_proj((out.view(2, 3, 4, 16) * torch.sigmoid(
            original.gate_proj(hidden).view(2, 3, 4, 16))).reshape(2, 3, 64))
        assert torch.equal(attn._project_out(out, hidden), expected)


def test_hy4_config_builds_an_mlattention_with_sinks():
    """``MLAttention.from_config`` on a Hy4 config has its sinks (zeros until loaded) and loads the attention's
    state dict but for the gate and the indexer, which patch_model adopts from the model (not the module's)."""
    model = hy4_model()
    mod = MLAttention.from_config(model.config)
    assert mod.sinks.shape == (4,) and not mod.sinks.any() and mod.rope_style == "interleave"
    missing, unexpected = mod.load_state_dict(model.model.layers[0].self_attn.state_dict(), strict=False)
    assert not missing and {k.split(".")[0] for k in unexpected} == {"gate_proj", "indexer"}


def test_a_model_whose_attention_has_no_sinks_is_served_without():
    """Hy4-VL's attention runs without sinks where it has none (``module.sinks is None``): the stand-in, whose
    model type gives it sinks, drops them too, and the widened-attention logits stay within fp32 rounding of
    stock (with zero sinks they were off)."""
    model = hy4_vl_model()
    for layer in model.model.language_model.layers:
        layer.self_attn.sinks = None
    assert patched_forward_error(model) < 1e-4
    assert all("sinks" not in layer.self_attn._parameters for layer in model.model.language_model.layers)


def test_what_dsa_and_mistral4_layers_read_from_their_modules_is_read_at_each_call():
    """The indexer's ``index_topk`` and Mistral 4's ``llama_4_scaling_beta`` (config.rope_parameters), set after
    patch_model, reach the patched model as they reach stock, which reads them at each call: a top-k copied at
    patch time attended densely (0.48 relative off stock on V3.2, 0.40 on GLM-5), a copied beta scaled by the old
    one (0.11). Tolerance as in ``test_forward_matches_transformers_where_attention_decides``."""
    def topk_4(model):
        for layer in model.model.layers:
            if getattr(layer.self_attn, "indexer", None) is not None:
                layer.self_attn.indexer.index_topk = 4

    def beta_half(model):
        model.config.rope_parameters["llama_4_scaling_beta"] = 0.5

    for make, edit in ((lambda: v32_model(index_topk=16), topk_4), (lambda: glm5_model(("full", "shared")), topk_4),
                       (mistral4_model, beta_half)):
        model = make()
        widen_attention(model)
        ids, mask = left_padded([12, 9, 5])
        real = mask.bool()
        with torch.no_grad():
            patched = copy.deepcopy(model)
            patch_model(patched, block_size=4)
            edit(model)
            edit(patched)
            error = err_ratio(patched(input_ids=ids, attention_mask=mask).logits[real],
                              model(input_ids=ids, attention_mask=mask).logits[real])
        assert error < 1e-4, error


def test_latent_only_cache_memory():
    """transformers' Cache keeps no K/V bytes; the latent cache holds R + P values per real token and layer."""
    model = tiny_model(q_lora_rank=32)
    config = model.config
    patch_model(model, block_size=4)
    ids, mask = left_padded([6, 3])
    cache = DynamicCache(config=config)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)
    assert held == 0
    assert all(isinstance(layer, integration.LatentCacheLayer) for layer in cache.layers)
    lc = latent_cache(cache)
    width = config.kv_lora_rank + config.qk_rope_head_dim
    assert lc.num_layers == config.num_hidden_layers
    assert all(lc.buffer(layer).shape[-1] == width for layer in range(lc.num_layers))
    assert lc.bytes_per_token == config.num_hidden_layers * width * 4
    assert [lc.seqlen(s) for s in lc.seq_ids] == [6, 3]  # pads are not stored


BF16_MODELS = {
    "v3-dense": lambda: tiny_model(q_lora_rank=32, rope_parameters=YARN, first_k_dense_replace=2),
    "glm5.3-flash-every-pool": lambda: glm53_model(index_kpool=4, index_topk=32),
}


@pytest.mark.parametrize("name", list(BF16_MODELS))
def test_bf16_teacher_forced_logits_close(name):
    """bf16 logits of the patched model against the fp32 eager model, beside transformers' own bf16 eager run.

    Tolerance: logits come out of ~10 bf16 roundings in a row (embedding, norms, projections, attention, MLP,
    lm_head; 2^-8 relative each, ~2.3e-3 RMS), so a relative RMS error of ~1e-2 against fp32 is bf16's floor. The
    kernels accumulate in fp32 and never round the expanded K/V or the probabilities to bf16 before P.V, so they
    must do at least as well as eager bf16 (with 25% slack) and stay under 2e-2 (cosine difference under 5e-4).

    Every layer dense: expert routing is a discontinuity, not numerics. With the MoE layer, one token's top-2
    experts flipped in transformers' eager bf16 run (that token 0.14 off, the run 2.03e-2 against 5.3e-3 dense), and
    in the patched run wherever its rounding happened to land there too: under GPU rounding (``MLA_TEST_GPU_LIKE``:
    the rope in fp32, rounded once) it did, 2.04e-2, over the bound, as a GPU would have; 5.3e-3 to 6.6e-3 dense in
    every mode (measured 2026-12-06).

    GLM-5.3-Flash: its indexer picks all the pools there are here (``index_topk`` 32 >= the 24 keys), as which pools
    it picks is a discontinuity too (one flipped pick moved transformers' own bf16 run to 4.2e-2 at top-4); every
    real token still attends through the sparse path's key lists. 8.1e-3 patched, 7.8e-3 eager (2026-12-07)."""
    model = BF16_MODELS[name]()
    ids, mask = left_padded([24, 17, 9], seed=5)
    real = mask.bool()
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits.double()
        model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
        eager = model_bf16(input_ids=ids, attention_mask=mask).logits
        patch_model(model_bf16)
        patched = model_bf16(input_ids=ids, attention_mask=mask).logits
    eager_err = err_ratio(eager[real], reference[real])
    patched_err = err_ratio(patched[real], reference[real])
    assert patched_err <= max(1.25 * eager_err, 1e-2), (patched_err, eager_err)
    assert patched_err < 2e-2 and cos_diff(patched[real], reference[real]) < 5e-4, patched_err
    assert (patched[real].argmax(-1) == eager[real].argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("use_cache", [False, True], ids=["no-cache", "cache"])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_forward_matches_transformers(attn_implementation, use_cache):
    """Plain forward calls, with or without a cache, under either attention implementation's mask format."""
    model = tiny_model(attn_implementation=attn_implementation)
    ids, mask = left_padded([7, 4, 1])
    real = mask.bool()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, use_cache=use_cache).logits
        patch_model(model)
        got = model(input_ids=ids, attention_mask=mask, use_cache=use_cache).logits
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


def additive_mask(allowed: torch.Tensor) -> torch.Tensor:
    """A 4-D ``[B, 1, Q, KV]`` float mask as eager attention adds it: 0 where allowed, the dtype's minimum elsewhere."""
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]


@pytest.mark.parametrize("cache_kind", ["none", "dynamic", "static"])
def test_a_mask_the_kernels_do_not_compute_is_refused_before_anything_is_stored(cache_kind, monkeypatch):
    """A 4-D mask is accepted when it is causal attention over the keys its last row sees (left padding here) and
    matches transformers; two documents packed into one row with a block-diagonal mask are refused with a
    ValueError (they were read as padding: the first document's tokens' outputs came back as zeros), before the
    cache counts or stores anything: the same cache then serves the accepted mask."""
    monkeypatch.setattr(_utils, "interpreting", lambda: False)  # wiring only: the PyTorch path is enough
    model = tiny_model()
    q = 8
    ids = torch.randint(3, 128, (2, q), generator=torch.Generator().manual_seed(0))
    key, query = torch.arange(q), torch.arange(q)[:, None]
    real = torch.tensor([[0] * 3 + [1] * 5, [1] * 8], dtype=torch.bool)  # row 0 left-padded
    padded = additive_mask((key <= query) & real[:, None, :])
    docs = torch.zeros(q, dtype=torch.long).masked_fill(torch.arange(q) >= 5, 1)  # tokens 0-4, then 5-7
    packed = additive_mask(((key <= query) & (docs[None, :] == docs[:, None])).expand(2, q, q))
    per_head = padded.expand(2, 2, q, q).clone()
    per_head[1, 1, 7, 0] = torch.finfo(torch.float32).min  # head 1 of row 1 hides a key head 0 sees
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=padded, use_cache=False).logits
        patch_model(model, block_size=4)

        def cache():
            return {"none": None, "dynamic": DynamicCache(config=model.config),
                    "static": integration.static_latent_cache(model, 2, 16, block_size=4)}[cache_kind]

        kv = cache()
        for bad in (packed, per_head):
            with pytest.raises(ValueError, match="attention_mask"):
                model(input_ids=ids, attention_mask=bad, past_key_values=kv, use_cache=kv is not None)
            if kv is not None:
                assert kv.get_seq_length() == 0, "the refused call counted tokens in the cache"
        got = model(input_ids=ids, attention_mask=padded, past_key_values=kv, use_cache=kv is not None).logits
    ok = real.clone()
    torch.testing.assert_close(got[ok], expected[ok], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_config", [True, False])
def test_a_fresh_cache_whose_first_step_is_refused_stays_a_transformers_cache(with_config, monkeypatch):
    """The refusal of a mask the kernels do not compute advises the unpatched model: a fresh DynamicCache passed to
    the refused call then serves it, to stock transformers' logits. (The refused call had made its layers latent
    cache layers and attached a latent state, which transformers' own attention then refused.)"""
    monkeypatch.setattr(_utils, "interpreting", lambda: False)  # wiring only: the PyTorch path is enough
    model = tiny_model()
    q = 8
    ids = torch.randint(3, 128, (2, q), generator=torch.Generator().manual_seed(0))
    key, query = torch.arange(q), torch.arange(q)[:, None]
    docs = torch.zeros(q, dtype=torch.long).masked_fill(torch.arange(q) >= 5, 1)  # tokens 0-4, then 5-7
    packed = additive_mask(((key <= query) & (docs[None, :] == docs[:, None])).expand(2, q, q))

    def fresh():
        return DynamicCache(config=model.config) if with_config else DynamicCache()

    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=packed, past_key_values=fresh()).logits
        kv = fresh()
        layers, replicate = list(kv.layers), getattr(kv, "layer_class_to_replicate", None)
        patch_model(model, block_size=4)
        with pytest.raises(ValueError, match="attention_mask"):
            model(input_ids=ids, attention_mask=packed, past_key_values=kv)
        assert kv.layers == layers and getattr(kv, "layer_class_to_replicate", None) is replicate
        assert latent_cache(kv) is None and not hasattr(kv, "_mla_latent_state")
        unpatch_model(model)
        got = model(input_ids=ids, attention_mask=packed, past_key_values=kv).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_multi_turn_chat_keeps_the_cache():
    """Seed 002, done with the real thing: turn 2 continues on turn 1's cache (only the new tokens are fed),
    and gives eager attention's tokens; the cached latent prefix stays as it was."""
    model = tiny_model(q_lora_rank=32)
    eager_model = copy.deepcopy(model)
    patch_model(model, block_size=4)
    ids, mask = left_padded([4, 6], seed=7)
    user2 = torch.randint(3, 128, (2, 3), generator=torch.Generator().manual_seed(8))

    def chat(m):
        with torch.no_grad():
            first = m.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True, do_sample=False,
                               max_new_tokens=5, min_new_tokens=5)
            prefix = None
            if latent_cache(first.past_key_values) is not None:
                lc = latent_cache(first.past_key_values)
                prefix = [lc.read(0, s)[0].clone() for s in lc.seq_ids]
            turn2 = torch.cat([first.sequences, user2], dim=1)
            mask2 = torch.cat([mask, torch.ones(2, turn2.shape[1] - mask.shape[1], dtype=torch.long)], dim=1)
            second = m.generate(input_ids=turn2, attention_mask=mask2, past_key_values=first.past_key_values,
                                return_dict_in_generate=True, do_sample=False, max_new_tokens=5, min_new_tokens=5)
        return first.sequences, second, prefix

    eager_first, eager_second, _ = chat(eager_model)
    first, second, prefix = chat(model)
    assert torch.equal(first, eager_first)
    assert torch.equal(second.sequences, eager_second.sequences)
    lc = latent_cache(second.past_key_values)
    assert [lc.seqlen(s) for s in lc.seq_ids] == [4 + 5 + 3 + 4, 6 + 5 + 3 + 4]
    for seq, before in zip(lc.seq_ids, prefix):
        assert torch.equal(lc.read(0, seq)[0][:before.shape[0]], before)


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_a_mask_hiding_cached_tokens_is_refused(cache_kind):
    """The kernels attend to every token a row has cached, so a later mask that hides one of them (a row generate
    padded after its EOS in turn 1, with mask 1, then masked in turn 2: stock transformers hides them, the patched
    model attended to them and gave other tokens) is refused: a ValueError naming the row in a prompt step, before
    anything is stored; a device assertion in a decode step (at once on the CPU). A mask that keeps them visible
    still matches transformers."""
    model = tiny_model(q_lora_rank=32)
    eager_model = copy.deepcopy(model)
    patch_model(model, block_size=4)
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 6, dtype=torch.long)
    hiding = torch.ones(2, 8, dtype=torch.long)
    hiding[1, 3] = 0  # row 1's cached token 3, hidden from now on

    def cache():
        return DynamicCache(config=model.config) if cache_kind == "dynamic" else \
            integration.static_latent_cache(model, 2, 16, block_size=4)

    with torch.no_grad():
        kv = cache()
        model(input_ids=ids, attention_mask=mask, past_key_values=kv)
        with pytest.raises(ValueError, match="row 1: .* sees 5 earlier keys, but the row has 6 cached tokens.*cannot hide a cached token"):
            model(input_ids=ids[:, :2], attention_mask=hiding, past_key_values=kv)
        assert kv.get_seq_length() == 6  # nothing counted (or stored)
        # a decode step reads nothing back: a device assertion (at once on the CPU), before anything is reserved
        with pytest.raises(RuntimeError, match="sees other earlier keys than the tokens its row has cached"):
            model(input_ids=ids[:, :1], attention_mask=hiding[:, :7], past_key_values=kv)
        assert kv.get_seq_length() == 6  # nothing counted, reserved or stored
        if cache_kind == "dynamic":
            assert [latent_cache(kv).seqlen(s) for s in latent_cache(kv).seq_ids] == [6, 6]
        # the same continuation with the token kept visible: transformers' logits
        kv, eager_kv = cache(), DynamicCache(config=eager_model.config)
        for m, c in ((model, kv), (eager_model, eager_kv)):
            m(input_ids=ids, attention_mask=mask, past_key_values=c)
        got = model(input_ids=ids[:, :2], attention_mask=torch.ones(2, 8, dtype=torch.long), past_key_values=kv)
        expected = eager_model(input_ids=ids[:, :2], attention_mask=torch.ones(2, 8, dtype=torch.long),
                               past_key_values=eager_kv)
    assert err_ratio(got.logits, expected.logits) < 1e-4


def test_a_left_padded_prompt_fed_one_token_at_a_time():
    """generate(prefill_chunk_size=1): every prompt chunk is one token, some of them pads. A one-token step was taken
    for a decode step and its pads refused (a device assertion on a GPU); a row without a real token yet now takes
    the prompt step's path. Tokens equal stock transformers', and the cache holds the real tokens only."""
    model = tiny_model()
    eager_model = copy.deepcopy(model)
    patch_model(model, block_size=4)
    ids, mask = left_padded([5, 9, 2, 1])
    kw = dict(input_ids=ids, attention_mask=mask, prefill_chunk_size=1, return_dict_in_generate=True, **GREEDY)
    with torch.no_grad():
        expected = eager_model.generate(**kw).sequences
        out = model.generate(**kw)
    assert torch.equal(out.sequences, expected)
    lc = latent_cache(out.past_key_values)
    assert [lc.seqlen(s) for s in lc.seq_ids] == [n + GREEDY["max_new_tokens"] - 1 for n in (5, 9, 2, 1)]


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_patch_model_split_tokens_reaches_every_layer(cache_kind, monkeypatch):
    """``patch_model(split_tokens=n)`` sets ``n`` on every patched layer, every attention call of a generation (prompt
    and decode steps, the paged and the static latent cache) gets it, and the greedy tokens stay transformers'."""
    from mla_kernels import module, prefill
    from mla_kernels.integrations.transformers import static_latent_cache

    model = tiny_model()
    ids, mask = left_padded([5, 9, 2])
    seen = []
    for mod, name in ((module, "mla_decode"), (integration, "mla_decode"), (prefill, "mla_prefill_attention"),
                      (integration, "mla_prefill_attention")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, **kw: seen.append(kw.get("split_tokens")) or _real(*a, **kw))
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
        patch_model(model, block_size=4, split_tokens=32)
        assert {m.split_tokens for m in model.modules() if isinstance(m, TransformersMLAttention)} == {32}
        kw = {} if cache_kind == "dynamic" else dict(past_key_values=static_latent_cache(model, 3, 32, block_size=4))
        out = model.generate(input_ids=ids, attention_mask=mask, **GREEDY, **kw)
    assert torch.equal(out, expected)
    assert len(seen) >= 2 * GREEDY["max_new_tokens"] and set(seen) == {32}, seen
    with pytest.raises(ValueError, match="split_tokens"):
        patch_model(tiny_model(), split_tokens=0)


def test_split_tokens_past_the_grid_is_refused_before_the_static_cache_changes():
    """The static latent cache's rows hold max_cache_len keys: a split_tokens that would cut them into more than
    65535 splits is refused by name before the step counts or stores anything."""
    from mla_kernels.integrations.transformers import static_latent_cache

    model = patch_model(tiny_model(), split_tokens=1)
    cache = static_latent_cache(model, 1, 65540, block_size=64)
    state = cache._mla_latent_state
    before = [state.paged.buffer(i).clone() for i in range(state.paged.num_layers)], [s.clone() for s in state.seqlens]
    ids = torch.randint(3, 128, (1, 4))
    with torch.no_grad(), pytest.raises(ValueError, match=r"split_tokens=1 cuts the static latent cache's rows"):
        model(ids, past_key_values=cache, use_cache=True)
    assert all(torch.equal(state.paged.buffer(i), b) for i, b in enumerate(before[0]))
    assert all(torch.equal(s, b) for s, b in zip(state.seqlens, before[1])) and cache.get_seq_length() == 0


def test_split_tokens_past_the_grid_is_refused_before_the_dynamic_cache_changes(monkeypatch):
    """The same bound over a DynamicCache, where it depends on the step's longest row: refused by name before the step
    is reserved or counted (it was refused by attend after both: the Cache then refused every later call as
    interrupted, or, when the last layer refused, went on silently over that layer's unwritten slots). A grid of 4
    splits stands in for 65535, which would take a prompt of 65536 tokens."""
    from mla_kernels import decode

    monkeypatch.setattr(_utils, "interpreting", lambda: False)  # wiring only: the PyTorch path is enough
    monkeypatch.setattr(decode, "MAX_GRID_SPLITS", 4)
    model = patch_model(tiny_model(), block_size=4)
    layers = [m for m in model.modules() if isinstance(m, TransformersMLAttention)]
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids, past_key_values=DynamicCache(config=model.config)).logits
        kv = DynamicCache(config=model.config)
        model(ids[:, :3], past_key_values=kv)
        lc = latent_cache(kv)
        before = [lc.buffer(i).clone() for i in range(lc.num_layers)], lc.seqlen(lc.seq_ids[0])
        for layer in layers:
            layer.split_tokens = 1
        with pytest.raises(ValueError, match=r"split_tokens=1 cuts the step's longest sequence \(6 keys\)"):
            model(ids[:, 3:], past_key_values=kv)
        assert kv.get_seq_length() == 3 and latent_cache(kv).seqlen(lc.seq_ids[0]) == before[1]
        assert all(torch.equal(lc.buffer(i), b) for i, b in enumerate(before[0]))
        for layer in layers:
            layer.split_tokens = None
        got = model(ids[:, 3:], past_key_values=kv).logits  # the same Cache goes on as if never refused
        torch.testing.assert_close(got, expected[:, 3:], rtol=1e-5, atol=1e-5)
        # refused by the last layer alone, after the first stored the step: the Cache's next call names the
        # interruption (it attended to the last layer's unwritten slots)
        kv = DynamicCache(config=model.config)
        model(ids[:, :3], past_key_values=kv)
        layers[-1].split_tokens = 1
        with pytest.raises(ValueError, match="split_tokens=1 cuts the step's longest sequence"):
            model(ids[:, 3:], past_key_values=kv)
        layers[-1].split_tokens = None
        lengths = latent_cache(kv).seqlen(latent_cache(kv).seq_ids[0])
        for _ in range(2):  # refused before anything is reserved
            with pytest.raises(RuntimeError, match="refused its step .*: a forward pass was interrupted"):
                model(ids[:, 3:], past_key_values=kv)
            assert latent_cache(kv).seqlen(latent_cache(kv).seq_ids[0]) == lengths


@pytest.mark.parametrize("where", ["first", "last"])
def test_a_layer_failing_after_its_step_was_reserved_ends_the_dynamic_cache(monkeypatch, where):
    """Anything a layer raises once its step is reserved and counted (DeepSeek-V3.2's indexer, the kernels, an
    interrupt) leaves that layer's slots unwritten. When the last layer failed, every layer had counted the step
    alike, and the Cache's next call attended to those slots without a word; now every later call is refused."""
    monkeypatch.setattr(_utils, "interpreting", lambda: False)  # wiring only: the PyTorch path is enough
    model = patch_model(tiny_model(), block_size=4)
    layers = [m for m in model.modules() if isinstance(m, TransformersMLAttention)]
    failing = layers[0 if where == "first" else -1]
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    attend = TransformersMLAttention.attend

    def fail_once(self, *args, **kwargs):
        if self is failing:
            monkeypatch.setattr(TransformersMLAttention, "attend", attend)
            raise KeyboardInterrupt
        return attend(self, *args, **kwargs)

    with torch.no_grad():
        kv = DynamicCache(config=model.config)
        model(ids[:, :3], past_key_values=kv)
        monkeypatch.setattr(TransformersMLAttention, "attend", fail_once)
        with pytest.raises(KeyboardInterrupt):
            model(ids[:, 3:5], past_key_values=kv)
        for _ in range(2):  # refused every time, by name
            with pytest.raises(RuntimeError, match=f"layer {failing.layer_idx} raised KeyboardInterrupt during its "
                                                   "step: a forward pass was interrupted"):
                model(ids[:, 5:], past_key_values=kv)


def test_an_attention_lacking_a_projection_of_its_query_path_is_refused_by_patch_model():
    """A layer with q_a_proj and q_b_proj but no q_a_layernorm, or a q_b_proj with no q_a_proj (read as a q_proj
    query, the module deciding), is refused when patched, naming the layer and the module, before any swap: the
    stand-in would have failed at its first call (A.X-K2's missing q_b_proj is the one absence its q_gate_proj
    stands for)."""
    for missing, named in (("q_a_layernorm", "q_a_layernorm"), ("q_a_proj", "q_proj")):
        model = tiny_model(q_lora_rank=32)
        del model.model.layers[1].self_attn._modules[missing]
        with pytest.raises(TypeError, match=f"layer 1's DeepseekV3Attention lacks {named}"):
            patch_model(model)
        assert all(type(layer.self_attn) is DeepseekV3Attention for layer in model.model.layers)


@pytest.mark.parametrize("no_rope_layers", [(0, 1, 0, 1), (0, 0, 0, 0)], ids=["first-no-rope", "no-rope-at-all"])
def test_mistral_large4_keeps_rope_and_no_rope_layers_in_one_cache(no_rope_layers, monkeypatch):
    """Mistral Large 4's no-rope layers (P = 0, a nope head of nope + rope) keep their latent in the cache of its
    rope layers, whose rope width it takes, whichever layer makes it (layer 0 without rope here, the cache made at
    its first step); a model without rope anywhere keeps a cache of rope width 0. Greedy tokens (fp32, left-padded)
    are transformers' own."""
    model = mistral_large4_model(no_rope_layers)
    out = greedy_against_stock(model, monkeypatch)
    attns = [layer.self_attn for layer in integration._decoder_layers(model)[2]]
    assert [a.qk_rope_head_dim for a in attns] == [16 * r for r in no_rope_layers]
    assert [a.qk_nope_head_dim for a in attns] == [32 - 16 * r for r in no_rope_layers]
    assert latent_cache(out.past_key_values).rope_dim == 16 * max(no_rope_layers)


def test_mistral_large4_query_scaling_runs_once_per_layer_as_in_transformers():
    """The patched layer calls the model's ``softmax_scaling`` once, on the whole query (nope and rope parts), as
    transformers does: a hook on it (calibration, quantisation) sees what it sees unpatched, one call per layer."""
    model = mistral_large4_model()
    seen = []
    for layer in integration._decoder_layers(model)[2]:
        layer.self_attn.softmax_scaling.register_forward_hook(lambda m, args, out: seen.append(out.shape[-1]))
    ids, mask = left_padded([5, 9, 2])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        stock, seen[:] = list(seen), []
        patch_model(model)
        model(input_ids=ids, attention_mask=mask)
    assert seen == stock == [32] * 4  # D_nope + P: 16 + 16 on rope layers, 32 + 0 on the no-rope ones


SHARED_LATENTS = {  # (no_rope_layers, kv_source_layers, indexer_types): each kind of layer over another's latent
    "rope-reuse-and-reuse-with-indexer": ((1, 1, 0, 0), [0, 0, 2, 2], ("full", "full", "full", "shared")),
    "no-rope-one-source-for-two": ((0, 0, 0, 0), [0, 0, 0, 3], ("full", "shared", "full", "shared")),
}


@pytest.mark.parametrize("case", list(SHARED_LATENTS))
def test_mistral_large4_layers_over_another_layers_latent(case, monkeypatch):
    """Mistral Large 4's latents shared across layers (``config.kv_source_layers``): a layer whose source is an
    earlier layer has no latent projection, stores nothing and attends over the source's latent (transformers marks
    it "reuse", or "reuse_but_indexer" when it keeps an indexer of its own; its Cache holds a DummyLayer or an
    indexer-only layer there). The latent cache holds the sources' layers only. fp32 logits (widened attention)
    within 1e-4 of stock, with a Cache and without one (the pass keeps a source's latent for the layers over it),
    and greedy tokens equal. Attending over another source instead moves the logits by ~0.7."""
    no_rope, sources, indexers = SHARED_LATENTS[case]
    model = mistral_large4_model(no_rope, indexers, kv_source_layers=sources)
    widen_attention(model)
    ids, mask = left_padded([5, 9, 2])
    real = mask.bool()
    greedy = dict(GREEDY, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, **greedy)
        expected_forward = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[real]
        monkeypatch.setattr(integration, "INITIAL_HEADROOM_TOKENS", 0)
        patch_model(model, block_size=4)
        got = model.generate(input_ids=ids, attention_mask=mask, **greedy)
        forward = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[real]
    assert torch.equal(got.sequences, expected.sequences)
    assert max(err_ratio(g, e) for g, e in zip(got.logits, expected.logits)) < 1e-4
    assert err_ratio(forward, expected_forward) < 1e-4
    attns = [layer.self_attn for layer in integration._decoder_layers(model)[2]]
    assert [a.latent_source for a in attns] == [None if s == i else s for i, s in enumerate(sources)]
    assert all("kv_a_proj_with_mqa" not in a._modules for a in attns if a.latent_source is not None)
    assert latent_cache(got.past_key_values).num_layers == len(set(sources))


GLM53_CASES = {  # (index_kpool, index_topk, tail)
    "pools-of-2-with-tail": (2, 4, True),
    "pools-of-4-with-tail": (4, 8, True),
    "pools-of-3-no-tail": (3, 6, False),  # (a query before its first whole pool sees no key: zeros, as sdpa gives)
}


def glm53_turns(model, cache, ids, mask, ids2, mask2) -> list[torch.Tensor]:
    """Two turns through ``cache`` (the second left-padded: pads between the turns' tokens, pools split) and one
    decode step: the real tokens' logits of each."""
    kw = cache_kw(model, cache)  # (5.17's model takes past_key_values: a cache= would reach its layers aside)
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask, **kw).logits
        both = torch.cat([mask, mask2], 1)
        second = model(input_ids=ids2, attention_mask=both, **kw).logits
        step = model(input_ids=second[:, -1:].argmax(-1), **kw,
                     attention_mask=torch.cat([both, torch.ones_like(both[:, :1])], 1)).logits
    return [first[mask.bool()], second[mask2.bool()], step[:, -1]]


@pytest.mark.parametrize("case", list(GLM53_CASES))
def test_glm53_flash_pooled_sparse_attention_over_turns_with_pads(case, monkeypatch):
    """GLM-5.3-Flash's sparse attention picks pools of keys and the tail of the query's own pool, as positions
    among every position transformers counts (pads included), so its latent cache keeps pads too (never picked).
    Over two turns whose second is left-padded (pads between the turns: a tail then lies inside a picked pool, a key
    picked twice, which transformers' mask counts once) and a decode step, with widened attention, the fp32 logits
    are within 1e-4 of stock (the tolerance of ``test_forward_matches_transformers_where_attention_decides``);
    without a Cache too. Counting a repeated pick twice moves the decode step's logits by ~0.1."""
    kpool, topk, tail = GLM53_CASES[case]
    model = glm53_model(index_kpool=kpool, index_topk=topk, tail=tail)
    widen_attention(model)
    stock = copy.deepcopy(model)
    ids, mask = left_padded([5, 9, 2])
    ids2, mask2 = left_padded([3, 1, 6], seed=5)
    text_config = model.config.text_config
    expected = glm53_turns(stock, transformers.DynamicCache(config=text_config), ids, mask, ids2, mask2)
    monkeypatch.setattr(integration, "INITIAL_HEADROOM_TOKENS", 0)
    patch_model(model, block_size=4)
    repeats = []
    pooled = integration._pooled_positions

    def counting(*args):
        picks, positions = pooled(*args)
        repeats.append(int((positions < 0).sum() - (picks < 0).sum()))
        return picks, positions

    monkeypatch.setattr(integration, "_pooled_positions", counting)
    cache = transformers.DynamicCache(config=text_config)
    got = glm53_turns(model, cache, ids, mask, ids2, mask2)
    for g, e in zip(got, expected):
        assert err_ratio(g, e) < 1e-4, err_ratio(g, e)
    if tail:
        assert sum(repeats) > 0  # (what the case is for: the step's picks repeat keys, counted once)
    lc = latent_cache(cache)
    assert [lc.seqlen(s) for s in lc.seq_ids] == [9 + 6 + 1] * 3  # every position, pads included
    assert lc.num_layers == 3  # the MLA layers only
    with torch.no_grad():
        forward = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[mask.bool()]
        expected_forward = stock(input_ids=ids, attention_mask=mask, use_cache=False).logits[mask.bool()]
    assert err_ratio(forward, expected_forward) < 1e-4


def test_glm53_flash_beam_search_and_what_it_refuses():
    """GLM-5.3-Flash patched: beam search gives stock tokens (its linear layers' states and the latent rows follow
    the beams); each attention returns its picks where stock's does, only for a "shared" next layer (a forward hook
    sees the same outputs, and a shared layer after a shared one gets none, refused as stock refuses it: it ran
    silently on the picks handed on twice); a static latent cache is refused by name (it would not hold the linear
    layers' state nor the indexer's keys); a shared layer called alone without picks is refused."""
    model = glm53_model()
    stock = copy.deepcopy(model)
    patch_model(model, block_size=4)
    ids, mask = left_padded([5, 9, 2])
    beam = dict(num_beams=3, num_return_sequences=2, do_sample=False, max_new_tokens=6, min_new_tokens=6)
    with torch.no_grad():
        assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **beam),
                           stock.generate(input_ids=ids, attention_mask=mask, **beam))
    handed = {}
    for name, m in (("stock", stock), ("patched", model)):
        handed[name] = []
        for layer in m.model.language_model.layers:
            layer.self_attn.register_forward_hook(lambda mod, args, out, seen=handed[name]: seen.append(
                None if not isinstance(out, tuple) or len(out) < 3 else out[2] is not None))
        with torch.no_grad():
            m(input_ids=ids, attention_mask=mask)
    assert handed["patched"] == handed["stock"] == [None, True, False, None, False]
    twice = glm53_model(layer_types=("indexed_attention",) * 3, indexer_types=("full", "shared", "shared"))
    stock_twice = copy.deepcopy(twice)
    patch_model(twice, block_size=4)
    with torch.no_grad():
        with pytest.raises(ValueError, match="Shared DSA layers require top-k indices"):
            stock_twice(input_ids=ids, attention_mask=mask)
        with pytest.raises(ValueError, match="may not put a shared layer after a shared or linear-attention one"):
            twice(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="static_latent_cache does not serve glm5_next_text"):
        integration.static_latent_cache(model, 3, 32)
    shared = model.model.language_model.layers[2].self_attn
    assert shared.shared_topk and shared.local_mask and shared.qk_rope_head_dim == 0
    with torch.no_grad(), pytest.raises(ValueError, match="prev_topk_indices is required"):
        shared(torch.zeros(1, 2, 64), None, torch.ones(1, 2, dtype=torch.bool))


def glm53_wide_latent() -> torch.nn.Module:
    """``glm53_model`` with a latent of 128 (one FP8 scale group)."""
    model = glm53_model()
    config_cls, model_cls = _transformers_class("Glm5NextConfig", "Glm5NextForConditionalGeneration")
    config = copy.deepcopy(model.config)
    config.text_config.kv_lora_rank = 128
    torch.manual_seed(0)
    return model_cls(config).eval()


@pytest.mark.parametrize("make", [lambda: tiny_model(kv_lora_rank=128), glm53_wide_latent,
                                  lambda: dots3_model(kv_lora_rank=128, swa_kv_lora_rank=256)],
                         ids=["v3", "glm5.3-flash", "dots3-two-widths"])
def test_the_fp8_cache_is_stock_attention_over_its_latent_quantized(make, monkeypatch):
    """``patch_model(cache_dtype=float8_e4m3fn)``: the patched model's greedy run (left-padded prompts, then decode
    steps) is stock transformers' with each layer's latent (``kv_a_layernorm``'s output) quantized to DeepSeek's FP8
    layout and back (``reference.quant``): same tokens, fp32 logits within 1e-4 (both compute in fp32 from the same
    e4m3 values; 2e-7 to 3e-7 measured), where the quantization itself moves them by 3e-2 (V3) to 8e-2 (GLM-5.3).
    The same values: the two latents differ by fp32 rounding (the norm's kernel against torch's), so a value on an
    e4m3 rounding boundary could round the other way; none does at these seeds (a review with the norm weights
    randomised met one: 3e-4), which is what the bound asserts, deterministically on the CPU."""
    from mla_kernels.reference.quant import dequantize_fp8, quantize_fp8
    model = make()
    stock = copy.deepcopy(model)
    for module in stock.modules():
        if type(module).__name__.endswith("Attention") and "kv_a_layernorm" in module._modules:
            module.kv_a_layernorm.register_forward_hook(lambda m, args, out: dequantize_fp8(*quantize_fp8(out),
                                                                                            out.dtype))
    ids, mask = left_padded([5, 9, 2])
    greedy = dict(GREEDY, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        expected = stock.generate(input_ids=ids, attention_mask=mask, **greedy)
        plain = model.generate(input_ids=ids, attention_mask=mask, **greedy)
        monkeypatch.setattr(integration, "INITIAL_HEADROOM_TOKENS", 0)
        patch_model(model, block_size=4, cache_dtype=torch.float8_e4m3fn)
        got = model.generate(input_ids=ids, attention_mask=mask, **greedy)
    assert latent_cache(got.past_key_values).dtype == torch.float8_e4m3fn
    assert torch.equal(got.sequences, expected.sequences)
    assert max(err_ratio(g, e) for g, e in zip(got.logits, expected.logits)) < 1e-4
    assert err_ratio(expected.logits[0], plain.logits[0]) > 1e-2  # (the quantization is what is compared)


DOTS3_CASES = {  # (attention implementation, dots3_model's arguments)
    "window4-eager": ("eager", dict(sliding_window=4)),
    "window8-sdpa": ("sdpa", dict(sliding_window=8)),
    # the sliding layers' rope part wider than the others' (their heads 32 wide: 16 nope, 32 rope)
    "sliding-rope-wider": ("eager", dict(swa_head_dim=48, swa_qk_rope_head_dim=32)),
    "sliding-latent-narrower": ("sdpa", dict(kv_lora_rank=64, swa_kv_lora_rank=32)),
}


@pytest.mark.parametrize("case", list(DOTS3_CASES))
def test_dots3_sliding_windows_and_two_latent_widths_over_turns_with_pads(case, monkeypatch):
    """dots.llm3: its sliding-window layers attend over the keys their mask rows show, as key lists of latent
    positions (the pads among a window are the positions its row hides, so pads between turns shift nothing), and its
    layers' two widths share one cache of the wider latent and rope part, a narrower layer in its first columns. Over
    two turns, the second left-padded, and a decode step, with widened attention: fp32 logits within 1e-4 of stock
    (4e-7 to 7e-7 measured), without a Cache too; the cache holds real tokens only. Mutants: the whole past instead
    of the window, 0.14 to 1.0 off; the rope key not normed, 0.23 to 0.75 off. (A wider rope part in the sliding
    layers was accepted by patch_model and refused at the first step: found by review.)"""
    impl, kw = DOTS3_CASES[case]
    window = kw.get("sliding_window", 4)
    model = dots3_model(**kw)
    model.config._attn_implementation = impl
    widen_attention(model)
    with torch.no_grad():  # (widen_attention leaves norm weights at 1: the rope key's norm weight counts here)
        for i, layer in enumerate(model.model.layers):
            weight = layer.self_attn.k_rope_only_layernorm.weight
            weight.copy_(torch.rand(weight.shape, generator=torch.Generator().manual_seed(i)) + 0.5)
    stock = copy.deepcopy(model)
    ids, mask = left_padded([5, 9, 2])
    ids2, mask2 = left_padded([3, 1, 6], seed=5)
    expected = glm53_turns(stock, transformers.DynamicCache(config=stock.config), ids, mask, ids2, mask2)
    monkeypatch.setattr(integration, "INITIAL_HEADROOM_TOKENS", 0)
    patch_model(model, block_size=4)
    attns = [layer.self_attn for layer in model.model.layers]
    assert [(a.sliding_window, a.num_heads) for a in attns] == [(None, 4), (window, 2)] * 2
    latent = max(a.kv_lora_rank for a in attns)
    rope = max(a.qk_rope_head_dim for a in attns)
    assert all((a.cache_latent, a.cache_rope) == (latent, rope) for a in attns)
    assert {(a.kv_lora_rank, a.qk_rope_head_dim) for a in attns} != {(latent, rope)}  # (two widths, or the case's
    # point is lost)
    cache = transformers.DynamicCache(config=model.config)
    got = glm53_turns(model, cache, ids, mask, ids2, mask2)
    for g, e in zip(got, expected):
        assert err_ratio(g, e) < 1e-4, err_ratio(g, e)
    lc = latent_cache(cache)
    assert (lc.kv_lora_rank, lc.rope_dim) == (latent, rope)
    assert [lc.seqlen(r) for r in lc.seq_ids] == [5 + 3 + 1, 9 + 1 + 1, 2 + 6 + 1]
    with torch.no_grad():
        forward = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[mask.bool()]
        expected_forward = stock(input_ids=ids, attention_mask=mask, use_cache=False).logits[mask.bool()]
    assert err_ratio(forward, expected_forward) < 1e-4


def test_dots3_multimodal_model_patches_its_text_decoder(monkeypatch):
    """dots.llm3's multimodal class (``Dots3NoteForConditionalGeneration``: vision and audio towers around the same
    text decoder, at ``model.language_model``) is patched through its text decoder: greedy tokens of a left-padded
    batch equal stock's, and the latent cache holds the real tokens only."""
    config_cls, model_cls = _transformers_class("Dots3NoteConfig", "Dots3NoteForConditionalGeneration")
    text = dots3_model().config
    # (the vision config's per-layer entries name layers up to 41: a tower of fewer layers is refused by its config)
    vision = dict(hidden_size=32, adapter_in_dim=32, adapter_out_dim=text.hidden_size, num_attention_heads=2,
                  num_hidden_layers=42, intermediate_size=32)
    audio = dict(hidden_size=32, adapter_input_size=32, adapter_out_dim=text.hidden_size, num_attention_heads=2)
    torch.manual_seed(0)
    model = model_cls(config_cls(text_config=text, vision_config=vision, audio_config=audio)).eval()
    model.config.text_config._attn_implementation = "eager"
    widen_attention(model)
    stock = copy.deepcopy(model)
    ids, mask = left_padded([5, 9, 2])
    monkeypatch.setattr(integration, "INITIAL_HEADROOM_TOKENS", 0)
    patch_model(model, block_size=4)
    assert all(isinstance(layer.self_attn, TransformersMLAttention) for layer in model.model.language_model.layers)
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        expected = stock.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                             **cache_kw(model, cache))
    assert torch.equal(got, expected)
    lc = latent_cache(cache)
    assert [lc.seqlen(r) for r in lc.seq_ids] == [5 + 3, 9 + 3, 2 + 3]  # (the 4th token is never fed back)


def test_dots3_what_the_drop_in_refuses():
    """A model whose first MLA layer slides (its mask cannot show the step's pads, which the step reads from its
    first layer) is refused by ``patch_model`` with the model unchanged; a static latent cache is refused for
    sliding-window layers (also without DSA layers, whose refusal would come first); a sliding layer called alone,
    without a cache, is refused by name (it takes the pads from the pass's first layer)."""
    first_slides = dots3_model(layer_types=("sliding_attention", "indexed_attention"))
    original = first_slides.model.layers[0].self_attn
    with pytest.raises(TypeError, match="layer 0, the first MLA layer, attends over a sliding window"):
        patch_model(first_slides)
    assert first_slides.model.layers[0].self_attn is original
    dense = patch_model(dots3_model(layer_types=("full_attention", "sliding_attention"), use_dsa=False))
    assert dense.model.layers[0].self_attn._modules.get("indexer") is None
    with pytest.raises(ValueError, match="static_latent_cache does not serve sliding-window layers"):
        static_latent_cache(dense, 1, 32)
    integration._no_cache_step[0] = None
    with torch.no_grad(), pytest.raises(ValueError, match="layer 1 attends over a sliding window"):
        dense.model.layers[1].self_attn(torch.zeros(1, 3, 64), dense.model.rotary_emb(
            torch.zeros(1, 3, 64), torch.arange(3)[None], "sliding_attention"), None)


def test_window_positions_without_a_mask_are_the_masks_without_pads():
    """``_window_positions`` without a mask (sdpa hands none where nothing is padded), or with a 2-D padding mask
    showing every key, lists what a sliding mask with no pads shows: each query's ``window`` last positions up to its own, here a prompt of 6 after 4 cached tokens
    (latent positions = transformers' positions, nothing being padded)."""
    from types import SimpleNamespace
    window, cached, q = 3, 4, 6
    kv = cached + q
    key, pos = torch.arange(kv), torch.arange(cached, kv)[:, None]
    sliding = ((key <= pos) & (key > pos - window))[None, None].expand(2, 1, q, kv)  # [B, 1, Q, KV]
    batch = SimpleNamespace(cache_seqlens=torch.tensor([kv, kv]))
    with_mask = integration._window_positions(sliding, batch, None, window, 2, q, kv)
    without = integration._window_positions(None, batch, None, window, 2, q, kv)
    padding = integration._window_positions(torch.ones(2, kv, dtype=torch.long), batch, None, window, 2, q, kv)
    assert torch.equal(with_mask, without) and torch.equal(padding, without)
    assert with_mask[0].tolist() == [[2, 3, 4], [3, 4, 5], [4, 5, 6], [5, 6, 7], [6, 7, 8], [7, 8, 9]]


def test_pooled_positions_count_a_repeated_pick_once():
    """``_pooled_positions`` on a shared layer's picks: sorted, each key once (its repeats and the -1s stay -1)."""
    picks = torch.tensor([[[3, -1, 5, 3, 0], [2, 2, 2, -1, -1]]], dtype=torch.int32)
    same, positions = integration._pooled_positions(None, None, None, None, None, picks)
    assert same is picks
    assert positions.tolist() == [[[-1, 0, 3, -1, 5], [-1, -1, 2, -1, -1]]]


def test_mistral_large4_latents_shared_across_rope_kinds_are_refused():
    """A no-rope layer whose ``kv_source_layers`` entry is a rope layer (transformers' own attention fails on it: it
    hands a layer the last latent of its kind) is refused by name before any module is swapped; so is a source
    other than the one transformers' attention hands the layer."""
    model = mistral_large4_model((1, 0, 1, 0), kv_source_layers=[0, 0, 2, 2])
    layers = integration._decoder_layers(model)[2]
    originals = [layer.self_attn for layer in layers]
    with pytest.raises(TypeError, match=r"layer 1 \(rope width 0\) attends over layer 0's latent \(rope width 16\)"):
        patch_model(model)
    assert [layer.self_attn for layer in layers] == originals
    # layers 0 and 1 store, 2 reads 1's, 3 names 0's where transformers hands it 1's (the last stored): refused
    model = mistral_large4_model((1, 1, 1, 1), kv_source_layers=[0, 1, 1, 0])
    with pytest.raises(TypeError, match=r"layer 3 attends over layer 0's latent .* hands it layer 1's"):
        patch_model(model)


@pytest.mark.parametrize("make", [lambda: tiny_model(q_lora_rank=32), axk2_model, glm5_model, hy4_model,
                                  mistral_large4_model, glm53_model, dots3_model],
                         ids=["v3", "axk2-no-q_b_proj", "glm5-shared-no-indexer", "hy4-sinks", "mistral-large4",
                              "glm5.3-flash-hybrid", "dots3-rope-key-norm"])
def test_patch_shares_parameters_and_unpatch_restores(make):
    """The patched model's state dict is the original's, key for key and tensor for tensor (A.X-K2's attention has
    no q_b_proj, GLM-5's shared layers no indexer: the stand-ins have none either; Hy4's attention has a parameter
    of its own, its sinks, listed first; Mistral Large 4's a child of its own after the projections, its
    softmax_scaling; GLM-5.3-Flash's linear-attention layers stay as they were)."""
    model = make()
    before = model.state_dict()
    pointers = {k: v.data_ptr() for k, v in before.items()}
    _, model_type, layers = integration._decoder_layers(model)
    originals = [layer.self_attn for layer in layers]
    other = integration._OTHER_ATTENTION.get(model_type, ())
    assert patch_model(model) is model
    assert [isinstance(layer.self_attn, TransformersMLAttention) for layer in layers] == \
        [type(original).__name__ not in other for original in originals]
    assert any(isinstance(layer.self_attn, TransformersMLAttention) for layer in layers)
    after = model.state_dict()
    assert list(after) == list(before)
    assert {k: v.data_ptr() for k, v in after.items()} == pointers
    assert unpatch_model(model) is model
    assert [layer.self_attn for layer in layers] == originals
    assert mla_kernels.patch_model is patch_model and mla_kernels.unpatch_model is unpatch_model


def test_patch_model_norms_swaps_the_models_rmsnorms(monkeypatch):
    """``norms=True``: every decoder layer's input and post-attention RMSNorm and the final norm become a
    ``KernelRMSNorm`` holding the same weight Parameter (the state dict keeps its keys and tensors); the attention's
    own norms stay (``rms_norm`` serves them), as does a norm with a hook of its own. Greedy tokens are transformers'
    (fp32), every norm call of a forward pass is one kernel launch, and ``unpatch_model`` gives back the original
    modules. The default swaps none."""
    model = tiny_model(q_lora_rank=32)
    ids, mask = left_padded([5, 9, 2])
    hooked = model.model.layers[1].post_attention_layernorm
    hooked.register_forward_hook(lambda module, args, out: None)
    norms = {name: m for name, m in model.named_modules()
             if name == "model.norm" or (name.endswith("_layernorm") and ".self_attn." not in name)}
    assert len(norms) == 2 * len(model.model.layers) + 1
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    launches = []
    launch = norm_mod._launcher.launch
    monkeypatch.setattr(norm_mod._launcher, "launch",
                        lambda kernel, *a, **k: (launches.append(kernel), launch(kernel, *a, **k))[1])
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
        patch_model(model)
        assert not any(isinstance(m, KernelRMSNorm) for m in model.modules())
        unpatch_model(model)
        patch_model(model, norms=True)
        swapped = {name: m for name, m in model.named_modules() if isinstance(m, KernelRMSNorm)}
        assert set(swapped) == set(norms) - {"model.layers.1.post_attention_layernorm"}
        assert all(m.weight is norms[name].weight for name, m in swapped.items())
        assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before
        launches.clear()
        model(input_ids=ids, attention_mask=mask)
        # the attention's query norm a layer (its latent norm is norm_and_rope's launch, with the ropes), the swapped
        # ones, the final norm
        assert launches.count(norm_mod._rms_norm_kernel) == len(model.model.layers) + len(swapped)
        assert launches.count(norm_rope_mod._norm_rope_kernel) == len(model.model.layers)
        got = model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    assert torch.equal(got, expected), f"\n{got[:, ids.shape[1]:]}\n{expected[:, ids.shape[1]:]}"
    assert unpatch_model(model) is model
    assert all(model.get_submodule(name) is m for name, m in norms.items())
    assert not any(isinstance(m, (KernelRMSNorm, TransformersMLAttention)) for m in model.modules())
    with pytest.raises(TypeError, match="norms must be a bool"):
        patch_model(model, norms="yes")
    assert not any(isinstance(m, (KernelRMSNorm, TransformersMLAttention)) for m in model.modules())


def to_bf16_with_new_parameters(model) -> None:
    """``model.to(torch.bfloat16)`` with torch told to make new Parameter objects on conversion (not to convert the
    old ones in place): a module holding another's Parameter then holds a Parameter of its own."""
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model.to(torch.bfloat16)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)


def test_unpatch_keeps_a_norm_weight_converted_while_patched():
    """A patched model cast to another dtype (``model.to``) converts the weight Parameters the stand-ins hold, as new
    Parameter objects where torch is told to overwrite them on conversion: the restored norms hold those."""
    model = patch_model(tiny_model(q_lora_rank=32), norms=True)
    weights = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, KernelRMSNorm)}
    to_bf16_with_new_parameters(model)
    unpatch_model(model)
    for name, w in weights.items():
        restored = model.get_submodule(name)
        assert not isinstance(restored, KernelRMSNorm) and restored.weight.dtype == torch.bfloat16
        assert torch.equal(restored.weight, w.to(torch.bfloat16))


def _norm_weights(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "norm" in name}


@pytest.mark.parametrize("call", ["post_init", "init_weights"])
def test_swapped_norms_keep_transformers_initialized_mark(call):
    """transformers marks each module it initialized (``_is_hf_initialized``) and skips it in later ``post_init`` /
    ``init_weights`` calls: the stand-ins carry the mark (the norms' weights, shared with the originals, were reset
    to ones through them, and stayed so after unpatching)."""
    model = tiny_model(q_lora_rank=32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.5)
    before = _norm_weights(model)
    patch_model(model, norms=True)
    getattr(model, call)()
    unpatch_model(model)
    after = _norm_weights(model)
    assert all(torch.equal(after[name], w) for name, w in before.items()), \
        [name for name, w in before.items() if not torch.equal(after[name], w)]


def test_unpatch_refuses_a_norm_it_cannot_restore_before_restoring_anything():
    """A stand-in whose weight was parametrized while patched can't give a Parameter back: unpatch_model refuses
    with the norm's name before anything is restored (it restored the norms before it and stopped midway, leaving
    attention patched), and succeeds once the parametrization is removed. A KernelRMSNorm the user built (no
    original) stays where it is."""
    from torch.nn.utils import parametrize

    class Doubled(torch.nn.Module):
        def forward(self, w):
            return w * 2

    model = patch_model(tiny_model(q_lora_rank=32), norms=True)
    mine = KernelRMSNorm(model.config.hidden_size)
    model.model.extra_norm = mine
    target = model.model.layers[1].input_layernorm
    parametrize.register_parametrization(target, "weight", Doubled())
    with pytest.raises(ValueError, match="'input_layernorm'.*parametriz.*nothing was restored"):
        unpatch_model(model)
    assert all(isinstance(layer.self_attn, TransformersMLAttention) for layer in model.model.layers)
    assert all(isinstance(m, KernelRMSNorm) for name, m in model.named_modules()
               if name.endswith("_layernorm") and ".self_attn." not in name)
    parametrize.remove_parametrizations(target, "weight", leave_parametrized=True)
    unpatch_model(model)
    assert not any(isinstance(m, TransformersMLAttention) for m in model.modules())
    assert model.model.extra_norm is mine
    assert [name for name, m in model.named_modules() if isinstance(m, KernelRMSNorm)] == ["model.extra_norm"]


def test_a_norm_in_two_places_is_one_stand_in():
    """A norm module used in two places (tied norms) becomes one stand-in in both, and one original again: each
    place's changes reach the other, and the parameters are not counted twice after a conversion that makes new
    Parameter objects."""
    model = tiny_model(q_lora_rank=32)
    shared = model.model.layers[0].input_layernorm
    model.model.layers[1].input_layernorm = shared
    count = len(list(model.parameters()))
    patch_model(model, norms=True)
    first, second = model.model.layers[0].input_layernorm, model.model.layers[1].input_layernorm
    assert isinstance(first, KernelRMSNorm) and first is second
    to_bf16_with_new_parameters(model)
    assert len(list(model.parameters())) == count
    unpatch_model(model)
    assert model.model.layers[0].input_layernorm is shared is model.model.layers[1].input_layernorm
    assert shared.weight.dtype == torch.bfloat16


def test_what_is_attached_to_a_stand_in_stays_with_it():
    """``compile()`` of a stand-in and a forward wrapped on it are bound to the stand-in: the restored original does
    not take them (it would run the stand-in's call)."""
    model = patch_model(tiny_model(q_lora_rank=32), norms=True)
    stand_in = model.model.norm
    original = stand_in.original
    stand_in.compile(backend="eager")
    inner = stand_in.forward
    stand_in.forward = lambda h: inner(h)
    unpatch_model(model)
    assert model.model.norm is original
    assert "forward" not in vars(original) and getattr(original, "_compiled_call_impl", None) is None


def test_a_latent_cache_given_to_the_unpatched_model_is_a_clear_error(monkeypatch):
    """A Cache filled while patched holds no transformers K/V: continuing on it after unpatch_model must say so, not
    fail deep inside transformers' attention on the empty keys its layers return."""
    monkeypatch.setattr(_utils, "interpreting", lambda: False)  # wiring only: the PyTorch path is enough
    model = tiny_model()
    ids, mask = left_padded([5, 3])
    patch_model(model)
    with torch.no_grad():
        cache = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
        static = integration.static_latent_cache(model, 2, 16)
        unpatch_model(model)
        with pytest.raises(ValueError, match="patched model's latent cache"):
            model(input_ids=ids[:, -1:], attention_mask=torch.cat([mask, mask[:, -1:]], 1), past_key_values=cache,
                  use_cache=True)
        with pytest.raises(ValueError, match="patched model's latent cache"):
            model(input_ids=ids, attention_mask=mask, past_key_values=static, use_cache=True)


def test_the_cache_is_taken_under_either_name(monkeypatch):
    """Decoder layers pass the Cache as ``past_key_values`` up to transformers 5.24 and as ``cache`` from 5.25 on: the
    patched attention takes either, the same way, and refuses two different Caches at once."""
    monkeypatch.setattr(_utils, "interpreting", lambda: False)  # wiring only: the PyTorch path is enough
    model = patch_model(tiny_model())
    attn = model.model.layers[0].self_attn
    hidden = torch.randn(2, 3, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    position_embeddings = model.model.rotary_emb(hidden, torch.arange(3)[None].expand(2, 3))
    outs, caches = [], []
    with torch.no_grad():
        for name in ("past_key_values", "cache"):
            caches.append(DynamicCache(config=model.config))
            outs.append(attn(hidden, position_embeddings=position_embeddings, attention_mask=None,
                             **{name: caches[-1]})[0])
        with pytest.raises(ValueError, match="past_key_values and cache"):
            attn(hidden, position_embeddings=position_embeddings, attention_mask=None, past_key_values=caches[0],
                 cache=DynamicCache(config=model.config))
    assert torch.equal(outs[0], outs[1])
    for cache in caches:  # each call stored its 3 tokens per row in its own Cache's latent, and counted them there
        assert [latent_cache(cache).seqlen(s) for s in latent_cache(cache).seq_ids] == [3, 3]
        assert cache.get_seq_length(0) == 3


def test_output_attentions_is_refused(monkeypatch):
    """The kernels never materialise attention weights, and transformers' hooks do not see the patched modules: asked
    for them, a patched model raised nothing and returned an empty tuple. Now it says so before storing anything;
    other outputs (hidden states) are still collected."""
    monkeypatch.setattr(_utils, "interpreting", lambda: False)  # wiring only: the PyTorch path is enough
    model = patch_model(tiny_model())
    ids, mask = left_padded([3, 2])
    with torch.no_grad():
        for call in (lambda: model(input_ids=ids, attention_mask=mask, output_attentions=True),
                     lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2,
                                            output_attentions=True, return_dict_in_generate=True)):
            with pytest.raises(ValueError, match="output_attentions"):
                call()
        out = model.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True,
                             output_hidden_states=True, **GREEDY)
    assert len(out.hidden_states) == GREEDY["max_new_tokens"]


def test_unpatch_gives_back_transformers_output_attentions(monkeypatch):
    """transformers installs its output-capturing hooks once per model, on the first forward that collects outputs:
    done while patched (output_hidden_states, or a refused output_attentions), the restored attention modules had
    none, and the unpatched model's output_attentions=True silently gave an empty tuple. Hooks installed before
    patching are not doubled either."""
    monkeypatch.setattr(_utils, "interpreting", lambda: False)  # wiring only: the PyTorch path is enough
    ids, mask = left_padded([3, 2])
    stock = tiny_model()
    with torch.no_grad():
        expected = stock(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    assert len(expected.attentions) == 2
    for before in (False, True):
        model = tiny_model()
        with torch.no_grad():
            if before:
                model(input_ids=ids, attention_mask=mask, output_attentions=True)
            patch_model(model)
            model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            with pytest.raises(ValueError, match="output_attentions"):
                model(input_ids=ids, attention_mask=mask, output_attentions=True)
            unpatch_model(model)
            out = model(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
        assert len(out.attentions) == len(expected.attentions) and len(out.hidden_states) == len(expected.hidden_states)
        for got, want in zip(out.attentions + out.hidden_states, expected.attentions + expected.hidden_states):
            assert torch.equal(got, want)


def test_unpatch_restores_the_train_eval_mode_set_while_patched():
    """model.eval() while patched reaches the patched modules only; unpatch_model must hand the original attention
    the model's current mode, or its attention dropout stays on in eval (and off in train)."""
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(tiny_config(attention_dropout=0.5))  # as constructed: train mode
    ids = torch.randint(3, 128, (1, 6))
    patch_model(model)
    assert all(layer.self_attn.training for layer in model.model.layers)
    model.eval()
    unpatch_model(model)
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)  # no dropout
    patch_model(model)
    assert not any(layer.self_attn.training for layer in model.model.layers)
    model.train()
    unpatch_model(model)
    assert all(layer.self_attn.training for layer in model.model.layers)


def test_unpatch_keeps_a_projection_replaced_while_patched(monkeypatch):
    """A projection module replaced on the patched attention (a merged adapter, a pruned or re-quantized Linear) is
    the model's from then on: unpatch_model gave the original attention back with the old module, silently (other
    outputs, and a state dict without the change)."""
    monkeypatch.setattr(_utils, "interpreting", lambda: False)  # wiring only: the PyTorch path is enough
    ids, mask = left_padded([5, 3])
    model = patch_model(tiny_model(q_lora_rank=32))
    attn = model.model.layers[0].self_attn
    replaced = {}
    for name in ("o_proj", "q_a_proj"):
        old = getattr(attn, name)
        replaced[name] = torch.nn.Linear(old.in_features, old.out_features, bias=False)
        with torch.no_grad():
            replaced[name].weight.copy_(old.weight * 0.5)
        setattr(attn, name, replaced[name])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        unpatch_model(model)
        got = model(input_ids=ids, attention_mask=mask).logits
    restored = model.model.layers[0].self_attn
    assert isinstance(restored, DeepseekV3Attention)
    assert all(getattr(restored, name) is module for name, module in replaced.items())
    assert (got - expected)[mask.bool()].abs().max() < 1e-5


class _ForeignAttention(torch.nn.Module):
    def forward(self, hidden_states, **kwargs):
        return hidden_states, None


def test_unpatchable_models_raise_before_any_swap():
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=64))
    with pytest.raises(TypeError, match="DeepSeek"):
        patch_model(llama)
    with pytest.raises(TypeError, match="model"):
        patch_model("model")

    model = tiny_model()
    model.model.layers[1].self_attn = _ForeignAttention()
    with pytest.raises(TypeError, match="layer 1"):
        patch_model(model)
    assert type(model.model.layers[0].self_attn) is DeepseekV3Attention

    with pytest.raises(ValueError, match="kv_lora_rank"):
        patch_model(tiny_model(kv_lora_rank=24))
    with pytest.raises(ValueError, match="block_size"):
        patch_model(tiny_model(), block_size=0)
    with pytest.raises(ValueError, match="max_cache_tokens"):
        patch_model(tiny_model(), block_size=16, max_cache_tokens=8)

    model = tiny_model()
    patch_model(model)
    with pytest.raises(ValueError, match="already patched"):
        patch_model(model)

    # weights the kernels cannot read: accelerate's offloading hook (loads kv_b_proj's weight inside its forward
    # only; the patched model crashed on a meta weight deep in a kernel's checks), or a model still on meta
    class _OffloadHook:  # the attribute accelerate's AlignDevicesHook carries
        offload = True

    model = tiny_model()
    model.model.layers[1].self_attn.kv_b_proj._hf_hook = _OffloadHook()
    with pytest.raises(TypeError, match="layer 1's kv_b_proj weight is offloaded"):
        patch_model(model)
    assert type(model.model.layers[0].self_attn) is DeepseekV3Attention
    with torch.device("meta"):
        model = tiny_model()
    with pytest.raises(TypeError, match="layer 0's kv_b_proj weight is offloaded .* or on the meta device"):
        patch_model(model)


def test_longcat_two_attention_modules_per_layer():
    """LongCat-Flash's decoder layers hold two attention modules each (a ModuleList, cache layers 2i and 2i+1): all
    are patched, a static latent cache gets one layer per module and generates eager attention's tokens, and
    unpatch_model puts the same modules back."""
    model = longcat_model()
    eager_model = copy.deepcopy(model)
    originals = [list(layer.self_attn) for layer in model.model.layers]
    patch_model(model, block_size=4)
    patched = [attn for layer in model.model.layers for attn in layer.self_attn]
    assert all(isinstance(a, TransformersMLAttention) for a in patched)
    assert [a.layer_idx for a in patched] == [0, 1, 2, 3] and {a.num_cache_layers for a in patched} == {4}
    ids, mask = left_padded([5, 9, 2])
    with torch.no_grad():
        expected = eager_model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
        cache = integration.static_latent_cache(model, 3, 32, block_size=4)
        out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **GREEDY)
    assert torch.equal(out, expected)
    assert latent_cache(cache).num_layers == 4
    unpatch_model(model)
    assert [list(layer.self_attn) for layer in model.model.layers] == originals


def test_kimi_linear_patches_its_mla_layers_only():
    """Kimi-Linear (MLA in layers 1 and 3, Kimi Delta Attention in 0 and 2): the delta-attention modules and their
    cache layers stay transformers'; the latent cache holds two layers (compacted: none for the linear ones); beam
    search and a multi-turn continuation give stock tokens; a static latent cache is refused (it would not hold the
    linear layers' state); unpatch_model restores the MLA modules."""
    model = kimi_linear_model()
    eager_model = copy.deepcopy(model)
    originals = [layer.self_attn for layer in model.model.layers]
    patch_model(model, block_size=4)
    kinds = [type(layer.self_attn).__name__ for layer in model.model.layers]
    assert kinds == ["KimiLinearDeltaAttention", "TransformersMLAttention"] * 2
    assert [model.model.layers[i].self_attn.latent_layer for i in (1, 3)] == [0, 1]
    ids, mask = left_padded([5, 9, 2])
    beam = dict(num_beams=3, num_return_sequences=2, do_sample=False, max_new_tokens=6, min_new_tokens=6)
    with torch.no_grad():
        expected = eager_model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
        out = model.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True, **GREEDY)
        assert torch.equal(out.sequences, expected)
        assert latent_cache(out.past_key_values).num_layers == 2
        layers = [type(layer).__name__ for layer in out.past_key_values.layers]
        assert layers[0] == layers[2] == "LinearAttentionLayer" and layers[1] == layers[3] == "LatentCacheLayer"
        turn2 = torch.cat([expected, torch.randint(3, 128, (3, 2), generator=torch.Generator().manual_seed(5))], 1)
        mask2 = torch.cat([mask, torch.ones(3, turn2.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
        eager_first = eager_model.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True, **GREEDY)
        assert torch.equal(
            model.generate(input_ids=turn2, attention_mask=mask2, past_key_values=out.past_key_values, **GREEDY),
            eager_model.generate(input_ids=turn2, attention_mask=mask2, past_key_values=eager_first.past_key_values,
                                 **GREEDY))
        assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **beam),
                           eager_model.generate(input_ids=ids, attention_mask=mask, **beam))
        # a refused step (a mask hiding cached tokens) came after linear layer 0 had taken it: the Cache is spent
        cache = model.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True,
                               **GREEDY).past_key_values  # 9 + 7 positions
        hiding = torch.cat([mask, torch.ones(3, 8, dtype=mask.dtype)], 1)
        hiding[0, 10] = 0  # row 0's second generated token
        with pytest.raises(RuntimeError, match="sees other earlier keys than the tokens its row has cached"):
            model(input_ids=ids[:, :1], attention_mask=hiding, past_key_values=cache)
        with pytest.raises(ValueError, match="can't be used any more: a step of this hybrid model failed"):
            model(input_ids=ids[:, :1], attention_mask=torch.ones_like(hiding), past_key_values=cache)
    with pytest.raises(ValueError, match="static_latent_cache does not serve kimi_linear"):
        integration.static_latent_cache(model, 3, 32)
    unpatch_model(model)
    assert [layer.self_attn for layer in model.model.layers] == originals


def test_a_model_with_a_layer_removed_keeps_its_layers_cache_indices():
    """A model pruned of a decoder layer (its others keep their layer_idx: 0 and 2) generates transformers' tokens
    patched; attention modules sharing a layer_idx (one cache layer for two) are refused before any swap."""
    model = tiny_model(num_hidden_layers=3)
    del model.model.layers[1]
    eager_model = copy.deepcopy(model)
    ids, mask = left_padded([5, 9, 2])
    patch_model(model, block_size=4)
    assert [layer.self_attn.num_cache_layers for layer in model.model.layers] == [3, 3]
    with torch.no_grad():
        assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **GREEDY),
                           eager_model.generate(input_ids=ids, attention_mask=mask, **GREEDY))
    # its config told of 2 layers too (a layer_idx past them: the per-layer config view of transformers 5.25 has none
    # for layer 2, so patch_model read it only for heterogeneous configs; it raised a bare IndexError)
    model = tiny_model(num_hidden_layers=3)
    del model.model.layers[1]
    model.config.num_hidden_layers = 2
    stock = copy.deepcopy(model)
    patch_model(model, block_size=4)
    with torch.no_grad():
        assert err_ratio(model(input_ids=ids, attention_mask=mask, use_cache=False).logits[mask.bool()],
                         stock(input_ids=ids, attention_mask=mask, use_cache=False).logits[mask.bool()]) < 1e-4

    model = tiny_model()
    model.model.layers[1].self_attn.layer_idx = 0
    with pytest.raises(TypeError, match="layer_idx"):
        patch_model(model)
    assert type(model.model.layers[0].self_attn) is DeepseekV3Attention


def test_an_unsupported_model_names_its_text_decoder():
    """A multimodal model whose text decoder is not an MLA model is refused naming that decoder's type (its own type,
    kimi_k25, is one the README lists)."""
    from transformers import Kimi_K25Config, Kimi_K25ForConditionalGeneration
    vision = dict(num_attention_heads=2, num_hidden_layers=1, hidden_size=32, intermediate_size=32, pos_emb_height=4,
                  pos_emb_width=4)
    text = dict(model_type="llama", hidden_size=32, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=1,
                intermediate_size=32, vocab_size=160)
    kimi = Kimi_K25ForConditionalGeneration(Kimi_K25Config(
        text_config=text, vision_config=vision, projection_hidden_size=32, image_token_id=150, video_token_id=151,
        vision_start_token_id=152, vision_end_token_id=153))
    with pytest.raises(TypeError, match="text decoder 'llama'"):
        patch_model(kimi)


class _LoraLinear(torch.nn.Module):
    """The shape of peft's lora.Linear: wraps the base layer, exposes its ``weight``, adds a low-rank delta."""

    def __init__(self, base, rank=4):
        super().__init__()
        self.base_layer = base
        self.lora_A = torch.nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = torch.nn.Linear(rank, base.out_features, bias=False)

    @property
    def weight(self):
        return self.base_layer.weight

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


def test_adapted_kv_b_proj_is_refused_before_any_swap():
    """The kernels read kv_b_proj's weight directly (absorbed into the query and the output), never call it: a
    wrapped kv_b_proj (a LoRA adapter, a subclass with its own forward) would be bypassed and the patched model
    would compute another function. patch_model refuses it; adapters on the other projections are called, so fine."""
    model = tiny_model()
    model.model.layers[1].self_attn.kv_b_proj = _LoraLinear(model.model.layers[1].self_attn.kv_b_proj)
    with pytest.raises(TypeError, match="layer 1's kv_b_proj"):
        patch_model(model)
    assert all(type(layer.self_attn) is DeepseekV3Attention for layer in model.model.layers)

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = tiny_model()
    model.model.layers[0].self_attn.kv_b_proj.__class__ = Scaled
    with pytest.raises(TypeError, match="layer 0's kv_b_proj"):
        patch_model(model)
    model = tiny_model()
    model.model.layers[0].self_attn.q_proj = _LoraLinear(model.model.layers[0].self_attn.q_proj)
    patch_model(model)


def test_kv_b_proj_hooks_and_later_adapters_are_refused_attention_hooks_keep_running():
    """kv_b_proj is never called (the kernels read its weight): a forward hook on it (a calibration observer, an
    edit of its output) never ran and its edit silently vanished (logits 31% off stock); an adapter wrapped around
    it after patching was bypassed (77% off). Both refused, at patch time and at every call (before the layer's own
    step; the layers before it have taken theirs, so that Cache is refused after, as any interrupted step). A hook on the attention module itself fired on stock and never on the patched model: its stand-in
    shares the hook dicts, so it fires with stock's output, and its handle still removes it."""
    ids, mask = left_padded([5, 3])
    stock = tiny_model()
    model = copy.deepcopy(stock)
    seen = []
    handles = [m.model.layers[0].self_attn.register_forward_hook(lambda mod, args, out: seen.append(out[0].clone()))
               for m in (stock, model)]  # (on the model: before patching)
    hooked = model.model.layers[1].self_attn.kv_b_proj.register_forward_hook(lambda mod, args, out: out * 2)
    with pytest.raises(ValueError, match="layer 1's kv_b_proj has forward hooks"):
        patch_model(model)
    assert all(type(layer.self_attn) is DeepseekV3Attention for layer in model.model.layers)
    hooked.remove()
    patch_model(model)
    with torch.no_grad():
        expected = stock(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=mask).logits
    assert len(seen) == 2
    real = mask.bool()  # (a pad's attention output is the patched model's own: it attends to nothing)
    torch.testing.assert_close(seen[1][real], seen[0][real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
    attn = model.model.layers[1].self_attn
    plain = attn.kv_b_proj
    for edit, error, match in ((lambda: plain.register_forward_pre_hook(lambda mod, args: None), ValueError,
                                "kv_b_proj has forward hooks"),
                               (lambda: setattr(attn, "kv_b_proj", _LoraLinear(plain)), TypeError,
                                "kv_b_proj is a _LoraLinear")):
        handle = edit()
        cache = DynamicCache(config=model.config)
        with torch.no_grad(), pytest.raises(error, match=match):
            model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        if handle is not None:
            handle.remove()
        attn.kv_b_proj = plain
        with torch.no_grad():  # layer 0 had taken the step: that Cache says so; a new one serves
            with pytest.raises(RuntimeError, match="start over with a new cache"):
                model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, use_cache=True).logits[real],
                                       expected[real], rtol=1e-5, atol=1e-5)
    seen.clear()
    handles[1].remove()  # the handle from before patching removes it from the stand-in
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert not seen and not model.model.layers[0].self_attn._forward_hooks


@pytest.mark.parametrize("block,ue8m0", [
    ((16, 24), False), (None, False),
    pytest.param((16, 24), True, marks=pytest.mark.skipif(not hasattr(torch, "float8_e8m0fnu"),
                                                          reason="torch before 2.7 has no float8_e8m0fnu"))],
    ids=["blocks", "one-scale", "ue8m0-blocks"])
def test_an_fp8_kv_b_proj_is_read_as_its_dequantized_weight(block, ue8m0):
    """DeepSeek-V3's released checkpoints load on a GPU with their projections as transformers' FP8Linear (e4m3
    weights, a scale per 128 x 128 block). The kernels read kv_b_proj's weight, which patch_model refused for an
    FP8Linear; they take it dequantized as FP8Linear's forward multiplies the scales in. The patched model then
    computes what stock computes with plain Linear layers holding those weights' exact values (stock's own FP8Linear
    forward needs a GPU, and quantizes its inputs to fp8 too: the kernels take them as they are). fp32, so the
    tolerance is the plain model's (``test_forward_matches_transformers``). (16, 24) blocks of the 128 x 32 weight:
    the last column of blocks is partial."""
    model, plain = with_fp8_kv_b(tiny_model(q_lora_rank=32), block, ue8m0)
    stock_keys = model.state_dict().keys()
    ids, mask = left_padded([7, 4, 1])
    real = mask.bool()
    with torch.no_grad():
        expected = plain(input_ids=ids, attention_mask=mask).logits
        patch_model(model)
        got = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
        assert torch.equal(model.generate(ids, attention_mask=mask, **GREEDY),
                           plain.generate(ids, attention_mask=mask, **GREEDY))
    assert model.state_dict().keys() == stock_keys  # the scales stay, the dequantized copy is no buffer
    unpatch_model(model)
    assert all(type(layer.self_attn.kv_b_proj).__name__ == "FP8Linear" for layer in model.model.layers)


def test_an_fp8_kv_b_proj_in_a_bf16_model_and_its_static_cache():
    """A bf16 model (as an fp8 checkpoint computes) with fp8 kv_b_proj layers: the same bits as the model holding
    the exactly dequantized weights in bf16 (the kernels see the same weight), in the prompt and decode steps and
    with a static latent cache, whose default dtype is the model's (the latent norm's), not the fp8 weight's (an fp8
    latent cache, silently)."""
    model = tiny_model(q_lora_rank=32).to(torch.bfloat16)  # (before the swap: .to(dtype) casts fp8 weights too)
    model, plain = with_fp8_kv_b(model)
    patch_model(model)
    patch_model(plain)
    ids, mask = left_padded([7, 4, 1])
    with torch.no_grad():
        assert torch.equal(model.generate(ids, attention_mask=mask, **GREEDY, output_logits=True,
                                          return_dict_in_generate=True).logits[-1],
                           plain.generate(ids, attention_mask=mask, **GREEDY, output_logits=True,
                                          return_dict_in_generate=True).logits[-1])
        caches = [static_latent_cache(m, 3, 32, block_size=4) for m in (model, plain)]
        assert latent_cache(caches[0]).dtype == torch.bfloat16
        outs = [m.generate(ids, attention_mask=mask, past_key_values=c, **GREEDY)
                for m, c in zip((model, plain), caches)]
    assert torch.equal(outs[0], outs[1])


def test_an_fp8_kv_b_proj_under_autocast_and_after_it():
    """An fp32 model with fp8 kv_b_proj layers under bf16 autocast takes the weights dequantized into bf16, and
    after it into fp32 again (the kept copy is per dtype): the bits of the model holding the dequantized weights in
    fp32, patched, in both."""
    model, plain = with_fp8_kv_b(tiny_model(q_lora_rank=32))
    patch_model(model)
    patch_model(plain)
    ids, mask = left_padded([5, 3])
    with torch.no_grad():
        for autocast in (True, False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                got, expected = (m(input_ids=ids, attention_mask=mask).logits for m in (model, plain))
            assert torch.equal(got, expected), autocast


def test_an_fp8_kv_b_proj_changed_in_place_is_read_again():
    """Eager calls keep the dequantized weight between steps; a weight or scale written in place (a weight reload,
    ``load_state_dict``), or a new weight Parameter, is read again at the next call, never the stale copy; an edit
    through ``.data`` (no version counter sees it) after ``refresh_kv_b``. deepcopy and torch.save of a patched model
    whose copies are kept (weak references, which do not pickle) leave them behind (plain pickle fails on torch's fp8
    tensors themselves)."""
    model, plain = with_fp8_kv_b(tiny_model(q_lora_rank=32))
    patch_model(model)
    ids, mask = left_padded([5, 3])
    real = mask.bool()

    def check():
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits[real],
                                       plain(input_ids=ids, attention_mask=mask).logits[real], rtol=1e-5, atol=1e-5)

    check()
    fp8 = model.model.layers[0].self_attn.kv_b_proj
    with torch.no_grad():
        fp8.weight_scale_inv.mul_(2.0)  # the scales alone (the weight's bits and address unchanged)
        plain.model.layers[0].self_attn.kv_b_proj.weight.mul_(2.0)
    check()
    other = tiny_model(seed=7, q_lora_rank=32).model.layers[0].self_attn.kv_b_proj
    new, exact = fp8_linear(other, (16, 24))
    with torch.no_grad():
        model.load_state_dict({k: v for k, v in model.state_dict().items()} | {
            "model.layers.0.self_attn.kv_b_proj.weight": new.weight,
            "model.layers.0.self_attn.kv_b_proj.weight_scale_inv": new.weight_scale_inv})
        plain.model.layers[0].self_attn.kv_b_proj.weight.copy_(exact)
    check()
    with torch.no_grad():  # through .data: no version counter sees it, refresh_kv_b says so
        fp8.weight_scale_inv.data.mul_(0.5)
        plain.model.layers[0].self_attn.kv_b_proj.weight.mul_(0.5)
    for module in model.modules():
        if isinstance(module, MLAttention):
            module.refresh_kv_b()
    check()
    for how in ("deepcopy", "torch.save"):  # the kept copies (weak references) stay behind; the copy dequantizes anew
        copied = round_trip(model, how)
        assert "_kv_b_fp8" not in vars(copied.model.layers[0].self_attn)
        with torch.no_grad():
            torch.testing.assert_close(copied(input_ids=ids, attention_mask=mask).logits[real],
                                       plain(input_ids=ids, attention_mask=mask).logits[real], rtol=1e-5, atol=1e-5)
    for seed in (8, 9):  # new Parameters (the old ones left as they are), fresh copies: each at version 0
        new, exact = fp8_linear(tiny_model(seed=seed, q_lora_rank=32).model.layers[0].self_attn.kv_b_proj, (16, 24))
        fp8.weight = torch.nn.Parameter(new.weight.detach().clone(), requires_grad=False)
        fp8.weight_scale_inv = torch.nn.Parameter(new.weight_scale_inv.detach().clone(), requires_grad=False)
        with torch.no_grad():
            plain.model.layers[0].self_attn.kv_b_proj.weight.copy_(exact)
        check()


def test_an_fp8_kv_b_proj_the_kernels_cannot_read_is_refused():
    """An FP8Linear whose scales do not match its weight's blocks (or are bytes, or on another device), whose block
    size is not two positive ints, with FP4 (packed int8) weights, a bias or a forward hook, or a subclass with its
    own forward: refused by patch_model
    before any swap, naming the layer, and at every call when made so after patching (a step has run, so its
    dequantized weight is kept: the edits that keep its tensors are checked too)."""
    from transformers.integrations.finegrained_fp8 import FP8Linear

    class Scaled(FP8Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    def bad_scales(m):
        m.weight_scale_inv = torch.nn.Parameter(torch.ones(3, 3), requires_grad=False)

    def bad_block(m):
        m.block_size = (0, 16)

    def fp4(m):
        m.weight = torch.nn.Parameter(torch.zeros(128, 16, dtype=torch.int8), requires_grad=False)

    def bias(m):
        m.bias = torch.nn.Parameter(torch.zeros(128), requires_grad=False)

    def subclass(m):
        m.__class__ = Scaled

    def hooked(m):
        m.register_forward_hook(lambda mod, args, out: out * 2)

    def byte_scales(m):  # ue8m0 scales as their raw bytes
        m.weight_scale_inv = torch.nn.Parameter(torch.full((8, 2), 127, dtype=torch.uint8), requires_grad=False)

    def scales_elsewhere(m):
        m.weight_scale_inv = torch.nn.Parameter(m.weight_scale_inv.detach().to("meta"), requires_grad=False)

    cases = [(bad_scales, ValueError, r"kv_b_proj's weight_scale_inv has shape \(3, 3\).* needs \(8, 2\)"),
             (bad_block, TypeError, r"kv_b_proj is an FP8Linear with block_size \(0, 16\)"),
             (fp4, TypeError, "kv_b_proj is an FP8Linear with torch.int8 weights"),
             (bias, TypeError, "kv_b_proj has a bias, which the kernels would drop"),
             (subclass, TypeError, "kv_b_proj is a Scaled"),
             (hooked, ValueError, "kv_b_proj has forward hooks"),
             (byte_scales, TypeError, r"kv_b_proj is an FP8Linear whose weight_scale_inv must be a floating-point "
                                      r"tensor .* got a torch.uint8 tensor \(ue8m0 scales stored as bytes: "
                                      r"\.view\(torch.float8_e8m0fnu\)\)"),
             (scales_elsewhere, ValueError, "kv_b_proj's weight_scale_inv is on meta but its weight on cpu")]
    ids, mask = left_padded([5, 3])
    for edit, error, match in cases:
        model, _ = with_fp8_kv_b(tiny_model(q_lora_rank=32))
        edit(model.model.layers[1].self_attn.kv_b_proj)
        with pytest.raises(error, match="layer 1's " + match):
            patch_model(model)
        assert all(type(layer.self_attn) is DeepseekV3Attention for layer in model.model.layers)
        model, _ = with_fp8_kv_b(tiny_model(q_lora_rank=32))
        patch_model(model)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        edit(model.model.layers[1].self_attn.kv_b_proj)
        with torch.no_grad(), pytest.raises(error, match=match):
            model(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequantize_fp8_weight_is_the_float32_product_in_the_dtype(dtype):
    """``module.dequantize_fp8_weight`` against the block-by-block exact products of ``fp8_linear``, rounded to
    float32 (as an fp32 multiply rounds them: a 4-bit fp8 significand times a float32 scale's 24 bits) then to
    ``dtype``: equal bits, for partial blocks at both edges and for one scale for all. (torch converts float64 to
    bf16 and fp16 through float32 too.) Multiplying in ``dtype``, as transformers' own dequantization does, rounds
    each scale to bf16 first and fails here."""
    from mla_kernels.module import dequantize_fp8_weight
    torch.manual_seed(0)
    linear = torch.nn.Linear(40, 72, bias=False)
    with torch.no_grad():
        linear.weight.mul_(torch.logspace(-3, 3, 40))  # scales far apart across the column blocks
    for block in ((16, 24), (128, 128), None):
        fp8, exact = fp8_linear(linear, block)
        got = dequantize_fp8_weight(fp8.weight, fp8.weight_scale_inv, fp8.block_size, dtype)
        assert got.dtype == dtype and torch.equal(got, exact.to(torch.float32).to(dtype)), block


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_a_one_token_step_without_the_padding_mask_is_refused(impl):
    """A decode step whose caller left out the mask after a padded prompt: the stock model then attends to the
    pads' keys, which the latent cache never stored. Under eager attention the 4-D all-visible mask was refused on
    the device; under sdpa (which builds no mask for one token) the step silently differed from stock by 14%.
    Refused on the host there. Without padding, a mask-less step is stock's."""
    stock = tiny_model(attn_implementation=impl)
    model = patch_model(copy.deepcopy(stock))
    for lengths, padded in (([5, 3], True), ([5, 5], False)):
        ids, mask = left_padded(lengths)
        with torch.no_grad():
            logits = []
            for m in (stock, model):
                out = m.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True, do_sample=False,
                                 max_new_tokens=2, min_new_tokens=2)
                step = dict(input_ids=torch.tensor([[4], [5]]), past_key_values=out.past_key_values)
                if m is model and padded:
                    with pytest.raises((ValueError, RuntimeError), match="attention_mask is None|attention mask"):
                        m(**step)
                    continue
                logits.append(m(**step).logits)
        if not padded:
            torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)


def test_float64_model_is_refused_before_any_swap():
    model = tiny_model().double()
    with pytest.raises(TypeError, match="bfloat16"):
        patch_model(model)
    assert all(type(layer.self_attn) is DeepseekV3Attention for layer in model.model.layers)


def test_cache_misuse_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_utils, "interpreting", lambda: False)  # wiring only: the PyTorch path is enough
    model = tiny_model()
    ids, mask = left_padded([5, 3])
    filled = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=filled, use_cache=True)
        patch_model(model, block_size=4, max_cache_tokens=16)
        with pytest.raises(ValueError, match="transformers K/V"):
            model(input_ids=ids, attention_mask=mask, past_key_values=filled, use_cache=True)
        with pytest.raises(CacheFullError, match="max_cache_tokens"):
            model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12)
    with pytest.raises(RuntimeError, match="no_grad"):
        model(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("query_len", [1, 2])
def test_a_step_of_another_batch_size_is_refused_by_name(query_len, monkeypatch):
    """A Cache of 2 rows given a batch of 3: the named ValueError in a prompt step and, with an attention mask, in a
    decode step too (which compared the rows' cached lengths with the mask's rows first, and failed inside torch:
    "The size of tensor a (3) must match the size of tensor b (2)"), before anything is counted."""
    monkeypatch.setattr(_utils, "interpreting", lambda: False)  # wiring only: the PyTorch path is enough
    model = patch_model(tiny_model(), block_size=4)
    ids = torch.randint(3, 128, (3, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        kv = DynamicCache(config=model.config)
        model(ids[:2, :4], attention_mask=torch.ones(2, 4, dtype=torch.long), past_key_values=kv)
        with pytest.raises(ValueError, match="holds 2 sequences but this call has a batch of 3"):
            model(ids[:, 4:4 + query_len], attention_mask=torch.ones(3, 4 + query_len, dtype=torch.long),
                  past_key_values=kv)
    assert kv.get_seq_length() == 4 and [latent_cache(kv).seqlen(s) for s in latent_cache(kv).seq_ids] == [4, 4]


@pytest.mark.parametrize("other", [dict(kv_lora_rank=64), dict(num_hidden_layers=3), dict(num_hidden_layers=1)])
def test_a_cache_another_model_filled_is_refused_before_anything_is_stored(other, monkeypatch):
    """A Cache one patched model filled, passed to a model of other widths or another layer count: refused by the
    first layer, before it counts, reserves or stores anything (other widths were refused after the first layer had
    reserved and counted the step; more layers at the first layer past the Cache's, after the others had stored the
    step, which the Cache's own model then went on from silently), and the Cache's own model goes on as before."""
    monkeypatch.setattr(_utils, "interpreting", lambda: False)  # wiring only: the PyTorch path is enough
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    owner, stranger = patch_model(tiny_model()), patch_model(tiny_model(seed=3, **other))
    with torch.no_grad():
        expected = owner(input_ids=ids, use_cache=True)
        expected = owner(input_ids=ids[:, -1:], past_key_values=expected.past_key_values, use_cache=True).logits
        cache = owner(input_ids=ids, use_cache=True).past_key_values
        with pytest.raises(ValueError, match="another model"):
            stranger(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True)
        assert [cache.get_seq_length(i) for i in range(2)] == [6, 6]
        assert [latent_cache(cache).seqlen(s) for s in latent_cache(cache).seq_ids] == [6, 6]
        got = owner(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True).logits
    assert torch.equal(got, expected)


@pytest.mark.parametrize("path", ["kernels", "torch"])
def test_a_cache_begun_under_inference_mode_continues_outside_it(path, monkeypatch):
    """A conversation begun under torch.inference_mode and continued under no_grad (transformers' own cache takes
    it): the latent cache's buffers and the host block table were inference tensors, which refuse in-place writes
    outside that mode, so the first write (PyTorch path), or the first step a row needed a new block (any path),
    failed inside torch after the step was reserved."""
    if path == "torch":
        monkeypatch.setattr(_utils, "interpreting", lambda: False)
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    model = patch_model(tiny_model(), block_size=4)
    logits = []
    for first_mode in (torch.no_grad, torch.inference_mode):
        with first_mode():  # the prompt and 4 steps: 9 tokens in 3 blocks of a table 4 blocks wide
            cache = model(input_ids=ids, use_cache=True).past_key_values
            for i in range(4):
                model(input_ids=ids[:, i:i + 1], past_key_values=cache, use_cache=True)
        with torch.no_grad():  # into the 4th block
            logits.append([model(input_ids=ids[:, i:i + 1], past_key_values=cache, use_cache=True).logits
                           for i in range(4)])
    for got, want in zip(logits[1], logits[0]):
        assert torch.equal(got, want)


def test_a_filled_cache_pickles_and_each_copy_goes_on_alone(monkeypatch):
    """torch.save / pickle of a patched model's Cache, as of transformers' own (a prompt cache kept on disk): its
    layers' class was local to a function and a Cache made without a config kept a lambda, so pickling failed. The
    loaded copy and the original then go on independently, each to the uninterrupted generation's tokens."""
    monkeypatch.setattr(_utils, "interpreting", lambda: False)  # wiring only: the PyTorch path is enough
    ids, mask = left_padded([5, 3])
    model = patch_model(tiny_model())
    half = dict(GREEDY, max_new_tokens=4, min_new_tokens=4)
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
        first = model.generate(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache(),
                               return_dict_in_generate=True, **half)
        copies = [round_trip(first.past_key_values, how) for how in ("torch.save", "pickle")]
        copies.append(first.past_key_values)
        assert latent_cache(copies[0]) is not latent_cache(copies[2])
        mask = torch.cat([mask, torch.ones_like(mask[:, :4])], 1)
        for cache in copies:
            assert torch.equal(model.generate(input_ids=first.sequences, attention_mask=mask, past_key_values=cache,
                                              **half), expected)


def test_an_fp8_cache_pickles_and_goes_on(monkeypatch):
    """The same for a patched model with DeepSeek's FP8 cache (cache_dtype=float8_e4m3fn), whose latent, scales and rope
    key are views of other dtypes than their uint8 buffer: torch.save refused to save them ("view the same data as
    different types") and pickle saved them but failed to load them. Saved, loaded and continued, each copy gives
    the uninterrupted generation's tokens."""
    monkeypatch.setattr(_utils, "interpreting", lambda: False)  # wiring only: the PyTorch path is enough
    ids, mask = left_padded([5, 3])
    model = patch_model(tiny_model(kv_lora_rank=128), cache_dtype=torch.float8_e4m3fn)
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache(), use_cache=True)
        copies = [round_trip(first.past_key_values, how) for how in ("torch.save", "pickle")]
        assert latent_cache(copies[0]).dtype == torch.float8_e4m3fn
        prompt = torch.cat([ids, first.logits[:, -1:].argmax(-1)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        greedy = dict(GREEDY, max_new_tokens=4, min_new_tokens=4)
        expected = model.generate(input_ids=prompt, attention_mask=mask,
                                  past_key_values=copy.deepcopy(first.past_key_values), **greedy)
        for cache in copies:
            assert torch.equal(model.generate(input_ids=prompt, attention_mask=mask, past_key_values=cache, **greedy),
                               expected)


@pytest.mark.parametrize("kind", ["latent", "static"])
def test_the_cache_layer_class_is_made_once_by_threads_at_once(kind, monkeypatch):
    """The Cache layer classes are made on first use. Two threads' first forward passes at once (a server's
    workers) each made one, and the loser's Cache layers were of a class the module no longer named: its next step
    refused them ("layer 0 is a LatentCacheLayer, which the patched model can't use") and pickling them failed.
    (The class is made slowly here, to widen the window two threads meet in.)"""
    import threading
    import time

    global_name, make, get = {"latent": ("_LATENT_LAYER_CLASS", "_make_latent_layer_class", "_latent_layer_class"),
                              "static": ("_STATIC_LAYER_CLASS", "_make_static_layer_class", "_static_layer_class")}[kind]
    made = getattr(integration, make)
    monkeypatch.setattr(integration, global_name, None)  # (the module's class again after the test)
    monkeypatch.setattr(integration, make, lambda: time.sleep(0.2) or made())
    got = []
    threads = [threading.Thread(target=lambda: got.append(getattr(integration, get)())) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(got) == 2 and got[0] is got[1] is getattr(integration, global_name)


def test_training_around_frozen_patched_attention_is_refused():
    """Attention frozen, the rest trainable (fine-tuning other modules): the hidden states reaching the attention
    require grad, which the kernels can't propagate. A clear error, not embedding gradients silently missing every
    path through attention (the interpreter) or an in-place autograd error from deep inside (the PyTorch path)."""
    model = patch_model(tiny_model())
    for layer in model.model.layers:
        layer.self_attn.requires_grad_(False)
    ids, mask = left_padded([5, 3])
    with pytest.raises(RuntimeError, match="no_grad"):
        model(input_ids=ids, attention_mask=mask, labels=ids)


def test_a_transformers_static_cache_points_to_static_latent_cache(monkeypatch):
    """generate(cache_implementation="static") or a StaticCache: refused with a pointer to the patched model's own
    static cache, not with an error about transformers K/V that the empty StaticCache doesn't hold."""
    from transformers import StaticCache

    monkeypatch.setattr(_utils, "interpreting", lambda: False)  # wiring only: the PyTorch path is enough
    model = patch_model(tiny_model())
    ids, mask = left_padded([5, 3])
    with torch.no_grad():
        with pytest.raises(ValueError, match="StaticLayer.*static_latent_cache"):
            model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=2,
                           cache_implementation="static")
        with pytest.raises(ValueError, match="StaticLayer.*static_latent_cache"):
            model(input_ids=ids, attention_mask=mask, use_cache=True,
                  past_key_values=StaticCache(config=model.config, max_cache_len=16))


def test_generate_bench_smoke_v32(monkeypatch):
    """bench.generate --model deepseek_v32 on a tiny shape whose index_topk (4) is below the context: the patched
    model runs sparse decode steps (interpreter), agrees with stock transformers, and the compiled provider says
    why it is skipped."""
    from bench import generate
    from bench.generate import LOGITS_RTOL, ModelShape, run

    monkeypatch.setattr(generate, "V32_INDEX", dict(index_topk=4, index_head_dim=32, index_n_heads=2))
    shape = ModelShape(hidden=64, heads=2, layers=2, q_lora_rank=32, vocab=128, intermediate=64,
                       kv_lora_rank=32, rope=16, nope=16, v=16)
    rows = run(torch.device("cpu"), shape, [7], [2], new_tokens=3, runs=1, no_cache_limit=0,
               model_type="deepseek_v32")
    by_name = {r["provider"]: r for r in rows}
    assert "indexer" in by_name["patched-compiled"]["note"]
    assert by_name["patched"]["prompt_logits_rel_rms_err"] < LOGITS_RTOL and by_name["patched"]["tokens_per_s"] > 0
    assert by_name["patched"]["decode_logits_rel_rms_err"] < LOGITS_RTOL  # the sparse decode steps, before timing
    with pytest.raises(ValueError, match="model_type"):
        generate.build_model(shape, torch.device("cpu"), model_type="llama")


# the Cache by the name this transformers takes (h.cache_kw): 5.25 deprecates past_key_values, warning at each call
@pytest.mark.filterwarnings("error:`past_key_values` is deprecated:FutureWarning")
def test_generate_bench_smoke(monkeypatch):
    """bench.generate's providers on a tiny dense shape (PyTorch path: this only checks the wiring)."""
    from bench.generate import LOGITS_RTOL, ModelShape, run

    monkeypatch.setattr(_utils, "interpreting", lambda: False)
    shape = ModelShape(hidden=64, heads=2, layers=2, q_lora_rank=32, vocab=128, intermediate=64,
                       kv_lora_rank=32, rope=16, nope=16, v=16)
    rows = run(torch.device("cpu"), shape, [5], [2], new_tokens=3, runs=1, no_cache_limit=8)
    assert [r["provider"] for r in rows] == ["patched-compiled", "no-cache", "transformers-cache", "patched",
                                             "patched-norms", "no-attention"]
    assert "GPU only" in rows[0]["note"] and "p50_ms" not in rows[0]
    timed = [r for r in rows if r["provider"] in ("no-cache", "transformers-cache", "patched", "patched-norms")]
    assert all(r["tokens_per_s"] > 0 for r in timed)
    # the share holds only against the eager cached steps the no-attention run is the rest of: not no-cache's
    # whole-sequence forwards (its MLPs over every token would count as attention), nor patched-norms' (its norms
    # are kernels, the no-attention run's transformers' ops)
    assert all(0 <= r["attention_share"] <= 1 for r in timed if r["provider"] in ("transformers-cache", "patched"))
    assert "attention_share" not in rows[1] and "attention_share" not in rows[4]
    for patched in rows[3:5]:
        assert patched["prompt_logits_rel_rms_err"] < LOGITS_RTOL
        assert patched["decode_logits_rel_rms_err"] < LOGITS_RTOL  # checked before timing (fp32 here: ~1e-6)
        assert patched["tokens_agree_with_transformers"] >= 0.5  # bf16 ties may flip a late token


def test_generate_bench_marks_a_wrong_patched_model(monkeypatch):
    """A patched model whose logits are wrong is not timed, and its row says ``wrong`` (bench.generate's main then
    exits non-zero, as bench.decode and bench.prefill do): the row had only a note, and the run exited 0."""
    import mla_kernels
    from bench.generate import ModelShape, run

    real_patch = mla_kernels.patch_model

    def broken_patch(model, *args, **kwargs):
        model = real_patch(model, *args, **kwargs) or model
        model.lm_head.register_forward_hook(lambda module, inputs, out: out + 1.0)
        return model

    monkeypatch.setattr(_utils, "interpreting", lambda: False)
    monkeypatch.setattr(mla_kernels, "patch_model", broken_patch)
    shape = ModelShape(hidden=64, heads=2, layers=2, q_lora_rank=32, vocab=128, intermediate=64,
                       kv_lora_rank=32, rope=16, nope=16, v=16)
    rows = run(torch.device("cpu"), shape, [5], [2], new_tokens=3, runs=1, no_cache_limit=0)
    for name in ("patched", "patched-norms"):
        patched = next(r for r in rows if r["provider"] == name)
        assert patched.get("wrong") is True and "WRONG" in patched["note"] and "p50_ms" not in patched


def test_generate_bench_decode_step_check():
    """bench.generate's decode-step check: the first step on every row; a later step only on the rows whose earlier
    tokens agree (after a tie picks another token the two runs see different inputs), so a tie is not reported as
    an error while a wrong step still is."""
    from bench.generate import decode_steps_error

    ref_logits = torch.randn(2, 3, 10)
    ref = (ref_logits, ref_logits.argmax(-1).T)  # tokens [B, steps]
    assert decode_steps_error(ref, ref) == 0.0
    tied = ref_logits.clone()
    tied[1, 2] = torch.randn(10)  # row 2 took another token at step 0, so its step 1 differs: not counted
    tokens = ref[1].clone()
    tokens[2, 0] = (tokens[2, 0] + 1) % 10
    assert decode_steps_error((tied, tokens), ref) == 0.0
    wrong = ref_logits.clone()
    wrong[1, 0] += 1.0  # row 0 agreed at step 0: its wrong step 1 is reported
    assert decode_steps_error((wrong, ref[1]), ref) > 0.1
    wrong_first = ref_logits.clone()
    wrong_first[0, 2] = -wrong_first[0, 2]  # step 0 is compared on every row
    assert decode_steps_error((wrong_first, tokens), ref) > 0.1


def test_attention_dropout_in_train_mode_is_refused():
    """transformers applies attention_dropout in train mode; the kernels have none, so a train-mode forward (under
    no_grad: with grad it is refused anyway) gave dropout-free outputs silently. Refused now; eval mode, or a rate of
    0 (every released checkpoint), runs as before."""
    torch.manual_seed(0)
    model = patch_model(DeepseekV3ForCausalLM(tiny_config(attention_dropout=0.5)))  # as constructed: train mode
    ids = torch.randint(3, 128, (1, 6))
    with torch.no_grad():
        with pytest.raises(ValueError, match="attention_dropout=0.5"):
            model(ids)
        model.eval()
        model(ids)
        torch.manual_seed(0)
        no_dropout = patch_model(DeepseekV3ForCausalLM(tiny_config()))  # train mode, rate 0
        no_dropout(ids)


def test_sparse_positions_without_a_4d_mask_build_the_causal_one():
    """DeepSeek-V3.2's key picks (``_sparse_positions``) when the layer gets no mask, or only a ``[B, KV]`` padding
    mask, rather than transformers' 4-D one: the causal mask is built in place, so the indexer is handed, and the
    latent positions follow, exactly what the 4-D causal mask gives (and GLM-5's shared layers, from the previous
    layer's picks). Checked against positions worked out by hand:
    each query sees the keys up to its own; a padded row's cache holds only its real tokens, so a pick's position
    there is its index less the pads, and a pick of a pad or of a later key is -1."""
    batch, q_len, topk = 2, 7, 3
    handed = []

    class Indexer(torch.nn.Module):  # picks keys 6, 5 and 4 for every query, as a trained indexer might
        index_topk, layer_idx = topk, 0

        def forward(self, hidden_states, q_resid, position_embeddings, mask, position_ids, **kwargs):
            handed.append(integration._sees(mask).clone())
            return torch.tensor([6, 5, 4]).expand(batch, q_len, topk)

    hidden = torch.zeros(batch, q_len, 8)
    causal = torch.ones(q_len, q_len, dtype=torch.bool).tril()
    pads = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])
    query = torch.arange(q_len)[:, None]
    pick = torch.tensor([6, 5, 4])
    by_hand = torch.stack([torch.where(pick <= query, pick, -1),  # row 0: no pads
                           torch.where((pick <= query), pick - 2, -1)])  # row 1: two pads first (never picked)
    for mask, mask_4d, want in ((None, causal.expand(batch, 1, q_len, q_len), by_hand[:1].expand(batch, -1, -1)),
                                (pads, (causal & pads.bool()[:, None, :])[:, None], by_hand)):
        handed.clear()
        picks, got = integration._sparse_positions(Indexer(), hidden, None, None, mask, None, None, 0)
        _, got_4d = integration._sparse_positions(Indexer(), hidden, None, None, mask_4d, None, None, 0)
        assert torch.equal(handed[0], handed[1]), "the indexer was handed another mask"
        assert torch.equal(got, want) and torch.equal(got_4d, want)
        # a GLM-5 shared layer (no indexer) maps the previous layer's picks the same way, and hands them on
        shared_picks, shared = integration._sparse_positions(None, hidden, None, None, mask, None, None, 0, picks)
        assert shared_picks is picks and torch.equal(shared, want)


@pytest.mark.parametrize("cache", [False, True], ids=["no-cache", "dynamic-cache"])
def test_a_model_cast_to_float64_after_patching_is_refused_naming_its_dtype(cache):
    """``model.double()`` after ``patch_model``: the kernels have no float64, so the step is refused with a TypeError
    that names the model's dtype and the way out, before any latent cache is made (the cache constructor's error
    named only its own ``dtype`` argument)."""
    model = tiny_model().eval()
    patch_model(model)
    model.double()
    past = DynamicCache(config=model.config) if cache else None
    with torch.no_grad(), pytest.raises(TypeError, match=r"torch.float64 \(model.double\(\) after patch_model"):
        model(torch.tensor([[1, 2, 3]]), past_key_values=past, use_cache=cache)
    if cache:
        assert latent_cache(past) is None  # nothing attached, nothing counted


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="os.fork is POSIX's")
def test_fork_while_another_thread_makes_the_cache_layer_class():
    """A child forked while another thread holds the lock under which the Cache layer classes are made (a DataLoader
    forked beside a thread's first patched forward pass) makes its own: the lock it inherited held is replaced."""
    assert_fork_beside_a_busy_thread_finishes(
        imports="from mla_kernels.integrations import transformers as integration",
        hold="""
            with integration._CLASS_LOCK:  # as a thread making the class
                ready.set()
                release.wait()
        """,
        child="integration._latent_layer_class()")


def test_unpatch_model_names_itself():
    """``unpatch_model`` of something that is not a supported model names ``unpatch_model`` (it named
    ``patch_model``), and of a non-module says so (a string reached the config lookup)."""
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        unpatch_model("x")
    with pytest.raises(TypeError, match="^unpatch_model takes a transformers"):
        unpatch_model(torch.nn.Linear(2, 2))
