"""Without a usable GPU or compiler the kernels fall back to the torch reference path with one
clear warning, never a crash (core/kernels/build.py). Runs on the CPU: the machine's answers
to "is there CUDA, which GPU, which compiler" are replaced."""

import warnings

import pytest
import torch
import torch.utils.cpp_extension

from core.kernels import build


@pytest.fixture
def fresh_kernels(monkeypatch):
    monkeypatch.delenv(build.ENV_SWITCH, raising=False)
    build.kernels.cache_clear()
    yield
    build.kernels.cache_clear()


def pretend_gpu(monkeypatch, capability, cuda_home="/usr/local/cuda"):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: capability)
    monkeypatch.setattr(torch.utils.cpp_extension, "CUDA_HOME", cuda_home)


def fallback_warnings() -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert build.kernels() is None
        assert build.kernels() is None  # asked again: the same answer, no second warning
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_an_old_gpu_gets_one_warning_naming_the_needed_architecture(fresh_kernels, monkeypatch):
    pretend_gpu(monkeypatch, (7, 0))
    assert fallback_warnings() == ["CUDA kernels unavailable, using the slower torch reference path: "
                                   "the GPU is sm_70; the kernels need sm_75 or newer"]


def test_a_missing_compiler_gets_one_warning_saying_what_to_install(fresh_kernels, monkeypatch):
    pretend_gpu(monkeypatch, (9, 0), cuda_home=None)
    messages = fallback_warnings()
    assert len(messages) == 1 and "no CUDA compiler (nvcc) was found" in messages[0] and "CUDA_HOME" in messages[0]


def test_a_failed_build_warns_and_leaves_the_reference_path(fresh_kernels, monkeypatch, tmp_path):
    pretend_gpu(monkeypatch, (9, 0))
    monkeypatch.setenv("QUANTLAB_HOME", str(tmp_path))
    monkeypatch.setattr(torch.utils.cpp_extension, "is_ninja_available", lambda: True)

    def broken_load(**kwargs):
        raise RuntimeError("Error building extension 'quantlab_kernels'\nnvcc fatal: unsupported option")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", broken_load)
    messages = fallback_warnings()
    assert len(messages) == 1 and "building them failed (RuntimeError: nvcc fatal: unsupported option)" in messages[0]


def test_switched_off_kernels_say_nothing(fresh_kernels, monkeypatch):
    pretend_gpu(monkeypatch, (9, 0))
    monkeypatch.setenv(build.ENV_SWITCH, "0")
    assert fallback_warnings() == []
