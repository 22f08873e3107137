"""Building blocks shared by the spec and status models: base classes, bounded scalar types
that behave like the API server's structural-schema checks, and CEL-rule errors."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator, WithJsonSchema
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

# ---- base models ----------------------------------------------------------------------------


class SpecModel(BaseModel):
    """A spec object: camelCase on the wire, unknown fields rejected (like the API server's
    strict field validation), no type coercion beyond what the API server does."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        strict=True,
        validate_default=False,
    )


class StatusModel(BaseModel):
    """A status object: camelCase, written by the operator; unknown fields are ignored so an
    older client can read a newer operator's status."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


# ---- scalars --------------------------------------------------------------------------------


def _integral_float_to_int(value: Any) -> Any:
    # The API server accepts a whole-number JSON float (2.0) for an integer field and stores
    # it as 2; a float with a fraction (2.5) is rejected.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


#: Metadata for an integer field, after its constraints (`Annotated[int, Field(ge=1),
#: WholeFloat]`), so it checks like the API server's `type: integer`: no strings, no
#: booleans, and 2.0 is 2.
WholeFloat = BeforeValidator(_integral_float_to_int)

#: An unconstrained integer field.
Int = Annotated[int, WholeFloat]


#: Bounded strings (the schema's maxLength).
Str253 = Annotated[str, Field(max_length=253)]
Str256 = Annotated[str, Field(max_length=256)]
Str316 = Annotated[str, Field(max_length=316)]
Str1024 = Annotated[str, Field(max_length=1024)]
Str4096 = Annotated[str, Field(max_length=4096)]


def cel_error(message: str, field_path: str | None = None) -> PydanticCustomError:
    """The error of a mirrored CEL rule: its message verbatim, and the rule's fieldPath (relative
    to the object the rule is on) so that `SpecError` names the same path as the API server."""
    context = {"field_path": field_path} if field_path else None
    return PydanticCustomError("cel_rule", message, context)


# ---- URIs -----------------------------------------------------------------------------------

_DNS_NAME = r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?"
_HF = r"hf://[A-Za-z0-9][-A-Za-z0-9_.]*(/[A-Za-z0-9][-A-Za-z0-9_.]*)?"
#: A dataset repository on the hub: hf://datasets/org/name (or hf://org/name, as before).
_HF_DATASET = r"hf://datasets/[A-Za-z0-9][-A-Za-z0-9_.]*/[A-Za-z0-9][-A-Za-z0-9_.]*"
_PVC = rf"pvc://{_DNS_NAME}(/.*)?"
_FILE = r"file:///.*"
_CONFIGMAP = rf"configmap://{_DNS_NAME}/[-._a-zA-Z0-9]+"
#: An S3 bucket name (3-63 lowercase letters, digits, dots and hyphens) and an optional key.
_S3 = r"s3://[a-z0-9][-a-z0-9.]{1,61}[a-z0-9](/.*)?"

#: The same regular expressions as the CRD's CEL `matches()` rules (RE2 and Python agree on
#: this subset; Python uses fullmatch where the CEL rule anchors with ^...$).
MODEL_URI_PATTERN = f"{_HF}|{_PVC}|{_FILE}|{_CONFIGMAP}|{_S3}"
DATA_URI_PATTERN = f"{_HF_DATASET}|{MODEL_URI_PATTERN}"
OUTPUT_URI_PATTERN = f"{_PVC}|{_FILE}|{_S3}"

MODEL_URI_SCHEMES = (
    "hf://org/name, pvc://claim/path, file:///absolute/path, configmap://name/key "
    "or s3://bucket/key"
)
DATA_URI_SCHEMES = (
    "file:///absolute/path, pvc://claim/path, configmap://name/key, "
    "hf://datasets/org/name or s3://bucket/key"
)
OUTPUT_URI_SCHEMES = "pvc://claim/path, file:///absolute/path or s3://bucket/prefix"
#: A URL of an S3-compatible endpoint.
ENDPOINT_URL_PATTERN = r"https?://[-a-zA-Z0-9.]+(:[0-9]+)?/?"
#: A DNS-1123 subdomain (a PersistentVolumeClaim's name).
DNS_NAME_PATTERN = _DNS_NAME

URI_MAX_LENGTH = 2048


#: A URI string; its scheme is checked by the model that holds it (`check_uri`).
Uri = Annotated[str, Field(max_length=URI_MAX_LENGTH)]


def check_uri(value: str, label: str, pattern: str, schemes: str) -> str:
    """The CRD's URI rule: `<label> must be <schemes>` unless `value` fully matches."""
    if not re.fullmatch(pattern, value):
        raise cel_error(f"{label} must be {schemes}")
    return value


# ---- int-or-string --------------------------------------------------------------------------
# Unlike an integer field, an int-or-string field rejects a whole-number JSON float (3.0): the
# API server's CEL rules on it fail with "expected XIntOrString value to be either a string or
# integer". (kubectl sends YAML's 3.0 as 3, and so does `load_yaml_documents`.)

_INT_OR_STRING_SCHEMA: dict[str, Any] = {"anyOf": [{"type": "integer"}, {"type": "string"}]}

QUANTITY_MAX_LENGTH = 64
_QUANTITY = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?\d+)?")
QUANTITY_MESSAGE = "must be a quantity such as 8, 500m or 64Gi"


def _type_error(value: Any) -> PydanticCustomError:
    return PydanticCustomError(
        "int_or_string_type", "Input should be an integer or a string", {"input": value}
    )


def _quantity(value: Any) -> int | str:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _type_error(value)
    if isinstance(value, str) and len(value) > QUANTITY_MAX_LENGTH:
        raise PydanticCustomError(
            "string_too_long",
            "String should have at most {max_length} characters",
            {"max_length": QUANTITY_MAX_LENGTH},
        )
    ok = value >= 0 if isinstance(value, int) else bool(_QUANTITY.fullmatch(value))
    if not ok:
        raise cel_error(QUANTITY_MESSAGE)
    return value


#: A Kubernetes resource quantity (x-kubernetes-int-or-string: 8, "500m", "64Gi").
Quantity = Annotated[
    int | str,
    PlainValidator(_quantity),
    WithJsonSchema({**_INT_OR_STRING_SCHEMA, "maxLength": QUANTITY_MAX_LENGTH}),
]

ZERO_STAGE_MESSAGE = "deepspeed.zeroStage must be Auto, 0, 1, 2 or 3"


def _zero_stage(value: Any) -> int | Literal["Auto"]:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _type_error(value)
    if value == "Auto":
        return "Auto"
    if isinstance(value, int) and 0 <= value <= 3:
        return value
    raise cel_error(ZERO_STAGE_MESSAGE)


#: "Auto" or 0-3 (x-kubernetes-int-or-string; the string "2" is not a stage).
ZeroStage = Annotated[
    int | Literal["Auto"], PlainValidator(_zero_stage), WithJsonSchema(_INT_OR_STRING_SCHEMA)
]
