"""Instructions per request of the gateway at git revisions, counted by callgrind.

    .venv/bin/python bench/instructions.py --revs 65583d5,858e4ca,HEAD
    .venv/bin/python bench/instructions.py --revs HEAD --requests 20 --warmup 5   # smoke run
    .venv/bin/python bench/instructions.py --revs floor,main,HEAD --cases chat,chat-stream

Why: on a shared 2-core machine ``run.py``'s CPU µs/req moves by 20-40%
between repeats of the same code, too much to check a ±5% budget between
two commits, and ``perf stat`` has no hardware counters in this VM. Valgrind's
callgrind counts the instructions a process executes (``Ir``), which does not
depend on what else the machine is doing: the same requests on the same code
give the same count within a fraction of a percent.

For each revision, ``proxy/`` and ``sql/`` are exported with ``git archive``
(``run.export_revision``) and served with ``python -m proxy serve`` on that
export (PYTHONPATH, run from the export's directory, checked at start: the
venv's editable install or a current directory holding ``proxy/`` would
otherwise win; not the venv's ``tollway`` script, whose entry point moved
between revisions), one worker, PYTHONHASHSEED=0, under ``valgrind
--tool=callgrind --instr-atstart=no``, with ``run.py``'s YAML for its
``tollway`` (``auth: none``) and ``tollway_billing`` (keys, tiers, prices on
Postgres and Redis; with ``--budgets auto``, the default, the tier's USD
budgets of ``run.BUDGETS_YAML`` for the revisions whose config accepts them)
targets and the loop-lag probe off. Clock-driven work is slowed by about the
factor valgrind slows a request (``SLOW_TIMERS_YAML``, ``STRETCHED``) so that
its share per request stays near a native run's. The fake provider and
the client run natively. Per scenario: ``--warmup`` requests uninstrumented,
then ``callgrind_control -z`` and ``-i on``, exactly ``--requests`` requests
one after another on one keep-alive connection (``loadgen.run_point``,
concurrency 1; ``--concurrency 16``: 16 connections, as ``run.py``'s c=16
points), ``-i off`` and ``-d``; the dump's ``totals:`` divided by the
request count is the figure. Only the gateway's own process is counted: the
fake provider, Postgres and Redis are not (their work per request is the same
whichever revision asks).

The pseudo-revision ``floor`` is ``bench/floor_proxy.py`` (the working tree's,
the yardstick ``run.py`` measures ratios against) served the same way under
callgrind, on the same fake provider, with the same requests: it has only the
pass-through cases (``chat``, ``chat-stream``, ``drip-stream``), and when it
is in ``--revs`` the table has each revision's ratio to it (issue 12's
pass-through target is a ratio to floor_proxy).

Each revision gets its own Postgres database (migrated by its own ``migrate``)
and Redis database number, and its own tenant and key made through its own
CLI, so an old revision never meets a newer schema. Gateways are started
afresh for every repeat, revisions interleaved, and every process started here
is stopped by PID; valgrind's files live in a temporary directory removed at
the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

# bench/'s own modules (the script's directory is on sys.path).
import loadgen
import orjson
import run

SERVE_TIMEOUT_S = 600.0  # python + aiohttp + asyncpg imports under valgrind, on a busy machine
STOP_TIMEOUT_S = 120.0
CLI_TIMEOUT_S = 180.0
# The usage flusher wakes every flush_interval_ms (20 by default) whatever the
# traffic; under valgrind a request takes ~50x longer, so at 20 ms its idle
# wake-ups would be counted ~50x as often per request as in a native run, and
# vary with how busy the machine is. 1 s under valgrind is ~20 ms natively.
# The key cache's TTL (5 s: natively thousands of requests, here ~50) and the
# lease heartbeat (every lease_ttl_s / 4) are clock-driven too: an hour each
# keeps them out of the window. Every measured revision accepts these keys.
SLOW_TIMERS_YAML = "billing: {flush_interval_ms: 1000, key_cache_ttl_s: 3600, lease_ttl_s: 3600}\n"
# Clock-driven constants without a config key, stretched by the same ~50x for
# the revisions that have them: the crash journal's group commit (0.2 s) and
# its checkpoint of a request still open 0.8 s after its last note (natively
# a finished request's row is durable long before; under valgrind, with a
# 1 s usage flush, it would be checkpointed, its tokens counted again).
# The tracer's batch export (every flush_interval_s, 5 by default) is
# clock-driven too: one OTLP/HTTP POST per interval with whatever spans
# finished in it. Natively 5 s holds thousands of requests at concurrency 1,
# under valgrind ~150, so its fixed cost per POST would be counted ~50x as
# often per request; 250 s keeps the export out of the window, as 20 ms ->
# 1 s does for the usage flusher (--trace-flush-s 5: the unstretched figure).
TRACE_FLUSH_S = 250.0
STRETCHED = {"proxy.stores.journal": {"FLUSH_S": 10.0, "CHECKPOINT_S": 40.0}}
# ``python -c SERVE_SHIM serve ...``: ``python -m proxy`` with STRETCHED applied first.
SERVE_SHIM = f"""\
import importlib, os, runpy
import proxy
# The export, not the working tree (an editable install, or the current directory).
assert proxy.__file__.startswith(os.environ["PYTHONPATH"]), proxy.__file__
for name, values in {STRETCHED!r}.items():
    try:
        module = importlib.import_module(name)
    except ImportError:
        continue
    for attr, value in values.items():
        assert hasattr(module, attr), (name, attr)
        setattr(module, attr, value)
