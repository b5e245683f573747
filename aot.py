"""Will a run fit? The train step a run's flags make, compiled ahead of time from shapes alone for a TPU
slice (`compile --topology v5e:2x2`, no TPU needed) or this machine's devices, and its memory per device.
"""

import os
import re

import numpy as np

from checkpoints import read_config, run_hparams
from cli import UserError
from data import read_meta
from formats import HF_FILES, RELEASED_HPARAMS, expected_shapes, hf_hparams, load_hparams, unflatten
from monitor import flops_per_token
from sharding import GiB, batch_sharding, check_fits, memory_per_device, parse_mesh, state_shardings, topology_devices
from step import batch_plan, init_state, jit_train_step, resolve_remat, run_attention, run_optimizer, scratch_hparams, step_args
from utils import download_hf_files, folder_layout, is_hub_id

def model_shape(flags):
    """The hparams a run of `flags` trains, without loading weights: the scratch flags (the data's
    vocabulary when --vocab_size is 0), a released size, or the model --init_from names in any layout
    (of a hub id, only config.json is fetched)."""
    if flags["init_from"] == "scratch":
        if not flags["vocab_size"] and not os.path.isfile(os.path.join(flags["data_dir"], "meta.json")):
            raise UserError(f"--data_dir {flags['data_dir']} has no meta.json to read the vocabulary from: give --vocab_size, e.g. 50304")
        n_vocab = flags["vocab_size"] or read_meta(flags["data_dir"])["vocab_size"]
        return scratch_hparams(flags, n_vocab)
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
    optimizer, _ = run_optimizer(flags)
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
    temporaries it names, the same). Another of the compiler's memories that the program outgrows
    (the TPU's sync flags, for 1558M's 48 unrolled layers of splash kernels) is a UserError."""
    import jax

    try:
        compiled = compiled_train_step(flags, hparams, mesh)
    except jax.errors.JaxRuntimeError as e:
        if needed := re.search(r"RESOURCE_EXHAUSTED: .*memory required for HLO temporaries \(([\d.]+)([KMG])\)", str(e)):
            temporaries = float(needed[1]) * 2 ** (10 * "KMG".index(needed[2]) + 10)
            return None, temporaries, temporaries
        if exhausted := re.search(r"RESOURCE_EXHAUSTED: (?:XLA:TPU compile permanent error\. )?(.*)", str(e)):
            raise UserError(f"the compiler cannot fit the step: {exhausted[1].rstrip('.')}: try --remat block (the layers as one scan), or --attention math")
        raise
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


def check_fit(flags, topology, device_memory):
    """Compile the train step of checked `flags` for `topology`'s devices (see `compile_step` in
    train_jax.py) and print whether it fits `device_memory` bytes per device (0: the device's own); a
    UserError naming the largest --batch_size that fits when it does not."""
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
        f"{plan['grad_accum']} accumulation, remat {resolve_remat(flags['remat'], mesh.devices.flat[0].platform)}, "
        f"attention {run_attention(flags, hparams, mesh)}: "
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
