"""The project's shape: one job per module (each says it on its first line), modules that stack (the
import graph, read from the sources, has no cycle and no project import hidden in a function), and
generation that loads only what it needs."""

import ast
import os
import subprocess
import sys

import pytest

import train_jax
from conftest import ROOT
from test_formats import write_hf_folder
from utils import load_encoder_hparams_and_params
from test_train import QUIET, TINY, data_dir  # noqa: F401 (data_dir: a fixture)

# What generation from a model folder never needs: the trainer and the training packages.
TRAINING_ONLY = ("optax", "orbax", "train_jax", "step", "monitor", "aot", "data", "evaluation")


def project_modules(root=ROOT):
    return sorted(name[:-3] for name in os.listdir(root) if name.endswith(".py"))


def imports(path, modules):
    """(the project modules a file imports at its top level, those it imports inside a function)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    top, hidden = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module.split(".")[0]]
        else:
            continue
        (top if node in tree.body else hidden).update(name for name in names if name in modules)
    return top, hidden


def import_graph(root=ROOT):
    modules = project_modules(root)
    graph, hidden = {}, {}
    for module in modules:
        graph[module], hidden[module] = imports(os.path.join(root, module + ".py"), modules)
    return graph, hidden


def find_cycle(graph):
    """A list of modules that import each other in a circle, or None."""
    state, path = {}, []

    def visit(module):
        state[module] = "open"
        path.append(module)
        for other in sorted(graph[module]):
            if state.get(other) == "open":
                return path[path.index(other) :] + [other]
            if other not in state and (cycle := visit(other)):
                return cycle
        state[module] = "done"
        path.pop()
        return None

    return next((cycle for module in sorted(graph) if module not in state and (cycle := visit(module))), None)


def layers(graph):
    """The modules in import order, bottom first: each row imports only rows above it."""
    rows, placed = [], set()
    while len(placed) < len(graph):
        row = sorted(m for m in graph if m not in placed and graph[m] <= placed)
        rows.append(row)
        placed.update(row)
    return rows


def test_the_import_graph_has_no_cycle_and_no_hidden_project_import(capsys):
    graph, hidden = import_graph()
    assert {"gpt2", "gpt2_pico", "train_jax", "utils", "encoder", "sharding", "formats", "checkpoints", "step", "monitor"} <= set(graph)
    assert {m: sorted(h) for m, h in hidden.items() if h} == {}
    assert find_cycle(graph) is None
    with capsys.disabled():  # the graph, printed for the record: python -m pytest tests/test_layout.py -s
        print("\nimport graph, bottom layer first:")
        for i, row in enumerate(layers(graph)):
            print(f"  {i}: " + ", ".join(f"{m} <- {', '.join(sorted(graph[m])) or '-'}" for m in row))
        print("lines per module, and its longest function:")
        for module in graph:
            tree = ast.parse(source := open(os.path.join(ROOT, module + ".py"), encoding="utf-8").read())
            length, name = max((f.end_lineno - f.lineno + 1, f.name) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef))
            print(f"  {module + '.py':16} {len(source.splitlines()):4}   {name} {length}")


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layers({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == [["b"], ["a"], ["c"]]


def test_hidden_imports_are_found(tmp_path):
    (tmp_path / "low.py").write_text('"""Low."""\n')
    (tmp_path / "high.py").write_text('"""High."""\nimport low\n\n\ndef f():\n    from high import f\n    import jax\n')
    graph, hidden = import_graph(str(tmp_path))
    assert graph == {"high": {"low"}, "low": set()} and hidden == {"high": {"high"}, "low": set()}


@pytest.mark.parametrize("module", project_modules())
def test_each_module_starts_with_a_line_saying_its_job(module):
    tree = ast.parse(open(os.path.join(ROOT, module + ".py"), encoding="utf-8").read())
    docstring = ast.get_docstring(tree)
    assert docstring and isinstance(tree.body[0], ast.Expr), f"{module}.py does not start with a docstring"
    assert len(docstring.splitlines()[0]) > 20


LOADED = """
import runpy, sys
sys.argv = ["gpt2.py", "ROMEO:", "--n_tokens_to_generate", "2", "--model_size", sys.argv[1], "--backend", sys.argv[2]]
try:
    runpy.run_path("gpt2.py", run_name="__main__")
finally:
    print("LOADED", " ".join(sorted({m.split(".")[0] for m in sys.modules})), file=sys.stderr)
"""


def loaded_modules(model_dir, backend):
    result = subprocess.run([sys.executable, "-c", LOADED, model_dir, backend], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return set(result.stderr.split("LOADED ")[1].split())


@pytest.fixture(scope="module")
def run_folder(data_dir, tmp_path_factory):  # noqa: F811 (a fixture)
    out_dir = str(tmp_path_factory.mktemp("run") / "out")
    train_jax.fit(train_jax.default_flags(data_dir=data_dir, out_dir=out_dir, max_iters=1, **TINY, **QUIET))
    return out_dir


@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_generating_from_a_release_folder_loads_no_trainer(tf_model, backend):
    load_encoder_hparams_and_params(tf_model[0])  # the cache is written: TensorFlow (which may import jax) is not loaded
    loaded = loaded_modules(tf_model[0], backend)
    assert {"utils", "formats"} <= loaded  # gpt2 itself runs as __main__
    assert loaded.isdisjoint(TRAINING_ONLY), sorted(loaded & set(TRAINING_ONLY))
    assert ("jax" in loaded) == (backend == "jax")


def test_generating_from_an_hf_folder_loads_no_trainer(tf_model, vocab_dir, tmp_path):
    loaded = loaded_modules(write_hf_folder(str(tmp_path / "hf"), tf_model[1], vocab_dir), "numpy")
    assert loaded.isdisjoint(TRAINING_ONLY), sorted(loaded & set(TRAINING_ONLY))


def test_generating_from_a_run_folder_loads_only_what_reads_the_run(run_folder):
    loaded = loaded_modules(run_folder, "numpy")
    assert {"orbax", "checkpoints"} <= loaded
    assert loaded.isdisjoint(set(TRAINING_ONLY) - {"orbax"}), sorted(loaded & set(TRAINING_ONLY))
