"""The executor registry: each backend's own options, checked in the sweep file's [executor] table and on the
command line against the backend that runs; the command's flags built from the registry; ray imported only when
chosen."""

import json
import socket
import subprocess
import sys

import pytest
import tomllib
from conftest import cli_in_process

from scaling.config import ConfigError, parse_sweep
from scaling.executors import BACKENDS, Backend, Option, check_table, choose

SWEEP = 'name = "x"\nunique_tokens = 1000\nbudgets = [1e11]\n[sparsity]\nexperts = [1]\n'


def sweep_file(tmp_path, executor: str = "") -> str:
    path = tmp_path / "x.toml"
    path.write_text(SWEEP + (f"[executor]\n{executor}" if executor else ""))
    return str(path)


def test_each_backend_takes_its_own_options():
    backend, options, note = choose("ray", {}, {"address": "10.0.0.1:6379", "cpus_per_task": 4.0, "mem_gb": 2})
    assert backend.name == "ray" and note is None
    assert options == {"address": "10.0.0.1:6379", "cpus_per_task": 4, "mem_gb": 2.0}
    assert choose(None, {}, {"workers": 3})[:2] == (BACKENDS["local"], {"workers": 3})  # local by default
    with pytest.raises(ConfigError, match=r"^--partition \(command line\) is not an option of the ray executor "
                                          r"\(it takes address, cpus_per_task, gpus_per_task, mem_gb\); --partition "
                                          r"is for the slurm executor$"):
        choose("ray", {}, {"partition": "debug"})
    with pytest.raises(ConfigError, match=r"--workers \(command line\) is not an option of the slurm executor"):
        choose("slurm", {}, {"workers": 2})
    with pytest.raises(ConfigError, match=r"--cpus-per-task must be a whole number >= 1, got 0"):
        choose("ray", {}, {"cpus_per_task": 0})


def test_the_table_names_its_backend_or_serves_the_one_chosen():
    """``backend = NAME`` scopes the table: checked against that backend when the file is read, ignored (with a
    note) when another one runs. Without it the table's options are for whichever backend runs, and must be its."""
    table = check_table({"backend": "slurm", "partition": "gpu", "time_min": 30.0})
    assert table == {"backend": "slurm", "partition": "gpu", "time_min": 30}
    backend, options, note = choose(None, table, {"cpus_per_task": 2})
    assert backend.name == "slurm" and options == {"partition": "gpu", "time_min": 30, "cpus_per_task": 2}
    backend, options, note = choose("local", table, {})
    assert backend.name == "local" and options == {}
    assert note == "note: the sweep file's [executor] table is for the slurm executor; ignored with --executor local"
    assert choose("slurm", {"partition": "a"}, {"partition": "b"})[1] == {"partition": "b"}  # flags win
    with pytest.raises(ConfigError, match=r"executor.partition \(sweep file\) is not an option of the local executor "
                                          r"\(it takes workers\); executor.partition is for the slurm executor"):
        choose(None, check_table({"partition": "gpu"}), {})
    with pytest.raises(ConfigError, match=r"executor.workers is not an option of the ray executor"):
        check_table({"backend": "ray", "workers": 2})
    with pytest.raises(ConfigError, match=r"executor.backend must be one of local, slurm, ray, got 'k8s'"):
        check_table({"backend": "k8s"})
    with pytest.raises(ConfigError, match=r"executor.backend must be one of local, slurm, ray, got \['slurm'\]"):
        check_table({"backend": ["slurm"]})
    with pytest.raises(ConfigError, match=r"unknown key executor.adress: no executor takes it \(did you mean "
                                          r"'address'\?\)"):
        check_table({"adress": "x"})


def test_local_only_commands_ignore_a_table_for_another_backend():
    """branch-check and the demo run locally (``executor="local"``): a sweep file's table for Slurm is set aside."""
    backend, options, note = choose("local", check_table({"backend": "slurm", "partition": "gpu"}), {"workers": 2})
    assert backend.name == "local" and options == {"workers": 2} and "ignored with --executor local" in note


def test_a_registered_backend_needs_nothing_else(monkeypatch):
    """A backend is its module's ``Backend`` plus its registry entry: the command's flags and the checks of the
    sweep file follow from the registry."""
    import click
    from click.testing import CliRunner

    from scaling import cli

    toy = Backend("toy", "a toy", (Option("knob", int, "knob turns", minimum=0),), make=lambda *args: None)
    monkeypatch.setitem(BACKENDS, "toy", toy)
    sweep = parse_sweep({**tomllib.loads(SWEEP), "executor": {"backend": "toy", "knob": 2}})
    assert choose(None, sweep.executor, {"knob": 3})[:2] == (toy, {"knob": 3})

    @cli.executor_options
    @click.command()
    def probe(executor, **options):
        click.echo(json.dumps([executor, options]))

    result = CliRunner().invoke(probe, ["--executor", "toy", "--knob", "5"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)[0] == "toy" and json.loads(result.output)[1]["knob"] == 5
    assert "toy: knob turns" in CliRunner().invoke(probe, ["--help"]).output


def test_run_flags_come_from_the_registry(monkeypatch, capsys):
    text = cli_in_process(monkeypatch, capsys, "run", "--help").stdout
    assert "[local|slurm|ray]" in text
    for backend in BACKENDS.values():
        for option in backend.options:
            assert option.flag in text, option.flag


def test_an_option_the_backend_does_not_take_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    bad = cli_in_process(monkeypatch, capsys, "run", sweep_file(tmp_path), "--partition", "debug")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        "error: --partition (command line) is not an option of the local executor (it takes workers); --partition "
        "is for the slurm executor"]
    bad = cli_in_process(monkeypatch, capsys, "run", sweep_file(tmp_path, 'backend = "ray"\npartition = "x"\n'))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "x.toml: executor.partition is not an option of the ray executor" in bad.stderr


def test_ray_without_a_cluster_is_one_line(tmp_path, monkeypatch, capsys):
    pytest.importorskip("ray")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    path = sweep_file(tmp_path)
    none = cli_in_process(monkeypatch, capsys, "run", path, "--executor", "ray")
    assert none.returncode == 1 and none.stderr.strip().splitlines() == [
        "error: the ray executor needs a cluster: --address HOST:PORT (or RAY_ADDRESS) of a running Ray head "
        "(`ray start --head` starts one)"]
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gone = cli_in_process(monkeypatch, capsys, "run", path, "--executor", "ray", "--address", f"127.0.0.1:{port}")
    assert gone.returncode == 1 and len(gone.stderr.strip().splitlines()) == 1
    assert f"error: no Ray cluster answers at 127.0.0.1:{port} (Connection refused)" in gone.stderr


def test_local_runs_never_import_ray_or_submitit(tmp_path):
    """Importing scaling and running a task on the local backend, driver and worker, import neither ray nor
    submitit (a run on Slurm imports submitit, not ray)."""
    code = """if True:
        import json, sys
        import scaling, scaling.cli, scaling.sweep, scaling.runner
        from scaling.executors import Task, choose

        def probe(spec, run_dir):
            import sys
            return {m: m in sys.modules for m in ("ray", "submitit")}

        backend, options, _ = choose("local", {}, {"workers": 1})
        executor = backend.make(None, probe, options)
        [handle] = executor.submit([Task("r", {}, sys.argv[1])])
        worker, error = handle.outcome()
        executor.shutdown(cancel=False)
        print(json.dumps({"error": error, "worker": worker,
                          "driver": {m: m in sys.modules for m in ("ray", "submitit")}}))
    """
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["error"] is None and seen["worker"] == seen["driver"] == {"ray": False, "submitit": False}, seen
