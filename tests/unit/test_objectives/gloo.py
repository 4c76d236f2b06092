"""Two-process gloo runs for the distributed parity tests: start, time out, tear down cleanly."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def start_worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


def end_worker() -> None:
    """Barrier, destroy the process group, and leave without the interpreter's teardown: on a loaded
    machine torch 2.13 sometimes aborts a finished worker there (SIGABRT, 'terminate called without
    an active exception') after its result was delivered. A queue's put() has already written."""
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def run(worker, *args, timeout: float = 120) -> None:
    """worker(rank, port, *args) in WORLD spawned processes; fails the test after `timeout` seconds."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.start_processes(worker, args=(port, *args), nprocs=WORLD, start_method="spawn", join=False)
    deadline = time.time() + timeout
    while not context.join(timeout=1):
        if time.time() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{worker.__name__} did not finish within {timeout} s")
