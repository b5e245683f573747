"""train_jax.py: data, init, loss and gradients, the optimizer, resume, export, the command line.

Each check is against something train_jax does not compute itself: finite differences of a NumPy
float64 loss, the uninterrupted run, TensorFlow's checkpoint reader, the encoder's own decoding.
"""

import functools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import FLOAT32_EPS, NEWTON_SCHULZ_GROWTH, ROOT, float32_tolerance, forward_length, prepared_text
from http_server import serve

import gpt2
import data
import train_jax
import checkpoints
import formats
import monitor
from cli import UserError
from encoder import EOT, bytes_to_unicode, load_encoder
from sharding import match_rules
from formats import expected_shapes, flatten, unflatten
from utils import load_encoder_hparams_and_params
from step import DECAY_RULES, MUON_RULES, OPTIMIZER_FLAGS, init_params, init_state, loss_fn, make_optimizer, train_step

CORPUS = "".join(
    f"ROMEO: speak line {i} of the {('tiny', 'small', 'short')[i % 3]} play, {i * 7 % 13} times.\n"
    f"JULIET: and I answer {i % 5}!\n\n"
    for i in range(300)
)  # about 20 kB of text with a little structure to learn
TINY = dict(n_layer=2, n_head=2, n_embd=16, block_size=16, batch_size=4)
QUIET = dict(data_url="", peak_flops=1e12, eval_iters=2)  # no download, no matmul probe (a peak above any CPU here)
N_SYMBOLS = len(set(CORPUS))  # the bytes vocabulary of the (ASCII) corpus
ACCENTED = "Ça va? Oui, très bien.\r\n\tTabs, “quotes”, and an emoji 🙂.\n"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The corpus, prepared with the bytes tokenizer."""
    return prepared_text(tmp_path_factory, CORPUS)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """The tests compile the same programs many times, in this process and in subprocesses: keep
    them in JAX's persistent cache (what JAX_COMPILATION_CACHE_DIR does for users)."""
    import jax

    folder = str(tmp_path_factory.mktemp("jax_cache"))
    settings = {"jax_compilation_cache_dir": folder, "jax_persistent_cache_min_compile_time_secs": 0.5}
    saved = {name: getattr(jax.config, name) for name in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
    session_folder = os.environ.get("JAX_COMPILATION_CACHE_DIR")  # conftest's, for the modules after this one
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    yield
    if session_folder is None:
        del os.environ["JAX_COMPILATION_CACHE_DIR"]
    else:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = session_folder
    for name, value in saved.items():
        jax.config.update(name, value)


def tiny_flags(data_dir, out_dir, **overrides):
    return train_jax.default_flags(**{"data_dir": data_dir, "out_dir": str(out_dir), **TINY, **QUIET, **overrides})


def read_ids(path):
    return np.fromfile(path, np.uint16).tolist()


def run(*args, cwd=ROOT, **kwargs):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, **kwargs)


# ---------------------------------------------------------------------------------------------
# prepare


@pytest.mark.parametrize("tokenizer", ["bytes", "gpt2"])
def test_prepare_round_trips_text(tokenizer, tmp_path, vocab_dir):
    first, second = CORPUS[:3000] + ACCENTED, ACCENTED + "the end"
    (tmp_path / "a.txt").write_text(first, encoding="utf-8", newline="")
    (tmp_path / "b.txt").write_text(second, encoding="utf-8", newline="")
    out = tmp_path / "data"
    files = dict(input=str(tmp_path / "a.txt"), out=str(out), tokenizer=tokenizer, val_fraction=0.3, vocab_dir=vocab_dir)
    data.prepare(str(tmp_path / "b.txt"), **files)
    train, val = read_ids(out / "train.bin"), read_ids(out / "val.bin")
    encoder = load_encoder(str(out))
    separator = EOT if tokenizer == "gpt2" else ""
    assert encoder.decode(train + val) == first + separator + second
    assert len(train) == int((len(train) + len(val)) * 0.7)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"] == tokenizer
    assert (meta["train_tokens"], meta["val_tokens"], meta["vocab_size"]) == (len(train), len(val), len(encoder.encoder))
    if tokenizer == "bytes":
        byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        by_id = sorted(encoder.encoder, key=encoder.encoder.get)
        assert [byte_decoder[c] for c in by_id] == sorted(set((first + second).encode()))  # ids in byte order
        assert (out / "vocab.bpe").read_text() == "#version: 0.2\n"
    else:
        assert train + val == encoder.encode(first) + [encoder.eot_token] + encoder.encode(second)


def test_text_is_cut_only_where_the_bpe_ids_stay_the_same(tmp_path, vocab_dir):
    text = "a  \nb\n\n\nc \n d\ne\r\n" * 20 + CORPUS[:500] + "x" * 40 + "\n" + ACCENTED * 5
    (tmp_path / "t.txt").write_text(text, encoding="utf-8", newline="")
    chunks = [chunk for chunk, _ in data.text_chunks(str(tmp_path / "t.txt"), chunk_bytes=8)]
    encoder = load_encoder(vocab_dir)
    assert len(chunks) > 20 and "".join(chunks) == text
    assert [i for chunk in chunks for i in encoder.encode(chunk)] == encoder.encode(text)


@pytest.mark.parametrize(
    "content, flags, message",
    [
        (b"", {}, "is empty: give a file with some text"),
        (None, {}, "is not a file: give the path of a text file"),
        (b"hi", {"tokenizer": "chars"}, "unknown --tokenizer 'chars': use gpt2 or bytes"),
        (b"hi", {"val_fraction": 1.5}, "--val_fraction must be a number between 0 and 1"),
        (b"caf\xe9", {}, "line 1 is not UTF-8: re-save it as UTF-8, or use --tokenizer bytes"),
        (b"hi", {"vocab_dir": "{tmp}"}, "--vocab_dir {tmp} has no encoder.json or vocab.bpe: give a folder holding both, or leave"),
    ],
)
def test_prepare_errors_name_the_fix(content, flags, message, tmp_path):
    if content is not None:
        (tmp_path / "input.txt").write_bytes(content)
    flags = {k: v.replace("{tmp}", str(tmp_path)) if isinstance(v, str) else v for k, v in flags.items()}
    with pytest.raises(UserError, match=re.escape(message.replace("{tmp}", str(tmp_path)))):
        data.prepare(input=str(tmp_path / "input.txt"), out=str(tmp_path / "data"), **flags)


