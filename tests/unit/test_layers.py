"""The layers of docs/design.md hold: no import circle anywhere in kubetune, the operator's
path (its handlers, a plan, the builders) loads none of the trainer's stack, and
`python -m kubetune` is the CLI. (`lint-imports` checks the allowed imports themselves.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "peft", "deepspeed", "accelerate")


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        work: list[tuple[str, list[str]]] = []
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        work.append((root, sorted(graph.find_modules_directly_imported_by(root))))
        while work:
            node, children = work[-1]
            if children:
                child = children.pop()
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, sorted(graph.find_modules_directly_imported_by(child))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_circle_anywhere() -> None:
    # Imports inside function bodies count too: they are how circles used to hide.
    graph = grimp.build_graph("kubetune")
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_circle() -> None:
    graph = grimp.ImportGraph()
    for module in ("pkg", "pkg.a", "pkg.b", "pkg.c"):
        graph.add_module(module)
    graph.add_import(importer="pkg.a", imported="pkg.b")
    graph.add_import(importer="pkg.b", imported="pkg.a")
    graph.add_import(importer="pkg.c", imported="pkg.a")
    assert _cycles(graph) == [["pkg.a", "pkg.b"]]


OPERATOR_PATH = """
import json, sys
from pathlib import Path

import kubetune.operator.main  # the Kopf handlers, as the operator image starts them
from kubetune.api import parse_job
from kubetune.operator import builders
from kubetune.operator.settings import OperatorSettings
from kubetune.planning import bundled_architectures
from kubetune.planning.job import build_plan
from kubetune.prepare import encode_message

job = parse_job({
    "apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob",
    "metadata": {"name": "demo", "namespace": "team-a"},
    "spec": {"model": {"uri": "hf://meta-llama/Llama-2-7b-hf"},
             "dataset": {"uri": "pvc://data/train.jsonl"},
             "resources": {"gpusPerNode": 8, "numNodes": 2}},
})
rows = "".join(
    json.dumps({"prompt": f"question {i}?", "completion": f" answer {i}."}) + "\\n"
    for i in range(200)
)
config = json.loads(bundled_architectures()["llama-2-7b"].read_text())
plan = build_plan(job.spec, rows, "train.jsonl", config, "llama-2-7b", (80.0, "given"))
encode_message({"plan": plan.to_compact_json()})
ref = builders.JobRef(name="demo", namespace="team-a", uid="u-1")
builders.training_job(ref, job.spec, plan, OperatorSettings())
builders.prepare_job(ref, job.spec, OperatorSettings(), 80.0)
print(json.dumps({"method": plan.method, "loaded": sorted(
    m for m in sys.modules if m.split(".")[0] in HEAVY)}))
"""


def test_the_operator_path_loads_no_torch_stack() -> None:
    script = f"HEAVY = {HEAVY!r}\n" + OPERATOR_PATH
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["method"]  # it planned
    assert result["loaded"] == []


def test_python_dash_m_kubetune_is_the_cli() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kubetune", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "Usage:" in done.stdout
    assert "plan" in done.stdout
