"""Charts for the accountability report: matplotlib figures rendered to inline SVG.

Every function returns an SVG fragment ready to be placed inside HTML: no XML declaration,
no DOCTYPE, no metadata, no namespace URLs, no comments, ``href`` instead of ``xlink:href``,
and every id prefixed so that several charts can share one document. The bytes depend only on
the input (fixed hash salt, no date, fixed font), so the same results give the same HTML.

Text stays text (``svg.fonttype = "none"``, DejaVu Sans, which WeasyPrint embeds in the PDF):
glyph paths would double the size and the PDF rendering time. Layouts use fixed margins rather
than ``bbox_inches="tight"``, which draws every figure twice.
"""

from __future__ import annotations

import io
import math
import re
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot; the report never opens a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

_RC = {
    "svg.hashsalt": "auditor-report",
    "svg.fonttype": "none",  # <text> elements: half the size and render time of glyph paths
    "font.family": "DejaVu Sans",
    "font.size": 8,
    "axes.titlesize": 9,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "path.simplify": True,
}

# Colour-blind-safe (Okabe–Ito) colours for the estimators, in a fixed order.
_EST_COLORS = {
    "naive": "#999999",
    "linear": "#E69F00",
    "midpoint": "#56B4E9",
    "shifted": "#0072B2",
    "exact": "#009E73",
    "spectral": "#CC79A7",
}
_EXTRA_COLORS = ["#D55E00", "#F0E442", "#000000"]
_GROUP_STYLES = ["-", "--", ":", "-."]
_GROUP_COLORS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9"]
_STAGE_FILLS = ["#f2f2f2", "#ffffff"]

_ID_RE = re.compile(r'\bid="([^"]+)"')


def estimator_color(name: str, order: Sequence[str]) -> str:
    if name in _EST_COLORS:
        return _EST_COLORS[name]
    extras = [e for e in order if e not in _EST_COLORS]
    return _EXTRA_COLORS[extras.index(name) % len(_EXTRA_COLORS)] if name in extras else "#000000"


def mpl_text(s: object) -> str:
    """Literal text for matplotlib: escape the mathtext delimiter so a name like 'a$b$' stays literal."""
    return str(s).replace("$", r"\$")


def _short(s: str, n: int = 28) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def to_svg(fig, prefix: str) -> str:
    """Serialise a figure to a self-contained, deterministic SVG fragment and close it."""
    buf = io.StringIO()
    with matplotlib.rc_context(_RC):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    plt.close(fig)
    return clean_svg(buf.getvalue(), prefix)


def clean_svg(svg: str, prefix: str) -> str:
    """Strip what an inline SVG does not need (and every URL), prefix ids with `prefix`."""
    start = svg.find("<svg")
    if start < 0:
        raise ValueError("matplotlib produced no <svg> element")
    svg = svg[start:]
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.S)
    svg = re.sub(r"<!--.*?-->\s*", "", svg, flags=re.S)
    svg = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", svg)
    svg = svg.replace("xlink:href=", "href=")
    ids = set(_ID_RE.findall(svg))
    if ids:
        svg = _ID_RE.sub(lambda m: f'id="{prefix}-{m.group(1)}"', svg)
        svg = re.sub(r'href="#([^"]+)"', lambda m: f'href="#{prefix}-{m.group(1)}"' if m.group(1) in ids else m.group(0), svg)
        svg = re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{prefix}-{m.group(1)})" if m.group(1) in ids else m.group(0), svg)
    svg = svg.replace("<svg ", '<svg class="chart" role="img" ', 1)
    low = svg.lower()
    if "<script" in low or "http:" in low or "https:" in low or "javascript:" in low:
        raise ValueError("chart SVG contains a script or an external reference")
    return svg.strip() + "\n"


def _compress_steps(steps: np.ndarray, values: np.ndarray, max_points: int = 1500) -> tuple[np.ndarray, np.ndarray]:
    """Keep the points where a step-wise series changes (exact for piecewise-constant schedules);
    subsample smooth ones to at most `max_points`."""
    n = len(values)
    if n <= 2:
        return steps, values
    keep = np.zeros(n, dtype=bool)
    keep[0] = keep[-1] = True
    change = values[1:] != values[:-1]
    keep[1:] |= change
    keep[:-1] |= change
    idx = np.flatnonzero(keep)
    if len(idx) > max_points:
        idx = np.unique(np.concatenate([idx[:: math.ceil(len(idx) / max_points)], [n - 1]]))
    return steps[idx], values[idx]


