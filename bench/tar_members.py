"""Large tar members: the shard reader's time per member size, from a file and from `pipe:cat`.

One shard holds one member of 256 MiB, another four of 64 MiB (the same bytes in all), and a
third one of 64 MiB; each is read with `read_tar` keeping the members. A reader that is linear
in the member size reads the 256 MiB member in about the time of the four 64 MiB ones
(`ratio_256_over_4x64` near 1); one that grows the member by concatenation is quadratic (4x).
Each time is the best of interleaved repeats, so a busy moment of the machine hits every case.

    python bench/tar_members.py [--sources file,pipe] [--repeats 3] [--out PATH]
"""

from __future__ import annotations

import argparse
import inspect
import json
import tarfile
import tempfile
import time
from pathlib import Path

from mmfm.data.tario import read_tar

MIB = 1 << 20
SHARDS = {"1 x 64 MiB": [64], "4 x 64 MiB": [64] * 4, "1 x 256 MiB": [256]}


class _Pattern:
    """`size` bytes of a repeated pattern, as a file object for tarfile (no copy held)."""

    def __init__(self, size: int):
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return bytes(range(256)) * (n // 256) + bytes(n % 256)


def write(path: Path, sizes_mib: list[int]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, size in enumerate(sizes_mib):
            info = tarfile.TarInfo(f"{i:04d}.bin")
            info.size = size * MIB
            tar.addfile(info, _Pattern(info.size))


def timed_read(url: str) -> tuple[float, int]:
    kwargs = {}
    if "max_member" in inspect.signature(read_tar).parameters:
        kwargs["max_member"] = 1 << 30  # above every member here
    start = time.perf_counter()
    total = 0
    for item in read_tar(url, 300.0, ("bin",), **kwargs):
        assert isinstance(item, dict), item
        total += len(item["bin"])
    return time.perf_counter() - start, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sources", default="file,pipe")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results/tar_members.json"))
    args = parser.parse_args()
    sources = args.sources.split(",")
    times: dict = {(source, name): [] for source in sources for name in SHARDS}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: Path(tmp) / f"{name.replace(' ', '')}.tar" for name in SHARDS}
        for name, sizes in SHARDS.items():
            write(paths[name], sizes)
        for _ in range(args.repeats):  # interleaved, so that a busy moment hits every case
            for source, name in times:
                url = str(paths[name]) if source == "file" else f"pipe:cat {paths[name]}"
                times[source, name].append(timed_read(url)[0])
    results: dict = {"repeats": args.repeats}
    for (source, name), runs in times.items():
        seconds, mb = min(runs), sum(SHARDS[name]) * MIB / 1e6
        row = {"seconds": round(seconds, 3), "MB_per_s": round(mb / seconds, 1)}
        results.setdefault(source, {})[name] = row
        print(f"{source:5s} {name:12s} {seconds:7.2f} s {mb / seconds:8.1f} MB/s")
    for source in sources:
        rows = results[source]
        ratio = rows["1 x 256 MiB"]["seconds"] / rows["4 x 64 MiB"]["seconds"]
        rows["ratio_256_over_4x64"] = round(ratio, 2)
        print(f"{source}: 256 MiB / (4 x 64 MiB) = {ratio:.2f}")
    out = Path(args.out)
    if out.exists() and "before_fix" in (earlier := json.loads(out.read_text())):
        results["before_fix"] = earlier["before_fix"]  # the reader before issue 29, kept
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
