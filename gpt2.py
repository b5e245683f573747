"""GPT-2 as pure functions over OpenAI's checkpoint dict, one code path for NumPy and JAX.

Every function takes arrays of either library and computes with the library the arrays belong to
(`x.__array_namespace__()`), so `jax.jit`, `jax.grad` and `jax.vmap` apply to the same code the
NumPy reference runs. Scalars are Python floats: they never promote float32 to float64.
"""

import functools
import math

import numpy as np

from utils import UserError, check_positive_int, encode_prompt, load_encoder_hparams_and_params, log, run_cli

BACKENDS = ("jax", "numpy")


def xp_of(x):
    """numpy or jax.numpy: the array library of `x`."""
    return x.__array_namespace__()


def gelu(x):
    return 0.5 * x * (1 + xp_of(x).tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def softmax(x):
    exp_x = xp_of(x).exp(x - x.max(axis=-1, keepdims=True))
    return exp_x / exp_x.sum(axis=-1, keepdims=True)


def layer_norm(x, g, b, eps=1e-5):  # [n_seq, n_embd] -> [n_seq, n_embd]
    mean = x.mean(axis=-1, keepdims=True)  # [n_seq, 1]
    variance = x.var(axis=-1, keepdims=True)  # [n_seq, 1]
    return g * (x - mean) / xp_of(x).sqrt(variance + eps) + b


def linear(x, w, b):  # [m, n_in] @ [n_in, n_out] + [n_out] -> [m, n_out]
    return x @ w + b


def ffn(x, c_fc, c_proj):  # [n_seq, n_embd] -> [n_seq, n_embd]
    return linear(gelu(linear(x, **c_fc)), **c_proj)  # [n_seq, 4*n_embd] in between


def attention(q, k, v, mask):  # [n_head, n_q, d], [n_head, n_k, d] x2, [n_q, n_k] -> [n_head, n_q, d]
    scores = q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1])  # [n_head, n_q, n_k]
    return softmax(xp_of(q).where(mask, scores, -1e10)) @ v


def mha(x, c_attn, c_proj, n_head):  # [n_seq, n_embd] -> [n_seq, n_embd]
    n_seq, n_embd = x.shape
    qkv = linear(x, **c_attn)  # [n_seq, 3*n_embd]
    q, k, v = qkv.reshape(n_seq, 3, n_head, n_embd // n_head).transpose(1, 2, 0, 3)  # 3 x [n_head, n_seq, d]
    causal = xp_of(x).tri(n_seq, dtype=bool)  # [n_seq, n_seq]
    heads = attention(q, k, v, causal)  # [n_head, n_seq, d]
    return linear(heads.transpose(1, 0, 2).reshape(n_seq, n_embd), **c_proj)


def transformer_block(x, mlp, attn, ln_1, ln_2, n_head):  # [n_seq, n_embd] -> [n_seq, n_embd]
    x = x + mha(layer_norm(x, **ln_1), **attn, n_head=n_head)
    return x + ffn(layer_norm(x, **ln_2), **mlp)


def gpt2(inputs, wte, wpe, blocks, ln_f, n_head):  # [n_seq] -> [n_seq, n_vocab]
    x = wte[inputs] + wpe[: inputs.shape[0]]  # [n_seq, n_embd]
    for block in blocks:
        x = transformer_block(x, **block, n_head=n_head)
    return layer_norm(x, **ln_f) @ wte.T  # [n_seq, n_embd] -> [n_seq, n_vocab]


def last_logits(inputs, n, params, n_head):  # [n_total], n <= n_total -> [n_vocab]
    """Logits after the first `n` tokens; the causal mask makes later (padding) tokens irrelevant."""
    return gpt2(inputs, **params, n_head=n_head)[n - 1]


@functools.cache
def jitted_last_logits():
    import jax

    return jax.jit(last_logits, static_argnames="n_head")


def to_backend(params, backend):
    if backend == "numpy":
        return params
    import jax

    return jax.device_put(params)


def generate(inputs, params, n_head, n_tokens_to_generate, backend="jax"):
    """Greedy decoding by full recompute. JAX runs one fixed length (prompt + new tokens), so it
    compiles once; NumPy runs the exact length."""
    from tqdm import tqdm

    ids = np.zeros(len(inputs) + n_tokens_to_generate, np.int32)  # [n_total]
    ids[: len(inputs)] = inputs
    forward = jitted_last_logits() if backend == "jax" else last_logits
    params = to_backend(params, backend)
    for n in tqdm(range(len(inputs), len(ids)), desc="generating", unit="tok", leave=False):
        tokens = ids if backend == "jax" else ids[:n]
        ids[n] = int(forward(tokens, n, params, n_head=n_head).argmax())
    return ids[len(inputs) :].tolist()


def main(prompt, n_tokens_to_generate=40, model_size="124M", models_dir="models", backend="jax"):
    """Continue PROMPT with GPT-2 (greedy) and print the new text.

    Args:
      prompt: the text to continue; "" starts from <|endoftext|>.
      n_tokens_to_generate: how many tokens to add.
      model_size: 124M, 355M, 774M, 1558M (downloaded to models_dir once), or a checkpoint folder.
      models_dir: where released models are kept.
      backend: jax (jitted) or numpy.
    """
    if backend not in BACKENDS:
        raise UserError(f"unknown --backend {backend!r}: use {' or '.join(BACKENDS)}")
    check_positive_int(n_tokens_to_generate, "n_tokens_to_generate")
    encoder, hparams, params = load_encoder_hparams_and_params(model_size, models_dir)
    inputs = encode_prompt(encoder, hparams, prompt, n_tokens_to_generate)
    log(f"{len(inputs)} prompt tokens, generating {n_tokens_to_generate} with {backend}")
    print(encoder.decode(generate(inputs, params, hparams["n_head"], n_tokens_to_generate, backend)), flush=True)


def cli(argv=None):
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
