"""A Keras callback the fixed-budget benchmarks share: training that stops at a wall-clock deadline."""

from __future__ import annotations

import time

import keras


class StopAt(keras.callbacks.Callback):
    """Stops training at a wall-clock deadline (a time.time() value); counts the steps, and `start` is when the first
    step ended (its tracing and compiling are not counted as training)."""

    def __init__(self, deadline: float):
        super().__init__()
        self.deadline, self.steps, self.start = deadline, 0, None

    def on_train_batch_end(self, batch, logs=None):
        self.start = self.start or time.perf_counter()
        self.steps += 1
        if time.time() > self.deadline:
            self.model.stop_training = True
