"""Adding a law is one class and one line in ``LAWS``: a toy law defined here alone (L = E + A/N^α, the
single-variable form of Kaplan et al. 2020) is a ``scaling fit --law`` choice, recovers its parameters from
synthetic runs, is saved in the store and appears in the report, with no other module touched. And the
registry's declarations hold for the laws that ship: what each optimum returns, what can be frozen, and that
an unfitted law says so."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pytest
from conftest import cli_in_process

from scaling.laws import LAWS, Envelope, FitError, IsoFLOP, Law, ParametricLaw
from scaling.solve import LinearTerms

TRUTH = {"E": 1.8, "A": 300.0, "alpha": 0.3}


class Toy(ParametricLaw):
    """L = E + A/N^α (Kaplan et al. 2020's L(N) with an irreducible loss), N = total params; fitted in the
    log-sum-exp form t = (e, a − α·log N) like Chinchilla (Hoffmann et al. 2022)."""

    name = "Toy"
    title = "toy L = E + A/N^alpha"
    floor = "E"
    optimum_returns = ("C", "N", "loss")
    spec = (("e", "E", True), ("a", "A", True), ("alpha", "alpha", False))
    default_grid = {"e": (-0.5, 0.0, 0.5, 1.0), "a": (0.0, 5.0, 10.0), "alpha": (0.0, 0.5, 1.0)}

    def _data(self, frame: pd.DataFrame, with_loss: bool) -> dict:
        n = pd.to_numeric(frame["params"]).to_numpy(float)
        data = {"n": len(n), "log_n": np.log(n)}
        if with_loss:
            data["y"] = np.log(pd.to_numeric(frame["loss"]).to_numpy(float))
        return data

    def _terms(self, data: dict) -> LinearTerms:
        return LinearTerms(3, [(0.0, {0: 1.0}), (0.0, {1: 1.0, 2: -data["log_n"]})], data["n"])

    @classmethod
    def formula(cls, params: dict[str, float], digits: int = 6) -> str:
        return f"L = {params['E']:.{digits}g} + {params['A']:.{digits}g}/N^{params['alpha']:.{digits}g}"

    def _optimum(self, C: float, params: dict[str, float], **limits: Any) -> dict[str, float]:
        """The loss at 20 tokens per parameter within budget C (C = 6ND, Hoffmann et al.'s rule of thumb)."""
        n = math.sqrt(C / 120)
        return {"C": float(C), "N": n, "loss": params["E"] + params["A"] / n ** params["alpha"]}


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(LAWS, "toy", Toy)  # the one line that registers it


def scaling(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    done = cli_in_process(monkeypatch, capsys, *args)
    return done.returncode, done.stdout, done.stderr


def toy_runs(path: Path, seed: int = 0) -> Path:
    """Runs at three budgets and six sizes each, losses from TRUTH with 0.5% multiplicative noise."""
    rng = np.random.default_rng(seed)
    rows = [{"params": n, "tokens": c / (6 * n), "flops": c, "loss": (TRUTH["E"] + TRUTH["A"] * n ** -TRUTH["alpha"])
             * math.exp(rng.normal(0, 0.005))}
            for c in (1e15, 1e16, 1e17) for n in np.geomspace(1e5, 1e8, 6)]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_a_registered_law_is_a_choice_fits_saves_and_reports(toy, tmp_path, monkeypatch, capsys):
    code, out, _ = scaling(monkeypatch, capsys, "fit", "--help")
    assert code == 0 and "toy" in out
    csv = toy_runs(tmp_path / "toy.csv")
    code, out, err = scaling(monkeypatch, capsys, "fit", "--csv", str(csv), "--law", "toy", "--bootstrap",
                                    "100", "--budget", "1e18", "--format", "json")
    assert code == 0, err
    result = json.loads(out)
    assert result["law"] == "toy" and result["n_points"] == 18 and set(result["optimum"]) == {"C", "N", "loss"}
    for name, truth in TRUTH.items():
        lo, hi = result["ci"][name]
        assert lo <= truth <= hi and result["params"][name] == pytest.approx(truth, rel=0.15), name

    db = tmp_path / "toy.duckdb"
    assert scaling(monkeypatch, capsys, "ingest", str(csv), "--sweep", "toy", "--db", str(db))[0] == 0
    code, out, err = scaling(monkeypatch, capsys, "fit", "toy", "--law", "toy", "--db", str(db), "--format",
                                    "csv")
    assert code == 0, err
    printed = pd.read_csv(pd.io.common.StringIO(out))
    con = duckdb.connect(str(db), read_only=True)
    stored = con.execute("SELECT parameter, value FROM fit_params WHERE law = 'toy'").df()
    con.close()
    assert set(stored["parameter"]) == set(printed["name"]) >= set(TRUTH)

    code, _, err = scaling(monkeypatch, capsys, "report", "toy", "--db", str(db), "--out",
                                  str(tmp_path / "report"), "--bootstrap", "0")
    assert code == 0, err
    page = (tmp_path / "report" / "index.html").read_text()
    assert f"{Toy.title}, dense" in page
    assert re.search(r"fitted: <code>L = [\d.]+ \+ [\d.e+]+/N\^[\d.]+</code>", page)  # its own formula, printed
    assert f"{Toy.title}, dense" in json.loads((tmp_path / "report" / "answer.json").read_text())["fits"]


def test_a_law_that_models_no_sparsity_fits_one_level(toy, tmp_path, monkeypatch, capsys):
    csv = toy_runs(tmp_path / "toy.csv")
    frame = pd.read_csv(csv)
    frame.assign(sparsity=0.5).pipe(lambda moe: pd.concat([frame.assign(sparsity=0.0), moe])).to_csv(csv, index=False)
    code, out, err = scaling(monkeypatch, capsys, "fit", "--csv", str(csv), "--law", "toy")
    assert code == 1 and out == "" and "the toy law fits one sparsity at a time" in err
    code, out, err = scaling(monkeypatch, capsys, "fit", "--csv", str(csv), "--law", "toy", "--freeze",
                                    "alpha=0.3", "--sparsity", "0", "--format", "json")
    assert code == 0 and json.loads(out)["params"]["alpha"] == 0.3, err
    code, _, err = scaling(monkeypatch, capsys, "fit", "--csv", str(csv), "--law", "toy", "--freeze", "B=1")
    assert code == 2 and "Toy has no parameter(s) B to freeze; it can freeze E, A, alpha only" in err


def test_an_optimum_returns_only_what_its_law_declares(tmp_path):
    class Terse(Toy):
        optimum_returns = ("C", "N")  # leaves out "loss", which Toy's optimum returns

    frame = pd.read_csv(toy_runs(tmp_path / "toy.csv"))
    assert set(Toy().fit(frame).optimum(1e20)) == {"C", "N", "loss"}
    with pytest.raises(TypeError, match=r"Toy.optimum returned \['loss'\], not declared"):
        Terse().fit(frame).optimum(1e20)


def test_every_law_declares_what_it_needs():
    for key, law in LAWS.items():
        assert issubclass(law, Law) and law.title and law.optimum_returns, key
        assert law.uses_sparsity or law.report_runs in ("default", "dense", None), key
    assert Envelope.freeze_options({"L_inf": 1.5}) == {"l_inf": 1.5}
    with pytest.raises(FitError, match="no parameters to freeze"):
        IsoFLOP.freeze_options({"a": 0.5})
    for law in (IsoFLOP(), Envelope(), LAWS["chinchilla"]()):
        with pytest.raises(FitError, match="not fitted yet"):
            law.predict(pd.DataFrame({"params": [1e6], "active_params": [1e6], "tokens": [1e8], "flops": [6e14]}))
        with pytest.raises(FitError, match="not fitted yet"):
            law.optimum(1e18)
