"""Take the dataset the data team published (the newest finished `publish` run)."""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mnist_common import latest_dataset

p = argparse.ArgumentParser()
p.add_argument("--dataset", required=True)
a = p.parse_args()
with tempfile.TemporaryDirectory() as tmp:
    shutil.copy(latest_dataset(Path(tmp)), a.dataset)
print("fetched the published MNIST dataset")
