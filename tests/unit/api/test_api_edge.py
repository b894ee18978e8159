"""The HTTP edge in isolation: basic auth parsing, the body cap, route labels, /setup's hostname, task ids."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Counter
from pydantic import ValidationError

from backend.api.edge import (
    UNMATCHED,
    BasicAuth,
    BodyLimit,
    CountRequests,
    basic_credentials,
)
from backend.api.schemas import PredictRequest, PrelabelRequest, http_origin
from backend.errors import RequestDataError


def _basic(user: str, password: str, scheme: str = "Basic") -> str:
    return f"{scheme} {base64.b64encode(f'{user}:{password}'.encode()).decode()}"


@pytest.mark.parametrize("scheme", ["Basic", "basic", "BASIC", "bAsIc"])
def test_basic_scheme_is_case_insensitive(scheme: str) -> None:
    assert basic_credentials(_basic("ls", "pa:ss", scheme)) == (b"ls", b"pa:ss")


@pytest.mark.parametrize(
    "header", ["", "Bearer abc", "Basic", "Basic !!!notbase64", "Basic " + base64.b64encode(b"nocolon").decode()]
)
def test_malformed_credentials_are_none(header: str) -> None:
    assert basic_credentials(header) is None


def _echo_app() -> FastAPI:
    app = FastAPI()

    @app.get("/runs/{run_id}")
    def run(run_id: str) -> dict[str, str]:
        return {"run": run_id}

    @app.post("/echo")
    async def echo(body: dict[str, str]) -> dict[str, int]:
        return {"keys": len(body)}

    return app


@pytest.fixture()
def guarded() -> Iterator[tuple[TestClient, Counter]]:
    app = _echo_app()
    counter = Counter("requests", "requests", ["route", "status"], registry=CollectorRegistry())
    app.add_middleware(BodyLimit, max_bytes=1000)
    app.add_middleware(BasicAuth, credentials=("ls", "s3cret"))
    app.add_middleware(CountRequests, counter=counter, routes=app.router.routes)
    with TestClient(app) as client:
        yield client, counter


def _count(counter: Counter, route: str, status: str) -> float:
    return counter.labels(route, status)._value.get()  # type: ignore[attr-defined]


def test_auth_accepts_any_scheme_case_and_refuses_wrong_pairs(guarded: tuple[TestClient, Counter]) -> None:
    client, _ = guarded
    assert client.get("/runs/a", headers={"Authorization": _basic("ls", "s3cret", "basic")}).status_code == 200
    for header in (_basic("ls", "wrong"), _basic("other", "s3cret"), _basic("ls", "s3cret", "Bearer"), ""):
        response = client.get("/runs/a", headers={"Authorization": header})
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Basic")


def test_body_over_the_cap_is_413_with_the_reason(guarded: tuple[TestClient, Counter]) -> None:
    client, _ = guarded
    auth = {"Authorization": _basic("ls", "s3cret")}
    assert client.post("/echo", json={"a": "x" * 900}, headers=auth).json() == {"keys": 1}
    response = client.post("/echo", json={"a": "x" * 2000}, headers=auth)
    assert response.status_code == 413
    assert "MAX_REQUEST_BYTES=1000" in response.json()["detail"]


def test_requests_are_counted_by_route_template_and_unknown_paths_share_one_label(
    guarded: tuple[TestClient, Counter],
) -> None:
    client, counter = guarded
    auth = {"Authorization": _basic("ls", "s3cret")}
    for index in range(50):
        client.get(f"/runs/{index}", headers=auth)
        client.get(f"/random/{index}")  # unauthenticated and unknown
        client.get(f"/random/{index}", headers=auth)
    client.get("/runs/x")  # 401 on a known route
    assert _count(counter, "/runs/{run_id}", "200") == 50
    assert _count(counter, "/runs/{run_id}", "401") == 1
    assert _count(counter, UNMATCHED, "401") == 50
    assert _count(counter, UNMATCHED, "404") == 50
    samples = [s for metric in counter.collect() for s in metric.samples if s.name.endswith("_total")]
    assert len(samples) == 4


@pytest.mark.parametrize(
    ("given", "origin"),
    [
        ("http://ls:8080", "http://ls:8080"),
        ("https://LS.example.com/", "https://LS.example.com"),
        ("http://[::1]:8080/", "http://[::1]:8080"),
        ("http://label_studio:8080", "http://label_studio:8080"),
        ("  http://10.0.0.2  ", "http://10.0.0.2"),
        ("", None),
        (None, None),
        # Label Studio served under a path (its LABEL_STUDIO_HOST may have one): /setup must not fail for it.
        ("https://example.com/label-studio/", "https://example.com/label-studio"),
    ],
)
def test_setup_hostname_accepts_http_origins(given: str | None, origin: str | None) -> None:
    assert http_origin(given) == origin


@pytest.mark.parametrize(
    "given",
    [
        "::::",
        "ls:8080",
        "ftp://ls",
        "http://",
        "http://::::",
        "http://a@ls",
        "http://u:p@ls",
        "http://ls?x=1",
        "http://ls/#f",
        "http://ls:99999",
        "http://ls:0",
        "http://[zz]:1",
        "http://l s",
        "javascript:alert(1)",
        "http://ls\x00x",
    ],
)
def test_setup_hostname_refuses_anything_else(given: str) -> None:
    with pytest.raises(RequestDataError, match="not an http"):
        http_origin(given)


@pytest.mark.parametrize(
    "task",
    [
        {"data": {}},
        {"id": "abc", "data": {}},
        {"id": "7", "data": {}},
        {"id": 1.5},
        {"id": 1.0},
        {"id": True},
        {"id": None},
    ],
)
def test_task_ids_must_be_json_integers(task: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        PredictRequest.model_validate({"tasks": [task], "label_config": "<View/>"})
    with pytest.raises(ValidationError):
        PrelabelRequest.model_validate({"project": 1, "tasks": [{**task, "data": {}}], "label_config": "<View/>"})


def test_predict_tasks_keep_odd_data_and_extra_keys_for_the_task_itself_to_fail() -> None:
    body = PredictRequest.model_validate(
        {"tasks": [{"id": 1, "data": "not an object", "annotations": []}, {"id": 2}], "label_config": "<View/>"}
    )
    assert body.task_dicts() == [{"id": 1, "data": "not an object", "annotations": []}, {"id": 2, "data": None}]
