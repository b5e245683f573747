"""Every command the README, docs/ and bench/README.md show runs a script that exists, with flags it takes.

The commands are read from the fenced and indented code blocks of those files, and from their inline
code spans that start with a command. A project command's flags are checked by `cli.check_flag_names`,
the check the CLIs themselves run before anything else, against the function that command calls; a
bench script's against the flags it defines (read from its source, not imported). Only the flag names
are checked: values and placeholders (OUT_DIR, PROMPT, ...) are not. The module names that the docs
give for a function or constant (`monitor.PEAK_FLOPS`) must be where it is defined.
"""

import ast
import glob
import inspect
import os
import re
import shlex
import tomllib

import pytest

import cli
import gpt2
import gpt2_pico
import train_jax
from conftest import ROOT

DOCS = ("README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))), "bench/README.md")
README_MAX_LINES = 260
FIRST_COMMANDS = (  # the README's first two commands: what a newcomer runs on a fresh machine
    'python3 -m venv .venv && . .venv/bin/activate && pip install -e . && python gpt2.py "Alan Turing theorized that computers would one day become" --n_tokens_to_generate 8',
    'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" && python -m pytest -q',
)
PYTHONS = ("python", "python3")
SEPARATORS = ("&&", "||", ";", "|")
MENTIONS_A_COMMAND = re.compile(r"(^|[\s\"'=;&|(])(python3?|gpt2|train_jax)(\s|$)")
ENV_ASSIGNMENT = re.compile(r"[A-Za-z_]\w*=.*")
FLAG = re.compile(r"--?[A-Za-z][\w-]*")
PROJECT_CLIS = {"gpt2.py": gpt2.main, "gpt2_pico.py": gpt2_pico.main}
FILE_NAME = re.compile(r"\.(py|json|jsonl|bpe|txt|md|bin|npy|safetensors|toml)\b")


def read(doc):
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        return f.read()


def code_blocks(text):
    """(line number, line) of each line in the fenced and indented code blocks of a Markdown text."""
    lines, fence, previous_blank, in_indented = [], None, True, False
    for number, line in enumerate(text.splitlines(), 1):
        marker = re.match(r"\s*(```|~~~)", line)
        if fence:
            if marker and marker[1] == fence:
                fence = None
            else:
                lines.append((number, line))
        elif marker:
            fence, in_indented = marker[1], False
        elif line.strip() and re.match(r"( {4,}|\t)", line) and (previous_blank or in_indented):
            in_indented = True
            lines.append((number, line))
        else:
            in_indented = in_indented and not line.strip()
        previous_blank = not line.strip()
    return lines


def code_lines(text):
    """The non-empty code lines, a shell line continued with a trailing backslash joined into one."""
    joined = []
    for number, line in code_blocks(text):
        if joined and joined[-1][1].endswith("\\"):
            joined[-1] = (joined[-1][0], joined[-1][1][:-1] + " " + line.strip())
        elif line.strip():
            joined.append((number, line.strip()))
    return joined


def inline_spans(text):
    """(line number, text) of each inline code span outside code blocks; a span may wrap onto the next
    line of its paragraph (its line break read as a space)."""
    code = {number for number, _ in code_blocks(text)}
    prose = "\n".join("" if n in code or re.match(r"\s*(```|~~~)", line) else line for n, line in enumerate(text.splitlines(), 1))
    return [
        (prose.count("\n", 0, match.start()) + 1, match[1].replace("\n", " "))
        for match in re.finditer(r"`([^`\n]+(?:\n[^`\n]+)*)`", prose)
    ]


def commands(line):
    """(program, args) of each project command in a shell line: `python SCRIPT.py ARGS` (also behind a
    wrapper such as srun, or inside a quoted --command="..."), and the `gpt2` / `train_jax` console
    scripts. Environment variables before a command are skipped; `python -m` and `python -c` are not
    project commands."""
    if not MENTIONS_A_COMMAND.search(line):
        return []
    found, segment = [], []
    for token in [*shlex.split(line, comments=True), ";"]:
        if token.endswith(";") and token != ";":
            segment.append(token[:-1])
            token = ";"
        if token not in SEPARATORS:
            segment.append(token)
            if re.search(r"\s", token):  # a quoted command line
                found += commands(token.split("=", 1)[1] if FLAG.match(token) and "=" in token else token)
            continue
        while segment and ENV_ASSIGNMENT.fullmatch(segment[0]):
            segment.pop(0)
        if segment and segment[0] in ("gpt2", "train_jax"):
            found.append((segment[0], segment[1:]))
        else:
            python = next((i for i, t in enumerate(segment) if t in PYTHONS), None)
            if python is not None and python + 1 < len(segment) and segment[python + 1].endswith(".py"):
                found.append((segment[python + 1], segment[python + 2 :]))
        segment = []
    return found


def text_commands(text):
    """(line number, shell line, program, args) of every command a Markdown text shows: in its code
    blocks, and in its inline code spans that start with a command."""
    spans = [(n, span) for n, span in inline_spans(text) if MENTIONS_A_COMMAND.match(span.strip())]
    return [(n, line, program, args) for n, line in code_lines(text) + spans for program, args in commands(line)]


def flags(args):
    """The flag names among a command's arguments, `[--flag VALUE]` (optional in a usage line) too."""
    names = []
    for arg in args:
        arg = arg.strip("[]")
        if arg == "--":
            break
        if FLAG.fullmatch(arg.split("=", 1)[0]):
            names.append(arg.split("=", 1)[0])
    return names


def with_parameters(names):
    """A function whose signature has these keyword parameters, for cli.check_flag_names."""

    def function():
        pass

    function.__signature__ = inspect.Signature([inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY) for name in names])
    return function


