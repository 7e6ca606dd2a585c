"""``cubelm train --nproc N``: relaunch the same command under torchrun's elastic agent on this machine.

Equivalent to ``torchrun --standalone --nproc-per-node N -m cubelm train …`` (rendezvous on a free local port, no
restarts). When a rank dies the agent notices within ``monitor_interval`` (0.1 s), stops the other ranks and
the launch fails at once with a message naming the rank that failed first; ranks that stop answering without
dying are caught by the collective timeout (``--dist-timeout``). For several machines run torchrun yourself
(see the README).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import uuid

from cubelm.errors import CubelmError


def options_to_argv(options, *, skip: tuple[str, ...] = ()) -> list[str]:
    """Flags that rebuild ``options`` (a CLI options dataclass): every field that differs from its default."""
    argv = []
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        default = f.default if f.default is not dataclasses.MISSING else object()
        if f.name in skip or value == default or "help" not in f.metadata:
            continue
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag.removeprefix("--"))
        elif value is not None:
            argv.append(f"{flag}={value}")
    return argv


def describe_exit(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def launch_local(nproc: int, cli_args: list[str]) -> int:
    """Run ``python -m cubelm *cli_args`` on ``nproc`` local ranks; raise a CubelmError naming a failed rank."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch
    # Like torchrun: one BLAS thread per rank unless told otherwise, or N ranks fight over the cores.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"cubelm-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    try:
        elastic_launch(config, sys.executable)("-m", "cubelm", *cli_args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        raise CubelmError(f"rank {rank} of {nproc} failed first ({describe_exit(failure.exitcode)}); the other "
                          f"ranks were stopped. Its own error, if it printed one, is above; resume with --resume") from None
    return 0
