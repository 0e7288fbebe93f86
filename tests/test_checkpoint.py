"""Checkpoints: a faithful round trip, atomic replacement, corruption detected, no pickle anywhere."""

import errno
import json
import os
import random
import re

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from patchbench import checkpoint as ck
from patchbench.errors import UserError


def trained_model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        loss = model(torch.randn(5, 4)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


def save(folder, model, opt, **extra):
    opt_doc, opt_t = ck.optimizer_to_parts(opt)
    rng_doc, rng_t = ck.rng_to_parts()
    return ck.save_checkpoint(folder, "last", model.state_dict(),
                              {"epoch": 3, "optimizer": opt_doc, "rng": rng_doc, **extra}, {**opt_t, **rng_t})


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    model, opt = trained_model_and_optimizer()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save(tmp_path, model, opt)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())

    state, weights, tensors = ck.load_checkpoint(tmp_path / "last.json")
    assert state["epoch"] == 3
    fresh, fresh_opt = trained_model_and_optimizer(seed=9)
    fresh.load_state_dict(weights)
    ck.optimizer_from_parts(fresh_opt, state["optimizer"], tensors)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    # the next optimizer step is the same, so the moments and step counts came back
    for m, o in ((model, opt), (fresh, fresh_opt)):
        torch.manual_seed(0)
        loss = m(torch.randn(5, 4)).square().mean()
        o.zero_grad()
        loss.backward()
        o.step()
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    ck.rng_from_parts(state["rng"], tensors)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_a_crash_while_writing_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    model, opt = trained_model_and_optimizer()
    save(tmp_path, model, opt)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    real = safetensors.torch.save_file
    calls = []

    def crash_on_second_file(tensors, path, *a, **k):
        calls.append(path)
        real(tensors, path, *a, **k)
        if len(calls) == 2:  # the weights were written to their temp file, the state half-way
            with open(path, "r+b") as f:
                f.truncate(100)
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    monkeypatch.setattr(ck, "save_file", crash_on_second_file)
    model2, opt2 = trained_model_and_optimizer(seed=5)
    with pytest.raises(UserError, match="cannot write .*last.state.safetensors: no space left on the device; free"):
        save(tmp_path, model2, opt2)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # same files, same bytes, no temporary files left behind
    _state, weights, _ = ck.load_checkpoint(tmp_path)
    assert torch.equal(weights["0.weight"], model.state_dict()["0.weight"])


def test_mismatched_or_missing_files_are_reported(tmp_path):
    model, opt = trained_model_and_optimizer()
    save(tmp_path, model, opt)
    other, _other_opt = trained_model_and_optimizer(seed=4)
    (content,) = [p for p in tmp_path.glob("last.*.safetensors") if not p.name.endswith(".state.safetensors")]
    safetensors.torch.save_file(other.state_dict(), str(content))  # other weights under the checkpoint's name
    with pytest.raises(UserError, match=r"last\.[0-9a-f]{16}\.safetensors is damaged \(its digest does not match\)"):
        ck.load_checkpoint(tmp_path / "last.safetensors")
    content.unlink()
    with pytest.raises(UserError, match="is missing"):
        ck.load_checkpoint(tmp_path / "last.json")
    with pytest.raises(UserError, match="no checkpoint"):
        ck.load_checkpoint(tmp_path / "nothing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"format": "pickle"}))
    with pytest.raises(UserError, match="not a patchbench checkpoint"):
        ck.load_checkpoint(tmp_path / "bad.json")


def test_files_are_safetensors_and_json_only(tmp_path):
    model, opt = trained_model_and_optimizer()
    save(tmp_path, model, opt)
    doc = json.loads((tmp_path / "last.json").read_text())
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["last.json", "last.safetensors", doc["files"]["weights"], doc["files"]["state"]])
    assert re.fullmatch(r"last\.[0-9a-f]{16}\.state\.safetensors", doc["files"]["state"])
    assert os.path.samefile(tmp_path / "last.safetensors", tmp_path / doc["files"]["weights"])  # the fixed-name link
    keys = safetensors.torch.load_file(str(tmp_path / doc["files"]["state"])).keys()
    assert any(k.startswith("optim.") and k.endswith("exp_avg_sq") for k in keys) and "rng.torch" in keys
    assert set(safetensors.torch.load_file(str(tmp_path / "last.safetensors"))) == set(model.state_dict())


def test_a_second_save_replaces_the_first_and_an_edited_manifest_is_refused(tmp_path):
    model, opt = trained_model_and_optimizer()
    save(tmp_path, model, opt)
    model2, opt2 = trained_model_and_optimizer(seed=5)
    save(tmp_path, model2, opt2)
    assert len(list(tmp_path.iterdir())) == 4  # the manifest, two content-named files, the fixed-name link
    _, weights, _ = ck.load_checkpoint(tmp_path)
    assert torch.equal(weights["0.weight"], model2.state_dict()["0.weight"])
    doc = json.loads((tmp_path / "last.json").read_text())
    doc["classes"] = ["other", "classes"]
    (tmp_path / "last.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match=r"last\.json was changed after it was written"):
        ck.load_checkpoint(tmp_path)


def test_leftovers_of_killed_saves_are_removed_and_nothing_else(tmp_path):
    model, opt = trained_model_and_optimizer()
    save(tmp_path, model, opt)
    kept = sorted(p.name for p in tmp_path.iterdir())
    (tmp_path / ".last.json.tmp-4242").write_text("{")
    (tmp_path / "last.0123456789abcdef.safetensors").write_bytes(b"x")  # renamed, never committed
    assert sorted(ck.remove_leftovers(tmp_path)) == [".last.json.tmp-4242", "last.0123456789abcdef.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == kept


def test_weights_of_another_shape_are_one_line_naming_the_checkpoint():
    model, _ = trained_model_and_optimizer()
    other = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) if v.dim() else v for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match=r"^the checkpoint in runs/x does not fit Sequential as configured \(size "
                                        r"mismatch for 0\.weight.*\); use it with the model configuration"):
        ck.load_weights(model, other, "runs/x")