def script_flags(path, args):
    """What a script that is not one of the project's CLIs takes, read from its source: the parameters of
    the function fire runs (fire.Fire's, or cli.run_cli's; the one named by the first argument when the
    script fires several, as `bench/scale.py tpu`), or the options of its argparse parser."""
    tree = ast.parse(read(path))
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)]
    runs = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "run_cli"]
    fired = [call.args[0].id for call in [*(c for c in calls if c.func.attr == "Fire"), *runs] if call.args and isinstance(call.args[0], ast.Name)]
    if fired:
        name = args[0] if args and args[0] in fired else "main" if "main" in fired else fired[0]
        node = functions[name].args
        return with_parameters(a.arg for a in [*node.posonlyargs, *node.args, *node.kwonlyargs])
    options = [
        arg.value for call in calls if call.func.attr == "add_argument" for arg in call.args
        if isinstance(arg, ast.Constant) and str(arg.value).startswith("--")
    ]  # fmt: skip
    return with_parameters(option[2:].replace("-", "_") for option in options)


def console_script(name):
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert name in scripts, f"{name} is not a console script in pyproject.toml"
    return scripts[name].split(":")[0] + ".py"


def script_of(program, args):
    """(script, train_jax subcommand or None) of a command."""
    script = console_script(program) if program in ("gpt2", "train_jax") else os.path.normpath(program)
    return script, args[0] if script == "train_jax.py" and args and args[0] in train_jax.COMMANDS else None


def command_function(program, args):
    """The function whose signature a command's flags must be in."""
    script, _ = script_of(program, args)
    assert os.path.isfile(os.path.join(ROOT, script)), f"{script} does not exist"
    if script == "train_jax.py":
        return train_jax.COMMANDS[args[0]] if args and args[0] in train_jax.COMMANDS else train_jax.train
    if script in PROJECT_CLIS:
        return PROJECT_CLIS[script]
    return script_flags(script, args)


def check_command(program, args):
    """AssertionError for a script that does not exist, cli.UserError for a flag the command does not take."""
    cli.check_flag_names(command_function(program, args), flags(args))


def check_text(text):
    """Every command of a Markdown text checked; how many there were."""
    found = text_commands(text)
    for _, _, program, args in found:
        check_command(program, args)
    return len(found)


ALL_COMMANDS = [(doc, *command) for doc in DOCS for command in text_commands(read(doc))]


@pytest.mark.parametrize("doc, number, line, program, args", ALL_COMMANDS, ids=[f"{c[0]}:{c[1]}" for c in ALL_COMMANDS])
def test_every_command_runs_a_script_that_exists_with_flags_it_takes(doc, number, line, program, args):
    try:
        check_command(program, args)
    except (AssertionError, cli.UserError) as e:
        pytest.fail(f"{doc}:{number}: {line}\n  {e}")


def test_the_docs_show_every_command_and_bench_readme_every_bench_script():
    everywhere = {script_of(program, args) for _, _, _, program, args in ALL_COMMANDS}
    for script in ("gpt2.py", "gpt2_pico.py", "train_jax.py"):
        assert (script, None) in everywhere, f"no doc shows python {script}"
    for sub in set(train_jax.COMMANDS) - {"train"}:
        assert ("train_jax.py", sub) in everywhere, f"no doc shows python train_jax.py {sub}"
    in_bench_readme = {script_of(program, args)[0] for doc, _, _, program, args in ALL_COMMANDS if doc == "bench/README.md"}
    for path in sorted(glob.glob(os.path.join(ROOT, "bench", "*.py"))):
        script = os.path.relpath(path, ROOT)
        assert script in in_bench_readme, f"bench/README.md does not show how to run {script}"


