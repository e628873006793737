"""Feature extractors for evaluation: the space in which FID, density/coverage and diversity are measured.

`load_extractor(spec, device)` understands:

| spec                | extractor                                                                              |
|---------------------|----------------------------------------------------------------------------------------|
| `classifier:PATH`   | a DigitClassifier folder (the digits demo's domain classifier): 128-d features, and it  |
|                     | classifies, so prompt adherence can be judged                                           |
| `classifier`        | the `classifier/` folder next to the teacher folder (the demo layout DEMO/teacher,      |
|                     | DEMO/classifier); when there is none, `pixels`, with a logged warning and a note        |
| `pixels`            | images resized to 16x16 and flattened (768-d): an offline fallback with no weights      |
| `inception`         | torchmetrics' FID InceptionV3 (2048-d pool features); needs torch-fidelity, which comes  |
|                     | with the optional `gpu-metrics` extra (it imports torchvision: GPU image only)          |
| `module:callable`   | `callable()` imported from `module` returns an nn.Module mapping [B,3,H,W] in [0,1] to   |
|                     | [B, ...] features; a `classify(images)` method, when the module has one, gives classes   |

Every extractor returns float64 features on the CPU; `classify` is None when the extractor cannot judge adherence.
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.nn import functional as F

from ddil_core.config import ConfigError

log = logging.getLogger(__name__)

PIXELS_SIDE = 16
BATCH = 64


class ExtractorError(ConfigError):
    """evaluation.extractor names something that cannot be loaded; the message says what and how to fix it."""


class Extractor:
    """A named feature map. Subclasses implement `_features`; `_classify` only when they can judge adherence."""

    name: str = "extractor"
    resize: str = "none"
    note: Optional[str] = None  # e.g. why a fallback was used

    def __init__(self, device="cpu"):
        self.device = torch.device(device)

    def _features(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    _classify: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    @property
    def can_classify(self) -> bool:
        return self._classify is not None

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> [B, D] float64 on the CPU (computed in batches)."""
        _check_images(images)
        out = [self._features(images[i:i + BATCH].to(self.device, torch.float32)).flatten(1).double().cpu()
               for i in range(0, images.shape[0], BATCH)]
        return torch.cat(out) if out else torch.empty(0, 0, dtype=torch.float64)

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> Optional[torch.Tensor]:
        """images -> class indices [B] (int64, CPU), or None when this extractor cannot classify."""
        if self._classify is None:
            return None
        _check_images(images)
        out = [self._classify(images[i:i + BATCH].to(self.device, torch.float32)).cpu().long()
               for i in range(0, images.shape[0], BATCH)]
        return torch.cat(out)

    def describe(self) -> dict:
        d = {"name": self.name, "resize": self.resize, "classifies": self.can_classify}
        if self.note:
            d["note"] = self.note
        return d


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected images [B, 3, H, W] in [0, 1], got {shape}")


class PixelExtractor(Extractor):
    """Images resized (bilinear, antialiased) to 16x16 and flattened: no weights, works anywhere."""

    def __init__(self, device="cpu", side: int = PIXELS_SIDE):
        super().__init__(device)
        self.side = side
        self.name = "pixels"
        self.resize = f"bilinear (antialias) to {side}x{side}, flattened ({3 * side * side}-d)"

    def _features(self, images):
        if images.shape[-2:] != (self.side, self.side):
            images = F.interpolate(images, size=(self.side, self.side), mode="bilinear", align_corners=False,
                                   antialias=True)
        return images.flatten(1)


