"""Checkpoint formats: the param tree, its names in OpenAI's release and in Hugging Face's files, their
readers and writers, and the converted cache of a release folder.

The param tree is OpenAI's checkpoint as nested dicts: {'wte', 'wpe', 'blocks': [{'attn': {'c_attn':
{'w', 'b'}, ...}, ...}], 'ln_f'}, conv weights 2-D [n_in, n_out], '/'-joined paths such as
'blocks/3/attn/c_attn/w' (`flatten`). Two layouts of a model folder hold it:
- release: OpenAI's 7 files (TensorFlow checkpoint, hparams.json, encoder.json, vocab.bpe). The first
  load converts the checkpoint to `model.ckpt.safetensors` beside it; later loads memory-map that cache
  (no TensorFlow, no pickle) and rebuild it when the checkpoint changes.
- hf: Hugging Face's config.json, model.safetensors, vocab.json and merges.txt.
"""

import contextlib
import hashlib
import json
import os
import re
import shutil

import numpy as np

from cli import UserError, log
from encoder import HF_VOCAB_NAMES, load_encoder, vocab_path

CKPT_FILES = ("checkpoint", "model.ckpt.data-00000-of-00001", "model.ckpt.index", "model.ckpt.meta")
VOCAB_FILES = ("encoder.json", "vocab.bpe")
RELEASE_FILES = (*CKPT_FILES, "hparams.json", *VOCAB_FILES)
HPARAMS_KEYS = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")
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
# HF's config keys of our hparams, and the settings under which its GPT-2 computes what gpt2.py does.
HF_HPARAMS = {"n_vocab": "vocab_size", "n_ctx": "n_positions", "n_embd": "n_embd", "n_head": "n_head", "n_layer": "n_layer"}
HF_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both are the tanh approximation gpt2.gelu computes
SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}  # BF16 is widened by hand
SAFETENSORS_ALIGN = 64  # data aligned like this is used by JAX on the CPU without a copy
RELEASED_HPARAMS = {  # OpenAI's hparams.json of each release, so that no weights are needed
    size: {"n_vocab": 50257, "n_ctx": 1024, "n_embd": n_embd, "n_head": n_head, "n_layer": n_layer}
    for size, n_layer, n_head, n_embd in (("124M", 12, 12, 768), ("355M", 24, 16, 1024), ("774M", 36, 20, 1280), ("1558M", 48, 25, 1600))
}


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


def stacked(params):  # {'blocks': n_layer blocks} -> {'blocks': one block of [n_layer, ...] weights}
    """Training's layout of the params, and so of their gradients and AdamW's moments: the blocks
    stacked, which the remat path scans as they are and the optimizer updates as a dozen arrays
    whatever the depth. Made once with the train state; gpt2.py, checkpoints and exports keep the list."""
    import jax
    import jax.numpy as jnp

    return {**params, "blocks": jax.tree.map(lambda *layers: jnp.stack(layers), *params["blocks"])}


def unstacked(params, layer=lambda a, i: a[i]):  # {'blocks': one block of [n_layer, ...]} -> {'blocks': n_layer blocks}
    """The list of blocks of training's stacked params; `layer(a, i)` is layer i of a stacked leaf."""
    import jax

    n_layer = jax.tree.leaves(params["blocks"])[0].shape[0]
    return {**params, "blocks": [jax.tree.map(lambda a: layer(a, i), params["blocks"]) for i in range(n_layer)]}


def read_json(path, fix):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is corrupt ({type(e).__name__}): {fix}")


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


def read_encoder(model_dir, hparams):
    """The folder's encoder, checked against the model's n_vocab."""
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


def tf_name_to_path(name):
    """'model/h3/attn/c_attn/w' -> 'blocks/3/attn/c_attn/w'; 'model/wte' -> 'wte'."""
    return re.sub(r"^h(\d+)/", r"blocks/\1/", name.removeprefix("model/"))


def path_to_tf_name(path):
    return "model/" + re.sub(r"^blocks/(\d+)/", r"h\1/", path)


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


def load_hf_params(model_dir, hparams):
    path = os.path.join(model_dir, HF_WEIGHTS)
    try:
        flat, _ = read_hf_params(path)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise UserError(f"{path} is not readable safetensors ({type(e).__name__}: {str(e)[:120]}): restore it or fetch it again")
    check_shapes(flat, hparams, path)
    return unflatten({key: flat[key] for key in expected_shapes(hparams)}, hparams["n_layer"])


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
    for name in VOCAB_FILES:
        source, target = vocab_path(vocab_dir, name), os.path.join(model_dir, HF_VOCAB_NAMES[name] if hf_names else name)
        if os.path.abspath(source) != os.path.abspath(target):
            shutil.copyfile(source, target)


def save_hf_checkpoint(params, hparams, model_dir, vocab_dir):
    """Write `params` as a Hugging Face GPT-2 folder, as transformers' GPT2LMHeadModel.save_pretrained
    does: config.json, model.safetensors ('transformer.'-prefixed names, the lm_head tied to wte),
    generation_config.json, and vocab.json/merges.txt (the files of `vocab_dir`)."""
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
