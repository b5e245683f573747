"""Race nanoGPT on one GPU: GPT-2 124M at T=1024 in bfloat16, our train step (fused attention, with AdamW
and with Muon) beside nanoGPT's own train.py (torch.compile, flash attention), with the same batch and
tokens per step: ms/step, tokens/s, MFU against the GPU's datasheet peak, and the ratio to nanoGPT.

    python bench/gpu.py --nanogpt DIR [--batch_size 16] [--steps 30] [--optimizers adamw,muon]
    python bench/gpu.py --device cpu [--nanogpt DIR]    # a tiny configuration on the CPU

GPU hosts are often offline, so it downloads nothing. The batches are random token ids (the vocabulary
padded to 50304, as nanoGPT pads it), which nanoGPT reads from a train.bin written in a temporary
folder. Our side builds the train state and jits the step with step.py and sharding.py, as train_jax.py
does, and times `--steps` steps after `--warmup` with the device drained at both ends. nanoGPT's side
is the mean of its own per-iteration times after as many warm-up iterations (its iteration 0 compiles
and evaluates once, on one batch). nanoGPT runs first, in its own process: JAX here allocates GPU memory
as it goes (XLA_PYTHON_CLIENT_PREALLOCATE=false), so nanoGPT has the whole GPU.

What the GPU host needs: for our side JAX with CUDA (jax[cuda12]), numpy, and the project's small
pure-Python dependencies optax, absl-py, fire and termcolor (bring them as wheels: `pip download optax
absl-py fire termcolor`); it imports neither TensorFlow, orbax, tiktoken, regex, requests nor
huggingface_hub. For nanoGPT's side, torch with CUDA (and its triton, for torch.compile) and a
checkout of karpathy/nanoGPT (--nanogpt DIR), whose train.py runs as it is.
"""

import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

import train_jax  # noqa: E402
from aot import abstract_params  # noqa: E402
from cli import UserError, run_cli  # noqa: E402
from monitor import flops_per_token, n_params, peak_flops  # noqa: E402
from sharding import batch_sharding, device_mesh  # noqa: E402
from step import init_params, init_sharded_state, jit_train_step, run_attention, run_optimizer, scratch_hparams, step_args  # noqa: E402

GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)  # nanoGPT's padded vocabulary
TINY = dict(GPT2_124M, n_layer=2, n_head=2, n_embd=64, block_size=64)  # --device cpu
OPTIMIZER = dict(learning_rate=6e-4, min_lr=6e-5, warmup_iters=2000, lr_decay_iters=600000, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0)
NANOGPT_ITER = re.compile(r"^iter (\d+): loss ([\d.]+), time ([\d.]+)ms", re.M)


def synthetic_ids(n_steps, batch_size, block_size, vocab_size, seed):  # -> [n_steps, batch, block_size + 1] uint16
    """Each step's sequences and their next tokens, random ids as nanoGPT's train.bin holds them."""
    return np.random.default_rng(seed).integers(0, vocab_size, (n_steps, batch_size, block_size + 1), dtype=np.uint16)


def our_run(flags, hparams, ids, warmup):
    """Our train step on the first device, as train_jax.py runs it (flags checked by it): (seconds of
    the timed steps, their number, the last loss, the attention it ran)."""
    import jax

    mesh = device_mesh("")
    optimizer, _ = run_optimizer(flags)
    state, shardings = init_sharded_state(init_params(hparams, flags["seed"]), optimizer, flags["seed"], mesh)
    batch = batch_sharding(mesh, 3, axis=1)
    step = jit_train_step(shardings, batch, **step_args(flags, hparams, optimizer, mesh))
    put = lambda i: [jax.device_put(a[None].astype(np.int32), batch) for a in (ids[i, :, :-1], ids[i, :, 1:])]  # [1, batch, T] each
    for i in range(warmup):
        state, metrics = step(state, *put(i))
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for i in range(warmup, len(ids)):
        state, metrics = step(state, *put(i))
    loss = float(metrics["loss"])  # waits for the last step
    return time.perf_counter() - start, len(ids) - warmup, loss, run_attention(flags, hparams, mesh)


