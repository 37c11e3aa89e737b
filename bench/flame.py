"""Where a py-spy flame graph's samples are spent: self time by function and by package.

py-spy writes flame graphs as SVG (inferno's format): one ``<rect>`` per frame
with ``fg:x``/``fg:w`` (first sample, sample count) and ``y`` (its depth). A
frame's self samples are its own less those of the frames directly above it.
``bench/overhead.py --profile`` prints this summary for every flame graph it
writes; run it alone on saved ones:

    .venv/bin/python bench/flame.py /tmp/prof/*.svg [--top 12]
"""

from __future__ import annotations

import argparse
import collections
import itertools
import re
from dataclasses import dataclass
from pathlib import Path

_FRAME = re.compile(
    r'<title>(?P<title>[^<]*)</title><rect x="[^"]*" y="(?P<y>[\d.]+)"[^>]*?'
    r'fg:x="(?P<x>\d+)" fg:w="(?P<w>\d+)"'
)
_NAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]+)(?::\d+)?\) \(\d[\d,]* samples")


@dataclass(frozen=True)
class Frame:
    """One frame of the graph."""

    name: str  # "function (file)" without the line
    package: str  # what the file belongs to: "grpc", "redis", "services.cache", …
    depth: float
    first: int
    samples: int


def _package(path: str) -> str:
    parts = Path(path).with_suffix("").parts
    if not parts:
        return "?"
    if parts[0] == "services" and len(parts) > 1:
        return ".".join(parts[:2])
    if parts[0] in ("orchestra", "gen"):
        return "generated protobuf"
    return parts[0]


def frames(svg: str) -> list[Frame]:
    """Every frame of a py-spy SVG."""
    out = []
    for match in _FRAME.finditer(svg):
        title = match["title"].replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
        named = _NAME.match(title)
        func, file = (named["func"], named["file"]) if named else (title, "?")
        out.append(
            Frame(
                name=f"{func} ({file})",
                package=_package(file),
                depth=float(match["y"]),
                first=int(match["x"]),
                samples=int(match["w"]),
            )
        )
    return out


Counts = collections.Counter[str]


def self_samples(graph: list[Frame]) -> tuple[Counts, Counts, int]:
    """Self samples by function and by package, and the total."""
    by_depth: dict[float, list[Frame]] = collections.defaultdict(list)
    for frame in graph:
        by_depth[frame.depth].append(frame)
    depths = sorted(by_depth)
    step = min((b - a for a, b in itertools.pairwise(depths)), default=16.0)
    functions: Counts = collections.Counter()
    packages: Counts = collections.Counter()
    for frame in graph:
        above = by_depth.get(frame.depth - step, [])
        children = sum(
            c.samples for c in above if frame.first <= c.first < frame.first + frame.samples
        )
        own = frame.samples - children
        if own > 0:
            functions[frame.name] += own
            packages[frame.package] += own
    total = sum(packages.values())
    return functions, packages, total


def summary(path: Path, top: int = 10) -> str:
    """A text table of the top functions and packages by self time."""
    functions, packages, total = self_samples(frames(path.read_text()))
    if not total:
        return f"{path.name}: no samples"
    lines = [f"{path.name}: {total} samples; self time by package, then by function"]
    for name, count in packages.most_common(top):
        lines.append(f"  {100 * count / total:5.1f}%  {name}")
    lines.append("  --")
    for name, count in functions.most_common(top):
        lines.append(f"  {100 * count / total:5.1f}%  {name}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("svgs", nargs="+", type=Path, help="py-spy flame graphs")
    parser.add_argument("--top", type=int, default=10, help="rows per table")
    args = parser.parse_args()
    for path in args.svgs:
        print(summary(path, args.top))
        print()


if __name__ == "__main__":
    main()
