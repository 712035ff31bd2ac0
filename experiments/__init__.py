"""Entry points (`python -m experiments.<name>`). Started that way, the process first re-executes
itself with huge-page malloc, and jemalloc preloaded where the system has it (experiments.launch;
NSMAE_JEMALLOC=0 keeps glibc, NSMAE_HUGEPAGE_MALLOC=0 turns both off)."""

from experiments import launch as _launch

_launch.maybe_relaunch()
