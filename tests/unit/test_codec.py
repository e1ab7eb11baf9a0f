"""The envelope: versions are checked before anything is unpickled."""

from __future__ import annotations

import pytest

from flame_magic import codec
from flame_magic.protocol import cell


def test_request_round_trip_keeps_values():
    request = cell.CellRequest(
        header=codec.local_header(),
        source="x + 1",
        inputs=[cell.Value(name="x", pickle=codec.dumps({"a": [1, 2]}))],
    )
    decoded = codec.decode(cell.CellRequest, codec.encode(request), "the notebook")
    assert decoded.source == "x + 1"
    assert codec.loads(decoded.inputs[0].pickle) == {"a": [1, 2]}


def test_closures_and_lambdas_travel_by_value():
    factor = 3

    def scale(v):
        return v * factor

    assert codec.loads(codec.dumps(scale))(2) == 6
    assert codec.loads(codec.dumps(lambda: factor))() == 3


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("python", "2.7", "Python 2.7 there"),
        ("cloudpickle", "0.1.0", "cloudpickle 0.1.0 there"),
        ("protocol", 99, "protocol 99"),
    ],
)
def test_mismatched_writer_is_refused_with_what_to_do(field, value, expected):
    header = codec.local_header()
    setattr(header, field, value)
    payload = codec.encode(cell.CellResult(header=header, value=cell.Value(pickle=b"never unpickled")))
    with pytest.raises(codec.PayloadError) as info:
        codec.decode(cell.CellResult, payload, "the runner")
    assert expected in str(info.value)
    assert "the runner" in str(info.value) or "both sides" in str(info.value)


def test_garbage_and_headerless_payloads_are_refused():
    with pytest.raises(codec.PayloadError, match="not a flame-magic"):
        codec.decode(cell.CellResult, b"\xff\xff\xff", "the runner")
    with pytest.raises(codec.PayloadError, match="without a version header"):
        codec.decode(cell.CellResult, codec.encode(cell.CellResult()), "the runner")


def test_unpicklable_value_raises_unpicklable_error():
    import threading

    with pytest.raises(codec.UnpicklableError, match="lock"):
        codec.dumps(threading.Lock())
