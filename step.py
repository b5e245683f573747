"""The train step: GPT-2's init, the loss (a chunked cross-entropy over the same forward that generates
text, its blocks scanned and rematerialized under --remat), AdamW or Muon, and `train_step` jitted for a mesh.

A step is a pure function of the train state ({'params', 'opt_state', 'key'}, the params with their
blocks stacked [n_layer, ...]) and a batch; `batch_plan` says how large a step's batch is on a mesh.
"""

import math

import numpy as np

from cli import UserError
from formats import expected_shapes, stacked, unflatten, unstacked
from fused import resolve_attention
from gpt2 import attention, attention_of, hidden_states, transformer_block, unembed
from sharding import divisors, gathered, layer_sharding, map_paths, match_rules, param_shardings, place, state_shardings

# --remat: what each transformer block keeps for the backward pass (jax.checkpoint_policies), the
# rest is recomputed: none keeps everything, dots the matmul outputs (no attention scores), block
# only the block's input.
REMAT_POLICIES = {"none": None, "dots": "dots_with_no_batch_dims_saveable", "block": "nothing_saveable"}
INIT_STD = 0.02
# Weight decay on the 2-D matrices (the conv weights and both embeddings, as in nanoGPT), none on
# biases and LayerNorm gains. Rules are (regex over the '/'-joined param path, value), first match wins.
DECAY_RULES = ((r"/w$", True), (r"^(wte|wpe)$", True), (r".*", False))
# --optimizer muon: Muon takes the blocks' matrices (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj),
# AdamW the embeddings, the LayerNorm gains and the biases, as modded-nanogpt splits them.
MUON_RULES = ((r"^blocks/.*/w$", "muon"), (r".*", "adamw"))
OPTIMIZERS = ("adamw", "muon")
OPTIMIZER_FLAGS = ("learning_rate", "min_lr", "warmup_iters", "lr_decay_iters", "weight_decay", "beta1", "beta2", "grad_clip")
MUON_FLAGS = ("muon_learning_rate", "muon_momentum", "muon_weight_decay")


def init_param(path, shape, rng, n_layer):
    """GPT-2's init: unit LayerNorm gains, zero biases, normal(0, 0.02) weights, with the residual
    output projections (c_proj/w) scaled by 1/sqrt(2*n_layer)."""
    if path.endswith("/g"):
        return np.ones(shape, np.float32)
    if path.endswith("/b"):
        return np.zeros(shape, np.float32)
    std = INIT_STD / math.sqrt(2 * n_layer) if path.endswith("c_proj/w") else INIT_STD
    return std * rng.standard_normal(shape, np.float32)


def scratch_hparams(flags, n_vocab):
    """The hparams of a model trained from scratch: the flags' shape (--block_size its n_ctx) and a
    vocabulary of n_vocab."""
    return {"n_vocab": n_vocab, "n_ctx": flags["block_size"], **{k: flags[k] for k in ("n_embd", "n_head", "n_layer")}}


def init_params(hparams, seed):
    """float32 NumPy params of the hparams' shape, a pure function of the seed."""
    rng = np.random.default_rng(seed)
    flat = {path: init_param(path, shape, rng, hparams["n_layer"]) for path, shape in expected_shapes(hparams).items()}
    return unflatten(flat, hparams["n_layer"])


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


def training_layer(remat, shardings=None, attention=attention):
    """`transformer_block` of one layer for training, its attention computed by `attention`
    (gpt2.attention_of): its weights gathered to `shardings` (under fsdp only the layer being computed
    is whole) and, given a policy, rematerialized: its activations are recomputed in the backward pass
    but for what --remat's policy saves."""
    import jax

    def layer(x, weights, key, n_head, rate):  # [n_seq, n_embd] -> [n_seq, n_embd]
        if shardings is not None:
            weights = jax.lax.with_sharding_constraint(weights, shardings)
        return transformer_block(x, **weights, n_head=n_head, rate=rate, key=key, attention=attention)[0]

    if REMAT_POLICIES[remat] is None:
        return layer
    return jax.checkpoint(layer, policy=getattr(jax.checkpoint_policies, REMAT_POLICIES[remat]), static_argnums=(3, 4))


def each_block(layer):
    """hidden_states' `block`, one call per block (the program holds every layer: XLA fuses across
    them, and frees what the backward pass no longer needs as it goes)."""

    def block(x, mlp, attn, ln_1, ln_2, n_head, kv_cache, start, pad, rate, key):  # training has no cache
        return layer(x, dict(mlp=mlp, attn=attn, ln_1=ln_1, ln_2=ln_2), key, n_head, rate), kv_cache

    return block


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


