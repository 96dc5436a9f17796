"""Budget forcing (s1): the Scripted engine with a scripted thinking model, and the bundled arith
model with "\\n####" as a synthetic end-of-thinking delimiter."""

from __future__ import annotations

import itertools
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


# -- chat and resume (issue 19) -----------------------------------------------------------------

TOY = BudgetForcing(think_end="z", min_thinking=6, max_thinking=14, max_waits=2, answer_prefix="=", answer_tokens=4)
TOY_PROBLEMS = [Problem(id=f"q{i}", prompt=f"abc{i}d") for i in range(4)]


def _keys(store: SampleStore) -> list[tuple[str, int, str, int, int | None]]:
    store.refresh()
    return sorted((s.problem_id, s.index, s.text, s.num_tokens, s.seed) for s in store.samples())


def _records(store: SampleStore) -> list[str]:
    return sorted((store.path / "budget_forcing.jsonl").read_text().splitlines())


def test_chat_requests_carry_the_messages_and_the_thinking_as_prefix() -> None:
    """Chat segments send the system and user messages with the thinking so far as ``prefix``;
    with a template that renders to the plain prompt, the toy model's traces are the plain ones."""
    plain_engine = ScriptedEngine()
    plain = BudgetForcingSampler(plain_engine, PARAMS, TOY)
    want = [[c.completion for c in r.candidates] for r in plain.sample(TOY_PROBLEMS, 3, seed=5)]
    engine = ScriptedEngine(chat_template=lambda msgs: msgs[-1]["content"])
    chat = BudgetForcingSampler(engine, PARAMS, TOY, chat=True, system_prompt="Think.")
    got = [[c.completion for c in r.candidates] for r in chat.sample(TOY_PROBLEMS, 3, seed=5)]
    assert [[(c.text, c.num_tokens, c.seed) for c in r] for r in got] == [
        [(c.text, c.num_tokens, c.seed) for c in r] for r in want
    ]
    assert chat.traces == plain.traces
    assert any(t.waits for t in chat.traces) and any(t.forced_end for t in chat.traces)
    for req, _ in engine.calls:
        p = next(p for p in TOY_PROBLEMS if p.id == req.problem_id)
        assert req.prompt is None
        assert list(req.messages or ()) == [{"role": "system", "content": "Think."}, {"role": "user", "content": p.prompt}]
    # each segment continues the trace's thinking: the prefixes of one trace grow
    i0 = [r.prefix for r, _ in engine.calls if r.problem_id == "q0" and r.indices == (0,)]
    assert i0[0] == "" and all(b.startswith(a) for a, b in itertools.pairwise(i0)) and len(i0) >= 2
    assert i0[-1].endswith("z=")  # the answer segment: thinking, the delimiter, the answer prefix


def test_chat_with_the_default_rendering_differs_and_is_recorded(tmp_path: Path) -> None:
    store = SampleStore.create(tmp_path / "run", {"model": "toy"})
    s = BudgetForcingSampler(ScriptedEngine(), PARAMS, TOY, chat=True)
    list(s.sample(TOY_PROBLEMS[:1], 2, seed=5, sink=store))
    store.refresh()
    assert store.manifest["chat"] is True and len(store) == 2
    plain = BudgetForcingSampler(ScriptedEngine(), PARAMS, TOY)
    list(plain.sample(TOY_PROBLEMS[:1], 2, seed=5))
    assert [t.thinking for t in s.traces] != [t.thinking for t in plain.traces]  # "user: ...\nassistant:"


