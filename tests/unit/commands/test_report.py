"""`grounded-sam report`: the reviews a real Redis holds, per label, a suggested threshold, --plot and --apply.

Reviews are recorded with the real ReviewStore on the session's Redis; Label Studio (for --apply) is a double
holding one labeling config, the only part not real here (tests/e2e/test_active_learning.py runs the real one).
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis

from backend.commands import report as report_cli
from backend.commands.main import main
from backend.errors import LabelStudioApiError
from backend.labelstudio.config import parse_label_config
from backend.learning.reviews import ReviewedObject
from backend.queueing.reviews import ReviewStore
from tests.support.paths import REPO
from tests.support.ports import free_port

CONFIG = (REPO / "label_config" / "brush_and_rectangle.xml").read_text()
# Car: 4 kept (0.6 .. 0.9), 1 relabelled away (0.4), 2 deleted (0.2, 0.3), 1 missed. At 0.6: TP 4, FP 0, FN 1, so
# F1 8/9, the best (at 0.4: 8/10): suggested halfway down to 0.4, 0.5. Person: 2 kept, fewer than --min-reviews 5.
CAR = [
    *(ReviewedObject("Car", "kept", score) for score in (0.9, 0.8, 0.7, 0.6)),
    ReviewedObject("Car", "relabelled", 0.4, new_label="Bicycle"),
    *(ReviewedObject("Car", "deleted", score) for score in (0.3, 0.2)),
    ReviewedObject("Car", "missed", None),
]
PERSON = [ReviewedObject("Person", "kept", 0.5), ReviewedObject("Person", "kept", 0.45)]


class _Studio:
    """A project's labeling config as Label Studio keeps it; `refuse` makes the write fail as a 400 does."""

    def __init__(self, xml: str = CONFIG, refuse: bool = False) -> None:
        self.xml = xml
        self.refuse = refuse
        self.written: list[str] = []

    def label_config(self, project: int) -> str:
        return self.xml

    def set_label_config(self, project: int, xml: str) -> None:
        if self.refuse:
            raise LabelStudioApiError('Label Studio answered 400: {"label_config": ["created annotations ..."]}')
        self.written.append(xml)
        self.xml = xml


