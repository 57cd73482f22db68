"""The ``scaling`` command as a user runs it: formats, help, one-line errors with exit codes."""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCALING = shutil.which("scaling") or str(Path(sys.executable).parent / "scaling")


def scaling(*args, cwd=ROOT, env=None):
    return subprocess.run([SCALING, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_help_lists_subcommands():
    out = scaling("--help").stdout
    for cmd in ["grid", "run", "status", "fit", "report", "sql", "similarity", "demo", "data", "export"]:
        assert f"  {cmd}" in out


def test_grid_formats():
    table = scaling("grid", "sweeps/demo.toml")
    assert table.returncode == 0 and "run_id" in table.stdout
    csv = scaling("grid", "sweeps/demo.toml", "--format", "csv")
    frame = pd.read_csv(io.StringIO(csv.stdout))
    for col in ["run_id", "budget", "flops", "params", "active_params", "sparsity", "n_experts", "top_k", "d_model",
                "n_layers", "tokens", "unique_tokens", "epochs", "seed"]:
        assert col in frame
    assert ((frame.flops / frame.budget - 1).abs() < 0.01).all()
    assert ((frame.epochs - frame.tokens / frame.unique_tokens).abs() < 1e-9).all()
    rows = json.loads(scaling("grid", "sweeps/demo.toml", "--format", "json").stdout)
    assert len(rows) == len(frame)


@pytest.mark.parametrize("content, code, needle", [
    ('name = "x"\nbudgets = [1e11', 2, "malformed TOML"),
    ('name = "x"\nunique_tokens = 1000\nbudgets = [1e11]\nmax_epoch = 3\n[sparsity]\nexperts=[1]\n', 2,
     "did you mean 'max_epochs'"),
    ('name = "x"\nunique_tokens = 1000\nbudgets = [10]\n[sparsity]\nexperts=[1]\n', 2, "no run fits"),
])
def test_bad_input_is_one_line(tmp_path, content, code, needle):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    result = scaling("grid", str(path))
    assert result.returncode == code
    assert needle in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_missing_database_is_one_line(tmp_path):
    result = scaling("sql", "SELECT 1", "--db", str(tmp_path / "none.duckdb"))
    assert result.returncode == 1 and "no results database" in result.stderr and "Traceback" not in result.stderr
