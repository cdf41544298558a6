"""Token shards: the llm.c / modded-nanogpt `.bin` format, so their FineWeb shards load as they are.

A shard is a header of 256 int32 (magic, version, token count, then zeros) followed by the tokens:
uint16 (magic 20240520, version 1) or, for vocabularies over 65,535 tokens, uint32 (magic 20240801, version 7).
Files are named `{split}_{index:06d}.bin`; reading is an np.memmap taken after the header is validated.

Post-training data (conversations, preference pairs) is stored as rows of a fixed length (block_size + 1 tokens):
`{split}_NNNNNN.bin` holds the rows' tokens and `mask_{split}_NNNNNN.bin` beside it, in the same format, their loss
mask (0/1, token for token); a shard holds whole rows. `rows.json` in the folder says what a row is: {"kind":
"conversations" or "pairs" (a pair row is the chosen then the rejected sequence, each row_tokens long),
"row_tokens": N, "pad_id": id, "splits": per-split counts}. A folder without it holds a plain token stream.
"""
import glob
import os

import numpy as np

from nanogpt.files import FileFormatError, atomic_path, read_json, write_json

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
FORMATS = {20240520: (1, np.uint16), 20240801: (7, np.uint32)}  # magic -> (version, token dtype)
MASK_PREFIX = "mask_"  # mask_train_000000.bin is the loss mask of train_000000.bin
ROWS_FILE = "rows.json"


class ShardError(ValueError):
    pass


def write_shard(path, tokens, vocab_size=None):
    """Write one shard atomically (temp file + rename). uint16 unless vocab_size (or the data) needs more."""
    tokens = np.asarray(tokens)
    top = vocab_size - 1 if vocab_size is not None else (int(tokens.max()) if tokens.size else 0)
    magic = 20240520 if top < 2**16 else 20240801
    version, dtype = FORMATS[magic]
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(dtype).max):
        raise ShardError(f"{path}: token ids out of range for {np.dtype(dtype).name}")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = magic, version, len(tokens)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(dtype, copy=False).tobytes())


def read_header(path):
    """Validate a shard's header against its size; return (token dtype, token count)."""
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte shard header "
                         "(truncated download?)")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    magic, version, count = (int(v) for v in header[:3])
    if magic not in FORMATS:
        raise ShardError(f"{path}: bad magic {magic}, expected one of {sorted(FORMATS)}: not a token shard")
    want_version, dtype = FORMATS[magic]
    if version != want_version:
        raise ShardError(f"{path}: unsupported version {version} for magic {magic} (expected {want_version})")
    need = HEADER_BYTES + count * np.dtype(dtype).itemsize
    if count < 0 or size < need:
        raise ShardError(f"{path}: header says {count} tokens ({need} bytes) but the file has {size} bytes: truncated; "
                         "delete it and rerun the dataset's prepare.py")
    return dtype, count


def read_shard(path):
    """The tokens of a shard as a read-only memmap."""
    dtype, count = read_header(path)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


def shard_paths(data_dir, split):
    """Sorted shard files of a split; a clear error when there are none."""
    paths = sorted(glob.glob(os.path.join(data_dir, f"{split}_*.bin")))
    if not paths:
        name = os.path.basename(os.path.normpath(data_dir))
        raise FileNotFoundError(f"no '{split}' shards in {data_dir}: run `python data/{name}/prepare.py` first")
    return paths


