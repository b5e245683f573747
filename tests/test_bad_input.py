"""Every flag of gpt2.py and train_jax.py (train, prepare, export) with wrong values: exit code 2, one
`error:` line that names the flag (or the file) and the fix, and not one file created or changed."""

import json
import os
import subprocess
import sys

import pytest
from conftest import PROMPT, ROOT

import gpt2
import data
import train_jax
from utils import load_encoder_hparams_and_params

CORPUS = "".join(f"ROMEO: line {i}, said twice.\nJULIET: and answered {i % 7}!\n\n" for i in range(200))
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=8", "--block_size=8", "--batch_size=2", "--eval_iters=1", "--peak_flops=1e9"]


def snapshot(*folders):
    """{path: (size, mtime)} of every file and folder under `folders`."""
    found = {}
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            for name in dirs + files:
                path = os.path.join(root, name)
                found[path] = (os.path.getsize(path), os.stat(path).st_mtime_ns)
    return found


def one_error_line(cli, argv, capsys, *folders):
    """Run `cli(argv)` in-process: exit code 2, one `error:` line and nothing else on stderr, no
    file changed under `folders`. The line."""
    before = snapshot(*folders)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert snapshot(*folders) == before
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tf_model):
    """Things to point flags at: a file, a folder that is not a checkpoint, non-UTF-8 text, and the
    model (loaded once, so that its cache exists before the snapshots)."""
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "a_file").write_text("not a folder\n")
    (folder / "not_a_model").mkdir()
    (folder / "latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
    (folder / "empty.txt").write_bytes(b"")
    (folder / "corpus.txt").write_text(CORPUS)
    load_encoder_hparams_and_params(tf_model[0])
    return {name.removesuffix(".txt"): str(folder / name) for name in ("a_file", "not_a_model", "latin1.txt", "empty.txt", "corpus.txt")}


# ---------------------------------------------------------------------------------------------
# gpt2.py

GPT2_CASES = [
    ("n_tokens_to_generate", ["--n_tokens_to_generate=many"], "must be a positive integer, got 'many'"),
    ("n_tokens_to_generate", ["--n_tokens_to_generate=-1"], "must be a positive integer, got -1"),
    ("n_tokens_to_generate", ["--n_tokens_to_generate=0"], "must be a positive integer, got 0"),
    ("n_tokens_to_generate", ["--n_tokens_to_generate=2.5"], "must be a positive integer, got 2.5"),
    ("n_tokens_to_generate", ["--n_tokens_to_generate=1000"],
     "the prompt is 10 tokens, so at most 54 new tokens fit in n_ctx=64: lower --n_tokens_to_generate or shorten the prompt"),
    ("model_size", ["--model_size=999M"], "unknown --model_size '999M': it is neither one of 124M"),
    ("model_size", ["--model_size=/nonexistent/model"], "unknown --model_size '/nonexistent/model'"),
    ("model_size", ["--model_size={not_a_model}"], "is not a complete checkpoint: missing checkpoint"),
    ("model_size", ["--model_size=../../outside"], "unknown --model_size '../../outside'"),
    ("models_dir", ["--model_size=124M", "--models_dir={a_file}"], "is a file, not a folder: give the path of a folder"),
    ("backend", ["--backend=torch"], "unknown --backend 'torch': use jax or numpy"),
    ("backend", ["--backend=5"], "unknown --backend 5"),
    ("prompts_file", ["--prompts_file=/nonexistent/prompts.txt"], "does not exist: give a text file"),
    ("prompts_file", ["--prompts_file={not_a_model}"], "cannot be read (Is a directory)"),
    ("prompts_file", ["--prompts_file={latin1}"], "is not UTF-8 text (byte 3): re-save it as UTF-8"),
    ("prompts_file", ["--prompts_file=5"], "'5' does not exist"),  # not file descriptor 5
    ("temperature", ["--temperature=hot"], "must be a number >= 0 (0 is greedy), got 'hot'"),
    ("temperature", ["--temperature=-1"], "must be a number >= 0"),
    ("temperature", ["--temperature=1e999"], "must be a number >= 0 (0 is greedy), got inf"),
    ("top_k", ["--top_k=-1"], "must be an integer >= 0 (0 keeps all tokens)"),
    ("top_k", ["--top_k=2.5"], "must be an integer >= 0"),
    ("top_k", ["--top_k=100000", "--temperature=1"], "exceeds the vocabulary of 50257 tokens"),
    ("top_p", ["--top_p=0"], "must be a number in (0, 1]"),
    ("top_p", ["--top_p=1.5"], "must be a number in (0, 1]"),
    ("top_p", ["--top_p=most"], "must be a number in (0, 1]"),
    ("seed", ["--seed=-1"], "must be an integer in [0, 2**32)"),
    ("seed", ["--seed=1099511627776"], "must be an integer in [0, 2**32)"),
    ("seed", ["--seed=lucky"], "must be an integer in [0, 2**32), got 'lucky'"),
    ("stop_at_eot", ["--stop_at_eot=maybe"], "takes no value: give --stop_at_eot or --nostop_at_eot"),
    ("dtype", ["--dtype=float16"], "--dtype 'float16' is not available with --backend jax: use float32 or bfloat16"),
    ("dtype", ["--dtype=bfloat16", "--backend=numpy"], "is not available with --backend numpy: use float32"),
    ("mesh", ["--mesh=xx=2"], "unknown mesh axis 'xx' in --mesh xx=2: the axes are dp, fsdp and tp"),
    ("mesh", ["--mesh=dp=2"], "--mesh dp=2 uses 2 devices but there are 1: make the sizes multiply to 1"),
    ("mesh", ["--mesh=tp=abc"], "--mesh tp=abc: give tp a positive number of devices"),
    ("mesh", ["--mesh=dp=-1,tp=-1"], "--mesh dp=-1,tp=-1: only one axis can be -1"),
    ("n_tokens_to_generate", ["--n_token=5"], "unknown flag --n_token: did you mean --n_tokens_to_generate?"),
    ("bogus", ["--bogus", "3"], "unknown flag --bogus: the flags are --n_tokens_to_generate, --model_size"),
]


@pytest.mark.parametrize("flag, args, message", GPT2_CASES, ids=[f"{c[0]}:{' '.join(c[1])}" for c in GPT2_CASES])
def test_gpt2_flag(flag, args, message, files, tf_model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths land here, where the snapshot looks
    argv = [PROMPT, "--model_size", tf_model[0], "-n", "4", *(arg.format(**files) for arg in args)]
    line = one_error_line(gpt2.cli, argv, capsys, tmp_path, tf_model[0], os.path.dirname(files["a_file"]))
    assert f"--{flag}" in line and message in line


def test_a_prompt_of_5000_tokens(tf_model, tmp_path, capsys):
    line = one_error_line(gpt2.cli, ["hello" + " hello" * 4999, "--model_size", tf_model[0]], capsys, tmp_path, tf_model[0])
    assert "the prompt is 5000 tokens but the model sees at most 64: shorten it" in line


# ---------------------------------------------------------------------------------------------
# train_jax.py: train, prepare, export


@pytest.fixture(scope="module")
def data_folders(tmp_path_factory, files):
    """A prepared data folder, the same with an id outside its vocabulary, one with a garbled
    meta.json, and a finished one-step run."""
    import shutil

    import numpy as np

    folder = tmp_path_factory.mktemp("data")
    data.prepare(input=files["corpus"], out=str(folder / "good"), tokenizer="bytes")
    shutil.copytree(folder / "good", folder / "big_id")
    ids = np.fromfile(folder / "big_id" / "train.bin", np.uint16)
    ids[5] = 300
    ids.tofile(folder / "big_id" / "train.bin")
    meta = json.loads((folder / "big_id" / "meta.json").read_text())
    (folder / "big_id" / "meta.json").write_text(json.dumps({**meta, "largest_id": 300}))  # start-up reads this, not the ids
    shutil.copytree(folder / "good", folder / "bad_meta")
    (folder / "bad_meta" / "meta.json").write_text('{"tokenizer": "bytes", "vocab_')
    argv = ["--data_dir", str(folder / "good"), "--out_dir", str(folder / "run"), "--data_url=", "--max_iters=1", *TINY]
    train_jax.cli(argv)
    shutil.copytree(folder / "run", folder / "bad_config")
    (folder / "bad_config" / "config.json").write_text("{")
    return {name: str(folder / name) for name in ("good", "big_id", "bad_meta", "run", "bad_config")}


TRAIN_CASES = [
    ("data_dir", ["--data_dir=/nonexistent/data"], "has no train.bin: run `python train_jax.py prepare"),
    ("data_dir", ["--data_dir={a_file}"], "is a file, not a folder"),
    ("vocab_size", ["--data_dir={big_id}"], "holds id 300, outside the model's vocabulary"),
    ("data_dir", ["--data_dir={bad_meta}"], "meta.json is corrupt (JSONDecodeError): prepare --data_dir"),
    ("data_url", ["--data_dir={tmp}/new", "--data_url=ftp:/x"], "is not an http(s) URL"),
    ("out_dir", ["--out_dir={a_file}"], "is a file, not a folder"),
    ("init_from", ["--init_from=999M"], "unknown --init_from '999M'"),
    ("init_from", ["--init_from=/nonexistent/model"], "unknown --init_from '/nonexistent/model'"),
    ("init_from", ["--init_from={not_a_model}"], "is not a complete checkpoint"),
    ("models_dir", ["--init_from=124M", "--models_dir={a_file}"], "is a file, not a folder"),
    *[(name, [f"--{name}={value}"], "must be a positive integer")
      for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "max_iters", "eval_interval",
                   "eval_iters", "log_interval", "ckpt_interval", "keep")
      for value in ("0", "-2", "2.5", "many")],
    ("n_head", ["--n_embd=10", "--n_head=4"], "--n_embd 10 must be a multiple of --n_head 4"),
    ("block_size", ["--block_size=100000"], "too short for one block of --block_size 100000"),
    ("vocab_size", ["--vocab_size=10"], "is smaller than the data's vocabulary"),
    *[(name, [f"--{name}={value}"], "must be an integer >= 0")
      for name in ("vocab_size", "warmup_iters", "lr_decay_iters", "grad_accum", "total_batch_tokens", "loss_chunk")
      for value in ("-1", "x", "1.5")],
    ("remat", ["--remat=all"], "unknown --remat 'all': use auto, none, dots, block"),
    *[("seed", [f"--seed={value}"], f"must be an integer in [0, 2**32), got {shown}")
      for value, shown in (("-1", "-1"), ("x", "'x'"), ("1.5", "1.5"))],
    ("seed", ["--seed=1099511627776"], "must be an integer in [0, 2**32), got 1099511627776"),
    *[(name, [f"--{name}={value}"], "must be a number in [0, inf)")
      for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "peak_flops") for value in ("-1", "1e999", "x")],
    *[(name, [f"--{name}={value}"], "must be a number in [0, 1)")
      for name in ("dropout", "beta1", "beta2") for value in ("-0.1", "1", "x")],
    ("resume", ["--resume=maybe"], "takes no value"),
    ("out_dir", ["--resume"], "holds no training run (config.json is missing): give the --out_dir of a run"),
    ("dtype", ["--dtype=float16"], "unknown --dtype 'float16': use float32 or bfloat16"),
    ("nan_policy", ["--nan_policy=ignore"], "unknown --nan_policy 'ignore': use stop or skip"),
    ("learning_rate", ["--learnin_rate=0.1"], "unknown flag --learnin_rate: did you mean --learning_rate?"),
    ("mesh", ["--mesh=fsdp=4"], "--mesh fsdp=4 uses 4 devices but there are 1: make the sizes multiply to 1"),
    ("mesh", ["--mesh=model=2"], "unknown mesh axis 'model' in --mesh model=2"),
    ("num_processes", ["--num_processes=2"], "--num_processes and --process_id need --coordinator_address"),
    ("coordinator_address", ["--coordinator_address=nowhere", "--num_processes=2"], "must be HOST:PORT of process 0"),
    ("process_id", ["--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=2"],
     "--process_id 2 must be an integer from 0 to --num_processes - 1"),
]


