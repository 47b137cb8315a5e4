"""The student, trained locally from stored shards.

- :mod:`~distill.student.loader`, :mod:`~distill.student.packing`: shards -> batches;
- :mod:`~distill.student.terms`: the loss terms (one definition);
  :mod:`~distill.student.losses` (reference, chunked) and :mod:`~distill.student.kd_kernel`
  (fused) compute them with the LM head;
- :mod:`~distill.student.optim`, :mod:`~distill.student.planner`: optimizers, memory plan;
- :mod:`~distill.student.init`: the initial student; :mod:`~distill.student.train`: the loop;
- :mod:`~distill.student.evaluate`, :mod:`~distill.student.report`: held-out metrics, reports;
- :mod:`~distill.student.observe`, :mod:`~distill.student.distributed`: logs, torchrun.

Never imports :mod:`distill.cloud`.
"""
