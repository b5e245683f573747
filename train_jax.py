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

import json
import math
import os
import re
import sys
import time

import numpy as np

from cli import UserError, check_folder, check_number, check_positive_int, check_seed, log, run_cli
from data import (
    EVAL_STREAM,
    SHAKESPEARE_URL,
    TRAIN_STREAM,
    batch_offsets,
    ensure_data,
    gpt2_vocab,
    load_split,
    prepare,
    read_json,
    read_meta,
    sharded_batch,
)
from encoder import load_encoder
from evaluation import evaluate, hellaswag_hook, hellaswag_line
from gpt2 import generate, hidden_states, transformer_block, unembed
from sharding import (
    GiB,
    batch_sharding,
    check_fits,
    device_mesh,
    divisors,
    gathered,
    initialize_distributed,
    layer_sharding,
    match_rules,
    memory_per_device,
    param_shardings,
    parse_mesh,
    place,
    state_shardings,
    topology_devices,
)
from utils import (
    HF_FILES,
    VOCAB_FILES,
    copy_vocab,
    download_hf_files,
    encode_prompt,
    expected_shapes,
    flatten,
    folder_layout,
    hf_hparams,
    import_tensorflow,
    is_hub_id,
    load_encoder_hparams_and_params,
    load_hparams,
    resolve_model_dir,
    save_gpt2_checkpoint,
    save_hf_checkpoint,
    unflatten,
)

DTYPES = ("float32", "bfloat16")
NAN_POLICIES = ("stop", "skip")
# --remat: what each transformer block keeps for the backward pass (jax.checkpoint_policies), the
# rest is recomputed: none keeps everything, dots the matmul outputs (no attention scores), block
# only the block's input.
REMAT_POLICIES = {"none": None, "dots": "dots_with_no_batch_dims_saveable", "block": "nothing_saveable"}
INIT_STD = 0.02
# Weight decay on the 2-D matrices (the conv weights and both embeddings, as in nanoGPT), none on
# biases and LayerNorm gains. Rules are (regex over the '/'-joined param path, value), first match wins.
DECAY_RULES = ((r"/w$", True), (r"^(wte|wpe)$", True), (r".*", False))
CONFIG_FILE = "config.json"
OPTIMIZER_FLAGS = ("learning_rate", "min_lr", "warmup_iters", "lr_decay_iters", "weight_decay", "beta1", "beta2", "grad_clip")
# A mesh may change on --resume, and with it the per-rank batch flags; the batch they make is checked.
RESUMABLE_FLAGS = ("max_iters", "eval_interval", "eval_iters", "log_interval", "ckpt_interval", "keep", "resume", "peak_flops",
                   "sample_every", "sample_prompt", "nan_policy", "mesh", "coordinator_address", "num_processes", "process_id",
                   "hellaswag_every", "batch_size", "grad_accum", "total_batch_tokens", "remat", "loss_chunk")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Model, loss and the train step


def init_param(path, shape, rng, n_layer):
    """GPT-2's init: unit LayerNorm gains, zero biases, normal(0, 0.02) weights, with the residual
    output projections (c_proj/w) scaled by 1/sqrt(2*n_layer)."""
    if path.endswith("/g"):
        return np.ones(shape, np.float32)
    if path.endswith("/b"):
        return np.zeros(shape, np.float32)
    std = INIT_STD / math.sqrt(2 * n_layer) if path.endswith("c_proj/w") else INIT_STD
    return std * rng.standard_normal(shape, np.float32)


def init_params(hparams, seed):
    """float32 NumPy params of the hparams' shape, a pure function of the seed."""
    rng = np.random.default_rng(seed)
    flat = {path: init_param(path, shape, rng, hparams["n_layer"]) for path, shape in expected_shapes(hparams).items()}
    return unflatten(flat, hparams["n_layer"])


def n_params(params):
    return sum(int(np.prod(a.shape)) for a in flatten(params).values())


def flops_per_token(params, n_layer, n_embd, block_size):
    """nanoGPT's (PaLM's) estimate: 6N for the matmuls forward and back (N without wpe, which is a
    lookup) plus 12 * n_layer * n_embd * block_size for attention."""
    return 6 * (n_params(params) - params["wpe"].size) + 12 * n_layer * n_embd * block_size


def cross_entropy_sum(h, wte, targets, dtype):  # [batch, n, n_embd], [n_vocab, n_embd], [batch, n] -> []
    """The summed next-token cross-entropy of the logits of the final states `h`: the matmul in the
    compute dtype, the log-sum-exp in `dtype` (the master weights', float32)."""
    import jax
    import optax

    logits = jax.vmap(unembed, in_axes=(0, None))(h, wte).astype(dtype)  # [batch, n, n_vocab]
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).sum()


def chunked_cross_entropy(h, wte, targets, chunk, dtype):  # [batch, n_seq, n_embd], [n_vocab, n_embd], [batch, n_seq] -> []
    """The mean cross-entropy over `chunk` positions of the sequence at a time (the largest divisor
    of n_seq up to it; 0: all at once), each chunk's logits recomputed in the backward pass: the step
    holds one chunk's [batch, chunk, n_vocab] logits and their gradient, never the whole sequence's."""
    import jax

    batch, n_seq, n_embd = h.shape
    chunk = max(d for d in divisors(n_seq) if d <= (chunk or n_seq))
    if chunk == n_seq:
        return cross_entropy_sum(h, wte, targets, dtype) / targets.size
    n_chunks = n_seq // chunk
    h = h.reshape(batch, n_chunks, chunk, n_embd).swapaxes(0, 1)  # [n_chunks, batch, chunk, n_embd]
    targets_by_chunk = targets.reshape(batch, n_chunks, chunk).swapaxes(0, 1)  # [n_chunks, batch, chunk]
    chunk_loss = jax.checkpoint(lambda h_y: cross_entropy_sum(h_y[0], wte, h_y[1], dtype))
    return jax.lax.map(chunk_loss, (h, targets_by_chunk)).sum() / targets.size  # [n_chunks] -> []


