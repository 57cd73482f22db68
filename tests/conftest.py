"""Shared by test modules: the real corpus (a fixture) and the command run in this process."""

import subprocess
import sys
from pathlib import Path

import pytest

from scaling.data import prepare

REPO_CACHE = Path(__file__).resolve().parents[1] / "data" / "cache"


@pytest.fixture(scope="module")
def shakespeare():
    """The real corpus, prepared once into the repository's (git-ignored) cache, which drivers, workers and Slurm
    jobs inherit through $SCALING_CACHE. Modules that train use it with ``pytestmark``."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv("SCALING_CACHE", str(REPO_CACHE))
        prepare("shakespeare")
        yield


def cli_in_process(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str
                   ) -> subprocess.CompletedProcess:
    """``scaling ARGS`` through the command's entry point in this process (fast, for many probes)."""
    from scaling import cli

    monkeypatch.setattr(sys, "argv", ["scaling", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)
