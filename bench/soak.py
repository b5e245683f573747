"""Soak: many generations with random flags and prompts, and a training run killed at random moments.

    python bench/soak.py [--generations 200] [--kills 5] [--seconds 900] [--seed 0]

Generations run in this process through gpt2's command line on a small random checkpoint; each must
print its text, or (when the random prompt leaves no room in n_ctx) exit 2 with one `error:` line.
Anything else (a traceback, another exit code, several error lines) is a failure. The second half
repeats the first half's command lines in another order: each must print the same text as before,
and the resident memory must not grow over it (the first half grows it by the programs JAX compiles
and keeps for each new shape and sampling setting).

Training runs in subprocesses that are SIGKILLed at random moments and resumed; the finished params
must equal an uninterrupted run's, bit for bit, and that run's speed figures must hold (its windows
no slower than its wall time, no MFU above 100%). Prints the failures (must be 0) and peak memory.
"""

import argparse
import contextlib
import io
import os
import random
import re
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
import data
import train_jax
import checkpoints

HPARAMS = {"n_vocab": 50257, "n_ctx": 64, "n_embd": 32, "n_head": 2, "n_layer": 2}
WORDS = ["the", "Alan", "Turing", "ROMEO:", "café", "日本語", "🙂", "\t", "1.50", "<|endoftext|>", "—", "'quoted'", "é\u0301", "\n"]
TRAIN_FLAGS = dict(n_layer=2, n_head=2, n_embd=16, block_size=16, batch_size=4, max_iters=80, ckpt_interval=5,
                   eval_interval=5, log_interval=20, keep=2, dropout=0.1, data_url="", eval_iters=2)  # fmt: skip


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
    """('ok', text), ('rejected', error line) or ('failed', what happened)."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            gpt2.cli(argv)
    except SystemExit as e:
        errors = [line for line in err.getvalue().splitlines() if line.startswith("error:")]
        if e.code == 2 and len(errors) == 1:
            return "rejected", errors[0]
        return "failed", f"exit {e.code}: {err.getvalue()[-300:]!r}"
    except Exception as e:  # noqa: BLE001 (any exception is what the soak counts)
        return "failed", f"{type(e).__name__}: {e}"
    return ("ok", out.getvalue()) if out.getvalue().endswith("\n") else ("failed", f"no text: {out.getvalue()!r}")


def soak_generation(n, seconds, seed, folder):
    model_dir = random_checkpoint(os.path.join(folder, "model"), HPARAMS, seed=0)
    rng = random.Random(seed)
    first = [random_argv(rng, model_dir) for _ in range(n // 2)]
    runs = [*enumerate(first), *rng.sample(list(enumerate(first)), len(first))]  # then the same again, shuffled
    results, counts, failures, memory, start = {}, {"ok": 0, "rejected": 0}, [], [], time.perf_counter()
    for i, (index, argv) in enumerate(runs):
        if time.perf_counter() - start > seconds:
            print(f"generation: stopped by the time bound after {i} of {len(runs)}")
            break
        result = generate_once(argv)
        if result[0] == "failed" or results.setdefault(index, result) != result:
            failures.append((argv, result if result[0] == "failed" else f"printed {results[index]!r} first, then {result!r}"))
        else:
            counts[result[0]] += 1
        if i + 1 in (len(first) // 2, len(first), len(runs)):
            memory.append((i + 1, rss_mb()))
    elapsed = time.perf_counter() - start
    print(f"generation: {sum(counts.values()) + len(failures)} runs in {elapsed:.0f} s, {counts['ok']} ok, "
          f"{counts['rejected']} rejected with one line, {len(failures)} failures")  # fmt: skip
    for argv, result in failures:
        print(f"  FAILED {argv}: {result}")
    print("generation: resident memory " + ", ".join(f"{mb:.0f} MB after {i}" for i, mb in memory))
    grew = len(memory) == 3 and memory[2][1] > memory[1][1] * 1.05
    print(f"generation: memory {'GREW' if grew else 'flat'} over the repeated half (>5% counts as growth)")
    return len(failures) + grew


def peak_mb(pid):
    """The peak resident memory of a running process (since its exec), in MB; 0 once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (FileNotFoundError, StopIteration):
        return 0.0