def timeline_chart(stages: list[dict]) -> str | None:
    """Learning rate, momentum and weight decay against the global step, per parameter group,
    with the stages shaded and named. None when no stage carries a schedule."""
    series: dict[str, dict[str, list[tuple[np.ndarray, np.ndarray]]]] = {"lr": {}, "momentum": {}, "weight_decay": {}}
    groups: list[str] = []
    for st in stages:
        for g, sch in (st.get("schedule") or {}).items():
            if g not in groups:
                groups.append(g)
            steps = np.asarray(sch.get("step", []), dtype=float)
            for key in series:
                vals = sch.get(key)
                if vals is None or len(vals) != len(steps) or len(steps) == 0:
                    continue
                v = np.asarray([np.nan if x is None else x for x in vals], dtype=float)
                series[key].setdefault(g, []).append(_compress_steps(steps, v))
    if not groups:
        return None
    with matplotlib.rc_context(_RC):
        fig, axes = plt.subplots(3, 1, figsize=(7.0, 3.3), sharex=True, gridspec_kw={"hspace": 0.14})
        fig.subplots_adjust(left=0.1, right=0.97, top=0.83, bottom=0.22)
        labels = {"lr": "learning\nrate", "momentum": "momentum", "weight_decay": "weight\ndecay"}
        lo = min((st["first_step"] for st in stages if st.get("first_step") is not None), default=0)
        hi = max((st["end_step"] for st in stages if st.get("end_step") is not None), default=lo + 1)
        total = max(hi - lo, 1)
        for ax, key in zip(axes, ("lr", "momentum", "weight_decay")):
            for i, st in enumerate(stages):
                a, b = st.get("first_step"), st.get("end_step")
                if a is None or b is None:
                    continue
                ax.axvspan(a, b, color=_STAGE_FILLS[i % 2], zorder=0, lw=0)
                if i > 0:
                    ax.axvline(a, color="#777777", lw=0.6, zorder=1)
            vals_all = []
            for gi, g in enumerate(groups):
                first = True
                for xs, ys in series[key].get(g, []):
                    ax.plot(xs, ys, drawstyle="steps-post", lw=1.1, ls=_GROUP_STYLES[gi % len(_GROUP_STYLES)],
                            color=_GROUP_COLORS[gi % len(_GROUP_COLORS)], label=mpl_text(g) if first else None,
                            zorder=2)
                    first = False
                    vals_all.append(ys[np.isfinite(ys)])
            vals = np.concatenate(vals_all) if vals_all else np.array([])
            pos = vals[vals > 0]
            if key == "lr" and len(pos) and pos.max() / pos.min() >= 100:
                ax.set_yscale("log", nonpositive="clip")
            ax.set_ylabel(labels[key], fontsize=7)
            ax.yaxis.set_label_coords(-0.075, 0.5)
            ax.grid(axis="y", lw=0.3, color="#cccccc")
        axes[-1].set_xlabel("global step")
        axes[0].set_xlim(lo, hi)
        for i, st in enumerate(stages):
            a, b = st.get("first_step"), st.get("end_step")
            if a is None or b is None:
                continue
            frac = (b - a) / total
            width_chars = max(6, int(frac * 110))  # about 110 characters of 6.5 pt text span the axes
            label = (f"{i + 1}. {mpl_text(_short(str(st.get('name', '?')), width_chars))}\n"
                     f"{mpl_text(_short(str(st.get('owner') or ''), width_chars))}")
            axes[0].text((a + b) / 2, 1.04, label, transform=axes[0].get_xaxis_transform(), ha="center",
                         va="bottom", fontsize=6.5, linespacing=1.1)
        handles, lbls = axes[0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, lbls, loc="lower center", ncol=len(handles), frameon=False,
                       bbox_to_anchor=(0.5, 0.0), title="parameter group", title_fontsize=7)
    return to_svg(fig, "timeline")


