"""nanoGPT's CPU "baby" run with train_jax: ms/iter, tokens/s, GFLOP/s against the matmul peak, val loss.

    python bench/train_shakespeare.py --input ../shared/data/tinyshakespeare/input.txt [--max_iters 2000]

The config is nanoGPT's README CPU example (config/train_shakespeare_char.py with --block_size=64
--batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000
--dropout=0.0), character level with the bytes tokenizer. nanoGPT reaches val loss 1.88 with it.
ms/iter counts the train steps only (evaluation and checkpoints are timed apart, as nanoGPT's
per-iteration numbers do); the val loss is over every block of the whole val split.
"""

import functools
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import train_jax  # noqa: E402

BABY = dict(
    n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, dropout=0.0,
    learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, beta2=0.99, weight_decay=0.1, grad_clip=1.0,
    eval_interval=250, eval_iters=20, log_interval=10,
)  # fmt: skip


def whole_split_loss(params, ids, block_size, batch_size, n_head):
    """The mean next-token loss over all non-overlapping blocks of `ids`."""
    import jax

    loss = jax.jit(functools.partial(train_jax.loss_fn, key=None, n_head=n_head, rate=0.0, dtype="float32"))
    offsets = np.arange((len(ids["shards"][0]) - 1) // block_size) * block_size  # [n_blocks] (one file: window index = start)
    total = 0.0
    for start in range(0, len(offsets), batch_size):
        inputs, targets = data.get_batch(ids, offsets[start : start + batch_size], block_size)
        total += float(loss(params, inputs, targets)) * len(inputs)
    return total / len(offsets)


def main(input, max_iters=2000):
    """Prepare INPUT with the bytes tokenizer, train the baby config and print the numbers."""
    start = time.perf_counter()
    peaks = {n: train_jax.matmul_flops(n) for n in (256, 768, 2048)}
    with tempfile.TemporaryDirectory() as work:
        data_dir, out_dir = os.path.join(work, "data"), os.path.join(work, "out")
        data.prepare(input=input, out=data_dir, tokenizer="bytes")
        flags = dict(BABY, max_iters=max_iters, ckpt_interval=max_iters, peak_flops=peaks[2048])
        summary = train_jax.fit(train_jax.default_flags(data_dir=data_dir, out_dir=out_dir, data_url="", **flags))
        val_ids = data.load_split(data_dir, "val", BABY["block_size"], 256)
        val_loss = whole_split_loss(summary["state"]["params"], val_ids, BABY["block_size"], BABY["batch_size"], BABY["n_head"])
    params = summary["state"]["params"]
    tokens_per_iter = BABY["batch_size"] * BABY["block_size"]
    flops_per_iter = train_jax.flops_per_token(params, BABY["n_layer"], BABY["n_embd"], BABY["block_size"]) * tokens_per_iter
    achieved = flops_per_iter / (summary["ms_per_step"] / 1e3)
    print(f"baby config, {max_iters} iterations of {tokens_per_iter} tokens ({flops_per_iter / 1e9:.2f} GFLOP each)")
    print(f"ms/iter:        {summary['ms_per_step']:.1f}")
    print(f"tokens/s:       {summary['tokens_per_s']:,.0f}")
    print(f"GFLOP/s:        {achieved / 1e9:.1f} (matmul peak: " + ", ".join(f"{n}x{n} {p / 1e9:.0f}" for n, p in peaks.items()) + ")")
    print(f"val loss:       {val_loss:.4f} (whole val split; best eval estimate {summary['best_val_loss']:.4f})")
    print(f"wall time:      {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
