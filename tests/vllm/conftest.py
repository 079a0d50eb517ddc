"""Fixtures of the vLLM tests, which run in the vLLM venv (``make test-vllm``; scripts/setup_vllm_venv.sh makes it),
never in the project venv (setup.cfg keeps this folder out of ``make test``).

Engines run in the test process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and the "uni" executor of
:data:`vllm_helpers.ENGINE_DEFAULTS`): one then takes seconds to build instead of the 20-30 s of spawning an engine
and a worker, and the session-scoped :class:`vllm_helpers.EnginePool` keeps one alive while tests ask for the same.
vLLM's cache (torch.compile artifacts) goes to a temporary folder, never the user's.
"""

import os
import sys
from pathlib import Path

import pytest

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from vllm_helpers import EnginePool, ReferenceProcess, save_compacted  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _vllm_cache(tmp_path_factory):
    os.environ["VLLM_CACHE_ROOT"] = str(tmp_path_factory.mktemp("vllm-cache"))
    yield


@pytest.fixture(scope="session")
def vllm_engines():
    """The session's :class:`~vllm_helpers.EnginePool`: ``vllm_engines.get(folder, **LLM_kwargs)``."""
    pool = EnginePool()
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def compacted_folder(tmp_path_factory):
    """``compacted_folder(family)``: the folder of that family's tiny compacted model
    (:func:`vllm_helpers.save_compacted`, seed 0), saved once per session."""
    folders = {}

    def get(family: str) -> Path:
        if family not in folders:
            folders[family] = save_compacted(family, tmp_path_factory.mktemp(f"compacted-{family}"))
        return folders[family]

    return get


@pytest.fixture(scope="session")
def dip_ext_reference():
    """The session's :class:`~vllm_helpers.ReferenceProcess` (``dip_ext.from_pretrained`` in a process of its own)."""
    worker = ReferenceProcess()
    yield worker
    worker.close()
