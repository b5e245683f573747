"""nanoGPT's CPU "baby" run with train_jax, and with nanoGPT itself in the same run: ms/iter of both and
their ratio, tokens/s, GFLOP/s against the matmul peak, our val loss over the whole val split.

    python bench/train_shakespeare.py --input ../shared/data/tinyshakespeare/input.txt [--max_iters 2000] [--nanogpt DIR]

The config is nanoGPT's README CPU example (config/train_shakespeare_char.py with --device=cpu
--compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4
--n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0), character level with
the bytes tokenizer (the same 65 ids as nanoGPT's prepare.py). nanoGPT reaches val loss 1.88 with it.
ms/iter counts the train steps only: ours over the logging windows (evaluation and checkpoints are
timed apart), nanoGPT's the mean of its per-iteration times, leaving out iteration 0 and the
iterations that evaluate. nanoGPT (a clone of karpathy/nanoGPT, and torch) runs when --nanogpt DIR
is given: its own prepare.py, model.py and train.py, in a temporary folder.
"""

import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import train_jax  # noqa: E402
import monitor  # noqa: E402
from step import loss_fn  # noqa: E402

BABY = dict(
    n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, dropout=0.0,
    learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, beta2=0.99, weight_decay=0.1, grad_clip=1.0,
    eval_interval=250, eval_iters=20, log_interval=10,
)  # fmt: skip


def whole_split_loss(params, ids, block_size, batch_size, n_head):
    """The mean next-token loss over all non-overlapping blocks of `ids`."""
    import jax

    loss = jax.jit(functools.partial(loss_fn, key=None, n_head=n_head, rate=0.0, dtype="float32"))
    offsets = np.arange((len(ids["shards"][0]) - 1) // block_size) * block_size  # [n_blocks] (one file: window index = start)
    total = 0.0
    for start in range(0, len(offsets), batch_size):
        inputs, targets = data.get_batch(ids, offsets[start : start + batch_size], block_size)
        total += float(loss(params, inputs, targets)) * len(inputs)
    return total / len(offsets)


def nanogpt_ms_per_iter(nanogpt, input, max_iters, work):
    """nanoGPT's mean ms per training iteration and its last val loss estimate with its step, from its own log."""
    data_dir = os.path.join(work, "data", "shakespeare_char")
    os.makedirs(data_dir)
    for name in ("configurator.py", "config"):  # train.py reads them from its working folder
        os.symlink(os.path.join(nanogpt, name), os.path.join(work, name))
    shutil.copyfile(input, os.path.join(data_dir, "input.txt"))
    shutil.copyfile(os.path.join(nanogpt, "data", "shakespeare_char", "prepare.py"), os.path.join(data_dir, "prepare.py"))
    subprocess.run([sys.executable, "prepare.py"], cwd=data_dir, check=True, capture_output=True)
    flags = dict(BABY, max_iters=max_iters, lr_decay_iters=max_iters, log_interval=1, device="cpu", compile=False, dtype="float32")
    argv = [sys.executable, os.path.join(nanogpt, "train.py"), "config/train_shakespeare_char.py", *(f"--{k}={v}" for k, v in flags.items() if k in NANOGPT_FLAGS)]
    run = subprocess.run(argv, cwd=work, capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"nanoGPT failed:\n{run.stderr[-2000:]}")
    iters = [(int(i), float(ms)) for i, ms in re.findall(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms", run.stdout, re.M)]
    ms = [t for i, t in iters if i > 0 and i % BABY["eval_interval"]]  # iteration 0 compiles nothing but warms up; eval iterations include the eval
    step, val_loss = re.findall(r"^step (\d+): train loss [\d.]+, val loss ([\d.]+)", run.stdout, re.M)[-1]
    return sum(ms) / len(ms), (float(val_loss), int(step))


NANOGPT_FLAGS = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "dropout", "learning_rate", "min_lr", "warmup_iters",
                 "beta2", "weight_decay", "grad_clip", "eval_interval", "eval_iters", "log_interval", "max_iters", "lr_decay_iters",
                 "device", "compile", "dtype")  # fmt: skip


def main(input, max_iters=2000, nanogpt=""):
    """Prepare INPUT with the bytes tokenizer, train the baby config and print the numbers; with
    --nanogpt DIR (a clone of karpathy/nanoGPT; needs torch) run nanoGPT's train.py on it first."""
    start = time.perf_counter()
    peaks = {n: monitor.matmul_flops(n) for n in (256, 768, 2048)}
    with tempfile.TemporaryDirectory() as work:
        if nanogpt:
            os.makedirs(os.path.join(work, "nanogpt"))
            nano_ms, nano_val = nanogpt_ms_per_iter(os.path.abspath(nanogpt), input, max_iters, os.path.join(work, "nanogpt"))
        data_dir, out_dir = os.path.join(work, "data"), os.path.join(work, "out")
        data.prepare(input=input, out=data_dir, tokenizer="bytes")
        flags = dict(BABY, max_iters=max_iters, lr_decay_iters=max_iters, ckpt_interval=max_iters, peak_flops=peaks[2048])
        summary = train_jax.fit(train_jax.default_flags(data_dir=data_dir, out_dir=out_dir, data_url="", **flags))
        val_ids = data.load_split(data_dir, "val", BABY["block_size"], 256)
        val_loss = whole_split_loss(summary["state"]["params"], val_ids, BABY["block_size"], BABY["batch_size"], BABY["n_head"])
    params = summary["state"]["params"]
    tokens_per_iter = BABY["batch_size"] * BABY["block_size"]
    flops_per_iter = monitor.flops_per_token(params, BABY["n_layer"], BABY["n_embd"], BABY["block_size"]) * tokens_per_iter
    achieved = flops_per_iter / (summary["ms_per_step"] / 1e3)
    print(f"baby config, {max_iters} iterations of {tokens_per_iter} tokens ({flops_per_iter / 1e9:.2f} GFLOP each)")
    print(f"ms/iter:        {summary['ms_per_step']:.1f}")
    if nanogpt:
        print(f"nanoGPT:        {nano_ms:.1f} ms/iter (val loss {nano_val[0]:.4f} at step {nano_val[1]}, on its {BABY['eval_iters']}-batch estimate)")
        print(f"speed ratio:    {nano_ms / summary['ms_per_step']:.2f}x nanoGPT's (above 1: faster)")
    else:
        print("nanoGPT:        not run (give --nanogpt DIR, a clone of karpathy/nanoGPT, with torch installed)")
    print(f"tokens/s:       {summary['tokens_per_s']:,.0f}")
    print(f"GFLOP/s:        {achieved / 1e9:.1f} (matmul peak: " + ", ".join(f"{n}x{n} {p / 1e9:.0f}" for n, p in peaks.items()) + ")")
    print(f"val loss:       {val_loss:.4f} (whole val split; best eval estimate {summary['best_val_loss']:.4f})")
    print(f"wall time:      {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
