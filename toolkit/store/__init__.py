"""The sample store: run directories of Parquet shards, the columnar pool view, JSONL exchange.

``ttscale.store.SampleStore`` (``samplestore``) writes and reads a run; ``Pool`` (``pool``) is the
flat, columnar analysis view of one; ``import_jsonl`` / ``export_jsonl`` (``jsonio``) move samples
in and out of the store as JSON lines.
"""

from ttscale.store.jsonio import export_jsonl, import_jsonl, read_samples_jsonl, sample_to_json
from ttscale.store.pool import Pool, ProblemView
from ttscale.store.samplestore import SAMPLE_SCHEMA, VERDICT_SCHEMA, SampleStore, merge_runs

__all__ = [
    "SAMPLE_SCHEMA",
    "VERDICT_SCHEMA",
    "Pool",
    "ProblemView",
    "SampleStore",
    "export_jsonl",
    "import_jsonl",
    "merge_runs",
    "read_samples_jsonl",
    "sample_to_json",
]