def resolve_remat(remat, platform):
    """--remat auto is dots on CPUs and block on accelerators (the most that fits). On a CPU, keeping
    fewer activations is faster: recomputing the attention scores and the elementwise work costs less
    than reading back a working set that outgrows the cache (the baby config: 36 ms/step with dots,
    50 with none). XLA's CPU compiler drops the rematerialization of unrolled blocks, so it needs the
    scan, as on accelerators."""
    return ("dots" if platform == "cpu" else "block") if remat == "auto" else remat


def training_layer(remat, shardings=None):
    """`transformer_block` of one layer for training: its weights gathered to `shardings` (under
    fsdp only the layer being computed is whole) and, given a policy, rematerialized: its activations
    are recomputed in the backward pass but for what --remat's policy saves."""
    import jax

    def layer(x, weights, key, n_head, rate):  # [n_seq, n_embd] -> [n_seq, n_embd]
        if shardings is not None:
            weights = jax.lax.with_sharding_constraint(weights, shardings)
        return transformer_block(x, **weights, n_head=n_head, rate=rate, key=key)[0]

    if REMAT_POLICIES[remat] is None:
        return layer
    return jax.checkpoint(layer, policy=getattr(jax.checkpoint_policies, REMAT_POLICIES[remat]), static_argnums=(3, 4))


def each_block(layer):
    """hidden_states' `block`, one call per block (the program holds every layer: XLA fuses across
    them, and frees what the backward pass no longer needs as it goes)."""

    def block(x, mlp, attn, ln_1, ln_2, n_head, kv_cache, start, pad, rate, key):  # training has no cache
        return layer(x, dict(mlp=mlp, attn=attn, ln_1=ln_1, ln_2=ln_2), key, n_head, rate), kv_cache

    return block


def stacked(params):  # {'blocks': n_layer blocks} -> {'blocks': one block of [n_layer, ...] weights}
    """Training's layout of the params, and so of their gradients and AdamW's moments: the blocks
    stacked, which the remat path scans as they are and the optimizer updates as a dozen arrays
    whatever the depth. Made once with the train state; gpt2.py, checkpoints and exports keep the list."""
    import jax
    import jax.numpy as jnp

    return {**params, "blocks": jax.tree.map(lambda *layers: jnp.stack(layers), *params["blocks"])}


def unstacked(params, layer=lambda a, i: a[i]):  # {'blocks': one block of [n_layer, ...]} -> {'blocks': n_layer blocks}
    """The list of blocks of training's stacked params; `layer(a, i)` is layer i of a stacked leaf."""
    import jax

    n_layer = jax.tree.leaves(params["blocks"])[0].shape[0]
    return {**params, "blocks": [jax.tree.map(lambda a: layer(a, i), params["blocks"]) for i in range(n_layer)]}


def is_params(tree):  # the params, their gradients, an optimizer moment
    return isinstance(tree, dict) and "blocks" in tree


def state_on_disk(state, layer=lambda a, i: a[i]):
    """The train state as checkpoints hold it: each params-shaped tree in it (the params, AdamW's
    moments) with the list of blocks, so that runs written before training stacked them resume."""
    import jax

    return jax.tree.map(lambda tree: unstacked(tree, layer) if is_params(tree) else tree, state, is_leaf=is_params)


def state_in_training(state):
    """The inverse of `state_on_disk`: each params-shaped tree stacked."""
    import jax

    return jax.tree.map(lambda tree: stacked(tree) if is_params(tree) else tree, state, is_leaf=is_params)


def scanned_blocks(layer):
    """hidden_states' `block` for all the layers at once, given as one block of stacked weights
    ([n_layer, ...] each): `lax.scan` runs `layer` over them, so the program (and its compile time)
    holds one layer whatever the depth."""
    import jax

    def layers(x, mlp, attn, ln_1, ln_2, n_head, kv_cache, start, pad, rate, key):
        stacked = dict(mlp=mlp, attn=attn, ln_1=ln_1, ln_2=ln_2)
        keys = None if key is None else jax.random.split(key, ln_1["g"].shape[0])  # [n_layer] dropout keys
        step = lambda x, weights_key: (layer(x, *weights_key, n_head, rate), None)
        return jax.lax.scan(step, x, (stacked, keys))[0], kv_cache

    return layers


def loss_fn(params, inputs, targets, key, n_head, rate, dtype, compute_shardings=None, remat="none", loss_chunk=0):  # [batch, n_seq] x2 -> []
    """Mean next-token cross-entropy of the model computed in `dtype`; the softmax in the master
    weights' precision (float32). On a mesh, the weights are used with `compute_shardings`, each
    block's when that block runs. The params are training's (`stacked`). `remat` is a key of
    REMAT_POLICIES: with a policy the blocks run as one scan over the stacked weights; without, one
    by one (a scan would keep every layer's activations stacked: 3x the memory of 124M's step, and
    a third slower on the CPU baby config).
    `loss_chunk` is the positions whose logits are computed at once (0: all)."""
    import jax

    compute = jax.tree.map(lambda p: p.astype(dtype), params)
    block_shardings = None
    if compute_shardings is not None:
        outside = {name: compute_shardings[name] for name in ("wte", "wpe", "ln_f")}
        compute = {**compute, **jax.lax.with_sharding_constraint({name: compute[name] for name in outside}, outside)}
        block_shardings = jax.tree.map(layer_sharding, compute_shardings["blocks"])  # one layer's, as every layer's
    layer = training_layer(remat, block_shardings)
    if REMAT_POLICIES[remat] is None:
        compute, block = unstacked(compute), each_block(layer)
    else:
        compute["blocks"], block = [compute["blocks"]], scanned_blocks(layer)
    h, _ = hidden_states(inputs, **compute, n_head=n_head, rate=rate, key=key if rate else None, block=block)  # [batch, n_seq, n_embd]
    return chunked_cross_entropy(h, compute["wte"], targets, loss_chunk, params["wte"].dtype)


def make_optimizer(learning_rate, min_lr, warmup_iters, lr_decay_iters, weight_decay, beta1, beta2, grad_clip):
    """Global-norm clipping, then AdamW with linear warmup and cosine decay to min_lr; weight decay
    only where DECAY_RULES say (of the paths of the params it is given, in either layout)."""
    import functools

    import optax

    schedule = optax.warmup_cosine_decay_schedule(
        init_value=learning_rate / (warmup_iters + 1),  # as nanoGPT: step 0 already learns
        peak_value=learning_rate,
        warmup_steps=warmup_iters,
        decay_steps=max(lr_decay_iters, warmup_iters + 1),
        end_value=min_lr,
    )
    adamw = optax.adamw(schedule, b1=beta1, b2=beta2, weight_decay=weight_decay, mask=functools.partial(match_rules, DECAY_RULES))
    return optax.chain(optax.clip_by_global_norm(grad_clip) if grad_clip else optax.identity(), adamw), schedule


