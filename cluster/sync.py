"""``python cluster/sync.py``: copy cluster/common.yaml, verbatim, into the marked block of each cluster file that
shares it (gpu.yaml, onprem.yaml): the file mounts, setup and start commands have one source. ``--check`` changes
nothing and exits 1 when a file is out of step (tests/test_cluster_configs.py runs the same check)."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
COMMON = HERE / "common.yaml"
SHARING = ("gpu.yaml", "onprem.yaml")
BEGIN = "# ---- BEGIN common: cluster/common.yaml, copied by `python cluster/sync.py`; edit it there ----\n"
END = "# ---- END common ----\n"


def synced(text: str, common: str) -> str:
    """``text`` with its block between BEGIN and END replaced by ``common``."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError("the file needs exactly one BEGIN common ... END common block")
    head, rest = text.split(BEGIN)
    return head + BEGIN + common + END + rest.split(END, 1)[1]


def out_of_step() -> list[str]:
    common = COMMON.read_text()
    return [name for name in SHARING if synced((HERE / name).read_text(), common) != (HERE / name).read_text()]


def main(argv: list[str]) -> int:
    try:
        stale = out_of_step()
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if "--check" in argv:
        for name in stale:
            print(f"cluster/{name} is out of step with cluster/common.yaml: run python cluster/sync.py")
        return 1 if stale else 0
    for name in stale:
        path = HERE / name
        path.write_text(synced(path.read_text(), COMMON.read_text()))
        print(f"updated cluster/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
