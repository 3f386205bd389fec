"""`star calibrate`: a method's schedule (star.schedule) measured on the user's own validation data.

Every setting of the grid (each budget `keep` at each combination of the swept options) answers the same
records through `star eval`'s runner, so the sweep shows a progress bar and resumes where it stopped; each
setting's FLOPs and prefill time become fractions of the unpruned model's, measured in the same run.
"""

from __future__ import annotations

from pathlib import Path

from star.eval.runner import Setting, evaluate, text_tokens
from star.flops import DecoderShape
from star.pruner import resolve_keep
from star.schedule import Point, Schedule, frontier, shape_key


def default_grid(method: str, num_layers: int) -> dict[str, list]:
    """What to sweep besides keep when the user names nothing: STAR's stage-1 ratio (flat in accuracy from 0 to
    0.5 on the default model, docs/results.md) and its layer K, from a sixteenth of the depth (the cut that reaches
    a fifth of the FLOPs) to half of it."""
    if method != "star":
        return {}
    depths = (16, 8, 4, 2)
    return {"stage1_ratio": [0, 0.3, 0.5], "layer": sorted({max(1, num_layers // d) for d in depths})}


def grid_settings(method: str, keeps: list, grid: dict[str, list]) -> list[Setting]:
    """The unpruned reference first, then the method at every keep and every point of the grid."""
    points = [{}]
    for name, values in grid.items():
        points = [{**point, name: value} for point in points for value in values]
    return [Setting("none", 1.0)] + [Setting(method, keep, point) for point in points for keep in keeps]


def runs_folder(out: Path) -> Path:
    """Where the answers of a schedule file's sweep go (kept, so that a rerun resumes): schedule.json -> schedule-runs/."""
    return out.with_name(out.stem + "-runs")


def schedule_unit(model) -> int:
    """The visual tokens a schedule's keeps count (per image, or per crop or tile), or a ValueError for a family
    whose images differ in size (a model without weights will do, to refuse before loading)."""
    from star.adapters import adapter_for

    adapter = adapter_for(model)
    n_visual = adapter.budget_unit or adapter.n_visual
    if n_visual is None:
        raise ValueError(f"a schedule needs the same number of visual tokens in every image, and {type(model).__name__}'s images differ in size")
    return n_visual


def calibrate(model, processor, records, method: str, keeps: list, grid: dict[str, list], out: Path, source: str,
              batch_size: int = 8, max_new_tokens: int = 8, positions: str | None = None) -> tuple[Schedule, list[str]]:
    """Sweep the grid on `records`, write the schedule to `out` and its picture beside it; return both the
    schedule and the messages of the records that could not be read."""
    n_visual = schedule_unit(model)
    settings = grid_settings(method, keeps, grid)
    summary, skipped = evaluate(model, processor, records, settings, runs_folder(out), batch_size, max_new_tokens, positions)
    rows = summary["settings"]
    base = rows[0]
    points = tuple(
        Point(
            keep=resolve_keep(row["keep"], n_visual),
            options=row["options"],
            flops=row["flops"] / base["flops"],
            time=row["prefill_s"] / base["prefill_s"],
            accuracy=row["accuracy"],
            interval=tuple(row["interval"]),
            n=row["n"],
        )
        for row in rows
        if row["n"]
    )
    shape = DecoderShape.from_config(model.config.get_text_config())
    schedule = Schedule(method, shape_key(shape, n_visual), round(text_tokens(processor, records), 1), points, source)
    schedule.save(out)
    plot(schedule, out.with_suffix(".png"))
    return schedule, skipped


def plot(schedule: Schedule, path: Path) -> None:
    """Accuracy against FLOPs and against time, every setting a dot with its 95% interval, the frontier a line."""
    from star.eval.report import plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, kind in zip(axes, ("flops", "time")):
        points = [p for p in schedule.points if p.cost(kind) is not None]
        errors = [[100 * (p.accuracy - p.interval[0]) for p in points], [100 * (p.interval[1] - p.accuracy) for p in points]]
        axis.errorbar([p.cost(kind) for p in points], [100 * p.accuracy for p in points], yerr=errors, fmt="o", color="0.6",
                      capsize=2, elinewidth=0.8, label="measured settings")
        best = frontier(points, kind)
        axis.plot([p.cost(kind) for p in best], [100 * p.accuracy for p in best], "-o", color="C3", label="frontier")
        for p in best:
            axis.annotate(_label(p), (p.cost(kind), 100 * p.accuracy), fontsize=6, xytext=(3, -9), textcoords="offset points")
        cost = "decoder prefill FLOPs" if kind == "flops" else "prefill time (vision tower and decoder, median)"
        axis.set_xlabel(f"{cost}, fraction of the unpruned model's")
        axis.set_ylabel("accuracy (%)")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    n = max((p.n or 0 for p in schedule.points), default=0)
    fig.suptitle(f"{schedule.method} schedule: {schedule.source} (n = {n} per setting)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _label(point: Point) -> str:
    return " ".join([f"keep={point.keep}", *(f"{k}={v}" for k, v in sorted(point.options.items()))])
