import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Tests share 2 cores: one torch thread per process keeps multi-process tests from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def cli(*args: str) -> list[str]:
    """The console command as a subprocess would run it."""
    return [sys.executable, "-m", "pcl_hpc", *args]


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _keep_utf8_locale():
    """ITK's DICOM reader resets the C locale; subprocess output decoding must stay UTF-8 after it."""
    import locale

    yield
    if locale.getpreferredencoding(False).lower().replace("-", "") != "utf8":
        for name in ("C.UTF-8", "en_US.UTF-8", ""):
            try:
                locale.setlocale(locale.LC_CTYPE, name)
                break
            except locale.Error:
                continue


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory):
    """The demo's real-anatomy volumes, preprocessed once into a Zarr store for the whole session."""
    from pcl_hpc.config import DataConfig
    from pcl_hpc.data.demo_data import make_demo_data
    from pcl_hpc.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("demo")
    make_demo_data(root / "raw", spacing=3.0, seed=0)
    data = DataConfig(raw_dir=str(root / "raw"), store=str(root / "store.zarr"), layout="generic", folds=3)
    summary = preprocess(data, workers=1, progress=False)
    assert summary.ok, summary.format()
    return str(root / "store.zarr")
