"""Flower edge on devices: the ClientApp and the ``fedpetah-client`` launcher (only code here imports flwr)."""
