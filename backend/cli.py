"""Command line: `serve` (API, plus embedded Redis and a worker when REDIS_URL is unset), `worker`, `predict`.

Every command builds one Settings from the environment and passes it down.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from backend.settings import Settings

log = logging.getLogger("backend")

# Bounded shutdown: in-flight requests get a few seconds, a busy worker a few more to finish its job
# (an unfinished job is then failed by the heartbeat sweep, visibly, like any killed worker's).
HTTP_STOP_GRACE_S = 5
WORKER_STOP_GRACE_S = 10.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"invalid settings:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # httpx logs every request at INFO: one line per image and per push, and per poll under a progress bar.
        logging.getLogger("httpx").setLevel(logging.WARNING)
    # SIGTERM (docker stop, systemd) shuts down like Ctrl-C: the finally blocks stop children in order.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return int(args.run(settings, args))
    except KeyboardInterrupt:
        log.info("stopped")
        return 0


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grounded-sam", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the HTTP API Label Studio connects to")
    serve.set_defaults(run=_serve)
    worker = commands.add_parser("worker", help="load the models and process jobs from REDIS_URL")
    worker.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    worker.set_defaults(run=_worker)
    predict = commands.add_parser("predict", help="run the pipeline on local images, without Label Studio or Redis")
    predict.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    group = predict.add_mutually_exclusive_group(required=True)
    group.add_argument("--labels", help='comma-separated label names, e.g. "cat,dog,traffic light"')
    group.add_argument("--config", type=Path, help="a Label Studio labeling config XML file")
    predict.add_argument("--out", type=Path, default=Path("predictions"), help="output folder (default: predictions)")
    predict.set_defaults(run=_predict)
    for name, help_text in (
        ("prelabel", "pre-label a whole Label Studio project through a running backend"),
        ("status", "task counts of a project's bulk work by state"),
        ("retry", "queue a project's failed bulk work again"),
    ):
        bulk = commands.add_parser(name, help=help_text)
        bulk.add_argument("--project", type=int, required=True, help="Label Studio project id")
        bulk.add_argument("--backend", help="backend URL (default: http://127.0.0.1:$PORT)")
        if name == "prelabel":
            bulk.add_argument("--filter", type=json.loads, help='Data Manager query JSON, e.g. {"filters": ...}')
            bulk.add_argument("--force", action="store_true", help="recompute tasks that already have a prediction")
        bulk.set_defaults(run=_bulk, command=name)
    return parser


def _serve(settings: Settings, _: argparse.Namespace) -> int:
    if settings.redis_url:
        return _serve_api(settings)
    from backend.queueing.connection import embedded_redis

    with embedded_redis() as url:
        local = settings.model_copy(update={"redis_url": url})
        worker = _spawn_worker(url)
        try:
            return _serve_api(local, worker)
        finally:
            _stop(worker)


def _serve_api(settings: Settings, worker: subprocess.Popen[bytes] | None = None) -> int:
    import uvicorn

    from backend.api.app import create_app

    config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port,
                            log_level=settings.log_level.lower(), timeout_graceful_shutdown=HTTP_STOP_GRACE_S)
    server = uvicorn.Server(config)
    failed = threading.Event()
    if worker is not None:
        threading.Thread(target=_watch_worker, args=(worker, server, failed), daemon=True).start()
    server.run()
    return 1 if failed.is_set() else 0


def _spawn_worker(redis_url: str) -> subprocess.Popen[bytes]:
    """The embedded-mode worker: this same CLI in a child process, on its own session.

    Its own session keeps a terminal's Ctrl-C from reaching it directly: the parent stops it in
    order (API first, then the worker finishes its job, then Redis).
    """
    from backend.queueing.connection import die_with_parent

    env = {**os.environ, "REDIS_URL": redis_url}
    return subprocess.Popen(
        [sys.executable, "-m", "backend.cli", "worker"], env=env, start_new_session=True, preexec_fn=die_with_parent
    )


def _watch_worker(worker: subprocess.Popen[bytes], server: object, failed: threading.Event) -> None:
    """A worker that exits on its own (e.g. models failed to load) stops the whole command."""
    code = worker.wait()
    if not getattr(server, "should_exit", False):
        log.error("the worker exited with code %s; stopping (see its log above)", code)
        failed.set()
        server.should_exit = True  # type: ignore[attr-defined]


def _stop(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)  # rq: warm shutdown, the current job finishes
        try:
            worker.wait(WORKER_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            log.warning("worker did not stop within %.0f s; killing it", WORKER_STOP_GRACE_S)
            worker.kill()
            worker.wait()


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    if not settings.redis_url:
        print("the worker needs REDIS_URL (the Redis the API enqueues to)", file=sys.stderr)
        return 2
    from backend import jobs
    from backend.queueing.connection import worker_connection
    from backend.queueing.worker import run_worker

    jobs.install(jobs.build_runtime(settings))
    redis = worker_connection(settings.redis_url)
    run_worker(redis, settings.queue_name, settings.worker_heartbeat, burst=args.burst)
    return 0


def _predict(settings: Settings, args: argparse.Namespace) -> int:
    from backend.errors import BackendError
    from backend.labelstudio.templates import config_for_labels, parse_label_list
    from backend.local_predict import predict_files

    label_config = config_for_labels(parse_label_list(args.labels)) if args.labels else args.config.read_text()
    try:
        written = predict_files(settings, args.images, label_config, args.out)
    except BackendError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"written": [str(path) for path in written]}, indent=2))
    return 0


def _bulk(settings: Settings, args: argparse.Namespace) -> int:
    from backend import bulk_cli
    from backend.errors import BackendError

    backend = bulk_cli.BackendClient(args.backend or f"http://127.0.0.1:{settings.port}", settings.basic_auth)
    try:
        if args.command == "prelabel":
            return bulk_cli.prelabel(settings, backend, args.project, args.filter, args.force)
        if args.command == "status":
            return bulk_cli.status(backend, args.project)
        return bulk_cli.retry(backend, args.project)
    except BackendError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
