"""An MCP server (the Python SDK's FastMCP, Streamable HTTP) for the MCP governance tests.

usage: server.py PORT [--json]   (--json: JSON responses instead of SSE streams)
"""

import sys

from mcp.server.fastmcp import FastMCP
from mcp.server.transport_security import TransportSecuritySettings

port = int(sys.argv[1])
json_response = "--json" in sys.argv[2:]

mcp = FastMCP(
    "cellgate-test",
    host="127.0.0.1",
    port=port,
    json_response=json_response,
    # The client reaches it by a name (mcp.life) through the boundary.
    transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
)


@mcp.tool()
def search_code(query: str) -> str:
    """Search the code."""
    return f"found {query}"


@mcp.tool()
def get_issue(number: int) -> str:
    """Read an issue."""
    return f"issue {number}"


@mcp.tool()
def delete_repo(name: str) -> str:
    """Delete a repository."""
    print(f"DELETED {name}", flush=True)
    return f"deleted {name}"


@mcp.resource("repo://readme")
def readme() -> str:
    """The README."""
    return "read me"


@mcp.resource("file://secret")
def secret() -> str:
    """A secret."""
    print("SECRET READ", flush=True)
    return "the secret"


mcp.run(transport="streamable-http")