class ShardWriter:
    """Accumulates a token stream and writes it as shards of `shard_size` tokens: `{split}_000000.bin`, ..."""

    def __init__(self, data_dir, split, shard_size=100_000_000, vocab_size=None):
        self.data_dir, self.split, self.shard_size, self.vocab_size = data_dir, split, shard_size, vocab_size
        self.buffer, self.buffered, self.paths = [], 0, []
        os.makedirs(data_dir, exist_ok=True)
        for stale in glob.glob(os.path.join(data_dir, f"{split}_*.bin")):  # a rerun replaces, never mixes
            os.remove(stale)

    def add(self, tokens):
        self.buffer.append(np.asarray(tokens))
        self.buffered += len(tokens)
        while self.buffered >= self.shard_size:
            self._flush(self.shard_size)

    def close(self):
        if self.buffered or not self.paths:
            self._flush(self.buffered)
        return self.paths

    def _flush(self, n):
        data = np.concatenate(self.buffer) if self.buffer else np.zeros(0, np.uint32)
        path = os.path.join(self.data_dir, f"{self.split}_{len(self.paths):06d}.bin")
        write_shard(path, data[:n], self.vocab_size)
        self.paths.append(path)
        self.buffer, self.buffered = [data[n:]], len(data) - n


class RowWriter:
    """Rows of exactly row_tokens tokens and their loss masks, as `{split}_NNNNNN.bin` + `mask_{split}_NNNNNN.bin`
    shards of whole rows (about shard_size tokens each)."""

    def __init__(self, data_dir, split, row_tokens, vocab_size, shard_size=100_000_000):
        rows_per_shard = max(1, shard_size // row_tokens)
        self.row_tokens, self.rows = row_tokens, 0
        self.tokens = ShardWriter(data_dir, split, rows_per_shard * row_tokens, vocab_size)
        self.masks = ShardWriter(data_dir, MASK_PREFIX + split, rows_per_shard * row_tokens, vocab_size=2)

    def add(self, ids, mask):
        if len(ids) != self.row_tokens or len(mask) != self.row_tokens:
            raise ValueError(f"a row holds {self.row_tokens} tokens and mask values, got {len(ids)} and {len(mask)}")
        self.tokens.add(ids)
        self.masks.add(mask)
        self.rows += 1

    def close(self):
        """The token shards' paths."""
        self.masks.close()
        return self.tokens.close()


def write_rows_info(data_dir, info):
    """Write rows.json (temp file + rename): what a row of this folder's shards is."""
    write_json(os.path.join(data_dir, ROWS_FILE), info)


def read_rows_info(data_dir):
    """rows.json of a folder of rows, or None for a plain token stream; a FileFormatError naming the file when it
    is not JSON or not an object with a kind and an integer row_tokens."""
    path = os.path.join(data_dir, ROWS_FILE)
    if not os.path.exists(path):
        return None
    info = read_json(path)
    if not isinstance(info, dict) or not isinstance(info.get("row_tokens"), int) or "kind" not in info:
        raise FileFormatError(f"{path}: expected an object with kind and row_tokens, got {str(info)[:60]}: rerun "
                              "the dataset's prepare.py")
    return info

# ------------------------------------------------------------------------------------------- prepare scripts


def prepared_files(data_dir):
    """The files of a prepared dataset already in data_dir: token and mask shards, rows.json."""
    shards = glob.glob(os.path.join(data_dir, "*_[0-9][0-9][0-9][0-9][0-9][0-9].bin"))
    rows = [os.path.join(data_dir, ROWS_FILE)] if os.path.exists(os.path.join(data_dir, ROWS_FILE)) else []
    return sorted(shards) + rows


def check_out_dir(data_dir, overwrite):
    """A prepare script's first check: a FileExistsError naming data_dir when it already holds a prepared dataset
    and overwrite is not set (a dataset is never replaced by accident)."""
    found = prepared_files(data_dir)
    if found and not overwrite:
        names = ", ".join(os.path.basename(p) for p in found[:3]) + (", ..." if len(found) > 3 else "")
        raise FileExistsError(f"{data_dir} already holds a prepared dataset ({names}): pass --overwrite to replace "
                              "it, or choose another --out_dir")


def clear_dataset(data_dir):
    """Remove the prepared dataset in data_dir (with --overwrite, once the new one's inputs have been read): no
    shard or rows.json of the old one is left to mix with the new."""
    for path in prepared_files(data_dir):
        os.remove(path)
