"""The raw cost of ``--explain gradcam`` in one process: the classifier's Predictor with and without
class-activation maps on the same pre-decoded batches (the ``explain`` numbers of ``make bench`` without the Ray
pipeline, so it runs in a minute on a busy machine)::

    python benchmarks/explain_raw.py [MODEL] [N_IMAGES]        # defaults: tiny_cnn 48

Images are synthetic 700x460 PNG tiles, the model has random weights at input 224, batch 16, one torch thread;
prints one JSON line per method (gradcam, gradcam++).
"""

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from breakhis_ray.bench.inference import explain_cost, write_checkpoints, write_images  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    model = args[0] if args else "tiny_cnn"
    n_images = int(args[1]) if len(args) > 1 else 48
    work = Path(tempfile.mkdtemp(prefix="bench-explain-"))
    encoded = [Path(p).read_bytes() for p in write_images(work / "images", n_images, (460, 700))]
    classifier, _ = write_checkpoints(work, model, 224, 64)
    for method in ("gradcam", "gradcam++"):
        print(json.dumps({"model": model, "images": n_images,
                          **explain_cost(classifier, encoded, 16, 1, str(work / "heatmaps"), method)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
