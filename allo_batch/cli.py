"""The command line. Only translates: options → configuration, library call, error → exit code.

Heavy libraries (polars, httpx, uvicorn) are imported inside the commands, so ``--help`` is fast.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="allo-batch")
def cli() -> None:
    """Apply corrected Allo call summaries in bulk: rate-limited, resumable, accounted for."""


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8765, show_default=True, help="Port; 0 picks a free one.")
@click.option("--api-key", "api_key", default=None, help="The full-scope key [default: generated].")
@click.option("--write-rate", default=5, show_default=True, help="Writes per second per key.")
@click.option("--read-rate", default=20, show_default=True, help="Reads per second per key.")
@click.option(
    "--world",
    "world_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="World JSON: calls with their completed templates, SMS ids, extra keys.",
)
@click.option(
    "--from-input",
    "from_input",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Make every cll- id of this corrections file exist with the templates its rows name.",
)
@click.option("--faults", default=None, help="Fault spec, e.g. latency=50ms,jitter=20ms,503=0.01.")
@click.option("--seed", default=0, show_default=True, help="Seed for reproducible faults.")
def sandbox(
    host: str,
    port: int,
    api_key: str | None,
    write_rate: int,
    read_rate: int,
    world_file: Path | None,
    from_input: Path | None,
    faults: str | None,
    seed: int,
) -> None:
    """Serve a local simulator of the Allo API until Ctrl-C.

    \b
    Fault spec: comma-separated name=value pairs:
      latency=50ms   jitter=20ms   (latency uniform in 50ms ± 20ms)
      500=P          an INTERNAL_SERVER_ERROR envelope (write not applied)
      502=P  503=P   a non-JSON gateway page (write not applied)
      drop=P         the connection closes without a complete answer (not applied)
      stall=P        the write is applied, the answer held back for stall-time
      stall-time=30s
    Decisions depend only on --seed and each target's request count.

    \b
    Inspection (no key): GET /_sandbox/state[?written=1], POST /_sandbox/reset,
    POST /_sandbox/revoke {"key": "..."}.
    """
    import secrets

    from allo_batch import sandbox as sb
    from allo_batch.sandbox.server import base_url_of, bind_socket, make_server
    from allo_batch.sandbox.world import pairs_from_file

    key = api_key or f"ak_sandbox_{secrets.token_hex(8)}"
    try:
        pairs = pairs_from_file(from_input) if from_input else None
        world = sb.build_world(
            world_file=world_file,
            seed_pairs=pairs,
            api_key=key,
            write_rate=write_rate,
            read_rate=read_rate,
        )
        app = sb.create_app(world, faults=faults, seed=seed)
        sock = bind_socket(host, port)
    except (sb.WorldError, sb.FaultSpecError, OSError) as exc:
        raise click.UsageError(str(exc)) from exc
    url = base_url_of(sock)
    click.echo(f"allo-batch sandbox serving {url}", err=False)
    click.echo(f"  full-scope API key: {key}")
    click.echo(f"  calls: {len(world.calls)}, SMS: {len(world.sms)}, keys: {len(world.keys)}")
    click.echo(f"  state: curl {url}/_sandbox/state    stop: Ctrl-C", nl=True)
    # uvicorn re-raises the Ctrl-C it already handled gracefully.
    with contextlib.suppress(KeyboardInterrupt):
        make_server(app, log_level="info").run(sockets=[sock])
    click.echo("allo-batch sandbox stopped")


def main() -> None:
    """Console-script entry point."""
    cli()
