"""Independent TensorFlow reference for GPT-2: release-layout checkpoints and a port of OpenAI's forward pass.

Nothing here imports the project; tests compare the project against these functions.
"""

import json
import math
import os
import shutil
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # plain Eigen kernels: quiet and deterministic

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

HPARAM_KEYS = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")
CKPT_NAME = "model.ckpt"


# ---------------------------------------------------------------------------
# Writing checkpoints
# ---------------------------------------------------------------------------


def variable_shapes(hparams):
    """{tf_variable_name: shape} of OpenAI's GPT-2 checkpoint, in model.py creation order."""
    n_embd = hparams["n_embd"]
    shapes = {"model/wpe": [hparams["n_ctx"], n_embd], "model/wte": [hparams["n_vocab"], n_embd]}
    for i in range(hparams["n_layer"]):
        h = f"model/h{i}"
        shapes.update({
            f"{h}/ln_1/g": [n_embd],
            f"{h}/ln_1/b": [n_embd],
            f"{h}/attn/c_attn/w": [1, n_embd, 3 * n_embd],
            f"{h}/attn/c_attn/b": [3 * n_embd],
            f"{h}/attn/c_proj/w": [1, n_embd, n_embd],
            f"{h}/attn/c_proj/b": [n_embd],
            f"{h}/ln_2/g": [n_embd],
            f"{h}/ln_2/b": [n_embd],
            f"{h}/mlp/c_fc/w": [1, n_embd, 4 * n_embd],
            f"{h}/mlp/c_fc/b": [4 * n_embd],
            f"{h}/mlp/c_proj/w": [1, 4 * n_embd, n_embd],
            f"{h}/mlp/c_proj/b": [n_embd],
        })
    shapes.update({"model/ln_f/g": [n_embd], "model/ln_f/b": [n_embd]})
    return shapes


def _random_value(name, shape, rng, logit_scale, n_embd):
    """Non-trivial float32 values for one variable, scaled so logits have std ~logit_scale."""
    embd_std = logit_scale / math.sqrt(n_embd)  # ln_f output has unit variance, so logits get std ~logit_scale
    kind = name.rsplit("/", 1)[-1]
    if name == "model/wte":
        std = embd_std
    elif name == "model/wpe":
        std = 2 * embd_std  # strong position signal: greedy output changes along the sequence
    elif name.endswith("c_proj/w"):
        # Block outputs ~3x the embedding scale, so the model does not just echo its last input token.
        std = 3 * embd_std / math.sqrt(shape[1])
    elif kind == "w":
        std = 1 / math.sqrt(shape[1])  # fan-in scaling on normalized inputs: unit-scale outputs
    else:
        std = 0.1  # biases and LayerNorm g/b
    value = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
    return value + np.float32(1) if kind == "g" else value


def random_params(hparams, seed=0, logit_scale=10.0):
    """{tf_variable_name: float32 array} drawn from np.random.default_rng(seed)."""
    rng = np.random.default_rng(seed)
    return {
        name: _random_value(name, shape, rng, logit_scale, hparams["n_embd"])
        for name, shape in variable_shapes(hparams).items()
    }


def _save_with_saver(model_dir, params):
    """Save params with a tf.compat.v1 Saver; values are fed through placeholders, never graph constants."""
    with tf.Graph().as_default(), tf.device("/CPU:0"):
        variables, feeds, assigns = {}, {}, []
        for name, value in params.items():
            var = tf.compat.v1.get_variable(
                name, shape=value.shape, dtype=tf.float32,
                initializer=tf.compat.v1.zeros_initializer(), use_resource=False,
            )
            placeholder = tf.compat.v1.placeholder(tf.float32, shape=value.shape)
            variables[name] = var
            feeds[placeholder] = value
            assigns.append(tf.compat.v1.assign(var, placeholder))
        saver = tf.compat.v1.train.Saver(var_list=variables, save_relative_paths=True)
        with tf.compat.v1.Session() as sess:
            sess.run(assigns, feed_dict=feeds)
            saver.save(sess, str(model_dir / CKPT_NAME))


