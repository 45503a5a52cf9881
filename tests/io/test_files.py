"""io/files.py and io/peft.py: files that hold no adapter, or an adapter of the other format, are named."""

from __future__ import annotations

import copy
import json

import pytest
from torch import nn

import rankwise as rw


def _saved(tmp_path):
    base = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    model = rw.adapt(copy.deepcopy(base), "lora", rank=2, targets=["0"], seed=0)
    rw.save(model, tmp_path / "ad")
    return base, tmp_path / "ad"


@pytest.mark.parametrize("empty", [{}, [], None])
def test_load_of_a_file_with_no_adapter_is_an_error(tmp_path, empty):
    """Reliability case F10: ``"adapters": {}`` loaded nothing and returned normally."""
    base, path = _saved(tmp_path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["adapters"] = empty
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    model = copy.deepcopy(base)
    with pytest.raises(rw.errors.CorruptFileError, match=r"holds no adapter.*rw.save"):
        rw.load(model, path)
    assert not rw.core.api.adapter_state(model), "nothing may be added to the model"


def test_import_peft_of_a_rankwise_adapter_points_to_load(tmp_path):
    """Reliability case E9: the message said the PEFT type None had no method."""
    base, path = _saved(tmp_path)
    with pytest.raises(rw.errors.ConfigError, match=r"is a rankwise adapter.*rw\.load\(model"):
        rw.import_peft(copy.deepcopy(base), path)