def init_state(params, optimizer, seed):
    """The train state of the params (a list of blocks): training's stacked params, the optimizer
    state and the dropout key."""
    import jax

    params = stacked(params)
    return {"params": params, "opt_state": optimizer.init(params), "key": jax.random.PRNGKey(seed)}


def init_sharded_state(params, optimizer, seed, mesh):
    """(state, its shardings) created on the mesh: the host params copied shard by shard, then
    stacked and the optimizer state made by a jit whose outputs are already split, so no device
    holds a full copy."""
    import jax

    init = lambda p: init_state(p, optimizer, seed)
    shardings = state_shardings(jax.eval_shape(init, params), optimizer, mesh)
    placed = place(params, param_shardings(params, mesh))
    return jax.jit(init, out_shardings=shardings)(placed), shardings


def train_step(state, inputs, targets, optimizer, n_head, rate, dtype, compute_shardings=None, remat="none", loss_chunk=0):  # inputs, targets [grad_accum, batch, n_seq]
    """One optimizer step on the mean gradient of grad_accum micro-batches; returns (state, metrics):
    the loss and the gradient's global norm. When the loss or a gradient is not finite, the params
    and optimizer state are left unchanged and
    the loss returned is not finite (NaN if only a gradient was)."""
    import jax
    import optax

    key, step_key = jax.random.split(state["key"])
    grad_fn = jax.value_and_grad(loss_fn)

    def accumulate(grad_sum, micro_batch):
        x, y, micro_key = micro_batch
        loss, grads = grad_fn(state["params"], x, y, micro_key, n_head, rate, dtype, compute_shardings, remat, loss_chunk)
        return jax.tree.map(jax.numpy.add, grad_sum, grads), loss

    n_micro = inputs.shape[0]
    zeros = jax.tree.map(jax.numpy.zeros_like, state["params"])
    grad_sum, losses = jax.lax.scan(accumulate, zeros, (inputs, targets, jax.random.split(step_key, n_micro)))
    grads = jax.tree.map(lambda g: g / n_micro, grad_sum)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    loss, grad_norm = losses.mean(), optax.global_norm(grads)  # the norm before clipping, as nanoGPT's
    finite = jax.numpy.isfinite(loss) & jax.numpy.isfinite(grad_norm)
    keep_finite = lambda new, old: jax.numpy.where(finite, new, old)  # a NaN step leaves params and moments as they were
    params = jax.tree.map(keep_finite, optax.apply_updates(state["params"], updates), state["params"])
    opt_state = jax.tree.map(keep_finite, opt_state, state["opt_state"])
    metrics = {"loss": jax.numpy.where(finite, loss, jax.numpy.nan), "grad_norm": grad_norm}
    return {"params": params, "opt_state": opt_state, "key": key}, metrics


def step_args(flags, hparams, optimizer, mesh):
    """The keyword arguments of `train_step` that a run's flags give on `mesh`."""
    remat = resolve_remat(flags["remat"], mesh.devices.flat[0].platform)
    rate = float(flags["dropout"])
    return dict(optimizer=optimizer, n_head=hparams["n_head"], rate=rate, dtype=flags["dtype"], remat=remat, loss_chunk=flags["loss_chunk"])


def jit_train_step(shardings, batch, **step_args):
    """`train_step` jitted for the mesh: the state (donated) keeps its `shardings`, inputs and targets
    come split by `batch`, the metrics are replicated."""
    import functools

    import jax

    step = functools.partial(train_step, **step_args, compute_shardings=gathered(shardings["params"]))
    return jax.jit(step, donate_argnums=0, in_shardings=(shardings, batch, batch), out_shardings=(shardings, shardings["key"]))


# ---------------------------------------------------------------------------------------------
# Checkpoints: OUT_DIR/config.json, the vocabulary, and orbax steps in OUT_DIR/checkpoints


def checkpoint_manager(out_dir, keep):
    """Keeps the last `keep` steps and the step with the lowest val loss."""
    import orbax.checkpoint as ocp
    from orbax.checkpoint.checkpoint_managers import AnyPreservationPolicy, BestN, LatestN

    val_loss = lambda metrics: metrics["val_loss"]
    best = BestN(get_metric_fn=val_loss, reverse=True, n=1, keep_checkpoints_without_metrics=False)
    options = ocp.CheckpointManagerOptions(
        best_fn=val_loss,
        best_mode="min",
        preservation_policy=AnyPreservationPolicy([LatestN(n=keep), best]),
        enable_async_checkpointing=False,  # the next step donates the state's buffers
    )
    folder = os.path.abspath(os.path.join(out_dir, "checkpoints"))
    try:
        return ocp.CheckpointManager(folder, options=options)
    except (ValueError, OSError, KeyError, TypeError) as e:  # it reads every step's metrics (JSON)
        raise UserError(
            f"a checkpoint in {folder} cannot be read ({type(e).__name__}): move the damaged step folder away "
            f"to use the steps before it"
        )


def shardings_of(tree):
    """The sharding of each array (or shape) of `tree`, None where it has none."""
    import jax

    return jax.tree.map(lambda a: getattr(a, "sharding", None), tree)


def abstract_on_disk(state):
    """The shapes, dtypes and shardings of `state_on_disk(state)` (each layer's, see layer_sharding),
    from the train state's arrays or shapes."""
    import jax

    shape = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None))
    layer = lambda a, i: jax.ShapeDtypeStruct(a.shape[1:], a.dtype, sharding=layer_sharding(a.sharding))
    return state_on_disk(jax.tree.map(shape, state), layer)


def save_checkpoint(manager, step, state, seed, val_loss):
    import jax
    import orbax.checkpoint as ocp

    on_disk = jax.jit(state_on_disk, out_shardings=shardings_of(abstract_on_disk(state)))(state)
    loader = {"seed": seed, "next_batch": step}  # the batch of step s is drawn from (seed, s)
    args = ocp.args.Composite(state=ocp.args.StandardSave(on_disk), loader=ocp.args.JsonSave(loader))
    manager.save(step, args=args, metrics=None if val_loss is None else {"val_loss": val_loss})


