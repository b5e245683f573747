"""Faults: downloads that break, files that rot, training runs that are killed or blow up, and files
that try to run code. Each shows what the user sees and that nothing is lost or half-written."""

import errno
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, one_line_error
from http_server import serve
from test_download import BODY, fast_retries, read  # noqa: F401 (fast_retries: an autouse fixture)
from test_train import data_dir  # noqa: F401 (a fixture: the test corpus, prepared with the bytes tokenizer)

import gpt2
import train_jax
import utils
import checkpoints
import formats
from cli import UserError
from formats import RELEASE_FILES
from utils import download_file
from step import state_shape


def release_files(model_dir, size="124M"):
    return {f"{size}/{name}": read(os.path.join(model_dir, name)) for name in RELEASE_FILES}


# ---------------------------------------------------------------------------------------------
# 1. Downloads


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_connection_dropped_at_a_random_byte_resumes_from_there(seed, tmp_path):
    drop_at = random.Random(seed).randrange(1, len(BODY))
    with serve({"f": BODY}, drop_after={"f": drop_at}) as server:
        download_file(f"{server.url}/f", str(tmp_path / "f"))
    assert read(tmp_path / "f") == BODY
    assert server.requests == [("/f", None), ("/f", f"bytes={drop_at}-")]  # not a byte fetched twice
    assert os.listdir(tmp_path) == ["f"]


def test_a_shorter_content_length_is_caught_at_load_and_a_fresh_download_repairs_it(tf_model, tmp_path, monkeypatch, capsys):
    """HTTP cannot tell a body cut to a wrong Content-Length from the whole file; the checkpoint's
    own checksums can. The error says which files to delete, and the next run fetches them again."""
    data = "model.ckpt.data-00000-of-00001"
    files = release_files(tf_model[0])
    models = tmp_path / "models"
    argv = ["hi", "--models_dir", str(models), "--backend", "numpy", "-n", "2"]
    with serve(files, wrong_length={f"124M/{data}": len(files[f"124M/{data}"]) - 100}) as server:
        monkeypatch.setenv(utils.BASE_URL_ENV, server.url)
        line = one_line_error(capsys, argv)
        assert f"the checkpoint in {models / '124M'} is corrupt or truncated" in line
        assert "delete its model.ckpt.* files and load again to re-download" in line
        for name in os.listdir(models / "124M"):
            if name.startswith("model.ckpt."):
                os.remove(models / "124M" / name)
        gpt2.cli(argv)
    fetched = [path for path, _ in server.requests]
    assert sorted(fetched[len(RELEASE_FILES):]) == sorted(f"/124M/{n}" for n in RELEASE_FILES if n.startswith("model.ckpt."))
    assert read(models / "124M" / data) == files[f"124M/{data}"]
    assert capsys.readouterr().out.strip()  # it generated


