"""The torch peers the benchmarks measure ours against, written as a user of torch would.

- ``ddp.py``: one rank of a torch.distributed (Gloo) training job under ``mpirun``: DDP,
  DDP + post-local SGD, DDP + hierarchical model averaging (``compare.py``); and one
  ``PeriodicModelAverager`` round (``allreduce.py``).
- ``hogwild.py``: pytorch/examples ``mnist_hogwild``: W processes over one shared model
  (``shm_scaling.py``).

Each file is run as a script (``python benchmarks/peers/NAME.py JSON``) and prints one result
line, the JSON after a mark, that its driver parses.
"""
