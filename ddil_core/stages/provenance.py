"""Checks that a stage's inputs belong together, each refusal naming both sides.

- A student and its teacher: distill records the teacher's UNet fingerprint in ddil_student.json (teacher_unet);
  evaluate compares the student with that teacher only.
- Metrics and their student: evaluate records a digest of each evaluated folder's files (protocol.model_digests);
  register registers a student only with metrics made for exactly that folder's contents.
- A student and the config it is registered under: distill records the config sections that made the student
  (ddil_student.json "config"); register's model card shows register's config, so the two must agree.
- What a student folder can sample, and its record: ddil_core/models/student_record.py (the one validator).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ddil_core.config import Config, ConfigError, resolved_dict
from ddil_core.config.redaction import redact_values
from ddil_core.data.shards import folder_digest
from ddil_core.models.pipeline_io import ModelError
from ddil_core.models.student_record import check_sampling_steps  # noqa: F401  (re-exported)
from ddil_core.models.student_record import validate_student_folder as student_info  # noqa: F401  (the one validator)
from ddil_core.stages.outputs import RERUN_MAY_DIFFER, flatten_config


def check_metrics_belong(metrics: dict, metrics_path: Path, student: str) -> None:
    """register: the metrics were made by evaluate for exactly this student folder's contents."""
    digests = (metrics.get("protocol") or {}).get("model_digests") if isinstance(metrics.get("protocol"), dict) \
        else None
    recorded = digests.get("student") if isinstance(digests, dict) else None
    if recorded is None:
        raise ModelError(f"{metrics_path}: records no digest of the student it evaluated (protocol.model_digests; "
                         "made by an older ddil evaluate?); rerun evaluate on this student")
    if not Path(str(student)).is_dir():
        return  # a remote student (s3://...) is checked by the registry when it is read
    mine = folder_digest(Path(str(student)))
    if mine != recorded:
        made_for = (metrics.get("protocol") or {}).get("model_paths", {}).get("student")
        raise ModelError(f"{metrics_path}: these metrics were made for student {made_for} (digest {recorded[:16]}), "
                         f"not for --student {student} (digest {mine[:16]}); rerun evaluate on this student")


def check_config_of(config: Config, student: str, info: Optional[dict]) -> None:
    """register: the config a student is registered under (its model card) is the one that made it."""
    recorded = (info or {}).get("config")
    if not isinstance(recorded, dict):
        return  # a plain pipeline folder (no record of how it was made): nothing to compare
    old = flatten_config(recorded)
    # the record was redacted when it was written (config/redaction.py): compare with this config redacted alike
    new = {k: v for k, v in flatten_config(redact_values(resolved_dict(config))).items()
           if k.split(".", 1)[0] in recorded}
    diffs = [f"{k}: {old.get(k, '(absent)')!r} (student) vs {new.get(k, '(absent)')!r} (this config)"
             for k in sorted(set(old) | set(new))
             if not k.startswith(RERUN_MAY_DIFFER) and old.get(k, "(absent)") != new.get(k, "(absent)")]
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise ConfigError(f"{student}: was distilled with another config than this one ({shown}); register it with "
                          "the recipe and overrides that made it")
