"""Properties of the pure pieces, over many generated inputs."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from csi import csi_pb2 as pb
from mbs_csi import errors, secrets
from mbs_csi.controller.records import GIB
from mbs_csi.controller.validate import fits, size_gib
from mbs_csi.publish_context import WITHHELD, from_publish_context, to_publish_context, withhold_secrets
from mbs_csi.secrets import is_secret_name

byte_counts = st.integers(min_value=0, max_value=64 * GIB)


@given(required=byte_counts, limit=byte_counts, minimum=st.integers(min_value=1, max_value=32))
def test_size_is_the_smallest_whole_gib_that_fits_or_a_clear_refusal(required, limit, minimum):
    capacity = pb.CapacityRange(required_bytes=required, limit_bytes=limit)
    try:
        size = size_gib(capacity, minimum)
    except errors.InvalidArgument:
        assert limit and required > limit
        return
    except errors.OutOfRange:
        smallest = max(-(-required // GIB), minimum)
        assert limit and smallest * GIB > limit
        return
    assert size >= minimum and fits(size * GIB, capacity)
    assert size == minimum or (size - 1) * GIB < required  # nothing smaller would do


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["a", "b", "c"]), inner, max_size=3),
    max_leaves=8,
)
names = st.from_regex(r"[a-z][a-z_]{0,15}", fullmatch=True).filter(lambda n: n != "driver_volume_type")


@given(data=st.dictionaries(names, json_values, max_size=8), protocol=st.sampled_from(["iscsi", "rbd", "local"]))
def test_publish_context_round_trips_through_stage_secrets(data, protocol):
    info = {"driver_volume_type": protocol, "data": data}
    context = to_publish_context(info)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in context.items())
    withheld = [k for k in data if k not in context]
    assert all(is_secret_name(k) or k in context.get("mbs.secret_keys", "").split(",") for k in withheld)
    assert secrets.revealed(from_publish_context(context, {k: data[k] for k in withheld})) == info


@given(data=st.dictionaries(names, json_values, max_size=8), protocol=st.sampled_from(["iscsi", "rbd", "local"]))
def test_what_the_controller_stores_publishes_the_same_context_and_holds_no_withheld_value(data, protocol):
    info = {"driver_volume_type": protocol, "data": data}
    stored = withhold_secrets(info)
    assert to_publish_context(stored) == to_publish_context(info)
    withheld = set(to_publish_context(info).get("mbs.secret_keys", "").split(",")) - {""}
    assert {k for k, v in stored["data"].items() if v == WITHHELD} == withheld
    assert all(stored["data"][k] == v for k, v in data.items() if k not in withheld)
