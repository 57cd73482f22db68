"""The HTML report end to end: a real DuckDB store of synthetic runs with a known loss law, fitted and drawn."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import duckdb
import numpy as np
import pytest
from synthetic import SWEEP, build_store

from scaling import laws, report
from scaling.laws import FitError
from scaling.store import StoreError

DENSE = {**SWEEP, "name": "dense", "budgets": [1e11, 3e11], "sparsity": {"experts": [1]}, "repeat": {}}
THIN = {**SWEEP, "name": "thin", "budgets": [1e11, 3e11], "sparsity": {"experts": [1, 4]}, "sizes": {"count": 2},
        "repeat": {}}  # the smoke sweep's shape: two sizes per budget, so every isoFLOP fit fails
FIGURES = ["isoflop_params", "isoflop_tokens", "frontier", "sparsity", "envelope", "epochs", "gap", "curves",
           "router_load", "router_health", "similarity"]
ROOT = Path(__file__).resolve().parents[1]
SCALING = shutil.which("scaling") or str(Path(sys.executable).parent / "scaling")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """The store and the report of the synthetic sweep (built once for the module)."""
    tmp = tmp_path_factory.mktemp("report")
    db = build_store(tmp)
    index = report.write_report(str(db), "rep", tmp / "out", bootstrap=8)
    return db, index


def test_report_page(built):
    db, index = built
    page = index.read_text()
    folder = index.parent / "figures"
    for name in FIGURES:
        assert (folder / f"{name}.png").stat().st_size > 10_000 and (folder / f"{name}.svg").exists(), name
        assert f'<figure id="{name}"><img src="data:image/png;base64,' in page, name
    assert "Not drawn" not in page and ": could not be fitted:" not in page  # (a bootstrap resample may fail)
    answer = json.loads((index.parent / "answer.json").read_text())
    assert re.fullmatch(r"At C = 3e11 FLOPs with U = 1\.5e5 unique tokens, the lowest loss is predicted at "
                        r"sparsity S\* = [\d.]+ \(95% CI [\d.]+–[\d.]+\), N_active = [\d.]+e\d, "
                        r"D = [\d.]+e\d tokens \([\d.]+ epochs\)\.", answer["sentence"]), answer["sentence"]
    assert answer["sentence"] in page and len(answer["S_star_ci"]) == 2
    assert 0.5 < answer["S_star"] < 0.875  # the synthetic law's sparsity cost makes the optimum interior
    con = duckdb.connect(str(db), read_only=True)
    run_ids = [row[1] for row in con.execute(report.sql(report.RUNS_SQL, "rep")).fetchall()]
    assert len(run_ids) == 76 and all(r in page for r in run_ids)
    assert page.count("failed") >= 1 and "runs not finished ok: 1 failed" in page
    saved = dict(con.execute("SELECT law || ':' || parameter, value FROM fit_params WHERE sweep = 'rep'").fetchall())
    assert {"isoflop:a", "sparsity:S_star"} <= set(saved) and all(np.isfinite(list(saved.values())))
    fit_id = con.execute("SELECT fit_id FROM fits WHERE law = 'sparsity'").fetchall()[0][0]
    assert report.FIT_SQL.format(fit_id=report.literal(fit_id)).replace("'", "&#x27;") in page
    con.close()


def test_failed_law_and_dense_only_sweep(tmp_path, monkeypatch):
    """A law that fails is named with its reason; no MoE runs: no router figures; the page is still whole."""

    class Broken(laws.Envelope):
        def fit(self, frame):
            raise FitError("synthetic: the envelope needs two sparsities")

    monkeypatch.setitem(laws.LAWS, "envelope", Broken)
    db = build_store(tmp_path, DENSE, failed=0)
    page = report.write_report(str(db), "dense", tmp_path / "out", bootstrap=0).read_text()
    assert "loss envelope and effective compute per sparsity: could not be fitted: synthetic: the envelope" in page
    assert page.count("Not drawn: no MoE runs with router statistics") == 2
    answer = json.loads((tmp_path / "out" / "answer.json").read_text())
    assert answer["sentence"] in page and answer["fits"]["loss envelope and effective compute per sparsity"] != "ok"
    assert answer["sentence"].startswith("The compute-optimal sparsity could not be determined")
    assert "The sparsity-aware law could not be fitted: Sparsity needs" in answer["sentence"]


def test_a_figure_added_with_one_line_is_drawn_or_says_why_not(tmp_path, monkeypatch):
    """A figure defined here and registered with one line appears in the report, from the sweep's data and fits;
    one that has nothing to draw shows its reason."""
    from plotnine import aes, geom_point, ggplot

    def loss_by_epochs(data: report.SweepData, fits: list[report.Fit]) -> ggplot:
        assert {fit.law for fit in fits} >= {"isoflop", "sparsity"}
        return ggplot(data.points, aes("epochs", "loss")) + geom_point()

    monkeypatch.setitem(report.FIGURES, "loss_by_epochs",
                        report.ExtraFigure("Final loss against epochs.", loss_by_epochs, "no points"))
    monkeypatch.setitem(report.FIGURES, "nothing",
                        report.ExtraFigure("Never drawn.", lambda data, fits: None, "nothing to draw here"))
    db = build_store(tmp_path, DENSE, failed=0)
    page = report.write_report(str(db), "dense", tmp_path / "out", bootstrap=0).read_text()
    assert (tmp_path / "out" / "figures" / "loss_by_epochs.png").stat().st_size > 5_000
    assert '<figure id="loss_by_epochs"><img src="data:image/png;base64,' in page
    assert "Final loss against epochs." in page and "Not drawn: nothing to draw here" in page


def test_unknown_sweep_is_a_store_error(built):
    with pytest.raises(StoreError, match="no sweep named 'nope'"):
        report.write_report(str(built[0]), "nope", built[1].parent / "nope")


def test_sentence_without_interval():
    result = {"optimum": {"S_star": 0.75, "N_active": 6.2e4, "N_total": 2e5, "D": 2.7e6, "epochs": 5.4}}
    assert report.compute_optimal_sentence(result, 1e12, 5e5) == (
        "At C = 1e12 FLOPs with U = 5e5 unique tokens, the lowest loss is predicted at sparsity S* = 0.75, "
        "N_active = 6.2e4, D = 2.7e6 tokens (5.4 epochs).")
    result["ci"] = {"S_star": [0.5, 0.875]}
    assert "S* = 0.75 (95% CI 0.5–0.875)," in report.compute_optimal_sentence(result, 1e12, 5e5)
    assert "could not be determined" in report.compute_optimal_sentence(None)


CHECK = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter((i) => !(i.complete && i.naturalWidth > 0)).map((i) => i.alt);
  const out = document.createElement("pre");
  out.id = "image-check";
  out.textContent = JSON.stringify({total: images.length, broken: broken});
  document.body.appendChild(out);
});
</script></body>"""


def chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--no-first-run", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={tmp / 'profile'}", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium (apt-get install chromium)")
def test_report_renders_in_chromium(built, tmp_path):
    index = built[1]
    shot = tmp_path / "page.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1400,4000", index.absolute().as_uri())
    assert shot.exists() and shot.stat().st_size > 50_000
    check = index.with_name("check.html")
    check.write_text(index.read_text().replace("</body>", CHECK))
    dom = chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", check.absolute().as_uri()).stdout
    found = re.search(r'<pre id="image-check">(.*?)</pre>', dom)
    assert found, dom[-2000:]
    images = json.loads(found.group(1).replace("&quot;", '"'))
    drawn = len(list((index.parent / "figures").glob("*.png")))  # FIGURES, plus one extrapolation check per law
    assert drawn >= len(FIGURES) and images == {"total": drawn, "broken": []}


def test_demo_fingerprint_changes_only_with_the_runs(tmp_path):
    """The demo reuses its report while the sweep's runs are unchanged; a re-ingested run invalidates it."""
    from scaling.demo import fingerprint
    from scaling.store import connect, ingest_run

    db = str(build_store(tmp_path, {**DENSE, "name": "fp"}, failed=0))
    first = fingerprint(db, "fp", 8)
    assert fingerprint(db, "fp", 8) == first and fingerprint(db, "fp", 9) != first
    con = connect(db)
    run_dir = next(iter((tmp_path / "runs").iterdir()))
    ingest_run(con, run_dir)  # a newer copy of the same run: new ingest time
    con.close()
    assert fingerprint(db, "fp", 8) != first