def restore_checkpoint(manager, step, target):
    """(state, loader) of `step`, in the layout and shardings of the `target` train state (arrays or
    shapes)."""
    import jax
    import orbax.checkpoint as ocp

    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_on_disk(target)), loader=ocp.args.JsonRestore())
    try:
        restored = manager.restore(step, args=args)
    except (ValueError, OSError, KeyError, TypeError) as e:  # orbax reads JSON, msgpack and tensorstore: never pickle
        folder = os.path.join(manager.directory, str(step))
        raise UserError(
            f"the checkpoint {folder} cannot be read ({type(e).__name__}): move that folder away to use the "
            f"checkpoint before it (the run has steps {list(manager.all_steps())})"
        )
    return jax.jit(state_in_training, out_shardings=shardings_of(target))(restored["state"]), restored["loader"]


def state_shape(config):
    """The shapes and dtypes of a run's train state, from its config.json: the target to restore into."""
    import jax

    flags, hparams = config["flags"], config["hparams"]
    optimizer, _ = make_optimizer(**{k: flags[k] for k in OPTIMIZER_FLAGS})
    return jax.eval_shape(lambda: init_state(init_params(hparams, 0), optimizer, 0))


def read_config(out_dir, flag="out_dir"):
    path = os.path.join(out_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise UserError(f"--{flag} {out_dir} holds no training run ({CONFIG_FILE} is missing): give the --out_dir of a run")
    return read_json(path, "restore it, or start a new run in another --out_dir")


def write_config(out_dir, flags, hparams, vocab_dir, batch):
    """The run's flags, model shape and batch (see batch_plan), and the vocabulary files, beside its
    checkpoints."""
    os.makedirs(out_dir, exist_ok=True)
    copy_vocab(vocab_dir, out_dir)
    with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump({"flags": flags, "hparams": hparams, "batch": batch}, f, indent=2)


def check_resume(out_dir, flags):
    """The run's flags must be the saved ones, but for those that do not change the math."""
    saved = read_config(out_dir)["flags"]
    changed = [k for k in flags if k not in RESUMABLE_FLAGS and saved.get(k) != flags[k]]
    if changed:
        k = changed[0]
        raise UserError(f"--resume: --{k} is {flags[k]!r} but the run in {out_dir} used {saved.get(k)!r}; repeat its flags")


def check_resume_batch(out_dir, batch):
    """The resumed run's step must see the saved run's batch, whatever the mesh (configs written
    before per-rank batches counted --batch_size globally)."""
    config = read_config(out_dir)
    saved = config.get("batch") or {"global_batch": config["flags"]["batch_size"], "grad_accum": config["flags"]["grad_accum"]}
    if saved != batch:
        raise UserError(
            f"--resume: this mesh and these flags make a global batch of {batch['global_batch']} x {batch['grad_accum']} "
            f"accumulation but the run in {out_dir} used {saved['global_batch']} x {saved['grad_accum']}: give --batch_size "
            f"(per dp*fsdp rank) and --grad_accum or --total_batch_tokens that make the same"
        )


# ---------------------------------------------------------------------------------------------
# The training loop


def batch_plan(flags, mesh):
    """{'global_batch', 'grad_accum'}: --batch_size sequences on each of the dp * fsdp data-parallel
    ranks (a tp group shares one), accumulated --grad_accum times, or as often as makes
    --total_batch_tokens per step."""
    n_ranks = mesh.shape["dp"] * mesh.shape["fsdp"]
    global_batch, total = flags["batch_size"] * n_ranks, flags["total_batch_tokens"]
    if not total:
        return {"global_batch": global_batch, "grad_accum": flags["grad_accum"] or 1}
    if flags["grad_accum"]:
        raise UserError(f"--grad_accum {flags['grad_accum']} and --total_batch_tokens {total} both set the accumulation: give one")
    micro_tokens = global_batch * flags["block_size"]
    if total % micro_tokens:
        raise UserError(
            f"--total_batch_tokens {total} is not a multiple of the {micro_tokens} tokens of a micro-batch (--batch_size "
            f"{flags['batch_size']} x dp*fsdp {n_ranks} x --block_size {flags['block_size']}): use "
            f"{max(1, round(total / micro_tokens)) * micro_tokens}"
        )
    return {"global_batch": global_batch, "grad_accum": total // micro_tokens}


def check_flags(flags):
    for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "max_iters",
                 "eval_interval", "eval_iters", "log_interval", "ckpt_interval", "keep"):  # fmt: skip
        check_positive_int(flags[name], name)
    for name in ("vocab_size", "warmup_iters", "lr_decay_iters", "grad_accum", "total_batch_tokens", "loss_chunk", "sample_every",
                 "hellaswag_every"):  # fmt: skip
        if type(flags[name]) is not int or flags[name] < 0:
            raise UserError(f"--{name} must be an integer >= 0, got {flags[name]!r}")
    check_seed(flags["seed"])
    for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "peak_flops"):
        check_number(flags[name], name, 0, math.inf)
    for name in ("dropout", "beta1", "beta2"):
        check_number(flags[name], name, 0, 1)
    folders = check_run_flags(flags)
    if flags["n_embd"] % flags["n_head"]:
        raise UserError(f"--n_embd {flags['n_embd']} must be a multiple of --n_head {flags['n_head']}")
    if flags["dtype"] not in DTYPES:
        raise UserError(f"unknown --dtype {flags['dtype']!r}: use {' or '.join(DTYPES)}")
    if flags["remat"] not in ("auto", *REMAT_POLICIES):
        raise UserError(f"unknown --remat {flags['remat']!r}: use auto, {', '.join(REMAT_POLICIES)}")
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