runpy.run_module("proxy", run_name="__main__", alter_sys=True)
"""


@dataclass(frozen=True)
class Case:
    """One measured scenario: a request body on a pass-through or billing gateway."""

    name: str
    scenario: run.Scenario
    billing: bool


def cases(prompt_kb: float) -> list[Case]:
    chat, stream = (run.sized(s, prompt_kb) for s in run.SCENARIOS)
    # The long-stream shape: one event per upstream read (the fake's
    # bench-long model, DRIP_CHUNKS events DRIP_GAP_MS apart), where
    # chat-stream's events arrive all at once and are read in a few reads.
    drip = run.Scenario(
        "drip-stream", stream.path, {**stream.body, "model": run.LONG_MODEL}, True, prompt_kb
    )
    return [
        Case("chat", chat, billing=False),
        Case("chat-stream", stream, billing=False),
        Case("billing-chat", chat, billing=True),
        Case("billing-stream", stream, billing=True),
        Case("drip-stream", drip, billing=False),
    ]


DRIP_CHUNKS = 20
DRIP_GAP_MS = 10.0  # under valgrind, well above the gateway's time per event: one event per read


DEFAULT_CASES = "chat,chat-stream,billing-chat"
FLOOR = "floor"  # the pseudo-revision: bench/floor_proxy.py, pass-through cases only
# Which gateway wrote which dumps (``--keep``): one line per gateway started.
GATEWAYS: list[str] = []


@dataclass
class Revision:
    """An exported revision and the per-revision stores, data dir and key."""

    rev: str
    commit: str
    src: Path
    data_dir: Path
    dsn: str
    redis_url: str
    api_key: str = ""
    budgets: bool = False  # its billing tier has USD budgets
    floor: bool = False  # bench/floor_proxy.py, not an export of the gateway

    def serves(self, case: Case) -> bool:
        """floor_proxy has no keys, quotas or usage rows: pass-through cases only."""
        return not (self.floor and case.billing)

    def environ(self) -> dict[str, str]:
        """The gateway's and its CLI's environment: this export first on the path,
        its own stores; nothing inherited that changes the request path."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLWAY_")}
        env.pop("PYTHONPATH", None)
        return env | {
            "PYTHONPATH": str(self.src),
            "PYTHONHASHSEED": "0",
            "TOLLWAY_DATA_DIR": str(self.data_dir),
            "DATABASE_URL": self.dsn,
            "REDIS_URL": self.redis_url,
        }


