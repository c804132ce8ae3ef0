"""`seal bench scale` on small synthetic stores (the tiny model): every operation is
timed at every size, the slopes are those of the times, the daemon step really
learned and the sleep measured what its budget allows."""

from __future__ import annotations

import json
import math

import pytest

from agent.bench.scale import OPERATIONS, slope


def test_slope_is_that_of_log_time_on_log_size():
    assert slope([10, 100, 1000], [0.01, 0.1, 1.0]) == pytest.approx(1.0)
    assert slope([10, 100, 1000], [0.5, 0.5, 0.5]) == pytest.approx(0.0)
    assert slope([10, 1000], [1.0, 10.0]) == pytest.approx(0.5)
    assert slope([10], [1.0]) is None


def test_bench_scale_times_every_operation_at_every_size(seal, tmp_path):
    out = tmp_path / "scale.json"
    r = seal("--set", "sleep.measure_budget=4", "bench", "scale", "--passages", "30", "--repeat", "1", "--out", str(out))
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert result["sizes"] == [10, 30]
    for size, res in zip(result["sizes"], result["results"], strict=True):
        assert res["learned"] == size and set(res["ops"]) == set(OPERATIONS)
        assert all(op["seconds"] > 0 and op["peak_mb"] > 0 for op in res["ops"].values())
        assert res["sleep_measured"] == [4]  # the budget, not every learned passage
        assert res["tables"]["adapters"] > size  # wake versions and sleep checkpoints
    for op in OPERATIONS:
        times = [res["ops"][op]["seconds"] for res in result["results"]]
        assert result["slopes"][op] == pytest.approx(math.log(times[1] / times[0]) / math.log(3))
    assert "seal bench scale" in r.stdout and "TUI snapshot" in r.stdout and "passages a sleep measured" in r.stdout
    shown = seal("bench", "show", str(out))
    assert shown.exit_code == 0 and "TUI draw 80x24" in shown.stdout


# ------------------------------------------------------------------ a busy machine
@pytest.mark.process
def test_seal_sets_a_short_openmp_spin_unless_the_environment_chose():
    """seal bench busy measured torch's default OpenMP spin 10.6x slower beside one busy
    core (results/busy.json); importing seal sets a short spin, before torch starts,
    and leaves a wait policy the user chose alone."""
    import os
    import subprocess
    import sys

    from tests.helpers import REPO

    probe = "import agent, os; print(os.environ.get('GOMP_SPINCOUNT'))"
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    run = lambda env: subprocess.run([sys.executable, "-c", probe], env=env, cwd=REPO, capture_output=True,  # noqa: E731
                                     text=True, check=True).stdout.strip()
    assert run(clean) == "10000"
    assert run({**clean, "OMP_WAIT_POLICY": "PASSIVE"}) == "None"
    assert run({**clean, "GOMP_SPINCOUNT": "5"}) == "5"


def test_the_busy_bench_tries_each_wait_policy_with_all_cores_and_one():
    from agent.bench.busy import SPIN, settings

    rows = settings(4)
    assert [(r["threads"], r["env"]) for r in rows] == [
        (4, {"GOMP_SPINCOUNT": "300000"}), (1, {"GOMP_SPINCOUNT": "300000"}), (4, SPIN), (1, SPIN),
        (4, {"OMP_WAIT_POLICY": "PASSIVE"}), (1, {"OMP_WAIT_POLICY": "PASSIVE"})]
    assert [r["threads"] for r in settings(1)] == [1, 1, 1]
