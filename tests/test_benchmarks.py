"""The benchmark scripts still run, and still check what they measure (small N, the test server)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
RELINK_ROWS = [
    "floor: os.link loop, directories made on the way",
    "links only: os.link loop, directories made beforehand",
    "startup: relink --dry-run --limit 0",
    "relink --workers 1, empty archive",
    "relink --workers 2, empty archive",
    "relink --workers 2, complete archive",
]
# The C fast route's baselines, measured in the same run whenever there is a C route.
if importlib.util.find_spec("relinker._speedups") is not None:
    RELINK_ROWS += ["relink --workers 2, complete archive, no directory listings",
                    "relink --workers 2, complete archive, pure Python"]


def run_script(name, *args):
    # cwd=/: the installed relinker, not the checkout, as for an operator
    return subprocess.run([sys.executable, str(BENCHMARKS / name), *map(str, args)],
                          capture_output=True, text=True, timeout=600, cwd="/")


def test_relink_bench_measures_every_row_on_the_same_data(pg_admin_dsn, tmp_path):
    figures = tmp_path / "figures.json"
    done = run_script("relink_bench.py", "--paths", 3000, "--db-url", pg_admin_dsn, "--workdir", tmp_path,
                      "--json-out", figures)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(figures.read_text())
    assert result["ok"] and result["failures"] == []
    assert [m["name"] for m in result["measurements"]] == RELINK_ROWS
    rows = {m["name"]: m for m in result["measurements"]}
    for name in RELINK_ROWS[3:]:
        summary = rows[name]["summary"]
        assert summary["problems"] == 0
        assert summary["links_present" if "complete" in name else "links_created"] == result["paths"]
        assert rows[name]["rate_over_floor"] > 0 and rows[name]["peak_rss_mb"] > 0
    assert "rate/floor" in done.stdout
    assert result["cpu_model"] and f"CPUs: {result['cpu_count']} ({result['cpu_model']})" in done.stdout
    assert list(tmp_path.iterdir()) == [figures]  # its data is gone


def test_plan_bench_plans_runs_over_many_blobs(pg_admin_dsn, tmp_path):
    done = run_script("plan_bench.py", "--blobs", 20000, "--db-url", pg_admin_dsn, "--workdir", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    planned = [int(line.rsplit(": ", 1)[1].split()[0].replace(",", "")) for line in done.stdout.splitlines()
               if line.startswith("plan a relink run")]
    assert len(planned) == 3 and all(ranges > 0 for ranges in planned), done.stdout
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_listed_bench_puts_a_listed_range_beside_the_interval_of_the_same_blobs(pg_admin_dsn):
    done = run_script("listed_bench.py", "--media", 3, "--blobs", 300, "--listed", 50, "--repeat", 1,
                      "--db-url", pg_admin_dsn)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.endswith(tuple("0123456789"))]
    assert [row[:2] for row in rows] == [["relink's", "range"], ["verify's", "sizes"]]
    assert all(len(row) == 7 and all(float(figure) > 0 for figure in row[3:]) for row in rows)


def test_content_bench_puts_each_relinker_figure_beside_its_baseline(pg_admin_dsn, tmp_path):
    figures = tmp_path / "figures.json"
    done = run_script("content_bench.py", "--small-files", 150, "--large-files", 2, "--large-mb", 2, "--young-store",
                      "--db-url", pg_admin_dsn, "--workdir", tmp_path, "--json-out", figures)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(figures.read_text())
    assert result["ok"] and result["failures"] == []
    assert result["store"].startswith("young")
    assert [(p["tree"], p["what"]) for p in result["pairs"]] == [
        (tree, what) for tree in ("many small files", "a few large files")
        for what in ("copy", "verify --hash", "verify")]
    for pair in result["pairs"]:
        assert pair["ratio"] > 0 and pair["relinker"]["peak_rss_mb"] > 0 and pair["baseline"]["seconds"] > 0
        assert pair["verdict"] in ("met", "NOT met", "unsteady baseline")
        # the layout's floor is measured for copy, beside cp
        assert (pair["floor"] is not None) == (pair["what"] == "copy")
        assert pair["floor"] is None or (pair["floor"]["ok"] and pair["floor"]["seconds"] > 0)
    assert "ratio" in done.stdout and "target" in done.stdout and "the floor of a copy" in done.stdout
    assert list(tmp_path.iterdir()) == [figures]  # its trees, stores and databases are gone


def test_content_bench_copies_by_default_into_a_store_with_every_directory(tmp_path):
    """A production store has every ab/cd/ already: by default the benchmark's copies go into such a store."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import content_bench
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert not content_bench.parse_args([]).young_store
    store = os.fsencode(tmp_path)
    content_bench.establish_store(store)
    levels = [name for name in os.listdir(store)]
    assert len(levels) == 256 and all(len(os.listdir(os.path.join(store, level))) == 256 for level in levels)
    assert os.path.isdir(os.path.join(store, b"ff", b"00"))


def test_content_bench_gives_no_verdict_on_a_baseline_whose_runs_disagree():
    """cp -a of one tree took 4.2 s, then 9.7 s: its median says more about the filesystem than about relinker."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import content_bench
        from benchlib import Measurement
    finally:
        sys.path.remove(str(BENCHMARKS))

    def pair(baseline_runs, relinker_seconds):
        baseline = Measurement("baseline: cp", sorted(baseline_runs)[1], 100, "B", None,
                               detail={"seconds_all": baseline_runs})
        ours = Measurement("relinker copy", relinker_seconds, 100, "B", 40, detail={"seconds_all": [relinker_seconds]})
        return content_bench.Pair("many small files", "copy", baseline, ours)

    assert pair([4.16, 9.69, 9.09], 8.99).verdict() == "unsteady baseline"  # a ratio of 1.01 is no verdict
    assert pair([4.35, 8.61, 4.03], 8.62).verdict() == "NOT met"  # one slow run leaves the median alone
    assert pair([4.35, 4.03, 4.60], 4.50).verdict() == "met"


def test_content_bench_bounds_a_copy_by_the_floors_cpu_and_the_servers_shared_by_the_cores():
    """The floor took 6 s of CPU and the catalogue 2 s of the server's: on 2 cores no copy beats 4 s."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import content_bench
        from benchlib import Measurement
    finally:
        sys.path.remove(str(BENCHMARKS))
    baseline = Measurement("baseline: cp", 4.0, 100, "B", None, client_cpu=3.0)
    floor = Measurement("floor", 7.0, 100, "B", None, client_cpu=6.0)
    ours = Measurement("relinker copy", 7.5, 100, "B", 40, client_cpu=8.5, server_cpu=2.0)
    pair = content_bench.Pair("many small files", "copy", baseline, ours, floor)
    assert content_bench.ideal_seconds(pair, 2) == 4.0
    assert content_bench.ideal_seconds(pair, 1) == 8.0
    ours.client_cpu = 1.2  # large contents: relinker writes them direct, the floor through the page cache
    assert content_bench.ideal_seconds(pair, 2) is None
    ours.client_cpu, ours.server_cpu = 8.5, None  # a server whose CPU cannot be read (another machine's)
    assert content_bench.ideal_seconds(pair, 2) is None
