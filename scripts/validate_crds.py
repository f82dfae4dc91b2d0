"""Validates the custom resources of a rendered overlay against their CRDs'
published schemas, offline (scripts/check-deploy.sh runs it).

    python3 validate_crds.py SCHEMA_DIR RENDERED.yaml REST.yaml

SCHEMA_DIR holds one openAPIV3Schema per kind, as JSON, named
GROUP_VERSION_KIND.json (kubernetes/crd-schemas: prometheus-operator's
PodMonitor and PrometheusRule, KEDA's ScaledObject; each folder says where
its schemas come from). Every object of RENDERED.yaml whose apiVersion and
kind have a schema there is validated against it; every other object is
written to REST.yaml, for kubernetes-validate (the built-in kinds). A
ScaledObject must also scale something the rendering has, and that nothing
else scales: KEDA runs an HPA of its own, and two fight over the count.

Validation is strict, as `kubectl apply` is by default: a field the schema
does not name is an error (an API server would refuse it, or drop it
silently). The schemas' CEL rules (x-kubernetes-validations) are not
evaluated. Needs jsonschema and PyYAML (pip).
"""

import json
import pathlib
import re
import sys

import jsonschema
import yaml

# The ObjectMeta fields a manifest sets, and their rules as the API server
# applies them (the CRD schemas leave metadata to the server).
METADATA = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {
            "type": "string",
            "maxLength": 253,
            "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
        },
        "namespace": {
            "type": "string",
            "maxLength": 63,
            "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        },
        "labels": {
            "type": "object",
            "additionalProperties": {
                "type": "string",
                "maxLength": 63,
                "pattern": r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$",
            },
        },
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def strict(schema):
    """The schema with unknown fields made errors: every object schema that
    lists its properties, and neither allows others nor preserves unknown
    fields, gets additionalProperties false; OpenAPI's `nullable` becomes a
    null type. A pattern that sets a flag after its `^` (Go allows it,
    Python does not) gets the flag first."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: strict(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = strict(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [strict(sub) for sub in out[key]]
    pattern = out.get("pattern")
    if isinstance(pattern, str) and pattern.startswith("^(?i)"):
        out["pattern"] = "(?i)^" + pattern[len("^(?i)") :]
    if out.pop("nullable", False) is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def load_schemas(directory):
    schemas = {}
    for path in sorted(pathlib.Path(directory).rglob("*.json")):
        group, version, kind = path.stem.split("_")
        schema = strict(json.loads(path.read_text()))
        schema["properties"]["metadata"] = METADATA
        jsonschema.Draft4Validator.check_schema(schema)
        schemas[(f"{group}/{version}", kind)] = (path, jsonschema.Draft4Validator(schema))
    return schemas


def scaled_targets(objects):
    """A ScaledObject's target must be in the rendering, and no
    HorizontalPodAutoscaler may target it too (KEDA runs its own; two fight
    over the count)."""
    errors = []
    names = {(obj["kind"], obj["metadata"]["name"]) for obj in objects}
    hpas = {
        (obj["spec"]["scaleTargetRef"]["kind"], obj["spec"]["scaleTargetRef"]["name"]): obj["metadata"]["name"]
        for obj in objects
        if obj["kind"] == "HorizontalPodAutoscaler"
    }
    for obj in objects:
        if obj["kind"] != "ScaledObject":
            continue
        ref = obj["spec"]["scaleTargetRef"]
        target = (ref.get("kind", "Deployment"), ref["name"])
        name = f"ScaledObject/{obj['metadata']['name']}"
        if target not in names:
            errors.append(f"{name}: scales {target[0]}/{target[1]}, which is not in the rendering")
        if target in hpas:
            errors.append(
                f"{name}: {target[0]}/{target[1]} is also scaled by HorizontalPodAutoscaler/{hpas[target]}"
            )
    return errors


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    schema_dir, rendered, rest = sys.argv[1:]
    schemas = load_schemas(schema_dir)
    with open(rendered, encoding="utf-8") as file:
        # kubectl kustomize separates objects by a line "---"; the others are
        # passed on as they are written, not re-serialized.
        texts = [text for text in re.split(r"^---\n", file.read(), flags=re.M) if text.strip()]
    others, errors, checked = [], [], []
    for text in texts:
        obj = yaml.safe_load(text)
        key = (obj.get("apiVersion"), obj.get("kind"))
        name = f"{key[1]}/{obj.get('metadata', {}).get('name')}"
        if key not in schemas:
            others.append(text)
            continue
        path, validator = schemas[key]
        checked.append(name)
        for error in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
            where = ".".join(str(part) for part in error.absolute_path) or "(top)"
            errors.append(f"{name}: {where}: {error.message} (schema {path})")
    errors += scaled_targets([yaml.safe_load(text) for text in texts])
    with open(rest, "w", encoding="utf-8") as file:
        file.write("---\n".join(others))
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if errors:
        sys.exit(1)
    if checked:
        print(f"{len(checked)} custom resources valid ({', '.join(checked)})")
    else:
        print("no custom resources")


if __name__ == "__main__":
    main()
