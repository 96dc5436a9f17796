"""Scaling curves of a run: compute_curves, plotting, and the curve/fit/verifier-utility CLI."""

from __future__ import annotations

import itertools
import json
import math

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
    # docs/algorithms.md 1.2: answers [A, A, B, C], gold A; RM scores [0.9, 0.2, 0.7, 0.4] with
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
    rep = compute_curves(pool, ["coverage"], [1, 2, 4], n_boot=20, missing="skip")
    per = rep.curves["coverage"].per_problem
    assert np.isnan(per[0, 2]) and not np.isnan(per[1, 2])
    # k=4 is averaged over the one problem that has 4 samples
    assert rep.curves["coverage"].mean[2] == pytest.approx(per[1, 2])


def test_short_and_unsampled_problems_count_as_unsolved_or_are_dropped():
    # a: n=2, c=1 -> pass@1 1/2, pass@2 1; b: n=4, c=2 -> pass@1 1/2, pass@2 1 - 1/C(4,2) = 5/6,
    # pass@4 1; "z" is a problem of the run with no sample; 4 samples were requested
    pool = Pool.from_arrays(
        ["a", "b"], [2, 4], answer=list("xxyxxy"), correct=[1, 0, 0, 1, 1, 0]
    ).with_run_info(unsampled=["z"], requested_n=4)
    assert pool.sample_shortfall() == {
        "requested": 4, "requested_known": True, "problems": 3, "short": 1, "unsampled": 1,
    }
    rep = compute_curves(pool, ["coverage", "majority"], [1, 2, 4], n_boot=20)
    assert rep.n_problems == 3
    np.testing.assert_allclose(rep.curves["coverage"].mean, [1 / 3, (1 + 5 / 6) / 3, 1 / 3])
    assert rep.curves["majority"].per_problem.shape == (3, 3)
    ms = rep.to_dict()["missing_samples"]
    assert ms["policy"] == "count" and ms["short"] == 1 and ms["unsampled"] == 1
    # drop: only b has the 4 requested samples
    rep = compute_curves(pool, ["coverage"], [1, 2, 4], n_boot=20, missing="drop")
    assert rep.n_problems == 1 and rep.meta["missing_samples"]["dropped"] == 2
    np.testing.assert_allclose(rep.curves["coverage"].mean, [0.5, 5 / 6, 1.0])
    # skip: the old per-k average over the problems that have k samples
    rep = compute_curves(pool, ["coverage"], [1, 2, 4], n_boot=20, missing="skip")
    assert rep.n_problems == 2
    np.testing.assert_allclose(rep.curves["coverage"].mean, [0.5, (1 + 5 / 6) / 2, 1.0])
    with pytest.raises(ConfigError, match="missing must be one of"):
        compute_curves(pool, ["coverage"], missing="ignore")
    # the fit sees the unsampled problem as solved by none of its (notional) samples
    from ttscale.analysis import coverage_counts

    n, c = coverage_counts(pool, "count")
    assert n.tolist() == [2, 4, 4] and c.tolist() == [1, 2, 0]


def test_oracle_selection_is_flagged(tmp_path):
    # best-of-N by the correctness verifier's own score picks a correct sample whenever there is
    # one: it equals coverage, and is labelled so in the table, JSON and legend
    pool = Pool.from_arrays(
        ["a", "b"], [3, 3], answer=list("xyzuvw"), correct=[0, 1, 0, 0, 0, 0],
        scores={"math": [0.0, 1.0, 0.0, 0.0, 0.0, 0.0], "rm": [0.3, 0.2, 0.9, 0.1, 0.5, 0.4]},
    )
    rep = compute_curves(pool, ["coverage", "best_of_n"], [1, 3], score="math", n_boot=20)
    np.testing.assert_allclose(rep.curves["best_of_n"].mean, rep.curves["coverage"].mean)
    d = rep.to_dict()["methods"]["best_of_n"]
    assert d["oracle"] is True and "equals the correctness labels" in d["oracle_reason"]
    assert d["label"] == "best-of-N@k (oracle selection)"
    # named after the verifier whose verdicts give correctness
    named = Pool.from_arrays(["a"], [2], answer=["x", "y"], correct=[1, 0],
                             scores={"math": [0.7, 0.2]})
    named = type(named)(**{**named.__dict__, "meta": {"verifier": "math"}})
    r2 = compute_curves(named, ["weighted"], [1], score="math", n_boot=10)
    assert r2.curves["weighted"].oracle and "'math'" in r2.curves["weighted"].oracle
    # a genuine reward model is not flagged
    rep = compute_curves(pool, ["best_of_n"], [1, 3], score="rm", n_boot=20)
    assert rep.curves["best_of_n"].oracle is None and rep.to_dict()["methods"]["best_of_n"]["oracle"] is False
    from rich.console import Console

    from ttscale.cli.analysis_cmds import print_curve_table

    con = Console(record=True, width=200)
    print_curve_table(compute_curves(pool, ["coverage", "best_of_n"], [1, 3], score="math", n_boot=20), con)
    assert "best-of-N (oracle)" in con.export_text()


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
    # docs/algorithms.md 7.2: V_fp = -1, exact mode U(1..5) and K* = 2
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


