"""A resuming Client after SetState or DeleteStream: it numbers from where the stream now is and
never resends readings from before (they would be applied to the new state)."""

from __future__ import annotations

import numpy as np

from cellstream.client import Client
from reference import reference_sequence
from support import MODELS, RunningServer


def test_a_resuming_client_starts_over_after_set_state_and_delete(server: RunningServer) -> None:
    x = np.random.default_rng(21).normal(0.0, 1.0, (4, 8)).astype(np.float32)
    with Client(server.address, resume=True) as client:
        for reading in x[:3]:
            client.step("resume-reset", reading, model="gru")
        client.set_state("resume-reset", {"h": np.zeros(64)}, model="gru", step=0)
        after_set = client.step("resume-reset", x[3], model="gru")
        assert after_set.step == 1  # the three readings before were not sent again
        expected, _ = reference_sequence(MODELS / "gru", x[3:4])
        assert np.allclose(after_set.output, expected[0], atol=1e-5)
        assert client.delete("resume-reset")
        assert client.step("resume-reset", x[3], model="gru").step == 1
