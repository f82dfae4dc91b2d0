"""Checks that the Grafana dashboard, the alerts and the KEDA triggers name
only metrics and labels kvq exports (scripts/check-deploy.sh runs it).

    python3 check_metrics.py DASHBOARD.json... [--rendered RENDERED.yaml]...

Each DASHBOARD.json must parse as a Grafana dashboard; every PromQL
expression in it (panel targets, template variable queries) is checked. So
are the expressions of the PrometheusRules and the Prometheus triggers of
the ScaledObjects in each RENDERED.yaml (an overlay as kubectl kustomize
prints it).

Not a PromQL parser: besides balanced brackets, what it checks is names.
An expression may name only the metrics of METRICS below (a histogram as
NAME_bucket, NAME_sum or NAME_count), functions PromQL has, and in its
selectors and by/without clauses only labels those metrics carry or that
Prometheus adds when it scrapes a pod. METRICS is what kvq-api's and
kvq-worker's /metrics serve (README: "HTTP API (v1)", GET /metrics): a
metric renamed or added there is renamed or added here, and this then finds
every query to change.
"""

import json
import re
import sys

import yaml

# name: (type, labels)
METRICS = {
    # kvq-api's /metrics
    "kvq_api_http_requests_total": ("counter", {"method", "route", "status"}),
    "kvq_api_http_request_duration_seconds": ("histogram", {"method", "route"}),
    "kvq_api_writes_accepted_total": ("counter", {"op"}),
    "kvq_api_dead_jobs_retried_total": ("counter", set()),
    "kvq_api_body_bytes_in_flight": ("gauge", set()),
    "kvq_api_body_bytes_budget": ("gauge", set()),
    "kvq_queue_jobs": ("gauge", set()),
    "kvq_dead_jobs": ("gauge", set()),
    "kvq_queue_lag_seconds": ("gauge", {"partition"}),
    "kvq_queue_partition_jobs": ("gauge", {"partition"}),
    "kvq_redis_up": ("gauge", {"role"}),
    # kvq-api's and kvq-worker's
    "kvq_build_info": ("gauge", {"component", "version"}),
    # kvq-worker's /metrics
    "kvq_worker_jobs_total": ("counter", {"status"}),
    "kvq_worker_jobs_in_flight": ("gauge", set()),
    "kvq_worker_job_retries_total": ("counter", set()),
    "kvq_worker_job_deferrals_total": ("counter", set()),
    "kvq_worker_redeliveries_total": ("counter", set()),
    "kvq_worker_jobs_fenced_total": ("counter", set()),
    "kvq_worker_job_duration_seconds": ("histogram", {"op"}),
    "kvq_worker_enqueue_to_applied_seconds": ("histogram", {"op"}),
}

# What Prometheus adds to every series it scrapes from a PodMonitor's pod.
TARGET_LABELS = {"namespace", "pod", "container", "endpoint", "instance", "job"}

FUNCTIONS = {
    "abs", "absent", "absent_over_time", "avg", "avg_over_time", "bottomk", "ceil",
    "changes", "clamp", "clamp_max", "clamp_min", "count", "count_over_time",
    "count_values", "delta", "deriv", "floor", "group", "histogram_quantile",
    "idelta", "increase", "irate", "label_replace", "last_over_time", "max",
    "max_over_time", "min", "min_over_time", "quantile", "quantile_over_time",
    "rate", "resets", "round", "scalar", "sort", "sort_desc", "stddev", "sum",
    "sum_over_time", "time", "timestamp", "topk", "vector",
}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
GROUPING = r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"
NAME = r"[A-Za-z_:][A-Za-z0-9_:]*"


def series(name):
    """The metric a series name belongs to and its labels, or None."""
    if name in METRICS:
        kind, labels = METRICS[name]
        return None if kind == "histogram" else labels
    for suffix in ("_bucket", "_sum", "_count"):
        base = name[: -len(suffix)]
        if name.endswith(suffix) and METRICS.get(base, ("",))[0] == "histogram":
            labels = METRICS[base][1]
            return labels | {"le"} if suffix == "_bucket" else labels
    return None


