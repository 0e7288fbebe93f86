import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a test module on one torch thread.

    Small convs gain little from a second thread, and on a shared CPU OpenMP's spin-waiting makes
    backward passes up to 10x slower; one thread keeps such modules fast and steady.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
