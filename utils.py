"""Download GPT-2 and find the model folder a flag names: OpenAI's release files, Hugging Face hub repos,
and the three layouts of a local folder (see `folder_layout`), loaded as (encoder, hparams, params).

The formats themselves (the param tree, TensorFlow, safetensors, the cache) are formats.py's; a training
run's folder is checkpoints.py's.
"""

import contextlib
import os
import re
import time
import urllib.parse

from checkpoints import run_params
from cli import UserError, check_folder, check_positive_int, log, progress
from formats import HF_CONFIG, HF_FILES, RELEASE_FILES, RELEASED_HPARAMS, hf_hparams, load_hf_params, load_hparams, load_params, read_encoder

MODEL_SIZES = tuple(RELEASED_HPARAMS)
BASE_URL_ENV = "GPT2_BASE_URL"
DEFAULT_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
# The hub's GPT-2 repos, also known by their old bare names (gpt2 ... gpt2-xl).
HUB_OWNER, HUB_NAMES = "openai-community", ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
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
                f"download the files by hand into {os.path.dirname(path)} (README: 'Offline machines')"
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


def download_file(url, path, fix=None):
    """Download `url` to `path` via `path.part`, resuming and retrying with exponential backoff.
    One process at a time per folder: one that waited finds the file there and uses it. `fix` says
    how to do without the download (by default: download it by hand)."""
    with folder_lock(os.path.dirname(os.path.abspath(path))):
        if not os.path.isfile(path):
            fetch_with_retries(url, path, fix or f"download it by hand into {os.path.dirname(path)} (README: 'Offline machines')")


def unreachable(error):
    """Why no connection could be made (no DNS, no route, refused, timed out connecting), or None when
    one was: a machine without network fails so at once, and retrying would only wait."""
    import requests
    import urllib3

    reason = getattr(error.args[0], "reason", None) if isinstance(error, requests.ConnectionError) and error.args else None
    if not isinstance(reason, urllib3.exceptions.ConnectTimeoutError):  # NewConnectionError and NameResolutionError too
        return None
    return (re.findall(r"\[Errno -?\d+\] ([^)\]]+)", str(reason)) or [type(reason).__name__])[-1]


def fetch_with_retries(url, path, fix):
    import requests
    import urllib3

    for attempt in range(DOWNLOAD_RETRIES):
        try:
            return fetch_once(url, path)
        except (RetryableError, requests.RequestException, urllib3.exceptions.HTTPError) as e:
            if why := unreachable(e):
                raise UserError(f"could not connect to {urllib.parse.urlsplit(url).hostname} for {url} ({why}): {fix}")
            error = e
            if attempt + 1 < DOWNLOAD_RETRIES:
                log(f"download of {url} failed ({type(e).__name__}: {str(e)[:200]}); retrying")
                time.sleep(DOWNLOAD_BACKOFF_S * 2**attempt)
    raise UserError(f"could not download {url} after {DOWNLOAD_RETRIES} tries ({type(error).__name__}); check your network, or {fix}")


def missing_release_files(model_dir):
    return [name for name in RELEASE_FILES if not os.path.isfile(os.path.join(model_dir, name))]


def download_gpt2_files(model_size, model_dir, flag="model_size"):
    """Fetch whichever of the 7 release files `model_dir` lacks."""
    try:
        os.makedirs(model_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"could not create {model_dir} ({e.strerror or e}): give a writable --models_dir")
    fix = (f"copy the release files into {model_dir} by hand (README: 'Offline machines'), give --{flag} a model folder, "
           f"or set {BASE_URL_ENV} to a mirror")  # fmt: skip
    for name in missing_release_files(model_dir):
        download_file(f"{base_url()}/{model_size}/{name}", os.path.join(model_dir, name), fix)


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
        with quiet_hub():
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
            f"{repo_id} is not in the Hugging Face cache and the hub cannot be reached (no network, or HF_HUB_OFFLINE=1): "
            f"give --{flag} a local folder, set HF_ENDPOINT to a mirror, or connect"
        )
    except HfHubHTTPError as e:
        raise UserError(f"the hub answered HTTP {e.response.status_code} for {repo_id}: try again later, or {fix}")
    except OSError as e:
        raise UserError(f"could not write {repo_id} into the Hugging Face cache ({e.strerror or e}): free some disk space or set HF_HOME")
    return model_dir


@contextlib.contextmanager
def quiet_hub():
    """huggingface_hub's warnings off: without network it retries for about 20 s, a line per try, and
    the error that ends them (download_hf_files) says what to do."""
    import logging

    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# ---------------------------------------------------------------------------------------------
# Load


def resolve_model_dir(model_size, models_dir, flag="model_size"):
    """The model folder --flag names: `models_dir/model_size` for a released size (downloading what is
    missing), a local folder in any layout (see folder_layout), or a hub id's folder in HF's cache."""
    if model_size in MODEL_SIZES:
        model_dir = os.path.join(check_folder(models_dir, "models_dir"), model_size)
        if missing_release_files(model_dir):
            log(f"downloading GPT-2 {model_size} to {model_dir}")
            download_gpt2_files(model_size, model_dir, flag)
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


def load_encoder_hparams_and_params(model_size, models_dir="models", step=None):
    """(encoder, hparams, NumPy params) for a released size, a model folder in any layout (a training
    run's `step`, by default its best) or a hub id."""
    model_dir = resolve_model_dir(model_size, models_dir)
    layout = folder_layout(model_dir)
    if layout == "run":
        _, hparams, params = run_params(model_dir, step)
        return read_encoder(model_dir, hparams), hparams, params
    if step is not None:
        raise UserError(f"--step {step} picks a checkpoint of a training run, but {model_dir} is a model folder: leave it out")
    hparams = hf_hparams(model_dir) if layout == "hf" else load_hparams(model_dir)
    encoder = read_encoder(model_dir, hparams)
    return encoder, hparams, (load_hf_params if layout == "hf" else load_params)(model_dir, hparams)


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
