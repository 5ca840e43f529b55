"""Bench results: one Row per model x shape x system, written as a table, JSON, markdown and a PNG.

Rows hold seconds; the table, markdown and chart show milliseconds.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

JSON_NAME, MARKDOWN_NAME, PNG_NAME = "results.json", "results.md", "results.png"
ACCURACY_PNG_NAME = "accuracy.png"
SCHEMA = "lutc-bench/1"


@dataclass
class Row:
    """One system on one case.

    per_round_s: seconds per inference in each round (block time / iterations).
    median_s, p10_s, p90_s, q1_s, q3_s, min_s: statistics over rounds, seconds per inference.
    ratio_to_ort: median / ORT's median (> 1: slower than ORT).
    max_abs_err: max |output - ORT output| over all outputs, same feeds.
    max_rel_err: max_abs_err / max |ORT output|.
    cosine: on the case's held-out evaluation samples, the worst over outputs of the mean
        cosine similarity of output vectors (last axis) to ORT's: the accuracy effect of lossy
        systems (lookup-add, pruning, int8).
    top1: top-1 accuracy (%) on those samples' labels (labelled models only).
    eval_samples: evaluation samples scored (slow systems stop early, see TimingConfig).
    plan: ``lutc-auto``'s per-layer plan (``auto.report``) or ``lutc-learned``'s layer choice.
    compile_s: build seconds in this run, tuning excluded; tune_s: tuning seconds
        (from the run that tuned, if tune_cached).
    """

    model: str
    shape: str
    case: str
    system: str
    status: str = "ok"
    error: str | None = None
    iterations: int = 0
    rounds: int = 0
    per_round_s: list[float] = field(default_factory=list)
    median_s: float | None = None
    p10_s: float | None = None
    p90_s: float | None = None
    q1_s: float | None = None
    q3_s: float | None = None
    min_s: float | None = None
    ratio_to_ort: float | None = None
    max_abs_err: float | None = None
    max_rel_err: float | None = None
    cosine: float | None = None
    top1: float | None = None
    eval_samples: int = 0
    compile_s: float | None = None
    tune_s: float | None = None
    tune_cached: bool = False
    tuning: dict = field(default_factory=dict)
    plan: dict | None = None

    def set_times(self, per_round_s: list[float]) -> None:
        self.per_round_s = [float(t) for t in per_round_s]
        self.rounds = len(per_round_s)
        if per_round_s:
            p10, q1, median, q3, p90 = np.percentile(per_round_s, [10, 25, 50, 75, 90])
            self.median_s, self.p10_s, self.q1_s, self.q3_s, self.p90_s = map(float, (median, p10, q1, q3, p90))
            self.min_s = float(min(per_round_s))


def output_cosine(got: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """The lowest over outputs of `lut_report.cosine` (same shapes assumed: check output_errors first)."""
    from lut_compiler.lut_report import cosine

    return min((cosine(np.asarray(ref), np.asarray(got[name])) for name, ref in reference.items()), default=1.0)


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent: logits [..., classes] against int labels of the leading shape."""
    predicted = np.asarray(logits).reshape(labels.size, -1).argmax(-1)
    return float(100.0 * np.mean(predicted == labels.reshape(-1)))


def output_errors(got: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> tuple[float, float]:
    """(max abs error, that error / max |reference|) over all outputs."""
    worst, scale = 0.0, 0.0
    for name, ref in reference.items():
        ref = np.asarray(ref, dtype=np.float64)
        out = np.asarray(got[name], dtype=np.float64)
        if out.shape != ref.shape:
            return math.inf, math.inf
        if ref.size:
            worst = max(worst, float(np.max(np.abs(out - ref))))
            scale = max(scale, float(np.max(np.abs(ref))))
    return worst, worst / scale if scale else worst


# ---- text ------------------------------------------------------------------------------------

COLUMNS = ("model", "shape", "system", "median ms", "p10-p90 ms", "x ORT", "max abs err", "cosine", "top-1 %",
           "compile s", "tune s", "rounds")


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}" if ms < 1000 else f"{ms:.0f}"


