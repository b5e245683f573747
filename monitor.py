"""What a training run reports, and how fast it runs: FLOPs per token, the peak FLOP/s and MFU, the
progress line, bad-step tracking, TensorBoard scalars and samples, all through one reporter.
"""

import os
import sys
import time
import types

import numpy as np

from checkpoints import model_params
from cli import UserError, log
from formats import flatten, import_tensorflow
from gpt2 import generate
from utils import encode_prompt

# Dense FLOP/s of one device by its jax `device_kind` (first pattern found wins), from the vendors'
# datasheets. float32 on NVIDIA is the TF32 tensor-core peak, which JAX's default matmul precision
# uses; TPUs compute float32 matmuls at that default precision in single bfloat16 passes, so both
# dtypes get the bfloat16 peak there.
PEAK_FLOPS = (
    ("H100 PCIe", {"bfloat16": 756e12, "float32": 378e12}),
    ("H100", {"bfloat16": 989e12, "float32": 495e12}),  # SXM
    ("H200", {"bfloat16": 989e12, "float32": 495e12}),
    ("A100", {"bfloat16": 312e12, "float32": 156e12}),
    ("TPU v4", {"bfloat16": 275e12, "float32": 275e12}),
    ("TPU v5 lite", {"bfloat16": 197e12, "float32": 197e12}),  # v5e
    ("TPU v5e", {"bfloat16": 197e12, "float32": 197e12}),
    ("TPU v5", {"bfloat16": 459e12, "float32": 459e12}),  # v5p
    ("TPU v6", {"bfloat16": 918e12, "float32": 918e12}),  # v6e (Trillium), "TPU v6 lite"
)
SAMPLE_TOKENS = 100  # the length of a --sample_every continuation (fewer if n_ctx is shorter)


def n_params(params):
    return sum(int(np.prod(a.shape)) for a in flatten(params).values())


def flops_per_token(params, n_layer, n_embd, block_size):
    """nanoGPT's (PaLM's) estimate: 6N for the matmuls forward and back (N without wpe, which is a
    lookup) plus 12 * n_layer * n_embd * block_size for attention."""
    return 6 * (n_params(params) - params["wpe"].size) + 12 * n_layer * n_embd * block_size


