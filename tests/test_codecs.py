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
    top = codecs.split_planes(values.tobytes(), item, rotate=True)[item - 1]
    bits = 8 * item
    assert np.array_equal(top, (values.view(f"<u{item}") >> (bits - 9)) & 0xFF)  # the bits after the sign


def _planes_by_strided_copy(raw: bytes, item: int, rotate: bool) -> list:
    """The obvious (slow) definition the blocked plane code must agree with."""
    v = np.frombuffer(raw, dtype=f"<u{item}")
    if rotate:
        v = (v << 1) | (v >> (8 * item - 1))
    rows = v.view(np.uint8).reshape(-1, item)
    return [rows[:, i].copy() for i in range(item)]


@pytest.mark.parametrize("item", [2, 4, 8])
@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("elements", [1, 17, 32768, 32769, 100_003])  # around and across block edges
def test_planes_split_and_interleave_agree_with_the_strided_definition(item, rotate, elements, plane_kernels):
    raw = np.random.default_rng(elements).integers(0, 256, elements * item, dtype=np.uint8).tobytes()
    planes = codecs.split_planes(raw, item, rotate)
    expected = _planes_by_strided_copy(raw, item, rotate)
    assert all(np.array_equal(p, q) for p, q in zip(planes, expected, strict=True))
    assert codecs.interleave(planes, len(raw), rotate=rotate) == raw
    out = bytearray(len(raw) + 8)  # a larger buffer: only the first raw_len bytes are written
    out[-8:] = b"\xaa" * 8
    assert codecs.interleave(planes, len(raw), out, rotate=rotate) == b""
    assert bytes(out[: len(raw)]) == raw and out[-8:] == b"\xaa" * 8


def test_the_c_kernels_are_built_wherever_a_c_compiler_is(monkeypatch):
    import shutil
    import sysconfig

    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc}): the numpy kernels are used, which is allowed")
    assert codecs._kernels is not None, "mstore._planes was not built: run `make install` again and read its output"


@settings(max_examples=80, deadline=None)
@given(
    item=st.sampled_from([2, 4, 8]),
    elements=st.integers(0, 3000),
    rotate=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_c_and_numpy_kernels_give_the_same_planes_and_the_same_elements(item, elements, rotate, seed):
    if codecs._kernels is None:
        pytest.skip("the C byte-plane kernels are not built")
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, elements * item, dtype=np.uint8).tobytes()
    other = rng.integers(0, 256, elements * item, dtype=np.uint8).tobytes()
    kernels = codecs._kernels
    c_planes = codecs.split_planes(raw, item, rotate)
    x_planes = codecs.split_planes(other, item, False)
    c_out = bytearray(len(raw))
    kernels.join(c_planes, c_out, elements, rotate, x_planes)
    try:
        codecs._kernels = None
        np_planes = codecs.split_planes(raw, item, rotate)
        xored = [np.bitwise_xor(p, q) for p, q in zip(np_planes, x_planes, strict=True)]
        np_out = codecs.interleave(xored, len(raw), rotate=rotate)
    finally:
        codecs._kernels = kernels
    assert all(np.array_equal(p, q) for p, q in zip(c_planes, np_planes, strict=True))
    assert bytes(c_out) == np_out


@pytest.mark.parametrize("item", [2, 4, 8])
def test_the_c_kernels_refuse_buffers_that_do_not_fit_the_element_count(item):
    if codecs._kernels is None:
        pytest.skip("the C byte-plane kernels are not built")
    planes = [bytes(10)] * item
    with pytest.raises(ValueError, match="planes: buffer 0 has 10 bytes, needs 11"):
        codecs._kernels.join(planes, bytearray(11 * item), 11, False)  # out fits, planes hold 10
    with pytest.raises(ValueError, match="xor: buffer 0 has 9 bytes, needs 10"):
        codecs._kernels.join(planes, bytearray(10 * item), 10, False, [bytes(9)] * item)
    with pytest.raises(ValueError, match="planes: buffer 0 has 10 bytes, needs 11"):
        codecs._kernels.split(bytes(11 * item), [bytearray(10)] * item, item, False)
    with pytest.raises(ValueError, match="needs"):
        codecs._kernels.join(planes, bytearray(10 * item - 1), 10, False)
    with pytest.raises(ValueError, match="element size"):
        codecs._kernels.join(planes[:-1], bytearray(10 * item), 10, False)
    with pytest.raises(ValueError, match="expected"):
        codecs._kernels.join(planes, bytearray(10 * item), 10, False, planes[:-1])  # XOR planes: one short
    with pytest.raises(ValueError, match="whole"):
        codecs._kernels.split(bytes(10 * item + 1), [bytearray(11)] * item, item, False)
    with pytest.raises(BufferError, match="not writable"):
        codecs._kernels.split(bytes(10 * item), [bytes(10)] * item, item, False)  # read-only planes


