"""An MCP client (the Python SDK, Streamable HTTP) that exercises a server and prints what it saw,
as one JSON object: the tools and resources listed, and the outcome of each call.

usage: client.py URL
"""

import asyncio
import json
import sys

from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client
from mcp.shared.exceptions import McpError


async def outcome(coro):
    try:
        r = await coro
        if hasattr(r, "content"):
            return {"ok": [c.text for c in r.content if hasattr(c, "text")], "is_error": r.isError}
        return {"ok": [c.text for c in r.contents if hasattr(c, "text")]}
    except McpError as e:
        return {"error": {"code": e.error.code, "message": e.error.message, "data": e.error.data}}


async def main(url):
    seen = {}
    async with streamablehttp_client(url) as (read, write, _):
        async with ClientSession(read, write) as s:
            await s.initialize()
            seen["tools"] = sorted(t.name for t in (await s.list_tools()).tools)
            seen["resources"] = sorted(str(r.uri) for r in (await s.list_resources()).resources)
            seen["search"] = await outcome(s.call_tool("search_code", {"query": "x"}))
            seen["delete"] = await outcome(s.call_tool("delete_repo", {"name": "prod"}))
            seen["readme"] = await outcome(s.read_resource("repo://readme"))
            seen["secret"] = await outcome(s.read_resource("file://secret"))
    print(json.dumps(seen), flush=True)


asyncio.run(main(sys.argv[1]))
