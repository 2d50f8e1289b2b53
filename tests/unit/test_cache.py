"""The response cache: exact rows back, keys that change with the version, tier and input, LRU
bounds by entries and by bytes, and its metrics."""

import numpy as np
import pytest
from pydantic import ValidationError

from cascade_server.config.cache import CacheConfig
from cascade_server.config.cascade import CascadeConfig
from cascade_server.gateway.cache import (
    DIGEST_SIZE,
    ENTRY_OVERHEAD,
    ResponseCache,
    TierCounts,
    digests,
)
from cascade_server.gateway.metrics import Metrics

ON = CacheConfig(enabled=True)


def _images(n: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input": rng.standard_normal((n, 1, 8, 8)).astype(np.float32)}


def _texts(n: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 1000, (n, 16))
    mask = np.ones((n, 16), dtype=np.int64)
    mask[:, 12:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _rows(n: int, width: int = 10, seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32)


def _sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics._registry.get_sample_value(name, labels)


def test_digests_are_per_row_and_collide_only_on_identical_inputs():
    x = _images(4)
    keys = digests(x)
    assert len(keys) == 4 and len(set(keys)) == 4
    assert all(isinstance(k, bytes) and len(k) == DIGEST_SIZE for k in keys)
    assert digests({"input": x["input"][2:3]}) == keys[2:3]  # the batch a row is in: no matter
    assert digests({"input": np.asfortranarray(x["input"])}) == keys  # memory layout: no matter
    pixel = x["input"].copy()
    pixel[1, 0, 3, 5] = np.nextafter(pixel[1, 0, 3, 5], np.float32(np.inf))
    changed = digests({"input": pixel})
    assert changed[1] != keys[1] and changed[0] == keys[0]
    assert digests({"image": x["input"]}) != keys  # the tensor name
    assert digests({"input": x["input"].astype(np.float64)}) != keys  # the dtype
    assert digests({"input": x["input"].reshape(4, 8, 8)}) != keys  # the row shape
    assert digests({}) == []
    with pytest.raises(ValueError, match="rows"):
        digests({"a": np.zeros((2, 3)), "b": np.zeros((3, 3))})


def test_text_digests_cover_ids_and_mask_whatever_the_dict_order():
    t = _texts()
    keys = digests(t)
    assert digests({"attention_mask": t["attention_mask"], "input_ids": t["input_ids"]}) == keys
    token = {k: v.copy() for k, v in t.items()}
    token["input_ids"][3, 5] += 1
    assert digests(token)[3] != keys[3] and digests(token)[:3] == keys[:3]
    mask = {k: v.copy() for k, v in t.items()}
    mask["attention_mask"][0, 12] = 1
    assert digests(mask)[0] != keys[0]


def test_hits_return_the_exact_rows_put_in_order():
    cache = ResponseCache(ON)
    keys, rows = digests(_images(4)), _rows(4)
    cache.put_many("student", "v1", keys[:3], rows[:3])
    hits, got = cache.get_many("student", "v1", [keys[3], keys[2], keys[0]])
    assert hits.tolist() == [False, True, True]
    assert got is not None and got.shape == (2, 10) and got.dtype == np.float32
    assert np.array_equal(got, rows[[2, 0]])
    hits, got = cache.get_many("student", "v1", [keys[3]])
    assert hits.tolist() == [False] and got is None
    assert cache.counts["student"].hits == 2 and cache.counts["student"].misses == 2


def test_cache_keys_change_when_a_version_changes():
    cache = ResponseCache(ON)
    keys = digests(_images(2))
    cache.put_many("student", "3", keys, _rows(2, 10))
    cache.put_many("teacher", "resnet:1", keys, _rows(2, 10, seed=3))
    assert cache.get_many("student", "4", keys)[0].tolist() == [False, False]
    assert cache.get_many("teacher", "resnet:2", keys)[0].tolist() == [False, False]
    assert cache.get_many("student", "3", keys)[0].all()
    assert cache.get_many("teacher", "resnet:1", keys)[0].all()


def test_a_different_tier_misses_and_stages_cache_under_their_own_names():
    cache = ResponseCache(CacheConfig(enabled=True, tiers=("student", "stage1", "teacher")))
    keys = digests(_images(2))
    cache.put_many("student", "v1", keys, _rows(2))
    assert not cache.get_many("teacher", "v1", keys)[0].any()
    assert not cache.get_many("stage1", "v1", keys)[0].any()
    cache.put_many("stage1", "v1", keys, _rows(2, 5))
    hits, got = cache.get_many("stage1", "v1", keys)
    assert hits.all() and got is not None and got.shape == (2, 5)


def test_disabled_cache_and_unlisted_tiers_do_not_cache():
    off = ResponseCache(CacheConfig())
    assert not off.enabled_for("student") and not off.enabled_for("teacher")
    keys = digests(_images(2))
    off.put_many("student", "v1", keys, _rows(2))
    assert len(off) == 0 and off.get_many("student", "v1", keys)[1] is None
    only_teacher = ResponseCache(CacheConfig(enabled=True, tiers=("teacher",)))
    assert only_teacher.enabled_for("teacher")
    assert not only_teacher.enabled_for("student") and not only_teacher.enabled_for("stage1")
    assert CascadeConfig().cache == CacheConfig() and not CascadeConfig().cache.enabled


def test_config_is_validated():
    with pytest.raises(ValidationError):
        CacheConfig(max_entries=0)
    with pytest.raises(ValidationError):
        CacheConfig(max_bytes=0)
    with pytest.raises(ValidationError):
        CacheConfig(tiers=("student", ""))
    with pytest.raises(ValidationError):
        CacheConfig(size=3)  # extra=forbid
    assert CacheConfig().max_bytes == 256 * 1024 * 1024


def test_rows_stored_are_read_only_copies():
    cache = ResponseCache(ON)
    keys, rows = digests(_images(2)), _rows(2)
    expected = rows.copy()
    cache.put_many("teacher", "t1", keys, rows)
    rows[:] = 0
    _, got = cache.get_many("teacher", "t1", keys)
    assert got is not None and np.array_equal(got, expected)
    assert not got.flags.writeable
    with pytest.raises(ValueError):
        got[0, 0] = 1.0
    assert all(not row.flags.writeable for row in cache._entries.values())


def test_lru_evicts_by_entries_and_a_get_refreshes_recency():
    cache = ResponseCache(CacheConfig(enabled=True, max_entries=3))
    keys, rows = digests(_images(5)), _rows(5)
    cache.put_many("student", "v1", keys[:3], rows[:3])
    assert cache.get_many("student", "v1", [keys[0]])[0].all()  # 0 is now the most recent
    cache.put_many("student", "v1", keys[3:4], rows[3:4])  # evicts 1, the least recent
    hits, _ = cache.get_many("student", "v1", keys[:4])
    assert hits.tolist() == [True, False, True, True]
    assert len(cache) == 3 and cache.counts["student"].evictions == 1


def test_lru_evicts_by_bytes():
    entry = DIGEST_SIZE + 10 * 4 + ENTRY_OVERHEAD
    cache = ResponseCache(CacheConfig(enabled=True, max_bytes=3 * entry))
    keys, rows = digests(_images(5)), _rows(5)
    cache.put_many("student", "v1", keys[:3], rows[:3])
    assert len(cache) == 3 and cache.nbytes == 3 * entry
    cache.put_many("teacher", "t1", keys[3:4], _rows(1, 30))  # 80 bytes more: two must go
    assert cache.get_many("student", "v1", keys[:3])[0].tolist() == [False, False, True]
    assert cache.nbytes == entry + DIGEST_SIZE + 30 * 4 + ENTRY_OVERHEAD <= 3 * entry
    assert cache.counts["student"].evictions == 2
    assert cache.counts.get("teacher", TierCounts()).evictions == 0
    cache.put_many("student", "v1", keys[4:5], _rows(1, 10_000))  # larger than the bound
    assert cache.get_many("student", "v1", keys[4:5])[1] is None and len(cache) == 2


def test_a_row_of_another_width_is_stored_and_the_old_one_not_served():
    cache = ResponseCache(ON)
    keys = digests(_images(2))
    cache.put_many("teacher", "t1", keys[:1], _rows(1, 10))
    cache.put_many("teacher", "t1", keys[1:], _rows(1, 12))  # no error
    hits, got = cache.get_many("teacher", "t1", keys)
    assert hits.tolist() == [False, True] and got is not None and got.shape == (1, 12)
    assert len(cache) == 1


def test_clear_drops_entries_and_keeps_counts():
    cache = ResponseCache(ON)
    keys = digests(_images(2))
    cache.put_many("student", "v1", keys, _rows(2))
    cache.get_many("student", "v1", keys)
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0
    assert not cache.get_many("student", "v1", keys)[0].any()
    assert cache.counts["student"].hits == 2 and cache.counts["student"].misses == 2


def test_metrics_follow_lookups_evictions_and_size():
    metrics = Metrics()
    cache = ResponseCache(CacheConfig(enabled=True, max_entries=2), metrics, "digits")
    for tier in ("student", "teacher"):  # primed at 0
        for result in ("hit", "miss"):
            labels = {"cascade": "digits", "tier": tier, "result": result}
            assert _sample(metrics, "cascade_cache_requests_total", **labels) == 0
        assert _sample(metrics, "cascade_cache_evictions_total", cascade="digits", tier=tier) == 0
    keys = digests(_images(3))
    cache.put_many("student", "v1", keys, _rows(3))
    cache.get_many("student", "v1", keys)
    hit = {"cascade": "digits", "tier": "student", "result": "hit"}
    assert _sample(metrics, "cascade_cache_requests_total", **hit) == 2
    assert _sample(metrics, "cascade_cache_requests_total", **{**hit, "result": "miss"}) == 1
    evictions = _sample(metrics, "cascade_cache_evictions_total", cascade="digits", tier="student")
    assert evictions == 1
    assert _sample(metrics, "cascade_cache_entries", cascade="digits") == 2
    assert _sample(metrics, "cascade_cache_bytes", cascade="digits") == cache.nbytes > 0
    cache.clear()
    assert _sample(metrics, "cascade_cache_entries", cascade="digits") == 0
    assert b"cascade_cache_requests_total" in metrics.render()[0]


def test_settings_from_env_turn_the_cache_on(monkeypatch):
    from cascade_server.settings import Settings

    monkeypatch.setenv("CASCADE_CACHE__ENABLED", "true")
    monkeypatch.setenv("CASCADE_CACHE__TIERS", '["teacher"]')
    c = Settings().cascade.cache
    assert c.enabled and c.tiers == ("teacher",)