def check(expr):
    """The problems of one PromQL expression (an empty list if none)."""
    problems, known = [], set(TARGET_LABELS)
    # Grafana's label_values(METRIC, LABEL) template query.
    values = re.fullmatch(rf"\s*label_values\(\s*({NAME})\s*,\s*({NAME})\s*\)\s*", expr)
    if values:
        metric, label = values.groups()
        labels = series(metric)
        if labels is None:
            return [f"{metric} is not a metric kvq exports"]
        return [] if label in labels | known else [f"{metric} has no label {label}"]
    # Strings, ranges and number literals carry no names.
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    stack = []
    for char in text:
        if char in "({[":
            stack.append(")}]"["({[".index(char)])
        elif char in ")}]" and (not stack or stack.pop() != char):
            return ["unbalanced brackets"]
    if stack:
        return ["unbalanced brackets"]
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(rf"(?<![A-Za-z0-9_:$])\d[\d.]*(?:[eE][+-]?\d+)?", " ", text)
    selectors = []

    def selector(match):
        selectors.append((match.group(1), re.findall(rf"({NAME})\s*(?:=~|!~|!=|=)", match.group(2))))
        return f" {match.group(1) or ''} "

    text = re.sub(rf"({NAME})?\s*\{{([^}}]*)\}}", selector, text)
    grouped = []
    text = re.sub(GROUPING, lambda m: grouped.extend(re.findall(NAME, m.group(2))) or " ", text)
    for match in re.finditer(rf"\$?{NAME}", text):
        word = match.group(0)
        if word.startswith("$") or word in KEYWORDS | {"by", "without"}:
            continue
        if re.match(r"\s*\(", text[match.end() :]):
            if word not in FUNCTIONS:
                problems.append(f"{word}() is not a PromQL function")
            continue
        labels = series(word)
        if labels is None:
            problems.append(f"{word} is not a metric kvq exports")
        else:
            known |= labels
    for metric, labels in selectors:
        if not metric:
            problems.append("a selector without a metric name")
            continue
        allowed = (series(metric) or set()) | TARGET_LABELS
        problems += [f"{metric} has no label {label}" for label in labels if label not in allowed]
    problems += [f"no metric here has the label {label}" for label in grouped if label not in known]
    return problems


def dashboard_queries(path):
    with open(path, encoding="utf-8") as file:
        dashboard = json.load(file)
    if not isinstance(dashboard.get("panels"), list) or not dashboard.get("uid"):
        raise ValueError("not a Grafana dashboard (no uid, or no panels)")
    out = []

    def walk(node, where):
        if isinstance(node, dict):
            title = node.get("title") or node.get("name") or where
            for key, value in node.items():
                if key == "expr" and isinstance(value, str):
                    out.append((f"{path}: {title}", value))
                elif key == "query" and isinstance(value, dict) and isinstance(value.get("query"), str):
                    if node.get("type") == "query":
                        out.append((f"{path}: variable {title}", value["query"]))
                else:
                    walk(value, title)
        elif isinstance(node, list):
            for item in node:
                walk(item, where)

    walk(dashboard, "")
    return out


def rendered_queries(path):
    out = []
    with open(path, encoding="utf-8") as file:
        for obj in yaml.safe_load_all(file):
            if not obj:
                continue
            name = f"{path}: {obj['kind']}/{obj['metadata']['name']}"
            if obj["kind"] == "PrometheusRule":
                for group in obj["spec"]["groups"]:
                    for rule in group["rules"]:
                        out.append((f"{name} {rule.get('alert') or rule.get('record')}", str(rule["expr"])))
            elif obj["kind"] == "ScaledObject":
                for trigger in obj["spec"]["triggers"]:
                    if trigger["type"] == "prometheus":
                        out.append((f"{name} trigger {trigger.get('name', '')}", trigger["metadata"]["query"]))
    return out


def main():
    args = sys.argv[1:]
    dashboards, rendered = [], []
    while args:
        arg = args.pop(0)
        if arg == "--rendered" and args:
            rendered.append(args.pop(0))
        elif arg.startswith("-"):
            sys.exit(__doc__)
        else:
            dashboards.append(arg)
    if not dashboards and not rendered:
        sys.exit(__doc__)
    queries, failed = [], False
    for path in dashboards:
        try:
            queries += dashboard_queries(path)
        except ValueError as error:  # json.JSONDecodeError is one
            print(f"error: {path}: {error}", file=sys.stderr)
            failed = True
    for path in rendered:
        queries += rendered_queries(path)
    for where, expr in queries:
        for problem in check(expr):
            print(f"error: {where}: {problem}: {expr}", file=sys.stderr)
            failed = True
    if failed:
        sys.exit(1)
    print(f"{len(queries)} PromQL expressions name only kvq's metrics and labels")


if __name__ == "__main__":
    main()
