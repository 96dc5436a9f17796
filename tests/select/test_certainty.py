"""Self-certainty (Kang et al., 2025): the exact value against the KL definition, the top-k
approximation as a lower bound with its error on the bundled model, best-of-N and Borda voting
on hand-derived vectors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from ttscale.errors import ConfigError
from ttscale.select.certainty import (
    borda_vote,
    certainty_best_of_n,
    exact_self_certainty,
    self_certainty,
    self_certainty_topk,
)


def _kl_uniform(p: np.ndarray) -> float:
    v = p.size
    return float(sum((1 / v) * math.log((1 / v) / q) for q in p))


def test_exact_is_the_mean_kl_from_uniform() -> None:
    rows = [np.array([0.5, 0.25, 0.25]), np.array([1 / 3] * 3), np.array([0.8, 0.15, 0.05])]
    want = np.mean([_kl_uniform(r) for r in rows])
    assert self_certainty(np.log(np.stack(rows))) == pytest.approx(want, rel=1e-12)
    assert self_certainty(np.log([[0.25] * 4])) == pytest.approx(0.0, abs=1e-15)
    assert math.isnan(self_certainty(np.zeros((0, 5))))


def test_topk_is_exact_with_an_even_tail_and_a_lower_bound_otherwise() -> None:
    # top-2 listed, the other 3 tokens share the rest evenly: the approximation is exact
    p = np.array([0.5, 0.2, 0.1, 0.1, 0.1])
    top = {0: math.log(0.5), 1: math.log(0.2)}
    assert self_certainty_topk([top], 5) == pytest.approx(_kl_uniform(p), rel=1e-12)
    # every token listed: exact
    assert self_certainty_topk([{i: math.log(x) for i, x in enumerate(p)}], 5) == pytest.approx(_kl_uniform(p))
    rng = np.random.default_rng(0)
    for _ in range(50):
        q = rng.dirichlet(np.full(40, 0.3))
        idx = np.argsort(-q)[:8]
        approx = self_certainty_topk([{int(i): math.log(q[i]) for i in idx}], 40)
        assert approx <= _kl_uniform(q) + 1e-12
    with pytest.raises(ConfigError, match="vocabulary of 2"):
        self_certainty_topk([{0: -1.0, 1: -2.0, 2: -3.0}], 2)


def test_best_of_n_and_borda_by_hand() -> None:
    answers = ["a", "b", "b", "c"]
    cert = [0.9, 0.1, 0.2, 0.5]
    assert certainty_best_of_n(answers, cert) == ("a", 0)
    assert certainty_best_of_n(answers, [math.nan, 0.1, 0.2, 0.2]) == ("b", 2)
    # ranks: a 1st (4 ** p), c 2nd (3 ** p), b 3rd and 4th (2 ** p + 1)
    ans, votes = borda_vote(answers, cert, power=1.0)
    assert ans == "a" and votes == {"a": 4.0, "b": 3.0, "c": 3.0}
    ans, votes = borda_vote(answers, cert)  # power 0.5: b = sqrt 2 + 1 > a = 2 > c = sqrt 3
    assert ans == "b" and votes["b"] == pytest.approx(math.sqrt(2) + 1)
    # power 0: plain majority; a tie goes to the first-seen answer
    assert borda_vote(["x", "y", "y", "x"], [0.1, 0.9, 0.8, 0.2], power=0.0)[0] == "x"
    assert borda_vote([None, None], [1.0, 2.0]) == (None, {})


@pytest.mark.slow
def test_exact_and_topk_on_the_bundled_model() -> None:
    """The exact value uses the distribution that produced each token (its row at the sampled
    token is the engine's own raw log-prob); the top-20 approximation is a lower bound, and its
    error on the bundled model (V = 380) is measured here."""
    from ttscale.engines import GenerationRequest
    from ttscale.engines.hf import HFEngine
    from ttscale.evals import default_model_path
    from ttscale.types import SamplingParams

    if not (Path(default_model_path()) / "config.json").is_file():
        pytest.skip("the bundled model is not built")
    engine = HFEngine(default_model_path(), device="cpu", threads=1)
    reqs = [GenerationRequest(problem_id=f"q{i}", prompt=f"Q: {i + 3} + {2 * i + 5} = ?\nA:", indices=(0, 1)) for i in range(8)]
    params = SamplingParams(temperature=1.0, max_tokens=32, logprobs=20, seed=3)
    comps = [c for cs in engine.generate(reqs, params) for c in cs]
    by_pid = {r.problem_id: r for r in reqs}
    exact = exact_self_certainty(engine, [by_pid[c.problem_id] for c in comps], [c.token_ids for c in comps])
    vocab = int(engine.model.config.vocab_size)
    approx = [self_certainty_topk(c.top_logprobs, vocab) for c in comps]
    for e, a in zip(exact, approx, strict=True):
        assert a <= e + 1e-9
        assert e > 0
    # the rows line up with the sampled tokens: recompute the sampled token's log-prob
    import torch

    c = comps[0]
    ctx = engine.prompt_token_ids(by_pid[c.problem_id])
    with torch.inference_mode():
        logits = engine.model(input_ids=torch.tensor([ctx + list(c.token_ids)])).logits[0]
    lp = torch.log_softmax(logits[len(ctx) - 1 : len(ctx) - 1 + len(c.token_ids)].double(), dim=-1)
    got = [float(lp[i, t]) for i, t in enumerate(c.token_ids)]
    assert got == pytest.approx(list(c.token_logprobs), abs=1e-4)
    rel = [abs(e - a) / e for e, a in zip(exact, approx, strict=True)]
    # what selection reads is the order of the traces: rank correlation exact vs approximation
    rx, ra = np.argsort(np.argsort(exact)), np.argsort(np.argsort(approx))
    rho = float(np.corrcoef(rx, ra)[0, 1])
    print(f"self-certainty top-20 vs exact on the bundled model: max rel error {max(rel):.4f}, "
          f"mean {np.mean(rel):.4f}, Spearman {rho:.3f}, over {len(rel)} traces")
    assert max(rel) < 0.5 and rho > 0.5


@pytest.mark.slow
def test_run_certainties_exact_and_approximate_on_a_stored_run(tmp_path: Path) -> None:
    """A run of the bundled model: the exact values (a forward pass over the stored tokens) bound
    the top-20 approximation from above, sample by sample, in the same (pool) order."""
    from typer.testing import CliRunner

    from ttscale.cli.app import app
    from ttscale.engines.hf import HFEngine
    from ttscale.evals import default_model_path
    from ttscale.select.certainty import run_certainties
    from ttscale.store import SampleStore

    if not (Path(default_model_path()) / "config.json").is_file():
        pytest.skip("the bundled model is not built")
    run = tmp_path / "run"
    r = CliRunner().invoke(app, ["sample", "--engine", "hf", "--benchmark", "arith", "--limit", "3", "--n", "3",
                                 "--logprobs", "20", "--seed", "1", "--no-progress", "--out", str(run)])  # fmt: skip
    assert r.exit_code == 0, r.output
    store = SampleStore.open(run)
    approx, v = run_certainties(store)
    engine = HFEngine(default_model_path(), device="cpu", threads=1)
    exact, v2 = run_certainties(store, engine=engine)
    assert v == v2 == 380 and approx.shape == exact.shape == (9,)
    assert (approx <= exact + 1e-9).all() and (exact > 0).all()
    # pool order: the pool's k-th sample is the k-th value
    from ttscale.engines import GenerationRequest

    pool = store.pool()
    prompts = {p.id: p.prompt for p in store.problems()}
    by_key = {(s.problem_id, s.index): s for s in store.samples()}
    for k in (0, 4, 8):
        pid = str(pool.problem_ids[int(np.searchsorted(pool.offsets, k, side="right") - 1)])
        smp = by_key[(pid, int(pool.index[k]))]
        (want,) = exact_self_certainty(engine, [GenerationRequest(problem_id=pid, prompt=prompts[pid])], [smp.token_ids])
        assert exact[k] == pytest.approx(want, rel=1e-9)