def behavior_chart(behavior: dict, stage_names: list[str], estimators: list[str], primary: str,
                   primary_values: list[float | None], prefix: str) -> str:
    """Left: stage effects by estimator (grouped bars), retraining truth marked.
    Right: waterfall from 'no stage's contribution' (factual − Σ effects) to the final value, on
    `primary_values` (one per stage; None counts as 0)."""
    effects = behavior.get("effects") or {}
    truth = behavior.get("truth") or {}
    with matplotlib.rc_context(_RC):
        fig, (ax, axw) = plt.subplots(1, 2, figsize=(7.0, 2.45), gridspec_kw={"width_ratios": [1.15, 1], "wspace": 0.28})
        fig.subplots_adjust(left=0.09, right=0.99, top=0.78, bottom=0.15)
        n = len(estimators)
        width = 0.8 / max(n, 1)
        handles = []
        x = np.arange(len(stage_names))
        for j, e in enumerate(estimators):
            vals = [(effects.get(s) or {}).get(e) for s in stage_names]
            xs = [x[i] - 0.4 + width * (j + 0.5) for i, v in enumerate(vals) if v is not None]
            ys = [v for v in vals if v is not None]
            lab = f"{e} (primary)" if e == primary else e
            style = {"facecolor": estimator_color(e, estimators), "edgecolor": "black" if e == primary else "none",
                     "linewidth": 0.6}
            ax.bar(xs, ys, width=width * 0.92, **style)
            handles.append(Patch(label=mpl_text(lab), **style))
            for i, v in enumerate(vals):
                if v is None:
                    ax.text(x[i] - 0.4 + width * (j + 0.5), 0, "n/a", rotation=90, ha="center", va="bottom",
                            fontsize=5.5, color="#666666")
        tx = [x[i] for i, s in enumerate(stage_names) if truth.get(s) is not None]
        ty = [truth[s] for s in stage_names if truth.get(s) is not None]
        if tx:
            handles.append(ax.scatter(tx, ty, marker="D", s=22, color="black", zorder=5, label="retraining truth"))
            ax.hlines(ty, [t - 0.42 for t in tx], [t + 0.42 for t in tx], colors="black", lw=0.9, zorder=4)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xticks(x, [mpl_text(_short(str(s), 16)) for s in stage_names])
        ax.set_ylabel("effect (factual − without stage)")
        ax.set_title("Stage effects by estimator", loc="left", fontsize=8)
        fig.legend(handles=handles, loc="upper center", ncol=len(handles), frameon=False, handlelength=1.2,
                   bbox_to_anchor=(0.5, 1.0), columnspacing=1.2)

        factual = behavior.get("factual")
        steps = [0.0 if v is None else float(v) for v in primary_values]
        if factual is not None:
            base = float(factual) - sum(steps)
            labels = ["no stage's\ncontribution"] + [mpl_text(_short(str(s), 14)) for s in stage_names] + ["final\nvalue"]
            level = base
            axw.bar(0, base, color="#bbbbbb", width=0.6)
            for i, v in enumerate(steps, start=1):
                axw.bar(i, v, bottom=level, color="#D55E00" if v > 0 else "#0072B2", width=0.6)
                axw.plot([i - 1 + 0.3, i - 0.3], [level, level], color="#555555", lw=0.6)
                level += v
            axw.plot([len(steps) + 0.3 - 1, len(steps) + 1 - 0.3], [level, level], color="#555555", lw=0.6)
            axw.bar(len(steps) + 1, float(factual), color="#444444", width=0.6)
            axw.set_xticks(range(len(labels)), labels)
            axw.tick_params(axis="x", labelsize=6.5)
            axw.axhline(0, color="black", lw=0.6)
            axw.margins(y=0.08)
            axw.set_title(f"Waterfall, {mpl_text(primary)} (orange raised, blue lowered)", loc="left", fontsize=8)
            axw.set_ylabel(mpl_text(_short(behavior.get("name", ""), 30)))
        else:
            axw.set_axis_off()
    return to_svg(fig, prefix)


