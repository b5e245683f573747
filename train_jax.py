"""Train and fine-tune GPT-2 with jax.grad and optax, checkpoint with orbax, export to the release layout.

    python train_jax.py prepare --input FILE [FILE...] --out DIR     # data.py: text to token ids
    python train_jax.py [--data_dir DIR] [--max_iters 2000] ...      # train (no data: Tiny Shakespeare)
    python train_jax.py export --ckpt_dir OUT_DIR --out MODEL_DIR    # then: python gpt2.py "ROMEO:" --model_size MODEL_DIR
    python train_jax.py eval --ckpt_dir OUT_DIR --data_dir DIR --hellaswag   # evaluation.py: loss, HellaSwag
    python train_jax.py compile --topology v5litepod-8 [train flags]  # will the run fit? (no TPU needed)

The loss is the cross-entropy of the same forward that generates text (`gpt2.hidden_states`, its
blocks scanned under --remat, then `gpt2.unembed` a chunk of positions at a time), run on the whole
[batch, n_seq] batch. A run is a pure function of its flags: the batch of step s is drawn from
(seed, s) and the dropout key is carried in the train state, so `--resume` repeats the uninterrupted
run step for step.
"""


import math
import os
import re
import sys
import time

import numpy as np

from aot import check_fit
from checkpoints import check_resume, check_resume_batch, checkpoint_manager, export, finished_step, restore_checkpoint, save_checkpoint, write_config
from cli import UserError, check_folder, check_number, check_positive_int, check_seed, run_cli
from data import EVAL_STREAM, SHAKESPEARE_URL, TRAIN_STREAM, batch_offsets, ensure_data, load_split, prepare, read_meta, sharded_batch
from encoder import gpt2_vocab_dir, load_encoder
from evaluation import evaluate, hellaswag_hook, hellaswag_line
from formats import VOCAB_FILES, read_json, unstacked
from fused import check_attention
from monitor import flops_per_token, n_params, new_window, no_bad_step, peak_flops, report_window, reporter, sample_hook, sample_prompt_ids, summarize, track_bad_steps
from sharding import batch_sharding, check_fits, device_mesh, initialize_distributed, param_shardings
from step import OPTIMIZERS, REMAT_POLICIES, batch_plan, estimate_loss, init_params, init_sharded_state, jit_eval_loss, jit_train_step, run_attention, run_optimizer, scratch_hparams, step_args
from utils import load_encoder_hparams_and_params, resolve_model_dir

DTYPES = ("float32", "bfloat16")
NAN_POLICIES = ("stop", "skip")


# ---------------------------------------------------------------------------------------------
# Flags


def check_flags(flags):
    for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "max_iters",
                 "eval_interval", "eval_iters", "log_interval", "ckpt_interval", "keep"):  # fmt: skip
        check_positive_int(flags[name], name)
    for name in ("vocab_size", "warmup_iters", "lr_decay_iters", "grad_accum", "total_batch_tokens", "loss_chunk", "sample_every",
                 "hellaswag_every"):  # fmt: skip
        if type(flags[name]) is not int or flags[name] < 0:
            raise UserError(f"--{name} must be an integer >= 0, got {flags[name]!r}")
    check_seed(flags["seed"])
    for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "peak_flops", "muon_learning_rate", "muon_weight_decay"):
        check_number(flags[name], name, 0, math.inf)
    for name in ("dropout", "beta1", "beta2", "muon_momentum"):
        check_number(flags[name], name, 0, 1)
    folders = check_run_flags(flags)
    if flags["n_embd"] % flags["n_head"]:
        raise UserError(f"--n_embd {flags['n_embd']} must be a multiple of --n_head {flags['n_head']}")
    if flags["dtype"] not in DTYPES:
        raise UserError(f"unknown --dtype {flags['dtype']!r}: use {' or '.join(DTYPES)}")
    if flags["optimizer"] not in OPTIMIZERS:
        raise UserError(f"unknown --optimizer {flags['optimizer']!r}: use {' or '.join(OPTIMIZERS)}")
    if flags["remat"] not in ("auto", *REMAT_POLICIES):
        raise UserError(f"unknown --remat {flags['remat']!r}: use auto, {', '.join(REMAT_POLICIES)}")
    check_attention(flags["attention"])
    return {**flags, **folders, "lr_decay_iters": flags["lr_decay_iters"] or flags["max_iters"]}


