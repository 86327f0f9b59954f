"""guardx: adversarially robust dataset distillation (GUARD) as a distributed toolkit."""
__version__ = "0.1.0"
