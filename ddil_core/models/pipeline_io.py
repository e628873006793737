"""Load a teacher pipeline from a local diffusers folder, a hub id, s3:// or tiny://; write a student pipeline.

Only safetensors weights are loaded from model folders unless `allow_pickle` is set; no remote code is run.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

from ddil_core.data.shards import (disk_full_is_clear, publish_dir, remove_stale_staging, staging_dir,
                                  write_json_atomic)
from ddil_core.models.tiny import build_tiny_pipeline

log = logging.getLogger(__name__)

STUDENT_INFO = "ddil_student.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' save_lora_weights / load_lora_weights file name
REQUIRED = {"sd15": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
            "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")}


class ModelError(ValueError):
    """A model folder or URI is unusable; the message names the path and the problem."""


def family_of(pipe) -> str:
    return "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd15"


def _family_of_index(index: dict) -> str:
    return "sdxl" if "text_encoder_2" in index or "XL" in index.get("_class_name", "") else "sd15"


def check_model_folder(path: Path, allow_pickle: bool = False) -> str:
    """Validate a local diffusers pipeline folder before loading it; returns its family."""
    index_path = path / "model_index.json"
    if not index_path.exists():
        raise ModelError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
    try:
        index = json.loads(index_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{index_path}: unreadable ({exc})") from None
    if not isinstance(index, dict):
        raise ModelError(f"{index_path}: expected a JSON object of components, got {type(index).__name__}")
    family = _family_of_index(index)
    for component in REQUIRED[family]:
        if component not in index or index[component] in (None, [None, None]):
            raise ModelError(f"{path}: model_index.json has no '{component}' component")
        if not (path / component).is_dir():
            raise ModelError(f"{path}: missing component folder '{component}/'")
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        folder = path / component
        if not folder.is_dir():
            continue
        has_safe = any(folder.glob("*.safetensors"))
        pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".ckpt", ".pt", ".pth", ".pkl")]
        if not has_safe and pickles and not allow_pickle:
            raise ModelError(
                f"{folder}: only pickle weights ({', '.join(pickles)}); refusing to load them. Convert to safetensors "
                "or set model.allow_pickle=true (loaded with weights_only)"
            )
        if not has_safe and not pickles:
            raise ModelError(f"{folder}: no weights file")
    return family


def _download_s3(uri: str) -> Path:
    import fsspec

    cache = Path(os.environ.get("DDIL_CACHE", Path.home() / ".cache" / "ddil")) / "models"
    target = cache / uri.replace("://", "/").rstrip("/")
    if (target / "model_index.json").exists():
        return target
    from ddil_core.data.datasets import storage_error

    tmp = staging_dir(target)
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        fs.get(path.rstrip("/") + "/", str(tmp), recursive=True)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(storage_error(uri, exc) or f"{uri}: could not download ({type(exc).__name__}: {exc})") from None
    publish_dir(tmp, target)
    return target


def fetch_model(uri: str) -> Path:
    """The local folder of a model folder or s3:// URI (downloaded once into $DDIL_CACHE, as load_pipeline does)."""
    return _download_s3(uri) if uri.startswith("s3://") else Path(uri)


def missing_folder_error(uri: str, role: str = "model") -> Optional[str]:
    """The error of a URI naming a local folder that does not exist, else None. `owner/name` is a hub id only when
    `owner` is no folder here: `runs/nope`, with runs/ present, is a mistyped folder, not a model to look up."""
    if "://" in uri or Path(uri).exists():
        return None
    parts = uri.split("/")
    if uri.startswith((".", "/", "~")) or len(parts) != 2 or not all(parts) or Path(parts[0]).is_dir():
        return f"{uri}: no such folder (the {role}: a diffusers pipeline folder, s3:// path, hub id or tiny://sd15|sdxl)"
    return None


