"""Runs the README's curl examples through a Python client generated from the served OpenAPI document.

Usage: PYTHONPATH=<generated client dir> python readme_client.py README.md docs/openapi.json http://127.0.0.1:PORT

The client is made by `openapi-python-client generate` in scripts/ci-schemathesis.sh, from the document
tallyd serves. This script reads every `curl` of the README's API section, finds the documented operation
for its method and path, calls the generated function for that operation with the curl's path, query,
`Idempotency-Key` and body (converted by the document's own parameter types and body model), and checks
the status and body against the `# STATUS {...}` comment under the curl ("..." and `created_at_ms` stand
for anything; an example without one must succeed). The client parses every answer into its model, so a document that is valid but wrong for
the server fails here. It expects a fresh server (the README's ids and balances start from the seed).
Prints one line per example and "N passed, M failed" last; exits 1 if any failed.
"""

import importlib
import json
import re
import shlex
import sys
from urllib.parse import parse_qsl, unquote, urlsplit


def curl_examples(readme):
    """(curl argv, expected status or None, expected body text or None) for each curl in the API section."""
    section = readme.split("## The API", 1)[1].split("\n## ", 1)[0]
    examples = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        lines = block.replace("\\\n", " ").splitlines()
        for index, line in enumerate(lines):
            if not line.startswith("curl "):
                continue
            status, body = None, None
            following = lines[index + 1 :]
            if following and (match := re.match(r"# (\d{3}) (.*)", following[0])):
                status, body = int(match.group(1)), match.group(2)
                for more in following[1:]:
                    if not re.match(r"#\s{2,}", more):
                        break
                    body += more[1:].strip()
            examples.append((shlex.split(line, comments=True), status, body))
    return examples


def parse_curl(argv):
    method, headers, data, url = "GET", {}, None, None
    args = iter(argv[1:])
    for arg in args:
        if arg == "-s":
            continue
        if arg == "-X":
            method = next(args)
        elif arg == "-H":
            name, value = next(args).split(":", 1)
            headers[name.strip().lower()] = value.strip()
        elif arg == "-d":
            data = next(args)
            method = "POST" if method == "GET" else method
        else:
            url = arg
    parts = urlsplit(url if "://" in url else "http://" + url)
    return method, parts.path, dict(parse_qsl(parts.query)), headers, data


def match_template(document, path):
    segments = path.split("/")
    for template in document["paths"]:
        parts = template.split("/")
        if len(parts) == len(segments) and all(
            part == segment or (part.startswith("{") and segment) for part, segment in zip(parts, segments)
        ):
            return template, {part[1:-1]: unquote(segment) for part, segment in zip(parts, segments) if part.startswith("{")}
    raise AssertionError(f"{path} is under no documented path")


def deref(document, value):
    while isinstance(value, dict) and "$ref" in value:
        node = document
        for key in value["$ref"].lstrip("#/").split("/"):
            node = node[key]
        value = node
    return value


def snake(name):
    """`postTransaction` -> `post_transaction`, `Idempotency-Key` -> `idempotency_key`, as the generator names them."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name.replace("-", "_")).lower()


def convert(document, schema, text):
    """A parameter's text as the generated client takes it: an int, the model of a named enum, or text."""
    from tallyd_client import models

    if "$ref" in schema:
        named = getattr(models, schema["$ref"].rsplit("/", 1)[1], None)
        if named is not None and deref(document, schema).get("enum"):
            return named(text)
        schema = deref(document, schema)
    return int(text) if schema.get("type") == "integer" else text


def call(document, base_url, argv):
    """Calls the generated function for one curl; returns (httpx response, parsed model)."""
    from tallyd_client import Client, models

    method, path, query, headers, data = parse_curl(argv)
    template, path_values = match_template(document, path)
    operation = document["paths"][template][method.lower()]
    kwargs = {}
    for parameter in operation.get("parameters", []):
        parameter = deref(document, parameter)
        name, where = parameter["name"], parameter["in"]
        source = {"path": path_values, "query": query, "header": headers}[where]
        key = name.lower() if where == "header" else name
        if key in source:
            kwargs[snake(name)] = convert(document, parameter["schema"], source[key])
    # A body the operation takes but the curl does not send (a void, a capture of all of it) stays unset.
    if "requestBody" in operation and data is not None:
        schema_ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        model = getattr(models, schema_ref.rsplit("/", 1)[1])
        kwargs["body"] = model.from_dict(json.loads(data))
    tag = operation["tags"][0]
    module = importlib.import_module(f"tallyd_client.api.{tag}.{snake(operation['operationId'])}")
    client = Client(base_url=base_url, raise_on_unexpected_status=True, timeout=30.0)
    response = module.sync_detailed(client=client, **kwargs)
    return response, f"{method} {template}"


def matches(expected, actual, where="body"):
    """Whether `actual` has every value of `expected`; "..." and created_at_ms match anything."""
    if expected == "...":
        return []
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{where}: {actual!r} is not an object"]
        problems = []
        for key, value in expected.items():
            if key == "created_at_ms":
                continue
            if key not in actual:
                problems.append(f"{where}.{key} is missing")
            else:
                problems += matches(value, actual[key], f"{where}.{key}")
        return problems
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return [f"{where}: {actual!r} is not a list of {len(expected)}"]
        return [p for i, (e, a) in enumerate(zip(expected, actual)) for p in matches(e, a, f"{where}[{i}]")]
    return [] if expected == actual else [f"{where}: {actual!r} != {expected!r}"]


def main():
    readme_path, document_path, base_url = sys.argv[1:4]
    readme = open(readme_path, encoding="utf-8").read()
    document = json.load(open(document_path, encoding="utf-8"))
    passed = failed = 0
    for argv, status, body in curl_examples(readme):
        label = " ".join(argv[1:])
        try:
            response, operation = call(document, base_url, argv)
            problems = []
            if response.parsed is None:
                problems.append("the client parsed no model")
            if status is not None and response.status_code != status:
                problems.append(f"status {response.status_code}, the README says {status}")
            if status is None and not 200 <= response.status_code < 300:
                problems.append(f"status {response.status_code} for an example the README shows succeeding")
            if body is not None and response.headers.get("content-type", "").startswith("application/json"):
                # The README elides with `,...` inside objects; an elided tail is left out of the comparison.
                expected = json.loads(re.sub(r",\.\.\.([}\]])", r"\1", body))
                problems += matches(expected, json.loads(response.content))
        except Exception as error:  # a client that cannot even make or parse the call fails the example
            problems, operation = [f"{type(error).__name__}: {error}"], "?"
        if problems:
            failed += 1
            print(f"FAIL {label} ({operation}): " + "; ".join(problems))
        else:
            passed += 1
            print(f"ok   {label} ({operation} -> {response.status_code}, {type(response.parsed).__name__})")
    if passed < 16:
        failed += 1
        print(f"FAIL only {passed} README examples ran; the parser lost some")
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
