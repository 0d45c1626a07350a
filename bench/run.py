"""Benchmark Tollway against its yardsticks, in one run, on one fake provider.

    .venv/bin/python bench/run.py            # full run (make bench)
    .venv/bin/python bench/run.py --quick    # smoke run of every scenario, under a minute

What is measured is what users do: chat histories of 0.5, 8 and 32 KB
(``--prompt-kb``, from ``prompts.history``), streamed and not, on the bare
pass-through and on the full billing path; then waves of long streams
(``--long-streams 200,1000``: 200 chunks 25 ms apart each, ``longstream.py``)
for events/s, CPU per event, time to first byte, inter-chunk gaps and the peak
RSS of the serving process tree; and the event-loop lag of Tollway and of the
yardsticks floor_proxy and floor_db_batch in every point (the gateway's probe
in each, ``TOLLWAY_LOOP_LAG_MS=1``, scraped from ``/metrics`` around the
window): how much of a lag figure is the machine and the load rather than
the gateway.
The issue's targets are checked against the same run in one table
(``goals.py``).

One fake provider serves every target, and the targets are measured
interleaved (each repeat walks every scenario, concurrency and target in
turn), so a ratio between two targets means something even on a noisy shared
machine. With ``taskset`` and two CPUs, the fake provider and the load
generator share CPU 0 and the proxy under test has CPU 1 to itself, as in
``bench/README.md``.

A target is a small descriptor: a name and how to start it on a port given
the fake provider's address. Adding one (floor_proxy_db.py, Tollway with
billing) is one more entry in ``TARGETS``. CPU time is that of the serving
process tree (the process and its descendants, from /proc: ``procstat``).
Every process started here is stopped by PID on the way out, Ctrl-C and
SIGTERM included.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

# bench/'s own modules (the script's directory is on sys.path).
import goals
import lag
import longrun
import orjson
import procstat
import revisions
from prompts import history

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
YARDSTICKS = BENCH  # floor_proxy.py, floor_proxy_db.py: see bench/README.md
PY = sys.executable
LOADGEN = BENCH / "loadgen.py"
LONGSTREAM = BENCH / "longstream.py"
LONG_MODEL = "bench-long"  # the fake provider answers it with a long, slow stream
LOADGEN_CPU, PROXY_CPU = "0", "1"


@dataclass(frozen=True)
class Env:
    """What a target needs to start: the fake provider's port and scratch space."""

    provider_port: int
    workdir: Path
    dsn: str | None = None
    tollway_src: Path | None = None  # an exported proxy/ package; None: the working tree
    redis_url: str | None = None  # for targets that bill: the same Redis for all
    # API keys by target name, made by a target's command before it starts.
    api_keys: dict[str, str] = field(default_factory=dict)
    loop_lag_ms: float = 1.0  # the lag probe's interval (Tollway, floor_*); 0: off
    base_src: Path | None = None  # --base-rev's export, for the *_base targets

    @property
    def upstream(self) -> str:
        return f"http://127.0.0.1:{self.provider_port}"


@dataclass(frozen=True)
class Target:
    name: str
    # argv serving OpenAI's /v1 API on the given port; None: the fake provider itself.
    command: Callable[[Env, int], list[str]] | None
    # Why this target cannot run in this environment (e.g. no Postgres), else None.
    unavailable: Callable[[Env], str | None] = lambda env: None
    tollway: bool = False  # serves /metrics with the event-loop lag probe
    # A yardstick that runs the same probe when asked (TOLLWAY_LOOP_LAG_MS):
    # floor_proxy.py, floor_proxy_db.py.
    lag_probe: bool = False

    @property
    def reads_lag(self) -> bool:
        return self.tollway or self.lag_probe


def _probe_env(env: Env) -> list[str]:
    """``env`` argv prefix turning a yardstick's lag probe on (the gateway's
    own probe, imported from this checkout), or nothing when the run has it off."""
    if not env.loop_lag_ms:
        return []
    return ["env", f"TOLLWAY_LOOP_LAG_MS={env.loop_lag_ms:g}", f"PYTHONPATH={ROOT}"]


def _floor(env: Env, port: int) -> list[str]:
    return [*_probe_env(env), PY, str(YARDSTICKS / "floor_proxy.py"), str(port), env.upstream]


def _floor_db(billing: str) -> Callable[[Env, int], list[str]]:
    def argv(env: Env, port: int) -> list[str]:
        script = str(YARDSTICKS / "floor_proxy_db.py")
        argv = [PY, script, str(port), env.upstream, env.dsn or "", "--billing", billing]
        return [*_probe_env(env), *argv]

    return argv


