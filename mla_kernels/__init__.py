"""mla_kernels: Triton kernels for DeepSeek's Multi-head Latent Attention (absorbed MLA)."""

from .cache import CacheFullError, PagedLatentCache, fp8_latent_cache, write_cache
from ._autotune import autotune
from ._utils import release_workspace
from .decode import mla_decode
from .integrations import patch_model, unpatch_model
from .merge import merge_attention_states
from .module import LatentBatch, MLAttention
from .prefill import mla_prefill, mla_prefill_attention
from .schedule import DecodeSchedule, mla_decode_metadata
from . import _ops  # noqa: F401,E402  (registers the torch.ops.mla_kernels custom ops)

__version__ = "0.1.0"

__all__ = [
    "autotune",
    "mla_decode",
    "mla_decode_metadata",
    "DecodeSchedule",
    "mla_prefill",
    "mla_prefill_attention",
    "merge_attention_states",
    "write_cache",
    "fp8_latent_cache",
    "PagedLatentCache",
    "CacheFullError",
    "MLAttention",
    "LatentBatch",
    "patch_model",
    "unpatch_model",
    "release_workspace",
]
