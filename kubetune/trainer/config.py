"""What one training run needs, resolved from the config directory the operator mounts
(`spec.json`, `plan.json`) and the environment it sets (paths, ports, token)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kubetune.api.plan import HyperparametersPlan, PlanDocument
from kubetune.contract import INPUT_ENV, Env, secret_value, source_role, termination_path


class TrainerConfigError(ValueError):
    """The run cannot be configured; exits with the configuration-error code."""


@dataclass(frozen=True)
class TrainerConfig:
    spec: dict[str, Any]
    plan: PlanDocument
    model: str
    dataset: str
    output: Path
    validation: str | None = None
    #: The files of spec.dataset.sources (their paths, in its order).
    sources: tuple[str, ...] = ()
    general_text: str | None = None
    metrics_port: int = 0
    control_token: str | None = None
    termination_path: Path = Path("/dev/termination-log")
    job_name: str = "local"
    #: Who runs the early-stop policy: "trainer" (local mode) or "operator" (the operator
    #: reads /evaluations and sends /stop; the trainer then stops itself only on Diverged).
    stop_policy: str = "trainer"
    #: An s3:// spec.output.uri: `output` is the local copy, uploaded there as it is written.
    output_uri: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def hyperparameters(self) -> HyperparametersPlan:
        return self.plan.hyperparameters

    @property
    def early_stopping(self) -> dict[str, Any]:
        es: dict[str, Any] = self.spec.get("earlyStopping") or {}
        return es

    @property
    def seed(self) -> int:
        return int((self.spec.get("hyperparameters") or {}).get("seed", 42))


def _json(path: Path | None, env_value: str | None, what: str) -> dict[str, Any]:
    if env_value:
        text = env_value
    elif path is not None and path.exists():
        text = path.read_text()
    else:
        raise TrainerConfigError(
            f"no {what}: set KUBETUNE_{what.upper()}_JSON or mount "
            f"{what}.json in the config directory"
        )
    try:
        data: dict[str, Any] = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TrainerConfigError(f"{what}.json is not valid JSON: {exc}") from exc
    return data


def load_config(config_dir: Path | None, env: dict[str, str] | None = None) -> TrainerConfig:
    """The run's configuration; environment variables win over mounted files."""
    env = dict(os.environ) if env is None else env
    cdir = config_dir or (Path(env[Env.CONFIG_DIR]) if env.get(Env.CONFIG_DIR) else None)
    spec = _json(cdir / "spec.json" if cdir else None, env.get(Env.SPEC_JSON), "spec")
    plan = plan_document(
        _json(cdir / "plan.json" if cdir else None, env.get(Env.PLAN_JSON), "plan")
    )
    if not plan.fits:
        raise TrainerConfigError(f"the plan does not fit: {plan.error}")

    def need(name: str) -> str:
        value = env.get(name)
        if not value:
            raise TrainerConfigError(f"environment variable {name} is not set")
        return value

    output = env.get(Env.OUTPUT_PATH) or (spec.get("output") or {}).get("uri", "")
    output = output.removeprefix("file://")
    if not output:
        raise TrainerConfigError("no output location: set spec.output.uri")
    unstaged = [
        v
        for v in (output, *(env.get(var, "") for var in INPUT_ENV.values()))
        if v.startswith("s3://")
    ]
    if unstaged:
        raise TrainerConfigError(
            f"{unstaged[0]}: s3:// inputs and outputs are downloaded and uploaded by "
            "`python -m kubetune.trainer.launch` (or `kubetune run`); start the trainer "
            "through it"
        )
    return TrainerConfig(
        spec=spec,
        plan=plan,
        model=need(Env.MODEL_PATH),
        dataset=need(Env.DATASET_PATH),
        validation=env.get(Env.VALIDATION_PATH) or None,
        sources=tuple(
            need(INPUT_ENV[source_role(i)])
            for i in range(len((spec.get("dataset") or {}).get("sources") or []))
        ),
        general_text=env.get(Env.GENERAL_TEXT_PATH) or None,
        output=Path(output),
        metrics_port=int(env.get(Env.METRICS_PORT) or 0),
        control_token=secret_value(Env.CONTROL_TOKEN, env),
        termination_path=termination_path(env),
        job_name=env.get(Env.JOB_NAME, "local"),
        stop_policy=env.get(Env.STOP_POLICY) or "trainer",
        output_uri=env.get(Env.OUTPUT_URI) or None,
    )


def plan_document(data: dict[str, Any]) -> PlanDocument:
    """plan.json as the typed plan; a configuration error that names the field if not."""
    try:
        return PlanDocument.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "plan"
        raise TrainerConfigError(f"plan.json: {where}: {first['msg']}") from exc
