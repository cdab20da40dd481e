"""The process's memory: resident set size now, its peak, and Linux's resettable high-water mark (so that the
peak of inference alone can be read after the model build)."""
from __future__ import annotations

import resource
import sys
from pathlib import Path


def rss_bytes() -> int | None:
    """Current resident set size (Linux /proc; None elsewhere)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    except OSError:
        return None


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def reset_peak_rss() -> bool:
    """Restart Linux's RSS high-water mark (VmHWM), so that the peak of inference alone can be read
    after the model build (whose allocator slack otherwise sets the process peak)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def hwm_bytes() -> int | None:
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) * 1024
