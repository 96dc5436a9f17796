"""``ttscale serve``: test-time strategies behind an OpenAI-compatible endpoint."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any

import typer

from ttscale.errors import ConfigError

ENGINES = ("auto", "vllm", "hf", "openai", "scripted")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    model: Annotated[str | None, typer.Option("--model", help="Model folder, .gguf or id (default: the bundled arith model).")] = None,
    engine: Annotated[str, typer.Option("--engine", help=f"One of {', '.join(ENGINES)}.")] = "auto",
    base_url: Annotated[list[str] | None, typer.Option("--base-url", help="Server URL(s) for --engine openai.")] = None,
    engine_opt: Annotated[list[str] | None, typer.Option("--engine-opt", help="Engine option KEY=VALUE (JSON values).")] = None,
    preset: Annotated[list[str] | None, typer.Option("--preset", help="NAME=SPEC: a strategy served as model NAME (SPEC: key=value;... or JSON).")] = None,
    default: Annotated[str | None, typer.Option("--default", help="The strategy of requests that name none (SPEC as --preset, or a preset NAME).")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind; another than loopback needs --api-key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to listen on.")] = 8000,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="TTSCALE_API_KEY", help="Require 'Authorization: Bearer KEY'.")] = None,
    max_concurrency: Annotated[int, typer.Option("--max-concurrency", min=1, help="Requests in flight; beyond it 429.")] = 64,
    max_sequences: Annotated[int, typer.Option("--max-sequences", min=1, help="Samples in the engine at once (all requests).")] = 256,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Default max_tokens of a candidate.")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="Default temperature.")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of requests that give none.")] = 0,
    served_name: Annotated[str | None, typer.Option("--served-model-name", help="The bare model's name in /v1/models.")] = None,
) -> None:
    """Serve MODEL with test-time strategies on an OpenAI-compatible API (chat, completions)."""
    import uvicorn

    from ttscale.cli.sample_cmds import _bundled_model, _parse_engine_opts
    from ttscale.engines import choose_engine, describe_engine, make_engine
    from ttscale.serve.app import ServeConfig, build_app
    from ttscale.serve.strategy import StrategySpec, parse_preset
    from ttscale.types import SamplingParams

    if not _loopback(host) and not api_key:
        raise ConfigError(f"--host {host} is not a loopback address: give --api-key (or bind 127.0.0.1)")
    if engine not in ENGINES:
        raise ConfigError(f"unknown --engine {engine!r}; choose one of {', '.join(ENGINES)}")
    presets: dict[str, dict[str, Any]] = {}
    for p in preset or ():
        name, fields = parse_preset(p)
        if name in presets:
            raise ConfigError(f"--preset {name} is given twice")
        presets[name] = fields
    spec = StrategySpec()
    if default is not None:
        if default in presets:
            spec = StrategySpec(**{**spec.to_dict(), **presets[default]})
        else:
            _, fields = parse_preset(f"default={default}")
            spec = StrategySpec(**{**spec.to_dict(), **fields})
    if model is None and engine != "scripted":
        model = str(_bundled_model())
        typer.echo("model: the bundled arith model (no --model)", err=True)
    options = _parse_engine_opts(engine_opt or ())
    if base_url:
        if engine != "openai":
            raise ConfigError("--base-url applies to --engine openai only")
        options["base_urls"] = list(base_url)
    choice = choose_engine(engine, str(model)) if engine != "scripted" else None
    eng = make_engine(choice.kind if choice else "scripted", model, **options)
    info = eng.info()
    typer.echo(describe_engine(info, model=str(model), reason=choice.reason if choice else "scripted"), err=True)
    name = served_name or (str(model).rstrip("/").split("/")[-1] if model else "scripted")
    chat = bool(info.get("chat_template", getattr(eng, "has_chat_template", False)))
    config = ServeConfig(
        model=name, presets=presets, default=spec,
        params=SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed),
        api_key=api_key, max_concurrency=max_concurrency, max_sequences=max_sequences, chat=chat,
    )
    typer.echo(
        f"serving {name!r} on http://{host}:{port}/v1 (presets: {', '.join(presets) or 'none'}; "
        f"default strategy {spec.strategy} {spec.rule} budget {spec.budget}; chat template: {chat}; "
        f"auth: {'on' if api_key else 'off'}; max {max_concurrency} requests in flight)",
        err=True,
    )
    uvicorn.run(build_app(config, eng), host=host, port=port, log_level="warning")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
