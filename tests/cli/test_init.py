"""`scanflow init`: what it writes validates as it is, and bad input is refused (exit 2, with
what is wrong) before anything is written. The whole loop on a generated app is
tests/examples/test_init_app.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from scanflow.cli.main import app as cli


def scanflow(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli, list(args))
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, " ".join(res.output.split())


def images(path: Path, n: int = 300, channels: bool = False) -> Path:
    """Small 8x8 images whose class is the bright half (left or right)."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n)
    x = rng.integers(0, 60, (n, 8, 8)).astype(np.uint8)
    for i, label in enumerate(y):
        x[i, :, 4 * label:4 * label + 4] += 150
    np.savez(path, x=x[..., None] if channels else x, y=y)
    return path


def customers(path: Path, n: int = 400) -> Path:
    import pandas as pd

    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3))
    frame = pd.DataFrame(x, columns=["age", "spend", "visits"])
    frame["plan"] = rng.choice(["basic", "pro", None], size=n)
    frame.loc[5, "spend"] = np.nan
    frame["churn"] = np.where(x[:, 0] + x[:, 1] > 0, "yes", "no")
    frame.to_csv(path, index=False)
    return path


def test_image_template_from_an_npz_validates(tmp_path: Path) -> None:
    data = images(tmp_path / "digits.npz", channels=True)
    code, out = scanflow("init", str(tmp_path / "digits-app"), "--template", "image", "--data", str(data))
    assert code == 0, out
    app = tmp_path / "digits-app"
    schema = (app / "data" / "schema.json").read_text()
    assert '"image_shape": [\n    8,\n    8,\n    1\n  ]' in schema and '"pixel_max": 255.0' in schema
    with np.load(app / "data" / "dataset.npz") as d:
        assert d["x"].shape == (300, 64) and d["y"].shape == (300,)  # flattened, as served
    code, out = scanflow("validate", str(app))
    assert code == 0 and "2 workflow(s), 1 service(s), 4 agent(s)" in out, out
    spec = yaml.safe_load((app / "scanflow.yaml").read_text())
    assert spec["models"] == ["digits-app-clf"]
    assert spec["services"]["digits-app"]["model"] == "digits-app-clf"
    executor = spec["agents"]["executor"]["sensors"][0]["actuators"][0]
    assert executor["params"]["app"] == "scanflow.yaml" and executor["params"]["workflow"] == "retrain"
    assert "flattened image" in (app / "README.md").read_text()


def test_tabular_template_encodes_categories_and_writes_clean_python(tmp_path: Path) -> None:
    data = customers(tmp_path / "customers.csv")
    code, out = scanflow("init", str(tmp_path / "app"), "--data", str(data), "--target", "churn",
                         "--name", "shop")
    assert code == 0, out
    assert "1 missing value(s) of 'spend' filled" in out
    app = tmp_path / "app"
    import json

    schema = json.loads((app / "data" / "schema.json").read_text())
    plan = schema["features"][3]
    assert plan == {"name": "plan", "kind": "categorical", "categories": ["basic", "pro", "<missing>"]}
    assert schema["classes"] == ["no", "yes"]
    readme = (app / "README.md").read_text()
    assert "`age`, `spend`, `visits`, `plan` (a category code)" in readme and "curl" in readme
    assert scanflow("validate", str(app))[0] == 0
    # The generated scripts are the user's code now: they must pass a linter as they are.
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--isolated",
                           "--select", "E,F,W,I,B", "--line-length", "110", str(app)],
                          capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def _bad_npz(tmp: Path) -> Path:
    (tmp / "bad.npz").write_bytes(b"\x00not an npz")
    return tmp / "bad.npz"


def _few_rows(tmp: Path) -> Path:
    return customers(tmp / "few.csv", n=50)


def _text_column(tmp: Path) -> Path:
    import pandas as pd

    frame = pd.read_csv(customers(tmp / "c.csv"))
    frame["email"] = [f"user{i}@example.org" for i in range(len(frame))]
    frame.to_csv(tmp / "text.csv", index=False)
    return tmp / "text.csv"


def _regression(tmp: Path) -> Path:
    import pandas as pd

    frame = pd.read_csv(customers(tmp / "c.csv"))
    frame["churn"] = frame["age"] * 1.5
    frame.to_csv(tmp / "reg.csv", index=False)
    return tmp / "reg.csv"


@pytest.mark.parametrize(("make", "extra", "message"), [
    (lambda t: t / "missing.csv", ["--target", "churn"], "no such file"),
    (_bad_npz, [], "not a readable .npz"),
    (lambda t: customers(t / "c.csv"), ["--target", "price"],
     "no such column in c.csv (columns: age, spend, visits, plan, churn)"),
    (lambda t: customers(t / "c.csv"), [],
     "--target is required for a table: the column to predict (columns: age, spend"),
    (_few_rows, ["--target", "churn"], "50 labelled row(s); an application needs at least 200"),
    (_text_column, ["--target", "churn"], "cannot use column(s) 'email' (400 distinct values"),
    (_regression, ["--target", "churn"], "non-integer numbers (a regression target?)"),
    (lambda t: images(t / "i.npz"), ["--template", "tabular"], "needs `x` of shape (n, features)"),
    (lambda t: customers(t / "c.csv"), ["--template", "image", "--target", "churn"],
     "the image template reads an .npz"),
    (lambda t: images(t / "i.npz"), ["--template", "image", "--target", "labels"],
     "needs arrays `x` (features) and `labels`"),
    (lambda t: customers(t / "c.txt"), ["--target", "churn"], "unsupported format '.txt'"),
    (lambda t: customers(t / "c.csv"), ["--template", "text", "--target", "churn"],
     "expected one of tabular"),
])
def test_bad_input_is_exit_2_and_writes_nothing(tmp_path: Path, make, extra: list[str], message: str) -> None:  # type: ignore[no-untyped-def]
    data = make(tmp_path)
    code, out = scanflow("init", str(tmp_path / "app"), "--data", str(data), *extra)
    assert code == 2 and message in out and "nothing was written" in out, out
    assert not (tmp_path / "app").exists()


def test_a_folder_in_use_is_refused_unless_forced(tmp_path: Path) -> None:
    data = images(tmp_path / "i.npz")
    app = tmp_path / "app"
    app.mkdir()
    (app / "notes.txt").write_text("mine")
    code, out = scanflow("init", str(app), "--template", "image", "--data", str(data))
    assert code == 2 and "exists and is not empty" in out, out
    assert [p.name for p in app.iterdir()] == ["notes.txt"]
    code, out = scanflow("init", str(app), "--template", "image", "--data", str(data), "--force")
    assert code == 0, out
    assert (app / "notes.txt").read_text() == "mine" and (app / "scanflow.yaml").is_file()