@pytest.mark.parametrize("fault", ["timeout", "500"])
def test_a_server_that_never_answers_well_gives_one_line_naming_the_url_and_the_fallback(fault, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(utils, "DOWNLOAD_BACKOFF_S", 0.01)
    monkeypatch.setattr(utils, "DOWNLOAD_RETRIES", 3)
    monkeypatch.setattr(utils, "DOWNLOAD_TIMEOUT_S", 0.3)
    behaviour = {"delay": 2.0} if fault == "timeout" else {"status": {"124M/checkpoint": [500] * 3}}
    models = tmp_path / "models"
    with serve({"124M/checkpoint": b"x"}, **behaviour) as server:
        monkeypatch.setenv(utils.BASE_URL_ENV, server.url)
        line = one_line_error(capsys, ["hi", "--models_dir", str(models)])
    assert len(server.requests) == 3  # retried
    error = "ReadTimeout" if fault == "timeout" else "RetryableError"
    assert line == (
        f"error: could not download {server.url}/124M/checkpoint after 3 tries ({error}); check your network, or copy the "
        f"release files into {models / '124M'} by hand (README: 'Offline machines'), give --model_size a model folder, or set "
        f"GPT2_BASE_URL to a mirror"
    )
    assert not (models / "124M" / "checkpoint").exists()


class FullDisk:
    """A file that takes `room` bytes, then fails as a full disk does."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_full_disk_is_one_clear_error_and_no_final_file(tmp_path, monkeypatch):
    room = 5 * (1 << 16) + 123
    monkeypatch.setattr(utils, "open", lambda path, mode: FullDisk(open(path, mode), room), raising=False)
    path = tmp_path / "model.ckpt.data"
    with serve({"f": BODY}) as server:
        with pytest.raises(UserError) as error:
            download_file(f"{server.url}/f", str(path))
        assert len(server.requests) == 1  # a full disk is not retried
        kept = (tmp_path / "model.ckpt.data.part").stat().st_size
        assert str(error.value) == (
            f"could not write {path}.part (No space left on device): free some disk space (or fix the folder's "
            f"permissions) and run again; the download resumes from the {kept} bytes kept in {path}.part"
        )
        assert not path.exists() and read(f"{path}.part") == BODY[:kept]
        monkeypatch.undo()  # space was freed
        monkeypatch.setattr(utils, "DOWNLOAD_BACKOFF_S", 0.01)
        download_file(f"{server.url}/f", str(path))
    assert server.requests[1] == ("/f", f"bytes={kept}-")
    assert read(path) == BODY


def test_two_processes_downloading_one_model_fetch_each_file_once(tf_model, tmp_path):
    files = release_files(tf_model[0])
    code = "import sys, utils; _, _, p = utils.load_encoder_hparams_and_params('124M', sys.argv[1]); print(float(p['wte'].sum()))"
    with serve(files, delay=0.3) as server:  # slow enough that the two overlap
        env = {**os.environ, utils.BASE_URL_ENV: server.url}
        processes = [
            subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "models")], cwd=ROOT, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(2)
        ]  # fmt: skip
        results = [(p.communicate(timeout=300), p.returncode) for p in processes]
    assert [code for _, code in results] == [0, 0], [err for (_, err), _ in results]
    assert sorted(path for path, _ in server.requests) == sorted(f"/{name}" for name in files)  # each once
    assert results[0][0][0] == results[1][0][0]  # the same params
    assert any("waiting for another process downloading into" in err for (_, err), _ in results)
    assert sorted(os.listdir(tmp_path / "models" / "124M")) == sorted([*RELEASE_FILES, formats.CACHE_FILE])


# ---------------------------------------------------------------------------------------------
# 2. Corrupt files in a released-size folder: named, and fixed by deleting them and running again


def flip_a_bit(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))


@pytest.mark.parametrize(
    "damage, message, delete",
    [
        ("truncate model.ckpt.data-00000-of-00001", "is corrupt or truncated", ["model.ckpt.data-00000-of-00001"]),
        ("bitflip model.ckpt.data-00000-of-00001", "is corrupt or truncated", ["model.ckpt.data-00000-of-00001"]),
        ("bitflip model.ckpt.index", "is corrupt or truncated", ["model.ckpt.index"]),
        ("garble hparams.json", "hparams.json is corrupt", ["hparams.json"]),
        ("garble encoder.json", "encoder.json or vocab.bpe in", ["encoder.json"]),
        ("garble vocab.bpe", "encoder.json or vocab.bpe in", ["vocab.bpe"]),
    ],
)
def test_a_corrupt_release_file_is_named_and_a_fresh_download_repairs_it(damage, message, delete, tf_model, tmp_path, monkeypatch, capsys):
    how, name = damage.split()
    files = release_files(tf_model[0])
    model_dir = tmp_path / "models" / "124M"
    model_dir.mkdir(parents=True)
    for path, data in files.items():
        (tmp_path / "models" / path).write_bytes(data)
    argv = ["hi", "--models_dir", str(tmp_path / "models"), "--backend", "numpy", "-n", "2"]
    gpt2.cli(argv)  # converted and cached
    expected = capsys.readouterr().out
    if how == "truncate":
        os.truncate(model_dir / name, os.path.getsize(model_dir / name) // 2)
    elif how == "bitflip":
        flip_a_bit(model_dir / name)
    else:
        (model_dir / name).write_text('{"n_vocab": 50257, "n_ctx": ' if name.endswith(".json") else "#version: 0.2\nĠ t h e\n")
    line = one_line_error(capsys, argv)
    assert message in line and str(model_dir) in line and ("download" in line and "delete" in line)
    for name in delete:
        os.remove(model_dir / name)
    with serve(files) as server:
        monkeypatch.setenv(utils.BASE_URL_ENV, server.url)
        gpt2.cli(argv)
    assert [path for path, _ in server.requests] == [f"/124M/{name}" for name in delete]
    assert capsys.readouterr().out == expected


# ---------------------------------------------------------------------------------------------
# 3. Training: killed at random moments, half-written checkpoints, NaN losses

TINY = dict(n_layer=2, n_head=2, n_embd=16, block_size=16, batch_size=4, data_url="", peak_flops=1e12, eval_iters=2)


def steps_on_disk(out_dir):
    folder = os.path.join(out_dir, "checkpoints")
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def temporary_dirs(out_dir):
    folder = os.path.join(out_dir, "checkpoints")
    return [n for n in os.listdir(folder) if ".orbax-checkpoint-tmp" in n] if os.path.isdir(folder) else []


@pytest.mark.slow  # 40 s; the default run keeps a SIGKILLed resume (test_train) and a half-written checkpoint (below)
def test_killed_at_random_moments_and_mid_save_the_run_ends_bit_exact(data_dir, tmp_path):
    """SIGKILL three times, the second one while a checkpoint is being written; each restart
    resumes from the last complete checkpoint, and the finished params are the uninterrupted run's."""
    import jax

    flags = dict(max_iters=60, ckpt_interval=5, eval_interval=5, log_interval=20, keep=2, dropout=0.1, **TINY)
    out = tmp_path / "killed"
    argv = ["train_jax.py", "--data_dir", data_dir, "--out_dir", str(out)]
    argv += [f"--{k}={v!r}" if isinstance(v, str) else f"--{k}={v}" for k, v in flags.items()]
    rng = random.Random(6)
    for kill in range(3):
        resume = ["--resume"] if steps_on_disk(out) else []
        process = subprocess.Popen([sys.executable, *argv, *resume], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = (steps_on_disk(out) or [0])[-1] + 5 * rng.randint(1, 2)
        while process.poll() is None and (steps_on_disk(out) or [0])[-1] < target:
            time.sleep(0.002)
        if kill == 1:  # wait for the next save to begin
            while process.poll() is None and not temporary_dirs(out):
                time.sleep(0.0005)
        else:
            time.sleep(rng.uniform(0, 0.3))
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL
        if kill == 1:
            assert temporary_dirs(out), "the kill came after the save finished"
        assert 0 < steps_on_disk(out)[-1] < 60
    manager = checkpoints.checkpoint_manager(str(out), 2)
    last_complete = manager.latest_step()
    manager.close()
    resumed = subprocess.run([sys.executable, *argv, "--resume"], cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {out} at step {last_complete}" in resumed.stderr
    whole = train_jax.fit(train_jax.default_flags(data_dir=data_dir, out_dir=str(tmp_path / "whole"), **flags))
    manager = checkpoints.checkpoint_manager(str(out), 2)
    state, _ = checkpoints.restore_checkpoint(manager, 60, whole["state"])
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(whole["state"])):
        np.testing.assert_array_equal(a, b)
    assert not temporary_dirs(out)


def test_a_half_written_checkpoint_is_never_the_latest(data_dir, tmp_path):
    out = tmp_path / "run"
    flags = train_jax.default_flags(data_dir=data_dir, out_dir=str(out), max_iters=4, lr_decay_iters=6, ckpt_interval=2, eval_interval=2, log_interval=1, **TINY)
    train_jax.fit(flags)
    shutil.copytree(out / "checkpoints" / "4", out / "checkpoints" / "6.orbax-checkpoint-tmp-1234")  # a save killed part way
    summary = train_jax.fit({**flags, "max_iters": 6, "resume": True})
    assert min(summary["losses"]) == 5  # resumed after step 4, not from the half-written 6
    assert steps_on_disk(out)[-1] == 6


LR_BLOWUP = dict(learning_rate=1e30, warmup_iters=0, max_iters=5, ckpt_interval=1, eval_interval=1, log_interval=1, **TINY)


def test_a_nan_loss_stops_the_run_at_its_step_with_the_last_good_checkpoint_intact(data_dir, tmp_path, capsys):
    """A learning rate of 1e30: step 1 is finite, its update overflows the weights, step 2's loss is NaN."""
    import jax

    out = tmp_path / "run"
    argv = ["--data_dir", data_dir, "--out_dir", str(out), *(f"--{k}={v}" for k, v in LR_BLOWUP.items() if k != "data_url"), "--data_url="]
    with pytest.raises(SystemExit) as exit_info:
        train_jax.cli(argv)
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err == [
        (
            "error: the loss is nan at step 2; stopped with the last good checkpoint (step 1) intact: lower "
            "--learning_rate in a new run, or --resume with --nan_policy skip"
        )
    ]
    assert steps_on_disk(out) == [1]
    manager = checkpoints.checkpoint_manager(str(out), 3)
    state, loader = checkpoints.restore_checkpoint(manager, 1, state_shape(checkpoints.read_config(str(out))))
    assert loader["next_batch"] == 1 and all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(state))
    manager.close()
    train_jax.cli([*argv, "--resume", "--nan_policy=skip"])  # goes on past the NaN steps
    assert steps_on_disk(out)[-1] == 5


def test_nan_policy_skip_leaves_out_the_non_finite_updates(data_dir, tmp_path, capfd):
    import jax

    one = train_jax.fit(train_jax.default_flags(data_dir=data_dir, out_dir=str(tmp_path / "one"), **{**LR_BLOWUP, "max_iters": 1}))
    skip = train_jax.fit(train_jax.default_flags(data_dir=data_dir, out_dir=str(tmp_path / "skip"), **LR_BLOWUP, nan_policy="skip"))
    assert np.isfinite(skip["losses"][1]) and all(np.isnan(skip["losses"][s]) for s in range(2, 6))
    for a, b in zip(jax.tree.leaves(one["state"]["params"]), jax.tree.leaves(skip["state"]["params"])):
        np.testing.assert_array_equal(a, b)  # steps 2..5 changed nothing
    err = capfd.readouterr().err
    lines = [f"step {s}: 1 of the last 1 updates skipped, the first at step {s} (loss nan, --nan_policy skip)" for s in range(2, 6)]
    assert [line in err for line in lines] == [True] * 4 and skip["skipped"] == 4


READ_BACK_AT_5 = {**LR_BLOWUP, "ckpt_interval": 5, "eval_interval": 5, "log_interval": 5}


def test_bad_steps_between_read_backs_are_counted_on_the_device(data_dir, tmp_path, capfd):
    """The loss is read only at step 5: the device keeps the first non-finite step (2) and the count."""
    skip = train_jax.fit(train_jax.default_flags(data_dir=data_dir, out_dir=str(tmp_path / "skip"), **READ_BACK_AT_5, nan_policy="skip"))
    assert list(skip["losses"]) == [5] and skip["skipped"] == 4
    assert "step 5: 4 of the last 5 updates skipped, the first at step 2 (loss nan, --nan_policy skip)" in capfd.readouterr().err
    with pytest.raises(UserError, match=re.escape("the loss is nan at step 2; stopped before the first checkpoint: lower")):
        train_jax.fit(train_jax.default_flags(data_dir=data_dir, out_dir=str(tmp_path / "stop"), **READ_BACK_AT_5))
    assert steps_on_disk(tmp_path / "stop") == []  # the state after the bad step is never saved


# ---------------------------------------------------------------------------------------------
# 5. No code execution from files

NO_CODE = re.compile(r"\bimport (c?pickle|dill|shelve|marshal)\b|\bpickle\.|allow_pickle\s*=\s*True|(?<![\w.])(eval|exec)\(|torch\.load|yaml\.load\(")


def project_sources():
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "__pycache__", "build") and "venv" not in d]
        yield from (os.path.join(folder, n) for n in names if n.endswith(".py"))


