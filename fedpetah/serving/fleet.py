"""The server's ledger of devices: who is connected, which images of which task each holds, what each has done.

Transport-free. The ServerApp tells it which nodes are connected and what their hello replies said; the round
steps count what each device trained and why a reply was rejected. Its lasting part (rounds trained, rejections,
images held, the snapshot kept) is saved in the bank's metadata with every round, so a restarted server knows
its devices; connections are runtime facts, learned again from Flower after a restart.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fedpetah.wire.profile import DeviceProfile

FLEET_KEY = "fleet"
"""The bank metadata key of the ledger."""
MAX_DEVICES = 100_000
"""Devices the ledger keeps (the least recently seen are forgotten first beyond this)."""


@dataclass
class DeviceRecord:
    """One device (a simulated client in simulation): ``client`` is its client id (its partition id in
    simulation, its Flower node id on a device); ``holdings[task]`` its images per class, [train, held out];
    ``profile`` the last device profile its hello carried (None: none yet); ``no_budget`` how many train requests
    it answered ``no-budget`` (its memory budget could not hold the work: never a rejection); ``variants`` how
    often it trained each variant, ``peak_memory_mb`` the largest training peak above its resting footprint it
    reported, ``over_budget`` how often it went over its budget (a reported peak above it, or training its own
    guard stopped): see :mod:`fedpetah.serving.variants`."""

    client: int
    node: int
    holdings: dict[int, list[list[int]]] = field(default_factory=dict)
    catalog_size: int = 0  # the catalogue tasks its last hello answered for
    has_backbone: bool = False
    first_seen: float = 0.0
    last_seen: float = 0.0
    rounds_trained: int = 0
    rejections: dict[str, int] = field(default_factory=dict)
    kept_version: int = -1  # the bank version of the snapshot it keeps (-1: none)
    profile: DeviceProfile | None = None
    no_budget: int = 0
    variants: dict[str, int] = field(default_factory=dict)
    peak_memory_mb: float | None = None
    over_budget: int = 0
    connected: bool = False  # runtime only: not saved

    @property
    def simulated(self) -> bool:
        """A simulated client (its client id is a partition id, not its node id): it keeps no snapshot."""
        return self.client != self.node

    def images(self, task: int, column: int = 0) -> int:
        """Images of ``task`` held for training (column 0) or held out (column 1)."""
        return int(sum(row[column] for row in self.holdings.get(task, [])))

    def to_json(self) -> dict[str, Any]:
        saved = asdict(self)
        saved.pop("connected")
        saved["holdings"] = {str(t): rows for t, rows in self.holdings.items()}
        return saved

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> DeviceRecord:
        fields = dict(record)
        fields["holdings"] = {int(t): [[int(n) for n in row] for row in rows]
                              for t, rows in dict(fields.get("holdings", {})).items()}
        fields["rejections"] = {str(k): int(v) for k, v in dict(fields.get("rejections", {})).items()}
        fields["variants"] = {str(k): int(v) for k, v in dict(fields.get("variants", {})).items()}
        profile = fields.get("profile")
        fields["profile"] = DeviceProfile(**profile) if isinstance(profile, dict) else None
        return cls(**fields)


class Fleet:
    """Every device the server has heard from, by client id."""

    def __init__(self, devices: Iterable[DeviceRecord] = ()) -> None:
        self.devices: dict[int, DeviceRecord] = {d.client: d for d in devices}

    @classmethod
    def from_json(cls, record: object) -> Fleet:
        """The ledger saved in a bank (an empty one when there is none, e.g. a bank from before it existed)."""
        if not isinstance(record, list):
            return cls()
        return cls(DeviceRecord.from_json(r) for r in record if isinstance(r, dict))

    def to_json(self) -> list[dict[str, Any]]:
        kept = sorted(self.devices.values(), key=lambda d: d.last_seen, reverse=True)[:MAX_DEVICES]
        return [d.to_json() for d in sorted(kept, key=lambda d: d.client)]

    def connect(self, nodes: Iterable[int]) -> tuple[list[int], list[int]]:
        """Mark exactly ``nodes`` as connected now; returns (nodes to greet: never greeted or back after leaving,
        devices that left). A device that comes back is asked again what it holds (its images may have changed)."""
        now, current = time.time(), set(nodes)
        known = {d.node: d for d in self.devices.values()}
        left, back = [], []
        for device in self.devices.values():
            if device.connected and device.node not in current:
                left.append(device.client)
            elif not device.connected and device.node in current:
                back.append(device.node)
            device.connected = device.node in current
            if device.connected:
                device.last_seen = now
        return sorted({n for n in current if n not in known} | set(back)), left

    def greeted(self, client: int, node: int, has_backbone: bool, holdings: Mapping[int, np.ndarray],
                catalog_size: int, profile: DeviceProfile | None = None) -> DeviceRecord:
        """Record a decoded hello reply of ``node`` (client id ``client``); a reply without a profile keeps the
        last one the device sent (e.g. its worker was restarting)."""
        now = time.time()
        device = self.devices.get(client) or DeviceRecord(client, node, first_seen=now)
        device.node, device.has_backbone, device.connected, device.last_seen = node, has_backbone, True, now
        device.holdings = {t: np.asarray(v).astype(int).tolist() for t, v in holdings.items()}
        device.catalog_size = catalog_size
        device.profile = profile or device.profile
        self.devices[client] = device
        return device

    def node_of(self, client: int) -> int:
        return self.devices[client].node

    def connected(self) -> list[DeviceRecord]:
        return [d for d in self.devices.values() if d.connected]

    def stale(self, catalog_size: int) -> list[int]:
        """Connected nodes whose last hello predates the catalogue's last task (asked again for their images)."""
        return sorted(d.node for d in self.connected() if d.catalog_size < catalog_size)

    def eligible(self, task: int) -> list[int]:
        """Client ids of the connected devices that hold training images of ``task``."""
        return sorted(d.client for d in self.connected() if d.images(task) > 0)

    def holdout(self, task: int, client: int) -> np.ndarray | None:
        """The (classes,) held-out images ``client`` reported for ``task`` (None: none reported)."""
        rows = self.devices[client].holdings.get(task) if client in self.devices else None
        return None if rows is None else np.asarray(rows, dtype=np.int64)[:, 1]

    def count_round(self, trained: Iterable[int], rejected: Iterable[tuple[int, str]],
                    no_budget: Iterable[int] = ()) -> None:
        """Credit the devices whose updates were aggregated; count each rejection by its reason, and each
        ``no-budget`` answer (not a rejection)."""
        for client in trained:
            if client in self.devices:
                self.devices[client].rounds_trained += 1
        for client in no_budget:
            if client in self.devices:
                self.devices[client].no_budget += 1
        for client, reason in rejected:
            if client in self.devices:
                counts = Counter(self.devices[client].rejections)
                counts[reason] += 1
                self.devices[client].rejections = dict(counts)
