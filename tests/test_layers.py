"""Imports point one way: base < models < predict < (export, train, propose, eval, bench,
report) < cli, with no cycle between modules. Function-level imports count as much as
top-level ones: a lazy import from a lower layer to a higher one is still a wrong-way arrow."""

from __future__ import annotations

import ast
from pathlib import Path

import boxseg

ROOT = Path(boxseg.__file__).parent
LAYERS = [  # (layer, module prefixes); a module takes the layer of its longest matching prefix
    (0, ["boxseg", "boxseg.config", "boxseg.errors", "boxseg.faults", "boxseg.versions", "boxseg.data",
         "boxseg.metrics", "boxseg.proposals", "boxseg.crf", "boxseg.baselines", "boxseg.threads", "boxseg.workers"]),
    (1, ["boxseg.models"]),
    (2, ["boxseg.predict"]),
    (3, ["boxseg.export", "boxseg.train", "boxseg.propose", "boxseg.inference", "boxseg.bench", "boxseg.report"]),
    (4, ["boxseg.cli"]),
]


def layer_of(module: str) -> int:
    best, layer = -1, None
    for n, prefixes in LAYERS:
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, layer = len(p), n
    assert layer is not None, f"{module} is in no layer; add it to LAYERS"
    return layer


def modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """The boxseg modules `path` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        for n in names:
            while n not in known and "." in n:
                n = n.rsplit(".", 1)[0]
            if n in known and n.startswith("boxseg"):
                found.add(n)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p, set(mods)) - {m} for m, p in mods.items()}


def test_no_import_from_a_lower_layer_to_a_higher_one():
    wrong = [f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
             for m, targets in graph().items() for t in sorted(targets) if layer_of(t) > layer_of(m)]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    g = graph()
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
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
                cycles.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_checker_sees_a_wrong_way_import(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from boxseg.cli.train import resolve_device\n")
    known = set(modules())
    assert imports(bad, known) == {"boxseg.cli.train"}
    assert layer_of("boxseg.predict.base") < layer_of("boxseg.cli.train")


def test_every_command_runs_as_python_dash_m():
    import subprocess
    import sys

    for name in ("data", "train", "propose", "eval", "export", "bench", "report"):
        r = subprocess.run([sys.executable, "-m", f"boxseg.cli.{name}", "--help"], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0 and "Usage:" in r.stdout, (name, r.stdout, r.stderr)
