"""LLM-judge verifier: yes/no log-probs read by token id (ALGORITHMS 9.2)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from ttscale.engines.base import Engine, GenerationRequest
from ttscale.errors import ConfigError
from ttscale.types import Completion, Problem, Sample, SamplingParams, VerdictStatus
from ttscale.verifiers.judge import DEFAULT_JUDGE_TEMPLATE, JudgeVerifier

YES, NO, OTHER = 11, 12, 99


class CharTokenizer:
    """One token per character (id = ord), the ScriptedEngine convention."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]


class TableEngine:
    """An Engine whose first-token top log-probs are given per sample index."""

    name = "table"

    def __init__(self, tables: Mapping[int, Mapping[int, float] | None]) -> None:
        self.tables = tables
        self.seen: list[tuple[GenerationRequest, SamplingParams]] = []

    def generate(
        self, requests: Sequence[GenerationRequest], params: SamplingParams
    ) -> list[list[Completion]]:
        out = []
        for req in requests:
            self.seen.append((req, params))
            comps = []
            for index in req.indices:
                table = self.tables[index]
                if table is None:
                    comps.append(Completion(problem_id=req.problem_id, index=index, text="?"))
                    continue
                tok, lp = max(table.items(), key=lambda kv: kv[1])
                comps.append(
                    Completion(
                        problem_id=req.problem_id,
                        index=index,
                        text="x",
                        token_ids=(tok,),
                        token_logprobs=(lp,),
                        top_logprobs=(dict(table),),
                    )
                )
            out.append(comps)
        return out

    def info(self) -> dict[str, Any]:
        return {"engine": self.name}

    def close(self) -> None:
        pass


PROBLEM = Problem(id="q", prompt="What is 2+3?", reference="5")


def samples(n: int) -> list[Sample]:
    return [Sample(problem_id="q", index=i, text=f"so {i}", answer=str(i)) for i in range(n)]


def judge(tables: Mapping[int, Mapping[int, float] | None], **kw: Any) -> JudgeVerifier:
    kw.setdefault("yes_token_id", YES)
    kw.setdefault("no_token_id", NO)
    return JudgeVerifier(TableEngine(tables), **kw)


def test_engine_fixture_conforms_to_protocol() -> None:
    assert isinstance(TableEngine({}), Engine)


def test_vector_9_2() -> None:
    j = judge({0: {YES: -0.25, NO: -1.60, OTHER: -3.0}})
    (v,) = j.verify(PROBLEM, samples(1))
    assert v.status is VerdictStatus.SCORED and v.correct is None
    assert v.score == pytest.approx(0.7941296282, abs=1e-10)
    assert v.meta["p_yes"] == pytest.approx(0.7941296282, abs=1e-10)
    assert v.meta["p_yes_raw"] == pytest.approx(0.7788007831, abs=1e-10)
    assert v.meta["lp_yes"] == -0.25 and v.meta["lp_no"] == -1.60
    assert v.answer == "0" and v.verifier == "judge" and v.detail == ""
    raw = judge({0: {YES: -0.25, NO: -1.60}}, score="p_yes_raw").verify(PROBLEM, samples(1))[0]
    assert raw.score == pytest.approx(0.7788007831, abs=1e-10)


def test_logit_form_of_vector_9_2() -> None:
    # z_yes = 2.0, z_no = 0.5 over a 3-token vocabulary: log-softmax, then the judge's rule.
    z = {YES: 2.0, NO: 0.5, OTHER: 1.0}
    lse = math.log(sum(math.exp(x) for x in z.values()))
    (v,) = judge({0: {k: x - lse for k, x in z.items()}}).verify(PROBLEM, samples(1))
    assert v.score == pytest.approx(0.8175744762, abs=1e-10)


def test_request_is_one_greedy_token_with_top_logprobs() -> None:
    j = judge({0: {YES: -0.1, NO: -2.0}}, top_logprobs=7)
    j.verify(PROBLEM, samples(1))
    req, params = j.engine.seen[0]
    assert params.max_tokens == 1 and params.temperature == 0.0 and params.logprobs == 7
    assert req.prompt == DEFAULT_JUDGE_TEMPLATE.format(
        problem=PROBLEM.prompt, response="so 0", answer="0", reference="5"
    )
    assert req.indices == (0,) and req.problem_id == "q"


