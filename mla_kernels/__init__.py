"""mla_kernels: Triton kernels for DeepSeek's Multi-head Latent Attention (absorbed MLA)."""

from .cache import CacheFullError, PagedLatentCache, fp8_latent_cache, write_cache
from .decode import mla_decode
from .integrations import patch_model, unpatch_model
from .module import LatentBatch, MLAttention
from .prefill import mla_prefill, mla_prefill_attention

__version__ = "0.1.0"

__all__ = [
    "mla_decode",
    "mla_prefill",
    "mla_prefill_attention",
    "write_cache",
    "fp8_latent_cache",
    "PagedLatentCache",
    "CacheFullError",
    "MLAttention",
    "LatentBatch",
    "patch_model",
    "unpatch_model",
]
