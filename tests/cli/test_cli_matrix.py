"""Every run kind x every analysis command: a correct result, or one line saying why not.

The runs are real: the bundled ``arith`` model on the hf engine, 3 problems, a few samples each,
built once for the module. Every number a command prints is checked against a recomputation
from the stored samples and verdicts (never against the code path that printed it); every
refusal is one ``error:`` line that names what to run instead.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from ttscale.cli.app import app
from ttscale.store import SampleStore

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

runner = CliRunner()
HF = ["--engine", "hf", "--benchmark", "arith", "--no-progress", "--limit", "3", "--seed", "5"]
STEP = ["--particles", "4", "--potential", "arith-prm", "--tokens-per-step", "4", "--max-tokens", "40"]
ADAPTIVE_RULE = "beta:0.8"
PRUNE_RULE = "lowprob:threshold=-0.3,min_tokens=4"
SHORT_RULE = "short-3@k"

FIXED_KINDS = ("fixed", "extended", "imported", "merged")
POINT_KINDS = ("adaptive", "pruned", "shortmk", "smc", "search", "search-dvts")  # search: beam, then DVTS
KINDS = FIXED_KINDS + POINT_KINDS


def ok(*args: str) -> Any:
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, (args, r.output)
    return r


def refused(*args: str, needles: tuple[str, ...] = ()) -> str:
    """The command exits 1 with exactly one ``error:`` line (and nothing on stdout)."""
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 1, (args, r.output)
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, r.output)
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("transformers")  # the hf engine runs the bundled model
    root = tmp_path_factory.mktemp("matrix")
    out = {k: root / k for k in KINDS}
    ok("sample", *HF, "--n", "4", "--out", out["fixed"])
    ok("verify", out["fixed"])
    ok("sample", *HF, "--n", "2", "--out", out["extended"])
    ok("sample", *HF, "--n", "4", "--out", out["extended"], "--resume")
    ok("verify", out["extended"])
    ok("sample", *HF, "--n", "6", "--adaptive", ADAPTIVE_RULE, "--out", out["adaptive"])
    ok("verify", out["adaptive"])
    ok("sample", *HF, "--n", "4", "--prune", PRUNE_RULE, "--out", out["pruned"])
    ok("verify", out["pruned"])
    ok("sample", *HF, "--n", "4", "--adaptive", SHORT_RULE, "--out", out["shortmk"])
    ok("verify", out["shortmk"])
    ok("smc", *HF, *STEP, "--out", out["smc"])
    ok("smc", *HF, *STEP, "--search", "beam", "--width", "2", "--out", out["search"])
    ok("smc", *HF, *STEP, "--search", "dvts", "--width", "2", "--out", out["search-dvts"])
    ok("export", out["fixed"], "--out", root / "fixed.jsonl")
    ok("import", root / "fixed.jsonl", "--out", out["imported"])
    for i in range(2):
        ok("sample", *HF, "--n", "4", "--shard", f"{i}/2", "--out", root / f"shard{i}")
    ok("verify", root / "shard0")  # verdicts merge with the samples; shard 1 is verified after
    ok("merge", out["merged"], root / "shard0", root / "shard1")
    ok("verify", out["merged"])
    return out


# --- the recomputation from stored samples -----------------------------------------------------


def stored(run: Path) -> dict[str, list[dict[str, Any]]]:
    """Per problem (every recorded one), its samples in index order with the analysed verdict's
    answer and correctness (the only verdict set these runs have; imported runs carry them)."""
    st = SampleStore.open(run)
    names = st.verifiers()
    verdicts = {(v.problem_id, v.index): v for v in st.verdicts(names[0])} if names else {}
    out: dict[str, list[dict[str, Any]]] = {pid: [] for pid in st.problem_ids()}
    for s in st.samples():
        v = verdicts.get(s.key)
        out.setdefault(s.problem_id, []).append({
            "index": s.index, "answer": v.answer if v else s.answer,
            "correct": bool(v.correct if v else s.correct), "tokens": s.num_tokens,
            "fate": s.fate, "log_weight": s.log_weight,
        })  # fmt: skip
    for rows in out.values():
        rows.sort(key=lambda r: r["index"])
    return out


def vote(rows: list[dict[str, Any]], tie: str) -> float:
    """Majority vote credit: ``first`` = first-seen answer among the tied, ``expected`` = mean."""
    ans = [r["answer"] for r in rows if r["answer"] is not None]
    if not ans:
        return 0.0
    counts = Counter(ans)
    top = max(counts.values())
    tied = [a for a in dict.fromkeys(ans) if counts[a] == top]
    good = {a: any(r["correct"] for r in rows if r["answer"] == a) for a in tied}
    return float(good[tied[0]]) if tie == "first" else sum(good.values()) / len(tied)


def fixed_expected(run: Path) -> dict[str, Any]:
    per = stored(run)
    n = {p: len(r) for p, r in per.items()}
    c = {p: sum(x["correct"] for x in r) for p, r in per.items()}
    ks = [1, 2, 4]
    cov = [np.mean([1 - math.comb(n[p] - c[p], k) / math.comb(n[p], k) for p in per]) for k in ks]
    maj1 = np.mean([c[p] / n[p] for p in per])
    maj_n = np.mean([vote(r, "expected") for r in per.values()])
    tok = np.mean([np.mean([x["tokens"] for x in r]) for r in per.values()])
    return {"k": ks, "coverage": cov, "majority@1": maj1, "majority@4": maj_n,
            "tokens": [k * tok for k in ks], "n": n, "c": c}  # fmt: skip


def point_expected(run: Path, kind: str) -> dict[str, float]:
    """method -> accuracy, plus samples and tokens per problem, from the stored samples."""
    per = stored(run)
    P = len(per)
    tokens = sum(x["tokens"] for r in per.values() for x in r) / P
    if kind == "adaptive":
        used = {
            json.loads(ln)["problem_id"]: json.loads(ln)["used"]
            for ln in (run / "adaptive.jsonl").read_text().splitlines()
        }
        acc = np.mean([vote(r[: used[p]], "first") for p, r in per.items()])
        # its cost is every sample it drew (the engine loop draws a few ahead of the rule's
        # stop); the rule used the first ``used`` of them
        return {"majority": acc, "samples": sum(map(len, per.values())) / P, "tokens": tokens,
                "used": sum(used.values()) / P}  # fmt: skip
    if kind == "pruned":
        acc = np.mean([vote([x for x in r if x["fate"] in (None, "kept")], "expected")
                       for r in per.values()])  # fmt: skip
        return {"majority": acc, "samples": sum(map(len, per.values())) / P, "tokens": tokens}
    if kind == "shortmk":
        rows = {
            json.loads(ln)["problem_id"]: json.loads(ln)
            for ln in (run / "shortmk.jsonl").read_text().splitlines()
        }
        # majority among the traces the run chose, ties to the shortest (the first of them in
        # finish order); cost: the k traces started and every token, the aborted ones' included
        acc = np.mean([vote([{x["index"]: x for x in r}[i] for i in rows[p]["chosen"]], "first")
                       for p, r in per.items()])  # fmt: skip
        assert all(len(r) == rows[p]["finished"] >= 3 for p, r in per.items())
        aborted = sum(r["aborted_tokens"] for r in rows.values()) / P
        return {"majority": acc, "samples": 4.0, "tokens": tokens + aborted}
    wv, mw = [], []
    for r in per.values():
        kept = [x for x in r if x["fate"] in (None, "kept")]
        lw = np.array([x["log_weight"] for x in kept], dtype=float)
        w = np.exp(lw - lw[np.isfinite(lw)].max())
        voters = [i for i, x in enumerate(kept) if x["answer"] is not None and np.isfinite(lw[i])]
        if not voters:
            wv.append(0.0)
            mw.append(0.0)
            continue
        totals: dict[str, float] = {}
        for i in voters:
            totals[kept[i]["answer"]] = totals.get(kept[i]["answer"], 0.0) + w[i]
        win = max(totals, key=lambda a: (totals[a], -list(totals).index(a)))
        best = kept[max(voters, key=lambda i: (lw[i], -i))]["answer"]
        wv.append(float(any(x["correct"] for x in kept if x["answer"] == win)))
        mw.append(float(any(x["correct"] for x in kept if x["answer"] == best)))
    return {"weighted_vote": float(np.mean(wv)), "max_weight": float(np.mean(mw)),
            "samples": 4.0, "tokens": tokens}  # fmt: skip


def check_points(points: list[dict[str, Any]], run: Path, kind: str) -> None:
    want = point_expected(run, kind)
    methods = {p["method"]: p for p in points}
    assert set(methods) == set(want) - {"samples", "tokens", "used"}
    for m, p in methods.items():
        assert p["kind"] == kind.partition("-")[0]
        assert p["accuracy"]["mean"] == pytest.approx(want[m], abs=1e-12)
        assert p["accuracy"]["low"] <= p["accuracy"]["mean"] <= p["accuracy"]["high"]
        assert p["samples"]["mean"] == pytest.approx(want["samples"])
        assert p["tokens"]["mean"] == pytest.approx(want["tokens"])


# --- the matrix ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_curve_k_axis(runs: dict[str, Path], kind: str) -> None:
    run = runs[kind]
    d = json.loads(ok("curve", run, "--json", "--n-boot", "10").stdout)
    if kind in FIXED_KINDS:
        want = fixed_expected(run)
        assert d["k"] == want["k"]
        assert d["methods"]["coverage"]["mean"] == pytest.approx(want["coverage"], abs=1e-12)
        maj = d["methods"]["majority"]["mean"]
        assert maj[0] == pytest.approx(want["majority@1"]) and maj[-1] == pytest.approx(want["majority@4"])
    else:
        assert d["runs"] == [] and d["x"] == "k"
        check_points(d["points"], run, kind)
        # k-sample curves of a run that is one point: one line saying why not and what to run
        refused("curve", run, "--methods", "majority", needles=("does not apply", f"ttscale curve {run}"))
        refused("curve", run, "--fit", needles=("does not apply",))


@pytest.mark.parametrize("kind", KINDS)
def test_curve_tokens_axis(runs: dict[str, Path], kind: str) -> None:
    run = runs[kind]
    d = json.loads(ok("curve", run, "--x", "tokens", "--json", "--n-boot", "10").stdout)
    assert d["x"] == "tokens"
    if kind in FIXED_KINDS:
        (r,) = d["runs"]
        assert r["tokens"] == pytest.approx(fixed_expected(run)["tokens"])
    else:
        check_points(d["points"], run, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_fit(runs: dict[str, Path], kind: str) -> None:
    run = runs[kind]
    if kind in POINT_KINDS:
        refused("fit", run, needles=("does not apply", f"ttscale curve {run}"))
        return
    from ttscale.errors import ConfigError
    from ttscale.metrics.scaling import bootstrap_power_law

    want = fixed_expected(run)
    pids = sorted(want["n"])
    try:
        ref = bootstrap_power_law(
            np.array([want["n"][p] for p in pids]), np.array([want["c"][p] for p in pids]),
            want["k"], method="loglog", n_boot=50, seed=0,
        ).fit
    except ConfigError as e:  # e.g. coverage 1 at k = 2: the command says so in one line
        refused("fit", run, "--n-boot", "10", needles=(str(e),))
        return
    d = json.loads(ok("fit", run, "--json", "--n-boot", "10").stdout)
    assert (d["a"], d["b"]) == pytest.approx((ref.a, ref.b))


@pytest.mark.parametrize("kind", KINDS)
def test_replay(runs: dict[str, Path], kind: str) -> None:
    run = runs[kind]
    if kind in ("pruned", "shortmk", "smc", "search", "search-dvts"):
        refused("replay", run, "--rule", "beta:0.9", needles=("does not apply", f"ttscale curve {run}"))
        if kind == "shortmk":
            refused("replay", run, "--rule", SHORT_RULE, needles=("does not apply", "first"))
        return
    if kind == "adaptive":
        # its own rule replayed in index order reproduces the live run on every problem
        d = json.loads(ok("replay", run, "--rule", ADAPTIVE_RULE, "--json").stdout)
        want = point_expected(run, "adaptive")
        assert d["max_samples"] == 6 and d["replayed"] == d["problems"] == 3
        assert d["undecided"]["count"] == 0
        assert d["accuracy"]["mean"] == pytest.approx(want["majority"])
        assert d["run"]["accuracy"]["mean"] == pytest.approx(want["majority"])
        assert d["samples"]["mean"] == pytest.approx(want["used"])
        refused("replay", run, "--rule", "beta:0.9", "--orders", "3", needles=("itself adaptive",))
        refused("replay", run, "--rule", PRUNE_RULE, needles=("itself adaptive",))
        return
    per = stored(run)
    d = json.loads(ok("replay", run, "--rule", "fixed", "--order", "index", "--json").stdout)
    assert d["max_samples"] == 4
    assert d["accuracy"]["mean"] == pytest.approx(np.mean([vote(r, "first") for r in per.values()]))


@pytest.mark.parametrize("kind", KINDS)
def test_info(runs: dict[str, Path], kind: str) -> None:
    run = runs[kind]
    d = json.loads(ok("info", run, "--json").stdout)
    assert d["recorded_problems"].startswith("3 ")
    if kind in FIXED_KINDS:
        assert d["run_kind"].startswith("fixed-n") and "ttscale curve" in d["own_result"]
        return
    check_points(d["own_result"], run, kind)
    text = ok("info", run).stdout
    rule = {"adaptive": "beta:threshold=0.8", "pruned": PRUNE_RULE, "shortmk": "short-3@k, k = 4",
            "smc": "SMC", "search": "beam", "search-dvts": "dvts"}[kind]
    assert rule in text and "result (" in text


@pytest.mark.parametrize("kind", KINDS)
def test_export_import_round_trip(runs: dict[str, Path], kind: str, tmp_path: Path) -> None:
    run = runs[kind]
    ok("export", run, "--out", tmp_path / "s.jsonl")
    ok("import", tmp_path / "s.jsonl", "--out", tmp_path / "back")
    b = json.loads(ok("curve", tmp_path / "back", "--json", "--n-boot", "10").stdout)
    if kind in FIXED_KINDS:
        want = fixed_expected(run)
        assert b["methods"]["coverage"]["mean"] == pytest.approx(want["coverage"], abs=1e-12)
        assert b["methods"]["majority"]["mean"][0] == pytest.approx(want["majority@1"])
    else:  # the kind survives the round trip: its particles or cut traces are not read as iid
        check_points(b["points"], run, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_check_verify(runs: dict[str, Path], kind: str, tmp_path: Path) -> None:
    run = runs[kind]
    n = len(SampleStore.open(run))
    ok("merge", tmp_path / "m", run)
    assert len(SampleStore.open(tmp_path / "m")) == n
    if kind in ("adaptive", "shortmk"):  # the stopping record travels with the samples
        name = f"{kind}.jsonl"
        assert (tmp_path / "m" / name).read_text() == (run / name).read_text()
    b = json.loads(ok("curve", tmp_path / "m", "--json", "--n-boot", "10").stdout)
    if kind in FIXED_KINDS:
        assert b["methods"]["coverage"]["mean"] == pytest.approx(fixed_expected(run)["coverage"], abs=1e-12)
    else:
        check_points(b["points"], run, kind)
    assert "no damage" in ok("check", run).stdout
    if kind != "imported":  # an imported run has its answers and correctness already
        ok("verify", run)  # idempotent: nothing re-checked, nothing changed
        assert len(list(SampleStore.open(run).verdicts("arith"))) == n


@pytest.mark.parametrize("kind", KINDS)
def test_verifier_utility(runs: dict[str, Path], kind: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs[kind], run)  # a second verdict set must not touch the shared runs
    if kind == "imported":
        # its correctness came with the file, as no verdict set: the command says so, and
        # verifying the imported run (its problems came with the metadata) makes the strong set
        refused("verifier-utility", "--run", run, "--weak", "prm", "--strong", "arith",
                needles=("no verdicts",))  # fmt: skip
        ok("verify", run)
    if kind in POINT_KINDS:
        refused("verifier-utility", "--run", run, "--weak", "prm", "--strong", "arith",
                needles=("does not apply",))  # fmt: skip
        return
    ok("verify", run, "--verifier", "arith-prm:last", "--name", "prm")
    d = json.loads(ok("verifier-utility", "--run", run, "--weak", "prm", "--strong", "arith", "--json").stdout)
    st = SampleStore.open(run)
    weak = {(v.problem_id, v.index): v.correct for v in st.verdicts("prm")}
    strong = {(v.problem_id, v.index): v.correct for v in st.verdicts("arith")}
    tp = sum(bool(weak[k]) and bool(strong[k]) for k in strong)
    fn = sum(not weak[k] and bool(strong[k]) for k in strong)
    if tp + fn:
        assert d["rates"]["completeness"] == pytest.approx(tp / (tp + fn))


# --- overlays of mixed kinds, and the faults of issue 15 ----------------------------------------


def test_mixed_overlay_is_one_table_and_one_plot(runs: dict[str, Path], tmp_path: Path) -> None:
    all_runs = [runs[k] for k in KINDS]
    plot = tmp_path / "mix.png"
    r = runner.invoke(app, ["curve", *map(str, all_runs), "--n-boot", "10", "--plot", str(plot)],
                      env={"COLUMNS": "250"})  # fmt: skip
    assert r.exit_code == 0, r.output
    assert r.output.count("accuracy at each run's cost per problem") == 1
    assert plot.stat().st_size > 5000
    assert "[" in r.output and "±" not in r.output  # intervals as [lo, hi]
    d = json.loads(ok("curve", *all_runs, "--x", "tokens", "--json", "--n-boot", "10").stdout)
    assert [x["run"] for x in d["runs"]] == [str(runs[k]) for k in FIXED_KINDS]
    for kind in POINT_KINDS:
        check_points([p for p in d["points"] if p["run"] == str(runs[kind])], runs[kind], kind)


def test_unverified_pruning_run_asks_for_verify(runs: dict[str, Path], tmp_path: Path) -> None:
    unv = tmp_path / "unverified"
    ok("sample", *HF, "--n", "4", "--prune", PRUNE_RULE, "--out", unv)
    for x in ("k", "tokens"):
        refused("curve", runs["fixed"], unv, "--x", x, needles=(f"ttscale verify {unv}",))


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_damaged_problems_file_is_one_line_everywhere(
    runs: dict[str, Path], tmp_path: Path, damage: str
) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["fixed"], run)
    f = run / "problems.parquet"
    f.write_bytes(b"" if damage == "empty" else f.read_bytes()[:300])
    for cmd in (["curve", run], ["fit", run], ["replay", run, "--rule", "beta:0.9"], ["export", run],
                ["curve", run, "--x", "tokens"]):  # fmt: skip
        refused(*cmd, needles=("problems.parquet is damaged", f"ttscale check {run} --repair"))
    assert "unreadable: " in json.loads(ok("info", run, "--json").stdout)["recorded_problems"]


def test_unwritable_targets_fail_before_any_work(
    runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ttscale.metrics.imperfect as imperfect

    ok("export", runs["fixed"], "--out", tmp_path / "s.jsonl")
    refused("import", tmp_path / "s.jsonl", "--out", "/proc/ttscale-x/run", needles=("--out", "not writable"))
    refused("merge", "/proc/ttscale-x/run", runs["fixed"], needles=("not writable",))
    called: list[int] = []
    monkeypatch.setattr(imperfect, "verifier_utility", lambda *a, **k: called.append(1))
    refused("verifier-utility", "--run", runs["fixed"], "--weak", "arith", "--strong", "arith",
            "--plot", "/proc/ttscale-x.png", needles=("--plot", "not writable"))  # fmt: skip
    assert called == []


def test_python_api_refuses_k_sample_estimators_on_an_adaptive_pool(runs: dict[str, Path]) -> None:
    from ttscale.analysis import compute_curves, coverage_counts
    from ttscale.errors import ConfigError
    from ttscale.replay import replay

    pool = SampleStore.open(runs["adaptive"]).pool()
    assert pool.iid and pool.meta["run_kind"] == "adaptive"
    for call in (lambda: compute_curves(pool, ["coverage"], [1]), lambda: coverage_counts(pool),
                 lambda: replay(pool, "beta:0.9")):  # fmt: skip
        with pytest.raises(ConfigError, match="adaptive"):
            call()
    assert SampleStore.open(runs["fixed"]).pool().meta["run_kind"] == "fixed"


def test_python_api_refuses_k_sample_estimators_on_a_short_m_at_k_pool(runs: dict[str, Path]) -> None:
    from ttscale.analysis import compute_curves
    from ttscale.errors import ConfigError
    from ttscale.select.shortmk import replay_short

    pool = SampleStore.open(runs["shortmk"]).pool()
    assert not pool.iid and pool.meta["run_kind"] == "shortmk"
    for call in (lambda: compute_curves(pool, ["majority"], [1]), lambda: replay_short(pool, SHORT_RULE)):
        with pytest.raises(ConfigError, match=r"short-m@k|not"):
            call()
