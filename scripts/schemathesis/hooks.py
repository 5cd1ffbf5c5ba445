"""Schemathesis hooks for tallyd (loaded by scripts/ci-schemathesis.sh through SCHEMATHESIS_HOOKS).

Some of tallyd's rules cannot be said in JSON Schema, so a schema-valid request may break them and be
refused with 400, which schemathesis's `positive_data_acceptance` check reports as "valid data rejected".
This hook drops exactly those reports, and only when the request really breaks the rule named by the
error code; every other failure, and every other 400, still fails the run:

- `same_account`: a transfer's source and destination, or a hold's card and destination, are the same card
  (JSON Schema cannot compare two properties); in a batch, the same in any item.
- `invalid_amount`, `invalid_limit`, `invalid_expiry`, `invalid_parameter` for a float: tallyd takes an
  amount, an overdraft limit, an expiry and a hold id only as an integer literal (`1.0` and `1e3` are
  refused, the contract of POST /transaction), while JSON Schema's `integer` admits `1.0`.
- `invalid_reference` past 255 bytes: the limit is in bytes of UTF-8; `maxLength` counts characters.

Two more guards work around schemathesis 4.32.5 itself: a "valid data rejected" report for a body that does not
fit the operation's documented request schema (schemathesis builds one from a link it infers, such as a batch
item with no `type`) is dropped, as it was no positive case; and a case whose path parameter came from a
response's `null` (a pending hold's `transaction_id`, through an inferred link: `/transactions/None`) is skipped.

On `POST /transfers/bulk` the same three rules hold for each item, and the 400 names the item by its
`index`: the report is dropped only when that item breaks the rule. And a bulk body with more items than
`maxItems` breaks the schema, as schemathesis's negative cases mean to, but tallyd refuses it with 413
`body_too_large` (the item limit is a size limit, named by --bulk-items-max), which that check does not
list among the refusals it expects: that report is dropped too, only for exactly that answer to exactly
that body.
"""

import json
import pathlib
import re

import jsonschema_rs
import schemathesis

DOCUMENT = json.loads((pathlib.Path(__file__).resolve().parents[2] / "docs" / "openapi.json").read_text(encoding="utf-8"))
REFERENCE_BYTES_MAX = 255
# The integer fields tallyd reads only as integer literals, and the code a float in each is refused with.
INTEGER_FIELDS = {
    "invalid_amount": "amount",
    "invalid_limit": "overdraft_limit",
    "invalid_expiry": "expires_in_s",
    "invalid_parameter": "hold_id",
}


def _fits_its_schema(case):
    """Whether the body schemathesis sent fits the operation's documented request schema."""
    operation = DOCUMENT["paths"].get(case.path, {}).get(case.method.lower(), {})
    schema = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    if schema is None or case.body is None:
        return True
    root = dict(schema, components=DOCUMENT["components"])
    return jsonschema_rs.Draft202012Validator(root).is_valid(case.body)


def _digits(card):
    return re.sub(r"[ -]", "", card) if isinstance(card, str) else card


def _breaks_in(code, body):
    if not isinstance(body, dict):
        return False
    if code == "same_account":
        if "source" in body and _digits(body.get("source")) == _digits(body.get("destination")):
            return True
        return (
            "card_number" in body
            and body.get("destination") is not None
            and _digits(body.get("card_number")) == _digits(body.get("destination"))
        )
    if code in INTEGER_FIELDS:
        return isinstance(body.get(INTEGER_FIELDS[code]), float)
    if code == "invalid_reference":
        reference = body.get("reference")
        return isinstance(reference, str) and len(reference.encode("utf-8", "surrogatepass")) > REFERENCE_BYTES_MAX
    return False


def _breaks_an_inexpressible_rule(code, body):
    if _breaks_in(code, body):
        return True
    items = body.get("items") if isinstance(body, dict) else None
    return isinstance(items, list) and any(_breaks_in(code, item) for item in items)


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
    if not _fits_its_schema(case):
        return False
    if items is not None and isinstance(error.get("index"), int) and 0 <= error["index"] < len(items):
        return not _breaks_an_inexpressible_rule(error.get("code"), items[error["index"]])
    return not _breaks_an_inexpressible_rule(error.get("code"), case.body)


@schemathesis.hook
def filter_case(context, case):
    """A path parameter taken from a response's `null` is no id: skip the case."""
    return not any(value is None for value in (case.path_parameters or {}).values())
