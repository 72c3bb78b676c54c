import torch

from jetspec_trt.models.kv_cache import KVCacheSpec, PagedKVCache


def test_commit_compacts_accepted_path_through_block_table():
    cache = PagedKVCache(KVCacheSpec(2, 1, 4, 64, page_size=4))
    cache.block_table = torch.tensor([7, 3, 0, 5, 1, 2, 4, 6, 8, 9, 10, 11, 12, 13, 14, 15], dtype=torch.int32)
    cache.set_length(6)
    values = torch.arange(10, dtype=torch.float32).view(10, 1, 1).expand(10, 1, 4)
    slots = cache.slots(cache.ctx_len, 10)
    for layer in range(2):
        cache.write(layer, slots, values, -values)
    cache.commit(torch.tensor([0, 2, 5, 9]))
    assert cache.length == 10 and int(cache.ctx_len) == 10
    kept = cache.slots(torch.tensor([6], dtype=torch.int32), 4)
    for layer in range(2):
        assert cache.k[layer].view(-1, 1, 4)[kept][:, 0, 0].tolist() == [0, 2, 5, 9]
        assert cache.v[layer].view(-1, 1, 4)[kept][:, 0, 0].tolist() == [0, -2, -5, -9]
