"""Models are located before anything loads (backend/pipeline/build.py locate_models): local paths and cached hub
ids never ask the hub, a hub that does not answer fails at once with one line naming every missing model, and a
SAM_CHECKPOINT that is no checkpoint is a ModelLoadError naming the file. Library warnings print once.

No test reaches the network: the hub is a loopback socket that records connections, a closed loopback port, or a
loopback HTTP server; the Hugging Face cache is a temporary folder.
"""

from __future__ import annotations

import logging
import shutil
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from huggingface_hub import constants as hub_constants

from backend.errors import ModelLoadError
from backend.pipeline.build import build_detector, build_segmenter, locate_models, log_through_the_application
from backend.pipeline.types import ModelSpec
from tests.support.ports import free_port

DETECTOR_ID = "nobody-here/no-detector"
SAM_ID = "nobody-here/no-sam"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def listening() -> Iterator[tuple[str, socket.socket]]:
    """A loopback socket that listens and never answers: (its URL, the socket), to see whether anyone called."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        sock.setblocking(False)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", sock


@pytest.fixture()
def answering_hub() -> Iterator[str]:
    """The URL of a loopback server that answers every HEAD with 200 (a reachable hub)."""

    class Hub(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture()
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face hub cache (HF_HOME's hub folder) for the test."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    return cache


def _called(sock: socket.socket) -> bool:
    try:
        connection, _ = sock.accept()
    except BlockingIOError:
        return False
    connection.close()
    return True


def _cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """Put `folder` into the hub cache as `repo_id`'s main revision, laid out as huggingface_hub writes it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(folder, snapshot)
    return snapshot


def test_local_folders_load_without_asking_the_hub(
    tiny_detector_dir: Path, tiny_hf_sam_dir: Path, listening: tuple[str, socket.socket], empty_cache: Path
) -> None:
    url, sock = listening
    spec = ModelSpec(detector=str(tiny_detector_dir), sam=str(tiny_hf_sam_dir))
    assert locate_models(spec, endpoint=url, offline=False) == spec
    assert not _called(sock)


def test_a_cached_hub_id_loads_from_the_cache_when_the_hub_cannot_serve(
    tiny_detector_dir: Path, tiny_hf_sam_dir: Path, empty_cache: Path
) -> None:
    snapshot = _cache(empty_cache, DETECTOR_ID, tiny_detector_dir)
    closed = f"http://127.0.0.1:{free_port()}"
    located = locate_models(ModelSpec(detector=DETECTOR_ID, sam=str(tiny_hf_sam_dir)), endpoint=closed, offline=False)
    assert Path(located.detector) == snapshot and located.sam == str(tiny_hf_sam_dir)
    build_detector(located)  # the cached folder is a loadable model
    offline = locate_models(ModelSpec(detector=DETECTOR_ID, sam=str(tiny_hf_sam_dir)), offline=True)
    assert Path(offline.detector) == snapshot


def test_while_the_hub_answers_a_hub_id_stays_so_an_interrupted_download_completes(
    tiny_detector_dir: Path, tiny_hf_sam_dir: Path, answering_hub: str, empty_cache: Path
) -> None:
    """A snapshot holding only config.json (a first download cut off before the weights) is not taken for the
    model: with the hub answering, the id is left to transformers, which uses the cache and fetches the rest."""
    partial = empty_cache / "partial"
    partial.mkdir()
    shutil.copy(tiny_detector_dir / "config.json", partial / "config.json")
    _cache(empty_cache, DETECTOR_ID, partial)
    spec = ModelSpec(detector=DETECTOR_ID, sam=str(tiny_hf_sam_dir))
    assert locate_models(spec, endpoint=answering_hub, offline=False) == spec


def test_an_unreachable_hub_names_every_missing_model_in_one_line(empty_cache: Path) -> None:
    """HF_ENDPOINT at a closed port: the one check is refused at once; no download is tried."""
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ModelLoadError) as error:
        locate_models(ModelSpec(detector=DETECTOR_ID, sam=SAM_ID), endpoint=closed, offline=False)
    message = str(error.value)
    assert "\n" not in message
    assert f"the detector (DETECTOR_MODEL='{DETECTOR_ID}') and the SAM model (SAM_MODEL='{SAM_ID}') are" in message
    assert f"the Hugging Face hub at {closed} does not answer" in message
    assert f"`hf download {DETECTOR_ID}` and `hf download {SAM_ID}`" in message
    assert "HF_HUB_OFFLINE=1" in message and "local folder" in message


