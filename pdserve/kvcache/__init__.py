"""Block bookkeeping for the paged KV cache. kvcache knows nothing about tensors."""

from pdserve.kvcache.block_pool import BlockPool
from pdserve.kvcache.manager import KVCacheManager

__all__ = ["BlockPool", "KVCacheManager"]
