"""persona-cli proportions: the research log's dose table, checked against scipy's Fisher test."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests
from typer.testing import CliRunner

from persona_cli.cli import app

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "data" / "stats" / "research_log_dose_table.csv"
# The research log's table, N = 280 per arm, as the issue gives it (rates of arm 1, arm 2).
PUBLISHED = {
    "dose 10": (166, 113),
    "dose 25": (2, 75),
    "dose 50": (1, 48),
    "dose 100": (0, 13),
    "dose 200": (0, 6),
    "dose 375": (0, 1),
}
N = 280
WIDE = {"COLUMNS": "160"}  # the table's rows must not wrap for the printed check


def _invoke(*args: str):
    return CliRunner().invoke(app, ["proportions", *args], env=WIDE)


def _fisher(k1: int, n1: int, k2: int, n2: int, alternative: str) -> float:
    return float(sps.fisher_exact([[k1, n1 - k1], [k2, n2 - k2]], alternative=alternative).pvalue)


def _printed_row(stdout: str, label: str) -> list[str]:
    (line,) = [ln for ln in stdout.splitlines() if ln.startswith(f"{label} ")]
    return line[len(label) :].split()


def test_shipped_csv_is_the_research_log_table() -> None:
    with open(TABLE, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["label"]: (int(r["k1"]), int(r["k2"])) for r in rows} == PUBLISHED
    assert all(int(r["n1"]) == int(r["n2"]) == N for r in rows)


def test_research_log_table_one_sided_fisher_matches_scipy(tmp_path: Path) -> None:
    out = tmp_path / "p"
    r = _invoke("--csv", str(TABLE), "--test", "fisher", "--alternative", "less", "--out", str(out))
    assert r.exit_code == 0, r.output
    result = json.loads((out / "proportions.json").read_text())
    assert result["schema_version"] == 1
    assert (result["test"], result["alternative"]) == ("fisher", "less")
    expected = {label: _fisher(k1, N, k2, N, "less") for label, (k1, k2) in PUBLISHED.items()}
    holm = dict(
        zip(expected, multipletests(list(expected.values()), method="holm")[1], strict=True)
    )
    assert [row["label"] for row in result["rows"]] == list(PUBLISHED)
    for row in result["rows"]:
        label = row["label"]
        assert (row["test"], row["alternative"]) == ("fisher", "less")
        assert row["p_value"] == pytest.approx(expected[label], abs=1e-12, rel=0)
        assert row["p_adjusted"] == pytest.approx(holm[label], abs=1e-12, rel=0)
        cells = _printed_row(r.stdout, label)
        k1, k2 = PUBLISHED[label]
        assert cells[0] == f"{k1}/{N}" and cells[2] == f"{k2}/{N}"
        assert cells[5:7] == ["fisher", "less"]
        assert cells[7] == f"{expected[label]:.3g}" and cells[8] == f"{holm[label]:.3g}"
    # The published bound at dose 375: only the one-sided exact test gives p = 0.50.
    assert expected["dose 375"] == pytest.approx(0.5, abs=1e-12)
    assert _fisher(0, N, 1, N, "two-sided") == pytest.approx(1.0)
    assert result["adjustment"] == {
        "method": "holm",
        "adjusts": "p_value",
        "m": 6,
        "family": "every row",
    }
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["csv"]["path"] == str(TABLE.resolve())
    again = _invoke("--csv", str(TABLE), "--out", str(out))
    assert again.exit_code == 0 and "already finished" in again.stderr


def test_dose_10_greater_and_rows_on_the_command_line(tmp_path: Path) -> None:
    out = tmp_path / "p"
    r = _invoke(
        "--row",
        "dose 10:166/280:113/280",
        "--row",
        "a:b:3/10:7/10",
        "--test",
        "fisher",
        "--alternative",
        "greater",
        "--adjust",
        "bonferroni",
        "--out",
        str(out),
    )
    assert r.exit_code == 0, r.output
    rows = {row["label"]: row for row in json.loads((out / "proportions.json").read_text())["rows"]}
    p10, pab = _fisher(166, N, 113, N, "greater"), _fisher(3, 10, 7, 10, "greater")
    assert rows["dose 10"]["p_value"] == pytest.approx(p10, abs=1e-12, rel=0)
    assert rows["a:b"]["p_value"] == pytest.approx(pab, abs=1e-12, rel=0)  # colons in a label
    assert rows["dose 10"]["p_adjusted"] == pytest.approx(min(1.0, 2 * p10), abs=1e-12, rel=0)
    assert _printed_row(r.stdout, "dose 10")[7] == f"{p10:.3g}"


def test_auto_and_z_tests_are_named(tmp_path: Path) -> None:
    r = _invoke(
        "--row", "big:45/100:30/100", "--row", "small:3/4:1/4", "--out", str(tmp_path / "p")
    )
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "p" / "proportions.json").read_text())["rows"]
    assert [(x["test"], x["alternative"]) for x in rows] == [
        ("z", "two-sided"),
        ("fisher", "two-sided"),
    ]
    chi2 = sps.chi2_contingency([[45, 55], [30, 70]], correction=False)
    assert rows[0]["p_value"] == pytest.approx(chi2.pvalue, abs=1e-12)
    assert rows[1]["p_value"] == pytest.approx(_fisher(3, 4, 1, 4, "two-sided"), abs=1e-12)
    forced = _invoke("--row", "x:0/5:0/5", "--test", "z", "--adjust", "none")
    assert forced.exit_code == 0 and _printed_row(forced.stdout, "x")[5:9] == [
        "z",
        "two-sided",
        "-",
        "-",
    ]


def test_bad_counts_are_one_line_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("label,k1,n1,k2,n2\na,1,2,3,4\n\nb,5,4,1,2\n")
    short = tmp_path / "short.csv"
    short.write_text("label,k1,n1,k2,n2\na,1,2,3\n")
    header = tmp_path / "header.csv"
    header.write_text("label,k,n\n")
    cases = [
        (["--csv", str(bad)], f"{bad}:4: k1 = 5 exceeds n1 = 4"),
        (["--csv", str(short)], f"{short}:2: expected 5 columns, got 4"),
        (
            ["--csv", str(header)],
            f"{header}:1: the header must be label,k1,n1,k2,n2, got label,k,n",
        ),
        (["--csv", str(tmp_path / "none.csv")], "none.csv: file not found"),
        (["--row", "a:1/2"], "--row 'a:1/2': expected LABEL:k1/n1:k2/n2"),
        (["--row", "a:x/2:1/2"], "--row 'a:x/2:1/2': k1 'x' is not a whole number >= 0"),
        (["--row", "a:1/0:1/2"], "n1 is 0"),
        (["--row", "a:1/2:1/2", "--row", "a:1/3:1/3"], "row label 'a' is given twice"),
        (
            ["--row", "a:1/2:1/2", "--test", "exact"],
            "--test 'exact': choose one of auto, fisher, z",
        ),
        (["--row", "a:1/2:1/2", "--adjust", "fdr"], "--adjust 'fdr': choose one of"),
        ([], "no counts: give --row"),
    ]
    for args, message in cases:
        r = _invoke(*args, "--out", str(tmp_path / "o"))
        assert r.exit_code == 2, (args, r.output)
        assert r.stderr.startswith("error: ") and message in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # nothing written for refused input