def initial_model(flags, meta):
    """(hparams, NumPy params, vocab_dir): GPT-2's init for the flags' shape, or a checkpoint to fine-tune."""
    if flags["init_from"] == "scratch":
        n_vocab = flags["vocab_size"] or meta["vocab_size"]
        if n_vocab < meta["vocab_size"]:
            raise UserError(f"--vocab_size {n_vocab} is smaller than the data's vocabulary of {meta['vocab_size']}: give 0 (the data's) or more")
        hparams = {"n_vocab": n_vocab, "n_ctx": flags["block_size"], **{k: flags[k] for k in ("n_embd", "n_head", "n_layer")}}
        has_vocab = all(os.path.isfile(os.path.join(flags["data_dir"], name)) for name in VOCAB_FILES)
        vocab_dir = flags["data_dir"] if has_vocab else gpt2_vocab(os.path.join(flags["models_dir"], "124M"))
        return hparams, init_params(hparams, flags["seed"]), vocab_dir
    model_dir = resolve_model_dir(flags["init_from"], flags["models_dir"], flag="init_from")
    encoder, hparams, params = load_encoder_hparams_and_params(model_dir)
    if flags["block_size"] > hparams["n_ctx"]:
        raise UserError(f"--block_size {flags['block_size']} exceeds the n_ctx {hparams['n_ctx']} of {flags['init_from']}")
    data_vocab = os.path.join(flags["data_dir"], "encoder.json")
    if os.path.isfile(data_vocab) and read_json(data_vocab, "prepare the data again") != encoder.encoder:
        raise UserError(f"{flags['data_dir']} was not tokenized with {flags['init_from']}'s vocabulary: prepare it with --tokenizer gpt2")
    return hparams, params, model_dir


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
        return None, f"{kind} is not in train_jax.PEAK_FLOPS: give --peak_flops to see MFU"
    return peak * len(devices), f"the {dtype} datasheet peak of {kind}"


def window_speed(window_s, window_steps, tokens_per_step, flops_per_step, peak):
    """ms/step, tokens/s and MFU (none without a peak) over a window of steps."""
    speed = {"ms_per_step": 1e3 * window_s / window_steps, "tokens_per_s": tokens_per_step * window_steps / window_s}
    return {**speed, "mfu": flops_per_step * window_steps / window_s / peak} if peak else speed


def progress_line(done, max_iters, loss, lr, speed):
    """`step 1200/2000: loss 1.8123, lr 2.1e-04, 36.5 ms/step, 21,000 tok/s, MFU 41.2%`."""
    line = f"step {done}/{max_iters}: loss {loss:.4f}, lr {lr:.1e}, {speed['ms_per_step']:.1f} ms/step, {speed['tokens_per_s']:,.0f} tok/s"
    return line + (f", MFU {speed['mfu']:.1%}" if "mfu" in speed else "")


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


def model_params(params, n_vocab):
    """NumPy params of a model folder: a padded --vocab_size cut back to the tokenizer's n_vocab."""
    import jax

    return {**jax.tree.map(np.asarray, params), "wte": np.asarray(params["wte"])[:n_vocab]}


def sample_text(params, encoder, prompt_ids, n_head, n_new):
    """The greedy continuation of `prompt_ids` by gpt2.py's generation (jax, on the default device)."""
    return encoder.decode(generate(prompt_ids, params, n_head, n_new, backend="jax"))


def sample_prompt_ids(encoder, prompt, hparams):
    """`--sample_prompt`'s ids and how many tokens follow them (SAMPLE_TOKENS, or what n_ctx leaves)."""
    try:
        ids = encode_prompt(encoder, hparams, str(prompt), 1)  # fire reads `--sample_prompt 1` as a number
    except UserError as e:
        raise UserError(f"--sample_prompt {str(prompt)!r}: {e}")
    return ids, min(SAMPLE_TOKENS, hparams["n_ctx"] - len(ids))


def finished_step(out_dir, keep, max_iters):
    """The step of a run that --resume cannot continue (its latest checkpoint is at --max_iters or
    later), or None; reads the checkpoints' folder and writes nothing."""
    manager = checkpoint_manager(out_dir, keep)
    latest = manager.latest_step()
    manager.close()
    return latest if latest is not None and latest >= max_iters else None


def estimate_loss(eval_loss, params, batches):
    """The mean loss over fixed batches (a list of [batch, n_seq] inputs and targets)."""
    return float(np.mean([eval_loss(params, x, y) for x, y in batches]))


