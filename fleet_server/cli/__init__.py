"""The ``edgefleet`` command line. Exit codes: 0 ok, 1 operation failed, 2 usage error."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from fleet_server.cli.main import run
    except ImportError as e:
        print(
            f"error: the edgefleet CLI needs the server extras ({e.name} is missing); "
            "install them with: pip install 'edgefleet[server]'",
            file=sys.stderr,
        )
        sys.exit(2)
    run()
