"""fedpetah: federated, continual, parameter-efficient adaptation of pruned hybrid vision backbones."""

__version__ = "0.1.0"