def check_run_flags(flags):
    """The flags that are not numbers: switches, names, folders and the data URL; the folders as text."""
    if type(flags["resume"]) is not bool:
        raise UserError(f"--resume takes no value: give --resume or leave it out, got {flags['resume']!r}")
    if flags["nan_policy"] not in NAN_POLICIES:
        raise UserError(f"unknown --nan_policy {flags['nan_policy']!r}: use {' or '.join(NAN_POLICIES)}")
    if flags["data_url"] and not re.match(r"https?://", str(flags["data_url"])):
        raise UserError(f"--data_url {flags['data_url']!r} is not an http(s) URL: give one, or '' to require prepared data")
    folders = {name: check_folder(flags[name], name) for name in ("data_dir", "out_dir", "models_dir")}
    return {**folders, "init_from": str(flags["init_from"])}


# ---------------------------------------------------------------------------------------------
# Set-up: the run, its state, its programs


def initial_model(flags, meta):
    """(hparams, NumPy params, vocab_dir): GPT-2's init for the flags' shape, or a checkpoint to fine-tune."""
    if flags["init_from"] == "scratch":
        n_vocab = flags["vocab_size"] or meta["vocab_size"]
        if n_vocab < meta["vocab_size"]:
            raise UserError(f"--vocab_size {n_vocab} is smaller than the data's vocabulary of {meta['vocab_size']}: give 0 (the data's) or more")
        hparams = scratch_hparams(flags, n_vocab)
        has_vocab = all(os.path.isfile(os.path.join(flags["data_dir"], name)) for name in VOCAB_FILES)
        vocab_dir = flags["data_dir"] if has_vocab else gpt2_vocab_dir()  # ids without a vocabulary are GPT-2's
        return hparams, init_params(hparams, flags["seed"]), vocab_dir
    model_dir = resolve_model_dir(flags["init_from"], flags["models_dir"], flag="init_from")
    encoder, hparams, params = load_encoder_hparams_and_params(model_dir)
    if flags["block_size"] > hparams["n_ctx"]:
        raise UserError(f"--block_size {flags['block_size']} exceeds the n_ctx {hparams['n_ctx']} of {flags['init_from']}")
    data_vocab = os.path.join(flags["data_dir"], "encoder.json")
    if os.path.isfile(data_vocab) and read_json(data_vocab, "prepare the data again") != encoder.encoder:
        raise UserError(f"{flags['data_dir']} was not tokenized with {flags['init_from']}'s vocabulary: prepare it with --tokenizer gpt2")
    return hparams, params, model_dir


def finished_run(flags):
    """--resume's checks before anything loads: the flags must be the run's, and a run already at
    --max_iters has nothing to do (its step, else None)."""
    check_resume(flags["out_dir"], flags, default_flags())
    return finished_step(flags["out_dir"], flags["keep"], flags["max_iters"])


