"""Atomic outputs: a failed write leaves the old file and no temporary files; normal permissions."""

import os
import stat

import pytest
import torch

from pipeline.io import atomic_path, read_csv, read_json, torch_load, torch_save, write_csv, write_json


def test_json_csv_and_torch_round_trip(tmp_path):
    write_json(tmp_path / "a/b.json", {"x": torch.tensor(1.5), "path": tmp_path})
    assert read_json(tmp_path / "a/b.json") == {"x": 1.5, "path": str(tmp_path)}
    write_csv(tmp_path / "c.csv", [{"step": 1, "value": 2.0}, {"step": 2, "value": 3.5}])
    assert read_csv(tmp_path / "c.csv") == [{"step": "1", "value": "2.0"}, {"step": "2", "value": "3.5"}]
    torch_save(tmp_path / "t.pt", {"phi": torch.arange(3)})
    assert torch.equal(torch_load(tmp_path / "t.pt")["phi"], torch.arange(3))
    assert torch.equal(torch_load((tmp_path / "t.pt").read_bytes())["phi"], torch.arange(3))


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"version": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half a fi")
            raise RuntimeError("killed mid-write")
    assert read_json(target) == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_written_files_get_the_usual_permissions(tmp_path):
    path = write_json(tmp_path / "m.json", {})
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
