"""CT ingest vs SimpleITK's ImageSeriesReader on one 256-slice 512 x 512 phantom series, plus measurement time
(measure_s: a 128-slice 512 x 512 phantom, median of three warm runs; measure_256_s: the 256-slice series, first call).

Both readers get the same files from the page cache in the same run (interleaved, medians). SimpleITK receives an
explicit file list already sorted by position, so it does no series discovery; our ingest does everything it does for
a user upload: parallel header scan, series selection, sorting by position, geometry checks, HU conversion.
peak_memory_ratio = peak RSS increase during one ingest / bytes of the int16 volume.
"""

from __future__ import annotations

import tempfile
import time

GOALS = {
    "ingest_vs_simpleitk_time_ratio": ("<=", 1.0),
    "peak_memory_ratio": ("<=", 2.0),
}
LIBRARIES = ("numpy", "pydicom", "SimpleITK", "scipy")


def add_arguments(parser) -> None:
    parser.add_argument("--slices", type=int, default=256)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--skip-measure", action="store_true", help="do not time the measurement module")


def run(args) -> dict:
    import numpy as np
    import SimpleITK as sitk

    from benchmarks.harness import time_interleaved
    from pipelines.ct.dicom import ingest
    from pipelines.ct.measure import measure
    from pipelines.ct.phantom import PhantomConfig, make_phantom, write_series

    t0 = time.perf_counter()
    phantom = make_phantom(args.seed, ["nodule", "pleural_effusion"],
                           PhantomConfig(size=args.size, slices=args.slices, thickness_mm=1.25))
    phantom_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="mmcore-bench-ct-") as tmp:
        files = [str(p) for p in write_series(phantom.volume, tmp)]  # IM00000 ... in ascending z
        del phantom

        def ours():
            return ingest(tmp).volume.hu

        def simpleitk():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            image = reader.Execute()
            sitk.GetArrayViewFromImage(image)  # the numpy view of the voxels, no copy
            return image

        identical = bool(np.array_equal(ours(), sitk.GetArrayFromImage(simpleitk())))
        times = time_interleaved({"ours": ours, "simpleitk": simpleitk}, repeats=args.repeats, warmup=1)
        peak_increase = _peak_rss_in_fresh_process(tmp)
        hu = ingest(tmp).volume
        volume_bytes = hu.hu.nbytes
        measure_s = measure_256_s = None
        if not args.skip_measure:
            t0 = time.perf_counter()
            findings = measure(hu)  # the first call also pays for importing scipy.ndimage and OpenCV
            measure_256_s = time.perf_counter() - t0
            n_findings = len(findings.findings)
    if not args.skip_measure:
        # The report pipeline's target case: a 128-slice series of the same matrix (median of warm runs).
        del hu
        half = make_phantom(args.seed, ["nodule", "pleural_effusion"],
                            PhantomConfig(size=args.size, slices=128, thickness_mm=1.25)).volume
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            measure(half)
            runs.append(time.perf_counter() - t0)
        measure_s = sorted(runs)[1]
    return {
        "ingest_vs_simpleitk_time_ratio": round(times["ours"] / times["simpleitk"], 3),
        "peak_memory_ratio": round(peak_increase / volume_bytes, 3),
        "ingest_s": round(times["ours"], 3),
        "simpleitk_s": round(times["simpleitk"], 3),
        "same_hu_as_simpleitk": identical,
        "volume_mb": round(volume_bytes / 2**20, 1),
        "measure_s": round(measure_s, 3) if measure_s is not None else None,
        "measure_256_s": round(measure_256_s, 2) if measure_256_s is not None else None,
        "measure_findings": n_findings if measure_s is not None else None,
        "phantom_s": round(phantom_s, 2),
        "series": f"{args.slices} x {args.size} x {args.size}, uncompressed, 1 file per slice",
    }


PEAK_SCRIPT = """
import sys
import numpy, pydicom, scipy  # imported before the baseline so only the ingest itself is counted
from benchmarks.harness import PeakRSS
from pipelines.ct import dicom
with PeakRSS() as peak:
    volume = dicom.ingest(sys.argv[1]).volume
print(peak.increase)
"""


def _peak_rss_in_fresh_process(folder: str) -> int:
    """Peak RSS increase (bytes) of one ingest in a new interpreter: a warm allocator would hide the allocation."""
    import subprocess
    import sys

    from benchmarks.harness import ROOT

    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, folder], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    return int(out.stdout.strip().splitlines()[-1])
