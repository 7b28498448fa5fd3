"""PagedLatentCache: the allocator's invariants under random operations, real data, a multi-turn chat."""

from __future__ import annotations

import contextlib
import math
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import mla_kernels
from helpers import SENTINEL_BLOCK, round_trip
from mla_kernels import _utils
from mla_kernels.cache import CacheFullError, PagedLatentCache
from mla_kernels.module import LatentBatch
from mla_kernels.reference import absorbed_decode, gather_paged

R, P = 16, 16  # the smallest widths keep the state machine fast; the chat test uses DeepSeek's 512 + 64


@contextlib.contextmanager
def torch_path():
    """Run write_cache's PyTorch path even under the interpreter."""
    with mock.patch.object(_utils, "interpreting", lambda: False):
        yield


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def bytes_of(t: torch.Tensor) -> torch.Tensor:
    """Any buffer's bytes (a uint8 fp8 buffer as it is), to compare bit for bit."""
    return t.view(torch.uint8) if t.dtype != torch.uint8 else t


def state_of(cache: PagedLatentCache):
    """Everything an operation could change: per sequence (blocks, length), the free count, every byte, and the
    allocator's counts (the free pool in order, each block's holders, the version LatentBatch checks)."""
    seqs = {s: (tuple(cache.seq_blocks(s)), cache.seqlen(s)) for s in cache.seq_ids}
    return (seqs, cache.num_free_blocks, [bytes_of(cache.buffer(layer)).clone() for layer in range(cache.num_layers)],
            (list(cache._free), list(cache._refs), cache._version))


def assert_same_state(before, after):
    assert before[0] == after[0], "sequences changed"
    assert before[1] == after[1], "free block count changed"
    for layer, (a, b) in enumerate(zip(before[2], after[2])):
        assert torch.equal(a, b), f"layer {layer}'s buffer changed"
    assert before[3] == after[3], "the free pool, the block counts or the version changed"


