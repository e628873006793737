"""Stage evaluate on tiny models (CPU): metrics.json layout, report and grids, NFE counting, adherence, baselines.

The student here is written exactly as distill writes one (save_student_pipeline with a DDIM 'trailing' scheduler
and ddil_student.json: 2 steps, guidance 1) but with the tiny teacher's weights, so no training is needed; the
evaluation classifier is trained in-test for a few steps on the digits (its accuracy does not matter here).
"""
from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from urllib.parse import unquote

import pytest
import torch
from PIL import Image

from ddil_core.cli import main

PROMPTS = ["a handwritten digit zero", "a handwritten digit one", "a handwritten digit two",
           "a handwritten digit three"]  # the tiny recipe: num_prompts 4 of the ten digit captions


class _MeanColour(torch.nn.Module):
    resize = "none (mean colour)"

    def forward(self, images):
        return images.mean(dim=(2, 3))


def mean_colour_extractor():
    """A `module:callable` extractor for the tests: 3-d features, no classifier."""
    return _MeanColour()


def _digits_16(split: str):
    from torch.nn import functional as F

    from ddil_core.data.digits import digits_split

    images, labels, _ = digits_split(split)
    x = F.interpolate(torch.from_numpy(images)[:, None], size=(16, 16), mode="bilinear", align_corners=False)
    return x.clamp(0, 1).expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(labels).long()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo layout: DEMO/teacher, DEMO/classifier side by side; a student and a baseline (its copy)."""
    from diffusers import DDIMScheduler

    from ddil_core.models.classifier import train_digit_classifier
    from ddil_core.models.pipeline_io import save_student_pipeline
    from ddil_core.models.tiny import build_tiny_pipeline

    root = tmp_path_factory.mktemp("demo")
    pipe = build_tiny_pipeline("sd15")
    pipe.save_pretrained(str(root / "teacher"), safe_serialization=True)
    x, y = _digits_16("train")
    train_digit_classifier(x, y, steps=6, batch_size=32).save(root / "classifier")
    scheduler = DDIMScheduler.from_config(dict(pipe.scheduler.config), timestep_spacing="trailing",
                                          set_alpha_to_one=True, clip_sample=False)
    info = {"objective": "pd", "num_inference_steps": 2, "guidance_scale": 1.0, "scheduler": "DDIMScheduler",
            "timestep_spacing": "trailing"}
    save_student_pipeline(pipe, pipe.unet, scheduler, root / "student", info)
    shutil.copytree(root / "student", root / "baseline")
    return root


@pytest.fixture(scope="module")
def evaluated(demo):
    """One CLI evaluation with a baseline and an extra student step count; several tests read it."""
    out = demo / "eval"
    code = main(["evaluate", "--config", "tiny", "--student", str(demo / "student"), "--teacher",
                 str(demo / "teacher"), "--baseline", str(demo / "baseline"), "--out", str(out),
                 "--set", "evaluation.student_steps=[1]", "--set", "evaluation.num_reference=120",
                 "--set", "evaluation.teacher_steps=4",
                 # one gate that passes and one that fails, for the report's verdict
                 "--set", "registry.gates.fid_factor=1000", "--set", "registry.gates.min_coverage=1.0"])
    assert code == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_metrics_json_has_every_model_and_the_protocol(evaluated, demo):
    out, m = evaluated
    assert set(m) == {"protocol", "models", "speedup", "covariate_shift"}  # the student's, diagnose.in_evaluate
    assert list(m["models"]) == ["student", "student@1", "teacher", "baseline", "baseline@1"]
    p = m["protocol"]
    # The default extractor found DEMO/classifier beside DEMO/teacher.
    assert p["extractor"] == f"classifier:{(demo / 'classifier').resolve()}" and p["extractor_requested"] == "classifier"
    assert p["feature_dim"] == 128 and p["k"] == 5 and p["resize"].startswith("bilinear")
    assert p["prompts"] == PROMPTS and p["seeds"] == [0, 1]
    assert p["reference"] == "demo://digits/eval" and p["num_reference"] == 120
    assert p["steps"] == {"student": 2, "student@1": 1, "teacher": 4, "baseline": 2, "baseline@1": 1}
    assert p["guidance"] == {"student": 1.0, "student@1": 1.0, "teacher": 2.0, "baseline": 1.0, "baseline@1": 1.0}
    assert p["scheduler"]["student"]["timestep_spacing"] == "trailing"
    assert p["scheduler"]["teacher"]["config_class"] == "DDIMScheduler"
    for name, model in m["models"].items():
        for key in ("fid", "precision", "recall", "density", "coverage", "adherence", "diversity"):
            assert isinstance(model[key], float), (name, key)
        assert 0 <= model["adherence"] <= 1 and 0 <= model["coverage"] <= 1
        assert model["fid"] >= 0 and model["diversity"] > 0 and model["seconds_per_image"] > 0
        assert model["num_images"] == 8
        assert model["fid_torchmetrics"] == pytest.approx(model["fid"], rel=1e-6, abs=1e-6)
    # Same weights, same prompts and seeds: the baseline copy scores exactly as the student.
    for key in ("fid", "coverage", "adherence", "diversity"):
        assert m["models"]["baseline"][key] == m["models"]["student"][key]
    flat = json.loads((out / "metrics_flat.json").read_text())
    assert flat["fid"] == m["models"]["student"]["fid"] and flat["teacher_fid"] == m["models"]["teacher"]["fid"]
    assert all(isinstance(v, (int, float)) for v in flat.values())
    assert (out / "resolved_config.yaml").exists()
    assert not list(out.parent.glob(".eval.tmp-*"))  # built under a temporary name, then renamed


def test_nfe_counts_guidance_and_speedup(evaluated):
    _, m = evaluated
    models = m["models"]
    assert models["student"]["nfe_per_image"] == 2  # 2 steps, guidance 1: no CFG
    assert models["student@1"]["nfe_per_image"] == 1
    assert models["teacher"]["nfe_per_image"] == 8  # 4 steps x 2 with CFG (guidance 2)
    assert m["speedup"]["nfe"] == 4.0 and models["student"]["speedup_nfe"] == 4.0
    assert m["speedup"]["per_model"]["student@1"]["nfe"] == 8.0
    assert m["speedup"]["seconds"] == pytest.approx(
        models["teacher"]["seconds_per_image"] / models["student"]["seconds_per_image"])


def test_adherence_is_the_classifier_accuracy_on_the_prompted_digit(evaluated, demo):
    from ddil_core.metrics.extractors import load_extractor
    from ddil_core.models.pipeline_io import load_pipeline
    from ddil_core.models.sampling import generate

    _, m = evaluated
    pipe = load_pipeline(str(demo / "student"))
    with torch.no_grad():
        images = generate(pipe, [p for p in PROMPTS for _ in (0, 1)], [0, 1] * 4, 2, 1.0)
    predicted = load_extractor(f"classifier:{demo / 'classifier'}").classify(images)
    wanted = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    assert m["models"]["student"]["adherence"] == pytest.approx(float((predicted == wanted).double().mean()))


def test_report_shows_existing_grids_and_the_steps_plot(evaluated):
    out, m = evaluated
    for name in ("report.md", "report.html", "quality_vs_steps.png", "covariate_shift.png", "handover.png"):
        assert (out / name).exists(), name
    html = (out / "report.html").read_text()
    srcs = [unquote(s) for s in re.findall(r'<img src="([^"]+)"', html)]
    # the steps plot, the two covariate-shift plots; per model its grid and 4 row strips
    assert len(srcs) == 3 + len(m["models"]) * (1 + len(PROMPTS))
    for src in srcs:
        assert (out / src).is_file(), src
    md = (out / "report.md").read_text()
    for src in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (out / unquote(src)).is_file(), src
    # rows = 4 prompts, columns = 2 seeds; 16x16 samples zoomed 4x, 4 px padding; the prompts in a margin on the left
    width, height = Image.open(out / "samples_student.png").size
    assert height == 4 * 64 + 5 * 4 and width > 2 * 64 + 3 * 4 + 100
    assert Image.open(out / "rows" / "samples_student-00.png").size == (2 * 32 + 3 * 2, 32 + 2 * 2)  # zoomed 2x
    assert "Prompt adherence" in html and "teacher" in html


class _Html(HTMLParser):
    """The parts of report.html a reader looks at: the verdict paragraph, and every table as rows of cells (the text
    of th/td, and the src of the images in it)."""

    def __init__(self):
        super().__init__()
        self.verdict, self.fid_note, self.tables, self._cell, self._in = None, None, {}, None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "p" and "verdict" in (attrs.get("class") or ""):
            self._in, self.verdict_class, self.verdict = "verdict", attrs["class"], ""
        elif tag == "p" and attrs.get("class") == "fid-note":
            self._in, self.fid_note = "fid", ""
        elif tag == "table":
            self._table = self.tables.setdefault(attrs.get("class", ""), [])
        elif tag == "tr":
            self._table.append([])
        elif tag in ("th", "td"):
            self._cell = {"text": "", "img": []}
            self._table[-1].append(self._cell)
        elif tag == "img" and self._cell is not None:
            self._cell["img"].append(unquote(attrs["src"]))

    def handle_endtag(self, tag):
        if tag in ("th", "td"):
            self._cell = None
        if tag == "p":
            self._in = None

    def handle_data(self, data):
        if self._in == "verdict":
            self.verdict += data
        elif self._in == "fid":
            self.fid_note += data
        if self._cell is not None:
            self._cell["text"] += data


def test_report_html_has_the_verdict_labelled_rows_and_side_by_side_samples(evaluated):
    out, m = evaluated
    page = _Html()
    page.feed((out / "report.html").read_text())
    # The verdict: fail (noise from a random teacher covers no digits), and each gate with its threshold and result.
    assert page.verdict.startswith("FAIL: 1 of 2 gates failed (min_coverage)") and "fail" in page.verdict_class
    gates = {row[0]["text"]: [c["text"] for c in row[1:]] for row in page.tables["gates"][1:]}
    assert gates["fid_factor"][-1] == "pass" and gates["min_coverage"][-1] == "FAIL"
    assert float(gates["fid_factor"][2]) == pytest.approx(1000 * m["models"]["teacher"]["fid"], rel=1e-3)
    assert gates["min_coverage"][2] == "1.00"
    # Readable names: no raw key as a row label, the models named with their steps.
    metrics = page.tables["metrics"]
    labels = [row[0]["text"] for row in metrics[1:]]
    for raw in ("fid_torchmetrics", "speedup_nfe", "speedup_seconds", "nfe_per_image", "seconds_per_image"):
        assert raw not in labels, raw
    assert "Speed-up in UNet calls (teacher ÷ this model)" in labels
    assert [c["text"] for c in metrics[0][1:]] == ["student, 2 steps", "student, 1 step", "teacher, 4 steps",
                                                   "baseline, 2 steps", "baseline, 1 step"]
    # Which FID: the protocol stated once, with its image count and seeds.
    assert "8 generated images per model (4 prompts × 2 seeds, 0 to 1" in page.fid_note
    assert "prepare-demo" in page.fid_note
    # Side by side: teacher first, one row per prompt labelled with it, one strip per model from that model's grid.
    samples = page.tables["samples"]
    columns = [c["text"] for c in samples[0]]
    assert columns == ["prompt", "teacher, 4 steps", "student, 2 steps", "student, 1 step", "baseline, 2 steps",
                       "baseline, 1 step"]
    assert [row[0]["text"] for row in samples[1:]] == PROMPTS
    for i, row in enumerate(samples[1:]):
        srcs = [cell["img"][0] for cell in row[1:]]
        assert srcs == [f"rows/samples_{k}-{i:02d}.png" for k in ("teacher", "student", "student_1steps", "baseline",
                                                                  "baseline_1steps")]
        assert all((out / src).is_file() for src in srcs)
    # The strips are the rows of the grids: the teacher's strip of prompt 2 is row 2 of its grid, zoomed 2x not 4x.
    strip = Image.open(out / "rows" / "samples_teacher-02.png").convert("RGB")
    grid = Image.open(out / "samples_teacher.png").convert("RGB")
    margin = grid.size[0] - (2 * 64 + 3 * 4)
    cell = grid.crop((margin + 4, 4 + 2 * 68, margin + 4 + 64, 4 + 2 * 68 + 64)).resize((32, 32), Image.NEAREST)
    assert cell.tobytes() == strip.crop((2, 2, 34, 34)).tobytes()


def test_register_accepts_the_evaluation(evaluated, demo, tmp_path, capsys):
    out, _ = evaluated
    code = main(["register", "--config", "tiny", "--student", str(demo / "student"), "--metrics",
                 str(out / "metrics.json"), "--registry", str(tmp_path / "reg"),
                 "--set", "registry.gates.fid_factor=100", "--set", "registry.gates.min_adherence=0"])
    assert code == 0, capsys.readouterr().err
    assert "registered ddil-student version 1" in capsys.readouterr().out


def test_pixels_fallback_prompt_file_seeds_and_reference(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit five\n\n  a red cat  \na handwritten digit nine\n")
    out = tmp_path / "eval"
    code = main(["evaluate", "--config", "tiny", "--student", "tiny://sd15", "--out", str(out), "--prompts",
                 str(prompts), "--reference", "demo://digits", "--set", "evaluation.seed=7",
                 "--set", "evaluation.num_reference=40", "--set", "evaluation.fid_cross_check=false",
                 "--set", "evaluation.teacher_steps=3"])
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    p = m["protocol"]
    assert p["extractor"] == "pixels" and "fell back to pixels" in p["extractor_note"]
    assert p["feature_dim"] == 3 * 16 * 16
    assert p["prompts"] == ["a handwritten digit five", "a red cat", "a handwritten digit nine"]
    assert p["seeds"] == [7, 8] and p["reference"] == "demo://digits" and p["num_reference"] == 40
    assert list(m["models"]) == ["student", "teacher"]
    student, teacher = m["models"]["student"], m["models"]["teacher"]
    assert student["adherence"] is None and "does not classify" in p["adherence"]
    assert "fid_torchmetrics" not in student
    # No ddil_student.json: objective.student_steps (2) at the teacher's guidance (2): CFG doubles the NFE.
    assert (student["steps"], student["guidance_scale"], student["nfe_per_image"]) == (2, 2.0, 4)
    assert teacher["nfe_per_image"] == 6  # 3 steps x 2 (CFG)
    assert (out / "quality_vs_steps.png").exists()  # one student step count: the plot has one point per model
    assert Image.open(out / "samples_teacher.png").size[1] == 3 * 64 + 4 * 4
    html = (out / "report.html").read_text()
    for src in re.findall(r'<img src="([^"]+)"', html):
        assert (out / unquote(src)).is_file()


@pytest.mark.filterwarnings("ignore:The configuration file of this scheduler:FutureWarning")  # steps_offset 0 (lcm.py)
def test_lcm_student_with_guidance_embedding_counts_one_pass_per_step(tmp_path):
    """An LCM-style student (LCMScheduler, a UNet with time_cond_proj_dim): consistency sampling at the timesteps
    distill recorded, guidance as an embedding, so NFE = steps even at guidance 3."""
    from diffusers import LCMScheduler

    from ddil_core.method.grid import lcm_scheduler_timesteps
    from ddil_core.method.objectives.lcm import add_guidance_conditioning
    from ddil_core.models.pipeline_io import save_student_pipeline
    from ddil_core.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd15")
    cfg = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    cfg.update(original_inference_steps=50, timestep_spacing="leading", steps_offset=0, set_alpha_to_one=True)
    timesteps = lcm_scheduler_timesteps(1000, 2, 50)
    info = {"objective": "lcm", "num_inference_steps": 2, "guidance_scale": 3.0, "scheduler": "LCMScheduler",
            "timesteps": timesteps}
    save_student_pipeline(pipe, add_guidance_conditioning(pipe.unet, 32), LCMScheduler.from_config(cfg),
                          tmp_path / "lcm", info)
    out = tmp_path / "eval"
    code = main(["evaluate", "--config", "tiny", "--student", str(tmp_path / "lcm"), "--out", str(out),
                 "--set", "evaluation.extractor=pixels", "--set", "evaluation.num_prompts=3",
                 "--set", "evaluation.teacher_steps=2", "--set", "evaluation.fid_cross_check=false"])
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    student, p = m["models"]["student"], m["protocol"]
    assert (student["steps"], student["guidance_scale"], student["nfe_per_image"]) == (2, 3.0, 2)
    assert m["models"]["teacher"]["nfe_per_image"] == 4  # 2 steps, CFG at the tiny recipe's guidance 2
    assert p["timesteps"]["student"] == timesteps
    assert p["scheduler"]["student"]["sampler"].startswith("multistep consistency")
    assert p["scheduler"]["teacher"]["sampler"].startswith("DDIM")
    assert p["guidance_mode"]["student"].startswith("embedded")
    assert isinstance(student["fid"], float)


def test_bad_input_exits_2_and_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["evaluate", "--config", "tiny", "--student", "tiny://sd15", "--out", str(out), "--prompts",
                 str(tmp_path / "nope.txt")])
    assert code == 2 and "nope.txt" in capsys.readouterr().err
    code = main(["evaluate", "--config", "tiny", "--student", str(tmp_path / "missing-student"), "--out", str(out)])
    assert code == 2 and "missing-student" in capsys.readouterr().err
    code = main(["evaluate", "--config", "tiny", "--student", "tiny://sd15", "--out", str(out),
                 "--set", "evaluation.extractor=resnet"])
    assert code == 2 and "evaluation.extractor = 'resnet'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_extractors(demo):
    from ddil_core.metrics.extractors import ExtractorError, load_extractor

    images = torch.rand(5, 3, 16, 16)
    pixels = load_extractor("pixels")
    f = pixels.features(images)
    assert f.shape == (5, 768) and f.dtype == torch.float64 and pixels.classify(images) is None
    assert load_extractor("pixels").features(torch.rand(2, 3, 32, 32)).shape == (2, 768)  # resized to 16x16

    clf = load_extractor(f"classifier:{demo / 'classifier'}")
    assert clf.features(images).shape == (5, 128) and clf.classify(images).shape == (5,)
    assert load_extractor("classifier", teacher=str(demo / "teacher")).name == f"classifier:{(demo / 'classifier').resolve()}"

    mod = load_extractor("tests.stages.test_evaluate:mean_colour_extractor")
    assert torch.allclose(mod.features(images), images.double().mean(dim=(2, 3)))
    assert mod.classify(images) is None and mod.resize == "none (mean colour)"

    with pytest.raises(ExtractorError, match="gpu-metrics"):
        load_extractor("inception")  # torch-fidelity is not in the CPU environment
    with pytest.raises(ExtractorError, match="no 'nothing'"):
        load_extractor("tests.stages.test_evaluate:nothing")
    with pytest.raises(ExtractorError, match="not a classifier folder"):
        load_extractor(f"classifier:{demo / 'teacher'}")


def test_prompt_classes_nfe_and_adherence_helpers():
    from ddil_core.data.digits import prompt_class
    from ddil_core.stages.evaluate.inputs import adherence, default_prompts
    from ddil_core.stages.evaluate.sampling import nfe_per_image

    assert prompt_class("a handwritten digit seven") == 7
    assert prompt_class("The number 3") == 3
    assert prompt_class("a red cat") is None and prompt_class("one or two") is None
    assert nfe_per_image(4, 1.0) == 4 and nfe_per_image(4, 7.5) == 8 and nfe_per_image(50, 1.01) == 100
    assert nfe_per_image(4, 7.5, guidance_embedded=True) == 4  # LCM: the scale is a UNet input, one pass
    assert adherence(torch.tensor([7, 1, 7, 7]), [7, 7, 7, 7]) == 0.75
    assert default_prompts("demo://digits/eval", [])[7] == "a handwritten digit seven"
    assert default_prompts("data/", ["b", "a", "b", " ", "c"]) == ["b", "a", "c"]