# ---------------------------------------------------------------------------------------------
# init, loss, gradients, optimizer


def test_init_is_gpt2s():
    hparams = {"n_vocab": 300, "n_ctx": 128, "n_embd": 256, "n_head": 4, "n_layer": 8}
    flat = {path: np.asarray(a) for path, a in flatten(init_params(hparams, seed=0)).items()}
    assert {path: list(a.shape) for path, a in flat.items()} == expected_shapes(hparams)
    for path, a in flat.items():
        assert a.dtype == np.float32
        if path.endswith("/g"):
            assert (a == 1).all(), path
        elif path.endswith("/b"):
            assert (a == 0).all(), path
        else:
            std = 0.02 / 4 if path.endswith("c_proj/w") else 0.02  # 1/sqrt(2 * n_layer) = 1/4
            # sampling errors of >= 32768 normals: the mean's std is std / 181, the std's std / 256
            assert abs(a.mean()) < 0.1 * std and a.std() == pytest.approx(std, rel=0.05), path
    again = flatten(init_params(hparams, seed=0))
    assert all((np.asarray(again[p]) == flat[p]).all() for p in flat)


def numpy_loss(params, inputs, targets, n_head):  # float64 NumPy, through gpt2.py's NumPy path
    losses = []
    for x, y in zip(inputs, targets):
        logits = gpt2.gpt2(x, **params, n_head=n_head)  # [n_seq, n_vocab]
        log_probs = logits - logits.max(-1, keepdims=True)
        log_probs = log_probs - np.log(np.exp(log_probs).sum(-1, keepdims=True))
        losses.append(-log_probs[np.arange(len(y)), y])
    return np.mean(losses)


def test_gradients_match_central_finite_differences():
    import jax

    hparams = {"n_vocab": 11, "n_ctx": 6, "n_embd": 8, "n_head": 2, "n_layer": 2}
    rng = np.random.default_rng(0)
    flat = {p: rng.normal(0, 0.3, s) + (1.0 if p.endswith("/g") else 0.0) for p, s in expected_shapes(hparams).items()}
    params = unflatten(flat, hparams["n_layer"])  # float64 NumPy
    inputs, targets = rng.integers(0, 11, (2, 6)), rng.integers(0, 11, (2, 6))
    with jax.enable_x64(True):
        jax_params = formats.stacked(jax.tree.map(jax.numpy.asarray, params))
        loss, grads = jax.value_and_grad(loss_fn)(jax_params, inputs, targets, None, 2, 0.0, "float64")
        grads = {p: np.asarray(g) for p, g in flatten(formats.unstacked(grads)).items()}
    float64_tolerance = float32_tolerance(1.0, forward_length(hparams, 6) + 12, eps=float(np.finfo(np.float64).eps))
    assert float(loss) == pytest.approx(numpy_loss(params, inputs, targets, 2), rel=float64_tolerance)
    eps = 1e-6  # central differences: truncation ~eps**2 (relative), rounding ~2.2e-16 * loss / eps ~ 5e-10 (absolute)
    for path, value in flat.items():
        direction = rng.normal(size=value.shape)
        shifted = lambda sign: unflatten({**flat, path: value + sign * eps * direction}, hparams["n_layer"])
        numeric = (numpy_loss(shifted(1), inputs, targets, 2) - numpy_loss(shifted(-1), inputs, targets, 2)) / (2 * eps)
        assert (grads[path] * direction).sum() == pytest.approx(numeric, rel=1e-6, abs=1e-9), path


def test_decay_mask_covers_exactly_the_2d_weights():
    import jax
    import jax.numpy as jnp

    hparams = {"n_vocab": 20, "n_ctx": 8, "n_embd": 8, "n_head": 2, "n_layer": 3}
    params = init_params(hparams, seed=0)
    mask = flatten(match_rules(DECAY_RULES, params))
    assert {p for p, decay in mask.items() if decay} == {p for p, a in flatten(params).items() if a.ndim == 2}
    # One AdamW step with zero gradients only decays: exactly the masked leaves shrink by lr * wd.
    optimizer, _ = make_optimizer(0.5, 0.5, 0, 10, 0.1, 0.9, 0.95, 1.0)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(optimizer.update)(zeros, optimizer.init(params), params)
    for path, update in flatten(updates).items():
        expected = -0.5 * 0.1 * flatten(params)[path] if mask[path] else 0 * update
        np.testing.assert_allclose(update, expected, rtol=4 * FLOAT32_EPS, err_msg=path)  # two float32 products


def test_learning_rate_warms_up_then_decays_to_min_lr():
    _, schedule = make_optimizer(1e-3, 1e-4, 10, 100, 0.1, 0.9, 0.95, 1.0)
    lrs = [float(schedule(step)) for step in range(120)]
    approx = functools.partial(pytest.approx, rel=8 * FLOAT32_EPS)  # a few float32 operations (the cosine's too)
    assert lrs[0] == approx(1e-3 / 11) and lrs[10] == approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11])) and all(a > b for a, b in zip(lrs[10:100], lrs[11:101]))
    assert lrs[55] == approx(1e-4 + 0.5 * (1e-3 - 1e-4))  # cosine: half way at half the decay
    assert lrs[100:] == approx([1e-4] * 20)


MUON = dict(learning_rate=0.05, momentum=0.9, weight_decay=0.2)  # make_optimizer's `muon`: --muon_* flags
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g):  # float64 [n_in, n_out] -> [n_in, n_out]
    """Keller Jordan's zeropower_via_newtonschulz5 in float64 NumPy: 5 quintic steps on the matrix
    scaled to unit Frobenius norm, taken on its wide side."""
    wide = g.T if g.shape[0] > g.shape[1] else g
    x = wide / (np.linalg.norm(wide) + 1e-8)
    a, b, c = NS_COEFFS
    for _ in range(5):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if g.shape[0] > g.shape[1] else x


def muon_update(grads, param, lr, momentum, weight_decay):  # [n_steps, n_in, n_out], [n_in, n_out] -> [n_in, n_out]
    """The last of Muon's steps on one matrix, float64, as optax.contrib.muon defines it: the momentum
    of the gradients, its bias-corrected Nesterov mix with the last one, orthogonalized, scaled by
    sqrt(max(1, n_out / n_in)), plus the decay, times -lr."""
    mu = np.zeros_like(param)
    for t, g in enumerate(grads, 1):
        mu = momentum * mu + (1 - momentum) * g
    nesterov = momentum * mu / (1 - momentum ** (t + 1)) + (1 - momentum) * g / (1 - momentum**t)
    scale = math.sqrt(max(1, param.shape[1] / param.shape[0]))
    return -lr * (scale * newton_schulz(nesterov) + weight_decay * param)


