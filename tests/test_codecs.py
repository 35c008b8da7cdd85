"""Chunk codecs: bit-exact for every dtype and payload, bounded when decoding hostile input."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mstore import IntegrityError, codecs

SPECIALS = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-45, 3.4e38, 1e-310]


@pytest.mark.parametrize("dtype,item", [(np.float16, 2), (np.float32, 4), (np.float64, 8), (np.uint16, 2)])
def test_byteplane_round_trips_specials_and_random_values(dtype, item):
    rng = np.random.default_rng(item)
    with np.errstate(over="ignore", invalid="ignore"):
        values = np.concatenate([np.array(SPECIALS * 20), rng.standard_normal(5000) * 0.02]).astype(dtype)
    raw = values.tobytes()
    codec, payload = codecs.encode(raw, item_size=item)
    assert codecs.decode(codec, payload, len(raw)) == raw


def test_floatplane_is_chosen_for_float_weights_and_beats_plain_zstd():
    raw = (np.random.default_rng(0).standard_normal(200_000) * 0.02).astype(np.float32).tobytes()
    codec, payload = codecs.encode(raw, item_size=4)
    _zcodec, zpayload = codecs.encode(raw)
    assert codec == codecs.FLOATPLANE
    assert len(payload) < len(zpayload)
    assert len(raw) / len(payload) > 1.15  # the sign/exponent plane compresses; mantissas do not


def test_incompressible_floats_are_stored_raw():
    raw = np.random.default_rng(1).integers(0, 2**32, 50_000, dtype=np.uint32).tobytes()
    codec, payload = codecs.encode(raw, item_size=4)
    assert codec == codecs.RAW and payload == raw


def test_odd_length_with_float_hint_falls_back_to_a_lossless_codec():
    raw = (np.arange(1001, dtype=np.float32).tobytes())[:-3]
    codec, payload = codecs.encode(raw, item_size=4)
    assert codec != codecs.BYTEPLANE
    assert codecs.decode(codec, payload, len(raw)) == raw


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=0, max_size=4096), item=st.sampled_from([0, 2, 4, 8]))
def test_every_codec_round_trips_arbitrary_bytes(data, item):
    codec, payload = codecs.encode(data, item_size=item)
    assert codecs.decode(codec, payload, len(data)) == data


def test_floatplane_with_lying_plane_lengths_is_refused():
    raw = (np.random.default_rng(2).standard_normal(10_000) * 0.02).astype(np.float32).tobytes()
    codec, payload = codecs.encode(raw, item_size=4)
    assert codec == codecs.FLOATPLANE
    lengths = list(struct.unpack_from("<4I", payload, 2))
    lengths[0] += 1
    bad = payload[:2] + struct.pack("<4I", *lengths) + payload[18:]
    with pytest.raises(IntegrityError, match="add up"):
        codecs.decode(codec, bad, len(raw))


def test_byteplane_with_a_plane_that_expands_past_its_size_is_refused():
    raw = (np.random.default_rng(3).standard_normal(10_000) * 0.02).astype(np.float32).tobytes()
    codec, payload = codecs.encode(raw, item_size=4)
    with pytest.raises(IntegrityError):
        codecs.decode(codec, payload, len(raw) - 4)  # the record claims one element fewer


@pytest.mark.parametrize("item", [2, 4, 8])
def test_floatplane_puts_the_eight_bits_after_the_sign_in_the_top_plane(item):  # bf16/f32: the exponent
    dtype = {2: np.float16, 4: np.float32, 8: np.float64}[item]
    values = (np.random.default_rng(4).standard_normal(4096) * 0.02).astype(dtype)
    rotated = codecs._rotate(values.tobytes(), item, left=True).view(f"<u{item}")
    bits = 8 * item
    top = rotated >> (bits - 8)
    assert np.array_equal(top, (values.view(f"<u{item}") >> (bits - 9)) & 0xFF)  # the bits after the sign


def test_byteplane_chunks_written_before_floatplane_still_decode():
    raw = (np.random.default_rng(5).standard_normal(20_000) * 0.02).astype(np.float32).tobytes()
    payload = codecs._encode_planes(raw, 4)  # what codec 2 wrote: planes of the unrotated bytes
    assert payload is not None
    assert codecs.decode(codecs.BYTEPLANE, payload, len(raw)) == raw
    out = bytearray(len(raw))
    assert bytes(codecs.decode_into(codecs.BYTEPLANE, payload, len(raw), out)) == raw


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=0, max_size=4096), item=st.sampled_from([0, 2, 4, 8]))
def test_decode_into_gives_what_decode_gives(data, item):
    codec, payload = codecs.encode(data, item_size=item)
    out = bytearray(len(data))
    assert bytes(codecs.decode_into(codec, payload, len(data), out)) == codecs.decode(codec, payload, len(data))