TOLLWAY_YAML = """\
server: {{host: 127.0.0.1, port: {port}}}
providers:
  fake:
    kind: openai
    base_url: http://127.0.0.1:{provider_port}/v1
    api_key: sk-bench-provider
models:
  - name: bench-model
    targets: [{{provider: fake}}]
  - name: bench-long
    targets: [{{provider: fake}}]
"""


# Every request but the first of each scenario is a cache hit: no provider involved.
CACHE_YAML = "cache: {enabled: true, unset_temperature: true, ttl_s: 3600}\n"
# The same, each hit read from Redis (no per-process near cache).
CACHE_REDIS_YAML = "cache: {enabled: true, unset_temperature: true, local_ttl_s: 0}\n"


# The semantic cache alone (no exact cache in front of it), on the run's
# Postgres: every request but the first of each scenario is a semantic hit
# (the fake provider's embedding of bench-embed is always the same vector)...
SEMCACHE_YAML = """\
  - name: bench-embed
    targets: [{provider: fake}]
  - name: bench-fresh
    targets: [{provider: fake}]
semantic_cache:
  enabled: true
  embedding_model: %s
  embedding_timeout_s: 2
"""
# ... and with bench-fresh (a new random vector each call) every request is a
# miss: embedding round trip, lookup, the provider's answer, the row stored.
SEMCACHE_MISS_YAML = SEMCACHE_YAML % "bench-fresh"
SEMCACHE_YAML %= "bench-embed"


# The full path: API keys, tier admission against monthly quotas leased from
# Postgres, the key's hourly window in Redis, one usage row per request, and
# (BUDGETS_YAML, in the tree measured; a --base-rev older than budgets would
# refuse the keys) a tenant's monthly and a key's daily USD budget, each
# request reserving its maximum cost from leases of both.
BUDGETS_YAML = ",\n          monthly_budget_usd: 1000000000, key_daily_budget_usd: 1000000000"
BILLING_YAML = """\
auth: keys
tiers:
  bench: {requests_per_hour: 1000000000, monthly_requests: 1000000000,
          monthly_tokens: 1000000000000, max_tokens: 4096<budgets>}
prices:
  bench-model: {prompt: 1.0, completion: 2.0}
  bench-long: {prompt: 1.0, completion: 2.0}
"""


# Traces at a sample ratio, exported to the fake provider's OTLP sink
# (accepts and discards, on loopback): what tracing costs a request.
TRACE_YAML = """\
tracing:
  enabled: true
  endpoint: http://127.0.0.1:{provider_port}/v1/traces
  sample_ratio: {ratio}
"""


def _tollway_serve(
    name: str,
    extra_yaml: str = "",
    billing: bool = False,
    base: bool = False,
    semcache: bool = False,
    budgets: bool = True,
    trace_ratio: float | None = None,
) -> Callable[[Env, int], list[str]]:
    """``tollway serve`` with TOLLWAY_YAML plus ``extra_yaml``, files named after
    the target. ``billing``: ``BILLING_YAML`` on the run's Postgres and Redis,
    with a tenant and key made first through the CLI. ``base``: the code of
    ``--base-rev`` (before/after in one run). ``semcache``: the semantic
    cache's table in the run's Postgres (``SEMANTIC_CACHE_DATABASE_URL``).
    ``budgets``: the billing tier has USD budgets (never for ``base``,
    whose config may predate them). ``trace_ratio``: ``TRACE_YAML`` at
    that sample ratio."""

    def argv(env: Env, port: int) -> list[str]:
        config = env.workdir / f"{name}.yaml"
        yaml = TOLLWAY_YAML.format(port=port, provider_port=env.provider_port) + extra_yaml
        if trace_ratio is not None:
            yaml += TRACE_YAML.format(provider_port=env.provider_port, ratio=trace_ratio)
        billing_yaml = BILLING_YAML.replace(
            "<budgets>", BUDGETS_YAML if budgets and not base else ""
        )
        config.write_text(yaml + (billing_yaml if billing else "auth: none\n"))
        tollway = str(Path(PY).parent / "tollway")
        # A private data dir: the embedded Postgres (and Redis) that serve starts
        # must not be the ones colleagues' instances use in ./.tollway/. auth: none
        # bills nothing, so Postgres only serves the start-up; Redis, a child of
        # serve, shares the proxy's CPU. A billing target uses the run's
        # Postgres and Redis instead, the ones floor_db_batch uses too.
        environ = {"TOLLWAY_DATA_DIR": str(env.workdir / f"{name}-data")}
        if env.loop_lag_ms:
            environ["TOLLWAY_LOOP_LAG_MS"] = f"{env.loop_lag_ms:g}"
        # PYTHONPATH comes before the editable install's finder: this runs the
        # export, or this checkout's proxy/ (the virtualenv's editable install
        # may point at another checkout of the repository).
        src = env.base_src if base else (env.tollway_src or ROOT)
        environ["PYTHONPATH"] = str(src)
        if billing:
            assert env.dsn is not None and env.redis_url is not None
            environ |= {"DATABASE_URL": env.dsn, "REDIS_URL": env.redis_url}
            env.api_keys[name] = _bench_key(tollway, name, config, environ)
        if semcache:
            assert env.dsn is not None
            environ["SEMANTIC_CACHE_DATABASE_URL"] = env.dsn
            migrate = {**os.environ, **environ, "DATABASE_URL": env.dsn}
            subprocess.run([tollway, "migrate"], env=migrate, check=True, timeout=120)
        return [
            *("env", *(f"{k}={v}" for k, v in environ.items())),
            *(tollway, "serve", "--migrate", "--config", str(config)),
            *("--host", "127.0.0.1", "--port", str(port)),
        ]

    return argv


