"""Hugging Face folders and hub ids in, HF folders out, training runs as models.

The HF weights read here are written by the `safetensors` library itself, with HF's names made by
hand from the TensorFlow-written checkpoint; the hub is the local HTTP server answering as the hub.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import PROMPT, ROOT, SMALL_HPARAMS
from http_server import serve
from test_train import CORPUS, QUIET, TINY, data_dir  # noqa: F401 (data_dir: a fixture, the corpus prepared as bytes)

import train_jax
import aot
import checkpoints
from cli import UserError
from encoder import load_encoder
from formats import CACHE_FILE, OLD_CACHE_FILE, flatten, save_hf_checkpoint
from utils import load_encoder_hparams_and_params

COMMIT = "0123456789abcdef0123456789abcdef01234567"
HF_CONFIG = {
    "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-05, "n_ctx": SMALL_HPARAMS["n_ctx"], "n_positions": SMALL_HPARAMS["n_ctx"],
    "n_embd": SMALL_HPARAMS["n_embd"], "n_head": SMALL_HPARAMS["n_head"], "n_layer": SMALL_HPARAMS["n_layer"],
    "vocab_size": SMALL_HPARAMS["n_vocab"], "bos_token_id": 50256, "eos_token_id": 50256,
}  # fmt: skip


def hf_name(tf_name, prefix):
    """'model/h0/attn/c_attn/w' -> prefix + 'h.0.attn.c_attn.weight', as HF's GPT-2 names it."""
    keys = tf_name.removeprefix("model/").split("/")
    if keys[0].startswith("h"):
        keys[0:1] = ["h", keys[0][1:]]
    last = {"w": "weight", "g": "weight", "b": "bias"}.get(keys[-1])
    return prefix + ".".join(keys[:-1] + [last] if last else keys + ["weight"])