def assert_allocator_consistent(cache: PagedLatentCache):
    """Every block is either free (once in the pool) or held, never both; each block's count is the number of
    sequences holding it; a shared block is full in every sequence holding it (no append writes it again)."""
    holders: dict[int, list] = {}
    for s in cache.seq_ids:
        blocks = cache.seq_blocks(s)
        assert len(blocks) == len(set(blocks)), f"{s!r} holds a block twice"
        assert len(blocks) == math.ceil(cache.seqlen(s) / cache.block_size)
        for i, b in enumerate(blocks):
            holders.setdefault(b, []).append((s, i))
    free = list(cache._free)
    assert len(free) == len(set(free)) == cache.num_free_blocks, "a block is in the free pool twice"
    assert set(free).isdisjoint(holders), "a block is both free and held"
    assert set(free) | set(holders) == set(range(cache.num_blocks)), "a block is neither free nor held"
    assert cache._refs == [len(holders.get(b, ())) for b in range(cache.num_blocks)]
    for b, held in holders.items():
        if len(held) > 1:
            assert all(i < cache.seqlen(s) // cache.block_size for s, i in held), f"shared block {b} is not full"


class AllocatorMachine(RuleBasedStateMachine):
    """Random adds, batched appends with writes to every layer, forks, truncations, frees and over-full appends.

    The model is ``self.expected``: for each live sequence, the ``[L, layers, R + P]`` tokens written
    to it. Unused cache bytes start as NaN.
    """

    @initialize(num_layers=st.integers(1, 2), num_blocks=st.integers(1, 10), block_size=st.sampled_from([1, 2, 4, 16]))
    def make_cache(self, num_layers, num_blocks, block_size):
        self.cache = PagedLatentCache(num_layers, num_blocks, block_size, kv_lora_rank=R, rope_dim=P,
                                      dtype=torch.bfloat16)
        for layer in range(num_layers):
            self.cache.buffer(layer).fill_(float("nan"))
        self.expected: dict = {}
        self.generator = torch.Generator().manual_seed(num_blocks * 100 + block_size)
        self.next_name = 0

    def live(self):
        return st.sampled_from(sorted(self.expected, key=repr))

    def blocks_for(self, length):
        return math.ceil(length / self.cache.block_size)

    def free_blocks(self):
        owned = {b for s in self.cache.seq_ids for b in self.cache.seq_blocks(s)}
        return set(range(self.cache.num_blocks)) - owned

    @rule(named=st.booleans())
    def add(self, named):
        if named:
            seq_id = self.cache.add_sequence(f"conversation-{self.next_name}")
            assert seq_id == f"conversation-{self.next_name}"
            self.next_name += 1
        else:
            seq_id = self.cache.add_sequence()
        assert seq_id not in self.expected
        self.expected[seq_id] = torch.empty(0, self.cache.num_layers, R + P, dtype=torch.bfloat16)
        assert self.cache.seqlen(seq_id) == 0

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def append_and_write(self, data):
        cache = self.cache
        seq_ids = data.draw(st.lists(self.live(), min_size=1, max_size=3, unique=True), label="seq_ids")
        counts = data.draw(st.lists(st.integers(0, 2 * cache.block_size + 1), min_size=len(seq_ids),
                                    max_size=len(seq_ids)), label="num_tokens")
        needed = sum(self.blocks_for(cache.seqlen(s) + n) - self.blocks_for(cache.seqlen(s))
                     for s, n in zip(seq_ids, counts))
        assert cache.blocks_needed(seq_ids, counts) == needed
        if needed > cache.num_free_blocks:
            self._expect_full(seq_ids, counts)
            return
        free_before = self.free_blocks()
        old = {s: (cache.seq_blocks(s), cache.seqlen(s)) for s in seq_ids}

        slots = cache.append_batch(seq_ids, counts)

        assert slots.dtype == torch.int64 and slots.shape == (sum(counts),)
        expected_slots = []
        for s, n in zip(seq_ids, counts):
            blocks, length = old[s]
            new_blocks = cache.seq_blocks(s)
            assert new_blocks[:len(blocks)] == blocks, "a sequence's earlier blocks moved"
            assert set(new_blocks[len(blocks):]) <= free_before, "a block came from outside the free pool"
            expected_slots += [new_blocks[p // cache.block_size] * cache.block_size + p % cache.block_size
                               for p in range(length, length + n)]
        assert slots.tolist() == expected_slots

        tokens = torch.randn(len(expected_slots), cache.num_layers, R + P, generator=self.generator).bfloat16()
        with torch_path():
            for layer in range(cache.num_layers):
                cache.write(layer, slots, tokens[:, layer, :R], tokens[:, layer, R:])
        start = 0
        for s, n in zip(seq_ids, counts):
            self.expected[s] = torch.cat([self.expected[s], tokens[start:start + n]])
            start += n

    @precondition(lambda self: self.expected)
    @rule(data=st.data(), named=st.booleans())
    def fork(self, data, named):
        """A fork shares the source's full blocks and copies a partly filled last one into a free block."""
        cache = self.cache
        source = data.draw(self.live(), label="source")
        length, size = cache.seqlen(source), cache.block_size
        if length % size and cache.num_free_blocks == 0:
            before = state_of(cache)
            with pytest.raises(CacheFullError, match="only 0 of"):
                cache.fork(source)
            assert_same_state(before, state_of(cache))
            return
        free_before, blocks = self.free_blocks(), cache.seq_blocks(source)
        if named:
            new = cache.fork(source, f"fork-{self.next_name}")
            assert new == f"fork-{self.next_name}"
            self.next_name += 1
        else:
            new = cache.fork(source)
        assert new not in self.expected and cache.seqlen(new) == length
        assert cache.seq_blocks(source) == blocks
        forked, full = cache.seq_blocks(new), length // size
        assert forked[:full] == blocks[:full], "a full block was copied rather than shared"
        assert set(forked[full:]) <= free_before and len(forked) == len(blocks), "the tail was not a free block"
        assert cache.num_free_blocks == len(free_before) - (length % size != 0)
        self.expected[new] = self.expected[source].clone()

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def truncate(self, data):
        """Dropping the last tokens returns the blocks past them (those no other sequence holds); a partly filled
        new last block that a fork shares is copied into a free block, or CacheFullError changes nothing."""
        cache = self.cache
        seq_id = data.draw(self.live(), label="seq_id")
        length = data.draw(st.integers(0, cache.seqlen(seq_id)), label="length")
        size, blocks = cache.block_size, cache.seq_blocks(seq_id)
        keep = self.blocks_for(length)
        refs = {b: sum(b in cache.seq_blocks(s) for s in cache.seq_ids) for b in blocks}
        copy = length % size != 0 and refs[blocks[keep - 1]] > 1
        returned = [b for b in blocks[keep:] if refs[b] == 1]
        if copy and not (cache.num_free_blocks or returned):
            before = state_of(cache)
            with pytest.raises(CacheFullError, match="truncating"):
                cache.truncate(seq_id, length)
            assert_same_state(before, state_of(cache))
            return
        free_before = self.free_blocks()
        cache.truncate(seq_id, length)
        now = cache.seq_blocks(seq_id)
        assert now[:keep - copy] == blocks[:keep - copy] and len(now) == keep
        if copy:
            assert now[-1] in free_before | set(returned), "the copied tail was not a free block"
        assert set(returned) - set(now) <= self.free_blocks(), "a dropped block no sequence holds was not returned"
        self.expected[seq_id] = self.expected[seq_id][:length]

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def free(self, data):
        seq_id = data.draw(self.live(), label="seq_id")
        blocks = set(self.cache.seq_blocks(seq_id))
        others = {b for s in self.cache.seq_ids if s != seq_id for b in self.cache.seq_blocks(s)}
        free_before = self.cache.num_free_blocks
        self.cache.free(seq_id)
        del self.expected[seq_id]
        assert seq_id not in self.cache
        assert blocks - others <= self.free_blocks(), "a block no sequence holds now was not returned"
        assert not blocks & others & self.free_blocks(), "a block another sequence holds was returned"
        assert self.cache.num_free_blocks == free_before + len(blocks - others)
        with pytest.raises(KeyError, match="not a live sequence"):
            self.cache.seqlen(seq_id)

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def overfill(self, data):
        seq_ids = data.draw(st.lists(self.live(), min_size=1, max_size=3, unique=True), label="seq_ids")
        counts = [0] * len(seq_ids)
        counts[-1] = self.cache.num_free_blocks * self.cache.block_size + self.cache.block_size
        self._expect_full(seq_ids, counts)

    def _expect_full(self, seq_ids, counts):
        before = state_of(self.cache)
        with pytest.raises(CacheFullError, match=f"only {self.cache.num_free_blocks} of {self.cache.num_blocks}"):
            self.cache.append_batch(seq_ids, counts)
        assert_same_state(before, state_of(self.cache))

    @invariant()
    def every_block_is_free_or_held(self):
        if not hasattr(self, "cache"):
            return
        cache = self.cache
        assert_allocator_consistent(cache)
        assert set(cache.seq_ids) == set(self.expected)
        for s in cache.seq_ids:
            assert cache.seqlen(s) == len(self.expected[s])
            assert len(cache.seq_blocks(s)) == self.blocks_for(cache.seqlen(s))

    @invariant()
    def block_table_maps_positions_to_slots(self):
        if not getattr(self, "expected", None):
            return
        cache, seq_ids = self.cache, list(self.expected)
        table = cache.block_table(seq_ids, pad_id=SENTINEL_BLOCK)
        lengths = cache.cache_seqlens(seq_ids)
        assert table.dtype == torch.int32 and lengths.dtype == torch.int32
        assert table.shape == (len(seq_ids), max(1, max(len(cache.seq_blocks(s)) for s in seq_ids)))
        for b, s in enumerate(seq_ids):
            n = len(cache.seq_blocks(s))
            assert table[b, :n].tolist() == cache.seq_blocks(s)
            assert (table[b, n:] == SENTINEL_BLOCK).all()
            assert lengths[b].item() == cache.seqlen(s)
            pos = torch.arange(cache.seqlen(s))
            from_table = table[b].long()[pos // cache.block_size] * cache.block_size + pos % cache.block_size
            assert torch.equal(from_table, cache.slots(s))

    @invariant()
    def contents_are_what_was_written(self):
        if not getattr(self, "expected", None):
            return
        cache, seq_ids = self.cache, list(self.expected)
        table = cache.block_table(seq_ids)
        for layer in range(cache.num_layers):
            for b, s in enumerate(seq_ids):
                length = cache.seqlen(s)
                kv = gather_paged(cache.kv_cache(layer), table[b], length)
                pe = gather_paged(cache.pe_cache(layer), table[b], length)
                assert torch.equal(bits(kv), bits(self.expected[s][:, layer, :R])), f"{s!r}'s latent changed"
                assert torch.equal(bits(pe), bits(self.expected[s][:, layer, R:])), f"{s!r}'s rope key changed"


TestAllocator = AllocatorMachine.TestCase
TestAllocator.settings = settings(max_examples=50, stateful_step_count=25, deadline=None,
                                  suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# a multi-turn chat (seed 002): the prefix stays, each turn appends, another conversation comes and goes
# ---------------------------------------------------------------------------------------------


def test_multi_turn_chat_keeps_the_prefix(device):
    """Three turns of one conversation: a prompt prefilled at once, then a reply decoded token by
    token, while a second conversation is served and freed and a third reuses its blocks. Writes go
    through the Triton kernel (interpreted on the CPU)."""
    r, p, layers, page = 512, 64, 2, 4
    cache = PagedLatentCache(layers, num_blocks=12, block_size=page, kv_lora_rank=r, rope_dim=p,
                             dtype=torch.bfloat16, device=device)
    for layer in range(layers):
        cache.buffer(layer).fill_(float("nan"))
    history = {}

    def step(seq_ids, counts):
        slots = cache.append_batch(seq_ids, counts)
        tokens = torch.randn(sum(counts), layers, r + p).to(dtype=torch.bfloat16, device=device)
        for layer in range(layers):
            cache.write(layer, slots, tokens[:, layer, :r], tokens[:, layer, r:])
        start = 0
        for s, n in zip(seq_ids, counts):
            history[s] = torch.cat([history.get(s, tokens[:0]), tokens[start:start + n]])
            start += n

    def check(seq_id):
        for layer in range(layers):
            kv, pe = cache.read(layer, seq_id)
            assert torch.equal(bits(kv), bits(history[seq_id][:, layer, :r])), f"layer {layer}: {seq_id}'s latent"
            assert torch.equal(bits(pe), bits(history[seq_id][:, layer, r:])), f"layer {layer}: {seq_id}'s rope key"

    chat = cache.add_sequence("chat")
    other = cache.add_sequence("other")
    step([chat, other], [5, 6])  # both prompts, prefilled together
    for _ in range(3):  # replies decoded together
        step([chat, other], [1, 1])
    check(chat)
    check(other)
    lengths_after_turn = [cache.seqlen(chat)]
    prefix = history[chat].clone()

    other_blocks = set(cache.seq_blocks(other))
    cache.free(other)
    for turn_prompt, reply in [(4, 2), (7, 3)]:
        step([chat], [turn_prompt])
        if "third" not in cache:
            third = cache.add_sequence("third")
            step([third], [9])
            assert set(cache.seq_blocks(third)) & other_blocks, "freed blocks were not reused"
        for _ in range(reply):
            step([chat, third], [1, 1])
        lengths_after_turn.append(cache.seqlen(chat))
        check(chat)
        check(third)
        kv, _ = cache.read(0, chat)
        assert torch.equal(bits(kv[:len(prefix)]), bits(prefix[:, 0, :r])), "the first turn's prefix changed"

    assert lengths_after_turn == [8, 14, 24]

    table = cache.block_table([chat, third], pad_id=SENTINEL_BLOCK)
    seqlens = cache.cache_seqlens([chat, third])
    heads, scale = 2, 0.1
    q_nope = torch.randn(2, 1, heads, r).to(torch.bfloat16)
    q_pe = torch.randn(2, 1, heads, p).to(torch.bfloat16)
    paged_out, paged_lse = absorbed_decode(q_nope, q_pe, cache.kv_cache(1).cpu(), cache.pe_cache(1).cpu(),
                                           table.cpu(), seqlens.cpu(), scale)
    for b, s in enumerate([chat, third]):
        flat = history[s][:, 1].cpu()[None]  # one block holding the whole conversation
        out, lse = absorbed_decode(q_nope[b:b + 1], q_pe[b:b + 1], flat[..., :r], flat[..., r:],
                                   torch.zeros(1, 1, dtype=torch.int32), seqlens[b:b + 1].cpu(), scale)
        torch.testing.assert_close(paged_out[b:b + 1], out, rtol=1e-12, atol=0)
        torch.testing.assert_close(paged_lse[b:b + 1], lse, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------
# the allocator, one behaviour at a time
# ---------------------------------------------------------------------------------------------


def test_full_cache_raises_before_any_change():
    cache = PagedLatentCache(1, num_blocks=4, block_size=4, kv_lora_rank=R, rope_dim=P)
    a, b, c = cache.add_sequence(), cache.add_sequence(), cache.add_sequence()
    cache.append(a, 6)  # 2 blocks
    before = state_of(cache)
    with pytest.raises(CacheFullError, match=r"needs 3 new blocks .* only 2 of 4 are free") as err:
        cache.append_batch([b, c], [4, 5])  # b's block alone would fit: the batch is all or nothing
    assert isinstance(err.value, RuntimeError)
    assert_same_state(before, state_of(cache))
    assert cache.seqlen(b) == cache.seqlen(c) == 0
    with pytest.raises(CacheFullError, match=r"appending 11 tokens .* needs 3 new blocks .* only 2 of 4 are free"):
        cache.append(a, 11)  # 6 + 11 = 17 tokens: 5 blocks, 3 new
    assert_same_state(before, state_of(cache))
    assert cache.append(a, 10).shape == (10,)  # 16 tokens exactly fill the 4 blocks
    assert cache.num_free_blocks == 0
    assert cache.append(a, 0).shape == (0,)
    with pytest.raises(CacheFullError, match="needs 1 new blocks"):
        cache.append(b, 1)


def test_freed_blocks_are_reused_when_the_cache_was_full():
    cache = PagedLatentCache(1, num_blocks=6, block_size=2, kv_lora_rank=R, rope_dim=P)
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.append_batch([a, b], [5, 6])
    assert cache.num_free_blocks == 0
    freed = cache.seq_blocks(a)
    cache.free(a)
    c = cache.add_sequence()
    slots = cache.append(c, 6)
    # handed out again most recently freed first (the class's contract), a freed sequence's blocks in its order
    assert cache.seq_blocks(c) == freed
    assert set((slots // 2).tolist()) == set(freed)


def test_sequence_ids():
    cache = PagedLatentCache(1, num_blocks=2, block_size=16, kv_lora_rank=R, rope_dim=P)
    assert cache.add_sequence(1) == 1
    auto = [cache.add_sequence() for _ in range(3)]
    assert len(set(auto + [1])) == 4
    assert cache.add_sequence(("user", 7)) == ("user", 7)
    with pytest.raises(ValueError, match="already"):
        cache.add_sequence(1)
    cache.free(1)
    assert cache.add_sequence(1) == 1
    assert len(cache) == 5
    with pytest.raises(KeyError, match="not a live sequence"):
        cache.append("nobody", 1)
    with pytest.raises(KeyError, match="'nobody' is not a live sequence"):
        cache.free("nobody")
    with pytest.raises(KeyError, match="'nobody' is not a live sequence"):
        cache.block_table([1, "nobody"])
    # an id that cannot be a live one's: a TypeError naming it (unhashable: was a KeyError); a tensor hashes by
    # identity, so torch.tensor(5) would never be found again by the value 5 or another tensor(5)
    for call in (lambda: cache.free([1]), lambda: cache.seqlen({}), lambda: cache.fork(["unhashable"])):
        with pytest.raises(TypeError, match="seq_id must be hashable"):
            call()
    with pytest.raises(TypeError, match="seq_id must be hashable by value"):
        cache.add_sequence(torch.tensor(5))
    with pytest.raises(TypeError, match="new_id must be hashable by value"):
        cache.fork(1, torch.tensor(6))
    with pytest.raises(ValueError, match="max_blocks must be below 2"):  # (torch's "Storage size ... overflowed")
        cache.block_table([1], max_blocks=2 ** 62)
    assert len(cache) == 5


def test_a_hand_built_batch_names_bad_seq_ids():
    """``LatentBatch(...)`` takes ``seq_ids`` as ``reserve`` does: a string is refused by name (list() made its
    characters two sequences 'a' and 'b'), as are None and an int (a bare "not iterable")."""
    cache = PagedLatentCache(1, num_blocks=2, block_size=4, kv_lora_rank=R, rope_dim=P)
    for seq_id in ("a", "b"):
        cache.add_sequence(seq_id)
        cache.append(seq_id, 1)
    slots = torch.tensor([0, 4])
    assert LatentBatch(cache, ["a", "b"], [1, 1], slots).seq_ids == ["a", "b"]
    for bad in ("ab", None, 5):
        with pytest.raises(TypeError, match="seq_ids"):
            LatentBatch(cache, bad, [1, 1], slots)


def test_bad_batches_change_nothing():
    cache = PagedLatentCache(1, num_blocks=4, block_size=2, kv_lora_rank=R, rope_dim=P)
    a = cache.add_sequence()
    cache.append(a, 3)
    before = state_of(cache)
    with pytest.raises(ValueError, match="more than once"):
        cache.append_batch([a, a], [1, 1])
    with pytest.raises(ValueError, match="num_tokens"):
        cache.append(a, -1)
    with pytest.raises(TypeError, match="num_tokens"):
        cache.append(a, 1.5)
    with pytest.raises(ValueError, match="disagree"):
        cache.append_batch([a], [1, 2])
    with pytest.raises(KeyError, match="'nobody' is not a live sequence"):
        cache.append_batch([a, "nobody"], [1, 1])
    with pytest.raises(TypeError, match="seq_ids"):
        cache.append_batch([[a]], [1])
    with pytest.raises(TypeError, match="num_tokens"):  # one int where a list of counts goes
        cache.append_batch([a], 1)
    with pytest.raises(TypeError, match="num_tokens"):
        cache.blocks_needed([a], 1)
    with pytest.raises(TypeError, match="seq_ids"):
        cache.append_batch(a, [1])
    with pytest.raises(TypeError, match="seq_id"):
        cache.add_sequence(["unhashable"])
    for call in (cache.cache_seqlens, cache.block_table):  # one id where a list goes ('int' is not iterable before)
        with pytest.raises(TypeError, match="seq_ids"):
            call(a)
    cache.add_sequence("ab"), cache.add_sequence("a"), cache.add_sequence("b")
    before = state_of(cache)
    for call in (cache.cache_seqlens, cache.block_table, lambda ids: cache.append_batch(ids, [1, 1]),
                 lambda ids: LatentBatch.reserve(cache, ids, [1, 1])):  # a string id was split into 'a' and 'b'
        with pytest.raises(TypeError, match="seq_ids"):
            call("ab")
    with pytest.raises(TypeError, match="seq_ids"):
        LatentBatch.reserve(cache, a, [1])
    with pytest.raises(TypeError, match="num_new_tokens"):
        LatentBatch.reserve(cache, [a], 1)
    with pytest.raises(TypeError, match="num_new_tokens"):  # a bad count inside the list (it said num_tokens)
        LatentBatch.reserve(cache, [a], [None])
    with pytest.raises(CacheFullError, match="not enough free cache blocks"):  # counted in ints: a float ceil raised OverflowError
        cache.append(a, 10 ** 400)
    assert_same_state(before, state_of(cache))


def test_reserve_once_write_each_layer(device):
    layers = 3
    cache = PagedLatentCache(layers, num_blocks=4, block_size=4, kv_lora_rank=R, rope_dim=P,
                             dtype=torch.float16, device=device)
    a, b = cache.add_sequence(), cache.add_sequence()
    slots = cache.append_batch([a, b], [3, 2])
    assert slots.device.type == torch.device(device).type and slots.dtype == torch.int64
    data = torch.randn(layers, 5, R + P).to(dtype=torch.float16, device=device)
    for layer in range(layers):
        cache.write(layer, slots, data[layer, :, :R], data[layer, :, R:])
    for layer in range(layers):
        kv, pe = cache.read(layer, a)
        assert torch.equal(kv, data[layer, :3, :R]) and torch.equal(pe, data[layer, :3, R:])
        kv, pe = cache.read(layer, b)
        assert torch.equal(kv, data[layer, 3:, :R]) and torch.equal(pe, data[layer, 3:, R:])
    assert torch.equal(cache.slots(a, 1, 3), slots[1:3])


def test_block_table_and_seqlens():
    cache = PagedLatentCache(1, num_blocks=8, block_size=4, kv_lora_rank=R, rope_dim=P)
    a, b, empty = cache.add_sequence(), cache.add_sequence(), cache.add_sequence()
    cache.append_batch([a, b], [9, 4])
    table = cache.block_table([b, empty, a])
    assert table.dtype == torch.int32 and table.shape == (3, 3)
    assert table[0].tolist() == cache.seq_blocks(b) + [0, 0]
    assert table[1].tolist() == [0, 0, 0]
    assert table[2].tolist() == cache.seq_blocks(a)
    assert cache.block_table([a], max_blocks=5, pad_id=-1)[0, 3:].tolist() == [-1, -1]
    with pytest.raises(ValueError, match="max_blocks"):
        cache.block_table([a], max_blocks=2)
    assert cache.block_table([empty]).shape == (1, 1)
    assert cache.cache_seqlens([b, empty, a]).tolist() == [4, 0, 9]
    assert cache.cache_seqlens([b]).dtype == torch.int32


def test_positions_and_table_arguments_are_checked():
    """slots' start/end and block_table's max_blocks/pad_id are ints: a float is refused, not truncated."""
    cache = PagedLatentCache(1, num_blocks=4, block_size=2, kv_lora_rank=R, rope_dim=P)
    a = cache.add_sequence()
    cache.append(a, 3)
    before = state_of(cache)
    for kwargs, error, name in [(dict(start=0.5, end=2), TypeError, "start"), (dict(end=2.0), TypeError, "end"),
                                (dict(start=True), TypeError, "start")]:
        with pytest.raises(error, match=name):
            cache.slots(a, **kwargs)
    for kwargs, error, name in [(dict(max_blocks=3.5), TypeError, "max_blocks"),
                                (dict(max_blocks=True), TypeError, "max_blocks"),
                                (dict(max_blocks=4, pad_id=1.5), TypeError, "pad_id"),
                                (dict(max_blocks=4, pad_id=2 ** 40), ValueError, "pad_id")]:
        with pytest.raises(error, match=name):
            cache.block_table([a], **kwargs)
    assert_same_state(before, state_of(cache))
    assert cache.slots(a, 1, 3).tolist() == cache.slots(a)[1:].tolist()
    assert cache.block_table([a], max_blocks=3, pad_id=-(2 ** 31))[0, 2].item() == -(2 ** 31)


def test_buffers_and_sizes():
    cache = PagedLatentCache(2, num_blocks=5, block_size=16, dtype=torch.bfloat16)
    assert cache.capacity_tokens == 80
    assert cache.bytes_per_token == 2 * (512 + 64) * 2
    assert cache.num_free_blocks == 5
    for layer in range(2):
        buf, kv, pe = cache.buffer(layer), cache.kv_cache(layer), cache.pe_cache(layer)
        assert buf.shape == (5, 16, 576) and kv.shape == (5, 16, 512) and pe.shape == (5, 16, 64)
        assert kv.data_ptr() == buf.data_ptr() and pe.data_ptr() == buf.data_ptr() + 512 * buf.element_size()
        assert kv.stride() == pe.stride() == buf.stride()
    assert cache.buffer(0).data_ptr() != cache.buffer(1).data_ptr()
    with pytest.raises(ValueError, match="layer"):
        cache.kv_cache(2)
    with pytest.raises(TypeError, match="layer"):
        cache.pe_cache("0")


# ---------------------------------------------------------------------------------------------
# fork: shared full blocks, a copied tail, counted frees
# ---------------------------------------------------------------------------------------------


def filled_cache(dtype, device, num_blocks=8, block_size=4, layers=2):
    """A cache with unused bytes poisoned (NaN in bf16; 0xFF bytes in fp8: NaN values and NaN scales), and a helper
    that appends ``n`` random tokens to a sequence in every layer and returns them ``[n, layers, R + P]``."""
    fp8 = dtype == torch.float8_e4m3fn
    r = 128 if fp8 else R  # an fp8 latent needs a multiple of 128
    cache = PagedLatentCache(layers, num_blocks=num_blocks, block_size=block_size, kv_lora_rank=r, rope_dim=P,
                             dtype=dtype, device=device)
    for layer in range(layers):
        cache.buffer(layer).fill_(255 if fp8 else float("nan"))
    gen = torch.Generator().manual_seed(5)

    def append(seq_id, n):
        slots = cache.append(seq_id, n)
        tokens = torch.randn(n, layers, r + P, generator=gen).to(dtype=torch.bfloat16, device=device)
        with torch_path():
            for layer in range(layers):
                cache.write(layer, slots, tokens[:, layer, :r], tokens[:, layer, r:])
        return tokens

    return cache, append


def contents(cache, seq_id):
    """Per layer, the sequence's (latent, rope key) as ``read`` gives them (fp8: dequantized), as int16 bits."""
    return [tuple(bits(t).cpu() for t in cache.read(layer, seq_id)) for layer in range(cache.num_layers)]


def assert_same_contents(a, b, what):
    for layer, ((kv_a, pe_a), (kv_b, pe_b)) in enumerate(zip(a, b)):
        assert torch.equal(kv_a, kv_b) and torch.equal(pe_a, pe_b), f"layer {layer}: {what}"


FORK_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


@pytest.mark.parametrize("free_order", ["source-first", "fork-first"])
@pytest.mark.parametrize("dtype", list(FORK_DTYPES.values()), ids=list(FORK_DTYPES))
def test_fork_shares_full_blocks_and_copies_the_tail(dtype, free_order, device):
    """10 tokens in blocks of 4: the fork shares the two full blocks and gets a copy of the 2-token tail (every
    layer; fp8: the uint8 rows, values and scales); both then grow apart; the blocks come back once each, the shared
    ones only with their last holder."""
    cache, append = filled_cache(dtype, device)
    a = cache.add_sequence("a")
    append(a, 10)
    blocks, version = cache.seq_blocks(a), cache._version
    before = contents(cache, a)

    f = cache.fork(a)
    assert isinstance(f, int) and f != a and cache.seq_ids == ["a", f]
    forked = cache.seq_blocks(f)
    assert forked[:2] == blocks[:2] and forked[2] not in blocks and cache.seq_blocks(a) == blocks
    assert cache.num_free_blocks == 8 - 4 and cache.seqlen(f) == 10 and cache._version > version
    assert_same_contents(contents(cache, f), before, "the fork holds other tokens")
    for layer in range(cache.num_layers):  # the tail's bytes themselves, not only what read gives back
        buf = bytes_of(cache.buffer(layer))
        assert torch.equal(buf[forked[2], :2], buf[blocks[2], :2])
    assert_allocator_consistent(cache)

    append(f, 3)  # fills the copied tail and starts a block of its own
    append(a, 1)
    assert_same_contents([(kv[:10], pe[:10]) for kv, pe in contents(cache, f)], before, "the fork's prefix changed")
    assert_same_contents([(kv[:10], pe[:10]) for kv, pe in contents(cache, a)], before, "the source's prefix changed")
    assert cache.seqlen(a) == 11 and cache.seqlen(f) == 13
    assert cache.seq_blocks(a)[:2] == cache.seq_blocks(f)[:2]
    assert_allocator_consistent(cache)

    g = cache.fork(f, "g")  # 13 tokens: a 1-token tail copied again, three full blocks shared by f and g
    assert g == "g" and cache.seq_blocks(g)[:3] == cache.seq_blocks(f)[:3]
    assert_same_contents(contents(cache, g), contents(cache, f), "the fork of a fork holds other tokens")
    # a: [0, 1, 2]; f: [0, 1, 3, 4]; g: [0, 1, 3, 5] (block ids as handed out): each holds one block alone
    first, second = (a, f) if free_order == "source-first" else (f, a)
    for seq_id in (first, second):
        own = cache.seq_blocks(seq_id)[-1]
        free_before = cache.num_free_blocks
        cache.free(seq_id)
        assert cache.num_free_blocks == free_before + 1 and cache._free[-1] == own, "not only its own block returned"
        assert_allocator_consistent(cache)
    assert cache.num_free_blocks == cache.num_blocks - 4
    cache.free(g)
    assert cache.num_free_blocks == cache.num_blocks and cache._refs == [0] * cache.num_blocks
    assert sorted(cache._free) == list(range(cache.num_blocks))
    h = cache.add_sequence()  # every block handed out once more, each once
    cache.append(h, cache.capacity_tokens)
    assert sorted(cache.seq_blocks(h)) == list(range(cache.num_blocks))


def test_fork_of_whole_blocks_takes_no_block_and_a_full_cache_changes_nothing():
    """A length that fills its blocks forks by sharing alone (even with no block free); a tail to copy with no
    block free raises CacheFullError before any count, id, byte or version changes."""
    cache, append = filled_cache(torch.bfloat16, "cpu", num_blocks=3)
    a, b = cache.add_sequence(), cache.add_sequence()
    append(a, 8)
    append(b, 3)
    assert cache.num_free_blocks == 0
    shared = cache.fork(a)
    assert cache.seq_blocks(shared) == cache.seq_blocks(a) and cache.num_free_blocks == 0
    before = state_of(cache)
    with pytest.raises(CacheFullError, match="copies 1 partly filled last blocks of 4 tokens, but only 0 of 3"):
        cache.fork(b, "b2")
    assert_same_state(before, state_of(cache))
    assert "b2" not in cache
    cache.free(a)  # the shared blocks stay with the fork
    assert cache.num_free_blocks == 0
    cache.free(shared)
    assert cache.num_free_blocks == 2
    assert_allocator_consistent(cache)
    empty = cache.add_sequence()
    assert cache.seq_blocks(cache.fork(empty)) == []


def test_fork_ids_are_checked_before_anything_changes():
    cache, append = filled_cache(torch.bfloat16, "cpu")
    a, b = cache.add_sequence("a"), cache.add_sequence("b")
    append(a, 5)
    before = state_of(cache)
    with pytest.raises(KeyError, match="not a live sequence"):
        cache.fork("nobody")
    with pytest.raises(TypeError, match="seq_id must be hashable"):
        cache.fork(["unhashable"])
    with pytest.raises(ValueError, match="new_id 'b' is already a live sequence"):
        cache.fork(a, "b")
    with pytest.raises(ValueError, match="new_id 'a'"):
        cache.fork(a, a)
    with pytest.raises(TypeError, match="new_id must be hashable"):
        cache.fork(a, ["unhashable"])
    assert_same_state(before, state_of(cache))
    cache.free(b)
    assert cache.fork(a, "b") == "b"  # a freed id is free again
    auto = cache.add_sequence(0)
    assert cache.fork(a) not in (auto, "a", "b")


def test_a_batch_reserved_before_a_fork_is_out_of_date():
    """The fork copied the tail as it was: writing a step reserved before it would reach one of the two only."""
    cache, append = filled_cache(torch.bfloat16, "cpu")
    a, other = cache.add_sequence(), cache.add_sequence()
    append(a, 3)
    stale = LatentBatch.reserve(cache, [a], [1])
    unrelated = LatentBatch.reserve(cache, [other], [2])
    cache.fork(a)
    with pytest.raises(ValueError, match="freed, forked or truncated"):
        stale.check_current()
    unrelated.check_current()  # a batch of other sequences stays valid


def test_a_batch_built_over_a_shared_block_is_refused():
    """Positions reserved (block filled) before a fork lie in a block the fork shares: a LatentBatch built for them
    afterwards, for either sequence, would write both sequences' token; refused. A block the fork copied is its own."""
    cache, append = filled_cache(torch.bfloat16, "cpu")  # 4-token blocks
    a = cache.add_sequence()
    append(a, 3)
    cache.append(a, 1)  # reserved, not written: the block is full
    b = cache.fork(a)
    for seq in (a, b):
        with pytest.raises(ValueError, match="a fork shares"):
            LatentBatch(cache, [seq], [1], cache.slots(seq, 3, 4))
    c = cache.add_sequence()
    append(c, 2)
    d = cache.fork(c)  # c's tail (2 of 4 tokens) copied into d's own block
    LatentBatch(cache, [d], [1], cache.slots(d, 1, 2))
    LatentBatch(cache, [c], [1], cache.slots(c, 1, 2))


def test_fork_batch_counts_the_blocks_its_frees_return():
    """The integration's reorder: free the unused rows and fork the others in one step, all or nothing; the blocks
    the frees return count toward the copies; forks of one source each get a copy of its tail (one index copy per
    layer)."""
    cache, append = filled_cache(torch.bfloat16, "cpu", num_blocks=6)
    a, b, c = cache.add_sequence(), cache.add_sequence(), cache.add_sequence()
    tokens = {a: append(a, 5), b: append(b, 2), c: append(c, 2)}  # 2 + 1 + 1 blocks, 2 free
    expected = contents(cache, a)
    assert cache._fork_blocks_needed([a, a, a], release=[b]) == 3 - 1
    before = state_of(cache)
    with pytest.raises(CacheFullError, match="only 3 of 6"):  # 4 tails; 2 free + b's block
        cache._fork_batch([a, a, a, c], release=[b])
    with pytest.raises(ValueError, match="release"):
        cache._fork_batch([a], release=[a])
    with pytest.raises(ValueError, match="more than once"):
        cache._fork_batch([a, a], new_ids=["x", "x"])
    assert_same_state(before, state_of(cache))
    new = cache._fork_batch([a, a, c], new_ids=[None, "x", None], release=[b])
    assert new[1] == "x" and len(set(new)) == 3 and b not in cache and cache.num_free_blocks == 0
    for f in new[:2]:
        assert cache.seq_blocks(f)[0] == cache.seq_blocks(a)[0]
        assert_same_contents(contents(cache, f), expected, "a fork holds other tokens")
    assert_same_contents(contents(cache, new[2]), contents(cache, c), "c's fork holds other tokens")
    assert torch.equal(bits(cache.read(0, new[2])[0]), bits(tokens[c][:, 0, :R]))
    assert_allocator_consistent(cache)


@pytest.mark.parametrize("dtype", list(FORK_DTYPES.values()), ids=list(FORK_DTYPES))
def test_grown_keeps_block_ids_contents_and_sharing(dtype, device):
    cache, append = filled_cache(dtype, device, num_blocks=4)
    a = cache.add_sequence()
    append(a, 6)
    f = cache.fork(a)
    old_state = state_of(cache)
    grown = cache._grown(7)
    assert_same_state(old_state, state_of(cache))  # the old cache is left as it was
    assert grown.num_blocks == 7 and grown.num_free_blocks == cache.num_free_blocks + 3
    assert grown.seq_ids == cache.seq_ids and grown._refs[:4] == cache._refs
    for s in (a, f):
        assert grown.seq_blocks(s) == cache.seq_blocks(s)
        assert_same_contents(contents(grown, s), contents(cache, s), f"{s}'s tokens moved")
    assert_allocator_consistent(grown)
    grown.append(f, 2)  # into its copied tail: the other cache's sequences are their own
    assert cache.seqlen(f) == 6
    with pytest.raises(ValueError, match="num_blocks"):
        cache._grown(3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
def test_a_cache_made_under_inference_mode_takes_writes_outside_it(dtype):
    """A cache outlives the mode it was made in: made under torch.inference_mode, its buffers were inference tensors,
    which refuse in-place writes outside that mode (the PyTorch path's write raised inside torch)."""
    kv, pe = torch.randn(3, 128), torch.randn(3, P, dtype=torch.bfloat16)
    with torch.inference_mode():
        cache = PagedLatentCache(1, 2, 4, 128, P, dtype=dtype, rope_dtype=torch.bfloat16 if dtype != torch.bfloat16
                                 else None)
        seq = cache.add_sequence()
    with torch_path(), torch.no_grad():
        cache.write(0, cache.append(seq, 3), kv.to(torch.bfloat16), pe)
        grown = cache._grown(3)
        grown.write(0, grown.append(seq, 1), kv[:1].to(torch.bfloat16), pe[:1])
    assert torch.equal(grown.views(0)[1][0, :4], torch.cat([pe, pe[:1]]))


@pytest.mark.parametrize("kwargs,error,name", [
    (dict(num_layers=0), ValueError, "num_layers"),
    (dict(num_blocks=0), ValueError, "num_blocks"),
    (dict(block_size=2.0), TypeError, "block_size"),
    (dict(kv_lora_rank=500), ValueError, "kv_lora_rank"),
    (dict(rope_dim=8), ValueError, "rope_dim"),
    (dict(dtype=torch.float64), TypeError, "dtype"),
    (dict(device="gpu0"), ValueError, "device"),
    (dict(device=3.5), TypeError, "device"),
], ids=["layers", "blocks", "block_size", "rank", "rope", "dtype", "device-name", "device-float"])
def test_constructor_checks(kwargs, error, name):
    args = dict(num_layers=1, num_blocks=2, block_size=4, kv_lora_rank=R, rope_dim=P)
    with pytest.raises(error, match=name):
        PagedLatentCache(**{**args, **kwargs})


def test_exported():
    assert mla_kernels.PagedLatentCache is PagedLatentCache
    assert mla_kernels.CacheFullError is CacheFullError
    assert {"PagedLatentCache", "CacheFullError"} <= set(mla_kernels.__all__)


def test_truncate_returns_blocks_and_copies_a_shared_tail():
    """10 tokens in blocks of 4, forked: truncating the source to 6 keeps its first block (shared), copies the
    2-token part of its second (shared with the fork, which will go on appending there) and leaves the fork alone;
    truncating to 4 then returns the copy. Errors change nothing; a batch reserved before is out of date."""
    cache, append = filled_cache(torch.bfloat16, "cpu")
    a = cache.add_sequence()
    append(a, 10)
    f = cache.fork(a)
    before_f = contents(cache, f)
    blocks = cache.seq_blocks(a)
    stale = LatentBatch.reserve(cache, [a], [0])
    cache.truncate(a, 6)
    now = cache.seq_blocks(a)
    assert now[0] == blocks[0] and now[1] != blocks[1] and now[1] not in cache.seq_blocks(f) and cache.seqlen(a) == 6
    assert_same_contents(contents(cache, a), [(kv[:6], pe[:6]) for kv, pe in before_f], "truncated tokens differ")
    assert_same_contents(contents(cache, f), before_f, "the fork changed")
    with pytest.raises(ValueError, match="out of date|freed, forked or truncated"):
        stale.check_current()
    free = cache.num_free_blocks
    cache.truncate(a, 4)
    assert cache.seq_blocks(a) == blocks[:1] and cache.num_free_blocks == free + 1
    assert_allocator_consistent(cache)
    before = state_of(cache)
    for length, error in [(5, ValueError), (-1, ValueError), (2.0, TypeError), ("2", TypeError)]:
        with pytest.raises(error, match="length"):
            cache.truncate(a, length)
    with pytest.raises(KeyError, match="'nobody' is not a live sequence"):
        cache.truncate("nobody", 0)
    assert_same_state(before, state_of(cache))
    cache.truncate(a, 0)
    assert cache.seq_blocks(a) == [] and cache.seqlen(a) == 0
    assert_allocator_consistent(cache)


def test_truncate_into_a_shared_tail_with_no_free_block_changes_nothing():
    cache, append = filled_cache(torch.bfloat16, "cpu", num_blocks=3)
    a = cache.add_sequence()
    append(a, 8)  # two full blocks
    cache.fork(a)  # shares both
    b = cache.add_sequence()
    append(b, 1)  # the last free block
    before = state_of(cache)
    with pytest.raises(CacheFullError, match="truncating"):
        cache.truncate(a, 6)
    assert_same_state(before, state_of(cache))
    cache.truncate(a, 4)  # to a block boundary: nothing to copy, the shared second block stays with the fork
    assert cache.num_free_blocks == 0
    assert_allocator_consistent(cache)


def test_truncate_copies_a_shared_tail_into_a_block_it_returns_when_the_cache_is_full():
    """A full cache: truncating a sequence frees its own last block and must copy its new, shared, partly filled
    last block; the block it frees is enough for that copy, so the call succeeds (the state machine's truncate rule
    allows this, but its random runs seldom reach a full cache with a shared tail and an own block past it)."""
    cache, append = filled_cache(torch.bfloat16, "cpu", num_blocks=4)
    a = cache.add_sequence()
    append(a, 8)  # two full blocks
    f = cache.fork(a)  # shares both
    append(a, 4)  # a third block, a's own
    b = cache.add_sequence()
    append(b, 1)  # the last free block
    assert cache.num_free_blocks == 0
    before_f, own = contents(cache, f), cache.seq_blocks(a)[2]
    assert cache._truncate_blocks_needed([a], [6]) <= 0
    cache.truncate(a, 6)  # returns block `own`, copies the 2 tokens of the shared second block into it
    assert cache.seq_blocks(a) == [cache.seq_blocks(f)[0], own] and cache.num_free_blocks == 0
    assert_same_contents(contents(cache, a), [(kv[:6], pe[:6]) for kv, pe in before_f], "truncated tokens differ")
    assert_same_contents(contents(cache, f), before_f, "the fork changed")
    assert_allocator_consistent(cache)



@pytest.mark.parametrize("how", ["pickle", "torch.save", "deepcopy"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_a_saved_and_loaded_cache_keeps_its_views_on_its_buffers(dtype, how):
    """pickle / torch.save / deepcopy of a PagedLatentCache (a patched model's Cache pickles with it): the copy's
    views must be views of its own buffers, as the original's are. Plain pickle saved the views beside the buffers
    and loaded them as separate copies: writes went to the views, while fork and truncate copy tails in the
    buffers, so a fork of the loaded cache read zeros in its last block. An fp8 cache (views of other dtypes than
    its uint8 buffer) failed to load from pickle and to save with torch.save."""
    r, p = 128, 16  # (an fp8 latent needs R a multiple of 128)
    rope_dtype = torch.bfloat16
    cache = PagedLatentCache(2, 6, 4, r, p, dtype=dtype)
    a = cache.add_sequence("a")
    gen = torch.Generator().manual_seed(1)
    for layer in range(2):
        cache.write(layer, cache.slots(a) if layer else cache.append(a, 6),
                    torch.randn(6, r, generator=gen).to(rope_dtype), torch.randn(6, p, generator=gen).to(rope_dtype))
    loaded = round_trip(cache, how)
    for layer in range(2):
        buffer = loaded.buffer(layer)
        assert bytes_of(buffer).data_ptr() != bytes_of(cache.buffer(layer)).data_ptr()
        assert torch.equal(bytes_of(buffer), bytes_of(cache.buffer(layer)))
        for view in loaded.views(layer):
            if view is not None:
                assert view.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr(), "a view of a copy"
    # a write after the load lands in the buffer, and a fork (its partly filled last block copied in the buffers)
    # reads what its source holds, the new token included
    loaded.write(0, loaded.append(a, 1), torch.ones(1, r, dtype=rope_dtype), torch.ones(1, p, dtype=rope_dtype))
    fork = loaded.fork(a)
    for layer in range(2):
        for got, want in zip(loaded.read(layer, fork), loaded.read(layer, a)):
            assert torch.equal(got, want), f"layer {layer}: the fork's tokens differ from its source's"
    assert torch.equal(loaded.read(0, a)[0][-1], torch.ones(r, dtype=rope_dtype))
    assert cache.seqlen(a) == 6  # the original goes on alone