def test_missing_tokens_are_counted_and_never_hidden() -> None:
    tables = {
        0: {YES: -0.25, NO: -1.60},
        1: {YES: -0.2, OTHER: -2.0},  # no missing -> P(yes) = 1
        2: {NO: -0.3, OTHER: -2.0},  # yes missing -> P(yes) = 0
        3: {OTHER: -0.01},  # both missing -> NaN, ERROR
        4: None,  # the engine returned no log-probs at all
    }
    j = judge(tables)
    v = j.verify(PROBLEM, samples(5))
    assert [x.status for x in v] == [VerdictStatus.SCORED] * 3 + [VerdictStatus.ERROR] * 2
    assert v[1].score == 1.0 and v[1].meta["lp_no"] is None and "lp_no = -inf" in v[1].detail
    assert v[2].score == 0.0 and v[2].meta["p_yes_raw"] == 0.0
    assert math.isnan(v[3].score) and "top-20" in v[3].detail
    assert math.isnan(v[4].score) and "no top log-probabilities" in v[4].detail
    assert j.missing_counts == {"yes": 1, "no": 1, "both": 1, "no_logprobs": 1}
    info = j.info()
    assert info["missing_counts"] == j.missing_counts and info["judged_count"] == 5
    j.verify(PROBLEM, samples(4)[3:])
    assert j.missing_counts["both"] == 2


def test_sampled_token_counts_even_if_absent_from_table() -> None:
    class Partial(TableEngine):
        def generate(self, requests, params):  # type: ignore[no-untyped-def]
            out = super().generate(requests, params)
            c = out[0][0]
            out[0][0] = Completion(
                problem_id=c.problem_id,
                index=c.index,
                text=c.text,
                token_ids=c.token_ids,
                token_logprobs=c.token_logprobs,
                top_logprobs=({NO: -1.60},),
            )
            return out

    j = JudgeVerifier(Partial({0: {YES: -0.25, NO: -1.60}}), yes_token_id=YES, no_token_id=NO)
    assert j.verify(PROBLEM, samples(1))[0].score == pytest.approx(0.7941296282, abs=1e-10)


def test_verify_many_is_one_engine_call() -> None:
    class Counting(TableEngine):
        calls = 0

        def generate(self, requests, params):  # type: ignore[no-untyped-def]
            Counting.calls += 1
            return super().generate(requests, params)

    tables = {0: {YES: -0.25, NO: -1.60}, 1: {YES: -1.6, NO: -0.25}}
    j = JudgeVerifier(Counting(tables), yes_token_id=YES, no_token_id=NO)
    p2 = Problem(id="r", prompt="Other?")
    out = j.verify_many([(PROBLEM, samples(2)), (p2, []), (p2, samples(1))])
    assert Counting.calls == 1 and [len(v) for v in out] == [2, 0, 1]
    assert out[2][0].problem_id == "r" and out[2][0].score == pytest.approx(0.7941296282)
    assert j.engine.seen[2][0].prompt.startswith(DEFAULT_JUDGE_TEMPLATE.split("{")[0])
    assert "Other?" in j.engine.seen[2][0].prompt


def test_threshold_gives_pass_fail() -> None:
    tables = {0: {YES: -0.25, NO: -1.60}, 1: {YES: -1.6, NO: -0.25}, 2: {YES: -0.7, NO: -0.7}}
    v = judge(tables, threshold=0.5).verify(PROBLEM, samples(3))
    assert [x.status for x in v] == [VerdictStatus.PASS, VerdictStatus.FAIL, VerdictStatus.PASS]
    assert [x.correct for x in v] == [True, False, True]


def test_token_ids_resolved_once_from_a_tokenizer() -> None:
    eng = TableEngine({0: {ord("Y"): -0.25, ord("N"): -1.60}})
    j = JudgeVerifier(eng, yes_token="Y", no_token="N", tokenizer=CharTokenizer())
    assert (j.yes_token_id, j.no_token_id) == (ord("Y"), ord("N"))
    assert j.verify(PROBLEM, samples(1))[0].score == pytest.approx(0.7941296282, abs=1e-10)
    eng.tokenizer = CharTokenizer()  # found on the engine when not passed
    assert JudgeVerifier(eng, yes_token="Y", no_token="N").yes_token_id == ord("Y")


def test_configuration_errors() -> None:
    with pytest.raises(ConfigError, match="exactly one token"):
        JudgeVerifier(TableEngine({}), tokenizer=CharTokenizer())  # " Yes" is 4 characters
    with pytest.raises(ConfigError, match="tokenizer"):
        JudgeVerifier(TableEngine({}))
    with pytest.raises(ConfigError, match="same token"):
        JudgeVerifier(TableEngine({}), yes_token_id=3, no_token_id=3)
    with pytest.raises(ConfigError, match="unknown fields"):
        judge({}, template="{problem} {solution}")
    with pytest.raises(ConfigError, match="candidate"):
        judge({}, template="{problem}?")
    with pytest.raises(ConfigError, match="top_logprobs"):
        judge({}, top_logprobs=0)
    with pytest.raises(ConfigError, match="threshold"):
        judge({}, threshold=1.5)


