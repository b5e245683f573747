"""`train_jax.py eval` throughput on the 124M shape (random weights, GPT-2's init):

    python bench/eval.py --input ../shared/data/tinyshakespeare/input.txt [--examples 16] [--tokens 8192]

The split loss over `tokens` ids of the input (GPT-2 BPE) in windows of 1024, and HellaSwag-shaped
examples cut from the input (a 60-word context, 4 endings of 10 to 30 words: about the lengths of
HellaSwag's validation set), each timed after a first pass that compiles (HellaSwag: one program per
padded row length, a multiple of 64). Prints tokens/s and
examples/s, and the FLOP/s those imply next to a measured matmul peak.
"""

import functools
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import evaluation  # noqa: E402
import monitor  # noqa: E402
from load import random_checkpoint  # noqa: E402
from sharding import device_mesh, param_shardings, place  # noqa: E402
from utils import load_encoder_hparams_and_params  # noqa: E402


def examples_from(words, n, rng):
    """HellaSwag-shaped examples of the text's words."""
    cut = lambda k: " ".join(words[(s := rng.integers(0, len(words) - k)) : s + k])
    return [{"ctx": cut(60), "endings": [cut(int(rng.integers(10, 31))) for _ in range(4)], "label": int(rng.integers(4))} for _ in range(n)]


def main(input, examples=16, tokens=8192, batch_size=4, model_dir=os.path.join(ROOT, "bench_models", "124M-random")):
    random_checkpoint(model_dir)
    encoder, hparams, params = load_encoder_hparams_and_params(model_dir)
    with open(input, encoding="utf-8") as f:
        text = f.read()
    mesh = device_mesh("")
    shardings = param_shardings(params, mesh)
    placed = place(params, shardings)
    ids = np.array(encoder.encode(text)[: tokens + 1], np.uint16)
    split = {"paths": [input], "shards": [ids], "n_vocab": hparams["n_vocab"]}
    score = functools.partial(evaluation.scorer(hparams, mesh, shardings, "float32", batch_size), placed)
    evaluation.split_loss(score, split, hparams["n_ctx"], batch_size, batch_size * hparams["n_ctx"])  # compiles
    start = time.perf_counter()
    loss, n_predicted = evaluation.split_loss(score, split, hparams["n_ctx"], batch_size)
    loss_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    chosen = examples_from(text.split(), examples, rng)
    rows = [len(ids) for e in chosen for ids, _ in evaluation.hellaswag_rows(e, encoder, hparams["n_ctx"])]
    score = functools.partial(evaluation.scorer(hparams, mesh, shardings, "float32", batch_size * 4), placed)
    evaluation.hellaswag_accuracy(score, chosen, encoder, hparams["n_ctx"], batch_size)  # compiles each padded length once
    start = time.perf_counter()
    evaluation.hellaswag_accuracy(score, chosen, encoder, hparams["n_ctx"], batch_size)
    hellaswag_s = time.perf_counter() - start
    flops_per_token = 2 * monitor.n_params(params) + 2 * hparams["n_layer"] * hparams["n_embd"] * hparams["n_ctx"]  # forward
    peak = monitor.matmul_flops()
    print(f"{hparams}, random weights, float32, batch {batch_size}, one device ({mesh.devices.flat[0].platform})")
    print(f"split loss: {n_predicted:,} tokens in {loss_s:.1f} s: {n_predicted / loss_s:,.0f} tokens/s "
          f"(~{flops_per_token * n_predicted / loss_s / 1e9:.0f} GFLOP/s; matmul peak {peak / 1e9:.0f}); loss {loss:.3f}")  # fmt: skip
    print(f"hellaswag: {examples} examples ({len(rows)} rows of {np.mean(rows):.0f} ids on average) in {hellaswag_s:.1f} s: "
          f"{examples / hellaswag_s:.2f} examples/s; the 10,042 of the validation set would take {10042 / (examples / hellaswag_s) / 60:.0f} min")  # fmt: skip


if __name__ == "__main__":
    import fire

    fire.Fire(main)
