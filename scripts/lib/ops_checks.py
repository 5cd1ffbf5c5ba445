#!/usr/bin/env python3
"""Checks of tallyd's operations files, called one at a time by scripts/ci-ops.sh.

Each subcommand prints what it checked and exits 0 when everything holds, 1 with a reason per problem
otherwise. They read files of the repository, a scrape of a live tallyd's /metrics, or a live Prometheus;
they never change anything. The YAML subcommands need PyYAML (installed with yamllint in ci-ops.sh's venv);
the others use the standard library only.
"""

import argparse
import fnmatch
import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request

# A metric name as tallyd names them; dashboards and the contract are searched with it.
METRIC_NAME = re.compile(r"\btallyd_[a-z0-9_]*[a-z0-9]\b")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# What Grafana's $__rate_interval is replaced by when a dashboard expression is run against the test's
# Prometheus (scraping every second): wide enough to hold several samples.
RATE_INTERVAL_FOR_TEST = "1m"


class Problems:
    """Collects problems so one run reports all of them, not only the first."""

    def __init__(self):
        self.items = []

    def add(self, message):
        self.items.append(message)
        print(f"  problem: {message}")

    def require(self, condition, message):
        if not condition:
            self.add(message)
        return condition

    def exit(self, what):
        if self.items:
            print(f"{what}: {len(self.items)} problem(s)")
            sys.exit(1)
        print(f"{what}: ok")
        sys.exit(0)


def load_yaml(path):
    import yaml  # only the YAML subcommands need it

    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


# ---------------------------------------------------------------------------------------------------------
# Prometheus exposition text


def parse_exposition(text):
    """Returns ({family: type}, {sample name}) of a Prometheus text exposition."""
    types, samples = {}, set()
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split()
            if len(parts) >= 4 and parts[1] == "TYPE":
                types[parts[2]] = parts[3]
            continue
        name = re.split(r"[{\s]", line, maxsplit=1)[0]
        samples.add(name)
    return types, samples


def explain_name(name, types, samples):
    """None when `name` can be queried in this scrape, else why not."""
    if name in samples:
        return None
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            family = name[: -len(suffix)]
            kind = types.get(family)
            if kind == "histogram" or (kind == "summary" and suffix != "_bucket"):
                return None  # declared, no observation yet
            if kind is not None:
                return f"{family} is exposed as a {kind}, so it has no {suffix} series"
            return f"neither {name} nor a histogram {family} is in the scrape"
    if name in types:
        if types[name] in ("histogram", "summary"):
            return f"{name} is a {types[name]}: query {name}_bucket/_sum/_count, not the bare name"
        return None
    return f"{name} is not in the scrape"


def cmd_contract_metrics(args):
    """Every metric family that docs/CONTRACT.md's 'Prometheus metrics' section names is in the scrape."""
    problems = Problems()
    types, samples = parse_exposition(open(args.scrape, encoding="utf-8").read())
    contract = open(args.contract, encoding="utf-8").read()
    section = re.search(r"^## Prometheus metrics\n(.*?)(?=^## |\Z)", contract, re.S | re.M)
    if not problems.require(section, "CONTRACT.md has no '## Prometheus metrics' section"):
        problems.exit("contract metrics")
    checked = 0
    for line in section.group(1).splitlines():
        names = METRIC_NAME.findall(line)
        is_histogram = "histogram" in line
        for name in names:
            checked += 1
            if is_histogram:
                kind = types.get(name)
                problems.require(kind == "histogram",
                                 f"{name}: the contract says histogram, the scrape has "
                                 f"{'no such family' if kind is None else 'a ' + kind}")
                problems.require(f"{name}_bucket" in samples, f"{name}: no {name}_bucket series in the scrape")
            else:
                problems.require(name in types or name in samples, f"{name}: not in the scrape")
    problems.require(checked > 0, "no metric names found in the contract's metrics section")
    print(f"checked {checked} contract metric families against {len(samples)} sample names")
    problems.exit("contract metrics")


