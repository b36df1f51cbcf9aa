"""The calibration recorder's memory bound (blip_export.calibration.RecordingSession): every call kept
below the budget; past it, an even thinning that still spans the whole decoding; arrays shared by
calls (the cross K/V of a request's steps) counted once."""

from __future__ import annotations

import numpy as np

from blip_export.calibration import RecordingSession


class Echo:
    def run(self, graph, feeds, keep=()):
        return {"out": np.zeros(1, np.float32)}


MB = 1 << 20


def _step(i: int, shared=None) -> dict:
    feeds = {"step": np.full(MB // 4, i, np.float32)}  # 1 MiB, new every call (a growing past)
    if shared is not None:
        feeds["cross"] = shared
    return feeds


def test_below_the_budget_every_call_is_kept():
    rec = RecordingSession(Echo(), budget=64 * MB)
    for i in range(40):
        rec.run("decoder_step", _step(i))
    assert [int(f["step"][0]) for f in rec.feeds["decoder_step"]] == list(range(40))


def test_past_the_budget_the_recording_thins_evenly_over_the_whole_run():
    rec = RecordingSession(Echo(), budget=10 * MB)
    for i in range(100):
        rec.run("decoder_step", _step(i))
        rec.run("vision", {"pixel_values": np.zeros(4, np.float32)})  # another graph: untouched
    kept = [int(f["step"][0]) for f in rec.feeds["decoder_step"]]
    print("kept calls", kept)
    assert sum(f["step"].nbytes for f in rec.feeds["decoder_step"]) <= 11 * MB
    strides = set(np.diff(kept))
    assert len(strides) == 1 and kept[0] == 0 and kept[-1] >= 100 - strides.pop(), kept
    assert len(rec.feeds["vision"]) == 100


def test_an_array_shared_by_calls_counts_once():
    shared = np.zeros(8 * MB // 4, np.float32)  # 8 MiB, fed to every step of a request
    rec = RecordingSession(Echo(), budget=32 * MB)
    for i in range(20):
        rec.run("decoder_step", _step(i, shared))
    assert len(rec.feeds["decoder_step"]) == 20  # 20 + 8 MiB distinct, not 20 * 9