def loss_fn(params, inputs, targets, key, n_head, rate, dtype, compute_shardings=None, remat="none", loss_chunk=0, attention=attention):  # [batch, n_seq] x2 -> []
    """Mean next-token cross-entropy of the model computed in `dtype`; the softmax in the master
    weights' precision (float32). On a mesh, the weights are used with `compute_shardings`, each
    block's when that block runs. The params are training's (`stacked`). `remat` is a key of
    REMAT_POLICIES: with a policy the blocks run as one scan over the stacked weights; without, one
    by one (a scan would keep every layer's activations stacked: 3x the memory of 124M's step, and
    a third slower on the CPU baby config).
    `loss_chunk` is the positions whose logits are computed at once (0: all). `attention` is
    gpt2.attention or a fused kernel (gpt2.attention_of)."""
    import jax

    compute = jax.tree.map(lambda p: p.astype(dtype), params)
    block_shardings = None
    if compute_shardings is not None:
        outside = {name: compute_shardings[name] for name in ("wte", "wpe", "ln_f")}
        compute = {**compute, **jax.lax.with_sharding_constraint({name: compute[name] for name in outside}, outside)}
        block_shardings = jax.tree.map(layer_sharding, compute_shardings["blocks"])  # one layer's, as every layer's
    layer = training_layer(remat, block_shardings, attention)
    if REMAT_POLICIES[remat] is None:
        compute, block = unstacked(compute), each_block(layer)
    else:
        compute["blocks"], block = [compute["blocks"]], scanned_blocks(layer)
    h, _ = hidden_states(inputs, **compute, n_head=n_head, rate=rate, key=key if rate else None, block=block)  # [batch, n_seq, n_embd]
    return chunked_cross_entropy(h, compute["wte"], targets, loss_chunk, params["wte"].dtype)


def lr_schedule(peak, end, warmup_iters, lr_decay_iters):
    """Linear warmup to `peak` over warmup_iters, then cosine decay to `end` at lr_decay_iters."""
    import optax

    return optax.warmup_cosine_decay_schedule(
        init_value=peak / (warmup_iters + 1),  # as nanoGPT: step 0 already learns
        peak_value=peak,
        warmup_steps=warmup_iters,
        decay_steps=max(lr_decay_iters, warmup_iters + 1),
        end_value=end,
    )


def make_optimizer(learning_rate, min_lr, warmup_iters, lr_decay_iters, weight_decay, beta1, beta2, grad_clip, muon=None):
    """(optimizer, AdamW's schedule): global-norm clipping, then AdamW with linear warmup and cosine
    decay to min_lr; weight decay only where DECAY_RULES say (of the paths of the params it is given,
    in either layout). With `muon` (the MUON_FLAGS without their prefix), the matrices MUON_RULES name
    go to Muon instead (see `muon_optimizer`), on the same schedule scaled to its learning rate."""
    import functools

    import optax

    schedule = lr_schedule(learning_rate, min_lr, warmup_iters, lr_decay_iters)
    optimizer = optax.adamw(schedule, b1=beta1, b2=beta2, weight_decay=weight_decay, mask=functools.partial(match_rules, DECAY_RULES))
    if muon is not None:
        end = muon["learning_rate"] * (min_lr / learning_rate if learning_rate else 0.0)  # the same share of the peak as AdamW's
        muon_schedule = lr_schedule(muon["learning_rate"], end, warmup_iters, lr_decay_iters)
        groups = {"adamw": optimizer, "muon": muon_optimizer(muon_schedule, muon["momentum"], muon["weight_decay"])}
        optimizer = optax.partition(groups, functools.partial(match_rules, MUON_RULES))
    return optax.chain(optax.clip_by_global_norm(grad_clip) if grad_clip else optax.identity(), optimizer), schedule


def muon_optimizer(schedule, momentum, weight_decay):
    """optax.contrib.muon on the matrices it is given: Nesterov momentum, orthogonalized by 5
    Newton-Schulz steps per matrix, scaled by sqrt(max(1, n_out / n_in)), then decoupled weight decay
    (times the learning rate) where DECAY_RULES say. Its dimension numbers make each layer of a
    stacked block ([n_layer, n_in, n_out]) a matrix of its own, and c_attn's query, key and value too
    (`qkv_apart`). Its own Adam branch is left empty: AdamW keeps the other params, with its decay
    mask (contrib.muon's Adam decays all it holds and is Nesterov whenever Muon is)."""
    import functools

    import optax

    dimensions = lambda tree: map_paths(lambda path, _: optax.contrib.MuonDimensionNumbers(-3 if path.endswith("c_attn/w") else -2, -1), tree)
    muon = optax.contrib.muon(
        schedule, beta=momentum, weight_decay=weight_decay, weight_decay_mask=functools.partial(match_rules, DECAY_RULES),
        muon_weight_dimension_numbers=dimensions,
    )  # fmt: skip
    return qkv_apart(muon)


