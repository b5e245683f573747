"""Score a model: its mean loss and perplexity over a data split, and its HellaSwag accuracy.

    python train_jax.py eval --model_size 124M --data_dir DIR [--split val] [--eval_tokens N]
    python train_jax.py eval --ckpt_dir OUT_DIR [--step N] --hellaswag [FILE] [--limit K]

Both are sums of the same jitted, batched quantity: the cross-entropy of chosen target tokens under
`gpt2.gpt2`, masked. (Named evaluation.py: a top-level `evaluate` would clash with HF's package.)
"""

import functools
import json
import math
import os

import numpy as np

from checkpoints import run_params
from cli import UserError, check_folder, check_positive_int, log, progress
from data import load_split, outside_vocabulary, split_ids
from encoder import load_encoder
from gpt2 import gpt2
from sharding import batch_sharding, check_fits, device_mesh, gathered, param_shardings, place, process_rows
from utils import download_file, load_encoder_hparams_and_params

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLASWAG_URL_ENV = "HELLASWAG_URL"  # a mirror (or a local server in the tests)
N_ENDINGS = 4
LENGTH_STEP = 64  # HellaSwag rows are padded to a multiple of this: a few compiled shapes, little padding
DTYPES = ("float32", "bfloat16")


def masked_loss_sums(params, inputs, targets, mask, n_head, dtype, compute_shardings=None):  # [rows, n_seq] x3 -> [rows]
    """Each row's summed cross-entropy of the targets where mask is 1, the model computed in `dtype`,
    the softmax in float32."""
    import jax
    import optax

    compute = jax.tree.map(lambda p: p.astype(dtype), params)
    if compute_shardings is not None:
        compute = jax.lax.with_sharding_constraint(compute, compute_shardings)
    logits = gpt2(inputs, **compute, n_head=n_head)  # [rows, n_seq, n_vocab]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(np.float32), targets)  # [rows, n_seq]
    return (losses * mask).sum(-1)


