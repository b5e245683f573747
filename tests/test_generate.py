"""Fast generation: the KV cache against full recompute, batching, sampling, streaming, compiling once."""

import logging
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import PROMPT, ROOT, float32_tolerance, forward_length
from tf_reference import reference_greedy

import gpt2
from utils import load_encoder_hparams_and_params

PROMPTS = [PROMPT, "Hi", "The quick brown fox jumps over the lazy dog, and then it", "\n\n"]


@pytest.fixture(scope="module")
def loaded(tf_model):
    return load_encoder_hparams_and_params(tf_model[0])


@pytest.fixture(scope="module")
def prompts_ids(loaded):
    return [loaded[0].encode(p) for p in PROMPTS]


@pytest.mark.parametrize("backend", gpt2.BACKENDS)
def test_cached_decode_equals_full_recompute(loaded, prompts_ids, backend):
    """Every step's logits from the cache match a full forward pass of the sequence so far."""
    _, hparams, params = loaded
    n_head, inputs, n_new = hparams["n_head"], prompts_ids[0], 12
    params = gpt2.to_backend(params, backend)
    forward = jax.jit(gpt2.gpt2, static_argnames="n_head") if backend == "jax" else gpt2.gpt2
    prefill = jax.jit(gpt2.prefill, static_argnums=(3, 4)) if backend == "jax" else gpt2.prefill
    decode = jax.jit(gpt2.decode, static_argnums=5) if backend == "jax" else gpt2.decode
    logits, cache = prefill(params, np.array(inputs), 0, n_head, len(inputs) + n_new)
    sequence = list(inputs)
    for _ in range(n_new):
        full = np.asarray(forward(np.array(sequence), **params, n_head=n_head))[-1]  # [n_vocab]
        tolerance = float32_tolerance(np.abs(full).max(), forward_length(hparams, len(sequence)))  # the cache sums in another order
        np.testing.assert_allclose(np.asarray(logits), full, atol=tolerance, rtol=0)
        sequence.append(int(np.argmax(full)))
        logits, cache = decode(params, np.array(sequence[-1:]), cache, len(sequence) - 1, 0, n_head)
    assert np.asarray(logits).dtype == np.float32


@pytest.mark.parametrize("backend", gpt2.BACKENDS)
def test_cached_greedy_equals_tensorflow_reference(tf_model, loaded, prompts_ids, backend):
    _, hparams, params = loaded
    expected = reference_greedy(tf_model[0], prompts_ids[0], 20)
    assert gpt2.generate(prompts_ids[0], params, hparams["n_head"], 20, backend) == expected


@pytest.mark.parametrize("backend", gpt2.BACKENDS)
def test_ragged_batch_equals_one_by_one(loaded, prompts_ids, backend):
    _, hparams, params = loaded
    alone = [gpt2.generate(ids, params, hparams["n_head"], 10, backend) for ids in prompts_ids]
    assert gpt2.generate_batch(prompts_ids, params, hparams["n_head"], 10, backend) == alone


def test_jax_batch_equals_numpy(loaded, prompts_ids):
    _, hparams, params = loaded
    batch = [gpt2.generate_batch(prompts_ids, params, hparams["n_head"], 10, b) for b in gpt2.BACKENDS]
    assert batch[0] == batch[1]


@pytest.mark.parametrize("backend", gpt2.BACKENDS)
def test_sampling_is_reproducible_by_seed(loaded, prompts_ids, backend):
    _, hparams, params = loaded

    def sample(seed):
        return gpt2.generate_batch(
            prompts_ids, params, hparams["n_head"], 10, backend, temperature=1.0, top_k=50, top_p=0.9, seed=seed
        )

    first = sample(seed=7)
    assert sample(seed=7) == first
    assert sample(seed=8) != first
    greedy = gpt2.generate_batch(prompts_ids, params, hparams["n_head"], 10, backend)
    assert first != greedy


@pytest.mark.parametrize("backend", gpt2.BACKENDS)
def test_top_k_1_is_greedy(loaded, prompts_ids, backend):
    _, hparams, params = loaded
    greedy = gpt2.generate_batch(prompts_ids, params, hparams["n_head"], 10, backend)
    top1 = gpt2.generate_batch(prompts_ids, params, hparams["n_head"], 10, backend, temperature=1.5, top_k=1, seed=3)
    assert top1 == greedy


def reference_top_p_keep(logits, top_p):
    """The smallest set of most likely tokens whose probability reaches top_p, by a plain loop."""
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    keep, mass = set(), 0.0
    for i in np.argsort(-logits):
        keep.add(int(i))
        mass += probs[i]
        if mass >= top_p:
            return keep
    return keep


