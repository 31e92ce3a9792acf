"""Files written whole or not at all (steer_plugin/core/files.py)."""

import pytest

from steer_plugin.core.files import replaced_on_success


def test_a_write_replaces_the_file_only_when_it_finishes(tmp_path):
    path = tmp_path / "catalogue.json.gz"
    path.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with replaced_on_success(path) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt  # a run stopped mid-write
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]
    with replaced_on_success(path) as tmp:
        tmp.write_text("new")
    assert path.read_text() == "new" and list(tmp_path.iterdir()) == [path]
