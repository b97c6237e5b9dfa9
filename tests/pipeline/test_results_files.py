"""The files tools write: a directory of its own per run, an explicit --out never overwritten,
records replaced whole or not at all."""

from __future__ import annotations

import json
import threading

import pytest

from spatialmerge.results import new_run_dir, refuse_existing, write_json_atomic


def test_runs_started_in_the_same_second_get_directories_of_their_own(tmp_path):
    made: list = []
    start = threading.Barrier(8)

    def claim() -> None:
        start.wait()
        made.append(new_run_dir(tmp_path / "logs", "export"))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(made)) == 8 and all(path.is_dir() and not any(path.iterdir()) for path in made)
    assert {path.parent for path in made} == {tmp_path / "logs" / "export"}
    # the first keeps the bare time stamp; later ones in that second are numbered from 2
    stamps = sorted(path.name for path in made)
    bare = [name for name in stamps if "_" not in name.rsplit("-", 1)[-1]]
    for name in bare:
        numbered = [s for s in stamps if s.startswith(name + "_")]
        assert sorted(int(s.rsplit("_", 1)[1]) for s in numbered) == list(range(2, len(numbered) + 2))


def test_an_existing_out_is_refused_naming_it_and_the_tool(tmp_path):
    out = tmp_path / "picture.png"
    assert refuse_existing(out, "a picture") == out
    out.write_bytes(b"an earlier picture")
    with pytest.raises(FileExistsError, match=rf"{out} exists; a picture never overwrites a file: choose another --out"):
        refuse_existing(out, "a picture")
    assert out.read_bytes() == b"an earlier picture"


def test_a_failed_write_leaves_the_previous_record_whole(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"status": "ok"})

    class Unserialisable:
        def __str__(self) -> str:
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_json_atomic(path, {"status": "second", "value": Unserialisable()})
    assert json.loads(path.read_text()) == {"status": "ok"}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"], "no temporary file is left behind"
