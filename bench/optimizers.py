"""AdamW against Muon (`--optimizer muon`) on Tiny Shakespeare with GPT-2's BPE, each at the best of a
learning-rate sweep: the final val losses, the steps and training seconds each takes to reach AdamW's
final val loss (targets: Muon in at most 0.75x the steps and 0.85x the seconds), both optimizers'
ms/step at two batch sizes and the time of the optimizer's update alone (Newton-Schulz costs per step,
not per token), and a PNG of the val curves.

    python bench/optimizers.py --input ../shared/data/tinyshakespeare/input.txt [--max_iters 200] [--other_batch 32] [--png optimizers.png]

Every run is `train_jax.fit` with the same seed, so the same init and the same batches (the same
tokens). AdamW sweeps --learning_rate; Muon sweeps --muon_learning_rate, its AdamW part (embeddings,
gains, biases) at AdamW's best --learning_rate. The best run of each is the one with the lowest final
val loss. Val losses are the runs' own evaluations (a fixed set of SMALL's eval_iters batches of the
val split, every --eval_interval steps); a target is reached at the first evaluation at or below it.
ms/step (the mean over the logging windows: compiling and evaluation left out) is timed in short runs
of the two best settings, alternating adamw, muon, muon, adamw and keeping the faster of each pair, so
that the machine's drifting speed hits both alike; training seconds are steps x that ms/step at the
sweep's batch. The text is prepared with GPT-2's vocabulary (the project's copy, or the encoder.json
and vocab.bpe in --vocab_dir).
"""

import functools
import math
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import monitor  # noqa: E402
import step  # noqa: E402
import train_jax  # noqa: E402

# 7.2M params, 6.4M of them the 50257-row wte: a step of 8 x 64 tokens takes about half a second here.
SMALL = dict(
    n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=8, dropout=0.0, warmup_iters=20, weight_decay=0.1,
    grad_clip=1.0, beta2=0.95, eval_iters=8, log_interval=20, data_url="",
)  # fmt: skip
SWEEPS = {"adamw": ("learning_rate", (5e-4, 1e-3, 2e-3, 4e-3)), "muon": ("muon_learning_rate", (0.005, 0.01, 0.02, 0.04))}
TARGETS = {"steps": 0.75, "seconds": 0.85}  # Muon's share of AdamW's, at most


@functools.lru_cache(maxsize=1)
def host_peak():
    """The FLOP/s of the matmul probe, which MFU is measured against: once, not in every run."""
    return monitor.matmul_flops()


def fit(data_dir, work, **flags):
    """One run of SMALL with `flags`, in a fresh folder: its summary."""
    out_dir = tempfile.mkdtemp(dir=work)
    return train_jax.fit(train_jax.default_flags(data_dir=data_dir, out_dir=out_dir, **{**SMALL, "peak_flops": host_peak(), **flags}))


def first_at_or_below(val_losses, target):
    """The first evaluated step whose val loss is at most `target`, or None."""
    return next((step for step, loss in sorted(val_losses.items()) if loss <= target), None)


def adamw_rates(learning_rate):
    """AdamW's peak and, as nanoGPT's, a tenth of it at the end of the cosine (Muon's follows: a tenth of its peak)."""
    return {"learning_rate": learning_rate, "min_lr": learning_rate / 10}


def sweep(data_dir, work, optimizer, schedule, adamw_rate=None):
    """{rate: summary} of the optimizer's runs over its sweep: AdamW's --learning_rate, or Muon's
    --muon_learning_rate with its AdamW part at `adamw_rate`."""
    flag, rates = SWEEPS[optimizer]
    flags = lambda rate: adamw_rates(rate) if optimizer == "adamw" else {**adamw_rates(adamw_rate), flag: rate}
    return {rate: fit(data_dir, work, optimizer=optimizer, **schedule, **flags(rate)) for rate in rates}


def best_rate(runs, max_iters):
    return min(runs, key=lambda rate: runs[rate]["val_losses"][max_iters])


