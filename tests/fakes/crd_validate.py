"""Strict validation of Kubeflow Trainer / Training Operator objects against the CRD schemas of named releases.

The schemas are the `openAPIV3Schema` of each CRD as released (tests/fakes/crd_schemas/, extracted from
github.com/kubeflow/trainer at the tag named in each file). The API server's strict field validation
(`kubectl apply --validate=strict`, the default since kubectl 1.25) is emulated: an object schema that neither
declares `additionalProperties` nor sets `x-kubernetes-preserve-unknown-fields` prunes unknown fields, and strict
validation turns a pruned field into an error, so such schemas get `additionalProperties: false`. The root
`metadata` (an ObjectMeta the CRD leaves untyped) is validated as a ConfigMap's with kubernetes-validate.

Katib's Experiment CRD (kubeflow.org/v1beta1) declares no structure (x-kubernetes-preserve-unknown-fields; Katib's
admission webhook checks the spec), so an Experiment is validated against the v1beta1 OpenAPI definitions of the
same Katib release (tests/fakes/crd_schemas/katib-*.json, see extract.py), strict in the same way; its trialSpec (an
Unstructured object) is left to the caller (a TrainJob: validate it as one).

Not evaluated: the CRDs' CEL rules (`x-kubernetes-validations`). Most are transition rules (`self == oldSelf`);
the create-time rules that touch what ddil writes (TrainJob name pattern and length, one ML policy per runtime)
are checked by hand in `errors()`, with the object name rule of every kind.
"""
from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path

import jsonschema

SCHEMAS = Path(__file__).resolve().parent / "crd_schemas"
# The releases ddil claims to support (docs/kubeflow.md), per kind.
TRAINER_VERSIONS = ("v2.1.0", "v2.2.1", "v2.3.0")
TRAINING_OPERATOR_VERSIONS = ("v1.9.4",)
KATIB_VERSIONS = ("v0.19.0",)
FILES = {
    "TrainJob": {v: f"trainer-{v}-trainjob.json" for v in TRAINER_VERSIONS},
    "TrainingRuntime": {v: f"trainer-{v}-trainingruntime.json" for v in TRAINER_VERSIONS},
    "PyTorchJob": {v: f"training-operator-{v}-pytorchjob.json" for v in TRAINING_OPERATOR_VERSIONS},
    "Experiment": {v: f"katib-{v}-experiment.json" for v in KATIB_VERSIONS},
}
# Kubernetes types the Katib OpenAPI document refers to without defining: ObjectMeta is checked by
# validate_metadata, the trial spec by its own kind's schema; the rest ddil does not write.
KATIB_EXTERNAL = ("v1.ObjectMeta", "v1.unstructured.Unstructured", "v1.Container", "v1.HTTPGetAction", "v1.Time",
                  "v1.ListMeta")
ML_POLICIES = ("torch", "mpi", "jax", "xgboost", "flux")


def versions(kind: str) -> tuple[str, ...]:
    return tuple(FILES[kind])


def strict(schema: dict) -> dict:
    """A copy of a structural schema in which every object without additionalProperties or
    x-kubernetes-preserve-unknown-fields rejects unknown fields."""
    node = copy.deepcopy(schema)

    def walk(s):
        if isinstance(s, dict):
            is_object = s.get("type") == "object" or "properties" in s
            if (is_object and "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields")
                    and not s.get("x-kubernetes-embedded-resource")):
                s["additionalProperties"] = False
            for key, value in s.items():
                if key in ("properties", "patternProperties"):
                    for sub in value.values():
                        walk(sub)
                elif key in ("items", "additionalProperties", "not"):
                    walk(value)
                elif key in ("allOf", "anyOf", "oneOf"):
                    for sub in value:
                        walk(sub)
        return s

    walk(node)
    return node


