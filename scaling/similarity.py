"""Per-token loss similarity: do two runs get the same eval tokens right, and does that change over training?

Every run evaluates the same eval positions at each checkpoint (``token_loss_arrays``). For two runs at matched
checkpoints, r² = Pearson(loss_a, loss_b)² over positions (the user's measure, seed 000); Spearman's ρ is reported
beside it as a rank-based check that a few very hard tokens do not drive r². Checkpoints are matched either by
equal tokens seen (``match="tokens"``) or, for each checkpoint of run A, by the checkpoint of run B with the
nearest overall eval loss (``match="loss"``: "trained to the same loss"), with the loss gap reported.

Intervals: percentile bootstrap over eval positions (resampled with replacement; one index matrix per
(n, n_boot, seed), shared by every pair, so replicates line up across pairs). Positions are treated as
independent, so with losses correlated within a sequence the intervals are somewhat too narrow. The r² interval
is the image of the bootstrap interval of r under r ↦ r², so it reaches 0 when r's interval straddles 0.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from itertools import combinations
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
from scipy.stats import rankdata

from scaling.output import emit, err
from scaling.store import StoreError, connect, runs_frame

MATCHES = ("tokens", "loss")
COLUMNS = ["run_a", "run_b", "kind", "same_seed", "step_a", "step_b", "tokens_a", "tokens_b", "eval_loss_a",
           "eval_loss_b", "loss_gap", "r2", "r2_lo", "r2_hi", "pearson", "spearman"]
TABLE_COLUMNS = ["run_a", "run_b", "kind", "same_seed", "tokens_a", "tokens_b", "eval_loss_a", "loss_gap", "r2",
                 "r2_lo", "r2_hi", "spearman"]
# Identify a run's configuration when no ``spec`` is given (seed excluded).
CONFIG_COLUMNS = ("n_experts", "top_k", "d_model", "n_layers", "n_heads", "params", "active_params", "lr", "tokens",
                  "unique_tokens")
CI_LEVEL = 0.95


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two equally long 1-d arrays (NaN when either is constant)."""
    a = np.asarray(a, np.float64) - np.mean(a)
    b = np.asarray(b, np.float64) - np.mean(b)
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.dot(a, b) / math.sqrt(np.dot(a, a) * np.dot(b, b)))


def r2(a: np.ndarray, b: np.ndarray) -> float:
    """Squared Pearson correlation: the share of one run's per-token loss variance the other explains linearly."""
    return pearson(a, b) ** 2


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (Pearson of average ranks)."""
    return pearson(rankdata(a), rankdata(b))


@lru_cache(maxsize=4)
def resample_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """How often each of ``n`` positions appears in each of ``n_boot`` resamples: an index matrix [n_boot, n]
    drawn with replacement, as counts [n_boot, n] (read-only, cached so pairs share resamples)."""
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    counts = np.bincount((idx + n * np.arange(n_boot)[:, None]).ravel(), minlength=n_boot * n)
    counts = counts.reshape(n_boot, n).astype(np.float64)
    counts.setflags(write=False)
    return counts


def bootstrap_pearson(a: np.ndarray, b: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Pearson r of each bootstrap resample of positions, computed in batch as weighted moments (one matmul)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    a, b = a - a.mean(), b - b.mean()  # shift-invariant; keeps the moment formulas well conditioned
    moments = resample_counts(len(a), n_boot, seed) @ np.stack([a, b, a * a, b * b, a * b], axis=1) / len(a)
    ma, mb, aa, bb, ab = moments.T
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ab - ma * mb) / np.sqrt((aa - ma * ma) * (bb - mb * mb))


def r2_interval(r_boot: np.ndarray, level: float = CI_LEVEL) -> tuple[float, float]:
    """Percentile interval of r mapped through r ↦ r² (0 at the bottom when the r interval contains 0)."""
    if not np.isfinite(r_boot).any():
        return math.nan, math.nan
    lo, hi = np.nanpercentile(r_boot, [50 * (1 - level), 50 * (1 + level)])
    top = max(lo * lo, hi * hi)
    return (0.0 if lo <= 0 <= hi else min(lo * lo, hi * hi)), top


def pair_similarity(losses_a: np.ndarray, losses_b: np.ndarray, n_boot: int = 200, seed: int = 0) -> dict[str, float]:
    """r² (with a bootstrap interval over positions), Pearson r and Spearman ρ of two runs' per-token losses."""
    if np.shape(losses_a) != np.shape(losses_b) or np.ndim(losses_a) != 1:
        raise ValueError(f"per-token losses must be 1-d arrays over the same positions, got shapes "
                         f"{np.shape(losses_a)} and {np.shape(losses_b)}")
    r = pearson(losses_a, losses_b)
    lo, hi = r2_interval(bootstrap_pearson(losses_a, losses_b, n_boot, seed)) if n_boot > 0 else (math.nan,) * 2
    return {"r2": r * r, "pearson": r, "spearman": spearman(losses_a, losses_b), "r2_lo": lo, "r2_hi": hi}