@pytest.mark.parametrize("xp_name", ["numpy", "jax"])
def test_filters_match_their_definitions(xp_name):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4, 500)).astype(np.float32)
    xs = jax.numpy.asarray(logits) if xp_name == "jax" else logits
    np.testing.assert_array_equal(np.asarray(gpt2.filter_logits(xs, top_k=0, top_p=1.0)), logits)
    kept = np.isfinite(np.asarray(gpt2.filter_logits(xs, top_k=17)))
    assert (kept.sum(-1) == 17).all()
    assert (kept == (logits >= np.sort(logits, -1)[:, -17:-16])).all()
    for top_p in (0.05, 0.5, 0.9):
        kept = np.isfinite(np.asarray(gpt2.filter_logits(xs, top_p=top_p)))
        for row, expected in zip(kept, (reference_top_p_keep(r, top_p) for r in logits)):
            assert set(np.flatnonzero(row)) == expected


@pytest.mark.parametrize("backend", gpt2.BACKENDS)
def test_plain_sampling_follows_softmax(backend):
    """top_k=0, top_p=1: next_token draws from softmax(logits / temperature) (chi-square test)."""
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], np.float32)
    temperature, n = 0.8, 40_000
    batch = np.broadcast_to(logits, (n, len(logits)))
    if backend == "jax":
        gumbel = jax.random.gumbel(jax.random.key(0), batch.shape)
        tokens = np.asarray(gpt2.next_token(jax.numpy.asarray(batch), temperature, 0, 1.0, gumbel))
    else:
        gumbel = np.random.default_rng(0).gumbel(size=batch.shape).astype(np.float32)
        tokens = gpt2.next_token(batch, temperature, 0, 1.0, gumbel)
    expected = n * np.exp(logits / temperature) / np.exp(logits / temperature).sum()
    observed = np.bincount(tokens, minlength=len(logits))
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert chi2 < 20.5  # 99.9th percentile of chi-square with 5 degrees of freedom


@pytest.mark.parametrize("backend", gpt2.BACKENDS)
def test_stops_at_end_of_text(loaded, prompts_ids, backend):
    """With eot set to a token greedy decoding produces, each sequence ends right before it."""
    _, hparams, params = loaded
    full = gpt2.generate_batch(prompts_ids[:2], params, hparams["n_head"], 10, backend)
    eot = full[0][4]
    stopped = gpt2.generate_batch(prompts_ids[:2], params, hparams["n_head"], 10, backend, eot=eot)
    for output, whole in zip(stopped, full):
        cut = whole.index(eot) if eot in whole else len(whole)
        assert output == whole[:cut]


def test_jax_step_compiles_once(loaded, prompts_ids, caplog):
    _, hparams, params = loaded
    inputs = prompts_ids[2][:5]  # a shape no other test compiles
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        first = gpt2.generate(inputs, params, hparams["n_head"], 30, "jax")
        compiled_first = sum("Compiling jit(step)" in r.getMessage() for r in caplog.records)
        caplog.clear()
        assert gpt2.generate(inputs, params, hparams["n_head"], 30, "jax") == first
        compiled_again = sum("Compiling" in r.getMessage() for r in caplog.records)
    assert compiled_first == 1
    assert compiled_again == 0


def test_jax_stream_queues_the_next_step_before_handing_out_tokens(loaded, prompts_ids, monkeypatch):
    """When a token reaches the caller, the step after it has been dispatched already (JAX runs it
    while the host prints), and no step runs past the last token."""
    _, hparams, params = loaded
    jax_programs, slots = gpt2.jax_programs, []

    def counting_programs(*shape):
        prefill_batch, step = jax_programs(*shape)
        return prefill_batch, lambda params, logits, cache, slot, *rest: slots.append(slot) or step(params, logits, cache, slot, *rest)

    monkeypatch.setattr(gpt2, "jax_programs", counting_programs)
    inputs = prompts_ids[0]
    streamed = []
    for tokens in gpt2.stream([inputs], gpt2.to_backend(params, "jax"), hparams["n_head"], 4, "jax"):
        streamed.append((int(tokens[0]), len(slots)))
    assert [n for _, n in streamed] == [2, 3, 4, 4]
    assert slots == [len(inputs) + t for t in range(4)]
    assert [token for token, _ in streamed] == gpt2.generate(inputs, params, hparams["n_head"], 4, "numpy")


