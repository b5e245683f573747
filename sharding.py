"""Where every array lives on a device mesh: `--mesh dp=2,fsdp=2,tp=2`, partition rules as data, and
the start of a multi-host job.

The mesh has three named axes, outermost first:
  dp    data parallel: every group holds all the weights and a share of the batch; gradients are
        all-reduced once per step.
  fsdp  fully sharded data parallel: a share of the batch and a 1/fsdp slice of every weight and its
        optimizer state; weights are all-gathered where used, gradients reduce-scattered.
  tp    tensor parallel (innermost, so it stays on the fastest links): each block's matmuls are split
        Megatron-style; activations are all-reduced twice per block, forward and backward.
`jax.jit` places the computation from the shardings of its arguments and results; the model code
knows nothing of devices.
"""

import math
import os
import re

from cli import TPU_DEVICE_FILES, UserError, exists
from formats import flatten

AXES = ("dp", "fsdp", "tp")
BATCH_AXES = ("dp", "fsdp")  # the batch is split over both data-parallel axes
# (regex over the '/'-joined param path, PartitionSpec as a tuple of mesh axes per dimension), first
# match wins. Megatron's split over tp: c_attn and c_fc split their output columns (and biases), the
# c_proj's their input rows, so each block all-reduces once after attention and once after the MLP;
# wte splits its vocabulary rows. The rest is replicated. fsdp is added by `partition_spec`.
PARTITION_RULES = (
    (r"/(c_attn|c_fc)/w$", (None, "tp")),
    (r"/(c_attn|c_fc)/b$", ("tp",)),
    (r"/c_proj/w$", ("tp", None)),
    (r"^wte$", ("tp", None)),
    (r".*", ()),
)
MESH_EXAMPLE = "dp=2,fsdp=2,tp=2"


def map_paths(function, params):
    """A tree like `params` of `function(path, leaf)` at each leaf, its path '/'-joined as `flatten`'s."""
    import jax

    path_of = lambda keys: jax.tree_util.keystr(keys, simple=True, separator="/")
    return jax.tree_util.tree_map_with_path(lambda keys, leaf: function(path_of(keys), leaf), params)


def match_rules(rules, params):
    """A tree like `params` (a list of blocks, or training's stacked block) holding, for each leaf, the
    value of the first rule whose regex matches its '/'-joined path (the weight-decay mask and the
    partition specs both come from this)."""
    return map_paths(lambda path, _: next(value for pattern, value in rules if re.search(pattern, path)), params)


# ---------------------------------------------------------------------------------------------
# The mesh


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def mesh_sizes(spec, n_devices):
    """{'dp': .., 'fsdp': .., 'tp': ..} of a spec like 'dp=2,tp=4': absent axes are 1, one axis may be
    -1 (the devices left over), and the sizes multiply to `n_devices`."""
    sizes = dict.fromkeys(AXES, 1)
    for part in str(spec).split(","):
        axis, _, size = part.partition("=")
        axis = axis.strip()
        if axis not in AXES:
            raise UserError(
                f"unknown mesh axis {axis!r} in --mesh {spec}: the axes are dp, fsdp and tp, e.g. --mesh {MESH_EXAMPLE}"
            )
        if not re.fullmatch(r"\s*(-1|[1-9]\d*)\s*", size):
            raise UserError(f"--mesh {spec}: give {axis} a positive number of devices (or -1 for the rest), e.g. {axis}=2")
        sizes[axis] = int(size)
    rest = [axis for axis in AXES if sizes[axis] == -1]
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if len(rest) > 1:
        raise UserError(f"--mesh {spec}: only one axis can be -1 (the devices left over)")
    if rest and n_devices % fixed == 0:
        sizes[rest[0]] = n_devices // fixed
    if math.prod(sizes.values()) != n_devices:
        used = f"the other axes use {fixed}" if rest else f"uses {fixed}"
        raise UserError(
            f"--mesh {spec} {used} devices but there are {n_devices}: make the sizes multiply to {n_devices} "
            f"(each a divisor of it: {', '.join(map(str, divisors(n_devices)))}), e.g. --mesh dp={n_devices}"
            + (" or dp=-1,tp=2" if n_devices % 2 == 0 else "")
        )
    return sizes