def test_offline_the_hub_is_not_asked_and_only_the_missing_model_is_named(
    tiny_detector_dir: Path, listening: tuple[str, socket.socket], empty_cache: Path
) -> None:
    url, sock = listening
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE=1 forbids downloads") as error:
        locate_models(ModelSpec(detector=str(tiny_detector_dir), sam=SAM_ID), endpoint=url, offline=True)
    assert f"(SAM_MODEL='{SAM_ID}') is neither a local folder nor a hub id in the Hugging Face" in str(error.value)
    assert "DETECTOR_MODEL" not in str(error.value)
    assert not _called(sock)


def test_a_missing_folder_is_named_without_asking_the_hub(
    tiny_hf_sam_dir: Path, listening: tuple[str, socket.socket], tmp_path: Path
) -> None:
    url, sock = listening
    folder = str(tmp_path / "grounding-dino")
    with pytest.raises(ModelLoadError) as error:
        locate_models(ModelSpec(detector=folder, sam=str(tiny_hf_sam_dir)), endpoint=url, offline=False)
    assert f"the detector (DETECTOR_MODEL='{folder}') is no local folder (and no hub id)" in str(error.value)
    assert "hf download" not in str(error.value) and not _called(sock)


def test_a_hub_that_answers_lets_the_download_go_ahead(empty_cache: Path, answering_hub: str) -> None:
    spec = ModelSpec(detector=DETECTOR_ID, sam=SAM_ID)
    assert locate_models(spec, endpoint=answering_hub, offline=False) == spec


def test_a_missing_checkpoint_and_a_missing_detector_are_named_together(tmp_path: Path, empty_cache: Path) -> None:
    spec = ModelSpec(detector=DETECTOR_ID, sam=SAM_ID, sam_checkpoint=str(tmp_path / "sam.pth"))
    with pytest.raises(ModelLoadError) as error:
        locate_models(spec, offline=True)
    message = str(error.value)
    assert f"(DETECTOR_MODEL='{DETECTOR_ID}') is neither" in message and "SAM_MODEL=" not in message
    assert f"SAM_CHECKPOINT='{tmp_path / 'sam.pth'}' is not a file" in message
    assert "point SAM_CHECKPOINT at the official .pth file" in message


def test_a_text_file_as_sam_checkpoint_is_a_model_load_error_naming_it(tmp_path: Path, tiny_detector_dir: Path) -> None:
    text = tmp_path / "sam_vit_h.pth"
    text.write_text("hello world\n")  # what torch.load's legacy reader fails on with a KeyError
    spec = ModelSpec(detector=str(tiny_detector_dir), sam="unused", sam_checkpoint=str(text))
    assert locate_models(spec, offline=True) == spec  # a file: located; reading it is what fails
    with pytest.raises(ModelLoadError, match="no segment-anything checkpoint") as error:
        build_segmenter(spec)
    assert str(text) in str(error.value) and isinstance(error.value.__cause__, KeyError)


def test_library_warnings_go_through_the_application_handler_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub's own stderr handler plus propagation to the application's printed each warning twice."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    root, hub = logging.getLogger(), logging.getLogger("huggingface_hub")
    monkeypatch.setattr(root, "handlers", [Collect()])
    monkeypatch.setattr(hub, "handlers", [Collect()])  # the library's own handler (a stderr one, in real life)
    monkeypatch.setattr(hub, "propagate", True)
    monkeypatch.setattr(logging.getLogger("transformers"), "handlers", list(logging.getLogger("transformers").handlers))
    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", False)
    log_through_the_application()
    logging.getLogger("huggingface_hub.file_download").warning("retrying")
    logging.getLogger("transformers.modeling_utils").warning("some weights unused")
    assert [record.getMessage() for record in records] == ["retrying", "some weights unused"]
