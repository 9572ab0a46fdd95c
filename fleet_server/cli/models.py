"""``edgefleet models``: the model registry."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from fleet_server.cli.context import (
    DEFAULT_SERVER,
    JsonOpt,
    ServerOpt,
    TokenOpt,
    api_client,
    console,
    parse_duration_s,
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
    card: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="model card (Markdown, at most 64 KiB)"),
    ] = None,
    meta: Annotated[
        list[str] | None,
        typer.Option(
            help="KEY=VALUE (repeatable): training data reference, commit, owner, offline "
            "metrics (keys are identifiers)"
        ),
    ] = None,
    parent: Annotated[
        list[str] | None,
        typer.Option(help="a version of this model it was derived from (repeatable)"),
    ] = None,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload a model version (with its calibration / validation data for int8 builds, its
    model card, metadata and parents). A version is immutable once pushed."""
    result = api_client(server, token).upload_model(
        file,
        name,
        version,
        description,
        calibration=calibration,
        validation=validation,
        output_kinds=parse_labels(output_kind),
        card=card,
        meta=parse_labels(meta),
        parents=parent,
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


@models_app.command("annotate")
def models_annotate(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="ONNX model file")],
    image_input: Annotated[str, typer.Option(help="the input an image feeds")],
    size: Annotated[str, typer.Option(help="HEIGHTxWIDTH the image is resized to, e.g. 224x224")],
    layout: Annotated[str, typer.Option(help="NCHW or NHWC")] = "NCHW",
    channels: Annotated[str, typer.Option(help="RGB, BGR or L (grey)")] = "RGB",
    scale: Annotated[float, typer.Option(help="pixel values (0..255) are multiplied by this")] = (
        1 / 255
    ),
    mean: Annotated[
        str | None,
        typer.Option(help="per-channel mean taken off after scaling: 0.485,0.456,0.406"),
    ] = None,
    std: Annotated[
        str | None, typer.Option(help="per-channel divisor after the mean, e.g. 0.229,0.224,0.225")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(dir_okay=False, help="write here (default: FILE itself)")
    ] = None,
) -> None:
    """Record in the ONNX file how an image becomes the model's input (resize, channels,
    scale, mean/std, layout). Builds carry it into the signed bundle; ``edge-agent score``
    then scores image files (JPEG, PNG, …) as the model was trained to see them."""
    from converters.onnx.annotate import annotate
    from edge_agent.bundle import ImagePreprocess
    from edge_agent.contracts.errors import ConfigError
    from edge_agent.contracts.structs import error_field

    try:
        height, width = (int(d) for d in size.lower().split("x"))
        given = {
            "input": image_input,
            "size": (height, width),
            "layout": layout.upper(),
            "channels": channels.upper(),
            "scale": scale,
            "mean": [float(v) for v in mean.split(",")] if mean else None,
            "std": [float(v) for v in std.split(",")] if std else None,
        }
    except ValueError as e:
        raise ConfigError(f"--size must be HEIGHTxWIDTH, --mean/--std numbers: {e}") from e
    try:
        # Decoded, not constructed: a struct's constructor does not check its fields' types.
        spec = ImagePreprocess.from_dict(given)
    except ValueError as e:
        field, message = error_field(e)
        raise ConfigError(f"{field or 'preprocess'}: {message}") from e
    target = out or file
    annotate(file, target, spec)
    console.print(
        f"{target}: images feed {spec.input} as {list(spec.input_shape())} ({spec.layout}, "
        f"{spec.channels}, x{spec.scale:g}"
        + (f", mean {spec.mean}" if spec.mean else "")
        + (f", std {spec.std}" if spec.std else "")
        + "); push this file to carry it into its bundles"
    )


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
    name: str,
    version: Annotated[str | None, typer.Argument(help="one version in full")] = None,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a model's versions with their inputs and outputs; with VERSION, that version's
    lineage, card, metadata, builds with their parity figures, and where it runs now."""
    if version is not None:
        _show_version(api_client(server, token).get(
            f"/v1/models/{name}/versions/{version}/overview"), as_json)  # fmt: skip
        return
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


def _show_version(v: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(v)
        return
    console.print(
        f"[bold]{v['model']} {v['version']}[/bold]  sha256 {v['source_sha256'][:12]}  "
        f"{v['size']} bytes  opset {v['opset']}  pushed {v['created_at'][:19]} by {v['created_by']}"
    )
    lineage = v["lineage"]
    console.print(
        "lineage: "
        + (" ← ".join([v["version"], *lineage["ancestors"]]) if lineage["ancestors"] else "root")
        + (f"; derived from it: {', '.join(lineage['children'])}" if lineage["children"] else "")
    )
    if v["description"]:
        console.print(v["description"])
    ins = ", ".join(f"{s['name']}{s['shape']}:{s['dtype']}" for s in v["inputs"])
    outs = ", ".join(f"{s['name']}{s['shape']}:{s['dtype']}" for s in v["outputs"])
    console.print(f"inputs:  {ins}\noutputs: {outs}")
    if v["meta"]:
        meta = Table("key", "value", title="metadata")
        for key, value in sorted(v["meta"].items()):
            meta.add_row(key, value)
        console.print(meta)
    builds = Table("profile", "runtime", "precision", "size", "max abs err", "top-1 agree",
                   "speedup", "bundle", title="builds")  # fmt: skip
    for b in v["bundles"]:
        p = b["parity"]
        builds.add_row(b["profile"], b["runtime"], b["precision"], str(b["size"]),
                       _num(p.get("max_abs_error")), _num(p.get("top1_agreement")),
                       _num(p.get("speedup")), b["bundle_sha256"][:12])  # fmt: skip
    console.print(builds if v["bundles"] else "builds: none yet (edgefleet builds create)")
    running = v["running"]
    where = ", ".join(f"{n} on {p}" for p, n in sorted(running["by_profile"].items()))
    console.print(f"runs on {running['devices']} device(s)" + (f": {where}" if where else ""))
    if v["card"]:
        from rich.markdown import Markdown  # markdown-it: only for a card

        console.print(Markdown(v["card"]))


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}"


@models_app.command("diff")
def models_diff(
    name: Annotated[str, typer.Argument(help="model name")],
    a: Annotated[str, typer.Argument(help="the version deployed now")],
    b: Annotated[str, typer.Argument(help="the version to compare with it")],
    since: Annotated[str, typer.Option(help="telemetry window, e.g. 1h, 24h, 7d")] = "24h",
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Two versions side by side: what would break a caller of A, size, precision and parity
    per profile, and p95 latency, error rate, accuracy and drift where telemetry exists."""
    d = api_client(server, token).get(
        f"/v1/models/{name}/diff", params={"a": a, "b": b, "since_s": parse_duration_s(since)}
    )
    if as_json:
        print_json(d)
        return
    if d["compatible"]:
        console.print(f"{name} {b} takes {a}'s inputs and outputs: callers need no change")
    else:
        console.print(f"[red]{name} {b} breaks callers of {a}:[/red]")
        for change in d["io_differences"]:
            console.print(f"  - {change}")
    table = Table("profile", "", f"{a}", f"{b}", title=f"{name}: {a} vs {b} (telemetry: {since})")
    for profile, entry in d["profiles"].items():
        rows: list[tuple[str, Any, Any]] = []
        built = (entry["a"] or {}), (entry["b"] or {})
        rows.append(("precision", built[0].get("precision"), built[1].get("precision")))
        rows.append(("size", built[0].get("size"), built[1].get("size")))
        for key in ("max_abs_error", "top1_agreement"):
            rows.append((key, (built[0].get("parity") or {}).get(key),
                         (built[1].get("parity") or {}).get(key)))  # fmt: skip
        seen = entry.get("telemetry") or {}
        ta, tb = seen.get("a") or {}, seen.get("b") or {}
        for key in ("p95_ms", "error_rate", "accuracy", "worst_psi"):
            if ta.get(key) is not None or tb.get(key) is not None:
                rows.append((key, ta.get(key), tb.get(key)))
        for i, (label, x, y) in enumerate(rows):
            table.add_row(profile if i == 0 else "", label, _cell(x), _cell(y))
    console.print(table)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
