"""Soak: many generations with random flags and prompts, and a training run killed at random moments.

    python bench/soak.py [--generations 200] [--kills 5] [--seconds 900] [--seed 0]

Generations run in this process through gpt2's command line on a small random checkpoint; each must
print its text, or (when the random prompt leaves no room in n_ctx) exit 2 with one `error:` line.
Anything else (a traceback, another exit code, several error lines) is a failure. The resident
memory is printed every quarter: after the first quarter has compiled the programs it must not grow.

Training runs in subprocesses that are SIGKILLed at random moments and resumed; the finished params
must equal an uninterrupted run's, bit for bit. Prints the failures (must be 0) and peak memory.
"""

import argparse
import contextlib
import io
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from load import random_checkpoint

import gpt2
import train_jax

HPARAMS = {"n_vocab": 50257, "n_ctx": 64, "n_embd": 32, "n_head": 2, "n_layer": 2}
WORDS = ["the", "Alan", "Turing", "ROMEO:", "café", "日本語", "🙂", "\t", "1.50", "<|endoftext|>", "—", "'quoted'", "é\u0301", "\n"]
TRAIN_FLAGS = dict(n_layer=2, n_head=2, n_embd=16, block_size=16, batch_size=4, max_iters=80, ckpt_interval=5,
                   eval_interval=5, log_interval=20, keep=2, dropout=0.1, data_url="", peak_flops=1e9, eval_iters=2)  # fmt: skip


def rss_mb():
    """The resident memory of this process now, in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def random_argv(rng, model_dir):
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 12))) for _ in range(rng.choice([1, 1, 2, 3]))]
    backend = rng.choice(["jax", "numpy"])
    argv = [*prompts, "--model_size", model_dir, "--backend", backend, "-n", str(rng.choice([1, 4, 8]))]
    argv += ["--dtype", rng.choice(gpt2.DTYPES[backend]), "--seed", str(rng.randrange(2**32))]
    argv += ["--temperature", str(rng.choice([0, 0.7, 1.0])), "--top_k", str(rng.choice([0, 1, 40])), "--top_p", str(rng.choice([1, 0.9]))]
    return argv + ([rng.choice(["--stop_at_eot", "--nostop_at_eot"])] if rng.random() < 0.5 else [])


def generate_once(argv):
    """'ok', 'rejected' (exit 2 with one error line) or a description of the failure."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            gpt2.cli(argv)
    except SystemExit as e:
        errors = [line for line in err.getvalue().splitlines() if line.startswith("error:")]
        return "rejected" if e.code == 2 and len(errors) == 1 else f"exit {e.code}: {err.getvalue()[-300:]!r}"
    except Exception as e:  # noqa: BLE001 (any exception is what the soak counts)
        return f"{type(e).__name__}: {e}"
    return "ok" if out.getvalue().endswith("\n") else f"no text: {out.getvalue()!r}"


def soak_generation(n, seconds, seed, folder):
    model_dir = random_checkpoint(os.path.join(folder, "model"), HPARAMS, seed=0)
    rng = random.Random(seed)
    counts, failures, memory, start = {"ok": 0, "rejected": 0}, [], [], time.perf_counter()
    for i in range(n):
        if time.perf_counter() - start > seconds:
            print(f"generation: stopped by the time bound after {i} of {n}")
            break
        argv = random_argv(rng, model_dir)
        result = generate_once(argv)
        if result in counts:
            counts[result] += 1
        else:
            failures.append((argv, result))
        if (i + 1) % max(1, n // 4) == 0:
            memory.append((i + 1, rss_mb()))
    elapsed = time.perf_counter() - start
    print(f"generation: {sum(counts.values()) + len(failures)} runs in {elapsed:.0f} s, {counts['ok']} ok, "
          f"{counts['rejected']} rejected with one line, {len(failures)} failures")  # fmt: skip
    for argv, result in failures:
        print(f"  FAILED {argv}: {result}")
    print("generation: resident memory " + ", ".join(f"{mb:.0f} MB after {i}" for i, mb in memory))
    grew = len(memory) > 1 and memory[-1][1] > memory[0][1] * 1.10
    print(f"generation: memory {'GREW' if grew else 'flat'} after the first quarter (>10% counts as growth)")
    return len(failures) + grew


def train_argv(data_dir, out_dir):
    flags = [f"--{k}={v!r}" if isinstance(v, str) else f"--{k}={v}" for k, v in TRAIN_FLAGS.items()]
    return [sys.executable, os.path.join(ROOT, "train_jax.py"), "--data_dir", data_dir, "--out_dir", out_dir, *flags]


def soak_training(kills, seed, folder):
    import jax

    corpus = os.path.join(folder, "input.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write("".join(f"ROMEO: line {i} of the play.\nJULIET: and {i % 7}!\n\n" for i in range(300)))
    data_dir, out_dir = os.path.join(folder, "data"), os.path.join(folder, "killed")
    train_jax.prepare(input=corpus, out=data_dir, tokenizer="bytes")
    rng, failures, start = random.Random(seed), 0, time.perf_counter()
    ckpts = os.path.join(out_dir, "checkpoints")
    steps = lambda: sorted(int(n) for n in os.listdir(ckpts) if n.isdigit()) if os.path.isdir(ckpts) else []
    for kill in range(kills):
        resume = ["--resume"] if steps() else []
        process = subprocess.Popen([*train_argv(data_dir, out_dir), *resume], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = (steps() or [0])[-1] + 5
        while process.poll() is None and (steps() or [0])[-1] < target:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.5))
        process.send_signal(signal.SIGKILL)
        code = process.wait()
        print(f"training: kill {kill + 1} at step {(steps() or [0])[-1]} ({'killed' if code == -signal.SIGKILL else f'exit {code}'})")
        if code not in (-signal.SIGKILL, 0):
            failures += 1
    finished = subprocess.run([*train_argv(data_dir, out_dir), "--resume"], capture_output=True, text=True)
    failures += finished.returncode != 0
    whole = train_jax.fit(train_jax.default_flags(data_dir=data_dir, out_dir=os.path.join(folder, "whole"), **TRAIN_FLAGS))
    manager = train_jax.checkpoint_manager(out_dir, 2)
    state, _ = train_jax.restore_checkpoint(manager, TRAIN_FLAGS["max_iters"], whole["state"])
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(whole["state"])))
    failures += not same
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"training: {kills} kills and a resume in {time.perf_counter() - start:.0f} s; finished params "
          f"{'bit-exact' if same else 'DIFFER'}; peak memory of a training process {peak:.0f} MB; {failures} failures")  # fmt: skip
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=200)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=900, help="time bound of the generation part")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(folder, "xla"))
        failures = soak_generation(args.generations, args.seconds, args.seed, folder)
        failures += soak_training(args.kills, args.seed, folder)
    print(f"failures: {failures}; peak memory of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
