"""Generation speed: load, compile, prefill and decode, per backend and dtype.

    python bench/decode.py [--model_size 124M|355M|774M|1558M|FOLDER] [--n_new 40] [--batches 1,16] [--rounds 15]
                           [--configs jax:float32,numpy:float32,jax:bfloat16]

A released size is a checkpoint of that shape with random weights, written once under bench_models/;
any model folder (or hub id) is read as it is.

A 10-token prompt, greedy. Decode tokens/s is compared with the bound that memory bandwidth sets at
batch 1 (every token reads every weight once), measured here as a matrix-vector product over a
matrix as large as the model. A shared machine's bandwidth moves from minute to minute, so batch-1
float32 (jax) is measured in --rounds pairs: a stream's PAIRED_STEPS decode steps timed together (as
gpt2.stream runs them, each queued before the host reads the one before), then as many of XLA's
matvecs (not NumPy's: OpenBLAS's threads spin on after a call and slow the next step). Its tokens/s
is that of the median pair, its share of the bound the median over the pairs of matvec time / step
time. Also prints the time to first token of a fresh process, by stage.
"""

import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpt2  # noqa: E402
import utils  # noqa: E402
import formats  # noqa: E402
from load import SHAPES, hparams_of, random_checkpoint  # noqa: E402

N_PROMPT = 10
PAIRED_STEPS = 8  # a pair takes about 3 s for 1558M here (8 x 0.19 s steps, 8 x 0.16 s matvecs), 0.25 s for 124M