def load_run(flags):
    """The run's data, model and devices: {'hparams', 'params', 'vocab_dir', 'mesh', 'attention' (what
    --attention runs on it), 'plan' (see batch_plan), 'train'/'val' (the splits' ids), 'encoder' (for
    samples and HellaSwag, else None), 'prompt' (--sample_prompt's ids and the tokens to add),
    'optimizer' and its 'schedule', 'tokens_per_step'}."""
    ensure_data(flags["data_dir"], flags["data_url"])
    hparams, params, vocab_dir = initial_model(flags, read_meta(flags["data_dir"]))
    mesh = device_mesh(flags["mesh"])
    check_fits(mesh, hparams)
    attention = run_attention(flags, hparams, mesh)  # an --attention that cannot run here stops before the data loads
    plan = batch_plan(flags, mesh)
    if flags["resume"]:
        check_resume_batch(flags["out_dir"], plan)
    splits = {split: load_split(flags["data_dir"], split, flags["block_size"], hparams["n_vocab"]) for split in ("train", "val")}
    encoder = load_encoder(vocab_dir) if flags["sample_every"] or flags["hellaswag_every"] else None
    prompt = sample_prompt_ids(encoder, flags["sample_prompt"], hparams) if flags["sample_every"] else None  # (ids, n_new)
    optimizer, schedule = run_optimizer(flags)
    tokens_per_step = plan["grad_accum"] * plan["global_batch"] * flags["block_size"]
    run = dict(hparams=hparams, params=params, vocab_dir=vocab_dir, mesh=mesh, attention=attention, plan=plan, encoder=encoder, prompt=prompt)
    return {**run, **splits, "optimizer": optimizer, "schedule": schedule, "tokens_per_step": tokens_per_step}


def start_state(flags, run, report):
    """(train state, its shardings, the checkpoint manager, the first step): a new state on the mesh
    (and config.json written), or with --resume the latest checkpoint's."""
    state, shardings = init_sharded_state(run["params"], run["optimizer"], flags["seed"], run["mesh"])
    manager, out_dir = checkpoint_manager(flags["out_dir"], flags["keep"]), flags["out_dir"]
    if flags["resume"]:
        if manager.latest_step() is None:
            raise UserError(f"--resume: {out_dir} has no checkpoint yet; run without --resume")
        state, loader = restore_checkpoint(manager, manager.latest_step(), state)
        report.say(f"resuming {out_dir} at step {loader['next_batch']}")
        return state, shardings, manager, loader["next_batch"]
    if manager.latest_step() is not None:
        raise UserError(f"{out_dir} already holds checkpoints: add --resume to continue, or give another --out_dir")
    if report.main_process:
        write_config(out_dir, flags, run["hparams"], run["vocab_dir"], run["plan"])
    return state, shardings, manager, 0


