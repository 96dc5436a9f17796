"""Budget forcing (s1): the Scripted engine with a scripted thinking model, and the bundled arith
model with "\\n####" as a synthetic end-of-thinking delimiter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ttscale.engines import GenerationRequest, ScriptedEngine
from ttscale.errors import ConfigError
from ttscale.samplers.budget import BudgetForcing, BudgetForcingSampler
from ttscale.store import SampleStore
from ttscale.types import Problem, SamplingParams

PARAMS = SamplingParams(temperature=1.0, max_tokens=200, seed=0)


def _thinker(req: GenerationRequest, index: int, seed: int, params: SamplingParams) -> str:
    # thinks "abc" (or more after each Wait), ends thinking, then answers; index 1 thinks long
    if req.prefix.endswith("</think>Final:"):
        return " 42"
    if index == 1:
        return "x" * 50 + "</think> 7"
    return "def</think> 9" if req.prefix.endswith("Wait") else "abc</think> 5"


def test_min_appends_wait_and_max_forces_the_end(tmp_path: Path) -> None:
    f = BudgetForcing(think_end="</think>", min_thinking=15, max_thinking=30, answer_prefix="Final:", answer_tokens=5)
    store = SampleStore.create(tmp_path / "run", {"model": "toy"})
    s = BudgetForcingSampler(ScriptedEngine(_thinker), PARAMS, f)
    [res] = list(s.sample([Problem(id="p", prompt="Q")], 2, sink=store))
    t0, t1 = s.traces
    # a token is a character; the delimiter's tokens were generated, so they count:
    # trace 0: "abc</think>" (11 < 15) -> Wait; "def</think>" (22 >= 15) -> end, then the answer
    assert (t0.thinking, t0.thinking_tokens, t0.waits, t0.forced_end) == ("abcWaitdef", 22, 1, False)
    # trace 1: 50 characters before its delimiter: cut at 30, the end forced
    assert (t1.thinking, t1.thinking_tokens, t1.waits, t1.forced_end) == ("x" * 30, 30, 0, True)
    assert (t0.segments, t1.segments) == (3, 2)
    answer_tokens = len(" 42") + 1  # and the end of sequence
    for t in (t0, t1):
        assert t.answer == " 42" and t.answer_tokens == answer_tokens
    texts = [c.completion.text for c in res.candidates]
    assert texts == ["abcWaitdef</think>Final: 42", "x" * 30 + "</think>Final: 42"]
    assert res.generated_tokens == 22 + 30 + 2 * answer_tokens
    assert [c.completion.num_tokens for c in res.candidates] == [22 + answer_tokens, 30 + answer_tokens]
    store.refresh()
    rows = [json.loads(x) for x in (store.path / "budget_forcing.jsonl").read_text().splitlines()]
    assert [r["waits"] for r in rows] == [1, 0] and store.manifest["budget_forcing"]["min_thinking"] == 15
    assert sorted(x.index for x in store.samples()) == [0, 1]


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="exceeds"):
        BudgetForcing(min_thinking=10, max_thinking=5)
    with pytest.raises(ConfigError, match="delimiter"):
        BudgetForcing(think_end="")


def test_the_scripted_loop_honours_a_requests_own_max_tokens() -> None:
    # found by budget forcing: the loop used the run's max_tokens for every request
    from ttscale.engines.loop import open_loop

    loop = open_loop(ScriptedEngine({"p": "x" * 50}), PARAMS)
    t = loop.submit(GenerationRequest(problem_id="p", prompt="q", max_tokens=7))
    got: dict[int, list[object]] = {}
    while loop.in_flight:
        loop.poll(lambda k, comps: got.__setitem__(k, comps))
    (c,) = got[t]
    assert c.num_tokens == 7 and c.finish_reason == "length"  # type: ignore[attr-defined]


@pytest.mark.slow
def test_budget_forcing_on_the_bundled_model_with_a_synthetic_delimiter() -> None:
    """The arith model writes its working, then "\\n#### N": "\\n####" stands in for the end of
    thinking. Short working gets "Wait" appended until 24 tokens; long working is cut at 40."""
    from ttscale.engines.hf import HFEngine
    from ttscale.evals import default_model_path, load_problems

    if not (Path(default_model_path()) / "config.json").is_file():
        pytest.skip("the bundled model is not built")
    engine = HFEngine(default_model_path(), device="cpu", threads=1)
    f = BudgetForcing(think_end="\n####", min_thinking=24, max_thinking=40, max_waits=3, answer_prefix=" ",
                      answer_tokens=8)  # fmt: skip
    s = BudgetForcingSampler(engine, SamplingParams(temperature=1.0, max_tokens=64, seed=1), f)
    res = list(s.sample(load_problems("arith", limit=3), 4))
    assert len(s.traces) == 12
    for t in s.traces:
        assert t.thinking_tokens <= 40 and t.answer_tokens <= 8
        assert t.thinking.count("Wait") == t.waits
        # under the minimum only when the cues ran out; at the maximum only if forced
        assert t.thinking_tokens >= 24 or t.waits == 3
        assert not t.forced_end or t.thinking_tokens == 40
    assert any(t.waits for t in s.traces)  # the arith model's working is short: cues were added
    for r in res:
        for c in r.candidates:
            assert "\n#### " in c.completion.text
    assert sum(r.generated_tokens for r in res) == sum(t.thinking_tokens + t.answer_tokens for t in s.traces)


def test_parse_budget_forcing() -> None:
    from ttscale.samplers.budget import parse_budget_forcing

    f = parse_budget_forcing(r"think_end=\n####,min=24,max=40,answer_prefix= ,answer_tokens=8")
    assert (f.think_end, f.min_thinking, f.max_thinking, f.answer_prefix, f.answer_tokens) == ("\n####", 24, 40, " ", 8)
    with pytest.raises(ConfigError, match="think_end="):
        parse_budget_forcing("min=3")
    with pytest.raises(ConfigError, match="not one of"):
        parse_budget_forcing("think_end=x,minimum=3")
    with pytest.raises(ConfigError, match="not an integer"):
        parse_budget_forcing("think_end=x,min=a")


@pytest.mark.slow
def test_sample_budget_forcing_cli_on_the_bundled_model(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ttscale.cli.app import app
    from ttscale.evals import default_model_path

    if not (Path(default_model_path()) / "config.json").is_file():
        pytest.skip("the bundled model is not built")
    runner = CliRunner()
    out = tmp_path / "bf"
    spec = r"think_end=\n####,min=24,max=40,max_waits=3,answer_prefix= ,answer_tokens=8"
    r = runner.invoke(app, ["sample", "--engine", "hf", "--benchmark", "arith", "--limit", "3", "--n", "4", "--seed", "1",
                            "--no-progress", "--out", str(out), "--budget-forcing", spec])  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (out / "budget_forcing.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(x["thinking_tokens"] <= 40 for x in rows)
    store = SampleStore.open(out)
    assert len(store) == 12 and store.manifest["budget_forcing"]["max_thinking"] == 40
    assert store.accounting()["generated_tokens"] == sum(x["thinking_tokens"] + x["answer_tokens"] for x in rows)
    r = runner.invoke(app, ["sample", "--engine", "hf", "--benchmark", "arith", "--n", "4", "--out", str(tmp_path / "x"),
                            "--budget-forcing", spec, "--prune", "lowprob:-1"])  # fmt: skip
    assert r.exit_code == 1 and "drop --prune" in r.output