@dataclass
class Sample:
    """One scenario on one gateway: the window's Ir, its wall time and the
    gateway's idle Ir per second (its timers: config poll, usage flusher)."""

    rev: str
    case: str
    instructions: int
    requests: int
    window_s: float
    idle_per_s: float = 0.0

    @property
    def raw(self) -> float:
        return self.instructions / self.requests

    @property
    def per_request(self) -> float:
        """Without the timers' share: their wake-ups follow the wall clock, and a
        request under valgrind on a busy machine takes a varying ~50x its time."""
        return (self.instructions - self.idle_per_s * self.window_s) / self.requests


def _git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(run.ROOT), *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"instructions: git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def write_config(
    path: Path,
    port: int,
    provider_port: int,
    billing: bool,
    budgets: bool = False,
    trace_ratio: float | None = None,
    trace_flush_s: float = TRACE_FLUSH_S,
) -> Path:
    """``run.py``'s YAML for its ``tollway`` or ``tollway_billing`` target, the
    billing tier with ``run.BUDGETS_YAML`` (USD budgets) when ``budgets``: only
    keys the revision accepts (``prepare``'s ``check-config`` proves it).
    ``trace_ratio``: ``run.TRACE_YAML``, traces sampled at that ratio and
    exported to the fake provider's OTLP sink every ``trace_flush_s``."""
    yaml = run.TOLLWAY_YAML.format(port=port, provider_port=provider_port) + SLOW_TIMERS_YAML
    if trace_ratio is not None:
        yaml += run.TRACE_YAML.format(provider_port=provider_port, ratio=trace_ratio)
        yaml += f"  flush_interval_s: {trace_flush_s:g}\n"  # continues tracing:
    tier = run.BILLING_YAML.replace("<budgets>", run.BUDGETS_YAML if budgets else "")
    path.write_text(yaml + (tier if billing else "auth: none\n"))
    return path


