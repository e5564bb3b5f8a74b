"""The process group of a ``torchrun`` worker: made here rather than by ``idist.initialize``, which
takes no store, so that it can meet under a prefix of its own.

Workers that torchrun restarts (``--max-restarts``) meet in the same store as the failed attempt,
whose rank addresses are still there: a new rank could read a dead one's address and wait for it
(gloo: 30 minutes). Each attempt, and each group one process makes, has its own prefix. Ignite
then takes the group as made (``idist.sync``), so ``idist.get_rank`` and the rest work as usual.
"""

from __future__ import annotations

import itertools
import logging
import os

import ignite.distributed as idist
import torch

log = logging.getLogger(__name__)

_GROUP_NUMBER = itertools.count(1)  # of the process groups this process made


def init_distributed() -> bool:
    """Join the process group ``torchrun`` describes (nccl with GPUs, gloo without)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or idist.get_world_size() > 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    store, rank, world = next(torch.distributed.rendezvous("env://"))  # torchrun's store (module docstring)
    store = torch.distributed.PrefixStore(f"segpipe/attempt_{elastic_restart()}/group_{next(_GROUP_NUMBER)}", store)
    if backend == "nccl":  # each process its own GPU, before NCCL binds to one
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world)
    idist.sync()
    log.info("distributed: rank %d of %d (%s)", idist.get_rank(), idist.get_world_size(), backend)
    return True


def elastic_restart() -> int:
    """How many times ``torchrun`` has restarted this worker group (``TORCHELASTIC_RESTART_COUNT``,
    set when ``--max-restarts`` brought the workers back after one failed): 0 on the first start.
    A restart resumes from the last checkpoint; before, it started afresh and deleted them."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