def parse_mesh(spec, devices):
    """The `jax.sharding.Mesh` of `spec` over `devices`, with axes (dp, fsdp, tp)."""
    from jax.experimental import mesh_utils
    from jax.sharding import Mesh

    sizes = mesh_sizes(spec, len(devices))
    return Mesh(mesh_utils.create_device_mesh([sizes[axis] for axis in AXES], devices), AXES)


def device_mesh(spec):
    """The mesh of `spec` over all the job's devices; without a spec, the first device alone."""
    import jax

    if spec:
        return parse_mesh(spec, jax.devices())
    if jax.process_count() > 1:
        n_devices, n_processes = jax.device_count(), jax.process_count()
        raise UserError(f"this job has {n_devices} devices in {n_processes} processes: give --mesh, e.g. --mesh dp=-1")
    return parse_mesh("dp=1", jax.devices()[:1])


def check_fits(mesh, hparams):
    """The model's heads (and so its widths) split evenly over tp."""
    tp, n_head = mesh.shape["tp"], hparams["n_head"]
    if n_head % tp:
        fits = [d for d in divisors(mesh.size) if n_head % d == 0]
        raise UserError(
            f"--mesh tp={tp} does not divide n_head={n_head} (tp splits the heads and the widths n_embd, "
            f"3*n_embd, 4*n_embd): use tp in {', '.join(map(str, fits))}"
        )


# ---------------------------------------------------------------------------------------------
# Devices to compile for: this process's, or a TPU slice described by libtpu (no TPU needed)

GiB = 2**30
# generation: (device_kind, HBM per chip, torus dimensions, TensorCores per chip that GCP names count)
TPU_CHIPS = {
    "v4": ("TPU v4", 32 * GiB, 3, 2),
    "v5p": ("TPU v5", 95 * GiB, 3, 2),
    "v5e": ("TPU v5 lite", 16 * GiB, 2, 1),
    "v6e": ("TPU v6 lite", 32 * GiB, 2, 1),
}
GCP_GENERATIONS = {"v4": "v4", "v5p": "v5p", "v5litepod": "v5e", "v6e": "v6e"}  # GCP's accelerator type prefixes
TOPOLOGY_EXAMPLES = "v5e:2x2, v4:2x2x1, v5p:2x2x1, v6e:2x2, v5litepod-8, v4-32 or local"


def torus(n_chips, n_dims):
    """GCP's slice shape of n_chips: 2x2(x1), then the smallest dimension (the last of equals) doubled."""
    if n_chips == 1:
        return [1] * n_dims
    dims = [2, 2, 1][:n_dims]
    while math.prod(dims) < n_chips:
        smallest = max(i for i, d in enumerate(dims) if d == min(dims))
        dims[smallest] *= 2
    return dims if math.prod(dims) == n_chips else None