def fit(flags, clock=time.perf_counter):
    """Train with checked flags (see `train`); returns a summary: the final state, best val loss and
    its step, the loss of every logged step, the mean ms per step and tokens per second over the
    logging windows (timed by `clock`), and the number of skipped updates."""
    import functools

    import jax
    from tqdm import tqdm

    flags = check_flags(flags)
    initialize_distributed(flags["coordinator_address"], flags["num_processes"], flags["process_id"])
    main_process = jax.process_index() == 0  # the one that logs and writes config.json
    say = log if main_process else lambda *args: None
    data_dir, out_dir, seed, block_size, max_iters = flags["data_dir"], flags["out_dir"], flags["seed"], flags["block_size"], flags["max_iters"]
    if flags["resume"]:
        check_resume(out_dir, flags)
        finished = finished_step(out_dir, flags["keep"], max_iters)
        if finished is not None:
            say(f"run is at step {finished} of {max_iters}: raise --max_iters to continue")
            return {"state": None, "losses": {}, "best_val_loss": None, "best_step": None, "skipped": 0}
    ensure_data(data_dir, flags["data_url"])
    hparams, params, vocab_dir = initial_model(flags, read_meta(data_dir))
    mesh = device_mesh(flags["mesh"])
    check_fits(mesh, hparams)
    plan = batch_plan(flags, mesh)
    if flags["resume"]:
        check_resume_batch(out_dir, plan)
    train_ids = load_split(data_dir, "train", block_size, hparams["n_vocab"])
    val_ids = load_split(data_dir, "val", block_size, hparams["n_vocab"])
    encoder = load_encoder(vocab_dir) if flags["sample_every"] or flags["hellaswag_every"] else None
    if flags["sample_every"]:
        prompt_ids, n_sample = sample_prompt_ids(encoder, flags["sample_prompt"], hparams)
    optimizer, schedule = make_optimizer(**{k: flags[k] for k in OPTIMIZER_FLAGS})
    state, shardings = init_sharded_state(params, optimizer, seed, mesh)
    manager = checkpoint_manager(out_dir, flags["keep"])
    start = 0
    if flags["resume"]:
        if manager.latest_step() is None:
            raise UserError(f"--resume: {out_dir} has no checkpoint yet; run without --resume")
        state, loader = restore_checkpoint(manager, manager.latest_step(), state)
        start = loader["next_batch"]
        say(f"resuming {out_dir} at step {start}")
    elif manager.latest_step() is not None:
        raise UserError(f"{out_dir} already holds checkpoints: add --resume to continue, or give another --out_dir")
    elif main_process:
        write_config(out_dir, flags, hparams, vocab_dir, plan)

    batch_shape = (plan["grad_accum"], plan["global_batch"])
    args = step_args(flags, hparams, optimizer, mesh)
    batch, eval_batch = batch_sharding(mesh, 3, axis=1), batch_sharding(mesh, 2, axis=0)
    step_fn = jit_train_step(shardings, batch, **args)
    eval_args = dict(key=None, n_head=args["n_head"], rate=0.0, dtype=args["dtype"], loss_chunk=args["loss_chunk"])
    eval_fn = functools.partial(loss_fn, **eval_args, compute_shardings=gathered(shardings["params"]))
    eval_loss = jax.jit(eval_fn, in_shardings=(shardings["params"], eval_batch, eval_batch))
    eval_shape = (flags["eval_iters"], plan["global_batch"])
    eval_offsets = lambda ids: batch_offsets(seed, EVAL_STREAM, 0, eval_shape, ids, block_size)  # [eval_iters, batch]
    eval_batches = {
        split: [sharded_batch(ids, offsets, block_size, eval_batch) for offsets in eval_offsets(ids)]
        for split, ids in (("train", train_ids), ("val", val_ids))
    }
    model_shardings = param_shardings(params, mesh)  # gpt2.py's list of blocks, for HellaSwag
    hellaswag_args = (flags["models_dir"], encoder, hparams, mesh, model_shardings, args["dtype"], plan["global_batch"])
    score_hellaswag = hellaswag_hook(*hellaswag_args) if flags["hellaswag_every"] else None
    tokens_per_step = plan["grad_accum"] * plan["global_batch"] * block_size
    flops_per_step = flops_per_token(params, hparams["n_layer"], hparams["n_embd"], block_size) * tokens_per_step
    peak, peak_source = peak_flops(mesh.devices.flatten(), args["dtype"], flags["peak_flops"])
    peak_text = f"peak {peak / 1e9:,.0f} GFLOP/s ({peak_source})" if peak else f"MFU not shown: {peak_source}"
    say(
        f"{n_params(params) / 1e6:.2f}M params, global batch {plan['global_batch']} ({flags['batch_size']} per dp*fsdp rank) "
        f"x {plan['grad_accum']} accumulation = {tokens_per_step} tokens/step, {mesh.size} device(s) {dict(mesh.shape)}, "
        f"remat {args['remat']}, {peak_text}"
    )
    plain = not sys.stderr.isatty()  # under a scheduler or `> run.log`: one line per window, no bars
    with tqdm(desc="compiling the train step", total=1, leave=False, disable=plain or not main_process) as bar:
        offsets = batch_offsets(seed, TRAIN_STREAM, start, batch_shape, train_ids, block_size)
        inputs, targets = sharded_batch(train_ids, offsets, block_size, batch)
        step_fn = step_fn.lower(state, inputs, targets).compile()
        bar.update()
    replicated = shardings["key"]
    track = jax.jit(track_bad_steps, donate_argnums=0, out_shardings=replicated)
    fresh_tracker = jax.jit(no_bad_step, out_shardings=replicated)
    gather = jax.jit(unstacked, out_shardings=replicated)  # every process can read the whole params
    writer = summary_writer(out_dir) if main_process else None
    write = (log if plain else functools.partial(tqdm.write, file=sys.stderr)) if main_process else say

    losses, best, timed_steps, timed_seconds, skipped = {}, (math.inf, None), 0, 0.0, 0
    tracker, window_first, window_start = fresh_tracker(), start, clock()
    bar = tqdm(desc="training", initial=start, total=max_iters, unit="step", dynamic_ncols=True, disable=plain or not main_process)
    for step in range(start, max_iters):
        offsets = batch_offsets(seed, TRAIN_STREAM, step, batch_shape, train_ids, block_size)
        inputs, targets = sharded_batch(train_ids, offsets, block_size, batch)  # [grad_accum, batch, block_size] each
        state, metrics = step_fn(state, inputs, targets)
        done = step + 1
        tracker = track(tracker, metrics["loss"], done)
        bar.update()
        last = done == max_iters
        saving = done % flags["ckpt_interval"] == 0 or last
        evaluating = done % flags["eval_interval"] == 0 or saving  # every checkpoint has its val loss
        sampling = flags["sample_every"] and done % flags["sample_every"] == 0
        if not (done % flags["log_interval"] == 0 or evaluating or saving or sampling):
            continue  # the host goes on preparing batches while the device works
        losses[done], grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])  # waits for the step
        window_s, window_steps = clock() - window_start, done - window_first
        timed_steps, timed_seconds = timed_steps + window_steps, timed_seconds + window_s
        try:
            skipped += check_bad_steps(tracker, done, window_steps, flags["nan_policy"], manager.latest_step(), write)
        except UserError:
            bar.close()  # the error goes on a line of its own
            raise
        lr = float(schedule(step))
        speed = window_speed(window_s, window_steps, tokens_per_step, flops_per_step, peak)
        line = progress_line(done, max_iters, losses[done], lr, speed)
        if main_process:
            log(line) if plain else bar.set_postfix_str(line.split(": ", 1)[1])
            scalars = {"train/loss": losses[done], "train/lr": lr, "train/grad_norm": grad_norm}
            write_scalars(writer, done, {**scalars, **{f"speed/{k}": v for k, v in speed.items() if k != "ms_per_step"}})
        val_loss = None
        if evaluating:
            train_loss = estimate_loss(eval_loss, state["params"], eval_batches["train"])
            val_loss = estimate_loss(eval_loss, state["params"], eval_batches["val"])
            best = min(best, (val_loss, done))
            if main_process:
                write(f"step {done}: train loss {train_loss:.4f}, val loss {val_loss:.4f}")
                write_scalars(writer, done, {"eval/train_loss": train_loss, "eval/val_loss": val_loss})
        if sampling:
            host_params = model_params(gather(state["params"]), len(encoder.encoder))
            if main_process:
                text = sample_text(host_params, encoder, prompt_ids, hparams["n_head"], n_sample)
                write(f"step {done} sample: {text!r}")
        if score_hellaswag and done % flags["hellaswag_every"] == 0:
            model = jax.jit(unstacked, out_shardings=model_shardings)(state["params"])
            acc, acc_norm, n_examples = score_hellaswag(model)  # on every process: the forward is sharded
            if main_process:
                write(f"step {done}: {hellaswag_line(acc, acc_norm, n_examples)}")
                write_scalars(writer, done, {"eval/hellaswag_acc": acc, "eval/hellaswag_acc_norm": acc_norm})
        if saving or (evaluating and best[1] == done):
            save_checkpoint(manager, done, state, seed, val_loss)
            if main_process:
                writer.flush()  # a killed run keeps the curves of its checkpointed steps
        tracker, window_first, window_start = fresh_tracker(), done, clock()
    bar.close()
    manager.close()
    if main_process:
        writer.close()
    summary = {"state": state, "losses": losses, "best_val_loss": best[0], "best_step": best[1], "skipped": skipped}
    if timed_steps:
        summary.update(ms_per_step=1e3 * timed_seconds / timed_steps, tokens_per_s=tokens_per_step * timed_steps / timed_seconds)
        say(f"{summary['ms_per_step']:.1f} ms/step, {summary['tokens_per_s']:,.0f} tokens/s over {timed_steps} steps")
    if skipped:
        say(f"{skipped} updates skipped at a non-finite loss (--nan_policy skip)")
    say(f"best val loss {best[0]:.4f} at step {best[1]}; checkpoints in {os.path.join(out_dir, 'checkpoints')}")
    return summary


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
      learning_rate: the peak learning rate, reached after warmup_iters.
      min_lr: the learning rate at the end of the cosine decay.
      warmup_iters: steps of linear warmup.
      lr_decay_iters: the step the cosine decay reaches min_lr (0: max_iters).
      weight_decay: AdamW's decoupled weight decay, on 2-D weight matrices only.
      beta1: AdamW's beta1.
      beta2: AdamW's beta2.
      grad_clip: clip gradients to this global norm (0: no clipping).
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


