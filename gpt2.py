"""GPT-2 as pure functions over OpenAI's checkpoint dict, one code path for NumPy and JAX.

Every function takes arrays of either library and computes with the library the arrays belong to
(`x.__array_namespace__()`), so `jax.jit`, `jax.grad` and `jax.vmap` apply to the same code the
NumPy reference runs. Scalars are Python floats: they never promote float32 to float64.
"""

import codecs
import functools
import itertools
import math
import os

import numpy as np

from cli import UserError, check_folder, check_positive_int, check_seed, log, run_cli
from formats import flatten, unflatten
from fused import attention_kernel, check_attention, resolve_attention
from sharding import sharded_params
from utils import encode_prompt, load_encoder_hparams_and_params

BACKENDS = ("jax", "numpy")
DTYPES = {"jax": ("float32", "bfloat16"), "numpy": ("float32",)}  # NumPy has no fast bfloat16 matmul
SEPARATOR = "-" * 40  # between the texts of several prompts


def xp_of(x):
    """numpy or jax.numpy: the array library of `x`."""
    return x.__array_namespace__()


def gelu(x):
    return 0.5 * x * (1 + xp_of(x).tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def softmax(x):
    exp_x = xp_of(x).exp(x - x.max(axis=-1, keepdims=True))
    return exp_x / exp_x.sum(axis=-1, keepdims=True)


def layer_norm(x, g, b, eps=1e-5):  # [..., n_embd] -> [..., n_embd]
    mean = x.mean(axis=-1, keepdims=True)  # [..., 1]
    variance = x.var(axis=-1, keepdims=True)  # [..., 1]
    return g * (x - mean) / xp_of(x).sqrt(variance + eps) + b


def linear(x, b, w=None, w_t=None):  # [..., n_in] @ [n_in, n_out] + [n_out] -> [..., n_out]
    """One 2-D matmul over all leading axes: for a batched one, XLA copies the activations into a
    transposed layout to compute the weight gradient. `w_t` is w kept transposed, [n_out, n_in] (see
    to_backend), read in place as unembed reads wte."""
    rows = x.reshape(-1, x.shape[-1])  # [rows, n_in]
    out = rows @ w if w_t is None else (w_t @ rows.T).T  # [rows, n_out]
    return (out + b).reshape(*x.shape[:-1], out.shape[-1])


def ffn(x, c_fc, c_proj):  # [..., n_seq, n_embd] -> [..., n_seq, n_embd]
    return linear(gelu(linear(x, **c_fc)), **c_proj)  # [..., n_seq, 4*n_embd] in between


def dropout(x, rate, key):
    """Inverted dropout during training (a JAX key and rate > 0); the identity otherwise."""
    if key is None or rate == 0.0:
        return x
    import jax

    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return xp_of(x).where(keep, x / (1.0 - rate), 0.0)


def split_key(key, n):
    if key is None:
        return [None] * n
    import jax

    return list(jax.random.split(key, n))


def write_at(buffer, values, start, axis):  # buffer <- values at start.. along axis
    """The cache update: in place for NumPy, `dynamic_update_slice` for JAX (in place when donated)."""
    if isinstance(buffer, np.ndarray):
        buffer[(slice(None),) * (axis % buffer.ndim) + (slice(start, start + values.shape[axis]),)] = values
        return buffer
    from jax import lax

    return lax.dynamic_update_slice_in_dim(buffer, values.astype(buffer.dtype), start, axis=axis)


def attention(q, k_t, v, mask, rate=0.0, key=None):  # [..., n_head, n_q, d], [..., n_head, d, n_k], [..., n_head, n_k, d], [n_q, n_k]
    scores = q @ k_t / math.sqrt(q.shape[-1])  # [..., n_head, n_q, n_k]
    return dropout(softmax(xp_of(q).where(mask, scores, -1e10)), rate, key) @ v  # [..., n_head, n_q, d]


def attention_of(name, mesh=None):
    """What a resolved --attention `name` runs (fused.resolve_attention): `attention` above for math,
    or a fused kernel that takes the same arguments (on a `mesh`, run on each device's share)."""
    return attention if name == "math" else attention_kernel(name, mesh)


def mha(x, c_attn, c_proj, n_head, kv_cache=None, start=0, pad=0, rate=0.0, key=None, attention=attention):  # [..., n_new, n_embd] -> same
    """Self-attention of n_new tokens in slots start.. of each sequence; with a cache, k and v are
    written into its fixed-size buffers and each query attends to the slots from `pad` (left padding)
    up to its own. `attention` is the function above or a fused kernel (attention_of)."""
    *batch, n_new, n_embd = x.shape
    xp = xp_of(x)
    qkv = linear(x, **c_attn)  # [..., n_new, 3*n_embd]
    heads_of = qkv.reshape(*batch, n_new, 3, n_head, n_embd // n_head)  # [..., n_new, 3, n_head, d]
    q, k, v = xp.moveaxis(heads_of, (-3, -2), (0, -3))  # 3 x [..., n_head, n_new, d]
    k_t = k.swapaxes(-1, -2)  # [..., n_head, d, n_new]
    if kv_cache is not None:  # K is kept transposed so that q @ k_t reads it in place
        k_t, v = kv_cache = (write_at(kv_cache[0], k_t, start, -1), write_at(kv_cache[1], v, start, -2))
    # NumPy's aranges: with int start and pad (a whole sequence, as training runs it) the mask is NumPy
    # too, so a fused kernel sees while tracing that it is causal; traced ones make it traced.
    slot = np.arange(v.shape[-2])[None, :]  # [1, n_k]
    causal = (pad <= slot) & (start + np.arange(n_new)[:, None] >= slot)  # [n_new, n_k]
    heads = attention(q, k_t, v, causal, rate, key)  # [..., n_head, n_new, d]
    return linear(xp.moveaxis(heads, -3, -2).reshape(*batch, n_new, n_embd), **c_proj), kv_cache


def transformer_block(x, mlp, attn, ln_1, ln_2, n_head, kv_cache=None, start=0, pad=0, rate=0.0, key=None, attention=attention):
    """[..., n_new, n_embd] -> [..., n_new, n_embd], and the block's updated cache."""
    attn_key, resid_1, resid_2 = split_key(key, 3)
    x_1 = layer_norm(x, **ln_1)  # [..., n_new, n_embd]
    a, kv_cache = mha(x_1, **attn, n_head=n_head, kv_cache=kv_cache, start=start, pad=pad, rate=rate, key=attn_key, attention=attention)
    x = x + dropout(a, rate, resid_1)
    return x + dropout(ffn(layer_norm(x, **ln_2), **mlp), rate, resid_2), kv_cache


def embed(inputs, wte, wpe, start=0, pad=0):  # [..., n_new] -> [..., n_new, n_embd]
    """Token plus position embeddings of the tokens in slots start.., at positions slot - pad."""
    xp = xp_of(wte)
    positions = xp.maximum(start - pad + xp.arange(inputs.shape[-1]), 0)  # [n_new], padding at 0
    return wte[inputs] + wpe[positions]


def hidden_states(inputs, wte, wpe, blocks, ln_f, n_head, cache=None, start=0, pad=0, rate=0.0, key=None, block=transformer_block):
    """[..., n_new] -> the final layer-normed states [..., n_new, n_embd] of one sequence or of a batch,
    and the updated cache (None without one). `block` is `transformer_block` or a function that wraps
    it (training runs all the layers as one block of stacked weights, see step.scanned_blocks)."""
    embd_key, *block_keys = split_key(key, len(blocks) + 1)
    x = dropout(embed(inputs, wte, wpe, start, pad), rate, embd_key)  # [..., n_new, n_embd]
    new_cache = []
    for weights, kv_cache, block_key in zip(blocks, cache or [None] * len(blocks), block_keys):
        x, kv_cache = block(x, **weights, n_head=n_head, kv_cache=kv_cache, start=start, pad=pad, rate=rate, key=block_key)
        new_cache.append(kv_cache)
    return layer_norm(x, **ln_f), None if cache is None else new_cache


def unembed(h, wte):  # [..., n_new, n_embd] -> [..., n_new, n_vocab]
    rows = h.reshape(-1, h.shape[-1])  # [batch * n_new, n_embd]
    return (wte @ rows.T).T.reshape(*h.shape[:-1], wte.shape[0])  # [n_vocab, n_embd] @ [n_embd, ...]: no copy of wte.T


def gpt2(inputs, wte, wpe, blocks, ln_f, n_head, cache=None, start=0, pad=0, rate=0.0, key=None, block=transformer_block):  # [..., n_new] -> [..., n_new, n_vocab]
    """Logits for the tokens in slots start..start+n_new-1, at positions slot - pad (`pad` slots of
    left padding let a batch share its slots), of one sequence or of a batch ([batch, n_new] inputs,
    as training runs it). With `cache` (see empty_cache) it returns (logits, updated cache). `rate`
    and a JAX `key` turn on dropout; `block` is hidden_states'."""
    h, new_cache = hidden_states(inputs, wte, wpe, blocks, ln_f, n_head, cache, start, pad, rate, key, block)  # [..., n_new, n_embd]
    logits = unembed(h, wte)  # [..., n_new, n_vocab]
    return logits if cache is None else (logits, new_cache)


def empty_cache(params, n_head, n_max):
    """Zeroed buffers for n_max slots in every block, in the params' array library and dtype:
    (k transposed [n_head, d, n_max], v [n_head, n_max, d])."""
    xp = xp_of(params["wte"])
    d = params["wte"].shape[1] // n_head
    zeros = functools.partial(xp.zeros, dtype=params["wte"].dtype)
    return [(zeros((n_head, d, n_max)), zeros((n_head, n_max, d))) for _ in params["blocks"]]


def last_logits(h, wte, ln_f):  # [..., n_new, n_embd] -> [..., n_vocab]
    """The logits after the last of the final states (layer-normed here)."""
    return unembed(layer_norm(h[..., -1:, :], **ln_f), wte)[..., 0, :]


def prefill(params, inputs, pad, n_head, n_max, block=transformer_block, embed=embed, head=last_logits):  # [n_slots] -> [n_vocab], cache
    """Run the prompt, left-padded with `pad` slots, into a fresh cache of n_max slots; return the
    logits after its last token. One call per stage and layer: jax_programs passes compiled ones."""
    x, cache = embed(inputs, params["wte"], params["wpe"], 0, pad), []  # [n_slots, n_embd]
    for weights, kv_cache in zip(params["blocks"], empty_cache(params, n_head, n_max)):
        x, kv_cache = block(x, **weights, n_head=n_head, kv_cache=kv_cache, start=0, pad=pad)
        cache.append(kv_cache)
    return head(x, params["wte"], params["ln_f"]), cache


def decode(params, token, cache, slot, pad, n_head, block=transformer_block):  # [1] -> [n_vocab], cache
    logits, cache = gpt2(token, **params, n_head=n_head, cache=cache, start=slot, pad=pad, block=block)
    return logits[0], cache


def filter_logits(logits, top_k=0, top_p=1.0):  # [..., n_vocab] -> [..., n_vocab]
    """-inf outside the top_k most likely tokens (0: all) and outside the smallest set of most likely
    tokens whose probability reaches top_p (1.0: all)."""
    xp = xp_of(logits)
    if top_k > 0:
        kth_largest = xp.sort(logits, axis=-1)[..., -top_k, None]  # [..., 1]
        logits = xp.where(logits < kth_largest, -math.inf, logits)
    if top_p < 1.0:
        descending = -xp.sort(-logits, axis=-1)  # [..., n_vocab]
        probs = softmax(descending)  # [..., n_vocab]
        mass_before = xp.cumsum(probs, axis=-1) - probs  # [..., n_vocab] of the strictly likelier tokens
        n_keep = (mass_before < top_p).sum(axis=-1, keepdims=True)  # [..., 1], at least 1
        threshold = xp.take_along_axis(descending, n_keep - 1, axis=-1)  # [..., 1]
        logits = xp.where(logits < threshold, -math.inf, logits)
    return logits


def next_token(logits, temperature=0.0, top_k=0, top_p=1.0, gumbel=None):  # [..., n_vocab] -> [...]
    """Greedy at temperature 0; otherwise a sample of softmax(filtered logits / temperature), drawn
    as argmax(logits / temperature + Gumbel noise), so the backends differ only in their noise."""
    if temperature == 0.0:
        return logits.argmax(axis=-1)
    return (filter_logits(logits, top_k, top_p) / temperature + gumbel).argmax(axis=-1)


@functools.lru_cache(maxsize=16)  # a long-lived process keeps the programs of its last 16 shapes
def jax_programs(n_head, n_max, batch, temperature, top_k, top_p, attention="math"):
    """The jitted prefill and decode step for one shape, sampling setting and resolved --attention, made
    once. Each block is a jitted call, traced once for all the layers instead of once per layer (1558M's
    48 layers reach the first token about 0.4 s sooner). The step inlines the calls into one program.
    The prefill calls the compiled block once per layer (not jitted as a whole): its four matmuls are
    set up once, not 4 x n_layer times, and XLA's CPU matmul libraries set each up on its first run,
    2-5 ms apiece (1558M's first prefill took 0.8 s instead of 1.9 with the cache's w_t)."""
    import jax

    block = jax.jit(functools.partial(transformer_block, attention=attention_of(attention)), static_argnames=("n_head", "rate"))

    def pick(logits, key):  # [batch, n_vocab] -> [batch], key
        if not temperature:  # greedy: no noise, so no key split (a loop of small kernels: 124M's step was 5% slower)
            return next_token(logits), key
        key, noise_key = jax.random.split(key)
        return next_token(logits, temperature, top_k, top_p, jax.random.gumbel(noise_key, logits.shape)), key

    prefill_one = functools.partial(prefill, n_head=n_head, n_max=n_max, block=block, embed=jax.jit(embed), head=jax.jit(last_logits))

    if batch == 1:  # the single-sequence functions as they are: a vmapped axis of size 1 makes XLA copy the cache

        def prefill_batch(params, inputs, pad):  # [1, n_slots], [1] -> [1, n_vocab], cache
            logits, cache = prefill_one(params, inputs[0], pad[0])
            return logits[None], cache

        def step(params, logits, cache, slot, pad, key):  # [1, n_vocab], cache, slot, [1], key
            tokens, key = pick(logits, key)  # [1]
            logits, cache = decode(params, tokens, cache, slot, pad[0], n_head, block)
            return tokens, logits[None], cache, key

    else:

        def prefill_batch(params, inputs, pad):  # [batch, n_slots], [batch] -> [batch, n_vocab], cache
            return jax.vmap(prefill_one, in_axes=(None, 0, 0))(params, inputs, pad)

        def step(params, logits, cache, slot, pad, key):  # [batch, n_vocab], cache, slot, [batch], key
            """Every sequence's next token, run into `slot`, which the batch shares (a slot per
            sequence would make the cache update a scatter)."""
            tokens, key = pick(logits, key)  # [batch]
            decode_batch = jax.vmap(functools.partial(decode, n_head=n_head, block=block), in_axes=(None, 0, 0, None, 0))
            logits, cache = decode_batch(params, tokens[:, None], cache, slot, pad)
            return tokens, logits, cache, key

    # On a CPU, XLA splits every reduction (layer norms' means and variances, softmax's max and sum) into
    # three kernels of a few microseconds each. A batch-1 step runs its kernels one after another, and
    # each boundary costs about as much as such a kernel's work: 1558M's step has 1,159 kernels instead
    # of 1,645 when XLA splits them, and is 1-2% faster (the two alternating in one process).
    one_pass = {"xla_disable_hlo_passes": "tree_reduction_rewriter"} if jax.default_backend() == "cpu" else None
    return prefill_batch, jax.jit(step, donate_argnums=(1, 2), compiler_options=one_pass)


def stream_jax(prompts, params, n_head, n_new, temperature, top_k, top_p, seed, attention):
    import jax

    if n_new == 0:
        return
    n_slots = max(map(len, prompts))
    pad = np.array([n_slots - len(p) for p in prompts], np.int32)  # [batch]
    inputs = np.array([[0] * n + p for n, p in zip(pad, prompts)], np.int32)  # [batch, n_slots], left-padded
    prefill_batch, step = jax_programs(n_head, n_slots + n_new, len(prompts), temperature, top_k, top_p, attention)
    logits, cache = prefill_batch(params, inputs, pad)
    tokens, logits, cache, key = step(params, logits, cache, n_slots, pad, jax.random.key(seed))
    for slot in range(n_slots + 1, n_slots + n_new):
        ready = tokens
        tokens, logits, cache, key = step(params, logits, cache, slot, pad, key)  # queued before `ready` is read:
        yield np.asarray(ready)  # the device runs the next step while the host handles these tokens
    yield np.asarray(tokens)


def stream_numpy(prompts, params, n_head, n_new, temperature, top_k, top_p, seed):
    rng = np.random.default_rng(seed)
    runs = [prefill(params, np.array(p), 0, n_head, len(p) + n_new) for p in prompts]  # (logits, cache)
    for t in range(n_new):
        logits = np.stack([run_logits for run_logits, _ in runs])  # [batch, n_vocab]
        gumbel = rng.gumbel(size=logits.shape).astype(np.float32) if temperature else None
        tokens = next_token(logits, temperature, top_k, top_p, gumbel)  # [batch]
        yield tokens
        if t + 1 < n_new:
            runs = [
                decode(params, tokens[i : i + 1], cache, len(p) + t, 0, n_head)
                for i, (p, (_, cache)) in enumerate(zip(prompts, runs))
            ]


def stream(prompts, params, n_head, n_new, backend="jax", temperature=0.0, top_k=0, top_p=1.0, seed=0, attention="math"):
    """Yield every prompt's next token, one [batch] array per step, with a KV cache: one prefill of
    the (ragged) prompts, then one token per step. `params` must already be on the backend;
    `attention` is a resolved --attention (fused.resolve_attention), the jax backend's."""
    args = ([list(p) for p in prompts], params, n_head, n_new, float(temperature), int(top_k), float(top_p), seed)
    yield from stream_jax(*args, attention) if backend == "jax" else stream_numpy(*args)


def generate_batch(prompts, params, n_head, n_tokens_to_generate, backend="jax", eot=None, **sampling):
    """The new ids of every prompt; with `eot`, each stops before its first `eot`."""
    outputs, done = [[] for _ in prompts], np.zeros(len(prompts), bool)
    for tokens in stream(prompts, to_backend(params, backend), n_head, n_tokens_to_generate, backend, **sampling):
        done |= (tokens == eot) if eot is not None else False
        for output, token, finished in zip(outputs, tokens, done):
            if not finished:
                output.append(int(token))
        if done.all():
            break
    return outputs


def generate(inputs, params, n_head, n_tokens_to_generate, backend="jax", eot=None, **sampling):
    return generate_batch([inputs], params, n_head, n_tokens_to_generate, backend, eot, **sampling)[0]


def use_compilation_cache():
    """Keep compiled programs on disk, so a later run of the same shapes starts without compiling:
    in $JAX_COMPILATION_CACHE_DIR if set, else ~/.cache/gpt2-numpy-jax/xla."""
    import jax

    default = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "gpt2-numpy-jax", "xla")
    jax.config.update("jax_compilation_cache_dir", os.environ.get("JAX_COMPILATION_CACHE_DIR", default))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def to_backend(params, backend, dtype=None):
    """The params as arrays of the backend, cast to `dtype` if given. Uncast, they are put on the
    device as they are: on a CPU, JAX then uses (aligned) memory-mapped weights without a copy. A
    matrix stored transposed (a `.T` view, as the cache keeps the blocks' matrices, utils.CACHE_LAYOUT)
    goes on as stored, `w_t` [n_out, n_in] in place of `w`: a batch-1 step then reads every output's
    weights as one contiguous row, and 1558M's step is about 15% faster on a CPU."""
    if backend == "numpy":
        return params
    import jax
    import jax.numpy as jnp

    put = lambda a: jax.device_put(a) if np.dtype(dtype or a.dtype) == a.dtype else jnp.asarray(a, dtype)
    flat = {}
    for path, a in flatten(params).items():
        if path.endswith("/w") and isinstance(a, np.ndarray) and a.ndim == 2 and a.T.flags.c_contiguous and not a.flags.c_contiguous:
            path, a = path + "_t", a.T
        flat[path] = put(a)
    return unflatten(flat, len(params["blocks"]))


def read_prompts_file(path):
    """One prompt per line; blank lines are skipped."""
    path = str(path)  # fire reads `--prompts_file 5` as a number, which open() takes for a file descriptor
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\r\n") for line in f if line.strip()]
    except FileNotFoundError:
        raise UserError(f"--prompts_file {path!r} does not exist: give a text file with one prompt per line")
    except OSError as e:
        raise UserError(f"--prompts_file {path!r} cannot be read ({e.strerror}): give a text file with one prompt per line")
    except UnicodeDecodeError as e:
        raise UserError(f"--prompts_file {path!r} is not UTF-8 text (byte {e.start}): re-save it as UTF-8")


def print_stream(encoder, token_stream):
    """Print each token's text as it comes, one flush per token; a character whose bytes span
    several tokens is printed once they are all there."""
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in token_stream:
        print(utf8.decode(encoder.decode_bytes([token])), end="", flush=True)
    print(utf8.decode(b"", final=True), flush=True)


def check_sampling(temperature, top_k, top_p, seed):
    if type(temperature) not in (int, float) or not 0 <= temperature < math.inf:
        raise UserError(f"--temperature must be a number >= 0 (0 is greedy), got {temperature!r}")
    if type(top_k) is not int or top_k < 0:
        raise UserError(f"--top_k must be an integer >= 0 (0 keeps all tokens), got {top_k!r}")
    if type(top_p) not in (int, float) or not 0 < top_p <= 1:
        raise UserError(f"--top_p must be a number in (0, 1] (1 keeps all tokens), got {top_p!r}")
    check_seed(seed)


def generation_attention(choice, backend, dtype, mesh, hparams):
    """The attention that --attention `choice` runs in generation (fused.resolve_attention): NumPy's is
    the math. On a mesh, auto is the math too: a fused kernel is one custom call, which XLA's
    partitioner splits only by batch and heads, and generation leaves the cache's split to XLA."""
    if backend == "numpy":
        return "math"
    import jax

    choice = "math" if mesh and choice == "auto" else choice
    return resolve_attention(choice, jax.devices()[0], dtype, head_dim=hparams["n_embd"] // hparams["n_head"])


def check_fits_model(top_k, hparams):
    if top_k > hparams["n_vocab"]:
        raise UserError(f"--top_k {top_k} exceeds the vocabulary of {hparams['n_vocab']} tokens: use at most that (0 keeps all)")


def main(
    *prompts,
    n_tokens_to_generate=40,
    model_size="124M",
    models_dir="models",
    backend="jax",
    prompts_file=None,
    temperature=0.0,
    top_k=0,
    top_p=1.0,
    seed=0,
    stop_at_eot=True,
    dtype="float32",
    mesh="",
    attention="auto",
):
    """Continue each PROMPT with GPT-2 and print the new text (streamed for a single prompt).

    Args:
      prompts: texts to continue, generated together as one batch; "" (or none) starts from <|endoftext|>.
      n_tokens_to_generate: how many tokens to add to each prompt.
      model_size: 124M, 355M, 774M, 1558M (downloaded to models_dir once); a folder: OpenAI's release
        layout, Hugging Face's (config.json, model.safetensors, vocab.json, merges.txt) or a train_jax.py
        run (its best checkpoint); or a Hugging Face hub id (gpt2 ... gpt2-xl, owner/name).
      models_dir: where released models are kept.
      backend: jax (jitted, KV cache on device) or numpy.
      prompts_file: a UTF-8 text file with one more prompt per line.
      temperature: 0 is greedy; above 0 samples from softmax(logits / temperature).
      top_k: sample only from the k most likely tokens (0: all).
      top_p: sample only from the most likely tokens whose probability adds up to top_p (1: all).
      seed: the random seed of sampling; the same seed gives the same text.
      stop_at_eot: stop a sequence at <|endoftext|> (--nostop_at_eot to go on).
      dtype: float32, or bfloat16 (weights and compute; jax backend).
      mesh: split the model over this process's devices by train_jax's axes, e.g. tp=2, fsdp=8 or
        dp=2,tp=4 (the sizes multiply to the device count); '' for one device (jax backend).
      attention: what computes attention (jax backend): auto (cudnn on an NVIDIA GPU with --dtype
        bfloat16 and no --mesh, else math), math (gpt2.attention: the scores as a matrix),
        xla (jax.nn.dot_product_attention by XLA) or cudnn (its cuDNN flash attention).
    """
    if backend not in BACKENDS:
        raise UserError(f"unknown --backend {backend!r}: use {' or '.join(BACKENDS)}")
    if dtype not in DTYPES[backend]:
        raise UserError(f"--dtype {dtype!r} is not available with --backend {backend}: use {' or '.join(DTYPES[backend])}")
    if mesh and backend != "jax":
        raise UserError(f"--mesh {mesh} needs --backend jax")
    if check_attention(attention) not in ("auto", "math") and backend != "jax":
        raise UserError(f"--attention {attention} needs --backend jax")
    check_positive_int(n_tokens_to_generate, "n_tokens_to_generate")
    check_sampling(temperature, top_k, top_p, seed)
    if type(stop_at_eot) is not bool:
        raise UserError(f"--stop_at_eot takes no value: give --stop_at_eot or --nostop_at_eot, got {stop_at_eot!r}")
    check_folder(models_dir, "models_dir")
    prompts = [*prompts, *(read_prompts_file(prompts_file) if prompts_file is not None else [])] or [""]
    encoder, hparams, params = load_encoder_hparams_and_params(model_size, str(models_dir))
    check_fits_model(top_k, hparams)
    attention = generation_attention(attention, backend, dtype, mesh, hparams)
    inputs = [encode_prompt(encoder, hparams, prompt, n_tokens_to_generate) for prompt in prompts]
    log(f"{len(inputs)} prompt(s), up to {max(map(len, inputs))} tokens; generating {n_tokens_to_generate} with {backend}")
    if backend == "jax":
        use_compilation_cache()
    if mesh:
        params = sharded_params(params, mesh, hparams, dtype)
    else:
        params = to_backend(params, backend, dtype)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, attention=attention)
    eot = encoder.eot_token if stop_at_eot else None
    if len(inputs) == 1:
        tokens = (int(t[0]) for t in stream(inputs, params, hparams["n_head"], n_tokens_to_generate, backend, **sampling))
        print_stream(encoder, itertools.takewhile(lambda t: t != eot, tokens))
        return
    outputs = generate_batch(inputs, params, hparams["n_head"], n_tokens_to_generate, backend, eot, **sampling)
    print(f"\n{SEPARATOR}\n".join(encoder.decode(ids) for ids in outputs), flush=True)


def cli(argv=None):
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
