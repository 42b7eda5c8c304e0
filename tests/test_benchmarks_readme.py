"""The published results agree with the JSON they come from: benchmarks/README.md and README.md's headline
are what benchmarks/tables.py makes of benchmarks/results/ now, every section names the commands behind its
figures, and no results file records a path of the machine that made it."""
from __future__ import annotations

import json
import os
from pathlib import Path

from benchmarks import tables
from benchmarks.common import ABSOLUTE, portable, portable_path, portable_text

STALE = "out of date: run python benchmarks/tables.py --write"


def test_benchmarks_readme_is_generated_from_the_results():
    assert tables.BENCH_README.read_text() == tables.bench_readme(), f"benchmarks/README.md {STALE}"


def test_readme_headline_is_generated_from_the_results():
    text = tables.README.read_text()
    assert tables.HEADLINE_MARKERS[0] in text and text == tables.readme_with_headline(text), f"README.md {STALE}"
    final = next(h for h in json.loads((tables.RESULTS / "report.json").read_text())["headline"] if h["role"] == "final")
    assert f"**{final['artifact']}** (final)" in text and f"{final['faster_vs_bert_base_torch_fp32']:.1f}×" in text


def test_every_section_names_the_commands_behind_its_figures():
    for key, title, _ in tables.SECTIONS:
        section = tables.TABLES[key]()
        assert "not recorded" not in section, title
        assert "python benchmarks/" in section or "bertforge " in section, title


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def test_results_hold_no_absolute_machine_paths():
    files = [p for p in tables.RESULTS.iterdir() if p.is_file() and p.suffix in (".json", ".md", ".html")]
    assert len(files) >= 10
    for path in files:
        text = path.read_text()
        assert not ABSOLUTE.findall(text), f"{path.name}: {ABSOLUTE.findall(text)[:3]}"
        if path.suffix == ".json":
            absolute = [s for s in _strings(json.loads(text)) if os.path.isabs(s)]
            assert not absolute, f"{path.name}: {absolute[:3]}"


def test_portable_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("GLUE_DIR", str(tmp_path / "glue"))
    inside = tables.RESULTS / "teachers" / "sst2"
    assert portable_path(inside) == "benchmarks/results/teachers/sst2"
    assert portable_path(tmp_path / "glue" / "SST-2" / "dev.tsv") == "$GLUE_DIR/SST-2/dev.tsv"
    assert portable_path("/home/someone/models/int8") == "<external>/int8"
    assert portable_path("runs/int8") == "runs/int8"
    # another checkout of the project (a result made in another worktree) counts as the repository
    assert portable_path("/work/main/benchmarks/results/x.json", repos=(Path("/work/main"),)) == "benchmarks/results/x.json"
    command = f"python benchmarks/x.py --glue-dir {tmp_path}/glue --train-file cola={inside}/aug.tsv --url http://h:1/tmp/a"
    assert portable_text(command) == ("python benchmarks/x.py --glue-dir $GLUE_DIR --train-file "
                                      "cola=benchmarks/results/teachers/sst2/aug.tsv --url http://h:1/tmp/a")
    assert portable_text(f"masked-lm:{inside}/aug.tsv.mlm") == "masked-lm:benchmarks/results/teachers/sst2/aug.tsv.mlm"
    row = portable({"artifact": str(inside), "scores": [0.5], "lineage": [{"path": "/tmp/x/teacher"}]})
    assert row == {"artifact": "benchmarks/results/teachers/sst2", "scores": [0.5], "lineage": [{"path": "<external>/teacher"}]}


def test_the_fidelity_table_takes_the_fastest_candidate_at_each_closeness_to_the_teacher():
    def cand(name, depth, prune, quantize, changed, drop, ms):
        return {"name": name, "settings": {"depth": depth, "prune": prune, "vocab": "full", "graph": "fused",
                                           "quantize": quantize},
                "validation_answers_changed": changed, "validation_drop_points": drop, "latency_ms": ms}
    search = {"validation_examples": 400, "candidates": [
        cand("teacher", 6, [0.0, 0.0], "fp32", 0.0, 0.0, 20.0),
        cand("int8", 6, [0.0, 0.0], "dynamic", 0.045, 0.5, 8.0),
        cand("pruned", 6, [0.5, 0.5], "dynamic", 0.09, -3.0, 5.0),
        cand("small", 3, [0.5, 0.5], "dynamic", 0.125, 0.0, 2.5)]}
    lines = [line for line in tables.budget_fidelity({"mrpc": search}).splitlines() if line.startswith("| mrpc")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert [c[1] for c in cells] == ["0%", "2%", "5%", "10%", "any"]
    assert [c[2] for c in cells] == ["L6 h0% f0% full fused fp32", "L6 h0% f0% full fused fp32",
                                     "L6 h0% f0% full fused dynamic", "L6 h50% f50% full fused dynamic",
                                     "L3 h50% f50% full fused dynamic"]
    assert cells[2][6] == "2.5×" and cells[4][6] == "8.0×"  # against the teacher's graph, same round robin
    assert tables.budget_fidelity({}) == ""
