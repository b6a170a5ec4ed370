"""The prediction log: answered requests, shadow answers and late labels, read as windows."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np
import orjson
from sqlalchemy import Text, cast, func, insert, select, type_coerce, update

from scanflow.store.db import Database, json_values
from scanflow.store.schema import Label, Prediction, ShadowPrediction
from scanflow.store.window import PredictionWindow, pack_inputs, stack_inputs

# What the prediction-log collector inserts, column order of the tuples (JSON as text).
ENCODED_PREDICTION = ("request_id", "service", "model_version", "ts", "inputs", "inputs_f32",
                      "inputs_u8", "outputs", "latency_ms")
ENCODED_SHADOW = ("request_id", "service", "model_version", "ts", "outputs", "latency_ms")
EncodedPrediction = tuple[str, str, "str | None", float, "str | None", "bytes | None",
                          "bytes | None", str, float]
EncodedShadow = tuple[str, str, "str | None", float, str, float]
_INSERT_PREDICTIONS = (f"INSERT OR IGNORE INTO predictions ({', '.join(ENCODED_PREDICTION)}) "
                       f"VALUES ({', '.join('?' * len(ENCODED_PREDICTION))})")
_INSERT_SHADOWS = (f"INSERT OR IGNORE INTO shadow_predictions ({', '.join(ENCODED_SHADOW)}) "
                   f"VALUES ({', '.join('?' * len(ENCODED_SHADOW))})")


class PredictionRepository(Protocol):
    """What serving writes and monitors/agents read (in the spirit of Dagster's
    `EventLogStorage`: append-only, read by id watermarks)."""

    def add_predictions(
        self, records: Iterable[dict[str, Any]], *, ignore_duplicates: bool = False
    ) -> int: ...

    def add_shadow_predictions(self, records: Iterable[dict[str, Any]]) -> int: ...

    def add_encoded(self, predictions: Sequence[EncodedPrediction],
                    shadows: Sequence[EncodedShadow] = ()) -> int: ...

    def add_labels(self, labels: dict[str, Any]) -> int: ...

    def prediction_window(
        self, service: str, *, model_version: str | None = None, after_id: int | None = None,
        upto_id: int | None = None, since: float | None = None, until: float | None = None,
        limit: int | None = None, labelled_only: bool = False, with_inputs: bool = True,
        with_shadow: bool = False,
    ) -> PredictionWindow: ...

    def predictions(
        self, service: str, *, after_id: int | None = None, upto_id: int | None = None,
        since: float | None = None, until: float | None = None, limit: int | None = None,
        labelled_only: bool = False,
    ) -> list[dict[str, Any]]: ...

    def prediction_ids(
        self, service: str, after_id: int = 0, before_ts: float | None = None, limit: int = 100_000
    ) -> list[tuple[int, float]]: ...

    def count_predictions(self, service: str, after_id: int | None = None) -> tuple[int, int]: ...


class SqlPredictionRepository:
    """`PredictionRepository` on SQLAlchemy (SQLite or PostgreSQL)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def _insert_ignoring_duplicates(self, table: Any, rows: list[dict[str, Any]]) -> int:
        """Rows inserted (those whose key already existed are skipped)."""
        # The dialect module in use only: importing both costs ~0.1 s at every `import scanflow.store`.
        stmt: Any
        if self.db.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert  # lazy: this dialect only

            stmt = pg_insert(table).on_conflict_do_nothing()
        else:
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert  # lazy: this dialect only

            stmt = sqlite_insert(table).on_conflict_do_nothing()
        with self.db.session() as s:
            res = s.execute(stmt, rows)
        n = getattr(res, "rowcount", -1)
        return len(rows) if n is None or n < 0 else int(n)

    def add_predictions(
        self, records: Iterable[dict[str, Any]], *, ignore_duplicates: bool = False
    ) -> int:
        """Insert prediction records. With `ignore_duplicates` a request id already stored is
        skipped, which makes re-collecting a journal after a crash harmless."""
        rows = []
        for r in records:
            row = dict(r)
            if row.get("inputs_f32") is None and row.get("inputs_u8") is None:  # else packed
                row["inputs"], row["inputs_f32"], row["inputs_u8"] = pack_inputs(row.get("inputs"))
            rows.append(row)
        if not rows:
            return 0
        if ignore_duplicates:
            return self._insert_ignoring_duplicates(Prediction.__table__, rows)
        with self.db.session() as s:
            s.execute(insert(Prediction), rows)
        return len(rows)

    def add_shadow_predictions(self, records: Iterable[dict[str, Any]]) -> int:
        rows = [dict(r) for r in records]
        return self._insert_ignoring_duplicates(ShadowPrediction.__table__, rows) if rows else 0

    def add_encoded(self, predictions: Sequence[EncodedPrediction],
                    shadows: Sequence[EncodedShadow] = ()) -> int:
        """The collector's insert: rows already encoded (JSON text, input bytes), request ids
        already stored skipped; returns predictions inserted. On SQLite the values go to the
        driver as they are (no JSON decode/encode, no per-row SQLAlchemy processing): the log
        is written at the request rate, so this is the path whose cost serving pays."""
        if self.db.dialect != "sqlite":  # PostgreSQL: its JSON columns take values, not text
            n = self.add_predictions(
                [dict(zip(ENCODED_PREDICTION, (*r[:4], None if r[4] is None else orjson.loads(r[4]),
                                               r[5], r[6], orjson.loads(r[7]), r[8]), strict=True))
                 for r in predictions], ignore_duplicates=True) if predictions else 0
            self.add_shadow_predictions(
                [dict(zip(ENCODED_SHADOW, (*r[:4], orjson.loads(r[4]), r[5]), strict=True))
                 for r in shadows])
            return n
        n = 0
        with self.db.engine.begin() as conn:
            if predictions:
                res = conn.exec_driver_sql(_INSERT_PREDICTIONS, predictions)
                n = len(predictions) if res.rowcount is None or res.rowcount < 0 else res.rowcount
            if shadows:
                conn.exec_driver_sql(_INSERT_SHADOWS, shadows)
        return n

    def add_labels(self, labels: dict[str, Any]) -> int:
        """Idempotent: a label sent twice for one request keeps the latest value."""
        now = time.time()
        with self.db.session() as s:
            existing = set(
                s.scalars(select(Label.request_id).where(Label.request_id.in_(list(labels)))).all()
            )
            for rid, lab in labels.items():
                if rid in existing:
                    s.execute(update(Label).where(Label.request_id == rid).values(label=lab, ts=now))
                else:
                    s.add(Label(request_id=rid, label=lab, ts=now))
        return len(labels)

    def prediction_window(
        self, service: str, *, model_version: str | None = None, after_id: int | None = None,
        upto_id: int | None = None, since: float | None = None, until: float | None = None,
        limit: int | None = None, labelled_only: bool = False, with_inputs: bool = True,
        with_shadow: bool = False,
    ) -> PredictionWindow:
        """A window of the log as columns (what agents read): one query, no row objects."""
        p, lab = Prediction.__table__.c, Label.__table__.c
        # JSON columns come back as text and are decoded here in one pass (SQLAlchemy's
        # per-value JSON processing costs more than the query itself). PostgreSQL is asked for
        # text explicitly: its driver would decode json itself, and a JSON string then looks
        # like text that is not JSON.
        def text(col: Any) -> Any:
            return type_coerce(col, Text) if self.db.dialect == "sqlite" else cast(col, Text)

        cols = [p.id, p.request_id, p.model_version, p.ts, p.latency_ms,
                text(p.outputs), text(lab.label)]
        if with_inputs:
            cols += [text(p.inputs), p.inputs_f32, p.inputs_u8]
        frm = Prediction.__table__.join(
            Label.__table__, lab.request_id == p.request_id, isouter=not labelled_only
        )
        if with_shadow:
            sh = ShadowPrediction.__table__.c
            cols += [sh.model_version.label("shadow_version"),
                     text(sh.outputs).label("shadow_outputs")]
            frm = frm.join(ShadowPrediction.__table__, sh.request_id == p.request_id, isouter=True)
        q = select(*cols).select_from(frm).where(p.service == service)
        if model_version is not None:
            q = q.where(p.model_version == model_version)
        if after_id is not None:
            q = q.where(p.id > after_id)
        if upto_id is not None:
            q = q.where(p.id <= upto_id)
        if since is not None:
            q = q.where(p.ts >= since)
        if until is not None:
            q = q.where(p.ts < until)
        if limit is not None:
            q = q.order_by(p.id).limit(limit)
        with self.db.engine.connect() as conn:
            rows = list(conn.execute(q).all())
        # Sorted here, not by the database: an ORDER BY makes SQLite sort the input blobs.
        rows.sort(key=lambda r: r[0])
        cols_ = list(zip(*rows, strict=True)) if rows else [()] * len(cols)
        win = PredictionWindow(
            ids=np.asarray(cols_[0], dtype=np.int64), request_ids=list(cols_[1]),
            model_versions=list(cols_[2]), ts=np.asarray(cols_[3], dtype=np.float64),
            latency_ms=np.asarray(cols_[4], dtype=np.float64), outputs=json_values(cols_[5]),
            labels=json_values(cols_[6]),
        )
        if with_inputs:
            win.inputs = stack_inputs(json_values(cols_[7]), list(cols_[8]), list(cols_[9]))
        if with_shadow:
            win.shadow_versions, win.shadow_outputs = list(cols_[-2]), json_values(cols_[-1])
        return win

    def predictions(
        self, service: str, *, after_id: int | None = None, upto_id: int | None = None,
        since: float | None = None, until: float | None = None, limit: int | None = None,
        labelled_only: bool = False,
    ) -> list[dict[str, Any]]:
        """A window of the prediction log as one dict per record (see `prediction_window`)."""
        w = self.prediction_window(service, after_id=after_id, upto_id=upto_id, since=since,
                                   until=until, limit=limit, labelled_only=labelled_only)
        inputs = w.inputs.tolist() if isinstance(w.inputs, np.ndarray) else (w.inputs or [])
        return [
            {"id": int(w.ids[i]), "request_id": w.request_ids[i], "service": service,
             "model_version": w.model_versions[i], "ts": float(w.ts[i]), "inputs": inputs[i],
             "outputs": w.outputs[i], "latency_ms": float(w.latency_ms[i]), "label": w.labels[i]}
            for i in range(len(w))
        ]

    def prediction_ids(
        self, service: str, after_id: int = 0, before_ts: float | None = None, limit: int = 100_000
    ) -> list[tuple[int, float]]:
        """(id, ts) after a watermark, without loading payloads: how monitors cut windows."""
        q = (
            select(Prediction.id, Prediction.ts)
            .where(Prediction.service == service, Prediction.id > after_id)
            .order_by(Prediction.id)
            .limit(limit)
        )
        if before_ts is not None:
            q = q.where(Prediction.ts < before_ts)
        with self.db.session() as s:
            return [(int(i), float(t)) for i, t in s.execute(q).all()]

    def count_predictions(self, service: str, after_id: int | None = None) -> tuple[int, int]:
        """(count, max id) of the log of one service after a watermark."""
        q = select(func.count(Prediction.id), func.max(Prediction.id)).where(
            Prediction.service == service
        )
        if after_id is not None:
            q = q.where(Prediction.id > after_id)
        with self.db.session() as s:
            n, mx = s.execute(q).one()
        return int(n), int(mx or 0)
