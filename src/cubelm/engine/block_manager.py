"""Paged KV cache bookkeeping: fixed-size blocks, block tables, reference counts and prefix caching.

A full block is found by a chained hash ``hash((parent_hash, its token ids))``: equal prefixes, equal hashes. A
hit is verified exactly, since a collision must never serve wrong K/V (nor let a crafted prompt read another
request's): the block must hold the same token ids *and* follow the very block matched just before (its parent
when its K/V were computed, not reallocated since), so by induction its whole prefix is equal; a collision costs
at most a miss. Lookups walk from the first block, so each hash registers a block of that one reachable chain.
Freed blocks keep their contents and hash and sit in an LRU list: a later request with the same prefix revives
them; allocation takes the least recently freed block and forgets its hash. Pure Python, no tensors: the runner
owns the K/V memory, this class only decides which slots a sequence uses.

K/V depend on the adapter a sequence runs with (multi-LoRA), so the chain of a sequence on an adapter starts from
that adapter's root hash instead of None, and every cached block remembers its adapter's id (0 = base), which a
hit must match too: one adapter's blocks are never reused for another adapter or for the base.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from cubelm.engine.sequence import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] | None = None
    parent: tuple[int, int] | None = None  # (block id, generation) of the block before it; None: the first block
    generation: int = 0  # bumped whenever the block is allocated afresh (its old contents are gone)
    lora_id: int = 0  # the adapter its K/V were computed under (0 = the base model)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True):
        self.block_size, self.enable_prefix_caching = block_size, enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # front = LRU
        self.hash_to_block: dict[int, int] = {}
        self.prefix_queries = self.prefix_hits = 0  # in tokens, for metrics

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    # ---- prefix cache ----------------------------------------------------------------------------------------
    @staticmethod
    def hash_block(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
        """The chained hash of a full block (tests override it with a colliding one)."""
        return hash((parent_hash, token_ids))

    @staticmethod
    def root_hash(lora_id: int) -> int | None:
        """The parent hash of a sequence's first block: None for the base model, the adapter's own otherwise."""
        return None if lora_id == 0 else hash(("lora", lora_id))

    def _chain(self, token_ids: list[int], num_blocks: int, lora_id: int) -> list[tuple[int, tuple[int, ...]]]:
        out, parent, bs = [], self.root_hash(lora_id), self.block_size
        for i in range(num_blocks):
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            parent = self.hash_block(parent, tokens)
            out.append((parent, tokens))
        return out

    def allocate_prefix(self, seq: Sequence) -> None:
        """Admit a waiting sequence: reuse cached blocks for the longest matching prefix of its tokens.

        At least one token is left to compute (its logits are needed), and the block holding it is never a shared
        one, so a sequence only ever writes into blocks it owns alone.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return
        max_blocks = (seq.num_tokens - 1) // self.block_size
        self.prefix_queries += seq.num_tokens
        parent = None
        for block_hash, tokens in self._chain(seq.token_ids, max_blocks, seq.lora_id):
            block_id = self.hash_to_block.get(block_hash)
            if block_id is None or not self._holds(block_id, parent, tokens, seq.lora_id):
                break
            self._ref(block_id)
            seq.block_table.append(block_id)
            parent = self._identity(block_id)
        seq.num_computed_tokens = seq.num_cached_tokens = len(seq.block_table) * self.block_size
        self.prefix_hits += seq.num_cached_tokens

    def _identity(self, block_id: int) -> tuple[int, int]:
        return block_id, self.blocks[block_id].generation

    def _holds(self, block_id: int, parent: tuple[int, int] | None, tokens: tuple[int, ...], lora_id: int) -> bool:
        """Whether the cached block holds K/V of ``tokens`` right after the verified prefix ending at ``parent``,
        computed under the adapter ``lora_id``."""
        block = self.blocks[block_id]
        return block.token_ids == tokens and block.parent == parent and block.lora_id == lora_id

    def commit(self, seq: Sequence) -> None:
        """Register the hashes of the sequence's blocks that became full (call after their K/V are written).

        Incremental: ``seq.block_hashes`` caches the chain, so each step hashes only newly filled blocks."""
        if not self.enable_prefix_caching:
            return
        num_full, bs = seq.num_computed_tokens // self.block_size, self.block_size
        del seq.block_hashes[num_full:]  # after a rollback (speculative decoding) or a preemption
        chain_hash = seq.block_hashes[-1] if seq.block_hashes else self.root_hash(seq.lora_id)
        for i in range(len(seq.block_hashes), num_full):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            chain_hash = self.hash_block(chain_hash, tokens)
            seq.block_hashes.append(chain_hash)
            block = self.blocks[seq.block_table[i]]
            if block.block_hash is None:
                block.block_hash, block.token_ids, block.lora_id = chain_hash, tokens, seq.lora_id
                block.parent = self._identity(seq.block_table[i - 1]) if i else None
                self._register(block)

    def _register(self, block: Block) -> None:
        """Make a newly full block the one its hash finds, if lookups can reach it and the block there now cannot.

        A prefix computed twice at once (two requests admitted together, or one preempted while the other went on)
        fills two chains of equal blocks; registering whichever committed first at each depth would mix them, and
        the parent check would then miss at the seam for good. Following the reachable chain avoids that."""
        if not self._reachable(block.parent):
            return
        current = self.hash_to_block.get(block.block_hash)
        if current is None or not self._reachable(self.blocks[current].parent):
            self.hash_to_block[block.block_hash] = block.block_id

    def _reachable(self, parent: tuple[int, int] | None) -> bool:
        """Whether a lookup can get past ``parent``: it is the block its hash finds and still holds its contents."""
        if parent is None:
            return True
        block_id, generation = parent
        block = self.blocks[block_id]
        return block.generation == generation and self.hash_to_block.get(block.block_hash) == block_id

    # ---- allocation --------------------------------------------------------------------------------------------
    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def append(self, seq: Sequence, num_new_tokens: int) -> None:
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            block_id, _ = self.free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:  # evict: its contents are about to be overwritten
                if self.hash_to_block.get(block.block_hash) == block_id:
                    del self.hash_to_block[block.block_hash]
                block.block_hash = block.token_ids = block.parent = None
                block.lora_id = 0
            block.generation += 1  # cached blocks that followed it no longer follow these contents
            block.ref_count = 1
            seq.block_table.append(block_id)

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def free_seq(self, seq: Sequence) -> None:
        """Drop the sequence's references; blocks reaching zero go to the LRU end (tail first, so a shared
        prefix's head blocks stay cached longest)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0
            if block.ref_count == 0:
                if block.block_hash is None:
                    self.free[block_id] = None
                    self.free.move_to_end(block_id, last=False)  # uncached blocks are reused first
                else:
                    self.free[block_id] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def check_whole(self) -> None:
        """Invariant once nothing runs: every block is free and no reference is left."""
        leaked = [b.block_id for b in self.blocks if b.ref_count]
        assert not leaked and self.num_free_blocks == self.num_blocks, f"leaked blocks {leaked[:8]}"
