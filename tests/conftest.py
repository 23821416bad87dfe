import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(min(2, torch.get_num_threads()))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def server_model_dir(tmp_path_factory):
    """A tiny random nemotron_h model + a tiny trained tokenizer, saved as a normal model directory
    (the server tests load it through the usual path)."""
    from server_utils import build_model_dir
    return build_model_dir(tmp_path_factory.mktemp("server_model"))