@pytest.fixture(scope="module")
def wide_margin_model(tmp_path_factory, vocab_dir):
    """A checkpoint with logits ~40 wide."""
    from conftest import SMALL_HPARAMS
    from tf_reference import write_release_checkpoint

    model_dir = str(tmp_path_factory.mktemp("wide") / "model")
    write_release_checkpoint(model_dir, SMALL_HPARAMS, seed=3, logit_scale=40.0, vocab_dir=vocab_dir)
    return load_encoder_hparams_and_params(model_dir)


@pytest.mark.parametrize("batch", [1, 3])
def test_compiled_step_updates_the_cache_in_place(loaded, batch):
    """The decode step writes one slot per buffer and copies no cache-sized array (XLA did, for a
    vmapped axis of size 1), so its cost does not grow with the cache beyond reading it."""
    _, hparams, params = loaded
    n_head, n_max = hparams["n_head"], 61  # a length no other dimension has
    _, step = gpt2.jax_programs(n_head, n_max, batch, 0.0, 0, 1.0)
    cache = gpt2.empty_cache(params, n_head, n_max)
    if batch > 1:
        cache = jax.tree.map(lambda a: np.stack([a] * batch), cache)
    logits, pad = np.zeros((batch, hparams["n_vocab"]), np.float32), np.zeros(batch, np.int32)
    hlo = step.lower(params, logits, cache, 5, pad, jax.random.key(0)).compile().as_text()
    entry = hlo[hlo.index("ENTRY") :].splitlines()
    result_dims = [re.search(r"= [a-z0-9]+\[([0-9,]*)\]", line) for line in entry]
    ops = [(line, match[1].split(",")) for line, match in zip(entry, result_dims) if match]
    assert not [line for line, dims in ops if str(n_max) in dims and " copy(" in line]
    assert sum("dynamic-update-slice" in line.split("=")[0] for line, _ in ops) == 2 * hparams["n_layer"]


@pytest.mark.parametrize("batch", [1, 3])
def test_weights_stored_transposed_go_on_the_device_as_stored_and_compute_the_same(loaded, prompts_ids, batch):
    """The cache's [n_out, n_in] block matrices become `w_t` without a copy, on the device and in the
    compiled step (XLA copied a transposed weight once per step when asked to: 10x slower), and give
    the logits and tokens that the same weights in [n_in, n_out] give."""
    from formats import flatten, unflatten

    _, hparams, params = loaded
    n_head, n_layer = hparams["n_head"], hparams["n_layer"]
    stored = gpt2.to_backend(params, "jax")
    plain = gpt2.to_backend(unflatten({p: np.ascontiguousarray(a) for p, a in flatten(params).items()}, n_layer), "jax")
    for block, on_device in zip(params["blocks"], stored["blocks"]):
        for group, name in (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj")):
            w, w_t = block[group][name]["w"], on_device[group][name]["w_t"]
            assert on_device[group][name].keys() == {"w_t", "b"} and w_t.shape == w.shape[::-1]
            assert w_t.unsafe_buffer_pointer() == w.T.ctypes.data  # the memory-mapped cache itself
    assert plain["blocks"][0]["mlp"]["c_fc"].keys() == {"w", "b"}
    prompts = prompts_ids[:batch]
    assert gpt2.generate_batch(prompts, stored, n_head, 8) == gpt2.generate_batch(prompts, plain, n_head, 8)

    n_max = 20
    prefill, step = gpt2.jax_programs(n_head, n_max, batch, 0.0, 0, 1.0)
    inputs, pad = np.full((batch, 6), 100, np.int32), np.zeros(batch, np.int32)
    (logits, cache), (plain_logits, _) = prefill(stored, inputs, pad), prefill(plain, inputs, pad)
    tolerance = float32_tolerance(np.abs(np.asarray(plain_logits)).max(), forward_length(hparams, 6))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(plain_logits), atol=tolerance, rtol=0)
    hlo = step.lower(stored, logits, cache, 6, pad, jax.random.key(0)).compile().as_text()
    n_embd = hparams["n_embd"]
    weight_shapes = {f"[{a},{b}]" for m in (3, 4) for a, b in ((m * n_embd, n_embd), (n_embd, m * n_embd))}
    results = [re.search(r"= f32(\[[0-9,]*\])", line) for line in hlo.splitlines() if "parameter(" not in line]
    assert not {match[1] for match in results if match} & weight_shapes  # in the program and inside its fusions