def matrices(path, a):  # a stacked matrix -> {(layer, part): [n_in, n_out]}: c_attn's query, key and value apart
    parts = 3 if path.endswith("c_attn/w") else 1
    return {(i, j): m for i, layer in enumerate(a) for j, m in enumerate(np.split(layer, parts, axis=-1))}


def test_muon_updates_each_layers_matrices_and_q_k_v_apart_as_a_float64_newton_schulz():
    """Two steps of random gradients: each layer's c_attn query, key and value, c_proj, c_fc and MLP
    c_proj move as Muon's float64 reference of that one matrix says; every other param as AdamW alone
    moves it."""
    import jax

    params = formats.stacked(init_params({"n_vocab": 20, "n_ctx": 8, "n_embd": 16, "n_head": 2, "n_layer": 2}, seed=0))
    rng = np.random.default_rng(0)
    grads = [jax.tree.map(lambda a: rng.standard_normal(a.shape, np.float32), params) for _ in range(2)]
    schedule = (1e-2, 1e-3, 0, 10, 0.1, 0.9, 0.95, 0.0)  # no clipping: the gradients go in as they are

    def last_updates(optimizer):
        state, update = optimizer.init(params), jax.jit(optimizer.update)
        for g in grads:
            updates, state = update(g, state, params)
        return flatten(updates)

    got, adamw = last_updates(make_optimizer(*schedule, muon=MUON)[0]), last_updates(make_optimizer(*schedule)[0])
    lr = MUON["learning_rate"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 10)))  # step 1 of the cosine to 0.1 x peak over 10
    groups, flat_params, flat_grads = flatten(match_rules(MUON_RULES, params)), flatten(params), [flatten(g) for g in grads]
    assert sorted(p for p, group in groups.items() if group == "muon") == [f"blocks/{m}/w" for m in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")]
    for path, group in groups.items():
        if group == "adamw":
            np.testing.assert_allclose(got[path], adamw[path], rtol=4 * FLOAT32_EPS, err_msg=path)
            continue
        history = [matrices(path, np.float64(g[path])) for g in flat_grads]
        for part, param in matrices(path, np.float64(flat_params[path])).items():
            expected = muon_update([h[part] for h in history], param, lr, MUON["momentum"], MUON["weight_decay"])
            # float32 rounding of the momentum and of each Newton-Schulz step, grown by the later steps
            tolerance = lr * NEWTON_SCHULZ_GROWTH * float32_tolerance(np.abs(expected).max() / lr, max(param.shape))
            np.testing.assert_allclose(matrices(path, got[path])[part], expected, rtol=0, atol=tolerance, err_msg=f"{path} {part}")


def test_muon_and_adamw_decay_their_masked_params_each_on_its_schedule():
    """With zero gradients both only decay: Muon's matrices by its rate x --muon_weight_decay, AdamW's
    embeddings by its rate x --weight_decay, nothing else; Muon's rate is AdamW's warmup and cosine
    scaled to its peak."""
    import jax
    import jax.numpy as jnp

    params = formats.stacked(init_params({"n_vocab": 20, "n_ctx": 8, "n_embd": 8, "n_head": 2, "n_layer": 2}, seed=0))
    optimizer, schedule = make_optimizer(1e-2, 1e-3, 3, 10, 0.1, 0.9, 0.95, 1.0, muon=MUON)
    state, update, zeros = optimizer.init(params), jax.jit(optimizer.update), jax.tree.map(jnp.zeros_like, params)
    groups, decayed = flatten(match_rules(MUON_RULES, params)), flatten(match_rules(DECAY_RULES, params))
    assert {p for p, group in groups.items() if group == "adamw" and decayed[p]} == {"wte", "wpe"}
    for step in range(12):
        updates, state = update(zeros, state, params)
        lr = {"adamw": float(schedule(step)), "muon": float(schedule(step)) * MUON["learning_rate"] / 1e-2}
        for path, u in flatten(updates).items():
            rate = lr[groups[path]] * (MUON["weight_decay"] if groups[path] == "muon" else 0.1) * decayed[path]
            np.testing.assert_allclose(u, -rate * flatten(params)[path], rtol=8 * FLOAT32_EPS, err_msg=f"{path} step {step}")


def tiny_setup(data_dir, batch_shape=(1, 4), n_embd=16):
    """A tiny model's params and one batch of the corpus ([grad_accum, batch, 16] inputs and targets)."""
    hparams = {"n_vocab": N_SYMBOLS, "n_ctx": 16, "n_embd": n_embd, "n_head": 2, "n_layer": 2}
    ids = data.load_split(data_dir, "train", 16, N_SYMBOLS)
    return init_params(hparams, seed=0), data.get_batch(ids, data.batch_offsets(0, 0, 0, batch_shape, ids, 16), 16)


def jitted_step(optimizer, dtype="float32"):
    import functools

    import jax

    return jax.jit(functools.partial(train_step, optimizer=optimizer, n_head=2, rate=0.0, dtype=dtype))


def test_tiny_model_overfits_one_batch(data_dir):
    params, batch = tiny_setup(data_dir, n_embd=32)
    optimizer, _ = make_optimizer(1e-2, 1e-2, 0, 1000, 0.0, 0.9, 0.95, 1.0)
    state, step = init_state(params, optimizer, 0), jitted_step(optimizer)
    losses = []
    for _ in range(300):
        state, metrics = step(state, *batch)
        losses.append(float(metrics["loss"]))
    assert losses[0] > 3.5 and losses[-1] < 0.05


def test_grad_accum_equals_one_big_batch(data_dir):
    """Plain SGD with lr 1 turns the step into `params - mean gradient`, easy to compare."""
    import jax
    import optax

    step = jitted_step(optax.sgd(1.0))
    (params, accumulated_batch), (_, whole_batch) = tiny_setup(data_dir, (2, 2)), tiny_setup(data_dir, (1, 4))
    np.testing.assert_array_equal(accumulated_batch[0].reshape(1, 4, 16), whole_batch[0])  # the same 4 sequences
    state = lambda: init_state(params, optax.sgd(1.0), 0)
    (accumulated, metrics_2x2), (whole, metrics_1x4) = step(state(), *accumulated_batch), step(state(), *whole_batch)
    length = forward_length({"n_layer": 2, "n_embd": 16}, 16) + 4 * 16  # the forward, then the mean over 4 x 16 tokens
    assert float(metrics_2x2["loss"]) == pytest.approx(float(metrics_1x4["loss"]), rel=float32_tolerance(1.0, length))
    for a, b, p in zip(*(jax.tree.leaves(s["params"]) for s in (accumulated, whole)), jax.tree.leaves(formats.stacked(params))):
        update = np.asarray(b) - np.asarray(p)  # the mean gradient, summed in another order: relative to the leaf's largest
        stored = FLOAT32_EPS * np.abs(p).max()  # and each new param rounded to float32 at the params' scale (half an ulp, twice)
        np.testing.assert_allclose(np.asarray(a) - p, update, rtol=0, atol=float32_tolerance(np.abs(update).max(), length) + stored)


def test_a_muon_step_of_two_accumulated_micro_batches_equals_one_of_the_double_batch(data_dir):
    import jax

    (params, accumulated_batch), (_, whole_batch) = tiny_setup(data_dir, (2, 2)), tiny_setup(data_dir, (1, 4))
    optimizer, _ = make_optimizer(1e-2, 1e-3, 0, 10, 0.1, 0.9, 0.95, 1.0, muon=MUON)
    step, state = jitted_step(optimizer), lambda: init_state(params, optimizer, 0)
    (accumulated, metrics_2x2), (whole, metrics_1x4) = step(state(), *accumulated_batch), step(state(), *whole_batch)
    length = forward_length({"n_layer": 2, "n_embd": 16}, 16) + 4 * 16
    assert float(metrics_2x2["loss"]) == pytest.approx(float(metrics_1x4["loss"]), rel=float32_tolerance(1.0, length))
    before, groups = flatten(formats.stacked(params)), flatten(match_rules(MUON_RULES, formats.stacked(params)))
    new = {name: flatten(s["params"]) for name, s in (("accumulated", accumulated), ("whole", whole))}
    for path in (p for p, group in groups.items() if group == "muon"):
        update = np.asarray(new["whole"][path]) - before[path]
        difference = np.linalg.norm(np.asarray(new["accumulated"][path]) - new["whole"][path])
        # the mean gradient summed in another order (relative float32_tolerance in norm), grown by at most
        # NEWTON_SCHULZ_GROWTH through the orthogonalization; each new param rounded at the params' scale
        bound = NEWTON_SCHULZ_GROWTH * float32_tolerance(np.linalg.norm(update), length) + 2 * FLOAT32_EPS * np.linalg.norm(before[path])
        assert 0 < difference <= bound and np.linalg.norm(update) > 100 * bound, path


def test_bfloat16_computes_close_to_float32_with_float32_weights(data_dir):
    import jax

    params, (inputs, targets) = tiny_setup(data_dir)
    grad = jax.jit(jax.value_and_grad(loss_fn), static_argnums=(3, 4, 5, 6))
    training_params = formats.stacked(params)
    (loss_32, grads_32), (loss_16, grads_16) = (grad(training_params, inputs[0], targets[0], None, 2, 0.0, d) for d in ("float32", "bfloat16"))
    assert float(loss_16) == pytest.approx(float(loss_32), rel=0.01)  # bfloat16 rounds to 2**-8 = 0.4%; the mean of 64 losses averages it
    g32, g16 = (np.concatenate([np.ravel(g) for g in jax.tree.leaves(g)]) for g in (grads_32, grads_16))
    assert g16.dtype == np.float32 and g32 @ g16 / np.linalg.norm(g32) / np.linalg.norm(g16) > 0.99
    for muon in (None, MUON):
        optimizer, _ = make_optimizer(1e-2, 1e-2, 0, 1000, 0.0, 0.9, 0.95, 1.0, muon=muon)
        (new_32, _), (new_16, _) = (jitted_step(optimizer, d)(init_state(params, optimizer, 0), inputs, targets) for d in ("float32", "bfloat16"))
        assert {a.dtype for a in jax.tree.leaves(new_16["params"])} == {np.dtype("float32")}
        if muon:  # Muon's first update is the orthogonalized gradient: bfloat16's points the way float32's does
            before = formats.stacked(params)["blocks"]["mlp"]["c_fc"]["w"]
            u32, u16 = (np.ravel(new["params"]["blocks"]["mlp"]["c_fc"]["w"] - before) for new in (new_32, new_16))
            assert u32 @ u16 / np.linalg.norm(u32) / np.linalg.norm(u16) > 0.9


# ---------------------------------------------------------------------------------------------
# the training loop: errors, resume, export


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"n_layer": 0}, "--n_layer must be a positive integer"),
        ({"dropout": 1.5}, r"--dropout must be a number in \[0, 1\)"),
        ({"dtype": "float16"}, "unknown --dtype"),
        ({"optimizer": "sgd"}, "unknown --optimizer 'sgd': use adamw or muon"),
        ({"muon_momentum": 1.0}, r"--muon_momentum must be a number in \[0, 1\)"),
        ({"n_embd": 10, "n_head": 4}, "must be a multiple of --n_head"),
        ({"block_size": 5000}, "too short for one block"),
        ({"vocab_size": 10}, "smaller than the data's vocabulary"),
        ({"resume": True}, "holds no training run"),
        ({"data_dir": "/nonexistent/data"}, "has no train.bin: run `python train_jax.py prepare"),
    ],
)
def test_training_errors_name_the_fix(overrides, message, data_dir, tmp_path):
    with pytest.raises(UserError, match=message):
        train_jax.fit({**tiny_flags(data_dir, tmp_path / "out", max_iters=1), **overrides})


