"""The app's OpenAPI spec describes every route's answer, and the routes use what create_app keeps in app.state."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from backend.api.app import create_app
from backend.api.service import PredictReport
from backend.settings import Settings

# Nothing listens there: building the app and its spec touches no Redis.
_NO_REDIS = "redis://127.0.0.1:1/0"


def _spec() -> dict[str, Any]:
    return create_app(Settings(), Redis.from_url(_NO_REDIS)).openapi()


def test_every_route_declares_a_schema_for_its_200_answer() -> None:
    operations = [(path, method, op) for path, ops in _spec()["paths"].items() for method, op in ops.items()]
    assert len(operations) == 12
    for path, method, op in operations:
        content = op["responses"]["200"].get("content", {})
        assert content, f"{method} {path} has no 200 content"
        for media_type, body in content.items():
            schema = body.get("schema", {})
            if path == "/metrics":
                assert media_type.startswith("text/plain") and schema == {"type": "string"}
            else:
                assert media_type == "application/json"
                assert "$ref" in schema, f"{method} {path} answers an undescribed body: {schema}"


def test_the_spec_names_the_real_answers_and_main_errors() -> None:
    spec = _spec()
    paths, schemas = spec["paths"], spec["components"]["schemas"]
    health_up = set(schemas["HealthUp"]["properties"])
    assert health_up == {
        "status", "model_class", "workers", "queued", "fingerprints", "fingerprints_differ", "ready", "worker_states",
        "detail",
    }  # fmt: skip
    assert set(schemas["WorkerFingerprint"]["properties"]) == {
        "fingerprint", "workers", "names", "devices", "package_versions"
    }  # fmt: skip
    health_down = paths["/health"]["get"]["responses"]["503"]["content"]["application/json"]["schema"]
    assert health_down == {"$ref": "#/components/schemas/HealthDown"}
    assert set(schemas["PredictAnswer"]["properties"]) == {"results", "run_id"}
    assert {"400", "413", "422", "503", "504"} <= set(paths["/predict"]["post"]["responses"])
    assert {"400", "413", "422", "503"} <= set(paths["/setup"]["post"]["responses"])
    assert set(schemas["ProgressAnswer"]["properties"]) == {
        "total", "queued", "running", "done", "failed", "failures", "finished"
    }  # fmt: skip


class _Versions:
    def versions(self) -> list[str]:
        return ["from-the-state"]


def test_routes_take_the_service_from_app_state() -> None:
    app = create_app(Settings(), Redis.from_url(_NO_REDIS))
    app.state.service = _Versions()
    with TestClient(app) as client:
        answer = client.get("/versions")
    assert answer.status_code == 200
    assert answer.json() == {"versions": ["from-the-state"]}


class _Predictions:
    """A service whose /predict answers `report` at once."""

    def __init__(self, report: PredictReport) -> None:
        self.settings = Settings()
        self.report = report

    def predict(self, *args: object) -> PredictReport:
        return self.report


@pytest.mark.parametrize(
    ("report", "body"),
    [
        (PredictReport([{"result": [], "score": 0.5}], failed=0), {"results": [{"result": [], "score": 0.5}]}),
        (PredictReport([], failed=0, run_id="abc"), {"results": [], "run_id": "abc"}),
    ],
)
def test_predict_answers_run_id_only_when_queued(report: PredictReport, body: dict[str, Any]) -> None:
    app = create_app(Settings(), Redis.from_url(_NO_REDIS))
    app.state.service = _Predictions(report)
    request = {"tasks": [{"id": 1, "data": {}}], "label_config": "<View/>"}
    with TestClient(app) as client:
        answer = client.post("/predict", json=request)
    assert answer.status_code == 200
    assert answer.json() == body