def _cli(revision: Revision, config: Path, *args: str) -> str:
    """``python -m proxy ARGS`` of the export (``migrate`` takes no --config:
    every command reads $TOLLWAY_CONFIG)."""
    done = subprocess.run(
        [run.PY, "-m", "proxy", *args],
        env=revision.environ() | {"TOLLWAY_CONFIG": str(config)},
        cwd=revision.src,  # ``-m`` puts the current directory first on sys.path
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    if done.returncode:
        raise RuntimeError(
            f"{revision.rev}: proxy {' '.join(args)} failed: {done.stderr.strip()[-2000:]}"
        )
    return done.stdout


async def _create_database(dsn: str, name: str) -> str:
    """A fresh database next to ``dsn``'s, and its DSN."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


def prepare(
    rev: str,
    index: int,
    workdir: Path,
    stores: run.Datastores,
    budgets: str = "auto",
) -> Revision:
    """Export ``rev``, give it its own database and Redis db, migrate with its
    own code, and make a tenant and key through its own CLI. ``budgets``
    ``auto``: USD budgets on the billing tier if the revision's config accepts
    them (older ones refuse the keys), ``off``: never, ``on``: required.
    ``floor``: nothing to export or store (``floor_revision``)."""
    if rev == FLOOR:
        return floor_revision(workdir)
    commit = _git("rev-parse", "--short", rev)
    src = run.export_revision(rev, workdir / f"src-{index}")
    assert stores.dsn is not None and stores.redis_url is not None
    dsn = asyncio.run(_create_database(stores.dsn, f"bench_instr_{index}"))
    redis_url = re.sub(r"/\d*$", f"/{index + 1}", stores.redis_url)
    revision = Revision(rev, commit, src, workdir / f"data-{index}", dsn, redis_url)
    revision.budgets = budgets != "off"
    config = write_config(workdir / f"check-{index}.yaml", 8080, 8081, True, revision.budgets)
    try:
        _cli(revision, config, "check-config", str(config))
    except RuntimeError:
        if budgets != "auto":
            raise
        revision.budgets = False
        config = write_config(workdir / f"check-{index}.yaml", 8080, 8081, True, False)
        _cli(revision, config, "check-config", str(config))
    _cli(revision, config, "migrate")
    tenant = f"bench-instr-{index}"
    _cli(revision, config, "tenants", "create", tenant, "--tier", "bench")
    made = _cli(revision, config, "keys", "create", "--tenant", tenant, "--json")
    revision.api_key = orjson.loads(made)["api_key"]
    return revision


def floor_revision(workdir: Path) -> Revision:
    """The yardstick as a revision: the working tree's ``bench/floor_proxy.py``."""
    return Revision(FLOOR, FLOOR, run.BENCH, workdir / "data-floor", "", "", floor=True)


def serve_argv(revision: Revision, config: Path, port: int, provider_port: int) -> list[str]:
    """The served process (valgrind's command line after its own options):
    the export's ``python -m proxy serve`` (via ``SERVE_SHIM``), or floor_proxy
    forwarding to the fake provider."""
    if revision.floor:
        upstream = f"http://127.0.0.1:{provider_port}"
        return [run.PY, str(run.BENCH / "floor_proxy.py"), str(port), upstream]
    return [
        *(run.PY, "-c", SERVE_SHIM, "serve", "--config", str(config)),
        *("--host", "127.0.0.1", "--port", str(port)),
    ]


class Gateway:
    """One ``python -m proxy serve`` under callgrind, with instrumentation off."""

    def __init__(self, revision: Revision, argv: list[str], port: int, outdir: Path) -> None:
        """``argv``: ``serve_argv``'s command, run under valgrind."""
        self.port = port
        self.outdir = outdir
        self.log = outdir / f"serve-{port}.log"
        # valgrind's control FIFOs in the temporary directory too, not in /tmp.
        self.vgdb_prefix = f"--vgdb-prefix={outdir}/vgdb-pipe"
        valgrind = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            self.vgdb_prefix,
            f"--callgrind-out-file={outdir}/callgrind.out.%p",
        ]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                valgrind + argv,
                env=revision.environ(),
                # ``-c`` puts the current directory first on sys.path: the
                # export's (floor_proxy imports nothing of the gateway)
                cwd=revision.src,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_listening()
        except BaseException:
            self.stop()
            raise

    def _wait_listening(self) -> None:
        import socket

        deadline = time.monotonic() + SERVE_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"gateway exited with status {self.proc.returncode}:\n{tail}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"gateway did not listen on {self.port} within {SERVE_TIMEOUT_S:.0f} s")

    def control(self, *args: str) -> float:
        """Send a callgrind command; when it took effect, as the midpoint of
        the exchange (monotonic seconds)."""
        sent = time.monotonic()
        subprocess.run(
            ["callgrind_control", self.vgdb_prefix, *args, str(self.proc.pid)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        return (sent + time.monotonic()) / 2

    def dump(self, keep: Path | None = None) -> int:
        """Dump the counters (which zeroes them) and return the dump's total
        Ir; ``keep``: copy the dump there too (for ``callgrind_annotate``)."""
        before = set(self.outdir.glob(f"callgrind.out.{self.proc.pid}.*"))
        self.control("-d")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for path in set(self.outdir.glob(f"callgrind.out.{self.proc.pid}.*")) - before:
                text = path.read_text(errors="replace")
                total = total_ir(text)
                if total is not None:
                    if keep is not None:
                        keep.write_text(text)
                    return total
            time.sleep(0.1)
        raise RuntimeError(f"callgrind wrote no complete dump for pid {self.proc.pid} in 60 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def total_ir(dump: str) -> int | None:
    """The dump's total instruction count (its ``totals:`` line, or ``summary:``
    in older formats); None while the file is still being written."""
    for key in ("totals:", "summary:"):
        match = re.search(rf"^{key}\s+(\d+)", dump, re.MULTILINE)
        if match:
            return int(match.group(1))
    return None


def send(
    port: int, case: Case, count: int, api_key: str, per_request_s: float, concurrency: int = 1
) -> None:
    """Exactly ``count`` requests, ``concurrency`` at a time (one by default);
    any failure aborts the run."""
    body = orjson.dumps(case.scenario.body)
    url = f"http://127.0.0.1:{port}{case.scenario.path}"
    result = asyncio.run(
        loadgen.run_point(
            url,
            body,
            concurrency=concurrency,
            duration=30 + count * per_request_s,
            warmup=0,
            max_requests=count,
            stream=case.scenario.stream,
            api_key=api_key,
        )
    )
    if result["errors"] or result["ok"] != count:
        raise RuntimeError(
            f"{case.name}: {result['ok']} of {count} requests answered, "
            f"{result['errors']} errors: {result['first_error']}"
        )


def measure(gateway: Gateway, case: Case, args: argparse.Namespace, api_key: str) -> Sample:
    c = args.concurrency
    send(gateway.port, case, args.warmup, api_key, args.per_request_s, c)
    gateway.control("-z")
    on = gateway.control("-i", "on")
    send(gateway.port, case, args.requests, api_key, args.per_request_s, c)
    off = gateway.control("-i", "off")
    keep = None
    if args.keep_dumps is not None:
        args.keep_dumps.mkdir(parents=True, exist_ok=True)
        keep = args.keep_dumps / f"callgrind.{args.rev_label}.{case.name}.{args.repeat_no}"
    return Sample("", case.name, gateway.dump(keep), args.requests, off - on)


def idle_rate(gateway: Gateway, seconds: float) -> float:
    """Instructions per second of the gateway with no request in flight."""
    gateway.control("-z")
    on = gateway.control("-i", "on")
    time.sleep(seconds)
    off = gateway.control("-i", "off")
    return gateway.dump() / (off - on)


def run_repeat(
    revision: Revision,
    wanted: list[Case],
    args: argparse.Namespace,
    provider_port: int,
    workdir: Path,
) -> list[Sample]:
    """Every wanted case on fresh gateways of one revision (one per auth mode)."""
    samples = []
    for billing in (False, True):
        mine = [c for c in wanted if c.billing == billing and revision.serves(c)]
        if not mine:
            continue
        port = run._free_port()
        name = f"{'billing' if billing else 'pass'}-{revision.commit}.yaml"
        config = write_config(
            workdir / name,
            port,
            provider_port,
            billing,
            revision.budgets,
            args.tracing,
            args.trace_flush_s,
        )
        argv = serve_argv(revision, config, port, provider_port)
        gateway = Gateway(revision, argv, port, workdir)
        GATEWAYS.append(
            f"pid {gateway.proc.pid}: {revision.rev} ({revision.commit}) "
            f"{'billing' if billing else 'pass-through'}, cases {','.join(c.name for c in mine)}"
        )
        try:
            key = revision.api_key if billing else "sk-bench"
            mine_samples = [measure(gateway, case, args, key) for case in mine]
            idle = idle_rate(gateway, args.idle_s)
        finally:
            gateway.stop()
        for sample in mine_samples:
            sample.rev, sample.idle_per_s = revision.rev, idle
            print(
                f"  {revision.rev:<10} {sample.case:<15} {sample.per_request:>12,.0f} "
                f"instructions/request ({sample.raw:,.0f} raw, {sample.window_s:.1f} s, "
                f"idle {idle:,.0f}/s)",
                file=sys.stderr,
            )
        samples += mine_samples
    return samples


@dataclass
class Row:
    rev: str
    case: str
    values: list[float] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)
    idle: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def spread(self) -> float:
        """(max - min) / mean: how far apart the repeats are."""
        return (max(self.values) - min(self.values)) / self.mean


def rows(samples: list[Sample]) -> list[Row]:
    by_key: dict[tuple[str, str], Row] = {}
    for s in samples:
        row = by_key.setdefault((s.rev, s.case), Row(s.rev, s.case))
        row.values.append(s.per_request)
        row.raw.append(s.raw)
        row.idle.append(s.idle_per_s)
    return list(by_key.values())


def _millions(values: list[float]) -> str:
    return " / ".join(f"{v / 1e6:.3f}M" for v in values)


def table(result: list[Row], revisions: list[Revision]) -> str:
    """One line per revision and scenario; with ``floor`` among the
    revisions, each line's ratio to floor_proxy's count too."""
    first = revisions[0].rev
    base = {r.case: r.mean for r in result if r.rev == first}
    floor = {r.case: r.mean for r in result if r.rev == FLOOR}
    vs_floor = " vs floor |" if floor else ""
    lines = [
        f"| rev | scenario | instructions/request | repeats | spread | vs {first} |{vs_floor}"
        " raw (timers included) | idle instructions/s |",
        f"|---|---|---:|---|---:|---:|{'---:|' if floor else ''}---|---|",
    ]
    label = {r.rev: f"{r.rev} ({r.commit})" if r.rev != r.commit else r.rev for r in revisions}
    label |= {r.rev: f"{label[r.rev]}, budgets" for r in revisions if r.budgets}
    for r in result:
        repeats = _millions(r.values)
        ratio = r.mean / base[r.case] if r.case in base else float("nan")
        to_floor = ""
        if floor:
            to_floor = f" {r.mean / floor[r.case]:.3f}x |" if r.case in floor else " — |"
        lines.append(
            f"| {label[r.rev]} | {r.case} | {r.mean:,.0f} | {repeats} "
            f"| {r.spread:.2%} | {ratio:.3f} |{to_floor} {_millions(r.raw)} | {_millions(r.idle)} |"
        )
    return "\n".join(lines)


def wanted_cases(names: list[str], sizes: list[float]) -> list[Case]:
    """The scenarios asked for at each prompt size, in that order; named
    ``chat@32KB`` when more than one size is asked for."""
    out = []
    for kb in sizes:
        known = {c.name: c for c in cases(kb)}
        if not names or any(n not in known for n in names):
            raise SystemExit(f"instructions: scenarios are {', '.join(known)}")
        for n in names:
            out.append(known[n] if len(sizes) == 1 else replace(known[n], name=f"{n}@{kb:g}KB"))
    return out


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--revs", default="HEAD", help="comma-separated git revisions")
    p.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated scenarios")
    p.add_argument("--requests", type=int, default=1000, help="measured requests per scenario")
    p.add_argument("--warmup", type=int, default=200, help="unmeasured requests first")
    p.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="requests in flight at once (1: one after another on one connection)",
    )
    p.add_argument("--repeats", type=int, default=2, help="fresh gateways per revision")
    p.add_argument(
        "--idle-s", type=float, default=10.0, help="idle window per gateway for its timers' rate"
    )
    p.add_argument(
        "--prompt-kb",
        type=lambda v: [float(kb) for kb in v.split(",")],
        default=[0.5],
        help="chat history size(s) in KB, comma-separated (e.g. 0.5,32)",
    )
    p.add_argument("--chunks", type=int, default=20, help="content chunks per fake stream")
    p.add_argument(
        "--per-request-s",
        type=float,
        default=1.0,
        help="time allowed per request under valgrind before the run fails",
    )
    p.add_argument(
        "--budgets",
        choices=("auto", "on", "off"),
        default="auto",
        help="USD budgets on the billing tier: where the revision accepts them, always, never",
    )
    p.add_argument(
        "--tracing",
        type=float,
        default=None,
        metavar="RATIO",
        help="traces on, sampled at RATIO (0..1), exported to the fake provider's OTLP sink",
    )
    p.add_argument(
        "--trace-flush-s",
        type=float,
        default=TRACE_FLUSH_S,
        help="the tracer's export interval under valgrind (5 natively; see TRACE_FLUSH_S)",
    )
    p.add_argument("--json", type=Path, help="also write the samples here")
    p.add_argument(
        "--keep-dumps",
        type=Path,
        default=None,
        metavar="DIR",
        help="copy each measured window's callgrind dump here (callgrind_annotate reads them)",
    )
    p.add_argument(
        "--keep",
        type=Path,
        default=None,
        metavar="DIR",
        help="copy callgrind's dumps (callgrind.out.<pid>.<n>) and the gateways' logs here, "
        "for callgrind_annotate; the temporary directory is removed as before",
    )
    args = p.parse_args(argv)
    if args.requests < 1 or args.warmup < 0 or args.repeats < 1:
        p.error("--requests and --repeats must be positive, --warmup not negative")
    return args


def keep(workdir: Path, into: Path) -> None:
    """Copy the dumps and logs out of the temporary directory before it goes,
    with an index naming which gateway (revision, auth mode) wrote each pid."""
    import shutil

    into.mkdir(parents=True, exist_ok=True)
    for path in [*workdir.glob("callgrind.out.*"), *workdir.glob("serve-*.log")]:
        shutil.copy2(path, into / path.name)
    index = into / "gateways.txt"
    with index.open("a") as fh:
        for line in GATEWAYS:
            fh.write(line + "\n")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    for tool in ("valgrind", "callgrind_control"):
        if subprocess.run(["which", tool], capture_output=True).returncode:
            raise SystemExit(f"instructions: {tool} is not installed")
    revs = [r.strip() for r in args.revs.split(",") if r.strip()]
    if not 1 <= len(revs) <= 8:
        raise SystemExit("instructions: give 1 to 8 revisions")
    wanted = wanted_cases([n for n in args.cases.split(",") if n], args.prompt_kb)
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="tollway-instr-", ignore_cleanup_errors=True) as tmp:
        workdir = Path(tmp)
        procs = run.Processes(False, workdir)
        stores = run.Datastores(workdir, argparse.Namespace(dsn=None, targets="tollway_billing"))
        samples: list[Sample] = []
        try:
            provider_port = run._free_port()
            fake = [run.PY, str(run.BENCH / "fake_provider.py"), str(provider_port)]
            drip = [f"--long-chunks={DRIP_CHUNKS}", f"--long-gap-ms={DRIP_GAP_MS:g}"]
            procs.start(
                "fake_provider", [*fake, f"--chunks={args.chunks}", *drip], "", provider_port
            )
            revisions = [
                prepare(rev, i, workdir, stores, args.budgets) for i, rev in enumerate(revs)
            ]
            for rep in range(args.repeats):
                print(f"repeat {rep + 1}/{args.repeats}", file=sys.stderr)
                for revision in revisions:
                    args.rev_label, args.repeat_no = revision.commit, rep + 1
                    samples += run_repeat(revision, wanted, args, provider_port, workdir)
        except KeyboardInterrupt:
            print("instructions: interrupted; stopping children", file=sys.stderr)
            return 130
        finally:
            procs.stop_all()
            stores.stop()
            if args.keep is not None:
                keep(workdir, args.keep)
    sizes = ", ".join(f"{kb:g}" for kb in args.prompt_kb)
    print(
        f"\n- started: {started}\n- command: {' '.join(sys.argv)}\n"
        f"- method: {args.requests} requests per scenario after {args.warmup} unmeasured, "
        f"one at a time, {sizes} KB chat history, {args.repeats} fresh gateway(s) "
        f"per revision; instructions of the gateway process (callgrind Ir), less its idle "
        f"rate (over {args.idle_s:g} s) times the window; tracing: "
        f"{'off' if args.tracing is None else f'on, sample ratio {args.tracing:g}'}"
        f"{'' if args.tracing is None else f', export every {args.trace_flush_s:g} s'}\n"
    )
    print(table(rows(samples), revisions))
    if args.json:
        doc = {
            "started": started,
            "command": sys.argv,
            "budgets": {r.rev: r.budgets for r in revisions},
            "samples": [s.__dict__ | {"per_request": s.per_request} for s in samples],
        }
        args.json.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
