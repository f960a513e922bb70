from __future__ import annotations

from taskcast.cli import main

raise SystemExit(main())
