"""Fused attention kernels that take gpt2.attention's arguments, and which one --attention runs where:
jax.nn.dot_product_attention (XLA's, or cuDNN's flash attention on NVIDIA GPUs) and Pallas splash
attention on TPUs. A fused kernel never holds the [batch, head, T, T] scores in memory.

gpt2.attention stays the math and the reference; `resolve_attention` picks a kernel for a device, and
`attention_kernel` returns it, run on each device's share of the batch and heads on a mesh.
"""

import functools
import math

import numpy as np

from cli import UserError
from sharding import BATCH_AXES

# --attention: auto, the math (gpt2.attention), or a kernel of KERNELS.
ATTENTION = ("auto", "math", "xla", "cudnn", "splash")
AUTO = {"cuda": "cudnn", "tpu": "splash"}  # what auto runs where it can, by accelerator; the math elsewhere
SPLASH_BLOCK = 512  # splash's tile of query and key positions (the largest that divides T, down to 128)


def is_causal(mask):  # [n_q, n_k]
    """Whether `mask` is known while tracing (a NumPy array, as gpt2.mha makes it for whole sequences)
    to be the causal mask of n_q queries over as many keys: a kernel then skips the hidden blocks."""
    return isinstance(mask, np.ndarray) and mask.shape[0] == mask.shape[1] and np.array_equal(mask, np.tri(len(mask), dtype=bool))


def heads_minor(x):  # [..., n_head, n, d] -> [batch, n, n_head, d]
    return x.reshape(-1, *x.shape[-3:]).swapaxes(1, 2)


def dot_product(q, k_t, v, mask, rate=0.0, key=None, implementation="xla"):  # [..., n_head, n_q, d], [..., n_head, d, n_k], [..., n_head, n_k, d], [n_q, n_k]
    """gpt2.attention by jax.nn.dot_product_attention: XLA's (any device), or cuDNN's flash attention.
    A causal mask known while tracing becomes `is_causal`, whose hidden blocks cuDNN skips; any other
    mask (generation's, which moves with each token) is passed as it is."""
    import jax

    if rate:
        raise ValueError("a fused kernel has no dropout (resolve_attention runs the math for a --dropout)")
    causal = is_causal(mask)
    n_head, n_q, _ = q.shape[-3:]
    masks = None if causal else jax.numpy.broadcast_to(mask, (1, n_head, *mask.shape))  # [1, n_head, n_q, n_k]: cuDNN's vmap takes every head's
    out = jax.nn.dot_product_attention(
        heads_minor(q), heads_minor(k_t.swapaxes(-1, -2)), heads_minor(v), mask=masks, is_causal=causal, implementation=implementation
    )  # [batch, n_q, n_head, d]
    return out.swapaxes(1, 2).reshape(q.shape)


def splash(q, k_t, v, mask, rate=0.0, key=None, interpret=False):  # [..., n_head, n_q, d], [..., n_head, d, n_k], [..., n_head, n_k, d], [n_q, n_k]
    """gpt2.attention by Pallas splash attention, a TPU kernel (on other devices `interpret` runs its
    Python): the scores a tile of positions at a time, skipping the tiles the mask hides. The mask must
    be known while tracing, and n_q and n_k multiples of 128."""
    import jax
    from jax.experimental.pallas.ops.tpu import splash_attention

    if rate or not isinstance(mask, np.ndarray):
        raise ValueError("splash has no dropout, and takes a mask known while tracing (resolve_attention runs the math otherwise)")
    n_head, n_q, d = q.shape[-3:]
    head_mask = splash_attention.CausalMask(mask.shape) if is_causal(mask) else splash_attention.NumpyMask(mask)
    block = math.gcd(SPLASH_BLOCK, *mask.shape)
    tiles = ("block_q", "block_kv", "block_kv_compute", "block_q_dkv", "block_kv_dkv", "block_kv_dkv_compute", "block_q_dq", "block_kv_dq")
    blocks = splash_attention.BlockSizes(**dict.fromkeys(tiles, block))  # the forward's, dK and dV's, dQ's
    kernel = splash_attention.make_splash_mha(
        splash_attention.MultiHeadMask([head_mask] * n_head), head_shards=1, q_seq_shards=1, block_sizes=blocks, interpret=interpret
    )
    flat = lambda x: x.reshape(-1, *x.shape[-3:])  # [batch, n_head, n, d]
    out = jax.vmap(kernel)(flat(q / math.sqrt(d)), flat(k_t.swapaxes(-1, -2)), flat(v))  # splash does not scale the scores
    return out.reshape(q.shape)