def tpu_topology(name):
    """(generation, topology) of a TPU topology (v5e:2x2) or a GCP accelerator type (v5litepod-8,
    v4-32: v4 and v5p count TensorCores, two per chip)."""
    if match := re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+)+)", name):
        generation, dims = match[1], match[2].split("x")
        if len(dims) == TPU_CHIPS[generation][2]:
            return generation, name
    if match := re.fullmatch(r"(v4|v5p|v5litepod|v6e)-(\d+)", name):
        generation = GCP_GENERATIONS[match[1]]
        _, _, n_dims, cores = TPU_CHIPS[generation]
        dims = torus(int(match[2]) // cores, n_dims) if int(match[2]) % cores == 0 else None
        if dims:
            return generation, f"{generation}:{'x'.join(map(str, dims))}"
    raise UserError(f"unknown --topology {name!r}: give a TPU topology or GCP accelerator type, e.g. {TOPOLOGY_EXAMPLES}")


def accelerator_type(generation, topology):
    """GCP's accelerator type of a topology: v5e:2x2 -> v5litepod-4, v4:2x2x1 -> v4-8 (TensorCores)."""
    n_chips = math.prod(int(d) for d in topology.split(":")[1].split("x"))
    prefix = next(prefix for prefix, gen in GCP_GENERATIONS.items() if gen == generation)
    return f"{prefix}-{n_chips * TPU_CHIPS[generation][3]}"


def topology_devices(name):
    """The devices to compile for: 'local' (this process's), or those of a TPU slice as libtpu
    describes it; each TPU chip is one device, as JAX uses them (megacore on v4 and v5p)."""
    import importlib.util

    import jax

    if name == "local":
        return jax.devices()
    generation, topology = tpu_topology(str(name))
    if importlib.util.find_spec("libtpu") is None:
        raise UserError(f"--topology {name} needs libtpu to compile for TPUs: pip install -e \".[tpu]\" (or pip install libtpu)")
    from jax.experimental import topologies

    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # no TPU VM metadata to ask
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other JAX processes here hold libtpu's lock file
    if not exists(TPU_DEVICE_FILES):  # libtpu warns that it cannot tell this host's TPU: name the slice compiled for
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type(generation, topology))
    megacore = {"chip_config_name": "megacore"} if TPU_CHIPS[generation][2] == 3 else {}
    return topologies.get_topology_desc(topology, "tpu", **megacore).devices


def memory_per_device(device, n_devices):
    """The bytes one device holds: a TPU chip's HBM, a GPU's allocator limit, or for JAX's (faked)
    CPU devices an equal share of the host's memory."""
    if device.platform == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // n_devices
    kinds = {kind: hbm for kind, hbm, _, _ in TPU_CHIPS.values()}
    if device.platform == "tpu" and device.device_kind in kinds:
        return kinds[device.device_kind]
    return device.memory_stats()["bytes_limit"]


# ---------------------------------------------------------------------------------------------
# Shardings


def partition_spec(spec, shape, mesh_shape):
    """The rule's spec fitted to an array of `shape`: an axis of size 1, or one that does not divide
    its dimension, is dropped (that dimension is replicated), then fsdp takes the largest free
    dimension it divides."""
    from jax.sharding import PartitionSpec

    spec = [*spec, *[None] * (len(shape) - len(spec))]
    spec = [axis if axis and mesh_shape[axis] > 1 and size % mesh_shape[axis] == 0 else None for axis, size in zip(spec, shape)]
    free = [i for i, (axis, size) in enumerate(zip(spec, shape)) if axis is None and size % mesh_shape["fsdp"] == 0]
    if mesh_shape["fsdp"] > 1 and free:
        spec[max(free, key=lambda i: shape[i])] = "fsdp"
    return PartitionSpec(*spec)


def param_shardings(params, mesh, rules=PARTITION_RULES):
    """A tree like `params` (arrays or shapes) of the `NamedSharding` each parameter gets. Training's
    stacked blocks ([n_layer, ...] each) get each layer's sharding behind a whole layer axis: fsdp
    splits a weight's own dimensions, so a layer is gathered alone."""
    from jax.sharding import NamedSharding, PartitionSpec

    specs = flatten(match_rules(rules, params))
    stacked = isinstance(params["blocks"], dict)

    def sharding(path, leaf):
        layer_axes = 1 if stacked and path.startswith("blocks/") else 0
        spec = partition_spec(specs[path], leaf.shape[layer_axes:], mesh.shape)
        return NamedSharding(mesh, PartitionSpec(*[None] * layer_axes, *spec))

    return map_paths(sharding, params)