def scorer(hparams, mesh, shardings, dtype, n_rows):
    """`masked_loss_sums` of params on the mesh (placed by `shardings`) and host arrays of n_rows rows,
    as NumPy float64 [n_rows]; jitted once, the rows split over (dp, fsdp), each process handing over
    only the rows its devices hold."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    check_fits(mesh, hparams)
    rows = batch_sharding(mesh, 2, axis=0)
    sums = functools.partial(masked_loss_sums, n_head=hparams["n_head"], dtype=dtype, compute_shardings=gathered(shardings))
    jitted = jax.jit(sums, in_shardings=(shardings, rows, rows, rows), out_shardings=NamedSharding(mesh, PartitionSpec()))

    def put(x):  # [n_rows, n_seq] host -> global array
        return jax.make_array_from_process_local_data(rows, x[process_rows(rows, x.shape, 0)], x.shape)

    return lambda params, inputs, targets, mask: np.asarray(jitted(params, put(inputs), put(targets), put(mask)), np.float64)


# ---------------------------------------------------------------------------------------------
# Loss over a split


def split_loss(score, split, n_ctx, n_rows, eval_tokens=0):
    """(mean loss, tokens predicted) over the split's ids in windows of n_ctx + 1 advancing by n_ctx:
    every id after the first (or the first eval_tokens of them) is predicted once, with the window's
    ids before it as context; the last window is padded and masked."""
    n_ids = sum(len(ids) for ids in split["shards"])
    n_predicted = min(eval_tokens, n_ids - 1) if eval_tokens else n_ids - 1
    n_windows = math.ceil(n_predicted / n_ctx)
    total = 0.0
    for first in progress(range(0, n_windows, n_rows), desc="loss", unit="batch", leave=False):
        inputs, targets = np.zeros((n_rows, n_ctx), np.int32), np.zeros((n_rows, n_ctx), np.int32)
        mask = np.zeros((n_rows, n_ctx), np.float32)
        for row, window in enumerate(range(first, min(first + n_rows, n_windows))):
            start = window * n_ctx
            n = min(n_ctx, n_predicted - start)
            ids = split_ids(split, start, start + n + 1)  # [n + 1]
            if (largest := int(ids.max())) >= split["n_vocab"]:
                raise outside_vocabulary(" ".join(split["paths"]), largest, split["n_vocab"])
            inputs[row, :n], targets[row, :n], mask[row, :n] = ids[:-1], ids[1:], 1
        total += float(score(inputs, targets, mask).sum())
    return total / n_predicted, n_predicted


# ---------------------------------------------------------------------------------------------
# HellaSwag


def hellaswag_file(models_dir):
    """hellaswag_val.jsonl in MODELS_DIR/hellaswag, downloaded once."""
    path = os.path.join(check_folder(models_dir, "models_dir"), "hellaswag", "hellaswag_val.jsonl")
    if not os.path.isfile(path):
        url = os.environ.get(HELLASWAG_URL_ENV, HELLASWAG_URL)
        log(f"downloading {url} to {path}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        offline = f"give --hellaswag a local copy of hellaswag_val.jsonl (or put it at {path}), or set {HELLASWAG_URL_ENV} to a mirror"
        download_file(url, path, offline)
    return path


def read_hellaswag(path, limit=0):
    """The first `limit` (0: all) examples of a HellaSwag .jsonl: dicts with ctx, endings (4) and label."""
    if not os.path.isfile(path):
        raise UserError(f"--hellaswag {path} is not a file: give hellaswag_val.jsonl, or --hellaswag alone to download it")
    examples = []
    with open(path, encoding="utf-8", errors="strict") as f:
        for number, line in enumerate(f, 1):
            if limit and len(examples) == limit:
                break
            try:
                example = json.loads(line)
                assert isinstance(example["ctx"], str) and len(example["endings"]) == N_ENDINGS
                assert all(isinstance(ending, str) for ending in example["endings"]) and example["label"] in range(N_ENDINGS)
            except (ValueError, KeyError, TypeError, AssertionError):
                raise UserError(f"{path} line {number} is not a HellaSwag example (ctx, 4 endings, label 0-3): download it again")
            examples.append(example)
    if not examples:
        raise UserError(f"{path} holds no examples: download it again")
    return examples


def check_encodes_text(encoder):
    if encoder.fast is None:  # tiktoken needs all 256 bytes: a bytes vocabulary of some text lacks some
        raise UserError("HellaSwag needs a vocabulary that encodes any text (GPT-2's BPE); this model's is a bytes one of its data")


def hellaswag_rows(example, encoder, n_ctx):
    """Per ending: (ids, n_ending) of the context followed by " " + ending, each tokenized apart (as
    build-nanogpt's hellaswag.py), keeping the last n_ctx + 1 ids; the loss is over the ending's ids."""
    context = encoder.encode(example["ctx"])
    rows = []
    for ending in example["endings"]:
        ending_ids = encoder.encode(" " + ending)
        ids = (context + ending_ids)[-(n_ctx + 1) :]
        rows.append((ids, min(len(ending_ids), len(ids) - 1)))
    return rows


def hellaswag_batch(rows, n_rows, n_ctx):
    """Inputs, targets and the mask of the endings' targets, [n_rows, length], length the longest row
    rounded up to LENGTH_STEP (at most n_ctx); rows beyond those given are empty."""
    length = min(n_ctx, LENGTH_STEP * math.ceil(max(len(ids) - 1 for ids, _ in rows) / LENGTH_STEP))
    inputs, targets = np.zeros((n_rows, length), np.int32), np.zeros((n_rows, length), np.int32)
    mask = np.zeros((n_rows, length), np.float32)
    for row, (ids, n_ending) in enumerate(rows):
        n = len(ids) - 1
        inputs[row, :n], targets[row, :n], mask[row, n - n_ending : n] = ids[:-1], ids[1:], 1
    return inputs, targets, mask


def hellaswag_accuracy(score, examples, encoder, n_ctx, n_examples):
    """(acc, acc_norm): the share of examples whose labelled ending has the lowest summed loss (acc)
    and the lowest mean loss per token (acc_norm). A tie goes to the first ending (argmin)."""
    correct, correct_norm = 0, 0
    for first in progress(range(0, len(examples), n_examples), desc="hellaswag", unit="batch", leave=False):
        batch = examples[first : first + n_examples]
        rows = [row for example in batch for row in hellaswag_rows(example, encoder, n_ctx)]
        inputs, targets, mask = hellaswag_batch(rows, n_examples * N_ENDINGS, n_ctx)
        sums = score(inputs, targets, mask)[: len(rows)].reshape(-1, N_ENDINGS)  # [examples, endings]
        means = sums / mask[: len(rows)].sum(-1).reshape(-1, N_ENDINGS)
        labels = np.array([example["label"] for example in batch])
        correct += int((sums.argmin(-1) == labels).sum())
        correct_norm += int((means.argmin(-1) == labels).sum())
    return correct / len(examples), correct_norm / len(examples)


def hellaswag_line(acc, acc_norm, n_examples):
    return f"hellaswag: acc {acc:.4f}, acc_norm {acc_norm:.4f} over {n_examples} examples"


def hellaswag_hook(models_dir, encoder, hparams, mesh, shardings, dtype, n_examples):
    """For training's --hellaswag_every: params on the mesh -> (acc, acc_norm, examples scored), with
    the examples read and the scorer compiled once."""
    check_encodes_text(encoder)
    examples = read_hellaswag(hellaswag_file(models_dir))
    score = scorer(hparams, mesh, shardings, dtype, n_examples * N_ENDINGS)

    def accuracy(params):
        acc, acc_norm = hellaswag_accuracy(functools.partial(score, params), examples, encoder, hparams["n_ctx"], n_examples)
        return acc, acc_norm, len(examples)

    return accuracy


# ---------------------------------------------------------------------------------------------
# The eval command


def model_to_score(model_size, ckpt_dir, step, models_dir):
    """(encoder, hparams, params) of a released model or model folder, or of a training run's checkpoint."""
    if bool(model_size) == bool(ckpt_dir):
        raise UserError("give the model to score: --model_size 124M|MODEL_DIR, or --ckpt_dir OUT_DIR [--step N] (one of them)")
    if model_size:
        return load_encoder_hparams_and_params(str(model_size), models_dir, step)  # --step for a run folder
    ckpt_dir = check_folder(ckpt_dir, "ckpt_dir")
    _, hparams, params = run_params(ckpt_dir, step)
    return load_encoder(ckpt_dir), hparams, params


def evaluate(
    model_size="",
    ckpt_dir="",
    step=None,
    models_dir="models",
    data_dir="",
    split="val",
    eval_tokens=0,
    hellaswag=False,
    limit=0,
    batch_size=8,
    dtype="float32",
    mesh="",
):
    """Score a model: loss and perplexity over a data split, and HellaSwag accuracy (printed on stdout).

    Args:
      model_size: 124M, 355M, 774M, 1558M or a model folder ('': use --ckpt_dir).
      ckpt_dir: the --out_dir of a training run ('': use --model_size).
      step: the run's step to score (default: the best val loss, else the latest).
      models_dir: where released models are kept (and hellaswag/hellaswag_val.jsonl, downloaded once).
      data_dir: a data folder (from prepare, nanoGPT, llm.c or build-nanogpt) to score the loss on ('': none).
      split: the split of data_dir: val or train.
      eval_tokens: predict only the first N ids of the split (0: all of them).
      hellaswag: --hellaswag alone downloads HellaSwag's validation set (set HELLASWAG_URL for a mirror);
        --hellaswag FILE reads that .jsonl.
      limit: score only the first K HellaSwag examples (0: all).
      batch_size: windows per forward pass for the loss, examples (4 sequences each) for HellaSwag, on
        each data-parallel rank (dp * fsdp of the mesh), as in training.
      dtype: float32, or bfloat16 (compute; the softmax stays float32).
      mesh: the devices to score on, as for training (dp=8, fsdp=8, tp=2, ...); '' for one device.
    """
    if not data_dir and hellaswag is False:
        raise UserError("nothing to score: give --data_dir DIR and/or --hellaswag [FILE]")
    check_positive_int(batch_size, "batch_size")
    for name, value in (("eval_tokens", eval_tokens), ("limit", limit)):
        if type(value) is not int or value < 0:
            raise UserError(f"--{name} must be an integer >= 0 (0: all), got {value!r}")
    if dtype not in DTYPES:
        raise UserError(f"unknown --dtype {dtype!r}: use {' or '.join(DTYPES)}")
    if split not in ("train", "val"):
        raise UserError(f"unknown --split {split!r}: use val or train")
    encoder, hparams, params = model_to_score(model_size, ckpt_dir, step, models_dir)
    mesh = device_mesh(mesh)
    check_fits(mesh, hparams)
    rows = batch_size * mesh.shape["dp"] * mesh.shape["fsdp"]  # --batch_size per data-parallel rank, as in training
    shardings = param_shardings(params, mesh)
    placed = place(params, shardings)
    if data_dir:
        data = load_split(check_folder(data_dir, "data_dir"), split, 1, hparams["n_vocab"])
        score = functools.partial(scorer(hparams, mesh, shardings, dtype, rows), placed)
        loss, n_predicted = split_loss(score, data, hparams["n_ctx"], rows, eval_tokens)
        print(f"{split} loss {loss:.4f}, perplexity {math.exp(loss):.2f} over {n_predicted:,} tokens", flush=True)
    if hellaswag is not False:
        check_encodes_text(encoder)
        path = hellaswag_file(models_dir) if hellaswag is True else str(hellaswag)
        examples = read_hellaswag(path, limit)
        score = functools.partial(scorer(hparams, mesh, shardings, dtype, rows * N_ENDINGS), placed)
        print(hellaswag_line(*hellaswag_accuracy(score, examples, encoder, hparams["n_ctx"], rows), len(examples)), flush=True)