def write_release_checkpoint(model_dir, hparams, seed=0, logit_scale=10.0, vocab_dir=None):
    """Write a random GPT-2 in OpenAI's release layout into model_dir; return {tf_name: array} written."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    params = random_params(hparams, seed, logit_scale)
    _save_with_saver(model_dir, params)
    hparams_json = {key: int(hparams[key]) for key in HPARAM_KEYS}
    (model_dir / "hparams.json").write_text(json.dumps(hparams_json, indent=2))
    if vocab_dir is not None:
        for filename in ("encoder.json", "vocab.bpe"):
            shutil.copyfile(Path(vocab_dir) / filename, model_dir / filename)
    return params


def read_checkpoint(model_dir):
    """{tf_variable_name: array} of the latest checkpoint in model_dir."""
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(model_dir)))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def read_hparams(model_dir):
    """The hparams.json of model_dir as a dict."""
    return json.loads((Path(model_dir) / "hparams.json").read_text())


# ---------------------------------------------------------------------------
# Port of openai/gpt-2 src/model.py (TF2 eager; variables passed explicitly instead of get_variable)
# ---------------------------------------------------------------------------


def shape_list(x):
    return x.shape.as_list()


def softmax(x, axis=-1):
    x = x - tf.reduce_max(x, axis=axis, keepdims=True)
    ex = tf.exp(x)
    return ex / tf.reduce_sum(ex, axis=axis, keepdims=True)


def gelu(x):
    return 0.5 * x * (1 + tf.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * tf.pow(x, 3))))


def norm(x, scope, params, *, axis=-1, epsilon=1e-5):
    """Normalize to mean = 0, std = 1, then do a diagonal affine transform."""
    g, b = params[f"{scope}/g"], params[f"{scope}/b"]  # [n_state]
    u = tf.reduce_mean(x, axis=axis, keepdims=True)  # [..., 1]
    n = x - u
    s = tf.reduce_mean(tf.square(n), axis=axis, keepdims=True)  # [..., 1]
    x = n * tf.math.rsqrt(s + epsilon)
    return x * g + b


def split_states(x, n):
    """Reshape the last dimension of x into [n, x.shape[-1]/n]."""
    *start, m = shape_list(x)
    return tf.reshape(x, start + [n, m // n])


def merge_states(x):
    """Smash the last two dimensions of x into a single dimension."""
    *start, a, b = shape_list(x)
    return tf.reshape(x, start + [a * b])


def conv1d(x, scope, params):
    w, b = params[f"{scope}/w"], params[f"{scope}/b"]  # [1, nx, nf], [nf]
    *start, nx = shape_list(x)
    nf = shape_list(w)[-1]
    x2 = tf.matmul(tf.reshape(x, [-1, nx]), tf.reshape(w, [-1, nf])) + b  # [-1, nx] -> [-1, nf]
    return tf.reshape(x2, start + [nf])


def attention_mask(nd, ns, *, dtype):
    """1's in the lower triangle, counting from the lower right corner."""
    i = tf.range(nd)[:, None]
    j = tf.range(ns)
    m = i >= j - ns + nd
    return tf.cast(m, dtype)  # [nd, ns]


