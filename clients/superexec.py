"""``python -m clients.superexec --token-dir DIR ARGS``: Flower's ``flower-superexec ARGS``, except that each app
process it starts reads its task token from an owner-only file in ``DIR`` instead of its command line.

Flower 1.42's subprocess executor starts ``flwr-clientapp --token TOKEN``, and any local user can read a process's
command line (``/proc/PID/cmdline``, ``ps``). The token authenticates every Runtime API call of that task, so
whoever reads it while the ClientApp runs can pull the server's message and push a reply as this device. Here the
token goes into ``DIR/token-*`` (0600; ``DIR`` is fedpetah-client's 0700 runtime dir) and the app gets
``--token-file``, which ``flwr-clientapp`` accepts. Files older than :data:`TOKEN_FILE_S` are removed at the next
launch (a task lasts at most the worker's timeout), and the whole dir when fedpetah-client stops.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from flwr.supercore.cli.flower_superexec import flower_superexec
from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TASK_TYPE_TO_COMMAND, ExecutorType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult, SubprocessExecutor

TOKEN_FILE_S = 3600.0


class TokenFileExecutor(SubprocessExecutor):
    """Flower's subprocess executor with the task token in an owner-only file."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _token_file(self, token: str) -> Path:
        now = time.time()
        for old in self.directory.glob("token-*"):
            with contextlib.suppress(OSError):
                if now - old.lstat().st_mtime > TOKEN_FILE_S:
                    old.unlink()
        path = self.directory / f"token-{secrets.token_hex(8)}"
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(token)
        return path

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        """What Flower's :meth:`SubprocessExecutor.launch` does, with ``--token-file`` for ``--token``."""
        args = [TASK_TYPE_TO_COMMAND[spec.task_type], TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type],
                spec.runtime_api_address, "--token-file", str(self._token_file(spec.token))]
        if spec.insecure:
            args.append("--insecure")
        elif spec.root_certificates_path is not None:
            args += ["--root-certificates", spec.root_certificates_path]
        if spec.parent_pid is not None:
            args += ["--parent-pid", str(spec.parent_pid)]
        if spec.runtime_dependency_install:
            args.append("--allow-runtime-dependency-installation")
        quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        subprocess.Popen(args, **(quiet if spec.suppress_output else {}))  # noqa: S603 - Flower's own command
        return LaunchResult.accepted()


def main(argv: list[str]) -> None:
    """Run flower-superexec with ``argv`` (after ``--token-dir DIR``)."""
    if len(argv) < 2 or argv[0] != "--token-dir":
        raise SystemExit("usage: python -m clients.superexec --token-dir DIR FLOWER_SUPEREXEC_ARGS...")
    executor = TokenFileExecutor(Path(argv[1]))

    def get_executor(executor_type: ExecutorType, *args: Any, **kwargs: Any) -> TokenFileExecutor:
        if executor_type != ExecutorType.SUBPROCESS:
            raise ValueError(f"fedpetah's SuperExec runs apps as local processes only, not {executor_type}")
        return executor

    module = importlib.import_module("flwr.supercore.superexec.run_superexec")
    if not callable(getattr(module, "get_executor", None)):  # a Flower that no longer picks its executor there
        raise SystemExit("this Flower's SuperExec has no get_executor to replace: update clients/superexec.py")
    setattr(module, "get_executor", get_executor)  # noqa: B010 - the one place Flower's SuperExec picks its executor
    sys.argv = ["flower-superexec", *argv[2:]]
    flower_superexec()


if __name__ == "__main__":
    main(sys.argv[1:])
