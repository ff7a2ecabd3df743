"""`mmfm prepare RECIPE`: raw corpora -> tokenized WebDataset shards + manifest.json.

`recipe.py` holds the recipe (sources and their options), `readers.py` turns input files into
records (one reader per source kind, every reject counted; raw WebDataset samples are decoded
later, in the workers), `command.py` tokenizes chunks of records into shards in a pool of workers
and writes the manifest, `fingerprint.py` says what an output was made from, `shaping.py`
holds the sources' rules (condition dropout, caption order, completion-only: applied by
mmfm/tokenization/shaping.py) and counts their realised shares, `tasks.py` reads prompt /
response tasks.
"""

from mmfm.data.manifest import MANIFEST
from mmfm.prepare.command import check_output, dataset_vocab, prepare
from mmfm.prepare.readers import Rejects, iter_records
from mmfm.prepare.recipe import KINDS, PrepareRecipe, PrepareSource, load_prepare_recipe

__all__ = [
    "KINDS",
    "MANIFEST",
    "PrepareRecipe",
    "PrepareSource",
    "Rejects",
    "check_output",
    "dataset_vocab",
    "iter_records",
    "load_prepare_recipe",
    "prepare",
]
