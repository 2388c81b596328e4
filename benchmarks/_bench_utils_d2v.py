"""Helpers shared by the AV-data2vec benchmarks: thread setup, timing, the machine's measured
fp32 matmul peak, peak memory and plain-text tables.

Run the benchmarks from the repository root (``python benchmarks/<name>.py``); they put the
root on ``sys.path`` themselves.
"""
import os
import platform
import resource
import sys
import time
from typing import Callable, List, Sequence

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


def set_threads(threads: int) -> None:
    """Intra-op and inter-op threads of this process (call before any parallel work)."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already set once in this process
        pass


def best_seconds(run: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """The fastest of ``repeats`` wall-clock timings (seconds) of ``run()`` after ``warmup``
    untimed calls: the minimum is the figure least disturbed by other processes."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_flops(m: int, k: int, n: int) -> int:
    """Floating-point operations of an (m, k) @ (k, n) product: one multiply and one add per
    term (the convention of ``torch.utils.flop_counter``)."""
    return 2 * m * k * n


def measured_matmul_peak(size: int = 2048, repeats: int = 5) -> float:
    """This process's achievable fp32 FLOP/s: the best of ``repeats`` (size x size) @ (size x
    size) matmuls with the current thread count."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator)
    b = torch.randn(size, size, generator=generator)
    seconds = best_seconds(lambda: torch.mm(a, b), repeats)
    return matmul_flops(size, size, size) / seconds


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB; ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine_description() -> str:
    """CPU model, core count and the torch build, for the report header."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; floats printed with 3 significant digits."""
    def cell(value: object) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines: List[str] = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)
