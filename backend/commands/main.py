"""Command line: `serve` (API, plus a supervised embedded Redis and worker when REDIS_URL is unset), `worker`,
`health`, `predict`, the bulk commands (`prelabel`, `status`, `retry`) and `report`.

Every command builds one Settings from the environment and passes it down.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from backend.commands.usage import OneLineParser, add_command, top_parser, usage_error
from backend.errors import BackendError
from backend.settings import Settings, describe_settings_error

if TYPE_CHECKING:
    from redis import Redis

    from backend.queueing.connection import EmbeddedRedis
    from backend.supervisor import Supervisor

log = logging.getLogger("backend")

# Bounded shutdown: in-flight requests get a few seconds, a busy worker a few more to finish its job; then the
# worker is killed and its unfinished job queued again by the heartbeat sweep (its crash retry given back first:
# a deliberate stop never makes a job poison).
HTTP_STOP_GRACE_S = 5
WORKER_STOP_GRACE_S = 10.0
# Docker's HEALTHCHECK gives the command its own timeout; this one is for the request alone.
HEALTH_TIMEOUT_S = 5.0
# The installed distribution whose version workers announce.


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        return usage_error(f"invalid settings: {describe_settings_error(exc)}")
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
    except BackendError as exc:  # the command boundary: one line; the traceback only at LOG_LEVEL=DEBUG
        log.debug("%s failed", args.command, exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _parser() -> argparse.ArgumentParser:
    parser = top_parser("grounded-sam")
    commands = parser.add_subparsers(required=True, metavar="COMMAND", dest="command")
    serve = add_command(
        commands, "serve", "run the backend Label Studio connects to (REDIS_URL unset: also its queue and a worker)"
    )
    serve.set_defaults(run=_serve)
    worker = add_command(commands, "worker", "load the models and process jobs from REDIS_URL (one per GPU)")
    worker.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    worker.set_defaults(run=_worker)
    health = add_command(commands, "health", "exit 0 when this machine's API is UP (Docker HEALTHCHECK)")
    health.add_argument(
        "--worker", action="store_true", help="check this machine's worker instead: WORKER_HEARTBEAT_FILE is fresh"
    )
    health.set_defaults(run=_health)
    predict = add_command(commands, "predict", "run the pipeline on local images, without Label Studio or Redis")
    predict.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (PNG, JPEG, ...)")
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
        bulk = add_command(commands, name, help_text)
        bulk.add_argument("--project", type=int, required=True, help="Label Studio project id")
        bulk.add_argument("--backend", help="backend URL (default: http://127.0.0.1:$PORT)")
        if name == "prelabel":
            bulk.add_argument("--filter", type=_json_query, help='Data Manager query JSON, e.g. {"filters": ...}')
            bulk.add_argument(
                "--force",
                action="store_true",
                help="recompute tasks that already have a prediction (never annotated ones)",
            )
            bulk.add_argument(
                "--embeddings",
                action="store_true",
                help="also fill the workers' on-disk embedding cache (EMBEDDING_DISK_DIR) for every task nobody "
                "annotated, those that already have a prediction too, so clicks are fast after worker restarts",
            )
        bulk.set_defaults(run=_bulk)
    _add_report(commands)
    return parser


def _add_report(commands: argparse._SubParsersAction[OneLineParser]) -> None:
    report = add_command(
        commands, "report", "per-label precision, recall and a suggested threshold, learned from the reviews"
    )
    report.add_argument("--project", type=int, required=True, help="Label Studio project id")
    report.add_argument("--model-version", help="the model version whose reviews to read (default: the newest)")
    report.add_argument(
        "--target-precision",
        type=_fraction,
        metavar="P",
        help="suggest the lowest threshold reaching this precision (default: the one maximising F1)",
    )
    report.add_argument(
        "--min-reviews",
        type=_positive_int,
        metavar="N",
        help="reviewed predictions a label needs for a suggestion (default: REVIEW_MIN_REVIEWS)",
    )
    report.add_argument("--plot", type=Path, metavar="FILE", help="write a PNG of precision and recall per threshold")
    report.add_argument(
        "--apply", action="store_true", help="write the suggested thresholds into the project's labeling config"
    )
    report.set_defaults(run=_report)


def _fraction(text: str) -> float:
    """--target-precision: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _positive_int(text: str) -> int:
    """--min-reviews: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _json_query(text: str) -> object:
    """--filter's value: a JSON object (argparse turns the ArgumentTypeError into a one-line usage error)."""
    try:
        query = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc})") from None
    if not isinstance(query, dict):
        raise argparse.ArgumentTypeError('a JSON object is needed, e.g. {"filters": ...}')
    return query


