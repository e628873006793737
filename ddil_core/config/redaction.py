"""The one redaction of secrets, applied by every writer: resolved configs (stages/outputs.py), JSON files and
JSON lines (`redacted_json` below, the only json.dumps of a file's contents: data/shards.py write_json_atomic
(manifests, ddil_student.json, summary.json), evaluate's and the registry's metrics.json, diagnose.json, the train
log, checkpoints' state.json; tests/config/test_redaction.py holds ddil_core to it), reports (metrics/report.py), lineage (registry/lineage.py), model cards
and registry entries (registry/), log lines (the CLI's log filter) and Prometheus labels (telemetry/).

A URL's user:password@ becomes ***@ (also quoted without its scheme), a query string that carries a signature or credential is dropped, wherever the
URL stands in a text; `redact` also drops mapping keys that name a credential (secret, password, token, key).
"""
from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

SENSITIVE_WORDS = ("secret", "password", "token", "key")
_SIGNED_QUERY = re.compile(r"signature|credential|token|secret|password|key", re.IGNORECASE)
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_BARE_USERINFO = re.compile(r"(?<![\w/*])[^\s/:@'\"]+:[^\s/@'\"]+@(?=[\w.-])")  # user:password@host quoted
#                                                              without its scheme (a library's message about a URL)


def is_sensitive(key: Any) -> bool:
    low = str(key).lower()
    return any(word in low for word in SENSITIVE_WORDS)


def _redact_url(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return re.sub(r"//[^/@]*@", "//***@", url)
    netloc, query = parts.netloc, parts.query
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    if query and _SIGNED_QUERY.search(query):
        query = ""
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_string(value: str) -> str:
    """`value` with every URL in it redacted (user:password@ masked, signed query strings dropped)."""
    if "@" not in value and "?" not in value:
        return value
    return _BARE_USERINFO.sub("***@", _URL.sub(lambda m: _redact_url(m.group()), value))


def redact_values(obj: Any) -> Any:
    """A copy of obj (mappings, lists, strings at any depth) with every string redacted; keys are kept."""
    if isinstance(obj, dict):
        return {k: redact_values(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_values(v) for v in obj]
    return redact_string(obj) if isinstance(obj, str) else obj


def redact(obj: Any) -> Any:
    """A copy of obj without credential-like keys (at any depth) and with URLs masked."""
    if isinstance(obj, dict):
        return {k: redact(v) for k, v in obj.items() if not is_sensitive(k)}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return redact_string(obj)
    return obj


def redacted_json(obj: Any, **kwargs: Any) -> str:
    """json.dumps(obj, **kwargs) with every string in obj redacted: how every JSON file or line ddil writes is made."""
    return json.dumps(redact_values(obj), **kwargs)


def redact_log_record(record) -> bool:
    """A logging filter (the CLI puts it on its handlers): the record's message with every URL redacted."""
    message = record.getMessage()
    clean = redact_string(message)
    if clean != message:
        record.msg, record.args = clean, ()
    return True