@pytest.mark.parametrize("dtype,item", [(np.float16, 2), (np.float32, 4), (np.float64, 8)])
def test_payloads_are_byte_identical_with_and_without_the_c_kernels(dtype, item, monkeypatch):
    if codecs._kernels is None:
        pytest.skip("the C byte-plane kernels are not built")
    with np.errstate(over="ignore", invalid="ignore"):
        raw = np.concatenate(
            [np.array(SPECIALS * 7), np.random.default_rng(3).standard_normal(40_000) * 0.02]
        ).astype(dtype).tobytes()
    with_c = codecs.encode(raw, item_size=item)
    monkeypatch.setattr(codecs, "_kernels", None)
    assert codecs.encode(raw, item_size=item) == with_c
    assert codecs.decode(with_c[0], with_c[1], len(raw)) == raw


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


@settings(max_examples=80, deadline=None)
@given(data=st.binary(min_size=0, max_size=4096), item=st.sampled_from([0, 2, 4, 8]), cut=st.integers(0, 4096))
def test_a_prefix_decoded_alone_is_the_prefix_of_the_whole_decoding(data, item, cut):
    codec, payload = codecs.encode(data, item_size=item)
    n = min(cut, len(data))
    if codec in codecs.PLANE_CODECS:
        n -= n % item
    assert codecs.decode_prefix(codec, payload, len(data), n) == data[:n]


def _first_block_only(payload: bytes) -> bytes:
    """A plane payload whose compressed planes keep only their frame's first block."""
    import zstandard

    item, mask = payload[0], payload[1]
    lengths = struct.unpack_from(f"<{item}I", payload, 2)
    pos, planes = 2 + 4 * item, []
    for i, length in enumerate(lengths):
        part = payload[pos : pos + length]
        pos += length
        if mask & (1 << i):
            head = zstandard.frame_header_size(part)
            block = int.from_bytes(part[head : head + 3], "little") >> 3
            part = part[: head + 3 + block]
        planes.append(part)
    return struct.pack(f"<BB{item}I", item, mask, *(len(p) for p in planes)) + b"".join(planes)


def test_a_prefix_of_real_float_planes_decodes_without_the_rest_of_each_plane():
    raw = (np.random.default_rng(6).standard_normal(300_000) * 0.02).astype(np.float32).tobytes()
    codec, payload = codecs.encode(raw, item_size=4)
    assert codec == codecs.FLOATPLANE
    assert codecs.decode_prefix(codec, payload, len(raw), 1 << 18) == raw[: 1 << 18]
    # 300,000-byte planes are three zstd blocks each: the first element needs only the first.
    cut = _first_block_only(payload)
    assert len(cut) < len(payload)
    with pytest.raises(IntegrityError):
        codecs.decode(codec, cut, len(raw))
    assert codecs.decode_prefix(codec, cut, len(raw), 4) == raw[:4]


def test_no_prefix_comes_of_a_delta_or_of_a_cut_inside_an_element():
    raw = np.arange(10_000, dtype=np.float32).tobytes()
    codec, payload = codecs.encode(raw, item_size=4)
    assert codec in codecs.PLANE_CODECS
    assert codecs.decode_prefix(codec, payload, len(raw), 4001) is None
    delta = codecs.encode_delta(raw, raw, b"\0" * 32, 1, 3, 4)
    assert codecs.decode_prefix(codecs.DELTA, delta, len(raw), 4000) is None


def test_a_prefix_of_a_damaged_plane_frame_is_refused():
    raw = (np.random.default_rng(7).standard_normal(50_000) * 0.02).astype(np.float32).tobytes()
    codec, payload = codecs.encode(raw, item_size=4)
    item, mask = payload[0], payload[1]
    assert mask, "some plane must be compressed for this test"
    lengths = struct.unpack_from(f"<{item}I", payload, 2)
    first = next(i for i in range(item) if mask & (1 << i))
    start = 2 + 4 * item + sum(lengths[:first])
    bad = bytearray(payload)
    bad[start : start + 4] = b"\0\0\0\0"  # the zstd magic of that plane's frame
    with pytest.raises(IntegrityError):
        codecs.decode_prefix(codec, bytes(bad), len(raw), 4000)


@pytest.mark.parametrize("plane_bytes", [60_000, 200_000, 1 << 20, 3 << 20])
def test_planes_of_every_size_round_trip_in_frames_that_declare_their_size(plane_bytes):
    # Small planes are one call, mid-sized ones a judged first block and the rest streamed into
    # the same frame, large ones a separate sample and one call: each must decode alone.
    import zstandard

    raw = (np.random.default_rng(plane_bytes).standard_normal(plane_bytes) * 0.02).astype(np.float32).tobytes()
    codec, payload = codecs.encode(raw, item_size=4)
    assert codec == codecs.FLOATPLANE
    assert codecs.decode(codec, payload, len(raw)) == raw
    item, mask = payload[0], payload[1]
    lengths = struct.unpack_from(f"<{item}I", payload, 2)
    pos = 2 + 4 * item
    for i, length in enumerate(lengths):
        if mask & (1 << i):
            assert zstandard.get_frame_parameters(payload[pos : pos + length]).content_size == plane_bytes
        pos += length
    assert mask & 0b1000  # the exponent plane compresses


