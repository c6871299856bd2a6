"""A Keras callback the fixed-budget benchmarks share: training that stops at a wall-clock deadline."""

from __future__ import annotations

import time

import keras


class StopAt(keras.callbacks.Callback):
    """Stops training at a wall-clock deadline (a time.time() value), or `seconds` after fit begins; counts the steps,
    and `start` is when the first step ended (its tracing and compiling are not counted as training)."""

    def __init__(self, deadline: float | None = None, seconds: float | None = None):
        super().__init__()
        if (deadline is None) == (seconds is None):
            raise ValueError("StopAt takes a deadline or seconds, one of the two")
        self.deadline, self.seconds, self.steps, self.start = deadline, seconds, 0, None

    def on_train_begin(self, logs=None):
        if self.seconds is not None:
            self.deadline = time.time() + self.seconds

    def on_train_batch_end(self, batch, logs=None):
        self.start = self.start or time.perf_counter()
        self.steps += 1
        if time.time() > self.deadline:
            self.model.stop_training = True
