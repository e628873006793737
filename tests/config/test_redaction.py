"""No secret is ever written: credentials given in URLs on the command line (`--set telemetry.pushgateway=
http://user:PASSWORD@host`), in the run id, or anywhere a URL stands, go through the one redaction
(ddil_core/config/redaction.py) before any writer: resolved configs, JSON files, lineage, model cards, logs, error
lines, Prometheus labels."""
from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ddil_core.cli import main
from ddil_core.config.redaction import redact, redact_string, redact_values
from tests import ROOT
from tests.fakes.pushgateway import pushgateway, read_metrics  # noqa: F401

PASSWORD = "PASSW0RD-in-url"


def test_credentials_in_set_urls_never_reach_files_logs_or_labels(tmp_path, monkeypatch, caplog, capsys,
                                                                   pushgateway):  # noqa: F811
    host = pushgateway.split("://", 1)[1]
    monkeypatch.setenv("DDIL_RUN_ID", f"s3://runner:{PASSWORD}@bucket/run-7")
    sets = ["--config", "tiny", "--set", f"telemetry.pushgateway=http://ddil-user:{PASSWORD}@{host}"]
    run = tmp_path / "runs"
    with caplog.at_level(logging.DEBUG):
        assert main(["cache-latents", "--out", str(run / "latents"), *sets]) == 0, capsys.readouterr().err
        assert main(["teacher-rollouts", "--latents", str(run / "latents"), "--out", str(run / "rollouts"),
                     *sets]) == 0, capsys.readouterr().err
        # an error line that quotes the URL is redacted too
        assert main(["cache-latents", "--out", str(run / "other"), "--dataset",
                     f"s3://reader:{PASSWORD}@nowhere/data", *sets[:2]]) == 2
    resolved = (run / "latents" / "resolved_config.yaml").read_text()
    assert f"http://***@{host}" in resolved  # the key is kept, its password masked
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 5
    for path in files:
        assert PASSWORD.encode() not in path.read_bytes(), f"the password leaked into {path}"
    written = capsys.readouterr()
    assert PASSWORD not in caplog.text and PASSWORD not in written.out and PASSWORD not in written.err
    pushed = read_metrics(pushgateway)
    assert "run-7" in pushed and PASSWORD not in pushed


_SAFE = st.text(st.characters(whitelist_categories=("Ll", "Lu", "Nd")), min_size=1, max_size=12)


@given(user=_SAFE, password=_SAFE.map(lambda s: "pw" + s), host=_SAFE, before=st.text(max_size=20),
       scheme=st.sampled_from(["http", "https", "s3", "postgresql+psycopg"]))
def test_a_password_in_any_url_anywhere_in_a_text_is_masked(user, password, host, before, scheme):
    text = f"{before} {scheme}://{user}:{password}@{host}.example:9091/path?x=1 and more"
    for clean in (redact_string(text), redact_values({"a": [text]})["a"][0], redact({"a": text})["a"]):
        assert f":{password}@" not in clean and f"{scheme}://***@{host}.example:9091/path" in clean


def test_signed_queries_are_dropped_and_credential_keys_removed():
    assert redact_string("see https://b.s3.amazonaws.com/k?X-Amz-Signature=abc for it") == \
        "see https://b.s3.amazonaws.com/k for it"
    assert redact({"aws_secret_access_key": "x", "uri": "s3://a:b@c/d"}) == {"uri": "s3://***@c/d"}


@pytest.fixture
def http_dataset(tmp_path):
    """A captioned image folder served over HTTP; its URI carries user:PASSWORD@ (the server takes any)."""
    import functools
    import http.server
    import io
    import json
    import threading

    from PIL import Image

    root = tmp_path / "served" / "data"
    root.mkdir(parents=True)
    lines = []
    for i in range(16):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (16 * i, 255 - 16 * i, 90)).save(buf, "PNG")
        (root / f"{i}.png").write_bytes(buf.getvalue())
        lines.append(json.dumps({"file": f"{i}.png", "caption": f"digit {i % 10}"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root.parent)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://reader:{PASSWORD}@127.0.0.1:{server.server_address[1]}/data"
    server.shutdown()


def test_no_stage_writes_a_password_of_its_config_into_any_output(tmp_path, monkeypatch, caplog, capsys,
                                                                   pushgateway, http_dataset):  # noqa: F811
    """cache-latents, teacher-rollouts, distill, evaluate, diagnose and register, with the password in the
    Pushgateway URL, the dataset URI (also evaluate's reference and prompt source) and the run id: no byte of any
    file under their output folders, no log line and no printed line holds it."""
    import json

    host = pushgateway.split("://", 1)[1]
    monkeypatch.setenv("DDIL_RUN_ID", f"s3://runner:{PASSWORD}@bucket/run-7")
    sets = ["--config", "tiny", "--set", f"telemetry.pushgateway=http://ddil-user:{PASSWORD}@{host}",
            "--set", f"data.dataset={http_dataset}", "--set", "data.limit=null", "--set", "training.steps=2"]
    run = tmp_path / "runs"
    latents, rollouts, dist, ev, diag = (run / n for n in ("latents", "rollouts", "distill", "eval", "diagnose"))
    with caplog.at_level(logging.DEBUG):
        for args in (["cache-latents", "--out", latents],
                     ["teacher-rollouts", "--latents", latents, "--out", rollouts],
                     ["distill", "--latents", latents, "--rollouts", rollouts, "--out", dist],
                     ["evaluate", "--student", dist / "student", "--teacher", "tiny://sd15", "--out", ev,
                      "--set", "evaluation.extractor=pixels", "--set", "evaluation.num_reference=16",
                      "--set", "evaluation.teacher_steps=2", "--set", "evaluation.num_prompts=2",
                      "--set", "evaluation.student_steps=[]"],
                     ["diagnose", "--student", dist / "student", "--out", diag],
                     ["register", "--student", dist / "student", "--metrics", ev / "metrics.json", "--registry",
                      run / "registry", "--set", "registry.gates.fid_factor=null",
                      "--set", "registry.gates.min_coverage=null", "--set", "registry.gates.min_adherence=null"]):
            assert main([str(a) for a in args + sets]) == 0, (args[0], capsys.readouterr().err[-3000:])
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["protocol"]["reference"] == http_dataset.replace(f"reader:{PASSWORD}@", "***@")  # kept, masked
    files = [p for p in run.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"manifest.json", "train_log.jsonl", "state.json", "metrics.json",
                                       "metrics_flat.json", "report.md", "report.html", "diagnose.json",
                                       "index.json", "README.md", "ddil_student.json"}
    for path in files:
        assert PASSWORD.encode() not in path.read_bytes(), f"the password leaked into {path}"
    written = capsys.readouterr()
    assert PASSWORD not in caplog.text and PASSWORD not in written.out and PASSWORD not in written.err


def test_every_json_a_file_holds_is_made_by_the_one_redacting_writer():
    """The mechanism, held: json.dumps in ddil_core only inside redaction.py, or where its text is no file a user
    may publish (a hash, an HTTP reply) or is a dataset's own content (captions and keys copied verbatim, the generated demo set)."""
    import ast

    allowed = {"config/redaction.py": 1, "models/teacher.py": 2, "stages/common.py": 1, "data/shards.py": 1,
               "serving/openai_api.py": 1, "metrics/report.py": 1, "stages/cache_latents.py": 2,
               "demo/data.py": 1}
    package = ROOT / "ddil_core"
    found = {}
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "dumps" and getattr(node.value, "id", "") == "json":
                key = str(path.relative_to(package))
                found[key] = found.get(key, 0) + 1
    assert found == allowed