def _bench_key(tollway: str, name: str, config: Path, environ: dict[str, str]) -> str:
    """A tenant on the bench tier and one API key for it, through the CLI."""

    def cli(*args: str) -> str:
        done = subprocess.run(
            [tollway, *args, "--config", str(config)],
            env={**os.environ, **environ},
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode:
            raise RuntimeError(f"tollway {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    # TOLLWAY_CONFIG: migrate reads a config too, and a --base-rev's must be its own YAML.
    migrate_env = {**os.environ, **environ, "TOLLWAY_CONFIG": str(config)}
    subprocess.run([tollway, "migrate"], env=migrate_env, check=True, timeout=120)
    tenant = f"{name}-{os.getpid()}-{int(time.time())}"
    cli("tenants", "create", tenant, "--tier", "bench")
    key: str = orjson.loads(cli("keys", "create", "--tenant", tenant, "--json"))["api_key"]
    return key


_tollway = _tollway_serve("tollway")


class Datastores:
    """The Postgres and Redis that billing targets share, for this run only:
    ``--dsn`` or an embedded Postgres, and an embedded Redis; started only
    when a target needs them, stopped by ``stop``. Unpinned by default: like
    a real database host, they are nobody's CPU in particular.
    ``--stores-cpu`` pins them to one CPU (the load generator's: the proxy's
    CPU then runs the proxy alone, as with a database on its own host)."""

    def __init__(self, workdir: Path, args: argparse.Namespace) -> None:
        self.dsn: str | None = args.dsn
        self.redis_url: str | None = None
        self._servers: list[Any] = []
        wanted = set(args.targets.split(","))
        uses_db = {"floor_db_batch", "tollway_billing", "tollway_billing_base"}
        uses_db |= {"tollway_billing_nobudget"}
        if not wanted & (uses_db | {"tollway_semcache", "tollway_semcache_miss"}):
            return
        from proxy.stores.embedded import EmbeddedPostgres, EmbeddedRedis

        pinned = os.sched_getaffinity(0)
        cpu = getattr(args, "stores_cpu", None)
        # the servers inherit it
        os.sched_setaffinity(0, {int(cpu)} if cpu is not None else range(os.cpu_count() or 1))
        try:
            if self.dsn is None:
                pg = EmbeddedPostgres(workdir / "bench-pg", cleanup="delete")
                self.dsn = pg.start()
                self._servers.append(pg)
            redis = EmbeddedRedis(workdir / "bench-redis")
            self.redis_url = redis.start()
            self._servers.append(redis)
        finally:
            os.sched_setaffinity(0, pinned)

    def pids(self) -> dict[str, int]:
        """The embedded Postgres postmaster's and Redis server's PIDs."""
        out = {}
        for server in self._servers:
            pgdata = getattr(server, "pgdata", None)
            if pgdata is not None:
                out["postgres"] = int((pgdata / "postmaster.pid").read_text().split()[0])
            elif getattr(server, "proc", None) is not None:
                out["redis"] = server.proc.pid
        return out

    def stop(self) -> None:
        for server in reversed(self._servers):
            server.stop()


def _stop_embedded_postgres(workdir: Path) -> None:
    """Safety net: serve stops its embedded Postgres on exit, but if it was
    killed the postmaster (daemonized, so not our child) would linger."""
    for pidfile in workdir.glob("*-data/postgres/postmaster.pid"):
        try:
            pid = int(pidfile.read_text().split()[0])
            os.kill(pid, signal.SIGTERM)
            print(f"bench: stopped leftover embedded Postgres (pid {pid})", file=sys.stderr)
        except (OSError, ValueError, IndexError):
            pass  # no pid file, or already gone: the normal case


def export_revision(rev: str, dest: Path) -> Path:
    """Export proxy/ and sql/ as of ``rev`` (``revisions.export``)."""
    return revisions.export(rev, dest)


def tollway_version(rev: str | None) -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True).stdout

    if rev:
        return f"{rev} = commit {git('rev-parse', '--short', rev).strip()}"
    dirty = " plus uncommitted changes in proxy/" if git("status", "--porcelain", "proxy") else ""
    return f"working tree at commit {git('rev-parse', '--short', 'HEAD').strip()}{dirty}"


def _needs_dsn(env: Env) -> str | None:
    return None if env.dsn else "no Postgres"


def _needs_base(env: Env) -> str | None:
    return None if env.base_src else "no --base-rev"


def _needs_base_dsn(env: Env) -> str | None:
    return _needs_base(env) or _needs_dsn(env)


TARGETS = [
    Target("direct", None),
    Target("floor_proxy", _floor, lag_probe=True),
    Target("floor_db_batch", _floor_db("batch"), _needs_dsn, lag_probe=True),
    Target("tollway", _tollway, tollway=True),
    Target(
        "tollway_billing",
        _tollway_serve("tollway_billing", billing=True),
        _needs_dsn,
        tollway=True,
    ),
    # The same tree without USD budgets: what budgets themselves cost.
    Target(
        "tollway_billing_nobudget",
        _tollway_serve("tollway_billing_nobudget", billing=True, budgets=False),
        _needs_dsn,
        tollway=True,
    ),
    Target("tollway_base", _tollway_serve("tollway_base", base=True), _needs_base, tollway=True),
    Target(
        "tollway_billing_base",
        _tollway_serve("tollway_billing_base", billing=True, base=True),
        _needs_base_dsn,
        tollway=True,
    ),
    # Traces sampled at 1% and at 100% (TRACE_YAML): against ``tollway``, the
    # cost of tracing per request.
    Target(
        "tollway_trace_1pct",
        _tollway_serve("tollway_trace_1pct", trace_ratio=0.01),
        tollway=True,
    ),
    Target(
        "tollway_trace_100pct",
        _tollway_serve("tollway_trace_100pct", trace_ratio=1.0),
        tollway=True,
    ),
    Target("tollway_cache", _tollway_serve("tollway_cache", CACHE_YAML), tollway=True),
    Target(
        "tollway_cache_redis",
        _tollway_serve("tollway_cache_redis", CACHE_REDIS_YAML),
        tollway=True,
    ),
    Target(
        "tollway_semcache",
        _tollway_serve("tollway_semcache", SEMCACHE_YAML, semcache=True),
        _needs_dsn,
        tollway=True,
    ),
    Target(
        "tollway_semcache_miss",
        _tollway_serve("tollway_semcache_miss", SEMCACHE_MISS_YAML, semcache=True),
        _needs_dsn,
        tollway=True,
    ),
]
DEFAULT_TARGETS = "direct,floor_proxy,floor_db_batch,tollway,tollway_billing"


@dataclass(frozen=True)
class Scenario:
    name: str
    path: str
    body: dict[str, Any]
    stream: bool = False
    prompt_kb: float = 0.0  # 0: the two-line prompt of ``_CHAT``


def sized(base: Scenario, kb: float) -> Scenario:
    """``base`` with a generated chat history of about ``kb`` KB as its messages."""
    return Scenario(base.name, base.path, {**base.body, "messages": history(kb)}, base.stream, kb)


_CHAT = {
    "model": "bench-model",
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Say hello to the benchmark."},
    ],
}
SCENARIOS = [
    Scenario("chat", "/v1/chat/completions", _CHAT),
    Scenario(
        "chat-stream",
        "/v1/chat/completions",
        {**_CHAT, "stream": True, "stream_options": {"include_usage": True}},
        stream=True,
    ),
]


