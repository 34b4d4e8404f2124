"""TensorFlow's checkpoint format (TF1 `Saver` V2 and TF2 alike) read without TensorFlow: the `.index` table (a
LevelDB SSTable of BundleEntryProto messages), the `.data-0000k-of-0000n` shards, and TensorFlow's masked CRC32C on
every table block and every tensor."""
from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastgpt2.model.hub import CheckpointError

__all__ = ["BundleEntry", "TFCheckpoint", "crc32c", "masked_crc32c"]

_TABLE_MAGIC = 0xDB4775248B80FB57  # leveldb's kTableMagicNumber, little-endian at the end of the file
_FOOTER_BYTES = 48  # two BlockHandles padded to 2 x 20 bytes, then the magic
_BLOCK_TRAILER_BYTES = 5  # compression type (1 byte) + masked CRC32C (4 bytes) of contents + type
# TensorFlow DataType enum values -> numpy dtypes of the weights a GPT-2 checkpoint may hold.
DTYPES = {1: np.dtype("<f4"), 19: np.dtype("<f2"), 2: np.dtype("<f8")}
_DTYPE_NAMES = {1: "DT_FLOAT", 2: "DT_DOUBLE", 3: "DT_INT32", 9: "DT_INT64", 14: "DT_BFLOAT16", 19: "DT_HALF"}

# --- CRC32C (Castagnoli), as TensorFlow computes and masks it ----------------------------------------------------

_POLY = 0x82F63B78  # reflected Castagnoli polynomial


def _byte_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(_POLY), table >> 1).astype(np.uint32)
    return table


_TABLE = _byte_table()
_TABLE_LIST = [int(v) for v in _TABLE]
_LANES = 1 << 16  # at most this many CRCs computed side by side over a large buffer, then combined
_LANE_BYTES_MIN = 64  # fewer lanes where each would be shorter; a buffer under 64 lanes of this is done byte by byte


def _crc_bytes(crc: int, data) -> int:
    """Raw (un-inverted) register update over `data`, one byte at a time."""
    table = _TABLE_LIST
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc


def _gf2_apply(columns: list[int], value: int) -> int:
    """A GF(2) 32x32 matrix, given as the images of the 32 unit vectors, applied to `value`."""
    out, bit = 0, 0
    while value:
        if value & 1:
            out ^= columns[bit]
        value >>= 1
        bit += 1
    return out


def _gf2_power(columns: list[int], n: int) -> list[int]:
    """The matrix raised to the power n >= 1, by squaring."""
    result = None
    while n:
        if n & 1:
            result = columns if result is None else [_gf2_apply(columns, c) for c in result]
        columns = [_gf2_apply(columns, c) for c in columns]
        n >>= 1
    return result