def labelled_ticks(svg: Path) -> tuple[int, int]:
    """The most labelled x and y ticks of any panel of a figure as matplotlib writes it to SVG (a tick is a group
    ``xtick_N``/``ytick_N``; a labelled one holds a ``text_N`` group)."""
    root = ET.parse(svg).getroot()
    most = [0, 0]
    for axes in root.iter():
        if not (axes.get("id") or "").startswith("axes_"):
            continue
        for i, kind in enumerate(("xtick_", "ytick_")):
            ticks = [g for g in axes.iter() if (g.get("id") or "").startswith(kind)]
            most[i] = max(most[i], sum(any((c.get("id") or "").startswith("text_") for c in g) for g in ticks))
    return most[0], most[1]


def assert_figures_have_axes(index: Path) -> None:
    for svg in sorted((index.parent / "figures").glob("*.svg")):
        x, y = labelled_ticks(svg)
        assert x >= 2 and y >= 2, f"{svg.name}: {x} labelled x ticks, {y} labelled y ticks"


def test_thin_sweep_figures_show_data_with_notes(tmp_path):
    """Two sizes per budget (as the smoke sweep): every isoFLOP fit fails. Its figures still draw the runs on
    labelled axes, say in the figure which fit failed, and the captions describe only what is drawn."""
    db = build_store(tmp_path, THIN, failed=0)
    index = report.write_report(str(db), "thin", tmp_path / "out", bootstrap=0)
    assert_figures_have_axes(index)
    svg = (index.parent / "figures" / "isoflop_params.svg").read_text()  # matplotlib keeps each text as a comment
    assert "<!-- fit failed, not drawn: isoFLOP (Chinchilla approach 2), dense: IsoFLOP needs" in svg
    page = index.read_text()
    assert "the isoFLOP fits failed" in page and "vertices with their interval" not in page
    assert "with the isoFLOP fit's interval" not in page
    assert "<figcaption>When drawn: Compute-optimal N*(C)" in page  # the frontier needs the failed fits


@pytest.mark.slow
def test_smoke_sweep_report_has_labelled_axes(tmp_path):
    """The smoke sweep trained for real: every figure of its report has tick labels on both axes."""
    db, runs = tmp_path / "s.duckdb", tmp_path / "runs"
    trained = subprocess.run([SCALING, "run", str(ROOT / "sweeps" / "smoke.toml"), "--db", str(db),
                              "--runs-dir", str(runs)], capture_output=True, text=True, timeout=1500)
    assert trained.returncode == 0, trained.stderr
    assert_figures_have_axes(report.write_report(str(db), "smoke", tmp_path / "out", bootstrap=0))


@pytest.mark.slow
def test_plenty_and_scarce_sweep_answers_with_the_vertices(tmp_path):
    """A sweep with two unique-token limits: the answer comes from the isoFLOP vertices, with its verdict, both
    regime figures are drawn and the one-U fits use the plenty runs."""
    raw = {**SWEEP, "name": "regimes", "unique_tokens": [60_000, 5_000_000], "budgets": [1e11, 3e11], "max_epochs": 500,
           "sparsity": {"experts": [1, 2, 4]}, "sizes": {"count": 4, "span": 12}, "repeat": {}}
    db = build_store(tmp_path, raw, failed=0)
    index = report.write_report(str(db), "regimes", tmp_path / "out", bootstrap=20)
    result = json.loads((tmp_path / "out" / "answer.json").read_text())
    assert result["sentence"].startswith("At C = 3e11 FLOPs (isoFLOP vertices): S* = ")
    assert "Verdict: " in result["sentence"] and result["verdict"] in result["sentence"]
    assert {"S_star_plenty", "S_star_scarce", "S_star_difference_ci"} <= set(result)
    for name in ("regimes_isoflop", "regimes_sparsity"):
        assert (tmp_path / "out" / "figures" / f"{name}.png").stat().st_size > 10_000
    page = index.read_text()
    assert "isoFLOP (Chinchilla approach 2), dense, U = 5e6 (plenty)" in page
    with duckdb.connect(str(db), read_only=True) as con:
        laws_saved = {law for (law,) in con.execute("SELECT DISTINCT law FROM fit_params").fetchall()}
    assert "sparsity-vertex" in laws_saved