def run_until(process, done):
    """Poll `process` until `done()` or its exit; its peak memory seen meanwhile."""
    peak = 0.0
    while process.poll() is None and not done():
        peak = max(peak, peak_mb(process.pid))
        time.sleep(0.002)
    return max(peak, peak_mb(process.pid))


def train_argv(data_dir, out_dir):
    flags = [f"--{k}={v!r}" if isinstance(v, str) else f"--{k}={v}" for k, v in TRAIN_FLAGS.items()]
    return [sys.executable, os.path.join(ROOT, "train_jax.py"), "--data_dir", data_dir, "--out_dir", out_dir, *flags]


def soak_training(kills, seed, folder):
    import jax

    corpus = os.path.join(folder, "input.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write("".join(f"ROMEO: line {i} of the play.\nJULIET: and {i % 7}!\n\n" for i in range(300)))
    data_dir, out_dir = os.path.join(folder, "data"), os.path.join(folder, "killed")
    data.prepare(input=corpus, out=data_dir, tokenizer="bytes")
    rng, failures, peaks, start = random.Random(seed), 0, [], time.perf_counter()
    ckpts = os.path.join(out_dir, "checkpoints")
    steps = lambda: sorted(int(n) for n in os.listdir(ckpts) if n.isdigit()) if os.path.isdir(ckpts) else []
    for kill in range(kills):
        resume = ["--resume"] if steps() else []
        process = subprocess.Popen([*train_argv(data_dir, out_dir), *resume], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = (steps() or [0])[-1] + 5
        peak = run_until(process, lambda: (steps() or [0])[-1] >= target)
        time.sleep(rng.uniform(0, 0.5))
        peaks.append(max(peak, peak_mb(process.pid)))
        process.send_signal(signal.SIGKILL)
        code = process.wait()
        print(f"training: kill {kill + 1} at step {(steps() or [0])[-1]} ({'killed' if code == -signal.SIGKILL else f'exit {code}'})")
        if code not in (-signal.SIGKILL, 0):
            failures += 1
    finished = subprocess.Popen([*train_argv(data_dir, out_dir), "--resume"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peaks.append(run_until(finished, lambda: False))
    failures += finished.wait() != 0
    log, started = io.StringIO(), time.perf_counter()
    with contextlib.redirect_stderr(log):
        whole = train_jax.fit(train_jax.default_flags(data_dir=data_dir, out_dir=os.path.join(folder, "whole"), **TRAIN_FLAGS))
    failures += check_speed_lines(log.getvalue(), whole["ms_per_step"], time.perf_counter() - started)
    manager = checkpoints.checkpoint_manager(out_dir, 2)
    state, _ = checkpoints.restore_checkpoint(manager, TRAIN_FLAGS["max_iters"], whole["state"])
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(whole["state"])))
    failures += not same
    print(f"training: {kills} kills and a resume in {time.perf_counter() - start:.0f} s; finished params "
          f"{'bit-exact' if same else 'DIFFER'}; peak memory of each training process "
          f"{', '.join(f'{mb:.0f}' for mb in peaks)} MB; {failures} failures")  # fmt: skip
    return failures


def check_speed_lines(log, ms_per_step, wall_s):
    """The uninterrupted run's figures: its windows (steps alone) cannot be slower than its wall time
    (with compiling, evaluations and checkpoints), and no MFU above 100% is printed. Failures: 0-2."""
    mfus = [float(mfu) for mfu in re.findall(r"MFU (\d+\.\d)%", log)]
    wall_ms = 1e3 * wall_s / TRAIN_FLAGS["max_iters"]
    over = sum(mfu > 100 for mfu in mfus)
    mfu_range = f"{min(mfus, default=0):.1f}-{max(mfus, default=0):.1f}%"
    print(f"training: the uninterrupted run's windows {ms_per_step:.2f} ms/step, its wall time {wall_ms:.2f} ms/step "
          f"(ratio {ms_per_step / wall_ms:.2f}); MFU {mfu_range}, {over} lines above 100%")  # fmt: skip
    return (ms_per_step > wall_ms) + (over > 0)


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
