"""The ``scaling`` command as a user runs it: formats, help, one-line errors with exit codes."""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from synthetic import SMALL, build_store

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


def one_line_error(result: subprocess.CompletedProcess, needle: str) -> None:
    """A mistake as users see it: a non-zero exit, nothing on stdout, one line on stderr naming the problem."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and result.stdout == "" and len(lines) == 1, result.stderr
    assert needle in lines[0] and "Traceback" not in result.stderr, result.stderr


def test_sweep_file_that_is_a_folder_or_binary_is_one_line(tmp_path):
    (tmp_path / "sweeps").mkdir()
    one_line_error(scaling("grid", f"{tmp_path / 'sweeps'}/"), "is a directory")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(bytes(range(256)) * 4)
    one_line_error(scaling("grid", str(binary)), "not a text file")
    one_line_error(scaling("run", str(binary), "--db", str(tmp_path / "s.duckdb")), "not a text file")


@pytest.mark.parametrize("content, needle", [
    ("", "is empty"),
    ("params,flops,loss\n", "no rows"),
    ('params,flops,loss\n"1,000",1e15,3.0\n2000,1e15,2.9\n4000,1e15,3.1\n', "column 'params' must hold numbers"),
    ('params,flops,loss\n1000,1e15,3.0\n2000,1e15,"2,9"\n4000,1e15,3.1\n', "row 2 has '2,9'"),
])
def test_fit_csv_mistakes_are_one_line(tmp_path, content, needle):
    path = tmp_path / "points.csv"
    path.write_text(content)
    one_line_error(scaling("fit", "--csv", str(path), "--law", "isoflop"), needle)


def tiny_spec() -> dict:
    """A run of a few steps of a tiny dense model on the bundled corpus."""
    from scaling.config import ModelConfig, RunSpec, TrainConfig

    model = ModelConfig(vocab_size=256, context=16, d_model=16, n_layers=1, n_heads=2, d_ff=32)
    train = TrainConfig(batch_size=4, eval_tokens=256, token_loss_tokens=64, log_every=2, save_every=4)
    return RunSpec(model=model, train=train, tokens=4 * 16 * 4, unique_tokens=10_000).to_dict()


@pytest.mark.parametrize("spec, needle", [
    ("[1, 2]", "expected a JSON object"),
    ('"x"', "expected a JSON object"),
    ("{", "not valid JSON"),
    (json.dumps({**tiny_spec(), "tokens": 10}), "less than one batch"),
    (json.dumps({**tiny_spec(), "run_id": "0123456789ab"}), "is not this spec's id"),
])
def test_run_one_mistakes_are_one_line(tmp_path, spec, needle):
    one_line_error(scaling("run", "--one", spec, "--runs-dir", str(tmp_path / "runs")), needle)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.slow
def test_run_one_accepts_the_runs_own_spec_json(tmp_path):
    """``scaling run --one "$(cat runs/<id>/spec.json)"`` retrains that run: spec.json carries the run_id."""
    runs = tmp_path / "runs"
    first = scaling("run", "--one", json.dumps(tiny_spec()), "--runs-dir", str(runs))
    assert first.returncode == 0, first.stderr
    run_id = json.loads(first.stdout)["run_id"]
    spec_json = (runs / run_id / "spec.json").read_text()
    assert json.loads(spec_json)["run_id"] == run_id
    again = scaling("run", "--one", spec_json, "--runs-dir", str(runs))
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["run_id"] == run_id


def test_report_of_a_sweep_without_finished_runs_is_one_line(tmp_path):
    db = build_store(tmp_path, SMALL, failed=12)
    one_line_error(scaling("report", "small", "--db", str(db), "--out", str(tmp_path / "report")),
                   "no finished runs")


def test_grid_size_is_capped_unless_forced(tmp_path):
    """250k seeds (a typo) would queue a million runs: refused in one line, counted without planning them;
    --max-runs raises the cap and --force lifts it."""
    smoke = (ROOT / "sweeps" / "smoke.toml").read_text()
    many = tmp_path / "many.toml"
    many.write_text(smoke.replace("seeds = [0]", f"seeds = {list(range(250_000))}"))
    one_line_error(scaling("grid", str(many)), "up to 2,000,000 runs")
    one_line_error(scaling("run", str(many), "--db", str(tmp_path / "s.duckdb"), "--dry-run"), "over the cap")
    assert not (tmp_path / "s.duckdb").exists()
    few = tmp_path / "few.toml"
    few.write_text(smoke.replace("seeds = [0]", "seeds = [0, 1, 2]"))
    one_line_error(scaling("grid", str(few), "--max-runs", "11"), "up to 24 runs")
    for args in (["--max-runs", "24"], ["--max-runs", "11", "--force"]):
        assert scaling("grid", str(few), *args, "--format", "csv").returncode == 0


def test_sizes_count_is_bounded(tmp_path):
    """``sizes.count = 1000000`` once hung ``scaling grid``: refused at once, even with --force."""
    huge = tmp_path / "huge.toml"
    huge.write_text((ROOT / "sweeps" / "smoke.toml").read_text().replace("count = 2", "count = 1000000"))
    for args in ([], ["--force"]):
        one_line_error(subprocess.run([SCALING, "grid", str(huge), *args], capture_output=True, text=True,
                                      timeout=60), "sizes.count = 1,000,000 is over the limit")