def write_hf_folder(folder, tf_arrays, vocab_dir, prefix="", extras=True):
    """An HF GPT-2 folder written with the safetensors library: conv weights squeezed to [n_in, n_out]
    (HF's Conv1D), with the attention-mask buffers and a tied lm_head when `extras`."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    tensors = {hf_name(name, prefix): np.ascontiguousarray(a[0] if a.ndim == 3 else a) for name, a in tf_arrays.items()}
    if extras:
        n_ctx = SMALL_HPARAMS["n_ctx"]
        for i in range(SMALL_HPARAMS["n_layer"]):
            tensors[f"{prefix}h.{i}.attn.bias"] = np.tril(np.ones((n_ctx, n_ctx), np.float32))[None, None]
            tensors[f"{prefix}h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
        tensors["lm_head.weight"] = tf_arrays["model/wte"]
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(HF_CONFIG, f)
    with open(os.path.join(vocab_dir, "encoder.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False, separators=(",", ":"))  # HF's formatting, not OpenAI's
    shutil.copyfile(os.path.join(vocab_dir, "vocab.bpe"), os.path.join(folder, "merges.txt"))
    return folder


@pytest.fixture(scope="module")
def hf_folder(tf_model, vocab_dir, tmp_path_factory):
    return write_hf_folder(str(tmp_path_factory.mktemp("hf") / "gpt2"), tf_model[1], vocab_dir)


def assert_same_params(a, b):
    flat_a, flat_b = flatten(a), flatten(b)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        assert flat_a[key].dtype == np.float32, key
        np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=key)


@pytest.mark.parametrize("prefix, extras", [("", True), ("transformer.", False)])
def test_hf_folder_loads_to_the_tensorflow_checkpoints_params(tf_model, vocab_dir, tmp_path, prefix, extras):
    folder = write_hf_folder(str(tmp_path / "hf"), tf_model[1], vocab_dir, prefix, extras)
    encoder, hparams, params = load_encoder_hparams_and_params(folder)
    _, expected_hparams, expected = load_encoder_hparams_and_params(tf_model[0])
    assert hparams == expected_hparams
    assert_same_params(params, expected)
    assert encoder.encode(PROMPT) == load_encoder(vocab_dir).encode(PROMPT)


TEXTS = [PROMPT, "", " leading space", "Ünïcödé — “quotes” 🙂 and 中文", "it's they've\n\n  spaced\ttabs", "<|endoftext|> x" * 3]


@pytest.mark.parametrize("fast", [True, False])
def test_vocab_json_and_merges_txt_encode_as_encoder_json_and_vocab_bpe(hf_folder, vocab_dir, fast):
    hf, openai = load_encoder(hf_folder, fast=fast), load_encoder(vocab_dir, fast=fast)
    assert hf.encoder == openai.encoder and hf.bpe_ranks == openai.bpe_ranks
    for text in TEXTS:
        assert hf.encode(text) == openai.encode(text), text


def test_hf_export_reads_back_exactly_and_safetensors_reads_it(tf_model, tmp_path):
    from safetensors import safe_open

    _, hparams, params = load_encoder_hparams_and_params(tf_model[0])
    out = str(tmp_path / "export")
    save_hf_checkpoint(params, hparams, out, tf_model[0])
    assert {"config.json", "model.safetensors", "generation_config.json", "vocab.json", "merges.txt"} <= set(os.listdir(out))
    _, hparams_again, params_again = load_encoder_hparams_and_params(out)
    assert hparams_again == hparams
    assert_same_params(params_again, params)
    with safe_open(os.path.join(out, "model.safetensors"), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}  # transformers refuses files without it
        names = set(f.keys())
        assert names == {hf_name(name, "transformer.") for name in tf_model[1]}  # the names save_pretrained writes
        for name, array in tf_model[1].items():
            np.testing.assert_array_equal(f.get_tensor(hf_name(name, "transformer.")), array[0] if array.ndim == 3 else array)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["vocab_size"] == hparams["n_vocab"]


def test_an_old_params_npz_is_replaced_by_the_safetensors_cache(model_copy):
    np.savez(os.path.join(model_copy, OLD_CACHE_FILE), wte=np.zeros(3, np.float32))
    load_encoder_hparams_and_params(model_copy)
    assert os.path.exists(os.path.join(model_copy, CACHE_FILE))
    assert not os.path.exists(os.path.join(model_copy, OLD_CACHE_FILE))


def test_the_cache_keeps_the_blocks_matrices_transposed_and_loads_them_as_tensorflow_wrote_them(tf_model, model_copy):
    """Read by the safetensors library: the blocks' matrices [n_out, n_in], the rest as TF wrote it;
    loaded, every param is TF's [n_in, n_out] again."""
    from safetensors import safe_open

    _, _, params = load_encoder_hparams_and_params(model_copy)
    with safe_open(os.path.join(model_copy, CACHE_FILE), framework="numpy") as f:
        assert set(f.keys()) == {hf_name(name, "transformer.") for name in tf_model[1]}
        assert f.metadata()["layout"] == "blocks' matrices [n_out, n_in]"
        for name, array in tf_model[1].items():
            matrix = array.ndim == 3  # a conv weight [1, n_in, n_out]
            np.testing.assert_array_equal(f.get_tensor(hf_name(name, "transformer.")), array[0].T if matrix else array, err_msg=name)
    loaded = flatten(params)
    for name, array in tf_model[1].items():
        path = re.sub(r"^h(\d+)/", r"blocks/\1/", name.removeprefix("model/"))
        np.testing.assert_array_equal(loaded[path], array[0] if array.ndim == 3 else array, err_msg=name)


def test_a_cache_of_the_untransposed_layout_is_rebuilt(tf_model, model_copy):
    """The layout is part of the fingerprint: a cache in HF's [n_in, n_out] with the checkpoint's
    fingerprint as computed before the layout changed is converted again, not misread."""
    import hashlib

    from safetensors.numpy import save_file

    digest = hashlib.sha256()  # the fingerprint of the earlier layout: the files alone
    for name in ("checkpoint", "model.ckpt.data-00000-of-00001", "model.ckpt.index"):
        path = os.path.join(model_copy, name)
        digest.update(f"{name}:{os.path.getsize(path)}:{os.stat(path).st_mtime_ns}".encode())
    digest.update(open(os.path.join(model_copy, "model.ckpt.index"), "rb").read())
    old = {hf_name(name, "transformer."): np.ascontiguousarray(a[0] if a.ndim == 3 else a) for name, a in tf_model[1].items()}
    save_file(old, os.path.join(model_copy, CACHE_FILE), metadata={"format": "pt", "fingerprint": digest.hexdigest()})
    _, _, params = load_encoder_hparams_and_params(model_copy)
    np.testing.assert_array_equal(params["blocks"][0]["attn"]["c_proj"]["w"], tf_model[1]["model/h0/attn/c_proj/w"][0])  # square: misread, it would be its transpose
    from safetensors import safe_open

    with safe_open(os.path.join(model_copy, CACHE_FILE), framework="numpy") as f:
        assert "layout" in f.metadata()


