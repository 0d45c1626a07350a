"""The access log's batched writer: whole lines, in order, none lost."""

from __future__ import annotations

import asyncio
import os
import time

from proxy.stages.settle.line_writer import _BATCH, LineWriter


def _read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    out = b""
    try:
        while chunk := os.read(fd, 65536):
            out += chunk
    except BlockingIOError:
        pass
    return out


async def test_lines_wait_at_most_the_delay_then_go_out_in_order() -> None:
    r, w = os.pipe()
    try:
        writer = LineWriter(w, max_delay=0.02)
        lines = [f'{{"n":{i}}}'.encode() for i in range(100)]
        for line in lines:
            writer.add(line)
        assert _read_all(r) == b""  # batched, not one write per line
        deadline = time.monotonic() + 5
        got = b""
        while got.count(b"\n") < 100 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            got += _read_all(r)
        assert got == b"".join(line + b"\n" for line in lines)
    finally:
        os.close(r)
        os.close(w)


def test_writes_are_whole_lines_within_pipe_buf() -> None:
    """Several workers share one stdout pipe: a write never splits a line
    unless that one line is longer than PIPE_BUF."""
    r, w = os.pipe()
    writes: list[bytes] = []
    real = os.write

    def spy(fd: int, data: bytes | memoryview) -> int:
        writes.append(bytes(data))
        return real(fd, data)

    writer = LineWriter(w, max_bytes=1 << 20)
    try:
        lines = [b"x" * n for n in (100, 3000, 2000, 10, _BATCH + 50, 7)]
        for line in lines:
            writer.add(line)  # no running loop: each goes out at once
        writer._lines = [line + b"\n" for line in lines]  # as if queued together
        writer._size = sum(len(line) + 1 for line in lines)
        os.write = spy  # type: ignore[assignment]
        try:
            writer.flush()
        finally:
            os.write = real
        assert b"".join(writes) == b"".join(line + b"\n" for line in lines)
        assert all(d.endswith(b"\n") for d in writes)
        assert all(len(d) <= _BATCH or d.count(b"\n") == 1 for d in writes)
        assert len(writes) < len(lines)  # small lines share a write
        assert _read_all(r) == 2 * b"".join(line + b"\n" for line in lines)
    finally:
        os.close(r)
        os.close(w)


async def test_close_writes_what_is_left_and_later_lines_at_once() -> None:
    r, w = os.pipe()
    try:
        writer = LineWriter(w, max_delay=60)
        writer.add(b"a")
        writer.close()
        assert _read_all(r) == b"a\n"
        writer.add(b"b")
        assert _read_all(r) == b"b\n"
    finally:
        os.close(r)
        os.close(w)


def test_a_closed_output_drops_lines_without_raising() -> None:
    r, w = os.pipe()
    os.close(r)
    writer = LineWriter(w)
    try:
        writer.add(b"lost")
        assert writer.dropped == 1
    finally:
        os.close(w)


async def test_a_full_buffer_is_written_without_waiting() -> None:
    r, w = os.pipe()
    try:
        writer = LineWriter(w, max_delay=60, max_bytes=8192)
        for _ in range(9):
            writer.add(b"y" * 999)
        assert len(_read_all(r)) == 9000
        writer.close()
    finally:
        os.close(r)
        os.close(w)
