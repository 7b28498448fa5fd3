"""Readable PyTorch ground truth for every kernel in mla_kernels.

``naive``    MLA as transformers computes it: decompress the latent into per-head K and V.
``absorbed`` MLA in absorb mode over the paged latent cache, as DeepSeek-V3's inference code does it; and its
             sparse form (each token over its own list of cache positions: DeepSeek-V3.2's DSA).
``quant``    FP8 (e4m3, one fp32 scale per 128 values) quantization of the latent, DeepSeek's FP8 cache format.

Nothing here is fast; everything here is meant to be read. Tests compute these in float64.
"""

from .absorbed import (absorb_query, absorbed_decode, absorbed_prefill, gather_paged, merge_states, sparse_decode,
                       split_kv_b)
from .naive import naive_attention, naive_mla
from .quant import dequantize_fp8, quantize_fp8

__all__ = [
    "absorb_query",
    "absorbed_decode",
    "absorbed_prefill",
    "sparse_decode",
    "merge_states",
    "gather_paged",
    "split_kv_b",
    "naive_attention",
    "naive_mla",
    "quantize_fp8",
    "dequantize_fp8",
]