def qkv_apart(inner):
    """`inner` seeing each c_attn weight ([..., n_embd, 3 * n_embd], its update, its moments) as
    [..., n_embd, 3, n_embd]: the query, key and value columns gpt2.mha splits, a matrix each. The
    state keeps c_attn's shape, so it is checkpointed and sharded as its parameter."""
    import optax

    split = lambda path, a: a.reshape(*a.shape[:-1], 3, a.shape[-1] // 3) if path.endswith("c_attn/w") else a  # [..., n, 3n] -> [..., n, 3, n]
    join = lambda path, a: a.reshape(*a.shape[:-2], -1) if path.endswith("c_attn/w") else a  # [..., n, 3, n] -> [..., n, 3n]

    def update(updates, state, params=None):
        views = [None if tree is None else map_paths(split, tree) for tree in (updates, state, params)]
        updates, state = inner.update(*views)
        return map_paths(join, updates), map_paths(join, state)

    return optax.GradientTransformation(inner.init, update)


def run_optimizer(flags):
    """(optimizer, AdamW's schedule) of a run's flags (its OPTIMIZER_FLAGS, and MUON_FLAGS under --optimizer muon)."""
    muon = {k.removeprefix("muon_"): flags[k] for k in MUON_FLAGS} if flags["optimizer"] == "muon" else None
    return make_optimizer(**{k: flags[k] for k in OPTIMIZER_FLAGS}, muon=muon)


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


def state_shape(config):
    """The shapes and dtypes of a run's train state, from its config.json: the target to restore into."""
    import jax

    flags, hparams = config["flags"], config["hparams"]
    optimizer, _ = run_optimizer(flags)
    return jax.eval_shape(lambda: init_state(init_params(hparams, 0), optimizer, 0))


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


def train_step(state, inputs, targets, optimizer, n_head, rate, dtype, compute_shardings=None, remat="none", loss_chunk=0, attention=attention):  # inputs, targets [grad_accum, batch, n_seq]
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
        loss, grads = grad_fn(state["params"], x, y, micro_key, n_head, rate, dtype, compute_shardings, remat, loss_chunk, attention)
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


def run_attention(flags, hparams, mesh):
    """The attention a run's --attention runs on `mesh`'s devices (fused.resolve_attention): math, xla,
    cudnn or splash."""
    head_dim = hparams["n_embd"] // hparams["n_head"]
    return resolve_attention(flags["attention"], mesh.devices.flat[0], flags["dtype"], flags["dropout"], head_dim, flags["block_size"])


def step_args(flags, hparams, optimizer, mesh):
    """The keyword arguments of `train_step` that a run's flags give on `mesh`."""
    remat = resolve_remat(flags["remat"], mesh.devices.flat[0].platform)
    rate = float(flags["dropout"])
    attention = attention_of(run_attention(flags, hparams, mesh), mesh)
    return dict(optimizer=optimizer, n_head=hparams["n_head"], rate=rate, dtype=flags["dtype"], remat=remat, loss_chunk=flags["loss_chunk"], attention=attention)


def jit_train_step(shardings, batch, **step_args):
    """`train_step` jitted for the mesh: the state (donated) keeps its `shardings`, inputs and targets
    come split by `batch`, the metrics are replicated."""
    import functools

    import jax

    step = functools.partial(train_step, **step_args, compute_shardings=gathered(shardings["params"]))
    return jax.jit(step, donate_argnums=0, in_shardings=(shardings, batch, batch), out_shardings=(shardings, shardings["key"]))


def jit_eval_loss(shardings, batch, n_head, dtype, loss_chunk, attention=attention):
    """`loss_fn` without dropout or remat, jitted for the mesh: params placed by `shardings`, inputs and
    targets split by `batch` ([batch, n_seq] each)."""
    import functools

    import jax

    args = dict(key=None, n_head=n_head, rate=0.0, dtype=dtype, loss_chunk=loss_chunk, compute_shardings=gathered(shardings), attention=attention)
    return jax.jit(functools.partial(loss_fn, **args), in_shardings=(shardings, batch, batch))


def estimate_loss(eval_loss, params, batches):
    """The mean loss over fixed batches (a list of [batch, n_seq] inputs and targets)."""
    return float(np.mean([eval_loss(params, x, y) for x, y in batches]))
