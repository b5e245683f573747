"""Download, load and save GPT-2 checkpoints: OpenAI's release layout and Hugging Face's.

A model folder is one of three layouts, told apart by the files it holds (see `folder_layout`):
- release: OpenAI's 7 files (TensorFlow checkpoint, hparams.json, encoder.json, vocab.bpe). The first
  load converts the checkpoint to `model.ckpt.safetensors` beside it; later loads memory-map that cache
  (no TensorFlow, no pickle) and rebuild it when the checkpoint changes.
- hf: Hugging Face's config.json, model.safetensors, vocab.json and merges.txt (also fetched by hub id).
- run: a train_jax.py --out_dir (config.json and orbax checkpoints/), read through train_jax.run_params.
"""

import contextlib
import hashlib
import json
import os
import re
import time

import numpy as np

from cli import UserError, check_folder, check_positive_int, log, progress
from encoder import HF_VOCAB_NAMES, vocab_path

MODEL_SIZES = ("124M", "355M", "774M", "1558M")
CKPT_FILES = ("checkpoint", "model.ckpt.data-00000-of-00001", "model.ckpt.index", "model.ckpt.meta")
VOCAB_FILES = ("encoder.json", "vocab.bpe")
RELEASE_FILES = (*CKPT_FILES, "hparams.json", *VOCAB_FILES)
HPARAMS_KEYS = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")
BASE_URL_ENV = "GPT2_BASE_URL"
DEFAULT_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
# The cache of a release folder: named after the checkpoint it converts, so that it is never taken for
# a Hugging Face folder's own model.safetensors. It replaces the params.npz of earlier versions.
CACHE_FILE = "model.ckpt.safetensors"
OLD_CACHE_FILE = "params.npz"
FINGERPRINT_KEY = "fingerprint"
# The cache keeps every block's matrices transposed, [n_out, n_in]: a decode step then reads each output's
# weights as one contiguous row, which XLA's CPU matvec does about 15% faster for 1558M than contracting
# the rows of [n_in, n_out] (see gpt2.to_backend). Part of the fingerprint: a cache of another layout is
# rebuilt once.
CACHE_LAYOUT = "blocks' matrices [n_out, n_in]"
HF_CONFIG, HF_WEIGHTS = "config.json", "model.safetensors"
HF_FILES = (HF_CONFIG, HF_WEIGHTS, *HF_VOCAB_NAMES.values())
# The hub's GPT-2 repos, also known by their old bare names (gpt2 ... gpt2-xl).
HUB_OWNER, HUB_NAMES = "openai-community", ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# HF's config keys of our hparams, and the settings under which its GPT-2 computes what gpt2.py does.
HF_HPARAMS = {"n_vocab": "vocab_size", "n_ctx": "n_positions", "n_embd": "n_embd", "n_head": "n_head", "n_layer": "n_layer"}
HF_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both are the tanh approximation gpt2.gelu computes
SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}  # BF16 is widened by hand
SAFETENSORS_ALIGN = 64  # data aligned like this is used by JAX on the CPU without a copy
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
            with open(part, mode) as f, progress(
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


def is_hub_id(name):
    """A Hugging Face hub repo id: one of GPT-2's bare names, or 'owner/name' that is no local path."""
    owner_name = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", name)
    return name in HUB_NAMES or (owner_name is not None and not os.path.exists(name))


def download_hf_files(repo_id, flag, names=HF_FILES):
    """The folder holding a hub repo's GPT-2 files (`names`, config.json first: HF_FILES[:1] for the
    model's shape alone), fetched by huggingface_hub into its cache (resumed there, from HF_ENDPOINT,
    not at all with HF_HUB_OFFLINE=1); config.json is checked before the weights."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id = f"{HUB_OWNER}/{repo_id}" if repo_id in HUB_NAMES else repo_id
    fix = f"give --{flag} a GPT-2 repo of the hub, a released size or a local folder"
    name = HF_CONFIG
    try:
        model_dir = os.path.dirname(hf_hub_download(repo_id, name))
        hf_hparams(model_dir)  # not a GPT-2: say so before fetching gigabytes
        for name in names[1:]:
            hf_hub_download(repo_id, name)
    except GatedRepoError:
        raise UserError(f"{repo_id} is gated on the hub: accept its terms there and log in (`hf auth login`), or {fix}")
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise UserError(f"no repo {repo_id!r} on the hub (and no local folder of that name): {fix}")
    except RemoteEntryNotFoundError:
        raise UserError(
            f"{repo_id} has no {name}: only GPT-2 repos with {', '.join(HF_FILES)} (safetensors weights) can be read; {fix}"
        )
    except LocalEntryNotFoundError:
        raise UserError(
            f"{repo_id} is not in the Hugging Face cache and the hub cannot be reached (offline, no network, or "
            f"HF_HUB_OFFLINE=1): connect, set HF_ENDPOINT to a mirror, or give a local folder"
        )
    except HfHubHTTPError as e:
        raise UserError(f"the hub answered HTTP {e.response.status_code} for {repo_id}: try again later, or {fix}")
    except OSError as e:
        raise UserError(f"could not write {repo_id} into the Hugging Face cache ({e.strerror or e}): free some disk space or set HF_HOME")
    return model_dir


# ---------------------------------------------------------------------------------------------
# Load


def resolve_model_dir(model_size, models_dir, flag="model_size"):
    """The model folder --flag names: `models_dir/model_size` for a released size (downloading what is
    missing), a local folder in any layout (see folder_layout), or a hub id's folder in HF's cache."""
    if model_size in MODEL_SIZES:
        model_dir = os.path.join(check_folder(models_dir, "models_dir"), model_size)
        if missing_release_files(model_dir):
            log(f"downloading GPT-2 {model_size} to {model_dir}")
            download_gpt2_files(model_size, model_dir)
        return model_dir
    model_dir = str(model_size)
    if not os.path.isdir(model_dir) and is_hub_id(model_dir):
        return download_hf_files(model_dir, flag)
    if not os.path.isdir(model_dir):
        raise UserError(
            f"unknown --{flag} {model_size!r}: it is neither one of {', '.join(MODEL_SIZES)} "
            f"nor an existing checkpoint folder"
        )
    layout = folder_layout(model_dir)
    missing = {"release": missing_release_files, "hf": missing_hf_files, "run": lambda _: []}[layout](model_dir)
    if missing:
        raise UserError(
            f"--{flag} {model_dir} is not a complete checkpoint: missing {', '.join(missing)}; give a folder with "
            f"all {len(RELEASE_FILES)} release files, a Hugging Face folder ({', '.join(HF_FILES)}) or a train_jax.py run"
        )
    return model_dir


def folder_layout(model_dir):
    """'run' (a train_jax.py --out_dir: orbax checkpoints/), 'hf' (HF's config.json without hparams.json)
    or 'release' (anything else, complete or not)."""
    if os.path.isdir(os.path.join(model_dir, "checkpoints")) and os.path.isfile(os.path.join(model_dir, HF_CONFIG)):
        return "run"
    if os.path.isfile(os.path.join(model_dir, HF_CONFIG)) and not os.path.isfile(os.path.join(model_dir, "hparams.json")):
        return "hf"
    return "release"


def missing_hf_files(model_dir):
    return [name for name in HF_FILES if not os.path.isfile(os.path.join(model_dir, name))]


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
    """Changes whenever the TF checkpoint does (the index holds a checksum of every tensor) or the
    cache's layout does."""
    digest = hashlib.sha256(CACHE_LAYOUT.encode())
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
            array = reader.get_tensor(name).astype(np.float32, copy=False)
            flat[tf_name_to_path(name)] = array[0] if array.ndim == 3 else array
    except (tf.errors.OpError, ValueError, IndexError) as e:  # IndexError: "Read less bytes than requested"
        message = str(e).strip().splitlines()[0][:160]
        raise UserError(
            f"the checkpoint in {model_dir} is corrupt or truncated ({message}); delete its model.ckpt.* files "
            f"and load again to re-download (or restore them)"
        )
    return flat


def hf_name_to_path(name):
    """'transformer.h.3.attn.c_attn.weight' (or without 'transformer.') -> 'blocks/3/attn/c_attn/w';
    None for HF's attention-mask buffers and the lm_head, which GPT-2 ties to wte."""
    keys = name.removeprefix("transformer.").split(".")
    if keys[0] == "lm_head" or (keys[-2:-1] == ["attn"] and keys[-1] in ("bias", "masked_bias")):
        return None
    if keys[0] in ("wte", "wpe"):
        return keys[0]
    last = "b" if keys[-1] == "bias" else "g" if keys[-2].startswith("ln_") else "w"
    return "/".join(["blocks" if keys[0] == "h" else keys[0], *keys[1:-1], last])


def path_to_hf_name(path):
    """'blocks/3/attn/c_attn/w' -> 'transformer.h.3.attn.c_attn.weight', the names transformers saves."""
    *keys, last = re.sub(r"^blocks/", "h/", path).split("/")
    return ".".join(["transformer", *keys, "weight" if last in ("w", "g") else "bias"] if keys else ["transformer", last, "weight"])


def read_safetensors(path):
    """({name: array}, metadata) of a safetensors file, memory-mapped: float32 tensors are views of the
    file (no copy, no pickle); float16 and bfloat16 ones are widened to float32."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n_header = int.from_bytes(f.read(8), "little")
        if not 2 <= n_header <= size - 8:
            raise ValueError(f"header size {n_header} does not fit a file of {size} bytes")
        header = json.loads(f.read(n_header))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    mapped = np.memmap(path, np.uint8, "r") if header else np.zeros(0, np.uint8)
    arrays = {}
    for name, entry in header.items():
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        start, end = (8 + n_header + offset for offset in entry["data_offsets"])
        n_bytes = int(np.prod(entry["shape"])) * np.dtype(dtype).itemsize
        if not 8 + n_header <= start <= end <= size or end - start != n_bytes:
            raise ValueError(f"{name}: data_offsets {entry['data_offsets']} do not fit its shape or the file")
        array = mapped[start:end].view(dtype).reshape(entry["shape"])
        arrays[name] = widened(array, entry["dtype"])
    return arrays, metadata


def widened(array, dtype):
    """float32 of a safetensors tensor: itself for F32, else widened (bfloat16 is float32's upper half)."""
    if dtype == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array if dtype == "F32" else array.astype(np.float32)


def write_safetensors(path, flat, metadata):
    """Write {name: float32 array} as safetensors, one tensor at a time, atomically (a killed process
    leaves no half file). The header is padded so that the data starts SAFETENSORS_ALIGN-aligned."""
    header, offset = {"__metadata__": metadata}, 0
    for name, array in flat.items():
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % SAFETENSORS_ALIGN)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(len(text).to_bytes(8, "little") + text)
            for array in flat.values():
                np.ascontiguousarray(array, np.float32).tofile(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_hf_params(path):
    """{param path: float32 array} of safetensors weights in HF's names, with the file's metadata."""
    arrays, metadata = read_safetensors(path)
    flat = {hf_name_to_path(name): array for name, array in arrays.items()}
    flat.pop(None, None)
    return flat, metadata


def stored_transposed(path):
    """Whether the cache keeps this param transposed (CACHE_LAYOUT): the blocks' matrices."""
    return path.startswith("blocks/") and path.endswith("/w")


def read_cache(path, fingerprint):
    """The cached {path: array} (memory-mapped), or None when it is missing, stale or unreadable. A
    matrix stored transposed comes back as a view of its stored self, `.T`: [n_in, n_out] as everywhere."""
    try:
        flat, metadata = read_hf_params(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        log(f"ignoring unreadable cache {path} ({type(e).__name__}); rebuilding it")
        return None
    if metadata.get(FINGERPRINT_KEY) != fingerprint:
        return None
    return {p: a.T if stored_transposed(p) else a for p, a in flat.items()}


def write_cache(model_dir, flat, fingerprint):
    """The cache beside the checkpoint, in HF's names (the blocks' matrices transposed, CACHE_LAYOUT)
    with the checkpoint's fingerprint; an old params.npz cache goes once it is replaced. True when written."""
    path = os.path.join(model_dir, CACHE_FILE)
    stored = {path_to_hf_name(p): a.T if stored_transposed(p) else a for p, a in flat.items()}
    try:
        write_safetensors(path, stored, {"layout": CACHE_LAYOUT, FINGERPRINT_KEY: fingerprint})
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(model_dir, OLD_CACHE_FILE))
        return True
    except OSError as e:  # a read-only folder still loads, just without the cache
        log(f"could not write the cache {path} ({e}); loading will keep using TensorFlow")
        return False


def convert_checkpoint(model_dir, hparams, fingerprint):
    """{path: array} of the TF checkpoint, written to the cache and read back from it memory-mapped
    (the arrays TensorFlow read are freed first, so memory never holds the weights twice); the arrays
    read if the cache cannot be written."""
    flat = read_tf_checkpoint(model_dir)
    check_shapes(flat, hparams, f"the checkpoint in {model_dir}")
    if not write_cache(model_dir, flat, fingerprint):
        return flat
    del flat
    return read_cache(os.path.join(model_dir, CACHE_FILE), fingerprint)


def load_params(model_dir, hparams):
    """The nested param dict of a release folder, from the cache when it is current, else from the TF
    checkpoint (then cached)."""
    fingerprint = checkpoint_fingerprint(model_dir)
    cache = os.path.join(model_dir, CACHE_FILE)
    flat = read_cache(cache, fingerprint)
    if flat is None:
        log(f"converting the TensorFlow checkpoint in {model_dir} (once)")
        flat = convert_checkpoint(model_dir, hparams, fingerprint)
    else:
        check_shapes(flat, hparams, cache)
    return unflatten(flat, hparams["n_layer"])


def hf_hparams(model_dir):
    """Our hparams from the config.json of a HF folder, which must describe the GPT-2 gpt2.py computes."""
    path = os.path.join(model_dir, HF_CONFIG)
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        assert isinstance(config, dict)
    except (ValueError, AssertionError):
        raise UserError(f"{path} is not a JSON object: restore it (or delete the folder and fetch it again)")
    if config.get("model_type") != "gpt2":
        raise UserError(f"{path} describes a {config.get('model_type')!r} model, not GPT-2 (model_type gpt2): give a GPT-2")
    differences = {
        "activation_function": config.get("activation_function", "gelu_new") in HF_ACTIVATIONS,
        "layer_norm_epsilon": config.get("layer_norm_epsilon", 1e-5) == 1e-5,
        "n_inner": config.get("n_inner") in (None, 4 * config.get("n_embd", 0)),
        "scale_attn_by_inverse_layer_idx": not config.get("scale_attn_by_inverse_layer_idx", False),
        "scale_attn_weights": config.get("scale_attn_weights", True),
    }
    if unsupported := [key for key, same in differences.items() if not same]:
        raise UserError(f"{path} sets {unsupported[0]}={config[unsupported[0]]!r}, which GPT-2 as written here does not compute")
    hparams = {key: config.get(hf_key) for key, hf_key in HF_HPARAMS.items()}
    if not all(type(v) is int and v > 0 for v in hparams.values()) or hparams["n_embd"] % hparams["n_head"]:
        raise UserError(f"{path} needs positive integers {', '.join(HF_HPARAMS.values())} (n_embd a multiple of n_head)")
    return hparams


def load_hf_params(model_dir, hparams):
    path = os.path.join(model_dir, HF_WEIGHTS)
    try:
        flat, _ = read_hf_params(path)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise UserError(f"{path} is not readable safetensors ({type(e).__name__}: {str(e)[:120]}): restore it or fetch it again")
    check_shapes(flat, hparams, path)
    return unflatten({key: flat[key] for key in expected_shapes(hparams)}, hparams["n_layer"])


def load_encoder_hparams_and_params(model_size, models_dir="models", step=None):
    """(encoder, hparams, NumPy params) for a released size, a model folder in any layout (a training
    run's `step`, by default its best) or a hub id."""
    model_dir = resolve_model_dir(model_size, models_dir)
    layout = folder_layout(model_dir)
    if layout == "run":
        from train_jax import run_params  # training's imports (orbax) only for a run folder

        _, hparams, params = run_params(model_dir, step)
        return read_encoder(model_dir, hparams), hparams, params
    if step is not None:
        raise UserError(f"--step {step} picks a checkpoint of a training run, but {model_dir} is a model folder: leave it out")
    hparams = hf_hparams(model_dir) if layout == "hf" else load_hparams(model_dir)
    encoder = read_encoder(model_dir, hparams)
    return encoder, hparams, (load_hf_params if layout == "hf" else load_params)(model_dir, hparams)


def read_encoder(model_dir, hparams):
    """The folder's encoder, checked against the model's n_vocab."""
    from encoder import load_encoder

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
    return encoder


def encode_prompt(encoder, hparams, prompt, n_tokens_to_generate):
    """The prompt's ids (`<|endoftext|>` for ""), checked to leave room for the new tokens."""
    check_positive_int(n_tokens_to_generate, "n_tokens_to_generate")
    if not isinstance(prompt, str):  # fire reads 1.50 as a float: say so rather than guess
        log(f"note: the prompt was read as {type(prompt).__name__} {prompt!r}; quote it as '\"...\"' to keep it verbatim")
        prompt = str(prompt)
    if not prompt and encoder.eot_token is None:
        raise UserError("this model's vocabulary has no <|endoftext|>: give a non-empty prompt")
    try:
        ids = encoder.encode(prompt) if prompt else [encoder.eot_token]
    except KeyError:  # a bytes vocabulary knows only the bytes of its training data
        raise UserError(
            f"the prompt has a character outside the model's vocabulary of {len(encoder.encoder)} tokens: "
            f"give text like its training data's"
        )
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
    copy_vocab(vocab_dir, model_dir)


def copy_vocab(vocab_dir, model_dir, hf_names=False):
    """encoder.json and vocab.bpe from a folder in either layout, under OpenAI's names or HF's."""
    import shutil

    for name in VOCAB_FILES:
        source, target = vocab_path(vocab_dir, name), os.path.join(model_dir, HF_VOCAB_NAMES[name] if hf_names else name)
        if os.path.abspath(source) != os.path.abspath(target):
            shutil.copyfile(source, target)


def save_hf_checkpoint(params, hparams, model_dir, vocab_dir):
    """Write `params` as a Hugging Face GPT-2 folder, as transformers' GPT2LMHeadModel.save_pretrained
    does: config.json, model.safetensors ('transformer.'-prefixed names, the lm_head tied to wte),
    generation_config.json, and vocab.json/merges.txt (the files of `vocab_dir`)."""
    from encoder import load_encoder

    os.makedirs(model_dir, exist_ok=True)
    flat = {path: np.asarray(value, np.float32) for path, value in flatten(params).items()}
    check_shapes(flat, hparams, "the params to save")
    eot = load_encoder(vocab_dir, fast=False).eot_token  # None for a bytes vocabulary: no special tokens
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        **{hf_key: hparams[key] for key, hf_key in HF_HPARAMS.items()}, "n_ctx": hparams["n_ctx"], "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
        "tie_word_embeddings": True, "bos_token_id": eot, "eos_token_id": eot, "torch_dtype": "float32",
    }  # fmt: skip
    generation = {"bos_token_id": eot, "eos_token_id": eot} if eot is not None else {}
    tokenizer = {"model_max_length": hparams["n_ctx"], "tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False}
    if eot is None:  # GPT2Tokenizer's default special tokens would be added past the model's vocabulary
        tokenizer.update(bos_token=None, eos_token=None, unk_token=None)
    for name, content in ((HF_CONFIG, config), ("generation_config.json", generation), ("tokenizer_config.json", tokenizer)):
        with open(os.path.join(model_dir, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2)
    write_safetensors(os.path.join(model_dir, HF_WEIGHTS), {path_to_hf_name(p): a for p, a in flat.items()}, {"format": "pt"})
    copy_vocab(vocab_dir, model_dir, hf_names=True)