def test_the_readme_is_short_and_starts_with_the_two_commands():
    text = read("README.md")
    assert len(text.splitlines()) <= README_MAX_LINES
    assert tuple(line for _, line in code_lines(text)[:2]) == FIRST_COMMANDS


def anchors(path):
    """The anchors GitHub gives a Markdown file's headings: lower case, punctuation dropped, spaces as dashes."""
    text = read(path)
    code = {number for number, _ in code_blocks(text)}
    lines = [line for number, line in enumerate(text.splitlines(), 1) if number not in code]
    headings = [line.lstrip("#").strip() for line in lines if re.match(r"#{1,6} ", line)]
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_the_docs_link_to_files_and_headings_that_exist():
    for doc in DOCS:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", read(doc)):
            if re.match(r"https?://", target):
                continue
            path = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), target)) if target else os.path.join(ROOT, doc)
            assert os.path.exists(path), f"{doc} links to {target}, which does not exist"
            assert not anchor or anchor in anchors(path), f"{doc} links to {target}#{anchor}, a heading {target or doc} does not have"


def defined_names(module):
    tree = ast.parse(read(module + ".py"))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return names


def module_references(text):
    """(line number, span, module, name) of each `module.name` in a text's inline code, for the project's modules."""
    modules = {name[:-3] for name in os.listdir(ROOT) if name.endswith(".py")}
    return [
        (number, span, match[1], match[2]) for number, span in inline_spans(text)
        for match in re.finditer(r"(?<![\w./])(\w+)\.(\w+)", span)
        if match[1] in modules and not FILE_NAME.match(span, match.start(2) - 1)
    ]  # fmt: skip


def test_the_module_the_docs_name_for_a_function_defines_it():
    for doc in DOCS:
        for number, span, module, name in module_references(read(doc)):
            assert name in defined_names(module), f"{doc}:{number}: `{span}`: {module}.py defines no {name}"


def test_a_name_that_moved_to_another_module_is_caught():
    [(_, _, module, name)] = module_references("the peak is `train_jax.PEAK_FLOPS`, see `train_jax.py`\n")
    assert name not in defined_names(module) and name in defined_names("monitor")


STALE = [  # (a doc's text, what the check raises)
    ("```sh\npython train_jax.py --max_iter 5\n```\n", cli.UserError),
    ("Run `python gpt2.py \"hi\" --n_token 3` here.\n", cli.UserError),
    ("```sh\npython train_jax.py export --ckpt_dir out/mine --out models/mine --max_iters 5\n```\n", cli.UserError),
    ("```sh\npython train_jax.py --max_iters 5 \\\n  --no_such_flag 1\n```\n", cli.UserError),
    ("```sh\nXLA_FLAGS=--xla_force_host_platform_device_count=8 python gpt2.py hi && python gpt2.py hi --bogus\n```\n", cli.UserError),
    ('```sh\ngcloud compute tpus tpu-vm ssh N --command="cd REPO && python train_jax.py --meshes dp=8"\n```\n', cli.UserError),
    ("    python gpt2_pico.py hi --temperature 0.8\n", cli.UserError),
    ("```sh\npython bench/decode.py --model_sizes 1558M\n```\n", cli.UserError),
    ("```sh\npython bench/scale.py tpu --block_size 1024\n```\n", cli.UserError),
    ("```sh\npython bench/soak.py --generation_count 5\n```\n", cli.UserError),
    ("```sh\ngpt2 hi --n_tokens 3\n```\n", cli.UserError),
    ("Score it with `python train_jax.py eval\n--ckpt_dir out/mine --hellaswags`.\n", cli.UserError),
    ("```sh\npython bench/nothing_here.py\n```\n", AssertionError),
]


@pytest.mark.parametrize("text, error", STALE)
def test_a_stale_command_fails_the_check(text, error):
    with pytest.raises(error):
        check_text(text)


def test_the_same_commands_with_their_real_flags_pass():
    text = """
```sh
python train_jax.py --max_iters 5 \\
  --nan_policy skip --noresume   # a comment's 'quote
XLA_FLAGS=--xla_force_host_platform_device_count=8 python gpt2.py hi && python gpt2.py hi --nostop_at_eot -n 3
gcloud compute tpus tpu-vm ssh N --command="cd REPO && python train_jax.py --mesh dp=8"
python bench/scale.py tpu [--rows 0,1,2]
python bench/soak.py --generations 5
```

    python gpt2_pico.py hi --n_tokens_to_generate 8

Then `python train_jax.py export --ckpt_dir OUT_DIR --out MODEL_DIR --format hf` and
`gpt2 hi --model_size MODEL_DIR`.
"""
    assert check_text(text) == 9
