"""Progress of the slow one-time phases (download, conversion, warm-up), for a person watching.

On a terminal it is a tqdm bar on stderr; otherwise (a log file, a service manager, a test) it
is a few log lines: one at the start, one per tenth done, one at the end, with elapsed seconds.
Either way a start never looks hung. `PLORA_PROGRESS=0` silences both.
"""

from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("plora")


class Progress:
    def __init__(self, total: int, desc: str, unit: str = "it"):
        self.total, self.desc, self.done = total, desc, 0
        self._start = time.perf_counter()
        self._next_tenth = 1
        self._bar = None
        enabled = os.environ.get("PLORA_PROGRESS", "1") != "0" and total > 0
        self._log = enabled
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False)
            self._log = False
        if self._log:
            log.info("%s: 0/%d", desc, total)

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            if note:
                self._bar.set_postfix_str(note, refresh=False)
        elif self._log and self.done * 10 >= self._next_tenth * self.total:
            self._next_tenth = self.done * 10 // self.total + 1
            log.info("%s: %d/%d (%.1fs)%s", self.desc, self.done, self.total, self.elapsed, f" {note}" if note else "")

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
