"""ResumableResults: what a rerun keeps, what it does again, and files it refuses to overwrite."""
import json

import pytest

from modules.errors import UserError
from modules.results import ResumableResults

ITEMS = [{"question": name} for name in ("a", "b", "c")]


def squares(path, settings="v1", field=None):
    """Results that answer each question under `settings`, in a list or (with `field`) an object."""
    def to_file(results):
        done = [result for result in results if result]
        return {field: done} if field else done
    return ResumableResults(path, ITEMS, key=lambda record: record["question"], what="a file of squares",
                            keeps=lambda record: record.get("settings") == settings, to_file=to_file, field=field)


@pytest.mark.parametrize("field", [None, "results"])
def test_a_rerun_keeps_results_of_the_same_settings_only(tmp_path, field):
    path = tmp_path / "out.json"
    first = squares(path, field=field)
    assert first.pending == [0, 1, 2] and first.kept == 0
    first.record({2: {"question": "c", "settings": "v1", "answer": 9}})
    saved = json.loads(path.read_text())
    assert (saved[field] if field else saved) == [{"question": "c", "settings": "v1", "answer": 9}]

    again = squares(path, field=field)
    assert again.pending == [0, 1] and again.kept == 1 and again.results[2]["answer"] == 9
    assert squares(path, settings="v2", field=field).pending == [0, 1, 2]  # made otherwise: done anew
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # written atomically, no temporary file left


@pytest.mark.parametrize("content", ["[{", json.dumps({"not": "a list"}), json.dumps("text")])
def test_a_file_that_is_not_results_is_refused_not_overwritten(tmp_path, content):
    path = tmp_path / "out.json"
    path.write_text(content)
    with pytest.raises(UserError, match="a file of squares; move it away or choose another --out"):
        squares(path)
    assert path.read_text() == content


def test_records_that_are_not_objects_are_skipped(tmp_path):
    path = tmp_path / "out.json"
    path.write_text(json.dumps({"results": ["junk", {"question": "a", "settings": "v1"}]}))
    assert squares(path, field="results").pending == [1, 2]
