from __future__ import annotations

import pytest
import torch

from libs.common.errors import InvalidArgument, ResourceExhausted
from services.inference.engine import KVCacheConfig
from services.inference.engine.kv_cache import BlockPool, CacheShape, KVCache
from tests.helpers.tiny_models import CONFIGS


def cache(num_blocks: int = 8, prefix_caching: bool = True) -> KVCache:
    config = KVCacheConfig(block_size=4, num_blocks=num_blocks, prefix_caching=prefix_caching)
    return KVCache(CONFIGS["llama"](), config)


def test_budget_sets_the_number_of_blocks() -> None:
    shape = CacheShape.of(CONFIGS["llama"]())
    assert shape == CacheShape(num_layers=2, num_kv_heads=2, head_dim=16)
    per_block = shape.bytes_per_token(torch.float32) * 16  # 2 * 2 * 2 * 16 * 4 bytes * 16 tokens
    kv = KVCache(CONFIGS["llama"](), KVCacheConfig(block_size=16, memory_bytes=10 * per_block + 1))
    assert kv.num_blocks == 10
    assert len(kv.key) == 2 and kv.key[0].shape == (160, 2, 16)
    with pytest.raises(InvalidArgument, match="kv_cache"):
        KVCache(CONFIGS["llama"](), KVCacheConfig(memory_bytes=per_block - 1))


def test_allocate_grow_and_free() -> None:
    kv = cache()
    kv.allocate("a", 5)
    assert len(kv.blocks("a")) == 2 and kv.usage == 2 / 8
    kv.allocate("a", 8)
    assert len(kv.blocks("a")) == 2
    kv.allocate("a", 9)
    assert len(kv.blocks("a")) == 3
    assert kv.slots("a", 3, 6).tolist() == [kv.blocks("a")[0] * 4 + 3, kv.blocks("a")[1] * 4, kv.blocks("a")[1] * 4 + 1]
    kv.free("a")
    assert kv.usage == 0


def test_allocation_is_all_or_nothing() -> None:
    kv = cache(num_blocks=3)
    kv.allocate("a", 8)
    assert not kv.can_allocate("b", 5)
    with pytest.raises(ResourceExhausted):
        kv.allocate("b", 5)
    assert kv.blocks("b") == [] and kv.usage == 2 / 3


def test_prefix_blocks_are_shared_and_chained() -> None:
    kv = cache()
    tokens = list(range(10))
    kv.allocate("a", 10)
    kv.commit("a", tokens, 10)  # blocks 0..3 and 4..7 are full
    assert kv.match_prefix("b", tokens) == 8
    assert kv.blocks("b") == kv.blocks("a")[:2]
    assert kv.match_prefix("c", [99, *tokens[1:]]) == 0  # a different first block breaks the chain
    assert kv.match_prefix("d", tokens[:8]) == 4  # one token is always left to compute
    kv.free("a")
    kv.free("b")
    assert kv.usage == 1 / 8  # d still holds the first block


def test_freed_prefix_blocks_stay_reusable_until_evicted() -> None:
    kv = cache(num_blocks=4)
    tokens = list(range(9))
    kv.allocate("a", 9)
    kv.commit("a", tokens, 9)
    kv.free("a")
    assert kv.usage == 0
    assert kv.match_prefix("b", tokens) == 8
    kv.free("b")
    kv.allocate("c", 16)  # needs every block: the cached ones are evicted
    assert kv.match_prefix("d", tokens) == 0


def test_prefix_caching_can_be_turned_off() -> None:
    kv = cache(prefix_caching=False)
    kv.allocate("a", 8)
    kv.commit("a", list(range(8)), 8)
    assert kv.match_prefix("b", list(range(9))) == 0


def test_pool_evicts_least_recently_freed_first() -> None:
    pool = BlockPool(2)
    a, b = pool.allocate(), pool.allocate()
    pool.register(a, b"a")
    pool.register(b, b"b")
    pool.release(b)
    pool.release(a)
    assert pool.allocate() == b
    assert pool.lookup(b"b") is None and pool.lookup(b"a") == a