def test_no_pickle_and_no_eval_in_the_project_or_in_orbax():
    import orbax.checkpoint

    assert NO_CODE.search("x = eval(text)") and NO_CODE.search("np.load(f, allow_pickle=True)") and NO_CODE.search("import pickle")
    assert not NO_CODE.search("jax.eval_shape(f)") and not NO_CODE.search("estimate_loss(eval_loss, p)")
    sources = list(project_sources())
    assert {"gpt2.py", "utils.py", "train_jax.py", "encoder.py"} <= {os.path.basename(p) for p in sources}
    found = [(p, m[0]) for p in sources for m in NO_CODE.finditer(read(p).decode())]
    assert found == []
    orbax_dir = os.path.dirname(orbax.checkpoint.__file__)
    orbax_sources = [os.path.join(d, n) for d, _, names in os.walk(orbax_dir) for n in names if n.endswith(".py") and "testing" not in d]
    assert [p for p in orbax_sources if re.search(r"\bimport (c?pickle|cloudpickle|dill)\b|pickle\.loads?\(", read(p).decode())] == []


class Exploit:
    def __reduce__(self):
        return (open, (os.environ["EXPLOIT_MARKER"], "w"))


def test_a_pickle_in_place_of_a_training_checkpoint_is_rejected_unrun(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    flags = train_jax.default_flags(data_dir=data_dir, out_dir=str(out), max_iters=2, lr_decay_iters=4, ckpt_interval=2, **TINY)
    train_jax.fit(flags)
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EXPLOIT_MARKER", str(marker))
    for pattern, message in [("state/*", f"the checkpoint {out / 'checkpoints' / '2'} cannot be read"),
                             ("**/*", f"a checkpoint in {out / 'checkpoints'} cannot be read")]:  # fmt: skip
        for path in (out / "checkpoints" / "2").glob(pattern):
            if path.is_file():
                path.write_bytes(pickle.dumps({"state": Exploit()}))
        with pytest.raises(UserError, match=re.escape(message)):
            train_jax.fit({**flags, "max_iters": 4, "resume": True})
        assert not marker.exists()
    for name in ("meta.json", "train.bin"):
        fake = tmp_path / "data"
        shutil.copytree(data_dir, fake, dirs_exist_ok=True)
        (fake / name).write_bytes(pickle.dumps(Exploit()))
        with pytest.raises(UserError):
            train_jax.fit(train_jax.default_flags(data_dir=str(fake), out_dir=str(tmp_path / name), max_iters=1, **TINY))
        assert not marker.exists()
