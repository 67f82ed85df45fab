"""Hydra's per-job log file, opened on the first record and never fatal.

A rerun of a finished job only reads its job dir, so it must work where that dir is read-only
(an archived sweep, another user's results). Hydra's stock ``FileHandler`` opens the file while
configuring logging and crashes there; this one logs to the console alone when it cannot write.
"""

from __future__ import annotations

import logging


class JobLogFile(logging.FileHandler):
    def __init__(self, filename: str, mode: str = "a", encoding: str | None = None) -> None:
        super().__init__(filename, mode=mode, encoding=encoding, delay=True)
        self.unwritable = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.unwritable:
            return
        if self.stream is None:
            try:
                self.stream = self._open()
            except OSError:
                self.unwritable = True
                return
        super().emit(record)
