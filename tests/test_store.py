"""Shards on disk: locking (F25), strings (F27), attribute round trips, the background writer."""

from __future__ import annotations

import errno
import threading

import h5py
import numpy as np
import pytest

from graddyn.store.h5 import open_h5
from graddyn.store.shard import ShardRecord, list_shards, read_shard, shard_name, write_shard
from graddyn.store.writer import AsyncWriter

LOCKING_VARIABLES = ("HDF5_USE_FILE_LOCKING", "GRADDYN_HDF5_LOCKING")


def sample_record(step: int = 3) -> ShardRecord:
    generator = np.random.default_rng(step)
    return ShardRecord(
        step=step,
        attrs={
            "model": "tiny-neox",
            "beta": 0.1,
            "normalizer": 4,
            "dropout_disabled": True,
            "projection": {"kind": "kronecker", "seed": 7, "k_in": 16, "k_out": 16},
            "metrics": {"loss": 0.69, "rewards/accuracies": 0.5},
            "skipped_rows": {},
            "empty": "",
            "note": "[draft] first run",
        },
        arrays={
            "items/logp": generator.normal(size=8),
            "items/sign": np.array([1, 1, 1, 1, -1, -1, -1, -1], dtype=np.int8),
            "grads/per_sequence": generator.normal(size=(8, 20)).astype(np.float32),
            "batch/pair_ids": np.arange(4, dtype=np.int64),
        },
        strings={"parameter_names": ["embed.weight", "layers.0.mlp.weight"]},
    )


def assert_round_trip(record: ShardRecord, shard) -> None:
    assert shard.step == record.step
    for key, value in record.attrs.items():
        assert shard.attrs[key] == value, key
        assert type(shard.attrs[key]) is type(value), key
    assert shard.arrays.keys() == record.arrays.keys()
    for key, value in record.arrays.items():
        assert shard.arrays[key].dtype == value.dtype, key
        assert np.array_equal(shard.arrays[key], value), key
    assert shard.strings == record.strings


def test_shard_round_trip(tmp_path):
    record = sample_record()
    path = write_shard(tmp_path / "shards" / shard_name(3), record)
    assert path.name == "step_00000003.h5"
    assert list_shards(tmp_path / "shards") == [path]
    shard = read_shard(path)
    assert_round_trip(record, shard)
    assert isinstance(shard.attrs["projection"], dict)
    assert shard.attrs["schema_version"] == 1
    assert not list(path.parent.glob("*.tmp"))


def test_shard_string_attrs_keep_their_type(tmp_path):
    """A string attribute comes back as the same string, even when it looks like JSON."""
    record = ShardRecord(step=0, attrs={"tag": "[1, 2]", "model": "null", "info": '{"a": 1}'})
    shard = read_shard(write_shard(tmp_path / shard_name(0), record))
    for key, value in record.attrs.items():
        assert shard.attrs[key] == value, f"{key}: wrote {value!r}, read {shard.attrs[key]!r}"


def test_list_shards_orders_by_step_and_ignores_partial_files(tmp_path):
    for step in (12, 0, 3):
        write_shard(tmp_path / shard_name(step), ShardRecord(step=step))
    (tmp_path / "step_00000020.h5.tmp").write_bytes(b"partial")
    assert [read_shard(p).step for p in list_shards(tmp_path)] == [0, 3, 12]


def test_read_shard_refuses_other_schema(tmp_path):
    path = tmp_path / "foreign.h5"
    with h5py.File(path, "w") as handle:
        handle.attrs["schema_version"] = 99
    with pytest.raises(ValueError, match="schema_version"):
        read_shard(path)


def test_f27_strings_round_trip(tmp_path):
    ids = ["pair-0001", "pair-0002", "naïve-3"]
    names = ["gpt_neox.layers.0.mlp.dense_h_to_4h.weight", "embed_out.weight"]
    record = ShardRecord(
        step=0,
        attrs={"model_name": "tiny-neox-ü"},
        strings={"sample_ids": ids, "parameter_names": names},
    )
    shard = read_shard(write_shard(tmp_path / shard_name(0), record))
    read_ids = shard.strings["sample_ids"]
    assert isinstance(read_ids, list) and all(type(s) is str for s in read_ids)
    assert read_ids == ids
    assert "pair-0002" in read_ids
    assert "naïve-3" in read_ids
    assert shard.strings["parameter_names"] == names
    assert all(type(s) is str for s in shard.strings["parameter_names"])
    assert shard.attrs["model_name"] == "tiny-neox-ü"
    assert type(shard.attrs["model_name"]) is str


