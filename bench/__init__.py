"""Benchmarks for mla_kernels, one module per question, all on the shared harness in ``bench._harness``.

``python -m bench.decode``   absorbed decode: seed 003's decode scenario and a shape sweep against
                             the naive (decompressed) and the PyTorch absorbed paths.
``python -m bench.memory``   KV-cache bytes per token (MHA, GQA, transformers' DeepSeek cache, latent)
                             from formulas and from allocated memory; peak memory during decode.

Results go to ``bench/results/<name>_<device>.json`` with the device, versions and git commit.
"""