@pytest.mark.parametrize("flag, args, message", TRAIN_CASES, ids=[f"{c[0]}:{' '.join(c[1])}" for c in TRAIN_CASES])
def test_train_flag(flag, args, message, files, data_folders, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = {**files, **data_folders, "tmp": str(tmp_path)}
    argv = ["--data_dir", data_folders["good"], "--out_dir", str(tmp_path / "out"), "--data_url=", "--max_iters=2", *TINY]
    argv += [arg.format(**names) for arg in args]
    line = one_error_line(train_jax.cli, argv, capsys, tmp_path, *data_folders.values(), os.path.dirname(files["a_file"]))
    assert f"--{flag}" in line and message in line


PREPARE_CASES = [
    ("input", ["--input=/nonexistent.txt"], "is not a file: give the path of a text file"),
    ("input", ["--input={not_a_model}"], "is not a file"),
    ("input", ["--input={empty}"], "is empty: give a file with some text"),
    ("input", ["--input={latin1}", "--tokenizer=gpt2"], "line 1 is not UTF-8: re-save it as UTF-8, or use --tokenizer bytes"),
    ("input", ["--input={corpus}", "--input={latin1}", "--tokenizer=gpt2"], "line 1 is not UTF-8"),
    ("out", ["--input={corpus}", "--out={a_file}"], "is a file, not a folder"),
    ("tokenizer", ["--input={corpus}", "--tokenizer=bpe"], "unknown --tokenizer 'bpe': use gpt2 or bytes"),
    *[("val_fraction", ["--input={corpus}", f"--val_fraction={v}"], "must be a number between 0 and 1") for v in ("0", "1", "-1", "x")],
    ("vocab_dir", ["--input={corpus}", "--vocab_dir={a_file}"], "is a file, not a folder"),
    ("input", ["--inputs={corpus}"], "unknown flag --inputs: did you mean --input?"),
]


@pytest.mark.parametrize("flag, args, message", PREPARE_CASES, ids=[f"{c[0]}:{' '.join(c[1])}" for c in PREPARE_CASES])
def test_prepare_flag(flag, args, message, files, vocab_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["prepare", "--out", str(tmp_path / "data"), "--tokenizer=bytes", f"--vocab_dir={vocab_dir}"]
    argv += [arg.format(**files) for arg in args]
    line = one_error_line(train_jax.cli, argv, capsys, tmp_path, os.path.dirname(files["a_file"]))
    assert f"--{flag}" in line and message in line


EXPORT_CASES = [
    ("ckpt_dir", ["--ckpt_dir=/nonexistent/run", "--out={tmp}/m"], "holds no training run (config.json is missing)"),
    ("ckpt_dir", ["--ckpt_dir={a_file}", "--out={tmp}/m"], "is a file, not a folder"),
    ("ckpt_dir", ["--ckpt_dir={not_a_model}", "--out={tmp}/m"], "holds no training run"),
    ("out", ["--ckpt_dir={run}"], "give the model folder to write: --out MODEL_DIR"),
    ("out", ["--ckpt_dir={run}", "--out={a_file}"], "is a file, not a folder"),
    ("step", ["--ckpt_dir={run}", "--out={tmp}/m", "--step=999"], "has no checkpoint of --step 999; it has [1]"),
    ("step", ["--ckpt_dir={run}", "--out={tmp}/m", "--step=last"], "has no checkpoint of --step 'last'"),
    ("out_dir", ["--ckpt_dir={bad_config}", "--out={tmp}/m"], "config.json is corrupt (JSONDecodeError): restore it"),
    ("step", ["--steps=1", "--ckpt_dir={run}"], "unknown flag --steps: did you mean --step?"),
]


@pytest.mark.parametrize("flag, args, message", EXPORT_CASES, ids=[f"{c[0]}:{' '.join(c[1])}" for c in EXPORT_CASES])
def test_export_flag(flag, args, message, files, data_folders, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = {**files, **data_folders, "tmp": str(tmp_path)}
    argv = ["export", *(arg.format(**names) for arg in args)]
    line = one_error_line(train_jax.cli, argv, capsys, tmp_path, *data_folders.values(), os.path.dirname(files["a_file"]))
    assert f"--{flag}" in line and message in line


@pytest.mark.parametrize(
    "argv, message",
    [
        (["gpt2.py", PROMPT, "--n_tokns=3"], "error: unknown flag --n_tokns: did you mean --n_tokens_to_generate? (see --help)"),
        (["train_jax.py", "--max_iters=0"], "error: --max_iters must be a positive integer, got 0"),
        (["train_jax.py", "export", "--ckpt_dir=/nonexistent"], "error: give the model folder to write: --out MODEL_DIR"),
    ],
)
def test_a_real_process_prints_one_line_and_exits_2(argv, message, tmp_path):
    result = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [message]
