"""`evaluate --report DIR`: a markdown table, the JSON result, per-clip scores and PNG plots.

DIR/report.md                         per machine/section AUC_s, AUC_t, pAUC; harmonic means; config
DIR/result.json                       EvalResult.to_json()
DIR/scores.csv                        machine, section, file, domain, label, score (every test clip)
DIR/anomaly_score_<m>_section_<s>_test.csv   file,score as the DCASE evaluator reads it
DIR/<machine>_section_<s>.png         ROC (source and target subsets, pAUC region) and score histograms
Plots need matplotlib (the `report` extra); it is imported only here, with the Agg backend.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_agent.errors import EdgeAsdError
from edge_agent.evaluation.dcase_metrics import MAX_FPR, roc_curve

if TYPE_CHECKING:
    from edge_agent.evaluation.evaluate import EvalResult, SectionResult

_COLOURS = {("source", "normal"): "#1f77b4", ("source", "anomaly"): "#d62728",
            ("target", "normal"): "#17becf", ("target", "anomaly"): "#ff7f0e"}
_ROC_COLOURS = {"source": "#1f77b4", "target": "#ff7f0e"}


def write_report(result: EvalResult, directory: Path | str, plots: bool = True) -> Path:
    """Write the report files into `directory` (created if needed); returns the markdown path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "result.json").write_text(json.dumps(result.to_json(), indent=2, sort_keys=True) + "\n")
    _write_scores(result, directory)
    images: dict[str, str] = {}
    if plots:
        pyplot = _pyplot()
        for section in result.sections:
            name = f"{section.machine}_section_{section.section}.png"
            _plot_section(pyplot, section, directory / name)
            images[f"{section.machine}/{section.section}"] = name
    report = directory / "report.md"
    report.write_text(markdown(result, images))
    return report


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise EdgeAsdError("report plots need matplotlib: pip install 'edge-asd[report]' "
                           "(or pass plots=False / omit --report)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or np.isnan(value) else f"{value:.4f}"


def markdown(result: EvalResult, images: dict[str, str] | None = None) -> str:
    images = images or {}
    summary = result.summary
    lines = [
        "# Evaluation report",
        "",
        f"Dataset: `{result.dataset_root}`  ",
        "Models: " + ", ".join(f"`{m['model_id']}` (layers {', '.join(m.get('layers', []))})"
                               for m in result.models),
        "",
        "| machine | section | AUC source | AUC target | pAUC | AUC all | test clips | train refs (S/T) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in result.sections:
        m = s.metrics
        lines.append(f"| {s.machine} | {s.section} | {_fmt(m.auc_source)} | {_fmt(m.auc_target)} | "
                     f"{_fmt(m.pauc)} | {_fmt(m.auc_all)} | {m.n_test} | "
                     f"{s.n_train.get('source', 0)}/{s.n_train.get('target', 0)} |")
    lines += [
        f"| **harmonic mean** | | **{_fmt(summary.auc_source)}** | **{_fmt(summary.auc_target)}** | "
        f"**{_fmt(summary.pauc)}** | | | |",
        "",
        f"**Official score** (harmonic mean of all AUC source, AUC target and pAUC values): "
        f"**{_fmt(summary.official)}**",
        "",
        f"AUC source: source normals vs all anomalies; AUC target likewise; pAUC: all test clips, "
        f"FPR <= {MAX_FPR}, McClish-corrected.",
    ]
    if summary.n_undefined:
        lines += ["", f"{summary.n_undefined} value(s) are n/a (a subset lacks normal or anomalous clips) "
                      "and are left out of the harmonic means."]
    lines += ["", "## Scoring configuration", "", "```json",
              json.dumps(result.config, indent=2, sort_keys=True, default=str), "```"]
    if images:
        lines += ["", "## Plots", ""]
        for key, name in images.items():
            lines += [f"### {key}", "", f"![{key}]({name})", ""]
    return "\n".join(lines) + "\n"


def _write_scores(result: EvalResult, directory: Path) -> None:
    with open(directory / "scores.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["machine", "section", "file", "domain", "label", "score"])
        for s in result.sections:
            for clip, score in zip(s.clips, s.scores, strict=True):
                writer.writerow([s.machine, s.section, clip.path.name, clip.domain, clip.label, repr(float(score))])
    for s in result.sections:
        path = directory / f"anomaly_score_{s.machine}_section_{s.section}_test.csv"
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            for clip, score in zip(s.clips, s.scores, strict=True):
                writer.writerow([clip.path.name, repr(float(score))])


def _plot_section(pyplot: Any, section: SectionResult, path: Path) -> None:
    anomaly = np.array([c.label == "anomaly" for c in section.clips])
    target = np.array([c.domain == "target" for c in section.clips])
    scores = section.scores
    figure, (roc_axes, hist_axes) = pyplot.subplots(1, 2, figsize=(11, 4.4))
    roc_axes.axvspan(0, MAX_FPR, color="0.92", label=f"pAUC region (FPR <= {MAX_FPR})")
    roc_axes.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1)
    for domain, subset, auc in (("source", ~target | anomaly, section.metrics.auc_source),
                                ("target", target | anomaly, section.metrics.auc_target)):
        labels = anomaly[subset].astype(int)
        if labels.size and 0 < labels.sum() < labels.size:
            fpr, tpr, _ = roc_curve(labels, scores[subset])
            roc_axes.plot(fpr, tpr, color=_ROC_COLOURS[domain], linewidth=2, label=f"{domain}: AUC {auc:.3f}")
        else:
            roc_axes.plot([], [], linestyle="none", label=f"{domain}: AUC undefined")
    roc_axes.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate",
                 title=f"ROC (pAUC {_fmt(section.metrics.pauc)})")
    roc_axes.set_aspect("equal")
    roc_axes.legend(loc="lower right", fontsize=9)

    finite = scores[np.isfinite(scores)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    bins = np.linspace(low, high if high > low else low + 1.0, 25)
    for (domain, label), colour in _COLOURS.items():
        chosen = (target == (domain == "target")) & (anomaly == (label == "anomaly"))
        if chosen.any():
            hist_axes.hist(scores[chosen], bins=bins, histtype="stepfilled", alpha=0.25, color=colour)
            hist_axes.hist(scores[chosen], bins=bins, histtype="step", linewidth=1.8, color=colour,
                           label=f"{domain} {label} ({int(chosen.sum())})")
    hist_axes.set(xlabel="anomaly score", ylabel="clips", title="score histogram by domain and label")
    hist_axes.legend(fontsize=9)
    figure.suptitle(f"{section.machine}, section {section.section}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
