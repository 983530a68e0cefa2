"""Two processes on localhost (gloo collectives) train to the same parameters as one process."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from train_fixtures import REPO, env

WORKER = Path(__file__).with_name("train_distributed_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process(tmp_path: Path) -> None:
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / "multi.npz"), str(i), "2", str(port)],
                              env=env(devices=1), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    single = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "single.npz"), "0", "1", "0"],
                            env=env(devices=2), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    a, b = np.load(tmp_path / "single.npz"), np.load(tmp_path / "multi.npz")
    assert set(a.files) == set(b.files) and len(a.files) > 5
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-6)
    for k in a.files:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_sigterm_to_one_process_stops_every_process_at_the_same_step(tmp_path: Path) -> None:
    import signal

    port = _free_port()
    worker = Path(__file__).with_name("train_preemption_worker.py")
    procs = [subprocess.Popen([sys.executable, str(worker), str(i), "2", str(port)], env=env(devices=1), cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        seen: list[list[str]] = [[], []]
        for i, p in enumerate(procs):
            for line in p.stdout:  # type: ignore[union-attr]
                seen[i].append(line)
                if line.startswith("looping"):
                    break
        assert all(any(line.startswith("mode jax") for line in lines) for lines in seen), seen
        procs[1].send_signal(signal.SIGTERM)  # only one process gets the notice
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], outs
    stops = [[line for line in out.splitlines() if line.startswith("stopped at")] for out in outs]
    assert stops[0] == stops[1] and len(stops[0]) == 1, outs
    assert int(stops[0][0].split()[-1]) < 3000  # stopped by the notice, not by the step limit