class Processes:
    """Every long-lived child, stopped by PID (reverse start order) in ``stop_all``."""

    def __init__(self, pin: bool, logdir: Path) -> None:
        self.pin = pin
        self.logdir = logdir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def prefix(self, cpu: str) -> list[str]:
        return ["taskset", "-c", cpu] if self.pin else []

    def start(self, name: str, argv: list[str], cpu: str, port: int) -> None:
        # Own session: a terminal's Ctrl-C reaches only us, and we stop children in order.
        with open(self.logdir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                self.prefix(cpu) + argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append((name, proc))
        _wait_listening(name, proc, port, self.logdir / f"{name}.log")

    def pid(self, name: str) -> int:
        return next(proc.pid for n, proc in self.procs if n == name)

    def stop_all(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        for name, proc in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                print(f"bench: {name} (pid {proc.pid}) ignored SIGTERM; killing", file=sys.stderr)
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(name: str, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 90  # serve may first initdb an embedded Postgres
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{name} exited with status {proc.returncode}:\n{tail}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{name} did not listen on port {port} within 90 s")


@dataclass
class Point:
    """One measurement: a target under one scenario at one concurrency."""

    rps: float
    p50_ms: float
    p99_ms: float
    ttfb_p50_ms: float | None
    errors: int
    first_error: str = ""
    requests: int = 0
    # CPU time of the serving process tree (utime + stime, threads and
    # descendants included) in the measured window, per completed request.
    cpu_us: float | None = None
    # The event-loop lag in the window (None: no probe in the target, or off).
    lag_p99_ms: float | None = None
    lag_max_ms: float | None = None


def _pct(sorted_us: list[int], q: float) -> float:
    if not sorted_us:
        return float("nan")
    return sorted_us[min(len(sorted_us) - 1, int(q * len(sorted_us)))] / 1000


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def measure(
    procs: Processes,
    port: int,
    scenario: Scenario,
    c: int,
    args: argparse.Namespace,
    pid: int | None = None,
    api_key: str = "sk-bench",
    scrape_lag: bool = False,
) -> Point:
    """Run the load generator (as ``--loadgen-procs`` processes) and merge their samples;
    ``pid`` is the serving process, whose tree's CPU time is read around the
    measured window; ``scrape_lag``: read the target's loop lag around it too."""
    shares = _split(c, min(c, args.loadgen_procs))
    start_at = time.time() + 0.5  # lets every generator process import and connect first
    common = [
        f"http://127.0.0.1:{port}{scenario.path}",
        orjson.dumps(scenario.body).decode(),
        f"--duration={args.duration}",
        f"--warmup={args.warmup}",
        f"--max-requests={args.max_requests // len(shares)}",
        f"--start-at={start_at}",
        f"--api-key={api_key}",
        *(["--stream"] if scenario.stream else []),
        *([f"--rate={args.rate / len(shares):g}"] if args.rate else []),
    ]
    gens = [
        subprocess.Popen(
            [*procs.prefix(LOADGEN_CPU), PY, str(LOADGEN), *common, f"--concurrency={n}"],
            stdout=subprocess.PIPE,
        )
        for n in shares
    ]
    pids = procstat.tree(pid) if pid is not None else []
    try:
        window = start_at + args.warmup  # the generators' measured window opens here
        time.sleep(max(0.0, window - time.time()))
        lag_from = lag.scrape(port) if scrape_lag else None
        cpu_from = procstat.cpu_us(pids) if pids else None
        time.sleep(max(0.0, window + args.duration - time.time()))
        cpu_to = procstat.cpu_us(pids) if pids else None
        lag_to = lag.scrape(port) if scrape_lag else None
        outs = [g.communicate(timeout=args.warmup + args.duration + 30)[0] for g in gens]
    finally:
        for g in gens:
            if g.poll() is None:
                os.kill(g.pid, signal.SIGKILL)
                g.wait()
    if any(g.returncode for g in gens):
        raise RuntimeError(f"load generator failed against port {port}: exit {gens[0].returncode}")
    results = [orjson.loads(o) for o in outs]
    lat = sorted(x for r in results for x in r["latency_us"])
    ok = sum(r["ok"] for r in results)
    cpu = None if cpu_from is None or cpu_to is None or not ok else (cpu_to - cpu_from) / ok
    ttfb = sorted(x for r in results for x in r["ttfb_us"])
    lag_p99, lag_max = lag.window(lag_from, lag_to)
    return Point(
        rps=sum(r["ok"] / r["elapsed"] for r in results),
        p50_ms=_pct(lat, 0.5),
        p99_ms=_pct(lat, 0.99),
        ttfb_p50_ms=_pct(ttfb, 0.5) if scenario.stream else None,
        errors=sum(r["errors"] for r in results),
        first_error=next((r["first_error"] for r in results if r["first_error"]), ""),
        requests=len(lat),
        cpu_us=cpu,
        lag_p99_ms=lag_p99,
        lag_max_ms=lag_max,
    )


@dataclass
class Row:
    """Medians over repeats of one (scenario, prompt size, concurrency, target)."""

    scenario: str
    prompt_kb: float
    concurrency: int
    target: str
    rps: float
    p50_ms: float
    p99_ms: float
    ttfb_p50_ms: float | None
    errors: int
    first_error: str
    cpu_us: float | None = None
    lag_p99_ms: float | None = None
    lag_max_ms: float | None = None
    repeats: list[Point] = field(default_factory=list)
    vs_direct: float | None = None
    added_p50_ms: float | None = None


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _median_row(key: tuple[str, float, int, str], points: list[Point]) -> Row:
    scenario, kb, c, target = key
    return Row(
        scenario=scenario,
        prompt_kb=kb,
        concurrency=c,
        target=target,
        rps=statistics.median(p.rps for p in points),
        p50_ms=statistics.median(p.p50_ms for p in points),
        p99_ms=statistics.median(p.p99_ms for p in points),
        ttfb_p50_ms=_median([p.ttfb_p50_ms for p in points]),
        errors=sum(p.errors for p in points),
        first_error=next((p.first_error for p in points if p.first_error), ""),
        cpu_us=_median([p.cpu_us for p in points]),
        lag_p99_ms=_median([p.lag_p99_ms for p in points]),
        lag_max_ms=_median([p.lag_max_ms for p in points]),
        repeats=points,
    )


def _compare_to_direct(rows: list[Row]) -> None:
    direct = {(r.scenario, r.prompt_kb, r.concurrency): r for r in rows if r.target == "direct"}
    for r in rows:
        d = direct.get((r.scenario, r.prompt_kb, r.concurrency))
        if d is None:
            continue
        r.vs_direct = r.rps / d.rps if d.rps else None
        if r.concurrency == 1 and r is not d:
            r.added_p50_ms = r.p50_ms - d.p50_ms


def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def table(rows: list[Row]) -> str:
    lines = [
        "| scenario | prompt KB | c | target | rps | of direct | p50 ms | p99 ms | TTFB p50 ms "
        "| added p50 ms (c=1) | CPU µs/req | loop lag p99 / max ms | errors |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.scenario} | {r.prompt_kb:g} | {r.concurrency} | {r.target} | {r.rps:,.0f} "
            f"| {_fmt(r.vs_direct, '.2f')} | {r.p50_ms:.3f} | {r.p99_ms:.3f} "
            f"| {_fmt(r.ttfb_p50_ms, '.3f')} | {_fmt(r.added_p50_ms, '+.3f')} "
            f"| {_fmt(r.cpu_us, '.0f')} "
            f"| {_fmt(r.lag_p99_ms, '.2f')} / {_fmt(r.lag_max_ms, '.1f')} | {r.errors} |"
        )
    return "\n".join(lines)


def machine_notes(pin: bool) -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    layout = (
        f"fake provider + load generator on CPU {LOADGEN_CPU}, proxy on CPU {PROXY_CPU}"
        if pin
        else "no CPU pinning"
    )
    return (
        f"{os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}, "
        f"Python {platform.python_version()}; {layout}"
    )


def _start_targets(args: argparse.Namespace, procs: Processes, env: Env) -> dict[str, int]:
    """Start every wanted and available target; its port by name, in TARGETS order."""
    wanted = args.targets.split(",")
    unknown = set(wanted) - {t.name for t in TARGETS}
    if unknown:
        raise SystemExit(f"bench: unknown target(s) {', '.join(sorted(unknown))}")
    ports = {}
    for t in TARGETS:
        if t.name not in wanted:
            continue
        reason = t.unavailable(env)
        if reason:
            print(f"bench: skipping {t.name}: {reason}", file=sys.stderr)
        elif t.command is None:
            ports[t.name] = env.provider_port
        else:
            ports[t.name] = _free_port()
            procs.start(t.name, t.command(env, ports[t.name]), PROXY_CPU, ports[t.name])
    return ports


def _kbs(args: argparse.Namespace) -> list[float]:
    return [float(k) for k in args.prompt_kb.split(",") if k.strip()]


def run(
    args: argparse.Namespace, procs: Processes, env: Env
) -> tuple[list[Row], list[longrun.LongRow]]:
    ports = _start_targets(args, procs, env)
    targets = [t for t in TARGETS if t.name in ports]
    scenarios = [
        sized(s, kb) for s in SCENARIOS if s.name in args.scenarios.split(",") for kb in _kbs(args)
    ]
    levels = [int(c) for c in args.concurrency.split(",")]
    waves = [int(n) for n in args.long_streams.split(",") if n.strip() and int(n) > 0]
    points: dict[tuple[str, float, int, str], list[Point]] = {}
    longs: dict[tuple[int, str], list[longrun.LongPoint]] = {}
    for rep in range(args.repeats):
        tag = f"[{rep + 1}/{args.repeats}]"
        for s in scenarios:
            for c in levels:
                for t in targets:
                    pid = procs.pid(t.name if t.command is not None else "fake_provider")
                    key = env.api_keys.get(t.name, "sk-bench")
                    p = measure(procs, ports[t.name], s, c, args, pid, key, t.reads_lag)
                    points.setdefault((s.name, s.prompt_kb, c, t.name), []).append(p)
                    print(
                        f"  {tag} {s.name:<11} {s.prompt_kb:>4g} KB c={c:<3} {t.name:<15} "
                        f"{p.rps:>8,.0f} rps  p50 {p.p50_ms:.3f} ms  "
                        f"cpu {_fmt(p.cpu_us, '.0f')} us/req  "
                        f"lag p99 {_fmt(p.lag_p99_ms, '.2f')} ms  errors {p.errors}",
                        file=sys.stderr,
                    )
        for n in waves:
            for t in targets:
                pid = procs.pid(t.name if t.command is not None else "fake_provider")
                key = env.api_keys.get(t.name, "sk-bench")
                lp = longrun.measure_long(
                    procs.prefix(LOADGEN_CPU), PY, LONGSTREAM, ports[t.name], n, args, pid, key,
                    t.reads_lag,
                )  # fmt: skip
                longs.setdefault((n, t.name), []).append(lp)
                print(
                    f"  {tag} long-stream N={n:<5} {t.name:<15} {lp.events_per_s:>8,.0f} ev/s  "
                    f"cpu {_fmt(lp.cpu_us_per_event, '.1f')} us/ev  "
                    f"ttfb p50 {_fmt(lp.ttfb_p50_ms, '.1f')} ms  rss {lp.peak_rss_mb:.0f} MB  "
                    f"errors {lp.errors}",
                    file=sys.stderr,
                )
    rows = [_median_row(k, pts) for k, pts in points.items()]
    _compare_to_direct(rows)
    return rows, [longrun.median_row(n, t, pts) for (n, t), pts in longs.items()]


# Every scenario once (both prompt extremes, a small wave of long streams),
# short enough for CI: tests/test_bench.py runs it.
QUICK = {
    "duration": 0.5,
    "warmup": 0.2,
    "repeats": 1,
    "concurrency": "16",
    "prompt_kb": "0.5,32",
    "long_streams": "20",
    "long_chunks": 20,
    "long_gap_ms": 5.0,
    "long_ramp": 0.2,
}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default=DEFAULT_TARGETS, help="comma-separated target names")
    p.add_argument("--scenarios", default=",".join(s.name for s in SCENARIOS))
    p.add_argument("--prompt-kb", default="0.5,8,32", help="chat history sizes, comma-separated")
    p.add_argument("--concurrency", default="1,16", help="comma-separated levels")
    p.add_argument("--duration", type=float, default=4.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds per point")
    p.add_argument("--repeats", type=int, default=3, help="the table shows their medians")
    p.add_argument("--max-requests", type=int, default=2_000_000, help="cap per point")
    p.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="open loop: this many requests/s per point, on c connections (loadgen.py "
        "--rate); below a target's capacity it is measured unsaturated (the c=16 "
        "targets of goals.py assume the default, closed loop)",
    )
    p.add_argument("--chunks", type=int, default=20, help="content chunks per fake stream")
    p.add_argument("--long-streams", default="200,1000", help="long-stream waves ('' for none)")
    p.add_argument("--long-chunks", type=int, default=200, help="content chunks per long stream")
    p.add_argument("--long-gap-ms", type=float, default=25.0, help="gap between long chunks")
    p.add_argument("--long-ramp", type=float, default=1.0, help="seconds to open a wave's streams")
    p.add_argument("--no-loop-lag", action="store_true", help="no lag probe in any target")
    p.add_argument(
        "--loop-lag-ms",
        type=float,
        default=1.0,
        help="the lag probe's timer interval (each wake-up costs the proxy's CPU: "
        "~40 us of it on this kind of VM when idle)",
    )
    p.add_argument("--loadgen-procs", type=int, default=1, help="load generator processes")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes with taskset")
    p.add_argument(
        "--stores-cpu",
        help="pin Postgres and Redis to this CPU (default: unpinned; "
        f"{LOADGEN_CPU} keeps them off the proxy's CPU, as a database on its own host)",
    )
    p.add_argument(
        "--dsn", help="Postgres for floor_db_batch and tollway_billing (default: embedded)"
    )
    p.add_argument("--tollway-rev", help="measure proxy/ at this git revision (default: tree)")
    p.add_argument(
        "--base-rev",
        help="targets tollway_base and tollway_billing_base run proxy/ at this git revision",
    )
    p.add_argument("--json", type=Path, help="write results here (default: bench/out/...)")
    p.add_argument("--no-json", action="store_true")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: every scenario once with short points and small waves "
        "(options given explicitly still win)",
    )
    args = p.parse_args(argv)
    if args.quick:
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv or sys.argv[1:])}
        for name, value in QUICK.items():
            if name not in given:
                setattr(args, name, value)
    return args


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM runs the same cleanup as Ctrl-C


