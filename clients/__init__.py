"""Clients of the risk gateway: ``GatewayClient`` (asyncio), ``riskctl`` (command line),
replay files (``clients.replay``). They speak the wire protocol through ``protocol``
and never import ``gateway``."""

from clients.client import AuthenticationError, GatewayClient, GatewayError, Push, PushStream

__all__ = ["AuthenticationError", "GatewayClient", "GatewayError", "Push", "PushStream"]
