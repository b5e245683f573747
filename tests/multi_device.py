"""Checks that need several devices, run by test_sharding.py in a subprocess whose XLA_FLAGS fake
them on the CPU (`python multi_device.py FUNCTION JSON_KWARGS` prints the function's JSON result).
The device count of a process is fixed when JAX starts, so these cannot run in the tests' process."""

import functools
import json
import sys

import numpy as np
import optax

import train_jax
import aot
import formats
from cli import UserError
from formats import flatten
from sharding import match_rules
from step import MUON_RULES, batch_plan, init_params, init_sharded_state, init_state, jit_train_step, loss_fn, make_optimizer, train_step

HPARAMS = {"n_vocab": 64, "n_ctx": 16, "n_embd": 32, "n_head": 4, "n_layer": 2}  # every width divides by 8
OPTIMIZER = dict(
    learning_rate=1e-2, min_lr=1e-3, warmup_iters=0, lr_decay_iters=10, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0
)
MUON = dict(learning_rate=0.02, momentum=0.95, weight_decay=0.1)
BATCH_SHAPE = (2, 8, 16)  # [grad_accum, batch, n_seq]


def mesh_specs(specs):
    """Each spec's mesh shape, or its error message."""
    from sharding import device_mesh

    results = {}
    for spec in specs:
        try:
            results[spec] = dict(device_mesh(spec).shape)
        except UserError as e:
            results[spec] = str(e)
    return results


def one_step(specs, muon=False):
    """One train step (AdamW, or with `muon` Muon's) unsharded on one device and under each mesh: the
    loss, the largest difference of the updated params from the unsharded ones (and relative to the
    update for Muon's), and each parameter's spec (and its Muon momentum's)."""
    import jax

    params = init_params(HPARAMS, seed=0)
    optimizer, _ = make_optimizer(**OPTIMIZER, muon=MUON if muon else None)
    rng = np.random.default_rng(0)
    inputs, targets = rng.integers(0, HPARAMS["n_vocab"], (2, *BATCH_SHAPE), dtype=np.int32)
    step = functools.partial(train_step, optimizer=optimizer, n_head=HPARAMS["n_head"], rate=0.0, dtype="float32")
    single = jax.devices()[0]
    state = jax.device_put(init_state(params, optimizer, seed=0), single)
    reference, metrics = jax.jit(step)(state, jax.device_put(inputs, single), jax.device_put(targets, single))
    expected = {path: np.asarray(a) for path, a in flatten(reference["params"]).items()}
    before = flatten(formats.stacked(params))
    group = flatten(match_rules(MUON_RULES if muon else ((".*", "adamw"),), formats.stacked(params)))
    diff = lambda flat, path: np.abs(np.asarray(flat[path]) - expected[path]).max()
    results = {"unsharded": {"loss": float(metrics["loss"])}}
    for spec in specs:
        new, metrics = sharded_step(params, optimizer, spec, inputs, targets)
        flat = flatten(new["params"])
        results[spec] = {
            "loss": float(metrics["loss"]),
            "max_param_diff": max(float(diff(flat, path)) for path in expected if group[path] == "adamw"),
            "specs": {path: str(a.sharding.spec) for path, a in flat.items()},
        }
        if muon:
            update = lambda path: np.abs(expected[path] - before[path]).max()
            moments = flatten(optax.tree_utils.tree_get(new["opt_state"], "MuonState").mu)
            results[spec]["muon_relative_diff"] = max(float(diff(flat, path) / update(path)) for path in expected if group[path] == "muon")
            results[spec]["moment_specs"] = {path: str(a.sharding.spec) for path, a in moments.items() if group[path] == "muon"}
    return results


def sharded_step(params, optimizer, spec, inputs, targets):
    """train_jax's own path: the state created on the mesh, the batch placed split, the jitted step."""
    import jax

    from sharding import batch_sharding, device_mesh

    mesh = device_mesh(spec)
    state, shardings = init_sharded_state(params, optimizer, 0, mesh)
    batch = batch_sharding(mesh, 3, axis=1)
    placed = [jax.device_put(x, batch) for x in (inputs, targets)]
    step_args = dict(optimizer=optimizer, n_head=HPARAMS["n_head"], rate=0.0, dtype="float32")
    return jit_train_step(shardings, batch, **step_args)(state, *placed)


