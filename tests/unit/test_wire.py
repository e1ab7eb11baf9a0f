"""The wire contract both sides import: sizes and key layouts."""

from __future__ import annotations

from flame_magic import objects, wire
from flame_magic.protocol import MAX_MESSAGE_BYTES


def test_the_limits_fit_inside_flames_message_limit():
    assert MAX_MESSAGE_BYTES == wire.MAX_MESSAGE_BYTES == 4 * 1024 * 1024
    assert wire.PAYLOAD_LIMIT == MAX_MESSAGE_BYTES - wire.ENVELOPE_MARGIN
    assert wire.INLINE_LIMIT < wire.INLINE_BUDGET < wire.PAYLOAD_LIMIT


def test_every_key_is_a_valid_object_key_of_its_session():
    prefix = wire.session_prefix("flame-magic", "ssn-1")
    digest = "ab" * 32
    keys = [
        wire.value_key(prefix, wire.NOTEBOOK_SIDE, digest),
        wire.value_key(prefix, wire.RUNNER_SIDE, digest, part=2),
        wire.module_key(prefix, digest),
        wire.live_output_key(prefix, "c1"),
        wire.live_control_key(prefix, "c1"),
        wire.live_output_key(prefix, wire.item_channel("c1", 7)),
    ]
    assert keys == [
        f"flame-magic/ssn-1/in-{digest}",
        f"flame-magic/ssn-1/out-{digest}-2",
        f"flame-magic/ssn-1/mod-{digest}",
        "flame-magic/ssn-1/c1-out",
        "flame-magic/ssn-1/c1-ctl",
        "flame-magic/ssn-1/c1-7-out",
    ]
    for key in keys:
        assert objects.check_key(key)[:2] == ["flame-magic", "ssn-1"]
