"""`scanflow init DIR --template tabular|image --data PATH --target COLUMN`: a complete, working
application for the user's own data, from the templates shipped in `scanflow/templates/`.

What is written: `scanflow.yaml` (workflows `train` and `retrain`, a service with a policy and the
four built-in agents wired as in the MNIST example, with sizes suited to the data), the step
scripts (using `scanflow.tracking.contracts`), `send.py` (traffic and labels), a README, and the
data converted to `data/dataset.npz` (arrays `x`, `y`) with `data/schema.json` (how each feature
is encoded). The data is *copied* (converted): the app never reads PATH again.

Every check runs before anything is written: bad input is exit 2 with what is wrong, and the
folder is left as it was.
"""

from __future__ import annotations

import json
import re
import string
import types
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from scanflow.cli.common import fail, out

TEMPLATES = ("tabular", "image")
TABLE_SUFFIXES = (".csv", ".parquet", ".pq")
MIN_ROWS = 200  # a test set of 40 and a training set worth a reference sample
MIN_PER_CLASS = 5
MAX_CLASSES = 50  # more distinct target values: a regression target or an id, not classes
MAX_CATEGORIES = 50  # more distinct strings in a feature column: free text or an id
MISSING = "<missing>"
TEAM = "ml"


class InitError(ValueError):
    """The input cannot make an application (the message says why and what would)."""


@dataclass
class Dataset:
    """The data as the app will hold it: `x` (rows x features, float) and `y` (class labels)."""

    x: np.ndarray
    y: np.ndarray
    schema: dict[str, Any]
    notes: list[str] = field(default_factory=list)


# -- reading the data -----------------------------------------------------------------------------
def read_dataset(path: Path, template: str, target: str | None) -> Dataset:
    """Read and check `path` for `template`; InitError names what is wrong."""
    if not path.exists():
        raise InitError(f"--data {path}: no such file")
    if not path.is_file():
        raise InitError(f"--data {path}: not a file")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _from_npz(path, template, target or "y")
    if suffix not in TABLE_SUFFIXES:
        raise InitError(f"--data {path}: unsupported format {suffix or '(no suffix)'!r}; expected .csv, "
                        ".parquet or .npz")
    if template == "image":
        raise InitError(f"--data {path}: the image template reads an .npz with `x` of shape (n, h, w) or "
                        "(n, h, w, c) and labels `y`")
    frame = _read_frame(path)
    if not target:
        raise InitError(f"--target is required for a table: the column to predict (columns: "
                        f"{_columns(frame)})")
    return _from_frame(frame, path, target)


def _columns(frame: Any) -> str:
    names = ", ".join(map(str, frame.columns[:30])) + (" ..." if len(frame.columns) > 30 else "")
    return names or "none"


def _read_frame(path: Path) -> Any:
    import pandas as pd  # lazy: pandas (~0.3 s), only for tables

    try:
        if path.suffix.lower() == ".csv":
            return pd.read_csv(path)
        return pd.read_parquet(path)
    except ImportError as exc:
        raise InitError(f"--data {path}: cannot read Parquet here ({exc}); give a .csv") from None
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise InitError(f"--data {path}: cannot read it: {str(exc).strip() or type(exc).__name__}") from None


