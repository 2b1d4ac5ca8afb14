"""Peak memory per phase of a run (start-up, reference pass, policy forward, backward, optimizer step, validation,
checkpoint, export), so a user sees what a run needs and which phase sets it.

On CPU the peak is the process's resident set high-water mark (`VmHWM` in /proc/self/status), which the kernel
resets to the current RSS when "5" is written to /proc/self/clear_refs; on CUDA it is torch's peak allocated and
reserved bytes, reset with `reset_peak_memory_stats`. Phases nest (the reference pass inside a step): entering or
leaving one first folds the peak so far into every open phase, then resets it, so an outer phase's peak still
covers its inner ones. Trade-off: two small reads of /proc (or of torch's counters) per phase boundary, a few per
micro-batch; where clear_refs cannot be written (not Linux, a restricted /proc) the CPU peak cannot be reset and
each phase reports the process's peak so far, which still bounds it from above.

On CPU with glibc, entering a phase first hands the heap's free pages back to the system (`malloc_trim`): what an
earlier phase freed is otherwise kept resident by the C allocator and counted in every later phase's RSS, up to a
gigabyte on a 135M model (activations of one micro-batch freed in its backward, then held through the next
reference pass). Trade-off: the pages a phase touches again are faulted in anew, a cost measured in
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import re
import resource
import sys

import torch

MIB = 1 << 20
_HWM = re.compile(rb"VmHWM:\s+(\d+) kB")


def _read_hwm() -> int | None:
    """The resident-set high-water mark in bytes, or None where /proc/self/status has none."""
    try:
        with open("/proc/self/status", "rb") as handle:
            match = _HWM.search(handle.read())
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def peak_rss_bytes() -> int:
    """The process's peak RSS since the last reset (VmHWM), else since it started (getrusage)."""
    hwm = _read_hwm()
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim`, or None (another C library, or none found)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Return the C heap's free pages to the system (glibc); nothing elsewhere."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class PhaseMemory:
    """`with memory.phase("backward"): ...` records that phase's peak; `summary()` gives the metrics.

    On CPU: `memory/<phase>_rss_mib`; on CUDA: `memory/<phase>_allocated_mib` and `memory/<phase>_reserved_mib`.
    A phase entered many times keeps its highest peak. Phases opened inside an `exclusive` one (validation runs the
    same reference and forward passes as a step) are not recorded on their own: the outer phase covers them."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.peaks: dict[str, dict[str, int]] = {}
        self._open: list[str] = []
        self._exclusive = False  # an exclusive phase is open
        self._overall: dict[str, int] = {}  # also what ran between phases

    def _measure(self) -> dict[str, int]:
        if self.cuda:
            return {
                "allocated": torch.cuda.max_memory_allocated(self.device),
                "reserved": torch.cuda.max_memory_reserved(self.device),
            }
        return {"rss": peak_rss_bytes()}

    def _reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_rss()

    def _fold(self, release: bool = False) -> None:
        """The peak since the last reset goes into every open phase; then the counter restarts from now (on CPU
        with `release`, after the heap's free pages are returned: see the module's docstring)."""
        measured = self._measure()
        for key, value in measured.items():
            self._overall[key] = max(self._overall.get(key, 0), value)
        for name in self._open:
            peaks = self.peaks.setdefault(name, {})
            for key, value in measured.items():
                peaks[key] = max(peaks.get(key, 0), value)
        if release and not self.cuda:
            release_free_memory()
        self._reset()

    @contextlib.contextmanager
    def phase(self, name: str, exclusive: bool = False):
        if self._exclusive:
            yield
            return
        self._fold(release=True)
        self._exclusive = exclusive
        self._open.append(name)
        try:
            yield
        finally:
            self._fold()
            self._open.remove(name)
            self._exclusive = False

    def summary(self) -> dict[str, float]:
        """`memory/<phase>_<kind>_mib` for every phase seen, plus `memory/peak_<kind>_mib`: the peak since the
        recorder started, phases and what ran between them. (Resetting VmHWM also resets what getrusage and a
        parent's wait4 report as the process's peak: read this one instead.)"""
        self._fold()
        out: dict[str, float] = {}
        for name, peaks in self.peaks.items():
            for key, value in peaks.items():
                out[f"memory/{name}_{key}_mib"] = round(value / MIB, 1)
        for key, value in self._overall.items():
            out[f"memory/peak_{key}_mib"] = round(value / MIB, 1)
        return out

    def describe(self) -> str:
        """One line for the run's end: `peak memory: forward 812 MiB, backward 1,020 MiB, ...` (RSS on CPU)."""
        kinds = ("allocated", "reserved") if self.cuda else ("rss",)
        parts = []
        for name, peaks in self.peaks.items():
            values = "/".join(f"{peaks[k] / MIB:,.0f}" for k in kinds if k in peaks)
            parts.append(f"{name} {values}")
        unit = "MiB allocated/reserved" if self.cuda else "MiB RSS"
        return f"peak memory ({unit}): " + ", ".join(parts)
