"""``ttscale serve``: any strategy behind an OpenAI-compatible endpoint (FastAPI + uvicorn).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models`` (one
entry per preset plus the bare model), ``GET /health``, ``GET /metrics`` (Prometheus). Every
request is a program on the one scheduler of :class:`~ttscale.serve.worker.Worker`, so
concurrent requests share the engine's batches. See :mod:`ttscale.serve.strategy` for how a
request picks its strategy, and the README for the request fields and the response object.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from numpy.typing import NDArray

from ttscale.engines.base import Engine, GenerationRequest
from ttscale.errors import ConfigError, TtscaleError
from ttscale.samplers.base import Fate
from ttscale.samplers.loop import Program, generate
from ttscale.serve.strategy import SEARCH_WIDTH, SEARCHES, RequestError, StrategySpec, resolve
from ttscale.serve.worker import Budget, Job, Outcome, Worker
from ttscale.types import Completion, Problem, Sample, SamplingParams

__all__ = ["ServeConfig", "build_app", "problem_id_of"]

log = logging.getLogger(__name__)

#: seconds between SSE keep-alive comments while a strategy runs
KEEPALIVE_S = 1.0
#: seconds between checks that the client of a request in progress is still there
DISCONNECT_POLL_S = 0.25


@dataclass(frozen=True)
class ServeConfig:
    """What ``ttscale serve`` was started with: the served ``model`` name, ``presets`` (name ->
    fields), the ``default`` strategy (what a request naming neither a preset nor fields gets),
    ``params`` (sampling settings a request does not override; its ``seed`` is the default
    request seed), ``api_key`` (``None``: no auth, loopback only), ``max_concurrency``
    (requests in flight; more get 429), ``max_sequences`` (samples in the engine at once),
    ``chat`` (the engine applies a chat template to messages)."""

    model: str
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    default: StrategySpec = field(default_factory=StrategySpec)
    params: SamplingParams = field(default_factory=lambda: SamplingParams(max_tokens=256, temperature=1.0))
    api_key: str | None = None
    max_concurrency: int = 64
    max_sequences: int = 256
    chat: bool = True


def problem_id_of(context: Mapping[str, Any]) -> str:
    """The problem id the server gives a request: a hash of its prompt or messages, so its
    per-sample seeds (``sample_seed(seed, id, i)``) depend only on what it asks. To reproduce
    a served answer with the library, run ``Problem(id=problem_id_of(...))`` with the same seed."""
    text = json.dumps(context, sort_keys=True, ensure_ascii=False)
    return "req-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _repeated_program(pid: str, budget: int, context_key: str) -> Program[list[Completion]]:
    # one request per sample so each comes back (and a limit is checked) on its own; the
    # worker replaces the placeholder prompt with the request's real context
    reqs = [GenerationRequest(problem_id=pid, prompt=context_key, indices=(i,)) for i in range(budget)]
    got = yield from generate(reqs)
    return [c for cs in got for c in cs]


class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ttscale_requests", "Requests by endpoint, strategy and status", ["endpoint", "strategy", "status"], registry=r)
        self.in_flight = Gauge("ttscale_requests_in_flight", "Requests in flight", registry=r)
        self.samples = Counter("ttscale_samples_generated", "Samples generated, by strategy", ["strategy"], registry=r)
        self.tokens = Counter("ttscale_tokens_generated", "Tokens generated (aborted included), by strategy", ["strategy"], registry=r)
        self.latency = Histogram(
            "ttscale_request_latency_seconds", "Request latency, by strategy", ["strategy"], registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self.rejections = Counter("ttscale_rejections", "Requests rejected, by reason", ["reason"], registry=r)


class _Service:
    """The request logic, independent of the web framework."""

    def __init__(self, config: ServeConfig, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        self.worker = Worker(engine, config.params, max_sequences=config.max_sequences)
        self.metrics = _Metrics()
        self._verifiers: dict[str, Any] = {}
        self._adaptive: dict[tuple[str, str], Any] = {}
        self._shortmk: dict[tuple[str, str], Any] = {}
        self._vocab: int | None = None
        self._potentials: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()
        self.in_flight = 0

    # ---- parsing ---------------------------------------------------------------------------

    def sampling(self, body: Mapping[str, Any], spec: StrategySpec, *, chat: bool) -> SamplingParams:
        base = self.config.params
        kw: dict[str, Any] = {}
        for name in ("temperature", "top_p"):
            if body.get(name) is not None:
                kw[name] = body[name]
        mt = body.get("max_completion_tokens") if chat else None
        mt = body.get("max_tokens") if mt is None else mt
        if mt is not None:
            kw["max_tokens"] = mt
        stop = body.get("stop")
        if stop is not None:
            if isinstance(stop, str):
                stop = [stop]
            if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
                raise RequestError("stop must be a string or a list of at most 4 non-empty strings", param="stop")
            kw["stop"] = tuple(stop)
        seed = body.get("seed")
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
                raise RequestError(f"seed must be an integer >= 0, got {seed!r}", param="seed")
            kw["seed"] = seed
        head = spec.rule.partition(":")[0].strip()
        if spec.strategy == "repeated":
            # sample with what the rule reads: DeepConf's trace confidence and self-certainty the
            # top-20 log-probs; max_probability, pc, rpc and cisc the mean log-prob of a response
            from ttscale.select.rules import RULES

            rule = RULES.get(head)
            needs = rule.inputs if rule is not None else ()
            if "top_logprobs" in needs:
                kw["logprobs"] = max(base.logprobs or 0, 20)
            elif "mean_logprobs" in needs and base.logprobs is None:
                kw["logprobs"] = 0
        if spec.strategy == "adaptive" and spec.rule.partition(":")[0].strip().lower() == "deepconf":
            kw["logprobs"] = max(base.logprobs or 0, 20)
        if spec.strategy == "pruning":
            # deepconf-online watches top log-probs, lowprob the sampled token's log-prob
            head = spec.rule.partition(":")[0].strip()
            kw["logprobs"] = max(base.logprobs or 0, 20) if head == "deepconf-online" else (base.logprobs or 0)
        try:
            return base.replace(**kw)
        except ConfigError as e:
            param = next((k for k in kw if k in str(e)), None)
            raise RequestError(str(e), param=param) from None

    def context(self, body: Mapping[str, Any], *, chat: bool) -> dict[str, Any]:
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise RequestError("messages must be a non-empty list", param="messages")
            out = []
            for m in msgs:
                if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
                    raise RequestError("each message needs a role and a content", param="messages")
                content = m.get("content")
                if isinstance(content, list):  # content parts: text only
                    texts = [p.get("text") for p in content if isinstance(p, Mapping) and p.get("type") == "text"]
                    if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                        raise RequestError("only text content parts are supported", param="messages")
                    content = "".join(str(t) for t in texts)
                if not isinstance(content, str):
                    raise RequestError("each message needs a string content", param="messages")
                out.append({"role": m["role"], "content": content})
            if self.config.chat:
                return {"messages": out}
            # an engine without a chat template gets the messages' text, as OpenAI's legacy
            # completions would (the response says so)
            return {"prompt": "\n".join(m["content"] for m in out)}
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise RequestError("prompt must be a non-empty string (one prompt per request)", param="prompt")
        return {"prompt": prompt}

    def verifier(self, spec: str) -> Any:
        with self._lock:
            v = self._verifiers.get(spec)
            if v is None:
                from ttscale.verifiers.base import make_verifier

                v = self._verifiers[spec] = make_verifier(spec)
            return v

    def adaptive(self, rule: str, verifier: str, params: SamplingParams) -> Any:
        from ttscale.samplers.adaptive import AdaptiveSampler, verifier_answers

        key = (rule, verifier)
        with self._lock:
            s = self._adaptive.get(key)
        if s is None:
            s = AdaptiveSampler(
                self.engine, params, rule, verifier_answers(self.verifier(verifier)),
                chat=False, batch_size=self.config.max_sequences, progress=False,
                manifest={"engine": "serve"},
            )
            with self._lock:
                self._adaptive[key] = s
        return s

    def shortmk(self, rule: str, verifier: str, params: SamplingParams) -> Any:
        """The short-m@k sampler of ``rule`` answering with ``verifier`` (shared by requests)."""
        from ttscale.samplers.adaptive import verifier_answers
        from ttscale.samplers.shortmk import ShortMKSampler

        key = (rule, verifier)
        with self._lock:
            s = self._shortmk.get(key)
        if s is None:
            s = ShortMKSampler(
                self.engine, params, rule, verifier_answers(self.verifier(verifier)), chat=False,
                batch_size=self.config.max_sequences, progress=False, manifest={"engine": "serve"},
            )  # fmt: skip
            with self._lock:
                s = self._shortmk.setdefault(key, s)
        return s

    def vocab_size(self, rule: str) -> int:
        """The model's vocabulary size (self-certainty's ``V``): the engine's ``vocab_size``,
        vLLM's model config, or a transformers model's ``config.vocab_size`` (as
        :func:`ttscale.select.certainty.run_certainties` reads it from ``config.json``)."""
        if self._vocab is None:
            e = self.engine
            v = getattr(e, "vocab_size", None)
            v = v() if callable(v) else v
            if v is None and callable(getattr(e, "_vocab_size", None)):
                v = e._vocab_size()  # vLLM
            if v is None:
                v = getattr(getattr(getattr(e, "model", None), "config", None), "vocab_size", None)
            if not isinstance(v, int) or v < 2:
                raise RequestError(
                    f"rule {rule!r} needs the model's vocabulary size, and engine "
                    f"{type(e).__name__} does not give it; use another rule", param="ttscale.rule",
                )  # fmt: skip
            self._vocab = int(v)
        return self._vocab

    def certainties(self, rule: str, cands: Sequence[Completion]) -> NDArray[np.float64]:
        """Each candidate's self-certainty from its top-20 log-probs (the top-k approximation
        of :func:`ttscale.select.certainty.self_certainty_topk`; NaN without log-probs), as the
        library computes it for a stored run."""
        from ttscale.select.certainty import self_certainty_topk

        v = self.vocab_size(rule)
        return np.asarray(
            [np.nan if not c.top_logprobs else self_certainty_topk([dict(p) for p in c.top_logprobs], v)
             for c in cands],
            dtype=np.float64,
        )  # fmt: skip

    # ---- running ---------------------------------------------------------------------------

    def prepare(self, body: Mapping[str, Any], headers: Mapping[str, str], *, chat: bool) -> _Prepared:
        spec, preset = resolve(body, headers, self.config.presets, self.config.default, self.config.model)
        model = body.get("model")
        if not isinstance(model, str) or (model not in self.config.presets and model != self.config.model):
            names = [self.config.model, *self.config.presets]
            raise RequestError(
                f"model {model!r} is not served; choose one of {', '.join(names)}", param="model",
                status=404, code="model_not_found",
            )
        n = body.get("n", 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 16:
            raise RequestError(f"n must be an integer in [1, 16], got {n!r}", param="n")
        params = self.sampling(body, spec, chat=chat)
        ctx = self.context(body, chat=chat)
        pid = problem_id_of(ctx)
        if spec.strategy == "none":  # pass-through: n plain samples
            spec = StrategySpec(**{**spec.to_dict(), "budget": n})
        sampler = None
        if spec.strategy == "pruning":
            from ttscale.samplers.pruning import PruningSampler

            try:
                sampler = PruningSampler(self.engine, params, spec.rule, progress=False)
            except ConfigError as e:  # e.g. an engine that cannot stream or cut traces
                raise RequestError(f"bad ttscale.rule {spec.rule!r}: {e}", param="ttscale.rule") from None
        if spec.strategy == "smc":
            sampler = self.smc(spec, params)
            params = sampler.params.replace(seed=params.seed)
        if spec.strategy in SEARCHES:
            sampler = self.search(spec, params)
        return _Prepared(spec, preset, params, ctx, pid, n, chat, sampler)

    def smc(self, spec: StrategySpec, params: SamplingParams) -> Any:
        """The SMC sampler of a request: ``ttscale smc``'s defaults (FK steering, difference
        shaping, lambda 10, systematic resampling at ESS < 0.5, steps end at newlines), the
        potential read as a reward in [0, 1]."""
        from ttscale.samplers.smc import SMCSampler

        pot = self.potential(spec, "prob")
        try:
            return SMCSampler(
                self.engine, pot, params, shaping="difference", lam=10.0, resample="systematic",
                ess_threshold=0.5, step_stop=("\n",), select=spec.rule, progress=False,
            )
        except ConfigError as e:
            plain = params.temperature == 1.0 and params.top_p == 1.0
            if "temperature" in str(e) or ("logprobs" in str(e) and not plain):
                # the proposal correction for other settings needs raw and processed log-probs
                raise RequestError(
                    f"smc with temperature {params.temperature:g}, top_p {params.top_p:g} on this "
                    f"engine: {e}; send temperature 1 and top_p 1", param="temperature",
                ) from None
            raise RequestError(f"smc: {e}", param="ttscale.strategy") from None

    def potential(self, spec: StrategySpec, value: str) -> Any:
        """The request's potential (one per spec and reading, shared by requests)."""
        from ttscale.samplers.potentials import make_potential

        assert spec.potential is not None
        key = (spec.potential, value)
        with self._lock:
            pot = self._potentials.get(key)
        if pot is None:
            try:
                pot = make_potential(spec.potential, value=value)
            except ConfigError as e:
                raise RequestError(f"bad ttscale.potential {spec.potential!r}: {e}", param="ttscale.potential") from None
            with self._lock:
                pot = self._potentials.setdefault(key, pot)
        return pot

    def search(self, spec: StrategySpec, params: SamplingParams) -> Any:
        """The step-level search of a request, with ``ttscale smc --search``'s defaults (width
        4, steps end at newlines, at most 256 tokens a step and 64 steps); the potential ranks
        partial solutions as a log-potential."""
        from ttscale.samplers.search import SearchSampler

        try:
            return SearchSampler(
                self.engine, self.potential(spec, "log_prob"), params, search=spec.strategy,
                width=SEARCH_WIDTH, step_stop=("\n",), step_tokens=256, max_steps=64,
                max_tokens=params.max_tokens,
            )
        except ConfigError as e:
            raise RequestError(f"{spec.strategy}: {e}", param="ttscale.strategy") from None

    def job(self, prep: _Prepared, done: Any) -> Job:
        spec = prep.spec
        inner: Program[Any]
        lane_params = prep.params
        if spec.strategy == "adaptive":
            sampler = self.adaptive(spec.rule, spec.verifier, prep.params)
            problem = Problem(id=prep.pid, prompt=prep.pid)
            inner = sampler.program(problem, 0, spec.budget, prep.params, {})
        elif spec.strategy == "shortmk":
            short = self.shortmk(spec.rule, spec.verifier, prep.params)
            inner = short.program(Problem(id=prep.pid, prompt=prep.pid), short.rule.size(spec.budget))
        elif spec.strategy == "pruning":
            pruner = prep.sampler
            problem = Problem(id=prep.pid, prompt=prep.pid)
            inner = pruner.program(problem, spec.budget, min(pruner.rule.warmup, spec.budget))
        elif spec.strategy == "smc":
            # the potential reads the problem's text; the worker still sends the request's context
            inner = prep.sampler.program(Problem(id=prep.pid, prompt=_problem_text(prep.context)), spec.budget, prep.params)
            lane_params = prep.sampler.step_params(prep.params)
        elif spec.strategy in SEARCHES:
            lane_params = prep.sampler.params.replace(seed=prep.params.seed)
            inner = prep.sampler.program(Problem(id=prep.pid, prompt=_problem_text(prep.context)), spec.budget, lane_params)
        else:
            inner = _repeated_program(prep.pid, spec.budget, prep.pid)
        return Job(
            inner=inner,
            context=prep.context,
            lane=self.worker.lane(lane_params),
            seed=prep.params.seed,
            budget=Budget(spec.max_total_tokens, spec.deadline_s),
            done=done,
        )

    def finish(self, prep: _Prepared, out: Outcome) -> dict[str, Any]:
        """The choices and the ``ttscale`` object of a finished request."""
        spec = prep.spec
        problem = Problem(id=prep.pid, prompt=prep.pid)
        # pruning: the traces the rule stopped, by index (none known when a limit stopped the
        # request: its program ended before it could say)
        pruned_at: dict[int, int] = {}
        if spec.strategy == "adaptive" and out.result is not None:
            res, decision = out.result
            cands = [c.completion for c in res.candidates]
            why = decision.reason
        elif spec.strategy == "shortmk" and out.result is not None:
            # the first m to finish, in finish order (the vote's tie goes to the shortest)
            res, decision = out.result
            cands = [c.completion for c in res.candidates]
            why = f"first {decision.m} of {decision.k} finished"
        elif spec.strategy == "smc" or spec.strategy in SEARCHES:
            # the final population / pool (these take no limits: their programs always end)
            kept = out.result.kept
            cands = [c.completion for c in kept]
            log_w = [-math.inf if c.log_weight is None else float(c.log_weight) for c in kept]
            why = "degenerate" if out.result.info.get("degenerate") else "budget"
        elif spec.strategy == "pruning" and out.result is not None:
            res, _threshold, _reasons = out.result
            cands = [c.completion for c in res.candidates]
            pruned_at.update({c.index: c.pruned_at for c in res.candidates if c.pruned_at is not None})
            why = "budget"
        else:
            cands = sorted(out.completions, key=lambda c: c.index) if out.result is None else list(out.result)
            why = out.stopped or "budget"
        generated = sum(c.num_tokens + c.discarded_tokens for c in out.completions) + out.aborted_tokens
        if spec.strategy == "none":
            return self._plain(prep, cands, generated, out)
        verifier = self.verifier(spec.verifier)
        verdicts = verifier.verify(problem, [Sample.from_completion(c) for c in cands]) if cands else []
        answers: list[Hashable | None] = [v.answer for v in verdicts]
        scores = [v.score for v in verdicts]
        # a model-based verifier's own tokens (a judge preset) are part of the request's usage
        vtok = {
            "generated": sum(int(v.meta.get("judge_generated_tokens", 0)) for v in verdicts),
            "prompt": sum(int(v.meta.get("judge_prompt_tokens", 0)) for v in verdicts),
        }
        voting = answers
        if spec.strategy == "pruning":
            # the vote is over the traces the rule kept (a pruned trace's text is cut short)
            voting = [None if c.index in pruned_at else a for c, a in zip(cands, answers, strict=True)]
        if spec.strategy == "smc" or spec.strategy in SEARCHES:
            order, selected_scores = _rank_weighted(answers, log_w, spec.rule)
        else:
            order, selected_scores = self._rank(spec, cands, voting, scores, prep)
        if spec.strategy in ("adaptive", "shortmk") and out.result is not None:
            want = out.result[1].answer
            first = [i for i in order if answers[i] == want]
            order = first[:1] + [i for i in order if i not in first[:1]]
        if not order and cands:
            order = [0]  # no candidate has an answer: the first one's text
        picked = order[: prep.n]
        dist = Counter(str(a) for a in voting if a is not None and str(a).strip())
        info: dict[str, Any] = {
            "strategy": spec.strategy,
            "preset": prep.preset or None,
            "params": {**spec.to_dict(), "temperature": prep.params.temperature, "top_p": prep.params.top_p,
                       "max_tokens": prep.params.max_tokens, "stop": list(prep.params.stop)},
            "seed": prep.params.seed,
            "problem_id": prep.pid,
            "samples": len(out.completions),
            "candidates_used": len(cands),
            "tokens": generated,
            "aborted_tokens": out.aborted_tokens,
            "stopped": why,
            "answers": dict(dist.most_common()),
            "selected": None if not picked else {
                "index": cands[picked[0]].index, "answer": answers[picked[0]],
                "score": selected_scores.get(picked[0]),
            },
            "wall_seconds": round(out.wall_seconds, 4),
            "verifier_tokens": vtok,
        }
        if spec.strategy == "pruning":
            info["pruned"] = len(pruned_at)
        if spec.strategy == "shortmk" and out.result is not None:
            d = out.result[1]
            info["shortmk"] = {"rule": d.rule, "k": d.k, "m": d.m, "chosen": list(d.chosen),
                               "finish_order": list(d.finish_order), "finished": d.finished,
                               "aborted": d.aborted, "aborted_tokens": d.aborted_tokens}  # fmt: skip
        if spec.strategy == "smc":
            info["smc"] = {**prep.sampler.config(), "log_ml": out.result.info.get("log_ml"),
                           "steps": out.result.info.get("steps"), "resampled": out.result.info.get("resampled")}
        if spec.strategy in SEARCHES:
            info["search"] = {**prep.sampler.info(), "steps": len(out.result.steps),
                              "pruned": sum(c.fate is Fate.PRUNED for c in out.result.candidates)}
        if spec.return_candidates:
            info["candidates"] = [
                {"index": c.index, "text": c.text, "answer": a, "score": s, "finish_reason": c.finish_reason,
                 "tokens": c.num_tokens + c.discarded_tokens}
                for c, a, s in zip(cands, answers, scores, strict=True)
            ]
            if spec.strategy == "pruning":
                for row in info["candidates"]:
                    row["pruned_at"] = pruned_at.get(row["index"])
            if spec.strategy == "smc" or spec.strategy in SEARCHES:
                for row, lw in zip(info["candidates"], log_w, strict=True):
                    row["log_weight"] = lw
        choices = [(cands[i], answers[i]) for i in picked]
        return {"choices": choices, "ttscale": info, "generated": generated + vtok["generated"],
                "prompt_tokens": _prompt_tokens(out.completions) + vtok["prompt"],
                "samples": len(out.completions)}

    def _plain(self, prep: _Prepared, cands: list[Completion], generated: int, out: Outcome) -> dict[str, Any]:
        info = {
            "strategy": "none", "preset": None, "seed": prep.params.seed, "problem_id": prep.pid,
            "samples": len(out.completions), "tokens": generated, "stopped": out.stopped or "budget",
        }
        return {"choices": [(c, None) for c in cands[: prep.n]], "ttscale": info, "generated": generated,
                "prompt_tokens": _prompt_tokens(out.completions), "samples": len(out.completions)}

    def _rank(
        self, spec: StrategySpec, cands: Sequence[Completion], answers: list[Hashable | None],
        scores: list[float | None], prep: _Prepared,
    ) -> tuple[list[int], dict[int, float]]:
        """Candidate positions best first, one per distinct answer, and each one's score."""
        from ttscale.select.strategies import parse_strategy

        if not any(a is not None and str(a).strip() for a in answers):
            return [], {}
        rule_spec = spec.rule if spec.strategy == "repeated" else "majority"
        if "tie=" not in rule_spec:
            # a served answer must not depend on chance: ties go to the first answer
            rule_spec += ("," if ":" in rule_spec else ":") + "tie=first"
        _, strat = parse_strategy(rule_spec, level=3)
        inputs: dict[str, Any] = {}
        needs = strat.rule.inputs
        if "scores" in needs:
            if any(s is None for s in scores):
                raise RequestError(
                    f"rule {strat.name!r} needs a scoring verifier (a preset with rm:... or arith-prm), "
                    f"and {spec.verifier!r} gives no scores", param="ttscale.rule",
                )
            inputs["scores"] = np.asarray(scores, dtype=np.float64)
        if "mean_logprobs" in needs:
            inputs["mean_logprobs"] = np.asarray(
                [np.nan if c.mean_logprob is None else c.mean_logprob for c in cands], dtype=np.float64
            )
        if "top_logprobs" in needs and strat.name in _CERTAINTY_RULES:
            inputs["top_logprobs"] = self.certainties(strat.name, cands)
        elif "top_logprobs" in needs:
            from ttscale.samplers.adaptive import deepconf_confidences

            inputs["top_logprobs"] = np.asarray(deepconf_confidences()(cands), dtype=np.float64)
        if "texts" in strat.rule.optional:
            inputs["texts"] = [c.text for c in cands]
        try:
            res = strat.select(answers, **inputs)
        except ConfigError as e:
            raise RequestError(f"rule {strat.name!r}: {e}", param="ttscale.rule") from None
        labels = np.asarray(res.labels)
        sc = np.asarray(res.scores, dtype=np.float64)
        # res.index is the chosen cluster; the others follow by score, then first appearance
        order_clusters = sorted(range(len(sc)), key=lambda c: (-sc[c], c))
        if res.index is not None:
            top = int(res.index)
            order_clusters = [top] + [c for c in order_clusters if c != top]
        per_sample = inputs.get("scores")
        out: list[int] = []
        score_of: dict[int, float] = {}
        for c in order_clusters:
            members = np.flatnonzero(labels == c)
            if not members.size:
                continue
            # a cluster's text: its best-scored sample where samples are scored, else its first
            i = int(members[np.argmax(per_sample[members])]) if per_sample is not None else int(members[0])
            out.append(i)
            score_of[i] = float(sc[c])
        return out, score_of