def config_key(run: Mapping[str, Any]) -> str:
    """A run's configuration without its seed: the ``spec`` (JSON, dict or RunSpec) if given, else config columns."""
    spec = run.get("spec")
    if isinstance(spec, str):
        spec = json.loads(spec)
    elif hasattr(spec, "to_dict"):
        spec = spec.to_dict()
    if isinstance(spec, Mapping):
        return json.dumps({k: v for k, v in spec.items() if k != "seed"}, sort_keys=True, default=str)
    return repr([run.get(c) for c in CONFIG_COLUMNS])


def pair_kind(run_a: Mapping[str, Any], run_b: Mapping[str, Any]) -> str:
    """'dense–dense (other seed|other size|other config)', 'dense–MoE' or 'MoE–MoE (other seed|other config)'.

    "other seed": identical configuration except the seed; dense "other size": different total params.
    """
    moe_a, moe_b = (int(r["n_experts"]) > 1 for r in (run_a, run_b))
    if moe_a != moe_b:
        return "dense–MoE"
    name = "MoE–MoE" if moe_a else "dense–dense"
    if config_key(run_a) == config_key(run_b):
        return f"{name} (other seed)"
    if not moe_a and run_a.get("params") != run_b.get("params"):
        return f"{name} (other size)"
    return f"{name} (other config)"


def match_checkpoints(a: pd.DataFrame, b: pd.DataFrame, match: str) -> list[tuple[int, int]]:
    """Positional (row of ``a``, row of ``b``) checkpoint pairs.

    ``tokens``: equal tokens seen, unmatched checkpoints skipped (no interpolation). ``loss``: every checkpoint
    of ``a`` with the checkpoint of ``b`` whose eval loss is nearest (the earlier one on a tie).
    """
    if match == "tokens":
        where = {t: j for j, t in enumerate(b["tokens"].to_numpy())}
        return [(i, where[t]) for i, t in enumerate(a["tokens"].to_numpy()) if t in where]
    if match == "loss":
        la, lb = a["eval_loss"].to_numpy(float), b["eval_loss"].to_numpy(float)
        return [(i, int(np.argmin(np.abs(lb - x)))) for i, x in enumerate(la) if np.isfinite(x)]
    raise ValueError(f"match must be one of {MATCHES}, got {match!r}")


