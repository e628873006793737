"""The paper-table benchmark in its quick mode (a low-budget demo, 1 seed, 3 steps): a smoke test only, so the
benchmark command does not rot. It asserts the table's structure, not its numbers."""
import json

import benchmarks.paper_table as paper_table
from benchmarks.paper_table import METRICS, VARIANTS, main


def test_paper_table_quick(tmp_path, monkeypatch):
    common = ["--quick", "--demo", str(tmp_path / "demo"), "--work", str(tmp_path / "work"),
              "--partial", str(tmp_path / "partial.json")]
    main([*common, "--out", str(tmp_path / "results")])
    result = json.loads((tmp_path / "results.json").read_text())
    rows = result["rows"]
    assert rows[0]["variant"] == "reference"
    assert {(r["objective"], r["variant"]) for r in rows[1:]} == {
        (o, v) for o in ("pd", "lcm", "dmd2", "tdd") for v in VARIANTS}
    for row in rows[1:]:
        assert set(row["summary"]) == set(METRICS)
        assert row["summary"]["fid"]["mean"] is not None and row["summary"]["seconds_per_update"]["n"] == 1
    md = (tmp_path / "results.md").read_text()
    assert "Does DDIL beat its baseline?" in md and "| tdd +DDIL +reflection | 4 |" in md

    # --resume continues from the partial file: nothing measured is trained again, and the table is the same
    monkeypatch.setattr(paper_table, "distill", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    main([*common, "--resume", "--out", str(tmp_path / "resumed")])
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert [r["per_seed"] for r in resumed["rows"]] == [r["per_seed"] for r in rows]