def plain_loss(params, inputs, targets):  # [batch, n_seq] x2 -> []
    """The loss as it was before remat, scanned layers and chunks: gpt2.gpt2's logits, all at once."""
    import jax
    import optax

    import gpt2

    logits = jax.vmap(lambda x: gpt2.gpt2(x, **params, n_head=HPARAMS["n_head"]))(inputs)  # [batch, n_seq, n_vocab]
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def loss_grads(specs, variants):
    """loss_fn's loss and gradients for each variant (its remat, loss_chunk and attention) on one device and
    under each mesh, against `plain_loss`'s on one device: the loss's relative difference, and the
    largest gradient difference relative to that gradient's largest entry."""
    import jax

    from gpt2 import attention_of
    from sharding import batch_sharding, device_mesh, gathered, param_shardings

    params = init_params(HPARAMS, seed=0)
    training_params = formats.stacked(params)
    inputs, targets = np.random.default_rng(0).integers(0, HPARAMS["n_vocab"], (2, *BATCH_SHAPE[1:]), dtype=np.int32)
    args = dict(key=None, n_head=HPARAMS["n_head"], rate=0.0, dtype="float32")
    grad_fn = lambda **kwargs: jax.jit(jax.value_and_grad(functools.partial(loss_fn, **args, **kwargs)))
    single = jax.devices()[0]
    loss, grads = jax.jit(jax.value_and_grad(plain_loss))(*jax.device_put((params, inputs, targets), single))
    expected = {path: np.asarray(g) for path, g in flatten(grads).items()}
    results = {}
    for spec in ["", *specs]:
        mesh = device_mesh(spec)
        shardings = param_shardings(training_params, mesh)
        batch = batch_sharding(mesh, 2, axis=0)
        placed = (jax.device_put(training_params, shardings), jax.device_put(inputs, batch), jax.device_put(targets, batch))
        compute = gathered(shardings) if spec else None
        for variant in variants:
            kernel = {"attention": attention_of(variant["attention"], mesh)} if "attention" in variant else {}  # a name in JSON
            new_loss, new_grads = grad_fn(**{**variant, **kernel}, compute_shardings=compute)(*placed)
            flat = flatten(formats.unstacked(new_grads))
            difference = lambda path: float(np.abs(np.asarray(flat[path]) - expected[path]).max() / np.abs(expected[path]).max())
            results[f"{spec or 'one device'} {variant}"] = {
                "loss": abs(float(new_loss) / float(loss) - 1),
                "grads": max(difference(path) for path in expected if np.abs(expected[path]).max() > 0),
            }
    return results


def batch_plans(specs, flags):
    """batch_plan of the flags under each mesh, or its error message."""
    from sharding import device_mesh

    results = {}
    for spec in specs:
        try:
            results[spec] = batch_plan(train_jax.default_flags(**flags), device_mesh(spec))
        except UserError as e:
            results[spec] = str(e)
    return results


def step_bytes(flags, batch_sizes):
    """The bytes per device the compiled train step of the flags needs, by --batch_size."""
    from sharding import device_mesh

    flags = train_jax.default_flags(**flags)
    mesh, hparams = device_mesh(flags["mesh"]), aot.model_shape(flags)
    compile_total = lambda b: aot.step_memory({**flags, "batch_size": b}, hparams, mesh)[2]
    return {str(b): compile_total(b) for b in batch_sizes}


def fsdp_bytes(spec):
    """The bytes of the params and the optimizer state on each device, and their total."""
    import jax

    from sharding import device_mesh

    params = init_params(HPARAMS, seed=0)
    optimizer, _ = make_optimizer(**OPTIMIZER)
    state, _ = init_sharded_state(params, optimizer, 0, device_mesh(spec))
    per_device = {}
    for name in ("params", "opt_state"):
        for leaf in jax.tree.leaves(state[name]):
            for shard in leaf.addressable_shards:
                per_device.setdefault(name, {}).setdefault(str(shard.device), 0)
                per_device[name][str(shard.device)] += shard.data.nbytes
    total = {name: sum(leaf.nbytes for leaf in jax.tree.leaves(state[name])) for name in ("params", "opt_state")}
    return {"per_device": per_device, "total": total}


