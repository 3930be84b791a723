"""This process's peak resident memory (VmHWM), reset at the start of each task.

Ray pools worker processes, so a task resets the peak before it starts and reads it when it ends; the figure
is what the kernel counts for the process, measured from outside the Python heap.
"""

from __future__ import annotations


def reset_peak_memory() -> None:
    """Reset this process's peak resident set (VmHWM) so that :func:`peak_memory` measures from now
    (Linux >= 4.0: writing 5 to /proc/self/clear_refs). A pooled Ray worker runs many tasks: without the
    reset, a task would report the largest of its predecessors."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:  # not Linux, or not permitted: the peak is then the process's lifetime peak
        pass


def peak_memory() -> int | None:
    """Peak resident set of this process in bytes since :func:`reset_peak_memory` (VmHWM), as the kernel
    counts it: private pages plus the shared (object-store) pages this process touched."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):  # pragma: no cover
        return None
