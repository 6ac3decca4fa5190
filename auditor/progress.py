"""Progress on long work: a tqdm bar on a terminal, plain lines otherwise (logs stay readable)."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from tqdm import tqdm


@contextmanager
def progress_bar(enabled: bool = True, desc: str = "auditor"):
    """Yields ``report(message, fraction)``; fraction in [0, 1]."""
    if not enabled:
        yield lambda msg, frac: None
        return
    if sys.stderr.isatty():
        bar = tqdm(total=100, desc=desc, file=sys.stderr, bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}",
                   leave=False)
        def report(msg: str, frac: float):
            bar.n = int(round(100 * min(max(frac, 0.0), 1.0)))
            bar.set_postfix_str(msg[:60], refresh=True)
        try:
            yield report
        finally:
            bar.close()
    else:
        last = [None]
        def report(msg: str, frac: float):
            if msg != last[0]:
                print(f"[{100 * min(max(frac, 0.0), 1.0):3.0f}%] {msg}", file=sys.stderr, flush=True)
                last[0] = msg
        yield report