def nanogpt_run(nanogpt, python, flags, ids, warmup, device, work):
    """nanoGPT's train.py with our `flags`' shape, batch, dtype and AdamW, as many steps, in `work`:
    (seconds of the timed iterations by its own clock, their number, the last loss)."""
    data_dir = os.path.join(work, "data", "race")
    os.makedirs(data_dir)
    ids.tofile(os.path.join(data_dir, "train.bin"))
    ids[:1].tofile(os.path.join(data_dir, "val.bin"))  # without a meta.pkl, nanoGPT's vocabulary is 50304, as ours
    os.symlink(os.path.join(nanogpt, "configurator.py"), os.path.join(work, "configurator.py"))  # train.py reads it from its folder
    n_iters = len(ids)
    on_gpu = device == "gpu"
    settings = dict(
        dataset="race", out_dir=os.path.join(work, "out"), **{k: flags[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size")},
        bias=True, dropout=0.0, gradient_accumulation_steps=1, max_iters=n_iters - 1, eval_interval=n_iters, eval_iters=1, log_interval=1,
        always_save_checkpoint=False, device="cuda" if on_gpu else "cpu", dtype=flags["dtype"], compile=on_gpu,
        **{k: flags[k] for k in OPTIMIZER},
    )  # fmt: skip
    argv = [python, os.path.join(nanogpt, "train.py"), *(f"--{k}={v}" for k, v in settings.items())]
    run = subprocess.run(argv, cwd=work, capture_output=True, text=True)
    if run.returncode:
        raise UserError(f"nanoGPT's train.py failed (exit {run.returncode}): {(run.stderr.strip().splitlines() or ['no output'])[-1]}")
    iters = [(int(i), float(loss), float(ms)) for i, loss, ms in NANOGPT_ITER.findall(run.stdout)]
    timed = [ms for i, _, ms in iters if i >= warmup]  # iteration 0 compiles and evaluates; the first few settle
    if not timed:
        raise UserError(f"nanoGPT's train.py printed no iteration times after --warmup {warmup}; its output ends: {run.stdout.strip()[-200:]!r}")
    return sum(timed) / 1e3, len(timed), iters[-1][1]


def check_nanogpt(nanogpt, python):
    """A nanoGPT checkout and a Python that imports torch, before anything runs."""
    if not os.path.isfile(os.path.join(nanogpt, "train.py")) or not os.path.isfile(os.path.join(nanogpt, "configurator.py")):
        raise UserError(f"--nanogpt {nanogpt!r} is not a checkout of karpathy/nanoGPT (no train.py and configurator.py): give one")
    probe = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True)
    if probe.returncode:
        raise UserError(f"nanoGPT's side needs torch, which {python} cannot import: install torch there, or give --python of one that has it")


def check_device(device):
    """The first JAX device, which must be of `device`'s kind."""
    import jax

    if device not in ("gpu", "cpu"):
        raise UserError(f"unknown --device {device!r}: use gpu (the race) or cpu (a tiny configuration)")
    first = jax.devices()[0]
    if device == "gpu" and first.platform != "gpu":
        raise UserError(f"no GPU here (JAX sees only {first.platform} devices): run this on a GPU host, or give --device cpu for a tiny check")
    return first


def speed_row(label, seconds, steps, loss, tokens_per_step, flops_per_step, peak, reference=None):
    tokens_per_s = tokens_per_step * steps / seconds
    mfu = f"{flops_per_step * steps / seconds / peak:.1%}" if peak else "-"
    ratio = f"{tokens_per_s / reference:.2f}x" if reference else "-"
    print(f"{label:<46}{1e3 * seconds / steps:>9.1f}{tokens_per_s:>12,.0f}{mfu:>8}{ratio:>14}{loss:>8.3f}", flush=True)
    return tokens_per_s


def main(nanogpt="", device="gpu", batch_size=16, steps=30, warmup=5, optimizers="adamw,muon", attention="auto", remat="none", loss_chunk=0, python=sys.executable, seed=1337):
    """Print ms/step, tokens/s and MFU of our step (each of --optimizers) and of nanoGPT's (with --nanogpt DIR).

    Args:
      nanogpt: a checkout of karpathy/nanoGPT ('': ours only).
      device: gpu: GPT-2 124M, T=1024, bfloat16 (the race); cpu: a tiny float32 configuration.
      batch_size: sequences per step, both sides.
      steps: timed steps per run, after the warm-up.
      warmup: steps run before the timing starts (ours compiles in the first; nanoGPT's first compiles and evaluates).
      optimizers: ours: adamw, muon (train_jax.py's --optimizer), comma-separated.
      attention: train_jax.py's --attention (auto: cuDNN's flash attention on NVIDIA GPUs).
      remat: train_jax.py's --remat; none keeps every activation, as nanoGPT does.
      loss_chunk: train_jax.py's --loss_chunk; 0 computes all the logits at once, as nanoGPT does.
      python: the interpreter that runs nanoGPT (it needs torch).
      seed: of the init and the token ids.
    """
    start = time.perf_counter()
    optimizers = optimizers.split(",") if isinstance(optimizers, str) else list(optimizers)
    first = check_device(device)
    shape, dtype = (GPT2_124M, "bfloat16") if device == "gpu" else (TINY, "float32")
    base = dict(shape, batch_size=batch_size, dtype=dtype, attention=attention, remat=remat, loss_chunk=loss_chunk, dropout=0.0, seed=seed, **OPTIMIZER)
    runs = {name: None if (flag := optimizer_flag(name)) is None else train_jax.check_flags(train_jax.default_flags(**base, **flag)) for name in optimizers}
    if nanogpt:
        check_nanogpt(os.path.abspath(nanogpt), python)
    ids = synthetic_ids(warmup + steps, batch_size, shape["block_size"], shape["vocab_size"], seed)
    hparams = scratch_hparams(shape, shape["vocab_size"])
    params = abstract_params(hparams)  # shapes: what the FLOPs count
    tokens_per_step = batch_size * shape["block_size"]
    flops_per_step = flops_per_token(params, shape["n_layer"], shape["n_embd"], shape["block_size"]) * tokens_per_step
    peak, peak_source = peak_flops([first], dtype)
    print(f"GPT-2 {'124M' if device == 'gpu' else 'tiny'} shape ({n_params(params) / 1e6:.1f}M params, vocab {shape['vocab_size']}), "
          f"batch {batch_size} x {shape['block_size']} = {tokens_per_step:,} tokens/step, {dtype}, {steps} timed steps after {warmup}")  # fmt: skip
    print(f"{first.device_kind}: " + (f"peak {peak / 1e9:,.0f} GFLOP/s ({peak_source})" if peak else f"MFU not shown: {peak_source}"))
    print(f"{'':<46}{'ms/step':>9}{'tokens/s':>12}{'MFU':>8}{'vs nanoGPT':>14}{'loss':>8}", flush=True)
    reference = None
    if nanogpt:
        with tempfile.TemporaryDirectory() as work:
            seconds, n, loss = nanogpt_run(os.path.abspath(nanogpt), python, base, ids, warmup, device, work)
        compiled = "torch.compile" if device == "gpu" else "eager"
        reference = speed_row(f"nanoGPT ({compiled}, AdamW)", seconds, n, loss, tokens_per_step, flops_per_step, peak)
    for name, flags in runs.items():
        if flags is None:
            print(f"ours, {name}: not run: this train_jax.py has no --optimizer {name}", flush=True)
            continue
        seconds, n, loss, ran = our_run(flags, hparams, ids, warmup)
        speed_row(f"ours ({name}, attention {ran}, remat {flags['remat']})", seconds, n, loss, tokens_per_step, flops_per_step, peak, reference)
    if not nanogpt:
        print("nanoGPT: not run (give --nanogpt DIR, a checkout of karpathy/nanoGPT, and a Python with torch)")
    print(f"wall time: {time.perf_counter() - start:.0f} s")


def optimizer_flag(name):
    """train_jax.py's flag for optimizer `name`: {} for AdamW before --optimizer existed, None where
    this train_jax.py has no such optimizer."""
    if "optimizer" in train_jax.default_flags():
        return {"optimizer": name}
    return {} if name == "adamw" else None


if __name__ == "__main__":
    run_cli(main)
