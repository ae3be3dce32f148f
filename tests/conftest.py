import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

torch.set_num_threads(1)  # tiny UNets: more threads only add overhead (and contention on shared CI cores)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts on one thread, whatever an earlier one (a benchmark with --threads) set."""
    torch.set_num_threads(1)
    yield

from lib_unetmods.lab.random_unets import build_unet, example_inputs  # noqa: E402


@pytest.fixture(params=["sd15", "sd21", "sdxl"])
def arch(request):
    return request.param


@pytest.fixture
def tiny_unet(arch):
    return build_unet(arch, "tiny", seed=1)


@pytest.fixture
def make_unet():
    return lambda arch="sd15", size="tiny", seed=1: build_unet(arch, size, seed=seed)


@pytest.fixture
def make_inputs():
    return example_inputs
