"""Resource options, session keys, and the per-item payloads of a map."""

from __future__ import annotations

import pytest

from flame_magic import codec
from flame_magic.capture import ShipError
from flame_magic.fanout import NOT_DONE
from flame_magic.items import batch_input, item_payloads
from flame_magic.protocol import cell, types
from flame_magic.sessions import (
    RequestError,
    Resources,
    SessionKey,
    check_name,
    fits,
    format_memory,
    parse_count,
    parse_memory,
    parse_resources,
    take_map_option,
)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1073741824", 1024**3),
        ("512Mi", 512 * 1024**2),
        ("2Gi", 2 * 1024**3),
        ("1.5Gi", 3 * 1024**3 // 2),
        ("1G", 1000**3),
        ("64k", 64_000),
        ("2GiB", 2 * 1024**3),
        (" 8 Mi ", 8 * 1024**2),
    ],
)
def test_memory_sizes(text, size):
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["lots", "-1Gi", "0", "2 GB extra", "1Zi", "", "0.0001"])
def test_bad_memory_says_what_is_accepted(text):
    with pytest.raises(RequestError, match=r"--memory (takes bytes or a size|must be more than 0)"):
        parse_memory(text)


@pytest.mark.parametrize(
    ("option", "text"), [("--cpu", "0"), ("--cpu", "1.5"), ("--instances", "x"), ("--gpu", "-1")]
)
def test_counts_are_whole_numbers_in_bounds(option, text):
    with pytest.raises(RequestError, match=f"{option} takes a whole number"):
        parse_count(option, text, 0 if option == "--gpu" else 1, 100)


def test_session_names_become_part_of_flames_id():
    assert check_name("train-2") == "train-2"
    for bad in ("has space", "a/b", "-leading", "x" * 41, ""):
        with pytest.raises(RequestError, match="--session takes a name"):
            check_name(bad)


def test_partial_resources_fill_in_flames_defaults():
    assert parse_resources(None, None, None).resreq() is None
    req = parse_resources(None, None, "1").resreq()
    assert (req.cpu, req.memory, req.gpu) == (1, 1024**3, 1)
    req = parse_resources("4", "8Gi", None).resreq()
    assert (req.cpu, req.memory, req.gpu) == (4, 8 * 1024**3, 0)


def test_key_spec_carries_instances_and_resreq():
    key = SessionKey(name="big", instances=4, warm=4, resources=Resources(cpu=2, memory=512 * 1024**2))
    spec = key.spec("flmrun", b"hello")
    assert spec.application == "flmrun" and spec.common_data == b"hello"
    assert (spec.min_instances, spec.max_instances, spec.batch_size) == (4, 4, 1)
    assert (spec.resreq.cpu, spec.resreq.memory, spec.resreq.gpu) == (2, 512 * 1024**2, 0)
    assert not SessionKey().spec("flmrun", b"").HasField("resreq")
    assert key.label() == "named 'big', up to 4 instances, 2 CPU, 512Mi memory, 0 GPU"
    assert SessionKey().label() == ""


def test_a_request_no_node_can_hold_is_refused_with_the_largest_node():
    node = types.Node(
        metadata=types.Metadata(name="n1"),
        status=types.NodeStatus(capacity=types.ResourceRequirement(cpu=8, memory=32 * 1024**3, gpu=0)),
    )
    assert fits(Resources(cpu=8), [node]) is None
    assert fits(Resources(cpu=64), []) is None  # nodes unknown: Flame decides
    message = fits(Resources(gpu=1), [node])
    assert message is not None and "1 GPU" in message and "n1: 8 CPU, 32Gi memory, 0 GPU" in message
    assert format_memory(24684092 * 1024) == "23.5Gi"


def test_items_are_pickled_once_each_and_shared_inputs_not_at_all():
    pickled = []

    class Counted:
        def __reduce__(self):
            pickled.append(1)
            return (int, (7,))

    shared = codec.encode(
        cell.CellRequest(
            header=codec.local_header(),
            source="x + k",
            inputs=[cell.Value(name="k", pickle=codec.dumps(Counted()))],
        )
    )
    assert len(pickled) == 1
    payloads = item_payloads(shared, "x", [10, 20, 30], limit=1 << 20)
    assert len(pickled) == 1  # the shared inputs were not pickled again
    request = codec.decode(cell.CellRequest, batch_input(shared, payloads), "test")
    assert [v.name for v in request.inputs] == ["k"] and request.source == "x + k"
    assert [item.value.name for item in request.items] == ["x"] * 3
    assert [codec.loads(item.value.pickle) for item in request.items] == [10, 20, 30]


def test_an_item_over_the_task_limit_is_named():
    shared = codec.encode(cell.CellRequest(header=codec.local_header(), source="len(x)"))
    with pytest.raises(ShipError, match="Item 1 of the map"):
        item_payloads(shared, "x", [b"", b"y" * 5000], limit=4000)


def test_not_done_is_one_recognisable_value():
    assert repr(NOT_DONE) == "NOT_DONE"
    assert codec.loads(codec.dumps(NOT_DONE)) is NOT_DONE


@pytest.mark.parametrize(
    ("line", "rest", "spec"),
    [
        ("--map x=xs --into out", " --into out", "x=xs"),
        ("--map x=(i for i in range(7)) --instances 2", " --instances 2", "x=(i for i in range(7))"),
        ('--into o --map "x=(i for i in range(7))"', "--into o ", "x=(i for i in range(7))"),
        ('--map=p=["a  b", "c --d"] --into o', " --into o", 'p=["a  b", "c --d"]'),
        ("--map x=f(a, b='--x')", "", "x=f(a, b='--x')"),
        ("--session s", "--session s", None),
        ("--map", "--map", None),
    ],
)
def test_the_map_expression_is_taken_as_written(line, rest, spec):
    assert take_map_option(line) == (rest, spec)
