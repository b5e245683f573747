"""What each mesh costs for one 124M train step, read from the compiled step: no cluster needed.

    python bench/scale.py [--block_size 1024] [--batch_size 8] [--n_vocab 50304] [--meshes "dp=8 fsdp=8"]
    python bench/scale.py tpu [--rows 0,1,2] [--attentions math,splash]    # needs libtpu: what fits a TPU chip

The `tpu` table compiles GPT-2's reproduction configs (T=1024, bfloat16, AdamW) for TPU slices with
`aot.compiled_train_step` (what `train_jax.py compile --topology` runs) and shows per chip the
arguments and temporaries against the chip's HBM, for the plain step (--remat none --loss_chunk 0:
every activation and the whole [batch, T, vocab] logits kept) and for the defaults, each with the
attention as the math (the [batch, head, T, T] scores as a matrix) and as Pallas splash attention.

On a machine without accelerators JAX fakes 8 CPU devices. For each mesh the step is compiled (not
run) with train_jax's shardings, and the table shows, per device:
  state     the step's arguments: params + AdamW moments + the batch (memory_analysis)
  temp      the step's scratch memory: activations kept for the backward pass and the gradients
  comm      bytes each device sends per step, counted from the collectives in the compiled HLO (their
            result shapes and replica groups, as a ring would move them: an all-reduce of S bytes
            over n devices sends 2 S (n-1)/n, an all-gather producing S sends S (n-1)/n, a
            reduce-scatter producing S sends S (n-1), an all-to-all S (n-1)/n, a permute S);
            cost_analysis() has no collective bytes
  GFLOP     the step's floating-point work on one device (cost_analysis)
"""

import math
import os
import re
import sys

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train_jax  # noqa: E402
import aot  # noqa: E402
import formats  # noqa: E402
from cli import UserError  # noqa: E402
from sharding import GiB, device_mesh, memory_per_device, parse_mesh, topology_devices  # noqa: E402
from step import resolve_remat  # noqa: E402

GPT2_124M = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12}
PADDED_VOCAB = 50304  # nanoGPT's: a multiple of 64, so tp splits wte (50257 divides by no tp; wte is then replicated over tp)
MESHES = ("", "dp=8", "fsdp=8", "dp=2,tp=4", "fsdp=4,tp=2", "dp=2,fsdp=2,tp=2")
OPTIMIZER = dict(
    learning_rate=6e-4, min_lr=6e-5, warmup_iters=2000, lr_decay_iters=600000, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0
)  # nanoGPT's for GPT-2 124M
COLLECTIVE = re.compile(r"= (.*?) (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\((.*)")
ARRAY_TYPE = re.compile(r"\b(pred|bf16|[fsu]\d+)\[([\d,]*)\]")
RING_SHARE = {  # bytes a device sends, per byte of the collective's result, in a group of n
    "all-reduce": lambda n: 2 * (n - 1) / n,
    "all-gather": lambda n: (n - 1) / n,
    "reduce-scatter": lambda n: n - 1,
    "all-to-all": lambda n: (n - 1) / n,
    "collective-permute": lambda n: 1,
}
MiB = 2**20


def type_bytes(hlo_type):
    """The bytes of an HLO result type such as `f32[768,2304]{1,0}` or a tuple of them."""
    item = lambda dtype: 1 if dtype == "pred" else 2 if dtype == "bf16" else int(dtype[1:]) // 8
    return sum(item(dtype) * math.prod(int(d) for d in dims.split(",") if d) for dtype, dims in ARRAY_TYPE.findall(hlo_type))


def group_size(attributes, n_devices):
    """How many devices take part in each group of a collective, from its replica_groups."""
    if explicit := re.search(r"replica_groups=\{\{([\d,]*)\}", attributes):  # {{0,2},{1,3}}
        return len(explicit[1].split(","))
    if iota := re.search(r"replica_groups=\[\d+,(\d+)\]", attributes):  # [4,2]<=[8]: 4 groups of 2
        return int(iota[1])
    if mesh := re.search(r"replica_groups=mesh\[([^\]]*)\].*?\{([^}]*)\}", attributes):  # mesh['axis_0'=2,..] {'axis_0'}
        sizes = {axis: int(size) for axis, size in re.findall(r"'(\w+)'=(\d+)", mesh[1])}
        return math.prod(sizes[axis] for axis in re.findall(r"'(\w+)'", mesh[2]))
    return n_devices


def sent_bytes(hlo_text, n_devices):
    """{collective: bytes one device sends per step} over the compiled program's collectives."""
    sent = dict.fromkeys(RING_SHARE, 0.0)
    for hlo_type, op, attributes in COLLECTIVE.findall(hlo_text):
        sent[op] += RING_SHARE[op](group_size(attributes, n_devices)) * type_bytes(hlo_type)
    return sent


def model_flags(hparams, **overrides):
    """train_jax's flags for a scratch model of `hparams` with nanoGPT's GPT-2 optimizer."""
    shape = {k: hparams[k] for k in ("n_layer", "n_head", "n_embd")}
    return train_jax.default_flags(**shape, vocab_size=hparams["n_vocab"], block_size=hparams["n_ctx"], **OPTIMIZER, **overrides)