@pytest.mark.parametrize("where", ["meta.json", "train.bin"])
def test_ids_outside_the_vocabulary_are_an_error(where, data_dir, tmp_path):
    """meta.json's largest id is checked at start-up; ids that a file holds beyond it, as batches load them."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(data_dir, bad)
    if where == "meta.json":
        meta = json.loads((bad / "meta.json").read_text())
        (bad / "meta.json").write_text(json.dumps({**meta, "largest_id": 70}))  # the vocabulary has N_SYMBOLS < 70
    else:
        ids = np.fromfile(bad / "train.bin", np.uint16)
        ids[::8] = 70  # in every window
        ids.tofile(bad / "train.bin")
    with pytest.raises(UserError, match=f"{re.escape(str(bad / where))} holds id 70, outside the model's vocabulary"):
        train_jax.fit(tiny_flags(str(bad), tmp_path / "out", max_iters=1))


def test_a_truncated_bin_is_one_error_naming_it(data_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(data_dir, bad)
    with open(bad / "train.bin", "ab") as f:
        f.write(b"\0")  # half an id, as a copy cut short leaves it
    size = (bad / "train.bin").stat().st_size
    message = f"{bad / 'train.bin'} is truncated ({size} bytes, not a whole number of uint16 ids): prepare it again"
    with pytest.raises(UserError, match=re.escape(message)):
        train_jax.fit(tiny_flags(str(bad), tmp_path / "out", max_iters=1))
    assert not (tmp_path / "out").exists()


def test_resume_after_a_stop_equals_the_uninterrupted_run_step_for_step(data_dir, tmp_path):
    import jax

    flags = dict(max_iters=12, lr_decay_iters=12, warmup_iters=2, log_interval=1, eval_interval=4, ckpt_interval=4, dropout=0.1)
    whole = train_jax.fit(tiny_flags(data_dir, tmp_path / "whole", **flags))
    first = train_jax.fit(tiny_flags(data_dir, tmp_path / "stopped", **{**flags, "max_iters": 7}))
    with pytest.raises(UserError, match="already holds checkpoints"):
        train_jax.fit(tiny_flags(data_dir, tmp_path / "stopped", **flags))
    with pytest.raises(UserError, match="--learning_rate is 0.5"):
        train_jax.fit(tiny_flags(data_dir, tmp_path / "stopped", **flags, resume=True, learning_rate=0.5))
    with pytest.raises(UserError, match="make a global batch of 2 x 1 accumulation but the run in .* used 4 x 1"):
        train_jax.fit(tiny_flags(data_dir, tmp_path / "stopped", **flags, resume=True, batch_size=2))
    with pytest.raises(UserError, match="^--resume: --optimizer is 'muon' but the run in .* used 'adamw'; repeat its flags$"):
        train_jax.fit(tiny_flags(data_dir, tmp_path / "stopped", **flags, resume=True, optimizer="muon"))
    config = json.loads((tmp_path / "stopped" / "config.json").read_text())  # as a run saved before --optimizer existed wrote it
    config["flags"] = {k: v for k, v in config["flags"].items() if not k.startswith(("optimizer", "muon_"))}
    (tmp_path / "stopped" / "config.json").write_text(json.dumps(config))
    rest = train_jax.fit(tiny_flags(data_dir, tmp_path / "stopped", **flags, resume=True))
    assert list(first["losses"]) == list(range(1, 8)) and list(rest["losses"]) == list(range(8, 13))
    assert {**first["losses"], **rest["losses"]} == whole["losses"]  # exactly, dropout included
    for a, b in zip(jax.tree.leaves(rest["state"]), jax.tree.leaves(whole["state"])):
        np.testing.assert_array_equal(a, b)
    assert whole["losses"][12] < whole["losses"][1]


def test_the_train_state_stacks_the_blocks_so_its_leaves_do_not_grow_with_depth():
    import jax

    optimizer, _ = make_optimizer(1e-2, 1e-3, 0, 10, 0.1, 0.9, 0.95, 1.0)
    counts = {}
    for n_layer in (2, 4):
        params = init_params({"n_vocab": 20, "n_ctx": 8, "n_embd": 8, "n_head": 2, "n_layer": n_layer}, seed=0)
        state = jax.eval_shape(lambda: init_state(params, optimizer, 0))
        for tree in (state["params"], state["opt_state"][1][0].mu, state["opt_state"][1][0].nu):  # AdamW's moments too
            assert {p: a.shape for p, a in flatten(tree).items() if p.startswith("blocks/")} == {
                "blocks/" + p.split("/", 2)[2]: (n_layer, *a.shape) for p, a in flatten(params).items() if p.startswith("blocks/0/")
            }
        counts[n_layer] = len(jax.tree.leaves(state["params"])), len(jax.tree.leaves(state["opt_state"]))
    assert counts[2] == counts[4] == (12 + 4, 2 * (12 + 4) + 2)  # a block's 12 arrays, wte/wpe/ln_f; mu, nu and two counts
    stacked = formats.stacked(params)
    assert all((np.asarray(a) == flatten(params)[p]).all() for p, a in flatten(formats.unstacked(stacked)).items())


def test_checkpoints_keep_the_list_of_blocks_on_disk(data_dir, tmp_path):
    """What runs saved before training stacked its blocks: restore_checkpoint reads a state that
    orbax saved with the list of blocks, and a run's own checkpoint is that layout (run_params)."""
    import jax
    import orbax.checkpoint as ocp

    summary = train_jax.fit(tiny_flags(data_dir, tmp_path / "run", max_iters=2, eval_interval=2))
    state = summary["state"]
    _, _, params = checkpoints.run_params(str(tmp_path / "run"), step=2)
    assert len(params["blocks"]) == 2 and {p: list(a.shape) for p, a in flatten(params).items()} == expected_shapes(
        {"n_vocab": N_SYMBOLS, "n_ctx": 16, "n_embd": 16, "n_head": 2, "n_layer": 2}
    )
    assert all((np.asarray(a) == params_at).all() for a, params_at in zip(
        jax.tree.leaves(formats.unstacked(state["params"])), jax.tree.leaves(params)))  # fmt: skip
    adam = state["opt_state"][1][0]
    listed = lambda tree: {**tree, "blocks": [jax.tree.map(lambda a: np.asarray(a)[i], tree["blocks"]) for i in range(2)]}
    old_layout = {**state, "params": listed(state["params"]), "opt_state": (state["opt_state"][0], (
        adam._replace(mu=listed(adam.mu), nu=listed(adam.nu)), *state["opt_state"][1][1:]))}  # fmt: skip
    run = checkpoints.checkpoint_manager(str(tmp_path / "run"), 3)  # the run's own step 2 is that layout, moments too
    on_disk = run.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore(old_layout)))["state"]
    for a, b in zip(jax.tree.leaves(on_disk), jax.tree.leaves(old_layout)):
        np.testing.assert_array_equal(a, b)
    manager = ocp.CheckpointManager(str(tmp_path / "old" / "checkpoints"))
    args = ocp.args.Composite(state=ocp.args.StandardSave(old_layout), loader=ocp.args.JsonSave({"seed": 0, "next_batch": 7}))
    manager.save(7, args=args)
    manager.wait_until_finished()
    restored, loader = checkpoints.restore_checkpoint(manager, 7, state)
    assert loader == {"seed": 0, "next_batch": 7}
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)


