"""Take the dataset the data team published (the newest finished `publish` run)."""

import argparse
import shutil
import tempfile
from pathlib import Path

from mnist_common import latest_dataset

p = argparse.ArgumentParser()
p.add_argument("--dataset", required=True)
a = p.parse_args()
with tempfile.TemporaryDirectory() as tmp:
    shutil.copy(latest_dataset(Path(tmp)), a.dataset)
print("fetched the published MNIST dataset")
