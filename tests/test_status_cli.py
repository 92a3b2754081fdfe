"""``fedpetah-server status`` on a large fleet: the fleet summed up, then the devices seen last, not thousands of
lines."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from fedpetah.serving.fleet import DeviceRecord
from server import status as status_cli


def _status(devices: int, connected: set[int]) -> dict[str, object]:
    now = time.time()
    records = []
    for client in range(devices):
        record = DeviceRecord(client, 1000 + client, first_seen=now - 3600, last_seen=now - 10 * client,
                              rounds_trained=client % 3, rejections={"timeout": 1} if client % 20 == 0 else {})
        records.append({**record.to_json(), "connected": client in connected})
    return {"pid": os.getpid(), "state": "training", "updated": now, "tasks": [], "devices": records}


def test_a_large_fleet_is_summed_up_and_the_devices_seen_last_are_listed() -> None:
    # Prepare: 120 devices, the 3 connected ones among those seen longest ago
    status = _status(120, connected={117, 118, 119})

    # Execute
    text = status_cli.render(status, listed=50)
    every = status_cli.render(status, listed=0)

    # Assert: one summary line with every device's counts; 50 rows, the connected first, then the rest
    assert "devices: 120 known, 3 connected; rounds trained 120; rejections timeout 6" in text
    rows = [line.split()[0] for line in text.splitlines() if line[:1].isdigit()]
    assert rows[:3] == ["117", "118", "119"] and rows[3:6] == ["0", "1", "2"] and len(rows) == 50
    assert text.splitlines()[-1].startswith("... and 70 more devices")
    assert len([line for line in every.splitlines() if line[:1].isdigit()]) == 120 and "more devices" not in every


def test_the_command_takes_the_device_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "status.json").write_text(json.dumps({**_status(8, set()), "format_version": 1}))
    assert status_cli.main(["--run-dir", str(tmp_path), "--devices", "5"]) == 0
    assert "... and 3 more devices" in capsys.readouterr().out
