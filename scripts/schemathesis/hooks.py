"""Schemathesis hooks for tallyd (loaded by scripts/ci-schemathesis.sh through SCHEMATHESIS_HOOKS).

Three of tallyd's rules cannot be said in JSON Schema, so a schema-valid request may break them and be
refused with 400, which schemathesis's `positive_data_acceptance` check reports as "valid data rejected".
This hook drops exactly those reports, and only when the request really breaks the rule named by the
error code; every other failure, and every other 400, still fails the run:

- `same_account`: a transfer's source and destination are the same card (JSON Schema cannot compare two
  properties).
- `invalid_amount` for a float: tallyd takes an amount only as an integer literal (`1.0` and `1e3` are
  refused, the contract of POST /transaction), while JSON Schema's `integer` admits `1.0`.
- `invalid_reference` past 255 bytes: the limit is in bytes of UTF-8; `maxLength` counts characters.

On `POST /transfers/bulk` the same three rules hold for each item, and the 400 names the item by its
`index`: the report is dropped only when that item breaks the rule. And a bulk body with more items than
`maxItems` breaks the schema, as schemathesis's negative cases mean to, but tallyd refuses it with 413
`body_too_large` (the item limit is a size limit, named by --bulk-items-max), which that check does not
list among the refusals it expects: that report is dropped too, only for exactly that answer to exactly
that body.
"""

import json
import re

import schemathesis

REFERENCE_BYTES_MAX = 255


def _digits(card):
    return re.sub(r"[ -]", "", card) if isinstance(card, str) else card


def _breaks_an_inexpressible_rule(code, body):
    if not isinstance(body, dict):
        return False
    if code == "same_account":
        return "source" in body and _digits(body.get("source")) == _digits(body.get("destination"))
    if code == "invalid_amount":
        return isinstance(body.get("amount"), float)
    if code == "invalid_reference":
        reference = body.get("reference")
        return isinstance(reference, str) and len(reference.encode("utf-8", "surrogatepass")) > REFERENCE_BYTES_MAX
    return False


BULK_ITEMS_MAX = 8190


def _error(response):
    try:
        return json.loads(response.content)["error"]
    except (ValueError, KeyError, TypeError):
        return None


def _bulk_items(body):
    items = body.get("transfers") if isinstance(body, dict) else None
    return items if isinstance(items, list) else None


@schemathesis.hook
def filter_failure(context, failure, case, response):
    """False drops the failure: a positive case refused for a rule the schema cannot express, or a bulk
    body over the item limit refused with 413."""
    code = getattr(failure, "code", None)
    error = _error(response)
    if not isinstance(error, dict):
        return True
    items = _bulk_items(case.body)
    if code == "ST201" and response.status_code == 413:
        return not (error.get("code") == "body_too_large" and items is not None and len(items) > BULK_ITEMS_MAX)
    if code != "ST202" or response.status_code != 400:
        return True
    if items is not None and isinstance(error.get("index"), int) and 0 <= error["index"] < len(items):
        return not _breaks_an_inexpressible_rule(error.get("code"), items[error["index"]])
    return not _breaks_an_inexpressible_rule(error.get("code"), case.body)
