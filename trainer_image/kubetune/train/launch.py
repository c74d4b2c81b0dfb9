"""torchrun, keeping the trainer's exit code: what worker pods run.

torchrun exits 1 whenever a rank fails, so a pod would hide why training stopped: bad
input (64, no point retrying), storage (74) or preemption (75, a checkpoint was committed).
This runs torchrun's own launcher with the same arguments and exits with the code of the
rank that failed first. When the pod itself is stopped (SIGTERM from the kubelet), torchrun
forwards the signal and gives the ranks time to commit a checkpoint; that ends as PREEMPTED.

    python -m kubetune.train.launch --nnodes 2 --nproc_per_node 4 ... -m kubetune.train.main --job JOB
"""

from __future__ import annotations

import sys
from typing import Optional

from ..api import exitcodes


def exit_code_of(failure_exitcode: int) -> int:
    """A rank killed by signal N reports -N; a shell (and the pod) would show 128 + N."""
    return failure_exitcode if failure_exitcode >= 0 else 128 - failure_exitcode


def main(argv: Optional[list[str]] = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except ChildFailedError as err:
        _, failure = err.get_first_failure()
        return exit_code_of(failure.exitcode)
    except SignalException as err:
        print(f"kubetune launch: stopped by signal {err.sigval}; the ranks committed a checkpoint if they could", file=sys.stderr)
        return exitcodes.PREEMPTED
    return exitcodes.OK


if __name__ == "__main__":
    sys.exit(main())
