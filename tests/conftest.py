import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run through the device tool)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fp8_pair(tmp_path_factory):
    """The tiny pair with its target quantized to FP8 by nvidia-modelopt (tests.helpers.write_fp8_pair), made once."""
    from tests.helpers import write_fp8_pair

    return write_fp8_pair(tmp_path_factory.mktemp("fp8-pair"))