def attn(x, scope, n_state, params, *, hparams):
    assert len(x.shape) == 3  # [batch, sequence, features]
    assert n_state % hparams["n_head"] == 0

    def split_heads(x):
        # [batch, sequence, features] -> [batch, heads, sequence, features/heads]
        return tf.transpose(split_states(x, hparams["n_head"]), [0, 2, 1, 3])

    def merge_heads(x):
        # [batch, heads, sequence, features/heads] -> [batch, sequence, features]
        return merge_states(tf.transpose(x, [0, 2, 1, 3]))

    def mask_attn_weights(w):
        # w: [batch, heads, dst_sequence, src_sequence]; information flows from src to dst.
        _, _, nd, ns = shape_list(w)
        b = tf.reshape(attention_mask(nd, ns, dtype=w.dtype), [1, 1, nd, ns])
        return w * b - tf.cast(1e10, w.dtype) * (1 - b)

    def multihead_attn(q, k, v):
        w = tf.matmul(q, k, transpose_b=True)  # [batch, heads, nd, ns]
        w = w * tf.math.rsqrt(tf.cast(v.shape[-1], w.dtype))
        w = softmax(mask_attn_weights(w))
        return tf.matmul(w, v)  # [batch, heads, nd, features/heads]

    c = conv1d(x, f"{scope}/c_attn", params)  # [batch, seq, n_state] -> [batch, seq, 3*n_state]
    q, k, v = map(split_heads, tf.split(c, 3, axis=2))  # each [batch, heads, seq, n_state/heads]
    a = merge_heads(multihead_attn(q, k, v))  # [batch, seq, n_state]
    return conv1d(a, f"{scope}/c_proj", params)  # [batch, seq, n_state]


def mlp(x, scope, params):
    h = gelu(conv1d(x, f"{scope}/c_fc", params))  # [batch, seq, nx] -> [batch, seq, 4*nx]
    return conv1d(h, f"{scope}/c_proj", params)  # [batch, seq, 4*nx] -> [batch, seq, nx]


def block(x, scope, params, *, hparams):
    nx = x.shape[-1]
    a = attn(norm(x, f"{scope}/ln_1", params), f"{scope}/attn", nx, params, hparams=hparams)
    x = x + a  # [batch, seq, nx]
    m = mlp(norm(x, f"{scope}/ln_2", params), f"{scope}/mlp", params)
    return x + m  # [batch, seq, nx]


def positions_for(tokens):
    batch_size, nsteps = shape_list(tokens)
    return tf.tile(tf.range(nsteps)[None], [batch_size, 1])  # [batch, seq]


def model(hparams, X, params, scope="model"):
    """Logits [batch, sequence, n_vocab] for int tokens X [batch, sequence]."""
    batch, sequence = shape_list(X)
    wte, wpe = params[f"{scope}/wte"], params[f"{scope}/wpe"]  # [n_vocab, n_embd], [n_ctx, n_embd]
    h = tf.gather(wte, X) + tf.gather(wpe, positions_for(X))  # [batch, seq, n_embd]
    for layer in range(hparams["n_layer"]):
        h = block(h, f"{scope}/h{layer}", params, hparams=hparams)
    h = norm(h, f"{scope}/ln_f", params)
    h_flat = tf.reshape(h, [batch * sequence, hparams["n_embd"]])
    logits = tf.matmul(h_flat, wte, transpose_b=True)  # [batch*seq, n_embd] -> [batch*seq, n_vocab]
    return tf.reshape(logits, [batch, sequence, hparams["n_vocab"]])


# ---------------------------------------------------------------------------
# Public reference API
# ---------------------------------------------------------------------------


def _load(model_dir):
    hparams = read_hparams(model_dir)
    params = {name: tf.constant(value) for name, value in read_checkpoint(model_dir).items()}
    return hparams, params


def _logits(hparams, params, token_ids):
    assert 0 < len(token_ids) <= hparams["n_ctx"]
    with tf.device("/CPU:0"):
        X = tf.constant([list(token_ids)], dtype=tf.int32)  # [1, seq]
        return model(hparams, X, params)[0].numpy()  # [seq, n_vocab]


def reference_logits(model_dir, token_ids):
    """float32 logits [len(token_ids), n_vocab] of the checkpoint in model_dir."""
    hparams, params = _load(model_dir)
    return _logits(hparams, params, token_ids)


def reference_greedy(model_dir, token_ids, n_new):
    """n_new greedily decoded token ids (full recompute every step)."""
    hparams, params = _load(model_dir)
    ids = list(token_ids)
    for _ in range(n_new):
        ids.append(int(np.argmax(_logits(hparams, params, ids)[-1])))
    return ids[len(token_ids):]