@pytest.fixture()
def store(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[ReviewStore]:
    """A ReviewStore under a fresh queue name, and `report`'s environment pointing at it; main's SIGTERM
    handler undone afterwards."""
    queue = f"test-report-{uuid.uuid4().hex[:8]}"
    for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "REVIEW_MIN_REVIEWS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("QUEUE_NAME", queue)
    handler = signal.getsignal(signal.SIGTERM)
    with Redis.from_url(redis_url) as redis:
        yield ReviewStore(redis, queue, 100)
    signal.signal(signal.SIGTERM, handler)


@pytest.fixture()
def studio(monkeypatch: pytest.MonkeyPatch) -> _Studio:
    double = _Studio()
    monkeypatch.setattr(report_cli, "_studio", lambda settings: double)
    return double


def _record(store: ReviewStore, version: str = "gsam-v1", project: int = 7) -> None:
    store.record(project, version, 1, CAR[:4])
    store.record(project, version, 2, [*CAR[4:], *PERSON])


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_counts_precision_recall_quartiles_and_the_suggestion(
    store: ReviewStore, capsys: pytest.CaptureFixture[str]
) -> None:
    _record(store)

    assert main(["report", "--project", "7", "--min-reviews", "5"]) == 0

    out = capsys.readouterr().out
    assert "project 7, model version gsam-v1: 10 reviewed objects from 2 annotations" in out
    assert "Car: 7 reviewed predictions: kept 4, relabelled 1, deleted 2; missed 1" in out
    assert "  precision 0.57, recall 0.80" in out
    assert "  scores kept:    n 4: min 0.60, q1 0.67, median 0.75, q3 0.83, max 0.90" in out
    assert "  scores deleted: n 3: min 0.20, q1 0.25, median 0.30, q3 0.35, max 0.40 (relabelled away included)" in out
    assert "  suggested threshold 0.5: maximises F1 (0.89) over 7 reviews\n" in out
    assert "Person: 2 reviewed predictions: kept 2, relabelled 0, deleted 0; missed 0" in out
    assert "  scores deleted: none\n" in out
    assert "  left alone: only 2 reviews (needs 5)" in out


def test_a_target_precision_and_the_default_min_reviews(
    store: ReviewStore, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _record(store)
    monkeypatch.setenv("REVIEW_MIN_REVIEWS", "2")

    assert main(["report", "--project", "7", "--target-precision", "0.75"]) == 0

    out = capsys.readouterr().out
    # From 0.4 up: 4 kept of 5 = 0.80, the lowest threshold reaching 0.75.
    assert "  suggested threshold 0.35: reaches precision 0.75 (0.80, recall 0.80) over 7 reviews" in out
    assert "Person" in out and "left alone" not in out


def test_the_newest_version_by_default_an_older_one_on_request(
    store: ReviewStore, capsys: pytest.CaptureFixture[str]
) -> None:
    _record(store, "gsam-old")
    store.record(7, "gsam-new", 9, PERSON)

    assert main(["report", "--project", "7"]) == 0
    assert "model version gsam-new: 2 reviewed objects from 1 annotations" in capsys.readouterr().out

    assert main(["report", "--project", "7", "--model-version", "gsam-old"]) == 0
    assert "model version gsam-old: 10 reviewed objects" in capsys.readouterr().out


def test_apply_writes_the_suggested_thresholds_and_leaves_the_others(
    store: ReviewStore, studio: _Studio, capsys: pytest.CaptureFixture[str]
) -> None:
    _record(store)

    assert main(["report", "--project", "7", "--min-reviews", "5", "--apply"]) == 0

    assert len(studio.written) == 1
    labels = {spec.value: spec.options.threshold for spec in parse_label_config(studio.xml).labels}
    assert labels == {"Car": 0.5, "Person": None, "Bicycle": None}
    out = capsys.readouterr().out
    assert "applied to project 7's labeling config" in out
    assert "  Car: threshold unset (BOX_THRESHOLD) → 0.5" in out
    assert "Person: threshold" not in out

    # Applied again: the old threshold is the one written before.
    studio.xml = studio.xml.replace('threshold="0.5"', 'threshold="0.3"')
    assert main(["report", "--project", "7", "--min-reviews", "5", "--apply"]) == 0
    assert "  Car: threshold 0.3 → 0.5" in capsys.readouterr().out


def test_apply_with_no_suggestion_writes_nothing(
    store: ReviewStore, studio: _Studio, capsys: pytest.CaptureFixture[str]
) -> None:
    _record(store)

    assert main(["report", "--project", "7", "--apply"]) == 0  # REVIEW_MIN_REVIEWS 20: no label has enough

    assert studio.written == []
    assert "nothing applied: no label of the labeling config has a suggested threshold" in capsys.readouterr().out


def test_apply_leaves_out_a_label_the_config_no_longer_has(
    store: ReviewStore, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _record(store)
    double = _Studio(CONFIG.replace('value="Car"', 'value="Truck"'))
    monkeypatch.setattr(report_cli, "_studio", lambda settings: double)

    assert main(["report", "--project", "7", "--min-reviews", "5", "--apply"]) == 0

    assert double.written == []
    out = capsys.readouterr().out
    assert "  Car: not in the project's labeling config any more, left out" in out
    assert "nothing applied" in out


def test_plot_writes_a_png(store: ReviewStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _record(store)
    path = tmp_path / "thresholds.png"

    assert main(["report", "--project", "7", "--min-reviews", "5", "--plot", str(path)]) == 0

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot written to {path}" in capsys.readouterr().out


# -- failures: one line on stderr, exit 1 (2 for usage), never a traceback --------------------------------------


def test_no_reviews_of_the_project(store: ReviewStore, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--project", "7"]) == 1

    assert "no reviews recorded for project 7" in _one_error_line(capsys.readouterr().err)


def test_an_unknown_model_version_names_those_with_reviews(
    store: ReviewStore, capsys: pytest.CaptureFixture[str]
) -> None:
    _record(store)

    assert main(["report", "--project", "7", "--model-version", "gsam-nope"]) == 1

    line = _one_error_line(capsys.readouterr().err)
    assert "no reviews recorded for model version gsam-nope of project 7 (with reviews: gsam-v1)" in line


def test_redis_down(store: ReviewStore, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")

    assert main(["report", "--project", "7"]) == 1

    assert "cannot read the reviews from Redis" in _one_error_line(capsys.readouterr().err)


def test_without_redis_url(
    store: ReviewStore, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("REDIS_URL")

    assert main(["report", "--project", "7"]) == 1

    assert "set REDIS_URL" in _one_error_line(capsys.readouterr().err)


def test_label_studio_refusing_the_config(
    store: ReviewStore, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _record(store)
    monkeypatch.setattr(report_cli, "_studio", lambda settings: _Studio(refuse=True))

    assert main(["report", "--project", "7", "--min-reviews", "5", "--apply"]) == 1

    captured = capsys.readouterr()
    assert "suggested threshold 0.5" in captured.out  # the report itself was printed before
    assert "Label Studio answered 400" in _one_error_line(captured.err)


def test_apply_without_label_studio_settings(store: ReviewStore, capsys: pytest.CaptureFixture[str]) -> None:
    _record(store)

    assert main(["report", "--project", "7", "--min-reviews", "5", "--apply"]) == 1

    assert "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY" in _one_error_line(capsys.readouterr().err)


def test_an_unwritable_plot(store: ReviewStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _record(store)

    assert main(["report", "--project", "7", "--plot", str(tmp_path / "no-such-folder" / "p.png")]) == 1

    assert "--plot" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("option", "value"), [("--target-precision", "1.5"), ("--target-precision", "x"), ("--min-reviews", "0")]
)
def test_usage_mistakes(option: str, value: str, store: ReviewStore, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["report", "--project", "7", option, value])

    assert exited.value.code == 2
    assert option in _one_error_line(capsys.readouterr().err)