KERNELS = {"xla": functools.partial(dot_product, implementation="xla"), "cudnn": functools.partial(dot_product, implementation="cudnn"), "splash": splash}


def per_shard(kernel, mesh):
    """`kernel` run by shard_map on each device's share of the batch (dp, fsdp) and of the heads (tp):
    a fused kernel is one custom call, which XLA's partitioner would otherwise run on whole arrays."""
    import jax
    from jax.sharding import PartitionSpec

    spec = PartitionSpec(BATCH_AXES, "tp")  # [batch, n_head, ...]

    def attention(q, k_t, v, mask, rate=0.0, key=None):  # [batch, n_head, ...]
        local = lambda q, k_t, v: kernel(q, k_t, v, mask, rate, key)
        return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(q, k_t, v)

    return attention


def attention_kernel(name, mesh=None, interpret=False):
    """The fused kernel `name` (a key of KERNELS), with gpt2.attention's arguments; on a `mesh` of
    several devices, run per shard. `interpret` runs splash's Python instead of compiling it for a TPU."""
    kernel = functools.partial(splash, interpret=interpret) if name == "splash" else KERNELS[name]
    return per_shard(kernel, mesh) if mesh is not None and mesh.size > 1 else kernel


def accelerator(device):
    """'cuda' for an NVIDIA GPU, else the device's platform: cpu, tpu, or gpu (ROCm)."""
    cuda = device.platform == "gpu" and "cuda" in str(getattr(device.client, "platform_version", "")).lower()
    return "cuda" if cuda else device.platform


def why_not(name, device, dtype, dropout, head_dim, n_seq):
    """Why the kernel `name` cannot run on `device` for these shapes (None: it can). `n_seq` is None in
    generation."""
    if dropout:
        return "it has no dropout: give --dropout 0, or --attention math"
    if name == "cudnn":
        if accelerator(device) != "cuda":
            return f"cuDNN's flash attention needs an NVIDIA GPU, and this is {device.device_kind!r} ({device.platform})"
        capability = tuple(int(part) for part in str(device.compute_capability).split("."))
        if capability < (8, 0):
            return f"cuDNN's flash attention needs an Ampere GPU or newer (compute capability 8.0), and the {device.device_kind} is {device.compute_capability}"
        if dtype != "bfloat16":
            return f"cuDNN's flash attention takes 16-bit inputs: give --dtype bfloat16, not {dtype}"
        largest = 256 if capability >= (9, 0) else 128
        if head_dim % 8 or head_dim > largest:
            return f"cuDNN's flash attention takes heads of a multiple of 8 up to {largest} wide on the {device.device_kind}, and n_embd / n_head is {head_dim}"
    if name == "splash":
        if device.platform != "tpu":
            return f"splash attention is a TPU kernel, and this is {device.device_kind!r} ({device.platform})"
        if n_seq is None:
            return "splash takes the fixed causal mask of training; generation's moves with each token"
        if n_seq % 128:
            return f"splash's tiles are multiples of 128 positions: give a --block_size that is one, not {n_seq}"
    return None


def check_attention(choice):
    if choice not in ATTENTION:
        raise UserError(f"unknown --attention {choice!r}: use {', '.join(ATTENTION)}")
    return choice


def resolve_attention(choice, device, dtype, dropout=0.0, head_dim=64, n_seq=None):
    """What --attention `choice` runs on `device` with --dtype `dtype`, --dropout `dropout`, heads of
    `head_dim` and sequences of `n_seq` (None: generation's): math, xla, cudnn or splash. auto is cudnn
    on an NVIDIA GPU and splash on a TPU where they can run, the math elsewhere (a CPU has no fused
    kernel: XLA's is the same math); a choice that cannot run is a UserError saying why."""
    if check_attention(choice) == "auto":
        preferred = AUTO.get(accelerator(device))
        return preferred if preferred and why_not(preferred, device, dtype, dropout, head_dim, n_seq) is None else "math"
    reason = None if choice == "math" else why_not(choice, device, dtype, dropout, head_dim, n_seq)
    if reason:
        raise UserError(f"--attention {choice} cannot run here: {reason} (auto picks what can)")
    return choice