def run_params(ckpt_dir, step=None):
    """(step, hparams, NumPy params) of a training run's checkpoint in `ckpt_dir` (its --out_dir):
    `step`, or by default the best val loss, else the latest. Only the params are read (not the
    optimizer state). A padded --vocab_size is cut back to the run's vocabulary, so the params are
    those of a model folder."""
    import orbax.checkpoint as ocp

    config = read_config(ckpt_dir, "ckpt_dir")
    manager = checkpoint_manager(ckpt_dir, config["flags"]["keep"])
    step = manager.best_step() if step is None else step
    if step not in manager.all_steps():
        raise UserError(f"{ckpt_dir} has no checkpoint of --step {step!r}; it has {list(manager.all_steps())}")
    shapes = {path: np.zeros(0, np.float32) for path in expected_shapes(config["hparams"])}  # the tree to fill
    as_numpy = {path: ocp.RestoreArgs(restore_type=np.ndarray) for path in shapes}
    target = {"params": unflatten(shapes, config["hparams"]["n_layer"])}
    restore_args = {"params": unflatten(as_numpy, config["hparams"]["n_layer"])}
    args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
    try:
        params = manager.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]
    except (ValueError, OSError, KeyError, TypeError) as e:  # as restore_checkpoint: never pickle
        raise UserError(f"the checkpoint {os.path.join(manager.directory, str(step))} cannot be read ({type(e).__name__}): "
                        f"move that folder away to use another step (the run has {list(manager.all_steps())})")  # fmt: skip
    hparams = run_hparams(ckpt_dir, config)
    return step, hparams, model_params(params, hparams["n_vocab"])


def run_hparams(ckpt_dir, config):
    """The hparams of a run (its config.json's) as those of a model folder: a padded --vocab_size is cut
    back to the run's vocabulary."""
    return {**config["hparams"], "n_vocab": len(load_encoder(ckpt_dir).encoder)}


EXPORT_FORMATS = {"release": save_gpt2_checkpoint, "hf": save_hf_checkpoint}


def export(ckpt_dir="out/shakespeare_char", out=None, step=None, format="release"):
    """Write a training run's checkpoint as a model folder for `gpt2.py --model_size` (or transformers).

    Args:
      ckpt_dir: the --out_dir of a training run.
      out: the model folder to write.
      step: the step to export (default: the best val loss, else the latest).
      format: release (OpenAI's TensorFlow layout) or hf (Hugging Face's: config.json, model.safetensors,
        vocab.json, merges.txt; transformers' GPT2LMHeadModel.from_pretrained reads it).
    """
    if out is None:
        raise UserError("give the model folder to write: --out MODEL_DIR")
    if format not in EXPORT_FORMATS:
        raise UserError(f"unknown --format {format!r}: use {' or '.join(EXPORT_FORMATS)}")
    out, ckpt_dir = check_folder(out, "out"), check_folder(ckpt_dir, "ckpt_dir")
    step, hparams, params = run_params(ckpt_dir, step)
    EXPORT_FORMATS[format](params, hparams, str(out), ckpt_dir)
    log(f"exported step {step} of {ckpt_dir} to {out}: python gpt2.py \"...\" --model_size {out}")


# ---------------------------------------------------------------------------------------------
# Will it fit? The train step compiled for a target's devices, from shapes alone

RELEASED_HPARAMS = {  # OpenAI's hparams.json of each release, so that no weights are needed
    size: {"n_vocab": 50257, "n_ctx": 1024, "n_embd": n_embd, "n_head": n_head, "n_layer": n_layer}
    for size, n_layer, n_head, n_embd in (("124M", 12, 12, 768), ("355M", 24, 16, 1024), ("774M", 36, 20, 1280), ("1558M", 48, 25, 1600))
}


