"""``python -m keygridd.cli``: run the keygrid command."""

from __future__ import annotations

from keygridd.cli.app import main

raise SystemExit(main())