def _shift_tables(columns: list[int], bits: int = 8) -> np.ndarray:
    """(32 // bits, 2**bits) lookup tables that apply the matrix `bits` bits of the register at a time."""
    cols = np.array(columns, dtype=np.uint32).reshape(32 // bits, bits)  # (table, bit)
    index_bits = (np.arange(1 << bits)[:, None] >> np.arange(bits)) & 1  # (2**bits, bits)
    return np.bitwise_xor.reduce(np.where(index_bits[None], cols[:, None, :], np.uint32(0)), axis=2)


@functools.cache
def _zero_byte_matrix() -> tuple[int, ...]:
    """Z_1: one zero byte fed through the register, as the images of the 32 unit vectors."""
    return tuple(_crc_bytes(1 << i, b"\0") for i in range(32))


@functools.cache
def _word_tables() -> tuple[np.ndarray, np.ndarray]:
    """Z_4 in two 65536-entry tables (low and high 16 bits): one 32-bit word per lane per step."""
    low, high = _shift_tables(_gf2_power(list(_zero_byte_matrix()), 4), bits=16)
    return low, high


def _crc_lanes(crc: int, body: np.ndarray, num_lanes: int) -> int:
    """Raw register update over `body` (uint8, a multiple of 4 * num_lanes bytes) as num_lanes CRCs side by side.

    Lane i covers the i-th of num_lanes equal slices; all lanes start from 0 except lane 0, which starts from `crc`
    (XORing a reflected CRC's register into the next 4 bytes is the same as starting from it). CRC is linear over
    GF(2), so lanes combine pairwise: crc(A || B) = Z_len(B)(crc(A)) ^ crc(B), Z_n feeding n zero bytes through."""
    low, high = _word_tables()
    words = body.view("<u4").reshape(num_lanes, -1)  # (num_lanes, lane_words)
    regs = np.zeros(num_lanes, dtype=np.uint32)
    step = 64  # words per lane transposed at a time: (64, num_lanes) rows read contiguously
    for start in range(0, words.shape[1], step):
        block = np.ascontiguousarray(words[:, start:start + step].T)  # (step, num_lanes)
        if start == 0:
            block[0, 0] ^= np.uint32(crc)
        for row in block:
            regs ^= row
            regs = np.take(low, regs & 0xFFFF) ^ np.take(high, regs >> 16)
    shift = _gf2_power(list(_zero_byte_matrix()), 4 * words.shape[1])
    while regs.size > 1:
        t = _shift_tables(shift)
        a, b = regs[0::2], regs[1::2]  # neighbouring lanes; a precedes b
        regs = t[0][a & 0xFF] ^ t[1][(a >> 8) & 0xFF] ^ t[2][(a >> 16) & 0xFF] ^ t[3][a >> 24] ^ b
        shift = [_gf2_apply(shift, c) for c in shift]  # Z_2n = Z_n o Z_n
    return int(regs[0])


def _crc_raw(crc: int, view: np.ndarray) -> int:
    """Raw register update over a uint8 array: lanes for the largest part that splits evenly, the head before it by
    the same rule with fewer lanes, down to a byte-at-a-time loop under 4 KiB."""
    num_lanes = min(_LANES, 1 << max(0, (view.size // _LANE_BYTES_MIN).bit_length() - 1))
    if num_lanes < 64:
        return _crc_bytes(crc, view)
    head = view.size % (4 * num_lanes)
    crc = _crc_raw(crc, view[:head])
    return _crc_lanes(crc, view[head:], num_lanes)


def _crc32c_own(data) -> int:
    return _crc_raw(0xFFFFFFFF, np.frombuffer(data, dtype=np.uint8)) ^ 0xFFFFFFFF


def _fast_crc32c():
    """A compiled CRC32C when one of the two common packages is installed (neither is a dependency)."""
    try:
        import google_crc32c

        if google_crc32c.implementation == "c":
            return lambda data: google_crc32c.value(bytes(data))  # it takes read-only buffers only
    except (ImportError, AttributeError):
        pass
    try:
        import crc32c as crc32c_package

        return lambda data: crc32c_package.crc32c(data)
    except (ImportError, AttributeError):
        return None


_FAST_CRC32C = _fast_crc32c()


def crc32c(data) -> int:
    """CRC32C of a bytes-like object (a compiled implementation when installed, else numpy over 65536 lanes)."""
    return _FAST_CRC32C(data) if _FAST_CRC32C is not None else _crc32c_own(data)


def masked_crc32c(data) -> int:
    """TensorFlow's (and leveldb's) stored form: the CRC rotated right by 15 bits plus a constant, mod 2**32."""
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


# --- protobuf wire format and the SSTable --------------------------------------------------------------------------

class _Malformed(Exception):
    """Bytes that do not parse; turned into a CheckpointError naming the file by the caller."""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _Malformed("a varint runs past its buffer")
        byte = buf[pos]
        result |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return result, pos


def _fields(buf: bytes) -> dict[int, list]:
    """Protobuf message -> field number -> values (ints for varint/fixed fields, bytes for length-delimited)."""
    fields, pos = {}, 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            if pos + width > len(buf):
                raise _Malformed("a fixed-width field runs past its message")
            value, pos = int.from_bytes(buf[pos:pos + width], "little"), pos + width
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise _Malformed("a length-delimited field runs past its message")
            value, pos = buf[pos:pos + length], pos + length
        else:
            raise _Malformed(f"field {number} has the unsupported wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


def _read_block(data: bytes, handle: bytes) -> bytes:
    """Contents of the block a BlockHandle (offset, size varints) points at, its CRC and compression checked."""
    offset, pos = _varint(handle, 0)
    size, _ = _varint(handle, pos)
    end = offset + size + _BLOCK_TRAILER_BYTES
    if end > len(data):
        raise _Malformed(f"a block at bytes {offset}..{end} runs past the end ({len(data)} bytes)")
    contents, kind = data[offset:offset + size], data[offset + size]
    (stored,) = struct.unpack_from("<I", data, offset + size + 1)
    if masked_crc32c(data[offset:offset + size + 1]) != stored:
        raise _Malformed(f"the block at byte {offset} fails its CRC32C check")
    if kind != 0:
        name = "snappy" if kind == 1 else f"type {kind}"
        raise _Malformed(f"a block is {name}-compressed, which fastgpt2 does not read; TensorFlow writes checkpoint "
                         f"indexes uncompressed, so re-save the checkpoint with TensorFlow")
    return contents


def _block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
    """(key, value) pairs of one block: prefix-compressed keys, then the restart array and its length."""
    if len(block) < 4:
        raise _Malformed("a block is shorter than its restart count")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    limit = len(block) - 4 * (num_restarts + 1)
    if limit < 0:
        raise _Malformed("a block's restart array is longer than the block")
    entries, pos, key = [], 0, b""
    while pos < limit:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_length, pos = _varint(block, pos)
        if shared > len(key) or pos + unshared + value_length > limit:
            raise _Malformed("a block entry runs past its block")
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        entries.append((key, block[pos:pos + value_length]))
        pos += value_length
    return entries


def read_table(path: Path) -> dict[bytes, bytes]:
    """Every (key, value) of a leveldb-format table file, blocks CRC-checked."""
    data = path.read_bytes()
    try:
        if len(data) < _FOOTER_BYTES or struct.unpack_from("<Q", data, len(data) - 8)[0] != _TABLE_MAGIC:
            raise _Malformed("it does not end with the table magic number, so it is not a TensorFlow checkpoint index")
        footer = data[len(data) - _FOOTER_BYTES:]
        _, pos = _varint(footer, 0)  # the metaindex handle: filter blocks, which TensorFlow does not write
        _, pos = _varint(footer, pos)
        table = {}
        for _, handle in _block_entries(_read_block(data, footer[pos:])):
            table.update(_block_entries(_read_block(data, handle)))
        return table
    except _Malformed as exc:
        raise CheckpointError(f"{path} is corrupt or truncated ({exc}); download it again") from None


# --- the tensor bundle --------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class BundleEntry:
    """Where one tensor lies: BundleEntryProto's dtype, shape, shard, byte range and masked CRC32C."""

    dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int  # masked, as stored

    @classmethod
    def parse(cls, value: bytes) -> "BundleEntry":
        f = _fields(value)
        if 7 in f:
            raise _Malformed("it is a partitioned (sliced) variable, which GPT-2 checkpoints never hold")
        shape = tuple(_fields(dim).get(1, [0])[0] for dim in _fields(f.get(2, [b""])[0]).get(2, []))
        if any(size >= 2**63 for size in shape):
            raise _Malformed("its shape has an unknown dimension")
        last = {number: f.get(number, [0])[-1] for number in (1, 3, 4, 5, 6)}
        return cls(last[1], shape, last[3], last[4], last[5], last[6])


class TFCheckpoint:
    """A TensorFlow checkpoint given by its prefix (`dir/model.ckpt`): `entries` maps tensor names to BundleEntry;
    `read(name)` returns the tensor as a writable numpy array after checking its bounds and its CRC32C."""

    def __init__(self, prefix: Path):
        self.prefix = Path(prefix)
        self.index_path = self.prefix.with_name(self.prefix.name + ".index")
        if not self.index_path.is_file():
            raise CheckpointError(f"{self.index_path} is missing; a TensorFlow checkpoint needs its .index file next to "
                                  f"its .data-00000-of-0000n shards")
        table = read_table(self.index_path)
        try:
            header = _fields(table.pop(b"", b""))
            self.entries = {key.decode(): BundleEntry.parse(value) for key, value in table.items()}
        except (_Malformed, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{self.index_path} holds an entry that does not parse ({exc}); download it "
                                  f"again") from None
        num_shards = header.get(1, [1])[-1]
        if header.get(2, [0])[-1] != 0:
            raise CheckpointError(f"{self.index_path} was written on a big-endian machine, which fastgpt2 does not "
                                  f"read; convert it with TensorFlow on a little-endian one")
        self.shards = [self.prefix.with_name(f"{self.prefix.name}.data-{k:05d}-of-{num_shards:05d}")
                       for k in range(num_shards)]

    def check(self, names) -> None:
        """Check dtype, recorded size and byte range of every tensor in `names` before any is read, in file order, so
        that a truncated shard names the first tensor it cuts."""
        for name in sorted(names, key=lambda n: (self.entries[n].shard_id, self.entries[n].offset)):
            self._locate(name)

    def _locate(self, name: str) -> tuple[Path, BundleEntry]:
        entry = self.entries[name]
        if entry.dtype not in DTYPES:
            dtype = _DTYPE_NAMES.get(entry.dtype, f"DataType {entry.dtype}")
            raise CheckpointError(f"{self.index_path}: tensor {name!r} has dtype {dtype}, but GPT-2 weights must be "
                                  f"float32, float16 or float64")
        expected = math.prod(entry.shape) * DTYPES[entry.dtype].itemsize
        if entry.size != expected or entry.shard_id >= len(self.shards):
            raise CheckpointError(f"{self.index_path}: tensor {name!r} is recorded as {entry.size} bytes in shard "
                                  f"{entry.shard_id} of {len(self.shards)}, which does not fit its shape "
                                  f"{entry.shape} ({expected} bytes); the index is corrupt, download it again")
        shard = self.shards[entry.shard_id]
        if not shard.is_file():
            raise CheckpointError(f"{shard} is missing, and it holds tensor {name!r}; copy it next to "
                                  f"{self.index_path.name}")
        end, file_bytes = entry.offset + entry.size, shard.stat().st_size
        if end > file_bytes:
            raise CheckpointError(f"{shard} ends at byte {file_bytes:,}, before the end of tensor {name!r} (bytes "
                                  f"{entry.offset:,}..{end:,}); the file is truncated, download it again")
        return shard, entry

    def read(self, name: str) -> np.ndarray:
        """The tensor `name` (shape and dtype as stored, writable), its byte range and CRC32C checked."""
        shard, entry = self._locate(name)
        buffer = bytearray(entry.size)
        with open(shard, "rb") as f:
            f.seek(entry.offset)
            f.readinto(buffer)
        if masked_crc32c(buffer) != entry.crc32c:
            raise CheckpointError(f"{shard}: tensor {name!r} (bytes {entry.offset:,}..{entry.offset + entry.size:,}) "
                                  f"fails its CRC32C check, so the file is corrupt; download it again")
        return np.frombuffer(buffer, dtype=DTYPES[entry.dtype]).reshape(entry.shape)