# ---------------------------------------------------------------------------------------------------------
# Grafana dashboard


def dashboard_exprs(dashboard):
    """(panel title, expr) of every query of every panel, rows' nested panels included."""
    out = []

    def walk(panels):
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    out.append((panel.get("title", "?"), target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    return out


def cmd_dashboard_metrics(args):
    """Every tallyd_* name in the dashboard's expressions can be queried in the live scrape."""
    problems = Problems()
    types, samples = parse_exposition(open(args.scrape, encoding="utf-8").read())
    exprs = dashboard_exprs(json.load(open(args.dashboard, encoding="utf-8")))
    problems.require(exprs, "the dashboard has no expressions")
    names = {}
    for title, expr in exprs:
        found = METRIC_NAME.findall(expr)
        problems.require(found, f"panel {title!r}: expression names no tallyd_ metric: {expr}")
        for name in found:
            names.setdefault(name, set()).add(title)
    for name in sorted(names):
        why = explain_name(name, types, samples)
        problems.require(why is None, f"{name} (panels {sorted(names[name])}): {why}")
    print(f"{len(exprs)} expressions name {len(names)} metrics: {', '.join(sorted(names))}")
    problems.exit("dashboard metrics")


def cmd_dashboard_lint(args):
    """The dashboard is well-formed for provisioning and points at the provisioned datasource."""
    problems = Problems()
    dashboard = json.load(open(args.dashboard, encoding="utf-8"))
    datasources = load_yaml(args.datasource).get("datasources", [])
    uids = {d.get("uid") for d in datasources}
    for key in ("uid", "title", "panels", "schemaVersion"):
        problems.require(key in dashboard, f"dashboard has no {key!r}")
    problems.require(dashboard.get("id") in (None,), "dashboard must not carry a database 'id' when provisioned")
    ids, cells = set(), {}
    for panel in dashboard.get("panels", []):
        title = panel.get("title", "?")
        pid = panel.get("id")
        problems.require(isinstance(pid, int) and pid not in ids, f"panel {title!r}: id {pid!r} missing or repeated")
        ids.add(pid)
        grid = panel.get("gridPos", {})
        if problems.require(all(k in grid for k in "xywh"), f"panel {title!r}: gridPos needs x, y, w, h"):
            problems.require(grid["x"] + grid["w"] <= 24, f"panel {title!r}: wider than the 24-column grid")
            for x in range(grid["x"], grid["x"] + grid["w"]):
                for y in range(grid["y"], grid["y"] + grid["h"]):
                    other = cells.get((x, y))
                    problems.require(other is None or other == title, f"panels {title!r} and {other!r} overlap")
                    cells[(x, y)] = title
        for target in panel.get("targets", []) + [panel]:
            ds = target.get("datasource")
            if ds is not None:
                problems.require(isinstance(ds, dict) and ds.get("uid") in uids,
                                 f"panel {title!r}: datasource {ds!r} is not a provisioned uid {sorted(uids)}")
        for target in panel.get("targets", []):
            expr = target.get("expr", "")
            problems.require(expr.count("(") == expr.count(")"), f"panel {title!r}: unbalanced parentheses: {expr}")
    print(f"{len(ids)} panels, datasource uids {sorted(uids)}")
    problems.exit("dashboard lint")


def prometheus_query(base_url, query, timeout_s=5):
    url = f"{base_url}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return json.load(response)


def cmd_dashboard_queries(args):
    """Every dashboard expression runs in a live Prometheus and returns at least one series."""
    problems = Problems()
    exprs = dashboard_exprs(json.load(open(args.dashboard, encoding="utf-8")))
    deadline = time.monotonic() + args.timeout_s
    for title, expr in exprs:
        query = expr.replace("$__rate_interval", RATE_INTERVAL_FOR_TEST).replace("$__interval", "5s")
        last = None
        while True:
            try:
                answer = prometheus_query(args.prometheus, query)
                last = answer
                if answer.get("status") == "success" and answer["data"]["result"]:
                    break
                if answer.get("status") != "success":
                    break  # a PromQL error does not heal by waiting
            except Exception as error:  # noqa: BLE001 - reported below
                last = {"status": "error", "error": str(error)}
            if time.monotonic() > deadline:
                break
            time.sleep(1)
        ok = last and last.get("status") == "success" and last["data"]["result"]
        if problems.require(ok, f"panel {title!r}: {query} -> {json.dumps(last)[:300]}"):
            values = [r.get("value", [None, None])[1] for r in last["data"]["result"]]
            print(f"  ok {title!r}: {query} -> {values[:6]}")
    problems.exit("dashboard queries")


# ---------------------------------------------------------------------------------------------------------
# Prometheus configuration for the test


def cmd_prom_config(args):
    """Writes a copy of prometheus.yml with the tallyd target and intervals rewritten for the test."""
    problems = Problems()
    config = load_yaml(args.source)
    jobs = [j for j in config.get("scrape_configs", []) if j.get("job_name") == "tallyd"]
    if not problems.require(len(jobs) == 1, "prometheus.yml needs exactly one scrape job named 'tallyd'"):
        problems.exit("prometheus config")
    for section in [config.setdefault("global", {})] + jobs:
        section["scrape_interval"] = args.interval
        section["scrape_timeout"] = args.interval
        if "evaluation_interval" in section:
            section["evaluation_interval"] = args.interval
    targets = [t for sc in jobs[0].get("static_configs", []) for t in sc.get("targets", [])]
    problems.require(targets == ["tallyd:8080"], f"the tallyd job's targets are {targets}, expected ['tallyd:8080']")
    jobs[0]["static_configs"] = [{"targets": [args.target]}]
    import yaml

    with open(args.output, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    print(f"wrote {args.output}: job tallyd -> {args.target} every {args.interval}")
    problems.exit("prometheus config")


# ---------------------------------------------------------------------------------------------------------
# docker-compose.yaml and its cross-file consistency


def port_of(listen):
    return int(str(listen).rsplit(":", 1)[1])


def cmd_compose(args):
    """The compose file, prometheus.yml, Grafana provisioning and the Dockerfile agree with each other."""
    problems = Problems()
    root = os.path.dirname(os.path.abspath(args.compose))
    compose = load_yaml(args.compose)
    services = compose.get("services", {})
    for name in ("tallyd", "prometheus", "grafana"):
        problems.require(name in services, f"no service {name!r}")
    if problems.items:
        problems.exit("compose consistency")
    declared_volumes = set((compose.get("volumes") or {}).keys())
    for name, service in services.items():
        problems.require("healthcheck" in service, f"service {name!r} has no healthcheck")
        for dep, spec in (service.get("depends_on") or {}).items():
            problems.require(isinstance(spec, dict) and "condition" in spec, f"{name} -> {dep}: depends_on needs a condition")
            problems.require(dep in services, f"{name} depends on unknown service {dep!r}")
        for port in service.get("ports", []):
            problems.require(str(port).startswith("127.0.0.1:"), f"{name}: port {port} is published beyond loopback")
        for volume in service.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if source.startswith((".", "/")):
                problems.require(os.path.exists(os.path.join(root, source)), f"{name}: bind source {source} missing")
            else:
                problems.require(source in declared_volumes, f"{name}: named volume {source!r} not declared")
    tallyd = services["tallyd"]
    build = tallyd.get("build", {})
    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    problems.require(os.path.exists(os.path.join(root, context, dockerfile)), f"tallyd: no {dockerfile} in {context}")
    env = tallyd.get("environment", {})
    listen_port = port_of(env.get("TALLYD_LISTEN", "0.0.0.0:8080"))
    problems.require(any(str(p).endswith(f":{listen_port}") for p in tallyd.get("ports", [])),
                     f"tallyd: no port mapping to its listen port {listen_port}")
    db_dir = os.path.dirname(env.get("TALLYD_DB", "/var/lib/tallyd/users.db"))
    problems.require(any(str(v).split(":")[1] == db_dir for v in tallyd.get("volumes", []) if ":" in str(v)),
                     f"tallyd: the database directory {db_dir} is not on a volume")

    # prometheus.yml is mounted, and scrapes the tallyd service on its listen port.
    prom = services["prometheus"]
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in prom.get("volumes", [])}
    config_path = next((a.split("=", 1)[1] for a in prom.get("command", []) if a.startswith("--config.file=")),
                       "/etc/prometheus/prometheus.yml")
    problems.require(mounts.get(config_path) == "./prometheus.yml", f"prometheus: ./prometheus.yml not mounted at {config_path}")
    prom_config = load_yaml(os.path.join(root, "prometheus.yml"))
    targets = [t for job in prom_config.get("scrape_configs", []) for sc in job.get("static_configs", [])
               for t in sc.get("targets", [])]
    problems.require(f"tallyd:{listen_port}" in targets, f"prometheus.yml does not scrape tallyd:{listen_port}: {targets}")

    # Grafana: provisioning mounted, datasource points at the prometheus service, dashboards path mounted.
    grafana = services["grafana"]
    gmounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in grafana.get("volumes", [])}
    provisioning = gmounts.get("/etc/grafana/provisioning")
    problems.require(provisioning is not None, "grafana: nothing mounted at /etc/grafana/provisioning")
    if provisioning:
        ds_file = os.path.join(root, provisioning, "datasources", "prometheus.yaml")
        datasources = load_yaml(ds_file).get("datasources", [])
        urls = [d.get("url") for d in datasources]
        problems.require("http://prometheus:9090" in urls, f"grafana datasource urls {urls} miss http://prometheus:9090")
        providers = load_yaml(os.path.join(root, provisioning, "dashboards", "tallyd.yaml")).get("providers", [])
        for provider in providers:
            path = provider.get("options", {}).get("path")
            host = gmounts.get(path)
            if problems.require(host is not None, f"grafana: dashboard provider path {path} is not mounted"):
                found = [f for f in os.listdir(os.path.join(root, host)) if f.endswith(".json")]
                problems.require(found, f"grafana: no dashboard JSON in {host}")
        home = grafana.get("environment", {}).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
        if home:
            container_dir, file = os.path.split(home)
            host = gmounts.get(container_dir)
            problems.require(host and os.path.exists(os.path.join(root, host, file)), f"grafana: home dashboard {home} is not a mounted file")
    print(f"services {sorted(services)}, volumes {sorted(declared_volumes)}, tallyd port {listen_port}")
    problems.exit("compose consistency")


# ---------------------------------------------------------------------------------------------------------
# Dockerfile and .dockerignore


def dockerfile_instructions(path):
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for raw in open(path, encoding="utf-8"):
        line = raw.rstrip("\n")
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.strip().partition(" ")
        out.append((word.upper(), " ".join(rest.split())))
    return out


def expand_args(text, values):
    """Replaces ${NAME} and $NAME by the values of global ARGs; unknown names are left as they are."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)


def cmd_dockerfile(args):
    """Sanity of the Dockerfile without a Docker engine: stages, build command, user, health, port, data."""
    problems = Problems()
    instructions = dockerfile_instructions(args.dockerfile)
    # Base images come from ARGs before the first FROM (CI passes stand-ins through them): check their defaults,
    # which are what `docker build` uses.
    global_args = {}
    for i, a in instructions:
        if i == "FROM":
            break
        if i == "ARG" and "=" in a:
            name, _, default = a.partition("=")
            global_args[name.strip()] = expand_args(default.strip().strip('"'), global_args)
    froms = [expand_args(a, global_args) for i, a in instructions if i == "FROM"]
    problems.require(all("$" not in f for f in froms), f"a FROM names an ARG without a default: {froms}")
    problems.require(len(froms) >= 2, "expected a multi-stage build")
    problems.require(froms and froms[0].startswith("rust:"), f"the build stage is not the official Rust image: {froms[:1]}")
    problems.require(froms and froms[-1].split()[0] in ("debian:bookworm-slim", "gcr.io/distroless/cc-debian12"),
                     f"the runtime stage is {froms[-1:]}")
    runs = [a for i, a in instructions if i == "RUN"]
    builds = [r for r in runs if "cargo " in r]
    problems.require(builds == [args.build_command],
                     f"the image's cargo command(s) {builds} differ from CI's {args.build_command!r}")
    users = [a for i, a in instructions if i == "USER"]
    problems.require(users and users[-1].split(":")[0] not in ("root", "0"), f"the image runs as root: USER {users}")
    health = [a for i, a in instructions if i == "HEALTHCHECK"]
    problems.require(health and "/healthz" in health[-1], f"no HEALTHCHECK on /healthz: {health}")
    env = " ".join(a for i, a in instructions if i == "ENV")
    listen = re.search(r"TALLYD_LISTEN=(\S+)", env)
    db = re.search(r"TALLYD_DB=(\S+)", env)
    problems.require(listen and listen.group(1).startswith("0.0.0.0:"), "TALLYD_LISTEN=0.0.0.0:PORT is not set")
    exposes = " ".join(a for i, a in instructions if i == "EXPOSE").split()
    if listen:
        port = str(port_of(listen.group(1)))
        problems.require(port in exposes or f"{port}/tcp" in exposes, f"EXPOSE {exposes} lacks the listen port {port}")
        # The check either names the listen port or takes it from TALLYD_LISTEN when it runs.
        problems.require(health and (f":{port}/healthz" in health[-1] or "${TALLYD_LISTEN##*:}" in health[-1]),
                         "HEALTHCHECK does not use the listen port")
    volumes = " ".join(a for i, a in instructions if i == "VOLUME")
    problems.require(db and os.path.dirname(db.group(1)) in volumes, f"TALLYD_DB {db and db.group(1)} is not on a VOLUME ({volumes})")
    cargo = open(args.cargo_toml, encoding="utf-8").read()
    bins = re.findall(r'\[\[bin\]\]\s*name\s*=\s*"([^"]+)"', cargo) or re.findall(r'^name\s*=\s*"([^"]+)"', cargo, re.M)[:1]
    copies = [a for i, a in instructions if i == "COPY" and "--from=" in a]
    problems.require(any(f"target/release/{b}" in c for c in copies for b in bins),
                     f"no COPY --from of target/release/{bins} into the runtime stage: {copies}")
    entry = [a for i, a in instructions if i == "ENTRYPOINT"]
    problems.require(entry and "tallyd" in entry[-1], f"ENTRYPOINT {entry} does not run tallyd")
    print(f"stages {froms}; build {builds}; USER {users[-1:] or None}; EXPOSE {exposes}")
    problems.exit("Dockerfile sanity")


def dockerignore_patterns(path):
    patterns = []
    for line in open(path, encoding="utf-8"):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        patterns.append((negate, os.path.normpath(line.lstrip("!").strip("/"))))
    return patterns


def ignored(rel, patterns):
    """Docker's rule: the last pattern matching the path or one of its parent directories decides."""
    parts = rel.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for negate, pattern in patterns:
        for candidate in candidates:
            if pattern.startswith("**/"):
                hit = fnmatch.fnmatchcase(candidate, pattern[3:]) or any(
                    fnmatch.fnmatchcase("/".join(candidate.split("/")[k:]), pattern[3:])
                    for k in range(len(candidate.split("/"))))
            else:
                hit = fnmatch.fnmatchcase(candidate, pattern) and candidate.count("/") == pattern.count("/")
            if hit:
                verdict = not negate
                break
    return verdict


def cmd_dockerignore(args):
    """The build context that .dockerignore leaves holds everything `cargo build --locked` reads."""
    problems = Problems()
    root = os.path.abspath(args.root)
    patterns = dockerignore_patterns(os.path.join(root, ".dockerignore"))
    files = subprocess.run(["git", "-C", root, "ls-files", "--cached", "--others", "--exclude-standard"],
                           check=True, capture_output=True, text=True).stdout.split()
    context = {f for f in files if not ignored(f, patterns)}
    for must_go in ("target/release/tallyd", ".git/HEAD", "loadtest/target/x", "users.db", "users.db-wal"):
        problems.require(ignored(must_go, patterns), f"{must_go} would be sent into the build context")
    needed = {"Cargo.toml", "Cargo.lock"}
    # Sources of the crate, and every file they include at compile time (the seed among them).
    for f in sorted(context):
        if f.endswith(".rs") and f.startswith(("src/", "build.rs")):
            needed.add(f)
            text = open(os.path.join(root, f), encoding="utf-8", errors="replace").read()
            for call in re.findall(r"include_(?:str|bytes)!\((.*?)\)\s*;", text, re.S):
                literals = re.findall(r'"([^"]+)"', call)
                if not literals:
                    continue
                if "CARGO_MANIFEST_DIR" in call:
                    path = os.path.join(root, literals[-1].lstrip("/"))
                else:
                    path = os.path.join(root, os.path.dirname(f), literals[-1])
                needed.add(os.path.relpath(os.path.normpath(path), root))
    # Workspace members, if the manifest declares any.
    cargo = open(os.path.join(root, "Cargo.toml"), encoding="utf-8").read()
    members = re.search(r"members\s*=\s*\[(.*?)\]", cargo, re.S)
    for member in re.findall(r'"([^"]+)"', members.group(1)) if members else []:
        needed.add(f"{member}/Cargo.toml")
    for f in sorted(needed):
        if f in context:
            continue
        if ignored(f, patterns):
            problems.add(f"{f} is needed by the build but .dockerignore excludes it")
        elif os.path.exists(os.path.join(root, f)):
            # Present here but neither tracked nor allowed by .gitignore: a fresh clone (CI's, or one that
            # `docker build` runs in) will not have it.
            problems.add(f"{f} is needed by the build but git ignores it (check `git check-ignore -v {f}`): "
                         "a fresh clone cannot build")
        else:
            problems.add(f"{f} is needed by the build but does not exist")
    print(f"build context: {len(context)} of {len(files)} files; checked {len(needed)} needed files "
          f"({', '.join(sorted(n for n in needed if not n.endswith('.rs')))})")
    problems.exit(".dockerignore")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("contract-metrics"); p.add_argument("contract"); p.add_argument("scrape")
    p.set_defaults(run=cmd_contract_metrics)
    p = sub.add_parser("dashboard-metrics"); p.add_argument("dashboard"); p.add_argument("scrape")
    p.set_defaults(run=cmd_dashboard_metrics)
    p = sub.add_parser("dashboard-lint"); p.add_argument("dashboard"); p.add_argument("datasource")
    p.set_defaults(run=cmd_dashboard_lint)
    p = sub.add_parser("dashboard-queries"); p.add_argument("dashboard"); p.add_argument("prometheus")
    p.add_argument("--timeout-s", type=float, default=30)
    p.set_defaults(run=cmd_dashboard_queries)
    p = sub.add_parser("prom-config"); p.add_argument("source"); p.add_argument("output")
    p.add_argument("--target", required=True); p.add_argument("--interval", default="1s")
    p.set_defaults(run=cmd_prom_config)
    p = sub.add_parser("compose"); p.add_argument("compose")
    p.set_defaults(run=cmd_compose)
    p = sub.add_parser("dockerfile"); p.add_argument("dockerfile"); p.add_argument("cargo_toml")
    p.add_argument("--build-command", default="cargo build --release --locked")
    p.set_defaults(run=cmd_dockerfile)
    p = sub.add_parser("dockerignore"); p.add_argument("root")
    p.set_defaults(run=cmd_dockerignore)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
