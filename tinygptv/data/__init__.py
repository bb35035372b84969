"""Training data: dataset readers in their published layouts, the custom JSONL format, and the weighted
mixture loader of the reference runner.

Typical use::

    from tinygptv.data import MixtureLoader, build_mixture
    loader = MixtureLoader(build_mixture("stage4", data_root), image_size=448, seed=42, rank=r, world_size=w)
    batch = next(loader)                      # one dataset per step
    out = model(batch.examples, batch.pixels, max_txt_len=1024)
"""

from tinygptv.data.custom import CustomJsonlReader, JsonlReport, check_jsonl, convert_llava_json, export_llava_json
from tinygptv.data.mixing import MixtureBatch, MixtureDataset, MixtureLoader, collate, load_pixels
from tinygptv.data.readers import BadRecord, DataLayoutError, MapReader, Reader, Sample, safe_pickle_load
from tinygptv.data.registry import DATASETS, UPSTREAM_MIXTURES, DatasetSpec, build_mixture, build_reader, dataset_spec

__all__ = [
    "BadRecord", "CustomJsonlReader", "DATASETS", "DataLayoutError", "DatasetSpec", "JsonlReport", "MapReader",
    "MixtureBatch", "MixtureDataset", "MixtureLoader", "Reader", "Sample", "UPSTREAM_MIXTURES", "build_mixture",
    "build_reader", "check_jsonl", "collate", "convert_llava_json", "dataset_spec", "export_llava_json",
    "load_pixels", "safe_pickle_load",
]
