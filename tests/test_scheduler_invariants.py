"""Scheduler and block-manager invariants under random traffic: a fake model, no tensors.

Requests arrive (many sharing prefixes, some with n > 1), decode, finish, get aborted and preempted in small
pools; the fake model runs each scheduled chunk by writing into a shadow KV array, per slot, the exact context its
K/V would encode (the whole prefix up to that position, interned to an id). After every step each running
sequence must read back its own prefix at every computed position: a prefix-cache hit on other tokens (or on
equal tokens after another prefix), a write into a shared or cached block, or a stale block table all break that.
Every step also checks the token budget, max_num_seqs, the lookahead rules, and the pool's bookkeeping (reference
counts = block tables holding the block, free list = blocks nobody holds); once every request has ended the
pool must be whole. Some setups use a 3-bit block hash, so prefix-cache hits rest on their verification alone;
the last tests pin that verification directly. Multi-LoRA setups give requests random adapters: K/V then encode
the adapter too (a hit across adapters reads another context), and the running sequences never use more than
``max_loras`` adapters.
"""

import itertools
import random
from collections import Counter
from dataclasses import dataclass

import pytest

from cubelm.engine.block_manager import BlockManager
from cubelm.engine.params import SamplingParams
from cubelm.engine.scheduler import ScheduledBatch, Scheduler
from cubelm.engine.sequence import Sequence, Status

VOCAB = 5  # tiny: equal blocks after different prefixes are common


class CollidingBlockManager(BlockManager):
    """Three-bit block hashes: collisions are the rule, so only the verification on a hit keeps K/V right."""

    @staticmethod
    def hash_block(parent_hash, token_ids):
        return hash((-1 if parent_hash is None else parent_hash, token_ids)) % 8  # hash(None) varies by process


@dataclass(frozen=True)
class Setup:
    num_blocks: int = 12
    block_size: int = 4
    max_num_seqs: int = 6
    max_num_batched_tokens: int = 10
    enable_prefix_caching: bool = True
    lookahead: int = 0  # speculative decoding: up to this many draft slots per decode
    colliding_hashes: bool = False
    arrival_rate: float = 0.35  # new requests per step
    num_loras: int = 0  # requests pick one of this many adapters, or the base model
    max_loras: int | None = None


@dataclass(frozen=True, eq=False)
class FakeAdapter:
    lora_id: int


