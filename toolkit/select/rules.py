"""The registry of selection rules: one entry, and one name, per rule.

A selection rule turns one problem's samples into one answer. Every place that names a rule
(``AggregateResult.method``, ``selection_at_k(method=...)``, ``compute_curves`` and the
``ttscale curve --methods`` keys, table and plot labels) takes the name from :data:`RULES`:

* ``majority``: majority_vote / majority_vote_labels; answers only; closed-form selection@k
  for ``tie="expected"``;
* ``weighted``: weighted_vote / weighted_vote_labels; scores;
* ``best_of_n``: best_of_n / best_of_n_labels; scores; closed form for ``"expected"``, ``"first"``;
* ``max_probability``: max_probability / max_probability_labels; mean log-probs; closed form for
  ``"expected"``, ``"first"`` (the PPL baseline of the RPC paper);
* ``pc``: perplexity_consistency / perplexity_consistency_labels; mean log-probs (texts);
* ``rpc``: rpc / rpc_labels; mean log-probs (texts);
* ``deepconf``: deepconf_vote / deepconf_vote_labels; top-k log-probs (selection@k through a
  ``Selector``, see :func:`ttscale.analysis.compute_curves`);
* ``self_certainty`` / ``self_certainty_borda``: best-of-N / Borda vote by self-certainty
  (:mod:`ttscale.select.certainty`); the exact values a run stores (``ttscale certainty``,
  ``sample --self-certainty``), else top-k log-probs and the model's vocabulary size;
* ``cisc`` / ``cisc_score``: CISC (:mod:`ttscale.select.cisc`), confidence = response
  probability (mean log-probs) / a score such as the yes/no judge's P(True).

Coverage (pass@k) is not a selection rule: it credits a subset when *any* of its samples is
correct, i.e. it selects with the reference answer. It is the oracle upper bound of every rule and
is named :data:`ORACLE` (``"coverage"``) wherever it appears next to the rules.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, get_args

from ttscale.errors import ConfigError
from ttscale.select import aggregate as agg
from ttscale.select import certainty as sc
from ttscale.select import cisc

__all__ = [
    "ORACLE",
    "ORACLE_DESCRIPTION",
    "ORACLE_LABEL",
    "RULES",
    "Input",
    "Rule",
    "get_rule",
    "rule_names",
]

Input = Literal["answers", "scores", "mean_logprobs", "top_logprobs", "texts"]
"""Per-sample inputs a rule reads: extracted ``answers`` (always), verifier/reward ``scores``,
mean token log-probs, per-position top-k log-probs (DeepConf), completion ``texts`` (duplicates)."""

INPUTS: tuple[str, ...] = get_args(Input)

#: The name of the oracle (pass@k) curve that is shown next to the rules.
ORACLE = "coverage"
ORACLE_DESCRIPTION = "pass@k: any of k samples correct (oracle verifier, not a selection rule)"
ORACLE_LABEL = "coverage (pass@k)"


@dataclass(frozen=True)
class Rule:
    """One selection rule.

    ``answers_fn(answers, ...)`` clusters raw answers (``None`` = no answer) and ``labels_fn(labels,
    ...)`` works on integer cluster labels (``-1`` = no answer); both return an
    :class:`~ttscale.select.aggregate.AggregateResult` whose ``method`` is ``name``. ``inputs`` are
    the per-sample inputs it needs, ``optional`` those it uses when given. ``closed_form_ties``
    lists the tie rules for which :func:`ttscale.metrics.selection_at_k` has an exact closed form
    (empty: enumeration or Monte Carlo only); ``at_k`` whether ``selection_at_k`` takes the rule by
    name (otherwise pass a ``Selector`` callable). ``label`` is the table heading and
    ``plot_label`` the legend entry.
    """

    name: str
    answers_fn: Callable[..., agg.AggregateResult]
    labels_fn: Callable[..., agg.AggregateResult]
    inputs: tuple[str, ...]
    description: str
    label: str
    closed_form_ties: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    at_k: bool = True

    @property
    def closed_form(self) -> bool:
        """Whether selection@k has a closed form for some tie rule."""
        return bool(self.closed_form_ties)

    @property
    def plot_label(self) -> str:
        return f"{self.label}@k"


_RULE_LIST = (
    Rule(
        "majority", agg.majority_vote, agg.majority_vote_labels, ("answers",),
        "majority vote over answers (self-consistency)", "majority",
        closed_form_ties=("expected",),
    ),
    Rule(
        "weighted", agg.weighted_vote, agg.weighted_vote_labels, ("answers", "scores"),
        "score-weighted majority vote (needs a score)", "weighted vote",
    ),
    Rule(
        "best_of_n", agg.best_of_n, agg.best_of_n_labels, ("answers", "scores"),
        "best-of-N: the sample with the highest score (needs a score)", "best-of-N",
        closed_form_ties=("expected", "first"),
    ),
    Rule(
        "max_probability", agg.max_probability, agg.max_probability_labels,
        ("answers", "mean_logprobs"),
        "the path with the highest mean token log-prob (the PPL baseline)", "max-probability",
        closed_form_ties=("expected", "first"),
    ),
    Rule(
        "pc", agg.perplexity_consistency, agg.perplexity_consistency_labels,
        ("answers", "mean_logprobs"), "perplexity consistency", "PC", optional=("texts",),
    ),
    Rule(
        "rpc", agg.rpc, agg.rpc_labels, ("answers", "mean_logprobs"),
        "reasoning-pruning perplexity consistency", "RPC", optional=("texts",),
    ),
    Rule(
        "deepconf", agg.deepconf_vote, agg.deepconf_vote_labels, ("answers", "top_logprobs"),
        "DeepConf confidence-filtered weighted vote (needs top logprobs)", "DeepConf",
        at_k=False,
    ),
    Rule(
        "self_certainty", sc.self_certainty_best, sc.self_certainty_best_labels,
        ("answers", "top_logprobs"),
        "best-of-N by self-certainty (Kang et al.; exact where stored, else top-k approximation)",
        "self-certainty", closed_form_ties=("expected", "first"), at_k=False,
    ),
    Rule(
        "self_certainty_borda", sc.self_certainty_borda, sc.self_certainty_borda_labels,
        ("answers", "top_logprobs"),
        "Borda vote ranked by self-certainty, weight (N-r+1)^p, p=0.5 (Kang et al.; --borda-power)",
        "self-certainty Borda", at_k=False,
    ),
    Rule(
        "cisc", cisc.cisc_sequence_vote, cisc.cisc_sequence_vote_labels, ("answers", "mean_logprobs"),
        "CISC: vote weighted by softmax(response probability / T) (Taubenfeld et al.)", "CISC",
        at_k=False,
    ),
    Rule(
        "cisc_score", cisc.cisc_score_vote, cisc.cisc_score_vote_labels, ("answers", "scores"),
        "CISC with a score as confidence, e.g. the yes/no judge's P(True) (needs a score)",
        "CISC (score)", at_k=False,
    ),
)

#: Every selection rule by name, in a stable display order.
RULES: Mapping[str, Rule] = MappingProxyType({r.name: r for r in _RULE_LIST})


def rule_names() -> tuple[str, ...]:
    """The rule names, in display order."""
    return tuple(RULES)


def get_rule(name: str) -> Rule:
    """The :class:`Rule` named ``name`` (an unknown name raises :class:`ConfigError`)."""
    rule = RULES.get(name)
    if rule is None:
        raise ConfigError(f"unknown selection rule {name!r}; choose from {', '.join(RULES)}")
    return rule
