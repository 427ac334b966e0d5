"""Several processes, one job: the process group, a balanced split of the work, gathering, one progress bar.

Launch with ``torchrun --nproc_per_node N -m vbridge_core ...`` or ``accelerate launch ...``. The
process group comes from accelerate's :class:`~accelerate.PartialState` (NCCL on GPUs, each process
on ``cuda:LOCAL_RANK``; gloo on CPUs). Work is split once, up front, by a deterministic rule every
rank computes alike (no scheduler process, no messages): items are sorted by cost (image area) and
each goes to the rank with the least cost so far (longest-processing-time first), which keeps the
slowest rank within one item of the mean. Results travel with ``torch.distributed``'s object
collectives; live progress uses the process group's key-value store, so ranks never wait for one
another to report a step.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from .errors import InputError

logger = logging.getLogger(__name__)


def launched_world_size() -> int:
    """Processes in this launch (``WORLD_SIZE`` set by torchrun / accelerate launch; 1 when run plainly)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


@dataclass
class ProcessGroup:
    """This process's place in the launch: ``rank`` of ``world``, its ``device`` and the accelerate state."""

    rank: int
    world: int
    device: torch.device
    state: Any

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            self.state.wait_for_everyone()

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable, small), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sum_int(self, value: int) -> int:
        """Sum of ``value`` over all ranks."""
        if not self.distributed:
            return int(value)
        import torch.distributed as dist

        t = torch.tensor([int(value)], dtype=torch.int64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return int(t.item())


def process_group(device_arg: Optional[str] = None) -> ProcessGroup:
    """Join the launch's process group (or a group of one) and pick this process's device.

    With several processes each uses ``cuda:LOCAL_RANK`` (``--device`` may only say ``cuda`` or
    ``cpu``); ``--device cpu`` or a machine without CUDA runs every process on the CPU under gloo.
    """
    from accelerate import PartialState

    world = launched_world_size()
    want_cpu = device_arg is not None and str(device_arg).startswith("cpu")
    if world > 1 and device_arg not in (None, "cuda", "cpu") and not want_cpu:
        raise InputError(f"--device {device_arg}: with {world} processes each one uses cuda:LOCAL_RANK; give "
                         "--device cuda or cpu, or choose the GPUs with CUDA_VISIBLE_DEVICES")
    state = PartialState(cpu=want_cpu or not torch.cuda.is_available())
    if world > 1:
        device = torch.device("cpu") if want_cpu else state.device
    else:
        from .pipeline import resolve_device

        device = resolve_device(device_arg)
    return ProcessGroup(rank=state.process_index, world=state.num_processes, device=device, state=state)


def split_by_cost(costs: Sequence[float], world: int) -> list[list[int]]:
    """Indices of ``costs`` for each of ``world`` ranks, balanced by total cost; each index exactly once.

    Largest first, each to the rank with the least total so far (ties: lowest rank); every rank's
    list is in ascending index order. Deterministic, so every rank computes the same split.
    """
    if world < 1:
        raise ValueError("world must be >= 1")
    load = [0.0] * world
    shares: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(costs)), key=lambda k: (-float(costs[k]), k)):
        r = min(range(world), key=lambda q: (load[q], q))
        shares[r].append(i)
        load[r] += float(costs[i])
    return [sorted(s) for s in shares]


def image_hw(path: Any) -> tuple[int, int]:
    """``(height, width)`` of an image file, read from its header only."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception as e:
        raise InputError(f"cannot read image {path}: {e}") from None
    return int(h), int(w)


def image_area(path: Any) -> int:
    """Pixel count of an image file, read from its header only."""
    h, w = image_hw(path)
    return h * w


class SharedProgress:
    """One progress bar (with ETA) on rank 0 that counts the work of all ranks.

    Every rank adds its finished units to a counter in the process group's key-value store (a
    non-blocking add, no collective), rank 0 redraws the bar from the global count. :meth:`finish`
    on rank 0 keeps drawing until every rank has finished, then all ranks meet at a barrier.
    """

    _KEY = "vbridge_progress"

    def __init__(self, group: ProcessGroup, total: int, desc: str) -> None:
        self.group, self.total, self.desc = group, int(total), desc
        self.store = None
        if group.distributed:
            try:
                from torch.distributed import distributed_c10d

                self.store = distributed_c10d._get_default_store()
            except Exception as e:  # the bar then shows rank 0's own share only
                logger.debug("no key-value store for shared progress: %s", e)
        self.key = f"{self._KEY}_{time.monotonic_ns() if group.is_main else 0}"
        self.key = group.all_gather(self.key)[0]  # rank 0's key: a fresh counter for every bar
        self.local = 0
        self.bar = None
        if group.is_main and self.total > 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=desc, unit="step", dynamic_ncols=True)

    def _global(self, delta: int) -> int:
        if self.store is None:
            return self.local
        return int(self.store.add(self.key, int(delta)))

    def update(self, delta: int) -> None:
        """Count ``delta`` finished units of this rank."""
        if delta <= 0:
            return
        self.local += delta
        done = self._global(delta)
        if self.bar is not None:
            self.bar.update(max(0, min(done, self.total) - self.bar.n))

    def finish(self) -> None:
        """Wait for all ranks (rank 0 keeps the bar moving meanwhile), then close the bar."""
        if self.store is not None:
            self.store.add(self.key + "_done", 1)
            if self.group.is_main:
                while int(self.store.add(self.key + "_done", 0)) < self.group.world:
                    self.update_from_store()
                    time.sleep(0.2)
                self.update_from_store()
        self.group.barrier()
        if self.bar is not None:
            self.bar.close()

    def update_from_store(self) -> None:
        if self.bar is not None and self.store is not None:
            done = int(self.store.add(self.key, 0))
            self.bar.update(max(0, min(done, self.total) - self.bar.n))
