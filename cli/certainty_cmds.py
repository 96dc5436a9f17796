"""CLI: ``ttscale certainty RUN``: exact self-certainty of a stored run's samples from a scoring
pass on an hf model, stored as a score set that ``curve --methods self_certainty`` then uses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ttscale.errors import ConfigError


def register(app: typer.Typer) -> None:
    """Add ``certainty`` to ``app``."""

    @app.command("certainty")
    def certainty_cmd(
        run: Annotated[Path, typer.Argument(help="Run directory (plain-prompt runs with stored token ids).")],
        model: Annotated[
            Optional[str],
            typer.Option(help="hf model folder to score with; its tokenizer must be the run's "
                         "[default: the run's model]."),
        ] = None,
        name: Annotated[
            str, typer.Option(help="Score set to write (curve reads 'self_certainty').")
        ] = "self_certainty",
        force: Annotated[
            bool, typer.Option("--force", help="Replace a set made by another model or setting (kept aside).")
        ] = False,
        device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "auto",
        dtype: Annotated[str, typer.Option(help="auto, float32, float16 or bfloat16.")] = "auto",
        chunk: Annotated[
            int, typer.Option(min=1, help="Samples per stored shard (a kill loses at most one chunk).")
        ] = 64,
        json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    ) -> None:
        """Exact self-certainty of every sample (full next-token distributions, one forward pass
        per trace on the hf engine), stored in RUN/scores/NAME; resumable."""
        from ttscale.engines.hf import HFEngine
        from ttscale.select.certainty import score_certainties
        from ttscale.store import SampleStore

        store = SampleStore.open(run)
        chosen = model or store.manifest.get("model") or (store.manifest.get("engine") or {}).get("model")
        if not chosen:
            raise ConfigError(f"run {run} records no model; pass --model PATH")
        typer.echo(
            f"self-certainty: exact, scoring pass with the hf engine on {chosen} "
            f"({'--model' if model else 'the run model'}) into score set {name!r}",
            err=True,
        )
        engine = HFEngine(str(chosen), device=device, dtype=dtype)
        try:
            summary = score_certainties(store, engine, name=name, force=force, chunk=chunk)
        finally:
            engine.close()
        if json_out:
            typer.echo(json.dumps(summary, indent=2))
            return
        typer.echo(
            f"{summary['scored']:,} samples scored, {summary['already']:,} already in set "
            f"{name!r} ({summary['status']}); {summary['samples']:,} in the run: {run}/scores/{name}"
        )
