"""Figures of a sweep with plotnine: each function takes DataFrames and returns a ggplot, or None without data.

Conventions: model size on the x axes is ACTIVE parameters N (what a token touches; C ≈ 6·N·D), budgets are the
planned training FLOPs C (exact per-token count of ``scaling.flops``), tokens D are tokens seen in training,
epochs = D/U with U unique tokens, losses are eval cross-entropy in nats per token. Input frames use the store's
view columns (``isoflop_points``, ``final_losses``, ``training_curves``, ``router_stats``); ``n_experts`` and
``top_k`` are optional and only refine the sparsity labels. Nothing here reads or writes files except ``save``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import to_hex
from mizani.breaks import breaks_log
from plotnine import (
    aes,
    element_blank,
    element_rect,
    element_text,
    facet_grid,
    facet_wrap,
    geom_errorbar,
    geom_errorbarh,
    geom_hline,
    geom_line,
    geom_point,
    geom_ribbon,
    geom_text,
    geom_vline,
    ggplot,
    guide_colorbar,
    guide_legend,
    guides,
    labs,
    position_dodge,
    scale_color_cmap,
    scale_color_manual,
    scale_fill_manual,
    scale_linetype_manual,
    scale_shape_manual,
    scale_size_continuous,
    scale_x_continuous,
    scale_x_log10,
    scale_y_log10,
    theme,
    theme_bw,
)
from scipy import stats

FIGSIZE = (9.0, 5.0)
LOSS = "eval loss (nats/token)"
AXIS = {"active_params": "active parameters N", "tokens": "training tokens D"}
VERTEX = {"active_params": ("n_opt", "n_lo", "n_hi"), "tokens": ("d_opt", "d_lo", "d_hi")}
MAX_S = 0.99


# ---------------------------------------------------------------------------------------------- labels and style


def sci(value: float, digits: int = 2) -> str:
    """Compact scientific notation for labels: 1e11, 3e11, 6.2e4."""
    if not np.isfinite(value) or value == 0:
        return f"{value:g}"
    exponent = math.floor(math.log10(abs(value)))
    mantissa = round(value / 10**exponent, digits - 1)
    if abs(mantissa) >= 10:
        mantissa, exponent = mantissa / 10, exponent + 1
    return f"{mantissa:g}e{exponent}"


def log_labels(values: Iterable[float]) -> list[str]:
    """Log-axis tick labels: plain numbers between 0.01 and 10⁴, otherwise powers of ten (10⁵, 3×10⁵)."""
    values = list(values)
    if all(1e-2 <= abs(v) < 1e4 for v in values if v):
        return [f"{v:g}" for v in values]
    labels = []
    for v in values:
        exponent = math.floor(math.log10(v) + 1e-9)
        mantissa = round(v / 10**exponent, 2)
        labels.append(f"$10^{{{exponent}}}$" if mantissa == 1 else f"${mantissa:g}{{\\times}}10^{{{exponent}}}$")
    return labels


def log_breaks(limits: tuple[float, float]) -> np.ndarray:
    """Log-axis breaks: mizani's, but at most four under two decades, where the labels (3.25×10⁴) are long and
    side-by-side panels would run them into each other."""
    return breaks_log(n=5 if limits[1] >= 100 * limits[0] else 4)(limits)


def log_x(**kwargs) -> scale_x_log10:
    return scale_x_log10(labels=log_labels, **{"breaks": log_breaks, **kwargs})


def variant_label(sparsity: float, n_experts: float | None = None, top_k: float | None = None) -> str:
    """'dense' or 'S = 0.5 (E=2, k=1)'."""
    if sparsity == 0:
        return "dense"
    if n_experts is None or top_k is None or pd.isna(n_experts) or pd.isna(top_k):
        return f"S = {sparsity:g}"
    return f"S = {sparsity:g} (E={int(n_experts)}, k={int(top_k)})"


@dataclass(frozen=True)
class Labels:
    """Legend and facet texts of one figure, taken from all its data so that every layer shares the categories."""

    variants: dict[float, str]
    budgets: tuple[float, ...]

    @classmethod
    def of(cls, *frames: pd.DataFrame | None) -> Labels:
        variants: dict[float, str] = {}
        budgets: set[float] = set()
        for frame in frames:
            if frame is None:
                continue
            budgets |= set(frame["budget"]) if "budget" in frame else set()
            if "sparsity" not in frame:
                continue
            for row in frame.drop_duplicates("sparsity").to_dict("records"):
                label = variant_label(row["sparsity"], row.get("n_experts"), row.get("top_k"))
                if len(label) >= len(variants.get(row["sparsity"], "")):
                    variants[row["sparsity"]] = label
        return cls(dict(sorted(variants.items())), tuple(sorted(budgets)))

    def __call__(self, frame: pd.DataFrame) -> pd.DataFrame:
        """``frame`` with ordered categorical ``variant`` (from sparsity) and ``budget_label`` (from budget; NaN for
        values that are not one of the budgets, as on a line's grid)."""
        frame = frame.copy()
        if "sparsity" in frame:
            frame["variant"] = pd.Categorical(frame["sparsity"].map(self.variants),
                                              categories=list(self.variants.values()), ordered=True)
        if "budget" in frame:
            frame["budget_label"] = pd.Categorical(frame["budget"].map({b: sci(b) for b in self.budgets}),
                                                   categories=[sci(b) for b in self.budgets], ordered=True)
        return frame

    def budget_colors(self) -> scale_color_manual:
        """Budgets in an ordered palette (dark = small)."""
        return scale_color_manual(values=palette(len(self.budgets)), name="budget C (FLOPs)", drop=False)

    def variant_colors(self, legend: dict[str, str] | None = None, aesthetic: str = "color",
                       title: str = "sparsity") -> scale_color_manual:
        """Sparsities from dark (dense) to warm (sparsest); ``legend`` may extend the texts (e.g. with fits)."""
        levels = list(self.variants.values())
        scale = scale_color_manual if aesthetic == "color" else scale_fill_manual
        return scale(values=dict(zip(levels, palette(len(levels), "plasma", 0.0, 0.8), strict=True)),
                     name=title, breaks=levels, labels=[(legend or {}).get(v, v) for v in levels])


def palette(n: int, cmap: str = "viridis", lo: float = 0.0, hi: float = 0.85) -> list[str]:
    """``n`` distinguishable colours along a colormap (its light end left out for a white background)."""
    return [to_hex(colormaps[cmap](x)) for x in np.linspace(lo, hi if n > 1 else lo, n)]


def categorical(n: int) -> list[str]:
    """``n`` colours for unordered categories (tab10, then tab20)."""
    colors = colormaps["tab10"].colors if n <= 10 else colormaps["tab20"].colors
    return [to_hex(c) for c in colors[:n]] + palette(max(n - len(colors), 0), "gist_ncar", 0.05, 0.9)


def cap(values: pd.Series, fraction: float = 0.025) -> float:
    """Error-bar cap size in data units: a fraction of the data's span."""
    span = float(values.max() - values.min())
    return fraction * span if span > 0 else fraction * float(abs(values.max()) or 1)


def style(size: tuple[float, float] = FIGSIZE, legend: str = "right") -> theme:
    return theme_bw(base_size=10) + theme(
        figure_size=size, legend_position=legend, strip_background=element_rect(fill="#eeeeee"),
        panel_grid_minor=element_blank(), plot_title=element_text(size=11), legend_key_spacing_y=2)


def facets(n: int) -> tuple[int, tuple[float, float]]:
    """Columns and figure size for ``n`` facets."""
    return (2 if n == 4 else min(n, 3)), ((9.0, 6.5) if n > 2 else FIGSIZE)


def usable(frame: pd.DataFrame | None, columns: Iterable[str]) -> pd.DataFrame | None:
    """``frame`` restricted to rows with finite values in ``columns``, or None when nothing is left."""
    if frame is None or frame.empty or not set(columns) <= set(frame.columns):
        return None
    frame = frame.replace([np.inf, -np.inf], np.nan).dropna(subset=list(columns))
    return frame if len(frame) else None


# ---------------------------------------------------------------------------------------------- isoFLOP profiles


def parabolas(points: pd.DataFrame, x: str, n: int = 60) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Quadratic fits of loss in log10(x) per budget and sparsity (≥ 3 distinct x): curves and vertices."""
    curves, vertices = [], []
    for (budget, sparsity), group in points.groupby(["budget", "sparsity"]):
        logx = np.log10(group[x].to_numpy(float))
        if len(np.unique(logx)) < 3:
            continue
        c2, c1, c0 = np.polyfit(logx, group["loss"].to_numpy(float), 2)
        grid = np.linspace(logx.min(), logx.max(), n)
        curves.append(pd.DataFrame({"budget": budget, "sparsity": sparsity, x: 10**grid,
                                    "loss": np.polyval([c2, c1, c0], grid)}))
        if c2 > 0:
            top = -c1 / (2 * c2)
            vertices.append({"budget": budget, "sparsity": sparsity, "opt": 10**top,
                             "loss_opt": np.polyval([c2, c1, c0], top),
                             "lo": np.nan, "hi": np.nan, "in_range": bool(logx.min() <= top <= logx.max())})
    columns = ["budget", "sparsity", "opt", "loss_opt", "lo", "hi", "in_range"]
    return (pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=["budget", "sparsity", x, "loss"]),
            pd.DataFrame(vertices, columns=columns))


def vertex_frame(vertices: pd.DataFrame | None, x: str) -> pd.DataFrame | None:
    """Vertices in the plot's terms: ``opt``, ``lo``, ``hi`` in units of x; the D interval mirrors N's (D ∝ 1/N)."""
    opt, lo, hi = VERTEX[x]
    frame = usable(vertices, ["budget", opt, "loss_opt"])
    if frame is None:
        return None
    frame = frame.copy()
    if x == "tokens" and lo not in frame and {"n_opt", "n_lo", "n_hi"} <= set(frame):
        frame[lo] = frame[opt] * frame["n_opt"] / frame["n_hi"]
        frame[hi] = frame[opt] * frame["n_opt"] / frame["n_lo"]
    out = pd.DataFrame({"budget": frame["budget"], "opt": frame[opt], "loss_opt": frame["loss_opt"],
                        "lo": frame.get(lo, np.nan), "hi": frame.get(hi, np.nan),
                        "in_range": frame.get("in_range", True)})
    if "sparsity" in frame:
        out.insert(1, "sparsity", frame["sparsity"])
    return out


def isoflop_plot(points: pd.DataFrame | None, vertices: pd.DataFrame | None = None,
                 x: str = "active_params") -> ggplot | None:
    """IsoFLOP profiles: final loss against ``x`` (active params or tokens) per budget, faceted by sparsity.

    Lines are quadratic fits in log10(x) per budget and sparsity. Vertices (``IsoFLOP.vertices_`` columns plus
    ``sparsity``) are drawn as diamonds with their interval; where they are not given, the drawn parabolas'
    vertices are marked (no interval). Crosses are vertices outside the sampled range (within 10x of it; further
    ones are left out).
    """
    data = usable(points, ["budget", "sparsity", x, "loss"])
    if data is None:
        return None
    curves, own = parabolas(data, x)
    marks = vertex_frame(vertices, x)
    if marks is not None:  # the parabolas' own vertices (no interval) where the law gave none
        known = marks.set_index(["budget", "sparsity"]).index if "sparsity" in marks else own.index[:0]
        own = own[~own.set_index(["budget", "sparsity"]).index.isin(known)]
        marks = pd.concat([marks, own], ignore_index=True) if len(own) else marks
    marks = own if marks is None else marks
    lo_x, hi_x = data[x].min(), data[x].max()
    marks = marks[(marks["opt"] > lo_x / 10) & (marks["opt"] < hi_x * 10)].assign(
        lo=lambda f: f["lo"].clip(lower=lo_x / 10), hi=lambda f: f["hi"].clip(upper=hi_x * 10),
        where=lambda f: np.where(f["in_range"].astype(bool), "isoFLOP vertex", "vertex outside sampled range"))
    labels = Labels.of(data, marks)
    data, curves, marks = labels(data), labels(curves), labels(marks)
    ncol, size = facets(len(labels.variants))
    plot = (ggplot(data, aes(x, "loss", color="budget_label"))
            + geom_point(size=2, alpha=0.8)
            + facet_wrap("variant", ncol=ncol)
            + log_x() + labels.budget_colors() + style(size)
            + labs(x=f"{AXIS[x]} (log scale)", y=LOSS, shape="",
                   title=f"IsoFLOP profiles: final loss against {AXIS[x]} at fixed compute C"))
    if len(curves):  # an empty layer would leave the loss axis without a range, hence without ticks
        plot += geom_line(data=curves, size=0.7)
    bars = marks.dropna(subset=["lo", "hi"])
    if len(bars):
        plot += geom_errorbarh(aes(y="loss_opt", xmin="lo", xmax="hi", color="budget_label"), data=bars,
                               height=cap(data["loss"]), size=0.6, inherit_aes=False, show_legend=False)
    if len(marks):
        plot += geom_point(aes("opt", "loss_opt", color="budget_label", shape="where"), data=marks, size=3.5,
                           fill="white", stroke=1.0, inherit_aes=False, show_legend={"color": False})
        plot += scale_shape_manual(values={"isoFLOP vertex": "D", "vertex outside sampled range": "X"})
    return plot


# ---------------------------------------------------------------------------------------------- frontier


def power_law(x: np.ndarray, y: np.ndarray, y_lo: np.ndarray | None = None, y_hi: np.ndarray | None = None,
              points: int = 40, draws: int = 400) -> tuple[pd.DataFrame, float] | None:
    """Least-squares line log10 y = c + slope·log10 x over the range of x, with a 95% band, and the slope.

    The band refits the line to vertices redrawn within their intervals (log-normal, interval = ±1.96 sd) when
    intervals are given, else the OLS t band from 5 points on (fewer make it uselessly wide); else NaN.
    """
    lx, ly = np.log10(x), np.log10(y)
    if len(np.unique(lx)) < 2:
        return None
    slope, icpt = np.polyfit(lx, ly, 1)
    grid = np.linspace(lx.min(), lx.max(), points)
    fit = icpt + slope * grid
    lo = hi = np.full_like(grid, np.nan)
    if y_lo is not None and y_hi is not None and np.isfinite(y_lo).all() and np.isfinite(y_hi).all():
        sd = np.maximum((np.log10(y_hi) - np.log10(y_lo)) / (2 * 1.96), 1e-12)
        rng = np.random.default_rng(0)
        lines = [np.polyval(np.polyfit(lx, rng.normal(ly, sd), 1), grid) for _ in range(draws)]
        lo, hi = np.percentile(lines, [2.5, 97.5], axis=0)
    elif len(lx) >= 5:
        resid = ly - (icpt + slope * lx)
        s = math.sqrt(resid @ resid / (len(lx) - 2))
        se = s * np.sqrt(1 / len(lx) + (grid - lx.mean()) ** 2 / ((lx - lx.mean()) ** 2).sum())
        t = stats.t.ppf(0.975, len(lx) - 2)
        lo, hi = fit - t * se, fit + t * se
    return pd.DataFrame({"budget": 10**grid, "value": 10**fit, "lo": 10**lo, "hi": 10**hi}), float(slope)


def interval_text(value: float, lo: float | None = None, hi: float | None = None, fmt: str = ".2f") -> str:
    """'0.52 [0.41, 0.63]', or the value alone without an interval."""
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return format(value, fmt)
    return f"{value:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def frontier_plot(vertices: pd.DataFrame | None, exponents: pd.DataFrame | None = None) -> ggplot | None:
    """Compute-optimal frontier: N*(C) and D*(C) against C per sparsity with power-law lines and 95% bands.

    ``vertices``: ``IsoFLOP.vertices_`` columns plus ``sparsity`` (vertices outside the sampled range are left out
    of the lines and drawn as crosses). ``exponents`` (optional): the fitted laws' exponents as rows sparsity,
    name ('a' for N* ∝ C^a, 'b' for D* ∝ C^b), value, ci_lo, ci_hi, shown in the legend; otherwise the drawn
    lines' slopes are. The dashed grey line is Chinchilla's a = b = 0.5 through the densest frontier's centre.
    """
    data = usable(vertices, ["budget", "sparsity", "n_opt", "d_opt", "loss_opt"])
    if data is None:
        return None
    quantities = {"active_params": ("N*: active parameters", "a"), "tokens": ("D*: training tokens", "b")}
    frames, lines, slopes = [], [], {}
    for x, (quantity, exponent) in quantities.items():
        part = vertex_frame(data, x).assign(quantity=quantity, inside=lambda f: f["in_range"].astype(bool))
        for col in ("n_experts", "top_k"):
            if col in data:
                part[col] = data[col].to_numpy()
        frames.append(part)
        for sparsity, group in part[part["inside"]].groupby("sparsity"):
            fitted = power_law(*(group[c].to_numpy(float) for c in ("budget", "opt", "lo", "hi")))
            if fitted is not None:
                lines.append(fitted[0].assign(sparsity=sparsity, quantity=quantity))
                slopes[(sparsity, exponent)] = (fitted[1], None, None)
    for row in [] if exponents is None else exponents.to_dict("records"):
        slopes[(row["sparsity"], row["name"])] = (row["value"], row.get("ci_lo"), row.get("ci_hi"))
    points = pd.concat(frames, ignore_index=True)
    labels = Labels.of(points)
    legend = {}
    for sparsity, name in labels.variants.items():
        parts = [f"{e} = {interval_text(*slopes[(sparsity, e)])}" for e in ("a", "b") if (sparsity, e) in slopes]
        legend[name] = f"{name}: {', '.join(parts)}" if parts else name
    order = [q for q, _ in quantities.values()]
    points = labels(points).assign(quantity=lambda f: pd.Categorical(f["quantity"], order),
                                   where=lambda f: np.where(f["inside"], "vertex", "vertex outside range"))
    dodge = position_dodge(width=0.06)
    plot = (ggplot(points, aes("budget", "opt", color="variant"))
            + facet_wrap("quantity", scales="free_y")
            + log_x() + scale_y_log10(labels=log_labels)
            + labels.variant_colors(legend) + style((9.0, 6.0 + 0.2 * len(legend)), legend="bottom")
            + guides(color=guide_legend(ncol=1), fill="none") + theme(legend_box="vertical")
            + labs(x="compute budget C (FLOPs, log scale)", y="compute-optimal N* or D* (log scale)", shape="",
                   linetype="", title="Compute-optimal frontier: isoFLOP vertices and power laws with 95% bands"))
    if lines:
        curve = labels(pd.concat(lines, ignore_index=True)).assign(
            quantity=lambda f: pd.Categorical(f["quantity"], order))
        band = curve.dropna(subset=["lo", "hi"])
        if len(band):
            plot += geom_ribbon(aes("budget", ymin="lo", ymax="hi", fill="variant", group="variant"), data=band,
                                alpha=0.1, inherit_aes=False)
            plot += labels.variant_colors(aesthetic="fill")
        plot += geom_line(aes(y="value"), data=curve, size=0.8)
    reference = chinchilla_reference(points)
    if reference is not None:
        plot += geom_line(aes("budget", "opt", linetype="ref", group="quantity"), data=reference, color="grey",
                          inherit_aes=False)
        plot += scale_linetype_manual(values={"Chinchilla a = b = 0.5": "dashed"})
    bars = points.dropna(subset=["lo", "hi"])
    if len(bars):
        plot += geom_errorbar(aes(ymin="lo", ymax="hi"), data=bars, width=0.05, position=dodge, size=0.4)
    plot += geom_point(aes(shape="where"), fill="white", size=2.5, position=dodge)
    plot += scale_shape_manual(values={"vertex": "o", "vertex outside range": "X"})
    return plot


def chinchilla_reference(points: pd.DataFrame) -> pd.DataFrame | None:
    """Slope-0.5 lines through the geometric centre of the densest variant's in-range vertices."""
    inside = points[points["inside"]]
    if inside.empty:
        return None
    base = inside[inside["sparsity"] == inside["sparsity"].min()]
    span = np.log10(points["budget"])
    rows = []
    for quantity, group in base.groupby("quantity", observed=True):
        lc, lv = np.log10(group["budget"]).mean(), np.log10(group["opt"]).mean()
        rows += [{"quantity": quantity, "budget": 10**c, "opt": 10 ** (lv + 0.5 * (c - lc)),
                  "ref": "Chinchilla a = b = 0.5"} for c in (span.min(), span.max())]
    return pd.DataFrame(rows).assign(quantity=lambda f: pd.Categorical(f["quantity"],
                                                                         points["quantity"].cat.categories))


# ---------------------------------------------------------------------------------------------- sparsity


def best_runs(points: pd.DataFrame) -> pd.DataFrame:
    """The lowest-loss run per budget and sparsity."""
    return points.loc[points.groupby(["budget", "sparsity"])["loss"].idxmin()].reset_index(drop=True)


def inverse_density(sparsity: pd.Series | float) -> pd.Series | float:
    """1/(1 − S) (= E/k for top-k routing), capped at S = 0.99: the sparsity axis' position."""
    return 1 / (1 - np.minimum(sparsity, MAX_S))


def sparsity_plot(points: pd.DataFrame | None, prediction: pd.DataFrame | None = None,
                  optimum: pd.DataFrame | None = None) -> ggplot | None:
    """Best loss per budget against sparsity, with the sparsity-aware law's prediction and S* with its interval.

    ``prediction``: rows budget, sparsity, loss (the law's loss at the compute-optimal size for that S).
    ``optimum``: rows budget, S_star, loss and optionally S_lo, S_hi. The x axis is spaced as log2 1/(1 − S).
    """
    data = usable(points, ["budget", "sparsity", "loss"])
    if data is None:
        return None
    best = best_runs(data)
    labels = Labels.of(best)
    best = labels(best).assign(x=lambda f: inverse_density(f["sparsity"]))
    levels = sorted(best["sparsity"].unique())
    plot = (ggplot(best, aes("x", "loss", color="budget_label"))
            + geom_point(size=2.5)
            + scale_x_continuous(trans="log2", breaks=[inverse_density(s) for s in levels], minor_breaks=[],
                                 labels=[f"{s:g}" for s in levels])
            + labels.budget_colors() + style()
            + labs(x="expert sparsity S = 1 − k/E (spaced as log E/k)", y=f"best {LOSS}", shape="", linetype="",
                   title="Loss against sparsity at fixed compute (best run per budget and sparsity)"))
    pred = usable(prediction, ["budget", "sparsity", "loss"])
    if pred is not None and len(levels) > 1:
        pred = labels(pred[pred["budget"].isin(labels.budgets)]).assign(
            x=lambda f: inverse_density(f["sparsity"]), kind="fitted sparsity law")
        plot += geom_line(aes(linetype="kind"), data=pred, size=0.7)
        plot += scale_linetype_manual(values={"fitted sparsity law": "solid"})
    elif len(levels) > 1:
        plot += geom_line(data=best, linetype="dotted")
    opt = usable(optimum, ["budget", "S_star", "loss"])
    if opt is not None:
        opt = labels(opt[opt["budget"].isin(labels.budgets)]).assign(
            x=lambda f: inverse_density(f["S_star"]), kind="optimal S* (95% CI)")
        bars = usable(opt, ["S_lo", "S_hi"])
        if bars is not None:
            plot += geom_errorbarh(aes(y="loss", xmin="xmin", xmax="xmax"), size=0.6, height=cap(best["loss"]),
                                   data=bars.assign(xmin=inverse_density(bars["S_lo"]),
                                                    xmax=inverse_density(bars["S_hi"])), show_legend=False)
        plot += geom_point(aes(shape="kind"), data=opt, size=4, fill="white", stroke=1.0,
                           show_legend={"color": False})
        plot += geom_text(aes(label="text"), data=opt.assign(text=opt["S_star"].map(lambda s: f"S* = {s:.3g}")),
                          size=8, nudge_y=-1.5 * cap(best["loss"]), show_legend=False)
        plot += scale_shape_manual(values={"optimal S* (95% CI)": "*"})
    return plot


def envelope_plot(points: pd.DataFrame | None, fit: pd.DataFrame | None = None) -> ggplot | None:
    """Loss envelope per sparsity (best run per budget) with the fitted L(C) = L∞ + A_S·C^−α (shared L∞, α).

    ``fit``: the Envelope law's parameters as rows name, value, ci_lo, ci_hi: ``L_inf``, ``alpha``, ``A_S<s>``
    per sparsity s and ``multiplier_S<s>``, the effective compute multiplier m over the reference (dense), shown
    in the legend with its interval: the variant reaches a loss with 1/m of the reference's compute.
    """
    data = usable(points, ["budget", "sparsity", "loss"])
    if data is None:
        return None
    best = best_runs(data)
    labels = Labels.of(best)
    values = {} if fit is None else {row["name"]: row for row in fit.to_dict("records")}
    grid = np.geomspace(min(labels.budgets), max(labels.budgets), 50)
    legend, curves = {}, []
    for sparsity, name in labels.variants.items():
        multiplier = values.get(f"multiplier_S{sparsity:g}")
        if multiplier is not None:
            legend[name] = (f"{name}: m = "
                            f"{interval_text(multiplier['value'], multiplier.get('ci_lo'), multiplier.get('ci_hi'))}")
        amplitude = values.get(f"A_S{sparsity:g}")
        if amplitude is not None and {"L_inf", "alpha"} <= set(values):
            loss = values["L_inf"]["value"] + amplitude["value"] * grid ** -values["alpha"]["value"]
            curves.append(pd.DataFrame({"budget": grid, "loss": loss, "sparsity": sparsity}))
    plot = (ggplot(labels(best), aes("budget", "loss", color="variant"))
            + geom_point(size=2.5)
            + log_x() + style()
            + labels.variant_colors(legend, title="sparsity: effective compute\nmultiplier m (95% CI)"
                                    if legend else "sparsity")
            + guides(color=guide_legend(ncol=1))
            + labs(x="compute budget C (FLOPs, log scale)", y=f"best {LOSS}",
                   title=r"Loss envelope per sparsity, fitted $L(C) = L_\infty + A_S\,C^{-\alpha}$"))
    if curves:
        plot += geom_line(data=labels(pd.concat(curves, ignore_index=True)), size=0.8)
    elif len(labels.budgets) > 1:
        plot += geom_line(linetype="dotted")
    return plot


# ---------------------------------------------------------------------------------------------- finite data


def epochs_plot(points: pd.DataFrame | None, prediction: pd.DataFrame | None = None,
                r_d_star: float | None = None) -> ggplot | None:
    """Final loss against epochs D/U per model size (colour), faceted by sparsity, with the repetition law.

    ``prediction``: rows sparsity, active_params, epochs, loss from the data-constrained law (drawn where the law
    applies, usually the dense runs). The dotted line marks one epoch; beyond it every token is a repeat. With
    the fitted ``r_d_star`` (Muennighoff et al.), a dashed line marks where a repeated token is worth half a new
    one, 1 + R_D*·ln 2 epochs (their D′: the value of the r-th repeat decays as exp(−r/R_D*)).
    """
    data = usable(points, ["sparsity", "active_params", "epochs", "loss"])
    if data is None:
        return None
    pred = usable(prediction, ["sparsity", "active_params", "epochs", "loss"])
    labels = Labels.of(data)
    ncol, size = facets(len(labels.variants))
    sizes = pd.concat([data["active_params"], pred["active_params"] if pred is not None else data["active_params"]])
    data = labels(data)
    repeated = data[data.groupby(["sparsity", "active_params"])["loss"].transform("size") > 1]
    plot = (ggplot(data, aes("epochs", "loss", color="active_params"))
            + geom_vline(xintercept=1, linetype="dotted", color="grey")
            + geom_line(aes(group="active_params"), data=repeated, size=0.4, alpha=0.6)
            + geom_point(size=2.2)
            + facet_wrap("variant", ncol=ncol)
            + log_x() + scale_color_cmap("viridis", trans="log10", labels=log_labels,
                                         limits=(sizes.min(), sizes.max()),
                                         guide=guide_colorbar(display="rectangles", nbin=48))  # a gradient: 2 MB of SVG
            + style(size)
            + labs(x="epochs D/U (log scale; dotted: one epoch)", y=LOSS, color="active params N",
                   linetype="", title="Repetition: loss against epochs over the unique tokens, per model size"))
    if pred is not None:
        pred = labels(pred[pred["sparsity"].isin(labels.variants)]).assign(kind="data-constrained law")
        plot += geom_line(aes(group="active_params", linetype="kind"), data=pred, size=0.8)
        plot += scale_linetype_manual(values={"data-constrained law": "dashed"})
    if r_d_star is not None and math.isfinite(r_d_star) and 0.0 in labels.variants:  # fitted on the dense runs
        half = 1 + r_d_star * math.log(2)
        mark = labels(pd.DataFrame({"sparsity": [0.0], "x": [half], "y": [float(data["loss"].max())],
                                    "label": [f"repeats worth ½ a new token\n(R_D* = {r_d_star:.3g})"]}))
        plot += geom_vline(aes(xintercept="x"), data=mark, inherit_aes=False, linetype="dashed", color="grey")
        plot += geom_text(aes(x="x", y="y", label="label"), data=mark.assign(x=half * 1.05), inherit_aes=False,
                          size=7, ha="left", va="top", color="grey")
    return plot


def gap_plot(finals: pd.DataFrame | None) -> ggplot | None:
    """Train–eval gap (final eval − final train loss) against epochs, by sparsity: overfitting from repetition."""
    data = usable(finals, ["sparsity", "active_params", "epochs", "final_eval_loss", "final_train_loss"])
    if data is None:
        return None
    labels = Labels.of(data)
    data = labels(data.assign(gap=data["final_eval_loss"] - data["final_train_loss"]))
    return (ggplot(data, aes("epochs", "gap", color="variant"))
            + geom_hline(yintercept=0, color="grey")
            + geom_point(aes(size="active_params"), alpha=0.8)
            + log_x() + labels.variant_colors()
            + scale_size_continuous(range=(1.2, 4), trans="log10", labels=log_labels, name="active params N")
            + style()
            + labs(x="epochs D/U (log scale)", y="eval − train loss (nats/token)",
                   title="Generalisation gap against repetition: final eval minus final train loss"))


# ---------------------------------------------------------------------------------------------- training curves


def curves_plot(curves: pd.DataFrame | None, budget: float | None = None, skip: float = 0.05) -> ggplot | None:
    """Eval loss against training tokens and against wall-clock seconds for the runs of one budget.

    Colour is sparsity, line width active params; ``budget`` defaults to the largest one with eval points. The
    first ``skip`` of each run's tokens (where every run drops from the initial loss alike) is left out.
    """
    data = usable(curves, ["budget", "run_id", "sparsity", "active_params", "tokens", "wall_s", "eval_loss"])
    if data is None:
        return None
    budget = data["budget"].max() if budget is None else budget
    data = data[np.isclose(data["budget"], budget) & (data["wall_s"] > 0)]
    data = data[data["tokens"] >= skip * data.groupby("run_id")["tokens"].transform("max")]
    if data.empty:
        return None
    labels = Labels.of(data)
    axes = {"tokens": "training tokens D", "wall_s": "wall-clock seconds"}
    long = pd.concat([labels(data).assign(x=data[c], axis=label) for c, label in axes.items()], ignore_index=True)
    long["axis"] = pd.Categorical(long["axis"], list(axes.values()))
    return (ggplot(long, aes("x", "eval_loss", color="variant", group="run_id"))
            + geom_line(aes(size="active_params"), alpha=0.85)
            + facet_wrap("axis", scales="free_x")
            + log_x() + scale_y_log10()
            + labels.variant_colors()
            + scale_size_continuous(range=(0.3, 1.6), trans="log10", labels=log_labels, name="active params N")
            + style()
            + labs(x="log scale: training tokens D (left), wall-clock seconds (right)", y=f"{LOSS}, log scale",
                   title=f"Training curves at C = {sci(budget)} FLOPs: dense against MoE",
                   subtitle=f"from {skip:.0%} of each run's tokens on"))


# ---------------------------------------------------------------------------------------------- router health


def moe_rows(router: pd.DataFrame | None) -> pd.DataFrame | None:
    """The MoE rows of ``router_stats`` (joined with sparsity, n_experts, top_k), with ``relative``: an expert's load
    over the mean load of its layer at that step (1 = balanced, whether loads sum to 1 or to k)."""
    data = usable(router, ["run_id", "tokens", "layer", "expert", "load", "sparsity", "n_experts", "top_k"])
    if data is None:
        return None
    data = data[data["n_experts"] > 1]
    if data.empty:
        return None
    mean = data.groupby(["run_id", "tokens", "layer"])["load"].transform("mean")
    return data.assign(relative=data["load"] / mean.where(mean > 0))


def router_load_plot(router: pd.DataFrame | None, layers: int = 4) -> ggplot | None:
    """Expert load relative to its layer's mean (1 = balanced) per layer and expert over training.

    One run per sparsity: at the largest budget, the one with the most active params; at most ``layers`` evenly
    spaced layers. None without MoE runs.
    """
    data = moe_rows(router)
    if data is None:
        return None
    if "budget" in data:  # isoFLOP points only: a trunk (no budget) is not one
        data = data[data["budget"].notna()]
    order = [c for c in ("budget", "active_params", "run_id") if c in data]
    chosen = data.drop_duplicates("run_id").sort_values(order).groupby("sparsity")["run_id"].last()
    data = data[data["run_id"].isin(chosen)]
    present = np.sort(data["layer"].unique())
    data = data[data["layer"].isin(present[np.unique(np.linspace(0, len(present) - 1, layers).round().astype(int))])]
    labels = Labels.of(data)
    data = labels(data).assign(expert=lambda f: pd.Categorical(f["expert"].astype(int)),
                               layer=lambda f: "layer " + f["layer"].astype(int).astype(str))
    n_experts = len(data["expert"].cat.categories)
    return (ggplot(data, aes("tokens", "relative", color="expert"))
            + geom_hline(yintercept=1, color="grey", linetype="dashed")
            + geom_line(size=0.6)
            + facet_grid("layer ~ variant")
            + log_x() + scale_color_manual(values=categorical(n_experts))
            + style((9.0, max(3.5, 1.6 * data["layer"].nunique() + 1.5)))
            + guides(color=guide_legend(ncol=1 if n_experts <= 10 else 2))
            + labs(x="training tokens D (log scale)", y="expert load / mean load (1 = balanced)",
                   title="Router load per expert over training (one run per sparsity, largest budget)"))


def router_health_plot(router: pd.DataFrame | None) -> ggplot | None:
    """Dropped-token fraction (when any) and the busiest expert's load over its layer's mean, over training, for
    every MoE run."""
    data = moe_rows(router)
    if data is None:
        return None
    keys = ["run_id", "sparsity", "n_experts", "top_k", "tokens"]
    per_step = data.groupby(keys, as_index=False).agg(dropped=("dropped_frac", "max"), busiest=("relative", "max"))
    metrics = {"dropped": "fraction of tokens dropped", "busiest": "busiest expert: load / mean load (worst layer)"}
    dropped = bool((per_step["dropped"].fillna(0) > 0).any())
    if not dropped:
        del metrics["dropped"]
    long = per_step.melt(id_vars=keys, value_vars=list(metrics), var_name="metric").dropna(subset=["value"])
    long["metric"] = pd.Categorical(long["metric"].map(metrics), list(metrics.values()))
    labels = Labels.of(long)
    plot = (ggplot(labels(long), aes("tokens", "value", color="variant", group="run_id"))
            + geom_line(size=0.6, alpha=0.8)
            + facet_wrap("metric", scales="free_y")
            + log_x() + labels.variant_colors() + style()
            + labs(x="training tokens D (log scale)", y="",
                   title="Router health over training: token dropping and load imbalance, every MoE run"))
    if not dropped:
        plot += labs(subtitle="no token was dropped in any run (dropless dispatch), so only the load is shown")
    return plot


# ---------------------------------------------------------------------------------------------- similarity


def similarity_plot(frame: pd.DataFrame | None) -> ggplot | None:
    """Per-token loss r² between pairs of runs over training: one line per pair kind, bootstrap band if given.

    ``frame``: rows tokens, r2, kind (e.g. 'MoE vs dense'), and optionally r2_lo, r2_hi.
    """
    data = usable(frame, ["tokens", "r2", "kind"])
    if data is None:
        return None
    data = data[data["tokens"] > 0]
    if data.empty:
        return None
    data = data.assign(kind=data["kind"].astype(str))
    kinds = sorted(data["kind"].unique())
    colors = dict(zip(kinds, categorical(len(kinds)), strict=True))
    plot = (ggplot(data, aes("tokens", "r2", color="kind"))
            + geom_line(size=0.8) + geom_point(size=1.5)
            + log_x() + scale_color_manual(values=colors) + scale_fill_manual(values=colors)
            + style()
            + labs(x="training tokens D (log scale)", y="r² of per-token eval losses", color="pair", fill="pair",
                   title="Do the runs learn the same tokens? Per-token loss r² between runs over training"))
    band = usable(data, ["r2_lo", "r2_hi"])
    if band is not None:
        plot += geom_ribbon(aes(ymin="r2_lo", ymax="r2_hi", fill="kind"), data=band, alpha=0.12, color=None)
    return plot


def holdout_plot(runs: pd.DataFrame | None, title: str = "") -> ggplot | None:
    """Extrapolation check (``scaling.holdout``): each held-out run's predicted against observed loss, with its
    prediction interval, coloured by budget; on the dashed diagonal the law is exact."""
    data = usable(runs, ["observed", "predicted", "pi_lo", "pi_hi", "budget"])
    if data is None:
        return None
    data = data.assign(budget=[sci(b) for b in data["budget"]])
    span = [min(data["observed"].min(), data["pi_lo"].min()), max(data["observed"].max(), data["pi_hi"].max())]
    return (ggplot(data, aes("observed", "predicted", color="budget"))
            + geom_line(aes("x", "y"), data=pd.DataFrame({"x": span, "y": span}), color="#888888",
                        linetype="dashed", inherit_aes=False)
            + geom_errorbar(aes(ymin="pi_lo", ymax="pi_hi"), width=1e-9) + geom_point(size=2)
            + scale_color_manual(values=categorical(data["budget"].nunique()))
            + style(size=(6.0, 5.0))
            + labs(x=f"observed {LOSS}", y=f"predicted {LOSS}", color="held-out budget C", title=title))


# ---------------------------------------------------------------------------------------------- output


def save(plot: ggplot, path_stem: str | Path, dpi: int = 120) -> list[Path]:
    """Write ``plot`` as ``<stem>.png`` (``dpi``) and ``<stem>.svg``; returns both paths."""
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".svg")]
    for path in paths:
        plot.save(path, dpi=dpi, verbose=False)
    return paths


