"""Does the resize kernel change what a trained classifier says? The demo's holdout cohort scored twice::

    python benchmarks/resize_parity.py [DEMO_OUT]        # default: runs/demo (after `make demo`)

:func:`breakhis_ray.data.transforms.resize_uint8` runs PIL's antialiased bilinear filter with torch's uint8
kernel, whose rounding puts a few values in a thousand one grey level away from PIL's own. This scores every
holdout image with the demo's best checkpoint once with that resize and once with PIL's ``Image.resize``
(everything else the same: decode, model, :class:`~breakhis_ray.inference.Predictor`), and prints one JSON
object: the largest and mean difference of ``prob_malignant``, the labels that flip at 0.5, and the balanced
accuracy and ROC AUC of each.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pil_resize(img, size):
    import numpy as np
    from PIL import Image

    height, width = int(size[0]), int(size[1])
    if img.shape[:2] == (height, width):
        return img
    return np.asarray(Image.fromarray(img).resize((width, height), Image.Resampling.BILINEAR))


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    import breakhis_ray.data.transforms as transforms
    from breakhis_ray.data.manifest import read_manifest
    from breakhis_ray.inference import Predictor

    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0] if args else "runs/demo")
    record = json.loads((out / "demo.json").read_text())
    checkpoint = record["outputs"]["train"]["best_checkpoint"]
    manifest = read_manifest(str(out / "holdout" / "manifest.parquet"))
    paths = list(manifest["path"])
    truth = (manifest["label"] == "malignant").to_numpy(dtype=int)
    probs = {}
    for name, resize in (("torch", transforms.resize_uint8), ("pil", pil_resize)):
        transforms.resize_uint8 = resize  # prepare_uint8 looks the name up at call time
        predictor = Predictor.from_checkpoint(checkpoint)
        column = []
        for i in range(0, len(paths), 64):
            column.extend(predictor.predict_uris(paths[i:i + 64]).column("prob_malignant").to_pylist())
        probs[name] = np.asarray(column, dtype=float)
    diff = np.abs(probs["torch"] - probs["pil"])
    result = {"checkpoint": checkpoint, "images": len(paths), "max_abs_prob_diff": float(diff.max()),
              "mean_abs_prob_diff": float(diff.mean()),
              "label_flips_at_0.5": int(((probs["torch"] >= 0.5) != (probs["pil"] >= 0.5)).sum())}
    for name, p in probs.items():
        result[f"{name}_balanced_accuracy"] = round(float(balanced_accuracy_score(truth, p >= 0.5)), 4)
        result[f"{name}_roc_auc"] = round(float(roc_auc_score(truth, p)), 4)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
