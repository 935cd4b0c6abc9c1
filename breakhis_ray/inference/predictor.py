"""The batch predictor: segmentation + classification of decoded images, in plain torch (no Ray).

``Predictor.from_checkpoint(classifier, segmenter)`` rebuilds everything from checkpoint directories alone
(local or ``s3://``); ``predictor(batch)`` maps the decode stage's columns
(:mod:`breakhis_ray.inference.decode_stage`) to a ``pyarrow.Table`` with
:data:`~breakhis_ray.inference.schema.PREDICTION_SCHEMA`. The Ray Data driver
(:mod:`breakhis_ray.inference.driver`) runs it as ``map_batches`` actors; :meth:`Predictor.predict_bytes` and
:meth:`Predictor.predict_uris` run decode + predict in the calling process. This module never imports Ray.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import uuid
from datetime import datetime, timezone
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from breakhis_ray import storage
from breakhis_ray.data.decode import DEFAULT_MAX_PIXELS
from breakhis_ray.domain import BENIGN, MALIGNANT, SUBTYPE_CLASS_LABELS, SUBTYPE_CLASSES
from breakhis_ray.errors import ConfigError
from breakhis_ray.inference.decode_stage import BatchDecoder, read_uri
from breakhis_ray.inference.schema import (
    CHUNK_COLUMN,
    CLASSICAL_SEGMENTERS,
    FEATURE_COLUMNS,
    PREDICTION_SCHEMA,
    SUBTYPE_PREDICTION_SCHEMA,
    SUBTYPE_PROB_COLUMNS,
)


#: Images per classifier forward pass on CPU: small batches keep the activations in cache (measured with
#: ``breakhis-ray bench``'s batch sweep; docs/BENCHMARKS.md).
CPU_FORWARD_BATCH = 4


def new_run_id() -> str:
    """A sortable, unique id for one run (``20250101T120000Z-1a2b3c``)."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


# ================================================================================ models and sizes
def _read_checkpoint_meta(uri: str) -> dict:
    from breakhis_ray.checkpoint import read_meta

    return read_meta(uri.rstrip("/"))


def _is_classical(segmenter: str | None) -> bool:
    return segmenter in CLASSICAL_SEGMENTERS


def resolve_sizes(
    classifier: str,
    segmenter: str | None,
    segment_size: Sequence[int] | None = None,
) -> tuple[dict, tuple[int, int] | None]:
    """``(classifier preprocessing dict, segmenter input (H, W) or None)`` from the checkpoints.

    The segmenter sees ``segment_size`` when given, else the U-Net checkpoint's preprocessing size, else
    (classical methods) the classifier's input size.
    """
    meta = _read_checkpoint_meta(classifier)
    prep = dict(meta["preprocessing"])
    if segmenter is None:
        return prep, None
    if segment_size is not None:
        return prep, (int(segment_size[0]), int(segment_size[1]))
    if _is_classical(segmenter):
        return prep, (int(prep["size"][0]), int(prep["size"][1]))
    seg_meta = _read_checkpoint_meta(segmenter)
    size = seg_meta["preprocessing"]["size"]
    return prep, (int(size[0]), int(size[1]))


def build_segmenter(segmenter: str, options: dict | None = None, device: str = "cpu"):
    """``threshold`` / ``watershed`` by name, or a U-Net from a checkpoint directory (local or s3://)."""
    from breakhis_ray.segmentation import create_segmenter

    options = dict(options or {})
    if _is_classical(segmenter):
        return create_segmenter(segmenter, **options)
    meta = _read_checkpoint_meta(segmenter)
    name = str(meta["model_args"]["name"])
    if not name.startswith("unet_"):
        raise ConfigError(f"segmenter checkpoint {segmenter} holds {name!r}, not a U-Net; "
                          f"give a U-Net checkpoint, {' or '.join(CLASSICAL_SEGMENTERS)}")
    options.setdefault("normalization", meta["preprocessing"].get("scale", "imagenet"))
    options.setdefault("device", device)
    return create_segmenter("unet", checkpoint=segmenter.rstrip("/"), **options)


# ==================================================================================== model stage
def _filename_fields(path: str) -> tuple[str | None, int | None, str | None]:
    from breakhis_ray.data.manifest import parse_filename

    name = posixpath.basename(str(path).split("#", 1)[0].replace("\\", "/"))
    parsed = parse_filename(name)
    if parsed is None:
        return None, None, None
    return parsed.patient_folder, parsed.magnification, parsed.label


def _mask_name(path: str) -> str:
    base = posixpath.basename(str(path).replace("\\", "/"))
    stem = base.rsplit(".", 1)[0] if "." in base else base
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:80] or "image"
    return f"{stem}-{hashlib.sha1(str(path).encode()).hexdigest()[:12]}_nuclei.png"