def test_chat_mode_sends_messages() -> None:
    j = judge({0: {YES: -0.1, NO: -2.0}}, chat=True, template="Q: {problem}\nA: {answer}\nCorrect?")
    j.verify(PROBLEM, samples(1))
    req, _ = j.engine.seen[0]
    assert req.prompt is None and req.messages[0]["content"] == "Q: What is 2+3?\nA: 0\nCorrect?"


def test_with_scripted_engine_char_tokens() -> None:
    from ttscale.engines.scripted import ScriptedEngine

    eng = ScriptedEngine(responses=lambda req, i, seed, p: "Y")
    j = JudgeVerifier(eng, yes_token="Y", no_token="N", tokenizer=CharTokenizer(), top_logprobs=3)
    v = j.verify(PROBLEM, samples(3))
    assert len(v) == 3
    for x in v:
        # The scripted table always holds the sampled "Y"; "N" is present or not: P(yes) in (0, 1].
        assert x.status is VerdictStatus.SCORED and 0.0 < x.score <= 1.0
    assert j.missing_counts["both"] == 0 and j.missing_counts["yes"] == 0


# ----------------------------------------------------------------------------- a real model


def test_hf_engine_end_to_end(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    torch = pytest.importorskip("torch")
    from ttscale.engines.hf import HFEngine

    engine = HFEngine(tiny_model_dir, batch_size=4)
    vocab = len(engine.tokenizer)
    # Char-level tokenizer: "Y"/"N" are single tokens. A top-k covering the vocabulary always
    # holds both, so P(yes) must equal the two-logit softmax of a plain forward pass.
    j = JudgeVerifier(engine, yes_token="Y", no_token="N", top_logprobs=vocab)
    assert j.name == "judge:tiny-llama"
    assert j.yes_token_id == engine.tokenizer.convert_tokens_to_ids("Y")
    cands = samples(3)
    verdicts = j.verify(PROBLEM, cands)
    for s, v in zip(cands, verdicts, strict=True):
        ids = engine.tokenizer(j.prompt_for(PROBLEM, s))["input_ids"]
        with torch.inference_mode():
            z = engine.model(input_ids=torch.tensor([ids])).logits[0, -1].double()
        want = torch.sigmoid(z[j.yes_token_id] - z[j.no_token_id]).item()
        lp = torch.log_softmax(z, -1)
        assert v.status is VerdictStatus.SCORED
        assert v.score == pytest.approx(want, abs=1e-6)
        assert v.meta["p_yes_raw"] == pytest.approx(lp[j.yes_token_id].exp().item(), abs=1e-6)
    assert j.missing_counts == {"yes": 0, "no": 0, "both": 0, "no_logprobs": 0}
    # With top-1 at most one of the two tokens can be present: every case is counted.
    j1 = JudgeVerifier(engine, yes_token="Y", no_token="N", top_logprobs=1)
    out = j1.verify(PROBLEM, cands)
    c = j1.missing_counts
    assert c["yes"] + c["no"] + c["both"] == len(cands)
    assert sum(v.status is VerdictStatus.ERROR for v in out) == c["both"]
    engine.close()


def test_factory_builds_a_judge_on_an_engine(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("torch")
    from ttscale.verifiers.base import make_verifier

    j = make_verifier(
        f"judge:{tiny_model_dir}", engine_kind="hf", yes_token="Y", no_token="N", threshold=0.5
    )
    assert isinstance(j, JudgeVerifier) and j.engine.name == "hf" and j.threshold == 0.5
    (v,) = j.verify(PROBLEM, samples(1))
    assert v.status in (VerdictStatus.PASS, VerdictStatus.FAIL, VerdictStatus.ERROR)
    j.engine.close()


def test_verify_names_the_judge_engine_and_model(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    """`ttscale verify --verifier judge:...` prints the judge's engine line (issue 7)."""
    pytest.importorskip("torch")
    from ttscale.verifiers.base import make_verifier
    from ttscale.verifiers.runner import model_lines as _model_lines

    j = make_verifier(f"judge:{tiny_model_dir}", engine_kind="hf", yes_token="Y", no_token="N")
    try:
        (line,) = _model_lines(j)
    finally:
        j.engine.close()
    assert line.startswith("engine: hf (transformers ")
    assert line.endswith(f", model: {tiny_model_dir} (judge of judge:tiny-llama)")
