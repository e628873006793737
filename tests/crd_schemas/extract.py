"""Regenerate the vendored CRD schemas of this folder from a kubeflow/trainer checkout (run by hand, never by tests).

    git clone https://github.com/kubeflow/trainer /tmp/trainer     # the Training Operator v1.9 lives there too
    python tests/crd_schemas/extract.py /tmp/trainer

Each output file is the `openAPIV3Schema` of the CRD's served version at one release tag, with the `description`
texts removed (they are 90% of the bytes and carry no validation), as sorted JSON. Nothing else is changed: types,
required fields, enums, patterns, int-or-string, preserve-unknown-fields and the CEL rules stay as released.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
# (release tag, CRD file in the repository at that tag, output name)
SOURCES = [
    ("v2.1.0", "manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml", "trainer-v2.1.0-trainjob.json"),
    ("v2.1.0", "manifests/base/crds/trainer.kubeflow.org_trainingruntimes.yaml", "trainer-v2.1.0-trainingruntime.json"),
    ("v2.2.1", "manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml", "trainer-v2.2.1-trainjob.json"),
    ("v2.2.1", "manifests/base/crds/trainer.kubeflow.org_trainingruntimes.yaml", "trainer-v2.2.1-trainingruntime.json"),
    ("v2.3.0", "manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml", "trainer-v2.3.0-trainjob.json"),
    ("v2.3.0", "manifests/base/crds/trainer.kubeflow.org_trainingruntimes.yaml", "trainer-v2.3.0-trainingruntime.json"),
    ("v1.9.4", "manifests/base/crds/kubeflow.org_pytorchjobs.yaml", "training-operator-v1.9.4-pytorchjob.json"),
]


def strip_descriptions(node):
    if isinstance(node, dict):
        return {k: strip_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def main(checkout: str) -> int:
    for tag, path, name in SOURCES:
        commit = subprocess.run(["git", "-C", checkout, "rev-parse", f"{tag}^{{commit}}"], check=True,
                                capture_output=True, text=True).stdout.strip()
        text = subprocess.run(["git", "-C", checkout, "show", f"{tag}:{path}"], check=True, capture_output=True,
                              text=True).stdout
        crd = yaml.safe_load(text)
        (version,) = [v for v in crd["spec"]["versions"] if v.get("served") and v.get("storage")]
        out = {"source": {"repository": "github.com/kubeflow/trainer", "tag": tag, "commit": commit, "path": path},
               "group": crd["spec"]["group"], "kind": crd["spec"]["names"]["kind"], "version": version["name"],
               "scope": crd["spec"]["scope"],
               "openAPIV3Schema": strip_descriptions(version["schema"]["openAPIV3Schema"])}
        (HERE / name).write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
        print(f"{name}: {tag} ({commit[:12]}) {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "."))
