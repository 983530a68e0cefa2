"""One process of the multi-process preemption test: steps in lockstep (a collective each step, like a train
step) until ``PreemptionGuard.should_stop`` says so, then prints the step it stopped at.

usage: python train_preemption_worker.py PROCESS_ID NUM_PROCESSES PORT
"""

from __future__ import annotations

import sys
import time

MAX_STEPS = 3000


def main() -> None:
    pid, nproc, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    from ditto_jax import distributed

    distributed.initialize(f"127.0.0.1:{port}", nproc, pid, platform="cpu")
    import numpy as np
    from jax.experimental import multihost_utils

    from ditto_jax.train.preemption import PreemptionGuard

    with PreemptionGuard() as guard:
        print(f"mode {guard.mode}", flush=True)
        step = 0
        while step < MAX_STEPS and not guard.should_stop(step):
            multihost_utils.process_allgather(np.int32(step))
            step += 1
            if step == 5:
                print("looping", flush=True)
            time.sleep(0.01)
    print(f"stopped at {step}", flush=True)


if __name__ == "__main__":
    main()
