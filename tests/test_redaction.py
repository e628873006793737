"""No secret is ever written: credentials given in URLs on the command line (`--set telemetry.pushgateway=
http://user:PASSWORD@host`), in the run id, or anywhere a URL stands, go through the one redaction
(ddil_core/config/redaction.py) before any writer: resolved configs, JSON files, lineage, model cards, logs, error
lines, Prometheus labels."""
from __future__ import annotations

import logging

from hypothesis import given
from hypothesis import strategies as st

from ddil_core.cli import main
from ddil_core.config.redaction import redact, redact_string, redact_values
from tests.pushgateway import pushgateway, read_metrics  # noqa: F401

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
