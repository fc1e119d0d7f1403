"""Offline tools over finished runs, apart from the training core: ``hpc-asgd report``
(Markdown and plots of run folders) and ``hpc-asgd predict`` (the scaling model)."""