#: selection rules ranked by self-certainty (their ``top_logprobs`` input is the certainties)
_CERTAINTY_RULES = ("self_certainty", "self_certainty_borda")


def _problem_text(context: Mapping[str, Any]) -> str:
    """The problem's text in a request's context: the prompt, or the last user message."""
    if context.get("prompt") is not None:
        return str(context["prompt"])
    users = [m["content"] for m in context.get("messages") or () if m.get("role") == "user"]
    return str(users[-1]) if users else ""


def _rank_weighted(
    answers: Sequence[Hashable | None], log_weights: Sequence[float], rule: str
) -> tuple[list[int], dict[int, float]]:
    """A weighted population's answers best first (one position each: its heaviest particle)
    and each one's score, as :func:`ttscale.samplers.smc.select_answer` picks the first:
    ``vote``: total normalised weight; ``argmax``: the largest log-weight; ties to the answer
    seen first. Particles without an answer do not count."""
    lw = np.asarray(log_weights, dtype=np.float64)
    if not lw.size or not np.isfinite(lw).any():
        return [], {}
    w = np.exp(lw - np.max(lw[np.isfinite(lw)]))
    w = w / w.sum()
    best: dict[Hashable, int] = {}
    score: dict[Hashable, float] = {}
    for i, a in enumerate(answers):
        if a is None or not str(a).strip():
            continue
        if a not in best or lw[i] > lw[best[a]]:
            best[a] = i
        score[a] = score.get(a, 0.0) + float(w[i]) if rule == "vote" else max(score.get(a, -math.inf), float(lw[i]))
    first = {a: k for k, a in enumerate(best)}  # dicts keep first appearance order
    ranked = sorted(best, key=lambda a: (-score[a], first[a]))
    return [best[a] for a in ranked], {best[a]: score[a] for a in ranked}


