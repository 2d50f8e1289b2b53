"""Shadow samples land in the window of the student version that answered them only."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np

from cascade_server.config.delegation import ControllerConfig, ShadowConfig
from cascade_server.gateway.metrics import Metrics
from cascade_server.gateway.shadow import Shadow, _Sample
from cascade_server.gateway.window import Window


class _Teacher:
    async def infer(self, feeds, headers=None, priority=None):
        n = len(next(iter(feeds.values())))
        return np.tile(np.array([[0.0, 5.0]]), (n, 1))  # class 1 for all


def _sample(version: str, stages: list[int]) -> _Sample:
    n = len(stages)
    return _Sample(
        {"input": np.zeros((n, 1), np.float32)},
        np.full(n, 0.95),
        np.array([1, 0, 1][:n]),  # the answers given: two agree with the teacher
        np.array(stages),
        version,
    )


def test_a_retired_versions_samples_do_not_count_in_the_new_versions_window():
    window = Window(ControllerConfig(), strata=10)
    window.reset("v2", stages=3)
    window.counting = True
    shadow = Shadow(
        "c", ShadowConfig(fraction=0.5), SimpleNamespace(teacher=_Teacher()), window, Metrics()
    )

    async def main():
        await shadow._call(_sample("v1", [0, 1, 1]))  # queued before the swap, answered after
        await shadow._call(_sample("v2", [0, 1, 1]))

    asyncio.run(main())
    got = window.roll()
    assert got.shadowed.sum() == 1  # v2's one student sample, by its stratum
    assert got.stage_shadowed.tolist() == [1, 2, 0]  # and v2's two tier samples
    assert got.stage_disagreed.tolist() == [0, 1, 0]