def model_shape(flags):
    """The hparams a run of `flags` trains, without loading weights: the scratch flags (the data's
    vocabulary when --vocab_size is 0), a released size, or the model --init_from names in any layout
    (of a hub id, only config.json is fetched)."""
    if flags["init_from"] == "scratch":
        if not flags["vocab_size"] and not os.path.isfile(os.path.join(flags["data_dir"], "meta.json")):
            raise UserError(f"--data_dir {flags['data_dir']} has no meta.json to read the vocabulary from: give --vocab_size, e.g. 50304")
        n_vocab = flags["vocab_size"] or read_meta(flags["data_dir"])["vocab_size"]
        return {"n_vocab": n_vocab, "n_ctx": flags["block_size"], **{k: flags[k] for k in ("n_embd", "n_head", "n_layer")}}
    if flags["init_from"] in RELEASED_HPARAMS:
        return RELEASED_HPARAMS[flags["init_from"]]
    model_dir = str(flags["init_from"])
    if not os.path.isdir(model_dir) and is_hub_id(model_dir):
        return hf_hparams(download_hf_files(model_dir, "init_from", HF_FILES[:1]))
    layout = folder_layout(model_dir) if os.path.isdir(model_dir) else None
    if layout == "run":
        return run_hparams(model_dir, read_config(model_dir, "init_from"))
    if layout == "hf":
        return hf_hparams(model_dir)
    if layout is None or not os.path.isfile(os.path.join(model_dir, "hparams.json")):
        raise UserError(
            f"--init_from {model_dir!r} is no model folder (no hparams.json, no Hugging Face config.json, no training "
            f"run) and no hub id: give one, or {', '.join(RELEASED_HPARAMS)}"
        )
    return load_hparams(model_dir)


def abstract_params(hparams):
    """The float32 params' shapes and dtypes (`jax.ShapeDtypeStruct`), nothing allocated."""
    import jax

    flat = {path: jax.ShapeDtypeStruct(tuple(shape), np.float32) for path, shape in expected_shapes(hparams).items()}
    return unflatten(flat, hparams["n_layer"])


def compiled_train_step(flags, hparams, mesh):
    """The train step a run of `flags` runs on `mesh` (the same jit_train_step, shardings, dtype,
    remat and accumulation), compiled from abstract shapes: no weights, no data."""
    import jax

    params = abstract_params(hparams)
    optimizer, _ = make_optimizer(**{k: flags[k] for k in OPTIMIZER_FLAGS})
    abstract = jax.eval_shape(lambda p: init_state(p, optimizer, flags["seed"]), params)
    shardings = state_shardings(abstract, optimizer, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    plan, batch = batch_plan(flags, mesh), batch_sharding(mesh, 3, axis=1)
    tokens = jax.ShapeDtypeStruct((plan["grad_accum"], plan["global_batch"], flags["block_size"]), np.int32, sharding=batch)
    step = jit_train_step(shardings, batch, **step_args(flags, hparams, optimizer, mesh))
    return step.lower(state, tokens, tokens).compile()


def show_bytes(n):
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def step_memory(flags, hparams, mesh):
    """(argument, temporary, total) bytes one device holds while the step of `flags` runs, from its
    compiled program; when the TPU compiler refuses a program larger than HBM, (None, the
    temporaries it names, the same)."""
    import jax

    try:
        compiled = compiled_train_step(flags, hparams, mesh)
    except jax.errors.JaxRuntimeError as e:
        needed = re.search(r"RESOURCE_EXHAUSTED: .*memory required for HLO temporaries \(([\d.]+)([KMG])\)", str(e))
        if not needed:
            raise
        temporaries = float(needed[1]) * 2 ** (10 * "KMG".index(needed[2]) + 10)
        return None, temporaries, temporaries
    memory = compiled.memory_analysis()
    arguments, temporaries = memory.argument_size_in_bytes, memory.temp_size_in_bytes
    outputs = memory.output_size_in_bytes - memory.alias_size_in_bytes  # the donated state is updated in place
    return arguments, temporaries, arguments + temporaries + outputs + memory.generated_code_size_in_bytes


def largest_batch(fits, batch_size):
    """The largest batch below `batch_size` (which does not fit) for which `fits(batch)`, or 0:
    halving until one fits, then bisecting."""
    low, high = batch_size // 2, batch_size
    while low and not fits(low):
        low, high = low // 2, low
    while low and high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


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
    hparams = model_shape(flags)
    devices = topology_devices(topology)
    mesh = parse_mesh(flags["mesh"], devices) if flags["mesh"] else parse_mesh("dp=1", devices[:1])
    check_fits(mesh, hparams)
    capacity = device_memory or memory_per_device(mesh.devices.flat[0], len(devices))
    plan = batch_plan(flags, mesh)
    arguments, temporaries, total = step_memory(flags, hparams, mesh)
    tokens_per_step = plan["grad_accum"] * plan["global_batch"] * flags["block_size"]
    params = abstract_params(hparams)  # XLA's cost_analysis counts a scanned layer once: count the model's FLOPs
    flops = flops_per_token(params, hparams["n_layer"], hparams["n_embd"], flags["block_size"]) * tokens_per_step / mesh.size
    kinds = sorted({d.device_kind for d in mesh.devices.flat})
    print(
        f"{', '.join(kinds)} x {mesh.size} {dict(mesh.shape)}, --batch_size {flags['batch_size']} per rank x "
        f"{plan['grad_accum']} accumulation, remat {resolve_remat(flags['remat'], mesh.devices.flat[0].platform)}: "
        + (f"arguments {show_bytes(arguments)} + temporaries {show_bytes(temporaries)} = " if arguments is not None else "temporaries ")
        + f"{show_bytes(total)} of {show_bytes(capacity)} per "
        f"device, {flops / 1e12:.3f} TFLOP per step per device (6N + attention): {'fits' if total <= capacity else 'does not fit'}",
        flush=True,
    )
    if total <= capacity:
        return
    micro = {**flags, "total_batch_tokens": 0, "grad_accum": plan["grad_accum"]}  # the memory of one micro-batch
    fits = lambda batch_size: step_memory({**micro, "batch_size": batch_size}, hparams, mesh)[2] <= capacity
    best = largest_batch(fits, flags["batch_size"])
    advice = f"the largest --batch_size that fits is {best} (per dp*fsdp rank)" if best else "not even --batch_size 1 fits: shard the model (--mesh fsdp=N) or use --remat block"
    raise UserError(f"the train step needs {show_bytes(total)} per device but a {kinds[0]} holds {show_bytes(capacity)}: {advice}")


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
