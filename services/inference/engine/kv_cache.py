"""The engine's paged KV cache: preallocated key/value tensors cut into fixed-size blocks.

Every layer's keys and values live in one tensor of `num_blocks * block_size` slots; a sequence
owns a block table (logical block i -> physical block), so sequences of any length share the
pool without fragmentation and a finished sequence returns its blocks at once. The pool is sized
from a memory budget in bytes.

Prefix caching: a block whose `block_size` tokens are all computed is registered under a hash of
its tokens chained with the hash of the block before it, so equal hashes mean equal prefixes. A
new sequence whose prompt starts with registered blocks shares them (reference counted) instead
of recomputing them. Freed registered blocks stay reusable until the pool needs them back, oldest
first (LRU). A salt starts the chain where equal tokens give different keys and values (a LoRA
adapter), so such sequences never share blocks.

Sliding window (`window`): a query attends to the last `window` tokens only, so once a block lies
wholly before the window of the next token to compute, no query can read it again: `slide` releases
it (into the prefix cache when registered) and its table entry becomes block 0, which attention
reads but masks. A long sequence then holds about window / block_size + 1 blocks, however long.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from libs.common.errors import InvalidArgument, ResourceExhausted


@dataclass
class KVCacheConfig:
    block_size: int = 16
    """Tokens per block."""
    memory_bytes: int = 512 * 2**20
    """Budget for the keys and values of every layer; sets the number of blocks."""
    num_blocks: int | None = None
    """Exact number of blocks, overriding memory_bytes (tests, planners)."""
    prefix_caching: bool = True
    """Reuse the cached blocks of a shared prompt prefix."""


@dataclass(frozen=True)
class CacheShape:
    """What one token costs in the cache, read from a model config."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: PretrainedConfig) -> CacheShape:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(config.num_hidden_layers, kv_heads, head_dim)

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype.itemsize


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    """A collision-resistant key for a full block given everything before it."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockPool:
    """Bookkeeping of physical blocks: free list, reference counts, prefix-hash index, LRU eviction."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # popped from the end: block 0 first
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # registered, unreferenced; oldest first

    @property
    def num_available(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_available

    def allocate(self) -> int:
        if self._free:
            block = self._free.pop()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
        else:
            raise ResourceExhausted("the KV cache is full")
        self._refs[block] = 1
        return block

    def release(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block] == 0:
            if block in self._hash_of:
                self._evictable[block] = None
            else:
                self._free.append(block)

    def retain(self, block: int) -> None:
        """Take one more reference on a block in use (a forked sequence shares it)."""
        self._refs[block] += 1

    def lookup(self, key: bytes) -> int | None:
        """Take a reference on the block registered under `key`, if any."""
        block = self._block_of.get(key)
        if block is not None:
            self._refs[block] += 1
            self._evictable.pop(block, None)
        return block

    def register(self, block: int, key: bytes) -> None:
        if key not in self._block_of and block not in self._hash_of:
            self._block_of[key] = block
            self._hash_of[block] = key


@dataclass
class BlockTable:
    """One sequence's blocks and the hashes of its leading full, registered blocks."""

    blocks: list[int]
    hashes: list[bytes]
    freed: int = 0
    """Leading blocks released because they fell out of the sliding window (their entries read block 0)."""


class KVCache:
    """Per-layer key/value slots plus the block tables of the sequences that use them."""

    def __init__(
        self,
        model_config: PretrainedConfig,
        config: KVCacheConfig,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        window: int | None = None,
    ) -> None:
        """`window`: the sliding window of the model's attention in tokens, whose older blocks `slide` frees."""
        self.config = config
        self.window = window
        self.block_size = config.block_size
        self.shape = CacheShape.of(model_config)
        per_block = self.shape.bytes_per_token(dtype) * self.block_size
        num_blocks = config.num_blocks if config.num_blocks is not None else config.memory_bytes // per_block
        if config.block_size < 1 or num_blocks < 1:
            raise InvalidArgument(
                f"the KV cache budget holds no block of {config.block_size} tokens ({per_block} bytes)",
                field="kv_cache",
            )
        self.pool = BlockPool(num_blocks)
        slots = num_blocks * self.block_size
        s = self.shape
        # A tensor per layer, [slots, kv_heads, head_dim]: slot = block * block_size + offset. Separate
        # tensors, not views of one, so a compiled step can write a layer's slots in place.
        shape = (slots, s.num_kv_heads, s.head_dim)
        self.key = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(s.num_layers)]
        self.value = [torch.zeros_like(k) for k in self.key]
        self._tables: dict[str, BlockTable] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by live sequences (cached free blocks count as free)."""
        return self.pool.num_used / self.num_blocks

    def blocks(self, seq_id: str) -> list[int]:
        return self._tables[seq_id].blocks if seq_id in self._tables else []

    def blocks_needed(self, seq_id: str, num_tokens: int) -> int:
        """How many new blocks the sequence needs to hold `num_tokens` tokens in all."""
        have = len(self.blocks(seq_id))
        return max(0, -(-num_tokens // self.block_size) - have)

    def can_allocate(self, seq_id: str, num_tokens: int) -> bool:
        return self.blocks_needed(seq_id, num_tokens) <= self.pool.num_available

    def allocate(self, seq_id: str, num_tokens: int) -> None:
        """Grow the sequence's table to hold `num_tokens` tokens; all or nothing."""
        needed = self.blocks_needed(seq_id, num_tokens)
        if needed > self.pool.num_available:
            raise ResourceExhausted(f"the KV cache has no room for {needed} more blocks")
        table = self._tables.setdefault(seq_id, BlockTable([], []))
        table.blocks.extend(self.pool.allocate() for _ in range(needed))

    def match_prefix(self, seq_id: str, token_ids: list[int], salt: bytes = b"") -> int:
        """Share the cached blocks of the longest cached prefix; returns the tokens they cover.

        At least one token is always left to compute, since its logits start the generation.
        """
        if not self.config.prefix_caching or seq_id in self._tables:
            return 0
        table = self._tables[seq_id] = BlockTable([], [])
        parent = salt
        for i in range((len(token_ids) - 1) // self.block_size):
            key = block_hash(parent, token_ids[i * self.block_size : (i + 1) * self.block_size])
            block = self.pool.lookup(key)
            if block is None:
                break
            table.blocks.append(block)
            table.hashes.append(key)
            parent = key
        return len(table.blocks) * self.block_size

    def commit(self, seq_id: str, token_ids: list[int], num_computed: int, salt: bytes = b"") -> None:
        """Register the sequence's blocks that became full with computed tokens."""
        if not self.config.prefix_caching:
            return
        table = self._tables[seq_id]
        for i in range(len(table.hashes), num_computed // self.block_size):
            parent = table.hashes[-1] if table.hashes else salt
            key = block_hash(parent, token_ids[i * self.block_size : (i + 1) * self.block_size])
            self.pool.register(table.blocks[i], key)
            table.hashes.append(key)

    def fork(self, parent: str, child: str, num_tokens: int) -> bool:
        """Give `child` the cached keys/values of `parent`'s first `num_tokens` tokens (beam search).

        Full blocks are shared, reference counted: no sequence writes into a full block again. The
        partial last block is copied, since parent and child each write their next token into it.
        False, with nothing changed, when the pool has no block for that copy.
        """
        table = self._tables.get(parent, BlockTable([], []))
        full, partial = divmod(num_tokens, self.block_size)
        if partial and self.pool.num_available == 0:
            return False
        shared = table.blocks[:full]
        for block in shared[table.freed :]:
            self.pool.retain(block)
        forked = self._tables[child] = BlockTable(list(shared), table.hashes[:full], min(table.freed, full))
        if partial:
            copy = self.pool.allocate()
            offsets = torch.arange(partial)
            src, dst = table.blocks[full] * self.block_size + offsets, copy * self.block_size + offsets
            for layer in (*self.key, *self.value):
                layer[dst] = layer[src]  # [partial, kv_heads, head_dim]
            forked.blocks.append(copy)
        return True

    def free(self, seq_id: str) -> None:
        table = self._tables.pop(seq_id, None)
        if table is not None:
            for block in reversed(table.blocks[table.freed :]):  # the tail is evicted before the prefix it extends
                self.pool.release(block)

    def slide(self, seq_id: str, num_computed: int) -> None:
        """Release the sequence's blocks that the sliding window has left behind for good.

        The next token to compute sits at position `num_computed` and reads keys from
        `num_computed - window + 1` on; later tokens read less. Full blocks ending before that go.
        """
        table = self._tables.get(seq_id)
        if self.window is None or table is None:
            return
        gone = min(max(0, num_computed - self.window + 1) // self.block_size, len(table.blocks))
        for i in range(table.freed, gone):
            self.pool.release(table.blocks[i])
            table.blocks[i] = 0
        table.freed = max(table.freed, gone)

    def slot_ids(self, seq_id: str, start: int, stop: int) -> list[int]:
        """Cache slots of positions [start, stop) of a sequence (plain ints: a step gathers many at once)."""
        blocks, size = self.blocks(seq_id), self.block_size
        return [blocks[p // size] * size + p % size for p in range(start, stop)]

    def slots(self, seq_id: str, start: int, stop: int) -> torch.Tensor:
        """`slot_ids` as a [stop - start] int64 tensor."""
        return torch.tensor(self.slot_ids(seq_id, start, stop), dtype=torch.long)