@pytest.fixture
def no_lock_filesystem(monkeypatch):
    """h5py.File fails like NFS does (errno 37) whenever file locking is requested."""
    for name in LOCKING_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    real_file = h5py.File
    calls = []

    def fake_file(path, mode="r", *args, locking=None, **kwargs):
        calls.append(locking)
        if locking is None or locking is True or locking == "best-effort":
            raise OSError(
                errno.ENOLCK,
                "Unable to synchronously open file (unable to lock file, errno = 37, "
                "error message = 'No locks available')",
            )
        return real_file(path, mode, *args, locking=locking, **kwargs)

    monkeypatch.setattr(h5py, "File", fake_file)
    return calls


def test_f25_lock_error_names_the_workaround(tmp_path, no_lock_filesystem):
    with pytest.raises(OSError) as error:
        write_shard(tmp_path / shard_name(0), sample_record(0))
    assert "HDF5_USE_FILE_LOCKING=FALSE" in str(error.value)
    assert "GRADDYN_HDF5_LOCKING=0" in str(error.value)
    assert error.value.errno == errno.ENOLCK


@pytest.mark.parametrize(
    "variable,value", [("HDF5_USE_FILE_LOCKING", "FALSE"), ("GRADDYN_HDF5_LOCKING", "0")]
)
def test_f25_no_locking(tmp_path, no_lock_filesystem, monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    record = sample_record(1)
    path = write_shard(tmp_path / shard_name(1), record)
    assert_round_trip(record, read_shard(path))
    assert no_lock_filesystem and all(locking is False for locking in no_lock_filesystem)


@pytest.mark.parametrize("locking", ["default", "off"])
def test_f25_writer_and_reader_handles_share_locking(tmp_path, monkeypatch, locking):
    for name in LOCKING_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    if locking == "off":
        monkeypatch.setenv("GRADDYN_HDF5_LOCKING", "0")
    path = tmp_path / "shared.h5"
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    with open_h5(path, "w") as writer:
        writer.create_dataset("grads", data=data)
        writer.flush()
        with open_h5(path, "r") as reader:
            assert np.array_equal(reader["grads"][()], data)
    with open_h5(path, "a") as writer, open_h5(path, "r") as reader:
        assert np.array_equal(reader["grads"][()], data)
        assert np.array_equal(writer["grads"][()], data)


def test_async_writer_runs_jobs_in_order():
    writer = AsyncWriter(max_pending=2)
    done = []
    for index in range(20):
        writer.submit(lambda index=index: done.append(index))
    writer.flush()
    assert done == list(range(20))
    writer.submit(lambda: done.append(20))
    writer.close()
    assert done == list(range(21))


def test_async_writer_applies_back_pressure():
    writer = AsyncWriter(max_pending=1)
    release = threading.Event()
    writer.submit(release.wait)  # taken by the thread, blocks it
    writer.submit(lambda: None)  # fills the queue
    blocked = threading.Thread(target=writer.submit, args=(lambda: None,))
    blocked.start()
    blocked.join(timeout=0.2)
    assert blocked.is_alive(), "a full queue must block submit"
    release.set()
    blocked.join(timeout=5)
    assert not blocked.is_alive()
    writer.close()


def test_async_writer_raises_job_errors_in_the_caller():
    def fail():
        raise OSError("disk full")

    writer = AsyncWriter()
    writer.submit(fail)
    with pytest.raises(RuntimeError, match="disk full") as error:
        writer.flush()
    assert isinstance(error.value.__cause__, OSError)
    done = []
    writer.submit(lambda: done.append(1))
    writer.close()
    assert done == [1], "the writer keeps working once the error was reported"

    writer = AsyncWriter()
    writer.submit(fail)
    with pytest.raises(RuntimeError, match="disk full"):
        writer.close()


def test_capture_style_writes_surface_a_refused_shard(tmp_path):
    writer = AsyncWriter()
    bad = ShardRecord(step=0, arrays={"grads/per_sequence": np.array([np.inf])})
    writer.submit(lambda: write_shard(tmp_path / shard_name(0), bad))
    with pytest.raises(RuntimeError, match="non-finite"):
        writer.close()
    assert list_shards(tmp_path) == []