def compile_programs(flags, run, state, shardings, start, report):
    """What the loop calls, built once: 'batch' (step -> its sharded inputs and targets), 'step' (the
    train step, compiled here on the first batch), 'eval_loss' and its fixed 'eval_batches', the
    bad-step tracker, the sample and HellaSwag hooks, and the speed's tokens, FLOPs and peak."""
    import jax

    seed, block_size, mesh, hparams, plan = flags["seed"], flags["block_size"], run["mesh"], run["hparams"], run["plan"]
    args = step_args(flags, hparams, run["optimizer"], mesh)
    batch_shape, batch, eval_batch = (plan["grad_accum"], plan["global_batch"]), batch_sharding(mesh, 3, axis=1), batch_sharding(mesh, 2, axis=0)
    offsets = lambda step: batch_offsets(seed, TRAIN_STREAM, step, batch_shape, run["train"], block_size)
    train_batch = lambda step: sharded_batch(run["train"], offsets(step), block_size, batch)
    eval_offsets = lambda ids: batch_offsets(seed, EVAL_STREAM, 0, (flags["eval_iters"], plan["global_batch"]), ids, block_size)
    eval_batches = {split: [sharded_batch(run[split], o, block_size, eval_batch) for o in eval_offsets(run[split])] for split in ("train", "val")}
    hellaswag = hellaswag_on_training_params(flags, run, args["dtype"]) if flags["hellaswag_every"] else None  # reads the examples
    flops_per_step = flops_per_token(run["params"], hparams["n_layer"], hparams["n_embd"], block_size) * run["tokens_per_step"]
    peak, peak_source = peak_flops(mesh.devices.flatten(), args["dtype"], flags["peak_flops"])
    peak_text = f"peak {peak / 1e9:,.0f} GFLOP/s ({peak_source})" if peak else f"MFU not shown: {peak_source}"
    report.say(
        f"{n_params(run['params']) / 1e6:.2f}M params, global batch {plan['global_batch']} ({flags['batch_size']} per dp*fsdp rank) "
        f"x {plan['grad_accum']} accumulation = {run['tokens_per_step']} tokens/step, {mesh.size} device(s) {dict(mesh.shape)}, "
        f"remat {args['remat']}, attention {run['attention']}, {peak_text}"
    )
    with report.compiling() as bar:
        step_fn = jit_train_step(shardings, batch, **args).lower(state, *train_batch(start)).compile()
        bar.update()
    replicated = shardings["key"]
    track = jax.jit(track_bad_steps, donate_argnums=0, out_shardings=replicated)
    fresh_tracker = jax.jit(no_bad_step, out_shardings=replicated)
    track(fresh_tracker(), jax.device_put(np.float32(0.0), replicated), start)  # both compiled now, not in the first window's time
    return {
        "batch": train_batch,
        "step": step_fn,
        "eval_loss": jit_eval_loss(shardings["params"], eval_batch, args["n_head"], args["dtype"], args["loss_chunk"], args["attention"]),
        "eval_batches": eval_batches,
        "track": track,
        "fresh_tracker": fresh_tracker,
        "sample": sample_hook(run["encoder"], *run["prompt"], hparams["n_head"], jax.jit(unstacked, out_shardings=replicated)) if run["prompt"] else None,
        "hellaswag": hellaswag,
        "speed": (run["tokens_per_step"], flops_per_step, peak),
    }


def hellaswag_on_training_params(flags, run, dtype):
    """Training params -> HellaSwag's (acc, acc_norm, examples), through gpt2.py's list of blocks on the mesh."""
    import jax

    model_shardings = param_shardings(run["params"], run["mesh"])
    score = hellaswag_hook(flags["models_dir"], run["encoder"], run["hparams"], run["mesh"], model_shardings, dtype, run["plan"]["global_batch"])
    to_model = jax.jit(unstacked, out_shardings=model_shardings)
    return lambda params: score(to_model(params))  # on every process: the forward is sharded


def fit(flags, clock=time.perf_counter):
    """Train with checked flags (see `train`); returns a summary: the final state, best val loss and
    its step, the loss of every logged step and the val loss of every evaluation, the mean ms per step
    and tokens per second over the logging windows (timed by `clock`), and the number of skipped updates."""
    import jax

    flags = check_flags(flags)
    initialize_distributed(flags["coordinator_address"], flags["num_processes"], flags["process_id"])
    report = reporter(flags["out_dir"], main_process=jax.process_index() == 0)
    if flags["resume"] and (finished := finished_run(flags)) is not None:
        report.say(f"run is at step {finished} of {flags['max_iters']}: raise --max_iters to continue")
        return {"state": None, "losses": {}, "val_losses": {}, "best_val_loss": None, "best_step": None, "skipped": 0}
    run = load_run(flags)  # the data, the model, the mesh and the batch
    state, shardings, manager, start = start_state(flags, run, report)
    programs = compile_programs(flags, run, state, shardings, start, report)
    losses, val_losses, best, timed, skipped = {}, {}, (math.inf, None), {"steps": 0, "seconds": 0.0}, 0
    report.start(start, flags["max_iters"])  # TensorBoard's writer imports TensorFlow: not in the first window's time
    window = new_window(start, clock, programs["fresh_tracker"])
    try:
        for step in range(start, flags["max_iters"]):
            state, metrics = programs["step"](state, *programs["batch"](step))  # [grad_accum, batch, block_size] each
            done = step + 1
            window["tracker"] = programs["track"](window["tracker"], metrics["loss"], done)
            report.tick()
            due = due_at(done, flags)
            if not any(due.values()):
                continue  # the host goes on preparing batches while the device works
            losses[done], skips = report_window(report, metrics, window, timed, done, flags, run["schedule"], programs["speed"], manager.latest_step(), clock)
            skipped += skips
            if due["eval"]:
                val_losses[done] = val_loss = evaluate_now(report, programs, state["params"], done)
                best = min(best, (val_loss, done))
            if due["sample"]:
                sample_now(report, programs, state["params"], done)
            if due["hellaswag"]:
                hellaswag_now(report, programs, state["params"], done)
            if due["save"] or (due["eval"] and best[1] == done):
                save_checkpoint(manager, done, state, flags["seed"], val_loss)
                report.flush()
            window = new_window(done, clock, programs["fresh_tracker"])
    finally:
        report.close()
        manager.close()
    return {**summarize(report, state, losses, best, timed, skipped, run["tokens_per_step"], flags["out_dir"]), "val_losses": val_losses}


