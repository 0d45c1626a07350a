"""Deployment files: they parse, and they agree with each other and with the code.

No container engine or cluster runs here, so these are static checks of the
things that break a rollout quietly: a probe on the wrong path, a ConfigMap
mounted with subPath (hot reload never sees an edit), a Service selecting no
pod, nginx buffering SSE, a dashboard querying a metric that does not exist,
a config that the real validator would refuse at start-up.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from proxy.pipeline.registry import parse_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "docker-compose.yml"
NGINX = DEPLOY / "nginx.conf"
DASHBOARD = DEPLOY / "grafana" / "tollway-dashboard.json"
METRICS_MD = DEPLOY / "METRICS.md"
DOCKERFILE = ROOT / "Dockerfile"

# Environment every instance needs; the Secret must carry all of them.
REQUIRED_SECRET_ENV = {"DATABASE_URL", "REDIS_URL", "TOLLWAY_KEY_SECRET", "TOLLWAY_ADMIN_KEY"}
PROVIDER_KEY_ENV = {"OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY"}
# How long tollway lets open SSE streams finish after SIGTERM; the pod's
# termination grace must cover the preStop sleep plus this.
STREAM_GRACE_SECONDS = 120
# The metrics contract (deploy/METRICS.md must list at least these).
CONTRACT_METRICS = {
    "tollway_requests_total": ("counter", {"endpoint", "model", "provider", "status"}),
    "tollway_request_duration_seconds": ("histogram", {"endpoint", "model"}),
    "tollway_ttft_seconds": ("histogram", {"model"}),
    "tollway_tokens_total": ("counter", {"model", "served_model", "type", "source"}),
    "tollway_cost_usd_total": ("counter", {"model", "served_model"}),
    "tollway_unpriced_requests_total": ("counter", {"served_model", "provider"}),
    "tollway_cache_requests_total": ("counter", {"result"}),
    "tollway_ratelimit_rejections_total": ("counter", {"reason"}),
    "tollway_quota_rejections_total": ("counter", {"reason"}),
    "tollway_upstream_errors_total": ("counter", {"provider", "kind"}),
    "tollway_retries_total": ("counter", {"provider"}),
    "tollway_fallbacks_total": ("counter", {"model"}),
    "tollway_breaker_state": ("gauge", {"provider"}),
    "tollway_inflight_requests": ("gauge", set()),
    "tollway_inflight_streams": ("gauge", set()),
    "tollway_config_reload_total": ("counter", {"result"}),
    "tollway_config_version_info": ("gauge", {"version"}),
    "tollway_billing_spool_depth": ("gauge", set()),
    "tollway_settlement_lag_seconds": ("gauge", set()),
}


# --------------------------------------------------------------------- YAML


def _yaml_files() -> list[Path]:
    return sorted(p for ext in ("*.yaml", "*.yml") for p in DEPLOY.rglob(ext))


def test_expected_deploy_files_exist() -> None:
    names = {
        "docker-compose.yml",
        "nginx.conf",
        "METRICS.md",
        "grafana/tollway-dashboard.json",
        *(
            f"k8s/{n}.yaml"
            for n in (
                "deployment",
                "service",
                "hpa",
                "configmap",
                "secret.example",
                "migration-job",
                "kustomization",
            )
        ),
    }
    missing = sorted(n for n in names if not (DEPLOY / n).is_file())
    assert not missing, f"missing deploy files: {missing}"
    assert (ROOT / ".dockerignore").is_file()


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    assert docs, f"{path} holds no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"


# ---------------------------------------------------------------- Kubernetes


def _k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    return docs


def _one(kind: str) -> dict[str, Any]:
    found = [d for d in _k8s_docs() if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} under deploy/k8s, found {len(found)}"
    return found[0]


def _pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def _argv(container: dict[str, Any]) -> list[str]:
    return [str(a) for a in (*container.get("command", []), *container.get("args", []))]


def _gateway_container() -> dict[str, Any]:
    containers = _pod_spec(_one("Deployment"))["containers"]
    serving = [c for c in containers if "serve" in _argv(c)]
    assert len(serving) == 1, "the Deployment needs exactly one container running `tollway serve`"
    return serving[0]


def _flag(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _resolves_to_port(container: dict[str, Any], port: Any) -> bool:
    ports = container.get("ports", [])
    if isinstance(port, str):
        return any(p.get("name") == port for p in ports)
    return any(p.get("containerPort") == port for p in ports)


def _configmap_text() -> str:
    cm = _one("ConfigMap")
    config_path = _flag(_argv(_gateway_container()), "--config")
    assert config_path, "the gateway must be started with an explicit --config"
    key = PurePosixPath(config_path).name
    assert key in cm.get("data", {}), f"ConfigMap has no key {key!r} for --config {config_path}"
    text: str = cm["data"][key]
    return text


def test_no_manifest_pins_a_namespace() -> None:
    for doc in _k8s_docs():
        assert "namespace" not in doc.get("metadata", {}), f"{doc['kind']} pins a namespace"
    assert "namespace" not in _one("Kustomization")


@pytest.mark.parametrize(
    ("probe", "path"), [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")]
)
def test_deployment_probes(probe: str, path: str) -> None:
    c = _gateway_container()
    assert probe in c, f"gateway container has no {probe}"
    get = c[probe].get("httpGet", {})
    assert get.get("path") == path
    assert _resolves_to_port(c, get.get("port")), (
        f"{probe} port {get.get('port')!r} is not declared"
    )


def test_configmap_is_mounted_as_a_directory() -> None:
    pod = _pod_spec(_one("Deployment"))
    cm_name = _one("ConfigMap")["metadata"]["name"]
    volumes = [
        v["name"] for v in pod.get("volumes", []) if v.get("configMap", {}).get("name") == cm_name
    ]
    assert volumes, f"no volume uses ConfigMap {cm_name!r}"
    c = _gateway_container()
    mounts = [m for m in c.get("volumeMounts", []) if m["name"] in volumes]
    assert mounts, "the ConfigMap volume is not mounted in the gateway container"
    for m in mounts:
        # subPath mounts never receive ConfigMap updates: hot reload would break.
        assert "subPath" not in m and "subPathExpr" not in m, "ConfigMap mounted with subPath"
    config_path = PurePosixPath(_flag(_argv(c), "--config") or "")
    assert str(config_path.parent) in {m["mountPath"].rstrip("/") for m in mounts}
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    assert env.get("TOLLWAY_CONFIG", str(config_path)) == str(config_path)


def test_deployment_runs_locked_down() -> None:
    pod = _pod_spec(_one("Deployment"))
    c = _gateway_container()
    pod_sc, c_sc = pod.get("securityContext", {}), c.get("securityContext", {})
    assert c_sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True
    assert c_sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0
    assert c_sc.get("readOnlyRootFilesystem") is True
    assert c_sc.get("allowPrivilegeEscalation") is False


def test_deployment_takes_env_from_the_secret() -> None:
    secret = _one("Secret")
    name = secret["metadata"]["name"]
    c = _gateway_container()
    refs = {e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e}
    refs |= {
        e["valueFrom"]["secretKeyRef"]["name"]
        for e in c.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert refs == {name}, f"gateway env comes from secrets {refs}, expected {name!r}"
    keys = set(secret.get("stringData", {}))
    assert keys >= REQUIRED_SECRET_ENV | PROVIDER_KEY_ENV, (
        f"Secret lacks {REQUIRED_SECRET_ENV - keys}"
    )


def test_every_config_env_reference_is_provided() -> None:
    def strings(node: Any) -> list[str]:
        if isinstance(node, dict):
            return [s for v in node.values() for s in strings(v)]
        if isinstance(node, list):
            return [s for v in node for s in strings(v)]
        return [node] if isinstance(node, str) else []

    values = strings(yaml.safe_load(_configmap_text()))  # values only: comments may say ${VAR}
    referenced = {name for v in values for name in re.findall(r"\$\{([A-Za-z_]\w*)", v)}
    provided = set(_one("Secret").get("stringData", {}))
    provided |= {e["name"] for e in _gateway_container().get("env", [])}
    assert referenced <= provided, f"config references unset variables {referenced - provided}"


def test_secret_example_holds_placeholders_only() -> None:
    secret = _one("Secret")
    assert "data" not in secret, "use stringData so placeholders stay readable"
    for key, value in secret.get("stringData", {}).items():
        assert value == "" or "change-me" in str(value).lower(), f"{key} looks like a real value"


def test_shutdown_drains_before_kill() -> None:
    pod = _pod_spec(_one("Deployment"))
    pre_stop = _gateway_container().get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre_stop:
        slept = int(pre_stop["sleep"]["seconds"])
    else:
        cmd = pre_stop.get("exec", {}).get("command", [])
        assert cmd[:1] == ["sleep"], "preStop must sleep so load balancers stop sending first"
        slept = int(cmd[1])
    assert slept >= 5
    grace = pod.get("terminationGracePeriodSeconds", 30)
    assert grace >= slept + STREAM_GRACE_SECONDS
    # ...and the gateway's own grace is that one
    assert parse_config(_configmap_text(), env={}).server.shutdown_grace_s == STREAM_GRACE_SECONDS


def test_compose_stops_after_the_stream_grace() -> None:
    tollway = _compose()["services"]["tollway"]
    period = str(tollway.get("stop_grace_period", "10s"))
    assert _seconds(period) > STREAM_GRACE_SECONDS, "compose would kill streams mid-grace"
    workers = _flag(_command(tollway), "--workers")
    assert workers is None or workers.startswith("${") or int(workers) >= 1


def test_deployment_requests_resources() -> None:
    resources = _gateway_container().get("resources", {})
    # CPU utilisation autoscaling is computed against the CPU request.
    assert {"cpu", "memory"} <= set(resources.get("requests", {}))
    assert "memory" in resources.get("limits", {})


def test_hpa_scales_the_deployment_on_cpu() -> None:
    hpa, dep = _one("HorizontalPodAutoscaler"), _one("Deployment")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == (
        "apps/v1",
        "Deployment",
        dep["metadata"]["name"],
    )
    cpu = [m for m in hpa["spec"]["metrics"] if m.get("resource", {}).get("name") == "cpu"]
    assert cpu and cpu[0]["type"] == "Resource"
    assert 1 <= hpa["spec"].get("minReplicas", 1) <= hpa["spec"]["maxReplicas"]
    # A fixed replica count would be re-applied over the HPA's choice.
    assert "replicas" not in dep["spec"]


def test_service_selects_the_gateway_pods() -> None:
    svc, dep = _one("Service"), _one("Deployment")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    selector = svc["spec"]["selector"]
    assert selector and selector.items() <= pod_labels.items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    c = _gateway_container()
    for port in svc["spec"]["ports"]:
        assert _resolves_to_port(c, port.get("targetPort", port["port"]))


def test_migration_job_runs_tollway_migrate() -> None:
    job = _one("Job")
    assert job["apiVersion"] == "batch/v1"
    pod = _pod_spec(job)
    assert pod["restartPolicy"] in {"Never", "OnFailure"}
    (c,) = pod["containers"]
    assert _argv(c) == ["tollway", "migrate"]
    # Migrations must come from the same build as the code that needs them.
    assert c["image"] == _gateway_container()["image"]
    refs = {e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e}
    assert _one("Secret")["metadata"]["name"] in refs


def test_kustomization_lists_every_manifest_but_the_example_secret() -> None:
    listed = set(_one("Kustomization")["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    # Applying placeholder secrets would overwrite the real ones.
    assert listed == on_disk - {"secret.example.yaml"}


def test_configmap_config_passes_the_validator() -> None:
    text = _configmap_text()
    bare = parse_config(text, env={})  # optional ${VAR:-} only: starts with no provider keys
    full = parse_config(text, env={k: "sk-placeholder" for k in PROVIDER_KEY_ENV})
    assert [p.name for p in full.providers.values() if p.disabled_reason] == []
    assert bare.providers.keys() == full.providers.keys()
    assert full.auth == "keys", "a deployed gateway must require API keys"
    c = _gateway_container()
    port = int(_flag(_argv(c), "--port") or full.server.port)
    assert _resolves_to_port(c, port), f"gateway listens on {port}, not a declared container port"


# ---------------------------------------------------------------- compose


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return data


def _command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(str(e).partition("=")[::2] for e in env)
    return {k: str(v) for k, v in env.items()}


def _condition(service: dict[str, Any], dep: str) -> str | None:
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return "service_started" if dep in deps else None
    return deps.get(dep, {}).get("condition", "service_started") if dep in deps else None


def test_compose_services_and_start_order() -> None:
    services = _compose()["services"]
    assert {"tollway", "postgres", "redis", "migrate"} <= services.keys()
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["redis"]["image"].startswith("redis:7")
    for name in ("postgres", "redis"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    tollway, migrate = services["tollway"], services["migrate"]
    assert _condition(tollway, "migrate") == "service_completed_successfully"
    assert _condition(migrate, "postgres") == "service_healthy"
    assert _condition(tollway, "redis") == "service_healthy"
    assert _command(migrate) == ["tollway", "migrate"]
    assert _command(tollway)[:2] == ["tollway", "serve"]


def test_compose_mounts_the_config_directory() -> None:
    tollway = _compose()["services"]["tollway"]
    config = PurePosixPath(_flag(_command(tollway), "--config") or "")
    assert config.name, "compose must pass --config"
    for spec in tollway.get("volumes", []):
        source, target = str(spec).split(":")[:2]
        if str(config.parent) == target.rstrip("/"):
            src = (DEPLOY / source).resolve()
            assert src.is_dir(), "mount the directory, so edits reach the running gateway"
            parse_config((src / config.name).read_text(encoding="utf-8"), env={})
            return
    pytest.fail(f"no volume mounts {config.parent}")


def test_compose_has_no_literal_secrets() -> None:
    required = {"TOLLWAY_KEY_SECRET", "TOLLWAY_ADMIN_KEY", "POSTGRES_PASSWORD"}
    for name, service in _compose()["services"].items():
        for key, value in _environment(service).items():
            if re.search(r"SECRET|PASSWORD|_KEY$", key):
                assert re.fullmatch(r"\$\{\w+(:?[-?][^}]*)?\}", value), f"{name}.{key}: {value!r}"
            if key in required:
                assert value.startswith("${" + key + ":?"), f"{name}.{key} must be required"
            for password in re.findall(r"://[^:/@]+:([^@]*)@", value):
                assert password.startswith("${"), f"{name}.{key} embeds a password"


# ---------------------------------------------------------------- nginx


@dataclass
class _Block:
    args: list[str]
    directives: list[tuple[str, list[str]]] = field(default_factory=list)
    blocks: list[tuple[str, _Block]] = field(default_factory=list)

    def get(self, name: str) -> list[list[str]]:
        return [args for n, args in self.directives if n == name]

    def children(self, name: str) -> list[_Block]:
        return [b for n, b in self.blocks if n == name]


_NGINX_TOKEN = re.compile(r"#[^\n]*|\"(?:\\.|[^\"\\])*\"|'(?:\\.|[^'\\])*'|[{};]|[^\s{};\"'#]+")


def _parse_nginx(text: str) -> _Block:
    root = _Block([])
    stack, words = [root], []
    for tok in _NGINX_TOKEN.findall(text):
        if tok.startswith("#"):
            continue
        if tok == ";":
            stack[-1].directives.append((words[0], words[1:]))
            words = []
        elif tok == "{":
            block = _Block(words[1:])
            stack[-1].blocks.append((words[0], block))
            stack.append(block)
            words = []
        elif tok == "}":
            stack.pop()
        else:
            words.append(tok[1:-1] if tok[:1] in "\"'" else tok)
    assert len(stack) == 1 and not words, "unbalanced nginx.conf"
    return root


def _location_for(server: _Block, uri: str) -> _Block:
    """The location nginx picks for ``uri``: exact, then ^~/longest prefix, then regex."""
    prefix: tuple[int, _Block | None, bool] = (-1, None, False)
    for loc in server.children("location"):
        mod, arg = (loc.args[0], loc.args[1]) if len(loc.args) == 2 else ("", loc.args[0])
        if mod == "=" and arg == uri:
            return loc
        if mod in ("", "^~") and uri.startswith(arg) and len(arg) > prefix[0]:
            prefix = (len(arg), loc, mod == "^~")
    if prefix[1] is not None and prefix[2]:
        return prefix[1]
    for loc in server.children("location"):
        if loc.args[0] in ("~", "~*"):
            flags = re.IGNORECASE if loc.args[0] == "~*" else 0
            if re.search(loc.args[1], uri, flags):
                return loc
    assert prefix[1] is not None, f"no location serves {uri}"
    return prefix[1]


class _Effective:
    """Directive values as nginx resolves them: the innermost level that sets one wins."""

    def __init__(self, *levels: _Block) -> None:
        self.levels = levels

    def value(self, name: str) -> list[str] | None:
        for level in reversed(self.levels):
            if found := level.get(name):
                return found[-1]
        return None

    def headers(self) -> dict[str, str]:
        # proxy_set_header is all-or-nothing: one at an inner level drops all outer ones.
        for level in reversed(self.levels):
            if found := level.get("proxy_set_header"):
                return {a[0].lower(): " ".join(a[1:]) for a in found}
        return {}


def _seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+)(ms|s|m|h|d)?", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"bad nginx time {value!r}"
    return sum(int(n) * units[u or "s"] for n, u in parts)


def _bytes(value: str) -> int:
    m = re.fullmatch(r"(\d+)([kKmMgG]?)", value)
    assert m, f"bad nginx size {value!r}"
    return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]


def _nginx() -> tuple[_Block, _Block]:
    (http,) = _parse_nginx(NGINX.read_text(encoding="utf-8")).children("http")
    servers = http.children("server")
    assert servers, "nginx.conf has no server block"
    return http, servers[0]


def _effective_for(uri: str) -> _Effective:
    http, server = _nginx()
    return _Effective(http, server, _location_for(server, uri))


def _upstream_of(eff: _Effective) -> _Block:
    http, _ = _nginx()
    proxy_pass = eff.value("proxy_pass")
    assert proxy_pass, "location does not proxy_pass"
    name = re.sub(r"^https?://", "", proxy_pass[0]).split("/")[0]
    ups = [u for u in http.children("upstream") if u.args == [name]]
    assert ups, f"proxy_pass to {name!r}, which is no upstream block"
    return ups[0]


@pytest.mark.parametrize("uri", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
def test_nginx_streams_sse_unbuffered(uri: str) -> None:
    eff = _effective_for(uri)
    assert eff.value("proxy_buffering") == ["off"]
    assert eff.value("proxy_cache") in (None, ["off"])
    assert eff.value("gzip") in (None, ["off"])
    assert eff.value("proxy_http_version") == ["1.1"]
    read_timeout = eff.value("proxy_read_timeout") or ["60s"]
    assert _seconds(read_timeout[0]) >= 300
    headers = eff.headers()
    assert headers.get("connection") == "", 'upstream keep-alive needs Connection ""'
    assert headers.get("x-request-id", "").startswith("$"), "X-Request-Id is not passed"
    upstream = _upstream_of(eff)
    assert len(upstream.get("server")) >= 2, "a load balancer needs several instances"
    assert upstream.get("keepalive"), "no keep-alive pool to the upstreams"


def test_nginx_body_limit_matches_the_gateway() -> None:
    limit = _effective_for("/v1/chat/completions").value("client_max_body_size")
    assert limit, "client_max_body_size unset: nginx would refuse bodies over 1 MiB"
    for config_text in (
        (ROOT / "config" / "tollway.yaml").read_text(encoding="utf-8"),
        _configmap_text(),
    ):
        assert _bytes(limit[0]) == parse_config(config_text, env={}).server.max_body_bytes


@pytest.mark.parametrize("uri", ["/healthz", "/readyz"])
def test_nginx_passes_health_checks_through(uri: str) -> None:
    eff = _effective_for(uri)
    upstream = _upstream_of(eff)
    assert upstream.args == _upstream_of(_effective_for("/v1/models")).args


# ---------------------------------------------------------------- Grafana


def _metrics_table() -> dict[str, tuple[str, set[str]]]:
    table = {}
    for line in METRICS_MD.read_text(encoding="utf-8").splitlines():
        if not line.startswith("| `tollway_"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        assert len(cells) == 4, f"METRICS.md row needs name|type|labels|meaning: {line}"
        name, kind, labels, meaning = cells
        table[name.strip("`")] = (kind, set(re.findall(r"`(\w+)`", labels)))
        assert meaning, f"{name} has no meaning"
    return table


def _panels(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for p in items:
        out.append(p)
        out += _panels(p.get("panels", []))
    return out


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def _expressions() -> list[str]:
    dash = _dashboard()
    exprs = [t["expr"] for p in _panels(dash["panels"]) for t in p.get("targets", [])]
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        exprs.append(query.get("query", "") if isinstance(query, dict) else str(query or ""))
    return [e for e in exprs if e]


def _base_metric(name: str, table: dict[str, tuple[str, set[str]]]) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and table.get(base, ("",))[0] == "histogram":
            return base
    return name


def test_metrics_md_lists_the_contract() -> None:
    table = _metrics_table()
    for name, (kind, labels) in CONTRACT_METRICS.items():
        assert table.get(name) == (kind, labels), f"METRICS.md: {name} should be {kind} {labels}"
    for name, (kind, _) in table.items():
        assert kind in {"counter", "gauge", "histogram"}, f"{name}: unknown type {kind}"
        assert name.endswith("_total") == (kind == "counter"), f"{name}: counter naming"


def test_dashboard_shape() -> None:
    dash = _dashboard()
    assert dash["schemaVersion"] >= 36 and dash["uid"] and dash["title"]
    panels = _panels(dash["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for p in panels:
        grid = p["gridPos"]
        assert grid["x"] + grid["w"] <= 24, f"panel {p['title']!r} overflows the grid"
        if p["type"] != "row":
            assert p.get("targets") and p.get("datasource"), f"panel {p['title']!r} queries nothing"


def test_dashboard_queries_only_documented_metrics() -> None:
    table = _metrics_table()
    exprs = _expressions()
    all_labels = set().union(*(labels for _, labels in table.values())) | {"le", "instance", "job"}
    used = set()
    for expr in exprs:
        for name in re.findall(r"\btollway_\w+", expr):
            base = _base_metric(name, table)
            assert base in table, f"{name} (in {expr!r}) is not in deploy/METRICS.md"
            used.add(base)
        for name, matchers in re.findall(r"\b(tollway_\w+)\s*\{([^}]*)\}", expr):
            base = _base_metric(name, table)
            allowed = table[base][1] | {"instance", "job"} | ({"le"} if base != name else set())
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
                assert label in allowed, f"{name} has no label {label!r} ({expr!r})"
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            for label in filter(None, (g.strip() for g in group.split(","))):
                assert label in all_labels, f"no metric has label {label!r} ({expr!r})"
    assert used == table.keys(), f"metrics without a panel: {sorted(table.keys() - used)}"


def test_dashboard_has_latency_quantiles() -> None:
    exprs = " ".join(_expressions())
    for metric in ("tollway_request_duration_seconds", "tollway_ttft_seconds"):
        for q in ("0.5", "0.99"):
            pattern = rf"histogram_quantile\(\s*{re.escape(q)}\s*,[^;]*?{metric}_bucket"
            assert re.search(pattern, exprs), f"no p{q} panel for {metric}"


# ---------------------------------------------------------------- Dockerfile


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _final_stage() -> list[tuple[str, str]]:
    ins = _instructions()
    last_from = max(i for i, (op, _) in enumerate(ins) if op == "FROM")
    return ins[last_from:]


def test_dockerfile_bases_on_python_slim() -> None:
    args = dict(rest.split("=", 1) for op, rest in _instructions() if op == "ARG" and "=" in rest)
    for op, rest in _instructions():
        if op == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), rest)
            assert image.split()[0] == "python:3.11-slim"


def test_dockerfile_runs_as_non_root() -> None:
    users = [rest for op, rest in _final_stage() if op == "USER"]
    assert users, "final stage has no USER"
    assert users[-1].split(":")[0] not in {"root", "0"}


def test_dockerfile_healthcheck_and_cmd() -> None:
    final = dict(_final_stage())
    assert "/healthz" in final.get("HEALTHCHECK", ""), "HEALTHCHECK must hit /healthz"
    assert "curl" not in final["HEALTHCHECK"], "python:slim has no curl"
    cmd = json.loads(final["CMD"])  # exec form, so tollway is PID 1 and gets SIGTERM
    assert cmd[:2] == ["tollway", "serve"]
    assert _flag(cmd, "--host") == "0.0.0.0"
    assert _flag(cmd, "--config") == "/etc/tollway/tollway.yaml"
    assert "8080" in final.get("EXPOSE", "").split()
    runs = " ".join(rest for op, rest in _instructions() if op == "RUN")
    assert re.search(r"pip install [^&;]*\"?\.(\s|\"|\$|\[)", runs), "package is not pip-installed"


def test_dockerfile_ships_the_migrations() -> None:
    final = _final_stage()
    env: dict[str, str] = {}
    for op, rest in final:
        if op == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(rest) if "=" in pair)
    copies = [rest.split() for op, rest in final if op == "COPY"]
    sql_targets = [c[-1].rstrip("/") for c in copies if c[-2].rstrip("/").endswith("sql")]
    assert sql_targets, "the image carries no sql/ migrations"
    # An installed package has no sql/ beside it: migrate finds it through the env.
    assert env.get("TOLLWAY_SQL_DIR") in sql_targets


def _dockerignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/").removeprefix("**/")
        if any(
            fnmatch.fnmatchcase(p, pat) or fnmatch.fnmatchcase(p.split("/")[-1], pat)
            for p in prefixes
        ):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_build_copies() -> None:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    patterns = [p.strip() for p in lines if p.strip() and not p.startswith("#")]
    for noise in (".git", ".venv", ".tollway"):
        assert _dockerignored(noise, patterns), f"{noise} would be sent to the build"
    needed = [
        "pyproject.toml",
        "README.md",
        "proxy/__init__.py",
        "proxy/cli.py",
        "config/tollway.yaml",
    ]
    for op, rest in _instructions():
        if op == "COPY" and "--from" not in rest:
            needed += [s for s in rest.split()[:-1] if s != "."]
    for path in needed:
        assert not _dockerignored(path, patterns), (
            f".dockerignore drops {path}, which the build needs"
        )
