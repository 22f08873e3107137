"""Partial fine-tuning in the trainer trains exactly the plan's `trainableLayers` top decoder
layers, as the planner counted them (on a stand-in model: no torch needed)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kubetune.trainer.config import TrainerConfigError
from kubetune.trainer.model import apply_method
from tests.plans import plan_document

pytestmark = pytest.mark.unit


class Param:
    def __init__(self) -> None:
        self.requires_grad = True

    def requires_grad_(self, value: bool) -> None:
        self.requires_grad = value


class Module:
    def __init__(self, *params: Param) -> None:
        self.params = list(params)

    def parameters(self) -> Iterator[Param]:
        yield from self.params


class Decoder:
    def __init__(self, layers: list[Module], norm: Module | None) -> None:
        self.layers = layers
        if norm is not None:
            self.norm = norm


class CausalLM(Module):
    """`model.layers` as Llama-style models name them, the final `model.norm` (unless
    `norm` is false), an embedding and a head."""

    def __init__(self, num_layers: int, norm: bool = True) -> None:
        self.embed, self.head, self.norm = Param(), Param(), Param()
        self.model = Decoder(
            [Module(Param(), Param()) for _ in range(num_layers)],
            Module(self.norm) if norm else None,
        )
        super().__init__(
            self.embed,
            *(p for layer in self.model.layers for p in layer.parameters()),
            self.norm,
            self.head,
        )


def trained_layers(model: CausalLM) -> list[bool]:
    return [all(p.requires_grad for p in layer.parameters()) for layer in model.model.layers]


@pytest.mark.parametrize("layers", [1, 3, 6])
@pytest.mark.parametrize("norm", [True, False])
def test_partial_trains_exactly_the_planned_top_layers_and_the_final_norm(
    layers: int, norm: bool
) -> None:
    """As the planner counts Partial (``partial_parameters``): the top layers and the norm
    after them, which a model without one (OPT-350m) does not have."""
    model = CausalLM(6, norm)
    plan = plan_document(method="Partial", hyperparameters={"trainableLayers": layers})
    assert apply_method(model, plan) is model
    assert trained_layers(model) == [False] * (6 - layers) + [True] * layers
    assert model.norm.requires_grad is norm
    assert not model.embed.requires_grad
    assert not model.head.requires_grad


@pytest.mark.parametrize("layers", [0, 7])
def test_partial_refuses_a_layer_count_the_model_does_not_have(layers: int) -> None:
    plan = plan_document(method="Partial", hyperparameters={"trainableLayers": layers})
    with pytest.raises(TrainerConfigError, match="trainableLayers is"):
        apply_method(CausalLM(6), plan)
