"""``edgefleet models``: the model registry."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fleet_server.cli.context import (
    DEFAULT_SERVER,
    JsonOpt,
    ServerOpt,
    TokenOpt,
    api_client,
    console,
    parse_labels,
    print_json,
)

models_app = typer.Typer(no_args_is_help=True, help="Model registry.")


@models_app.command("push")
def models_push(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="ONNX model file")],
    name: Annotated[str, typer.Option(help="model name")],
    version: Annotated[str, typer.Option(help="semantic version, e.g. 1.0.0")],
    description: Annotated[str, typer.Option(help="free text")] = "",
    calibration: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help=".npz calibration set: one array per input; one sample is one complete feed, "
            "stacked on a new leading axis",
        ),
    ] = None,
    validation: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help=".npz validation set (default: a held-out quarter of the calibration set)",
        ),
    ] = None,
    output_kind: Annotated[
        list[str] | None,
        typer.Option(
            help="OUTPUT=KIND (repeatable): class_scores, embedding, regression, boxes; each "
            "output is gated with a fitting measure (default: auto)"
        ),
    ] = None,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload a model version (with its calibration / validation data for int8 builds)."""
    result = api_client(server, token).upload_model(
        file,
        name,
        version,
        description,
        calibration=calibration,
        validation=validation,
        output_kinds=parse_labels(output_kind),
    )
    if as_json:
        print_json(result)
        return
    ins = ", ".join(f"{s['name']}{s['shape']}:{s['dtype']}" for s in result["inputs"])
    outs = ", ".join(f"{s['name']}{s['shape']}:{s['dtype']}" for s in result["outputs"])
    console.print(
        f"pushed {name} {version} (sha256 {result['source_sha256'][:12]}, opset {result['opset']})"
    )
    console.print(f"  inputs:  {ins}\n  outputs: {outs}")


@models_app.command("list")
def models_list(
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """List models and their versions."""
    models = api_client(server, token).get("/v1/models")
    if as_json:
        print_json(models)
        return
    table = Table("model", "versions", "latest")
    for m in models:
        versions = [v["version"] for v in m["versions"]]
        table.add_row(m["name"], ", ".join(versions), versions[-1] if versions else "-")
    console.print(table)


@models_app.command("show")
def models_show(
    name: str, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """Show a model's versions with their inputs and outputs."""
    model = api_client(server, token).get(f"/v1/models/{name}")
    if as_json:
        print_json(model)
        return
    table = Table("version", "sha256", "size", "opset", "inputs", "outputs", "created")
    for v in model["versions"]:
        table.add_row(
            v["version"],
            v["source_sha256"][:12],
            str(v["size"]),
            str(v["opset"]),
            ", ".join(f"{s['name']}{s['shape']}" for s in v["inputs"]),
            ", ".join(f"{s['name']}{s['shape']}" for s in v["outputs"]),
            v["created_at"][:19],
        )
    console.print(table)
