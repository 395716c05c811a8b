r"""Writes docs/results.md from the results files the experiments wrote.

  python -m experiments.results_doc            # rewrite docs/results.md
  python -m experiments.results_doc --check    # exit 1 if it is stale

Every ``experiments/results/*.json`` and
``experiments/benchmarks/results/*.json`` belongs to exactly one kind in
``KINDS`` below: which files (a glob), a title, a sentence on what was
measured and how to rerun it, and its tables, each a list of rows found at
a dotted path in the JSON with the columns to show. Each table names its
machine once, as the file recorded it (``"machine"``), or says "machine not
recorded". A results file no kind claims is an error here and in
``tests/test_docs.py``, so nothing is left out silently.

To add a kind: append a ``Kind`` to ``KINDS``. Most files hold a list of
flat row dicts under "rows"; for those,
``Kind("experiments/results/NAME*.json", "Title", "About.",
(Table("rows"),))`` shows every scalar column, and ``columns=`` picks and
names them.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from ftte_jax.experiment import stats
from launch import flags_doc

REPO = Path(__file__).resolve().parents[1]
OUT = Path("docs") / "results.md"
RESULT_DIRS = ("experiments/results", "experiments/benchmarks/results")
NO_MACHINE = "machine not recorded"


@dataclasses.dataclass(frozen=True)
class Table:
  """One table of a results file.

  ``rows``: dotted path to the rows (list indices are numbers, e.g.
  "results.0.sides"; "" is the whole file): a list of dicts, a dict of
  dicts (each a row, its key in the field named ``key``), or a dict of
  values (one row).
  ``columns``: (header, dotted path in a row) pairs; empty: every scalar
  field of the first row. ``pivot``: (row fields, column field, value
  field): one line per distinct row-field values, one column per distinct
  column-field value.
  """

  rows: str
  columns: tuple[tuple[str, str], ...] = ()
  caption: str = ""
  key: str = "key"
  pivot: tuple[tuple[str, ...], str, str] | None = None


@dataclasses.dataclass(frozen=True)
class Kind:
  """A kind of results file: ``pattern`` (a glob relative to the
  repository), its section ``title`` ({name}: the file's name without
  .json), ``about`` (what it measures; the command that writes it) and its
  ``tables``."""

  pattern: str
  title: str
  about: str
  tables: tuple[Table, ...]


def _c(*pairs: str) -> tuple[tuple[str, str], ...]:
  """Columns from "header=path" or "path" (header = path) strings."""
  out = []
  for p in pairs:
    header, _, path = p.rpartition("=")
    out.append((header or path, path))
  return tuple(out)


_COMPARE = _c("algorithm", "final acc=final_accuracy",
              "best acc=best_accuracy", "time to target (s)=time_to_target_s",
              "speedup vs fedavg=speedup_vs_fedavg",
              "peak device memory (B)=peak_device_memory_bytes",
              "memory vs fedavg=memory_ratio_vs_fedavg",
              "upload/update (B)=upload_bytes_per_update",
              "upload vs fedavg=upload_ratio_vs_fedavg",
              "mean staleness=mean_staleness",
              "client updates=client_updates",
              "virtual time (s)=virtual_time_s",
              "eligible devices=eligible_clients", "stopped by=stopped_by")

# The registry: one entry per kind of results file, in the page's order.
KINDS: tuple[Kind, ...] = (
    Kind("experiments/results/compare_*.json", "FTTE against the baselines "
         "({name})",
         "experiments/compare.py runs each algorithm on one shared setup "
         "(the flagfile named by the file) and reports time to the target "
         "accuracy in virtual seconds, device memory and upload against "
         "FedAvg; one seed. Both files ran every algorithm under "
         "memory_policy=ignore (every device trains whatever its memory: "
         "the setting most favourable to the baselines); the flagfiles now "
         "set exclude, which the regime map below uses. Virtual-time "
         "figures are deterministic.",
         (Table("rows", _COMPARE),)),
    Kind("experiments/results/dp_*.json", "Client-level differential "
         "privacy ({name})",
         "launch.main runs with clipped client updates and Gaussian noise "
         "of multiplier z; epsilon at delta as the file records.",
         (Table("rows", _c("noise multiplier z=noise_multiplier",
                           "final acc=final_accuracy",
                           "best acc=best_accuracy",
                           "time to target (s)=time_to_target_s",
                           "updates clipped=updates_clipped",
                           "client updates=client_updates",
                           "most updates from one client="
                           "dp_max_participations",
                           "epsilon=dp_epsilon",
                           "epsilon (Poisson)=dp_epsilon_poisson")),)),
    Kind("experiments/results/personalization.json", "Personalization",
         "experiments/personalization.py: the global model's accuracy on "
         "held-out data of each device, tuned locally, and mixed; then by "
         "memory tier.",
         (Table("rows", _c("algorithm", "test acc=test_accuracy",
                           "time to target (s)=time_to_target_s",
                           "global mean=global_mean", "global p10=global_p10",
                           "tuned mean=tuned_mean", "tuned p10=tuned_p10",
                           "mixed mean=mixed_mean", "mixed p10=mixed_p10",
                           "energy to target (J)=energy_to_target_j")),
          Table("tiers", _c("algorithm", "tier", "devices", "eligible",
                            "update share=update_share",
                            "mean staleness=mean_staleness", "global",
                            "tuned", "mixed"), caption="By memory tier."))),
    Kind("experiments/results/robustness.json", "Robustness to malicious "
         "clients",
         "experiments/robustness.py: final accuracy with a fraction of "
         "malicious clients (behavior), for each defence.",
         (Table("rows", pivot=(("algorithm", "behavior", "fraction"),
                               "defence", "final_accuracy")),)),
    Kind("experiments/results/claims.json", "The paper's claims",
         "experiments/claims.py gathers the paper's four claims from the "
         "regime map's paper-like cell and the scaling study: held when the "
         "whole 95% interval meets the claim, missed when it misses it, "
         "inconclusive otherwise. Virtual time, deterministic per seed.",
         (Table("claims", _c("claim", "needed=paper", "measured=text",
                             "where", "verdict")),)),
    Kind("experiments/results/regime_map.json", "Where FTTE wins: the "
         "regime map",
         "experiments/regime_map.py runs FTTE, FedBuff and FedAvg (every "
         "one under memory_policy=exclude) on the real MNIST split with "
         "500 devices of the device-class profiles, over the share of "
         "microcontrollers, the straggler share, the phones' link and the "
         "data-device correlation (device_dirichlet), 3 seeds a cell and 5 "
         "in the paper-like cell (60% microcontrollers, 90% stragglers). "
         "Mean ± 95% Student-t half width over seeds; ftte_time is FTTE "
         "with search_objective=importance_per_time (ours). Win: better "
         "than FedBuff on time or accuracy (the interval excludes a tie) "
         "and not worse on the other.",
         (Table("cells.paper_cell=true.summary", _c(
             "algorithm", "final acc=final_accuracy",
             "time to target (s)=time_to_target_s",
             "peak device RAM (B)=peak_device_memory_bytes",
             "upload / update (B)=upload_bytes_per_update",
             "energy (J)=energy_j", "eligible devices=eligible_clients"),
                key="algorithm", caption="The paper-like cell."),
          Table("cells", _c(
              "MCU share=mcu_fraction", "stragglers=straggler_fraction",
              "phone link=phone_link",
              "data-device corr.=device_correlation",
              "FTTE reduction vs FedAvg=contrasts.ftte.reduction_vs_fedavg",
              "FedBuff reduction vs FedAvg="
              "contrasts.fedbuff.reduction_vs_fedavg",
              "FTTE acc. − FedBuff=contrasts.ftte.accuracy_minus_fedbuff",
              "FTTE acc.=summary.ftte.final_accuracy",
              "FedBuff acc.=summary.fedbuff.final_accuracy",
              "FedAvg acc.=summary.fedavg.final_accuracy",
              "outcome=outcome.result"), caption="Every cell."),
          Table("marginals", caption="Cells by one axis."))),
    Kind("experiments/results/scaling_devices.json", "Scaling the number "
         "of devices",
         "experiments/scaling_devices.py: the same setup at each device "
         "count N, memory_policy=ignore, 5 seeds; fixed: C = 100 tasks in "
         "flight and K = 10 at every N; fraction: K = 0.02 N, C = 10 K, "
         "3,000 client updates a run. Mean ± 95% Student-t half width; "
         "reduction = 1 − t/t(FedAvg) per seed, over the seeds where both "
         "reached the target.",
         tuple(Table(f"modes.{mode}", _c(
             "devices", "FTTE reduction vs FedAvg=ftte_reduction_ci",
             "FedBuff reduction vs FedAvg=fedbuff_reduction_ci",
             "FTTE acc.=ftte_final_accuracy_ci",
             "FedBuff acc.=fedbuff_final_accuracy_ci",
             "FedAvg acc.=fedavg_final_accuracy_ci",
             "FedAvg time to target (s)=fedavg_time_to_target_ci",
             "FTTE memory ratio=ftte_memory_ratio_ci",
             "FTTE upload ratio=ftte_upload_ratio_ci"),
                     caption=f"Mode {mode}.")
               for mode in ("fixed", "fraction"))),
    Kind("experiments/benchmarks/results/vs_fedjax_*_cpu.json",
         "Throughput against FedJAX ({name})",
         "experiments/benchmarks/vs_fedjax.py: the same FedAvg workload in "
         "ftte_jax and FedJAX; steady client updates per second, and whole "
         "runs from a cold and a warm compilation cache.",
         (Table("results.0.sides", _c(
             "side", "steady upd/s=steady_updates_per_s",
             "fraction of matmul peak=peak_fraction",
             "cold run (s)=e2e_cold.wall_s", "warm run (s)=e2e_warm.wall_s",
             "final acc=final_accuracy"), key="side"),)),
    Kind("experiments/benchmarks/results/throughput_cpu.json",
         "Engine throughput against its floor",
         "experiments/benchmarks/throughput.py: the engine's client "
         "updates per second against a bare training loop of the same "
         "clients (the floor), per client-batching path; and training a "
         "static subset against a masked one.",
         (Table("results.engine", _c(
             "workload", "path", "floor upd/s=floor_updates_per_s",
             "engine upd/s=engine_updates_per_s", "ratio",
             "ratio vs vmap floor=ratio_vs_vmap_floor")),
          Table("results.sparse", _c(
              "workload", "trained", "masked upd/s=masked_updates_per_s",
              "static upd/s=static_updates_per_s", "gain"),
                caption="Static subsets."))),
    Kind("experiments/benchmarks/results/cpu_devices_cpu.json",
         "Splitting the host CPU into devices",
         "experiments/benchmarks/cpu_devices.py: the FedJAX workload's "
         "step on one CPU device against a clients mesh of one device per "
         "core.",
         (Table("rows", _c("model", "devices",
                           "one device step (s)=one_device.step_s",
                           "mesh step (s)=mesh.step_s", "speedup",
                           "one device compile (s)=one_device.compile_s",
                           "mesh compile (s)=mesh.compile_s",
                           "max abs diff=max_abs_diff")),)),
    Kind("experiments/benchmarks/results/startup_cpu.json", "Start-up "
         "programs",
         "experiments/benchmarks/startup.py: compile (and run) time of the "
         "programs that run once, with XLA's default options and the "
         "one-shot ones; the local-step loop rolled and unrolled; named "
         "keys by jax.random and on the host.",
         (Table("init", _c("model", "program", "default (s)=default_s",
                           "one-shot (s)=one_shot_s", "speedup",
                           "same bits=same_bits")),
          Table("local_steps_loop", _c(
              "model", "rolled compile (s)=rolled_compile_s",
              "unrolled compile (s)=unrolled_compile_s",
              "rolled step (s)=rolled_step_s",
              "unrolled step (s)=unrolled_step_s", "same bits=same_bits"),
                caption="The local-step loop."),
          Table("keys", _c("jax.random (s)=jax_s", "host (s)=host_s",
                           "same bits=same_bits"), caption="Named keys."))),
    Kind("experiments/benchmarks/results/step_options_cpu.json",
         "The step's XLA options",
         "experiments/benchmarks/step_options.py: the FedJAX workload's "
         "step compiled with XLA's defaults, at level 2, and with the "
         "options the step uses.",
         (Table("rows", _c("model", "default compile (s)=default.compile_s",
                           "level 2 compile (s)=level2.compile_s",
                           "ours compile (s)=ours.compile_s",
                           "default step (s)=default.step_s",
                           "level 2 step (s)=level2.step_s",
                           "ours step (s)=ours.step_s",
                           "ours max abs diff=ours.max_abs_diff")),)),
    Kind("experiments/benchmarks/results/warm_start_cpu.json",
         "Warm start: where the programs come from",
         "experiments/benchmarks/warm_start.py: seconds to get the FedJAX "
         "workload's step and evaluation at a warm start with no cache, "
         "JAX's persistent cache (what launch.main uses), an executable "
         "cache keyed by the lowered text, and one keyed by hand (which "
         "can load a stale program).",
         (Table("rows", _c("model", "none (s)=none.programs_s",
                           "JAX cache (s)=jax.programs_s",
                           "text key (s)=text_key.programs_s",
                           "hand key (s)=hand_key.programs_s",
                           "trace+lower (s)=jax.trace_lower_s",
                           "build (s)=jax.build_s",
                           "same bits=same_bits")),)),
    Kind("experiments/benchmarks/results/personal_eval_cpu.json",
         "Per-device evaluation",
         "experiments/benchmarks/personal_eval.py: the per-device "
         "evaluation over a fleet as one call, by chunk of devices, "
         "against a loop over devices.",
         (Table("one_call_by_chunk", _c(
             "devices per chunk=chunk", "one call (s)=one_call_s",
             "compile (s)=compile_s", "temp bytes=temp_bytes",
             "speedup vs loop=speedup_vs_loop"), key="chunk"),
          Table("", _c("devices", "loop s/device=loop_s_per_device",
                       "loop fleet estimate (s)=loop_s_fleet_estimate"),
                caption="The loop."))),
    Kind("experiments/benchmarks/results/memory_plan_*.json",
         "Step memory at K = 10,000 and the chunk the memory plan picks",
         "experiments/benchmarks/memory_table.py: XLA's memory_analysis of "
         "the step (N = 100,000, FedAvg, 5 local steps of batch 32), "
         "traced as on an accelerator, and the client_chunk that "
         "client_chunk=0 picks for a 16 GB device (90% of it usable).",
         (Table("rows", _c("model", "weights", "status",
                           "batching=batching?", "chunk=chunk?",
                           "budget (bytes)=budget_bytes",
                           "bytes per client=plan.bytes_per_client?",
                           "fixed bytes=plan.fixed_bytes?")),)),
    Kind("experiments/benchmarks/results/accelerator_*.json",
         "The accelerator benchmark ({name})",
         "experiments/benchmarks/accelerator.py: the server step "
         "(synchronous FedAvg, 5 local steps of batch 32) per model, "
         "fleet N, clients per step K, client path and compute dtype; "
         "seconds per step are the median of the timed steps after a "
         "warm-up, and the fraction of peak is against a matmul timed on "
         "the same device. On a CPU this is the bfloat16 against float32 "
         "comparison; docs/accelerators.md has the GPU run.",
         (Table("rows", _c("side", "model", "N=n", "K=k", "variant",
                           "dtype", "batching=batching?", "chunk=chunk?",
                           "status", "s/step=s_per_step?",
                           "upd/s=updates_per_s?",
                           "compile (s)=compile_s?",
                           "step peak (B)=program.peak_bytes?",
                           "fraction of matmul peak="
                           "fraction_of_matmul_peak?")),)),
    Kind("experiments/benchmarks/results/scale*_cpu.json", "Scale "
         "({name})",
         "experiments/benchmarks/scale.py: build, compile and step time "
         "and peak memory as the fleet N and the buffer K grow.",
         (Table("rows", _c("name", "build (s)=build_s",
                           "compile (s)=compile_s", "s/step=s_per_step",
                           "upd/s=updates_per_s", "devices=num_devices",
                           "peak RSS (GiB)=peak_rss_gib")),)),
)


class UnregisteredResults(ValueError):
  """A results file that no kind in ``KINDS`` claims."""


def _get(obj: Any, path: str) -> Any:
  """``obj`` at a dotted path; KeyError naming the path when absent."""
  for part in filter(None, path.split(".")):
    if isinstance(obj, list) and "=" in part:
      # "field=value": the first row whose field reads as value.
      field, _, want = part.partition("=")
      obj = next((r for r in obj if isinstance(r, dict) and
                  str(r.get(field)).lower() == want.lower()), None)
      if obj is None:
        raise KeyError(path)
    elif isinstance(obj, list):
      obj = obj[int(part)]
    elif isinstance(obj, dict) and part in obj:
      obj = obj[part]
    else:
      raise KeyError(path)
  return obj


def _show(v: Any) -> str:
  if v is None:
    return "–"
  if isinstance(v, bool):
    return "yes" if v else "no"
  if isinstance(v, int):
    return str(v)
  if isinstance(v, float):
    if math.isnan(v):
      return "nan"
    return f"{v:.4g}"
  if isinstance(v, (list, tuple)):
    return ", ".join(_show(x) for x in v)
  if isinstance(v, dict) and "half_width" in v:
    # A stats interval: mean ± half width, with the seeds it covers.
    return stats.fmt(v, digits=4)
  return str(v).replace("|", "\\|").replace("\n", " ")


def _row_list(data: dict, table: Table) -> list[dict]:
  rows = _get(data, table.rows)
  if isinstance(rows, dict):
    if rows and all(isinstance(v, dict) for v in rows.values()):
      return [{table.key: k, **v} for k, v in rows.items()]
    return [rows]
  if isinstance(rows, list) and all(isinstance(r, dict) for r in rows):
    return rows
  raise KeyError(f"{table.rows}: not a list or dict of rows")


def _markdown(headers: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
  out = ["| " + " | ".join(headers) + " |",
         "|" + "---|" * len(headers)]
  out += ["| " + " | ".join(line) + " |" for line in lines]
  return "\n".join(out)


def _table(data: dict, table: Table) -> str:
  rows = _row_list(data, table)
  if table.pivot is not None:
    index, column, value = table.pivot
    cols = list(dict.fromkeys(r[column] for r in rows))
    cells: dict[tuple, dict] = {}
    for r in rows:
      cells.setdefault(tuple(r[k] for k in index), {})[r[column]] = r[value]
    return _markdown([*index, *map(str, cols)], [
        [*map(_show, key), *(_show(v.get(c)) for c in cols)]
        for key, v in cells.items()])
  columns = table.columns or tuple(
      (k, k) for k, v in rows[0].items()
      if not isinstance(v, (dict, list)))
  return _markdown([h for h, _ in columns],
                   [[_cell(r, p) for _, p in columns] for r in rows])


def _cell(row: dict, path: str) -> str:
  """A row's value at ``path``; a path ending in "?" may be absent (an
  empty cell), any other must be there. A field named ``path`` itself
  (which may hold dots) wins over the dotted path."""
  if path in row:
    return _show(row[path])
  if path.endswith("?"):
    try:
      return _show(_get(row, path[:-1]))
    except KeyError:
      return ""
  return _show(_get(row, path))


def result_files(root: Path) -> list[str]:
  """The results files under ``root``, as repository paths, sorted."""
  out = []
  for d in RESULT_DIRS:
    out += sorted(p.relative_to(root).as_posix()
                  for p in (root / d).glob("*.json"))
  return out


def kinds_of(files: Sequence[str]) -> dict[str, Kind]:
  """Each file's kind.

  Raises:
    UnregisteredResults: naming every file no kind claims, or one that
      two kinds claim.
  """
  out, problems = {}, []
  for f in files:
    claims = [k for k in KINDS if fnmatch.fnmatch(f, k.pattern)]
    if len(claims) != 1:
      problems.append(f"{f} ({'no kind' if not claims else 'several kinds'})")
    else:
      out[f] = claims[0]
  if problems:
    raise UnregisteredResults(
        "results files not registered once in experiments/results_doc.py "
        f"KINDS: {'; '.join(problems)}; add a Kind for each, so docs/"
        "results.md shows it")
  return out


def render(root: Path = REPO) -> str:
  """The text of docs/results.md from the results files under ``root``."""
  files = result_files(root)
  kinds = kinds_of(files)
  parts = [
      "# Results",
      "",
      "Generated by `python -m experiments.results_doc` from "
      "`experiments/results/*.json` and "
      "`experiments/benchmarks/results/*.json`; do not edit by hand "
      "(`tests/test_docs.py` fails when this page is stale). Accuracy, "
      "virtual time and bytes are deterministic for a given seed; wall-clock "
      "figures hold for the machine each table names.",
  ]
  for kind in KINDS:
    for f in (f for f in files if kinds[f] is kind):
      with open(root / f) as fh:
        data = json.load(fh)
      name = Path(f).stem
      parts += ["", f"## {kind.title.format(name=name)}", "",
                f"{kind.about} From `{f}`."]
      machine = data.get("machine") if isinstance(data, dict) else None
      figure = Path(f).with_suffix(".png")
      if (root / figure).exists():
        parts += ["", f"![{name}](../{figure.as_posix()})"]
      for table in kind.tables:
        try:
          text = _table(data, table)
        except (KeyError, IndexError, ValueError, TypeError) as e:
          raise ValueError(f"{f}: its kind's table at {table.rows!r} "
                           f"does not fit the file ({e!r})") from None
        parts += [""]
        if table.caption:
          parts += [table.caption, ""]
        parts += [f"Machine: {machine}." if machine else
                  f"{NO_MACHINE.capitalize()}.", "", text]
  return "\n".join(parts) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--check", action="store_true",
                 help="exit 1 if docs/results.md differs from what would be "
                 "written")
  a = p.parse_args(argv)
  try:
    text = render(REPO)
  except ValueError as e:
    print(f"results_doc: error: {e}", file=sys.stderr)
    return 2
  return flags_doc.write_page(REPO / OUT, text, a.check,
                              "experiments.results_doc")


if __name__ == "__main__":
  sys.exit(main())