def similarity_table(arrays: pd.DataFrame, runs: pd.DataFrame, match: str = "tokens", n_boot: int = 200,
                     seed: int = 0, run_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """Similarity of every pair of runs (of ``run_ids`` if given) at matched checkpoints, one row per pair and match.

    ``arrays``: run_id, step, tokens, eval_loss, losses (one array per row, same positions for every run);
    ``runs``: run_id, n_experts, seed, params (+ spec or config columns for ``pair_kind``). Pairs are ordered
    dense before MoE, smaller before larger, lower seed first; ``loss_gap`` = eval_loss_b − eval_loss_a.
    """
    if match not in MATCHES:
        raise ValueError(f"match must be one of {MATCHES}, got {match!r}")
    info = runs.drop_duplicates("run_id").sort_values(["n_experts", "params", "seed", "run_id"])
    present = set(arrays["run_id"]) & set(run_ids or info["run_id"])
    info = info[info["run_id"].isin(present)].set_index("run_id", drop=False)
    checkpoints = {rid: frame.sort_values("step").reset_index(drop=True) for rid, frame in arrays.groupby("run_id")}
    rows = []
    for a, b in combinations(info.index, 2):
        ra, rb = info.loc[a], info.loc[b]
        kind, same_seed = pair_kind(ra, rb), bool(ra["seed"] == rb["seed"])
        ca, cb = checkpoints[a], checkpoints[b]
        for i, j in match_checkpoints(ca, cb, match):
            x, y = ca.iloc[i], cb.iloc[j]
            rows.append({"run_a": a, "run_b": b, "kind": kind, "same_seed": same_seed, "step_a": x["step"],
                         "step_b": y["step"], "tokens_a": x["tokens"], "tokens_b": y["tokens"],
                         "eval_loss_a": x["eval_loss"], "eval_loss_b": y["eval_loss"],
                         "loss_gap": y["eval_loss"] - x["eval_loss"],
                         **pair_similarity(x["losses"], y["losses"], n_boot, seed)})
    return pd.DataFrame(rows, columns=COLUMNS)


def load_arrays(con: duckdb.DuckDBPyConnection, sweep: str, run_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """Per-token loss arrays of a sweep's ok runs, or of ``run_ids`` (any status), one row per run and checkpoint."""
    known = {r for (r,) in con.execute("SELECT run_id FROM sweep_runs WHERE sweep = ?", [sweep]).fetchall()}
    if not known:
        raise StoreError(f"no sweep named {sweep!r} in the store (see `scaling status`)")
    missing = sorted(set(run_ids or ()) - known)
    if missing:
        raise StoreError(f"runs not in sweep {sweep!r}: {', '.join(missing)}")
    which, params = ("list_contains(?::VARCHAR[], a.run_id)", [list(run_ids)]) if run_ids else ("r.status = 'ok'", [])
    arrays = con.execute(f"""
        SELECT a.run_id, a.step, a.tokens, a.eval_loss, a.losses
        FROM token_loss_arrays a JOIN runs r USING (run_id) JOIN sweep_runs s USING (run_id)
        WHERE s.sweep = ? AND {which} ORDER BY a.run_id, a.step""", [sweep, *params]).df()
    lengths = sorted({len(x) for x in arrays["losses"]})
    if len(lengths) > 1:
        raise StoreError(f"sweep {sweep!r}: runs evaluated different numbers of eval positions ({lengths}); "
                         "per-token losses are only comparable over the same positions")
    return arrays


def pair_label(kind: str, same_seed: bool) -> str:
    """Plot label: the kind, plus whether the seeds agree where the kind does not say (a shared seed can mean a
    shared data order and shared initial weights, which makes runs more alike)."""
    return kind if "other seed" in kind else f"{kind}, {'same' if same_seed else 'other'} seed"


def kind_means(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean r² and mean interval bounds over the pairs of each label at each of run A's token counts."""
    labels = [pair_label(k, s) for k, s in zip(frame["kind"], frame["same_seed"], strict=True)]
    return (frame.assign(kind=labels, tokens=frame["tokens_a"])
            .groupby(["kind", "tokens"], as_index=False)[["r2", "r2_lo", "r2_hi"]].mean())


def similarity_figure(frame: pd.DataFrame, stem: Path, match: str = "tokens") -> list[Path]:
    """r² vs tokens seen, one line per pair kind (mean over its pairs) with bootstrap bands: ``stem``.png/.svg."""
    from plotnine import labs

    from scaling.plots import save, similarity_plot

    plot = similarity_plot(kind_means(frame))
    if plot is None:
        return []
    subtitle = ("checkpoints at equal tokens seen" if match == "tokens" else
                "each checkpoint of run A vs run B's checkpoint of nearest eval loss (x: A's tokens)")
    return save(plot + labs(subtitle=f"{subtitle}; bands: mean of the pairs' {CI_LEVEL:.0%} bootstrap intervals"),
                stem)


def similarity_command(db: str | None, sweep: str, run_ids: Sequence[str], match: str, n_boot: int, out: Path,
                       fmt: str) -> pd.DataFrame:
    """``scaling similarity``: print the pair table, write ``out/similarity.csv`` and ``out/figures/similarity.*``."""
    con = connect(db, read_only=True)
    try:
        arrays = load_arrays(con, sweep, run_ids)
        runs = runs_frame(con, sweep)
    finally:
        con.close()
    n_runs = arrays["run_id"].nunique()
    if n_runs < 2:
        which = "the selected runs have" if run_ids else f"sweep {sweep!r} has"
        raise StoreError(f"{which} {n_runs} run(s) with per-token losses; similarity needs at least 2 "
                         "(train more, e.g. `scaling run sweeps/similarity.toml`)")
    frame = similarity_table(arrays, runs, match, n_boot)
    if frame.empty:
        raise StoreError(f"no checkpoints of sweep {sweep!r} match by {match} (different batch sizes?); "
                         "try --match loss")
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "similarity.csv", index=False)
    figures = similarity_figure(frame, out / "figures" / "similarity", match)
    emit(frame[TABLE_COLUMNS] if fmt == "table" else frame, fmt,
         title=f"per-token loss similarity: {n_runs} runs, {len(frame)} matched checkpoints (by {match})")
    err(f"wrote {out / 'similarity.csv'}" + "".join(f", {p}" for p in figures))
    return frame
