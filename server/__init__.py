"""The coordinator side: the ServerApp, strategies, reports and the simulation launcher."""
