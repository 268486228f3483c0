"""Offline synthetic brain-MRI slices in the Kaggle "Brain Tumor MRI Dataset" layout.

The real set cannot be redistributed, so the demo, the tests and the benchmarks run on
this generator. Each image is one 2-D slice (axial, coronal or sagittal) of a drawn head:
scalp, skull, CSF, grey and white matter with sulci, ventricles, cerebellum, brainstem
and the pituitary gland, plus one of three tumour types or none. A scanner *site* then
applies its own intensity curve, bias field, noise, resolution, field of view, image
sizes and JPEG quality, and has its own class mix: the sites are the federation's
hospitals. Everything is vectorised numpy on a 256 x 256 working grid.

One module per job, read in this order:

- ``fields``: smooth random fields, head coordinates, soft masks (the drawing primitives);
- ``anatomy``: the layout of one slice through the head;
- ``tumours``: each tumour type's size, place, mass effect and painting;
- ``scanner``: the sites' protocols, tissue signals and acquisition;
- ``phantom``: one slice drawn from all of the above;
- ``presets``: how many images of each class from how many sites;
- ``planning``: which image at which site under which name, each site's evaluation pool and unlabeled images;
- ``writer``: drawing in worker processes, the Kaggle-layout folder, ``Pools/``, ``Unlabeled/``, ``metadata.csv``,
  ``synth.json``;
- ``grid``: the sample grid PNG.

Every image is seeded from (seed, split, class, index), so a seed gives byte-identical
files whatever the number of worker processes; pool images from (seed, 7003, site, class,
index), so the pools never change a Training or Testing image; unlabeled images from (seed, 7004,
site, index), their classes from a stream of their own, so they change nothing else either.
"""

from edgemri.core.data.synth.anatomy import VIEWS
from edgemri.core.data.synth.grid import write_sample_grid
from edgemri.core.data.synth.planning import ABBREVIATIONS, POOL_DIR, POOL_SPLIT, PREFIXES, SPLITS, UNLABELED_DIR
from edgemri.core.data.synth.presets import (
    CLASS_NAMES,
    MAX_UNLABELED_PER_SITE,
    PRESETS,
    SynthError,
    SynthPreset,
    get_preset,
)
from edgemri.core.data.synth.scanner import SEQUENCES, SITE_PROFILES, SiteProfile
from edgemri.core.data.synth.writer import GENERATOR_VERSION, METADATA_COLUMNS, generate

__all__ = [
    "ABBREVIATIONS", "CLASS_NAMES", "GENERATOR_VERSION", "MAX_UNLABELED_PER_SITE", "METADATA_COLUMNS", "POOL_DIR",
    "POOL_SPLIT", "PREFIXES", "PRESETS", "SEQUENCES", "SITE_PROFILES", "SPLITS", "UNLABELED_DIR", "VIEWS",
    "SiteProfile", "SynthError", "SynthPreset", "generate", "get_preset", "write_sample_grid",
]