def _prompt_tokens(comps: Sequence[Completion]) -> int:
    return max((c.prompt_tokens or 0 for c in comps), default=0)


@dataclass(frozen=True)
class _Prepared:
    spec: StrategySpec
    preset: str
    params: SamplingParams
    context: dict[str, Any]
    pid: str
    n: int
    chat: bool
    #: the strategy's sampler, where one is made per request (pruning)
    sampler: Any = None


def _finish_reason(c: Completion) -> str:
    return "length" if c.finish_reason == "length" else "stop"


def build_app(config: ServeConfig, engine: Engine) -> Any:
    """The FastAPI application (its worker thread starts with the app and stops with it)."""
    from contextlib import asynccontextmanager

    svc = _Service(config, engine)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        svc.worker.start()
        try:
            yield
        finally:
            svc.worker.stop()

    app = FastAPI(title="ttscale", lifespan=lifespan)
    app.state.service = svc

    def error(e: RequestError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    def check_auth(request: Request) -> None:
        if config.api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {config.api_key}".encode()):
            raise RequestError("invalid or missing API key", status=401, type="authentication_error",
                               code="invalid_api_key")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        w = svc.worker
        return {
            "status": "ok", "model": config.model, "in_flight": svc.in_flight,
            "engine": {"polls": w.polls, "samples_in_flight_per_poll": w.batch_samples / max(1, w.polls),
                       "in_flight": w.engine_in_flight()},
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> Any:
        try:
            check_auth(request)
        except RequestError as e:
            return error(e)
        now = int(time.time())
        data = [{"id": config.model, "object": "model", "created": now, "owned_by": "ttscale",
                 "ttscale": {"strategy": "none"}}]
        for name, fields_ in config.presets.items():
            data.append({"id": name, "object": "model", "created": now, "owned_by": "ttscale",
                         "ttscale": dict(fields_)})
        return {"object": "list", "data": data}

    async def handle(request: Request, *, chat: bool) -> Any:
        endpoint = "chat" if chat else "completions"
        strategy = "unknown"
        try:
            check_auth(request)
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise RequestError("the body is not valid JSON") from None
            if not isinstance(body, dict):
                raise RequestError("the body must be a JSON object")
            prep = svc.prepare(body, request.headers, chat=chat)
            strategy = prep.spec.strategy
            stream = bool(body.get("stream", False))
            so = body.get("stream_options") or {}
            include_usage = bool(isinstance(so, Mapping) and so.get("include_usage"))
            if svc.in_flight >= config.max_concurrency:
                svc.metrics.rejections.labels("concurrency").inc()
                raise RequestError(
                    f"the server has {config.max_concurrency} requests in flight; retry later",
                    status=429, type="rate_limit_error", code="too_many_requests", headers={"Retry-After": "1"},
                )
        except RequestError as e:
            svc.metrics.requests.labels(endpoint, strategy, str(e.status)).inc()
            if e.status == 401:
                svc.metrics.rejections.labels("auth").inc()
            return error(e)
        svc.in_flight += 1
        svc.metrics.in_flight.inc()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Outcome | BaseException] = loop.create_future()

        def done(out: Outcome | BaseException) -> None:
            def put() -> None:
                if not fut.done():
                    fut.set_result(out)

            loop.call_soon_threadsafe(put)

        job = svc.job(prep, done)
        t0 = time.perf_counter()
        svc.worker.submit(job)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())

        def release() -> None:
            svc.in_flight -= 1
            svc.metrics.in_flight.dec()

        def result(out: Outcome | BaseException) -> dict[str, Any]:
            if isinstance(out, BaseException):
                if isinstance(out, RequestError):
                    raise out
                if isinstance(out, TtscaleError):
                    raise RequestError(f"the strategy failed: {out}", status=500, type="server_error") from out
                raise RequestError(f"the engine failed: {type(out).__name__}: {out}", status=500,
                                   type="server_error") from out
            fin = svc.finish(prep, out)
            svc.metrics.samples.labels(strategy).inc(fin["samples"])
            svc.metrics.tokens.labels(strategy).inc(fin["generated"])
            svc.metrics.latency.labels(strategy).observe(time.perf_counter() - t0)
            return fin

        def usage(fin: dict[str, Any]) -> dict[str, int]:
            return {"prompt_tokens": fin["prompt_tokens"], "completion_tokens": fin["generated"],
                    "total_tokens": fin["prompt_tokens"] + fin["generated"]}

        if not stream:
            try:
                while True:
                    try:
                        out = await asyncio.wait_for(asyncio.shield(fut), timeout=DISCONNECT_POLL_S)
                        break
                    except TimeoutError:
                        if await request.is_disconnected():
                            svc.worker.cancel(job)
                            svc.metrics.requests.labels(endpoint, strategy, "499").inc()
                            return Response(status_code=499)
                try:
                    fin = result(out)
                except RequestError as e:
                    svc.metrics.requests.labels(endpoint, strategy, str(e.status)).inc()
                    return error(e)
            finally:
                release()
            choices = []
            for k, (c, _) in enumerate(fin["choices"]):
                if chat:
                    choices.append({"index": k, "message": {"role": "assistant", "content": c.text},
                                    "logprobs": None, "finish_reason": _finish_reason(c)})
                else:
                    choices.append({"index": k, "text": c.text, "logprobs": None, "finish_reason": _finish_reason(c)})
            svc.metrics.requests.labels(endpoint, strategy, "200").inc()
            return {
                "id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": body["model"], "choices": choices, "usage": usage(fin), "system_fingerprint": None,
                "ttscale": fin["ttscale"],
            }

        async def events() -> AsyncIterator[str]:
            obj = "chat.completion.chunk" if chat else "text_completion"
            finished = False

            def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
                d = {"id": rid, "object": obj, "created": created, "model": body["model"], "choices": choices}
                d.update(extra)
                return f"data: {json.dumps(d)}\n\n"

            try:
                # headers go out at once, and a client sees the request was taken
                yield ": ttscale started\n\n"
                if chat:
                    yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
                last = time.monotonic()
                while True:
                    try:
                        out = await asyncio.wait_for(asyncio.shield(fut), timeout=DISCONNECT_POLL_S)
                        break
                    except TimeoutError:
                        # a writer does not notice a closed socket at once: ask the server
                        if await request.is_disconnected():
                            return
                        if time.monotonic() - last >= KEEPALIVE_S:
                            last = time.monotonic()
                            yield ": ttscale running\n\n"
                try:
                    fin = result(out)
                except RequestError as e:
                    svc.metrics.requests.labels(endpoint, strategy, str(e.status)).inc()
                    yield f"data: {json.dumps(e.body())}\n\n"
                    finished = True
                    return
                for k, (c, _) in enumerate(fin["choices"]):
                    if chat:
                        if k > 0:
                            yield chunk([{"index": k, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}])
                        yield chunk([{"index": k, "delta": {"content": c.text}, "logprobs": None, "finish_reason": None}])
                        yield chunk([{"index": k, "delta": {}, "logprobs": None, "finish_reason": _finish_reason(c)}])
                    else:
                        yield chunk([{"index": k, "text": c.text, "logprobs": None, "finish_reason": None}])
                        yield chunk([{"index": k, "text": "", "logprobs": None, "finish_reason": _finish_reason(c)}])
                if include_usage:
                    yield chunk([], usage=usage(fin), ttscale=fin["ttscale"])
                else:
                    yield f": ttscale {json.dumps(fin['ttscale'])}\n\n"
                yield "data: [DONE]\n\n"
                svc.metrics.requests.labels(endpoint, strategy, "200").inc()
                finished = True
            finally:
                if not finished and not fut.done():
                    # the client went away: its engine work is cancelled
                    svc.worker.cancel(job)
                    svc.metrics.requests.labels(endpoint, strategy, "499").inc()
                release()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await handle(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await handle(request, chat=False)

    return app
