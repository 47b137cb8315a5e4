"""The teacher pass, run once: dataset -> sparse targets -> shards + manifest.

- :mod:`~distill.teacher.batching`: token-budget batches of length-sorted samples;
- :mod:`~distill.teacher.extract`: sparse targets from the LM head, chunk by chunk;
- :mod:`~distill.teacher.run`: the pass over each split (resumable, uploads overlap compute);
- :mod:`~distill.teacher.layered`: the layered pass, one decoder layer at a time (a teacher
  bigger than the device);
- :mod:`~distill.teacher.fit`: peak memory and throughput of each way to run the teacher;
- :mod:`~distill.teacher.stop`: the stop signal (SIGTERM, GCE preemption notice).

Never imports :mod:`distill.cloud`; the cloud controller runs this package on a VM.
"""
