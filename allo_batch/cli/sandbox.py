"""``sandbox``: serve the local simulator of the API."""

from __future__ import annotations

from pathlib import Path

import click

from allo_batch.cli import cli
from allo_batch.cli.options import SANDBOX_OPTIONS, declared


class _SandboxCommand(click.Command):
    """``sandbox --help`` ends with the personas and what each one chooses."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from allo_batch.sandbox.personas import describe_personas

        with formatter.section("Personas (--persona)"):
            for line in describe_personas().splitlines():
                formatter.write(f"{'':{formatter.current_indent}}{line}\n")


@cli.command(cls=_SandboxCommand)
@declared(SANDBOX_OPTIONS)
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
    persona: str,
) -> None:
    """Serve a local simulator of the Allo API until Ctrl-C.

    \b
    Fault spec: comma-separated name=value pairs:
      latency=50ms   jitter=20ms   (latency uniform in 50ms ± 20ms)
      500=P          an INTERNAL_SERVER_ERROR envelope (write not applied)
      502=P 503=P 504=P  a gateway error: HTML page or envelope, per persona (not applied)
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
    from allo_batch.sandbox.background import serve_forever
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
        serve_forever(
            world,
            key,
            host=host,
            port=port,
            say=click.echo,
            faults=faults,
            seed=seed,
            persona=persona,
        )
    except (sb.WorldError, sb.FaultSpecError, sb.UnknownPersonaError, OSError) as exc:
        raise click.UsageError(str(exc)) from exc
