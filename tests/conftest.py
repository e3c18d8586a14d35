import pyro
import pytest
import torch

# Tiny models: one thread per test process is several times faster than two fighting over 2 cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
