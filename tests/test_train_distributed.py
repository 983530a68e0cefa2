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