def _serve(settings: Settings, _: argparse.Namespace) -> int:
    problem = _cannot_listen(settings.host, settings.port)
    if problem:  # before Redis and the worker start: one line, not their start-up and shutdown
        print(f"error: cannot listen on {settings.host}:{settings.port}: {problem}", file=sys.stderr)
        return 1
    if settings.redis_url:
        return _serve_api(settings)
    from backend.queueing.connection import EmbeddedRedis, api_connection

    redis = EmbeddedRedis(Path(settings.embedded_redis_dir).expanduser(), settings.embedded_redis_maxmemory)
    try:
        redis.start()
    except BackendError as exc:
        redis.stop()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    log.info("embedded Redis-compatible server on %s, data in %s", redis.url, redis.folder)
    with api_connection(redis.url) as registry:  # one connection for unregistering dead workers, all along
        supervisor = _embedded_supervisor(settings, redis, registry)
        try:
            return _serve_api(settings.model_copy(update={"redis_url": redis.url}), supervisor)
        finally:
            # In order (the API has stopped): the worker finishes its job, then Redis; a restart in progress
            # is waited for and stopped too.
            supervisor.stop_all()


def _cannot_listen(host: str, port: int) -> str | None:
    """Why the HTTP server could not bind HOST:PORT now ("the port is in use ..."), or None when it can."""
    import socket

    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"HOST does not resolve ({exc.strerror})"
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's server does
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return "the port is in use (another server runs there): stop it, or set PORT to a free port"
                return f"{exc.strerror or exc} (check HOST and PORT)"
    return None


def _embedded_supervisor(settings: Settings, redis: EmbeddedRedis, registry: Redis) -> Supervisor:
    """The embedded Redis (started already) and one worker (started now), restarted whenever they die."""
    from backend.supervisor import Child, RestartPolicy, Supervisor

    policy = RestartPolicy(settings.supervise_max_restarts, settings.supervise_window)
    # A restart of Redis that is still waiting (a large append-only file loading) gives up when `serve` stops.
    server = Child("embedded Redis", lambda: redis.start(cancel=supervisor.stopping), stop=lambda _: redis.stop())
    server.process = redis.process
    worker = Child(
        "worker",
        lambda: _spawn_worker(redis.url),
        on_death=lambda dead: _forget_worker(registry, dead),
        stop=lambda process: _stop(process, registry),
    )
    worker.launch()
    supervisor = Supervisor([server, worker], policy)
    return supervisor


def _spare_crash_retry(registry: Redis, pid: int) -> None:
    from redis.exceptions import RedisError

    from backend.queueing.client import spare_crash_retry

    try:
        spare_crash_retry(registry, pid)
    except RedisError as exc:  # the kill then counts as a crash, as any other
        log.warning("could not keep the crash retry of worker %s's job: %s", pid, exc)


def _forget_worker(registry: Redis, dead: subprocess.Popen[bytes]) -> None:
    from redis.exceptions import RedisError

    from backend.queueing.worker import forget_worker

    try:
        forget_worker(registry, dead.pid)
    except RedisError as exc:  # Redis down too: rq's worker TTL forgets it later
        log.debug("could not unregister the dead worker %s: %s", dead.pid, exc)


def _serve_api(settings: Settings, supervisor: Supervisor | None = None) -> int:
    import uvicorn

    from backend.api.app import create_app
    from backend.api.shutdown import JsonWhenCancelled

    config = uvicorn.Config(
        JsonWhenCancelled(create_app(settings)),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=HTTP_STOP_GRACE_S,
    )
    server = uvicorn.Server(config)
    failed = threading.Event()
    if supervisor is not None:
        threading.Thread(target=_supervise, args=(supervisor, server, failed), daemon=True, name="supervisor").start()
    try:
        server.run()
    except SystemExit:  # uvicorn's own start-up failure (the port taken since the check): it logged why
        if server.started:
            raise
        print(f"error: the HTTP server did not start on {settings.host}:{settings.port} (see above)", file=sys.stderr)
        return 1
    finally:
        if supervisor is not None:
            supervisor.stopping.set()  # no restarts while the children are stopped
    return 1 if failed.is_set() else 0


def _supervise(supervisor: Supervisor, server: object, failed: threading.Event) -> None:
    """Keep the children running; when one keeps dying, stop the whole command with the reason."""
    from backend.errors import CrashLoopError

    try:
        supervisor.watch()
    except Exception as exc:  # this thread's boundary: `serve` never goes on unsupervised
        if isinstance(exc, CrashLoopError):
            log.error("%s", exc)
        else:
            log.exception("supervision failed; stopping")
        failed.set()
        server.should_exit = True  # type: ignore[attr-defined]
    finally:
        # Children this thread restarted die with it (PR_SET_PDEATHSIG follows the thread that spawned them),
        # so it lives until `serve` has stopped them in order.
        supervisor.released.wait()


def _spawn_worker(redis_url: str) -> subprocess.Popen[bytes]:
    """The embedded-mode worker: this same CLI in a child process, on its own session.

    Its own session keeps a terminal's Ctrl-C from reaching it directly: the parent stops it in
    order (API first, then the worker finishes its job, then Redis).
    """
    from backend.queueing.connection import die_with_parent

    env = {**os.environ, "REDIS_URL": redis_url}
    return subprocess.Popen(
        [sys.executable, "-m", "backend.commands", "worker"],
        env=env,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )


