"""Download, load and save GPT-2 checkpoints in OpenAI's release layout.

A checkpoint folder holds the 7 release files. The first load reads the TensorFlow checkpoint and
writes `params.npz` beside it; later loads read that cache with NumPy alone (no TensorFlow, no
pickle) and rebuild it when the checkpoint changes.
"""

import contextlib
import hashlib
import json
import os
import re
import time
import zipfile

import numpy as np

from cli import UserError, check_folder, check_positive_int, log

MODEL_SIZES = ("124M", "355M", "774M", "1558M")
CKPT_FILES = ("checkpoint", "model.ckpt.data-00000-of-00001", "model.ckpt.index", "model.ckpt.meta")
VOCAB_FILES = ("encoder.json", "vocab.bpe")
RELEASE_FILES = (*CKPT_FILES, "hparams.json", *VOCAB_FILES)
HPARAMS_KEYS = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")
BASE_URL_ENV = "GPT2_BASE_URL"
DEFAULT_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
CACHE_FILE = "params.npz"
FINGERPRINT_KEY = "__fingerprint__"
DOWNLOAD_RETRIES, DOWNLOAD_BACKOFF_S, DOWNLOAD_TIMEOUT_S = 5, 1.0, 30  # backoff doubles per try


# ---------------------------------------------------------------------------------------------
# Download


def base_url():
    return os.environ.get(BASE_URL_ENV, DEFAULT_BASE_URL).rstrip("/")


class RetryableError(Exception):
    pass


def content_total(response, start):
    """The full file size a response promises, or None if it does not say."""
    if response.status_code == 206:
        match = re.fullmatch(r"bytes (\d+)-\d+/(\d+)", response.headers.get("Content-Range", ""))
        if not match or int(match[1]) != start:
            raise RetryableError(f"bad Content-Range {response.headers.get('Content-Range')!r}")
        return int(match[2])
    length = response.headers.get("Content-Length")
    return int(length) if length is not None else None


