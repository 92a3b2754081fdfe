"""Flower edge on the aggregation server: the ServerApp and the ``fedpetah-server`` launcher."""
