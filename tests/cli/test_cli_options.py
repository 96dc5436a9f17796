"""One vocabulary of options across ``sample``, ``run``, ``smc`` and ``demo`` (issue 15)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from ttscale.cli.app import app
from ttscale.evals import load_problems
from ttscale.store import SampleStore

runner = CliRunner()

SCRIPTED = ["--engine", "scripted", "--model", "toy", "--benchmark", "arith", "--no-progress"]
SMC = ["smc", "--engine", "scripted", "--model", "toy", "--benchmark", "arith", "--no-progress",
       "--potential", "arith-prm", "--tokens-per-step", "4", "--max-tokens", "12"]  # fmt: skip


def invoke(*args: Any):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(r: Any, needle: str) -> None:
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.output


def params_of(command: str) -> dict[str, Any]:
    import typer.main

    group = typer.main.get_command(app)
    return {p.name: p for p in group.commands[command].params}  # type: ignore[attr-defined]


def rows(run: Path) -> list[tuple[Any, ...]]:
    t = SampleStore.open(run).table(["text", "seed", "num_tokens"]).to_pylist()
    return [(r["problem_id"], r["index"], r["text"], r["seed"], r["num_tokens"]) for r in t]


def answer_table(limit: int, n: int, seed: int) -> str:
    """Scripted texts per problem: the right answer, a wrong one or none, at random."""
    rng = np.random.default_rng(seed)
    table = {}
    for p in load_problems("arith", limit=limit):
        ref = int(p.reference)
        vals = [ref, ref + 1, None]
        table[p.id] = [
            f"x\n#### {v}" if v is not None else "no idea"
            for v in (vals[c] for c in rng.choice(3, size=n, p=[0.5, 0.3, 0.2]))
        ]
    return "responses=" + json.dumps(table)


def pass_at_k(n: int, c: int, k: int) -> float:
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


# -- one options object --------------------------------------------------------------------------


def test_sample_run_and_smc_share_one_definition_of_each_option() -> None:
    from ttscale.cli.sample_cmds import EngineOptions, SampleOptions

    sample, run, smc = params_of("sample"), params_of("run"), params_of("smc")
    shared = [f for f in SampleOptions.__dataclass_fields__ if f != "given"]
    assert set(shared) == set(sample)  # sample is exactly the shared options
    for name in shared:
        a, b = sample[name], run[name]
        assert (a.opts, a.secondary_opts, a.help, a.default, a.hidden) == (
            b.opts, b.secondary_opts, b.help, b.default, b.hidden
        ), name  # fmt: skip
    for name in EngineOptions.__dataclass_fields__:
        if name == "given":
            continue
        a, b = sample[name], smc[name]
        assert (a.opts, a.help, a.default) == (b.opts, b.help, b.default), name
    # run also takes what verify and curve take
    for opt in ("--adaptive", "--prune", "--shard", "--verifier", "--methods", "--k", "--plot"):
        assert any(opt in p.opts for p in run.values()), opt
    # smc takes the sampling options of sample
    for opt in ("--logprobs", "--batch-size", "--top-k", "--stop", "--shard", "--base-url"):
        assert any(opt in p.opts for p in smc.values()), opt
    # demo limits problems with --limit, as the others do
    assert "--limit" in params_of("demo")["limit"].opts


def test_curve_and_replay_share_one_tie_default() -> None:
    from ttscale.select import DEFAULT_TIE

    assert params_of("curve")["tie"].default == DEFAULT_TIE == params_of("replay")["tie"].default


# -- run: everything sample, verify and curve take ------------------------------------------------


def test_run_adaptive_records_what_sample_records_and_reports_as_curve(tmp_path: Path) -> None:
    common = [*SCRIPTED, "--limit", "5", "--n", "8", "--seed", "2", "--adaptive", "esc:window=2",
              "--engine-opt", answer_table(5, 8, seed=3)]  # fmt: skip
    a, b = tmp_path / "run", tmp_path / "sample"
    r = invoke("run", *common, "--out", a)
    assert r.exit_code == 0, r.output
    assert invoke("sample", *common, "--out", b).exit_code == 0
    assert invoke("verify", b).exit_code == 0
    assert rows(a) == rows(b)
    assert (a / "adaptive.jsonl").read_text() == (b / "adaptive.jsonl").read_text()
    ma, mb = SampleStore.open(a).manifest, SampleStore.open(b).manifest
    assert ma["adaptive"] == mb["adaptive"] and ma["sampling"] == mb["sampling"]
    pa, pb = SampleStore.open(a).pool(), SampleStore.open(b).pool()
    assert np.array_equal(pa.correct, pb.correct)
    # the report is `ttscale curve RUN`'s, whatever that command makes of the run kind
    c = invoke("curve", a)
    assert c.exit_code == 0, c.output
    table = [x for x in c.stdout.splitlines() if x.strip()]
    assert table and all(x in r.stdout for x in table), (c.stdout, r.stdout)
    assert (a / "coverage.png").stat().st_size > 1000


def test_run_prune_records_what_sample_records(tmp_path: Path) -> None:
    common = [*SCRIPTED, "--limit", "4", "--n", "6", "--max-tokens", "30", "--seed", "5",
              "--prune", "lowprob:threshold=-3.2,min_tokens=4"]  # fmt: skip
    a, b = tmp_path / "run", tmp_path / "sample"
    r = invoke("run", *common, "--out", a)
    assert r.exit_code == 0, r.output
    assert "pruned" in r.stdout
    assert invoke("sample", *common, "--out", b).exit_code == 0
    assert rows(a) == rows(b)
    assert (a / "pruning.jsonl").read_text() == (b / "pruning.jsonl").read_text()
    keys = ("rule", "pruned", "traces", "generated_tokens")
    pa, pb = SampleStore.open(a).manifest["pruning"], SampleStore.open(b).manifest["pruning"]
    assert {k: pa[k] for k in keys} == {k: pb[k] for k in keys}
    assert SampleStore.open(a).verifiers()  # verified, so `curve` can report it


def test_run_verifier_and_methods_keep_the_spec_form(tmp_path: Path) -> None:
    out = tmp_path / "run"
    n = 6
    r = invoke("run", *SCRIPTED, "--limit", "4", "--n", n, "--out", out, "--k", "1,2,6",
               "--engine-opt", answer_table(4, n, seed=1), "--verifier", "arith-prm:last",
               "--methods", "coverage")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "samples with arith-prm:last" in r.stdout
    curve = json.loads((out / "curve.json").read_text())
    assert curve["verifier"] == "arith-prm:last"
    assert list(curve["methods"]) == ["coverage"]
    store = SampleStore.open(out)
    pool = store.pool("arith-prm")
    want = [
        np.mean([pass_at_k(n, int(pool.problem(p).correct.sum()), k) for p in range(pool.num_problems)])
        for k in (1, 2, 6)
    ]
    np.testing.assert_allclose(curve["methods"]["coverage"]["mean"], want, atol=1e-12)
    # a typo in --verifier or --methods fails before sampling
    for extra, needle in ((["--verifier", "nope"], "unknown verifier 'nope'"),
                          (["--methods", "cov"], "cov")):  # fmt: skip
        bad = tmp_path / "bad"
        one_line_error(invoke("run", *SCRIPTED, "--limit", "2", "--out", bad, *extra), needle)
        assert not bad.exists()


def test_run_shards_verify_their_part_and_the_last_draws_the_curve(tmp_path: Path) -> None:
    common = [*SCRIPTED, "--limit", "5", "--n", "4", "--seed", "7", "--k", "1,2,4",
              "--engine-opt", answer_table(5, 4, seed=4)]  # fmt: skip
    out = tmp_path / "sharded"
    r0 = invoke("run", *common, "--out", out, "--shard", "0/2")
    assert r0.exit_code == 0, r0.output
    assert "shard 0/2 is sampled and verified" in r0.stdout
    assert not (out / "curve.json").exists()
    store = SampleStore.open(out)
    ids = sorted(p.id for p in load_problems("arith", limit=5))
    verified = {pid for pid, _ in store.verified_keys(store.verifiers()[0])}
    assert verified == set(ids[0::2])
    r1 = invoke("run", *common, "--out", out, "--shard", "1/2", "--resume")
    assert r1.exit_code == 0, r1.output
    whole = tmp_path / "whole"
    assert invoke("run", *common, "--out", whole).exit_code == 0
    assert rows(out) == rows(whole)
    got = json.loads((out / "curve.json").read_text())["methods"]
    want = json.loads((whole / "curve.json").read_text())["methods"]
    assert {m: c["mean"] for m, c in got.items()} == {m: c["mean"] for m, c in want.items()}


# -- smc: the sampling options of sample, each reaching the engine or the sampler ---------------


@pytest.fixture
def engines(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, dict[str, Any]]]:
    """Every engine the CLI builds, with the options it was built with (scripted underneath)."""
    import ttscale.engines as engines_mod
    from ttscale.engines.scripted import ScriptedEngine

    class Recording(ScriptedEngine):
        """Also records how many requests each ``generate`` call carried (batch ``generate``
        only: the engine loop coalesces what is pending into calls, so their sizes show it)."""

        open_loop = None

        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self.call_sizes: list[int] = []

        def generate(self, requests: Any, params: Any, **kw: Any) -> Any:
            self.call_sizes.append(len(requests))
            return super().generate(requests, params, **kw)

    made: list[tuple[Any, dict[str, Any]]] = []

    def make(kind: str, model: Any, **kw: Any) -> Any:
        eng = Recording(**{k: v for k, v in kw.items() if k != "base_urls"})
        made.append((eng, {"kind": kind, **kw}))
        return eng

    monkeypatch.setattr(engines_mod, "make_engine", make)
    return made


def test_smc_sampling_options_reach_the_engine_and_sampler(
    tmp_path: Path, engines: list[tuple[Any, dict[str, Any]]]
) -> None:
    out = tmp_path / "smc"
    r = invoke(*SMC, "--limit", "4", "--particles", "4", "--no-verify", "--out", out,
               "--logprobs", "2", "--top-k", "5", "--batch-size", "3", "--stop", ".",
               "--shard", "1/2")  # fmt: skip
    assert r.exit_code == 0, r.output
    (eng, _), = engines
    assert eng.calls
    for _, params in eng.calls:
        assert params.logprobs == 2 and params.top_k == 5 and "." in params.stop
    # --batch-size: at most 3 particles extended per engine call (4 live ones: 3 + 1)
    assert max(eng.call_sizes) == 3
    store = SampleStore.open(out)
    ids = [p.id for p in load_problems("arith", limit=4)]
    assert sorted(store.problem_ids()) == sorted(ids[1::2])  # --shard 1/2
    # --stop: a particle whose step ended at "." is finished: never extended again
    samples = list(store.samples())
    parents = {(s.problem_id, s.parent) for s in samples if s.parent is not None}
    stopped = [s for s in samples if s.text.endswith(".")]
    assert stopped, "the toy model writes '.' often enough for this test"
    assert all((s.problem_id, s.index) not in parents for s in stopped)


def test_smc_search_batch_size_groups_problems(
    tmp_path: Path, engines: list[tuple[Any, dict[str, Any]]]
) -> None:
    base = [*SMC, "--limit", "3", "--particles", "4", "--search", "beam", "--width", "2",
            "--no-verify"]  # fmt: skip
    assert invoke(*base, "--out", tmp_path / "a", "--batch-size", "4").exit_code == 0
    assert invoke(*base, "--out", tmp_path / "b").exit_code == 0
    (alone, _), (together, _) = engines
    assert max(_problems_per_call(alone)) == 1  # 4 samples a call: one problem's beams
    assert max(_problems_per_call(together)) == 3


def _problems_per_call(eng: Any) -> list[int]:
    out, pos = [], 0
    for size in eng.call_sizes:
        out.append(len({req.problem_id for req, _ in eng.calls[pos : pos + size]}))
        pos += size
    return out


def test_smc_base_url_reaches_the_openai_engine(
    tmp_path: Path, engines: list[tuple[Any, dict[str, Any]]]
) -> None:
    bad = invoke(*SMC, "--limit", "1", "--particles", "2", "--base-url", "http://h:1/v1",
                 "--out", tmp_path / "x")  # fmt: skip
    one_line_error(bad, "--base-url applies to --engine openai only")
    args = [a if a != "scripted" else "openai" for a in SMC]
    r = invoke(*args, "--limit", "1", "--particles", "2", "--no-verify", "--out", tmp_path / "y",
               "--base-url", "http://h:1/v1", "--base-url", "http://h:2/v1")  # fmt: skip
    assert r.exit_code == 0, r.output
    (_, options), = engines
    assert options["kind"] == "openai"
    assert options["base_urls"] == ["http://h:1/v1", "http://h:2/v1"]


def test_search_best_of_n_is_the_one_name(tmp_path: Path) -> None:
    base = [*SMC, "--limit", "1", "--particles", "2", "--no-verify"]
    r = invoke(*base, "--search", "bon", "--out", tmp_path / "bon")
    one_line_error(r, "--search best_of_n")
    assert not (tmp_path / "bon").exists()
    r = invoke(*base, "--search", "best_of_n", "--out", tmp_path / "ok")
    assert r.exit_code == 0, r.output
    assert SampleStore.open(tmp_path / "ok").manifest["search"]["search"] == "best_of_n"


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--search", "beam", "--fk", "pf"], "--search beam does not take --fk"),
        (["--search", "dvts", "--lambda", "3"], "--search dvts does not take --lambda"),
        (["--search", "beam", "--resample", "multinomial"], "does not take --resample"),
        (["--search", "beam", "--ess", "0.3", "--fk", "none"], "does not take --fk, --ess"),
        (["--search", "best_of_n", "--plot-dir", "plots"], "does not take --plot-dir"),
        (["--search", "best_of_n", "--width", "2"], "best_of_n draws N independent solutions"),
        (["--width", "2"], "--width is the expansions per beam of --search"),
    ],
)
def test_options_the_chosen_method_does_not_take_are_refused(
    tmp_path: Path, extra: list[str], needle: str
) -> None:
    out = tmp_path / "x"
    one_line_error(invoke(*SMC, "--limit", "1", "--particles", "4", "--out", out, *extra), needle)
    assert not out.exists()


# -- rules -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["sample", *SCRIPTED, "--adaptive", "nope"],
         ["unknown adaptive rule 'nope'", "esc", "deepconf-online", "lowprob", "selfeval"]),
        (["sample", *SCRIPTED, "--adaptive", "lowprob:-1.5"],
         ["lowprob is a pruning rule", "--prune lowprob:-1.5"]),
        (["sample", *SCRIPTED, "--prune", "beta:0.9"],
         ["beta is a stopping rule", "--adaptive beta:0.9"]),
        (["run", *SCRIPTED, "--adaptive", "nope"], ["deepconf-online", "msprt"]),
    ],
)  # fmt: skip
def test_rule_errors_name_every_rule_and_its_option(
    tmp_path: Path, args: list[str], needles: list[str]
) -> None:
    out = tmp_path / "x"
    r = invoke(*args, "--out", out)
    for needle in needles:
        one_line_error(r, needle)
    assert not out.exists()


def test_replay_rule_error_names_the_pruning_rules(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert invoke("sample", *SCRIPTED, "--limit", "1", "--n", "2", "--out", run).exit_code == 0
    r = invoke("replay", run, "--rule", "nope")
    for needle in ("unknown rule 'nope'", "beta", "deepconf-online", "lowprob"):
        one_line_error(r, needle)


# -- Ctrl-C: the hint is a complete command -------------------------------------------------------


class _Interrupting:
    """An engine that raises KeyboardInterrupt (Ctrl-C) on its ``after``-th call, or once it
    has delivered ``results`` requests' results."""

    def __init__(self, inner: Any, after: int, results: int | None = None) -> None:
        self.inner, self.after, self.count = inner, after, 0
        self.results, self.delivered = results, 0

    def generate(self, requests: Any, params: Any, *, on_result: Any = None, **kw: Any) -> Any:
        self.count += 1
        if self.count >= self.after:
            raise KeyboardInterrupt

        def counted(pos: int, comps: Any) -> None:
            if on_result is not None:
                on_result(pos, comps)
            self.delivered += 1
            if self.results is not None and self.delivered >= self.results:
                raise KeyboardInterrupt

        return self.inner.generate(requests, params, on_result=counted, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _interrupt_then_continue(
    monkeypatch: pytest.MonkeyPatch, args: list[str], out: Path, after: int
) -> str:
    import ttscale.engines as engines_mod

    real = engines_mod.make_engine
    with monkeypatch.context() as m:
        m.setattr(
            engines_mod, "make_engine", lambda *a, **kw: _Interrupting(real(*a, **kw), after)
        )
        r = invoke(*args, "--out", out)
    assert r.exit_code == 130, r.output
    hint = re.search(r"continue with: (.+)$", r.stderr.strip().splitlines()[-1])
    assert hint, r.stderr
    words = shlex.split(hint.group(1))
    assert words[:2] == ["ttscale", args[0]]
    again = runner.invoke(app, words[1:])
    assert again.exit_code == 0, again.output
    return hint.group(1)


def test_sample_ctrl_c_hint_continues_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["sample", *SCRIPTED, "--limit", "6", "--n", "4", "--max-tokens", "12", "--seed", "3",
            "--batch-size", "4", "--engine-opt", "eos_logprob=-2.5"]  # fmt: skip
    hint = _interrupt_then_continue(monkeypatch, args, tmp_path / "cut", after=3)
    # the engine and its options are not in the run: the hint names them
    assert "--engine scripted" in hint and "--batch-size 4" in hint and "eos_logprob" in hint
    assert invoke(*args, "--out", tmp_path / "whole").exit_code == 0
    assert rows(tmp_path / "cut") == rows(tmp_path / "whole")


def test_smc_ctrl_c_hint_continues_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = [*SMC, "--limit", "3", "--particles", "4", "--fk", "pf", "--seed", "4", "--no-verify"]
    # the problems' particles share each engine call: Ctrl-C at the second, mid-run
    hint = _interrupt_then_continue(monkeypatch, args, tmp_path / "cut", after=2)
    assert "--potential arith-prm" in hint and "--fk pf" in hint
    assert invoke(*args, "--out", tmp_path / "whole").exit_code == 0
    assert rows(tmp_path / "cut") == rows(tmp_path / "whole")


def test_demo_ctrl_c_hint_continues_with_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ttscale.cli.sample_cmds as sc

    monkeypatch.setattr(sc, "_bundled_model", lambda: "toy")  # the scripted engine's model
    args = ["demo", "--engine", "scripted", "--limit", "4", "--n", "4", "--seed", "2",
            "--no-progress"]  # fmt: skip
    import ttscale.engines as engines_mod

    real = engines_mod.make_engine
    with monkeypatch.context() as m:
        m.setattr(
            engines_mod, "make_engine", lambda *a, **kw: _Interrupting(real(*a, **kw), 9, 2)
        )
        r = invoke(*args, "--out", tmp_path / "cut")
    assert r.exit_code == 130, r.output
    hint = r.stderr.strip().splitlines()[-1].split("continue with: ")[1]
    assert hint == shlex.join(["ttscale", "run", "--engine", "scripted", "--limit", "4",
                               "--n", "4", "--seed", "2", "--no-progress",
                               "--out", str(tmp_path / "cut"), "--resume"])  # fmt: skip
    again = runner.invoke(app, shlex.split(hint)[1:])
    assert again.exit_code == 0, again.output
    assert invoke(*args, "--out", tmp_path / "whole").exit_code == 0
    assert rows(tmp_path / "cut") == rows(tmp_path / "whole")


def test_smc_bad_resample_scheme_fails_before_the_engine(
    tmp_path: Path, engines: list[tuple[Any, dict[str, Any]]]
) -> None:
    out = tmp_path / "x"
    r = invoke(*SMC, "--limit", "1", "--particles", "2", "--resample", "coin", "--out", out)
    one_line_error(r, "--resample must be one of")
    assert not engines and not out.exists()