def _stop(worker: subprocess.Popen[bytes], registry: Redis | None = None) -> None:
    """SIGTERM, then SIGKILL after WORKER_STOP_GRACE_S; before a kill, the job it runs gets its crash retry back
    (through `registry`, the Redis the worker uses)."""
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)  # rq: warm shutdown, the current job finishes
        try:
            worker.wait(WORKER_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            log.warning("worker did not stop within %.0f s; killing it", WORKER_STOP_GRACE_S)
            if registry is not None:  # a deliberate kill is no crash: else two stops would make its job poison
                _spare_crash_retry(registry, worker.pid)
            worker.kill()
            worker.wait()


def _health(settings: Settings, args: argparse.Namespace) -> int:
    """GET this machine's /health (with basic auth when set): exit 0 when UP, 1 otherwise; one line out.

    With --worker: whether this machine's worker touched WORKER_HEARTBEAT_FILE lately (it does so while it
    reaches Redis, once its models are loaded), for a worker container's HEALTHCHECK; 0 fresh, 1 otherwise."""
    if args.worker:
        return _worker_health(settings)
    import httpx

    host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(settings.host, settings.host)
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    url = f"http://{host}:{settings.port}/health"
    try:
        # trust_env=False: no HTTP(S)_PROXY (it would receive the credentials and answer for this machine) and
        # no .netrc; this is a loopback request to this machine's own API.
        response = httpx.get(url, auth=settings.basic_auth, timeout=HEALTH_TIMEOUT_S, trust_env=False)
        body = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        print(f"DOWN: {url}: {exc or type(exc).__name__}")
        return 1
    status = body.get("status", "DOWN") if isinstance(body, dict) else "DOWN"
    if response.status_code == 200 and status == "UP":
        differ = "; the workers run different model settings" if body.get("fingerprints_differ") else ""
        print(f"UP: {body.get('workers')} workers, queued {body.get('queued')}{differ}")
        return 0
    detail = body.get("detail", "") if isinstance(body, dict) else ""
    print(f"{status}: HTTP {response.status_code} {detail}".rstrip())
    return 1


def _worker_health(settings: Settings) -> int:
    """`health --worker`: one line, exit 0 when WORKER_HEARTBEAT_FILE is younger than 3 heartbeats plus 1 s."""
    import time

    from backend.queueing.worker import alive_file_stale_after

    if not settings.worker_heartbeat_file:
        print("DOWN: WORKER_HEARTBEAT_FILE is not set, so the worker writes no heartbeat to check")
        return 1
    path = Path(settings.worker_heartbeat_file)
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        print(f"DOWN: no worker heartbeat in {path} (the worker is loading its models, cannot reach Redis, or stopped)")
        return 1
    limit = alive_file_stale_after(settings.worker_heartbeat)
    if age > limit:
        print(f"DOWN: the worker's last heartbeat in {path} is {age:.0f} s old (limit {limit:.0f} s)")
        return 1
    print(f"UP: worker heartbeat {age:.1f} s ago")
    return 0


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    from backend.commands.worker import run

    return run(settings, burst=args.burst)


def _predict(settings: Settings, args: argparse.Namespace) -> int:
    """Usage mistakes (no label named) exit 2, an unreadable --config or image 1; both before the models load."""
    from backend.commands.predict import predict_files
    from backend.labelstudio.templates import config_for_labels, parse_label_list

    if args.labels is not None:
        labels = parse_label_list(args.labels)
        if not labels:
            return usage_error('--labels names no label: give comma-separated names, e.g. --labels "cat,dog"')
        label_config = config_for_labels(labels)
    else:
        try:
            label_config = args.config.read_text(encoding="utf-8")
        except OSError as exc:
            print(f"error: --config {args.config}: cannot read ({exc.strerror or exc})", file=sys.stderr)
            return 1
        except UnicodeDecodeError:
            print(f"error: --config {args.config}: not a UTF-8 text file (a labeling config XML)", file=sys.stderr)
            return 1
    written = predict_files(settings, args.images, label_config, args.out)
    print(json.dumps({"written": [str(path) for path in written]}, indent=2))
    return 0


def _report(settings: Settings, args: argparse.Namespace) -> int:
    from dataclasses import fields

    from backend.commands.report import ReportOptions, report

    # The options' dests are ReportOptions' field names.
    return report(settings, ReportOptions(**{field.name: getattr(args, field.name) for field in fields(ReportOptions)}))


def _bulk(settings: Settings, args: argparse.Namespace) -> int:
    from backend.commands import bulk as bulk_cli

    backend = bulk_cli.BackendClient(args.backend or f"http://127.0.0.1:{settings.port}", settings.basic_auth)
    if args.command == "prelabel":
        return bulk_cli.prelabel(settings, backend, args.project, args.filter, args.force, args.embeddings)
    if args.command == "status":
        return bulk_cli.status(backend, args.project)
    return bulk_cli.retry(backend, args.project)
