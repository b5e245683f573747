"""The run folder: OUT_DIR/config.json (flags, model shape, batch), the vocabulary, orbax checkpoints of
the train state in OUT_DIR/checkpoints, and a run's params read back as a model folder's (run_params,
export).

Checkpoints hold the train state with the list of blocks (`state_on_disk`), whatever layout training
uses, so that runs written before training stacked the blocks still resume.
"""

import json
import os

import numpy as np

from cli import UserError, check_folder, log
from encoder import load_encoder
from formats import copy_vocab, expected_shapes, read_json, save_gpt2_checkpoint, save_hf_checkpoint, stacked, unflatten, unstacked
from sharding import layer_sharding

CONFIG_FILE = "config.json"
# A mesh may change on --resume, and with it the per-rank batch flags; the batch they make is checked.
RESUMABLE_FLAGS = ("max_iters", "eval_interval", "eval_iters", "log_interval", "ckpt_interval", "keep", "resume", "peak_flops",
                   "sample_every", "sample_prompt", "nan_policy", "mesh", "coordinator_address", "num_processes", "process_id",
                   "hellaswag_every", "batch_size", "grad_accum", "total_batch_tokens", "remat", "loss_chunk", "attention")  # fmt: skip


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


def check_resume(out_dir, flags, defaults):
    """The run's flags must be the saved ones, but for those that do not change the math. A flag its
    config.json lacks (a run saved before the flag existed) counts as its default in `defaults`: a new
    flag's default keeps what runs did before it (--optimizer adamw)."""
    saved = {**defaults, **read_config(out_dir)["flags"]}
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


def is_params(tree):  # the params, their gradients, an optimizer moment (of a group of params: MaskedNode elsewhere, some empty)
    import jax

    return isinstance(tree, dict) and "blocks" in tree and bool(jax.tree.leaves(tree["blocks"]))


def state_on_disk(state, layer=lambda a, i: a[i]):
    """The train state as checkpoints hold it: each params-shaped tree in it (the params, AdamW's
    moments) with the list of blocks, so that runs written before training stacked them resume."""
    import jax

    return jax.tree.map(lambda tree: unstacked(tree, layer) if is_params(tree) else tree, state, is_leaf=is_params)


def state_in_training(state):
    """The inverse of `state_on_disk`: each params-shaped tree stacked."""
    import jax

    return jax.tree.map(lambda tree: stacked(tree) if is_params(tree) else tree, state, is_leaf=is_params)


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


def finished_step(out_dir, keep, max_iters):
    """The step of a run that --resume cannot continue (its latest checkpoint is at --max_iters or
    later), or None; reads the checkpoints' folder and writes nothing."""
    manager = checkpoint_manager(out_dir, keep)
    latest = manager.latest_step()
    manager.close()
    return latest if latest is not None and latest >= max_iters else None


def model_params(params, n_vocab):
    """NumPy params of a model folder: a padded --vocab_size cut back to the tokenizer's n_vocab."""
    import jax

    return {**jax.tree.map(np.asarray, params), "wte": np.asarray(params["wte"])[:n_vocab]}


def run_hparams(ckpt_dir, config):
    """The hparams of a run (its config.json's) as those of a model folder: a padded --vocab_size is cut
    back to the run's vocabulary."""
    return {**config["hparams"], "n_vocab": len(load_encoder(ckpt_dir).encoder)}


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
