"""How many CPU threads a process of this job may use: the CPUs it may run on (affinity) and the container's CPU
quota (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), shared by the job's processes on this machine and their
data-loader workers.

torch starts one intra-op thread per core it sees, not per core the job may use: in a container limited to 2 CPUs
on a 64-core host, or under ``taskset``, or with several processes per machine, the threads outnumber the CPUs and
OpenMP's spinning threads wait on each other (an epoch of seconds took minutes under a load of 8 on two cores).
"""
from __future__ import annotations

import math
import os

_CGROUP = "/sys/fs/cgroup"


def affinity_cpus() -> int:
    """CPUs this process may run on (``sched_getaffinity``; all visible CPUs where the call does not exist)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _own_cgroup(version: str) -> str:
    """This process's cgroup folder (v2: the ``0::`` line; v1: the ``cpu`` controller's line)."""
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return ""
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if (version == "v2" and controllers == "") or (version == "v1" and "cpu" in controllers.split(",")):
            return path.lstrip("/")
    return ""


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError:
        return None


def quota_cpus(root: str = _CGROUP) -> float | None:
    """The tightest CPU quota (in CPUs) of this process's cgroup and its parents, None when unlimited. Inside a
    container the cgroup namespace makes ``root`` itself the container's group, which is read too."""
    limits = []
    for version, leaf in (("v2", "cpu.max"), ("v1", "cpu.cfs_quota_us")):
        base = root if version == "v2" else os.path.join(root, "cpu")
        folder = os.path.join(base, _own_cgroup(version))
        while True:
            if version == "v2":
                text = _read(os.path.join(folder, leaf))
                parts = text.split() if text else []
                if len(parts) == 2 and parts[0] != "max" and parts[0].isdigit() and parts[1].isdigit():
                    limits.append(int(parts[0]) / max(int(parts[1]), 1))
            else:
                quota, period = _read(os.path.join(folder, leaf)), _read(os.path.join(folder, "cpu.cfs_period_us"))
                if quota and period and quota.lstrip("-").isdigit() and int(quota) > 0 and period.isdigit():
                    limits.append(int(quota) / max(int(period), 1))
            if os.path.abspath(folder) == os.path.abspath(base):
                break
            folder = os.path.dirname(folder)
    return min(limits) if limits else None


def cpu_budget(root: str = _CGROUP) -> tuple[int, str]:
    """``(CPUs, how it was found)``: the affinity count capped by the quota (rounded down, at least 1)."""
    cpus, quota = affinity_cpus(), quota_cpus(root)
    if quota is None:
        return cpus, f"{cpus} CPUs this process may run on, no cgroup CPU quota"
    return max(1, min(cpus, math.floor(quota))), f"{cpus} CPUs this process may run on, cgroup quota {quota:g} CPUs"


def threads_for(budget: int, processes: int, workers: int) -> int:
    """Intra-op threads of each of ``processes`` processes on this machine, each with ``workers`` data-loader
    workers: the budget shared by the processes, less one CPU per worker (a worker runs single-threaded while it
    decodes and augments), at least 1."""
    return max(1, budget // max(processes, 1) - workers)
