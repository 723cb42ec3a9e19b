"""Text summary of a py-spy `--format raw` profile (collapsed stacks): where the samples went,
by own time (the frame on top of the stack) and by inclusive time (anywhere on the stack)."""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
# "function (module/path.py:123)" -> "function (path.py)": lines differ per call site.
_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^:)]*)(?::\d+)?\)$")


def _short(frame: str) -> str:
    found = _FRAME.match(frame)
    if found is None:
        return frame
    path = found["file"]
    for marker in ("site-packages/", "threadline_server/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{found['fn']} ({path})"


def summarize(raw: str, top: int = 40) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        found = _LINE.match(line.strip())
        if found is None:
            continue
        count = int(found["count"])
        frames = [_short(f) for f in found["stack"].split(";") if f]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "no samples\n"
    out = [f"{total} samples", "", "own time (top of stack):"]
    out += [f"{n / total:7.1%}  {f}" for f, n in own.most_common(top)]
    out += ["", "inclusive time (anywhere on the stack):"]
    out += [f"{n / total:7.1%}  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(summarize(Path(sys.argv[1]).read_text()), end="")
