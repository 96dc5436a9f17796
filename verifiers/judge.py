"""LLM-as-judge verifier: P(yes) of a yes/no question read from one generated token's top log-probs.

ALGORITHMS 9.2. The judge asks "is this solution correct?" and generates a single token with
``logprobs=top_logprobs``. From the returned top-k table (token id -> natural-log probability over
the full vocabulary) it reads ``lp_yes`` and ``lp_no`` for two fixed token ids and scores

    P(yes) = exp(lp_yes) / (exp(lp_yes) + exp(lp_no)) = sigmoid(lp_yes - lp_no)

(the log-partition cancels). A token absent from the top-k counts as ``lp = -inf`` (so P(yes) is
1 or 0); both absent leaves P(yes) undefined: the verdict is ``ERROR`` with a NaN score, and the
case is counted in :attr:`JudgeVerifier.missing_counts`, never hidden. The unrestricted
``exp(lp_yes)`` is a different score and is reported beside it (``meta["p_yes_raw"]``).
"""

from __future__ import annotations

import logging
import math
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ttscale.engines.base import Engine, GenerationRequest
from ttscale.errors import ConfigError, VerifierError
from ttscale.select.yesno import yes_probability
from ttscale.types import Completion, Problem, Sample, SamplingParams, Verdict, VerdictStatus
from ttscale.validation import check_choice, check_int, check_number

__all__ = ["DEFAULT_JUDGE_TEMPLATE", "JudgeVerifier"]

logger = logging.getLogger(__name__)

#: Fields a judge template may use: ``{problem}`` (the problem prompt), ``{response}`` (the
#: candidate's full text), ``{answer}`` (its extracted answer, or "(none)") and ``{reference}``
#: (the gold answer, for reference-guided judging).
TEMPLATE_FIELDS = ("problem", "response", "answer", "reference")

DEFAULT_JUDGE_TEMPLATE = (
    "Decide whether the proposed solution to the problem is correct.\n\n"
    "Problem:\n{problem}\n\n"
    "Proposed solution:\n{response}\n\n"
    "Is the proposed solution correct? Answer Yes or No.\n"
    "Answer:"
)

_SCORES = ("p_yes", "p_yes_raw")


def _template_fields(template: str) -> set[str]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ConfigError(f"judge template is not a valid format string: {e}") from e
    return {name for _, name, _, _ in parsed if name is not None}