def unfused_values(hlo, dims):
    """{dtype: count} of the values of shape `dims` that a compiled program's text computes outside
    its fusions (what a fusion computes inside stays in registers and vector memory, never a buffer)."""
    import re

    fused = set(re.findall(r"calls=%?([\w.\-]+)", hlo))
    counts = {}
    for computation in re.split(r"\n(?=\S)", hlo):  # a computation starts at column 0
        name = re.match(r"(?:ENTRY )?%?([\w.\-]+)", computation)
        if name is None or name[1] in fused:
            continue
        for shape in re.findall(r"^\s+(?:ROOT )?%?[\w.\-]+ = (\S+|\(.*?\)) [\w\-]+\(", computation, re.M):
            for dtype in re.findall(rf"(\w+)\[{','.join(map(str, dims))}\]", shape):
                counts[dtype] = counts.get(dtype, 0) + 1
    return counts


def activation_dtypes(topology, flags):
    """The dtypes of the [batch, n_seq, n_embd] activations (per device, and as the [batch * n_seq,
    n_embd] rows of a matmul) in the train step of `flags` compiled for `topology`, and of what the
    remat policy saves of them ([n_layer, batch, n_seq, n_embd])."""
    from sharding import parse_mesh, topology_devices

    flags = train_jax.default_flags(**flags)
    mesh = parse_mesh(flags["mesh"], topology_devices(topology))
    hparams = aot.model_shape(flags)
    hlo = aot.compiled_train_step(flags, hparams, mesh).as_text()
    batch, n_seq, n_embd = flags["batch_size"], flags["block_size"], hparams["n_embd"]
    shapes = {"activations": (batch, n_seq, n_embd), "rows": (batch * n_seq, n_embd), "saved": (hparams["n_layer"], batch, n_seq, n_embd)}
    return {name: unfused_values(hlo, dims) for name, dims in shapes.items()}


def attention_scores(topology, flags, attentions):
    """For each of `attentions`, whether the train step of `flags` compiled for `topology` holds a
    [batch, n_head, n_seq, n_seq] value (per device) anywhere in its program: the scores as a matrix."""
    import re

    from sharding import parse_mesh, topology_devices

    mesh = parse_mesh(flags["mesh"], topology_devices(topology))
    found = {}
    for attention in attentions:
        run = train_jax.default_flags(**flags, attention=attention)
        hparams = aot.model_shape(run)
        hlo = aot.compiled_train_step(run, hparams, mesh).as_text()
        scores = (run["batch_size"], hparams["n_head"], run["block_size"], run["block_size"])
        found[attention] = bool(re.search(rf"\w+\[{','.join(map(str, scores))}\]", hlo))
    return found


def fit_losses(runs):
    """For each run's flags in turn, the losses train_jax.fit logs, by step."""
    losses = lambda flags: train_jax.fit(train_jax.default_flags(**flags))["losses"]
    return [{str(step): loss for step, loss in losses(flags).items()} for flags in runs]


def cases(cases):
    """Several of these checks in one process: one JAX start-up, and what they compile alike (a
    train step two runs share, the fit check's steps) compiled once, through JAX's compilation cache.
    `cases` is [name, function, kwargs] each; a JSON line [name, result] is printed as each finishes
    (the result {"error": traceback} if it raised), so a test waits for its own case only."""
    import traceback

    for name, function, kwargs in cases:
        try:
            outcome = globals()[function](**kwargs)
        except Exception:
            outcome = {"error": traceback.format_exc()}
        print(json.dumps([name, outcome]), flush=True)


if __name__ == "__main__":
    print(json.dumps(globals()[sys.argv[1]](**json.loads(sys.argv[2]))), flush=True)
