"""Load fine-tuning metadata of 1,000,000 entries: seconds and peak memory, with sizes and without.

    python benchmarks/metadata_scale.py                     # 1,000,000 entries (a few minutes)
    python benchmarks/metadata_scale.py --entries 100000    # a quicker look

The images are hard links to a few copies of one small JPEG (a million directory entries), in
one folder, named by key with the extension left out of the metadata, as
``merge_captions_to_metadata.py`` writes them. Each run is a fresh process (``load_dataset`` on the
``.json``, resolution 512, one thread per CPU of the budget) and reports wall seconds and peak RSS
(``ru_maxrss``). "with sizes" gives every entry ``image_size``, so no header is read; "without"
reads every header (from the page cache: the files share 17 inodes). The goal (issue #14): well
under 60 s and under 1.5 GB for both. Figures are noisy on a shared machine; rerun to compare.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

OUT = Path(__file__).resolve().parent / "out"
_LINKS_PER_FILE = 60_000

_CHILD = """
import json, resource, sys, time, warnings
warnings.simplefilter("ignore")
import stoker
start = time.perf_counter()
ds = stoker.load_dataset(sys.argv[1], image_dir=sys.argv[2], resolution=512, on_error="skip",
                         progress=lambda done, total: None)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "peak_bytes": peak, "images": len(ds)}))
"""


def build(root: Path, entries: int) -> tuple[Path, Path, Path]:
    images = root / f"images-{entries}"
    with_sizes = root / f"meta-{entries}-sizes.json"
    without = root / f"meta-{entries}.json"
    if not images.exists():
        images.mkdir(parents=True)
        buffer = io.BytesIO()
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(buffer, "JPEG")
        source = images / "source.bin"
        for i in range(entries):
            if i % _LINKS_PER_FILE == 0:  # ext4 allows 65,000 links to one inode
                source.unlink(missing_ok=True)
                source.write_bytes(buffer.getvalue())
            os.link(source, images / f"img{i:07d}.jpg")
        source.unlink()
    for path, sized in ((with_sizes, True), (without, False)):
        if not path.exists():
            entry = {"caption": "a photo", "tags": "one, two"}
            if sized:
                entry["image_size"] = [128, 96]
            path.write_text(json.dumps({f"img{i:07d}": entry for i in range(entries)}))
    return images, with_sizes, without


def measure(metadata: Path, images: Path) -> dict[str, float]:
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(metadata), str(images)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    args = parser.parse_args()
    started = time.perf_counter()
    images, with_sizes, without = build(OUT / "metadata-scale", args.entries)
    print(f"dataset ready in {time.perf_counter() - started:.0f} s: {args.entries:,} entries")
    for label, metadata in (("with image_size", with_sizes), ("without sizes", without)):
        got = measure(metadata, images)
        print(
            f"{label:>16}: {got['seconds']:6.1f} s, peak {got['peak_bytes'] / 2**30:5.2f} GiB, "
            f"{int(got['images']):,} images"
        )


if __name__ == "__main__":
    main()
