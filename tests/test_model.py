"""gpt2.py and gpt2_pico.py against a TensorFlow port of OpenAI's model.py, on a TF-written checkpoint."""

import jax
import numpy as np
import pytest
from conftest import PROMPT, float32_tolerance, forward_length
from tf_reference import read_checkpoint, reference_greedy, reference_logits

import gpt2
import gpt2_pico
from utils import load_encoder_hparams_and_params


@pytest.fixture(scope="module")
def loaded(tf_model):
    return load_encoder_hparams_and_params(tf_model[0])


@pytest.fixture(scope="module")
def prompt_ids(loaded):
    return loaded[0].encode(PROMPT)


def leaf(params, tf_name):
    """The param-dict entry for a TF name, found by the release naming rule written out here."""
    keys = tf_name.split("/")[1:]  # drop "model"
    node = params
    if keys[0].startswith("h") and keys[0][1:].isdigit():
        node, keys = params["blocks"][int(keys[0][1:])], keys[1:]
    for key in keys:
        node = node[key]
    return node


def test_loaded_dict_equals_what_tensorflow_reads(tf_model, loaded):
    _, hparams, params = loaded
    tf_arrays = read_checkpoint(tf_model[0])
    assert len(tf_arrays) == 4 + 12 * hparams["n_layer"]
    assert len(params["blocks"]) == hparams["n_layer"]
    for name, array in tf_arrays.items():
        expected = array[0] if name.endswith("/w") else array  # conv1d [1, n_in, n_out] -> [n_in, n_out]
        value = leaf(params, name)
        assert isinstance(value, np.ndarray) and value.dtype == np.float32, name
        assert value.shape == expected.shape, name
        np.testing.assert_array_equal(value, expected, err_msg=name)


def jax_logits(ids, params, n_head):
    return np.asarray(jax.jit(gpt2.gpt2, static_argnames="n_head")(np.array(ids), **params, n_head=n_head))


def test_logits_match_tensorflow_reference_on_both_backends(tf_model, loaded, prompt_ids):
    _, hparams, params = loaded
    expected = reference_logits(tf_model[0], prompt_ids)  # [n_seq, n_vocab]
    assert np.abs(expected).max() > 5, "the test model should have logits of magnitude ~10"
    numpy_logits = gpt2.gpt2(np.array(prompt_ids), **params, n_head=hparams["n_head"])
    logits_jax = jax_logits(prompt_ids, params, hparams["n_head"])
    tolerance = float32_tolerance(np.abs(expected).max(), forward_length(hparams, len(prompt_ids)))  # all three in float32
    np.testing.assert_allclose(numpy_logits, expected, atol=tolerance, rtol=0)
    np.testing.assert_allclose(logits_jax, expected, atol=tolerance, rtol=0)
    assert np.abs(numpy_logits - logits_jax).max() <= tolerance


def test_float32_end_to_end(loaded, prompt_ids):
    """NumPy 2 promotes float32 with a float64 scalar to float64; nothing in the model may do that."""
    _, hparams, params = loaded
    x = np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4)
    g, b = np.ones(4, np.float32), np.zeros(4, np.float32)
    for fn in (gpt2.gelu, gpt2.softmax, lambda x: gpt2.layer_norm(x, g, b), gpt2_pico.gelu, gpt2_pico.softmax):
        assert fn(x).dtype == np.float32
    assert gpt2.gpt2(np.array(prompt_ids), **params, n_head=hparams["n_head"]).dtype == np.float32
    assert gpt2_pico.gpt2(list(prompt_ids), **params, n_head=hparams["n_head"]).dtype == np.float32
    assert jax_logits(prompt_ids, params, hparams["n_head"]).dtype == np.float32


@pytest.mark.parametrize("backend", gpt2.BACKENDS)
def test_greedy_ids_equal_reference(tf_model, loaded, prompt_ids, backend):
    _, hparams, params = loaded
    expected = reference_greedy(tf_model[0], prompt_ids, 8)
    assert gpt2.generate(prompt_ids, params, hparams["n_head"], 8, backend) == expected


def test_pico_equals_gpt2(loaded, prompt_ids):
    _, hparams, params = loaded
    pico = gpt2_pico.generate(list(prompt_ids), params, hparams["n_head"], 8)
    assert pico == gpt2.generate(prompt_ids, params, hparams["n_head"], 8, "numpy")
    expected = gpt2.gpt2(np.array(prompt_ids), **params, n_head=hparams["n_head"])
    tolerance = float32_tolerance(np.abs(expected).max(), forward_length(hparams, len(prompt_ids)))  # the same math, summed in another order
    np.testing.assert_allclose(gpt2_pico.gpt2(list(prompt_ids), **params, n_head=hparams["n_head"]), expected, atol=tolerance, rtol=0)
