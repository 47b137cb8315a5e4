"""The embedded demo: its dataset builder (:mod:`~distill.demo.dataset`), a local
fake-gcs-server for demos and tests (:mod:`~distill.demo.fake_gcs`, not product storage) and
the end-to-end run (:mod:`~distill.demo.run`)."""