class FakeEngine:
    """Drives Scheduler + BlockManager like LLMEngine.step() does, with a fake model and fake proposer."""

    def __init__(self, setup: Setup, rng: random.Random):
        self.setup, self.rng = setup, rng
        manager = CollidingBlockManager if setup.colliding_hashes else BlockManager
        self.block_manager = manager(setup.num_blocks, setup.block_size,
                                     enable_prefix_caching=setup.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs=setup.max_num_seqs,
                                   max_num_batched_tokens=setup.max_num_batched_tokens,
                                   lookahead=self._lookahead if setup.lookahead else None,
                                   max_loras=setup.max_loras)
        self.adapters = [FakeAdapter(i + 1) for i in range(setup.num_loras)]
        self.kv: dict[int, int] = {}  # slot -> context id of the K/V written there
        self.contexts: dict[tuple[int, int], int] = {}  # (parent context, token) -> context id
        self.requests: dict[str, list[Sequence]] = {}
        self.ids = itertools.count()
        self.prefixes = [self._tokens(rng.randint(2, 3 * setup.block_size)) for _ in range(3)]
        self.num_drafts = 0

    def _tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(VOCAB) for _ in range(n)]

    def _lookahead(self, seq: Sequence) -> int:
        return self.rng.randint(0, self.setup.lookahead)

    def context_ids(self, token_ids: list[int], lora_id: int = 0) -> list[int]:
        out, parent = [], -1 - lora_id  # the same tokens under another adapter are another context
        for token in token_ids:
            parent = self.contexts.setdefault((parent, token), len(self.contexts))
            out.append(parent)
        return out

    def slot(self, seq: Sequence, position: int) -> int:
        bs = self.setup.block_size
        return seq.block_table[position // bs] * bs + position % bs

    # ---- traffic --------------------------------------------------------------------------------------------
    def add_request(self) -> None:
        rng, bs = self.rng, self.setup.block_size
        prompt = (rng.choice(self.prefixes) if rng.random() < 0.7 else []) + self._tokens(rng.randint(1, 2 * bs))
        capacity = self.setup.num_blocks * bs  # like LLMEngine._validate: one sequence fits the pool
        prompt = prompt[:capacity - 1]
        max_tokens = rng.randint(1, min(3 * bs, capacity - len(prompt)))
        params = SamplingParams(n=rng.choice([1, 1, 1, 2, 3]), max_tokens=max_tokens)
        request_id = str(next(self.ids))
        lora = rng.choice([None, *self.adapters])
        seqs: list[Sequence] = []
        for i in range(params.n):
            seqs.append(Sequence(request_id, i, prompt, params, parent=seqs[0] if seqs else None, lora=lora))
            self.scheduler.add(seqs[-1])
        self.requests[request_id] = seqs

    def abort_request(self) -> None:
        live = [rid for rid, seqs in self.requests.items() if not all(s.is_finished for s in seqs)]
        if live:
            for seq in self.requests[self.rng.choice(live)]:
                self.scheduler.finish(seq, "abort")

    def next_token(self, seq: Sequence) -> int:
        # mostly a deterministic "greedy model": equal prompts continue equally, so outputs get cache hits too
        if self.rng.random() < 0.8:
            return hash(tuple(seq.token_ids[-3:])) % VOCAB
        return self.rng.randrange(VOCAB)

    # ---- the step ---------------------------------------------------------------------------------------------
    def step(self) -> ScheduledBatch:
        batch = self.scheduler.schedule()
        self.check_batch(batch)
        for seq, n, k in zip(batch.seqs, batch.num_new_tokens, batch.num_lookahead_tokens):
            self.run_row(seq, n, k)
        self.check_state()
        return batch

    def run_row(self, seq: Sequence, n: int, k: int) -> None:
        start = seq.num_computed_tokens
        drafts = [self.next_token(seq) if self.rng.random() < 0.5 else self.rng.randrange(VOCAB)
                  for _ in range(self.rng.randint(0, k))]
        self.num_drafts += len(drafts)
        seq.token_ids.extend(drafts)
        self.write_kv(seq, start, start + n + len(drafts))
        del seq.token_ids[len(seq.token_ids) - len(drafts):]
        if drafts:  # like LLMEngine._verify: keep a prefix of the drafts and one more token
            accepted = self.rng.randint(0, len(drafts))
            for token in drafts[:accepted] + [self.next_token(seq)]:
                if not self.append_token(seq, token):
                    return
            seq.num_computed_tokens = start + accepted + 1
            self.block_manager.commit(seq)
            return
        seq.num_computed_tokens += n
        self.block_manager.commit(seq)
        if seq.num_computed_tokens == seq.num_tokens:
            self.append_token(seq, self.next_token(seq))

    def write_kv(self, seq: Sequence, start: int, end: int) -> None:
        contexts = self.context_ids(seq.token_ids[:end], seq.lora_id)
        for p in range(start, end):
            block = self.block_manager.blocks[seq.block_table[p // self.setup.block_size]]
            assert block.ref_count == 1 and block.block_hash is None, \
                f"seq {seq.request_id}.{seq.index} writes position {p} into shared or cached block {block}"
            self.kv[self.slot(seq, p)] = contexts[p]

    def append_token(self, seq: Sequence, token: int) -> bool:
        """Append (or stop); False once the sequence finished."""
        if self.rng.random() < 0.04:
            self.scheduler.finish(seq, "stop")
            return False
        seq.token_ids.append(token)
        if seq.num_output_tokens >= seq.params.max_tokens:
            self.scheduler.finish(seq, "length")
            return False
        return True

    # ---- invariants -------------------------------------------------------------------------------------------
    def check_batch(self, batch: ScheduledBatch) -> None:
        s, bs = self.setup, self.setup.block_size
        assert batch.num_tokens <= s.max_num_batched_tokens
        assert len(batch) <= s.max_num_seqs and len(self.scheduler.running) <= s.max_num_seqs
        assert len(set(map(id, batch.seqs))) == len(batch)
        assert len(batch) > 0 or not self.scheduler.has_work(), "work left but nothing scheduled"
        for seq, n, k in zip(batch.seqs, batch.num_new_tokens, batch.num_lookahead_tokens):
            assert seq.status is Status.RUNNING and 1 <= n <= seq.num_uncomputed_tokens
            assert k == 0 or n == seq.num_uncomputed_tokens == 1, "lookahead for a chunk that is not a decode"
            assert len(seq.block_table) * bs >= seq.num_computed_tokens + n + k, "slots not reserved"
        if s.max_loras is not None:
            assert len({q.lora_id for q in self.scheduler.running} - {0}) <= s.max_loras, "more adapters than slots"
        scheduled = set(map(id, batch.seqs))
        for seq in batch.preempted:
            assert id(seq) not in scheduled and seq.status is Status.WAITING and not seq.block_table

    def check_state(self) -> None:
        bm, sched, bs = self.block_manager, self.scheduler, self.setup.block_size
        seqs = [s for group in self.requests.values() for s in group]
        live = [s for s in seqs if not s.is_finished]
        queued = [*sched.running, *sched.waiting]
        assert len(set(map(id, queued))) == len(queued) and set(map(id, queued)) == set(map(id, live))
        holders = Counter()
        for seq in seqs:
            assert len(set(seq.block_table)) == len(seq.block_table)
            assert not (seq.is_finished and seq.block_table), "a finished sequence holds blocks"
            holders.update(seq.block_table)
        for block in bm.blocks:
            assert block.ref_count == holders[block.block_id], f"block {block} held by {holders[block.block_id]}"
        assert set(bm.free) == {b.block_id for b in bm.blocks if b.ref_count == 0}
        assert all(bm.blocks[b].block_hash == h for h, b in bm.hash_to_block.items())
        for seq in sched.waiting:
            assert seq.status is Status.WAITING and not seq.block_table and seq.num_computed_tokens == 0
        for seq in sched.running:
            assert seq.status is Status.RUNNING and seq.num_computed_tokens < seq.num_tokens
            assert len(seq.block_table) * bs >= seq.num_computed_tokens
            contexts = self.context_ids(seq.token_ids, seq.lora_id)
            for p in range(seq.num_computed_tokens):
                assert self.kv.get(self.slot(seq, p)) == contexts[p], \
                    f"seq {seq.request_id}.{seq.index} reads another context at position {p}"


def simulate(setup: Setup, seed: int, num_steps: int = 250) -> FakeEngine:
    rng = random.Random(seed)
    engine = FakeEngine(setup, rng)
    for _ in range(num_steps):
        if rng.random() < setup.arrival_rate:
            engine.add_request()
        if rng.random() < 0.03:
            engine.abort_request()
        engine.step()
    for _ in range(20 * num_steps):  # drain: no more arrivals
        if not engine.scheduler.has_work():
            break
        engine.step()
    assert not engine.scheduler.has_work()
    engine.block_manager.check_whole()
    return engine


SETUPS = {
    "prefix-cache": Setup(),
    "no-prefix-cache": Setup(enable_prefix_caching=False),
    "colliding-hashes": Setup(colliding_hashes=True),
    "lookahead": Setup(lookahead=3),
    "lookahead-colliding": Setup(lookahead=4, colliding_hashes=True, max_num_batched_tokens=7),
    "roomy": Setup(num_blocks=40, max_num_seqs=12, max_num_batched_tokens=24, lookahead=2),
    "one-token-budget": Setup(num_blocks=6, max_num_batched_tokens=1, max_num_seqs=3, arrival_rate=0.06),
    "two-token-budget": Setup(num_blocks=6, max_num_batched_tokens=2, max_num_seqs=3, lookahead=2, arrival_rate=0.1),
    "multi-lora": Setup(num_loras=3, max_loras=2),
    "multi-lora-colliding": Setup(num_loras=4, max_loras=2, colliding_hashes=True, lookahead=2),
}


@pytest.mark.parametrize("name", SETUPS)
def test_scheduler_and_block_manager_invariants(name):
    setup = SETUPS[name]
    engines = [simulate(setup, seed) for seed in range(8)]
    # the traffic exercises what the invariants are about
    if name not in ("roomy", "one-token-budget"):  # a big pool; one sequence at a time
        assert sum(e.scheduler.num_preemptions for e in engines) > 0
    if setup.enable_prefix_caching:
        assert sum(e.block_manager.prefix_hits for e in engines) > 0
    if setup.lookahead:
        assert sum(e.num_drafts for e in engines) > 0


def admit(bm: BlockManager, token_ids: list[int]) -> Sequence:
    seq = Sequence("r", 0, token_ids, SamplingParams())
    bm.allocate_prefix(seq)
    bm.append(seq, seq.num_uncomputed_tokens)
    return seq


def compute(bm: BlockManager, seq: Sequence, num_tokens: int) -> Sequence:
    seq.num_computed_tokens = num_tokens
    bm.commit(seq)
    return seq


def test_prefix_hit_needs_the_same_prefix_not_only_the_same_block():
    class TokensOnly(BlockManager):  # the worst chained hash: a block's own tokens, whatever precedes them
        hash_block = staticmethod(lambda parent_hash, token_ids: hash(token_ids))

    bm = TokensOnly(num_blocks=8, block_size=4)
    a = compute(bm, admit(bm, [1, 2, 3, 4, 5, 6, 7, 8, 9]), 9)
    # a's second block holds 5..8 after 1..4: as the first block of another prompt its K/V would be wrong
    b = compute(bm, admit(bm, [5, 6, 7, 8, 9]), 5)
    assert b.num_cached_tokens == 0 and not set(a.block_table) & set(b.block_table)
    c = compute(bm, admit(bm, [1, 2, 3, 4, 1, 2, 3, 4, 9]), 9)  # nor may a's first block serve as a second one
    assert c.num_cached_tokens == 4 and c.block_table[0] == a.block_table[0] != c.block_table[1]
    d = admit(bm, [1, 2, 3, 4, 5, 6, 7, 8, 0])
    assert d.num_cached_tokens == 8 and d.block_table[:2] == a.block_table[:2]
    for seq in (a, b, c, d):
        bm.free_seq(seq)
    bm.check_whole()


def test_a_prefix_computed_twice_at_once_stays_cached():
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(1, 14))
    a, b = admit(bm, prompt), admit(bm, prompt)  # admitted together: neither finds the other's blocks
    compute(bm, a, 4)
    compute(bm, b, 12)  # b overtakes a: its second block follows its own first block, not the cached one (a's)
    compute(bm, admit(bm, prompt), 12)
    # whichever blocks served or filled that request, the next one finds the whole prefix: no seam of misses
    assert admit(bm, prompt).num_cached_tokens == 12