def test_sigkilled_run_resumes_to_the_uninterrupted_params(data_dir, tmp_path):
    """With --optimizer muon, whose state (AdamW's and Muon's groups) the checkpoint holds."""
    import jax

    flags = dict(max_iters=40, ckpt_interval=10, eval_interval=10, log_interval=20, keep=2, optimizer="muon", **TINY, **QUIET)
    argv = ["train_jax.py", "--data_dir", data_dir, "--out_dir", str(tmp_path / "killed")]
    argv += [f"--{k}={v!r}" if isinstance(v, str) else f"--{k}={v}" for k, v in flags.items()]
    process = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = tmp_path / "killed" / "checkpoints" / "10"
    while not first.exists() and process.poll() is None:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    steps = sorted(int(name) for name in os.listdir(tmp_path / "killed" / "checkpoints") if name.isdigit())
    assert steps and steps[-1] < 40  # killed part way
    resumed = run(*argv, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {tmp_path / 'killed'} at step {steps[-1]}" in resumed.stderr
    whole = train_jax.fit(train_jax.default_flags(data_dir=data_dir, out_dir=str(tmp_path / "whole"), **flags))
    manager = checkpoints.checkpoint_manager(str(tmp_path / "killed"), 2)
    state, loader = checkpoints.restore_checkpoint(manager, 40, whole["state"])
    assert loader == {"seed": 1337, "next_batch": 40}
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(whole["state"])):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# what a run reports: speed figures, log lines, TensorBoard, samples

