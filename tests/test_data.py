"""Token shards (format, corrupt headers) and the batch loader (disjoint ranks, exact resume, mixtures)."""
import os

import numpy as np
import pytest

from nanogpt.loader import BatchLoader, PrefixLoader
from nanogpt.shards import HEADER_BYTES, ShardError, ShardWriter, read_shard, shard_paths, write_shard


@pytest.fixture
def rng(seed):
    return np.random.default_rng(seed)


def test_roundtrip_uint16_and_uint32(tmp_path, rng):
    small = rng.integers(0, 50257, 1000)
    write_shard(tmp_path / "a.bin", small, vocab_size=50257)
    assert np.fromfile(tmp_path / "a.bin", np.int32, 3).tolist() == [20240520, 1, 1000]
    assert np.array_equal(read_shard(tmp_path / "a.bin"), small) and read_shard(tmp_path / "a.bin").dtype == np.uint16
    big = rng.integers(0, 200_000, 777)
    write_shard(tmp_path / "b.bin", big, vocab_size=200_000)
    assert np.fromfile(tmp_path / "b.bin", np.int32, 3).tolist() == [20240801, 7, 777]
    assert np.array_equal(read_shard(tmp_path / "b.bin"), big)
    assert os.path.getsize(tmp_path / "b.bin") == HEADER_BYTES + 4 * 777


def corrupt(path, header=None, truncate=None):
    data = bytearray(open(path, "rb").read())
    if header is not None:
        data[:12] = np.array(header, np.int32).tobytes()
    open(path, "wb").write(bytes(data[:truncate]))


@pytest.mark.parametrize("header, truncate, message", [
    ([12345, 1, 100], None, "bad magic 12345"),
    ([20240520, 3, 100], None, "unsupported version 3"),
    (None, HEADER_BYTES + 150, "truncated"),
    (None, 100, "shorter than the 1024-byte shard header"),
])
def test_corrupt_shards_name_the_file(tmp_path, header, truncate, message):
    path = tmp_path / "train_000000.bin"
    write_shard(path, np.arange(100))
    corrupt(path, header, truncate)
    with pytest.raises(ShardError, match=message) as info:
        read_shard(path)
    assert str(path) in str(info.value)


def test_missing_shards_say_which_script(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python data/mydata/prepare.py"):
        shard_paths(tmp_path / "mydata", "train")


def test_shard_writer_splits_stream(tmp_path, rng):
    tokens = rng.integers(0, 1000, 2500)
    writer = ShardWriter(tmp_path, "train", shard_size=1000)
    for chunk in np.array_split(tokens, 7):
        writer.add(chunk)
    paths = writer.close()
    assert [os.path.basename(p) for p in paths] == ["train_000000.bin", "train_000001.bin", "train_000002.bin"]
    assert np.array_equal(np.concatenate([read_shard(p) for p in paths]), tokens)


def make_dataset(root, name, n_tokens, offset=0, shards=2):
    d = root / name
    d.mkdir()
    for i, part in enumerate(np.array_split(np.arange(n_tokens) + offset, shards)):
        write_shard(d / f"train_{i:06d}.bin", part % 60000)
    return str(d)


def rows(x):
    return {tuple(r) for r in x.tolist()}


def test_ranks_draw_disjoint_windows_and_match_single_process(tmp_path):
    d = make_dataset(tmp_path, "ds", 20_000)
    single = BatchLoader([d], "train", 8, 31, seed=5)
    ranks = [BatchLoader([d], "train", 4, 31, rank=r, world_size=2, seed=5) for r in range(2)]
    for _ in range(5):
        x, y = single.next_batch()
        x0, _ = ranks[0].next_batch()
        x1, _ = ranks[1].next_batch()
        assert not rows(x0) & rows(x1)
        assert rows(x0) | rows(x1) == rows(x)
        assert np.array_equal(y[:, :-1], x[:, 1:])  # targets are inputs shifted by one


def test_epoch_covers_every_window_once(tmp_path):
    d = make_dataset(tmp_path, "ds", 3231, shards=1)  # 100 windows of 32 tokens whatever the epoch offset (< 32)
    loader = BatchLoader([d], "train", 10, 31, seed=1)
    starts = [int(r[0]) for _ in range(10) for r in loader.next_batch()[0]]  # tokens are arange: value = position
    assert len(set(starts)) == len(starts) == 100 and len({s % 32 for s in starts}) == 1


def test_resume_continues_exact_stream(tmp_path):
    dirs = [make_dataset(tmp_path, "a", 5000), make_dataset(tmp_path, "b", 9000, offset=30000)]
    loader = BatchLoader(dirs, "train", 6, 15, seed=3, weights=[0.3, 0.7])
    for _ in range(20):
        loader.next_batch()
    state = loader.state_dict()
    expected = [loader.next_batch()[0] for _ in range(30)]
    resumed = BatchLoader(dirs, "train", 6, 15, seed=3, weights=[0.3, 0.7])
    resumed.load_state_dict(state)
    for want in expected:
        assert np.array_equal(resumed.next_batch()[0], want)


def test_mixture_proportions(tmp_path):
    dirs = [make_dataset(tmp_path, "a", 4000), make_dataset(tmp_path, "b", 4000, offset=30000)]
    loader = BatchLoader(dirs, "train", 16, 15, seed=11, weights=[0.9, 0.1])
    from_b = 0
    for _ in range(200):
        from_b += int((loader.next_batch()[0][:, 0] >= 30000).sum())
    # 3200 draws at p=0.1: std 0.0053, so 0.025 is over 4 sigma
    assert abs(from_b / 3200 - 0.1) < 0.025 and loader.mixture()[1] == pytest.approx(from_b / 3200)


@pytest.mark.parametrize("n_tokens, block, batch, world", [(1000, 32, 4, 2), (992, 32, 3, 1), (64, 64, 1, 3)])
def test_prefix_loader_predicts_each_of_the_first_tokens_once(tmp_path, rng, n_tokens, block, batch, world):
    tokens = rng.integers(0, 50257, 1500)
    write_shard(tmp_path / "val_000000.bin", tokens, 50257)
    write_shard(tmp_path / "val_000001.bin", tokens[:100], 50257)  # only the first shard is read
    ranks = [PrefixLoader(str(tmp_path), "val", n_tokens, batch, block, r, world) for r in range(world)]
    inputs, predicted = [], []
    for _ in range(ranks[0].batches):
        for loader in ranks:
            x, y = loader.next_batch()
            assert x.shape == y.shape == (batch, block)
            inputs += x[y >= 0].tolist()
            predicted += y[y >= 0].tolist()
    assert predicted == tokens[1:n_tokens + 1].tolist()  # in order, each once, nothing past the prefix
    assert inputs == tokens[:n_tokens].tolist()  # each predicted from the token before it
    ranks[0].load_state_dict({"batch": 0})
    assert ranks[0].next_batch()[0][0].tolist() == tokens[:block].tolist()
