"""A serving engine's continuous-batching loop over many steps (tests/serving_sim.py): sequences join with prompts
(prefill with history), decode one token or speculative candidates (then truncate the rejected ones), mix prefill
and decode rows in one step, fork, get freed (their blocks reused), cancel a failed step, hit CacheFullError (which
must change nothing), and run mla_decode directly with padding slots, scheduling metadata built once and reused by
two layers, split_tokens, forced num_splits, sparse lists and FlashMLA's interface (both metadata forms, a refreshed
CUDA-graph buffer), over fp32, bf16 and fp8 caches. Every output is compared with a float64 reference built from a
per-sequence history kept on the side, and after every step the allocator's bookkeeping (reference counts, free
list, one holder per partly filled tail) and every sequence's cached contents are checked against that history.
A review (2026-12-06, 400 randomized runs) found no defect: these seeds are a regression net (more seeds: python
tests/serving_sim.py FIRST END [CONFIGS])."""
import pytest

import serving_sim


# (seeds 1 and 4 with configs 0 and 3 catch a truncate that stops copying a fork's shared tail)
@pytest.mark.parametrize("seed, config", [(1, 0), (4, 0), (1, 1), (1, 2), (4, 3), (1, 4)])
def test_serving_loop_matches_the_side_history(seed, config):
    serving_sim.run(seed, **serving_sim.CONFIGS[config])
