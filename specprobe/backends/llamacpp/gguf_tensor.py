"""One tensor out of a GGUF file, without parsing the rest of it.

The llama.cpp backend needs one tensor of the file llama.cpp already loaded: `token_embd.weight`,
whose de-quantised rows are the embedding input of ESP's mask rows (model.py). gguf-py's
`GGUFReader` builds a numpy view of every metadata value first, the vocabulary's strings included
(about a million small views for a 49k-token vocabulary: seconds on a small CPU), so this reads the
header the way the GGUF specification lays it out (github.com/ggml-org/ggml, docs/gguf.md):

    magic "GGUF", version u32, tensor count u64, metadata count u64
    metadata: key (string), value type u32, value      (an array: element type u32, count u64, elements)
    tensor infos: name (string), n_dims u32, dims u64 x n_dims, ggml type u32, offset u64
    padding to `general.alignment` (32 by default), then the tensor data

(a string is a u64 length and its bytes), skipping every metadata value but the alignment, and
memory-maps the one tensor's bytes; gguf-py's `quants.dequantize` then de-quantises them.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

# metadata value types of fixed size: type id -> struct format
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    def __init__(self, data: memoryview):
        self.data, self.at = data, 0

    def take(self, fmt: str):
        value = struct.unpack_from("<" + fmt, self.data, self.at)
        self.at += struct.calcsize("<" + fmt)
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        n = self.take("Q")
        self.at += n
        return bytes(self.data[self.at - n : self.at]).decode("utf-8", errors="replace")

    def skip_value(self, kind: int) -> None:
        if kind in _SCALARS:
            self.at += struct.calcsize(_SCALARS[kind])
        elif kind == _STRING:
            n = self.take("Q")  # (not `self.at += self.take(...)`: that adds to the position before the length)
            self.at += n
        elif kind == _ARRAY:
            element, count = self.take("I"), self.take("Q")
            if element in _SCALARS:
                self.at += count * struct.calcsize(_SCALARS[element])
            else:
                for _ in range(count):
                    self.skip_value(element)
        else:
            raise ValueError(f"unknown GGUF metadata type {kind}")


def read_tensor(path: str | Path, name: str) -> np.ndarray | None:
    """The named tensor de-quantised to float32, shaped [rows, columns] as llama.cpp uses it
    (GGUF lists dims innermost first); None if the file has no such tensor.

    >>> import gguf, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "t.gguf")
    >>> w = gguf.GGUFWriter(path, "llama")
    >>> w.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
    >>> w.add_tensor("token_embd.weight", np.arange(6, dtype=np.float32).reshape(3, 2))
    >>> for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
    ...     step()
    >>> read_tensor(path, "token_embd.weight").tolist()
    [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
    >>> read_tensor(path, "output.weight") is None
    True
    """
    import gguf  # gguf-py: the ggml type sizes and the de-quantisers

    raw = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(raw))
    if bytes(cur.data[:4]) != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    cur.at = 4
    _version, n_tensors, n_kv = cur.take("I"), cur.take("Q"), cur.take("Q")
    alignment = 32
    for _ in range(n_kv):
        key, kind = cur.string(), cur.take("I")
        if key == "general.alignment" and kind in _SCALARS:
            alignment = int(cur.take(_SCALARS[kind]))
        else:
            cur.skip_value(kind)
    found = None
    for _ in range(n_tensors):
        tensor_name = cur.string()
        dims = [cur.take("Q") for _ in range(cur.take("I"))]
        kind, offset = cur.take("I"), cur.take("Q")
        if tensor_name == name:
            found = (dims, kind, offset)
    if found is None:
        return None
    dims, kind, offset = found
    start = -(-cur.at // alignment) * alignment + offset
    qtype = gguf.GGMLQuantizationType(kind)
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    columns, rows = dims[0], int(np.prod(dims[1:], dtype=np.int64))
    row_bytes = columns // block * block_bytes
    data = raw[start : start + rows * row_bytes].reshape(rows, row_bytes)
    if qtype == gguf.GGMLQuantizationType.F32:
        return np.array(data.view(np.float32))  # a copy: the caller owns (and may scale) what it gets
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.view(np.float16).astype(np.float32)
    return np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32).reshape(rows, columns)
