"""The small GPT of the benchmarks; it lives in :mod:`metaopt.jobs.gpt` (the ``metaopt run`` job
trains it too). Kept here so that ``from gpt import GPT, GPTConfig`` keeps working."""

from metaopt.jobs.gpt import *  # noqa: F401,F403
from metaopt.jobs.gpt import GPT, Block, GPTConfig  # noqa: F401  (explicit, for linters)
