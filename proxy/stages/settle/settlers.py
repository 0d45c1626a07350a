"""Every settler, told of every request once it ends, in one fixed order.

The web layer builds the one tuple (``proxy.web.app``): billing first (the
ledger row and the quota refund), then the metrics, then the access log.
A settler that fails is logged and never keeps the next one from its turn,
nor fails the request.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from proxy.core.record import Settler, UsageRecord

log = logging.getLogger("tollway.settle")


class Settlers:
    def __init__(self, settlers: Sequence[Settler]) -> None:
        self.settlers = tuple(settlers)

    def settle(self, record: UsageRecord) -> None:
        for settler in self.settlers:
            try:
                settler.settle(record)
            except Exception:
                log.exception(
                    "%s failed to settle request %s", type(settler).__name__, record.request_id
                )