def load_pipeline(uri: str, family: str = "auto", allow_pickle: bool = False, dtype=None):
    """A diffusers pipeline from tiny://sd15|sdxl, a local folder, s3://bucket/path or a hub id."""
    import torch
    from diffusers import DiffusionPipeline

    if uri.startswith("tiny://"):
        pipe = build_tiny_pipeline(uri[len("tiny://"):])
    else:
        if uri.startswith("s3://"):
            local = _download_s3(uri)
        else:
            local = Path(uri)
        if local.exists():
            found = check_model_folder(local, allow_pickle)
            if family not in ("auto", found):  # before loading weights that cannot be used
                raise ModelError(f"{uri}: is an {found} pipeline but the recipe says model.family = {family}")
            source = str(local)
        elif missing_folder_error(uri) is None:
            source = uri  # a hub id, fetched by diffusers when the network allows
        else:
            raise ModelError(missing_folder_error(uri))
        kwargs = {"use_safetensors": None if allow_pickle else True}  # None: safetensors first, else .bin
        if _family_of_local(source) == "sd15":
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        try:
            pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
        except ModelError:
            raise
        except Exception as exc:
            if source == uri and not Path(uri).exists():  # read as a hub id: say so first, the library's text after
                raise ModelError(f"{uri}: no such folder, and no hub model of that id could be loaded "
                                 f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]})") from None
            raise ModelError(f"{uri}: could not load the pipeline ({type(exc).__name__}: {exc})") from None
        try:
            student = read_student_info(Path(source)) if Path(source).is_dir() else None
        except ValueError:  # an unreadable ddil_student.json: not a LoRA student folder this code wrote
            student = None
        if isinstance(student, dict) and student.get("lora"):  # a LoRA student: the teacher's pipeline plus its adapters
            load_student_lora(pipe, Path(source))
    found = family_of(pipe)
    if family not in ("auto", found):
        raise ModelError(f"{uri}: is an {found} pipeline but the recipe says model.family = {family}")
    if dtype is not None:
        pipe.to(dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    return pipe


def _family_of_local(source: str) -> str:
    index = Path(source) / "model_index.json"
    if index.exists():
        return _family_of_index(json.loads(index.read_text()))
    return "sd15"


def read_student_info(folder: Path) -> Optional[dict]:
    path = Path(folder) / STUDENT_INFO
    return json.loads(path.read_text()) if path.exists() else None


def load_student_lora(pipe, folder: Path) -> None:
    """A LoRA student folder is the teacher's pipeline plus the student's adapters: load them as a user would."""
    try:
        pipe.load_lora_weights(str(folder))
    except Exception as exc:
        raise ModelError(f"{folder / LORA_WEIGHTS}: could not load the LoRA weights ({type(exc).__name__}: {exc})") from None


def save_student_pipeline(teacher_pipe, student_unet, scheduler, out_dir: Path, info: dict) -> None:
    """Write the student as a plain diffusers pipeline of the teacher's class, atomically. A LoRA student
    (models/trainable.py) is written as the teacher's pipeline with the student's scheduler plus its adapters in
    diffusers' LoRA format, which `pipe.load_lora_weights(folder)` reads."""
    import copy

    from ddil_core.models.trainable import lora_layers, lora_metadata, uses_lora

    components = dict(teacher_pipe.components)
    lora = lora_layers(student_unet) if uses_lora(student_unet) else None
    unet = copy.deepcopy(teacher_pipe.unet if lora is not None else student_unet).to("cpu").eval()
    if unet.dtype != teacher_pipe.vae.dtype:
        unet.to(teacher_pipe.vae.dtype)
    components["unet"] = unet
    components["scheduler"] = scheduler
    pipe = type(teacher_pipe)(**{k: v for k, v in components.items() if k in _init_keys(teacher_pipe)})
    out_dir = Path(out_dir)
    remove_stale_staging(out_dir)  # of a writer killed while saving (callers hold the output's lock)
    with disk_full_is_clear(out_dir):  # a full disk is one clear line naming the folder (exit 2), not a traceback
        tmp = staging_dir(out_dir)
        try:
            pipe.save_pretrained(str(tmp), safe_serialization=True)
            if lora is not None:
                type(pipe).save_lora_weights(str(tmp), unet_lora_layers={k: v.detach().cpu() for k, v in lora.items()},
                                             weight_name=LORA_WEIGHTS, safe_serialization=True,
                                             unet_lora_adapter_metadata=lora_metadata(student_unet))
            write_json_atomic(tmp / STUDENT_INFO, info)
        except BaseException:  # a full disk, an interruption: nothing half-written is left
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        publish_dir(tmp, out_dir)


def save_fused_student(student_dir: Path, out_dir: Path) -> None:
    """A LoRA student's adapters fused into a full UNet, by plain diffusers (load_lora_weights, fuse_lora,
    unload_lora_weights), written as a full student pipeline."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(student_dir))
    pipe.load_lora_weights(str(student_dir))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    info = {**(read_student_info(student_dir) or {}), "lora": None, "fused_from": str(student_dir)}
    out_dir = Path(out_dir)
    remove_stale_staging(out_dir)
    with disk_full_is_clear(out_dir):
        tmp = staging_dir(out_dir)
        try:
            pipe.save_pretrained(str(tmp), safe_serialization=True)
            write_json_atomic(tmp / STUDENT_INFO, info)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        publish_dir(tmp, out_dir)


def _init_keys(pipe) -> set:
    import inspect

    return set(inspect.signature(type(pipe).__init__).parameters) - {"self"}
