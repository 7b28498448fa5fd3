"""Framework integrations: one module per framework. transformers is imported only when a model is patched."""

from .transformers import latent_cache, patch_model, static_latent_cache, unpatch_model

__all__ = ["patch_model", "unpatch_model", "latent_cache", "static_latent_cache"]
