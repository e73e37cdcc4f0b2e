"""What a request that leaves a field out means."""

from __future__ import annotations

import numpy as np

from cellstream.client import Client, step_request


def test_a_step_naming_no_model_uses_the_streams_own_model(client: Client) -> None:
    first = client.step("on-lstm", np.ones(8, np.float32), model="lstm")
    again = client.step("on-lstm", np.ones(8, np.float32))  # no model: the stream's, not the default
    assert (first.step, again.step) == (1, 2) and set(again.state) == {"hidden", "cell"}
    replies = list(client.step_stream([step_request("on-lstm", np.ones(8, np.float32), omit_state=True)]))
    assert replies[0].error is None and replies[0].step == 3
    fresh = client.step("fresh-default", np.ones(8, np.float32))  # a new stream: the default model
    assert set(fresh.state) == {"h"}