@functools.lru_cache(maxsize=None)
def crd(kind: str, version: str) -> dict:
    data = json.loads((SCHEMAS / FILES[kind][version]).read_text())
    if kind == "Experiment":
        root = data["openAPIV3Schema"]
        definitions = {name: strict(sub) for name, sub in root["definitions"].items()}
        definitions.update({name: {"type": "object"} for name in KATIB_EXTERNAL})
        data["strict"] = {"$ref": root["$ref"], "definitions": definitions}
        return data
    schema = strict(data["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: checked separately (validate_metadata)
    data["strict"] = schema
    return data


def validate_metadata(metadata: dict) -> None:
    """ObjectMeta rules (name, labels, annotations) through kubernetes-validate's built-in ConfigMap schema."""
    import kubernetes_validate

    obj = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata}
    kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)


class SchemaError(ValueError):
    pass


def errors(obj: dict, version: str) -> list[str]:
    """Every violation of `obj` (a TrainJob, TrainingRuntime, PyTorchJob or Katib Experiment) against the CRD of `version`, as
    'path: message' lines; [] when the API server would accept it."""
    kind = obj.get("kind")
    if kind not in FILES:
        return [f"kind {kind!r} is not a Trainer CRD ({', '.join(FILES)})"]
    data = crd(kind, version)
    found = []
    expected = f"{data['group']}/{data['version']}"
    if obj.get("apiVersion") != expected:
        found.append(f"apiVersion: {obj.get('apiVersion')!r} is not {expected!r}")
    validator = jsonschema.Draft7Validator(data["strict"])
    for err in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
        found.append(".".join(str(p) for p in err.absolute_path) + ": " + err.message)
    try:
        validate_metadata(obj.get("metadata") or {})
    except Exception as exc:  # noqa: BLE001 - kubernetes_validate raises its own ValidationError types
        found.append(f"metadata: {getattr(exc, 'message', exc)}")
    name = (obj.get("metadata") or {}).get("name", "")
    subdomain = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
    if not (re.fullmatch(subdomain, name) and len(name) <= 253):
        found.append(f"metadata.name: {name!r} is not a valid object name (DNS-1123 subdomain)")
    if kind == "TrainJob" and not (re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63):
        found.append(f"metadata.name: {name!r} is not a valid TrainJob name (DNS-1035 label, at most 63 characters)")
    if kind == "TrainingRuntime":
        policy = (obj.get("spec") or {}).get("mlPolicy") or {}
        if sum(key in policy for key in ML_POLICIES) > 1:
            found.append("spec.mlPolicy: only one of " + ", ".join(ML_POLICIES) + " may be set")
    if kind == "Experiment":
        found += _experiment_rules((obj.get("spec") or {}))
    return found


def _experiment_rules(spec: dict) -> list[str]:
    """The create-time rules of Katib's webhook (pkg/webhook/v1beta1/experiment/validator) that ddil's Experiment
    could break: an objective metric, typed parameters with a feasible space, trial parameters that reference
    declared parameters, a trial spec with apiVersion and kind."""
    found = []
    if not (spec.get("objective") or {}).get("objectiveMetricName"):
        found.append("spec.objective.objectiveMetricName: required")
    declared = set()
    for param in spec.get("parameters") or []:
        declared.add(param.get("name"))
        space = param.get("feasibleSpace") or {}
        if param.get("parameterType") in ("double", "int") and not ("min" in space and "max" in space):
            found.append(f"spec.parameters[{param.get('name')}].feasibleSpace: min and max are required")
        if param.get("parameterType") in ("categorical", "discrete") and not space.get("list"):
            found.append(f"spec.parameters[{param.get('name')}].feasibleSpace.list: required")
    template = spec.get("trialTemplate") or {}
    for trial_param in template.get("trialParameters") or []:
        if trial_param.get("reference") not in declared:
            found.append(f"spec.trialTemplate.trialParameters[{trial_param.get('name')}]: references no parameter")
    trial_spec = template.get("trialSpec") or {}
    if not (trial_spec.get("apiVersion") and trial_spec.get("kind")):
        found.append("spec.trialTemplate.trialSpec: apiVersion and kind are required")
    return found


def validate(obj: dict, version: str) -> None:
    problems = errors(obj, version)
    if problems:
        name = (obj.get("metadata") or {}).get("name")
        raise SchemaError(f"{obj.get('kind')}/{name} is not valid on {version}:\n  " + "\n  ".join(problems))