def _from_frame(frame: Any, path: Path, target: str) -> Dataset:
    import pandas as pd  # lazy: pandas (~0.3 s), only for tables

    if target not in frame.columns:
        raise InitError(f"--target {target!r}: no such column in {path.name} (columns: {_columns(frame)})")
    notes = []
    unlabelled = int(frame[target].isna().sum())
    if unlabelled:
        frame = frame[frame[target].notna()]
        notes.append(f"{unlabelled} row(s) without a `{target}` value left out")
    y = _labels(frame[target].to_numpy(), f"column {target!r}")
    features: list[dict[str, Any]] = []
    columns: list[np.ndarray] = []
    refused: list[str] = []
    for name in (c for c in frame.columns if c != target):
        col = frame[name]
        if pd.api.types.is_bool_dtype(col) or pd.api.types.is_numeric_dtype(col):
            values = col.astype(float)
            if values.isna().all():
                refused.append(f"{name!r} (empty)")
                continue
            fill = float(values.median())
            if values.isna().any():
                notes.append(f"{int(values.isna().sum())} missing value(s) of {name!r} filled with its "
                             f"median {fill:g}")
            features.append({"name": str(name), "kind": "numeric", "fill": fill})
            columns.append(values.fillna(fill).to_numpy(dtype=np.float64))
            continue
        present = sorted({str(v) for v in col.dropna()})
        if len(present) > MAX_CATEGORIES:
            refused.append(f"{name!r} ({len(present)} distinct values: text or an id?)")
            continue
        categories = present + ([MISSING] if col.isna().any() else [])
        codes = {c: i for i, c in enumerate(categories)}
        features.append({"name": str(name), "kind": "categorical", "categories": categories})
        columns.append(np.array([codes[MISSING] if pd.isna(v) else codes[str(v)] for v in col], float))
    if refused:
        raise InitError(f"--data {path.name}: cannot use column(s) {', '.join(refused)}: features are "
                        f"numbers, booleans or categories with at most {MAX_CATEGORIES} distinct values; "
                        "remove these columns from the file")
    if not features:
        raise InitError(f"--data {path.name}: no feature column besides the target {target!r}")
    schema = {"template": "tabular", "source": path.name, "target": target, "features": features,
              "classes": _class_list(y)}
    return _checked(Dataset(np.column_stack(columns), y, schema, notes))


def _from_npz(path: Path, template: str, target: str) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: np.asarray(z[k]) for k in z.files}
    except (OSError, ValueError, EOFError) as exc:
        raise InitError(f"--data {path}: not a readable .npz: {exc}") from None
    if "x" not in arrays or target not in arrays:
        raise InitError(f"--data {path.name}: needs arrays `x` (features) and `{target}` (labels, "
                        f"--target); it has: {', '.join(sorted(arrays)) or 'none'}")
    x = arrays["x"]
    if not np.issubdtype(x.dtype, np.number) and x.dtype != bool:
        raise InitError(f"--data {path.name}: `x` holds {x.dtype}, not numbers")
    if template == "image" and x.ndim not in (3, 4):
        raise InitError(f"--data {path.name}: the image template needs `x` of shape (n, h, w) or "
                        f"(n, h, w, c), got {x.shape}")
    if template == "tabular" and x.ndim != 2:
        raise InitError(f"--data {path.name}: the tabular template needs `x` of shape (n, features), "
                        f"got {x.shape} (images: --template image)")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise InitError(f"--data {path.name}: `x` holds NaN or infinite values")
    if len(arrays[target]) != len(x):
        raise InitError(f"--data {path.name}: `x` has {len(x)} rows but `{target}` has {len(arrays[target])}")
    y = _labels(arrays[target].reshape(len(x), -1)[:, 0] if arrays[target].ndim > 1 else arrays[target],
                f"array {target!r}")
    schema: dict[str, Any] = {"template": template, "source": path.name, "target": target,
                              "classes": _class_list(y)}
    if template == "image":
        schema["image_shape"] = list(x.shape[1:])
        schema["pixel_max"] = 255.0 if float(x.max(initial=0.0)) > 1.0 else 1.0
    else:
        schema["features"] = [{"name": f"x{i}", "kind": "numeric", "fill": float(np.median(x[:, i]))}
                              for i in range(x.shape[1])]
    return _checked(Dataset(x.reshape(len(x), -1), y, schema))


def _labels(raw: np.ndarray, what: str) -> np.ndarray:
    """Class labels: integers (from ints, bools or integral floats) or strings."""
    if raw.dtype == bool:
        return raw.astype(np.int64)
    if np.issubdtype(raw.dtype, np.number):
        values = raw.astype(np.float64)
        if not np.isfinite(values).all() or not np.all(values == np.round(values)):
            raise InitError(f"{what} holds non-integer numbers (a regression target?): the templates are "
                            "classifiers - the agents judge served accuracy")
        return values.astype(np.int64)
    return np.array([str(v) for v in raw])


def _class_list(y: np.ndarray) -> list[Any]:
    return [v.item() if hasattr(v, "item") else v for v in np.unique(y)]