class ClassifierExtractor(Extractor):
    """The digits demo's DigitClassifier: 128-d penultimate features, argmax of its logits as the class."""

    def __init__(self, folder, device="cpu"):
        super().__init__(device)
        from ddil_core.models.classifier import DigitClassifier

        folder = Path(folder)
        try:
            self.model = DigitClassifier.load(folder).to(self.device).eval()
        except FileNotFoundError as exc:
            raise ExtractorError(f"evaluation.extractor: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - a corrupt weights file, a shape mismatch
            raise ExtractorError(f"evaluation.extractor: {folder}: could not load the classifier "
                                 f"({type(exc).__name__}: {exc})") from None
        self.folder = folder
        r = self.model.config["resolution"]
        self.name = f"classifier:{folder}"
        self.resize = f"bilinear (antialias) to {r}x{r}"
        self._classify = lambda x: self.model(x).argmax(dim=1)

    def _features(self, images):
        return self.model.features(images)


class InceptionExtractor(Extractor):
    """torchmetrics' NoTrainInceptionV3 ('inception-v3-compat', the FID network), 2048-d pool features."""

    def __init__(self, device="cpu"):
        super().__init__(device)
        try:
            from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE
        except Exception:  # noqa: BLE001
            _TORCH_FIDELITY_AVAILABLE = False
        if not _TORCH_FIDELITY_AVAILABLE:
            raise ExtractorError(
                "evaluation.extractor = 'inception' needs torch-fidelity, which is not installed: install the "
                "`gpu-metrics` extra (pip install 'ddil[gpu-metrics]', GPU image only: it pulls torchvision), "
                "or use evaluation.extractor=classifier:PATH, pixels or module:callable"
            )
        from torchmetrics.image.fid import NoTrainInceptionV3

        try:
            self.model = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], antialias=True)
        except Exception as exc:  # noqa: BLE001 - weights are downloaded on first use
            raise ExtractorError(f"evaluation.extractor = 'inception': could not load the FID Inception weights "
                                 f"({type(exc).__name__}: {exc})") from None
        self.model.to(self.device)
        self.name = "inception"
        self.resize = "uint8, bilinear (antialias) to 299x299 (torchmetrics NoTrainInceptionV3, inception-v3-compat)"

    def _features(self, images):
        return self.model((images.clamp(0, 1) * 255).round().to(torch.uint8))


class ModuleExtractor(Extractor):
    """A user nn.Module from `module:callable`."""

    def __init__(self, spec: str, device="cpu"):
        super().__init__(device)
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ExtractorError(f"evaluation.extractor = '{spec}': cannot import module '{module_name}' ({exc})") \
                from None
        factory = module
        for part in attr.split("."):
            factory = getattr(factory, part, None)
            if factory is None:
                raise ExtractorError(f"evaluation.extractor = '{spec}': module '{module_name}' has no '{attr}'")
        if not callable(factory):
            raise ExtractorError(f"evaluation.extractor = '{spec}': '{attr}' is not callable")
        model = factory()
        if not isinstance(model, torch.nn.Module):
            raise ExtractorError(f"evaluation.extractor = '{spec}': {attr}() returned {type(model).__name__}, "
                                 "expected a torch.nn.Module")
        self.model = model.to(self.device).eval()
        self.name = spec
        self.resize = str(getattr(model, "resize", "as the module does"))
        classify = getattr(model, "classify", None)
        self._classify = classify if callable(classify) else None

    def _features(self, images):
        return self.model(images)


def find_classifier_near(teacher: Optional[str]) -> Optional[Path]:
    """The demo layout: DEMO/teacher and DEMO/classifier side by side; None when the teacher is not local."""
    if not teacher or "://" in str(teacher):
        return None
    folder = Path(teacher)
    if not folder.is_dir():
        return None
    candidate = folder.resolve().parent / "classifier"
    return candidate if (candidate / "config.json").is_file() else None


def load_extractor(spec: str, device="cpu", teacher: Optional[str] = None) -> Extractor:
    """An Extractor for `spec` (see the module docstring). `teacher`: where to look for the demo classifier
    when spec is the bare 'classifier'."""
    spec = (spec or "").strip()
    if spec == "classifier":
        found = find_classifier_near(teacher)
        if found is not None:
            return ClassifierExtractor(found, device)
        ext = PixelExtractor(device)
        ext.note = (f"evaluation.extractor = 'classifier' but no classifier/ folder next to the teacher "
                    f"({teacher}); fell back to pixels")
        log.warning("%s", ext.note)
        return ext
    if spec.startswith("classifier:"):
        path = spec[len("classifier:"):]
        if not path:
            raise ExtractorError("evaluation.extractor = 'classifier:' needs a folder after the colon")
        return ClassifierExtractor(path, device)
    if spec == "pixels":
        return PixelExtractor(device)
    if spec == "inception":
        return InceptionExtractor(device)
    if ":" in spec and not spec.startswith(":"):
        return ModuleExtractor(spec, device)
    raise ExtractorError(
        f"evaluation.extractor = '{spec}' is not one of: classifier, classifier:PATH, pixels, inception, "
        "module:callable"
    )