@pytest.mark.parametrize("when", ["before", "after"])
def test_resume_after_a_kill_around_the_record_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """A kill as a problem's records are written (before: none written; after: written, its
    samples not yet stored) then ``resume``: the same samples as a run never killed, no duplicate,
    every record once."""
    import ttscale.samplers.budget as budget

    ref = SampleStore.create(tmp_path / "ref", {"model": "toy"})
    list(BudgetForcingSampler(ScriptedEngine(), PARAMS, TOY).sample(TOY_PROBLEMS, 3, seed=5, sink=ref))
    real = budget._append
    calls = {"n": 0}

    def flaky(sink: SampleStore, traces: list[budget.ForcedTrace]) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            if when == "after":
                real(sink, traces)
            raise OSError("killed")
        real(sink, traces)

    monkeypatch.setattr(budget, "_append", flaky)
    run = SampleStore.create(tmp_path / "run", {"model": "toy"})
    with pytest.raises(OSError, match="killed"):
        list(BudgetForcingSampler(ScriptedEngine(), PARAMS, TOY, batch_size=3).sample(TOY_PROBLEMS, 3, seed=5, sink=run))
    killed = SampleStore.open(tmp_path / "run")
    assert 0 < len(killed) < 12
    stored_before = {(s.problem_id, s.index, s.text) for s in killed.samples()}
    recorded = {json.loads(x)["problem_id"] for x in _records(killed)}
    stored_pids = {pid for pid, _, _ in stored_before}
    # after: the killed problem's records were written, its samples not
    assert (recorded - stored_pids != set()) == (when == "after")
    engine = ScriptedEngine()
    again = BudgetForcingSampler(engine, PARAMS, TOY)
    list(again.sample(TOY_PROBLEMS, 3, seed=5, sink=killed))
    assert _keys(killed) == _keys(ref)
    assert len(killed) == 12 and len({(s.problem_id, s.index) for s in killed.samples()}) == 12
    assert stored_before <= {(s.problem_id, s.index, s.text) for s in killed.samples()}
    assert _records(killed) == _records(ref)
    # problems whose samples and records were complete were not generated again
    done = {pid for pid in stored_pids if sum(k[0] == pid for k in stored_before) == 3}
    assert done and not any(r.problem_id in done for r, _ in engine.calls)
    assert {r.problem_id for r, _ in engine.calls} == {p.id for p in TOY_PROBLEMS} - done
    # a second resume has nothing to do and changes nothing
    idle = ScriptedEngine()
    list(BudgetForcingSampler(idle, PARAMS, TOY).sample(TOY_PROBLEMS, 3, seed=5, sink=killed))
    assert idle.calls == [] and _keys(killed) == _keys(ref) and _records(killed) == _records(ref)


def test_resume_refills_missing_records_and_a_cut_line(tmp_path: Path) -> None:
    """Samples stored but their records lost (or a line cut short): the problem is generated
    again from its seeds, its samples not stored twice, its records written once."""
    ref = SampleStore.create(tmp_path / "ref", {"model": "toy"})
    list(BudgetForcingSampler(ScriptedEngine(), PARAMS, TOY).sample(TOY_PROBLEMS, 3, seed=5, sink=ref))
    run = SampleStore.create(tmp_path / "run", {"model": "toy"})
    list(BudgetForcingSampler(ScriptedEngine(), PARAMS, TOY).sample(TOY_PROBLEMS, 3, seed=5, sink=run))
    f = run.path / "budget_forcing.jsonl"
    lines = f.read_text().splitlines()
    f.write_text("\n".join(lines[:-2]) + "\n" + lines[-2][:10])  # one record lost, one cut short
    list(BudgetForcingSampler(ScriptedEngine(), PARAMS, TOY).sample(TOY_PROBLEMS, 3, seed=5, sink=run))
    assert _keys(run) == _keys(ref) and len(run) == 12 and _records(run) == _records(ref)


def test_resume_with_other_settings_is_refused(tmp_path: Path) -> None:
    run = SampleStore.create(tmp_path / "run", {"model": "toy"})
    list(BudgetForcingSampler(ScriptedEngine(), PARAMS, TOY).sample(TOY_PROBLEMS[:2], 2, seed=5, sink=run))
    other = BudgetForcing(think_end="z", min_thinking=7, max_thinking=14, max_waits=2, answer_prefix="=", answer_tokens=4)
    for sampler, n, what in (
        (BudgetForcingSampler(ScriptedEngine(), PARAMS, other), 2, "budget forcing settings"),
        (BudgetForcingSampler(ScriptedEngine(), PARAMS, TOY, chat=True), 2, "chat"),
        (BudgetForcingSampler(ScriptedEngine(), PARAMS, TOY), 3, "traces per problem"),
    ):
        with pytest.raises(ConfigError, match=what) as e:
            sampler.sample(TOY_PROBLEMS[:2], n, seed=5, sink=SampleStore.open(run.path))
        assert "\n" not in str(e.value)
    assert len(SampleStore.open(run.path)) == 4


def test_chat_on_the_bundled_model_with_a_template_that_renders_the_plain_prompt() -> None:
    """The bundled model has no chat template: a tiny one (BOS and the user message, what the
    plain path tokenises) makes the chat context the plain one, so the traces are the same."""
    from ttscale.engines.hf import HFEngine
    from ttscale.evals import default_model_path, load_problems

    if not (Path(default_model_path()) / "config.json").is_file():
        pytest.skip("the bundled model is not built")
    f = BudgetForcing(think_end="\n####", min_thinking=24, max_thinking=40, max_waits=3, answer_prefix=" ",
                      answer_tokens=8)  # fmt: skip
    params = SamplingParams(temperature=1.0, max_tokens=64, seed=1)
    problems = load_problems("arith", limit=2)
    plain = BudgetForcingSampler(HFEngine(default_model_path(), device="cpu", threads=1), params, f)
    want = list(plain.sample(problems, 2))
    engine = HFEngine(default_model_path(), device="cpu", threads=1,
                      chat_template="{{ bos_token }}{{ messages[-1]['content'] }}")  # fmt: skip
    req = GenerationRequest(problem_id="p", messages=[{"role": "user", "content": "12+3="}], prefix="1 Wait")
    assert engine._context_ids(req) == plain.engine._context_ids(  # type: ignore[attr-defined]
        GenerationRequest(problem_id="p", prompt="12+3=", prefix="1 Wait")
    )
    chat = BudgetForcingSampler(engine, params, f, chat=True)
    got = list(chat.sample(problems, 2))
    assert chat.traces == plain.traces and any(t.waits for t in chat.traces)
    assert [[c.completion.text for c in r.candidates] for r in got] == [
        [c.completion.text for c in r.candidates] for r in want
    ]


