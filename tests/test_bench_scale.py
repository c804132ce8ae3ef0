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
