"""The command lines as a user runs them: text on stdout, and one-line errors with exit code 2."""

import os
import shutil
import socket
import subprocess
import sys

import pytest
from conftest import PROMPT, ROOT, one_line_error
from tf_reference import reference_greedy

import utils
from encoder import load_encoder


@pytest.fixture(scope="module")
def expected_text(tf_model):
    """What the TF reference model continues PROMPT with, decoded with tiktoken-independent BPE."""
    encoder = load_encoder(tf_model[0], fast=False)
    return encoder.decode(reference_greedy(tf_model[0], encoder.encode_python(PROMPT), 8))


def run(script, *args):
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script, backend", [("gpt2.py", "jax"), ("gpt2.py", "numpy"), ("gpt2_pico.py", None)])
def test_cli_prints_the_reference_continuation(tf_model, expected_text, script, backend):
    args = [PROMPT, "--n_tokens_to_generate", "8", "--model_size", tf_model[0]]
    result = run(script, *args, *(["--backend", backend] if backend else []))
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected_text + "\n"


def test_console_script_is_installed(tf_model, expected_text):
    script = shutil.which("gpt2", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("the project is not pip-installed in this environment")
    result = subprocess.run([script, PROMPT, "-n", "8", "--model_size", tf_model[0]], capture_output=True, text=True)
    assert result.stdout == expected_text + "\n", result.stderr


def test_empty_prompt_starts_from_endoftext(tf_model):
    encoder = load_encoder(tf_model[0])
    expected = encoder.decode(reference_greedy(tf_model[0], [encoder.eot_token], 5))
    result = run("gpt2.py", "", "--n_tokens_to_generate", "5", "--model_size", tf_model[0], "--backend", "numpy")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_help_lists_flags_with_defaults():
    result = run("gpt2.py", "--help")
    assert result.returncode == 0
    shown = result.stdout + result.stderr  # fire writes help to stderr when not on a terminal
    for flag, default in [("n_tokens_to_generate", "40"), ("model_size", "'124M'"), ("backend", "'jax'")]:
        assert f"--{flag}" in shown and f"Default: {default}" in shown
    assert "GROUP" not in shown and "FIRE_METADATA" not in shown  # what fire's SetParseFn adds


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_prompt_longer_than_context(tf_model, capsys):
    line = one_line_error(capsys, [PROMPT * 10, "--model_size", tf_model[0], "-n", "1"])
    assert "the prompt is 100 tokens but the model sees at most 64: shorten it" in line


@pytest.mark.parametrize("size", ["999M", "../x", "124m"])
def test_unknown_model_size_lists_valid_ones_and_writes_nothing(tmp_path, capsys, size):
    line = one_line_error(capsys, ["hi", "--model_size", size, "--models_dir", str(tmp_path / "models")])
    assert f"unknown --model_size {size!r}" in line and "124M, 355M, 774M, 1558M" in line
    assert not (tmp_path / "models").exists()
    assert not (tmp_path / "x").exists()


def test_corrupt_checkpoint_folder(model_copy, capsys):
    path = os.path.join(model_copy, "model.ckpt.data-00000-of-00001")
    os.truncate(path, os.path.getsize(path) // 3)
    line = one_line_error(capsys, ["hi", "--model_size", model_copy])
    assert "corrupt or truncated" in line and model_copy in line


def test_a_server_that_cannot_be_reached_is_one_line_at_once_naming_the_local_routes(tmp_path, capsys, monkeypatch):
    """No connection at all (no route, no DNS, refused) is not retried: the line comes at once."""
    url = closed_port_url()
    monkeypatch.setenv(utils.BASE_URL_ENV, url)
    models_dir = tmp_path / "models"
    assert one_line_error(capsys, ["hi", "--models_dir", str(models_dir)]) == (
        f"error: could not connect to 127.0.0.1 for {url}/124M/checkpoint (Connection refused): copy the release files into "
        f"{models_dir / '124M'} by hand (README: 'Offline machines'), give --model_size a model folder, or set GPT2_BASE_URL to a mirror"
    )


@pytest.mark.parametrize(
    "environ, tpu, gpu, libtpu, platforms",
    [
        ({}, False, False, True, "cpu"),  # libtpu without a TPU (or a GPU): the CPU is all there is, and libtpu never starts
        ({"JAX_PLATFORMS": "tpu,cpu"}, False, False, True, None),  # the user's choice wins
        ({"JAX_PLATFORMS": ""}, False, False, True, None),  # even JAX's own automatic choice
        ({}, True, False, True, None),  # a TPU host: the TPU is used as before
        ({}, False, True, True, None),  # a GPU host: JAX finds the GPU
        ({}, False, False, False, None),  # no libtpu: nothing to keep quiet
    ],
)
def test_libtpu_is_kept_from_starting_only_where_there_is_no_tpu(environ, tpu, gpu, libtpu, platforms):
    import cli

    assert cli.jax_platforms(environ, tpu, gpu, libtpu) == platforms


def test_bad_input_exits_2_without_traceback_in_a_real_process(tmp_path):
    result = run("gpt2.py", "hi", "--model_size", "../x", "--models_dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown --model_size '../x': it is neither one of 124M, 355M, 774M, 1558M nor an existing checkpoint folder"
    ]


def test_progress_off_a_terminal_is_plain_lines_and_none_for_a_short_step(monkeypatch, capsys):
    import cli

    monkeypatch.setattr(cli, "PLAIN_PROGRESS_S", 0.0)  # every update is past the interval
    for _ in cli.progress(range(3), desc="work", leave=False):
        pass
    lines = capsys.readouterr().err.splitlines(keepends=True)
    assert all(line.startswith("work: ") and line.endswith("\n") and "\r" not in line for line in lines)
    assert [line.split(" [")[0] for line in lines][-1] == "work: 100%|##########| 3/3"  # the last count, once
    assert len({line.split(" [")[0] for line in lines}) == len(lines)
    monkeypatch.setattr(cli, "PLAIN_PROGRESS_S", 30.0)
    for _ in cli.progress(range(3), desc="short"):
        pass
    assert capsys.readouterr().err == ""


def test_prepare_writes_no_carriage_returns_into_a_log(tmp_path):
    (tmp_path / "input.txt").write_text("ROMEO: a line of text.\n" * 200)
    args = ["train_jax.py", "prepare", "--input", str(tmp_path / "input.txt"), "--out", str(tmp_path / "data"), "--tokenizer", "bytes"]
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, timeout=300)  # bytes: text mode reads \r as \n
    assert done.returncode == 0, done.stderr
    assert b"\r" not in done.stderr and done.stderr.strip().endswith(b"vocabulary of 17 (bytes)")
