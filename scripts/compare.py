"""Tables and plots of a `scripts/results.sh compare` folder: every setting that answered there, over the
questions all of them answered (so every row has the same n), with 95% Wilson intervals.

    python scripts/compare.py docs/results/compare-scenes "scenes (test)"

Writes results.json, results.md and accuracy.png into the folder, and prints results.md. Settings come from
each run folder's setting.json (star eval writes it), so the authors' defaults and this project's earlier
variants, evaluated by separate `star eval` calls into one folder, land in one table. A variant row is named by
its options; `variant_of` pairs it with the default row of the same method and budget.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from star.eval import report
from star.eval.runner import Setting, _answered, summarize


def load(folder: Path) -> tuple[list[Setting], set[str]]:
    """The settings answered in `folder`, and the record ids every one of them answered."""
    settings, common = [], None
    for path in sorted((folder / "runs").glob("*/setting.json")):
        data = json.loads(path.read_text())
        settings.append(Setting(data["method"], data["keep"], data.get("options", {})))
        ids = set(_answered(path.parent))
        common = ids if common is None else common & ids
    order = {"none": 0, "star": 1, "random": 99}
    settings.sort(key=lambda s: (order.get(s.method, 2), s.method, bool(s.options), sorted(s.options.items()), -s.keep))
    return settings, common or set()


def overlap(a: list[float], b: list[float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def pairs(summary: dict) -> str:
    """Each peer's authors' defaults beside this project's earlier variant (where one was run), per budget."""
    rows = summary["settings"]
    defaults = {(r["method"], r["keep"]): r for r in rows if not r["options"]}
    lines = [
        "| method | keep | authors' defaults | before the fidelity fixes (earlier variant) | intervals overlap |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        base = defaults.get((r["method"], r["keep"]))
        if not r["options"] or base is None or base["interval"] is None or r["interval"] is None:
            continue
        lines.append(
            f"| {r['method']} | {r['keep']} | {report._with_interval(base)} | {report._with_interval(r)} "
            f"({report._options(r)}) | {'yes' if overlap(base['interval'], r['interval']) else '**no**'} |"
        )
    return "\n".join(lines) + "\n"


def main(folder: str, title: str) -> None:
    out = Path(folder)
    settings, ids = load(out)
    summary = summarize(settings, out / "runs", ids)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    table = report.markdown_table(summary) + "\n" + pairs(summary)
    (out / "results.md").write_text(table)
    report.plot(summary, out / "accuracy.png", title=title)
    print(table)


if __name__ == "__main__":
    main(*sys.argv[1:3])
