"""evaluation.py (`train_jax.py eval`): split loss and HellaSwag on a TensorFlow-written checkpoint,
against a float64 NumPy computation of the same definitions through gpt2.py's NumPy path."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, SMALL_HPARAMS
from http_server import serve

import evaluation
import gpt2
import formats
from cli import UserError
from encoder import load_encoder
from formats import flatten, unflatten
from utils import load_encoder_hparams_and_params

N_CTX = SMALL_HPARAMS["n_ctx"]
# float32 logits: each a reduction over n_embd terms per layer, then a log-sum-exp over the vocabulary;
# a relative error of eps32 * sqrt(n_embd * n_layer * n_vocab) bounds their rounding (with margin).
RTOL = float(np.finfo(np.float32).eps) * math.sqrt(SMALL_HPARAMS["n_embd"] * SMALL_HPARAMS["n_layer"] * SMALL_HPARAMS["n_vocab"])
EXAMPLES = [
    {"ctx": "The cat sat on the", "endings": ["mat.", "moon, far away from any cat.", "dog", "a"], "label": 0},
    {"ctx": "A man is cooking. He", "endings": ["cuts onions", "flies", "cuts onions", "sleeps on the couch"], "label": 2},
    {"ctx": "Tie first:", "endings": ["same ending", "other", "same ending", "x"], "label": 0},
    {"ctx": "She opens the door and" * 9, "endings": ["walks in. " * 9, "b", "c d e", "leaves"], "label": 1},
    {"ctx": "Short", "endings": ["one", "two words", "three words here", "and four words here"], "label": 3},
]  # different lengths, ties (label on the first or the second of two equal endings), a row longer than n_ctx + 1


@pytest.fixture(scope="module")
def model(tf_model):
    """(model_dir, encoder, hparams, float64 params) of the TF-written checkpoint."""
    encoder, hparams, params = load_encoder_hparams_and_params(tf_model[0])
    return tf_model[0], encoder, hparams, unflatten({p: a.astype(np.float64) for p, a in flatten(params).items()}, hparams["n_layer"])


def numpy_token_losses(params, ids, n_head=SMALL_HPARAMS["n_head"]):  # [n + 1] -> [n] float64
    logits = gpt2.gpt2(np.asarray(ids[:-1]), **params, n_head=n_head)  # [n, n_vocab]
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return -log_probs[np.arange(len(ids) - 1), np.asarray(ids[1:])]


def numpy_split_loss(params, ids, n_predicted):
    """Windows of N_CTX + 1 ids advancing by N_CTX: each of the first n_predicted ids after the first once."""
    losses = [numpy_token_losses(params, ids[start : min(start + N_CTX, n_predicted) + 1]) for start in range(0, n_predicted, N_CTX)]
    return float(np.concatenate(losses).mean())


def numpy_hellaswag(params, encoder, examples, n_ctx=N_CTX, n_head=SMALL_HPARAMS["n_head"]):
    correct, correct_norm = 0, 0
    for example in examples:
        context, sums, means = encoder.encode(example["ctx"]), [], []
        for ending in example["endings"]:
            ending_ids = encoder.encode(" " + ending)
            ids = (context + ending_ids)[-(n_ctx + 1) :]
            losses = numpy_token_losses(params, ids, n_head)[-min(len(ending_ids), len(ids) - 1) :]
            sums.append(losses.sum())
            means.append(losses.mean())
        correct += int(np.argmin(sums) == example["label"])  # the first of equal scores
        correct_norm += int(np.argmin(means) == example["label"])
    return correct / len(examples), correct_norm / len(examples)


def write_examples(path, examples):
    path.write_text("".join(json.dumps({**e, "ind": i, "split": "val"}) + "\n" for i, e in enumerate(examples)))
    return str(path)


def scorer(params, hparams, n_rows):
    from sharding import device_mesh, param_shardings, place

    mesh = device_mesh("")
    shardings = param_shardings(params, mesh)
    return lambda *arrays: evaluation.scorer(hparams, mesh, shardings, "float32", n_rows)(place(params, shardings), *arrays)


def test_masked_row_sums_equal_numpy_for_endings_of_every_length(model):
    model_dir, encoder, hparams, params64 = model
    _, _, params = load_encoder_hparams_and_params(model_dir)
    rows = [row for example in EXAMPLES for row in evaluation.hellaswag_rows(example, encoder, N_CTX)]
    assert max(len(ids) for ids, _ in rows) == N_CTX + 1 and len({n for _, n in rows}) > 4
    inputs, targets, mask = evaluation.hellaswag_batch(rows, len(rows) + 4, N_CTX)  # 4 empty rows
    sums = scorer(params, hparams, len(rows) + 4)(inputs, targets, mask)
    expected = [numpy_token_losses(params64, ids)[len(ids) - 1 - n :].sum() for ids, n in rows] + [0] * 4
    np.testing.assert_allclose(sums, expected, rtol=RTOL)


def test_cli_split_loss_and_hellaswag_equal_numpy(model, tmp_path):
    model_dir, encoder, hparams, params64 = model
    ids = np.random.default_rng(0).integers(0, hparams["n_vocab"], 300)
    (tmp_path / "data").mkdir()
    ids[:150].astype(np.uint16).tofile(tmp_path / "data" / "val_000000.bin")  # two shards, read as one sequence
    ids[150:].astype(np.uint16).tofile(tmp_path / "data" / "val_000001.bin")
    path = write_examples(tmp_path / "hellaswag.jsonl", EXAMPLES)
    argv = ["train_jax.py", "eval", "--model_size", model_dir, "--data_dir", str(tmp_path / "data"), "--batch_size", "2"]
    eight_devices = {**os.environ, "XLA_FLAGS": f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=8"}
    for eval_tokens, n_predicted, mesh in ((0, 299, ""), (100, 100, ""), (0, 299, "dp=2,tp=4")):
        done = subprocess.run([sys.executable, *argv, "--eval_tokens", str(eval_tokens), "--hellaswag", path, "--limit", "4",
                               "--mesh", mesh], cwd=ROOT, capture_output=True, text=True, env=eight_devices)  # fmt: skip
        assert done.returncode == 0, done.stderr
        loss_line, hellaswag_line = done.stdout.splitlines()
        match = re.fullmatch(rf"val loss (\d+\.\d{{4}}), perplexity (\d+\.\d\d) over {n_predicted:,} tokens", loss_line)
        loss = numpy_split_loss(params64, ids, n_predicted)
        assert match and float(match[1]) == pytest.approx(loss, rel=RTOL, abs=5e-5)  # printed to 4 decimals
        assert float(match[2]) == pytest.approx(math.exp(loss), rel=RTOL + 5e-5, abs=5e-3)
        acc, acc_norm = numpy_hellaswag(params64, encoder, EXAMPLES[:4])
        assert hellaswag_line == f"hellaswag: acc {acc:.4f}, acc_norm {acc_norm:.4f} over 4 examples"


def test_ties_go_to_the_first_ending(model):
    model_dir, encoder, hparams, params64 = model
    _, _, params = load_encoder_hparams_and_params(model_dir)
    tied = [{"ctx": "Same:", "endings": ["it", "it", "it", "it"], "label": label} for label in range(4)]
    acc, acc_norm = evaluation.hellaswag_accuracy(scorer(params, hparams, 8), tied, encoder, N_CTX, 2)
    assert (acc, acc_norm) == (0.25, 0.25) == numpy_hellaswag(params64, encoder, tied)


def test_hellaswag_is_downloaded_once(model, tmp_path, monkeypatch, capsys):
    model_dir, encoder, _, params64 = model
    body = "".join(json.dumps(e) + "\n" for e in EXAMPLES).encode()
    with serve({"hellaswag_val.jsonl": body}) as server:
        monkeypatch.setenv(evaluation.HELLASWAG_URL_ENV, f"{server.url}/hellaswag_val.jsonl")
        for _ in range(2):
            evaluation.evaluate(model_size=model_dir, hellaswag=True, models_dir=str(tmp_path), batch_size=3)
    assert server.requests == [("/hellaswag_val.jsonl", None)]
    assert (tmp_path / "hellaswag" / "hellaswag_val.jsonl").read_bytes() == body
    acc, acc_norm = numpy_hellaswag(params64, encoder, EXAMPLES)
    assert capsys.readouterr().out.splitlines() == [f"hellaswag: acc {acc:.4f}, acc_norm {acc_norm:.4f} over 5 examples"] * 2


def test_training_logs_hellaswag_every_n_steps(tmp_path, no_network, monkeypatch, capsys):
    import data
    import train_jax

    (tmp_path / "t.txt").write_text("The cat sat on the mat. " * 200, encoding="utf-8")
    data.prepare(input=str(tmp_path / "t.txt"), out=str(tmp_path / "data"), num_proc=1)
    flags = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=2, max_iters=2, eval_iters=1, peak_flops=1e12, data_url="")
    with serve({"hellaswag_val.jsonl": "".join(json.dumps(e) + "\n" for e in EXAMPLES[:3]).encode()}) as server:
        monkeypatch.setenv(evaluation.HELLASWAG_URL_ENV, f"{server.url}/hellaswag_val.jsonl")
        summary = train_jax.fit(train_jax.default_flags(data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "out"), hellaswag_every=2, **flags))
    params = {p: np.asarray(a, np.float64) for p, a in flatten(formats.unstacked(summary["state"]["params"])).items()}
    encoder = load_encoder(str(tmp_path / "data"))
    acc, acc_norm = numpy_hellaswag(unflatten(params, 1), encoder, EXAMPLES[:3], n_ctx=16, n_head=2)
    assert f"step 2: hellaswag: acc {acc:.4f}, acc_norm {acc_norm:.4f} over 3 examples" in capsys.readouterr().err.splitlines()


@pytest.mark.parametrize(
    "flags, message",
    [
        ({}, "nothing to score: give --data_dir DIR and/or --hellaswag"),
        ({"hellaswag": "FILE"}, "give the model to score: --model_size"),
        ({"model_size": "MODEL", "hellaswag": "BAD"}, "bad.jsonl line 2 is not a HellaSwag example"),
        ({"model_size": "MODEL", "hellaswag": "/nonexistent.jsonl"}, "--hellaswag /nonexistent.jsonl is not a file"),
        ({"model_size": "MODEL", "data_dir": "/nonexistent"}, "no val split in /nonexistent"),
        ({"model_size": "MODEL", "data_dir": "D", "split": "test"}, "unknown --split 'test'"),
        ({"model_size": "MODEL", "data_dir": "D", "eval_tokens": -1}, "--eval_tokens must be an integer >= 0"),
        ({"model_size": "MODEL", "data_dir": "D", "step": 4}, "--step 4 picks a checkpoint of a training run"),
    ],
)
def test_eval_errors_name_the_fix(flags, message, model, tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps(EXAMPLES[0]) + '\n{"ctx": "no endings", "label": 0}\n')
    names = {"MODEL": model[0], "FILE": str(tmp_path / "bad.jsonl"), "BAD": str(tmp_path / "bad.jsonl"), "D": str(tmp_path)}
    with pytest.raises(UserError, match=re.escape(message)):
        evaluation.evaluate(**{k: names.get(v, v) if isinstance(v, str) else v for k, v in flags.items()})
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]