PROGRESS = re.compile(r"step (\d+)/(\d+): loss (\d+\.\d{4}), lr (\d\.\de-\d\d), (\d+\.\d) ms/step, ([\d,]+) tok/s, MFU (\d+\.\d)%")


def one_second_per_call():
    """A clock that advances one second at each reading: fit reads it when a logging window starts
    (after the previous read-back's evaluation and checkpoint) and when it ends, so each window lasts 1 s."""
    import itertools

    return functools.partial(next, itertools.count(0.0))


def test_speed_figures_are_over_whole_logging_windows(data_dir, tmp_path, capfd):
    """With 5 steps per 1-second window: 200 ms/step, 5 x 64 tok/s, MFU 5 x FLOPs per step / peak;
    the loop's old bug (the window restarted every step) printed the time of one step divided by 5."""
    flags = tiny_flags(data_dir, tmp_path / "run", max_iters=10, log_interval=5, eval_interval=10, peak_flops=1e9)
    summary = train_jax.fit(flags, clock=one_second_per_call())
    lines = [PROGRESS.fullmatch(line) for line in capfd.readouterr().err.splitlines() if line.startswith("step ") and "/" in line]
    assert [m[1] for m in lines] == ["5", "10"]
    flops_per_step = monitor.flops_per_token(summary["state"]["params"], 2, 16, 16) * 64
    for m in lines:
        assert (m[5], m[6], m[7]) == ("200.0", "320", f"{100 * 5 * flops_per_step / 1e9:.1f}")
        assert float(m[3]) == round(summary["losses"][int(m[1])], 4)
    assert summary["ms_per_step"] == 200.0 and summary["tokens_per_s"] == 320.0


def test_millisecond_steps_are_timed_alone_and_mfu_never_passes_100_percent(data_dir, tmp_path, monkeypatch, capfd):
    """On a clock that runs 1 ms per train step and 1 s per start-up of TensorBoard's writer (which
    imports TensorFlow), every window reads 1.0 ms/step: the writer starts before the first window.
    The steps reach flops_per_step / 1 ms, far above --peak_flops 1e8: one line says the peak is
    wrong, and no MFU is printed (it would read thousands of percent)."""
    now = [0.0]
    compile_programs, summary_writer = train_jax.compile_programs, monitor.summary_writer

    def with_millisecond_steps(*args):
        programs = compile_programs(*args)
        step = programs["step"]
        programs["step"] = lambda *a: (now.__setitem__(0, now[0] + 1e-3), step(*a))[1]
        return programs

    monkeypatch.setattr(train_jax, "compile_programs", with_millisecond_steps)
    monkeypatch.setattr(monitor, "summary_writer", lambda out_dir: (now.__setitem__(0, now[0] + 1.0), summary_writer(out_dir))[1])
    flags = tiny_flags(data_dir, tmp_path / "run", max_iters=10, log_interval=5, eval_interval=10, peak_flops=1e8)
    summary = train_jax.fit(flags, clock=lambda: now[0])
    log = capfd.readouterr().err.splitlines()
    windows = [line.split(", ", 2)[2] for line in log if re.fullmatch(r"step \d+/10: .*", line)]
    assert windows == ["1.0 ms/step, 64,000 tok/s"] * 2 and summary["ms_per_step"] == pytest.approx(1.0)
    flops_per_s = monitor.flops_per_token(summary["state"]["params"], 2, 16, 16) * 64 / 1e-3
    notes = [line for line in log if line.startswith("MFU not shown")]
    assert notes == [f"MFU not shown: the steps ran at {flops_per_s / 1e9:,.1f} GFLOP/s, above the peak of 0.1 GFLOP/s it is "
                     f"measured against: give --peak_flops this device's real peak"]  # fmt: skip


def test_timed_windows_fit_within_the_wall_time_of_a_real_run(data_dir, tmp_path):
    flags = tiny_flags(data_dir, tmp_path / "run", max_iters=40, log_interval=10, eval_interval=20)
    start = time.perf_counter()
    summary = train_jax.fit(flags)
    wall = time.perf_counter() - start
    assert 0 < summary["ms_per_step"] * 40 / 1e3 < wall  # the windows leave out compiling, evaluation and saving


