"""The allocator's peak of a piece of work: the most memory its tensors held at once above what was allocated when
it began (never the process's RSS, which counts the interpreter, the libraries and freed-but-kept pages).

On CUDA: `torch.cuda.reset_peak_memory_stats` / `max_memory_allocated` minus the memory allocated before (cheap).
On CPU (no allocator statistics): torch.profiler's CPU memory events, cumulated in time order (slow: measure once).
The reset wipes the process's CUDA peak; `process_peak_gpu_bytes` adds back the largest one wiped (row.py reads it).
"""

from __future__ import annotations

import torch

_wiped: dict[int, int] = {}  # CUDA device index -> the largest process peak a measurement reset


class AllocatorPeak:
    """`with AllocatorPeak(device) as peak: work()`, then `peak.bytes`. On CPU the profiler's events are read on the
    first `bytes` (the costly part, so a caller can do it off any clock)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._bytes: int | None = None
        self._prof = None

    def __enter__(self) -> AllocatorPeak:
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self.device = torch.device("cuda", index)
            torch.cuda.synchronize(self.device)
            _wiped[index] = max(_wiped.get(index, 0), torch.cuda.max_memory_allocated(self.device))
            self._before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._prof is not None:
            self._prof.__exit__(*exc)
        else:
            torch.cuda.synchronize(self.device)
            self._bytes = torch.cuda.max_memory_allocated(self.device) - self._before

    @property
    def bytes(self) -> int:
        if self._bytes is None:
            events = sorted(self._prof.events(), key=lambda e: e.time_range.start)
            level = peak = 0
            for e in events:
                level += e.self_cpu_memory_usage
                peak = max(peak, level)
            self._bytes, self._prof = peak, None
        return self._bytes


def peak_bytes(fn, device: torch.device | str = "cpu") -> int:
    """The allocator's peak of fn() on `device` (bytes above what was allocated before)."""
    with AllocatorPeak(device) as peak:
        fn()
    return peak.bytes


def process_peak_gpu_bytes() -> int:
    """This process's peak allocated CUDA memory on the current device, across the measurements' resets."""
    index = torch.cuda.current_device()
    return max(torch.cuda.max_memory_allocated(index), _wiped.get(index, 0))
