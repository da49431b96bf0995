"""Replay: rebuild each captured step at its checkpoint and compute exact alignment G."""

from graddyn.replay.run import replay_run

__all__ = ["replay_run"]
