"""The labeling-config parse cache is bounded by the memory of the configs it keeps, not only by their count."""

from __future__ import annotations

import sys

from backend.labelstudio import config as config_module
from backend.labelstudio.config import PARSE_CACHE_BYTES, parse_label_config
from backend.lru import SizedLru

BRUSH = "<View><Image name='image' value='$image'/><BrushLabels name='m' toName='image'>{}</BrushLabels></View>"


def _config(index: int, padding: int) -> str:
    return BRUSH.format(f"<Label value='label {index}'/>") + f"<!-- {'x' * padding} -->"


def test_lru_keeps_entries_while_their_sizes_fit_and_drops_the_least_recent() -> None:
    cache: SizedLru[str, int] = SizedLru(max_bytes=100, max_items=10)
    cache.put("a", 1, 40)
    cache.put("b", 2, 40)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3, 40)
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (1, None, 3)
    assert cache.size == 80
    cache.put("huge", 4, 101)  # larger than the whole budget: never kept
    assert cache.get("huge") is None and cache.size == 80


def test_lru_also_bounds_the_count() -> None:
    cache: SizedLru[int, int] = SizedLru(max_bytes=10**9, max_items=3)
    for key in range(5):
        cache.put(key, key, 1)
    assert len(cache) == 3 and cache.get(0) is None and cache.get(4) == 4


def test_many_distinct_large_configs_stay_under_the_byte_budget() -> None:
    """8 distinct 8 MB configs used to stay cached whole (lru_cache by count: 128 entries)."""
    config_module._parsed.clear()
    padding = 8 * 2**20
    first = parse_label_config(_config(0, padding))
    for index in range(1, 8):
        assert parse_label_config(_config(index, padding)).labels[0].value == f"label {index}"
    assert config_module._parsed.size <= PARSE_CACHE_BYTES
    assert len(config_module._parsed) < 8
    assert first.labels[0].value == "label 0"


def test_a_config_used_again_is_served_from_the_cache() -> None:
    xml = _config(99, 10)
    assert parse_label_config(xml) is parse_label_config(xml)
    assert config_module._parsed.size >= sys.getsizeof(xml)
