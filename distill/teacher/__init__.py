"""The teacher pass, run once: dataset -> sparse targets -> shards + manifest.

- :mod:`~distill.teacher.batching`: token-budget batches of length-sorted samples;
- :mod:`~distill.teacher.extract`: sparse targets from the LM head, chunk by chunk;
- :mod:`~distill.teacher.run`: the pass over each split (resumable, uploads overlap compute);
- :mod:`~distill.teacher.stop`: the stop signal (SIGTERM, GCE preemption notice).

Never imports :mod:`distill.cloud`; the cloud controller runs this package on a VM.
"""
