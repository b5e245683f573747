"""Self-checks of the independent test fixtures tf_reference.py, http_server.py and the network cut."""

import errno
import json
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
import tensorflow as tf
from conftest import float32_tolerance, forward_length

from http_server import serve
from tf_reference import read_checkpoint, reference_greedy, reference_logits, variable_shapes, write_release_checkpoint

HPARAMS = {"n_vocab": 300, "n_ctx": 32, "n_embd": 32, "n_head": 4, "n_layer": 2}
TOKENS = [5, 17, 299, 0, 42, 42, 7]
RELEASE_FILES = {"checkpoint", "hparams.json", "model.ckpt.data-00000-of-00001", "model.ckpt.index", "model.ckpt.meta"}
DATA = bytes(range(256)) * 40  # 10240 bytes


@pytest.fixture(scope="module")
def fake_vocab_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab")
    (path / "encoder.json").write_bytes(b'{"!": 0}')
    (path / "vocab.bpe").write_bytes(b"#version: 0.2\n")
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory, fake_vocab_dir):
    model_dir = tmp_path_factory.mktemp("ckpt") / "tiny"
    return model_dir, write_release_checkpoint(model_dir, HPARAMS, seed=0, vocab_dir=fake_vocab_dir)


# --- tf_reference ---------------------------------------------------------------------------


def test_release_layout_files(model, fake_vocab_dir):
    model_dir, _ = model
    assert {p.name for p in model_dir.iterdir()} == RELEASE_FILES | {"encoder.json", "vocab.bpe"}
    assert (model_dir / "checkpoint").read_text().splitlines()[0] == 'model_checkpoint_path: "model.ckpt"'
    assert json.loads((model_dir / "hparams.json").read_text()) == HPARAMS
    assert (model_dir / "vocab.bpe").read_bytes() == (fake_vocab_dir / "vocab.bpe").read_bytes()
    assert (model_dir / "model.ckpt.meta").stat().st_size < 200_000  # values are not graph constants


def test_variable_names_and_shapes(model):
    model_dir, params = model
    listed = dict(tf.train.list_variables(str(model_dir / "model.ckpt")))
    assert listed == variable_shapes(HPARAMS)
    assert listed["model/h1/mlp/c_proj/w"] == [1, 4 * 32, 32]
    assert {name: list(value.shape) for name, value in params.items()} == listed


def test_written_values_read_back_and_are_distinct(model):
    model_dir, params = model
    stored = read_checkpoint(model_dir)
    assert stored.keys() == params.keys()
    for name, value in params.items():
        assert value.dtype == np.float32 and np.array_equal(stored[name], value), name
        assert value.std() > 0.01, name
    assert not np.allclose(params["model/h0/ln_1/g"], params["model/h0/ln_2/g"])
    assert not np.allclose(params["model/h0/ln_1/b"], params["model/h1/ln_1/b"])


def test_same_seed_same_values(tmp_path, model):
    _, params = model
    again = write_release_checkpoint(tmp_path, HPARAMS, seed=0)
    assert all(np.array_equal(again[name], value) for name, value in params.items())


def test_reference_logits(model):
    model_dir, _ = model
    logits = reference_logits(model_dir, TOKENS)
    assert logits.shape == (len(TOKENS), HPARAMS["n_vocab"]) and logits.dtype == np.float32
    assert np.isfinite(logits).all()
    assert 5 < logits.std() < 20  # logit_scale=10


def test_reference_logits_causal_and_position_dependent(model):
    model_dir, _ = model
    full = reference_logits(model_dir, TOKENS)
    prefix = reference_logits(model_dir, TOKENS[:3])
    tolerance = float32_tolerance(np.abs(full).max(), forward_length(HPARAMS, len(TOKENS)))  # TensorFlow sums 3 or 7 rows
    np.testing.assert_allclose(prefix, full[:3], atol=tolerance, rtol=0)
    assert np.abs(full[4] - full[5]).max() > 100 * tolerance  # same token (42), different position: far beyond rounding


def test_reference_greedy(model):
    model_dir, _ = model
    new = reference_greedy(model_dir, TOKENS[:3], 4)
    assert len(new) == 4 and all(isinstance(t, int) and 0 <= t < HPARAMS["n_vocab"] for t in new)
    ids = TOKENS[:3]
    for token in new:
        assert token == int(np.argmax(reference_logits(model_dir, ids)[-1]))
        ids = ids + [token]


