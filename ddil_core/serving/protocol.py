"""Requests and responses of the served student: KServe v1 and v2 (open inference), validated field by field.

v1 `POST /v1/models/NAME:predict`:

    {"instances": ["a handwritten digit seven", {"prompt": "...", "seed": 3, "steps": 4, "guidance": 2.0,
                   "width": 768, "height": 512, "negative_prompt": "...", "eta": 0.3}, ...],
     "parameters": {"steps": 4, ...}}                              # optional defaults for every instance
    -> {"predictions": [{"image": {"b64": PNG}, "seed": 3, "steps": 4, "guidance": 2.0, "width": 512,
                         "height": 512}, ...]}

v2 `POST /v2/models/NAME/infer` (https://github.com/kserve/open-inference-protocol, REST):

    {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [2], "data": ["...", "..."]},
                {"name": "seed", "datatype": "INT64", "shape": [2], "data": [0, 1]}],      # optional
     "parameters": {"steps": 4, "guidance": 2.0, "width": 768, "height": 512}}             # optional
    -> {"outputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": [PNG base64, ...]},
                    {"name": "seed", "datatype": "INT64", "shape": [2], "data": [0, 1]}, ...
                    {"name": "width", ...}, {"name": "height", ...}], ...}

In v2 every option may also be an input tensor (one value, or one per prompt). Defaults: seed 0 (as
`ddil sample`), the student's recommended steps, guidance and eta (ddil_student.json), its native size (one of
width and height alone: a square of that side). Any field that
is missing, of the wrong type or out of the limits raises BadRequest naming it: the server answers HTTP 400 and
keeps serving. The (B)ase64 PNG is the binary convention of KServe v1 ({"b64": ...}) and of JSON BYTES tensors.
"""
from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Any, Optional

from ddil_core.models.student_record import MAX_GUIDANCE

OPTIONS = ("seed", "steps", "guidance", "width", "height", "negative_prompt", "eta")
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit seed
MAX_PROMPT_CHARS = 4096
SIZE_MULTIPLE = 8  # diffusers' pipelines require height and width divisible by 8 (check_inputs)
_V2_INTEGER = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}
_V2_NUMBER = _V2_INTEGER | {"FP16", "FP32", "FP64"}


class BadRequest(ValueError):
    """A request field is missing, mistyped or out of the limits; the message starts with the field's name."""


@dataclass(frozen=True)
class Limits:
    max_batch_size: int  # images per request, and per generated batch
    max_steps: int
    native_size: int  # the pipeline's default image side
    max_size: int
    default_steps: int
    default_guidance: float
    max_guidance: float = MAX_GUIDANCE  # a student record may recommend no more (models/student_record.py)
    min_size: int = SIZE_MULTIPLE
    accepts_eta: bool = False  # the student's scheduler takes an eta (DDIM, TCD)
    default_eta: Optional[float] = None  # ddil_student.json's "eta"; None: the pipeline's default
    guidance_embedded: bool = False  # guidance as a UNet embedding (LCM): no unconditional pass to steer

    def __post_init__(self):
        if self.max_batch_size < 1:
            raise ValueError(f"max batch size must be at least 1, got {self.max_batch_size}")
        if self.max_steps < 1:
            raise ValueError(f"max steps must be at least 1, got {self.max_steps}")
        if self.max_size < self.min_size or self.max_size % SIZE_MULTIPLE:
            raise ValueError(f"max size must be a multiple of {SIZE_MULTIPLE} and at least {self.min_size}, "
                             f"got {self.max_size}")


@dataclass(frozen=True)
class Instance:
    """One image to generate."""

    prompt: str
    seed: int
    steps: int
    guidance: float
    width: int  # pixels
    height: int
    negative_prompt: Optional[str] = None  # None: the pipeline's (the empty prompt)
    eta: Optional[float] = None  # None: the pipeline's default

    @property
    def batch_key(self) -> tuple:
        """Instances with the same key can be generated in one batch (one size, one negative embedding)."""
        return (self.steps, self.guidance, self.width, self.height, self.negative_prompt, self.eta)


