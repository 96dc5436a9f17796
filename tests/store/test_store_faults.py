"""Damaged run directories: one-line errors naming the file and the fix; `ttscale check --repair`."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from ttscale.cli.app import app
from ttscale.store import SampleStore
from ttscale.store.check import check_run

runner = CliRunner()

SCRIPTED = ["--engine", "scripted", "--model", "toy", "--benchmark", "arith", "--no-progress"]
SAMPLE = ["sample", *SCRIPTED, "--limit", "6", "--n", "4", "--max-tokens", "12", "--seed", "2",
          "--flush-every", "4", "--batch-size", "4"]  # fmt: skip


def invoke(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args))


def one_line_error(r) -> str:  # type: ignore[no-untyped-def]
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert "Traceback" not in r.output
    return lines[0]


def rows(run: Path) -> list[tuple[str, int, str, int]]:
    t = SampleStore.open(run).table(["text", "seed", "token_ids"]).to_pylist()
    return [(r["problem_id"], r["index"], r["text"], r["seed"], r["token_ids"]) for r in t]


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(b"PAR1 this is not a parquet file at all " * 20)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    r = invoke(*SAMPLE, "--out", str(out))
    assert r.exit_code == 0, r.output
    assert invoke("verify", str(out), "--verifier", "arith").exit_code == 0
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage"])
def test_every_reader_names_the_damaged_shard_and_the_fix(
    tmp_path: Path, reference: Path, how: str
) -> None:
    run = _copy(reference, tmp_path / "run")
    shard = sorted((run / "samples").glob("part-*.parquet"))[1]
    damage(shard, how)
    for args in (["info", str(run)], ["curve", str(run)], ["export", str(run)],
                 ["verify", str(run), "--verifier", "arith", "--force"]):  # fmt: skip
        line = one_line_error(invoke(*args))
        assert str(shard) in line and "is damaged" in line, (args, line)
        assert f"ttscale check {run} --repair" in line and f"sample --out {run} --resume" in line


def test_damaged_verdicts_problems_and_manifest_are_one_line_errors(
    tmp_path: Path, reference: Path
) -> None:
    run = _copy(reference, tmp_path / "run")
    vshard = next((run / "verdicts").glob("*/part-*.parquet"))
    damage(vshard, "truncated")
    line = one_line_error(invoke("curve", str(run)))
    assert str(vshard) in line and f"ttscale verify {run}" in line

    run2 = _copy(reference, tmp_path / "run2")
    damage(run2 / "problems.parquet", "garbage")
    line = one_line_error(invoke("verify", str(run2), "--verifier", "arith"))
    assert str(run2 / "problems.parquet") in line and "--resume" in line

    run3 = _copy(reference, tmp_path / "run3")
    (run3 / "manifest.json").write_text('{"format": "ttscale-run", "model": ')
    line = one_line_error(invoke("info", str(run3)))
    assert str(run3 / "manifest.json") in line and "manifest.backup.json" in line


def test_check_reports_then_repair_moves_aside_and_resume_regenerates(
    tmp_path: Path, reference: Path
) -> None:
    """Damage two sample shards, a verdict shard and the manifest of a copy of a run; check,
    repair, resume and re-verify through the CLI: the result equals the undamaged run sample for
    sample and verdict for verdict, and every damaged file is kept under RUN/damaged/."""
    run = _copy(reference, tmp_path / "run")
    shards = sorted((run / "samples").glob("part-*.parquet"))
    assert len(shards) >= 4  # --flush-every 4: several small shards
    lost = pq.read_metadata(shards[0]).num_rows + pq.read_metadata(shards[2]).num_rows
    damage(shards[0], "truncated")
    damage(shards[2], "garbage")
    vshard = next((run / "verdicts").glob("*/part-*.parquet"))
    damage(vshard, "empty")
    (run / "manifest.json").write_text("{not json")
    damaged_bytes = {p: p.read_bytes() for p in (shards[0], shards[2], vshard)}

    r = invoke("check", str(run))
    assert r.exit_code == 1
    for p in (shards[0], shards[2], vshard, run / "manifest.json"):
        assert f"damaged {p}" in r.output
    assert f"run `ttscale check {run} --repair`" in r.output

    r = invoke("check", str(run), "--repair")
    assert r.exit_code == 0, r.output
    assert f"now run: ttscale sample --out {run} --resume && ttscale verify {run}" in r.output
    for p, data in damaged_bytes.items():  # moved, not deleted, byte for byte
        assert not p.exists()
        assert (run / "damaged" / p.relative_to(run)).read_bytes() == data
    assert json.loads((run / "manifest.json").read_text()) == json.loads(
        (reference / "manifest.json").read_text()
    )
    assert invoke("check", str(run)).exit_code == 0

    r = invoke("sample", "--engine", "scripted", "--no-progress", "--out", str(run), "--resume")
    assert r.exit_code == 0, r.output
    assert f"sampled {lost} new samples ({24 - lost} already stored)" in r.output
    assert rows(run) == rows(reference)
    r = invoke("verify", str(run), "--verifier", "arith", "--json")
    assert r.exit_code == 0, r.output
    ref = SampleStore.open(reference)
    got = SampleStore.open(run)
    name = ref.verifiers()[0]
    cols = ["problem_id", "index", "status", "answer", "correct"]
    assert got.verdict_table(name).select(cols).to_pylist() == (
        ref.verdict_table(name).select(cols).to_pylist()
    )


def test_check_reports_conflicting_shards_and_healthy_runs(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    resp = {f"arith-test-{i:04d}": "#### 1" for i in range(2)}
    assert invoke(*SAMPLE, "--limit", "2", "--out", str(a)).exit_code == 0
    assert invoke(*SAMPLE, "--limit", "2", "--out", str(b),
                  "--engine-opt", "responses=" + json.dumps(resp)).exit_code == 0  # fmt: skip
    report = check_run(a)
    assert report.ok and report.damage == () and report.samples == 8
    stray = next((b / "samples").glob("part-*.parquet"))
    (a / "samples" / stray.name).write_bytes(stray.read_bytes())
    report = check_run(a)
    assert [d.kind for d in report.damage] == ["conflict"] and not report.ok
    r = invoke("check", str(a), "--repair")  # a conflict is reported, never "repaired" by guess
    assert r.exit_code == 1 and "differs from the one in" in r.output
    assert (a / "samples" / stray.name).exists()


def test_check_of_a_non_run_is_one_line(tmp_path: Path) -> None:
    line = one_line_error(invoke("check", str(tmp_path / "nope")))
    assert "is not a directory" in line
    (tmp_path / "empty").mkdir()
    line = one_line_error(invoke("check", str(tmp_path / "empty")))
    assert "not a ttscale run directory" in line


@pytest.mark.slow
def test_repair_and_resume_with_the_bundled_model(tmp_path: Path) -> None:
    """The same round trip on the real bundled model (transformers on CPU)."""
    from ttscale.evals import default_model_path

    model = Path(default_model_path())
    if not (model / "config.json").is_file():
        pytest.skip("the bundled model is not built (python -m ttscale.evals.train_arith)")
    args = ["sample", "--engine", "hf", "--model", str(model), "--benchmark", "arith",
            "--no-progress", "--limit", "3", "--n", "4", "--max-tokens", "48",
            "--flush-every", "4", "--batch-size", "4"]  # fmt: skip
    run, ref = tmp_path / "run", tmp_path / "ref"
    for out in (run, ref):
        assert invoke(*args, "--out", str(out)).exit_code == 0
    shard = sorted((run / "samples").glob("part-*.parquet"))[1]
    lost = pq.read_metadata(shard).num_rows
    damage(shard, "truncated")
    assert "is damaged" in one_line_error(invoke("curve", str(run)))
    assert invoke("check", str(run), "--repair").exit_code == 0
    r = invoke("sample", "--engine", "hf", "--no-progress", "--out", str(run), "--resume",
               "--flush-every", "4", "--batch-size", "4")  # fmt: skip
    assert r.exit_code == 0 and f"sampled {lost} new samples ({12 - lost} already stored)" in r.output
    assert rows(run) == rows(ref)
