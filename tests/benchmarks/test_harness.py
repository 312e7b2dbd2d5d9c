import json
import subprocess
import sys
import time

from benchmarks import harness


def test_time_interleaved_returns_medians_in_order():
    medians = harness.time_interleaved({"slow": lambda: time.sleep(0.02), "fast": lambda: None},
                                       repeats=3, warmup=1)
    assert set(medians) == {"slow", "fast"}
    assert medians["slow"] >= 0.019
    assert medians["fast"] < medians["slow"]


def test_peak_rss_sees_an_allocation():
    import numpy as np

    with harness.PeakRSS() as peak:
        block = np.ones(64 * 1024 * 1024 // 8)  # 64 MiB, touched
        block.sum()
    assert peak.increase >= 48 * 1024 * 1024


def test_append_row_writes_results_and_refreshes_readme(tmp_path, monkeypatch):
    md, readme = tmp_path / "benchmarks.md", tmp_path / "README.md"
    readme.write_text(f"intro\n{harness.README_START}\nold\n{harness.README_END}\noutro\n")
    monkeypatch.setattr(harness, "RESULTS_MD", md)
    monkeypatch.setattr(harness, "README", readme)
    machine = harness.machine_info(("numpy",))
    harness.append_row("demo", {"speedup": 3.5, "extra": 1}, {"speedup": (">=", 3.0)}, machine)
    harness.append_row("demo", {"speedup": 2.0, "extra": 1}, {"speedup": (">=", 3.0)}, machine)
    rows = [line for line in md.read_text().splitlines() if "| demo |" in line]
    assert len(rows) == 2
    assert "speedup=3.5 (>= 3: met)" in rows[0]
    assert "speedup=2 (>= 3: MISSED)" in rows[1]
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n")
    assert "| demo | speedup=2 (>= 3: MISSED) |" in text  # only the newest row is shown
    assert "old" not in text


def test_render_table_marks_goals():
    table = harness.render_table("x", {"ratio": 0.5, "n": 3}, {"ratio": ("<=", 1.0)})
    assert "ratio" in table and "met" in table and "<= 1" in table


def test_unknown_benchmark_is_one_line_error():
    result = subprocess.run([sys.executable, "-m", "benchmarks", "no-such-bench", "--json"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "unknown benchmark 'no-such-bench'" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