def _meta(args: argparse.Namespace, pin: bool) -> dict[str, str]:
    lag_note = (
        "off"
        if args.no_loop_lag
        else f"loop-lag probe ({args.loop_lag_ms:g} ms timer) on in Tollway, floor_proxy and "
        "floor_db_batch"
    )
    return {
        "started": f"{datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC",
        "command": " ".join(sys.argv),
        "machine": machine_notes(pin),
        "tollway": tollway_version(args.tollway_rev),
        "base": tollway_version(args.base_rev) if args.base_rev else "",
        "method": (f"open loop at {args.rate:g} requests/s on c connections; " if args.rate else "")
        + f"{args.duration:g} s per point after {args.warmup:g} s warm-up, medians of "
        f"{args.repeats} repeat(s), targets interleaved; prompts {args.prompt_kb} KB; "
        f"streams: {args.chunks} content chunks; long streams: waves of {args.long_streams} "
        f"x {args.long_chunks} chunks {args.long_gap_ms:g} ms apart, opened over "
        f"{args.long_ramp:g} s; CPU of the serving process tree; {lag_note}",
    }


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    pin = not args.no_pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    if pin:  # keep this orchestrator off the proxy's CPU too
        os.sched_setaffinity(0, {int(LOADGEN_CPU)})
    # Children inherit it: 1,000 streams need ~2,000 descriptors in a proxy.
    nofile = procstat.raise_nofile(8192)
    waves = [int(n) for n in args.long_streams.split(",") if n.strip()]
    if waves and 2 * max(waves) + 256 > nofile:
        raise SystemExit(f"bench: open-file limit {nofile} is too low for {max(waves)} streams")
    # Explicit, because a shell starts background jobs with SIGINT ignored.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    meta = _meta(args, pin)
    with tempfile.TemporaryDirectory(prefix="tollway-bench-", ignore_cleanup_errors=True) as tmp:
        workdir = Path(tmp)
        src = export_revision(args.tollway_rev, workdir / "src") if args.tollway_rev else None
        base = export_revision(args.base_rev, workdir / "base") if args.base_rev else None
        procs = Processes(pin, workdir)
        stores = Datastores(workdir, args)
        try:
            lag_ms = 0.0 if args.no_loop_lag else args.loop_lag_ms
            env = Env(
                _free_port(),
                workdir,
                stores.dsn,
                src,
                stores.redis_url,
                loop_lag_ms=lag_ms,
                base_src=base,
            )
            fake = [PY, str(BENCH / "fake_provider.py"), str(env.provider_port)]
            fake += [f"--chunks={args.chunks}", f"--long-chunks={args.long_chunks}"]
            fake.append(f"--long-gap-ms={args.long_gap_ms}")
            procs.start("fake_provider", fake, LOADGEN_CPU, env.provider_port)
            rows, longs = run(args, procs, env)
        except KeyboardInterrupt:
            print("bench: interrupted; stopping children", file=sys.stderr)
            return 130
        finally:
            procs.stop_all()
            stores.stop()
            _stop_embedded_postgres(workdir)
    report(args, rows, longs, meta)
    errors = sum(r.errors for r in rows) + sum(r.errors for r in longs)
    return 0 if errors == 0 else 1


def report(
    args: argparse.Namespace,
    rows: list[Row],
    longs: list[longrun.LongRow],
    meta: dict[str, str],
) -> None:
    print("\n" + "\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n")
    print(table(rows))
    if longs:
        print("\nLong streams:\n\n" + longrun.table(longs, _fmt))
    print("\nTargets (issue 12), this run:\n\n" + goals.table(rows, longs))
    for r in rows:
        if r.first_error:
            print(
                f"errors in {r.scenario} {r.prompt_kb:g} KB c={r.concurrency} {r.target}: "
                f"{r.first_error}"
            )
    for lr in longs:
        if lr.first_error:
            print(f"errors in long-stream N={lr.streams} {lr.target}: {lr.first_error}")
    if args.no_json:
        return
    stamp = meta["started"][:19].replace("-", "").replace(":", "").replace(" ", "-")
    path = args.json or BENCH / "out" / f"bench-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        **meta,
        "rows": [asdict(r) for r in rows],
        "long_streams": [asdict(r) for r in longs],
        "targets": goals.checks(rows, longs),
    }
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    sys.exit(main())
