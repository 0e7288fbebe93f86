"""The run-directory schema: files of an earlier schema are read (and rewritten) in the current one, and a
newer one is refused with a message naming the file."""

import json

import pytest

from patchbench import rundir

V1_SUMMARY = {"status": "finished", "model": "resnet9", "final_top1": 0.5, "best_top1": 0.6, "best_epoch": 3,
              "epochs_done": 4}
V1_CONFIG = {"model": {"name": "resnet9", "overrides": {}}, "train": {"seed": 0},
             "env": {"torch": "2.3.0", "git_commit": "abc", "hostname": "lab-pc"}, "derived": {"steps": 40}}


def write(path, doc):
    path.write_text(json.dumps(doc))
    return path


def test_a_schema_1_run_reads_in_the_current_names(tmp_path):
    write(tmp_path / rundir.SUMMARY, V1_SUMMARY), write(tmp_path / rundir.CONFIG, V1_CONFIG)
    summary = rundir.read_summary(tmp_path / rundir.SUMMARY)
    assert summary["schema"] == rundir.SCHEMA == 2
    assert summary["lowest_loss_top1"] == 0.6 and summary["lowest_loss_epoch"] == 3
    assert "best_top1" not in summary and "best_epoch" not in summary and summary["final_top1"] == 0.5
    config = rundir.read_config(tmp_path)
    assert config["schema"] == 2 and config["env"] == {"torch": "2.3.0", "git_commit": "abc"}
    assert config["derived"] == {"steps": 40} and config["model"]["name"] == "resnet9"


def test_upgrade_run_rewrites_only_what_is_older(tmp_path):
    write(tmp_path / rundir.SUMMARY, V1_SUMMARY), write(tmp_path / rundir.CONFIG, V1_CONFIG)
    assert rundir.upgrade_run(tmp_path) == [tmp_path / rundir.CONFIG, tmp_path / rundir.SUMMARY]
    on_disk = json.loads((tmp_path / rundir.SUMMARY).read_text())
    assert on_disk["schema"] == 2 and on_disk["lowest_loss_top1"] == 0.6 and "best_top1" not in on_disk
    assert "hostname" not in json.loads((tmp_path / rundir.CONFIG).read_text())["env"]
    before = (tmp_path / rundir.SUMMARY).stat().st_mtime_ns
    assert rundir.upgrade_run(tmp_path) == []  # already current: nothing rewritten
    assert (tmp_path / rundir.SUMMARY).stat().st_mtime_ns == before
    assert rundir.upgrade_run(tmp_path / "empty") == []


@pytest.mark.parametrize("schema, message", [
    (3, "written in run-directory schema 3, newer than this patchbench's \\(2\\); upgrade patchbench"),
    ("2", 'schema is "2", not a version number'),
    (0, "schema is 0, not a version number"),
])
def test_a_schema_this_version_cannot_read_is_named(tmp_path, schema, message):
    path = write(tmp_path / rundir.SUMMARY, {**V1_SUMMARY, "schema": schema})
    with pytest.raises(rundir.RunFileError, match=message):
        rundir.read_summary(path)
    write(tmp_path / rundir.CONFIG, {**V1_CONFIG, "schema": schema})
    with pytest.raises(rundir.RunFileError, match=message):
        rundir.read_config(tmp_path)