def _checked(ds: Dataset) -> Dataset:
    n = len(ds.y)
    if n < MIN_ROWS:
        raise InitError(f"--data: {n} labelled row(s); an application needs at least {MIN_ROWS} (a clean "
                        "test "
                        "set and a reference sample are kept aside)")
    classes, counts = np.unique(ds.y, return_counts=True)
    if len(classes) < 2:
        raise InitError(f"--target: every row has the label {classes[0]!r}: a classifier needs 2 classes")
    if len(classes) > MAX_CLASSES:
        raise InitError(f"--target: {len(classes)} distinct labels; the templates are classifiers of at "
                        f"most {MAX_CLASSES} classes (a regression target or an id?)")
    rare = [f"{c!r} ({k})" for c, k in zip(classes.tolist(), counts.tolist(), strict=True)
            if k < MIN_PER_CLASS]
    if rare:
        raise InitError(f"--target: too few rows of class(es) {', '.join(rare)}; each class needs at least "
                        f"{MIN_PER_CLASS}")
    return ds


# -- sizes suited to the data ---------------------------------------------------------------------
def sizes(n_rows: int) -> dict[str, int]:
    """The spec's numbers for `n_rows` labelled rows: the reference sample (training rows the
    analyzer compares served inputs with), the monitor's window, the labels the executor waits
    for and the holdout the promotion gate needs (30 % of them)."""
    n_test = int(np.ceil(n_rows * 0.2))  # steps/split.py's default test_fraction
    n_train = n_rows - n_test
    reference = min(2000, n_train)
    window = min(500, max(100, (reference // 8) // 50 * 50))
    min_labels = min(1500, max(200, 2 * window))
    return {"n_test": n_test, "reference_size": reference, "window_size": window, "min_labels": min_labels}


def _template_module(template: str) -> Any:
    """The app's `steps/model.py` as a module, so init fits exactly what `train` will fit."""
    source = (resources.files("scanflow") / "templates" / template / "steps" / "model.py.tmpl").read_text()
    module = types.ModuleType(f"scanflow_init_{template}_model")
    module.__file__ = "app/steps/model.py"  # its SCHEMA path is never read: init passes the schema
    exec(compile(source, f"<{template} template steps/model.py>", "exec"), module.__dict__)  # noqa: S102
    return module


def estimate_accuracy(template: str, ds: Dataset, sample: int = 2000, seed: int = 0) -> float:
    """Accuracy of the template's model fitted on 3/4 of a sample of the data, scored on the rest:
    the basis of the policy's accuracy floor, and proof that the data can be fitted at all."""
    from sklearn.model_selection import train_test_split  # lazy: scikit-learn (~1 s), only for init

    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(ds.y))[:sample]
    x, y = ds.x[idx], ds.y[idx]
    _, counts = np.unique(y, return_counts=True)
    strat = y if counts.min() >= 2 else None
    x_fit, x_test, y_fit, y_test = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=strat)
    try:
        model = _template_module(template).fit_model(x_fit, y_fit, ds.schema, seed=seed)
        return float(np.mean(model.predict(x_test) == y_test))
    except (ValueError, TypeError, MemoryError) as exc:
        raise InitError(f"the {template} model cannot be fitted on this data: {exc}") from None


# -- rendering and writing --------------------------------------------------------------------------
def _files(template: str) -> dict[str, str]:
    """Relative path -> template text: the common files, then the template's own (which win)."""
    root = resources.files("scanflow") / "templates"
    found: dict[str, str] = {}
    for part in ("common", template):
        stack: list[tuple[Any, str]] = [(root / part, "")]
        while stack:
            node, rel = stack.pop()
            for child in node.iterdir():
                name = f"{rel}{child.name}"
                if child.is_dir():
                    stack.append((child, f"{name}/"))
                elif name.endswith(".tmpl"):
                    found[name.removesuffix(".tmpl")] = child.read_text()
    return found


def render(template: str, values: dict[str, Any]) -> dict[str, str]:
    """Every file of the app, rendered with `string.Template` (`$name`; `$$` is a dollar)."""
    return {rel: string.Template(text).substitute(values) for rel, text in sorted(_files(template).items())}


def app_name(folder: Path) -> str:
    """A valid spec name from the folder's name (letters, digits, _ . -; a letter first)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", folder.resolve().name).strip("-.") or "app"
    return (name if name[0].isalpha() else f"app-{name}")[:60]


def _example_row(ds: Dataset) -> str:
    row = [round(float(v), 4) if not float(v).is_integer() else int(v) for v in ds.x[0]]
    text = json.dumps(row)
    return text if len(text) <= 400 else json.dumps(row[:8])[:-1] + ", ...]"


def values_for(ds: Dataset, template: str, app: str, folder: Path, data: Path,
               accuracy: float) -> dict[str, Any]:
    """The names and numbers the templates are rendered with."""
    n, d = ds.x.shape
    return {
        "app": app, "folder": str(folder), "team": TEAM, "model": f"{app}-clf", "service": app,
        "template": template,
        "target": ds.schema["target"], "n_rows": n, "n_features": d, "n_classes": len(ds.schema["classes"]),
        "data_note": f"data copied from {data.name} at init into data/dataset.npz",
        "data_source": data.name, "init_accuracy": f"{accuracy:.2f}",
        "accuracy_floor": f"{max(0.0, np.floor((accuracy - 0.1) * 100) / 100):.2f}",
        "example_row": _example_row(ds), "example_label": json.dumps(_class_list(ds.y[:1])[0]),
        "feature_note": _feature_note(ds),
        **sizes(n),
    }


def _feature_note(ds: Dataset) -> str:
    s = ds.schema
    if s["template"] == "image":
        shape = " x ".join(map(str, s["image_shape"]))
        return (f"one flattened image per row: {ds.x.shape[1]} raw pixel values (an image of shape {shape}, "
                f"`x[i].reshape(-1)`), pixels in [0, {s['pixel_max']:g}]")
    kinds = [f"`{f['name']}`" + (" (a category code)" if f["kind"] == "categorical" else "")
             for f in s["features"]]
    return f"one feature vector per row, {len(kinds)} numbers in this order: {', '.join(kinds)}"


def write_app(folder: Path, files: dict[str, str], ds: Dataset) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for rel, text in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (folder / "data").mkdir(exist_ok=True)
    np.savez_compressed(folder / "data" / "dataset.npz", x=ds.x, y=ds.y)
    (folder / "data" / "schema.json").write_text(json.dumps(ds.schema, indent=2) + "\n")


def _check_folder(folder: Path, force: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise InitError(f"{folder}: exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not force:
        raise InitError(f"{folder}: exists and is not empty (--force writes the app's files into it)")


# -- the command ------------------------------------------------------------------------------------
def init(
    folder: Annotated[Path, typer.Argument(help="the new application's folder")],
    data: Annotated[Path, typer.Option("--data", help="your data: .csv, .parquet, or .npz with arrays "
                                       "x and y (images: x of shape (n, h, w[, c]))")],
    template: Annotated[str, typer.Option(help="tabular | image")] = "tabular",
    target: Annotated[str | None, typer.Option(
        help="the column to predict (a table), or the labels array of an .npz (default: y)")] = None,
    name: Annotated[str | None, typer.Option(
        help="app, service and model name prefix (default: the folder's name)")] = None,
    force: Annotated[bool, typer.Option(help="write into a folder that is not empty")] = False,
) -> None:
    """Write a complete application for your data: train/retrain workflows, a service, the agents."""
    try:
        if template not in TEMPLATES:
            raise InitError(f"--template {template!r}: expected one of {', '.join(TEMPLATES)}")
        app = name or app_name(folder)
        if not re.match(r"^[A-Za-z][A-Za-z0-9_.-]{0,59}$", app):
            raise InitError(f"--name {app!r}: a letter first, then letters, digits, _ . - (at most 60)")
        _check_folder(folder, force)
        ds = read_dataset(data, template, target)
        accuracy = estimate_accuracy(template, ds)
        files = render(template, values_for(ds, template, app, folder, data, accuracy))
    except InitError as exc:
        fail(f"{exc}; nothing was written")
    write_app(folder, files, ds)
    for note in ds.notes:
        out.print(f"[yellow]note[/] {note}", highlight=False)
    out.print(f"[green]wrote[/] {folder}: app {app!r}, {len(ds.y)} rows x {ds.x.shape[1]} features, "
              f"{len(ds.schema['classes'])} classes (a first fit scored {accuracy:.2f})", highlight=False)
    out.print(f"next: scanflow validate {folder} && scanflow run {folder} train && scanflow deploy {folder} "
              f"&& scanflow agents start {folder}   (see {folder / 'README.md'})", highlight=False)
