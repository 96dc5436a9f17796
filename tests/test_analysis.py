"""Scaling curves of a run: compute_curves, plotting, and the curve/fit/verifier-utility CLI."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from ttscale.analysis import compute_curves, default_ks, plot_curves
from ttscale.cli.app import app
from ttscale.errors import ConfigError
from ttscale.metrics import pass_at_k
from ttscale.store.pool import Pool

runner = CliRunner()


def _vector_pool() -> Pool:
    # ALGORITHMS.md 1.2: answers [A, A, B, C], gold A; RM scores [0.9, 0.2, 0.7, 0.4] with
    # correctness [F, T, T, F] for best-of-N (a second problem)
    return Pool.from_arrays(
        ["maj", "bon"],
        [4, 4],
        answer=["A", "A", "B", "C", "w", "r", "r2", "w2"],
        correct=[True, True, False, False, False, True, True, False],
        scores={"rm": [0.0, 0.0, 0.0, 0.0, 0.9, 0.2, 0.7, 0.4]},
    )


def test_majority_and_bon_match_the_test_vectors():
    pool = _vector_pool()
    rep = compute_curves(pool, ["coverage", "majority", "best_of_n"], [1, 2, 3, 4], score="rm", n_boot=50)
    maj = rep.curves["majority"].per_problem[0]
    np.testing.assert_allclose(maj, [0.5, 0.5, 2 / 3, 1.0], atol=1e-9)
    bon = rep.curves["best_of_n"].per_problem[1]
    np.testing.assert_allclose(bon, [0.5, 1 / 3, 0.25, 0.0], atol=1e-9)
    cov = rep.curves["coverage"].per_problem
    np.testing.assert_allclose(cov[0], pass_at_k(4, 2, np.array([1, 2, 3, 4])))
    np.testing.assert_allclose(cov[1], pass_at_k(4, 2, np.array([1, 2, 3, 4])))


def test_coverage_mean_and_ci_on_a_larger_pool():
    rng = np.random.default_rng(1)
    P, n = 40, 16
    q = rng.uniform(0, 1, P)
    corr = rng.random((P, n)) < q[:, None]
    pool = Pool.from_arrays([f"p{i}" for i in range(P)], [n] * P, correct=corr.ravel(),
                            answer=np.where(corr, "x", "y").ravel())
    rep = compute_curves(pool, ["coverage", "majority"], n_boot=300, seed=3)
    np.testing.assert_array_equal(rep.ks, [1, 2, 4, 8, 16])
    c = rep.curves["coverage"]
    expected = pass_at_k(np.full(P, n), corr.sum(1), rep.ks[None, :].repeat(P, 0).T).T.mean(0)
    np.testing.assert_allclose(c.mean, expected)
    assert np.all(c.low <= c.mean) and np.all(c.mean <= c.high)
    assert np.all(np.diff(c.mean) >= -1e-12)  # coverage never decreases with k
    # majority can never beat coverage (an oracle) at the same k
    assert np.all(rep.curves["majority"].mean <= c.mean + 1e-12)
    # reproducible from the seed
    rep2 = compute_curves(pool, ["coverage", "majority"], n_boot=300, seed=3)
    np.testing.assert_array_equal(rep2.curves["majority"].low, rep.curves["majority"].low)


def test_ragged_pool_skips_k_beyond_n():
    pool = Pool.from_arrays(["a", "b"], [2, 4], answer=list("xxyx" "xy"), correct=[1, 0, 0, 1, 1, 0])
    rep = compute_curves(pool, ["coverage"], [1, 2, 4], n_boot=20)
    per = rep.curves["coverage"].per_problem
    assert np.isnan(per[0, 2]) and not np.isnan(per[1, 2])
    # k=4 is averaged over the one problem that has 4 samples
    assert rep.curves["coverage"].mean[2] == pytest.approx(per[1, 2])


def test_errors():
    pool = _vector_pool()
    with pytest.raises(ConfigError, match="unknown method"):
        compute_curves(pool, ["magic"])
    with pytest.raises(ConfigError, match="exceeds"):
        compute_curves(pool, ["coverage"], [1, 8])
    with pytest.raises(ConfigError, match="--score"):
        compute_curves(Pool.from_arrays(["a"], [2], answer=["x", "y"], correct=[1, 0]), ["best_of_n"])
    with pytest.raises(ConfigError, match="correctness"):
        compute_curves(Pool.from_arrays(["a"], [2], answer=["x", "y"]), ["coverage"])
    with pytest.raises(ConfigError, match="top log-probs"):
        compute_curves(pool, ["deepconf"])
    np.testing.assert_array_equal(default_ks(10), [1, 2, 4, 8, 10])


def test_plot_writes_png(tmp_path):
    rep = compute_curves(_vector_pool(), ["coverage", "majority"], [1, 2, 3, 4], n_boot=20)
    out = plot_curves(rep, tmp_path / "c.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _import(tmp_path, rows):
    src = tmp_path / "s.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = runner.invoke(app, ["import", str(src), "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    return tmp_path / "run"


def test_cli_curve_json_plot_and_fit(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for p in range(25):
        q = rng.uniform(0.02, 0.5)
        for _ in range(16):
            ok = bool(rng.random() < q)
            rows.append({"problem_id": f"p{p}", "answer": "42" if ok else str(rng.integers(3)),
                         "correct": ok, "mean_logprob": -float(rng.random())})
    run = _import(tmp_path, rows)
    png = tmp_path / "curve.png"
    r = runner.invoke(app, ["curve", str(run), "--methods", "coverage,majority,max_probability", "--fit",
                            "--plot", str(png), "--json", "--n-boot", "100"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["k"] == [1, 2, 4, 8, 16]
    cov = d["methods"]["coverage"]["mean"]
    assert all(b >= a for a, b in itertools.pairwise(cov))
    assert d["fit"]["a"] < 0 and d["fit"]["b"] < 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    r = runner.invoke(app, ["curve", str(run), "--k", "1,4"])
    assert r.exit_code == 0 and "majority" in r.output and "coverage" in r.output
    r = runner.invoke(app, ["fit", str(run), "--json", "--target", "0.9", "--extrapolate", "64"])
    assert r.exit_code == 0, r.output
    f = json.loads(r.output)
    assert f["a"] == pytest.approx(d["fit"]["a"]) and f["samples_needed"] > 0
    assert len(f["extrapolation"]) == 1
    r = runner.invoke(app, ["curve", str(run), "--methods", "nope"])
    assert r.exit_code == 1 and r.output.startswith("error: unknown method")
    r = runner.invoke(app, ["curve", str(run), "--k", "1,x"])
    assert r.exit_code == 1 and "comma-separated" in r.output


def test_cli_verifier_utility_matches_the_notebook_vector():
    # ALGORITHMS.md 7.2: V_fp = -1, exact mode U(1..5) and K* = 2
    r = runner.invoke(app, ["verifier-utility", "--v-fp", "-1", "--max-k", "5", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    np.testing.assert_allclose(d["utility"], [0.449, 0.472381, 0.461352, 0.451593, 0.444976], atol=1e-6)
    assert d["optimal_k"] == 2
    np.testing.assert_allclose(d["accuracy_ceiling"], [0.963989, 0.374101], atol=1e-6)


def test_deepconf_curve_matches_enumeration_with_the_aggregator(tmp_path):
    import itertools

    from ttscale.analysis import run_confidences
    from ttscale.select import aggregate
    from ttscale.store import SampleStore
    from ttscale.types import Sample

    rng = np.random.default_rng(4)
    store = SampleStore.create(tmp_path / "run")
    rows = []
    for p in range(4):
        for i in range(6):
            ok = bool(rng.random() < 0.4)
            top = [{t: float(-rng.random() * (3 if ok else 1.5)) for t in range(4)}
                   for _ in range(int(rng.integers(3, 9)))]
            rows.append(Sample(f"p{p}", i, text=f"x{i}", top_logprobs=top, correct=ok,
                               answer="1" if ok else str(rng.integers(2, 4))))
    store.append(rows)
    conf = run_confidences(store, window=4)
    pool = store.pool()
    rep = compute_curves(pool, ["deepconf"], [1, 2, 3], confidences=conf, deepconf_eta=50.0,
                         n_boot=20)
    for p in range(pool.num_problems):
        v = pool.problem(p)
        answers = [pool.answer_string(int(a)) for a in v.answer]
        c = conf[pool.offsets[p]:pool.offsets[p + 1]]
        for j, k in enumerate([1, 2, 3]):
            credits = []
            for sub in itertools.combinations(range(v.n), k):
                res = aggregate.deepconf_vote([answers[i] for i in sub], confidences=c[list(sub)],
                                              eta=50.0)
                corr = [bool(v.correct[[i for i in sub if answers[i] == a][-1]]) for a in res.answers]
                credits.append(res.credit(corr))
            assert rep.curves["deepconf"].per_problem[p, j] == pytest.approx(np.mean(credits))
    r = runner.invoke(app, ["curve", str(store.path), "--methods", "deepconf", "--k", "1,2",
                            "--deepconf-eta", "50", "--deepconf-window", "4", "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)["methods"]["deepconf"]["mean"]
    assert got == pytest.approx(rep.curves["deepconf"].mean[:2].tolist())


def test_cli_curve_renames_old_method_keys_with_a_note(tmp_path):
    rows = [{"problem_id": f"p{p}", "answer": a, "correct": a == "42", "mean_logprob": lp}
            for p in range(3)
            for a, lp in (("42", -0.2), ("7", -0.1), ("42", -0.3), ("9", -0.4))]
    run = _import(tmp_path, rows)
    r = runner.invoke(app, ["curve", str(run), "--methods", "coverage,ppl", "--k", "1,4", "--json",
                            "--n-boot", "20"])
    assert r.exit_code == 0, r.output
    assert r.stderr.strip() == "note: method 'ppl' is deprecated; using 'max_probability'"
    d = json.loads(r.stdout)
    assert list(d["methods"]) == ["coverage", "max_probability"]
    # k = 4: the whole pool; the best path (-0.1) answers 7, wrong -> 0. k = 1: 2 of 4 correct.
    assert d["methods"]["max_probability"]["mean"] == pytest.approx([0.5, 0.0], abs=1e-12)
    r = runner.invoke(app, ["curve", str(run), "--methods", "coverage,max_probability", "--k", "4"])
    assert r.exit_code == 0 and r.stderr == "" and "max-probability" in r.stdout