def test_cached_params_are_views_of_the_memory_mapped_cache(model_copy):
    load_encoder_hparams_and_params(model_copy)
    _, _, params = load_encoder_hparams_and_params(model_copy)
    import mmap

    def mapping_of(array):  # the object whose memory an array views
        while isinstance(array, (np.ndarray, memoryview)):
            array = array.obj if isinstance(array, memoryview) else array.base
        return array

    assert all(isinstance(mapping_of(a), mmap.mmap) and not a.flags.writeable for a in flatten(params).values())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "llama"}, "describes a 'llama' model, not GPT-2"),
        ({"activation_function": "relu"}, "sets activation_function='relu'"),
        ({"n_head": 0}, "needs positive integers"),
    ],
)
def test_a_config_that_is_no_gpt2_is_one_error(hf_folder, tmp_path, change, message):
    folder = shutil.copytree(hf_folder, tmp_path / "other")
    (folder / "config.json").write_text(json.dumps({**HF_CONFIG, **change}))
    with pytest.raises(UserError, match=message):
        load_encoder_hparams_and_params(str(folder))


def test_a_step_of_a_model_folder_is_an_error(hf_folder):
    with pytest.raises(UserError, match="--step 3 picks a checkpoint of a training run"):
        load_encoder_hparams_and_params(hf_folder, step=3)


def test_an_hf_folder_missing_a_file_names_it(hf_folder, tmp_path):
    folder = shutil.copytree(hf_folder, tmp_path / "other")
    os.remove(folder / "merges.txt")
    with pytest.raises(UserError, match="not a complete checkpoint: missing merges.txt"):
        load_encoder_hparams_and_params(str(folder))


def test_init_from_an_hf_folder_fine_tunes_its_params_with_its_vocabulary(hf_folder, tf_model, tmp_path):
    flags = train_jax.default_flags(init_from=hf_folder, data_dir=str(tmp_path / "data"), block_size=16)
    hparams, params, vocab_dir = train_jax.initial_model(flags, {"vocab_size": SMALL_HPARAMS["n_vocab"]})
    _, expected_hparams, expected = load_encoder_hparams_and_params(tf_model[0])
    assert hparams == expected_hparams
    assert_same_params(params, expected)
    batch = {"global_batch": 12, "grad_accum": 1}
    checkpoints.write_config(str(tmp_path / "run"), flags, hparams, vocab_dir, batch)  # the run's vocabulary, in OpenAI's names
    assert load_encoder(str(tmp_path / "run")).encoder == load_encoder(hf_folder).encoder


# ---------------------------------------------------------------------------------------------
# hub ids, fetched from the local server as HF_ENDPOINT


def hub_files(folder, repo_id):
    names = ("config.json", "model.safetensors", "vocab.json", "merges.txt")
    return {f"{repo_id}/resolve/main/{name}": open(os.path.join(folder, name), "rb").read() for name in names}


def gpt2_cli(*args, env, prompt=PROMPT):
    command = [sys.executable, "gpt2.py", prompt, "--n_tokens_to_generate", "4", "--backend", "numpy", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env})


