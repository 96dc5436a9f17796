"""Selection rules: turn one problem's samples into one answer.

- ``aggregate``: majority and weighted votes, best-of-N, max-probability, perplexity consistency
  (PC), RPC, DeepConf voting, PRM step-score aggregation (answer-level and label-level forms);
- ``rules``: the registry of selection rules (one name per rule, the functions and inputs of each);
- ``rpc``: the Weibull-mixture reasoning-pruning model behind RPC;
- ``confidence``: DeepConf's token, group and trace confidence measures;
- ``ensemble``: verifier/reward-model ensembles (z-scored aggregators);
- ``yesno``: P(yes) scoring for LLM judges and yes/no rerankers;
- ``stopping``: early-stopping rules over a stream of answers (ESC, Adaptive-Consistency).
"""

#: The tie rule of every command that takes ``--tie`` (``curve``, ``replay``): ``expected``, the
#: exact expectation over a uniformly random choice among the tied answers (no order assumed).
#: Kept here, free of numpy, because the CLI reads it when it builds its options.
DEFAULT_TIE = "expected"
