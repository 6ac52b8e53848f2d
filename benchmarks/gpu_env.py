"""The header of the GPU run book's results: the GPU by name, torch / transformers / attnkit / flash_attn versions,
the date and how the numbers were taken."""

from __future__ import annotations

import datetime
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"no GPU: CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def flash_attn_status() -> tuple[bool, str]:
    """(importable, version or the reason it is not)."""
    try:
        import flash_attn
    except Exception as e:   # noqa: BLE001 -- any import failure (missing, ABI mismatch) means: not usable
        return False, f"not importable ({type(e).__name__}: {e})"
    return True, getattr(flash_attn, "__version__", "?")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"torch": torch.__version__, "CUDA (torch build)": str(torch.version.cuda),
            "transformers": _version("transformers"), "attnkit": f"{_version('attnkit')} (commit {commit})",
            "flash_attn": flash_attn_status()[1], "python": platform.python_version()}


def header(dry_run: bool) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    dry = " — DRY RUN (toy sizes on the CPU in float32: these numbers measure nothing)" if dry_run else ""
    lines = ["# attnkit GPU run book", "", f"- GPU: **{device_name()}**{dry}", f"- date: {now}"]
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        lines.append(f"- GPU memory: {total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free at start)")
    lines += [f"- {k}: {v}" for k, v in versions().items()]
    lines += ["- models: random weights, the published configs (`benchmarks/gpu_models.py`); times are medians of "
              "interleaved rounds after a warm-up round, with `torch.cuda.synchronize()` before every clock read; "
              "peak = `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()` (in brackets: above "
              "what was allocated before the call, i.e. without the weights)", ""]
    return "\n".join(lines)