def compiled_step(hparams, spec, batch_size, block_size):
    """The float32 train step (batch_size sequences in all) compiled for the mesh of `spec`, from
    shapes alone (nothing is allocated); no remat, the logits at once."""
    mesh = device_mesh(spec)
    per_rank = batch_size // (mesh.shape["dp"] * mesh.shape["fsdp"])
    flags = model_flags({**hparams, "n_ctx": block_size}, mesh=spec, batch_size=per_rank, remat="none", loss_chunk=0)
    return aot.compiled_train_step(flags, aot.model_shape(flags), mesh), mesh.size


def main(block_size=1024, batch_size=8, n_vocab=PADDED_VOCAB, meshes=MESHES):
    """Print the per-device memory and communication of one 124M train step under each mesh."""
    meshes = meshes.split() if isinstance(meshes, str) else meshes
    hparams = {**GPT2_124M, "n_ctx": block_size, "n_vocab": n_vocab}
    print(f"GPT-2 124M (n_vocab {hparams['n_vocab']}), batch {batch_size} x {block_size} tokens, AdamW float32; per device:")
    columns = ("all-reduce", "all-gather", "red-scatter", "all-to-all", "permute")
    print(f"{'mesh':<18}{'devices':>8}{'state MiB':>11}{'temp MiB':>10}{'comm MiB':>10}" + "".join(f"{c:>12}" for c in columns) + f"{'GFLOP':>8}")
    for spec in meshes:
        compiled, n_devices = compiled_step(hparams, spec, batch_size, block_size)
        memory = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        sent = sent_bytes(compiled.as_text(), n_devices)
        by_op = "".join(f"{sent[op] / MiB:>12.1f}" for op in RING_SHARE)
        print(
            f"{spec or '(one device)':<18}{n_devices:>8}{memory.argument_size_in_bytes / MiB:>11.1f}"
            f"{memory.temp_size_in_bytes / MiB:>10.1f}{sum(sent.values()) / MiB:>10.1f}{by_op}{cost['flops'] / 1e9:>8.0f}",
            flush=True,
        )


PLAIN = {"remat": "none", "loss_chunk": 0}  # the step before --remat and the chunked loss
GPT2_1558M = {**formats.RELEASED_HPARAMS["1558M"], "n_vocab": PADDED_VOCAB}
TPU_ROWS = (  # (name, hparams, topology, mesh, per-chip batch, flags)
    ("124M", GPT2_124M, "v5e:2x2", "dp=4", 24, PLAIN),
    ("124M", GPT2_124M, "v5e:2x2", "dp=4", 32, PLAIN),
    ("124M", GPT2_124M, "v5e:2x2", "dp=4", 64, {}),
    ("1558M", GPT2_1558M, "v5e:2x4", "fsdp=8", 2, PLAIN),
    ("1558M", GPT2_1558M, "v5e:2x4", "fsdp=8", 4, PLAIN),
    ("1558M", GPT2_1558M, "v5e:2x4", "fsdp=8", 8, {}),
)


def tpu(rows=None, attentions=("math", "splash")):
    """Compile TPU_ROWS (or the listed row numbers) for their TPU slices, with each of `attentions`,
    and print what fits a chip."""
    import itertools
    import time

    rows = range(len(TPU_ROWS)) if rows is None else [rows] if isinstance(rows, int) else rows
    attentions = attentions.split(",") if isinstance(attentions, str) else attentions
    print("T=1024, bfloat16, AdamW, vocab 50304; per chip:")
    print(f"{'model':<7}{'topology':<10}{'mesh':<8}{'batch':>6}  {'remat':<6}{'loss_chunk':>11}  {'attention':<10}{'args GiB':>9}{'temp GiB':>10}{'HBM GiB':>9}  {'fits':<5}{'compile s':>10}")
    for row, attention in itertools.product(rows, attentions):
        name, hparams, topology, spec, batch_size, overrides = TPU_ROWS[row]
        shape = {**hparams, "n_ctx": 1024}
        flags = train_jax.check_flags(model_flags(shape, mesh=spec, batch_size=batch_size, dtype="bfloat16", attention=attention, **overrides))
        devices = topology_devices(topology)
        mesh = parse_mesh(spec, devices)
        start = time.perf_counter()
        remat = resolve_remat(flags["remat"], "tpu")
        row = f"{name:<7}{topology:<10}{spec:<8}{batch_size:>6}  {remat:<6}{flags['loss_chunk']:>11}  {attention:<10}"
        try:
            arguments, temporaries, total = aot.step_memory(flags, hparams, mesh)
        except UserError as e:  # the compiler refused the program for a reason other than HBM
            print(f"{row}{'':>9}{'':>10}{'':>9}  no: {e}", flush=True)
            continue
        seconds = time.perf_counter() - start
        hbm = memory_per_device(devices[0], len(devices))
        print(
            f"{row}{'-' if arguments is None else f'{arguments / GiB:.2f}':>9}"
            f"{temporaries / GiB:>10.2f}{hbm / GiB:>9.0f}  {'yes' if total <= hbm else 'no':<5}{seconds:>10.0f}",
            flush=True,
        )


if __name__ == "__main__":
    import fire

    if sys.argv[1:2] == ["tpu"]:
        fire.Fire(tpu, command=sys.argv[2:])
    else:
        fire.Fire(main)