def matmul_flops(n=2048, repeats=3):
    """The float32 FLOP/s of an n x n matmul here (best of `repeats`): the peak MFU is measured against."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, a).block_until_ready()
    seconds = []
    for _ in range(repeats):
        t = time.perf_counter()
        matmul(a, a).block_until_ready()
        seconds.append(time.perf_counter() - t)
    return 2 * n**3 / min(seconds)


def peak_flops(devices, dtype, per_device=0.0):
    """(FLOP/s of all `devices` together, where it comes from), or (None, why) for an unknown accelerator.
    `per_device` (--peak_flops) overrides; CPU devices (faked ones too) share one host, so there the
    figure, given or measured by the matmul probe, counts once."""
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":
        return (per_device, "--peak_flops") if per_device else (matmul_flops(), "a 2048x2048 float32 matmul here")
    if per_device:
        return per_device * len(devices), "--peak_flops"
    peak = next((peaks[dtype] for pattern, peaks in PEAK_FLOPS if pattern.lower() in kind.lower()), None)
    if peak is None:
        return None, f"{kind} is not in monitor.PEAK_FLOPS: give --peak_flops to see MFU"
    return peak * len(devices), f"the {dtype} datasheet peak of {kind}"


def window_speed(window_s, window_steps, tokens_per_step, flops_per_step, peak):
    """ms/step, tokens/s and MFU (none without a peak) over a window of steps."""
    speed = {"ms_per_step": 1e3 * window_s / window_steps, "tokens_per_s": tokens_per_step * window_steps / window_s}
    return {**speed, "mfu": flops_per_step * window_steps / window_s / peak} if peak else speed


def progress_line(done, max_iters, loss, lr, speed):
    """`step 1200/2000: loss 1.8123, lr 2.1e-04, 36.5 ms/step, 21,000 tok/s, MFU 41.2%`."""
    line = f"step {done}/{max_iters}: loss {loss:.4f}, lr {lr:.1e}, {speed['ms_per_step']:.1f} ms/step, {speed['tokens_per_s']:,.0f} tok/s"
    return line + (f", MFU {speed['mfu']:.1%}" if "mfu" in speed else "")


def new_window(first, clock, fresh_tracker):
    """A logging window from step `first`: its start time and a fresh bad-step tracker (on the device)."""
    return {"first": first, "start": clock(), "tracker": fresh_tracker()}


def report_window(report, metrics, window, timed, done, flags, schedule, speed_of, last_checkpoint, clock):
    """At a read-back after step `done`: its loss (waiting for the step), the window's speed (added to
    `timed`) and skipped updates, reported; a NaN under --nan_policy stop raises here. `speed_of` is
    (tokens per step, FLOPs per step, peak FLOP/s); once a window beats the peak, the peak is wrong and
    MFU is shown no more. Returns (loss, updates skipped)."""
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])  # waits for the step
    window_s, window_steps = clock() - window["start"], done - window["first"]
    timed.update(steps=timed["steps"] + window_steps, seconds=timed["seconds"] + window_s)
    skipped = check_bad_steps(window["tracker"], done, window_steps, flags["nan_policy"], last_checkpoint, report.say)
    lr = float(schedule(done - 1))
    speed = window_speed(window_s, window_steps, *speed_of)
    if speed.get("mfu", 0.0) > 1 and not timed.get("above_peak"):  # the peak is wrong, not the steps' wall time
        flops_per_s, peak = speed["mfu"] * speed_of[2], speed_of[2]
        report.say(f"MFU not shown: the steps ran at {flops_per_s / 1e9:,.1f} GFLOP/s, above the peak of {peak / 1e9:,.1f} GFLOP/s "
                   f"it is measured against: give --peak_flops this device's real peak")  # fmt: skip
        timed["above_peak"] = True
    if timed.get("above_peak"):  # no MFU above 100%, and none against a peak known to be wrong
        speed.pop("mfu", None)
    scalars = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm, **{f"speed/{k}": v for k, v in speed.items() if k != "ms_per_step"}}
    report.progress(progress_line(done, flags["max_iters"], loss, lr, speed), done, scalars)
    return loss, skipped


def no_bad_step():
    """What `track_bad_steps` carries on the device between read-backs."""
    import jax.numpy as jnp

    return {"first_bad_step": jnp.int32(-1), "first_bad_loss": jnp.float32(0.0), "skipped": jnp.int32(0)}


def track_bad_steps(tracker, loss, done):
    """Note a non-finite loss on the device (train_step did not apply its update), so the host need
    not read every loss: the first such step since the last read-back, its loss, and their count."""
    import jax.numpy as jnp

    bad = ~jnp.isfinite(loss)
    first = (tracker["first_bad_step"] < 0) & bad
    return {
        "first_bad_step": jnp.where(first, done, tracker["first_bad_step"]),
        "first_bad_loss": jnp.where(first, loss, tracker["first_bad_loss"]),
        "skipped": tracker["skipped"] + bad.astype(jnp.int32),
    }


def check_bad_steps(tracker, done, window_steps, nan_policy, last_checkpoint, write):
    """At a read-back: stop the run at the first non-finite loss since the last one (its update and
    every later one are not saved), or report the skipped updates; returns how many were skipped."""
    first, loss, skipped = int(tracker["first_bad_step"]), float(tracker["first_bad_loss"]), int(tracker["skipped"])
    if skipped and nan_policy == "stop":
        kept = "before the first checkpoint" if last_checkpoint is None else f"with the last good checkpoint (step {last_checkpoint}) intact"
        raise UserError(f"the loss is {loss} at step {first}; stopped {kept}: lower --learning_rate in a new run, or --resume with --nan_policy skip")
    if skipped:
        write(f"step {done}: {skipped} of the last {window_steps} updates skipped, the first at step {first} (loss {loss}, --nan_policy skip)")
    return skipped


def summary_writer(out_dir):
    """TensorBoard event files in OUT_DIR/tensorboard; a resumed run adds a file there, so its curves go on."""
    return import_tensorflow().summary.create_file_writer(os.path.join(out_dir, "tensorboard"))


def write_scalars(writer, step, scalars):
    """Each {tag: value} at `step` (TensorBoard's x axis), as the scalars plugin's float32 tensors
    (tf.summary.scalar would need the tensorboard package; the format is the same)."""
    import tensorflow as tf

    metadata = tf.compat.v1.SummaryMetadata(plugin_data=tf.compat.v1.SummaryMetadata.PluginData(plugin_name="scalars"))
    with writer.as_default(step=step):
        for tag, value in scalars.items():
            tf.summary.write(tag, tf.constant(value, tf.float32), metadata=metadata)


def sample_prompt_ids(encoder, prompt, hparams):
    """`--sample_prompt`'s ids and how many tokens follow them (SAMPLE_TOKENS, or what n_ctx leaves)."""
    try:
        ids = encode_prompt(encoder, hparams, str(prompt), 1)  # fire reads `--sample_prompt 1` as a number
    except UserError as e:
        raise UserError(f"--sample_prompt {str(prompt)!r}: {e}")
    return ids, min(SAMPLE_TOKENS, hparams["n_ctx"] - len(ids))


def sample_hook(encoder, prompt_ids, n_new, n_head, gather):
    """Training params -> the greedy continuation of `prompt_ids` (`gather` makes the params whole on every
    process; the text is generated on process 0, None elsewhere)."""

    def sample(params, main_process):
        host_params = model_params(gather(params), len(encoder.encoder))
        return sample_text(host_params, encoder, prompt_ids, n_head, n_new) if main_process else None

    return sample


def sample_text(params, encoder, prompt_ids, n_head, n_new):
    """The greedy continuation of `prompt_ids` by gpt2.py's generation (jax, on the default device)."""
    return encoder.decode(generate(prompt_ids, params, n_head, n_new, backend="jax"))


def reporter(out_dir, main_process):
    """All of a training run's output, in one place: lines (`say`), the progress line of each logging
    window, and TensorBoard scalars in OUT_DIR/tensorboard (a resumed run adds a file, so its curves go
    on). On a terminal the progress line is the training bar's postfix and other lines print above the
    bar; off one (a scheduler, `> run.log`) every line is a plain line. Only process 0 of a job reports."""
    from tqdm import tqdm

    plain = not sys.stderr.isatty()
    bars = main_process and not plain
    run = {"bar": None, "writer": None}

    def say(text):
        if main_process:
            log(text) if plain else tqdm.write(text, file=sys.stderr)

    def compiling():  # a bar while the train step compiles
        return tqdm(desc="compiling the train step", total=1, leave=False, disable=not bars)

    def start(step, max_iters):
        run["bar"] = tqdm(desc="training", initial=step, total=max_iters, unit="step", dynamic_ncols=True, disable=not bars)
        run["writer"] = summary_writer(out_dir) if main_process else None

    def progress(line, step, values):
        if main_process:
            log(line) if plain else run["bar"].set_postfix_str(line.split(": ", 1)[1])
        scalars(step, values)

    def scalars(step, values):
        if main_process:
            write_scalars(run["writer"], step, values)

    def flush():  # a killed run keeps the curves of its checkpointed steps
        if run["writer"] is not None:
            run["writer"].flush()

    def close():
        if run["bar"] is not None:
            run["bar"].close()
        if run["writer"] is not None:
            run["writer"].close()

    tick = lambda: run["bar"].update()
    return types.SimpleNamespace(main_process=main_process, say=say, compiling=compiling, start=start, tick=tick, progress=progress, scalars=scalars, flush=flush, close=close)


def summarize(report, state, losses, best, timed, skipped, tokens_per_step, out_dir):
    """The summary `train_jax.fit` returns, its figures reported: the mean speed over the timed windows,
    the skipped updates, the best val loss."""
    summary = {"state": state, "losses": losses, "best_val_loss": best[0], "best_step": best[1], "skipped": skipped}
    if timed["steps"]:
        summary.update(ms_per_step=1e3 * timed["seconds"] / timed["steps"], tokens_per_s=tokens_per_step * timed["steps"] / timed["seconds"])
        report.say(f"{summary['ms_per_step']:.1f} ms/step, {summary['tokens_per_s']:,.0f} tokens/s over {timed['steps']} steps")
    if skipped:
        report.say(f"{skipped} updates skipped at a non-finite loss (--nan_policy skip)")
    report.say(f"best val loss {best[0]:.4f} at step {best[1]}; checkpoints in {os.path.join(out_dir, 'checkpoints')}")
    return summary
