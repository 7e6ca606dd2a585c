"""Block-manager invariants: a prefix-cache hit only ever serves K/V computed after the very same prefix."""

from cubelm.engine.block_manager import BlockManager
from cubelm.engine.params import SamplingParams
from cubelm.engine.sequence import Sequence


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
