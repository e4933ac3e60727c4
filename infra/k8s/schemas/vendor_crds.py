"""Vendor the OpenAPI v3 schemas of CustomResourceDefinitions for the offline
manifest check (tests/test_k8s.py).

    python infra/k8s/schemas/vendor_crds.py CRD.yaml [CRD.yaml ...]

Writes ``<group>_<kind>_<version>.json`` beside this file for every served
version of each CRD: its ``openAPIV3Schema`` unchanged except that
``description`` texts are dropped (they are most of the bytes and validate
nothing). Record where the CRDs came from in SOURCES.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def strip_descriptions(node):
    if isinstance(node, dict):
        return {k: strip_descriptions(v) for k, v in node.items()
                if not (k == "description" and isinstance(v, str))}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def main(paths: list[str]) -> None:
    for path in paths:
        for crd in yaml.safe_load_all(Path(path).read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            spec = crd["spec"]
            for version in spec["versions"]:
                if not version.get("served"):
                    continue
                schema = strip_descriptions(version["schema"]["openAPIV3Schema"])
                out = HERE / f"{spec['group']}_{spec['names']['kind']}_{version['name']}.json"
                out.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
                print(out.name)


if __name__ == "__main__":
    main(sys.argv[1:])
