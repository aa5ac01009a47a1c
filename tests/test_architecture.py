"""The structure the code must keep, checked from its source (`pytest tests/test_architecture.py`; `python
tests/test_architecture.py` prints the import graph's package edges):

* no import cycle among the modules of the four packages (hdflash_jax, convert, train, eval; every import counted,
  also those inside functions), nor among the library's subpackages (families, training, decode, ...: a module
  of one may import another only if no module of that one imports it back);
* arrows point one way: the library imports no application; convert imports only the library; train/ and eval/
  are siblings (neither imports the other) except the one module that drives both, the small model's pipeline;
* one place decides which drafter family a drafter is: outside the registry and the families' own modules no code
  tests a family config's type, compares a kind to a family's name, or names a checkpoint's config file.

Each check has a negative control: the same function run on a planted violation must find it.
"""

from __future__ import annotations

import ast
import re
import sys
from collections import defaultdict
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("hdflash_jax", "convert", "train", "eval")
PIPELINE = "train.small_pipeline"  # drives training and evaluation: the one module that may import both
FAMILY_HOMES = ("hdflash_jax/families/", "hdflash_jax/drafter/", "hdflash_jax/dspark/", "hdflash_jax/formats/")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources(root: Path = REPO) -> dict[str, Path]:
    return {module_name(p, root): p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))}


def imports_of(path: Path, known: set[str], name: str) -> set[str]:
    """The project modules `path` imports (a `from a.b import c` names module a.b.c when that is a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                base = ".".join(up[: len(up) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    src = sources(root)
    known = set(src)
    return {m: imports_of(p, known, m) for m, p in src.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def library_units(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The library's import graph with each subpackage as one node (hdflash_jax.families.block -> families)."""
    def unit(m: str) -> str:
        parts = m.split(".")
        return ".".join(parts[:2]) if len(parts) > 2 else m

    out: dict[str, set[str]] = defaultdict(set)
    for m, deps in graph.items():
        if m.split(".")[0] == "hdflash_jax":
            out[unit(m)] |= {unit(d) for d in deps if d.split(".")[0] == "hdflash_jax" and unit(d) != unit(m)}
    return dict(out)


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    allowed = {"hdflash_jax": {"hdflash_jax"}, "convert": {"hdflash_jax", "convert"},
               "train": {"hdflash_jax", "train"}, "eval": {"hdflash_jax", "eval"}}
    bad = []
    for m, deps in graph.items():
        pkg = m.split(".")[0]
        for d in deps:
            if d.split(".")[0] not in allowed[pkg] and not (m == PIPELINE and d.split(".")[0] == "eval"):
                bad.append(f"{m} -> {d}")
    return sorted(bad)


FAMILY_TESTS = re.compile(
    r"isinstance\([^)]*\b(DrafterConfig|DSparkConfig|MTPConfig|ReplayConfig)\b"  # a family's config type tested
    r"|\bkind\s*[!=]=\s*[\"'](ar|replay|mtp|block|dspark)[\"']"  # a kind string compared to a family's name
    r"|\b(fam|family|\w+_family)\.name\s*[!=]=\s*[\"'](ar|replay|mtp|block|dspark)[\"']"  # a family's name compared
    r"|[\"'](drafter_config|dspark_config)\.json[\"']")  # a checkpoint's config file named


def family_tests(root: Path = REPO) -> list[str]:
    found = []
    for pkg in PACKAGES:
        for p in sorted((root / pkg).rglob("*.py")):
            rel = p.relative_to(root).as_posix()
            if rel.startswith(FAMILY_HOMES):
                continue
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
                if FAMILY_TESTS.search(line):
                    found.append(f"{rel}:{i}: {line.strip()}")
    return found


# ---- the checks ------------------------------------------------------------------------------------------------

GRAPH = import_graph()


def test_no_import_cycle():
    assert cycles(GRAPH) == []
    assert cycles(library_units(GRAPH)) == []


def test_arrows_point_one_way():
    assert layering_violations(GRAPH) == []


def test_only_the_registry_tells_families_apart():
    assert family_tests() == []


# ---- negative controls: planted violations are found ------------------------------------------------------------

def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir(parents=True, exist_ok=True)
        (tmp_path / pkg / "__init__.py").write_text("")
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def test_negative_controls_find_planted_violations(tmp_path):
    root = _plant(tmp_path, {
        "eval/a.py": "def f():\n    from eval import b\n",  # a cycle through a function-level import
        "eval/b.py": "from eval.a import f\n",
        "train/t.py": "from eval.b import x\n",  # train -> eval
        "hdflash_jax/lib.py": "import convert.c\n",  # library -> application
        "convert/c.py": "x = 1\n",
        "hdflash_jax/fam/reg.py": "from hdflash_jax.trn.loss import L\n",  # subpackages importing each other
        "hdflash_jax/trn/loss.py": "L = 1\n",
        "hdflash_jax/trn/cfg.py": "def f():\n    from hdflash_jax.fam import reg\n",
        "train/small_pipeline.py": "from eval import b\n",  # allowed: the pipeline
        "eval/w.py": "ok = isinstance(cfg, DSparkConfig)\nif src.kind == 'dspark': pass\n"
                     "path / \"drafter_config.json\"\nfam.name == \"replay\"\nmeth.name == \"ar\"\n",
    })
    graph = import_graph(root)
    assert cycles(graph) == [["eval.a", "eval.b"]]  # modules: the subpackages' loop is no module cycle
    assert cycles(library_units(graph)) == [["hdflash_jax.fam", "hdflash_jax.trn"]]
    assert layering_violations(graph) == ["hdflash_jax.lib -> convert.c", "train.t -> eval.b"]
    assert len(family_tests(root)) == 4


def test_the_package_graph_is_drawn():
    """The package-level picture the note prints: which package imports which (anyone can run this file)."""
    edges = package_edges(GRAPH)
    assert ("train", "eval") not in edges and ("eval", "train") not in edges
    assert ("hdflash_jax", "train") not in edges and ("hdflash_jax", "eval") not in edges
    assert {("train", "hdflash_jax"), ("eval", "hdflash_jax"), ("convert", "hdflash_jax")} <= edges


def package_edges(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    edges = defaultdict(int)
    for m, deps in graph.items():
        if m == PIPELINE:
            continue
        for d in deps:
            a, b = m.split(".")[0], d.split(".")[0]
            if a != b:
                edges[(a, b)] += 1
    return set(edges)


if __name__ == "__main__":
    counts = defaultdict(int)
    for m, deps in GRAPH.items():
        for d in deps:
            a, b = m.split(".")[0], d.split(".")[0]
            if a != b:
                counts[(a + (" (pipeline)" if m == PIPELINE else ""), b)] += 1
    for (a, b), n in sorted(counts.items()):
        print(f"{a} -> {b}: {n} module imports")
    print(f"modules: {len(GRAPH)}, cycles: {cycles(GRAPH)}, library subpackage cycles: "
          f"{cycles(library_units(GRAPH))}, layering violations: {layering_violations(GRAPH)}, "
          f"family tests outside the registry: {family_tests()}")

