"""The package map holds: no import cycles, job packages never import one another, and no two
modules are twins that differ only by a suffix. Read from the source, so imports inside
functions count as much as those at the top."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

from conftest import ROOT

CLF = ROOT / "clf"
JOB_PACKAGES = {"clf.label", "clf.evaluate", "clf.training", "clf.serve", "clf.monitor"}
SHARED_PACKAGES = {"clf.artifact", "clf.dataset", "clf.images", "clf.inference", "clf.zeroshot"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in CLF.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """The clf modules that ``name`` imports anywhere in its source."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_no_module_imports_itself_back_through_others():
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_job_packages_import_shared_packages_and_the_core_but_never_one_another():
    crossings = [
        f"{module} imports {imported}"
        for module, imported_set in GRAPH.items()
        for imported in imported_set
        if package_of(imported) in JOB_PACKAGES and package_of(module) != package_of(imported)
    ]
    assert crossings == []


def test_shared_packages_and_the_core_never_import_a_job_package():
    upward = [
        f"{module} imports {imported}"
        for module, imported_set in GRAPH.items()
        if package_of(module) not in JOB_PACKAGES
        for imported in imported_set
        if package_of(imported) in JOB_PACKAGES
    ]
    assert upward == []


def root(stem: str) -> str:
    """A module name's first word without its English ending: evaluation and evaluating,
    decode and decode_tasks, predict and predictor, shards and shard_rows share one root."""
    word = stem.split("_")[0]
    return re.sub(r"(ing|ion|or|er|ed|s)$", "", word)


def test_no_two_modules_are_twins_that_differ_only_by_a_suffix():
    stems = defaultdict(set)
    for name in MODULES:
        stem = name.rpartition(".")[2]
        if stem not in ("clf", *(p.rpartition(".")[2] for p in JOB_PACKAGES | SHARED_PACKAGES)):
            stems[root(stem)].add(stem)
    assert {r: s for r, s in stems.items() if len(s) > 1} == {}


def test_the_checks_that_run_before_ray_import_neither_torch_nor_sklearn():
    from conftest import imported_by

    checks = "clf.label.checks, clf.evaluate.checks, clf.training.checks, clf.serve.checks"
    assert imported_by(checks, {"torch", "torchvision", "sklearn", "ray"}) == []


def test_monitoring_needs_no_torch_ray_or_model_runtime():
    from conftest import imported_by

    heavy = {"torch", "torchvision", "sklearn", "ray", "onnxruntime"}
    assert imported_by("clf.monitor.checks", heavy | {"scipy"}) == []
    assert imported_by("clf.monitor.job", heavy) == []
