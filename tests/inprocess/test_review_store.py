"""ReviewStore against the session's real Redis-protocol server: records replace, evict (per version and
store-wide), refuse stale states, forget and count."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest
from redis import Redis

from backend.learning.reviews import ReviewedObject
from backend.queueing import reviews
from backend.queueing.reviews import ReviewStore

KEPT = ReviewedObject("cat", "kept", 0.9)
DELETED = ReviewedObject("cat", "deleted", 0.3)
RELABELLED = ReviewedObject("cat", "relabelled", 0.5, new_label="dog")
MISSED = ReviewedObject("dog", "missed", None)


@pytest.fixture()
def redis(redis_url: str) -> Iterator[Redis]:
    connection = Redis.from_url(redis_url)
    yield connection
    connection.close()


def _store(redis: Redis, max_annotations: int = 100, max_total: int | None = None) -> ReviewStore:
    return ReviewStore(redis, f"store-{uuid.uuid4().hex[:8]}", max_annotations, max_total)


def test_a_record_reads_back_per_project_and_model_version(redis: Redis) -> None:
    store = _store(redis)
    store.record(3, "gsam-a", 71, [KEPT, RELABELLED, MISSED])
    store.record(3, "gsam-b", 72, [DELETED])
    store.record(4, "gsam-a", 73, [KEPT])
    assert store.objects(3, "gsam-a") == [KEPT, RELABELLED, MISSED]
    assert store.objects(3, "gsam-b") == [DELETED]
    assert store.objects(4, "gsam-a") == [KEPT]
    assert store.objects(5, "gsam-a") == []
    assert store.versions(3) == ["gsam-b", "gsam-a"]  # the most recently recorded first
    assert store.projects(10) == [4, 3]
    assert store.annotations(3, "gsam-a") == 1


def test_an_annotation_recorded_again_replaces_its_record(redis: Redis) -> None:
    store = _store(redis)
    store.record(3, "gsam-a", 71, [KEPT, KEPT])
    store.record(3, "gsam-a", 71, [DELETED])  # edited: its latest state counts, once
    assert store.objects(3, "gsam-a") == [DELETED]
    assert store.annotations(3, "gsam-a") == 1


def test_beyond_the_bound_the_least_recently_recorded_annotations_go(redis: Redis) -> None:
    store = _store(redis, max_annotations=3)
    for annotation in (1, 2, 3):
        store.record(3, "gsam-a", annotation, [ReviewedObject("cat", "kept", annotation / 10)])
    store.record(3, "gsam-a", 1, [ReviewedObject("cat", "kept", 0.1)])  # 1 recorded again: now the newest
    store.record(3, "gsam-a", 4, [ReviewedObject("cat", "kept", 0.4)])
    assert sorted(obj.score for obj in store.objects(3, "gsam-a") if obj.score is not None) == [0.1, 0.3, 0.4]
    assert store.annotations(3, "gsam-a") == 3
    store.record(3, "gsam-b", 9, [KEPT])  # another version has its own bound
    assert store.annotations(3, "gsam-a") == 3


def test_concurrent_records_of_one_version_keep_its_bound(redis_url: str) -> None:
    prefix = f"store-{uuid.uuid4().hex[:8]}"
    errors: list[BaseException] = []

    def writer(first: int) -> None:
        connection = Redis.from_url(redis_url)
        try:
            store = ReviewStore(connection, prefix, 10)
            for annotation in range(first, first + 30):
                store.record(3, "gsam-a", annotation, [KEPT])
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=writer, args=(first,)) for first in (0, 100, 200, 300)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    redis = Redis.from_url(redis_url)
    store = ReviewStore(redis, prefix, 10)
    assert store.annotations(3, "gsam-a") == 10
    assert len(store.objects(3, "gsam-a")) == 10  # the hash and the times agree
    redis.close()


def test_a_project_keeps_at_most_max_versions(redis: Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reviews, "MAX_VERSIONS", 2)
    store = _store(redis)
    for version in ("gsam-a", "gsam-b", "gsam-c"):
        store.record(3, version, 1, [KEPT])
    assert store.versions(3) == ["gsam-c", "gsam-b"]
    assert store.objects(3, "gsam-a") == []


def test_the_store_keeps_at_most_max_projects(redis: Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reviews, "MAX_PROJECTS", 2)
    store = _store(redis)
    for project in (1, 2, 3):
        store.record(project, "gsam-a", 1, [KEPT])
    assert store.projects(10) == [3, 2]
    assert store.versions(1) == [] and store.objects(1, "gsam-a") == []


def test_forget_drops_an_annotation_from_every_version_of_its_project(redis: Redis) -> None:
    store = _store(redis)
    store.record(3, "gsam-a", 71, [KEPT])
    store.record(3, "gsam-b", 71, [DELETED])
    store.record(3, "gsam-b", 72, [MISSED])
    store.record(4, "gsam-a", 71, [KEPT])  # another project's annotation 71 stays
    store.forget(3, 71)
    store.forget(3, 999)  # never recorded: nothing happens
    assert store.objects(3, "gsam-a") == [] and store.objects(3, "gsam-b") == [MISSED]
    assert store.annotations(3, "gsam-b") == 1
    assert store.objects(4, "gsam-a") == [KEPT]


def test_a_record_that_does_not_parse_is_skipped(redis: Redis, caplog: pytest.LogCaptureFixture) -> None:
    prefix = f"store-{uuid.uuid4().hex[:8]}"
    store = ReviewStore(redis, prefix, 100)
    store.record(3, "gsam-a", 1, [KEPT])
    redis.hset(f"{prefix}:reviews:3:gsam-a:objects", "2", '[["cat", 9, 0.5]]')  # no such outcome
    redis.hset(f"{prefix}:reviews:3:gsam-a:objects", "3", "not json")
    assert store.objects(3, "gsam-a") == [KEPT]
    assert "2 review records of project 3, gsam-a do not parse" in caplog.text


def test_counters_add_up_by_reason(redis: Redis) -> None:
    store = _store(redis)
    assert store.counters() == {}
    store.count("recorded")
    store.count("recorded", 2)
    store.count("no_prediction")
    assert store.counters() == {"recorded": 3, "no_prediction": 1}


def test_the_store_wide_bound_evicts_the_least_recently_recorded_annotations_of_any_project(redis: Redis) -> None:
    store = _store(redis, max_annotations=100, max_total=3)
    store.record(1, "gsam-a", 11, [KEPT])
    store.record(2, "gsam-a", 21, [DELETED])
    store.record(2, "gsam-b", 22, [KEPT])
    store.record(3, "gsam-a", 31, [MISSED])  # the fourth: project 1's only record goes, and with it project 1
    assert store.total() == 3
    assert store.objects(1, "gsam-a") == [] and store.versions(1) == [] and store.projects(10) == [3, 2]
    store.record(2, "gsam-a", 21, [KEPT])  # recorded again: now the newest, so 22 is the oldest
    store.record(3, "gsam-a", 32, [KEPT])
    assert store.total() == 3 and store.versions(2) == ["gsam-a"]
    assert store.objects(2, "gsam-a") == [KEPT] and store.annotations(3, "gsam-a") == 2


def test_dropping_a_version_also_frees_its_share_of_the_store_wide_bound(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reviews, "MAX_VERSIONS", 1)
    store = _store(redis, max_total=10)
    for annotation in range(5):
        store.record(3, "gsam-a", annotation, [KEPT])
    store.record(3, "gsam-b", 9, [KEPT])
    assert store.versions(3) == ["gsam-b"] and store.total() == 1


def test_a_record_of_an_older_state_of_the_annotation_is_refused(redis: Redis) -> None:
    store = _store(redis)
    assert store.record(3, "gsam-a", 71, [KEPT], updated_at=200.0)
    assert not store.record(3, "gsam-a", 71, [DELETED], updated_at=100.0)  # a job that read Label Studio earlier
    assert store.objects(3, "gsam-a") == [KEPT]
    assert store.record(3, "gsam-a", 71, [DELETED], updated_at=200.0)  # the same state again: accepted
    assert store.record(3, "gsam-a", 71, [MISSED], updated_at=300.5)
    assert store.objects(3, "gsam-a") == [MISSED]


def test_forget_drops_the_versions_and_projects_it_leaves_empty(redis: Redis) -> None:
    store = _store(redis)
    store.record(3, "gsam-a", 71, [KEPT])
    store.record(3, "gsam-b", 72, [KEPT])
    assert store.forget(3, 72) == 1
    assert store.versions(3) == ["gsam-a"]  # the newest version with annotations: a report falls back to it
    assert store.forget(3, 71) == 1
    assert store.versions(3) == [] and store.projects(10) == [] and store.total() == 0


def test_the_revision_changes_with_every_write_of_its_version_only(redis: Redis) -> None:
    store = _store(redis)
    assert store.revision(3, "gsam-a") is None
    store.record(3, "gsam-a", 71, [KEPT])
    first = store.revision(3, "gsam-a")
    store.record(3, "gsam-b", 72, [KEPT])
    assert store.revision(3, "gsam-a") == first
    store.record(3, "gsam-a", 73, [KEPT])
    second = store.revision(3, "gsam-a")
    store.forget(3, 73)
    assert len({first, second, store.revision(3, "gsam-a")}) == 3


def test_a_record_is_compact_with_scores_to_four_decimals(redis: Redis) -> None:
    prefix = f"store-{uuid.uuid4().hex[:8]}"
    store = ReviewStore(redis, prefix, 100)
    objects = [ReviewedObject("person", "kept", 0.123456789)] * 19 + [RELABELLED]
    store.record(3, "gsam-a", 71, objects)
    raw = redis.hget(f"{prefix}:reviews:3:gsam-a:objects", "71")
    assert raw is not None and len(raw) < 25 * len(objects)
    assert store.objects(3, "gsam-a")[0] == ReviewedObject("person", "kept", 0.1235)
    assert store.objects(3, "gsam-a")[-1] == RELABELLED