def due_at(done, flags):
    """What happens after step `done`: 'log' (a read-back of the loss, with its window's speed),
    'eval', 'save', 'sample', 'hellaswag'; every checkpoint has its val loss, and reads the loss."""
    last = done == flags["max_iters"]
    save = done % flags["ckpt_interval"] == 0 or last
    due = {
        "save": save,
        "eval": done % flags["eval_interval"] == 0 or save,
        "sample": bool(flags["sample_every"]) and done % flags["sample_every"] == 0,
        "hellaswag": bool(flags["hellaswag_every"]) and done % flags["hellaswag_every"] == 0,
    }
    return {"log": done % flags["log_interval"] == 0 or any(due.values()), **due}


def evaluate_now(report, programs, params, done):
    """The mean loss of the fixed eval batches of both splits, reported; returns the val loss."""
    train_loss, val_loss = (estimate_loss(programs["eval_loss"], params, programs["eval_batches"][split]) for split in ("train", "val"))
    report.say(f"step {done}: train loss {train_loss:.4f}, val loss {val_loss:.4f}")
    report.scalars(done, {"eval/train_loss": train_loss, "eval/val_loss": val_loss})
    return val_loss


def sample_now(report, programs, params, done):
    text = programs["sample"](params, report.main_process)
    report.say(f"step {done} sample: {text!r}")


def hellaswag_now(report, programs, params, done):
    acc, acc_norm, n_examples = programs["hellaswag"](params)
    report.say(f"step {done}: {hellaswag_line(acc, acc_norm, n_examples)}")
    report.scalars(done, {"eval/hellaswag_acc": acc, "eval/hellaswag_acc_norm": acc_norm})


