"""The inputs a training run reads, by role: the one list the operator (a volume and a path in
the pod) and `kubetune run` (a local path) both turn into the trainer's environment, with the
variable for each role in `kubetune.contract.INPUT_ENV`."""

from __future__ import annotations

from typing import Final

from kubetune.api.spec import FineTuneJobSpec
from kubetune.contract import MAX_DATA_SOURCES, source_role

#: The spec field behind each role, for messages.
INPUT_FIELDS: Final = {
    "model": "spec.model.uri",
    "dataset": "spec.dataset.uri",
    "validation": "spec.dataset.validationUri",
    "general": "spec.dataset.generalTextUri",
    "previous": "spec.model.from",
    "augmentation": "spec.augmentation.modelUri",
    **{source_role(i): f"spec.dataset.sources[{i}].uri" for i in range(MAX_DATA_SOURCES)},
}


def trainer_input_uris(spec: FineTuneJobSpec) -> dict[str, str]:
    """Each input the spec names, by role (the keys of `INPUT_FIELDS`); unset ones left out."""
    uris: dict[str, str | None] = {
        "model": spec.model.uri,
        "dataset": spec.dataset.uri,
        "validation": spec.dataset.validation_uri,
        "general": spec.dataset.general_text_uri,
        "previous": spec.model.from_,
        "augmentation": spec.augmentation.model_uri,
    }
    for i, source in enumerate(spec.dataset.sources or ()):
        uris[source_role(i)] = source.uri
    return {role: uri for role, uri in uris.items() if uri}
