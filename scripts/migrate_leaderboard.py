"""Migrate a leaderboard.csv written with method axes (`axis.*` columns and `variant`) to methods that own
their parameters (`params`, `params_changed`, `label`), once, in place. Every other column is kept.

    python scripts/migrate_leaderboard.py leaderboard.csv [more.csv ...] [--check]

For each old row, with M = the row's method as it is defined today (opd_bench/methods/):
  - each old axis whose name is a parameter of M (or renamed: the axis `tokens` is TIP's `rule`) gives that
    parameter its value; the axis `loss` gives M's `loss` parameter where M has one: the old sampled-token
    policy gradient (`pg`) is today's `sampled` (so old TIP rows read `tip [loss=sampled]`);
  - an axis that is not a parameter of M must not be in the row's `variant` (the axes the run set away from
    its method): it was the method's own choice then, which M now makes in code;
  - every parameter of M must get its value from an axis; M validates them.
A row that breaks a rule is an error (nothing is written). `params` holds all of M's parameters, `params_changed`
those that differ from M's defaults, `label` is M's label for them ('tip [rule=q3,loss=sampled]'). A row without
its `curve` or `train.lr` is completed from its run folder's metrics.json / config.json when it still exists.
Rows of the first micro world (preset `micro` evaluated on the greedy cards micro-math@1 / micro-code@1) are
renamed to preset `micro-v1`, the name that world keeps since the new micro world took `micro` (issue #16).
Rows already migrated are left as they are; `--check` reports what would change and writes nothing.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

RENAMED = {"tokens": "rule"}  # old axis -> today's parameter
VALUES = {"loss": {"pg": "sampled"}}  # old axis value -> today's value of the parameter of the same name
NEW = ["params", "params_changed", "label"]


def _cell(value) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def migrate_row(row: dict, where: str) -> dict:
    from opd_bench.errors import UserError
    from opd_bench.methods.base import get

    method = get(row["method"])
    fields = method.Params.model_fields
    varied = {item.split("=", 1)[0] for item in (row.get("variant") or "").split(",") if item}
    values = {}
    for column in sorted(c for c in row if c.startswith("axis.")):
        axis, value = column[len("axis."):], row[column]
        name = RENAMED.get(axis, axis)
        if name in fields:
            value = VALUES.get(name, {}).get(value, value)
            values[name] = None if value in ("", "None") else value
        elif axis in varied:
            raise SystemExit(f"{where}: axis {axis}={value} was set away from {method.name}'s own choice, and "
                             f"{method.name} has no parameter for it today; migrate this row by hand")
    missing = sorted(set(fields) - set(values))
    if missing:
        raise SystemExit(f"{where}: {method.name}'s parameter(s) {', '.join(missing)} have no old axis")
    try:
        p = method.params(values)
    except UserError as exc:
        raise SystemExit(f"{where}: the row's axes do not map onto {method.name}'s parameters: {exc}") from None
    out = {}
    for key, value in row.items():
        if key == "variant" or key.startswith("axis."):
            continue
        out[key] = value
        if key == "method":
            out.update(params=_cell(p.model_dump(mode="json")), params_changed=_cell(method.changed(p)),
                       label=method.label(p))
    return _complete(out)


def _complete(row: dict) -> dict:
    """A row written before the curve and lr columns existed: take them from its run folder if it is still there."""
    folder = Path(row.get("run_dir") or "/nonexistent")
    if not row.get("curve") and (folder / "metrics.json").exists():
        points = json.loads((folder / "metrics.json").read_text())["curve"]
        row["curve"] = _cell([[p["mark"], p["device_seconds"], p["flops"], p["avg@k"]] for p in points])
    if not row.get("train.lr") and (folder / "config.json").exists():
        row["train.lr"] = f"{json.loads((folder / 'config.json').read_text())['train']['lr']:.6g}"
    return row


OLD_WORLD_TASKS = "micro-code@1;micro-math@1"  # the first micro world's protocol: its rows, and only its


def renamed_world(row: dict) -> dict:
    """A row of the first micro world under its preset's name today (micro-v1); any other row unchanged."""
    if row.get("preset") == "micro" and row.get("tasks") == OLD_WORLD_TASKS:
        return {**row, "preset": "micro-v1"}
    return row


def migrate(path: Path, check: bool = False) -> int:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header, rows = list(reader.fieldnames or []), list(reader)
    old = [i for i, r in enumerate(rows) if any(k.startswith("axis.") and v for k, v in r.items())]
    old += [i for i, r in enumerate(rows) if i not in old and renamed_world(r) != r]
    new_rows = [renamed_world(migrate_row(r, f"{path}, row {i + 2} ({r.get('run_id')})")
                              if any(k.startswith("axis.") and v for k, v in r.items()) else
                              {k: v for k, v in r.items() if k != "variant" and not k.startswith("axis.")})
                for i, r in enumerate(rows)]
    columns = []
    for column in header:
        if column == "variant" or column.startswith("axis."):
            continue
        columns.append(column)
        if column == "method":
            columns += [c for c in NEW if c not in header]
    columns += [c for r in new_rows for c in r if c not in columns]
    if not check and (old or columns != header):
        tmp = path.with_name(f".{path.name}.migrating")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(new_rows)
        tmp.replace(path)
    print(f"{path}: {len(old)} of {len(rows)} rows migrated" + (" (--check: nothing written)" if check else ""))
    return len(old)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--check"]
    if not args:
        raise SystemExit(__doc__)
    for name in args:
        migrate(Path(name), check="--check" in sys.argv)