def test_off_a_terminal_the_log_is_the_runs_own_plain_lines_and_nothing_else(data_dir, tmp_path, no_network):
    """One plain line per interval, evaluation, the summary; no '\r' redraws. Nothing else: with libtpu
    installed and no TPU (CI installs the tpu extra) its start-up warnings would come first. Each
    process decides that for itself: JAX_PLATFORMS, which this process may have set, is not passed on.
    A finished run's resume says one line."""
    flags = dict(max_iters=12, log_interval=4, eval_interval=6, ckpt_interval=12, peak_flops=1e12, data_url="")
    argv = ["--data_dir", data_dir, "--out_dir", str(tmp_path / "run"), *(f"--{k}={v}" for k, v in {**TINY, **flags}.items())]
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    trained = subprocess.run([sys.executable, "train_jax.py", *argv], cwd=ROOT, capture_output=True, env=env)  # stderr is a pipe
    assert trained.returncode == 0, trained.stderr
    log = trained.stderr.decode()
    step = lambda n: rf"step {n}/12: loss \d\.\d{{4}}, lr \d\.\de-\d\d, \d+\.\d ms/step, [\d,]+ tok/s, MFU \d+\.\d%"
    evaluation = lambda n: rf"step {n}: train loss \d\.\d{{4}}, val loss \d\.\d{{4}}"
    expected = [
        r"0\.01M params, global batch 4 \(4 per dp\*fsdp rank\) x 1 accumulation = 64 tokens/step, 1 device\(s\) "
        r"\{'dp': 1, 'fsdp': 1, 'tp': 1\}, remat dots, attention math, peak 1,000 GFLOP/s \(--peak_flops\)",
        step(4), step(6), evaluation(6), step(8), step(12), evaluation(12),
        r"\d+\.\d ms/step, [\d,]+ tokens/s over 12 steps",
        rf"best val loss \d\.\d{{4}} at step (6|12); checkpoints in {re.escape(str(tmp_path / 'run'))}/checkpoints",
    ]
    assert "\r" not in log and len(log.splitlines()) == len(expected), log
    assert [bool(re.fullmatch(pattern, line)) for pattern, line in zip(expected, log.splitlines())] == [True] * len(expected), log
    resumed = subprocess.run([sys.executable, "train_jax.py", *argv, "--resume"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert (resumed.returncode, resumed.stderr) == (0, "run is at step 12 of 12: raise --max_iters to continue\n")


def scalars_written(out_dir):
    """{tag: [step, ...]} and {(tag, step): value} of every scalar in a run's TensorBoard event files, read with TensorFlow."""
    import glob

    from formats import import_tensorflow

    tf = import_tensorflow()
    steps, values = {}, {}
    for path in sorted(glob.glob(os.path.join(out_dir, "tensorboard", "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                assert value.metadata.plugin_data.plugin_name in ("scalars", "")  # the metadata comes with a tag's first value
                steps.setdefault(value.tag, []).append(event.step)
                values[value.tag, event.step] = float(tf.make_ndarray(value.tensor))
    return steps, values


def test_tensorboard_curves_go_on_after_a_resume(data_dir, tmp_path):
    flags = dict(log_interval=2, eval_interval=4, ckpt_interval=4, max_iters=10, lr_decay_iters=10)
    first = train_jax.fit(tiny_flags(data_dir, tmp_path / "run", **{**flags, "max_iters": 6}))
    rest = train_jax.fit(tiny_flags(data_dir, tmp_path / "run", **flags, resume=True))
    steps, values = scalars_written(str(tmp_path / "run"))
    train_tags = ("train/loss", "train/lr", "train/grad_norm", "speed/tokens_per_s", "speed/mfu")
    assert {tag: steps[tag] for tag in train_tags} == {tag: [2, 4, 6, 8, 10] for tag in train_tags}
    assert steps["eval/train_loss"] == steps["eval/val_loss"] == [4, 6, 8, 10]
    assert sorted(steps) == sorted([*train_tags, "eval/train_loss", "eval/val_loss"])
    losses = {**first["losses"], **rest["losses"]}
    assert {step: values["train/loss", step] for step in losses} == {step: float(np.float32(v)) for step, v in losses.items()}
    schedule = make_optimizer(**{k: tiny_flags(data_dir, "", **flags)[k] for k in OPTIMIZER_FLAGS})[1]
    assert values["train/lr", 8] == float(np.float32(schedule(7)))  # the rate step 8 was taken with
    assert all(values["train/grad_norm", s] > 0 for s in (2, 4, 6, 8, 10))


def test_a_prompt_outside_a_bytes_vocabulary_is_one_error(data_dir, tmp_path):
    from utils import encode_prompt

    with pytest.raises(UserError, match=re.escape(f"the prompt has a character outside the model's vocabulary of {N_SYMBOLS} tokens")):
        encode_prompt(load_encoder(data_dir), {"n_ctx": 16}, "€", 1)  # the corpus is ASCII
    with pytest.raises(UserError, match=re.escape("--sample_prompt '€': the prompt has a character outside")):
        train_jax.fit(tiny_flags(data_dir, tmp_path / "run", max_iters=1, sample_every=1, sample_prompt="€"))
    assert not (tmp_path / "run").exists()


def test_samples_are_gpt2s_greedy_text_with_the_current_params(data_dir, tmp_path, capfd):
    train_jax.fit(tiny_flags(data_dir, tmp_path / "run", max_iters=4, sample_every=4, sample_prompt="ROMEO:"))
    printed = [line for line in capfd.readouterr().err.splitlines() if line.startswith("step 4 sample: ")]
    _, hparams, params = checkpoints.run_params(str(tmp_path / "run"), 4)  # the step-4 checkpoint, as export writes it
    encoder = load_encoder(str(tmp_path / "run"))
    prompt = encoder.encode("ROMEO:")
    text = encoder.decode(gpt2.generate(prompt, params, hparams["n_head"], 16 - len(prompt), backend="jax"))
    assert printed == [f"step 4 sample: {text!r}"]


def test_resuming_a_finished_run_says_so_and_writes_nothing(data_dir, tmp_path, capfd):
    out = tmp_path / "run"
    train_jax.fit(tiny_flags(data_dir, out, max_iters=4))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    capfd.readouterr()
    argv = ["--data_dir", data_dir, "--out_dir", str(out), "--resume", "--max_iters=4", "--data_url=", "--peak_flops=1e12", "--eval_iters=2"]
    train_jax.cli([*argv, *(f"--{k}={v}" for k, v in TINY.items())])  # returns: exit code 0
    assert capfd.readouterr().err == "run is at step 4 of 4: raise --max_iters to continue\n"
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()} == before


def test_the_peak_is_a_datasheet_figure_per_accelerator_and_the_host_once_on_cpu():
    import types

    import jax

    cpu = jax.devices("cpu")[0]
    assert monitor.peak_flops([cpu] * 8, "float32", 5e9) == (5e9, "--peak_flops")  # 8 faked devices, one host
    h100 = [types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")] * 8
    assert monitor.peak_flops(h100, "bfloat16")[0] == 8 * 989e12 and monitor.peak_flops(h100, "float32")[0] == 8 * 495e12
    assert monitor.peak_flops(h100, "bfloat16", 1e15)[0] == 8e15
    v5e = [types.SimpleNamespace(platform="tpu", device_kind="TPU v5 lite")] * 4
    assert monitor.peak_flops(v5e, "bfloat16")[0] == 4 * 197e12
    unknown = [types.SimpleNamespace(platform="gpu", device_kind="Tesla K80")]
    assert monitor.peak_flops(unknown, "float32") == (None, "Tesla K80 is not in monitor.PEAK_FLOPS: give --peak_flops to see MFU")


def test_export_loads_with_identical_params_and_logits(data_dir, tmp_path):
    from tf_reference import read_checkpoint, variable_shapes

    summary = train_jax.fit(tiny_flags(data_dir, tmp_path / "run", max_iters=6, eval_interval=3, ckpt_interval=100))
    assert summary["best_step"] in (3, 6)
    checkpoints.export(ckpt_dir=str(tmp_path / "run"), out=str(tmp_path / "model"))
    encoder, hparams, params = load_encoder_hparams_and_params(str(tmp_path / "model"))
    assert hparams == {"n_vocab": N_SYMBOLS, "n_ctx": 16, "n_embd": 16, "n_head": 2, "n_layer": 2}
    trained = {p: np.asarray(a) for p, a in flatten(formats.unstacked(summary["state"]["params"])).items()}
    manager = checkpoints.checkpoint_manager(str(tmp_path / "run"), 3)
    if summary["best_step"] != 6:  # export took the best step, not the last
        best, _ = checkpoints.restore_checkpoint(manager, summary["best_step"], summary["state"])
        trained = {p: np.asarray(a) for p, a in flatten(formats.unstacked(best["params"])).items()}
    assert all((flatten(params)[p] == a).all() for p, a in trained.items())  # copied: exactly
    inputs = np.array(encoder.encode("ROMEO: speak"))
    expected = gpt2.gpt2(inputs, **unflatten(trained, 2), n_head=2)
    # The loaded blocks' matrices are the cache's, transposed: BLAS sums their products in another order.
    tolerance = float32_tolerance(np.abs(expected).max(), forward_length(hparams, len(inputs)))
    np.testing.assert_allclose(gpt2.gpt2(inputs, **params, n_head=2), expected, rtol=0, atol=tolerance)
    tf_names = {name: list(a.shape) for name, a in read_checkpoint(str(tmp_path / "model")).items()}
    assert tf_names == variable_shapes(hparams)


def test_export_of_a_padded_vocabulary_keeps_the_tokenizers(data_dir, tmp_path):
    summary = train_jax.fit(tiny_flags(data_dir, tmp_path / "run", max_iters=2, vocab_size=64))
    assert summary["state"]["params"]["wte"].shape == (64, 16)
    checkpoints.export(ckpt_dir=str(tmp_path / "run"), out=str(tmp_path / "model"))
    encoder, hparams, params = load_encoder_hparams_and_params(str(tmp_path / "model"))
    assert hparams["n_vocab"] == len(encoder.encoder) == params["wte"].shape[0] == N_SYMBOLS
    np.testing.assert_array_equal(params["wte"], np.asarray(summary["state"]["params"]["wte"])[:N_SYMBOLS])


# ---------------------------------------------------------------------------------------------
# the command line, end to end


def test_cli_downloads_trains_exports_and_gpt2_generates(tmp_path):
    flags = [f"--{k}={v}" for k, v in {**TINY, "max_iters": 20, "learning_rate": 1e-2, "warmup_iters": 0, "log_interval": 5,
                                       "eval_interval": 10, "peak_flops": 1e12}.items()]  # fmt: skip
    with serve({"input.txt": CORPUS.encode()}) as server:
        trained = run("train_jax.py", "--data_dir", str(tmp_path / "data"), "--data_url", f"{server.url}/input.txt",
                      "--out_dir", str(tmp_path / "out"), *flags)  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    assert server.requests == [("/input.txt", None)]
    assert json.loads((tmp_path / "data" / "meta.json").read_text())["tokenizer"] == "bytes"
    val_losses = [float(line.split("val loss ")[1]) for line in trained.stderr.splitlines() if ", val loss " in line]
    assert len(val_losses) == 2 and val_losses[1] < val_losses[0] < math.log(N_SYMBOLS) - 0.3  # it learned
    assert f"best val loss {min(val_losses):.4f} at step" in trained.stderr and "tok/s, MFU" in trained.stderr
    exported = run("train_jax.py", "export", "--ckpt_dir", str(tmp_path / "out"), "--out", str(tmp_path / "model"))
    assert exported.returncode == 0, exported.stderr
    generated = run("gpt2.py", "ROMEO:", "--model_size", str(tmp_path / "model"), "--n_tokens_to_generate", "5")
    assert generated.returncode == 0, generated.stderr
    encoder, hparams, params = load_encoder_hparams_and_params(str(tmp_path / "model"))
    ids = gpt2.generate(encoder.encode("ROMEO:"), params, hparams["n_head"], 5, backend="numpy")
    assert generated.stdout == encoder.decode(ids) + "\n"


def test_cli_help_shows_every_flag_and_errors_are_one_line(tmp_path):
    shown = run("train_jax.py", "--help", env={**os.environ, "PAGER": "cat"})
    text = shown.stdout + shown.stderr  # fire writes help to stderr when it is not a terminal
    for flag in train_jax.default_flags():
        assert f"--{flag}={flag.upper()}" in text, flag
    assert "--max_iters=MAX_ITERS\n        Default: 2000" in text and "--beta2=BETA2\n        Default: 0.95" in text
    assert "subcommands: train, the default; prepare; export" in text
    failed = run("train_jax.py", "prepare", "--input", str(tmp_path / "none.txt"), "--out", str(tmp_path / "d"))
    assert failed.returncode == 2 and failed.stderr.strip().splitlines() == [
        f"error: --input {str(tmp_path / 'none.txt')!r} is not a file: give the path of a text file"
    ]
