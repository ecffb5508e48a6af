"""The report's input: every finished training run under some dirs (single runs, multirun
sweeps, committed run records), each read once into a compact record (its final evaluation,
protocol records and config, without the episodes) and counted once, by its run id.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from dtlab import DTLabError

log = logging.getLogger(__name__)


def dataset_label(dataset: dict) -> str:
    """A short name for a run's data: file stems, hub names, Minari ids, mixture sources."""
    target = (dataset or {}).get("_target_", "")
    if target.endswith("load_sample"):
        return "sample"
    if target.endswith("load_local"):
        paths = dataset.get("path")
        if paths is None:  # records from before load_sample: load_local(path=None) was the sample
            return "sample"
        paths = [paths] if isinstance(paths, str) else paths
        return "+".join(Path(p).name.split(".")[0] for p in paths)
    if target.endswith("load_hub"):
        names = dataset.get("name")
        return "+".join([names] if isinstance(names, str) else names)
    if target.endswith("load_hdf5"):
        return Path(dataset.get("path", "")).stem
    if target.endswith("load_minari"):
        return str(dataset.get("name"))
    if target.endswith("load_mixture"):
        return "mixture:" + "+".join(sorted(dataset.get("sources", {})))
    return target or "unknown"


def headline_target(record: dict) -> float | None:
    """The target a run's headline score is read at: the highest of the targets fixed before
    the run (`target_return.values`, as its final evaluation's protocol records them: in every
    preset the env's highest paper target, e.g. 12000 for HalfCheetah; the sample's expert mean
    for the default run) that the final evaluation ran at. None for a run whose targets are all
    data-relative (quantiles, multiples of the best return): no number of it was fixed before
    it, so it is in no table (build_report lists it, with the reason)."""
    protocol = next(iter(record["checkpoints"].values()))["protocol"]
    ran = protocol["targets"]
    fixed = [float(v) for v in protocol["target_rule"]["values"] if any(math.isclose(v, t) for t in ran)]
    return max(fixed) if fixed else None


def to_record(final: dict, run: str) -> dict:
    """A run's compact record (a few KB): what the report needs, without the episodes."""
    config = final.get("config") or {}
    env = config.get("env", {})
    record = {
        "kind": "run_record",
        "run": run,
        "run_id": final.get("run_id"),  # None for runs from before run ids (run_id() says what stands in)
        "env_id": env.get("id"),
        "dataset": dataset_label(config.get("dataset", {})),
        "algo": (config.get("algo") or {}).get("name", "dt"),
        "seed": config.get("seed"),
        "ref_scores": [env.get("ref_min_score"), env.get("ref_max_score")],
        "steps": final.get("steps"),
        "wall_time_s": final.get("wall_time_s"),
        "data_returns": final.get("data_returns"),
        "history": final.get("history", []),
        "checkpoints": {
            name: {"protocol": c["protocol"], "summary": c["summary"]} for name, c in final["checkpoints"].items()
        },
        "config": config,
    }
    return record | {"headline_target": headline_target(record) if record["checkpoints"] else None}


def run_id(record: dict) -> str:
    """A run's identity, whatever folder or copy its record is read from: the id dtlab.train
    wrote into its final_evaluation.json; for runs from before that, the run dir it was trained
    in (its resolved config's paths.output_dir), else its name under the dirs given."""
    if record.get("run_id"):
        return str(record["run_id"])
    output_dir = ((record.get("config") or {}).get("paths") or {}).get("output_dir")
    return f"dir:{output_dir}" if output_dir else f"name:{record['run']}"


def _scores(record: dict) -> dict:
    return {
        name: [(s["target"], s["normalized_score"]) for s in c["summary"]] for name, c in record["checkpoints"].items()
    }


def dedupe(records: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """(records, not used): each run once, however many dirs or record folders reach it (the
    first found is kept); a second record of a run is listed, and a warning logged when it does
    not hold the same scores (two runs given one id, or a record edited)."""
    kept: dict[str, dict] = {}
    not_used = []
    for r in records:
        key = run_id(r)
        first = kept.setdefault(key, r)
        if first is r:
            continue
        if _scores(first) == _scores(r):
            not_used.append({"run": r["run"], "reason": f"the same run as {first['run']} (run id {key}): counted once"})
        else:
            reason = f"shares run id {key} with {first['run']} but not its scores: only {first['run']} is used"
            log.warning("%s %s", r["run"], reason)
            not_used.append({"run": r["run"], "reason": reason})
    return list(kept.values()), not_used


def find_runs(dirs: Iterable[str | Path]) -> tuple[list[dict], list[dict]]:
    """(records, not used): a record per finished run under the dirs (run dirs with a final
    evaluation, and committed `*.json` run records), each run once (dedupe), and {run, reason}
    for every run that could not be used."""
    records, not_used = [], []
    for root in map(Path, dirs):
        if not root.exists():
            raise DTLabError(f"{str(root)!r} does not exist: give run dirs, sweep dirs or record folders")
        for config in sorted(root.rglob(".hydra/config.yaml")):
            run_dir = config.parent.parent
            name = str(run_dir.relative_to(root.parent)) if run_dir != root else root.name
            if "trainer:" not in config.read_text():
                continue  # a dtlab.evaluate run, not a training run
            final = run_dir / "final_evaluation.json"
            if not final.is_file():
                not_used.append(
                    {"run": name, "reason": "no final_evaluation.json (unfinished, or eval.final_episodes=0)"}
                )
                continue
            try:
                data = json.loads(final.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                not_used.append({"run": name, "reason": f"final_evaluation.json is not JSON ({e})"})
                continue
            if "config" not in data or not data.get("checkpoints"):
                not_used.append({"run": name, "reason": "final_evaluation.json lacks its config or checkpoints"})
                continue
            records.append(to_record(data, name))
        for path in sorted(root.rglob("*.json")):
            if ".hydra" in path.parts or path.name in ("final_evaluation.json", "report.json"):
                continue
            try:
                data = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(data, dict) and data.get("kind") == "run_record":
                records.append(data)
    records, twice = dedupe(records)
    return records, not_used + twice


def write_records(records: Sequence[dict], folder: Path) -> list[Path]:
    """One JSON file per run, named after it: the results that outlive the run dirs."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for r in records:
        path = folder / (re.sub(r"[^A-Za-z0-9_.=-]+", "_", r["run"]).strip("_") + ".json")
        path.write_text(json.dumps(r, indent=1))
        paths.append(path)
    return paths
