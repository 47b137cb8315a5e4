"""What the teacher writes and the student reads, as bytes: no torch, numpy only.

- :mod:`~distill.format.spec`: the target spec (which teacher entries are stored per position);
- :mod:`~distill.format.codec`, :mod:`~distill.format.blockcodec`,
  :mod:`~distill.format.bitpack`: the member codec written (packed v2);
- :mod:`~distill.format.legacy`: readers of the codecs of earlier versions (npz v0, packed v1);
- :mod:`~distill.format.shards`: WebDataset tar shards of samples, and the WebDataset stage;
- :mod:`~distill.format.manifest`: the manifest, written last, that marks a shard set complete.
"""
