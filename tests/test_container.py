"""The Dockerfile, replayed without a container engine, builds an image whose
``tollway`` starts and serves; the compose and Kubernetes manifests set only
what the code reads.

No container engine runs here, so ``test_dockerfile_replay_starts_and_serves``
plays the Dockerfile's instructions (FROM, ARG, ENV, WORKDIR, COPY, RUN, CMD,
HEALTHCHECK) in a temporary root: every absolute path of the image lives
under it, ``python`` is this machine's interpreter (3.11, as the
python:3.11-slim base), and pip reaches packages the way this machine's pip
does. It builds a clean virtualenv exactly as the image does, then starts
the image's CMD against the test Postgres and Redis, waits for /readyz,
sends one request to the echo model and runs the HEALTHCHECK command.
Two things are not replayed: creating the image's system user (a change to
this machine's /etc/passwd) and binding 0.0.0.0 (only loopback is used here);
and pip may use this machine's wheel cache (the image's PIP_NO_CACHE_DIR only
keeps a cache out of the image; what gets installed is the same).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import yaml

from tests.billing_helpers import billing_config, tenant_with_key
from tests.test_deploy import (
    COMPOSE,
    DOCKERFILE,
    K8S,
    ROOT,
    _compose,
    _configmap_text,
    _dockerignored,
    _gateway_container,
    _instructions,
    _k8s_docs,
    _one,
)
from tests.waiting import until

# Paths of the image that are not the image's own files: left alone.
HOST_PATHS = ("/dev/", "/proc/", "/sys/")
# Variables the interpreter or the shell reads, not Tollway.
RUNTIME_ENV = {"PATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "HOME"}


class Replay:
    """The Dockerfile's instructions, played under ``root``."""

    def __init__(self, root: Path, bin_dir: Path) -> None:
        self.root = root
        self.bin_dir = bin_dir  # holds `python`, as /usr/local/bin does in the base image
        self.args: dict[str, str] = {}
        self.env: dict[str, str] = {}
        self.cwd = root
        self.stage = ""
        self.stages: list[str] = []
        self.final: dict[str, str] = {}  # CMD, HEALTHCHECK, EXPOSE, USER of the last stage

    def path(self, value: str) -> str:
        """An image path under the replay root (other text unchanged)."""

        def mapped(m: re.Match[str]) -> str:
            p = m.group(0)
            return p if p.startswith(HOST_PATHS) else str(self.root) + p

        return re.sub(r"(?<![\w.$:/])/[A-Za-z][\w./-]*", mapped, value)

    def expand(self, value: str) -> str:
        env = {**self.args, **self.env}
        return re.sub(
            r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), value
        )

    def base_env(self) -> dict[str, str]:
        # What the base image and this machine's pip set-up provide: the
        # interpreter on PATH, and how pip reaches packages from here.
        passed = {k: v for k, v in os.environ.items() if k.startswith("PIP_")}
        return {
            **passed,
            "PATH": f"{self.bin_dir}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.root / "root"),
            "LANG": "C.UTF-8",
        }

    def play(self) -> None:
        for op, rest in _instructions():
            getattr(self, "op_" + op.lower())(rest)

    def op_arg(self, rest: str) -> None:
        name, _, default = rest.partition("=")
        self.args[name] = shlex.split(default)[0] if default.strip() else ""

    def op_from(self, rest: str) -> None:
        words = rest.split()
        self.stage = words[-1] if "AS" in (w.upper() for w in words) else f"stage{len(self.stages)}"
        self.stages.append(self.stage)
        self.env = self.base_env()
        self.cwd = self.root
        self.root.mkdir(parents=True, exist_ok=True)
        self.final = {}

    def op_env(self, rest: str) -> None:
        for pair in shlex.split(rest):
            name, _, value = pair.partition("=")
            if name == "PIP_NO_CACHE_DIR":
                continue  # the image keeps no pip cache; this replay reuses the machine's
            self.env[name] = self.path(self.expand(value))

    def op_workdir(self, rest: str) -> None:
        self.cwd = Path(self.path(self.expand(rest)))
        self.cwd.mkdir(parents=True, exist_ok=True)

    def op_copy(self, rest: str) -> None:
        words = shlex.split(rest)
        from_stage = next((w.split("=", 1)[1] for w in words if w.startswith("--from=")), None)
        *sources, dest = [w for w in words if not w.startswith("--")]
        target = Path(self.path(dest)) if dest.startswith("/") else self.cwd / dest
        for source in sources:
            if from_stage is not None:  # another stage's file: same root, same path
                src = Path(self.path(source))
                if src.resolve() != target.resolve():
                    _copy(src, target, into=dest.endswith("/"))
            elif source == ".":
                self._copy_context(target)
            else:
                _copy(ROOT / source, target, into=dest.endswith("/") or len(sources) > 1)

    def _copy_context(self, target: Path) -> None:
        """The build context: the checkout less .dockerignore (tracked files)."""
        ignore = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        patterns = [p.strip() for p in ignore if p.strip() and not p.startswith("#")]
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        for rel in listed:
            if (ROOT / rel).is_file() and not _dockerignored(rel, patterns):
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, target / rel)

    def op_run(self, rest: str) -> None:
        if self.stage == self.stages[-1] and re.match(r"groupadd .*&& useradd ", rest):
            return  # the image's system user: not created on this machine
        command = self.path(rest)
        done = subprocess.run(
            ["/bin/sh", "-c", command],
            cwd=self.cwd,
            env={**self.env, **self.args},
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, f"RUN {rest}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"

    def op_user(self, rest: str) -> None:
        self.final["USER"] = rest

    def op_expose(self, rest: str) -> None:
        self.final["EXPOSE"] = rest

    def op_healthcheck(self, rest: str) -> None:
        self.final["HEALTHCHECK"] = rest

    def op_stopsignal(self, rest: str) -> None:
        self.final["STOPSIGNAL"] = rest

    def op_cmd(self, rest: str) -> None:
        self.final["CMD"] = rest


def _copy(src: Path, target: Path, into: bool) -> None:
    dest = target / src.name if into else target
    if src.is_dir():
        shutil.copytree(src, dest, symlinks=True, dirs_exist_ok=True)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _exec_form(value: str) -> list[str]:
    argv = json.loads(value)
    assert isinstance(argv, list), "CMD must be the exec form"
    return [str(a) for a in argv]


def _build(tmp_path: Path) -> Replay:
    """Play the Dockerfile under ``tmp_path/image``; check the venv it made."""
    root = tmp_path / "image"
    bin_dir = tmp_path / "base-bin"
    bin_dir.mkdir()
    base_python = Path(getattr(sys, "_base_executable", sys.executable)).resolve()
    (bin_dir / "python").symlink_to(base_python)
    (bin_dir / "python3").symlink_to(base_python)
    replay = Replay(root, bin_dir)
    replay.play()
    venv = root / "opt" / "venv"
    assert (venv / "bin" / "python").exists(), "the image has no /opt/venv"
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import proxy; print(proxy.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=replay.cwd,
        env={"PATH": replay.env["PATH"]},
    ).stdout.strip()
    assert where.startswith(str(venv)), f"tollway imported from {where}, not the image's venv"
    assert not list(venv.rglob("test_container.py")), "the tests ended up in the image"
    return replay


def _start(replay: Replay, env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    """The image's CMD, on loopback and a free port (the only two changes)."""
    argv = _exec_form(replay.final["CMD"])
    assert argv[:2] == ["tollway", "serve"]
    argv = [replay.path(a) for a in argv]
    argv[argv.index("--host") + 1] = "127.0.0.1"
    argv += ["--port", str(port)]
    exe = shutil.which(argv[0], path=env["PATH"])
    assert exe is not None and exe.startswith(str(replay.root)), f"tollway resolves to {exe}"
    with open(log, "wb") as out:
        return subprocess.Popen(
            [exe, *argv[1:]], cwd=replay.cwd, env=env, stdout=out, stderr=subprocess.STDOUT
        )


def _healthcheck(replay: Replay, env: dict[str, str], port: int) -> None:
    """The image's HEALTHCHECK command, aimed at this port."""
    check = replay.final["HEALTHCHECK"].split("CMD", 1)[1].strip().replace("8080", str(port))
    done = subprocess.run(_exec_form(check), env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def _stop(proc: subprocess.Popen[bytes]) -> None:
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_dockerfile_replay_starts_and_serves(
    pg_url: str, pg: asyncpg.Pool, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    replay = await asyncio.to_thread(_build, tmp_path)
    secret = "container-replay-secret"
    monkeypatch.setenv("TOLLWAY_KEY_SECRET", secret)
    _, key = await tenant_with_key(pg, tmp_path, "pro")
    env = {
        **{k: v for k, v in replay.env.items() if not k.startswith("PIP_")},
        "DATABASE_URL": pg_url,
        "REDIS_URL": redis_url,
        "TOLLWAY_KEY_SECRET": secret,
        "TOLLWAY_ADMIN_KEY": "container-replay-admin",
    }
    port = _free_port()
    log = tmp_path / "tollway.log"
    proc = _start(replay, env, port, log)
    url = f"http://127.0.0.1:{port}"
    try:

        async def ready() -> bool:
            assert proc.poll() is None, f"tollway exited: {log.read_text()[-3000:]}"
            try:
                async with aiohttp.ClientSession() as s, s.get(url + "/readyz") as r:
                    return r.status == 200 and (await r.json())["redis"] == "up"
            except aiohttp.ClientError:
                return False

        await until(ready, limit=60, interval=0.2, what="/readyz answers 200 with Redis up")
        body = {"model": "echo", "messages": [{"role": "user", "content": "hello image"}]}
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                url + "/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {key['api_key']}"},
            ) as r,
        ):
            assert r.status == 200, await r.text()
            reply = await r.json()
        assert reply["choices"][0]["message"]["content"] == "hello image"
        await asyncio.to_thread(_healthcheck, replay, env, port)
    finally:
        await asyncio.to_thread(_stop, proc)
    assert proc.returncode == 0, log.read_text()[-3000:]


# ------------------------------------- manifests against what the code reads

_READS = (
    r"environ(?:\.get)?\s*[\(\[]\s*\"([A-Z][A-Z0-9_]+)\"",
    r"\benv(?:\.get)?\s*[\(\[]\s*\"([A-Z][A-Z0-9_]+)\"",
    r"getenv\(\s*\"([A-Z][A-Z0-9_]+)\"",
    r"^\s*\w*ENV\w*\s*=\s*\"([A-Z][A-Z0-9_]+)\"",  # a name constant read via environ
)


def _code_reads() -> set[str]:
    """Every environment variable Tollway's code reads."""
    names: set[str] = set()
    for path in (ROOT / "proxy").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for pattern in _READS:
            names |= set(re.findall(pattern, text, re.MULTILINE))
    return names


def _config_refs(text: str) -> set[str]:
    """``${NAME}``/``${NAME:-}`` references of a config the deployment mounts."""
    return set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", text))


def _read_by(config_text: str) -> set[str]:
    return _code_reads() | _config_refs(config_text) | RUNTIME_ENV


def test_the_code_reads_what_it_is_known_to() -> None:
    reads = _code_reads()  # the scanner itself finds the variables the README names
    assert {"DATABASE_URL", "REDIS_URL", "TOLLWAY_KEY_SECRET", "TOLLWAY_ADMIN_KEY"} <= reads
    assert {"TOLLWAY_CONFIG", "TOLLWAY_PG_STATEMENT_CACHE", "TOLLWAY_LOOP_LAG_MS"} <= reads


def test_compose_sets_only_variables_the_code_reads() -> None:
    config = (ROOT / "config" / "tollway.yaml").read_text(encoding="utf-8")  # ../config mount
    read = _read_by(config)
    for name, service in _compose()["services"].items():
        if "tollway" not in str(service.get("image", "")):
            continue
        env = service.get("environment", {})
        keys = {str(e).partition("=")[0] for e in env} if isinstance(env, list) else set(env)
        unread = sorted(keys - read)
        assert not unread, f"compose service {name} sets {unread}, which nothing reads"


def test_kubernetes_sets_only_variables_the_code_reads() -> None:
    read = _read_by(_configmap_text())
    container = _gateway_container()
    keys = {e["name"] for e in container.get("env", [])}
    secret = next(d for d in _k8s_docs_with_example() if d.get("kind") == "Secret")
    keys |= set(secret.get("stringData", {})) | set(secret.get("data", {}))
    unread = sorted(keys - read)
    assert not unread, f"the Deployment/Secret set {unread}, which nothing reads"


def _k8s_docs_with_example() -> list[dict[str, Any]]:
    text = (K8S / "secret.example.yaml").read_text(encoding="utf-8")
    return [*_k8s_docs(), *(d for d in yaml.safe_load_all(text) if d)]


def test_dockerfile_sets_only_variables_the_code_reads() -> None:
    read = _read_by("") | {"PIP_NO_CACHE_DIR", "PIP_DISABLE_PIP_VERSION_CHECK"}  # pip's own
    for op, rest in _instructions():
        if op == "ENV":
            for pair in shlex.split(rest):
                name = pair.partition("=")[0]
                assert name in read, f"the Dockerfile sets {name}, which nothing reads"


def _served_port(config_text: str, argv: list[str]) -> int:
    if "--port" in argv:
        return int(argv[argv.index("--port") + 1])
    port = (yaml.safe_load(config_text).get("server") or {}).get("port")
    return int(port or 8080)


def test_ports_agree() -> None:
    container = _gateway_container()
    argv = [str(a) for a in (*container.get("command", []), *container.get("args", []))]
    served = _served_port(_configmap_text(), argv)
    declared = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert declared.get("http") == served, f"containerPort {declared} but tollway serves {served}"
    pod = _one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert int(pod["prometheus.io/port"]) == served
    service = _one("Service")
    for port in service["spec"]["ports"]:
        target = port["targetPort"]
        assert declared.get(target, target) == served, f"Service targets {target}"
    compose = _compose()["services"]["tollway"]
    compose_served = _served_port(
        (ROOT / "config" / "tollway.yaml").read_text(encoding="utf-8"),
        [str(a) for a in compose["command"]],
    )
    inside = {int(str(p).rsplit(":", 1)[1]) for p in compose["ports"]}
    assert inside == {compose_served}, (
        f"compose publishes {inside}, tollway serves {compose_served}"
    )
    exposed = [rest for op, rest in _instructions() if op == "EXPOSE"][-1]
    cmd = _exec_form(dict(_instructions()[::-1])["CMD"])
    dockerfile_config = (ROOT / "config" / "tollway.yaml").read_text(encoding="utf-8")
    assert int(exposed.split()[0]) == _served_port(dockerfile_config, cmd)
    assert COMPOSE.exists() and DOCKERFILE.exists()


async def test_probe_paths_are_served(
    start_gateway: Any, fake_openai: Any, pg_url: str, tmp_path: Path
) -> None:
    """Every path a probe, a scrape annotation or the HEALTHCHECK asks for
    answers 200 on a running gateway (with no credentials)."""
    container = _gateway_container()
    paths = {
        container[probe]["httpGet"]["path"]
        for probe in ("readinessProbe", "livenessProbe", "startupProbe")
        if probe in container
    }
    paths.add(
        _one("Deployment")["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"]
    )
    health = [rest for op, rest in _instructions() if op == "HEALTHCHECK"][-1]
    paths |= set(re.findall(r"127\.0\.0\.1:\d+(/\w+)", health))
    assert {"/readyz", "/healthz", "/metrics"} <= paths
    gw = await start_gateway(
        billing_config(fake_openai.url), database_url=pg_url, data_dir=tmp_path
    )
    async with aiohttp.ClientSession() as s:
        for path in sorted(paths):
            async with s.get(gw.url + path) as r:
                assert r.status == 200, f"{path}: {r.status}"
