"""Loading, the converted cache and saving, checked against what TensorFlow writes and reads."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, SMALL_HPARAMS
from tf_reference import read_checkpoint, write_release_checkpoint

from cli import UserError
from formats import CACHE_FILE, RELEASE_FILES, flatten, save_gpt2_checkpoint
from utils import load_encoder_hparams_and_params


def assert_params_equal(a, b):
    flat_a, flat_b = flatten(a), flatten(b)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        assert flat_a[key].dtype == flat_b[key].dtype == np.float32, key
        np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=key)


def test_save_load_is_bit_exact_and_tensorflow_reads_it(tf_model, tmp_path):
    model_dir, written = tf_model
    _, hparams, params = load_encoder_hparams_and_params(model_dir)
    out = str(tmp_path / "saved")
    save_gpt2_checkpoint(params, hparams, out, vocab_dir=model_dir)
    assert set(RELEASE_FILES) <= set(os.listdir(out))
    with open(os.path.join(out, "checkpoint")) as f:
        assert f.readline().strip() == 'model_checkpoint_path: "model.ckpt"'  # relative: the folder can move
    tf_arrays = read_checkpoint(out)  # TensorFlow's own reader: TF names, [1, n_in, n_out] conv shapes
    assert tf_arrays.keys() == written.keys()
    for name, array in written.items():
        assert tf_arrays[name].shape == array.shape, name
        np.testing.assert_array_equal(tf_arrays[name], array, err_msg=name)
    for name in ("encoder.json", "vocab.bpe"):
        with open(os.path.join(out, name), "rb") as saved, open(os.path.join(model_dir, name), "rb") as original:
            assert saved.read() == original.read()
    _, hparams_again, params_again = load_encoder_hparams_and_params(out)
    assert hparams_again == hparams
    assert_params_equal(params_again, params)


def test_cached_load_needs_no_tensorflow(model_copy):
    load_encoder_hparams_and_params(model_copy)  # converts and writes the cache
    assert os.path.exists(os.path.join(model_copy, CACHE_FILE))
    code = (
        "import sys, utils; utils.load_encoder_hparams_and_params(sys.argv[1]); "
        "print('tensorflow' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code, model_copy], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
    assert "converting" not in result.stderr


def test_cache_is_rebuilt_when_the_checkpoint_changes(model_copy, vocab_dir):
    _, _, before = load_encoder_hparams_and_params(model_copy)
    new_weights = write_release_checkpoint(model_copy, SMALL_HPARAMS, seed=1, vocab_dir=vocab_dir)
    _, _, after = load_encoder_hparams_and_params(model_copy)
    np.testing.assert_array_equal(after["wte"], new_weights["model/wte"])
    np.testing.assert_array_equal(after["blocks"][1]["mlp"]["c_fc"]["w"], new_weights["model/h1/mlp/c_fc/w"][0])
    assert not np.array_equal(after["wte"], before["wte"])


def replace_file(path, content):
    """A new file in place of `path`: params memory-mapped from the old one stay readable."""
    os.remove(path)
    with open(path, "wb") as f:
        f.write(content)


def truncated_cache(model_dir):
    with open(os.path.join(model_dir, CACHE_FILE), "rb") as f:
        return f.read()[:-100]


@pytest.mark.parametrize(
    "garbage",
    [
        lambda _: b"not safetensors",
        lambda _: (2**40).to_bytes(8, "little") + b"{}",  # a header longer than the file
        lambda _: (9).to_bytes(8, "little") + b"[1, 2, 3]",  # a header that is no object
        truncated_cache,  # data_offsets past the end
    ],
)
def test_unreadable_cache_is_rebuilt(model_copy, garbage, capfd):
    _, _, expected = load_encoder_hparams_and_params(model_copy)
    replace_file(os.path.join(model_copy, CACHE_FILE), garbage(model_copy))
    _, _, params = load_encoder_hparams_and_params(model_copy)
    assert_params_equal(params, expected)
    assert "rebuilding" in capfd.readouterr().err


class Exploit:
    def __reduce__(self):
        return (open, (os.environ["EXPLOIT_MARKER"], "w"))


def test_pickle_disguised_as_cache_is_never_executed(model_copy, tmp_path, monkeypatch):
    _, _, expected = load_encoder_hparams_and_params(model_copy)
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EXPLOIT_MARKER", str(marker))
    replace_file(os.path.join(model_copy, CACHE_FILE), pickle.dumps({"wte": Exploit()}))
    _, _, params = load_encoder_hparams_and_params(model_copy)
    assert not marker.exists()
    assert_params_equal(params, expected)


def corrupt(model_dir, name, how):
    path = os.path.join(model_dir, name)
    with open(path, "r+b") as f:
        if how == "truncate":
            f.truncate(os.path.getsize(path) // 2)
        else:  # flip one bit in the middle
            f.seek(os.path.getsize(path) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x10]))


@pytest.mark.parametrize("how", ["truncate", "bitflip"])
def test_corrupt_checkpoint_is_a_clear_error(model_copy, how):
    corrupt(model_copy, "model.ckpt.data-00000-of-00001", how)
    with pytest.raises(UserError, match="corrupt or truncated.*model.ckpt"):
        load_encoder_hparams_and_params(model_copy)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("hparams.json", "{not json", "hparams.json is corrupt"),
        ("hparams.json", '{"n_vocab": 50257}', "hparams.json is corrupt"),
        ("encoder.json", '{"a": ', "encoder.json or vocab.bpe .* corrupt"),
        ("vocab.bpe", "#version: 0.2\nĠ t h e\n", "encoder.json or vocab.bpe .* corrupt"),
    ],
)
def test_garbled_side_files_are_clear_errors(model_copy, name, content, message):
    with open(os.path.join(model_copy, name), "w") as f:
        f.write(content)
    with pytest.raises(UserError, match=message):
        load_encoder_hparams_and_params(model_copy)


def test_folder_missing_a_file_is_not_a_checkpoint(model_copy):
    os.remove(os.path.join(model_copy, "model.ckpt.index"))
    with pytest.raises(UserError, match="not a complete checkpoint: missing model.ckpt.index"):
        load_encoder_hparams_and_params(model_copy)