class JudgeVerifier:
    """Score candidates with a yes/no LLM judge run on any ttscale engine.

    ``yes_token`` / ``no_token`` are strings that must each be exactly one token of the judge's
    tokenizer (fix one convention per model: after ``"Answer:"`` a Llama/Qwen BPE continues with
    ``" Yes"``; in a chat turn it starts with ``"Yes"``). Their ids are resolved once, from
    ``tokenizer`` (an object with ``encode(text, add_special_tokens=False)``, or a path/name for
    ``transformers.AutoTokenizer``), else from the engine's ``tokenizer`` attribute or
    ``get_tokenizer()``; ``yes_token_id`` / ``no_token_id`` skip the lookup.

    ``threshold``: with a value, ``correct = P(yes) >= threshold`` and the status is PASS/FAIL;
    ``None`` (default) is scores-only (status SCORED). ``score`` picks the verdict's score:
    ``"p_yes"`` (two-token softmax, default) or ``"p_yes_raw"`` (``exp(lp_yes)``); both are in
    ``meta``. ``chat=True`` sends the rendered template as one user message (the engine applies
    the chat template) instead of raw text.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        template: str = DEFAULT_JUDGE_TEMPLATE,
        yes_token: str = " Yes",
        no_token: str = " No",
        top_logprobs: int = 20,
        threshold: float | None = None,
        score: str = "p_yes",
        tokenizer: Any = None,
        yes_token_id: int | None = None,
        no_token_id: int | None = None,
        chat: bool = False,
        seed: int = 0,
        name: str | None = None,
        cost: float = 10.0,
    ) -> None:
        fields = _template_fields(template)
        unknown = fields - set(TEMPLATE_FIELDS)
        if unknown:
            raise ConfigError(
                f"judge template uses unknown fields {sorted(unknown)}; allowed: {list(TEMPLATE_FIELDS)}"
            )
        if not fields & {"response", "answer"}:
            raise ConfigError("judge template must show the candidate: use {response} or {answer}")
        check_int("top_logprobs", top_logprobs, min=1)
        check_number("threshold", threshold, low=0.0, high=1.0, allow_none=True)
        check_choice("score", score, _SCORES)
        check_number("cost", cost, low=0.0, finite=True)
        self.engine = engine
        self.template = template
        self.yes_token = yes_token
        self.no_token = no_token
        self.top_logprobs = top_logprobs
        self.threshold = None if threshold is None else float(threshold)
        self.score = score
        self.chat = chat
        self.name = name or _default_name(engine)
        self.cost = float(cost)
        self.params = SamplingParams(
            n=1, temperature=0.0, max_tokens=1, logprobs=top_logprobs, seed=seed
        )
        encode = (
            None
            if (yes_token_id is not None and no_token_id is not None)
            else _encoder(tokenizer, engine)
        )
        self.yes_token_id = self._resolve(yes_token, yes_token_id, encode, "yes_token")
        self.no_token_id = self._resolve(no_token, no_token_id, encode, "no_token")
        if self.yes_token_id == self.no_token_id:
            raise ConfigError(
                f"yes_token {yes_token!r} and no_token {no_token!r} map to the same token id "
                f"{self.yes_token_id}"
            )
        #: Candidates whose yes/no tokens were absent from the top-k, and other read failures:
        #: ``yes`` (only yes missing: P(yes)=0), ``no`` (only no missing: P(yes)=1), ``both``
        #: (NaN score, ERROR verdict), ``no_logprobs`` (the engine returned no top-k table).
        self.missing_counts: dict[str, int] = {"yes": 0, "no": 0, "both": 0, "no_logprobs": 0}
        self.judged_count = 0

    def _resolve(
        self, text: str, given: int | None, encode: Callable[[str], list[int]] | None, what: str
    ) -> int:
        if given is not None:
            return int(check_int(f"{what}_id", given, min=0))
        assert encode is not None  # built whenever an id is not given
        ids = list(encode(text))
        if len(ids) != 1:
            raise ConfigError(
                f"{what} {text!r} is {len(ids)} tokens {ids} for the judge's tokenizer; pick a "
                f"string that is exactly one token (e.g. with or without a leading space)"
            )
        return int(ids[0])

    # ------------------------------------------------------------------ judging

    def prompt_for(self, problem: Problem, sample: Sample) -> str:
        """The judge prompt for one candidate (the template filled in)."""
        return self.template.format_map(
            {
                "problem": problem.prompt,
                "response": sample.text,
                "answer": sample.answer if sample.answer is not None else "(none)",
                "reference": "" if problem.reference is None else str(problem.reference),
            }
        )

    def _request(self, problem: Problem, sample: Sample) -> GenerationRequest:
        text = self.prompt_for(problem, sample)
        if self.chat:
            return GenerationRequest(
                problem_id=problem.id,
                messages=[{"role": "user", "content": text}],
                indices=(sample.index,),
            )
        return GenerationRequest(problem_id=problem.id, prompt=text, indices=(sample.index,))

    def verify(self, problem: Problem, samples: Sequence[Sample]) -> list[Verdict]:
        """One verdict per sample, in order (one single-token generation per sample, batched)."""
        return self.verify_many([(problem, samples)])[0]

    def verify_many(self, items: Sequence[tuple[Problem, Sequence[Sample]]]) -> list[list[Verdict]]:
        """:meth:`verify` for several problems in one engine call."""
        flat = [(p, s) for p, samples in items for s in samples]
        if not flat:
            return [[] for _ in items]
        requests = [self._request(p, s) for p, s in flat]
        outputs = self.engine.generate(requests, self.params)
        if len(outputs) != len(requests):
            raise VerifierError(
                f"judge engine returned {len(outputs)} results for {len(requests)} requests"
            )
        verdicts = iter(
            self._verdict(p, s, comps[0] if comps else None)
            for (p, s), comps in zip(flat, outputs, strict=True)
        )
        return [[next(verdicts) for _ in samples] for _, samples in items]

    def _top_table(self, completion: Completion | None) -> Mapping[int, float] | None:
        if completion is None or not completion.top_logprobs:
            return None
        table = dict(completion.top_logprobs[0])
        # The sampled token's log-prob belongs to the table even if the engine left it out.
        if completion.token_ids and completion.token_logprobs:
            table.setdefault(completion.token_ids[0], completion.token_logprobs[0])
        return table

    def _verdict(self, problem: Problem, sample: Sample, completion: Completion | None) -> Verdict:
        self.judged_count += 1
        base = dict(
            problem_id=problem.id, index=sample.index, verifier=self.name, answer=sample.answer
        )
        # what judging this sample cost the judge's engine (``ttscale serve`` adds it to usage)
        cost = {
            "judge_generated_tokens": 0 if completion is None else int(completion.num_tokens),
            "judge_prompt_tokens": 0 if completion is None else int(completion.prompt_tokens or 0),
        }
        table = self._top_table(completion)
        if table is None:
            self.missing_counts["no_logprobs"] += 1
            return Verdict(
                status=VerdictStatus.ERROR,
                score=math.nan,
                detail="judge engine returned no top log-probabilities for the first token",
                meta=cost,
                **base,
            )
        lp_yes = float(table.get(self.yes_token_id, -math.inf))
        lp_no = float(table.get(self.no_token_id, -math.inf))
        p_yes = float(yes_probability(lp_yes, lp_no))
        p_raw = math.exp(lp_yes)
        meta = {
            "p_yes": p_yes,
            "p_yes_raw": p_raw,
            # -inf (absent from the top-k) is stored as None: JSON has no infinity.
            "lp_yes": lp_yes if math.isfinite(lp_yes) else None,
            "lp_no": lp_no if math.isfinite(lp_no) else None,
            **cost,
        }
        yes_missing, no_missing = lp_yes == -math.inf, lp_no == -math.inf
        if yes_missing and no_missing:
            self.missing_counts["both"] += 1
            return Verdict(
                status=VerdictStatus.ERROR,
                score=math.nan,
                detail=(
                    f"neither {self.yes_token!r} nor {self.no_token!r} is in the judge's top-"
                    f"{self.top_logprobs} log-probs; raise top_logprobs or fix the template"
                ),
                meta=meta,
                **base,
            )
        detail = ""
        if yes_missing:
            self.missing_counts["yes"] += 1
            detail = f"{self.yes_token!r} not in top-{self.top_logprobs}: lp_yes = -inf"
        elif no_missing:
            self.missing_counts["no"] += 1
            detail = f"{self.no_token!r} not in top-{self.top_logprobs}: lp_no = -inf"
        value = p_yes if self.score == "p_yes" else p_raw
        if self.threshold is None:
            status, correct = VerdictStatus.SCORED, None
        else:
            correct = p_yes >= self.threshold
            status = VerdictStatus.PASS if correct else VerdictStatus.FAIL
        return Verdict(
            status=status, correct=correct, score=value, detail=detail, meta=meta, **base
        )

    def info(self) -> dict[str, Any]:
        """Provenance and the missing-token counts."""
        engine_info: dict[str, Any]
        try:
            engine_info = dict(self.engine.info())
        except Exception as e:  # provenance must not break a run
            engine_info = {"error": str(e)}
        return {
            "verifier": "judge",
            "name": self.name,
            "engine": engine_info,
            "template": self.template,
            "chat": self.chat,
            "yes_token": self.yes_token,
            "no_token": self.no_token,
            "yes_token_id": self.yes_token_id,
            "no_token_id": self.no_token_id,
            "top_logprobs": self.top_logprobs,
            "threshold": self.threshold,
            "score": self.score,
            "judged_count": self.judged_count,
            "missing_counts": dict(self.missing_counts),
            "cost": self.cost,
        }

    def close(self) -> None:
        """The engine belongs to the caller; nothing to release here."""


def _default_name(engine: Engine) -> str:
    """``judge:<model folder name>`` when the engine reports its model, else ``judge``."""
    try:
        model = str(engine.info().get("model") or "")
    except Exception:  # a name is not worth failing for
        model = ""
    model = model.rstrip("/").rsplit("/", 1)[-1]
    return f"judge:{model}" if model else "judge"


def _encoder(tokenizer: Any, engine: Engine) -> Callable[[str], list[int]]:
    """A ``text -> token ids`` function (no special tokens) for the judge's tokenizer."""
    tok = tokenizer
    if isinstance(tok, str):
        try:
            from transformers import AutoTokenizer
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise VerifierError(
                "tokenizer=<path> needs transformers: pip install 'ttscale[hf]'"
            ) from e
        try:
            tok = AutoTokenizer.from_pretrained(tok)
        except (OSError, ValueError) as e:
            raise VerifierError(f"cannot load the judge tokenizer {tokenizer!r}: {e}") from e
    if tok is None:
        tok = getattr(engine, "tokenizer", None)
        if tok is None and callable(getattr(engine, "get_tokenizer", None)):
            tok = engine.get_tokenizer()  # type: ignore[attr-defined]
    if tok is None:
        raise ConfigError(
            f"cannot find the tokenizer of engine {getattr(engine, 'name', engine)!r}; pass "
            "tokenizer= or yes_token_id= and no_token_id="
        )
    encode = getattr(tok, "encode", None)
    if callable(encode):

        def run(text: str) -> list[int]:
            try:
                return list(encode(text, add_special_tokens=False))
            except TypeError:  # an encoder without the keyword (tiktoken-style)
                return list(encode(text))

        return run
    if callable(tok):
        return lambda text: list(tok(text))
    raise ConfigError(f"tokenizer {tok!r} has no encode(text) method")
