"""Entry points (`python -m experiments.<name>`). Started that way, the process first re-executes
itself with huge-page malloc (experiments.launch; NSMAE_HUGEPAGE_MALLOC=0 turns that off)."""

from experiments import launch as _launch

_launch.maybe_relaunch()