def matvec_runs(n_bytes):
    """{numpy, jax: a function running x @ W once}, W a float32 matrix of n_bytes, made once and held
    once (device_put copies it; NumPy reads the device's copy): the model's pages stay in memory."""
    import jax

    wj = jax.device_put(np.random.default_rng(0).random((4096, n_bytes // 4 // 4096), np.float32))  # [4096, n]
    w = np.asarray(wj)  # a view of the device buffer on a CPU
    x = np.ones((1, 4096), np.float32)
    matvec = jax.jit(lambda x, w: x @ w)
    runs = {"numpy": lambda: x @ w, "jax": lambda: matvec(x, wj).block_until_ready()}
    for run in runs.values():
        run()
    return runs


def paired_run(params, n_head, probe):
    """(s per decode step, s per probe) of one stream's PAIRED_STEPS steps after its first, timed
    together, and of as many probes run right after them: both read as many bytes per step on the
    same machine at nearly the same moment."""
    tokens = gpt2.stream([list(range(100, 100 + N_PROMPT))], params, n_head, PAIRED_STEPS + 1, "jax")
    next(tokens)  # prefill, and the first step; the second is queued
    step_s = timed(lambda: sum(1 for _ in tokens)) / PAIRED_STEPS
    return step_s, timed(lambda: [probe() for _ in range(PAIRED_STEPS)]) / PAIRED_STEPS


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(params, n_head, backend, batch, n_new):
    """(compile s: the first run's extra time, None for NumPy, which compiles nothing; prefill
    tokens/s; decode tokens/s) for one configuration."""
    prompts = [list(range(100, 100 + N_PROMPT))] * batch

    def run():
        tokens = gpt2.stream(prompts, params, n_head, n_new, backend)
        start = time.perf_counter()
        next(tokens)  # prefill, and the first decode step
        first = time.perf_counter() - start
        start = time.perf_counter()
        n_steps = sum(1 for _ in tokens)
        return first, n_steps / (time.perf_counter() - start)

    cold, _ = run()
    warm, steps_per_s = min(run() for _ in range(2))
    step_s = 1 / steps_per_s
    prefill_s = max(warm - step_s, 1e-9)
    return None if backend == "numpy" else cold - warm, batch * N_PROMPT / prefill_s, batch * steps_per_s


STARTUP = """
import sys, time
t0 = time.perf_counter()
import jax, gpt2, utils
gpt2.use_compilation_cache()
t1 = time.perf_counter()
encoder, hparams, params = utils.load_encoder_hparams_and_params(sys.argv[1])
params = gpt2.to_backend(params, "jax")
jax.block_until_ready(params)
t2 = time.perf_counter()
tokens = gpt2.stream([encoder.encode("Alan Turing theorized that computers would one day become")], params, hparams["n_head"], 40)
next(tokens)
t3 = time.perf_counter()
print(f"{t1 - t0:.2f} {t2 - t1:.2f} {t3 - t2:.2f}")
"""


def startup(model_dir):
    out = subprocess.run([sys.executable, "-c", STARTUP, model_dir], cwd=ROOT, capture_output=True, text=True, check=True)
    return [float(x) for x in out.stdout.split()]


def model_folder(model_size):
    """A released size's random checkpoint (written once), else the folder or hub id itself."""
    if model_size in SHAPES:
        return random_checkpoint(os.path.join(ROOT, "bench_models", f"{model_size}-random"), hparams_of(model_size))
    return utils.resolve_model_dir(model_size, "models")


def main(model_size="124M", n_new=40, batches="1,16", configs="jax:float32,numpy:float32,jax:bfloat16", rounds=15):
    model_dir = model_folder(str(model_size))
    batches = [int(b) for b in (batches if isinstance(batches, tuple) else str(batches).split(","))]  # fire reads 1,16 as (1, 16)
    load_s = timed(lambda: utils.load_encoder_hparams_and_params(model_dir))  # warms the cache too
    load_s = timed(lambda: utils.load_encoder_hparams_and_params(model_dir))
    _, hparams, params = utils.load_encoder_hparams_and_params(model_dir)
    n_bytes = sum(a.nbytes for a in formats.flatten(params).values())
    runs = matvec_runs(n_bytes)
    bandwidth = {name: n_bytes / min(timed(run) for _ in range(5)) / 1e9 for name, run in runs.items()}
    bound = max(bandwidth.values()) * 1e9 / n_bytes
    print(f"weights {n_bytes / 1e6:.0f} MB (float32); matvec bandwidth: numpy {bandwidth['numpy']:.1f} GB/s, "
          f"jax {bandwidth['jax']:.1f} GB/s -> batch-1 bound {bound:.1f} tokens/s")
    print(f"load (cached): {load_s:.2f} s")
    print(f"{'backend':8} {'dtype':9} {'batch':>5} {'load s':>7} {'compile s':>9} {'prefill tok/s':>13} {'decode tok/s':>12} {'of bound':>8}")
    for backend, dtype in (config.split(":") for config in configs.split(",")):
        load = timed(lambda: gpt2.to_backend(params, backend, dtype))
        on_backend = gpt2.to_backend(params, backend, dtype)
        for batch in batches:
            compile_s, prefill, decode = measure(on_backend, hparams["n_head"], backend, batch, n_new)
            share = ""
            if batch == 1 and dtype == "float32" and backend == "jax":
                pairs = [paired_run(on_backend, hparams["n_head"], runs["jax"]) for _ in range(rounds)]
                step_s, probe_s = (float(np.median(times)) for times in zip(*pairs))
                shares = [probe / step for step, probe in pairs]
                print(f"  {rounds} pairs of {PAIRED_STEPS} decode steps and {PAIRED_STEPS} XLA matvecs over {n_bytes / 1e6:.0f} MB: "
                      f"median step {step_s * 1e3:.1f} ms, median matvec {probe_s * 1e3:.1f} ms ({n_bytes / probe_s / 1e9:.1f} GB/s); "
                      f"step's share of its matvec's bound: median {np.median(shares):.0%}, quartiles "
                      f"{np.percentile(shares, 25):.0%}-{np.percentile(shares, 75):.0%}", flush=True)
                decode, share = 1 / step_s, f"{float(np.median(shares)):8.0%}"
            print(f"{backend:8} {dtype:9} {batch:5d} {load:7.2f} {'-' if compile_s is None else f'{compile_s:.2f}':>9} {prefill:13.1f} {decode:12.1f} {share}", flush=True)
    del runs
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp()  # starts empty: the first run compiles
    for run in ("first run (compiles)", "later run (compiled programs from disk)"):
        import_s, load_s, first_token_s = startup(model_dir)
        print(f"time to first token, fresh process, jax float32, {run}: {import_s + load_s + first_token_s:.2f} s "
              f"(import {import_s:.2f}, load {load_s:.2f}, compile + prefill {first_token_s:.2f})")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