def test_hub_id_is_fetched_into_hfs_cache_then_used_offline(hf_folder, tf_model, tmp_path):
    hub_env = {"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_XET": "1"}
    expected = gpt2_cli("--model_size", tf_model[0], env={})
    assert expected.returncode == 0, expected.stderr
    with serve(hub_files(hf_folder, "openai-community/gpt2"), hub_commit=COMMIT) as server:
        fetched = gpt2_cli("--model_size", "gpt2", env={**hub_env, "HF_ENDPOINT": server.url})
    assert fetched.returncode == 0, fetched.stderr
    assert fetched.stdout == expected.stdout
    got = {path.rsplit("/", 1)[-1] for path, _ in server.requests if "/resolve/main/" in path}
    assert got == {"config.json", "model.safetensors", "vocab.json", "merges.txt"}
    offline = gpt2_cli("--model_size", "openai-community/gpt2", env={**hub_env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout == expected.stdout


def one_error_line(result):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_hub_errors_are_one_line(hf_folder, tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_XET": "1", "HF_HUB_ETAG_TIMEOUT": "2"}
    files = hub_files(hf_folder, "me/not-gpt2")
    files["me/not-gpt2/resolve/main/config.json"] = json.dumps({**HF_CONFIG, "model_type": "bert"}).encode()
    files.update({k.replace("me/not-gpt2", "me/no-merges"): v for k, v in hub_files(hf_folder, "me/no-merges").items()
                  if not k.endswith("merges.txt")})  # fmt: skip
    with serve(files, hub_commit=COMMIT) as server:
        hub = {**env, "HF_ENDPOINT": server.url}
        assert "describes a 'bert' model, not GPT-2" in one_error_line(gpt2_cli("--model_size", "me/not-gpt2", env=hub))
        assert not [path for path, _ in server.requests if path.endswith("model.safetensors")]  # stopped before the weights
        assert "me/no-merges has no merges.txt" in one_error_line(gpt2_cli("--model_size", "me/no-merges", env=hub))
        assert "no repo 'me/nothing' on the hub" in one_error_line(gpt2_cli("--model_size", "me/nothing", env=hub))
    offline = one_error_line(gpt2_cli("--model_size", "gpt2", env={**env, "HF_HUB_OFFLINE": "1"}))
    assert "is not in the Hugging Face cache" in offline


def test_compile_takes_the_shape_of_any_init_from_and_fetches_only_a_hub_ids_config(hf_folder, tf_model, data_dir, tmp_path):  # noqa: F811
    run_dir = str(tmp_path / "run")
    train_jax.fit(train_jax.default_flags(data_dir=data_dir, out_dir=run_dir, max_iters=1, **{**TINY, "vocab_size": 128}, **QUIET))
    for model in (tf_model[0], hf_folder, run_dir):  # the shape fine-tuning loads, its padded vocabulary cut back
        assert aot.model_shape(train_jax.default_flags(init_from=model)) == load_encoder_hparams_and_params(model)[1]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_XET": "1"}
    compile_args = [sys.executable, "train_jax.py", "compile", "--block_size=16", "--batch_size=1", "--init_from"]
    with serve(hub_files(hf_folder, "me/small"), hub_commit=COMMIT) as server:
        from_hub = subprocess.run([*compile_args, "me/small"], cwd=ROOT, capture_output=True, text=True, env={**env, "HF_ENDPOINT": server.url})
    from_folder = subprocess.run([*compile_args, hf_folder], cwd=ROOT, capture_output=True, text=True, env=env)
    assert from_hub.returncode == 0 and from_folder.returncode == 0, from_hub.stderr[-2000:] + from_folder.stderr[-2000:]
    assert from_hub.stdout == from_folder.stdout and from_hub.stdout.strip().endswith(": fits")
    assert {path.rsplit("/", 1)[-1] for path, _ in server.requests if "/resolve/main/" in path} == {"config.json"}  # HEAD, GET
    with pytest.raises(UserError, match="is no model folder .* and no hub id"):
        aot.model_shape(train_jax.default_flags(init_from=str(tmp_path)))


@pytest.mark.slow  # huggingface_hub retries a refused connection for about 25 s
def test_no_network_is_one_error_after_huggingface_hubs_retries(tmp_path):
    with serve({}) as server:
        url = server.url  # closed when the block ends: nothing listens there
    env = {"HF_HOME": str(tmp_path / "hf_home"), "HF_ENDPOINT": url}
    result = gpt2_cli("--model_size", "gpt2-xl", env=env)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [  # the library's retry notes are not shown
        "error: openai-community/gpt2-xl is not in the Hugging Face cache and the hub cannot be reached (no network, or "
        "HF_HUB_OFFLINE=1): give --model_size a local folder, set HF_ENDPOINT to a mirror, or connect"
    ]


# ---------------------------------------------------------------------------------------------
# training runs


def test_a_run_folder_is_a_model_with_the_text_of_its_export(data_dir, tmp_path):  # noqa: F811 (a fixture)
    run_dir, model_dir = str(tmp_path / "run"), str(tmp_path / "model")
    flags = train_jax.default_flags(data_dir=data_dir, out_dir=run_dir, max_iters=4, eval_interval=2, **TINY, **QUIET)
    train_jax.fit(flags)
    checkpoints.export(ckpt_dir=run_dir, out=model_dir)
    from_run, from_export = (gpt2_cli("--model_size", folder, env={}, prompt="ROMEO:") for folder in (run_dir, model_dir))
    assert from_run.returncode == 0, from_run.stderr
    assert from_run.stdout == from_export.stdout and from_run.stdout.strip()
    _, _, params = load_encoder_hparams_and_params(run_dir, step=2)
    _, _, exported = load_encoder_hparams_and_params(model_dir)
    assert not np.array_equal(params["wte"], exported["wte"])  # step 2 is not the best (4): another checkpoint


def test_hf_export_of_a_bytes_run_loads_back(data_dir, tmp_path):  # noqa: F811 (a fixture)
    run_dir, model_dir = str(tmp_path / "run"), str(tmp_path / "model")
    train_jax.fit(train_jax.default_flags(data_dir=data_dir, out_dir=run_dir, max_iters=2, **TINY, **QUIET))
    checkpoints.export(ckpt_dir=run_dir, out=model_dir, format="hf")
    encoder, hparams, params = load_encoder_hparams_and_params(model_dir)
    _, run_hparams, run_params = load_encoder_hparams_and_params(run_dir)
    assert hparams == run_hparams and encoder.decode(encoder.encode(CORPUS[:200])) == CORPUS[:200]
    assert_same_params(params, run_params)
    assert json.load(open(os.path.join(model_dir, "generation_config.json"))) == {}  # no <|endoftext|> in a bytes vocabulary


@pytest.mark.slow
def test_transformers_loads_the_export_and_computes_the_same_logits(tf_model, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    import gpt2

    encoder, hparams, params = load_encoder_hparams_and_params(tf_model[0])
    out = str(tmp_path / "export")
    save_hf_checkpoint(params, hparams, out, tf_model[0])
    model = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer(PROMPT)["input_ids"]
    assert ids == encoder.encode(PROMPT)
    with torch.no_grad():
        hf_logits = model(torch.tensor([ids])).logits[0].numpy()  # [n_seq, n_vocab]
    logits = gpt2.gpt2(np.array(ids), **params, n_head=hparams["n_head"])  # [n_seq, n_vocab]
    # float32 sums over n_embd terms per layer: eps * scale * sqrt(n_embd * n_layer) bounds the difference
    bound = 1.2e-7 * np.abs(logits).max() * np.sqrt(hparams["n_embd"] * hparams["n_layer"]) * 16
    np.testing.assert_allclose(hf_logits, logits, rtol=0, atol=bound)


@pytest.mark.slow
def test_transformers_reads_the_hf_export_of_a_bytes_run(data_dir, tmp_path):  # noqa: F811 (a fixture)
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    import gpt2

    run_dir, model_dir = str(tmp_path / "run"), str(tmp_path / "model")
    train_jax.fit(train_jax.default_flags(data_dir=data_dir, out_dir=run_dir, max_iters=2, **TINY, **QUIET))
    checkpoints.export(ckpt_dir=run_dir, out=model_dir, format="hf")
    encoder, hparams, params = load_encoder_hparams_and_params(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    text = CORPUS[:100]
    ids = tokenizer(text)["input_ids"]
    assert ids == encoder.encode(text) and tokenizer.decode(ids) == text
    model = transformers.GPT2LMHeadModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        hf_logits = model(torch.tensor([ids[:16]])).logits[0].numpy()  # [16, n_vocab]
    logits = gpt2.gpt2(np.array(ids[:16]), **params, n_head=hparams["n_head"])  # [16, n_vocab]
    bound = 1.2e-7 * np.abs(logits).max() * np.sqrt(hparams["n_embd"] * hparams["n_layer"]) * 16
    np.testing.assert_allclose(hf_logits, logits, rtol=0, atol=bound)