def train(
    data_dir="data/shakespeare_char",
    data_url=SHAKESPEARE_URL,
    out_dir="out/shakespeare_char",
    init_from="scratch",
    models_dir="models",
    n_layer=4,
    n_head=4,
    n_embd=128,
    block_size=64,
    vocab_size=0,
    dropout=0.0,
    batch_size=12,
    grad_accum=0,
    total_batch_tokens=0,
    max_iters=2000,
    learning_rate=1e-3,
    min_lr=1e-4,
    warmup_iters=100,
    lr_decay_iters=0,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    grad_clip=1.0,
    optimizer="adamw",
    muon_learning_rate=0.02,
    muon_momentum=0.95,
    muon_weight_decay=0.0,
    eval_interval=250,
    eval_iters=20,
    log_interval=10,
    ckpt_interval=250,
    keep=3,
    resume=False,
    seed=1337,
    dtype="float32",
    remat="auto",
    loss_chunk=128,
    attention="auto",
    peak_flops=0.0,
    sample_every=0,
    sample_prompt="ROMEO:",
    nan_policy="stop",
    mesh="",
    coordinator_address="",
    num_processes=1,
    process_id=0,
    hellaswag_every=0,
):
    """Train GPT-2 from scratch or fine-tune it (subcommands: train, the default; prepare; export; eval).

    Args:
      data_dir: a folder from `prepare` (train.bin, val.bin or their shards, meta.json, the vocabulary), or
        of nanoGPT's .bin, llm.c's .bin or build-nanogpt's .npy shards.
      data_url: when data_dir has no train.bin, this text is downloaded into it and prepared with the
        bytes tokenizer (the default: Tiny Shakespeare); '' to require prepared data.
      out_dir: where config.json, the vocabulary and the orbax checkpoints go.
      init_from: scratch (GPT-2 init), or what gpt2.py --model_size takes to fine-tune: 124M, 355M, 774M,
        1558M, a folder (release layout, Hugging Face's, or a training run's --out_dir) or a hub id.
      models_dir: where released models are kept.
      n_layer: transformer blocks (scratch).
      n_head: attention heads (scratch).
      n_embd: embedding width (scratch).
      block_size: tokens per training sequence (scratch: also n_ctx).
      vocab_size: 0 for the data's vocabulary, or a larger one (scratch).
      dropout: dropout rate on embeddings, attention and residuals.
      batch_size: sequences per micro-batch on each data-parallel rank (each of the dp * fsdp shards of
        the batch; a tp group shares one): the global batch is batch_size * dp * fsdp.
      grad_accum: micro-batches per optimizer step (0: 1, or what --total_batch_tokens makes).
      total_batch_tokens: tokens per optimizer step, e.g. 524288 (GPT-2's 0.5M): sets the accumulation
        to total_batch_tokens / (batch_size * block_size * dp * fsdp) (0: use --grad_accum).
      max_iters: optimizer steps.
      learning_rate: the peak learning rate (AdamW's), reached after warmup_iters.
      min_lr: the learning rate at the end of the cosine decay (AdamW's).
      warmup_iters: steps of linear warmup.
      lr_decay_iters: the step the cosine decay reaches min_lr (0: max_iters).
      weight_decay: AdamW's decoupled weight decay, on 2-D weight matrices only (under --optimizer muon,
        wte and wpe: Muon has the blocks' matrices).
      beta1: AdamW's beta1.
      beta2: AdamW's beta2.
      grad_clip: clip gradients to this global norm (0: no clipping).
      optimizer: adamw, or muon: Muon (optax.contrib.muon) on the blocks' matrices (c_attn, c_proj,
        c_fc; each layer, and c_attn's query, key and value, a matrix of its own), AdamW (the flags
        above) on the embeddings, LayerNorm gains and biases.
      muon_learning_rate: Muon's peak learning rate, on the same warmup and cosine decay (ending at
        the same share of the peak as AdamW's: min_lr / learning_rate).
      muon_momentum: Muon's (Nesterov) momentum.
      muon_weight_decay: Muon's decoupled weight decay (times its learning rate) on its matrices.
      eval_interval: steps between evaluations of train and val loss.
      eval_iters: batches per evaluation.
      log_interval: steps between log lines (loss, lr, ms/step, tokens/s, MFU over the interval), the
        only steps besides evaluations and checkpoints that wait for the device to read the loss.
      ckpt_interval: steps between checkpoints (also at the end, and at every new best val loss).
      keep: how many of the latest checkpoints to keep (the best is always kept).
      resume: continue the run in out_dir from its latest checkpoint (with the same flags).
      seed: the seed of init, data order and dropout.
      dtype: float32, or bfloat16 (compute; the master weights stay float32).
      remat: what each block keeps for the backward pass, the rest recomputed: none (all), dots (the
        matmul outputs), block (only its input: the least memory), auto (dots on CPUs, where it
        is the fastest, block on accelerators).
      loss_chunk: positions of each sequence whose logits [batch, loss_chunk, vocab] are computed at
        once, forward and backward (the largest divisor of block_size up to it; 0: all).
      attention: what computes attention: auto (cudnn on NVIDIA GPUs from Ampere on with --dtype
        bfloat16, splash on TPUs with a --block_size of a multiple of 128, math elsewhere and with
        --dropout), math (gpt2.attention: the [batch, head, T, T] scores as a matrix), xla
        (jax.nn.dot_product_attention by XLA), cudnn (its cuDNN flash attention) or splash (Pallas
        splash attention); the fused ones have no dropout.
      peak_flops: the FLOP/s of one accelerator that MFU is relative to; 0: its datasheet peak for
        --dtype (A100, H100, H200, TPU v4, v5e, v5p, v6e; others show no MFU), or on a CPU a 2048x2048
        float32 matmul probe. On a CPU the figure is the whole host's, which its devices share.
      sample_every: steps between greedy samples of --sample_prompt printed while training (0: none).
      sample_prompt: the text the samples continue ('': <|endoftext|>).
      nan_policy: at a NaN or inf loss, stop (the run exits, naming the step; its checkpoints are intact)
        or skip (that step's update is not applied and training goes on).
      mesh: the devices to train on, as axis sizes: dp=8 (data parallel), fsdp=8 (weights and optimizer
        state sharded too), tp=2 (tensor parallel), combined like dp=2,fsdp=2,tp=2; -1 is the rest of
        the devices. The sizes multiply to the job's device count. '' for one device.
      coordinator_address: HOST:PORT of process 0 of a multi-host job ('': none, or what JAX detects on
        a TPU pod slice or under SLURM).
      num_processes: the processes of the multi-host job.
      process_id: this process's index in the job, 0 to num_processes - 1.
      hellaswag_every: steps between HellaSwag scores (0: never); the validation set is downloaded once
        into models_dir/hellaswag (needs GPT-2's vocabulary).
    """
    fit(dict(locals()))


