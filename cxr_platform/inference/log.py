"""The inference log: one row per prediction (and per refused image), the input of drift and
performance monitoring.

SQLAlchemy Core over SQLite (WAL, the default, under the home folder) or PostgreSQL (by URL).
Rows hold no pixels and no patient identifiers; DICOM UIDs only as salted HMAC-SHA256 hashes,
so the same study can be recognised without being identifiable.

Several processes may write at once: SQLite serializes writers (WAL lets readers continue, and a
busy timeout makes writers wait instead of failing); PostgreSQL needs nothing special.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cxr_platform.data.features import ImageFeatures
from cxr_platform.errors import CxrError
from cxr_platform.locks import advisory_key

# What the platform was asked by a live caller, and a silent trial: a site's archive scored
# before go-live, whose answers went to no one. Drift watches live traffic only.
LIVE_SOURCES = ("http", "dicom", "batch")
SILENT_TRIAL = "silent-trial"
SOURCES = (*LIVE_SOURCES, SILENT_TRIAL)
LABELS = ("NORMAL", "PNEUMONIA")

metadata = sa.MetaData()

predictions_table = sa.Table(
    "inference_records",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("model_name", sa.String(128), nullable=False),
    sa.Column("model_version", sa.String(32)),
    sa.Column("probability", sa.Float, nullable=False),
    sa.Column("label", sa.String(16), nullable=False),
    sa.Column("threshold", sa.Float, nullable=False),
    sa.Column("shadow_version", sa.String(32)),
    sa.Column("shadow_probability", sa.Float),
    sa.Column("shadow_label", sa.String(16)),
    sa.Column("latency_ms", sa.Float),
    sa.Column("intensity_mean", sa.Float),
    sa.Column("intensity_std", sa.Float),
    sa.Column("intensity_p01", sa.Float),
    sa.Column("intensity_p05", sa.Float),
    sa.Column("intensity_p50", sa.Float),
    sa.Column("intensity_p95", sa.Float),
    sa.Column("intensity_p99", sa.Float),
    sa.Column("entropy", sa.Float),
    sa.Column("sharpness", sa.Float),
    sa.Column("original_width", sa.Integer),
    sa.Column("original_height", sa.Integer),
    sa.Column("bit_depth", sa.Integer),
    sa.Column("source_format", sa.String(16)),
    sa.Column("photometric_interpretation", sa.String(32)),
    sa.Column("study_uid_hash", sa.String(64)),
    sa.Column("sop_instance_uid_hash", sa.String(64)),
    # The input gate: production's distance score, and what the shadow's own gate said
    # ("accepted" or its reason); added after the first deployments, so nullable.
    sa.Column("gate_score", sa.Float),
    sa.Column("shadow_gate", sa.String(48)),
    # Which site sent it (an HTTP header or API key, a DICOM calling AE title); nullable.
    sa.Column("site", sa.String(64), index=True),
    # Where its explanation looked: the share of the Grad-CAM relevance inside the lung fields,
    # written after the row when a lung fields version explained it (/explain, the node).
    sa.Column("relevance_in_lungs", sa.Float),
)

# Images the input gate refused: no diagnosis left, so no probability to put in the records.
refusals_table = sa.Table(
    "inference_refusals",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("model_name", sa.String(128), nullable=False),
    sa.Column("model_version", sa.String(32)),
    sa.Column("reason", sa.String(48), nullable=False),
    sa.Column("detail", sa.String(512)),
    sa.Column("gate_score", sa.Float),
    sa.Column("gate_threshold", sa.Float),
    sa.Column("original_width", sa.Integer),
    sa.Column("original_height", sa.Integer),
    sa.Column("source_format", sa.String(16)),
    sa.Column("photometric_interpretation", sa.String(32)),
    sa.Column("study_uid_hash", sa.String(64)),
    sa.Column("sop_instance_uid_hash", sa.String(64)),
    sa.Column("site", sa.String(64), index=True),
)

feedback_table = sa.Table(
    "inference_feedback",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "request_id",
        sa.String(64),
        sa.ForeignKey("inference_records.request_id"),
        nullable=False,
        index=True,
    ),
    sa.Column("label", sa.String(16), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("reporter", sa.String(128)),
)


class InferenceLogError(CxrError):
    pass


class UnknownRequestError(InferenceLogError):
    """Feedback for a request id the log has never seen."""


class OtherSiteError(InferenceLogError):
    """Feedback named a site, and the request came from another."""


class InvalidSiteError(InferenceLogError):
    """A site name the log cannot keep as given."""


SITE_MAX_LENGTH = 64
# Letters and digits of any script, and the punctuation institution names use; nothing that
# could start a new log line or a path.
_SITE = re.compile(r"^\w[\w .,&'()/@+-]*$")


def site_name(value: str | None, *, strict: bool = True) -> str | None:
    """A site as the log keeps it: trimmed, whitespace collapsed, at most 64 characters.

    ``strict``: a name given by a client (a header, an option) that is not a plain name is an
    error; a name read from a DICOM header (``strict=False``) is made plain instead, since the
    image must still be scored.
    """
    if value is None:
        return None
    text = " ".join(str(value).split())
    if not text:
        return None
    if _SITE.match(text) and len(text) <= SITE_MAX_LENGTH:
        return text
    if strict:
        raise InvalidSiteError(
            f"site names are at most {SITE_MAX_LENGTH} letters, digits, spaces and . , & ' ( ) "
            "/ @ + - characters, starting with a letter or digit"
        )
    cleaned = " ".join(re.sub(r"[^\w .,&'()/@+-]", " ", text).split()).lstrip(" .,&'()/@+-")
    return cleaned[:SITE_MAX_LENGTH].rstrip() or None


@dataclass(frozen=True)
class InferenceRecord:
    request_id: str
    source: str
    model_name: str
    model_version: str | None
    probability: float
    label: str
    threshold: float
    features: ImageFeatures
    shadow_version: str | None = None
    shadow_probability: float | None = None
    shadow_label: str | None = None
    latency_ms: float | None = None
    study_uid_hash: str | None = None
    sop_instance_uid_hash: str | None = None
    gate_score: float | None = None
    shadow_gate: str | None = None
    site: str | None = None
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise InferenceLogError(f"source must be one of {SOURCES}, not {self.source!r}")
        if self.site is not None and site_name(self.site) != self.site:
            raise InvalidSiteError(f"not a site name as the log keeps them: {self.site!r}")
        if self.label not in LABELS:
            raise InferenceLogError(f"label must be one of {LABELS}, not {self.label!r}")

    def row(self) -> dict[str, Any]:
        values = asdict(self)
        values.update(values.pop("features"))
        return values


@dataclass(frozen=True)
class RefusalRecord:
    """An image the input gate refused: why, and what of it the log may keep."""

    request_id: str
    source: str
    model_name: str
    model_version: str | None
    reason: str
    detail: str
    gate_score: float | None = None
    gate_threshold: float | None = None
    original_width: int | None = None
    original_height: int | None = None
    source_format: str | None = None
    photometric_interpretation: str | None = None
    study_uid_hash: str | None = None
    sop_instance_uid_hash: str | None = None
    site: str | None = None
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise InferenceLogError(f"source must be one of {SOURCES}, not {self.source!r}")
        if self.site is not None and site_name(self.site) != self.site:
            raise InvalidSiteError(f"not a site name as the log keeps them: {self.site!r}")

    def row(self) -> dict[str, Any]:
        values = asdict(self)
        values["detail"] = values["detail"][:512]
        return values


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL mode
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def create_log_engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        engine = sa.create_engine(url, pool_pre_ping=True)
        with engine.begin() as connection:
            # Two writers starting on an empty database both issue CREATE TABLE IF NOT EXISTS,
            # and PostgreSQL lets the second fail on its catalog; one at a time, the second finds
            # the tables. The lock ends with this transaction.
            lock = advisory_key("cxr.inference_log.schema")
            connection.execute(sa.select(sa.func.pg_advisory_xact_lock(lock)))
            metadata.create_all(connection)
            for table, column in _missing_columns(connection):
                connection.execute(sa.text(_add_column(table, column, engine.dialect)))
        return engine
    path = sa.engine.make_url(url).database
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, connect_args={"timeout": 30})
    sa.event.listen(engine, "connect", _sqlite_pragmas)
    metadata.create_all(engine)  # idempotent: CREATE TABLE IF NOT EXISTS
    for table, column in _missing_columns(engine):
        try:
            with engine.begin() as connection:
                connection.execute(sa.text(_add_column(table, column, engine.dialect)))
        except (sa.exc.OperationalError, sa.exc.ProgrammingError):
            # Another process added it between our inspection and our ALTER.
            if any(c is column for _, c in _missing_columns(engine)):
                raise
    return engine


def _missing_columns(bind: Engine | sa.Connection) -> list[tuple[sa.Table, sa.Column]]:
    """Columns added to the log after a deployment created its tables (all nullable), so an
    existing log keeps working after an upgrade."""
    inspector = sa.inspect(bind)
    missing = []
    for table in metadata.sorted_tables:
        present = {column["name"] for column in inspector.get_columns(table.name)}
        missing += [(table, column) for column in table.columns if column.name not in present]
    return missing


def _add_column(table: sa.Table, column: sa.Column, dialect: sa.Dialect) -> str:
    kind = column.type.compile(dialect=dialect)
    return f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'


_IN_CHUNK = 500  # request ids per IN (...) query


def _insert_new(table: sa.Table, dialect: sa.Dialect):
    """INSERT that skips a row whose request id is there already (both dialects the log runs
    on say it in their own words)."""
    if dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        return table.insert()
    return insert(table).on_conflict_do_nothing(index_elements=["request_id"])


class InferenceLog:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_log_engine(url)

    def write(
        self, records: Iterable[InferenceRecord], refusals: Iterable[RefusalRecord] = ()
    ) -> int:
        """One transaction for the batch, predictions and refusals: all rows land or none. A row
        whose request id is logged already is that request (a DICOM instance scored again by
        the same version: :func:`~cxr_platform.inference.scoring.instance_request_id`) and is
        not written twice."""
        rows = [record.row() for record in records]
        refused = [refusal.row() for refusal in refusals]
        if not rows and not refused:
            return 0
        with self.engine.begin() as connection:
            if rows:
                connection.execute(_insert_new(predictions_table, self.engine.dialect), rows)
            if refused:
                connection.execute(_insert_new(refusals_table, self.engine.dialect), refused)
        return len(rows) + len(refused)

    def record_lung_relevance(self, request_id: str, share: float | None) -> bool:
        """The share of an explained request's relevance inside the lung fields, on its row
        (written when it was scored); False when no row has that request id (the log was
        down when it was scored)."""
        if share is not None and not 0.0 <= share <= 1.0:
            raise InferenceLogError(f"a share of relevance is within [0, 1], not {share}")
        with self.engine.begin() as connection:
            updated = connection.execute(
                predictions_table.update()
                .where(predictions_table.c.request_id == request_id)
                .values(relevance_in_lungs=share)
            )
        return updated.rowcount > 0

    def refusals(
        self,
        *,
        created_from: datetime | None = None,
        created_before: datetime | None = None,
        site: str | None = None,
        sources: Sequence[str] | None = None,
        request_ids: Sequence[str] | None = None,
    ) -> pd.DataFrame:
        query = sa.select(refusals_table).order_by(refusals_table.c.id)
        if site is not None:
            query = query.where(refusals_table.c.site == site)
        if sources is not None:
            query = query.where(refusals_table.c.source.in_(list(sources)))
        if request_ids is not None:
            query = query.where(refusals_table.c.request_id.in_(list(request_ids)))
        if created_from is not None:
            query = query.where(refusals_table.c.created_at >= created_from)
        if created_before is not None:
            query = query.where(refusals_table.c.created_at < created_before)
        with self.engine.connect() as connection:
            return pd.read_sql(query, connection)

    def add_feedback(
        self,
        request_id: str,
        label: str,
        *,
        reporter: str | None = None,
        site: str | None = None,
    ) -> None:
        """``site``: the site giving the label; it may only label its own requests."""
        if label not in LABELS:
            raise InferenceLogError(f"feedback label must be one of {LABELS}, not {label!r}")
        with self.engine.begin() as connection:
            known = connection.execute(
                sa.select(predictions_table.c.site).where(
                    predictions_table.c.request_id == request_id
                )
            ).first()
            if known is None:
                raise UnknownRequestError(f"no prediction with request id {request_id!r}")
            if site is not None and known.site != site:
                raise OtherSiteError(
                    f"request {request_id} was not sent by site {site}; a site labels only "
                    "its own requests"
                )
            connection.execute(
                feedback_table.insert(),
                {
                    "request_id": request_id,
                    "label": label,
                    "created_at": datetime.now(UTC),
                    "reporter": reporter,
                },
            )

    def label_requests(self, labels: Mapping[str, str], *, reporter: str) -> int:
        """Labels for many requests in one transaction (a silent trial's report labels): a
        request whose latest label is already this one is left as it is, so joining the same
        labels again adds nothing. Returns how many labels were added."""
        unknown = sorted(set(labels.values()) - set(LABELS))
        if unknown:
            raise InferenceLogError(f"feedback label must be one of {LABELS}, not {unknown[0]!r}")
        if not labels:
            return 0
        ids = list(labels)
        current: dict[str, Any] = {}
        for start in range(0, len(ids), _IN_CHUNK):  # a year's trial is more than SQLite binds
            latest = self.records(request_ids=ids[start : start + _IN_CHUNK])
            current.update(zip(latest["request_id"], latest["feedback_label"], strict=True))
        missing = sorted(set(labels) - set(current))
        if missing:
            raise UnknownRequestError(f"no prediction with request id {missing[0]!r}")
        now = datetime.now(UTC)
        rows = [
            {"request_id": request, "label": label, "created_at": now, "reporter": reporter}
            for request, label in labels.items()
            if current[request] != label
        ]
        if rows:
            with self.engine.begin() as connection:
                connection.execute(feedback_table.insert(), rows)
        return len(rows)

    def count(
        self,
        *,
        since_id: int = 0,
        shadow_version: str | None = None,
        sources: Sequence[str] | None = None,
    ) -> int:
        query = sa.select(sa.func.count()).where(predictions_table.c.id > since_id)
        if sources is not None:
            query = query.where(predictions_table.c.source.in_(list(sources)))
        if shadow_version is not None:
            query = query.where(predictions_table.c.shadow_version == shadow_version)
        with self.engine.connect() as connection:
            return int(connection.execute(query).scalar_one())

    def ids(self, *, since_id: int, until_id: int | None = None) -> pd.Series:
        """The committed row ids above ``since_id`` (up to ``until_id``), of every source: where
        a reader of one source sees a gap, this says whether a row is missing or only another
        source's."""
        query = (
            sa.select(predictions_table.c.id)
            .where(predictions_table.c.id > since_id)
            .order_by(predictions_table.c.id)
        )
        if until_id is not None:
            query = query.where(predictions_table.c.id <= until_id)
        with self.engine.connect() as connection:
            return pd.Series([row.id for row in connection.execute(query)], dtype="int64")

    def records(
        self,
        *,
        since_id: int = 0,
        until_id: int | None = None,
        limit: int | None = None,
        created_from: datetime | None = None,
        created_before: datetime | None = None,
        shadow_version: str | None = None,
        labeled_only: bool = False,
        site: str | None = None,
        sources: Sequence[str] | None = None,
        request_ids: Sequence[str] | None = None,
    ) -> pd.DataFrame:
        """Rows after ``since_id`` (up to ``until_id``, inclusive) in insertion order, with the
        latest feedback label (if any) as ``feedback_label``; ``site`` cuts them to one site,
        ``sources`` to those sources (:data:`LIVE_SOURCES`: the traffic, no silent trial)."""
        latest_feedback = (
            sa.select(
                feedback_table.c.request_id,
                sa.func.max(feedback_table.c.id).label("feedback_id"),
            )
            .group_by(feedback_table.c.request_id)
            .subquery()
        )
        feedback = feedback_table.alias("feedback")
        query = (
            sa.select(predictions_table, feedback.c.label.label("feedback_label"))
            .select_from(
                predictions_table.outerjoin(
                    latest_feedback,
                    latest_feedback.c.request_id == predictions_table.c.request_id,
                ).outerjoin(feedback, feedback.c.id == latest_feedback.c.feedback_id)
            )
            .where(predictions_table.c.id > since_id)
            .order_by(predictions_table.c.id)
        )
        if until_id is not None:
            query = query.where(predictions_table.c.id <= until_id)
        if created_from is not None:
            query = query.where(predictions_table.c.created_at >= created_from)
        if created_before is not None:
            query = query.where(predictions_table.c.created_at < created_before)
        if shadow_version is not None:
            query = query.where(predictions_table.c.shadow_version == shadow_version)
        if labeled_only:
            query = query.where(feedback.c.label.is_not(None))
        if site is not None:
            query = query.where(predictions_table.c.site == site)
        if sources is not None:
            query = query.where(predictions_table.c.source.in_(list(sources)))
        if request_ids is not None:
            query = query.where(predictions_table.c.request_id.in_(list(request_ids)))
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as connection:
            return pd.read_sql(query, connection)

    def dispose(self) -> None:
        self.engine.dispose()
