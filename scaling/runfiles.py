"""The run files' schema: what ``scaling.train`` writes into a run directory and ``scaling.store`` ingests.

``read_finished`` checks ``result.json`` and the ``token_losses.npz`` beside it before anything is stored, and
says in one line which file is damaged and how; ``set_aside`` renames a damaged file out of the way (kept, not
deleted) so that the run counts as unfinished and is trained again.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

STATUSES = ("ok", "diverged", "failed", "interrupted")
NUMBERS = ("final_train_loss", "final_eval_loss", "tokens_seen", "epochs_done", "diverged_step", "wall_s",
           "train_s", "tokens_per_s", "flops_per_s", "steps")
TIMES = ("started_at", "finished_at")
METRIC_FIELDS = ("tokens", "train_loss", "ce_loss", "aux_loss", "z_loss", "eval_loss", "lr", "wall_s")
ROUTER_STATS = ("load", "entropy", "dropped_frac")  # router.RouterStats' fields: the router_stats table's columns
ROUTER_FIELDS = ("tokens", *ROUTER_STATS)
ARRAYS = ("steps", "tokens", "eval_loss", "losses")


class DamagedRunFile(ValueError):
    """A run file that does not follow the schema: ``path`` and the reason."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"damaged run file {path}: {reason}")
        self.path = path


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_rows(path: Path, rows: Any, name: str, keys: tuple[str, ...], numbers: tuple[str, ...]) -> None:
    """``rows`` is a list of objects whose ``keys`` are integers and ``numbers`` numbers or null."""
    if not isinstance(rows, list):
        raise DamagedRunFile(path, f"{name} is not a list")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DamagedRunFile(path, f"{name}[{i}] is not an object")
        bad = [k for k in keys if not is_int(row.get(k))] + [
            k for k in numbers if row.get(k) is not None and not is_number(row.get(k))]
        if bad:
            raise DamagedRunFile(path, f"{name}[{i}] has no valid {', '.join(bad)}")


def check_result(path: Path, result: Any, run_id: str | None) -> dict[str, Any]:
    """``result.json``'s content, checked: an object naming this run, a known status, typed fields, and for an
    ``ok`` run its final losses and metrics rows."""
    if not isinstance(result, dict):
        raise DamagedRunFile(path, f"a JSON {type(result).__name__}, not an object")
    if not isinstance(result.get("run_id"), str):
        raise DamagedRunFile(path, "no run_id")
    if run_id is not None and result["run_id"] != run_id:
        raise DamagedRunFile(path, f"run_id {result['run_id']!r} is not this run's ({run_id})")
    if result.get("status") not in STATUSES:
        raise DamagedRunFile(path, f"status {result.get('status')!r} is not one of {', '.join(STATUSES)}")
    bad = [k for k in NUMBERS if result.get(k) is not None and not is_number(result[k])]
    for key in TIMES:
        try:
            if result.get(key) is not None:
                datetime.fromisoformat(result[key])
        except (TypeError, ValueError):
            bad.append(key)
    if result.get("error") is not None and not isinstance(result["error"], str):
        bad.append("error")
    if bad:
        raise DamagedRunFile(path, f"{', '.join(bad)} not of the right type")
    check_rows(path, result.get("metrics", []), "metrics", ("step",), METRIC_FIELDS)
    check_rows(path, result.get("router", []), "router", ("step", "layer", "expert"), ROUTER_FIELDS)
    if result["status"] == "ok":
        missing = [k for k in ("final_train_loss", "final_eval_loss")
                   if not is_number(result.get(k)) or not math.isfinite(result[k])]
        if missing or not result.get("metrics"):
            raise DamagedRunFile(path, f"status ok without {', '.join(missing or ['metrics'])}")
    return result


def check_arrays(path: Path) -> dict[str, np.ndarray]:
    """``token_losses.npz``: steps, tokens, eval_loss [n] and losses [n, positions]."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ARRAYS}
    except KeyError as e:
        raise DamagedRunFile(path, f"no array {e}") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DamagedRunFile(path, f"not a readable .npz ({type(e).__name__})") from None
    n = len(arrays["steps"])
    if any(arrays[k].shape != (n,) for k in ARRAYS[:3]) or arrays["losses"].ndim != 2 or len(arrays["losses"]) != n:
        raise DamagedRunFile(path, "arrays of mismatched shapes: " + ", ".join(
            f"{k} {arrays[k].shape}" for k in ARRAYS))
    return arrays


def read_finished(run_dir: Path, run_id: str | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """``result.json`` and the token-loss arrays of a run that has written its result, both checked; raises
    ``DamagedRunFile``. An ``ok`` run must have its arrays."""
    path = run_dir / "result.json"
    try:
        result = json.loads(path.read_bytes())
    except (UnicodeDecodeError, ValueError) as e:
        raise DamagedRunFile(path, f"not valid JSON ({' '.join(str(e).split())})") from None
    result = check_result(path, result, run_id)
    arrays_path = run_dir / "token_losses.npz"
    if not arrays_path.exists():
        if result["status"] == "ok":
            raise DamagedRunFile(arrays_path, "missing, though result.json says the run is ok")
        return result, None
    return result, check_arrays(arrays_path)


def set_aside(path: Path, when: datetime) -> Path | None:
    """Rename a damaged file to ``NAME.damaged-TIME`` beside it; None if it could not be renamed."""
    target = path.with_name(f"{path.name}.damaged-{when:%Y%m%dT%H%M%S}")
    try:
        os.replace(path, target)
    except OSError:
        return None
    return target
