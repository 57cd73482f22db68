"""Printing tables: a rich table for people, csv/json for scripts (nothing else on stdout)."""

from __future__ import annotations

import json
import math
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

FORMATS = ["table", "csv", "json"]


def fmt_value(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def emit(frame: pd.DataFrame, fmt: str = "table", title: str | None = None) -> None:
    """Print ``frame`` to stdout in ``fmt``."""
    import pandas as pd  # here, not at the top: an error line must not wait for pandas and rich
    from rich.console import Console
    from rich.table import Table

    if fmt == "csv":
        frame.to_csv(sys.stdout, index=False)
    elif fmt == "json":
        print(frame.to_json(orient="records", date_format="iso"))
    else:
        table = Table(title=title, show_lines=False, header_style="bold")
        cells = [[fmt_value(v) for v in row] for row in frame.itertuples(index=False)]
        width = 4
        for i, col in enumerate(frame.columns):
            numeric = pd.api.types.is_numeric_dtype(frame[col])
            table.add_column(str(col), justify="right" if numeric else "left", no_wrap=True)
            width += 3 + max([len(str(col))] + [len(c[i]) for c in cells])
        for row in cells:
            table.add_row(*row)
        Console(width=max(width, 80)).print(table)


def emit_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=float))


def err(message: str) -> None:
    """One line on stderr."""
    print(message, file=sys.stderr)