# --- analysis a user can trust at a glance (issue 7) ---------------------------------------


def _random_pool(P: int = 12, n: int = 8, seed: int = 0, with_logprobs: bool = True) -> Pool:
    rng = np.random.default_rng(seed)
    corr = rng.random((P, n)) < rng.uniform(0.1, 0.7, P)[:, None]
    ans = np.where(corr, "g", rng.integers(0, 3, (P, n)).astype(str)).ravel()
    lp = -rng.gamma(2.0, 0.2, P * n) if with_logprobs else None
    return Pool.from_arrays([f"p{i}" for i in range(P)], [n] * P, answer=ans, correct=corr.ravel(),
                            mean_logprob=lp)


def test_prerequisites_are_checked_before_anything_is_computed():
    pool = _random_pool(with_logprobs=False)
    calls = []
    with pytest.raises(ConfigError) as e:
        compute_curves(pool, ["coverage", "majority", "max_probability", "rpc", "deepconf"],
                       progress=lambda *a: calls.append(a), n_boot=20)
    msg = str(e.value)
    # one line naming both missing inputs and the `ttscale sample` flag that provides each
    assert "\n" not in msg
    assert "max_probability, rpc need per-sample log-probs, missing for 96 of 96 answered samples" in msg
    assert "--logprobs 0" in msg
    assert "deepconf needs per-token top log-probs" in msg and "--logprobs 20" in msg
    assert calls == []  # coverage and majority were not computed first
    # partial: 3 answered samples without a log-prob are counted
    lp = _random_pool().mean_logprob.copy()
    lp[[0, 5, 40]] = np.nan
    pool = Pool.from_arrays([f"p{i}" for i in range(12)], [8] * 12, answer=pool.answer,
                            correct=pool.correct, mean_logprob=lp)
    with pytest.raises(ConfigError, match="pc needs per-sample log-probs, missing for 3 of 96"):
        compute_curves(pool, ["coverage", "pc"], n_boot=20)
    calls.clear()
    with pytest.raises(ConfigError, match="power-law fit needs at least two k"):
        compute_curves(pool, ["coverage", "majority"], [1], fit=True, progress=lambda *a: calls.append(a))
    assert calls == []


def test_progress_reports_each_method_and_the_fit_bootstrap():
    pool = _random_pool()
    calls: list[tuple[str, int, int]] = []
    compute_curves(pool, ["coverage", "majority", "pc"], [1, 2, 4], n_boot=40, n_draws=20,
                   fit=True, progress=lambda *a: calls.append(a))
    for task, total in (("coverage", 12), ("majority", 12), ("pc", 12), ("fit bootstrap", 40)):
        seen = [(d, t) for name, d, t in calls if name == task]
        assert seen, task
        assert all(t == total for _, t in seen)
        done = [d for d, _ in seen]
        assert done == sorted(done) and done[-1] == total
    assert len([c for c in calls if c[0] == "pc"]) == 12  # once per problem


