"""The time of a ``mlkv reproduce`` run resumed across invocations: the sum of its stages' recorded seconds, which
a killed invocation keeps (mlkv.reproduce.timing)."""

import json
import time

import pytest

import mlkv.reproduce.pipeline as rp
from mlkv.data.paths import default_data_dir
from mlkv.reproduce.config import Settings
from mlkv.reproduce.pipeline import reproduce
from mlkv.reproduce.timing import StageClock, recorded_seconds

DATA = default_data_dir()


def test_a_stage_records_its_seconds_while_it_runs_so_a_kill_keeps_them(tmp_path):
    clock = StageClock.load(tmp_path)
    with clock.heartbeat(every=0.05), clock.stage("uptrain"):
        time.sleep(0.3)
        on_disk = json.loads((tmp_path / "timing.json").read_text())  # what a kill -9 here would leave
    assert on_disk["stages"]["uptrain"] >= 0.2
    total, stages = recorded_seconds(tmp_path)
    assert set(stages) == {"uptrain"} and total == pytest.approx(stages["uptrain"]) and total >= 0.3


def test_a_timing_file_from_before_the_stages_counts_as_one_entry(tmp_path):
    (tmp_path / "timing.json").write_text(json.dumps({"earlier_seconds": 90.0}))
    assert recorded_seconds(tmp_path) == (90.0, {"earlier": 90.0})
    assert recorded_seconds(tmp_path / "nothing") == (None, {})


@pytest.mark.skipif(not (DATA / "corpus" / "gutenberg").is_dir(), reason="shared data not found")
def test_a_rerun_after_a_kill_reports_the_sum_of_every_invocations_stages(tmp_path, monkeypatch):
    """A run killed in its uptraining recorded 3.5 min of stages; the rerun's report adds its own, not only them."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "timing.json").write_text(json.dumps({"stages": {"base": 120.0, "convert": 30.0, "uptrain": 60.0}}))
    monkeypatch.setattr(rp, "stage_base", lambda s, data, out: (time.sleep(0.1), out / "base")[1])
    monkeypatch.setattr(rp, "stage_convert", lambda *args: {})
    monkeypatch.setattr(rp, "stage_uptrain", lambda *args: {})
    monkeypatch.setattr(rp, "stage_eval", lambda *args: {})
    reproduce(Settings.smoke_settings(str(out), data_dir=str(DATA), plans=["MLKV-2"], distill_plans=[],
                                      init_plans=[]))
    results = json.loads((out / "results.json").read_text())
    assert 210.1 <= results["seconds"] < 220
    assert results["stage_seconds"]["base"] >= 120.1 and results["stage_seconds"]["uptrain"] == 60.0
    assert set(results["stage_seconds"]) == {"base", "convert", "uptrain", "eval", "bench", "report"}
    assert "- time: 3.5 min (base 2.0, convert 0.5, uptrain 1.0, eval 0.0, bench 0.0, report 0.0 min, summed over " \
           "the invocations)" in (out / "report.md").read_text()