# ---------------------------------------------------------------------------------------------- plenty vs scarce data


def regime_label(frame: pd.DataFrame) -> pd.Series:
    """'plenty: U = 1e9' / 'scarce: U = 1e5', ordered plenty first (the ``regime`` and ``unique_tokens`` columns)."""
    text = frame["regime"] + ": U = " + frame["unique_tokens"].map(sci)
    order = sorted(text.unique(), key=lambda t: (not t.startswith("plenty"), t))
    return pd.Categorical(text, categories=order, ordered=True)


def regime_isoflop_plot(points: pd.DataFrame | None, vertices: pd.DataFrame | None) -> ggplot | None:
    """IsoFLOP curves per sparsity at the largest budget, plenty and scarce data side by side.

    ``points``: isoflop_points rows (unique_tokens, budget, sparsity, active_params, loss); ``vertices``:
    ``SparsityVertex.vertices_`` (regime, unique_tokens, budget, sparsity, n_star, n_lo, n_hi, loss_star,
    loss_lo, loss_hi, in_range). Diamonds: vertices with their intervals in N* and L*; in the scarce panel an
    arrow runs from each sparsity's plenty vertex (hollow circle) to its scarce vertex.
    """
    verts = usable(vertices, ["regime", "unique_tokens", "budget", "sparsity", "n_star", "loss_star"])
    data = usable(points, ["unique_tokens", "budget", "sparsity", "active_params", "loss"])
    if verts is None or data is None:
        return None
    top = verts["budget"].max()
    verts = verts[(verts["budget"] == top) & verts["regime"].isin(["plenty", "scarce"])].copy()
    regimes = verts.drop_duplicates("unique_tokens")[["unique_tokens", "regime"]]
    data = data[np.isclose(data["budget"], top, rtol=1e-6)].merge(regimes, on="unique_tokens")
    if data.empty or verts["regime"].nunique() < 2:
        return None
    labels = Labels.of(data, verts)
    curves = fitted_parabolas(verts).merge(regimes, on="unique_tokens")
    data, curves, verts = (labels(f).assign(panel=lambda f: regime_label(f)) for f in (data, curves, verts))
    plenty = verts[verts["regime"] == "plenty"].set_index("sparsity")
    scarce = verts[verts["regime"] == "scarce"]
    arrows = scarce.assign(x0=scarce["sparsity"].map(plenty["n_star"]),
                           y0=scarce["sparsity"].map(plenty["loss_star"])).dropna(subset=["x0", "y0"])
    ghosts = arrows.assign(n_star=arrows["x0"], loss_star=arrows["y0"])
    verts = verts.assign(where=np.where(verts["in_range"].astype(bool), "isoFLOP vertex (95% CI)",
                                        "no interior minimum (edge)"))
    plot = (ggplot(data, aes("active_params", "loss", color="variant"))
            + geom_line(data=curves, size=0.7)
            + geom_point(size=1.8, alpha=0.7)
            + facet_wrap("panel", ncol=2)
            + log_x() + labels.variant_colors() + style((10.0, 5.0))
            + labs(x="active parameters N (log scale)", y=LOSS, shape="",
                   title=f"IsoFLOP curves per sparsity at C = {sci(top)}: plenty vs scarce unique tokens"))
    bars = usable(verts, ["n_lo", "n_hi", "loss_lo", "loss_hi"])
    if bars is not None:
        plot += geom_errorbarh(aes(y="loss_star", xmin="n_lo", xmax="n_hi", color="variant"), data=bars,
                               height=cap(data["loss"]), size=0.5, inherit_aes=False, show_legend=False)
        plot += geom_errorbar(aes(x="n_star", ymin="loss_lo", ymax="loss_hi", color="variant"), data=bars,
                              width=0.03, size=0.5, inherit_aes=False, show_legend=False)
    if len(arrows):
        from plotnine import arrow, geom_segment

        plot += geom_segment(aes(x="x0", y="y0", xend="n_star", yend="loss_star", color="variant"), data=arrows,
                             arrow=arrow(length=0.08, type="closed"), size=0.5, alpha=0.8, inherit_aes=False,
                             show_legend=False)
        plot += geom_point(aes("n_star", "loss_star", color="variant"), data=ghosts, shape="o", fill="none",
                           size=2.5, inherit_aes=False, show_legend=False)
    plot += geom_point(aes("n_star", "loss_star", color="variant", shape="where"), data=verts, size=3.5,
                       fill="white", stroke=1.0, inherit_aes=False, show_legend={"color": False})
    plot += scale_shape_manual(values={"isoFLOP vertex (95% CI)": "D", "no interior minimum (edge)": "X"})
    return plot