def test_power_law_goodness_of_fit_matches_a_hand_computation():
    from ttscale.metrics.scaling import fit_power_law

    k = 2.0 ** np.arange(11)
    c = np.array([0.30, 0.42, 0.53, 0.62, 0.70, 0.76, 0.81, 0.85, 0.88, 0.905, 0.925])
    f = fit_power_law(k, c, "loglog")
    # docs/algorithms.md 1.2: loglog gives a = -1.1105590, b = -0.3911933; residuals from those
    pred = np.exp(-1.1105590 * k ** -0.3911933)
    res = c - pred
    assert f.rmse == pytest.approx(np.sqrt(np.mean(res**2)), rel=1e-5)
    assert f.max_abs_error == pytest.approx(np.abs(res).max(), rel=1e-5)
    assert f.r2 == pytest.approx(1 - (res**2).sum() / ((c - c.mean()) ** 2).sum(), rel=1e-6)
    exact = fit_power_law(k, np.exp(-1.5 * k**-0.35), "nls")
    assert exact.r2 == pytest.approx(1.0) and exact.rmse < 1e-6


def test_samples_needed_interval_from_bootstrap_replicates():
    from ttscale.metrics.scaling import PowerLawBootstrap, fit_power_law

    k = np.array([1.0, 2.0, 4.0])
    fit = fit_power_law(k, np.exp(-1.0 * k**-1.0))
    # target e^-1 (log X = -1), b = -1: k = (-1/a)^-1 = -a, so a = -1,-2,-4,-8 need 1,2,4,8
    # samples; a = +0.5 never gets there (inf)
    bs = PowerLawBootstrap(fit, 0, 0, 0, 0, np.array([-4.0, -1.0, 0.5, -8.0, -2.0]),
                           np.full(5, -1.0), confidence=0.5, n_failed=0)
    lo, hi, never = bs.samples_needed_interval(math.exp(-1.0))
    # sorted [1, 2, 4, 8, inf]: the 25% point lies at index 1 (-> 2, "lower"), 75% at 3 (-> 8)
    assert (lo, hi, never) == (pytest.approx(2.0), pytest.approx(8.0), pytest.approx(0.2))
    bs90 = PowerLawBootstrap(fit, 0, 0, 0, 0, bs.a_samples, bs.b_samples, confidence=0.9,
                             n_failed=0)
    assert bs90.samples_needed_interval(math.exp(-1.0))[1] == math.inf


def test_compare_fit_methods_says_when_they_disagree_and_which_to_trust():
    from scipy.optimize import curve_fit

    from ttscale.metrics.scaling import compare_fit_methods

    k = 2.0 ** np.arange(11)
    c = np.array([0.30, 0.42, 0.53, 0.62, 0.70, 0.76, 0.81, 0.85, 0.88, 0.905, 0.925])
    cmp_ = compare_fit_methods(k, c, target=0.99)
    # docs/algorithms.md 1.2 parameters of both fits; their largest coverage gap over the observed k
    # and the two target budgets
    ll = lambda x: np.exp(-1.1105590 * x ** -0.3911933)  # noqa: E731
    nl = lambda x: np.exp(-1.1831219 * x ** -0.4253843)  # noqa: E731
    need = {"loglog": (np.log(0.99) / -1.1105590) ** (1 / -0.3911933),
            "nls": (np.log(0.99) / -1.1831219) ** (1 / -0.4253843)}
    grid = np.concatenate([k, list(need.values())])
    assert cmp_.max_gap == pytest.approx(np.abs(ll(grid) - nl(grid)).max(), rel=1e-4)
    assert cmp_.samples_needed["loglog"] == pytest.approx(need["loglog"], rel=1e-4)
    assert cmp_.disagree  # the budgets differ by far more than 25%
    # hold-out: each method refitted on k = 1..512 predicts k = 1024; reference fits by hand
    sl, ic = np.polyfit(np.log(k[:-1]), np.log(-np.log(c[:-1])), 1)
    err_ll = abs(np.exp(-np.exp(ic) * 1024.0**sl) - c[-1])
    (a, b), _ = curve_fit(lambda x, a, b: a * x**b, k[:-1], np.log(c[:-1]), p0=(-1.0, -0.5))
    err_nl = abs(np.exp(a * 1024.0**b) - c[-1])
    assert cmp_.holdout_error["loglog"] == pytest.approx(err_ll, rel=1e-4)
    assert cmp_.holdout_error["nls"] == pytest.approx(err_nl, rel=1e-3)
    assert cmp_.recommended == ("loglog" if err_ll < err_nl else "nls")
    assert "1024" in cmp_.reason
    same = compare_fit_methods(k[:6], np.exp(-1.5 * k[:6] ** -0.35))
    assert not same.disagree and same.max_gap < 1e-6


