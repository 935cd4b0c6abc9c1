"""``breakhis-ray report``: one self-contained HTML report from the outputs of the other stages.

``<out>/report.html`` embeds every figure as a PNG data URI (``embed_images=false``: relative links instead);
the same PNGs are written to ``<out>/figures/``, the resolved config to ``<out>/config.yaml`` and the library
versions to ``<out>/versions.json``.

Inputs (all optional, see :class:`~breakhis_ray.config.ReportConfig`); a section whose input is not given
stays in the report with a visible note, an input that is given but unreadable is an error:

==================  ==================================================================================
``manifest``        dataset tables: images per class and magnification (Tab. 1), subtypes and patients
``prepare_summary`` ``prepare.json``: class x magnification before (Tab. 1) and after (Tab. 2) enhancement
``train_runs``      run directories: ``history.json`` (list of per-epoch metric dicts), else the latest
                    checkpoint's ``train_state.pt`` history, else ``result.json`` ``kept_checkpoints``
``metrics``         the ``evaluate`` JSON: tables, confusion matrices, per-magnification bars, subtypes
``predictions``     prediction Parquet (file or directory): ROC curves and predicted tiles with probabilities
``segmentation``    segmentation evaluation JSON: Dice/IoU per method and overlay PNG paths
``grid``            experiment grid (JSON records, Parquet or CSV): the papers' tables next to ours
``samples_grid``    PNG of synthetic samples
``configs``         YAML files shown verbatim in the configuration section
==================  ==================================================================================

Grid rows carry ``table`` (``vgg_tab3`` losses, ``vgg_fig4`` strategies, ``vgg_tab4`` magnifications,
``cancernet_tab1`` CNN x segmentation; other names are shown generically), the varying settings (``model``,
``loss``, ``strategy``, ``segmentation``/``segmenter``, ``magnification``), ``protocol`` (``patient``,
``official`` or ``image``), ``fold`` and metric columns (fractions: ``accuracy``, ``precision``, ``recall``,
``f1``, ``patient_recognition_rate`` ...). Each configuration is shown as mean ± std over folds per protocol,
next to the published numbers (:mod:`breakhis_ray.papers`), which come from image-level splits as far as the
papers say.

Layout: :mod:`.inputs` reads the inputs, :mod:`.context` holds them and the figures, :mod:`.sections` builds the
ten sections, :mod:`.html` renders fragments through jinja2 with autoescape (``templates/``), :mod:`.plots`
draws the figures and :mod:`.render` assembles and writes the page.
"""

from __future__ import annotations

from breakhis_ray.papers import METRIC_LABELS, PUBLISHED, PUBLISHED_LABEL, canonical_table
from breakhis_ray.report.context import FIGURES_DIR, REPORT_FILE
from breakhis_ray.report.inputs import read_table
from breakhis_ray.report.render import render_report, run_report
from breakhis_ray.report.sections import SECTIONS

__all__ = ["FIGURES_DIR", "METRIC_LABELS", "PUBLISHED", "PUBLISHED_LABEL", "REPORT_FILE", "SECTIONS",
           "canonical_table", "read_table", "render_report", "run_report"]
