"""shoal: a self-contained container orchestrator.

One agent per host; a few agents are servers that hold the cluster state. This package
is the shared core: manifests, the data model, errors, the generated wire contract
(`shoal.v1`) and the client library. The agent, the leader and the CLI live in
`shoal.agent`, `shoal.leader` and `shoal.cli`.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
