"""Start the sandbox on a free loopback port, send one correction, show the state, stop."""

from __future__ import annotations

import json

import anyio
import httpx

from allo_batch.sandbox import build_world, serve_sandbox


async def main() -> None:
    world = build_world()
    world.add_call("cll-demo", ["MARKDOWN_CLASSIC"])
    async with serve_sandbox(world) as sandbox, httpx.AsyncClient(base_url=sandbox.base_url) as c:
        response = await c.patch(
            "/v2/api/conversations/items/cll-demo/summary",
            json={"content": "# Corrected summary\n"},
            headers={"Authorization": f"Api-Key {sandbox.api_key}"},
        )
        print(response.status_code, json.dumps(response.json()))
        print(json.dumps((await c.get("/_sandbox/state?written=1")).json(), indent=2))


anyio.run(main)