def test_plot_with_many_methods_keeps_them_apart():
    from ttscale.analysis import curves_figure

    pool = _random_pool(P=10, n=8)
    methods = ["coverage", "majority", "max_probability", "pc", "best_of_n"]
    pool = Pool.from_arrays([f"p{i}" for i in range(10)], [8] * 10, answer=pool.answer,
                            correct=pool.correct, mean_logprob=pool.mean_logprob,
                            scores={"rm": -pool.mean_logprob})
    rep = compute_curves(pool, methods, [1, 2, 4, 8], n_boot=20, n_draws=20, fit=True)
    fig = curves_figure(rep)
    (ax,) = fig.axes
    styled = {}
    for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
        line = handle[0] if isinstance(handle, tuple) else handle  # an errorbar container
        if label in {"coverage (pass@k)", "majority@k", "max-probability@k", "PC@k", "best-of-N@k"}:
            styled[label] = (line.get_color(), str(line.get_linestyle()), line.get_marker())
    assert len(styled) == 5 and len(set(styled.values())) == 5
    assert len({s[1] for s in styled.values()}) >= 4 and len({s[2] for s in styled.values()}) == 5
    # every CI band is faint, so five overlapping bands do not merge into one colour
    bands = [c for c in ax.collections if type(c).__name__ in ("PolyCollection", "FillBetweenPolyCollection")]
    assert len(bands) == 5 and all(b.get_alpha() <= 0.05 for b in bands)
    # the legend sits outside the axes
    leg = ax.get_legend()
    fig.canvas.draw()
    assert leg.get_window_extent().x0 >= ax.get_window_extent().x1
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_overlay_of_runs_has_one_panel_per_method_and_a_legend_of_runs(tmp_path):
    from ttscale.analysis import curves_figure

    reps = {
        name: compute_curves(_random_pool(seed=s), ["coverage", "majority", "max_probability", "pc"],
                             [1, 2, 4], n_boot=20, n_draws=20)
        for name, s in (("temperature=0.5", 1), ("temperature=1", 2))
    }
    fig = curves_figure(reps)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["coverage (pass@k)", "majority@k", "max-probability@k", "PC@k"]
    for ax in panels:
        assert sorted(ln.get_label() for ln in ax.get_lines() if not ln.get_label().startswith("_")) \
            == ["temperature=0.5", "temperature=1"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["temperature=0.5", "temperature=1"]
    import matplotlib.pyplot as plt

    plt.close(fig)
    out = plot_curves(reps, tmp_path / "o.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_labels_name_what_differs():
    from ttscale.analysis import run_labels

    base = {"model": "/models/qwen-7b", "benchmark": "gsm8k", "created": "x",
            "sampling": {"temperature": 0.7, "n": 8, "seed": 0}}
    hot = {**base, "created": "y", "sampling": {**base["sampling"], "temperature": 1.0}}
    other = {**base, "model": "/models/llama-8b/"}
    got = run_labels([base, hot, other], ["r/a", "r/b", "r/c"])
    assert [g[0] for g in got] == ["model=qwen-7b, temperature=0.7", "model=qwen-7b, temperature=1",
                                   "model=llama-8b, temperature=0.7"]
    assert got[1][1] == {"model": "/models/qwen-7b", "sampling.temperature": 1.0}
    # nothing differs (created/git sha don't count): folder names, with parents where needed
    assert [g[0] for g in run_labels([base, base], ["x/run1", "x/run2"])] == ["run1", "run2"]
    assert [g[0] for g in run_labels([base, base], ["a/run", "b/run"])] == ["a/run", "b/run"]


def _rows(seed: int = 0, P: int = 25, n: int = 16, logprobs: bool = True) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(P):
        q = rng.uniform(0.02, 0.5)
        for _ in range(n):
            ok = bool(rng.random() < q)
            row = {"problem_id": f"p{p}", "answer": "42" if ok else str(rng.integers(3)), "correct": ok}
            if logprobs:
                row["mean_logprob"] = -float(rng.random())
            rows.append(row)
    return rows


def _import_as(tmp_path, name, rows):
    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = runner.invoke(app, ["import", str(src), "--out", str(tmp_path / name)])
    assert r.exit_code == 0, r.output
    return tmp_path / name


def test_cli_curve_names_the_sample_flag_for_missing_logprobs(tmp_path):
    run = _import_as(tmp_path, "nolp", _rows(logprobs=False))
    r = runner.invoke(app, ["curve", str(run), "--methods", "coverage,max_probability,deepconf", "--n-boot", "20"])
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: max_probability needs per-sample log-probs")
    assert "`ttscale sample --logprobs 0`" in lines[0] and "`ttscale sample --logprobs 20`" in lines[0]


def test_cli_curve_and_fit_show_progress_only_when_asked_or_on_a_terminal(tmp_path):
    run = _import_as(tmp_path, "run", _rows(P=6, n=4))
    args = ["curve", str(run), "--methods", "coverage,pc", "--k", "1,2", "--n-boot", "20", "--json"]
    quiet = runner.invoke(app, args)  # stderr is not a terminal here: no bars
    assert quiet.exit_code == 0 and quiet.stderr == ""
    r = runner.invoke(app, [*args, "--progress"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["methods"]["pc"]["mean"] == json.loads(quiet.stdout)["methods"]["pc"]["mean"]
    assert "pc" in r.stderr and "6/6 problems" in r.stderr
    r = runner.invoke(app, ["fit", str(run), "--k", "1,2,4", "--n-boot", "50", "--progress"])
    assert r.exit_code == 0, r.output
    assert "fit bootstrap" in r.stderr and "50/50 replicates" in r.stderr
    r = runner.invoke(app, [*args, "--no-progress"])
    assert r.exit_code == 0 and r.stderr == ""


def test_cli_fit_reports_goodness_ci_extrapolation_and_method_agreement(tmp_path):
    run = _import_as(tmp_path, "run", _rows())
    r = runner.invoke(app, ["fit", str(run), "--json", "--target", "0.9", "--extrapolate", "64,1024",
                            "--n-boot", "200"])
    assert r.exit_code == 0, r.output
    f = json.loads(r.output)
    # observed coverage from the stored counts, independently of the fit code
    rows = _rows()
    n = np.full(25, 16)
    c = np.array([sum(x["correct"] for x in rows if x["problem_id"] == f"p{p}") for p in range(25)])
    ks = np.array([1, 2, 4, 8, 16])
    cov = pass_at_k(n[:, None], c[:, None], ks[None, :]).mean(0)
    keep = (cov > 0) & (cov < 1)
    res = cov[keep] - np.exp(f["a"] * ks[keep] ** f["b"])
    g = f["goodness_of_fit"]
    assert g["rmse"] == pytest.approx(np.sqrt(np.mean(res**2)))
    assert g["r2"] == pytest.approx(1 - (res**2).sum() / ((cov[keep] - cov[keep].mean()) ** 2).sum())
    lo, hi = f["samples_needed_ci"]
    assert lo <= f["samples_needed"] <= (math.inf if hi is None else hi)
    assert f["k_max_observed"] == 16
    assert f["extrapolation_ratio"] == pytest.approx(f["samples_needed"] / 16)
    assert [e["extrapolation_ratio"] for e in f["extrapolation"]] == [4.0, 64.0]
    m = f["methods_compared"]
    assert set(m["fits"]) == {"loglog", "nls"} and m["recommended"] in ("loglog", "nls")
    assert isinstance(m["disagree"], bool) and m["reason"]
    r = runner.invoke(app, ["fit", str(run), "--target", "0.9", "--extrapolate", "1024",
                            "--n-boot", "200"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "[loglog, 5 points]" in text and "R² =" in text and "RMSE =" in text
    assert "(95% CI " in text and "bootstrap over problems, 200 replicates, seed 0" in text
    assert "extrapolated 64x beyond the largest observed k (16)" in text
    assert "loglog and nls fits" in text


def test_cli_curve_overlays_several_runs(tmp_path):
    a = _import_as(tmp_path, "a", _rows(seed=1))
    b = _import_as(tmp_path, "b", _rows(seed=2))
    args = ["--methods", "coverage,majority,max_probability", "--k", "1,4,16", "--n-boot", "50", "--json"]
    r = runner.invoke(app, ["curve", str(a), str(b), *args, "--plot", str(tmp_path / "o.png")])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert [x["label"] for x in d["runs"]] == ["a", "b"] and d["plot"] == str(tmp_path / "o.png")
    for x, run in zip(d["runs"], (a, b), strict=True):
        single = json.loads(runner.invoke(app, ["curve", str(run), *args]).output)
        assert x["run"] == str(run)
        for m in ("coverage", "majority", "max_probability"):
            assert x["methods"][m]["mean"] == single["methods"][m]["mean"]
    assert (tmp_path / "o.png").read_bytes()[:4] == b"\x89PNG"
    r = runner.invoke(app, ["curve", str(a), str(b), "--methods", "coverage,majority", "--n-boot", "20"])
    assert r.exit_code == 0, r.output
    assert "2 runs" in r.output and "│ a " in r.output and "│ b " in r.output
    # every run is checked before any is computed: the second run lacks log-probs
    c = _import_as(tmp_path, "c", _rows(logprobs=False))
    r = runner.invoke(app, ["curve", str(a), str(c), "--methods", "max_probability"])
    assert r.exit_code == 1 and r.output.startswith(f"error: {c}: max_probability needs per-sample log-probs")


def test_cli_curve_labels_runs_by_the_manifest_fields_that_differ(tmp_path):
    runs = []
    for t in ("0.5", "1.0"):
        out = tmp_path / f"t{t}"
        r = runner.invoke(app, ["sample", "--engine", "scripted", "--model", "toy", "--benchmark", "arith",
                                "--no-progress", "--n", "2", "--limit", "3", "--max-tokens", "8",
                                "--temperature", t, "--out", str(out)])
        assert r.exit_code == 0, r.output
        assert runner.invoke(app, ["verify", str(out)]).exit_code == 0
        runs.append(str(out))
    r = runner.invoke(app, ["curve", *runs, "--json", "--n-boot", "20"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert [x["label"] for x in d["runs"]] == ["temperature=0.5", "temperature=1"]
    assert d["runs"][1]["differs"] == {"sampling.temperature": 1.0}


def test_cli_curve_table_with_many_methods_keeps_every_column_readable(tmp_path):
    run = _import_as(tmp_path, "run", _rows(P=8, n=16))
    r = runner.invoke(app, ["curve", str(run), "--methods", "coverage,majority,max_probability,pc,rpc",
                            "--rpc-draws", "2", "--draws", "10", "--n-boot", "20"])
    assert r.exit_code == 0, r.output
    rows = [ln for ln in r.output.splitlines() if ln.startswith("│")]
    # an 80-column table: the k column and every mean are shown whole, never cut to "0.2…"
    assert [ln.split("│")[1].strip() for ln in rows] == ["1", "2", "4", "8", "16"]
    assert "…" not in r.output and all(len(ln) <= 80 for ln in rows)
    assert "CIs left out to fit 80 columns; see --json" in r.output


def test_cli_curve_refuses_unknown_method_keys_in_one_line(tmp_path):
    rows = [{"problem_id": f"p{p}", "answer": a, "correct": a == "42", "mean_logprob": lp}
            for p in range(3)
            for a, lp in (("42", -0.2), ("7", -0.1), ("42", -0.3), ("9", -0.4))]
    run = _import(tmp_path, rows)
    # "ppl": the name max_probability had before the rule registry; one name per rule now
    r = runner.invoke(app, ["curve", str(run), "--methods", "coverage,ppl", "--k", "1,4", "--json",
                            "--n-boot", "20"])
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.strip().startswith("error: unknown method(s) ['ppl']; choose from coverage")
    assert len(r.stderr.strip().splitlines()) == 1
    r = runner.invoke(app, ["curve", str(run), "--methods", "coverage,max_probability", "--k", "1,4",
                            "--json", "--n-boot", "20"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert list(d["methods"]) == ["coverage", "max_probability"]
    # k = 4: the whole pool; the best path (-0.1) answers 7, wrong -> 0. k = 1: 2 of 4 correct.
    assert d["methods"]["max_probability"]["mean"] == pytest.approx([0.5, 0.0], abs=1e-12)
    r = runner.invoke(app, ["curve", str(run), "--methods", "coverage,max_probability", "--k", "4"])
    assert r.exit_code == 0 and r.stderr == "" and "max-probability" in r.stdout
