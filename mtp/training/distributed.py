"""Process-group start and teardown: the ranks of a DeepSpeed job (or a lone process), SIGTERM turned into a clean
exit (after any checkpoint being written), DeepSpeed's shared-memory buffers removed, seeds set."""

from __future__ import annotations

import atexit
import os
import random
import signal
import socket
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int, int]:
    """Start (or join) the process group. A lone process without a launcher gets world size 1."""
    import deepspeed

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:  # a lone process: a port the system says is free (not one it may share)
        os.environ["MASTER_PORT"] = str(free_port())
    # joins a process group someone else started (Ray Train) as well as starting one
    _owned["group"] = not dist.is_initialized()
    deepspeed.init_distributed(dist_init_required=not dist.is_initialized(), auto_mpi_discovery=False)
    atexit.register(_remove_shm_buffer, dist.get_rank())
    # the deepspeed launcher stops its ranks with SIGTERM, which would skip atexit (and leave the buffer behind)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    return dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])


def free_port() -> int:
    """A TCP port free on this host now (the system picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


_termination = {"deferred": False, "requested": False}
_owned = {"group": False}  # whether this process started its process group (not Ray Train)


def shutdown_distributed() -> None:
    """Tear down the process group this process started (not Ray Train's), every rank together, rather than leave it
    to the interpreter's exit. (One suite run on a loaded machine saw a rank of a finished 2-rank ZeRO-3 run end with
    "terminate called without an active exception", exit code 250; it did not recur alone, and that the teardown
    is its cause is not shown.)"""
    if _owned["group"] and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        _owned["group"] = False


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    """Turn SIGTERM into SystemExit, so that atexit handlers run; while a checkpoint is written, after it."""
    if _termination["deferred"]:
        _termination["requested"] = True
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the launcher's own SIGTERM follows: let the cleanup finish
    raise SystemExit(128 + signum)


@contextmanager
def terminate_after() -> Any:
    """Hold a SIGTERM until the block (a checkpoint) is complete, so that `latest` never names a partial one."""
    _termination["deferred"] = True
    try:
        yield
    finally:
        _termination["deferred"] = False
        if _termination["requested"]:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            raise SystemExit(128 + signal.SIGTERM)


def _remove_shm_buffer(rank: int) -> None:
    """DeepSpeed's CPU shared-memory allreduce creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>
    (about 66 MB) and never removes it: without this, every run leaves it behind until RAM runs out."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"
    Path("/dev/shm", name).unlink(missing_ok=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
