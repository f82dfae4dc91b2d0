"""schemathesis hooks for scripts/fuzz.sh (loaded through SCHEMATHESIS_HOOKS)."""

import re
import uuid

import schemathesis

# `If-Match` as documented: one version in quotes, as the ETag gives it.
ENTITY_TAG = re.compile(r'"[0-9]{1,19}"')


@schemathesis.hook
def filter_case(context, case):
    """Drop cases labelled valid whose `If-Match` is not valid per the document.

    schemathesis' coverage phase draws header values from [A-Za-z0-9] only
    (schemathesis/specs/openapi/coverage/_wire.py), so it cannot build a
    quoted entity tag and sends a placeholder such as `If-Match: 0` as a
    *valid* value; the API rightly answers 400 and the positive-data check
    would fail on a value the document itself rejects. Cases meant to be
    invalid, and every other valid case, are kept.
    """
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return True
    value = (case.headers or {}).get("If-Match")
    return value is None or ENTITY_TAG.fullmatch(value) is not None


@schemathesis.hook
def before_call(context, case, kwargs):
    """Give every valid write its own `Idempotency-Key`.

    A key is bound to the first request sent with it: the same caller's
    repeat with another body is refused with 422 `idempotency_key_reused`,
    the documented answer. The fuzzer draws short header values and so
    reuses them across different bodies, which the positive-data check
    would count as valid data rejected. Invalid cases keep their values.
    """
    meta = case.meta
    if meta is not None and not meta.generation.mode.is_positive:
        return
    fresh = uuid.uuid4().hex
    for headers in (case.headers, kwargs.get("headers")):
        if headers and "Idempotency-Key" in headers:
            headers["Idempotency-Key"] = fresh