def test_a_plane_whose_first_block_does_not_compress_is_stored_raw_even_if_the_rest_would():
    rng = np.random.default_rng(8)
    plane = rng.integers(0, 256, codecs._SAMPLE, dtype=np.uint8).tobytes() + bytes(300_000)
    assert codecs._compress_plane(codecs._plane_compressor(), memoryview(plane), codecs.MIN_SAVING) is None
    assert codecs._compress_plane(codecs._plane_compressor(), memoryview(plane[::-1]), codecs.MIN_SAVING) is not None


@pytest.mark.parametrize("item", [2, 4, 8])
@pytest.mark.parametrize("rotate", [False, True])
def test_the_c_split_of_a_xor_is_the_split_of_the_xored_bytes(item, rotate):
    if codecs._kernels is None:
        pytest.skip("the C byte-plane kernels are not built")
    rng = np.random.default_rng(item)
    raw = rng.integers(0, 256, 3001 * item, dtype=np.uint8).tobytes()
    other = rng.integers(0, 256, 3001 * item, dtype=np.uint8).tobytes()
    xored = bytes(a ^ b for a, b in zip(raw, other, strict=True))
    fused = [bytearray(3001) for _ in range(item)]
    codecs._kernels.split(raw, fused, item, rotate, other)
    assert [bytes(p) for p in fused] == [bytes(p) for p in codecs.split_planes(xored, item, rotate)]
    with pytest.raises(ValueError, match="xor has"):
        codecs._kernels.split(raw, fused, item, rotate, other[:-1])


@pytest.mark.parametrize("dtype,item", [(np.float16, 2), (np.float32, 4), (np.float64, 8)])
def test_delta_payloads_are_byte_identical_with_and_without_the_c_kernels(dtype, item, monkeypatch):
    if codecs._kernels is None:
        pytest.skip("the C byte-plane kernels are not built")
    rng = np.random.default_rng(4)
    base = (rng.standard_normal(40_000) * 0.02).astype(dtype)
    raw = (base + (rng.standard_normal(40_000) * 1e-4).astype(dtype)).tobytes()
    with_c = codecs.encode_delta(raw, base.tobytes(), b"\1" * 32, 1, 3, item)
    monkeypatch.setattr(codecs, "_kernels", None)
    assert codecs.encode_delta(raw, base.tobytes(), b"\1" * 32, 1, 3, item) == with_c
    assert codecs.decode_delta(with_c, len(raw), base.tobytes()) == raw


def test_a_zstd_prefix_shorter_than_asked_is_refused_not_returned():
    data = b"some text, repeated " * 5000
    codec, payload = codecs.encode(data)
    assert codec == codecs.ZSTD
    with pytest.raises(IntegrityError):
        codecs.decode_prefix(codec, payload[: len(payload) // 2], len(data), 50_000)


def test_an_extension_built_from_an_older_source_is_left_unused(monkeypatch):
    import importlib
    import sys
    import types

    if codecs._kernels is None:
        pytest.skip("the C byte-plane kernels are not built")
    old = types.ModuleType("mstore._planes")  # as built before split took a fused XOR: no VERSION
    for name in ("split", "join", "xor"):
        setattr(old, name, getattr(codecs._kernels, name))
    monkeypatch.setitem(sys.modules, "mstore._planes", old)
    try:
        importlib.reload(codecs)
        assert not codecs.have_kernels()
        raw = np.arange(4000, dtype=np.float32).tobytes()
        payload = codecs.encode_delta(raw, raw[::-1], b"\0" * 32, 1, 3, 4)
        assert codecs.decode_delta(payload, len(raw), raw[::-1]) == raw
    finally:
        monkeypatch.undo()
        importlib.reload(codecs)
    assert codecs.have_kernels()


def test_parts_of_a_whole_and_a_delta_encoding_survive_later_encodings_on_the_same_thread():
    rng = np.random.default_rng(7)
    base = (rng.standard_normal(50_000) * 0.02).astype(np.float32)
    child = base + (rng.standard_normal(50_000) * 1e-4).astype(np.float32)
    other = (rng.standard_normal(50_000) * 0.02).astype(np.float32)
    whole_codec, whole = codecs.encode(child.tobytes(), 3, 4, parts=codecs.WHOLE_PARTS)
    delta = codecs.encode_delta(child.tobytes(), base.tobytes(), b"\x05" * 32, 1, 3, 4, parts=codecs.DELTA_PARTS)
    # What a commit worker may encode next, before it writes: a prefix estimate, a probe.
    codecs.encode(other.tobytes(), 3, 4)
    codecs.encode_delta(other.tobytes()[:4096], base.tobytes()[:4096], b"\x05" * 32, 1, 3, 4)

    assert isinstance(whole, list) and isinstance(delta, list)  # raw planes are views, not copies
    assert codecs.payload_bytes(whole) == codecs.encode(child.tobytes(), 3, 4)[1]
    assert codecs.payload_bytes(delta) == codecs.encode_delta(child.tobytes(), base.tobytes(), b"\x05" * 32, 1, 3, 4)
    assert codecs.decode(whole_codec, codecs.payload_bytes(whole), child.nbytes) == child.tobytes()
    assert codecs.decode_delta(codecs.payload_bytes(delta), child.nbytes, base.tobytes()) == child.tobytes()