def _cells(row: Row) -> list[str]:
    if row.status != "ok":
        return [row.model, row.shape, row.system, "failed", "-", "-", "-", "-", "-", _secs(row.compile_s),
                _secs(row.tune_s), "-"]
    tune = _secs(row.tune_s) + ("*" if row.tune_cached and row.tune_s is not None else "")
    return [
        row.model, row.shape, row.system, _ms(row.median_s), f"{_ms(row.p10_s)}-{_ms(row.p90_s)}",
        "-" if row.ratio_to_ort is None else f"{row.ratio_to_ort:.2f}",
        "-" if row.max_abs_err is None else f"{row.max_abs_err:.1e}",
        "-" if row.cosine is None else f"{row.cosine:.4f}",
        "-" if row.top1 is None else f"{row.top1:.1f}",
        _secs(row.compile_s), tune, str(row.rounds),
    ]


def _secs(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}"


def table(rows: list[Row]) -> str:
    """Aligned plain-text table, one line per row."""
    cells = [list(COLUMNS)] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    numeric = set(range(3, len(COLUMNS)))
    lines = []
    for k, line in enumerate(cells):
        padded = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))]
        lines.append("  ".join(padded).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(rows: list[Row], meta: dict) -> str:
    """The table as markdown, under a header naming the machine and the budget."""
    machine = meta["machine"]
    lines = [
        f"# lutc bench, {meta['date']}",
        "",
        f"{machine['cpu']} (LLVM `{machine['mcpu']}`, {machine['cores']} cores, "
        f"{', '.join(machine['features']) or 'no SIMD features detected'}); "
        f"tvm {meta['versions'].get('apache-tvm', '?')}, onnxruntime {meta['versions'].get('onnxruntime', '?')}, "
        f"lut-compiler {meta['versions'].get('lut-compiler', '?')}.",
        f"{meta['config']['trials_per_task']} MetaSchedule trials per task; {meta['config']['timing']['rounds']} "
        f"rounds of ~{meta['config']['timing']['block_seconds']} s blocks per system, order rotating each round. "
        "Latency per inference; x ORT = median / ORT median; "
        "max abs err = max |output - ORT output| on the same feeds; on held-out evaluation samples "
        "(labelled models: the test split; never used to calibrate): cosine = mean cosine of output vectors "
        "(last axis) to ORT's, worst output, and top-1 % = accuracy on their labels; "
        "tune s marked * was spent in an earlier run (database reused).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" if i < 3 else "---:" for i in range(len(COLUMNS))) + "|",
    ]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in _cells(r)) + " |" for r in rows]
    plans = [r for r in rows if r.plan]
    if plans:
        lines += ["", "Per-layer plans (`lutc-auto`: layer times measured alone; `lutc-learned`: layers chosen "
                  "after learning; budgets checked on validation samples of the calibration set):", ""]
        lines += [f"- {r.model} {r.shape} {r.system}: {plan_summary(r.plan)}" for r in plans]
    failed = [r for r in rows if r.status != "ok"]
    if failed:
        lines += ["", "Failed:", ""] + [f"- {r.model} {r.shape} {r.system}: `{r.error}`" for r in failed]
    return "\n".join(lines) + "\n"


def plan_summary(plan: dict) -> str:
    """One line: how many layers took each implementation, the layers' time, the validation metric
    (``lutc-learned``: layers and FLOPs replaced, the validation metric, the learning runs)."""
    from collections import Counter

    if "flops_replaced" in plan:
        b = plan["budget"]
        runs = " + ".join(f"{r['epochs']} epochs on {r['layers']} layers in {r['seconds']:.0f} s" for r in plan["learn"])
        finer = f", {len(b['finer'])} of them at a finer V" if b.get("finer") else ""
        return (f"{plan['replaced']}/{plan['candidates']} layers lookup-add{finer} ({plan['flops_replaced']:.0%} of FLOPs); "
                f"validation {b['metric']} fp32 {b['fp32']:.4f}, chosen {b['chosen']:.4f}; learned: {runs}")

    counts = Counter(layer["choice"] for layer in plan["layers"])
    t = plan["layers_ms"]
    return (", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) + f"; layers {t['dense']:.3f} -> "
            f"{t['planned']:.3f} ms; validation {plan['metric']} fp32 {plan['fp32']:.4f}, plan {plan['planned']:.4f}")


def write_json(path: Path, rows: list[Row], meta: dict) -> None:
    data = {"schema": SCHEMA, **meta, "rows": [asdict(r) for r in rows]}
    path.write_text(json.dumps(data, indent=1, default=_jsonable) + "\n")


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return str(value)


