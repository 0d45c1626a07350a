"""``bench/instructions.py``: the gateway at HEAD runs under callgrind and a
handful of requests are counted (a smoke test; the numbers are not checked)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("valgrind") is None or shutil.which("callgrind_control") is None,
    reason="valgrind (callgrind) is not installed",
)
@pytest.mark.timeout(900)
def test_counts_instructions_per_request_at_head(tmp_path: Path) -> None:
    out = tmp_path / "instructions.json"
    argv = [sys.executable, str(ROOT / "bench" / "instructions.py"), "--revs", "HEAD"]
    argv += ["--cases", "chat", "--requests", "5", "--warmup", "2", "--repeats", "1"]
    argv += ["--idle-s", "1", "--json", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=840)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [sample] = orjson.loads(out.read_bytes())["samples"]
    assert sample["case"] == "chat" and sample["requests"] == 5
    # A chat request through aiohttp is hundreds of thousands of instructions at least.
    assert sample["instructions"] > 5 * 100_000
    assert sample["per_request"] > 0
    assert "| HEAD (" in done.stdout and "| chat |" in done.stdout


def test_billing_config_has_budgets_only_when_asked(tmp_path: Path) -> None:
    """The billing YAML parses with and without ``run.py``'s USD budgets (its
    ``<budgets>`` placeholder never reaches a gateway), and budgets are there
    only when asked for."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import instructions
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from proxy.pipeline.registry import load_config

    for budgets in (False, True):
        path = instructions.write_config(tmp_path / f"{budgets}.yaml", 8080, 8081, True, budgets)
        tier = load_config(path).tiers["bench"]
        assert "<budgets>" not in path.read_text()
        assert tier.budgets.any() is budgets
        if budgets:
            assert tier.budgets.tenant_month and tier.budgets.key_day


def test_traced_config_exports_at_the_interval_asked(tmp_path: Path) -> None:
    """``--tracing`` configs carry the sample ratio and the stretched export
    interval (``TRACE_FLUSH_S``, or ``--trace-flush-s``), inside ``tracing:``."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import instructions
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from proxy.pipeline.registry import load_config

    for flush in (instructions.TRACE_FLUSH_S, 5.0):
        path = instructions.write_config(
            tmp_path / f"{flush}.yaml", 8080, 8081, False, False, 0.01, flush
        )
        settings = load_config(path).section("tracing")
        assert settings.sample_ratio == 0.01 and settings.flush_interval_s == flush


def test_floor_is_a_pseudo_revision_of_pass_through_cases(tmp_path: Path) -> None:
    """``--revs floor,...`` serves ``bench/floor_proxy.py`` (forwarding to the
    fake provider), only for the cases it can answer, and the table shows
    each revision's ratio to it, per scenario and prompt size."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import instructions
    finally:
        sys.path.remove(str(ROOT / "bench"))

    floor = instructions.floor_revision(tmp_path)
    argv = instructions.serve_argv(floor, tmp_path / "unused.yaml", 9001, 9002)
    assert argv[1:] == [str(ROOT / "bench" / "floor_proxy.py"), "9001", "http://127.0.0.1:9002"]

    wanted = instructions.wanted_cases(["chat", "billing-chat"], [0.5, 32])
    assert [c.name for c in wanted] == [
        "chat@0.5KB",
        "billing-chat@0.5KB",
        "chat@32KB",
        "billing-chat@32KB",
    ]
    assert [c.name for c in wanted if floor.serves(c)] == ["chat@0.5KB", "chat@32KB"]
    assert [c.scenario.prompt_kb for c in wanted] == [0.5, 0.5, 32, 32]
    # One size: the names stay the scenarios' own (older JSON files compare).
    assert [c.name for c in instructions.wanted_cases(["chat"], [0.5])] == ["chat"]
    with pytest.raises(SystemExit):
        instructions.wanted_cases(["chat", "nope"], [0.5])

    head = instructions.Revision("HEAD", "abc1234", tmp_path, tmp_path, "", "")
    samples = [
        instructions.Sample("floor", "chat@32KB", 600_000, 1, 1.0),
        instructions.Sample("HEAD", "chat@32KB", 900_000, 1, 1.0),
        instructions.Sample("HEAD", "billing-chat@32KB", 1_200_000, 1, 1.0),
    ]
    text = instructions.table(instructions.rows(samples), [floor, head])
    lines = text.splitlines()
    assert "vs floor" in lines[0]
    assert lines[1].count("|") == lines[0].count("|")
    [mine] = [line for line in lines if line.startswith("| HEAD (abc1234) | chat@32KB |")]
    assert "| 1.500x |" in mine
    [billing] = [line for line in lines if "billing-chat@32KB" in line]
    assert "| — |" in billing  # floor_proxy has no billing path to compare with
