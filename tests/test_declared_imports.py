"""Every third-party module imported by the project's code (engine/, server/, conveyor/,
benchmarks/, tests/) comes from a distribution that setup.py declares, in install_requires or
an extra. A test that imports a package no install step installs would otherwise pass only on
machines where it happens to be present (CI on a fresh virtual environment is the other half of
this guarantee)."""
from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("engine", "server", "conveyor", "benchmarks", "tests")
FIRST_PARTY = {"engine", "server", "conveyor", "benchmarks", "tests"}

# Optional imports, each guarded by `except ImportError` where it is used, with the reason it is
# not declared. Only guarded imports may be listed here: an unguarded import must be declared.
OPTIONAL: dict[str, str] = {}
# Files that run in another Python environment, never in ours, with the reason.
OTHER_ENVIRONMENT = {
    "benchmarks/peers/vllm_offline_script.py": "runs inside vLLM's own virtual environment",
}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_distributions() -> set[str]:
    """Distribution names in setup.py's install_requires and every extra (read from the source,
    so the check does not depend on an up-to-date editable install)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    specs: list[str] = []
    for kw in call.keywords:
        if kw.arg == "install_requires":
            specs += ast.literal_eval(kw.value)
        elif kw.arg == "extras_require":
            for items in ast.literal_eval(kw.value).values():
                specs += items
    return {_normalize(re.match(r"[A-Za-z0-9._-]+", s.strip()).group(0)) for s in specs}


def _guarded(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """True when `node` sits in a try whose handlers catch ImportError/ModuleNotFoundError."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.Try):
            for h in node.handlers:
                names = [h.type] if not isinstance(h.type, ast.Tuple) else list(h.type.elts)
                if any(getattr(n, "id", None) in ("ImportError", "ModuleNotFoundError") for n in names):
                    return True
    return False


def third_party_imports() -> dict[str, list[tuple[str, bool]]]:
    """top-level module -> [(file:line, guarded)] for every non-stdlib, non-first-party import."""
    found: dict[str, list[tuple[str, bool]]] = {}
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if str(path.relative_to(ROOT)) in OTHER_ENVIRONMENT:
                continue
            tree = ast.parse(path.read_text(), str(path))
            parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    modules = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    top = module.split(".")[0]
                    if top in sys.stdlib_module_names or top in FIRST_PARTY or top == "__future__":
                        continue
                    where = f"{path.relative_to(ROOT)}:{node.lineno}"
                    found.setdefault(top, []).append((where, _guarded(node, parents)))
    return found


def test_every_third_party_import_is_declared():
    declared = declared_distributions()
    providers = importlib.metadata.packages_distributions()
    problems = []
    for module, sites in sorted(third_party_imports().items()):
        dists = {_normalize(d) for d in providers.get(module, [])}
        if dists & declared:
            continue
        if module in OPTIONAL and all(guarded for _, guarded in sites):
            continue
        unguarded = [w for w, g in sites if not g] or [w for w, _ in sites]
        what = f"distribution {sorted(dists)}" if dists else "no installed distribution"
        problems.append(f"{module} ({what}) imported at {', '.join(unguarded[:3])} is not in setup.py")
    assert not problems, "undeclared imports:\n" + "\n".join(problems)


def test_optional_allowlist_is_current():
    """Each allowlisted module is still imported somewhere, and only ever under a guard; each
    file said to run elsewhere still exists."""
    imports = third_party_imports()
    for module in OPTIONAL:
        sites = imports.get(module, [])
        assert sites, f"{module} is allowlisted but no longer imported: drop it from OPTIONAL"
        assert all(g for _, g in sites), f"{module} is allowlisted but imported unguarded at {sites}"
    for path in OTHER_ENVIRONMENT:
        assert (ROOT / path).is_file(), f"{path} is gone: drop it from OTHER_ENVIRONMENT"


def test_the_scan_sees_known_imports():
    imports = third_party_imports()
    assert {"torch", "transformers", "starlette", "pytest"} <= set(imports)
    assert {"torch", "transformers", "pytest"} <= declared_distributions()
