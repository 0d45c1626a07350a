"""Usage event ids come from the kernel's randomness without a syscall per
request, and a forked child never hands out its parent's."""

from __future__ import annotations

import os
import re

from proxy.core import ids


def test_event_ids_are_24_hex_characters_and_never_repeat() -> None:
    drawn = [ids.event_id() for _ in range(5000)]  # ~15 refills of the buffer
    assert all(re.fullmatch(r"[0-9a-f]{24}", i) for i in drawn)
    assert len(set(drawn)) == len(drawn)


def test_a_forked_child_draws_none_of_its_parents_ids() -> None:
    ids.event_id()  # the parent holds a buffer with ids not handed out yet
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, then exit without pytest's teardown
        os.close(read)
        os.write(write, "".join(ids.event_id() for _ in range(20)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as fh:
        child = fh.read().decode()
    os.waitpid(pid, 0)
    parent = "".join(ids.event_id() for _ in range(20))
    child_ids = {child[i : i + 24] for i in range(0, len(child), 24)}
    parent_ids = {parent[i : i + 24] for i in range(0, len(parent), 24)}
    assert len(child_ids) == 20 and not child_ids & parent_ids
