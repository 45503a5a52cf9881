"""MiLoRA (methods/milora.py): the bottom-r SVD split of W0 against torch.linalg; PEFT has no MiLoRA,
so its rank-2r LoRA export is checked to load in PEFT with the same outputs."""

from __future__ import annotations

import pytest
import torch
from _init_helpers import check_export_loads_in_peft, check_svd_split

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def _global_seed():
    torch.manual_seed(0)


def test_milora_splits_w0_exactly():
    check_svd_split("milora", smallest=True)


def test_milora_export_loads_in_peft(llama, tmp_path):
    check_export_loads_in_peft("milora", {}, llama(), tmp_path)
