"""Where a request's Python time goes, by Python function: a CPU-clock
cProfile of a native gateway over a measured window.

callgrind (``instructions.py``) counts instructions exactly but sees only
CPython's C functions; this names the Python steps. The profiler inflates
every call by a roughly fixed amount, so read shares and differences between
two cases of the same revision (``billing-chat`` against ``chat``), not
absolute times.

    .venv/bin/python bench/pyprofile.py --rev HEAD --cases chat,billing-chat \
        --prompt-kb 0.5 --concurrency 16 --requests 3000 --top 40

The gateway is ``instructions.py``'s (its export, stores, config, key), run
natively with a shim that starts ``cProfile.Profile(time.thread_time)`` on
SIGUSR1 and writes the stats on SIGUSR2.
"""

from __future__ import annotations

import argparse
import os
import pstats
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import instructions
import run

# ``python -c PROFILE_SHIM serve ...``: ``python -m proxy`` with a profiler
# toggled by signals; the stats go to $TOLLWAY_PROFILE_OUT.<n>.
PROFILE_SHIM = """\
import cProfile, os, runpy, signal, time
_state = {"prof": None, "n": 0}
def _on(signum, frame):
    _state["prof"] = cProfile.Profile(time.thread_time)
    _state["prof"].enable()
def _off(signum, frame):
    prof = _state["prof"]
    if prof is None:
        return
    prof.disable()
    _state["n"] += 1
    out = f"{os.environ['TOLLWAY_PROFILE_OUT']}.{_state['n']}"
    prof.dump_stats(out + ".tmp")
    os.replace(out + ".tmp", out)
    _state["prof"] = None
signal.signal(signal.SIGUSR1, _on)
signal.signal(signal.SIGUSR2, _off)
runpy.run_module("proxy", run_name="__main__", alter_sys=True)
"""


def _wait_listening(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited: {log.read_text(errors='replace')[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"gateway did not listen on {port} within 120 s")


def _wait_file(path: Path, bound_s: float = 60) -> None:
    deadline = time.monotonic() + bound_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no profile written to {path} in {bound_s:.0f} s")
        time.sleep(0.05)


def profile_case(
    revision: instructions.Revision,
    case: instructions.Case,
    args: argparse.Namespace,
    provider_port: int,
    workdir: Path,
) -> pstats.Stats:
    port = run._free_port()
    config = instructions.write_config(
        workdir / f"{case.name}.yaml", port, provider_port, case.billing, revision.budgets
    )
    # Native timers: the usage flush every 20 ms as served, not valgrind's 1 s.
    config.write_text(config.read_text().replace(instructions.SLOW_TIMERS_YAML, ""))
    argv = [
        *(run.PY, "-c", PROFILE_SHIM, "serve", "--config", str(config)),
        *("--host", "127.0.0.1", "--port", str(port)),
    ]
    out = workdir / f"prof-{case.name}"
    log = workdir / f"serve-{case.name}.log"
    env = revision.environ() | {"TOLLWAY_PROFILE_OUT": str(out)}
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            argv, env=env, cwd=revision.src, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        _wait_listening(proc, port, log)
        key = revision.api_key if case.billing else "sk-bench"
        c = args.concurrency
        instructions.send(port, case, args.warmup, key, 1.0, c)
        os.kill(proc.pid, signal.SIGUSR1)
        instructions.send(port, case, args.requests, key, 1.0, c)
        os.kill(proc.pid, signal.SIGUSR2)
        _wait_file(Path(f"{out}.1"))
        return pstats.Stats(f"{out}.1")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _name(func: tuple[str, int, str]) -> str:
    path, line, name = func
    if path == "~":
        return name
    parts = Path(path).parts
    short = "/".join(parts[parts.index("proxy") :]) if "proxy" in parts else "/".join(parts[-2:])
    return f"{short}:{line}({name})"


def per_request(stats: pstats.Stats, requests: int) -> dict[str, tuple[float, float, float]]:
    """name: (calls, own µs, inclusive µs) per request."""
    out = {}
    for func, (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        out[_name(func)] = (nc / requests, tt / requests * 1e6, ct / requests * 1e6)
    return out


def report(
    cases: dict[str, dict[str, tuple[float, float, float]]], top: int, base: str | None
) -> str:
    lines = []
    for name, table in cases.items():
        total = sum(v[1] for v in table.values())
        lines.append(f"\n## {name}: {total:.1f} µs of CPU per request (profiled)\n")
        lines.append("| function | calls/req | own µs/req | inclusive µs/req |")
        lines.append("|---|---:|---:|---:|")
        for fn, (calls, own, incl) in sorted(table.items(), key=lambda kv: -kv[1][2])[:top]:
            lines.append(f"| `{fn}` | {calls:.2f} | {own:.2f} | {incl:.2f} |")
    if base is not None and base in cases:
        for name, table in cases.items():
            if name == base:
                continue
            ref = cases[base]
            lines.append(f"\n## {name} minus {base}, own µs per request\n")
            lines.append("| function | calls/req | own µs/req more | inclusive µs/req more |")
            lines.append("|---|---:|---:|---:|")
            keys = set(table) | set(ref)
            zero = (0.0, 0.0, 0.0)
            diff = {
                k: (
                    table.get(k, zero)[0] - ref.get(k, zero)[0],
                    table.get(k, zero)[1] - ref.get(k, zero)[1],
                    table.get(k, zero)[2] - ref.get(k, zero)[2],
                )
                for k in keys
            }
            for fn, (calls, own, incl) in sorted(diff.items(), key=lambda kv: -kv[1][2])[:top]:
                lines.append(f"| `{fn}` | {calls:+.2f} | {own:+.2f} | {incl:+.2f} |")
            lines.append(f"\n## {name} minus {base}, by own time\n")
            lines.append("| function | calls/req | own µs/req more |")
            lines.append("|---|---:|---:|")
            for fn, (calls, own, _incl) in sorted(diff.items(), key=lambda kv: -kv[1][1])[:top]:
                lines.append(f"| `{fn}` | {calls:+.2f} | {own:+.2f} |")
            extra = sum(v[1] for v in diff.values())
            more = f"{extra:+.1f} µs per request more than {base}"
            lines.append(f"\n{name} spends {more} (own time).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", default="HEAD")
    parser.add_argument("--cases", default="chat,billing-chat")
    parser.add_argument("--prompt-kb", type=float, default=0.5)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--budgets", choices=("auto", "on", "off"), default="on")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--base", default="chat", help="the case the others are diffed against")
    args = parser.parse_args(argv)
    wanted = instructions.wanted_cases([n for n in args.cases.split(",") if n], [args.prompt_kb])
    with tempfile.TemporaryDirectory(prefix="tollway-pyprof-", ignore_cleanup_errors=True) as tmp:
        workdir = Path(tmp)
        procs = run.Processes(False, workdir)
        stores = run.Datastores(workdir, argparse.Namespace(dsn=None, targets="tollway_billing"))
        try:
            provider_port = run._free_port()
            fake = [run.PY, str(run.BENCH / "fake_provider.py"), str(provider_port)]
            procs.start("fake_provider", fake, "", provider_port)
            revision = instructions.prepare(args.rev, 0, workdir, stores, args.budgets)
            found = {}
            for case in wanted:
                stats = profile_case(revision, case, args, provider_port, workdir)
                found[case.name] = per_request(stats, args.requests)
        finally:
            procs.stop_all()
            stores.stop()
    print(f"- command: {' '.join(sys.argv)}")
    print(report(found, args.top, args.base if args.base in found else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
