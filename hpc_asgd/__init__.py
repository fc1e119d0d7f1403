"""hpc_asgd: asynchronous, local and hierarchical data-parallel SGD on HPC clusters."""

__version__ = "0.1.0"