def layer_sharding(sharding):
    """The sharding of one layer of a stacked weight: the stacked one without its (whole) layer axis;
    one device's, or none, as it is."""
    from jax.sharding import NamedSharding, PartitionSpec

    return NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:])) if isinstance(sharding, NamedSharding) else sharding


def state_shardings(state, optimizer, mesh):
    """The train state's shardings: each optimizer moment follows its parameter, counts and the
    random key are replicated. `state` may be abstract (`jax.eval_shape`). A moment of a group of
    params (optax.partition's) holds an empty MaskedNode where the params outside it are; it stays."""
    import optax
    from jax.sharding import NamedSharding, PartitionSpec

    params = param_shardings(state["params"], mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    masked = lambda leaf: isinstance(leaf, optax.MaskedNode)
    follow = lambda leaf, sharding: leaf if masked(leaf) else sharding
    opt_state = optax.tree_map_params(optimizer, follow, state["opt_state"], params, transform_non_params=lambda _: replicated, is_leaf=masked)
    return {"params": params, "opt_state": opt_state, "key": replicated}


def gathered(shardings):
    """The shardings weights are computed with: fsdp's slices gathered (their gradients are reduced
    back into the slices), tp's split kept. Left to itself, XLA splits the activations along the
    weights' fsdp dimension instead, which sends several times the weights' bytes (bench/scale.py)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    drop_fsdp = lambda s: NamedSharding(s.mesh, PartitionSpec(*[None if axis == "fsdp" else axis for axis in s.spec]))
    return jax.tree.map(drop_fsdp, shardings)


def batch_sharding(mesh, ndim, axis):
    """Arrays of `ndim` dimensions split along `axis` over (dp, fsdp)."""
    from jax.sharding import NamedSharding, PartitionSpec

    return NamedSharding(mesh, PartitionSpec(*[BATCH_AXES if i == axis else None for i in range(ndim)]))


def place(tree, shardings):
    """Host arrays put on their devices, each process copying only the shards its devices hold: no
    device ever holds more than its shard."""
    import jax

    to_device = lambda a, sharding: jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])
    return jax.tree.map(to_device, tree, shardings)


def sharded_params(params, spec, hparams, dtype):
    """Host params placed on the mesh of `spec` by the partition rules, then cast to `dtype`."""
    import jax

    mesh = device_mesh(spec)
    check_fits(mesh, hparams)
    return jax.tree.map(lambda a: a.astype(dtype), place(params, param_shardings(params, mesh)))


def process_rows(sharding, shape, axis):
    """The slice of `axis` this process's devices hold (one range: the mesh keeps a process's
    devices together, with tp innermost)."""
    ranges = [index[axis].indices(shape[axis]) for index in sharding.addressable_devices_indices_map(shape).values()]
    return slice(min(start for start, _, _ in ranges), max(stop for _, stop, _ in ranges))


# ---------------------------------------------------------------------------------------------
# Multi-host


def initialize_distributed(coordinator_address="", num_processes=1, process_id=0):
    """Join a multi-host job: the one the flags describe, or the one JAX detects from the
    environment (a TPU pod slice, SLURM, Open MPI); run alone when there is none."""
    import jax

    if jax.distributed.is_initialized():
        return
    if not coordinator_address and (num_processes, process_id) != (1, 0):
        raise UserError("--num_processes and --process_id need --coordinator_address HOST:PORT of process 0")
    if not coordinator_address:
        try:
            jax.distributed.initialize()
        except (ValueError, RuntimeError):  # no cluster in the environment, or JAX already running here
            pass
        return
    if not re.fullmatch(r"[^\s:]+:\d+", str(coordinator_address)):
        raise UserError(f"--coordinator_address {coordinator_address!r} must be HOST:PORT of process 0, e.g. 10.0.0.1:1234")
    if type(num_processes) is not int or type(process_id) is not int or not 0 <= process_id < num_processes:
        raise UserError(
            f"--process_id {process_id!r} must be an integer from 0 to --num_processes - 1 ({num_processes!r}): "
            f"give each process its own index"
        )
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
