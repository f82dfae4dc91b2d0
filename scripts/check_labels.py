"""Checks that every object of rendered manifests carries the recommended
app.kubernetes.io labels, and every pod template the ones kvq's tools filter
pods on.

    check_labels.py RENDERED.yaml...

Prints one line per object that lacks one and exits 1; prints a summary and
exits 0 otherwise.
"""

import sys

import yaml

# https://kubernetes.io/docs/concepts/overview/working-with-objects/common-labels/
RECOMMENDED = ("name", "instance", "version", "component", "part-of", "managed-by")


def missing(labels):
    labels = labels or {}
    return [k for k in RECOMMENDED if f"app.kubernetes.io/{k}" not in labels]


def main(paths):
    bad, objects = 0, 0
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for doc in yaml.safe_load_all(f):
                if not doc:
                    continue
                objects += 1
                what = f"{path}: {doc['kind']} {doc['metadata']['name']}"
                lack = missing(doc["metadata"].get("labels"))
                if lack:
                    print(f"{what} lacks the labels {', '.join(lack)}")
                    bad += 1
                template = (doc.get("spec") or {}).get("template")
                if isinstance(template, dict) and "metadata" in template:
                    lack = missing(template["metadata"].get("labels"))
                    if lack:
                        print(f"{what}: its pod template lacks the labels {', '.join(lack)}")
                        bad += 1
    if bad:
        return 1
    print(f"labels: {objects} objects carry app.kubernetes.io/{{{','.join(RECOMMENDED)}}}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