def ms_per_step(data_dir, work, batch_sizes, steps, rates):
    """{(optimizer, batch size): ms/step} of short runs: at each batch size adamw, muon, muon, adamw,
    the faster of each optimizer's two (the machine's speed drifts)."""
    schedule = dict(max_iters=steps, lr_decay_iters=steps, eval_interval=steps, eval_iters=1, log_interval=steps // 3)
    timed = lambda optimizer, batch_size: fit(data_dir, work, optimizer=optimizer, batch_size=batch_size, **schedule, **rates)["ms_per_step"]
    ms = {}
    for batch_size in batch_sizes:
        for optimizer in ("adamw", "muon", "muon", "adamw"):
            ms[optimizer, batch_size] = min(ms.get((optimizer, batch_size), math.inf), timed(optimizer, batch_size))
    return ms


def update_ms(n_vocab, rates, repeats=20):
    """{optimizer: ms} of the optimizer's update alone (jitted, SMALL's params and a gradient of theirs,
    the fastest of `repeats`): what Muon's Newton-Schulz adds to a step, whatever its batch."""
    import jax

    hparams = step.scratch_hparams(SMALL, n_vocab)
    ms = {}
    for optimizer_name in ("adamw", "muon"):
        flags = train_jax.check_flags(train_jax.default_flags(**{**SMALL, **rates, "optimizer": optimizer_name}))
        optimizer, _ = step.run_optimizer(flags)
        state = step.init_state(step.init_params(hparams, flags["seed"]), optimizer, flags["seed"])
        grads = jax.tree.map(lambda p: 1e-3 * jax.numpy.sign(p), state["params"])  # the params' shapes, nonzero
        update = jax.jit(optimizer.update)
        jax.block_until_ready(update(grads, state["opt_state"], state["params"]))  # compiled
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(update(grads, state["opt_state"], state["params"]))
            seconds.append(time.perf_counter() - start)
        ms[optimizer_name] = 1e3 * min(seconds)
    return ms


def plot(curves, ms, target, png):
    """Val loss by step and by training second of each optimizer's best run, and the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_step, by_second) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for name, val_losses in curves.items():
        steps = sorted(val_losses)
        by_step.plot(steps, [val_losses[s] for s in steps], marker=".", label=name)
        by_second.plot([s * ms[name] / 1e3 for s in steps], [val_losses[s] for s in steps], marker=".", label=name)
    by_step.set(xlabel="step", ylabel="val loss (fixed eval batches)", title="Tiny Shakespeare, GPT-2 BPE")
    by_second.set(xlabel="training seconds (evaluation left out)", title="the same runs by time")
    for axes in (by_step, by_second):
        axes.axhline(target, color="gray", linestyle="--", linewidth=1, label="AdamW's final val loss")
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(png, dpi=110)


def main(input, vocab_dir="", max_iters=200, eval_interval=20, other_batch=32, timing_steps=30, png="optimizers.png"):
    """Prepare INPUT with GPT-2's BPE, sweep both optimizers, time their steps, print the comparison
    and write the PNG.

    Args:
      input: the text (Tiny Shakespeare).
      vocab_dir: a folder of GPT-2's encoder.json and vocab.bpe ('': the project's copy).
      max_iters: steps of each sweep run (the cosine decays to a tenth of the peak over them).
      eval_interval: steps between evaluations of the val loss.
      other_batch: the batch size ms/step is compared at besides the sweep's.
      timing_steps: steps of each ms/step run.
      png: where the plot of the val curves goes.
    """
    start, load = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as work:
        data_dir = os.path.join(work, "data")
        data.prepare(input=input, out=data_dir, tokenizer="gpt2", vocab_dir=vocab_dir)
        schedule = dict(max_iters=max_iters, lr_decay_iters=max_iters, eval_interval=eval_interval)
        runs = {"adamw": sweep(data_dir, work, "adamw", schedule)}
        runs["muon"] = sweep(data_dir, work, "muon", schedule, best_rate(runs["adamw"], max_iters))
        best = {name: best_rate(sweep_runs, max_iters) for name, sweep_runs in runs.items()}
        rates = dict(**adamw_rates(best["adamw"]), muon_learning_rate=best["muon"])
        ms = ms_per_step(data_dir, work, (SMALL["batch_size"], other_batch), timing_steps, rates)
        updates = update_ms(data.read_meta(data_dir)["vocab_size"], rates)
    print(f"Tiny Shakespeare, GPT-2 BPE ({vocab_dir or 'the project vocabulary'}), {SMALL['n_layer']} layers x {SMALL['n_embd']}, "
          f"{max_iters} steps of {SMALL['batch_size']} x {SMALL['block_size']} tokens, seed 1337 for every run")  # fmt: skip
    target = report(runs, best, ms, max_iters)
    print(f"the optimizer's update alone: adamw {updates['adamw']:.1f} ms, muon {updates['muon']:.1f} ms: Newton-Schulz "
          f"{updates['muon'] - updates['adamw']:+.1f} ms per step, at any batch")  # fmt: skip
    labels = {name: f"{name}, --{SWEEPS[name][0]} {rate:g}" for name, rate in best.items()}
    curves = {labels[name]: runs[name][rate]["val_losses"] for name, rate in best.items()}
    plot(curves, {labels[name]: ms[name, SMALL["batch_size"]] for name in best}, target, png)
    print(f"plot: {os.path.abspath(png)}")
    print(f"wall time: {time.perf_counter() - start:.0f} s; load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (2 cores)")


def report(runs, best_rates, ms, max_iters):
    """Print the sweeps, the ms/step comparison, and when each best run (at `best_rates`) reaches AdamW's
    final val loss (in steps, and in seconds at the alternated ms/step of the sweep's batch), against
    the targets; returns that val loss."""
    best = {name: runs[name][rate] for name, rate in best_rates.items()}
    target = best["adamw"]["val_losses"][max_iters]
    for name, sweep_runs in runs.items():
        edge = " (the best at an end of the sweep: widen it)" if best_rates[name] in (min(sweep_runs), max(sweep_runs)) else ""
        losses = ", ".join(f"{rate:g} -> {run['val_losses'][max_iters]:.4f}" for rate, run in sweep_runs.items())
        print(f"{name} sweep of --{SWEEPS[name][0]} (final val loss): {losses}{edge}")
    print("ms/step, alternating adamw, muon, muon, adamw (the faster of each pair):")
    for batch_size in sorted({b for _, b in ms}):
        adamw, muon = ms["adamw", batch_size], ms["muon", batch_size]
        print(f"  batch {batch_size:3d}: adamw {adamw:.1f}, muon {muon:.1f}: Newton-Schulz {muon - adamw:+.1f} ms ({muon / adamw - 1:+.1%})")
    print(f"target: AdamW's final val loss {target:.4f}")
    reached = {name: first_at_or_below(run["val_losses"], target) for name, run in best.items()}
    for name, run in best.items():
        when = "never" if reached[name] is None else f"at step {reached[name]}, {reached[name] * ms[name, SMALL['batch_size']] / 1e3:.1f} s of training"
        print(f"{name:6s} final val loss {run['val_losses'][max_iters]:.4f} (best {run['best_val_loss']:.4f}); reaches the target {when} "
              f"(its sweep run's own mean: {run['ms_per_step']:.1f} ms/step)")  # fmt: skip
    if reached["muon"] is None:
        print(f"muon does not reach the target in {max_iters} steps: both targets missed")
        return target
    ratios = {"steps": reached["muon"] / reached["adamw"]}
    ratios["seconds"] = ratios["steps"] * ms["muon", SMALL["batch_size"]] / ms["adamw", SMALL["batch_size"]]
    for what, ratio in ratios.items():
        print(f"muon/adamw {what} to the target: {ratio:.2f}x (target <= {TARGETS[what]}x: {'met' if ratio <= TARGETS[what] else 'missed'})")
    return target


if __name__ == "__main__":
    import fire

    fire.Fire(main)