def _integer(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():  # JSON 4.0 from some clients
            return int(value)
        raise BadRequest(f"{field}: expected an integer, got {type(value).__name__} {value!r}")
    return value


def _number(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{field}: expected a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise BadRequest(f"{field}: expected a finite number, got {value!r}")
    return float(value)


def _prompt(field: str, value: Any) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(f"{field}: not UTF-8 text") from None
    if not isinstance(value, str):
        raise BadRequest(f"{field}: expected a string, got {type(value).__name__} {value!r}")
    if not value.strip():
        raise BadRequest(f"{field}: empty prompt")
    if len(value) > MAX_PROMPT_CHARS:
        raise BadRequest(f"{field}: {len(value)} characters, more than the limit of {MAX_PROMPT_CHARS}")
    return value


def _size(field: str, value: Any, limits: Limits) -> int:
    side = _integer(field, value)
    if side % SIZE_MULTIPLE:
        raise BadRequest(f"{field}: {side} is not a multiple of {SIZE_MULTIPLE}")
    if not limits.min_size <= side <= limits.max_size:
        raise BadRequest(f"{field}: {side} is outside [{limits.min_size}, {limits.max_size}]")
    return side


def make_instance(prompt: Any, options: dict, limits: Limits) -> Instance:
    """An Instance from a prompt and its options (missing or None: the default), each checked; a BadRequest names
    the field ("steps: ..."), which the callers prefix with where it came from."""
    prompt = _prompt("prompt", prompt)
    seed = _integer("seed", options["seed"]) if options.get("seed") is not None else 0
    if not 0 <= seed <= MAX_SEED:
        raise BadRequest(f"seed: {seed} is outside [0, {MAX_SEED}]")
    steps = limits.default_steps if options.get("steps") is None else _integer("steps", options["steps"])
    if not 1 <= steps <= limits.max_steps:
        raise BadRequest(f"steps: {steps} is outside [1, {limits.max_steps}]")
    guidance = (limits.default_guidance if options.get("guidance") is None
                else _number("guidance", options["guidance"]))
    if not 0.0 <= guidance <= limits.max_guidance:
        raise BadRequest(f"guidance: {guidance} is outside [0, {limits.max_guidance}]")
    width = None if options.get("width") is None else _size("width", options["width"], limits)
    height = None if options.get("height") is None else _size("height", options["height"], limits)
    width, height = width or height or limits.native_size, height or width or limits.native_size
    negative = options.get("negative_prompt")
    if negative is not None and negative != "":
        negative = _prompt("negative_prompt", negative)
        if limits.guidance_embedded or guidance <= 1.0:  # diffusers would ignore it silently
            raise BadRequest("negative_prompt: has no effect on this student "
                             + ("(its guidance is an embedding, not classifier-free guidance)"
                                if limits.guidance_embedded else f"at guidance {guidance} (<= 1: no guidance)"))
    eta = limits.default_eta
    if options.get("eta") is not None:
        eta = _number("eta", options["eta"])
        if not limits.accepts_eta:
            raise BadRequest("eta: this student's scheduler takes no eta")
        if not 0.0 <= eta <= 1.0:
            raise BadRequest(f"eta: {eta} is outside [0, 1]")
    return Instance(prompt, seed, steps, guidance, width, height, negative, eta)


def _check_count(field: str, count: int, limits: Limits) -> None:
    if count == 0:
        raise BadRequest(f"{field}: no prompt given")
    if count > limits.max_batch_size:
        raise BadRequest(f"{field}: {count} images requested, more than the batch limit of {limits.max_batch_size}")


def _options(field: str, value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{field}: expected an object, got {type(value).__name__}")
    unknown = sorted(set(value) - set(OPTIONS))
    if unknown:
        raise BadRequest(f"{field}.{unknown[0]}: unknown field (known: {', '.join(OPTIONS)})")
    return dict(value)


# ----------------------------------------------------------------------------------------------------------------
# v1


def parse_v1(body: Any, limits: Limits) -> list[Instance]:
    if not isinstance(body, dict):
        raise BadRequest(f"request: expected a JSON object with 'instances', got {type(body).__name__}")
    unknown = sorted(set(body) - {"instances", "parameters"})
    if unknown:
        raise BadRequest(f"{unknown[0]}: unknown field (known: instances, parameters)")
    if "instances" not in body:
        raise BadRequest("instances: missing (a list of prompts or {\"prompt\": ...} objects)")
    instances = body["instances"]
    if not isinstance(instances, list):
        raise BadRequest(f"instances: expected a list, got {type(instances).__name__}")
    _check_count("instances", len(instances), limits)
    defaults = _options("parameters", body.get("parameters"))
    out = []
    for i, item in enumerate(instances):
        if isinstance(item, str):
            item = {"prompt": item}
        if not isinstance(item, dict):
            raise BadRequest(f"instances[{i}]: expected a prompt string or an object with 'prompt', "
                             f"got {type(item).__name__} {item!r}")
        unknown = sorted(set(item) - {"prompt", *OPTIONS})
        if unknown:
            raise BadRequest(f"instances[{i}].{unknown[0]}: unknown field (known: prompt, {', '.join(OPTIONS)})")
        if "prompt" not in item:
            raise BadRequest(f"instances[{i}].prompt: missing")
        try:
            out.append(make_instance(item["prompt"], {**defaults, **item}, limits))
        except BadRequest as exc:  # name where the bad value came from: the instance or the request parameters
            field, _, message = str(exc).partition(": ")
            where = f"instances[{i}].{field}" if field in item else f"parameters.{field}"
            raise BadRequest(f"{where}: {message}") from None
    return out


def v1_response(instances: list[Instance], pngs: list[bytes]) -> dict:
    return {"predictions": [
        {"image": {"b64": base64.b64encode(png).decode("ascii")}, "seed": inst.seed, "steps": inst.steps,
         "guidance": inst.guidance, "width": inst.width, "height": inst.height}
        for inst, png in zip(instances, pngs)]}


# ----------------------------------------------------------------------------------------------------------------
# v2 (kserve.InferRequest / InferResponse)


def _flat(values: Any) -> list:
    out = []
    for v in values if isinstance(values, (list, tuple)) else [values]:
        out.extend(_flat(v) if isinstance(v, (list, tuple)) else [v])
    return out


def _tensor_values(inp, count: Optional[int]) -> list:
    """The values of a v2 input, flattened, checked against its declared shape (and the prompt count)."""
    field = f"inputs[{inp.name}]"
    if getattr(inp, "_raw_data", None) is not None:
        raise BadRequest(f"{field}: binary tensor data is not supported; send JSON data")
    values = _flat(inp.data if inp.data is not None else [])
    shape = list(inp.shape or [])
    if any(not isinstance(d, int) or d < 0 for d in shape) or math.prod(shape) != len(values):
        raise BadRequest(f"{field}: shape {shape} does not match its {len(values)} values")
    if count is not None and len(values) not in (1, count):
        raise BadRequest(f"{field}: {len(values)} values for {count} prompts (give 1 or {count})")
    return values


def parse_v2(request, limits: Limits) -> list[Instance]:
    inputs = {}
    for inp in request.inputs or []:
        if inp.name in inputs:
            raise BadRequest(f"inputs[{inp.name}]: given twice")
        inputs[inp.name] = inp
    unknown = sorted(set(inputs) - {"prompt", *OPTIONS})
    if unknown:
        raise BadRequest(f"inputs[{unknown[0]}]: unknown input (known: prompt, {', '.join(OPTIONS)})")
    if "prompt" not in inputs:
        raise BadRequest("inputs[prompt]: missing (a BYTES tensor of prompts)")
    if inputs["prompt"].datatype != "BYTES":
        raise BadRequest(f"inputs[prompt]: datatype {inputs['prompt'].datatype}, expected BYTES")
    prompts = _tensor_values(inputs["prompt"], None)
    _check_count("inputs[prompt]", len(prompts), limits)
    defaults = _options("parameters", {k: v for k, v in (request.parameters or {}).items()
                                       if k not in ("binary_data_output",)})
    columns = {}
    for name in OPTIONS:
        if name in inputs:
            allowed = ({"BYTES"} if name == "negative_prompt" else _V2_NUMBER if name in ("guidance", "eta")
                       else _V2_INTEGER)
            if inputs[name].datatype not in allowed:
                raise BadRequest(f"inputs[{name}]: datatype {inputs[name].datatype}, expected one of "
                                 f"{', '.join(sorted(allowed))}")
            columns[name] = _tensor_values(inputs[name], len(prompts))
    out = []
    for i, prompt in enumerate(prompts):
        options = dict(defaults)
        for name, values in columns.items():
            options[name] = values[i if len(values) > 1 else 0]
        try:
            out.append(make_instance(prompt, options, limits))
        except BadRequest as exc:  # name the tensor and its row ("inputs[steps][1]"), or the request parameter
            field, _, message = str(exc).partition(": ")
            where = f"inputs[{field}][{i}]" if field in columns or field == "prompt" else f"parameters.{field}"
            raise BadRequest(f"{where}: {message}") from None
    return out


def v2_response(request, model_name: str, instances: list[Instance], pngs: list[bytes]):
    from kserve import InferOutput, InferResponse

    n = len(instances)
    outputs = [
        InferOutput("image", [n], "BYTES", [base64.b64encode(p).decode("ascii") for p in pngs],
                    parameters={"content_type": "image/png", "encoding": "base64"}),
        InferOutput("seed", [n], "INT64", [inst.seed for inst in instances]),
        InferOutput("steps", [n], "INT64", [inst.steps for inst in instances]),
        InferOutput("guidance", [n], "FP64", [inst.guidance for inst in instances]),
        InferOutput("width", [n], "INT64", [inst.width for inst in instances]),
        InferOutput("height", [n], "INT64", [inst.height for inst in instances]),
    ]
    return InferResponse(response_id=request.id or "", model_name=model_name, infer_outputs=outputs)
