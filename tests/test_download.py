"""Downloads from a local HTTP server on 127.0.0.1 that the tests control."""

import os

import numpy as np
import pytest
from http_server import serve

import utils
from cli import UserError
from formats import RELEASE_FILES
from utils import download_file, load_encoder_hparams_and_params

BODY = bytes(range(256)) * 4096  # 1 MiB with no repeats at small offsets


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(utils, "DOWNLOAD_BACKOFF_S", 0.01)
    monkeypatch.setattr(utils, "DOWNLOAD_TIMEOUT_S", 3)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def test_downloads_a_released_size_and_loads_it(tf_model, tmp_path, monkeypatch):
    files = {f"124M/{name}": read(os.path.join(tf_model[0], name)) for name in RELEASE_FILES}
    models_dir = tmp_path / "models"
    with serve(files) as server:
        monkeypatch.setenv(utils.BASE_URL_ENV, server.url)
        _, hparams, params = load_encoder_hparams_and_params("124M", str(models_dir))
        assert sorted(path for path, _ in server.requests) == sorted(f"/{name}" for name in files)
        load_encoder_hparams_and_params("124M", str(models_dir))  # complete now: nothing fetched again
        assert len(server.requests) == len(files)
    _, _, expected = load_encoder_hparams_and_params(tf_model[0])
    np.testing.assert_array_equal(params["wte"], expected["wte"])
    assert not [name for name in os.listdir(models_dir / "124M") if name.endswith(".part")]


def test_folder_with_missing_files_is_completed(tf_model, tmp_path, monkeypatch):
    model_dir = tmp_path / "models" / "124M"
    model_dir.mkdir(parents=True)
    present = ["hparams.json", "encoder.json", "vocab.bpe", "checkpoint"]
    for name in present:
        (model_dir / name).write_bytes(read(os.path.join(tf_model[0], name)))
    files = {f"124M/{name}": read(os.path.join(tf_model[0], name)) for name in RELEASE_FILES}
    with serve(files) as server:
        monkeypatch.setenv(utils.BASE_URL_ENV, server.url)
        load_encoder_hparams_and_params("124M", str(tmp_path / "models"))
    fetched = {path.split("/")[-1] for path, _ in server.requests}
    assert fetched == set(RELEASE_FILES) - set(present)


def test_resumes_a_half_written_part_with_range(tmp_path):
    path = tmp_path / "model.ckpt.data"
    (tmp_path / "model.ckpt.data.part").write_bytes(BODY[:300_000])
    with serve({"f": BODY}) as server:
        download_file(f"{server.url}/f", str(path))
    assert server.requests == [("/f", "bytes=300000-")]
    assert read(path) == BODY
    assert not (tmp_path / "model.ckpt.data.part").exists()


def test_survives_a_dropped_connection(tmp_path):
    path = tmp_path / "f"
    with serve({"f": BODY}, drop_after={"f": 123_457}) as server:
        download_file(f"{server.url}/f", str(path))
    assert read(path) == BODY
    assert server.requests[0] == ("/f", None)
    assert server.requests[1][1].startswith("bytes=") and int(server.requests[1][1][6:-1]) > 0


def test_server_ignoring_range_restarts_cleanly(tmp_path):
    path = tmp_path / "f"
    (tmp_path / "f.part").write_bytes(b"x" * 1000)  # whatever is there is replaced, never prefixed
    with serve({"f": BODY}, ignore_range=True) as server:
        download_file(f"{server.url}/f", str(path))
    assert server.requests == [("/f", "bytes=1000-")]  # asked to resume, got the whole file
    assert read(path) == BODY


def test_short_body_for_its_content_length_is_not_accepted_as_complete(tmp_path):
    """A body shorter than its Content-Length is resumed; a longer one cannot be told over HTTP
    (the checkpoint loader reports that file as truncated)."""
    path = tmp_path / "f"
    with serve({"f": BODY}, wrong_length={"f": len(BODY) + 1000}) as server:
        download_file(f"{server.url}/f", str(path))
    assert read(path) == BODY
    assert len(server.requests) >= 2


def test_server_errors_are_retried(tmp_path):
    path = tmp_path / "f"
    with serve({"f": BODY}, status={"f": [500, 503]}) as server:
        download_file(f"{server.url}/f", str(path))
    assert read(path) == BODY and len(server.requests) == 3


def test_404_fails_at_once_with_a_clear_message(tmp_path):
    with serve({}) as server:
        url = f"{server.url}/124M/checkpoint"
        with pytest.raises(UserError, match=f"{url} answered HTTP 404.*download the files by hand"):
            download_file(url, str(tmp_path / "checkpoint"))
    assert len(server.requests) == 1
    assert not os.listdir(tmp_path)


def test_gives_up_after_retries_and_keeps_the_part(tmp_path):
    path = tmp_path / "f"
    with serve({"f": BODY}, status={"f": [500] * utils.DOWNLOAD_RETRIES}) as server:
        with pytest.raises(UserError, match=f"could not download {server.url}/f after {utils.DOWNLOAD_RETRIES} tries"):
            download_file(f"{server.url}/f", str(path))
    assert not path.exists()