def _mask_png(labels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.clip(labels, 0, 65535).astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


class Predictor:
    """Segmentation + classification in one actor (Ray Data ``map_batches``) or in a plain loop.

    Loads the classifier checkpoint and the segmenter (U-Net checkpoint, ``threshold``, ``watershed`` or
    ``None``) once, from local paths or ``s3://``. ``__call__`` takes the CPU stage's columns (see
    :mod:`breakhis_ray.inference.decode_stage`) and returns a ``pyarrow.Table`` with
    :data:`PREDICTION_SCHEMA` (plus the chunk id when the input carries one). Rows whose decode failed are passed through as error rows.

    ``device``: ``auto`` (CUDA when this process sees a GPU), ``cpu`` or ``cuda``. ``amp``: bf16 autocast
    on GPU. ``mask_dir``: where nuclei masks are written (``None``: not written). ``tta``: average the class
    probabilities over flips and quarter turns (:mod:`breakhis_ray.inference.tta`). ``explain``: ``gradcam`` or
    ``gradcam++`` writes a class-activation map of the predicted class per image under ``heatmap_dir``
    (:mod:`breakhis_ray.explain`; ``explain_target_layer`` overrides the family's layer) and fills
    ``heatmap_uri``; the probabilities are those of the ordinary pass, unchanged.

    A checkpoint with a calibration temperature (``meta.json`` ``calibration.temperature``) has its logits
    divided by it. A subtype checkpoint (labels = the eight subtypes) adds ``pred_subtype`` and the
    ``prob_<subtype>`` columns (:data:`SUBTYPE_PREDICTION_SCHEMA`); its ``prob_malignant`` is the sum of the
    malignant subtypes' probabilities.

    ``channels_last``: the classifier and its inputs in channels-last layout (``memory_format``), the faster
    convolution layout of oneDNN (CPU) and cuDNN (measured: docs/BENCHMARKS.md); the model runs under
    ``torch.inference_mode``. ``forward_batch_size``: images per classifier forward pass within a batch
    (``None``: :data:`CPU_FORWARD_BATCH` on CPU, the whole batch on GPU).
    """

    def __init__(
        self,
        classifier: str,
        segmenter: str | None = None,
        *,
        segmenter_options: dict | None = None,
        segment_size: Sequence[int] | None = None,
        device: str = "auto",
        amp: bool = True,
        torch_threads: int | None = None,
        mask_dir: str | None = None,
        run_id: str | None = None,
        tta: bool = False,
        explain: str | None = None,
        explain_target_layer: str | None = None,
        heatmap_dir: str | None = None,
        channels_last: bool = True,
        forward_batch_size: int | None = None,
    ) -> None:
        import torch

        from breakhis_ray.checkpoint import load_model, temperature_of
        from breakhis_ray.data.transforms import PreprocessSpec

        self.torch_threads = torch_threads
        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device=cuda but no CUDA device is visible (set num_gpus > 0 for the actors)")
        self.device = torch.device(device)
        self.amp = bool(amp) and self.device.type == "cuda"
        self.classifier_uri = str(classifier)
        self.segmenter_uri = str(segmenter) if segmenter is not None else None
        self.model, self.meta = load_model(self.classifier_uri.rstrip("/"), map_location=self.device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=self.memory_format)
        self.forward_batch_size = forward_batch_size or (CPU_FORWARD_BATCH if self.device.type == "cpu" else None)
        self.labels = list(self.meta["labels"])
        self.subtype = tuple(self.labels) == SUBTYPE_CLASSES
        # the classes whose probabilities add up to prob_malignant
        self.malignant_columns = [i for i, name in enumerate(self.labels)
                                  if name == MALIGNANT or SUBTYPE_CLASS_LABELS.get(name) == MALIGNANT]
        if not self.malignant_columns or not (self.subtype or MALIGNANT in self.labels):
            raise ConfigError(f"classifier {classifier} has labels {self.labels}; inference needs {MALIGNANT!r} "
                              f"or the eight subtypes {list(SUBTYPE_CLASSES)}")
        self.malignant_index = self.labels.index(MALIGNANT) if MALIGNANT in self.labels else None
        self.temperature = temperature_of(self.meta)
        self.tta = bool(tta)
        self.spec = PreprocessSpec.from_dict(self.meta["preprocessing"])
        self.in_channels = int(self.meta["model_args"].get("in_channels", 3))
        self.segmenter = None
        self.segment_size = None
        if segmenter is not None:
            _, self.segment_size = resolve_sizes(self.classifier_uri, self.segmenter_uri, segment_size)
            self.segmenter = build_segmenter(self.segmenter_uri, segmenter_options, device=str(self.device))
        # Segmentation-guided classifiers get the same guidance (mask channel or emphasis) as in training,
        # read from the checkpoint's config.
        from breakhis_ray.segmentation.guided import stage_for_checkpoint

        self.guidance = stage_for_checkpoint(self.classifier_uri, device=str(self.device))
        guided_channels = 4 if self.guidance is not None and self.guidance.guidance.mode == "channel" else 3
        if self.in_channels != guided_channels:
            raise ConfigError(f"classifier {classifier} takes {self.in_channels} input channels but its saved "
                              f"guidance gives {guided_channels}")
        self.mask_dir = mask_dir
        self.run_id = run_id or new_run_id()
        # Class-activation maps (breakhis_ray.explain), written under heatmap_dir when explain is set.
        self.explainer = None
        self.heatmap_dir = heatmap_dir
        if explain:
            from breakhis_ray.explain import GradCAM

            if heatmap_dir is None:
                raise ConfigError(f"explain={explain!r} needs heatmap_dir (where the heatmap PNGs are written)")
            self.explainer = GradCAM(self.model, explain_target_layer, explain)

    @classmethod
    def from_checkpoint(cls, classifier: str, segmenter: str | None = None, **options: Any) -> "Predictor":
        """Rebuild a predictor from checkpoint directories alone (no Ray needed)."""
        return cls(classifier, segmenter, **options)

    # ------------------------------------------------------------------------------ plain loop use
    @property
    def preprocessing(self) -> dict:
        return self.spec.to_dict()

    def decode(self, images: Sequence[bytes], paths: Sequence[str] | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, np.ndarray]:
        """The CPU stage in this process: encoded images -> the batch :meth:`__call__` takes."""
        paths = list(paths) if paths is not None else [f"image-{i}" for i in range(len(images))]
        decoder = BatchDecoder(self.preprocessing, self.segment_size, max_pixels)
        return decoder(paths, list(images), np.zeros(len(paths), dtype=np.int32))

    def predict_bytes(self, images: Sequence[bytes], paths: Sequence[str] | None = None,
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> pa.Table:
        """Predictions (:data:`PREDICTION_SCHEMA`) for encoded images, in this process."""
        out = self(self.decode(images, paths, max_pixels))
        return out.drop_columns([CHUNK_COLUMN])

    def predict_uris(self, uris: Sequence[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> pa.Table:
        """Predictions for files (local or s3://), read and decoded in this process."""
        return self.predict_bytes([read_uri(u) for u in uris], list(uris), max_pixels)

    # ---------------------------------------------------------------------------------- the model
    def _classify(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities ``(N, C)`` float32 of decoded images (temperature-scaled; averaged over the TTA
        views when ``tta`` is on)."""
        import torch

        from breakhis_ray.inference.tta import class_probabilities

        x = self._model_input(images)
        step = self.forward_batch_size or len(x)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            probs = torch.cat([class_probabilities(self.model, x[i:i + step], temperature=self.temperature,
                                                   tta=self.tta) for i in range(0, len(x), step)])
        return probs.cpu().numpy().astype(np.float32)

    def _model_input(self, images: np.ndarray):
        """Decoded uint8 NHWC images -> the normalised model input on the device (guidance applied)."""
        import torch

        from breakhis_ray.data.transforms import normalize

        if self.guidance is not None:
            guided = self.guidance.transform(np.ascontiguousarray(images))
            if self.torch_threads:
                torch.set_num_threads(int(self.torch_threads))
            images = guided["image"]
            if "mask" in guided:
                images = np.concatenate([images, guided["mask"][..., None]], axis=-1)
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        return normalize(x, self.spec, memory_format=self.memory_format)

    def _explain(self, batch: dict[str, np.ndarray], idx: np.ndarray, classes: np.ndarray, paths: list[str],
                 chunks: np.ndarray, uris: list[str | None]) -> None:
        """Class-activation maps of the predicted ``classes`` for rows ``idx``; writes the overlay and the raw
        map (input image size) under ``heatmap_dir`` and fills ``uris`` (the overlays)."""
        from breakhis_ray.explain import heatmap_names, heatmap_pngs

        images = batch["_image"][idx]
        cams, _ = self.explainer(self._model_input(images), class_index=classes)
        for j, i in enumerate(idx):
            folder = storage.join(self.heatmap_dir, f"part-{int(chunks[i]):05d}")
            overlay_name, raw_name = heatmap_names(paths[i], self.explainer.method)
            size = (int(batch["_height"][i]), int(batch["_width"][i]))
            overlay, raw = heatmap_pngs(cams[j], images[j], size)
            storage.write_bytes(storage.join(folder, raw_name), raw)
            uris[i] = storage.join(folder, overlay_name)
            storage.write_bytes(uris[i], overlay)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import torch

        if self.torch_threads:
            torch.set_num_threads(int(self.torch_threads))
        paths = [str(p) for p in batch["path"]]
        n = len(paths)
        ok = np.asarray(batch["_ok"], dtype=bool)
        idx = np.flatnonzero(ok)
        probs = np.full((n, len(self.labels)), np.nan, dtype=np.float32)
        feats = {k: np.full(n, np.nan, dtype=np.float64) for k in FEATURE_COLUMNS}
        mask_uris: list[str | None] = [None] * n
        heatmap_uris: list[str | None] = [None] * n
        chunks = np.asarray(batch.get(CHUNK_COLUMN, np.zeros(n, dtype=np.int32)), dtype=np.int32)
        if idx.size:
            with torch.inference_mode():
                if self.segmenter is not None:
                    seg_images = batch["_seg"][idx] if "_seg" in batch else batch["_image"][idx]
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                        result = self.segmenter.segment(np.ascontiguousarray(seg_images))
                    for j, i in enumerate(idx):
                        for key in FEATURE_COLUMNS:
                            feats[key][i] = float(result.features[j][key])
                    if self.mask_dir is not None:
                        for j, i in enumerate(idx):
                            folder = storage.join(self.mask_dir, f"part-{int(chunks[i]):05d}")
                            uri = storage.join(folder, _mask_name(paths[i]))
                            storage.write_bytes(uri, _mask_png(result.labels[j]))
                            mask_uris[i] = uri
                probs[idx] = self._classify(batch["_image"][idx])
                if self.explainer is not None:
                    self._explain(batch, idx, np.argmax(probs[idx], axis=1), paths, chunks, heatmap_uris)
        prob = probs[:, self.malignant_columns].sum(axis=1, dtype=np.float32)  # nan on error rows
        fields = [_filename_fields(p) for p in paths]
        errors = [None if ok[i] else str(batch["_error"][i]) for i in range(n)]
        now = datetime.now(timezone.utc)
        has_seg = self.segmenter is not None
        columns = {
            "path": pa.array(paths, pa.string()),
            "status": pa.array(["ok" if o else "error" for o in ok], pa.string()),
            "error": pa.array(errors, pa.string()),
            "prob_malignant": pa.array(prob, pa.float32(), mask=~ok),
            "pred_label": pa.array(
                [(MALIGNANT if prob[i] >= 0.5 else BENIGN) if ok[i] else None for i in range(n)], pa.string()),
            "patient_id": pa.array([f[0] for f in fields], pa.string()),
            "magnification": pa.array([f[1] for f in fields], pa.int16()),
            "label": pa.array([f[2] for f in fields], pa.string()),
            "image_height": pa.array(np.asarray(batch["_height"], dtype=np.int32), pa.int32(), mask=~ok),
            "image_width": pa.array(np.asarray(batch["_width"], dtype=np.int32), pa.int32(), mask=~ok),
        }
        feature_mask = ~ok if has_seg else np.ones(n, dtype=bool)
        columns["nuclei_count"] = pa.array(
            np.nan_to_num(feats["nuclei_count"]).astype(np.int32), pa.int32(), mask=feature_mask)
        for key in FEATURE_COLUMNS[1:]:
            columns[key] = pa.array(feats[key].astype(np.float32), pa.float32(), mask=feature_mask)
        columns["mask_uri"] = pa.array(mask_uris, pa.string())
        columns["heatmap_uri"] = pa.array(heatmap_uris, pa.string())
        columns["classifier_checkpoint"] = pa.array([self.classifier_uri] * n, pa.string())
        columns["segmenter_checkpoint"] = pa.array([self.segmenter_uri] * n, pa.string())
        columns["run_id"] = pa.array([self.run_id] * n, pa.string())
        columns["processed_at"] = pa.array([now] * n, pa.timestamp("us", tz="UTC"))
        schema = PREDICTION_SCHEMA
        if self.subtype:
            columns.update(self._subtype_columns(probs, ok))
            schema = SUBTYPE_PREDICTION_SCHEMA
        table = pa.table(columns, schema=schema)
        return table.append_column(CHUNK_COLUMN, pa.array(chunks, pa.int32()))

    def _subtype_columns(self, probs: np.ndarray, ok: np.ndarray) -> dict[str, pa.Array]:
        """``pred_subtype`` and one ``prob_<subtype>`` column per class (null on error rows)."""
        best = np.argmax(np.nan_to_num(probs, nan=-1.0), axis=1)
        out = {"pred_subtype": pa.array([SUBTYPE_CLASSES[b] if o else None for b, o in zip(best, ok)], pa.string())}
        for j, name in enumerate(SUBTYPE_PROB_COLUMNS):
            out[name] = pa.array(probs[:, j], pa.float32(), mask=~ok)
        return out
