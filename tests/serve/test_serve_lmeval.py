"""lm-evaluation-harness as a real client of ``ttscale serve`` (the bundled model on hf, a task
on the bundled arith problems as local JSONL): its accuracy through a self-consistency preset
equals the library's, run directly with the same seed and budget."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import free_port

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="lm-eval is not installed (pip install 'lm-eval[api]'; see README 'ttscale serve')",
)

LIMIT = 12
BUDGET = 4
SEED = 1234  # lm-eval's local-chat-completions sends seed=1234 unless told otherwise

TASK = """task: arith_serve
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["<never>"]
  max_gen_toks: 128
  temperature: 1.0
  do_sample: true
filter_list:
  - name: hash
    filter:
      - function: regex
        regex_pattern: "####\\\\s*(-?[0-9][0-9,]*)"
        group_select: -1
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def hf_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``ttscale serve`` on the bundled model (hf engine) in a subprocess, stopped by its pid."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ttscale.cli.app", "serve", "--engine", "hf", "--port", str(port),
             "--max-tokens", "128", "--preset", f"sc=strategy=repeated;rule=majority;budget={BUDGET};verifier=arith"],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() - t0 > 120:
                raise RuntimeError(f"ttscale serve did not start:\n{log.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_lm_eval_self_consistency_equals_library(hf_server: str, tmp_path: Path) -> None:
    from ttscale.engines import make_engine
    from ttscale.evals import default_model_path, get_benchmark
    from ttscale.evals.arith import check
    from ttscale.samplers import RepeatedSampler
    from ttscale.select.aggregate import majority_vote
    from ttscale.serve.app import problem_id_of
    from ttscale.types import Problem, SamplingParams
    from ttscale.verifiers.base import make_verifier

    bench = get_benchmark("arith")
    problems = bench.load("test", limit=LIMIT)
    data = tmp_path / "arith.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.prompt, "answer": str(p.reference)}) + "\n" for p in problems))
    (tmp_path / "arith_serve.yaml").write_text(TASK.format(data=data))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "local-chat-completions", "--model_args",
         f"model=sc,base_url={hf_server}/v1/chat/completions,num_concurrent=4,tokenizer_backend=None,max_retries=1",
         "--apply_chat_template", "--tasks", "arith_serve", "--include_path", str(tmp_path),
         "--output_path", str(out), "--log_samples"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    served_acc = results["results"]["arith_serve"]["exact_match,hash"]
    samples = [json.loads(line) for line in next(out.rglob("samples_*.jsonl")).read_text().splitlines()]
    assert len(samples) == LIMIT

    # the library, directly: what lm-eval sent (one user message; the bundled model has no chat
    # template, so the server samples its text), the same seed, budget and sampling settings
    sent = {s["doc_id"]: json.loads(s["arguments"]["gen_args_0"]["arg_0"][0])[0]["content"] for s in samples}
    direct = [Problem(id=problem_id_of({"prompt": sent[i]}), prompt=sent[i], reference=p.reference)
              for i, p in enumerate(problems)]
    engine = make_engine("hf", default_model_path())
    params = SamplingParams(temperature=1.0, max_tokens=128, stop=("<never>",), seed=SEED)
    verifier = make_verifier("arith")
    from ttscale.types import Sample

    correct = []
    chosen = {}
    for res in RepeatedSampler(engine, params, chat=False).sample(direct, BUDGET):
        comps = [c.completion for c in res.candidates]
        answers = [v.answer for v in verifier.verify(res.problem, [Sample.from_completion(c) for c in comps])]
        answer = majority_vote(answers, tie="first").answer
        chosen[res.problem.id] = answer
        correct.append(check(answer, res.problem.reference))
    direct_acc = sum(correct) / len(correct)
    assert served_acc == pytest.approx(direct_acc, abs=1e-12)
    # and per problem: lm-eval's extracted answer is the library's majority answer
    for s in samples:
        pid = problem_id_of({"prompt": sent[s["doc_id"]]})
        assert (s["filtered_resps"][0] if s["filtered_resps"][0] != "[invalid]" else None) == chosen[pid]

