"""Regenerate the vendored CRD schemas of this folder from a kubeflow/trainer checkout (run by hand, never by tests).

    git clone https://github.com/kubeflow/trainer /tmp/trainer     # the Training Operator v1.9 lives there too
    python tests/fakes/crd_schemas/extract.py /tmp/trainer
    git clone https://github.com/kubeflow/katib /tmp/katib           # the Katib Experiment (katib-*.json)
    python tests/fakes/crd_schemas/extract.py --katib /tmp/katib

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


# Katib's Experiment CRD declares no structure (openAPIV3Schema: type object, x-kubernetes-preserve-unknown-fields):
# its admission webhook checks the spec. The structure the API types define is the v1beta1 OpenAPI document of the
# same tag, so that is vendored: (tag, OpenAPI file, CRD file, output name)
KATIB_SOURCES = [
    ("v0.19.0", "pkg/apis/v1beta1/swagger.json", "manifests/v1beta1/components/crd/experiment.yaml",
     "katib-v0.19.0-experiment.json"),
]


def strip_descriptions(node):
    if isinstance(node, dict):
        return {k: strip_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def katib(checkout: str) -> int:
    for tag, api, crd_path, name in KATIB_SOURCES:
        commit = subprocess.run(["git", "-C", checkout, "rev-parse", f"{tag}^{{commit}}"], check=True,
                                capture_output=True, text=True).stdout.strip()
        show = lambda path: subprocess.run(["git", "-C", checkout, "show", f"{tag}:{path}"], check=True,  # noqa: E731
                                           capture_output=True, text=True).stdout
        crd = yaml.safe_load(show(crd_path))
        (version,) = [v for v in crd["spec"]["versions"] if v.get("served") and v.get("storage")]
        definitions = strip_descriptions(json.loads(show(api))["definitions"])
        out = {"source": {"repository": "github.com/kubeflow/katib", "tag": tag, "commit": commit, "path": api,
                          "crd": crd_path},
               "group": crd["spec"]["group"], "kind": crd["spec"]["names"]["kind"], "version": version["name"],
               "scope": crd["spec"]["scope"],
               "crdSchema": strip_descriptions(version["schema"]["openAPIV3Schema"]),
               "openAPIV3Schema": {"$ref": "#/definitions/v1beta1.Experiment", "definitions": definitions}}
        (HERE / name).write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
        print(f"{name}: {tag} ({commit[:12]}) {api}")
    return 0


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
    if len(sys.argv) > 2 and sys.argv[1] == "--katib":
        sys.exit(katib(sys.argv[2]))
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "."))
