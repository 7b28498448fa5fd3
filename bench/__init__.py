"""Benchmarks for mla_kernels, one module per question, all on the shared harness in ``bench._harness``.

``python -m bench.decode``   absorbed decode: seed 003's decode scenario and a shape sweep against
                             the naive (decompressed) and the PyTorch absorbed paths.
``python -m bench.prefill``  prefill: seed 003's prefill scenario and a new length x history x heads sweep through
                             the absorbed, expanded and automatic paths against naive MLA, with the crossover.
``python -m bench.memory``   KV-cache bytes per token (MHA, GQA, transformers' DeepSeek cache, latent)
                             from formulas and from allocated memory; peak memory during decode.
``python -m bench.generate`` greedy tokens/s of a DeepSeek-V3-shaped model: no cache, transformers' cache, patched.
``python -m bench.host``     host work of one eager call (kernels stubbed); ``--jit`` Triton's per-launch work,
                             ``--prompt`` a patched model's prompt step.
``python -m bench.autotune`` config sweeps of every kernel on this GPU; the winners go to
                             ``mla_kernels/configs/<device>.json``, which the library reads at launch.
``python -m bench.fp8_quality``  the FP8 latent cache: decode error against bf16 on random data, a patched
                             model's logits and greedy tokens, and (GPU) its speed against bf16.

Results go to ``bench/results/<name>_<device>.json`` with the device, versions and git commit.
"""
