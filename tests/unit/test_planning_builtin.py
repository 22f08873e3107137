"""The built-in models' configs beside the planner are the trainer's recipes' own, so the
operator, the prepare pod and the CLI plan `hf://kubetune/...` without the hub or torch."""

from __future__ import annotations

import pytest

from kubetune.planning.job import builtin_model_config, known_model_config
from kubetune.prepare import read_model_config
from kubetune.trainer.basemodel import BUILTIN_MODELS, BUILTIN_PREFIX
from kubetune.trainer.basemodel import builtin_model_config as recipe_config

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_shipped_config_is_the_recipes(name: str) -> None:
    uri = BUILTIN_PREFIX + name
    assert builtin_model_config(uri) == recipe_config(uri), (
        f"kubetune/planning/builtin/{name}.json is stale: regenerate it from "
        "kubetune.trainer.basemodel.builtin_model_config"
    )
    assert known_model_config(uri) == recipe_config(uri)


def test_prepare_reads_a_builtin_model_without_the_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config, source = read_model_config("hf://kubetune/tiny-llama-en")
    assert config["model_type"] == "llama"
    assert source == "hf://kubetune/tiny-llama-en"


def test_an_unknown_builtin_name_is_refused_naming_the_field() -> None:
    from kubetune.planning import ModelConfigError

    assert builtin_model_config("hf://kubetune/nope") is None
    with pytest.raises(ModelConfigError, match=r"spec\.model\.uri: hf://kubetune/nope"):
        read_model_config("hf://kubetune/nope")