def compile_step(topology="local", device_memory=0.0, **train_flags):
    """Compile the train step that `train_jax.py [the same flags]` would run, for a TPU slice or this
    machine's devices, and say whether it fits their memory (exit 2 when not), without weights or data.

    Args:
      topology: the devices: a TPU topology (v5e:2x2, v4:2x2x1, v5p:2x2x1, v6e:2x2) or GCP accelerator
        type (v5litepod-8, v4-8, v5p-8, v6e-8, v4-32; needs libtpu: pip install -e ".[tpu]"), or local
        (this machine's devices).
      device_memory: bytes each device holds (0: the device's own: TPU HBM, the GPU's limit, or for
        CPU devices an equal share of the host's memory).
    """
    flags = check_flags(default_flags(**train_flags))
    check_number(device_memory, "device_memory", 0, math.inf)
    check_fit(flags, topology, device_memory)


def default_flags(**overrides):
    """`train`'s flags with their defaults, updated by `overrides`."""
    import inspect

    return {**{name: p.default for name, p in inspect.signature(train).parameters.items()}, **overrides}


def with_train_flags(command):
    """`command(own flags, **train_flags)` with train's flags in its signature and --help too."""
    import inspect

    own = [p for p in inspect.signature(command).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    flags = [p.replace(kind=p.KEYWORD_ONLY) for p in inspect.signature(train).parameters.values()]  # fire passes them by name
    command.__signature__ = inspect.Signature([*own, *flags])
    command.__doc__ += train.__doc__[train.__doc__.index("Args:") + len("Args:\n"):]
    return command


COMMANDS = {"train": train, "prepare": prepare, "export": export, "eval": evaluate, "compile": with_train_flags(compile_step)}


def cli(argv=None):
    """`train_jax [train|prepare|export|eval|compile] --flags`; without a command, train."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = COMMANDS[argv.pop(0)] if argv and argv[0] in COMMANDS else train
    run_cli(command, argv)


if __name__ == "__main__":
    cli()
