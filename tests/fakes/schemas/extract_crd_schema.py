"""Write the OpenAPI schema of a CRD version as gzipped JSON, for offline validation (tests/kubeflow/test_deploy.py).

The InferenceService schema here comes from KServe's release tag v0.20.0 (the pinned kserve==0.20.0),
github.com/kserve/kserve config/crd/full/serving.kserve.io_inferenceservices.yaml; descriptions are dropped (they
are 90% of the 1.9 MB file and validate nothing). Regenerate with:

    git -C KSERVE_CHECKOUT show v0.20.0:config/crd/full/serving.kserve.io_inferenceservices.yaml > isvc-crd.yaml
    python tests/fakes/schemas/extract_crd_schema.py isvc-crd.yaml v1beta1 v0.20.0 \
        tests/fakes/schemas/kserve-v0.20.0-inferenceservice-v1beta1.json.gz
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json

import yaml


def strip_descriptions(node):
    if isinstance(node, dict):
        return {k: strip_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crd", help="the CRD YAML file")
    parser.add_argument("version", help="the served version, e.g. v1beta1")
    parser.add_argument("tag", help="the release it comes from, recorded in the output")
    parser.add_argument("out", help="output .json.gz")
    args = parser.parse_args(argv)
    raw = open(args.crd, "rb").read()
    crd = yaml.safe_load(raw)
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == args.version]
    group, names = crd["spec"]["group"], crd["spec"]["names"]
    record = {"group": group, "kind": names["kind"], "version": args.version,
              "source": f"kserve/kserve {args.tag} config/crd/full/{group}_{names['plural']}.yaml",
              "source_sha256": hashlib.sha256(raw).hexdigest(),
              "schema": strip_descriptions(version["schema"]["openAPIV3Schema"])}
    with gzip.GzipFile(args.out, "wb", mtime=0) as out:  # mtime 0: the same input gives the same bytes
        out.write(json.dumps(record, sort_keys=True, separators=(",", ":")).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