def test_sample_budget_forcing_cli_resume(tmp_path: Path) -> None:
    """``--resume`` into a budget-forcing run: the stored problems untouched, the rest generated,
    every trace stored and recorded once; other settings refused in one line."""
    from typer.testing import CliRunner

    from ttscale.cli.app import app
    from ttscale.evals import default_model_path

    if not (Path(default_model_path()) / "config.json").is_file():
        pytest.skip("the bundled model is not built")
    runner = CliRunner()
    out = tmp_path / "bf"
    spec = r"think_end=\n####,min=8,max=16,max_waits=1,answer_prefix= ,answer_tokens=4"
    base = ["sample", "--engine", "hf", "--benchmark", "arith", "--n", "2", "--seed", "1", "--no-progress",
            "--out", str(out), "--budget-forcing"]  # fmt: skip
    r = runner.invoke(app, [*base, spec, "--limit", "2"])
    assert r.exit_code == 0, r.output
    first = {(s.problem_id, s.index): s.text for s in SampleStore.open(out).samples()}
    first_rows = (out / "budget_forcing.jsonl").read_text().splitlines()
    r = runner.invoke(app, [*base, spec, "--limit", "3", "--resume"])
    assert r.exit_code == 0, r.output
    store = SampleStore.open(out)
    keys = [(s.problem_id, s.index) for s in store.samples()]
    assert len(keys) == len(set(keys)) == 6
    assert all({(s.problem_id, s.index): s.text for s in store.samples()}[k] == t for k, t in first.items())
    rows = (out / "budget_forcing.jsonl").read_text().splitlines()
    assert rows[: len(first_rows)] == first_rows and len(rows) == 6
    assert {(json.loads(x)["problem_id"], json.loads(x)["index"]) for x in rows} == set(keys)
    r = runner.invoke(app, [*base, spec.replace("min=8", "min=9"), "--limit", "3", "--resume"])
    assert r.exit_code == 1 and "budget forcing settings" in r.output and "same settings" in r.output
    assert len(SampleStore.open(out)) == 6


def test_sample_budget_forcing_cli_chat(tmp_path: Path) -> None:
    """``--chat --system-prompt`` with a template given to the hf engine: recorded in the manifest;
    a resume without chat, or with another system prompt, refused in one line."""
    from typer.testing import CliRunner

    from ttscale.cli.app import app
    from ttscale.evals import default_model_path

    if not (Path(default_model_path()) / "config.json").is_file():
        pytest.skip("the bundled model is not built")
    runner = CliRunner()
    out = tmp_path / "bf"
    template = "chat_template={{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    base = ["sample", "--engine", "hf", "--benchmark", "arith", "--limit", "1", "--n", "2", "--seed", "1",
            "--no-progress", "--out", str(out), "--engine-opt", template, "--budget-forcing",
            r"think_end=\n####,min=8,max=16,max_waits=1,answer_prefix= ,answer_tokens=4"]  # fmt: skip
    r = runner.invoke(app, [*base, "--chat", "--system-prompt", "S: "])
    assert r.exit_code == 0, r.output
    assert "chat messages" in r.output
    m = SampleStore.open(out).manifest
    assert m["chat"] is True and m["system_prompt"] == "S: " and len(SampleStore.open(out)) == 2
    for extra, what in ((["--no-chat", "--system-prompt", "S: "], "chat"), (["--chat", "--system-prompt", "T: "], "system")):
        r = runner.invoke(app, [*base, *extra, "--resume"])
        assert r.exit_code == 1 and what in r.output and "same settings" in r.output, r.output
    r = runner.invoke(app, [*base, "--chat", "--system-prompt", "S: ", "--resume"])
    assert r.exit_code == 0 and len(SampleStore.open(out)) == 2
    assert len((out / "budget_forcing.jsonl").read_text().splitlines()) == 2
