"""`cir demo INDEX`: a local search page over an index (library: cir_cli/demo/app.py).

starlette, uvicorn, torch and the model are imported inside the command, so `cir --help` stays
fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cir_cli.cli.common import CkptOpt, DeviceOpt, _console, cli_command

app = typer.Typer()


@app.command()
@cli_command
def demo(
    index_path: Annotated[Path, typer.Argument(metavar="INDEX", help="Index from `cir index`.")],
    host: Annotated[
        str, typer.Option("--host", help="Address to bind (default: this machine only).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port.")] = 8000,
    k: Annotated[int, typer.Option("-k", "--top-k", min=1, max=100, help="Default results.")] = 12,
    checkpoint: CkptOpt = None,
    device: DeviceOpt = None,
    max_upload_mb: Annotated[
        float, typer.Option("--max-upload-mb", min=0.01, help="Largest upload accepted.")
    ] = 16.0,
    max_side: Annotated[
        int, typer.Option("--max-side", min=1, help="Largest upload side in pixels.")
    ] = 8192,
) -> None:
    """Serve a local web page to search an index: pick or upload a reference, type a text."""
    from cir_cli.demo.app import DemoState, check_port, require_demo_extra, serve

    require_demo_extra()
    check_port(host, port)
    from cir_cli import search as lib

    idx = lib.load_index(index_path)
    model = lib.load_index_model(idx, None, checkpoint, device)
    state = DemoState(idx, model, k, int(max_upload_mb * 1024 * 1024), max_side)
    console = _console()
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(
            f"[yellow]warning:[/] binding {host}: anyone who can reach this machine can search "
            "the index and read its images"
        )
    console.print(f"cir demo: http://{host}:{port}/  ({len(state.names)} images; Ctrl+C stops)")
    serve(state, host, port)
