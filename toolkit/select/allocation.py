"""Budget allocation across problems: which problems get the next samples of a dataset budget.

A stopping rule (:mod:`ttscale.select.adaptive`) looks at one problem at a time; an
allocation policy looks at all of them and moves samples from settled problems to unsettled
ones. The run proceeds in rounds: each round the policy ranks the problems still open from what
their samples so far say, the top ``round_size`` of them get one more sample each (live: in one
engine call), and the answers update the state. A problem closes at its per-problem cap
(``max_samples``) or when an optional stopping rule says its answer is settled (stopping rules
are the special case of a per-problem cap). The run ends when the total budget -- samples, or
generated tokens -- is spent or every problem is closed; each problem answers with the vote over
its samples (the stopping rule's answer where it stopped), ties to the first-seen answer.

The same :class:`AllocationPolicy` object drives the live
:class:`~ttscale.samplers.allocation.AllocationSampler` and the offline replay
(:func:`ttscale.allocation.replay_allocation`) through :func:`allocate`, so a live run and the
index-order replay of a full run with the same seed give every problem the same samples.

Policies (``parse_policy`` specs; a bare number is the main parameter)::

    uniform                  round robin: every open problem gets a sample per round, fewest
                             samples first (a budget of n x problems is SC@n exactly)
    greedy[:lookahead=1]     expected gain: the posterior probability that the next
                             ``lookahead`` samples change the majority answer, per expected token
    gape[:a=1]               GapE (Gabillon, Ghavamzadeh, Lazaric & Bubeck, "Multi-Bandit Best
                             Arm Identification", NeurIPS 2011), each problem a bandit whose best
                             arm is its modal answer

``greedy``: the answers so far are reduced to leader / runner-up / rest counts
``(v1, v2, r)`` with a uniform Dirichlet prior, so the next ``h`` samples are
Dirichlet-multinomial; the gain is ``P(v2 + R > v1 + L) + ½·P(v2 + R = v1 + L)`` over the
leader's ``L`` and the runner-up's ``R`` new votes (a new tie is a coin flip for the answer; a
tie already there keeps the first-seen answer and counts 0), exact by enumeration. It is divided by the problem's expected tokens per sample (the mean of its
samples so far; the mean over all samples for a problem without one) when the budget is in
tokens, and by 1 when it is in samples. A problem without an answered sample has gain 1.
``h = 1`` is the literal one-sample gain: a problem whose leader is two votes ahead then has
gain 0 and waits until no contested problem is left (equal gains go to the problem with the
fewest samples, then the first). ``lookahead`` > 1 looks further.

``gape``: GapE's index for bandit ``m`` is ``B_m = −Δ̂_m + sqrt(a / T_m)`` with ``Δ̂_m`` the
empirical gap between its best and second-best arm and ``T_m`` its pulls; each round the
largest indices are pulled. Here a pull is a sample of problem ``m``, the arms are its answers
and ``Δ̂_m = (v1 − v2) / T_m`` (unanswered samples count as pulls that favour no answer); a
problem without samples has ``B = ∞``. The paper's exploration constant depends on an unknown
problem complexity ``H``; ``a`` is left as the parameter (calibrate it with
``ttscale replay --calibrate``). No reference code exists; this follows the paper's
Algorithm 1 (GapE) with one pull per chosen problem per round.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from scipy.special import gammaln

from ttscale.errors import ConfigError
from ttscale.select.adaptive import StopRule, final_vote
from ttscale.select.stopping import answer_counts

__all__ = [
    "POLICY_NAMES",
    "AllocationPolicy",
    "AllocationState",
    "allocate",
    "greedy_gain",
    "parse_policy",
]

#: policy name -> (main parameter or None, {parameter: default})
_POLICIES: dict[str, tuple[str | None, dict[str, float]]] = {
    "uniform": (None, {}),
    "greedy": ("lookahead", {"lookahead": 1}),
    "gape": ("a", {"a": 1.0}),
}
POLICY_NAMES: tuple[str, ...] = tuple(_POLICIES)
_INT_PARAMS = frozenset({"lookahead"})


@dataclass
class AllocationState:
    """One problem's samples so far: answers (``None``: no answer), tokens, whether it is
    closed and why, and the answer it settled on (a stopping rule's)."""

    answers: list[Hashable | None] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    closed: bool = False
    reason: str = ""
    stop_answer: Hashable | None = None
    stopped: bool = False

    _top: tuple[int, int, int] | None = field(default=None, repr=False, compare=False)

    @property
    def samples(self) -> int:
        return len(self.answers)

    def add(self, answer: Hashable | None, tokens: int) -> None:
        self.answers.append(answer)
        self.tokens.append(int(tokens))
        self._top = None

    def top_counts(self) -> tuple[int, int, int]:
        """``(leader, runner-up, rest)`` counts of the answered samples (cached until the next
        sample: a policy ranks every open problem every round)."""
        if self._top is None:
            counts = sorted((c for _, c in answer_counts(self.answers)), reverse=True)
            v1 = counts[0] if counts else 0
            v2 = counts[1] if len(counts) > 1 else 0
            self._top = (v1, v2, sum(counts[2:]))
        return self._top

    def answer(self) -> tuple[Hashable | None, tuple[Hashable, ...]]:
        """The problem's answer (a stopping rule's, else the first-seen plurality) and the
        answers tied at the top."""
        if self.stopped:
            return self.stop_answer, ()
        ans, tied = final_vote(self.answers, tie="first")
        return ans, tuple(tied)


@lru_cache(maxsize=262144)
def greedy_gain(v1: int, v2: int, rest: int, lookahead: int = 1) -> float:
    """P(the next ``lookahead`` samples change the majority answer) for leader / runner-up /
    rest counts under a uniform Dirichlet prior (see the module docstring); ties count ½."""
    if v1 == 0:
        return 1.0
    a = (v1 + 1.0, v2 + 1.0, rest + 1.0)
    a0 = sum(a)
    h = lookahead
    # Dirichlet-multinomial: P(l, r, o) = h!/(l! r! o!) · Γ(a0)/Γ(a0 + h) · Π Γ(a_i + n_i)/Γ(a_i)
    base = gammaln(h + 1) + gammaln(a0) - gammaln(a0 + h) - sum(gammaln(x) for x in a)
    total = 0.0
    for lead in range(h + 1):
        for run in range(h + 1 - lead):
            diff = (v2 + run) - (v1 + lead)
            if diff < 0:
                continue
            o = h - lead - run
            logp = (base - gammaln(lead + 1) - gammaln(run + 1) - gammaln(o + 1)
                    + gammaln(a[0] + lead) + gammaln(a[1] + run) + gammaln(a[2] + o))
            # a new tie goes to whichever was seen first (unknown here: ½); a tie that was
            # already there keeps the current, first-seen answer
            total += math.exp(logp) * (1.0 if diff > 0 else (0.5 if v1 > v2 else 0.0))
    return min(max(total, 0.0), 1.0)


@dataclass(frozen=True)
class AllocationPolicy:
    """A parsed policy (see the module docstring); ``params`` hold every parameter."""

    name: str
    params: dict[str, float] = field(default_factory=dict)

    @property
    def spec(self) -> str:
        """Canonical spec string (``greedy:lookahead=1``); parses back to the same policy."""
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={_fmt(v)}" for k, v in self.params.items())

    def priorities(self, states: Sequence[AllocationState], *, tokens: bool) -> list[float]:
        """One priority per problem (larger first; closed problems ``-inf``)."""
        out: list[float] = []
        if self.name == "uniform":
            return [-math.inf if s.closed else -float(s.samples) for s in states]
        mean_all = _mean_tokens(states)
        for s in states:
            if s.closed:
                out.append(-math.inf)
                continue
            if self.name == "greedy":
                v1, v2, r = s.top_counts()
                g = greedy_gain(v1, v2, r, int(self.params["lookahead"]))
                if tokens:
                    cost = (sum(s.tokens) / len(s.tokens)) if s.tokens else mean_all
                    g = g / max(cost, 1.0)
                out.append(g)
            else:  # gape
                t = s.samples
                if t == 0:
                    out.append(math.inf)
                    continue
                v1, v2, _ = s.top_counts()
                out.append(-(v1 - v2) / t + math.sqrt(self.params["a"] / t))
        return out

    def choose(self, states: Sequence[AllocationState], k: int, *, tokens: bool = False) -> list[int]:
        """The (at most ``k``) open problems that get the next sample each, best first; equal
        priorities go to the problem with the fewest samples, then the first."""
        pri = self.priorities(states, tokens=tokens)
        open_ = [i for i, s in enumerate(states) if not s.closed]
        open_.sort(key=lambda i: (-pri[i], states[i].samples, i))
        return open_[:k]

    def default_round(self, problems: int) -> int:
        """Samples per round when none is given: every problem for ``uniform`` (round robin),
        an eighth of the problems (at least 1) for the adaptive policies, so they re-rank often
        while engine calls stay batched."""
        return problems if self.name == "uniform" else max(1, math.ceil(problems / 8))


def _mean_tokens(states: Sequence[AllocationState]) -> float:
    n = sum(len(s.tokens) for s in states)
    return sum(sum(s.tokens) for s in states) / n if n else 1.0


def close_if_done(state: AllocationState, cap: int, stop: StopRule | None, checked: int) -> int:
    """Close ``state`` if its stopping rule stops at a prefix after ``checked`` or it reached
    ``cap``; returns the new checked length."""
    if stop is not None:
        from ttscale.select.adaptive import first_stop

        hit = first_stop(stop, state.answers, None, checked, state.samples)
        if hit is not None:
            k, d = hit
            # samples drawn past the stopping point in the same round are not candidates
            del state.answers[k:]
            del state.tokens[k:]
            state._top = None
            state.closed, state.stopped, state.stop_answer = True, True, d.answer
            state.reason = d.reason
            return k
    if state.samples >= cap:
        state.closed, state.reason = True, "cap"
    return state.samples


def parse_policy(spec: str) -> AllocationPolicy:
    """Parse ``name[:value][,key=value...]`` (``uniform``, ``greedy:lookahead=2``, ``gape:a=0.5``)."""
    text = str(spec).strip()
    name, _, rest = text.partition(":")
    name = name.strip().lower()
    if name not in _POLICIES:
        raise ConfigError(f"unknown allocation policy {name!r} in {spec!r}; choose one of {', '.join(POLICY_NAMES)}")
    main, defaults = _POLICIES[name]
    params: dict[str, float] = dict(defaults)
    for part in (x.strip() for x in rest.split(",")) if rest.strip() else ():
        if not part:
            raise ConfigError(f"empty parameter in policy {spec!r}")
        key, eq, value = part.partition("=")
        if not eq:
            if main is None:
                raise ConfigError(f"policy {name!r} takes no value, got {spec!r}")
            key, value = main, part
        key = key.strip()
        if key not in defaults:
            raise ConfigError(f"policy {name!r} has no parameter {key!r} (it takes {', '.join(defaults) or 'none'})")
        try:
            num = float(value)
        except ValueError:
            raise ConfigError(f"parameter {key} of policy {name!r} must be a number, got {value.strip()!r}") from None
        if key in _INT_PARAMS and (num != int(num) or num < 1):
            raise ConfigError(f"parameter {key} of policy {name!r} must be a positive integer, got {value.strip()!r}")
        if key == "a" and not (num > 0 and math.isfinite(num)):
            raise ConfigError(f"parameter a of policy {name!r} must be positive, got {value.strip()!r}")
        if key == "lookahead" and num > 64:
            raise ConfigError(f"policy {spec!r}: lookahead above 64 is not supported (the gain is enumerated)")
        params[key] = float(int(num)) if key in _INT_PARAMS else num
    return AllocationPolicy(name, params)


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def allocate(
    policy: AllocationPolicy,
    n_problems: int,
    draw: Callable[[list[int]], Sequence[tuple[Hashable | None, int]]],
    *,
    budget: float,
    tokens: bool = False,
    cap: int | Sequence[int],
    stop: StopRule | None = None,
    round_size: int | None = None,
) -> list[AllocationState]:
    """Run ``policy`` over ``n_problems`` problems until ``budget`` (samples, or generated
    tokens with ``tokens=True``) is spent or every problem is closed; ``draw`` yields the next
    sample of each chosen problem (the live engine call, or the replay's stream).

    A round hands one sample to each of at most ``round_size`` problems (default
    :meth:`AllocationPolicy.default_round`). With a token budget a round is cut to the samples
    the remaining tokens are expected to pay for (at least one), so the run ends at most one
    round's last samples past the budget; the tokens actually spent are reported.
    """
    if n_problems < 1:
        raise ConfigError("allocation needs at least one problem")
    if not budget > 0:
        raise ConfigError(f"the total budget must be positive, got {budget}")
    caps = [int(cap)] * n_problems if isinstance(cap, int) else [int(c) for c in cap]
    if len(caps) != n_problems:
        raise ConfigError("one per-problem cap per problem")
    k_round = round_size or policy.default_round(n_problems)
    if k_round < 1:
        raise ConfigError(f"round_size must be at least 1, got {round_size}")
    states = [AllocationState() for _ in range(n_problems)]
    checked = [0] * n_problems
    for i, s in enumerate(states):
        if caps[i] <= 0:
            s.closed, s.reason = True, "cap"
    spent_samples = 0
    spent_tokens = 0
    while True:
        left = budget - (spent_tokens if tokens else spent_samples)
        if left <= 0:
            break
        if tokens:
            mean = _mean_tokens(states)
            k = min(k_round, max(1, int(left // max(mean, 1.0))))
        else:
            k = min(k_round, int(left))
        chosen = policy.choose(states, k, tokens=tokens)
        if not chosen:
            break
        got = draw(chosen)
        if len(got) != len(chosen):
            raise ConfigError(f"draw returned {len(got)} samples for {len(chosen)} problems")
        for i, (ans, ntok) in zip(chosen, got, strict=True):
            s = states[i]
            s.add(ans, int(ntok))
            spent_samples += 1
            spent_tokens += int(ntok)
            checked[i] = close_if_done(s, caps[i], stop, checked[i])
    for s in states:
        if not s.closed:
            s.reason = "budget"
    return states
