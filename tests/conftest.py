import os

# Triton kernels run on CPU tensors through the interpreter; it must be set before
# triton is imported. A GPU machine runs them natively.
if os.environ.get("FASTDD_TEST_NATIVE_TRITON") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# With 2 cores, torch's spinning thread pool makes small ops erratic under load.
torch.set_num_threads(int(os.environ.get("FASTDD_TEST_THREADS", "1")))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    config.addinivalue_line("markers", "slow: longer tests (still run by default)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def assert_close(actual, expected, atol, rtol, name=""):
    """torch.testing-style check that reports how many elements differ and where."""
    actual = actual.detach().float().cpu()
    expected = expected.detach().float().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs()
    bad = diff > atol + rtol * expected.abs()
    if bad.any():
        worst = int(diff.flatten().argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements differ; largest |diff| {diff.max().item():.3g} "
            f"at {idx} (actual {actual[idx].item():.6g}, expected {expected[idx].item():.6g}); atol={atol}, rtol={rtol}"
        )
