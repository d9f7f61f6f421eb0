"""Progress lines with an ETA for the long export-side steps (training, export, validation)."""

import sys
import time


class Progress:
    def __init__(self, what: str, total: int, every_s: float = 10.0):
        self.what, self.total, self.every_s = what, total, every_s
        self.start = self.last = time.perf_counter()

    def update(self, done: int, note: str = "") -> None:
        now = time.perf_counter()
        if now - self.last < self.every_s and done < self.total:
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed / max(done, 1) * (self.total - done)
        print(f"{self.what}: {done}/{self.total} {note} [{fmt(elapsed)} elapsed, ETA {fmt(eta)}]",
              file=sys.stderr, flush=True)

    def elapsed(self) -> str:
        return fmt(time.perf_counter() - self.start)


def fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"
