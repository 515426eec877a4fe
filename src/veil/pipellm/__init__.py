"""PipeLLM's policy: predictors of upcoming transfers and the speculator of IV reservations.

Pure code (no threads, clock or crypto), shared by the `pipellm` transport and the simulator.
See docs/pipellm.md for the design and the driving loop.
"""

from veil.pipellm.decisions import (
    UNSEALED_VERSION,
    Commit,
    Decision,
    PadThenCommit,
    Relinquish,
    RelinquishReason,
    Reservation,
    ReservationState,
    SealJob,
    SealNow,
    SpeculatorConfig,
    SpeculatorStats,
    Wait,
)
from veil.pipellm.keys import Direction, KiB, MiB, SizeClass, SizeClasses, TransferKey
from veil.pipellm.predictors import (
    CompositePredictor,
    CyclicPredictor,
    HintPredictor,
    Predictor,
    QueuePredictor,
    SwapPredictor,
    default_predictor,
)
from veil.pipellm.speculator import Speculator

__all__ = [
    "UNSEALED_VERSION",
    "Commit",
    "CompositePredictor",
    "CyclicPredictor",
    "Decision",
    "Direction",
    "HintPredictor",
    "KiB",
    "MiB",
    "PadThenCommit",
    "Predictor",
    "QueuePredictor",
    "Relinquish",
    "RelinquishReason",
    "Reservation",
    "ReservationState",
    "SealJob",
    "SealNow",
    "SizeClass",
    "SizeClasses",
    "Speculator",
    "SpeculatorConfig",
    "SpeculatorStats",
    "SwapPredictor",
    "TransferKey",
    "Wait",
    "default_predictor",
]
