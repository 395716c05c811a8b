"""The generated docs are current and the docs cite only paths that exist.

docs/flags.md (``python -m launch.flags_doc``) and docs/results.md
(``python -m experiments.results_doc``) must equal their generators'
output; a results file that no kind in ``experiments/results_doc.py``
claims is an error; every repository path the README and docs/ cite in
backticks exists.
"""

import json
import re
from pathlib import Path

import pytest

from experiments import results_doc
from launch import flags_doc

REPO = Path(__file__).resolve().parents[1]

# Paths the docs cite that do not exist, by document: known stale cases,
# to be fixed by the rewrite of that document (then this entry goes). The
# test fails when one of these exists again or the document stops citing
# it, so the list cannot outlive its cases.
KNOWN_STALE: dict[str, set[str]] = {}
# A backticked path under one of the repository's top directories, or a
# module path inside the package (`core/engine.py`); a trailing :LINE goes.
_CITED = re.compile(
    r"`((?:ftte_jax|experiments|launch|tests|docs|\.ci)/[\w./*-]*"
    r"|(?:core|data|search|experiment)/[\w./*-]+\.py)(?::\d+)?`")
_PACKAGE_RELATIVE = ("core/", "data/", "search/", "experiment/")


def test_flags_md_is_current():
  assert (REPO / flags_doc.OUT).read_text() == flags_doc.render(), (
      "docs/flags.md is stale: run python -m launch.flags_doc")


def test_flags_md_lists_every_flag_of_launch_main():
  from absl import flags
  from launch import main
  fv = flags.FlagValues()
  main.define_flags(fv)
  text = (REPO / flags_doc.OUT).read_text()
  listed = re.findall(r"^\| `--(\w+)` \|", text, re.M)
  assert sorted(listed) == sorted(fv), set(listed) ^ set(fv)
  assert "| `--concurrency` | `100` (fedavg: `10`) |" in text


def test_results_md_is_current():
  assert (REPO / results_doc.OUT).read_text() == results_doc.render(), (
      "docs/results.md is stale: run python -m experiments.results_doc")


def test_every_table_names_its_machine_once():
  text = results_doc.render()
  blocks = re.split(r"\n(?=## )", text)[1:]
  assert len(blocks) == len(results_doc.result_files(REPO))
  for block in blocks:
    tables = len(re.findall(r"^\|---", block, re.M))
    machines = re.findall(r"^(Machine: .+|Machine not recorded\.)$", block,
                          re.M)
    assert tables >= 1 and len(machines) == tables, block[:200]
  # A file without a machine says so rather than guessing.
  personal = json.loads(
      (REPO / "experiments/results/personalization.json").read_text())
  assert "machine" not in personal
  assert "## Personalization" in text and "Machine not recorded." in text


def _results_tree(root, files):
  for path, data in files.items():
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    (root / path).write_text(json.dumps(data))


def test_an_unregistered_results_file_fails_loudly(tmp_path):
  _results_tree(tmp_path, {
      "experiments/results/robustness.json": {
          "rows": [{"algorithm": "ftte", "behavior": "none", "fraction": 0.0,
                    "defence": "none", "final_accuracy": 0.5}]},
      "experiments/benchmarks/results/new_study_cpu.json": {"rows": []},
      "experiments/results/another.json": {}})
  with pytest.raises(results_doc.UnregisteredResults,
                     match=r"KINDS: experiments/results/another\.json \(no "
                     r"kind\); experiments/benchmarks/results/"
                     r"new_study_cpu\.json \(no kind\); add a Kind"):
    results_doc.render(tmp_path)
  assert results_doc.main(["--check"]) == 0  # the repository's own: fine.


def test_a_registered_kind_renders_its_rows(tmp_path):
  _results_tree(tmp_path, {"experiments/results/robustness.json": {
      "machine": "test box",
      "rows": [{"algorithm": "ftte", "behavior": "scale", "fraction": 0.1,
                "defence": d, "final_accuracy": a}
               for d, a in (("none", 0.25), ("median", 0.875))]}})
  text = results_doc.render(tmp_path)
  assert "Machine: test box.\n" in text
  assert ("| algorithm | behavior | fraction | none | median |\n"
          "|---|---|---|---|---|\n"
          "| ftte | scale | 0.1 | 0.25 | 0.875 |\n") in text
  # A file that does not fit its kind names itself.
  _results_tree(tmp_path, {"experiments/results/robustness.json": {
      "table": "no rows"}})
  with pytest.raises(ValueError, match="robustness.json: its kind's table"):
    results_doc.render(tmp_path)


def _cited(doc):
  return set(_CITED.findall((REPO / doc).read_text()))


def _exists(path):
  if path.startswith(_PACKAGE_RELATIVE):
    path = "ftte_jax/" + path
  if "*" in path:
    return any(REPO.glob(path))
  return (REPO / path).exists()


@pytest.mark.parametrize("doc", ["README.md", "docs/design.md",
                                 "docs/performance.md", "docs/flags.md",
                                 "docs/results.md"])
def test_cited_paths_exist(doc):
  missing = {p for p in _cited(doc) if not _exists(p)}
  assert missing == KNOWN_STALE.get(doc, set()), (
      f"{doc} cites missing paths {sorted(missing)}; the known stale ones "
      f"are {sorted(KNOWN_STALE.get(doc, set()))}")


def test_the_citation_pattern():
  text = ("`ftte_jax/core/engine.py` `core/fleet.py:12` `launch/` "
          "`experiments/results/*.json` `.ci/run` `results/x.json` "
          "`checkpoints/` `1/K` `ftte_jax.core.engine`")
  assert set(_CITED.findall(text)) == {
      "ftte_jax/core/engine.py", "core/fleet.py", "launch/",
      "experiments/results/*.json", ".ci/run"}
  assert _exists("core/fleet.py") and _exists("experiments/results/*.json")
  assert not _exists("ftte_jax/search/solver.py")


def test_intervals_row_selectors_and_dotted_field_names():
  ci = {"mean": 0.25, "half_width": 0.0123, "seeds": 5, "reached": 3}
  assert results_doc._show(ci) == "0.25 ± 0.012 (3/5 reached)"
  assert results_doc._show({"mean": None, "half_width": None}) == "-"
  rows = [{"name": "a", "paper_cell": False, "v": 1},
          {"name": "b", "paper_cell": True, "v": 2}]
  assert results_doc._get({"cells": rows}, "cells.paper_cell=true.v") == 2
  with pytest.raises(KeyError):
    results_doc._get({"cells": rows}, "cells.name=c.v")
  assert results_doc._cell({"mean acc. (pts)": 1.5}, "mean acc. (pts)") == "1.5"
