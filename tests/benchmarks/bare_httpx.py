"""The baseline of the client-CPU benchmark: a bare httpx loop, nothing but the PATCHes.

Usage: ``python -m tests.benchmarks.bare_httpx URL INPUT.csv WORKERS`` (key in ALLO_API_KEY).
The same requests as ``allo-batch run`` sends (same bodies, same headers, same pool size), with
no reading, validation, pacing, journal or result file. Prints the request count as JSON.
"""

from __future__ import annotations

import json
import os
import sys

import anyio
import httpx
import polars as pl


async def main(url: str, source: str, workers: int) -> None:
    frame = pl.read_csv(source, infer_schema=False)
    bodies = [
        (call_id, json.dumps({"content": c, "template_key": t}, separators=(",", ":")).encode())
        for call_id, t, c in frame.select("call_id", "template_key", "content").iter_rows()
    ]
    del frame
    headers = {
        "Authorization": f"Api-Key {os.environ['ALLO_API_KEY']}",
        "Content-Type": "application/json",
    }
    limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
    position = iter(bodies)
    done = [0]

    async def worker(client: httpx.AsyncClient) -> None:
        for call_id, body in position:
            answer = await client.patch(
                f"{url}/v2/api/conversations/items/{call_id}/summary", content=body, headers=headers
            )
            if answer.status_code == 200:
                done[0] += 1

    async with (
        httpx.AsyncClient(limits=limits, timeout=30) as client,
        anyio.create_task_group() as group,
    ):
        for _ in range(workers):
            group.start_soon(worker, client)
    print(json.dumps({"requests": len(bodies), "ok": done[0]}))


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]))