def write_all(out: Path, rows: list[Row], meta: dict) -> list[Path]:
    """results.json, results.md and results.png into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / JSON_NAME, rows, meta)
    (out / MARKDOWN_NAME).write_text(markdown(rows, meta))
    machine, config = meta["machine"], meta["config"]
    title = (f"{machine['cpu']} ({machine['mcpu']}, {machine['cores']} cores), {config['trials_per_task']} "
             f"trials/task, {meta['date'][:10]}; labels: latency / ORT")
    chart(out / PNG_NAME, rows, list(config["systems"]), title)
    accuracy_chart(out / ACCURACY_PNG_NAME, rows, list(config["systems"]), title.split("; ")[0])
    return [out / JSON_NAME, out / MARKDOWN_NAME, out / PNG_NAME, out / ACCURACY_PNG_NAME]


# ---- chart -----------------------------------------------------------------------------------


def chart(path: Path, rows: list[Row], systems: list[str], title: str) -> None:
    """Grouped bars: median ms per system for each model x shape, p10-p90 whiskers, ratio labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r.model, r.shape) for r in rows))
    by_key = {(r.model, r.shape, r.system): r for r in rows}
    medians = [r.median_s * 1e3 for r in rows if r.median_s]
    log = bool(medians) and max(medians) / min(medians) > 20
    width = 0.8 / max(1, len(systems))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.9 * len(groups) + 2), 4.8))
    colors = plt.get_cmap("tab10").colors
    for k, system in enumerate(systems):
        xs, heights, low, high, labels = [], [], [], [], []
        for g, (model, shape) in enumerate(groups):
            row = by_key.get((model, shape, system))
            x = g + (k - (len(systems) - 1) / 2) * width
            if row is None or row.median_s is None:
                if row is not None:
                    ax.text(x, 0.02, "failed", rotation=90, ha="center", va="bottom", fontsize=7,
                            transform=ax.get_xaxis_transform())
                continue
            median = row.median_s * 1e3
            xs.append(x)
            heights.append(median)
            low.append(median - row.p10_s * 1e3)
            high.append(row.p90_s * 1e3 - median)
            labels.append("" if row.ratio_to_ort is None else f"{row.ratio_to_ort:.2g}x")
        ax.bar(xs, heights, width, yerr=[low, high], capsize=2, label=system, color=colors[k % 10],
               error_kw={"elinewidth": 0.8})
        for x, top, label in zip(xs, [h + e for h, e in zip(heights, high)], labels):
            ax.annotate(label, (x, top), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                        fontsize=7, rotation=90)
    ax.set_xticks(range(len(groups)), [f"{m}\n{s}" for m, s in groups])
    ax.set_ylabel("latency per inference (ms" + (", log scale)" if log else ")"))
    if log:
        ax.set_yscale("log")
    ax.margins(y=0.25)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, ncols=len(systems), loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    with warnings.catch_warnings():  # tight_layout complains about an empty chart
        warnings.simplefilter("ignore")
        fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def accuracy_chart(path: Path, rows: list[Row], systems: list[str], title: str) -> None:
    """Accuracy against speed-up over ORT, one point per system and case: top-1 % for labelled
    models (left), cosine to ORT for the others (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    scored = [r for r in rows if r.ratio_to_ort and r.cosine is not None]
    panels = [("top-1 accuracy (%)", [r for r in scored if r.top1 is not None], lambda r: r.top1),
              ("mean cosine to ORT", [r for r in scored if r.top1 is None], lambda r: r.cosine)]
    panels = [p for p in panels if p[1]] or panels[:1]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.6), squeeze=False)
    colors, markers = plt.get_cmap("tab10").colors, "osD^v<>ph*"
    cases = list(dict.fromkeys((r.model, r.shape) for r in rows))
    for ax, (label, chosen, value) in zip(axes[0], panels):
        for r in chosen:
            k = systems.index(r.system) if r.system in systems else 0
            ax.scatter(1.0 / r.ratio_to_ort, value(r), color=colors[k % 10],
                       marker=markers[cases.index((r.model, r.shape)) % len(markers)])
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.set_xlabel("speed-up over ONNX Runtime (median latency, log scale)")
        ax.set_ylabel(label)
        ax.axvline(1.0, color="gray", lw=0.6)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colors[k % 10], marker="o", ls="", label=s) for k, s in enumerate(systems)]
    handles += [plt.Line2D([], [], color="black", marker=markers[i % len(markers)], ls="", label=f"{m} {s}")
                for i, (m, s) in enumerate(cases)]
    axes[0][-1].legend(handles=handles, fontsize=7, loc="best")
    fig.suptitle(title, fontsize=9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