def heatmap_chart(behaviors: list[dict], stage_names: list[str], primary_of, fmt) -> str | None:
    """Stage × behaviour heatmap of the primary effect, normalised per behaviour by its largest
    |effect| (colour), annotated with the raw value formatted by `fmt`.
    `primary_of(behavior, stage)` -> (value | None, estimator)."""
    if not behaviors or not stage_names:
        return None

    raw = np.full((len(stage_names), len(behaviors)), np.nan)
    for j, b in enumerate(behaviors):
        for i, s in enumerate(stage_names):
            v, _ = primary_of(b, s)
            if v is not None:
                raw[i, j] = v
    norm = np.full_like(raw, np.nan)
    for j in range(raw.shape[1]):
        col = raw[:, j]
        m = np.nanmax(np.abs(col)) if np.isfinite(col).any() else np.nan
        if np.isfinite(m) and m > 0:
            norm[:, j] = col / m
        elif np.isfinite(m):
            norm[:, j] = 0.0
    with matplotlib.rc_context(_RC):
        h = 0.45 * len(stage_names) + 1.3
        w = min(7.0, 1.3 + 1.2 * len(behaviors))
        fig, ax = plt.subplots(figsize=(w, h))
        fig.subplots_adjust(left=0.8 / w + 0.1, right=0.92, top=0.95, bottom=0.8 / h)
        cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#eeeeee")
        im = ax.imshow(np.ma.masked_invalid(norm), cmap=cmap, norm=TwoSlopeNorm(0, -1, 1), aspect="auto")
        for i in range(raw.shape[0]):
            for j in range(raw.shape[1]):
                txt = "n/a" if not np.isfinite(raw[i, j]) else fmt(float(raw[i, j]))
                dark = np.isfinite(norm[i, j]) and abs(norm[i, j]) > 0.6
                ax.text(j, i, txt, ha="center", va="center", fontsize=7, color="white" if dark else "black")
        ax.set_xticks(range(len(behaviors)), [mpl_text(_short(str(b.get("name", "")), 18)) for b in behaviors],
                      rotation=20, ha="right")
        ax.set_yticks(range(len(stage_names)), [mpl_text(_short(str(s), 20)) for s in stage_names])
        ax.tick_params(length=0)
        for sp in ax.spines.values():
            sp.set_visible(False)
        cb = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
        cb.set_label("effect / max |effect| of the behaviour", fontsize=6.5)
        cb.ax.tick_params(labelsize=6)
    return to_svg(fig, "heatmap")


def scatter_chart(behavior: dict, stage_names: list[str], estimators: list[str], all_estimators: list[str],
                  prefix: str, max_points: int = 300) -> str | None:
    """Per-example estimate against retraining truth, one panel per stage that has a truth, one
    colour per estimator in ``estimators``; the diagonal is a perfect estimate. At most
    ``max_points`` evenly spaced examples per panel (deterministic) keep the SVG small."""
    per = behavior.get("per_example") or {}
    truth = per.get("truth") or {}
    effects = per.get("effects") or {}
    stages = [s for s in stage_names if truth.get(s) is not None]
    if not stages:
        return None
    with matplotlib.rc_context(_RC):
        fig, axes = plt.subplots(1, len(stages), figsize=(7.0, 2.35), squeeze=False)
        fig.subplots_adjust(left=0.08, right=0.99, top=0.8, bottom=0.2, wspace=0.32)
        handles = {}
        for ax, s in zip(axes[0], stages):
            t = np.asarray(truth[s], dtype=float)
            idx = np.linspace(0, len(t) - 1, min(len(t), max_points)).round().astype(int) if len(t) else []
            lo, hi = (float(t.min()), float(t.max())) if len(t) else (0.0, 1.0)
            for e in estimators:
                v = (effects.get(s) or {}).get(e)
                if v is None:
                    continue
                v = np.asarray(v, dtype=float)
                lo, hi = min(lo, float(v.min())), max(hi, float(v.max()))
                h = ax.scatter(t[idx], v[idx], s=4, alpha=0.6, linewidths=0, color=estimator_color(e, all_estimators),
                               rasterized=True,
                               label=mpl_text(e))
                handles.setdefault(e, h)
            pad = 0.05 * (hi - lo or 1.0)
            ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="black", lw=0.6, ls="--")
            ax.set_title(mpl_text(_short(str(s), 24)), loc="left", fontsize=8)
            ax.set_xlabel("retraining truth", fontsize=6.5)
            ax.tick_params(labelsize=6)
        axes[0][0].set_ylabel("estimate", fontsize=6.5)
        if not handles:  # no estimator has per-example values: nothing to plot against the truth
            plt.close(fig)
            return None
        fig.legend(handles=list(handles.values()), loc="upper center", ncol=len(handles), frameon=False,
                   bbox_to_anchor=(0.5, 1.0), markerscale=3)
    return to_svg(fig, prefix)