def fitted_parabolas(vertices: pd.DataFrame, n: int = 40) -> pd.DataFrame:
    """The curves ``SparsityVertex`` fitted (c0 + c1·v + c2·v², v = log10 N − center), each drawn over the sizes
    it was fitted to (``fit_lo``..``fit_hi``), as (unique_tokens, budget, sparsity, active_params, loss) rows."""
    rows = []
    for v in vertices.dropna(subset=["c0", "c1", "c2", "fit_lo", "fit_hi"]).itertuples(index=False):
        grid = np.linspace(v.fit_lo, v.fit_hi, n)
        u = grid - v.center
        rows.append(pd.DataFrame({"unique_tokens": v.unique_tokens, "budget": v.budget, "sparsity": v.sparsity,
                                  "active_params": 10**grid, "loss": v.c0 + v.c1 * u + v.c2 * u * u}))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
        columns=["unique_tokens", "budget", "sparsity", "active_params", "loss"])


def vertex_sparsity_plot(vertices: pd.DataFrame | None, s_star: pd.DataFrame | None) -> ggplot | None:
    """L* (isoFLOP vertex loss, 95% CI) against sparsity per budget, plenty and scarce data side by side, with
    S* per budget (star) and its interval. ``vertices``/``s_star``: ``SparsityVertex.vertices_`` / ``s_star_``."""
    verts = usable(vertices, ["regime", "unique_tokens", "budget", "sparsity", "loss_star"])
    if verts is None:
        return None
    verts = verts[verts["regime"].isin(["plenty", "scarce"])]
    labels = Labels.of(verts)
    verts = labels(verts).assign(x=lambda f: inverse_density(f["sparsity"]), panel=lambda f: regime_label(f))
    levels = sorted(verts["sparsity"].unique())
    plot = (ggplot(verts, aes("x", "loss_star", color="budget_label"))
            + geom_line(size=0.6) + geom_point(size=2.2)
            + facet_wrap("panel", ncol=2, scales="free_y")
            + scale_x_continuous(trans="log2", breaks=[inverse_density(s) for s in levels], minor_breaks=[],
                                 labels=[f"{s:g}" for s in levels])
            + labels.budget_colors() + style((10.0, 5.0))
            + labs(x="expert sparsity S = 1 − k/E (spaced as log E/k)", y=f"isoFLOP vertex L* ({LOSS})", shape="",
                   title="Best achievable loss per sparsity (isoFLOP vertex) and the optimal sparsity S*"))
    bars = usable(verts, ["loss_lo", "loss_hi"])
    if bars is not None:
        plot += geom_errorbar(aes(ymin="loss_lo", ymax="loss_hi"), data=bars, width=0.08, size=0.5,
                              show_legend=False)
    stars = usable(s_star, ["unique_tokens", "budget", "S_star"])
    if stars is not None:
        low = verts.groupby(["unique_tokens", "budget"], as_index=False)["loss_star"].min()
        stars = labels(stars[stars["regime"].isin(["plenty", "scarce"])].merge(low, on=["unique_tokens", "budget"]))
        stars = stars.assign(x=inverse_density(stars["S_star"]), panel=regime_label(stars), kind="S* (95% CI)",
                             loss_star=stars["loss_star"] - 2 * cap(verts["loss_star"]))
        intervals = usable(stars, ["S_lo", "S_hi"])
        if intervals is not None:
            plot += geom_errorbarh(aes(y="loss_star", xmin="xmin", xmax="xmax"), height=cap(verts["loss_star"]),
                                   size=0.6, show_legend=False,
                                   data=intervals.assign(xmin=inverse_density(intervals["S_lo"]),
                                                         xmax=inverse_density(intervals["S_hi"])))
        plot += geom_point(aes(shape="kind"), data=stars, size=4, fill="white", stroke=1.0,
                           show_legend={"color": False})
        plot += scale_shape_manual(values={"S* (95% CI)": "*"})
    return plot