def fetch_once(url, path):
    """One GET into `path + '.part'`, resuming what it already holds; renamed to `path` when
    the size matches what the server promised."""
    import requests
    from tqdm import tqdm

    part = path + ".part"
    start = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"Range": f"bytes={start}-"} if start else {}
    with requests.get(url, headers=headers, stream=True, timeout=DOWNLOAD_TIMEOUT_S) as response:
        if response.status_code == 416:  # the .part is not a prefix of this file: start over
            os.remove(part)
            raise RetryableError("server refused to resume")
        if response.status_code in (404, 403, 410):
            raise UserError(
                f"{url} answered HTTP {response.status_code}: check {BASE_URL_ENV} if you use a mirror, or "
                f"download the files by hand into {os.path.dirname(path)} (README: 'Offline use')"
            )
        if response.status_code >= 400:
            raise RetryableError(f"HTTP {response.status_code}")
        if response.status_code != 206:  # the server sent the whole file: overwrite the .part
            start = 0
        total = content_total(response, start)
        mode = "ab" if start else "wb"
        name = os.path.basename(path)
        try:
            with open(part, mode) as f, tqdm(
                desc=name, total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, leave=False
            ) as bar:
                # read1 hands over every byte that arrived before a broken connection: the retry resumes there
                for chunk in iter(lambda: response.raw.read1(1 << 16, decode_content=True), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
        except requests.RequestException:  # an OSError too, but the network's: the caller retries it
            raise
        except OSError as e:  # the disk, not the network: retrying would not help
            kept = os.path.getsize(part) if os.path.exists(part) else 0
            raise UserError(
                f"could not write {part} ({e.strerror or e}): free some disk space (or fix the folder's permissions) "
                f"and run again; the download resumes from the {kept} bytes kept in {part}"
            )
    size = os.path.getsize(part)
    if total is not None and size != total:
        if size > total:
            os.remove(part)
        raise RetryableError(f"got {size} of {total} bytes")
    os.replace(part, path)


@contextlib.contextmanager
def folder_lock(folder):
    """Hold an exclusive lock on the folder itself (no lock file to leave behind); the system
    releases it when the process ends, however it ends."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process downloading into {folder}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def download_file(url, path):
    """Download `url` to `path` via `path.part`, resuming and retrying with exponential backoff.
    One process at a time per folder: one that waited finds the file there and uses it."""
    with folder_lock(os.path.dirname(os.path.abspath(path))):
        if not os.path.isfile(path):
            fetch_with_retries(url, path)


def fetch_with_retries(url, path):
    import requests
    import urllib3

    for attempt in range(DOWNLOAD_RETRIES):
        try:
            return fetch_once(url, path)
        except (RetryableError, requests.RequestException, urllib3.exceptions.HTTPError) as e:
            error = e
            if attempt + 1 < DOWNLOAD_RETRIES:
                log(f"download of {url} failed ({type(e).__name__}: {str(e)[:200]}); retrying")
                time.sleep(DOWNLOAD_BACKOFF_S * 2**attempt)
    raise UserError(
        f"could not download {url} after {DOWNLOAD_RETRIES} tries ({type(error).__name__}); check your network, "
        f"or download the files by hand into {os.path.dirname(path)} (README: 'Offline use')"
    )


def missing_release_files(model_dir):
    return [name for name in RELEASE_FILES if not os.path.isfile(os.path.join(model_dir, name))]


def download_gpt2_files(model_size, model_dir):
    """Fetch whichever of the 7 release files `model_dir` lacks."""
    try:
        os.makedirs(model_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"could not create {model_dir} ({e.strerror or e}): give a writable --models_dir")
    for name in missing_release_files(model_dir):
        download_file(f"{base_url()}/{model_size}/{name}", os.path.join(model_dir, name))


# ---------------------------------------------------------------------------------------------
# Load


def resolve_model_dir(model_size, models_dir, flag="model_size"):
    """`models_dir/model_size` for a released size (downloading what is missing), or `model_size`
    itself when it is a folder holding a checkpoint in the release layout."""
    if model_size in MODEL_SIZES:
        model_dir = os.path.join(check_folder(models_dir, "models_dir"), model_size)
        if missing_release_files(model_dir):
            log(f"downloading GPT-2 {model_size} to {model_dir}")
            download_gpt2_files(model_size, model_dir)
        return model_dir
    if not os.path.isdir(str(model_size)):
        raise UserError(
            f"unknown --{flag} {model_size!r}: it is neither one of {', '.join(MODEL_SIZES)} "
            f"nor an existing checkpoint folder"
        )
    model_dir = str(model_size)
    if missing := missing_release_files(model_dir):
        raise UserError(
            f"--{flag} {model_dir} is not a complete checkpoint: missing {', '.join(missing)}; "
            f"give a folder with all {len(RELEASE_FILES)} release files"
        )
    return model_dir


def load_hparams(model_dir):
    path = os.path.join(model_dir, "hparams.json")
    try:
        with open(path, encoding="utf-8") as f:
            hparams = json.load(f)
        assert all(type(hparams[k]) is int and hparams[k] > 0 for k in HPARAMS_KEYS)
        assert hparams["n_embd"] % hparams["n_head"] == 0
    except (ValueError, KeyError, TypeError, AssertionError):
        raise UserError(
            f"{path} is corrupt: it needs positive integers {', '.join(HPARAMS_KEYS)}; "
            f"delete it and run again to download it afresh (released sizes), or restore it"
        )
    return hparams


def checkpoint_fingerprint(model_dir):
    """Changes whenever the TF checkpoint does: the index holds a checksum of every tensor."""
    digest = hashlib.sha256()
    for name in CKPT_FILES[:3]:
        path = os.path.join(model_dir, name)
        digest.update(f"{name}:{os.path.getsize(path)}:{os.stat(path).st_mtime_ns}".encode())
    with open(os.path.join(model_dir, "model.ckpt.index"), "rb") as f:
        digest.update(f.read())
    return digest.hexdigest()


def flatten(params, prefix=""):
    """{'blocks': [{'attn': {'c_attn': {'w': a}}}]} -> {'blocks/0/attn/c_attn/w': a}."""
    items = params.items() if isinstance(params, dict) else enumerate(params)
    flat = {}
    for key, value in items:
        path = f"{prefix}{key}"
        flat.update(flatten(value, path + "/") if isinstance(value, (dict, list)) else {path: value})
    return flat


def unflatten(flat, n_layer):
    params = {"blocks": [{} for _ in range(n_layer)]}
    for path, value in flat.items():
        keys = path.split("/")
        node = params["blocks"][int(keys[1])] if keys[0] == "blocks" else params
        for key in keys[2:-1] if keys[0] == "blocks" else keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return params


def tf_name_to_path(name):
    """'model/h3/attn/c_attn/w' -> 'blocks/3/attn/c_attn/w'; 'model/wte' -> 'wte'."""
    return re.sub(r"^h(\d+)/", r"blocks/\1/", name.removeprefix("model/"))


def path_to_tf_name(path):
    return "model/" + re.sub(r"^blocks/(\d+)/", r"h\1/", path)


def expected_shapes(hparams):
    """The param dict's shapes, by '/'-joined path (conv weights as 2-D [n_in, n_out])."""
    n_vocab, n_ctx, n_embd = hparams["n_vocab"], hparams["n_ctx"], hparams["n_embd"]
    block = {
        "ln_1/g": [n_embd], "ln_1/b": [n_embd], "ln_2/g": [n_embd], "ln_2/b": [n_embd],
        "attn/c_attn/w": [n_embd, 3 * n_embd], "attn/c_attn/b": [3 * n_embd],
        "attn/c_proj/w": [n_embd, n_embd], "attn/c_proj/b": [n_embd],
        "mlp/c_fc/w": [n_embd, 4 * n_embd], "mlp/c_fc/b": [4 * n_embd],
        "mlp/c_proj/w": [4 * n_embd, n_embd], "mlp/c_proj/b": [n_embd],
    }  # fmt: skip
    shapes = {"wte": [n_vocab, n_embd], "wpe": [n_ctx, n_embd], "ln_f/g": [n_embd], "ln_f/b": [n_embd]}
    for i in range(hparams["n_layer"]):
        shapes.update({f"blocks/{i}/{key}": shape for key, shape in block.items()})
    return shapes


def check_shapes(flat, hparams, source):
    expected = expected_shapes(hparams)
    if missing := sorted(set(expected) - set(flat)):
        raise UserError(f"{source} lacks {len(missing)} tensors (first: {missing[0]}); replace the checkpoint")
    for path, shape in expected.items():
        if list(flat[path].shape) != shape:
            raise UserError(f"{source}: {path} has shape {list(flat[path].shape)}, hparams.json says {shape}")


def import_tensorflow():
    """TensorFlow, imported only to read or write release checkpoints, without its log noise."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # its notice goes to stderr before logging is set up
    import tensorflow as tf

    return tf


def read_tf_checkpoint(model_dir):
    """{path: float32 array} read with TensorFlow; [1, n_in, n_out] conv weights become 2-D."""
    tf = import_tensorflow()
    try:
        reader = tf.train.load_checkpoint(os.path.join(model_dir, "model.ckpt"))
        flat = {}
        for name in reader.get_variable_to_shape_map():
            array = reader.get_tensor(name).astype(np.float32)
            flat[tf_name_to_path(name)] = array[0] if array.ndim == 3 else array
    except (tf.errors.OpError, ValueError, IndexError) as e:  # IndexError: "Read less bytes than requested"
        message = str(e).strip().splitlines()[0][:160]
        raise UserError(
            f"the checkpoint in {model_dir} is corrupt or truncated ({message}); delete its model.ckpt.* files "
            f"and load again to re-download (or restore them)"
        )
    return flat


def read_cache(path, fingerprint):
    """The cached {path: array}, or None when it is missing, stale or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if str(npz[FINGERPRINT_KEY]) != fingerprint:
                return None
            return {key: npz[key] for key in npz.files if key != FINGERPRINT_KEY}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        log(f"ignoring unreadable cache {path} ({type(e).__name__}); rebuilding it")
        return None


def write_cache(path, flat, fingerprint):
    """Atomically: a killed process leaves the old cache or none, never half a file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **{FINGERPRINT_KEY: np.array(fingerprint)}, **flat)
        os.replace(tmp, path)
    except OSError as e:  # a read-only folder still loads, just without the cache
        log(f"could not write the cache {path} ({e}); loading will keep using TensorFlow")
        if os.path.exists(tmp):
            os.remove(tmp)


def load_params(model_dir, hparams):
    """The nested param dict, from the cache when it is current, else from the TF checkpoint."""
    fingerprint = checkpoint_fingerprint(model_dir)
    cache = os.path.join(model_dir, CACHE_FILE)
    flat = read_cache(cache, fingerprint)
    if flat is None:
        log(f"converting the TensorFlow checkpoint in {model_dir} (once)")
        flat = read_tf_checkpoint(model_dir)
        check_shapes(flat, hparams, f"the checkpoint in {model_dir}")
        write_cache(cache, flat, fingerprint)
    else:
        check_shapes(flat, hparams, cache)
    return unflatten(flat, hparams["n_layer"])


def load_encoder_hparams_and_params(model_size, models_dir="models"):
    """(encoder, hparams, params) for a released size or a checkpoint folder."""
    from encoder import load_encoder

    model_dir = resolve_model_dir(model_size, models_dir)
    hparams = load_hparams(model_dir)
    try:
        encoder = load_encoder(model_dir)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise UserError(
            f"encoder.json or vocab.bpe in {model_dir} is corrupt ({e}); delete both and run again to download "
            f"them afresh (released sizes), or restore them"
        )
    if len(encoder.encoder) != hparams["n_vocab"]:
        raise UserError(
            f"encoder.json in {model_dir} has {len(encoder.encoder)} tokens, hparams.json says "
            f"n_vocab={hparams['n_vocab']}; restore the matching files"
        )
    return encoder, hparams, load_params(model_dir, hparams)


def encode_prompt(encoder, hparams, prompt, n_tokens_to_generate):
    """The prompt's ids (`<|endoftext|>` for ""), checked to leave room for the new tokens."""
    check_positive_int(n_tokens_to_generate, "n_tokens_to_generate")
    if not isinstance(prompt, str):  # fire reads 1.50 as a float: say so rather than guess
        log(f"note: the prompt was read as {type(prompt).__name__} {prompt!r}; quote it as '\"...\"' to keep it verbatim")
        prompt = str(prompt)
    if not prompt and encoder.eot_token is None:
        raise UserError("this model's vocabulary has no <|endoftext|>: give a non-empty prompt")
    ids = encoder.encode(prompt) if prompt else [encoder.eot_token]
    n_ctx = hparams["n_ctx"]
    if len(ids) + n_tokens_to_generate > n_ctx:
        if len(ids) >= n_ctx:
            raise UserError(f"the prompt is {len(ids)} tokens but the model sees at most {n_ctx}: shorten it")
        raise UserError(
            f"the prompt is {len(ids)} tokens, so at most {n_ctx - len(ids)} new tokens fit in n_ctx={n_ctx}: "
            f"lower --n_tokens_to_generate or shorten the prompt"
        )
    return ids


# ---------------------------------------------------------------------------------------------
# Save


def save_gpt2_checkpoint(params, hparams, model_dir, vocab_dir):
    """Write `params` in the release layout (TF names, [1, n_in, n_out] conv weights), with
    `hparams.json` and the `encoder.json`/`vocab.bpe` copied from `vocab_dir`."""
    import shutil

    tf = import_tensorflow()
    os.makedirs(model_dir, exist_ok=True)
    flat = {path: np.asarray(value, np.float32) for path, value in flatten(params).items()}
    check_shapes(flat, hparams, "the params to save")
    with tf.Graph().as_default():
        variables, assigns, feeds = {}, [], {}
        for path, array in flat.items():
            array = array[None] if path.endswith("/w") else array  # conv1d weights are [1, n_in, n_out]
            name = path_to_tf_name(path)
            variables[name] = tf.compat.v1.Variable(tf.zeros(array.shape), name=name)
            placeholder = tf.compat.v1.placeholder(tf.float32, array.shape)
            assigns.append(variables[name].assign(placeholder))
            feeds[placeholder] = array  # fed, not embedded: the .meta stays small
        saver = tf.compat.v1.train.Saver(var_list=variables, save_relative_paths=True)
        with tf.compat.v1.Session() as session:
            session.run(assigns, feed_dict=feeds)
            saver.save(session, os.path.join(model_dir, "model.ckpt"))
    with open(os.path.join(model_dir, "hparams.json"), "w", encoding="utf-8") as f:
        json.dump({k: hparams[k] for k in HPARAMS_KEYS}, f, indent=2)
    for name in VOCAB_FILES:
        if os.path.abspath(vocab_dir) != os.path.abspath(model_dir):
            shutil.copyfile(os.path.join(vocab_dir, name), os.path.join(model_dir, name))
