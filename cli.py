"""The command-line plumbing both CLIs share: fire with checked flag names, one exception type for
the mistakes a user can fix (printed as one `error:` line, exit code 2), the generic flag checks, and
which of JAX's platforms start (libtpu stays silent where there is no TPU)."""

import difflib
import glob
import importlib.util
import inspect
import os
import re
import sys
import types

PLAIN_PROGRESS_S = 30.0  # off a terminal: a progress line at most this often, none for shorter steps
# The device files of a TPU host (libtpu's own test), and of the GPUs JAX would use instead (NVIDIA's as
# jax's hardware_utils looks for them, AMD's ROCm driver).
TPU_DEVICE_FILES = ("/dev/accel*", "/dev/vfio")
GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def jax_platforms(environ, tpu_present, gpu_present, libtpu_installed):
    """The JAX_PLATFORMS to set, or None to leave JAX's own choice. With libtpu installed (the `tpu`
    extra, for compile --topology), JAX starts the TPU runtime in every process that has no
    JAX_PLATFORMS, and on a machine without a TPU libtpu prints its start-up warnings on stderr first.
    Where there is neither a TPU nor a GPU, the CPU is all JAX would find: it is named, and libtpu
    never starts. JAX_PLATFORMS set by the user wins; a TPU or GPU host is left as it is."""
    if "JAX_PLATFORMS" in environ or tpu_present or gpu_present or not libtpu_installed:
        return None
    return "cpu"


def exists(patterns):
    return any(glob.glob(pattern) for pattern in patterns)


def keep_libtpu_quiet():
    """Set JAX_PLATFORMS (see jax_platforms) before JAX first starts a backend: this module is imported
    by every entry point before any JAX code runs."""
    libtpu = importlib.util.find_spec("libtpu") is not None
    platforms = jax_platforms(os.environ, exists(TPU_DEVICE_FILES), exists(GPU_DEVICE_FILES), libtpu)
    if platforms is None:
        return
    os.environ["JAX_PLATFORMS"] = platforms
    if "jax" in sys.modules:  # imported already (by a user's script): its config read the environment then
        sys.modules["jax"].config.update("jax_platforms", platforms)


keep_libtpu_quiet()


class UserError(Exception):
    """A mistake the user can fix; the CLIs print its one-line message and exit with code 2."""


def run_cli(fn, argv=None):
    """Run `fn` as a fire CLI; a UserError becomes `error: ...` on stderr and exit code 2."""
    import fire

    argv = sys.argv[1:] if argv is None else argv
    try:
        check_flag_names(fn, argv)
        fire.Fire(fn, command=[quote_unparsable(arg) for arg in argv])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def quote_unparsable(arg):
    """Fire reads each value as a Python literal (5, 0.5, True, [1, 2]) or else as text; a value that
    Python's parser runs out of memory on (a prompt of thousands of words) goes to fire as a string
    literal, so it stays text. (fire's SetParseFn would do this, but shows up in --help as a group.)"""
    import fire.parser

    flag, equals, value = arg.partition("=") if arg.startswith("-") else ("", "", arg)
    try:
        fire.parser.DefaultParseValue(value)
        return arg
    except (MemoryError, RecursionError):
        return flag + equals + repr(value)


def check_flag_names(fn, argv):
    """Fire would take an unknown --flag for a prompt, or fail with a page of usage: name it instead."""
    names = [name for name, p in inspect.signature(fn).parameters.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for arg in argv:
        if arg == "--":  # fire's own flags follow
            return
        match = re.fullmatch(r"(--?)([A-Za-z][\w-]*)(=.*)?", arg)
        if not match:
            continue
        name = match[2].replace("-", "_")
        short = len(name) == 1 and sum(n.startswith(name) for n in names) == 1  # fire's -n for --n_tokens...
        if name in ("help", "h") or short or name in names or (name.startswith("no") and name[2:] in names):
            continue
        close = [n for n in names if n.startswith(name)] or difflib.get_close_matches(name, names, n=1, cutoff=0.5)
        hint = f"did you mean --{close[0]}?" if close else f"the flags are --{', --'.join(names)}"
        raise UserError(f"unknown flag {match[1]}{match[2]}: {hint} (see --help)")


def check_folder(path, flag):
    """A folder path given as --flag (fire reads `--out 5` as the number 5): not an existing file."""
    path = str(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--{flag} {path!r} is a file, not a folder: give the path of a folder")
    return path


def check_number(value, flag, low, high):
    """An int or float in [low, high) (fire reads `--x 1e999` as inf, and `--x nan` as text)."""
    if type(value) not in (int, float) or not low <= value < high:
        raise UserError(f"--{flag} must be a number in [{low}, {high}), got {value!r}")
    return value


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def progress(iterable=None, **bar):
    """tqdm's bar (`bar`: its keyword arguments) on a terminal. Off one (a pod's log, `> run.log`), the
    bar's text as plain lines instead of carriage-return redraws: none for a step shorter than
    PLAIN_PROGRESS_S, else one every PLAIN_PROGRESS_S seconds and the last."""
    from tqdm import tqdm

    if sys.stderr.isatty():
        return tqdm(iterable, file=sys.stderr, **bar)
    printed = [""]

    def write(text):  # tqdm redraws as '\r' + text + padding; closing repeats the last count, rate updated
        count = text.strip().split(" [")[0]
        if count not in ("", printed[0]):
            printed[0] = count
            log(text.strip())

    every = dict(delay=PLAIN_PROGRESS_S, mininterval=PLAIN_PROGRESS_S, maxinterval=PLAIN_PROGRESS_S)
    return tqdm(iterable, **{**bar, "leave": True}, file=types.SimpleNamespace(write=write, flush=lambda: None), **every)


def check_seed(seed):
    """A seed both backends' generators take: NumPy's and JAX's keys are 32-bit."""
    if type(seed) is not int or not 0 <= seed < 2**32:
        raise UserError(f"--seed must be an integer in [0, 2**32), got {seed!r}")
    return seed


def check_positive_int(value, flag):
    if type(value) is not int or value < 1:
        raise UserError(f"--{flag} must be a positive integer, got {value!r}")
    return value
