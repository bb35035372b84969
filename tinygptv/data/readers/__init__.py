"""One reader per training dataset of the four stages, each in its published layout (reference §6).

Readers are constructed with the dataset's paths (see :mod:`tinygptv.data.registry` for the defaults under a
data root), check the layout at once and load/validate the annotations. Map-style readers offer
``len(reader)`` and ``reader.get(index, rng, batch=None) -> Sample``; the tar-shard reader offers the endless
``reader.iterate(rng, rank, world)``. Every reader has ``iter_samples(rng)`` for a plain pass.
"""

from tinygptv.data.readers.base import (BadRecord, DataLayoutError, MapReader, Reader, RestrictedUnpickler,
                                        Sample, safe_pickle_load)
from tinygptv.data.readers.captions import (CcSbuAlignReader, CocoCaptionReader, TextCapsReader,
                                            WebDatasetCaptionReader, expand_braces, expand_shards)
from tinygptv.data.readers.chat import (LlavaConversationReader, LlavaDetailReader, LlavaReasonReader,
                                        MultitaskConversationReader, UnnaturalInstructionReader)
from tinygptv.data.readers.grounding import (FlickrCaptionToPhraseReader, FlickrGroundedCaptionReader,
                                             FlickrObjectToPhraseReader, InvRefCOCOReader, RefCOCOReader,
                                             VisualGenomeReader)
from tinygptv.data.readers.vqa import AOKVQAReader, GQAReader, OCRVQAReader, VQAReader, answer_weights

__all__ = [
    "AOKVQAReader", "BadRecord", "CcSbuAlignReader", "CocoCaptionReader", "DataLayoutError",
    "FlickrCaptionToPhraseReader", "FlickrGroundedCaptionReader", "FlickrObjectToPhraseReader", "GQAReader",
    "InvRefCOCOReader", "LlavaConversationReader", "LlavaDetailReader", "LlavaReasonReader", "MapReader",
    "MultitaskConversationReader", "OCRVQAReader", "Reader", "RefCOCOReader", "RestrictedUnpickler", "Sample",
    "TextCapsReader", "UnnaturalInstructionReader", "VQAReader", "VisualGenomeReader", "WebDatasetCaptionReader",
    "answer_weights", "expand_braces", "expand_shards", "safe_pickle_load",
]