def test_cpu_step_keeps_each_reduction_one_kernel(loaded):
    """XLA would split the layer norms' and softmax's reductions into reduce-windows and a reduce."""
    _, hparams, params = loaded
    n_head, n_max = hparams["n_head"], 20
    _, step = gpt2.jax_programs(n_head, n_max, 1, 0.0, 0, 1.0)
    logits, pad = np.zeros((1, hparams["n_vocab"]), np.float32), np.zeros(1, np.int32)
    hlo = step.lower(params, logits, gpt2.empty_cache(params, n_head, n_max), 5, pad, jax.random.key(0)).compile().as_text()
    assert " reduce(" in hlo
    assert "reduce-window" not in hlo


def test_bfloat16_greedy_matches_float32_where_margins_are_large(wide_margin_model):
    """bfloat16 keeps ~3 significant digits: along float32's greedy path its logits stay within
    `error` of float32's, so every token whose float32 top-2 margin exceeds 2 * error is the same."""
    encoder, hparams, params = wide_margin_model
    n_head, inputs, n_new = hparams["n_head"], encoder.encode(PROMPT), 12
    expected = gpt2.generate(inputs, params, n_head, n_new, "numpy")
    bf16 = gpt2.to_backend(params, "jax", "bfloat16")
    assert bf16["wte"].dtype == jax.numpy.bfloat16
    sequence = np.array(inputs + expected)  # [n_seq]
    f32_logits = gpt2.gpt2(sequence, **params, n_head=n_head)[len(inputs) - 1 : -1]  # [n_new, n_vocab]
    bf16_logits = np.asarray(jax.jit(gpt2.gpt2, static_argnames="n_head")(sequence, **bf16, n_head=n_head))
    bf16_logits = bf16_logits[len(inputs) - 1 : -1].astype(np.float32)  # [n_new, n_vocab]
    error = np.abs(bf16_logits - f32_logits).max()
    assert error < 0.05 * np.abs(f32_logits).max()
    top2 = np.sort(f32_logits, axis=-1)[:, -2:]  # [n_new, 2]
    sure = top2[:, 1] - top2[:, 0] > 2 * error  # [n_new]
    assert sure[0] and sure.sum() >= n_new // 2, "most tokens should be clear choices on this model"
    assert (bf16_logits.argmax(-1)[sure] == np.array(expected)[sure]).all()
    n_sure = int(np.argmin(sure)) if not sure.all() else n_new  # its own path agrees up to a close call
    tokens = gpt2.stream([inputs], bf16, n_head, n_sure, "jax")
    assert [int(t[0]) for t in tokens] == expected[:n_sure]
    assert gpt2.generate(inputs, bf16, n_head, n_sure, "jax") == expected[:n_sure]
    assert gpt2.to_backend(bf16, "jax")["wte"].dtype == jax.numpy.bfloat16  # generate keeps the dtype


def test_print_stream_holds_split_characters(capsys, vocab_dir):
    from encoder import load_encoder

    encoder = load_encoder(vocab_dir)
    text = "naïve 😀 中文 done"
    ids = encoder.encode(text)
    assert any("\ufffd" in encoder.decode([i]) for i in ids), "some token should hold part of a character"
    gpt2.print_stream(encoder, iter(ids))
    assert capsys.readouterr().out == text + "\n"


def run_cli(*args):
    return subprocess.run([sys.executable, "gpt2.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_streamed_cli_output_equals_generated_text(tf_model, loaded, prompts_ids):
    encoder, hparams, params = loaded
    expected = encoder.decode(gpt2.generate(prompts_ids[0], params, hparams["n_head"], 15, "numpy"))
    result = run_cli(PROMPT, "-n", "15", "--model_size", tf_model[0], "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_cli_batches_prompts_from_arguments_and_a_file(tf_model, loaded, prompts_ids, tmp_path):
    encoder, hparams, params = loaded
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(f"{PROMPTS[2]}\n\n", encoding="utf-8")  # blank lines are skipped
    result = run_cli(*PROMPTS[:2], "--prompts_file", str(prompts_file), "-n", "6", "--model_size", tf_model[0])
    assert result.returncode == 0, result.stderr
    outputs = gpt2.generate_batch(prompts_ids[:3], params, hparams["n_head"], 6, "numpy")
    expected = [encoder.decode(ids) for ids in outputs]
    assert result.stdout == f"\n{gpt2.SEPARATOR}\n".join(expected) + "\n"


def test_cli_sampling_is_reproducible(tf_model):
    args = [PROMPT, "-n", "10", "--model_size", tf_model[0], "--temperature", "1.0", "--top_p", "0.95"]
    first, again = run_cli(*args, "--seed", "5"), run_cli(*args, "--seed", "5")
    assert first.returncode == 0, first.stderr
    assert first.stdout == again.stdout
    assert run_cli(*args, "--seed", "6").stdout != first.stdout