# --- http_server ----------------------------------------------------------------------------


def test_full_and_range_get():
    with serve({"f.bin": DATA}) as server:
        full = requests.get(f"{server.url}/f.bin", timeout=5)
        part = requests.get(f"{server.url}/f.bin", headers={"Range": "bytes=1000-"}, timeout=5)
        past_end = requests.get(f"{server.url}/f.bin", headers={"Range": f"bytes={len(DATA)}-"}, timeout=5)
        missing = requests.get(f"{server.url}/nope", timeout=5)
    assert full.status_code == 200 and full.content == DATA
    assert full.headers["Content-Length"] == str(len(DATA))
    assert part.status_code == 206 and part.content == DATA[1000:]
    assert part.headers["Content-Range"] == f"bytes 1000-{len(DATA) - 1}/{len(DATA)}"
    assert part.headers["Content-Length"] == str(len(DATA) - 1000)
    assert past_end.status_code == 416
    assert missing.status_code == 404
    assert server.requests == [("/f.bin", None), ("/f.bin", "bytes=1000-"), ("/f.bin", f"bytes={len(DATA)}-"),
                               ("/nope", None)]


def test_drop_after_first_get_only():
    with serve({"f.bin": DATA}, drop_after={"f.bin": 100}) as server:
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            requests.get(f"{server.url}/f.bin", timeout=5).content
        with requests.get(f"{server.url}/f.bin", stream=True, timeout=5) as dropped:
            pass
        resumed = requests.get(f"{server.url}/f.bin", headers={"Range": "bytes=100-"}, timeout=5)
    assert dropped.status_code == 200
    assert resumed.status_code == 206 and resumed.content == DATA[100:]


def test_drop_after_partial_body_is_delivered():
    with serve({"f.bin": DATA}, drop_after={"f.bin": 100}) as server:
        received = b""
        with requests.get(f"{server.url}/f.bin", stream=True, timeout=5) as response:
            assert response.headers["Content-Length"] == str(len(DATA))
            with pytest.raises(requests.exceptions.ChunkedEncodingError):
                for chunk in response.iter_content(10):
                    received += chunk
    assert received == DATA[:100]


def test_ignore_range():
    with serve({"f.bin": DATA}, ignore_range=True) as server:
        response = requests.get(f"{server.url}/f.bin", headers={"Range": "bytes=1000-"}, timeout=5)
    assert response.status_code == 200 and response.content == DATA
    assert "Content-Range" not in response.headers


def test_status_sequence_then_normal():
    with serve({"f.bin": DATA, "g.bin": b"g"}, status={"f.bin": [500, 503, 404]}) as server:
        codes = [requests.get(f"{server.url}/f.bin", timeout=5).status_code for _ in range(4)]
        other = requests.get(f"{server.url}/g.bin", timeout=5)
    assert codes == [500, 503, 404, 200]
    assert other.status_code == 200 and other.content == b"g"


def test_wrong_length_first_request_only():
    with serve({"f.bin": DATA}, wrong_length={"f.bin": 50}) as server:
        first = requests.get(f"{server.url}/f.bin", timeout=5)
        second = requests.get(f"{server.url}/f.bin", timeout=5)
    assert first.headers["Content-Length"] == "50" and len(first.content) == 50
    assert second.content == DATA


def test_delay_times_out_client_and_exit_is_bounded():
    start = time.monotonic()
    with serve({"f.bin": DATA}, delay=30) as server:
        with pytest.raises(requests.exceptions.Timeout):
            requests.get(f"{server.url}/f.bin", timeout=0.3)
    assert time.monotonic() - start < 3


# --- no_network (conftest.py, no_network/sitecustomize.py) -----------------------------------


def test_the_network_cut_stops_every_connection_but_the_loopbacks_here_and_in_subprocesses(no_network):
    with pytest.raises(OSError) as error:
        socket.create_connection(("10.255.255.1", 80), timeout=2)  # without the cut: a timeout (errno None)
    assert error.value.errno == errno.ENETUNREACH
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo("pypi.org", 443)
    with serve({"f": DATA}) as server:
        assert requests.get(f"{server.url}/f", timeout=10).content == DATA
    code = "import socket\ntry:\n    socket.create_connection(('10.255.255.1', 80), timeout=2)\nexcept OSError as e:\n    print(e.errno)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == str(errno.ENETUNREACH), done.stderr
