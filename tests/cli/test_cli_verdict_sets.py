"""A run with several verdict sets (issue 15): analyses use the run's recorded default set.

The default is set by ``verify`` on first use, by ``run``, or by ``verify --set-default``; a
second verifier (``arith-prm:last``, which ``verifier-utility`` needs) never changes what
``curve``, ``fit``, ``replay``, ``info``, ``export`` and ``store.pool()`` report. Every number
checked here is recomputed from the verdict shards on disk, not through ttscale.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from math import comb
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from ttscale.cli.app import app
from ttscale.errors import ConfigError
from ttscale.evals import load_problems
from ttscale.store import SampleStore, merge_runs

runner = CliRunner()

N, LIMIT = 6, 5
KS = (1, 2, 4, 6)


def invoke(*args: object, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    argv = [str(a) for a in args]
    if argv[0] in ("curve", "fit") and "--n-boot" not in argv:
        argv += ["--n-boot", "20"]  # the CIs are not what these tests check: keep them cheap
    return runner.invoke(app, argv, env=env)


def _texts(rng: np.random.Generator) -> dict[str, list[str]]:
    """Per problem, N texts: the worked solution, a right answer reached by a wrong first line
    (``arith`` passes it, ``arith-prm:last`` fails it), a wrong answer, or no answer."""
    table = {}
    for p in load_problems("arith", limit=LIMIT):
        ref = int(p.reference)
        sol = str(p.meta["solution"])
        first, _, rest = sol.partition("\n")
        lucky = f"{int(first.split()[0]) + 100}{first[len(first.split()[0]):]}\n{rest}"
        kinds = [sol, lucky, f"x\n#### {ref + 1}", "no idea"]
        table[p.id] = [kinds[c] for c in rng.choice(4, size=N, p=rng.dirichlet([1.0] * 4))]
    return table


@pytest.fixture(scope="module")
def sampled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run made by ``ttscale sample`` (scripted engine), not verified."""
    out = tmp_path_factory.mktemp("verdict-sets") / "run"
    table = _texts(np.random.default_rng(7))
    r = invoke("sample", "--engine", "scripted", "--model", "toy", "--benchmark", "arith",
               "--no-progress", "--limit", LIMIT, "--n", N, "--max-tokens", 400, "--seed", 0,
               "--engine-opt", "responses=" + json.dumps(table), "--out", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def two_sets(sampled: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``sample``, then ``verify`` (arith), then ``verify --verifier arith-prm:last``."""
    run = tmp_path_factory.mktemp("two-sets") / "run"
    shutil.copytree(sampled, run)
    r = invoke("verify", run)
    assert r.exit_code == 0, r.output
    r = invoke("verify", run, "--verifier", "arith-prm:last")
    assert r.exit_code == 0, r.output
    return run


@pytest.fixture
def run2(two_sets: Path, tmp_path: Path) -> Path:
    """A copy of ``two_sets`` that a test may change."""
    shutil.copytree(two_sets, tmp_path / "run")
    return tmp_path / "run"


# -- recomputation from the stored verdicts, independent of ttscale ------------------------------


def _prm_set(run: Path) -> str:
    """The verdict-set folder ``arith-prm:last`` was stored under (named from its spec)."""
    (name,) = [p.name for p in (run / "verdicts").iterdir() if p.name.startswith("arith-prm")]
    return name


def stored_verdicts(run: Path, name: str) -> dict[tuple[str, int], dict]:
    rows: dict[tuple[str, int], dict] = {}
    for f in sorted((run / "verdicts" / name).glob("part-*.parquet")):  # later shards win
        for r in pq.read_table(f).to_pylist():
            rows[(r["problem_id"], r["index"])] = r
    return rows


def by_problem(v: dict[tuple[str, int], dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for (pid, _), r in sorted(v.items()):
        out.setdefault(pid, []).append(r)
    return out


def coverage(v: dict, k: int) -> float:
    """Mean over problems of the unbiased pass@k, 1 - C(n-c, k) / C(n, k)."""
    vals = []
    for rows in by_problem(v).values():
        n, c = len(rows), sum(bool(r["correct"]) for r in rows)
        vals.append(1.0 - comb(n - c, k) / comb(n, k))
    return float(np.mean(vals))


def majority_all(v: dict) -> float:
    """Majority vote over all of a problem's samples; ties split evenly; no answer never votes."""
    vals = []
    for rows in by_problem(v).values():
        votes = Counter(r["answer"] for r in rows if r["answer"] is not None)
        if not votes:
            vals.append(0.0)
            continue
        top = max(votes.values())
        tied = [a for a, c in votes.items() if c == top]
        right = {r["answer"] for r in rows if r["correct"]}
        vals.append(sum(a in right for a in tied) / len(tied))
    return float(np.mean(vals))


def test_the_runs_disagree(two_sets: Path) -> None:
    # the test below means something only if the two sets give different numbers
    a, p = stored_verdicts(two_sets, "arith"), stored_verdicts(two_sets, _prm_set(two_sets))
    assert a.keys() == p.keys() and len(a) == N * LIMIT
    assert coverage(a, 1) > coverage(p, 1) > 0
    assert all(0 < coverage(a, k) < 1 for k in KS)


# -- the faults of the issue ---------------------------------------------------------------------


def test_verify_on_first_use_records_the_default(sampled: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(sampled, run)
    assert SampleStore.open(run).manifest.get("default_verifier") is None
    r = invoke("verify", run)
    assert r.exit_code == 0, r.output
    assert "default verdict set of" in r.output and "arith" in r.output
    m = SampleStore.open(run).manifest
    assert m["default_verifier"] == "arith" and "verify" in m["default_verifier_set_by"]
    r = invoke("verify", run, "--verifier", "arith-prm:last", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["default"] == {"name": "arith", "previous": "arith", "changed": False,
                            "set_by": m["default_verifier_set_by"]}  # fmt: skip
    assert SampleStore.open(run).manifest["default_verifier"] == "arith"


def test_every_analysis_uses_the_default_not_the_latest(two_sets: Path, tmp_path: Path) -> None:
    run, prm = two_sets, _prm_set(two_sets)
    want = stored_verdicts(run, "arith")
    # store.pool() (Python API)
    pool = SampleStore.open(run).pool()
    assert pool.meta["verdicts"]["name"] == "arith" and prm in pool.meta["verdicts"]["others"]
    keys = [(pid, int(i)) for p, pid in enumerate(pool.problem_ids)
            for i in pool.index[pool.offsets[p]:pool.offsets[p + 1]]]  # fmt: skip
    assert pool.correct.tolist() == [float(want[k]["correct"]) for k in keys]
    # curve
    r = invoke("curve", run, "--k", ",".join(map(str, KS)), "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["verdicts"]["name"] == "arith" and "default" in d["verdicts"]["chosen_by"]
    assert d["methods"]["coverage"]["mean"] == pytest.approx([coverage(want, k) for k in KS], abs=1e-12)
    assert d["methods"]["majority"]["mean"][-1] == pytest.approx(majority_all(want), abs=1e-12)
    r = invoke("curve", run, "--k", "1")
    assert r.exit_code == 0 and "verdicts: arith = arith" in r.output and "run's default" in r.output
    # fit: OLS of log(-log c) on log k over the recomputed coverage
    r = invoke("fit", run, "--k", ",".join(map(str, KS)), "--json", "--n-boot", "20")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    b, icpt = np.polyfit(np.log(KS), np.log(-np.log([coverage(want, k) for k in KS])), 1)
    assert d["b"] == pytest.approx(b, rel=1e-9) and d["a"] == pytest.approx(-np.exp(icpt), rel=1e-9)
    assert d["verdicts"]["name"] == "arith"
    assert "verdicts: arith = arith" in invoke("fit", run, "--n-boot", "20").output
    # replay: the fixed rule over all N samples in index order is majority@N
    r = invoke("replay", run, "--rule", "fixed", "--order", "index", "--tie", "expected", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["accuracy"]["mean"] == pytest.approx(majority_all(want), abs=1e-12)
    assert d["verdicts"]["name"] == "arith"
    r = invoke("replay", run, "--rule", "fixed", "--order", "index")
    assert r.exit_code == 0 and "verdicts: arith = arith" in r.output
    # info
    d = json.loads(invoke("info", run, "--json").stdout)
    assert d["analysis_verdicts"]["name"] == "arith" and d["default_verifier"] == "arith"
    r = invoke("info", run, env={"COLUMNS": "400"})
    row = next(x for x in r.output.splitlines() if "analyses use" in x)
    assert "arith = arith" in row and "run's default" in row
    # export: the default set's answers and correctness
    out = tmp_path / "e.jsonl"
    r = invoke("export", run, "--out", out)
    assert r.exit_code == 0 and "verdicts: arith = arith" in r.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == len(want)
    for x in rows:
        v = want[(x["problem_id"], x["index"])]
        assert (x["answer"], x["correct"]) == (v["answer"], v["correct"])
    # --verifier still picks the other set, and says so
    p = stored_verdicts(run, prm)
    d = json.loads(invoke("curve", run, "--k", "1", "--verifier", prm, "--json").stdout)
    assert d["verdicts"]["chosen_by"] == "--verifier"
    assert d["methods"]["coverage"]["mean"] == pytest.approx([coverage(p, 1)], abs=1e-12)


def test_set_default_without_reverifying(run2: Path) -> None:
    prm = _prm_set(run2)
    shards = sorted((run2 / "verdicts").rglob("part-*.parquet"))
    # the set exists: recorded, nothing re-verified (a set name need not be a verifier spec)
    r = invoke("verify", run2, "--verifier", prm, "--set-default")
    assert r.exit_code == 0, r.output
    assert f"default verdict set of {run2}: {prm}" in " ".join(r.output.split())
    assert "was arith" in r.output and "nothing re-verified" in r.output
    assert sorted((run2 / "verdicts").rglob("part-*.parquet")) == shards
    m = SampleStore.open(run2).manifest
    assert m["default_verifier"] == prm and m["default_verifier_set_by"] == "--set-default"
    p = stored_verdicts(run2, prm)
    d = json.loads(invoke("curve", run2, "--k", "1", "--json").stdout)
    assert d["verdicts"]["name"] == prm
    assert d["methods"]["coverage"]["mean"] == pytest.approx([coverage(p, 1)], abs=1e-12)
    # a set that does not exist yet: verified, then recorded
    r = invoke("verify", run2, "--verifier", "math:last_number", "--name", "last", "--set-default", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["new"] == N * LIMIT and s["default"]["name"] == "last" and s["default"]["previous"] == prm
    # by the spec it was made with: nothing new to verify, then recorded
    r = invoke("verify", run2, "--verifier", "arith-prm:last", "--set-default", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["new"] == 0 and s["default"] == {"name": prm, "previous": "last", "changed": True,
                                              "set_by": "--set-default"}  # fmt: skip
    # the Python API
    st = SampleStore.open(run2)
    assert st.set_default_verdicts("arith")["previous"] == prm
    assert st.pool().meta["verdicts"]["name"] == "arith"
    with pytest.raises(ConfigError, match="no verdicts"):
        st.set_default_verdicts("nope")


def _forget_default(run: Path) -> None:
    """What a run verified by a ttscale without recorded defaults looks like."""
    st = SampleStore.open(run)

    def drop(m: dict) -> None:
        m.pop("default_verifier", None)
        m.pop("default_verifier_set_by", None)

    st.modify_manifest(drop)


def test_old_runs_without_a_default(run2: Path, tmp_path: Path) -> None:
    _forget_default(run2)
    prm = _prm_set(run2)
    # several sets, none recorded: every analysis refuses in one line naming the fix
    for args in (["curve", run2], ["curve", run2, "--x", "tokens"], ["fit", run2],
                 ["replay", run2, "--rule", "fixed"], ["export", run2, "--out", tmp_path / "e.jsonl"]):  # fmt: skip
        r = invoke(*args)
        assert r.exit_code == 1, (args, r.output)
        assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output, r.output
        assert "no recorded default" in r.output and "--set-default" in r.output, r.output
    with pytest.raises(ConfigError, match="--set-default"):
        SampleStore.open(run2).pool()
    # info does not refuse: it says what is undecided
    r = invoke("info", run2, env={"COLUMNS": "400"})
    assert r.exit_code == 0 and "no recorded default" in r.output
    assert json.loads(invoke("info", run2, "--json").stdout)["analysis_verdicts"]["name"] is None
    # an explicit --verifier works
    assert invoke("curve", run2, "--verifier", "arith", "--k", "1").exit_code == 0
    # verifying one more set on such a run does not pick a default among several
    r = invoke("verify", run2, "--verifier", "math:boxed", "--name", "boxed")
    assert r.exit_code == 0 and "--set-default" in r.output
    assert SampleStore.open(run2).manifest.get("default_verifier") is None

    # one set, none recorded: that set, said so; a second verifier then makes it the default
    one = tmp_path / "one"
    shutil.copytree(run2, one)
    for name in (prm, "boxed"):
        shutil.rmtree(one / "verdicts" / name)
    d = json.loads(invoke("curve", one, "--k", "1", "--json").stdout)
    assert d["verdicts"]["name"] == "arith" and "only verdict set" in d["verdicts"]["chosen_by"]
    r = invoke("verify", one, "--verifier", "math:boxed", "--name", "boxed")
    assert r.exit_code == 0, r.output
    m = SampleStore.open(one).manifest
    assert m["default_verifier"] == "arith"
    d = json.loads(invoke("curve", one, "--k", "1", "--json").stdout)
    assert d["verdicts"]["name"] == "arith"
    assert d["methods"]["coverage"]["mean"] == pytest.approx(
        [coverage(stored_verdicts(one, "arith"), 1)], abs=1e-12
    )


def test_a_recorded_default_without_verdicts_is_refused(run2: Path) -> None:
    SampleStore.open(run2).update_manifest(default_verifier="gone")
    r = invoke("curve", run2, "--k", "1")
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1
    assert "'gone'" in r.output and "--set-default" in r.output


def test_run_records_its_verifier_as_the_default(tmp_path: Path) -> None:
    out = tmp_path / "run"
    table = _texts(np.random.default_rng(3))
    r = invoke("run", "--engine", "scripted", "--model", "toy", "--benchmark", "arith",
               "--no-progress", "--limit", LIMIT, "--n", N, "--max-tokens", 400,
               "--engine-opt", "responses=" + json.dumps(table), "--out", out, "--k", "1")  # fmt: skip
    assert r.exit_code == 0, r.output
    m = SampleStore.open(out).manifest
    assert m["default_verifier"] == "arith" and m["default_verifier_set_by"] == "run"


# -- overlays --------------------------------------------------------------------------------------


def test_an_overlay_of_runs_scored_by_different_verifiers(
    two_sets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(two_sets, a)
    shutil.copytree(two_sets, b)
    prm = _prm_set(b)
    assert invoke("verify", b, "--verifier", prm, "--set-default").exit_code == 0
    for extra in ([], ["--x", "tokens"]):
        r = invoke("curve", a, b, "--k", "1", *extra)
        assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
        assert "--allow-mixed-verifiers" in r.output and "arith-prm:last" in r.output, r.output
    # asked for: each run's set in the table, the JSON and the plot legend
    import ttscale.analysis

    legends: list[list[str]] = []
    real = ttscale.analysis.plot_curves

    def spy(reports, path, **kw):  # type: ignore[no-untyped-def]
        legends.append(list(reports) if isinstance(reports, dict) else [])
        return real(reports, path, **kw)

    monkeypatch.setattr(ttscale.analysis, "plot_curves", spy)
    r = invoke("curve", a, b, "--k", "1", "--allow-mixed-verifiers", "--plot", tmp_path / "o.png")
    assert r.exit_code == 0, r.output
    assert legends and any("arith-prm:last" in x for x in legends[0])
    assert any("verdicts arith" in x and "prm" not in x for x in legends[0])
    text = " ".join(r.output.split())
    assert "arith-prm:last" in text and "verdicts arith" in text
    d = json.loads(invoke("curve", a, b, "--k", "1", "--allow-mixed-verifiers", "--json").stdout)
    labels = [x["label"] for x in d["runs"]]
    assert "arith-prm:last" in labels[1] and "arith-prm" not in labels[0]
    assert [x["verdicts"]["name"] for x in d["runs"]] == ["arith", prm]
    assert d["runs"][1]["methods"]["coverage"]["mean"] == pytest.approx(
        [coverage(stored_verdicts(b, prm), 1)], abs=1e-12
    )
    # the same verifier on both: no refusal, labels unchanged
    r = invoke("curve", a, two_sets, "--k", "1", "--json")
    assert r.exit_code == 0, r.output
    assert all("verdicts" not in x["label"] for x in json.loads(r.stdout)["runs"])


# -- merged shards ---------------------------------------------------------------------------------


def test_merge_keeps_an_agreed_default_and_drops_a_disputed_one(two_sets: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(two_sets, a)
    shutil.copytree(two_sets, b)
    merged, _ = merge_runs(tmp_path / "m1", [a, b])
    assert merged.manifest["default_verifier"] == "arith"
    assert invoke("verify", b, "--verifier", _prm_set(b), "--set-default").exit_code == 0
    merged, _ = merge_runs(tmp_path / "m2", [a, b])
    assert merged.manifest.get("default_verifier") is None
    r = invoke("curve", tmp_path / "m2", "--k", "1")
    assert r.exit_code == 1 and "--set-default" in r.output


def test_tokens_axis_import_check_and_verifier_utility(two_sets: Path, tmp_path: Path) -> None:
    run, prm = two_sets, _prm_set(two_sets)
    want = stored_verdicts(run, "arith")
    # curve --x tokens: the default's numbers, and it says which set
    r = invoke("curve", run, "--x", "tokens", "--k", "1,6", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["runs"][0]["methods"]["coverage"]["mean"] == pytest.approx(
        [coverage(want, 1), coverage(want, 6)], abs=1e-12
    )
    assert [v["name"] for v in d["verdicts"]] == ["arith"]
    r = invoke("curve", run, "--x", "tokens", "--k", "1,6")
    assert r.exit_code == 0 and "verdicts: arith = arith" in r.output
    # export then import: the imported run carries the default's answers and correctness
    f = tmp_path / "e.jsonl"
    assert invoke("export", run, "--out", f).exit_code == 0
    r = invoke("import", f, "--out", tmp_path / "imp")
    assert r.exit_code == 0, r.output
    imp = SampleStore.open(tmp_path / "imp")
    assert imp.manifest["imported_verdicts"]["name"] == "arith" and imp.verifiers() == []
    d = json.loads(invoke("curve", tmp_path / "imp", "--k", "1,6", "--json").stdout)
    assert d["methods"]["coverage"]["mean"] == pytest.approx([coverage(want, 1), coverage(want, 6)], abs=1e-12)
    assert d["verdicts"]["name"] is None  # the stored answers, said so
    # check sees a healthy run
    r = invoke("check", run)
    assert r.exit_code == 0, r.output
    # verifier-utility reads the two sets it is named; the default stays what analyses use
    r = invoke("verifier-utility", "--run", run, "--weak", prm, "--strong", "arith", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(invoke("curve", run, "--k", "1", "--json").stdout)["verdicts"]["name"] == "arith"


POT = """
def score(problem, texts, finished):
    # reward in [0, 1]: the share of digits in the partial text
    return [sum(c.isdigit() for c in t) / max(len(t), 1) for t in texts]
"""


def _weighted(run: Path, v: dict[tuple[str, int], dict]) -> tuple[float, float]:
    """Weighted-vote and highest-weight accuracy over the kept particles, from the shards."""
    parts = [pq.read_table(f).to_pylist() for f in sorted((run / "samples").glob("part-*.parquet"))]
    kept: dict[str, list[tuple[int, float]]] = {}
    for r in (x for p in parts for x in p):
        if r["fate"] in (None, "kept"):
            kept.setdefault(r["problem_id"], []).append((r["index"], r["log_weight"]))
    vote, best = [], []
    for pid, rows in sorted(kept.items()):
        rows.sort()
        voters = [(i, lw) for i, lw in rows if np.isfinite(lw) and v[(pid, i)]["answer"] is not None]
        right = {v[(pid, i)]["answer"] for i, _ in rows if v[(pid, i)]["correct"]}
        if not voters:
            vote.append(0.0)
            best.append(0.0)
            continue
        top = max(lw for _, lw in voters)
        totals: dict[str, float] = {}
        for i, lw in voters:  # insertion order = first seen in index order (ties go to it)
            a = v[(pid, i)]["answer"]
            totals[a] = totals.get(a, 0.0) + float(np.exp(lw - top))
        pick = max(totals, key=lambda a: totals[a])
        vote.append(float(pick in right))
        first_best = next(i for i, lw in voters if lw == top)
        best.append(float(v[(pid, first_best)]["answer"] in right))
    return float(np.mean(vote)), float(np.mean(best))


def test_an_smc_run_with_two_verdict_sets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "vs_pot_mod.py").write_text(POT)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "smc"
    table = _texts(np.random.default_rng(7))
    r = invoke("smc", "--engine", "scripted", "--model", "toy", "--benchmark", "arith", "--limit", LIMIT,
               "--particles", N, "--potential", "py:vs_pot_mod:score", "--fk", "difference",
               "--lambda", 5, "--tokens-per-step", 8, "--max-tokens", 400,
               "--engine-opt", "responses=" + json.dumps(table), "--out", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert invoke("verify", out, "--verifier", "arith-prm:last").exit_code == 0
    prm = _prm_set(out)
    assert SampleStore.open(out).manifest["default_verifier"] == "arith"
    want, other = _weighted(out, stored_verdicts(out, "arith")), _weighted(out, stored_verdicts(out, prm))
    assert want != other  # the two sets disagree on this run
    d = json.loads(invoke("curve", out, "--json", "--n-boot", "20").stdout)
    assert [v["name"] for v in d["verdicts"]] == ["arith"]
    methods = {p["method"]: p for p in d["points"]}  # an SMC run is one point per rule
    got = (methods["weighted_vote"]["accuracy"]["mean"], methods["max_weight"]["accuracy"]["mean"])
    assert got == pytest.approx(want, abs=1e-12)
    r = invoke("curve", out, "--n-boot", "20")
    assert r.exit_code == 0 and "verdicts: arith = arith" in r.output


def test_settle_default_verdicts(sampled: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(sampled, run)
    st = SampleStore.open(run)
    # a set without verdicts (claimed, then interrupted before its first shard) decides nothing
    assert st.settle_default_verdicts("arith") == {"name": None, "previous": None, "changed": False,
                                                   "set_by": None}  # fmt: skip
    assert invoke("verify", run).exit_code == 0
    # recorded: returned as is, and the manifest is not rewritten
    before = (run / "manifest.json").stat().st_mtime_ns
    got = SampleStore.open(run).settle_default_verdicts("other")
    assert got["name"] == "arith" and got["changed"] is False
    assert (run / "manifest.json").stat().st_mtime_ns == before
